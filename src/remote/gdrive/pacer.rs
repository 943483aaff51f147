//! A token-bucket pacer shared by every request of one Drive account: Drive
//! throttles per user, and answers bursts over its limit with 403/429
//! rate-limit errors well before the link is full, so requests are spaced
//! here rather than discovered by failing. When Drive still says "slow
//! down", the pacer halves its rate (down to a sixteenth) and wins it back
//! over the following quiet seconds, so a configured rate above the
//! account's real limit costs a few refusals, not a stream of them.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::remote::config::PacerConfig;

/// Hands out request slots at `rate` per second with bursts of `burst`.
#[derive(Debug)]
pub struct Pacer {
    cfg: PacerConfig,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens available at `at` (may go negative: slots already promised to
    /// waiting callers).
    tokens: f64,
    at: Instant,
    /// Share of the configured rate in force (1/16 ..= 1).
    factor: f64,
    /// When the rate was last halved: the refusals of one burst arrive
    /// together and count as one signal.
    last_cut: Option<Instant>,
}

/// Lowest share of the configured rate after repeated throttling.
const MIN_FACTOR: f64 = 1.0 / 16.0;
/// Share of the configured rate won back per second without throttling.
const RECOVERY_PER_SEC: f64 = 0.05;

impl Pacer {
    /// A full bucket.
    pub fn new(cfg: PacerConfig) -> Self {
        let cfg = PacerConfig { rate: cfg.rate.max(0.001), burst: cfg.burst.max(1) };
        Self {
            cfg,
            state: Mutex::new(Bucket { tokens: cfg.burst as f64, at: Instant::now(), factor: 1.0, last_cut: None }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> PacerConfig {
        self.cfg
    }

    /// Brings the bucket to now: tokens refilled, rate partly won back.
    fn advance(&self, b: &mut Bucket) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.cfg.rate * b.factor).min(self.cfg.burst as f64);
        b.factor = (b.factor + elapsed * RECOVERY_PER_SEC).min(1.0);
        b.at = now;
    }

    /// How long the caller must wait for its slot; takes the slot.
    fn reserve(&self) -> Duration {
        let mut b = self.state.lock();
        self.advance(&mut b);
        let rate = self.cfg.rate * b.factor;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / rate)
        }
    }

    /// Waits for a slot for one request. The lock is held only to do the
    /// arithmetic; the wait happens outside it.
    pub async fn acquire(&self) {
        let d = self.reserve();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Drive said "slow down": spend the burst, so the requests queued
    /// behind this one do not go in another burst, and halve the rate.
    pub fn throttled(&self) {
        let mut b = self.state.lock();
        self.advance(&mut b);
        if b.tokens > 0.0 {
            b.tokens = 0.0;
        }
        let now = Instant::now();
        if b.last_cut.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            b.factor = (b.factor / 2.0).max(MIN_FACTOR);
            b.last_cut = Some(now);
        }
    }

    /// The rate in force now (requests/s), after any throttling.
    pub fn current_rate(&self) -> f64 {
        self.cfg.rate * self.state.lock().factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gdrive_pacer_allows_a_burst_then_the_rate() {
        let p = Pacer::new(PacerConfig { rate: 10.0, burst: 5 });
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
        let p = Pacer::new(PacerConfig { rate: 10.0, burst: 100 });
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
}
