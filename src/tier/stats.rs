//! Counters of the tiered store and the snapshot the CLI shows
//! (`driveblk status`, progress bars).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Cells of a [`Striped`] counter.
const STRIPES: usize = 16;

/// A counter bumped on the hit path by every queue thread at once: one
/// cache-padded cell per thread (threads spread over the cells), summed on
/// read, so queues never write one shared cache line.
pub struct Striped {
    cells: Box<[CachePadded<AtomicU64>]>,
}

impl Default for Striped {
    fn default() -> Self {
        Self { cells: (0..STRIPES).map(|_| CachePadded::new(AtomicU64::new(0))).collect() }
    }
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

/// This thread's cell: threads take cells in turn, so the few queue
/// threads of a device each get their own.
fn cell() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static CELL: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    CELL.with(|c| *c)
}

impl Striped {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.cells[cell()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.cells.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Wall time during which at least one guest read waited on the remote:
/// what a cold start costs the guest, overlapping waits counted once.
#[derive(Debug, Default)]
pub struct WaitClock {
    waiting: u32,
    since: Option<std::time::Instant>,
    total: std::time::Duration,
}

impl WaitClock {
    /// A guest read starts waiting.
    pub fn begin(&mut self, now: std::time::Instant) {
        self.waiting += 1;
        if self.waiting == 1 {
            self.since = Some(now);
        }
    }

    /// A guest read stops waiting.
    pub fn end(&mut self, now: std::time::Instant) {
        self.waiting = self.waiting.saturating_sub(1);
        if self.waiting == 0 {
            if let Some(s) = self.since.take() {
                self.total += now.saturating_duration_since(s);
            }
        }
    }

    /// Waited so far, the wait under way included.
    pub fn total(&self, now: std::time::Instant) -> std::time::Duration {
        self.total + self.since.map_or(std::time::Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// Live counters, bumped on the I/O paths.
#[derive(Debug, Default)]
pub struct Counters {
    /// The hit counters, bumped by every request.
    pub ram_hits: Striped,
    pub ssd_hits: Striped,
    pub zero_hits: Striped,
    pub misses: AtomicU64,
    /// Hot SSD chunks copied into the RAM tier.
    pub ram_promotions: AtomicU64,
    pub part_fetches: AtomicU64,
    pub remote_fetches: AtomicU64,
    pub remote_bytes: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Guest requests failed because the remote did not answer within the
    /// budget.
    pub remote_timeouts: AtomicU64,
    pub readahead_chunks: AtomicU64,
    pub hydrate_total: AtomicU64,
    pub hydrate_done: AtomicU64,
    pub hydrating: AtomicBool,
    pub hydrate_complete: AtomicBool,
    /// Runs fetching pinned chunks (the pins found at open, and each
    /// `pin` since): pinning is done when none is left.
    pub pinning: AtomicUsize,
    pub profile_saved: AtomicU64,
    pub profile_segments: AtomicU64,
    pub profile_segments_done: AtomicU64,
    pub profile_bytes: AtomicU64,
    pub profile_waits: AtomicU64,
    pub profile_ahead: AtomicU64,
    /// Chunks whose boot profile pages did not match the chunk's digest.
    pub profile_rejected: AtomicU64,
    /// Time guest reads spent waiting on the remote (misses only: a hit
    /// never touches it).
    pub guest_wait: parking_lot::Mutex<WaitClock>,
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of the tiered store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Bytes of chunks holding local changes not yet committed.
    pub dirty_bytes: u64,
    /// Write-back state (None when read-only).
    pub sync: Option<crate::tier::tiered::SyncStatus>,
    pub volume_id: String,
    pub generation: u64,
    pub image_len: u64,
    pub chunk_size: u64,
    /// Chunks covering the image.
    pub chunks_total: u64,
    /// Chunks in the SSD tier (clean + dirty).
    pub chunks_cached: u64,
    /// Chunks with local writes not uploaded yet.
    pub chunks_dirty: u64,
    /// Chunks pinned in RAM (metadata).
    pub chunks_pinned: u64,
    /// Chunks that need no fetch (zero in the manifest).
    pub chunks_zero: u64,
    pub ram_bytes: u64,
    pub ram_cap: u64,
    pub ssd_bytes: u64,
    pub ssd_cap: u64,
    /// Bytes free on the cache's filesystem (None: could not be asked).
    pub ssd_free: Option<u64>,
    /// Bytes clean data leaves free on that filesystem (`--ssd-min-free`).
    pub ssd_min_free: u64,
    /// Chunk-parts served from RAM / SSD / known zero.
    pub ram_hits: u64,
    pub ssd_hits: u64,
    pub zero_hits: u64,
    /// Hot chunks copied from the SSD tier into RAM.
    pub ram_promotions: u64,
    /// Chunk-parts that had to wait for the remote.
    pub misses: u64,
    /// Wall time, in ms, during which at least one guest read waited on
    /// the remote.
    pub guest_wait_ms: u64,
    /// Chunks fetched from the remote and bytes that crossed the link.
    pub remote_fetches: u64,
    pub remote_bytes: u64,
    /// `remote_bytes` by what caused them (they add up to it): guest
    /// misses, the boot profile's stream, readahead, hydration and pins,
    /// the first boot's stream of dense regions, packs' sub-frame indexes.
    pub bytes_miss: u64,
    pub bytes_profile: u64,
    pub bytes_readahead: u64,
    pub bytes_hydrate: u64,
    pub bytes_stream: u64,
    pub bytes_index: u64,
    /// Speculative bytes allowed in flight now: the link's measured
    /// bandwidth-delay product and a margin, at least the configured least.
    pub speculative_budget: u64,
    /// Guest misses served by fetching only the sub-frames they need.
    pub part_fetches: u64,
    pub fetch_errors: u64,
    /// Guest requests failed after waiting the whole remote budget.
    pub remote_timeouts: u64,
    pub readahead_chunks: u64,
    pub ssd_evictions: u64,
    /// Background hydration: running, chunks to do and done, finished.
    pub hydrating: bool,
    pub hydrate_total: u64,
    pub hydrate_done: u64,
    pub hydrated: bool,
    /// Started from the cache's copy of the volume: the remote was down.
    pub offline: bool,
    /// Chunks of which only some pages are local (boot profile pages).
    pub chunks_partial: u64,
    /// Boot profile: recording now, bytes recorded, profiles saved.
    pub profile_recording: bool,
    pub profile_recorded_bytes: u64,
    pub profile_saved: u64,
    /// Boot profile replay: segments in the profile, streamed (or found
    /// local), bytes they brought, guest misses served by waiting on one.
    pub profile_segments: u64,
    pub profile_segments_done: u64,
    pub profile_bytes: u64,
    pub profile_waits: u64,
    /// Of those waits, the ones where the guest got ahead of every fetch
    /// and started its segment's fetch itself: a whole round trip each
    /// (the rest joined a fetch already on the wire or being stored).
    pub profile_ahead: u64,
    /// Chunks whose profile pages were discarded: they did not add up to
    /// the chunk the manifest names.
    pub profile_rejected: u64,
    /// The guest's known hot set (pinned chunks and the newest boot
    /// profile's chunks): chunks in it, of them local, pinned ones, and
    /// pinned ones local.
    pub hot_chunks: u64,
    pub hot_local: u64,
    pub pinned_chunks: u64,
    pub pinned_local: u64,
    /// Pinned chunks are being fetched.
    pub pinning: bool,
    /// Whether the guest can run without the network: every chunk of the
    /// hot set is local (or the whole volume is). None when no hot set is
    /// known (no boot profile, nothing pinned).
    pub offline_ready: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counts_from_many_threads() {
        let c = std::sync::Arc::new(Striped::default());
        let ts: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.inc()))
            })
            .collect();
        ts.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 20_000);
    }

    #[test]
    fn wait_clock_counts_overlapping_waits_once() {
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let mut w = WaitClock::default();
        w.begin(ms(0));
        w.begin(ms(50)); // a second read waits while the first still does
        w.end(ms(100));
        assert_eq!(w.total(ms(120)).as_millis(), 120, "a wait under way counts");
        w.end(ms(150));
        w.begin(ms(300));
        w.end(ms(400));
        assert_eq!(w.total(ms(1000)).as_millis(), 250, "0..150 and 300..400, idle time not counted");
    }
}
