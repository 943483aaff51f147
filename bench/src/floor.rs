//! `--copy-floor`: what serving one 4 KiB read costs this machine's memory
//! at the least, with no protocol around it. A RAM-tier hit copies 4 KiB
//! from a random place in a large region (timed with 4 KiB and with 2 MiB
//! pages); an SSD-tier hit or a local image reads a page-cached file (timed
//! by `pread` and by copying from a mapping of the file).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const PAGE: usize = 4096;
/// Destination buffers, reused in turn like a client's request slots.
const SLOTS: usize = 32;

/// A private anonymous mapping, 2 MiB-aligned so huge pages can back it.
struct Anon {
    base: *mut u8,
    map: *mut libc::c_void,
    map_len: usize,
}

impl Anon {
    fn new(len: usize, huge: bool) -> Result<Self> {
        let align = 2 << 20;
        let map_len = len + align;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            bail!("mmap of {len} bytes: {}", std::io::Error::last_os_error());
        }
        let base = (map as usize).next_multiple_of(align) as *mut u8;
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        // SAFETY: the range lies inside the mapping made above. Advice only.
        unsafe { libc::madvise(base.cast(), len, advice) };
        // SAFETY: `base..base+len` is inside the mapping, writable.
        unsafe { std::ptr::write_bytes(base, 0x5a, len) };
        Ok(Self { base, map, map_len })
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// The page-granular offsets to read: a fixed pseudo-random sequence.
fn offsets(pages: usize, n: usize) -> Vec<usize> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % pages as u64) as usize * PAGE
        })
        .collect()
}

/// Nanoseconds per 4 KiB copy from `src` at each offset (the faster of two passes).
fn time_copies(src: *const u8, offs: &[usize], dst: &mut [u8]) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for (i, &o) in offs.iter().enumerate() {
            let slot = &mut dst[(i % SLOTS) * PAGE..][..PAGE];
            // SAFETY: every offset is a whole page inside the source region.
            slot.copy_from_slice(unsafe { std::slice::from_raw_parts(src.add(o), PAGE) });
        }
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_nanos() as f64 / offs.len() as f64);
    }
    best
}

/// Prints the floor for a region of `size` bytes and, given a file, for it.
pub fn run(size: u64, count: u64, file: Option<&Path>) -> Result<()> {
    let size = usize::try_from(size).context("--size too large")? / PAGE * PAGE;
    if size == 0 {
        bail!("--size must be at least 4 KiB");
    }
    let mut dst = vec![0u8; SLOTS * PAGE];
    println!("4 KiB copies from random places, {count} of them, best of two passes:");
    for (huge, what) in [(false, "4 KiB pages"), (true, "2 MiB pages (THP)")] {
        let anon = Anon::new(size, huge)?;
        let offs = offsets(size / PAGE, count as usize);
        let ns = time_copies(anon.base, &offs, &mut dst);
        println!("  anonymous memory, {} MiB, {what}: {ns:.0} ns", size >> 20);
    }
    let Some(path) = file else { return Ok(()) };
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len() as usize / PAGE * PAGE;
    if len == 0 {
        bail!("{} holds less than a page", path.display());
    }
    // Into the page cache first: these are the costs of a hit.
    let mut sink = vec![0u8; 1 << 20];
    let mut r = &f;
    while r.read(&mut sink)? > 0 {}
    let offs = offsets(len / PAGE, count as usize);
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for (i, &o) in offs.iter().enumerate() {
            f.read_exact_at(&mut dst[(i % SLOTS) * PAGE..][..PAGE], o as u64)?;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / offs.len() as f64);
    }
    println!("  page-cached file, {} MiB, pread: {best:.0} ns", len >> 20);
    // SAFETY: a shared read-only mapping of a file nobody truncates while we read.
    let map = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE, f.as_raw_fd(), 0)
    };
    if map == libc::MAP_FAILED {
        bail!("mmap of {}: {}", path.display(), std::io::Error::last_os_error());
    }
    let ns = time_copies(map as *const u8, &offs, &mut dst);
    // SAFETY: unmaps the mapping just made.
    unsafe { libc::munmap(map, len) };
    println!("  page-cached file, {} MiB, copy from a mapping: {ns:.0} ns", len >> 20);
    Ok(())
}
