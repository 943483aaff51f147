//! Remote volumes: the on-remote format (docs/format.md) and the library
//! API the CLI calls — `import`, `attach`, `open`, `export`, `info`.
//!
//! All functions here are synchronous: each runs its remote I/O on a tokio
//! runtime it owns, so the clap-based CLI needs no async of its own.

pub mod commit;
pub mod error;
pub mod export;
pub mod format;
pub mod import;
pub mod pack;
pub mod profile;
pub mod reader;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{VolumeError, VolumeResult};
pub use export::{export, ExportOptions, ExportSummary};
pub use format::{BaseRef, ChunkRef, Manifest, VolumeHeader, DEFAULT_CHUNK_SIZE, FORMAT_VERSION};
pub use import::{attach, import, AttachOptions, ImportOptions};
pub use reader::VolumeReader;

use crate::remote::{RemoteLayer, RemoteUrl, RetryPolicy};
use crate::tier::tiered::TieredStore;

/// How volume functions reach the remote.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Extra layers under retry (metrics, simulated latency, faults).
    pub layer: Option<RemoteLayer>,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self { layer: None, retry: RetryPolicy::fast() }
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions").field("layer", &self.layer.is_some()).field("retry", &self.retry).finish()
    }
}

/// Options for serving a volume through the tiered store.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// This volume's SSD cache directory (see [`cache_dir_for`]).
    pub cache_dir: PathBuf,
    /// RAM tier cap in bytes (pinned metadata comes on top).
    pub ram_cache: u64,
    /// SSD tier cap in bytes for clean chunks; dirty chunks may exceed it.
    pub ssd_cache: u64,
    /// Download the whole volume into the SSD tier in the background.
    /// Requires `ssd_cache` >= the image length.
    pub hydrate: bool,
    /// Most chunks a sequential stream reads ahead (0 disables).
    pub readahead_chunks: u64,
    /// Parallel remote fetches.
    pub fetch_concurrency: usize,
    /// Parallel fetches of the background hydration (kept low so guest
    /// misses go first).
    pub hydrate_concurrency: usize,
    /// Refuse writes.
    pub read_only: bool,
    /// Boot profiles: replay the volume's newest, record one.
    pub boot_profile: crate::tier::boot::BootProfileMode,
    /// How long after the first guest read a boot is recorded.
    pub boot_profile_window: std::time::Duration,
    /// Cache mode and how changes go back to the remote.
    pub writeback: crate::tier::tiered::WritebackOptions,
    pub remote: RemoteOptions,
}

impl CacheOptions {
    /// Defaults: 256 MiB RAM, 32 GiB SSD, readahead 8 chunks, 16 parallel
    /// fetches, hydration and boot profiles off (the CLI turns profiles on).
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            ram_cache: 256 << 20,
            ssd_cache: 32 << 30,
            hydrate: false,
            readahead_chunks: 8,
            fetch_concurrency: 16,
            hydrate_concurrency: 2,
            read_only: false,
            boot_profile: crate::tier::boot::BootProfileMode::Off,
            boot_profile_window: std::time::Duration::from_secs(180),
            writeback: Default::default(),
            remote: RemoteOptions::default(),
        }
    }
}

/// What `info` (and `import`/`attach`) report about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub url: String,
    pub volume_id: String,
    pub format_version: u32,
    pub created_unix: u64,
    pub image_len: u64,
    pub chunk_size: u64,
    pub generation: u64,
    pub chunks_total: u64,
    /// Chunks stored in packs.
    pub chunks_packed: u64,
    /// Chunks that are all zeroes (nothing stored).
    pub chunks_zero: u64,
    /// Chunks served from the base image.
    pub chunks_base: u64,
    pub packs: u64,
    /// Compressed bytes of all packed chunks.
    pub packed_bytes: u64,
    pub base: Option<BaseRef>,
    /// The newest boot profile: key, page bytes, generation recorded at.
    pub boot_profile: Option<(String, u64, u64)>,
}

impl VolumeInfo {
    pub(crate) fn from_reader(r: &VolumeReader) -> Self {
        let m = &*r.manifest();
        let (mut packed, mut zero, mut base, mut bytes) = (0, 0, 0, 0);
        for idx in 0..m.chunk_count() {
            match r.chunk_ref(idx) {
                ChunkRef::Zero => zero += 1,
                ChunkRef::Base => base += 1,
                ChunkRef::Packed { len, .. } | ChunkRef::Patched { len, .. } => {
                    packed += 1;
                    bytes += len;
                }
            }
        }
        Self {
            url: r.url.clone(),
            volume_id: r.header.volume_id.clone(),
            format_version: r.header.version,
            created_unix: r.header.created_unix,
            image_len: m.image_len,
            chunk_size: m.chunk_size,
            generation: m.generation,
            chunks_total: m.chunk_count(),
            chunks_packed: packed,
            chunks_zero: zero,
            chunks_base: base,
            packs: m.packs.len() as u64,
            packed_bytes: bytes,
            base: r.header.base.clone(),
            boot_profile: None,
        }
    }
}

/// A runtime for one library call (2 workers: remote I/O is mostly waiting,
/// and the machine's cores belong to the guest).
pub(crate) fn runtime(name: &str) -> VolumeResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| VolumeError::io("starting tokio runtime for", PathBuf::from(name), e))
}

/// Describes the volume at `url`.
pub fn info(url: &str) -> VolumeResult<VolumeInfo> {
    info_with(url, &RemoteOptions::default())
}

/// [`info`] with explicit remote options.
pub fn info_with(url: &str, opts: &RemoteOptions) -> VolumeResult<VolumeInfo> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-info")?;
    let r = rt.block_on(VolumeReader::open(&u, opts))?;
    let mut info = VolumeInfo::from_reader(&r);
    // A profile that cannot be read is reported as none, as serve treats it.
    if let Ok(Some((key, p))) = rt.block_on(profile::find_latest(&r.remote, &r.header)) {
        info.boot_profile = Some((key, p.raw_bytes(), p.generation));
    }
    Ok(info)
}

/// Opens the volume at `url` for serving: the newest committed generation,
/// behind a RAM tier and an SSD cache in `opts.cache_dir`.
pub fn open(url: &str, opts: CacheOptions) -> VolumeResult<Arc<TieredStore>> {
    let u = RemoteUrl::parse(url)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .thread_name("driveblk-tier")
        .enable_all()
        .build()
        .map_err(|e| VolumeError::io("starting tokio runtime for", &opts.cache_dir, e))?;
    let reader = match rt.block_on(VolumeReader::open(&u, &opts.remote)) {
        Ok(r) => r,
        // Remote unreachable (not missing, not corrupt): start from the
        // copies the cache kept, so cached data stays usable offline.
        Err(VolumeError::Remote { context, source }) if !source.is_not_found() => {
            match VolumeReader::open_offline(&u, &opts.cache_dir, &opts.remote) {
                Ok(r) => {
                    tracing::warn!(url = %u, error = %source, "remote unreachable; serving from the local cache's copy of the volume");
                    r
                }
                Err(_) => return Err(VolumeError::Remote { context, source }),
            }
        }
        // Not found, but this cache holds a copy of the volume: an empty
        // mountpoint of an unmounted share looks exactly like this, and the
        // cache may hold the user's only copy of local writes. Serve it, loudly.
        Err(VolumeError::NotFound { url }) => match VolumeReader::open_offline(&u, &opts.cache_dir, &opts.remote) {
            Ok(r) => {
                tracing::warn!(
                    url = %url,
                    cache = %opts.cache_dir.display(),
                    "volume not found on the remote (share not mounted? volume deleted?); serving from the local cache's copy"
                );
                r
            }
            Err(_) => return Err(VolumeError::NotFound { url }),
        },
        Err(e) => return Err(e),
    };
    let store = TieredStore::new(rt, reader.clone(), &opts)?;
    if !reader.offline {
        if let Err(e) = reader.save_copies(&opts.cache_dir) {
            tracing::warn!(dir = %opts.cache_dir.display(), error = %e, "could not keep an offline copy of the volume header");
        }
    }
    Ok(Arc::new(store))
}

/// A conventional cache directory for a volume under a cache root (e.g.
/// `~/.cache/driveblk`): one folder per volume id, so two volumes never
/// share one.
pub fn cache_dir_for(root: &Path, volume_id: &str) -> PathBuf {
    root.join(volume_id)
}
