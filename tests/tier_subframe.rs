//! Sub-frames through the tiered store on a real `dir:` remote: a miss in
//! a chunk stored as sub-frames fetches the run of sub-frames from its own
//! on in one request (not the chunk), a second miss the rest as one flight
//! later misses join, a corrupt sub-frame is refused and never cached, volumes of
//! single-frame chunks (written before sub-frames) still read, encrypted
//! volumes fetch parts too, an export after partial reads equals the
//! source image (qemu-img compare), and a write of part of a page a miss
//! brought needs no fetch.

#[path = "tier_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{FaultPlan, RemoteMetrics, Shaping};
use driveblk::tier::tiered::TieredStore;
use driveblk::tier::Storage;
use driveblk::volume::{ChunkRef, ImportOptions};
use rand::{Rng, SeedableRng};
use support::*;

const CHUNK: u64 = 1 << 20;
const SUB: u64 = 64 << 10;

/// Random bytes (nothing compresses) imported in 1 MiB chunks, 4 MiB packs.
fn volume(d: &Path, len: usize, tweak: impl FnOnce(&mut ImportOptions)) -> (String, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let src = d.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    let vurl = url(&d.join("remote/vol"));
    let mut io = ImportOptions { chunk_size: CHUNK, pack_size: 4 << 20, ..Default::default() };
    tweak(&mut io);
    driveblk::volume::import(&src, &vurl, &io).unwrap();
    (vurl, data)
}

fn open(d: &Path, vurl: &str, cache: &str, m: &Arc<RemoteMetrics>) -> Arc<TieredStore> {
    let mut o = cache_opts(&d.join(cache), counted(m.clone(), None, Shaping::default()));
    o.readahead_chunks = 0;
    o.read_only = true;
    driveblk::tier::open_volume(vurl, o).unwrap()
}

fn read(s: &dyn Storage, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking)?;
    Ok(b)
}

/// A 4 KiB miss fetches, in one request, the run of missing sub-frames
/// from its own on (256 KiB of a 1 MiB chunk: the reads after it in a file
/// are then local); reads inside the run cost no request; completing the
/// chunk fetches only the sub-frames it lacks, so the chunk costs its size
/// once; every byte reads back right.
#[test]
fn a_miss_fetches_the_subframes_it_needs() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = volume(d.path(), 8 << 20, |_| {});
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "c", &m);
    indexes_known(&s);
    let before = m.snapshot();
    let at = 3 * CHUNK + 70_000;
    assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
    let after = m.snapshot();
    let got = after.bytes_read - before.bytes_read;
    assert_eq!(after.gets - before.gets, 1, "one ranged read");
    assert!((4 * SUB..4 * SUB + 4096).contains(&got), "a 4 KiB miss fetched {got} bytes, not sub-frames 1-4");
    assert_eq!(s.stats().part_fetches, 1);
    for at in [3 * CHUNK + SUB, 3 * CHUNK + 2 * SUB + 10_000, 3 * CHUNK + 5 * SUB - 4096] {
        assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
    }
    assert_eq!(m.snapshot().gets - after.gets, 0, "reads inside the run are local");
    assert_eq!(s.stats().chunks_partial, 1);
    // Reading the whole image completes chunk 3 from the sub-frames it
    // lacks (runs 0 and 5-15), not the whole chunk again.
    assert_eq!(read_all(&*s).unwrap(), data);
    let st = s.stats();
    assert_eq!(st.chunks_partial, 0);
    assert!(st.remote_bytes - st.bytes_index < 8 * CHUNK + 8 * 16 * 64, "{st:?}");
    assert_eq!(
        st.bytes_miss + st.bytes_readahead + st.bytes_index + st.bytes_profile + st.bytes_hydrate + st.bytes_stream,
        st.remote_bytes,
        "{st:?}"
    );
    s.close(Duration::from_secs(10));
}

/// A second miss elsewhere in a chunk fetches the rest of it (its missing
/// runs, one request each) as one flight: misses arriving together in the
/// chunk, over a slow remote, join it instead of each sending for its own
/// sub-frames, and the chunk costs its size once.
#[test]
fn a_second_miss_fetches_the_rest_as_one_flight() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = volume(d.path(), 4 << 20, |_| {});
    let data = Arc::new(data);
    let m = Arc::new(RemoteMetrics::default());
    let slow = Shaping { latency: Duration::from_millis(150), ..Shaping::default() };
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, slow));
    o.readahead_chunks = 0;
    o.read_only = true;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    let at = 2 * CHUNK + 2 * SUB + 100;
    assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
    let before = m.snapshot();
    // Five misses outside the run (sub-frames 2-5) at once.
    let readers: Vec<_> = [8u64, 10, 12, 14, 0]
        .into_iter()
        .map(|sf| {
            let (s, data) = (s.clone(), data.clone());
            std::thread::spawn(move || {
                let at = 2 * CHUNK + sf * SUB + 4096;
                assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let after = m.snapshot();
    assert_eq!(after.gets - before.gets, 2, "the rest of the chunk: runs 0-1 and 6-15, once");
    let got = after.bytes_read - before.bytes_read;
    assert!((CHUNK - 4 * SUB..CHUNK - 4 * SUB + 4096).contains(&got), "the rest fetched {got} bytes");
    let st = s.stats();
    assert_eq!(st.chunks_partial, 0, "{st:?}");
    assert_eq!(read_all(&*s).unwrap(), *data);
    s.close(Duration::from_secs(10));
}

/// A sub-frame whose bytes were damaged in the pack is refused (the read
/// fails, InvalidData, and nothing of it is cached), while the other
/// sub-frames of the same chunk still read; `verify --full` names the
/// pack.
#[test]
fn a_corrupt_subframe_is_refused_and_never_cached() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = volume(d.path(), 4 << 20, |_| {});
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "c", &m);
    indexes_known(&s);
    let ChunkRef::Packed { pack, offset, .. } = s.volume().chunk_ref(2) else { panic!("chunk 2 is packed") };
    let key = s.volume().manifest().packs[pack as usize].clone();
    let ix = s.volume().cached_index(&key).unwrap();
    let e = &ix.entries[&offset];
    // The middle of sub-frame 1.
    let bad_at = offset + u64::from(e.subs[0].0) + u64::from(e.subs[1].0) / 2;
    let path = d.path().join("remote/vol").join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[bad_at as usize] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    for _ in 0..2 {
        let err = read(&*s, 2 * CHUNK + SUB + 100, 4096).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }
    assert!(!s.volume().manifest().chunks.is_empty());
    assert_eq!(read(&*s, 2 * CHUNK + 100, 4096).unwrap(), data[2 * CHUNK as usize + 100..][..4096]);
    assert_eq!(read(&*s, 2 * CHUNK + 2 * SUB, 4096).unwrap(), data[(2 * CHUNK + 2 * SUB) as usize..][..4096]);
    assert!(s.stats().fetch_errors > 0);
    s.close(Duration::from_secs(10));
    drop(s);
    let r = driveblk::volume::verify::verify(
        &vurl,
        &driveblk::volume::verify::VerifyOptions { full: true, ..Default::default() },
    )
    .unwrap();
    assert!(r.problems.iter().any(|p| p.key == key), "{:?}", r.problems);
}

/// Volumes written before sub-frames (one frame per chunk, no indexes)
/// read exactly as before: misses fetch whole chunks.
#[test]
fn single_frame_volumes_still_read() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = volume(d.path(), 4 << 20, |io| io.subframes = false);
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "c", &m);
    assert!(s.volume().manifest().indexes.is_empty());
    let before = m.snapshot();
    assert_eq!(read(&*s, CHUNK + 8192, 4096).unwrap(), data[CHUNK as usize + 8192..][..4096]);
    assert!(m.snapshot().bytes_read - before.bytes_read >= CHUNK, "a whole chunk");
    assert_eq!(read_all(&*s).unwrap(), data);
    let st = s.stats();
    assert_eq!(st.part_fetches, 0);
    assert_eq!(st.bytes_index, 0);
    s.close(Duration::from_secs(10));
}

/// An encrypted volume (sealed 16 KiB blocks) fetches parts too, and they
/// read right.
#[test]
fn encrypted_volumes_fetch_parts() {
    let d = tempfile::tempdir().unwrap();
    let key = Arc::new(driveblk::volume::crypto::UserKey::new(b"sub-frame test key".to_vec(), "test".into()).unwrap());
    let k2 = key.clone();
    let (vurl, data) = volume(d.path(), 3 << 20, move |io| {
        io.encrypt = true;
        io.remote.key = Some(k2);
    });
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, Shaping::default()));
    o.readahead_chunks = 0;
    o.read_only = true;
    o.remote.key = Some(key);
    let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
    indexes_known(&s);
    let at = CHUNK + 300_000;
    assert_eq!(read(&*s, at, 8192).unwrap(), data[at as usize..][..8192]);
    let got = s.stats().bytes_miss;
    assert!(got < 5 * SUB, "the miss waited for {got} bytes (its run: sub-frames 4-7)");
    assert_eq!(s.stats().part_fetches, 1);
    s.close(Duration::from_secs(10));
    drop(s);
    // The indexes kept in the cache directory are sealed (they hold hashes
    // of the plaintext), and a restart opens them instead of fetching.
    let saved: Vec<_> = std::fs::read_dir(d.path().join("c/indexes")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!saved.is_empty());
    for p in &saved {
        let b = std::fs::read(p).unwrap();
        assert!(!b.windows(4).any(|w| w == b"DBSX"), "{} holds a plaintext index", p.display());
    }
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    assert_eq!(s.stats().bytes_index, 0, "{:?}", s.stats());
    assert_eq!(read_all(&*s).unwrap(), data);
    s.close(Duration::from_secs(10));
}

/// The packs' sub-frame indexes stay in the cache directory: a restart
/// over a warm cache takes them from there (a read of cached data makes no
/// remote request, nor do the indexes, and a miss still fetches only its
/// sub-frames), and one deleted or damaged there is fetched again, once.
#[test]
fn indexes_are_kept_in_the_cache_directory() {
    let d = tempfile::tempdir().unwrap();
    // 8 chunks in two packs; chunks 0 and 4 (one in each) made local.
    let (vurl, data) = volume(d.path(), 8 << 20, |_| {});
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "c", &m);
    indexes_known(&s);
    for c in [0, 4] {
        assert_eq!(read(&*s, c * CHUNK, CHUNK as usize).unwrap(), data[(c * CHUNK) as usize..][..CHUNK as usize]);
    }
    let indexes = s.volume().manifest().indexes.clone();
    assert_eq!(indexes.len(), 2);
    s.close(Duration::from_secs(10));
    drop(s);
    let dir = d.path().join("c/indexes");
    for k in indexes.keys() {
        assert!(dir.join(k).is_file(), "index of {k} not kept");
    }

    // Restart: the indexes come from the cache directory.
    let s = open(d.path(), &vurl, "c", &m);
    let before = m.snapshot();
    indexes_known(&s);
    for c in [0, 4] {
        assert_eq!(read(&*s, c * CHUNK, CHUNK as usize).unwrap(), data[(c * CHUNK) as usize..][..CHUNK as usize]);
    }
    assert_eq!(m.snapshot().gets - before.gets, 0, "a warm restart went remote");
    assert_eq!(s.stats().bytes_index, 0);
    let at = 2 * CHUNK + 100;
    assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..][..4096]);
    assert_eq!(s.stats().part_fetches, 1, "the saved index serves parts");
    s.close(Duration::from_secs(10));
    drop(s);

    // One deleted, one damaged: both fetched again (and kept again).
    let keys: Vec<&String> = indexes.keys().collect();
    std::fs::remove_file(dir.join(keys[0])).unwrap();
    let mut b = std::fs::read(dir.join(keys[1])).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(dir.join(keys[1]), &b).unwrap();
    let s = open(d.path(), &vurl, "c", &m);
    indexes_known(&s);
    // An index is served as soon as it is installed, and counted just
    // after: the count may trail `indexes_known` by a moment.
    let want: u64 = indexes.values().map(|r| r.len).sum();
    let t0 = std::time::Instant::now();
    while s.stats().bytes_index < want && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.stats().bytes_index, want, "{:?}", s.stats());
    assert_eq!(read_all(&*s).unwrap(), data);
    s.close(Duration::from_secs(10));
    drop(s);
    for (k, r) in &indexes {
        let pack = std::fs::read(d.path().join("remote/vol").join(k)).unwrap();
        assert!(std::fs::read(dir.join(k)).unwrap() == pack[r.offset as usize..(r.offset + r.len) as usize]);
    }
}

/// A qcow2 image read in scattered parts (the cache then holds partial
/// chunks), exported: qemu-img says it equals the source.
#[test]
fn an_export_after_partial_reads_equals_the_source() {
    let d = tempfile::tempdir().unwrap();
    let (q, bytes) = qcow2_image(d.path(), 6 << 20, 4);
    let vurl = url(&d.path().join("remote/q"));
    let io = ImportOptions { chunk_size: CHUNK, pack_size: 2 << 20, ..Default::default() };
    driveblk::volume::import(&q, &vurl, &io).unwrap();
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "c", &m);
    indexes_known(&s);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..40 {
        let at = rng.random_range(0..bytes.len() as u64 / 4096 - 1) * 4096;
        assert_eq!(read(&*s, at, 4096).unwrap(), bytes[at as usize..][..4096]);
    }
    assert!(s.stats().part_fetches > 0);
    s.close(Duration::from_secs(10));
    drop(s);
    let out = d.path().join("out.qcow2");
    let eo = driveblk::tier::export::ExportOptions {
        cache_dir: Some(d.path().join("c")),
        parallel: 4,
        ..Default::default()
    };
    driveblk::tier::export::export(&vurl, &out, &eo).unwrap();
    assert!(qemu_compare("qcow2", &q, &out));
}

/// Small reads scattered over a volume stop taking runs and whole chunks
/// once what was fetched passes the bound (the bytes read, three times
/// that again, and a few MiB for the first misses): each miss then fetches
/// only the sub-frame it reads, so the boot of a big disk reading small
/// files does not fetch several times what it reads. Every byte reads
/// back right.
#[test]
fn scattered_misses_keep_to_the_bound() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, data) = volume(d.path(), 48 << 20, |_| {});
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, Shaping::default()));
    o.readahead_chunks = 0;
    o.boot_profile = driveblk::tier::boot::BootProfileMode::Off;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut read_bytes = 0u64;
    for _ in 0..200 {
        let at = rng.random_range(0..data.len() as u64 / 4096) * 4096;
        assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..at as usize + 4096]);
        read_bytes += 4096;
    }
    let st = s.stats();
    // Unbounded, the first miss in each chunk takes a 256 KiB run and the
    // second the rest of the chunk: most of the 48 MiB.
    let bound = 4 * read_bytes + (4 << 20);
    assert!(st.bytes_miss < bound + 200 * SUB, "misses fetched {} for {read_bytes} read: {st:?}", st.bytes_miss);
    assert!(st.bytes_miss < 24 << 20, "{st:?}");
    s.close(Duration::from_secs(30));
}

/// A volume exactly as format version 2 wrote it (`tests/fixtures/volume-v2`,
/// imported by the release before version 3: SHA-256 chunk digests, a
/// version 1 pack index of SHA-256 sub-frame hashes) reads whole and by
/// sub-frames, takes writes, and its next generation is version 3 with
/// BLAKE3 digests while the chunks it did not change keep theirs.
#[test]
fn a_volume_written_by_format_version_2_reads_and_takes_writes() {
    use sha2::{Digest, Sha256};
    let d = tempfile::tempdir().unwrap();
    let folder = d.path().join("remote/vol");
    std::fs::create_dir_all(&folder).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/volume-v2");
    for e in std::fs::read_dir(&fixture).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), folder.join(e.file_name())).unwrap();
    }
    let vurl = url(&folder);
    const CS: u64 = 128 << 10;
    let m = Arc::new(RemoteMetrics::default());
    let s = open(d.path(), &vurl, "a", &m);
    assert!(!s.volume().manifest().indexes.is_empty(), "the fixture has a pack index");
    // A sub-frame miss first (verified by the version 1 index), then all.
    let mid = read(&*s, CS + 70_000, 4096).unwrap();
    let all = read(&*s, 0, 4 * CS as usize).unwrap();
    assert_eq!(mid, all[(CS + 70_000) as usize..][..4096]);
    assert_eq!(
        hex::encode(Sha256::digest(&all)),
        "9a4c8f79acc39cbc6ce5d83a30af27ea7c175581198198aba8c696d63f9ea6b2",
        "the image the fixture was imported from"
    );
    drop(s);
    // Writes: a few pages of chunk 0 (a patch over a SHA-256 chunk), chunk 3
    // rewritten with the bytes it holds (unchanged: nothing to upload).
    let mut o = cache_opts(&d.path().join("w"), Default::default());
    o.readahead_chunks = 0;
    let w = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut expect = all.clone();
    for (off, len, byte) in [(4096u64, 8192usize, 0xa5u8), (3 * CS, CS as usize, 0)] {
        let mut b = if byte == 0 { all[off as usize..][..len].to_vec() } else { vec![byte; len] };
        expect[off as usize..][..len].copy_from_slice(&b);
        w.write_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    }
    w.flush_point().and_then(|t| w.wait_durable(t)).unwrap();
    assert_eq!(w.close(Duration::from_secs(30)), 0);
    drop(w);
    let text = std::fs::read_to_string(folder.join(driveblk::volume::format::gen_key(3))).unwrap();
    assert!(text.contains("\"version\":3"), "{text}");
    assert!(text.contains("\"patched\"") && text.contains("\"digest\":\"blake3:"), "{text}");
    assert!(!text.contains("\"3\":"), "an unchanged chunk went up again: {text}");
    // Another machine reads the result; every generation checks out.
    let r = open(d.path(), &vurl, "b", &m);
    assert!(read(&*r, 0, 4 * CS as usize).unwrap() == expect);
    let ChunkRef::Packed { digest, .. } = r.volume().chunk_ref(1) else { panic!("chunk 1 is packed") };
    assert_eq!(digest.len(), 64, "an untouched chunk keeps its SHA-256 digest: {digest}");
    drop(r);
    let v = driveblk::volume::verify::verify(
        &vurl,
        &driveblk::volume::verify::VerifyOptions { full: true, ..Default::default() },
    )
    .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// A write of part of a page not local fetches that page's sub-frames, not
/// the chunk. A write of part of a page in a chunk only partly local (a
/// miss fetched some of its sub-frames) takes the rest of that page from
/// the cache: no fetch, so it succeeds with the remote down. A write of part of a page
/// not local still needs the remote: it fails within the budget and
/// changes nothing. Once the remote is back, the change goes up.
#[test]
fn a_write_of_part_of_a_page_fetches_its_sub_frames_or_nothing_when_local() {
    part_of_a_local_page(false);
}

/// The same with an encrypted volume and cache (the page is decrypted,
/// changed and sealed again in the cache).
#[test]
fn a_write_of_part_of_a_page_fetches_its_sub_frames_or_nothing_when_local_encrypted() {
    part_of_a_local_page(true);
}

/// A chunk the SSD tier had no room for is still local in RAM: a write of
/// part of one of its pages takes the rest of the page from there, with no
/// fetch, so it succeeds with the remote down.
#[test]
fn a_write_of_part_of_a_page_of_a_chunk_held_in_ram_alone_needs_no_fetch() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut data) = volume(d.path(), 4 << 20, |_| {});
    let faults = FaultPlan::new(1);
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.readahead_chunks = 0;
    o.ssd_cache = 2 * CHUNK;
    o.remote_wait.budget = Duration::from_millis(500);
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    // Two dirty chunks fill the SSD tier (they are never evicted).
    for idx in 0..2u64 {
        let mut b = vec![idx as u8 + 1; CHUNK as usize];
        s.write_vectored_at(idx * CHUNK, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        data[(idx * CHUNK) as usize..][..CHUNK as usize].fill(idx as u8 + 1);
    }
    let at = 3 * CHUNK + 7 * SUB;
    assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..][..4096]);
    let st = s.stats();
    assert_eq!((st.chunks_cached, st.ssd_bytes), (2, 2 * CHUNK), "the SSD tier kept chunk 3");
    assert_eq!(st.ram_bytes, CHUNK, "chunk 3 is in RAM");
    faults.set_down(true);
    let gets = m.snapshot().gets;
    // Inside the run of sub-frames the read planned: a part would be fetched.
    let w = 3 * CHUNK + 8 * SUB + 3000;
    write_filled(&*s, &mut data, w, 300, 0x6B, "a write of part of a page of a chunk in RAM waited for the remote");
    assert_eq!(read(&*s, w - 3000, 8192).unwrap(), data[(w - 3000) as usize..][..8192]);
    assert_eq!(m.snapshot().gets, gets, "the write asked the remote");
    faults.set_down(false);
    changes_went_up(s, &vurl, &d.path().join("other"), None, &data);
}

fn part_of_a_local_page(encrypted: bool) {
    let d = tempfile::tempdir().unwrap();
    let key = encrypted.then(|| {
        Arc::new(driveblk::volume::crypto::UserKey::new(b"sub-frame test key".to_vec(), "test".into()).unwrap())
    });
    let k2 = key.clone();
    let (vurl, mut data) = volume(d.path(), 4 << 20, move |io| {
        io.encrypt = encrypted;
        io.remote.key = k2;
    });
    let faults = FaultPlan::new(1);
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.readahead_chunks = 0;
    o.remote.key = key.clone();
    o.encrypt_cache = encrypted;
    o.remote_wait.budget = Duration::from_millis(500);
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    // A write of part of a page in a chunk not local fetches the run of
    // sub-frames from that page's on, as a read miss does, not the chunk.
    let before = m.snapshot().bytes_read;
    let y = 3 * CHUNK + 5 * SUB + 100;
    let mut b = vec![0x3Cu8; 700];
    s.write_vectored_at(y, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    data[y as usize..][..700].fill(0x3C);
    let got = m.snapshot().bytes_read - before;
    assert!(got > 0 && got <= 5 * SUB, "a write of 700 bytes fetched {got} bytes, not the page's sub-frames");
    assert_eq!(read(&*s, y - 100, 4096).unwrap(), data[(y - 100) as usize..][..4096]);
    assert_eq!(m.snapshot().bytes_read - before, got, "the written page's run is local");
    // Sub-frames 1-4 of chunk 2 come in.
    let at = 2 * CHUNK + 70_000;
    assert_eq!(read(&*s, at, 4096).unwrap(), data[at as usize..][..4096]);
    assert_eq!(s.stats().chunks_partial, 2, "chunks 2 and 3 are local in part");
    faults.set_down(true);
    let gets = m.snapshot().gets;
    let w = 2 * CHUNK + SUB + 1536;
    write_filled(&*s, &mut data, w, 1024, 0xA5, "a write of part of a local page waited for the remote");
    assert_eq!(read(&*s, w - 1000, 8192).unwrap(), data[(w - 1000) as usize..][..8192]);
    assert_eq!(m.snapshot().gets, gets, "the write or the read asked the remote");
    let x = 2 * CHUNK + 10 * SUB + 512;
    let mut b = vec![0x5Au8; 512];
    assert!(
        s.write_vectored_at(x, &IoVec::from_slice(&mut b), IoMode::Blocking).is_err(),
        "a write of part of a page not local succeeded with the remote down"
    );
    faults.set_down(false);
    changes_went_up(s, &vurl, &d.path().join("other"), key, &data);
}

/// Writes `len` bytes of `byte` at `at` (failing with `what`) and notes
/// them in `data`, the expected image.
fn write_filled(s: &dyn Storage, data: &mut [u8], at: u64, len: usize, byte: u8, what: &str) {
    let mut b = vec![byte; len];
    if let Err(e) = s.write_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking) {
        panic!("{what}: {e}");
    }
    data[at as usize..][..len].fill(byte);
}

/// Syncs and closes `s`, then checks that a new cache in `dir` reads
/// `data` from the volume at `vurl`.
fn changes_went_up(
    s: Arc<TieredStore>,
    vurl: &str,
    dir: &Path,
    key: Option<Arc<driveblk::volume::crypto::UserKey>>,
    data: &[u8],
) {
    let t = s.flush_point().unwrap();
    s.wait_durable(t).unwrap();
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let mut o = cache_opts(dir, Default::default());
    o.read_only = true;
    o.remote.key = key;
    let s = driveblk::tier::open_volume(vurl, o).unwrap();
    assert!(read_all(&*s).unwrap() == data, "the remote holds other bytes than were written");
}
