//! The queue worker against a hostile ring, driven without a socket: a
//! `VringRwLock` over mock guest memory, chains written by virtio-queue's
//! mock queue, a disk whose blocking reads wait on a gate.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use super::{resume_event, BlockBackend, Vring};
use crate::format::raw::RawDisk;
use crate::format::{Disk, DiskError, DiskResult, IoMode, IoVec};
use crate::tier::{LocalFile, Storage};
use crate::vhost::config::DeviceConfig;
use crate::vhost::pool::IoPool;
use crate::vhost::request::GuestMem;

const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const USED: u64 = 0x8000;

/// The `Disk` methods a test disk passes to its `inner` `RawDisk` as they
/// are (every one but `read` and `describe`).
macro_rules! forward_to_inner {
    () => {
        fn capacity(&self) -> u64 {
            self.inner.capacity()
        }
        fn read_only(&self) -> bool {
            false
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
            self.inner.flush(mode)
        }
    };
}

/// Reads never complete inline; blocking reads wait until the gate opens.
struct GatedDisk {
    inner: RawDisk,
    open: Mutex<bool>,
    opened: Condvar,
    blocked: AtomicBool,
}

impl Disk for GatedDisk {
    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        if mode == IoMode::NonBlocking {
            return Err(DiskError::WouldBlock);
        }
        let mut open = self.open.lock();
        while !*open {
            self.blocked.store(true, AtomicOrdering::SeqCst);
            self.opened.wait(&mut open);
        }
        drop(open);
        self.inner.read(offset, bufs, mode)
    }
    forward_to_inner!();
    fn describe(&self) -> String {
        "gated test disk".into()
    }
}

fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, if write { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
}

#[test]
fn republished_descriptors_are_capped_in_flight_and_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&img, false).unwrap());
    let disk = Arc::new(GatedDisk {
        inner: RawDisk::new(storage, false).unwrap(),
        open: Mutex::new(false),
        opened: Condvar::new(),
        blocked: AtomicBool::new(false),
    });

    let gm = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let atomic = GuestMemoryAtomic::new(gm.clone());
    // One valid read chain at head 0 ...
    let mock = MockSplitQueue::new(&gm, QSIZE);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    gm.write_slice(&h, GuestAddress(HDR)).unwrap();
    mock.build_desc_chain(&[desc(HDR, 16, false), desc(DATA, 512, true), desc(STATUS, 1, true)]).unwrap();
    // ... republished: every avail entry names head 0, and the guest keeps
    // publishing a full ring more each time we look (virtio-queue refuses an
    // avail index more than a ring ahead, so a full ring per pass is the most
    // it can do; while those chains are in flight that is still unbounded).
    for i in 0..QSIZE as usize {
        mock.avail().ring().ref_at(i).unwrap().store(0u16.to_le());
    }
    let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    // Not the mock's used ring: MockSplitQueue places it over the end of
    // its avail ring (it measures the avail ring in entries, not bytes).
    vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, USED).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let pool = Arc::new(IoPool::new(2, usize::from(QSIZE)).unwrap());
    let backend = BlockBackend::new(disk.clone(), cfg, pool.clone()).unwrap();
    backend.update_memory(atomic).unwrap();
    let vrings = [vring.clone()];

    let mut published = 0u16;
    for _ in 0..10 {
        published = vring.queue_next_avail() + QSIZE;
        mock.avail().idx().store(published.to_le());
        backend.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        let inflight = backend.shared.inflight[0].state.lock().count;
        assert!(inflight <= usize::from(QSIZE), "{inflight} requests in flight on a {QSIZE}-entry queue");
    }
    assert_eq!(vring.queue_next_avail(), QSIZE, "popped past the cap");

    // Let the I/O pool finish: each time room frees up the resume event
    // fires and the worker comes back for the chains it left.
    *disk.open.lock() = true;
    disk.opened.notify_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vring.queue_used_idx().unwrap() != published {
        if Instant::now() > deadline {
            let (n, t) = {
                let st = backend.shared.inflight[0].state.lock();
                (st.count, st.throttled)
            };
            panic!(
                "stalled at used index {}, next avail {}, in flight {n}, throttled {t}",
                vring.queue_used_idx().unwrap(),
                vring.queue_next_avail()
            );
        }
        if backend.shared.inflight[0].resume_consumer.consume().is_ok() {
            // What the epoll handler does when the resume event fires.
            backend.handle_event(resume_event(1, 0) as u16, EventSet::IN, &vrings, 0).unwrap();
            let n = backend.shared.inflight[0].state.lock().count;
            assert!(n <= usize::from(QSIZE), "{n} in flight");
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    backend.wait_idle();
    assert_eq!(vring.queue_next_avail(), published);
    let st: u8 = gm.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    pool.shutdown();
}

/// Guest memory and one queue holding a read at head 0 (blocks: a remote
/// miss) followed by three GET_ID requests at heads 3, 6, 9 (complete at
/// once: cached hits), all published.
fn restart_fixture() -> (GuestMem, GuestAddress, GuestAddress) {
    let gm = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mock = MockSplitQueue::new(&gm, QSIZE);
    let chain = |head: u16, op: u32, data_len: u32| {
        let base = HDR + u64::from(head) * 0x1000;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&op.to_le_bytes());
        gm.write_slice(&h, GuestAddress(base)).unwrap();
        let next = VIRTQ_NEXT;
        let descs = [
            SplitDescriptor::new(base, 16, next, head + 1),
            SplitDescriptor::new(base + 0x100, data_len, next | VRING_DESC_F_WRITE as u16, head + 2),
            SplitDescriptor::new(base + 0xf00, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            mock.desc_table().store(head + i as u16, RawDescriptor::from(d)).unwrap();
        }
    };
    chain(0, VIRTIO_BLK_T_IN, 512);
    for (i, head) in [0u16, 3, 6, 9].into_iter().enumerate() {
        if head != 0 {
            chain(head, VIRTIO_BLK_T_GET_ID, 20);
        }
        mock.avail().ring().ref_at(i).unwrap().store(head.to_le());
    }
    mock.avail().idx().store(4u16.to_le());
    let (desc, avail) = (mock.desc_table_addr(), mock.avail_addr());
    (gm, desc, avail)
}

const VIRTQ_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

/// A vring as the frontend sets it up on (re)connect: after a backend that
/// died, QEMU cannot ask it for its avail index and restores `next_avail`
/// from the used index.
fn vring_at(gm: &GuestMem, desc: GuestAddress, avail: GuestAddress) -> Vring {
    let vring = Vring::new(GuestMemoryAtomic::new(gm.clone()), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(desc.0, avail.0, USED).unwrap();
    let used = vring.queue_used_idx().unwrap();
    vring.set_queue_next_used(used);
    vring.set_queue_next_avail(used);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

fn used_heads(gm: &GuestMem) -> Vec<u32> {
    let idx: u16 = gm.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(idx))
        .map(|i| gm.read_obj::<u32>(GuestAddress(USED + 4 + 8 * (i % u64::from(QSIZE)))).unwrap())
        .collect()
}

/// The daemon is killed with a miss pending behind completed hits, and a
/// new one takes over: with the frontend's inflight region the pending read
/// is resubmitted and completed once, the hits are not run again, and
/// popping resumes after the last chain the dead daemon took. Without the
/// region the restart replays a completed request and skips the miss.
fn kill_and_restart(with_region: bool) -> (Vec<u32>, u16) {
    kill_and_restart_into(with_region, false)
}

/// [`kill_and_restart`]; with `stopped`, the new daemon's queue is first
/// stopped (as GET_VRING_BASE leaves it) while a kick and a resume event
/// arrive, and only then started.
fn kill_and_restart_into(with_region: bool, stopped: bool) -> (Vec<u32>, u16) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let open = || RawDisk::new(Arc::new(LocalFile::open(&img, false).unwrap()) as Arc<dyn Storage>, false).unwrap();
    let (gm, desc_addr, avail_addr) = restart_fixture();
    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let (msg, region_file) = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();

    // The first daemon: its read never finishes (the gate stays shut).
    let gated = Arc::new(GatedDisk {
        inner: open(),
        open: Mutex::new(false),
        opened: Condvar::new(),
        blocked: AtomicBool::new(false),
    });
    let pool_a = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let a = BlockBackend::new(gated.clone(), cfg.clone(), pool_a.clone()).unwrap();
    if with_region {
        a.set_inflight_fd(&msg, region_file.try_clone().unwrap()).unwrap();
    }
    a.update_memory(GuestMemoryAtomic::new(gm.clone())).unwrap();
    let va = vring_at(&gm, desc_addr, avail_addr);
    a.handle_event(0, EventSet::IN, &[va], 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gated.blocked.load(AtomicOrdering::SeqCst) {
        assert!(Instant::now() < deadline, "the read never reached the disk");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(used_heads(&gm), vec![3, 6, 9], "the hits complete ahead of the miss");
    // "kill -9": the first daemon is gone for good, its read still pending
    // (its pool thread stays parked on the gate; it never touches the ring).
    std::mem::forget(a);
    std::mem::forget(pool_a);

    let pool_b = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let b = BlockBackend::new(Arc::new(open()), cfg, pool_b.clone()).unwrap();
    if with_region {
        b.set_inflight_fd(&msg, region_file.try_clone().unwrap()).unwrap();
    }
    b.update_memory(GuestMemoryAtomic::new(gm.clone())).unwrap();
    let vb = vring_at(&gm, desc_addr, avail_addr);
    if stopped {
        vb.set_queue_ready(false);
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vb), 0).unwrap();
        b.shared.inflight[0].resume.notify().unwrap();
        b.handle_event(resume_event(1, 0) as u16, EventSet::IN, std::slice::from_ref(&vb), 0).unwrap();
        b.wait_idle();
        assert_eq!(used_heads(&gm), vec![3, 6, 9], "a stopped queue resubmitted nothing");
        assert_eq!(vb.queue_next_avail(), 3, "a stopped queue's index did not move");
        vb.set_queue_ready(true);
    }
    b.handle_event(0, EventSet::IN, std::slice::from_ref(&vb), 0).unwrap();
    b.wait_idle();
    // A second pass finds nothing more to do.
    b.handle_event(0, EventSet::IN, std::slice::from_ref(&vb), 0).unwrap();
    b.wait_idle();
    pool_b.shutdown();
    (used_heads(&gm), vb.queue_next_avail())
}

#[test]
fn restart_with_inflight_region_resubmits_exactly_the_pending_request() {
    let (used, next_avail) = kill_and_restart(true);
    assert_eq!(used, vec![3, 6, 9, 0], "each request completed exactly once");
    assert_eq!(next_avail, 4, "popping resumes after the last chain the dead daemon took");
}

/// A queue stopped by GET_VRING_BASE neither pops nor resubmits, whatever
/// event wakes its worker; started again, it resubmits as usual.
#[test]
fn a_stopped_queue_does_not_move() {
    let (used, next_avail) = kill_and_restart_into(true, true);
    assert_eq!(used, vec![3, 6, 9, 0]);
    assert_eq!(next_avail, 4);
}

#[test]
fn restart_without_inflight_region_replays_and_skips() {
    // What QEMU's used-index restore does without the feature (kept as the
    // reason for it): head 9 runs and completes twice, head 0 never does.
    let (used, _) = kill_and_restart(false);
    assert_eq!(used, vec![3, 6, 9, 9]);
}

/// A guest that chose write-through keeps it across a daemon restart: QEMU
/// never sends the mode byte again, so the next daemon takes it from the
/// inflight region QEMU hands over. A fresh region (a new VM) starts in
/// write-back, the device's default.
#[test]
fn the_guest_cache_mode_survives_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk =
        || Arc::new(RawDisk::new(Arc::new(LocalFile::open(&img, false).unwrap()) as Arc<dyn Storage>, false).unwrap());
    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let pool = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let features = (1u64 << VIRTIO_BLK_F_FLUSH) | (1u64 << VIRTIO_BLK_F_CONFIG_WCE);
    let offset = crate::vhost::config::WRITEBACK_OFFSET;
    let connect = |region: &(vhost::vhost_user::message::VhostUserInflight, std::fs::File)| {
        let b = BlockBackend::new(disk(), cfg.clone(), pool.clone()).unwrap();
        b.acked_features(features);
        b.set_inflight_fd(&region.0, region.1.try_clone().unwrap()).unwrap();
        b
    };
    let region = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let a = connect(&region);
    assert_eq!(a.get_config(offset, 1), vec![1], "write back by default");
    a.set_config(offset, &[0]).unwrap();
    drop(a);

    let b = connect(&region);
    assert_eq!(b.get_config(offset, 1), vec![0], "the restarted daemon is write-through");
    b.set_config(offset, &[1]).unwrap();
    drop(b);
    assert_eq!(connect(&region).get_config(offset, 1), vec![1], "and follows the guest back");

    let fresh = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let c = connect(&fresh);
    assert_eq!(c.get_config(offset, 1), vec![1]);
    pool.shutdown();
}

/// Firmware (SeaBIOS acks VERSION_1 only, no FLUSH) is served
/// write-through, and the guest's driver that negotiates FLUSH and
/// CONFIG_WCE afterwards on the same connection gets write-back again: the
/// mode follows every SET_FEATURES, and a mode the guest chose comes back
/// with its features. Only a mode the guest set is recorded for a
/// restarted daemon.
#[test]
fn the_cache_mode_follows_each_set_features() {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let pool = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let offset = crate::vhost::config::WRITEBACK_OFFSET;
    let (v1, flush, wce) = (1u64 << VIRTIO_F_VERSION_1, 1u64 << VIRTIO_BLK_F_FLUSH, 1u64 << VIRTIO_BLK_F_CONFIG_WCE);
    let backend = || {
        let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&img, false).unwrap());
        BlockBackend::new(Arc::new(RawDisk::new(storage, false).unwrap()), cfg.clone(), pool.clone()).unwrap()
    };
    let region = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let b = backend();
    b.set_inflight_fd(&region.0, region.1.try_clone().unwrap()).unwrap();
    b.acked_features(v1);
    assert_eq!(b.get_config(offset, 1), vec![0], "firmware without FLUSH: write-through");
    b.acked_features(v1 | flush | wce);
    assert_eq!(b.get_config(offset, 1), vec![1], "the guest's driver with FLUSH: write-back");
    b.set_config(offset, &[0]).unwrap();
    b.acked_features(v1);
    b.acked_features(v1 | flush | wce);
    assert_eq!(b.get_config(offset, 1), vec![0], "the mode the guest chose comes back");
    b.acked_features(v1 | flush);
    assert_eq!(b.get_config(offset, 1), vec![1], "FLUSH without CONFIG_WCE: write-back");
    drop(b);

    // The firmware's forced write-through is not recorded: a daemon
    // restarted under the guest's driver serves it write-back.
    let fresh = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let b = backend();
    b.set_inflight_fd(&fresh.0, fresh.1.try_clone().unwrap()).unwrap();
    b.acked_features(v1);
    drop(b);
    let b = backend();
    b.set_inflight_fd(&fresh.0, fresh.1.try_clone().unwrap()).unwrap();
    b.acked_features(v1 | flush | wce);
    assert_eq!(b.get_config(offset, 1), vec![1], "nothing the guest set was recorded");
    drop(b);

    // A record of the old format may be such a forced mode: ignored.
    use std::os::unix::fs::FileExt;
    let old = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    old.1.write_all_at(b"DBI1\x02", old.0.mmap_size - 64).unwrap();
    let b = backend();
    b.set_inflight_fd(&old.0, old.1.try_clone().unwrap()).unwrap();
    b.acked_features(v1 | flush | wce);
    assert_eq!(b.get_config(offset, 1), vec![1], "an old write-through record is ignored");
    pool.shutdown();
}

/// The name of queue 0's second thread.
const HELPER: &str = "driveblk-q0b";

/// Reads that note which thread ran them; some offsets would block (a
/// miss) and some fail.
struct ThreadNotingDisk {
    inner: RawDisk,
    threads: Mutex<Vec<String>>,
    helper_ran: AtomicBool,
    /// The helper's first read stalls (its thread lost the CPU).
    stall_helper_once: AtomicBool,
    blocks_at: [u64; 2],
    fails_at: [u64; 2],
}

impl Disk for ThreadNotingDisk {
    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        if mode == IoMode::NonBlocking {
            let me = std::thread::current().name().unwrap_or("?").to_string();
            if me == HELPER {
                self.helper_ran.store(true, AtomicOrdering::SeqCst);
                if self.stall_helper_once.swap(false, AtomicOrdering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(300));
                }
            } else {
                // The worker takes back a batch the helper has not started:
                // give the helper time to start it.
                let deadline = Instant::now() + Duration::from_secs(5);
                while !self.helper_ran.load(AtomicOrdering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Waited in vain (no second thread): once is enough.
                self.helper_ran.store(true, AtomicOrdering::SeqCst);
            }
            self.threads.lock().push(me);
            if self.blocks_at.contains(&offset) {
                return Err(DiskError::WouldBlock);
            }
        }
        if self.fails_at.contains(&offset) {
            return Err(DiskError::Io { op: "read", offset, source: std::io::Error::other("bad sector") });
        }
        self.inner.read(offset, bufs, mode)
    }
    forward_to_inner!();
    fn describe(&self) -> String {
        "thread-noting test disk".into()
    }
}

const N: u16 = 16;

/// With two threads per queue, one pass of sixteen reads (the helper's
/// first read stalled if `stall_helper`): every read is answered once with
/// the right bytes and status (those that would block go to the I/O pool,
/// those that fail report an I/O error), and a sequential stream after it
/// stays on the worker. The threads that ran the first pass's reads, or
/// None where a second thread needs two CPUs.
fn helper_pass(stall_helper: bool) -> Option<Vec<String>> {
    const QS: u16 = 64;
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: a second thread per queue needs two CPUs");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    // Sector s holds the byte s.
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512) as u8).collect();
    std::fs::write(&img, &bytes).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&img, false).unwrap());
    let sector_of = |i: u16| u64::from(i) * 2;
    let disk = Arc::new(ThreadNotingDisk {
        inner: RawDisk::new(storage, false).unwrap(),
        threads: Mutex::new(Vec::new()),
        helper_ran: AtomicBool::new(false),
        stall_helper_once: AtomicBool::new(stall_helper),
        blocks_at: [sector_of(1) * 512, sector_of(12) * 512],
        fails_at: [sector_of(2) * 512, sector_of(13) * 512],
    });

    let gm = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mock = MockSplitQueue::new(&gm, QS);
    // The i-th read of a batch: 512 bytes of `sector` at head 3i, in the
    // avail ring's slot `slot`.
    let publish = |i: u16, slot: u16, sector: u64| {
        let head = i * 3;
        let base = HDR + u64::from(head) * 0x1000;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        gm.write_slice(&h, GuestAddress(base)).unwrap();
        gm.write_slice(&[0xEE], GuestAddress(base + 0xf00)).unwrap();
        let descs = [
            SplitDescriptor::new(base, 16, VIRTQ_NEXT, head + 1),
            SplitDescriptor::new(base + 0x100, 512, VIRTQ_NEXT | VRING_DESC_F_WRITE as u16, head + 2),
            SplitDescriptor::new(base + 0xf00, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (k, d) in descs.into_iter().enumerate() {
            mock.desc_table().store(head + k as u16, RawDescriptor::from(d)).unwrap();
        }
        mock.avail().ring().ref_at(usize::from(slot % QS)).unwrap().store(head.to_le());
    };
    for i in 0..N {
        publish(i, i, sector_of(i));
    }
    mock.avail().idx().store(N.to_le());
    let vring = Vring::new(GuestMemoryAtomic::new(gm.clone()), QS).unwrap();
    vring.set_queue_size(QS);
    vring.set_queue_info(mock.desc_table_addr().0, mock.avail_addr().0, USED).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);

    let cfg = DeviceConfig { num_queues: 1, queue_size: QS, queue_threads: 2, ..Default::default() };
    let pool = Arc::new(IoPool::new(2, usize::from(QS)).unwrap());
    let backend = BlockBackend::new(disk.clone(), cfg, pool.clone()).unwrap();
    backend.update_memory(GuestMemoryAtomic::new(gm.clone())).unwrap();
    backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    backend.wait_idle();

    assert_eq!(vring.queue_used_idx().unwrap(), N, "every read answered");
    let mut heads: Vec<u32> =
        (0..u64::from(N)).map(|k| gm.read_obj::<u32>(GuestAddress(USED + 4 + 8 * k)).unwrap()).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..u32::from(N)).map(|i| i * 3).collect::<Vec<_>>(), "each read answered once");
    for i in 0..N {
        let base = HDR + u64::from(i * 3) * 0x1000;
        let status: u8 = gm.read_obj(GuestAddress(base + 0xf00)).unwrap();
        if i == 2 || i == 13 {
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "read {i} failed on the disk");
            continue;
        }
        assert_eq!(status, VIRTIO_BLK_S_OK as u8, "read {i}");
        let mut data = [0u8; 512];
        gm.read_slice(&mut data, GuestAddress(base + 0x100)).unwrap();
        assert!(data.iter().all(|&b| b == sector_of(i) as u8), "read {i} got the bytes of another sector");
    }
    let first = disk.threads.lock().clone();

    // A sequential stream stays on one thread: the tier's readahead
    // follows streams per thread.
    for i in 0..N {
        publish(i, N + i, 1000 + u64::from(i));
    }
    mock.avail().idx().store((2 * N).to_le());
    backend.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0).unwrap();
    backend.wait_idle();
    assert_eq!(vring.queue_used_idx().unwrap(), 2 * N, "every read of the stream answered");
    for i in 0..N {
        let base = HDR + u64::from(i * 3) * 0x1000;
        let mut data = [0u8; 512];
        gm.read_slice(&mut data, GuestAddress(base + 0x100)).unwrap();
        assert!(data.iter().all(|&b| b == (1000 + u32::from(i)) as u8), "stream read {i}");
    }
    let threads = disk.threads.lock().clone();
    let on_helper = |t: &[String]| t.iter().filter(|t| t.as_str() == HELPER).count();
    assert_eq!(on_helper(&threads), on_helper(&first), "a stream's reads went to the second thread: {threads:?}");
    pool.shutdown();
    Some(first)
}

/// A busy queue runs some of a pass's reads on its second thread (at
/// most half: the worker takes back those the helper has not started).
#[test]
fn a_busy_queue_runs_reads_on_its_second_thread() {
    let Some(threads) = helper_pass(false) else { return };
    let on_helper = threads.iter().filter(|t| t.as_str() == HELPER).count();
    assert!((1..=usize::from(N / 2)).contains(&on_helper), "reads on the second thread: {threads:?}");
}

/// A helper that lost its CPU in the middle of a read (it shares one with
/// the client, the guest, the worker) holds up only that read: the worker
/// takes back the rest of its half instead of waiting for them.
#[test]
fn a_stalled_second_thread_holds_up_only_the_read_it_runs() {
    let Some(threads) = helper_pass(true) else { return };
    let on_helper = threads.iter().filter(|t| t.as_str() == HELPER).count();
    assert_eq!(on_helper, 1, "the worker waited for the stalled helper's other reads: {threads:?}");
}

/// A backend over a plain raw disk and one ready queue whose avail ring
/// names, in every slot, a GET_ID chain at head 0 (it completes at once);
/// nothing is published yet: `set_avail_idx` does that.
struct GetIdQueue {
    gm: GuestMem,
    avail: GuestAddress,
    vrings: [Vring; 1],
    backend: BlockBackend,
    pool: Arc<IoPool>,
    _dir: tempfile::TempDir,
}

fn get_id_queue() -> GetIdQueue {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&img, false).unwrap());
    let disk = Arc::new(RawDisk::new(storage, false).unwrap());
    let gm = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mock = MockSplitQueue::new(&gm, QSIZE);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    gm.write_slice(&h, GuestAddress(HDR)).unwrap();
    mock.build_desc_chain(&[desc(HDR, 16, false), desc(DATA, 20, true), desc(STATUS, 1, true)]).unwrap();
    for i in 0..usize::from(QSIZE) {
        mock.avail().ring().ref_at(i).unwrap().store(0u16.to_le());
    }
    mock.avail().idx().store(0u16.to_le());
    let (desc_addr, avail) = (mock.desc_table_addr(), mock.avail_addr());
    let vring = vring_at(&gm, desc_addr, avail);
    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let pool = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let backend = BlockBackend::new(disk, cfg, pool.clone()).unwrap();
    backend.update_memory(GuestMemoryAtomic::new(gm.clone())).unwrap();
    GetIdQueue { gm, avail, vrings: [vring], backend, pool, _dir: dir }
}

impl GetIdQueue {
    fn set_avail_idx(&self, idx: u16) {
        self.gm.write_obj(idx.to_le(), self.avail.unchecked_add(2)).unwrap();
    }

    fn set_avail_slot(&self, slot: u16, head: u16) {
        self.gm.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * u64::from(slot % QSIZE))).unwrap();
    }

    fn kick(&self) {
        self.backend.handle_event(0, EventSet::IN, &self.vrings, 0).unwrap();
    }

    /// Runs what the epoll loop would for `time`: a pass whenever the
    /// queue's resume event fires. Returns how many passes it ran.
    fn resumes_within(&self, time: Duration) -> usize {
        let mut passes = 0;
        let until = Instant::now() + time;
        while Instant::now() < until {
            if self.backend.shared.inflight[0].resume_consumer.consume().is_ok() {
                passes += 1;
                self.backend.handle_event(resume_event(1, 0) as u16, EventSet::IN, &self.vrings, 0).unwrap();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        passes
    }

    fn in_flight(&self) -> (usize, bool) {
        let st = self.backend.shared.inflight[0].state.lock();
        (st.count, st.throttled)
    }
}

/// An avail index more than a ring ahead of the worker (virtio-queue
/// refuses it) pops nothing and does not wake the queue by itself: the
/// worker waits for the guest's next kick instead of retrying at once,
/// forever. Once the guest publishes a sane index, it is served again.
#[test]
fn an_avail_index_more_than_a_ring_ahead_does_not_spin_the_queue() {
    let q = get_id_queue();
    q.set_avail_idx(QSIZE + 1);
    q.kick();
    assert_eq!(q.resumes_within(Duration::from_millis(200)), 0, "the queue woke itself");
    assert_eq!(q.in_flight(), (0, false), "the reservation was given back");
    let vring = &q.vrings[0];
    assert_eq!((vring.queue_next_avail(), vring.queue_used_idx().unwrap()), (0, 0), "nothing popped");

    q.set_avail_idx(2);
    q.kick();
    q.backend.wait_idle();
    assert_eq!(vring.queue_used_idx().unwrap(), 2, "served again after the guest's fix");
    let st: u8 = q.gm.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    q.pool.shutdown();
}

/// Counts the warnings logged.
struct CountWarnings(Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, AtomicOrdering::SeqCst);
        }
    }
}

/// Records the message of every INFO event.
struct InfoMessages(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for InfoMessages {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        if *event.metadata().level() == tracing::Level::INFO {
            let mut m = String::new();
            event.record(&mut Message(&mut m));
            self.0.lock().push(m);
        }
    }
}

/// A stop/cont of the VM hands the same daemon the same inflight region
/// again: with nothing in flight that is no restart, and the log does not
/// say "resuming the requests a previous daemon left in flight".
#[test]
fn a_stop_and_cont_with_nothing_in_flight_is_not_logged_as_a_resume() {
    use tracing_subscriber::layer::SubscriberExt;
    let q = get_id_queue();
    let region = crate::vhost::inflight::InflightRegion::create(1, QSIZE).unwrap();
    let infos = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(InfoMessages(infos.clone()));
    tracing::subscriber::with_default(subscriber, || {
        for round in 1..=3 {
            q.backend.set_inflight_fd(&region.0, region.1.try_clone().unwrap()).unwrap();
            q.set_avail_idx(round);
            q.kick();
            q.backend.wait_idle();
        }
    });
    assert_eq!(q.vrings[0].queue_used_idx().unwrap(), 3, "every request served");
    let infos = infos.lock().clone();
    assert!(!infos.iter().any(|m| m.contains("resuming")), "{infos:?}");
    q.pool.shutdown();
}

/// A guest filling its avail ring with a head beyond the queue gets its
/// chains dropped under the log limiter (ten warnings a second), not a
/// warning each, and nothing in the used ring; the queue keeps serving.
#[test]
fn heads_beyond_the_queue_are_dropped_under_the_log_limit() {
    use tracing_subscriber::layer::SubscriberExt;
    let q = get_id_queue();
    let warnings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(CountWarnings(warnings.clone()));
    let vring = &q.vrings[0];
    let bad = 4 * QSIZE;
    tracing::subscriber::with_default(subscriber, || {
        for slot in 0..bad {
            q.set_avail_slot(slot, 0xffff);
        }
        for kick in 1..=4 {
            q.set_avail_idx(kick * QSIZE);
            q.kick();
        }
    });
    q.backend.wait_idle();
    assert_eq!(vring.queue_next_avail(), bad, "every chain was taken");
    assert_eq!(vring.queue_used_idx().unwrap(), 0, "none reached the used ring");
    assert_eq!(q.in_flight(), (0, false));
    let logged = warnings.load(AtomicOrdering::SeqCst);
    assert!(logged <= 20, "{logged} warnings for {bad} bad heads");

    q.set_avail_slot(bad, 0);
    q.set_avail_idx(bad + 1);
    q.kick();
    q.backend.wait_idle();
    assert_eq!(vring.queue_used_idx().unwrap(), 1, "a good chain after them is served");
    q.pool.shutdown();
}

/// The guest sets the cache mode only when it negotiated FLUSH and
/// CONFIG_WCE (virtio 5.2.5): otherwise a write of the mode byte is
/// ignored, so a guest without FLUSH cannot turn write-through off. A write
/// that comes before the features are known is kept, as before.
#[test]
fn the_cache_mode_is_set_only_with_flush_and_config_wce() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = DeviceConfig { num_queues: 1, queue_size: QSIZE, ..Default::default() };
    let pool = Arc::new(IoPool::new(1, usize::from(QSIZE)).unwrap());
    let offset = crate::vhost::config::WRITEBACK_OFFSET;
    let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
    let wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
    let backend = || {
        let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(&img, false).unwrap());
        BlockBackend::new(Arc::new(RawDisk::new(storage, false).unwrap()), cfg.clone(), pool.clone()).unwrap()
    };
    let mode_after = |features: u64, write: u8| {
        let b = backend();
        b.acked_features(features);
        b.set_config(offset, &[write]).unwrap();
        b.get_config(offset, 1)[0]
    };
    assert_eq!(mode_after(0, 1), 0, "no FLUSH: write-through stays");
    assert_eq!(mode_after(flush, 0), 1, "FLUSH without CONFIG_WCE: write-back stays");
    assert_eq!(mode_after(flush | wce, 0), 0);
    assert_eq!(mode_after(flush | wce, 1), 1);

    let early = backend();
    early.set_config(offset, &[0]).unwrap();
    early.acked_features(flush | wce);
    assert_eq!(early.get_config(offset, 1), vec![0], "a write before SET_FEATURES is kept");
    pool.shutdown();
}
