//! Opening a remote volume for serving: the newest committed generation
//! (or the cache's copy of it when the remote is unreachable) behind a RAM
//! tier and an SSD cache directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::tiered::TieredStore;
use crate::remote::retry::CallBudget;
use crate::remote::RemoteUrl;
use crate::volume::{RemoteOptions, VolumeError, VolumeReader, VolumeResult};

/// Options for serving a volume through the tiered store.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// This volume's SSD cache directory (see [`cache_dir_for`]).
    pub cache_dir: PathBuf,
    /// RAM tier cap in bytes (pinned metadata comes on top).
    pub ram_cache: u64,
    /// SSD tier cap in bytes for clean chunks; dirty chunks may exceed it.
    pub ssd_cache: u64,
    /// Bytes clean chunks leave free on the cache's filesystem, for
    /// changes not uploaded yet, this daemon's or another's (None: a
    /// twentieth of the filesystem, at most 4 GiB; `ssd::default_min_free`).
    pub ssd_min_free: Option<u64>,
    /// Download the whole volume into the SSD tier in the background.
    /// Requires `ssd_cache` >= the image length.
    pub hydrate: bool,
    /// Most chunks a sequential stream reads ahead (0 disables).
    pub readahead_chunks: u64,
    /// Parallel remote fetches.
    pub fetch_concurrency: usize,
    /// A first boot (no profile) of a volume storing at most this many
    /// bytes fetches all of it from the start (0: only what the boot's
    /// dense regions ask for, within their bound).
    pub first_boot_whole_below: u64,
    /// The first boot's stream of dense regions may run ahead of its bound
    /// by what the link moves in this long (zero: never past the bound).
    pub first_boot_ahead: Duration,
    /// Parallel fetches of the background hydration (kept low so guest
    /// misses go first).
    pub hydrate_concurrency: usize,
    /// Speculative bytes in flight at most (profile stream, readahead,
    /// hydration, metadata prefetch): a guest miss queues behind at most
    /// this much on a shared link.
    pub speculative_bytes: u64,
    /// Refuse writes.
    pub read_only: bool,
    /// Keep the SSD cache's files encrypted (cache_crypto.rs); needs an
    /// encrypted volume.
    pub encrypt_cache: bool,
    /// Boot profiles: replay the volume's newest, record one.
    pub boot_profile: super::boot::BootProfileMode,
    /// How long after the first guest read a boot is recorded.
    pub boot_profile_window: std::time::Duration,
    /// Cache mode and how changes go back to the remote.
    pub writeback: super::tiered::WritebackOptions,
    /// When a writable store takes the volume's writer lease.
    pub lease: LeaseMode,
    /// What a guest request that needs the remote does when the remote
    /// fails or does not answer.
    pub remote_wait: RemoteWait,
    pub remote: RemoteOptions,
    /// A chunk directory shared with other daemons, under the SSD tier
    /// (`serve --shared-cache`, `fleet.rs`).
    pub shared_cache: Option<Arc<crate::remote::SharedCache>>,
    /// The guest may write, but only into this cache: no write-back, no
    /// lease, and the writes are dropped at the next open (`fleet.rs`).
    pub ephemeral: bool,
}

/// When a writable store takes the writer lease (`volume::lease`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaseMode {
    /// At open, before the guest gets a writable disk; refused while
    /// another host holds it.
    #[default]
    AtOpen,
    /// At open, breaking another host's lease (its pending changes fork).
    Force,
    /// Before the first commit only (hydrate, syncing a stopped cache).
    OnCommit,
}

impl CacheOptions {
    /// Defaults: 256 MiB RAM, 32 GiB SSD, readahead 8 chunks, 16 parallel
    /// fetches, hydration and boot profiles off (the CLI turns profiles on).
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            ram_cache: 256 << 20,
            ssd_cache: 32 << 30,
            ssd_min_free: None,
            hydrate: false,
            readahead_chunks: 8,
            fetch_concurrency: 16,
            first_boot_whole_below: 0,
            first_boot_ahead: Duration::ZERO,
            hydrate_concurrency: 2,
            speculative_bytes: super::tiered::SPECULATIVE_BYTES,
            read_only: false,
            encrypt_cache: false,
            boot_profile: super::boot::BootProfileMode::Off,
            boot_profile_window: std::time::Duration::from_secs(180),
            writeback: Default::default(),
            lease: LeaseMode::AtOpen,
            remote_wait: RemoteWait::default(),
            remote: RemoteOptions::default(),
            shared_cache: None,
            ephemeral: false,
        }
    }
}

/// The most `open_volume` waits for a remote that does not answer when the
/// cache holds a copy of the volume to serve instead.
pub const OPEN_WAIT_MAX: Duration = Duration::from_secs(15);

/// What a guest request does when the bytes it needs must come from a
/// remote that fails or hangs (like QEMU's `rerror=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnRemoteError {
    /// Retry within [`RemoteWait::budget`], then fail the request.
    Wait,
    /// Fail the request at the first failed attempt (an attempt with no
    /// answer still fails only at the budget).
    Eio,
}

/// How long guest requests wait on the remote.
#[derive(Clone, Copy, Debug)]
pub struct RemoteWait {
    pub on_error: OnRemoteError,
    /// Most time a guest request waits on the remote before it fails: kept
    /// under the guest's disk timeout (Windows resets a disk whose request
    /// is held about a minute; Linux after 30 s by default), since a
    /// failed read of a pagefile page is a blue screen either way, but a
    /// reset disk is worse. At open, when the cache can serve without the
    /// remote, it is waited for at most this or [`OPEN_WAIT_MAX`].
    pub budget: Duration,
}

impl Default for RemoteWait {
    fn default() -> Self {
        Self { on_error: OnRemoteError::Wait, budget: Duration::from_secs(45) }
    }
}

impl RemoteWait {
    /// The budget a guest request's remote calls run under, from now.
    pub fn call_budget(&self) -> CallBudget {
        CallBudget::new(self.budget, self.on_error == OnRemoteError::Wait)
    }
}

/// Opens the volume at `url` for serving: the newest committed generation,
/// behind a RAM tier and an SSD cache in `opts.cache_dir`.
pub fn open_volume(url: &str, opts: CacheOptions) -> VolumeResult<Arc<TieredStore>> {
    let u = RemoteUrl::parse(url)?;
    // Until the store owns it, an error return must not wait for blocking
    // calls stuck on a hung mount (`Rt`).
    let rt = crate::volume::Rt::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .thread_name("driveblk-tier")
            .enable_all()
            .build()
            .map_err(|e| VolumeError::io("starting tokio runtime for", &opts.cache_dir, e))?,
    );
    // With a copy of the volume in the cache, a remote that hangs must not
    // keep the guest from its disk: past the budget, serve from the copy.
    let has_copy = VolumeReader::has_offline_copy(&opts.cache_dir);
    let remote = match &opts.shared_cache {
        Some(c) => super::fleet::with_shared(&opts.remote, c),
        None => opts.remote.clone(),
    };
    let opening = async {
        if has_copy {
            let wait = opts.remote_wait.budget.min(OPEN_WAIT_MAX);
            tokio::time::timeout(wait, VolumeReader::open(&u, &remote)).await.unwrap_or_else(|_| {
                Err(VolumeError::Remote {
                    context: format!("opening {u}"),
                    source: Box::new(crate::remote::RemoteError::Transient {
                        remote: u.to_string(),
                        op: "open",
                        key: String::new(),
                        message: format!("no answer within {} s", wait.as_secs()),
                        retry_after: None,
                    }),
                })
            })
        } else {
            VolumeReader::open(&u, &remote).await
        }
    };
    let reader = match rt.block_on(opening) {
        Ok(r) => r,
        // Remote unreachable (not missing, not corrupt): start from the
        // copies the cache kept, so cached data stays usable offline.
        Err(VolumeError::Remote { context, source }) if !source.is_not_found() => {
            match VolumeReader::open_offline(&u, &opts.cache_dir, &remote) {
                Ok(r) => {
                    tracing::warn!(url = %u, error = %source, "remote unreachable; serving from the local cache's copy of the volume");
                    r
                }
                Err(e) => {
                    offline_refused(has_copy, &e);
                    return Err(VolumeError::Remote { context, source });
                }
            }
        }
        // Not found, but this cache holds a copy of the volume: an empty
        // mountpoint of an unmounted share looks exactly like this, and the
        // cache may hold the user's only copy of local writes. Serve it, loudly.
        Err(VolumeError::NotFound { url }) => match VolumeReader::open_offline(&u, &opts.cache_dir, &remote) {
            Ok(r) => {
                tracing::warn!(
                    url = %url,
                    cache = %opts.cache_dir.display(),
                    "volume not found on the remote (share not mounted? folder renamed, moved or deleted?); serving from the local cache's copy"
                );
                r
            }
            Err(e) => {
                offline_refused(has_copy, &e);
                return Err(VolumeError::NotFound { url });
            }
        },
        Err(e) => return Err(e),
    };
    // Before anything touches the cache or the remote.
    reader.check_cache_copy(&opts.cache_dir)?;
    super::fleet::prepare_cache(&opts, &reader)?;
    // Packs' sub-frame indexes fetched once stay in the cache directory.
    reader.keep_indexes_in(&opts.cache_dir);
    let store = TieredStore::new(rt.into_inner(), reader.clone(), &opts)?;
    if !reader.offline {
        if let Err(e) = reader.save_copies(&opts.cache_dir) {
            tracing::warn!(dir = %opts.cache_dir.display(), error = %e, "could not keep an offline copy of the volume header");
        }
    }
    Ok(Arc::new(store))
}

/// Says why the cache's copy of the volume could not stand in for the
/// remote (the remote's own error is what the caller returns).
fn offline_refused(has_copy: bool, e: &VolumeError) {
    if has_copy {
        tracing::error!(error = %e, "the local cache's copy of the volume cannot be served instead");
    }
}

/// A conventional cache directory for a volume under a cache root (e.g.
/// `~/.cache/driveblk`): one folder per volume id, so two volumes never
/// share one.
pub fn cache_dir_for(root: &Path, volume_id: &str) -> PathBuf {
    root.join(volume_id)
}
