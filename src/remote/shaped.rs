//! Shaping wrapper: adds per-request latency, a shared bandwidth cap and
//! injected failures around any remote — to test retry and caching against
//! a slow, flaky link, and to demo what a Drive-speed remote feels like.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::{DynRemote, ObjectMeta, PutBody, Remote, RemoteError, RemoteResult, Slot};

/// Link characteristics.
#[derive(Clone, Debug, Default)]
pub struct Shaping {
    /// Added to every request (round-trip time).
    pub latency: Duration,
    /// Cap on bytes moved per second, in bits per second (e.g. 200_000_000
    /// for 200 Mbit/s), shared by all requests as one link. `None` = no cap.
    pub bandwidth_bps: Option<u64>,
}

/// Failures to inject; adjustable while requests run, so a test can take
/// the remote "down" half-way.
#[derive(Debug)]
pub struct FaultPlan {
    /// Every request fails (transiently) while set.
    down: AtomicBool,
    /// Every request waits, unanswered, while set: a store that accepts
    /// connections and never answers (its requests end at the caller's
    /// deadlines).
    hung: AtomicBool,
    /// The next N requests fail transiently.
    fail_next: AtomicU64,
    /// Each request fails with this probability (parts per million).
    fail_ppm: AtomicU64,
    /// The next N puts write the object and then report a failure, like a
    /// reply lost on the way back.
    lose_put_replies: AtomicU64,
    /// The same for the next N creates (commits) only.
    lose_create_replies: AtomicU64,
    /// Requests failed so far.
    injected: AtomicU64,
    rng: Mutex<StdRng>,
}

impl FaultPlan {
    /// No faults; `seed` drives the random failures.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            down: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            fail_ppm: AtomicU64::new(0),
            lose_put_replies: AtomicU64::new(0),
            lose_create_replies: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    /// Takes the remote down (every request fails) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes the remote hang (requests get no answer while it does) or
    /// answer again.
    pub fn set_hung(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }

    /// Fails the next `n` requests.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Fails each request with probability `p` (0.0..=1.0).
    pub fn set_failure_rate(&self, p: f64) {
        self.fail_ppm.store((p.clamp(0.0, 1.0) * 1e6) as u64, Ordering::SeqCst);
    }

    /// The next `n` puts land but report an error.
    pub fn lose_put_replies(&self, n: u64) {
        self.lose_put_replies.store(n, Ordering::SeqCst);
    }

    /// The next `n` creates (manifest commits) land but report an error.
    pub fn lose_create_replies(&self, n: u64) {
        self.lose_create_replies.store(n, Ordering::SeqCst);
    }

    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn take(counter: &AtomicU64) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Decides whether this request fails.
    fn should_fail(&self) -> bool {
        let fail = self.down.load(Ordering::SeqCst) || Self::take(&self.fail_next) || {
            let ppm = self.fail_ppm.load(Ordering::SeqCst);
            ppm > 0 && self.rng.lock().random_range(0..1_000_000) < ppm
        };
        if fail {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
}

/// A remote behind a simulated link.
#[derive(Debug)]
pub struct ShapedRemote {
    inner: DynRemote,
    shaping: Shaping,
    faults: Arc<FaultPlan>,
    /// When the simulated link is next free: transfers queue behind each
    /// other, which is what a shared bandwidth cap means.
    link_free_at: Mutex<Option<Instant>>,
}

impl ShapedRemote {
    /// Wraps `inner`.
    pub fn new(inner: DynRemote, shaping: Shaping, faults: Arc<FaultPlan>) -> Self {
        Self { inner, shaping, faults, link_free_at: Mutex::new(None) }
    }

    /// Wraps `inner` into a shared trait object.
    pub fn wrap(inner: DynRemote, shaping: Shaping, faults: Arc<FaultPlan>) -> DynRemote {
        Arc::new(Self::new(inner, shaping, faults))
    }

    fn fault(&self, op: &'static str, key: &str) -> RemoteError {
        RemoteError::Transient {
            remote: self.inner.describe(),
            op,
            key: key.to_string(),
            message: "injected fault".into(),
            retry_after: None,
        }
    }

    /// Latency (for as long as the remote hangs), then an injected failure
    /// if one is due.
    async fn before(&self, op: &'static str, key: &str) -> RemoteResult<()> {
        if !self.shaping.latency.is_zero() {
            tokio::time::sleep(self.shaping.latency).await;
        }
        while self.faults.hung.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.faults.should_fail() {
            return Err(self.fault(op, key));
        }
        Ok(())
    }

    /// Takes the next `bytes` of time on the shared link: when the
    /// transfer starts, and how long it takes (None: no cap).
    fn take_link(&self, bytes: u64) -> Option<(Instant, Duration)> {
        let bps = self.shaping.bandwidth_bps.filter(|b| *b > 0)?;
        let dur = Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64);
        let mut free = self.link_free_at.lock();
        let now = Instant::now();
        let start = free.map_or(now, |f| f.max(now));
        *free = Some(start + dur);
        Some((start, dur))
    }

    /// Holds the caller for as long as `bytes` take on the shared link.
    async fn transfer(&self, bytes: u64) {
        if let Some((start, dur)) = self.take_link(bytes) {
            tokio::time::sleep_until(start + dur).await;
        }
    }

    /// `body` crossing the shared link: its time on the link is taken now,
    /// and each piece is let out to the store when the link has carried
    /// it, as a real upload is taken from its sender (so a count of bytes
    /// sent moves with the link, not all at once).
    fn upload(&self, body: PutBody) -> PutBody {
        let Some(len) = body.len() else { return body };
        let Some((start, dur)) = self.take_link(len) else { return body };
        PutBody::from_stream_fn(Some(len), move || {
            let due = move |end: u64| start + dur.mul_f64(end as f64 / len.max(1) as f64);
            super::bwlimit::pieces(body.stream(), move |_, end| tokio::time::sleep_until(due(end)))
        })
    }
}

#[async_trait]
impl super::Layer for ShapedRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.before("get_range", key).await?;
        let r = self.inner.get_range(key, range).await?;
        self.transfer(r.len() as u64).await;
        Ok(r)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.before("put", key).await?;
        let m = self.inner.put(key, self.upload(body)).await?;
        if FaultPlan::take(&self.faults.lose_put_replies) {
            self.faults.injected.fetch_add(1, Ordering::SeqCst);
            return Err(self.fault("put", key));
        }
        Ok(m)
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.before("head", key).await?;
        self.inner.head(key).await
    }

    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.before("reserve", key).await?;
        self.inner.reserve(key).await
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.before("create", key).await?;
        let m = self.inner.create(key, slot, tag, self.upload(body)).await?;
        if FaultPlan::take(&self.faults.lose_put_replies) || FaultPlan::take(&self.faults.lose_create_replies) {
            self.faults.injected.fetch_add(1, Ordering::SeqCst);
            return Err(self.fault("create", key));
        }
        Ok(m)
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        self.before("find_trashed", key).await?;
        self.inner.find_trashed(key).await
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        self.before("head_created", key).await?;
        self.inner.head_created(key, slot).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        self.before("get_created", key).await?;
        let r = self.inner.get_created(key, slot).await?;
        self.transfer(r.len() as u64).await;
        Ok(r)
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.before("list", prefix).await?;
        self.inner.list(prefix).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.before("list", prefix).await?;
        self.inner.list_after(prefix, after).await
    }

    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        self.before("list", key).await?;
        self.inner.listed(key).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.before("delete", key).await?;
        self.inner.delete(key).await
    }

    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        self.before("keep_revision", key).await?;
        self.inner.keep_revision(key, revision).await
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        self.before("head_revision", key).await?;
        self.inner.head_revision(key, revision).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.before("get_range", key).await?;
        let r = self.inner.get_range_revision(key, revision, range).await?;
        self.transfer(r.len() as u64).await;
        Ok(r)
    }

    // Through this layer's own head and get_range, as Remote's default
    // does, so a whole read is delayed, faulted and paced like a ranged one.
    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let meta = Remote::head(self, key).await?;
        Remote::get_range(self, key, 0..meta.size).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{DirRemote, RetryPolicy, RetryingRemote};

    #[tokio::test]
    async fn retry_hides_transient_faults_and_lost_replies() {
        let d = tempfile::tempdir().unwrap();
        let faults = FaultPlan::new(7);
        let shaped = ShapedRemote::wrap(Arc::new(DirRemote::new(d.path())), Shaping::default(), faults.clone());
        let policy = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            seed: Some(1),
            attempt_timeout: Duration::from_secs(60),
        };
        let r = RetryingRemote::wrap(shaped, policy);
        faults.lose_put_replies(1);
        r.put("a", PutBody::from_bytes(b"abc".to_vec())).await.unwrap();
        faults.fail_next(3);
        assert_eq!(&r.get("a").await.unwrap()[..], b"abc");
        assert_eq!(faults.injected(), 4);
        faults.set_down(true);
        let e = r.get_range("a", 0..1).await.unwrap_err();
        assert!(matches!(e, RemoteError::RetriesExhausted { attempts: 5, .. }), "{e}");
        faults.set_down(false);
        // Fatal errors are not retried.
        let before = faults.injected();
        assert!(r.get("missing").await.unwrap_err().is_not_found());
        assert_eq!(faults.injected(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn bandwidth_cap_paces_transfers() {
        let d = tempfile::tempdir().unwrap();
        let dr: DynRemote = Arc::new(DirRemote::new(d.path()));
        dr.put("x", PutBody::from_bytes(vec![1u8; 1_000_000])).await.unwrap();
        let shaping = Shaping { latency: Duration::from_millis(20), bandwidth_bps: Some(8_000_000) };
        let r = ShapedRemote::wrap(dr, shaping, FaultPlan::new(0));
        let t0 = Instant::now();
        r.get_range("x", 0..500_000).await.unwrap();
        r.get_range("x", 0..500_000).await.unwrap();
        // 1 MB at 1 MB/s plus two 20 ms round trips.
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(1040) && el < Duration::from_millis(1200), "{el:?}");
    }
}
