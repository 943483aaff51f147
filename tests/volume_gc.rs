//! One disk, several machines (issue #10): generations (`log`,
//! `rollback`), garbage collection and `verify`, against real `dir:`
//! remotes and the Drive emulator.
//!
//! - gc keeps a fork's generation and an old-generation reader's chunks,
//!   repacks a mostly-dead pack, and frees objects (count and bytes drop);
//!   `verify` is clean before and after, every image reads back equal;
//! - gc racing a write-back store that commits (grace 0) loses nothing: a
//!   writer's pack uploaded before gc's snapshot but committed after it is
//!   kept;
//! - a deleted pack (`dir:`) or a trashed one (Drive `files.update
//!   trashed=true`) is named by `verify` with the newest intact generation;
//!   rollback to it reads back equal; `log` lists what was committed.

mod gdrive_support;
#[path = "tier_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{DynRemote, ObjectMeta, PutBody, RemoteResult, RemoteUrl, RetryPolicy, Slot};
use driveblk::tier::{Storage, TieredStore};
use driveblk::volume::gc::{GcOptions, Retention};
use driveblk::volume::history::{self, RollbackOptions};
use driveblk::volume::verify::{self, ProblemKind, Readme, VerifyOptions};
use driveblk::volume::{self, ImportOptions, RemoteOptions, VolumeReader};
use support::{cache_opts, raw_image, CS};

/// A volume under test: its URL and how to reach it.
struct Vol {
    url: String,
    remote: RemoteOptions,
    tmp: tempfile::TempDir,
    /// Drive only: the emulator (to trash files over the wire).
    drive: Option<gdrive_support::DriveEnv>,
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 8,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
        seed: Some(1),
        attempt_timeout: Duration::from_secs(30),
    }
}

fn dir_vol() -> Vol {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("dir:{}", tmp.path().join("remote/vol").display());
    Vol { url, remote: RemoteOptions { retry: fast_retry(), ..Default::default() }, tmp, drive: None }
}

fn drive_vol() -> Vol {
    let env = gdrive_support::start(driveemu::Config::default(), gdrive_support::Creds::ServiceAccount);
    let remote = RemoteOptions { retry: fast_retry(), config: Arc::new(env.cfg.clone()), ..Default::default() };
    Vol { url: "gdrive:/vms/vol".into(), remote, tmp: tempfile::tempdir().unwrap(), drive: Some(env) }
}

/// Imports a 16-chunk image; returns its bytes.
fn import(v: &Vol) -> Vec<u8> {
    let (src, bytes) = raw_image(v.tmp.path(), "src.raw", 16 * CS as usize, 77);
    let o = ImportOptions { chunk_size: CS, pack_size: 1 << 20, remote: v.remote.clone(), ..Default::default() };
    volume::import(&src, &v.url, &o).unwrap();
    bytes
}

/// A write-back store that commits only when asked, a checkpoint every 2.
fn writer(v: &Vol, name: &str, layer: Option<driveblk::remote::RemoteLayer>) -> Arc<TieredStore> {
    let mut remote = v.remote.clone();
    remote.layer = layer;
    let mut o = cache_opts(&v.tmp.path().join(name), remote);
    o.writeback.sync_interval = Duration::from_secs(3600);
    o.writeback.commit.checkpoint_every = 2;
    o.boot_profile = driveblk::tier::boot::BootProfileMode::Off;
    driveblk::tier::open_volume(&v.url, o).unwrap()
}

/// Writes whole chunks `chunks` with fresh bytes (seeded), flushes.
fn write_chunks(s: &dyn Storage, chunks: std::ops::Range<u64>, seed: u64, expect: &mut [u8]) {
    for c in chunks {
        let mut data = gdrive_support::data(seed * 1000 + c, CS as usize);
        expect[(c * CS) as usize..((c + 1) * CS) as usize].copy_from_slice(&data);
        s.write_vectored_at(c * CS, &IoVec::from_slice(&mut data), IoMode::Blocking).unwrap();
    }
    let t = s.flush_point().unwrap();
    s.wait_durable(t).unwrap();
}

/// Imports, then commits `rounds` rounds of fresh bytes in chunks 0..4
/// from writer `name` (seeds from `seed`); returns the image's bytes and
/// the writer.
fn committed(v: &Vol, name: &str, rounds: u64, seed: u64) -> (Vec<u8>, Arc<TieredStore>) {
    let mut expect = import(v);
    let w = writer(v, name, None);
    for r in 0..rounds {
        write_chunks(&*w, 0..4, seed + r, &mut expect);
        commit(&w);
    }
    (expect, w)
}

/// Commits what was written; returns the new generation.
fn commit(s: &TieredStore) -> u64 {
    let before = s.sync_status().unwrap().generations_committed;
    s.request_sync();
    let t0 = std::time::Instant::now();
    loop {
        let st = s.sync_status().unwrap();
        if st.generations_committed > before && !st.uploading && s.stats().dirty_bytes == 0 {
            return s.volume().generation();
        }
        assert!(st.conflict.is_none() && t0.elapsed() < Duration::from_secs(120), "{st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asks for a sync and waits until write-back pauses; returns its status.
fn sync_until_paused(s: &TieredStore) -> driveblk::tier::tiered::SyncStatus {
    s.request_sync();
    let t0 = std::time::Instant::now();
    loop {
        let st = s.sync_status().unwrap();
        if st.paused {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every chunk of the generation `r` serves, fetched and hash-checked.
fn image_of(rt: &tokio::runtime::Runtime, r: &VolumeReader) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..r.chunk_count() {
        out.extend(rt.block_on(r.fetch_chunk(i)).unwrap().data);
    }
    out
}

fn open(rt: &tokio::runtime::Runtime, v: &Vol) -> Arc<VolumeReader> {
    rt.block_on(VolumeReader::open(&RemoteUrl::parse(&v.url).unwrap(), &v.remote)).unwrap()
}

/// A reader pinned at generation `g`, as a daemon still serving it.
fn pinned(rt: &tokio::runtime::Runtime, v: &Vol, g: u64) -> Arc<VolumeReader> {
    let r = open(rt, v);
    r.set_manifest(rt.block_on(r.load_generation(g)).unwrap());
    r
}

fn listing(rt: &tokio::runtime::Runtime, v: &Vol) -> Vec<ObjectMeta> {
    rt.block_on(open(rt, v).remote.list("")).unwrap()
}

fn gc_opts(v: &Vol, keep: u64) -> GcOptions {
    GcOptions {
        retention: Retention { keep_generations: keep, keep_days: None },
        grace: Duration::ZERO,
        remote: v.remote.clone(),
        ..Default::default()
    }
}

fn verify_opts(v: &Vol, full: bool) -> VerifyOptions {
    VerifyOptions { full, remote: v.remote.clone(), ..Default::default() }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn gc_keeps_what_is_needed_repacks_and_frees(v: Vol) {
    let rt = rt();
    let mut expect = import(&v);
    let s = writer(&v, "a", None);
    // Opening took the writer lease: a generation of its own, after the
    // import's.
    let leased = s.volume().generation();
    assert_eq!(leased, 2, "the lease is taken by a commit on top of the import");
    // The generations this test commits, named by what they hold.
    write_chunks(&*s, 0..8, 2, &mut expect);
    let g_fork = commit(&s);
    assert_eq!(g_fork, leased + 1);
    let expect2 = expect.clone();
    write_chunks(&*s, 8..16, 3, &mut expect);
    let g_b = commit(&s);
    assert_eq!(g_b, g_fork + 1);
    write_chunks(&*s, 0..4, 4, &mut expect);
    let g_dead = commit(&s);
    assert_eq!(g_dead, g_b + 1);
    // Three of generation g_dead's four chunks are rewritten: its pack is
    // mostly dead.
    write_chunks(&*s, 0..3, 5, &mut expect);
    let g_last = commit(&s);
    assert_eq!(g_last, g_dead + 1);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);

    let r = open(&rt, &v);
    assert_eq!(r.generation(), g_last, "closing commits nothing more");
    let dead_prefix = format!("pack-{g_dead:020}");
    let dead_packs: Vec<String> = rt
        .block_on(r.load_generation(g_dead))
        .unwrap()
        .packs
        .into_iter()
        .filter(|k| k.starts_with(&dead_prefix))
        .collect();
    assert_eq!(dead_packs.len(), 1, "generation {g_dead} wrote one pack");
    // A fork made from generation g_fork (what `driveblk fork` registers).
    let fork = serde_json::json!({"volume_id": "ab".repeat(16), "url": "dir:/elsewhere/fork",
                                  "from_generation": g_fork, "created_unix_ms": 1});
    rt.block_on(r.remote.put(&format!("fork-{}.json", "ab".repeat(16)), PutBody::from_bytes(fork.to_string())))
        .unwrap();
    // A daemon still serving generation g_fork.
    let old = pinned(&rt, &v, g_fork);
    // A clock probe a host left behind (stopped between writing and
    // deleting it): garbage.
    rt.block_on(r.remote.put("clock-probe-00112233deadbeef", PutBody::from_bytes(b"clock probe\n".to_vec()))).unwrap();

    let log = history::log(&v.url, &v.remote).unwrap();
    let gens: Vec<u64> = log.entries.iter().map(|e| e.generation).collect();
    assert_eq!(gens, vec![1, leased, g_fork, g_b, g_dead, g_last], "{log:?}");
    // The lease's generation changes nothing and says what it is.
    let e = &log.entries[1];
    assert!(e.chunks_changed == 0 && e.bytes_uploaded == 0, "{e:?}");
    assert!(e.note.as_deref().is_some_and(|n| n.contains("writer lease")), "{e:?}");
    for e in &log.entries[2..] {
        assert!(e.bytes_uploaded > 0 && e.chunks_changed > 0 && e.host.is_some() && e.note.is_none(), "{e:?}");
    }
    assert_eq!(log.entries[5].chunks_changed, 3);
    let before = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
    assert!(before.is_clean() && before.newest_intact == Some(g_last), "{:?}", before.problems);
    assert_eq!(before.readme, Readme::Present, "import writes the README");

    // A dry run changes nothing.
    let objs0 = listing(&rt, &v);
    let dry = volume::gc::gc(&v.url, &GcOptions { dry_run: true, ..gc_opts(&v, 1) }).unwrap();
    assert!(!dry.deleted.is_empty() && dry.repacked == dead_packs, "{dry:?}");
    assert_eq!(listing(&rt, &v).len(), objs0.len());

    // Nothing committed for minutes would be needed to repack; the test
    // says "idle" with a zero window.
    let rep = volume::gc::gc(&v.url, &GcOptions { active_window: Duration::ZERO, ..gc_opts(&v, 1) }).unwrap();
    let g_repack = g_last + 1;
    assert_eq!(rep.repack_generation, Some(g_repack), "{rep:?}");
    assert_eq!(rep.repacked, dead_packs);
    assert!(rep.kept.contains(&g_fork) && rep.kept.contains(&g_repack), "{rep:?}");
    let gone: Vec<&str> = rep.deleted.iter().map(|(k, _)| k.as_str()).collect();
    assert!(gone.contains(&dead_packs[0].as_str()), "the repacked pack goes: {gone:?}");
    assert!(gone.contains(&"clock-probe-00112233deadbeef"), "a leftover clock probe goes: {gone:?}");
    for g in [g_b, g_dead, g_last] {
        assert!(gone.contains(&format!("gen-{g:020}").as_str()), "generation {g} retired: {gone:?}");
    }
    assert!(rep.objects_after < rep.objects_before && rep.bytes_after < rep.bytes_before, "{rep:?}");
    let objs1 = listing(&rt, &v);
    assert_eq!(objs1.len() as u64, rep.objects_after, "report matches the folder");
    assert!(objs1.len() < objs0.len());
    assert!(objs1.iter().any(|m| m.key.starts_with("fork-")), "fork registrations are never deleted");
    assert!(objs1.iter().any(|m| m.key.starts_with("lease-")), "lease heartbeats are never deleted");
    // gc's commit carries the writer lease forward (it must never make a
    // held lease look free).
    let repacked = rt.block_on(r.load_generation(g_repack)).unwrap();
    let lease = repacked.lease.as_ref().expect("the repack carries the lease record");
    assert_eq!(lease.taken_at, leased, "{lease:?}");

    // Nothing lost: the old reader, the newest, verify (cheap and full).
    assert_eq!(image_of(&rt, &old), expect2, "the reader pinned at generation {g_fork} reads every chunk");
    let newest = open(&rt, &v);
    assert_eq!(newest.generation(), g_repack);
    assert_eq!(image_of(&rt, &newest), expect, "the newest generation reads back equal");
    for full in [false, true] {
        let after = verify::verify(&v.url, &verify_opts(&v, full)).unwrap();
        assert!(after.is_clean() && after.newest_intact == Some(g_repack), "{:?}", after.problems);
    }
    // A second gc finds nothing more to do.
    let again = volume::gc::gc(&v.url, &GcOptions { active_window: Duration::ZERO, ..gc_opts(&v, 1) }).unwrap();
    assert!(again.deleted.is_empty() && again.repack_generation.is_none(), "{again:?}");
}

#[test]
fn dir_gc_keeps_forks_and_old_readers_repacks_and_frees() {
    gc_keeps_what_is_needed_repacks_and_frees(dir_vol());
}

#[test]
fn gdrive_gc_keeps_forks_and_old_readers_repacks_and_frees() {
    gc_keeps_what_is_needed_repacks_and_frees(drive_vol());
}

/// Once armed, holds manifest creates (commits) at a gate: the writer's
/// packs are up, its generation not yet committed. (Unarmed while the
/// store opens: taking the writer lease is a commit too.)
#[derive(Debug)]
struct GateCommits {
    inner: DynRemote,
    armed: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl driveblk::remote::Remote for GateCommits {
    async fn create_folder(&self) -> driveblk::remote::RemoteResult<()> {
        self.inner.create_folder().await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> RemoteResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.inner.put(key, body).await
    }
    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.inner.delete(key).await
    }
    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.inner.reserve(key).await
    }
    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        if key.starts_with("gen-") && self.armed.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
        }
        self.inner.create(key, slot, tag, body).await
    }
    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        self.inner.head_created(key, slot).await
    }
    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<bytes::Bytes> {
        self.inner.get_created(key, slot).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn gc_under_a_concurrent_writer_loses_nothing(v: Vol) {
    let rt = rt();
    let mut expect = import(&v);
    // 1. Exact interleaving: the writer's pack lands before gc's snapshot,
    // its commit after gc finished (grace 0).
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    let (g2, w2, a2) = (gate.clone(), waiting.clone(), armed.clone());
    let layer: driveblk::remote::RemoteLayer = Arc::new(move |inner| {
        Arc::new(GateCommits { inner, armed: a2.clone(), gate: g2.clone(), waiting: w2.clone() }) as DynRemote
    });
    let s = writer(&v, "a", Some(layer));
    // The writer's next generation (opening took the lease with one).
    let next = s.volume().generation() + 1;
    armed.store(true, Ordering::SeqCst);
    write_chunks(&*s, 2..6, 11, &mut expect);
    s.request_sync();
    while waiting.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let prefix = format!("pack-{next:020}");
    let unreferenced: Vec<String> =
        listing(&rt, &v).into_iter().map(|m| m.key).filter(|k| k.starts_with(&prefix)).collect();
    assert!(!unreferenced.is_empty(), "the writer's pack is up, not yet committed");
    // Strictly older than gc's snapshot by any clock's granularity (file
    // times are coarse): only the rule for uncommitted generations' packs
    // keeps it.
    std::thread::sleep(Duration::from_millis(50));
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    gate.add_permits(1000);
    assert_eq!(commit(&s), next);
    let clean = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
    assert!(clean.is_clean(), "{:?}", clean.problems);
    // gc may retire the manifests below the newest (the import's, now that
    // the lease's generation is a full one), but no pack: the import's is
    // live, the writer's is for a generation not committed yet.
    assert!(
        rep.young >= 1 && rep.deleted.iter().all(|(k, _)| k.starts_with("gen-") && !unreferenced.contains(k)),
        "the writer's pack is left alone: {rep:?}"
    );
    assert!(
        listing(&rt, &v).iter().any(|m| m.key.starts_with("lease-")),
        "the writer's lease heartbeat is never deleted"
    );

    // 2. Free-running: gc over and over while the writer commits.
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let gc_thread = {
        let (stop, runs, url, opts) = (stop.clone(), runs.clone(), v.url.clone(), gc_opts(&v, 1));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) || runs.load(Ordering::SeqCst) < 2 {
                let r = volume::gc::gc(&url, &opts).unwrap();
                assert!(r.repack_generation.is_none(), "gc writes no generation while a writer is active");
                runs.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for round in 0..6u64 {
        let c = (round * 3) % 14;
        write_chunks(&*s, c..c + 2, 20 + round, &mut expect);
        commit(&s);
    }
    stop.store(true, Ordering::SeqCst);
    gc_thread.join().unwrap();
    assert!(runs.load(Ordering::SeqCst) >= 2);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    let newest = s.volume().generation();
    drop(s);
    let after = verify::verify(&v.url, &verify_opts(&v, true)).unwrap();
    assert!(after.is_clean() && after.newest_intact == Some(newest), "{:?}", after.problems);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect, "every committed write reads back");
}

#[test]
fn dir_gc_under_a_concurrent_writer_loses_nothing() {
    gc_under_a_concurrent_writer_loses_nothing(dir_vol());
}

#[test]
fn gdrive_gc_under_a_concurrent_writer_loses_nothing() {
    gc_under_a_concurrent_writer_loses_nothing(drive_vol());
}

/// Holds every delete of an object named `prefix…` at a gate (gc deletes
/// several at once): gc is then stopped between two of its steps.
#[derive(Debug)]
struct GateDeletes {
    inner: DynRemote,
    prefix: &'static str,
    gate: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl driveblk::remote::layer::Layer for GateDeletes {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }
    async fn delete(&self, key: &str) -> RemoteResult<()> {
        if key.starts_with(self.prefix) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
        }
        self.inner.delete(key).await
    }
}

/// Runs gc (keep 1, grace 0) in a thread, stopped at its first delete of a
/// `prefix…` object; runs `meanwhile` there, then lets gc finish.
fn gc_stopped_at<T>(v: &Vol, prefix: &'static str, meanwhile: impl FnOnce() -> T) -> (volume::gc::GcReport, T) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(AtomicU64::new(0));
    let (g2, w2) = (gate.clone(), waiting.clone());
    let mut opts = gc_opts(v, 1);
    if v.drive.is_some() {
        // gc runs as another host would: its own Drive client, which knows
        // nothing this process created, so it finds objects by listing.
        let mut cfg = (*opts.remote.config).clone();
        cfg.drive.id_record = None;
        cfg.drive.open_grace += Duration::from_millis(1);
        opts.remote.config = Arc::new(cfg);
    }
    opts.remote.layer = Some(Arc::new(move |inner| {
        Arc::new(GateDeletes { inner, prefix, gate: g2.clone(), waiting: w2.clone() }) as DynRemote
    }));
    let url = v.url.clone();
    let gc = std::thread::spawn(move || volume::gc::gc(&url, &opts));
    let t0 = std::time::Instant::now();
    while waiting.load(Ordering::SeqCst) == 0 {
        if gc.is_finished() {
            panic!("gc never deleted a {prefix}… object: {:?}", gc.join().unwrap());
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "gc never deleted a {prefix}… object");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = meanwhile();
    gate.add_permits(1000);
    (gc.join().unwrap().unwrap(), out)
}

/// gc racing `fork` and `rollback` of a generation it retires. When their
/// holds are up before gc deletes the generation, gc keeps what it
/// references and both read back whole, also after the next gc; when gc
/// deleted it first, both refuse and leave nothing behind.
fn gc_racing_a_fork_and_a_rollback_loses_nothing(v: Vol, fork_url: &str, fork2_url: &str) {
    let rt = rt();
    let mut expect = import(&v);
    let expect_1 = expect.clone();
    let s = writer(&v, "a", None);
    write_chunks(&*s, 0..16, 2, &mut expect);
    let g_a = commit(&s);
    let expect_a = expect.clone();
    write_chunks(&*s, 0..16, 3, &mut expect);
    let g_b = commit(&s);
    let expect_b = expect.clone();
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let r = open(&rt, &v);
    let from_1 = rt.block_on(r.load_generation(1)).unwrap();
    let from_a = rt.block_on(r.load_generation(g_a)).unwrap();
    let from_b = rt.block_on(r.load_generation(g_b)).unwrap();
    let packs_of =
        |m: &volume::Manifest| -> Vec<String> { m.packs.iter().filter(|k| !k.contains(':')).cloned().collect() };
    let rollback =
        |g: u64| history::rollback(&v.url, g, &RollbackOptions { remote: v.remote.clone(), ..Default::default() });
    if let Some(env) = &v.drive {
        // Their holds are created unlisted: each waits until it is listed.
        env.emu.faults().set_listing_lag(Duration::from_millis(1500));
    }

    // 1. gc planned to retire generations 1 to g_a (keep 1), then a fork
    // of g_a and a rollback to 1 were made before it deleted anything.
    let (rep, rolled) = gc_stopped_at(&v, "gen-", || {
        rt.block_on(volume::fork::create_fork(
            &r,
            &from_a,
            &RemoteUrl::parse(fork_url).unwrap(),
            &v.remote,
            "test-fork",
        ))
        .unwrap();
        rollback(1).unwrap()
    });
    assert_eq!(rolled.generation, g_b + 1);
    let gone: Vec<&str> = rep.deleted.iter().map(|(k, _)| k.as_str()).collect();
    assert!(gone.contains(&format!("gen-{g_a:020}").as_str()), "g_a's manifest was retired: {gone:?}");
    for k in packs_of(&from_a) {
        assert!(!gone.contains(&k.as_str()), "{k}, which the fork uses, is kept: {gone:?}");
    }
    for k in packs_of(&from_1) {
        assert!(!gone.contains(&k.as_str()), "{k}, which the rollback uses, is kept: {gone:?}");
    }
    if let Some(env) = &v.drive {
        env.emu.faults().set_listing_lag(Duration::ZERO);
    }
    let after = verify::verify(&v.url, &verify_opts(&v, true)).unwrap();
    assert!(after.is_clean() && after.newest_intact == Some(g_b + 1), "{:?}", after.problems);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect_1, "the rollback reads back whole");
    let fork = rt.block_on(VolumeReader::open(&RemoteUrl::parse(fork_url).unwrap(), &v.remote)).unwrap();
    assert_eq!(image_of(&rt, &fork), expect_a, "the fork reads back whole");
    let fv = verify::verify(fork_url, &verify_opts(&v, true)).unwrap();
    assert!(fv.is_clean(), "{:?}", fv.problems);
    assert!(!listing(&rt, &v).iter().any(|m| m.key.starts_with("hold-")), "the rollback removed its hold");

    // gc judges a generation's age by the remote's time in its listing:
    // the rollback's, created while listings lagged, must be listed first.
    if v.drive.is_some() {
        std::thread::sleep(Duration::from_millis(1600));
    }

    // 2. gc deleted g_b's manifest first: a fork of g_b (its cache was
    // based on it) and a rollback to it refuse, and reference nothing.
    if let Some(env) = &v.drive {
        env.emu.faults().set_listing_lag(Duration::from_millis(1500));
    }
    let (rep, (forked, rolled)) = gc_stopped_at(&v, "pack-", || {
        let forked = rt.block_on(volume::fork::create_fork(
            &r,
            &from_b,
            &RemoteUrl::parse(fork2_url).unwrap(),
            &v.remote,
            "test-fork2",
        ));
        (forked.map(|_| ()), rollback(g_b))
    });
    let e = forked.unwrap_err().to_string();
    assert!(e.contains("removed by gc while the fork was being made"), "{e}");
    let e = rolled.unwrap_err().to_string();
    assert!(e.contains(&format!("generation {g_b} of")) && e.contains("no longer exists"), "{e}");
    assert!(rep.deleted.iter().any(|(k, _)| k == &format!("gen-{g_b:020}")), "{rep:?}");
    if let Some(env) = &v.drive {
        env.emu.faults().set_listing_lag(Duration::ZERO);
    }
    let objs = listing(&rt, &v);
    assert!(!objs.iter().any(|m| m.key.starts_with("hold-")), "no hold is left behind: {objs:?}");
    assert_eq!(objs.iter().filter(|m| m.key.starts_with("fork-")).count(), 1, "only the real fork is registered");
    let after = verify::verify(&v.url, &verify_opts(&v, true)).unwrap();
    assert!(after.is_clean() && after.newest_intact == Some(g_b + 1), "{:?}", after.problems);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect_1);
    assert!(expect_1 != expect_a && expect_a != expect_b);
    // The first fork's registration still keeps what it uses, although gc
    // retired its generation's manifest (step 1) before this run.
    let fork = rt.block_on(VolumeReader::open(&RemoteUrl::parse(fork_url).unwrap(), &v.remote)).unwrap();
    assert_eq!(image_of(&rt, &fork), expect_a, "the fork reads back whole after the next gc");
    let fv = verify::verify(fork_url, &verify_opts(&v, true)).unwrap();
    assert!(fv.is_clean(), "{:?}", fv.problems);
}

#[test]
fn dir_gc_racing_a_fork_and_a_rollback_loses_nothing() {
    let v = dir_vol();
    let root = v.tmp.path().join("remote");
    let (f1, f2) = (format!("dir:{}", root.join("fork").display()), format!("dir:{}", root.join("fork2").display()));
    gc_racing_a_fork_and_a_rollback_loses_nothing(v, &f1, &f2);
}

#[test]
fn gdrive_gc_racing_a_fork_and_a_rollback_loses_nothing() {
    gc_racing_a_fork_and_a_rollback_loses_nothing(drive_vol(), "gdrive:/vms/fork", "gdrive:/vms/fork2");
}

/// Trashes (Drive, `files.update trashed=true` over the wire) or deletes
/// (`dir:`) object `key`; returns how to undo it, if it can be.
fn damage(v: &Vol, key: &str) -> Option<String> {
    match &v.drive {
        None => {
            let path = v.url.strip_prefix("dir:").unwrap();
            std::fs::remove_file(Path::new(path).join(key)).unwrap();
            None
        }
        Some(env) => {
            let rt = rt();
            let api = driveblk::remote::gdrive::api::DriveApi::new(&env.cfg.drive);
            let id = rt.block_on(async {
                let q = format!("name = '{key}' and trashed = false");
                let files = api.list(&q, None).await.unwrap();
                assert_eq!(files.len(), 1, "{files:?}");
                let id = files[0].id.clone();
                let url = format!("{}/drive/v3/files/{id}", env.cfg.drive.api_url.trim_end_matches('/'));
                api.send(
                    |tok| api.http().patch(&url).bearer_auth(tok).json(&serde_json::json!({"trashed": true})),
                    |s| s.is_success(),
                    false,
                )
                .await
                .unwrap();
                id
            });
            Some(id)
        }
    }
}

fn verify_names_the_damage_and_rollback_restores(v: Vol) {
    let rt = rt();
    let mut expect = import(&v);
    let s = writer(&v, "a", None);
    // Opening took the writer lease with a generation of its own.
    let leased = s.volume().generation();
    write_chunks(&*s, 0..4, 31, &mut expect);
    let good = commit(&s);
    assert_eq!(good, leased + 1);
    let expect2 = expect.clone();
    write_chunks(&*s, 4..6, 32, &mut expect);
    let bad = commit(&s);
    assert_eq!(bad, good + 1);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let r = open(&rt, &v);
    assert_eq!(r.generation(), bad);
    let prefix = format!("pack-{bad:020}");
    let pack = r.manifest().packs.iter().find(|k| k.starts_with(&prefix)).unwrap().clone();
    let undo = damage(&v, &pack);

    let rep = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    let p = &rep.problems[0];
    assert_eq!(p.key, pack);
    assert_eq!(p.kind, if v.drive.is_some() { ProblemKind::Trashed } else { ProblemKind::Missing });
    assert_eq!(p.generations, vec![bad]);
    assert_eq!(rep.newest_intact, Some(good), "generation {good} does not use that pack");
    let advice = rep.advice();
    assert!(advice.contains("rollback") && advice.contains(&format!(" {good}")), "{advice}");
    if v.drive.is_some() {
        assert!(advice.contains("Trash"), "{advice}");
    }
    // Rolling back to it: a new generation equal to `good`, read back.
    let rb =
        history::rollback(&v.url, good, &RollbackOptions { remote: v.remote.clone(), ..Default::default() }).unwrap();
    assert_eq!((rb.generation, rb.previous), (bad + 1, bad));
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect2, "rollback reads back generation {good}'s image");
    let log = history::log(&v.url, &v.remote).unwrap();
    assert_eq!(log.entries.iter().map(|e| e.generation).collect::<Vec<_>>(), vec![1, leased, good, bad, rb.generation]);
    let last = log.entries.last().unwrap();
    assert!(last.note.as_deref().is_some_and(|n| n.contains(&format!("rollback to generation {good}"))), "{log:?}");
    assert!(last.checkpoint);
    // The rollback carries the (released) lease forward: it never makes a
    // lease look free that someone holds, nor takes one.
    let rolled = rt.block_on(r.load_generation(rb.generation)).unwrap();
    assert_eq!(rolled.lease.as_ref().map(|l| l.taken_at), Some(leased), "{:?}", rolled.lease);
    let rep = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
    assert_eq!(rep.newest_intact, Some(rb.generation), "the rollback is intact; {:?}", rep.problems);
    // Rolling back to the damaged generation is refused.
    let e = history::rollback(&v.url, bad, &RollbackOptions { remote: v.remote.clone(), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains(&pack), "{e}");
    if let (Some(env), Some(id)) = (&v.drive, undo) {
        // Untrashed in the web UI: clean again.
        let api = driveblk::remote::gdrive::api::DriveApi::new(&env.cfg.drive);
        let url = format!("{}/drive/v3/files/{id}", env.cfg.drive.api_url.trim_end_matches('/'));
        rt.block_on(api.send(
            |tok| api.http().patch(&url).bearer_auth(tok).json(&serde_json::json!({"trashed": false})),
            |s| s.is_success(),
            false,
        ))
        .unwrap();
        let rep = verify::verify(&v.url, &verify_opts(&v, true)).unwrap();
        assert!(rep.is_clean(), "{:?}", rep.problems);
        // The newest manifest trashed: readers would quietly serve the one
        // before it; verify names it.
        let newest_key = format!("gen-{:020}", rb.generation);
        damage(&v, &newest_key);
        let rep = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
        assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
        assert_eq!((rep.problems[0].key.as_str(), &rep.problems[0].kind), (newest_key.as_str(), &ProblemKind::Trashed));
        assert!(rep.advice().contains("newest committed generation"), "{}", rep.advice());
    }
}

#[test]
fn dir_verify_names_a_deleted_pack_and_rollback_restores() {
    verify_names_the_damage_and_rollback_restores(dir_vol());
}

#[test]
fn gdrive_verify_names_a_trashed_pack_and_rollback_restores() {
    verify_names_the_damage_and_rollback_restores(drive_vol());
}

#[test]
fn gdrive_verify_repair_writes_a_missing_readme() {
    let v = drive_vol();
    import(&v);
    let rt = rt();
    let r = open(&rt, &v);
    rt.block_on(r.remote.delete(verify::README_KEY)).unwrap();
    let rep = verify::verify(&v.url, &verify_opts(&v, false)).unwrap();
    assert_eq!(rep.readme, Readme::Missing);
    let rep = verify::verify(&v.url, &VerifyOptions { repair: true, ..verify_opts(&v, false) }).unwrap();
    assert_eq!(rep.readme, Readme::Written);
    let text = rt.block_on(r.remote.get(verify::README_KEY)).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("Do not edit"));
}

/// `serve` checks the newest generation's objects at open (in the
/// background) and says what is missing and what to do.
#[test]
fn serve_names_a_missing_pack_at_open() {
    let v = dir_vol();
    let mut expect = import(&v);
    let s = writer(&v, "a", None);
    write_chunks(&*s, 0..2, 41, &mut expect);
    let g = commit(&s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let rt = rt();
    let prefix = format!("pack-{g:020}");
    let pack = open(&rt, &v).manifest().packs.iter().find(|k| k.starts_with(&prefix)).unwrap().clone();
    damage(&v, &pack);
    let log = v.tmp.path().join("serve.log");
    let sock = v.tmp.path().join("sock");
    let cache = v.tmp.path().join("serve-cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &v.url, "--format", "raw"])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let found = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("volume folder damaged") {
            break text;
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(found.contains("volume folder damaged") && found.contains(&pack), "{found}");
    assert!(found.contains("driveblk verify"), "says what to do: {found}");
}

/// A full Drive (`storageQuotaExceeded`) pauses write-back while the guest
/// runs on; `space` says how much is dead and what gc would free; once
/// gc (or the user) frees room, the sync goes through.
#[test]
fn gdrive_full_drive_pauses_sync_and_gc_frees_room() {
    let v = drive_vol();
    let rt = rt();
    // Churn: the same chunks rewritten, so older generations hold dead bytes.
    // Four rounds: whichever of them the newest generation's delta chain
    // still needs (a checkpoint every 2, counted from the lease's
    // generation), at least two rounds' packs are dead.
    let (mut expect, s) = committed(&v, "a", 4, 50);
    let used: u64 = listing(&rt, &v).iter().map(|m| m.size).sum();
    let env = v.drive.as_ref().unwrap();
    env.emu.faults().set_storage_quota(Some(used + 4096));
    write_chunks(&*s, 4..8, 60, &mut expect);
    let st = sync_until_paused(&s);
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("storageQuotaExceeded")), "{st:?}");
    // The guest runs on: writes land and flush locally, reads see them.
    write_chunks(&*s, 8..9, 61, &mut expect);
    assert_eq!(driveblk_read(&*s), expect);
    // What gc would free (grace 0 here: the objects are minutes old).
    let space = volume::gc::space(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(space.dead_bytes > 0 && space.reclaimable_now > 0 && space.live_bytes < space.used_bytes, "{space:?}");
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(rep.bytes_after < rep.bytes_before, "{rep:?}");
    // Room again (the emulator counts trash too; gc deletes for good).
    let freed = rep.bytes_before - rep.bytes_after;
    assert!(freed > 5 * CS, "the new generation fits: freed {freed}");
    commit(&s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
}

/// A Drive full to the byte (or a folder at its item limit) takes no
/// object at all, not even gc's clock probe: gc, its dry run and `info`,
/// the documented way out, must still run — judging ages by the newest
/// time an object was written — and free room.
#[test]
fn gdrive_gc_frees_room_on_a_drive_full_to_the_byte() {
    let v = drive_vol();
    let rt = rt();
    let (mut expect, s) = committed(&v, "a", 4, 50);
    let env = v.drive.as_ref().unwrap();
    let used: u64 = listing(&rt, &v).iter().map(|m| m.size).sum();
    env.emu.faults().set_storage_quota(Some(used));
    let items = listing(&rt, &v).len() as u64;
    env.emu.faults().set_folder_child_limit(Some(items));
    let space = volume::gc::space(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(space.reclaimable_now > 0, "{space:?}");
    let dry = volume::gc::gc(&v.url, &GcOptions { dry_run: true, ..gc_opts(&v, 1) }).unwrap();
    assert!(!dry.deleted.is_empty(), "{dry:?}");
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(rep.bytes_after < rep.bytes_before, "{rep:?}");
    env.emu.faults().set_folder_child_limit(None);
    env.emu.faults().set_storage_quota(Some(used + 4096));
    write_chunks(&*s, 4..6, 60, &mut expect);
    commit(&s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
}

/// A volume folder at Drive's limit of items in one folder (403
/// `numChildrenInNonRootLimitExceeded`) pauses write-back naming gc, the
/// way out, never "permission denied".
#[test]
fn gdrive_full_folder_pauses_sync_naming_gc() {
    let v = drive_vol();
    let rt = rt();
    let (mut expect, s) = committed(&v, "a", 2, 90);
    let items = listing(&rt, &v).len() as u64;
    let env = v.drive.as_ref().unwrap();
    env.emu.faults().set_folder_child_limit(Some(items));
    write_chunks(&*s, 4..6, 92, &mut expect);
    let st = sync_until_paused(&s);
    let e = st.last_error.clone().unwrap_or_default();
    assert!(e.contains("driveblk gc") && e.contains("500,000"), "{st:?}");
    assert!(!e.contains("permission denied"), "{st:?}");
    assert_eq!(driveblk_read(&*s), expect, "the guest runs on");
    env.emu.faults().set_folder_child_limit(None);
    commit(&s);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
}

/// On `dir:`, a put cut short by a killed process leaves a hidden temp
/// file no listing shows: gc deletes it once it has gone unwritten long
/// enough (never one a write may still be filling).
#[test]
fn dir_gc_deletes_leftover_temp_files() {
    let v = dir_vol();
    import(&v);
    let folder = v.tmp.path().join("remote/vol");
    let old = folder.join(".tmp-pack-00000000000000000002-00aa.00000000deadbeef");
    let fresh = folder.join(".tmp-pack-00000000000000000002-00bb.00000000feedf00d");
    std::fs::write(&old, vec![1u8; 5000]).unwrap();
    std::fs::write(&fresh, vec![2u8; 10]).unwrap();
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_days).unwrap();
    let dry = volume::gc::gc(&v.url, &GcOptions { dry_run: true, ..gc_opts(&v, 1) }).unwrap();
    assert_eq!(dry.scratch.len(), 1, "{dry:?}");
    assert!(old.exists(), "a dry run deleted");
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert_eq!(rep.scratch, vec![(old.file_name().unwrap().to_string_lossy().into_owned(), 5000)]);
    assert!(!old.exists(), "the old temp file is still there");
    assert!(fresh.exists(), "a temp file a write may still be filling was deleted");
}

/// Nothing but gc deletes, and nothing else would run it: `serve`, while
/// it holds the writer lease, runs a delete-only gc about once a day
/// (here every second, `DRIVEBLK_GC_EVERY`), next to its own commits.
#[test]
fn serve_runs_gc_while_it_writes() {
    let v = dir_vol();
    import(&v);
    let folder = v.tmp.path().join("remote/vol");
    let old = folder.join(".tmp-pack-00000000000000000001-00aa.00000000deadbeef");
    std::fs::write(&old, vec![1u8; 5000]).unwrap();
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_days).unwrap();
    let log = v.tmp.path().join("serve.log");
    let sock = v.tmp.path().join("sock");
    let cache = v.tmp.path().join("serve-cache");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &v.url, "--format", "raw"])
        .args(["--cache-dir", cache.to_str().unwrap(), "--sync-interval", "1"])
        .env("DRIVEBLK_GC_EVERY", "1s")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !old.exists() && text.contains("gc: deleted") {
            break text;
        }
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(!old.exists() && text.contains("gc: deleted"), "serve ran no gc: {text}");
    assert!(status.success(), "{text}");
}

/// A `DRIVEBLK_GC_*` value that does not parse (`7d` where a number of
/// days goes) is an error naming it, from `gc` and from `serve` before it
/// serves: ignored, gc (serve's daily one too) fell back to the defaults
/// and deleted the generations it was set to keep.
#[test]
fn a_malformed_gc_setting_is_an_error_never_ignored() {
    let v = dir_vol();
    import(&v);
    let bin = env!("CARGO_BIN_EXE_driveblk");
    let gc = |var: &str, val: &str| {
        std::process::Command::new(bin).args(["gc", &v.url, "--dry-run", "--force"]).env(var, val).output().unwrap()
    };
    for (var, val) in
        [("DRIVEBLK_GC_KEEP_DAYS", "7d"), ("DRIVEBLK_GC_KEEP_GENERATIONS", "ten"), ("DRIVEBLK_GC_GRACE", "1 week")]
    {
        let out = gc(var, val);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&format!("invalid {var}=\"{val}\"")), "{var}={val}: {err}");
    }
    let out = gc("DRIVEBLK_GC_KEEP_DAYS", "7");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = v.tmp.path().join("serve.log");
    let sock = v.tmp.path().join("sock");
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &v.url, "--format", "raw"])
        .args(["--cache-dir", v.tmp.path().join("serve-cache").to_str().unwrap()])
        .env("DRIVEBLK_GC_KEEP_DAYS", "7d")
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()) && text.contains("invalid DRIVEBLK_GC_KEEP_DAYS=\"7d\""),
        "serve started with a gc setting it ignores: {text}"
    );
}

fn driveblk_read(s: &dyn Storage) -> Vec<u8> {
    support::read_all(s).unwrap()
}

/// Many small commits leave many small packs; past `max_packs`, gc merges
/// them (object count bounded), and the image reads back equal; the idle
/// writer then commits on top of gc's generation.
#[test]
fn dir_gc_compacts_many_small_packs() {
    let v = dir_vol();
    let rt = rt();
    let mut expect = import(&v);
    let s = writer(&v, "a", None);
    for c in 0..6u64 {
        write_chunks(&*s, c * 2..c * 2 + 1, 70 + c, &mut expect);
        commit(&s);
    }
    let packs =
        |rt: &tokio::runtime::Runtime| listing(rt, &v).into_iter().filter(|m| m.key.starts_with("pack-")).count();
    let before = packs(&rt);
    assert!(before >= 8, "{before} packs");
    let opts = GcOptions { active_window: Duration::ZERO, max_packs: 4, ..gc_opts(&v, 1) };
    let rep = volume::gc::gc(&v.url, &opts).unwrap();
    assert!(rep.repack_generation.is_some(), "{rep:?}");
    let after = packs(&rt);
    assert!(after <= 2, "{before} packs became {after}: {rep:?}");
    assert!(rep.objects_after < rep.objects_before, "{rep:?}");
    // The writer, idle meanwhile, was fenced out by the repack's commit:
    // it builds its next generation on the repacked one instead.
    write_chunks(&*s, 15..16, 79, &mut expect);
    let g = commit(&s);
    assert_eq!(g, rep.repack_generation.unwrap() + 1);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
    let clean = verify::verify(&v.url, &verify_opts(&v, true)).unwrap();
    assert!(clean.is_clean(), "{:?}", clean.problems);
}

/// gc and rollback refuse while another host has just committed (it is
/// probably serving the volume), unless forced.
#[test]
fn dir_gc_and_rollback_refuse_while_another_host_writes() {
    let v = dir_vol();
    let rt = rt();
    import(&v);
    let r = open(&rt, &v);
    let b = volume::commit::GenerationBuilder::new(
        r.remote.clone(),
        &r.url,
        &r.header,
        r.manifest(),
        false,
        Default::default(),
    );
    let mut w = volume::commit::writer_record("other-cache");
    w.host = "elsewhere".into();
    rt.block_on(b.commit(w)).unwrap();
    let e = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap_err().to_string();
    assert!(e.contains("elsewhere") && e.contains("--force"), "{e}");
    let e = history::rollback(&v.url, 1, &RollbackOptions { remote: v.remote.clone(), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("elsewhere"), "{e}");
    volume::gc::gc(&v.url, &GcOptions { force: true, ..gc_opts(&v, 1) }).unwrap();
    let rb = history::rollback(&v.url, 1, &RollbackOptions { force: true, remote: v.remote.clone() }).unwrap();
    assert_eq!(rb.generation, 3);
}

/// The commands run from the command line.
#[test]
fn cli_log_gc_verify_info() {
    let v = dir_vol();
    import(&v);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk")).args(args).output().unwrap();
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let log = run(&["log", &v.url]);
    assert!(log.contains("checkpoint") && log.contains("(newest)"), "{log}");
    let gc = run(&["gc", &v.url, "--dry-run", "--grace", "0s", "--keep-generations", "1"]);
    assert!(gc.contains("objects") && gc.contains("kept generations"), "{gc}");
    let ver = run(&["verify", &v.url, "--full"]);
    assert!(ver.contains("intact"), "{ver}");
    let info = run(&["info", &v.url]);
    assert!(info.contains("live") && info.contains("gc` would free"), "{info}");
    // A daemon's status while write-back waits on a full Drive.
    let cache = v.tmp.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let status = serde_json::json!({"pid": 1, "running": true, "volume_id": "x", "generation": 1,
        "sync": {"dirty_bytes": 4096, "paused": true,
                 "last_error": "uploading pack: quota exceeded: storageQuotaExceeded"}});
    std::fs::write(cache.join("status.json"), status.to_string()).unwrap();
    let st = run(&["status", &v.url, "--cache-dir", cache.to_str().unwrap()]);
    assert!(st.contains("PAUSED") && st.contains("the remote is full") && st.contains("gc` would free"), "{st}");
}

/// Boot profiles: the newest (index and pack) stays, older ones go, an
/// orphan pack newer than the newest index (an upload in flight) stays;
/// `--keep-days` keeps young generations.
#[test]
fn dir_gc_keeps_the_newest_boot_profile_and_young_generations() {
    let v = dir_vol();
    let rt = rt();
    let mut expect = import(&v);
    let s = writer(&v, "a", None);
    for round in 0..3 {
        write_chunks(&*s, 0..2, 90 + round, &mut expect);
        commit(&s);
    }
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let r = open(&rt, &v);
    let old = "profile-00000000000000000002-0000000000001-aaaaaaaa";
    let new = "profile-00000000000000000003-0000000000002-bbbbbbbb";
    let flying = "profile-00000000000000000004-0000000000003-cccccccc.pack";
    for k in [old.to_string(), format!("{old}.pack"), new.to_string(), format!("{new}.pack"), flying.to_string()] {
        rt.block_on(r.remote.put(&k, PutBody::from_bytes(b"x".to_vec()))).unwrap();
    }
    let young = GcOptions { retention: Retention { keep_generations: 1, keep_days: Some(1.0) }, ..gc_opts(&v, 1) };
    let rep = volume::gc::gc(&v.url, &young).unwrap();
    let gone: Vec<&str> = rep.deleted.iter().map(|(k, _)| k.as_str()).collect();
    assert!(!gone.iter().any(|k| k.starts_with("gen-")), "every generation is younger than a day: {gone:?}");
    let mut profiles: Vec<&str> = gone.iter().copied().filter(|k| k.starts_with("profile-")).collect();
    profiles.sort();
    assert_eq!(profiles, vec![old.to_string(), format!("{old}.pack")]);
    let left: Vec<String> = listing(&rt, &v).into_iter().map(|m| m.key).filter(|k| k.starts_with("profile-")).collect();
    assert_eq!(left, vec![new.to_string(), format!("{new}.pack"), flying.to_string()]);
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(rep.deleted.iter().any(|(k, _)| k.starts_with("gen-")), "without --keep-days they go: {rep:?}");
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
}

/// The profile readers use is the newest that parses: gc keeps it when a
/// newer one is damaged (or a newer driveblk's), and leaves that one alone.
#[test]
fn dir_gc_keeps_the_newest_readable_boot_profile() {
    let v = dir_vol();
    let rt = rt();
    let img = import(&v);
    let r = open(&rt, &v);
    let cache = v.tmp.path().join("profile-tmp");
    std::fs::create_dir_all(&cache).unwrap();
    let upload = |pages: std::ops::Range<u64>| {
        let mut b = driveblk::volume::profile::ProfileBuilder::new(&cache, &r).unwrap();
        for p in pages {
            b.add(p * 4096, &img[(p * 4096) as usize..((p + 1) * 4096) as usize]).unwrap();
        }
        let key = rt.block_on(b.upload(&r.remote)).unwrap().unwrap();
        // Profile keys are named by the millisecond.
        std::thread::sleep(Duration::from_millis(5));
        key
    };
    let older = upload(0..2);
    let readable = upload(2..4);
    // Newer than both, but damaged.
    let damaged = format!("profile-{:020}-9999999999999-deadbeef", r.generation());
    rt.block_on(r.remote.put(&damaged, PutBody::from_bytes(b"not a profile".to_vec()))).unwrap();
    let find = || rt.block_on(driveblk::volume::profile::find_latest(&r.remote, &r.header)).unwrap().map(|(k, _)| k);
    assert_eq!(find(), Some(readable.clone()), "readers skip the damaged one");
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    let gone: Vec<&str> = rep.deleted.iter().map(|(k, _)| k.as_str()).collect();
    assert!(gone.contains(&older.as_str()), "the older profile goes: {gone:?}");
    assert!(!gone.iter().any(|k| k.starts_with(&readable) || *k == damaged), "{gone:?}");
    assert_eq!(find(), Some(readable), "the profile readers use is still there");
}

/// Commits a generation whose writer lease `host` took (and last
/// committed) an hour ago by its clock, a ttl of an hour: only the lease
/// says the holder is still there. Returns that generation.
fn commit_leased_an_hour_ago(rt: &tokio::runtime::Runtime, v: &Vol, host: &str) -> u64 {
    let r = open(rt, v);
    let mut b = volume::commit::GenerationBuilder::new(
        r.remote.clone(),
        &r.url,
        &r.header,
        r.manifest(),
        false,
        Default::default(),
    );
    let g = r.generation() + 1;
    b.set_lease(Some(driveblk::volume::format::LeaseRecord {
        host: host.into(),
        pid: 7,
        cache_id: "other-cache".into(),
        taken_at: g,
        since_ms: None,
        ttl_ms: 3_600_000,
        generation: g,
        pending_bytes: 0,
        released: false,
    }));
    let mut w = volume::commit::writer_record("other-cache");
    w.host = host.into();
    w.unix_ms -= 3_600_000;
    rt.block_on(b.commit(w)).unwrap();
    // Past the active window by the remote's clock too (gc and rollback
    // judge by it; the writer's clock is only recorded), and within the
    // lease's ttl: held, not expired.
    let dir = v.url.strip_prefix("dir:").expect("a dir: volume");
    let f = std::fs::File::options().write(true).open(Path::new(dir).join(format!("gen-{g:020}"))).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(600)).unwrap();
    g
}

/// A daemon on this host holding the writer lease (serving, or stopped
/// with changes not uploaded) is refused a rollback as one elsewhere is:
/// it would keep the disk from before the rollback and meet a conflict.
#[test]
fn dir_rollback_refuses_under_a_lease_held_on_this_host() {
    let v = dir_vol();
    let rt = rt();
    import(&v);
    let here = volume::commit::host_name();
    let g = commit_leased_an_hour_ago(&rt, &v, &here);
    let e = history::rollback(&v.url, 1, &RollbackOptions { remote: v.remote.clone(), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("lease") && e.contains(&here) && e.contains("--force"), "{e}");
    let rb = history::rollback(&v.url, 1, &RollbackOptions { force: true, remote: v.remote.clone() }).unwrap();
    assert_eq!(rb.generation, g + 1);
}

/// A daemon on another host holding the writer lease serves the volume
/// however long ago it last committed: rollback refuses and gc repacks
/// nothing (it still runs and deletes what is dead) unless forced; a forced repack carries that
/// lease forward.
#[test]
fn dir_gc_and_rollback_respect_a_lease_held_elsewhere() {
    let v = dir_vol();
    let rt = rt();
    let expect = import(&v);
    let g = commit_leased_an_hour_ago(&rt, &v, "elsewhere");
    let e = history::rollback(&v.url, 1, &RollbackOptions { remote: v.remote.clone(), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("lease") && e.contains("elsewhere") && e.contains("--force"), "{e}");
    // Four small packs and a limit of one: a repack is due.
    let opts = GcOptions { max_packs: 1, ..gc_opts(&v, 1) };
    let rep = volume::gc::gc(&v.url, &opts).unwrap();
    assert!(rep.repack_generation.is_none(), "{rep:?}");
    assert!(rep.repack_skipped.as_deref().is_some_and(|s| s.contains("lease") && s.contains("elsewhere")), "{rep:?}");
    assert_eq!((rep.newest, rep.kept.as_slice()), (g, &[g][..]), "gc still runs (and deletes): {rep:?}");
    // Forced, a rollback goes through, and leaves the lease where it is.
    let rb = history::rollback(&v.url, 1, &RollbackOptions { force: true, remote: v.remote.clone() }).unwrap();
    assert_eq!(rb.generation, g + 1);
    let m = rt.block_on(open(&rt, &v).load_generation(rb.generation)).unwrap();
    assert_eq!(m.lease.map(|l| (l.host, l.taken_at)), Some(("elsewhere".to_string(), g)));
    let rep = volume::gc::gc(&v.url, &GcOptions { force: true, ..opts }).unwrap();
    let g2 = rep.repack_generation.expect("forced, gc repacks");
    let m = rt.block_on(open(&rt, &v).load_generation(g2)).unwrap();
    let lease = m.lease.expect("the repack carries the lease");
    assert_eq!((lease.host.as_str(), lease.taken_at), ("elsewhere", g));
    let view = driveblk::volume::lease::lease_status(&v.url, &v.remote).unwrap();
    assert_eq!(view.standing, driveblk::volume::lease::Standing::Held, "{}", view.describe());
    assert_eq!(image_of(&rt, &open(&rt, &v)), expect);
}

/// Anything of the volume in the Drive trash stops gc before it deletes
/// anything: the plan cannot see it (a newest generation there makes an
/// older one look newest, a fork registration or hold there keeps
/// nothing), and restored it would name deleted packs. Restored first,
/// gc runs and the volume reads back whole.
#[test]
fn gdrive_gc_stops_while_anything_is_in_the_trash() {
    let v = drive_vol();
    let rt = rt();
    let (expect, w) = committed(&v, "w", 3, 1);
    assert_eq!(w.close(Duration::from_secs(30)), 0);
    drop(w);
    let env = v.drive.as_ref().unwrap();
    let (id, name, _) = env.emu.ui_find("gen-").pop().unwrap();
    env.emu.ui_trash(&id);
    let before = env.emu.ui_find("");
    let e = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap_err().to_string();
    assert!(e.contains("in the Drive trash") && e.contains(&name), "{e}");
    assert_eq!(env.emu.ui_find(""), before, "gc changed something");
    env.emu.ui_restore(&id);
    let report = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(!report.deleted.is_empty(), "{report:?}");
    assert!(image_of(&rt, &open(&rt, &v)) == expect);
}

/// The newest generation moved to the Drive trash: readers see the one
/// before as newest, and a writer taking the lease on it finds the next
/// slot taken; it says the generation is in the trash (not "another
/// writer", not "start again"). Restored, the next writer serves it.
#[test]
fn gdrive_a_trashed_newest_generation_is_named_to_the_next_writer() {
    let v = drive_vol();
    let (expect, w) = committed(&v, "w", 1, 1);
    assert_eq!(w.close(Duration::from_secs(30)), 0);
    drop(w);
    let env = v.drive.as_ref().unwrap();
    let (id, name, _) = env.emu.ui_find("gen-").pop().unwrap();
    env.emu.ui_trash(&id);
    let mut o = cache_opts(&v.tmp.path().join("other"), v.remote.clone());
    o.boot_profile = driveblk::tier::boot::BootProfileMode::Off;
    let e = driveblk::tier::open_volume(&v.url, o.clone()).err().expect("opened past a trashed generation").to_string();
    assert!(e.contains(&format!("{name} is in the Drive trash")), "{e}");
    env.emu.ui_restore(&id);
    let s = driveblk::tier::open_volume(&v.url, o).unwrap();
    assert!(support::read_all(&*s).unwrap() == expect);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
}

/// A fork deleted for good keeps its generation in the origin until its
/// registration goes: gc names the registration to delete, and once it is
/// deleted the generation goes at the next gc.
#[test]
fn gc_names_the_registration_that_keeps_a_deleted_forks_generation() {
    let v = dir_vol();
    let rt = rt();
    let (_, s) = committed(&v, "a", 3, 70);
    assert_eq!(s.close(Duration::from_secs(30)), 0);
    drop(s);
    let r = open(&rt, &v);
    let from = r.generation() - 2;
    let id = "cd".repeat(16);
    let fork = serde_json::json!({"volume_id": id, "url": "dir:/deleted/fork", "from_generation": from,
                                  "created_unix_ms": 1});
    let key = format!("fork-{id}.json");
    rt.block_on(r.remote.put(&key, PutBody::from_bytes(fork.to_string()))).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["gc", &v.url, "--dry-run", "--grace", "0s", "--keep-generations", "1"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains(&format!("delete {key} in this volume's folder")), "{out}");
    let manifest = format!("gen-{from:020}");
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(!rep.deleted.iter().any(|(k, _)| *k == manifest), "the registered fork's generation is kept");
    rt.block_on(r.remote.delete(&key)).unwrap();
    let rep = volume::gc::gc(&v.url, &gc_opts(&v, 1)).unwrap();
    assert!(rep.deleted.iter().any(|(k, _)| *k == manifest), "{:?}", rep.deleted);
}
