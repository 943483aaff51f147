//! Fuzz target: arbitrary bytes as a qcow2 image file in memory; open it
//! (read-only and writable) and run a few reads, writes, zeroing, discards
//! and a flush. Any panic, hang or huge allocation is a bug.
#![no_main]

use std::sync::Arc;

use driveblk::format::qcow2::{info, NoBacking, Qcow2Disk, Qcow2Options};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::tier::Storage;
use libfuzzer_sys::fuzz_target;

#[path = "mem_storage.rs"]
mod mem_storage;
use mem_storage::Mem;

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
    let _ = info(&Mem::new(data.to_vec()));
    for read_only in [true, false] {
        let storage: Arc<dyn Storage> = Arc::new(Mem::new(data.to_vec()));
        let opts = Qcow2Options { read_only, ..Default::default() };
        if let Ok(disk) = Qcow2Disk::open(storage, opts, &NoBacking) {
            exercise(&disk, seed);
        }
    }
});
