//! Further paths: lost replies, service-account quota, trash, session cancel/auth, jitter.

use std::time::{Duration, Instant};

use driveemu::{Config, Emulator};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn lost_reply_then_retry_sees_409_for_its_own_create() {
    let api = Api::new().await;
    let id = api.generate_ids(1).await.remove(0);
    api.emu.faults().set_lost_reply_rate(1.0);
    let r = api
        .try_send(
            Method::POST,
            "/drive/v3/files",
            &[("Content-Type", "application/json")],
            serde_json::to_vec(&json!({"id": id, "name": "manifest-7"})).expect("json"),
        )
        .await;
    assert!(r.is_err(), "the reply should have been lost");
    // Reads are never lost.
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?fields=name")).await.json()["name"], "manifest-7");
    api.emu.faults().set_lost_reply_rate(0.0);
    let r = api.json(Method::POST, "/drive/v3/files", json!({"id": id, "name": "manifest-7"})).await;
    assert_eq!(r.code(), 409, "the retry learns its create landed");
    assert_eq!(api.emu.stats().lost_replies, 1);
}

#[tokio::test]
async fn service_accounts_have_no_my_drive_quota_when_asked() {
    let emu = Emulator::start(Config::default()).await.expect("start");
    emu.faults().set_service_account_has_no_quota(true);
    let http = http();
    // A service-account token through the JWT grant (aud = Google's canonical URI works too).
    let key: Value = serde_json::from_str(&emu.service_account_key_json()).expect("key");
    let tok = sa_token(&http, &emu, &key).await;
    let base = emu.base_url();
    let post = |path: String, body: Vec<u8>, ct: &'static str| {
        let http = http.clone();
        let tok = tok.clone();
        async move {
            let r = http.post(path).bearer_auth(tok).header("Content-Type", ct).body(body).send().await.expect("post");
            let s = r.status().as_u16();
            (s, serde_json::from_slice::<Value>(&r.bytes().await.expect("b")).unwrap_or(Value::Null))
        }
    };
    let (s, v) =
        post(format!("{base}/upload/drive/v3/files?uploadType=media"), b"x".to_vec(), "application/octet-stream").await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["errors"][0]["reason"], "storageQuotaExceeded");
    // Folders are fine, and so are files in a shared drive.
    let (s, _) = post(
        format!("{base}/drive/v3/files"),
        serde_json::to_vec(&json!({"name": "d", "mimeType": "application/vnd.google-apps.folder"})).expect("j"),
        "application/json",
    )
    .await;
    assert_eq!(s, 200);
    let drive = emu.create_shared_drive("team");
    let body = serde_json::to_vec(&json!({"name": "p", "parents": [drive]})).expect("j");
    let (s, v) = post(format!("{base}/drive/v3/files?supportsAllDrives=true"), body, "application/json").await;
    assert_eq!(s, 200, "{v}");
    // A user (refresh-token) token still uploads to My Drive.
    let ut = user_token(&http, &emu).await;
    let r = http
        .post(format!("{base}/upload/drive/v3/files?uploadType=media"))
        .bearer_auth(ut)
        .body(b"x".to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
}

async fn sa_token(http: &reqwest::Client, emu: &Emulator, key: &Value) -> String {
    use base64::Engine as _;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::{SignatureEncoding, Signer};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"iss": key["client_email"], "aud": "https://oauth2.googleapis.com/token", "scope": "https://www.googleapis.com/auth/drive", "iat": now, "exp": now + 600});
    let input = format!("{}.{}", b64(br#"{"alg":"RS256","typ":"JWT"}"#), b64(&serde_json::to_vec(&claims).expect("c")));
    let sk = rsa::RsaPrivateKey::from_pkcs8_pem(key["private_key"].as_str().expect("pem")).expect("key");
    let sig = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(sk).sign(input.as_bytes()).to_bytes();
    // The token endpoint also takes a JSON body.
    let r = http
        .post(emu.token_uri())
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&json!({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": format!("{input}.{}", b64(&sig))})).expect("j"))
        .send()
        .await
        .expect("token");
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.expect("b")).expect("json");
    v["access_token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn trash_cascades_and_empty_trash_deletes() {
    let api = Api::new().await;
    let dir = api.folder("d", "root").await;
    let sub = api.folder("s", &dir).await;
    let f = api.upload(json!({"name": "f", "parents": [sub]}), b"abc").await;
    let fid = f["id"].as_str().expect("id").to_string();
    let r = api.json(Method::PATCH, &format!("/drive/v3/files/{dir}"), json!({"trashed": true})).await;
    assert_eq!(r.code(), 200);
    let v = api.get(&format!("/drive/v3/files/{fid}?fields=trashed,explicitlyTrashed")).await.json();
    assert_eq!(v, json!({"trashed": true, "explicitlyTrashed": false}));
    // Untrash brings the children back.
    api.json(Method::PATCH, &format!("/drive/v3/files/{dir}"), json!({"trashed": false})).await;
    assert_eq!(api.get(&format!("/drive/v3/files/{fid}?fields=trashed")).await.json()["trashed"], false);
    api.json(Method::PATCH, &format!("/drive/v3/files/{fid}"), json!({"trashed": true})).await;
    assert_eq!(api.send(Method::DELETE, "/drive/v3/files/trash", &[], vec![]).await.code(), 204);
    assert_eq!(api.get(&format!("/drive/v3/files/{fid}")).await.code(), 404);
    assert_eq!(api.get(&format!("/drive/v3/files/{sub}")).await.code(), 200);
    // The web-UI delete.
    api.emu.ui_delete(&sub);
    assert_eq!(api.get(&format!("/drive/v3/files/{sub}")).await.code(), 404);
    // The root cannot be deleted or trashed.
    assert_eq!(api.send(Method::DELETE, "/drive/v3/files/root", &[], vec![]).await.code(), 403);
}

/// `trashed`: "whether the file has been trashed, either explicitly or from
/// a trashed parent folder" (files resource). An item created in a folder in
/// the trash, or moved into one, is trashed with it (not explicitly), and
/// out of the `trashed = false` listing; moved out again, it is not.
#[tokio::test]
async fn items_created_or_moved_into_a_trashed_folder_are_trashed() {
    let api = Api::new().await;
    let api = &api;
    let dir = api.folder("d", "root").await;
    let other = api.folder("o", "root").await;
    api.json(Method::PATCH, &format!("/drive/v3/files/{dir}"), json!({"trashed": true})).await;
    let f = api.upload(json!({"name": "new", "parents": [dir]}), b"abc").await;
    let fid = f["id"].as_str().expect("id").to_string();
    let state = |id: String| async move {
        api.get(&format!("/drive/v3/files/{id}?fields=trashed,explicitlyTrashed")).await.json()
    };
    assert_eq!(state(fid.clone()).await, json!({"trashed": true, "explicitlyTrashed": false}));
    let q = format!("q={}", enc(&format!("'{dir}' in parents and trashed = false")));
    assert_eq!(api.list(&q).await.json()["files"], json!([]));
    // Moved out (removeParents/addParents): no longer trashed; moved back in: trashed.
    let mv = |to: &str, from: &str| format!("/drive/v3/files/{fid}?addParents={to}&removeParents={from}");
    assert_eq!(api.json(Method::PATCH, &mv(&other, &dir), json!({})).await.code(), 200);
    assert_eq!(state(fid.clone()).await, json!({"trashed": false, "explicitlyTrashed": false}));
    api.json(Method::PATCH, &mv(&dir, &other), json!({})).await;
    assert_eq!(state(fid.clone()).await, json!({"trashed": true, "explicitlyTrashed": false}));
    // The web UI's move does the same.
    api.emu.ui_move(&fid, &other);
    assert_eq!(state(fid.clone()).await, json!({"trashed": false, "explicitlyTrashed": false}));
}

#[tokio::test]
async fn session_uris_cancel_and_outlive_the_token() {
    let api = Api::new().await;
    let api = &api;
    let start = |name: &'static str| async move {
        let r = api
            .send(
                Method::POST,
                "/upload/drive/v3/files?uploadType=resumable",
                &[("Content-Type", "application/json"), ("X-Upload-Content-Length", "10")],
                serde_json::to_vec(&json!({"name": name})).expect("j"),
            )
            .await;
        assert_eq!(r.code(), 200);
        r.header("location").expect("Location")
    };
    let loc = start("a").await;
    let r = api.send(Method::DELETE, &loc, &[], vec![]).await;
    assert_eq!(r.code(), 499);
    assert_eq!(api.send(Method::PUT, &loc, &[("Content-Range", "bytes */10")], vec![]).await.code(), 404);
    // The token runs out mid-upload: the session URI still takes the bytes.
    let loc = start("b").await;
    api.emu.faults().expire_tokens_now();
    let r = api
        .http
        .put(&loc)
        .header("Content-Range", "bytes 0-9/10")
        .body(b"0123456789".to_vec())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn injected_5xx_on_a_chunk_then_resume() {
    let api = Api::new().await;
    let total = 2 * KIB256 + 7;
    let data = pattern(total, 8);
    let r = api
        .send(
            Method::POST,
            "/upload/drive/v3/files?uploadType=resumable&fields=md5Checksum",
            &[("Content-Type", "application/json"), ("X-Upload-Content-Length", &total.to_string())],
            b"{}".to_vec(),
        )
        .await;
    let loc = r.header("location").expect("Location");
    let r = api
        .send(
            Method::PUT,
            &loc,
            &[("Content-Range", &format!("bytes 0-{}/{total}", KIB256 - 1))],
            data[..KIB256].to_vec(),
        )
        .await;
    assert_eq!(r.code(), 308);
    api.emu.faults().set_error_rate(1.0);
    let r = api
        .send(
            Method::PUT,
            &loc,
            &[("Content-Range", &format!("bytes {}-{}/{total}", KIB256, total - 1))],
            data[KIB256..].to_vec(),
        )
        .await;
    assert!(r.code() == 500 || r.code() == 503);
    api.emu.faults().set_error_rate(0.0);
    let r = api.send(Method::PUT, &loc, &[("Content-Range", &format!("bytes */{total}"))], vec![]).await;
    assert_eq!(r.header("range").as_deref(), Some("bytes=0-262143"));
    let r = api
        .send(
            Method::PUT,
            &loc,
            &[("Content-Range", &format!("bytes {}-{}/{total}", KIB256, total - 1))],
            data[KIB256..].to_vec(),
        )
        .await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["md5Checksum"], md5_hex(&data));
    assert_eq!(api.emu.stats().uploads_resumed, 1);
}

#[tokio::test]
async fn multipart_with_bare_newlines_and_jitter() {
    let api = Api::new().await;
    let body = b"--xyz\nContent-Type: application/json\n\n{\"name\":\"lf\"}\n--xyz\nContent-Type: text/plain\n\nhello\n--xyz--\n".to_vec();
    let r = api
        .send(
            Method::POST,
            "/upload/drive/v3/files?uploadType=multipart&fields=name,size,mimeType",
            &[("Content-Type", "multipart/related; boundary=\"xyz\"")],
            body,
        )
        .await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"name": "lf", "size": "5", "mimeType": "text/plain"}));
    let r = api
        .send(
            Method::POST,
            "/upload/drive/v3/files?uploadType=multipart",
            &[("Content-Type", "multipart/related; boundary=xyz")],
            b"garbage".to_vec(),
        )
        .await;
    assert_eq!(r.code(), 400);
    assert_eq!(api.send(Method::POST, "/upload/drive/v3/files?uploadType=bogus", &[], vec![]).await.code(), 400);
    // "If you are uploading data with an /upload URI, this field is required."
    let r = api.send(Method::POST, "/upload/drive/v3/files", &[], b"data".to_vec()).await;
    assert_eq!((r.code(), r.reason()), (400, "required".to_string()));

    api.emu.faults().set_jitter(Duration::from_millis(100));
    let t = Instant::now();
    for _ in 0..5 {
        api.get("/drive/v3/files?fields=files(id)").await;
    }
    assert!(t.elapsed() >= Duration::from_millis(30), "jitter adds delay: {:?}", t.elapsed());
    api.emu.faults().set_jitter(Duration::ZERO);
    let st = api.emu.stats();
    assert_eq!(st.requests.get("files.list").copied(), Some(5));
    assert_eq!(st.requests.get("upload multipart").copied(), Some(2));
    assert!(st.errors.get(&400).copied().unwrap_or(0) >= 2);
}

#[tokio::test]
async fn user_corpus_with_all_drives_includes_shared_items() {
    let api = Api::new().await;
    let drive = api.emu.create_shared_drive("team");
    api.upload(json!({"name": "shared-pack", "parents": [drive]}), b"x").await;
    api.upload(json!({"name": "mine"}), b"y").await;
    let n = |v: Value| v["files"].as_array().map(Vec::len);
    assert_eq!(n(api.list("fields=files(id)").await.json()), Some(1));
    assert_eq!(
        n(api.list("includeItemsFromAllDrives=true&supportsAllDrives=true&fields=files(id)").await.json()),
        Some(2)
    );
    let q = enc(&format!("'{drive}' in parents"));
    let v = api.list(&format!("q={q}&corpora=drive&driveId={drive}&includeItemsFromAllDrives=true&supportsAllDrives=true&fields=files(name,driveId)")).await.json();
    assert_eq!(v["files"], json!([{"name": "shared-pack", "driveId": drive}]));
    assert_eq!(
        api.list("corpora=drive&driveId=0Anope&includeItemsFromAllDrives=true&supportsAllDrives=true").await.code(),
        404
    );
}

#[tokio::test]
async fn read_only_items_refuse_writes() {
    let api = Api::new().await;
    let dir = api.folder("shared-with-me", "root").await;
    let f = api.upload(json!({"name": "f", "parents": [dir]}), b"abc").await;
    let id = f["id"].as_str().expect("id").to_string();
    api.emu.ui_make_read_only(&id);
    api.emu.ui_make_read_only(&dir);
    let check = |r: Resp| {
        assert_eq!(
            (r.code(), r.reason()),
            (403, "insufficientFilePermissions".to_string()),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    };
    check(api.json(Method::PATCH, &format!("/drive/v3/files/{id}"), json!({"name": "g"})).await);
    check(
        api.send(Method::PATCH, &format!("/upload/drive/v3/files/{id}?uploadType=media"), &[], b"new".to_vec()).await,
    );
    check(api.send(Method::DELETE, &format!("/drive/v3/files/{id}"), &[], vec![]).await);
    check(api.json(Method::POST, "/drive/v3/files", json!({"name": "child", "parents": [dir]})).await);
    // Reading still works.
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?alt=media")).await.body, b"abc");
    assert_eq!(
        api.get(&format!("/drive/v3/files/{id}?fields=capabilities/canEdit")).await.json(),
        json!({"capabilities": {"canEdit": false}})
    );
}

/// The owner turns downloading off for viewers: a reader sees
/// `canDownload` false, and its downloads and copies are refused; the owner
/// (an item not read-only) still downloads it.
#[tokio::test]
async fn a_download_restricted_for_readers_is_refused_to_a_reader() {
    let api = Api::new().await;
    let f = api.upload(json!({"name": "golden.img"}), b"abc").await;
    let id = f["id"].as_str().expect("id").to_string();
    api.emu.ui_restrict_download(&id);
    let caps = format!("/drive/v3/files/{id}?fields=capabilities/canDownload,downloadRestrictions");
    assert_eq!(api.get(&caps).await.json()["capabilities"], json!({"canDownload": true}));
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?alt=media")).await.body, b"abc");
    api.emu.ui_make_read_only(&id);
    let v = api.get(&caps).await.json();
    assert_eq!(v["capabilities"], json!({"canDownload": false}));
    assert_eq!(v["downloadRestrictions"]["itemDownloadRestriction"]["restrictedForReaders"], json!(true));
    let r = api.get(&format!("/drive/v3/files/{id}?alt=media")).await;
    assert_eq!((r.code(), r.reason()), (403, "cannotDownloadFile".to_string()));
    let rev = api.emu.ui_head_revision(&id).expect("a head revision");
    let r = api.get(&format!("/drive/v3/files/{id}/revisions/{rev}?alt=media")).await;
    assert_eq!((r.code(), r.reason()), (403, "cannotDownloadFile".to_string()));
    let r = api.json(Method::POST, &format!("/drive/v3/files/{id}/copy"), json!({})).await;
    assert_eq!((r.code(), r.reason()), (403, "cannotCopyFile".to_string()));
}

#[tokio::test]
async fn hostile_inputs_get_google_errors_not_crashes() {
    let api = Api::new().await;
    let f = api.upload(json!({"name": "x"}), b"abc").await;
    let id = f["id"].as_str().expect("id").to_string();
    let media = format!("/drive/v3/files/{id}?alt=media");
    assert_eq!(api.send(Method::GET, &media, &[("Range", "bytes=18446744073709551615-")], vec![]).await.code(), 416);
    assert_eq!(api.send(Method::GET, &media, &[("Range", "bytes=-18446744073709551615")], vec![]).await.code(), 206);
    assert_eq!(api.send(Method::GET, &media, &[("Range", "bytes=a-b")], vec![]).await.code(), 200);
    let r = api
        .send(
            Method::POST,
            "/upload/drive/v3/files?uploadType=resumable",
            &[("Content-Type", "application/json")],
            b"{}".to_vec(),
        )
        .await;
    let loc = r.header("location").expect("Location");
    for cr in ["bytes 0-18446744073709551615/*", "bytes 5-1/10", "bytes x-y/z", "chunks 0-1/2", "bytes */-1"] {
        let r = api.send(Method::PUT, &loc, &[("Content-Range", cr)], vec![0u8; 2]).await;
        assert_eq!(r.code(), 400, "{cr}");
    }
    for q in
        ["name = '\u{1F600}", "\u{1F600} = 'x'", "((((", "'x' in", "appProperties has { key='k' }", "name contains"]
    {
        assert_eq!(api.list(&format!("q={}", enc(q))).await.code(), 400, "{q}");
    }
    assert_eq!(api.list(&format!("q={}", enc("name = '\u{1F600}'"))).await.code(), 200);
    for fields in ["files(", "files)", ",", "a//b", "files(id))"] {
        assert_eq!(api.list(&format!("fields={}", enc(fields))).await.code(), 400, "{fields}");
    }
    for body in [
        &b"[]"[..],
        b"null",
        b"\"s\"",
        b"{\"name\": 5}",
        b"{\"appProperties\": []}",
        b"{\"parents\": \"root\"}",
        b"{\"modifiedTime\": \"yesterday\"}",
    ] {
        let r = api.send(Method::POST, "/drive/v3/files", &[("Content-Type", "application/json")], body.to_vec()).await;
        assert_eq!(r.code(), 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(r.json()["error"]["code"], 400);
    }
    let long = "k".repeat(200);
    let r = api.json(Method::PATCH, &format!("/drive/v3/files/{id}"), json!({"appProperties": {long: "v"}})).await;
    assert_eq!(r.code(), 400);
    let r = api
        .http
        .post(api.emu.token_uri())
        .header("Content-Type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    api.emu.faults().set_rate_limit(Some(driveemu::RateLimit { per_second: -1.0, burst: 0 }));
    assert_eq!(api.get("/drive/v3/files").await.code(), 200, "burst is at least one");
    let r = api.get("/drive/v3/files").await;
    assert!(r.code() == 403 || r.code() == 429);
    api.emu.faults().set_rate_limit(None);
    assert_eq!(api.get("/nowhere").await.code(), 404);
    assert_eq!(api.get(&format!("/drive/v3/files/{id}")).await.code(), 200, "still serving");
}
