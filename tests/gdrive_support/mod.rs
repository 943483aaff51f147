//! Shared set-up for the `gdrive:` tests: a Drive API emulator on loopback
//! and a `RemoteConfig` pointing the unchanged backend at it (only base
//! URLs differ from production).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use driveblk::remote::config::{DriveConfig, DriveCredentials, PacerConfig};
use driveblk::remote::gdrive::auth::AuthorizedUser;
use driveblk::remote::RemoteConfig;
use driveemu::Emulator;

/// Which kind of credentials the backend uses.
#[derive(Clone, Copy, Debug)]
pub enum Creds {
    /// A refresh token from a user's sign-in (the `auth login` token file).
    User,
    /// A service-account key (its `token_uri` is the emulator's).
    ServiceAccount,
}

/// A running emulator and a config for it.
pub struct DriveEnv {
    pub emu: Emulator,
    pub dir: tempfile::TempDir,
    pub cfg: RemoteConfig,
    pub creds_file: PathBuf,
}

/// Starts an emulator with `emu_cfg` and writes credentials for it.
pub fn start(emu_cfg: driveemu::Config, creds: Creds) -> DriveEnv {
    let emu = Emulator::start_blocking(emu_cfg).expect("start the Drive emulator");
    let dir = tempfile::tempdir().unwrap();
    let creds_file = dir.path().join("creds.json");
    match creds {
        Creds::User => {
            let (client_id, client_secret) = emu.oauth_client();
            let u = AuthorizedUser {
                kind: "authorized_user".into(),
                client_id,
                client_secret,
                refresh_token: emu.issue_refresh_token(),
                token_uri: Some(emu.token_uri()),
                scope: None,
            };
            u.save(&creds_file).unwrap();
        }
        Creds::ServiceAccount => std::fs::write(&creds_file, emu.service_account_key_json()).unwrap(),
    }
    let cfg = RemoteConfig {
        drive: DriveConfig {
            api_url: emu.base_url(),
            credentials: DriveCredentials::File(creds_file.clone()),
            // Tests are limited by the emulator's own quota when they set one.
            pacer: PacerConfig::fixed(10_000.0, 10_000),
            resumable_threshold: 256 << 10,
            chunk_size: 256 << 10,
            request_timeout: Duration::from_secs(10),
            upload_backoff: Duration::from_millis(10),
            ..DriveConfig::default()
        },
        ..RemoteConfig::default()
    };
    DriveEnv { emu, dir, cfg, creds_file }
}

/// Deterministic bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
