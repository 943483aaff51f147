//! End-to-end tests of the vhost-user-blk device through libblkio, an
//! independent vhost-user-blk client, against the driveblk binary.

mod common;

use common::{make_raw, pattern, Client, Daemon};

#[test]
fn reads_and_writes_roundtrip_on_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let mut expect = make_raw(&img, 32 << 20, 1);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.capacity, 32 << 20);
    assert_eq!(c.read(0, 4096).unwrap(), expect[..4096]);
    assert_eq!(c.read(5 << 20, 1 << 20).unwrap(), expect[5 << 20..6 << 20]);
    // Writes of several sizes at sector-aligned offsets.
    for (i, (off, len)) in
        [(512u64, 512usize), (4096, 4096), (1 << 20, 3 << 20), ((32 << 20) - 8192, 8192)].iter().enumerate()
    {
        let data = pattern(100 + i as u64, *len);
        c.write(*off, &data).unwrap();
        expect[*off as usize..*off as usize + len].copy_from_slice(&data);
        assert_eq!(c.read(*off, *len).unwrap(), data);
    }
    c.flush().unwrap();
    // Past the end of the disk: an error, not a crash.
    assert!(c.read(32 << 20, 4096).is_err());
    drop(c);
    assert!(d.stop().success());
    assert!(std::fs::read(&img).unwrap() == expect, "image file differs from what was written");
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    make_raw(&img, 16 << 20, 2);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    let mut c = Client::connect(&sock, 1);
    let blocks_before = std::fs::metadata(&img).map(|m| std::os::unix::fs::MetadataExt::blocks(&m)).unwrap();
    c.discard(1 << 20, 2 << 20).unwrap();
    c.write_zeroes(4 << 20, 1 << 20, true).unwrap();
    c.write_zeroes(6 << 20, 64 << 10, false).unwrap();
    assert!(c.read(1 << 20, 2 << 20).unwrap().iter().all(|&b| b == 0));
    assert!(c.read(4 << 20, 1 << 20).unwrap().iter().all(|&b| b == 0));
    assert!(c.read(6 << 20, 64 << 10).unwrap().iter().all(|&b| b == 0));
    // Neighbouring data untouched.
    let orig = pattern(2, 16 << 20);
    assert_eq!(c.read((1 << 20) - 4096, 4096).unwrap(), orig[(1 << 20) - 4096..1 << 20]);
    assert_eq!(c.read(3 << 20, 4096).unwrap(), orig[3 << 20..(3 << 20) + 4096]);
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    // Discarded space was released (hole punched).
    let blocks_after = std::fs::metadata(&img).map(|m| std::os::unix::fs::MetadataExt::blocks(&m)).unwrap();
    assert!(blocks_after < blocks_before, "no space released: {blocks_before} -> {blocks_after} blocks");
}

#[test]
fn several_queues_in_parallel_whole_device_write_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    const SIZE: u64 = 64 << 20;
    make_raw(&img, SIZE as usize, 3);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw", "--num-queues", "4"]);
    let mut c = Client::connect(&sock, 4);
    assert_eq!(c.queues.len(), 4);
    // Each queue owns a quarter of the device and writes it with QD 8 of
    // 256 KiB requests from its own slice of the shared buffer.
    const REQ: usize = 256 << 10;
    const QD: usize = 8;
    let quarter = SIZE / 4;
    let base = c.region.addr;
    let mut expect = vec![0u8; SIZE as usize];
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (qi, q) in c.queues.iter_mut().enumerate() {
            let data = pattern(1000 + qi as u64, quarter as usize);
            expect[qi * quarter as usize..(qi + 1) * quarter as usize].copy_from_slice(&data);
            handles.push(s.spawn(move || {
                let slot_base = base + qi * QD * REQ;
                let mut next = 0u64;
                let mut inflight = 0usize;
                let mut comps: Vec<_> = (0..QD).map(|_| std::mem::MaybeUninit::uninit()).collect();
                let mut free: Vec<usize> = (0..QD).collect();
                while next < quarter || inflight > 0 {
                    while next < quarter && !free.is_empty() {
                        let slot = free.pop().unwrap();
                        let p = (slot_base + slot * REQ) as *mut u8;
                        let src = &data[next as usize..next as usize + REQ];
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, REQ) };
                        q.write(qi as u64 * quarter + next, p, REQ, slot, blkio::ReqFlags::empty());
                        next += REQ as u64;
                        inflight += 1;
                    }
                    let mut t = std::time::Duration::from_secs(30);
                    let n = q.do_io(&mut comps, 1, Some(&mut t), None).unwrap();
                    assert!(n > 0, "timeout");
                    for comp in &comps[..n] {
                        let comp = unsafe { comp.assume_init_read() };
                        assert_eq!(comp.ret, 0, "write failed");
                        free.push(comp.user_data);
                        inflight -= 1;
                    }
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
    });
    c.flush().unwrap();
    // Verify the whole device through the client.
    let mut off = 0u64;
    while off < SIZE {
        let got = c.read(off, 4 << 20).unwrap();
        assert!(got == expect[off as usize..off as usize + (4 << 20)], "mismatch in the 4 MiB at {off}");
        off += 4 << 20;
    }
    drop(c);
    assert!(d.stop().success());
    assert!(std::fs::read(&img).unwrap() == expect);
}

#[test]
fn serves_again_after_client_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    make_raw(&img, 8 << 20, 4);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw", "--num-queues", "2"]);
    let data = pattern(44, 1 << 20);
    {
        let mut c = Client::connect(&sock, 2);
        c.write(2 << 20, &data).unwrap();
        c.flush().unwrap();
    }
    for round in 0..3 {
        let mut c = Client::connect(&sock, 1 + (round % 2));
        assert_eq!(c.read(2 << 20, 1 << 20).unwrap(), data, "round {round}");
    }
    assert!(d.stop().success());
}

/// A second frontend on a socket already serving one (a cloned VM, a
/// second `virsh start`) is refused at once and the log says why: left in
/// the backlog, its QEMU would hang in silence and get the disk the moment
/// the first VM leaves. The first frontend is served on.
#[test]
fn a_second_frontend_is_refused_at_once() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let log = dir.path().join("serve.log");
    let expect = make_raw(&img, 8 << 20, 5);
    let d = Daemon::start_logged(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"], &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 4096).unwrap(), expect[..4096]);

    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    // GET_FEATURES: request 1, flags 0x1 (version 1), no payload.
    let hdr: Vec<u8> = [1u32, 1, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let _ = s.write_all(&hdr); // may find the connection closed already
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("the second frontend was answered ({n} bytes)"),
        Err(e) => panic!("the second frontend saw no EOF within 5 s: {e}"),
    }
    assert_eq!(c.read(4 << 20, 4096).unwrap(), expect[4 << 20..(4 << 20) + 4096], "the first one is served on");
    drop(c);
    assert!(d.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("another frontend connected to") && log.contains("refused (one disk serves one VM)"),
        "the log does not name the refusal:\n{log}"
    );
}

/// QEMU's largest virtqueue (queue-size=1024, libvirt queue_size) works
/// with the default --queue-size: a size above it used to be refused at
/// SET_VRING_NUM, and QEMU reconnected for ever with the guest hung.
#[test]
fn the_largest_qemu_queue_size_works_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let expect = make_raw(&img, 8 << 20, 6);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    let mut c = Client::connect_sized(&sock, 1, false, Some(1024));
    assert_eq!(c.read(1 << 20, 64 << 10).unwrap(), expect[1 << 20..(1 << 20) + (64 << 10)]);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let sock = dir.path().join("sock");
    let orig = make_raw(&img, 4 << 20, 5);
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw", "--read-only"]);
    // libblkio sees the device's RO feature and refuses a read-write open.
    let mut rw = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    rw.set_str("path", sock.to_str().unwrap()).unwrap();
    rw.connect().unwrap();
    rw.set_i32("num-queues", 1).unwrap();
    assert!(rw.start().is_err(), "read-write start on a read-only device must fail");
    drop(rw);
    let mut c = Client::connect_with(&sock, 1, true);
    assert!(c.blkio.get_bool("read-only").unwrap());
    assert_eq!(c.read(0, 8192).unwrap(), orig[..8192]);
    assert!(c.write(0, &[0u8; 512]).is_err());
    drop(c);
    assert!(d.stop().success());
    assert!(std::fs::read(&img).unwrap() == orig);
}

#[test]
fn lifecycle_socket_handling() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let img2 = dir.path().join("disk2.raw");
    let sock = dir.path().join("sock");
    make_raw(&img, 1 << 20, 6);
    make_raw(&img2, 1 << 20, 7);
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    // A live socket is refused with a clear message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock.to_str().unwrap(), "--image", img2.to_str().unwrap(), "--format", "raw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running daemon"), "{err}");
    // A second writer on the same image is refused.
    let sock2 = dir.path().join("sock2");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock2.to_str().unwrap(), "--image", img.to_str().unwrap(), "--format", "raw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    // SIGTERM: exit 0 and the socket is removed.
    assert!(d.stop().success());
    assert!(!sock.exists());
    // A regular file at the socket path is never deleted.
    std::fs::write(&sock, b"precious").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock.to_str().unwrap(), "--image", img.to_str().unwrap(), "--format", "raw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    make_raw(&img, 1 << 20, 8);
    let sock = dir.path().join("sock");
    let cases: &[(&[&str], &str)] = &[
        (&["--format", "vmdk"], "unknown image format"),
        (&["--format", "raw", "--num-queues", "0"], "--num-queues"),
        (&["--format", "raw", "--queue-size", "100"], "--queue-size"),
        (&["--format", "raw", "--serial", "012345678901234567890"], "--serial"),
    ];
    for (extra, want) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(["serve", "--socket", sock.to_str().unwrap(), "--image", img.to_str().unwrap()])
            .args(*extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock.to_str().unwrap(), "--image", "/nonexistent/x.raw", "--format", "raw"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.raw"));
}
