//! Format metadata in the store: chunks the format layer declared as
//! metadata are pinned (RAM, never evicted) — at once when the format needs
//! them to open, or fetched in the background, in guest order and behind
//! guest misses, when it can read them on demand meanwhile. A large image's
//! L2 tables then never stand between `serve` and the guest's first read.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::{fetch, Inner, TieredStore, DIRTY_PARTIAL};
use crate::tier::ram::ChunkBuf;

/// Background metadata fetches in flight at most (each also keeps to the
/// speculative byte budget): enough to fill the link, few enough that
/// readahead and profile streams are not queued behind all of a large
/// image's tables.
const PREFETCH_PARALLEL: usize = 8;

impl Inner {
    /// The chunks holding `ranges`, in the order given, each once, without
    /// those already pinned.
    pub(super) fn metadata_chunks(&self, ranges: &[Range<u64>]) -> Vec<u64> {
        let len = self.ssd.len();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in ranges {
            let end = r.end.min(len);
            if r.start >= end {
                continue;
            }
            for i in r.start / self.cs..=(end - 1) / self.cs {
                if seen.insert(i) && !self.ram.is_pinned(i) {
                    out.push(i);
                }
            }
        }
        out
    }

    /// Pins chunk `idx` as metadata. Under the chunk's lock, the newest
    /// copy wins: RAM, then SSD, then `fetched` (a guest write may have
    /// landed since the fetch).
    pub(super) fn pin_metadata(&self, idx: u64, fetched: ChunkBuf) -> std::io::Result<()> {
        let _g = self.ssd.lock_write(idx);
        let b = if let Some(rb) = self.ram.get(idx) {
            rb
        } else if self.ssd.has_chunk(idx) {
            Arc::new(parking_lot::RwLock::new(self.ssd.read_chunk(idx)?))
        } else if self.ssd.state(idx) == DIRTY_PARTIAL {
            return Err(std::io::Error::other(format!(
                "metadata chunk {idx} holds local changes and could not be completed"
            )));
        } else {
            fetched
        };
        self.ram.pin(idx, b);
        self.ssd.set_pinned(idx);
        Ok(())
    }

    /// [`Storage::prefetch_metadata`](crate::tier::Storage::prefetch_metadata):
    /// chunks already in the SSD tier are pinned now (local reads); the
    /// rest are fetched by a background task as speculative work, so a
    /// guest miss (including the format reading a table it needs now)
    /// goes first, and pinned as they come. Returns true while any are
    /// still on their way.
    pub(super) fn prefetch_metadata(self: &Arc<Self>, ranges: &[Range<u64>]) -> std::io::Result<bool> {
        let mut remote = Vec::new();
        for idx in self.metadata_chunks(ranges) {
            if self.ram.get(idx).is_some() || self.ssd.has_chunk(idx) {
                // Local: `fetched` is never used, the local copy wins.
                self.pin_metadata(idx, Arc::new(parking_lot::RwLock::new(Vec::new())))?;
            } else if !self.is_zero(idx) {
                remote.push(idx);
            }
        }
        if remote.is_empty() {
            return Ok(false);
        }
        let total = remote.len() as u64;
        self.metadata_pending.store(total, Ordering::SeqCst);
        tracing::info!(chunks = total, "fetching the rest of the image's metadata in the background");
        let me = self.clone();
        self.handle.spawn(async move {
            let started = Instant::now();
            let sem = Arc::new(Semaphore::new(PREFETCH_PARALLEL));
            let mut set = tokio::task::JoinSet::new();
            let mut failed = 0u64;
            for idx in remote {
                if me.closed.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(permit) = sem.clone().acquire_owned().await else { break };
                let flight = me.flight(idx, false, fetch::Source::Hydrate);
                let me2 = me.clone();
                set.spawn(async move {
                    let r = flight.await;
                    drop(permit);
                    let ok = match r {
                        Ok(b) => {
                            let me3 = me2.clone();
                            matches!(tokio::task::spawn_blocking(move || me3.pin_metadata(idx, b)).await, Ok(Ok(())))
                        }
                        Err(_) => false,
                    };
                    me2.metadata_pending.fetch_sub(1, Ordering::SeqCst);
                    ok
                });
                while let Some(r) = set.try_join_next() {
                    failed += u64::from(!r.unwrap_or(false));
                }
            }
            while let Some(r) = set.join_next().await {
                failed += u64::from(!r.unwrap_or(false));
            }
            if failed > 0 {
                // Not fatal: the format reads those tables on demand.
                tracing::warn!(failed, "some metadata chunks could not be prefetched; they load on demand");
            } else {
                tracing::info!(
                    chunks = total,
                    secs = format_args!("{:.1}", started.elapsed().as_secs_f64()),
                    "image metadata resident"
                );
            }
        });
        Ok(true)
    }
}

impl TieredStore {
    /// Metadata chunks the background prefetch has not pinned yet (0 once
    /// all of it is resident, or when none was needed).
    pub fn metadata_pending(&self) -> u64 {
        self.inner.metadata_pending.load(Ordering::SeqCst)
    }
}
