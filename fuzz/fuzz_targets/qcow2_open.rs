//! Fuzz target: arbitrary bytes as a qcow2 image file in memory; open it
//! (read-only and writable) and run a few reads, writes, zeroing, discards
//! and a flush. Any panic, hang or huge allocation is a bug.
#![no_main]

use std::sync::Arc;

use driveblk::format::qcow2::{info, NoBacking, Qcow2Disk, Qcow2Options};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::tier::Storage;
use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;

/// Image bytes in memory; writes may grow it up to a cap so a hostile image
/// cannot make the fuzzer allocate without bound.
struct Mem(Mutex<Vec<u8>>);

const MAX_FILE: usize = 64 << 20;

impl Storage for Mem {
    fn len(&self) -> u64 {
        self.0.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let d = self.0.lock();
        let n = bufs.len();
        let start = (offset.min(d.len() as u64)) as usize;
        let end = (start + n).min(d.len());
        bufs.copy_from_slice(0, &d[start..end]);
        bufs.fill_zero(end - start, n - (end - start));
        Ok(())
    }
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, _mode: IoMode) -> std::io::Result<()> {
        let mut d = self.0.lock();
        let end = offset.checked_add(bufs.len() as u64).filter(|&e| e <= MAX_FILE as u64);
        let Some(end) = end else { return Err(std::io::Error::other("file too large")) };
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        bufs.copy_to_slice(0, &mut d[offset as usize..end as usize]);
        Ok(())
    }
    fn write_zeroes_at(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut z = vec![0u8; len.min(MAX_FILE as u64) as usize];
        let v = IoVec::from_slice(&mut z);
        self.write_vectored_at(offset, &v, IoMode::Blocking)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > MAX_FILE as u64 {
            return Err(std::io::Error::other("file too large"));
        }
        self.0.lock().resize(len as usize, 0);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "fuzz input".into()
    }
}

fn exercise(disk: &Qcow2Disk, seed: u64) {
    let cap = disk.capacity();
    if cap == 0 {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let pick = |k: u64| (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(k as u32 * 7) % cap) & !511;
    for k in 0..4 {
        let off = pick(k);
        let n = (buf.len() as u64).min(cap - off) as usize;
        let _ = disk.read(off, &IoVec::from_slice(&mut buf[..n]), IoMode::Blocking);
    }
    if !disk.read_only() {
        for k in 4..8 {
            let off = pick(k);
            let n = (4096u64 + 512 * k).min(cap - off) as usize;
            buf[..n].fill(k as u8);
            let _ = disk.write(off, &IoVec::from_slice(&mut buf[..n]), IoMode::Blocking);
        }
        let off = pick(9);
        let _ = disk.write_zeroes(off, (1 << 17).min(cap - off), false, IoMode::Blocking);
        let off = pick(10);
        let _ = disk.discard(off, (1 << 18).min(cap - off), IoMode::Blocking);
        let _ = disk.flush(IoMode::Blocking);
        let off = pick(11);
        let n = (buf.len() as u64).min(cap - off) as usize;
        let _ = disk.read(off, &IoVec::from_slice(&mut buf[..n]), IoMode::Blocking);
        let _ = disk.close();
    }
}

fuzz_target!(|data: &[u8]| {
    let seed = data.iter().take(64).fold(0u64, |a, &b| a.rotate_left(5) ^ u64::from(b));
    let _ = info(&Mem(Mutex::new(data.to_vec())));
    for read_only in [true, false] {
        let storage: Arc<dyn Storage> = Arc::new(Mem(Mutex::new(data.to_vec())));
        let opts = Qcow2Options { read_only, ..Default::default() };
        if let Ok(disk) = Qcow2Disk::open(storage, opts, &NoBacking) {
            exercise(&disk, seed);
        }
    }
});
