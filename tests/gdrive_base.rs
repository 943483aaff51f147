//! Base images on Google Drive, against the Drive API emulator: a
//! `gdrive:file=` base is pinned by its head revision and checksum (that
//! revision marked keepForever), so renames change nothing and a replaced
//! file is never read as the volume's data; `adopt` copies the base into
//! the volume folder server-side so the original can go; and a volume is
//! found by id right after import, whatever the listings show.

#[allow(dead_code)]
mod common;
mod gdrive_support;
#[allow(dead_code)]
mod tier_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use driveblk::remote::RetryPolicy;
use driveblk::tier::ExportOptions;
use driveblk::volume::{self, AttachOptions, RemoteOptions};
use gdrive_support::{start, Creds, DriveEnv};

fn remote_opts(env: &DriveEnv) -> RemoteOptions {
    RemoteOptions {
        layer: None,
        retry: RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(100),
            seed: Some(3),
            attempt_timeout: Duration::from_secs(60),
        },
        config: Arc::new(env.cfg.clone()),
    }
}

fn export(env: &DriveEnv, url: &str) -> Vec<u8> {
    let out = env.dir.path().join("out.img");
    let eo = ExportOptions { cache_dir: None, parallel: 4, progress: false, remote: remote_opts(env) };
    driveblk::tier::export(url, &out, &eo).unwrap();
    std::fs::read(&out).unwrap()
}

fn md5_hex(b: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(b))
}

#[test]
fn gdrive_base_is_pinned_to_its_revision() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(31, 3 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "win10.qcow2", &image);
    let rev0 = env.emu.ui_head_revision(&id).unwrap();
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env) };
    let url = "gdrive:/vms/pinned";
    let info = volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    let b = info.base.clone().unwrap();
    assert_eq!(b.revision.as_deref(), Some(rev0.as_str()));
    assert_eq!(b.md5.as_deref(), Some(md5_hex(&image).as_str()));
    assert!(b.sha256.is_some(), "{b:?}");
    assert_eq!(env.emu.ui_revision_kept(&id, &rev0), Some(true), "the pinned revision is kept forever");
    // A rename (a metadata change: `version` goes up) changes nothing.
    env.emu.ui_rename(&id, "renamed.qcow2");
    let i = volume::info_with(url, &remote_opts(&env)).unwrap();
    assert_eq!(i.base_note, None);
    assert!(export(&env, url) == image);
    // The content is replaced, and Drive purges the revisions it need not keep.
    env.emu.ui_replace_content(&id, &gdrive_support::data(32, 3 << 20));
    env.emu.ui_purge_revisions(&id);
    let i = volume::info_with(url, &remote_opts(&env)).unwrap();
    let note = i.base_note.unwrap_or_default();
    assert!(note.contains("replaced") && note.contains("driveblk adopt"), "{note}");
    let reads_before = env.emu.stats().requests.get("revisions.get media").copied().unwrap_or(0);
    assert!(export(&env, url) == image, "the volume reads the pinned revision, never the new content");
    assert!(env.emu.stats().requests.get("revisions.get media").copied().unwrap_or(0) > reads_before);
    // The pinned revision deleted (Manage versions): refused, saying what happened and what to do.
    env.emu.ui_delete_revision(&id, &rev0);
    let e = volume::info_with(url, &remote_opts(&env)).unwrap_err().to_string();
    assert!(e.contains("pinned revision is gone") && e.contains("Manage versions"), "{e}");
}

#[test]
fn gdrive_adopted_base_outlives_the_original() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(41, 3 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "base.img", &image);
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env) };
    let url = "gdrive:/vms/adopted";
    volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    let bytes_in = env.emu.stats().bytes_in;
    let info = volume::adopt(url, &remote_opts(&env)).unwrap();
    assert_eq!(info.generation, 2);
    assert!(info.base_note.unwrap_or_default().contains("adopted"));
    assert_eq!(env.emu.stats().requests.get("files.copy").copied(), Some(1), "server-side copy");
    assert!(env.emu.stats().bytes_in - bytes_in < 64 << 10, "no base bytes were uploaded");
    // Adopting again changes nothing.
    assert_eq!(volume::adopt(url, &remote_opts(&env)).unwrap().generation, 2);
    // The original goes: trashed, then deleted for good.
    env.emu.ui_trash(&id);
    assert!(export(&env, url) == image);
    env.emu.ui_delete(&id);
    assert!(export(&env, url) == image, "the adopted volume reads its own copy");
    // Another process (the CLI) reads it too.
    let out = env.dir.path().join("cli.img");
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["export", "--quiet", url, out.to_str().unwrap()])
        .args(["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()])
        .env("XDG_CACHE_HOME", env.dir.path().join("xdg-cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == image);
}

/// A base replaced before `adopt`: the copy is made of the pinned
/// revision (through this host), never of the new content.
#[test]
fn gdrive_adopt_after_replacement_copies_the_pinned_revision() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(51, 2 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "base.img", &image);
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env) };
    let url = "gdrive:/vms/adopt-late";
    volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    env.emu.ui_replace_content(&id, &gdrive_support::data(52, 2 << 20));
    volume::adopt(url, &remote_opts(&env)).unwrap();
    env.emu.ui_delete(&id);
    assert!(export(&env, url) == image);
}

/// Listings lag behind creates (here: by a minute). A volume imported by
/// one process opens and reads at once in another process on the same
/// host: the folder and objects it created are found by id (files.get),
/// from the host's id record. Without the record (another cache dir) the
/// same open finds nothing — the lag is real.
#[test]
fn gdrive_new_volume_opens_in_another_process_despite_lagging_listings() {
    let env = start(driveemu::Config { listing_lag: Duration::from_secs(60), ..Default::default() }, Creds::User);
    let (img, bytes) = tier_support::raw_image(env.dir.path(), "disk.raw", 2 << 20, 61);
    let run = |xdg: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(args)
            .args(["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()])
            .env("XDG_CACHE_HOME", env.dir.path().join(xdg))
            .output()
            .unwrap()
    };
    let o = run("host", &["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), "gdrive:/lag/vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = env.dir.path().join("out.raw");
    let o = run("host", &["export", "--quiet", "gdrive:/lag/vol", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes);
    let o = run("elsewhere", &["info", "gdrive:/lag/vol"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no volume"), "{err}");
}
