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
