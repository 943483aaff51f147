//! A full disk under the image: writes that cannot allocate fail with an I/O
//! error, the daemon keeps serving, flushed data survives, and the image
//! stays consistent for QEMU. Needs root (mounts a small tmpfs), as CI has.

mod common;
mod qcow2_common;

use std::process::Command;

use common::{pattern, Client, Daemon};
use qcow2_common::{check, qemu_img};

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn writes_past_a_full_disk_fail_cleanly_and_lose_nothing() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let _m = Mount(mnt.clone());
    let img = mnt.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "256M"]);
    let sock = dir.path().join("sock");
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1);

    // Some data, flushed: it must survive whatever follows.
    let keep = pattern(1, 4 << 20);
    c.write(0, &keep).unwrap();
    c.flush().unwrap();

    // Fill the filesystem: 1 MiB writes until they fail.
    let mut failed_at = None;
    for i in 4..200u64 {
        if c.write(i << 20, &pattern(i, 1 << 20)).is_err() {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("a 24 MiB filesystem never filled up");
    // The daemon still answers: reads of what was written, and a flush.
    assert_eq!(c.read(0, 4 << 20).unwrap(), keep);
    let _ = c.flush();
    assert!(c.write((failed_at + 1) << 20, &pattern(999, 1 << 20)).is_err(), "still full");
    drop(c);
    assert!(d.stop().success(), "daemon must exit cleanly after ENOSPC");

    // QEMU finds no corruption, and the flushed data is there.
    check(&img);
    let raw = dir.path().join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let got = std::fs::read(&raw).unwrap();
    assert!(got[..4 << 20] == keep[..], "flushed data lost after ENOSPC");
}
