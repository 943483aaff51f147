//! An `s3://` remote on a real S3 store (a one-node Garage started by
//! `scripts/garage.sh`) after a laptop's suspend: credentials the client
//! still believes valid are refused, and pooled connections are dead. The
//! client is made afresh and the request goes through. Each test sets the
//! store's variables of its own process (nextest runs each test in its
//! own, as `garage_support` assumes).

#[path = "garage_support/mod.rs"]
mod garage_support;
mod net_support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use driveblk::remote::{PutBody, RemoteUrl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `garage ARGS` against the test's store.
fn garage_cli(g: &garage_support::Garage, args: &[&str]) {
    let bin = std::env::var("GARAGE").unwrap_or_else(|_| "garage".into());
    let cfg = g.dir.join("garage.toml");
    let o = Command::new(bin).arg("-c").arg(&cfg).args(args).output().expect("run garage");
    assert!(o.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A container-credentials endpoint (what EKS Pod Identity serves at
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI`) handing out the key in `key`,
/// valid for an hour; returns its URL.
async fn credentials_endpoint(key: Arc<Mutex<(String, String)>>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/creds", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let key = key.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 8192];
                let _ = c.read(&mut b).await;
                let (id, secret) = key.lock().unwrap().clone();
                let t = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
                let expires = format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                    t.year(),
                    t.month() as u8,
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                );
                let body = serde_json::json!({
                    "AccessKeyId": id, "SecretAccessKey": secret, "Token": "session", "Expiration": expires,
                })
                .to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes()).await;
                let _ = c.write_all(body.as_bytes()).await;
            });
        }
    });
    url
}

/// The client took a temporary key that it dates by a clock that stops
/// while the laptop sleeps; meanwhile the key expired (here: revoked, and
/// a new one handed out). The store refuses the old key; the remote makes
/// a fresh client, which asks for credentials again, and the read goes
/// through instead of pausing write-back for the rest of the hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_credentials_refused_after_a_sleep_are_fetched_again() {
    let g = garage_support::garage();
    let old = (std::env::var("AWS_ACCESS_KEY_ID").unwrap(), std::env::var("AWS_SECRET_ACCESS_KEY").unwrap());
    let served = Arc::new(Mutex::new(old.clone()));
    let url = credentials_endpoint(served.clone()).await;
    let d = tempfile::tempdir().unwrap();
    let token = d.path().join("token");
    std::fs::write(&token, "pod-token").unwrap();
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url);
    std::env::set_var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token);

    let r = RemoteUrl::parse(&g.url("vol")).unwrap().folder_with(&g.config(false));
    let data = vec![7u8; 1000];
    r.put("pack-1", PutBody::from_bytes(data.clone())).await.unwrap();

    // The key is replaced: a new one is allowed, the old one refused.
    let new = ("GK".to_string() + &"1".repeat(24), "2".repeat(64));
    garage_cli(g, &["key", "import", "--yes", "-n", "rotated", &new.0, &new.1]);
    garage_cli(g, &["bucket", "allow", "--read", "--write", "--owner", "driveblk", "--key", &new.0]);
    garage_cli(g, &["bucket", "deny", "--read", "--write", "--owner", "driveblk", "--key", &old.0]);
    *served.lock().unwrap() = new;

    let got = r.get_range("pack-1", 0..1000).await.expect("the store refused the key the client cached");
    assert_eq!(&got[..], &data[..]);
    r.put("pack-2", PutBody::from_bytes(data.clone())).await.unwrap();
}

/// Pooled connections to the store die while the laptop sleeps (the
/// kernel does not know yet): a request on one gets no answer within its
/// deadline, the remote makes a fresh client, and the retry goes out on a
/// new connection instead of the next dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_time_out_drops_the_dead_pooled_connections() {
    let g = garage_support::garage();
    let endpoint = std::env::var("AWS_ENDPOINT").unwrap();
    let proxy = net_support::SuspendProxy::start(endpoint.trim_start_matches("http://")).await;
    std::env::set_var("AWS_ENDPOINT", proxy.url());
    let mut cfg = g.config(false);
    cfg.objstore.request_timeout = Duration::from_secs(1);
    let r = RemoteUrl::parse(&g.url("vol")).unwrap().folder_with(&cfg);
    let keys = ["a", "b", "c", "d", "e", "f"];
    for k in keys {
        r.put(k, PutBody::from_bytes(vec![1u8; 1000])).await.unwrap();
    }
    // Reads at once leave several connections in the pool; answers held
    // back a little make them overlap even on a busy machine, where one
    // could end before the next starts and two connections serve all six.
    proxy.set_answer_delay(Duration::from_millis(200));
    let reads = keys.map(|k| r.get_range(k, 0..1000));
    for got in futures::future::join_all(reads).await {
        assert_eq!(got.unwrap().len(), 1000);
    }
    proxy.set_answer_delay(Duration::ZERO);
    assert!(proxy.opened() >= 4, "the pool holds {} connections", proxy.opened());

    proxy.suspend();
    net_support::read_after_suspend(r.clone(), "a", 1000, Duration::from_secs(10)).await;
}
