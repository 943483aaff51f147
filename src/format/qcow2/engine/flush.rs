//! Flush: writing dirty metadata back in dependency order, then releasing
//! clusters whose last reference is durably gone.

use super::*;

impl Qcow2Disk {
    /// Writes back metadata in dependency order. Holds the allocation mutex.
    /// `synced_after`: the caller makes storage durable right after (a
    /// guest FLUSH's flush point), so with no metadata to write this costs
    /// no sync of its own (it would be a second fsync per FLUSH). Returns
    /// false when it had nothing to do.
    pub(super) fn flush_locked(&self, st: &mut AllocState, synced_after: bool) -> DiskResult<bool> {
        let cs = self.lay.cluster_size();
        if synced_after && st.pending_free.is_empty() && !self.meta_dirty() {
            return Ok(false);
        }
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
        //    A cluster losing its last reference keeps it until the storage
        //    has been told it is free (`release`), so it cannot be handed
        //    out and written meanwhile. The gate waits out I/O aimed at it.
        if !st.pending_free.is_empty() {
            let _g = self.gate.write();
            let mut m = self.meta.write();
            let Meta { refs, metadata_clusters, .. } = &mut *m;
            if let Some(r) = refs.as_mut() {
                let mut frees = std::mem::take(&mut st.pending_free);
                frees.sort_unstable();
                let mut first_err = None;
                let mut release = Vec::new();
                for run in frees.chunk_by(|a, b| a == b) {
                    let (h, n) = (run[0], run.len() as u64);
                    // Metadata the image had at open is never reused (nor
                    // released: its refcount might lie about a live table).
                    let last = r.get(h / cs) == n && !metadata_clusters.contains(&h);
                    let drop_refs = if last { n - 1 } else { n };
                    if drop_refs > 0 {
                        if let Err(e) = r.adjust(h, -(drop_refs as i64)) {
                            first_err.get_or_insert(e);
                            continue;
                        }
                    }
                    if last {
                        release.push(h);
                    }
                }
                st.unreleased.append(&mut release);
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// The end of a close (or drop), after a first flush freed clusters in
    /// memory: releases them all and writes the refcounts, so a clean
    /// close leaves no leaks.
    pub(super) fn close_flushes(&self, st: &mut MutexGuard<'_, AllocState>) -> DiskResult<()> {
        self.release_freed(st, None)?;
        self.flush_locked(st, false).map(|_| ())
    }

    /// True when some metadata in memory is newer than on storage.
    fn meta_dirty(&self) -> bool {
        let m = self.meta.read();
        m.l1_dirty
            || m.l2.values().any(|t| t.dirty)
            || m.refs
                .as_ref()
                .is_some_and(|r| r.table_dirty || r.header_dirty || r.blocks.iter().flatten().any(|b| b.dirty))
    }
}
