//! Tier layer: where the image file's bytes live. [`Storage`] is the seam the
//! format layer reads and writes through; [`LocalFile`] serves a plain local
//! file, and the tiered RAM/SSD/remote store implements the same trait.

pub mod boot;
pub mod cache_crypto;
pub mod dirty_pages;
pub mod export;
pub mod fleet;
pub mod fork;
pub mod iovec;
pub mod journal;
pub mod local;
pub mod open;
pub mod pins;
pub mod qemu_lock;
pub mod ram;
pub mod readahead;
pub mod single_flight;
pub mod ssd;
pub mod stats;
pub mod tiered;

use std::io;

pub use export::{export, ExportOptions, ExportSummary};
pub use fork::{discard_local, fork, Forked};
pub use iovec::IoVec;
pub use local::LocalFile;
pub use open::{cache_dir_for, open_volume, CacheOptions, LeaseMode};
pub use stats::TierStats;
pub use tiered::TieredStore;

/// Whether an operation may block the calling thread.
///
/// The vhost queue workers first try every request with `NonBlocking`, so
/// hits (page cache, RAM tier, metadata in memory) complete inline. An
/// operation that would have to wait (a cache miss, a remote fetch, a cluster
/// allocation) returns `WouldBlock` instead and is re-run with
/// `Blocking` on an I/O worker; requests behind it keep flowing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    NonBlocking,
    Blocking,
}

/// Byte-addressable storage holding one image file.
///
/// All methods take `&self` and must be safe to call from many threads at
/// once; positioned I/O only, never a shared seek offset.
pub trait Storage: Send + Sync {
    /// Current length of the image file in bytes.
    fn len(&self) -> u64;

    /// True when the file is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if the storage refuses writes.
    fn read_only(&self) -> bool;

    /// Reads `bufs.len()` bytes at `offset`. Bytes at or past the end of the
    /// file read as zeroes. With [`IoMode::NonBlocking`] the call returns an
    /// error of kind `WouldBlock` instead of waiting for slow media.
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()>;

    /// Writes `bufs.len()` bytes at `offset`, growing the file if needed.
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes, releasing the space
    /// where the storage can (hole punching). Does not change the length.
    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Tells the storage nothing will read `[offset, offset + len)` before
    /// writing it again (a qcow2 cluster freed): it releases the space as
    /// it can, after which the range reads as zeroes or, where it could not
    /// release it cheaply, as before. By default the range is zeroed (a
    /// volume's chunks that end up all zero then cost nothing).
    fn discard_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes_at(offset, len)
    }

    /// Sets the file length (truncate or extend with zeroes).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes all completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// A guest FLUSH point: every write the guest had completed, and the
    /// format's metadata, are in storage now, so the image is consistent.
    /// Makes it durable as [`flush`](Self::flush) does, and lets a store
    /// that uploads generations cut one here. Returns a ticket for
    /// [`wait_durable`](Self::wait_durable).
    fn flush_point(&self) -> io::Result<u64> {
        self.flush().map(|_| 0)
    }

    /// [`flush_point`](Self::flush_point) for a caller that has just made
    /// the guest's writes durable with [`flush`](Self::flush) (outside its
    /// own locks, so concurrent FLUSHes share one sync) and holds the
    /// format consistent now: only the store's cut, if one is due.
    fn cut_point(&self) -> io::Result<u64> {
        Ok(0)
    }

    /// Waits until the flush point `ticket` is as durable as the store's
    /// cache mode promises (writethrough: committed on the remote). Called
    /// without the format's locks held.
    fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        let _ = ticket;
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`, blocking (metadata path).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_vectored_at(offset, &IoVec::from_slice(buf), IoMode::Blocking)
    }

    /// Writes all of `buf` at `offset`, blocking (metadata path).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        // The IoVec API is shared with reads and so takes a mutable view; a
        // write only ever reads from it, so copying to a scratch Vec would be
        // wasted work. Build the vector from the raw pointer instead.
        let mut v = IoVec::new();
        // SAFETY: the storage only reads through a vector passed to a write,
        // and `buf` outlives the call.
        unsafe { v.push_raw(buf.as_ptr() as *mut u8, buf.len()) };
        self.write_vectored_at(offset, &v, IoMode::Blocking)
    }

    /// Declares `ranges` of the file to be metadata (qcow2 header, L1/L2 and
    /// refcount tables): a tiered store fetches them now, in parallel, and
    /// keeps them resident so no guest request waits on a remote round trip
    /// for metadata. Callers still read them normally afterwards. Local
    /// storage ignores it.
    fn hint_metadata(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<()> {
        let _ = ranges;
        Ok(())
    }

    /// Declares `ranges` as metadata the format will want soon but need not
    /// wait for (qcow2 L2 tables): a tiered store pins what is local now and
    /// fetches the rest in the background, behind guest misses. Returns true
    /// while some of it is still on its way; the caller then reads those
    /// tables on demand (a read of one joins its fetch) instead of all at
    /// open. By default the same as [`hint_metadata`](Self::hint_metadata).
    fn prefetch_metadata(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<bool> {
        self.hint_metadata(ranges).map(|_| false)
    }

    /// One-line description for logs.
    fn describe(&self) -> String;
}
