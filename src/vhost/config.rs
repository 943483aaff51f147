//! Device configuration: virtio feature bits, vhost-user protocol features and
//! the virtio-blk config space the guest reads.

use std::time::Duration;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

/// Sector size the virtio-blk protocol counts in.
pub const SECTOR_SIZE: u64 = 512;

/// Segments per request we advertise: well under the queue size, as QEMU
/// does (126 for 128-entry queues), so a guest without indirect descriptors
/// still fits a whole request in the ring.
pub const SEG_MAX: u32 = 126;

/// Largest single data segment we advertise.
pub const SIZE_MAX: u32 = 1 << 20;

/// Discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// Largest discard / write-zeroes extent in sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;

/// Length of a GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// Settings of one exported block device, validated by the CLI.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    /// Serial number returned by GET_ID (at most 20 bytes).
    pub serial: Vec<u8>,
    /// Threads that run requests which would block (misses, allocation, flush).
    pub io_threads: usize,
    /// How long a queue worker polls for more requests before sleeping, in
    /// microseconds (0: never poll).
    pub poll_us: u64,
    /// Threads per queue: with 2, a pass of many reads runs half of them on
    /// the queue's second thread.
    pub queue_threads: u8,
    /// At stop, how long the requests in flight get to complete while the
    /// frontend is still connected (their interrupts need it), before it is
    /// let go anyway.
    pub stop_drain: Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 1024,
            read_only: false,
            serial: b"driveblk".to_vec(),
            io_threads: 16,
            poll_us: 0,
            queue_threads: 1,
            stop_drain: Duration::from_secs(90),
        }
    }
}

/// Virtio feature bits offered to the frontend.
pub fn virtio_features(read_only: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_MQ)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// vhost-user protocol features: CONFIG is required by QEMU to realize the
/// device, MQ for more than one queue, INFLIGHT_SHMFD for a restart under a
/// running guest (see `inflight`). No packed rings, no IOMMU.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// The virtio-blk config space up to `write_zeroes_may_unmap` (virtio 1.2
/// 5.2.4), little endian. Defined here because virtio-bindings' struct is
/// packed and not `ByteValued`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct VirtioBlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

// SAFETY: plain-old-data, packed, every bit pattern valid.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Offset of the `writeback` byte, the only field a driver writes.
pub const WRITEBACK_OFFSET: u32 = 32;

impl VirtioBlkConfig {
    /// Builds the config space for a disk.
    pub fn new(capacity_bytes: u64, discard_granularity: u64, cfg: &DeviceConfig, writeback: bool) -> Self {
        let granularity_sectors = (discard_granularity / SECTOR_SIZE).clamp(1, u32::MAX as u64) as u32;
        VirtioBlkConfig {
            capacity: (capacity_bytes / SECTOR_SIZE).to_le(),
            size_max: SIZE_MAX.to_le(),
            seg_max: SEG_MAX.to_le(),
            blk_size: (SECTOR_SIZE as u32).to_le(),
            // 4 KiB physical blocks: guests align their I/O to them.
            physical_block_exp: 3,
            min_io_size: 8u16.to_le(),
            writeback: writeback as u8,
            num_queues: cfg.num_queues.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: MAX_DISCARD_SEG.to_le(),
            discard_sector_alignment: granularity_sectors.to_le(),
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_write_zeroes_seg: MAX_DISCARD_SEG.to_le(),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Returns exactly `size` bytes starting at `offset`; bytes past the end
    /// of the structure read as zero (QEMU may ask for more than we define).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < bytes.len() {
            let n = (bytes.len() - start).min(out.len());
            out[..n].copy_from_slice(&bytes[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_virtio_spec() {
        assert_eq!(std::mem::size_of::<VirtioBlkConfig>(), 60);
        let c = VirtioBlkConfig::new(1 << 30, 65536, &DeviceConfig::default(), true);
        let b = c.read(0, 60);
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), (1 << 30) / 512);
        assert_eq!(b[WRITEBACK_OFFSET as usize], 1);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 128);
        // Reads past the end are zero-padded to the requested size.
        assert_eq!(c.read(56, 16).len(), 16);
        assert_eq!(c.read(100, 4), vec![0; 4]);
    }
}
