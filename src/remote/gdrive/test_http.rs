//! Tests only: a scripted HTTP/1.1 stand-in for Drive on loopback, for the
//! protocol corners the emulator never produces (a session that restarts,
//! absurd headers, a body that stops mid-way): each request gets the raw
//! bytes a function returns for it, then the connection is closed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::api::DriveApi;
use super::upload::CHUNK_UNIT;
use crate::remote::config::{DriveConfig, DriveCredentials, PacerConfig};

/// One request as the server saw it.
pub struct Request {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub content_range: Option<String>,
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
    let path = first.next()?.to_string();
    let headers: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(':')).collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim());
    let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let content_range = header("content-range").map(str::to_string);
    let mut have = buf.len() - head_end;
    while have < len {
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(Request { method, path, content_range })
}

/// One scripted answer: status, headers, body.
pub(crate) type Answer = (u16, Vec<(&'static str, String)>, String);

/// A Drive client against a stand-in that answers requests in turn from
/// `script` (`{base}` in a header is its base URL; past the script, 500)
/// and records each as "METHOD path Content-Range".
pub(crate) async fn scripted(script: Vec<Answer>) -> (DriveApi, Arc<Mutex<Vec<String>>>) {
    let script = Mutex::new(VecDeque::from(script));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let base_cell = Arc::new(std::sync::OnceLock::<String>::new());
    let b = base_cell.clone();
    let base = serve(move |r| {
        let cr = r.content_range.clone().unwrap_or_default();
        log.lock().unwrap().push(format!("{} {} {cr}", r.method, r.path));
        let (status, headers, body) =
            script.lock().unwrap().pop_front().unwrap_or((500, Vec::new(), "script ended".into()));
        let base = b.get().cloned().unwrap_or_default();
        let headers: Vec<(&str, String)> = headers.into_iter().map(|(k, v)| (k, v.replace("{base}", &base))).collect();
        Reply::Raw(response(&format!("{status} Scripted"), &headers, body.as_bytes()))
    })
    .await;
    base_cell.set(base.clone()).expect("set once");
    let cfg = DriveConfig {
        api_url: base,
        credentials: DriveCredentials::StaticToken("t".into()),
        pacer: PacerConfig::fixed(10_000.0, 10_000),
        chunk_size: CHUNK_UNIT,
        request_timeout: Duration::from_secs(10),
        upload_backoff: Duration::from_millis(1),
        ..DriveConfig::default()
    };
    (DriveApi::new(&cfg), seen)
}

/// A session initiation's answer: 200 and its `Location`.
pub(crate) fn session(id: &str) -> Answer {
    (
        200,
        vec![("Location", format!("{{base}}/upload/drive/v3/files?uploadType=resumable&upload_id={id}"))],
        String::new(),
    )
}

/// An error in Google's JSON shape.
pub(crate) fn google_error(code: u16, reason: &str, message: &str) -> Answer {
    let body = serde_json::json!({"error": {"code": code, "message": message,
        "errors": [{"domain": "global", "reason": reason, "message": message}]}});
    (code, vec![("Content-Type", "application/json; charset=UTF-8".into())], body.to_string())
}

/// The final answer of an upload of `data`: the file resource.
pub(crate) fn landed(data: &[u8]) -> Answer {
    let f = serde_json::json!({"id": "f1", "size": data.len().to_string(),
        "md5Checksum": hex::encode(Md5::digest(data))});
    (200, vec![("Content-Type", "application/json; charset=UTF-8".into())], f.to_string())
}
