//! Who gets the link. A guest miss is urgent: it goes to the remote at
//! once. Speculative work (profile streaming, readahead, hydration, pins,
//! the first-boot stream) shares a budget of in-flight bytes, so a guest
//! miss never queues behind more than that on a shared link; a speculative
//! flight a guest joins stops waiting for the budget. The budget follows
//! the link: it grows while speculative work waits for it and the guest's
//! own fetches take no longer than the link's quickest (so on a link that
//! shares itself fairly, or with long round trips, the stream runs at full
//! speed), and shrinks when they queue behind it. Speculative requests go
//! to the remote marked so ([`crate::remote::priority`]): a queue in front
//! of it (Drive's pacer) serves a guest's first. Bytes are counted by
//! what caused them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::link_speed::LinkSpeed;
use crate::tier::single_flight::Urgency;
use crate::volume::ChunkRef;

/// Speculative bytes in flight at least, while the link is not known or
/// is fast: a 200 Mbit/s link with 100 ms round trips stays busy (its
/// bandwidth-delay product is 2.5 MB) while a guest miss waits behind at
/// most ~1.5 MB of it.
pub const SPECULATIVE_BYTES: u64 = 4 << 20;

/// Once the link is known the least budget is this many of its round
/// trips' worth of bytes (if that is less than the configured least): it
/// keeps the link busy, and a guest miss queues behind about one round
/// trip of it. On a 10 Mbit/s link 4 MiB would be over 3 s of link.
const LINK_ROUNDS: f64 = 2.0;
/// The least budget whatever the link.
const LEAST_BYTES: u64 = 256 << 10;

/// Speculative bytes in flight at most.
pub const SPECULATIVE_MAX: u64 = 64 << 20;

/// A guest fetch that took this much longer than the link's quickest
/// (beyond moving its bytes) queued behind speculative work; at least
/// `QUEUE_MIN`, and this share of the quickest.
const QUEUE_SHARE: f64 = 0.25;
const QUEUE_MIN: Duration = Duration::from_millis(25);
/// Guest fetches this recent still speak for the link.
const GUEST_FRESH: Duration = Duration::from_secs(2);
/// What the budget keeps when it shrinks.
const SHRINK: f64 = 0.8;
/// The budget never holds more than the link moves in this long: a guest
/// miss that comes after a long quiet stream waits behind at most that
/// on a link that serves requests in turn.
const MOST_QUEUED: Duration = Duration::from_secs(1);

/// Why bytes crossed the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A guest request waits for them.
    Miss,
    /// The boot profile's stream.
    Profile,
    /// Sequential readahead.
    Readahead,
    /// Hydration and pinned chunks.
    Hydrate,
    /// The first boot's stream of the dense region (no profile yet).
    Stream,
    /// Packs' sub-frame indexes (what lets a miss fetch part of a chunk).
    Index,
}

impl Source {
    const ALL: [Source; 6] =
        [Source::Miss, Source::Profile, Source::Readahead, Source::Hydrate, Source::Stream, Source::Index];

    fn slot(self) -> usize {
        Self::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }
}

/// The speculative lane's budget and the bytes by source.
pub struct Lanes {
    /// Permits are KiB of speculative bytes in flight.
    speculative: Semaphore,
    budget: Mutex<Budget>,
    /// The least the budget holds (KiB) until the link is known, and the
    /// most a speculative fetch asks for.
    floor_kib: u32,
    /// The budget grows by about this much per budget's worth of fetches.
    chunk: u64,
    origin: Instant,
    bytes: [AtomicU64; 6],
}

/// The budget and what it is judged by.
struct Budget {
    /// Permits the semaphore was given (KiB).
    cap_kib: u32,
    speed: LinkSpeed,
    /// How much longer than the link's quickest recent guest fetches took
    /// (seconds, a moving average), and when the last one ended.
    guest_queue: f64,
    guest_at: Option<Duration>,
    /// When the budget last shrank: once per round trip, as one signal.
    cut_at: Option<Duration>,
    /// Permits asked for by the fetches waiting now (asked -> how many):
    /// the budget never shrinks below the largest, so no fetch waits for
    /// more permits than exist (the semaphore hands a waiting fetch the
    /// permits that come free, but one that asked and is not queued yet
    /// has none of them).
    asks: BTreeMap<u32, usize>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self::new(SPECULATIVE_BYTES, 1 << 20)
    }
}

/// Counts a fetch waiting for the budget, and the permits it asks for,
/// while it lives (a wait given up half-way, its future dropped, counts no
/// more).
struct Waiting<'a> {
    lanes: &'a Lanes,
    kib: u32,
}

impl<'a> Waiting<'a> {
    /// Registers a fetch of `bytes`: it asks for that many KiB, but no
    /// more than the budget holds now nor than a fetch asks for at most.
    fn new(lanes: &'a Lanes, bytes: u64) -> Self {
        let kib = {
            let mut b = lanes.budget.lock();
            let kib = bytes.div_ceil(1024).clamp(1, lanes.floor_kib.min(b.cap_kib) as u64) as u32;
            *b.asks.entry(kib).or_default() += 1;
            kib
        };
        Self { lanes, kib }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut b = self.lanes.budget.lock();
        if let Some(n) = b.asks.get_mut(&self.kib) {
            *n -= 1;
            if *n == 0 {
                b.asks.remove(&self.kib);
            }
        }
    }
}

/// A fetch admitted to the link. Tell it when its bytes arrived (`done`)
/// so the budget learns from it; hold it while the fetch runs.
pub struct Admitted<'a> {
    lanes: &'a Lanes,
    _permit: Option<SemaphorePermit<'a>>,
    start: Instant,
    /// A guest waits for it.
    guest: bool,
}

impl Admitted<'_> {
    /// Whether it holds part of the speculative budget (it did not go at
    /// once as urgent, nor stop waiting when a guest joined).
    #[cfg(test)]
    fn in_budget(&self) -> bool {
        self._permit.is_some()
    }

    /// The fetch starts now (after waiting for a fetch slot, say).
    pub fn started(&mut self) {
        self.start = Instant::now();
    }

    /// Its `bytes` arrived. Judged as a guest's fetch only if it went as
    /// one: a speculative fetch a guest joined on the way took as long as
    /// speculative work does.
    pub fn done(self, bytes: u64) {
        self.lanes.learn(bytes, self.start.elapsed(), self.guest);
    }
}

impl Lanes {
    /// A lane letting at least `floor` speculative bytes be in flight, and
    /// more while the link takes more without delaying guests (growing by
    /// about `chunk` bytes per budget's worth of fetches).
    pub fn new(floor: u64, chunk: u64) -> Self {
        let floor_kib = (floor >> 10).clamp(1, SPECULATIVE_MAX.max(floor) >> 10) as u32;
        Self {
            speculative: Semaphore::new(floor_kib as usize),
            budget: Mutex::new(Budget {
                cap_kib: floor_kib,
                speed: LinkSpeed::default(),
                guest_queue: 0.0,
                guest_at: None,
                cut_at: None,
                asks: BTreeMap::new(),
            }),
            floor_kib,
            chunk: chunk.max(1024),
            origin: Instant::now(),
            bytes: Default::default(),
        }
    }

    /// Waits for the link: at once when urgent (now or later, when a guest
    /// joins), else until `bytes` fit in the speculative budget (a fetch
    /// larger than the budget, or than its configured least, counts as
    /// that much).
    pub async fn admit(&self, bytes: u64, urgency: &Urgency) -> Admitted<'_> {
        let permit = if urgency.is_urgent() {
            None
        } else {
            let waiting = Waiting::new(self, bytes);
            tokio::select! {
                p = self.speculative.acquire_many(waiting.kib) => p.ok(),
                _ = urgency.raised() => None,
            }
        };
        let guest = permit.is_none();
        urgency.mark_sent();
        Admitted { lanes: self, _permit: permit, start: Instant::now(), guest }
    }

    /// A fetch outside the budget, `guest` when a guest waits for it,
    /// timed so the budget learns from it.
    pub fn timed(&self, guest: bool) -> Admitted<'_> {
        Admitted { lanes: self, _permit: None, start: Instant::now(), guest }
    }

    /// The link's rate (bytes/s), once enough fetches have ended to tell.
    pub fn rate(&self) -> Option<f64> {
        self.budget.lock().speed.rate()
    }

    /// Speculative bytes allowed in flight now.
    pub fn budget(&self) -> u64 {
        u64::from(self.budget.lock().cap_kib) << 10
    }

    /// Speculative fetches waiting for the budget now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.budget.lock().asks.values().sum()
    }

    /// Learns from a fetch of `bytes` that took `took` (`guest`: one a
    /// guest waited for) and resizes the budget: smaller when guests'
    /// fetches queue (down to two of the link's round trips' worth, or the
    /// configured least if that is less), larger when speculative work
    /// waits and they do not.
    fn learn(&self, bytes: u64, took: Duration, guest: bool) {
        self.learn_at(self.origin.elapsed(), bytes, took, guest)
    }

    /// `learn`, for a fetch that ended at `now` (since `origin`).
    fn learn_at(&self, now: Duration, bytes: u64, took: Duration, guest: bool) {
        let mut b = self.budget.lock();
        b.speed.record(now, bytes, took);
        let (Some(rate), Some(quickest)) = (b.speed.rate(), b.speed.delay()) else { return };
        if guest {
            let queued = (took.as_secs_f64() - bytes as f64 / rate.max(1.0) - quickest.as_secs_f64()).max(0.0);
            let fresh = b.guest_at.is_some_and(|t| now.saturating_sub(t) < GUEST_FRESH);
            b.guest_queue = if fresh { 0.8 * b.guest_queue + 0.2 * queued } else { queued };
            b.guest_at = Some(now);
        }
        let fresh = b.guest_at.is_some_and(|t| now.saturating_sub(t) < GUEST_FRESH);
        let too_long = QUEUE_MIN.as_secs_f64().max(QUEUE_SHARE * quickest.as_secs_f64());
        let cap = (b.cap_kib as f64) * 1024.0;
        let want = if fresh && b.guest_queue > too_long {
            if b.cut_at.is_some_and(|t| now.saturating_sub(t) < quickest) {
                return;
            }
            b.cut_at = Some(now);
            cap * SHRINK
        } else if !b.asks.is_empty() && !guest {
            cap + self.chunk as f64 * bytes as f64 / cap
        } else {
            return;
        };
        let most = (rate * MOST_QUEUED.as_secs_f64()) as u64;
        // The least: the link's round trips, within the configured least,
        // and never below what a waiting fetch asked for.
        let link = ((LINK_ROUNDS * rate * quickest.as_secs_f64()) as u64).max(LEAST_BYTES);
        let asked = b.asks.keys().next_back().copied().unwrap_or(0);
        let least = ((link >> 10).min(self.floor_kib as u64) as u32).max(asked);
        let want_kib =
            ((want as u64).min(most) >> 10).clamp(least as u64, (SPECULATIVE_MAX >> 10).max(least as u64)) as u32;
        if want_kib > b.cap_kib {
            self.speculative.add_permits((want_kib - b.cap_kib) as usize);
            b.cap_kib = want_kib;
        } else if want_kib < b.cap_kib {
            // Only free permits can go; the rest go as later fetches end.
            b.cap_kib -= self.speculative.forget_permits((b.cap_kib - want_kib) as usize) as u32;
        }
    }

    /// Counts `n` bytes fetched for `src`.
    pub fn count(&self, src: Source, n: u64) {
        self.bytes[src.slot()].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes fetched for `src` so far.
    pub fn bytes(&self, src: Source) -> u64 {
        self.bytes[src.slot()].load(Ordering::Relaxed)
    }

    /// Speculative bytes fetched so far (everything but misses).
    pub fn speculative_bytes(&self) -> u64 {
        Source::ALL.iter().filter(|&&s| s != Source::Miss).map(|&s| self.bytes(s)).sum()
    }
}

/// Bytes a fetch of `r` moves (a chunk of `chunk_len` bytes).
pub fn wire_len(r: &ChunkRef, chunk_len: u64) -> u64 {
    match r {
        ChunkRef::Zero => 0,
        ChunkRef::Base => chunk_len,
        ChunkRef::Packed { len, .. } => *len,
        ChunkRef::Patched { base, len, .. } => wire_len(base, chunk_len) + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Speculative fetches wait for the budget; an urgent one never does,
    /// and a waiting speculative one goes once a guest joins it.
    #[test]
    fn urgent_work_skips_the_speculative_budget() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let lanes = Arc::new(Lanes::new(2 << 20, 1 << 20));
            let held = lanes.admit(2 << 20, &Urgency::new(false)).await;
            assert!(held.in_budget());
            // Full: a speculative fetch waits...
            let slow = Urgency::new(false);
            let t = tokio::time::timeout(Duration::from_millis(50), lanes.admit(1 << 20, &slow)).await;
            assert!(t.is_err(), "the budget is used up");
            assert_eq!(lanes.waiting(), 0, "a wait given up no longer counts");
            // ...an urgent one does not...
            assert!(!lanes.admit(1 << 20, &Urgency::new(true)).await.in_budget());
            // ...and a raised one stops waiting.
            let l2 = lanes.clone();
            let s2 = slow.clone();
            let waiter = tokio::spawn(async move { !l2.admit(1 << 20, &s2).await.in_budget() });
            tokio::time::sleep(Duration::from_millis(20)).await;
            slow.raise();
            assert!(waiter.await.unwrap());
            drop(held);
            let big = lanes.admit(3 << 20, &Urgency::new(false)).await;
            assert!(big.in_budget(), "larger than the budget: all of it");
            assert_eq!(lanes.speculative.available_permits(), 0);
        });
        let lanes = Lanes::default();
        lanes.count(Source::Miss, 5);
        lanes.count(Source::Profile, 7);
        lanes.count(Source::Stream, 1);
        assert_eq!((lanes.bytes(Source::Miss), lanes.speculative_bytes()), (5, 8));
    }

    /// Teaches `lanes` a link of `rate` bytes/s and `delay` per fetch, with
    /// `n` fetches of 1 MB finishing one after another.
    /// Returns when the last one ended.
    fn teach(lanes: &Lanes, n: u64, rate: f64, delay: Duration) -> Duration {
        teach_in(lanes, n, 1_000_000, rate, delay)
    }

    /// `teach`, with fetches of `bytes`.
    fn teach_in(lanes: &Lanes, n: u64, bytes: u64, rate: f64, delay: Duration) -> Duration {
        let mut b = lanes.budget.lock();
        let now = lanes.origin.elapsed();
        let each = Duration::from_secs_f64(bytes as f64 / rate);
        for i in 0..n {
            b.speed.record(now + each * i as u32, bytes, delay + each);
        }
        now + each * (n - 1) as u32
    }

    /// Starts a speculative 1 MiB fetch and returns once it waits for the
    /// budget; it yields whether it got into the budget.
    async fn park_a_waiter(lanes: &Arc<Lanes>) -> tokio::task::JoinHandle<bool> {
        let l2 = lanes.clone();
        let waiter = tokio::spawn(async move { l2.admit(1 << 20, &Urgency::new(false)).await.in_budget() });
        while lanes.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        waiter
    }

    /// The budget grows while speculative work waits for it and guests'
    /// fetches take no longer than the link's quickest; it shrinks (once
    /// per round trip, never below the least) when they queue, and permits
    /// in use go as they come back.
    #[test]
    fn the_budget_grows_until_guests_queue() {
        // One thread: the waiting fetch stays waiting until the test yields.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let lanes = Arc::new(Lanes::new(4 << 20, 1 << 20));
            // 25 MB/s, 200 ms at the quickest.
            teach(&lanes, 40, 25e6, Duration::from_millis(200));
            let ms = Duration::from_millis;
            // Nothing waits: no reason to grow.
            lanes.learn(1_000_000, ms(240), false);
            assert_eq!(lanes.budget(), 4 << 20);
            // The stream waits for the budget (all of it in flight).
            let held = lanes.admit(4 << 20, &Urgency::new(false)).await;
            let waiter = park_a_waiter(&lanes).await;
            for _ in 0..30 {
                lanes.learn(1_000_000, ms(300), false);
            }
            let grown = lanes.budget();
            assert!(grown > 6 << 20, "{grown}: about a chunk per budget's worth");
            assert!(waiter.await.unwrap(), "the grown budget let the waiting fetch go");
            // A guest fetch that took as long as the link's quickest: still
            // growing.
            lanes.learn(64_000, ms(205), true);
            assert!(lanes.budget() >= grown);
            // Guests queue: it shrinks, once per round trip (200 ms), but
            // only by the permits not in use...
            let held2 = lanes.admit(2 << 20, &Urgency::new(false)).await;
            lanes.learn(64_000, ms(900), true);
            let cut = lanes.budget();
            assert!(cut < grown && cut > 5 << 20, "{cut} of {grown}");
            lanes.learn(64_000, ms(900), true);
            assert_eq!(lanes.budget(), cut, "one cut per round trip");
            // ...and never below the least.
            drop((held, held2));
            for _ in 0..12 {
                tokio::time::sleep(ms(210)).await;
                lanes.learn(64_000, ms(900), true);
            }
            assert_eq!(lanes.budget(), 4 << 20);
            assert_eq!(lanes.speculative.available_permits(), 4096);
        });
    }

    /// On a slow link the budget shrinks below its configured least, to
    /// two round trips' worth of the link, when guests queue behind it:
    /// 4 MiB on a 10 Mbit/s link would put 3 s of speculative bytes ahead
    /// of every guest miss. A fetch waiting for all of the budget holds it
    /// up until it goes, and then gets all it asked for.
    #[test]
    fn on_a_slow_link_guests_queue_behind_two_round_trips_at_most() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let lanes = Arc::new(Lanes::new(SPECULATIVE_BYTES, 1 << 20));
            // 1.25 MB/s (10 Mbit/s), 100 ms at the quickest, in fetches small
            // enough for a second's rate to tell.
            let mut t = teach_in(&lanes, 200, 64_000, 1.25e6, Duration::from_millis(100));
            let mut guests_queue = |lanes: &Lanes, times: usize| {
                for _ in 0..times {
                    t += Duration::from_millis(110);
                    lanes.learn_at(t, 64_000, Duration::from_millis(900), true);
                }
            };
            // 1 MiB in flight, and a fetch waiting for all of the budget.
            let held = lanes.admit(1 << 20, &Urgency::new(false)).await;
            let l2 = lanes.clone();
            let waiter = tokio::spawn(async move { l2.admit(8 << 20, &Urgency::new(false)).await.in_budget() });
            while lanes.waiting() == 0 {
                tokio::task::yield_now().await;
            }
            guests_queue(&lanes, 30);
            assert_eq!(lanes.budget(), SPECULATIVE_BYTES, "the free permits went to the fetch waiting for all of it");
            drop(held);
            let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            assert!(got.expect("the waiting fetch got its permits").unwrap());
            guests_queue(&lanes, 30);
            assert_eq!(lanes.budget(), LEAST_BYTES, "two round trips of 125 KB, at least 256 KiB");
            assert_eq!(lanes.speculative.available_permits(), (LEAST_BYTES >> 10) as usize);
            // A fetch asks for no more than the budget holds now.
            let one = lanes.admit(1 << 20, &Urgency::new(false)).await;
            assert!(one.in_budget());
            assert_eq!(lanes.speculative.available_permits(), 0);
        });
    }

    /// On a slow link the budget stays within what it moves in a second,
    /// however long speculative work waits.
    #[test]
    fn a_slow_link_keeps_the_least_budget() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let lanes = Arc::new(Lanes::new(1 << 20, 1 << 20));
            // 1.25 MB/s (10 Mbit/s), 100 ms at the quickest.
            let mut t = teach(&lanes, 40, 1.25e6, Duration::from_millis(100));
            let _held = lanes.admit(1 << 20, &Urgency::new(false)).await;
            let _waiter = park_a_waiter(&lanes).await;
            // Fetches ending as fast as such a link delivers them.
            for _ in 0..100 {
                t += Duration::from_millis(800);
                lanes.learn_at(t, 1_000_000, Duration::from_millis(900), false);
            }
            // A second's rate is judged from whole fetches: up to one more.
            let b = lanes.budget();
            assert!((1 << 20..=2_100_000).contains(&b), "{b}");
        });
    }
}
