//! Read merging: ranged reads of one object that arrive within a short
//! window are merged into as few requests as cover them (adjacent or
//! nearly adjacent ranges, up to a span), and each caller gets its own
//! bytes back. Drive limits requests per user, and a boot asks for tens of
//! thousands of small ranges, many of them neighbours asked at once.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::priority::{self, Speculative};
use super::{DynRemote, RemoteResult};

/// How reads are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeConfig {
    /// How long the first read of an object waits for neighbours before
    /// its request goes out. Zero: no merging.
    pub window: Duration,
    /// Largest gap between two ranges that still merge (the gap's bytes
    /// are fetched and dropped: cheaper than a request).
    pub max_gap: u64,
    /// Longest merged request.
    pub max_span: u64,
}

impl Default for MergeConfig {
    /// 2 ms (a fraction of a request's round trip), 256 KiB gaps, 16 MiB requests.
    fn default() -> Self {
        Self { window: Duration::from_millis(2), max_gap: 256 << 10, max_span: 16 << 20 }
    }
}

/// Counters: ranged reads asked for, requests sent for them, and reads
/// answered from a request shared with others.
#[derive(Debug, Default)]
pub struct MergeStats {
    pub asked: AtomicU64,
    pub sent: AtomicU64,
    pub merged: AtomicU64,
}

impl MergeStats {
    /// (asked, sent, merged).
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (l(&self.asked), l(&self.sent), l(&self.merged))
    }
}

struct Waiter {
    range: Range<u64>,
    tx: oneshot::Sender<RemoteResult<Bytes>>,
    /// The reader's mark: the batch runs in the first reader's task, and
    /// its request is speculative only if it is for every reader in it.
    mark: Option<Speculative>,
}

/// (key, revision) of the reads a batch merges.
type Target = (String, Option<String>);

/// Merges concurrent ranged reads of `inner` (see the module doc).
pub struct MergingRemote {
    inner: DynRemote,
    cfg: MergeConfig,
    stats: Arc<MergeStats>,
    pending: parking_lot::Mutex<HashMap<Target, Vec<Waiter>>>,
}

impl std::fmt::Debug for MergingRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl MergingRemote {
    /// Wraps `inner`; counts into `stats`.
    pub fn new(inner: DynRemote, cfg: MergeConfig, stats: Arc<MergeStats>) -> Self {
        Self { inner, cfg, stats, pending: parking_lot::Mutex::new(HashMap::new()) }
    }

    async fn read(&self, key: &str, rev: Option<&str>, range: Range<u64>) -> RemoteResult<Bytes> {
        self.stats.asked.fetch_add(1, Ordering::Relaxed);
        if self.cfg.window.is_zero() || range.is_empty() {
            self.stats.sent.fetch_add(1, Ordering::Relaxed);
            return self.one(key, rev, range).await;
        }
        let target: Target = (key.to_string(), rev.map(str::to_string));
        let (tx, rx) = oneshot::channel();
        let mark = priority::current();
        let leader = {
            let mut p = self.pending.lock();
            match p.get_mut(&target) {
                Some(v) => {
                    v.push(Waiter { range: range.clone(), tx, mark });
                    false
                }
                None => {
                    p.insert(target.clone(), vec![Waiter { range: range.clone(), tx, mark }]);
                    true
                }
            }
        };
        if leader {
            // Cancelled while waiting, the leader still closes its batch:
            // the others' senders drop and they read alone, never wait on
            // a batch nobody will send.
            let closer = Closer { pending: &self.pending, target: Some(target.clone()) };
            tokio::time::sleep(self.cfg.window).await;
            let batch = closer.take();
            self.run(key, rev, batch).await;
        }
        match rx.await {
            Ok(r) => r,
            // The leader was cancelled before answering: read alone.
            Err(_) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.one(key, rev, range).await
            }
        }
    }

    async fn one(&self, key: &str, rev: Option<&str>, range: Range<u64>) -> RemoteResult<Bytes> {
        match rev {
            Some(r) => self.inner.get_range_revision(key, r, range).await,
            None => self.inner.get_range(key, range).await,
        }
    }

    /// Groups the batch into merged requests and answers every waiter.
    async fn run(&self, key: &str, rev: Option<&str>, mut batch: Vec<Waiter>) {
        batch.sort_by_key(|w| (w.range.start, w.range.end));
        let mut groups: Vec<Vec<Waiter>> = Vec::new();
        let mut span = 0..0u64;
        for w in batch {
            let joins = groups.last().is_some()
                && w.range.start <= span.end.saturating_add(self.cfg.max_gap)
                && w.range.end.max(span.end) - span.start <= self.cfg.max_span;
            if joins {
                span.end = span.end.max(w.range.end);
                groups.last_mut().expect("checked").push(w);
            } else {
                span = w.range.clone();
                groups.push(vec![w]);
            }
        }
        futures::future::join_all(groups.into_iter().map(|g| self.group(key, rev, g))).await;
    }

    async fn group(&self, key: &str, rev: Option<&str>, g: Vec<Waiter>) {
        let start = g.iter().map(|w| w.range.start).min().unwrap_or(0);
        let end = g.iter().map(|w| w.range.end).max().unwrap_or(0);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        if g.len() == 1 {
            let w = g.into_iter().next().expect("one waiter");
            let _ = w.tx.send(priority::with(w.mark, self.one(key, rev, w.range)).await);
            return;
        }
        self.stats.merged.fetch_add(g.len() as u64, Ordering::Relaxed);
        let mark = Speculative::all(g.iter().map(|w| w.mark.clone()).collect());
        match priority::with(mark, self.one(key, rev, start..end)).await {
            Ok(b) => {
                // A range past the object's end is cut there, as a lone read would be.
                for w in g {
                    let lo = ((w.range.start - start) as usize).min(b.len());
                    let hi = ((w.range.end - start) as usize).min(b.len());
                    let _ = w.tx.send(Ok(b.slice(lo..hi)));
                }
            }
            // Errors carry sources that cannot be shared: each reader asks
            // again alone (and gets its own error, or its bytes).
            Err(e) => {
                tracing::debug!(key, error = %e, "merged read failed; reading the ranges one by one");
                futures::future::join_all(g.into_iter().map(|w| async move {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    let r = priority::with(w.mark, self.one(key, rev, w.range.clone())).await;
                    let _ = w.tx.send(r);
                }))
                .await;
            }
        }
    }
}

/// Removes a batch from the pending map: when taken, or when dropped.
struct Closer<'a> {
    pending: &'a parking_lot::Mutex<HashMap<Target, Vec<Waiter>>>,
    target: Option<Target>,
}

impl Closer<'_> {
    fn take(mut self) -> Vec<Waiter> {
        let t = self.target.take().expect("taken once");
        self.pending.lock().remove(&t).unwrap_or_default()
    }
}

impl Drop for Closer<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            self.pending.lock().remove(&t);
        }
    }
}

#[async_trait]
impl super::Layer for MergingRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.read(key, None, range).await
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        self.read(key, Some(revision), range).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{DirRemote, PutBody, Remote};

    /// Adjacent, overlapping and distant reads asked at once: fewer
    /// requests, and each caller gets exactly its own bytes (cut at the end).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_reads_return_each_callers_bytes() {
        let d = tempfile::tempdir().unwrap();
        let dir: DynRemote = Arc::new(DirRemote::new(d.path().to_path_buf()));
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        dir.put("obj", PutBody::from_bytes(data.clone())).await.unwrap();
        let stats = Arc::new(MergeStats::default());
        let cfg = MergeConfig { window: Duration::from_millis(20), max_gap: 4096, max_span: 1 << 20 };
        let m = Arc::new(MergingRemote::new(dir, cfg, stats.clone()));
        let ranges: Vec<Range<u64>> = (0..32u64)
            .map(|i| i * 8192..(i + 1) * 8192)
            .chain([100..200, 900_000..900_100, (1 << 20) - 10..(1 << 20) + 50])
            .collect();
        let got = futures::future::join_all(ranges.iter().cloned().map(|r| {
            let m = m.clone();
            async move { m.get_range("obj", r).await.unwrap() }
        }))
        .await;
        for (r, b) in ranges.iter().zip(got) {
            let hi = (r.end as usize).min(data.len());
            assert!(b[..] == data[r.start as usize..hi], "{r:?}");
        }
        let (asked, sent, merged) = stats.snapshot();
        assert_eq!(asked, 35);
        assert!(sent <= 3 && merged >= 33, "asked {asked}, sent {sent}, merged {merged}");
    }

    /// A leader cancelled while it waits for neighbours strands nobody:
    /// the reads that joined its batch go out alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_leader_strands_no_reader() {
        let d = tempfile::tempdir().unwrap();
        let dir: DynRemote = Arc::new(DirRemote::new(d.path().to_path_buf()));
        dir.put("obj", PutBody::from_bytes(vec![7u8; 8192])).await.unwrap();
        let cfg = MergeConfig { window: Duration::from_millis(200), max_gap: 4096, max_span: 1 << 20 };
        let m = Arc::new(MergingRemote::new(dir, cfg, Arc::default()));
        let leader = {
            let m = m.clone();
            tokio::spawn(async move { m.get_range("obj", 0..4096).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = {
            let m = m.clone();
            tokio::spawn(async move { m.get_range("obj", 4096..8192).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        // (A deadline so a stranded reader fails the test instead of hanging it.)
        let got = tokio::time::timeout(Duration::from_secs(30), follower).await.expect("the follower was stranded");
        assert_eq!(got.unwrap().unwrap().len(), 4096);
        // And the next read leads a batch of its own.
        assert_eq!(m.get_range("obj", 0..10).await.unwrap().len(), 10);
    }

    /// Records, for each request it forwards, whether it was speculative.
    #[derive(Debug)]
    struct Marks {
        inner: DynRemote,
        seen: parking_lot::Mutex<Vec<(Range<u64>, bool)>>,
    }

    #[async_trait]
    impl crate::remote::Layer for Marks {
        fn inner(&self) -> &DynRemote {
            &self.inner
        }

        async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
            let spec = priority::current().is_some_and(|m| m.holds());
            self.seen.lock().push((range.clone(), spec));
            self.inner.get_range(key, range).await
        }
    }

    /// A batch runs in its first reader's task: a guest's read that joins
    /// a speculative one makes the merged request not speculative, and a
    /// guest's read batched apart goes without the first reader's mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_merged_request_is_speculative_only_if_every_read_in_it_is() {
        let d = tempfile::tempdir().unwrap();
        let dir: DynRemote = Arc::new(DirRemote::new(d.path().to_path_buf()));
        dir.put("obj", PutBody::from_bytes(vec![7u8; 1 << 20])).await.unwrap();
        let marks = Arc::new(Marks { inner: dir, seen: Default::default() });
        let cfg = MergeConfig { window: Duration::from_millis(50), max_gap: 4096, max_span: 1 << 20 };
        let m = Arc::new(MergingRemote::new(marks.clone(), cfg, Arc::default()));
        let read = |r: Range<u64>, spec: bool| {
            let m = m.clone();
            tokio::spawn(async move {
                let f = m.get_range("obj", r);
                if spec {
                    priority::speculative(Speculative::new(|| false), f).await
                } else {
                    f.await
                }
            })
        };
        // Speculative first (it leads the batch): a speculative neighbour,
        // a guest's neighbour, and a guest's read far away.
        let reads = [read(0..4096, true), read(4096..8192, true)];
        tokio::time::sleep(Duration::from_millis(5)).await;
        let guest = [read(8192..12288, false), read(900_000..904_096, false)];
        let lone = read(500_000..504_096, true);
        for t in reads.into_iter().chain(guest).chain([lone]) {
            t.await.unwrap().unwrap();
        }
        let mut seen = marks.seen.lock().clone();
        seen.sort_by_key(|(r, _)| r.start);
        assert_eq!(seen, vec![(0..12288, false), (500_000..504_096, true), (900_000..904_096, false)]);
    }
}
