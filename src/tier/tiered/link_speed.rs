//! The link's rate and quickest round trip, estimated from finished
//! fetches: what a fetch should take when nothing queues ahead of it.
//!
//! The rate is the best the link delivered over a second recently; the
//! delay is the least a fetch took beyond moving its own bytes at that
//! rate. Both are taken over the last half minute, so a link that slows
//! down (or a busier time of day on Drive) is followed within it.

use std::collections::VecDeque;
use std::time::Duration;

/// Throughput is summed over a second, in bins this long.
const BIN_MS: u64 = 100;
const BINS_PER_RATE: u64 = 10;
/// Peaks and minima are kept per bucket this long, for this many buckets.
const BUCKET_MS: u64 = 5_000;
const BUCKETS: u64 = 6;
/// Fetches seen before the estimate is trusted.
const MIN_SAMPLES: u64 = 8;

/// The best (largest or smallest) value per time bucket, for the last
/// `BUCKETS` buckets.
#[derive(Default)]
struct Windowed {
    buckets: VecDeque<(u64, f64)>,
}

impl Windowed {
    fn update(&mut self, bucket: u64, v: f64, better: fn(f64, f64) -> f64) {
        match self.buckets.back_mut() {
            Some((b, best)) if *b == bucket => *best = better(*best, v),
            _ => self.buckets.push_back((bucket, v)),
        }
        while self.buckets.front().is_some_and(|&(b, _)| b + BUCKETS <= bucket) {
            self.buckets.pop_front();
        }
    }

    fn best(&self, better: fn(f64, f64) -> f64) -> Option<f64> {
        self.buckets.iter().map(|&(_, v)| v).reduce(better)
    }
}

/// Estimates the link's rate and delay from the fetches it finished.
#[derive(Default)]
pub struct LinkSpeed {
    /// Bytes finished per `BIN_MS` bin, the last `BINS_PER_RATE` bins.
    bins: VecDeque<(u64, u64)>,
    peak_rate: Windowed,
    /// Recent fetches: when they finished (ms), bytes, seconds taken. The
    /// delay is judged against the rate when asked, so fetches seen while
    /// the rate was still underestimated are not held against it.
    fetches: VecDeque<(u64, u64, f64)>,
    samples: u64,
}

/// Fetches kept for the delay at most.
const MAX_FETCHES: usize = 512;

impl LinkSpeed {
    /// Records a fetch of `bytes` that took `took` and finished at `now`
    /// (time since any fixed origin).
    pub fn record(&mut self, now: Duration, bytes: u64, took: Duration) {
        let ms = now.as_millis() as u64;
        let bin = ms / BIN_MS;
        match self.bins.back_mut() {
            Some((b, n)) if *b == bin => *n += bytes,
            _ => self.bins.push_back((bin, bytes)),
        }
        while self.bins.front().is_some_and(|&(b, _)| b + BINS_PER_RATE <= bin) {
            self.bins.pop_front();
        }
        let second: u64 = self.bins.iter().map(|&(_, n)| n).sum();
        self.peak_rate.update(ms / BUCKET_MS, second as f64, f64::max);
        self.fetches.push_back((ms, bytes, took.as_secs_f64()));
        while self.fetches.len() > MAX_FETCHES
            || self.fetches.front().is_some_and(|&(t, _, _)| t + BUCKETS * BUCKET_MS <= ms)
        {
            self.fetches.pop_front();
        }
        self.samples += 1;
    }

    /// Bytes per second the link delivered at best, recently.
    pub fn rate(&self) -> Option<f64> {
        self.peak_rate.best(f64::max).filter(|_| self.samples >= MIN_SAMPLES)
    }

    /// The least time a recent fetch took beyond moving its bytes.
    pub fn delay(&self) -> Option<Duration> {
        let rate = self.rate()?.max(1.0);
        let d = self.fetches.iter().map(|&(_, n, took)| (took - n as f64 / rate).max(0.0)).reduce(f64::min)?;
        Some(Duration::from_secs_f64(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    /// A link of 25 MB/s and 200 ms per request, kept busy by 1 MB fetches
    /// one after another, though the first fetches were seen before the
    /// rate was known.
    #[test]
    fn a_busy_link_gives_its_rate_and_quickest_delay() {
        let mut b = LinkSpeed::default();
        assert_eq!((b.rate(), b.delay()), (None, None), "no fetches yet");
        // Eight fetches in flight, each 200 ms + 8 x 40 ms behind the others.
        let took = Duration::from_millis(200 + 8 * 40);
        for i in 0..200u64 {
            b.record(Duration::from_millis(1_000 + i * 40), MB, took);
        }
        let rate = b.rate().unwrap();
        assert!((rate - 25e6).abs() < 1.5e6, "{rate}");
        let delay = b.delay().unwrap().as_secs_f64();
        assert!((0.45..0.5).contains(&delay), "{delay}: queueing behind the others counts at this load");
        // A lone small fetch shows the link's own delay.
        b.record(Duration::from_millis(9_000), 64_000, Duration::from_millis(203));
        let delay = b.delay().unwrap().as_secs_f64();
        assert!((0.19..0.21).contains(&delay), "{delay}");
    }

    /// What is older than half a minute no longer counts: a link that got
    /// slower is followed.
    #[test]
    fn old_peaks_age_out() {
        let mut b = LinkSpeed::default();
        for i in 0..100u64 {
            b.record(Duration::from_millis(i * 40), MB, Duration::from_millis(100));
        }
        assert!(b.rate().unwrap() > 20e6);
        // Then 2 MB/s for a minute.
        for i in 0..120u64 {
            b.record(Duration::from_millis(10_000 + i * 500), MB, Duration::from_millis(600));
        }
        let rate = b.rate().unwrap();
        assert!(rate < 3e6, "{rate}");
        let delay = b.delay().unwrap().as_secs_f64();
        assert!((0.09..0.11).contains(&delay), "{delay}: 600 ms less 1 MB at 2 MB/s");
    }
}
