//! A TCP proxy on loopback that plays a laptop's suspend: after
//! [`SuspendProxy::suspend`], every connection open at that moment goes
//! silent in both directions (what is sent is swallowed, nothing comes
//! back, nothing is closed), as a pooled connection is after a resume or a
//! network change while the kernel does not know it yet; connections
//! opened afterwards are forwarded as usual.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
