//! Opening an image: header and table validation, the metadata hints,
//! loading L1/L2/refcounts into memory, snapshot selection, backing file,
//! and the dirty-image repair hand-off.

use super::*;

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
                super::super::header::check_table(
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
            let total: u64 = snapshots.iter().map(|s| u64::from(s.l1_size) * 8).sum();
            if total > MAX_SNAPSHOT_L1_BYTES {
                return Err(unsupported(format!(
                    "the {} internal snapshots' L1 tables add up to {total} bytes, more than the {} MiB a \
                     writable open reads into memory: serve the image read-only, or delete snapshots \
                     (`qemu-img snapshot -d`)",
                    snapshots.len(),
                    MAX_SNAPSHOT_L1_BYTES >> 20
                )));
            }
            for s in &snapshots {
                let bytes = u64::from(s.l1_size) * 8;
                if bytes > MAX_L1_BYTES {
                    return Err(corrupt(format!("snapshot {:?}: L1 table too large", s.name)));
                }
                super::super::header::check_table("snapshot L1 table", s.l1_table_offset, bytes, cs, file_len)?;
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

        // Second hint: the metadata set (a tiered store keeps what is hinted
        // resident), now including the L2 tables and refcount blocks the
        // tables above point at, within the pin budget: refcount blocks
        // first (every write needs them), then L2 tables in guest order.
        // What does not fit is read on demand like data.
        let mut budget = PinBudget::new(opts.metadata_pin_bytes.unwrap_or(DEFAULT_METADATA_PIN_BYTES));
        for r in &hint {
            // Header, L1, refcount and snapshot tables: bounded by header
            // validation, always pinned, charged first.
            budget.charge(r);
        }
        let mut ranges = hint.clone();
        // L2 tables: a tiered store may fetch them in the background while
        // the guest starts (reads load a table on demand until it is in);
        // everything else above is needed now.
        let mut l2_ranges = Vec::new();
        let mut unpinned = 0usize;
        if served_snapshot.is_some() {
            ranges.push(l1_offset..l1_offset + u64::from(l1_size) * 8);
        }
        for s in snapshots.iter().filter(|_| !read_only) {
            ranges.push(s.l1_table_offset..s.l1_table_offset + u64::from(s.l1_size) * 8);
        }
        let mut l2_count = 0usize;
        if let Some(r) = &refs {
            // Every refcount block is held in memory. The blocks the file
            // needs cover it up to its end (where the next allocation goes);
            // one that counts only clusters beyond would be read for nothing,
            // and a hostile table naming a million of them in a sparse file
            // would have us read the whole file into memory.
            let covered = file_len.div_ceil(cs) / r.per_block();
            for (i, &e) in r.table.iter().enumerate() {
                if e == 0 {
                    continue;
                }
                if i as u64 > covered {
                    return Err(corrupt(format!(
                        "refcount block {i} at {e:#x} counts only clusters past the end of the file \
                         ({file_len} bytes): the refcount table is damaged; serve the image read-only, \
                         or copy it with `qemu-img convert`"
                    )));
                }
                claim_cluster("refcount block", i, e, cs, file_len, &mut metadata_clusters)?;
                budget.offer(e..e + cs, &mut ranges, &mut unpinned);
            }
        }
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
            budget.offer(off..off + cs, &mut l2_ranges, &mut unpinned);
            l2_count += 1;
        }
        for l1 in &snapshot_l1s {
            for &e in l1 {
                let off = e & OFFSET_MASK;
                // Shared with the active L1 or another snapshot: legitimate.
                if off != 0 && off % cs == 0 && metadata_clusters.insert(off) {
                    budget.offer(off..off + cs, &mut l2_ranges, &mut unpinned);
                }
            }
        }
        if unpinned > 0 {
            tracing::warn!(
                unpinned,
                pinned_bytes = budget.used(),
                "qcow2 metadata exceeds the pin budget: the rest is loaded on demand"
            );
        }
        storage.hint_metadata(&ranges).map_err(|e| DiskError::io("hint metadata", 0, e))?;
        let l2_deferred =
            storage.prefetch_metadata(&l2_ranges).map_err(|e| DiskError::io("prefetch metadata", 0, e))?;

        let mut meta = Meta::new(l1, l1_offset, refs, metadata_clusters);
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
                let input = super::super::repair::RepairInput {
                    storage: &*storage,
                    header: &header,
                    lay,
                    l1: &mut meta.l1,
                    snapshots: &snapshots,
                    snapshot_l1s: &snapshot_l1s,
                    snapshot_table_bytes,
                };
                super::super::repair::rebuild_refcounts(input, r)?;
            }
        }
        // Without a cache cap every L2 table would stay in memory: fine up to
        // the pin budget, but an image made of L2 tables would then sit in
        // RAM whole. Past the budget, cap the cache at it instead.
        let l2_bytes = l2_count as u64 * cs;
        let cache_bytes = match opts.metadata_cache_bytes {
            Some(b) => Some(b),
            None if l2_bytes > budget.limit() => {
                tracing::warn!(
                    l2_bytes,
                    cap = budget.limit(),
                    "qcow2 L2 tables exceed the pin budget: caching them on demand instead of all resident"
                );
                Some(budget.limit())
            }
            None => None,
        };
        let cache_tables = cache_bytes.map(|b| ((b / cs) as usize).max(4));
        // Tables still on their way load on demand, each when first used.
        if !l2_deferred && cache_tables.is_none_or(|cap| l2_count <= cap) {
            for i in 0..meta.l1.len() {
                if meta.l1[i] & OFFSET_MASK != 0 && (i as u64 * lay.l2_entries * cs) < size {
                    let t = read_l2(&*storage, &lay, &meta, i, file_len)?;
                    meta.l2.insert(i, t);
                }
            }
        }
        // The tables left to load on demand are checked then, against the
        // refcounts as they were here (see `Meta::allocated`).
        if meta.refs.is_some() {
            meta.unchecked = (0..meta.l1.len())
                .filter(|&i| {
                    meta.l1[i] & OFFSET_MASK != 0
                        && (i as u64 * lay.l2_entries * cs) < size
                        && !meta.l2.contains_key(&i)
                })
                .collect();
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
            meta: ReadMostly::new(meta),
            alloc: Mutex::new(AllocState::default()),
            alloc_done: Condvar::new(),
            gate: ReadMostly::new(()),
            tick: AtomicU64::new(0),
            cache_tables,
            closed: AtomicBool::new(false),
            inflated: Mutex::new(Vec::new()),
            header,
        })
    }
}

/// What the second metadata hint may pin, charged in [`PIN_GRANULE`] units:
/// a range costs the granules it touches that nothing hinted touched yet.
struct PinBudget {
    limit: u64,
    granules: HashSet<u64>,
}

impl PinBudget {
    fn new(limit: u64) -> Self {
        Self { limit, granules: HashSet::new() }
    }

    fn limit(&self) -> u64 {
        self.limit
    }

    fn used(&self) -> u64 {
        self.granules.len() as u64 * PIN_GRANULE
    }

    fn new_granules(&self, r: &std::ops::Range<u64>) -> impl Iterator<Item = u64> + '_ {
        let last = r.end.max(r.start + 1) - 1;
        (r.start / PIN_GRANULE..=last / PIN_GRANULE).filter(|g| !self.granules.contains(g))
    }

    /// Charges `r` whatever the budget says (tables that must be pinned).
    fn charge(&mut self, r: &std::ops::Range<u64>) {
        let new: Vec<u64> = self.new_granules(r).collect();
        self.granules.extend(new);
    }

    /// Adds `r` to `ranges` if it fits the budget, else counts it unpinned.
    fn offer(&mut self, r: std::ops::Range<u64>, ranges: &mut Vec<std::ops::Range<u64>>, unpinned: &mut usize) {
        let new: Vec<u64> = self.new_granules(&r).collect();
        if self.used() + new.len() as u64 * PIN_GRANULE > self.limit {
            *unpinned += 1;
            return;
        }
        self.granules.extend(new);
        ranges.push(r);
    }
}
