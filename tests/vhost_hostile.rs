//! A hostile or broken guest against the driveblk binary, through a raw
//! vhost-user frontend (vhost's `Frontend`) over guest memory this test
//! maps and fills itself, so every descriptor, ring index and queue size
//! is the test's to choose, including those no real driver would send.
//! Each request must complete with a status (or a used length of 0 when it
//! has nowhere to put one), and the device must keep serving.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{make_raw, Daemon};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Each guest memory region (two, adjacent: GPA 0 and GPA REGION).
const REGION: u64 = 1 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Where the tests put headers, buffers, indirect tables and statuses.
const BUFS: u64 = 0x10000;
const DISK: usize = 1 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Guest RAM: two memfd regions mapped here, GPA 0..REGION and
/// REGION..2*REGION, consecutive in this process too.
struct Guest {
    base: *mut u8,
    fds: [OwnedFd; 2],
}

impl Guest {
    fn new() -> Guest {
        let len = 2 * REGION as usize;
        // SAFETY: an anonymous reservation, replaced region by region below.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(base, libc::MAP_FAILED);
        let fds = [0usize, 1].map(|i| {
            // SAFETY: a NUL-terminated name.
            let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sizing and mapping our own memfd over our reservation.
            unsafe {
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), REGION as i64), 0);
                let at = base.cast::<u8>().add(i * REGION as usize).cast();
                let p = libc::mmap(
                    at,
                    REGION as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    0,
                );
                assert_eq!(p, at);
            }
            fd
        });
        Guest { base: base.cast(), fds }
    }

    fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        (0..2)
            .map(|i| VhostUserMemoryRegionInfo {
                guest_phys_addr: i * REGION,
                memory_size: REGION,
                userspace_addr: self.base as u64 + i * REGION,
                mmap_offset: 0,
                mmap_handle: self.fds[i as usize].as_raw_fd(),
            })
            .collect()
    }

    fn write(&self, gpa: u64, b: &[u8]) {
        assert!(gpa as usize + b.len() <= 2 * REGION as usize);
        // SAFETY: within our mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.base.add(gpa as usize), b.len()) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut v = vec![0u8; len];
        // SAFETY: within our mapping; the device writes it concurrently only
        // before the used index we waited for.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(i) * 16, &d);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.base.cast(), 2 * REGION as usize) };
    }
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Connects and negotiates up to the queue size; REPLY_ACK is on, so every
/// refusal comes back as an error of the message refused.
fn negotiate(sock: &std::path::Path, g: &Guest) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let want = (1u64 << 32) // VIRTIO_F_VERSION_1
        | (1 << 28) // VIRTIO_RING_F_INDIRECT_DESC
        | (1 << 9) // VIRTIO_BLK_F_FLUSH
        | (1 << 13) // VIRTIO_BLK_F_DISCARD
        | (1 << 14) // VIRTIO_BLK_F_WRITE_ZEROES
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(offered & want, want, "features offered: {offered:#x}");
    fe.set_features(want).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto & (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG))
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&g.regions()).unwrap();
    fe
}

/// Queue 0, started: the test's side of the split ring.
struct Queue {
    _fe: Frontend,
    size: u16,
    avail: u16,
    used: u16,
    kick: EventFd,
    _call: EventFd,
}

impl Queue {
    fn start(mut fe: Frontend, g: &Guest, size: u16) -> Queue {
        fe.set_vring_num(0, size).unwrap();
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: g.base as u64 + DESC,
            used_ring_addr: g.base as u64 + USED,
            avail_ring_addr: g.base as u64 + AVAIL,
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Queue { _fe: fe, size, avail: 0, used: 0, kick, _call: call }
    }

    /// Publishes the chain at `head` and waits for its completion: (used
    /// id, used length).
    fn run(&mut self, g: &Guest, head: u16) -> (u32, u32) {
        g.write(AVAIL + 4 + 2 * u64::from(self.avail % self.size), &head.to_le_bytes());
        self.avail = self.avail.wrapping_add(1);
        g.write(AVAIL + 2, &self.avail.to_le_bytes());
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while g.u16_at(USED + 2) == self.used {
            assert!(Instant::now() < deadline, "the chain at head {head} never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = g.read(USED + 4 + 8 * u64::from(self.used % self.size), 8);
        self.used = self.used.wrapping_add(1);
        (u32::from_le_bytes(e[0..4].try_into().unwrap()), u32::from_le_bytes(e[4..8].try_into().unwrap()))
    }
}

/// A read of `len` bytes at `sector` in the usual layout (header, data,
/// status), descriptors 0..3; returns (status, data).
fn read_request(q: &mut Queue, g: &Guest, sector: u64, len: u32) -> (u8, Vec<u8>) {
    let (hdr, status, data) = (BUFS, BUFS + 0x10, BUFS + 0x1000);
    g.write(hdr, &header(T_IN, sector));
    g.write(status, &[0xff]);
    g.desc(DESC, 0, hdr, 16, F_NEXT, 1);
    g.desc(DESC, 1, data, len, F_WRITE | F_NEXT, 2);
    g.desc(DESC, 2, status, 1, F_WRITE, 0);
    let (id, used) = q.run(g, 0);
    assert_eq!((id, used), (0, len + 1));
    (g.read(status, 1)[0], g.read(data, len as usize))
}

/// A split virtqueue's size is a power of two. One that is not was accepted
/// and ignored (virtio-queue keeps its old size, the device's maximum): the
/// device then walked a 1024-entry ring over the guest's 100-entry one,
/// popping descriptors the guest never wrote and writing used entries past
/// its ring. Now SET_VRING_NUM is refused, naming the size, and the daemon
/// serves the next frontend as usual.
#[test]
fn a_queue_size_not_a_power_of_two_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let log = dir.path().join("log");
    let expect = make_raw(&img, DISK, 7);
    let _d = Daemon::start_logged(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"], &[], Some(&log));
    let g = Guest::new();
    let fe = negotiate(&sock, &g);
    let r = fe.set_vring_num(0, 100);
    assert!(r.is_err(), "queue size 100 was accepted");
    drop(fe);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("queue size 100, not a power of two") {
            break;
        }
        assert!(Instant::now() < deadline, "no line names the refused size:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A well-behaved frontend next is served.
    let mut q = Queue::start(negotiate(&sock, &g), &g, 128);
    let (status, data) = read_request(&mut q, &g, 8, 4096);
    assert_eq!(status, S_OK);
    assert!(data == expect[4096..8192]);
}

/// Malformed chains and requests through the real daemon: each completes
/// (the used ring gets its head), with the status the spec asks for, and
/// the queue keeps serving after all of them.
#[test]
fn hostile_chains_each_complete_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let expect = make_raw(&img, DISK, 9);
    let _d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    let g = Guest::new();
    let mut q = Queue::start(negotiate(&sock, &g), &g, 128);
    let sectors = DISK as u64 / 512;
    let (hdr, data, status, table) = (BUFS, BUFS + 0x1000, BUFS + 0x8000, BUFS + 0x9000);
    let mut run = |what: &str, head: u16| -> (u32, u8) {
        g.write(status, &[0xff]);
        let (id, used) = q.run(&g, head);
        assert_eq!(id, u32::from(head), "{what}: wrong head completed");
        (used, g.read(status, 1)[0])
    };

    // A chain that loops back on itself ends at the ring size: refused.
    g.write(hdr, &header(T_IN, 0));
    g.desc(DESC, 10, hdr, 16, F_NEXT, 11);
    g.desc(DESC, 11, status, 1, F_WRITE | F_NEXT, 11);
    assert_eq!(run("loop", 10), (1, S_IOERR));

    // An indirect table naming another indirect table (not allowed): the
    // chain stops there, with no writable status: used length 0.
    g.desc(table, 0, hdr, 16, F_NEXT, 1);
    g.desc(table, 1, table + 0x100, 32, F_INDIRECT, 0);
    g.desc(DESC, 12, table, 32, F_INDIRECT, 0);
    assert_eq!(run("nested indirect", 12), (0, 0xff));

    // A status byte in a device-readable descriptor: nowhere to report.
    g.desc(DESC, 13, hdr, 16, F_NEXT, 14);
    g.desc(DESC, 14, status, 1, 0, 0);
    assert_eq!(run("read-only status", 13), (0, 0xff));

    // A data buffer outside every memory region.
    g.desc(DESC, 15, hdr, 16, F_NEXT, 16);
    g.desc(DESC, 16, 8 * REGION, 512, F_WRITE | F_NEXT, 17);
    g.desc(DESC, 17, status, 1, F_WRITE, 0);
    assert_eq!(run("buffer outside memory", 15), (1, S_IOERR));

    // One that starts in the second region and runs past its end.
    g.desc(DESC, 16, 2 * REGION - 512, 1024, F_WRITE | F_NEXT, 17);
    assert_eq!(run("buffer past the last region", 15), (1, S_IOERR));

    // One that spans the two regions: served.
    g.desc(DESC, 16, REGION - 2048, 4096, F_WRITE | F_NEXT, 17);
    assert_eq!(run("buffer across two regions", 15), (4097, S_OK));
    assert!(g.read(REGION - 2048, 4096) == expect[..4096]);

    // The header split across two descriptors, through an indirect table.
    g.write(hdr, &header(T_IN, 2));
    g.desc(table, 0, hdr, 8, F_NEXT, 1);
    g.desc(table, 1, hdr + 8, 8, F_NEXT, 2);
    g.desc(table, 2, data, 512, F_WRITE | F_NEXT, 3);
    g.desc(table, 3, status, 1, F_WRITE, 0);
    g.desc(DESC, 18, table, 64, F_INDIRECT, 0);
    assert_eq!(run("split header", 18), (513, S_OK));
    assert!(g.read(data, 512) == expect[1024..1536]);

    // A header cut short: 8 bytes in all.
    g.desc(DESC, 19, hdr, 8, F_NEXT, 20);
    g.desc(DESC, 20, status, 1, F_WRITE, 0);
    assert_eq!(run("short header", 19), (1, S_IOERR));

    // Requests with their own problems, in the usual layout.
    let mut request = |what: &str, hdr_bytes: [u8; 16], out: &[u8], writable: u32| -> (u32, u8) {
        g.write(hdr, &hdr_bytes);
        g.write(data, out);
        g.desc(DESC, 0, hdr, 16, F_NEXT, 1);
        if writable > 0 {
            g.desc(DESC, 1, data, writable, F_WRITE | F_NEXT, 2);
        } else {
            g.desc(DESC, 1, data, out.len() as u32, F_NEXT, 2);
        }
        g.desc(DESC, 2, status, 1, F_WRITE, 0);
        run(what, 0)
    };
    assert_eq!(request("unknown type", header(0x7777, 0), &[], 512), (1, S_UNSUPP));
    assert_eq!(request("read past the end", header(T_IN, sectors), &[], 512), (1, S_IOERR));
    assert_eq!(request("read over the end", header(T_IN, sectors - 1), &[], 1024), (1, S_IOERR));
    assert_eq!(request("read, sector overflows", header(T_IN, u64::MAX / 256), &[], 512), (1, S_IOERR));
    assert_eq!(request("read of a partial sector", header(T_IN, 0), &[], 100), (1, S_IOERR));
    assert_eq!(request("read of nothing", header(T_IN, 0), &[], 0), (1, S_OK));
    let segs = |s: &[[u8; 16]]| s.concat();
    assert_eq!(request("discard, 0 sectors", header(T_DISCARD, 0), &segs(&[segment(0, 0, 0)]), 0), (1, S_OK));
    assert_eq!(
        request("discard past the end", header(T_DISCARD, 0), &segs(&[segment(sectors, 8, 0)]), 0),
        (1, S_IOERR)
    );
    assert_eq!(
        request("discard, sector overflows", header(T_DISCARD, 0), &segs(&[segment(u64::MAX / 256, 8, 0)]), 0),
        (1, S_IOERR)
    );
    assert_eq!(request("discard with unmap", header(T_DISCARD, 0), &segs(&[segment(0, 8, 1)]), 0), (1, S_UNSUPP));
    assert_eq!(
        request("write-zeroes, unknown flag", header(T_WRITE_ZEROES, 0), &segs(&[segment(0, 8, 2)]), 0),
        (1, S_UNSUPP)
    );
    assert_eq!(request("discard, 33 segments", header(T_DISCARD, 0), &segs(&[segment(0, 8, 0); 33]), 0), (1, S_UNSUPP));
    assert_eq!(request("discard, a partial segment", header(T_DISCARD, 0), &[0u8; 24], 0), (1, S_IOERR));
    assert_eq!(
        request(
            "write-zeroes past max_write_zeroes_sectors",
            header(T_WRITE_ZEROES, 0),
            &segs(&[segment(0, (1 << 23) + 1, 0)]),
            0
        ),
        (1, S_IOERR)
    );
    // Nothing above touched the disk, and the queue still serves.
    let (st, got) = read_request(&mut q, &g, 0, DISK as u32 / 2);
    assert_eq!(st, S_OK);
    assert!(got == expect[..DISK / 2]);
    assert!(std::fs::read(&img).unwrap() == expect);
}
