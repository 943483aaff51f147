//! Misses that cost one round trip of the bytes they need: in a chunk
//! stored as sub-frames (`volume::subframe`), a first guest miss fetches,
//! verifies and installs the run of missing sub-frames from its own on (up
//! to [`PART_RUN`], or only its own once the boot has fetched what its
//! bound allows), a second miss elsewhere in the chunk the rest of it as
//! one flight (outside regions the guest reads densely, where whole chunks
//! save round trips); completing a partial chunk fetches only the
//! sub-frames it lacks. Packs' sub-frame indexes are fetched once, in the
//! background, from the start (or loaded from the cache directory).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::fetch::Source;
use super::{Inner, SegmentResult, SharedError};
use crate::remote::priority;
use crate::remote::retry::within_budget;
use crate::tier::single_flight::{Flight, Urgency};
use crate::tier::ssd::{ABSENT, PARTIAL};
use crate::tier::stats::Counters;
use crate::volume::subframe::SUB_SIZE;
use crate::volume::{Part, VolumeError};

/// Indexes fetched at once in the background.
const INDEX_FETCHES: usize = 8;

/// What a first guest miss in a chunk fetches: the run of missing
/// sub-frames from its own on, up to this many bytes, in one request. A
/// file read front to back (the common boot read) then costs one round
/// trip for its next reads too; 256 KiB is 4 qcow2 clusters of 64 KiB and
/// 10 ms on a 200 Mbit/s link, a tenth of a round trip.
pub const PART_RUN: u64 = 256 << 10;

/// Local bytes between missing runs that a rest-of-chunk fetch reads again
/// rather than send another request (the runs' requests run in parallel,
/// so this saves requests, not time: one sub-frame).
const MERGE_GAP: u64 = 64 << 10;

/// How a guest miss outside the profile is fetched.
pub(super) enum MissPlan {
    /// The sub-frames `[off, off + len)` of the chunk (a first miss's run,
    /// or joining the run an earlier miss sent for).
    Part(u64, u64),
    /// The whole chunk: a second miss in it (the rest, as one flight later
    /// misses join), a dense region, or no sub-frames to fetch.
    Chunk,
}

impl Inner {
    /// True when a guest miss in chunk `idx` may fetch only a part: the
    /// chunk is stored as sub-frames of a known index, no fetch of the
    /// whole chunk runs already (joining it is cheaper), the SSD tier can
    /// hold pages of it, and its region is not one the guest reads densely
    /// while the first boot's stream has room (there a whole chunk saves
    /// the round trips of the misses to come).
    pub(super) fn part_wanted(&self, idx: u64) -> bool {
        matches!(self.ssd.state(idx), ABSENT | PARTIAL)
            && !self.flights.contains(&idx)
            && !self.dense_and_streaming(idx)
            && self.vol.part_ready(idx)
    }

    /// Plans a guest miss of `[off, off + len)` in chunk `idx`: the first
    /// miss in a chunk fetches the run of missing sub-frames from its own
    /// on (up to [`PART_RUN`]); a miss inside a run already sent for joins
    /// it; any other miss in the chunk fetches the rest of the chunk (the
    /// guest reads more of it than one run: one flight, and every later
    /// miss in the chunk joins it). Once the boot has fetched what its
    /// bound allows, a miss fetches only the sub-frames it covers.
    pub(super) fn plan_miss(&self, idx: u64, off: u64, len: u64) -> MissPlan {
        if !self.part_wanted(idx) {
            return MissPlan::Chunk;
        }
        let mut runs = self.part_runs.lock();
        let within = self.fetched_within_bound();
        if let Some(&(a, b)) = runs.get(&idx) {
            if off >= a && off + len <= b {
                return MissPlan::Part(a, b - a);
            }
            if within {
                return MissPlan::Chunk;
            }
            // Past the bound a second miss takes only its own sub-frames too.
        }
        let sub = u64::from(SUB_SIZE);
        let cl = (self.vol.chunk_len(idx) as u64).max(off + len);
        let (mut a, mut b) = (off / sub * sub, ((off + len).div_ceil(sub) * sub).min(cl));
        // Sub-frames at the miss's edges already local are not fetched again.
        while a + sub < b && self.ssd.has_pages(idx, a, sub) {
            a += sub;
        }
        while b - a > sub && self.ssd.has_pages(idx, (b - 1) / sub * sub, b - (b - 1) / sub * sub) {
            b = (b - 1) / sub * sub;
        }
        // The run goes on while its sub-frames are missing, unless the boot
        // has fetched all its bound allows: then the miss takes only its own.
        let run = if within { PART_RUN } else { 0 };
        let limit = (a + run).min(cl);
        while b < limit && !self.ssd.has_pages(idx, b, sub.min(cl - b)) {
            b = (b + sub).min(cl);
        }
        runs.insert(idx, (a, b));
        MissPlan::Part(a, b - a)
    }

    /// The single flight fetching the sub-frames of chunk `idx` covering
    /// `[off, off + len)` for a guest (urgent).
    pub(super) fn part_flight(self: &Arc<Self>, idx: u64, off: u64, len: u64) -> Flight<SegmentResult> {
        let sub = u64::from(SUB_SIZE);
        let key = (idx, off / sub, (off + len).div_ceil(sub));
        let me = self.clone();
        let budget = self.remote_wait.call_budget();
        self.part_flights.join_as(
            &self.handle,
            key,
            true,
            move |_| within_budget(budget, me.fetch_part(idx, off, len)),
            || Err(super::closing()),
        )
    }

    /// Fetches the part for a guest and installs it. The rest of the chunk
    /// is not sent for here: in a region the guest reads densely misses
    /// fetch whole chunks and the first boot's stream brings the rest (of a
    /// partial chunk, only the sub-frames it lacks); elsewhere the rest is
    /// rarely read.
    async fn fetch_part(self: Arc<Self>, idx: u64, off: u64, len: u64) -> SegmentResult {
        let part = {
            let mut lane = self.lanes.timed(true);
            let _permit = self.fetch_sem.acquire().await;
            lane.started();
            let part = self.vol.fetch_part(idx, off, len).await;
            if let Ok(Some(p)) = &part {
                lane.done(p.wire_bytes);
            }
            part
        };
        self.install_part(idx, part, Source::Miss).await?;
        Counters::inc(&self.counters.part_fetches);
        Ok(())
    }

    /// Counts and installs a fetched part in the SSD tier (unless a commit
    /// replaced the chunk meanwhile, or it is no longer absent or partial).
    async fn install_part(
        self: &Arc<Self>,
        idx: u64,
        part: crate::volume::VolumeResult<Option<Part>>,
        src: Source,
    ) -> SegmentResult {
        let part = match part {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(SharedError(Arc::new(VolumeError::Unusable(format!(
                    "chunk {idx} has no sub-frames to fetch"
                )))))
            }
            Err(e) => {
                Counters::inc(&self.counters.fetch_errors);
                tracing::warn!(chunk = idx, error = %e, "fetch of part of a chunk failed");
                return Err(SharedError(Arc::new(e)));
            }
        };
        Counters::inc(&self.counters.remote_fetches);
        self.counters.remote_bytes.fetch_add(part.wire_bytes, Ordering::Relaxed);
        self.lanes.count(src, part.wire_bytes);
        let me = self.clone();
        let installed = tokio::task::spawn_blocking(move || -> io::Result<bool> {
            let _g = me.ssd.lock_write(idx);
            if !me.vol.chunk_ref(idx).same_bytes(&part.chunk_ref) {
                return Ok(false);
            }
            me.ssd.install_pages(idx, part.off, &part.data)
        })
        .await;
        match installed {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(SharedError(Arc::new(VolumeError::Unusable(format!(
                "part of chunk {idx} could not be kept (changed meanwhile, or no room)"
            ))))),
            Ok(Err(e)) => Err(SharedError(Arc::new(VolumeError::io("storing part of a chunk in", self.ssd.dir(), e)))),
            Err(e) => Err(SharedError(Arc::new(VolumeError::task("storing part of a chunk")(e)))),
        }
    }

    /// Fetches the sub-frames of partial chunk `idx` it lacks (runs of
    /// missing sub-frames, runs close together in one ranged read) within the speculative
    /// budget unless `urgency` says a guest waits. Ok once the chunk is
    /// whole in the SSD tier.
    pub(super) async fn fetch_rest(self: &Arc<Self>, idx: u64, src: Source, urgency: Arc<Urgency>) -> SegmentResult {
        let sub = u64::from(SUB_SIZE);
        let chunk_len = self.vol.chunk_len(idx) as u64;
        // Room on the link first: a guest's part fetched meanwhile is then
        // installed and not fetched again.
        let _lane = self.lanes.admit(chunk_len, &urgency).await;
        // A guest's run of this chunk still on its way lands first.
        let running = self.part_runs.lock().get(&idx).copied();
        if let Some(f) = running.and_then(|(a, b)| self.part_flights.get(&(idx, a / sub, b.div_ceil(sub)))) {
            let _ = f.await;
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut start = None;
        let mut at = 0;
        while at < chunk_len {
            let n = sub.min(chunk_len - at);
            let missing = !self.ssd.has_pages(idx, at, n);
            match (missing, start) {
                (true, None) => start = Some(at),
                (false, Some(s)) => {
                    runs.push((s, at - s));
                    start = None;
                }
                _ => {}
            }
            at += n;
        }
        if let Some(s) = start {
            runs.push((s, chunk_len - s));
        }
        // One request for runs close together: a round trip costs more
        // than reading a few local sub-frames again.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (off, len) in runs {
            match merged.last_mut() {
                Some((o, l)) if off - (*o + *l) <= MERGE_GAP => *l = off + len - *o,
                _ => merged.push((off, len)),
            }
        }
        let runs = merged;
        let urgency = &urgency;
        let fetches = runs.into_iter().map(|(off, len)| async move {
            let part = {
                let mut lane = self.lanes.timed(urgency.is_urgent());
                let _permit = self.fetch_sem.acquire().await;
                lane.started();
                let part = priority::speculative(urgency.mark(), self.vol.fetch_part(idx, off, len)).await;
                if let Ok(Some(p)) = &part {
                    lane.done(p.wire_bytes);
                }
                part
            };
            self.install_part(idx, part, src).await
        });
        for r in futures::future::join_all(fetches).await {
            r?;
        }
        if self.ssd.has_chunk(idx) {
            Ok(())
        } else {
            Err(SharedError(Arc::new(VolumeError::Unusable(format!("chunk {idx} is still not whole")))))
        }
    }

    /// Loads the indexes the cache directory kept, then fetches the rest
    /// of the served generation's packs' (those holding a chunk not local),
    /// a few at a time, as speculative work: until a pack's index is known,
    /// misses in it fetch whole chunks.
    pub(super) async fn prefetch_indexes(self: Arc<Self>) {
        let me = self.clone();
        if let Ok(n) = tokio::task::spawn_blocking(move || me.vol.load_saved_indexes()).await {
            tracing::debug!(packs = n, "sub-frame indexes loaded from the cache directory");
        }
        if self.vol.offline {
            return;
        }
        let keys = self.vol.indexes_to_fetch(|idx| !self.ssd.has_chunk(idx));
        if keys.is_empty() {
            return;
        }
        let sem = Arc::new(Semaphore::new(INDEX_FETCHES));
        let mut set = tokio::task::JoinSet::new();
        let n = keys.len();
        for key in keys {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else { return };
            let me = self.clone();
            set.spawn(async move {
                let want = me.vol.manifest().indexes.get(&key).map_or(0, |r| r.len);
                let lane = me.lanes.admit(want, &Urgency::new(false)).await;
                match priority::speculative(Urgency::new(false).mark(), me.vol.pack_index(&key)).await {
                    Ok((_, bytes)) if bytes > 0 => {
                        lane.done(bytes);
                        Counters::inc(&me.counters.remote_fetches);
                        me.counters.remote_bytes.fetch_add(bytes, Ordering::Relaxed);
                        me.lanes.count(Source::Index, bytes);
                    }
                    Ok(_) => {}
                    // Its chunks are then fetched whole, as before indexes
                    // (each checked against the manifest's hash).
                    Err(e) => {
                        Counters::inc(&me.counters.fetch_errors);
                        tracing::warn!(pack = %key, error = %e, "could not read a pack's sub-frame index");
                    }
                }
                drop(permit);
            });
            while set.try_join_next().is_some() {}
        }
        while set.join_next().await.is_some() {}
        tracing::debug!(packs = n, "sub-frame indexes fetched");
    }
}
