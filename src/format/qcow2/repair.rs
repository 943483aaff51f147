//! Refcount rebuild for images left dirty by QEMU with lazy refcounts: walk
//! every L1 table (active and snapshots) and what it references, set each
//! refcount to the number of references, fix the COPIED flags of the active
//! tables to match, write it all back in dependency order, then clear the
//! dirty bit. A crash part-way leaves the bit set, so the next open redoes it.

use std::collections::HashMap;

use super::header::{check_table, Header, MAX_HOST_OFFSET, OFF_INCOMPAT};
use super::l2::{compressed_clusters, ClusterKind, L2Table, COPIED, OFFSET_MASK};
use super::metadata::Layout;
use super::refcount::Refcounts;
use super::snapshot::Snapshot;
use super::{corrupt, unsupported};
use crate::format::{DiskError, DiskResult};
use crate::tier::Storage;

/// What the rebuild needs to know about the image.
pub struct RepairInput<'a> {
    pub storage: &'a dyn Storage,
    pub header: &'a Header,
    pub lay: Layout,
    pub l1: &'a mut Vec<u64>,
    pub snapshots: &'a [Snapshot],
    pub snapshot_l1s: &'a [Vec<u64>],
    pub snapshot_table_bytes: u64,
}

/// Rebuilds `refs` from the tables and makes the result durable.
pub fn rebuild_refcounts(inp: RepairInput<'_>, refs: &mut Refcounts) -> DiskResult<()> {
    let RepairInput { storage, header, lay, l1, snapshots, snapshot_l1s, snapshot_table_bytes } = inp;
    let cs = lay.cluster_size();
    let file_len = storage.len();
    let mut want: HashMap<u64, u64> = HashMap::new();
    let mut add = |off: u64, what: &str| -> DiskResult<()> {
        if off % cs != 0 || off >= MAX_HOST_OFFSET {
            return Err(corrupt(format!("{what} at {off:#x} is not a valid cluster offset")));
        }
        *want.entry(off / cs).or_default() += 1;
        Ok(())
    };
    add(0, "header")?;
    let span = |off: u64, bytes: u64| (0..bytes.div_ceil(cs)).map(move |c| off + c * cs);
    for c in span(header.l1_table_offset, u64::from(header.l1_size) * 8) {
        add(c, "L1 table")?;
    }
    for c in span(refs.table_offset, refs.table_clusters * cs) {
        add(c, "refcount table")?;
    }
    for &b in refs.table.iter().filter(|&&b| b != 0) {
        add(b, "refcount block")?;
    }
    for c in span(header.snapshots_offset, snapshot_table_bytes) {
        add(c, "snapshot table")?;
    }
    for s in snapshots {
        for c in span(s.l1_table_offset, u64::from(s.l1_size) * 8) {
            add(c, "snapshot L1 table")?;
        }
    }
    // Each L1 counts once for every L2 table and data cluster it reaches.
    // Count references per distinct table first and walk each table once,
    // so a hostile image cannot make the walk quadratic.
    let mut table_refs: HashMap<u64, u64> = HashMap::new();
    for table in std::iter::once(&*l1).chain(snapshot_l1s.iter()) {
        for &e in table {
            let off = e & OFFSET_MASK;
            if off != 0 {
                add(off, "L2 table")?;
                *table_refs.entry(off).or_default() += 1;
            }
        }
    }
    let mut tables: HashMap<u64, L2Table> = HashMap::new();
    for (&off, &times) in &table_refs {
        check_table("L2 table", off, cs, cs, file_len)?;
        let mut buf = vec![0u8; cs as usize];
        storage.read_at(off, &mut buf).map_err(|e| DiskError::io("read L2 table", off, e))?;
        let t = L2Table::from_bytes(&buf);
        let mut add_n = |c: u64, what: &str| -> DiskResult<()> {
            if c % cs != 0 || c >= MAX_HOST_OFFSET {
                return Err(corrupt(format!("{what} at {c:#x} is not a valid cluster offset")));
            }
            *want.entry(c / cs).or_default() += times;
            Ok(())
        };
        for i in 0..lay.l2_entries as usize {
            match t.entry(&lay.geo, i).kind(&lay.geo) {
                ClusterKind::None => {}
                ClusterKind::Allocated { host, .. } => add_n(host, "data cluster")?,
                ClusterKind::Compressed { host, csize } => {
                    for c in compressed_clusters(host, csize, cs) {
                        add_n(c, "compressed cluster")?;
                    }
                }
            }
        }
        tables.insert(off, t);
    }
    // Apply: every cluster with a block gets its count; a referenced
    // cluster without a block would need one placed somewhere known free,
    // which is QEMU's job.
    let per = refs.per_block();
    for (&c, &n) in &want {
        if refs.blocks.get((c / per) as usize).is_none_or(|b| b.is_none()) {
            return Err(unsupported(format!(
                "dirty image: cluster {:#x} has no refcount block; run `qemu-img check -r all`",
                c * cs
            )));
        }
        if n > refs.max_refcount() {
            return Err(corrupt(format!("cluster {:#x} referenced {n} times, beyond the refcount width", c * cs)));
        }
    }
    for bi in 0..refs.blocks.len() {
        if refs.blocks[bi].is_none() {
            continue;
        }
        for c in bi as u64 * per..(bi as u64 + 1) * per {
            let n = want.get(&c).copied().unwrap_or(0);
            if refs.get(c) != n {
                refs.set(c, n)?;
            }
        }
    }
    // COPIED must say "refcount is 1" in the active tables.
    let refcount = |off: u64| want.get(&(off / cs)).copied().unwrap_or(0);
    let mut l2_fixed = Vec::new();
    let mut l1_changed = false;
    for e in l1.iter_mut() {
        let off = *e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let fixed = if refcount(off) == 1 { *e | COPIED } else { *e & !COPIED };
        l1_changed |= fixed != *e;
        *e = fixed;
        if let Some(t) = tables.get_mut(&off) {
            let mut changed = false;
            for i in 0..lay.l2_entries as usize {
                let mut ent = t.entry(&lay.geo, i);
                let word = match ent.kind(&lay.geo) {
                    ClusterKind::Allocated { host, .. } if refcount(host) == 1 => ent.word | COPIED,
                    ClusterKind::Allocated { .. } | ClusterKind::Compressed { .. } => ent.word & !COPIED,
                    ClusterKind::None => ent.word,
                };
                if word != ent.word {
                    ent.word = word;
                    t.set_entry(&lay.geo, i, ent);
                    changed = true;
                }
            }
            if changed {
                l2_fixed.push(off);
            }
        }
    }
    // Refcounts first, then the tables that rely on them, then the bit.
    let sync = || storage.flush().map_err(|e| DiskError::io("flush", 0, e));
    for bi in 0..refs.blocks.len() {
        let off = refs.table[bi];
        if let Some(b) = refs.blocks[bi].as_mut().filter(|b| b.dirty) {
            storage.write_at(off, &b.data).map_err(|e| DiskError::io("write refcount block", off, e))?;
            b.dirty = false;
        }
    }
    sync()?;
    for off in &l2_fixed {
        storage.write_at(*off, &tables[off].to_bytes()).map_err(|e| DiskError::io("write L2 table", *off, e))?;
    }
    sync()?;
    if l1_changed {
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage
            .write_at(header.l1_table_offset, &bytes)
            .map_err(|e| DiskError::io("write L1 table", header.l1_table_offset, e))?;
        sync()?;
    }
    let incompat = header.incompatible & !super::header::INCOMPAT_DIRTY;
    storage
        .write_at(OFF_INCOMPAT, &incompat.to_be_bytes())
        .map_err(|e| DiskError::io("clear dirty bit", OFF_INCOMPAT, e))?;
    sync()
}
