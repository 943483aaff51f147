//! The store's side of the writer lease (`volume::lease`): taken at open
//! (or before the first commit), renewed by a heartbeat task that reports
//! the bytes still pending and notices another host taking it over,
//! released at a clean stop with nothing left.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Inner;
use crate::volume::format::Writer;
use crate::volume::gc::REPACK_WRITER;
use crate::volume::lease::{self, Claim, LeaseHolder};
use crate::volume::reader::read_object;
use crate::volume::{VolumeError, VolumeResult};

impl Inner {
    /// Bytes of local changes not on the remote yet, by whole chunks: a
    /// zeroed chunk counts too (it changes the next generation as much as
    /// a written one, and a lease must stand while it waits).
    pub(super) fn pending_bytes(&self) -> u64 {
        self.ssd.dirty_chunks() * self.cs
    }

    /// Takes the lease (a generation committed through the fence on top
    /// of the one served), serves that generation, and starts the
    /// heartbeat. `force` breaks another host's lease; `committing`: taken
    /// for a commit, not at the start (`Claim::committing`).
    pub(super) async fn take_lease(self: Arc<Self>, force: bool, committing: bool) -> VolumeResult<Arc<LeaseHolder>> {
        let wb = self.writeback.as_ref().expect("only a writable store takes the lease");
        let claim = Claim {
            cache_id: self.ssd.cache_id().to_string(),
            pending_bytes: self.pending_bytes(),
            force,
            copy_of: self.ssd.copy_of().map(str::to_string),
            ttl: lease::ttl(),
            committing,
        };
        let taken = lease::acquire(&self.vol, &claim, wb.opts.commit.clone()).await?;
        let g = taken.manifest.generation;
        let me = self.clone();
        let m = taken.manifest;
        let saved = tokio::task::spawn_blocking(move || me.install_generation(m, &BTreeMap::new()))
            .await
            .map_err(VolumeError::task("installing a generation"))?;
        // The lease is committed and served: taking it again would commit
        // another generation each time the state cannot be saved.
        if let Err(e) = saved {
            tracing::error!(generation = g, error = %e, "took the writer lease, but could not save this cache's state");
        }
        let holder = Arc::new(taken.holder);
        *self.lease.lock() = Some(holder.clone());
        tracing::info!(url = %self.vol.url, generation = g, "took the writer lease");
        tokio::spawn(self.clone().lease_loop(holder.clone()));
        Ok(holder)
    }

    /// The lease, taken now (to commit) if this store does not hold it yet.
    pub(super) async fn ensure_lease(self: Arc<Self>) -> VolumeResult<Arc<LeaseHolder>> {
        if let Some(h) = self.lease.lock().clone() {
            return Ok(h);
        }
        self.take_lease(false, true).await
    }

    /// Renews the heartbeat every quarter ttl, and at once when the cache
    /// gains its first pending change or loses its last, so the record
    /// says whether changes wait here.
    async fn lease_loop(self: Arc<Self>, holder: Arc<LeaseHolder>) {
        let every = Duration::from_millis(holder.record().ttl_ms / 4).max(Duration::from_millis(50));
        let mut last = Instant::now();
        let mut failing = false;
        // A failing renewal is tried again sooner than `every`, but backs
        // off: a refusal (quota, permissions) must not become a request
        // every tick for as long as it lasts.
        let mut retry = Duration::ZERO;
        let mut failed_at = Instant::now();
        loop {
            tokio::time::sleep(every.min(Duration::from_millis(500))).await;
            if self.closed.load(Ordering::Relaxed) || holder.record().released {
                return;
            }
            if failing && failed_at.elapsed() < retry {
                continue;
            }
            let pending = self.pending_bytes();
            // Against what the record says, not what this loop saw last:
            // changes made and committed between two ticks (or before the
            // loop started) must not hide a flip from the record.
            let flipped = failing || (holder.record().pending_bytes > 0) != (pending > 0);
            if !flipped && last.elapsed() < every {
                continue;
            }
            match holder.renew(self.vol.generation(), pending).await {
                Ok(()) => {
                    last = Instant::now();
                    if failing {
                        tracing::info!("lease heartbeat written again");
                    }
                    failing = false;
                    retry = Duration::ZERO;
                    if let Some(w) = self.taken_over_by().await {
                        self.lose_lease(&w);
                        return;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "could not renew the lease heartbeat (retrying)");
                    }
                    failing = true;
                    failed_at = Instant::now();
                    retry = (retry * 2).clamp(Duration::from_millis(500), every);
                }
            }
        }
    }

    /// Who committed past the generation this store serves, if that is
    /// neither this cache (a commit of ours lands there before it is
    /// installed) nor gc's repack (same content: the next commit builds on
    /// it): a host that took the lease by force, or after this one went
    /// silent (asleep, or its network gone). Read by the identity the
    /// served manifest reserved for it, which no listing lag hides; an
    /// error answers None, and the next renewal looks again.
    async fn taken_over_by(&self) -> Option<Writer> {
        let m = self.vol.manifest();
        let g = m.generation + 1;
        let next =
            read_object(&self.vol.remote, &self.vol.url, &self.vol.header, g, m.next_slot.as_ref()).await.ok()?;
        let w = next.writer.unwrap_or_else(|| Writer {
            host: "another writer".into(),
            pid: 0,
            cache_id: String::new(),
            unix_ms: 0,
        });
        (w.cache_id != self.ssd.cache_id() && w.cache_id != REPACK_WRITER).then_some(w)
    }

    /// Another host holds the lease now: this store stops renewing it and
    /// no longer claims it (status, gc, the release at stop). What its guest
    /// wrote or writes on the generation it serves cannot go up: its next
    /// commit meets the fence, a conflict that names fork and discard-local.
    fn lose_lease(&self, w: &Writer) {
        let served = self.vol.generation();
        let why = format!(
            "{} (pid {}) committed generation {} on top of generation {served}, which this host serves: it holds the \
             writer lease now (taken by force, or after this host went silent); what the guest writes here stays \
             in this cache and forks — stop the VM here, then `driveblk status {}` says who holds it",
            w.host,
            w.pid,
            served + 1,
            self.vol.url
        );
        tracing::warn!(url = %self.vol.url, "lost the writer lease: {why}");
        *self.lease.lock() = None;
        *self.lease_lost.lock() = Some(why);
    }

    /// At close: releases the lease when nothing is left to upload (the
    /// next host starts at once); otherwise records what is pending, so
    /// the lease stands until this cache uploads it.
    pub(super) async fn finish_lease(self: Arc<Self>, left: u64) {
        let Some(holder) = self.lease.lock().clone() else { return };
        // Once: a second round at drop would be up to 5 s more of a stop
        // on a remote that hangs.
        if self.lease_finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let conflict = self.writeback.as_ref().is_some_and(|w| w.status().conflict.is_some());
        let g = self.vol.generation();
        let r = if left == 0 && !conflict { holder.release(g).await } else { holder.renew(g, left).await };
        match r {
            Ok(()) if left == 0 && !conflict => tracing::info!(generation = g, "released the writer lease"),
            Ok(()) if conflict => tracing::info!(
                bytes = left,
                "this host's heartbeat records the changes it keeps (another host holds the writer lease now)"
            ),
            Ok(()) => tracing::info!(
                bytes = left,
                "the writer lease stays with this host until its changes are uploaded (`driveblk sync`, or serve again here)"
            ),
            Err(e) => tracing::warn!(error = %e, "could not update the lease heartbeat at stop"),
        }
    }
}
