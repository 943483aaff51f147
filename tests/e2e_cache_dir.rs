//! The default cache directory is keyed by volume id (issue: hardening,
//! "export and status find the right cache"): a daemon serving `dir:./vol`
//! (relative, through a symlink) and `status`/`export` given
//! `dir:/abs/real/vol` find the same cache, so an export includes the
//! local writes not uploaded yet.

mod common;

use std::process::Command;

/// Writes a page at 64 KiB that stays in the cache only (with
/// `--sync-interval 3600`): the first FLUSH cuts a generation at once, the
/// next write, flushed within the interval, is not uploaded. Returns it.
fn write_kept_in_cache(c: &mut common::Client) -> Vec<u8> {
    c.write(0, &[1u8; 4096]).unwrap();
    c.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let page = vec![0xabu8; 4096];
    c.write(65536, &page).unwrap();
    c.flush().unwrap();
    page
}

#[test]
fn every_spelling_of_a_volume_url_finds_its_cache() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache-root");
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
    let img = d.path().join("disk.raw");
    let data = common::make_raw(&img, 2 << 20, 5);
    let abs = format!("dir:{}/vol", real.display());
    let run = |cwd: &std::path::Path, args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .current_dir(cwd)
            .env("DRIVEBLK_CACHE", &root)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        o
    };
    run(d.path(), &["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &abs]);

    // Serve it as `dir:./vol` from inside the symlinked folder; write and
    // flush, then kill -9: the write is durable in the cache only.
    let sock = d.path().join("sock");
    let child = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .current_dir(d.path().join("link"))
        .env("DRIVEBLK_CACHE", &root)
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", "dir:./vol", "--format", "raw"])
        .args(["--sync-interval", "3600", "--boot-profile", "off"])
        .spawn()
        .unwrap();
    let mut dmn = common::Daemon { child: Some(child), socket: sock.clone() };
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed().as_secs() < 20, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = common::Client::connect(&sock, 1);
    let page = write_kept_in_cache(&mut c);
    std::thread::sleep(std::time::Duration::from_millis(1500)); // a status write
    drop(c);
    let mut child = dmn.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Another spelling: the absolute real path.
    let st = run(d.path(), &["status", &abs, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["local"]["chunks"]["dirty"], 1, "status found the serving daemon's cache: {v}");
    let out = d.path().join("out.raw");
    run(d.path(), &["export", "--quiet", &abs, out.to_str().unwrap()]);
    let mut want = data.clone();
    want[..4096].fill(1);
    want[65536..65536 + 4096].copy_from_slice(&page);
    assert!(std::fs::read(&out).unwrap() == want, "the export includes the write not uploaded yet");
    // One cache directory for the volume, whatever the spelling.
    let dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "by-url" && e.file_name() != "link")
        .map(|e| e.file_name())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
}

/// A volume of a 2 MiB raw image on a `dir:` remote under `dir`, served
/// with its cache in `dir/cache` and killed (as in a crash) with a flushed
/// write that lives in the cache only.
struct KilledWithAWrite {
    url: String,
    cache: std::path::PathBuf,
    sock: std::path::PathBuf,
    /// The image imported.
    data: Vec<u8>,
    /// The page written and not uploaded.
    page: Vec<u8>,
}

impl KilledWithAWrite {
    /// `serve`'s arguments for the volume and cache.
    fn args(&self) -> Vec<&str> {
        let cache = self.cache.to_str().unwrap();
        vec![
            "--volume",
            &self.url,
            "--format",
            "raw",
            "--cache-dir",
            cache,
            "--sync-interval",
            "3600",
            "--boot-profile",
            "off",
        ]
    }

    /// Runs a driveblk command on the cache.
    fn cli(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(args)
            .args(["--cache-dir", self.cache.to_str().unwrap()])
            .output()
    }
}

fn killed_with_a_write_in_cache(dir: &std::path::Path) -> KilledWithAWrite {
    let img = dir.join("disk.raw");
    let data = common::make_raw(&img, 2 << 20, 6);
    let url = format!("dir:{}/vol", dir.display());
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut k = KilledWithAWrite { url, cache: dir.join("cache"), sock: dir.join("sock"), data, page: Vec::new() };
    let mut dmn = common::Daemon::start(&k.sock, &k.args());
    let mut c = common::Client::connect(&k.sock, 1);
    k.page = write_kept_in_cache(&mut c);
    drop(c);
    let mut child = dmn.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    k
}

/// A cache whose state file is damaged may hold writes never uploaded:
/// `serve` refuses it with the reason and the way out, changes nothing in
/// it, and `discard-local` removes it when the user says so.
#[test]
fn a_cache_with_a_damaged_state_is_refused_not_dropped() {
    let d = tempfile::tempdir().unwrap();
    let k = killed_with_a_write_in_cache(d.path());
    let (url, cache, sock, data, page) = (&k.url, &k.cache, &k.sock, &k.data, &k.page);
    let args = k.args();
    let cli = |a: &[&str]| k.cli(a);

    // One byte of the state file goes bad (after its header line).
    let state = cache.join("state");
    let mut s = std::fs::read(&state).unwrap();
    let last = s.len() - 1;
    s[last] ^= 0x40;
    std::fs::write(&state, &s).unwrap();
    let before: Vec<(String, Vec<u8>)> =
        ["state", "data", "journal"].iter().map(|f| (f.to_string(), std::fs::read(cache.join(f)).unwrap())).collect();
    assert!(before[1].1.windows(4096).any(|w| w == page), "the unsaved write is in the cache's data file");

    // Refused, with the reason and the way out; nothing in it changed.
    let err = serve_refused(sock, &args);
    assert!(err.contains("checksum") && err.contains("not yet uploaded") && err.contains("discard-local"), "{err}");
    for (f, bytes) in &before {
        assert!(std::fs::read(cache.join(f)).unwrap() == *bytes, "serve changed the cache's {f}");
    }
    // So does export, which reads the cache's changes too.
    let out = d.path().join("out.raw");
    let o = cli(&["export", "--quiet", url, out.to_str().unwrap()]).unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("discard-local"));

    // The user drops it: the next start follows the remote, at once (the
    // damaged state still named the cache holding the writer lease).
    let o = cli(&["discard-local", url]).unwrap();
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && msg.contains("state could not be read"), "{msg}");
    let dmn = common::Daemon::start(sock, &args);
    let mut c = common::Client::connect(sock, 1);
    assert!(c.read(65536, 4096).unwrap() == data[65536..65536 + 4096], "the dropped write is gone");
    drop(c);
    assert!(dmn.stop().success());
}

/// `serve` that must refuse to start: its stderr.
fn serve_refused(sock: &std::path::Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed().as_secs() > 30 {
            child.kill().unwrap();
            panic!("serve started where it must refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

/// A cache a newer driveblk wrote (this machine went back to an older
/// binary) is sound and may hold writes only that version can upload: it
/// is refused as newer, never as damaged, and `discard-local` does not
/// drop it (nor release its lease) unless forced.
#[test]
fn a_cache_a_newer_driveblk_wrote_is_refused_as_newer_not_damaged() {
    use sha2::Digest;
    let d = tempfile::tempdir().unwrap();
    let k = killed_with_a_write_in_cache(d.path());
    let (url, cache, sock, page) = (&k.url, &k.cache, &k.sock, &k.page);
    let args = k.args();
    let cli = |a: &[&str]| k.cli(a);

    // Its state as a newer driveblk would write it: a higher version,
    // checksummed as the state file is (SHA-256 of all before it).
    let state = cache.join("state");
    let s = std::fs::read(&state).unwrap();
    let body = &s[..s.len() - 32];
    let nl = body.iter().position(|&c| c == b'\n').unwrap();
    let mut h: serde_json::Value = serde_json::from_slice(&body[..nl]).unwrap();
    h["version"] = 99.into();
    let mut nu = serde_json::to_vec(&h).unwrap();
    nu.extend_from_slice(&body[nl..]);
    let sum = sha2::Sha256::digest(&nu);
    nu.extend_from_slice(&sum);
    std::fs::write(&state, &nu).unwrap();
    let files = ["state", "data", "journal"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(cache.join(f)).unwrap()).collect();
    assert!(before[1].windows(4096).any(|w| w == page), "the unsaved write is in the cache's data file");
    let lease = || {
        let empty = d.path().join("no-cache");
        let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(["status", url, "--json", "--cache-dir", empty.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["lease"]["holder"]["cache_id"].clone()
    };
    let holder = lease();
    assert!(holder.is_string(), "the killed daemon held the lease: {holder}");

    let err = serve_refused(sock, &args);
    let newer = "newer driveblk (cache state v99, this one reads up to v";
    assert!(err.contains(newer) && err.contains("driveblk sync") && err.contains("nothing was changed"), "{err}");
    assert!(!err.contains("checksum") && !err.contains("cannot be used"), "called damaged: {err}");
    // discard-local refuses it too, without --force.
    let o = cli(&["discard-local", url]).unwrap();
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && msg.contains("newer driveblk") && msg.contains("--force"), "{msg}");
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(cache.join(f)).unwrap() == *b, "the cache's {f} changed");
    }
    assert_eq!(lease(), holder, "the lease was released");
    // Forced, the cache goes, and its lease stays (this binary cannot
    // tell what that state says of it).
    let o = cli(&["discard-local", url, "--force"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!state.exists() && !cache.join("data").exists());
    assert_eq!(lease(), holder, "a forced discard of a newer cache released its lease");
}

/// The cache holds the guest's disk in the clear: whatever the umask
/// (only the systemd unit sets 0077), its directory is the owner's alone
/// and its data and journal files are 0600.
#[test]
fn a_cache_is_the_owners_alone_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.raw");
    common::make_raw(&img, 1 << 20, 8);
    let url = format!("dir:{}/vol", d.path().display());
    common::run_ok(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url]);
    let (cache, sock) = (d.path().join("root/cache"), d.path().join("sock"));
    let mut serve = Command::new(common::bin());
    serve.args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &url, "--format", "raw"]);
    serve.args(["--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        serve.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        })
    };
    let dmn = common::Daemon { child: Some(serve.spawn().unwrap()), socket: sock.clone() };
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed().as_secs() < 20, "no socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = common::Client::connect(&sock, 1);
    c.write(0, &[3u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(dmn.stop().success());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for dir in [&cache, &d.path().join("root")] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    for f in ["data", "journal"] {
        assert_eq!(mode(&cache.join(f)), 0o600, "{f}");
    }
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p) & 0o077, 0, "{} is {:03o}", p.display(), mode(&p));
    }
    // A cache an older version left open to others: named, with the fix.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = d.path().join("log");
    let args = ["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"];
    let dmn = common::Daemon::start_logged(&sock, &args, &[], Some(&log));
    drop(common::Client::connect(&sock, 1));
    assert!(dmn.stop().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains(&format!("`chmod -R go= {}`", cache.display())), "{log}");
}
