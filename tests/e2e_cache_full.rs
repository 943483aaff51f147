//! A full cache disk under a volume: guest writes that cannot be stored fail
//! with an I/O error, reads go on (from the cache, or the remote), the
//! daemon keeps serving, and nothing flushed is lost — it reaches the
//! remote. Needs root (mounts a small tmpfs), as CI has.

mod common;

use std::process::Command;

use common::{pattern, Client, Daemon};

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_driveblk")).args(args).output().unwrap();
    assert!(out.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_full_cache_disk_fails_writes_keeps_reads_and_loses_nothing_flushed() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let dir = tempfile::tempdir().unwrap();
    let src_data = pattern(7, 48 << 20);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &src_data).unwrap();
    let url = format!("dir:{}", dir.path().join("remote/vol").display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let mnt = dir.path().join("cache");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let _m = Mount(mnt.clone());
    let sock = dir.path().join("sock");
    let args = [
        "--volume",
        &url,
        "--format",
        "raw",
        "--cache-dir",
        mnt.to_str().unwrap(),
        "--ssd-cache",
        "1G",
        "--sync-interval",
        "3600",
        "--boot-profile",
        "off",
    ];
    let d = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    // Flushed data: must survive whatever follows.
    let keep = pattern(1, 2 << 20);
    c.write(0, &keep).unwrap();
    c.flush().unwrap();
    // Clean chunks fill the cache disk (reads of the rest of the image)...
    for i in (8..48u64).step_by(4) {
        assert!(c.read(i << 20, 1 << 20).unwrap() == src_data[(i << 20) as usize..((i + 1) << 20) as usize]);
    }
    // ...and give way to the guest's writes: these land.
    for i in 2..4u64 {
        c.write(i << 20, &pattern(50 + i, 1 << 20)).expect("clean chunks were not evicted for a write");
    }
    // Fill the cache disk with dirty data: whole-chunk writes until they fail.
    let mut failed = 0;
    for i in 4..40u64 {
        let data = pattern(100 + i, 1 << 20);
        if let Err(e) = c.write(i << 20, &data) {
            failed += 1;
            assert!(e < 0, "an I/O error status, got {e}");
        }
    }
    assert!(failed > 0, "a 12 MiB cache disk took 36 MiB of writes");
    // Reads go on: the flushed data, and data never cached (from the remote).
    assert!(c.read(0, keep.len()).unwrap() == keep, "flushed data reads back");
    let far = 44usize << 20;
    assert!(c.read(far as u64, 1 << 20).unwrap() == src_data[far..far + (1 << 20)], "uncached data reads");
    drop(c);
    // The daemon is still serving.
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(0, 4096).unwrap() == keep[..4096]);
    drop(c);
    let _ = d.stop();
    // The remote holds the flushed data (another machine sees it).
    let out = dir.path().join("out.raw");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert!(got[..keep.len()] == keep[..], "flushed data reached the remote");
}
