//! Fault injection: rate-limit bursts, 5xx, latency, bandwidth, a dead server, stats, the
//! blocking start with web-UI helpers, and the binary.

use std::time::{Duration, Instant};

use driveemu::{Config, Emulator, RateLimit};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn rate_limit_bursts_then_recovers() {
    let api =
        Api::with(Config { rate_limit: Some(RateLimit { per_second: 4.0, burst: 5 }), ..Config::default() }).await;
    let mut codes = Vec::new();
    let mut retry_after = None;
    let mut reasons = Vec::new();
    for _ in 0..12 {
        let r = api.get("/drive/v3/files?fields=files(id)").await;
        codes.push(r.code());
        if r.code() != 200 {
            reasons.push(r.reason());
        }
        if r.code() == 429 {
            retry_after = r.header("retry-after");
        }
    }
    assert!(codes[..5].iter().all(|c| *c == 200), "{codes:?}");
    let refused = codes.iter().filter(|c| **c != 200).count();
    assert!(refused >= 5, "a burst of refusals expected: {codes:?}");
    assert!(codes.contains(&403) && codes.contains(&429), "{codes:?}");
    assert!(reasons.iter().all(|r| r == "userRateLimitExceeded" || r == "rateLimitExceeded"), "{reasons:?}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)));
    let st = api.emu.stats();
    assert!(st.rate_limited_403 >= 1 && st.rate_limited_429 >= 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(api.get("/drive/v3/files").await.code(), 200, "recovers once the bucket refills");
    api.emu.faults().set_rate_limit(None);
    for _ in 0..20 {
        assert_eq!(api.get("/drive/v3/files").await.code(), 200);
    }
}

#[tokio::test]
async fn injected_server_errors() {
    let api = Api::new().await;
    api.emu.faults().set_error_rate(1.0);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = api.get("/drive/v3/files").await;
        assert!(r.code() == 500 || r.code() == 503, "{}", r.code());
        assert_eq!(r.json()["error"]["code"], r.code());
        assert_eq!(r.reason(), "backendError");
        seen.push(r.code());
    }
    assert!(seen.contains(&500) && seen.contains(&503), "{seen:?}");
    // Writes fail without landing.
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x"})).await;
    assert!(r.code() >= 500);
    api.emu.faults().set_error_rate(0.0);
    assert_eq!(api.list("").await.json()["files"].as_array().map(Vec::len), Some(0));
    assert_eq!(api.emu.stats().injected_5xx, 11);
}

#[tokio::test]
async fn latency_bandwidth_and_down() {
    let api = Api::new().await;
    api.emu.faults().set_latency(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(api.get("/drive/v3/files").await.code(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    api.emu.faults().set_latency(Duration::ZERO);

    let data = pattern(400_000, 4);
    let f = api.upload(json!({"name": "x"}), &data).await;
    let url = format!("/drive/v3/files/{}?alt=media", f["id"].as_str().expect("id"));
    // 8 Mbit/s = 1 MB/s, shared by two parallel downloads: 800 KB takes about 0.8 s.
    api.emu.faults().set_bandwidth(Some(8_000_000));
    let t = Instant::now();
    let (a, b) = tokio::join!(api.get(&url), api.get(&url));
    let took = t.elapsed();
    assert_eq!((a.body.len(), b.body.len()), (400_000, 400_000));
    assert!(took >= Duration::from_millis(700), "{took:?}");
    api.emu.faults().set_bandwidth(None);

    api.emu.faults().set_down(true);
    assert!(api.try_send(Method::GET, "/drive/v3/files", &[], vec![]).await.is_err());
    assert!(api.http.post(api.emu.token_uri()).send().await.is_err());
    api.emu.faults().set_down(false);
    assert_eq!(api.get("/drive/v3/files").await.code(), 200);
    let st = api.emu.stats();
    assert!(st.resets >= 2);
    assert!(st.bytes_out >= 800_000 && st.bytes_in >= 400_000, "{st:?}");
    assert!(st.requests.get("files.get media").copied().unwrap_or(0) >= 2, "{st:?}");
}

#[test]
fn blocking_start_and_web_ui_helpers() {
    let emu = Emulator::start_blocking(Config::default()).expect("start");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let root = emu.root_folder_id();
    let id = emu.ui_upload(&root, "from-ui.bin", b"hello");
    rt.block_on(async {
        let http = http();
        let tok = user_token(&http, &emu).await;
        let get = |q: String| {
            let http = http.clone();
            let tok = tok.clone();
            let base = emu.base_url();
            async move {
                let r = http.get(format!("{base}{q}")).bearer_auth(&tok).send().await.expect("get");
                serde_json::from_slice::<Value>(&r.bytes().await.expect("b")).unwrap_or(Value::Null)
            }
        };
        let v = get(format!("/drive/v3/files/{id}?fields=name,md5Checksum,version,trashed")).await;
        assert_eq!(v["name"], "from-ui.bin");
        assert_eq!(v["md5Checksum"], md5_hex(b"hello"));
        let v0: u64 = v["version"].as_str().expect("v").parse().expect("n");
        emu.ui_rename(&id, "renamed");
        let v = get(format!("/drive/v3/files/{id}?fields=name,version")).await;
        assert_eq!(v["name"], "renamed");
        let v1: u64 = v["version"].as_str().expect("v").parse().expect("n");
        assert!(v1 > v0);
        emu.ui_replace_content(&id, b"changed by a person");
        let v = get(format!("/drive/v3/files/{id}?fields=md5Checksum,version")).await;
        assert_eq!(v["md5Checksum"], md5_hex(b"changed by a person"));
        assert!(v["version"].as_str().expect("v").parse::<u64>().expect("n") > v1);
        emu.ui_trash(&id);
        assert_eq!(get(format!("/drive/v3/files/{id}?fields=trashed")).await["trashed"], true);
        let q = enc("trashed = false");
        assert_eq!(get(format!("/drive/v3/files?q={q}")).await["files"].as_array().map(Vec::len), Some(0));
    });
    assert_eq!(emu.ui_content(&id).as_deref(), Some(&b"changed by a person"[..]));
    emu.shutdown();
}

#[test]
fn binary_prints_urls_and_writes_credentials() {
    use std::io::BufRead as _;
    let dir = std::env::temp_dir().join(format!("driveemu-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let sa = dir.join("sa.json");
    let oauth = dir.join("oauth.json");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_driveemu"))
        .args(["--listen", "127.0.0.1:0", "--latency-ms", "1", "--rate-limit", "100/100", "--shared-drive", "team"])
        .arg("--sa-key-out")
        .arg(&sa)
        .arg("--oauth-out")
        .arg(&oauth)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn driveemu");
    let out = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(out).lines();
    let mut kv = std::collections::HashMap::new();
    for _ in 0..4 {
        let l = lines.next().expect("a line").expect("utf8");
        let (k, v) = l.split_once('=').expect("k=v");
        kv.insert(k.to_string(), v.to_string());
    }
    let base = kv["base_url"].clone();
    assert_eq!(kv["token_uri"], format!("{base}/token"));
    assert!(kv.contains_key("shared_drive_id"));
    let key: Value = serde_json::from_slice(&std::fs::read(&sa).expect("sa file")).expect("json");
    assert_eq!(key["token_uri"], kv["token_uri"].as_str());
    let o: Value = serde_json::from_slice(&std::fs::read(&oauth).expect("oauth file")).expect("json");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let status = rt.block_on(async {
        let http = http();
        let r = http
            .post(o["token_uri"].as_str().expect("uri"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", o["client_id"].as_str().expect("id")),
                ("client_secret", o["client_secret"].as_str().expect("secret")),
                ("refresh_token", o["refresh_token"].as_str().expect("rt")),
            ])
            .send()
            .await
            .expect("post");
        let v: Value = serde_json::from_slice(&r.bytes().await.expect("b")).expect("json");
        let r = http
            .get(format!("{base}/drive/v3/files"))
            .bearer_auth(v["access_token"].as_str().expect("tok"))
            .send()
            .await
            .expect("get");
        r.status().as_u16()
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status, 200);
}
