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
    text.split("\"leaks\":")
        .nth(1)
        .and_then(|s| s.trim().split([',', '\n', '}']).next())
        .map_or(0, |n| n.trim().parse().unwrap_or(0))
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

/// One thing that happened to a [`CrashStorage`].
#[derive(Clone, Debug)]
pub enum Event {
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
    SetLen(u64),
    Sync,
}

/// In-memory storage that records every write and sync, so a test can
/// build the file a crash at any point could have left: everything up to
/// the last completed sync plus any subset of the writes after it.
pub struct CrashStorage {
    state: parking_lot::Mutex<(Vec<u8>, Vec<Event>)>,
    base: Vec<u8>,
}

impl CrashStorage {
    pub fn new(image: Vec<u8>) -> Self {
        Self { state: parking_lot::Mutex::new((image.clone(), Vec::new())), base: image }
    }

    pub fn events(&self) -> usize {
        self.state.lock().1.len()
    }

    /// The file after a crash when only `events[..upto]` had been issued:
    /// writes before the last sync are kept, later ones each kept with
    /// probability 1/2, sector by sector (a disk only promises that much).
    pub fn crash_image(&self, upto: usize, rng: &mut Rng) -> Vec<u8> {
        self.crash_image_with(upto, &mut || rng.below(2) == 0)
    }

    /// Same, with `keep` deciding for each unsynced sector.
    pub fn crash_image_with(&self, upto: usize, keep: &mut dyn FnMut() -> bool) -> Vec<u8> {
        let st = self.state.lock();
        let events = &st.1[..upto];
        let last_sync = events.iter().rposition(|e| matches!(e, Event::Sync));
        let mut img = self.base.clone();
        for (i, e) in events.iter().enumerate() {
            let durable = last_sync.is_some_and(|s| i < s);
            match e {
                Event::Write { off, data } => {
                    for (j, piece) in data.chunks(512).enumerate() {
                        if durable || keep() {
                            let o = *off as usize + j * 512;
                            if img.len() < o + piece.len() {
                                img.resize(o + piece.len(), 0);
                            }
                            img[o..o + piece.len()].copy_from_slice(piece);
                        }
                    }
                }
                Event::Zero { off, len } => {
                    if durable || keep() {
                        let end = (*off + *len) as usize;
                        if img.len() < end {
                            img.resize(end, 0);
                        }
                        img[*off as usize..end].fill(0);
                    }
                }
                Event::SetLen(l) => {
                    if durable || keep() {
                        img.resize(*l as usize, 0);
                    }
                }
                Event::Sync => {}
            }
        }
        img
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> u64 {
        self.state.lock().0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let st = self.state.lock();
        let data = &st.0;
        let n = bufs.len();
        let start = (offset as usize).min(data.len());
        let end = (offset as usize + n).min(data.len());
        bufs.copy_from_slice(0, &data[start..end]);
        if end - start < n {
            bufs.fill_zero(end - start, n - (end - start));
        }
        Ok(())
    }
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let v = bufs.to_vec();
        let mut st = self.state.lock();
        let end = offset as usize + v.len();
        if st.0.len() < end {
            st.0.resize(end, 0);
        }
        st.0[offset as usize..end].copy_from_slice(&v);
        st.1.push(Event::Write { off: offset, data: v });
        Ok(())
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut st = self.state.lock();
        let end = (offset + len) as usize;
        if st.0.len() < end {
            st.0.resize(end, 0);
        }
        st.0[offset as usize..end].fill(0);
        st.1.push(Event::Zero { off: offset, len });
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self.state.lock();
        st.0.resize(len as usize, 0);
        st.1.push(Event::SetLen(len));
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.state.lock().1.push(Event::Sync);
        Ok(())
    }
    fn describe(&self) -> String {
        "crash-simulating memory storage".into()
    }
}

/// What a test watches or steers in the engine's calls to its storage
/// (wrapped in a [`Watched`]); whatever it does not override goes to the
/// storage as it is.
pub trait Watch: Send + Sync {
    /// Before a read: `Some(result)` answers it instead of the storage.
    fn read(&self, _offset: u64, _len: u64, _mode: IoMode) -> Option<std::io::Result<()>> {
        None
    }
    /// Before the storage's flush.
    fn flush(&self) {}
    /// A metadata hint, kept here (the storage does not see it).
    fn hint_metadata(&self, _ranges: &[std::ops::Range<u64>]) {}
}

/// A storage seen through a [`Watch`].
pub struct Watched<W> {
    pub inner: Arc<dyn Storage>,
    pub watch: W,
}

impl<W: Watch> Storage for Watched<W> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> std::io::Result<()> {
        match self.watch.read(offset, bufs.len() as u64, mode) {
            Some(r) => r,
            None => self.inner.read_vectored_at(offset, bufs, mode),
        }
    }
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> std::io::Result<()> {
        self.inner.write_vectored_at(offset, bufs, mode)
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes_at(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.watch.flush();
        self.inner.flush()
    }
    fn hint_metadata(&self, ranges: &[std::ops::Range<u64>]) -> std::io::Result<()> {
        self.watch.hint_metadata(ranges);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("watched {}", self.inner.describe())
    }
}
