//! Volume errors: each names the volume or object that is wrong and, where
//! there is one, what the user can do about it.

use std::io;
use std::path::PathBuf;

use crate::remote::url::UrlError;
use crate::remote::RemoteError;

/// Result alias for volume operations.
pub type VolumeResult<T> = Result<T, VolumeError>;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Url(#[from] UrlError),

    #[error("no volume at {url}: volume.json not found — create one with `driveblk import` or `driveblk attach`")]
    NotFound { url: String },

    #[error("a volume already exists at {url} — choose another name, or delete that folder first")]
    AlreadyExists { url: String },

    #[error("{url}/{key} is in the Drive trash — restore it (Drive web UI: Trash, Restore); nothing was changed")]
    InTrash { url: String, key: String },

    #[error("gc of {url} stopped before deleting anything: {keys} in the Drive trash — restore it (a generation, pack or hold there may still be needed) or delete it for good, then run gc again")]
    GcTrash { url: String, keys: String },

    #[error("{url} holds generations (gen-*) but no volume.json — restore volume.json (from the Drive trash, or a backup) rather than importing over it; nothing was changed")]
    HeaderMissing { url: String },

    #[error("volume {url}: {source}")]
    Key {
        url: String,
        #[source]
        source: super::crypto::KeyError,
    },

    /// The remote's header says plaintext, the cache's copy of it says
    /// encrypted: someone replaced the header (docs/encryption.md).
    #[error("volume {url}: its header on the remote says it is not encrypted, but the copy of it kept in cache directory {} says it is: refusing to open it (whoever can write to the remote may have replaced volume.json, to have this host upload in clear); nothing was written. Compare {url}/volume.json with {}, the header as this host last opened it, and check who can write there", dir.display(), dir.join("volume.json").display())]
    Downgraded { url: String, dir: PathBuf },

    #[error("volume header {url}/volume.json is unusable: {reason}")]
    BadHeader { url: String, reason: String },

    #[error("volume {url} has no committed generation (no gen-* manifest): it was created by an import that did not finish — delete the folder and import again")]
    NoGeneration { url: String },

    #[error("manifest {key} of volume {url} is corrupt: {reason} — the remote copy is damaged; restore it from a backup or re-import the image")]
    CorruptManifest { url: String, key: String, reason: String },

    /// An object a newer driveblk wrote, in a layout this one does not
    /// read: nothing is wrong with it.
    #[error(
        "{what} was written by a newer driveblk ({detail}): upgrade this machine (docs/restart.md); nothing is damaged"
    )]
    Newer { what: String, detail: String },

    #[error("chunk {chunk} of volume {url} (in {key} at offset {offset}) is corrupt: {reason} — the pack is damaged; no data was returned for it")]
    CorruptChunk { url: String, chunk: u64, key: String, offset: u64, reason: String },

    #[error("the sub-frame index of {key} in volume {url} (at offset {offset}) is corrupt: {reason} — the pack is damaged; its chunks are read whole, each checked against the manifest")]
    CorruptIndex { url: String, key: String, offset: u64, reason: String },

    #[error(
        "boot profile {key} of volume {url} is corrupt: {reason} — it is ignored; the next boot records a new one"
    )]
    CorruptProfile { url: String, key: String, reason: String },

    #[error("base image {base} of volume {url} changed since the volume was attached: {what}")]
    BaseChanged { url: String, base: String, what: String },

    #[error("volume {url} names base image {base}, {why}: not read (the volume's header is not authenticated: whoever can write it could have this host serve any file it can read to the guest). If you attached that base, allow it: --allow-base {base} (config file: allow_base = [\"{base}\"])")]
    BaseRefused { url: String, base: String, why: String },

    #[error("{context}: {source}")]
    Remote {
        context: String,
        #[source]
        source: Box<RemoteError>,
    },

    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cache directory {}: {reason}", dir.display())]
    Cache { dir: PathBuf, reason: String },

    /// The cache holds changes made on a generation someone else has since
    /// replaced: they are kept, never mixed into the newer disk, and only
    /// a person can choose (fork, export, discard). Starting again does
    /// not help, so `serve` exits with [`EXIT_DIVERGED`].
    #[error("cache directory {}: {reason}", dir.display())]
    Diverged { dir: PathBuf, reason: String },

    #[error("invalid option: {0}")]
    InvalidOptions(String),

    /// An object or a piece of state that cannot be used as it is (a boot
    /// profile that no longer fits the image, a fork registration that does
    /// not parse, a chunk a partial fetch could not complete). The text
    /// says what and why.
    #[error("{0}")]
    Unusable(String),

    /// Work dropped because its owner is going away (the store closing).
    #[error("{0}")]
    Cancelled(&'static str),

    /// The remote did not answer a request within the wait the caller allows.
    #[error("{url}: the remote did not answer within {secs} s")]
    NoAnswer { url: String, secs: u64 },

    /// A task doing part of the work ended before it: it panicked, or the
    /// daemon was shutting down and cancelled it.
    #[error("{what} did not finish: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },

    /// The commit fence: someone else committed generation `generation`
    /// first. Nothing of ours was published; the local changes are kept.
    #[error("volume {url} moved on: generation {generation} was committed by {by} while this cache held changes made on top of generation {}; nothing was overwritten and the local changes are kept in the cache", generation - 1)]
    Conflict { url: String, generation: u64, by: String },

    /// Another host holds the writer lease (`volume::lease`).
    #[error("volume {url} is in use: {holder}")]
    LeaseHeld { url: String, holder: String },
    /// A maintenance command (gc, rollback) found the volume being
    /// written from elsewhere.
    #[error("volume {url} is in use: {detail}")]
    InUse { url: String, detail: String },
}

/// The exit status of a command that stopped on [`VolumeError::Diverged`]
/// (or a write-back conflict while serving): 78, `EX_CONFIG` in sysexits.h.
/// The systemd unit lists it in `RestartPreventExitStatus=`, so a disk
/// that needs a person's choice is not restarted every few seconds.
pub const EXIT_DIVERGED: u8 = 78;

impl VolumeError {
    /// Wraps a remote error with what was being done.
    pub fn remote(context: impl Into<String>, source: RemoteError) -> Self {
        VolumeError::Remote { context: context.into(), source: Box::new(source) }
    }

    /// Wraps a local I/O error with what and where.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        VolumeError::Io { context, path: path.into(), source }
    }

    /// For `map_err` on a joined task: what the task was doing.
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Self {
        move |source| VolumeError::Task { what, source }
    }

    /// A manifest that cannot be used, read from `bytes`: one a newer
    /// driveblk wrote ([`Newer`](Self::Newer)), else a corrupt one.
    pub fn manifest(url: &str, key: impl Into<String>, bytes: &[u8], reason: String) -> Self {
        let key = key.into();
        match super::format::newer_version(bytes, super::format::MANIFEST_MAGIC) {
            Some(v) => VolumeError::Newer { what: format!("manifest {key} of volume {url}"), detail: newer_detail(v) },
            None => VolumeError::CorruptManifest { url: url.to_string(), key, reason },
        }
    }

    /// A volume header that cannot be used, read from `bytes`: one a newer
    /// driveblk wrote ([`Newer`](Self::Newer)), else a bad one.
    pub fn header(url: &str, bytes: &[u8], reason: String) -> Self {
        match super::format::newer_version(bytes, super::format::HEADER_MAGIC) {
            Some(v) => VolumeError::Newer { what: format!("volume header {url}/volume.json"), detail: newer_detail(v) },
            None => VolumeError::BadHeader { url: url.to_string(), reason },
        }
    }

    /// Converts for the `Storage` seam, keeping this error as the source.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            VolumeError::Io { source, .. } => source.kind(),
            VolumeError::CorruptChunk { .. }
            | VolumeError::CorruptIndex { .. }
            | VolumeError::CorruptManifest { .. }
            | VolumeError::CorruptProfile { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// What a newer object's version is, next to what this binary reads.
fn newer_detail(version: u32) -> String {
    format!("format version {version}; this one reads up to {}", super::format::FORMAT_VERSION)
}
