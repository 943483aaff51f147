//! Boot profiles in the tier layer: recording which 4 KiB pages of the image
//! file a boot reads, in first-touch order, with a bounded share of the
//! pages it writes ([`Recorder`]), and streaming a
//! recorded profile's pages into the SSD tier at the next cold start
//! ([`Replay`]) so the guest finds them local instead of waiting a round
//! trip per file. The objects themselves are `volume::profile`.
//!
//! Why pages and not chunks: a boot reads thousands of small files scattered
//! over the image; at chunk granularity it touches most chunks of the system
//! area and a cold start would download nearly the whole image.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::volume::profile::{Extent, ProfileIndex, PAGE_SIZE};

/// What the serve does with boot profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BootProfileMode {
    /// Replay the newest profile if the volume has one; record this boot
    /// and save it when there was none or the profile no longer matches.
    #[default]
    Auto,
    /// Replay the newest profile and save this boot's as a new one
    /// regardless.
    Record,
    /// Neither.
    Off,
}

/// Boots a page stays in the profile after the last boot that read it
/// (profiles learn: a saved profile is this boot's pages, then the older
/// profile's pages this boot did not read, until they age out).
pub const KEEP_BOOTS: u32 = 2;

/// Share of a boot's bytes that must be new to the profile (read by this
/// boot, not held by the profile) before a new profile is saved.
pub const NEW_SHARE: f64 = 0.02;

/// Largest boot working set recorded; past it recording stops (a guest
/// that reads this much is no longer just booting).
pub const RECORD_CAP: u64 = 2 << 30;

/// Pages a boot writes before reading them, kept in its profile up to this
/// share of the pages it reads (the earliest first). The next boot, on
/// another machine, reads many of them (logs, seeds, registry hives it
/// appends to), and once written back they come from the remote like any
/// other page; the bound keeps a page file written at boot from filling
/// the profile.
pub const WRITE_SHARE: f64 = 0.1;

struct Recording {
    /// The image's length as far as recorded: its length at open, grown by
    /// writes past it (a qcow2 file grows as the guest allocates clusters,
    /// and the next boot reads what this one appended).
    len: u64,
    /// One bit per page of the image: touched already.
    touched: Vec<u64>,
    /// First-touch order; true where a write touched the pages first.
    extents: Vec<(Extent, bool)>,
    /// Bytes of pages a read touched first.
    bytes: u64,
    /// Bytes of pages a write touched first.
    written: u64,
    reads: u64,
}

/// The recording window's clock: time since the first read, minus time
/// the guest spent waiting for the remote — a first boot over a slow link
/// takes minutes of stalls, and the window must still cover all of it.
#[derive(Default)]
struct Clock {
    /// Reads waiting for the remote now, and since when one was.
    waiting: u32,
    since: Option<Instant>,
    stalled: Duration,
}

impl Clock {
    fn active_time(&self, started: Option<&Instant>) -> Duration {
        let Some(t) = started else { return Duration::ZERO };
        let stalled = self.stalled + self.since.map_or(Duration::ZERO, |s| s.elapsed());
        t.elapsed().saturating_sub(stalled)
    }
}

/// Records the first touch of every page the guest reads, for a window of
/// guest time (not counting remote stalls) after the first read.
pub struct Recorder {
    window: Duration,
    state: Mutex<Option<Recording>>,
    /// The first read; set once, read without a lock on the read path.
    started: std::sync::OnceLock<Instant>,
    clock: Mutex<Clock>,
    /// Fast check on the read path: false once recording ended.
    active: std::sync::atomic::AtomicBool,
}

/// What a finished recording holds.
#[derive(Debug, Default)]
pub struct Recorded {
    pub extents: Vec<Extent>,
    pub bytes: u64,
    pub reads: u64,
}

impl Recorder {
    /// A recorder for an image of `image_len` bytes; recording runs until
    /// `window` after the first read, [`RECORD_CAP`], or [`finish`](Self::finish).
    pub fn new(image_len: u64, window: Duration) -> Self {
        let pages = image_len.div_ceil(PAGE_SIZE);
        let rec = Recording {
            len: image_len,
            touched: vec![0; pages.div_ceil(64) as usize],
            extents: Vec::new(),
            bytes: 0,
            written: 0,
            reads: 0,
        };
        Self {
            window,
            state: Mutex::new(Some(rec)),
            started: std::sync::OnceLock::new(),
            clock: Mutex::new(Clock::default()),
            active: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// True while recording.
    pub fn active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes recorded so far, read or written (0 once finished).
    pub fn bytes(&self) -> u64 {
        self.state.lock().as_ref().map_or(0, |r| r.bytes + r.written)
    }

    /// True once the window has passed. The owner polls this and calls
    /// [`finish`](Self::finish): the read path does not look at clocks.
    pub fn expired(&self) -> bool {
        self.clock.lock().active_time(self.started.get()) > self.window
    }

    /// A guest read starts waiting for the remote.
    pub fn stall_begin(&self) {
        let mut c = self.clock.lock();
        c.waiting += 1;
        if c.waiting == 1 {
            c.since = Some(Instant::now());
        }
    }

    /// A guest read stops waiting for the remote.
    pub fn stall_end(&self) {
        let mut c = self.clock.lock();
        c.waiting = c.waiting.saturating_sub(1);
        if c.waiting == 0 {
            if let Some(s) = c.since.take() {
                c.stalled += s.elapsed();
            }
        }
    }

    /// Notes a guest read of `[offset, offset + len)`.
    pub fn observe(&self, offset: u64, len: u64) {
        if !self.active() || len == 0 {
            return;
        }
        self.touch(offset, len, false);
    }

    /// Notes a guest write of `[offset, offset + len)` (once the window
    /// began: a boot starts with reads), past the image's end too: the
    /// store grew to hold it.
    pub fn observe_write(&self, offset: u64, len: u64) {
        if !self.active() || len == 0 || self.started.get().is_none() {
            return;
        }
        self.touch(offset, len, true);
    }

    fn touch(&self, offset: u64, len: u64, write: bool) {
        let mut guard = self.state.lock();
        let Some(r) = guard.as_mut() else { return };
        let end = offset.saturating_add(len);
        if write && end > r.len {
            r.len = end;
            r.touched.resize(end.div_ceil(PAGE_SIZE).div_ceil(64) as usize, 0);
        }
        if offset >= r.len {
            return;
        }
        if !write {
            self.started.get_or_init(Instant::now);
            r.reads += 1;
        }
        let end = end.min(r.len);
        for page in offset / PAGE_SIZE..end.div_ceil(PAGE_SIZE) {
            let (w, b) = ((page / 64) as usize, page % 64);
            if r.touched[w] & (1 << b) != 0 {
                continue;
            }
            r.touched[w] |= 1 << b;
            let start = page * PAGE_SIZE;
            let plen = PAGE_SIZE.min(r.len - start);
            if write {
                r.written += plen;
            } else {
                r.bytes += plen;
            }
            match r.extents.last_mut() {
                Some((e, w)) if *w == write && e.offset + e.len == start => e.len += plen,
                _ => r.extents.push((Extent { offset: start, len: plen }, write)),
            }
        }
        if r.bytes + r.written >= RECORD_CAP {
            self.active.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Ends recording and hands over what was recorded (empty if it was
    /// already taken): the pages read, and the pages written first up to
    /// [`WRITE_SHARE`] of those, in first-touch order.
    pub fn finish(&self) -> Recorded {
        self.active.store(false, std::sync::atomic::Ordering::Relaxed);
        let Some(r) = self.state.lock().take() else { return Recorded::default() };
        let mut budget = (r.bytes as f64 * WRITE_SHARE) as u64 / PAGE_SIZE * PAGE_SIZE;
        let mut out = Recorded { extents: Vec::with_capacity(r.extents.len()), bytes: 0, reads: r.reads };
        for (mut e, write) in r.extents {
            if write {
                if budget == 0 {
                    continue;
                }
                // A short last page counts as a whole one.
                e.len = e.len.min(budget);
                budget -= e.len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            }
            out.bytes += e.len;
            match out.extents.last_mut() {
                Some(x) if x.end() == e.offset => x.len += e.len,
                _ => out.extents.push(e),
            }
        }
        out
    }
}

/// What a profile saved after this boot holds, in order, with each
/// extent's age: the pages this boot read (age 0, first-touch order), then
/// the replayed profile's pages this boot did not read (in the profile's
/// order, one boot older; those older than [`KEEP_BOOTS`] and those of
/// chunks that changed are dropped), at most [`RECORD_CAP`] bytes.
pub fn learned(recorded: &Recorded, old: Option<&Replay>, image_len: u64, chunk_size: u64) -> Vec<(u32, Extent)> {
    let mut out: Vec<(u32, Extent)> = recorded.extents.iter().map(|e| (0, *e)).collect();
    let Some(old) = old else { return out };
    let pages = image_len.div_ceil(PAGE_SIZE);
    let mut read = vec![0u64; pages.div_ceil(64) as usize];
    for e in &recorded.extents {
        for p in e.offset / PAGE_SIZE..e.end().div_ceil(PAGE_SIZE).min(pages) {
            read[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    let mut total = recorded.bytes;
    for s in &old.index.segments {
        let age = s.age.saturating_add(1);
        if age > KEEP_BOOTS {
            continue;
        }
        for e in &s.extents {
            let end = e.end().min(image_len);
            let mut p = e.offset / PAGE_SIZE;
            while p * PAGE_SIZE < end {
                let start = p * PAGE_SIZE;
                let plen = PAGE_SIZE.min(end - start);
                let unread = read[(p / 64) as usize] & (1 << (p % 64)) == 0;
                if unread && old.usable(start / chunk_size) && total + plen <= RECORD_CAP {
                    total += plen;
                    match out.last_mut() {
                        Some((a, x)) if *a == age && x.end() == start => x.len += plen,
                        _ => out.push((age, Extent { offset: start, len: plen })),
                    }
                }
                p += 1;
            }
        }
    }
    out
}

/// One step of a learning profile's plan ([`delta_plan`]), in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Pages the old profile does not hold (or holds in a frame that cannot
    /// be kept): read from the cache and uploaded in the new pack.
    Fresh(Extent),
    /// Segment `.0` of the old profile, kept where it is with age `.1`.
    Reuse(usize, u32),
}

/// What a boot that strayed from its profile saves, as a delta: this
/// boot's pages in first-touch order, each old segment it read from kept
/// as it is (age 0) at the point the boot first read it, the pages no
/// kept segment holds as fresh extents; then the old segments the boot
/// did not read, a boot older, until they age out ([`KEEP_BOOTS`]). A
/// segment is kept only if every chunk it touches is unchanged
/// (`old.usable`), so a kept frame never carries stale bytes; only the
/// fresh pages go up again.
///
/// `unchanged(idx)` says whether chunk `idx` still has the digest the old
/// profile recorded, asked when the new profile is built: a chunk this
/// boot wrote and committed was usable when the boot began, but its old
/// frame now holds replaced bytes.
pub fn delta_plan(recorded: &Recorded, old: &Replay, chunk_size: u64, unchanged: &dyn Fn(u64) -> bool) -> Vec<Planned> {
    let segs = &old.index.segments;
    let keepable: Vec<bool> = segs
        .iter()
        .map(|s| {
            s.extents.iter().all(|e| {
                let mut ok = true;
                for_each_chunk_part(e.offset, e.len, chunk_size, |idx, _, _| ok &= old.usable(idx) && unchanged(idx));
                ok
            })
        })
        .collect();
    let mut page_seg: HashMap<u64, usize> = HashMap::new();
    for (i, s) in segs.iter().enumerate().filter(|(i, _)| keepable[*i]) {
        for e in &s.extents {
            for p in e.offset / PAGE_SIZE..e.end().div_ceil(PAGE_SIZE) {
                page_seg.entry(p).or_insert(i);
            }
        }
    }
    let mut out: Vec<Planned> = Vec::new();
    let mut taken = vec![false; segs.len()];
    for e in &recorded.extents {
        let mut p = e.offset / PAGE_SIZE;
        while p * PAGE_SIZE < e.end() {
            let start = p * PAGE_SIZE;
            let plen = PAGE_SIZE.min(e.end() - start);
            match page_seg.get(&p) {
                Some(&i) => {
                    if !taken[i] {
                        taken[i] = true;
                        out.push(Planned::Reuse(i, 0));
                    }
                }
                None => match out.last_mut() {
                    Some(Planned::Fresh(x)) if x.end() == start => x.len += plen,
                    _ => out.push(Planned::Fresh(Extent { offset: start, len: plen })),
                },
            }
            p += 1;
        }
    }
    for (i, s) in segs.iter().enumerate() {
        let age = s.age.saturating_add(1);
        if keepable[i] && !taken[i] && age <= KEEP_BOOTS {
            out.push(Planned::Reuse(i, age));
        }
    }
    out
}

/// Where a profile's pages are: for every chunk, the page ranges (offsets
/// inside the chunk) each segment holds.
pub struct Replay {
    pub key: String,
    pub index: ProfileIndex,
    cover: HashMap<u64, Vec<(u64, u64, usize)>>,
    /// Segments streamed (or found local) already: a segment fetched
    /// again later, or joined by a miss, counts once.
    done: Vec<std::sync::atomic::AtomicBool>,
}

impl Replay {
    /// Indexes `index` by chunk; `usable(idx)` says whether chunk `idx`'s
    /// pages may be taken from the profile (its content is unchanged since
    /// the profile was recorded).
    pub fn new(key: String, index: ProfileIndex, chunk_size: u64, usable: impl Fn(u64) -> bool) -> Self {
        let mut cover: HashMap<u64, Vec<(u64, u64, usize)>> = HashMap::new();
        for (seg, s) in index.segments.iter().enumerate() {
            for e in &s.extents {
                for_each_chunk_part(e.offset, e.len, chunk_size, |idx, off, len| {
                    if usable(idx) {
                        cover.entry(idx).or_default().push((off, off + len, seg));
                    }
                });
            }
        }
        for v in cover.values_mut() {
            v.sort_unstable();
        }
        let done = (0..index.segments.len()).map(|_| Default::default()).collect();
        Self { key, index, cover, done }
    }

    /// Marks segment `seg` done; true the first time only.
    pub fn mark_done(&self, seg: usize) -> bool {
        self.done.get(seg).is_some_and(|d| !d.swap(true, std::sync::atomic::Ordering::SeqCst))
    }

    /// Whether segment `seg` is streamed (or was found local) already.
    pub fn is_done(&self, seg: usize) -> bool {
        self.done.get(seg).is_some_and(|d| d.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The segments that together hold every byte of `[off, off + len)` of
    /// chunk `idx`, or None when the profile does not cover all of it.
    pub fn covering(&self, idx: u64, off: u64, len: u64) -> Option<Vec<usize>> {
        let ranges = self.cover.get(&idx)?;
        // Page-align: the profile holds whole pages.
        let mut pos = off / PAGE_SIZE * PAGE_SIZE;
        let end = off + len;
        let mut segs = Vec::new();
        // Ranges are sorted by start and never overlap (a page is recorded
        // once), so one pass finds the run that continues `pos`.
        for &(a, b, seg) in ranges {
            if pos >= end {
                break;
            }
            if b <= pos {
                continue;
            }
            if a > pos {
                return None;
            }
            if !segs.contains(&seg) {
                segs.push(seg);
            }
            pos = b;
        }
        (pos >= end).then_some(segs)
    }

    /// Bytes of `[offset, offset + len)` the profile holds (usable pages
    /// only: those of chunks changed before the replay began, or for which
    /// `unchanged` says no, do not count).
    pub fn covered_bytes(&self, offset: u64, len: u64, chunk_size: u64, unchanged: &dyn Fn(u64) -> bool) -> u64 {
        let mut n = 0;
        for_each_chunk_part(offset, len, chunk_size, |idx, off, l| {
            if !unchanged(idx) {
                return;
            }
            for &(a, b, _) in self.cover.get(&idx).map_or(&[][..], |v| &v[..]) {
                let (s, e) = (a.max(off), b.min(off + l));
                n += e.saturating_sub(s);
            }
        });
        n
    }

    /// True when chunk `idx` has pages in the profile that may be used.
    pub fn usable(&self, idx: u64) -> bool {
        self.cover.contains_key(&idx)
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.index.segments.len()
    }
}

/// Calls `f(chunk index, offset in chunk, length)` for each chunk-sized
/// piece of `[offset, offset + len)`.
pub fn for_each_chunk_part(offset: u64, len: u64, chunk_size: u64, mut f: impl FnMut(u64, u64, u64)) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let idx = pos / chunk_size;
        let cend = ((idx + 1) * chunk_size).min(end);
        f(idx, pos - idx * chunk_size, cend - pos);
        pos = cend;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touch_pages_in_order() {
        let r = Recorder::new(1 << 20, Duration::from_secs(60));
        r.observe(8192, 100); // page 2
        r.observe(8192 + 4096, 8192); // pages 3, 4: extends
        r.observe(0, 4096); // page 0: new extent
        r.observe(8192, 4096); // touched already
        r.observe(4096, 8192); // page 1 new (2 touched): extends the [0] extent
        let rec = r.finish();
        assert_eq!(rec.extents, vec![Extent { offset: 8192, len: 3 * 4096 }, Extent { offset: 0, len: 2 * 4096 }]);
        assert_eq!(rec.bytes, 5 * 4096);
        assert_eq!(rec.reads, 5);
        assert!(!r.active());
        r.observe(65536, 4096);
        assert!(r.finish().extents.is_empty());
    }

    /// Pages written before they are read join the recording in first-touch
    /// order, up to WRITE_SHARE of the pages read; later writes are left out.
    #[test]
    fn written_pages_join_up_to_their_share() {
        let r = Recorder::new(64 << 20, Duration::from_secs(60));
        r.observe_write(0, 4096); // before the first read: not the boot yet
        r.observe(1 << 20, 40 * 4096); // 40 pages read
        r.observe_write(8 << 20, 3 * 4096); // 3 pages written first: kept
        r.observe_write(1 << 20, 4096); // read already: nothing new
        r.observe(2 << 20, 4096); // page 41 read
        r.observe_write(9 << 20, 8 * 4096); // budget left: 4 - 3 = 1 page
        r.observe(9 << 20, 4096); // written already: no new page
        let rec = r.finish();
        assert_eq!(
            rec.extents,
            vec![
                Extent { offset: 1 << 20, len: 40 * 4096 },
                Extent { offset: 8 << 20, len: 3 * 4096 },
                Extent { offset: 2 << 20, len: 4096 },
                Extent { offset: 9 << 20, len: 4096 },
            ]
        );
        assert_eq!(rec.bytes, 45 * 4096);
        assert_eq!(rec.reads, 3);
    }

    /// A qcow2 file grows as the guest allocates clusters: pages written
    /// past its length at open are recorded like any written page (the next
    /// boot reads what this one appended there), while a read past the
    /// grown end still counts nothing.
    #[test]
    fn writes_past_the_open_length_are_recorded() {
        let r = Recorder::new(1 << 20, Duration::from_secs(60));
        r.observe(0, 40 * 4096);
        r.observe_write(1 << 20, 2 * 4096); // appended at the old end
        r.observe(1 << 20, 3 * 4096); // two written already, the third past the grown end
        r.observe(4 << 20, 4096); // past the grown end: nothing
        r.observe_write(3 << 20, 4096); // farther out, the table grows again
        let rec = r.finish();
        assert_eq!(
            rec.extents,
            vec![
                Extent { offset: 0, len: 40 * 4096 },
                Extent { offset: 1 << 20, len: 2 * 4096 },
                Extent { offset: 3 << 20, len: 4096 },
            ]
        );
        assert_eq!(rec.reads, 2, "reads past the end do not count");
    }

    #[test]
    fn window_and_image_end() {
        let r = Recorder::new(10_000, Duration::from_millis(30));
        assert!(!r.expired(), "the window starts with the first read");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!r.expired());
        r.observe(8192, 8192); // clamped to the image: a short last page
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.expired());
        let rec = r.finish();
        assert_eq!(rec.extents, vec![Extent { offset: 8192, len: 10_000 - 8192 }]);
    }

    #[test]
    fn remote_stalls_do_not_count() {
        let r = Recorder::new(1 << 20, Duration::from_millis(40));
        r.observe(0, 4096);
        r.stall_begin();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!r.expired(), "a stall must not use up the window");
        r.stall_end();
        r.observe(4096, 4096);
        assert!(r.active());
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.expired());
        assert_eq!(r.finish().extents, vec![Extent { offset: 0, len: 8192 }]);
        r.observe(8192, 4096);
        assert!(!r.active());
    }

    /// The saved profile is this boot's pages, then the old profile's
    /// unread ones one boot older; pages past KEEP_BOOTS or of changed
    /// chunks are gone.
    #[test]
    fn profiles_learn_and_forget() {
        use crate::volume::profile::Segment;
        let seg = |age, extents: Vec<Extent>| Segment {
            offset: 0,
            len: 1,
            raw_len: extents.iter().map(|e| e.len).sum(),
            sha256: String::new(),
            extents,
            age,
            pack: 0,
        };
        let p = |n: u64| n * PAGE_SIZE;
        let index = ProfileIndex {
            format: String::new(),
            version: 1,
            volume_id: String::new(),
            generation: 1,
            created_unix_ms: 0,
            page_size: 4096,
            chunk_size: p(16),
            image_len: p(64),
            pack: String::new(),
            packs: Vec::new(),
            chunk_refs: Default::default(),
            segments: vec![
                seg(0, vec![Extent { offset: p(0), len: p(4) }, Extent { offset: p(20), len: p(2) }]),
                seg(KEEP_BOOTS, vec![Extent { offset: p(8), len: p(1) }]),
                seg(1, vec![Extent { offset: p(40), len: p(2) }]),
            ],
        };
        // Chunk 2 (pages 32-47) changed since.
        let old = Replay::new("k".into(), index, p(16), |idx| idx != 2);
        let r = Recorder::new(p(64), Duration::from_secs(60));
        r.observe(p(30), p(1));
        r.observe(p(2), p(1)); // read again: not carried over as old
        let rec = r.finish();
        let got = learned(&rec, Some(&old), p(64), p(16));
        assert_eq!(
            got,
            vec![
                (0, Extent { offset: p(30), len: p(1) }),
                (0, Extent { offset: p(2), len: p(1) }),
                (1, Extent { offset: p(0), len: p(2) }),
                (1, Extent { offset: p(3), len: p(1) }),
                (1, Extent { offset: p(20), len: p(2) }),
            ]
        );
        assert_eq!(learned(&rec, None, p(64), p(16)).len(), 2);
    }

    #[test]
    fn covering_finds_segments_or_none() {
        use crate::volume::profile::Segment;
        let seg = |extents: Vec<Extent>| Segment {
            offset: 0,
            len: 1,
            raw_len: extents.iter().map(|e| e.len).sum(),
            sha256: String::new(),
            extents,
            age: 0,
            pack: 0,
        };
        let index = ProfileIndex {
            format: String::new(),
            version: 1,
            volume_id: String::new(),
            generation: 1,
            created_unix_ms: 0,
            page_size: 4096,
            chunk_size: 65536,
            image_len: 1 << 20,
            pack: String::new(),
            packs: Vec::new(),
            chunk_refs: Default::default(),
            segments: vec![
                seg(vec![Extent { offset: 65536 - 8192, len: 16384 }]),
                seg(vec![Extent { offset: 65536 + 8192, len: 4096 }]),
            ],
        };
        let r = Replay::new("k".into(), index, 65536, |idx| idx != 5);
        // Chunk 0's last two pages come from segment 0.
        assert_eq!(r.covering(0, 65536 - 8000, 100), Some(vec![0]));
        assert_eq!(r.covering(0, 0, 100), None);
        // Chunk 1: pages 0-1 (segment 0), page 2 (segment 1), page 3 missing.
        assert_eq!(r.covering(1, 0, 3 * 4096), Some(vec![0, 1]));
        assert_eq!(r.covering(1, 0, 3 * 4096 + 1), None);
        assert_eq!(r.covering(2, 0, 1), None);
        // Chunk 0's last 2 pages + chunk 1's first 3 are held; chunk 5 is
        // not usable.
        assert_eq!(r.covered_bytes(0, 2 * 65536, 65536, &|_| true), 5 * 4096);
        assert_eq!(r.covered_bytes(65536 - 4096, 8192, 65536, &|_| true), 8192);
        assert_eq!(r.covered_bytes(3 * 65536, 65536, 65536, &|_| true), 0);
    }
}
