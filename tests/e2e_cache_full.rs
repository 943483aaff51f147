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

/// `serve`'s arguments for the volume at `url` with its cache in `mnt`.
fn serve_args<'a>(url: &'a str, mnt: &'a std::path::Path) -> Vec<&'a str> {
    let cache = mnt.to_str().unwrap();
    vec![
        "--volume",
        url,
        "--format",
        "raw",
        "--cache-dir",
        cache,
        "--ssd-cache",
        "1G",
        "--sync-interval",
        "3600",
        "--boot-profile",
        "off",
    ]
}

/// A 48 MiB volume of `pattern(seed)` imported (with `import_args`) to a
/// `dir:` remote under `dir`, and a 12 MiB tmpfs mounted at `dir/cache`
/// for its cache (unmounted when the guard drops): the image, the URL,
/// the cache directory.
fn volume_with_a_small_cache_disk(
    dir: &std::path::Path,
    seed: u64,
    import_args: &[&str],
) -> (Vec<u8>, String, std::path::PathBuf, Mount) {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let src_data = pattern(seed, 48 << 20);
    let src = dir.join("src.raw");
    std::fs::write(&src, &src_data).unwrap();
    let url = format!("dir:{}", dir.join("remote/vol").display());
    run_ok(&[&["import", "--quiet"], import_args, &[src.to_str().unwrap(), &url]].concat());
    let mnt = dir.join("cache");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let guard = Mount(mnt.clone());
    (src_data, url, mnt, guard)
}

#[test]
fn a_full_cache_disk_fails_writes_keeps_reads_and_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let (src_data, url, mnt, _m) = volume_with_a_small_cache_disk(dir.path(), 7, &[]);
    let sock = dir.path().join("sock");
    let args = serve_args(&url, &mnt);
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

/// A guest rewriting chunks of a generation being uploaded while clean
/// chunks fill the cache disk: the cut-time copies those rewrites need
/// (the cache's `frozen` file, on the same disk) make room by evicting
/// clean chunks, as a guest write does, instead of failing the guest's
/// write. The cap that cannot fit is warned about at start, and status
/// shows the disk's free space and the bytes copied aside.
#[test]
fn a_rewrite_during_an_upload_on_a_full_cache_disk_evicts_clean_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (src_data, url, mnt, _m) = volume_with_a_small_cache_disk(dir.path(), 8, &["--chunk-size", "256K"]);
    let sock = dir.path().join("sock");
    let log = dir.path().join("serve.log");
    // 2 MiB at 128 KiB/s: the cut uploads for about 16 s.
    let args = [serve_args(&url, &mnt), vec!["--bwlimit", "128K:off"]].concat();
    let mut d = Daemon::start_logged(&sock, &args, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let first = pattern(2, 2 << 20);
    c.write(0, &first).unwrap();
    c.flush().unwrap(); // the first FLUSH cuts at once
                        // Clean chunks fill the cache disk.
    for i in (8..48u64).step_by(2) {
        assert!(c.read(i << 20, 1 << 20).unwrap() == src_data[(i << 20) as usize..((i + 1) << 20) as usize]);
    }
    // The guest rewrites the uploading cut's chunks: their cut-time bytes
    // go aside first, on the full disk.
    let second = pattern(3, 2 << 20);
    c.write(0, &second).expect("a rewrite during the upload failed on a disk clean chunks could give way on");
    c.flush().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["status", "--cache-dir", mnt.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ssd"]["free_bytes"].as_u64().is_some_and(|f| f < 12 << 20), "status shows the disk's free space: {v}");
    let frozen = v["sync"]["frozen_bytes"].as_u64().unwrap();
    assert!(frozen == 2 << 20 || v["sync"]["uploading"] == false, "status shows the bytes copied aside: {v}");
    drop(c);
    // Both uploads at 128 KiB/s: longer than `Daemon::stop` waits.
    let mut child = d.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(common::wait_timeout(&mut child, std::time::Duration::from_secs(120)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cap does not fit on its disk"), "the 1 GiB cap on a 12 MiB disk is warned about: {text}");
    let out = dir.path().join("out.raw");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap()[..2 << 20] == second[..], "the rewrite reached the remote");
}
