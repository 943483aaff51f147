//! Shared set-up for the `s3://` tests: a real one-node Garage on
//! loopback, started by `scripts/garage.sh` (no mock), and a
//! `RemoteConfig` for it. The endpoint and key go into this test process's
//! environment, where `object_store` and every `driveblk` child read them,
//! exactly as on a host pointed at a real store.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use driveblk::remote::config::ObjStoreConfig;
use driveblk::remote::RemoteConfig;

/// A running Garage.
pub struct Garage {
    pub dir: PathBuf,
    pub bucket: String,
}

/// The Garage of this test process, started at first use (one per process:
/// nextest runs each test in its own; it stops when the process exits).
pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(start)
}

fn start() -> Garage {
    let dir = tempfile::Builder::new().prefix("garage-").tempdir().unwrap().keep();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/garage.sh");
    let out = Command::new(&script)
        .arg("start")
        .arg(&dir)
        .env("GARAGE_WATCH_PID", std::process::id().to_string())
        .output()
        .expect("run scripts/garage.sh");
    assert!(
        out.status.success(),
        "scripts/garage.sh start failed (is garage installed? scripts/deps.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bucket = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) else { continue };
        if k == "GARAGE_BUCKET" {
            bucket = v.to_string();
        }
        std::env::set_var(k, v);
    }
    assert!(!bucket.is_empty(), "garage.sh printed no bucket");
    Garage { dir, bucket }
}

impl Garage {
    /// A URL under a fresh prefix (tests share the process's Garage).
    pub fn url(&self, name: &str) -> String {
        format!("s3://{}/t{:08x}/{name}", self.bucket, rand::random::<u32>())
    }

    /// A remote config for this store: small parts so multipart uploads
    /// and parallel reads happen with test-sized objects.
    pub fn config(&self, unfenced: bool) -> RemoteConfig {
        RemoteConfig {
            objstore: ObjStoreConfig {
                multipart_threshold: 5 << 20,
                part_size: 5 << 20,
                read_part_size: 1 << 20,
                unfenced,
                ..ObjStoreConfig::default()
            },
            ..RemoteConfig::default()
        }
    }
}
