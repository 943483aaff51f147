//! What a user meets on a real S3 store (a one-node Garage started by
//! `scripts/garage.sh`, no mock) when something is set up wrong, through
//! the unchanged CLI and the `s3://` backend: a bucket that does not exist
//! is named as such (not "no volume here: import one"), a plain-HTTP
//! endpoint without `AWS_ALLOW_HTTP`, a signing region that is not the
//! store's, an endpoint nobody answers at, and a bucket quota each get a
//! message that says what is wrong, once; and an upload too large for
//! 10,000 parts of the configured size grows its parts instead of failing
//! at part 10,001; listings run past one page. Also, without a store: a `gs://` service-account key
//! file open to other users is named with the fix, as a Drive one is. Each
//! test sets the store's variables of its own process (nextest runs each
//! test in its own, as `garage_support` assumes).

#[path = "garage_support/mod.rs"]
mod garage_support;

use std::process::{Command, Output};

use driveblk::remote::config::ObjStoreConfig;
use driveblk::remote::objstore::{ObjStoreRemote, StoreKind};
use driveblk::remote::{PutBody, Remote, RemoteError};

/// `driveblk ARGS` with this process's store variables, changed by `env`
/// (a value of None removes the variable).
fn driveblk(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_driveblk"));
    c.args(args);
    for (k, v) in env {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.output().expect("run driveblk")
}

/// The error a failed command printed; asserts it failed, promptly.
fn refused(args: &[&str], env: &[(&str, Option<&str>)]) -> String {
    let t0 = std::time::Instant::now();
    let o = driveblk(args, env);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "driveblk {args:?} succeeded: {e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "driveblk {args:?} took {:?}: {e}", t0.elapsed());
    e
}

/// Runs `garage ARGS` against the test's store.
fn garage_cli(g: &garage_support::Garage, args: &[&str]) {
    let bin = std::env::var("GARAGE").unwrap_or_else(|_| "garage".into());
    let o = Command::new(bin).arg("-c").arg(g.dir.join("garage.toml")).args(args).output().expect("run garage");
    assert!(o.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A bucket name typed wrong: S3 answers 404 to a HEAD of a key in it, as
/// for a key that is absent, so `info` and `serve` said "no volume at ...:
/// create one with `driveblk import`", and the import then failed on a
/// listing. Both now say the bucket does not exist, and say it once.
#[test]
fn s3_a_missing_bucket_is_named_not_taken_for_a_missing_volume() {
    let _g = garage_support::garage();
    let url = format!("s3://nosuch-{:08x}/vols/win10", rand::random::<u32>());
    for args in [vec!["info", url.as_str()], vec!["status", url.as_str()]] {
        let e = refused(&args, &[]);
        assert!(e.contains("the store has no bucket \"nosuch-") && !e.contains("no volume at"), "{args:?}: {e}");
        assert_eq!(e.matches("has no bucket").count(), 1, "said more than once: {e}");
    }
    let img = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(img.path(), vec![7u8; 1 << 20]).unwrap();
    let e = refused(&["import", img.path().to_str().unwrap(), &url], &[]);
    assert!(e.contains("the store has no bucket \"nosuch-"), "{e}");
    assert_eq!(e.matches("has no bucket").count(), 1, "said more than once: {e}");
}

/// `AWS_ENDPOINT=http://...` without `AWS_ALLOW_HTTP=true`: the client
/// refused every request with "builder error", retried as an outage.
#[test]
fn s3_plain_http_without_allow_http_names_the_variable() {
    let g = garage_support::garage();
    let url = g.url("vol");
    let e = refused(&["info", &url], &[("AWS_ALLOW_HTTP", None)]);
    assert!(e.contains("AWS_ALLOW_HTTP=true") && !e.contains("gave up after"), "{e}");
}

/// A HEAD signed for another region is answered 400 with no body; the
/// error says what that usually means.
#[test]
fn s3_a_wrong_region_is_hinted() {
    let g = garage_support::garage();
    let url = g.url("vol");
    let e = refused(&["info", &url], &[("AWS_REGION", Some("eu-west-3")), ("AWS_DEFAULT_REGION", Some("eu-west-3"))]);
    assert!(e.contains("400") && e.contains("AWS_REGION"), "{e}");
}

/// Nobody answers at the endpoint: the error says so ("Connection
/// refused"), not only "error sending request".
#[test]
fn s3_an_endpoint_nobody_answers_at_says_why() {
    let g = garage_support::garage();
    let url = g.url("vol");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = refused(&["info", &url], &[("AWS_ENDPOINT", Some(&format!("http://127.0.0.1:{port}")))]);
    assert!(e.contains("Connection refused"), "{e}");
}

/// A bucket over its quota: Garage (and Ceph) answer 403 naming the
/// quota. That is a full store (write-back waits, `status` says the
/// remote is full), not a refused credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_bucket_over_its_quota_is_a_full_store_not_a_refused_credential() {
    let g = garage_support::garage();
    let bucket = format!("small-{:08x}", rand::random::<u32>());
    let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    garage_cli(g, &["bucket", "create", &bucket]);
    garage_cli(g, &["bucket", "allow", "--read", "--write", &bucket, "--key", &key]);
    garage_cli(g, &["bucket", "set-quotas", "--max-size", "1MB", &bucket]);
    let r = ObjStoreRemote::new(StoreKind::S3, &bucket, "vol", &g.config(true).objstore);
    let e = r.put("pack-1", PutBody::from_bytes(vec![1u8; 2 << 20])).await.unwrap_err();
    assert!(matches!(e, RemoteError::Quota { .. }), "{e:?}");
    assert!(e.to_string().contains("quota exceeded") && e.is_pause(), "{e}");
}

/// A body larger than `max_parts` parts of `part_size`: the parts grow
/// (whole MiB) so the upload fits, instead of S3 refusing part 10,001
/// after 80 GB were sent. Garage names the part count in the ETag of a
/// completed multipart upload (`"<md5>-<parts>"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_large_upload_grows_its_parts_to_stay_within_the_part_limit() {
    let g = garage_support::garage();
    let cfg = ObjStoreConfig { max_parts: 3, ..g.config(true).objstore };
    let r = ObjStoreRemote::new(StoreKind::S3, &g.bucket, &format!("t{:08x}/vol", rand::random::<u32>()), &cfg);
    let body: Vec<u8> = (0..(20u32 << 20) + 5).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let m = r.put("pack-big", PutBody::from_bytes(body.clone())).await.unwrap();
    assert_eq!(m.size, body.len() as u64);
    let etag = m.version.clone().unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "not 3 parts: {etag}");
    assert!(r.get("pack-big").await.unwrap() == body, "the object reads back different");
}

/// A GCS service-account key file others can read gives them the account:
/// named with the fix, as a Drive credentials file is (no store needed:
/// the warning comes as the client is made); a 0600 one is not.
#[test]
fn gs_a_key_file_open_to_others_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("sa.json");
    std::fs::write(&key, br#"{"type":"service_account","client_email":"x@y","private_key":"none"}"#).unwrap();
    let run = |mode| {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let o = driveblk(&["info", "gs://b/vol"], &[("GOOGLE_SERVICE_ACCOUNT", Some(key.to_str().unwrap()))]);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(0o644);
    assert!(e.contains(&format!("chmod 600 {}", key.display())) && e.contains("GOOGLE_SERVICE_ACCOUNT"), "{e}");
    let e = run(0o600);
    assert!(!e.contains("chmod 600"), "{e}");
}

/// A listing longer than one page (S3 answers 1,000 keys at most a page):
/// every key, in order, and `list_after` starting past a key of a later
/// page. A volume served for months lists far more than one page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_listings_run_past_one_page() {
    use futures::StreamExt;
    let g = garage_support::garage();
    let r = ObjStoreRemote::new(
        StoreKind::S3,
        &g.bucket,
        &format!("t{:08x}/vol", rand::random::<u32>()),
        &g.config(true).objstore,
    );
    let keys: Vec<String> = (0..1_003).map(|i| format!("gen-{i:020}")).collect();
    futures::stream::iter(keys.iter())
        .map(|k| r.put(k, PutBody::from_bytes(vec![1u8; 3])))
        .buffer_unordered(32)
        .for_each(|p| async move {
            p.unwrap();
        })
        .await;
    r.put("pack-1", PutBody::from_bytes(vec![2u8; 3])).await.unwrap();
    let listed: Vec<String> = r.list("gen-").await.unwrap().into_iter().map(|m| m.key).collect();
    assert!(listed == keys, "{} keys listed of {}", listed.len(), keys.len());
    let after: Vec<String> = r.list_after("gen-", &keys[995]).await.unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(after, keys[996..]);
    assert_eq!(r.list("").await.unwrap().len(), 1_004);
}
