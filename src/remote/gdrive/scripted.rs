//! Tests only: a stand-in for Drive on loopback that answers from a script,
//! for the protocol corners the emulator never produces.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use md5::{Digest, Md5};

use super::api::DriveApi;
use super::upload::CHUNK_UNIT;
use crate::remote::config::{DriveConfig, DriveCredentials, PacerConfig};

/// One scripted answer: status, headers, body.
pub(crate) type Answer = (u16, Vec<(&'static str, String)>, String);

/// A stand-in for Drive on loopback that answers requests in turn from
/// `script` (`{base}` in a header is its base URL) and records each
/// request as "METHOD path Content-Range". Bodies are read whole first.
pub(crate) fn scripted(script: Vec<Answer>) -> (DriveApi, Arc<Mutex<Vec<String>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("listen");
    let base = format!("http://{}", server.server_addr().to_ip().expect("ip address"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let b = base.clone();
    std::thread::spawn(move || {
        for (status, headers, body) in script {
            let Ok(Some(mut req)) = server.recv_timeout(Duration::from_secs(10)) else { return };
            let mut sink = Vec::new();
            let _ = req.as_reader().read_to_end(&mut sink);
            let cr = req.headers().iter().find(|h| h.field.equiv("Content-Range")).map(|h| h.value.to_string());
            log.lock().unwrap().push(format!("{} {} {}", req.method(), req.url(), cr.unwrap_or_default()));
            let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
            for (k, v) in headers {
                resp.add_header(tiny_http::Header::from_bytes(k, v.replace("{base}", &b)).expect("header"));
            }
            let _ = req.respond(resp);
        }
    });
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
