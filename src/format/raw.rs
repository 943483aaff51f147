//! Raw format: the virtual disk is the image file, byte for byte.

use std::sync::Arc;

use crate::format::{check_range, Disk, DiskError, DiskResult, IoMode, IoVec};
use crate::tier::Storage;

/// A raw image over any [`Storage`].
pub struct RawDisk {
    storage: Arc<dyn Storage>,
    capacity: u64,
    read_only: bool,
}

impl RawDisk {
    /// Serves `storage` as a raw disk. The capacity is the file length rounded
    /// down to whole 512-byte sectors (as QEMU does).
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> DiskResult<Self> {
        let capacity = storage.len() & !511;
        if capacity == 0 {
            return Err(DiskError::Corrupt(format!(
                "{}: image is smaller than one 512-byte sector",
                storage.describe()
            )));
        }
        let read_only = read_only || storage.read_only();
        Ok(Self { storage, capacity, read_only })
    }

    fn check_writable(&self) -> DiskResult<()> {
        if self.read_only {
            Err(DiskError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Disk for RawDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        check_range(offset, bufs.len() as u64, self.capacity)?;
        self.storage.read_vectored_at(offset, bufs, mode).map_err(|e| DiskError::io("read", offset, e))
    }

    fn write(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        self.check_writable()?;
        check_range(offset, bufs.len() as u64, self.capacity)?;
        self.storage.write_vectored_at(offset, bufs, mode).map_err(|e| DiskError::io("write", offset, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool, mode: IoMode) -> DiskResult<()> {
        self.check_writable()?;
        check_range(offset, len, self.capacity)?;
        // fallocate may wait on the filesystem journal: keep it off the queue thread.
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        self.storage.write_zeroes_at(offset, len).map_err(|e| DiskError::io("write-zeroes", offset, e))
    }

    fn discard(&self, offset: u64, len: u64, mode: IoMode) -> DiskResult<()> {
        // For a raw file, discarding is punching a hole: it reads back as zeroes.
        self.write_zeroes(offset, len, true, mode)
    }

    fn flush(&self, mode: IoMode) -> DiskResult<()> {
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        let ticket = self.storage.flush_point().map_err(|e| DiskError::io("flush", 0, e))?;
        self.storage.wait_durable(ticket).map_err(|e| DiskError::io("flush", 0, e))
    }

    fn describe(&self) -> String {
        format!(
            "raw image on {} ({} bytes{})",
            self.storage.describe(),
            self.capacity,
            if self.read_only { ", read-only" } else { "" }
        )
    }
}
