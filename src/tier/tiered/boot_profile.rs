//! The tiered store's side of boot profiles: finding and streaming the
//! volume's newest profile into the SSD tier ahead of the guest, and saving
//! what this boot read as a new profile when the recording window closes or
//! the store closes (unless the replayed one still matches the boot). A
//! saved profile is sealed in the cache directory first and uploaded in the
//! background, so a shutdown never waits on its upload: one cut short goes
//! up at the next start.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::fetch::Source;
use super::{closing, Inner, SegmentResult, SharedError};
use crate::remote::priority;
use crate::tier::boot::{
    delta_plan, for_each_chunk_part, learned, BootProfileMode, Planned, Recorded, Replay, NEW_SHARE,
};
use crate::tier::single_flight::{Flight, Urgency};
use crate::tier::ssd::{is_dirty, PARTIAL};
use crate::tier::stats::Counters;
use crate::tier::{IoMode, IoVec};
use crate::volume::profile::{self, PendingProfile, ProfileBuilder};
use crate::volume::{VolumeError, VolumeResult};

/// Profile bytes after a segment a guest waits for that are fetched with it.
const FOLLOW_BYTES: u64 = 2 << 20;

impl Inner {
    /// The boot profile's background work: find the volume's newest
    /// profile and stream it; record this boot, and save it when the
    /// recording window closes if there was no profile, if it no longer
    /// matches the boot (see [`save_profile`](Self::save_profile)), or when
    /// asked to.
    pub(super) async fn boot_profile(self: Arc<Self>) {
        let latest = profile::find_latest(&self.vol.remote, &self.vol.header).await;
        // A profile an earlier run sealed but did not get up goes up now,
        // beside this boot (unless the remote has a newer one by now).
        // A run that writes nothing (read-only, ephemeral) leaves it for
        // the next one that does.
        let writes = self.recorder.is_some();
        if let Some(p) = PendingProfile::find(self.ssd.dir(), &self.vol.url, &self.vol.header, self.ssd.is_sealed())
            .filter(|_| writes)
        {
            match &latest {
                Ok(Some((key, _))) if *key >= p.key => {
                    tracing::info!(pending = %p.key, newest = %key, "a newer boot profile is on the remote; dropping the one not uploaded");
                    p.discard();
                }
                _ => {
                    tracing::info!(profile = %p.key, "uploading the boot profile an earlier run sealed");
                    self.handle.spawn(self.clone().upload_pending(p));
                }
            }
        }
        match latest {
            Ok(Some((key, index))) => {
                let vol = self.vol.clone();
                let refs = index.chunk_refs.clone();
                // Pages of chunks whose content changed since the profile
                // was recorded (a newer generation) are not taken from it.
                let rp = Replay::new(key, index, self.cs, |idx| {
                    refs.get(&idx).is_some_and(|d| profile::ref_digest(&vol.chunk_ref(idx)).as_ref() == Some(d))
                });
                tracing::info!(
                    profile = %rp.key,
                    segments = rp.segments(),
                    bytes = rp.index.raw_bytes(),
                    "streaming the boot profile into the cache"
                );
                let rp = Arc::new(rp);
                // What this boot will read: the hot set status reports on.
                self.add_hot(rp.index.chunk_refs.keys().copied(), false);
                self.streaming.store(true, Ordering::SeqCst);
                *self.replay.write() = Some(rp.clone());
                self.clone().stream_profile(rp).await;
                self.streaming.store(false, Ordering::SeqCst);
            }
            Ok(None) => {
                tracing::debug!("the volume has no boot profile yet; recording this boot");
                self.start_dense_stream();
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not look for a boot profile; recording this boot");
                self.start_dense_stream();
            }
        }
        // Save the recording when its window closes (or it hit its cap).
        let Some(rec) = &self.recorder else { return };
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            if rec.expired() || (!rec.active() && rec.bytes() > 0) {
                break;
            }
            if !rec.active() && rec.bytes() == 0 {
                return; // finished by a close
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.save_profile().await;
    }

    /// Ends the recording, seals it in the cache directory and uploads it
    /// as the volume's newest profile.
    pub(super) async fn save_profile(self: Arc<Self>) {
        if let Some(p) = self.clone().seal_profile().await {
            self.upload_pending(p).await;
        }
    }

    /// Ends the recording and, if it is worth saving, builds the profile
    /// from the SSD tier and seals it on local disk (local work only:
    /// `close` waits for this, never for the upload).
    pub(super) async fn seal_profile(self: Arc<Self>) -> Option<PendingProfile> {
        let rec = self.recorder.as_ref()?;
        if self.saving.swap(true, Ordering::SeqCst) {
            return None;
        }
        let recorded = rec.finish();
        let replay = self.replay.read().clone();
        let keep = match (&replay, self.boot_mode) {
            // The boot read nothing (much) the profile does not hold: keep
            // it, do not upload the same pages again. Pages of chunks this
            // boot changed are not held any more: the next boot could not
            // take them from the profile.
            (Some(rp), BootProfileMode::Auto) => {
                let unchanged =
                    |idx: u64| rp.index.chunk_refs.get(&idx) == profile::ref_digest(&self.vol.chunk_ref(idx)).as_ref();
                let covered: u64 =
                    recorded.extents.iter().map(|e| rp.covered_bytes(e.offset, e.len, self.cs, &unchanged)).sum();
                let new = recorded.bytes.saturating_sub(covered);
                if (new as f64) < NEW_SHARE * recorded.bytes as f64 {
                    tracing::info!(new, profile = %rp.key, "this boot read what the boot profile holds; keeping it");
                    true
                } else {
                    tracing::info!(
                        new,
                        profile = %rp.key,
                        "this boot read pages the boot profile does not hold; saving it with them"
                    );
                    false
                }
            }
            _ => false,
        };
        let mut sealed = None;
        if recorded.bytes > 0 && !keep {
            // Auto: the profile learns — a delta over the old one (this
            // boot's new pages uploaded, the old frames it keeps named where
            // they are); Record: this boot's pages alone.
            let old = replay.filter(|_| self.boot_mode == BootProfileMode::Auto);
            let me = self.clone();
            let reads = recorded.reads;
            let built = tokio::task::spawn_blocking(move || {
                me.build_profile(&recorded, old.as_deref()).and_then(|b| b.seal(me.ssd.dir()))
            })
            .await;
            match built {
                Ok(Ok(Some(p))) => {
                    tracing::info!(profile = %p.key, bytes = p.index.raw_bytes(), reads, "sealed the boot profile in the cache");
                    sealed = Some(p);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not build the boot profile"),
                Err(e) => tracing::warn!(error = %e, "building the boot profile failed"),
            }
        }
        self.saving.store(false, Ordering::SeqCst);
        sealed
    }

    /// Uploads a sealed profile; on failure it stays sealed in the cache
    /// directory and the next start tries again. It goes up as deferred
    /// speculative work (a guest's reads go first at Drive's pacer, and
    /// under `--bwlimit` the guest's changes go up first) until the store
    /// closes and waits for it.
    pub(super) async fn upload_pending(self: Arc<Self>, p: PendingProfile) {
        let t0 = std::time::Instant::now();
        let bytes = p.index.raw_bytes();
        let me = Arc::downgrade(&self);
        // Deferred: under `--bwlimit` the guest's changes go up first.
        let closing =
            priority::Speculative::new(move || me.upgrade().is_none_or(|me| me.profile_closed.load(Ordering::SeqCst)))
                .deferred();
        match priority::speculative(closing, p.upload(&self.vol.remote)).await {
            Ok(key) => {
                Counters::inc(&self.counters.profile_saved);
                tracing::info!(
                    profile = %key,
                    bytes,
                    secs = t0.elapsed().as_secs_f64(),
                    "saved the boot profile: the next cold start streams these pages first"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "could not upload the boot profile; it stays sealed in the cache directory and goes up at the next start"
            ),
        }
    }

    /// Reads the recorded pages that hold the committed generation's bytes
    /// from the SSD tier into a profile pack, as a delta over `old` when
    /// given (see [`delta_plan`]). Pages of chunks written (or zeroed)
    /// locally and not committed, evicted, known zero, or changed by a
    /// generation committed since the build began are left out: another
    /// machine would not read those bytes from the remote.
    fn build_profile(&self, recorded: &Recorded, old: Option<&Replay>) -> VolumeResult<ProfileBuilder> {
        let mut b = ProfileBuilder::new(self.ssd.dir(), &self.vol)?;
        #[cfg(test)]
        super::tests::stage(self.ssd.dir(), "profile build");
        if self.ssd.is_sealed() {
            b.seal_spill();
        }
        // Planned against the generation the builder records: a kept frame
        // must hold that generation's bytes.
        let plan: Vec<Planned> = match old {
            Some(old) => delta_plan(recorded, old, self.cs, &|idx| {
                old.index.chunk_refs.get(&idx) == b.chunk_digest(idx).as_ref()
            }),
            None => learned(recorded, None, self.vol.image_len(), self.cs)
                .into_iter()
                .map(|(_, e)| Planned::Fresh(e))
                .collect(),
        };
        let image_len = self.vol.image_len();
        let mut buf = Vec::new();
        for step in &plan {
            let e = match step {
                Planned::Fresh(e) => e,
                Planned::Reuse(seg, age) => {
                    let old = old.expect("a plan that reuses segments comes with the old profile");
                    b.reuse(old.index.pack_key(*seg), &old.index.segments[*seg], &old.index.chunk_refs, *age)?;
                    continue;
                }
            };
            let end = (e.offset + e.len).min(image_len);
            if e.offset >= end {
                continue;
            }
            let mut runs = Vec::new();
            for_each_chunk_part(e.offset, end - e.offset, self.cs, |idx, off, len| {
                runs.push((idx, off, len));
            });
            for (idx, off, len) in runs {
                // (None: a zero chunk, never profiled.)
                let Some(digest) = b.chunk_digest(idx) else { continue };
                let _g = self.ssd.lock_read(idx);
                // The cache holds the builder's generation's bytes of the
                // chunk only if it is clean, and the generation served has
                // the same bytes there: a commit while the profile is
                // built serves the next generation's.
                let state = self.ssd.state(idx);
                if is_dirty(state)
                    || !(self.ssd.has_chunk(idx) || state == PARTIAL)
                    || profile::ref_digest(&self.vol.chunk_ref(idx)).as_ref() != Some(&digest)
                {
                    continue;
                }
                // Whole runs of present pages (a partial chunk may miss some).
                let mut pos = off;
                while pos < off + len {
                    let page_end = ((pos / profile::PAGE_SIZE + 1) * profile::PAGE_SIZE).min(off + len);
                    if !self.ssd.has_pages(idx, pos, page_end - pos) {
                        pos = page_end;
                        continue;
                    }
                    let mut run_end = page_end;
                    while run_end < off + len {
                        let next = (run_end + profile::PAGE_SIZE).min(off + len);
                        if !self.ssd.has_pages(idx, run_end, next - run_end) {
                            break;
                        }
                        run_end = next;
                    }
                    buf.resize((run_end - pos) as usize, 0);
                    self.ssd
                        .read(idx, pos, &IoVec::from_slice(&mut buf), IoMode::Blocking)
                        .map_err(|e| VolumeError::io("reading the boot profile's pages from", self.ssd.dir(), e))?;
                    b.add(idx * self.cs + pos, &buf)?;
                    pos = run_end;
                }
            }
        }
        Ok(b)
    }

    /// The single flight fetching profile segment `seg`; `urgent` when a
    /// guest waits for it (the stream's flights are speculative).
    pub(super) fn segment_flight(
        self: &Arc<Self>,
        rp: &Arc<Replay>,
        seg: usize,
        urgent: bool,
    ) -> Flight<SegmentResult> {
        let me = self.clone();
        let rp = rp.clone();
        self.segment_flights.join_as(
            &self.handle,
            seg,
            urgent,
            move |u| me.fetch_segment(rp, seg, u),
            || Err(closing()),
        )
    }

    /// A guest waiting for segment `seg` reads where the recorded boot read
    /// later (a file opened sooner this time): it is likely to read on, so
    /// the segments after it, up to `FOLLOW_BYTES` on the wire, go at once
    /// too, not one round trip each as the guest gets to them.
    pub(super) fn follow_segment(self: &Arc<Self>, rp: &Arc<Replay>, seg: usize) {
        let mut wire = 0;
        for next in seg + 1..rp.segments() {
            if wire >= FOLLOW_BYTES {
                break;
            }
            wire += rp.index.segments[next].len;
            if !rp.is_done(next) {
                drop(self.segment_flight(rp, next, true));
            }
        }
    }

    /// Calls `f(chunk, offset in chunk, offset in segment, len)` for the
    /// pieces of segment `seg` that may be installed.
    fn segment_parts(&self, rp: &Replay, seg: usize, mut f: impl FnMut(u64, u64, usize, u64)) {
        let mut cur = 0usize;
        for e in &rp.index.segments[seg].extents {
            for_each_chunk_part(e.offset, e.len, self.cs, |idx, off, len| {
                if rp.usable(idx) {
                    f(idx, off, cur, len);
                }
                cur += len as usize;
            });
        }
    }

    /// Fetches segment `seg` (unless all its pages are local already) and
    /// installs its pages in the SSD tier.
    async fn fetch_segment(self: Arc<Self>, rp: Arc<Replay>, seg: usize, urgency: Arc<Urgency>) -> SegmentResult {
        let mut local = true;
        self.segment_parts(&rp, seg, |idx, off, _, len| local &= self.ssd.has_pages(idx, off, len));
        if local {
            if rp.mark_done(seg) {
                Counters::inc(&self.counters.profile_segments_done);
            }
            return Ok(());
        }
        let wire = rp.index.segments[seg].len;
        let data = {
            let lane = self.lanes.admit(wire, &urgency).await;
            let fetch = profile::fetch_segment(&self.vol.remote, &self.vol.url, &rp.index, seg);
            let data = priority::speculative(urgency.mark(), fetch).await;
            if data.is_ok() {
                lane.done(wire);
            }
            data
        }
        .map_err(|e| {
            Counters::inc(&self.counters.fetch_errors);
            tracing::warn!(segment = seg, error = %e, "boot profile segment fetch failed");
            SharedError(Arc::new(e))
        })?;
        Counters::inc(&self.counters.remote_fetches);
        self.counters.remote_bytes.fetch_add(wire, Ordering::Relaxed);
        self.lanes.count(Source::Profile, wire);
        self.counters.profile_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let me = self.clone();
        let rp2 = rp.clone();
        let installed = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let rp = rp2;
            let mut res = Ok(());
            me.segment_parts(&rp, seg, |idx, off, at, len| {
                if res.is_err() {
                    return;
                }
                let _g = me.ssd.lock_write(idx);
                // A generation committed since the replay began may have
                // changed this chunk: its profiled bytes are stale then.
                let current = profile::ref_digest(&me.vol.chunk_ref(idx));
                if current.is_none() || rp.index.chunk_refs.get(&idx) != current.as_ref() {
                    return;
                }
                let pages = &data[at..at + len as usize];
                // Pages that complete a chunk make it clean: they must add up
                // to the chunk the manifest names (a bad profile must not
                // poison later boots). The chunk stays as it was otherwise;
                // the guest's reads of it then fetch it whole.
                if me.ssd.would_complete(idx, off, len) {
                    match me.profile_completes_chunk(idx, off, pages) {
                        Ok(true) => {}
                        Ok(false) => {
                            Counters::inc(&me.counters.profile_rejected);
                            tracing::error!(
                                chunk = idx,
                                profile = %rp.key,
                                "boot profile pages do not match the chunk's digest: discarded (the chunk is fetched whole)"
                            );
                            me.ssd.invalidate(idx);
                            return;
                        }
                        Err(e) => {
                            res = Err(e);
                            return;
                        }
                    }
                }
                if let Err(e) = me.ssd.install_pages(idx, off, pages) {
                    res = Err(e);
                }
            });
            res
        })
        .await;
        match installed {
            Ok(Ok(())) => {
                if rp.mark_done(seg) {
                    Counters::inc(&self.counters.profile_segments_done);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                // The guest falls back to chunk fetches for these pages.
                tracing::warn!(segment = seg, error = %e, "could not store boot profile pages in the SSD cache");
                Err(SharedError(Arc::new(VolumeError::io("storing boot profile pages in", self.ssd.dir(), e))))
            }
            Err(e) => Err(SharedError(Arc::new(VolumeError::task("storing boot profile pages")(e)))),
        }
    }

    /// Whether chunk `idx`, completed by `pages` at `off`, matches the
    /// content digest its manifest entry names (true when the entry names
    /// none, e.g. a base file's bytes). Caller holds the stripe lock.
    fn profile_completes_chunk(&self, idx: u64, off: u64, pages: &[u8]) -> io::Result<bool> {
        let r = self.vol.chunk_ref(idx);
        let Some(want) = r.content_digest() else { return Ok(true) };
        let mut chunk = self.ssd.read_chunk(idx)?;
        let end = (off as usize + pages.len()).min(chunk.len());
        chunk[off as usize..end].copy_from_slice(&pages[..end - off as usize]);
        // Packed digests cover the chunk's bytes inside the image (the last
        // chunk may be short); patched ones the whole chunk.
        let inside = self.ssd.len().saturating_sub(idx * self.cs).min(self.cs) as usize;
        use crate::volume::digest::matches;
        Ok(matches(&chunk, want) || matches(&chunk[..inside], want))
    }

    /// Streams every segment of the profile, in order, many at a time:
    /// the boot's pages arrive in the order the boot reads them. The link's
    /// speculative budget says how many are in flight; this many wait for
    /// it in order (segments are often a few hundred KiB, so a fixed number
    /// of fetches would hold the stream below a long link's speed).
    async fn stream_profile(self: Arc<Self>, rp: Arc<Replay>) {
        const QUEUED: usize = 256;
        let n = rp.segments();
        self.counters.profile_segments.store(n as u64, Ordering::Relaxed);
        let sem = Arc::new(Semaphore::new(QUEUED));
        let mut set = tokio::task::JoinSet::new();
        for seg in 0..n {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else { return };
            let f = self.segment_flight(&rp, seg, false);
            set.spawn(async move {
                let _ = f.await;
                drop(permit);
            });
            while set.try_join_next().is_some() {}
        }
        while set.join_next().await.is_some() {}
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.ssd.persist()).await;
        tracing::info!(
            segments = n,
            done = self.counters.profile_segments_done.load(Ordering::Relaxed),
            "boot profile streamed"
        );
    }
}
