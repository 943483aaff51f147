//! The cache directory on the file systems users put it on, each a real
//! loopback file system: XFS, btrfs (and its snapshots), tmpfs, exFAT,
//! and an overlayfs as containers have; a `dir:` remote on exFAT, the
//! external disk carried between machines; and a fleet's shared cache
//! directory on a mount that hangs.
//! The daemon serves a `dir:` volume with its cache there: writes, reads,
//! a stop and restart, a kill -9 and restart lose nothing; a file system
//! that cannot hold the cache (no Unix permissions, no room for a data
//! file without holes) is refused at start, by name, with the way out.
//! Needs root (mounts), as CI has; the mkfs tools and exFAT's driver come
//! from apt-get when missing (a test skips, saying so, only if they cannot
//! be installed).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{pattern, Client, Daemon};

/// A mounted loopback file system, unmounted (and its loop device let
/// go) on drop. Declare it before the daemons using it.
struct Mounted {
    mnt: PathBuf,
    fs: String,
    img: PathBuf,
    opts: String,
    /// The loop device a FUSE driver mounts from.
    loop_dev: Option<String>,
}

impl Mounted {
    /// Mounts the image (made already) at `mnt`.
    fn attach(&self) {
        let mnt = self.mnt.to_str().unwrap();
        let with = |o: &str| if self.opts.is_empty() { o.to_string() } else { format!("{o},{}", self.opts) };
        match &self.loop_dev {
            Some(dev) => {
                let o: &[&str] = if self.opts.is_empty() { &[] } else { &["-o", &self.opts] };
                run("mount.exfat-fuse", &[o, &[dev.as_str(), mnt]].concat());
            }
            None => {
                run("mount", &["-t", &self.fs, "-o", &with("loop"), self.img.to_str().unwrap(), mnt]);
            }
        }
    }

    /// The FUSE driver's process (None: a kernel file system).
    fn fuse_pid(&self) -> Option<i32> {
        self.loop_dev.as_ref()?;
        let mnt = self.mnt.to_str().unwrap().as_bytes();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            (args.first()?.ends_with(b"exfat-fuse") && args.contains(&mnt)).then_some(pid)
        })
    }

    /// Stops (or resumes) the FUSE driver: while it is stopped every call
    /// into the mount waits, as on an NFS mount whose server went away.
    fn freeze(&self, stop: bool) {
        let pid = self.fuse_pid().expect("the FUSE driver's process");
        unsafe { libc::kill(pid, if stop { libc::SIGSTOP } else { libc::SIGCONT }) };
    }

    /// Unmounts and mounts it again, as after unplugging a disk or a
    /// reboot.
    fn remount(&self) {
        run("umount", &[self.mnt.to_str().unwrap()]);
        self.attach();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(pid) = self.fuse_pid() {
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        if let Some(d) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

/// True once `cmd` is there, installing `pkg` with apt-get if not.
fn tool(cmd: &str, pkg: &str) -> bool {
    for update in [false, true] {
        if have(cmd) {
            return true;
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=300", "-qq"])
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
        };
        if update {
            let _ = apt(&["update"]);
        }
        let _ = apt(&["install", "-y", pkg]);
    }
    if have(cmd) {
        return true;
    }
    eprintln!("SKIPPED: {cmd} is missing and `apt-get install {pkg}` could not install it");
    false
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `fs` ("xfs", "btrfs", "tmpfs", "exfat", "overlay") of `mib` MiB made and mounted
/// at `dir/fs` with mount options `opts`; None (said why) when its tools
/// cannot be had.
fn mount(dir: &Path, fs: &str, mib: u64, opts: &str) -> Option<Mounted> {
    mount_as(dir, fs, mib, opts, false)
}

/// [`mount`], exFAT through its FUSE driver (`fuse`) even where the
/// kernel has exFAT.
fn mount_as(dir: &Path, fs: &str, mib: u64, opts: &str, fuse: bool) -> Option<Mounted> {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts file systems and needs root");
    let mnt = dir.join(fs);
    std::fs::create_dir(&mnt).unwrap();
    let img = dir.join(format!("{fs}.img"));
    let mut m = Mounted { mnt, fs: fs.into(), img, opts: opts.into(), loop_dev: None };
    if fs == "tmpfs" {
        let o = if opts.is_empty() { format!("size={mib}m") } else { format!("size={mib}m,{opts}") };
        run("mount", &["-t", "tmpfs", "-o", &o, "tmpfs", m.mnt.to_str().unwrap()]);
        return Some(m);
    }
    if fs == "overlay" {
        // A container's root: a lower layer and an upper one on the host's disk.
        let layer = |n: &str| {
            let p = dir.join(format!("overlay-{n}"));
            std::fs::create_dir(&p).unwrap();
            p.display().to_string()
        };
        let o = format!("lowerdir={},upperdir={},workdir={}", layer("lower"), layer("upper"), layer("work"));
        run("mount", &["-t", "overlay", "-o", &o, "overlay", m.mnt.to_str().unwrap()]);
        return Some(m);
    }
    let (mkfs, pkg) = match fs {
        "xfs" => ("mkfs.xfs", "xfsprogs"),
        "btrfs" => ("mkfs.btrfs", "btrfs-progs"),
        "exfat" => ("mkfs.exfat", "exfatprogs"),
        _ => unreachable!(),
    };
    if !tool(mkfs, pkg) {
        return None;
    }
    std::fs::File::create(&m.img).unwrap().set_len(mib << 20).unwrap();
    let quiet: &[&str] = if fs == "exfat" { &[] } else { &["-q"] };
    run(mkfs, &[quiet, &[m.img.to_str().unwrap()]].concat());
    let kernel = std::fs::read_to_string("/proc/filesystems").unwrap().lines().any(|l| l.ends_with(&format!("\t{fs}")));
    if fs == "exfat" && (fuse || !kernel) {
        // No exFAT in this kernel: the FUSE driver, on a loop device.
        if !tool("mount.exfat-fuse", "exfat-fuse") {
            return None;
        }
        m.loop_dev = Some(run("losetup", &["-f", "--show", m.img.to_str().unwrap()]));
    }
    m.attach();
    Some(m)
}

const IMAGE: usize = 16 << 20;

/// A 16 MiB raw image (`pattern(seed)`) imported to a `dir:` remote under
/// `dir` in 256 KiB chunks: its bytes and URL.
fn volume(dir: &Path, seed: u64) -> (Vec<u8>, String) {
    let img = dir.join("src.raw");
    let data = common::make_raw(&img, IMAGE, seed);
    let url = format!("dir:{}", dir.join("remote/vol").display());
    common::run_ok(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url]);
    (data, url)
}

/// `serve`'s arguments for `url` with its cache in `cache`: changes stay
/// in the cache until the stop.
fn args<'a>(url: &'a str, cache: &'a Path) -> Vec<&'a str> {
    let cache = cache.to_str().unwrap();
    vec!["--volume", url, "--format", "raw", "--cache-dir", cache, "--sync-interval", "3600", "--boot-profile", "off"]
}

fn write(c: &mut Client, off: usize, data: &[u8], want: &mut [u8]) {
    c.write(off as u64, data).unwrap();
    want[off..off + data.len()].copy_from_slice(data);
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut v = Vec::with_capacity(IMAGE);
    for off in (0..IMAGE).step_by(common::BUF_LEN) {
        v.extend(c.read(off as u64, common::BUF_LEN.min(IMAGE - off)).unwrap());
    }
    v
}

fn kill9(mut d: Daemon) {
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Serves the volume at `url` (whose bytes are `want`) with its cache in
/// `cache`: writes of whole chunks, a page and part of one, FLUSH, reads;
/// a stop and a restart; writes, FLUSH and a kill -9; a restart that reads
/// them all; after its stop the remote holds them (an export). Returns
/// the first daemon's log.
fn serve_restart_kill(dir: &Path, url: &str, cache: &Path, mut want: Vec<u8>) -> String {
    let sock = dir.join("sock");
    let a = args(url, cache);
    let log = dir.join("serve.log");
    let d = Daemon::start_logged(&sock, &a, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    write(&mut c, 0, &pattern(101, 1 << 20), &mut want);
    write(&mut c, (5 << 20) + 1024, &pattern(102, 1536), &mut want);
    write(&mut c, IMAGE - 4096, &pattern(103, 4096), &mut want);
    c.flush().unwrap();
    assert!(read_all(&mut c) == want, "the disk read back differs from what was written");
    drop(c);
    assert!(d.stop().success(), "the stop failed");

    let d = Daemon::start(&sock, &a);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the writes are not there after a stop and restart");
    write(&mut c, 9 << 20, &pattern(104, 64 << 10), &mut want);
    write(&mut c, (12 << 20) + 512, &pattern(105, 512), &mut want);
    c.flush().unwrap();
    drop(c);
    kill9(d);

    let d = Daemon::start(&sock, &a);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "flushed writes are not there after a kill -9 and restart");
    drop(c);
    assert!(d.stop().success(), "the stop after the kill -9 failed");
    let out = dir.join("out.raw");
    common::run_ok(&["export", "--quiet", url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "the remote does not hold what the guest flushed");
    std::fs::read_to_string(&log).unwrap()
}

/// The round trip with the cache on `fs` mounted with `opts`: the first
/// daemon's log (None: skipped).
fn round_trip_on(fs: &str, mib: u64, opts: &str) -> Option<String> {
    let d = tempfile::tempdir().unwrap();
    let m = mount(d.path(), fs, mib, opts)?;
    let (want, url) = volume(d.path(), 7);
    Some(serve_restart_kill(d.path(), &url, &m.mnt.join("cache"), want))
}

#[test]
fn a_cache_on_xfs_keeps_every_flushed_write() {
    round_trip_on("xfs", 320, "");
}

#[test]
fn a_cache_on_btrfs_keeps_every_flushed_write() {
    round_trip_on("btrfs", 256, "");
}

#[test]
fn a_cache_on_btrfs_with_compression_keeps_every_flushed_write() {
    round_trip_on("btrfs", 256, "compress=zstd");
}

/// tmpfs (no RWF_NOWAIT; mounted noexec, nosuid, nodev as /tmp often is)
/// serves as a disk does, and the daemon says that what is flushed there
/// does not outlive the host.
#[test]
fn a_cache_on_tmpfs_keeps_every_flushed_write() {
    let log = round_trip_on("tmpfs", 64, "noexec,nosuid,nodev").unwrap();
    assert!(log.contains("in memory") && log.contains("--cache writethrough"), "no word of tmpfs' durability: {log}");
}

/// overlayfs (a container's file system; no RWF_NOWAIT either).
#[test]
fn a_cache_on_overlayfs_keeps_every_flushed_write() {
    round_trip_on("overlay", 0, "");
}

/// exFAT without holes, mounted private to its owner, with room for the
/// image: served as anywhere, warned that the data file takes the image's
/// whole length on the disk.
#[test]
fn a_cache_on_a_private_exfat_with_room_keeps_every_flushed_write() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "umask=077") else { return };
    let (want, url) = volume(d.path(), 8);
    let log = serve_restart_kill(d.path(), &url, &m.mnt.join("cache"), want);
    assert!(log.contains("has no sparse files"), "no word that the data file takes the image's length: {log}");
}

/// A nearly full exFAT with room for the cache: evicting a chunk frees no
/// space there (no holes), so the free space clean data leaves for
/// changes not uploaded yet (`--ssd-min-free`) is not kept by evicting —
/// which, sweep after sweep, would only have emptied the cache.
#[test]
fn a_cache_on_a_nearly_full_exfat_is_not_emptied_to_keep_space_free() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "umask=077") else { return };
    let (want, url) = volume(d.path(), 21);
    // Leave the cache's data file (the image's length) and 2 MiB more:
    // less than the twentieth of the disk kept free on other file systems.
    let st = rustix::fs::statvfs(&m.mnt).unwrap();
    let free = st.f_bavail * st.f_frsize;
    let filler = free - IMAGE as u64 - (2 << 20);
    std::fs::write(m.mnt.join("filler"), vec![1u8; filler as usize]).unwrap();
    let cache = m.mnt.join("cache");
    let sock = d.path().join("sock");
    let log = d.path().join("serve.log");
    let dm = Daemon::start_logged(&sock, &args(&url, &cache), &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want);
    // Two of the background loop's 2 s sweeps.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let o = Command::new(common::bin())
        .args(["status", "--cache-dir", cache.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ssd"]["evictions"], 0, "clean chunks were evicted from a cache on a disk without holes: {v}");
    assert_eq!(v["ssd"]["min_free"], 0, "a reserve is kept by evicting on a disk without holes: {v}");
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(dm.stop().success());
}

/// exFAT as a desktop mounts a stick for root, or a FUSE driver does by
/// default: every file 0777. The cache (the guest's disk) cannot be made
/// private there: refused at start, naming why and the way out.
#[test]
fn a_cache_on_an_exfat_open_to_everyone_is_refused_at_start() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "") else { return };
    let (_, url) = volume(d.path(), 9);
    let cache = m.mnt.join("cache");
    let e = common::serve_fails(&d.path().join("sock"), &args(&url, &cache));
    assert!(
        e.contains("keeps no Unix permissions") && e.contains("umask=077") && e.contains("--encrypt-cache"),
        "the refusal does not say why and how out: {e}"
    );
    assert!(!cache.join("data").exists(), "a data file was made before the refusal");
}

/// The same exFAT open to everyone holds an encrypted cache (an encrypted
/// volume served with --encrypt-cache): others can read only ciphertext,
/// so it serves, with a warning, and nothing the guest wrote is in clear.
#[test]
fn an_encrypted_cache_on_an_exfat_open_to_everyone_serves_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "") else { return };
    let img = d.path().join("src.raw");
    common::make_raw(&img, 4 << 20, 18);
    let key = d.path().join("key");
    std::fs::write(&key, pattern(19, 32)).unwrap();
    let kf = key.to_str().unwrap();
    let url = format!("dir:{}", d.path().join("remote/enc").display());
    common::run_ok(&[
        "import",
        "--quiet",
        "--format",
        "raw",
        "--encrypt",
        "--key-file",
        kf,
        img.to_str().unwrap(),
        &url,
    ]);
    let cache = m.mnt.join("cache");
    let sock = d.path().join("sock");
    let log = d.path().join("serve.log");
    let a = [args(&url, &cache), vec!["--key-file", kf, "--encrypt-cache"]].concat();
    let dm = Daemon::start_logged(&sock, &a, &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let page = pattern(20, 4096);
    c.write(8192, &page).unwrap();
    c.flush().unwrap();
    assert!(c.read(8192, 4096).unwrap() == page);
    drop(c);
    assert!(dm.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keeps no Unix permissions") && text.contains("only ciphertext"), "no warning: {text}");
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            assert!(!std::fs::read(&p).unwrap().windows(4096).any(|w| w == page), "{} holds the write", p.display());
        }
    }
}

/// A 256 MiB image, whose cache on exFAT (no holes) takes 256 MiB, on a
/// 64 MiB exFAT: refused at start, naming the missing feature and the
/// space, not failing a guest write with ENOSPC later.
#[test]
fn a_cache_on_an_exfat_too_small_for_the_image_is_refused_at_start() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 64, "umask=077") else { return };
    let img = d.path().join("big.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(256 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(3, 1 << 20), 200 << 20).unwrap();
    let url = format!("dir:{}", d.path().join("remote/big").display());
    common::run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);
    let cache = m.mnt.join("cache");
    let e = common::serve_fails(&d.path().join("sock"), &args(&url, &cache));
    assert!(
        e.contains("has no sparse files") && e.contains("256.0 MiB") && e.contains("--cache-dir on ext4, XFS or btrfs"),
        "the refusal does not name the missing feature, the room needed and the way out: {e}"
    );
}

/// The id a cache directory's state file names (its header line).
fn cache_id_of(cache: &Path) -> String {
    let b = std::fs::read(cache.join("state")).unwrap();
    let line = b.split(|&c| c == b'\n').next().unwrap();
    let v: serde_json::Value = serde_json::from_slice(line).unwrap();
    v["cache_id"].as_str().unwrap().to_string()
}

/// A btrfs snapshot of a subvolume keeps every inode number, the cache
/// directory's too, so it looked like the very cache it was taken of. A
/// holder killed with changes pending, its home snapshotted (snapper,
/// Timeshift): the snapshot's cache is another cache, refused while the
/// original holds the writer lease, never taking it as its own.
#[test]
fn a_btrfs_snapshot_of_a_cache_is_another_cache() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "btrfs", 256, "") else { return };
    let (mut want, url) = volume(d.path(), 10);
    let home = m.mnt.join("home");
    run("btrfs", &["-q", "subvolume", "create", home.to_str().unwrap()]);
    let cache = home.join("cache");
    let sock = d.path().join("sock");
    let dm = Daemon::start(&sock, &args(&url, &cache));
    let mut c = Client::connect(&sock, 1);
    // The first FLUSH cuts a generation at once; the second write stays
    // pending in the cache (`--sync-interval 3600`).
    write(&mut c, 4096, &pattern(11, 8192), &mut want);
    c.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    write(&mut c, 3 << 20, &pattern(12, 4096), &mut want);
    c.flush().unwrap();
    drop(c);
    kill9(dm);
    let id = cache_id_of(&cache);
    let snap = m.mnt.join("home-snapshot");
    run("btrfs", &["-q", "subvolume", "snapshot", home.to_str().unwrap(), snap.to_str().unwrap()]);
    let copy = snap.join("cache");
    let e = common::serve_fails(&sock, &args(&url, &copy));
    assert!(
        e.contains(&format!("looks like a copy of cache {id}")) && e.contains("btrfs subvolume"),
        "the snapshot's cache passed for the cache it was taken of: {e}"
    );
    assert_ne!(cache_id_of(&copy), id, "the snapshot kept the original's cache id");
    // The original is still itself: it serves its changes, and uploads them.
    let dm = Daemon::start(&sock, &args(&url, &cache));
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the original cache lost its changes");
    drop(c);
    assert!(dm.stop().success());
    assert_eq!(cache_id_of(&cache), id);
}

/// exFAT makes its inode numbers up at every mount: a cache there, its
/// holder killed with changes pending, the disk unplugged and plugged in
/// again (a remount), is still the same cache: it starts, takes its own
/// writer lease back and uploads the changes, never refused as a copy of
/// itself.
#[test]
fn a_cache_on_exfat_is_itself_after_a_remount() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "umask=077") else { return };
    let (mut want, url) = volume(d.path(), 14);
    let cache = m.mnt.join("cache");
    let sock = d.path().join("sock");
    let dm = Daemon::start(&sock, &args(&url, &cache));
    // The disk holds other files too, which someone looks at first after
    // the remount: the numbers handed out at lookup then go to them.
    let photos = m.mnt.join("photos");
    for i in 0..8 {
        std::fs::create_dir_all(photos.join(format!("{i}"))).unwrap();
    }
    let mut c = Client::connect(&sock, 1);
    // The first FLUSH cuts a generation at once; the second write stays
    // pending in the cache (`--sync-interval 3600`).
    write(&mut c, 0, &pattern(15, 8192), &mut want);
    c.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    write(&mut c, 5 << 20, &pattern(16, 4096), &mut want);
    c.flush().unwrap();
    drop(c);
    kill9(dm);
    let id = cache_id_of(&cache);
    m.remount();
    for e in std::fs::read_dir(&photos).unwrap() {
        std::fs::metadata(e.unwrap().path()).unwrap();
    }
    let log = d.path().join("serve.log");
    let a = args(&url, &cache);
    let dm = std::panic::catch_unwind(|| Daemon::start_logged(&sock, &a, &[], Some(&log)))
        .unwrap_or_else(|_| panic!("the remounted cache did not start: {}", std::fs::read_to_string(&log).unwrap()));
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the cache lost flushed writes across the remount");
    drop(c);
    assert!(dm.stop().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("looks like a copy"), "the remounted cache was taken for a copy of itself: {text}");
    assert_eq!(cache_id_of(&cache), id, "the remounted cache changed its id");
    let out = d.path().join("out.raw");
    common::run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "the pending changes did not reach the remote");
}

/// The cache root on exFAT (`DRIVEBLK_CACHE` there, no `--cache-dir`),
/// which has no symlinks: the volume's cache is recorded all the same,
/// and `status` finds it again from the URL.
#[test]
fn a_cache_root_on_exfat_records_and_finds_its_caches() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "umask=077") else { return };
    let (_, url) = volume(d.path(), 12);
    let root = m.mnt.join("root");
    let env = [("DRIVEBLK_CACHE", root.to_str().unwrap())];
    let sock = d.path().join("sock");
    let a = ["--volume", &url, "--format", "raw", "--sync-interval", "3600", "--boot-profile", "off"];
    let dm = Daemon::start_env(&sock, &a, &env);
    let mut c = Client::connect(&sock, 1);
    c.write(0, &pattern(13, 4096)).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(dm.stop().success());
    let o = Command::new(common::bin()).args(["status", &url, "--json"]).envs(env).output().unwrap();
    assert!(o.status.success(), "status did not find the cache: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["local"].is_object(), "status shows no local cache: {v}");
}

/// A cache directory on a file system mounted read-only (a backup disk, a
/// read-only snapshot): refused at start naming the mount and the way out.
#[test]
fn a_cache_on_a_read_only_mount_is_refused_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "tmpfs", 64, "") else { return };
    let (_, url) = volume(d.path(), 17);
    let cache = m.mnt.join("cache");
    let sock = d.path().join("sock");
    assert!(Daemon::start(&sock, &args(&url, &cache)).stop().success());
    run("mount", &["-o", "remount,ro", m.mnt.to_str().unwrap()]);
    for dir in [&cache, &m.mnt.join("new")] {
        let e = common::serve_fails(&sock, &args(&url, dir));
        assert!(
            e.contains("on tmpfs, mounted read-only") && e.contains("remount it read-write"),
            "the refusal does not name the read-only mount and the way out: {e}"
        );
    }
}

/// A fork names its origin's packs `<origin id>:<pack>`, and exFAT takes
/// no `:` in a file name: the fork's cache there still keeps the packs'
/// sub-frame indexes it fetched, so a restart does not fetch them again.
#[test]
fn a_forks_cache_on_exfat_keeps_its_origins_pack_indexes() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 96, "umask=077") else { return };
    let (want, url) = volume(d.path(), 21);
    let sock = d.path().join("sock");
    let first = d.path().join("cache");
    assert!(Daemon::start(&sock, &args(&url, &first)).stop().success());
    let fork = format!("dir:{}", d.path().join("remote/fork").display());
    common::run_ok(&["fork", &url, &fork, "--cache-dir", first.to_str().unwrap()]);
    let cache = m.mnt.join("cache");
    let dm = Daemon::start(&sock, &args(&fork, &cache));
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(3 << 20, 4096).unwrap() == want[3 << 20..(3 << 20) + 4096]);
    drop(c);
    // The indexes are fetched in the background from the start.
    let indexes = cache.join("indexes");
    let saved = || std::fs::read_dir(&indexes).map(|r| r.count()).unwrap_or(0);
    let t0 = std::time::Instant::now();
    while saved() == 0 && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(dm.stop().success());
    assert!(saved() > 0, "no sub-frame index of the origin's pack was kept in the fork's cache on exFAT");
}

/// A `dir:` remote on an exFAT disk carried between machines (the kind a
/// USB stick or an external SSD comes formatted with): it has no hard
/// links, which a commit's create-if-absent rests on elsewhere. Imported
/// there, served from one machine's cache (writes, a stop, a kill -9),
/// the disk unplugged and plugged in again, then served from a second
/// machine's empty cache: every flushed write is there, and that
/// machine's changes land too.
#[test]
fn a_dir_remote_on_exfat_takes_commits_and_another_machine_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount(d.path(), "exfat", 128, "umask=077") else { return };
    let img = d.path().join("src.raw");
    let mut want = common::make_raw(&img, IMAGE, 21);
    let url = format!("dir:{}", m.mnt.join("vm").display());
    common::run_ok(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url]);
    let first = d.path().join("first");
    std::fs::create_dir(&first).unwrap();
    let log = serve_restart_kill(&first, &url, &first.join("cache"), want.clone());
    assert!(!log.contains("ERROR"), "the first machine's daemon logged errors: {log}");
    let out = std::fs::read(first.join("out.raw")).unwrap();
    want.copy_from_slice(&out);

    m.remount();
    let sock = d.path().join("sock2");
    let cache = d.path().join("second-cache");
    let a = args(&url, &cache);
    let dm = Daemon::start(&sock, &a);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the second machine does not read what the first one flushed");
    write(&mut c, 3 << 20, &pattern(22, 128 << 10), &mut want);
    c.flush().unwrap();
    drop(c);
    assert!(dm.stop().success(), "the second machine's stop failed");
    let out = d.path().join("out2.raw");
    common::run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == want, "the remote does not hold the second machine's writes");
}

/// A `--shared-cache` directory on a mount that stops answering (an exFAT
/// FUSE mount whose driver is stopped: every call into it waits, as on an
/// NFS mount whose server went away). A daemon started then starts, and
/// reads the whole disk from the remote, each read waiting for the
/// directory at most once; when the mount answers again the directory
/// serves again; a stop while it hangs ends cleanly.
#[test]
fn a_shared_cache_on_a_mount_that_hangs_is_passed_by() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = mount_as(d.path(), "exfat", 96, "umask=077", true) else { return };
    let (want, url) = volume(d.path(), 61);
    let shared = m.mnt.join("shared");
    let sh = shared.to_str().unwrap();
    let status = |ctl: &Path| -> serde_json::Value {
        serde_json::from_str(&common::run_ok(&["status", "--control", ctl.to_str().unwrap(), "--json"])).unwrap()
    };
    // Host A fills the shared directory.
    let cache_a = d.path().join("cache-a");
    let sock = d.path().join("sock-a");
    let da = Daemon::start(&sock, &[args(&url, &cache_a), vec!["--shared-cache", sh]].concat());
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(da.stop().success());

    // The mount hangs; host B starts with an empty cache.
    m.freeze(true);
    let cache_b = d.path().join("cache-b");
    let sock = d.path().join("sock-b");
    let ctl = d.path().join("sock-b.ctl");
    let log = d.path().join("serve-b.log");
    let t0 = std::time::Instant::now();
    let db = Daemon::start_logged(&sock, &[args(&url, &cache_b), vec!["--shared-cache", sh]].concat(), &[], Some(&log));
    let mut c = Client::connect(&sock, 1);
    let started = t0.elapsed();
    let t0 = std::time::Instant::now();
    let got = read_all(&mut c);
    let read = t0.elapsed();
    assert!(got == want, "wrong bytes read past a hung shared directory");
    let s = status(&ctl);
    let sc = &s["shared_cache"];
    assert!(sc["hung"] == true && sc["hangs"] == 1 && sc["hits"] == 0, "{s}");
    assert!(sc["bypassed"].as_u64().unwrap() >= 64, "{s}");
    // One wait of 5 s for the directory: at the start, or at the first
    // read where the kernel still had the directory's attributes; the
    // reads after it go straight to the remote, on a local disk.
    assert!(
        started < Duration::from_secs(15) && read < Duration::from_secs(20),
        "started in {started:?}, read the disk in {read:?}"
    );

    // The mount answers again: dropped from the cache, the disk is read
    // from the directory's entries.
    m.freeze(false);
    let t0 = std::time::Instant::now();
    while status(&ctl)["shared_cache"]["hung"] == true {
        assert!(t0.elapsed() < Duration::from_secs(20), "the directory never counted as answering again");
        std::thread::sleep(Duration::from_millis(100));
    }
    common::run_ok(&["drop-cache", "--control", ctl.to_str().unwrap(), "--json"]);
    assert!(read_all(&mut c) == want);
    let s = status(&ctl);
    assert!(s["shared_cache"]["hits"].as_u64().unwrap() >= 64, "the directory serves no more once back: {s}");

    // It hangs again, and the daemon stops cleanly meanwhile.
    m.freeze(true);
    common::run_ok(&["drop-cache", "--control", ctl.to_str().unwrap(), "--json"]);
    assert!(read_all(&mut c) == want);
    drop(c);
    let t0 = std::time::Instant::now();
    let st = db.stop();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(st.success() && t0.elapsed() < Duration::from_secs(20), "stop: {st:?} in {:?}: {logged}", t0.elapsed());
    assert!(logged.contains("has not answered in 5 s") && logged.contains("answers again"), "{logged}");
    m.freeze(false);
}
