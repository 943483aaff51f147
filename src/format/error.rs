//! The format layer's error: a stable kind plus the context that locates it.

use std::io;

/// Why a disk operation failed. The vhost layer maps this to a virtio status
/// in exactly one place (`vhost::request::status_for`).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The operation was asked not to block and would have; retry it on a
    /// blocking worker. Never reaches the guest.
    #[error("operation would block")]
    WouldBlock,
    /// The request reaches past the end of the virtual disk.
    #[error("access beyond end of disk: offset {offset} length {len}, capacity {capacity}")]
    OutOfRange { offset: u64, len: u64, capacity: u64 },
    /// A write to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// A feature of the image (or a request) that is not supported; the
    /// message says which, and what to do instead.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The image's metadata is inconsistent; the affected request fails, the
    /// rest of the disk keeps working.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// An I/O error from the storage below, with the operation and image-file
    /// offset it happened at.
    #[error("{op} at image offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl DiskError {
    /// Wraps a storage error, turning `WouldBlock` into [`DiskError::WouldBlock`].
    pub fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::WouldBlock {
            DiskError::WouldBlock
        } else {
            DiskError::Io { op, offset, source }
        }
    }

    /// True for [`DiskError::WouldBlock`].
    pub fn is_would_block(&self) -> bool {
        matches!(self, DiskError::WouldBlock)
    }
}

/// Result alias for disk operations.
pub type DiskResult<T> = Result<T, DiskError>;
