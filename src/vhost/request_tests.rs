//! Hostile and malformed descriptor chains, fed through virtio-queue's mock
//! queue: every one must yield a status (or a zero used length when there is
//! nowhere to put one), never a panic.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use crate::format::raw::RawDisk;
use crate::format::{Disk, DiskError, DiskResult, IoMode, IoVec};
use crate::tier::{LocalFile, Storage};
use crate::vhost::request::{status_for, GuestMem, Operation, Request, STATUS_OK};

const MEM_SIZE: u64 = 0x80_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const CAPACITY: u64 = 4 << 20;

struct Fixture {
    mem: Arc<GuestMem>,
    disk: Arc<dyn Disk>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_in(&[(GuestAddress(0), MEM_SIZE as usize)])
}

/// A fixture whose guest memory is made of these regions.
fn fixture_in(regions: &[(GuestAddress, usize)]) -> Fixture {
    let mem = Arc::new(GuestMem::from_ranges(regions).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    std::fs::write(&p, (0..CAPACITY).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&p, false).unwrap());
    let disk: Arc<dyn Disk> = Arc::new(RawDisk::new(storage, false).unwrap());
    Fixture { mem, disk, _dir: dir }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, if write { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
}

fn header(mem: &GuestMem, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Parses a chain, runs it like the queue worker does, returns (status, used len).
fn run(f: &Fixture, descs: &[RawDescriptor], read_only: bool) -> (Option<u8>, u32, Request) {
    let q = MockSplitQueue::new(&*f.mem, 256);
    let chain = q.build_desc_chain(descs).unwrap();
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let req = Request::parse(chain, f.mem.clone(), f.disk.capacity(), read_only);
    let (status, written) = match req.refused() {
        Some((s, _)) => (s, 0),
        None => match req.execute(&*f.disk, IoMode::Blocking, false, b"serial-123") {
            Ok(n) => (STATUS_OK, n),
            Err(e) => (status_for(&e), 0),
        },
    };
    let used = req.complete(status, written);
    let st: u8 = f.mem.read_obj(GuestAddress(STATUS)).unwrap();
    (if st == 0xff { None } else { Some(st) }, used, req)
}

#[test]
fn valid_read_fills_guest_memory() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 2);
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 1024, true), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK as u8));
    assert_eq!(used, 1025);
    let mut got = vec![0u8; 1024];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let want: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, want);
}

/// Buffers that cross from one guest memory region into the next (QEMU
/// splits guest RAM around holes) are served whole; one that runs into a
/// hole is refused. Most buffers lie in one region and take a single
/// lookup; these must take the general path.
#[test]
fn buffers_spanning_guest_memory_regions() {
    let half = MEM_SIZE / 2;
    let f = fixture_in(&[(GuestAddress(0), half as usize), (GuestAddress(half), half as usize)]);
    let (hdr, data) = (half - 8, half - 512);
    header(&f.mem, hdr, VIRTIO_BLK_T_IN, 2);
    // First the header straddles the boundary (in one descriptor), then the data buffer.
    let (st, used, _) = run(&f, &[desc(hdr, 16, false), desc(data - 0x1000, 1024, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_OK as u8), 1025));
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 2);
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(data, 1024, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_OK as u8), 1025));
    let mut got = vec![0u8; 1024];
    f.mem.read_slice(&mut got, GuestAddress(data)).unwrap();
    let want: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(got, want, "both halves of the buffer hold the read");
    // A region with a hole after it: a buffer running into the hole.
    let g = fixture_in(&[(GuestAddress(0), half as usize), (GuestAddress(half + 0x10_0000), half as usize)]);
    header(&g.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (st, used, _) = run(&g, &[desc(HDR, 16, false), desc(half - 512, 1024, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_IOERR as u8), 1));
}

#[test]
fn header_data_and_status_may_share_descriptors() {
    let f = fixture();
    // Header split over two descriptors, data and status in one descriptor.
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut h = [0u8; 16];
    f.mem.read_slice(&mut h, GuestAddress(HDR)).unwrap();
    f.mem.write_slice(&h[8..], GuestAddress(HDR + 0x100)).unwrap();
    let (_, used, req) = run(&f, &[desc(HDR, 8, false), desc(HDR + 0x100, 8, false), desc(DATA, 513, true)], false);
    assert!(matches!(req.op, Operation::Read { offset: 0, .. }), "{:?}", req.op);
    assert_eq!(used, 513);
    let st: u8 = f.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn write_then_flush() {
    let f = fixture();
    f.mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 10);
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_OK as u8), 1));
    header(&f.mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK as u8));
    let mut buf = vec![0u8; 512];
    let v = crate::format::IoVec::from_slice(&mut buf);
    f.disk.read(5120, &v, IoMode::Blocking).unwrap();
    drop(v);
    assert_eq!(buf, vec![0xab; 512]);
}

#[test]
fn buffers_outside_guest_memory_are_ioerr() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(MEM_SIZE - 256, 512, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_IOERR as u8), 1));
    // Header itself outside memory.
    let (st, _, _) = run(&f, &[desc(MEM_SIZE + 4096, 16, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn missing_or_unreachable_status_gives_zero_used_len() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    // No writable descriptor at all.
    let (st, used, _) = run(&f, &[desc(HDR, 16, false)], false);
    assert_eq!((st, used), (None, 0));
    // Status byte outside guest memory.
    let (_, used, _) = run(&f, &[desc(HDR, 16, false), desc(MEM_SIZE + 10, 1, true)], false);
    assert_eq!(used, 0);
    // Zero-length writable descriptor.
    let (_, used, _) = run(&f, &[desc(HDR, 16, false), desc(STATUS, 0, true)], false);
    assert_eq!(used, 0);
}

#[test]
fn wrong_direction_and_short_header_are_ioerr() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (st, _, _) =
        run(&f, &[desc(HDR, 16, false), desc(DATA, 512, true), desc(DATA, 512, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
    let (st, _, _) = run(&f, &[desc(HDR, 10, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn out_of_range_and_unaligned_lengths_are_ioerr() {
    let f = fixture();
    for sector in [CAPACITY / 512, CAPACITY / 512 - 1 + 1, u64::MAX, u64::MAX / 512] {
        header(&f.mem, HDR, VIRTIO_BLK_T_IN, sector);
        let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)], false);
        assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8), "sector {sector}");
    }
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 100, true), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, CAPACITY / 512 - 1);
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 1024, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn unknown_type_is_unsupp() {
    let f = fixture();
    for t in [2u32, 99, u32::MAX] {
        header(&f.mem, HDR, t, 0);
        let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(STATUS, 1, true)], false);
        assert_eq!(st, Some(VIRTIO_BLK_S_UNSUPP as u8), "type {t}");
    }
}

#[test]
fn writes_to_read_only_disk_are_ioerr() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 512, false), desc(STATUS, 1, true)], true);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
    header(&f.mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    seg(&f.mem, DATA, 0, 8, 0);
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 16, false), desc(STATUS, 1, true)], true);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
}

fn seg(mem: &GuestMem, at: u64, sector: u64, n: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_validate_segments() {
    let f = fixture();
    let chain = |n: u32| [desc(HDR, 16, false), desc(DATA, 16 * n, false), desc(STATUS, 1, true)];
    // Valid write-zeroes with unmap zeroes the range.
    header(&f.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 4);
    seg(&f.mem, DATA, 4, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (st, _, _) = run(&f, &chain(1), false);
    assert_eq!(st, Some(VIRTIO_BLK_S_OK as u8));
    let mut buf = vec![1u8; 4096];
    let v = crate::format::IoVec::from_slice(&mut buf);
    f.disk.read(2048, &v, IoMode::Blocking).unwrap();
    drop(v);
    assert!(buf.iter().all(|&b| b == 0));
    // Unmap flag on a discard: unsupported.
    header(&f.mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    seg(&f.mem, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(run(&f, &chain(1), false).0, Some(VIRTIO_BLK_S_UNSUPP as u8));
    // Reserved flag bits: unsupported.
    header(&f.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(&f.mem, DATA, 0, 8, 0x4);
    assert_eq!(run(&f, &chain(1), false).0, Some(VIRTIO_BLK_S_UNSUPP as u8));
    // Too many segments.
    header(&f.mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    for i in 0..33 {
        seg(&f.mem, DATA + 16 * i, i * 8, 8, 0);
    }
    assert_eq!(run(&f, &chain(33), false).0, Some(VIRTIO_BLK_S_UNSUPP as u8));
    // Past the end, and sector overflow.
    seg(&f.mem, DATA, CAPACITY / 512 - 4, 8, 0);
    assert_eq!(run(&f, &chain(1), false).0, Some(VIRTIO_BLK_S_IOERR as u8));
    seg(&f.mem, DATA, u64::MAX - 2, 8, 0);
    assert_eq!(run(&f, &chain(1), false).0, Some(VIRTIO_BLK_S_IOERR as u8));
    // Segment data not a multiple of 16 bytes.
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 20, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
    // No segment at all.
    let (st, _, _) = run(&f, &[desc(HDR, 16, false), desc(STATUS, 1, true)], false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
}

#[test]
fn get_id_returns_serial() {
    let f = fixture();
    header(&f.mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    f.mem.write_slice(&[0xeeu8; 20], GuestAddress(DATA)).unwrap();
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_OK as u8), 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert_eq!(&id[10..], &[0u8; 10]);
    // A shorter buffer gets a truncated id, not an overflow.
    let (st, used, _) = run(&f, &[desc(HDR, 16, false), desc(DATA, 4, true), desc(STATUS, 1, true)], false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_OK as u8), 5));
}

#[test]
fn requests_past_size_max_or_seg_max_are_refused() {
    use crate::vhost::config::{SEG_MAX, SIZE_MAX};
    let f = fixture();
    // A segment longer than size_max is still served (libblkio sends one
    // descriptor per buffer, whatever its size) ...
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        header(&f.mem, HDR, t, 0);
        let len = SIZE_MAX + 512;
        let (st, _, req) =
            run(&f, &[desc(HDR, 16, false), desc(DATA, len, t == VIRTIO_BLK_T_IN), desc(STATUS, 1, true)], false);
        assert_eq!(st, Some(VIRTIO_BLK_S_OK as u8), "type {t}: {:?}", req.op);
    }
    // ... but a request past seg_max x size_max in total is refused before
    // its buffers are even looked up.
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let big = [desc(HDR, 16, false), desc(DATA, 1 << 30, true), desc(STATUS, 1, true)];
    let (st, _, req) = run(&f, &big, false);
    assert_eq!(st, Some(VIRTIO_BLK_S_IOERR as u8));
    assert!(req.refused().is_some_and(|(_, r)| r.contains("size_max")), "{:?}", req.op);
    // seg_max data segments are served; one more is refused, with a status.
    for (n, want) in [(SEG_MAX as u64, VIRTIO_BLK_S_OK), (SEG_MAX as u64 + 1, VIRTIO_BLK_S_IOERR)] {
        header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
        let mut chain = vec![desc(HDR, 16, false)];
        chain.extend((0..n).map(|i| desc(DATA + i * 512, 512, true)));
        chain.push(desc(STATUS, 1, true));
        let (st, used, req) = run(&f, &chain, false);
        assert_eq!(st, Some(want as u8), "{n} segments: {:?}", req.op);
        assert!(used >= 1);
    }
    // A chain far longer than that (an indirect table can hold 65535
    // descriptors) is refused without collecting its pieces; the status
    // byte of its last descriptor still gets the error.
    header(&f.mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![desc(HDR, 16, false)];
    chain.extend((0..200u64).map(|i| desc(DATA + i * 512, 512, true)));
    chain.push(desc(STATUS, 1, true));
    let (st, used, req) = run(&f, &chain, false);
    assert_eq!((st, used), (Some(VIRTIO_BLK_S_IOERR as u8), 1));
    assert!(req.refused().is_some_and(|(_, r)| r.contains("descriptors")), "{:?}", req.op);
}

/// Counts the flushes that reach the disk.
struct FlushCounting {
    inner: Arc<dyn Disk>,
    flushes: AtomicUsize,
}

impl Disk for FlushCounting {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        self.inner.read(offset, bufs, mode)
    }
    fn write(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        self.inner.write(offset, bufs, mode)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, mode: IoMode) -> DiskResult<()> {
        self.inner.write_zeroes(offset, len, unmap, mode)
    }
    fn discard(&self, offset: u64, len: u64, mode: IoMode) -> DiskResult<()> {
        self.inner.discard(offset, len, mode)
    }
    fn flush(&self, mode: IoMode) -> DiskResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush(mode)
    }
    fn describe(&self) -> String {
        "flush-counting test disk".into()
    }
}

/// In write-through mode a completed WRITE_ZEROES is stable, as a write is
/// (virtio 1.2 5.2.6.2): it is flushed before it completes, and so not run
/// inline where a flush may not wait. In write-back mode it is not flushed.
#[test]
fn write_zeroes_is_flushed_in_write_through_mode() {
    let f = fixture();
    let disk = FlushCounting { inner: f.disk.clone(), flushes: Default::default() };
    let flushes = || disk.flushes.load(Ordering::SeqCst);
    header(&f.mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 4);
    seg(&f.mem, DATA, 4, 8, 0);
    let q = MockSplitQueue::new(&*f.mem, 256);
    let chain = q.build_desc_chain(&[desc(HDR, 16, false), desc(DATA, 16, false), desc(STATUS, 1, true)]).unwrap();
    let req = Request::parse(chain, f.mem.clone(), f.disk.capacity(), false);
    assert!(matches!(req.op, Operation::WriteZeroes(_)), "{:?}", req.op);

    let nonblocking = req.execute(&disk, IoMode::NonBlocking, true, b"");
    assert!(matches!(nonblocking, Err(DiskError::WouldBlock)), "{nonblocking:?}");
    req.execute(&disk, IoMode::Blocking, true, b"").unwrap();
    assert_eq!(flushes(), 1, "write-through: flushed before completion");
    req.execute(&disk, IoMode::Blocking, false, b"").unwrap();
    assert_eq!(flushes(), 1, "write-back: no flush");
}
