//! "One disk, several machines": scenarios run against any remote (`dir:`
//! and the Drive emulator), with real daemon processes as the hosts. A host
//! is a cache directory plus a name (`DRIVEBLK_HOSTNAME`) and optionally a
//! skewed clock (`DRIVEBLK_TEST_CLOCK_OFFSET_S`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Client, Daemon};

pub const CHUNK: &str = "256K";
pub const SIZE: usize = 4 << 20;

/// One machine: its name, cache directory, environment, and the flags
/// every command needs to reach the remote.
pub struct Host {
    pub name: String,
    pub cache: PathBuf,
    pub env: Vec<(String, String)>,
    pub flags: Vec<String>,
    pub dir: PathBuf,
}

impl Host {
    pub fn new(root: &Path, name: &str, flags: &[String], extra_env: &[(&str, &str)]) -> Self {
        let dir = root.join(format!("host-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = vec![
            ("DRIVEBLK_HOSTNAME".to_string(), name.to_string()),
            ("DRIVEBLK_CACHE".to_string(), dir.join("caches").display().to_string()),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self { name: name.into(), cache: dir.join("cache"), env, flags: flags.to_vec(), dir }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    fn serve_args<'a>(&'a self, url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--volume", url, "--format", "raw", "--cache-dir", self.cache.to_str().unwrap()];
        a.extend_from_slice(&["--boot-profile", "off", "--sync-interval", "3600"]);
        a.extend_from_slice(extra);
        a.extend(self.flags.iter().map(String::as_str));
        a
    }

    /// `serve` until stopped; writes stay pending (the sync interval is an
    /// hour) until a clean stop.
    pub fn serve(&self, url: &str, extra: &[&str]) -> Daemon {
        let sock = self.dir.join("sock");
        let _ = std::fs::remove_file(&sock);
        Daemon::start_logged(&sock, &self.serve_args(url, extra), &self.env(), Some(&self.log()))
    }

    /// The log of the newest daemon `serve` started.
    pub fn log(&self) -> PathBuf {
        self.dir.join("serve.log")
    }

    /// `serve` that is expected to refuse to start: its output.
    pub fn serve_refused(&self, url: &str, extra: &[&str]) -> String {
        self.serve_refused_with_status(url, extra).1
    }

    /// [`serve_refused`](Self::serve_refused), with its exit status.
    pub fn serve_refused_with_status(&self, url: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
        let sock = self.dir.join("sock-refused");
        let err = self.dir.join("refused.stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .arg("serve")
            .arg("--socket")
            .arg(&sock)
            .args(self.serve_args(url, extra))
            .envs(self.env())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        // Refused means it exits on its own, before serving.
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if sock.exists() || t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("a second writer was not refused: it started serving");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "a second writer was not refused");
        (status, std::fs::read_to_string(&err).unwrap())
    }

    /// Runs `driveblk ARGS` (plus the remote flags) on this host.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_driveblk")).args(args).args(&self.flags).envs(self.env()).output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout)
    }

    /// `status URL --json` from this host: the lease part.
    pub fn lease(&self, url: &str) -> Value {
        let empty = self.dir.join("no-cache");
        let o = self.cli(&["status", url, "--json", "--cache-dir", empty.to_str().unwrap()]);
        assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["lease"].clone()
    }
}

/// Imports `SIZE` bytes of data as a volume at `url`; returns the bytes.
pub fn import(h: &Host, url: &str) -> Vec<u8> {
    let img = h.dir.join("disk.raw");
    let bytes = crate::common::pattern(7, SIZE);
    std::fs::write(&img, &bytes).unwrap();
    h.cli_ok(&["import", "--quiet", "--chunk-size", CHUNK, img.to_str().unwrap(), url]);
    bytes
}

pub fn connect(d: &Daemon) -> Client {
    Client::connect(&d.socket, 1)
}

/// Writes and flushes `data` at `off`, keeping `want` in step.
pub fn write(c: &mut Client, off: u64, data: &[u8], want: &mut [u8]) {
    c.write(off, data).unwrap();
    c.flush().unwrap();
    want[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// The first FLUSH of a session cuts a generation at once (the sync
/// interval counts from the last cut); this one is it, so the writes after
/// it stay pending for the hour-long interval. Applied to every `wants`.
pub fn prime(c: &mut Client, wants: &mut [&mut Vec<u8>]) {
    let data = crate::common::pattern(99, 4096);
    c.write((SIZE - 4096) as u64, &data).unwrap();
    c.flush().unwrap();
    for w in wants {
        w[SIZE - 4096..].copy_from_slice(&data);
    }
}

pub fn read_all(c: &mut Client) -> Vec<u8> {
    c.read(0, c.capacity as usize).unwrap()
}

/// Waits until the remote's lease record says `host` holds it with
/// changes pending (its heartbeat caught up with the guest's writes).
pub fn wait_pending(observer: &Host, url: &str, host: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let l = observer.lease(url);
        if l["holder"]["host"] == host && l["holder"]["pending_bytes"].as_u64().unwrap_or(0) > 0 {
            return l;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the lease never showed pending bytes: {l}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill9(mut d: Daemon) {
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Two hosts alternate on one disk: while the first runs with changes not
/// uploaded, the second is refused with who and what; a reader is not;
/// after a clean stop the second starts at once and sees the first's
/// writes, and the first, back again, sees the second's. The hosts'
/// clocks are an hour apart both ways.
pub fn two_hosts_alternate(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "3600")]);
    let b = Host::new(root, "laptop", flags, &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "-3600")]);
    let mut want = import(&a, url);
    let da = a.serve(url, &[]);
    let pid = da.child.as_ref().unwrap().id();
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut want]);
    let original = want.clone();
    write(&mut c, 300 << 10, &crate::common::pattern(1, 8192), &mut want);
    drop(c);
    wait_pending(&b, url, "desktop");
    // B is refused, and told by whom, since when, how much waits there,
    // and that A still runs: stopping it there (or syncing) is the way,
    // not starting it again.
    let e = b.serve_refused(url, &[]);
    assert!(e.contains(&format!("held by desktop (pid {pid}) since ")), "{e}");
    assert!(e.contains("not yet uploaded") && e.contains("it is running there"), "{e}");
    assert!(e.contains(&format!("`driveblk sync {url}` there")) && !e.contains("start it there"), "{e}");
    assert!(e.contains("--force-takeover"), "{e}");
    // `status URL` from B's side shows the same.
    let st = b.cli_ok(&["status", url, "--cache-dir", b.dir.join("none").to_str().unwrap()]);
    assert!(st.contains(&format!("held by desktop (pid {pid})")) && st.contains("not yet uploaded"), "{st}");
    // A reader needs no lease: it sees the last committed generation.
    let db = b.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&db.socket, 1, true);
    assert!(read_all(&mut rc) == original, "a reader saw uncommitted data");
    drop(rc);
    assert!(db.stop().success());
    // A stops cleanly: uploads, releases.
    assert!(da.stop().success());
    let l = b.lease(url);
    assert_eq!(l["standing"], "released", "{l}");
    // B starts at once and sees A's writes; writes its own.
    let db = b.serve(url, &[]);
    let mut c = connect(&db);
    assert!(read_all(&mut c) == want, "B does not see A's writes");
    write(&mut c, 3 << 20, &crate::common::pattern(2, 4096), &mut want);
    drop(c);
    assert!(db.stop().success());
    // A again, on its old cache: sees B's writes.
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    assert!(read_all(&mut c) == want, "A does not see B's writes");
    drop(c);
    assert!(da.stop().success());
}

/// A forced takeover: A's pending changes fork. A's later commit is
/// fenced (the remote keeps B's generations), A cannot serve them on top
/// of B's, and `fork` saves them as a new volume that shares the origin's
/// data and boots on any host with A's disk.
pub fn forced_takeover_then_fork(root: &Path, url: &str, new_url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[]);
    let b = Host::new(root, "laptop", flags, &[]);
    let c_host = Host::new(root, "server", flags, &[]);
    let mut base = import(&a, url);
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut base]);
    let (mut want_a, mut want_b) = (base.clone(), base.clone());
    write(&mut c, 0, &crate::common::pattern(3, 65536), &mut want_a);
    write(&mut c, 1 << 20, &crate::common::pattern(4, 4096), &mut want_a);
    drop(c);
    wait_pending(&b, url, "desktop");
    // B forces: it says exactly what forks, then serves.
    let db = b.serve(url, &["--force-takeover"]);
    let log = std::fs::read_to_string(b.log()).unwrap();
    assert!(
        log.contains("--force-takeover")
            && log.contains("from desktop (pid ")
            && log.contains("KiB not yet uploaded stay on desktop"),
        "the takeover did not say what forks: {log}"
    );
    let mut c = connect(&db);
    assert!(read_all(&mut c) == base);
    write(&mut c, 2 << 20, &crate::common::pattern(5, 4096), &mut want_b);
    drop(c);
    assert!(db.stop().success());
    assert_eq!(b.lease(url)["standing"], "released");
    // A's stop tries to commit on top of the generation it started from:
    // fenced. Its changes stay in its cache; the log says what to do with
    // them (not that the next start uploads them), and the exit status
    // keeps systemd from starting it again and again.
    let st = da.stop();
    let log = std::fs::read_to_string(a.log()).unwrap();
    assert_eq!(st.code(), Some(78), "a stop with diverged changes exits 78: {log}");
    assert!(
        log.contains("the volume moved on without them") && log.contains("driveblk fork URL NEWURL"),
        "the stop did not say how to keep the changes: {log}"
    );
    assert!(!log.contains("uploaded at the next start"), "the stop promised an upload that cannot happen: {log}");
    let status: Value = serde_json::from_slice(&std::fs::read(a.cache.join("status.json")).unwrap()).unwrap();
    let conflict = status["sync"]["conflict"].as_str().unwrap_or_default().to_string();
    assert!(conflict.contains("moved on") || conflict.contains("in use"), "{status}");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_b, "the remote is not B's disk: A committed over it");
    drop(rc);
    assert!(dr.stop().success());
    // A's cache refuses to serve its changes over B's, and says what to do.
    let (st, e) = a.serve_refused_with_status(url, &[]);
    assert!(e.contains("driveblk fork") && e.contains("discard-local"), "{e}");
    assert_eq!(st.code(), Some(78), "{e}");
    // fork saves A's state as a new volume sharing the origin's packs.
    let out = a.cli_ok(&["fork", url, new_url, "--cache-dir", a.cache.to_str().unwrap()]);
    assert!(out.contains("saved"), "{out}");
    // Another host boots the fork (no cache): A's disk.
    let dc = c_host.serve(new_url, &[]);
    let mut c = connect(&dc);
    assert!(read_all(&mut c) == want_a, "the fork does not hold A's disk");
    drop(c);
    assert!(dc.stop().success());
    // And A's own cache, now the fork's, serves it too.
    let da = a.serve(new_url, &[]);
    let mut c = connect(&da);
    assert!(read_all(&mut c) == want_a);
    drop(c);
    assert!(da.stop().success());
    // The origin is untouched.
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_b);
    drop(rc);
    assert!(dr.stop().success());
}

/// A holder killed with changes pending keeps the lease however long it
/// is silent (its ttl is short here); its restart uploads them, and then
/// the next host starts and sees them. Then a silent holder with nothing
/// pending: live, it is not taken over by a host whose clock is an hour
/// ahead; once silent past its ttl (by the remote's clock) a host whose
/// clock is an hour behind takes over.
pub fn killed_holder_and_expiry(root: &Path, url: &str, flags: &[String]) {
    // Heartbeats every 750 ms: a live holder looks silent only after four
    // in a row are late, which a loaded 2-CPU machine did at 1.5 s.
    let ttl = [("DRIVEBLK_LEASE_TTL_MS", "3000")];
    let a = Host::new(root, "desktop", flags, &ttl);
    let b = Host::new(root, "laptop", flags, &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "3600")]);
    let b_behind = Host::new(root, "laptop2", flags, &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "-3600")]);
    let mut want = import(&a, url);
    let da = a.serve(url, &[]);
    let pid = da.child.as_ref().unwrap().id();
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut want]);
    write(&mut c, 512 << 10, &crate::common::pattern(6, 16384), &mut want);
    drop(c);
    wait_pending(&b, url, "desktop");
    kill9(da);
    // Silent for longer than its ttl, by any clock: still held.
    std::thread::sleep(Duration::from_millis(4000));
    let e = b.serve_refused(url, &[]);
    assert!(e.contains(&format!("held by desktop (pid {pid})")) && e.contains("not yet uploaded"), "{e}");
    // Silent: not running there any more, so starting it again is the way.
    assert!(e.contains("start it there and let it sync") && !e.contains("it is running there"), "{e}");
    // A restarts on its cache: re-takes its own lease and uploads.
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    assert!(read_all(&mut c) == want, "a flushed write was lost");
    drop(c);
    assert!(da.stop().success());
    let db = b.serve(url, &[]);
    let mut c = connect(&db);
    assert!(read_all(&mut c) == want, "A's restart did not upload its changes");
    drop(c);
    assert!(db.stop().success());

    // Nothing pending, alive: a host whose clock runs an hour ahead must
    // not think it silent.
    let da = a.serve(url, &[]);
    let l = b.lease(url);
    assert_eq!(l["standing"], "held", "{l}");
    let e = b.serve_refused(url, &[]);
    assert!(e.contains("nothing pending"), "{e}");
    kill9(da);
    // Gone with nothing pending: once silent past its ttl by the remote's
    // clock, a host whose clock runs an hour behind takes over.
    let t0 = Instant::now();
    let db = loop {
        let l = b_behind.lease(url);
        if l["standing"] == "expired" {
            break b_behind.serve(url, &[]);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the silent lease never expired: {l}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut c = connect(&db);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(db.stop().success());
}

/// `discard-local` drops a fenced host's changes when asked; its cache then
/// follows the newest generation.
pub fn discard_local(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[]);
    let b = Host::new(root, "laptop", flags, &[]);
    let mut base = import(&a, url);
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut base]);
    let mut want_b = base.clone();
    let mut scratch = base.clone();
    write(&mut c, 0, &crate::common::pattern(8, 4096), &mut scratch);
    drop(c);
    wait_pending(&b, url, "desktop");
    kill9(da);
    let db = b.serve(url, &["--force-takeover"]);
    let mut c = connect(&db);
    write(&mut c, 4096, &crate::common::pattern(9, 4096), &mut want_b);
    drop(c);
    assert!(db.stop().success());
    let e = a.serve_refused(url, &[]);
    assert!(e.contains("discard-local"), "{e}");
    let out = a.cli_ok(&["discard-local", url, "--cache-dir", a.cache.to_str().unwrap()]);
    assert!(out.contains("dropped"), "{out}");
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    assert!(read_all(&mut c) == want_b, "after discard-local the cache does not follow the newest generation");
    drop(c);
    assert!(da.stop().success());
}

/// A laptop that slept through its lease (its daemon stopped with
/// SIGSTOP, nothing pending): once silent past its ttl, another host takes
/// over and writes. The laptop wakes, its guest writes, and its next
/// commit meets the fence: refused, nothing overwritten, its change kept.
///
/// `gc_retired`: meanwhile the other host commits more and gc (keep 1,
/// grace 0) retires every older generation, the one the laptop commits
/// next among them: its create would find that key free again, and the
/// commit must still be refused. gc keeps the one the laptop's changes
/// are based on (the takeover put a hold on it), so they still fork.
pub fn sleeping_holder_is_fenced(root: &Path, url: &str, flags: &[String], gc_retired: bool) {
    let a = Host::new(root, "laptop", flags, &[("DRIVEBLK_LEASE_TTL_MS", "1500")]);
    let b = Host::new(root, "desktop", flags, &[]);
    let mut want = import(&a, url);
    let da = a.serve(url, &[]);
    let pid = da.child.as_ref().unwrap().id() as i32;
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut want]);
    // The prime is committed and the heartbeat says so.
    let t0 = Instant::now();
    while b.lease(url)["holder"]["pending_bytes"].as_u64() != Some(0)
        || a.cli_ok(&["info", url]).contains("generation  2\n")
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "the first commit never landed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let info: Value = serde_json::from_str(&a.cli_ok(&["info", "--json", url])).unwrap();
    let next = info["generation"].as_u64().unwrap() + 1;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    while b.lease(url)["standing"] != "expired" {
        assert!(t0.elapsed() < Duration::from_secs(60), "the sleeping holder's lease never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut want_b = want.clone();
    let db = b.serve(url, &[]);
    let mut cb = connect(&db);
    write(&mut cb, 8192, &crate::common::pattern(11, 4096), &mut want_b);
    drop(cb);
    assert!(db.stop().success());
    if gc_retired {
        // More than half the chunks change after the first FLUSH (which
        // cuts a generation of its own): a full manifest, so gc needs
        // no older generation for the newest's delta chain.
        let db = b.serve(url, &[]);
        let mut cb = connect(&db);
        for chunk in 3..14u64 {
            write(&mut cb, chunk << 18, &crate::common::pattern(20 + chunk, 1 << 18), &mut want_b);
        }
        drop(cb);
        assert!(db.stop().success());
        let rep = b.cli_ok(&["gc", url, "--keep-generations", "1", "--grace", "0s", "--json"]);
        assert!(rep.contains(&format!("gen-{next:020}")), "gc retired the laptop's next generation: {rep}");
        assert!(rep.contains("the changes of laptop"), "gc does not say what it keeps for the laptop: {rep}");
    }
    // The laptop wakes up and writes.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut want_a = want.clone();
    write(&mut c, 16384, &crate::common::pattern(12, 4096), &mut want_a);
    drop(c);
    let o = a.cli(&["sync", url, "--cache-dir", a.cache.to_str().unwrap(), "--timeout", "60"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("moved on"), "the woken holder's commit was not fenced: {e}");
    assert_eq!(da.stop().code(), Some(78), "a stop with diverged changes exits 78");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_b, "the woken holder overwrote the other host's generation");
    drop(rc);
    assert!(dr.stop().success());
    // Its change is kept: a fork holds the laptop's disk — even after gc
    // with `--keep-generations 1`: the takeover put a hold on the
    // generation the laptop's changes are based on, which its fork removes.
    let f = format!("{url}-laptop");
    a.cli_ok(&["fork", url, &f, "--cache-dir", a.cache.to_str().unwrap()]);
    if let Some(dir) = url.strip_prefix("dir:") {
        let holds: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("hold-"))
            .collect();
        assert!(holds.is_empty(), "the fork left the hold kept for its changes: {holds:?}");
    }
    let dr = reader.serve(&f, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_a, "the fork lost the woken holder's change");
    drop(rc);
    assert!(dr.stop().success());
}

/// A laptop frozen while its commit's packs upload (SIGSTOP: a lid closed
/// mid-commit, after the commit had started): another host takes the lease
/// by force, commits past it, and gc (keep 1, grace 0) retires every older
/// generation, the one the laptop is committing among them. Woken, the
/// laptop finds that key free again; its commit must still be refused —
/// landed there, it would sit in a gap no reader looks at, its chunks
/// marked clean, its packs later deleted by gc.
pub fn frozen_mid_commit_is_fenced(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "laptop", flags, &[]);
    let b = Host::new(root, "desktop", flags, &[]);
    let mut want = import(&a, url);
    // 2 MiB of changes that do not compress, at 512 KiB/s: 4 s of upload.
    let da = a.serve(url, &["--bwlimit", "512K:off"]);
    let pid = da.child.as_ref().unwrap().id() as i32;
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut want]);
    let mut want_a = want.clone();
    write(&mut c, 1 << 20, &crate::common::pattern(17, 2 << 20), &mut want_a);
    drop(c);
    wait_pending(&b, url, "laptop");
    let info: Value = serde_json::from_str(&a.cli_ok(&["info", "--json", url])).unwrap();
    let next = info["generation"].as_u64().unwrap() + 1;
    let mut sync = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["sync", url, "--cache-dir", a.cache.to_str().unwrap(), "--timeout", "120"])
        .args(&a.flags)
        .envs(a.env())
        .stderr(std::fs::File::create(a.dir.join("sync.stderr")).unwrap())
        .spawn()
        .unwrap();
    // The commit has started (its chunks are read and packed at once);
    // its pack is still going up.
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let info: Value = serde_json::from_str(&a.cli_ok(&["info", "--json", url])).unwrap();
    assert_eq!(info["generation"].as_u64(), Some(next - 1), "the laptop committed before it was frozen");
    // The desktop takes over and writes; a full manifest, so gc needs no
    // older generation for the newest's delta chain.
    let mut want_b = want.clone();
    let db = b.serve(url, &["--force-takeover"]);
    let mut cb = connect(&db);
    for chunk in 3..14u64 {
        write(&mut cb, chunk << 18, &crate::common::pattern(40 + chunk, 1 << 18), &mut want_b);
    }
    drop(cb);
    assert!(db.stop().success());
    let rep = b.cli_ok(&["gc", url, "--keep-generations", "1", "--grace", "0s", "--json"]);
    assert!(rep.contains(&format!("gen-{next:020}")), "gc did not retire the laptop's next generation: {rep}");
    // The laptop wakes up: its commit is refused, never created in the gap.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let st = crate::common::wait_timeout(&mut sync, Duration::from_secs(150));
    let e = std::fs::read_to_string(a.dir.join("sync.stderr")).unwrap();
    assert!(!st.success() && e.contains("moved on"), "the woken laptop's commit was not fenced: {e}");
    if let Some(dir) = url.strip_prefix("dir:") {
        let gap = Path::new(dir).join(format!("gen-{next:020}"));
        assert!(!gap.exists(), "the woken laptop committed generation {next} in the gap gc left");
    }
    assert_eq!(da.stop().code(), Some(78), "a stop with diverged changes exits 78");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_b, "the remote is not the desktop's disk");
    drop(rc);
    assert!(dr.stop().success());
}

/// gc judges ages by the remote's clock alone, never a host's: run from a
/// host whose clock is an hour ahead, it still sees that another host
/// committed a moment ago (and refuses); run from one two days ahead (as
/// the writer's host, so past that check), it deletes nothing younger than
/// its grace period (24 h by default) — not even what retention retired.
pub fn gc_by_the_remote_clock(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[]);
    let ahead = Host::new(root, "laptop", flags, &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "3600")]);
    let far = Host::new(
        root,
        "desktop-later",
        flags,
        &[("DRIVEBLK_TEST_CLOCK_OFFSET_S", "172800"), ("DRIVEBLK_HOSTNAME", "desktop")],
    );
    let mut want = import(&a, url);
    for seed in [31, 32] {
        let da = a.serve(url, &[]);
        let mut c = connect(&da);
        write(&mut c, 0, &crate::common::pattern(seed, 1 << 18), &mut want);
        drop(c);
        assert!(da.stop().success());
    }
    let o = ahead.cli(&["gc", url, "--keep-generations", "1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("committed by desktop"), "gc ran over a writer of a moment ago: {e}");
    let o = far.cli(&["gc", url, "--keep-generations", "1", "--json"]);
    assert!(o.status.success(), "gc: {}", String::from_utf8_lossy(&o.stderr));
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["deleted"], serde_json::json!([]), "gc deleted objects younger than its grace period: {rep}");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want);
    drop(rc);
    assert!(dr.stop().success());
}

/// The id a cache directory's state file names (its header line).
pub fn cache_id_of(cache: &Path) -> String {
    let b = std::fs::read(cache.join("state")).unwrap();
    let line = b.split(|&c| c == b'\n').next().unwrap();
    let v: Value = serde_json::from_slice(line).unwrap();
    v["cache_id"].as_str().unwrap().to_string()
}

/// A cache directory copied (`cp -a` to pre-warm a laptop, a restored
/// backup) is another cache, not the one it was copied from: A is killed
/// with changes pending, B starts on a copy of A's cache. B does not take
/// A's lease as its own (it is told its directory looks like a copy of
/// A's cache, and that `--force-takeover` takes it if the original is
/// gone); forced, B writes and commits. A, back on its own cache, finds
/// the volume moved on: its changes are refused as a conflict, never
/// committed on top of B's, and the remote holds B's disk.
pub fn copied_cache_is_another_cache(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[]);
    let b = Host::new(root, "laptop", flags, &[]);
    let mut base = import(&a, url);
    let da = a.serve(url, &[]);
    let mut c = connect(&da);
    prime(&mut c, &mut [&mut base]);
    let mut want_a = base.clone();
    write(&mut c, 0, &crate::common::pattern(13, 8192), &mut want_a);
    write(&mut c, 1 << 20, &crate::common::pattern(14, 4096), &mut want_a);
    drop(c);
    wait_pending(&b, url, "desktop");
    kill9(da);
    let a_id = cache_id_of(&a.cache);
    let st = Command::new("cp").arg("-a").arg(&a.cache).arg(&b.cache).status().unwrap();
    assert!(st.success(), "cp -a");
    // The lease A holds is not B's, however alike their caches are.
    let e = b.serve_refused(url, &[]);
    assert!(e.contains("held by desktop (pid ") && e.contains("not yet uploaded"), "{e}");
    assert!(
        e.contains(&format!("looks like a copy of cache {a_id}")) && e.contains("--force-takeover"),
        "the refusal does not say the cache is a copy: {e}"
    );
    // Its first open said so, and made it a cache of its own.
    let warned = format!("cache directory {} looks like a copy of cache {a_id}", b.cache.display());
    assert!(e.contains(&warned), "no warning that the cache is a copy: {e}");
    let b_id = cache_id_of(&b.cache);
    assert_ne!(b_id, a_id, "the copy kept the original's cache id");
    // Forced, B serves its copy (A's flushed writes included), writes
    // over A's changes and elsewhere, and commits at its stop.
    let db = b.serve(url, &["--force-takeover"]);
    let mut c = connect(&db);
    assert!(read_all(&mut c) == want_a, "the copy does not hold A's flushed writes");
    let mut want_b = want_a.clone();
    write(&mut c, 4096, &crate::common::pattern(15, 4096), &mut want_b);
    write(&mut c, 2 << 20, &crate::common::pattern(16, 4096), &mut want_b);
    drop(c);
    assert!(db.stop().success());
    assert_eq!(b.lease(url)["standing"], "released");
    // A, on its own cache: its changes were made on the generation B
    // replaced. Refused, and kept; nothing of A's goes over B's.
    let e = a.serve_refused(url, &[]);
    assert!(e.contains("moved on") && e.contains("driveblk fork"), "{e}");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == want_b, "the remote is not B's disk");
    drop(rc);
    assert!(dr.stop().success());
    assert_eq!(cache_id_of(&a.cache), a_id, "the original's restart changed its cache id");
}

/// The desktop still runs, idle (nothing pending), when the laptop takes
/// the lease by force. The desktop learns it at its next heartbeat: its
/// status says the lease is lost and to whom (not "held by this host");
/// a write its guest makes then meets the fence, and `sync` names fork;
/// its stop exits 78 and does not claim to release a lease it lost.
pub fn running_holder_learns_it_was_taken_over(root: &Path, url: &str, flags: &[String]) {
    let a = Host::new(root, "desktop", flags, &[("DRIVEBLK_LEASE_TTL_MS", "2000")]);
    let b = Host::new(root, "laptop", flags, &[]);
    let base = import(&a, url);
    let cache = a.cache.to_str().unwrap().to_string();
    let da = a.serve(url, &[]);
    let db = b.serve(url, &["--force-takeover"]);
    let t0 = Instant::now();
    loop {
        let o = a.cli(&["status", "--cache-dir", &cache, "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if v["lease"]["lost"].as_str().is_some_and(|s| s.contains("laptop (pid ")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the desktop never noticed the takeover: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = a.cli_ok(&["status", "--cache-dir", &cache]);
    assert!(st.contains("lease       LOST: laptop") && !st.contains("held by this host"), "{st}");
    let mut want = base.clone();
    let mut c = connect(&da);
    write(&mut c, 4096, &crate::common::pattern(13, 4096), &mut want);
    drop(c);
    let o = a.cli(&["sync", url, "--cache-dir", &cache, "--timeout", "60"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && e.contains("moved on") && e.contains("driveblk fork"), "{e}");
    assert!(db.stop().success());
    let status = da.stop();
    let log = std::fs::read_to_string(a.log()).unwrap();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(!log.contains("released the writer lease"), "the desktop released a lease it had lost: {log}");
    assert_eq!(b.lease(url)["standing"], "released");
    let reader = Host::new(root, "reader", flags, &[]);
    let dr = reader.serve(url, &["--read-only"]);
    let mut rc = Client::connect_with(&dr.socket, 1, true);
    assert!(read_all(&mut rc) == base, "the desktop's write reached the remote");
    drop(rc);
    assert!(dr.stop().success());
}
