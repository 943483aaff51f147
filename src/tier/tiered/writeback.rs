//! Write-back: turns the SSD tier's dirty chunks into committed generations
//! on the remote. A generation is cut at a guest FLUSH point (every write
//! the guest had completed, and the format's metadata, are in the cache),
//! as one instant of the disk: writes hold the cut gate shared, a cut takes
//! it exclusively and records the dirty chunks with their write sequence
//! numbers. While the cut uploads, a write to one of its chunks first
//! copies the chunk's cut-time bytes aside (copy-on-write into the cache's
//! `frozen` file), so the generation never mixes older and newer writes.
//! After the fenced commit, chunks not written since the cut become clean.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use super::Inner;
use crate::remote::priority::{self, Speculative};
use crate::tier::cache_crypto::{CacheFile, PageCipher};
use crate::tier::local::LocalFile;
use crate::tier::ssd::{bit, bitmap_words, PAGE};
use crate::tier::Storage;
use crate::volume::commit::{writer_record, CommitOptions, GenerationBuilder, Uploaded};
use crate::volume::{ChunkRef, VolumeError, VolumeResult};

/// The cache directory's record of chunks uploaded for a generation not
/// committed yet ([`Uploaded`]): the next attempt, in this process or the
/// next, uploads only what is not there.
const UPLOADED_FILE: &str = "uploaded";

/// How long packing a chunk waits, at most, for the guest's reads from the
/// remote to end: they go first, but a guest that reads without a pause
/// still lets its changes go up (a chunk per this much at least).
const UPLOAD_YIELD: Duration = Duration::from_millis(50);

/// How often, at most, the record in [`UPLOADED_FILE`] is saved while an
/// upload lands.
const UPLOADED_SAVE_EVERY: Duration = Duration::from_secs(2);

/// When a guest FLUSH counts as done (DESIGN.md, durability contract).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Data and its dirty record durable in the local cache; uploaded in
    /// the background with bounded lag.
    #[default]
    Writeback,
    /// A generation holding the data is committed on the remote.
    Writethrough,
    /// At once (throwaway sessions): nothing is made durable on FLUSH.
    Unsafe,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writeback" => Ok(Self::Writeback),
            "writethrough" => Ok(Self::Writethrough),
            "unsafe" => Ok(Self::Unsafe),
            _ => Err(format!("cache mode {s:?} is not one of writeback, writethrough, unsafe")),
        }
    }
}

/// Write-back settings.
#[derive(Clone, Debug)]
pub struct WritebackOptions {
    pub mode: CacheMode,
    /// In writeback mode, a FLUSH cuts a generation when the last cut is at
    /// least this old (so the remote lags the guest by about this much).
    pub sync_interval: Duration,
    pub commit: CommitOptions,
}

impl Default for WritebackOptions {
    fn default() -> Self {
        Self { mode: CacheMode::Writeback, sync_interval: Duration::from_secs(10), commit: CommitOptions::default() }
    }
}

/// The dirty chunks (index -> write sequence) and image length at one
/// flush point, with the pages each chunk changed since it was last clean.
#[derive(Debug)]
struct Cut {
    id: u64,
    chunks: BTreeMap<u64, u64>,
    pages: std::collections::HashMap<u64, Box<[u64]>>,
    /// Chunks dirty in part at the cut: the pages they held. The others
    /// are the parent generation's, fetched when the chunk is packed.
    present: std::collections::HashMap<u64, Box<[u64]>>,
    image_len: u64,
}

/// How write-back is doing, for status and for writethrough waiters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Id of the newest cut committed (0: none yet).
    pub committed_cut: u64,
    /// Id of the newest cut taken.
    pub last_cut: u64,
    /// A cut is being uploaded now.
    pub uploading: bool,
    /// Chunks of the cut being uploaded.
    pub uploading_chunks: u64,
    /// Of those, chunks already up: in packs that landed, in this attempt
    /// or one cut short before it.
    pub uploading_done: u64,
    /// Generations this process committed.
    pub generations_committed: u64,
    /// Pack bytes uploaded by this process.
    pub bytes_uploaded: u64,
    /// Why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
    /// Write-back paused for a person to act (quota, credentials).
    pub paused: bool,
    /// The remote moved on under this cache's changes: syncing stopped and
    /// the changes are kept locally.
    pub conflict: Option<String>,
    /// Seconds since the newest generation served was committed, by the
    /// wall clock of its commit record (None: it has none); filled in by
    /// the store.
    pub since_commit_secs: Option<u64>,
    /// Upload rate of the newest commit, bytes per second.
    pub last_rate_bps: u64,
    /// Attempts to commit a cut that failed, in this process.
    pub failed_attempts: u64,
    /// Bytes of the cut being uploaded copied aside in the cache (the
    /// cut-time bytes of chunks the guest rewrote since).
    pub frozen_bytes: u64,
    /// Chunks this process read into packs.
    pub chunks_packed: u64,
    /// The remote's count of the bytes it sent ([`Remote::bytes_sent`]
    /// (crate::remote::Remote::bytes_sent), None: it keeps none); filled
    /// in by the store.
    pub bytes_sent: Option<u64>,
}

/// Watches a wait for uploads (a stop's, a final sync's) and says when
/// waiting longer is pointless: write-back paused for a person to act
/// (quota, credentials); an attempt to upload a cut that has not moved
/// for the remote budget (`--remote-wait`, see [`Motion`]: a remote that
/// takes connections and never answers); or
/// [`FAILURES_GONE`] attempts in a row failing with nothing landing for
/// that budget (the network gone). A stop then ends at once instead of
/// holding a shutdown for all of `--sync-timeout`; what is left stays in
/// the cache and goes up at the next start.
#[derive(Debug)]
pub struct UploadWatch {
    budget: Duration,
    /// Failed attempts when the watch began or progress was last seen:
    /// only failures after it count (an old one, followed by a slow
    /// attempt that is still going, does not).
    failures: Option<u64>,
    /// The last commit and chunks landed seen, and since when.
    progress: Option<(u64, u64)>,
    since: Instant,
    /// Whether the attempt uploading a cut moves (restarted between
    /// attempts: standing still is then a retry's pause, or waiting for
    /// the guest's next FLUSH).
    motion: Motion,
}

/// Failed attempts in a row, with nothing landing, before the network
/// counts as gone: one attempt cut by a blip, or started while the link
/// was down and failing once it is back, is followed by one that works.
const FAILURES_GONE: u64 = 3;

impl UploadWatch {
    pub fn new(budget: Duration) -> Self {
        Self { budget, failures: None, progress: None, since: Instant::now(), motion: Motion::new() }
    }

    /// Why waiting on is pointless, from the sync state now (None: wait).
    pub fn hopeless(&mut self, st: &SyncStatus) -> Option<String> {
        if st.paused {
            return Some(format!("write-back is paused: {}", st.last_error.as_deref().unwrap_or("refused")));
        }
        let gone = |for_secs: u64, error: &str| {
            format!("nothing reached the remote for {for_secs} s (--remote-wait): {error}")
        };
        let still = self.motion.watch(st.uploading, st.committed_cut, st.chunks_packed, || st.bytes_sent);
        if still.is_some_and(|t| t.elapsed() >= self.budget) {
            return Some(gone(self.budget.as_secs(), st.last_error.as_deref().unwrap_or("no answer")));
        }
        let progress = (st.committed_cut, st.uploading_done);
        if self.progress != Some(progress) {
            (self.progress, self.since, self.failures) = (Some(progress), Instant::now(), Some(st.failed_attempts));
        }
        let first = *self.failures.get_or_insert(st.failed_attempts);
        let error = st.last_error.as_deref().filter(|_| st.failed_attempts >= first + FAILURES_GONE)?;
        (self.since.elapsed() >= self.budget).then(|| gone(self.budget.as_secs(), error))
    }
}

/// Bytes an upload handed over are taken to cross the network no slower
/// than this (1 Mbit/s): the remote counts them once its client has taken
/// them, less what the kernel holds unacknowledged, so some still sit in
/// the client's own buffers (or, where the kernel's count cannot be read,
/// in the socket's send buffer) and leave at the speed of the uplink.
const DRAIN_FLOOR: u64 = 128 << 10;
/// At most this much of what was handed over still sits in buffers
/// (Linux's largest send buffer).
const DRAIN_MOST: u64 = 4 << 20;

/// Whether a writethrough FLUSH's upload moves: a commit, a chunk packed,
/// or bytes the remote took (then moving for as long as those bytes take
/// to leave the socket buffer at [`DRAIN_FLOOR`]).
#[derive(Debug)]
struct Motion {
    seen: Option<(u64, u64, u64)>,
    until: Instant,
}

impl Motion {
    fn new() -> Self {
        Self { seen: None, until: Instant::now() }
    }

    /// Takes in what the upload shows now (`sent`: the remote's count of
    /// bytes sent, if it keeps one). Returns since when it has stood still,
    /// or None when that cannot be told (a store that does not count: a
    /// big pack would stand still for as long as it takes to go up).
    fn observe(&mut self, committed: u64, packed: u64, sent: Option<u64>) -> Option<Instant> {
        let sent = sent?;
        let now = Instant::now();
        if let Some((c, p, s)) = self.seen {
            if (c, p) != (committed, packed) || sent != s {
                let drain = Duration::from_secs_f64(sent.saturating_sub(s) as f64 / DRAIN_FLOOR as f64);
                let most = Duration::from_secs_f64(DRAIN_MOST as f64 / DRAIN_FLOOR as f64);
                self.until = (self.until.max(now) + drain).min(now + most);
            }
        }
        self.seen = Some((committed, packed, sent));
        Some(self.until)
    }

    /// [`observe`](Self::observe) while an attempt is `uploading`; between
    /// attempts (a retry's pause, waiting for the guest's next FLUSH)
    /// nothing can move, so the watch starts again and says nothing.
    /// `sent` is asked for only then (it reads the kernel's socket table).
    fn watch(
        &mut self,
        uploading: bool,
        committed: u64,
        packed: u64,
        sent: impl FnOnce() -> Option<u64>,
    ) -> Option<Instant> {
        if uploading {
            self.observe(committed, packed, sent())
        } else {
            *self = Motion::new();
            None
        }
    }
}

/// Write-back state of one store.
pub(crate) struct Writeback {
    pub(crate) opts: WritebackOptions,
    /// Writes hold it shared for their whole request; a cut takes it
    /// exclusively, so a cut is one instant of the disk.
    pub(crate) gate: RwLock<()>,
    /// The cut being uploaded, and which of its chunks were copied aside.
    frozen: Mutex<Frozen>,
    /// Cut-time bytes of rewritten chunks (sparse, chunk i at i * cs).
    /// Cut-time copies of chunks rewritten during an upload (encrypted
    /// under a key of this process when the cache is).
    frozen_file: CacheFile,
    status: Mutex<SyncStatus>,
    changed: Condvar,
    next_cut: AtomicU64,
    last_cut_at: Mutex<Option<Instant>>,
    /// Wakes the uploader.
    wake: tokio::sync::Notify,
    /// Set by close: the uploader stops after the cut in hand.
    stopping: AtomicBool,
    /// `driveblk sync` asked for a cut regardless of the interval.
    requested: AtomicBool,
    /// The newest cut somebody waits to see committed (a `driveblk sync`,
    /// a stop): until it is, uploads go to the remote unmarked. Otherwise they are speculative work, behind every
    /// guest read at a queue in front of the remote (Drive's pacer).
    awaited_cut: AtomicU64,
    /// Chunks uploaded for the generation being committed, kept across
    /// failed attempts and restarts.
    uploaded: Uploaded,
    /// Held to save or forget `uploaded` with its file: a stop's save that
    /// raced a commit must not leave the record of a committed upload.
    uploaded_file: Mutex<()>,
    /// Chunks read into packs by this process: a writethrough FLUSH counts
    /// each as its upload moving (see `wait_durable`).
    packed: AtomicU64,
    /// Writes since the last flush point: while 0, the disk is exactly as
    /// it was at that flush point, so a cut may be taken without one (an
    /// idle guest's last changes still go up within the sync interval).
    writes_since_flush: AtomicU64,
}

#[derive(Default)]
struct Frozen {
    cut: Option<Arc<Cut>>,
    /// Chunks of the cut with cut-time bytes copied aside: the whole chunk,
    /// or the pages a write changed (a 4 KiB write during a long upload
    /// copies 4 KiB, not its whole chunk).
    copied: HashMap<u64, Copied>,
    /// Bytes in `copied` (the space they take in the `frozen` file).
    bytes: u64,
}

/// What of a chunk was copied aside.
enum Copied {
    Whole,
    /// Nothing: the chunk was zeroed (a discard) at the cut and is all
    /// zeroes in it; a discard repeated during a long upload copies no
    /// zeroes aside.
    Zero,
    /// One bit per page (`PAGE` bytes) of the chunk.
    Pages(Vec<u64>),
}

/// Runs `[a, b)` of the set bits of `bits` among the first `n`.
fn runs(bits: &[u64], n: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let set = move |i: u64| bit(bits, i);
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < n && !set(i) {
            i += 1;
        }
        if i >= n {
            return None;
        }
        let a = i;
        while i < n && set(i) {
            i += 1;
        }
        Some((a, i))
    })
}

impl Writeback {
    pub(crate) fn new(dir: &std::path::Path, opts: WritebackOptions, sealed: bool) -> io::Result<Self> {
        let path = dir.join("frozen");
        // Copies from a previous run are never needed: after a restart every
        // dirty chunk is simply part of the next cut.
        crate::remote::private::create(&path)?;
        let file = LocalFile::open(&path, false)?;
        let frozen_file = if sealed { CacheFile::sealed(file, PageCipher::random()) } else { CacheFile::Plain(file) };
        Ok(Self {
            opts,
            gate: RwLock::new(()),
            frozen: Mutex::new(Frozen::default()),
            frozen_file,
            status: Mutex::new(SyncStatus::default()),
            changed: Condvar::new(),
            next_cut: AtomicU64::new(1),
            awaited_cut: AtomicU64::new(0),
            last_cut_at: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            writes_since_flush: AtomicU64::new(0),
            packed: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            uploaded: Uploaded::default(),
            uploaded_file: Mutex::new(()),
        })
    }

    /// A snapshot of the sync state.
    pub(crate) fn status(&self) -> SyncStatus {
        let mut s = self.status.lock().clone();
        s.frozen_bytes = self.frozen_bytes();
        s.chunks_packed = self.packed.load(Ordering::Relaxed);
        if s.uploading {
            let up = self.uploaded.summary().map_or(0, |(_, n)| n as u64);
            s.uploading_done = up.min(s.uploading_chunks);
        }
        s
    }

    /// Bytes copied aside for the cut being uploaded.
    fn frozen_bytes(&self) -> u64 {
        self.frozen.lock().bytes
    }

    fn cut_in_progress(&self) -> bool {
        self.frozen.lock().cut.is_some()
    }

    /// The id of the cut uploading now.
    fn current_cut(&self) -> Option<u64> {
        self.frozen.lock().cut.as_ref().map(|c| c.id)
    }
}

/// What an attempt to cut found.
enum CutTry {
    Taken(u64),
    /// A cut is uploading (its id): one at a time.
    Busy(u64),
    /// Nothing to cut (or, quiescent, written to since the flush point).
    Nothing,
    /// The remote moved on under this cache: nothing is cut any more.
    Conflict(String),
}

impl Inner {
    /// Taken shared around every change to the SSD tier's chunks, so a cut
    /// (which takes it exclusively) sees one instant of the disk.
    pub(super) fn writeback_gate(&self) -> Option<parking_lot::RwLockReadGuard<'_, ()>> {
        self.writeback.as_ref().map(|w| {
            let g = w.gate.read();
            w.writes_since_flush.fetch_add(1, Ordering::Relaxed);
            g
        })
    }

    /// Called before any byte of chunk `idx` changes, under its stripe
    /// write lock: if the chunk belongs to the cut being uploaded, saves
    /// the cut-time bytes that are about to change and were not saved yet
    /// (`within`: the byte range of the chunk the change touches, or
    /// `None` for all of it).
    pub(super) fn before_modify(&self, idx: u64, within: Option<(u64, u64)>) -> io::Result<()> {
        let Some(wb) = &self.writeback else { return Ok(()) };
        let mut f = wb.frozen.lock();
        let Some(cut) = f.cut.clone() else { return Ok(()) };
        if !cut.chunks.contains_key(&idx) || matches!(f.copied.get(&idx), Some(Copied::Whole | Copied::Zero)) {
            return Ok(());
        }
        let state = self.ssd.state(idx);
        if !crate::tier::ssd::is_dirty(state) {
            f.copied.insert(idx, Copied::Whole);
            return Ok(());
        }
        // Zeroed since the cut and not changed since (a change would have
        // come here first and been copied): zero at the cut.
        if state == crate::tier::ssd::ZERO_DIRTY && !f.copied.contains_key(&idx) {
            f.copied.insert(idx, Copied::Zero);
            return Ok(());
        }
        let page = PAGE;
        let pages = self.cs.div_ceil(page);
        // Pages only of a chunk the cache holds whole and as it is (a
        // chunk dirty in part, or zeroed, is copied whole, as before).
        let span = within.filter(|_| state == crate::tier::ssd::DIRTY && self.cs % page == 0);
        let Some((off, len)) = span.filter(|&(off, len)| len > 0 && off + len <= self.cs) else {
            // Pages copied earlier hold cut-time bytes the chunk no longer
            // has: keep them, copy the rest.
            let mut data = self.ssd.read_chunk(idx)?;
            let mut had = 0;
            if let Some(Copied::Pages(bits)) = f.copied.get(&idx) {
                self.overlay_saved(wb, idx, bits, &mut data)?;
                had = runs(bits, pages).map(|(a, b)| (b - a) * page).sum();
            }
            self.write_frozen(wb, idx, idx * self.cs, &data)?;
            f.copied.insert(idx, Copied::Whole);
            f.bytes = f.bytes - had + self.cs;
            return Ok(());
        };
        let words = bitmap_words(self.cs);
        let f = &mut *f;
        let Copied::Pages(bits) = f.copied.entry(idx).or_insert_with(|| Copied::Pages(vec![0; words])) else {
            return Ok(());
        };
        let (first, end) = (off / page, (off + len).div_ceil(page));
        let mut todo = vec![0u64; words];
        for i in (first..end).filter(|&i| !bit(bits, i)) {
            todo[(i / 64) as usize] |= 1 << (i % 64);
        }
        for (a, b) in runs(&todo, pages).collect::<Vec<_>>() {
            let mut buf = vec![0u8; ((b - a) * page) as usize];
            self.ssd.read_in_chunk(idx, a * page, &mut buf)?;
            self.write_frozen(wb, idx, idx * self.cs + a * page, &buf)?;
            for i in a..b {
                bits[(i / 64) as usize] |= 1 << (i % 64);
            }
            f.bytes += (b - a) * page;
        }
        Ok(())
    }

    /// Writes cut-time bytes of chunk `idx` into the `frozen` file, on the
    /// cache's disk: when it is full, clean chunks give way (as for a
    /// guest write) and the write is tried once more, so a guest rewriting
    /// a chunk of a cut being uploaded does not fail while the cache holds
    /// data it can drop.
    fn write_frozen(&self, wb: &Writeback, idx: u64, at: u64, data: &[u8]) -> io::Result<()> {
        match wb.frozen_file.write_at(at, data) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                if self.ssd.make_room_on_disk(idx)? {
                    wb.frozen_file.write_at(at, data)
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    }

    /// Makes the cache's data and map durable, unless `--cache unsafe`,
    /// which makes nothing durable: neither at a FLUSH nor at the format's
    /// own syncs (a qcow2 flush syncs between its metadata writes).
    pub(super) fn sync(&self) -> io::Result<()> {
        if self.writeback.as_ref().is_some_and(|wb| wb.opts.mode == CacheMode::Unsafe) {
            return Ok(());
        }
        self.ssd.persist()
    }

    /// The guest's FLUSH point: makes the cache durable (unless `unsafe`)
    /// and cuts a generation if one is due. Returns the cut a writethrough
    /// FLUSH must wait for (0: none).
    pub(super) fn flush_point(&self) -> io::Result<u64> {
        self.sync()?;
        self.cut_point()
    }

    /// A FLUSH point whose writes the caller has just made durable (with
    /// the store's `flush`, outside the format's lock, so that concurrent
    /// FLUSHes share one sync): cuts a generation if one is due. Returns
    /// the cut a writethrough FLUSH must wait for (0: none).
    pub(super) fn cut_point(&self) -> io::Result<u64> {
        let Some(wb) = &self.writeback else { return Ok(0) };
        if wb.opts.mode == CacheMode::Unsafe {
            return Ok(0);
        }
        wb.writes_since_flush.store(0, Ordering::SeqCst);
        if wb.opts.mode == CacheMode::Writethrough {
            return self.writethrough_cut(wb);
        }
        // A sync (a `driveblk sync`, a stop) waits for a cut the idle
        // uploader cannot take while the guest keeps writing: this flush
        // point takes it, whatever the interval.
        let asked = wb.awaited_cut.load(Ordering::SeqCst) > wb.status.lock().last_cut;
        let due = !wb.cut_in_progress()
            && (asked || wb.last_cut_at.lock().is_none_or(|t| t.elapsed() >= wb.opts.sync_interval));
        if !due {
            return Ok(0);
        }
        Ok(self.cut())
    }

    /// A writethrough FLUSH's cut: the cut that holds every write done
    /// before it, which the FLUSH then waits for. Group commit: a cut
    /// uploading now may have been taken before this FLUSH's writes, so it
    /// is waited for (within the remote budget, as
    /// [`wait_durable`](Self::wait_durable)); then this FLUSH cuts for
    /// everything written since. If another FLUSH (or the idle cut) takes
    /// a cut first, that one was taken after these writes and holds them.
    /// Once the remote moved on under this cache (a conflict) a FLUSH
    /// fails: nothing it flushes can reach the remote.
    fn writethrough_cut(&self, wb: &Writeback) -> io::Result<u64> {
        if let Some(busy) = wb.current_cut() {
            self.wait_durable(busy)?;
        }
        match self.try_cut(false) {
            CutTry::Taken(id) | CutTry::Busy(id) => Ok(id),
            CutTry::Nothing => Ok(0),
            CutTry::Conflict(c) => Err(io::Error::other(c)),
        }
    }

    /// Takes a cut of the dirty chunks now (the caller knows the disk is
    /// consistent: a flush point, the store opening or closing) unless one
    /// is uploading. Returns its id, or 0 when there was nothing to cut.
    pub(super) fn cut(&self) -> u64 {
        self.cut_when(false)
    }

    /// [`cut`](Self::cut), or with `quiescent`, only if nothing was
    /// written since the last flush point (checked under the gate).
    fn cut_when(&self, quiescent: bool) -> u64 {
        match self.try_cut(quiescent) {
            CutTry::Taken(id) => id,
            _ => 0,
        }
    }

    /// [`cut_when`](Self::cut_when), saying why no cut was taken.
    fn try_cut(&self, quiescent: bool) -> CutTry {
        let Some(wb) = &self.writeback else { return CutTry::Nothing };
        if let Some(c) = &wb.status.lock().conflict {
            return CutTry::Conflict(c.clone());
        }
        let _all = wb.gate.write();
        if quiescent && wb.writes_since_flush.load(Ordering::SeqCst) != 0 {
            return CutTry::Nothing;
        }
        let mut f = wb.frozen.lock();
        if let Some(c) = &f.cut {
            return CutTry::Busy(c.id);
        }
        let chunks: BTreeMap<u64, u64> = self.ssd.dirty_set().into_iter().collect();
        let image_len = self.ssd.len();
        if chunks.is_empty() && image_len == self.vol.image_len() {
            return CutTry::Nothing;
        }
        let pages = chunks.keys().filter_map(|&i| self.ssd.dirty_pages(i).map(|p| (i, p))).collect();
        let present = chunks.keys().filter_map(|&i| self.ssd.present_pages(i).map(|p| (i, p))).collect();
        let id = wb.next_cut.fetch_add(1, Ordering::SeqCst);
        f.cut = Some(Arc::new(Cut { id, chunks, pages, present, image_len }));
        f.copied.clear();
        f.bytes = 0;
        *wb.last_cut_at.lock() = Some(Instant::now());
        wb.status.lock().last_cut = id;
        wb.wake.notify_one();
        CutTry::Taken(id)
    }

    /// Blocks until cut `ticket` is committed (writethrough FLUSH), or
    /// fails if write-back cannot commit it. A failed commit keeps its cut
    /// and retries until the remote is back, which may be never. The FLUSH
    /// fails, and the data stays in the cache, once for the guest's remote
    /// budget either the remote has kept failing, or the upload has not
    /// moved ([`Motion`]: no chunk packed, no byte taken by the remote, no
    /// commit; a remote that takes connections and never answers, whose
    /// attempts only fail at their own deadlines, minutes for a big pack).
    /// An upload that moves (a big flush on a slow uplink) is waited for.
    /// On a store that does not count the bytes it sends, only failures
    /// count.
    pub(super) fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        let Some(wb) = &self.writeback else { return Ok(()) };
        if ticket == 0 || wb.opts.mode != CacheMode::Writethrough {
            return Ok(());
        }
        let budget = self.remote_wait.budget;
        let mut failing_since: Option<Instant> = None;
        let mut motion = Motion::new();
        let mut st = wb.status.lock();
        loop {
            if st.committed_cut >= ticket {
                return Ok(());
            }
            if let Some(c) = &st.conflict {
                return Err(io::Error::other(c.clone()));
            }
            if st.last_error.is_some() {
                // The cut is let go, and said committed, under `frozen`
                // then `status`: looked at without `status` held.
                let held = parking_lot::MutexGuard::unlocked(&mut st, || wb.cut_in_progress());
                if st.committed_cut >= ticket {
                    return Ok(());
                }
                if let (false, Some(e)) = (held, &st.last_error) {
                    return Err(io::Error::other(e.clone()));
                }
            }
            let failing = match (&st.last_error, failing_since) {
                (None, _) => None,
                (Some(_), None) => Some(Instant::now()),
                (Some(_), since) => since,
            };
            failing_since = failing;
            // Between attempts the failures count, above.
            let packed = wb.packed.load(Ordering::Relaxed);
            let stalled = motion.watch(st.uploading, st.committed_cut, packed, || self.vol.remote.bytes_sent());
            let left = [failing, stalled].into_iter().flatten().map(|t| budget.saturating_sub(t.elapsed())).min();
            if left.is_some_and(|l| l.is_zero()) {
                crate::tier::stats::Counters::inc(&self.counters.remote_timeouts);
                let why = match &st.last_error {
                    Some(e) => e.as_str(),
                    None => "the upload did not move (no answer)",
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the flushed data was not committed on the remote within {} s (--remote-wait): {why}; \
                         it stays in the cache and goes up when the remote answers",
                        budget.as_secs_f64()
                    ),
                ));
            }
            let left = left.unwrap_or(budget);
            wb.changed.wait_for(&mut st, left.min(Duration::from_millis(500)));
        }
    }

    /// At open: finds what an earlier process uploaded for a generation it
    /// did not get to commit. A record that cannot be read only costs its
    /// chunks' upload again.
    pub(super) fn load_uploaded(&self) {
        let Some(wb) = &self.writeback else { return };
        let dir = self.ssd.dir();
        match self.vol.load_local(dir, UPLOADED_FILE) {
            Ok(None) => {}
            Ok(Some(b)) => match wb.uploaded.restore(&b, &self.vol.header) {
                Ok(()) => {
                    if let Some((generation, chunks)) = wb.uploaded.summary() {
                        tracing::info!(
                            generation,
                            chunks,
                            "write-back: resuming an upload an earlier run did not finish"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "write-back: ignoring an unreadable record of chunks uploaded earlier")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "write-back: ignoring an unreadable record of chunks uploaded earlier")
            }
        }
    }

    /// Keeps what this process uploaded but did not commit, for the next
    /// attempt or the next start.
    pub(super) fn save_uploaded(&self) {
        let Some(wb) = &self.writeback else { return };
        let _file = wb.uploaded_file.lock();
        let Some(b) = wb.uploaded.to_bytes() else { return };
        if let Err(e) = self.vol.save_local(self.ssd.dir(), UPLOADED_FILE, &b) {
            tracing::warn!(error = %e, "write-back: could not record the chunks uploaded so far (they go up again next time)");
        }
    }

    /// The first generation of this cache's run of commits that ends with
    /// `parent` (`parent + 1` if it is not this cache's), looked for only as
    /// far down as the packs recorded in `uploaded` need, and the packs that
    /// run's generations name; a generation that cannot be read ends the run
    /// (`commit::Uploaded`).
    async fn own_run_since(&self, parent: u64) -> (u64, HashSet<String>) {
        let wb = self.writeback.as_ref().expect("write-back is on");
        let mut committed = HashSet::new();
        let Some(lowest) = wb.uploaded.lowest_pack_generation() else { return (parent + 1, committed) };
        let mut from = parent + 1;
        while from > lowest.max(1) {
            match self.vol.packs_of_generation_by(self.ssd.cache_id(), from - 1).await {
                Ok(Some(packs)) => {
                    committed.extend(packs);
                    from -= 1;
                }
                _ => break,
            }
        }
        (from, committed)
    }

    /// The generation was committed: what was uploaded for it is its own.
    fn forget_uploaded(&self) {
        let Some(wb) = &self.writeback else { return };
        let _file = wb.uploaded_file.lock();
        wb.uploaded.clear();
        match std::fs::remove_file(self.ssd.dir().join(UPLOADED_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "write-back: could not remove the record of chunks uploaded"),
        }
    }

    /// Reads chunk `idx` as it was at the cut.
    fn read_cut_chunk(&self, idx: u64) -> io::Result<Vec<u8>> {
        let wb = self.writeback.as_ref().expect("write-back is on");
        let _g = self.ssd.lock_read(idx);
        let saved = match wb.frozen.lock().copied.get(&idx) {
            None => None,
            Some(Copied::Whole) => {
                let mut v = vec![0u8; self.cs as usize];
                wb.frozen_file.read_at(idx * self.cs, &mut v)?;
                return Ok(v);
            }
            Some(Copied::Zero) => return Ok(vec![0u8; self.cs as usize]),
            Some(Copied::Pages(bits)) => Some(bits.clone()),
        };
        let mut v = self.ssd.read_chunk(idx)?;
        if let Some(bits) = saved {
            self.overlay_saved(wb, idx, &bits, &mut v)?;
        }
        Ok(v)
    }

    /// Lays the cut-time pages of chunk `idx` saved in `frozen` (`bits`)
    /// over `data`, the chunk as the cache holds it now.
    fn overlay_saved(&self, wb: &Writeback, idx: u64, bits: &[u64], data: &mut [u8]) -> io::Result<()> {
        for (a, b) in runs(bits, self.cs.div_ceil(PAGE)) {
            let r = (a * PAGE) as usize..(b * PAGE) as usize;
            wb.frozen_file.read_at(idx * self.cs + a * PAGE, &mut data[r])?;
        }
        Ok(())
    }

    /// The uploader: commits each cut, retrying with backoff; runs until
    /// the store closes.
    pub(super) async fn writeback_loop(self: Arc<Self>) {
        let wb = self.writeback.as_ref().expect("write-back is on");
        let mut backoff = Duration::from_secs(1);
        loop {
            let cut = wb.frozen.lock().cut.clone();
            let Some(cut) = cut else {
                if wb.stopping.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
                    return;
                }
                let idle = tokio::time::timeout(wb.opts.sync_interval, wb.wake.notified()).await.is_err();
                let due = idle && wb.last_cut_at.lock().is_none_or(|t| t.elapsed() >= wb.opts.sync_interval);
                let asked = wb.requested.load(Ordering::SeqCst);
                if (due || asked) && wb.opts.mode != CacheMode::Unsafe && self.cut_when(true) != 0 {
                    wb.requested.store(false, Ordering::SeqCst);
                }
                continue;
            };
            {
                let mut st = wb.status.lock();
                st.uploading = true;
                st.uploading_chunks = cut.chunks.len() as u64;
            }
            let r = priority::speculative(self.upload_mark(), self.clone().commit_cut(cut.clone())).await;
            {
                let me = self.clone();
                let ok = r.is_ok();
                let _ = tokio::task::spawn_blocking(move || if ok { me.forget_uploaded() } else { me.save_uploaded() })
                    .await;
            }
            // What to do next, decided under the status lock, which must not
            // be held across an await.
            enum Next {
                Done,
                Stop,
                Retry(Duration),
            }
            let next = {
                let mut st = wb.status.lock();
                st.uploading = false;
                match r {
                    Ok(unsaved) => {
                        // (`committed_cut` says so once the cut is let go.)
                        st.last_error = unsaved;
                        st.paused = false;
                        backoff = Duration::from_secs(1);
                        Next::Done
                    }
                    Err(e) => {
                        let pause = matches!(&e, VolumeError::Remote { source, .. } if source.is_pause());
                        if wb.stopping.load(Ordering::SeqCst) {
                            // The stop's sync timeout ran out and shutdown
                            // cancels the upload: expected, and the stop has
                            // already said what is left.
                            tracing::info!(error = %e, "write-back: stopped before this upload finished; the local changes are kept and go up at the next start");
                        } else {
                            tracing::error!(error = %e, "write-back: could not commit a generation; the local changes are kept");
                        }
                        st.last_error = Some(e.to_string());
                        st.failed_attempts += 1;
                        st.paused = pause;
                        if matches!(e, VolumeError::Conflict { .. } | VolumeError::LeaseHeld { .. }) {
                            st.conflict = Some(self.conflict_text(&e));
                            Next::Stop
                        } else {
                            Next::Retry(if pause { Duration::from_secs(60) } else { backoff })
                        }
                    }
                }
            };
            match next {
                Next::Done => {
                    self.release_cut(Some(cut.id));
                    // A sync asked for while this cut was retrying spent its
                    // wake-up on the retry's sleep: serve it now, not after
                    // a whole sync interval.
                    if wb.requested.load(Ordering::SeqCst) {
                        wb.wake.notify_one();
                    }
                }
                Next::Stop => {
                    self.release_cut(None);
                    wb.changed.notify_all();
                    return;
                }
                Next::Retry(wait) => {
                    wb.changed.notify_all();
                    if wb.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wb.wake.notified() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    continue;
                }
            }
            wb.changed.notify_all();
        }
    }

    /// What status, `sync` and a writethrough FLUSH say of a conflict:
    /// the fence's refusal and, as long as the guest keeps writing here,
    /// the way out (restarting does not upload them).
    fn conflict_text(&self, e: &VolumeError) -> String {
        match e {
            VolumeError::Conflict { url, .. } => format!(
                "{e}; they never go up as they are, nor what the guest writes here from now on: stop the VM here, \
                 then keep them as a new volume with `driveblk fork {url} NEWURL --cache-dir {dir}` or drop them \
                 with `driveblk discard-local {url} --cache-dir {dir}`",
                dir = self.ssd.dir().display()
            ),
            _ => e.to_string(),
        }
    }

    /// The mark of the uploads: speculative while nobody waits for them
    /// (writeback mode, no `sync` asked, not closing), so at Drive's pacer
    /// a guest's reads go first; a writethrough FLUSH waits for each.
    fn upload_mark(self: &Arc<Self>) -> Speculative {
        let me = Arc::downgrade(self);
        Speculative::new(move || me.upgrade().is_none_or(|me| me.upload_awaited()))
    }

    fn upload_awaited(&self) -> bool {
        let Some(wb) = &self.writeback else { return true };
        wb.opts.mode == CacheMode::Writethrough
            || wb.stopping.load(Ordering::SeqCst)
            || wb.status.lock().committed_cut < wb.awaited_cut.load(Ordering::SeqCst)
    }

    /// See [`TieredStore::request_sync`](super::TieredStore::request_sync).
    pub(super) fn request_sync(&self) {
        if let Some(wb) = &self.writeback {
            // The sync waits for the next cut (and so for the one uploading).
            wb.awaited_cut.fetch_max(wb.next_cut.load(Ordering::SeqCst), Ordering::SeqCst);
            wb.requested.store(true, Ordering::SeqCst);
            wb.wake.notify_one();
        }
    }

    /// Forgets the cut and its copied-aside bytes. The next cut may be
    /// taken, and copy its chunks aside at the same places in the `frozen`
    /// file, as soon as this one is gone: each chunk's old copy is cleared
    /// under the lock the copying takes, and only where the next cut has
    /// not copied yet. A cut `committed` is said to be in the same step:
    /// a writethrough FLUSH that finds it committed then finds it gone, and
    /// cuts for its own writes (while the cut is held, a FLUSH counts it as
    /// the one holding its writes).
    fn release_cut(&self, committed: Option<u64>) {
        let wb = self.writeback.as_ref().expect("write-back is on");
        #[cfg(test)]
        super::tests::stage(self.ssd.dir(), "releasing");
        let copied: Vec<(u64, Copied)> = {
            let mut f = wb.frozen.lock();
            f.cut = None;
            f.bytes = 0;
            if let Some(id) = committed {
                wb.status.lock().committed_cut = id;
            }
            f.copied.drain().collect()
        };
        #[cfg(test)]
        super::tests::stage(self.ssd.dir(), "released");
        let pages = self.cs.div_ceil(PAGE);
        let all = vec![u64::MAX; bitmap_words(self.cs)];
        for (idx, c) in copied {
            let old = match &c {
                Copied::Whole => &all,
                Copied::Zero => continue,
                Copied::Pages(bits) => bits,
            };
            let f = wb.frozen.lock();
            let clear: Vec<u64> = match f.copied.get(&idx) {
                Some(Copied::Whole) => continue,
                Some(Copied::Pages(new)) => old.iter().zip(new).map(|(o, n)| o & !n).collect(),
                None | Some(Copied::Zero) => old.clone(),
            };
            for (a, b) in runs(&clear, pages) {
                let end = (b * PAGE).min(self.cs);
                let _ = wb.frozen_file.write_zeroes_at(idx * self.cs + a * PAGE, end - a * PAGE);
            }
        }
    }

    /// Uploads one cut and commits it; then marks its chunks clean. A
    /// commit that landed but whose cache state could not be saved (the
    /// cache's disk full, its folder deleted) returns what went wrong.
    /// What goes up meanwhile is recorded in the cache as it lands, so
    /// even a kill -9 leaves the next start only the rest to upload.
    async fn commit_cut(self: Arc<Self>, cut: Arc<Cut>) -> VolumeResult<Option<String>> {
        let keeper = tokio::spawn(self.clone().keep_uploaded_saved());
        let r = self.upload_and_commit(cut).await;
        keeper.abort();
        r
    }

    /// Saves the record of what went up each time it grows, at most every
    /// [`UPLOADED_SAVE_EVERY`]: a kill costs at most that much upload again.
    async fn keep_uploaded_saved(self: Arc<Self>) {
        let wb = self.writeback.as_ref().expect("write-back is on");
        loop {
            wb.uploaded.grown().await;
            tokio::time::sleep(UPLOADED_SAVE_EVERY).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.save_uploaded()).await;
        }
    }

    /// [`commit_cut`](Self::commit_cut) itself.
    async fn upload_and_commit(self: Arc<Self>, cut: Arc<Cut>) -> VolumeResult<Option<String>> {
        let wb = self.writeback.as_ref().expect("write-back is on");
        // Only the lease holder commits (a store opened offline, or for a
        // stopped daemon's sync, takes it now: the volume may have moved on
        // meanwhile, which the take finds as the fence would).
        let holder = match self.clone().ensure_lease().await {
            Ok(h) => h,
            Err(VolumeError::Conflict { url, generation, by }) => {
                return self.after_conflict(cut, url, generation, by).await
            }
            Err(e) => return Err(e),
        };
        let parent = self.vol.manifest();
        let mut b = GenerationBuilder::new(
            self.vol.remote.clone(),
            &self.vol.url,
            &self.vol.header,
            parent.clone(),
            self.vol.base.is_some(),
            wb.opts.commit.clone(),
        );
        b.set_image_len(cut.image_len);
        let (own_since, committed) = self.own_run_since(parent.generation).await;
        b.resume(&wb.uploaded, own_since, committed);
        let left_after = self.pending_bytes().saturating_sub(cut.chunks.len() as u64 * self.cs);
        b.set_lease(Some(holder.record_for(b.generation(), left_after)));
        let t0 = Instant::now();
        for &idx in cut.chunks.keys() {
            // Uploads yield to the guest: while a guest read waits for the
            // remote, packing (and so the next pack upload) holds back — a
            // moment per chunk, as a guest that keeps missing would hold
            // them back for ever, and not at all when somebody waits.
            let yielding = Instant::now();
            while self.demand.load(Ordering::SeqCst) > 0 && yielding.elapsed() < UPLOAD_YIELD && !self.upload_awaited()
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let chunk_len = cut.image_len.saturating_sub(idx * self.cs).min(self.cs) as usize;
            if chunk_len == 0 {
                continue;
            }
            let me = self.clone();
            let mut data = tokio::task::spawn_blocking(move || me.read_cut_chunk(idx))
                .await
                .map_err(VolumeError::task("reading a dirty chunk"))?
                .map_err(|e| VolumeError::io("reading a dirty chunk from", self.ssd.dir(), e))?;
            if let Some(present) = cut.present.get(&idx) {
                // Pages it did not hold are unchanged since the parent.
                let parent = self.vol.fetch_chunk(idx).await?;
                crate::tier::ssd::overlay_absent(&mut data, &parent.data, present);
            }
            data.truncate(chunk_len);
            b.add_chunk(idx, data, cut.pages.get(&idx).map(|p| &p[..])).await?;
            wb.packed.fetch_add(1, Ordering::Relaxed);
        }
        if b.changes_nothing() {
            // Every chunk holds its parent's bytes again (rewritten as it
            // was): they are clean as they are, and a generation would only
            // cost a manifest upload and a line of history.
            tracing::info!(
                chunks = cut.chunks.len(),
                generation = parent.generation,
                "write-back: the changes equal the last generation; nothing to commit"
            );
            let me = self.clone();
            let c = cut.clone();
            let m = (*parent).clone();
            let saved = tokio::task::spawn_blocking(move || me.install_generation(m, &c.chunks))
                .await
                .map_err(VolumeError::task("marking unchanged chunks clean"))?;
            return Ok(saved.err().map(|e| unsaved(parent.generation, &e)));
        }
        let g = b.generation();
        let (manifest, stats) = match b.commit(writer_record(self.ssd.cache_id())).await {
            Ok(r) => r,
            Err(VolumeError::Conflict { url, generation, by }) => {
                return self.after_conflict(cut, url, generation, by).await
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            generation = g,
            chunks = stats.chunks_packed,
            patched = stats.chunks_patched,
            zero = stats.chunks_zero,
            unchanged = stats.chunks_unchanged,
            resumed = stats.chunks_resumed,
            pack_bytes = stats.pack_bytes,
            manifest_bytes = stats.manifest_bytes,
            full = stats.full,
            "write-back: committed a generation"
        );
        let me = self.clone();
        let c = cut.clone();
        let saved = tokio::task::spawn_blocking(move || me.install_generation(manifest, &c.chunks))
            .await
            .map_err(VolumeError::task("installing a committed generation"))?;
        let mut st = wb.status.lock();
        st.generations_committed += 1;
        let bytes = stats.pack_bytes + stats.manifest_bytes;
        st.bytes_uploaded += bytes;
        st.last_rate_bps = (bytes as f64 / t0.elapsed().as_secs_f64().max(1e-3)) as u64;
        // The generation is committed and served: retrying the cut would
        // commit the same changes again, and again, while the state cannot
        // be saved. A restart recognises the generation as this cache's.
        Ok(saved.err().map(|e| unsaved(g, &e)))
    }

    /// The fence refused the commit of `cut` (or the lease taken for it):
    /// generation `generation` exists. Maybe our own earlier attempt landed
    /// and its reply was lost beyond the retries: then it is adopted,
    /// nothing forked. Or `driveblk gc` repacked the volume (same bytes, new
    /// packs): the cut is built again on top of that. Anything else is the
    /// conflict, returned as such.
    async fn after_conflict(
        self: Arc<Self>,
        cut: Arc<Cut>,
        url: String,
        generation: u64,
        by: String,
    ) -> VolumeResult<Option<String>> {
        if let Some(saved) = self.clone().adopt_own_generations().await? {
            // As a commit: adopted and served, so never committed again.
            return Ok(saved.err().map(|e| unsaved(self.vol.generation(), &e)));
        }
        if self.clone().adopt_repacks().await? {
            return Box::pin(self.upload_and_commit(cut)).await;
        }
        Err(VolumeError::Conflict { url, generation, by })
    }

    /// Serves `manifest` from now on and marks the committed chunks clean
    /// (those not written since their copy went up). The manifest is
    /// swapped in first: a chunk evicted once clean must be fetched by its
    /// new reference. An error says only that the cache state could not be
    /// saved: the generation is served all the same.
    pub(super) fn install_generation(
        &self,
        manifest: crate::volume::Manifest,
        chunks: &BTreeMap<u64, u64>,
    ) -> VolumeResult<()> {
        let g = manifest.generation;
        self.vol.set_manifest(manifest);
        for (&idx, &seq) in chunks {
            let _g = self.ssd.lock_write(idx);
            self.ssd.mark_clean(idx, seq);
        }
        self.ssd.set_generation(g);
        // The offline copy first, then the state that names its generation.
        if let Err(e) = self.vol.save_copies(self.ssd.dir()) {
            tracing::warn!(error = %e, "could not keep an offline copy of the new manifest");
        }
        self.ssd.persist().map_err(|e| VolumeError::io("persisting cache state in", self.ssd.dir(), e))
    }

    /// After a fence conflict: if every generation past ours was committed
    /// by this cache (an attempt that landed but whose reply was lost),
    /// serves the newest and marks clean the dirty chunks whose bytes it
    /// holds, and returns whether the cache state saying so was saved.
    /// None when someone else committed (a real conflict).
    async fn adopt_own_generations(self: Arc<Self>) -> VolumeResult<Option<VolumeResult<()>>> {
        let newest = self.vol.newest_manifest().await?;
        let mine = self.vol.generations_by(self.ssd.cache_id(), self.vol.generation() + 1, newest.generation).await?;
        if !mine {
            return Ok(None);
        }
        let me = self.clone();
        let saved = tokio::task::spawn_blocking(move || -> VolumeResult<VolumeResult<()>> {
            let clean = me.clean_in(&newest)?;
            Ok(me.install_adopted(newest, &clean))
        })
        .await
        .map_err(VolumeError::task("reconciling the cache with the volume"))??;
        Ok(Some(saved))
    }

    /// After a fence conflict: if every generation past ours is a gc
    /// repack whose content equals our parent's, serves the newest (clean
    /// cached chunks stay valid, dirty ones stay dirty). False otherwise.
    async fn adopt_repacks(self: Arc<Self>) -> VolumeResult<bool> {
        let newest = self.vol.newest_manifest().await?;
        let parent = self.vol.manifest();
        if newest.generation <= parent.generation
            || !self.vol.generations_only_repacks(parent.generation + 1, newest.generation).await?
        {
            return Ok(false);
        }
        let has_base = self.vol.base.is_some();
        let same = newest.image_len == parent.image_len
            && (0..parent.chunk_count()).all(|i| newest.chunk(i, has_base).same_bytes(&parent.chunk(i, has_base)));
        if !same {
            return Ok(false);
        }
        tracing::info!(
            from = parent.generation,
            to = newest.generation,
            "write-back: building on gc's repacked generation"
        );
        self.install_generation(newest, &BTreeMap::new())?;
        Ok(true)
    }

    /// Serves `newest` (committed from this cache's data) and marks clean
    /// every dirty chunk whose bytes equal what it references.
    pub(super) fn reconcile_dirty(&self, newest: crate::volume::Manifest) -> VolumeResult<()> {
        let clean = self.clean_in(&newest)?;
        // A pack recorded as uploaded may be one of these generations' own:
        // committed, so no longer one gc spares as an upload cut short.
        self.forget_uploaded();
        self.install_adopted(newest, &clean)
    }

    fn install_adopted(&self, newest: crate::volume::Manifest, clean: &BTreeMap<u64, u64>) -> VolumeResult<()> {
        tracing::info!(
            generation = newest.generation,
            chunks = clean.len(),
            "write-back: adopted generations this cache committed earlier"
        );
        self.install_generation(newest, clean)
    }

    /// The dirty chunks (with their write sequence) whose bytes equal what
    /// `newest` references: those a commit of this cache already holds.
    fn clean_in(&self, newest: &crate::volume::Manifest) -> VolumeResult<BTreeMap<u64, u64>> {
        let has_base = self.vol.base.is_some();
        let mut clean = BTreeMap::new();
        for (idx, seq) in self.ssd.dirty_set() {
            let want = newest.chunk(idx, has_base);
            let data = {
                let _g = self.ssd.lock_read(idx);
                self.ssd.read_chunk(idx).map_err(|e| VolumeError::io("reading", self.ssd.dir(), e))?
            };
            let n = newest.image_len.saturating_sub(idx * self.cs).min(self.cs) as usize;
            // Past the generation's end it holds zeroes: bytes the guest
            // wrote there after its cut (the image grew) are not in it.
            let same = data[n..].iter().all(|&b| b == 0)
                && match &want {
                    ChunkRef::Zero => data[..n].iter().all(|&b| b == 0),
                    ChunkRef::Base => false,
                    // Patched chunks are hashed at the full chunk size.
                    ChunkRef::Patched { digest, .. } => crate::volume::digest::matches(&data, digest),
                    ChunkRef::Packed { digest, .. } => crate::volume::digest::matches(&data[..n], digest),
                };
            if same {
                clean.insert(idx, seq);
            }
        }
        Ok(clean)
    }

    /// Close: cuts what is left and waits up to `timeout` for it to be
    /// committed, or less when nothing can go up (see [`UploadWatch`]).
    /// Returns the dirty bytes still not uploaded.
    pub(super) fn final_sync(&self, timeout: Duration) -> u64 {
        let Some(wb) = &self.writeback else { return 0 };
        let deadline = Instant::now() + timeout;
        let mut watch = UploadWatch::new(self.remote_wait.budget);
        let give_up = || {
            wb.stopping.store(true, Ordering::SeqCst);
            wb.wake.notify_one();
            self.ssd.dirty_chunks() * self.cs
        };
        loop {
            let ticket = self.cut();
            let pending = self.ssd.dirty_chunks();
            if pending == 0 && !wb.cut_in_progress() {
                return 0;
            }
            let target = {
                let st = wb.status.lock();
                if st.conflict.is_some() {
                    return pending * self.cs;
                }
                if ticket != 0 {
                    ticket
                } else {
                    st.last_cut
                }
            };
            // Waited for: its uploads go unmarked (see `upload_mark`).
            wb.awaited_cut.fetch_max(target, Ordering::SeqCst);
            loop {
                let st = self.sync_status().unwrap_or_default();
                if st.committed_cut >= target || st.conflict.is_some() || Instant::now() >= deadline {
                    break;
                }
                if let Some(why) = watch.hopeless(&st) {
                    let left = give_up();
                    tracing::warn!(
                        left = left,
                        "final sync: {why}; the changes not uploaded stay in the cache directory {} and go up at \
                         the next start",
                        self.ssd.dir().display()
                    );
                    return left;
                }
                let mut g = wb.status.lock();
                if g.committed_cut < target && g.conflict.is_none() {
                    wb.changed.wait_for(&mut g, Duration::from_millis(200));
                }
            }
            if Instant::now() >= deadline || self.ssd.dirty_chunks() == 0 {
                return give_up();
            }
        }
    }
}

impl Inner {
    /// At open: makes the cache agree with the generation served. Clean
    /// chunks of an older generation whose bytes changed since are
    /// forgotten. Dirty chunks are only kept on top of the generation they
    /// were written on, or of generations this cache committed itself
    /// (a commit whose cache state was not persisted before a crash): then
    /// those already uploaded become clean. Changes made on top of a
    /// generation someone else has since replaced are refused, never mixed
    /// into theirs, and never thrown away.
    ///
    /// Opened offline, the cache's copy of the manifest stands in for the
    /// remote: it is only served when it names the cache's own generation
    /// (the copy is saved before the state that names a newer one). One
    /// that does not cannot tell which cached chunks still hold its bytes,
    /// so the start is refused with nothing changed, rather than forgetting
    /// everything cached while no remote can give it back.
    pub(super) async fn catch_up_generation(self: Arc<Self>) -> VolumeResult<()> {
        let (g, m) = (self.ssd.generation(), self.vol.generation());
        if g == m {
            return Ok(());
        }
        let dirty = self.ssd.dirty_chunks();
        if self.vol.offline {
            return Err(VolumeError::Cache {
                dir: self.ssd.dir().to_path_buf(),
                reason: format!(
                    "holds generation {g} of the volume, but the copy of its manifest kept for starts without the \
                     remote is of generation {m} (it could not be saved when the cache moved on), and the remote \
                     is unreachable: it cannot be served offline without forgetting what it holds; nothing was \
                     changed ({dirty} chunks of changes not yet uploaded are kept) — start it again once the \
                     remote answers"
                ),
            });
        }
        let refuse = |why: String| VolumeError::Diverged {
            dir: self.ssd.dir().to_path_buf(),
            reason: format!(
                "holds {dirty} chunks of changes not yet uploaded, made on top of generation {g}, but {why}; \
                 nothing was changed and nothing is lost — save them as a new volume with `driveblk fork URL NEWURL \
                 --cache-dir {dir}` (it shares the volume's data), export them with `driveblk export URL FILE \
                 --cache-dir {dir}`, or drop them with `driveblk discard-local URL --cache-dir {dir}`",
                dir = self.ssd.dir().display()
            ),
        };
        if dirty > 0 {
            if g > m {
                return Err(refuse(format!("the volume is at the older generation {m} (rolled back or restored?)")));
            }
            // (A fork: `driveblk fork URL NEWURL` saves them as a new volume,
            // `driveblk discard-local URL` drops them.)
            if !self.vol.generations_by(self.ssd.cache_id(), g + 1, m).await? {
                let by = self.vol.manifest().writer.clone().map_or("another writer".into(), |w| w.host);
                return Err(refuse(format!("the volume has moved on to generation {m} (committed by {by})")));
            }
        }
        let old = if g < m { self.vol.load_generation(g).await.ok() } else { None };
        let new = self.vol.manifest();
        let has_base = self.vol.base.is_some();
        let mut stale = 0u64;
        let mut candidates = self.ssd.chunks_in(crate::tier::ssd::CLEAN);
        candidates.extend(self.ssd.chunks_in(crate::tier::ssd::PARTIAL));
        for idx in candidates {
            let keep = old.as_ref().is_some_and(|o| o.chunk(idx, has_base).same_bytes(&new.chunk(idx, has_base)));
            if !keep {
                let _g = self.ssd.lock_write(idx);
                self.ssd.invalidate(idx);
                stale += 1;
            }
        }
        tracing::info!(from = g, to = m, stale, dirty, "cache caught up with the volume's newest generation");
        if dirty > 0 {
            let me = self.clone();
            return tokio::task::spawn_blocking(move || me.reconcile_dirty((*new).clone()))
                .await
                .map_err(VolumeError::task("reconciling the cache with the volume"))?;
        }
        self.ssd.set_generation(m);
        // The offline copy first, then the state that names its generation
        // (as `install_generation`): a start refused after this (the lease
        // held by another host) must not leave the state ahead of the copy
        // a later start without the remote serves.
        if let Err(e) = self.vol.save_copies(self.ssd.dir()) {
            tracing::warn!(error = %e, "could not keep an offline copy of the volume's manifest");
        }
        self.ssd.persist().map_err(|e| VolumeError::io("persisting cache state in", self.ssd.dir(), e))
    }
}

/// What the status says of a generation committed (or adopted) and served
/// whose cache state could not be saved: retrying would commit the same
/// changes again, and again, while it cannot be; a restart recognises the
/// generation as this cache's.
fn unsaved(generation: u64, e: &VolumeError) -> String {
    tracing::error!(generation, error = %e, "write-back: committed a generation, but could not save this cache's state");
    format!("generation {generation} is committed, but this cache's state could not be saved: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_handed_over_keep_an_upload_moving_while_they_drain() {
        let mut m = Motion::new();
        let t0 = Instant::now();
        assert_eq!(m.observe(0, 0, None), None, "a store that does not count cannot tell");
        let still = m.observe(0, 0, Some(100)).unwrap();
        assert!(still <= Instant::now() && still >= t0 - Duration::from_millis(1), "nothing moved yet");
        assert_eq!(m.observe(0, 0, Some(100)), Some(still), "the same count: standing still");
        // 1 MiB taken: moving for the 8 s it takes to leave at 1 Mbit/s.
        let until = m.observe(0, 0, Some(100 + (1 << 20))).unwrap();
        let ahead = until - Instant::now();
        assert!(ahead > Duration::from_millis(7900) && ahead <= Duration::from_secs(8), "{ahead:?}");
        // 64 MiB more: never counted past a full send buffer (32 s).
        let until = m.observe(0, 0, Some(100 + (65 << 20))).unwrap();
        let ahead = until - Instant::now();
        assert!(ahead > Duration::from_millis(31_900) && ahead <= Duration::from_secs(32), "{ahead:?}");
        // A chunk packed or a commit moves it too, without pushing it on.
        assert_eq!(m.observe(0, 1, Some(100 + (65 << 20))), Some(until));
    }
}
