//! L1 and L2 entries: decoding a guest cluster's (or subcluster's) state from
//! the raw 64-bit words, and the in-memory L2 table.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits 9..55 of an L1/L2 entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly 1: it may be written in place.
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entries only: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Extended L2: the low half of the bitmap says "allocated", the high half
/// "reads as zeroes", one bit per subcluster.
pub const SUBCLUSTERS: u32 = 32;
pub const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff << 32;

/// Geometry needed to decode entries.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn subclusters(&self) -> u32 {
        if self.extended {
            SUBCLUSTERS
        } else {
            1
        }
    }
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }
    /// Bit where the compressed-size field starts (spec: x = 62 - (cluster_bits - 8)).
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// One L2 entry: the standard word plus the subcluster bitmap (0 when the
/// image has no extended L2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

/// The state of one guest cluster, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Compressed data at `host`, `csize` bytes long (includes trailing slack).
    Compressed { host: u64, csize: u64 },
    /// A host cluster is allocated (possibly with the zero flag or, with
    /// extended L2, with only some subclusters in use).
    Allocated { host: u64, copied: bool },
    /// No host cluster.
    None,
}

/// The state of one subcluster (the whole cluster without extended L2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    /// Read from the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Data at this host offset (the subcluster's start).
    Data { host: u64 },
    /// Part of a compressed cluster.
    Compressed { host: u64, csize: u64 },
}

impl L2Entry {
    pub fn kind(&self, g: &Geometry) -> ClusterKind {
        if self.word & COMPRESSED != 0 {
            let shift = g.csize_shift();
            let host = self.word & ((1u64 << shift) - 1);
            let sectors = ((self.word & !COPIED & !COMPRESSED) >> shift) + 1;
            let csize = sectors * 512 - (host & 511);
            return ClusterKind::Compressed { host, csize };
        }
        let host = self.word & OFFSET_MASK;
        if host == 0 {
            ClusterKind::None
        } else {
            ClusterKind::Allocated { host, copied: self.word & COPIED != 0 }
        }
    }

    /// Decodes subcluster `sc` (0 without extended L2). Errors name what is
    /// inconsistent; the caller adds the guest offset.
    pub fn sub_state(&self, g: &Geometry, sc: u32) -> Result<SubState, String> {
        match self.kind(g) {
            ClusterKind::Compressed { host, csize } => Ok(SubState::Compressed { host, csize }),
            ClusterKind::Allocated { host, .. } => {
                if host & (g.cluster_size() - 1) != 0 {
                    return Err(format!("data cluster offset {host:#x} is not cluster-aligned"));
                }
                if g.extended {
                    let alloc = self.bitmap & (1 << sc) != 0;
                    let zero = self.bitmap & (1 << (sc + 32)) != 0;
                    match (alloc, zero) {
                        (true, true) => Err(format!("subcluster {sc} both allocated and zero")),
                        (true, false) => Ok(SubState::Data { host: host + u64::from(sc) * g.subcluster_size() }),
                        (false, true) => Ok(SubState::Zero),
                        (false, false) => Ok(SubState::Unallocated),
                    }
                } else if self.word & ZERO != 0 {
                    Ok(SubState::Zero)
                } else {
                    Ok(SubState::Data { host })
                }
            }
            ClusterKind::None => {
                if g.extended {
                    if self.bitmap & BITMAP_ALL_ALLOC != 0 {
                        return Err("unallocated cluster with allocated subclusters".into());
                    }
                    if self.bitmap & (1 << (sc + 32)) != 0 {
                        Ok(SubState::Zero)
                    } else {
                        Ok(SubState::Unallocated)
                    }
                } else if self.word & ZERO != 0 {
                    Ok(SubState::Zero)
                } else {
                    Ok(SubState::Unallocated)
                }
            }
        }
    }

    /// True if every subcluster in `[first, last]` can be written in place
    /// (allocated data, refcount 1, not compressed, not zero-flagged).
    pub fn writable_in_place(&self, g: &Geometry, first: u32, last: u32) -> bool {
        match self.kind(g) {
            ClusterKind::Allocated { host, copied: true } if host & (g.cluster_size() - 1) == 0 => {
                if g.extended {
                    let mask = bit_range(first, last);
                    self.bitmap & mask == mask && self.bitmap & (mask << 32) == 0
                } else {
                    self.word & ZERO == 0
                }
            }
            _ => false,
        }
    }
}

/// Bits `first..=last` set.
pub fn bit_range(first: u32, last: u32) -> u64 {
    let n = last - first + 1;
    (if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }) << first
}

/// Host clusters a compressed cluster's bytes occupy (each holds a refcount).
pub fn compressed_clusters(host: u64, csize: u64, cluster_size: u64) -> impl Iterator<Item = u64> {
    let first = host & !(cluster_size - 1);
    let last = (host + csize.max(1) - 1) & !(cluster_size - 1);
    (0..=(last - first) / cluster_size).map(move |i| first + i * cluster_size)
}

/// An L2 table held in memory.
pub struct L2Table {
    /// Raw entries, `words()` per guest cluster.
    pub words: Box<[u64]>,
    /// Changed since last written.
    pub dirty: bool,
    /// Tick of the last lookup, for evicting clean tables under a cache cap.
    pub last_used: AtomicU64,
}

impl L2Table {
    pub fn from_bytes(buf: &[u8]) -> Self {
        let words = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Self { words, dirty: false, last_used: AtomicU64::new(0) }
    }

    /// A new, dirty table with these entries.
    pub fn from_words(words: Box<[u64]>) -> Self {
        Self { words, dirty: true, last_used: AtomicU64::new(0) }
    }

    pub fn zeroed(cluster_size: u64) -> Self {
        Self {
            words: vec![0u64; (cluster_size / 8) as usize].into_boxed_slice(),
            dirty: true,
            last_used: AtomicU64::new(0),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    pub fn entry(&self, g: &Geometry, index: usize) -> L2Entry {
        if g.extended {
            L2Entry { word: self.words[2 * index], bitmap: self.words[2 * index + 1] }
        } else {
            L2Entry { word: self.words[index], bitmap: 0 }
        }
    }

    pub fn set_entry(&mut self, g: &Geometry, index: usize, e: L2Entry) {
        if g.extended {
            self.words[2 * index] = e.word;
            self.words[2 * index + 1] = e.bitmap;
        } else {
            self.words[index] = e.word;
        }
        self.dirty = true;
    }

    pub fn touch(&self, tick: u64) {
        self.last_used.store(tick, Ordering::Relaxed);
    }
}
