//! A speculative transfer's turn on its direction's clock (nobody waits
//! for it: a profile's stream, read-ahead, hydration; a background upload
//! of the guest's changes or of a boot profile): its slot is taken a piece
//! at a time, each only once the clock is free within a moment of now. A
//! transfer someone waits for (a guest's miss, a writethrough FLUSH, a
//! sync) asked for meanwhile takes the clock next, and waits at most one
//! piece behind the speculative ones, not behind the megabytes they would
//! have reserved at once. Among themselves a process's speculative
//! transfers keep the order they were asked in: each starts once those
//! before it would have ended at the rate; deferred ones (a boot profile's
//! upload) take pieces only while no other is due to be going.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{note_paced_until, Clock, Pacer, Reservation, Turn};
use crate::remote::priority::Speculative;

/// Bytes a speculative transfer reserves at a time: 50 ms at 10 Mbit/s,
/// what an urgent transfer may wait behind one.
const PIECE: u64 = super::PIECE as u64;
/// A piece is reserved once the clock is free within this of now.
const HORIZON: Duration = Duration::from_millis(20);
/// Longest a transfer gives way, in all, while others keep the clock
/// busy: then its pieces take their turns like any, so speculative work
/// still moves beside a guest that keeps the link full, and the request's
/// deadline allows for a bounded wait.
const MOST_YIELD: Duration = Duration::from_secs(4);

/// The slot of one speculative transfer of `len` bytes.
pub(super) struct Pieces {
    pacer: Arc<Pacer>,
    rate: u64,
    len: u64,
    mark: Speculative,
    /// The process's speculative transfers in order (`Limiter`'s queue).
    queue: Arc<Pacer>,
    /// How long it may give way in all.
    budget: Duration,
    state: Mutex<State>,
    /// Its place among the process's speculative transfers, handed back
    /// when it ends early; none for deferred work.
    _queued: Option<Turn>,
}

struct State {
    /// Bytes before the current piece, and up to its end.
    base: u64,
    upto: u64,
    /// The current piece's slot, held until the next one is taken.
    clock: Clock,
    _held: Option<Reservation>,
    /// Time given way so far.
    yielded: Duration,
}

impl Pieces {
    /// A turn for a speculative transfer of `len` bytes at `rate` on
    /// `pacer`'s clock, once the process's speculative transfers asked for
    /// before it would have ended at the rate (their place in `queue`; at
    /// once when someone waits for it meanwhile), reserving nothing yet.
    pub(super) async fn turn(pacer: Arc<Pacer>, queue: &Arc<Pacer>, rate: u64, len: u64, mark: Speculative) -> Turn {
        let dur = Duration::from_secs_f64(len as f64 / rate as f64);
        // Deferred work takes no place: its pieces wait for the queue too.
        let queued = (!mark.is_deferred()).then(|| queue.reserve(len, rate));
        if let Some(queued) = &queued {
            // A request's deadline counts from the end of this wait too.
            note_paced_until(queued.clock.end());
            while mark.holds() && Instant::now() < queued.clock.start {
                tokio::time::sleep_until(queued.clock.start.min(Instant::now() + HORIZON)).await;
            }
        }
        // Deferred work may give way for as long as its bytes take again.
        let budget = if mark.is_deferred() { MOST_YIELD.max(dur) } else { MOST_YIELD };
        let now = Instant::now();
        let clock = Clock { start: now, dur: Duration::ZERO, len: 0 };
        let state = State { base: 0, upto: 0, clock, _held: None, yielded: Duration::ZERO };
        let queue = queue.clone();
        let pieces = Pieces { pacer, queue, rate, len, mark, budget, state: Mutex::new(state), _queued: queued };
        Turn { clock: Clock { start: now, dur, len }, _held: None, pieces: Some(Arc::new(pieces)) }
    }

    /// The time the body may take: its bytes at the rate, and the time it
    /// may give way.
    pub(super) fn allowance(&self) -> Duration {
        Duration::from_secs_f64(self.len as f64 / self.rate as f64) + self.budget
    }

    /// Waits until the bytes before `offset` are due, taking the pieces'
    /// slots as the transfer reaches them.
    pub(super) async fn until(&self, offset: u64) {
        loop {
            let (due, next) = {
                let st = self.state.lock();
                if offset <= st.upto || st.upto >= self.len {
                    (st.clock.due(offset.saturating_sub(st.base)), false)
                } else {
                    (st.clock.end(), true)
                }
            };
            tokio::time::sleep_until(due).await;
            if !next {
                return;
            }
            self.take_next().await;
        }
    }

    /// Takes the next piece's slot once the clock is free within
    /// [`HORIZON`] (at once when someone now waits for this transfer).
    async fn take_next(&self) {
        let (upto, yielded) = {
            let st = self.state.lock();
            (st.upto, st.yielded)
        };
        let bytes = PIECE.min(self.len - upto);
        let asked = Instant::now();
        let give_way_until = asked + self.budget.saturating_sub(yielded);
        let turn = loop {
            let now = Instant::now();
            if !self.mark.holds() || now >= give_way_until {
                break self.pacer.reserve(bytes, self.rate);
            }
            if self.mark.is_deferred() {
                if let Some(busy) = self.queue.free_at().filter(|b| *b > now) {
                    // Other speculative work is due: wait, looking at the mark.
                    tokio::time::sleep_until(busy.min(give_way_until).min(now + HORIZON)).await;
                    continue;
                }
            }
            match self.pacer.reserve_within(bytes, self.rate, Some(HORIZON)) {
                Ok(t) => break t,
                Err(free) => {
                    let at = free.checked_sub(HORIZON).unwrap_or(free).min(give_way_until);
                    tokio::time::sleep_until(at.max(Instant::now() + Duration::from_millis(1))).await;
                }
            }
        };
        note_paced_until(turn.clock.end());
        let mut st = self.state.lock();
        (st.base, st.upto, st.clock, st._held) = (upto, upto + bytes, turn.clock, turn._held);
        st.yielded += asked.elapsed();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{past_pacing, BwLimit, BwSchedule};
    use super::*;
    use crate::remote::priority;

    /// A guest's download asked for while a speculative one goes takes
    /// the clock next: it waits at most a piece, not the 4 s the
    /// speculative download would have reserved at once. The speculative
    /// one still ends when its bytes and the guest's have gone at the rate.
    #[tokio::test(start_paused = true)]
    async fn a_guests_download_goes_ahead_of_a_speculative_one() {
        let l = BwLimit::new(BwSchedule::fixed(None, Some(1 << 20)));
        let t0 = Instant::now();
        let bg = l.clone();
        let spec = tokio::spawn(priority::speculative(Speculative::new(|| false), async move {
            let turn = bg.download(4 << 20).await;
            assert!(turn.duration() >= Duration::from_secs(4));
            for off in (64 << 10..=4 << 20).step_by(64 << 10) {
                turn.until(off).await;
            }
            Instant::now()
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let asked = Instant::now();
        let turn = l.download(64 << 10).await;
        turn.until(64 << 10).await;
        let waited = asked.elapsed();
        assert!(waited <= Duration::from_millis(63 + 20 + 63), "the guest's 64 KiB waited {waited:?}");
        let spec_end = spec.await.unwrap() - t0;
        let all = Duration::from_secs_f64((4.0 * 1024.0 + 64.0) / 1024.0);
        assert!(spec_end >= all && spec_end < all + Duration::from_millis(100), "{spec_end:?}");
    }

    /// Given way for long enough, a speculative download takes its turns
    /// like any: 4 s in all, not per piece.
    #[tokio::test(start_paused = true)]
    async fn a_speculative_download_gives_way_for_a_bounded_time() {
        let l = BwLimit::new(BwSchedule::fixed(None, Some(1 << 20)));
        // A guest's 8 MiB ahead of it: 8 s of clock.
        let ahead = l.download(8 << 20).await;
        let t0 = Instant::now();
        let bg = l.clone();
        let spec = priority::speculative(Speculative::new(|| false), async move {
            let turn = bg.download(256 << 10).await;
            assert_eq!(turn.duration(), Duration::from_millis(4250));
            turn.until(256 << 10).await;
        });
        spec.await;
        let el = t0.elapsed();
        // Gave way 4 s, then queued its pieces behind the 8 s.
        assert!(el >= Duration::from_millis(8250) && el < Duration::from_millis(8300), "{el:?}");
        drop(ahead);
    }

    /// Uploads `n` bytes through `l` in a task of its own marked `mark`
    /// (none: someone waits for it); answers when its body had gone out,
    /// counted from `t0`.
    fn upload(l: &BwLimit, n: usize, mark: Option<Speculative>, t0: Instant) -> tokio::task::JoinHandle<Duration> {
        use futures::StreamExt;
        let l = l.clone();
        tokio::spawn(priority::with(mark, async move {
            let turn = l.upload(n as u64).await;
            let body = futures::stream::once(async move { Ok::<_, ()>(bytes::Bytes::from(vec![7u8; n])) });
            let sent: usize = turn.pace(body).map(|b| b.unwrap().len()).collect::<Vec<_>>().await.iter().sum();
            assert_eq!(sent, n);
            Instant::now() - t0
        }))
    }

    fn background() -> Option<Speculative> {
        Some(Speculative::new(|| false))
    }

    /// Uploads too: a writethrough FLUSH's upload asked for while a
    /// background upload's body goes out waits at most a piece of it, not
    /// the 4 s its 4 MiB would have reserved at once; the background body
    /// still leaves at the rate.
    #[tokio::test(start_paused = true)]
    async fn an_awaited_upload_goes_ahead_of_a_background_one() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let t0 = Instant::now();
        let spec = upload(&l, 4 << 20, background(), t0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waited = upload(&l, 64 << 10, None, t0).await.unwrap() - Duration::from_millis(500);
        assert!(waited <= Duration::from_millis(63 + 20 + 63), "the awaited 64 KiB waited {waited:?}");
        let spec_end = spec.await.unwrap();
        let all = Duration::from_secs_f64((4.0 * 1024.0 + 64.0) / 1024.0);
        assert!(spec_end >= all && spec_end < all + Duration::from_millis(100), "{spec_end:?}");
    }

    /// Speculative transfers asked for together go one after another, as
    /// transfers reserving their whole slots did: of two background packs
    /// the first lands at 1 s, not both at 2 s; one given up early hands
    /// back its place.
    #[tokio::test(start_paused = true)]
    async fn speculative_transfers_keep_their_order() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let t0 = Instant::now();
        let first = upload(&l, 1 << 20, background(), t0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let second = upload(&l, 1 << 20, background(), t0);
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        assert!(first < Duration::from_millis(1100), "the first pack landed at {first:?}");
        assert!(second >= Duration::from_millis(2000) && second < Duration::from_millis(2100), "{second:?}");
        // One given up at once leaves the next its place.
        let t1 = Instant::now();
        drop(priority::speculative(Speculative::new(|| false), l.upload(4 << 20)).await);
        let next = upload(&l, 64 << 10, background(), t1).await.unwrap();
        assert!(next < Duration::from_millis(100), "the next waited {next:?} for a transfer given up");
    }

    /// A speculative transfer's wait for those asked before it does not
    /// count against its request's deadline (four background packs at a
    /// slow limit: the last waits minutes for its place).
    #[tokio::test(start_paused = true)]
    async fn a_deadline_leaves_out_the_wait_for_earlier_speculative_transfers() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let mark = || Speculative::new(|| false);
        let ahead = priority::speculative(mark(), l.upload(4 << 20)).await;
        let paced = priority::speculative(
            mark(),
            past_pacing(Duration::from_millis(500), async {
                let t = l.upload(64 << 10).await;
                t.until(64 << 10).await;
            }),
        )
        .await;
        assert!(paced.is_some(), "a speculative transfer timed out waiting for its place");
        drop(ahead);
    }

    /// A deferred transfer (a boot profile's upload) waits for the other
    /// speculative ones too: a background pack asked for while a 4 MiB
    /// profile goes up lands after its own bytes, not after the profile's,
    /// and the profile still ends when all the bytes have gone at the rate.
    #[tokio::test(start_paused = true)]
    async fn a_deferred_upload_waits_for_the_other_speculative_ones() {
        let l = BwLimit::new(BwSchedule::fixed(Some(1 << 20), None));
        let t0 = Instant::now();
        let profile = upload(&l, 4 << 20, Some(Speculative::new(|| false).deferred()), t0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pack = upload(&l, 1 << 20, background(), t0).await.unwrap();
        assert!(pack < Duration::from_millis(1600), "the pack landed at {pack:?}, behind the profile");
        let profile = profile.await.unwrap();
        assert!(profile >= Duration::from_secs(5) && profile < Duration::from_millis(5100), "{profile:?}");
    }
}
