//! State that every process of a host shares because one limit covers
//! them all (the uplink's `--bwlimit` clocks, a Drive account's request
//! budget): a small record in a file, read and written under an `flock`
//! held for microseconds, stamped with the boot id, so a record written
//! before a reboot (when the monotonic clock it counts in restarted) is
//! read as empty instead of as a clock hours ahead.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::file_lock::{lock_within, unlock};

/// Bytes of the boot id at the head of every record.
const BOOT_ID: usize = 16;
/// How long an update waits for the lock. Others hold it for
/// microseconds, so one that keeps it this long is stopped (SIGSTOP, a
/// debugger, a frozen cgroup), and waiting on would stall this process's
/// transfers with it: the caller goes on without the record instead.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// One record shared by the processes of this host.
#[derive(Debug)]
pub struct HostRecord {
    file: File,
    path: PathBuf,
    len: usize,
    /// The last wait for the lock ran out: until the lock is free again,
    /// an update tries once and fails at once instead of waiting again.
    wedged: AtomicBool,
}

impl HostRecord {
    /// Opens (creating it and its directory, private to this user) the
    /// record at `path` holding `len` bytes; a new or foreign-boot record
    /// reads as zeros.
    pub fn open(path: &Path, len: usize) -> io::Result<HostRecord> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        Ok(HostRecord { file, path: path.to_path_buf(), len, wedged: AtomicBool::new(false) })
    }

    /// Where the record lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the record under the host-wide lock and writes back
    /// what it left there. Other processes wait for the lock meanwhile, so
    /// `f` only computes. Fails (`TimedOut`) when another process holds
    /// the lock for longer than [`LOCK_WAIT`].
    pub fn update<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> io::Result<R> {
        self.lock()?;
        let r = self.update_locked(f);
        unlock(&self.file);
        r
    }

    /// Takes the lock, waiting at most [`LOCK_WAIT`] (not at all while the
    /// last wait ran out).
    fn lock(&self) -> io::Result<()> {
        let wait = if self.wedged.load(Ordering::Relaxed) { Duration::ZERO } else { LOCK_WAIT };
        let r = lock_within(&self.file, true, wait, &self.path);
        self.wedged.store(r.is_err(), Ordering::Relaxed);
        r
    }

    fn update_locked<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> io::Result<R> {
        let mut buf = vec![0u8; BOOT_ID + self.len];
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        let boot = boot_id();
        if got < buf.len() || buf[..BOOT_ID] != boot {
            buf.fill(0);
            buf[..BOOT_ID].copy_from_slice(&boot);
        }
        let r = f(&mut buf[BOOT_ID..]);
        self.file.write_all_at(&buf, 0)?;
        Ok(r)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, as 16 bytes); zeros
/// where the kernel does not say, which still works within one boot.
fn boot_id() -> [u8; BOOT_ID] {
    static ID: std::sync::OnceLock<[u8; BOOT_ID]> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let mut id = [0u8; BOOT_ID];
        if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
            let hex: Vec<u8> = s.trim().bytes().filter(u8::is_ascii_hexdigit).collect();
            for (i, pair) in hex.chunks(2).take(BOOT_ID).enumerate() {
                id[i] = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("0"), 16).unwrap_or(0);
            }
        }
        id
    })
}

/// The host's monotonic clock (the same in every process of this boot)
/// in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The instant of this process's timer at host monotonic time `ns`.
pub fn instant_at(ns: u64) -> tokio::time::Instant {
    let (now, now_ns) = (tokio::time::Instant::now(), monotonic_ns());
    if ns >= now_ns {
        now + Duration::from_nanos(ns - now_ns)
    } else {
        now.checked_sub(Duration::from_nanos(now_ns - ns)).unwrap_or(now)
    }
}

/// Host monotonic time at this process's instant `t`.
pub fn ns_at(t: tokio::time::Instant) -> u64 {
    let (now, now_ns) = (tokio::time::Instant::now(), monotonic_ns());
    if t >= now {
        now_ns + (t - now).as_nanos() as u64
    } else {
        now_ns.saturating_sub((now - t).as_nanos() as u64)
    }
}

/// Whether process `pid` exists (one of another user's counts): what a
/// record's per-process entries go by to forget a process that died.
pub fn alive(pid: u64) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 checks for the process; nothing is sent.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) }
}

/// A little-endian u64 at `at` in a record.
pub fn get_u64(rec: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(rec[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Stores `v` at `at` in a record.
pub fn put_u64(rec: &mut [u8], at: usize, v: u64) {
    rec[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_handles_on_one_file_see_each_others_updates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("link/rec");
        let (a, b) = (HostRecord::open(&p, 16).unwrap(), HostRecord::open(&p, 16).unwrap());
        assert_eq!(a.update(|r| get_u64(r, 0)).unwrap(), 0);
        a.update(|r| put_u64(r, 8, 42)).unwrap();
        assert_eq!(b.update(|r| get_u64(r, 8)).unwrap(), 42);
    }

    use rustix::fs::{flock, FlockOperation};
    use std::time::Instant;

    #[test]
    fn a_holder_that_never_lets_go_costs_a_second_then_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rec");
        let rec = std::sync::Arc::new(HostRecord::open(&p, 8).unwrap());
        // A process stopped while it held the lock: another open of the file.
        let holder = File::open(&p).unwrap();
        flock(&holder, FlockOperation::LockExclusive).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let r = rec.clone();
        std::thread::spawn(move || {
            for _ in 0..2 {
                let t = Instant::now();
                let got = r.update(|r| put_u64(r, 0, 7));
                tx.send((got.map_err(|e| e.kind()), t.elapsed())).unwrap();
            }
        });
        let wait = |what| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("{what} still waits"));
        let (first, took) = wait("the first update");
        assert_eq!(first, Err(io::ErrorKind::TimedOut));
        assert!(took >= LOCK_WAIT && took < LOCK_WAIT * 2, "{took:?}");
        let (second, took) = wait("the second update");
        assert_eq!(second, Err(io::ErrorKind::TimedOut));
        assert!(took < Duration::from_millis(100), "the second update waited again: {took:?}");
        // Let go: updates work again, and wait for a lock held briefly.
        flock(&holder, FlockOperation::Unlock).unwrap();
        rec.update(|r| put_u64(r, 0, 8)).unwrap();
        flock(&holder, FlockOperation::LockExclusive).unwrap();
        let r = rec.clone();
        let t = std::thread::spawn(move || r.update(|r| get_u64(r, 0)));
        std::thread::sleep(Duration::from_millis(100));
        flock(&holder, FlockOperation::Unlock).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 8);
    }

    #[test]
    fn a_record_from_another_boot_reads_as_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rec");
        let a = HostRecord::open(&p, 8).unwrap();
        a.update(|r| put_u64(r, 0, u64::MAX)).unwrap();
        let mut raw = std::fs::read(&p).unwrap();
        raw[0] ^= 0xff;
        std::fs::write(&p, raw).unwrap();
        assert_eq!(a.update(|r| get_u64(r, 0)).unwrap(), 0);
    }

    #[test]
    fn instants_and_host_time_convert_both_ways() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let t = tokio::time::Instant::now() + Duration::from_millis(250);
            let back = instant_at(ns_at(t));
            let diff = if back > t { back - t } else { t - back };
            assert!(diff < Duration::from_millis(5), "{diff:?}");
        });
    }
}
