//! `driveblk sync`: upload a volume's local changes now and wait until they
//! are committed — through the daemon serving it (SIGUSR1, then its status
//! file), or, when no daemon is running, by opening the cache directly.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::cli::remote::RemoteArgs;
use crate::cli::serve::CacheArgs;
use crate::cli::size::human;
use crate::cli::status;
use crate::tier;

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The volume whose local changes to upload.
    pub url: String,
    /// Give up waiting after this many seconds (the changes stay in the
    /// cache and keep going up in the background).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// The pid of a live daemon serving from `dir`, per its status file.
fn serving_pid(dir: &std::path::Path) -> Option<i32> {
    let v = status::read(dir).ok()?;
    if !v["running"].as_bool().unwrap_or(false) {
        return None;
    }
    let pid = v["pid"].as_i64()? as i32;
    // SAFETY: signal 0 only checks that the process exists.
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

pub fn run(a: SyncArgs) -> anyhow::Result<()> {
    let mut opts = a.cache.options(&a.url, false, &a.remote)?;
    // Nothing to upload, no lease needed; something to upload takes it.
    opts.lease = tier::LeaseMode::OnCommit;
    let dir: PathBuf = opts.cache_dir.clone();
    let timeout = Duration::from_secs(a.timeout);
    if let Some(pid) = serving_pid(&dir) {
        return through_daemon(pid, &dir, timeout);
    }
    let store = tier::open_volume(&a.url, opts).context("cannot open the volume's cache")?;
    let t0 = Instant::now();
    let dirty = store.stats().dirty_bytes;
    let done = store.sync_now(timeout);
    // Releases the lease when everything is up.
    store.close(Duration::ZERO);
    let st = store.sync_status().unwrap_or_default();
    if let Some(c) = st.conflict {
        bail!("{c}");
    }
    if !done {
        bail!(
            "{} still not uploaded after {:.0} s: {}",
            human(store.stats().dirty_bytes),
            t0.elapsed().as_secs_f64(),
            st.last_error.unwrap_or_else(|| "the upload is slow".into())
        );
    }
    eprintln!(
        "synced {}: generation {} holds every change ({} uploaded in {:.1} s)",
        human(dirty),
        store.volume().generation(),
        human(st.bytes_uploaded),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Asks the daemon to cut a generation now, then follows its status file
/// until nothing is left to upload.
fn through_daemon(pid: i32, dir: &std::path::Path, timeout: Duration) -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        bail!("cannot signal the daemon (pid {pid}): {}", std::io::Error::last_os_error());
    }
    let t0 = Instant::now();
    let start_gen = status::read(dir).ok().and_then(|v| v["generation"].as_u64()).unwrap_or(0);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let v: Value = status::read(dir)?;
        let sync = &v["sync"];
        if let Some(c) = sync["conflict"].as_str() {
            bail!("{c}");
        }
        let dirty = sync["dirty_bytes"].as_u64().unwrap_or(0);
        let uploading = sync["uploading"].as_bool().unwrap_or(false);
        if dirty == 0 && !uploading && t0.elapsed() > Duration::from_millis(1200) {
            let g = v["generation"].as_u64().unwrap_or(0);
            eprintln!("synced: generation {g} holds every change (was {start_gen})");
            return Ok(());
        }
        if t0.elapsed() > timeout {
            let err = sync["last_error"].as_str().unwrap_or("the upload is slow");
            bail!("{} still not uploaded after {} s: {err}", human(dirty), timeout.as_secs());
        }
        if !v["running"].as_bool().unwrap_or(false) {
            bail!("the daemon stopped before the sync finished; run `driveblk sync` again");
        }
    }
}
