//! SSD tier: one cache directory per volume holding a sparse `data` file
//! (chunk N at offset N * chunk_size) and a `state` file mapping every chunk
//! to absent / clean / dirty. The state file is rewritten atomically (temp,
//! fsync, rename) and only ever claims data that was fsynced before it, so
//! after a crash the cache never serves bytes it did not fully write.
//!
//! Ordering rules that keep that promise:
//! - clean install: write data, then mark clean in memory; the next persist
//!   fsyncs data before writing the map;
//! - eviction: mark absent, persist the map, and only then punch the hole;
//! - first write to a chunk the persisted map calls clean: mark dirty and
//!   persist (data still the clean bytes, fsynced) before writing into it,
//!   so the map never calls modified bytes "clean".

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::{IoMode, IoVec};
use crate::tier::{LocalFile, Storage};
use crate::volume::{VolumeError, VolumeResult};

/// Chunk not in the cache.
pub const ABSENT: u8 = 0;
/// Chunk holds the remote generation's bytes; may be evicted.
pub const CLEAN: u8 = 1;
/// Chunk holds local writes not yet uploaded; never evicted.
pub const DIRTY: u8 = 2;

const STATE_MAGIC: &str = "driveblk-cache";
const STATE_VERSION: u32 = 1;
const STRIPES: usize = 1024;

/// What a cache directory must match to be reused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIdentity {
    pub volume_id: String,
    pub generation: u64,
    pub chunk_size: u64,
}

#[derive(Serialize, Deserialize)]
struct StateHeader {
    format: String,
    version: u32,
    #[serde(flatten)]
    id: CacheIdentity,
    /// Local image length (grows when the guest's image file grows).
    image_len: u64,
    chunks: u64,
}

/// What `open` found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was there.
    Fresh,
    /// A matching cache was reused.
    Reused { cached: u64, dirty: u64 },
    /// A cache for something else (or a damaged one) was thrown away.
    Discarded(String),
}

/// Whether to serve from the cache (discarding a stale one) or only look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    Serve,
    Inspect,
}

#[derive(Default)]
struct Slot {
    state: AtomicU8,
    pinned: AtomicBool,
    /// Last access, on the cache's logical clock (for eviction order).
    tick: AtomicU32,
}

/// The SSD tier of one volume.
pub struct SsdCache {
    dir: PathBuf,
    data: LocalFile,
    lock: File,
    id: CacheIdentity,
    chunk_size: u64,
    slots: RwLock<Vec<Slot>>,
    /// Per-chunk (striped) locks ordering installs, writes, evictions and
    /// reads of one chunk; the tiered store also updates RAM under them.
    stripes: Vec<RwLock<()>>,
    len: AtomicU64,
    cap: u64,
    cached: AtomicU64,
    dirty: AtomicU64,
    /// The states as last persisted; the mutex serialises persists.
    persisted: Mutex<Vec<u8>>,
    clock: AtomicU32,
    evictions: AtomicU64,
}

fn cache_err(dir: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::Cache { dir: dir.to_path_buf(), reason: reason.into() }
}

fn read_state(path: &Path) -> Result<Option<(StateHeader, Vec<u8>)>, String> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read state file: {e}")),
    };
    if b.len() < 33 {
        return Err("state file is truncated".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("state file checksum mismatch".into());
    }
    let nl = body.iter().position(|&c| c == b'\n').ok_or("state file has no header line")?;
    let h: StateHeader = serde_json::from_slice(&body[..nl]).map_err(|e| format!("state header: {e}"))?;
    if h.format != STATE_MAGIC || h.version != STATE_VERSION {
        return Err(format!(
            "state file is {:?} version {}, expected {STATE_MAGIC:?} version {STATE_VERSION}",
            h.format, h.version
        ));
    }
    let states = body[nl + 1..].to_vec();
    if states.len() as u64 != h.chunks || states.iter().any(|&s| s > DIRTY) {
        return Err("state map does not match its header".into());
    }
    Ok(Some((h, states)))
}

impl SsdCache {
    /// Opens (creating if needed) the cache in `dir` for a volume with
    /// identity `id` whose committed image is `image_len` bytes, capped at
    /// `cap` bytes of clean data (dirty data may exceed it: it cannot be
    /// dropped). In `Inspect` mode a missing or mismatched cache yields
    /// `Ok(None)` and nothing is changed.
    pub fn open(
        dir: &Path,
        id: CacheIdentity,
        image_len: u64,
        cap: u64,
        mode: OpenMode,
    ) -> VolumeResult<Option<(Self, Opened)>> {
        if mode == OpenMode::Inspect && !dir.join("state").exists() {
            return Ok(None);
        }
        std::fs::create_dir_all(dir).map_err(|e| VolumeError::io("creating cache directory", dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| VolumeError::io("opening", &lock_path, e))?;
        // SAFETY: plain syscall on an owned fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(cache_err(
                dir,
                "in use by another driveblk process (stop it first, or use another --cache-dir)",
            ));
        }
        let state_path = dir.join("state");
        let (opened, states, len) = match read_state(&state_path) {
            Ok(None) => (Opened::Fresh, Vec::new(), image_len),
            Ok(Some((h, states))) if h.id == id => {
                let dirty = states.iter().filter(|&&s| s == DIRTY).count() as u64;
                let cached = states.iter().filter(|&&s| s != ABSENT).count() as u64;
                (Opened::Reused { cached, dirty }, states, h.image_len)
            }
            Ok(Some((h, states))) => {
                let dirty = states.iter().filter(|&&s| s == DIRTY).count();
                let why = if h.id.volume_id != id.volume_id {
                    format!("it belongs to volume {}, not {}", h.id.volume_id, id.volume_id)
                } else if h.id.generation != id.generation {
                    format!("it was built from generation {}, the volume is now at {}", h.id.generation, id.generation)
                } else {
                    format!("its chunk size {} differs from the volume's {}", h.id.chunk_size, id.chunk_size)
                };
                if dirty > 0 {
                    return Err(cache_err(dir, format!("holds {dirty} chunks of unsaved writes, but {why}; use the right cache directory, or `driveblk export` those writes with it first")));
                }
                if mode == OpenMode::Inspect {
                    return Ok(None);
                }
                (Opened::Discarded(why), Vec::new(), image_len)
            }
            Err(why) => {
                if mode == OpenMode::Inspect {
                    return Err(cache_err(dir, why));
                }
                tracing::warn!(dir = %dir.display(), %why, "discarding damaged cache state");
                (Opened::Discarded(why), Vec::new(), image_len)
            }
        };
        let data_path = dir.join("data");
        if mode == OpenMode::Serve && (states.is_empty() || matches!(opened, Opened::Discarded(_))) {
            // Start clean: stale bytes in the data file are never trusted.
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&data_path)
                .map_err(|e| VolumeError::io("creating", &data_path, e))?;
            drop(f);
        }
        let data = LocalFile::open(&data_path, mode == OpenMode::Inspect)
            .map_err(|e| VolumeError::io("opening", &data_path, e))?;
        let cs = id.chunk_size;
        let n = len.div_ceil(cs) as usize;
        let slots: Vec<Slot> = (0..n.max(states.len())).map(|_| Slot::default()).collect();
        let (mut cached, mut dirty) = (0, 0);
        for (i, &s) in states.iter().enumerate() {
            slots[i].state.store(s, Ordering::Relaxed);
            cached += (s != ABSENT) as u64;
            dirty += (s == DIRTY) as u64;
        }
        let persisted: Vec<u8> = slots.iter().map(|s| s.state.load(Ordering::Relaxed)).collect();
        let c = Self {
            dir: dir.to_path_buf(),
            data,
            lock,
            id,
            chunk_size: cs,
            slots: RwLock::new(slots),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            len: AtomicU64::new(len),
            cap,
            cached: AtomicU64::new(cached),
            dirty: AtomicU64::new(dirty),
            persisted: Mutex::new(persisted),
            clock: AtomicU32::new(1),
            evictions: AtomicU64::new(0),
        };
        if mode == OpenMode::Serve {
            // Record the identity now, so a crash before the first flush
            // still leaves a directory that says whose it is.
            c.persist().map_err(|e| VolumeError::io("writing cache state in", dir, e))?;
        }
        Ok(Some((c, opened)))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the cache belongs to.
    pub fn identity(&self) -> &CacheIdentity {
        &self.id
    }

    /// Local image length.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// True when the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Chunks covering the local image.
    pub fn chunk_count(&self) -> u64 {
        self.slots.read().len() as u64
    }

    /// Grows the local length (and the chunk map with it).
    pub fn grow(&self, len: u64) {
        if len <= self.len() {
            return;
        }
        let n = len.div_ceil(self.chunk_size) as usize;
        let mut slots = self.slots.write();
        while slots.len() < n {
            slots.push(Slot::default());
        }
        self.len.fetch_max(len, Ordering::AcqRel);
    }

    /// Sets the local length outright (the caller zeroed what was cut).
    pub fn set_len(&self, len: u64) {
        self.grow(len);
        self.len.store(len, Ordering::Release);
    }

    /// The stripe lock for chunk `idx`, shared.
    pub fn lock_read(&self, idx: u64) -> RwLockReadGuard<'_, ()> {
        self.stripes[(idx as usize) % STRIPES].read()
    }

    /// The stripe lock for chunk `idx`, exclusive.
    pub fn lock_write(&self, idx: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(idx as usize) % STRIPES].write()
    }

    /// State of chunk `idx` ([`ABSENT`] past the end).
    pub fn state(&self, idx: u64) -> u8 {
        self.slots.read().get(idx as usize).map_or(ABSENT, |s| s.state.load(Ordering::Acquire))
    }

    fn touch(&self, idx: u64) {
        let t = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.slots.read().get(idx as usize) {
            s.tick.store(t, Ordering::Relaxed);
        }
    }

    fn set_state(&self, idx: u64, st: u8) {
        if let Some(s) = self.slots.read().get(idx as usize) {
            s.state.store(st, Ordering::Release);
        }
    }

    /// Marks a chunk as metadata: never evicted.
    pub fn set_pinned(&self, idx: u64) {
        if let Some(s) = self.slots.read().get(idx as usize) {
            s.pinned.store(true, Ordering::Relaxed);
        }
    }

    /// Reads part of a cached chunk. Caller holds the stripe lock and saw
    /// the chunk present. Non-blocking reads use `RWF_NOWAIT`: a page-cache
    /// hit completes inline, anything else says `WouldBlock`.
    pub fn read(&self, idx: u64, off: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        self.data.read_vectored_at(idx * self.chunk_size + off, bufs, mode)?;
        self.touch(idx);
        Ok(())
    }

    /// Reads a whole cached chunk. Caller holds the stripe lock.
    pub fn read_chunk(&self, idx: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.chunk_size as usize];
        self.data.read_at(idx * self.chunk_size, &mut v)?;
        Ok(v)
    }

    /// Stores a fetched chunk as clean, evicting older clean chunks if the
    /// cap requires. Returns false when it did not fit (everything else is
    /// dirty or pinned) or the chunk is no longer absent. Caller holds the
    /// stripe write lock of `idx`.
    pub fn install_clean(&self, idx: u64, data: &[u8]) -> io::Result<bool> {
        if idx >= self.chunk_count() || self.state(idx) != ABSENT {
            return Ok(false);
        }
        if (self.cached.load(Ordering::Relaxed) + 1) * self.chunk_size > self.cap {
            // Free a tenth of the cap at once so the fsync an eviction costs
            // is paid rarely.
            let want = (self.cap / self.chunk_size / 10).max(1);
            self.evict(want, idx)?;
            if (self.cached.load(Ordering::Relaxed) + 1) * self.chunk_size > self.cap {
                return Ok(false);
            }
        }
        self.data.write_at(idx * self.chunk_size, data)?;
        self.set_state(idx, CLEAN);
        self.cached.fetch_add(1, Ordering::Relaxed);
        self.touch(idx);
        Ok(true)
    }

    /// Writes guest data into chunk `idx` and marks it dirty. `fill` is the
    /// chunk's current content, required when the chunk is absent and the
    /// write does not cover it whole (the read half of read-modify-write).
    /// Caller holds the stripe write lock.
    pub fn write(&self, idx: u64, off: u64, bufs: &IoVec<'_>, fill: Option<&[u8]>) -> io::Result<()> {
        let base = idx * self.chunk_size;
        match self.state(idx) {
            DIRTY => self.data.write_vectored_at(base + off, bufs, IoMode::Blocking)?,
            CLEAN => {
                self.set_state(idx, DIRTY);
                self.dirty.fetch_add(1, Ordering::Relaxed);
                let persisted_clean = self.persisted.lock().get(idx as usize) == Some(&CLEAN);
                if persisted_clean {
                    // See the module doc: the map must stop calling this
                    // chunk clean before its bytes change.
                    self.persist()?;
                }
                self.data.write_vectored_at(base + off, bufs, IoMode::Blocking)?;
            }
            _ => {
                // Bytes first, state after: a persist racing with this never
                // records as dirty a chunk whose bytes are not yet there.
                let whole = off == 0 && bufs.len() as u64 == self.chunk_size;
                if !whole {
                    let fill = fill.ok_or_else(|| {
                        io::Error::other("internal: partial write to an absent chunk without its content")
                    })?;
                    self.data.write_at(base, fill)?;
                }
                self.data.write_vectored_at(base + off, bufs, IoMode::Blocking)?;
                self.set_state(idx, DIRTY);
                self.cached.fetch_add(1, Ordering::Relaxed);
                self.dirty.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.touch(idx);
        Ok(())
    }

    /// Most chunks one [`zero_chunks`](Self::zero_chunks) call may cover.
    pub const MAX_BATCH: u64 = STRIPES as u64;

    /// Write-locks the stripes of every chunk in `range` (at most
    /// [`MAX_BATCH`](Self::MAX_BATCH) chunks), in stripe order so two
    /// batches can never deadlock.
    pub fn lock_many(&self, range: std::ops::Range<u64>) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut stripes: Vec<usize> = range.map(|i| (i as usize) % STRIPES).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|s| self.stripes[s].write()).collect()
    }

    /// Makes whole chunks `range` read as zeroes and marks them dirty, with
    /// at most one persist and one hole punch for the lot (a guest discarding
    /// its whole disk must not cost an fsync per chunk). Caller holds
    /// [`lock_many`](Self::lock_many) for `range`.
    pub fn zero_chunks(&self, range: std::ops::Range<u64>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let mut need_persist = false;
        let mut absent = Vec::new();
        {
            let persisted = self.persisted.lock();
            for idx in range.clone() {
                match self.state(idx) {
                    DIRTY => {}
                    CLEAN => {
                        self.set_state(idx, DIRTY);
                        self.dirty.fetch_add(1, Ordering::Relaxed);
                        need_persist |= persisted.get(idx as usize) == Some(&CLEAN);
                    }
                    _ => absent.push(idx),
                }
            }
        }
        if need_persist {
            self.persist()?;
        }
        let cs = self.chunk_size;
        self.data.write_zeroes_at(range.start * cs, (range.end - range.start) * cs)?;
        for idx in absent {
            self.set_state(idx, DIRTY);
            self.cached.fetch_add(1, Ordering::Relaxed);
            self.dirty.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Evicts up to `want` clean, unpinned chunks, least recently used
    /// first, skipping any whose lock is busy (including `holding`, whose
    /// stripe the caller has).
    fn evict(&self, want: u64, holding: u64) -> io::Result<()> {
        let mut cands: Vec<(u32, u64)> = {
            let slots = self.slots.read();
            slots
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    *i as u64 != holding
                        && s.state.load(Ordering::Relaxed) == CLEAN
                        && !s.pinned.load(Ordering::Relaxed)
                })
                .map(|(i, s)| (s.tick.load(Ordering::Relaxed), i as u64))
                .collect()
        };
        cands.sort_unstable();
        let hold_stripe = (holding as usize) % STRIPES;
        let mut guards = Vec::new();
        let mut victims = Vec::new();
        for (_, idx) in cands {
            if victims.len() as u64 >= want {
                break;
            }
            let s = (idx as usize) % STRIPES;
            if s == hold_stripe {
                continue;
            }
            // A stripe may cover several victims; take each lock once.
            let already = victims.iter().any(|&v: &u64| (v as usize) % STRIPES == s);
            if !already {
                match self.stripes[s].try_write() {
                    Some(g) => guards.push(g),
                    None => continue,
                }
            }
            if self.state(idx) == CLEAN {
                self.set_state(idx, ABSENT);
                victims.push(idx);
            }
        }
        if victims.is_empty() {
            return Ok(());
        }
        self.cached.fetch_sub(victims.len() as u64, Ordering::Relaxed);
        self.evictions.fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.persist()?;
        for idx in victims {
            self.data.write_zeroes_at(idx * self.chunk_size, self.chunk_size)?;
        }
        drop(guards);
        Ok(())
    }

    /// Makes the data file and the chunk map durable: fsync data, then
    /// atomically replace the map.
    pub fn persist(&self) -> io::Result<()> {
        let mut persisted = self.persisted.lock();
        let snap: Vec<u8> = self.slots.read().iter().map(|s| s.state.load(Ordering::Acquire)).collect();
        self.data.flush()?;
        let header = StateHeader {
            format: STATE_MAGIC.into(),
            version: STATE_VERSION,
            id: self.id.clone(),
            image_len: self.len(),
            chunks: snap.len() as u64,
        };
        let mut body = serde_json::to_vec(&header).map_err(io::Error::other)?;
        body.push(b'\n');
        body.extend_from_slice(&snap);
        let sum = Sha256::digest(&body);
        body.extend_from_slice(&sum);
        let tmp = self.dir.join("state.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("state"))?;
        File::open(&self.dir)?.sync_all()?;
        *persisted = snap;
        Ok(())
    }

    /// True if the in-memory map differs from the persisted one.
    pub fn needs_persist(&self) -> bool {
        let persisted = self.persisted.lock();
        let slots = self.slots.read();
        slots.len() != persisted.len()
            || slots.iter().zip(persisted.iter()).any(|(s, p)| s.state.load(Ordering::Relaxed) != *p)
    }

    /// Releases the directory lock early (on close), so a new store can
    /// open the directory while stray tasks still hold this one.
    pub fn unlock(&self) {
        // SAFETY: plain syscall on an owned fd.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Chunks held (clean + dirty).
    pub fn cached_chunks(&self) -> u64 {
        self.cached.load(Ordering::Relaxed)
    }

    /// Dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Chunks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The cap on cached bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Chunk indexes in a given state (for export and stats).
    pub fn chunks_in(&self, state: u8) -> Vec<u64> {
        self.slots
            .read()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.load(Ordering::Relaxed) == state)
            .map(|(i, _)| i as u64)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(gen: u64) -> CacheIdentity {
        CacheIdentity { volume_id: "ab".repeat(16), generation: gen, chunk_size: 4096 }
    }

    #[test]
    fn install_evict_dirty_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c");
        let (c, o) = SsdCache::open(&dir, id(1), 10 * 4096, 4 * 4096, OpenMode::Serve).unwrap().unwrap();
        assert_eq!(o, Opened::Fresh);
        // A second opener is refused while the first holds the lock.
        assert!(SsdCache::open(&dir, id(1), 10 * 4096, 4 * 4096, OpenMode::Serve).is_err());
        for i in 0..4 {
            let _g = c.lock_write(i);
            assert!(c.install_clean(i, &vec![i as u8 + 1; 4096]).unwrap());
        }
        let mut b = [0u8; 8];
        let g = c.lock_write(1);
        let mut w = *b"dirtydat";
        c.write(1, 100, &IoVec::from_slice(&mut w), None).unwrap();
        drop(g);
        // Over the cap: the least recently used clean chunk (0) goes, never dirty 1.
        {
            let _g = c.lock_write(5);
            assert!(c.install_clean(5, &vec![6u8; 4096]).unwrap());
        }
        assert_eq!(c.state(0), ABSENT);
        assert_eq!(c.state(1), DIRTY);
        c.read(5, 0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(b, [6u8; 8]);
        c.persist().unwrap();
        drop(c);
        let (c, o) = SsdCache::open(&dir, id(1), 10 * 4096, 4 * 4096, OpenMode::Serve).unwrap().unwrap();
        assert_eq!(o, Opened::Reused { cached: 4, dirty: 1 });
        c.read(1, 100, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(&b, b"dirtydat");
        drop(c);
        // Another generation with dirty data: refused, not discarded.
        let e = SsdCache::open(&dir, id(2), 10 * 4096, 4 * 4096, OpenMode::Serve).err().unwrap();
        assert!(e.to_string().contains("unsaved writes"), "{e}");
    }

    #[test]
    fn mismatched_clean_cache_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = SsdCache::open(d.path(), id(1), 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
        {
            let _g = c.lock_write(0);
            c.install_clean(0, &[1u8; 4096]).unwrap();
        }
        c.persist().unwrap();
        drop(c);
        let (c, o) = SsdCache::open(d.path(), id(2), 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
        assert!(matches!(o, Opened::Discarded(ref w) if w.contains("generation 1")), "{o:?}");
        assert_eq!(c.state(0), ABSENT);
        drop(c);
        // Damaged state file: discarded with a reason.
        std::fs::write(d.path().join("state"), b"garbage garbage garbage garbage garbage").unwrap();
        let (_c, o) = SsdCache::open(d.path(), id(2), 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
        assert!(matches!(o, Opened::Discarded(ref w) if w.contains("checksum")), "{o:?}");
    }
}
