//! The first boot's stream: with no boot profile, once guest misses show
//! that a region of the image is dense (several of its chunks missed), the
//! rest of that region streams in the background as speculative work — at
//! full link speed, behind every guest miss, and never more than
//! [`STREAM_FACTOR`] times the bytes the guest has read. A volume whose
//! stored bytes are few (at most `whole_below`) streams whole from the
//! start: fetching all of it costs less than the round trips its boot's
//! misses would.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::fetch::Source;
use super::Inner;

/// Bytes of the image judged together.
pub const REGION_BYTES: u64 = 64 << 20;
/// Distinct chunks of a region missed before it counts as dense.
pub const DENSE_MISSES: usize = 4;
/// Speculative bytes a first boot fetches at most, per byte the guest read.
pub const STREAM_FACTOR: u64 = 3;
/// Default of `whole_below`: a volume storing at most this many bytes
/// streams whole on its first boot (10 s at 200 Mbit/s; a small Linux
/// image, not a 40 GiB Windows disk).
pub const WHOLE_BELOW: u64 = 256 << 20;
/// Stream flights queued at once (the link budget decides how many run).
const QUEUED: usize = 32;

#[derive(Default)]
struct State {
    /// Regions not dense yet: the distinct chunks missed in each.
    missed: HashMap<u64, Vec<u64>>,
    /// Regions found dense, in that order, not streamed yet.
    queue: VecDeque<u64>,
    dense: std::collections::HashSet<u64>,
}

/// Which regions are dense.
pub struct Dense {
    allowed: bool,
    /// A volume storing at most this many bytes streams whole (0: never).
    whole_below: u64,
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
    /// whole from the start (0: never).
    pub fn new(allowed: bool, whole_below: u64) -> Self {
        Self {
            allowed,
            whole_below,
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
        let m = s.missed.entry(region).or_default();
        if !m.contains(&idx) {
            m.push(idx);
        }
        if m.len() >= DENSE_MISSES {
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
                    let bound = (STREAM_FACTOR * self.guest_bytes.get()).max(self.dense.floor.load(Ordering::Relaxed));
                    let within = issued + others < bound;
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
        let d = Dense::new(true, 0);
        for _ in 0..10 {
            d.note_miss(3, cs); // the same chunk again and again
        }
        assert_eq!(d.dense_regions(), 0);
        for idx in [1, 2, 63] {
            d.note_miss(idx, cs);
        }
        assert_eq!(d.dense_regions(), 1);
        assert_eq!(d.next_region(), Some(0));
        d.note_miss(64, cs); // region 1: one miss
        assert_eq!(d.next_region(), None);
        let off = Dense::new(false, 0);
        for idx in 0..10 {
            off.note_miss(idx, cs);
        }
        assert_eq!(off.dense_regions(), 0);
    }
}
