//! Fuzz target: arbitrary bytes as a descriptor chain plus the guest memory
//! it points at, parsed into a virtio-blk request and run against a small
//! raw disk, as the queue worker does. Every chain must end with a status
//! (or a zero used length when it has nowhere to put one); any panic, hang
//! or huge allocation is a bug. Guest memory is one region, two adjacent
//! regions, or two regions around a hole (as a guest with RAM split around
//! an MMIO window has), picked by the input's length, so buffers that
//! straddle regions or run into a hole are fuzzed too.
#![no_main]

use std::sync::Arc;

use driveblk::format::raw::RawDisk;
use driveblk::format::{Disk, IoMode};
use driveblk::tier::Storage;
use driveblk::vhost::request::{status_for, GuestMem, Request, STATUS_OK};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

#[path = "mem_storage.rs"]
mod mem_storage;
use mem_storage::Mem;

/// Guest memory: the ring at 0, buffers from BUFS on. Descriptor addresses
/// are BUFS + a 16-bit offset, so some reach past the end of memory.
const MEM: usize = 0x1_8000;
const BUFS: u64 = 0x1000;
const QUEUE: u16 = 256;
const DISK: usize = 64 << 10;
/// Where the second region begins in the split layouts: past the rings,
/// inside the range descriptors reach.
const SPLIT: u64 = 0x9000;
/// The hole between the regions in the layout that has one.
const HOLE: u64 = 0x1000;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    // Up to 200 descriptors of 6 bytes: offset u16, len u16 (a few long
    // ones), flags (bit 0: device-writable), spare.
    let n = (n as usize % 200) + 1;
    if rest.len() < n * 6 {
        return;
    }
    let (table, fill) = rest.split_at(n * 6);
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(6)
        .map(|d| {
            let off = u64::from(u16::from_le_bytes([d[0], d[1]]));
            let mut len = u32::from(u16::from_le_bytes([d[2], d[3]]));
            if d[5] & 0x80 != 0 {
                // Occasionally huge: past size_max, past guest memory.
                len = len.wrapping_mul(4099);
            }
            let flags = if d[4] & 1 != 0 { virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(BUFS + off, len, flags, 0))
        })
        .collect();

    // The same bytes of memory in every layout; in the split ones the second
    // region starts at SPLIT, or HOLE bytes above it.
    let second = match (data.len() / 7) % 3 {
        0 => None,
        1 => Some(SPLIT),
        _ => Some(SPLIT + HOLE),
    };
    let ranges = match second {
        None => vec![(GuestAddress(0), MEM)],
        Some(at) => vec![(GuestAddress(0), SPLIT as usize), (GuestAddress(at), MEM - SPLIT as usize)],
    };
    let Ok(mem) = GuestMem::from_ranges(&ranges) else { return };
    let mem = Arc::new(mem);
    // The rest of the input is what the buffers hold (headers, segments),
    // from BUFS on, continuing in the second region after a split.
    let fill = &fill[..fill.len().min(MEM - BUFS as usize)];
    let (low, high) = fill.split_at(fill.len().min((SPLIT - BUFS) as usize));
    if mem.write_slice(low, GuestAddress(BUFS)).is_err()
        || mem.write_slice(high, GuestAddress(second.unwrap_or(SPLIT))).is_err()
    {
        return;
    }
    let q = MockSplitQueue::new(&*mem, QUEUE);
    let Ok(chain) = q.build_desc_chain(&descs) else { return };

    let storage: Arc<dyn Storage> = Arc::new(Mem::new(vec![0x5a; DISK]));
    let Ok(disk) = RawDisk::new(storage, false) else { return };
    let read_only = data.len() % 7 == 0;
    let req = Request::parse(chain, mem.clone(), disk.capacity(), read_only);
    let (status, written) = match req.refused() {
        Some((s, _)) => (s, 0),
        None => match req.execute(&disk, IoMode::NonBlocking, false, b"fuzz") {
            Ok(n) => (STATUS_OK, n),
            Err(e) => match req.execute(&disk, IoMode::Blocking, false, b"fuzz") {
                Ok(n) => (STATUS_OK, n),
                Err(_) => (status_for(&e), 0),
            },
        },
    };
    let used = req.complete(status, written);
    // The used length never claims more than the chain's writable bytes + 1.
    let writable: u64 = descs
        .iter()
        .map(|d| SplitDescriptor::from(*d))
        .filter(|d| d.flags() & virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 != 0)
        .map(|d| u64::from(d.len()))
        .sum();
    assert!(u64::from(used) <= writable + 1, "used {used} > writable {writable}");
});
