//! The engine: opening an image (validation, metadata hint, loading every
//! table) and the `Disk` operations. Lookups run under a read lock and do no
//! I/O; data I/O runs outside every metadata lock; anything that changes
//! metadata (allocation, copy-on-write, zeroing, discard, flush) holds the
//! allocation mutex, taking the metadata write lock only briefly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use super::backing::BackingOpener;
use super::compressed::decompress;
use super::header::{Header, MAX_L1_BYTES, OFF_AUTOCLEAR, OFF_REFCOUNT_TABLE};
use super::l2::{
    bit_range, compressed_clusters, ClusterKind, Geometry, L2Entry, L2Table, SubState, BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZERO, COPIED, OFFSET_MASK, ZERO,
};
use super::metadata::{claim_cluster, read_l2, Extent, Layout, Meta};
use super::refcount::Refcounts;
use super::snapshot::{read_table, Snapshot};
use super::{corrupt, unsupported, Qcow2Options};
use crate::format::{check_range, Disk, DiskError, DiskResult, ImageFormat, IoMode, IoVec};
use crate::tier::Storage;

/// State owned by whoever holds the allocation mutex.
#[derive(Default)]
struct AllocState {
    /// Host clusters whose last reference was dropped in memory. Their
    /// refcounts are decremented only after a flush has made the metadata
    /// that dropped them durable, so they cannot be reused too early.
    pending_free: Vec<u64>,
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
    meta: RwLock<Meta>,
    alloc: Mutex<AllocState>,
    /// Signalled when an in-flight allocating write publishes its cluster.
    alloc_done: Condvar,
    /// Data I/O on clusters found by a lookup holds this shared; applying
    /// frees takes it exclusively, so no I/O still targets a cluster that is
    /// about to become reusable.
    gate: RwLock<()>,
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
    /// Opens a qcow2 image stored in `storage`. `backing` resolves the
    /// backing file, if the image has one.
    pub fn open(storage: Arc<dyn Storage>, opts: Qcow2Options, backing: &dyn BackingOpener) -> DiskResult<Self> {
        let header = Header::read(&*storage)?;
        let file_len = storage.len();
        let cs = header.cluster_size();
        let read_only = opts.read_only || storage.read_only() || opts.snapshot.is_some();
        if !read_only && header.corrupt_bit() {
            return Err(unsupported(
                "image is marked corrupt; repair it with `qemu-img check -r all` or open it read-only".into(),
            ));
        }
        let geo = Geometry { cluster_bits: header.cluster_bits, extended: header.extended_l2() };
        let lay = Layout { geo, l2_entries: header.l2_entries() };

        // First hint: the tables whose contents say where everything else is.
        let l1_bytes = u64::from(header.l1_size) * 8;
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        let mut hint = vec![
            0..cs.min(file_len),
            header.l1_table_offset..header.l1_table_offset + l1_bytes,
            header.refcount_table_offset..header.refcount_table_offset + rt_bytes,
        ];
        if header.nb_snapshots > 0 {
            hint.push(header.snapshots_offset..header.snapshots_offset + u64::from(header.nb_snapshots) * 40);
        }
        storage.hint_metadata(&hint).map_err(|e| DiskError::io("hint metadata", 0, e))?;
        let (snapshots, _) = read_table(&*storage, header.snapshots_offset, header.nb_snapshots)?;

        // The L1 table served: the active one, or a snapshot's.
        let (l1_offset, l1_size, size, served_snapshot) = match &opts.snapshot {
            None => (header.l1_table_offset, header.l1_size, header.size, None),
            Some(sel) => {
                let s = snapshots
                    .iter()
                    .find(|s| &s.id == sel)
                    .or_else(|| snapshots.iter().find(|s| &s.name == sel))
                    .ok_or_else(|| unsupported(format!("no internal snapshot with id or name {sel:?}")))?;
                let size = s.disk_size.unwrap_or(header.size);
                let per_l1 = cs * lay.l2_entries;
                if u64::from(s.l1_size) * 8 > MAX_L1_BYTES || u64::from(s.l1_size) < size.div_ceil(per_l1) {
                    return Err(corrupt(format!(
                        "snapshot {:?}: L1 size {} invalid for {size} bytes",
                        s.name, s.l1_size
                    )));
                }
                super::header::check_table(
                    "snapshot L1 table",
                    s.l1_table_offset,
                    u64::from(s.l1_size) * 8,
                    cs,
                    file_len,
                )?;
                (s.l1_table_offset, s.l1_size, size, Some(s.name.clone()))
            }
        };
        let l1 = read_u64s(&*storage, l1_offset, l1_size as usize, "read L1 table")?;

        let mut metadata_clusters = HashSet::new();
        metadata_clusters.insert(0u64);
        for c in 0..l1_bytes.div_ceil(cs) {
            metadata_clusters.insert(l1_offset + c * cs);
        }
        for c in 0..u64::from(header.refcount_table_clusters) {
            metadata_clusters.insert(header.refcount_table_offset + c * cs);
        }
        let refs = if read_only {
            None
        } else {
            let table =
                read_u64s(&*storage, header.refcount_table_offset, (rt_bytes / 8) as usize, "read refcount table")?;
            Some(Refcounts::new(
                header.cluster_bits,
                header.refcount_order,
                table,
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters),
            ))
        };

        // Snapshots' tables are metadata too: data must not point into them.
        let mut snapshot_l1s = Vec::new();
        let mut snapshot_table_bytes = 0;
        if !read_only {
            let (_, table_bytes) = read_table(&*storage, header.snapshots_offset, header.nb_snapshots)?;
            snapshot_table_bytes = table_bytes;
            for c in 0..table_bytes.div_ceil(cs) {
                metadata_clusters.insert(header.snapshots_offset + c * cs);
            }
            for s in &snapshots {
                let bytes = u64::from(s.l1_size) * 8;
                if bytes > MAX_L1_BYTES {
                    return Err(corrupt(format!("snapshot {:?}: L1 table too large", s.name)));
                }
                super::header::check_table("snapshot L1 table", s.l1_table_offset, bytes, cs, file_len)?;
                for c in 0..bytes.div_ceil(cs) {
                    // Each snapshot has its own L1 copy; sharing would also
                    // let a hostile image multiply what we read.
                    if !metadata_clusters.insert(s.l1_table_offset + c * cs) {
                        return Err(corrupt(format!("snapshot {:?}: L1 table overlaps other metadata", s.name)));
                    }
                }
                snapshot_l1s.push(read_u64s(
                    &*storage,
                    s.l1_table_offset,
                    s.l1_size as usize,
                    "read snapshot L1 table",
                )?);
            }
        }

        // Second hint: every L2 table and refcount block, now that we know them.
        let mut ranges = Vec::new();
        let mut l2_count = 0usize;
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if i as u64 * lay.l2_entries * cs >= size {
                // Entries past the disk end are never used; QEMU ignores them too.
                continue;
            }
            claim_cluster("L2 table", i, off, cs, file_len, &mut metadata_clusters)?;
            ranges.push(off..off + cs);
            l2_count += 1;
        }
        for l1 in &snapshot_l1s {
            for &e in l1 {
                let off = e & OFFSET_MASK;
                // Shared with the active L1 or another snapshot: legitimate.
                if off != 0 && off % cs == 0 && metadata_clusters.insert(off) {
                    ranges.push(off..off + cs);
                }
            }
        }
        if let Some(r) = &refs {
            for (i, &e) in r.table.iter().enumerate() {
                if e == 0 {
                    continue;
                }
                claim_cluster("refcount block", i, e, cs, file_len, &mut metadata_clusters)?;
                ranges.push(e..e + cs);
            }
        }
        storage.hint_metadata(&ranges).map_err(|e| DiskError::io("hint metadata", 0, e))?;

        let mut meta = Meta { l1, l1_offset, l1_dirty: false, l2: Default::default(), refs, metadata_clusters };
        if let Some(r) = meta.refs.as_mut() {
            for i in 0..r.table.len() {
                let off = r.table[i];
                if off != 0 {
                    let mut buf = vec![0u8; cs as usize];
                    storage.read_at(off, &mut buf).map_err(|e| DiskError::io("read refcount block", off, e))?;
                    r.set_block(i, buf.into());
                }
            }
        }
        if header.dirty() && !read_only {
            // QEMU crashed with lazy refcounts: the counts on disk may lag.
            if let Some(r) = meta.refs.as_mut() {
                let input = super::repair::RepairInput {
                    storage: &*storage,
                    header: &header,
                    lay,
                    l1: &mut meta.l1,
                    snapshots: &snapshots,
                    snapshot_l1s: &snapshot_l1s,
                    snapshot_table_bytes,
                };
                super::repair::rebuild_refcounts(input, r)?;
            }
        }
        let cache_tables = opts.metadata_cache_bytes.map(|b| ((b / cs) as usize).max(4));
        if cache_tables.is_none_or(|cap| l2_count <= cap) {
            for i in 0..meta.l1.len() {
                if meta.l1[i] & OFFSET_MASK != 0 && (i as u64 * lay.l2_entries * cs) < size {
                    let t = read_l2(&*storage, &lay, &meta, i, file_len)?;
                    meta.l2.insert(i, t);
                }
            }
        }

        let backing = match &header.backing_file {
            None => None,
            Some(name) => {
                let fmt = match header.backing_format.as_deref() {
                    None => None,
                    Some("raw") => Some(ImageFormat::Raw),
                    Some("qcow2") => Some(ImageFormat::Qcow2),
                    Some(other) => return Err(unsupported(format!("backing file format {other:?} is not supported"))),
                };
                Some(backing.open_backing(name, fmt)?)
            }
        };

        if !read_only && header.autoclear != 0 {
            // We do not maintain bitmaps or other autoclear features: clearing
            // the bits tells QEMU they are stale, as the spec requires.
            storage
                .write_at(OFF_AUTOCLEAR, &[0u8; 8])
                .map_err(|e| DiskError::io("clear autoclear bits", OFF_AUTOCLEAR, e))?;
            storage.flush().map_err(|e| DiskError::io("flush", 0, e))?;
        }

        Ok(Self {
            storage,
            lay,
            capacity: size & !511,
            read_only,
            backing,
            snapshots,
            served_snapshot,
            meta: RwLock::new(meta),
            alloc: Mutex::new(AllocState::default()),
            alloc_done: Condvar::new(),
            gate: RwLock::new(()),
            tick: AtomicU64::new(0),
            cache_tables,
            closed: AtomicBool::new(false),
            inflated: Mutex::new(Vec::new()),
            header,
        })
    }

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

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    fn gate(&self, mode: IoMode) -> DiskResult<RwLockReadGuard<'_, ()>> {
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

    /// Finds how the write run at `guest` (at most `max` bytes) can proceed.
    fn plan_write(&self, guest: u64, max: u64) -> (WriteRun, u64) {
        let lay = &self.lay;
        let cs = lay.cluster_size();
        let scs = lay.geo.subcluster_size();
        let m = self.meta.read();
        let (l1i, l2i, in_cluster) = lay.split(guest);
        let first_len = max.min(cs - in_cluster);
        let entry = match m.entry(lay, l1i, l2i) {
            Err(l1_index) => return (WriteRun::NeedsLoad { l1_index }, first_len),
            Ok(None) => return (WriteRun::Slow, first_len),
            Ok(Some(e)) => e,
        };
        let sc0 = (in_cluster / scs) as u32;
        let sc1 = ((in_cluster + first_len - 1) / scs) as u32;
        if !entry.writable_in_place(&lay.geo, sc0, sc1) {
            return (WriteRun::Slow, first_len);
        }
        let host = (entry.word & OFFSET_MASK) + in_cluster;
        // Extend over following clusters of the same table that are
        // contiguous on the host and writable in place.
        let mut len = first_len;
        let mut idx = l2i + 1;
        while len < max && (idx as u64) < lay.l2_entries {
            let Ok(Some(e)) = m.entry(lay, l1i, idx) else { break };
            let take = (max - len).min(cs);
            let last = ((take - 1) / scs) as u32;
            if !e.writable_in_place(&lay.geo, 0, last) || (e.word & OFFSET_MASK) != host + len {
                break;
            }
            len += take;
            idx += 1;
        }
        (WriteRun::InPlace { host }, len)
    }

    /// Makes sure L2 table `l1i` exists (allocating an empty one), with the
    /// allocation mutex held. Returns the refcounts' owner for chaining.
    /// Also copies a table shared with an internal snapshot (L1 entry
    /// without COPIED) before it is changed; the data clusters it points at
    /// already count the snapshot's reference, so only the table moves.
    fn ensure_l2(&self, st: &mut AllocState, m: &mut Meta, l1i: usize) -> DiskResult<()> {
        let cur = m.l1[l1i] & OFFSET_MASK;
        if cur != 0 {
            if !m.l2.contains_key(&l1i) {
                return Err(corrupt(format!("L2 table {l1i} not loaded")));
            }
            if m.l1[l1i] & COPIED == 0 {
                let refs = m.refs.as_mut().ok_or(DiskError::ReadOnly)?;
                let off = refs.alloc_cluster()?;
                let copy = match m.l2.get(&l1i) {
                    Some(t) => L2Table::from_words(t.words.clone()),
                    None => return Err(corrupt(format!("L2 table {l1i} not loaded"))),
                };
                m.l2.insert(l1i, copy);
                m.l1[l1i] = off | COPIED;
                m.l1_dirty = true;
                // The snapshot keeps the old table; drop our reference once
                // the L1 entry pointing at the copy is durable.
                st.pending_free.push(cur);
            }
            return Ok(());
        }
        let refs = m.refs.as_mut().ok_or(DiskError::ReadOnly)?;
        let off = refs.alloc_cluster()?;
        m.l1[l1i] = off | COPIED;
        m.l1_dirty = true;
        m.l2.insert(l1i, L2Table::zeroed(self.lay.cluster_size()));
        Ok(())
    }

    /// Queues the host clusters an entry references for freeing.
    fn free_entry(&self, st: &mut AllocState, e: &L2Entry) {
        match e.kind(&self.lay.geo) {
            ClusterKind::None => {}
            ClusterKind::Allocated { host, .. } => st.pending_free.push(host),
            ClusterKind::Compressed { host, csize } => {
                st.pending_free.extend(compressed_clusters(host, csize, self.lay.cluster_size()))
            }
        }
    }

    fn write_host(&self, host: u64, data: &IoVec<'_>) -> DiskResult<()> {
        self.storage.write_vectored_at(host, data, IoMode::Blocking).map_err(|e| DiskError::io("write data", host, e))
    }

    fn write_host_buf(&self, host: u64, buf: &[u8]) -> DiskResult<()> {
        self.storage.write_at(host, buf).map_err(|e| DiskError::io("write data", host, e))
    }

    /// Takes the allocation mutex once no allocating write to guest cluster
    /// `gc` is in flight.
    fn lock_cluster(&self, gc: u64) -> MutexGuard<'_, AllocState> {
        let mut st = self.alloc.lock();
        while st.inflight.contains(&gc) {
            self.alloc_done.wait(&mut st);
        }
        st
    }

    /// Writes `data` at `guest`, within one cluster, allocating or copying
    /// as needed. The decision and the allocation happen under the mutex;
    /// the data I/O (which may read the backing file) runs without it, with
    /// the guest cluster marked in flight; the L2 entry is published after.
    fn write_slow(&self, guest: u64, data: &IoVec<'_>) -> DiskResult<()> {
        let lay = self.lay;
        let geo = lay.geo;
        let cs = lay.cluster_size();
        let scs = geo.subcluster_size();
        let (l1i, l2i, in_cluster) = lay.split(guest);
        let gc = guest / cs;
        let n = data.len() as u64;
        debug_assert!(n > 0 && in_cluster + n <= cs);
        let mut st = self.lock_cluster(gc);
        self.load_table_locked(l1i)?;
        let e = match self.meta.read().entry(&lay, l1i, l2i) {
            Ok(e) => e.unwrap_or_default(),
            Err(_) => return Err(corrupt(format!("L2 table {l1i} vanished"))),
        };
        let sc0 = (in_cluster / scs) as u32;
        let sc1 = ((in_cluster + n - 1) / scs) as u32;
        if e.writable_in_place(&geo, sc0, sc1) {
            // Another request allocated it meanwhile: write like the fast path.
            drop(st);
            let _g = self.gate.read();
            return self.write_host((e.word & OFFSET_MASK) + in_cluster, data);
        }
        let kind = e.kind(&geo);
        let compressed = matches!(kind, ClusterKind::Compressed { .. });
        let shared = matches!(kind, ClusterKind::Allocated { copied: false, .. });
        // Subclusters to write: the whole cluster, unless we keep the
        // cluster and only fill in some of its subclusters.
        let (s0, s1) = if geo.extended && !compressed && !shared { (sc0, sc1) } else { (0, geo.subclusters() - 1) };

        let (host, fresh) = match kind {
            ClusterKind::Allocated { host, copied: true } => (host, false),
            _ => {
                let mut m = self.meta.write();
                self.ensure_l2(&mut st, &mut m, l1i)?;
                let refs = m.refs.as_mut().ok_or(DiskError::ReadOnly)?;
                (refs.alloc_cluster()?, true)
            }
        };
        st.inflight.insert(gc);
        drop(st);
        let res = self.fill_and_write(guest - in_cluster, &e, host, fresh, s0, s1, in_cluster, data);
        let mut st = self.alloc.lock();
        st.inflight.remove(&gc);
        self.alloc_done.notify_all();
        if let Err(err) = res {
            if fresh {
                // Nothing references it: a flush meanwhile may have recorded
                // refcount 1 on disk, which is only a leak until the next one.
                let mut m = self.meta.write();
                if let Some(refs) = m.refs.as_mut() {
                    let _ = refs.adjust(host, -1);
                }
            }
            return Err(err);
        }
        let mut new = L2Entry { word: host | COPIED, bitmap: 0 };
        if geo.extended {
            let range = bit_range(s0, s1);
            new.bitmap = if compressed || shared { BITMAP_ALL_ALLOC } else { (e.bitmap | range) & !(range << 32) };
        }
        // A flush meanwhile may have evicted the (then clean) table.
        self.load_table_locked(l1i)?;
        let mut m = self.meta.write();
        self.ensure_l2(&mut st, &mut m, l1i)?;
        let table = m.l2.get_mut(&l1i).ok_or_else(|| corrupt(format!("L2 table {l1i} vanished")))?;
        table.set_entry(&geo, l2i, new);
        drop(m);
        if fresh {
            self.free_entry(&mut st, &e);
        }
        Ok(())
    }

    /// Writes subclusters `s0..=s1` of a cluster at `host`: new data where
    /// given, the old contents (backing, zeroes, old or decompressed data)
    /// around it. Subclusters already allocated in place get only the new
    /// bytes, so concurrent in-place writers to them are not undone.
    #[allow(clippy::too_many_arguments)]
    fn fill_and_write(
        &self,
        cluster_guest: u64,
        old: &L2Entry,
        host: u64,
        fresh: bool,
        s0: u32,
        s1: u32,
        in_cluster: u64,
        data: &IoVec<'_>,
    ) -> DiskResult<()> {
        let geo = self.lay.geo;
        let scs = geo.subcluster_size();
        let n = data.len() as u64;
        let mut inflated: Option<Arc<[u8]>> = None;
        let mut sc = s0;
        while sc <= s1 {
            let start = u64::from(sc) * scs;
            let end = start + scs;
            let d0 = in_cluster.max(start);
            let d1 = (in_cluster + n).min(end);
            let state = old.sub_state(&geo, sc).map_err(|m| corrupt(format!("guest {cluster_guest:#x}: {m}")))?;
            if !fresh && matches!(state, SubState::Data { .. }) {
                if d0 < d1 {
                    self.write_host(host + d0, &data.slice((d0 - in_cluster) as usize, (d1 - d0) as usize))?;
                }
                sc += 1;
                continue;
            }
            if d0 == start && d1 == end {
                // Fully overwritten: coalesce with following fully covered subclusters.
                let mut last = sc;
                while last < s1 && in_cluster + n >= u64::from(last + 2) * scs {
                    let st =
                        old.sub_state(&geo, last + 1).map_err(|m| corrupt(format!("guest {cluster_guest:#x}: {m}")))?;
                    if !fresh && matches!(st, SubState::Data { .. }) {
                        break;
                    }
                    last += 1;
                }
                let bytes = u64::from(last - sc + 1) * scs;
                self.write_host(host + start, &data.slice((start - in_cluster) as usize, bytes as usize))?;
                sc = last + 1;
                continue;
            }
            let mut buf = vec![0u8; scs as usize];
            match state {
                SubState::Zero => {}
                SubState::Unallocated => self.read_backing_buf(cluster_guest + start, &mut buf)?,
                SubState::Data { host: h } => {
                    self.storage.read_at(h, &mut buf).map_err(|e| DiskError::io("read for copy-on-write", h, e))?
                }
                SubState::Compressed { host: h, csize } => {
                    if inflated.is_none() {
                        inflated = Some(self.read_compressed(h, csize, IoMode::Blocking)?);
                    }
                    if let Some(c) = &inflated {
                        buf.copy_from_slice(&c[start as usize..end as usize]);
                    }
                }
            }
            if d0 < d1 {
                data.copy_to_slice((d0 - in_cluster) as usize, &mut buf[(d0 - start) as usize..(d1 - start) as usize]);
            }
            self.write_host_buf(host + start, &buf)?;
            sc += 1;
        }
        Ok(())
    }

    /// True if every subcluster touched by `[in_cluster, in_cluster+n)`
    /// already reads as zeroes.
    fn reads_zero(&self, e: &Option<L2Entry>, in_cluster: u64, n: u64) -> bool {
        let geo = self.lay.geo;
        let scs = geo.subcluster_size();
        let e = e.unwrap_or_default();
        let sc0 = (in_cluster / scs) as u32;
        let sc1 = ((in_cluster + n - 1) / scs) as u32;
        (sc0..=sc1).all(|sc| match e.sub_state(&geo, sc) {
            Ok(SubState::Zero) => true,
            Ok(SubState::Unallocated) => self.backing.is_none(),
            _ => false,
        })
    }

    fn zero_range(&self, offset: u64, len: u64, op: ZeroOp, mode: IoMode) -> DiskResult<()> {
        self.check_writable()?;
        check_range(offset, len, self.capacity)?;
        if len == 0 {
            return Ok(());
        }
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        let cs = self.lay.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cstart = pos & !(cs - 1);
            let cend = cstart + cs;
            let seg_end = end.min(cend);
            // The tail of the last cluster past the disk end is invisible, so
            // a range reaching the disk end covers its cluster.
            let full = pos == cstart && (seg_end == cend || seg_end == self.capacity);
            if full {
                self.zero_cluster(cstart, op)?;
            } else {
                self.zero_partial(pos, seg_end - pos, op)?;
            }
            pos = seg_end;
        }
        Ok(())
    }

    fn zero_cluster(&self, cstart: u64, op: ZeroOp) -> DiskResult<()> {
        let lay = self.lay;
        let geo = lay.geo;
        let (l1i, l2i, _) = lay.split(cstart);
        let mut st = self.lock_cluster(cstart / lay.cluster_size());
        self.load_table_locked(l1i)?;
        let cur = self.meta.read().entry(&lay, l1i, l2i).map_err(|_| corrupt(format!("L2 table {l1i} vanished")))?;
        let e = cur.unwrap_or_default();
        let kind = e.kind(&geo);
        let backing = self.backing.is_some();
        if kind == ClusterKind::None && self.reads_zero(&cur, 0, lay.cluster_size()) {
            // Already zero with nothing to free: do not allocate an L2 table
            // just to say so.
            return Ok(());
        }
        let keep = matches!(kind, ClusterKind::Allocated { copied: true, .. });
        let new = if geo.extended {
            match op {
                ZeroOp::Discard if !backing => L2Entry::default(),
                ZeroOp::Zero { unmap: false } if keep => L2Entry { word: e.word, bitmap: BITMAP_ALL_ZERO },
                _ => L2Entry { word: 0, bitmap: BITMAP_ALL_ZERO },
            }
        } else if self.header.version >= 3 {
            match op {
                ZeroOp::Discard if !backing => L2Entry::default(),
                ZeroOp::Zero { unmap: false } if keep => L2Entry { word: e.word | ZERO, bitmap: 0 },
                _ => L2Entry { word: ZERO, bitmap: 0 },
            }
        } else if !backing {
            // v2 has no zero flag, but without a backing file unallocated
            // clusters read as zeroes.
            L2Entry::default()
        } else {
            match op {
                // Old contents are an allowed result of a discard.
                ZeroOp::Discard => return Ok(()),
                ZeroOp::Zero { .. } => {
                    if self.reads_zero(&cur, 0, lay.cluster_size()) {
                        return Ok(());
                    }
                    drop(st);
                    let mut zeroes = vec![0u8; lay.cluster_size() as usize];
                    return self.write_slow(cstart, &IoVec::from_slice(&mut zeroes));
                }
            }
        };
        if cur.is_none() && new == L2Entry::default() || cur == Some(new) {
            return Ok(());
        }
        let mut m = self.meta.write();
        self.ensure_l2(&mut st, &mut m, l1i)?;
        let table = m.l2.get_mut(&l1i).ok_or_else(|| corrupt(format!("L2 table {l1i} vanished")))?;
        table.set_entry(&geo, l2i, new);
        drop(m);
        let kept = new.word & OFFSET_MASK != 0 && new.word & OFFSET_MASK == e.word & OFFSET_MASK;
        if !kept {
            self.free_entry(&mut st, &e);
        }
        Ok(())
    }

    fn zero_partial(&self, guest: u64, n: u64, op: ZeroOp) -> DiskResult<()> {
        if op == ZeroOp::Discard {
            // Partial clusters keep their data (as in QEMU): allowed by the
            // discard contract and cheaper than copy-on-write.
            return Ok(());
        }
        let lay = self.lay;
        let geo = lay.geo;
        let scs = geo.subcluster_size();
        let (l1i, l2i, in_cluster) = lay.split(guest);
        let mut st = self.lock_cluster(guest / lay.cluster_size());
        self.load_table_locked(l1i)?;
        let cur = self.meta.read().entry(&lay, l1i, l2i).map_err(|_| corrupt(format!("L2 table {l1i} vanished")))?;
        if self.reads_zero(&cur, in_cluster, n) {
            return Ok(());
        }
        let e = cur.unwrap_or_default();
        let kind = e.kind(&geo);
        // Extended L2: whole subclusters become zero by their bitmap bit.
        let fs0 = in_cluster.div_ceil(scs);
        let fs1 = (in_cluster + n) / scs; // exclusive
        if geo.extended
            && fs0 < fs1
            && !matches!(kind, ClusterKind::Compressed { .. } | ClusterKind::Allocated { copied: false, .. })
        {
            let range = bit_range(fs0 as u32, fs1 as u32 - 1);
            let new = L2Entry { word: e.word, bitmap: (e.bitmap & !range) | (range << 32) };
            {
                let mut m = self.meta.write();
                self.ensure_l2(&mut st, &mut m, l1i)?;
                let table = m.l2.get_mut(&l1i).ok_or_else(|| corrupt(format!("L2 table {l1i} vanished")))?;
                table.set_entry(&geo, l2i, new);
            }
            drop(st);
            let head = fs0 * scs - in_cluster;
            if head > 0 {
                let mut z = vec![0u8; head as usize];
                self.write_slow(guest, &IoVec::from_slice(&mut z))?;
            }
            let tail_start = fs1 * scs;
            if tail_start < in_cluster + n {
                let mut z = vec![0u8; (in_cluster + n - tail_start) as usize];
                self.write_slow(guest - in_cluster + tail_start, &IoVec::from_slice(&mut z))?;
            }
            return Ok(());
        }
        drop(st);
        let mut zeroes = vec![0u8; n as usize];
        self.write_slow(guest, &IoVec::from_slice(&mut zeroes))
    }

    /// Writes back metadata in dependency order. Holds the allocation mutex.
    fn flush_locked(&self, st: &mut AllocState) -> DiskResult<()> {
        let cs = self.lay.cluster_size();
        // 1. Refcount blocks. The sync after them also makes guest data
        //    written to new clusters durable before any L2 entry points at it.
        let blocks: Vec<(usize, u64, Vec<u8>)> = {
            let m = self.meta.read();
            match &m.refs {
                Some(r) => r
                    .blocks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| b.as_ref().filter(|b| b.dirty).map(|b| (i, r.table[i], b.data.to_vec())))
                    .collect(),
                None => Vec::new(),
            }
        };
        for (_, off, data) in &blocks {
            self.storage.write_at(*off, data).map_err(|e| DiskError::io("write refcount block", *off, e))?;
        }
        self.sync()?;
        {
            let mut m = self.meta.write();
            if let Some(r) = m.refs.as_mut() {
                for (i, _, _) in &blocks {
                    if let Some(b) = r.blocks[*i].as_mut() {
                        b.dirty = false;
                    }
                }
            }
        }
        // 2. Refcount table, then the header if the table moved.
        let table = {
            let m = self.meta.read();
            m.refs.as_ref().filter(|r| r.table_dirty).map(|r| {
                let mut bytes: Vec<u8> = r.table.iter().flat_map(|e| e.to_be_bytes()).collect();
                bytes.resize((r.table_clusters * cs) as usize, 0);
                (r.table_offset, r.table_clusters, bytes, r.header_dirty)
            })
        };
        if let Some((off, clusters, bytes, header_dirty)) = table {
            self.storage.write_at(off, &bytes).map_err(|e| DiskError::io("write refcount table", off, e))?;
            self.sync()?;
            if header_dirty {
                let mut h = [0u8; 12];
                h[..8].copy_from_slice(&off.to_be_bytes());
                h[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
                self.storage
                    .write_at(OFF_REFCOUNT_TABLE, &h)
                    .map_err(|e| DiskError::io("write header", OFF_REFCOUNT_TABLE, e))?;
                self.sync()?;
            }
            let mut m = self.meta.write();
            if let Some(r) = m.refs.as_mut() {
                r.table_dirty = false;
                r.header_dirty = false;
                for (o, n) in r.retired_tables.drain(..) {
                    st.pending_free.extend((0..n).map(|c| o + c * cs));
                }
            }
        }
        // 3. L2 tables.
        let l2s: Vec<(usize, u64, Vec<u8>)> = {
            let m = self.meta.read();
            m.l2.iter().filter(|(_, t)| t.dirty).map(|(&i, t)| (i, m.l1[i] & OFFSET_MASK, t.to_bytes())).collect()
        };
        for (_, off, bytes) in &l2s {
            self.storage.write_at(*off, bytes).map_err(|e| DiskError::io("write L2 table", *off, e))?;
        }
        if !l2s.is_empty() {
            self.sync()?;
            let mut m = self.meta.write();
            for (i, _, _) in &l2s {
                if let Some(t) = m.l2.get_mut(i) {
                    t.dirty = false;
                }
            }
        }
        // 4. L1 table.
        let l1 = {
            let m = self.meta.read();
            m.l1_dirty.then(|| (m.l1_offset, m.l1.iter().flat_map(|e| e.to_be_bytes()).collect::<Vec<u8>>()))
        };
        if let Some((off, bytes)) = l1 {
            self.storage.write_at(off, &bytes).map_err(|e| DiskError::io("write L1 table", off, e))?;
            self.sync()?;
            self.meta.write().l1_dirty = false;
        }
        // 5. Everything that dropped references is durable: free for reuse.
        if !st.pending_free.is_empty() {
            let _g = self.gate.write();
            let mut m = self.meta.write();
            if let Some(r) = m.refs.as_mut() {
                let mut first_err = None;
                for h in st.pending_free.drain(..) {
                    if let Err(e) = r.adjust(h, -1) {
                        first_err.get_or_insert(e);
                    }
                }
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        Ok(())
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
            if let Err(e) = self.flush_locked(&mut st).and_then(|_| self.flush_locked(&mut st)) {
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
        self.flush_locked(&mut st)
    }

    fn close(&self) -> DiskResult<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.alloc.lock();
        // The first pass frees clusters in memory; the second writes those
        // refcounts, so a clean close leaves no leaks.
        self.flush_locked(&mut st)?;
        self.flush_locked(&mut st)?;
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
