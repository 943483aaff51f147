//! Media downloads (Range, 206/416) and uploads (media, multipart, resumable with resume).

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::*;

async fn start_resumable(api: &Api, path: &str, method: Method, meta: &Value, total: Option<usize>) -> Resp {
    let mut h: Vec<(&str, String)> = vec![
        ("Content-Type", "application/json; charset=UTF-8".into()),
        ("X-Upload-Content-Type", "application/octet-stream".into()),
    ];
    if let Some(t) = total {
        h.push(("X-Upload-Content-Length", t.to_string()));
    }
    let hr: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    api.send(method, path, &hr, serde_json::to_vec(meta).expect("json")).await
}

async fn put(api: &Api, loc: &str, range: &str, body: &[u8]) -> Resp {
    api.send(Method::PUT, loc, &[("Content-Range", range)], body.to_vec()).await
}

#[tokio::test]
async fn ranged_downloads() {
    let api = Api::new().await;
    let data = pattern(1_000_000, 9);
    let f = api.upload(json!({"name": "img"}), &data).await;
    let id = f["id"].as_str().expect("id");
    let url = format!("/drive/v3/files/{id}?alt=media");
    let r = api.get(&url).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("content-length").as_deref(), Some("1000000"));
    let r = api.send(Method::GET, &url, &[("Range", "bytes=1000-1999")], vec![]).await;
    assert_eq!(r.code(), 206);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 1000-1999/1000000"));
    assert_eq!(r.body, &data[1000..2000]);
    let r = api.send(Method::GET, &url, &[("Range", "bytes=999990-")], vec![]).await;
    assert_eq!((r.code(), r.body.len()), (206, 10));
    let r = api.send(Method::GET, &url, &[("Range", "bytes=999000-2000000")], vec![]).await;
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 999000-999999/1000000"));
    let r = api.send(Method::GET, &url, &[("Range", "bytes=1000000-1000001")], vec![]).await;
    assert_eq!(r.code(), 416);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */1000000"));
    // A zero-length file: any range is unsatisfiable, no range is a 200 with no bytes.
    let e = api.create(json!({"name": "empty"})).await;
    let eu = format!("/drive/v3/files/{}?alt=media", e["id"].as_str().expect("id"));
    assert_eq!(api.send(Method::GET, &eu, &[("Range", "bytes=0-0")], vec![]).await.code(), 416);
    let r = api.get(&eu).await;
    assert_eq!((r.code(), r.body.len()), (200, 0));
    // Folders are not downloadable; unknown ids are 404.
    let dir = api.folder("d", "root").await;
    let r = api.get(&format!("/drive/v3/files/{dir}?alt=media")).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "fileNotDownloadable"));
    assert_eq!(api.get("/drive/v3/files/1nosuchfile?alt=media").await.code(), 404);
    // Abuse-flagged files need acknowledgeAbuse=true.
    api.emu.ui_flag_abuse(id);
    let r = api.get(&url).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "cannotDownloadAbusiveFile"));
    assert_eq!(api.get(&format!("{url}&acknowledgeAbuse=true")).await.code(), 200);
}

#[tokio::test]
async fn resumable_upload_chunks_status_and_visibility() {
    let api = Api::new().await;
    let total = 3 * KIB256 + 1000;
    let data = pattern(total, 5);
    let id = api.generate_ids(1).await.remove(0);
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=id,size,md5Checksum,name",
        Method::POST,
        &json!({"id": id, "name": "pack-1"}),
        Some(total),
    )
    .await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let loc = r.header("location").expect("Location header");
    assert!(loc.starts_with(&api.emu.base_url()) && loc.contains("upload_id="), "{loc}");
    // Nothing received yet: 308 without a Range header.
    let r = put(&api, &loc, &format!("bytes */{total}"), &[]).await;
    assert_eq!(r.code(), 308);
    assert_eq!(r.header("range"), None);
    // A first chunk of 256 KiB.
    let r = put(&api, &loc, &format!("bytes 0-{}/{total}", KIB256 - 1), &data[..KIB256]).await;
    assert_eq!(r.code(), 308);
    assert_eq!(r.header("range").as_deref(), Some("bytes=0-262143"));
    // A non-final chunk that is not a multiple of 256 KiB is refused, and changes nothing.
    let r = put(&api, &loc, &format!("bytes {}-{}/{total}", KIB256, KIB256 + 99_999), &data[KIB256..KIB256 + 100_000])
        .await;
    assert_eq!((r.code(), r.reason().as_str()), (400, "badRequest"));
    // A chunk that leaves a gap is refused too.
    let r = put(&api, &loc, &format!("bytes {}-{}/{total}", 2 * KIB256, 3 * KIB256 - 1), &data[2 * KIB256..3 * KIB256])
        .await;
    assert_eq!(r.code(), 400);
    let r = put(&api, &loc, &format!("bytes */{total}"), &[]).await;
    assert_eq!(r.header("range").as_deref(), Some("bytes=0-262143"));
    // Not visible before the last byte.
    assert_eq!(api.get(&format!("/drive/v3/files/{id}")).await.code(), 404);
    let r = put(&api, &loc, &format!("bytes {}-{}/*", KIB256, 3 * KIB256 - 1), &data[KIB256..3 * KIB256]).await;
    assert_eq!(r.code(), 308);
    assert_eq!(r.header("range"), Some(format!("bytes=0-{}", 3 * KIB256 - 1)));
    let r = put(&api, &loc, &format!("bytes {}-{}/{total}", 3 * KIB256, total - 1), &data[3 * KIB256..]).await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"id": id, "size": total.to_string(), "md5Checksum": md5_hex(&data), "name": "pack-1"}));
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?alt=media")).await.body, data);
    // A status query after completion answers the resource again (a lost reply is recoverable).
    let r = put(&api, &loc, &format!("bytes */{total}"), &[]).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["id"], id.as_str());
    // Unknown and expired sessions are 404.
    let bogus = format!("{}/upload/drive/v3/files?uploadType=resumable&upload_id=nope", api.emu.base_url());
    assert_eq!(put(&api, &bogus, "bytes */10", &[]).await.code(), 404);
    api.emu.faults().expire_upload_sessions();
    assert_eq!(put(&api, &loc, &format!("bytes */{total}"), &[]).await.code(), 404);
    assert_eq!(api.emu.stats().uploads_completed, 1);
}

#[tokio::test]
async fn resumable_create_with_used_id_and_resumable_update() {
    let api = Api::new().await;
    let f = api.upload(json!({"name": "manifest"}), b"v1").await;
    let id = f["id"].as_str().expect("id");
    let v0: u64 = f["version"].as_str().expect("v").parse().expect("n");
    let r =
        start_resumable(&api, "/upload/drive/v3/files?uploadType=resumable", Method::POST, &json!({"id": id}), Some(2))
            .await;
    assert_eq!(r.code(), 409);
    // files.update with uploadType=resumable (PATCH), whole body in one PUT without Content-Range.
    let r = start_resumable(
        &api,
        &format!("/upload/drive/v3/files/{id}?uploadType=resumable&fields=version,md5Checksum,name"),
        Method::PATCH,
        &json!({"name": "manifest.v2"}),
        None,
    )
    .await;
    assert_eq!(r.code(), 200);
    let loc = r.header("location").expect("Location");
    let r = api.send(Method::PUT, &loc, &[], b"version two".to_vec()).await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["md5Checksum"], md5_hex(b"version two"));
    assert_eq!(v["name"], "manifest.v2");
    assert!(v["version"].as_str().expect("v").parse::<u64>().expect("n") > v0);
    // Multipart update.
    let r = api
        .multipart(
            &format!("/upload/drive/v3/files/{id}?uploadType=multipart&fields=md5Checksum"),
            Method::PATCH,
            &json!({}),
            b"three",
        )
        .await;
    assert_eq!(r.json()["md5Checksum"], md5_hex(b"three"));
}

#[tokio::test]
async fn reset_mid_chunk_keeps_whole_units_then_resumes() {
    let api = Api::new().await;
    let total = 4 * MIB + 12_345;
    let data = pattern(total, 11);
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=id,md5Checksum",
        Method::POST,
        &json!({"name": "big"}),
        Some(total),
    )
    .await;
    let loc = r.header("location").expect("Location");
    api.emu.faults().set_reset_rate(1.0);
    let cut = api
        .try_send(
            Method::PUT,
            &loc,
            &[("Content-Range", &format!("bytes 0-{}/{total}", 4 * MIB - 1))],
            data[..4 * MIB].to_vec(),
        )
        .await;
    assert!(cut.is_err() || cut.as_ref().is_ok_and(|r| r.code() >= 500), "the chunk should have been cut off");
    api.emu.faults().set_reset_rate(0.0);
    assert!(api.emu.stats().resets >= 1);
    // The client asks where to resume; the server kept whole 256 KiB units only.
    let r = put(&api, &loc, &format!("bytes */{total}"), &[]).await;
    assert_eq!(r.code(), 308);
    let have = match r.header("range") {
        None => 0,
        Some(h) => h.strip_prefix("bytes=0-").expect("range form").parse::<usize>().expect("n") + 1,
    };
    assert!(have < 4 * MIB && have % KIB256 == 0, "kept {have}");
    let r = put(&api, &loc, &format!("bytes {have}-{}/{total}", total - 1), &data[have..]).await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["md5Checksum"], md5_hex(&data));
    assert_eq!(api.emu.stats().uploads_resumed, 1);
    // Simple uploads cut off keep nothing.
    api.emu.faults().set_reset_rate(1.0);
    let before = api.list("fields=files(id)").await.json()["files"].as_array().map(Vec::len);
    let cut = api.try_send(Method::POST, "/upload/drive/v3/files?uploadType=media", &[], data[..MIB].to_vec()).await;
    assert!(cut.is_err());
    api.emu.faults().set_reset_rate(0.0);
    assert_eq!(api.list("fields=files(id)").await.json()["files"].as_array().map(Vec::len), before);
}

#[tokio::test]
async fn downloads_cut_off_mid_body() {
    let api = Api::new().await;
    let data = pattern(2 * MIB, 2);
    let f = api.upload(json!({"name": "img"}), &data).await;
    let url = format!("/drive/v3/files/{}?alt=media", f["id"].as_str().expect("id"));
    api.emu.faults().set_reset_rate(1.0);
    let r = api.try_send(Method::GET, &url, &[], vec![]).await;
    match r {
        Err(_) => {}
        Ok(r) => assert!(r.body.len() < data.len(), "a cut-off body must be short"),
    }
    api.emu.faults().set_reset_rate(0.0);
    assert_eq!(api.get(&url).await.body, data);
}

#[tokio::test]
async fn quotas_storage_upload_cap_download() {
    let api = Api::new().await;
    api.upload(json!({"name": "a"}), &[1u8; 4000]).await;
    api.emu.faults().set_storage_quota(Some(5000));
    let r = api
        .multipart("/upload/drive/v3/files?uploadType=multipart", Method::POST, &json!({"name": "b"}), &[2u8; 2000])
        .await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "storageQuotaExceeded"));
    assert_eq!(r.json()["error"]["errors"][0]["domain"], "usageLimits");
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable",
        Method::POST,
        &json!({"name": "c"}),
        Some(2000),
    )
    .await;
    assert_eq!(r.code(), 403);
    // Folders and small files still fit.
    api.folder("f", "root").await;
    api.upload(json!({"name": "small"}), &[3u8; 500]).await;
    api.emu.faults().set_storage_quota(None);

    api.emu.faults().set_daily_upload_cap(Some(10_000));
    api.upload(json!({"name": "d"}), &[4u8; 6000]).await;
    let r = api
        .multipart("/upload/drive/v3/files?uploadType=multipart", Method::POST, &json!({"name": "e"}), &[5u8; 6000])
        .await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "userRateLimitExceeded"));
    assert_eq!(r.json()["error"]["message"], "User rate limit exceeded.");
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable",
        Method::POST,
        &json!({"name": "g"}),
        Some(6000),
    )
    .await;
    assert_eq!(r.code(), 403);
    // Metadata-only calls are not uploads.
    api.create(json!({"name": "meta-only"})).await;
    api.emu.faults().set_daily_upload_cap(None);
    api.upload(json!({"name": "h"}), &[6u8; 6000]).await;

    let f = api.upload(json!({"name": "i"}), b"bytes").await;
    let url = format!("/drive/v3/files/{}?alt=media", f["id"].as_str().expect("id"));
    api.emu.faults().set_download_quota_exceeded(true);
    let r = api.get(&url).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "downloadQuotaExceeded"));
    assert_eq!(
        api.get(&format!("/drive/v3/files/{}", f["id"].as_str().expect("id"))).await.code(),
        200,
        "metadata still readable"
    );
    api.emu.faults().set_download_quota_exceeded(false);
    assert_eq!(api.get(&url).await.body, b"bytes");
}

#[tokio::test]
async fn resent_overlap_is_accepted_and_size_mismatch_refused() {
    let api = Api::new().await;
    let total = 2 * KIB256 + 5;
    let data = pattern(total, 12);
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=md5Checksum,size",
        Method::POST,
        &json!({"name": "o"}),
        Some(total),
    )
    .await;
    let loc = r.header("location").expect("Location");
    assert_eq!(put(&api, &loc, &format!("bytes 0-{}/{total}", KIB256 - 1), &data[..KIB256]).await.code(), 308);
    // The reply was lost and the client resends the same chunk: harmless.
    let r = put(&api, &loc, &format!("bytes 0-{}/{total}", KIB256 - 1), &data[..KIB256]).await;
    assert_eq!(r.header("range").as_deref(), Some("bytes=0-262143"));
    // A total that disagrees with X-Upload-Content-Length is refused.
    let r = put(&api, &loc, &format!("bytes {}-{}/{}", KIB256, total - 1, total + 1), &data[KIB256..]).await;
    assert_eq!(r.code(), 400);
    // The final chunk may overlap what the server has.
    let r = put(&api, &loc, &format!("bytes {}-{}/{total}", KIB256 - 100, total - 1), &data[KIB256 - 100..]).await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json(), json!({"md5Checksum": md5_hex(&data), "size": total.to_string()}));
    // Total unknown until the last chunk: `*` then `/N`.
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=size",
        Method::POST,
        &json!({"name": "u"}),
        None,
    )
    .await;
    let loc = r.header("location").expect("Location");
    assert_eq!(put(&api, &loc, &format!("bytes 0-{}/*", KIB256 - 1), &data[..KIB256]).await.code(), 308);
    let r = put(&api, &loc, "bytes */*", &[]).await;
    assert_eq!((r.code(), r.header("range").as_deref()), (308, Some("bytes=0-262143")));
    let r =
        put(&api, &loc, &format!("bytes {KIB256}-{}/{}", KIB256 + 9, KIB256 + 10), &data[KIB256..KIB256 + 10]).await;
    assert_eq!(r.json()["size"], (KIB256 + 10).to_string());
}

/// manage-uploads, "Resume an interrupted upload": "set the Content-Range to */2000000 if
/// your total file length is 2,000,000 bytes. If you don't know the full size of the file,
/// set the Content-Range to */*." A status query in that literal form (no `bytes` unit) is
/// answered like `bytes */N`.
#[tokio::test]
async fn status_query_in_the_guides_literal_form() {
    let api = Api::new().await;
    let total = KIB256 + 10;
    let data = pattern(total, 3);
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=size",
        Method::POST,
        &json!({"name": "q"}),
        Some(total),
    )
    .await;
    let loc = r.header("location").expect("Location");
    let r = put(&api, &loc, &format!("*/{total}"), &[]).await;
    assert_eq!((r.code(), r.header("range")), (308, None));
    assert_eq!(put(&api, &loc, &format!("bytes 0-{}/{total}", KIB256 - 1), &data[..KIB256]).await.code(), 308);
    let r = put(&api, &loc, "*/*", &[]).await;
    assert_eq!((r.code(), r.header("range").as_deref()), (308, Some("bytes=0-262143")));
    let r = put(&api, &loc, &format!("bytes {KIB256}-{}/{total}", total - 1), &data[KIB256..]).await;
    assert_eq!((r.code(), r.json()["size"].as_str()), (200, Some(total.to_string().as_str())));
}

/// Google's Go client sends `X-GUploader-No-308: yes` with every chunk (its
/// HTTP stack takes a 308 for a redirect) and reads "resume incomplete" from
/// a 200 carrying `X-HTTP-Status-Code-Override: 308` and the `Range` held.
#[tokio::test]
async fn resume_incomplete_without_a_308_when_asked() {
    let api = Api::new().await;
    let total = KIB256 + 10;
    let data = pattern(total, 4);
    let r = start_resumable(
        &api,
        "/upload/drive/v3/files?uploadType=resumable&fields=size",
        Method::POST,
        &json!({"name": "go"}),
        Some(total),
    )
    .await;
    let loc = r.header("location").expect("Location");
    let chunk = |range: String, body: &[u8]| {
        let (loc, body) = (loc.clone(), body.to_vec());
        let api = &api;
        async move {
            let h = [("X-GUploader-No-308", "yes"), ("Content-Range", range.as_str())];
            api.send(Method::PUT, &loc, &h, body).await
        }
    };
    let r = chunk(format!("bytes 0-{}/{total}", KIB256 - 1), &data[..KIB256]).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.header("x-http-status-code-override").as_deref(), Some("308"));
    assert_eq!(r.header("range").as_deref(), Some("bytes=0-262143"));
    let r = chunk(format!("bytes */{total}"), &[]).await;
    assert_eq!((r.code(), r.header("x-http-status-code-override").as_deref()), (200, Some("308")));
    // Without the header, the same state is a plain 308.
    assert_eq!(put(&api, &loc, &format!("bytes */{total}"), &[]).await.code(), 308);
    // The last chunk ends the upload: a 200 with no override, the file.
    let r = chunk(format!("bytes {KIB256}-{}/{total}", total - 1), &data[KIB256..]).await;
    assert_eq!((r.code(), r.header("x-http-status-code-override")), (200, None));
    assert_eq!(r.json()["size"], total.to_string());
}

/// Mappings of the emulator's unlinked blob files under `dir` in this process.
fn mapped_blobs(dir: &std::path::Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let d = dir.to_str().expect("utf-8 path");
    maps.lines().filter(|l| l.contains(d) && l.ends_with("(deleted)")).count()
}

#[tokio::test]
async fn with_a_data_dir_file_bytes_live_on_disk_and_go_with_the_file() {
    let dir = std::env::temp_dir().join(format!("driveemu-data-{}", std::process::id()));
    let api = Api::with(driveemu::Config { data_dir: Some(dir.clone()), ..Default::default() }).await;
    let data = pattern(1_000_000, 3);
    let f = api.upload(json!({"name": "img"}), &data).await;
    let id = f["id"].as_str().expect("id").to_string();
    assert_eq!(f["md5Checksum"], md5_hex(&data).as_str());
    // Kept in a file, not in memory, and with no name left in the directory.
    assert_eq!(mapped_blobs(&dir), 1);
    assert_eq!(std::fs::read_dir(&dir).expect("data dir").count(), 0);
    let url = format!("/drive/v3/files/{id}?alt=media");
    let r = api.send(Method::GET, &url, &[("Range", "bytes=500000-500999")], vec![]).await;
    assert_eq!((r.code(), &r.body[..]), (206, &data[500_000..501_000]));
    // A new revision by resumable update is a second blob; a copy shares its source's.
    let v2 = pattern(3 * KIB256, 4);
    let r = start_resumable(
        &api,
        &format!("/upload/drive/v3/files/{id}?uploadType=resumable"),
        Method::PATCH,
        &json!({}),
        None,
    )
    .await;
    let loc = r.header("location").expect("Location header");
    let r = put(&api, &loc, &format!("bytes 0-{}/{}", v2.len() - 1, v2.len()), &v2).await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(api.get(&url).await.body, v2);
    let c = api.json(Method::POST, &format!("/drive/v3/files/{id}/copy"), json!({"name": "copy"})).await;
    assert_eq!(c.code(), 200);
    assert_eq!(mapped_blobs(&dir), 2);
    // Small bodies (a manifest) stay in memory.
    api.upload(json!({"name": "small"}), b"{}").await;
    assert_eq!(mapped_blobs(&dir), 2);
    // Deleting the file drops both its revisions' bytes; the copy keeps the one it shares.
    assert_eq!(api.send(Method::DELETE, &format!("/drive/v3/files/{id}"), &[], vec![]).await.code(), 204);
    assert_eq!(mapped_blobs(&dir), 1);
    let cid = c.json()["id"].as_str().expect("id").to_string();
    assert_eq!(api.get(&format!("/drive/v3/files/{cid}?alt=media")).await.body, v2);
    let _ = std::fs::remove_dir_all(&dir);
}
