//! Writes, metadata pinning, readahead, hydration and eviction in the
//! tiered store: dirty chunks survive restarts and reach `export`; hydrated
//! volumes never go remote; a small SSD cap evicts only clean chunks.

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{FaultPlan, RemoteMetrics, Shaping};
use driveblk::tier::ExportOptions;
use driveblk::tier::Storage;
use driveblk::volume::{self, ImportOptions};
use support::*;

fn imported(d: &std::path::Path, len: usize, seed: u64) -> (std::path::PathBuf, String, Vec<u8>) {
    let (src, bytes) = raw_image(d, "src.raw", len, seed);
    let vurl = url(&d.join("remote/vol"));
    volume::import(&src, &vurl, &ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }).unwrap();
    (src, vurl, bytes)
}

fn write(s: &dyn Storage, off: u64, data: &[u8]) {
    let mut v = data.to_vec();
    s.write_vectored_at(off, &IoVec::from_slice(&mut v), IoMode::Blocking).unwrap();
}

#[test]
fn dirty_writes_persist_across_restart_and_export() {
    let d = tempfile::tempdir().unwrap();
    let (src, vurl, bytes) = imported(d.path(), 3 << 20, 21);
    let cache = d.path().join("c");
    let mut expect = bytes.clone();
    let patch = |expect: &mut Vec<u8>, off: usize, data: &[u8]| {
        if expect.len() < off + data.len() {
            expect.resize(off + data.len(), 0);
        }
        expect[off..off + data.len()].copy_from_slice(data);
    };
    {
        let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
        // Partial chunk (read-modify-write of a cold chunk).
        let a = vec![0x5Au8; 1000];
        write(&*s, 100, &a);
        patch(&mut expect, 100, &a);
        // Across a chunk boundary.
        let b: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
        let off = CS as usize - 4000;
        write(&*s, off as u64, &b);
        patch(&mut expect, off, &b);
        // A whole chunk (no fetch needed).
        let c = vec![0xC3u8; CS as usize];
        write(&*s, 4 * CS, &c);
        patch(&mut expect, 4 * CS as usize, &c);
        // Zeroes in the middle, and growth past the end (qcow2 allocating).
        s.write_zeroes_at(2 * CS + 10, 5000).unwrap();
        patch(&mut expect, 2 * CS as usize + 10, &vec![0u8; 5000]);
        let tail = vec![0x77u8; 3000];
        let end = bytes.len() as u64 + 70_000;
        write(&*s, end, &tail);
        patch(&mut expect, end as usize, &tail);
        assert_eq!(s.len(), expect.len() as u64);
        // Dirty chunks take non-blocking writes inline.
        let mut x = [1u8; 16];
        s.write_vectored_at(120, &IoVec::from_slice(&mut x), IoMode::NonBlocking).unwrap();
        patch(&mut expect, 120, &x);
        // A clean/absent chunk's first write goes to a worker.
        let e = s.write_vectored_at(6 * CS, &IoVec::from_slice(&mut x), IoMode::NonBlocking).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(read_all(&*s).unwrap() == expect, "read-your-writes");
        s.flush().unwrap();
        assert!(s.stats().chunks_dirty >= 4);
    }
    // Export with the cache includes the local writes (none went up: no
    // FLUSH point was reached and the store never closed); without it, it
    // is the committed (imported) image.
    let out = d.path().join("with-cache.raw");
    let sum =
        driveblk::tier::export(&vurl, &out, &ExportOptions { cache_dir: Some(cache.clone()), ..Default::default() })
            .unwrap();
    assert!(sum.dirty_chunks >= 4);
    assert!(std::fs::read(&out).unwrap() == expect);
    let out2 = d.path().join("remote-only.raw");
    driveblk::tier::export(&vurl, &out2, &ExportOptions::default()).unwrap();
    assert!(qemu_compare("raw", &src, &out2));
    // Restart: the writes are there, served locally, and the changes left
    // by the earlier run go up now.
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
    assert_eq!(s.len(), expect.len() as u64);
    assert!(read_all(&*s).unwrap() == expect, "after restart");
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let out3 = d.path().join("remote-after.raw");
    driveblk::tier::export(&vurl, &out3, &ExportOptions::default()).unwrap();
    assert!(std::fs::read(&out3).unwrap() == expect, "the restart uploaded the earlier run's changes");
}

#[test]
fn metadata_hint_pins_chunks_in_ram() {
    let d = tempfile::tempdir().unwrap();
    let (_, vurl, bytes) = imported(d.path(), 4 << 20, 22);
    let m = Arc::new(RemoteMetrics::default());
    let faults = FaultPlan::new(0);
    let mut remote = counted(m.clone(), Some(faults.clone()), Shaping::default());
    remote.retry.max_attempts = 2;
    let mut o = cache_opts(&d.path().join("c"), remote);
    o.ram_cache = 2 * CS;
    o.ssd_cache = 4 * CS; // tiny: other reads churn both tiers
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    s.hint_metadata(&[0..100, 3 * CS + 5..3 * CS + 10]).unwrap();
    assert_eq!(s.stats().chunks_pinned, 2);
    read_all(&*s).unwrap();
    // A write to pinned metadata keeps the RAM copy current.
    write(&*s, 3 * CS + 8, b"L2");
    faults.set_down(true);
    let hits = s.stats().ram_hits;
    let mut b = vec![0u8; 64];
    s.read_vectored_at(3 * CS, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap();
    let mut want = bytes[3 * CS as usize..3 * CS as usize + 64].to_vec();
    want[8..10].copy_from_slice(b"L2");
    assert_eq!(b, want);
    s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap();
    assert_eq!(&b[..], &bytes[..64]);
    assert_eq!(s.stats().ram_hits, hits + 2);
}

#[test]
fn sequential_reads_trigger_readahead() {
    let d = tempfile::tempdir().unwrap();
    let (_, vurl, bytes) = imported(d.path(), 6 << 20, 23);
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), Default::default())).unwrap();
    let mut out = vec![0u8; bytes.len()];
    for (i, chunk) in out.chunks_mut(64 << 10).enumerate() {
        s.read_vectored_at((i * (64 << 10)) as u64, &IoVec::from_slice(chunk), IoMode::Blocking).unwrap();
    }
    assert!(out == bytes);
    let st = s.stats();
    assert!(st.readahead_chunks > 0, "{st:?}");
    // Read-ahead chunks were fetched once, not again on demand: every
    // chunk's bytes crossed the link once (the packs' sub-frame indexes,
    // each at most once, come on top).
    assert_eq!(st.remote_bytes - st.bytes_index, packed_bytes(s.volume()), "{st:?}");
    assert!(st.bytes_index <= index_bytes(s.volume()), "{st:?}");
    assert!(st.bytes_readahead > st.bytes_miss, "readahead brought most of it: {st:?}");
}

#[test]
fn hydrate_makes_every_read_local() {
    let d = tempfile::tempdir().unwrap();
    let (_, vurl, bytes) = imported(d.path(), 5 << 20, 24);
    let m = Arc::new(RemoteMetrics::default());
    let faults = FaultPlan::new(0);
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.hydrate = true;
    o.ram_cache = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    assert!(s.wait_hydrated(Duration::from_secs(60), false));
    let st = s.stats();
    assert_eq!(st.hydrate_done, st.hydrate_total);
    assert_eq!(st.chunks_cached + st.chunks_zero, st.chunks_total);
    faults.set_down(true);
    let gets = m.snapshot().gets;
    assert!(read_all(&*s).unwrap() == bytes);
    assert_eq!(m.snapshot().gets, gets, "no read went remote");
    // Too small an SSD cap for hydration is refused up front.
    drop(s);
    let mut o = cache_opts(&d.path().join("c2"), Default::default());
    o.hydrate = true;
    o.ssd_cache = CS;
    assert!(driveblk::tier::open_volume(&vurl, o).is_err());
}

#[test]
fn small_ssd_cap_evicts_only_clean_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (_, vurl, bytes) = imported(d.path(), 4 << 20, 25);
    let cache = d.path().join("c");
    let mut o = cache_opts(&cache, Default::default());
    o.ram_cache = 0;
    o.ssd_cache = 4 * CS;
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
    write(&*s, 10, b"dirty one");
    for _ in 0..2 {
        let mut expect = bytes.clone();
        expect[10..19].copy_from_slice(b"dirty one");
        assert!(read_all(&*s).unwrap() == expect);
    }
    let st = s.stats();
    assert!(st.ssd_evictions > 0, "{st:?}");
    assert!(st.chunks_cached <= 4 + st.chunks_dirty, "{st:?}");
    assert_eq!(st.chunks_dirty, 1);
    drop(s);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut b = vec![0u8; 9];
    s.read_vectored_at(10, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert_eq!(&b, b"dirty one");
}

#[test]
fn write_zeroes_over_whole_chunks_punches_and_persists() {
    let d = tempfile::tempdir().unwrap();
    let (_, vurl, bytes) = imported(d.path(), 3 << 20, 26);
    let cache = d.path().join("c");
    let mut expect = bytes.clone();
    {
        let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
        read_all(&*s).unwrap();
        s.flush().unwrap(); // every chunk persisted clean
        let (off, len) = (CS / 2, 5 * CS);
        s.write_zeroes_at(off, len).unwrap();
        expect[off as usize..(off + len) as usize].fill(0);
        // Inside one chunk, and straddling one boundary.
        s.write_zeroes_at(8 * CS + 10, 100).unwrap();
        expect[8 * CS as usize + 10..8 * CS as usize + 110].fill(0);
        s.write_zeroes_at(10 * CS - 50, 100).unwrap();
        expect[10 * CS as usize - 50..10 * CS as usize + 50].fill(0);
        assert!(read_all(&*s).unwrap() == expect);
        // Whole chunks the volume has as zero stay as they are: the two
        // partly zeroed, the whole ones that held data, and the other 3.
        let held = |i: u64| bytes[(i * CS) as usize..((i + 1) * CS) as usize].iter().any(|&b| b != 0);
        assert_eq!(s.stats().chunks_dirty, 2 + (1..5).filter(|&i| held(i)).count() as u64 + 1 + 2);
        s.flush().unwrap();
    }
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
    assert!(read_all(&*s).unwrap() == expect, "after restart");
    drop(s);
    let out = d.path().join("out.raw");
    driveblk::tier::export(&vurl, &out, &ExportOptions { cache_dir: Some(cache), ..Default::default() }).unwrap();
    assert!(std::fs::read(&out).unwrap() == expect);
}
