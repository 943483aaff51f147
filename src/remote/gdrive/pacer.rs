//! A token-bucket pacer shared by every request of one Drive account: Drive
//! throttles per user, and answers bursts over its limit with 403/429
//! rate-limit errors well before the link is full, so requests are spaced
//! here rather than discovered by failing.

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
}

impl Pacer {
    /// A full bucket.
    pub fn new(cfg: PacerConfig) -> Self {
        let cfg = PacerConfig { rate: cfg.rate.max(0.001), burst: cfg.burst.max(1) };
        Self { cfg, state: Mutex::new(Bucket { tokens: cfg.burst as f64, at: Instant::now() }) }
    }

    /// The settings in force.
    pub fn config(&self) -> PacerConfig {
        self.cfg
    }

    /// How long the caller must wait for its slot; takes the slot.
    fn reserve(&self) -> Duration {
        let mut b = self.state.lock();
        let now = Instant::now();
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.cfg.rate;
        b.tokens = (b.tokens + refill).min(self.cfg.burst as f64);
        b.at = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.cfg.rate)
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
    /// behind this one go at the sustained rate instead of in another burst.
    pub fn throttled(&self) {
        let mut b = self.state.lock();
        if b.tokens > 0.0 {
            b.tokens = 0.0;
        }
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
    async fn gdrive_pacer_throttle_spends_the_burst() {
        let p = Pacer::new(PacerConfig { rate: 10.0, burst: 100 });
        p.throttled();
        let t0 = Instant::now();
        p.acquire().await;
        assert!(t0.elapsed() >= Duration::from_millis(99), "{:?}", t0.elapsed());
    }
}
