//! Boot profiles through the tiered store: a first boot records the pages
//! it reads and saves them to the remote on close; a cold start on another
//! cache streams exactly those pages ahead of the guest, so the same boot
//! reads go remote zero times and download about the bytes they read, not
//! whole chunks. Partial chunks stay correct under later reads, writes and
//! restarts; a damaged profile never yields wrong data.

#[path = "tier_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{RemoteMetrics, Shaping};
use driveblk::tier::boot::BootProfileMode;
use driveblk::tier::tiered::TieredStore;
use driveblk::tier::CacheOptions;
use driveblk::tier::Storage;
use rand::{Rng, SeedableRng};
use support::*;

const CHUNK: u64 = 1 << 20;

fn imported(d: &Path, len: usize) -> (String, Vec<u8>) {
    random_volume(d, len, 77)
}

/// A "boot": small files at scattered page offsets, each read front to back
/// in 4-16 KiB requests.
fn boot_reads(len: u64, seed: u64) -> Vec<(u64, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..120 {
        let mut off = rng.random_range(0..len / 4096 - 16) * 4096;
        for _ in 0..rng.random_range(1..4) {
            let n = rng.random_range(1..5) * 4096;
            if off + n as u64 > len {
                break;
            }
            out.push((off, n));
            off += n as u64;
        }
    }
    out
}

fn read(s: &dyn Storage, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    b
}

fn opts(cache: &Path, metrics: &Arc<RemoteMetrics>, mode: BootProfileMode) -> CacheOptions {
    let mut o = cache_opts(cache, counted(metrics.clone(), None, Shaping::default()));
    o.boot_profile = mode;
    o.readahead_chunks = 0;
    o
}

fn profiles(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.join("remote/vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("profile-"))
        .collect();
    v.sort();
    v
}

/// Waits until the profile streamed and the packs' sub-frame indexes are
/// known (their background fetch would count as a remote get).
fn wait_streamed(s: &TieredStore) {
    indexes_known(s);
    let t0 = Instant::now();
    loop {
        let st = s.stats();
        if st.profile_segments > 0 && st.profile_segments_done == st.profile_segments {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "profile never finished streaming: {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Records a boot on one cache; returns the boot's reads.
fn first_boot(d: &Path, vurl: &str, data: &[u8]) -> Vec<(u64, usize)> {
    let reads = boot_reads(data.len() as u64, 5);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(vurl, opts(&d.join("c1"), &m, BootProfileMode::Auto)).unwrap();
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert!(s.stats().profile_recording);
    assert!(profiles(d).is_empty(), "nothing is saved before the window closes or the store closes");
    s.close(Duration::from_secs(60));
    drop(s);
    reads
}

#[test]
fn profile_recorded_then_streamed_on_a_cold_cache() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 48 << 20);
    let reads = first_boot(d.path(), &vurl, &data);
    let saved = profiles(d.path());
    assert_eq!(saved.len(), 2, "an index and its pack: {saved:?}");

    // Another machine: empty cache, same volume.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let before = m.snapshot();
    let st = s.stats();
    assert!(st.chunks_partial > 0, "profile pages land as partial chunks: {st:?}");
    assert!(st.profile_recording, "auto mode records to notice a boot the profile no longer matches");
    // The profile is the pages the boot read, not the chunks around them.
    let touched: u64 = {
        let mut pages = std::collections::BTreeSet::new();
        for &(off, n) in &reads {
            for p in off / 4096..(off + n as u64).div_ceil(4096) {
                pages.insert(p);
            }
        }
        pages.len() as u64 * 4096
    };
    assert_eq!(st.profile_bytes, touched, "{st:?}");
    assert!(before.bytes_read < touched + touched / 4 + (1 << 20), "downloaded {} for {touched}", before.bytes_read);

    // The same boot now reads nothing from the remote.
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    let after = m.snapshot();
    assert_eq!(after.gets, before.gets, "boot reads went remote");
    assert_eq!(s.stats().misses, 0);

    // Pages outside the profile, inside a partial chunk: the whole chunk
    // is fetched and the read is right.
    let (off, _) = reads[0];
    let chunk_start = off / CHUNK * CHUNK;
    let other = if off - chunk_start >= 8192 { chunk_start } else { chunk_start + CHUNK - 8192 };
    assert_eq!(read(&*s, other, 8192), data[other as usize..other as usize + 8192]);
    assert!(m.snapshot().gets > after.gets);

    s.close(Duration::from_secs(60));
    drop(s);
    assert_eq!(profiles(d.path()), saved, "boots that read what the profile holds keep it");

    // Restart on the same cache: partial pages survive.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Off)).unwrap();
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert_eq!(s.stats().misses, 0, "partial pages were kept across the restart");

    // A write into a partial chunk (read-modify-write) and a read around it.
    let (woff, _) = reads[reads.len() / 2];
    let patch = vec![0xEEu8; 3000];
    let mut w = patch.clone();
    s.write_vectored_at(woff + 100, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
    let mut expect = data.clone();
    expect[woff as usize + 100..woff as usize + 3100].copy_from_slice(&patch);
    let around = woff.saturating_sub(8192);
    assert_eq!(read(&*s, around, 20000), expect[around as usize..around as usize + 20000]);
    s.close(Duration::from_secs(60));
    drop(s);

    // And again: the write survives, and the whole image reads right.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Off)).unwrap();
    assert_eq!(read_all(&*s).unwrap(), expect);
    s.close(Duration::from_secs(60));
}

#[test]
fn a_boot_that_changed_replaces_the_profile() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 32 << 20);
    let reads = first_boot(d.path(), &vurl, &data);
    let first = profiles(d.path());
    // Another boot, on another cache, reading mostly other pages (an OS
    // update moved things): its recording becomes the newest profile.
    let other = boot_reads(data.len() as u64, 99);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c5"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    for &(off, n) in &other {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert!(s.stats().profile_recording);
    s.close(Duration::from_secs(60));
    drop(s);
    let now = profiles(d.path());
    assert_eq!(now.len(), 4, "{now:?}");
    // The next cold start streams the new profile: the changed boot's reads
    // are local, the old boot's mostly not.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c6"), &m, BootProfileMode::Off)).unwrap();
    s.close(Duration::from_secs(60));
    drop(s);
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c7"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let before = m.snapshot().gets;
    for &(off, n) in &other {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert_eq!(m.snapshot().gets, before, "the new profile holds the changed boot's reads");
    let _ = (reads, first);
}

#[test]
fn damaged_profile_pack_never_gives_wrong_data() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 24 << 20);
    let reads = first_boot(d.path(), &vurl, &data);
    let pack = profiles(d.path()).into_iter().find(|n| n.ends_with(".pack")).unwrap();
    let p = d.path().join("remote/vol").join(pack);
    let mut b = std::fs::read(&p).unwrap();
    // Flip bytes spread over the pack: several segments are damaged.
    for i in (0..b.len()).step_by(b.len() / 7 + 1) {
        b[i] ^= 0x55;
    }
    std::fs::write(&p, &b).unwrap();

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    let st = s.stats();
    assert!(st.fetch_errors > 0, "the damaged segments were noticed: {st:?}");
    assert!(st.profile_segments_done < st.profile_segments);
}

#[test]
fn record_mode_adds_a_newer_profile_and_off_does_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 16 << 20);
    first_boot(d.path(), &vurl, &data);
    let one = profiles(d.path());
    assert_eq!(one.len(), 2);

    let m = Arc::new(RemoteMetrics::default());
    // Read-only: a writable store would also write its lease.
    let mut o = opts(&d.path().join("c3"), &m, BootProfileMode::Off);
    o.read_only = true;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let _ = read(&*s, 4096, 4096);
    s.close(Duration::from_secs(60));
    drop(s);
    assert_eq!(profiles(d.path()), one, "--boot-profile off writes nothing");
    assert_eq!(m.snapshot().bytes_written, 0);

    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c4"), &m, BootProfileMode::Record)).unwrap();
    wait_streamed(&s);
    let _ = read(&*s, 8 << 20, 4096);
    s.close(Duration::from_secs(60));
    drop(s);
    let two = profiles(d.path());
    assert_eq!(two.len(), 4, "{two:?}");
    let newest = two.iter().filter(|n| !n.ends_with(".pack")).max().unwrap();
    assert!(!one.contains(newest), "the new profile sorts as the newest: {two:?}");
}

/// A profile whose pages are consistent with its own segment hashes but
/// not with the volume (a buggy or hostile writer) cannot make a chunk
/// clean: pages that would complete a chunk are checked against the
/// manifest's digest first, and discarded when they disagree.
#[test]
fn a_bad_profile_cannot_make_a_chunk_clean() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 4 << 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let u = driveblk::remote::RemoteUrl::parse(&vurl).unwrap();
    let r = rt.block_on(driveblk::volume::VolumeReader::open(&u, &Default::default())).unwrap();
    let tmp = d.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut b = driveblk::volume::profile::ProfileBuilder::new(&tmp, &r).unwrap();
    // Chunk 1 whole, with the wrong bytes; chunk 2 whole, with the right ones.
    b.add(CHUNK, &vec![0xee; CHUNK as usize]).unwrap();
    b.add(2 * CHUNK, &data[2 * CHUNK as usize..3 * CHUNK as usize]).unwrap();
    rt.block_on(b.upload(&r.remote)).unwrap().expect("a profile was written");

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let st = s.stats();
    assert_eq!(st.profile_rejected, 1, "{st:?}");
    assert!(read(&*s, CHUNK, CHUNK as usize) == data[CHUNK as usize..2 * CHUNK as usize], "the bad pages were served");
    assert!(read(&*s, 2 * CHUNK, CHUNK as usize) == data[2 * CHUNK as usize..3 * CHUNK as usize]);
    s.close(Duration::from_secs(10));
}

/// A profile whose upload does not get through by shutdown (here: the
/// remote is down by then) is not lost and does not hold the shutdown:
/// it stays sealed in the cache directory, and the next start on that
/// cache uploads it in the background, where another machine's cold start
/// finds and streams it.
#[test]
fn a_profile_upload_cut_short_goes_up_at_the_next_start() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 32 << 20);
    let reads = boot_reads(data.len() as u64, 5);
    let m = Arc::new(RemoteMetrics::default());
    let faults = driveblk::remote::FaultPlan::new(7);
    let mut o = cache_opts(&d.path().join("c1"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.boot_profile = BootProfileMode::Auto;
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    faults.set_down(true);
    s.close(Duration::from_secs(60));
    drop(s);
    assert!(profiles(d.path()).is_empty(), "the remote was down: nothing can have gone up");
    let pending = d.path().join("c1").join(driveblk::volume::profile::PENDING_DIR);
    let sealed = std::fs::read_dir(&pending).map(|r| r.count()).unwrap_or(0);
    assert_eq!(sealed, 2, "the profile (index and pack) is sealed in the cache directory");

    // The next start on that cache, remote back: the sealed profile goes up
    // in the background while the store serves.
    let mut o = opts(&d.path().join("c1"), &m, BootProfileMode::Auto);
    let marks = with_marks(&mut o.remote);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let t0 = Instant::now();
    while profiles(d.path()).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the sealed profile never went up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // As speculative work: at Drive's pacer the guest's reads go first.
    let up: Vec<Marked> =
        marks.lock().iter().filter(|m| m.call != "get_range" && m.key.starts_with("profile-")).cloned().collect();
    assert!(up.len() >= 2 && up.iter().all(|m| m.speculative), "{up:?}");
    s.close(Duration::from_secs(60));
    drop(s);
    assert!(!pending.exists(), "an uploaded profile leaves nothing sealed");

    // Another machine's cold start streams it: the boot reads nothing remote.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let before = m.snapshot().gets;
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert_eq!(m.snapshot().gets, before, "the resumed profile holds the boot's reads");
    s.close(Duration::from_secs(60));
}

/// The index JSON of profile `key` (its first line).
fn index_json(d: &Path, key: &str) -> serde_json::Value {
    let b = std::fs::read(d.join("remote/vol").join(key)).unwrap();
    let line = b.split(|&c| c == b'\n').next().unwrap();
    serde_json::from_slice(line).unwrap()
}

/// A boot that strayed a tenth from its profile saves a delta: the new
/// profile uploads only the pages the old one lacked and names the old
/// pack for the frames it keeps, so the upload is a fraction of the first.
/// The next cold start streams both packs and the strayed boot reads
/// nothing remote; gc keeps the old pack the newest index still reads.
#[test]
fn a_boot_that_strayed_saves_a_delta_that_reuses_the_old_pack() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 48 << 20);
    let reads = first_boot(d.path(), &vurl, &data);
    let first = profiles(d.path());
    let first_index = first.iter().find(|k| !k.ends_with(".pack")).unwrap().clone();
    let first_pack = format!("{first_index}.pack");
    let first_len = std::fs::metadata(d.path().join("remote/vol").join(&first_pack)).unwrap().len();

    // The strayed boot: every tenth file replaced by another.
    let other = boot_reads(data.len() as u64, 1234);
    let mut strayed = Vec::new();
    for (i, &r) in reads.iter().enumerate() {
        strayed.push(if i % 10 == 3 { other[i % other.len()] } else { r });
    }
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    for &(off, n) in &strayed {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    s.close(Duration::from_secs(60));
    drop(s);
    let now = profiles(d.path());
    let second_index = now.iter().rfind(|k| !k.ends_with(".pack")).unwrap().clone();
    assert_ne!(second_index, first_index, "the strayed boot saved a new profile: {now:?}");
    let idx = index_json(d.path(), &second_index);
    assert_eq!(idx["version"], 2, "{idx}");
    assert_eq!(idx["packs"], serde_json::json!([first_pack]), "the delta reads kept frames from the old pack");
    let second_len = std::fs::metadata(d.path().join("remote/vol").join(format!("{second_index}.pack"))).unwrap().len();
    assert!(
        second_len * 3 < first_len,
        "the delta uploaded {second_len} bytes of pages, the first profile {first_len}"
    );

    // gc (no grace) drops the old index but keeps the pack the new one reads.
    driveblk_gc(&vurl);
    let after = profiles(d.path());
    assert!(!after.contains(&first_index) && after.contains(&first_pack), "{after:?}");

    // Another cold start streams the delta: the strayed boot is all local.
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c3"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let before = m.snapshot().gets;
    for &(off, n) in &strayed {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert_eq!(m.snapshot().gets, before, "the delta profile holds the strayed boot's reads");
    s.close(Duration::from_secs(60));
}

/// gc with no grace period (objects are seconds old here).
fn driveblk_gc(vurl: &str) {
    let opts = driveblk::volume::gc::GcOptions { grace: Duration::ZERO, force: true, ..Default::default() };
    driveblk::volume::gc::gc(vurl, &opts).unwrap();
}

/// A boot that strayed (so it saves a delta) and also wrote into pages the
/// old profile holds: the delta must not keep the old frame for those
/// pages under the chunk's new digest. The next cold start reads what was
/// written, never the profile's older bytes.
#[test]
fn a_delta_never_keeps_pages_this_boot_changed() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut data) = imported(d.path(), 48 << 20);
    let reads = first_boot(d.path(), &vurl, &data);
    let first = profiles(d.path());

    let other = boot_reads(data.len() as u64, 1234);
    let mut strayed = Vec::new();
    for (i, &r) in reads.iter().enumerate() {
        strayed.push(if i % 10 == 3 { other[i % other.len()] } else { r });
    }
    // A page the first boot read (and the profile holds), read again by
    // this boot and then rewritten.
    let (off, _) = strayed[0];
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    for &(o, n) in &strayed {
        assert_eq!(read(&*s, o, n), data[o as usize..o as usize + n]);
    }
    let new = vec![0x5a; 4096];
    s.write_at(off, &new).unwrap();
    s.flush().unwrap();
    data[off as usize..off as usize + 4096].copy_from_slice(&new);
    assert_eq!(s.close(Duration::from_secs(60)), 0, "the write went up at close");
    drop(s);
    let now = profiles(d.path());
    assert!(now.len() > first.len(), "the strayed boot saved a delta: {now:?}");

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c3"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    for &(o, n) in &strayed {
        assert!(
            read(&*s, o, n) == data[o as usize..o as usize + n],
            "read at {o} after the delta profile: stale bytes"
        );
    }
    s.close(Duration::from_secs(60));
}

/// Pages the recorded boot wrote without reading them (a log it appends
/// to) are in the profile it saves once written back: the boot on the
/// next machine reads them locally, and reads what was written.
#[test]
fn pages_a_recorded_boot_wrote_are_in_its_profile() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut data) = imported(d.path(), 48 << 20);
    let reads = boot_reads(data.len() as u64, 5);
    let read_chunks: std::collections::BTreeSet<u64> = reads.iter().map(|&(o, _)| o / CHUNK).collect();
    let log_chunk = (0..data.len() as u64 / CHUNK).find(|c| !read_chunks.contains(c)).unwrap();
    let log = log_chunk * CHUNK + 5 * 4096;

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c1"), &m, BootProfileMode::Auto)).unwrap();
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    let line = vec![0x77u8; 8192];
    s.write_at(log, &line).unwrap();
    s.flush().unwrap();
    data[log as usize..log as usize + line.len()].copy_from_slice(&line);
    assert_eq!(s.close(Duration::from_secs(60)), 0, "the write went up at close");
    drop(s);

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c2"), &m, BootProfileMode::Auto)).unwrap();
    wait_streamed(&s);
    let before = m.snapshot().gets;
    assert!(read(&*s, log, 8192) == line, "the written pages read back");
    for &(off, n) in &reads {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert_eq!(m.snapshot().gets, before, "the written pages came with the profile");
    assert_eq!(s.stats().misses, 0);
    s.close(Duration::from_secs(60));
}

/// A boot reading the files its profile holds front to back reads nothing
/// ahead past them: the recorded boot did not read what follows, so those
/// chunks would only take the link from the profile. A file the profile
/// does not hold is still read ahead.
#[test]
fn reading_profiled_files_reads_nothing_ahead() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 48 << 20);
    // Two long files, each read front to back in 32 KiB requests (well past
    // the readahead trigger), and ending short of a chunk boundary.
    let file = |start: u64| (0..24u64).map(move |i| (start + i * 32768, 32768usize));
    let profiled: Vec<(u64, usize)> = file(3 * CHUNK + 12288).chain(file(9 * CHUNK + 4096)).collect();

    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c1"), &m, BootProfileMode::Auto)).unwrap();
    for &(off, n) in &profiled {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    s.close(Duration::from_secs(60));
    drop(s);
    assert_eq!(profiles(d.path()).len(), 2, "the boot's profile was saved");

    let m = Arc::new(RemoteMetrics::default());
    let mut o = opts(&d.path().join("c2"), &m, BootProfileMode::Auto);
    o.readahead_chunks = 8;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    wait_streamed(&s);
    let before = m.snapshot().gets;
    for &(off, n) in &profiled {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    let st = s.stats();
    assert_eq!((st.readahead_chunks, st.misses), (0, 0), "{st:?}");
    assert_eq!(m.snapshot().gets, before, "reading the profiled files went remote");

    // A file the profile does not hold: read ahead as ever.
    for (off, n) in file(30 * CHUNK) {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    assert!(s.stats().readahead_chunks > 0, "{:?}", s.stats());
    s.close(Duration::from_secs(60));
}

/// A boot that opens a profiled file sooner than the recorded one did
/// reads ahead of the profile's stream: the segments after the one it
/// waits for come with it, so it waits about once per few segments of
/// the file, not once per segment.
#[test]
fn a_file_read_sooner_than_recorded_brings_its_next_segments() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 64 << 20);
    let file = |start: u64, len: u64| (0..len / 65536).map(move |i| (start + i * 65536, 65536usize));
    // The recorded boot: a long file A, then file B.
    let b: Vec<(u64, usize)> = file(40 * CHUNK, 8 * CHUNK).collect();
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(&vurl, opts(&d.path().join("c1"), &m, BootProfileMode::Auto)).unwrap();
    for (off, n) in file(2 * CHUNK, 30 * CHUNK).chain(b.iter().copied()) {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    s.close(Duration::from_secs(60));
    drop(s);

    // This boot reads B first, over a link with long round trips, while
    // the stream is still on A (a small speculative budget keeps it there).
    let m = Arc::new(RemoteMetrics::default());
    let shaping = Shaping { latency: Duration::from_millis(300), bandwidth_bps: None };
    let mut o = cache_opts(&d.path().join("c2"), counted(m.clone(), None, shaping));
    o.boot_profile = BootProfileMode::Auto;
    o.readahead_chunks = 0;
    o.speculative_bytes = 1 << 20;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let t0 = Instant::now();
    while s.stats().profile_segments == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the profile never started streaming");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = s.stats();
    for &(off, n) in &b {
        assert_eq!(read(&*s, off, n), data[off as usize..off as usize + n]);
    }
    let st = s.stats();
    // B is 8 MiB: 8 segments or more. A round trip per segment without the
    // segments after it; here each brings 2 MiB more, so about 3. (Reads
    // that find the next segment still on the wire or being stored wait
    // too, more so on a loaded machine, but they cost no round trip of
    // their own: only waits that started a fetch are counted.)
    let ahead = st.profile_ahead - before.profile_ahead;
    assert!((1..=4).contains(&ahead), "{ahead} round trips reading B: {st:?}");
    assert!(st.profile_segments_done < 30, "the stream was to be still on A: {st:?}");
    s.close(Duration::from_secs(60));
}

/// A profile saved while the guest runs holds only committed bytes: pages
/// of a chunk the guest zeroed since, not yet written back, are left out,
/// and a cold start on another cache reads the volume's bytes there. The
/// bug: the zeroes were streamed into the next cold start under the
/// committed generation's digest.
#[test]
fn a_profile_never_holds_pages_not_committed() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = imported(d.path(), 8 << 20);
    let m = Arc::new(RemoteMetrics::default());
    let mut o = opts(&d.path().join("c1"), &m, BootProfileMode::Auto);
    o.boot_profile_window = Duration::from_secs(1);
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let generation = driveblk::volume::info(&vurl).unwrap().generation;
    // Parts of chunks 2 and 4 are read (recorded), then chunk 2 is zeroed.
    let reads = [(2 * CHUNK + 8192, 64 << 10), (4 * CHUNK, 64 << 10)];
    for (at, n) in reads {
        assert_eq!(read(&*s, at, n), data[at as usize..at as usize + n]);
    }
    s.write_zeroes_at(2 * CHUNK, CHUNK).unwrap();
    let t0 = Instant::now();
    while profiles(d.path()).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the profile was never saved");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Gone without a close: the zeroes were never committed.
    assert_eq!(s.sync_status().unwrap().generations_committed, 0);
    drop(s);
    assert_eq!(driveblk::volume::info(&vurl).unwrap().generation, generation);

    // Another machine (a reader: the writer lease stays with the first).
    let mut o = opts(&d.path().join("c2"), &m, BootProfileMode::Auto);
    o.read_only = true;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    wait_streamed(&s);
    for (at, n) in reads {
        assert!(read(&*s, at, n) == data[at as usize..at as usize + n], "read at {at}: not the volume's bytes");
    }
    s.close(Duration::from_secs(60));
}
