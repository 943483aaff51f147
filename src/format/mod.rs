//! Format layer: turns a guest's virtual-disk offsets into image-file offsets
//! (raw: identity; qcow2: L1/L2 translation) and does the I/O through a
//! [`Storage`](crate::tier::Storage), so the bytes can come from a local file
//! or from the tiered RAM/SSD/remote store alike.

pub mod error;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod read_mostly;

use std::fmt;
use std::str::FromStr;

pub use error::{DiskError, DiskResult};
// The buffers and the blocking mode are the storage's (the tier layer,
// below this one); the format layer hands them through.
pub use crate::tier::iovec;
pub use crate::tier::{IoMode, IoVec};

/// The virtual disk a guest sees, in bytes.
///
/// Implementations must be safe to call from many threads at once: one per
/// virtqueue plus the I/O workers.
pub trait Disk: Send + Sync {
    /// Size of the virtual disk in bytes (a multiple of 512).
    fn capacity(&self) -> u64;

    /// True if writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;

    /// Reads `bufs.len()` bytes starting at `offset`.
    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()>;

    /// Writes `bufs.len()` bytes starting at `offset`.
    fn write(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()>;

    /// Makes `[offset, offset + len)` read as zeroes. With `unmap` the
    /// implementation may also release the space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, mode: IoMode) -> DiskResult<()>;

    /// Tells the disk the range's contents are no longer needed. After a
    /// discard the range reads as zeroes or as its old contents; never as
    /// anything else (and never as a backing file's data that was overwritten).
    fn discard(&self, offset: u64, len: u64, mode: IoMode) -> DiskResult<()>;

    /// Makes every completed write durable (data and metadata).
    fn flush(&self, mode: IoMode) -> DiskResult<()>;

    /// Flushes and marks the image cleanly closed. Called once at shutdown.
    fn close(&self) -> DiskResult<()> {
        self.flush(IoMode::Blocking)
    }

    /// Preferred discard granularity in bytes (the cluster size for qcow2).
    fn discard_granularity(&self) -> u64 {
        4096
    }

    /// Human-readable one-line description for logs and `info`.
    fn describe(&self) -> String;
}

/// Checks that `[offset, offset + len)` lies within `capacity`.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> DiskResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, capacity }),
    }
}

/// The image format, always given by the user: never guessed from the
/// contents, because a raw guest can write a qcow2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(format!("unknown image format {other:?} (expected raw or qcow2)")),
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}
