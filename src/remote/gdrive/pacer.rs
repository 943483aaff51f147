//! A token-bucket pacer shared by every request of one Drive account: Drive
//! throttles per user, and answers bursts over its limit with 403/429
//! rate-limit errors well before the link is full, so requests are spaced
//! here rather than discovered by failing. The rate adapts: while requests
//! queue behind the pacer and Drive has not refused any, it climbs (by a
//! quarter a second until the first refusal, slowly after) up to the
//! configured ceiling; when Drive says "slow down" it halves (down to a
//! sixteenth of the starting rate). So an account whose real limit is above
//! the starting rate gets the link's worth of requests, and one whose limit
//! is below it costs a few refusals, not a stream of them. Requests queue
//! in turn, except that speculative ones ([`crate::remote::priority`]) let
//! every other request go first: a guest's miss waits for the next slot,
//! not behind the profile stream's, hydration's or a background upload's
//! requests. After five slots in a row to the others while a speculative
//! request waits, the oldest goes: a guest that keeps a throttled account
//! busy alone still leaves a sixth of it to its uploads.
//!
//! Drive limits the account, not the process: a pacer made with
//! [`Pacer::shared`] keeps the slot clock, the rate and what waits in a
//! host-wide record (`pacer/host.rs`), so every daemon and command of this host on
//! one account shares one budget: a refusal one sees slows them all, and a
//! speculative request in one lets a guest's requests waiting in another
//! go first. Each process still orders its own callers as above; the one
//! first in its line asks the record for the slot.

mod host;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::remote::config::PacerConfig;
use crate::remote::priority::{self, Speculative};

/// Hands out request slots at an adaptive rate with bursts of `burst`.
#[derive(Debug)]
pub struct Pacer {
    cfg: PacerConfig,
    state: Mutex<Bucket>,
    /// The account's host-wide record, when shared.
    host: Option<host::HostBucket>,
    /// Set once the record failed: pacing is this process's from then on.
    host_failed: AtomicBool,
}

#[derive(Debug)]
struct Bucket {
    /// Slots taken so far.
    taken: f64,
    /// Callers waiting for a slot, in the order they came.
    waiting: Vec<Waiter>,
    /// Callers so far (the order of `waiting`).
    arrived: u64,
    /// Slots the bucket has made available so far (as of `at`): the caller
    /// first in line may go once this passes `taken`. Refills stop `burst`
    /// ahead of the slots taken and waited for.
    avail: f64,
    at: Instant,
    /// Requests per second in force (`cfg.rate / 16 ..= cfg.max_rate`).
    rate: f64,
    /// When the rate was last halved: the refusals of one burst arrive
    /// together and count as one signal.
    last_cut: Option<Instant>,
    /// Refusals seen (for status).
    refusals: u64,
    /// Slots taken in a row by callers not speculative while a
    /// speculative one waited (see [`SPECULATIVE_EVERY`]).
    others_run: u32,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    /// When it came (host ns; shared pacers only).
    since: u64,
    /// Speculative while this holds: it goes after every other caller.
    mark: Option<Speculative>,
}

impl Waiter {
    fn speculative(&self) -> bool {
        self.mark.as_ref().is_some_and(Speculative::holds)
    }
}

impl Bucket {
    /// Slots taken and waited for.
    fn issued(&self) -> f64 {
        self.taken + self.waiting.len() as f64
    }

    /// Callers ahead of caller `seq`: every caller not speculative that came
    /// before it, and, when it is speculative, every one that is not too —
    /// except that once [`SPECULATIVE_EVERY`] slots in a row went to the
    /// others, the oldest speculative caller is first.
    fn ahead_of(&self, seq: u64) -> usize {
        let favoured = (self.others_run >= SPECULATIVE_EVERY)
            .then(|| self.waiting.iter().filter(|w| w.speculative()).map(|w| w.seq).min())
            .flatten();
        let place = |w: &Waiter| {
            let class = if Some(w.seq) == favoured {
                0
            } else if w.speculative() {
                2
            } else {
                1
            };
            (class, w.seq)
        };
        let Some(me) = self.waiting.iter().find(|w| w.seq == seq).map(place) else { return 0 };
        self.waiting.iter().filter(|w| w.seq != seq && place(w) < me).count()
    }

    /// What waits here, for the host-wide record, without caller `except`.
    fn summary(&self, except: Option<u64>) -> host::Waiting {
        let mut w = host::Waiting::default();
        for x in self.waiting.iter().filter(|x| Some(x.seq) != except) {
            if x.speculative() {
                w.speculative += 1;
                if w.oldest_speculative == 0 || x.since < w.oldest_speculative {
                    w.oldest_speculative = x.since.max(1);
                }
            } else {
                w.urgent += 1;
            }
        }
        w
    }

    /// Caller `seq` takes a slot: counts the slots the others took in a
    /// row while a speculative caller waited.
    fn took(&mut self, seq: u64) {
        let spec = self.waiting.iter().find(|w| w.seq == seq).is_some_and(Waiter::speculative);
        if spec {
            self.others_run = 0;
        } else if self.waiting.iter().any(|w| w.seq != seq && w.speculative()) {
            self.others_run += 1;
        }
        self.taken += 1.0;
        self.waiting.retain(|w| w.seq != seq);
    }
}

/// Speculative requests wait behind the others, but not for ever: after
/// this many slots in a row went to others while one waited, the oldest
/// goes next. A guest that alone asks for the whole rate of a throttled
/// account so leaves a sixth of it to uploads, the profile stream and
/// hydration, and waits at most one slot more for that.
const SPECULATIVE_EVERY: u32 = 5;

/// Lowest share of the starting rate after repeated throttling.
const MIN_FACTOR: f64 = 1.0 / 16.0;
/// Share of the starting rate won back per second below it, busy or not.
const RECOVERY_PER_SEC: f64 = 0.05;
/// Growth per second of queueing before Drive has ever refused: finds a
/// high limit within seconds (20/s to 200/s in about 10 s).
const SLOW_START_PER_SEC: f64 = 0.25;
/// Growth per second of queueing, as a share of the starting rate, once
/// Drive has refused: creeps back towards the limit it found.
const PROBE_PER_SEC: f64 = 0.02;
/// After a refusal the rate holds this long before it may climb again.
const HOLD_AFTER_CUT: Duration = Duration::from_secs(5);
/// A waiting caller looks again this often, so a rate that climbed while
/// it waited is seen soon.
const RECHECK: Duration = Duration::from_millis(100);
/// A speculative caller looks again this often: one a guest came to wait
/// for (a miss joined the profile stream's read) moves up within this.
const RECHECK_SPECULATIVE: Duration = Duration::from_millis(20);

/// A caller's place in line; dropped before its slot is taken (a deadline,
/// a cancelled read), it leaves the line and every later caller moves up.
struct Ticket<'a> {
    pacer: &'a Pacer,
    seq: u64,
    taken: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.taken {
            let mut b = self.pacer.state.lock();
            self.pacer.advance(&mut b);
            b.waiting.retain(|w| w.seq != self.seq);
            if let Some(h) = self.pacer.host() {
                if let Err(e) = h.publish(b.summary(None)) {
                    self.pacer.host_error(&e);
                }
            }
        }
    }
}

/// The pacer's state, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PacerStats {
    /// Requests per second in force.
    pub rate: f64,
    /// Rate-limit answers Drive gave.
    pub refusals: u64,
}

impl Pacer {
    /// A full bucket at the starting rate.
    pub fn new(cfg: PacerConfig) -> Self {
        let rate = cfg.rate.max(0.001);
        let cfg = PacerConfig { rate, burst: cfg.burst.max(1), max_rate: cfg.max_rate.max(rate) };
        Self {
            cfg,
            state: Mutex::new(Bucket {
                taken: 0.0,
                waiting: Vec::new(),
                arrived: 0,
                avail: cfg.burst as f64,
                at: Instant::now(),
                rate,
                last_cut: None,
                refusals: 0,
                others_run: 0,
            }),
            host: None,
            host_failed: AtomicBool::new(false),
        }
    }

    /// A pacer whose slot clock and rate every process of this host
    /// shares through the record at `path` (one per account). A record
    /// that cannot be opened (a read-only directory) leaves pacing to this
    /// process, with a warning.
    pub fn shared(cfg: PacerConfig, path: &Path) -> Self {
        let mut p = Self::new(cfg);
        match host::HostBucket::open(path, p.cfg) {
            Ok(h) => p.host = Some(h),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot open the host-wide Drive pacer record: this process paces its own requests only"
            ),
        }
        p
    }

    /// Where the host-wide record of the account `account_key`
    /// ([`super::auth::Auth::account_key`]) lives in `dir`.
    pub fn record_path(dir: &Path, account_key: &str) -> std::path::PathBuf {
        dir.join(format!("drive-pacer-{account_key}"))
    }

    /// The host-wide record, unless there is none or it failed.
    fn host(&self) -> Option<&host::HostBucket> {
        self.host.as_ref().filter(|_| !self.host_failed.load(Ordering::Relaxed))
    }

    /// The host-wide record failed: warns once, and paces locally after.
    fn host_error(&self, e: &std::io::Error) {
        if !self.host_failed.swap(true, Ordering::Relaxed) {
            let path = self.host.as_ref().map(|h| h.path().display().to_string()).unwrap_or_default();
            tracing::warn!(path, error = %e, "the host-wide Drive pacer record failed: this process paces its own requests only");
        }
    }

    /// True while this pacer shares the host-wide record.
    pub fn is_shared(&self) -> bool {
        self.host().is_some()
    }

    /// The settings in force.
    pub fn config(&self) -> PacerConfig {
        self.cfg
    }

    /// Brings the bucket to now: slots refilled, and the rate won back
    /// (below the start) or grown (above it, for the time callers queued).
    fn advance(&self, b: &mut Bucket) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        // Callers queued for as long as the promised slots took to refill.
        let short = b.issued() - b.avail;
        let queued = if short > 0.0 { elapsed.min(short / b.rate) } else { 0.0 };
        b.avail = (b.avail + elapsed * b.rate).min(b.issued() + self.cfg.burst as f64);
        b.at = now;
        let start = self.cfg.rate;
        if b.rate < start {
            b.rate = (b.rate + elapsed * RECOVERY_PER_SEC * start).min(start);
        } else if queued > 0.0 && b.last_cut.is_none_or(|t| now.saturating_duration_since(t) >= HOLD_AFTER_CUT) {
            b.rate = match b.last_cut {
                None => b.rate * (1.0 + SLOW_START_PER_SEC).powf(queued),
                Some(_) => b.rate + queued * PROBE_PER_SEC * start,
            }
            .min(self.cfg.max_rate);
        }
    }

    /// Takes a slot for caller `seq` if its turn has come; else how long it
    /// has still to wait at the rate in force, and whether it is speculative.
    fn try_take(&self, seq: u64) -> Option<(Duration, bool)> {
        let mut b = self.state.lock();
        if let Some(h) = self.host() {
            // The caller first in this process's line asks the record;
            // the others wait their turn here.
            let spec = b.waiting.iter().find(|w| w.seq == seq).is_some_and(Waiter::speculative);
            let ahead = b.ahead_of(seq);
            if ahead > 0 {
                return Some((Duration::from_secs_f64(ahead as f64 / b.rate).max(Duration::from_millis(1)), spec));
            }
            match h.try_take(spec, b.summary(None), b.summary(Some(seq))) {
                Ok((turn, rate)) => {
                    b.rate = rate;
                    return match turn {
                        host::Turn::Took => {
                            b.took(seq);
                            None
                        }
                        host::Turn::Wait(d) => Some((d, spec)),
                    };
                }
                Err(e) => self.host_error(&e),
            }
        }
        self.advance(&mut b);
        let turn = b.taken + b.ahead_of(seq) as f64 + 1.0;
        if b.avail >= turn {
            b.took(seq);
            return None;
        }
        let spec = b.waiting.iter().find(|w| w.seq == seq).is_some_and(Waiter::speculative);
        // At least a millisecond: a shortfall of a rounding error would
        // otherwise be a sleep of nothing, looked at again at once.
        Some((Duration::from_secs_f64((turn - b.avail) / b.rate).max(Duration::from_millis(1)), spec))
    }

    /// Waits for a slot for one request: in turn, after every caller not
    /// speculative when this one is (the running task's mark,
    /// [`crate::remote::priority`]). The lock is held only to do the
    /// arithmetic; the wait happens outside it, looked at again every
    /// [`RECHECK`] in case the rate or the line changed. A caller that
    /// gives up (its future dropped: a deadline, a cancelled read) hands
    /// its slot on.
    pub async fn acquire(&self) {
        let mark = priority::current();
        let seq = {
            let mut b = self.state.lock();
            self.advance(&mut b);
            b.arrived += 1;
            let seq = b.arrived;
            let since = if self.host.is_some() { crate::remote::host_state::monotonic_ns() } else { 0 };
            b.waiting.push(Waiter { seq, since, mark });
            seq
        };
        let mut ticket = Ticket { pacer: self, seq, taken: false };
        while let Some((d, spec)) = self.try_take(seq) {
            tokio::time::sleep(d.min(if spec { RECHECK_SPECULATIVE } else { RECHECK })).await;
        }
        ticket.taken = true;
    }

    /// Drive said "slow down": spend the burst, so the requests queued
    /// behind this one do not go in another burst, and halve the rate.
    pub fn throttled(&self) {
        let mut b = self.state.lock();
        if let Some(h) = self.host() {
            match h.throttled() {
                Ok(rate) => {
                    b.rate = rate;
                    b.refusals += 1;
                    return;
                }
                Err(e) => self.host_error(&e),
            }
        }
        self.advance(&mut b);
        b.refusals += 1;
        b.avail = b.avail.min(b.issued());
        let now = Instant::now();
        if b.last_cut.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            b.rate = (b.rate / 2.0).max(self.cfg.rate * MIN_FACTOR);
            b.last_cut = Some(now);
        }
    }

    /// The rate in force now (requests/s).
    pub fn current_rate(&self) -> f64 {
        self.stats().rate
    }

    /// Rate in force (the host's, when shared) and refusals this process
    /// saw so far.
    pub fn stats(&self) -> PacerStats {
        let mut b = self.state.lock();
        if let Some(h) = self.host() {
            match h.rate() {
                Ok(rate) => b.rate = rate,
                Err(e) => self.host_error(&e),
            }
        }
        PacerStats { rate: b.rate, refusals: b.refusals }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_allows_a_burst_then_the_rate() {
        let p = Pacer::new(PacerConfig::fixed(10.0, 5));
        let t0 = Instant::now();
        for _ in 0..5 {
            p.acquire().await;
        }
        assert!(t0.elapsed() < Duration::from_millis(1), "{:?}", t0.elapsed());
        for _ in 0..10 {
            p.acquire().await;
        }
        // 10 more at 10/s after the burst: about one second.
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(990) && e <= Duration::from_millis(1010), "{e:?}");
        // A quiet spell refills the bucket, up to the burst only.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t1 = Instant::now();
        for _ in 0..6 {
            p.acquire().await;
        }
        let e = t1.elapsed();
        assert!(e >= Duration::from_millis(99) && e <= Duration::from_millis(101), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_throttle_spends_the_burst_and_halves_the_rate() {
        let p = Pacer::new(PacerConfig::fixed(10.0, 100));
        p.throttled();
        assert_eq!(p.current_rate(), 5.0);
        let t0 = Instant::now();
        p.acquire().await;
        // One slot at the halved rate: 200 ms.
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(199) && e <= Duration::from_millis(230), "{e:?}");
        // A burst of refusals at once is one signal (the 200 ms since won
        // back a little of the rate).
        for _ in 0..10 {
            p.throttled();
        }
        assert!((p.current_rate() - 5.1).abs() < 0.01, "{}", p.current_rate());
        // Refusals that go on, second after second, cut it down to 1/16.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            p.throttled();
        }
        assert!(p.current_rate() < 1.2, "{}", p.current_rate());
        // Quiet seconds win the rate back, up to the configured one.
        tokio::time::sleep(Duration::from_secs(30)).await;
        p.acquire().await;
        assert_eq!(p.current_rate(), 10.0);
    }

    /// Callers that keep `n` requests waiting on the pacer for `secs`;
    /// answers how many slots came within that time.
    async fn queue_for(p: &std::sync::Arc<Pacer>, n: usize, secs: u64) -> usize {
        let end = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    let mut got = 0;
                    while Instant::now() < end {
                        p.acquire().await;
                        got += usize::from(Instant::now() <= end);
                    }
                    got
                })
            })
            .collect();
        let mut got = 0;
        for t in tasks {
            got += t.await.unwrap();
        }
        got
    }

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_climbs_while_requests_queue() {
        let p = std::sync::Arc::new(Pacer::new(PacerConfig { rate: 10.0, burst: 10, max_rate: 100.0 }));
        // Unhurried callers (well under the rate) leave it where it is.
        for _ in 0..20 {
            p.acquire().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(p.current_rate(), 10.0);
        // Callers that queue: it climbs by a quarter a second to the ceiling
        // (10/s to 100/s in about 10 s), then holds there.
        queue_for(&p, 32, 12).await;
        assert_eq!(p.current_rate(), 100.0);
        let got = queue_for(&p, 32, 5).await;
        assert!((480..=510).contains(&got), "{got} slots in 5 s at 100/s");
        // A refusal halves it; for 5 s it holds, then creeps up by 2% of the
        // start a second (0.2/s), not by a quarter.
        p.throttled();
        assert_eq!(p.stats(), PacerStats { rate: 50.0, refusals: 1 });
        queue_for(&p, 32, 4).await;
        assert_eq!(p.current_rate(), 50.0);
        queue_for(&p, 32, 6).await;
        let r = p.current_rate();
        assert!(r > 50.0 && r < 51.5, "{r}");
    }

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_a_caller_that_gives_up_hands_on_its_slot() {
        let p = Pacer::new(PacerConfig::fixed(1.0, 1));
        p.acquire().await;
        // The next slot is 1 s away; its caller gives up after 100 ms.
        assert!(tokio::time::timeout(Duration::from_millis(100), p.acquire()).await.is_err());
        // The caller after it gets that slot, not the one after.
        let t0 = Instant::now();
        p.acquire().await;
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(890) && e <= Duration::from_millis(910), "{e:?}");
    }

    /// Starts a caller of `p` that waits for a slot, speculative while
    /// `guest` is false (None: not speculative); answers when it got it.
    fn caller(
        p: &std::sync::Arc<Pacer>,
        guest: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> tokio::task::JoinHandle<Duration> {
        let p = p.clone();
        let t0 = Instant::now();
        tokio::spawn(async move {
            match guest {
                Some(g) => {
                    let mark = Speculative::new(move || g.load(std::sync::atomic::Ordering::SeqCst));
                    priority::speculative(mark, p.acquire()).await
                }
                None => p.acquire().await,
            }
            t0.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_serves_a_guest_before_speculative_requests() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let p = std::sync::Arc::new(Pacer::new(PacerConfig::fixed(10.0, 1)));
        p.acquire().await;
        // Five speculative requests queue (a slot every 100 ms), then a
        // guest's: it takes the next slot, not the sixth.
        let flags: Vec<_> = (0..5).map(|_| std::sync::Arc::new(AtomicBool::new(false))).collect();
        let spec: Vec<_> = flags.iter().map(|g| caller(&p, Some(g.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let guest = caller(&p, None).await.unwrap();
        assert!(guest <= Duration::from_millis(95), "the guest's request waited {guest:?}");
        // A speculative request a guest comes to wait for moves up too.
        flags[4].store(true, Ordering::SeqCst);
        let mut got: Vec<Duration> = Vec::new();
        for t in spec {
            got.push(t.await.unwrap());
        }
        let raised = got.pop().expect("five");
        assert!(raised <= Duration::from_millis(230), "the raised request waited {raised:?}");
        // The rest go in turn after them, one slot each: none is lost.
        got.sort();
        let last = *got.last().expect("four");
        assert!(last >= Duration::from_millis(590) && last <= Duration::from_millis(640), "{got:?}");
    }

    /// A guest that alone asks for the whole rate does not starve the
    /// speculative requests: after five slots in a row to the guest, the
    /// oldest speculative one goes.
    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_leaves_speculative_requests_a_share() {
        let p = std::sync::Arc::new(Pacer::new(PacerConfig::fixed(10.0, 1)));
        p.acquire().await;
        let never = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spec: Vec<_> = (0..2).map(|_| caller(&p, Some(never.clone()))).collect();
        // Twenty guest requests, always more waiting than the rate serves.
        let guests: Vec<_> = (0..20).map(|_| caller(&p, None)).collect();
        let mut got = Vec::new();
        for t in spec {
            got.push(t.await.unwrap());
        }
        // Slots every 100 ms: five guests, the first speculative one, five
        // more guests, the second.
        assert!(got[0] >= Duration::from_millis(590) && got[0] <= Duration::from_millis(640), "{got:?}");
        assert!(got[1] >= Duration::from_millis(1190) && got[1] <= Duration::from_millis(1240), "{got:?}");
        let mut g: Vec<Duration> = Vec::new();
        for t in guests {
            g.push(t.await.unwrap());
        }
        g.sort();
        // Every slot used, none lost: the last guest's is the 22nd.
        assert!(g[19] >= Duration::from_millis(2190) && g[19] <= Duration::from_millis(2240), "{g:?}");
        assert!(g[4] <= Duration::from_millis(540), "{g:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_set_to_a_fixed_rate_stays_there() {
        let p = std::sync::Arc::new(Pacer::new(PacerConfig::fixed(10.0, 10)));
        let got = queue_for(&p, 32, 10).await;
        assert!((105..=115).contains(&got), "{got} slots in 10 s at 10/s after a burst of 10");
        assert_eq!(p.current_rate(), 10.0);
    }

    /// Two pacers on one record (two processes on one account) and a
    /// switch: `shared` false gives each its own clock, as before.
    fn pair(dir: &Path, cfg: PacerConfig, shared: bool) -> (std::sync::Arc<Pacer>, std::sync::Arc<Pacer>) {
        let make = |name: &str| {
            let p = if shared { Pacer::shared(cfg, &dir.join("account")) } else { Pacer::shared(cfg, &dir.join(name)) };
            assert!(p.is_shared());
            std::sync::Arc::new(p)
        };
        (make("a"), make("b"))
    }

    /// Slots the callers of each pacer took in `secs` of real time, with
    /// `n` callers each always waiting (speculative ones if `spec`).
    async fn race(pacers: &[&std::sync::Arc<Pacer>], n: usize, secs: f64, spec: bool) -> usize {
        let t0 = std::time::Instant::now();
        let mut total = 0;
        let end = Duration::from_secs_f64(secs);
        let tasks: Vec<_> = pacers
            .iter()
            .flat_map(|p| (0..n).map(move |_| (*p).clone()))
            .map(|p| {
                tokio::spawn(async move {
                    let mut got = 0;
                    while t0.elapsed() < end {
                        let mark = spec.then(|| Speculative::new(|| false));
                        let slot = priority::with(mark, p.acquire());
                        if tokio::time::timeout(end.saturating_sub(t0.elapsed()), slot).await.is_ok() {
                            got += 1;
                        }
                    }
                    got
                })
            })
            .collect();
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    }

    /// Two processes on one account share one rate: together they take
    /// what one pacer gives, not twice that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_by_two_processes_keeps_one_rate() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = pair(d.path(), PacerConfig::fixed(20.0, 1), true);
        let got = race(&[&a, &b], 4, 2.0, false).await;
        // 20/s for 2 s: about 41 slots; apart they would take about 82 (a
        // busy machine may let a few go by).
        eprintln!("{got} slots in 2 s");
        assert!((15..=50).contains(&got), "{got} slots in 2 s for two pacers sharing 20/s");
    }

    /// A refusal one process sees halves the rate of the other too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_refusal_slows_every_process() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = pair(d.path(), PacerConfig::fixed(20.0, 1), true);
        a.throttled();
        let r = b.current_rate();
        assert!((10.0..10.5).contains(&r), "the other process's rate after a refusal: {r}");
        assert_eq!((a.stats().refusals, b.stats().refusals), (1, 0));
    }

    /// Speculative requests in one process let the guest requests waiting
    /// in another go first, but after five slots in a row to those, the
    /// oldest speculative one goes: it gets about a sixth, not a half.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_serves_another_process_guest_first() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = pair(d.path(), PacerConfig::fixed(20.0, 1), true);
        let spec = tokio::spawn(async move { race(&[&a], 4, 3.0, true).await });
        let guest = race(&[&b], 4, 3.0, false).await;
        let spec = spec.await.unwrap();
        let share = spec as f64 / (spec + guest) as f64;
        eprintln!("speculative {spec}, guest {guest} slots");
        assert!(share > 0.08 && share < 0.3, "speculative {spec}, guest {guest} slots: share {share:.2}");
    }

    /// A process killed while its guest requests waited (its slot says
    /// so, and nobody refreshes it) holds speculative requests back only
    /// until its mark expires.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_marks_of_a_dead_process_expire() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("account");
        let cfg = PacerConfig::fixed(20.0, 1);
        let dead = host::HostBucket::open(&path, cfg).unwrap();
        dead.publish(host::Waiting { urgent: 5, ..Default::default() }).unwrap();
        drop(dead);
        let p = Pacer::shared(cfg, &path);
        let t0 = std::time::Instant::now();
        priority::speculative(Speculative::new(|| false), p.acquire()).await;
        let e = t0.elapsed();
        assert!(e >= Duration::from_millis(1500) && e < host::SLOT_TTL + Duration::from_secs(2), "{e:?}");
    }

    /// Garbage in the record (a damaged file: a clock days ahead, a
    /// heartbeat from the future with guest requests waiting) holds no
    /// request back for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_damaged_record_holds_nothing_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("account");
        let cfg = PacerConfig::fixed(20.0, 1);
        let p = Pacer::shared(cfg, &path);
        p.acquire().await;
        let mut raw = std::fs::read(&path).unwrap();
        // Past the boot id: the clock, then (64 bytes on) the first slot's
        // id, heartbeat and urgent count.
        raw[16..24].fill(0x7f);
        raw[16 + 64..16 + 64 + 8].copy_from_slice(&99u64.to_le_bytes());
        raw[16 + 72..16 + 80].fill(0x7f);
        raw[16 + 80..16 + 88].copy_from_slice(&5u64.to_le_bytes());
        std::fs::write(&path, raw).unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            priority::speculative(Speculative::new(|| false), p.acquire()),
        )
        .await;
        assert!(got.is_ok(), "a damaged record held a request back");
    }

    /// A record that cannot be made leaves pacing to the process.
    #[tokio::test]
    async fn gdrive_pacer_shared_falls_back_to_local_pacing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), b"").unwrap();
        let p = Pacer::shared(PacerConfig::fixed(1000.0, 10), &d.path().join("file/account"));
        assert!(!p.is_shared());
        p.acquire().await;
    }

    /// The shared rate climbs while the processes' requests queue, as one
    /// pacer's does (a quarter a second before any refusal), and a refusal
    /// halves it for both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_pacer_shared_rate_climbs_while_requests_queue() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = pair(d.path(), PacerConfig { rate: 10.0, burst: 1, max_rate: 100.0 }, true);
        race(&[&a, &b], 2, 3.0, false).await;
        // 10 * 1.25^3 is about 19.5; a clock that never saw queueing stays at 10.
        let r = b.current_rate();
        eprintln!("shared rate after 3 s of queueing: {r:.1}");
        assert!(r > 15.0 && r < 25.0, "{r}");
        a.throttled();
        let half = b.current_rate();
        assert!((half - r / 2.0).abs() < 1.0, "{r} then {half}");
    }
}
