//! Releasing freed clusters in storage: a cluster whose last reference is
//! durably gone is told to the storage ([`Storage::discard_at`]: a volume
//! zeroes it, so chunks left all zero become zero chunks; a local file gets
//! a hole). It stays counted (refcount 1) until then, so it is never handed
//! out and written while being zeroed. A guest FLUSH releases, before its
//! cut, what flushes freed, without the allocation mutex and for a bounded
//! time: the zeroes go up with that generation, a trim of gigabytes holds
//! up neither allocating writes nor one FLUSH for long, the rest waits for
//! the next FLUSH, and a close releases everything.

use std::time::{Duration, Instant};

use super::*;

/// How long one FLUSH spends releasing (a file system that discards on
/// the device at every hole punch takes ~2 ms per scattered cluster).
pub(super) const FLUSH_BUDGET: Duration = Duration::from_millis(50);

/// Clusters taken per pass with the mutex dropped.
const BATCH: usize = 4096;

/// Bytes per storage call, so the budget is checked between calls.
const MAX_RANGE: u64 = 64 << 20;

impl Qcow2Disk {
    /// Releases clusters of `st.unreleased` until none are left or `budget`
    /// is spent, dropping the mutex around the storage I/O. True if it
    /// released any (the storage changed). A close run at the same time as
    /// this (the daemon closes only once no request runs) could leave what
    /// this has in hand counted: a leak, nothing worse.
    pub(super) fn release_freed(
        &self,
        st: &mut MutexGuard<'_, AllocState>,
        budget: Option<Duration>,
    ) -> DiskResult<bool> {
        let deadline = budget.map(|b| Instant::now() + b);
        let cs = self.lay.cluster_size();
        let mut any = false;
        while !st.unreleased.is_empty() && deadline.is_none_or(|d| Instant::now() < d) {
            let n = st.unreleased.len();
            let mut batch = st.unreleased.split_off(n.saturating_sub(BATCH));
            let done = MutexGuard::unlocked(st, || discard_clusters(&*self.storage, cs, &mut batch, deadline));
            // Not reached within the budget: back, still counted.
            st.unreleased.extend_from_slice(&batch[done..]);
            self.free_released(st, &batch[..done])?;
            any |= done > 0;
        }
        Ok(any)
    }

    /// Drops the count kept on each released cluster: free for reuse. With
    /// the allocation mutex held (`_st`), as every refcount change, so a
    /// flush never marks a block clean under a change.
    fn free_released(&self, _st: &mut AllocState, clusters: &[u64]) -> DiskResult<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let mut m = self.meta.write();
        let Some(r) = m.refs.as_mut() else { return Ok(()) };
        let mut first_err = None;
        for &h in clusters {
            if let Err(e) = r.adjust(h, -1) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Discards `clusters` (sorted here) in storage, contiguous ones as one
/// range, until `deadline`; returns how many of them (from the start) are
/// done. A failure leaves old bytes in free clusters, which nothing reads:
/// it is logged, and they count as done.
fn discard_clusters(storage: &dyn Storage, cs: u64, clusters: &mut [u64], deadline: Option<Instant>) -> usize {
    clusters.sort_unstable();
    let file_len = storage.len();
    let per_call = (MAX_RANGE / cs).max(1) as usize;
    let mut i = 0;
    while i < clusters.len() {
        let start = clusters[i];
        let mut j = i + 1;
        while j < clusters.len() && j - i < per_call && clusters[j] == clusters[j - 1] + cs {
            j += 1;
        }
        let end = (clusters[j - 1] + cs).min(file_len);
        if start < end {
            if let Err(e) = storage.discard_at(start, end - start) {
                tracing::warn!(
                    "qcow2: could not release {} freed bytes at {start:#x} in {}: {e} (they keep their old contents)",
                    end - start,
                    storage.describe()
                );
                return clusters.len();
            }
        }
        i = j;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    i
}
