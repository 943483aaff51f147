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
    delay_ms: Arc<AtomicU64>,
}

impl SuspendProxy {
    /// Forwards a fresh loopback port to `to` (`host:port`).
    pub async fn start(to: &str) -> SuspendProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (epoch, opened) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (e, o, d, to) = (epoch.clone(), opened.clone(), delay_ms.clone(), to.to_string());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(s) = TcpStream::connect(&to).await else { continue };
                o.fetch_add(1, Ordering::SeqCst);
                let born = e.load(Ordering::SeqCst);
                let (cr, cw) = c.into_split();
                let (sr, sw) = s.into_split();
                tokio::spawn(pipe(cr, sw, e.clone(), born, None));
                tokio::spawn(pipe(sr, cw, e.clone(), born, Some(d.clone())));
            }
        });
        SuspendProxy { addr, epoch, opened, delay_ms }
    }

    /// Holds each piece of an answer for `d` before passing it on, so
    /// requests made at once overlap and each takes its own connection.
    pub fn set_answer_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
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
    delay_ms: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = delay_ms.as_ref().map_or(0, |d| d.load(Ordering::SeqCst));
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
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
/// forwards, with when it arrived: `up` towards the server, `down` from it.
pub struct MeterProxy {
    /// `127.0.0.1:PORT`
    pub addr: std::net::SocketAddr,
    pub up: Meter,
    pub down: Meter,
}

/// When the bytes of one direction arrived at the proxy.
#[derive(Clone, Default)]
pub struct Meter(Arc<Mutex<Vec<(Instant, u64)>>>);

impl MeterProxy {
    /// Forwards a fresh loopback port to `to` (`host:port`). Its sockets
    /// towards the client keep a small send buffer, so what leaves the
    /// server has crossed to the client (or sits in the client's receive
    /// buffer), as on a real link, not in a buffer of the proxy's.
    pub async fn start(to: &str) -> MeterProxy {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_send_buffer_size(64 << 10).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(64).unwrap();
        let addr = l.local_addr().unwrap();
        let (up, down) = (Meter::default(), Meter::default());
        let (u, d, to) = (up.clone(), down.clone(), to.to_string());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(s) = TcpStream::connect(&to).await else { continue };
                let (cr, cw) = c.into_split();
                let (sr, sw) = s.into_split();
                tokio::spawn(metered(cr, sw, u.clone()));
                tokio::spawn(metered(sr, cw, d.clone()));
            }
        });
        MeterProxy { addr, up, down }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forgets what was logged.
    pub fn reset(&self) {
        self.up.0.lock().unwrap().clear();
        self.down.0.lock().unwrap().clear();
    }
}

/// Copies `from` to `to`, logging each piece into `m`.
async fn metered(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, m: Meter) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        m.0.lock().unwrap().push((Instant::now(), n as u64));
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Meter {
    /// Bytes in consecutive windows of `width`, from the first byte logged
    /// to the last.
    pub fn windows(&self, width: Duration) -> Vec<u64> {
        let log = self.0.lock().unwrap();
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

    /// How far the bytes logged ran ahead of `rate` bytes/s from the
    /// first one: the most, at any moment, by which what had arrived
    /// exceeded what the rate allows by then.
    pub fn ahead_of(&self, rate: u64) -> u64 {
        let log = self.0.lock().unwrap();
        let Some(&(t0, _)) = log.first() else { return 0 };
        let mut sum = 0u64;
        let mut most = 0u64;
        for &(t, n) in log.iter() {
            sum += n;
            let allowed = (t.duration_since(t0).as_secs_f64() * rate as f64) as u64;
            most = most.max(sum.saturating_sub(allowed));
        }
        most
    }

    /// The time from the first byte logged to the last.
    pub fn span(&self) -> Duration {
        let log = self.0.lock().unwrap();
        match (log.first(), log.last()) {
            (Some(a), Some(b)) => b.0.duration_since(a.0),
            _ => Duration::ZERO,
        }
    }
}

/// Checks a transfer of `bytes` at `rate` bytes/s crossed `m` paced: no
/// 250 ms window after the first `skip` carries more than 1.5 times its
/// share of the rate, and the whole took about bytes / rate. Answers the
/// largest window, as a multiple of the share.
pub fn assert_paced(m: &Meter, skip: usize, bytes: u64, rate: u64) -> f64 {
    let width = Duration::from_millis(250);
    let share = rate as f64 * width.as_secs_f64();
    let w = m.windows(width);
    let total: u64 = w.iter().sum();
    assert!(total >= bytes, "only {total} bytes crossed");
    let max = w.iter().skip(skip).copied().max().unwrap_or(0) as f64 / share;
    let span = m.span().as_secs_f64();
    let want = bytes as f64 / rate as f64;
    let kib: Vec<u64> = w.iter().map(|b| b / 1024).collect();
    eprintln!(
        "{} windows of 250 ms, largest after the first {skip} {max:.2}x the share ({:.0} KiB); {span:.2} s for {want:.2} s at the rate; KiB: {kib:?}",
        w.len(),
        share / 1024.0,
    );
    assert!(max <= 1.5, "a window carried {max:.2}x its share of the limit: {kib:?} KiB");
    assert!(span >= want * 0.9 && span <= want * 1.3, "{span:.2} s for {bytes} bytes at {rate} bytes/s");
    max
}
