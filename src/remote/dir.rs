//! The `dir:` backend: objects are files in one folder (local disk, NFS or
//! SMB). Uploads go to a hidden temp name, are fsynced, then renamed, so a
//! half-written object is never visible under its key. The folder is made
//! only for a new volume (`create_folder`): a write never makes it again.

use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use std::io::Write;
use tokio::sync::Semaphore;

use super::bwlimit::BwLimit;
use super::{ObjectMeta, PutBody, Remote, RemoteError, RemoteResult, Slot};

/// Bytes of an upload handed to one blocking write.
const WRITE_BATCH: usize = 4 << 20;

/// Temp files start with this; `list` skips them and keys may not use it.
const TMP_PREFIX: &str = ".tmp-";

/// The lock file that serialises exclusive creates in a folder whose file
/// system has no hard links (exFAT, FAT): a dot name, so no listing shows
/// it, and not a temp name, so no sweep of leftovers removes it while held.
const CREATE_LOCK: &str = ".create.lock";

/// Why a remote [refusing symbolic links](DirRemote::refusing_symlinks)
/// does not read an object.
const SYMLINK_REFUSED: &str = "is a symbolic link, which is not followed here";

/// File operations of one remote in flight at once. On a hung network
/// mount (NFS, SMB) `open` and `pread` never return, and every attempt a
/// caller gives up on leaves its thread stuck in the kernel: unbounded,
/// retries would pile up stuck threads until tokio's blocking pool, which
/// the rest of the daemon shares, had none left.
const MAX_IN_FLIGHT: usize = 64;

/// At most one warning about stuck operations per this long.
const STUCK_WARN_EVERY: Duration = Duration::from_secs(60);

/// A folder of objects.
#[derive(Debug, Clone)]
pub struct DirRemote {
    root: PathBuf,
    /// Shared by clones: permits for file operations in flight, each held
    /// until its syscall really returns.
    in_flight: Arc<Semaphore>,
    last_stuck_warning: Arc<Mutex<Option<Instant>>>,
    /// `--bwlimit`: writes go in paced pieces, reads are paced after they
    /// arrived.
    bwlimit: BwLimit,
    /// Reads refuse an object that is a symbolic link (a volume's folder
    /// and its base: whoever can write the folder could otherwise point
    /// an object read without a digest at any file of this host).
    no_symlinks: bool,
    /// Set once `link(2)` was refused: the folder's file system has no hard
    /// links, and exclusive creates go by [`CREATE_LOCK`].
    no_hard_links: Arc<AtomicBool>,
    /// Bytes of upload bodies taken so far ([`Remote::bytes_sent`]).
    sent: Arc<AtomicU64>,
}

/// A temp file being written: removed when dropped, unless
/// [`renamed`](Self::renamed) to its key first. So a put whose
/// future is dropped mid-write — its attempt's deadline, a failed pack
/// aborting its siblings, a stop — leaves no hidden file behind, which
/// no listing shows and so nothing but gc's sweep would ever remove.
struct TempFile(PathBuf);

impl TempFile {
    /// The file now has its key's name: nothing to remove.
    fn renamed(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let p = std::mem::take(&mut self.0);
        if p.as_os_str().is_empty() {
            return;
        }
        // Off the async threads when there are some (a hung mount must not
        // stall them); a blocking write still running for it unlinks a
        // file that is then only freed when that write closes it.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(move || std::fs::remove_file(p))),
            Err(_) => drop(std::fs::remove_file(p)),
        }
    }
}

impl DirRemote {
    /// A remote rooted at `root`. The folder is created on the first `put`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            last_stuck_warning: Arc::new(Mutex::new(None)),
            bwlimit: BwLimit::default(),
            no_symlinks: false,
            no_hard_links: Arc::new(AtomicBool::new(false)),
            sent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same remote, reading no object that is a symbolic link or not
    /// a regular file (`O_NOFOLLOW` at every open, not only at `head`).
    pub fn refusing_symlinks(mut self) -> Self {
        self.no_symlinks = true;
        self
    }

    /// Opens `p` for reading; with [`refusing_symlinks`](Self::refusing_symlinks)
    /// a link is refused by the kernel, whatever was there at `head`.
    fn open_read(no_symlinks: bool, p: &Path) -> io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let flags = if no_symlinks { libc::O_NOFOLLOW } else { 0 };
        let f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(p).map_err(|e| {
            if no_symlinks && e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(io::ErrorKind::InvalidInput, SYMLINK_REFUSED)
            } else {
                e
            }
        })?;
        if no_symlinks && !f.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(f)
    }

    /// The same folder, its transfers paced by `limit`.
    pub fn with_bwlimit(self, limit: BwLimit) -> Self {
        Self { bwlimit: limit, ..self }
    }

    /// The objects under `prefix` (past `after`, if given), sorted; names
    /// at or before `after` are passed over without a stat.
    async fn list_past(&self, prefix: &str, after: Option<&str>) -> RemoteResult<Vec<ObjectMeta>> {
        let (root, prefix_owned, after) = (self.root.clone(), prefix.to_string(), after.map(str::to_string));
        let r = self
            .blocking(move || {
                files_named(&root, |name| {
                    !name.starts_with('.')
                        && name.starts_with(&prefix_owned)
                        && after.as_deref().is_none_or(|a| name > a)
                })
            })
            .await;
        r.map_err(|e| self.io_err("list", prefix, e))
    }

    /// Runs blocking file work off the async threads, once fewer than
    /// [`MAX_IN_FLIGHT`] operations of this folder are running. A caller's
    /// attempt deadline bounds the wait for a permit as it bounds the work.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
        let permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.warn_stuck();
                self.in_flight.clone().acquire_owned().await.map_err(io::Error::other)?
            }
        };
        let run = move || {
            let _held = permit;
            f()
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(r) => r,
            Err(e) => Err(io::Error::other(format!("blocking task failed: {e}"))),
        }
    }

    async fn read_file(&self, p: &Path) -> io::Result<Vec<u8>> {
        let (p, no_symlinks) = (p.to_path_buf(), self.no_symlinks);
        self.blocking(move || {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut Self::open_read(no_symlinks, &p)?, &mut buf)?;
            Ok(buf)
        })
        .await
    }

    async fn remove_file(&self, p: &Path) -> io::Result<()> {
        let p = p.to_path_buf();
        self.blocking(move || std::fs::remove_file(p)).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        self.blocking(move || std::fs::rename(from, to)).await
    }

    async fn metadata(&self, p: &Path) -> io::Result<std::fs::Metadata> {
        let (p, no_symlinks) = (p.to_path_buf(), self.no_symlinks);
        self.blocking(move || {
            let m = if no_symlinks { std::fs::symlink_metadata(p)? } else { std::fs::metadata(p)? };
            if m.file_type().is_symlink() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, SYMLINK_REFUSED));
            }
            Ok(m)
        })
        .await
    }

    fn warn_stuck(&self) {
        let mut last = self.last_stuck_warning.lock();
        if last.is_none_or(|t| t.elapsed() >= STUCK_WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                remote = %self.name(),
                "{MAX_IN_FLIGHT} file operations on the folder have not returned (a hung network mount?); \
                 further ones wait for them"
            );
        }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    /// The file for `key`, refusing keys that could escape the folder or
    /// collide with temp files.
    fn path(&self, op: &'static str, key: &str) -> RemoteResult<PathBuf> {
        let bad = key.is_empty() || key.contains('/') || key.contains('\0') || key.starts_with('.');
        if bad {
            return Err(RemoteError::Fatal {
                remote: self.name(),
                op,
                key: key.to_string(),
                message: "invalid object key (empty, contains '/', or starts with '.')".into(),
            });
        }
        Ok(self.root.join(key))
    }

    /// Writes `body` to a fresh temp file in the folder and fsyncs it: data
    /// durable before any name points at it, so a crash leaves either no
    /// object or the whole object, never a prefix under the real key. The
    /// file goes again when the returned guard drops, and so does the part
    /// written when this future is dropped (an attempt's deadline, a stop).
    async fn write_temp(&self, key: &str, body: &PutBody) -> io::Result<TempFile> {
        let tmp = TempFile(self.root.join(format!("{TMP_PREFIX}{key}.{:016x}", rand::random::<u64>())));
        // Plain blocking writes of each piece as it comes: tokio's file
        // would copy every piece again through its own 2 MiB buffer.
        let res: io::Result<()> = async {
            let path = tmp.0.clone();
            let mut f = self.blocking(move || std::fs::File::create(&path)).await?;
            // Small pieces (an encrypted body comes in 16 KiB blocks) are
            // gathered so each blocking call writes a few MiB; under a
            // limit, each paced piece is written as it is let out. A body
            // of known length takes one turn (so concurrent puts land one
            // after another, as on the other backends, not all at the end).
            let batch = if self.bwlimit.is_limited() { 1 } else { WRITE_BATCH };
            let turn = match body.len() {
                Some(n) => Some(self.bwlimit.upload(n).await),
                None => None,
            };
            let mut s = match &turn {
                Some(t) => t.pace(body.stream()),
                None => self.bwlimit.pace_upload(body.stream()),
            };
            let mut gathered: Vec<Bytes> = Vec::new();
            let mut size = 0usize;
            loop {
                let next = s.next().await.transpose()?;
                let end = next.is_none();
                if let Some(b) = next {
                    size += b.len();
                    self.sent.fetch_add(b.len() as u64, Ordering::Relaxed);
                    gathered.push(b);
                }
                if size >= batch || (end && size > 0) {
                    let pieces = std::mem::take(&mut gathered);
                    size = 0;
                    f = self
                        .blocking(move || {
                            for p in &pieces {
                                f.write_all(p)?;
                            }
                            Ok(f)
                        })
                        .await?;
                }
                if end {
                    break;
                }
            }
            self.blocking(move || f.sync_all()).await
        }
        .await;
        res.map(|()| tmp)
    }

    async fn sync_root(&self) -> io::Result<()> {
        let root = self.root.clone();
        self.blocking(move || std::fs::File::open(&root)?.sync_all()).await
    }

    /// [`io_err`](Self::io_err) of a write: when the folder itself is gone,
    /// says so (it is never made again here: see
    /// [`Remote::create_folder`]).
    fn write_err(&self, op: &'static str, key: &str, e: io::Error) -> RemoteError {
        if e.kind() == io::ErrorKind::NotFound && !self.root.is_dir() {
            let gone = io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the folder {} is gone (a network share not mounted? the volume moved or deleted?); nothing is written until it is back",
                    self.root.display()
                ),
            );
            return RemoteError::Io { remote: self.name(), op, key: key.to_string(), source: gone };
        }
        self.io_err(op, key, e)
    }

    fn io_err(&self, op: &'static str, key: &str, e: io::Error) -> RemoteError {
        if e.kind() == io::ErrorKind::NotFound {
            RemoteError::NotFound { remote: self.name(), key: key.to_string() }
        } else if self.no_symlinks && e.kind() == io::ErrorKind::InvalidInput {
            // A link or a device where an object should be: no retry
            // changes that.
            RemoteError::Fatal { remote: self.name(), op, key: key.to_string(), message: e.to_string() }
        } else {
            RemoteError::Io { remote: self.name(), op, key: key.to_string(), source: e }
        }
    }
}

/// How [`create_exclusive`] gave the temp file its key's name.
enum Created {
    /// A second name: the temp name is still to be removed.
    Linked,
    /// The temp name itself: nothing left to remove.
    Renamed,
}

/// Gives the fsynced temp file `tmp` the name `key` unless a file has it
/// (then `AlreadyExists`). `link(2)` is atomic on every file system that
/// has hard links, NFS included (unlike `O_EXCL` on old servers). exFAT and
/// FAT have none (the kernel refuses with EPERM, FUSE drivers with EPERM or
/// ENOTSUP), nor does FUSE pass on `renameat2(RENAME_NOREPLACE)`, so there
/// the check and a plain `rename(2)` run under an `flock` of the folder's
/// [`CREATE_LOCK`]: every creator of the folder takes it, and a local disk
/// has no writers but this host's processes (on NFS and SMB, where such a
/// lock would be the server's, `link` works).
fn create_exclusive(root: &Path, tmp: &Path, key: &Path, no_links: &AtomicBool) -> io::Result<Created> {
    if !no_links.load(Ordering::Relaxed) {
        match std::fs::hard_link(tmp, key) {
            Ok(()) => return Ok(Created::Linked),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS)) => {
                tracing::info!(
                    folder = %root.display(),
                    "the folder's file system has no hard links (exFAT, FAT?): new objects that must not replace \
                     one are made under the lock file {CREATE_LOCK} there ({e})"
                );
                no_links.store(true, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    let lock_path = root.join(CREATE_LOCK);
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    // Held for a check and a rename, even on a slow USB stick: a holder
    // past this is stopped, and the put fails (and is retried) instead of
    // hanging.
    super::file_lock::lock_within(&lock, true, Duration::from_secs(10), &lock_path)?;
    match std::fs::symlink_metadata(key) {
        Ok(_) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the object exists")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::rename(tmp, key)?;
    Ok(Created::Renamed)
}

/// The regular files in `root` whose names `want` takes, sorted by name
/// (a folder not made yet holds none; one removed between the listing and
/// its stat, a put or gc finishing, is passed over).
fn files_named(root: &Path, want: impl Fn(&str) -> bool) -> io::Result<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let Ok(name) = ent.file_name().into_string() else { continue };
        if !want(&name) {
            continue;
        }
        match ent.metadata() {
            Ok(m) if m.is_file() => out.push(meta_of(&name, &m)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn meta_of(key: &str, m: &std::fs::Metadata) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: m.len(),
        version: Some(format!("{}.{:09}", m.mtime(), m.mtime_nsec())),
        sha256: None,
        tag: None,
        // The folder's file system keeps the clock (an NFS server's, for a share).
        created_ms: u64::try_from(m.mtime()).ok().map(|s| s * 1000 + m.mtime_nsec() as u64 / 1_000_000),
        modified_ms: u64::try_from(m.mtime()).ok().map(|s| s * 1000 + m.mtime_nsec() as u64 / 1_000_000),
        revision: None,
        md5: None,
        slot: None,
    }
}

#[async_trait]
impl Remote for DirRemote {
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let path = self.path("get_range", key)?;
        let no_symlinks = self.no_symlinks;
        let r = self
            .blocking(move || {
                let f = Self::open_read(no_symlinks, &path)?;
                let size = f.metadata()?.len();
                let end = range.end.min(size);
                if range.start >= end {
                    return Ok(Vec::new());
                }
                let mut buf = vec![0u8; (end - range.start) as usize];
                f.read_exact_at(&mut buf, range.start)?;
                Ok(buf)
            })
            .await;
        let r = r.map(Bytes::from).map_err(|e| self.io_err("get_range", key, e))?;
        self.bwlimit.downloaded(r.len() as u64).await;
        Ok(r)
    }

    /// One read instead of the default `head` + `get_range`.
    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let path = self.path("get", key)?;
        let r = self.read_file(&path).await.map(Bytes::from).map_err(|e| self.io_err("get", key, e))?;
        self.bwlimit.downloaded(r.len() as u64).await;
        Ok(r)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let path = self.path("put", key)?;
        let res: io::Result<ObjectMeta> = async {
            let tmp = self.write_temp(key, &body).await?;
            self.rename(&tmp.0, &path).await?;
            tmp.renamed();
            self.sync_root().await?;
            let m = self.metadata(&path).await?;
            Ok(meta_of(key, &m))
        }
        .await;
        res.map_err(|e| self.write_err("put", key, e))
    }

    /// The fsynced temp file gets the key's name only if no object has it
    /// ([`create_exclusive`]); the existing object's tag is its content's
    /// sha256.
    async fn create(&self, key: &str, _slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let path = self.path("create", key)?;
        let tmp = self.write_temp(key, &body).await.map_err(|e| self.write_err("create", key, e))?;
        let (root, t2, p2, no_links) = (self.root.clone(), tmp.0.clone(), path.clone(), self.no_hard_links.clone());
        let created = self.blocking(move || create_exclusive(&root, &t2, &p2, &no_links)).await;
        match created {
            Ok(Created::Renamed) => tmp.renamed(),
            Ok(Created::Linked) | Err(_) => drop(tmp),
        }
        match created {
            Ok(_) => {
                self.sync_root().await.map_err(|e| self.io_err("create", key, e))?;
                let m = self.metadata(&path).await.map_err(|e| self.io_err("create", key, e))?;
                Ok(ObjectMeta { tag: Some(tag.to_string()), ..meta_of(key, &m) })
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Never without the tag: it tells a retry's own landed
                // create from another writer's.
                match self.read_file(&path).await {
                    Ok(b) => Err(RemoteError::AlreadyExists {
                        remote: self.name(),
                        key: key.to_string(),
                        tag: Some(super::content_tag(&b)),
                    }),
                    Err(e) => Err(self.io_err("create", key, e)),
                }
            }
            Err(e) => Err(self.write_err("create", key, e)),
        }
    }

    async fn list_scratch(&self) -> RemoteResult<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let r = self.blocking(move || files_named(&root, |name| name.starts_with(TMP_PREFIX))).await;
        r.map_err(|e| self.io_err("list", TMP_PREFIX, e))
    }

    async fn delete_scratch(&self, key: &str) -> RemoteResult<()> {
        if !key.starts_with(TMP_PREFIX) || key.contains('/') || key.contains('\0') {
            return Err(RemoteError::Fatal {
                remote: self.name(),
                op: "delete",
                key: key.to_string(),
                message: format!("not a leftover temp file ({TMP_PREFIX}*)"),
            });
        }
        match self.remove_file(&self.root.join(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("delete", key, e)),
        }
    }

    async fn create_folder(&self) -> RemoteResult<()> {
        let root = self.root.clone();
        self.blocking(move || std::fs::create_dir_all(&root)).await.map_err(|e| self.io_err("create folder", "", e))
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        let path = self.path("head", key)?;
        match self.metadata(&path).await {
            Ok(m) if m.is_file() => Ok(meta_of(key, &m)),
            Ok(m) => Err(RemoteError::Fatal {
                remote: self.name(),
                op: "head",
                key: key.to_string(),
                message: if m.is_dir() { "is a directory, not an object" } else { "is not a regular file" }.into(),
            }),
            Err(e) => Err(self.io_err("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.list_past(prefix, None).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.list_past(prefix, Some(after)).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        let path = self.path("delete", key)?;
        match self.remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("delete", key, e)),
        }
    }

    fn describe(&self) -> String {
        self.name()
    }

    fn bytes_sent(&self) -> Option<u64> {
        Some(self.sent.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hung network mount, played by a FIFO: opening one for reading
    /// blocks in the kernel until a writer comes, as an open on a dead NFS
    /// server does. Reads given up at their deadline leave their threads
    /// stuck, but no more than [`MAX_IN_FLIGHT`] of them; once the "mount"
    /// answers, the permits come back and the folder works again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_mount_strands_a_bounded_number_of_threads() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path());
        r.put("ok", PutBody::from_bytes(b"fine".to_vec())).await.unwrap();
        let fifo = d.path().join("hung");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let before = threads();
        for _ in 0..200 {
            let got = tokio::time::timeout(Duration::from_millis(20), r.get("hung")).await;
            assert!(got.is_err(), "a read of the hung file returned");
        }
        let stuck = threads().saturating_sub(before);
        let free = r.in_flight.available_permits();

        // The mount answers: a writer comes and goes, every stuck open
        // returns (first, so that a failed check below does not leave the
        // runtime waiting on them for good).
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
        let t0 = Instant::now();
        while r.in_flight.available_permits() < MAX_IN_FLIGHT {
            assert!(t0.elapsed() < Duration::from_secs(10), "permits never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stuck <= MAX_IN_FLIGHT + 8, "{stuck} threads stuck on the hung folder");
        assert_eq!(free, 0);
        assert_eq!(&r.get("ok").await.unwrap()[..], b"fine");
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path().join("vol"));
        assert!(r.list("").await.unwrap().is_empty());
        r.create_folder().await.unwrap();
        let m = r.put("pack-1", PutBody::from_bytes(b"hello world".to_vec())).await.unwrap();
        assert_eq!(m.size, 11);
        assert_eq!(&r.get_range("pack-1", 6..11).await.unwrap()[..], b"world");
        assert_eq!(&r.get_range("pack-1", 6..100).await.unwrap()[..], b"world");
        assert_eq!(r.get("pack-1").await.unwrap().len(), 11);
        r.put("gen-1", PutBody::from_bytes(Bytes::from_static(b"x"))).await.unwrap();
        let keys: Vec<_> = r.list("pack-").await.unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["pack-1"]);
        // No temp files are left behind or listed.
        assert_eq!(std::fs::read_dir(r.root()).unwrap().count(), 2);
        r.delete("pack-1").await.unwrap();
        r.delete("pack-1").await.unwrap();
        assert!(r.head("pack-1").await.unwrap_err().is_not_found());
        assert!(r.get_range("nope", 0..1).await.unwrap_err().is_not_found());
        assert!(!r.put("../x", PutBody::from_bytes(vec![])).await.unwrap_err().is_retryable());
    }

    /// A put cut short — its future dropped at an attempt's deadline, a
    /// failed pack aborting its siblings, a stop — leaves no hidden temp
    /// file, which no listing shows (so nothing but gc would remove it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_put_cut_short_leaves_no_temp_file() {
        use futures::StreamExt as _;
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path());
        let body = PutBody::from_stream_fn(None, || {
            let first = futures::stream::iter([Ok(Bytes::from(vec![7u8; 4 << 20]))]);
            Box::pin(first.chain(futures::stream::pending()))
        });
        let cut = tokio::time::timeout(Duration::from_secs(1), r.put("pack-1", body)).await;
        assert!(cut.is_err(), "the put finished");
        let t0 = Instant::now();
        loop {
            let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            if left.is_empty() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One a killed process left is found for gc.
        std::fs::write(d.path().join(".tmp-pack-2.0123456789abcdef"), b"part").unwrap();
        let s = r.list_scratch().await.unwrap();
        assert_eq!((s.len(), s[0].size), (1, 4));
        r.delete_scratch(&s[0].key).await.unwrap();
        assert!(r.delete_scratch("pack-1").await.is_err(), "only temp files are scratch");
        assert!(r.list_scratch().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn create_is_exclusive_and_names_the_winner() {
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path().join("vol"));
        r.create_folder().await.unwrap();
        let (a, b) = (b"first".to_vec(), b"second".to_vec());
        let (ta, tb) = (crate::remote::content_tag(&a), crate::remote::content_tag(&b));
        let m = r.create("gen-2", None, &ta, PutBody::from_bytes(a)).await.unwrap();
        assert_eq!(m.tag.as_deref(), Some(ta.as_str()));
        match r.create("gen-2", None, &tb, PutBody::from_bytes(b)).await.unwrap_err() {
            RemoteError::AlreadyExists { tag, .. } => assert_eq!(tag.as_deref(), Some(ta.as_str())),
            e => panic!("{e}"),
        }
        assert_eq!(&r.get("gen-2").await.unwrap()[..], b"first");
        // Only the object is left (no temp files).
        assert_eq!(std::fs::read_dir(r.root()).unwrap().count(), 1);
    }

    /// Where the file system has no hard links (exFAT, FAT), creates
    /// racing for one key under the folder's lock file: one wins, every
    /// other is told the winner's tag, and the object is the winner's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn without_hard_links_racing_creates_leave_one_winner() {
        let d = tempfile::tempdir().unwrap();
        let r = DirRemote::new(d.path().join("vol"));
        r.create_folder().await.unwrap();
        r.no_hard_links.store(true, Ordering::Relaxed);
        let bodies: Vec<Vec<u8>> = (0..8).map(|i| format!("writer {i}").into_bytes()).collect();
        let races = bodies.iter().map(|b| {
            let (r, b) = (r.clone(), b.clone());
            tokio::spawn(async move {
                let tag = crate::remote::content_tag(&b);
                r.create("gen-2", None, &tag, PutBody::from_bytes(b)).await
            })
        });
        let results: Vec<_> = futures::future::join_all(races).await.into_iter().map(Result::unwrap).collect();
        let won: Vec<_> = results.iter().filter_map(|x| x.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "creates that won: {won:?}");
        let winner = won[0].tag.clone();
        for x in &results {
            match x {
                Ok(_) => {}
                Err(RemoteError::AlreadyExists { tag, .. }) => assert_eq!(tag, &winner),
                Err(e) => panic!("{e}"),
            }
        }
        let got = r.get("gen-2").await.unwrap();
        assert_eq!(Some(crate::remote::content_tag(&got)), winner);
        let mut names: Vec<_> = std::fs::read_dir(r.root()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [CREATE_LOCK, "gen-2"], "no temp file is left");
        assert_eq!(r.list("").await.unwrap().len(), 1, "listings do not show the lock file");
    }

    /// Writes never make the folder: one that vanished (a share not
    /// mounted, the volume moved) fails them with an error saying so, and
    /// nothing appears where it was; once it is back they work again.
    #[tokio::test]
    async fn writes_into_a_vanished_folder_fail_and_never_make_it_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("share/vol");
        let r = DirRemote::new(&root);
        r.create_folder().await.unwrap();
        r.put("a", PutBody::from_bytes(b"1".to_vec())).await.unwrap();
        let away = d.path().join("away");
        std::fs::rename(d.path().join("share"), &away).unwrap();
        std::fs::create_dir(d.path().join("share")).unwrap(); // the empty mount point
        let e = r.put("b", PutBody::from_bytes(b"2".to_vec())).await.unwrap_err();
        assert!(e.to_string().contains("is gone"), "{e}");
        assert!(!e.is_retryable() && !e.is_not_found(), "{e:?}");
        let e = r.create("gen-2", None, "t", PutBody::from_bytes(b"3".to_vec())).await.unwrap_err();
        assert!(e.to_string().contains("is gone"), "{e}");
        assert!(!root.exists(), "a write made the vanished folder again");
        std::fs::remove_dir(d.path().join("share")).unwrap();
        std::fs::rename(&away, d.path().join("share")).unwrap();
        r.put("b", PutBody::from_bytes(b"2".to_vec())).await.unwrap();
        assert_eq!(&r.get("a").await.unwrap()[..], b"1");
    }
}
