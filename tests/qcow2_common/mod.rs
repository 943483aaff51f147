//! Helpers shared by the qcow2 tests: running qemu-img / qemu-io (the
//! oracle), opening images with the engine, whole-disk reads, and an
//! in-memory storage.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use driveblk::format::qcow2::{LocalBackingOpener, Qcow2Disk, Qcow2Options};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::tier::{LocalFile, Storage};

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands against a qcow2 image, in batches (one process per
/// batch keeps the command line short).
pub fn qemu_io(path: &Path, cmds: &[String]) {
    for chunk in cmds.chunks(200) {
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
        for c in chunk {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(path.to_str().unwrap().into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run("qemu-io", &refs);
        assert!(!out.contains("error") && !out.contains("failed"), "qemu-io said: {out}");
    }
}

pub fn open(path: &Path, opts: Qcow2Options) -> Qcow2Disk {
    try_open(path, opts).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

pub fn try_open(path: &Path, opts: Qcow2Options) -> driveblk::format::DiskResult<Qcow2Disk> {
    let storage: Arc<dyn Storage> = Arc::new(LocalFile::open(path, opts.read_only).expect("open file"));
    Qcow2Disk::open(storage, opts, &LocalBackingOpener::new(path))
}

pub fn ro() -> Qcow2Options {
    Qcow2Options { read_only: true, ..Default::default() }
}

pub fn rw() -> Qcow2Options {
    Qcow2Options::default()
}

/// Reads the whole disk in chunks of odd sizes (exercises run splitting).
pub fn read_all(disk: &dyn Disk) -> Vec<u8> {
    let cap = disk.capacity() as usize;
    let mut out = vec![0u8; cap];
    let mut pos = 0;
    let mut step = 3 * 512;
    while pos < cap {
        let n = step.min(cap - pos);
        disk.read(pos as u64, &IoVec::from_slice(&mut out[pos..pos + n]), IoMode::Blocking)
            .unwrap_or_else(|e| panic!("read {pos}+{n}: {e}"));
        pos += n;
        step = if step > (1 << 20) { 3 * 512 } else { step * 3 };
    }
    out
}

/// The guest-visible contents according to QEMU.
pub fn qemu_raw(path: &Path, extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    std::fs::read(&out).unwrap()
}

/// `qemu-img check`: panics on any corruption; returns the leak count.
pub fn check(path: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    // Exit code 3 means leaks only; 2 corruption; 1 check failed.
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {} exit {code}: {text}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("\"corruptions\""), "corruptions in {}: {text}", path.display());
    text.split("\"leaks\":").nth(1).and_then(|s| s.trim().split([',', '\n', '}']).next()).map_or(0, |n| n.trim().parse().unwrap_or(0))
}

pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x} (sector {}): got {:02x?} want {:02x?}",
            i / 512,
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}

/// A small deterministic PRNG so tests need no seed plumbing.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
