//! SSD tier: one cache directory per volume holding a sparse `data` file
//! (chunk N at offset N * chunk_size) and a `state` file mapping every chunk
//! to absent / clean / dirty / partial (some 4 KiB pages hold the remote
//! generation's bytes; a bitmap says which). The state file is rewritten
//! atomically (temp, fsync, rename) and only ever claims data that was
//! fsynced before it, so after a crash the cache never serves bytes it did
//! not fully write.
//!
//! Ordering rules that keep that promise:
//! - clean install (a whole chunk, or pages of one): write data, then mark
//!   clean or set the page bits in memory; the next persist fsyncs data
//!   before writing the map. A whole chunk installed over a partial one
//!   rewrites its present pages with the same bytes, so the map stays true;
//! - eviction (clean or partial): mark absent and drop the bitmap, persist
//!   the map, and only then punch the hole;
//! - first write to a chunk the persisted map calls clean: mark dirty and
//!   make that one change durable (a journal record and its fdatasync; the
//!   data file needs no fsync, it still holds the clean bytes synced before
//!   the map claimed them) before writing into it, so the map never calls
//!   modified bytes "clean"; concurrent first writes share one record (a
//!   record that fails puts the chunk back as it was in memory, so the
//!   next write records first). A small first write with no other first
//!   write or persist under way rides in that record itself (a write-ahead
//!   log), so the guest's FLUSH after it has nothing left to sync: one
//!   sync for the pair, as a plain disk pays. The chunk is then *logged*: until the next checkpoint its
//!   small writes go to the journal too (their FLUSH syncs the journal,
//!   not the data file), and any other change to its bytes (an install, a
//!   large write, a write after zeroing) writes a checkpoint first, so a
//!   replay never writes a logged record's old bytes over newer ones. A
//!   record carries a write as the data file stores it (an encrypted
//!   cache: the ciphertext of the pages it touches);
//! - first write to a chunk the persisted map calls partial: the same, the
//!   record saying dirty-partial with the persisted page bitmap (or absent,
//!   when the write does not go by pages), then go on as for an absent
//!   chunk — also when the chunk has been completed since (clean in
//!   memory, still partial on disk); zeroing such a chunk (or a clean one)
//!   persists before the hole punch.
//!
//! Every move into or out of partial happens under the bitmap mutex, so a
//! persist snapshots state bytes and bitmaps that agree. Bitmaps exist only
//! for partial chunks.

mod bitmap;
mod directory;
mod filesystem;
mod place;
mod slots;
mod state_file;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::{Deserialize, Serialize};

use crate::remote::private;
use crate::tier::cache_crypto::{self, CacheFile, Sealing};
use crate::tier::dirty_pages::DirtyPages;
use crate::tier::journal::{Change, Journal, Logged, Record};
use crate::tier::{IoMode, IoVec};
use crate::tier::{LocalFile, Storage};
use crate::volume::{VolumeError, VolumeResult};

pub use bitmap::overlay_absent;
pub(crate) use bitmap::{bit, bitmap_words};
use bitmap::{popcount, Bitmap};
pub(crate) use directory::remove_files;
use directory::{cache_err, damaged_reason, lock_exclusive, lost_state, newer_reason};
pub use directory::{remove_damaged, RemovedDamaged};
pub(crate) use filesystem::read_only as on_read_only_mount;
use place::Place;
use slots::Slots;
use state_file::{read_state, Loaded, StateHeader, Unusable, STATE_MAGIC};

/// Chunk not in the cache.
pub const ABSENT: u8 = 0;
/// Chunk holds the remote generation's bytes; may be evicted.
pub const CLEAN: u8 = 1;
/// Chunk holds local writes not yet uploaded; never evicted.
pub const DIRTY: u8 = 2;
/// Some 4 KiB pages of the chunk hold the remote generation's bytes (the rest are unknown).
pub const PARTIAL: u8 = 3;
/// Some 4 KiB pages hold local changes (written without fetching the
/// chunk), other present pages the generation's bytes, the rest are
/// unknown (still on the remote); never evicted. A bitmap says which pages
/// are present. A read of an absent page fetches the chunk and fills only
/// the absent pages.
pub const DIRTY_PARTIAL: u8 = 4;
/// Zeroed whole by the guest (discard, write-zeroes) and not yet
/// committed: reads as zeroes, holds no data (it does not count against
/// the cap), goes up as a zero chunk (nothing uploaded).
pub const ZERO_DIRTY: u8 = 5;
/// Granularity of partial chunks.
pub const PAGE: u64 = 4096;

/// Most of [`default_min_free`]: on a large disk a few GiB is what a burst
/// of guest writes needs while the sibling daemons give way.
pub const MIN_FREE_MAX: u64 = 4 << 30;

/// How long a guest write that finds the cache's disk full, with nothing
/// clean here to evict, waits for other daemons' caches on that disk to
/// give way (they look every quarter of a second).
const SIBLINGS_MAKE_ROOM: Duration = Duration::from_secs(2);

/// What clean data leaves free on the filesystem of the cache directory
/// `dir` unless told otherwise: a twentieth of its size, at most
/// [`MIN_FREE_MAX`]. Several daemons (one per VM disk) often keep their
/// caches on one disk, each with its own cap; the free space it leaves is
/// where any of them writes changes not uploaded yet, which cannot give way.
pub fn default_min_free(dir: &Path) -> u64 {
    match rustix::fs::statvfs(dir) {
        Ok(st) => (st.f_blocks.saturating_mul(st.f_frsize) / 20).min(MIN_FREE_MAX),
        Err(_) => 0,
    }
}

/// True for the states that keep a page bitmap.
fn has_bitmap(state: u8) -> bool {
    matches!(state, PARTIAL | DIRTY_PARTIAL)
}

/// True for the states that hold local changes.
pub fn is_dirty(state: u8) -> bool {
    matches!(state, DIRTY | DIRTY_PARTIAL | ZERO_DIRTY)
}

const STRIPES: usize = 1024;
/// A first write into a clean chunk up to this size rides in its record
/// (the small synchronous writes a person waits on one at a time; a
/// stream of large writes would pay twice its bytes for nothing).
const LOG_FIRST_MAX: u64 = 16 << 10;
/// Writes up to this size into a logged chunk ride in journal records;
/// a larger one writes a checkpoint first and goes to the data file.
const LOG_MAX_WRITE: u64 = 64 << 10;
/// A journal past this size takes no more logged writes: the next write
/// into a logged chunk writes a checkpoint first.
const LOG_MAX_JOURNAL: u64 = 32 << 20;
/// The journal grows to at least this many bytes (or twice the map) before
/// the next persist writes a checkpoint instead.
const JOURNAL_MIN_CHECKPOINT: u64 = 1 << 20;

/// What a cache directory must match to be reused: the volume, not its
/// generation (a cache holding dirty chunks outlives the commits they go
/// out in; which clean chunks are still current is checked per chunk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheIdentity {
    pub volume_id: String,
    pub chunk_size: u64,
}

/// Why a persist failed: a failed fsync is sticky, a map that could not be
/// written is not (the old one stands).
enum Persist {
    Sticky(io::Error),
    Retryable(io::Error),
}

/// What `open` found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was there.
    Fresh,
    /// A matching cache was reused (`cached` counts whole chunks).
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

/// Who a cache directory is: its id (what manifests and the writer lease
/// name), and for a copy of another cache's directory found by
/// [`Place`], that cache's id and the id its encrypted data file's key
/// derives from ("" when not a copy, and when that key is its own).
struct Ident {
    cache_id: String,
    copy_of: String,
    key_id: String,
}

impl Ident {
    fn fresh() -> Self {
        Self { cache_id: hex::encode(rand::random::<[u8; 16]>()), copy_of: String::new(), key_id: String::new() }
    }

    /// The id the data file's key derives from.
    fn key_id(&self) -> &str {
        if self.key_id.is_empty() {
            &self.cache_id
        } else {
            &self.key_id
        }
    }
}

/// Bitmaps of the partial chunks.
#[derive(Default)]
struct Pages {
    maps: HashMap<u64, Bitmap>,
    /// Bumped on every change of `maps`, so a persist can tell it is stale.
    gen: u64,
}

/// What the state file on disk says.
struct Persisted {
    states: Vec<u8>,
    /// The page bitmaps recorded.
    maps: HashMap<u64, Bitmap>,
    /// The generation recorded.
    generation: u64,
    /// The image length recorded.
    image_len: u64,
    /// `data_epoch` as of the last fsync of the data file.
    data_epoch: u64,
    /// False until this process wrote the state file once (it may be
    /// missing, or of an older version).
    written: bool,
    /// `Pages::gen` at the time of that snapshot.
    gen: u64,
    /// Batches of [`Marks`] made durable (batch `b` is when `marked > b`).
    marked: u64,
    /// Chunks named by volatile records since, with the entry the last of
    /// them gave: on replay such a record is the last word on its chunk
    /// until a later record names it, so the next persist names them all,
    /// even those back in the state recorded here (written, committed and
    /// evicted in between, say), and a change back to that state is
    /// recorded too (zeroed, then written into).
    volatile: HashMap<u64, (u8, Option<Bitmap>)>,
}

/// Chunks queued for one journal record by [`SsdCache::mark_unclean`]
/// (group commit), and the number of the batch they will go in.
#[derive(Default)]
struct Marks {
    queue: Vec<u64>,
    batch: u64,
}

/// Who the cache whose state header is `h` is, found in `dir` at `here`:
/// the id it records, unless the state was written elsewhere — a copy of
/// the directory, which must not pass for the cache it was copied from
/// (take its writer lease as its own, adopt its commits): then a new id,
/// and a warning. The data file of an encrypted copy keeps the original's
/// key.
fn identify(dir: &Path, h: &StateHeader, here: &Place, dirty: u64, mode: OpenMode) -> Ident {
    if h.cache_id.len() != 32 {
        // Before version 3 a cache had no id.
        return Ident::fresh();
    }
    let Some(why) = here.moved_from(&h.machine, h.dir_inode, h.dir_subvol) else {
        return Ident { cache_id: h.cache_id.clone(), copy_of: h.copy_of.clone(), key_id: h.key_id.clone() };
    };
    let mut ident = Ident::fresh();
    ident.copy_of = h.cache_id.clone();
    if !h.sealed.is_empty() {
        ident.key_id = if h.key_id.is_empty() { h.cache_id.clone() } else { h.key_id.clone() };
    }
    let now = match mode {
        OpenMode::Serve => format!("It is cache {} from now on", ident.cache_id),
        OpenMode::Inspect => "It is looked at as another cache".to_string(),
    };
    let changes = if dirty > 0 {
        format!(
            "its {dirty} chunks of changes go up only if the volume is still at the generation they were made on \
             (otherwise they are kept, as a conflict)"
        )
    } else {
        "it holds no changes".to_string()
    };
    tracing::warn!(
        "cache directory {} looks like a copy of cache {}: {why}, as after a copy, a restore from a backup or \
         a snapshot, or a move to another machine or file system. {now}, which does not take cache {}'s writer \
         lease or commits as its own; {changes}",
        dir.display(),
        h.cache_id,
        h.cache_id
    );
    ident
}

/// The SSD tier of one volume.
pub struct SsdCache {
    dir: PathBuf,
    /// The data file, plaintext or encrypted (cache_crypto.rs).
    data: CacheFile,
    /// Its state file's `sealed` value.
    sealed: String,
    lock: File,
    id: CacheIdentity,
    chunk_size: u64,
    slots: Slots,
    /// Per-chunk (striped) locks ordering installs, writes, evictions and
    /// reads of one chunk; the tiered store also updates RAM under them.
    stripes: Vec<RwLock<()>>,
    len: AtomicU64,
    cap: u64,
    /// Bytes clean data leaves free on the cache's filesystem
    /// ([`default_min_free`]): other daemons' caches share that disk, and
    /// their changes not uploaded yet cannot give way.
    min_free: AtomicU64,
    /// When a write last waited in vain for the full disk to get room.
    full_wait_failed: Mutex<Option<std::time::Instant>>,
    /// The file system has holes: evicting a chunk gives its space back.
    sparse: bool,
    /// Whole chunks held (clean + dirty).
    cached: AtomicU64,
    dirty: AtomicU64,
    /// Lock order: `persisted`, then `pages`.
    pages: Mutex<Pages>,
    /// Chunks partial, and pages held by them (updated under `pages`).
    partial: AtomicU64,
    pages_held: AtomicU64,
    /// The map as last persisted; the mutex serialises persists.
    persisted: Mutex<Persisted>,
    /// Chunks waiting for [`mark_unclean`](Self::mark_unclean) to make
    /// their map entry stop claiming clean bytes.
    marks: Mutex<Marks>,
    /// Where the CLOCK sweep of eviction resumes (the lock serialises
    /// choosing victims).
    hand: Mutex<usize>,
    evictions: AtomicU64,
    /// The generation clean chunks match.
    generation: AtomicU64,
    cache_id: String,
    /// The cache this directory was found to be a copy of ("" if none).
    copy_of: String,
    /// The id the encrypted data file's key derives from, when not
    /// `cache_id` (a copy's: the original's).
    key_id: String,
    /// Where the directory is: recorded in the state, so a copy of it
    /// opened elsewhere is known for one (place.rs).
    place: Place,
    /// Source of write sequence numbers.
    write_seq: AtomicU64,
    /// Pages written since each dirty chunk was last clean: write-back
    /// uploads just those as a patch. A dirty chunk without an entry (after
    /// a crash, or zeroed whole) counts as changed everywhere.
    dirty_pages: DirtyPages,
    /// Changes since the last checkpoint (None when only inspecting).
    journal: Mutex<Option<Journal>>,
    /// Chunks whose `logged` flag is set (under the journal lock).
    logged: Mutex<Vec<u64>>,
    /// How many chunks are logged: a write checks flags only when some are.
    logged_count: AtomicUsize,
    /// Bumped by every logged write into the data file: a checkpoint that
    /// sees it move during its data sync syncs again before dropping the
    /// records that covered those bytes.
    logged_writes: AtomicU64,
    /// Bumped by every write to the data file, so a flush with nothing
    /// written since the last one costs no fsync.
    data_epoch: AtomicU64,
    /// Set once an fsync or state write failed: Linux may have dropped the
    /// dirty pages, so a later fsync "succeeding" would prove nothing.
    /// Every later flush fails; the cache must be reopened (which trusts
    /// only what the last good state file says).
    failed: AtomicBool,
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
        generation: u64,
        image_len: u64,
        cap: u64,
        mode: OpenMode,
    ) -> VolumeResult<Option<(Self, Opened)>> {
        Self::open_sealed(dir, id, generation, image_len, cap, mode, &Sealing::Plain)
    }

    /// [`open`](Self::open) with the data file kept as `sealing` says: a
    /// cache kept otherwise is discarded, or refused while it holds dirty
    /// chunks.
    pub fn open_sealed(
        dir: &Path,
        id: CacheIdentity,
        generation: u64,
        image_len: u64,
        cap: u64,
        mode: OpenMode,
        sealing: &Sealing,
    ) -> VolumeResult<Option<(Self, Opened)>> {
        let want = sealing.wanted();
        if mode == OpenMode::Inspect && !dir.join("state").exists() {
            return Ok(None);
        }
        let read_only = |e: io::Error, what, path: &Path| match e.raw_os_error() {
            Some(libc::EROFS) => cache_err(dir, filesystem::read_only(dir)),
            _ => VolumeError::io(what, path, e),
        };
        private::create_dir_all(dir).map_err(|e| read_only(e, "creating cache directory", dir))?;
        let lock_path = dir.join("lock");
        let lock = private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| read_only(e, "opening", &lock_path))?;
        lock_exclusive(&lock, dir)?;
        let place = Place::here(dir).map_err(|e| VolumeError::io("reading the inode of", dir, e))?;
        let state_path = dir.join("state");
        let mut sealed = want.clone().unwrap_or_default();
        // The version of the state reused (0: none).
        let mut reused_version = 0;
        let (opened, states, maps, len, generation, ident, writes) = match read_state(&state_path) {
            Ok(None) => {
                if let Some(why) = lost_state(dir) {
                    return Err(cache_err(dir, damaged_reason(dir, &why)));
                }
                (Opened::Fresh, Vec::new(), HashMap::new(), image_len, generation, Ident::fresh(), Vec::new())
            }
            Ok(Some(l)) if l.header.id == id && want.as_ref().is_none_or(|w| *w == l.header.sealed) => {
                sealed = l.header.sealed.clone();
                reused_version = l.header.version;
                let dirty = l.states.iter().filter(|&&s| is_dirty(s)).count() as u64;
                let cached = l.states.iter().filter(|&&s| s == CLEAN || s == DIRTY).count() as u64;
                let ident = identify(dir, &l.header, &place, dirty, mode);
                (
                    Opened::Reused { cached, dirty },
                    l.states,
                    l.maps,
                    l.header.image_len,
                    l.header.generation,
                    ident,
                    l.writes,
                )
            }
            Ok(Some(Loaded { header: h, states, .. })) => {
                let dirty = states.iter().filter(|&&s| is_dirty(s)).count();
                let why = if h.id.volume_id != id.volume_id {
                    format!("it belongs to volume {}, not {}", h.id.volume_id, id.volume_id)
                } else if h.id.chunk_size != id.chunk_size {
                    format!("its chunk size {} differs from the volume's {}", h.id.chunk_size, id.chunk_size)
                } else {
                    let want = want.as_deref().unwrap_or_default();
                    let why = format!(
                        "it is {}, and a {} cache was asked for",
                        cache_crypto::describe(&h.sealed),
                        cache_crypto::describe(want)
                    );
                    if dirty > 0 {
                        return Err(cache_err(dir, format!("holds {dirty} chunks of unsaved writes, but {why}; serve it as it is ({} --encrypt-cache) until `driveblk sync` has saved them", if h.sealed.is_empty() { "without" } else { "with" })));
                    }
                    why
                };
                if dirty > 0 && h.id.volume_id != id.volume_id {
                    // Export, fork and discard-local open the volume at the
                    // URL too, so they refuse the same way: say what works.
                    return Err(cache_err(
                        dir,
                        format!(
                            "holds {dirty} chunks of unsaved writes of volume {}, but the URL now names volume {} \
                         (re-imported or replaced?); those writes belong to the old volume: if it still exists \
                         elsewhere, serve or export it with this --cache-dir; otherwise move this directory aside \
                         (`mv {d} {d}.old`) or give another --cache-dir, and the new volume starts with an empty cache",
                            h.id.volume_id,
                            id.volume_id,
                            d = dir.display()
                        ),
                    ));
                }
                if dirty > 0 {
                    return Err(cache_err(dir, format!("holds {dirty} chunks of unsaved writes, but {why}; use the right cache directory, or `driveblk export` those writes with it first")));
                }
                if mode == OpenMode::Inspect {
                    return Ok(None);
                }
                (Opened::Discarded(why), Vec::new(), HashMap::new(), image_len, generation, Ident::fresh(), Vec::new())
            }
            // Without its state nothing tells unsaved writes in the data
            // file from stale bytes: dropping it could lose writes that were
            // never uploaded, so it stays as it is for the user to decide.
            // A newer driveblk's state is sound: only this binary cannot
            // read it, and it is not to be discarded as damaged.
            Err(Unusable::Newer(v)) => return Err(cache_err(dir, newer_reason(dir, v))),
            Err(Unusable::Damaged(why)) => return Err(cache_err(dir, damaged_reason(dir, &why))),
        };
        let data_path = dir.join("data");
        let fresh = states.is_empty() || matches!(opened, Opened::Discarded(_));
        // Not asked outside serving: eviction then frees what it frees.
        let mut sparse = true;
        if mode == OpenMode::Serve {
            // Before the data file is made: a file system that cannot hold
            // the cache is refused here, not by a guest write's errno.
            let held = if fresh { 0 } else { std::fs::metadata(&data_path).map_or(0, |m| m.len()) };
            sparse = filesystem::check(dir, len.max(image_len), held, !sealed.is_empty())
                .map_err(|why| cache_err(dir, why))?;
        }
        // After the check: `chmod` is no way out where it refused.
        private::warn_if_open_dir(dir);
        if mode == OpenMode::Serve && fresh {
            // Start clean: stale bytes in the data file are never trusted.
            let f = private::options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&data_path)
                .map_err(|e| VolumeError::io("creating", &data_path, e))?;
            drop(f);
        }
        let data = LocalFile::open(&data_path, mode == OpenMode::Inspect)
            .map_err(|e| VolumeError::io("opening", &data_path, e))?;
        let data = sealing.data_file(data, &sealed, ident.key_id()).map_err(|why| cache_err(dir, why))?;
        if !writes.is_empty() {
            // Writes the journal carried may be missing from the data file
            // (a host crash): write them again, in order, and make them
            // durable before anything reads the file. Inspecting does this
            // too; it changes no byte the cache serves.
            let rw = match mode {
                OpenMode::Serve => None,
                OpenMode::Inspect => Some(
                    LocalFile::open(&data_path, false)
                        .map_err(|e| VolumeError::io("opening", &data_path, e))
                        .and_then(|f| {
                            sealing.data_file(f, &sealed, ident.key_id()).map_err(|why| cache_err(dir, why))
                        })?,
                ),
            };
            let file = rw.as_ref().unwrap_or(&data);
            writes
                .iter()
                .try_for_each(|w| file.write_stored(w.at, &w.bytes))
                .and_then(|()| file.flush())
                .map_err(|e| VolumeError::io("replaying the journal's writes into", &data_path, e))?;
        }
        let cs = id.chunk_size;
        let n = len.div_ceil(cs) as usize;
        let slots = Slots::new(n.max(states.len()));
        let (mut cached, mut dirty) = (0, 0);
        for (i, &s) in states.iter().enumerate() {
            slots.with(i as u64, |slot| slot.state.store(s, Ordering::Relaxed));
            cached += (s == CLEAN || s == DIRTY) as u64;
            dirty += is_dirty(s) as u64;
        }
        let held: u64 = maps.values().map(|m| popcount(m)).sum();
        let persisted_maps = maps.clone();
        let partial = maps.len() as u64;
        let persisted: Vec<u8> = slots.view().iter().map(|s| s.state.load(Ordering::Relaxed)).collect();
        let c = Self {
            dir: dir.to_path_buf(),
            data,
            sealed,
            lock,
            id,
            chunk_size: cs,
            slots,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            len: AtomicU64::new(len),
            cap,
            // Without holes evicting frees no disk space: keeping some free
            // by evicting would only empty the cache, sweep after sweep.
            min_free: AtomicU64::new(if sparse { default_min_free(dir) } else { 0 }),
            full_wait_failed: Mutex::new(None),
            sparse,
            cached: AtomicU64::new(cached),
            dirty: AtomicU64::new(dirty),
            pages: Mutex::new(Pages { maps, gen: 0 }),
            partial: AtomicU64::new(partial),
            pages_held: AtomicU64::new(held),
            persisted: Mutex::new(Persisted {
                states: persisted,
                maps: persisted_maps,
                generation,
                image_len: len,
                data_epoch: 0,
                written: false,
                gen: 0,
                marked: 0,
                volatile: HashMap::new(),
            }),
            marks: Mutex::new(Marks::default()),
            hand: Mutex::new(0),
            evictions: AtomicU64::new(0),
            generation: AtomicU64::new(generation),
            cache_id: ident.cache_id,
            copy_of: ident.copy_of,
            key_id: ident.key_id,
            place,
            write_seq: AtomicU64::new(1),
            dirty_pages: DirtyPages::new(dir, cs),
            data_epoch: AtomicU64::new(1),
            journal: Mutex::new(None),
            logged: Mutex::new(Vec::new()),
            logged_count: AtomicUsize::new(0),
            logged_writes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        };
        if mode == OpenMode::Serve {
            *c.journal.lock() = Some(
                Journal::open(dir, 0, bitmap_words(cs))
                    .map_err(|e| VolumeError::io("opening the journal in", dir, e))?,
            );
            // Which pages of the dirty chunks a clean stop said changed: their
            // uploads stay patches. Only a state of a version that announces
            // the record vouches for it: one a binary that predates it wrote
            // (after an old `discard-local` left the record behind) may have
            // written into those chunks since, and a patch of the recorded
            // pages would leave those writes out. Then it is only removed.
            let trusted = reused_version >= state_file::PAGES_KEPT_VERSION;
            if let Err(e) = c.dirty_pages.take(|i| trusted && matches!(c.state(i), DIRTY | DIRTY_PARTIAL)) {
                tracing::warn!(error = %e, "ignoring the cache's record of changed pages: dirty chunks go up whole");
            }
            // Record the identity now (a fresh checkpoint), so a crash
            // before the first flush still leaves a directory that says
            // whose it is.
            c.persist().map_err(|e| VolumeError::io("writing cache state in", dir, e))?;
        }
        Ok(Some((c, opened)))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the cache is kept encrypted (`--encrypt-cache`).
    pub fn is_sealed(&self) -> bool {
        self.data.is_sealed()
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
        self.slots.len() as u64
    }

    /// Grows the local length (and the chunk map with it).
    pub fn grow(&self, len: u64) {
        if len <= self.len() {
            return;
        }
        self.slots.grow(len.div_ceil(self.chunk_size) as usize);
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

    /// [`lock_read`](Self::lock_read) without waiting (None: a writer holds
    /// it, perhaps across an fsync, an eviction or a hole punch).
    pub fn try_lock_read(&self, idx: u64) -> Option<RwLockReadGuard<'_, ()>> {
        self.stripes[(idx as usize) % STRIPES].try_read()
    }

    /// The stripe lock for chunk `idx`, exclusive.
    pub fn lock_write(&self, idx: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(idx as usize) % STRIPES].write()
    }

    /// State of chunk `idx` ([`ABSENT`] past the end).
    pub fn state(&self, idx: u64) -> u8 {
        self.slots.with(idx, |s| s.state.load(Ordering::Acquire)).unwrap_or(ABSENT)
    }

    /// True when the whole chunk is local (CLEAN, DIRTY, or zeroed).
    pub fn has_chunk(&self, idx: u64) -> bool {
        matches!(self.state(idx), CLEAN | DIRTY | ZERO_DIRTY)
    }

    /// True when every byte of [off, off + len) inside chunk `idx` is local:
    /// the whole chunk is, or it is PARTIAL and every page overlapping the
    /// range is present. len 0 -> same as has_chunk || PARTIAL.
    pub fn has_pages(&self, idx: u64, off: u64, len: u64) -> bool {
        match self.state(idx) {
            CLEAN | DIRTY | ZERO_DIRTY => true,
            PARTIAL | DIRTY_PARTIAL => {
                let pages = self.pages.lock();
                let Some(m) = pages.maps.get(&idx) else {
                    // It stopped being partial meanwhile (the caller did not
                    // hold the stripe lock).
                    drop(pages);
                    return self.has_chunk(idx);
                };
                if len == 0 {
                    return true;
                }
                let Some(end) = off.checked_add(len).filter(|&e| e <= self.chunk_size) else {
                    return false;
                };
                (off / PAGE..end.div_ceil(PAGE)).all(|p| bit(m, p))
            }
            _ => false,
        }
    }

    /// Marks chunk `idx` used; returns whether it was used already since
    /// the last eviction sweep passed it.
    fn touch(&self, idx: u64) -> bool {
        self.slots
            .with(idx, |s| {
                // Only write when it changes: a hot chunk's line stays shared.
                let was = s.referenced.load(Ordering::Relaxed);
                if !was {
                    s.referenced.store(true, Ordering::Relaxed);
                }
                was
            })
            .unwrap_or(false)
    }

    fn set_state(&self, idx: u64, st: u8) {
        self.slots.with(idx, |s| s.state.store(st, Ordering::Release));
    }

    /// Pages of chunk `idx` inside the local image (a short last page counts).
    fn pages_in(&self, idx: u64) -> u64 {
        self.len().saturating_sub(idx * self.chunk_size).min(self.chunk_size).div_ceil(PAGE)
    }

    /// Whether storing pages `[off, off + len)` of chunk `idx` (absent or
    /// partial) would make it whole, i.e. clean.
    pub fn would_complete(&self, idx: u64, off: u64, len: u64) -> bool {
        if !matches!(self.state(idx), ABSENT | PARTIAL) {
            return false;
        }
        let (first, last) = (off / PAGE, (off + len).div_ceil(PAGE));
        let pages = self.pages.lock();
        let m = pages.maps.get(&idx);
        (0..self.pages_in(idx)).all(|p| (first..last).contains(&p) || m.is_some_and(|m| bit(m, p)))
    }

    /// Bytes held by chunk `idx`'s pages if it is partial, else 0.
    fn partial_bytes(&self, idx: u64) -> u64 {
        self.pages.lock().maps.get(&idx).map_or(0, |m| popcount(m) * PAGE)
    }

    /// Leaves `pages` (the lock on them) with chunk `idx` no longer partial:
    /// drops its bitmap and sets its state to `to`. Returns the pages it held
    /// (0 if it was not partial, and then nothing changes).
    fn leave_partial(&self, pages: &mut Pages, idx: u64, to: u8) -> u64 {
        let Some(m) = pages.maps.remove(&idx) else {
            return 0;
        };
        let n = popcount(&m);
        pages.gen += 1;
        self.partial.fetch_sub(1, Ordering::Relaxed);
        self.pages_held.fetch_sub(n, Ordering::Relaxed);
        self.set_state(idx, to);
        n
    }

    /// Marks a partial chunk absent (in memory); returns whether the
    /// persisted map still calls it partial, i.e. must be persisted before
    /// any byte of the chunk changes.
    fn drop_partial(&self, idx: u64) -> bool {
        self.leave_partial(&mut self.pages.lock(), idx, ABSENT);
        self.persisted.lock().states.get(idx as usize) == Some(&PARTIAL)
    }

    /// Puts partial chunk `idx` back as it was before
    /// [`drop_partial`](Self::drop_partial), with its bitmap `m`.
    fn restore_partial(&self, idx: u64, m: Bitmap) {
        let mut pages = self.pages.lock();
        self.partial.fetch_add(1, Ordering::Relaxed);
        self.pages_held.fetch_add(popcount(&m), Ordering::Relaxed);
        pages.maps.insert(idx, m);
        pages.gen += 1;
        self.set_state(idx, PARTIAL);
    }

    /// After a write into chunk `idx` failed to make the map on disk stop
    /// claiming the chunk's bytes: while that map still claims them, none
    /// changed (they follow the record), and `undo` puts back the chunk's
    /// state in memory, so the next write records first instead of
    /// changing them unrecorded. No persist comes between the check and
    /// `undo`.
    fn undo_unless_recorded(&self, idx: u64, undo: impl FnOnce()) {
        let persisted = self.persisted.lock();
        if matches!(persisted.states.get(idx as usize), Some(&CLEAN | &PARTIAL)) {
            undo();
        }
    }

    /// Marks a chunk as metadata: never evicted.
    pub fn set_pinned(&self, idx: u64) {
        self.slots.with(idx, |s| s.pinned.store(true, Ordering::Relaxed));
    }

    /// Reads part of a cached chunk. Caller holds the stripe lock and saw
    /// the range present. Non-blocking reads use `RWF_NOWAIT`: a page-cache
    /// hit completes inline, anything else says `WouldBlock`. Returns
    /// whether the chunk was read before since eviction last passed it
    /// (a hot chunk, worth a copy in RAM).
    pub fn read(&self, idx: u64, off: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<bool> {
        if self.state(idx) == ZERO_DIRTY {
            // Whatever the data file holds there (a crash may have come
            // before the hole punch), the chunk is zeroes.
            bufs.fill_zero(0, bufs.len());
            return Ok(false);
        }
        self.data.read_vectored_at(idx * self.chunk_size + off, bufs, mode)?;
        Ok(self.touch(idx))
    }

    /// Reads a whole cached chunk. Caller holds the stripe lock.
    pub fn read_chunk(&self, idx: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.chunk_size as usize];
        if self.state(idx) == ZERO_DIRTY {
            return Ok(v);
        }
        self.data.read_at(idx * self.chunk_size, &mut v)?;
        Ok(v)
    }

    /// Reads `buf.len()` bytes of cached chunk `idx` from `off`. Caller
    /// holds the stripe lock.
    pub fn read_in_chunk(&self, idx: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.state(idx) == ZERO_DIRTY {
            buf.fill(0);
            return Ok(());
        }
        self.data.read_at(idx * self.chunk_size + off, buf)
    }

    /// Makes room for `need` more bytes of clean data under the cap and
    /// above the disk's [`min_free`](Self::min_free), evicting if it must.
    /// False when that is not possible.
    fn make_room(&self, need: u64, holding: u64) -> io::Result<bool> {
        let over = (self.cached_bytes() + need).saturating_sub(self.cap);
        if over > 0 {
            // Free a tenth of the cap at once so the fsync an eviction costs
            // is paid rarely.
            self.evict((self.cap / 10).max(over), holding)?;
            if self.cached_bytes() + need > self.cap {
                return Ok(false);
            }
        }
        let short = self.disk_short(need);
        if short == 0 {
            return Ok(true);
        }
        self.evict(short.max(self.eviction_batch()), holding)?;
        Ok(self.disk_short(need) == 0)
    }

    /// How far storing `need` more bytes would take the disk's free space
    /// below [`min_free`](Self::min_free) (0: it would not).
    fn disk_short(&self, need: u64) -> u64 {
        let min = self.min_free();
        match self.disk_free() {
            Some(free) if min > 0 => (min + need).saturating_sub(free),
            _ => 0,
        }
    }

    /// What a disk-space eviction frees at least, so its fsync is paid rarely.
    fn eviction_batch(&self) -> u64 {
        (self.min_free() / 8).max(8 * self.chunk_size)
    }

    /// Bytes clean data leaves free on the cache's filesystem.
    pub fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Sets [`min_free`](Self::min_free) (`serve --ssd-min-free`); none on
    /// a file system without holes, where evicting frees no space.
    pub fn set_min_free(&self, bytes: u64) {
        if !self.sparse && bytes > 0 {
            tracing::warn!(
                dir = %self.dir.display(),
                "--ssd-min-free is not kept here: this file system has no sparse files, so evicting clean chunks \
                 frees no disk space"
            );
            return;
        }
        self.min_free.store(bytes, Ordering::Relaxed);
    }

    /// When the cache's filesystem has less than
    /// [`min_free`](Self::min_free) free — another daemon's changes filled
    /// it, or anything else did —, evicts clean chunks until it has it
    /// again (or none are left): changes not uploaded yet, this cache's or
    /// a sibling's, get the room clean data held. Returns the chunks evicted.
    pub fn keep_disk_free(&self) -> io::Result<u64> {
        let short = self.disk_short(0);
        if short == 0 {
            return Ok(0);
        }
        self.evict_except(short.max(self.eviction_batch()), None)
    }

    /// Stores a fetched chunk as clean, evicting older clean chunks if the
    /// cap requires. Returns false when it did not fit (everything else is
    /// dirty or pinned) or the chunk is already whole (clean or dirty). A
    /// partial chunk is replaced. Caller holds the stripe write lock of `idx`.
    pub fn install_clean(&self, idx: u64, data: &[u8]) -> io::Result<bool> {
        if idx >= self.chunk_count() || !matches!(self.state(idx), ABSENT | PARTIAL) {
            return Ok(false);
        }
        if !self.make_room(self.chunk_size - self.partial_bytes(idx), idx)? {
            return Ok(false);
        }
        // The present pages get the same bytes again, so the map's claim
        // about them stays true while this writes.
        self.data_write_at(idx * self.chunk_size, data)?;
        {
            let mut pages = self.pages.lock();
            self.leave_partial(&mut pages, idx, CLEAN);
            self.set_state(idx, CLEAN);
        }
        self.cached.fetch_add(1, Ordering::Relaxed);
        self.touch(idx);
        Ok(true)
    }

    /// Stores clean bytes for part of chunk `idx`: `off` is a multiple of
    /// [`PAGE`] and inside the chunk; `data.len()` is a multiple of `PAGE`,
    /// except that it may end short exactly at the end of the image (local
    /// [`len`](Self::len)), and that last short page counts as a whole page
    /// (its tail is written as zeroes). Caller holds the stripe write lock
    /// of `idx`. Returns false and changes nothing when the chunk is already
    /// clean or dirty, `idx` is past the end, `data` is empty, or the pages
    /// do not fit under the cap even after evicting. Pages already present
    /// are rewritten with the same bytes. Bytes first, then the page bits;
    /// the chunk becomes partial, or clean once every page of it is present.
    pub fn install_pages(&self, idx: u64, off: u64, data: &[u8]) -> io::Result<bool> {
        if data.is_empty() || idx >= self.chunk_count() || !matches!(self.state(idx), ABSENT | PARTIAL) {
            return Ok(false);
        }
        let cs = self.chunk_size;
        let base = idx * cs;
        let end = off + data.len() as u64;
        let image_end = self.len();
        let short = data.len() as u64 % PAGE;
        let ok = off % PAGE == 0
            && end <= cs
            && if short != 0 { base + end == image_end } else { base + end <= image_end.next_multiple_of(PAGE) };
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("internal: pages [{off}, {end}) of chunk {idx} are not whole pages of the image"),
            ));
        }
        let (first, last) = (off / PAGE, end.div_ceil(PAGE));
        let new = {
            let pages = self.pages.lock();
            match pages.maps.get(&idx) {
                Some(m) => (first..last).filter(|&p| !bit(m, p)).count() as u64,
                None => last - first,
            }
        };
        if new > 0 && !self.make_room(new * PAGE, idx)? {
            return Ok(false);
        }
        let whole = data.len() - short as usize;
        self.data_write_at(base + off, &data[..whole])?;
        if short != 0 {
            let mut tail = vec![0u8; PAGE as usize];
            tail[..short as usize].copy_from_slice(&data[whole..]);
            self.data_write_at(base + off + whole as u64, &tail)?;
        }
        self.add_pages(idx, first, last, CLEAN, PARTIAL);
        self.touch(idx);
        Ok(true)
    }

    /// Writes guest data into chunk `idx` and marks it dirty. `fill` is the
    /// chunk's current content, required when the chunk is absent or partial
    /// and the write does not cover it whole (the read half of
    /// read-modify-write). Caller holds the stripe write lock.
    pub fn write(&self, idx: u64, off: u64, bufs: &IoVec<'_>, fill: Option<&[u8]>) -> io::Result<()> {
        let before = self.entry(idx);
        self.write_unrecorded(idx, off, bufs, fill)?;
        if self.entry(idx) != before {
            self.record_volatile(idx..idx + 1)?;
        }
        Ok(())
    }

    /// Chunk `idx`'s map entry in memory: its state and page bitmap.
    /// Caller holds the stripe lock (so the state cannot change under it).
    fn entry(&self, idx: u64) -> (u8, Option<Bitmap>) {
        let st = self.state(idx);
        (st, if has_bitmap(st) { self.pages.lock().maps.get(&idx).cloned() } else { None })
    }

    /// Appends the map entries of chunks `range` the last persist did not
    /// record to the journal as a volatile record (journal.rs): a write the
    /// guest sees complete must not vanish with this process before the
    /// next flush persists it, or the next process would acknowledge that
    /// flush without it. Caller holds the stripe write locks, so no later
    /// change of these chunks is recorded first.
    fn record_volatile(&self, range: std::ops::Range<u64>) -> io::Result<()> {
        // The persisted lock keeps this between persists: the record names
        // the generation the journal's last durable record does.
        let mut persisted = self.persisted.lock();
        let changes: Vec<Change> = range
            .filter_map(|idx| {
                let (state, bitmap) = self.entry(idx);
                // Compared with what a replay would say of the chunk now.
                let same = match persisted.volatile.get(&idx) {
                    Some((s, m)) => *s == state && *m == bitmap,
                    None => {
                        persisted.states.get(idx as usize) == Some(&state)
                            && (!has_bitmap(state) || persisted.maps.get(&idx) == bitmap.as_ref())
                    }
                };
                (!same).then_some(Change { idx, state, bitmap })
            })
            .collect();
        self.append_volatile(&mut persisted, changes)
    }

    /// Appends `changes` as a volatile record; caller holds `persisted`.
    fn append_volatile(&self, persisted: &mut Persisted, changes: Vec<Change>) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let rec = Record { generation: persisted.generation, image_len: self.len(), changes, writes: Vec::new() };
        if let Some(j) = self.journal.lock().as_mut() {
            j.append_volatile(&rec)?;
            persisted.volatile.extend(rec.changes.into_iter().map(|c| (c.idx, (c.state, c.bitmap))));
        }
        Ok(())
    }

    fn write_unrecorded(&self, idx: u64, off: u64, bufs: &IoVec<'_>, fill: Option<&[u8]>) -> io::Result<()> {
        match self.write_once(idx, off, bufs, fill) {
            // A full cache disk: clean chunks give way to the guest's
            // writes (the cap bounds clean data; dirty data is bounded only
            // by the disk), then the write is tried once more.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                if self.make_room_on_disk(idx)? {
                    return self.write_once(idx, off, bufs, fill);
                }
                // Nothing clean here to give way: other daemons' caches on
                // this disk do within their next sweep (a quarter of a
                // second, while the disk has less than their reserve free).
                // A guest waits that long, rather than getting an I/O error.
                // A disk nobody frees fails at once again for a while, so
                // a guest's queue of writes does not wait it out each.
                let now = std::time::Instant::now();
                if self.full_wait_failed.lock().is_some_and(|t| now.duration_since(t) < SIBLINGS_MAKE_ROOM * 4) {
                    return Err(e);
                }
                let deadline = now + SIBLINGS_MAKE_ROOM;
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    match self.write_once(idx, off, bufs, fill) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                            if std::time::Instant::now() >= deadline {
                                *self.full_wait_failed.lock() = Some(std::time::Instant::now());
                                return Err(e);
                            }
                        }
                        r => return r,
                    }
                }
            }
            r => r,
        }
    }

    /// The cache disk is full (ENOSPC): evicts clean chunks (a tenth of
    /// the cap, at least 8 chunks), skipping `holding`, whose stripe the
    /// caller has. Returns whether anything was freed, so that the write
    /// that failed is worth trying once more.
    pub fn make_room_on_disk(&self, holding: u64) -> io::Result<bool> {
        let before = self.cached_bytes();
        self.evict((self.cap / 10).max(8 * self.chunk_size), holding)?;
        Ok(self.cached_bytes() < before)
    }

    /// The file system under the cache directory, by name, and whether it
    /// is held in memory (tmpfs, ramfs).
    pub fn file_system(&self) -> (String, bool) {
        (filesystem::name(&self.dir), filesystem::in_memory(&self.dir))
    }

    /// Bytes free for this process on the cache's filesystem (None when
    /// it cannot be asked).
    pub fn disk_free(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn write_once(&self, idx: u64, off: u64, bufs: &IoVec<'_>, fill: Option<&[u8]>) -> io::Result<()> {
        let base = idx * self.chunk_size;
        let len = bufs.len() as u64;
        let mut state = self.state(idx);
        if state == DIRTY_PARTIAL {
            // With the committed bytes at hand, complete the chunk first.
            if let Some(f) = fill {
                self.fill_missing(idx, f)?;
                state = DIRTY;
            }
        }
        self.dirty_pages.note(idx, is_dirty(state), off, len)?;
        let whole = off == 0 && len == self.chunk_size;
        if fill.is_none() && !whole && matches!(state, ABSENT | PARTIAL | DIRTY_PARTIAL) {
            // Part of a page needs the rest of it: present here, or the fill.
            if !self.writable_in_place(idx, off, len) {
                return Err(io::Error::other(
                    "internal: a write of part of a page not local into a chunk not held whole, without its content",
                ));
            }
            return self.write_pages(idx, state, off, bufs);
        }
        if state == DIRTY_PARTIAL {
            // Overwritten whole: every page is present now.
            self.data_write_vectored_at(base + off, bufs, IoMode::Blocking)?;
            self.leave_partial(&mut self.pages.lock(), idx, DIRTY);
            self.cached.fetch_add(1, Ordering::Relaxed);
            self.bump_seq(idx);
            self.touch(idx);
            return Ok(());
        }
        if state == PARTIAL {
            // See the module doc: the map must stop claiming this chunk's
            // pages before any of its bytes change.
            let held = self.pages.lock().maps.get(&idx).cloned();
            if self.drop_partial(idx) {
                if let Err(e) = self.mark_unclean(idx) {
                    if let Some(m) = held {
                        self.undo_unless_recorded(idx, || self.restore_partial(idx, m));
                    }
                    return Err(e);
                }
            }
            state = ABSENT;
        }
        match state {
            DIRTY => self.write_dirty(idx, base + off, bufs)?,
            ZERO_DIRTY => {
                // A zeroing whose persist failed left the map on disk
                // claiming the old bytes: it stops before they change.
                if matches!(self.persisted.lock().states.get(idx as usize), Some(&CLEAN | &PARTIAL)) {
                    self.mark_unclean(idx)?;
                }
                // Zeroes on disk first (a crash may have come before the
                // hole punch), then the write; it holds data from now on.
                self.data_write_zeroes_at(base, self.chunk_size)?;
                self.data_write_vectored_at(base + off, bufs, IoMode::Blocking)?;
                self.set_state(idx, DIRTY);
                self.cached.fetch_add(1, Ordering::Relaxed);
            }
            CLEAN => {
                self.set_state(idx, DIRTY);
                self.dirty.fetch_add(1, Ordering::Relaxed);
                let persisted = self.persisted.lock().states.get(idx as usize).copied();
                let persisted_clean = persisted == Some(CLEAN);
                // See the module doc: the map must stop calling this chunk
                // clean before its bytes change; a small write rides in
                // that record, else the bytes follow it. A map that still
                // says partial (the chunk completed since) claims pages
                // too: it stops before they change.
                let r = (|| {
                    if !(persisted_clean && self.log_first_write(idx, base + off, bufs)?) {
                        if persisted_clean || persisted == Some(PARTIAL) {
                            self.mark_unclean(idx)?;
                        }
                        self.data_write_vectored_at(base + off, bufs, IoMode::Blocking)?;
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    self.undo_unless_recorded(idx, || {
                        self.set_state(idx, CLEAN);
                        self.dirty.fetch_sub(1, Ordering::Relaxed);
                    });
                    return Err(e);
                }
            }
            _ => {
                // Bytes first, state after: a persist racing with this never
                // records as dirty a chunk whose bytes are not yet there.
                let whole = off == 0 && bufs.len() as u64 == self.chunk_size;
                if !whole {
                    let fill = fill.ok_or_else(|| {
                        io::Error::other("internal: partial write to an absent chunk without its content")
                    })?;
                    self.data_write_at(base, fill)?;
                }
                self.data_write_vectored_at(base + off, bufs, IoMode::Blocking)?;
                self.set_state(idx, DIRTY);
                self.cached.fetch_add(1, Ordering::Relaxed);
                self.dirty.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.bump_seq(idx);
        self.touch(idx);
        Ok(())
    }

    /// True when a write of [off, off + len) into chunk `idx` needs no
    /// bytes from elsewhere: each page it covers only in part is local
    /// (whole pages go straight in; the last page may end short exactly at
    /// the end of the image).
    pub fn writable_in_place(&self, idx: u64, off: u64, len: u64) -> bool {
        let end = off + len;
        let image_end = idx * self.chunk_size + end == self.len();
        len > 0
            && end <= self.chunk_size
            && (off % PAGE == 0 || self.has_pages(idx, off, 1))
            && (end % PAGE == 0 || image_end || self.has_pages(idx, end - 1, 1))
    }

    /// Marks pages [first, last) of chunk `idx` present, under the bitmap
    /// lock: the chunk becomes `part`, or `whole` once every page of it is.
    fn add_pages(&self, idx: u64, first: u64, last: u64, whole: u8, part: u8) {
        let mut pages = self.pages.lock();
        let words = bitmap_words(self.chunk_size);
        let fresh = !pages.maps.contains_key(&idx);
        let m = pages.maps.entry(idx).or_insert_with(|| vec![0u64; words].into_boxed_slice());
        let mut added = 0;
        for p in first..last {
            let w = &mut m[(p / 64) as usize];
            added += u64::from(*w & (1 << (p % 64)) == 0);
            *w |= 1 << (p % 64);
        }
        let complete = (0..self.pages_in(idx)).all(|p| bit(m, p));
        pages.gen += 1;
        self.pages_held.fetch_add(added, Ordering::Relaxed);
        if fresh {
            self.partial.fetch_add(1, Ordering::Relaxed);
        }
        if complete {
            self.leave_partial(&mut pages, idx, whole);
            self.cached.fetch_add(1, Ordering::Relaxed);
        } else {
            self.set_state(idx, part);
        }
    }

    /// Writes whole pages into a chunk not held whole, without fetching it:
    /// the chunk becomes dirty in part, its written pages present. Bytes
    /// first, page bits after, so a persist never claims pages not written.
    fn write_pages(&self, idx: u64, state: u8, off: u64, bufs: &IoVec<'_>) -> io::Result<()> {
        let base = idx * self.chunk_size;
        if state == PARTIAL {
            // Its present pages stop being "clean" before any byte changes.
            {
                let _pages = self.pages.lock();
                self.set_state(idx, DIRTY_PARTIAL);
            }
            self.dirty.fetch_add(1, Ordering::Relaxed);
            if self.persisted.lock().states.get(idx as usize) == Some(&PARTIAL) {
                if let Err(e) = self.mark_unclean(idx) {
                    self.undo_unless_recorded(idx, || {
                        let _pages = self.pages.lock();
                        self.set_state(idx, PARTIAL);
                        self.dirty.fetch_sub(1, Ordering::Relaxed);
                    });
                    return Err(e);
                }
            }
        }
        self.data_write_vectored_at(base + off, bufs, IoMode::Blocking)?;
        if state == ABSENT {
            self.dirty.fetch_add(1, Ordering::Relaxed);
        }
        let end = off + bufs.len() as u64;
        self.add_pages(idx, off / PAGE, end.div_ceil(PAGE), DIRTY, DIRTY_PARTIAL);
        self.bump_seq(idx);
        self.touch(idx);
        Ok(())
    }

    /// Pages changed in dirty chunk `idx` since it was last clean, as a
    /// bitmap of 4 KiB pages (None: unknown, treat all as changed).
    pub fn dirty_pages(&self, idx: u64) -> Option<Box<[u64]>> {
        self.dirty_pages.get(idx)
    }

    /// Keeps the dirty chunks' changed-page sets for the next start (a
    /// stop that leaves changes): it then uploads patches, not whole chunks.
    pub fn keep_dirty_pages(&self) -> io::Result<()> {
        // The state says so first (a version older binaries refuse), then
        // the record is written: a crash between leaves a state that
        // refuses old binaries for nothing, never a record they ignore.
        self.dirty_pages.announce();
        self.checkpoint()?;
        self.dirty_pages.keep()
    }

    fn data_write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.unlog(off, buf.len() as u64)?;
        // Counted once written: a persist that reads the epoch after this
        // covers the bytes, and one that read it before leaves it behind.
        let r = self.data.write_at(off, buf);
        self.data_epoch.fetch_add(1, Ordering::SeqCst);
        r
    }

    fn data_write_vectored_at(&self, off: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        self.unlog(off, bufs.len() as u64)?;
        // Counted once written: a persist that reads the epoch after this
        // covers the bytes, and one that read it before leaves it behind.
        let r = self.data.write_vectored_at(off, bufs, mode);
        self.data_epoch.fetch_add(1, Ordering::SeqCst);
        r
    }

    fn data_write_zeroes_at(&self, off: u64, len: u64) -> io::Result<()> {
        // Counted once written: a persist that reads the epoch after this
        // covers the bytes, and one that read it before leaves it behind.
        let r = self.data.write_zeroes_at(off, len);
        self.data_epoch.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Before bytes [off, off + len) of the data file change other than by
    /// a logged write: if a chunk there is logged, writes a checkpoint
    /// first, so no replay can put a logged record's older bytes over
    /// these (module doc). Zeroing needs no such care: a zeroed or evicted
    /// chunk's bytes are never read, and leaving that state writes data.
    fn unlog(&self, off: u64, len: u64) -> io::Result<()> {
        if self.logged_count.load(Ordering::Acquire) == 0 || len == 0 {
            return Ok(());
        }
        let (first, last) = (off / self.chunk_size, (off + len - 1) / self.chunk_size);
        if (first..=last).any(|i| self.slots.with(i, |s| s.logged.load(Ordering::Acquire)) == Some(true)) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// True when writes may ride in journal records (module doc): a write
    /// small enough, into a cache that has not failed.
    fn may_log(&self, len: u64) -> bool {
        len <= LOG_MAX_WRITE && !self.failed.load(Ordering::SeqCst)
    }

    /// A journal append that failed counts as a failed fsync (the record may
    /// or may not be there): sticky, like every failed sync.
    fn journal_failed(&self, e: io::Error) -> io::Error {
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(dir = %self.dir.display(), error = %e, "the SSD cache could not make its map durable; every later flush fails until driveblk is restarted");
        }
        e
    }

    /// Marks chunk `idx` logged; caller holds the journal lock.
    fn set_logged(&self, idx: u64) {
        if self.slots.with(idx, |s| s.logged.swap(true, Ordering::AcqRel)) == Some(false) {
            self.logged.lock().push(idx);
            self.logged_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Forgets every logged chunk after a checkpoint dropped their records;
    /// caller holds the journal lock.
    fn clear_logged(&self) {
        let mut logged = self.logged.lock();
        for idx in logged.drain(..) {
            self.slots.with(idx, |s| s.logged.store(false, Ordering::Release));
        }
        self.logged_count.store(0, Ordering::Release);
    }

    /// The first write into chunk `idx`, which the persisted map calls
    /// clean, as one durable journal record carrying both the chunk's new
    /// state and the write (`at` in the data file), then the bytes into
    /// the data file: the guest's FLUSH after it has nothing left to sync.
    /// Only when nothing else is persisting or marking (the group commit of
    /// [`mark_unclean`](Self::mark_unclean) serves concurrent first writes
    /// better); false when not done, and the caller takes the usual path.
    /// Caller holds the chunk's stripe write lock and has set it dirty.
    fn log_first_write(&self, idx: u64, at: u64, bufs: &IoVec<'_>) -> io::Result<bool> {
        if bufs.len() as u64 > LOG_FIRST_MAX || !self.may_log(bufs.len() as u64) {
            return Ok(false);
        }
        let Some(mut persisted) = self.persisted.try_lock() else { return Ok(false) };
        let mut journal = self.journal.lock();
        let Some(j) = journal.as_mut().filter(|j| persisted.written && j.len() < LOG_MAX_JOURNAL) else {
            return Ok(false);
        };
        if persisted.states.get(idx as usize) != Some(&CLEAN) || self.failed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let rec = Record {
            generation: persisted.generation,
            image_len: persisted.image_len,
            changes: vec![Change { idx, state: DIRTY, bitmap: None }],
            writes: Vec::new(),
        };
        // Durable in the record: no data sync owed for these bytes.
        self.log_write(j, rec, idx, at, bufs, true, || {
            persisted.states[idx as usize] = DIRTY;
            persisted.volatile.remove(&idx);
        })?;
        Ok(true)
    }

    /// Appends `rec` carrying a write into chunk `idx` (`bufs` at `at` in
    /// the data file, as the data file stores it) to the journal, synced
    /// when `durable`; runs `appended` once the record is in; then marks
    /// the chunk logged and writes the same bytes into the data file.
    /// Caller holds the journal lock and the chunk's stripe write lock.
    #[allow(clippy::too_many_arguments)]
    fn log_write(
        &self,
        j: &mut Journal,
        mut rec: Record,
        idx: u64,
        at: u64,
        bufs: &IoVec<'_>,
        durable: bool,
        appended: impl FnOnce(),
    ) -> io::Result<()> {
        let (at, bytes) = self.data.stored_write(at, bufs)?;
        rec.writes = vec![Logged { at, bytes }];
        if durable {
            j.append(&rec).map_err(|e| self.journal_failed(e))?;
        } else {
            j.append_unsynced(&rec)?;
        }
        appended();
        self.set_logged(idx);
        self.data.write_stored(at, &rec.writes[0].bytes)?;
        self.logged_writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// A write into dirty chunk `idx` (`at` in the data file): into the
    /// data file, and into the journal as well while the chunk is logged
    /// (its FLUSH then syncs the journal). Caller holds the stripe write lock.
    fn write_dirty(&self, idx: u64, at: u64, bufs: &IoVec<'_>) -> io::Result<()> {
        if self.slots.with(idx, |s| s.logged.load(Ordering::Acquire)) != Some(true) {
            return self.data_write_vectored_at(at, bufs, IoMode::Blocking);
        }
        if self.may_log(bufs.len() as u64) {
            let mut journal = self.journal.lock();
            if let Some(j) = journal.as_mut().filter(|j| j.len() < LOG_MAX_JOURNAL) {
                // Writes alone: replay reads no map field from it. (A
                // checkpoint may have cleared the logged flag while this
                // waited: `log_write` sets it again.)
                return self.log_write(j, Record::default(), idx, at, bufs, false, || {});
            }
        }
        // Too large, or the journal is full: checkpoint, then as usual.
        self.data_write_vectored_at(at, bufs, IoMode::Blocking)
    }

    /// Gives chunk `idx` a new write sequence number (it was just written).
    fn bump_seq(&self, idx: u64) {
        let seq = self.write_seq.fetch_add(1, Ordering::Relaxed);
        self.slots.with(idx, |s| s.seq.store(seq, Ordering::Release));
    }

    /// Write sequence of chunk `idx`'s newest write (0 if never written).
    pub fn seq(&self, idx: u64) -> u64 {
        self.slots.with(idx, |s| s.seq.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Dirty chunks with their write sequence numbers.
    pub fn dirty_set(&self) -> Vec<(u64, u64)> {
        self.slots
            .view()
            .iter()
            .enumerate()
            .filter(|(_, s)| is_dirty(s.state.load(Ordering::Acquire)))
            .map(|(i, s)| (i as u64, s.seq.load(Ordering::Acquire)))
            .collect()
    }

    /// The present-page bitmap of a chunk that is dirty in part (None for
    /// any other state).
    pub fn present_pages(&self, idx: u64) -> Option<Box<[u64]>> {
        if self.state(idx) != DIRTY_PARTIAL {
            return None;
        }
        self.pages.lock().maps.get(&idx).cloned()
    }

    /// Chunk `idx`'s content: its own bytes where it holds them, `under`
    /// (its committed version, fetched) in the pages a chunk dirty in part
    /// lacks. Caller holds the stripe lock.
    pub fn read_chunk_over(&self, idx: u64, under: &[u8]) -> io::Result<Vec<u8>> {
        let mut v = self.read_chunk(idx)?;
        if let Some(m) = self.present_pages(idx) {
            overlay_absent(&mut v, under, &m);
        }
        Ok(v)
    }

    /// Completes a chunk that is dirty in part with `data`, its committed
    /// version (fetched): only absent pages are written, so local changes
    /// stay. The chunk becomes wholly dirty. Caller holds the stripe write
    /// lock. Returns false when the chunk is not dirty in part.
    pub fn fill_missing(&self, idx: u64, data: &[u8]) -> io::Result<bool> {
        if self.state(idx) != DIRTY_PARTIAL {
            return Ok(false);
        }
        let Some(m) = self.pages.lock().maps.get(&idx).cloned() else { return Ok(false) };
        let base = idx * self.chunk_size;
        let n = (self.chunk_size.div_ceil(PAGE)) as usize;
        let mut p = 0;
        while p < n {
            if bit(&m, p as u64) {
                p += 1;
                continue;
            }
            let start = p;
            while p < n && !bit(&m, p as u64) {
                p += 1;
            }
            let (a, b) = (start * PAGE as usize, (p * PAGE as usize).min(data.len()));
            if a < b {
                self.data_write_at(base + a as u64, &data[a..b])?;
            }
        }
        {
            // Recorded before it is whole in memory, and no persist comes
            // between: a later write into a filled page changes no state
            // (dirty -> dirty) and records nothing, and a replay that said
            // "dirty in part" would fill that page from the remote again.
            let mut persisted = self.persisted.lock();
            self.append_volatile(&mut persisted, vec![Change { idx, state: DIRTY, bitmap: None }])?;
            self.leave_partial(&mut self.pages.lock(), idx, DIRTY);
        }
        self.cached.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// After write-back committed chunk `idx` as it was at write sequence
    /// `seq`: the chunk becomes clean, unless a write came since (then it
    /// stays dirty for the next generation). Caller holds the stripe write
    /// lock. Returns whether it became clean.
    pub fn mark_clean(&self, idx: u64, seq: u64) -> bool {
        let cleaned = self.slots.with(idx, |s| {
            let st = s.state.load(Ordering::Acquire);
            if !is_dirty(st) || s.seq.load(Ordering::Acquire) != seq {
                return false;
            }
            // A chunk dirty in part holds the committed bytes where it holds
            // pages at all: it becomes partial (clean).
            // A zeroed chunk is zero in the committed generation: nothing to hold.
            s.state.store(
                match st {
                    DIRTY => CLEAN,
                    DIRTY_PARTIAL => PARTIAL,
                    _ => ABSENT,
                },
                Ordering::Release,
            );
            true
        });
        if cleaned != Some(true) {
            return false;
        }
        self.dirty.fetch_sub(1, Ordering::Relaxed);
        self.dirty_pages.forget(idx);
        true
    }

    /// Forgets a clean or partial chunk whose bytes are no longer those of
    /// the generation served (another host committed over it). Caller
    /// holds the stripe write lock and persists before the space is reused.
    pub fn invalidate(&self, idx: u64) {
        match self.state(idx) {
            CLEAN => {
                self.set_state(idx, ABSENT);
                self.cached.fetch_sub(1, Ordering::Relaxed);
            }
            PARTIAL => {
                self.leave_partial(&mut self.pages.lock(), idx, ABSENT);
            }
            _ => {}
        }
    }

    /// The generation whose bytes clean chunks hold.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records that clean chunks now hold generation `g` (persisted with
    /// the next [`persist`](Self::persist)).
    pub fn set_generation(&self, g: u64) {
        self.generation.store(g, Ordering::Release);
    }

    /// Random id of this cache directory.
    pub fn cache_id(&self) -> &str {
        &self.cache_id
    }

    /// The id of the cache this directory was found to be a copy of (at
    /// this open or an earlier one), if any.
    pub fn copy_of(&self) -> Option<&str> {
        Some(self.copy_of.as_str()).filter(|c| !c.is_empty())
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
        self.zero_chunks_except(range, |_| false)
    }

    /// [`zero_chunks`](Self::zero_chunks), leaving alone the chunks the
    /// cache does not hold for which `zero_already` is true (the volume
    /// has them as zero chunks): they read as zeroes as they are, and a
    /// whole-disk discard must not turn the whole disk dirty.
    pub fn zero_chunks_except(
        &self,
        range: std::ops::Range<u64>,
        zero_already: impl Fn(u64) -> bool,
    ) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        let mut need_persist = false;
        let mut absent = Vec::new();
        {
            let persisted = self.persisted.lock();
            for idx in range.clone() {
                // Zeroed chunks hold no data and do not count against the
                // cap: a guest trimming 30 GB never fills the cache.
                match self.state(idx) {
                    // Zeroed by a call whose persist failed, the map on
                    // disk may still claim its bytes.
                    ZERO_DIRTY => {
                        need_persist |= matches!(persisted.states.get(idx as usize), Some(&CLEAN | &PARTIAL));
                    }
                    DIRTY => {
                        self.set_state(idx, ZERO_DIRTY);
                        self.cached.fetch_sub(1, Ordering::Relaxed);
                    }
                    DIRTY_PARTIAL => {
                        self.leave_partial(&mut self.pages.lock(), idx, ZERO_DIRTY);
                    }
                    // A map on disk that calls the chunk clean or partial
                    // claims its bytes: it must stop before the hole punch.
                    CLEAN => {
                        self.set_state(idx, ZERO_DIRTY);
                        self.cached.fetch_sub(1, Ordering::Relaxed);
                        self.dirty.fetch_add(1, Ordering::Relaxed);
                        need_persist |= matches!(persisted.states.get(idx as usize), Some(&CLEAN | &PARTIAL));
                    }
                    PARTIAL => {
                        self.leave_partial(&mut self.pages.lock(), idx, ZERO_DIRTY);
                        self.dirty.fetch_add(1, Ordering::Relaxed);
                        need_persist |= matches!(persisted.states.get(idx as usize), Some(&CLEAN | &PARTIAL));
                    }
                    ABSENT if zero_already(idx) => {}
                    _ => absent.push(idx),
                }
            }
        }
        let cs = self.chunk_size;
        let stored = (|| {
            if need_persist {
                self.persist()?;
            }
            self.data_write_zeroes_at(range.start * cs, (range.end - range.start) * cs)
        })();
        if stored.is_ok() {
            for idx in absent {
                self.set_state(idx, ZERO_DIRTY);
                self.dirty.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Even when the zeroing failed part way, the chunks already zeroed
        // in memory are not what a cut being uploaded holds: committing it
        // must not mark them clean (it would bring its bytes back).
        for idx in range.clone() {
            self.dirty_pages.forget(idx);
            self.bump_seq(idx);
        }
        stored?;
        // Zeroed chunks not persisted yet survive a crash of this process.
        self.record_volatile(range)
    }

    /// Evicts clean and partial unpinned chunks, not recently used first
    /// (CLOCK), until `want` bytes are freed, skipping any whose lock is busy
    /// (including `holding`, whose stripe the caller has).
    fn evict(&self, want: u64, holding: u64) -> io::Result<()> {
        self.evict_except(want, Some(holding)).map(|_| ())
    }

    /// Drops every clean and partial unpinned chunk (`driveblk
    /// drop-cache`): dirty chunks and pinned metadata stay. Chunks busy
    /// right now are skipped. Returns how many chunks were dropped.
    pub fn drop_clean(&self) -> io::Result<u64> {
        self.evict_except(u64::MAX, None)
    }

    /// The CLOCK sweep: from where the last one stopped, a referenced
    /// chunk loses its bit and is passed over, an unreferenced one goes;
    /// at most two turns of the map (the second finds every bit cleared).
    fn evict_except(&self, want: u64, holding: Option<u64>) -> io::Result<u64> {
        let hold_stripe = holding.map(|h| (h as usize) % STRIPES);
        let mut guards = Vec::new();
        let mut locked = Vec::new();
        let mut victims = Vec::new();
        let (mut freed, mut whole) = (0, 0);
        {
            let mut hand = self.hand.lock();
            let view = self.slots.view();
            let n = view.len;
            let mut steps = 0;
            while freed < want && steps < 2 * n {
                let i = (*hand + steps) % n;
                steps += 1;
                let Some(slot) = view.get(i) else { continue };
                let idx = i as u64;
                if Some(idx) == holding
                    || !matches!(slot.state.load(Ordering::Relaxed), CLEAN | PARTIAL)
                    || slot.pinned.load(Ordering::Relaxed)
                {
                    continue;
                }
                if slot.referenced.swap(false, Ordering::Relaxed) {
                    continue;
                }
                let s = i % STRIPES;
                if Some(s) == hold_stripe {
                    continue;
                }
                // A stripe may cover several victims; take each lock once.
                if !locked.contains(&s) {
                    match self.stripes[s].try_write() {
                        Some(g) => {
                            guards.push(g);
                            locked.push(s);
                        }
                        None => continue,
                    }
                }
                match self.state(idx) {
                    CLEAN => {
                        self.set_state(idx, ABSENT);
                        freed += self.chunk_size;
                        whole += 1;
                        victims.push((idx, None));
                    }
                    PARTIAL => {
                        let mut pages = self.pages.lock();
                        let held = pages.maps.get(&idx).cloned();
                        freed += self.leave_partial(&mut pages, idx, ABSENT) * PAGE;
                        victims.push((idx, held));
                    }
                    _ => {}
                }
            }
            if n > 0 {
                *hand = (*hand + steps) % n;
            }
        }
        if victims.is_empty() {
            return Ok(0);
        }
        let n = victims.len() as u64;
        self.cached.fetch_sub(whole, Ordering::Relaxed);
        if let Err(e) = self.persist() {
            // The map on disk still claims the victims' bytes, which are
            // still there: they stay cached. Left absent in memory, the
            // next write into one would change bytes that map calls clean.
            for (idx, held) in victims {
                match held {
                    Some(m) => self.restore_partial(idx, m),
                    None => self.set_state(idx, CLEAN),
                }
            }
            self.cached.fetch_add(whole, Ordering::Relaxed);
            return Err(e);
        }
        self.evictions.fetch_add(n, Ordering::Relaxed);
        for (idx, _) in victims {
            self.data_write_zeroes_at(idx * self.chunk_size, self.chunk_size)?;
        }
        drop(guards);
        Ok(n)
    }

    /// Makes the map on disk stop claiming the clean bytes of chunk `idx`
    /// (clean, or the present pages of a partial chunk) before a write
    /// changes them (module doc): one durable journal record, no fsync of
    /// the data file (the bytes the map claimed were synced before it
    /// claimed them and have not changed). The record says what the chunk
    /// is in memory now: dirty, dirty-partial with the persisted bitmap (the
    /// pages installed since may not be synced), or absent. Concurrent
    /// callers share one record and one fdatasync (group commit). Caller
    /// holds the chunk's stripe write lock and has set its new state.
    fn mark_unclean(&self, idx: u64) -> io::Result<()> {
        let batch = {
            let mut m = self.marks.lock();
            m.queue.push(idx);
            m.batch
        };
        let mut persisted = self.persisted.lock();
        if self.failed.load(Ordering::SeqCst) {
            drop(persisted);
            return self.persist();
        }
        if persisted.marked > batch {
            // A batch that held this chunk was made durable meanwhile.
            return Ok(());
        }
        let mut journal = self.journal.lock();
        let Some(j) = journal.as_mut().filter(|_| persisted.written) else {
            // No journal to append to: a whole persist records it.
            drop((journal, persisted));
            return self.persist();
        };
        let (queue, taken) = {
            let mut m = self.marks.lock();
            m.batch += 1;
            (std::mem::take(&mut m.queue), m.batch - 1)
        };
        let mut changes: Vec<Change> = Vec::new();
        for i in queue {
            let change = match persisted.states.get(i as usize) {
                Some(&CLEAN) => Change { idx: i, state: DIRTY, bitmap: None },
                Some(&PARTIAL) if self.state(i) == DIRTY_PARTIAL => {
                    Change { idx: i, state: DIRTY_PARTIAL, bitmap: persisted.maps.get(&i).cloned() }
                }
                Some(&PARTIAL) => Change { idx: i, state: ABSENT, bitmap: None },
                _ => continue,
            };
            if has_bitmap(change.state) != change.bitmap.is_some() || changes.iter().any(|c| c.idx == i) {
                continue;
            }
            changes.push(change);
        }
        if !changes.is_empty() {
            let rec = Record {
                generation: persisted.generation,
                image_len: persisted.image_len,
                changes,
                writes: Vec::new(),
            };
            j.append(&rec).map_err(|e| self.journal_failed(e))?;
            for c in rec.changes {
                persisted.states[c.idx as usize] = c.state;
                if c.bitmap.is_none() {
                    persisted.maps.remove(&c.idx);
                }
                // This record is the replay's last word on it now.
                persisted.volatile.remove(&c.idx);
            }
        }
        persisted.marked = taken + 1;
        Ok(())
    }

    /// Makes the data file and the chunk map durable: fsync data, then
    /// atomically replace the map.
    ///
    /// A failed fsync (of the data, or of the directory after the map was
    /// replaced) is sticky: every later call fails until the cache is
    /// reopened. A map that could not be written (a full disk) leaves the
    /// old map in place and is not sticky: the caller's change is refused,
    /// and a later call may succeed once there is room.
    pub fn persist(&self) -> io::Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "an earlier fsync in {} failed; nothing is acknowledged as durable until driveblk is restarted",
                self.dir.display()
            )));
        }
        match self.persist_inner() {
            Ok(()) => Ok(()),
            Err(Persist::Retryable(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "could not write the SSD cache's state (disk full?)");
                Err(e)
            }
            Err(Persist::Sticky(e)) => {
                if !self.failed.swap(true, Ordering::SeqCst) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "the SSD cache could not make data durable; every later flush fails until driveblk is restarted");
                }
                Err(e)
            }
        }
    }

    fn persist_inner(&self) -> Result<(), Persist> {
        let sticky = Persist::Sticky;
        let retryable = Persist::Retryable;
        // Every write this flush must cover has completed (and counted) by
        // now. Group commit: if a persist that read a later epoch finishes
        // while this one waits for the lock, it covered them all.
        let wanted = self.data_epoch.load(Ordering::SeqCst);
        let mut persisted = self.persisted.lock();
        // Read before the snapshot and the fsync: a write racing with this
        // persist leaves the epoch ahead, so the next flush syncs again.
        let epoch = self.data_epoch.load(Ordering::SeqCst);
        let (snap, gen, maps) = {
            // States and bitmaps agree under the bitmap lock (every move
            // into or out of partial happens under it).
            let pages = self.pages.lock();
            let mut snap: Vec<u8> = self.slots.view().iter().map(|s| s.state.load(Ordering::Acquire)).collect();
            let mut maps = HashMap::new();
            for (i, s) in snap.iter_mut().enumerate().filter(|(_, s)| has_bitmap(**s)) {
                match pages.maps.get(&(i as u64)) {
                    Some(m) => {
                        maps.insert(i as u64, m.clone());
                    }
                    // Cannot happen: states with pages always have a bitmap.
                    None => *s = ABSENT,
                }
            }
            (snap, pages.gen, maps)
        };
        let map_same = persisted.written
            && persisted.volatile.is_empty()
            && snap == persisted.states
            && gen == persisted.gen
            && self.generation() == persisted.generation
            && self.len() == persisted.image_len;
        // Logged writes are durable once their records are.
        let sync_log = || self.journal.lock().as_mut().map_or(Ok(()), |j| j.sync()).map_err(sticky);
        if map_same && wanted <= persisted.data_epoch {
            // Nothing written and nothing changed since the last persist
            // began, or what was written before this flush it made durable.
            return sync_log();
        }
        let logged_seen = self.logged_writes.load(Ordering::SeqCst);
        self.data.flush().map_err(sticky)?;
        if map_same {
            sync_log()?;
            persisted.data_epoch = epoch;
            return Ok(());
        }
        // A few changes go to the journal: one append, one fsync.
        let mut journal = self.journal.lock();
        let limit = (JOURNAL_MIN_CHECKPOINT).max(snap.len() as u64 * 2);
        if let Some(j) = journal.as_mut().filter(|j| persisted.written && j.len() < limit) {
            let mut changes = Vec::new();
            for (i, &st) in snap.iter().enumerate() {
                let idx = i as u64;
                let before = persisted.states.get(i).copied().unwrap_or(ABSENT);
                let map = maps.get(&idx);
                if st != before
                    || (has_bitmap(st) && persisted.maps.get(&idx) != map)
                    || persisted.volatile.contains_key(&idx)
                {
                    changes.push(Change { idx, state: st, bitmap: map.cloned() });
                }
            }
            let rec = Record { generation: self.generation(), image_len: self.len(), changes, writes: Vec::new() };
            j.append(&rec).map_err(sticky)?;
            *persisted = Persisted {
                states: snap,
                maps,
                generation: rec.generation,
                image_len: rec.image_len,
                data_epoch: epoch,
                written: true,
                gen,
                marked: persisted.marked,
                volatile: HashMap::new(),
            };
            return Ok(());
        }
        if self.logged_writes.load(Ordering::SeqCst) != logged_seen {
            // Logged writes landed during that sync; the checkpoint drops
            // their records, so their bytes must be durable first. No more
            // land while this holds the journal lock.
            self.data.flush().map_err(sticky)?;
        }
        let checkpoint = rand::random::<u64>() | 1;
        let header = StateHeader {
            format: STATE_MAGIC.into(),
            version: state_file::version(
                !self.sealed.is_empty(),
                self.dirty_pages.announced(),
                !self.key_id.is_empty(),
            ),
            id: self.id.clone(),
            generation: self.generation(),
            cache_id: self.cache_id.clone(),
            image_len: self.len(),
            chunks: snap.len() as u64,
            partial: maps.len() as u64,
            checkpoint,
            sealed: self.sealed.clone(),
            machine: self.place.machine.clone(),
            dir_inode: self.place.inode,
            dir_subvol: self.place.subvol,
            copy_of: self.copy_of.clone(),
            key_id: self.key_id.clone(),
        };
        let body = state_file::encode(&header, &snap, &maps).map_err(retryable)?;
        let tmp = self.dir.join("state.tmp");
        // Until the rename, the old map stands: failures here are retryable.
        let written = (|| {
            let mut f = private::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(retryable(e));
        }
        std::fs::rename(&tmp, self.dir.join("state")).map_err(retryable)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(sticky)?;
        // Records of the old checkpoint would be ignored; start afresh.
        if let Some(j) = journal.as_mut() {
            j.reset(checkpoint).map_err(sticky)?;
        }
        self.clear_logged();
        *persisted = Persisted {
            states: snap,
            maps,
            generation: header.generation,
            image_len: header.image_len,
            data_epoch: epoch,
            written: true,
            gen,
            marked: persisted.marked,
            volatile: HashMap::new(),
        };
        Ok(())
    }

    /// Writes the whole map as a new checkpoint (and empties the journal).
    pub fn checkpoint(&self) -> io::Result<()> {
        self.persisted.lock().written = false;
        self.persist()
    }

    /// Re-ties this cache to another volume whose generation `generation`
    /// holds exactly the bytes its clean and partial chunks hold (a fork
    /// made from them): dirty chunks stay dirty, to be committed there.
    /// Written as a fresh checkpoint.
    pub fn rebind(&mut self, id: CacheIdentity, generation: u64) -> io::Result<()> {
        self.id = id;
        // No cache of that volume is the one this was copied from.
        self.copy_of.clear();
        self.set_generation(generation);
        self.checkpoint()
    }

    /// True if the in-memory map (states or page bitmaps) differs from the
    /// persisted one.
    pub fn needs_persist(&self) -> bool {
        let persisted = self.persisted.lock();
        if self.pages.lock().gen != persisted.gen || persisted.generation != self.generation() {
            return true;
        }
        let slots = self.slots.view();
        slots.len != persisted.states.len()
            || slots.iter().zip(persisted.states.iter()).any(|(s, p)| s.state.load(Ordering::Relaxed) != *p)
    }

    /// Releases the directory lock early (on close), so a new store can
    /// open the directory while stray tasks still hold this one.
    pub fn unlock(&self) {
        // SAFETY: plain syscall on an owned fd.
        unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Whole chunks held (clean + dirty).
    pub fn cached_chunks(&self) -> u64 {
        self.cached.load(Ordering::Relaxed)
    }

    /// Chunks currently PARTIAL.
    pub fn partial_chunks(&self) -> u64 {
        self.partial.load(Ordering::Relaxed)
    }

    /// Bytes held: full chunks (clean + dirty) * chunk_size + pages of
    /// partial chunks * PAGE.
    pub fn cached_bytes(&self) -> u64 {
        self.cached_chunks() * self.chunk_size + self.pages_held.load(Ordering::Relaxed) * PAGE
    }

    /// Dirty chunks that hold data (not zeroed whole).
    pub fn dirty_data_chunks(&self) -> u64 {
        self.dirty_chunks().saturating_sub(self.chunks_in(ZERO_DIRTY).len() as u64)
    }

    /// Dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Chunks evicted so far (whole or partial).
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
            .view()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.load(Ordering::Relaxed) == state)
            .map(|(i, _)| i as u64)
            .collect()
    }
}
