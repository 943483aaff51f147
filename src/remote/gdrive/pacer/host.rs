//! The host-wide half of Drive's pacer: one account's slot clock, adaptive
//! rate and waiting requests, kept in a [`HostRecord`] that every process
//! of this host using the account updates under its lock, so daemons and
//! one-shot commands on one account share one request budget. Each process
//! publishes what it has waiting (guest requests, speculative ones) in a
//! slot of its own stamped with a heartbeat; a slot not refreshed for
//! [`SLOT_TTL`] counts for nothing, so a process killed while it had
//! requests waiting holds no one back for longer than that.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{HOLD_AFTER_CUT, MIN_FACTOR, PROBE_PER_SEC, RECOVERY_PER_SEC, SLOW_START_PER_SEC, SPECULATIVE_EVERY};
use crate::remote::config::PacerConfig;
use crate::remote::host_state::{get_u64, monotonic_ns, put_u64, HostRecord};

/// The slot clock: the next slot's time (host ns) less the burst, as in a
/// GCRA token bucket.
const TAT: usize = 0;
/// Requests per second in force (f64 bits; 0: not set yet).
const RATE: usize = 8;
/// When the rate was last halved (0: never).
const LAST_CUT: usize = 16;
/// Refusals every process saw.
const REFUSALS: usize = 24;
/// When the record was last brought to now.
const AT: usize = 32;
/// Non-zero when, at the last update, requests waited for the clock (the
/// rate climbs for that time).
const SHORT: usize = 40;
/// Slots taken in a row by requests not speculative while a speculative
/// one waited somewhere.
const OTHERS_RUN: usize = 48;
/// Per-process slots: id, heartbeat, urgent, speculative, oldest
/// speculative's arrival (host ns).
const SLOTS_AT: usize = 64;
const SLOT_LEN: usize = 40;
const SLOTS: usize = 32;
const LEN: usize = SLOTS_AT + SLOTS * SLOT_LEN;

/// A process's slot not refreshed for this long is read as empty (the
/// process died, or has nothing waiting); waiting processes refresh theirs
/// at least every [`super::RECHECK`].
pub(super) const SLOT_TTL: Duration = Duration::from_secs(2);

/// Longest span of the record's time that counts as queueing for the
/// climb: waiting processes update it far more often than this, so a
/// longer gap is a record nobody watched.
const MAX_QUEUED: f64 = 0.5;

/// What one process has waiting for a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Waiting {
    /// Requests a guest (or something else) waits for.
    pub urgent: u64,
    /// Speculative requests.
    pub speculative: u64,
    /// When the oldest speculative one came (host ns; 0: none).
    pub oldest_speculative: u64,
}

/// What a caller first in its process's line is to do.
#[derive(Debug)]
pub(super) enum Turn {
    /// It took a slot.
    Took,
    /// Not yet: look again after this.
    Wait(Duration),
}

/// One account's host-wide bucket, as this process sees it.
#[derive(Debug)]
pub(super) struct HostBucket {
    rec: HostRecord,
    /// This pacer's slot id: pid and a count, never 0.
    id: u64,
    cfg: PacerConfig,
}

/// Slot views of a record.
#[derive(Clone, Copy)]
struct Slot {
    id: u64,
    beat: u64,
    urgent: u64,
    speculative: u64,
    oldest: u64,
}

fn slot(rec: &[u8], i: usize) -> Slot {
    let at = SLOTS_AT + i * SLOT_LEN;
    Slot {
        id: get_u64(rec, at),
        beat: get_u64(rec, at + 8),
        urgent: get_u64(rec, at + 16),
        speculative: get_u64(rec, at + 24),
        oldest: get_u64(rec, at + 32),
    }
}

fn put_slot(rec: &mut [u8], i: usize, s: Slot) {
    let at = SLOTS_AT + i * SLOT_LEN;
    for (k, v) in [s.id, s.beat, s.urgent, s.speculative, s.oldest].into_iter().enumerate() {
        put_u64(rec, at + 8 * k, v);
    }
}

fn live(s: &Slot, now: u64) -> bool {
    // A heartbeat from the future is a damaged record, not a live process.
    let ttl = SLOT_TTL.as_nanos() as u64;
    s.id != 0 && s.beat.saturating_add(ttl) >= now && s.beat <= now.saturating_add(ttl)
}

/// Further ahead than Drive's slot clock ever runs (a refusal sets it a
/// burst and a slot ahead, at the slowest rate seconds): a clock this far
/// ahead is a damaged record, and starts again from now instead of
/// stopping every request of the account for good.
const MAX_AHEAD: u64 = 600 * 1_000_000_000;

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl HostBucket {
    /// Opens (creating) the record at `path` for a pacer set to `cfg`.
    pub(super) fn open(path: &Path, cfg: PacerConfig) -> io::Result<HostBucket> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let rec = HostRecord::open(path, LEN)?;
        // Reading it once tells now whether the file can be written.
        rec.update(|_| ())?;
        let id = (u64::from(std::process::id()) << 24) | (NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff);
        Ok(HostBucket { rec, id, cfg })
    }

    /// Where the record lives.
    pub(super) fn path(&self) -> &Path {
        self.rec.path()
    }

    /// Brings the record to `now`: the rate won back (below the start) or
    /// grown (above it, for the time requests queued). Answers the rate.
    fn advance(&self, rec: &mut [u8], now: u64) -> f64 {
        let start = self.cfg.rate;
        let mut rate = f64::from_bits(get_u64(rec, RATE));
        if !rate.is_finite() || rate <= 0.0 {
            rate = start;
        }
        rate = rate.clamp(start * MIN_FACTOR, self.cfg.max_rate);
        let at = get_u64(rec, AT);
        let elapsed = if at == 0 { 0.0 } else { secs(now.saturating_sub(at)) };
        let last_cut = get_u64(rec, LAST_CUT);
        if rate < start {
            rate = (rate + elapsed * RECOVERY_PER_SEC * start).min(start);
        } else if get_u64(rec, SHORT) != 0
            && (last_cut == 0 || now.saturating_sub(last_cut) >= HOLD_AFTER_CUT.as_nanos() as u64)
        {
            let queued = elapsed.min(MAX_QUEUED);
            rate = if last_cut == 0 {
                rate * (1.0 + SLOW_START_PER_SEC).powf(queued)
            } else {
                rate + queued * PROBE_PER_SEC * start
            }
            .min(self.cfg.max_rate);
        }
        put_u64(rec, RATE, rate.to_bits());
        put_u64(rec, AT, now.max(at));
        rate
    }

    /// This pacer's slot (found, or a free or expired one taken); None
    /// when every slot is held by a live pacer.
    fn mine(&self, rec: &[u8], now: u64) -> Option<usize> {
        (0..SLOTS).find(|&i| slot(rec, i).id == self.id).or_else(|| (0..SLOTS).find(|&i| !live(&slot(rec, i), now)))
    }

    fn publish_in(&self, rec: &mut [u8], now: u64, w: Waiting) -> Option<usize> {
        let i = self.mine(rec, now)?;
        let s =
            Slot { id: self.id, beat: now, urgent: w.urgent, speculative: w.speculative, oldest: w.oldest_speculative };
        put_slot(rec, i, s);
        Some(i)
    }

    /// The slot interval and the burst's tolerance at `rate`, in ns.
    fn spacing(&self, rate: f64) -> (u64, u64) {
        let t = (1e9 / rate) as u64;
        (t, t * u64::from(self.cfg.burst.max(1) - 1))
    }

    /// The caller first in this process's line (speculative or not) asks
    /// for a slot; `before` is what this process has waiting, `after` what
    /// it will have once the caller took one. A speculative caller lets
    /// the guest requests waiting in any other process go first, unless
    /// [`SPECULATIVE_EVERY`] slots in a row went to others while
    /// speculative ones waited and its process holds the oldest of them;
    /// a caller not speculative lets that oldest one go then. Answers the
    /// turn and the rate in force.
    pub(super) fn try_take(&self, speculative: bool, before: Waiting, after: Waiting) -> io::Result<(Turn, f64)> {
        self.rec.update(|rec| {
            let now = monotonic_ns();
            let rate = self.advance(rec, now);
            let mine = self.publish_in(rec, now, before);
            let (mut others_urgent, mut any_speculative, mut waiting) = (false, false, 0u64);
            let mut favoured: Option<(u64, u64, usize)> = None;
            for i in 0..SLOTS {
                let s = slot(rec, i);
                if !live(&s, now) {
                    continue;
                }
                others_urgent |= Some(i) != mine && s.urgent > 0;
                any_speculative |= s.speculative > 0;
                waiting += s.urgent + s.speculative;
                if s.speculative > 0 && favoured.is_none_or(|f| (s.oldest, s.id) < (f.0, f.1)) {
                    favoured = Some((s.oldest, s.id, i));
                }
            }
            let aged = get_u64(rec, OTHERS_RUN) >= u64::from(SPECULATIVE_EVERY);
            let favoured = favoured.filter(|_| aged).map(|f| f.2);
            let allowed = if speculative {
                !others_urgent || (favoured.is_some() && favoured == mine)
            } else {
                favoured.is_none() || favoured == mine
            };
            let (t, tau) = self.spacing(rate);
            let tat = Some(get_u64(rec, TAT)).filter(|&tat| tat <= now.saturating_add(MAX_AHEAD)).unwrap_or(now);
            let due = tat.saturating_sub(tau);
            if allowed && now >= due {
                let next = tat.max(now) + t;
                put_u64(rec, TAT, next);
                let run = get_u64(rec, OTHERS_RUN);
                put_u64(rec, OTHERS_RUN, if speculative { 0 } else { run + u64::from(any_speculative) });
                self.publish_in(rec, now, after);
                let left = waiting.saturating_sub(1);
                put_u64(rec, SHORT, u64::from(left > 0 && next.saturating_sub(tau) > now));
                return (Turn::Took, rate);
            }
            put_u64(rec, SHORT, u64::from(waiting > 0 && now < due));
            let wait = Duration::from_nanos(due.saturating_sub(now)).max(Duration::from_millis(1));
            (Turn::Wait(wait), rate)
        })
    }

    /// Drive refused a request: the burst is spent for every process and
    /// the rate halves (once a second at most). Answers the rate.
    pub(super) fn throttled(&self) -> io::Result<f64> {
        self.rec.update(|rec| {
            let now = monotonic_ns();
            let mut rate = self.advance(rec, now);
            put_u64(rec, REFUSALS, get_u64(rec, REFUSALS) + 1);
            let last = get_u64(rec, LAST_CUT);
            if last == 0 || now.saturating_sub(last) >= 1_000_000_000 {
                rate = (rate / 2.0).max(self.cfg.rate * MIN_FACTOR);
                put_u64(rec, RATE, rate.to_bits());
                put_u64(rec, LAST_CUT, now);
            }
            let (t, tau) = self.spacing(rate);
            put_u64(rec, TAT, get_u64(rec, TAT).max(now + tau + t));
            rate
        })
    }

    /// Publishes what this process has waiting (after a caller gave up);
    /// answers the rate in force.
    pub(super) fn publish(&self, w: Waiting) -> io::Result<f64> {
        self.rec.update(|rec| {
            let now = monotonic_ns();
            let rate = self.advance(rec, now);
            self.publish_in(rec, now, w);
            rate
        })
    }

    /// The rate in force.
    pub(super) fn rate(&self) -> io::Result<f64> {
        self.rec.update(|rec| self.advance(rec, monotonic_ns()))
    }
}
