//! A remote that hangs or goes away never hangs the guest (issue:
//! hardening, "nothing waits forever on the remote"). A real daemon, a
//! libblkio client, and the Drive emulator made a silent peer (requests
//! read, never answered) or a refusing one; and a `dir:` remote behind a
//! one-hour simulated latency.
//!
//! - cached data keeps flowing while the remote is silent; an uncached read
//!   fails only once `--remote-wait` has passed, never before, never hangs;
//! - a silence shorter than the budget is invisible to the guest under
//!   `--on-remote-error wait` (reads wait it out; writes and flushes are
//!   local), and the changes go up once the remote is back;
//! - `eio` fails an uncached read at the first refused attempt;
//! - SIGTERM with a silent remote exits within `--sync-timeout` plus a
//!   bounded profile save, and the changes it could not upload go up at the
//!   next start;
//! - a cache holding the volume starts serving within the budget when the
//!   remote never answers;
//! - a writethrough FLUSH is waited for while its upload moves, however
//!   slowly, and fails once nothing has moved for `--remote-wait`.
//!
//! `SOAK=1` stretches the outage of the hot set to two minutes and holds an
//! uncached read through a 30 s silence (the figures).

mod common;
mod gdrive_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gdrive_support::{start, Creds, DriveEnv};

const LEN: usize = 4 << 20;
const CHUNK: u64 = 256 << 10;

/// A 4 MiB raw image of random bytes (no zero chunk: every chunk needs
/// the remote) imported as `gdrive:/vms/disk`.
fn setup(env: &DriveEnv) -> (Vec<u8>, Vec<String>) {
    let img = env.dir.path().join("disk.raw");
    let data = gdrive_support::data(7, LEN);
    std::fs::write(&img, &data).unwrap();
    let flags =
        vec!["--drive-api-url".to_string(), env.emu.base_url(), "--drive-credentials".into(), path(&env.creds_file)];
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["import", "--quiet", "--chunk-size", "256K", &path(&img), "gdrive:/vms/disk"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "import: {}", String::from_utf8_lossy(&o.stderr));
    (data, flags)
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn serve(env: &DriveEnv, flags: &[String], cache: &str, extra: &[&str]) -> common::Daemon {
    let cache = path(&env.dir.path().join(cache));
    let mut a: Vec<&str> = vec!["--volume", "gdrive:/vms/disk", "--format", "raw", "--cache-dir", &cache];
    if !extra.contains(&"--boot-profile") {
        a.extend_from_slice(&["--boot-profile", "off"]);
    }
    a.extend_from_slice(&["--readahead-chunks", "0", "--sync-interval", "1"]);
    a.extend_from_slice(extra);
    a.extend(flags.iter().map(|s| s.as_str()));
    common::Daemon::start(&env.dir.path().join("sock"), &a)
}

fn soak() -> bool {
    std::env::var_os("SOAK").is_some_and(|v| v != "0")
}

#[test]
fn a_silent_remote_fails_only_uncached_reads_and_only_after_the_budget() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (data, flags) = setup(&env);
    let d = serve(&env, &flags, "cache", &["--remote-wait", "4", "--sync-timeout", "3"]);
    let mut c = common::Client::connect(&d.socket, 1);
    // The guest's hot set: the first half of the disk.
    let half = LEN / 2;
    assert_eq!(c.read(0, half).unwrap(), data[..half]);

    env.emu.faults().set_silent(true);
    for round in 0..20 {
        let off = (round * 97 * 4096) % (half - 65536);
        assert_eq!(c.read(off as u64, 65536).expect("a cached read failed"), data[off..off + 65536]);
    }
    // Writes and flushes are local: they never wait on the remote.
    let page = gdrive_support::data(99, 4096);
    c.write(8192, &page).expect("a write to a cached chunk failed");
    c.flush().expect("a flush failed while the remote was silent");
    // An uncached chunk: fails, but only once the budget is spent.
    let t0 = Instant::now();
    let r = c.read(half as u64 + CHUNK, 4096);
    let waited = t0.elapsed();
    assert!(r.is_err(), "a read of an uncached chunk cannot succeed while the remote is silent");
    assert!(waited >= Duration::from_millis(3500), "the read failed before the 4 s budget: {waited:?}");
    // One budget for the request, however many fetches it tries in turn
    // (its run of sub-frames, its own sub-frames again, the chunk).
    assert!(waited < Duration::from_millis(5500), "the read was held past its 4 s budget: {waited:?}");
    // Cached data still flows after the failure.
    let mut want = data[..65536].to_vec();
    want[8192..12288].copy_from_slice(&page);
    assert_eq!(c.read(0, 65536).unwrap(), want);
    drop(c);

    // SIGTERM with the remote still silent: the final sync gives up at
    // --sync-timeout (3 s), the profile is off; the exit is prompt.
    let t0 = Instant::now();
    let st = d.stop();
    assert!(t0.elapsed() < Duration::from_secs(25), "stop took {:?}", t0.elapsed());
    assert!(st.success(), "a stop that could not upload still exits cleanly: {st}");

    // The remote is back: the next start uploads what was flushed, and
    // another machine (an empty cache) reads it.
    env.emu.faults().set_silent(false);
    let d = serve(&env, &flags, "cache", &[]);
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["sync", "gdrive:/vms/disk", "--cache-dir", &path(&env.dir.path().join("cache")), "--timeout", "60"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sync: {}", String::from_utf8_lossy(&o.stderr));
    assert!(d.stop().success());
    let d = serve(&env, &flags, "cache-b", &[]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 65536).unwrap(), want, "the write made during the outage reached the remote");
}

#[test]
fn an_outage_shorter_than_the_budget_is_invisible_to_the_guest() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (data, flags) = setup(&env);
    let outage = if soak() { Duration::from_secs(120) } else { Duration::from_secs(6) };
    // The default budget (45 s): a remote back within 30 s is invisible.
    let d = serve(&env, &flags, "cache", &["--num-queues", "2"]);
    let mut c = common::Client::connect(&d.socket, 2);
    let hot = LEN / 2;
    assert_eq!(c.read(0, hot).unwrap(), data[..hot]);

    env.emu.faults().set_silent(true);
    let t0 = Instant::now();
    let mut want = data.clone();
    let mut n = 0u64;
    // The hot set keeps working for the whole outage: reads, writes, flushes.
    while t0.elapsed() < outage {
        let off = ((n * 7919 * 4096) as usize) % (hot - 8192);
        let page = gdrive_support::data(n, 4096);
        c.write(off as u64, &page).expect("a guest write failed during the outage");
        want[off..off + 4096].copy_from_slice(&page);
        assert_eq!(c.read(off as u64, 8192).expect("a guest read failed during the outage"), want[off..off + 8192]);
        if n % 8 == 7 {
            c.flush().expect("a guest flush failed during the outage");
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    // A read of an uncached chunk while the remote is still silent waits,
    // and completes once the remote is back within the budget.
    let faults = env.emu.faults();
    let off = hot + CHUNK as usize * 3;
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(if soak() { Duration::from_secs(30) } else { Duration::from_secs(3) });
            faults.set_silent(false);
        });
        c.read(off as u64, 4096)
    });
    assert_eq!(got.expect("a read waiting out the outage failed"), want[off..off + 4096]);
    c.flush().unwrap();
    assert!(n > 10);
    // Everything written during the outage goes up.
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["sync", "gdrive:/vms/disk", "--cache-dir", &path(&env.dir.path().join("cache")), "--timeout", "60"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(o.status.success(), "sync: {}", String::from_utf8_lossy(&o.stderr));
    drop(c);
    assert!(d.stop().success());
    let d = serve(&env, &flags, "cache-b", &[]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert!(c.read(0, hot).unwrap() == want[..hot], "another machine sees every write made during the outage");
}

/// `--cache writethrough`: a FLUSH returns once its data is on Drive. On a
/// link whose upload outlasts `--remote-wait` it is waited for, since its
/// bytes keep going; on a silent Drive (connections taken, requests never
/// answered) it fails once nothing has moved for `--remote-wait`, not at an
/// upload attempt's own deadline (a minute and more); the data stays in the
/// cache and goes up once Drive answers, and another machine reads it.
#[test]
fn a_writethrough_flush_waits_for_a_slow_drive_and_fails_on_a_silent_one() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (_, flags) = setup(&env);
    let d = serve(&env, &flags, "cache", &["--cache", "writethrough", "--remote-wait", "3", "--sync-timeout", "3"]);
    let mut c = common::Client::connect(&d.socket, 1);
    // The whole disk rewritten over an 8 Mbit/s link: about 4 s of upload.
    let mut data = gdrive_support::data(11, LEN);
    c.write(0, &data).unwrap();
    env.emu.faults().set_bandwidth(Some(8_000_000));
    let t0 = Instant::now();
    c.flush().expect("a writethrough FLUSH whose upload moves is waited for");
    let took = t0.elapsed();
    env.emu.faults().set_bandwidth(None);
    assert!(took > Duration::from_secs(3), "the upload was quicker than the 3 s budget: {took:?}");

    env.emu.faults().set_silent(true);
    let page = gdrive_support::data(12, 4096);
    c.write(8192, &page).expect("a write to a cached chunk failed");
    data[8192..12288].copy_from_slice(&page);
    let t0 = Instant::now();
    let r = c.flush_within(Duration::from_secs(60)).expect("the FLUSH was held a minute on a silent Drive");
    let waited = t0.elapsed();
    assert_ne!(r, 0, "a FLUSH cannot be durable on a silent Drive");
    assert!(waited >= Duration::from_millis(2900), "the FLUSH failed before the 3 s budget: {waited:?}");
    assert!(waited < Duration::from_secs(10), "the FLUSH was held past its budget: {waited:?}");
    assert_eq!(c.read(0, 65536).unwrap(), data[..65536], "cached data still flows");

    env.emu.faults().set_silent(false);
    c.flush().expect("once Drive answers, the FLUSH goes through");
    drop(c);
    assert!(d.stop().success());
    let d = serve(&env, &flags, "cache-b", &[]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert!(c.read(0, LEN).unwrap() == data, "another machine reads what was flushed");
}

/// `--cache writethrough` on an uplink slower than 1 Mbit/s: the kernel
/// takes a megabyte or more of the upload into the socket's send buffer at
/// once and sends it for many seconds, during which the client takes
/// nothing more. What the far end acknowledges still moves, and the FLUSH
/// is waited for (before, it failed once the bytes taken had stood still
/// for their drain allowance at 1 Mbit/s plus `--remote-wait`). The wire
/// is made slow for real: the test runs again in a network namespace of
/// its own whose loopback sends at 0.8 Mbit/s (`tc`'s token bucket).
#[test]
fn a_writethrough_flush_on_an_uplink_slower_than_its_socket_buffers_is_waited_for() {
    const INSIDE: &str = "DRIVEBLK_TEST_IN_NETNS";
    let ip = |args: &str| {
        let o = Command::new("ip").args(args.split(' ')).output().unwrap();
        assert!(o.status.success(), "ip {args}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let shape = |on: bool| {
        let args = if on {
            "qdisc add dev lo root tbf rate 800kbit burst 16kb latency 500ms"
        } else {
            "qdisc del dev lo root"
        };
        let o = Command::new("tc").args(args.split(' ')).output().unwrap();
        assert!(o.status.success(), "tc {args}: {}", String::from_utf8_lossy(&o.stderr));
    };
    if std::env::var_os(INSIDE).is_none() {
        let me = std::env::current_exe().unwrap();
        let name = "a_writethrough_flush_on_an_uplink_slower_than_its_socket_buffers_is_waited_for";
        let o = Command::new("unshare")
            .arg("-n")
            .arg(me)
            .args(["--exact", name, "--nocapture"])
            .env(INSIDE, "1")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && out.contains("1 passed"), "in its network namespace: {out}");
        eprintln!("{}", out.lines().filter(|l| l.contains("the FLUSH took")).collect::<Vec<_>>().join("\n"));
        return;
    }
    ip("link set lo mtu 1500");
    ip("link set lo up");
    let env = start(driveemu::Config::default(), Creds::User);
    let (_, flags) = setup(&env);
    let d = serve(&env, &flags, "cache", &["--cache", "writethrough", "--remote-wait", "3", "--sync-timeout", "3"]);
    let mut c = common::Client::connect(&d.socket, 1);
    // 2 MiB at 0.8 Mbit/s: about 21 s of upload.
    let mut data = gdrive_support::data(7, LEN);
    let new = gdrive_support::data(13, 2 << 20);
    c.write(0, &new).unwrap();
    data[..new.len()].copy_from_slice(&new);
    shape(true);
    let t0 = Instant::now();
    let r = c.flush_within(Duration::from_secs(120)).expect("the FLUSH was held two minutes");
    let took = t0.elapsed();
    shape(false);
    assert_eq!(r, 0, "a FLUSH whose upload moves failed after {took:?}");
    assert!(took > Duration::from_secs(15), "the upload was quicker than the link: {took:?}");
    eprintln!("the FLUSH took {took:?}");
    drop(c);
    assert!(d.stop().success());
    let d = serve(&env, &flags, "cache-b", &[]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert!(c.read(0, LEN).unwrap() == data, "another machine reads what was flushed");
}

#[test]
fn a_refusing_remote_is_waited_out_under_wait_and_fails_at_once_under_eio() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (data, flags) = setup(&env);
    let faults = env.emu.faults();
    let at = |k: u64| (k * CHUNK) as usize;

    // wait: connections refused for 4 s, well past the few quick retries a
    // call makes on its own; the read retries within its 20 s budget.
    let d = serve(&env, &flags, "cache", &["--remote-wait", "20"]);
    let mut c = common::Client::connect(&d.socket, 1);
    faults.set_down(true);
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(4));
            faults.set_down(false);
        });
        c.read(at(2) as u64, 4096)
    });
    assert_eq!(
        got.expect("under wait, a 4 s refusal within a 20 s budget must not fail the read"),
        data[at(2)..at(2) + 4096]
    );
    drop(c);
    assert!(d.stop().success());

    // eio: the first refused attempt fails the read.
    let d = serve(&env, &flags, "cache-eio", &["--remote-wait", "20", "--on-remote-error", "eio"]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 65536).unwrap(), data[..65536]);
    faults.set_down(true);
    let t0 = Instant::now();
    assert!(c.read(at(5) as u64, 4096).is_err(), "the remote refuses: the read fails");
    assert!(t0.elapsed() < Duration::from_secs(3), "eio waited {:?}", t0.elapsed());
    assert_eq!(c.read(0, 65536).unwrap(), data[..65536], "cached data still flows");
    faults.set_down(false);
    assert_eq!(c.read(at(5) as u64, 4096).unwrap(), data[at(5)..at(5) + 4096]);
    drop(c);
    assert!(d.stop().success());

    // wait, refused past the budget: the read fails at its budget, once,
    // however many fetches it tries in turn (its run of sub-frames, its
    // own sub-frames again, the chunk).
    let d = serve(&env, &flags, "cache-past", &["--remote-wait", "3"]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 65536).unwrap(), data[..65536]);
    // The packs' sub-frame indexes come in the background: then a miss
    // fetches a part first.
    std::thread::sleep(Duration::from_secs(1));
    faults.set_down(true);
    let t0 = Instant::now();
    assert!(c.read(at(6) as u64 + 8192, 4096).is_err(), "the remote refuses past the budget: the read fails");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(2500), "the read failed before its 3 s budget: {waited:?}");
    assert!(waited < Duration::from_millis(4500), "the read was held past its 3 s budget: {waited:?}");
    faults.set_down(false);
    assert_eq!(c.read(at(6) as u64 + 8192, 4096).unwrap(), data[at(6) + 8192..at(6) + 12288]);
}

/// The report: a cache holding the whole volume, a remote that
/// answers after an hour — `serve` must create its socket and serve.
#[test]
fn a_full_cache_serves_when_the_remote_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let data = gdrive_support::data(3, LEN);
    std::fs::write(&img, &data).unwrap();
    let vol = format!("dir:{}", dir.path().join("vol").display());
    let cache = path(&dir.path().join("cache"));
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_driveblk")).args(args).output().unwrap();
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["import", "--quiet", "--chunk-size", "256K", &path(&img), &vol]);
    run(&["hydrate", &vol, "--cache-dir", &cache]);
    let sock = dir.path().join("sock");
    let t0 = Instant::now();
    let d = common::Daemon::start(
        &sock,
        &[
            "--volume",
            &vol,
            "--format",
            "raw",
            "--cache-dir",
            &cache,
            "--remote-latency-ms",
            "3600000",
            "--remote-wait",
            "3",
            "--sync-timeout",
            "2",
        ],
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "serve took {:?} to listen", t0.elapsed());
    let mut c = common::Client::connect(&sock, 1);
    let mut off = 0;
    while off < LEN {
        assert_eq!(c.read(off as u64, 1 << 20).unwrap(), data[off..off + (1 << 20)]);
        off += 1 << 20;
    }
    c.write(0, &[7u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    let t0 = Instant::now();
    assert!(d.stop().success());
    assert!(t0.elapsed() < Duration::from_secs(20), "stop took {:?}", t0.elapsed());
}

/// `hydrate --pin`: pinned chunks are fetched whole, never evicted by a
/// small SSD tier, kept across restarts, and serve the guest through an
/// outage; status calls the volume offline-ready. `--pin profile` pins the
/// chunks the newest boot profile touches.
#[test]
fn pinned_hot_set_stays_local_through_evictions_and_outages() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (data, flags) = setup(&env);
    let cache = path(&env.dir.path().join("cache"));
    let driveblk = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_driveblk")).args(args).args(&flags).output().unwrap();
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let out = driveblk(&["hydrate", "gdrive:/vms/disk", "--cache-dir", &cache, "--pin", "0+512K", "--quiet"]);
    assert!(out.contains("pinned 2 chunks"), "{out}");
    // A 1 MiB SSD tier (4 chunks) and a guest reading the whole 4 MiB disk:
    // everything unpinned is evicted over and over, the pins stay.
    let d = serve(&env, &flags, "cache", &["--ssd-cache", "1M", "--ram-cache", "0", "--remote-wait", "3"]);
    let mut c = common::Client::connect(&d.socket, 1);
    for _ in 0..2 {
        for off in (0..LEN).step_by(1 << 20) {
            assert_eq!(c.read(off as u64, 1 << 20).unwrap(), data[off..off + (1 << 20)]);
        }
    }
    std::thread::sleep(Duration::from_millis(1500)); // the status file is written every second
    let v: serde_json::Value = serde_json::from_slice(
        &Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(["status", "--cache-dir", &cache, "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(v["ssd"]["evictions"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["hot_set"]["pinned"], 2, "{v}");
    assert_eq!(v["hot_set"]["offline_ready"], true, "{v}");
    env.emu.faults().set_silent(true);
    assert_eq!(c.read(0, 512 << 10).expect("a pinned range failed during the outage"), data[..512 << 10]);
    assert!(c.read(1 << 20, 4096).is_err(), "an evicted chunk needs the remote");
    env.emu.faults().set_silent(false);
    drop(c);
    assert!(d.stop().success());

    // --pin profile: a boot records a profile (the first 1 MiB read), then
    // another cache pins exactly the chunks it touched.
    let d = serve(&env, &flags, "cache-rec", &["--boot-profile", "record"]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 1 << 20).unwrap(), data[..1 << 20]);
    drop(c);
    assert!(d.stop().success());
    let cache2 = path(&env.dir.path().join("cache-2"));
    let out = driveblk(&["hydrate", "gdrive:/vms/disk", "--cache-dir", &cache2, "--pin", "profile", "--quiet"]);
    assert!(out.contains("pinned 4 chunks"), "{out}");
}

/// A stop when nothing can go up ends promptly instead of holding the
/// shutdown (`systemctl stop`, a laptop's power-off) for all of
/// `--sync-timeout`: write-back paused (Drive full), the network gone
/// (connections refused past `--remote-wait`), or a silent Drive (nothing
/// of the upload moved for `--remote-wait`; each attempt alone would wait
/// a minute and more). The log says the changes
/// stay in the cache; the next start uploads them.
#[test]
fn a_stop_that_cannot_upload_does_not_wait_out_the_sync_timeout() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (data, flags) = setup(&env);
    let faults = env.emu.faults();
    let mut want = data.clone();
    let cache = path(&env.dir.path().join("cache"));
    let sync = || {
        let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(["sync", "gdrive:/vms/disk", "--cache-dir", &cache, "--timeout", "60"])
            .args(&flags)
            .output()
            .unwrap();
        assert!(o.status.success(), "sync: {}", String::from_utf8_lossy(&o.stderr));
    };
    type Fault<'a> = (&'a str, &'a dyn Fn(bool), &'a str);
    let full = |on: bool| faults.set_storage_quota(on.then_some(1));
    let down = |on: bool| faults.set_down(on);
    let silent = |on: bool| faults.set_silent(on);
    let cases: [Fault; 3] = [
        ("full", &full, "write-back is paused"),
        ("down", &down, "nothing reached the remote"),
        ("silent", &silent, "nothing reached the remote"),
    ];
    for (round, (name, fault, why)) in cases.into_iter().enumerate() {
        let log = env.dir.path().join(format!("{name}.log"));
        let mut a: Vec<&str> = vec!["--volume", "gdrive:/vms/disk", "--format", "raw", "--cache-dir", &cache];
        a.extend(["--boot-profile", "off", "--sync-interval", "1", "--remote-wait", "4", "--sync-timeout", "120"]);
        a.extend(flags.iter().map(|s| s.as_str()));
        let mut d = common::Daemon::start_logged(&env.dir.path().join("sock"), &a, &[], Some(&log));
        let mut c = common::Client::connect(&d.socket, 1);
        // Cached first: the write needs no fetch.
        let off = round * CHUNK as usize;
        assert_eq!(c.read(off as u64, 4096).unwrap(), want[off..off + 4096]);
        fault(true);
        let page = gdrive_support::data(50 + round as u64, 4096);
        c.write(off as u64, &page).unwrap();
        c.flush().unwrap();
        want[off..off + 4096].copy_from_slice(&page);
        // Write-back tries, and fails.
        std::thread::sleep(Duration::from_secs(3));
        drop(c);
        let mut child = d.child.take().unwrap();
        let t0 = Instant::now();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = common::wait_timeout(&mut child, Duration::from_secs(200));
        let took = t0.elapsed();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(st.success(), "{name}: a stop that cannot upload still exits cleanly: {st}: {text}");
        assert!(took < Duration::from_secs(60), "{name}: the stop waited {took:?} for uploads that cannot go: {text}");
        assert!(text.contains(why), "{name}: the log says why nothing goes up: {text}");
        // Said by the close itself (an upload the stop cut short says so
        // too, but the stop may come between two tries).
        assert!(
            text.contains("they stay in the cache directory and are uploaded at the next start"),
            "{name}: the log says what stays in the cache: {text}"
        );
        // The next start, the remote back, uploads them.
        fault(false);
        let d = serve(&env, &flags, "cache", &[]);
        sync();
        assert!(d.stop().success());
    }
    let d = serve(&env, &flags, "cache-b", &[]);
    let mut c = common::Client::connect(&d.socket, 1);
    assert_eq!(c.read(0, 3 * CHUNK as usize).unwrap(), want[..3 * CHUNK as usize], "every write reached the remote");
}
