//! Test helpers: a raw-HTTP client for the emulator (reqwest, no Drive client library).

use std::time::Duration;

use driveemu::{Config, Emulator};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const MIB: usize = 1024 * 1024;
pub const KIB256: usize = 256 * 1024;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("reqwest client")
}

/// An emulator plus a client holding a user access token (refresh-token grant).
pub struct Api {
    pub emu: Emulator,
    pub http: reqwest::Client,
    pub token: String,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn code(&self) -> u16 {
        self.status.as_u16()
    }
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
    /// `error.errors[0].reason` of a Google error body.
    pub fn reason(&self) -> String {
        self.json()["error"]["errors"][0]["reason"].as_str().unwrap_or("").to_string()
    }
}

pub async fn user_token(http: &reqwest::Client, emu: &Emulator) -> String {
    let (id, secret) = emu.oauth_client();
    let rt = emu.issue_refresh_token();
    let r = http
        .post(emu.token_uri())
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", &id),
            ("client_secret", &secret),
            ("refresh_token", &rt),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    v["access_token"].as_str().expect("access_token").to_string()
}

impl Api {
    pub async fn new() -> Api {
        Api::with(Config::default()).await
    }

    pub async fn with(cfg: Config) -> Api {
        let emu = Emulator::start(cfg).await.expect("start emulator");
        let http = http();
        let token = user_token(&http, &emu).await;
        Api { emu, http, token }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.emu.base_url(), path)
    }

    /// Sends a request with the bearer token; `path` starts with `/drive/v3` or `/upload/...`,
    /// or is a full URL (a session URI).
    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Resp {
        self.try_send(method, path, headers, body).await.expect("request failed at the transport level")
    }

    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Resp, reqwest::Error> {
        let url = if path.starts_with("http") { path.to_string() } else { self.url(path) };
        let mut rb = self.http.request(method, url).bearer_auth(&self.token).body(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await?.to_vec();
        Ok(Resp { status, headers, body })
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.send(Method::GET, path, &[], vec![]).await
    }

    pub async fn json(&self, method: Method, path: &str, v: Value) -> Resp {
        self.send(
            method,
            path,
            &[("Content-Type", "application/json; charset=UTF-8")],
            serde_json::to_vec(&v).expect("json"),
        )
        .await
    }

    /// files.create (metadata only); panics unless 200; returns the resource.
    pub async fn create(&self, meta: Value) -> Value {
        let r = self.json(Method::POST, "/drive/v3/files?fields=*&supportsAllDrives=true", meta).await;
        assert_eq!(r.code(), 200, "create failed: {}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    pub async fn folder(&self, name: &str, parent: &str) -> String {
        let v = self.create(serde_json::json!({"name": name, "parents": [parent], "mimeType": "application/vnd.google-apps.folder"})).await;
        v["id"].as_str().expect("id").to_string()
    }

    /// A multipart upload of `data`; returns the full resource.
    pub async fn upload(&self, meta: Value, data: &[u8]) -> Value {
        let r = self
            .multipart(
                "/upload/drive/v3/files?uploadType=multipart&fields=*&supportsAllDrives=true",
                Method::POST,
                &meta,
                data,
            )
            .await;
        assert_eq!(r.code(), 200, "upload failed: {}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    pub async fn multipart(&self, path: &str, method: Method, meta: &Value, data: &[u8]) -> Resp {
        let boundary = "emu_boundary_42";
        let mut body = Vec::new();
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&serde_json::to_vec(meta).expect("json"));
        body.extend_from_slice(
            format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let ct = format!("multipart/related; boundary={boundary}");
        self.send(method, path, &[("Content-Type", &ct)], body).await
    }

    pub async fn list(&self, query: &str) -> Resp {
        self.get(&format!("/drive/v3/files?{query}")).await
    }

    pub async fn generate_ids(&self, n: usize) -> Vec<String> {
        let r = self.get(&format!("/drive/v3/files/generateIds?count={n}")).await;
        assert_eq!(r.code(), 200);
        r.json()["ids"].as_array().expect("ids").iter().map(|v| v.as_str().expect("id").to_string()).collect()
    }
}

pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed as usize * 7 + i / 251) % 251) as u8).collect()
}

pub fn md5_hex(d: &[u8]) -> String {
    use md5::Digest as _;
    hex::encode(md5::Md5::digest(d))
}

pub fn sha256_hex(d: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(d))
}
