//! A chunk directory shared by many daemons (one host, or several over
//! NFS): ranged reads of immutable objects kept as the exact bytes the
//! remote returned, so a fleet booting one volume at once fetches each
//! range from the remote about once.
//!
//! An entry is trusted no more than the remote: the caller verifies what
//! it gets exactly as it verifies remote bytes (chunk hashes, AES-GCM
//! tags), and when a call that was served from an entry fails, runs it
//! again under [`verified`]: that run ignores entries, fetches from the
//! remote and replaces them. Entries are named by a hash of the object's
//! key and range, written to a temporary name and renamed (whole or
//! absent), never fsynced (a torn entry after a crash fails verification
//! like a hostile one). Concurrent misses on one entry in different
//! processes are merged by an `flock` on a per-entry lock file: the first
//! fetches, the others wait for its entry, at most [`SharedCache::wait`],
//! then fetch themselves. A directory that cannot be written (read-only
//! share, full disk) is still read; the daemon then fetches without
//! sharing and says so once. A directory that stops answering (a hung
//! mount) is passed by: reads go to the remote until it answers again
//! ([`FsDeadline`]).

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::fs_deadline::FsDeadline;
use super::{DynRemote, RemoteResult};

/// Tells the layer which keys name immutable objects (whose ranges may be
/// shared); the volume layer knows its key formats, this one does not.
pub type Cacheable = fn(&str) -> bool;

/// The shared directory of one daemon, with its counters.
#[derive(Debug)]
pub struct SharedCache {
    dir: PathBuf,
    /// Cap on the entries' bytes; past it the oldest (least recently
    /// used) entries are deleted. `None`: no cap.
    max_bytes: Option<u64>,
    /// Most time a miss waits for another process fetching the same entry.
    wait: Duration,
    /// The directory's calls, each with a deadline.
    fs: Arc<FsDeadline>,
    stats: Counters,
    /// The "cannot write the shared directory" warning was logged.
    warned: AtomicBool,
    /// Bytes stored since the last trim, and whether one runs.
    since_trim: AtomicU64,
    trimming: AtomicBool,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    hit_bytes: AtomicU64,
    waited: AtomicU64,
    stored: AtomicU64,
    stored_bytes: AtomicU64,
    fetched_bytes: AtomicU64,
    write_errors: AtomicU64,
    evicted: AtomicU64,
    bypassed: AtomicU64,
}

/// What the shared directory did for this daemon (status, metrics, tests).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SharedStats {
    pub dir: String,
    /// Reads served from an entry (another daemon's fetch, or an earlier one).
    pub hits: u64,
    pub hit_bytes: u64,
    /// Of the hits, those that waited for another process's fetch first.
    pub waited: u64,
    /// Entries this daemon fetched from the remote and stored.
    pub stored: u64,
    pub stored_bytes: u64,
    /// Bytes of cacheable ranges this daemon fetched from the remote.
    pub fetched_bytes: u64,
    /// Calls run again from the remote because what an entry gave failed
    /// verification (the bad entries were replaced).
    pub refreshed: u64,
    /// Entries that could not be stored (unwritable directory, full disk).
    pub write_errors: u64,
    /// Entries deleted to keep under the size cap.
    pub evicted: u64,
    /// The directory does not answer now (a hung mount): reads go to the
    /// remote without it.
    pub hung: bool,
    /// Times it stopped answering.
    pub hangs: u64,
    /// Reads fetched from the remote without the directory while it did
    /// not answer.
    pub bypassed: u64,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// What one [`verified`] call saw.
struct Scope {
    /// Ignore entries: fetch from the remote and replace them.
    refresh: bool,
    /// An entry served part of this call.
    served: Cell<bool>,
}

/// Runs `f`, which fetches and verifies something; if it fails after
/// bytes from the shared directory served part of it, runs it again with
/// every entry ignored and replaced by the remote's bytes. So a corrupt or
/// hostile entry costs one refetch and is never served, and an error that
/// is the remote's own is returned as before.
pub async fn verified<T, E, F, Fut>(mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let first = SCOPE
        .scope(Scope { refresh: false, served: Cell::new(false) }, async {
            let r = f().await;
            (r, SCOPE.with(|s| s.served.get()))
        })
        .await;
    match first {
        (Err(e), true) => {
            tracing::warn!(error = %e, "bytes from the shared cache directory failed verification; fetching them from the remote and replacing the entries");
            REFRESHES.fetch_add(1, Ordering::Relaxed);
            SCOPE.scope(Scope { refresh: true, served: Cell::new(false) }, f()).await
        }
        (r, _) => r,
    }
}

/// Process-wide count of [`verified`] re-runs (folded into every cache's
/// stats: a process serves one volume).
static REFRESHES: AtomicU64 = AtomicU64::new(0);

/// True inside the second run of [`verified`]: layers that memoise what
/// they read (an encrypted object's header) must read it again.
pub fn refreshing() -> bool {
    SCOPE.try_with(|s| s.refresh).unwrap_or(false)
}

fn mark_served() {
    let _ = SCOPE.try_with(|s| s.served.set(true));
}

/// Default most time a miss waits for another process's fetch of the same
/// entry: longer than a chunk takes over a slow shared link, shorter than
/// a guest's disk timeout.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);

/// Most time one call into the directory (an entry read, a lock, a store)
/// may take before the directory counts as hung: a healthy share answers
/// in milliseconds, and a guest read that misses the local cache waits
/// at most this long for it once.
pub const DEFAULT_FS_DEADLINE: Duration = Duration::from_secs(5);

impl SharedCache {
    /// The shared directory `dir` (created if missing), with an optional
    /// size cap.
    ///
    /// One on a mount that does not answer opens all the same (the start
    /// waits for it at most [`DEFAULT_FS_DEADLINE`]), passed by until it
    /// answers.
    pub fn open(dir: &Path, max_bytes: Option<u64>) -> io::Result<Arc<Self>> {
        let fs = calls_into(dir, DEFAULT_FS_DEADLINE);
        let d = dir.to_path_buf();
        let checked = fs.run_blocking(move || {
            std::fs::create_dir_all(&d)?;
            if !d.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", d.display()),
                ));
            }
            Ok(())
        });
        if let Some(r) = checked {
            r?;
        }
        let me = Arc::new(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            wait: DEFAULT_WAIT,
            fs,
            stats: Counters::default(),
            warned: AtomicBool::new(false),
            since_trim: AtomicU64::new(0),
            trimming: AtomicBool::new(false),
        });
        Ok(me)
    }

    /// The same directory with another wait bound (tests).
    pub fn with_wait(mut self: Arc<Self>, wait: Duration) -> Arc<Self> {
        if let Some(m) = Arc::get_mut(&mut self) {
            m.wait = wait;
        }
        self
    }

    /// The same directory with another deadline for its calls (tests).
    pub fn with_fs_deadline(mut self: Arc<Self>, deadline: Duration) -> Arc<Self> {
        if let Some(m) = Arc::get_mut(&mut self) {
            m.fs = calls_into(&m.dir, deadline);
        }
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `inner` with ranged reads of the keys `cacheable` accepts (and of
    /// pinned content revisions) served through this directory.
    pub fn wrap(self: &Arc<Self>, inner: DynRemote, cacheable: Cacheable) -> DynRemote {
        Arc::new(SharedRemote { inner, cache: self.clone(), cacheable })
    }

    /// The counters so far.
    pub fn stats(&self) -> SharedStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        SharedStats {
            dir: self.dir.display().to_string(),
            hits: l(&s.hits),
            hit_bytes: l(&s.hit_bytes),
            waited: l(&s.waited),
            stored: l(&s.stored),
            stored_bytes: l(&s.stored_bytes),
            fetched_bytes: l(&s.fetched_bytes),
            refreshed: REFRESHES.load(Ordering::Relaxed),
            write_errors: l(&s.write_errors),
            evicted: l(&s.evicted),
            hung: self.fs.is_hung(),
            hangs: self.fs.hangs(),
            bypassed: l(&s.bypassed),
        }
    }

    fn entry_path(&self, name: &str) -> PathBuf {
        self.dir.join(&name[..2]).join(name)
    }

    fn warn_once(&self, what: &str, e: &io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.dir.display(), error = %e,
                "{what} in the shared cache directory; serving without sharing what cannot be stored (entries there are still read)");
        }
    }

    /// The entry `name` from the directory, or from `fetch` (stored for
    /// the others), merging concurrent misses across processes. While the
    /// directory does not answer, straight from `fetch`.
    async fn get_or_fetch<F, Fut>(self: &Arc<Self>, name: String, fetch: F) -> RemoteResult<Bytes>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = RemoteResult<Bytes>>,
    {
        let path = self.entry_path(&name);
        let refresh = refreshing();
        if !refresh {
            match self.look(&path, false).await {
                Ok(Some(b)) => return Ok(b),
                Ok(None) => {}
                Err(Hung) => return self.fetch_unshared(fetch).await,
            }
        }
        let lock_path = path.with_extension("lock");
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut delay = Duration::from_millis(2);
        let mut waited = false;
        let held = loop {
            let lp = lock_path.clone();
            match self.fs.run(move || try_lock(&lp)).await {
                None => return self.fetch_unshared(fetch).await,
                Some(Ok(Some(lock))) => break Some(EntryLock(Some(lock))),
                Some(Ok(None)) => {
                    // Another process fetches it: its entry appears when done.
                    waited = true;
                    if tokio::time::Instant::now() >= deadline {
                        tracing::debug!(entry = %name, "waited long enough for another process's fetch; fetching it here");
                        break None;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(50));
                    if !refresh {
                        match self.look(&path, true).await {
                            Ok(Some(b)) => return Ok(b),
                            Ok(None) => {}
                            Err(Hung) => return self.fetch_unshared(fetch).await,
                        }
                    }
                }
                Some(Err(e)) => {
                    self.warn_once("cannot create a lock file", &e);
                    break None;
                }
            }
        };
        if held.is_some() && !refresh {
            // It may have landed between the first look and the lock.
            match self.look(&path, waited).await {
                Ok(Some(b)) => return Ok(b),
                Ok(None) => {}
                Err(Hung) => return self.fetch_unshared(fetch).await,
            }
        }
        let b = fetch().await?;
        self.stats.fetched_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        if !b.is_empty() {
            let (me, data) = (self.clone(), b.clone());
            let _ = self.fs.run(move || me.store(&path, &data)).await;
        }
        drop(held);
        Ok(b)
    }

    /// `fetch` without the directory, which does not answer.
    async fn fetch_unshared<F, Fut>(&self, fetch: F) -> RemoteResult<Bytes>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = RemoteResult<Bytes>>,
    {
        let b = fetch().await?;
        self.stats.fetched_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
        Ok(b)
    }

    /// An entry's bytes, counted as a hit (`None` if absent or
    /// unreadable), unless the directory does not answer.
    async fn look(&self, path: &Path, waited: bool) -> Result<Option<Bytes>, Hung> {
        let path = path.to_path_buf();
        let b = self.fs.run(move || read_entry_now(&path)).await.ok_or(Hung)?;
        if let Some(b) = &b {
            self.hit(b, waited);
        }
        Ok(b)
    }

    fn hit(&self, b: &Bytes, waited: bool) {
        mark_served();
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.hit_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        if waited {
            self.stats.waited.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes an entry: temporary name, then rename over any old one.
    fn store(self: &Arc<Self>, path: &Path, data: &[u8]) {
        let tmp = path.with_file_name(format!(
            ".{}.{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let r = (|| -> io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            drop(f);
            std::fs::rename(&tmp, path)
        })();
        match r {
            Ok(()) => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
                self.stats.stored_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                self.after_store(data.len() as u64);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.warn_once("cannot store an entry", &e);
            }
        }
    }

    /// Trims the directory in the background once a sixteenth of the cap
    /// was written since the last trim.
    fn after_store(self: &Arc<Self>, n: u64) {
        let Some(max) = self.max_bytes else { return };
        let since = self.since_trim.fetch_add(n, Ordering::Relaxed) + n;
        if since < (max / 16).max(1) || self.trimming.swap(true, Ordering::SeqCst) {
            return;
        }
        self.since_trim.store(0, Ordering::Relaxed);
        let me = self.clone();
        std::thread::spawn(move || {
            match trim(&me.dir, max) {
                Ok(t) => {
                    me.stats.evicted.fetch_add(t.removed, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(dir = %me.dir.display(), error = %e, "could not trim the shared cache directory")
                }
            }
            me.trimming.store(false, Ordering::SeqCst);
        });
    }
}

/// Name of the entry for `parts` (hex sha256; versioned so a change of
/// layout never reads old entries as new ones).
fn entry_name(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(b"driveblk-shared-v1");
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The shared directory did not answer in time.
struct Hung;

/// An entry's lock held. Closing its file may wait on the mount too, so
/// it is closed on the blocking pool, never on the caller's thread.
struct EntryLock(Option<File>);

impl Drop for EntryLock {
    fn drop(&mut self) {
        let Some(f) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(f))),
            Err(_) => drop(f),
        }
    }
}

/// The deadlines of calls into the shared directory `dir`.
fn calls_into(dir: &Path, deadline: Duration) -> Arc<FsDeadline> {
    FsDeadline::new(format!("the shared cache directory {}", dir.display()), deadline)
}

/// An entry's bytes, or `None` if absent or unreadable. A hit refreshes
/// its mtime, which the trim uses as last use.
fn read_entry_now(path: &Path) -> Option<Bytes> {
    let mut f = File::open(path).ok()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).ok()?;
    if v.is_empty() {
        return None;
    }
    let old = f.metadata().ok().and_then(|m| m.modified().ok());
    if old.is_some_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60)) {
        // Best effort (a read-only share keeps its times).
        if let Ok(w) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = w.set_modified(SystemTime::now());
        }
    }
    Some(Bytes::from(v))
}

/// The entry's lock, if no other process holds it (released when the
/// file is dropped; the kernel releases it if the process dies).
fn try_lock(path: &Path) -> io::Result<Option<File>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// What a [`trim`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries and their bytes before.
    pub entries: u64,
    pub bytes: u64,
    /// Entries deleted, and their bytes.
    pub removed: u64,
    pub removed_bytes: u64,
}

/// Deletes the least recently used entries of the shared directory `dir`
/// until they hold at most 90% of `max` bytes, with leftover temporary
/// files older than an hour (a process died writing them). Safe while
/// daemons use the directory: a reader holding an entry open keeps its
/// bytes, and a deleted entry is fetched again.
pub fn trim(dir: &Path, max: u64) -> io::Result<Trimmed> {
    let mut entries = Vec::new();
    let mut t = Trimmed::default();
    for sub in std::fs::read_dir(dir)? {
        let sub = sub?;
        if !sub.file_type()?.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(sub.path())?.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let Ok(m) = e.metadata() else { continue };
            let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            if name.ends_with(".tmp") {
                if mtime.elapsed().unwrap_or_default() > Duration::from_secs(3600) {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit()) {
                t.entries += 1;
                t.bytes += m.len();
                entries.push((mtime, m.len(), e.path()));
            }
        }
    }
    if t.bytes <= max {
        return Ok(t);
    }
    entries.sort();
    let target = max / 10 * 9;
    let mut left = t.bytes;
    for (_, len, path) in entries {
        if left <= target {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            // Its lock file goes too (a process holding it only loses
            // the merging of one fetch).
            let _ = std::fs::remove_file(path.with_extension("lock"));
            left -= len;
            t.removed += 1;
            t.removed_bytes += len;
        }
    }
    Ok(t)
}

/// The shared-directory layer around one remote.
#[derive(Debug)]
struct SharedRemote {
    inner: DynRemote,
    cache: Arc<SharedCache>,
    cacheable: Cacheable,
}

#[async_trait]
impl super::Layer for SharedRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        if !(self.cacheable)(key) || range.is_empty() {
            return self.inner.get_range(key, range).await;
        }
        // Immutable keys carry random bits (pack names): the key and range
        // name the bytes, on every host and through any URL spelling.
        let name = entry_name(&["range", key, &range.start.to_string(), &range.end.to_string()]);
        self.cache.get_or_fetch(name, || self.inner.get_range(key, range.clone())).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        if range.is_empty() {
            return self.inner.get_range_revision(key, revision, range).await;
        }
        // A content revision never changes; base files' names are not
        // unique, so the store is part of the name.
        let store = self.inner.describe();
        let name = entry_name(&["revision", &store, key, revision, &range.start.to_string(), &range.end.to_string()]);
        self.cache.get_or_fetch(name, || self.inner.get_range_revision(key, revision, range.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{DirRemote, MetricsRemote, RemoteMetrics};

    fn setup() -> (tempfile::TempDir, DynRemote, Arc<RemoteMetrics>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("r")).unwrap();
        std::fs::write(d.path().join("r/pack-1"), (0..=255u8).cycle().take(100_000).collect::<Vec<_>>()).unwrap();
        std::fs::write(d.path().join("r/gen-1"), b"mutable").unwrap();
        let m = Arc::new(RemoteMetrics::default());
        let r = MetricsRemote::wrap(Arc::new(DirRemote::new(d.path().join("r"))), m.clone());
        (d, r, m)
    }

    fn packs(k: &str) -> bool {
        k.starts_with("pack-")
    }

    #[tokio::test]
    async fn second_reader_hits_and_bad_entries_are_replaced() {
        let (d, r, m) = setup();
        let c = SharedCache::open(&d.path().join("shared"), None).unwrap();
        let a = c.wrap(r.clone(), packs);
        let want = a.get_range("pack-1", 10..5000).await.unwrap();
        assert_eq!(m.snapshot().gets, 1);
        // Another daemon's layer over the same directory.
        let c2 = SharedCache::open(&d.path().join("shared"), None).unwrap();
        let b = c2.wrap(r.clone(), packs);
        assert_eq!(b.get_range("pack-1", 10..5000).await.unwrap(), want);
        assert_eq!(m.snapshot().gets, 1, "served from the entry");
        assert_eq!(c2.stats().hits, 1);
        // Mutable objects are never shared.
        b.get_range("gen-1", 0..3).await.unwrap();
        b.get_range("gen-1", 0..3).await.unwrap();
        assert_eq!(m.snapshot().gets, 3);
        // Corrupt the entry: a check that fails makes verified() refetch.
        let name = entry_name(&["range", "pack-1", "10", "5000"]);
        let path = c.entry_path(&name);
        std::fs::write(&path, b"evil").unwrap();
        let got = verified(|| {
            let b = b.clone();
            let want = want.clone();
            async move {
                let x = b.get_range("pack-1", 10..5000).await.map_err(|e| e.to_string())?;
                if x != want {
                    return Err("hash mismatch".to_string());
                }
                Ok(x)
            }
        })
        .await
        .unwrap();
        assert_eq!(got, want);
        assert_eq!(m.snapshot().gets, 4, "one refetch");
        assert_eq!(std::fs::read(&path).unwrap(), want.to_vec(), "the bad entry was replaced");
    }

    #[tokio::test]
    async fn unwritable_dir_still_serves() {
        let (d, r, m) = setup();
        let shared = d.path().join("shared");
        let c = SharedCache::open(&shared, None).unwrap();
        // A file where an entry's subdirectory would go: nothing can be stored.
        let name = entry_name(&["range", "pack-1", "0", "10"]);
        std::fs::write(shared.join(&name[..2]), b"x").unwrap();
        let a = c.wrap(r, packs);
        assert_eq!(a.get_range("pack-1", 0..10).await.unwrap().len(), 10);
        assert_eq!(a.get_range("pack-1", 0..10).await.unwrap().len(), 10);
        assert_eq!(m.snapshot().gets, 2);
        assert!(c.stats().write_errors >= 1);
    }

    /// An entry that does not answer (a FIFO: opening it waits for a
    /// writer, as a call into a hung mount waits for the server): the read
    /// is served from the remote after the deadline, and the reads after
    /// it at once, until the stuck call returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_that_hangs_is_passed_by_until_it_answers() {
        let (d, r, m) = setup();
        let shared = d.path().join("shared");
        let c = SharedCache::open(&shared, None).unwrap().with_fs_deadline(Duration::from_millis(300));
        let a = c.wrap(r.clone(), packs);
        let want = r.get_range("pack-1", 0..70_000).await.unwrap();
        let fifo = c.entry_path(&entry_name(&["range", "pack-1", "0", "10"]));
        std::fs::create_dir_all(fifo.parent().unwrap()).unwrap();
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let t0 = std::time::Instant::now();
        assert_eq!(a.get_range("pack-1", 0..10).await.unwrap(), want.slice(0..10));
        let waited = t0.elapsed();
        assert!(waited < Duration::from_secs(5), "the read waited {waited:?} for a directory that hangs");
        let st = c.stats();
        assert!(st.hung && st.hangs == 1 && st.bypassed == 1, "{st:?}");
        // Passed by at once while it hangs: nothing stored, no wait.
        let t0 = std::time::Instant::now();
        for i in 1..5u64 {
            let range = i * 10_000..(i + 1) * 10_000;
            assert_eq!(
                a.get_range("pack-1", range.clone()).await.unwrap(),
                want.slice(range.start as usize..range.end as usize)
            );
        }
        assert!(t0.elapsed() < Duration::from_millis(300), "reads waited on a hung directory: {:?}", t0.elapsed());
        assert_eq!((c.stats().bypassed, c.stats().stored), (5, 0));
        // The stuck call returns: the directory serves and stores again.
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
        let t0 = std::time::Instant::now();
        while c.stats().hung {
            assert!(t0.elapsed() < Duration::from_secs(10), "the directory never answered again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.get_range("pack-1", 50_000..60_000).await.unwrap(), want.slice(50_000..60_000));
        assert_eq!(a.get_range("pack-1", 50_000..60_000).await.unwrap(), want.slice(50_000..60_000));
        let st = c.stats();
        assert!(st.stored == 1 && st.hits == 1 && !st.hung && st.hangs == 1, "{st:?}");
        assert_eq!(m.snapshot().gets, 7);
    }

    #[test]
    fn trim_removes_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let mut names = Vec::new();
        for i in 0..10u64 {
            let n = entry_name(&[&i.to_string()]);
            let p = d.path().join(&n[..2]).join(&n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = File::options().write(true).open(&p).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i)).unwrap();
            names.push(p);
        }
        let t = trim(d.path(), 5000).unwrap();
        assert_eq!((t.entries, t.bytes, t.removed), (10, 10_000, 6));
        assert!(names[..6].iter().all(|p| !p.exists()));
        assert!(names[6..].iter().all(|p| p.exists()));
    }
}
