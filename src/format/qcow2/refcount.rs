//! Refcount table and refcount blocks, held in memory for writable images:
//! get/set at any width (refcount_order 0..=6), single-cluster allocation,
//! and growth of blocks and of the table itself. Nothing here does I/O; the
//! engine writes dirty blocks and the table back at flush, blocks first.

use std::collections::HashSet;

use super::corrupt;
use super::header::MAX_HOST_OFFSET;
use super::header::MAX_REFTABLE_BYTES;
use crate::format::DiskResult;

/// One refcount block: a cluster of packed big-endian counters.
pub struct RefBlock {
    pub data: Box<[u8]>,
    pub dirty: bool,
}

/// All refcounts of a writable image.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Host offsets of the refcount blocks (0 = none).
    pub table: Vec<u64>,
    /// Where the table lives and how many clusters it spans.
    pub table_offset: u64,
    pub table_clusters: u64,
    /// `blocks[i]` is the block `table[i]` points at.
    pub blocks: Vec<Option<RefBlock>>,
    /// The table has entries not yet written.
    pub table_dirty: bool,
    /// The table moved: the header must be updated after it is written.
    pub header_dirty: bool,
    /// No cluster below this index is free (allocation scan start).
    free_hint: u64,
    /// Tables replaced by a bigger one: (offset, clusters). The engine frees
    /// them once the header pointing at the new table is durable.
    pub retired_tables: Vec<(u64, u64)>,
    /// Clusters taken by new refcount blocks and tables since the engine
    /// last looked (it keeps them with the clusters it allocated).
    pub created: Vec<u64>,
}

impl Refcounts {
    pub fn new(cluster_bits: u32, order: u32, table: Vec<u64>, table_offset: u64, table_clusters: u64) -> Self {
        let blocks = table.iter().map(|_| None).collect();
        Self {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            blocks,
            table_dirty: false,
            header_dirty: false,
            free_hint: 0,
            retired_tables: Vec::new(),
            created: Vec::new(),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub fn per_block(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.order)
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// Installs a block read from disk.
    pub fn set_block(&mut self, index: usize, data: Box<[u8]>) {
        self.blocks[index] = Some(RefBlock { data, dirty: false });
    }

    fn split(&self, cluster: u64) -> (usize, usize) {
        let per = self.per_block();
        ((cluster / per) as usize, (cluster % per) as usize)
    }

    /// Refcount of host cluster number `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        let (bi, i) = self.split(cluster);
        match self.blocks.get(bi) {
            Some(Some(b)) => get_packed(&b.data, self.order, i),
            _ => 0,
        }
    }

    /// Sets a refcount in an existing block (repair).
    pub fn set(&mut self, cluster: u64, value: u64) -> DiskResult<()> {
        self.set_existing(cluster, value)
    }

    fn set_existing(&mut self, cluster: u64, value: u64) -> DiskResult<()> {
        let (bi, i) = self.split(cluster);
        let order = self.order;
        match self.blocks.get_mut(bi) {
            Some(Some(b)) => {
                set_packed(&mut b.data, order, i, value);
                b.dirty = true;
                Ok(())
            }
            _ => Err(corrupt(format!("no refcount block for host cluster {cluster}"))),
        }
    }

    /// Adds `delta` (±1) to the refcount of the cluster holding `host`.
    /// Decrements never need a new block; increments on a cluster without a
    /// block are an engine bug and reported as corruption.
    pub fn adjust(&mut self, host: u64, delta: i64) -> DiskResult<u64> {
        let cluster = host >> self.cluster_bits;
        let cur = self.get(cluster);
        let new = if delta < 0 {
            cur.checked_sub(delta.unsigned_abs())
                .ok_or_else(|| corrupt(format!("refcount of cluster at {host:#x} would drop below zero")))?
        } else {
            cur.checked_add(delta as u64)
                .filter(|&v| v <= self.max_refcount())
                .ok_or_else(|| corrupt(format!("refcount of cluster at {host:#x} would overflow")))?
        };
        self.set_existing(cluster, new)?;
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(new)
    }

    /// Allocates one free cluster (refcount 0 -> 1) and returns its offset,
    /// never one of `reserved` (host offsets of clusters that held
    /// metadata at open): an image whose refcounts lie (0 on an L2 table,
    /// on the header) must not get its metadata overwritten with data.
    pub fn alloc_cluster(&mut self, reserved: &HashSet<u64>) -> DiskResult<u64> {
        let per = self.per_block();
        let mut c = self.free_hint;
        loop {
            let bi = (c / per) as usize;
            if bi >= self.table.len() {
                self.grow_table(bi, reserved)?;
                continue;
            }
            if self.blocks[bi].is_none() {
                if self.table[bi] != 0 {
                    return Err(corrupt(format!("refcount block {bi} not loaded")));
                }
                self.new_self_describing_block(bi, reserved)?;
            }
            let end = (bi as u64 + 1) * per;
            while c < end {
                if self.get(c) == 0 && !reserved.contains(&(c << self.cluster_bits)) {
                    let off = c
                        .checked_mul(self.cluster_size())
                        .filter(|o| o.checked_add(self.cluster_size()).is_some_and(|e| e <= MAX_HOST_OFFSET))
                        .ok_or_else(|| corrupt("image file would exceed the largest qcow2 host offset".into()))?;
                    self.set_existing(c, 1)?;
                    self.free_hint = c + 1;
                    return Ok(off);
                }
                c += 1;
            }
        }
    }

    /// Creates block `bi` (table slot exists but is empty), placing it in the
    /// first cluster of the range it covers, so it counts itself.
    fn new_self_describing_block(&mut self, bi: usize, reserved: &HashSet<u64>) -> DiskResult<()> {
        let first = bi as u64 * self.per_block();
        let off = first
            .checked_mul(self.cluster_size())
            .filter(|&o| o < MAX_HOST_OFFSET)
            .ok_or_else(|| corrupt("image file would exceed the largest qcow2 host offset".into()))?;
        // No block covers this range, so every refcount in it reads 0; metadata
        // there means the refcounts lie, and the block would overwrite it.
        if reserved.contains(&off) {
            return Err(corrupt(format!("metadata at {off:#x} has no refcount block (run `qemu-img check -r all`)")));
        }
        self.table[bi] = off;
        self.blocks[bi] = Some(RefBlock { data: vec![0u8; self.cluster_size() as usize].into(), dirty: true });
        self.table_dirty = true;
        self.created.push(off);
        self.set_existing(first, 1)
    }

    /// Grows the table so slot `need` exists. The new table and the blocks
    /// covering it go right after the last range the old table covers (all
    /// free, since nothing there has a refcount). Returns the old table's
    /// clusters, which the caller frees once the header no longer points at
    /// them.
    fn grow_table(&mut self, need: usize, reserved: &HashSet<u64>) -> DiskResult<()> {
        let cs = self.cluster_size();
        let per = self.per_block();
        let per_table_cluster = cs / 8;
        let old_len = self.table.len() as u64;
        let start = old_len * per; // first cluster index with no block
        let mut new_len = (old_len * 2).max(need as u64 + 1).div_ceil(per_table_cluster) * per_table_cluster;
        let (t, b) = loop {
            let t = new_len / per_table_cluster;
            // Blocks needed to cover [start, start + t + b): fixpoint.
            let mut b = 1u64;
            loop {
                let rb = (start + t + b).div_ceil(per) - old_len;
                if rb <= b {
                    break;
                }
                b = rb;
            }
            if old_len + b <= new_len && (need as u64) < new_len {
                break (t, b);
            }
            new_len *= 2;
        };
        if new_len * 8 > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!("refcount table would grow past {MAX_REFTABLE_BYTES} bytes")));
        }
        if (start + t + b).checked_mul(cs).is_none_or(|e| e > MAX_HOST_OFFSET) {
            return Err(corrupt("image file would exceed the largest qcow2 host offset".into()));
        }
        // The new table and blocks go where no block counts anything yet;
        // metadata there (refcounts that lie) would be overwritten.
        if let Some(c) = (start..start + t + b).find(|&c| reserved.contains(&(c * cs))) {
            return Err(corrupt(format!(
                "metadata at {:#x} lies past the refcount table's reach (run `qemu-img check -r all`)",
                c * cs
            )));
        }
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters;
        self.table.resize(new_len as usize, 0);
        self.blocks.resize_with(new_len as usize, || None);
        for i in 0..b {
            let bi = (old_len + i) as usize;
            self.table[bi] = (start + t + i) * cs;
            self.blocks[bi] = Some(RefBlock { data: vec![0u8; cs as usize].into(), dirty: true });
        }
        for c in start..start + t + b {
            self.set_existing(c, 1)?;
            self.created.push(c * cs);
        }
        self.table_offset = start * cs;
        self.table_clusters = t;
        self.table_dirty = true;
        self.header_dirty = true;
        self.retired_tables.push((old_offset, old_clusters));
        Ok(())
    }
}

/// Reads entry `i` of a packed refcount block. Sub-byte widths are packed
/// from the least significant bit of each byte, as QEMU does.
pub fn get_packed(data: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = data[i / per_byte];
            let shift = (i % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(data[i]),
        4 => u64::from(u16::from_be_bytes([data[2 * i], data[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]])),
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&data[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `i` of a packed refcount block (`value` fits the width).
pub fn set_packed(data: &mut [u8], order: u32, i: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut data[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => data[i] = value as u8,
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => data[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_roundtrip_all_orders() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            for i in 0..entries {
                set_packed(&mut data, order, i, (i as u64 * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(get_packed(&data, order, i), (i as u64 * 7) & max, "order {order} i {i}");
            }
        }
    }

    #[test]
    fn adjust_refuses_overflow_and_underflow() {
        // 1-bit refcounts: 1 is the maximum.
        let mut r = Refcounts::new(9, 0, vec![512], 1024, 1);
        let mut blk = vec![0u8; 512];
        set_packed(&mut blk, 0, 5, 1);
        r.set_block(0, blk.into());
        assert!(r.adjust(5 * 512, 1).unwrap_err().to_string().contains("overflow"));
        assert_eq!(r.adjust(5 * 512, -1).unwrap(), 0);
        assert!(r.adjust(5 * 512, -1).unwrap_err().to_string().contains("below zero"));
        // Cluster far beyond any block.
        assert!(r.adjust(1 << 40, 1).is_err());
    }

    #[test]
    fn alloc_skips_reserved_clusters_whatever_their_refcount() {
        // Clusters 0..3 hold metadata but their refcounts say 0.
        let mut r = Refcounts::new(9, 4, vec![3 * 512], 1024, 1);
        r.set_block(0, vec![0u8; 512].into());
        let reserved: HashSet<u64> = [0, 512, 1024, 3 * 512].into_iter().collect();
        let got: Vec<u64> = (0..3).map(|_| r.alloc_cluster(&reserved).unwrap()).collect();
        assert_eq!(got, vec![4 * 512, 5 * 512, 6 * 512]);
    }

    #[test]
    fn alloc_grows_blocks_and_table() {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 blocks per table cluster.
        let mut r = Refcounts::new(9, 6, vec![512], 1024, 1);
        let mut blk = vec![0u8; 512];
        for c in 0..3 {
            set_packed(&mut blk, 6, c, 1);
        }
        r.set_block(0, blk.into());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let off = r.alloc_cluster(&HashSet::new()).unwrap();
            assert!(seen.insert(off), "cluster {off} handed out twice");
            assert!(off >= 3 * 512);
            assert_eq!(r.get(off >> 9), 1);
        }
        // Every block and the table itself are counted and never handed out.
        for (i, &b) in r.table.iter().enumerate() {
            if b != 0 {
                assert!(!seen.contains(&b), "block {i} at {b} handed out as data");
                assert_eq!(r.get(b >> 9), 1);
            }
        }
        for c in 0..r.table_clusters {
            let off = r.table_offset + c * 512;
            assert!(!seen.contains(&off));
            assert_eq!(r.get(off >> 9), 1);
        }
    }
}
