//! Clocks of turns that every process of a host reserves on (the uplink's
//! and the downlink's `--bwlimit`), kept in a [`HostRecord`]: each turn is
//! the next stretch of the clock, and a process that dies with turns still
//! ahead (kill -9, a crash) has them handed back by the next process to
//! reserve, so a killed daemon does not hold the link for the minutes its
//! queued uploads would have taken, nor delay the restarted daemon's
//! guest reads.

use std::io;
use std::path::Path;
use std::time::Duration;

use super::host_state::{alive, get_u64, monotonic_ns, put_u64, HostRecord};

/// Processes whose turns a clock keeps track of; more reserve all the
/// same, untracked (their turns are kept if they die).
const SLOTS: usize = 16;
/// A slot: pid (8 bytes, for alignment), end of its latest turn, and the
/// clock time its turns still held when last seen.
const SLOT: usize = 24;
/// A lane: where the clock is free from, then the slots.
const LANE: usize = 8 + SLOTS * SLOT;
/// Further ahead than any queue of turns gets (an 8 MiB Drive chunk at
/// the lowest limit, 16 KiB/s, is 9 minutes): a clock this far ahead is a
/// damaged record, and starts again from now instead of stopping every
/// transfer of the host for good.
const MAX_AHEAD: u64 = 6 * 3600 * 1_000_000_000;

/// A set of `lanes` clocks shared through one host record.
#[derive(Debug)]
pub struct HostClock {
    rec: HostRecord,
    pid: u64,
}

impl HostClock {
    /// Opens (creating it) the clocks at `path`.
    pub fn open(path: &Path, lanes: usize) -> io::Result<HostClock> {
        Ok(HostClock { rec: HostRecord::open(path, lanes * LANE)?, pid: std::process::id() as u64 })
    }

    /// Where the clocks live.
    pub fn path(&self) -> &Path {
        self.rec.path()
    }

    /// Reserves the next `dur` of lane `lane`: the host monotonic time (ns)
    /// the turn starts at.
    pub fn reserve(&self, lane: usize, dur: Duration) -> io::Result<u64> {
        self.reserve_within(lane, dur, None).map(|r| r.unwrap_or_else(|free| free))
    }

    /// [`reserve`](Self::reserve), but only if the turn would start within
    /// `within` of now: else nothing is reserved, and the error is when the
    /// lane is free (ns).
    pub fn reserve_within(&self, lane: usize, dur: Duration, within: Option<Duration>) -> io::Result<Result<u64, u64>> {
        let pid = self.pid;
        self.rec.update(|r| {
            let l = &mut r[lane * LANE..(lane + 1) * LANE];
            let now = monotonic_ns();
            if get_u64(l, 0) > now + MAX_AHEAD {
                l.fill(0);
            }
            reap_dead(l, pid, now);
            let dur = dur.as_nanos() as u64;
            let start = get_u64(l, 0).max(now);
            if within.is_some_and(|w| start > now + w.as_nanos() as u64) {
                return Err(start);
            }
            put_u64(l, 0, start + dur);
            if let Some(s) = own_slot(l, pid) {
                let (end, held) = (get_u64(l, s + 8), get_u64(l, s + 16));
                let held = held.min(end.saturating_sub(now));
                put_u64(l, s, pid);
                put_u64(l, s + 8, start + dur);
                put_u64(l, s + 16, held + dur);
            }
            Ok(start)
        })
    }

    /// Hands back `unused` of this process's turns on lane `lane` (a
    /// transfer given up before its turn ended).
    pub fn hand_back(&self, lane: usize, unused: Duration) -> io::Result<()> {
        let pid = self.pid;
        self.rec.update(|r| {
            let l = &mut r[lane * LANE..(lane + 1) * LANE];
            let now = monotonic_ns();
            let unused = unused.as_nanos() as u64;
            put_u64(l, 0, get_u64(l, 0).saturating_sub(unused).max(now));
            if let Some(s) = (0..SLOTS).map(|i| 8 + i * SLOT).find(|&s| get_u64(l, s) == pid) {
                put_u64(l, s + 16, get_u64(l, s + 16).saturating_sub(unused));
            }
        })
    }
}

/// This process's slot in a lane, taking a free one if it has none.
fn own_slot(l: &[u8], pid: u64) -> Option<usize> {
    let slots = || (0..SLOTS).map(|i| 8 + i * SLOT);
    slots().find(|&s| get_u64(l, s) == pid).or_else(|| slots().find(|&s| get_u64(l, s) == 0))
}

/// Gives back what dead processes' turns still held of the clock, and
/// frees their slots.
fn reap_dead(l: &mut [u8], me: u64, now: u64) {
    for s in (0..SLOTS).map(|i| 8 + i * SLOT) {
        let pid = get_u64(l, s);
        if pid == 0 || pid == me || alive(pid) {
            continue;
        }
        let held = get_u64(l, s + 16).min(get_u64(l, s + 8).saturating_sub(now));
        put_u64(l, 0, get_u64(l, 0).saturating_sub(held).max(now));
        l[s..s + SLOT].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_follow_one_another_across_handles() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) =
            (HostClock::open(&d.path().join("c"), 2).unwrap(), HostClock::open(&d.path().join("c"), 2).unwrap());
        let t0 = a.reserve(0, Duration::from_secs(10)).unwrap();
        let t1 = b.reserve(0, Duration::from_secs(1)).unwrap();
        assert_eq!(t1 - t0, 10_000_000_000);
        // The other lane is its own clock.
        assert!(b.reserve(1, Duration::from_secs(1)).unwrap() < t1);
        a.hand_back(0, Duration::from_secs(9)).unwrap();
        let t2 = b.reserve(0, Duration::from_secs(1)).unwrap();
        assert!(t2 - t0 < 3_000_000_000, "{}", t2 - t0);
    }

    /// Garbage in the record (a damaged file) costs no more than a turn.
    #[test]
    fn a_damaged_record_does_not_stop_the_link() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c");
        let c = HostClock::open(&path, 1).unwrap();
        c.reserve(0, Duration::from_millis(1)).unwrap();
        let mut raw = std::fs::read(&path).unwrap();
        raw[16..24].fill(0xee);
        std::fs::write(&path, raw).unwrap();
        let now = monotonic_ns();
        let t = c.reserve(0, Duration::from_millis(1)).unwrap();
        assert!(t < now + 1_000_000_000, "the next turn is {} s away", (t - now) / 1_000_000_000);
    }

    /// A process killed with a minute of turns ahead: the next to reserve
    /// starts at once.
    #[test]
    fn a_dead_processs_turns_are_handed_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c");
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let dead = HostClock { rec: HostRecord::open(&path, LANE).unwrap(), pid: child.id() as u64 };
        let t0 = dead.reserve(0, Duration::from_secs(60)).unwrap();
        let me = HostClock::open(&path, 1).unwrap();
        assert!(
            me.reserve(0, Duration::from_millis(1)).unwrap() >= t0 + 60_000_000_000,
            "a live process's turn was taken"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let t = me.reserve(0, Duration::from_millis(1)).unwrap();
        assert!(t < t0 + 2_000_000_000, "the dead process still held {} ms", (t - t0) / 1_000_000);
    }
}
