//! Retry wrapper: re-sends requests that failed for a reason retrying can
//! fix (per [`RemoteError::is_retryable`]), with truncated exponential
//! backoff and full jitter, so backends stay free of retry loops.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DynRemote, ObjectMeta, PutBody, Remote, RemoteError, RemoteResult, Slot};

/// How long the task making remote requests may wait for them in all, and
/// whether it wants failed attempts retried: a guest read cannot wait out
/// ten attempts of a minute each (Windows resets a disk after about a
/// minute), so it sets a budget that every request it makes respects.
#[derive(Clone, Copy, Debug)]
pub struct CallBudget {
    /// No attempt runs, and no retry starts, past this instant.
    pub deadline: tokio::time::Instant,
    /// Retry failed attempts while the deadline allows (false: the first
    /// failure is the answer).
    pub retry: bool,
}

impl CallBudget {
    /// A budget of `wait` from now.
    pub fn new(wait: Duration, retry: bool) -> Self {
        Self { deadline: tokio::time::Instant::now() + wait, retry }
    }
}

tokio::task_local! {
    static BUDGET: CallBudget;
}

/// Runs `f` with every remote request it makes (in this task) bounded by
/// `budget`.
pub async fn within_budget<F: std::future::Future>(budget: CallBudget, f: F) -> F::Output {
    BUDGET.scope(budget, f).await
}

/// The budget of the running task, if it set one.
fn current_budget() -> Option<CallBudget> {
    BUDGET.try_with(|b| *b).ok()
}

/// How many times and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles each time.
    pub base_delay: Duration,
    /// Backoff never exceeds this (Drive: 16-32 s).
    pub max_delay: Duration,
    /// Seed for the jitter; `None` seeds from the OS. Tests pass a seed so
    /// retry timing is reproducible.
    pub seed: Option<u64>,
    /// Deadline of one attempt of a small request (heads, lists, deletes,
    /// whole small objects): a hung remote — a stalled NFS mount, a silent
    /// TCP peer — fails the attempt instead of holding its caller forever.
    /// Uploads and ranged reads get this plus the time their body takes at
    /// [`MIN_UPLOAD_RATE`].
    pub attempt_timeout: Duration,
}

/// Slowest upload rate (bytes/s) an upload attempt is allowed before its
/// deadline passes: about a tenth of a poor 1 Mbit/s uplink.
pub const MIN_UPLOAD_RATE: u64 = 16 << 10;

impl Default for RetryPolicy {
    /// Drive's guidance: 1 s, 2 s, 4 s ... capped at 32 s; ten attempts.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(32),
            seed: None,
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Quick retries for local folders and tests: 10 ms doubling to 1 s.
    pub fn fast() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            seed: None,
            attempt_timeout: Duration::from_secs(60),
        }
    }

    /// The deadline of one attempt that moves `bytes` of body.
    pub fn timeout_for(&self, bytes: u64) -> Duration {
        self.attempt_timeout + Duration::from_secs(bytes / MIN_UPLOAD_RATE)
    }
}

/// Retries a wrapped remote.
#[derive(Debug)]
pub struct RetryingRemote {
    inner: DynRemote,
    policy: RetryPolicy,
    rng: Mutex<StdRng>,
}

impl RetryingRemote {
    /// Wraps `inner`.
    pub fn new(inner: DynRemote, policy: RetryPolicy) -> Self {
        let rng = match policy.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { inner, policy, rng: Mutex::new(rng) }
    }

    /// Wraps `inner` into a shared trait object.
    pub fn wrap(inner: DynRemote, policy: RetryPolicy) -> DynRemote {
        Arc::new(Self::new(inner, policy))
    }

    /// Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)], which
    /// spreads out many clients retrying after the same outage.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.policy.base_delay.saturating_mul(1u32 << attempt.min(20));
        let ceiling = exp.min(self.policy.max_delay);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(self.rng.lock().random_range(0..=nanos))
    }

    async fn run<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = RemoteResult<T>>,
    {
        self.run_within(op, key, self.policy.attempt_timeout, f).await
    }

    async fn run_within<T, F, Fut>(&self, op: &'static str, key: &str, limit: Duration, mut f: F) -> RemoteResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = RemoteResult<T>>,
    {
        let max = self.policy.max_attempts.max(1);
        let budget = current_budget();
        let mut attempt = 0;
        loop {
            let left = budget.map(|b| b.deadline.saturating_duration_since(tokio::time::Instant::now()));
            let limit = left.map_or(limit, |l| l.min(limit));
            let r = if limit.is_zero() {
                Err(self.no_answer(op, key, limit, "the caller's time budget is spent"))
            } else {
                // Without a caller's budget the deadline counts from the end
                // of the `--bwlimit` turns the attempt was given: an upload
                // queued behind other transfers' turns is not failed for
                // waiting, and one that hangs after its turn still is.
                let answered = match left {
                    Some(_) => tokio::time::timeout(limit, f()).await.ok(),
                    None => super::bwlimit::past_pacing(limit, f()).await,
                };
                match answered {
                    Some(r) => r,
                    None => {
                        // A silent peer: the pooled connections may all be
                        // dead (a laptop resumed, the network changed), so
                        // the next attempt starts on fresh ones.
                        self.inner.reset_connections();
                        Err(self.no_answer(op, key, limit, "no answer"))
                    }
                }
            };
            match r {
                Ok(v) => return Ok(v),
                // With a budget that wants retries, the deadline bounds
                // them, not the attempt count: a guest read under
                // `--on-remote-error wait` rides out an outage as long as
                // its budget allows.
                Err(e)
                    if e.is_retryable()
                        && match budget {
                            None => attempt + 1 < max,
                            Some(b) => b.retry && tokio::time::Instant::now() + self.policy.base_delay < b.deadline,
                        } =>
                {
                    // Honour a server's Retry-After when it asks for longer;
                    // never sleep past the caller's budget.
                    let mut d = self.backoff(attempt).max(e.retry_after().unwrap_or_default());
                    if let Some(b) = budget {
                        d = d.min(b.deadline.saturating_duration_since(tokio::time::Instant::now()));
                    }
                    tracing::debug!(op, key, attempt, delay_ms = d.as_millis() as u64, error = %e, "remote request failed; retrying");
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                Err(e) if e.is_retryable() => {
                    return Err(RemoteError::RetriesExhausted {
                        op,
                        key: key.to_string(),
                        attempts: attempt + 1,
                        last: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A time-out (retryable): the caller sees `TimedOut` whether its own
    /// budget or the attempt's deadline ran out first.
    fn no_answer(&self, op: &'static str, key: &str, limit: Duration, why: &str) -> RemoteError {
        RemoteError::Io {
            remote: self.inner.describe(),
            op,
            key: key.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{why} within {:.1} s", limit.as_secs_f64()),
            ),
        }
    }
}

#[async_trait]
impl super::Layer for RetryingRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    /// A read's deadline grows with its length, as an upload's does: a
    /// merged 16 MiB Drive read or a hydration sharing a slow link must
    /// not fail every attempt at a deadline made for a few MiB.
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let limit = self.policy.timeout_for(range.end.saturating_sub(range.start));
        self.run_within("get_range", key, limit, || self.inner.get_range(key, range.clone())).await
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        self.run("get", key, || self.inner.get(key)).await
    }

    /// Re-sending a whole immutable object under the same key is safe: if
    /// an earlier attempt landed but its reply was lost, the retry replaces
    /// it with identical bytes.
    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let limit = self.policy.timeout_for(body.len().unwrap_or(0));
        self.run_within("put", key, limit, || self.inner.put(key, body.clone())).await
    }

    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.run("reserve", key, || self.inner.reserve(key)).await
    }

    /// A retried create that finds the object already there with this
    /// caller's tag is the caller's own earlier attempt, whose reply was
    /// lost: that is success, not a conflict.
    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        let limit = self.policy.timeout_for(body.len().unwrap_or(0));
        let r = self.run_within("create", key, limit, || self.inner.create(key, slot, tag, body.clone())).await;
        match r {
            Err(RemoteError::AlreadyExists { tag: Some(t), .. }) if t == tag => {
                let mut m = Remote::head_created(self, key, slot).await?;
                m.tag = Some(t);
                Ok(m)
            }
            r => r,
        }
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        self.run("find_trashed", key, || self.inner.find_trashed(key)).await
    }

    async fn list_trashed(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.run("list_trashed", prefix, || self.inner.list_trashed(prefix)).await
    }

    /// Idempotent on every store (Drive creates a folder at a pre-generated
    /// id, so a retry after a lost reply finds it).
    async fn create_folder(&self) -> RemoteResult<()> {
        self.run("create_folder", "", || self.inner.create_folder()).await
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        self.run("head_created", key, || self.inner.head_created(key, slot)).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        self.run("get_created", key, || self.inner.get_created(key, slot)).await
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.run("head", key, || self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.run("list", prefix, || self.inner.list(prefix)).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.run("list", prefix, || self.inner.list_after(prefix, after)).await
    }

    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        self.run("list", key, || self.inner.listed(key)).await
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.run("delete", key, || self.inner.delete(key)).await
    }

    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        self.run("keep_revision", key, || self.inner.keep_revision(key, revision)).await
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        self.run("head_revision", key, || self.inner.head_revision(key, revision)).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let limit = self.policy.timeout_for(range.end.saturating_sub(range.start));
        self.run_within("get_range", key, limit, || self.inner.get_range_revision(key, revision, range.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails `fail` times with a Retry-After, then answers.
    #[derive(Debug)]
    struct Busy {
        fail: AtomicU32,
    }

    fn read_only(key: &str) -> RemoteError {
        RemoteError::Fatal { remote: "busy".into(), op: "test", key: key.into(), message: "reads only".into() }
    }

    #[async_trait]
    impl Remote for Busy {
        async fn create_folder(&self) -> RemoteResult<()> {
            Ok(())
        }
        async fn get_range(&self, key: &str, _: Range<u64>) -> RemoteResult<Bytes> {
            if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(RemoteError::Transient {
                    remote: "busy".into(),
                    op: "get_range",
                    key: key.into(),
                    message: "429".into(),
                    retry_after: Some(Duration::from_secs(5)),
                });
            }
            Ok(Bytes::from_static(b"ok"))
        }
        // This test remote serves reads only.
        async fn put(&self, key: &str, _: PutBody) -> RemoteResult<ObjectMeta> {
            Err(read_only(key))
        }
        async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
            Err(read_only(key))
        }
        async fn list(&self, key: &str) -> RemoteResult<Vec<ObjectMeta>> {
            Err(read_only(key))
        }
        async fn delete(&self, key: &str) -> RemoteResult<()> {
            Err(read_only(key))
        }
        async fn create(&self, key: &str, _: Option<&Slot>, _: &str, _: PutBody) -> RemoteResult<ObjectMeta> {
            Err(read_only(key))
        }
        fn describe(&self) -> String {
            "busy".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn honours_retry_after_and_gives_up_eventually() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            seed: Some(1),
            attempt_timeout: Duration::from_secs(60),
        };
        let r = RetryingRemote::new(Arc::new(Busy { fail: AtomicU32::new(2) }), policy.clone());
        let t0 = tokio::time::Instant::now();
        assert_eq!(&r.get_range("k", 0..2).await.unwrap()[..], b"ok");
        assert!(t0.elapsed() >= Duration::from_secs(10), "{:?}", t0.elapsed());
        let r = RetryingRemote::new(Arc::new(Busy { fail: AtomicU32::new(5) }), policy);
        let e = r.get_range("k", 0..2).await.unwrap_err();
        assert!(matches!(e, RemoteError::RetriesExhausted { attempts: 3, .. }), "{e}");
        assert!(!e.is_retryable());
    }

    /// Two uploads at the lowest `--bwlimit`: the second waits the first's
    /// turn (4 s), then takes 4 s of its own, past its attempt deadline of
    /// 1 s + 64 KiB at 16 KiB/s counted from its start. Counted from the
    /// end of its turn, it lands.
    #[tokio::test(start_paused = true)]
    async fn an_upload_queued_behind_another_ones_turn_is_not_timed_out() {
        use crate::remote::bwlimit::{BwLimit, BwSchedule};
        let d = tempfile::tempdir().unwrap();
        let l = BwLimit::new(BwSchedule::fixed(Some(16 << 10), None));
        let policy = RetryPolicy {
            max_attempts: 1,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            seed: Some(1),
            attempt_timeout: Duration::from_secs(1),
        };
        let r = RetryingRemote::new(Arc::new(crate::remote::DirRemote::new(d.path()).with_bwlimit(l)), policy);
        let t0 = tokio::time::Instant::now();
        let put = |k: &'static str| r.put(k, PutBody::from_bytes(vec![7u8; 64 << 10]));
        let (a, b) = tokio::join!(put("a"), put("b"));
        a.unwrap();
        b.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(8), "{:?}", t0.elapsed());
    }

    /// Never answers.
    #[derive(Debug)]
    struct Hung;

    #[async_trait]
    impl Remote for Hung {
        async fn create_folder(&self) -> RemoteResult<()> {
            Ok(())
        }
        async fn get_range(&self, _: &str, _: Range<u64>) -> RemoteResult<Bytes> {
            std::future::pending().await
        }
        async fn put(&self, _: &str, _: PutBody) -> RemoteResult<ObjectMeta> {
            std::future::pending().await
        }
        async fn head(&self, _: &str) -> RemoteResult<ObjectMeta> {
            std::future::pending().await
        }
        async fn list(&self, _: &str) -> RemoteResult<Vec<ObjectMeta>> {
            std::future::pending().await
        }
        async fn delete(&self, _: &str) -> RemoteResult<()> {
            std::future::pending().await
        }
        async fn create(&self, _: &str, _: Option<&Slot>, _: &str, _: PutBody) -> RemoteResult<ObjectMeta> {
            std::future::pending().await
        }
        fn describe(&self) -> String {
            "hung".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_remote_fails_within_the_deadline() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            seed: Some(1),
            attempt_timeout: Duration::from_secs(5),
        };
        let r = RetryingRemote::new(Arc::new(Hung), policy);
        let t0 = tokio::time::Instant::now();
        let e = r.head("k").await.unwrap_err();
        assert!(matches!(e, RemoteError::RetriesExhausted { attempts: 3, .. }), "{e}");
        assert!(
            t0.elapsed() >= Duration::from_secs(15) && t0.elapsed() < Duration::from_secs(16),
            "{:?}",
            t0.elapsed()
        );
        // An upload's deadline grows with its body.
        let t0 = tokio::time::Instant::now();
        r.put("k", PutBody::from_bytes(vec![0u8; 1 << 20])).await.unwrap_err();
        assert!(t0.elapsed() >= Duration::from_secs(3 * (5 + 64)), "{:?}", t0.elapsed());
        // So does a ranged read's (a merged read, a hydration on a slow link).
        let t0 = tokio::time::Instant::now();
        r.get_range("k", 0..1 << 20).await.unwrap_err();
        assert!(t0.elapsed() >= Duration::from_secs(3 * (5 + 64)), "{:?}", t0.elapsed());
        let t0 = tokio::time::Instant::now();
        r.get_range("k", 0..4096).await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(16), "a small read keeps the short deadline: {:?}", t0.elapsed());
    }

    /// A guest request sees `TimedOut` when the remote did not answer,
    /// whether the attempt's deadline or the caller's budget ran out first.
    #[tokio::test(start_paused = true)]
    async fn no_answer_reaches_the_caller_as_a_time_out() {
        let policy = RetryPolicy { max_attempts: 2, attempt_timeout: Duration::from_secs(1), ..Default::default() };
        let r = RetryingRemote::new(Arc::new(Hung), policy);
        let e = r.get_range("k", 0..1).await.unwrap_err().into_io();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        let budget = CallBudget::new(Duration::from_millis(300), false);
        let e = within_budget(budget, r.get_range("k", 0..1)).await.unwrap_err().into_io();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("no answer within 0.3 s"), "{e}");
        // Other errors given up on are not time-outs.
        let busy = RetryingRemote::new(
            Arc::new(Busy { fail: AtomicU32::new(9) }),
            RetryPolicy { max_attempts: 1, ..Default::default() },
        );
        let e = busy.get_range("k", 0..1).await.unwrap_err().into_io();
        assert_eq!(e.kind(), std::io::ErrorKind::Other, "{e}");
    }
}
