//! The tiered store: a volume's image file served as [`Storage`] from RAM,
//! then the SSD cache, then the remote. Misses are fetched on a tokio
//! runtime the store owns (single-flight per chunk, many chunks in
//! parallel); sequential streams read ahead; hydration fills the SSD tier
//! in the background; metadata hinted by the format layer is pinned; a
//! boot profile is recorded and replayed (`boot_profile.rs`).
//!
//! Writes land in the SSD tier as dirty chunks (never evicted, kept across
//! restarts); write-back (`writeback.rs`) cuts them into generations at
//! guest FLUSH points and commits them to the remote.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Semaphore;

use super::boot::{BootProfileMode, Recorder, Replay};
use super::cache_crypto::Sealing;
use super::open::{CacheOptions, LeaseMode, RemoteWait};
use super::pins::Pins;
use super::ram::{Admit, ChunkBuf, RamCache};
use super::readahead::Readahead;
use super::single_flight::{Flight, SingleFlight, Urgency};
use super::ssd::{CacheIdentity, OpenMode, Opened, SsdCache, DIRTY, DIRTY_PARTIAL, PAGE, ZERO_DIRTY};
use super::stats::{Counters, TierStats};
use super::Storage;
use crate::remote::priority;
use crate::remote::retry::within_budget;
use crate::tier::{IoMode, IoVec};
use crate::volume::{ChunkRef, VolumeError, VolumeReader, VolumeResult};

mod boot_profile;
mod fetch;
mod hot_set;
mod link_speed;
pub use fetch::SPECULATIVE_BYTES;
mod lease;
mod metadata;
mod part;
mod stream;
pub use stream::{STREAM_AHEAD as FIRST_BOOT_AHEAD, WHOLE_BELOW as FIRST_BOOT_WHOLE_BELOW};
mod writeback;

use writeback::Writeback;
pub use writeback::{CacheMode, SyncStatus, UploadWatch, WritebackOptions};

type FetchResult = Result<ChunkBuf, SharedError>;
type SegmentResult = Result<(), SharedError>;

/// A volume error shared by every waiter of one flight.
#[derive(Clone, Debug)]
pub struct SharedError(pub Arc<VolumeError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// What waiters of a flight get when the store closes under it.
fn closing() -> SharedError {
    SharedError(Arc::new(VolumeError::Cancelled("fetch was cancelled: the store is closing")))
}

impl SharedError {
    fn into_io(self) -> io::Error {
        let kind = match &*self.0 {
            VolumeError::CorruptChunk { .. }
            | VolumeError::CorruptIndex { .. }
            | VolumeError::CorruptManifest { .. }
            | VolumeError::CorruptProfile { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// What a missed piece waits for.
enum Pending {
    Chunk(Flight<FetchResult>),
    Segments(Vec<Flight<SegmentResult>>),
    /// Only the chunk's sub-frames the piece needs (`part.rs`).
    Part(Flight<SegmentResult>),
}

/// One chunk's share of a request.
#[derive(Clone, Copy)]
struct Piece {
    idx: u64,
    /// Offset inside the chunk.
    off: usize,
    /// Offset inside the request's buffers.
    buf_off: usize,
    len: usize,
}

/// Inline: a request spans one chunk or two, and the hit path never allocates.
type Pieces = smallvec::SmallVec<[Piece; 4]>;

fn pieces(offset: u64, len: usize, cs: u64) -> Pieces {
    let mut out = Pieces::new();
    let mut done = 0usize;
    while done < len {
        let pos = offset + done as u64;
        let idx = pos / cs;
        let off = (pos % cs) as usize;
        let n = (cs as usize - off).min(len - done);
        out.push(Piece { idx, off, buf_off: done, len: n });
        done += n;
    }
    out
}

struct Inner {
    vol: Arc<VolumeReader>,
    handle: Handle,
    ram: RamCache,
    ssd: SsdCache,
    flights: SingleFlight<u64, FetchResult>,
    counters: Counters,
    fetch_sem: Semaphore,
    /// Guest misses first; speculative fetches within a byte budget.
    lanes: fetch::Lanes,
    /// Bytes the guest read (hits and misses): what bounds the first
    /// boot's stream.
    guest_bytes: super::stats::Striped,
    /// The first boot's stream of dense regions (no profile yet).
    dense: stream::Dense,
    /// Guest misses waiting right now; hydration pauses while any are.
    demand: AtomicUsize,
    readahead: Readahead,
    read_only: bool,
    closed: AtomicBool,
    cs: u64,
    ram_cap: u64,
    chunks_zero: u64,
    hydrate_concurrency: usize,
    /// Boot profile being recorded (None: recording is off).
    recorder: Option<Recorder>,
    /// Boot profile being replayed, once found.
    replay: RwLock<Option<Arc<Replay>>>,
    /// Profile segments being fetched (single flight per segment).
    segment_flights: SingleFlight<usize, SegmentResult>,
    /// Parts of chunks being fetched: (chunk, first sub-frame, end).
    part_flights: SingleFlight<(u64, u64, u64), SegmentResult>,
    /// The run of sub-frames a first guest miss sent for, per chunk
    /// (`part.rs`): a later miss inside it joins it, one elsewhere in the
    /// chunk fetches the rest.
    part_runs: parking_lot::Mutex<std::collections::HashMap<u64, (u64, u64)>>,
    /// The profile is streaming now.
    streaming: AtomicBool,
    boot_mode: BootProfileMode,
    /// A recorded profile is being built and sealed now.
    saving: AtomicBool,
    /// Write-back of local changes (None when read-only).
    writeback: Option<Writeback>,
    /// The writer lease, once taken.
    lease: parking_lot::Mutex<Option<Arc<crate::volume::lease::LeaseHolder>>>,
    /// Why this store no longer holds the lease it took: another host
    /// committed past the generation it serves (`lease::lease_loop`).
    lease_lost: parking_lot::Mutex<Option<String>>,
    /// How long guest requests wait on the remote.
    remote_wait: RemoteWait,
    /// `close` has saved (or given up on) the boot profile.
    profile_closed: AtomicBool,
    /// The lease's state was written at stop (`close`): the drop after it
    /// must not write it again.
    lease_finished: AtomicBool,
    /// The guest's hot set (pinned chunks and the boot profile's) and the
    /// pinned part of it.
    hot: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
    pinned: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
    /// A hot SSD chunk is being copied into RAM (one at a time).
    promoting: AtomicBool,
    /// Why the last hydration left chunks out (its first failed fetch).
    hydrate_error: parking_lot::Mutex<Option<String>>,
    /// Metadata chunks the background prefetch has yet to pin.
    metadata_pending: std::sync::atomic::AtomicU64,
}

/// Bytes a second copied from the SSD tier into a full RAM tier, or
/// refused by it (see `Inner::promote`).
const PROMOTE_FULL_RATE: u64 = 64 << 20;

/// How often a daemon looks whether its cache's disk has less than
/// `--ssd-min-free` free (a statvfs) and evicts clean chunks if so; the
/// state map is persisted every eighth look (2 s).
const DISK_SWEEP_EVERY: Duration = Duration::from_millis(250);

/// The least time `close` gives the lease's last record and the sealing
/// of the boot profile (local work), even after a final sync that used up
/// its whole timeout.
pub const PROFILE_SAVE_MIN: Duration = Duration::from_secs(10);

/// The most `close` waits for a sealed boot profile's upload: a profile is
/// a speed-up, so a shutdown never waits on it longer than this (a 600 MB
/// profile on a 10 Mbit/s uplink is 8 minutes); what does not go up in
/// time stays sealed in the cache directory and goes up at the next start.
pub const PROFILE_UPLOAD_AT_CLOSE: Duration = Duration::from_secs(5);

/// The tiered RAM/SSD/remote store of one volume.
pub struct TieredStore {
    inner: Arc<Inner>,
    rt: Option<Runtime>,
    opened: Opened,
}

impl TieredStore {
    /// Builds the store over an opened volume. `rt` becomes the store's
    /// runtime (fetches, readahead, hydration, periodic state persists).
    pub fn new(rt: Runtime, vol: Arc<VolumeReader>, opts: &CacheOptions) -> VolumeResult<Self> {
        let cs = vol.chunk_size();
        if opts.hydrate && opts.ssd_cache < vol.image_len() {
            return Err(VolumeError::InvalidOptions(format!(
                "hydrate needs an SSD cache at least as large as the image ({} bytes), but ssd_cache is {}",
                vol.image_len(),
                opts.ssd_cache
            )));
        }
        let id = CacheIdentity { volume_id: vol.header.volume_id.clone(), chunk_size: cs };
        let sealing = if opts.encrypt_cache {
            Sealing::Sealed(vol.key.clone().ok_or_else(|| {
                VolumeError::InvalidOptions(format!(
                    "--encrypt-cache needs an encrypted volume (its cache key derives from the volume's data key), \
                     and {} is not encrypted: import it with --encrypt, or serve without --encrypt-cache",
                    vol.url
                ))
            })?)
        } else {
            // An encrypted cache stays encrypted (sync, hydrate, a serve
            // without the flag): never silently back to plaintext.
            Sealing::AsFound(vol.key.clone())
        };
        let (ssd, opened) = SsdCache::open_sealed(
            &opts.cache_dir,
            id,
            vol.generation(),
            vol.image_len(),
            opts.ssd_cache,
            OpenMode::Serve,
            &sealing,
        )?
        .ok_or_else(|| VolumeError::Cache { dir: opts.cache_dir.clone(), reason: "could not be opened".into() })?;
        let ssd_sealed = ssd.is_sealed();
        if let Some(m) = opts.ssd_min_free {
            ssd.set_min_free(m);
        }
        // Clean data gives way when the cache's disk fills, but changes not
        // uploaded yet cannot: a disk they fill fails the guest's writes.
        if let Some(free) = ssd.disk_free().filter(|&f| f.saturating_add(ssd.cached_bytes()) < opts.ssd_cache) {
            tracing::warn!(
                dir = %opts.cache_dir.display(),
                free_mib = free >> 20,
                held_mib = ssd.cached_bytes() >> 20,
                cap_mib = opts.ssd_cache >> 20,
                "the SSD cache's cap does not fit on its disk: clean data gives way when the disk fills, but \
                 changes not uploaded yet fill it for good (guest writes then fail); lower --ssd-cache \
                 (ssd_cache) or free space there"
            );
        }
        // A FLUSH in write-back is durable in the cache directory, which a
        // file system in memory keeps only until the host goes down.
        if opts.writeback.mode == CacheMode::Writeback && !opts.read_only && !opts.ephemeral {
            if let (fs, true) = ssd.file_system() {
                tracing::warn!(
                    dir = %opts.cache_dir.display(),
                    "the cache directory is on {fs}, in memory: what the guest flushed is kept there until it is \
                     uploaded, and a reboot or power loss of this host loses it; serve with --cache writethrough \
                     (a FLUSH waits for the remote), or with a --cache-dir on a disk"
                );
            }
        }
        // Profile packs a crashed process was building (the directory lock
        // is ours now, so nobody else is).
        if let Ok(entries) = std::fs::read_dir(&opts.cache_dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".profile-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if let Opened::Discarded(why) = &opened {
            tracing::info!(dir = %opts.cache_dir.display(), %why, "started a fresh SSD cache");
        }
        let chunks_zero = (0..vol.chunk_count()).filter(|&i| vol.chunk_ref(i) == ChunkRef::Zero).count() as u64;
        let inner = Arc::new(Inner {
            handle: rt.handle().clone(),
            ram: RamCache::new(opts.ram_cache, cs),
            ssd,
            flights: SingleFlight::default(),
            counters: Counters::default(),
            fetch_sem: Semaphore::new(opts.fetch_concurrency.max(1)),
            lanes: fetch::Lanes::new(opts.speculative_bytes, cs),
            guest_bytes: Default::default(),
            dense: stream::Dense::new(
                opts.boot_profile != BootProfileMode::Off && !opts.hydrate,
                opts.first_boot_whole_below,
                opts.first_boot_ahead,
            ),
            demand: AtomicUsize::new(0),
            readahead: Readahead::new(cs, opts.readahead_chunks),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            cs,
            ram_cap: opts.ram_cache,
            chunks_zero,
            hydrate_concurrency: opts.hydrate_concurrency.max(1),
            // An ephemeral fleet member replays the volume's profile but
            // writes nothing to the volume, profiles included; so does a
            // read-only serve (a second machine watching, viewer-only Drive
            // access, read-only S3 keys) unless asked to record
            // (`--boot-profile record`: a read-only golden image's first
            // boot recording the fleet's profile).
            recorder: (opts.boot_profile != BootProfileMode::Off
                && !vol.offline
                && !opts.ephemeral
                && (!opts.read_only || opts.boot_profile == BootProfileMode::Record))
                .then(|| Recorder::new(vol.image_len(), opts.boot_profile_window)),
            replay: RwLock::new(None),
            segment_flights: SingleFlight::default(),
            part_flights: SingleFlight::default(),
            part_runs: Default::default(),
            streaming: AtomicBool::new(false),
            boot_mode: opts.boot_profile,
            saving: AtomicBool::new(false),
            writeback: if opts.read_only || opts.ephemeral {
                None
            } else {
                Some(
                    Writeback::new(&opts.cache_dir, opts.writeback.clone(), ssd_sealed)
                        .map_err(|e| VolumeError::io("opening write-back state in", &opts.cache_dir, e))?,
                )
            },
            remote_wait: opts.remote_wait,
            profile_closed: AtomicBool::new(false),
            lease_finished: AtomicBool::new(false),
            hot: Default::default(),
            pinned: Default::default(),
            promoting: AtomicBool::new(false),
            hydrate_error: Default::default(),
            metadata_pending: Default::default(),
            vol,
            lease: parking_lot::Mutex::new(None),
            lease_lost: parking_lot::Mutex::new(None),
        });
        rt.block_on(inner.clone().catch_up_generation())?;
        if inner.writeback.is_some() {
            match opts.lease {
                LeaseMode::OnCommit => {}
                _ if inner.vol.offline => tracing::warn!(
                    "remote unreachable: the writer lease will be taken before the first upload (if another host \
                     took it meanwhile, the changes made here are kept and fork)"
                ),
                m => {
                    rt.block_on(inner.clone().take_lease(m == LeaseMode::Force, false))?;
                }
            }
        }
        if inner.writeback.is_some() {
            inner.load_uploaded();
            rt.spawn(inner.clone().writeback_loop());
            // Changes left by an earlier run (a crash, a stop that could not
            // finish its sync) go up now; no guest is attached yet, so the
            // disk is consistent as it stands.
            inner.cut();
        }
        if opts.boot_profile != BootProfileMode::Off && !inner.vol.offline {
            rt.spawn(inner.clone().boot_profile());
        }
        rt.spawn(inner.clone().prefetch_indexes());
        // Clean chunks fetched since the last flush are recorded every few
        // seconds, so a restart after a crash still finds most of them.
        let bg = inner.clone();
        rt.spawn(async move {
            let mut ticks = 0u64;
            while !bg.closed.load(Ordering::Relaxed) {
                tokio::time::sleep(DISK_SWEEP_EVERY).await;
                ticks += 1;
                if ticks % 8 == 0 && bg.ssd.needs_persist() {
                    let me = bg.clone();
                    let _ = tokio::task::spawn_blocking(move || me.ssd.persist()).await;
                }
                // Another daemon's cache on this disk may be filling it with
                // changes that cannot give way: clean data here does, within
                // a quarter of a second (a guest write there that finds the
                // disk full waits that long for it, rather than failing).
                let me = bg.clone();
                match tokio::task::spawn_blocking(move || me.ssd.keep_disk_free()).await {
                    Ok(Ok(0)) | Err(_) => {}
                    Ok(Ok(n)) => {
                        // A hydrated cache no longer holds everything.
                        bg.counters.hydrate_complete.store(false, Ordering::SeqCst);
                        tracing::info!(
                            chunks = n,
                            min_free_mib = bg.ssd.min_free() >> 20,
                            "the cache's disk is nearly full: evicted clean chunks to keep room for changes not uploaded \
                             yet"
                        )
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not evict clean chunks from a nearly full cache disk"),
                }
            }
        });
        // A cache hydrated earlier (`driveblk hydrate`) holds everything.
        if (0..inner.ssd.chunk_count()).all(|i| inner.ssd.has_chunk(i) || inner.is_zero(i)) {
            inner.counters.hydrate_complete.store(true, Ordering::SeqCst);
        }
        match Pins::load(&opts.cache_dir) {
            Ok(p) if !p.is_empty() => {
                inner.counters.pinning.fetch_add(1, Ordering::SeqCst);
                rt.spawn(inner.clone().apply_pins(p));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ignoring the cache's pinned ranges"),
        }
        let store = Self { inner, rt: Some(rt), opened };
        if opts.hydrate {
            store.start_hydrate();
        }
        Ok(store)
    }

    /// What was found in the cache directory at open.
    pub fn cache_opened(&self) -> &Opened {
        &self.opened
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TierStats {
        let i = &self.inner;
        let c = &i.counters;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        // Before the counts: when no run is pinning, the counts are final.
        let pinning = c.pinning.load(Ordering::SeqCst) > 0;
        let (hot_chunks, hot_local, pinned_chunks, pinned_local) = i.hot_counts();
        let offline_ready = if c.hydrate_complete.load(Ordering::Relaxed) {
            Some(true)
        } else if hot_chunks > 0 {
            Some(hot_local == hot_chunks)
        } else {
            None
        };
        TierStats {
            hot_chunks,
            hot_local,
            pinned_chunks,
            pinned_local,
            pinning,
            offline_ready,
            volume_id: i.vol.header.volume_id.clone(),
            generation: i.vol.generation(),
            image_len: i.ssd.len(),
            chunk_size: i.cs,
            chunks_total: i.ssd.chunk_count(),
            chunks_cached: i.ssd.cached_chunks(),
            chunks_dirty: i.ssd.dirty_chunks(),
            chunks_pinned: i.ram.pinned_count(),
            chunks_zero: i.chunks_zero,
            ram_bytes: i.ram.bytes(),
            ram_cap: i.ram_cap,
            ssd_bytes: i.ssd.cached_bytes(),
            ssd_cap: i.ssd.cap(),
            ssd_free: i.ssd.disk_free(),
            ssd_min_free: i.ssd.min_free(),
            ram_hits: c.ram_hits.get(),
            ssd_hits: c.ssd_hits.get(),
            zero_hits: c.zero_hits.get(),
            ram_promotions: l(&c.ram_promotions),
            misses: l(&c.misses),
            guest_wait_ms: c.guest_wait.lock().total(std::time::Instant::now()).as_millis() as u64,
            remote_fetches: l(&c.remote_fetches),
            remote_bytes: l(&c.remote_bytes),
            bytes_miss: i.lanes.bytes(fetch::Source::Miss),
            bytes_profile: i.lanes.bytes(fetch::Source::Profile),
            bytes_readahead: i.lanes.bytes(fetch::Source::Readahead),
            bytes_hydrate: i.lanes.bytes(fetch::Source::Hydrate),
            bytes_stream: i.lanes.bytes(fetch::Source::Stream),
            bytes_index: i.lanes.bytes(fetch::Source::Index),
            speculative_budget: i.lanes.budget(),
            part_fetches: l(&c.part_fetches),
            fetch_errors: l(&c.fetch_errors),
            remote_timeouts: l(&c.remote_timeouts),
            readahead_chunks: l(&c.readahead_chunks),
            ssd_evictions: i.ssd.evictions(),
            hydrating: c.hydrating.load(Ordering::Relaxed),
            hydrate_total: l(&c.hydrate_total),
            hydrate_done: l(&c.hydrate_done),
            hydrated: c.hydrate_complete.load(Ordering::Relaxed),
            offline: i.vol.offline,
            chunks_partial: i.ssd.partial_chunks(),
            profile_recording: i.recorder.as_ref().is_some_and(|r| r.active()),
            profile_recorded_bytes: i.recorder.as_ref().map_or(0, |r| r.bytes()),
            profile_saved: l(&c.profile_saved),
            profile_segments: l(&c.profile_segments),
            profile_segments_done: l(&c.profile_segments_done),
            profile_bytes: l(&c.profile_bytes),
            profile_waits: l(&c.profile_waits),
            profile_ahead: l(&c.profile_ahead),
            profile_rejected: l(&c.profile_rejected),
            dirty_bytes: i.ssd.dirty_data_chunks() * i.cs,
            sync: i.sync_status(),
        }
    }

    /// Stops the store's background work and uploads what is left: cuts a
    /// final generation and waits up to `timeout` for it to be committed.
    /// Returns the bytes of local changes still not on the remote (they
    /// stay in the cache and go up at the next start). Call after the disk
    /// was flushed and closed, before dropping the store.
    ///
    /// Then the boot recorded so far is saved as a profile, within what is
    /// left of `timeout` (at least [`PROFILE_SAVE_MIN`]): a profile is a
    /// speed-up, never worth holding a shutdown on a hung remote. Dropping
    /// the store without closing it does no network I/O at all.
    pub fn close(&self, timeout: Duration) -> u64 {
        let t0 = std::time::Instant::now();
        let left = self.inner.final_sync(timeout);
        if left > 0 {
            // The upload cut short resumes at the next start, with the
            // changed pages known (patches, not whole chunks).
            self.inner.save_uploaded();
            if let Err(e) = self.inner.ssd.keep_dirty_pages() {
                tracing::warn!(error = %e, "could not record which pages changed: the next start uploads whole chunks");
            }
        }
        let me = self.inner.clone();
        let lease_time = timeout.saturating_sub(t0.elapsed()).max(PROFILE_SAVE_MIN);
        if let Ok(Err(_)) =
            self.inner.wait(async move { tokio::time::timeout(lease_time, me.finish_lease(left)).await })
        {
            tracing::warn!("could not record the lease's state on the remote in time (it stands until the next start)");
        }
        if let Some(c) = self.diverged() {
            tracing::error!(
                bytes = left,
                conflict = %c,
                "local changes not uploaded: the volume moved on without them, so they never go up as they are; \
                 they stay in the cache directory {dir}: save them as a new volume with `driveblk fork URL NEWURL \
                 --cache-dir {dir}`, export them with `driveblk export URL FILE --cache-dir {dir}`, or drop them \
                 with `driveblk discard-local URL --cache-dir {dir}`",
                dir = self.inner.ssd.dir().display()
            );
        } else if left > 0 {
            tracing::warn!(
                bytes = left,
                "local changes not uploaded yet; they stay in the cache directory and are uploaded at the next start"
            );
        }
        self.save_profile_at_close(timeout.saturating_sub(t0.elapsed()).max(PROFILE_SAVE_MIN));
        left
    }

    /// Saves the boot recorded so far as a profile (a boot shorter than the
    /// recording window still leaves one): seals it in the cache directory
    /// within `limit` (local work), then gives its upload at most
    /// [`PROFILE_UPLOAD_AT_CLOSE`]. An upload not done by then (this one,
    /// or one the recording window started) resumes at the next start.
    fn save_profile_at_close(&self, limit: Duration) {
        let inner = &self.inner;
        if inner.profile_closed.swap(true, Ordering::SeqCst) || Handle::try_current().is_ok() {
            return;
        }
        let deadline = std::time::Instant::now() + limit;
        // A seal the window started in the background finishes first.
        while inner.saving.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let recorded = inner.recorder.as_ref().map_or(0, |r| r.bytes());
        if recorded == 0 || inner.saving.load(Ordering::SeqCst) {
            return;
        }
        // The cache state first: an impatient second signal during the
        // upload then loses nothing but the profile.
        if let Err(e) = inner.ssd.persist() {
            tracing::warn!(error = %e, "could not persist the SSD cache state");
        }
        tracing::info!(
            bytes = recorded,
            "closing: saving the boot recorded so far as a profile unless the volume's still matches it (a second SIGTERM/SIGINT skips this)"
        );
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let me = inner.clone();
        let sealed = match inner.wait(async move { tokio::time::timeout(left, me.seal_profile()).await }) {
            Ok(Ok(p)) => p,
            _ => {
                tracing::warn!(seconds = limit.as_secs(), "boot profile not saved: building it took too long");
                return;
            }
        };
        let Some(p) = sealed else { return };
        let key = p.key.clone();
        let me = inner.clone();
        if let Ok(Err(_)) =
            inner.wait(async move { tokio::time::timeout(PROFILE_UPLOAD_AT_CLOSE, me.upload_pending(p)).await })
        {
            tracing::info!(
                profile = %key,
                "the boot profile's upload did not finish at shutdown; it stays sealed in the cache directory and goes up at the next start"
            );
        }
    }

    /// Asks write-back to cut a generation as soon as the disk is
    /// consistent (now if the guest is idle since its last FLUSH, else at
    /// its next FLUSH), whatever the sync interval.
    pub fn request_sync(&self) {
        self.inner.request_sync();
    }

    /// The volume's cache directory.
    pub fn cache_dir(&self) -> &std::path::Path {
        self.inner.ssd.dir()
    }

    /// Why write-back stopped for good: the volume moved on under this
    /// cache's changes (another host committed, or took the lease).
    pub fn diverged(&self) -> Option<String> {
        self.sync_status().and_then(|s| s.conflict)
    }

    /// Write-back status (None when the store is read-only).
    pub fn sync_status(&self) -> Option<SyncStatus> {
        self.inner.sync_status()
    }

    /// Tells a wait for uploads when nothing can go up (see
    /// [`UploadWatch`]), with this store's remote budget.
    pub fn upload_watch(&self) -> UploadWatch {
        UploadWatch::new(self.inner.remote_wait.budget)
    }

    /// Cuts a generation of everything written so far and waits up to
    /// `timeout` for it to be committed (the disk must be consistent: no
    /// guest attached, or right after a flush). Returns whether nothing
    /// is left to upload.
    pub fn sync_now(&self, timeout: Duration) -> bool {
        self.inner.final_sync(timeout) == 0
    }

    /// The writer lease this store holds (None: read-only, or not taken).
    pub fn lease(&self) -> Option<crate::volume::format::LeaseRecord> {
        self.inner.lease.lock().as_ref().map(|h| h.record())
    }

    /// Why this store lost the writer lease it held (another host took it
    /// and committed), if it did.
    pub fn lease_lost(&self) -> Option<String> {
        self.inner.lease_lost.lock().clone()
    }

    /// Drops the clean data of the RAM and SSD tiers (local changes and
    /// pinned metadata stay); later reads fetch it again. Returns the RAM
    /// bytes and SSD chunks dropped.
    pub fn drop_clean(&self) -> io::Result<(u64, u64)> {
        // A first boot's stream would fill the cache again.
        self.inner.dense.stop();
        let ram = self.inner.ram.clear();
        let ssd = self.inner.ssd.drop_clean()?;
        // Hydration's "complete" no longer holds.
        self.inner.counters.hydrate_complete.store(false, Ordering::SeqCst);
        Ok((ram, ssd))
    }

    /// The volume being served.
    pub fn volume(&self) -> &VolumeReader {
        &self.inner.vol
    }

    /// True when the SSD cache's files are kept encrypted (`--encrypt-cache`,
    /// or a cache that was encrypted before).
    pub fn cache_encrypted(&self) -> bool {
        self.inner.ssd.is_sealed()
    }

    /// Runs `f` (a call on the volume's remote) to completion on the
    /// store's runtime, from a thread outside it. The remote's HTTP
    /// connections belong to this runtime: a runtime made for one call and
    /// dropped after would leave its pooled connection dead for the next.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.handle.block_on(f)
    }

    /// Pins more of the image (saved in the cache directory, so every start
    /// keeps it): its chunks are fetched whole in the background and never
    /// evicted, behind any guest miss; callable while the store serves a
    /// guest. See [`wait_pinned`](Self::wait_pinned).
    pub fn pin(&self, more: &Pins) -> VolumeResult<()> {
        let dir = self.inner.ssd.dir().to_path_buf();
        let mut pins = Pins::load(&dir).map_err(|e| VolumeError::io("reading pins in", &dir, e))?;
        pins.merge(more);
        pins.save(&dir).map_err(|e| VolumeError::io("saving pins in", &dir, e))?;
        self.inner.counters.pinning.fetch_add(1, Ordering::SeqCst);
        self.inner.handle.spawn(self.inner.clone().apply_pins(pins));
        Ok(())
    }

    /// Waits until the pinned chunks are fetched (or `timeout` passes);
    /// returns whether every pinned chunk is local.
    pub fn wait_pinned(&self, timeout: Duration, progress: bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let bar = crate::volume::progress::bar(progress, 0, "pin");
        loop {
            let s = self.stats();
            bar.set_length(s.pinned_chunks);
            bar.set_position(s.pinned_local);
            if !s.pinning || std::time::Instant::now() >= deadline {
                bar.finish_and_clear();
                return s.pinned_local == s.pinned_chunks;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts background hydration (no-op if already running).
    pub fn start_hydrate(&self) {
        if self.inner.counters.hydrating.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.inner.hydrate_error.lock() = None;
        let me = self.inner.clone();
        self.inner.handle.spawn(me.hydrate());
    }

    /// Why the last hydration left chunks out (None: it did not, or
    /// none ended yet).
    pub fn hydrate_error(&self) -> Option<String> {
        self.inner.hydrate_error.lock().clone()
    }

    /// Blocks until background hydration finishes or `timeout` passes, with
    /// a progress bar on stderr when `progress`. Returns true when every
    /// chunk is local.
    pub fn wait_hydrated(&self, timeout: Duration, progress: bool) -> bool {
        let bar = crate::volume::progress::bar(progress, self.stats().hydrate_total, "hydrate");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.stats();
            bar.set_length(s.hydrate_total);
            bar.set_position(s.hydrate_done);
            if !s.hydrating || std::time::Instant::now() >= deadline {
                bar.finish_and_clear();
                return s.hydrated;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TieredStore {
    /// Local work only (no network I/O here: [`close`](Self::close) is the
    /// step that uploads): stops the background tasks, persists the cache
    /// state and releases the cache directory.
    fn drop(&mut self) {
        if !self.inner.profile_closed.load(Ordering::SeqCst)
            && self.inner.recorder.as_ref().is_some_and(|r| r.bytes() > 0)
        {
            tracing::debug!("store dropped without close(): the boot recorded so far is not saved");
        }
        // A store dropped without `close` (an error path, a library
        // caller) still releases the lease when nothing is pending, or
        // records what is.
        // Bounded: a hung remote leaves the lease standing, as a crash would.
        if self.rt.is_some() && Handle::try_current().is_err() && self.inner.lease.lock().is_some() {
            let left = self.inner.pending_bytes();
            let me = self.inner.clone();
            let _ = self
                .inner
                .wait(async move { tokio::time::timeout(Duration::from_secs(5), me.finish_lease(left)).await });
        }
        self.inner.closed.store(true, Ordering::SeqCst);
        // Stop the tasks first (fetches, readahead, hydration), so nothing
        // installs chunks behind the final persist.
        if let Some(rt) = self.rt.take() {
            if Handle::try_current().is_ok() {
                // Dropped inside some async context, where blocking on the
                // shutdown is not allowed.
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
        if let Err(e) = self.inner.ssd.persist() {
            tracing::warn!(error = %e, "could not persist the SSD cache state at close");
        }
        // Release the directory now, even if a task abandoned by a
        // background shutdown still holds a reference for a moment.
        self.inner.ssd.unlock();
    }
}

/// What [`Inner::install`] found the chunk's content to be.
enum Installed {
    /// The fetched bytes (kept in the tiers, or already there).
    Fetched,
    /// Local bytes: the chunk holds changes not in the fetched version.
    Local(ChunkBuf),
    /// Neither: a commit replaced the chunk since the fetch began; fetch
    /// again.
    Stale,
}

impl Inner {
    /// Write-back status (None when read-only). The age of the newest
    /// commit is wall-clock time since its generation's commit record: an
    /// `Instant` stops while the host is suspended (a laptop's lid), and a
    /// restarted daemon knows the age from the start.
    fn sync_status(&self) -> Option<SyncStatus> {
        let mut s = self.writeback.as_ref()?.status();
        let now = crate::volume::lease::local_now_ms();
        s.since_commit_secs = self.vol.manifest().writer.as_ref().map(|w| now.saturating_sub(w.unix_ms) / 1000);
        s.bytes_sent = self.vol.remote.bytes_sent();
        Some(s)
    }

    fn is_zero(&self, idx: u64) -> bool {
        self.vol.chunk_ref(idx) == ChunkRef::Zero
    }

    fn zero_buf(&self) -> ChunkBuf {
        Arc::new(RwLock::new(vec![0u8; self.cs as usize]))
    }

    /// Serves a piece from RAM, SSD or a known-zero chunk. Ok(false) means
    /// it has to come from the remote.
    ///
    /// In [`IoMode::NonBlocking`] no lock is waited for: a RAM shard or an
    /// SSD stripe held by another thread (across an fsync, an eviction, a
    /// hole punch) makes it `WouldBlock`, and a worker thread retries.
    fn serve_local(self: &Arc<Self>, p: Piece, buf: &IoVec<'_>, mode: IoMode) -> io::Result<bool> {
        let would_block = || io::Error::from(io::ErrorKind::WouldBlock);
        let in_ram = match mode {
            IoMode::NonBlocking => self
                .ram
                .try_read_with(p.idx, |data| buf.copy_from_slice(0, &data[p.off..p.off + p.len]))
                .map_err(|_| would_block())?
                .is_some(),
            IoMode::Blocking => match self.ram.get(p.idx) {
                Some(b) => {
                    buf.copy_from_slice(0, &b.read()[p.off..p.off + p.len]);
                    true
                }
                None => false,
            },
        };
        if in_ram {
            self.counters.ram_hits.inc();
            return Ok(true);
        }
        let _g = match mode {
            IoMode::NonBlocking => self.ssd.try_lock_read(p.idx).ok_or_else(would_block)?,
            IoMode::Blocking => self.ssd.lock_read(p.idx),
        };
        if self.ssd.has_pages(p.idx, p.off as u64, p.len as u64) {
            if self.ssd.read(p.idx, p.off as u64, buf, mode)? && self.ram_cap > 0 {
                self.promote(p.idx);
            }
            self.counters.ssd_hits.inc();
            return Ok(true);
        }
        // A zero chunk with pages written is not zero: it is completed
        // (with zeroes) by the flight, then read from the SSD tier.
        if self.is_zero(p.idx) && self.ssd.state(p.idx) != DIRTY_PARTIAL {
            buf.fill_zero(0, p.len);
            self.counters.zero_hits.inc();
            return Ok(true);
        }
        Ok(false)
    }

    /// Copies a hot SSD chunk (read again since eviction last passed it)
    /// into the RAM tier, in the background, one chunk at a time. While
    /// the RAM tier has room chunks follow each other at once. Once it is
    /// full a copy must evict a chunk not read since the clock last passed
    /// (pinned metadata never), else it is not made: with reads spread
    /// evenly over more than RAM holds, every resident chunk is read again
    /// before a new one could outlast it, and the copy would be dropped at
    /// once. Either way the pace then drops to [`PROMOTE_FULL_RATE`]
    /// bytes a second: a working set larger than RAM must not churn it,
    /// nor spend the CPU (and the guest's latency) on copies.
    fn promote(self: &Arc<Self>, idx: u64) {
        if self.closed.load(Ordering::Relaxed) || self.promoting.swap(true, Ordering::Acquire) {
            return;
        }
        let me = self.clone();
        self.handle.spawn_blocking(move || {
            let admit = me.ram.admit(idx);
            if admit != Admit::Refused {
                // Under the stripe lock: a write to the chunk (which updates
                // a RAM copy) cannot land between the read and the insert.
                let _g = me.ssd.lock_read(idx);
                if me.ssd.has_chunk(idx) && me.ram.get(idx).is_none() {
                    if let Ok(v) = me.ssd.read_chunk(idx) {
                        me.ram.insert(idx, Arc::new(RwLock::new(v)));
                        Counters::inc(&me.counters.ram_promotions);
                    }
                }
            }
            if admit != Admit::Room {
                std::thread::sleep(Duration::from_secs_f64(me.cs as f64 / PROMOTE_FULL_RATE as f64));
            }
            me.promoting.store(false, Ordering::Release);
        });
    }

    /// The single flight fetching chunk `idx` (joining one that runs) as
    /// speculative work for `src`.
    fn flight(self: &Arc<Self>, idx: u64, to_ram: bool, src: fetch::Source) -> Flight<FetchResult> {
        let me = self.clone();
        self.flights.join_as(
            &self.handle,
            idx,
            false,
            move |u| me.fetch_and_install(idx, to_ram, src, u),
            || Err(closing()),
        )
    }

    /// The single flight fetching chunk `idx` for a guest request: when
    /// it starts the flight, the flight's remote calls keep to the guest's
    /// budget (a flight readahead started keeps its own patience; the
    /// guest still stops waiting at its budget).
    fn guest_flight(self: &Arc<Self>, idx: u64, to_ram: bool) -> Flight<FetchResult> {
        let me = self.clone();
        let budget = self.remote_wait.call_budget();
        self.flights.join_as(
            &self.handle,
            idx,
            true,
            move |u| within_budget(budget, me.fetch_and_install(idx, to_ram, fetch::Source::Miss, u)),
            || Err(closing()),
        )
    }

    /// When a guest request that starts waiting on the remote now must be
    /// answered: however many fetches it then waits on in turn (a part,
    /// its own sub-frames again, the chunk), it fails at this one deadline.
    fn guest_deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + self.remote_wait.budget
    }

    /// Waits, for a guest request, on work that may need the remote: until
    /// the request's `deadline` (see [`guest_deadline`](Self::guest_deadline)),
    /// then the request fails (TimedOut, which the device reports as an I/O
    /// error) instead of hanging the guest.
    fn wait_guest<T: Send + 'static>(
        &self,
        deadline: std::time::Instant,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> io::Result<T> {
        let budget = self.remote_wait.budget;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // A future already done is still taken (timeout polls it first).
        self.wait(async move { tokio::time::timeout(left, fut).await })?.map_err(|_| {
            Counters::inc(&self.counters.remote_timeouts);
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the remote did not answer within {} s (--remote-wait)", budget.as_secs_f64()),
            )
        })
    }

    /// The whole chunk: from RAM or SSD when it is already local (the
    /// flight may have started just after another one installed it),
    /// otherwise fetched, verified and installed in SSD (and RAM).
    async fn fetch_and_install(
        self: Arc<Self>,
        idx: u64,
        to_ram: bool,
        src: fetch::Source,
        urgency: Arc<Urgency>,
    ) -> FetchResult {
        if let Some(b) = self.ram.get(idx) {
            return Ok(b);
        }
        if self.ssd.has_chunk(idx) {
            let me = self.clone();
            let local = tokio::task::spawn_blocking(move || {
                let _g = me.ssd.lock_read(idx);
                if me.ssd.has_chunk(idx) {
                    me.ssd.read_chunk(idx).map(Some)
                } else {
                    Ok(None)
                }
            })
            .await;
            if let Ok(Ok(Some(v))) = local {
                return Ok(Arc::new(RwLock::new(v)));
            }
        }
        if self.is_zero(idx) {
            let buf = self.zero_buf();
            if self.ssd.state(idx) == DIRTY_PARTIAL {
                let me = self.clone();
                let b2 = buf.clone();
                let installed = tokio::task::spawn_blocking(move || me.install(idx, &b2, false, &ChunkRef::Zero)).await;
                match installed {
                    Ok(Ok(Installed::Local(local))) => return Ok(local),
                    Ok(Err(e)) => return Err(self.local_read_failed(idx, e)),
                    _ => {}
                }
            }
            return Ok(buf);
        }
        // Completing a partial chunk of sub-frames fetches only the
        // sub-frames it lacks (a guest that joins speculative work raises it).
        if self.ssd.state(idx) == super::ssd::PARTIAL
            && self.vol.part_ready(idx)
            && self.fetch_rest(idx, src, urgency.clone()).await.is_ok()
        {
            let me = self.clone();
            let local = tokio::task::spawn_blocking(move || {
                // The RAM copy goes in under the same lock as the read: a
                // write landing between them would not update a copy not yet
                // in RAM, which would then serve (and fill a later
                // read-modify-write with) the bytes from before it.
                let _g = me.ssd.lock_read(idx);
                if !me.ssd.has_chunk(idx) {
                    return Ok(None);
                }
                let buf: ChunkBuf = Arc::new(RwLock::new(me.ssd.read_chunk(idx)?));
                #[cfg(test)]
                tests::before_ram_insert(me.ssd.dir(), idx);
                if to_ram {
                    me.ram.insert(idx, buf.clone());
                }
                Ok::<_, io::Error>(Some(buf))
            })
            .await;
            if let Ok(Ok(Some(buf))) = local {
                return Ok(buf);
            }
        }
        // A generation committed while the fetch ran may have replaced
        // this chunk's reference: then the bytes are stale, fetch again.
        for attempt in 0.. {
            let fetched = {
                // Speculative work waits for its share of the link (or for
                // a guest to join it) before it takes a fetch slot.
                let wire = fetch::wire_len(&self.vol.chunk_ref(idx), self.vol.chunk_len(idx) as u64);
                let mut lane = self.lanes.admit(wire, &urgency).await;
                let _permit = self.fetch_sem.acquire().await;
                lane.started();
                let fetched = priority::speculative(urgency.mark(), self.vol.fetch_chunk(idx)).await;
                if let Ok(f) = &fetched {
                    lane.done(f.wire_bytes);
                }
                fetched
            };
            let fetched = fetched.map_err(|e| {
                Counters::inc(&self.counters.fetch_errors);
                tracing::warn!(chunk = idx, error = %e, "chunk fetch failed");
                SharedError(Arc::new(e))
            })?;
            Counters::inc(&self.counters.remote_fetches);
            self.counters.remote_bytes.fetch_add(fetched.wire_bytes, Ordering::Relaxed);
            // Counted by what started the fetch (a guest may have joined it).
            self.lanes.count(src, fetched.wire_bytes);
            let used = fetched.chunk_ref;
            let mut data = fetched.data;
            data.resize(self.cs as usize, 0);
            let buf: ChunkBuf = Arc::new(RwLock::new(data));
            let me = self.clone();
            let b2 = buf.clone();
            match tokio::task::spawn_blocking(move || me.install(idx, &b2, to_ram, &used)).await {
                // The chunk holds local changes: its content is not the
                // fetched bytes, and a reader that finds the chunk gone
                // from the tiers (committed and evicted meanwhile) copies
                // from what the flight returns.
                Ok(Ok(Installed::Local(local))) => return Ok(local),
                Ok(Ok(Installed::Fetched)) => return Ok(buf),
                Ok(Err(e)) => return Err(self.local_read_failed(idx, e)),
                _ if attempt >= 3 => return Ok(buf),
                _ => {}
            }
        }
        unreachable!("the loop returns")
    }

    /// The error of a flight whose chunk holds local changes that could not
    /// be read back.
    fn local_read_failed(&self, idx: u64, e: io::Error) -> SharedError {
        tracing::warn!(chunk = idx, error = %e, "could not read a written chunk from the SSD cache");
        SharedError(Arc::new(VolumeError::io("reading a written chunk from", self.ssd.dir(), e)))
    }

    /// Puts a fetched chunk in the SSD tier (and RAM), unless a write made
    /// it local meanwhile — then the local copy is newer and wins, and is
    /// what this returns (read under the same lock). `Stale` when `used`,
    /// the reference the bytes were fetched by, is no longer the chunk's (a
    /// commit replaced it): nothing is kept then.
    /// Err when the local copy could not be read.
    fn install(&self, idx: u64, buf: &ChunkBuf, to_ram: bool, used: &ChunkRef) -> io::Result<Installed> {
        let _g = self.ssd.lock_write(idx);
        if !self.vol.chunk_ref(idx).same_bytes(used) {
            return Ok(Installed::Stale);
        }
        let state = self.ssd.state(idx);
        if state == DIRTY_PARTIAL {
            // Local changes in some pages: the fetched bytes fill only the
            // others (and never go to RAM as they are: they are not the
            // chunk's content).
            let content = self.ssd.read_chunk_over(idx, &buf.read())?;
            if let Err(e) = self.ssd.fill_missing(idx, &buf.read()) {
                tracing::warn!(chunk = idx, error = %e, "could not complete a partly written chunk in the SSD cache");
            }
            return Ok(Installed::Local(Arc::new(RwLock::new(content))));
        }
        if crate::tier::ssd::is_dirty(state) {
            return Ok(Installed::Local(Arc::new(RwLock::new(self.ssd.read_chunk(idx)?))));
        }
        if self.ssd.has_chunk(idx) {
            return Ok(Installed::Fetched);
        }
        if let Err(e) = self.ssd.install_clean(idx, &buf.read()) {
            // The read still succeeds from the fetched bytes; the cache just
            // does not keep them.
            tracing::warn!(chunk = idx, error = %e, "could not store a chunk in the SSD cache");
        }
        if to_ram {
            self.ram.insert(idx, buf.clone());
        }
        Ok(Installed::Fetched)
    }

    /// Runs `fut` on the store's runtime and blocks this (non-runtime)
    /// thread until it completes.
    fn wait<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| io::Error::other("tiered store runtime has shut down"))
    }

    fn start_readahead(self: &Arc<Self>, offset: u64, len: u64) {
        let ra = self.readahead.observe(offset, len);
        if ra.is_empty() {
            // Random I/O: nothing more to do (not even a manifest lookup).
            return;
        }
        // Readahead is speculative: past the boot's bound it waits with
        // the stream (misses then fetch only what they need).
        if !self.fetched_within_bound() {
            return;
        }
        let end = ra.end.min(self.vol.chunk_count());
        let replay = self.replay.read().clone();
        // A sequential read of pages the profile holds is the recorded boot
        // reading a file the profile brings; what lies past it that boot
        // did not read, so reading it ahead would only take the link from
        // the profile (on a big disk, the bytes after most files).
        let last = offset + len - 1;
        if replay.as_ref().is_some_and(|r| r.covering(last / self.cs, last % self.cs, 1).is_some()) {
            return;
        }
        let replay = replay.filter(|_| self.streaming.load(Ordering::Relaxed));
        for idx in ra.start..end {
            // The profile brings the pages the boot reads; a whole chunk
            // read ahead for them would compete with it for the link.
            if replay.as_ref().is_some_and(|r| r.usable(idx)) {
                continue;
            }
            if self.ram.get(idx).is_none() && !self.ssd.has_chunk(idx) && !self.is_zero(idx) {
                Counters::inc(&self.counters.readahead_chunks);
                drop(self.flight(idx, true, fetch::Source::Readahead));
            }
        }
    }

    fn read(self: &Arc<Self>, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        let total = bufs.len();
        if total == 0 {
            return Ok(());
        }
        let len = self.ssd.len();
        // Bytes at or past the end read as zeroes.
        let inside = len.saturating_sub(offset).min(total as u64) as usize;
        if inside < total {
            bufs.fill_zero(inside, total - inside);
        }
        if let Some(rec) = &self.recorder {
            rec.observe(offset, inside as u64);
        }
        let mut misses = Pieces::new();
        for p in pieces(offset, inside, self.cs) {
            if !self.serve_local(p, &bufs.slice(p.buf_off, p.len), mode)? {
                misses.push(p);
            }
        }
        // Counted once per request: a non-blocking attempt that misses is
        // retried blocking, and counts then.
        if misses.is_empty() || mode != IoMode::NonBlocking {
            self.guest_bytes.add(inside as u64);
        }
        self.start_readahead(offset, inside as u64);
        if misses.is_empty() {
            return Ok(());
        }
        // A miss the boot profile covers waits for its segments (which
        // bring exactly the pages the boot reads); any other fetches the
        // sub-frames it needs when its chunk has them (and no fetch of the
        // whole chunk runs already), else its whole chunk.
        let replay = self.replay.read().clone();
        let waits: Vec<Pending> = misses
            .iter()
            .map(|p| match replay.as_ref().and_then(|r| r.covering(p.idx, p.off as u64, p.len as u64)) {
                Some(segs) => {
                    let rp = replay.as_ref().expect("covering came from it");
                    // Counted by the attempt that hurries the fetch (a blocking
                    // retry of a non-blocking one joins it).
                    let ahead = |s: &usize| !rp.is_done(*s) && self.segment_flights.urgency(s).is_none_or(|u| u.idle());
                    if segs.iter().any(ahead) {
                        Counters::inc(&self.counters.profile_ahead);
                    }
                    if let Some(&last) = segs.iter().max() {
                        if !rp.is_done(last) {
                            self.follow_segment(rp, last);
                        }
                    }
                    Pending::Segments(segs.into_iter().map(|s| self.segment_flight(rp, s, true)).collect())
                }
                None => match self.plan_miss(p.idx, p.off as u64, p.len as u64) {
                    part::MissPlan::Part(off, len) => Pending::Part(self.part_flight(p.idx, off, len)),
                    part::MissPlan::Chunk => Pending::Chunk(self.guest_flight(p.idx, true)),
                },
            })
            .collect();
        let parts: Vec<bool> = waits.iter().map(|w| matches!(w, Pending::Part(_))).collect();
        if mode == IoMode::NonBlocking {
            // The fetches are under way; the blocking retry will join them
            // (and count the misses, so a retried request counts once).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.counters.misses.fetch_add(misses.len() as u64, Ordering::Relaxed);
        if replay.is_none() {
            for p in &misses {
                self.dense.note_miss(p.idx, self.cs);
            }
        }
        self.demand.fetch_add(1, Ordering::SeqCst);
        if let Some(rec) = &self.recorder {
            rec.stall_begin();
        }
        self.counters.guest_wait.lock().begin(std::time::Instant::now());
        let deadline = self.guest_deadline();
        let results = self.wait_guest(deadline, async move {
            let mut out = Vec::with_capacity(waits.len());
            for w in waits {
                out.push(match w {
                    Pending::Chunk(f) => Some(f.await),
                    Pending::Segments(fs) => {
                        futures::future::join_all(fs).await;
                        None
                    }
                    Pending::Part(f) => {
                        let _ = f.await;
                        None
                    }
                });
            }
            out
        });
        if let Some(rec) = &self.recorder {
            rec.stall_end();
        }
        self.counters.guest_wait.lock().end(std::time::Instant::now());
        self.demand.fetch_sub(1, Ordering::SeqCst);
        'pieces: for ((p, r), part) in misses.into_iter().zip(results?).zip(parts) {
            let sub = bufs.slice(p.buf_off, p.len);
            // Prefer the tiers (a write may have landed since the fetch).
            if self.serve_local(p, &sub, IoMode::Blocking)? {
                if r.is_none() && !part {
                    Counters::inc(&self.counters.profile_waits);
                }
                continue;
            }
            // Pages were written after this fetch began, so its bytes are
            // not the chunk's content: a fresh flight completes the chunk
            // (its install fills only the pages still absent).
            let mut tries = 0;
            while self.ssd.state(p.idx) == DIRTY_PARTIAL {
                tries += 1;
                if tries > 3 {
                    return Err(io::Error::other(format!(
                        "chunk {} holds local changes and could not be completed",
                        p.idx
                    )));
                }
                let f = self.guest_flight(p.idx, false);
                self.wait_guest(deadline, f)?.map_err(SharedError::into_io)?;
                if self.serve_local(p, &sub, IoMode::Blocking)? {
                    continue 'pieces;
                }
            }
            // A run of sub-frames or the rest of a chunk failed (a damaged
            // sub-frame elsewhere in it, say): the piece's own sub-frames
            // alone may well be sound.
            if (part || matches!(r, Some(Err(_)))) && self.vol.part_ready(p.idx) {
                let f = self.part_flight(p.idx, p.off as u64, p.len as u64);
                let _ = self.wait_guest(deadline, f)?;
                if self.serve_local(p, &sub, IoMode::Blocking)? {
                    continue;
                }
            }
            let r = match r {
                Some(r) => r,
                // The segment failed or its pages could not be kept: fetch
                // the chunk instead.
                None => {
                    let f = self.guest_flight(p.idx, true);
                    self.wait_guest(deadline, f)?
                }
            };
            let b = r.map_err(SharedError::into_io)?;
            sub.copy_from_slice(0, &b.read()[p.off..p.off + p.len]);
        }
        Ok(())
    }

    fn write(self: &Arc<Self>, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "volume was opened read-only"));
        }
        let total = bufs.len();
        let end = offset.checked_add(total as u64).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if total == 0 {
            return Ok(());
        }
        let ps = pieces(offset, total, self.cs);
        if mode == IoMode::NonBlocking {
            // Only writes into chunks already dirty are plain local writes;
            // anything else may fetch or fsync, so it goes to a worker.
            if end > self.ssd.len() || ps.iter().any(|p| self.ssd.state(p.idx) != DIRTY) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.ssd.grow(end);
        if let Some(rec) = &self.recorder {
            rec.observe_write(offset, total as u64);
        }
        // Taken at the first wait on the remote (most writes have none).
        let deadline = std::cell::OnceCell::new();
        let deadline = || *deadline.get_or_init(|| self.guest_deadline());
        for p in ps {
            let sub = bufs.slice(p.buf_off, p.len);
            let whole = p.off == 0 && p.len as u64 == self.cs;
            // Whole pages go straight into a chunk not held whole (it becomes
            // dirty in part); only a write of part of a page not local needs
            // bytes first: the RAM copy, else that page's sub-frames where the
            // chunk has them, else the chunk (the rest of a local page is
            // there, with the remote down too).
            let local = || self.ssd.writable_in_place(p.idx, p.off as u64, p.len as u64);
            let mut parts_tried = false;
            loop {
                // The read half of read-modify-write, outside the lock.
                let fill_gen = self.vol.generation();
                let fill = if !whole && !local() {
                    if self.is_zero(p.idx) {
                        Some(self.zero_buf())
                    } else if let Some(b) = self.ram.get(p.idx) {
                        // Local in RAM alone (pinned metadata, a chunk the
                        // SSD had no room for): the fill, no fetch.
                        Some(b)
                    } else if !std::mem::replace(&mut parts_tried, true) && self.fetch_edge_pages(p, deadline())? {
                        continue;
                    } else {
                        let f = self.guest_flight(p.idx, false);
                        Some(self.wait_guest(deadline(), f)?.map_err(SharedError::into_io)?)
                    }
                } else {
                    None
                };
                // A cut waits for this piece, never for the fetch above (a
                // write still in flight may be cut in part, as a crash would).
                let _cut_gate = self.writeback_gate();
                let _g = self.ssd.lock_write(p.idx);
                if !whole && fill.is_none() && !local() {
                    // Evicted between the check and the lock: fetch again.
                    continue;
                }
                if fill.is_some() && self.vol.generation() != fill_gen {
                    // A commit landed since the fetch: its bytes may be stale.
                    continue;
                }
                self.before_modify(p.idx, Some((p.off as u64, p.len as u64)))?;
                let in_ram = self.ram.get(p.idx);
                // With a RAM copy, both copies come from one read of the
                // guest's buffer: a guest changing it mid-request cannot
                // leave RAM and SSD holding different bytes.
                let mut once = in_ram.as_ref().map(|_| {
                    let mut v = vec![0u8; p.len];
                    sub.copy_to_slice(0, &mut v);
                    v
                });
                {
                    // The fill may be the RAM copy itself (fetched from
                    // RAM): its read guard is gone before RAM is written.
                    let fill_guard = fill.as_ref().map(|b| b.read());
                    let fill_bytes = fill_guard.as_deref().map(|v| v.as_slice());
                    match once.as_mut() {
                        Some(v) => self.ssd.write(p.idx, p.off as u64, &IoVec::from_slice(v), fill_bytes)?,
                        None => self.ssd.write(p.idx, p.off as u64, &sub, fill_bytes)?,
                    }
                }
                if let (Some(rb), Some(v)) = (in_ram, once) {
                    rb.write()[p.off..p.off + p.len].copy_from_slice(&v);
                }
                break;
            }
        }
        Ok(())
    }

    /// Fetches, as a guest miss does, the sub-frames of the pages a write
    /// of piece `p` covers only in part and that are not local. False when
    /// the chunk must come whole instead (no sub-frames, a fetch of it
    /// running, a second miss in it, or the part failed or could not be
    /// kept: the chunk then comes within what is left of the deadline).
    fn fetch_edge_pages(self: &Arc<Self>, p: Piece, deadline: std::time::Instant) -> io::Result<bool> {
        let (off, end) = (p.off as u64, (p.off + p.len) as u64);
        let mut pages = Vec::with_capacity(2);
        if off % PAGE != 0 {
            pages.push(off / PAGE * PAGE);
        }
        if end % PAGE != 0 {
            pages.push(end / PAGE * PAGE);
        }
        pages.dedup();
        let stored = self.vol.chunk_len(p.idx) as u64;
        let mut flights = Vec::new();
        for page in pages {
            if self.ssd.has_pages(p.idx, page, 1) {
                continue;
            }
            if page + PAGE > stored {
                // Past what the volume stores of the chunk (a write growing
                // the image): no sub-frame holds it.
                return Ok(false);
            }
            match self.plan_miss(p.idx, page, PAGE) {
                part::MissPlan::Part(o, l) => flights.push(self.part_flight(p.idx, o, l)),
                part::MissPlan::Chunk => return Ok(false),
            }
        }
        if flights.is_empty() {
            return Ok(true);
        }
        Counters::inc(&self.counters.misses);
        let results = self.wait_guest(deadline, futures::future::join_all(flights))?;
        Ok(results.iter().all(Result::is_ok))
    }

    /// Zeroes `[offset, offset + len)`: partial chunks through the write
    /// path, whole chunks in batches by hole punching (no fetch, one persist
    /// per batch).
    fn write_zeroes(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "volume was opened read-only"));
        }
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs;
        let first_whole = offset.div_ceil(cs);
        let last_whole = end / cs; // exclusive
        let zero_part = |from: u64, to: u64| -> io::Result<()> {
            if from < to {
                let mut z = vec![0u8; (to - from) as usize];
                self.write(from, &IoVec::from_slice(&mut z), IoMode::Blocking)?;
            }
            Ok(())
        };
        if first_whole >= last_whole {
            // Inside one chunk (or straddling one boundary): no whole chunk.
            let mid = (first_whole * cs).clamp(offset, end);
            zero_part(offset, mid)?;
            return zero_part(mid, end);
        }
        zero_part(offset, first_whole * cs)?;
        self.ssd.grow(end);
        let mut a = first_whole;
        while a < last_whole {
            let b = (a + SsdCache::MAX_BATCH).min(last_whole);
            let _cut_gate = self.writeback_gate();
            let _locks = self.ssd.lock_many(a..b);
            for idx in a..b {
                self.before_modify(idx, None)?;
            }
            let zeroed = self.ssd.zero_chunks_except(a..b, |idx| self.is_zero(idx));
            for idx in a..b {
                // A zeroing that failed part way left some chunks reading
                // as zeroes and some not: the SSD says which.
                if zeroed.is_ok() || self.ssd.state(idx) == ZERO_DIRTY {
                    if let Some(rb) = self.ram.get(idx) {
                        rb.write().fill(0);
                    }
                }
            }
            zeroed?;
            a = b;
        }
        zero_part(last_whole * cs, end)
    }

    fn hint_metadata(self: &Arc<Self>, ranges: &[std::ops::Range<u64>]) -> io::Result<()> {
        let idxs = self.metadata_chunks(ranges);
        // Each fetch keeps to the remote budget, so a hung remote fails the
        // open instead of holding it.
        let flights: Vec<_> = idxs.iter().map(|&i| self.guest_flight(i, false)).collect();
        let results = self.wait(futures::future::join_all(flights))?;
        for (idx, r) in idxs.into_iter().zip(results) {
            self.pin_metadata(idx, r.map_err(SharedError::into_io)?)?;
        }
        Ok(())
    }

    /// Background hydration: every chunk not yet local, in order, a few at
    /// a time, pausing whenever a guest miss is waiting.
    async fn hydrate(self: Arc<Self>) {
        let todo: Vec<u64> =
            (0..self.vol.chunk_count()).filter(|&i| !self.ssd.has_chunk(i) && !self.is_zero(i)).collect();
        self.counters.hydrate_total.store(todo.len() as u64, Ordering::Relaxed);
        let sem = Arc::new(Semaphore::new(self.hydrate_concurrency));
        let mut set = tokio::task::JoinSet::new();
        let mut failed = false;
        for (n, idx) in todo.into_iter().enumerate() {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            while self.demand.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else { return };
            let f = self.flight(idx, false, fetch::Source::Hydrate);
            let me = self.clone();
            set.spawn(async move {
                let r = f.await;
                drop(permit);
                match &r {
                    Ok(_) => Counters::inc(&me.counters.hydrate_done),
                    Err(e) => {
                        me.hydrate_error.lock().get_or_insert_with(|| format!("chunk {idx}: {e}"));
                    }
                }
                r.is_ok()
            });
            while let Some(r) = set.try_join_next() {
                failed |= !r.unwrap_or(false);
            }
            if n % 256 == 255 {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.ssd.persist()).await;
            }
        }
        while let Some(r) = set.join_next().await {
            failed |= !r.unwrap_or(false);
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.ssd.persist()).await;
        // Every chunk fetched is not every chunk kept: a cache's disk that
        // cannot hold the whole image (with the free space clean data leaves
        // on it) evicts earlier ones. "Hydrated" promises reads that never
        // go to the remote, so it is said only of a cache that holds them
        // after the sweep that keeps that free space (stores racing near the
        // end may all have seen room).
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.ssd.keep_disk_free()).await;
        let left = (0..self.vol.chunk_count()).filter(|&i| !self.ssd.has_chunk(i) && !self.is_zero(i)).count();
        if !failed && left > 0 {
            failed = true;
            let free = self.ssd.disk_free().map_or_else(|| "unknown".into(), crate::volume::lease::human);
            self.hydrate_error.lock().get_or_insert_with(|| {
                format!(
                    "the cache's disk could not keep the whole image: {left} chunks were evicted again to keep {} \
                     free for changes not uploaded yet ({free} free now); free space there, pass a smaller \
                     --ssd-min-free, or a --cache-dir on a larger disk",
                    crate::volume::lease::human(self.ssd.min_free())
                )
            });
        }
        self.counters.hydrate_complete.store(!failed, Ordering::SeqCst);
        self.counters.hydrating.store(false, Ordering::SeqCst);
    }
}

impl Storage for TieredStore {
    fn len(&self) -> u64 {
        self.inner.ssd.len()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only
    }

    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        self.inner.read(offset, bufs, mode)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        self.inner.write(offset, bufs, mode)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let old = self.inner.ssd.len();
        if len < old {
            // Zero what is cut off, so growing again later reads zeroes.
            self.write_zeroes_at(len, old - len)?;
        }
        self.inner.ssd.set_len(len);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn flush_point(&self) -> io::Result<u64> {
        self.inner.flush_point()
    }

    fn cut_point(&self) -> io::Result<u64> {
        self.inner.cut_point()
    }

    fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        self.inner.wait_durable(ticket)
    }

    fn hint_metadata(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<()> {
        self.inner.hint_metadata(ranges)
    }

    fn prefetch_metadata(&self, ranges: &[std::ops::Range<u64>]) -> io::Result<bool> {
        self.inner.prefetch_metadata(ranges)
    }

    fn describe(&self) -> String {
        format!(
            "volume {} (generation {}) cached in {}",
            self.inner.vol.url,
            self.inner.vol.generation(),
            self.inner.ssd.dir().display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Hook = Arc<dyn Fn(&std::path::Path, u64) + Send + Sync>;

    /// Runs between reading a chunk completed from its sub-frames and
    /// putting it in RAM, for the one test that sets it.
    static BEFORE_RAM_INSERT: parking_lot::Mutex<Option<Hook>> = parking_lot::const_mutex(None);

    pub(super) fn before_ram_insert(dir: &std::path::Path, idx: u64) {
        let hook = BEFORE_RAM_INSERT.lock().clone();
        if let Some(h) = hook {
            h(dir, idx);
        }
    }

    type StageHook = Arc<dyn Fn(&str) + Send + Sync>;

    /// Run by the store in the directory named at the stages of its work
    /// that tests hold it at: in the uploader as it lets a committed cut
    /// go, `releasing` (the cut still held) and `released` (the cut gone,
    /// its copies in the `frozen` file not cleared yet); `profile build`,
    /// once a boot profile's builder took its generation.
    static STAGES: parking_lot::Mutex<Vec<(std::path::PathBuf, StageHook)>> = parking_lot::const_mutex(Vec::new());

    pub(super) fn stage(dir: &std::path::Path, stage: &str) {
        let hook = STAGES.lock().iter().find(|(d, _)| d == dir).map(|(_, h)| h.clone());
        if let Some(h) = hook {
            h(stage);
        }
    }

    /// Holds the store in `dir` once at each of `stages` (see [`stage`]):
    /// each stage reached is sent on the channel returned, and waits for a
    /// word on the sender returned.
    fn hold_at(
        dir: &std::path::Path,
        stages: &'static [&'static str],
    ) -> (std::sync::mpsc::Receiver<&'static str>, std::sync::mpsc::Sender<()>) {
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = parking_lot::Mutex::new(go_rx);
        let left = parking_lot::Mutex::new(stages.to_vec());
        let hook: StageHook = Arc::new(move |stage: &str| {
            let held = {
                let mut left = left.lock();
                let i = left.iter().position(|&s| s == stage);
                i.map(|i| left.remove(i))
            };
            if let Some(stage) = held {
                let _ = reached_tx.send(stage);
                let _ = go_rx.lock().recv_timeout(Duration::from_secs(20));
            }
        });
        STAGES.lock().push((dir.to_path_buf(), hook));
        (reached, go)
    }

    /// Reads `len` bytes at `at` of the volume's newest generation, as a
    /// fresh cache on another machine would.
    fn fresh_read(d: &std::path::Path, url: &str, name: &str, at: u64, len: usize) -> Vec<u8> {
        let mut o = CacheOptions::new(d.join(name));
        o.read_only = true;
        let s = crate::tier::open_volume(url, o).unwrap();
        let mut b = vec![0u8; len];
        s.read_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        b
    }

    /// A cut taken while the previous one is being let go, whose chunk the
    /// guest rewrites at once, keeps the bytes it copied aside: letting the
    /// old cut go clears only its own copies. The bug: the old cut's
    /// copies were cleared after its lock was dropped, over the new cut's
    /// copy of the same chunk, and the new generation held zeroes there.
    #[test]
    fn letting_a_cut_go_keeps_the_next_cuts_copies() {
        let (d, url, _) = imported();
        let cs = 256usize << 10;
        let cache = d.path().join("cache");
        let mut o = CacheOptions::new(&cache);
        o.writeback.sync_interval = Duration::from_secs(3600);
        let s = Arc::new(crate::tier::open_volume(&url, o).unwrap());
        let (reached, go) = hold_at(&cache, &["releasing", "released"]);
        let write = |byte: u8| {
            let mut w = vec![byte; cs];
            s.write_vectored_at(0, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
        };
        write(0xa1);
        assert_eq!(s.flush_point().unwrap(), 1, "the first flush point cuts");
        // Cut 1 committed, still held: B copies A aside.
        assert_eq!(reached.recv_timeout(Duration::from_secs(20)), Ok("releasing"));
        write(0xb2);
        go.send(()).unwrap();
        // Cut 1 let go, its copy of chunk 0 not cleared yet: cut 2 takes
        // chunk 0 (B), and C copies B aside.
        assert_eq!(reached.recv_timeout(Duration::from_secs(20)), Ok("released"));
        s.request_sync();
        assert_eq!(s.flush_point().unwrap(), 2, "a sync asked for cuts at the next flush point");
        write(0xc3);
        go.send(()).unwrap();
        let t0 = std::time::Instant::now();
        while s.sync_status().unwrap().committed_cut < 2 {
            assert!(t0.elapsed() < Duration::from_secs(20), "cut 2 was never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = fresh_read(d.path(), &url, "fresh", 0, cs);
        assert!(got == vec![0xb2u8; cs], "cut 2 holds {:#x}.. in chunk 0, not the guest's 0xb2", got[0]);
    }

    /// A writethrough FLUSH returns only once a generation holding its
    /// writes is committed, even when it comes as the cut before them has
    /// just been committed and is being let go. The bug: such a FLUSH saw
    /// that cut still held, counted it as its own, and returned at once.
    #[test]
    fn a_writethrough_flush_never_counts_a_committed_cut_as_its_own() {
        let (d, url, _) = imported();
        let cs = 256usize << 10;
        let cache = d.path().join("cache");
        let mut o = CacheOptions::new(&cache);
        o.writeback.mode = CacheMode::Writethrough;
        let s = Arc::new(crate::tier::open_volume(&url, o).unwrap());
        let (reached, go) = hold_at(&cache, &["releasing"]);
        let write = |idx: usize, byte: u8| {
            let mut w = vec![byte; cs];
            s.write_vectored_at((idx * cs) as u64, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
        };
        let flush = |s: &Arc<TieredStore>| {
            let (s, (tx, rx)) = (s.clone(), std::sync::mpsc::channel());
            let t = std::thread::spawn(move || {
                let r = s.flush_point().and_then(|t| s.wait_durable(t));
                let _ = tx.send(());
                r
            });
            (t, rx)
        };
        write(0, 0xa1);
        let (first, _) = flush(&s);
        // Cut 1 committed, not let go yet: chunk 1 is written, and flushed.
        assert_eq!(reached.recv_timeout(Duration::from_secs(20)), Ok("releasing"));
        write(1, 0xb2);
        let (second, done) = flush(&s);
        if done.recv_timeout(Duration::from_secs(1)).is_ok() {
            let got = fresh_read(d.path(), &url, "early", cs as u64, cs);
            assert!(got == vec![0xb2u8; cs], "the FLUSH returned, but chunk 1 is not on the remote");
        }
        go.send(()).unwrap();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        let got = fresh_read(d.path(), &url, "fresh", 0, 2 * cs);
        assert!(got[..cs] == vec![0xa1u8; cs] && got[cs..] == vec![0xb2u8; cs]);
    }

    /// A boot profile holds the bytes of the generation its builder took:
    /// a chunk a commit replaced while the profile was built is left out.
    /// The bug: its new bytes went in under the old generation's digest,
    /// and a start at that generation (a rollback, a fork) would have
    /// streamed them into its cache.
    #[test]
    fn a_profile_leaves_out_chunks_a_commit_replaced_while_it_was_built() {
        let (d, url, data) = imported();
        let cs = 256usize << 10;
        let cache = d.path().join("cache");
        let mut o = CacheOptions::new(&cache);
        o.boot_profile = BootProfileMode::Auto;
        o.boot_profile_window = Duration::from_secs(1);
        o.writeback.sync_interval = Duration::from_secs(3600);
        o.readahead_chunks = 0;
        let s = Arc::new(crate::tier::open_volume(&url, o).unwrap());
        let (reached, go) = hold_at(&cache, &["profile build"]);
        // Parts of chunks 2 and 4 read (recorded), then chunk 2 rewritten.
        for at in [2 * cs + 8192, 4 * cs] {
            let mut b = vec![0u8; 16384];
            s.read_vectored_at(at as u64, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
            assert!(b == data[at..at + 16384]);
        }
        let mut w = vec![0xc2u8; cs];
        s.write_vectored_at(2 * cs as u64, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
        assert_eq!(reached.recv_timeout(Duration::from_secs(30)), Ok("profile build"));
        // A commit while the profile is built: chunk 2 is clean again,
        // with the next generation's bytes.
        s.request_sync();
        assert_ne!(s.flush_point().unwrap(), 0);
        let t0 = std::time::Instant::now();
        while s.sync_status().unwrap().committed_cut < 1 {
            assert!(t0.elapsed() < Duration::from_secs(20), "the cut was never committed");
            std::thread::sleep(Duration::from_millis(5));
        }
        go.send(()).unwrap();
        let index = || -> Option<serde_json::Value> {
            let names = std::fs::read_dir(d.path().join("vol")).ok()?;
            let name = names
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .find(|n| n.starts_with("profile-") && !n.ends_with(".pack"))?;
            let b = std::fs::read(d.path().join("vol").join(name)).ok()?;
            serde_json::from_slice(b.split(|&c| c == b'\n').next()?).ok()
        };
        let t0 = std::time::Instant::now();
        let index = loop {
            if let Some(i) = index() {
                break i;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "the profile was never saved");
            std::thread::sleep(Duration::from_millis(20));
        };
        let chunks: Vec<&String> = index["chunk_refs"].as_object().unwrap().keys().collect();
        assert_eq!(chunks, ["4"], "the profile's chunks");
    }

    /// A chunk completed from its sub-frames goes into RAM under the lock
    /// it was read under: a write arriving meanwhile waits, then updates
    /// the RAM copy, so RAM never serves the bytes from before it (nor
    /// hands them to a later read-modify-write as the chunk's content).
    #[test]
    fn a_write_never_lands_between_a_chunk_read_and_its_ram_copy() {
        let (d, url, data) = imported_in_chunks(1 << 20);
        let cache = d.path().join("cache");
        let mut o = CacheOptions::new(&cache);
        o.ram_cache = 8 << 20;
        o.readahead_chunks = 0;
        let s = Arc::new(crate::tier::open_volume(&url, o).unwrap());
        // Once the pack's sub-frame index is in (it is fetched in the
        // background at open), a miss at the chunk's start takes its first
        // run of sub-frames only.
        let t0 = std::time::Instant::now();
        while !s.inner.vol.part_ready(0) {
            assert!(t0.elapsed() < Duration::from_secs(30), "the pack's index was never fetched");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut b = vec![0u8; 4096];
        s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(s.inner.ssd.state(0), crate::tier::ssd::PARTIAL);
        // A miss past that run completes the chunk; hold it after its read.
        let (paused_tx, paused) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = parking_lot::Mutex::new(go_rx);
        let mine = cache.clone();
        *BEFORE_RAM_INSERT.lock() = Some(Arc::new(move |dir: &std::path::Path, idx: u64| {
            if dir == mine && idx == 0 {
                let _ = paused_tx.send(());
                let _ = go_rx.lock().recv_timeout(Duration::from_secs(20));
            }
        }));
        let reader = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                let r = s.read_vectored_at(800 << 10, &IoVec::from_slice(&mut b), IoMode::Blocking);
                r.map(|_| b)
            })
        };
        paused.recv_timeout(Duration::from_secs(20)).expect("the chunk was never completed from its sub-frames");
        // A write to the chunk now: it must not land before the RAM copy.
        let at = 600u64 << 10;
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut w = vec![0xeeu8; 4096];
                let r = s.write_vectored_at(at, &IoVec::from_slice(&mut w), IoMode::Blocking);
                r
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        go.send(()).unwrap();
        let got = reader.join().unwrap().unwrap();
        assert_eq!(got, data[800 << 10..(800 << 10) + 4096]);
        writer.join().unwrap().unwrap();
        *BEFORE_RAM_INSERT.lock() = None;
        assert!(s.inner.ram.get(0).is_some(), "the completed chunk went into RAM");
        s.read_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(b, vec![0xeeu8; 4096], "RAM served the bytes from before the write");
    }

    /// A fetch that completes a chunk dirty in part hands back the chunk's
    /// content, not the fetched version: a reader whose chunk is committed
    /// and evicted before it copies (the restart's first commit, under a
    /// small cache) copies from that. The bug: the soak read a cluster's
    /// bytes from before a write made in the previous run.
    #[test]
    fn a_fetch_into_a_chunk_dirty_in_part_returns_its_content() {
        let (d, url, data) = imported();
        let mut o = CacheOptions::new(d.path().join("cache"));
        o.readahead_chunks = 0;
        let s = Arc::new(crate::tier::open_volume(&url, o).unwrap());
        let cs = 256usize << 10;
        // Whole pages into an absent chunk: dirty in part, nothing fetched.
        let mut w = vec![0xabu8; 8192];
        s.write_vectored_at(cs as u64 + 4096, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
        assert_eq!(s.inner.ssd.state(1), DIRTY_PARTIAL);
        let f = s.inner.guest_flight(1, true);
        let got = s.inner.wait(f).unwrap().unwrap();
        let mut want = data[cs..2 * cs].to_vec();
        want[4096..4096 + 8192].fill(0xab);
        assert!(got.read()[..] == want[..], "the flight returned bytes other than the chunk's");
        assert_eq!(s.inner.ssd.state(1), crate::tier::ssd::DIRTY, "the fetch completed the chunk");
        // The same for a chunk already whole and written.
        let f = s.inner.guest_flight(1, true);
        assert!(s.inner.wait(f).unwrap().unwrap().read()[..] == want[..]);
    }

    /// A 2 MiB volume of nonzero bytes in 256 KiB chunks on a `dir:` remote.
    fn imported() -> (tempfile::TempDir, String, Vec<u8>) {
        imported_in_chunks(256 << 10)
    }

    /// [`imported`] with chunks of `chunk_size`.
    fn imported_in_chunks(chunk_size: u64) -> (tempfile::TempDir, String, Vec<u8>) {
        imported_sized(2 << 20, chunk_size)
    }

    /// A volume of `len` bytes in chunks of `chunk_size`.
    fn imported_sized(len: u32, chunk_size: u64) -> (tempfile::TempDir, String, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img.raw");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&img, &data).unwrap();
        let url = format!("dir:{}", d.path().join("vol").display());
        let io = crate::volume::ImportOptions { chunk_size, ..Default::default() };
        crate::volume::import(&img, &url, &io).unwrap();
        (d, url, data)
    }

    /// A non-blocking read of a chunk cached in the SSD tier never waits
    /// behind a writer holding the chunk's stripe (an fsync, an eviction, a
    /// hole punch): it says WouldBlock, and the blocking retry gets the bytes.
    #[test]
    fn the_fast_path_never_waits_on_a_held_lock() {
        let (d, url, data) = imported();
        let mut o = CacheOptions::new(d.path().join("cache"));
        o.ram_cache = 0;
        o.read_only = true;
        let s = crate::tier::open_volume(&url, o).unwrap();
        let mut b = vec![0u8; 4096];
        s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(b, data[..4096]);
        let held = s.inner.ssd.lock_write(0);
        let r = s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::NonBlocking);
        assert_eq!(r.err().map(|e| e.kind()), Some(io::ErrorKind::WouldBlock));
        drop(held);
        b.fill(0);
        s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(b, data[..4096]);
    }

    /// A chunk read again from the SSD tier is copied into RAM in the
    /// background; later reads of it are RAM hits.
    #[test]
    fn ssd_hits_feed_the_ram_tier() {
        let (d, url, data) = imported();
        let mut o = CacheOptions::new(d.path().join("cache"));
        o.ram_cache = 4 << 20;
        o.read_only = true;
        o.readahead_chunks = 0;
        let s = crate::tier::open_volume(&url, o).unwrap();
        let mut b = vec![0u8; 4096];
        let at = 300 << 10; // chunk 1
                            // The whole chunk (a 4 KiB miss would fetch only its sub-frame).
        let mut whole = vec![0u8; 256 << 10];
        s.read_vectored_at(256 << 10, &IoVec::from_slice(&mut whole), IoMode::Blocking).unwrap();
        // Its sub-frames landed in the SSD tier and the read was served
        // from there, which may have started a copy into RAM: let it end.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.inner.promoting.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Only the SSD copy is left.
        s.inner.ram.clear();
        let promoted = s.stats().ram_promotions;
        s.read_vectored_at(at, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(b, data[at as usize..at as usize + 4096]);
        while s.stats().ram_promotions == promoted && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(s.stats().ram_promotions, promoted + 1, "the hot chunk was copied into RAM");
        let ram_hits = s.stats().ram_hits;
        b.fill(0);
        s.read_vectored_at(at + 8192, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap();
        assert_eq!(b, data[at as usize + 8192..at as usize + 8192 + 4096]);
        assert_eq!(s.stats().ram_hits, ram_hits + 1);
    }

    /// A full RAM tier takes a chunk from the SSD tier only in place of
    /// one not read since the clock last passed: a chunk read between
    /// tries keeps its place, and no copy is made for nothing.
    #[test]
    fn a_full_ram_tier_replaces_only_chunks_gone_cold() {
        const CS: u64 = 64 << 10;
        // 80 chunks; RAM for one chunk per shard, so chunks 0 and 64 share one.
        let (d, url, data) = imported_sized(80 * CS as u32, CS);
        let mut o = CacheOptions::new(d.path().join("cache"));
        o.ram_cache = 64 * CS;
        o.read_only = true;
        o.readahead_chunks = 0;
        let s = crate::tier::open_volume(&url, o).unwrap();
        let idle = |s: &TieredStore| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while s.inner.promoting.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let mut whole = vec![0u8; CS as usize];
        for at in [0, 64 * CS] {
            s.read_vectored_at(at, &IoVec::from_slice(&mut whole), IoMode::Blocking).unwrap();
            assert_eq!(whole, data[at as usize..(at + CS) as usize]);
            idle(&s);
        }
        s.inner.ram.clear();
        let promoted = || s.stats().ram_promotions;
        let promote = |idx: u64| {
            s.inner.promote(idx);
            idle(&s);
        };
        let read_64 = || {
            let mut b = vec![0u8; 4096];
            s.read_vectored_at(64 * CS, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap();
            assert_eq!(b, data[(64 * CS) as usize..(64 * CS) as usize + 4096]);
        };
        let n = promoted();
        promote(0); // room
        promote(64); // in place of chunk 0, never read since it came in
        assert_eq!(promoted(), n + 2);
        let ram_hits = s.stats().ram_hits;
        read_64();
        assert_eq!(s.stats().ram_hits, ram_hits + 1, "chunk 64 is in RAM");
        for _ in 0..3 {
            promote(0);
            assert_eq!(promoted(), n + 2, "chunk 64 was read since the clock passed: no copy");
            read_64();
        }
        promote(0); // refused (chunk 64 was just read); the clock passes
        promote(0); // chunk 64 went unread since: replaced
        assert_eq!(promoted(), n + 3);
    }

    #[test]
    fn pieces_split_at_chunk_bounds() {
        let p = pieces(1000, 5000, 4096);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].idx, p[0].off, p[0].buf_off, p[0].len), (0, 1000, 0, 3096));
        assert_eq!((p[1].idx, p[1].off, p[1].buf_off, p[1].len), (1, 0, 3096, 1904));
    }
}
