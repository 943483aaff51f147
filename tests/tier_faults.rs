//! The tiered store under failure: corrupt packs and manifests are
//! reported (never served), transient remote faults are retried away, a
//! dead remote still serves what is cached, and concurrent misses on one
//! chunk make one fetch.

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{FaultPlan, RemoteMetrics, Shaping};
use driveblk::tier::Storage;
use driveblk::volume::{self, ChunkRef, ImportOptions, VolumeError};
use support::*;

fn imported(d: &std::path::Path, len: usize, seed: u64) -> (String, Vec<u8>) {
    let (src, bytes) = raw_image(d, "src.raw", len, seed);
    let vurl = url(&d.join("remote/vol"));
    volume::import(&src, &vurl, &ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }).unwrap();
    (vurl, bytes)
}

fn first_packed(s: &driveblk::tier::TieredStore) -> (u64, String, u64, u64) {
    let v = s.volume();
    (0..v.chunk_count())
        .find_map(|i| match v.chunk_ref(i) {
            ChunkRef::Packed { pack, offset, len, .. } => {
                Some((i, v.manifest().packs[pack as usize].clone(), offset, len))
            }
            _ => None,
        })
        .unwrap()
}

/// Flips a byte of `key` in the remote folder at `at`.
fn flip(d: &std::path::Path, key: &str, at: u64) {
    let p = d.join("remote/vol").join(key);
    let mut raw = std::fs::read(&p).unwrap();
    raw[at as usize] ^= 0x10;
    std::fs::write(&p, &raw).unwrap();
}

/// Packed chunks whose first sub-frame holds data (not a few bytes of a
/// zero run): (chunk, pack key, frame offset, compressed sub-frame lengths).
fn data_chunks(s: &driveblk::tier::TieredStore) -> Vec<(u64, String, u64, Vec<u64>)> {
    let v = s.volume();
    (0..v.chunk_count())
        .filter_map(|i| match v.chunk_ref(i) {
            ChunkRef::Packed { pack, offset, .. } => {
                let key = v.manifest().packs[pack as usize].clone();
                let subs: Vec<u64> =
                    v.cached_index(&key).unwrap().entries[&offset].subs.iter().map(|s| u64::from(s.0)).collect();
                (subs.len() == 4 && subs.iter().all(|&l| l > 4096)).then_some((i, key, offset, subs))
            }
            _ => None,
        })
        .collect()
}

/// A damaged byte in what a read covers fails the read (InvalidData,
/// naming chunk and pack), serves nothing and caches nothing, every time
/// it is read. A damaged byte elsewhere in the run of sub-frames a miss
/// fetches fails that run (counted) while the read gets its own sound
/// sub-frames; a later read that covers the damaged one fails the same way.
#[test]
fn corrupt_pack_byte_is_detected_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 4 << 20, 11);
    let mut o = cache_opts(&d.path().join("c"), Default::default());
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    indexes_known(&s);
    let chunks = data_chunks(&s);
    assert!(chunks.len() >= 3, "{chunks:?}");
    let read = |at: u64, n: usize| {
        let mut b = vec![0xAAu8; n];
        let r = s.read_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking);
        r.map(|_| b)
    };
    let refused = |at: u64, n: usize, idx: u64, pack: &str| {
        let mut b = vec![0xAAu8; n];
        let e = s.read_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("chunk {idx}")) && msg.contains("corrupt") && msg.contains(pack), "{msg}");
        assert!(b.iter().all(|&x| x == 0xAA), "bad data returned");
    };

    // In the sub-frame the read covers (its first): refused, twice.
    let (a, pack_a, off_a, subs_a) = &chunks[0];
    flip(d.path(), pack_a, off_a + subs_a[0] / 2);
    let errors = s.stats().fetch_errors;
    for _ in 0..2 {
        refused(a * CS + 100, 8192, *a, pack_a);
    }
    let st = s.stats();
    assert_eq!((st.chunks_cached, st.chunks_partial), (0, 0), "nothing of the chunk kept: {st:?}");
    assert!(st.fetch_errors > errors);
    // Its other sub-frames are sound and read.
    let at = a * CS + 3 * (64 << 10);
    assert_eq!(read(at, 4096).unwrap(), bytes[at as usize..][..4096]);
    // A read of the whole chunk covers the bad sub-frame too.
    refused(a * CS, CS as usize, *a, pack_a);

    // Outside the read, inside the run its miss fetches (sub-frame 2 of
    // 0-3): the read is served from its own sub-frames, the run's failure
    // is counted; a later read of sub-frame 2 is refused.
    let (b, pack_b, off_b, subs_b) = &chunks[1];
    flip(d.path(), pack_b, off_b + subs_b[0] + subs_b[1] + subs_b[2] / 2);
    let errors = s.stats().fetch_errors;
    let at = b * CS + 100;
    assert_eq!(read(at, 8192).unwrap(), bytes[at as usize..][..8192]);
    assert!(s.stats().fetch_errors > errors, "the damaged run was not reported");
    refused(b * CS + 2 * (64 << 10) + 500, 4096, *b, pack_b);
    let at = b * CS + (64 << 10);
    assert_eq!(read(at, 4096).unwrap(), bytes[at as usize..][..4096]);
    refused(b * CS + 2 * (64 << 10) + 500, 4096, *b, pack_b);

    // Other chunks still read fine.
    let (c, ..) = &chunks[2];
    let at = c * CS;
    assert_eq!(read(at, CS as usize).unwrap(), bytes[at as usize..][..CS as usize]);
}

/// A damaged byte in a pack's sub-frame index fails the index's check (a
/// fetch error, reported; `verify --full` names the pack): no sub-frame is
/// fetched by it, the pack's chunks are read whole and checked against the
/// manifest, so they still read right, and a damaged chunk byte in that
/// pack is still refused.
#[test]
fn corrupt_index_byte_is_detected_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 4 << 20, 11);
    let probe = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("probe"), Default::default())).unwrap();
    let (idx, pack, offset, len) = first_packed(&probe);
    let m = probe.volume().manifest();
    drop(probe);
    let ixr = m.indexes[&pack].clone();
    // A byte of the first sub-frame's hash (after the frame's 8 bytes, the
    // payload's 16 of header and the entry's 16 and 4 of offset, length,
    // count and compressed length): the index still parses, only its
    // sha256 tells.
    flip(d.path(), &pack, ixr.offset + 8 + 16 + 16 + 4 + 6);

    let mut o = cache_opts(&d.path().join("c"), Default::default());
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let t0 = std::time::Instant::now();
    while s.stats().fetch_errors == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the damaged index was never reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.volume().cached_index(&pack).is_none(), "a damaged index was kept");
    assert!(!s.volume().part_ready(idx));
    // The pack's chunks read whole, checked against the manifest.
    assert!(read_all(&*s).unwrap() == bytes);
    drop(s);

    // A damaged chunk byte in that pack is refused on the whole-chunk path.
    flip(d.path(), &pack, offset + len / 3);
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c2"), Default::default())).unwrap();
    let mut b = vec![0xAAu8; 4096];
    let e = s.read_vectored_at(idx * CS, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains(&pack), "{e}");
    assert!(b.iter().all(|&x| x == 0xAA));
    drop(s);
    let r = driveblk::volume::verify::verify(
        &vurl,
        &driveblk::volume::verify::VerifyOptions { full: true, ..Default::default() },
    )
    .unwrap();
    let p = r.problems.iter().find(|p| p.key == pack).expect("verify names the pack");
    assert!(format!("{p:?}").contains("sub-frame index"), "{p:?}");
}

/// A manifest a newer driveblk wrote (another machine upgraded first) is
/// not damaged: open, info, verify and gc all say so and name the way out,
/// even when its fields no longer parse here.
#[test]
fn a_manifest_a_newer_driveblk_wrote_is_newer_not_corrupt() {
    use driveblk::volume::format::{seal, unseal, FORMAT_VERSION};
    let d = tempfile::tempdir().unwrap();
    let (vurl, _) = imported(d.path(), 2 << 20, 12);
    let g = d.path().join("remote/vol/gen-00000000000000000001");
    let raw = std::fs::read(&g).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(unseal(&raw).unwrap()).unwrap();
    m["version"] = (FORMAT_VERSION + 1).into();
    m["chunk_map"] = m["chunks"].take();
    m.as_object_mut().unwrap().remove("chunks");
    std::fs::write(&g, seal(serde_json::to_vec(&m).unwrap())).unwrap();
    let newer = |e: &VolumeError| {
        let msg = e.to_string();
        assert!(matches!(e, VolumeError::Newer { .. }), "{msg}");
        assert!(
            msg.contains("gen-00000000000000000001")
                && msg.contains("newer driveblk")
                && msg.contains("upgrade this machine")
                && msg.contains("nothing is damaged")
                && !msg.contains("corrupt"),
            "{msg}"
        );
    };
    newer(&driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), Default::default())).err().unwrap());
    newer(&volume::info(&vurl).unwrap_err());
    newer(&volume::verify::verify(&vurl, &Default::default()).unwrap_err());
    newer(&volume::gc::gc(&vurl, &Default::default()).unwrap_err());
}

/// A lease heartbeat a newer driveblk wrote, whose fields do not parse
/// here, is not taken for "no heartbeat" (its holder may be alive and
/// writing): the lease's standing is an error that says why.
#[test]
fn a_lease_heartbeat_a_newer_driveblk_wrote_is_not_taken_for_absent() {
    use driveblk::volume::format::LeaseRecord;
    use driveblk::volume::lease::{heartbeat_key, inspect, HEARTBEAT_MAGIC};
    let d = tempfile::tempdir().unwrap();
    let (vurl, _) = imported(d.path(), 2 << 20, 12);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let u = driveblk::remote::RemoteUrl::parse(&vurl).unwrap();
        let r = volume::VolumeReader::open(&u, &Default::default()).await.unwrap();
        let mut m = (*r.manifest()).clone();
        let cache_id = "ab".repeat(16);
        m.lease = Some(LeaseRecord {
            host: "desktop".into(),
            pid: 1,
            cache_id: cache_id.clone(),
            taken_at: m.generation,
            since_ms: None,
            ttl_ms: 1000,
            generation: m.generation,
            pending_bytes: 4096,
            released: false,
        });
        let body = format!(
            r#"{{"format":"{HEARTBEAT_MAGIC}","volume_id":"{}","holder":{{"host":"desktop"}}}}"#,
            r.header.volume_id
        );
        let put = driveblk::remote::PutBody::from_bytes(body.into_bytes());
        r.remote.put(&heartbeat_key(&cache_id), put).await.unwrap();
        let e = inspect(&r.remote, &r.header, &m, None).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VolumeError::Newer { .. }) && msg.contains("lease heartbeat"), "{msg}");
    });
}

#[test]
fn corrupt_manifest_is_detected_and_reported() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, _) = imported(d.path(), 2 << 20, 12);
    let g = d.path().join("remote/vol/gen-00000000000000000001");
    let mut raw = std::fs::read(&g).unwrap();
    raw[30] ^= 0x01;
    std::fs::write(&g, &raw).unwrap();
    let e = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), Default::default())).err().unwrap();
    assert!(matches!(e, VolumeError::CorruptManifest { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("gen-00000000000000000001") && msg.contains("corrupt"), "{msg}");
    // Truncated manifest too.
    std::fs::write(&g, &raw[..raw.len() / 2]).unwrap();
    assert!(matches!(volume::info(&vurl), Err(VolumeError::CorruptManifest { .. })));
    // And no manifest at all: an import that never committed.
    std::fs::remove_file(&g).unwrap();
    let e = volume::info(&vurl).unwrap_err();
    assert!(matches!(e, VolumeError::NoGeneration { .. }), "{e}");
}

#[test]
fn transient_faults_are_retried_without_errors() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 6 << 20, 13);
    let faults = FaultPlan::new(5);
    faults.set_failure_rate(0.3);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("c"), counted(m.clone(), Some(faults.clone()), Shaping::default())),
    )
    .unwrap();
    assert!(read_all(&*s).unwrap() == bytes);
    assert!(faults.injected() > 3, "faults were injected: {}", faults.injected());
    assert_eq!(s.stats().fetch_errors, 0);
    assert!(m.snapshot().errors >= faults.injected());
}

#[test]
fn dead_remote_still_serves_cached_data() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 4 << 20, 14);
    let faults = FaultPlan::new(1);
    let m = Arc::new(RemoteMetrics::default());
    let mut remote = counted(m.clone(), Some(faults.clone()), Shaping::default());
    remote.retry.max_attempts = 3;
    let mut o = cache_opts(&d.path().join("c"), remote);
    o.ram_cache = 0; // SSD tier only
    o.readahead_chunks = 0;
    o.remote_wait.budget = Duration::from_secs(2);
    let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
    let half = bytes.len() / 2;
    let mut b = vec![0u8; half];
    s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    faults.set_down(true);
    // Cached half: served.
    let mut b2 = vec![0u8; half];
    s.read_vectored_at(0, &IoVec::from_slice(&mut b2), IoMode::Blocking).unwrap();
    assert!(b2[..] == bytes[..half]);
    // Uncached half: a clear error once the guest's budget is spent (it
    // retries until then), not a hang.
    let mut b3 = vec![0u8; 4096];
    let t0 = std::time::Instant::now();
    let e = s.read_vectored_at(bytes.len() as u64 - 4096, &IoVec::from_slice(&mut b3), IoMode::Blocking).unwrap_err();
    assert!(e.to_string().contains("gave up after") || e.to_string().contains("did not answer within 2 s"), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(1500), "failed before the budget: {:?}", t0.elapsed());
    // Restart while the remote is down: the cache's copy of the header and
    // manifest starts the volume, cached data is served.
    drop(s);
    let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
    assert!(s.stats().offline);
    let mut b2 = vec![0u8; half];
    s.read_vectored_at(0, &IoVec::from_slice(&mut b2), IoMode::Blocking).unwrap();
    assert!(b2[..] == bytes[..half]);
    faults.set_down(false);
    s.read_vectored_at(bytes.len() as u64 - 4096, &IoVec::from_slice(&mut b3), IoMode::Blocking).unwrap();
    assert!(b3[..] == bytes[bytes.len() - 4096..]);
    // Without a cache the down remote is reported as such.
    faults.set_down(true);
    let e = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("empty"), o.remote.clone())).err().unwrap();
    assert!(matches!(e, VolumeError::Remote { .. }), "{e}");
}

#[test]
fn concurrent_misses_on_one_chunk_make_one_fetch() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 2 << 20, 15);
    let m = Arc::new(RemoteMetrics::default());
    let shaping = Shaping { latency: Duration::from_millis(50), bandwidth_bps: None };
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, shaping));
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let (idx, ..) = first_packed(&s);
    // The pack's sub-frame index comes in the background at open: let it
    // land, so only the misses' reads are counted.
    let t0 = std::time::Instant::now();
    while s.stats().bytes_index == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = m.snapshot().gets;
    let fetches_before = s.stats().remote_fetches;
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let s = s.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                barrier.wait();
                let off = idx * CS + t as u64 * 4096;
                s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
                (off, b)
            })
        })
        .collect();
    for h in handles {
        let (off, b) = h.join().unwrap();
        assert!(b[..] == bytes[off as usize..off as usize + 4096]);
    }
    assert_eq!(m.snapshot().gets - before, 1, "one remote read for {n} concurrent misses");
    assert_eq!(s.stats().remote_fetches - fetches_before, 1);
}

#[test]
fn import_survives_flaky_uploads_and_lost_replies() {
    let d = tempfile::tempdir().unwrap();
    let (src, bytes) = raw_image(d.path(), "src.raw", 3 << 20, 16);
    let faults = FaultPlan::new(9);
    faults.set_failure_rate(0.2);
    faults.lose_put_replies(2);
    let m = Arc::new(RemoteMetrics::default());
    let remote = counted(m.clone(), Some(faults.clone()), Shaping::default());
    let vurl = url(&d.path().join("remote/vol"));
    let opts = ImportOptions { chunk_size: CS, pack_size: 512 << 10, remote: remote.clone(), ..Default::default() };
    volume::import(&src, &vurl, &opts).unwrap();
    assert!(faults.injected() > 2);
    faults.set_failure_rate(0.0);
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), remote)).unwrap();
    assert!(read_all(&*s).unwrap() == bytes);
    // No temp files left behind by failed uploads.
    let leftovers = std::fs::read_dir(d.path().join("remote/vol"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn many_chunks_are_fetched_in_parallel() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 4 << 20, 17);
    let m = Arc::new(RemoteMetrics::default());
    let shaping = Shaping { latency: Duration::from_millis(150), bandwidth_bps: None };
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, shaping));
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut b = vec![0u8; bytes.len()];
    let t0 = std::time::Instant::now();
    s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    let el = t0.elapsed();
    assert!(b == bytes);
    let fetched = s.stats().remote_fetches;
    assert!(fetched >= 8, "{fetched}");
    // Serially this would take fetched * 150 ms.
    assert!(el < Duration::from_millis(150) * (fetched as u32) / 2, "{el:?} for {fetched} chunks");
}

#[test]
fn write_landing_during_a_fetch_wins_over_the_fetched_bytes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let d = tempfile::tempdir().unwrap();
    let (vurl, bytes) = imported(d.path(), 2 << 20, 18);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let (g2, w2) = (gate.clone(), waiting.clone());
    let mut remote = volume::RemoteOptions::default();
    remote.layer = Some(Arc::new(move |r| -> driveblk::remote::DynRemote {
        Arc::new(GatedRemote { inner: r, gate: g2.clone(), waiting: w2.clone(), puts: false })
    }));
    let mut o = cache_opts(&d.path().join("c"), remote);
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let (idx, ..) = first_packed(&s);
    let off = idx * CS;
    // A reader misses and its fetch blocks at the gate.
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
            b
        })
    };
    while waiting.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // A whole-chunk write lands meanwhile (it needs no fetch).
    let mut new = vec![0xEEu8; CS as usize];
    s.write_vectored_at(off, &IoVec::from_slice(&mut new), IoMode::Blocking).unwrap();
    gate.add_permits(1000);
    let got = reader.join().unwrap();
    // Concurrent with the write: old or new bytes, never a mix.
    assert!(got == vec![0xEE; 4096] || got[..] == bytes[off as usize..off as usize + 4096]);
    // Afterwards the write is what every tier serves; the late fetch
    // installed nothing stale.
    let mut b = vec![0u8; CS as usize];
    s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert!(b.iter().all(|&x| x == 0xEE));
    let st = s.stats();
    assert_eq!(st.chunks_dirty, 1);
    assert_eq!(st.chunks_cached, 1, "{st:?}");
}
