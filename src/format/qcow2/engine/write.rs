//! Changing metadata: allocating writes with copy-on-write (from the
//! backing file, zero, compressed or shared clusters), copying L2 tables
//! shared with snapshots, write-zeroes and discard.

use super::*;

impl Qcow2Disk {
    /// Finds how the write run at `guest` (at most `max` bytes) can proceed.
    pub(super) fn plan_write(&self, guest: u64, max: u64) -> (WriteRun, u64) {
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
    pub(super) fn ensure_l2(&self, st: &mut AllocState, m: &mut Meta, l1i: usize) -> DiskResult<()> {
        let cur = m.l1[l1i] & OFFSET_MASK;
        if cur != 0 {
            if !m.l2.contains_key(&l1i) {
                return Err(corrupt(format!("L2 table {l1i} not loaded")));
            }
            if m.l1[l1i] & COPIED == 0 {
                let off = m.alloc_cluster()?;
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
        let off = m.alloc_cluster()?;
        m.l1[l1i] = off | COPIED;
        m.l1_dirty = true;
        m.l2.insert(l1i, L2Table::zeroed(self.lay.cluster_size()));
        Ok(())
    }

    /// Queues the host clusters an entry references for freeing.
    pub(super) fn free_entry(&self, st: &mut AllocState, e: &L2Entry) {
        match e.kind(&self.lay.geo) {
            ClusterKind::None => {}
            ClusterKind::Allocated { host, .. } => st.pending_free.push(host),
            ClusterKind::Compressed { host, csize } => {
                st.pending_free.extend(compressed_clusters(host, csize, self.lay.cluster_size()))
            }
        }
    }

    pub(super) fn write_host(&self, host: u64, data: &IoVec<'_>) -> DiskResult<()> {
        self.storage.write_vectored_at(host, data, IoMode::Blocking).map_err(|e| DiskError::io("write data", host, e))
    }

    pub(super) fn write_host_buf(&self, host: u64, buf: &[u8]) -> DiskResult<()> {
        self.storage.write_at(host, buf).map_err(|e| DiskError::io("write data", host, e))
    }

    /// Takes the allocation mutex once no allocating write to guest cluster
    /// `gc` is in flight.
    pub(super) fn lock_cluster(&self, gc: u64) -> MutexGuard<'_, AllocState> {
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
    pub(super) fn write_slow(&self, guest: u64, data: &IoVec<'_>) -> DiskResult<()> {
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
            // Another request allocated it meanwhile: write like the fast
            // path. The gate is taken before the mutex is let go (the order
            // a flush takes them in), so a discard and a flush cannot free
            // the cluster, and hand it out again, before this write lands.
            let _g = self.gate.read();
            drop(st);
            #[cfg(test)]
            tests::allocated_meanwhile();
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
                (m.alloc_cluster()?, true)
            }
        };
        st.inflight.insert(gc);
        drop(st);
        let flight = InFlight { disk: self, gc };
        let res = self.fill_and_write(guest - in_cluster, &e, host, fresh, s0, s1, in_cluster, data);
        let mut st = flight.land();
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
    pub(super) fn fill_and_write(
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
    pub(super) fn reads_zero(&self, e: &Option<L2Entry>, in_cluster: u64, n: u64) -> bool {
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

    pub(super) fn zero_range(&self, offset: u64, len: u64, op: ZeroOp, mode: IoMode) -> DiskResult<()> {
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

    pub(super) fn zero_cluster(&self, cstart: u64, op: ZeroOp) -> DiskResult<()> {
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

    pub(super) fn zero_partial(&self, guest: u64, n: u64, op: ZeroOp) -> DiskResult<()> {
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
        let v = IoVec::from_slice(&mut zeroes);
        self.write_slow(guest, &v)
    }
}

/// Guest cluster `gc` marked in flight by an allocating write. Cleared on
/// unwind too: the device turns a panic below into an I/O error for that
/// request, and a cluster left in flight would hold every later write to
/// it for good.
struct InFlight<'a> {
    disk: &'a Qcow2Disk,
    gc: u64,
}

impl<'a> InFlight<'a> {
    /// Clears the mark and wakes the writers waiting on it; returns the
    /// allocation mutex, still held.
    fn land(self) -> MutexGuard<'a, AllocState> {
        let mut st = self.disk.alloc.lock();
        st.inflight.remove(&self.gc);
        self.disk.alloc_done.notify_all();
        std::mem::forget(self);
        st
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.disk.alloc.lock().inflight.remove(&self.gc);
        self.disk.alloc_done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::format::qcow2::{NoBacking, Qcow2Options};
    use crate::tier::LocalFile;

    thread_local! {
        /// Run on this thread where a slow write found its cluster
        /// allocated meanwhile and let the allocation mutex go.
        static ALLOCATED_MEANWHILE: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    pub(super) fn allocated_meanwhile() {
        ALLOCATED_MEANWHILE.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
    }

    /// A slow write that finds its cluster allocated meanwhile holds the
    /// I/O gate from before it lets the allocation mutex go: a discard and
    /// a flush cannot free the cluster, and another write reuse it, before
    /// the write lands there. The bug: the write landed in the other
    /// write's cluster.
    #[test]
    fn a_write_never_lands_in_a_cluster_freed_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("img.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(&path)
            .arg("4M")
            .output()
            .expect("qemu-img");
        assert!(out.status.success(), "{out:?}");
        let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&path, false).unwrap());
        let disk = Arc::new(Qcow2Disk::open(storage, Qcow2Options::default(), &NoBacking).unwrap());
        let cs = disk.cluster_size();
        let write = move |disk: &Qcow2Disk, at: u64, byte: u8| {
            let mut b = vec![byte; cs as usize];
            disk.write(at, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        };
        write(&disk, 0, 0xa0);
        disk.flush(IoMode::Blocking).unwrap();
        // A write to cluster 0 that went the slow way (as when it raced the
        // write allocating it), held once it let the mutex go.
        let (held_tx, held) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let slow = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut once = Some((held_tx, go_rx));
                ALLOCATED_MEANWHILE.with(|h| {
                    *h.borrow_mut() = Some(Box::new(move || {
                        if let Some((held_tx, go_rx)) = once.take() {
                            let _ = held_tx.send(());
                            let _ = go_rx.recv_timeout(Duration::from_secs(20));
                        }
                    }))
                });
                let mut b = vec![0xa1u8; 4096];
                let r = disk.write_slow(0, &IoVec::from_slice(&mut b));
                r
            })
        };
        held.recv_timeout(Duration::from_secs(20)).expect("the slow write never got there");
        // Cluster 0 discarded, the discard flushed (its cluster freed, once
        // no I/O aims at it), and a write to cluster 2 allocating.
        disk.discard(0, cs, IoMode::Blocking).unwrap();
        let (done_tx, done) = mpsc::channel();
        let other = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                disk.flush(IoMode::Blocking).unwrap();
                write(&disk, 2 * cs, 0xb2);
                let _ = done_tx.send(());
            })
        };
        let _ = done.recv_timeout(Duration::from_secs(1));
        go.send(()).unwrap();
        slow.join().unwrap().unwrap();
        other.join().unwrap();
        let mut b = vec![0u8; cs as usize];
        disk.read(2 * cs, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert!(b == vec![0xb2u8; cs as usize], "cluster 2 holds {:#x}.., not the write's 0xb2", b[0]);
    }
}
