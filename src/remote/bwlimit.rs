//! Bandwidth limits (`--bwlimit`, like rclone's): one limiter per process,
//! shared by every transfer of every remote, that paces uploads and
//! downloads on the wire to a byte rate, optionally by time of day, so a
//! long sync leaves a home uplink to the rest of the house (a video call
//! stays usable). Each transfer reserves its slot on one shared clock per
//! direction (its bytes at the rate in force), waits for the slot to
//! start, then sends its body in 64 KiB pieces spread evenly across it.
//! The clocks are the host's ([`BwLimit::host_wide`]): every process
//! with a limit reserves on the same two clocks (`remote/host_state.rs`),
//! so three VMs' daemons and an `import` together keep to the uplink's
//! limit, not to three times it; where their limits differ, each pays
//! its bytes at its own, so the lowest in force holds for all.
//! downloads are consumed no faster, so TCP flow control holds the sender
//! back. The backends take turns here (`RemoteConfig`'s limiter): Drive
//! and object-store bodies, `dir:` writes, Drive's download streams; other
//! reads are paced after they arrived. A transfer nobody waits for (marked
//! speculative, `remote/priority.rs`) takes its slot a piece at a time,
//! only once the clock is nearly free (`bwlimit/speculative.rs`), so a
//! guest's miss goes next instead of behind megabytes of read-ahead, and a
//! writethrough FLUSH or a sync next instead of behind a background pack.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::host_clock::HostClock;
use super::host_state;

mod speculative;

/// Upload and download limits from one time of day on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwEntry {
    /// Minutes after local midnight the entry starts at.
    pub from_minute: u32,
    /// Bytes per second up; None = unlimited.
    pub up: Option<u64>,
    /// Bytes per second down; None = unlimited.
    pub down: Option<u64>,
}

/// A day's timetable of limits: the entry with the latest start at or
/// before the current local time applies (the last one wraps past
/// midnight). One entry starting at 0 is a plain limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BwSchedule {
    pub entries: Vec<BwEntry>,
}

impl BwSchedule {
    /// One limit all day (bytes/s; None = unlimited).
    pub fn fixed(up: Option<u64>, down: Option<u64>) -> Self {
        Self { entries: vec![BwEntry { from_minute: 0, up, down }] }
    }

    /// The entry in force at `minute` after local midnight.
    pub fn at(&self, minute: u32) -> Option<&BwEntry> {
        let mut sorted: Vec<&BwEntry> = self.entries.iter().collect();
        sorted.sort_by_key(|e| e.from_minute);
        sorted.iter().rev().find(|e| e.from_minute <= minute).or(sorted.last()).copied()
    }

    /// True when nothing is limited at any time.
    pub fn is_unlimited(&self) -> bool {
        self.entries.iter().all(|e| e.up.is_none() && e.down.is_none())
    }
}

/// Minutes after local midnight now.
fn local_minute() -> u32 {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r fills the struct we own; a zeroed tm is valid input.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return 0;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u32
}

/// The largest piece of a body sent (or consumed) at once: at 1 MB/s a
/// piece is 64 ms of the link, small enough that no half-second sees much
/// more than its share.
pub const PIECE: usize = 64 << 10;

/// `s` cut into pieces of at most [`PIECE`] bytes, each let out once
/// `before(len, end)` is done (`len`: the piece's bytes; `end`: the body's
/// bytes up to the piece's end), when the taker asks for it.
pub fn pieces<S, E, F, Fut>(s: S, before: F) -> futures::stream::BoxStream<'static, Result<Bytes, E>>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
    F: Fn(u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use futures::StreamExt;
    let before = Arc::new(before);
    futures::stream::unfold((Box::pin(s), Bytes::new(), 0u64), move |(mut s, mut rest, mut end)| {
        let before = before.clone();
        async move {
            while rest.is_empty() {
                match s.next().await? {
                    Ok(b) => rest = b,
                    Err(e) => return Some((Err(e), (s, rest, end))),
                }
            }
            let piece = rest.split_to(rest.len().min(PIECE));
            end += piece.len() as u64;
            before(piece.len() as u64, end).await;
            Some((Ok(piece), (s, rest, end)))
        }
    })
    .boxed()
}

/// The process's bandwidth limiter: a cheap handle, cloned into every
/// backend's configuration, all clones sharing one clock per direction.
/// The default limits nothing.
#[derive(Clone, Default)]
pub struct BwLimit(Option<Arc<Limiter>>);

struct Limiter {
    schedule: BwSchedule,
    up: Arc<Pacer>,
    down: Arc<Pacer>,
    /// This process's speculative transfers in the order they were asked
    /// for, per direction: each starts once those before it would have
    /// ended at the rate, so parallel background uploads still land one
    /// after another (a pack landed is a pack a restart need not send
    /// again) and a profile's stream arrives in its order, instead of all
    /// of them ending together at the end.
    up_queue: Arc<Pacer>,
    down_queue: Arc<Pacer>,
}

impl std::fmt::Debug for BwLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("BwLimit(off)"),
            Some(l) => f.debug_tuple("BwLimit").field(&l.schedule.entries).finish(),
        }
    }
}

/// Two handles are equal when they are the same limiter (configurations
/// that differ only in their limiter get their own clients).
impl PartialEq for BwLimit {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl BwLimit {
    /// A limiter for `schedule` (one that limits nothing is no limiter).
    pub fn new(schedule: BwSchedule) -> Self {
        if schedule.is_unlimited() {
            return Self::default();
        }
        Self(Some(Arc::new(Limiter {
            schedule,
            up: Arc::default(),
            down: Arc::default(),
            up_queue: Arc::default(),
            down_queue: Arc::default(),
        })))
    }

    /// A limiter for `schedule` whose clocks are the host's, kept in the
    /// record at `path` that every process given that path shares. A
    /// record that cannot be opened leaves this process its own clocks
    /// (with a warning): the limit then holds for this process alone.
    pub fn host_wide(schedule: BwSchedule, path: &std::path::Path) -> Self {
        if schedule.is_unlimited() {
            return Self::default();
        }
        let rec = match HostClock::open(path, 2) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::warn!(
                    "--bwlimit holds for this process alone: cannot open the host's clock {}: {e}",
                    path.display()
                );
                return Self::new(schedule);
            }
        };
        let pacer = |at| Arc::new(Pacer { free_at: Mutex::default(), host: Some((rec.clone(), at)) });
        Self(Some(Arc::new(Limiter {
            schedule,
            up: pacer(0),
            down: pacer(1),
            up_queue: Arc::default(),
            down_queue: Arc::default(),
        })))
    }

    /// Whether any limit is set at any time of day.
    pub fn is_limited(&self) -> bool {
        self.0.is_some()
    }

    /// Waits for an upload of `bytes` to get its turn (its slot on the
    /// shared upload clock starts) and answers it: the body then goes out
    /// through [`Turn::pace`].
    pub async fn upload(&self, bytes: u64) -> Turn {
        self.turn(bytes, true).await
    }

    /// Waits for a download of `bytes` to get its turn; the body is then
    /// consumed no faster than [`Turn::until`] allows.
    pub async fn download(&self, bytes: u64) -> Turn {
        self.turn(bytes, false).await
    }

    /// Paces `bytes` that already arrived (where a backend gets a body
    /// whole): returns when a download of them would have ended.
    pub async fn downloaded(&self, bytes: u64) {
        self.download(bytes).await.until(bytes).await;
    }

    /// An upload body of unknown shape paced piece by piece, each piece
    /// taking its own turn (`dir:` writes).
    pub fn pace_upload(&self, s: super::ByteStream) -> super::ByteStream {
        if !self.is_limited() {
            return s;
        }
        let limit = self.clone();
        pieces(s, move |n, _| {
            let limit = limit.clone();
            async move { limit.upload(n).await.until(n).await }
        })
    }

    async fn turn(&self, bytes: u64, up: bool) -> Turn {
        let Some(l) = &self.0 else { return Turn::free() };
        let e = l.schedule.at(local_minute());
        let rate = e.and_then(|e| if up { e.up } else { e.down }).filter(|r| *r > 0);
        let Some(rate) = rate else { return Turn::free() };
        let pacer = if up { &l.up } else { &l.down };
        if let Some(mark) = super::priority::current().filter(|m| m.holds()) {
            let queue = if up { &l.up_queue } else { &l.down_queue };
            let turn = speculative::Pieces::turn(pacer.clone(), queue, rate, bytes, mark).await;
            note_paced_until(turn.clock.end());
            return turn;
        }
        let turn = pacer.reserve(bytes, rate);
        note_paced_until(turn.clock.end());
        tokio::time::sleep_until(turn.clock.start).await;
        turn
    }
}

/// Paces one direction: each transfer reserves its share of the rate on a
/// shared clock, so many parallel requests together stay under it. The
/// clock is this process's, or a lane of the host's (`host_clock.rs`).
#[derive(Debug, Default)]
struct Pacer {
    free_at: Mutex<Option<Instant>>,
    host: Option<(Arc<HostClock>, usize)>,
}

impl Pacer {
    /// Reserves the next `bytes / rate` of the clock.
    fn reserve(self: &Arc<Self>, bytes: u64, rate: u64) -> Turn {
        // Without a bound nothing is refused.
        self.reserve_within(bytes, rate, None).unwrap_or_else(|_| Turn::free())
    }

    /// [`reserve`](Self::reserve), but only if the turn would start within
    /// `within` of now; else nothing is reserved, and the error is when the
    /// clock is free.
    fn reserve_within(self: &Arc<Self>, bytes: u64, rate: u64, within: Option<Duration>) -> Result<Turn, Instant> {
        let dur = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let start = match self.reserve_on_host(dur, within) {
            Some(r) => r?,
            None => {
                let mut free = self.free_at.lock();
                let now = Instant::now();
                let start = free.map_or(now, |f| f.max(now));
                if within.is_some_and(|w| start > now + w) {
                    return Err(start);
                }
                *free = Some(start + dur);
                start
            }
        };
        let held = Some(Reservation { pacer: self.clone(), start, dur });
        Ok(Turn { clock: Clock { start, dur, len: bytes }, _held: held, pieces: None })
    }

    /// [`reserve`](Self::reserve) on the host's clock; None when this
    /// pacer has none, or its record failed (this process then paces
    /// alone, and says so once).
    fn reserve_on_host(&self, dur: Duration, within: Option<Duration>) -> Option<Result<Instant, Instant>> {
        let (clock, lane) = self.host.as_ref()?;
        match clock.reserve_within(*lane, dur, within) {
            Ok(r) => Some(r.map(host_state::instant_at).map_err(host_state::instant_at)),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "--bwlimit holds for this process alone: the host's clock {} failed: {e}",
                        clock.path().display()
                    )
                });
                None
            }
        }
    }

    /// When this process's own clock is free (None: never reserved).
    fn free_at(&self) -> Option<Instant> {
        *self.free_at.lock()
    }

    /// Hands back `unused` of the clock (a transfer given up).
    fn hand_back(&self, unused: Duration) {
        let now = Instant::now();
        if let Some((clock, lane)) = &self.host {
            if clock.hand_back(*lane, unused).is_ok() {
                return;
            }
        }
        let mut free = self.free_at.lock();
        if let Some(f) = *free {
            *free = Some(f.checked_sub(unused).unwrap_or(now).max(now));
        }
    }
}

/// A share of the rate reserved by a transfer. A transfer given up before
/// its slot ended (its attempt's deadline, a failed request, a guest that
/// stopped waiting, a read shorter than asked) hands back the part not yet
/// due: kept, each retry of a timed-out upload would queue behind its own
/// earlier attempts, and the upload would never go.
struct Reservation {
    pacer: Arc<Pacer>,
    start: Instant,
    dur: Duration,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let now = Instant::now();
        let unused = self.dur.saturating_sub(now.saturating_duration_since(self.start));
        if unused.is_zero() {
            return;
        }
        self.pacer.hand_back(unused);
    }
}

/// A transfer's slot: `len` bytes spread evenly over `dur` from `start`.
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
    dur: Duration,
    len: u64,
}

impl Clock {
    fn end(&self) -> Instant {
        self.start + self.dur
    }

    /// When the bytes before `offset` are due out.
    fn due(&self, offset: u64) -> Instant {
        if self.len == 0 {
            return self.end();
        }
        self.start + self.dur.mul_f64(offset.min(self.len) as f64 / self.len as f64)
    }
}

/// A transfer's turn on the shared clock (held while the transfer goes;
/// dropped early, it hands back what it did not use). A free turn (no
/// limit in force) paces nothing.
pub struct Turn {
    clock: Clock,
    _held: Option<Reservation>,
    /// A speculative transfer's slot, taken a piece at a time (`clock` is
    /// then its whole length at the rate, from when it was asked for);
    /// shared with the body it paces.
    pieces: Option<Arc<speculative::Pieces>>,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn").field("dur", &self.duration()).field("len", &self.clock.len).finish()
    }
}

impl Turn {
    /// A turn that paces nothing.
    pub fn free() -> Self {
        Self { clock: Clock { start: Instant::now(), dur: Duration::ZERO, len: 0 }, _held: None, pieces: None }
    }

    /// Whether this turn paces (a limit is in force).
    pub fn is_paced(&self) -> bool {
        self._held.is_some() || self.pieces.is_some()
    }

    /// How long the body takes at the limit: a request's deadline adds it,
    /// so a paced request never times out because of our own pacing.
    pub fn duration(&self) -> Duration {
        if let Some(p) = &self.pieces {
            return p.allowance();
        }
        if self.is_paced() {
            self.clock.dur
        } else {
            Duration::ZERO
        }
    }

    /// Waits until the bytes before `offset` are due (a download consumes
    /// up to there, then waits before reading on).
    pub async fn until(&self, offset: u64) {
        if let Some(p) = &self.pieces {
            return p.until(offset).await;
        }
        if self.is_paced() {
            tokio::time::sleep_until(self.clock.due(offset)).await;
        }
    }

    /// `s` in pieces of at most [`PIECE`] bytes, each let out when the
    /// slot reaches its end: the body crosses the wire at the limit
    /// instead of at line speed. The stream does not hold the turn (a
    /// client may send it from another task); the caller keeps the turn
    /// until the request ends.
    pub fn pace<S, E>(&self, s: S) -> futures::stream::BoxStream<'static, Result<Bytes, E>>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Send + 'static,
    {
        use futures::StreamExt;
        if let Some(p) = &self.pieces {
            let p = p.clone();
            return pieces(s, move |_, end| {
                let p = p.clone();
                async move { p.until(end).await }
            });
        }
        if !self.is_paced() {
            return s.boxed();
        }
        let clock = self.clock;
        pieces(s, move |_, end| tokio::time::sleep_until(clock.due(end)))
    }
}

tokio::task_local! {
    /// The latest end of a slot a transfer in this task was given, for
    /// [`past_pacing`].
    static PACED_UNTIL: std::cell::Cell<Option<Instant>>;
}

fn note_paced_until(end: Instant) {
    let _ = PACED_UNTIL.try_with(|c| c.set(Some(c.get().map_or(end, |e| e.max(end)))));
}

/// Runs `fut` with a deadline of `limit`, counted from now or from the
/// end of the latest slot a transfer inside it was given, whichever is
/// later: a request whose turn comes late (other transfers hold the link)
/// or whose body is spread over minutes is not failed by its deadline for
/// that, and one that hangs still is. `None`: the deadline passed.
pub async fn past_pacing<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let watched = async move {
        tokio::pin!(fut);
        let mut deadline = Instant::now() + limit;
        loop {
            tokio::select! {
                r = &mut fut => return Some(r),
                _ = tokio::time::sleep_until(deadline) => {
                    match PACED_UNTIL.with(|c| c.get()).map(|e| e + limit) {
                        Some(later) if later > deadline => deadline = later,
                        _ => return None,
                    }
                }
            }
        }
    };
    // Inside another such deadline (the retry wrapper's around a backend's
    // own), both watch one record: a scope of its own would hide the turns
    // from the outer one.
    if PACED_UNTIL.try_with(|_| ()).is_ok() {
        watched.await
    } else {
        PACED_UNTIL.scope(std::cell::Cell::new(None), watched).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{DirRemote, PutBody, Remote};
    use futures::StreamExt;

    #[test]
    fn timetable_picks_the_entry_in_force() {
        let e = |m, up| BwEntry { from_minute: m, up, down: None };
        let s = BwSchedule { entries: vec![e(8 * 60, Some(1)), e(19 * 60, Some(2)), e(23 * 60, None)] };
        assert_eq!(s.at(9 * 60).unwrap().up, Some(1));
        assert_eq!(s.at(20 * 60).unwrap().up, Some(2));
        assert_eq!(s.at(23 * 60 + 30).unwrap().up, None);
        // Before the first entry, the last one of the previous day applies.
        assert_eq!(s.at(60).unwrap().up, None);
    }

    /// An upload given up while it waits for its turn or goes (its
    /// attempt timed out) does not hold the link for the retry that follows.
    #[tokio::test(start_paused = true)]
    async fn a_transfer_given_up_hands_back_its_share() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let t0 = Instant::now();
        let gave_up = tokio::time::timeout(Duration::from_millis(100), async {
            l.upload(1 << 20).await.until(1 << 20).await;
        })
        .await;
        assert!(gave_up.is_err());
        l.upload(512 << 10).await.until(512 << 10).await;
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(600) && el < Duration::from_millis(700), "{el:?}");
    }

    /// A body goes out in 64 KiB pieces evenly over its slot, never whole;
    /// a second transfer's slot follows the first's on the shared clock.
    #[tokio::test(start_paused = true)]
    async fn a_body_is_spread_over_its_slot_in_pieces() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let t0 = Instant::now();
        let first = l.upload(1 << 20).await;
        assert_eq!(first.duration(), Duration::from_secs(1));
        let mut s = first.pace(futures::stream::once(async { Ok::<_, ()>(Bytes::from(vec![0u8; 1 << 20])) }));
        let mut at = Vec::new();
        while let Some(p) = s.next().await {
            at.push((p.unwrap().len(), t0.elapsed()));
        }
        assert_eq!(at.len(), 16, "{at:?}");
        for (i, (n, t)) in at.iter().enumerate() {
            assert_eq!(*n, PIECE);
            let due = Duration::from_micros(62_500 * (i as u64 + 1));
            assert!(*t >= due && *t < due + Duration::from_millis(2), "piece {i} at {t:?}");
        }
        let second = l.upload(256 << 10).await;
        assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
        second.until(256 << 10).await;
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(1250) && el < Duration::from_millis(1260), "{el:?}");
        drop(first);
    }

    /// A deadline counts from the end of the slot the transfer inside it
    /// was given, and still fails a transfer that hangs.
    #[tokio::test(start_paused = true)]
    async fn deadlines_leave_out_our_own_pacing() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let ahead = l.upload(4 << 20).await;
        let paced = past_pacing(Duration::from_millis(500), async {
            let t = l.upload(1 << 20).await;
            t.until(1 << 20).await;
        })
        .await;
        assert!(paced.is_some(), "a paced transfer timed out on its own pacing");
        drop(ahead);
        let hung = past_pacing(Duration::from_millis(500), async {
            l.upload(1 << 10).await;
            std::future::pending::<()>().await
        })
        .await;
        assert!(hung.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn dir_uploads_are_paced_to_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let r = DirRemote::new(d.path()).with_bwlimit(l);
        let t0 = Instant::now();
        for i in 0..4 {
            r.put(&format!("p{i}"), PutBody::from_bytes(vec![0u8; 512 << 10])).await.unwrap();
        }
        // 2 MiB at 1 MiB/s.
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(2000) && el < Duration::from_millis(2100), "{el:?}");
        // Downloads are not limited by this schedule.
        let t0 = Instant::now();
        r.get("p0").await.unwrap();
        assert!(t0.elapsed() < Duration::from_millis(10));
    }
}
