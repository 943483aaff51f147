//! Cold starts through the tiered store: guest misses go to the remote
//! ahead of speculative work (which keeps to a budget of bytes in flight),
//! a first boot without a profile streams the dense part of the image
//! within its bound, profiles learn the pages a boot that strays reads, and
//! the status counts add up.

#[path = "tier_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{RemoteMetrics, Shaping};
use driveblk::tier::boot::BootProfileMode;
use driveblk::tier::stats::TierStats;
use driveblk::tier::tiered::TieredStore;
use driveblk::tier::{CacheOptions, Storage};
use rand::{Rng, SeedableRng};
use support::*;

const CHUNK: u64 = 1 << 20;

fn imported(d: &Path, len: usize) -> (String, Vec<u8>) {
    random_volume(d, len, 5)
}

fn read(s: &dyn Storage, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    b
}

/// Waits (bounded, so a broken feature fails instead of hanging) until
/// `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes by source add up to the bytes downloaded; replayed segments never
/// exceed the profile's.
fn counts_add_up(st: &TierStats) {
    let by =
        st.bytes_miss + st.bytes_profile + st.bytes_readahead + st.bytes_hydrate + st.bytes_stream + st.bytes_index;
    assert_eq!(by, st.remote_bytes, "{st:?}");
    assert!(st.profile_segments_done <= st.profile_segments, "{st:?}");
}

/// Speculative work (here hydration, 16 fetches at a time) keeps to its
/// budget of bytes in flight, and a guest miss goes to the remote at once —
/// also one for a chunk whose speculative fetch is queued for the budget.
#[test]
fn guest_misses_go_ahead_of_speculative_work() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 32 << 20);
    let (layer, gate, waiting) = gated_layer(false);
    let mut o = cache_opts(&d.path().join("c"), Default::default());
    o.remote.layer = Some(layer);
    o.hydrate = true;
    o.hydrate_concurrency = 16;
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // Chunks are ~1 MiB frames: three fit in the 4 MiB budget.
    wait_for("hydration's fetches", || waiting.load(Ordering::SeqCst) == 3);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(waiting.load(Ordering::SeqCst), 3, "speculative fetches beyond the budget reached the remote");
    // Chunk 10: hydration queued it behind the budget; a guest now waits.
    let s2 = s.clone();
    let guest = std::thread::spawn(move || read(&*s2, 10 * CHUNK + 4096, 8192));
    wait_for("the guest's fetch to reach the remote", || waiting.load(Ordering::SeqCst) == 4);
    gate.add_permits(1 << 20);
    assert_eq!(guest.join().unwrap(), data[10 << 20..][4096..4096 + 8192]);
    assert!(s.wait_hydrated(Duration::from_secs(60), false));
    let st = s.stats();
    counts_add_up(&st);
    // Bytes count by what started the fetch: hydration, guest or not.
    assert_eq!(st.bytes_hydrate + st.bytes_index, st.remote_bytes, "{st:?}");
    assert_eq!(read_all(&*s).unwrap(), data);
}

/// Hydration's requests reach the remote marked speculative (so Drive's
/// pacer lets a guest's go first); a guest's misses do not.
#[test]
fn speculative_requests_are_marked_for_the_remote_and_guest_misses_are_not() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 16 << 20);
    let (layer, log) = marked_layer();
    // Reads of chunk bytes (over 16 KiB: not an index), with their marks.
    let seen = || -> Vec<(u64, bool)> {
        std::mem::take(&mut *log.lock())
            .into_iter()
            .filter(|m| m.len > 16 << 10)
            .map(|m| (m.start, m.speculative))
            .collect()
    };
    let opts = |cache: &str, hydrate: bool| {
        let mut o = cache_opts(&d.path().join(cache), Default::default());
        o.remote.layer = Some(layer.clone());
        o.hydrate = hydrate;
        o.readahead_chunks = 0;
        o
    };
    let s = driveblk::tier::open_volume(&vurl, opts("hydrated", true)).unwrap();
    assert!(s.wait_hydrated(Duration::from_secs(60), false));
    s.close(Duration::from_secs(30));
    let hydration = seen();
    assert!(hydration.len() >= 16, "{hydration:?}");
    assert!(hydration.iter().all(|&(_, spec)| spec), "a hydration request went unmarked: {hydration:?}");
    let s = driveblk::tier::open_volume(&vurl, opts("guest", false)).unwrap();
    for c in [2u64, 7, 11] {
        assert_eq!(read(&*s, c * CHUNK + 8192, 4096), data[(c * CHUNK + 8192) as usize..][..4096]);
    }
    s.close(Duration::from_secs(30));
    let misses = seen();
    assert!(misses.len() >= 3, "{misses:?}");
    assert!(misses.iter().all(|&(_, spec)| !spec), "a guest's miss went marked speculative: {misses:?}");
}

/// A boot's files: each a few small reads front to back at a scattered
/// page offset.
fn boot_files(len: u64, seed: u64, files: usize) -> Vec<Vec<(u64, usize)>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..files)
        .map(|_| {
            let mut off = rng.random_range(0..len / 4096 - 16) * 4096;
            (0..rng.random_range(1..4))
                .map(|_| {
                    let n = rng.random_range(1..5) * 4096;
                    off += n as u64;
                    (off - n as u64, n)
                })
                .collect()
        })
        .collect()
}

fn boot_reads(len: u64, seed: u64, files: usize) -> Vec<(u64, usize)> {
    boot_files(len, seed, files).concat()
}

fn opts(cache: &Path, m: &Arc<RemoteMetrics>) -> CacheOptions {
    let mut o = cache_opts(cache, counted(m.clone(), None, Shaping::default()));
    o.boot_profile = BootProfileMode::Auto;
    o.readahead_chunks = 0;
    o
}

fn boot(s: &TieredStore, reads: &[(u64, usize)], data: &[u8]) {
    for &(off, n) in reads {
        assert_eq!(read(s, off, n), data[off as usize..off as usize + n]);
    }
}

fn streamed(s: &TieredStore) {
    // The packs' sub-frame indexes come in the background too: a test that
    // counts remote gets after this must not count theirs.
    indexes_known(s);
    wait_for("the profile stream", || {
        let st = s.stats();
        st.profile_segments > 0 && st.profile_segments_done == st.profile_segments
    });
}

/// With no profile, a boot whose misses are dense streams the rest of the
/// region in the background — never more than 3x the bytes it read.
#[test]
fn a_first_boot_streams_the_dense_region_within_its_bound() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 48 << 20);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c"), &m)).unwrap();
    // Eight files of 512 KiB in chunks apart from each other, each read
    // front to back: the misses show a dense region.
    let reads: Vec<(u64, usize)> =
        (0..8u64).flat_map(|f| (0..16u64).map(move |i| ((3 * f + 1) * CHUNK + 8192 + i * 32768, 32768usize))).collect();
    boot(&s, &reads, &data);
    let read_bytes: u64 = reads.iter().map(|r| r.1 as u64).sum();
    wait_for("the stream", || s.stats().bytes_stream >= read_bytes);
    // Settled: nothing more is fetched while the guest reads nothing.
    std::thread::sleep(Duration::from_millis(300));
    let st = s.stats();
    counts_add_up(&st);
    assert!(
        st.bytes_stream <= 3 * read_bytes + CHUNK + 64 * 1024,
        "streamed {} for {read_bytes} read",
        st.bytes_stream
    );
    boot(&s, &reads, &data);
    s.close(Duration::from_secs(30));
}

/// Early in a first boot the guest has read little: with
/// `first_boot_ahead` the dense region's stream runs ahead of 3x that by
/// what the link moves in that long (here 1 s of a 20 MB/s link), so it
/// keeps the link busy instead of waiting for the guest — and stops there,
/// without pushing the guest's own misses past the boot's bound.
#[test]
fn a_first_boot_streams_ahead_of_its_bound_by_link_time() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 80 << 20);
    let m = Arc::new(RemoteMetrics::default());
    let link = Shaping { latency: Duration::from_millis(2), bandwidth_bps: Some(160_000_000) };
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, link));
    o.boot_profile = BootProfileMode::Auto;
    o.readahead_chunks = 0;
    o.first_boot_ahead = Duration::from_secs(1);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // Ten reads of a sub-frame run in chunks apart from each other: a dense
    // region, and 3x what they read is 7.5 MiB.
    let reads: Vec<(u64, usize)> = (0..10u64).map(|f| ((4 * f + 1) * CHUNK, 256usize << 10)).collect();
    let read_bytes = 10 * (256 << 10);
    boot(&s, &reads, &data);
    wait_for("the stream to run ahead of 3x the bytes read", || s.stats().bytes_stream >= 3 * read_bytes + (4 << 20));
    // Settled: past what the link moves in a second it waits for the guest.
    std::thread::sleep(Duration::from_millis(1500));
    let st = s.stats();
    counts_add_up(&st);
    assert!(st.bytes_stream <= 3 * read_bytes + 24_000_000 + CHUNK, "streamed {}: {st:?}", st.bytes_stream);
    boot(&s, &reads, &data);
    // The stream ran ahead within its bound, so the boot has not passed
    // it: a miss in the next region (64 MiB on, not dense) still fetches a
    // run of sub-frames (256 KiB), not only the one it reads.
    let late = 70 * CHUNK;
    indexes_known(&s);
    let before = s.stats().bytes_miss;
    assert_eq!(read(&*s, late, 4096), data[late as usize..late as usize + 4096]);
    let fetched = s.stats().bytes_miss - before;
    assert!(fetched > 128 << 10, "the miss fetched {fetched} bytes: {:?}", s.stats());
    s.close(Duration::from_secs(30));
}

/// With no profile, a volume storing less than `first_boot_whole_below`
/// streams whole from its first read on: one read brings the rest, and the
/// boot then reads everything without another remote get. Above the
/// threshold (here: the option off) one read streams nothing.
#[test]
fn a_small_volume_streams_whole_on_its_first_boot() {
    let d = tempfile::tempdir().unwrap();
    // A volume each: a first boot saves a profile, and the next would replay it.
    for (cache, whole_below) in [("c-off", 0u64), ("c-on", 64 << 20)] {
        let vdir = d.path().join(format!("v-{cache}"));
        std::fs::create_dir_all(&vdir).unwrap();
        let (vurl, data) = imported(&vdir, 24 << 20);
        let len = data.len() as u64;
        let m = Arc::new(RemoteMetrics::default());
        let mut o = opts(&d.path().join(cache), &m);
        o.first_boot_whole_below = whole_below;
        let s = driveblk::tier::open_volume(&vurl, o).unwrap();
        assert_eq!(read(&*s, 5 << 20, 4096), data[5 << 20..(5 << 20) + 4096]);
        if whole_below == 0 {
            std::thread::sleep(Duration::from_millis(500));
            let st = s.stats();
            assert_eq!(st.bytes_stream, 0, "one read of a volume above the threshold streams nothing");
            assert!(
                st.chunks_cached < st.chunks_total / 4,
                "{} of {} chunks cached",
                st.chunks_cached,
                st.chunks_total
            );
        } else {
            wait_for("the whole volume", || {
                let st = s.stats();
                st.chunks_cached + st.chunks_zero >= st.chunks_total
            });
            let st = s.stats();
            counts_add_up(&st);
            assert!(st.bytes_stream > len / 2, "streamed {} of a {len}-byte volume", st.bytes_stream);
            let gets = m.snapshot().gets;
            boot(&s, &boot_reads(len, 3, 20), &data);
            assert_eq!(m.snapshot().gets, gets, "everything was local after the stream");
        }
        s.close(Duration::from_secs(30));
    }
}

/// A boot that strays from the profile (a tenth of its files differ) saves
/// a profile holding both: the next cold start of either boot reads
/// nothing from the remote.
#[test]
fn profiles_learn_a_boot_that_strays() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 48 << 20);
    let len = data.len() as u64;
    let a_files = boot_files(len, 7, 100);
    let other = boot_files(len, 8, 100);
    let a = a_files.concat();
    // Boot B: A with every tenth file replaced by another.
    let b: Vec<(u64, usize)> =
        a_files.iter().enumerate().flat_map(|(i, f)| if i % 10 == 9 { &other[i] } else { f }).copied().collect();
    let m = Arc::new(RemoteMetrics::default());
    for (cache, reads) in [("c1", &a), ("c2", &b)] {
        let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join(cache), &m)).unwrap();
        if cache == "c2" {
            streamed(&s);
        }
        boot(&s, reads, &data);
        counts_add_up(&s.stats());
        s.close(Duration::from_secs(60));
    }
    for (cache, reads) in [("c3", &a), ("c4", &b)] {
        let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join(cache), &m)).unwrap();
        streamed(&s);
        let gets = m.snapshot().gets;
        boot(&s, reads, &data);
        assert_eq!(m.snapshot().gets, gets, "{cache}: the learned profile holds this boot's pages");
        let st = s.stats();
        counts_add_up(&st);
        assert_eq!(st.misses, 0);
        s.close(Duration::from_secs(60));
    }
}
