//! QCOW2 images (v2 and v3) behind the [`Disk`](crate::format::Disk) trait:
//! L1/L2 translation with all metadata held in memory, cluster allocation
//! with copy-on-write, refcounts, zero clusters, discard, compressed
//! clusters, extended L2 (subclusters), backing chains, and internal
//! snapshots (listed, served read-only, and preserved by copy-on-write of
//! shared L2 tables and data clusters when the active layer is written).
//!
//! Crash consistency comes from write ordering alone, so the dirty bit is
//! never needed: guest data is written straight to its cluster, while L2
//! tables, refcount blocks and the tables above them change only in memory
//! until `flush`, which writes refcount blocks, syncs, the refcount table
//! (and header), syncs, L2 tables, syncs, the L1 table, syncs. Clusters that
//! lose their last reference are freed only after that, so no cluster is
//! reused while durable metadata still points at it. A crash at any point
//! leaves at worst leaked clusters. Images QEMU left dirty (lazy refcounts)
//! get their refcounts rebuilt when opened writable.

mod backing;
mod compressed;
mod engine;
mod header;
mod l2;
mod metadata;
mod refcount;
mod repair;
mod snapshot;

use crate::format::{DiskError, DiskResult};
use crate::tier::Storage;

pub use backing::{BackingOpener, LocalBackingOpener, NoBacking, MAX_BACKING_DEPTH};
pub use engine::Qcow2Disk;
pub use header::{refusal_in_head, CompressionType};
pub use snapshot::Snapshot;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct Qcow2Options {
    /// Refuse writes (also implied by a read-only storage or a snapshot).
    pub read_only: bool,
    /// Serve this internal snapshot (matched by id, then by name), read-only.
    pub snapshot: Option<String>,
    /// Upper bound for L2 tables held in memory, in bytes. `None` keeps the
    /// whole disk's L2 tables resident (no I/O on lookups). A smaller cap
    /// loads tables on demand and evicts clean ones.
    pub metadata_cache_bytes: Option<u64>,
    /// Most metadata (L2 tables, refcount blocks) the engine asks the
    /// storage to pin and keeps resident without a cache cap, in bytes of
    /// [`PIN_GRANULE`] units touched; `None`: [`DEFAULT_METADATA_PIN_BYTES`].
    /// An image whose metadata is larger (or scattered, so each table pins
    /// a whole tier chunk) gets the rest loaded on demand instead.
    pub metadata_pin_bytes: Option<u64>,
}

/// Default for [`Qcow2Options::metadata_pin_bytes`]: the L2 tables and
/// 16-bit refcount blocks of a fully allocated 1 TiB image with 64 KiB
/// clusters (160 MiB) fit with room to spare.
pub const DEFAULT_METADATA_PIN_BYTES: u64 = 256 << 20;

/// The unit pinned metadata is charged in: a tiered store pins whole chunks
/// (1 MiB by default), so one 64 KiB L2 table alone in its chunk costs a
/// chunk. Charging by granule keeps a fragmented image from pinning many
/// times its metadata size.
pub const PIN_GRANULE: u64 = 1 << 20;

/// What `qemu-img info` would say, for the CLI.
#[derive(Clone, Debug)]
pub struct Qcow2Info {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub snapshots: Vec<Snapshot>,
    /// Incompatible bit 0: the image was not closed cleanly (lazy refcounts).
    pub dirty: bool,
    /// Incompatible bit 1: QEMU found corruption.
    pub corrupt: bool,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub compression: CompressionType,
}

/// Reads an image's header and snapshot table without opening it.
pub fn info(storage: &dyn Storage) -> DiskResult<Qcow2Info> {
    let h = header::Header::read(storage)?;
    let (snapshots, _) = snapshot::read_table(storage, h.snapshots_offset, h.nb_snapshots)?;
    Ok(Qcow2Info {
        version: h.version,
        virtual_size: h.size,
        cluster_size: h.cluster_size(),
        refcount_bits: 1 << h.refcount_order,
        backing_file: h.backing_file.clone(),
        backing_format: h.backing_format.clone(),
        snapshots,
        dirty: h.dirty(),
        corrupt: h.corrupt_bit(),
        lazy_refcounts: h.lazy_refcounts(),
        extended_l2: h.extended_l2(),
        compression: h.compression,
    })
}

/// An inconsistency in the image.
pub(crate) fn corrupt(msg: String) -> DiskError {
    DiskError::Corrupt(msg)
}

/// A feature of this image we do not implement; the message says which.
/// Not an I/O error: its text would be printed twice in an error chain
/// (once in the error, once as its source), after an "image offset 0"
/// that means nothing here.
pub(crate) fn unsupported(msg: String) -> DiskError {
    DiskError::Unsupported(msg)
}
