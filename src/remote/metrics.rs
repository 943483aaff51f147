//! Metrics wrapper: counts requests, errors and bytes moved through a
//! remote, and keeps a latency histogram, without touching any backend.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{DynRemote, ObjectMeta, PutBody, RemoteResult, Slot};

/// Live counters, shared with whoever wants to read them.
#[derive(Debug, Default)]
pub struct RemoteMetrics {
    pub gets: AtomicU64,
    pub puts: AtomicU64,
    pub heads: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub in_flight: AtomicU64,
    /// Total time spent in requests, nanoseconds (mean latency =
    /// `request_nanos / requests`).
    pub request_nanos: AtomicU64,
    /// Request latencies in microseconds (1 us .. 1 h, 2 significant digits).
    latency: parking_lot::Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

/// Remote request latency percentiles, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencyPercentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteMetricsSnapshot {
    pub gets: u64,
    pub puts: u64,
    pub heads: u64,
    pub lists: u64,
    pub deletes: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
    pub request_nanos: u64,
}

impl RemoteMetrics {
    /// Records one request's latency.
    pub fn record_latency(&self, d: std::time::Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let mut h = self.latency.lock();
        let h = h.get_or_insert_with(|| {
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
        });
        let _ = h.record(us);
    }

    /// Latency percentiles of every request so far.
    pub fn latency(&self) -> LatencyPercentiles {
        let h = self.latency.lock();
        let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else { return LatencyPercentiles::default() };
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyPercentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> RemoteMetricsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteMetricsSnapshot {
            gets: l(&self.gets),
            puts: l(&self.puts),
            heads: l(&self.heads),
            lists: l(&self.lists),
            deletes: l(&self.deletes),
            errors: l(&self.errors),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            in_flight: l(&self.in_flight),
            request_nanos: l(&self.request_nanos),
        }
    }
}

/// Counts what passes through to `inner`.
#[derive(Debug)]
pub struct MetricsRemote {
    inner: DynRemote,
    metrics: Arc<RemoteMetrics>,
}

impl MetricsRemote {
    /// Wraps `inner`, recording into `metrics`.
    pub fn new(inner: DynRemote, metrics: Arc<RemoteMetrics>) -> Self {
        Self { inner, metrics }
    }

    /// Wraps `inner` into a shared trait object.
    pub fn wrap(inner: DynRemote, metrics: Arc<RemoteMetrics>) -> DynRemote {
        Arc::new(Self::new(inner, metrics))
    }

    async fn count<T>(
        &self,
        counter: &AtomicU64,
        fut: impl std::future::Future<Output = RemoteResult<T>>,
    ) -> RemoteResult<T> {
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let r = fut.await;
        let took = t0.elapsed();
        self.metrics.request_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.metrics.record_latency(took);
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        // "Not there" is an answer, expected all the time (the next
        // generation's key, a heartbeat not written yet), not a failure an
        // operator should be shown or alerted on.
        if r.as_ref().is_err_and(|e| !e.is_not_found()) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

#[async_trait]
impl super::Layer for MetricsRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r = self.count(&self.metrics.gets, self.inner.get_range(key, range)).await?;
        self.metrics.bytes_read.fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let r = self.count(&self.metrics.gets, self.inner.get(key)).await?;
        self.metrics.bytes_read.fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let m = self.count(&self.metrics.puts, self.inner.put(key, body)).await?;
        self.metrics.bytes_written.fetch_add(m.size, Ordering::Relaxed);
        Ok(m)
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.count(&self.metrics.heads, self.inner.head(key)).await
    }

    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.count(&self.metrics.heads, self.inner.reserve(key)).await
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let m = self.count(&self.metrics.puts, self.inner.create(key, slot, tag, body)).await?;
        self.metrics.bytes_written.fetch_add(m.size, Ordering::Relaxed);
        Ok(m)
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        self.count(&self.metrics.heads, self.inner.find_trashed(key)).await
    }

    async fn list_trashed(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.count(&self.metrics.lists, self.inner.list_trashed(prefix)).await
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        self.count(&self.metrics.heads, self.inner.head_created(key, slot)).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        let r = self.count(&self.metrics.gets, self.inner.get_created(key, slot)).await?;
        self.metrics.bytes_read.fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.count(&self.metrics.lists, self.inner.list(prefix)).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.count(&self.metrics.lists, self.inner.list_after(prefix, after)).await
    }

    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        self.count(&self.metrics.lists, self.inner.listed(key)).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.count(&self.metrics.deletes, self.inner.delete(key)).await
    }

    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        self.count(&self.metrics.heads, self.inner.keep_revision(key, revision)).await
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        self.count(&self.metrics.heads, self.inner.head_revision(key, revision)).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r = self.count(&self.metrics.gets, self.inner.get_range_revision(key, revision, range)).await?;
        self.metrics.bytes_read.fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_percentiles_follow_the_recorded_requests() {
        let m = RemoteMetrics::default();
        assert_eq!(m.latency().count, 0);
        for i in 1..=100u64 {
            m.record_latency(Duration::from_millis(i));
        }
        let p = m.latency();
        assert_eq!(p.count, 100);
        // Two significant digits: within 1% of the exact order statistic.
        assert!((p.p50_ms - 50.0).abs() <= 0.6, "{p:?}");
        assert!((p.p90_ms - 90.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() <= 1.0, "{p:?}");
        assert!((p.max_ms - 100.0).abs() <= 1.0, "{p:?}");
    }
}
