//! TCP proxies on loopback. [`SuspendProxy`] plays a laptop's suspend:
//! after [`SuspendProxy::suspend`], every connection open at that moment
//! goes silent in both directions (what is sent is swallowed, nothing
//! comes back, nothing is closed), as a pooled connection is after a
//! resume or a network change while the kernel does not know it yet;
//! connections opened afterwards are forwarded as usual. [`MeterProxy`]
//! is the server's side of the wire: it logs when the bytes sent to the
//! server arrive, to see how an upload crossed it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy (it lives as long as the runtime that started it).
pub struct SuspendProxy {
    /// `127.0.0.1:PORT`
    pub addr: std::net::SocketAddr,
    epoch: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
}

impl SuspendProxy {
    /// Forwards a fresh loopback port to `to` (`host:port`).
    pub async fn start(to: &str) -> SuspendProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (epoch, opened) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (e, o, to) = (epoch.clone(), opened.clone(), to.to_string());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(s) = TcpStream::connect(&to).await else { continue };
                o.fetch_add(1, Ordering::SeqCst);
                let born = e.load(Ordering::SeqCst);
                let (cr, cw) = c.into_split();
                let (sr, sw) = s.into_split();
                tokio::spawn(pipe(cr, sw, e.clone(), born));
                tokio::spawn(pipe(sr, cw, e.clone(), born));
            }
        });
        SuspendProxy { addr, epoch, opened }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every connection open now goes silent for good.
    pub fn suspend(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Connections opened through the proxy so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either side closes; once the proxy was
/// suspended after this connection was opened, swallows everything.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    epoch: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if epoch.load(Ordering::SeqCst) != born {
            // Dead: keep both sockets open and silent.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// After [`SuspendProxy::suspend`]: reads `len` bytes of `key` through the
/// retry wrapper (3 attempts of up to 30 s) and checks a time-out dropped
/// the dead pooled connections, so the read came back within `within`
/// instead of each retry taking another dead one.
pub async fn read_after_suspend(r: driveblk::remote::DynRemote, key: &str, len: u64, within: Duration) {
    use driveblk::remote::{RetryPolicy, RetryingRemote};
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        seed: Some(1),
        attempt_timeout: Duration::from_secs(30),
    };
    let retried = RetryingRemote::wrap(r, policy);
    let t0 = std::time::Instant::now();
    let got = retried.get_range(key, 0..len).await;
    assert_eq!(got.expect("a retry after a time-out took another dead pooled connection").len() as u64, len);
    assert!(t0.elapsed() < within, "{:?}", t0.elapsed());
}

/// A proxy that forwards both ways and logs each piece of bytes it
/// forwards towards the server, with when it arrived.
pub struct MeterProxy {
    /// `127.0.0.1:PORT`
    pub addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl MeterProxy {
    /// Forwards a fresh loopback port to `to` (`host:port`).
    pub async fn start(to: &str) -> MeterProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lg, to) = (log.clone(), to.to_string());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(s) = TcpStream::connect(&to).await else { continue };
                let (mut cr, cw) = c.into_split();
                let (sr, mut sw) = s.into_split();
                let lg = lg.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        lg.lock().unwrap().push((Instant::now(), n as u64));
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                tokio::spawn(pipe(sr, cw, Arc::new(AtomicU64::new(0)), 0));
            }
        });
        MeterProxy { addr, log }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forgets what was logged.
    pub fn reset(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Bytes sent to the server in consecutive windows of `width`, from
    /// the first byte logged to the last.
    pub fn windows(&self, width: Duration) -> Vec<u64> {
        let log = self.log.lock().unwrap();
        let Some(&(t0, _)) = log.first() else { return Vec::new() };
        let mut out = Vec::new();
        for &(t, n) in log.iter() {
            let i = (t.duration_since(t0).as_secs_f64() / width.as_secs_f64()) as usize;
            if out.len() <= i {
                out.resize(i + 1, 0);
            }
            out[i] += n;
        }
        out
    }

    /// The time from the first byte logged to the last.
    pub fn span(&self) -> Duration {
        let log = self.log.lock().unwrap();
        match (log.first(), log.last()) {
            (Some(a), Some(b)) => b.0.duration_since(a.0),
            _ => Duration::ZERO,
        }
    }
}

/// Checks an upload of `bytes` at `rate` bytes/s crossed `proxy` paced:
/// no 250 ms window after the first carries more than 1.5 times its share
/// of the rate, and the whole took about bytes / rate. Answers the
/// largest window, as a multiple of the share.
pub fn assert_paced(proxy: &MeterProxy, bytes: u64, rate: u64) -> f64 {
    let width = Duration::from_millis(250);
    let share = rate as f64 * width.as_secs_f64();
    let w = proxy.windows(width);
    let total: u64 = w.iter().sum();
    assert!(total >= bytes, "only {total} bytes crossed");
    let max = w.iter().skip(1).copied().max().unwrap_or(0) as f64 / share;
    let span = proxy.span().as_secs_f64();
    let want = bytes as f64 / rate as f64;
    eprintln!(
        "{} windows of 250 ms, largest after the first {:.2}x the share ({:.0} KiB), first {:.0} KiB; {span:.2} s for {want:.2} s at the rate",
        w.len(),
        max,
        share / 1024.0,
        w.first().copied().unwrap_or(0) as f64 / 1024.0
    );
    assert!(
        max <= 1.5,
        "a window carried {max:.2}x its share of the limit: {:?} KiB",
        w.iter().map(|b| b / 1024).collect::<Vec<_>>()
    );
    assert!(span >= want * 0.9 && span <= want * 1.3, "{span:.2} s for {bytes} bytes at {rate} bytes/s");
    max
}
