//! Write-back in the tiered store against a real `dir:` remote: changes
//! are committed as generations another cache reads; a commit whose reply
//! was lost is recognised (by the retry wrapper, or after it gave up); a
//! second writer is fenced out and keeps its changes; a remote that is down
//! loses nothing and the sync resumes; writethrough FLUSH returns only once
//! the data is on the remote; scattered small writes upload what changed;
//! a commit whose cache state cannot be saved is not committed again; an
//! upload cut short by an outage or a stop resumes (also across a gc run).

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{FaultPlan, RemoteMetrics, Shaping};
use driveblk::tier::tiered::CacheMode;
use driveblk::tier::ExportOptions;
use driveblk::tier::Storage;
use driveblk::volume::{self, ImportOptions};
use rand::SeedableRng;
use support::*;

fn imported(d: &std::path::Path, len: usize, seed: u64) -> (String, Vec<u8>) {
    let (src, bytes) = raw_image(d, "src.raw", len, seed);
    let vurl = url(&d.join("remote/vol"));
    volume::import(&src, &vurl, &ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }).unwrap();
    (vurl, bytes)
}

fn write(s: &dyn Storage, off: u64, data: &[u8], expect: &mut Vec<u8>) {
    let mut v = data.to_vec();
    s.write_vectored_at(off, &IoVec::from_slice(&mut v), IoMode::Blocking).unwrap();
    let end = off as usize + data.len();
    if expect.len() < end {
        expect.resize(end, 0);
    }
    expect[off as usize..end].copy_from_slice(data);
}

/// A guest FLUSH: a flush point, and waiting as the cache mode says.
fn guest_flush(s: &dyn Storage) {
    let t = s.flush_point().unwrap();
    s.wait_durable(t).unwrap();
}

/// What a fresh cache on another machine reads (read-only: it needs no
/// writer lease).
fn fresh_view(d: &std::path::Path, vurl: &str, name: &str) -> Vec<u8> {
    let mut o = cache_opts(&d.join(name), Default::default());
    o.read_only = true;
    let s = driveblk::tier::open_volume(vurl, o).unwrap();
    read_all(&*s).unwrap()
}

#[test]
fn changes_reach_the_remote_and_another_cache_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 3 << 20, 31);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("a"), counted(m.clone(), None, Shaping::default())),
    )
    .unwrap();
    write(&*s, 100, &[0x5A; 1000], &mut expect);
    write(&*s, CS - 4000, &(0..9000u32).map(|i| i as u8).collect::<Vec<_>>(), &mut expect);
    write(&*s, 4 * CS, &vec![0xC3; CS as usize], &mut expect);
    s.write_zeroes_at(6 * CS, 2 * CS).unwrap();
    expect[6 * CS as usize..8 * CS as usize].fill(0);
    // Growth past the end, enough of the last chunk that it goes up whole
    // (and short: the image ends inside it).
    let grow = expect.len() as u64 + 7_000;
    write(&*s, grow, &[0x77; 120_000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0, "everything uploaded");
    let st = s.sync_status().unwrap();
    assert!(st.generations_committed >= 1 && st.conflict.is_none() && st.last_error.is_none(), "{st:?}");
    assert_eq!(s.stats().dirty_bytes, 0);
    drop(s);
    // The image grows again past the chunk that was its short last one:
    // that chunk, committed short, now reads with zeroes after its old end.
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("a2"), Default::default())).unwrap();
    let far = (expect.len() as u64).next_multiple_of(CS) + 3 * CS + 17;
    write(&*s, far, &[0x99; 100], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(volume::info(&vurl).unwrap().generation >= 2);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect, "a fresh cache reads the committed changes");
    // The writer's own cache stays valid across its commits: reopened, it
    // serves everything locally, with nothing dirty and no refetch.
    let m2 = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("a"), counted(m2.clone(), None, Shaping::default())),
    )
    .unwrap();
    assert_eq!(s.stats().dirty_bytes, 0);
    let before = m2.snapshot().bytes_read;
    let mut buf = vec![0u8; CS as usize];
    s.read_vectored_at(4 * CS, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    assert_eq!(buf, vec![0xC3; CS as usize]);
    assert_eq!(m2.snapshot().bytes_read, before, "a chunk this cache committed is served locally");
}

#[test]
fn a_commit_whose_reply_was_lost_is_recognised_not_repeated() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 32);
    let faults = FaultPlan::new(5);
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("a"), counted(m.clone(), Some(faults.clone()), Shaping::default())),
    )
    .unwrap();
    // The retry wrapper resends the create and finds its own tag.
    faults.lose_create_replies(1);
    write(&*s, 10, &[1; 5000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    assert_eq!(s.sync_status().unwrap().conflict, None);
    drop(s);
    // Generation 2 took the writer lease, 3 holds the data.
    assert_eq!(volume::info(&vurl).unwrap().generation, 3, "one generation, not two");
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);

    // With no retries left, the commit reports failure although it landed;
    // the next attempt meets the fence, sees the generation came from this
    // cache, and adopts it instead of calling it a conflict.
    let mut o = cache_opts(&d.path().join("a"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.remote.retry.max_attempts = 1;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    faults.lose_create_replies(1);
    write(&*s, 3 * CS + 7, &[2; 7000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    let st = s.sync_status().unwrap();
    assert_eq!(st.conflict, None, "{st:?}");
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, 5);
    assert_eq!(fresh_view(d.path(), &vurl, "c"), expect);
}

/// A commit adopted as this cache's own (its reply was lost, or the
/// process died before recording it) holds the disk as of its cut. What
/// the guest wrote after the cut past that image's end — into the chunk
/// the image ended in, or into chunks wholly beyond it — is not in it:
/// those chunks stay dirty and go up next. (The soak found this: such
/// chunks were called clean, evicted, and read back as zeroes.)
#[test]
fn an_adopted_commit_leaves_writes_past_its_end_dirty() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 33);
    let faults = FaultPlan::new(6);
    let remote = counted(Arc::new(RemoteMetrics::default()), Some(faults.clone()), Shaping::default());
    let mut o = cache_opts(&d.path().join("a"), remote);
    o.remote.retry.max_attempts = 1;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // The image grows to end 7000 bytes into a new chunk; that cut's
    // commit lands, its reply is lost, and write-back retries in a second.
    faults.lose_create_replies(1);
    let end = expect.len() as u64 + 7000;
    write(&*s, end - 9000, &[0x31; 9000], &mut expect);
    guest_flush(&*s);
    // Meanwhile the guest writes past that end.
    write(&*s, end + 1000, &[0x42; 3000], &mut expect);
    write(&*s, end.next_multiple_of(CS) + 2 * CS + 512, &[0x53; 5000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0, "everything uploaded");
    let st = s.sync_status().unwrap();
    assert_eq!(st.conflict, None, "{st:?}");
    assert!(st.generations_committed >= 1, "{st:?}");
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect, "the writes past the adopted commit's end went up");
}

/// A guest that keeps reading from the remote (two reads always waiting)
/// does not hold its changes back: uploads let its reads go first, a
/// moment at a time, and still go up while it reads.
#[test]
fn a_guest_that_keeps_missing_does_not_hold_its_changes_back() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 64 << 20, 43);
    let m = Arc::new(RemoteMetrics::default());
    let shaping = Shaping { latency: Duration::from_millis(60), bandwidth_bps: None };
    let mut o = cache_opts(&d.path().join("a"), counted(m, None, shaping));
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let chunks = (64 << 20) / CS;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..2u64)
        .map(|t| {
            let (s, done, data) = (s.clone(), done.clone(), expect.clone());
            std::thread::spawn(move || {
                // Every read a miss: each chunk once, from the 8th on.
                for idx in (8 + t..chunks).step_by(2) {
                    let off = idx * CS + 8192;
                    let mut buf = vec![0u8; 4096];
                    s.read_vectored_at(off, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
                    assert_eq!(buf, data[off as usize..off as usize + 4096]);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..4u64 {
        write(&*s, i * CS, &[i as u8 + 1; 8192], &mut expect);
    }
    guest_flush(&*s);
    let t0 = std::time::Instant::now();
    wait_committed(&s, 1);
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0, "committed only once the guest stopped reading");
    let took = t0.elapsed();
    for r in readers {
        r.join().unwrap();
    }
    assert!(took < Duration::from_secs(3), "the commit took {took:?} while the guest read");
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

/// Zeroed chunks are changes waiting like written ones: the lease's
/// heartbeat says so, so no other machine takes the lease while they wait.
#[test]
fn zeroed_chunks_count_as_pending_for_the_lease() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, _) = imported(d.path(), 2 << 20, 44);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // A first change, committed: the next FLUSH is not due for an hour.
    // Chunks 1 and 2 hold data then (a discard of chunks the volume has
    // as zero changes nothing).
    let mut e = Vec::new();
    write(&*s, 0, &[1; 4096], &mut e);
    write(&*s, CS, &vec![2; 2 * CS as usize], &mut e);
    guest_flush(&*s);
    wait_committed(&s, 1);
    let t0 = std::time::Instant::now();
    while s.lease().unwrap().pending_bytes != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", s.lease());
        std::thread::sleep(Duration::from_millis(20));
    }
    s.write_zeroes_at(CS, 2 * CS).unwrap();
    guest_flush(&*s);
    assert_eq!(s.sync_status().unwrap().generations_committed, 1, "the zeroes wait for the next cut");
    let t0 = std::time::Instant::now();
    while s.lease().unwrap().pending_bytes == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the heartbeat never said the zeroes wait: {:?}", s.lease());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.close(Duration::from_secs(30)), 0);
}

/// Once another writer's generation fenced this cache's changes out, a
/// writethrough FLUSH fails every time (the data cannot reach the remote),
/// never reports them committed.
#[test]
fn writethrough_flushes_after_a_conflict_fail() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, base) = imported(d.path(), 2 << 20, 37);
    let mut ob = cache_opts(&d.path().join("b"), Default::default());
    ob.lease = driveblk::tier::LeaseMode::OnCommit;
    ob.writeback.mode = CacheMode::Writethrough;
    let b = driveblk::tier::open_volume(&vurl, ob).unwrap();
    let a = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("a"), Default::default())).unwrap();
    let (mut ea, mut eb) = (base.clone(), base.clone());
    write(&*a, 0, &[0xAA; 4096], &mut ea);
    guest_flush(&*a);
    assert_eq!(a.close(Duration::from_secs(30)), 0);
    drop(a);
    for i in 0..3u64 {
        write(&*b, i * CS, &[0xB0 + i as u8; 4096], &mut eb);
        let r = b.flush_point().and_then(|t| b.wait_durable(t));
        let e = r.expect_err("a writethrough FLUSH after a conflict reported its data committed");
        assert!(e.to_string().contains("moved on"), "FLUSH {i}: {e}");
    }
    b.close(Duration::from_secs(5));
    drop(b);
    assert_eq!(fresh_view(d.path(), &vurl, "c"), ea, "the remote holds A's changes only");
}

#[test]
fn a_second_writer_is_fenced_and_keeps_its_changes() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, base) = imported(d.path(), 2 << 20, 33);
    // B opens before A takes the lease and takes it only to commit (as a
    // store opened offline does): the fence alone must stop it.
    let mut ob = cache_opts(&d.path().join("b"), Default::default());
    ob.lease = driveblk::tier::LeaseMode::OnCommit;
    let b = driveblk::tier::open_volume(&vurl, ob).unwrap();
    let a = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("a"), Default::default())).unwrap();
    let (mut ea, mut eb) = (base.clone(), base.clone());
    write(&*a, 0, &[0xAA; 4096], &mut ea);
    guest_flush(&*a);
    assert_eq!(a.close(Duration::from_secs(30)), 0);
    drop(a);
    write(&*b, CS, &[0xBB; 4096], &mut eb);
    guest_flush(&*b);
    let left = b.close(Duration::from_secs(10));
    assert!(left > 0, "B's changes were not committed over A's generation");
    let conflict = b.sync_status().unwrap().conflict.expect("a conflict is reported");
    assert!(conflict.contains("moved on"), "{conflict}");
    drop(b);
    // The remote holds A's generations (lease, data), untouched by B.
    assert_eq!(volume::info(&vurl).unwrap().generation, 3);
    assert_eq!(fresh_view(d.path(), &vurl, "c"), ea);
    // B's cache refuses to serve its changes on top of A's generation...
    let e = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("b"), Default::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("moved on") && e.contains("not yet uploaded"), "{e}");
    // ...and still holds them: export gives B's disk (generation 1 + B).
    let out = d.path().join("b.raw");
    let opts = ExportOptions { cache_dir: Some(d.path().join("b")), ..Default::default() };
    driveblk::tier::export(&vurl, &out, &opts).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), eb);
}

#[test]
fn a_remote_that_is_down_loses_nothing_and_sync_resumes() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 34);
    let faults = FaultPlan::new(9);
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("a"), counted(m.clone(), Some(faults.clone()), Shaping::default()));
    o.remote.retry.max_attempts = 3;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // Chunk 5 is local before the link goes (a write into a chunk not
    // cached still needs its bytes from the remote): read whole, since a
    // small read now fetches only its sub-frame.
    let mut warm = vec![0u8; CS as usize];
    s.read_vectored_at(5 * CS, &IoVec::from_slice(&mut warm), IoMode::Blocking).unwrap();
    faults.set_down(true);
    write(&*s, 5 * CS, &[9; 20000], &mut expect);
    guest_flush(&*s);
    // The upload fails and is retried; the guest's data stays local.
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().last_error.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the failure was never reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.stats().dirty_bytes > 0);
    let mut buf = vec![0u8; 20000];
    s.read_vectored_at(5 * CS, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    assert_eq!(buf, vec![9; 20000]);
    faults.set_down(false);
    assert_eq!(s.close(Duration::from_secs(30)), 0, "the sync resumed by itself");
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, 3);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

#[test]
fn writethrough_flush_returns_once_the_data_is_on_the_remote() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 35);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.writeback.mode = CacheMode::Writethrough;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    for i in 0..3u64 {
        write(&*s, i * CS + 11, &[i as u8 + 1; 3000], &mut expect);
        guest_flush(&*s);
        // No close, no waiting: another machine sees the flushed data now.
        assert_eq!(fresh_view(d.path(), &vurl, &format!("b{i}")), expect, "after flush {i}");
    }
}

/// Write-back's uploads go to the remote marked speculative while nobody
/// waits for them, so Drive's pacer lets a guest's reads go first; the
/// uploads a `driveblk sync`, a stop or a writethrough FLUSH waits for go
/// unmarked.
#[test]
fn uploads_nobody_waits_for_go_marked_speculative() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 4 << 20, 41);
    let (layer, log) = marked_layer();
    // The uploads since the last look: (key, speculative).
    let uploads = || -> Vec<(String, bool)> {
        std::mem::take(&mut *log.lock())
            .into_iter()
            .filter(|m| m.call != "get_range")
            .map(|m| (m.key, m.speculative))
            .collect()
    };
    let packs = |u: &[(String, bool)]| u.iter().filter(|(k, _)| k.starts_with("pack-")).count();
    let open = |name: &str, mode: CacheMode| {
        let mut o = cache_opts(&d.path().join(name), Default::default());
        o.remote.layer = Some(layer.clone());
        o.writeback.mode = mode;
        driveblk::tier::open_volume(&vurl, o).unwrap()
    };
    let s = open("a", CacheMode::Writeback);
    uploads();
    // The first FLUSH cuts a generation; it goes up in the background.
    write(&*s, 11, &[1; 3000], &mut expect);
    guest_flush(&*s);
    wait_committed(&s, 1);
    let background = uploads();
    assert!(packs(&background) > 0, "{background:?}");
    assert!(background.iter().all(|(_, spec)| *spec), "a background upload went unmarked: {background:?}");
    // The next FLUSH is within the sync interval: nothing is cut until a
    // sync asks, and the sync waits for the upload.
    write(&*s, CS + 11, &[2; 3000], &mut expect);
    guest_flush(&*s);
    s.request_sync();
    wait_committed(&s, 2);
    let synced = uploads();
    assert!(packs(&synced) > 0, "{synced:?}");
    assert!(synced.iter().all(|(_, spec)| !spec), "a sync's upload went marked speculative: {synced:?}");
    // A stop waits for what is left.
    write(&*s, 2 * CS + 11, &[3; 3000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let stopped = uploads();
    assert!(packs(&stopped) > 0, "{stopped:?}");
    assert!(stopped.iter().all(|(_, spec)| !spec), "a stop's upload went marked speculative: {stopped:?}");
    // Every writethrough FLUSH waits for its upload.
    let s = open("b", CacheMode::Writethrough);
    uploads();
    write(&*s, 3 * CS + 11, &[4; 3000], &mut expect);
    guest_flush(&*s);
    let flushed = uploads();
    assert!(packs(&flushed) > 0, "{flushed:?}");
    assert!(flushed.iter().all(|(_, spec)| !spec), "a writethrough upload went marked speculative: {flushed:?}");
    s.close(Duration::from_secs(30));
    assert_eq!(fresh_view(d.path(), &vurl, "c"), expect);
}

type Store = Arc<driveblk::tier::tiered::TieredStore>;

/// A writethrough store with a 2 s remote budget on a fresh 2 MiB volume
/// behind `faults` (`attempts`: of each remote call, when not the
/// default), its first chunk cached; the volume's URL and bytes.
fn writethrough_store(d: &std::path::Path, faults: &Arc<FaultPlan>, attempts: Option<u32>) -> (String, Vec<u8>, Store) {
    let (vurl, expect) = imported(d, 2 << 20, 36);
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.join("a"), counted(m, Some(faults.clone()), Shaping::default()));
    o.writeback.mode = CacheMode::Writethrough;
    if let Some(n) = attempts {
        o.remote.retry.max_attempts = n;
    }
    o.remote_wait.budget = Duration::from_secs(2);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut warm = vec![0u8; CS as usize];
    s.read_vectored_at(0, &IoVec::from_slice(&mut warm), IoMode::Blocking).unwrap();
    (vurl, expect, s)
}

/// A guest FLUSH that must fail with TimedOut, and within 30 s: its error
/// and how long it took.
fn flush_timing_out(s: &Store) -> (std::io::Error, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = s.clone();
    let t0 = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(s2.flush_point().and_then(|t| s2.wait_durable(t)));
    });
    let got = rx.recv_timeout(Duration::from_secs(30)).expect("the FLUSH still waits on the remote");
    let e = got.expect_err("a FLUSH cannot be durable on this remote");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    (e, t0.elapsed())
}

/// A writethrough FLUSH while the remote is down fails within the guest's
/// remote budget (an I/O error the guest sees) instead of waiting for the
/// remote to come back; the data stays in the cache and is committed once
/// it does.
#[test]
fn writethrough_flush_on_a_remote_that_is_down_fails_within_the_budget() {
    let d = tempfile::tempdir().unwrap();
    let faults = FaultPlan::new(11);
    let (vurl, mut expect, s) = writethrough_store(d.path(), &faults, Some(2));
    faults.set_down(true);
    write(&*s, 11, &[7; 3000], &mut expect);
    flush_timing_out(&s);
    // The next FLUSH finds the first one's cut still retrying: it fails
    // within the budget too, not waiting for the remote to come back.
    write(&*s, 8192, &[8; 4096], &mut expect);
    let (_, took) = flush_timing_out(&s);
    assert!(took < Duration::from_secs(10), "{took:?}");
    faults.set_down(false);
    assert_eq!(s.close(Duration::from_secs(30)), 0, "the flushed data went up once the remote was back");
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

/// A writethrough FLUSH on a remote that takes connections and never
/// answers fails within the guest's remote budget, although no attempt has
/// failed yet (each has a minute and more of its own deadline): nothing of
/// the upload moved. The data stays in the cache and goes up once the
/// remote answers again.
#[test]
fn writethrough_flush_on_a_remote_that_never_answers_fails_within_the_budget() {
    let d = tempfile::tempdir().unwrap();
    let faults = FaultPlan::new(12);
    let (vurl, mut expect, s) = writethrough_store(d.path(), &faults, None);
    faults.set_hung(true);
    write(&*s, 11, &[9; 3000], &mut expect);
    let (e, took) = flush_timing_out(&s);
    assert!(e.to_string().contains("did not move"), "{e}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
    // The next FLUSH waits for the same stuck upload, and fails as soon.
    write(&*s, 8192, &[8; 4096], &mut expect);
    let (_, took) = flush_timing_out(&s);
    assert!(took < Duration::from_secs(10), "{took:?}");
    faults.set_hung(false);
    assert_eq!(s.close(Duration::from_secs(30)), 0, "the flushed data went up once the remote answered");
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

/// A writethrough FLUSH whose upload takes longer than the remote budget
/// (a big flush on a slow uplink) but goes on without a failure is waited
/// for, not failed: the budget runs only while the remote fails.
#[test]
fn writethrough_flush_slower_than_the_budget_is_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 4 << 20, 37);
    let m = Arc::new(RemoteMetrics::default());
    // 4 Mbit/s: the 2 MiB of new data below take about 4 s to go up.
    let shaping = Shaping { latency: Duration::from_millis(20), bandwidth_bps: Some(4_000_000) };
    let mut o = cache_opts(&d.path().join("a"), counted(m, None, shaping));
    o.writeback.mode = CacheMode::Writethrough;
    o.remote_wait.budget = Duration::from_secs(1);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut noise = vec![0u8; 2 << 20];
    rand::Rng::fill(&mut rand::rngs::StdRng::seed_from_u64(39), &mut noise[..]);
    write(&*s, 0, &noise, &mut expect);
    let t0 = std::time::Instant::now();
    let t = s.flush_point().unwrap();
    s.wait_durable(t).expect("a FLUSH whose upload is going is waited for");
    assert!(t0.elapsed() > Duration::from_secs(1), "the upload was quicker than the budget: {:?}", t0.elapsed());
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

#[test]
fn scattered_small_writes_upload_about_what_changed() {
    let d = tempfile::tempdir().unwrap();
    // Incompressible data: compression cannot hide whole-chunk uploads.
    let mut bytes = vec![0u8; 16 * CS as usize];
    rand::Rng::fill(&mut rand::rngs::StdRng::seed_from_u64(38), &mut bytes[..]);
    let src = d.path().join("src.raw");
    std::fs::write(&src, &bytes).unwrap();
    let vurl = url(&d.path().join("remote/vol"));
    volume::import(&src, &vurl, &ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }).unwrap();
    let mut expect = bytes.clone();
    let m = Arc::new(RemoteMetrics::default());
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("a"), counted(m.clone(), None, Shaping::default())),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(39);
    let random_page = |rng: &mut rand::rngs::StdRng| {
        let mut p = vec![0u8; 4096];
        rand::Rng::fill(rng, &mut p[..]);
        p
    };
    // One 4 KiB write in each chunk.
    let mut written = 0u64;
    for i in 0..16u64 {
        let off = i * CS + rand::Rng::random_range(&mut rng, 0..CS / 4096) * 4096;
        write(&*s, off, &random_page(&mut rng), &mut expect);
        written += 4096;
    }
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    let up = s.sync_status().unwrap().bytes_uploaded;
    assert!(up <= 2 * written, "uploaded {up} bytes for {written} bytes of scattered 4 KiB writes (target <= 2x)");
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "patched chunks read back wrong");
    // Patching a patched chunk merges the patches (still two reads), and a
    // chunk changed in more than a quarter of its pages is written whole.
    let s = driveblk::tier::open_volume(
        &vurl,
        cache_opts(&d.path().join("a"), counted(m.clone(), None, Shaping::default())),
    )
    .unwrap();
    write(&*s, 3 * CS + 8192, &random_page(&mut rng), &mut expect);
    write(&*s, 5 * CS, &vec![7u8; CS as usize / 2], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let u = driveblk::remote::RemoteUrl::parse(&vurl).unwrap();
    let v = rt.block_on(volume::VolumeReader::open(&u, &Default::default())).unwrap();
    assert!(
        matches!(v.chunk_ref(3), volume::ChunkRef::Patched { ref runs, .. } if runs.len() == 2),
        "{:?}",
        v.chunk_ref(3)
    );
    assert!(matches!(v.chunk_ref(5), volume::ChunkRef::Packed { .. }), "{:?}", v.chunk_ref(5));
    assert!(fresh_view(d.path(), &vurl, "c") == expect);
}

/// A volume of 8 chunks whose first 6 the guest wrote and flushed, with
/// the upload of that cut held at the gate after it started. Returns the
/// volume, the store, the disk as cut, and the gate.
fn upload_held_mid_cut(
    dir: &std::path::Path,
    seed: u64,
) -> (String, Arc<driveblk::tier::tiered::TieredStore>, Vec<u8>, Arc<tokio::sync::Semaphore>) {
    let (vurl, base) = imported(dir, 8 * CS as usize, seed);
    let (layer, gate, waiting) = gated_layer(true);
    let mut o = cache_opts(&dir.join("a"), Default::default());
    o.remote.layer = Some(layer);
    // One chunk per pack, one upload at a time: the uploader reads a chunk
    // only when the previous pack went up, so the gate stops it mid-cut.
    o.writeback.commit.pack_size = 1;
    o.writeback.commit.parallel_uploads = 1;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let mut at_cut = base;
    for i in 0..6u64 {
        write(&*s, i * CS, &vec![0xA0 + i as u8; CS as usize], &mut at_cut);
    }
    guest_flush(&*s);
    let t0 = std::time::Instant::now();
    while waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the upload never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    (vurl, s, at_cut, gate)
}

#[test]
fn a_generation_holds_the_cut_even_when_the_guest_rewrites_its_chunks_during_upload() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, s, at_cut, gate) = upload_held_mid_cut(d.path(), 37);
    // The guest rewrites every chunk of the cut (and some partly) while it
    // uploads; none of this may leak into that generation.
    let mut after = at_cut.clone();
    for i in 0..6u64 {
        write(&*s, i * CS, &vec![0xB0 + i as u8; CS as usize], &mut after);
        write(&*s, i * CS + 100, &[0xCC; 300], &mut after);
    }
    gate.add_permits(1000);
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().committed_cut == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the cut was never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(volume::info(&vurl).unwrap().generation, 3);
    assert!(fresh_view(d.path(), &vurl, "b") == at_cut, "generation 3 mixes the cut with later writes");
    // The rewrites stay dirty and go up in the next generation.
    assert!(s.stats().dirty_bytes >= 6 * CS);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "c") == after);
}

/// Small writes during an upload copy aside only the pages they change:
/// scattered and unaligned writes, pages written twice, and a chunk first
/// written in pages and then zeroed whole all leave the generation exactly
/// as it was cut, and go up in the next one.
#[test]
fn small_rewrites_during_an_upload_keep_the_cut_page_by_page() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, s, at_cut, gate) = upload_held_mid_cut(d.path(), 41);
    let mut after = at_cut.clone();
    for i in 0..6u64 {
        let c = i * CS;
        // One page; across a page boundary, unaligned; the same page again.
        write(&*s, c + 3 * 4096, &[0xB1; 4096], &mut after);
        write(&*s, c + 2 * 4096 - 100, &[0xB2; 300], &mut after);
        write(&*s, c + 3 * 4096 + 10, &[0xB3; 20], &mut after);
        write(&*s, c + CS - 4096, &[0xB4; 4096], &mut after);
    }
    // A chunk written in pages, then zeroed whole; another zeroed in part.
    s.write_zeroes_at(CS, CS).unwrap();
    after[CS as usize..2 * CS as usize].fill(0);
    s.write_zeroes_at(4 * CS + 8192, 8192).unwrap();
    after[(4 * CS + 8192) as usize..(4 * CS + 16384) as usize].fill(0);
    write(&*s, CS + 4096, &[0xB5; 4096], &mut after);
    // What was copied aside: the zeroed chunk whole, a few pages of the
    // others (copying each chunk whole would be 6 chunks).
    use std::os::unix::fs::MetadataExt;
    let copied = std::fs::metadata(d.path().join("a").join("frozen")).unwrap().blocks() * 512;
    assert!(copied <= 2 * CS, "{copied} bytes copied aside for a few pages");
    gate.add_permits(1000);
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().committed_cut == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the cut was never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(fresh_view(d.path(), &vurl, "b") == at_cut, "the generation mixes the cut with later writes");
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "c") == after, "the rewrites did not go up whole");
}

#[test]
fn a_write_into_a_cold_chunk_never_waits_for_its_fetch() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 4 * CS as usize, 40);
    let (layer, gate, waiting) = gated_layer(false);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.remote.layer = Some(layer);
    o.readahead_chunks = 0;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // Pack reads are held at the gate: a write that needed its chunk's
    // bytes would wait there (the test then opens the gate and fails).
    let (tx, rx) = std::sync::mpsc::channel();
    let (s2, mut e2) = (s.clone(), expect.clone());
    let writer = std::thread::spawn(move || {
        write(&*s2, CS + 8192, &[0x11; 8192], &mut e2);
        write(&*s2, 2 * CS, &[0x22; 4096], &mut e2);
        tx.send(()).unwrap();
        e2
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        gate.add_permits(1 << 20);
        panic!("a write into a cold chunk waited for the remote");
    }
    expect = writer.join().unwrap();
    assert_eq!(waiting.load(std::sync::atomic::Ordering::SeqCst), 0, "a write fetched its chunk");
    // The written pages read back locally, still without the remote.
    let mut buf = vec![0u8; 8192];
    s.read_vectored_at(CS + 8192, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    assert_eq!(buf, vec![0x11; 8192]);
    assert_eq!(waiting.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Durable at FLUSH, across a restart, before the chunk was ever fetched.
    s.flush().unwrap();
    drop(s);
    gate.add_permits(1 << 20);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.remote.layer = None;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // A read across written and unwritten pages completes the chunk from
    // the remote without touching the written pages.
    assert!(read_all(&*s).unwrap() == expect, "a partly written chunk reads back wrong");
    write(&*s, 3 * CS + 4096, &[0x33; 4096], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the remote got a partly written chunk wrong");
    // Exporting from a cache that still holds a chunk dirty in part.
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), Default::default())).unwrap();
    write(&*s, 4096, &[0x44; 4096], &mut expect);
    s.flush().unwrap();
    drop(s);
    let out = d.path().join("out.raw");
    driveblk::tier::export(&vurl, &out, &ExportOptions { cache_dir: Some(d.path().join("c")), ..Default::default() })
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == expect, "export lost the pages of a chunk dirty in part");
}

#[test]
fn a_large_discard_holds_no_cache_space_and_uploads_nothing_but_a_manifest() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 32 * CS as usize, 41);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.ssd_cache = 4 * CS;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    // Some of it cached first, then nearly all of it discarded.
    read_all(&*s).unwrap();
    s.write_zeroes_at(CS, 30 * CS).unwrap();
    expect[CS as usize..31 * CS as usize].fill(0);
    let st = s.stats();
    assert!(st.ssd_bytes <= 4 * CS, "zeroed chunks count against the cap: {} bytes held", st.ssd_bytes);
    assert_eq!(st.dirty_bytes, 0, "zeroed chunks hold no data to upload");
    assert!(read_all(&*s).unwrap() == expect);
    // A write into a zeroed chunk reads back over zeroes.
    write(&*s, 5 * CS + 100, &[5; 300], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    let up = s.sync_status().unwrap().bytes_uploaded;
    assert!(up < 32 << 10, "uploaded {up} bytes for a discard and a 300-byte write");
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect);
    // Reopened, the cache agrees (zeroed chunks were committed as zero).
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("a"), Default::default())).unwrap();
    assert!(read_all(&*s).unwrap() == expect);
}

#[test]
fn unsafe_mode_makes_nothing_durable_on_flush() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 * CS as usize, 42);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.writeback.mode = CacheMode::Unsafe;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let dir = d.path().join("a");
    let journal = || std::fs::metadata(dir.join("journal")).map(|m| m.len()).unwrap_or(0);
    // A whole-chunk write into a chunk not cached: no map change is needed
    // before it, and FLUSH (as the format layer issues it) persists nothing.
    write(&*s, CS, &vec![3u8; CS as usize], &mut expect);
    let before = journal();
    s.flush().unwrap();
    guest_flush(&*s);
    assert_eq!(journal(), before, "an unsafe FLUSH wrote the cache map");
    assert!(read_all(&*s).unwrap() == expect);
    // Closing still uploads what was written.
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect);
}

#[test]
fn a_remote_that_stalls_mid_upload_half_commits_nothing_and_sync_resumes() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 4 * CS as usize, 43);
    let (layer, gate, _) = gated_layer(true);
    let mut o = cache_opts(&d.path().join("a"), Default::default());
    o.remote.layer = Some(layer);
    // Uploads hang (a silent peer): each attempt hits its deadline.
    o.remote.retry.attempt_timeout = Duration::from_millis(200);
    o.remote.retry.max_attempts = 2;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    write(&*s, CS + 4096, &[8; 8192], &mut expect);
    guest_flush(&*s);
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().last_error.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "a stalled upload was never given up on");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing but the lease was committed, the guest's data is local and readable.
    assert_eq!(volume::info(&vurl).unwrap().generation, 2);
    assert!(read_all(&*s).unwrap() == expect);
    // The link comes back: the same cut goes up, once.
    gate.add_permits(1 << 20);
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, 3);
    assert!(fresh_view(d.path(), &vurl, "b") == expect);
}

/// A cut whose chunks all hold their parent's bytes again (rewritten with
/// the same data, or zeroed and rewritten) commits no generation: the
/// chunks are clean as they are, and nothing is left to upload.
#[test]
fn a_cut_that_changes_nothing_commits_no_generation() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 8 * CS as usize, 44);
    let cache = d.path().join("a");
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
    let g = volume::info(&vurl).unwrap().generation;
    let (a, b) = (2 * CS as usize, 4 * CS as usize);
    let same = expect[a..b].to_vec();
    write(&*s, a as u64, &vec![0; b - a], &mut expect);
    write(&*s, a as u64, &same, &mut expect);
    guest_flush(&*s);
    s.request_sync();
    let t0 = std::time::Instant::now();
    while !s.sync_status().is_some_and(|st| st.last_cut > 0 && st.committed_cut == st.last_cut) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the cut never completed: {:?}", s.sync_status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = s.sync_status().unwrap();
    assert!(st.generations_committed == 0 && st.last_error.is_none(), "{st:?}");
    assert_eq!(volume::info(&vurl).unwrap().generation, g, "a generation that changes nothing was committed");
    // A real change after it still goes up.
    write(&*s, 5 * CS + 100, &[9; 5000], &mut expect);
    guest_flush(&*s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1);
    assert!(fresh_view(d.path(), &vurl, "b") == expect);
}

/// Waits until this store has committed `n` generations.
fn wait_committed(s: &driveblk::tier::tiered::TieredStore, n: u64) {
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().generations_committed < n {
        assert!(t0.elapsed() < Duration::from_secs(30), "never committed: {:?}", s.sync_status());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Commits a first change, then makes more and deletes the cache's folder
/// (as a full disk would): the next change to the map cannot be saved.
/// Returns the generation committed.
fn commit_then_lose_the_cache_folder(
    s: &driveblk::tier::tiered::TieredStore,
    cache: &std::path::Path,
    vurl: &str,
    expect: &mut Vec<u8>,
) -> u64 {
    use rand::RngCore;
    write(s, 100, &[1; 3000], expect);
    guest_flush(s);
    s.request_sync();
    wait_committed(s, 1);
    let g = volume::info(vurl).unwrap().generation;
    // Small writes into the now clean chunk ride in the journal until it
    // is past its checkpoint size: the next change to the map writes the
    // state file, which the deleted folder cannot take.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..320u64 {
        let mut b = vec![0u8; 4096];
        rng.fill_bytes(&mut b);
        write(s, (i % 16) * 4096, &b, expect);
    }
    guest_flush(s);
    std::fs::remove_dir_all(cache).unwrap();
    g
}

/// The cache's folder deleted under a running store (or its disk full): a
/// commit lands once, says the cache state could not be saved, and is not
/// committed again and again by retries; the committed data is whole.
#[test]
fn a_commit_whose_cache_state_cannot_be_saved_is_not_committed_again() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 36);
    let cache = d.path().join("a");
    let mut o = cache_opts(&cache, Default::default());
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let g = commit_then_lose_the_cache_folder(&s, &cache, &vurl, &mut expect);
    s.request_sync();
    wait_committed(&s, 2);
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1);
    let st = s.sync_status().unwrap();
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("could not be saved")), "{st:?}");
    // A failed commit is retried after 1, 2 and 4 s: none may come.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1, "the same changes were committed again");
    s.close(Duration::from_secs(30));
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1, "closing committed the same changes again");
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the committed generation holds every change");
}

/// As above, but the commit's reply is lost too: the retry meets the fence,
/// adopts the generation as this cache's own, and cannot save the state
/// that says so. It must say the state could not be saved, and neither
/// retries nor closing may commit another generation on top.
#[test]
fn an_adopted_commit_whose_cache_state_cannot_be_saved_is_not_committed_again() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 37);
    let cache = d.path().join("a");
    let faults = FaultPlan::new(11);
    let remote = counted(Arc::new(RemoteMetrics::default()), Some(faults.clone()), Shaping::default());
    let mut o = cache_opts(&cache, remote);
    o.remote.retry.max_attempts = 1;
    o.writeback.sync_interval = Duration::from_secs(3600);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let g = commit_then_lose_the_cache_folder(&s, &cache, &vurl, &mut expect);
    faults.lose_create_replies(1);
    s.request_sync();
    let t0 = std::time::Instant::now();
    while !s.sync_status().unwrap().last_error.as_deref().is_some_and(|e| e.contains("could not be saved")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "never said so: {:?}", s.sync_status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1);
    assert_eq!(s.sync_status().unwrap().conflict, None);
    // Failed commits are retried after 1, 2 and 4 s: none may come.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1, "the same changes were committed again");
    s.close(Duration::from_secs(30));
    drop(s);
    assert_eq!(volume::info(&vurl).unwrap().generation, g + 1, "closing committed the same changes again");
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the adopted generation holds every change");
}

/// Pack objects in a `dir:` volume folder.
fn packs_in(folder: &std::path::Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pack-"))
        .collect()
}

/// Writes 32 chunks of fresh random data (with `pages`, one 4 KiB page
/// into each chunk instead: each goes up as a patch over the chunk's
/// imported version) into a store whose packs hold a chunk or patch each,
/// and returns once half of them have gone up.
fn start_upload(d: &std::path::Path, s: &driveblk::tier::tiered::TieredStore, expect: &mut Vec<u8>, pages: bool) {
    use rand::RngCore;
    let folder = d.join("remote/vol");
    let before = packs_in(&folder).len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    if pages {
        for i in 0..32 {
            let mut page = vec![0u8; 4096];
            rng.fill_bytes(&mut page);
            write(s, i * CS + 4096 * (i % 7), &page, expect);
        }
    } else {
        let mut data = vec![0u8; 32 * CS as usize];
        rng.fill_bytes(&mut data);
        write(s, 0, &data, expect);
    }
    guest_flush(s);
    s.request_sync();
    let t0 = std::time::Instant::now();
    while packs_in(&folder).len() < before + 16 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the upload never got half-way");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Status shows how far the upload got (packs are counted once landed).
    let st = s.sync_status().unwrap();
    assert!(st.uploading && st.uploading_done >= 8 && st.uploading_done < st.uploading_chunks, "{st:?}");
}

/// [`start_upload`], then the remote goes down until write-back notices.
fn upload_cut_short(
    d: &std::path::Path,
    s: &driveblk::tier::tiered::TieredStore,
    faults: &FaultPlan,
    expect: &mut Vec<u8>,
    pages: bool,
) {
    start_upload(d, s, expect, pages);
    faults.set_down(true);
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().last_error.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the outage was never noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.sync_status().unwrap().generations_committed, 0);
}

/// A link of `mbit` whose packs hold one chunk or patch each.
fn slow_link_opts(cache: &std::path::Path, faults: &Arc<FaultPlan>, mbit: f64) -> driveblk::tier::CacheOptions {
    let shaping = Shaping { latency: Duration::ZERO, bandwidth_bps: Some((mbit * 1e6) as u64) };
    let mut o = cache_opts(cache, counted(Arc::new(RemoteMetrics::default()), Some(faults.clone()), shaping));
    o.remote.retry.max_attempts = 1;
    o.writeback.sync_interval = Duration::from_secs(3600);
    o.writeback.commit.pack_size = 4096;
    o
}

/// How fast a link takes a pack of what [`upload_cut_short`] writes in
/// about 1/8 s.
fn pack_rate_mbit(pages: bool) -> f64 {
    if pages {
        0.256
    } else {
        16.0
    }
}

/// A long upload cut short by an outage resumes: the retry uploads only
/// the chunks that had not gone up, and the generation holds every change.
#[test]
fn an_upload_cut_short_resumes_where_it_was() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 32 * CS as usize, 38);
    let faults = FaultPlan::new(12);
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&d.path().join("a"), &faults, pack_rate_mbit(false)))
        .unwrap();
    upload_cut_short(d.path(), &s, &faults, &mut expect, false);
    let landed = packs_in(&d.path().join("remote/vol"));
    faults.set_down(false);
    s.request_sync();
    wait_committed(&s, 1);
    let again = packs_in(&d.path().join("remote/vol")).difference(&landed).count();
    assert!(again <= 17, "{again} packs uploaded after the outage: the chunks already up went up again");
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the resumed generation holds every change");
}

/// The same across a restart: a stop during the outage keeps what was
/// uploaded, and the next start uploads only the rest.
#[test]
fn an_upload_cut_short_by_a_stop_resumes_at_the_next_start() {
    cut_short_by_a_stop(false, false);
}

/// The same with patches: each resumed patch stays over the bytes its
/// chunk has in the parent generation (the writer lease taken at the
/// restart committed a generation in between).
#[test]
fn patches_cut_short_by_a_stop_resume_at_the_next_start() {
    cut_short_by_a_stop(true, false);
}

/// The writer lease taken at the next start is a generation named like
/// the packs uploaded, and `gc --grace 0` runs while that start uploads:
/// gc spares the packs this cache may still commit, and they are reused.
#[test]
fn an_upload_cut_short_survives_gc_while_it_resumes() {
    cut_short_by_a_stop(false, true);
}

fn cut_short_by_a_stop(pages: bool, gc_while_resuming: bool) {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 32 * CS as usize, 39);
    let faults = FaultPlan::new(13);
    let cache = d.path().join("a");
    let folder = d.path().join("remote/vol");
    if pages {
        // The chunks are local first, so that packing a patch fetches nothing
        // over the slow link.
        let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, Default::default())).unwrap();
        assert!(read_all(&*s).unwrap() == expect);
        assert_eq!(s.close(Duration::from_secs(30)), 0);
    }
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, pack_rate_mbit(pages))).unwrap();
    upload_cut_short(d.path(), &s, &faults, &mut expect, pages);
    assert!(s.close(Duration::from_millis(300)) > 0, "nothing was left to upload");
    drop(s);
    assert!(cache.join("uploaded").is_file(), "what went up was not recorded");
    let landed = packs_in(&folder);
    faults.set_down(false);
    // The stop kept which pages changed: what goes up again is patches
    // still, over the same slow link.
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, pack_rate_mbit(pages))).unwrap();
    if gc_while_resuming {
        let opts = driveblk::volume::gc::GcOptions {
            retention: driveblk::volume::gc::Retention { keep_generations: 1, keep_days: None },
            grace: Duration::ZERO,
            active_window: Duration::ZERO,
            ..Default::default()
        };
        driveblk::volume::gc::gc(&vurl, &opts).unwrap();
    }
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    let again = packs_in(&folder).difference(&landed).count();
    assert!(again <= 17, "{again} packs uploaded after the restart: the chunks already up went up again");
    assert!(!cache.join("uploaded").exists(), "the record outlived its commit");
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the resumed generation holds every change");
}

/// The bytes of the packs in `folder`.
fn pack_bytes(folder: &std::path::Path, names: &std::collections::BTreeSet<String>) -> u64 {
    names.iter().map(|n| std::fs::metadata(folder.join(n)).unwrap().len()).sum()
}

/// Scattered page writes a stop left in the cache go up as patches at the
/// next start, not as whole chunks: the stop keeps which pages changed,
/// and the start takes that record back (it is not left on disk, where a
/// later crash could make it say too little).
#[test]
fn page_writes_left_by_a_stop_go_up_as_patches_after_a_restart() {
    use rand::RngCore;
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 32 * CS as usize, 42);
    let faults = FaultPlan::new(17);
    let cache = d.path().join("a");
    let folder = d.path().join("remote/vol");
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    faults.set_down(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    for i in 0..32 {
        let mut page = vec![0u8; 4096];
        rng.fill_bytes(&mut page);
        write(&*s, i * CS + 4096 * (i % 7), &page, &mut expect);
    }
    guest_flush(&*s);
    assert!(s.close(Duration::from_millis(300)) > 0, "nothing was left to upload");
    drop(s);
    assert!(cache.join("dirty-pages").is_file(), "the stop did not keep the changed pages");
    // A driveblk that predates the record (state versions up to 6) would
    // write into those chunks without removing it: it must refuse the cache.
    assert_eq!(state_version(&cache), 7, "the state left by the stop is one older binaries accept");
    faults.set_down(false);
    let before = packs_in(&folder);
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    assert!(!cache.join("dirty-pages").exists(), "the record stayed on disk after the start took it");
    assert_eq!(state_version(&cache), 5, "the start that took the record back wrote the plain version");
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    let new: std::collections::BTreeSet<String> = packs_in(&folder).difference(&before).cloned().collect();
    let up = pack_bytes(&folder, &new);
    assert!(
        up < 32 * 3 * 4096,
        "32 changed pages went up as {up} bytes of packs after the restart: whole chunks, not patches"
    );
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the patches hold every change");
}

/// The `version` of the cache directory's state file header.
fn state_version(cache: &std::path::Path) -> u64 {
    let b = std::fs::read(cache.join("state")).unwrap();
    let line = b.split(|&c| c == b'\n').next().unwrap();
    serde_json::from_slice::<serde_json::Value>(line).unwrap()["version"].as_u64().unwrap()
}

/// The record of changed pages is good for one start only: pages written
/// after it was taken, then a crash, must still go up (the chunks go up
/// whole), never be left out of a patch by a stale record.
#[test]
fn pages_written_after_the_record_was_taken_survive_a_crash() {
    use rand::RngCore;
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 8 * CS as usize, 43);
    let faults = FaultPlan::new(18);
    let cache = d.path().join("a");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut page = || {
        let mut p = vec![0u8; 4096];
        rng.fill_bytes(&mut p);
        p
    };
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    faults.set_down(true);
    for i in 0..8 {
        write(&*s, i * CS, &page(), &mut expect);
    }
    guest_flush(&*s);
    assert!(s.close(Duration::from_millis(300)) > 0);
    drop(s);
    assert!(cache.join("dirty-pages").is_file());
    // The next run takes the record, writes other pages of the same chunks,
    // and crashes (dropped unclosed: nothing is kept).
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    for i in 0..8 {
        write(&*s, i * CS + 8192, &page(), &mut expect);
    }
    guest_flush(&*s);
    drop(s);
    faults.set_down(false);
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "a write after the record was taken was lost");
}

/// A record of what went up that outlived its commit (a kill between the
/// commit and the record's removal) is never reused for those packs: they
/// are committed, and gc spares only packs no generation names. Here the
/// chunks go back to exactly the bytes the record lists, two generations
/// later, and go up again rather than point at the old packs.
#[test]
fn a_record_that_outlived_its_commit_is_not_reused() {
    use rand::RngCore;
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 32 * CS as usize, 41);
    let faults = FaultPlan::new(16);
    let cache = d.path().join("a");
    let folder = d.path().join("remote/vol");
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, pack_rate_mbit(false))).unwrap();
    upload_cut_short(d.path(), &s, &faults, &mut expect, false);
    assert!(s.close(Duration::from_millis(300)) > 0);
    drop(s);
    let stale = std::fs::read(cache.join("uploaded")).expect("what went up was recorded");
    let first = expect.clone();
    faults.set_down(false);
    // The resumed commit makes the recorded packs committed ones.
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    // Another generation changes every chunk.
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    let mut other = vec![0u8; 32 * CS as usize];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut other);
    write(&*s, 0, &other, &mut expect);
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    // The stale record is back, and so are the bytes it lists.
    std::fs::write(cache.join("uploaded"), &stale).unwrap();
    let before = packs_in(&folder);
    let s = driveblk::tier::open_volume(&vurl, slow_link_opts(&cache, &faults, 16.0)).unwrap();
    write(&*s, 0, &first, &mut expect);
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    let again = packs_in(&folder).difference(&before).count();
    assert!(again >= 32, "only {again} packs uploaded: committed packs of a stale record were reused");
    assert!(fresh_view(d.path(), &vurl, "b") == expect, "the newest generation holds the last writes");
}

/// A commit that landed though its reply was lost, then a stop: the next
/// start adopts the generation as this cache's own, and forgets the record
/// of what that attempt uploaded (those packs are committed now: gc no
/// longer spares them as an upload cut short, so they must not be reused).
#[test]
fn adopting_a_landed_commit_at_start_forgets_what_it_uploaded() {
    let d = tempfile::tempdir().unwrap();
    let (vurl, mut expect) = imported(d.path(), 2 << 20, 40);
    let cache = d.path().join("a");
    let faults = FaultPlan::new(15);
    let opts = || {
        let remote = counted(Arc::new(RemoteMetrics::default()), Some(faults.clone()), Shaping::default());
        let mut o = cache_opts(&cache, remote);
        o.remote.retry.max_attempts = 1;
        o.writeback.sync_interval = Duration::from_secs(3600);
        o
    };
    let s = driveblk::tier::open_volume(&vurl, opts()).unwrap();
    // Chunk 5 whole in the cache, so that the next start finds all of it in
    // the adopted generation (nothing left to commit).
    let mut warm = vec![0u8; CS as usize];
    s.read_vectored_at(5 * CS, &IoVec::from_slice(&mut warm), IoMode::Blocking).unwrap();
    faults.lose_create_replies(1);
    write(&*s, 5 * CS + 3, &[7; 9000], &mut expect);
    // The first FLUSH cuts (no `request_sync`: its wake-up would start the
    // retry at once instead of a second later).
    guest_flush(&*s);
    let t0 = std::time::Instant::now();
    while s.sync_status().unwrap().last_error.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the lost reply was never noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Down before the retry (1 s later) could adopt it in this run.
    faults.set_down(true);
    assert!(s.close(Duration::from_millis(300)) > 0);
    drop(s);
    assert!(cache.join("uploaded").is_file(), "the attempt's upload was not recorded");
    faults.set_down(false);
    let s = driveblk::tier::open_volume(&vurl, opts()).unwrap();
    assert!(!cache.join("uploaded").exists(), "the record of a committed upload was kept");
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(fresh_view(d.path(), &vurl, "b"), expect);
}

/// Random rounds against a reference, the write-back's whole life on one
/// cache: two writers on their own chunks (a page, a few sectors, a whole
/// chunk, zeroes) while background syncs cut and upload, a lost commit
/// reply, an outage that comes and goes, requests that fail at random,
/// tiers small enough to keep evicting, packs of several sizes; each round
/// ends in a stop that waits for everything, a stop cut short (the changed
/// pages kept for patches) or a drop without `close`. Every read must
/// match the reference; after each full upload, and at the end, so must
/// what another machine reads from the remote. 12 rounds (`SOAK=1`: 150),
/// `WRITEBACK_SEED` picks another sequence.
#[test]
fn random_rounds_of_writes_outages_and_stops_lose_nothing() {
    random_rounds(false);
}

/// [`random_rounds_of_writes_outages_and_stops_lose_nothing`] on an
/// encrypted volume with an encrypted cache (sealed state and record).
#[test]
fn random_rounds_on_an_encrypted_volume_lose_nothing() {
    random_rounds(true);
}

fn random_rounds(encrypted: bool) {
    use rand::{Rng, RngCore};
    const CHUNKS: u64 = 24;
    let rounds = if std::env::var_os("SOAK").is_some_and(|v| v != "0") { 150 } else { 12 };
    let d = tempfile::tempdir().unwrap();
    let key = encrypted
        .then(|| Arc::new(driveblk::volume::crypto::UserKey::new(b"rounds test key".to_vec(), "test".into()).unwrap()));
    let cache = d.path().join("a");
    let (src, expect) = raw_image(d.path(), "src.raw", (CHUNKS * CS) as usize, 44);
    let vurl = url(&d.path().join("remote/vol"));
    let mut io = ImportOptions { chunk_size: CS, pack_size: 1 << 20, encrypt: encrypted, ..Default::default() };
    io.remote.key = key.clone();
    volume::import(&src, &vurl, &io).unwrap();
    let opts = |faults: &Arc<FaultPlan>| {
        let mut o = slow_link_opts(&cache, faults, 64.0);
        o.remote.key = key.clone();
        o.encrypt_cache = encrypted;
        o
    };
    let view = |name: &str| {
        let mut o = cache_opts(&d.path().join(name), Default::default());
        o.read_only = true;
        o.remote.key = key.clone();
        read_all(&*driveblk::tier::open_volume(&vurl, o).unwrap()).unwrap()
    };
    let expect = Arc::new(parking_lot::Mutex::new(expect));
    let faults = FaultPlan::new(20);
    let seed = std::env::var("WRITEBACK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x7e57);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut full_stops, mut short_stops, mut left_records, mut drops) = (0, 0, 0, 0);
    // A lost reply still pending from the last round lands the start's
    // lease but fails the start (one attempt): the next start knows it as
    // its own.
    let start = |o: driveblk::tier::CacheOptions| {
        driveblk::tier::open_volume(&vurl, o.clone())
            .or_else(|e| {
                eprintln!("the start failed ({e}), once more");
                driveblk::tier::open_volume(&vurl, o)
            })
            .unwrap()
    };
    for round in 0..rounds {
        let mut o = opts(&faults);
        o.ram_cache = 2 * CS;
        o.ssd_cache = 4 * CS;
        o.writeback.sync_interval = Duration::from_millis(rng.random_range(50..400));
        o.writeback.commit.pack_size = [4096, CS, 4 * CS][rng.random_range(0..3)];
        // A guest request that needs the remote while it is down fails soon
        // (a fetch here takes some 40 ms).
        o.remote_wait.budget = Duration::from_millis(250);
        let s = start(o);
        let faults_rate = [0.0, 0.02, 0.1][rng.random_range(0..3)];
        faults.set_failure_rate(faults_rate);
        if rng.random_bool(0.3) {
            faults.lose_create_replies(1);
        }
        // The link comes and goes under the writers: (after, down, sync).
        let plan: Vec<(u64, bool, bool)> = (0..rng.random_range(0..4))
            .map(|_| (rng.random_range(20..200), rng.random_bool(0.5), rng.random_bool(0.5)))
            .collect();
        // A round whose link never fails fails no request.
        let trouble = faults_rate > 0.0 || plan.iter().any(|&(_, down, _)| down);
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (s, expect, seed) = (s.clone(), expect.clone(), rng.random::<u64>());
                std::thread::spawn(move || writer(&*s, &expect, w, seed, trouble))
            })
            .collect();
        for (after, down, sync) in plan {
            std::thread::sleep(Duration::from_millis(after));
            faults.set_down(down);
            if sync {
                s.request_sync();
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        guest_flush(&*s);
        // Everything this cache serves is the reference (the link good:
        // chunks evicted since are fetched again; a fetch queued behind
        // uploads on this link may take longer than the short budget).
        faults.set_down(false);
        faults.set_failure_rate(0.0);
        let back = (0..5).find_map(|_| read_all(&*s).ok()).expect("the cache could not be read back on a good link");
        assert!(back == *expect.lock(), "round {round}: this cache reads other bytes");
        faults.set_down(rng.random_bool(0.4));
        faults.set_failure_rate(faults_rate);
        // The first three rounds end in one stop of each kind; the one cut
        // short has a page written with the link down, so it leaves changes
        // whatever the timing.
        let kind = if round < 3 { [1, 2, 0][round] } else { rng.random_range(0..3) };
        if round == 0 {
            faults.set_down(true);
            let mut page = vec![0u8; 4096];
            rng.fill_bytes(&mut page);
            s.write_vectored_at(0, &IoVec::from_slice(&mut page.clone()), IoMode::Blocking)
                .expect("a write of a whole page with the link down");
            guest_flush(&*s);
            expect.lock()[..4096].copy_from_slice(&page);
        }
        match kind {
            0 => {
                faults.set_down(false);
                faults.set_failure_rate(0.0);
                assert_eq!(s.close(Duration::from_secs(60)), 0, "round {round}: a stop on a good link left changes");
                drop(s);
                assert!(
                    view(&format!("view-{round}")) == *expect.lock(),
                    "round {round}: another machine reads other bytes than were written"
                );
                full_stops += 1;
            }
            1 => {
                let wait = if round == 0 { 0 } else { rng.random_range(0..300) };
                if s.close(Duration::from_millis(wait)) > 0 {
                    left_records += 1;
                }
                drop(s);
                short_stops += 1;
            }
            _ => {
                drop(s);
                drops += 1;
            }
        }
        faults.set_down(false);
        faults.set_failure_rate(0.0);
    }
    let s = start(opts(&faults));
    assert!(read_all(&*s).unwrap() == *expect.lock(), "the cache reads other bytes at the end");
    assert_eq!(s.close(Duration::from_secs(60)), 0);
    drop(s);
    assert!(view("view-end") == *expect.lock(), "the remote holds other bytes at the end");
    eprintln!("seed {seed}, {rounds} rounds: {full_stops} full stops, {short_stops} cut short ({left_records} left changes), {drops} drops");
    assert!(full_stops > 0 && left_records > 0 && drops > 0, "a kind of round never happened");
}

/// A request that waited out its short budget behind uploads on a good
/// link: slow, not a fault.
fn slow(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

/// One writer of [`random_rounds`]:
/// writes, zeroes and checked reads in the chunks `w` owns (every other
/// one), with a guest FLUSH now and then. A request that fails changes
/// nothing; only reads and writes of part of a page not local (which
/// needs its bytes from the remote first) may fail, and only in a round
/// whose link has `trouble` (or by waiting out the budget): whole pages are
/// written locally, link or no link.
fn writer(s: &dyn Storage, expect: &parking_lot::Mutex<Vec<u8>>, w: u64, seed: u64, trouble: bool) {
    use rand::{Rng, RngCore};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chunks = expect.lock().len() as u64 / CS;
    for _ in 0..rng.random_range(10..60) {
        let chunk = rng.random_range(0..chunks / 2) * 2 + w;
        // Mostly pages and sectors, so chunks go up as patches over patches.
        let (off, len) = match rng.random_range(0..8) {
            0..=2 => (rng.random_range(0..CS / 4096) * 4096, 4096),
            3 | 4 => {
                let len = rng.random_range(1..=32) * 512;
                (rng.random_range(0..=(CS - len) / 512) * 512, len)
            }
            5 => (0, CS),
            _ => {
                let len = rng.random_range(1..=CS / 512) * 512;
                (rng.random_range(0..=(CS - len) / 512) * 512, len)
            }
        };
        let at = chunk * CS + off;
        match rng.random_range(0..8) {
            0 => {
                if let Err(e) = s.write_zeroes_at(at, len) {
                    assert!(trouble || slow(&e), "zeroing {at}+{len} failed on a good link: {e}");
                    assert!(at % 4096 != 0 || len % 4096 != 0, "zeroing whole pages at {at}+{len} failed: {e}");
                    continue;
                }
                expect.lock()[at as usize..(at + len) as usize].fill(0);
            }
            1 | 2 => {
                // A read of a chunk not local fails while the link is down.
                let mut buf = vec![0u8; len as usize];
                let r = s.read_vectored_at(at, &IoVec::from_slice(&mut buf), IoMode::Blocking);
                match r {
                    Ok(()) => assert!(
                        buf == expect.lock()[at as usize..(at + len) as usize],
                        "a read at {at}+{len} returned other bytes"
                    ),
                    Err(e) => assert!(trouble || slow(&e), "a read at {at}+{len} failed on a good link: {e}"),
                }
            }
            3 => guest_flush(s),
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                let mut v = data.clone();
                if let Err(e) = s.write_vectored_at(at, &IoVec::from_slice(&mut v), IoMode::Blocking) {
                    assert!(trouble || slow(&e), "a write at {at}+{len} failed on a good link: {e}");
                    assert!(at % 4096 != 0 || len % 4096 != 0, "a write of whole pages at {at}+{len} failed: {e}");
                    continue;
                }
                expect.lock()[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
        }
    }
}
