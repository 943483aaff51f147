//! A scripted HTTP/1.1 server on loopback for tests of how the Drive
//! client takes answers no well-behaved server sends (absurd headers, a
//! body that stops mid-way): each request gets the raw bytes a function
//! returns for it, then the connection is closed.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the server saw it.
pub struct Request {
    pub method: String,
}

/// What to do with one request.
pub enum Reply {
    /// Send these bytes (status line, headers, body) and close.
    Raw(Vec<u8>),
    /// Send these bytes, then hold the connection open without a word.
    Stall(Vec<u8>),
}

/// A full response with `Content-Length` set from `body`.
pub fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Serves `answer` on a fresh loopback port; returns `http://127.0.0.1:PORT`.
/// The server runs until the test's runtime ends.
pub async fn serve(answer: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let base = format!("http://{}", l.local_addr().expect("local addr"));
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else { return };
                match answer(&req) {
                    Reply::Raw(b) => {
                        let _ = s.write_all(&b).await;
                        let _ = s.shutdown().await;
                    }
                    Reply::Stall(b) => {
                        let _ = s.write_all(&b).await;
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                }
            });
        }
    });
    base
}

/// Reads the request line, headers and a `Content-Length` body.
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut b = [0u8; 64 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(Request { method })
}
