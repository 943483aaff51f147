//! Several daemons on one host, one per VM disk (a Windows disk and a
//! Linux disk, each its own volume): what they share must not let one
//! starve or block another. A sibling's clean cache never takes the disk
//! space another daemon's changes not uploaded yet need; a metrics port
//! already served by a sibling is refused before the volume is opened; one
//! volume started twice is refused naming the daemon serving it; daemons
//! sharing one Drive account back off under its request limit; under a
//! shared `--bwlimit`, what someone waits for goes ahead of what nobody
//! does.

mod common;
mod gdrive_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{pattern, run_ok, serve_fails, Client, Daemon};
use serde_json::Value;

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A raw image of `len` pattern bytes imported as the `dir:` volume `name`
/// under `dir`: its bytes and URL.
fn raw_volume(dir: &Path, name: &str, len: usize, seed: u64) -> (Vec<u8>, String) {
    let img = dir.join(format!("{name}.raw"));
    let data = common::make_raw(&img, len, seed);
    let url = format!("dir:{}", dir.join("remote").join(name).display());
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);
    std::fs::remove_file(&img).unwrap();
    (data, url)
}

/// The live status of the daemon whose cache is `cache`.
fn status(cache: &Path) -> Value {
    serde_json::from_str(&run_ok(&["status", "--cache-dir", cache.to_str().unwrap(), "--json"])).unwrap()
}

fn u(v: &Value, p: &str) -> u64 {
    v.pointer(p).and_then(Value::as_u64).unwrap_or_else(|| panic!("{p} missing in {v}"))
}

/// A daemon serving the `dir:` volume `url` with its cache in `cache`: the
/// defaults but for what keeps the test's byte counts exact (no boot
/// profile nor its first-boot stream, no readahead, no periodic cut).
fn start(sock: &Path, url: &str, cache: &Path) -> Daemon {
    let cache = cache.to_str().unwrap();
    Daemon::start(
        sock,
        &[
            "--volume",
            url,
            "--format",
            "raw",
            "--cache-dir",
            cache,
            "--boot-profile",
            "off",
            "--readahead-chunks",
            "0",
            "--sync-interval",
            "3600",
        ],
    )
}

/// Two daemons with their caches on one small disk (a 96 MiB tmpfs), the
/// "Windows" one having read its whole 128 MiB disk, whose clean chunks
/// fill the cache disk; the "Linux" one holds nothing clean to evict.
struct FullDisk {
    linux: Daemon,
    windows: Daemon,
    /// The Windows guest's connection.
    wc: Client,
    /// The Windows disk's bytes.
    win: Vec<u8>,
    win_cache: std::path::PathBuf,
    _mount: Mount,
    _dir: tempfile::TempDir,
}

fn full_disk() -> FullDisk {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let d = tempfile::tempdir().unwrap();
    let (win, win_url) = raw_volume(d.path(), "win10", 128 << 20, 3);
    let (_, linux_url) = raw_volume(d.path(), "linux", 16 << 20, 4);
    let mnt = d.path().join("cachefs");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let mount = Mount(mnt.clone());
    let (win_cache, linux_cache) = (mnt.join("win10"), mnt.join("linux"));
    let linux = start(&d.path().join("linux.sock"), &linux_url, &linux_cache);
    let windows = start(&d.path().join("win.sock"), &win_url, &win_cache);
    // The Windows guest reads its whole disk: every read right.
    let mut wc = Client::connect(&windows.socket, 1);
    for i in 0..128usize {
        let got = wc.read((i as u64) << 20, 1 << 20).unwrap_or_else(|e| panic!("windows read of MiB {i}: {e}"));
        assert!(got == win[i << 20..(i + 1) << 20], "windows read of MiB {i} is wrong");
    }
    FullDisk { linux, windows, wc, win, win_cache, _mount: mount, _dir: d }
}

/// Two daemons with their caches on one small disk (a 96 MiB tmpfs): the
/// "Windows" daemon reads its whole 128 MiB disk, whose clean chunks would
/// fill the cache disk (its cap, 64G by default, is far above it); the
/// "Linux" daemon, which holds nothing clean to evict, then writes. Its
/// writes must land: clean data leaves the disk's reserve free at every
/// install, and gives back what a sibling's changes took of it, so that
/// writes of more than the reserve land too, one after another.
#[test]
fn a_siblings_clean_cache_leaves_room_for_another_daemons_changes() {
    // Dropped last to first: the daemons before the mount, the mount before its directory.
    let FullDisk { _dir: _d, _mount: _m, linux, windows, mut wc, win, win_cache } = full_disk();

    // The Linux guest writes 2 MiB at a time, 5 times: 10 MiB, twice the
    // disk's reserve (a twentieth of it). The first lands in the reserve
    // the Windows daemon's installs left free; before each of the others,
    // the Windows daemon has given back what the last took (its sweep
    // evicts clean chunks once the disk has less than the reserve free),
    // or a daemon that never gives way fails the third.
    let mut lc = Client::connect(&linux.socket, 1);
    let mut written = Vec::new();
    for k in 0..5u64 {
        if k > 0 {
            let ws = status(&win_cache);
            let min_free = u(&ws, "/ssd/min_free");
            assert_eq!(min_free, (96 << 20) / 20, "a twentieth of the disk: {ws}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let free = u(&status(&win_cache), "/ssd/free_bytes");
                if free >= min_free {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the windows daemon's clean chunks never gave way: {free} bytes free, reserve {min_free}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let data = pattern(10 + k, 2 << 20);
        lc.write(k * (2 << 20), &data).unwrap_or_else(|e| {
            panic!(
                "linux write {k} failed ({e}) on a disk the windows daemon's clean data filled: {}",
                status(&win_cache)["ssd"]
            )
        });
        lc.flush().unwrap_or_else(|e| panic!("linux flush {k} failed ({e})"));
        written.push(data);
    }
    for (k, data) in written.iter().enumerate() {
        assert!(lc.read(k as u64 * (2 << 20), 2 << 20).unwrap() == *data, "linux write {k} reads back");
    }
    // Windows reads go on, from its cache or the remote.
    for i in [0usize, 64, 127] {
        assert!(wc.read((i as u64) << 20, 1 << 20).unwrap() == win[i << 20..(i + 1) << 20]);
    }
    drop((lc, wc));
    assert!(linux.stop().success());
    assert!(windows.stop().success());
}

/// Two daemons given one metrics port (a config file copied from the
/// first volume's): the second is refused at once, naming the way out,
/// before it opens its volume (which takes the writer lease and, on Drive,
/// may take minutes), instead of failing after it, at every restart.
#[test]
fn a_metrics_port_a_sibling_serves_is_refused_before_the_volume_is_opened() {
    let d = tempfile::tempdir().unwrap();
    let (_, a_url) = raw_volume(d.path(), "a", 4 << 20, 1);
    let (_, b_url) = raw_volume(d.path(), "b", 4 << 20, 2);
    let (a_cache, b_cache) = (d.path().join("cache-a"), d.path().join("cache-b"));
    let a = Daemon::start(
        &d.path().join("a.sock"),
        &["--volume", &a_url, "--format", "raw", "--cache-dir", a_cache.to_str().unwrap(), "--metrics", "127.0.0.1:0"],
    );
    let url = status(&a_cache)["metrics_url"].as_str().expect("the metrics URL").to_string();
    let addr = url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).unwrap().to_string();
    let err = serve_fails(
        &d.path().join("b.sock"),
        &["--volume", &b_url, "--format", "raw", "--cache-dir", b_cache.to_str().unwrap(), "--metrics", &addr],
    );
    assert!(err.contains(&addr) && err.contains("in use by another process"), "{err}");
    assert!(err.contains("a port of its own") && err.contains("port 0"), "{err}");
    assert!(!b_cache.join("state").exists(), "the cache was opened before the port was checked: {err}");
    // The first daemon's endpoint is still its own.
    assert!(a.stop().success());
}

/// One volume started twice on one host (a unit and a hand-started
/// `serve`, or two configs naming one volume): the second is refused, and
/// the refusal names the daemon already serving it, whether it would share
/// that daemon's cache directory (the default one, found from another
/// spelling of the URL) or use one of its own (then the writer lease
/// refuses it: never with a takeover as the way, which would fork what the
/// running daemon writes).
#[test]
fn one_volume_served_twice_on_one_host_is_refused_naming_the_daemon_serving_it() {
    let d = tempfile::tempdir().unwrap();
    let (_, url) = raw_volume(d.path(), "win10", 4 << 20, 5);
    let root = d.path().join("cache-root");
    let env = [("DRIVEBLK_CACHE", root.to_str().unwrap())];
    let first = Daemon::start_env(
        &d.path().join("first.sock"),
        &["--volume", &url, "--format", "raw", "--metrics", "127.0.0.1:0"],
        &env,
    );
    let pid = first.child.as_ref().unwrap().id();
    let fails = |sock: &str, extra: &[&str]| -> String {
        let spelled = url.replace("/remote/win10", "/remote/../remote/win10");
        let out = Command::new(common::bin())
            .args(["serve", "--socket", d.path().join(sock).to_str().unwrap(), "--volume", &spelled, "--format", "raw"])
            .args(extra)
            .envs(env)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a second serve of {url} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The default cache directory: the first daemon's.
    let err = fails("second.sock", &[]);
    assert!(err.contains("already served on this host") && err.contains(&format!("driveblk pid {pid}")), "{err}");
    assert!(err.contains("first.sock.ctl") && !err.contains("another --cache-dir"), "{err}");
    // A cache directory of its own: the lease.
    let own = d.path().join("own-cache");
    let err = fails("third.sock", &["--cache-dir", own.to_str().unwrap()]);
    assert!(err.contains(&format!("that is driveblk pid {pid} on this host")), "{err}");
    assert!(err.contains("already served here") && !err.contains("or use `--force-takeover`"), "{err}");
    assert!(first.stop().success());
}

/// Three daemons on one Drive account (the emulator's per-user limit, 30
/// requests/s): each paces only its own requests, from 20/s, so together
/// they start at twice the limit. They must back off: every guest
/// read lands, right, and Drive refuses only a share of the requests.
#[test]
fn three_daemons_on_one_drive_account_back_off_under_its_request_limit() {
    const N: usize = 3;
    let limit = driveemu::RateLimit { per_second: 30.0, burst: 20 };
    let env = gdrive_support::start(driveemu::Config::default(), gdrive_support::Creds::User);
    let flags = ["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()];
    let mut want = Vec::new();
    for i in 0..N {
        let img = env.dir.path().join(format!("disk{i}.raw"));
        want.push(common::make_raw(&img, 12 << 20, 60 + i as u64));
        let url = format!("gdrive:/vms/disk{i}");
        let mut a = vec!["import", "--quiet", "--chunk-size", "64K", img.to_str().unwrap(), &url];
        a.extend_from_slice(&flags);
        run_ok(&a);
    }
    env.emu.faults().set_rate_limit(Some(limit));
    let mut daemons = Vec::new();
    for i in 0..N {
        let (url, cache) = (format!("gdrive:/vms/disk{i}"), env.dir.path().join(format!("cache{i}")));
        let mut a = vec!["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
        a.extend_from_slice(&["--boot-profile", "off", "--readahead-chunks", "0"]);
        a.extend_from_slice(&flags);
        daemons.push(Daemon::start(&env.dir.path().join(format!("sock{i}")), &a));
    }
    let before = env.emu.stats();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N));
    let readers: Vec<_> = daemons
        .iter()
        .zip(want)
        .map(|(d, want)| {
            let (sock, barrier) = (d.socket.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, 1);
                barrier.wait();
                // 4 KiB reads a chunk apart, 32 in flight: a request each,
                // in bursts well over the account's limit.
                let offs: Vec<usize> = (0..want.len()).step_by(64 << 10).collect();
                for batch in offs.chunks(32) {
                    for (k, &off) in batch.iter().enumerate() {
                        let p = unsafe { (c.region.addr as *mut u8).add(k * 4096) };
                        c.queues[0].read(off as u64, p, 4096, k, blkio::ReqFlags::empty());
                    }
                    for (k, ret) in c.wait(0, batch.len()) {
                        let off = batch[k];
                        assert_eq!(ret, 0, "read at {off} failed");
                        assert!(c.buf()[k * 4096..(k + 1) * 4096] == want[off..off + 4096], "read at {off} is wrong");
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let st = env.emu.stats();
    let refused = st.rate_limited_403 + st.rate_limited_429 - before.rate_limited_403 - before.rate_limited_429;
    let asked: u64 = st.requests.values().sum::<u64>() - before.requests.values().sum::<u64>();
    eprintln!("{asked} requests, {refused} refused: {st:?}");
    assert!(refused * 4 < asked, "{refused} of {asked} requests refused: the daemons did not back off");
    for d in daemons {
        assert!(d.stop().success());
    }
}

/// `hydrate` onto a cache disk that holds the image but not the free space
/// clean data leaves on it for changes not uploaded yet (`--ssd-min-free`):
/// earlier chunks are evicted again as later ones land, so "hydrated" —
/// reads that never go to the remote — would not be true. It says what
/// happened and the way out instead; with the reserve given up it is true.
#[test]
fn a_hydrate_the_cache_disk_cannot_keep_whole_says_so() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs and needs root");
    let d = tempfile::tempdir().unwrap();
    let (win, url) = raw_volume(d.path(), "win10", 60 << 20, 5);
    let mnt = d.path().join("cachefs");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    let _m = Mount(mnt.clone());
    let cache = mnt.join("win10");
    let hydrate = |extra: &[&str]| {
        let mut args = vec!["hydrate", "--quiet", &url, "--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Command::new(common::bin()).args(&args).output().unwrap()
    };
    // 60 MiB of a 64 MiB disk, which keeps a twentieth of itself (3.2 MiB) free.
    let o = hydrate(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "hydrate claimed a cache it could not keep whole: {err}");
    assert!(err.contains("could not keep the whole image") && err.contains("--ssd-min-free"), "{err}");
    let o = hydrate(&["--ssd-min-free", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "hydrate with no reserve: {err}");
    // Hydrated is true now: every byte reads with the remote gone.
    std::fs::rename(d.path().join("remote"), d.path().join("remote.away")).unwrap();
    let sock = d.path().join("win.sock");
    let serve = |extra: &[&str]| {
        let mut args = vec!["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(&["--boot-profile", "off", "--sync-interval", "3600"]);
        args.extend_from_slice(extra);
        Daemon::start(&sock, &args)
    };
    let dm = serve(&["--ssd-min-free", "0"]);
    let mut c = Client::connect(&dm.socket, 1);
    for i in 0..60usize {
        let got = c.read((i as u64) << 20, 1 << 20).unwrap_or_else(|e| panic!("offline read of MiB {i}: {e}"));
        assert!(got == win[i << 20..(i + 1) << 20], "offline read of MiB {i} is wrong");
    }
    drop(c);
    assert!(dm.stop().success());
    // Served with the reserve: its sweep thins the cache, which then no
    // longer says it is hydrated.
    let dm = serve(&[]);
    let t0 = Instant::now();
    loop {
        let v = status(&cache);
        if u(&v, "/ssd/evictions") > 0 {
            assert_eq!(v["hydrate"]["complete"], false, "a thinned cache still says it is hydrated: {v}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the sweep never made room: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dm.stop().success());
}

/// `--bwlimit` is the uplink's, not each process's: a daemon uploading
/// a guest's changes and an `import` running beside it, each at 1M, take
/// turns on the host's clock, so moving their 6 MiB takes about 6 s, not
/// the 3 s each would take alone (with a clock per process, 2 MiB/s went
/// up in all).
#[test]
fn daemons_and_imports_on_one_host_share_its_bwlimit() {
    let d = tempfile::tempdir().unwrap();
    let (_, url) = raw_volume(d.path(), "w10", 16 << 20, 1);
    let link = d.path().join("link");
    let link_env = [("DRIVEBLK_LINK", link.to_str().unwrap())];
    let (sock, cache) = (d.path().join("w10.sock"), d.path().join("w10.cache"));
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
        "--bwlimit",
        "1M:off",
    ];
    let _daemon = Daemon::start_env(&sock, &args, &link_env);
    let mut c = Client::connect(&sock, 1);
    // 3 MiB of bytes zstd cannot shrink: 3 s at 1 MiB/s.
    c.write(0, &pattern(7, 3 << 20)).unwrap();
    c.flush().unwrap();
    let img = d.path().join("linux.raw");
    common::make_raw(&img, 3 << 20, 8);

    let timed = |args: Vec<String>, link: &Path| {
        let link = link.to_path_buf();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let o =
                Command::new(env!("CARGO_BIN_EXE_driveblk")).args(&args).env("DRIVEBLK_LINK", link).output().unwrap();
            assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            t0.elapsed()
        })
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let sync = timed(s(&["sync", &url, "--cache-dir", cache.to_str().unwrap(), "--timeout", "120"]), &link);
    let import_url = format!("dir:{}", d.path().join("remote/linux").display());
    let import = timed(
        s(&["import", "--quiet", "--format", "raw", "--bwlimit", "1M:off", img.to_str().unwrap(), &import_url]),
        &link,
    );
    let (t_sync, t_import) = (sync.join().unwrap(), import.join().unwrap());
    eprintln!("sync {t_sync:?}, import {t_import:?}");
    assert!(
        t_sync.max(t_import) >= Duration::from_millis(5200),
        "6 MiB went up at 1M:off in {:?}: each process kept its own clock",
        t_sync.max(t_import)
    );
}

/// The host's `--bwlimit` record is held by its processes for
/// microseconds; one stopped while it held it (here the test, which takes
/// the lock and keeps it) costs an `import` a second's wait and a warning,
/// after which it paces on its own clock, instead of waiting for ever.
#[test]
fn an_import_goes_on_when_a_stopped_process_holds_the_hosts_bwlimit_record() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("link");
    std::fs::create_dir_all(&link).unwrap();
    // This test process is the one that holds it and never lets go.
    let record = std::fs::File::create(link.join("bwlimit")).unwrap();
    rustix::fs::flock(&record, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let img = d.path().join("linux.raw");
    common::make_raw(&img, 2 << 20, 9);
    let url = format!("dir:{}", d.path().join("remote/linux").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["import", "--quiet", "--format", "raw", "--bwlimit", "4M:off", img.to_str().unwrap(), &url])
        .env("DRIVEBLK_LINK", &link)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the import still waits for the host's bwlimit record after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("holds for this process alone") && err.contains("locked for over"), "{err}");
    eprintln!("import took {:?}", t0.elapsed());
}

/// Under a download limit, a guest's miss goes ahead of a hydrate's
/// downloads (speculative: nobody waits for them): it waits behind at
/// most a piece of theirs, not behind the megabytes they would reserve on
/// the clock at once. 16 MiB at `off:2M` hydrate in 8 s; meanwhile a
/// page read from far in the disk waits for its own 256 KiB and at most
/// one 64 KiB piece of the hydrate (about 160 ms), not for a whole 1 MiB
/// chunk of it (before: 600 ms and more).
#[test]
fn a_guests_miss_goes_ahead_of_a_hydrate_under_a_download_limit() {
    let d = tempfile::tempdir().unwrap();
    let (data, url) = raw_volume(d.path(), "w10", 16 << 20, 3);
    let link = d.path().join("link");
    let (sock, cache) = (d.path().join("w10.sock"), d.path().join("w10.cache"));
    let args = ["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
    let args = [&args[..], &["--boot-profile", "off", "--bwlimit", "off:2M"]].concat();
    let _daemon = Daemon::start_env(&sock, &args, &[("DRIVEBLK_LINK", link.to_str().unwrap())]);
    let mut c = Client::connect(&sock, 1);
    let hydrate = {
        let (url, cache) = (url.clone(), cache.to_str().unwrap().to_string());
        std::thread::spawn(move || run_ok(&["hydrate", &url, "--cache-dir", &cache, "--quiet"]))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let mut waits = Vec::new();
    // One page in each of the last eight chunks, back to front: the
    // hydrate has not reached them yet.
    for i in 0..8u64 {
        let off = (15 - i) * (1 << 20) + 4096 * i;
        let t0 = Instant::now();
        let got = c.read(off, 4096).unwrap();
        waits.push(t0.elapsed());
        assert!(got == data[off as usize..off as usize + 4096], "page at {off}");
    }
    hydrate.join().unwrap();
    assert_eq!(status(&cache)["hydrate"]["complete"], true);
    eprintln!("guest misses during the hydrate: {waits:?}");
    waits.sort();
    assert!(waits[7] < Duration::from_millis(400), "a guest's miss waited behind the hydrate: {waits:?}");
}

/// Under an upload limit shared by two VMs' daemons, one VM's
/// writethrough FLUSH goes ahead of the other's background upload (its
/// changes cut in writeback: nobody waits for them): each FLUSH waits
/// behind at most a piece of the 16 MiB pack going up, not behind the 8 s
/// that pack would have reserved on the host's clock at once. The pack
/// still goes up.
#[test]
fn a_writethrough_flush_goes_ahead_of_a_siblings_background_upload_under_an_upload_limit() {
    let d = tempfile::tempdir().unwrap();
    let (_, win_url) = raw_volume(d.path(), "w10", 32 << 20, 1);
    let (_, linux_url) = raw_volume(d.path(), "linux", 4 << 20, 2);
    let link = d.path().join("link");
    let link_env = [("DRIVEBLK_LINK", link.to_str().unwrap())];
    let daemon = |name: &str, url: &str, mode: &str| {
        let (sock, cache) = (d.path().join(format!("{name}.sock")), d.path().join(format!("{name}.cache")));
        let args = ["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--cache", mode];
        let args = [&args[..], &["--boot-profile", "off", "--sync-interval", "1", "--bwlimit", "2M:off"]].concat();
        (Daemon::start_env(&sock, &args, &link_env), cache)
    };
    let (win, win_cache) = daemon("w10", &win_url, "writeback");
    let (linux, linux_cache) = daemon("linux", &linux_url, "writethrough");
    // 16 MiB zstd cannot shrink, cut at the FLUSH: 8 s up at 2 MiB/s.
    let mut wc = Client::connect(&win.socket, 1);
    let bytes = pattern(7, 16 << 20);
    for (i, mib) in bytes.chunks(1 << 20).enumerate() {
        wc.write((i as u64) << 20, mib).unwrap();
    }
    wc.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut lc = Client::connect(&linux.socket, 1);
    let mut waits = Vec::new();
    for i in 0..4u64 {
        lc.write(i << 16, &pattern(10 + i, 64 << 10)).unwrap();
        let t0 = Instant::now();
        lc.flush().unwrap();
        waits.push(t0.elapsed());
    }
    let still = status(&win_cache);
    eprintln!("writethrough FLUSHes during a sibling's background upload: {waits:?}");
    let worst = waits.iter().max().unwrap();
    assert!(*worst < Duration::from_millis(1500), "a writethrough FLUSH waited behind the sibling's upload: {waits:?}");
    assert_eq!(still["sync"]["uploading"], true, "the background upload ended before the FLUSHes: {still}");
    let ls = status(&linux_cache);
    assert_eq!(u(&ls, "/sync/dirty_bytes"), 0, "a writethrough FLUSH returned with changes not committed: {ls}");
    run_ok(&["sync", &win_url, "--cache-dir", win_cache.to_str().unwrap(), "--timeout", "120"]);
}

/// Each daemon's RAM tier is memory on top of its guest's: a start that
/// takes the daemons' tiers past a quarter of the host's memory says so,
/// naming the others; a daemon that ended (even by kill -9) no longer
/// counts.
#[test]
fn ram_tiers_that_add_up_past_the_hosts_memory_are_named_at_start() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    // Each alone under a quarter of the host, two together over it.
    let each = format!("{}", (kib << 10) / 4 * 6 / 10);
    let d = tempfile::tempdir().unwrap();
    let serve = |name: &str, seed: u64| {
        let (_, url) = raw_volume(d.path(), name, 4 << 20, seed);
        let sock = d.path().join(format!("{name}.sock"));
        let log = d.path().join(format!("{name}.log"));
        let cache = d.path().join(format!("{name}.cache"));
        let args = [
            "--volume",
            &url,
            "--format",
            "raw",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--ram-cache",
            &each,
            "--boot-profile",
            "off",
        ];
        let daemon = Daemon::start_logged(&sock, &args, &[], Some(&log));
        (daemon, log)
    };
    let warned = |log: &Path| std::fs::read_to_string(log).unwrap().contains("add up to");
    let (mut a, a_log) = serve("w10", 1);
    assert!(!warned(&a_log), "one daemon alone was warned: {}", std::fs::read_to_string(&a_log).unwrap());
    let (b, b_log) = serve("linux", 2);
    let said = std::fs::read_to_string(&b_log).unwrap();
    let pid_a = a.child.as_ref().unwrap().id();
    assert!(
        warned(&b_log) && said.contains(&format!("pid {pid_a}")),
        "two daemons over a quarter of the host were not named:\n{said}"
    );
    drop(b);
    // A daemon killed -9 leaves its entry; the next start forgets it.
    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let (_c, c_log) = serve("data", 3);
    assert!(!warned(&c_log), "a killed daemon's tier still counted: {}", std::fs::read_to_string(&c_log).unwrap());
}

/// The same two daemons, but the Linux guest writes 10 MiB at once (five
/// 2 MiB writes back to back, twice the disk's reserve): a write that
/// finds the disk full, with nothing clean of its own to evict, waits the
/// moment the Windows daemon's sweep takes to give room back, instead of
/// failing with an I/O error because the sweep had not run yet.
#[test]
fn a_burst_of_writes_past_the_reserve_lands_on_a_disk_a_siblings_cache_filled() {
    let FullDisk { _dir: _d, _mount: _m, linux, windows, wc, .. } = full_disk();
    let mut lc = Client::connect(&linux.socket, 1);
    let written: Vec<Vec<u8>> = (0..5u64).map(|k| pattern(20 + k, 2 << 20)).collect();
    for (k, data) in written.iter().enumerate() {
        lc.write(k as u64 * (2 << 20), data).unwrap_or_else(|e| {
            panic!("linux write {k} of a burst failed ({e}) on a disk the windows daemon's clean data filled")
        });
    }
    lc.flush().unwrap();
    for (k, data) in written.iter().enumerate() {
        assert!(lc.read(k as u64 * (2 << 20), 2 << 20).unwrap() == *data, "linux write {k} reads back");
    }
    drop((lc, wc));
    assert!(linux.stop().success());
    assert!(windows.stop().success());
}
