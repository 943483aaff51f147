//! files.create/get/update/delete/copy/generateIds, revisions and shared drives.

use reqwest::Method;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn generated_ids_create_once_then_409() {
    let api = Api::new().await;
    let r = api.get("/drive/v3/files/generateIds").await;
    assert_eq!(r.code(), 200);
    let v = r.json();
    assert_eq!(v["kind"], "drive#generatedIds");
    assert_eq!(v["space"], "drive");
    assert_eq!(v["ids"].as_array().map(Vec::len), Some(10), "count defaults to 10");
    assert_eq!(
        api.get("/drive/v3/files/generateIds?count=1000&space=drive&type=files").await.json()["ids"]
            .as_array()
            .map(Vec::len),
        Some(1000)
    );
    assert_eq!(api.get("/drive/v3/files/generateIds?count=1001").await.code(), 400);
    assert_eq!(api.get("/drive/v3/files/generateIds?count=0").await.code(), 400);
    assert_eq!(api.get("/drive/v3/files/generateIds?space=photos").await.code(), 400);

    let id = api.generate_ids(1).await.remove(0);
    let f = api.create(json!({"id": id, "name": "manifest-0002"})).await;
    assert_eq!(f["id"], id.as_str());
    // The same id again: 409, and no second file.
    let r = api.json(Method::POST, "/drive/v3/files", json!({"id": id, "name": "manifest-0002"})).await;
    assert_eq!(r.code(), 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.reason(), "fileIdInUse");
    assert_eq!(r.json()["error"]["message"], "A file already exists with the provided ID.");
    let n = api.list(&format!("q={}", enc("name = 'manifest-0002'"))).await.json()["files"].as_array().map(Vec::len);
    assert_eq!(n, Some(1));
    // An id the emulator never generated.
    let r = api
        .json(Method::POST, "/drive/v3/files", json!({"id": "1madeUpIdThatDriveNeverGeneratedXX", "name": "x"}))
        .await;
    assert_eq!(r.code(), 400);
    assert_eq!(r.reason(), "fileIdNotUsable");
    // Multipart upload with a used id: 409 too.
    let r =
        api.multipart("/upload/drive/v3/files?uploadType=multipart", Method::POST, &json!({"id": id}), b"abc").await;
    assert_eq!(r.code(), 409);
}

#[tokio::test]
async fn create_get_fields_and_defaults() {
    let api = Api::new().await;
    let root = api.emu.root_folder_id();
    let folder = api.folder("vols", "root").await;
    let r = api.get(&format!("/drive/v3/files/{folder}")).await;
    assert_eq!(r.code(), 200);
    let v = r.json();
    // Without fields=, Drive returns only kind, id, name, mimeType.
    let mut keys: Vec<_> = v.as_object().expect("obj").keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["id", "kind", "mimeType", "name"]);
    assert_eq!(v["mimeType"], "application/vnd.google-apps.folder");
    let v = api.get(&format!("/drive/v3/files/{folder}?fields=id,parents,version,createdTime")).await.json();
    assert_eq!(v["parents"], json!([root]));
    assert_eq!(v.as_object().map(|o| o.len()), Some(4));
    assert!(v["createdTime"].as_str().expect("time").ends_with('Z'));
    assert_eq!(api.get(&format!("/drive/v3/files/{folder}?fields=id,nosuchfield")).await.code(), 400);
    assert_eq!(api.get(&format!("/drive/v3/files/{folder}?fields=id,(")).await.code(), 400);
    // The root alias.
    assert_eq!(api.get("/drive/v3/files/root?fields=id").await.json()["id"], root.as_str());
    // A metadata-only file: empty, Untitled when unnamed, application/octet-stream.
    let f = api.create(json!({})).await;
    assert_eq!(f["name"], "Untitled");
    assert_eq!(f["mimeType"], "application/octet-stream");
    assert_eq!(f["size"], "0");
    assert_eq!(f["md5Checksum"], md5_hex(b""));
    // Read-only fields and unknown parents are refused.
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x", "size": "3"})).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "fieldNotWritable"));
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x", "parents": ["1nope"]})).await;
    assert_eq!((r.code(), r.reason().as_str()), (404, "notFound"));
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x", "parents": [folder, root]})).await;
    assert_eq!(r.code(), 403);
    let r =
        api.send(Method::POST, "/drive/v3/files", &[("Content-Type", "application/json")], b"{not json".to_vec()).await;
    assert_eq!(r.code(), 400);
}

#[tokio::test]
async fn upload_checksums_and_duplicate_names() {
    let api = Api::new().await;
    let dir = api.folder("packs", "root").await;
    let data = pattern(300_000, 1);
    let a = api.upload(json!({"name": "pack", "parents": [dir], "appProperties": {"gen": "7"}}), &data).await;
    let b = api.upload(json!({"name": "pack", "parents": [dir]}), b"other").await;
    assert_ne!(a["id"], b["id"]);
    assert_eq!(a["size"], "300000");
    assert_eq!(a["md5Checksum"], md5_hex(&data));
    assert_eq!(a["sha256Checksum"], sha256_hex(&data));
    assert_eq!(a["appProperties"]["gen"], "7");
    assert!(a["headRevisionId"].as_str().is_some_and(|s| !s.is_empty()));
    let q = enc(&format!("'{dir}' in parents and name = 'pack'"));
    let l = api.list(&format!("q={q}&fields=files(id,size)")).await.json();
    assert_eq!(l["files"].as_array().map(Vec::len), Some(2), "duplicate names are allowed: {l}");
    // uploadType=media: bytes only.
    let r = api
        .send(
            Method::POST,
            "/upload/drive/v3/files?uploadType=media&fields=id,name,size,mimeType",
            &[("Content-Type", "application/x-qemu-disk")],
            data.clone(),
        )
        .await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["name"], "Untitled");
    assert_eq!(r.json()["mimeType"], "application/x-qemu-disk");
    assert_eq!(r.json()["size"], "300000");
}

#[tokio::test]
async fn update_metadata_parents_trash_and_delete() {
    let api = Api::new().await;
    let a = api.folder("a", "root").await;
    let b = api.folder("b", "root").await;
    let f = api.upload(json!({"name": "f", "parents": [a], "appProperties": {"k": "v", "drop": "me"}}), b"hello").await;
    let id = f["id"].as_str().expect("id").to_string();
    let v0: u64 = f["version"].as_str().expect("v").parse().expect("n");
    let r = api
        .json(
            Method::PATCH,
            &format!("/drive/v3/files/{id}?fields=name,version,appProperties"),
            json!({"name": "g", "appProperties": {"drop": null, "new": "1"}}),
        )
        .await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["name"], "g");
    assert_eq!(v["appProperties"], json!({"k": "v", "new": "1"}));
    let v1: u64 = v["version"].as_str().expect("v").parse().expect("n");
    assert!(v1 > v0, "a metadata change bumps version");
    // Moving: parents are not writable directly; add without remove is refused.
    let r = api.json(Method::PATCH, &format!("/drive/v3/files/{id}"), json!({"parents": [b]})).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "fieldNotWritable"));
    let r = api.json(Method::PATCH, &format!("/drive/v3/files/{id}?addParents={b}"), json!({})).await;
    assert_eq!((r.code(), r.reason().as_str()), (403, "cannotAddParent"));
    let r = api
        .json(
            Method::PATCH,
            &format!("/drive/v3/files/{id}?addParents={b}&removeParents={a}&fields=parents"),
            json!({}),
        )
        .await;
    assert_eq!(r.json()["parents"], json!([b]));
    // A folder cannot move under itself.
    let r = api.json(Method::PATCH, &format!("/drive/v3/files/{a}?addParents={a}&removeParents=root"), json!({})).await;
    assert_eq!(r.code(), 400);
    // Trash via update; trashed files are still readable by id.
    let r = api
        .json(
            Method::PATCH,
            &format!("/drive/v3/files/{id}?fields=trashed,explicitlyTrashed"),
            json!({"trashed": true}),
        )
        .await;
    assert_eq!(r.json(), json!({"trashed": true, "explicitlyTrashed": true}));
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?alt=media")).await.body, b"hello");
    // Delete: 204, then 404 with Google's error shape.
    let r = api.send(Method::DELETE, &format!("/drive/v3/files/{id}"), &[], vec![]).await;
    assert_eq!(r.code(), 204);
    let r = api.get(&format!("/drive/v3/files/{id}")).await;
    assert_eq!(r.code(), 404);
    let e = r.json();
    assert_eq!(e["error"]["code"], 404);
    assert_eq!(e["error"]["errors"][0]["reason"], "notFound");
    assert_eq!(e["error"]["errors"][0]["domain"], "global");
    assert_eq!(e["error"]["message"], format!("File not found: {id}."));
    assert_eq!(api.send(Method::DELETE, &format!("/drive/v3/files/{id}"), &[], vec![]).await.code(), 404);
    // Deleting a folder deletes what is inside.
    let inner = api.upload(json!({"name": "in", "parents": [b]}), b"x").await;
    assert_eq!(api.send(Method::DELETE, &format!("/drive/v3/files/{b}"), &[], vec![]).await.code(), 204);
    assert_eq!(api.get(&format!("/drive/v3/files/{}", inner["id"].as_str().expect("id"))).await.code(), 404);
}

#[tokio::test]
async fn copy_server_side_with_generated_id() {
    let api = Api::new().await;
    let data = pattern(70_000, 3);
    let src = api.upload(json!({"name": "base.qcow2", "appProperties": {"role": "base"}}), &data).await;
    let sid = src["id"].as_str().expect("id");
    let id = api.generate_ids(1).await.remove(0);
    let r = api
        .json(Method::POST, &format!("/drive/v3/files/{sid}/copy?fields=*"), json!({"id": id, "name": "clone"}))
        .await;
    assert_eq!(r.code(), 200, "{}", String::from_utf8_lossy(&r.body));
    let c = r.json();
    assert_eq!(c["id"], id.as_str());
    assert_eq!(c["md5Checksum"], md5_hex(&data));
    assert_eq!(c["parents"], src["parents"]);
    assert_eq!(c["appProperties"]["role"], "base");
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?alt=media")).await.body, data);
    let r = api.json(Method::POST, &format!("/drive/v3/files/{sid}/copy"), json!({"id": id})).await;
    assert_eq!(r.code(), 409);
    let c2 = api.json(Method::POST, &format!("/drive/v3/files/{sid}/copy"), json!({})).await.json();
    assert_eq!(c2["name"], "Copy of base.qcow2");
    let dir = api.folder("d", "root").await;
    assert_eq!(api.json(Method::POST, &format!("/drive/v3/files/{dir}/copy"), json!({})).await.code(), 403);
}

#[tokio::test]
async fn revisions_keep_forever_on_head() {
    let api = Api::new().await;
    let f = api.upload(json!({"name": "base"}), b"one").await;
    let id = f["id"].as_str().expect("id");
    let head = f["headRevisionId"].as_str().expect("head").to_string();
    let r = api.get(&format!("/drive/v3/files/{id}/revisions/{head}?fields=id,keepForever,md5Checksum,size")).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json(), json!({"id": head, "keepForever": false, "md5Checksum": md5_hex(b"one"), "size": "3"}));
    let r = api
        .json(
            Method::PATCH,
            &format!("/drive/v3/files/{id}/revisions/{head}?fields=keepForever"),
            json!({"keepForever": true}),
        )
        .await;
    assert_eq!(r.json(), json!({"keepForever": true}));
    assert_eq!(
        api.json(Method::PATCH, &format!("/drive/v3/files/{id}/revisions/{head}"), json!({"size": "1"})).await.code(),
        403
    );
    assert_eq!(api.get(&format!("/drive/v3/files/{id}/revisions/0Bnope")).await.code(), 404);
    // New content makes a new head; the old revision keeps its bytes.
    let r = api
        .send(
            Method::PATCH,
            &format!("/upload/drive/v3/files/{id}?uploadType=media&fields=headRevisionId,version,md5Checksum"),
            &[],
            b"two!".to_vec(),
        )
        .await;
    assert_eq!(r.code(), 200);
    let v = r.json();
    assert_ne!(v["headRevisionId"], head.as_str());
    assert_eq!(v["md5Checksum"], md5_hex(b"two!"));
    let l = api.get(&format!("/drive/v3/files/{id}/revisions?fields=revisions(id,keepForever)")).await.json();
    assert_eq!(l["revisions"].as_array().map(Vec::len), Some(2));
    assert_eq!(l["revisions"][0]["keepForever"], true);
    assert_eq!(api.get(&format!("/drive/v3/files/{id}/revisions/{head}?alt=media")).await.body, b"one");
    let dir = api.folder("d", "root").await;
    assert_eq!(api.get(&format!("/drive/v3/files/{dir}/revisions")).await.reason(), "revisionsNotSupported");
}

#[tokio::test]
async fn shared_drives_need_supports_all_drives() {
    let api = Api::new().await;
    let drive = api.emu.create_shared_drive("team");
    // Without supportsAllDrives the shared drive's items do not exist.
    let r = api.json(Method::POST, "/drive/v3/files", json!({"name": "x", "parents": [drive]})).await;
    assert_eq!(r.code(), 404);
    let f = api.upload(json!({"name": "pack", "parents": [drive]}), b"data").await;
    assert_eq!(f["driveId"], drive.as_str());
    let id = f["id"].as_str().expect("id");
    assert_eq!(api.get(&format!("/drive/v3/files/{id}")).await.code(), 404);
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?supportsAllDrives=true")).await.code(), 200);
    assert_eq!(api.get(&format!("/drive/v3/files/{id}?supportsAllDrives=true&alt=media")).await.body, b"data");
    // Listing: corpora=drive needs driveId + both flags; the user corpus leaves it out.
    let r =
        api.list(&format!("corpora=drive&driveId={drive}&includeItemsFromAllDrives=true&supportsAllDrives=true")).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["files"].as_array().map(Vec::len), Some(1));
    assert_eq!(api.list(&format!("corpora=drive&driveId={drive}")).await.code(), 403);
    assert_eq!(api.list("corpora=drive&includeItemsFromAllDrives=true&supportsAllDrives=true").await.code(), 400);
    assert_eq!(api.list("").await.json()["files"].as_array().map(Vec::len), Some(0));
    let all = api.list("corpora=allDrives&includeItemsFromAllDrives=true&supportsAllDrives=true").await;
    assert_eq!(all.json()["files"].as_array().map(Vec::len), Some(1));
    // drives.create / get / list.
    let r = api.json(Method::POST, "/drive/v3/drives?requestId=r1", json!({"name": "second"})).await;
    assert_eq!(r.code(), 200);
    assert_eq!(r.json()["kind"], "drive#drive");
    assert_eq!(api.json(Method::POST, "/drive/v3/drives", json!({"name": "x"})).await.code(), 400);
    assert_eq!(api.get("/drive/v3/drives").await.json()["drives"].as_array().map(Vec::len), Some(2));
    assert_eq!(api.get(&format!("/drive/v3/drives/{drive}")).await.json()["name"], "team");
}

/// The revisions methods take no `supportsAllDrives` (revisions.get, list, update and
/// delete list none: Drive API v3 reference), so they reach a shared drive's files
/// without it, as they reach My Drive's.
#[tokio::test]
async fn revisions_of_shared_drive_files_need_no_supports_all_drives() {
    let api = Api::new().await;
    let drive = api.emu.create_shared_drive("team");
    let f = api.upload(json!({"name": "base", "parents": [drive]}), b"one").await;
    let id = f["id"].as_str().expect("id");
    let head = f["headRevisionId"].as_str().expect("head").to_string();
    let rev = format!("/drive/v3/files/{id}/revisions/{head}");
    let r = api.get(&format!("{rev}?fields=id,size")).await;
    assert_eq!((r.code(), r.json()), (200, json!({"id": head, "size": "3"})));
    assert_eq!(api.get(&format!("/drive/v3/files/{id}/revisions?fields=revisions(id)")).await.code(), 200);
    let r = api.json(Method::PATCH, &format!("{rev}?fields=keepForever"), json!({"keepForever": true})).await;
    assert_eq!((r.code(), r.json()), (200, json!({"keepForever": true})));
    let r = api.send(Method::GET, &format!("{rev}?alt=media"), &[("Range", "bytes=1-2")], vec![]).await;
    assert_eq!((r.code(), r.body.as_slice()), (206, &b"ne"[..]));
    // The file itself still needs the flag.
    assert_eq!(api.get(&format!("/drive/v3/files/{id}")).await.code(), 404);
}

#[tokio::test]
async fn about_reports_quota() {
    let api = Api::new().await;
    api.upload(json!({"name": "a"}), &[7u8; 1000]).await;
    assert_eq!(api.get("/drive/v3/about").await.code(), 400, "about.get needs fields");
    api.emu.faults().set_storage_quota(Some(5000));
    let v = api.get("/drive/v3/about?fields=storageQuota,user").await.json();
    assert_eq!(v["storageQuota"]["usage"], "1000");
    assert_eq!(v["storageQuota"]["limit"], "5000");
    assert_eq!(v["user"]["me"], true);
}
