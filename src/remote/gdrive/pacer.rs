//! A token-bucket pacer shared by every request of one Drive account: Drive
//! throttles per user, and answers bursts over its limit with 403/429
//! rate-limit errors well before the link is full, so requests are spaced
//! here rather than discovered by failing. The rate adapts: while requests
//! queue behind the pacer and Drive has not refused any, it climbs (by a
//! quarter a second until the first refusal, slowly after) up to the
//! configured ceiling; when Drive says "slow down" it halves (down to a
//! sixteenth of the starting rate). So an account whose real limit is above
//! the starting rate gets the link's worth of requests, and one whose limit
//! is below it costs a few refusals, not a stream of them.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::remote::config::PacerConfig;

/// Hands out request slots at an adaptive rate with bursts of `burst`.
#[derive(Debug)]
pub struct Pacer {
    cfg: PacerConfig,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Slots handed out so far, counting those still waiting: a caller's
    /// ticket is the count after its own.
    issued: f64,
    /// Slots the bucket has made available so far (as of `at`): a ticket
    /// may go once this reaches it. Refills stop `burst` ahead of `issued`.
    avail: f64,
    at: Instant,
    /// Requests per second in force (`cfg.rate / 16 ..= cfg.max_rate`).
    rate: f64,
    /// When the rate was last halved: the refusals of one burst arrive
    /// together and count as one signal.
    last_cut: Option<Instant>,
    /// Refusals seen (for status).
    refusals: u64,
}

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
/// it waited lets it go sooner.
const RECHECK: Duration = Duration::from_millis(100);

/// A caller's place in line; dropped before its slot is taken, it moves
/// every later caller up by one.
struct Ticket<'a> {
    pacer: &'a Pacer,
    n: f64,
    taken: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.taken {
            let mut b = self.pacer.state.lock();
            self.pacer.advance(&mut b);
            b.avail = (b.avail + 1.0).min(b.issued + self.pacer.cfg.burst as f64);
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
                issued: 0.0,
                avail: cfg.burst as f64,
                at: Instant::now(),
                rate,
                last_cut: None,
                refusals: 0,
            }),
        }
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
        let short = b.issued - b.avail;
        let queued = if short > 0.0 { elapsed.min(short / b.rate) } else { 0.0 };
        b.avail = (b.avail + elapsed * b.rate).min(b.issued + self.cfg.burst as f64);
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

    /// How long ticket `t` has still to wait at the rate in force.
    fn wait_for(&self, t: f64) -> Duration {
        let mut b = self.state.lock();
        self.advance(&mut b);
        if b.avail >= t {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((t - b.avail) / b.rate)
        }
    }

    /// Waits for a slot for one request. The lock is held only to do the
    /// arithmetic; the wait happens outside it, looked at again every
    /// [`RECHECK`] in case the rate changed. A caller that gives up (its
    /// future dropped: a deadline, a cancelled read) hands its slot on.
    pub async fn acquire(&self) {
        let n = {
            let mut b = self.state.lock();
            self.advance(&mut b);
            b.issued += 1.0;
            b.issued
        };
        let mut ticket = Ticket { pacer: self, n, taken: false };
        loop {
            let d = self.wait_for(ticket.n);
            if d.is_zero() {
                ticket.taken = true;
                return;
            }
            tokio::time::sleep(d.min(RECHECK)).await;
        }
    }

    /// Drive said "slow down": spend the burst, so the requests queued
    /// behind this one do not go in another burst, and halve the rate.
    pub fn throttled(&self) {
        let mut b = self.state.lock();
        self.advance(&mut b);
        b.refusals += 1;
        b.avail = b.avail.min(b.issued);
        let now = Instant::now();
        if b.last_cut.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            b.rate = (b.rate / 2.0).max(self.cfg.rate * MIN_FACTOR);
            b.last_cut = Some(now);
        }
    }

    /// The rate in force now (requests/s).
    pub fn current_rate(&self) -> f64 {
        self.state.lock().rate
    }

    /// Rate in force and refusals so far.
    pub fn stats(&self) -> PacerStats {
        let b = self.state.lock();
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

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_set_to_a_fixed_rate_stays_there() {
        let p = std::sync::Arc::new(Pacer::new(PacerConfig::fixed(10.0, 10)));
        let got = queue_for(&p, 32, 10).await;
        assert!((105..=115).contains(&got), "{got} slots in 10 s at 10/s after a burst of 10");
        assert_eq!(p.current_rate(), 10.0);
    }
}
