//! `driveblk sync`: upload a volume's local changes now and wait until they
//! are committed — through the daemon serving it (its control socket), or,
//! when no daemon is running, by opening the cache directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::cli::control;
use crate::cli::remote::RemoteArgs;
use crate::cli::serve::CacheArgs;
use crate::cli::size::human;
use crate::tier;
use crate::volume::progress;

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The volume whose local changes to upload.
    pub url: String,
    /// Give up waiting after this many seconds (the changes stay in the
    /// cache and keep going up in the background).
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
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
        let watch = ctl.clone();
        let _progress = Watch::start(!a.quiet, move || {
            control::request(&watch, &control::Request::Status).ok()?.pointer("/sync/dirty_bytes")?.as_u64()
        });
        let r = control::request(&ctl, &control::Request::Sync { timeout_secs: Some(a.timeout) })?;
        eprintln!(
            "synced through the daemon: generation {} holds every change flushed before the request ({:.1} s)",
            r["generation"].as_u64().unwrap_or(0),
            t0.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    // Opening a cache that is not there would make an empty one and report
    // "synced 0 B" while the changes sit in the cache a daemon uses.
    let have = dir.as_deref().filter(|d| d.join("state").exists());
    if have.is_none() {
        bail!(
            "no daemon serves {url} from {dir}, and it holds no cache of the volume: nothing to sync here. \
             If a daemon serves it from another cache directory, give that (`--cache-dir`, as given to serve) or \
             its `--control` socket; a daemon run by systemd as root keeps its cache under /var/cache/driveblk \
             (run this as root)",
            url = a.url,
            dir = dir.as_deref().map_or("the default cache directory".into(), |d| d.display().to_string()),
        );
    }
    let mut opts = a.cache.options(&a.url, false, &a.remote)?;
    // Nothing to upload, no lease needed; something to upload takes it.
    opts.lease = tier::LeaseMode::OnCommit;
    let store = tier::open_volume(&a.url, opts).context("cannot open the volume's cache")?;
    let t0 = Instant::now();
    let dirty = store.stats().dirty_bytes;
    let watched = store.clone();
    let progress = Watch::start(!a.quiet, move || Some(watched.stats().dirty_bytes));
    let done = store.sync_now(timeout);
    drop(progress);
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

/// Shows a sync's progress (bytes of changes no longer pending) until
/// dropped, polling `dirty` (bytes not committed yet) twice a second.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(on: bool, dirty: impl Fn() -> Option<u64> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = on.then(|| {
            std::thread::spawn(move || {
                let start = dirty().unwrap_or(0);
                let bar = progress::bar_of(true, start, "sync", progress::Unit::Bytes);
                while !s.load(Ordering::Acquire) {
                    if let Some(d) = dirty() {
                        bar.set_position(start.saturating_sub(d));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                bar.finish_and_clear();
            })
        });
        Self { stop, thread }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
