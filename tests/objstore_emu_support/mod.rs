//! Shared set-up for the `az://` tests: Azurite, Microsoft's Azure Storage
//! emulator (from npm), on loopback, started by `scripts/azurite.sh`. Its
//! endpoint settings go into this test process's environment, where
//! `object_store` reads them exactly as on a host pointed at Azure.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use driveblk::remote::config::ObjStoreConfig;
use driveblk::remote::RemoteConfig;

/// A running emulator: the bucket (container) the script made, and the URL
/// scheme that reaches it.
pub struct Emulator {
    pub bucket: String,
    pub scheme: &'static str,
}

/// This process's Azurite, started at first use.
pub fn azurite() -> &'static Emulator {
    static E: OnceLock<Emulator> = OnceLock::new();
    E.get_or_init(|| start("azurite.sh", "AZURITE_WATCH_PID", "AZURITE_CONTAINER", "az"))
}

fn start(script: &str, watch_var: &str, bucket_var: &str, scheme: &'static str) -> Emulator {
    let dir = tempfile::Builder::new().prefix("objemu-").tempdir().unwrap().keep();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script);
    let out = Command::new(&script)
        .arg("start")
        .arg(&dir)
        .env(watch_var, std::process::id().to_string())
        .output()
        .expect("run the emulator's start script");
    assert!(
        out.status.success(),
        "{} start failed (scripts/deps.sh installs the emulator): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bucket = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) else { continue };
        if k == bucket_var {
            bucket = v.to_string();
        }
        std::env::set_var(k, v);
    }
    assert!(!bucket.is_empty(), "{} printed no bucket", script.display());
    Emulator { bucket, scheme }
}

impl Emulator {
    /// A URL under a fresh prefix (tests share the process's emulator).
    pub fn url(&self, name: &str) -> String {
        format!("{}://{}/t{:08x}/{name}", self.scheme, self.bucket, rand::random::<u32>())
    }

    /// A remote config with small parts, so multipart uploads and parallel
    /// reads happen with test-sized objects.
    pub fn config(&self) -> RemoteConfig {
        RemoteConfig {
            objstore: ObjStoreConfig {
                multipart_threshold: 5 << 20,
                part_size: 5 << 20,
                read_part_size: 1 << 20,
                ..ObjStoreConfig::default()
            },
            ..RemoteConfig::default()
        }
    }
}
