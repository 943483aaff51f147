//! `--sync-floor DIR`: what making one 4 KiB write durable costs the disk
//! under DIR at the least, with no protocol around it, for each order of
//! syncs a write-back cache can choose. The floor under the QD1
//! write+FLUSH row: qemu-storage-daemon pays one data sync per FLUSH;
//! driveblk's first write into a chunk its map calls clean pays a journal
//! record's sync before the data changes, then the FLUSH's data sync.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const PAGE: usize = 4096;
/// The data file: random 4 KiB writes land anywhere in it.
const DATA: u64 = 64 << 20;
/// The journal: records overwrite preallocated bytes in place, as driveblk's do.
const JOURNAL: u64 = 1 << 20;
/// A journal record's size (a chunk's new state, checksummed).
const RECORD: usize = 256;

/// A 4 KiB-aligned buffer (O_DIRECT needs one).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, PAGE).expect("valid layout");
        // SAFETY: a non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Creates `path` holding `len` written bytes, synced (no holes, no
/// unwritten extents: an overwrite then changes no file metadata).
fn prepared(path: &Path, len: u64, direct: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    let f = o.open(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = chunk.len().min((len - at) as usize);
        f.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    if !direct {
        return Ok(f);
    }
    drop(f);
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))
}

/// What the block device under `dir` says of its write cache and FUA.
fn device(dir: &Path) -> String {
    let Ok(m) = std::fs::metadata(dir) else { return "unknown device".into() };
    let dev = m.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition's queue is its disk's.
    let read = |name: &str| {
        [format!("{base}/queue/{name}"), format!("{base}/../queue/{name}")]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
    };
    match (read("write_cache"), read("fua")) {
        (Some(wc), Some(fua)) => format!("device {major}:{minor}: write cache \"{wc}\", FUA {fua}"),
        _ => format!("device {major}:{minor} (no block queue: tmpfs, overlay or a network filesystem)"),
    }
}

fn fdatasync(f: &File) -> Result<()> {
    // SAFETY: a valid descriptor owned by `f`.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } != 0 {
        bail!("fdatasync: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One pwritev2 with RWF_DSYNC: the write and its durability in one call
/// (a FUA write where the device has FUA; else a write and a cache flush).
fn write_dsync(f: &File, buf: &[u8], at: u64) -> Result<()> {
    let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: one iovec over a live buffer; the descriptor is owned by `f`.
    let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, at as libc::off_t, libc::RWF_DSYNC) };
    if n != buf.len() as isize {
        bail!("pwritev2(RWF_DSYNC): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Times `count` 4 KiB writes made durable in each way and prints p50/p99.
pub fn run(dir: &Path, count: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (data_path, journal_path) = (dir.join("sync-floor.data"), dir.join("sync-floor.journal"));
    let data = prepared(&data_path, DATA + JOURNAL, false)?;
    let journal = prepared(&journal_path, JOURNAL, false)?;
    let journal_direct = prepared(&journal_path, JOURNAL, true)?;
    let mut page = Aligned::new(PAGE);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    println!(
        "4 KiB random writes into a {} MiB file, each made durable, {count} per way; {}:",
        DATA >> 20,
        device(dir)
    );
    let ways: [(&str, u8); 5] = [
        ("data write + fdatasync (qsd's write+FLUSH; driveblk's into a dirty chunk)", 0),
        ("journal record + fdatasync, then data write + fdatasync (driveblk's first write into a clean chunk, then its FLUSH)", 1),
        ("the same two syncs at once, on two threads", 2),
        ("record and data in one file, one fdatasync (a log kept beside the data)", 3),
        ("journal record by O_DIRECT + RWF_DSYNC, then data write + fdatasync", 4),
    ];
    for (what, way) in ways {
        let mut lat = Vec::with_capacity(count as usize);
        for i in 0..count {
            let fill = (i % 251) as u8;
            page.bytes().fill(fill);
            let at = next() % (DATA / PAGE as u64) * PAGE as u64;
            let rec_at = (i * RECORD as u64) % JOURNAL;
            let t = Instant::now();
            match way {
                0 => {
                    data.write_all_at(page.bytes(), at)?;
                    fdatasync(&data)?;
                }
                1 => {
                    journal.write_all_at(&page.bytes()[..RECORD], rec_at)?;
                    fdatasync(&journal)?;
                    data.write_all_at(page.bytes(), at)?;
                    fdatasync(&data)?;
                }
                2 => {
                    journal.write_all_at(&page.bytes()[..RECORD], rec_at)?;
                    data.write_all_at(page.bytes(), at)?;
                    std::thread::scope(|s| {
                        let other = s.spawn(|| fdatasync(&journal));
                        let here = fdatasync(&data);
                        other.join().expect("sync thread").and(here)
                    })?;
                }
                3 => {
                    data.write_all_at(&page.bytes()[..RECORD], DATA + rec_at)?;
                    data.write_all_at(page.bytes(), at)?;
                    fdatasync(&data)?;
                }
                _ => {
                    write_dsync(&journal_direct, page.bytes(), rec_at / PAGE as u64 * PAGE as u64)?;
                    data.write_all_at(page.bytes(), at)?;
                    fdatasync(&data)?;
                }
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        println!("  {what}: p50 {:.0} µs, p99 {:.0} µs", percentile(&lat, 0.5), percentile(&lat, 0.99));
    }
    for p in [&data_path, &journal_path] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_runs_and_the_files_are_removed() {
        let dir = std::env::temp_dir().join(format!("driveblk-sync-floor-{}", std::process::id()));
        run(&dir, 3).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "scratch files left behind");
        std::fs::remove_dir(&dir).unwrap();
    }
}
