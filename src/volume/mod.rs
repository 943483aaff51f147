//! Remote volumes: the on-remote format (docs/format.md) and the library
//! API the CLI calls — `import`, `attach`, `info`, committing generations.
//! (Serving a volume through the cache, and exporting it with a cache's
//! changes, are the tier layer's: `tier::open_volume`, `tier::export`.)
//!
//! All functions here are synchronous: each runs its remote I/O on a tokio
//! runtime it owns, so the clap-based CLI needs no async of its own.

pub mod adopt;
pub mod commit;
pub mod compress;
pub mod crypto;
pub mod digest;
pub mod error;
pub mod fork;
pub mod format;
pub mod gc;
pub mod history;
pub mod hold;
pub mod import;
pub mod lease;
pub mod pack;
pub mod profile;
pub mod progress;
pub mod reader;
pub mod saved_index;
pub mod sidecar;
pub mod subframe;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

pub use adopt::adopt;
pub use error::{VolumeError, VolumeResult, EXIT_DIVERGED};
pub use format::{BaseRef, ChunkRef, Manifest, VolumeHeader, DEFAULT_CHUNK_SIZE, FORMAT_VERSION};
pub use import::{attach, base_head, import, AttachOptions, ImportOptions};
pub use reader::{Part, VolumeReader};

use crate::remote::{RemoteConfig, RemoteLayer, RemoteUrl, RetryPolicy};

/// How volume functions reach the remote.
#[derive(Clone)]
pub struct RemoteOptions {
    /// Extra layers under retry (metrics, simulated latency, faults).
    pub layer: Option<RemoteLayer>,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Where the backends' services are and how to authenticate (Drive).
    pub config: Arc<RemoteConfig>,
    /// The user's key, for encrypted volumes (docs/encryption.md).
    pub key: Option<Arc<crypto::UserKey>>,
    /// Base images the user allows a volume to read wherever they are
    /// (`--allow-base URL`): the header naming a base is not
    /// authenticated, so a base away from the volume is read only when
    /// listed here (reader.rs, `base_backend`).
    pub allow_base: Vec<String>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            layer: None,
            retry: RetryPolicy::fast(),
            config: Arc::new(RemoteConfig::from_env_or_default()),
            key: None,
            allow_base: Vec::new(),
        }
    }
}

impl RemoteOptions {
    /// The same options, with every request (each retry attempt) also
    /// counted and timed into `metrics`, above the caller's own layers.
    pub fn with_metrics(mut self, metrics: Arc<crate::remote::RemoteMetrics>) -> Self {
        let below = self.layer.take();
        self.layer = Some(Arc::new(move |inner| {
            let inner = match &below {
                Some(l) => l(inner),
                None => inner,
            };
            crate::remote::MetricsRemote::wrap(inner, metrics.clone())
        }));
        self
    }
}

impl std::fmt::Debug for RemoteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("layer", &self.layer.is_some())
            .field("retry", &self.retry)
            .field("key", &self.key)
            .field("allow_base", &self.allow_base)
            .finish()
    }
}

/// The id of the volume at `url` (its header only: one small read),
/// waiting at most `wait` for the remote.
pub fn volume_id(url: &str, opts: &RemoteOptions, wait: std::time::Duration) -> VolumeResult<String> {
    let u = RemoteUrl::parse(url)?;
    let rt = Rt(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VolumeError::io("starting tokio runtime for", std::path::Path::new(url), e))?,
    ));
    let remote = reader::connect(u.folder_with(&opts.config), opts);
    let got = rt.block_on(async { tokio::time::timeout(wait, remote.get(format::HEADER_KEY)).await });
    let bytes = match got {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if e.is_not_found() => return Err(VolumeError::NotFound { url: url.to_string() }),
        Ok(Err(e)) => return Err(VolumeError::remote(format!("reading {url}/{}", format::HEADER_KEY), e)),
        Err(_) => return Err(VolumeError::NoAnswer { url: url.to_string(), secs: wait.as_secs() }),
    };
    let h = VolumeHeader::from_bytes(&bytes).map_err(|reason| VolumeError::header(url, &bytes, reason))?;
    Ok(h.volume_id)
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
    /// What opening noticed about the base (adopted; replaced but served
    /// from its pinned revision).
    pub base_note: Option<String>,
    /// The newest boot profile: key, page bytes, generation recorded at.
    pub boot_profile: Option<(String, u64, u64)>,
    /// The image format recorded at import/attach.
    pub image_format: Option<String>,
    /// The data key's id when the volume is encrypted.
    pub encrypted: Option<String>,
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
            base_note: r.base.as_ref().and_then(|b| b.note.clone()),
            boot_profile: None,
            image_format: r.header.image_format.clone(),
            encrypted: r.key.as_ref().map(|k| k.key_id.clone()),
        }
    }
}

/// A runtime for one library call (2 workers: remote I/O is mostly waiting,
/// and the machine's cores belong to the guest).
pub(crate) fn runtime(name: &str) -> VolumeResult<Rt> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .map(|rt| Rt(Some(rt)))
        .map_err(|e| VolumeError::io("starting tokio runtime for", PathBuf::from(name), e))
}

/// A command's runtime. Dropped, it waits for its blocking tasks at most
/// a moment: a `dir:` call stuck in the kernel on a hung mount would
/// otherwise hold the command for ever after its deadline gave up on it
/// (a plain runtime's drop waits for every blocking task).
pub(crate) struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    /// Wraps `rt`.
    pub(crate) fn new(rt: tokio::runtime::Runtime) -> Self {
        Self(Some(rt))
    }

    /// The runtime itself, for an owner that outlives this scope (and
    /// shuts it down its own way).
    pub(crate) fn into_inner(mut self) -> tokio::runtime::Runtime {
        self.0.take().expect("runtime present until dropped")
    }
}

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("runtime present until dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
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

#[cfg(test)]
mod tests {
    /// A command's runtime does not wait at its end for a blocking call
    /// stuck on a hung mount (a plain runtime's drop waits for it).
    #[test]
    fn a_runtime_ends_without_its_stuck_blocking_calls() {
        let rt = super::runtime("driveblk-test").unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        rt.spawn_blocking(move || {
            let _ = rx.recv(); // stuck until the test ends
        });
        let t0 = std::time::Instant::now();
        drop(rt);
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
        drop(tx);
    }
}
