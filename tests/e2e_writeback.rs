//! Write-back through the whole daemon (libblkio client, qcow2 volume, the
//! `dir:` remote behind a 20 ms link): a writer fills and flushes while
//! generations are cut and uploaded, and the daemon is killed with -9 at
//! a random point. Then, alternately:
//! - the cache is deleted and a fresh export of the remote must pass
//!   `qemu-img check` and hold exactly the disk of one acknowledged FLUSH
//!   (never a mix of older and newer writes);
//! - the daemon restarts on the same cache: every flushed write is there,
//!   and a clean stop uploads them all (a fresh export then equals it).
//!
//! 20 rounds by default (`WRITEBACK_ROUNDS` to change; `SOAK=1` runs 200).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Client, Daemon};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 64 << 20;
const BLOCK: usize = 64 << 10;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_driveblk")
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The guest view of the remote's newest generation, through a fresh
/// export (no cache), checked by qemu-img.
fn remote_view(dir: &Path, url: &str) -> Vec<u8> {
    let q = dir.join("export.qcow2");
    let raw = dir.join("export.raw");
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&raw);
    run_ok(bin(), &["export", url, q.to_str().unwrap(), "--quiet"]);
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&q).output().unwrap();
    // 3: leaked clusters only, which a kill -9 in the middle of a flush may
    // leave (as a crash of QEMU does); 2 is corruption.
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check of the remote's generation failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", q.to_str().unwrap(), raw.to_str().unwrap()]);
    std::fs::read(&raw).unwrap()
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.capacity as usize);
    let mut off = 0;
    while off < c.capacity {
        let n = (c.capacity - off).min(4 << 20) as usize;
        out.extend(c.read(off, n).unwrap());
        off += n as u64;
    }
    out
}

/// Which acknowledged (or in-flight) flush the image `got` equals: the
/// epoch K such that `base` + every write of epochs ≤ K is `got`.
fn matching_epoch(base: &[u8], epochs: &[Vec<(u64, Vec<u8>)>], got: &[u8]) -> Option<usize> {
    let mut state = base.to_vec();
    if state == got {
        return Some(0);
    }
    for (k, writes) in epochs.iter().enumerate() {
        for (off, data) in writes {
            state[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        if state == got {
            return Some(k + 1);
        }
    }
    None
}

#[test]
fn kill_9_during_write_back_leaves_generations_of_whole_flushes() {
    let rounds: u64 = std::env::var("WRITEBACK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var("SOAK").as_deref() == Ok("1") { 200 } else { 20 });
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), &SIZE.to_string()],
    );
    let url = format!("dir:{}", d.path().join("remote/vol").display());
    run_ok(bin(), &["import", img.to_str().unwrap(), &url, "--chunk-size", "256K", "--quiet"]);
    let sock = d.path().join("sock");
    let mut base = vec![0u8; SIZE as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xD15C);
    let mut committed_rounds = 0;
    for round in 0..rounds {
        let cache = d.path().join(format!("cache-{round}"));
        let args = [
            "--volume",
            &url,
            "--format",
            "qcow2",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--sync-interval",
            "1",
            "--remote-latency-ms",
            "20",
            "--boot-profile",
            "off",
            // The machine of an even round is gone with its lease (its
            // changes pending): its successor takes over, as a person would.
            "--force-takeover",
        ];
        let mut daemon = Daemon::start(&sock, &args);
        let mut c = Client::connect(&sock, 1);
        // Epochs of writes, each followed by an acknowledged flush.
        let n_epochs = rng.random_range(3..30);
        let mut epochs: Vec<Vec<(u64, Vec<u8>)>> = Vec::new();
        for k in 0..n_epochs {
            let writes: Vec<(u64, Vec<u8>)> = (0..rng.random_range(1..8))
                .map(|i| {
                    // Mostly a hot region, so later epochs rewrite chunks
                    // of a cut that is still uploading.
                    let blocks = if rng.random_bool(0.7) { 64 } else { SIZE / BLOCK as u64 };
                    let off = rng.random_range(0..blocks) * BLOCK as u64;
                    (off, common::pattern(round * 1_000_000 + k * 100 + i, BLOCK))
                })
                .collect();
            for (off, data) in &writes {
                c.write(*off, data).unwrap();
            }
            c.flush().unwrap();
            epochs.push(writes);
            std::thread::sleep(Duration::from_millis(rng.random_range(0..60)));
        }
        // Unflushed writes in flight, then kill -9.
        let base_addr = c.region.addr;
        let unflushed: Vec<u64> = (0..8).map(|_| rng.random_range(0..SIZE / BLOCK as u64) * BLOCK as u64).collect();
        for (i, off) in unflushed.iter().enumerate() {
            c.buf()[i * BLOCK..(i + 1) * BLOCK].fill(0xEE);
            c.queues[0].write(*off, (base_addr + i * BLOCK) as *const u8, BLOCK, 0, blkio::ReqFlags::empty());
        }
        let mut comps: Vec<_> = (0..1).map(|_| std::mem::MaybeUninit::uninit()).collect();
        let mut t = Duration::from_millis(1);
        let _ = c.queues[0].do_io(&mut comps, 0, Some(&mut t), None);
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        kill_9(&mut daemon);
        drop(c);
        let _ = std::fs::remove_file(&sock);

        if round % 2 == 0 {
            // The machine is gone: only the remote is left.
            std::fs::remove_dir_all(&cache).unwrap();
            let got = remote_view(d.path(), &url);
            let k = matching_epoch(&base, &epochs, &got).unwrap_or_else(|| {
                panic!("round {round}: the remote's newest generation is not the disk of any flush (a torn generation)")
            });
            committed_rounds += (k > 0) as u32;
            base = got;
        } else {
            // The daemon comes back on the same cache: every acknowledged
            // write is there (only blocks hit by the unflushed ones may differ).
            let daemon = Daemon::start(&sock, &args);
            let mut c = Client::connect(&sock, 1);
            let local = read_all(&mut c);
            let mut want = base.clone();
            for (off, data) in epochs.iter().flatten() {
                want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            for (off, data) in epochs.iter().flatten() {
                if unflushed.iter().any(|u| u == off) {
                    continue;
                }
                assert!(
                    local[*off as usize..*off as usize + data.len()] == want[*off as usize..*off as usize + data.len()],
                    "round {round}: a flushed write at {off} was lost"
                );
            }
            drop(c);
            assert!(daemon.stop().success());
            let _ = std::fs::remove_file(&sock);
            // The clean stop uploaded everything the restarted daemon served.
            let got = remote_view(d.path(), &url);
            assert!(got == local, "round {round}: after a clean stop the remote differs from what was served");
            std::fs::remove_dir_all(&cache).unwrap();
            base = got;
        }
    }
    assert!(committed_rounds > 0, "no round committed a generation before the kill: the test exercised nothing");
}

fn info_generation(url: &str) -> u64 {
    let out = Command::new(bin()).args(["info", url, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["generation"].as_u64().unwrap()
}

#[test]
fn driveblk_sync_uploads_now_through_the_daemon_or_from_a_stopped_cache() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]);
    let url = format!("dir:{}", d.path().join("remote/vol").display());
    run_ok(bin(), &["import", img.to_str().unwrap(), &url, "--quiet"]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    // An interval long enough that only `sync` can cut a generation.
    let args =
        ["--volume", &url, "--format", "qcow2", "--cache-dir", cache.to_str().unwrap(), "--sync-interval", "3600"];
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    // The first FLUSH cuts at once; later ones wait for the interval.
    c.write(0, &common::pattern(3, 4096)).unwrap();
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let g0 = info_generation(&url);
    let a = common::pattern(1, 1 << 20);
    c.write(1 << 20, &a).unwrap();
    c.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(info_generation(&url), g0, "no cut before the interval");
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "60"]);
    assert!(info_generation(&url) > g0, "sync through the running daemon committed a generation");
    let got = remote_view(d.path(), &url);
    assert!(got[1 << 20..2 << 20] == a[..], "the remote holds the synced write");
    // Changes left by a daemon that died go up with `sync` alone.
    let b = common::pattern(2, 1 << 20);
    c.write(4 << 20, &b).unwrap();
    c.flush().unwrap();
    kill_9(&mut daemon);
    drop(c);
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "60"]);
    let got = remote_view(d.path(), &url);
    assert!(got[4 << 20..5 << 20] == b[..], "the stopped cache's changes reached the remote");
    // A cache directory that holds nothing (a typo, the daemon's is
    // elsewhere) is an error, not "synced 0 B".
    let typo = d.path().join("cache-typo");
    let o = Command::new(bin()).args(["sync", &url, "--cache-dir", typo.to_str().unwrap()]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("holds no cache of the volume"), "{e}");
    assert!(!typo.exists(), "sync made an empty cache directory");
}

/// A stop whose `--sync-timeout` runs out while a generation uploads is a
/// normal stop: the log says changes are left and reports no error (the
/// cancelled upload used to log one about half the time); `driveblk sync`
/// then uploads them.
#[test]
fn a_stop_that_cuts_an_upload_short_is_not_an_error() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 11, 64 << 20, &[]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let log = d.path().join("serve.log");
    // The stop waits for no upload: it lands in the middle of reading the
    // 48 MiB the guest changed.
    let args = [
        "--volume",
        &url,
        "--format",
        "raw",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--boot-profile",
        "off",
        "--sync-interval",
        "3600",
        "--sync-timeout",
        "0",
    ];
    let daemon = Daemon::start_logged(&sock, &args, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let new: Vec<u8> = random_bytes(&mut rng, 48 << 20);
    for (i, piece) in new.chunks(256 << 10).enumerate() {
        c.write((i * (256 << 10)) as u64, piece).unwrap();
    }
    c.flush().unwrap(); // the first FLUSH cuts a generation at once
    drop(c);
    assert!(daemon.stop().success(), "the stop exits cleanly");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("local changes not uploaded yet"), "the stop says changes are left: {text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "a stop cut short by its sync timeout logged errors: {errors:#?}");
    // The next start uploads them.
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "120"]);
    let mut want = orig;
    want[..48 << 20].copy_from_slice(&new);
    assert!(raw_export(d.path(), &url) == want, "the changes went up after the stop");
}

/// A stop uploads what the guest flushed while the guest keeps running
/// (a restart under a running VM pauses its disk only for the final sync
/// of what it wrote meanwhile): right after SIGTERM, with a paced upload
/// of 8 MiB under way, the guest's reads, writes and FLUSHes are still
/// answered; the stop then commits them too.
#[test]
fn a_stop_uploads_while_the_guest_still_runs() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 21, 32 << 20, &[]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let log = d.path().join("serve.log");
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    // 8 MiB of random bytes at 2 MiB/s: about 4 s of upload.
    args.extend(["--bwlimit", "2M:off"]);
    let mut daemon = Daemon::start_logged(&sock, &args, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let mut want = orig;
    // The first FLUSH cuts at once; the next ones wait for the interval.
    c.write(0, &common::pattern(1, 4096)).unwrap();
    c.flush().unwrap();
    want[..4096].copy_from_slice(&common::pattern(1, 4096));
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "60"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let big = random_bytes(&mut rng, 8 << 20);
    c.write(8 << 20, &big).unwrap();
    c.flush().unwrap();
    want[8 << 20..16 << 20].copy_from_slice(&big);
    let mut child = daemon.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(1000));
    assert!(child.try_wait().unwrap().is_none(), "the daemon is still uploading");
    // The guest still runs: its requests are answered during the upload.
    assert!(c.read(8 << 20, 4096).unwrap() == big[..4096], "a read during the stop's upload");
    let late = common::pattern(3, 64 << 10);
    c.write(24 << 20, &late).expect("a write during the stop's upload");
    c.flush().expect("a FLUSH during the stop's upload");
    want[24 << 20..(24 << 20) + late.len()].copy_from_slice(&late);
    drop(c);
    let st = common::wait_timeout(&mut child, Duration::from_secs(60));
    assert!(st.success(), "the stop exits cleanly: {st}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the flushed changes are on the remote"), "the upload before the stop finished: {text}");
    assert!(raw_export(d.path(), &url) == want, "the stop committed every flushed write, the late one too");
}

/// A stop whose first upload outlasts the 30 s wait for the guest's next
/// FLUSH still keeps the guest running until what it flushed meanwhile is
/// committed. The wait for that FLUSH counted from the signal, so it gave
/// up the moment the long upload committed, before the guest's next FLUSH
/// could cut: the guest was let go and its disk paused for the whole final
/// sync (minutes for a Windows guest's backlog on a slow uplink, past its
/// ~60 s disk reset). Here a 10 MiB cut uploads for ~40 s at SIGTERM while
/// the guest writes and flushes without a pause (always a write pending
/// between FLUSHes, so only a FLUSH can cut).
#[test]
fn a_stop_whose_upload_outlasts_the_flush_wait_keeps_the_guest_running() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 23, 32 << 20, &[]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let log = d.path().join("serve.log");
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    // 10 MiB of random bytes at 256 KiB/s: about 40 s of upload.
    args.extend(["--bwlimit", "256K:off"]);
    let mut daemon = Daemon::start_logged(&sock, &args, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let mut want = orig;
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    let big = random_bytes(&mut rng, 10 << 20);
    for (i, piece) in big.chunks(4 << 20).enumerate() {
        c.write((i * (4 << 20)) as u64, piece).unwrap();
    }
    // The first FLUSH cuts at once: the 10 MiB start uploading.
    c.flush().unwrap();
    want[..big.len()].copy_from_slice(&big);
    std::thread::sleep(Duration::from_millis(500));
    let mut child = daemon.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    // The guest: a 4 KiB write into another chunk each time, a FLUSH 300
    // ms later, until the daemon lets it go (a request not answered
    // within 5 s) or for 100 s at most.
    let (mut acked, mut unanswered) = (Vec::new(), None);
    let mut k = 0u64;
    let let_go = loop {
        let off = (16 << 20) + (k % 256) * (64 << 10);
        let page = common::pattern(100 + k, 4096);
        if c.write_within(off, &page, Duration::from_secs(5)) != Some(0) {
            unanswered = Some((off, page));
            break t0.elapsed();
        }
        // Completed: the stop's own flush keeps it, FLUSHed or not.
        acked.push((off, page));
        std::thread::sleep(Duration::from_millis(300));
        if c.flush_within(Duration::from_secs(5)) != Some(0) {
            break t0.elapsed();
        }
        k += 1;
        assert!(t0.elapsed() < Duration::from_secs(100), "the stop never let the guest go");
    };
    let text = std::fs::read_to_string(&log).unwrap();
    drop(c);
    let st = common::wait_timeout(&mut child, Duration::from_secs(60));
    assert!(st.success(), "the stop exits cleanly: {st}");
    assert!(let_go > Duration::from_secs(35), "the guest was let go before the long upload ended: {let_go:?}");
    // Let go only once phase one ended, never stalled before it.
    let ended = text.find("shutting down: finishing in-flight requests");
    assert!(ended.is_some(), "a guest request went unanswered while the stop still uploaded: {text}");
    let phase_one = &text[..ended.unwrap()];
    assert!(!phase_one.contains("did not flush"), "the stop gave up waiting for a FLUSH the guest sent: {text}");
    assert!(
        phase_one.contains("the flushed changes are on the remote"),
        "the upload while the guest ran did not end with its flushed changes committed: {text}"
    );
    assert!(
        phase_one.matches("write-back: committed a generation").count() >= 2,
        "the guest's FLUSHes during the stop were not committed while it ran: {text}"
    );
    let put = |want: &mut Vec<u8>, (off, page): &(u64, Vec<u8>)| {
        want[*off as usize..*off as usize + page.len()].copy_from_slice(page);
    };
    for w in &acked {
        put(&mut want, w);
    }
    // A write sent as the guest was let go may or may not have run.
    let got = raw_export(d.path(), &url);
    let also = unanswered.map(|w| {
        let mut v = want.clone();
        put(&mut v, &w);
        v
    });
    assert!(got == want || also.is_some_and(|v| got == v), "the stop committed every completed write");
}

/// A discard on a raw volume (Windows' retrim: the whole disk) dirties
/// only the chunks that held data: the volume's zero chunks stay as they
/// are (the whole disk used to turn dirty, every chunk a cut must go
/// through). A discard repeated while a cut holding zeroed chunks uploads
/// copies no zeroes aside (it used to copy each whole chunk into the
/// cache's `frozen` file: up to the image's size of zeroes on the SSD).
#[test]
fn a_discard_dirties_only_chunks_that_held_data_and_copies_no_zeroes_aside() {
    let d = tempfile::tempdir().unwrap();
    // 32 MiB: data in the first MiB, zeroes after it.
    let img = d.path().join("disk.raw");
    let mut want = vec![0u8; 32 << 20];
    want[..1 << 20].copy_from_slice(&common::pattern(61, 1 << 20));
    std::fs::write(&img, &want).unwrap();
    let url = format!("dir:{}", d.path().join("remote/vol").display());
    run_ok(bin(), &["import", img.to_str().unwrap(), &url, "--format", "raw", "--chunk-size", "64K", "--quiet"]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    // 8 MiB of random bytes at 1 MiB/s: the cut uploads for about 8 s.
    args.extend(["--bwlimit", "1M:off"]);
    let daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    c.discard(0, 16 << 20).unwrap();
    want[..16 << 20].fill(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(62);
    let big = random_bytes(&mut rng, 8 << 20);
    c.write(16 << 20, &big).unwrap();
    want[16 << 20..24 << 20].copy_from_slice(&big);
    // The first FLUSH cuts at once.
    c.flush().unwrap();
    let st: serde_json::Value =
        serde_json::from_str(&common::run_ok(&["status", "--cache-dir", cache.to_str().unwrap(), "--json"])).unwrap();
    // 16 chunks of data zeroed, 128 written: not the 256 discarded.
    assert_eq!(st["chunks"]["dirty"].as_u64(), Some(16 + 128), "{st}");
    // Again, during the upload of the cut that holds them zeroed.
    c.discard(0, 16 << 20).unwrap();
    c.flush().unwrap();
    let frozen = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(cache.join("frozen")).unwrap()) * 512;
    assert!(frozen < 64 << 10, "a discard during the upload copied {frozen} bytes of zeroes aside");
    drop(c);
    assert!(daemon.stop().success());
    assert!(raw_export(d.path(), &url) == want, "the remote holds the discards and the write");
}

/// `export --cache-dir` of a clean cache left behind by newer generations
/// (the laptop's, after the desktop wrote for a week) exports the newest
/// generation, taking from the cache only the chunks it did not change;
/// a cache with local changes still exports its own generation with them.
#[test]
fn export_through_an_old_clean_cache_gives_the_newest_disk() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 31, 8 << 20, &[]);
    let (cache_a, cache_b) = (d.path().join("cache-a"), d.path().join("cache-b"));
    let sock = d.path().join("sock");
    let mut want = orig.clone();
    // A writes the first chunk and reads the whole disk (all cached, clean).
    let daemon = Daemon::start(&sock, &kill_9_args(&url, "raw", &cache_a));
    let mut c = Client::connect(&sock, 1);
    let x = common::pattern(41, 64 << 10);
    c.write(0, &x).unwrap();
    c.flush().unwrap();
    want[..x.len()].copy_from_slice(&x);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(daemon.stop().success());
    // B rewrites that chunk and another one: a newer generation.
    let daemon = Daemon::start(&sock, &kill_9_args(&url, "raw", &cache_b));
    let mut c = Client::connect(&sock, 1);
    let y = common::pattern(42, 64 << 10);
    c.write(0, &y).unwrap();
    c.write(4 << 20, &y).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(daemon.stop().success());
    want[..y.len()].copy_from_slice(&y);
    want[4 << 20..(4 << 20) + y.len()].copy_from_slice(&y);
    assert!(raw_export(d.path(), &url) == want, "the remote holds B's disk");
    let out = d.path().join("through-a.raw");
    run_ok(bin(), &["export", &url, out.to_str().unwrap(), "--cache-dir", cache_a.to_str().unwrap(), "--quiet"]);
    assert!(std::fs::read(&out).unwrap() == want, "export through A's old clean cache is not the newest disk");
}

/// The newest generation of the raw volume at `url`, through a fresh
/// export (no cache) into `dir`.
fn raw_export(dir: &Path, url: &str) -> Vec<u8> {
    let out = dir.join("export.raw");
    run_ok(bin(), &["export", url, out.to_str().unwrap(), "--quiet"]);
    std::fs::read(&out).unwrap()
}

/// `n` bytes from `rng` (a byte at a time is slow in a debug build).
fn random_bytes(rng: &mut impl Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// The packs in the volume at `remote` (a `dir:` remote's folder): name
/// and size.
fn packs_in(remote: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(remote)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("pack-"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect()
}

#[test]
fn an_upload_cut_short_by_a_kill_9_resumes_at_the_next_start() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 13, 128 << 20, &[]);
    let remote = d.path().join("remote/vol");
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let before = packs_in(&remote);
    // 128 MiB of fresh data is 8 packs of 16 MiB, 4 going up at once over
    // an 8 MiB/s uplink: the first four land after about 8 s, the rest 8 s
    // later.
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    args.extend(["--bwlimit", "8M:off"]);
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let new: Vec<u8> = random_bytes(&mut rng, 128 << 20);
    for (i, piece) in new.chunks(1 << 20).enumerate() {
        c.write((i << 20) as u64, piece).unwrap();
    }
    c.flush().unwrap(); // the first FLUSH cuts a generation at once
                        // Kill once half has landed and the cache has had time to record it
                        // (it saves what went up at most every 2 s), long before the rest.
    let t0 = std::time::Instant::now();
    while packs_in(&remote).len() < before.len() + 4 {
        assert!(t0.elapsed() < Duration::from_secs(120), "4 packs had not landed after 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(cache.join("uploaded").exists(), "the cache keeps a record of what went up");
    drop(c);
    kill_9(&mut daemon);
    let landed: u64 = packs_in(&remote).iter().filter(|(k, _)| !before.contains_key(*k)).map(|(_, n)| n).sum();
    assert!(landed >= 16 << 20, "a pack had landed before the kill ({landed} bytes)");
    // The next start uploads the rest only.
    let at_kill = packs_in(&remote);
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "300"]);
    let again: u64 = packs_in(&remote).iter().filter(|(k, _)| !at_kill.contains_key(*k)).map(|(_, n)| n).sum();
    assert!(
        again <= 96 << 20,
        "after the kill -9, the next start uploaded {again} bytes of packs for 128 MiB of changes \
         ({landed} had landed before the kill): what went up was not resumed"
    );
    let mut want = orig;
    want[..128 << 20].copy_from_slice(&new);
    assert!(raw_export(d.path(), &url) == want, "the volume holds every change after the resumed upload");
}

/// A second SIGTERM while the stop uploads exits at once; what the guest
/// flushed stays in the cache and goes up at the next start (README, "At
/// SIGTERM/SIGINT ...": an upload cut short by the user).
#[test]
fn a_second_signal_cuts_the_stops_upload_short_and_the_next_start_uploads_it() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 19, 32 << 20, &[]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    // 16 MiB of fresh data at 1 MiB/s up: the stop's upload takes 16 s.
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    args.extend(["--bwlimit", "1M:off"]);
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let new: Vec<u8> = random_bytes(&mut rng, 16 << 20);
    for (i, piece) in new.chunks(1 << 20).enumerate() {
        c.write((i << 20) as u64, piece).unwrap();
    }
    c.flush().unwrap();
    drop(c);
    let parent = info_generation(&url);
    let mut child = daemon.child.take().unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = common::wait_timeout(&mut child, Duration::from_secs(30));
    assert!(t0.elapsed() < Duration::from_secs(5), "the second signal took {:?} to end the stop", t0.elapsed());
    assert!(!st.success(), "a stop cut short exits with an error: {st}");
    assert_eq!(info_generation(&url), parent, "the 16 s upload was not cut short: nothing tested");
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "300"]);
    let mut want = orig;
    want[..16 << 20].copy_from_slice(&new);
    assert!(raw_export(d.path(), &url) == want, "the changes flushed before the stop were lost");
}

/// A resumed commit checks the packs it reuses again right before its
/// create: the daemon is frozen (SIGSTOP: a laptop's lid closed) while the
/// rest of a resumed upload goes up; meanwhile the reused pack ages past
/// what gc spares (its time set back 25 h) and gc deletes it. Woken, the
/// commit must not name it: its chunks go up again and the volume reads
/// back whole.
#[test]
fn a_reused_pack_gc_deleted_while_the_writer_slept_is_uploaded_again() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 17, 64 << 20, &[]);
    let remote = d.path().join("remote/vol");
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let before = packs_in(&remote);
    // 64 MiB of fresh data is 4 packs of 16 MiB at 4 MiB/s: one lands
    // every 4 s.
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    args.extend(["--bwlimit", "4M:off"]);
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let new: Vec<u8> = random_bytes(&mut rng, 64 << 20);
    for (i, piece) in new.chunks(1 << 20).enumerate() {
        c.write((i << 20) as u64, piece).unwrap();
    }
    c.flush().unwrap(); // the first FLUSH cuts a generation at once
    let t0 = std::time::Instant::now();
    while packs_in(&remote).len() < before.len() + 1 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no pack had landed after 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cache records what went up at most every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    drop(c);
    kill_9(&mut daemon);
    let reused: Vec<String> = packs_in(&remote).into_keys().filter(|k| !before.contains_key(k)).collect();
    // The next start resumes: it reuses what landed and uploads the rest,
    // and is frozen once the first of those has landed.
    let daemon = Daemon::start(&sock, &args);
    let generation = |url: &str| {
        let o = Command::new(bin()).args(["info", "--json", url]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["generation"].as_u64().unwrap()
    };
    let parent = generation(&url);
    let mut sync = Command::new(bin())
        .args(["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "180"])
        .stderr(std::fs::File::create(d.path().join("sync.stderr")).unwrap())
        .spawn()
        .unwrap();
    let at_restart = packs_in(&remote);
    let t0 = std::time::Instant::now();
    while packs_in(&remote).len() < at_restart.len() + 1 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the resumed upload landed nothing after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = daemon.child.as_ref().unwrap().id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert_eq!(generation(&url), parent, "the resumed commit landed before the daemon was frozen");
    // A day passes for what landed before the kill; gc deletes it.
    let day_ago = std::time::SystemTime::now() - Duration::from_secs(25 * 3600);
    for k in &reused {
        std::fs::File::options().write(true).open(remote.join(k)).unwrap().set_modified(day_ago).unwrap();
    }
    let o = Command::new(bin()).args(["gc", &url, "--grace", "0s", "--json"]).output().unwrap();
    let rep = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "gc: {}", String::from_utf8_lossy(&o.stderr));
    assert!(reused.iter().all(|k| rep.contains(k.as_str())), "gc did not delete the reused packs: {rep}");
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let st = common::wait_timeout(&mut sync, Duration::from_secs(200));
    let err = std::fs::read_to_string(d.path().join("sync.stderr")).unwrap();
    assert!(st.success(), "the woken daemon's sync failed: {err}");
    let mut want = orig;
    want[..64 << 20].copy_from_slice(&new);
    assert!(raw_export(d.path(), &url) == want, "the commit named a pack gc had deleted");
    assert!(daemon.stop().success());
}

/// A stop that leaves page writes keeps which pages changed, so the next
/// start uploads patches; a kill -9 of that next run after it wrote other
/// pages of the same chunks loses none of them (the record was good for
/// that one start only).
#[test]
fn page_writes_after_a_restart_survive_a_kill_9() {
    let d = tempfile::tempdir().unwrap();
    let (mut want, url) = raw_volume(d.path(), 15, 8 << 20, &[]);
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    // 16 KiB/s up: nothing finishes uploading while the test writes.
    let mut args = kill_9_args(&url, "raw", &cache).to_vec();
    args.extend(["--bwlimit", "16K:off", "--sync-timeout", "0"]);
    let mut write_pages = |c: &mut Client, at: u64| {
        for chunk in 0..64u64 {
            let off = chunk * (64 << 10) + at;
            let page = random_bytes(&mut rng, 4096);
            c.write(off, &page).unwrap();
            want[off as usize..off as usize + 4096].copy_from_slice(&page);
        }
        c.flush().unwrap();
    };
    let daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    write_pages(&mut c, 0);
    drop(c);
    assert!(daemon.stop().success());
    assert!(cache.join("dirty-pages").is_file(), "the stop kept which pages changed");
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    write_pages(&mut c, 8192);
    drop(c);
    kill_9(&mut daemon);
    run_ok(bin(), &["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "120"]);
    assert!(raw_export(d.path(), &url) == want, "a page written after the restart was lost");
}

#[test]
fn writethrough_survives_losing_the_machine_right_after_a_flush() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), "32M"]);
    let url = format!("dir:{}", d.path().join("remote/vol").display());
    run_ok(bin(), &["import", img.to_str().unwrap(), &url, "--chunk-size", "256K", "--quiet"]);
    let sock = d.path().join("sock");
    let cache = d.path().join("cache");
    let args = [
        "--volume",
        &url,
        "--format",
        "qcow2",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache",
        "writethrough",
        "--remote-latency-ms",
        "20",
        "--boot-profile",
        "off",
    ];
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut want = vec![0u8; 32 << 20];
    for k in 0..5u64 {
        let off = (k * 3 + 1) * BLOCK as u64 * 5;
        let data = common::pattern(900 + k, BLOCK);
        c.write(off, &data).unwrap();
        want[off as usize..off as usize + BLOCK].copy_from_slice(&data);
        c.flush().unwrap();
    }
    // The machine is lost the moment the last FLUSH returned.
    kill_9(&mut daemon);
    drop(c);
    std::fs::remove_dir_all(&cache).unwrap();
    let got = remote_view(d.path(), &url);
    assert!(got == want, "a FLUSH returned in writethrough mode before its data was on the remote");
}

/// kill -9 between a write and its FLUSH, which then reaches the next
/// daemon (as QEMU resends it after a reconnect): that FLUSH must cover the
/// write. The bug this guards: the write's page, in a chunk the cache did
/// not hold, was known only to the dead daemon's memory; the next one
/// acknowledged the FLUSH and read the page back as the volume's old bytes.
#[test]
fn a_write_completed_before_a_kill_9_is_covered_by_the_next_daemons_flush() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 7, 4 << 20, &[]);
    let sock = d.path().join("sock");
    let cache = d.path().join("cache");
    let args = kill_9_args(&url, "raw", &cache);
    let mut want = orig.clone();
    // Whole pages into cold chunks (no fetch: dirty in part), a page into a
    // chunk already written, and a partial page (read-modify-write).
    let writes: [(u64, usize); 4] = [
        (5 * BLOCK as u64 + 3 * 4096, 4096),
        (9 * BLOCK as u64, 8192),
        (5 * BLOCK as u64, 4096),
        (20 * BLOCK as u64 + 512, 1024),
    ];
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    for (k, &(off, len)) in writes.iter().enumerate() {
        let data = common::pattern(500 + k as u64, len);
        c.write(off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    kill_9(&mut daemon);
    drop(c);
    drop(daemon);
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    c.flush().unwrap();
    for &(off, len) in &writes {
        assert!(
            c.read(off, len).unwrap() == want[off as usize..off as usize + len],
            "write at {off} lost after kill -9 + flush"
        );
    }
    // And durable: once more after another kill -9, then the whole disk.
    kill_9(&mut daemon);
    drop(c);
    drop(daemon);
    let _daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the disk differs from every acknowledged write after two kill -9");
}

/// FLUSHes that follow first writes into chunks a hydrated cache holds
/// clean (each such write first makes "dirty" durable in the cache's
/// journal, with no sync of the data file, and the qcow2 FLUSH with no
/// metadata to write syncs once), then kill -9 right after an
/// acknowledged FLUSH, and again with writes not yet flushed: the next
/// daemon on the same cache serves every acknowledged write, and its
/// clean stop uploads them all (a chunk whose dirty record were lost
/// would read back from the cache but never reach the remote).
#[test]
fn flushes_after_first_writes_into_clean_chunks_survive_kill_9() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    let img = d.path().join("disk.qcow2");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xF1);
    let orig: Vec<u8> = random_bytes(&mut rng, 8 << 20);
    std::fs::write(&raw, &orig).unwrap();
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()]);
    let url = format!("dir:{}", d.path().join("remote/vol").display());
    run_ok(bin(), &["import", img.to_str().unwrap(), &url, "--chunk-size", "64K", "--quiet"]);
    let cache = d.path().join("cache");
    run_ok(bin(), &["hydrate", &url, "--cache-dir", cache.to_str().unwrap(), "--quiet"]);
    let sock = d.path().join("sock");
    let args = kill_9_args(&url, "qcow2", &cache);
    let mut want = orig.clone();
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    let mut k = 0u64;
    let mut write_some = |c: &mut Client, want: &mut Vec<u8>, n: usize| {
        for _ in 0..n {
            let off = rng.random_range(0..(8 << 20) / 4096) * 4096;
            let data = common::pattern(900 + k, 4096);
            k += 1;
            c.write(off, &data).unwrap();
            want[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
    };
    // 8 MiB of 64 KiB chunks: most of these writes are a chunk's first.
    for _ in 0..40 {
        write_some(&mut c, &mut want, 8);
        c.flush().unwrap();
    }
    kill_9(&mut daemon);
    drop(c);
    drop(daemon);
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "an acknowledged FLUSH lost writes to kill -9");
    // More first writes, flushed, then some not flushed, then kill -9.
    for _ in 0..10 {
        write_some(&mut c, &mut want, 8);
        c.flush().unwrap();
    }
    write_some(&mut c, &mut want, 8);
    kill_9(&mut daemon);
    drop(c);
    drop(daemon);
    let daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    c.flush().unwrap();
    assert!(read_all(&mut c) == want, "writes completed before kill -9 are not all there after restart");
    drop(c);
    assert!(daemon.stop().success());
    let _ = std::fs::remove_dir_all(&cache);
    assert!(remote_view(d.path(), &url) == want, "the clean stop did not upload every write");
}

/// A small first write into a chunk the cache holds clean rides in the
/// journal record that makes the chunk dirty, so its FLUSH syncs nothing
/// more: after a host crash that kept the record but not the written page
/// (here: kill -9, then the page put back to its old bytes in the cache's
/// data file), the next daemon writes it again from the record.
#[test]
fn a_flushed_small_first_write_survives_its_page_missing_after_a_crash() {
    small_first_writes_survive_lost_pages(false);
}

/// The same with an encrypted cache (`--encrypt-cache`): its records carry
/// the written pages as ciphertext.
#[test]
fn an_encrypted_caches_flushed_small_first_write_survives_its_page_missing_after_a_crash() {
    small_first_writes_survive_lost_pages(true);
}

fn small_first_writes_survive_lost_pages(encrypted: bool) {
    let d = tempfile::tempdir().unwrap();
    let keyfile = d.path().join("key");
    std::fs::write(&keyfile, rand::random::<[u8; 32]>()).unwrap();
    let key: &[&str] = if encrypted { &["--key-file", keyfile.to_str().unwrap()] } else { &[] };
    let enc: &[&str] = if encrypted { &["--encrypt"] } else { &[] };
    let (orig, url) = raw_volume(d.path(), 0xF2, 8 << 20, &[enc, key].concat());
    let cache = d.path().join("cache");
    let sock = d.path().join("sock");
    let cache_key: &[&str] = if encrypted { &["--encrypt-cache"] } else { &[] };
    let args = [&kill_9_args(&url, "raw", &cache)[..], key, cache_key].concat();
    // The cache holds the volume clean, and the page bytes it holds for
    // the places written below are kept, to put back after the crash.
    let daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == orig);
    drop(c);
    assert!(daemon.stop().success());
    let offs = [3u64 << 16, (37 << 16) + 8192, (100 << 16) + 4096];
    let file = std::fs::OpenOptions::new().read(true).write(true).open(cache.join("data")).unwrap();
    let held: Vec<Vec<u8>> = offs
        .iter()
        .map(|&off| {
            let mut page = vec![0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, off).unwrap();
            assert_eq!(page == orig[off as usize..off as usize + 4096], !encrypted);
            page
        })
        .collect();
    let mut want = orig.clone();
    let mut daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    for (i, &off) in offs.iter().enumerate() {
        let data = common::pattern(700 + i as u64, 4096);
        c.write(off, &data).unwrap();
        c.flush().unwrap();
        want[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    kill_9(&mut daemon);
    drop(c);
    drop(daemon);
    for (&off, page) in offs.iter().zip(&held) {
        std::os::unix::fs::FileExt::write_all_at(&file, page, off).unwrap();
    }
    drop(file);
    let daemon = Daemon::start(&sock, &args);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "a flushed write missing from the data file was not written again");
    drop(c);
    assert!(daemon.stop().success());
    let out = d.path().join("export.raw");
    run_ok(bin(), &[&["export", &url, out.to_str().unwrap(), "--quiet"], key].concat());
    assert!(std::fs::read(&out).unwrap() == want, "the clean stop did not upload every write");
}

/// A raw volume of `size` random bytes (from `seed`) on a `dir:` remote in
/// `dir`, 64 KiB chunks, `import` given `extra`: the image and the URL.
fn raw_volume(dir: &Path, seed: u64, size: usize, extra: &[&str]) -> (Vec<u8>, String) {
    let img = dir.join("disk.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let orig: Vec<u8> = random_bytes(&mut rng, size);
    std::fs::write(&img, &orig).unwrap();
    let url = format!("dir:{}", dir.join("remote/vol").display());
    let args =
        [&["import", img.to_str().unwrap(), &url, "--format", "raw", "--chunk-size", "64K", "--quiet"], extra].concat();
    run_ok(bin(), &args);
    (orig, url)
}

/// Under an upload limit a boot profile's upload (it only speeds up the
/// next cold start) does not hold the guest's changes back: a generation
/// cut while an 8 MiB profile goes up at `1M:off` is committed in about
/// the time its own bytes take, before the profile is saved, and the
/// profile still goes up after it.
#[test]
fn a_generation_goes_up_ahead_of_a_boot_profile_under_an_upload_limit() {
    let d = tempfile::tempdir().unwrap();
    let (orig, url) = raw_volume(d.path(), 31, 16 << 20, &[]);
    let (cache, sock) = (d.path().join("cache"), d.path().join("sock"));
    let args = ["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--sync-interval", "1"];
    let limits = ["--boot-profile-window", "1", "--first-boot-whole-below", "0", "--bwlimit", "1M:off"];
    let daemon = Daemon::start(&sock, &[&args[..], &limits].concat());
    let status = || {
        let o =
            Command::new(bin()).args(["status", "--cache-dir", cache.to_str().unwrap(), "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let wait_for = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        let t0 = std::time::Instant::now();
        loop {
            let v = status();
            if done(&v) {
                return v;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what} after 60 s: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut c = Client::connect(&sock, 1);
    // The boot: 8 MiB of bytes a profile cannot shrink, 8 s up at 1 MiB/s.
    for i in 0..8u64 {
        let got = c.read(i << 20, 1 << 20).unwrap();
        assert!(got == orig[(i as usize) << 20..((i + 1) as usize) << 20], "MiB {i}");
    }
    wait_for("the boot is still recorded", &|v| v["boot_profile"]["recording"] == false);
    std::thread::sleep(Duration::from_millis(500));
    // The guest's change, cut at its FLUSH while the profile goes up.
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    c.write(8 << 20, &random_bytes(&mut rng, 512 << 10)).unwrap();
    c.flush().unwrap();
    let t0 = std::time::Instant::now();
    let v = wait_for("no generation committed", &|v| v["sync"]["generations_committed"].as_u64() >= Some(1));
    let took = t0.elapsed();
    eprintln!("the generation committed {took:?} after its FLUSH; boot profile: {}", v["boot_profile"]);
    assert_eq!(v["boot_profile"]["saved"], 0, "the profile went up before the guest's changes");
    assert!(took < Duration::from_secs(4), "the guest's changes waited {took:?} behind the boot profile");
    wait_for("the profile is not saved", &|v| v["boot_profile"]["saved"].as_u64() >= Some(1));
    assert!(daemon.stop().success());
}

/// Kills the daemon with SIGKILL and reaps it: no shutdown path runs.
fn kill_9(daemon: &mut Daemon) {
    let mut child = daemon.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `serve` arguments of the kill -9 tests: no sync of its own for an hour
/// and no boot profile, so only the guest's FLUSHes make anything durable.
fn kill_9_args<'a>(url: &'a str, format: &'a str, cache: &'a std::path::Path) -> [&'a str; 10] {
    [
        "--volume",
        url,
        "--format",
        format,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--sync-interval",
        "3600",
        "--boot-profile",
        "off",
    ]
}
