//! Who gets the link. A guest miss is urgent: it goes to the remote at
//! once. Speculative work (profile streaming, readahead, hydration, pins,
//! the first-boot stream) shares a budget of in-flight bytes, so a guest
//! miss never queues behind more than that on a shared link; a speculative
//! flight a guest joins stops waiting for the budget. Bytes are counted by
//! what caused them.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::tier::single_flight::Urgency;
use crate::volume::ChunkRef;

/// Speculative bytes in flight at most. Enough to keep a 200 Mbit/s link
/// with 100 ms round trips busy (its bandwidth-delay product is 2.5 MB)
/// while a guest miss waits behind at most ~1.5 MB of it.
pub const SPECULATIVE_BYTES: u64 = 4 << 20;

/// Why bytes crossed the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A guest request waits for them.
    Miss,
    /// The boot profile's stream.
    Profile,
    /// Sequential readahead.
    Readahead,
    /// Hydration and pinned chunks.
    Hydrate,
    /// The first boot's stream of the dense region (no profile yet).
    Stream,
    /// Packs' sub-frame indexes (what lets a miss fetch part of a chunk).
    Index,
}

impl Source {
    const ALL: [Source; 6] =
        [Source::Miss, Source::Profile, Source::Readahead, Source::Hydrate, Source::Stream, Source::Index];

    fn slot(self) -> usize {
        Self::ALL.iter().position(|&s| s == self).unwrap_or(0)
    }
}

/// The speculative lane's budget and the bytes by source.
pub struct Lanes {
    /// Permits are KiB of speculative bytes in flight.
    speculative: Semaphore,
    cap_kib: u32,
    bytes: [AtomicU64; 6],
}

impl Default for Lanes {
    fn default() -> Self {
        Self::new(SPECULATIVE_BYTES)
    }
}

impl Lanes {
    /// A lane letting `cap` speculative bytes be in flight.
    pub fn new(cap: u64) -> Self {
        let cap_kib = (cap >> 10).clamp(1, u32::MAX as u64 >> 4) as u32;
        Self { speculative: Semaphore::new(cap_kib as usize), cap_kib, bytes: Default::default() }
    }

    /// Waits for the link: at once when urgent (now or later, when a guest
    /// joins), else until `bytes` fit in the speculative budget. Hold the
    /// result while the fetch runs.
    pub async fn admit(&self, bytes: u64, urgency: &Urgency) -> Option<SemaphorePermit<'_>> {
        if urgency.is_urgent() {
            return None;
        }
        // A request larger than the whole budget waits for all of it.
        let n = bytes.div_ceil(1024).clamp(1, self.cap_kib as u64) as u32;
        tokio::select! {
            p = self.speculative.acquire_many(n) => p.ok(),
            _ = urgency.raised() => None,
        }
    }

    /// Counts `n` bytes fetched for `src`.
    pub fn count(&self, src: Source, n: u64) {
        self.bytes[src.slot()].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes fetched for `src` so far.
    pub fn bytes(&self, src: Source) -> u64 {
        self.bytes[src.slot()].load(Ordering::Relaxed)
    }

    /// Speculative bytes fetched so far (everything but misses).
    pub fn speculative_bytes(&self) -> u64 {
        Source::ALL.iter().filter(|&&s| s != Source::Miss).map(|&s| self.bytes(s)).sum()
    }
}

/// Bytes a fetch of `r` moves (a chunk of `chunk_len` bytes).
pub fn wire_len(r: &ChunkRef, chunk_len: u64) -> u64 {
    match r {
        ChunkRef::Zero => 0,
        ChunkRef::Base => chunk_len,
        ChunkRef::Packed { len, .. } => *len,
        ChunkRef::Patched { base, len, .. } => wire_len(base, chunk_len) + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Speculative fetches wait for the budget; an urgent one never does,
    /// and a waiting speculative one goes once a guest joins it.
    #[test]
    fn urgent_work_skips_the_speculative_budget() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let lanes = Arc::new(Lanes::new(2 << 20));
            let held = lanes.admit(2 << 20, &Urgency::new(false)).await;
            assert!(held.is_some());
            // Full: a speculative fetch waits...
            let slow = Urgency::new(false);
            let t = tokio::time::timeout(Duration::from_millis(50), lanes.admit(1 << 20, &slow)).await;
            assert!(t.is_err(), "the budget is used up");
            // ...an urgent one does not...
            assert!(lanes.admit(1 << 20, &Urgency::new(true)).await.is_none());
            // ...and a raised one stops waiting.
            let l2 = lanes.clone();
            let s2 = slow.clone();
            let waiter = tokio::spawn(async move { l2.admit(1 << 20, &s2).await.is_none() });
            tokio::time::sleep(Duration::from_millis(20)).await;
            slow.raise();
            assert!(waiter.await.unwrap());
            drop(held);
            assert!(lanes.admit(3 << 20, &Urgency::new(false)).await.is_some(), "larger than the budget: all of it");
        });
        let lanes = Lanes::default();
        lanes.count(Source::Miss, 5);
        lanes.count(Source::Profile, 7);
        lanes.count(Source::Stream, 1);
        assert_eq!((lanes.bytes(Source::Miss), lanes.speculative_bytes()), (5, 8));
    }
}
