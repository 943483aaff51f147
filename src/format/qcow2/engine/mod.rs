//! The engine: the `Disk` operations (read path and in-place write fast
//! path here; opening in `open`, allocation and zeroing in `write`,
//! metadata write-back in `flush`, telling the storage about freed
//! clusters in `release`). Lookups run under a read lock and do no
//! I/O; data I/O runs outside every metadata lock; anything that changes
//! metadata (allocation, copy-on-write, zeroing, discard, flush) holds the
//! allocation mutex, taking the metadata write lock only briefly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};

mod flush;
mod open;
mod release;
mod write;

use super::backing::BackingOpener;
use super::compressed::decompress;
use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOT_L1_BYTES, OFF_AUTOCLEAR, OFF_REFCOUNT_TABLE};
use super::l2::{
    bit_range, compressed_clusters, ClusterKind, Geometry, L2Entry, L2Table, SubState, BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZERO, COPIED, OFFSET_MASK, ZERO,
};
use super::metadata::{claim_cluster, read_l2, Extent, Layout, Meta};
use super::refcount::Refcounts;
use super::snapshot::{read_table, Snapshot};
use super::{corrupt, unsupported, Qcow2Options, DEFAULT_METADATA_PIN_BYTES, PIN_GRANULE};
use crate::format::read_mostly::{ReadGuard, ReadMostly};
use crate::format::{check_range, Disk, DiskError, DiskResult, ImageFormat, IoMode, IoVec};
use crate::tier::Storage;

/// State owned by whoever holds the allocation mutex.
#[derive(Default)]
struct AllocState {
    /// Host clusters whose last reference was dropped in memory. Their
    /// refcounts are decremented only after a flush has made the metadata
    /// that dropped them durable, so they cannot be reused too early.
    pending_free: Vec<u64>,
    /// Host clusters whose last reference is durably gone, still counted
    /// until the storage is told they are free (`release`).
    unreleased: Vec<u64>,
    /// Guest clusters whose allocating write is doing its data I/O with the
    /// mutex released; other changes to them wait on `alloc_done`.
    inflight: HashSet<u64>,
}

/// What a guest zeroing operation asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroOp {
    Discard,
    Zero { unmap: bool },
}

/// How a run of a write can proceed.
enum WriteRun {
    InPlace { host: u64 },
    NeedsLoad { l1_index: usize },
    Slow,
}

/// An open QCOW2 image.
pub struct Qcow2Disk {
    storage: Arc<dyn Storage>,
    header: Header,
    lay: Layout,
    capacity: u64,
    read_only: bool,
    backing: Option<Arc<dyn Disk>>,
    snapshots: Vec<Snapshot>,
    served_snapshot: Option<String>,
    /// Read by every request: sharded, so queues do not share its lock word.
    meta: ReadMostly<Meta>,
    alloc: Mutex<AllocState>,
    /// Signalled when an in-flight allocating write publishes its cluster.
    alloc_done: Condvar,
    /// Data I/O on clusters found by a lookup holds this shared; applying
    /// frees takes it exclusively, so no I/O still targets a cluster that is
    /// about to become reusable.
    gate: ReadMostly<()>,
    tick: AtomicU64,
    /// Most L2 tables kept in memory (`None`: all).
    cache_tables: Option<usize>,
    closed: AtomicBool,
    /// The last few inflated compressed clusters by host offset, so reading
    /// one in small pieces does not inflate it again for every piece. The
    /// engine never writes compressed data, so an entry cannot go stale.
    inflated: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

/// Inflated clusters kept per disk.
const INFLATED_CACHE: usize = 4;

impl Qcow2Disk {
    /// Internal snapshots recorded in the image.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The image's cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.lay.cluster_size()
    }

    /// The backing disk, if any.
    pub fn backing(&self) -> Option<&Arc<dyn Disk>> {
        self.backing.as_ref()
    }

    /// A recency stamp for the L2 cache; 0 ("don't track") when every table
    /// stays resident, so lookups from many queues share no counter.
    fn next_tick(&self) -> u64 {
        if self.cache_tables.is_none() {
            return 0;
        }
        self.tick.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn gate(&self, mode: IoMode) -> DiskResult<ReadGuard<'_, ()>> {
        match mode {
            IoMode::Blocking => Ok(self.gate.read()),
            IoMode::NonBlocking => self.gate.try_read().ok_or(DiskError::WouldBlock),
        }
    }

    fn check_writable(&self) -> DiskResult<()> {
        if self.read_only || self.closed.load(Ordering::Acquire) {
            Err(DiskError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn sync(&self) -> DiskResult<()> {
        self.storage.flush().map_err(|e| DiskError::io("flush", 0, e))
    }

    /// Loads L2 table `l1i` if it is not cached (blocking).
    fn load_table(&self, l1i: usize, mode: IoMode) -> DiskResult<()> {
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        let _st = self.alloc.lock();
        self.load_table_locked(l1i)
    }

    /// Same, with the allocation mutex held (which is what keeps a stale copy
    /// from replacing a table modified meanwhile).
    fn load_table_locked(&self, l1i: usize) -> DiskResult<()> {
        let table = {
            let m = self.meta.read();
            if m.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK == 0 || m.l2.contains_key(&l1i) {
                return Ok(());
            }
            read_l2(&*self.storage, &self.lay, &m, l1i, self.storage.len())?
        };
        let mut m = self.meta.write();
        if let Some(cap) = self.cache_tables {
            while m.l2.len() >= cap {
                let victim =
                    m.l2.iter()
                        .filter(|(_, t)| !t.dirty)
                        .min_by_key(|(_, t)| t.last_used.load(Ordering::Relaxed))
                        .map(|(&k, _)| k);
                match victim {
                    Some(k) => {
                        m.l2.remove(&k);
                    }
                    // Every cached table is dirty: exceed the cap until the next flush.
                    None => break,
                }
            }
        }
        table.touch(self.next_tick());
        m.l2.insert(l1i, table);
        m.checked(l1i);
        Ok(())
    }

    /// Reads guest bytes that come from the backing file (zeroes without
    /// one, and past the backing file's end).
    fn read_backing(&self, guest: u64, part: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        let n = part.len() as u64;
        match &self.backing {
            Some(b) if guest < b.capacity() => {
                let avail = (b.capacity() - guest).min(n);
                b.read(guest, &part.slice(0, avail as usize), mode)?;
                if avail < n {
                    part.fill_zero(avail as usize, (n - avail) as usize);
                }
                Ok(())
            }
            _ => {
                part.fill_zero(0, n as usize);
                Ok(())
            }
        }
    }

    fn read_backing_buf(&self, guest: u64, buf: &mut [u8]) -> DiskResult<()> {
        self.read_backing(guest, &IoVec::from_slice(buf), IoMode::Blocking)
    }

    /// Reads and inflates a whole compressed cluster.
    fn read_compressed(&self, host: u64, csize: u64, mode: IoMode) -> DiskResult<Arc<[u8]>> {
        {
            let mut cache = self.inflated.lock();
            if let Some(i) = cache.iter().position(|(h, _)| *h == host) {
                let hit = cache.remove(i);
                let data = hit.1.clone();
                cache.push(hit);
                return Ok(data);
            }
        }
        let file_len = self.storage.len();
        if host >= file_len {
            return Err(corrupt(format!("compressed cluster at {host:#x} is past the end of the file ({file_len})")));
        }
        let mut input = vec![0u8; csize as usize];
        self.storage
            .read_vectored_at(host, &IoVec::from_slice(&mut input), mode)
            .map_err(|e| DiskError::io("read compressed cluster", host, e))?;
        let mut out = vec![0u8; self.lay.cluster_size() as usize];
        decompress(self.header.compression, &input, &mut out, host)?;
        let out: Arc<[u8]> = out.into();
        let mut cache = self.inflated.lock();
        if cache.len() >= INFLATED_CACHE {
            cache.remove(0);
        }
        cache.push((host, out.clone()));
        Ok(out)
    }
}

fn read_u64s(storage: &dyn Storage, off: u64, count: usize, what: &'static str) -> DiskResult<Vec<u64>> {
    let mut buf = vec![0u8; count * 8];
    storage.read_at(off, &mut buf).map_err(|e| DiskError::io(what, off, e))?;
    Ok(buf.chunks_exact(8).map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

impl Drop for Qcow2Disk {
    /// A disk dropped without `close` is flushed best-effort, so metadata
    /// held in memory is not lost (it would be consistent either way).
    fn drop(&mut self) {
        if !self.read_only && !self.closed.load(Ordering::Acquire) {
            let mut st = self.alloc.lock();
            if let Err(e) = self.flush_locked(&mut st, false).and_then(|_| self.close_flushes(&mut st)) {
                tracing::warn!("qcow2: flush on drop failed: {e}");
            }
        }
    }
}

impl Disk for Qcow2Disk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        let len = bufs.len() as u64;
        check_range(offset, len, self.capacity)?;
        let mut pos = 0u64;
        while pos < len {
            let guest = offset + pos;
            let gate = self.gate(mode)?;
            let (extent, n) = self.meta.read().map(&self.lay, guest, len - pos, self.next_tick())?;
            let part = bufs.slice(pos as usize, n as usize);
            match extent {
                Extent::NeedsLoad { l1_index } => {
                    drop(gate);
                    self.load_table(l1_index, mode)?;
                    continue;
                }
                Extent::Zero => part.fill_zero(0, n as usize),
                Extent::Unallocated => {
                    drop(gate);
                    self.read_backing(guest, &part, mode)?;
                }
                Extent::Data { host } => {
                    let file_len = self.storage.len();
                    if host >= file_len {
                        return Err(corrupt(format!(
                            "guest offset {guest:#x} maps to {host:#x}, past the end of the file ({file_len})"
                        )));
                    }
                    self.storage
                        .read_vectored_at(host, &part, mode)
                        .map_err(|e| DiskError::io("read data", host, e))?;
                }
                Extent::Compressed { host, csize, in_cluster } => {
                    let c = self.read_compressed(host, csize, mode)?;
                    part.copy_from_slice(0, &c[in_cluster as usize..(in_cluster + n) as usize]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        self.check_writable()?;
        let len = bufs.len() as u64;
        check_range(offset, len, self.capacity)?;
        let mut pos = 0u64;
        while pos < len {
            let guest = offset + pos;
            let gate = self.gate(mode)?;
            let (run, n) = self.plan_write(guest, len - pos);
            let part = bufs.slice(pos as usize, n as usize);
            match run {
                WriteRun::InPlace { host } => {
                    self.storage
                        .write_vectored_at(host, &part, mode)
                        .map_err(|e| DiskError::io("write data", host, e))?;
                }
                WriteRun::NeedsLoad { l1_index } => {
                    drop(gate);
                    self.load_table(l1_index, mode)?;
                    continue;
                }
                WriteRun::Slow => {
                    drop(gate);
                    if mode == IoMode::NonBlocking {
                        return Err(DiskError::WouldBlock);
                    }
                    self.write_slow(guest, &part)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, mode: IoMode) -> DiskResult<()> {
        self.zero_range(offset, len, ZeroOp::Zero { unmap }, mode)
    }

    fn discard(&self, offset: u64, len: u64, mode: IoMode) -> DiskResult<()> {
        self.zero_range(offset, len, ZeroOp::Discard, mode)
    }

    fn flush(&self, mode: IoMode) -> DiskResult<()> {
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        if self.read_only {
            return Ok(());
        }
        let mut st = self.alloc.lock();
        let wrote = self.flush_locked(&mut st, true)?;
        // Before the cut, so the zeroes go up with this generation.
        let released = self.release_freed(&mut st, Some(release::FLUSH_BUDGET))?;
        let ticket = if wrote || released {
            // The image is consistent here (metadata written in order, no
            // allocation can interleave under the lock): the store may cut
            // a generation.
            self.storage.flush_point()
        } else {
            // No metadata to write: every write this FLUSH covers is in
            // storage, and its sync needs no lock, so FLUSHes arriving
            // together share one (under the lock they took one each). Later
            // allocations leave metadata dirty in memory only, so storage
            // stays consistent for the cut taken under the lock after.
            drop(st);
            self.storage.flush().map_err(|e| DiskError::io("flush", 0, e))?;
            st = self.alloc.lock();
            self.storage.cut_point()
        }
        .map_err(|e| DiskError::io("flush", 0, e))?;
        // Waiting for a remote commit happens outside the lock.
        drop(st);
        self.storage.wait_durable(ticket).map_err(|e| DiskError::io("flush", 0, e))
    }

    fn close(&self) -> DiskResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.alloc.lock();
        self.flush_locked(&mut st, false)?;
        self.close_flushes(&mut st)?;
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn discard_granularity(&self) -> u64 {
        self.lay.cluster_size()
    }

    fn describe(&self) -> String {
        format!(
            "qcow2 v{} image on {} ({} bytes, {}-byte clusters{}{}{}{})",
            self.header.version,
            self.storage.describe(),
            self.capacity,
            self.lay.cluster_size(),
            if self.lay.geo.extended { ", extended L2" } else { "" },
            match &self.header.backing_file {
                Some(b) => format!(", backing {b}"),
                None => String::new(),
            },
            match &self.served_snapshot {
                Some(s) => format!(", snapshot {s}"),
                None => String::new(),
            },
            if self.read_only { ", read-only" } else { "" }
        )
    }
}
