//! `driveblk sync`: upload a volume's local changes now and wait until they
//! are committed — through the daemon serving it (its control socket), or,
//! when no daemon is running, by opening the cache directly.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::control;
use crate::cli::remote::RemoteArgs;
use crate::cli::serve::CacheArgs;
use crate::cli::size::human;
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
    pub control: control::ControlArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub fn run(a: SyncArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(a.timeout);
    let dir = control::cache_dir_of(Some(&a.url), a.cache.cache_dir.as_deref());
    if let Some(ctl) = control::find(a.control.control.as_deref(), dir.as_deref())? {
        let t0 = Instant::now();
        let r = control::request(&ctl, &control::Request::Sync { timeout_secs: Some(a.timeout) })?;
        eprintln!(
            "synced through the daemon: generation {} holds every change flushed before the request ({:.1} s)",
            r["generation"].as_u64().unwrap_or(0),
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let opts = a.cache.options(&a.url, false, &a.remote)?;
    let store = tier::open_volume(&a.url, opts).context("cannot open the volume's cache")?;
    let t0 = Instant::now();
    let dirty = store.stats().dirty_bytes;
    let done = store.sync_now(timeout);
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
