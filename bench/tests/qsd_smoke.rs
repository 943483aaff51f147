//! End-to-end smoke tests of the generator against qemu-storage-daemon (skipped when it is not
//! installed): verified random writes, a sequential read, a scaled-down boot trace, and a
//! write-dropping device that --verify must catch.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Qsd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts qsd exporting `node` (a blockdev spec for node "disk0"; `{img}` is replaced by a fresh
/// sparse 64 MiB file) on `<dir>/sock`.
fn start_qsd(name: &str, node: &str) -> Option<Qsd> {
    if Command::new("qemu-storage-daemon").arg("--version").output().is_err() {
        eprintln!("qemu-storage-daemon not installed: skipping");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("driveblk-bench-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let sock = dir.join("sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(node.replace("{img}", &img.display().to_string()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let qsd = Qsd { child, dir };
    // Startup wait only; the generator also retries its connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(qsd)
}

fn bench(sock: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_driveblk-bench")).arg("--socket").arg(sock).args(args).output().unwrap();
    assert!(out.status.success(), "driveblk-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json_u64(out: &Output, key: &str) -> u64 {
    let s = String::from_utf8_lossy(&out.stdout);
    let pat = format!("\"{key}\":");
    let rest = &s[s.find(&pat).unwrap_or_else(|| panic!("no {key} in {s}")) + pat.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[test]
fn generator_against_qsd() {
    let node = "driver=raw,node-name=disk0,file.driver=file,file.filename={img},file.cache.direct=off";
    let Some(qsd) = start_qsd("smoke", node) else { return };
    let sock = qsd.dir.join("sock");

    let out = bench(&sock, &["--rw", "randwrite", "--queues", "2", "--ios", "4000", "--verify", "--json"]);
    assert_eq!(json_u64(&out, "ops"), 4000);
    assert!(json_u64(&out, "verified_blocks") > 0);

    // A new client after the previous one disconnected, 64 KiB sequential over part of the disk.
    let out =
        bench(&sock, &["--rw", "read", "--bs", "64k", "--iodepth", "8", "--size", "8m", "--ios", "500", "--json"]);
    assert_eq!(json_u64(&out, "bytes"), 500 * 65536);

    let out = bench(&sock, &["--pattern", "boot", "--trace-reads", "2000", "--trace-bytes", "20m", "--json"]);
    assert_eq!(json_u64(&out, "ops"), 2000);
}

/// The checker is not vacuous: a device that drops writes and reads zeroes must fail --verify.
#[test]
fn verify_catches_a_device_that_drops_writes() {
    let node = "driver=null-co,node-name=disk0,size=67108864,read-zeroes=on";
    let Some(qsd) = start_qsd("null", node) else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_driveblk-bench"))
        .arg("--socket")
        .arg(qsd.dir.join("sock"))
        .args(["--rw", "randwrite", "--ios", "200", "--verify"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("data mismatch"), "{out:?}");
}

#[test]
fn verify_rejects_read_only_workloads() {
    let out = Command::new(env!("CARGO_BIN_EXE_driveblk-bench"))
        .args(["--socket", "/nonexistent", "--rw", "randread", "--verify"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--verify needs"));
}
