//! Out-of-order completion: a slow request must not hold up the requests
//! behind it, and shutdown waits for requests already accepted. Uses an
//! in-process server over a disk whose chosen offsets block on a gate.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{make_raw, Client};
use driveblk::format::raw::RawDisk;
use driveblk::format::{Disk, DiskError, DiskResult, IoMode, IoVec};
use driveblk::tier::{LocalFile, Storage};
use driveblk::vhost::{DeviceConfig, Server};

/// A raw disk with a hook that may take over reads (to delay or break them).
struct HookedDisk {
    inner: RawDisk,
    on_read: Box<dyn Fn(u64, IoMode) -> Option<DiskResult<()>> + Send + Sync>,
}

impl HookedDisk {
    fn new(
        img: &std::path::Path,
        on_read: impl Fn(u64, IoMode) -> Option<DiskResult<()>> + Send + Sync + 'static,
    ) -> Self {
        let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(img, false).unwrap());
        Self { inner: RawDisk::new(storage, false).unwrap(), on_read: Box::new(on_read) }
    }
}

impl Disk for HookedDisk {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> DiskResult<()> {
        match (self.on_read)(offset, mode) {
            Some(r) => r,
            None => self.inner.read(offset, bufs, mode),
        }
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
    fn describe(&self) -> String {
        "test disk".into()
    }
}

fn open_gate(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

#[test]
fn slow_read_does_not_hold_up_later_requests_and_shutdown_waits_for_it() {
    let _ = tracing_subscriber::fmt().with_env_filter("driveblk=info").with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let data = make_raw(&img, 8 << 20, 9);
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let slow_started = Arc::new(AtomicBool::new(false));
    // Reads at 1 MiB wait (on the blocking path) until the gate opens.
    let (g, started) = (gate.clone(), slow_started.clone());
    let disk = Arc::new(HookedDisk::new(&img, move |offset, mode| {
        if offset != 1 << 20 {
            return None;
        }
        if mode == IoMode::NonBlocking {
            return Some(Err(DiskError::WouldBlock));
        }
        started.store(true, Ordering::SeqCst);
        let mut open = g.0.lock().unwrap();
        while !*open {
            open = g.1.wait(open).unwrap();
        }
        None
    }));
    let server = Server::bind(disk, DeviceConfig::default(), &sock).unwrap();
    let stop = server.stop_handle();
    let server_thread = std::thread::spawn(move || server.run());

    let mut c = Client::connect(&sock, 1);
    let base = c.region.addr;
    // user_data 0: the slow read; 1..=16: fast reads queued behind it.
    c.queues[0].read(1 << 20, base as *mut u8, 4096, 0, blkio::ReqFlags::empty());
    for i in 1..=16usize {
        let p = (base + i * 4096) as *mut u8;
        c.queues[0].read((2 << 20) + ((i as u64) << 16), p, 4096, i, blkio::ReqFlags::empty());
    }
    let done = c.wait(0, 16);
    let mut ids: Vec<usize> = done.iter().map(|d| d.0).collect();
    ids.sort();
    assert_eq!(ids, (1..=16).collect::<Vec<_>>(), "fast reads must complete while the slow one is pending");
    assert!(done.iter().all(|d| d.1 == 0));
    for i in 1..=16usize {
        let off = (2 << 20) + ((i as u64) << 16);
        assert_eq!(&c.buf()[i * 4096..(i + 1) * 4096], &data[off as usize..off as usize + 4096]);
    }
    // The slow read reached the I/O pool and is parked on the gate.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !slow_started.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "slow read never reached the I/O pool");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Shutdown with the slow read still in flight: the stop waits for it
    // while the frontend is still connected (its completion needs the
    // frontend's notifier), then disconnects.
    let stopper = std::thread::spawn(move || stop.stop());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!server_thread.is_finished(), "server stopped with a request in flight");
    assert!(!stopper.is_finished(), "the stop did not wait for the request in flight");
    open_gate(&gate);
    stopper.join().unwrap();
    let res = server_thread.join().unwrap();
    assert!(res.is_ok(), "{res:?}");
    // The slow read completed into guest memory before the server returned.
    let done = c.wait(0, 1);
    assert_eq!(done[0], (0, 0));
    assert_eq!(&c.buf()[..4096], &data[1 << 20..(1 << 20) + 4096]);
    assert!(!sock.exists());
}

#[test]
fn a_panic_below_fails_only_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let data = make_raw(&img, 4 << 20, 10);
    // Reads at 8 KiB panic, on both the inline and the blocking path.
    let disk = Arc::new(HookedDisk::new(&img, |offset, _| {
        if offset == 8192 {
            panic!("injected bug at offset {offset}");
        }
        None
    }));
    let server = Server::bind(disk, DeviceConfig::default(), &sock).unwrap();
    let stop = server.stop_handle();
    let server_thread = std::thread::spawn(move || server.run());
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(8192, 4096).is_err(), "the panicking request must fail");
    assert_eq!(c.read(0, 4096).unwrap(), data[..4096], "the device must keep serving");
    assert!(c.read(8192, 4096).is_err());
    assert_eq!(c.read(1 << 20, 4096).unwrap(), data[1 << 20..(1 << 20) + 4096]);
    drop(c);
    stop.stop();
    assert!(server_thread.join().unwrap().is_ok());
}
