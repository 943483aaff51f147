//! The first boot's stream: with no boot profile, once guest misses show
//! that a region of the image is dense (several of its chunks among the
//! guest's recent misses), the rest of that region streams in the
//! background as speculative work — at full link speed, behind every guest
//! miss, and never more than [`STREAM_FACTOR`] times the bytes the guest
//! has read plus what the link moves in a while (`serve`: [`STREAM_AHEAD`]).
//! Once everything fetched passes the bytes read plus that bound, readahead
//! waits and misses outside streamed regions fetch only their own
//! sub-frames. A
//! volume whose stored bytes are few (at most `whole_below`) streams whole
//! from the start: fetching all of it costs less than the round trips its
//! boot's misses would.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::fetch::Source;
use super::Inner;

/// Bytes of the image judged together.
pub const REGION_BYTES: u64 = 64 << 20;
/// Distinct chunks of a region among the last [`RECENT_MISSES`] missed
/// chunks before it counts as dense. Measured against recent misses, not
/// all of them: on a 40 GiB disk whose boot reads files scattered over
/// 20 GiB every region collects a few misses sooner or later, yet
/// streaming such a region brings ~60 MiB for a few small files; a region
/// drawing a share of the misses (here 1 in 43) is one the guest works in.
pub const DENSE_MISSES: usize = 6;
/// The window of distinct missed chunks that density is judged in.
pub const RECENT_MISSES: u64 = 256;
/// Speculative bytes a first boot fetches at most, per byte the guest read;
/// past that many beyond what it read, in all, misses fetch only their own.
pub const STREAM_FACTOR: u64 = 3;
/// Bytes a boot's misses may fetch beyond the bound, so that its first
/// ones, before it has read much, fetch whole runs.
pub const BOUND_SLACK: u64 = 4 << 20;
/// What `serve` lets the stream of dense regions run ahead of the bound:
/// what the link moves in this long (as measured; nothing until it is
/// known, [`STREAM_AHEAD_MAX`] at most). Early in a boot the guest has
/// read little, and a bound of a multiple of that alone keeps the link
/// idle while the misses already show the guest reads all over the image:
/// on the 4 GiB boot trace the first boot took 114.6 s with the bound
/// alone and 106.6 s with this (download first: 103.8 s). It costs a big
/// disk at most this much link time more.
pub const STREAM_AHEAD: Duration = Duration::from_secs(20);
/// What the stream runs ahead of its bound at most, on however fast a link.
pub const STREAM_AHEAD_MAX: u64 = 1 << 30;
/// Default of `whole_below`: a volume storing at most this many bytes
/// streams whole on its first boot (10 s at 200 Mbit/s; a small Linux
/// image, not a 40 GiB Windows disk).
pub const WHOLE_BELOW: u64 = 256 << 20;
/// Stream flights queued at once (the link budget decides how many run).
const QUEUED: usize = 32;

#[derive(Default)]
struct State {
    /// Distinct chunks missed so far (the clock of the window).
    misses: u64,
    /// Regions not dense yet: their distinct chunks missed, each with the
    /// clock of its miss and whether it counts (not right after another).
    missed: HashMap<u64, Vec<(u64, u64, bool)>>,
    /// Regions found dense, in that order, not streamed yet.
    queue: VecDeque<u64>,
    dense: std::collections::HashSet<u64>,
}

/// Which regions are dense.
pub struct Dense {
    allowed: bool,
    /// A volume storing at most this many bytes streams whole (0: never).
    whole_below: u64,
    /// The stream may run ahead of its bound by what the link moves in this long.
    ahead: Duration,
    /// Bytes the stream may fetch whatever the guest has read: the whole
    /// volume when it is small, else 0.
    floor: AtomicU64,
    /// The volume has no profile: the stream may run.
    enabled: AtomicBool,
    /// Stopped for good (the cache was dropped: refilling it is not wanted).
    stopped: AtomicBool,
    state: Mutex<State>,
}

impl Dense {
    /// `allowed`: the stream may run at all (not with `--hydrate`, which
    /// fetches everything anyway, nor with boot profiles off);
    /// `whole_below`: a volume storing at most this many bytes streams
    /// whole from the start (0: never); `ahead`: the stream may run ahead
    /// of its bound by what the link moves in this long.
    pub fn new(allowed: bool, whole_below: u64, ahead: Duration) -> Self {
        Self {
            allowed,
            whole_below,
            ahead,
            floor: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    /// Ends the stream: nothing more is queued.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Notes a guest miss of chunk `idx`.
    pub fn note_miss(&self, idx: u64, chunk_size: u64) {
        if !self.allowed {
            return;
        }
        let region = idx * chunk_size / REGION_BYTES;
        let mut s = self.state.lock();
        if s.dense.contains(&region) {
            return;
        }
        let now = s.misses;
        let m = s.missed.entry(region).or_default();
        m.retain(|&(_, at, _)| at + RECENT_MISSES > now);
        if m.iter().any(|&(i, _, _)| i == idx) {
            return;
        }
        // A chunk right after one just missed is a file read on (readahead's
        // work), not another place the guest reads: one long file is no
        // sign that its region is dense.
        let elsewhere = !m.iter().any(|&(i, _, _)| i + 1 == idx);
        m.push((idx, now, elsewhere));
        let dense = m.iter().filter(|e| e.2).count() >= DENSE_MISSES;
        s.misses += 1;
        if dense {
            s.missed.remove(&region);
            s.dense.insert(region);
            s.queue.push_back(region);
        }
    }

    /// Every region counts as dense at once, `floor` bytes allowed
    /// whatever the guest reads: a small volume streams whole.
    fn all_dense(&self, regions: u64, floor: u64) {
        let mut s = self.state.lock();
        s.missed.clear();
        s.queue.clear();
        for r in 0..regions {
            s.dense.insert(r);
            s.queue.push_back(r);
        }
        self.floor.store(floor, Ordering::Relaxed);
    }

    /// True when chunk `idx` lies in a region found dense.
    pub fn is_dense(&self, idx: u64, chunk_size: u64) -> bool {
        self.allowed && self.state.lock().dense.contains(&(idx * chunk_size / REGION_BYTES))
    }

    fn next_region(&self) -> Option<u64> {
        self.state.lock().queue.pop_front()
    }

    /// Regions found dense so far.
    pub fn dense_regions(&self) -> usize {
        self.state.lock().dense.len()
    }
}

impl Inner {
    /// Starts the stream (the volume has no boot profile).
    pub(super) fn start_dense_stream(self: &Arc<Self>) {
        if self.dense.allowed && !self.dense.enabled.swap(true, Ordering::SeqCst) {
            self.handle.spawn(self.clone().stream_dense());
        }
    }

    /// Speculative bytes a first boot may have fetched by now.
    fn speculative_bound(&self) -> u64 {
        (STREAM_FACTOR * self.guest_bytes.get()).max(self.dense.floor.load(Ordering::Relaxed))
    }

    /// Speculative bytes the dense regions' stream may have fetched by
    /// now: the bound plus what the link moves in the time it may run
    /// ahead (`first_boot_ahead`).
    fn stream_bound(&self) -> u64 {
        let ahead = match self.dense.ahead {
            t if t.is_zero() => 0,
            t => self.lanes.rate().map_or(0, |r| (r * t.as_secs_f64()) as u64).min(STREAM_AHEAD_MAX),
        };
        self.speculative_bound() + ahead
    }

    /// True while what the boot fetched beyond its own reads (misses,
    /// readahead, the stream, indexes; not the profile, which is the pages
    /// a boot read brought ahead, nor hydration, which `--hydrate` asks
    /// for) is within the bytes the guest read plus the stream's bound
    /// (the time it may run ahead included), with [`BOUND_SLACK`] for its
    /// first misses. Past it readahead waits and a miss outside a streamed
    /// region fetches only the sub-frames it needs, so misses on a disk
    /// whose boot reads small files scattered over many GiB cannot fetch
    /// several times what the guest reads in runs it never uses.
    ///
    /// The same bound as the stream's: judged without the time it may run
    /// ahead, a stream using that time pushed the misses to single
    /// sub-frames, one round trip each, and on a link shared fairly (where
    /// the stream takes a larger share and the guest falls behind it) the
    /// boot then crawled (first boot through the Drive emulator 125 s,
    /// 117.7 s with one bound).
    pub(super) fn fetched_within_bound(&self) -> bool {
        let fetched: u64 = [Source::Miss, Source::Readahead, Source::Stream, Source::Index]
            .into_iter()
            .map(|src| self.lanes.bytes(src))
            .sum();
        fetched < self.guest_bytes.get() + self.stream_bound() + BOUND_SLACK
    }

    /// True when a guest miss in chunk `idx` fetches the whole chunk as
    /// the stream's work: its region is dense and the stream's bound has
    /// room. Past the bound the stream waits, so whole chunks cannot carry
    /// a first boot past it.
    pub(super) fn dense_and_streaming(&self, idx: u64) -> bool {
        self.dense.is_dense(idx, self.cs) && self.lanes.speculative_bytes() < self.stream_bound()
    }

    fn local_or_running(&self, idx: u64) -> bool {
        self.is_zero(idx) || self.ssd.has_chunk(idx) || self.flights.contains(&idx)
    }

    /// Streams dense regions, in the order they were found, until the boot
    /// is over (the recording ended) or the store closes.
    async fn stream_dense(self: Arc<Self>) {
        let mut set = tokio::task::JoinSet::new();
        let per_region = (REGION_BYTES / self.cs).max(1);
        let booting =
            || self.recorder.as_ref().is_some_and(|r| r.active()) && !self.dense.stopped.load(Ordering::SeqCst);
        let mut streamed = 0u64;
        // Bytes of the chunks queued so far (fetched or not): the bound
        // counts them when they are queued, not when they land.
        let mut issued = 0u64;
        let missing: u64 = (0..self.vol.chunk_count())
            .filter(|&i| !self.local_or_running(i))
            .map(|i| super::fetch::wire_len(&self.vol.chunk_ref(i), self.vol.chunk_len(i) as u64))
            .sum();
        if missing > 0 && missing <= self.dense.whole_below {
            tracing::info!(bytes = missing, "small volume: its first boot streams all of it");
            self.dense.all_dense(self.vol.chunk_count().div_ceil(per_region), missing);
        }
        loop {
            if self.closed.load(Ordering::Relaxed) || !booting() {
                break;
            }
            let Some(region) = self.dense.next_region() else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let first = region * per_region;
            let end = (first + per_region).min(self.vol.chunk_count());
            for idx in first..end {
                if self.local_or_running(idx) {
                    continue;
                }
                // Within the bound, with room in the queue.
                loop {
                    while set.try_join_next().is_some() {}
                    let others = self.lanes.speculative_bytes().saturating_sub(self.lanes.bytes(Source::Stream));
                    let within = issued + others < self.stream_bound();
                    if within && set.len() < QUEUED {
                        break;
                    }
                    if self.closed.load(Ordering::Relaxed) || !booting() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if self.local_or_running(idx) {
                    continue;
                }
                let f = self.flight(idx, false, Source::Stream);
                streamed += 1;
                issued += super::fetch::wire_len(&self.vol.chunk_ref(idx), self.vol.chunk_len(idx) as u64);
                set.spawn(async move {
                    let _ = f.await;
                });
            }
        }
        while set.join_next().await.is_some() {}
        tracing::info!(
            regions = self.dense.dense_regions(),
            chunks = streamed,
            bytes = self.lanes.bytes(Source::Stream),
            "first-boot stream ended"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_turn_dense_after_distinct_misses() {
        let cs = 1 << 20;
        let d = Dense::new(true, 0, Duration::ZERO);
        for _ in 0..10 {
            d.note_miss(3, cs); // the same chunk again and again
        }
        assert_eq!(d.dense_regions(), 0);
        for i in 0..DENSE_MISSES as u64 - 2 {
            d.note_miss(10 + 2 * i, cs);
        }
        assert_eq!(d.dense_regions(), 0, "one distinct chunk short");
        d.note_miss(63, cs);
        assert_eq!(d.dense_regions(), 1);
        assert_eq!(d.next_region(), Some(0));
        d.note_miss(64, cs); // region 1: one miss
        assert_eq!(d.next_region(), None);
        let off = Dense::new(false, 0, Duration::ZERO);
        for idx in 0..10 {
            off.note_miss(idx, cs);
        }
        assert_eq!(off.dense_regions(), 0);
    }

    /// Misses scattered over a big disk (a few per region, far apart in
    /// time) never make a region dense; the same misses close together do.
    #[test]
    fn density_is_judged_among_recent_misses() {
        let cs = 1 << 20;
        let per_region = REGION_BYTES / cs;
        let regions = 320; // 20 GiB of data
        let d = Dense::new(true, 0, Duration::ZERO);
        // Round after round, every region gets one more distinct chunk.
        for round in 0..DENSE_MISSES as u64 * 2 {
            for r in 0..regions {
                d.note_miss(r * per_region + 2 * round, cs);
            }
        }
        assert_eq!(d.dense_regions(), 0, "{regions} regions, each missed once per {regions} misses");
        // One long file read across many chunks of a region.
        let file = Dense::new(true, 0, Duration::ZERO);
        for idx in 10..40 {
            file.note_miss(idx, cs);
        }
        assert_eq!(file.dense_regions(), 0, "a file read on is readahead's, not a dense region");
        let close = Dense::new(true, 0, Duration::ZERO);
        for round in 0..DENSE_MISSES as u64 {
            for r in 0..8 {
                close.note_miss(r * per_region + 2 * round, cs);
            }
        }
        assert_eq!(close.dense_regions(), 8);
    }
}
