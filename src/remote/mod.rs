//! Remote layer: the [`Remote`] trait — an immutable-object store with ranged
//! reads, shaped after what Google Drive can do — plus its `dir:`,
//! `gdrive:` and object-store (`s3://`, `gs://`, `az://`) backends and
//! the wrappers (retry, metrics, latency/fault shaping) that stack around any
//! backend as one trait object, and the process's bandwidth limiter the
//! backends pace their transfers with (`bwlimit.rs`).

pub mod bwlimit;
pub mod config;
pub mod dir;
pub mod error;
pub mod file_lock;
pub mod fs_deadline;
pub mod gdrive;
pub mod host_clock;
pub mod host_state;
pub mod layer;
pub mod merge;
pub mod metrics;
pub mod objstore;
pub mod priority;
pub mod private;
pub mod retry;
pub mod sent;
pub mod shaped;
pub mod shared;
pub mod tcp_unacked;
pub mod url;

use std::fmt;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, Stream};

pub use bwlimit::{BwEntry, BwLimit, BwSchedule};
pub use config::RemoteConfig;
pub use dir::DirRemote;
pub use error::{RemoteError, RemoteResult};
pub use layer::Layer;
pub use merge::{MergeConfig, MergeStats, MergingRemote};
pub use metrics::{LatencyPercentiles, MetricsRemote, RemoteMetrics, RemoteMetricsSnapshot};
pub use retry::{RetryPolicy, RetryingRemote};
pub use shaped::{FaultPlan, ShapedRemote, Shaping};
pub use shared::{SharedCache, SharedStats};
pub use url::RemoteUrl;

/// A stream of body chunks for an upload.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// What a `head` or `list` reports about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the remote's root (e.g. `pack-00a1...`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// A value that changes whenever the object's content is replaced
    /// (dir: mtime in ns; Drive: `version`). Used to notice that a base
    /// image was modified after a volume was attached to it.
    pub version: Option<String>,
    /// Hex sha256 of the content when the backend knows it cheaply (Drive
    /// reports `sha256Checksum`; `dir` does not hash on `head`).
    pub sha256: Option<String>,
    /// The tag given to [`Remote::create`], when the object was made that
    /// way and the backend keeps tags (Drive: an appProperty; `dir`: the
    /// sha256 of the content, which is what callers pass as the tag).
    pub tag: Option<String>,
    /// When the object was created, by the remote's clock (ms since the
    /// Unix epoch). Leases and GC grace periods judge age by this, never
    /// by comparing two hosts' clocks.
    pub created_ms: Option<u64>,
    /// When the object's content was last written, by the remote's clock
    /// (ms since the Unix epoch; Drive: `modifiedTime`, `dir`: the file's
    /// mtime). A lease heartbeat's age is this against a probe's, never a
    /// local clock.
    pub modified_ms: Option<u64>,
    /// The content revision the metadata describes, on stores that keep
    /// revisions (Drive: `headRevisionId`); a rename, star or share does
    /// not change it, replacing the content does.
    pub revision: Option<String>,
    /// Hex md5 of the content when the store reports it (Drive:
    /// `md5Checksum`).
    pub md5: Option<String>,
    /// The object's identity on stores whose names are not unique (Drive:
    /// its file id): a manifest records it so readers on other hosts find
    /// the object without waiting for a listing to show it.
    pub slot: Option<Slot>,
}

impl ObjectMeta {
    /// Metadata with just a key and a size.
    pub fn new(key: impl Into<String>, size: u64) -> Self {
        Self {
            key: key.into(),
            size,
            version: None,
            sha256: None,
            tag: None,
            created_ms: None,
            modified_ms: None,
            revision: None,
            md5: None,
            slot: None,
        }
    }
}

/// A reservation that makes a later [`Remote::create`] of one key
/// exclusive on stores whose names are not unique: Drive allows two files
/// with one name, so there the slot is a file id from `files.generateIds`,
/// and a second create with it answers 409. Slots are stored in manifests
/// (generation N names the slot of N+1), so every host that read N creates
/// — or looks for — N+1 at the same slot. Opaque to callers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Slot(pub String);

/// The body of a whole-object upload.
///
/// An upload may be retried, and a stream can only be read once, so the body
/// is a factory that makes a fresh stream per attempt.
#[derive(Clone)]
pub struct PutBody {
    len: Option<u64>,
    make: Arc<dyn Fn() -> ByteStream + Send + Sync>,
}

impl PutBody {
    /// A body held in memory.
    pub fn from_bytes(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        let len = data.len() as u64;
        Self { len: Some(len), make: Arc::new(move || Box::pin(stream::iter([Ok(data.clone())]))) }
    }

    /// A body produced by `make`, called once per attempt. `len`, when
    /// known, lets a backend announce the size up front (Drive resumable
    /// uploads want it).
    pub fn from_stream_fn(len: Option<u64>, make: impl Fn() -> ByteStream + Send + Sync + 'static) -> Self {
        Self { len, make: Arc::new(make) }
    }

    /// Declared length, if known.
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// True when the body is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    /// A fresh stream over the body.
    pub fn stream(&self) -> ByteStream {
        (self.make)()
    }
}

impl fmt::Debug for PutBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutBody").field("len", &self.len).finish()
    }
}

/// A store of immutable objects under string keys, rooted at one folder.
///
/// Objects are written whole and never patched (Drive cannot patch a file);
/// a `put` to an existing key replaces it atomically — readers see the old
/// object or the new one, never a mix or a prefix.
///
/// Keys are unique: a backend whose store allows duplicate names (Drive)
/// must make `put` replace, and make a retried `put` whose first attempt
/// landed recognise it (e.g. tag uploads with an appProperty and look before
/// re-creating) — the retry wrapper re-sends puts blindly.
///
/// Errors must be classified ([`RemoteError::Transient`] vs
/// [`RemoteError::Fatal`] / [`RemoteError::NotFound`]) so the retry wrapper
/// can decide without knowing the backend.
///
/// A method added here goes into [`Layer`] too (forwarding, and called
/// from its blanket impl), or every wrapper gets this trait's default.
#[async_trait]
pub trait Remote: Send + Sync + fmt::Debug {
    /// Bytes `range` of object `key`. A range reaching past the end of the
    /// object is cut at the end (so the result may be shorter than asked);
    /// callers that need an exact length check it.
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes>;

    /// The whole object.
    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let meta = self.head(key).await?;
        self.get_range(key, 0..meta.size).await
    }

    /// Writes the whole object `key` from `body`; it becomes visible only
    /// once complete.
    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta>;

    /// Size and version of `key`; [`RemoteError::NotFound`] if absent.
    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta>;

    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>>;

    /// What [`list`](Self::list) shows under `prefix` past `after` (keys
    /// greater than it), sorted by key, at a cost that follows what lies
    /// past `after`, not the whole history: a commit asks whether any
    /// generation newer than its own exists, and a volume served for
    /// months holds hundreds of thousands. Keys under `prefix` end in
    /// fixed-width digits (as `gen-` keys do): a store may rely on it to
    /// stop reading early.
    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        let mut l = self.list(prefix).await?;
        l.retain(|m| m.key.as_str() > after);
        Ok(l)
    }

    /// Deletes `key`; deleting an absent key is not an error.
    async fn delete(&self, key: &str) -> RemoteResult<()>;

    /// Leftovers of writes that never finished, which no
    /// [`list`](Self::list) shows (`dir:`: the hidden temp file of a put cut
    /// short — its future dropped at a deadline, the process killed), with
    /// their sizes and modification times by the remote's clock. Empty on
    /// stores whose unfinished uploads leave nothing stored. gc deletes
    /// those older than its grace period.
    async fn list_scratch(&self) -> RemoteResult<Vec<ObjectMeta>> {
        Ok(Vec::new())
    }

    /// Deletes a leftover [`list_scratch`](Self::list_scratch) named;
    /// one already gone is fine.
    async fn delete_scratch(&self, _key: &str) -> RemoteResult<()> {
        Ok(())
    }

    /// Whether a listing made now by any other client shows `key`: the
    /// store's listing alone, never what this process knows it created.
    /// Drive's listings lag behind creates; a host that must be sure
    /// another host's listing sees an object it wrote (a hold that keeps a
    /// generation from a concurrent gc) waits until this says so. Stores
    /// that list what they created at once answer from [`list`](Self::list).
    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        Ok(self.list(key).await?.iter().any(|m| m.key == key))
    }

    /// Makes the folder this remote is rooted at, for a new volume (import,
    /// fork). Other writes never make it: on a path-named store (`dir:`) a
    /// folder that vanished (deleted, or a network share not mounted) then
    /// fails them, instead of being made again empty where commits would
    /// land unseen. On Drive the same holds for a folder renamed, moved or
    /// trashed in the web UI. Stores without folders (object stores) do
    /// nothing here. No default: a wrapper that forgot to pass it on
    /// would leave a new volume's folder unmade.
    async fn create_folder(&self) -> RemoteResult<()>;

    /// Reserves a slot for a later exclusive [`create`](Self::create) of
    /// `key`. Stores whose keys are unique (`dir`, object stores) need
    /// none and answer `Ok(None)`.
    async fn reserve(&self, _key: &str) -> RemoteResult<Option<Slot>> {
        Ok(None)
    }

    /// Creates `key` from `body` only if nothing was ever created there:
    /// the commit fence. `slot` is what [`reserve`](Self::reserve) gave
    /// for this key (by any host); `tag` is the hex sha256 of the body, kept
    /// with the object so that a retry whose first attempt landed (reply
    /// lost) recognises its own object. If the object exists, answers
    /// [`RemoteError::AlreadyExists`] carrying the existing object's tag:
    /// equal to `tag` means "yours, already there". Like `put`, the object
    /// becomes visible only once complete.
    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta>;

    /// Metadata of the object created at `key`/`slot`, found by identity
    /// (Drive: files.get on the slot's id), never through a listing, which
    /// may lag behind creates. [`RemoteError::NotFound`] if not created yet.
    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        let _ = slot;
        self.head(key).await
    }

    /// The content of the object created at `key`/`slot` (see
    /// [`head_created`](Self::head_created)).
    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        let _ = slot;
        self.get(key).await
    }

    /// The object `key` if it sits in the store's trash (Drive: a file
    /// someone moved to the bin in the web UI, which `head` and `list`
    /// treat as absent); `Ok(None)` when it is not in the trash or the store
    /// has none (`dir`). Lets `verify` tell "trashed: restore it" from
    /// "deleted".
    async fn find_trashed(&self, _key: &str) -> RemoteResult<Option<ObjectMeta>> {
        Ok(None)
    }

    /// The objects in the store's trash whose keys start with `prefix`,
    /// sorted by key; empty on stores without one. `gc` stops while any
    /// is there: a generation, pack or hold in the trash may be restored.
    async fn list_trashed(&self, _prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Ok(Vec::new())
    }

    /// Keeps content revision `revision` of `key` for good (Drive:
    /// revisions.update `keepForever`), so a base image pinned to it stays
    /// readable after its file is replaced. Stores without revisions do
    /// nothing.
    async fn keep_revision(&self, _key: &str, _revision: &str) -> RemoteResult<()> {
        Ok(())
    }

    /// Metadata of content revision `revision` of `key` (size, md5);
    /// [`RemoteError::NotFound`] when the store has no such revision (or
    /// keeps none).
    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        let m = self.head(key).await?;
        if m.revision.as_deref() == Some(revision) {
            Ok(m)
        } else {
            Err(RemoteError::NotFound { remote: self.describe(), key: format!("{key} revision {revision}") })
        }
    }

    /// Bytes `range` of content revision `revision` of `key` (Drive:
    /// revisions.get `alt=media` with `Range`), never of a newer content.
    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.head_revision(key, revision).await?;
        self.get_range(key, range).await
    }

    /// Tells the store that the object `key` was created at `slot`, so it
    /// is found by identity (Drive: files.get on the id) instead of by a
    /// name lookup, which may lag behind creates. A hint: stores whose
    /// keys are their names ignore it.
    fn locate(&self, _key: &str, _slot: &Slot) {}

    /// One-line description for logs and errors (e.g. `dir:/mnt/vols/win10`).
    fn describe(&self) -> String;

    /// Drops pooled connections so the next request opens fresh ones: called
    /// when a request got no answer in time, since after a network change or
    /// a laptop's sleep every pooled connection may be dead without the
    /// kernel knowing yet. Layers forward it; backends without connections
    /// ignore it.
    fn reset_connections(&self) {}

    /// Bytes of upload bodies this store has sent so far (taken by its
    /// client less what the process's sockets hold unacknowledged, or
    /// written, for `dir`), counted as they go, retries included; never
    /// less than an earlier answer; `None` when the store does not count.
    /// Waiters on an upload read it to tell one that is slow from one that
    /// is stuck: it moves while any upload moves.
    fn bytes_sent(&self) -> Option<u64> {
        None
    }
}

/// A shared remote trait object.
pub type DynRemote = Arc<dyn Remote>;

/// A function that wraps a remote in more layers (metrics, shaping, faults).
/// Volume functions apply it to every remote they open, so a test or the
/// CLI's `--simulate` flags can slip a layer under the whole volume.
pub type RemoteLayer = Arc<dyn Fn(DynRemote) -> DynRemote + Send + Sync>;

/// Hex sha256 of `data`: the tag [`Remote::create`] callers pass.
pub fn content_tag(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// Reads and concatenates a whole body stream (for backends and tests).
pub async fn collect_body(body: &PutBody) -> std::io::Result<Vec<u8>> {
    use futures::StreamExt;
    let mut s = body.stream();
    let mut out = Vec::with_capacity(body.len().unwrap_or(0) as usize);
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}
