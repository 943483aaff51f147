//! Remote volumes through the whole daemon, read by libblkio: the bytes the
//! guest sees equal `qemu-img convert -O raw` of the source, cold (empty
//! cache), warm (SSD after restart), hot (RAM); a base-file volume works
//! without upload; writes persist across restarts and into `export`; a
//! corrupted pack is an error, never data; a slow remote still serves.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{bin, run_ok, Client, Daemon};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A 48 MiB qcow2 with data, holes and zero regions, and its raw view.
fn make_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("src.raw");
    let mut data = common::pattern(5, 48 << 20);
    data[8 << 20..20 << 20].fill(0); // a large zero region (sparse in qcow2)
    for (i, b) in data[30 << 20..34 << 20].iter_mut().enumerate() {
        *b = (i / 4096) as u8; // compressible
    }
    std::fs::write(&raw, &data).unwrap();
    let q = dir.join("src.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        raw.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    (q, data)
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

/// The daemon's status: live over its control socket (found through the
/// cache directory) while it runs, its last status file once stopped.
fn status(cache: &Path) -> serde_json::Value {
    let s = run_ok(&["status", "--cache-dir", cache.to_str().unwrap(), "--json"]);
    serde_json::from_str(&s).unwrap()
}

fn serve(sock: &Path, url: &str, cache: &Path, extra: &[&str]) -> Daemon {
    let mut args =
        vec!["--volume", url, "--format", "qcow2", "--cache-dir", cache.to_str().unwrap(), "--num-queues", "2"];
    args.extend_from_slice(extra);
    Daemon::start(sock, &args)
}

#[test]
fn imported_volume_reads_like_qemu_cold_warm_hot_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    let info = run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    assert!(info.contains("generation  1"), "{info}");
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");

    // Cold: empty cache, everything comes from the remote.
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 2);
    assert_eq!(c.capacity, want.len() as u64);
    assert!(read_all(&mut c) == want, "cold read differs from qemu-img's raw view");
    let cold = status(&cache);
    assert!(cold["remote"]["fetches"].as_u64().unwrap() > 0);
    // Hot: same daemon, second pass from RAM.
    let before = cold["remote"]["fetches"].as_u64().unwrap();
    assert!(read_all(&mut c) == want);
    let hot = status(&cache);
    assert_eq!(hot["remote"]["fetches"].as_u64().unwrap(), before, "hot pass went to the remote");
    assert!(hot["ram"]["hits"].as_u64().unwrap() > 0);
    drop(c);
    assert!(d.stop().success());

    // Warm: restart on the same cache dir; the SSD tier serves everything.
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "warm read differs");
    drop(c);
    assert!(d.stop().success());
    let warm = status(&cache);
    assert_eq!(warm["remote"]["fetches"].as_u64().unwrap(), 0, "warm restart fetched from the remote: {warm}");
    assert!(warm["ssd"]["hits"].as_u64().unwrap() > 0);
}

#[test]
fn attached_base_file_serves_without_upload() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    std::fs::copy(&src, remote.join("win10.qcow2")).unwrap();
    let base = format!("dir:{}/win10.qcow2", remote.display());
    let url = format!("dir:{}/win10-vol", remote.display());
    run_ok(&["attach", &base, &url]);
    // Nothing but the header and a manifest was written.
    let names: Vec<String> = std::fs::read_dir(remote.join("win10-vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with("pack-")), "attach uploaded packs: {names:?}");
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "base-file volume differs from the file");
    drop(c);
    assert!(d.stop().success());
}

/// A volume's header is not authenticated: one rewritten to name a host
/// file as its base (or a base beside it swapped for a symbolic link)
/// must not have the daemon serve that file to the guest. Refused, naming
/// the base and `--allow-base`, which lets a base the user moved be read.
#[test]
fn a_header_naming_a_host_file_as_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    let base = remote.join("base.raw");
    let want = common::make_raw(&base, 1 << 20, 9);
    let url = format!("dir:{}/vol", remote.display());
    let base_url = format!("dir:{}", base.display());
    run_ok(&["attach", "--format", "raw", &base_url, &url]);
    let args = |cache: &str| -> Vec<String> {
        let cache = dir.path().join(cache).to_str().unwrap().to_string();
        ["--volume", &url, "--format", "raw", "--cache-dir", &cache, "--boot-profile", "off"].map(String::from).to_vec()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let sock = dir.path().join("sock");
    // The base beside the volume, where attach found it: served.
    let d = Daemon::start(&sock, &strs(&args("c0")));
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(0, 4096).unwrap() == want[..4096], "the attached base is served");
    drop(c);
    assert!(d.stop().success());

    // Whoever can write the folder names a host file of the same size.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, vec![b'S'; 1 << 20]).unwrap();
    let header = remote.join("vol/volume.json");
    let original = std::fs::read_to_string(&header).unwrap();
    let mut h: serde_json::Value = serde_json::from_str(&original).unwrap();
    let secret_url = format!("dir:{}", secret.display());
    h["base"] = serde_json::json!({"url": secret_url, "size": 1 << 20});
    std::fs::write(&header, serde_json::to_vec(&h).unwrap()).unwrap();
    let a = args("c1");
    let err = common::serve_fails(&sock, &strs(&a));
    assert!(err.contains(&secret_url) && err.contains(&format!("--allow-base {secret_url}")), "{err}");
    // The user's leave (a base they moved there themselves): served.
    let mut a = args("c2");
    a.extend(["--allow-base".to_string(), secret_url.clone()]);
    let d = Daemon::start(&sock, &strs(&a));
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(0, 4096).unwrap() == vec![b'S'; 4096], "an allowed base is served");
    drop(c);
    assert!(d.stop().success());

    // The base beside the volume swapped for a symbolic link to the file.
    std::fs::write(&header, &original).unwrap();
    std::fs::remove_file(&base).unwrap();
    std::os::unix::fs::symlink(&secret, &base).unwrap();
    let mut h: serde_json::Value = serde_json::from_str(&original).unwrap();
    h["base"] = serde_json::json!({"url": base_url, "size": 1 << 20});
    std::fs::write(&header, serde_json::to_vec(&h).unwrap()).unwrap();
    let a = args("c3");
    let err = common::serve_fails(&sock, &strs(&a));
    assert!(err.contains("symbolic link") && err.contains(&base_url), "{err}");
}

/// A volume holds one image file, so a qcow2 overlay's backing data is not
/// in it. `import --format qcow2` uploaded an overlay anyway and `serve`
/// then failed with "no backing opener was given"; now the import refuses
/// it before anything is uploaded, and a serve of one imported without
/// `--format` says what to do too: flatten it with `qemu-img convert`.
#[test]
fn a_qcow2_overlay_is_refused_at_import_and_serve_says_how_to_flatten() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap(), "16M"]);
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    let url = format!("dir:{}/vol", remote.display());
    let out = Command::new(bin()).args(["import", "--format", "qcow2", top.to_str().unwrap(), &url]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an overlay was imported");
    assert!(
        err.contains("overlay") && err.contains("qemu-img convert") && err.contains("nothing was uploaded"),
        "{err}"
    );
    assert!(!remote.join("vol").exists(), "the import touched the remote");
    // Imported as plain bytes, then served as a qcow2.
    run_ok(&["import", "--quiet", top.to_str().unwrap(), &url]);
    let cache = dir.path().join("cache");
    let args = ["--volume", &url, "--format", "qcow2", "--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"];
    let err = common::serve_fails(&dir.path().join("sock"), &args);
    assert!(err.contains("overlay on the backing file \"base.qcow2\"") && err.contains("qemu-img convert"), "{err}");
    // Said once, as what it is (it was an I/O error "at image offset 0",
    // its text printed twice).
    assert!(err.matches("overlay on").count() == 1 && err.contains("not supported: "), "{err}");
}

/// An export is the guest's disk in clear: 0600 whatever the umask, and
/// written through no symbolic link planted at its temporary name.
#[test]
fn an_export_is_the_owners_alone_and_follows_no_planted_link() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let want = common::make_raw(&img, 1 << 20, 11);
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url]);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"not to be overwritten").unwrap();
    let out = dir.path().join("out.raw");
    std::os::unix::fs::symlink(&victim, dir.path().join(".out.raw.driveblk-partial")).unwrap();
    let mut export = Command::new(bin());
    export.args(["export", "--quiet", &url, out.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        export.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        })
    };
    let o = export.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&victim).unwrap() == b"not to be overwritten", "the planted link was followed");
    let meta = std::fs::symlink_metadata(&out).unwrap();
    assert!(meta.is_file(), "the export is a regular file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read(&out).unwrap() == want);
}

#[test]
fn writes_go_back_to_the_remote_at_stop_and_persist_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (src, mut want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (4096, common::pattern(1, 8192)),
        (10 << 20, common::pattern(2, 1 << 20)), // into the zero region: allocates
        ((47 << 20) + 512, common::pattern(3, 4096)), // near the end
    ];
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    for (off, data) in &writes {
        c.write(*off, data).unwrap();
        want[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    c.discard(40 << 20, 1 << 20).unwrap();
    want[40 << 20..41 << 20].fill(0);
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    // The stop uploaded them: nothing dirty, a newer generation.
    let st = status(&cache);
    assert_eq!(st["chunks"]["dirty"].as_u64(), Some(0), "{st}");
    assert!(st["generation"].as_u64().unwrap() >= 2, "{st}");

    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "writes lost across restart");
    drop(c);
    assert!(d.stop().success());

    // The remote alone (no cache: another machine) holds the writes; QEMU
    // agrees on the result.
    let out = dir.path().join("exported.qcow2");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    qemu_img(&["check", "-q", "-f", "qcow2", out.to_str().unwrap()]);
    let raw = dir.path().join("exported.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", out.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(std::fs::read(&raw).unwrap() == want, "export differs from what the guest wrote");
}

/// A guest's TRIM reaches the volume: the clusters it frees are zeroed in
/// the store, so chunks left all zero go up as zero chunks and the deleted
/// data is in no later generation (nor in an export) any more.
#[test]
fn trimmed_clusters_become_zero_chunks_on_the_remote() {
    let dir = tempfile::tempdir().unwrap();
    let (src, mut want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let info = || -> serde_json::Value { serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap() };
    let before = info();
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    // 8 MiB of data, contiguous in the image file (qemu-img convert lays
    // clusters out in guest order), the way NTFS frees a deleted file.
    c.discard(0, 8 << 20).unwrap();
    want[..8 << 20].fill(0);
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    let after = info();
    assert!(after["generation"].as_u64() > before["generation"].as_u64(), "{after}");
    let (z0, z1) = (before["chunks_zero"].as_u64().unwrap(), after["chunks_zero"].as_u64().unwrap());
    assert!(z1 >= z0 + 6, "8 MiB trimmed, zero chunks {z0} -> {z1}: {after}");

    let out = dir.path().join("exported.qcow2");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    qemu_img(&["check", "-q", "-f", "qcow2", out.to_str().unwrap()]);
    let raw = dir.path().join("exported.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", out.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(std::fs::read(&raw).unwrap() == want, "export differs from what the guest sees");
    // The trimmed data itself is gone from the image file.
    let file = std::fs::read(&out).unwrap();
    let deleted = &common::pattern(5, 48 << 20)[4 << 20..(4 << 20) + 4096];
    assert!(!file.chunks_exact(4096).any(|w| w == deleted), "the export still carries trimmed data");
}

#[test]
fn corrupted_pack_is_an_error_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    // Flip bytes in the middle of the (single) pack: some chunk's frame.
    let pack = std::fs::read_dir(dir.path().join("remote/vol"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("pack-"))
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() * 3 / 4;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&pack, bytes).unwrap();
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let d = serve(&sock, &url, &cache, &[]);
    let mut c = Client::connect(&sock, 1);
    let mut errors = 0;
    let mut off = 0u64;
    while off < c.capacity {
        match c.read(off, 1 << 20) {
            Ok(got) => {
                assert!(got == want[off as usize..off as usize + (1 << 20)], "wrong data at {off} instead of an error")
            }
            Err(_) => errors += 1,
        }
        off += 1 << 20;
    }
    assert!(errors > 0, "corruption went unnoticed");
    assert!(status(&cache)["remote"]["errors"].as_u64().unwrap() > 0);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn slow_remote_still_serves_correct_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let d = serve(&sock, &url, &cache, &["--remote-latency-ms", "40", "--remote-bandwidth-mbit", "800"]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn volume_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("dir:{}/nothing-here", dir.path().display());
    let out = Command::new(bin()).args(["info", &missing]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing-here"), "{err}");
    let out = Command::new(bin()).args(["info", "ftp://x/y"]).output().unwrap();
    assert!(!out.status.success());
    // Importing onto an existing volume is refused.
    let (src, _) = make_source(dir.path());
    let url = format!("dir:{}/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let out = Command::new(bin()).args(["import", "--quiet", src.to_str().unwrap(), &url]).output().unwrap();
    assert!(!out.status.success());
}

/// An import killed -9 half way leaves packs but no volume: the next
/// import into that folder removes them and makes a whole volume
/// (docs/format.md, "Commit rule and the fence").
#[test]
fn an_import_killed_half_way_is_cleared_by_the_next_import() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Incompressible, 80 MiB at 4 MiB/s up: a 64 MiB pack and a 16 MiB
    // one; the first lands about 4 s before the other, and the volume only
    // after both (one pack alone lands moments before the volume, which a
    // kill then misses).
    let want = common::make_raw(&src, 80 << 20, 21);
    let folder = dir.path().join("remote/vol");
    let url = format!("dir:{}", folder.display());
    let packs = || -> Vec<String> {
        let names = std::fs::read_dir(&folder).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
        let mut v: Vec<String> = names.iter().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.retain(|n| n.starts_with("pack-"));
        v
    };
    let mut child = Command::new(bin())
        .args(["import", "--quiet", "--format", "raw", "--bwlimit", "4M:off", src.to_str().unwrap(), &url])
        .env("DRIVEBLK_LINK", dir.path().join("link"))
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while packs().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the import ended before a pack landed");
        assert!(t0.elapsed() < Duration::from_secs(60), "no pack landed in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = packs();
    assert!(!folder.join("volume.json").exists(), "the import was not cut short: nothing tested");
    let out = Command::new(bin()).args(["info", &url]).output().unwrap();
    assert!(!out.status.success(), "a killed import left a volume");
    run_ok(&["import", "--quiet", "--format", "raw", src.to_str().unwrap(), &url]);
    let left: Vec<String> = packs().into_iter().filter(|p| stale.contains(p)).collect();
    assert!(left.is_empty(), "packs of the killed import are still there: {left:?}");
    let out = dir.path().join("out.raw");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "the second import does not read back as the image");
}

/// A clean stop releases the writer lease once: `close` does it, and the
/// store dropped after it did it again (a second round of lease requests,
/// up to 5 s more of a stop on a remote that hangs).
#[test]
fn a_clean_stop_releases_the_lease_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    common::make_raw(&src, 4 << 20, 22);
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", src.to_str().unwrap(), &url]);
    let log = dir.path().join("serve.log");
    let cache = dir.path().join("cache");
    let args = ["--volume", &url, "--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"];
    let d = Daemon::start_logged(&dir.path().join("sock"), &args, &[], Some(&log));
    assert!(d.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("released the writer lease").count(), 1, "{text}");
}

#[test]
fn hydrated_volume_needs_no_remote() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let remote = dir.path().join("remote");
    let url = format!("dir:{}/vol", remote.display());
    std::fs::create_dir(&remote).unwrap();
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let sock = dir.path().join("sock");

    // Background hydration while serving: the status shows it complete.
    let cache1 = dir.path().join("cache1");
    let d = serve(&sock, &url, &cache1, &["--hydrate"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = status(&cache1);
        if s["hydrate"]["complete"].as_bool().unwrap() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "hydration did not finish: {s}");
    }
    assert!(d.stop().success());

    // Foreground `driveblk hydrate` into another cache.
    let cache2 = dir.path().join("cache2");
    run_ok(&["hydrate", "--quiet", &url, "--cache-dir", cache2.to_str().unwrap()]);

    // The remote disappears (its volume files move away): both caches still
    // serve every byte, offline.
    std::fs::rename(&remote, dir.path().join("remote-gone")).unwrap();
    for cache in [&cache1, &cache2] {
        let d = serve(&sock, &url, cache, &[]);
        let mut c = Client::connect(&sock, 1);
        assert!(read_all(&mut c) == want, "hydrated cache {} incomplete", cache.display());
        drop(c);
        assert!(d.stop().success());
        let s = status(cache);
        assert_eq!(s["remote"]["fetches"].as_u64().unwrap(), 0);
        assert!(s["offline"].as_bool().unwrap(), "should have started from the cache's copy: {s}");
    }
}

/// A boot's reads through the daemon: scattered small files, each read
/// front to back.
fn boot_like_reads(c: &mut Client, want: &[u8]) {
    for i in 0..40u64 {
        let mut off = (i * 7_919 * 4096 + 12_288) % (c.capacity - (64 << 10));
        for _ in 0..3 {
            let got = c.read(off, 8192).unwrap();
            assert!(got == want[off as usize..off as usize + 8192], "boot read at {off} differs");
            off += 8192;
        }
    }
}

#[test]
fn boot_profile_saved_at_stop_and_streamed_by_the_next_cold_start() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let sock = dir.path().join("sock");
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    assert!(info["boot_profile"].is_null(), "{info}");

    // First boot: recorded, saved when the daemon stops. Over a 30 ms link
    // every miss keeps the guest waiting at least a round trip, and status
    // says how long it waited in all (reads one at a time here: the waits
    // never overlap, except two chunks of one read).
    let cache1 = dir.path().join("cache1");
    let d = serve(&sock, &url, &cache1, &["--remote-latency-ms", "30"]);
    let mut c = Client::connect(&sock, 1);
    boot_like_reads(&mut c, &want);
    let st = status(&cache1);
    assert_eq!(st["boot_profile"]["recording"], true, "{st}");
    let (misses, waited) = (st["remote"]["misses"].as_u64().unwrap(), st["remote"]["guest_wait_ms"].as_u64().unwrap());
    assert!(misses > 0 && waited >= misses / 2 * 30, "{misses} misses over a 30 ms link, waited {waited} ms: {st}");
    drop(c);
    assert!(d.stop().success());
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    let bytes = info["boot_profile"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes >= 40 * 3 * 8192, "the profile holds at least the boot's reads: {info}");

    // Another machine: an empty cache over a slow link. The profile streams
    // in; the same reads then need no remote round trip.
    let cache2 = dir.path().join("cache2");
    let d = serve(&sock, &url, &cache2, &["--remote-latency-ms", "30"]);
    let mut st = status(&cache2);
    for _ in 0..20 {
        let p = &st["boot_profile"];
        if p["segments"].as_u64().unwrap_or(0) > 0 && p["segments_done"] == p["segments"] {
            break;
        }
        st = status(&cache2);
    }
    assert!(st["boot_profile"]["segments"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["boot_profile"]["segments_done"], st["boot_profile"]["segments"], "{st}");

    let misses = st["remote"]["misses"].as_u64().unwrap();
    let mut c = Client::connect(&sock, 1);
    boot_like_reads(&mut c, &want);
    let after = status(&cache2);
    assert_eq!(after["remote"]["misses"].as_u64().unwrap(), misses, "boot reads waited on the remote: {after}");
    assert_eq!(after["remote"]["guest_wait_ms"], st["remote"]["guest_wait_ms"], "{after}");
    assert!(after["chunks_partial"].as_u64().unwrap() > 0, "{after}");
    drop(c);
    // The boot matched the profile: stopping uploads no new one.
    assert!(d.stop().success());
    let again: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    assert_eq!(again["boot_profile"]["key"], info["boot_profile"]["key"], "{again}");
    // Everything else still reads right (whole chunks around the pages).
    let d = serve(&sock, &url, &cache2, &["--boot-profile", "off"]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(d.stop().success());
}

/// Every file under `dir` with its size and modification time.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        let m = std::fs::metadata(&e).unwrap();
        out.push((e, m.len(), m.modified().unwrap()));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `serve --read-only` (a second machine watching the disk, viewer-only
/// Drive access, read-only S3 keys) writes nothing to the volume: no
/// boot profile recorded and saved at stop, no lease, no generation.
#[test]
fn a_read_only_serve_writes_nothing_to_the_remote() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let before = listing(&dir.path().join("remote"));
    let sock = dir.path().join("sock");
    let cache = dir.path().join("cache");
    let d = serve(&sock, &url, &cache, &["--read-only", "--boot-profile-window", "1"]);
    let mut c = Client::connect_with(&sock, 1, true);
    boot_like_reads(&mut c, &want);
    std::thread::sleep(Duration::from_millis(1500)); // the recording window closes
    boot_like_reads(&mut c, &want);
    drop(c);
    assert!(d.stop().success());
    assert_eq!(listing(&dir.path().join("remote")), before, "the read-only serve changed the remote");
    // Asked to (a read-only golden image's first boot), it records one.
    let d = serve(&sock, &url, &dir.path().join("cache2"), &["--read-only", "--boot-profile", "record"]);
    let mut c = Client::connect_with(&sock, 1, true);
    boot_like_reads(&mut c, &want);
    drop(c);
    assert!(d.stop().success());
    let profiles = walk(&dir.path().join("remote/vol"))
        .iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("profile-"))
        .count();
    assert!(profiles > 0, "--boot-profile record saved no profile");
}

/// A second `serve` given a socket already in use (a copy-pasted config)
/// is refused before it opens its volume: it takes no writer lease and
/// writes nothing to that volume's remote.
#[test]
fn a_serve_on_a_used_socket_touches_no_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = make_source(dir.path());
    let (url_a, url_b) =
        (format!("dir:{}/remote/a", dir.path().display()), format!("dir:{}/remote/b", dir.path().display()));
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url_a]);
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url_b]);
    let sock = dir.path().join("sock");
    let d = serve(&sock, &url_a, &dir.path().join("cache-a"), &[]);
    let before = listing(&dir.path().join("remote/b"));
    let cache_b = dir.path().join("cache-b");
    let e = common::serve_fails(
        &sock,
        &["--volume", &url_b, "--format", "qcow2", "--cache-dir", cache_b.to_str().unwrap()],
    );
    assert!(e.contains("in use by a running daemon"), "{e}");
    assert_eq!(listing(&dir.path().join("remote/b")), before, "the refused serve wrote to its volume");
    assert!(d.stop().success());
}

/// `hydrate` that cannot fetch every chunk (a pack deleted on the remote)
/// ends with an error saying why, instead of spinning for ever.
#[test]
fn a_hydrate_that_cannot_finish_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let pack = walk(&dir.path().join("remote/vol"))
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pack-"))
        .unwrap();
    std::fs::remove_file(&pack).unwrap();
    let cache = dir.path().join("cache");
    let log = dir.path().join("hydrate.log");
    let mut child = Command::new(bin())
        .args(["hydrate", &url, "--cache-dir", cache.to_str().unwrap(), "--quiet"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let st = common::wait_timeout(&mut child, Duration::from_secs(120));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!st.success() && err.contains("hydration stopped having fetched"), "{st}: {err}");
}

/// `status URL` on a remote that never answers (here a `volume.json` that
/// blocks every read, as a hung mount would) prints what this host knows
/// within its lease wait, instead of nothing for as long as retries last.
#[test]
fn status_of_a_silent_remote_answers_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("remote/vol");
    std::fs::create_dir_all(&vol).unwrap();
    let fifo = std::ffi::CString::new(vol.join("volume.json").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let url = format!("dir:{}", vol.display());
    let log = dir.path().join("status.out");
    let t0 = std::time::Instant::now();
    let mut child = Command::new(bin())
        .args(["status", &url, "--cache-dir", dir.path().join("cache").to_str().unwrap()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let st = common::wait_timeout(&mut child, Duration::from_secs(60));
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(st.success() && out.contains("lease       unknown: the remote did not answer"), "{st}: {out}");
    assert!(out.contains("no daemon status on this host"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(40), "{:?}", t0.elapsed());
}

#[test]
fn second_signal_skips_a_slow_profile_save() {
    let dir = tempfile::tempdir().unwrap();
    let (src, want) = make_source(dir.path());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", src.to_str().unwrap(), &url]);
    let sock = dir.path().join("sock");
    let cache = dir.path().join("cache");
    // Every request takes 700 ms: saving the profile (two uploads) cannot
    // finish between the two signals.
    let mut d = serve(&sock, &url, &cache, &["--remote-latency-ms", "700"]);
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(1 << 20, 8192).unwrap() == want[1 << 20..(1 << 20) + 8192]);
    drop(c);
    let mut child = d.child.take().unwrap();
    let t0 = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(400));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = common::wait_timeout(&mut child, std::time::Duration::from_secs(20));
    assert_eq!(st.code(), Some(1), "a second signal exits at once with status 1");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t0.elapsed());
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    assert!(info["boot_profile"].is_null(), "the interrupted save left no profile: {info}");
    // The cache is intact: a restart serves the same bytes.
    let d = serve(&sock, &url, &cache, &["--boot-profile", "off"]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(d.stop().success());
}
