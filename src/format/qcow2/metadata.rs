//! The in-memory metadata of an open image: the L1 table, the L2 table cache
//! (by default every table, loaded once at open) and, for writable images,
//! the refcounts. Lookups here do no I/O; they turn a guest offset into a
//! run of uniformly mapped bytes.

use std::collections::{HashMap, HashSet};

use super::corrupt;
use super::header::{check_table, MAX_HOST_OFFSET};
use super::l2::{compressed_clusters, ClusterKind, Geometry, L2Entry, L2Table, SubState, OFFSET_MASK};
use super::refcount::Refcounts;
use crate::format::{DiskError, DiskResult};
use crate::tier::Storage;

/// What a run of guest bytes maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Backing file data (or zeroes without one).
    Unallocated,
    Zero,
    /// Contiguous host bytes starting here.
    Data {
        host: u64,
    },
    /// Inside a compressed cluster; `in_cluster` is the offset of the run's
    /// start within the decompressed cluster.
    Compressed {
        host: u64,
        csize: u64,
        in_cluster: u64,
    },
    /// The L2 table at this L1 index is not in memory.
    NeedsLoad {
        l1_index: usize,
    },
}

/// Guest-offset arithmetic for one image.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub geo: Geometry,
    /// Guest clusters per L2 table.
    pub l2_entries: u64,
}

impl Layout {
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }
    /// (L1 index, L2 index, offset within the cluster).
    pub fn split(&self, guest: u64) -> (usize, usize, u64) {
        let cluster = guest >> self.geo.cluster_bits;
        ((cluster / self.l2_entries) as usize, (cluster % self.l2_entries) as usize, guest & (self.cluster_size() - 1))
    }
}

/// Metadata guarded by the engine's RwLock.
pub struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l1_dirty: bool,
    /// Cached L2 tables by L1 index: looked up on every guest request,
    /// hence a fast (randomly seeded) hasher rather than SipHash.
    pub l2: HashMap<usize, L2Table, foldhash::fast::RandomState>,
    /// Refcounts; `None` for read-only images.
    pub refs: Option<Refcounts>,
    /// Clusters that held metadata at open: data must never point into them.
    pub metadata_clusters: HashSet<u64>,
    /// Writable images: L1 indexes whose L2 table has not been loaded (and
    /// so not checked) since open, because its load was left for later.
    pub unchecked: HashSet<usize>,
    /// Clusters handed out since open, kept while `unchecked` is not empty:
    /// an unchecked table naming one pointed at it while its refcount said
    /// free (the check at load would now see the new count and pass).
    pub allocated: HashSet<u64>,
}

impl Meta {
    /// A new `Meta` with nothing loaded or allocated yet.
    pub fn new(l1: Vec<u64>, l1_offset: u64, refs: Option<Refcounts>, metadata_clusters: HashSet<u64>) -> Self {
        Self {
            l1,
            l1_offset,
            l1_dirty: false,
            l2: Default::default(),
            refs,
            metadata_clusters,
            unchecked: HashSet::new(),
            allocated: HashSet::new(),
        }
    }

    /// Allocates a host cluster, never one that held metadata at open
    /// (whatever the refcounts say). Read-only images have no refcounts.
    pub fn alloc_cluster(&mut self) -> DiskResult<u64> {
        let Meta { refs, metadata_clusters, unchecked, allocated, .. } = self;
        let refs = refs.as_mut().ok_or(DiskError::ReadOnly)?;
        let off = refs.alloc_cluster(metadata_clusters);
        // Refcount blocks and tables it placed count as allocated too.
        let created = std::mem::take(&mut refs.created);
        let off = off?;
        if !unchecked.is_empty() {
            allocated.extend(created);
            allocated.insert(off);
        }
        Ok(off)
    }

    /// Table `l1i` was loaded and checked: nothing to remember for it.
    pub fn checked(&mut self, l1i: usize) {
        if self.unchecked.remove(&l1i) && self.unchecked.is_empty() {
            self.allocated = HashSet::new();
        }
    }

    /// The L2 entry for a guest cluster, `Ok(None)` when its L1 entry is
    /// empty, `Err(l1_index)` when the table is not cached.
    pub fn entry(&self, lay: &Layout, l1i: usize, l2i: usize) -> Result<Option<L2Entry>, usize> {
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        match self.l2.get(&l1i) {
            Some(t) => Ok(Some(t.entry(&lay.geo, l2i))),
            None => Err(l1i),
        }
    }

    /// Maps guest offset `guest` to the longest uniform run of at most `max`
    /// bytes that stays within one L2 table.
    pub fn map(&self, lay: &Layout, guest: u64, max: u64, tick: u64) -> DiskResult<(Extent, u64)> {
        let cs = lay.cluster_size();
        let scs = lay.geo.subcluster_size();
        let (l1i, l2i, in_cluster) = lay.split(guest);
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & OFFSET_MASK;
        // Bytes from `guest` to the end of this L2 table's range.
        let table_left = (lay.l2_entries - l2i as u64) * cs - in_cluster;
        let max = max.min(table_left);
        if l2_off == 0 {
            return Ok((Extent::Unallocated, max));
        }
        let Some(table) = self.l2.get(&l1i) else {
            return Ok((Extent::NeedsLoad { l1_index: l1i }, max));
        };
        if tick != 0 {
            table.touch(tick);
        }
        let state_at = |l2i: usize, sc: u32| -> DiskResult<SubState> {
            table
                .entry(&lay.geo, l2i)
                .sub_state(&lay.geo, sc)
                .map_err(|m| corrupt(format!("L2 entry for guest cluster {:#x}: {m}", guest & !(cs - 1))))
        };
        let mut sc = (in_cluster / scs) as u32;
        let first = state_at(l2i, sc)?;
        let extent = match first {
            SubState::Unallocated => Extent::Unallocated,
            SubState::Zero => Extent::Zero,
            SubState::Data { host } => Extent::Data { host: host + in_cluster % scs },
            SubState::Compressed { host, csize } => {
                // One compressed cluster per run.
                return Ok((Extent::Compressed { host, csize, in_cluster }, max.min(cs - in_cluster)));
            }
        };
        // Extend the run subcluster by subcluster while the mapping continues.
        let mut len = (scs - in_cluster % scs).min(max);
        let mut idx = l2i;
        while len < max {
            sc += 1;
            if sc == lay.geo.subclusters() {
                sc = 0;
                idx += 1;
            }
            let next = state_at(idx, sc)?;
            let continues = match (extent, next) {
                (Extent::Unallocated, SubState::Unallocated) | (Extent::Zero, SubState::Zero) => true,
                // `len` bytes from `guest` end exactly where the next subcluster starts.
                (Extent::Data { host: h }, SubState::Data { host }) => host == h + len,
                _ => false,
            };
            if !continues {
                break;
            }
            len = (len + scs).min(max);
        }
        Ok((extent, len))
    }
}

/// Loads one L2 table from disk and checks its entries (writable images:
/// no data inside metadata, every cluster referenced has a refcount).
pub fn read_l2(storage: &dyn Storage, lay: &Layout, meta: &Meta, l1i: usize, file_len: u64) -> DiskResult<L2Table> {
    let cs = lay.cluster_size();
    let off = meta.l1[l1i] & OFFSET_MASK;
    let mut buf = vec![0u8; cs as usize];
    storage.read_at(off, &mut buf).map_err(|e| DiskError::io("read L2 table", off, e))?;
    let table = L2Table::from_bytes(&buf);
    if let Some(refs) = &meta.refs {
        for i in 0..lay.l2_entries as usize {
            let e = table.entry(&lay.geo, i);
            let guest = (l1i as u64 * lay.l2_entries + i as u64) * cs;
            let clusters: Vec<u64> = match e.kind(&lay.geo) {
                ClusterKind::None => continue,
                ClusterKind::Allocated { host, .. } => {
                    if host % cs != 0 {
                        return Err(corrupt(format!("guest {guest:#x}: data offset {host:#x} not cluster-aligned")));
                    }
                    vec![host]
                }
                ClusterKind::Compressed { host, csize } => {
                    // The size is counted in sectors, and QEMU does not pad
                    // the file's last one: it may end inside it.
                    if host.checked_add(csize).is_none_or(|e| e > file_len.next_multiple_of(512)) {
                        return Err(corrupt(format!(
                            "guest {guest:#x}: compressed data at {host:#x}+{csize} past end of file"
                        )));
                    }
                    compressed_clusters(host, csize, cs).collect()
                }
            };
            for c in clusters {
                if meta.metadata_clusters.contains(&c) {
                    return Err(corrupt(format!("guest {guest:#x}: data cluster {c:#x} overlaps image metadata")));
                }
                // Handed out since open: its refcount was 0 then.
                let free_at_open = meta.unchecked.contains(&l1i) && meta.allocated.contains(&c);
                if c >= MAX_HOST_OFFSET || refs.get(c / cs) == 0 || free_at_open {
                    return Err(corrupt(format!(
                        "guest {guest:#x}: data cluster {c:#x} is in use but has refcount 0 (run `qemu-img check -r all`)"
                    )));
                }
            }
        }
    }
    Ok(table)
}

/// Validates an L1 or refcount-table entry pointing at one metadata cluster
/// and records it, refusing two tables in one cluster.
pub fn claim_cluster(
    what: &str,
    index: usize,
    off: u64,
    cs: u64,
    file_len: u64,
    seen: &mut HashSet<u64>,
) -> DiskResult<()> {
    check_table(&format!("{what} {index}"), off, cs, cs, file_len)?;
    if !seen.insert(off) {
        return Err(corrupt(format!("{what} {index} at {off:#x} overlaps other metadata")));
    }
    Ok(())
}
