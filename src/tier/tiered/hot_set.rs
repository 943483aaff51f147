//! The guest's hot set: chunks the user pinned (`driveblk hydrate --pin`)
//! and the chunks the newest boot profile touches. Pinned chunks are
//! fetched whole and never evicted; status says whether the whole hot set
//! is local ("offline-ready": the guest can run without the network).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::Inner;
use crate::tier::pins::Pins;
use crate::volume::profile;

impl Inner {
    /// Adds chunks to the hot set (pinned or not).
    pub(super) fn add_hot(&self, chunks: impl IntoIterator<Item = u64>, pin: bool) {
        let n = self.ssd.chunk_count();
        let mut hot = self.hot.lock();
        for idx in chunks.into_iter().filter(|&i| i < n) {
            hot.insert(idx);
            if pin {
                self.ssd.set_pinned(idx);
                self.pinned.lock().insert(idx);
            }
        }
    }

    /// Applies `pins`: marks their chunks pinned (resolving the newest
    /// boot profile's chunks when it is pinned) and fetches the ones not
    /// local yet, a few at a time, behind any guest miss. The caller
    /// counted this run in `counters.pinning` before spawning it (so a
    /// waiter never sees it done before it began); it ends the count.
    pub(super) async fn apply_pins(self: Arc<Self>, pins: Pins) {
        self.add_hot(pins.range_chunks(self.cs, self.vol.image_len()), true);
        if pins.profile {
            match profile::find_latest(&self.vol.remote, &self.vol.header).await {
                Ok(Some((key, index))) => {
                    tracing::info!(profile = %key, chunks = index.chunk_refs.len(), "pinning the boot profile's chunks");
                    self.add_hot(index.chunk_refs.keys().copied(), true);
                }
                Ok(None) => tracing::warn!(
                    "the volume has no boot profile yet: its chunks are pinned once a boot has recorded one (at the next start)"
                ),
                Err(e) => tracing::warn!(error = %e, "could not find the boot profile to pin; trying again at the next start"),
            }
        }
        let todo: Vec<u64> = {
            let pinned = self.pinned.lock();
            pinned.iter().copied().filter(|&i| !self.ssd.has_chunk(i) && !self.is_zero(i)).collect()
        };
        if !todo.is_empty() {
            tracing::info!(chunks = todo.len(), "fetching pinned chunks");
        }
        let sem = Arc::new(Semaphore::new(self.hydrate_concurrency));
        let mut set = tokio::task::JoinSet::new();
        for idx in todo {
            if self.closed.load(Ordering::Relaxed) {
                break;
            }
            while self.demand.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else { break };
            let f = self.flight(idx, false, super::fetch::Source::Hydrate);
            set.spawn(async move {
                let r = f.await;
                drop(permit);
                r.is_ok()
            });
        }
        let mut failed = 0;
        while let Some(r) = set.join_next().await {
            failed += usize::from(!r.unwrap_or(false));
        }
        if failed > 0 {
            tracing::warn!(failed, "some pinned chunks could not be fetched; they are fetched again at the next start");
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.ssd.persist()).await;
        self.counters.pinning.fetch_sub(1, Ordering::SeqCst);
    }

    /// (chunks in the hot set, of them local, pinned, pinned and local).
    pub(super) fn hot_counts(&self) -> (u64, u64, u64, u64) {
        let local = |i: &&u64| self.ssd.has_chunk(**i) || self.is_zero(**i);
        let hot = self.hot.lock();
        let pinned = self.pinned.lock();
        (
            hot.len() as u64,
            hot.iter().filter(local).count() as u64,
            pinned.len() as u64,
            pinned.iter().filter(local).count() as u64,
        )
    }
}
