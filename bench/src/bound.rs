//! What any cold-start design can reach on a boot trace: replays it against an ideal daemon
//! (no CPU time, a profile that is all local at once, misses that cost exactly one round trip
//! and no transfer time) to bound the wall time from below by round trips, and the link time
//! from below by the bytes those misses and the profile move; and against one whose link also
//! carries a stream (the image for a first boot, the profile for a profiled boot) beside the
//! misses, which is what a cold start with nothing local can at best do (or whose profile
//! crossed the link before the boot, as when `serve` starts ahead of the guest).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::workload::{boot_trace, BootParams, Req};

const PAGE: u64 = 4096;

/// One ideal replay: misses fetch aligned `unit`-byte pieces.
pub struct Bound {
    pub unit: u64,
    /// Round trips the misses cost.
    pub fetches: u64,
    /// Wall time if only the round trips of misses took time (the queue depth as the guest's).
    pub latency_s: f64,
    /// Bytes the profile (every page the recorded boot read) and the misses move.
    pub profile_bytes: u64,
    pub miss_bytes: u64,
}

fn pages(r: &Req) -> std::ops::Range<u64> {
    r.offset / PAGE..(r.offset + u64::from(r.len)).div_ceil(PAGE)
}

/// Replays `p`'s trace with queue depth `qd`; `profiled`: the seed's boot (`p` with `differ` 0)
/// was recorded and is local from the start; otherwise every page is a miss (a first boot).
pub fn ideal(p: &BootParams, profiled: bool, unit: u64, rtt_s: f64, qd: usize) -> Bound {
    let local: HashSet<u64> = if profiled {
        boot_trace(&BootParams { differ: 0.0, ..*p }).iter().flat_map(pages).collect()
    } else {
        HashSet::new()
    };
    let trace = boot_trace(p);
    // When each fetched unit lands, in ns since the start.
    let mut lands: HashMap<u64, u64> = HashMap::new();
    let mut in_flight: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
    let rtt = (rtt_s * 1e9) as u64;
    let mut now = 0u64;
    for r in &trace {
        if in_flight.len() >= qd.max(1) {
            let Reverse(t) = in_flight.pop().expect("queue is full");
            now = now.max(t);
        }
        let mut done = now;
        for pg in pages(r).filter(|pg| !local.contains(pg)) {
            done = done.max(*lands.entry(pg * PAGE / unit).or_insert(now + rtt));
        }
        in_flight.push(Reverse(done));
    }
    while let Some(Reverse(t)) = in_flight.pop() {
        now = now.max(t);
    }
    Bound {
        unit,
        fetches: lands.len() as u64,
        latency_s: now as f64 / 1e9,
        profile_bytes: local.len() as u64 * PAGE,
        miss_bytes: lands.len() as u64 * unit,
    }
}

/// One replay of [`streamed`].
pub struct Streamed {
    pub unit: u64,
    pub wall_s: f64,
    /// Requests the misses (and read-ahead) sent and the bytes they moved.
    pub fetches: u64,
    pub miss_bytes: u64,
    /// Of `miss_bytes`, what read-ahead moved.
    pub read_ahead_bytes: u64,
    /// Bytes the stream moved before the boot ended.
    pub stream_bytes: u64,
}

/// How the daemon of [`streamed`] behaves beyond fetching a `unit` piece per miss.
#[derive(Clone, Copy, Default)]
pub struct Policy {
    /// A miss on a page the stream has not reached moves the stream on from that page (the
    /// pages it skipped follow once it reaches the end).
    pub follow: bool,
    /// A read that continues one of the last eight reads, of pages no profile holds, has the
    /// pages after it that no profile holds fetched ahead, a window at a time: twice what that
    /// run has read, from `unit` up to this many bytes (0: no read-ahead).
    pub read_ahead: u64,
    /// The profile streamed before the boot began (`serve` started ahead of the guest): its
    /// pages are local from the start and the link carries only the misses.
    pub profile_local: bool,
}

/// Like [`ideal`], with the link carrying a stream beside the misses, as a real cold start
/// must: from the first read the stream moves its pages in turn at `rate` bytes/s, less what
/// the misses take, skipping pages misses brought, and a page it passed is local. For a first
/// boot it streams the image front to back; with `profiled`, the recorded boot's pages in the
/// order that boot first read them (its profile), which are then not local from the start. A
/// miss costs one round trip and then its bytes' time on the link ahead of the stream (misses
/// in turn among themselves): an ideal priority no real link gives; a page the stream brings
/// sooner than that is waited for instead. No CPU time.
pub fn streamed(
    p: &BootParams,
    profiled: bool,
    unit: u64,
    rtt_s: f64,
    rate: f64,
    qd: usize,
    policy: Policy,
) -> Streamed {
    let trace = boot_trace(p);
    let order: Vec<u64> = if profiled {
        let mut seen = HashSet::new();
        boot_trace(&BootParams { differ: 0.0, ..*p }).iter().flat_map(pages).filter(|pg| seen.insert(*pg)).collect()
    } else {
        (0..p.span / PAGE).collect()
    };
    let at: HashMap<u64, usize> =
        if profiled { order.iter().enumerate().map(|(i, &pg)| (pg, i)).collect() } else { HashMap::new() };
    let pos = |pg: u64| if profiled { at.get(&pg).copied() } else { Some(pg as usize) };
    // When each page a miss or read-ahead fetched lands, in ns since the start.
    let mut lands: HashMap<u64, u64> = HashMap::new();
    let mut in_flight: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
    let rtt = (rtt_s * 1e9) as u64;
    let mut link = Link { rate, rtt, link_free: 0, fetches: 0, bytes: 0 };
    let mut now = 0u64;
    // Which of `order` the stream has passed; its cursor, the lowest page it has not passed
    // (where it goes on once the cursor reaches the end), and the bytes it moved.
    let ahead = profiled && policy.profile_local;
    let mut passed = vec![ahead; order.len()];
    let (mut next, mut low, mut moved) = if ahead { (order.len(), order.len(), 0u64) } else { (0, 0, 0) };
    // Read-ahead: recent runs as (next byte, bytes read, fetched up to), oldest first.
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut read_ahead_bytes = 0u64;
    let unit_pages = unit / PAGE;
    for r in &trace {
        if in_flight.len() >= qd.max(1) {
            let Reverse(t) = in_flight.pop().expect("queue is full");
            now = now.max(t);
        }
        let streamed = ((now as f64 / 1e9 * rate) as u64).saturating_sub(link.bytes);
        while moved < streamed {
            if next >= order.len() {
                while low < order.len() && passed[low] {
                    low += 1;
                }
                if low >= order.len() {
                    break;
                }
                next = low;
            }
            if !passed[next] {
                passed[next] = true;
                if !lands.contains_key(&order[next]) {
                    moved += PAGE;
                }
            }
            next += 1;
        }
        let local = |pg: u64, lands: &HashMap<u64, u64>| {
            lands.get(&pg).copied().or_else(|| pos(pg).filter(|&i| passed[i]).map(|_| 0))
        };
        let (first, end) = (r.offset / PAGE, (r.offset + u64::from(r.len)).div_ceil(PAGE));
        let mut done = now;
        for pg in first..end {
            if let Some(t) = local(pg, &lands) {
                done = done.max(t);
                continue;
            }
            // A page the stream brings sooner than a round trip would is waited for.
            let xfer = (unit as f64 / rate * 1e9) as u64;
            let by_stream = pos(pg)
                .and_then(|i| i.checked_sub(next))
                .map(|ahead| now.saturating_add((ahead as f64 * PAGE as f64 / rate * 1e9) as u64));
            if let Some(t) = by_stream.filter(|&t| t <= now + rtt + xfer) {
                done = done.max(t);
                continue;
            }
            let a = pg / unit_pages * unit_pages;
            // The whole piece, as a store of `unit`-byte objects would send it, less what a
            // read-ahead already asked for.
            let want: Vec<u64> = (a..a + unit_pages).filter(|q| !lands.contains_key(q)).collect();
            done = done.max(link.fetch(now, &want, &mut lands));
            if policy.follow {
                if let Some(i) = pos(pg) {
                    next = i + 1;
                }
            }
        }
        if policy.read_ahead > 0 {
            let (off, e) = (r.offset, r.offset + u64::from(r.len));
            let run = match runs.iter().position(|run| run.0 == off) {
                Some(i) => {
                    let mut run = runs.remove(i);
                    run.0 = e;
                    run.1 += u64::from(r.len);
                    // A window at a time, sent once less than half of it is left ahead (fewer
                    // requests than topping it up on every read, at the same wall time).
                    let window = (run.1 * 2).clamp(unit.min(policy.read_ahead), policy.read_ahead);
                    let (from, to) = (run.2.max(e), e + window);
                    if run.2 < e + window / 2 && (first..end).all(|q| pos(q).is_none()) {
                        let want: Vec<u64> = (from / PAGE..to / PAGE)
                            .filter(|&q| pos(q).is_none() && local(q, &lands).is_none())
                            .collect();
                        let before = link.bytes;
                        link.fetch(now, &want, &mut lands);
                        read_ahead_bytes += link.bytes - before;
                        run.2 = to;
                    }
                    run
                }
                None => (e, u64::from(r.len), e),
            };
            if runs.len() >= 8 {
                runs.remove(0);
            }
            runs.push(run);
        }
        in_flight.push(Reverse(done));
    }
    while let Some(Reverse(t)) = in_flight.pop() {
        now = now.max(t);
    }
    Streamed {
        unit,
        wall_s: now as f64 / 1e9,
        fetches: link.fetches,
        miss_bytes: link.bytes,
        read_ahead_bytes,
        stream_bytes: moved,
    }
}

/// The misses' side of the link in [`streamed`]: a request costs a round trip, then its bytes
/// take the link in turn.
struct Link {
    rate: f64,
    rtt: u64,
    link_free: u64,
    fetches: u64,
    bytes: u64,
}

impl Link {
    /// Sends one request at `now` for `pages`; returns when it lands (`now` for none).
    fn fetch(&mut self, now: u64, pages: &[u64], lands: &mut HashMap<u64, u64>) -> u64 {
        if pages.is_empty() {
            return now;
        }
        let bytes = pages.len() as u64 * PAGE;
        self.fetches += 1;
        self.bytes += bytes;
        let start = (now + self.rtt).max(self.link_free);
        self.link_free = start + (bytes as f64 / self.rate * 1e9) as u64;
        for &pg in pages {
            lands.insert(pg, self.link_free);
        }
        self.link_free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(differ: f64) -> BootParams {
        BootParams { reads: 4_000, bytes: 40 << 20, span: 1 << 30, seed: 3, differ }
    }

    #[test]
    fn an_identical_boot_with_its_profile_waits_for_nothing() {
        let b = ideal(&params(0.0), true, 256 << 10, 0.1, 8);
        assert_eq!((b.fetches, b.miss_bytes), (0, 0));
        assert_eq!(b.latency_s, 0.0);
    }

    /// A first boot with the image streaming beside its misses ends sooner than by misses
    /// alone and no later than the whole span has crossed the link (plus the last round trip);
    /// a profiled boot waits for its profile to cross the link, which a local profile does not.
    #[test]
    fn a_stream_beside_the_misses() {
        let p = params(0.0);
        let rate = 25e6;
        let alone = ideal(&p, false, 64 << 10, 0.1, 8);
        let first = streamed(&p, false, 64 << 10, 0.1, rate, 8, Policy::default());
        assert!(first.wall_s < alone.latency_s, "{} vs {}", first.wall_s, alone.latency_s);
        assert!(first.wall_s <= p.span as f64 / rate + 0.2, "{}", first.wall_s);
        assert!(first.stream_bytes + first.miss_bytes >= 40 << 20);
        let profiled = streamed(&params(0.1), true, 256 << 10, 0.1, rate, 8, Policy::default());
        let local = ideal(&params(0.1), true, 256 << 10, 0.1, 8);
        let profile_s = local.profile_bytes as f64 / rate;
        assert!(profiled.wall_s >= profile_s * 0.8, "{} vs {profile_s}", profiled.wall_s);
        assert!(profiled.wall_s > local.latency_s);
    }

    /// Read-ahead fetches only pages no profile holds, beside what the misses fetch.
    #[test]
    fn read_ahead_of_unprofiled_runs() {
        let p = params(0.1);
        let plain = streamed(&p, true, 64 << 10, 0.1, 25e6, 8, Policy::default());
        let ahead = streamed(
            &p,
            true,
            64 << 10,
            0.1,
            25e6,
            8,
            Policy { follow: false, read_ahead: 1 << 20, ..Policy::default() },
        );
        assert_eq!(plain.read_ahead_bytes, 0);
        assert!(ahead.read_ahead_bytes > 0);
        assert!(ahead.miss_bytes > plain.miss_bytes && ahead.fetches > plain.fetches);
        // An identical boot has nothing unprofiled to read ahead.
        let same = streamed(
            &params(0.0),
            true,
            64 << 10,
            0.1,
            25e6,
            8,
            Policy { follow: true, read_ahead: 1 << 20, ..Policy::default() },
        );
        assert_eq!(same.read_ahead_bytes, 0);
    }

    /// With the profile local before the boot, an identical boot fetches nothing and a differing
    /// one fetches only what no profile holds, sooner than with the profile crossing the link.
    #[test]
    fn a_profile_local_before_the_boot() {
        let local = Policy { profile_local: true, ..Policy::default() };
        let same = streamed(&params(0.0), true, 256 << 10, 0.1, 25e6, 8, local);
        assert_eq!((same.fetches, same.stream_bytes, same.wall_s), (0, 0, 0.0));
        let p = params(0.1);
        let ahead = streamed(&p, true, 256 << 10, 0.1, 25e6, 8, local);
        let streaming = streamed(&p, true, 256 << 10, 0.1, 25e6, 8, Policy::default());
        assert_eq!(ahead.stream_bytes, 0);
        assert!(ahead.fetches > 0 && ahead.wall_s < streaming.wall_s, "{} vs {}", ahead.wall_s, streaming.wall_s);
        // Its round trips alone, with no transfer time, bound it from below.
        assert!(ahead.wall_s >= ideal(&p, true, 256 << 10, 0.1, 8).latency_s);
    }

    #[test]
    fn larger_pieces_cost_fewer_round_trips_and_more_bytes() {
        let small = ideal(&params(0.0), false, 64 << 10, 0.1, 8);
        let large = ideal(&params(0.0), false, 1 << 20, 0.1, 8);
        assert!(large.fetches < small.fetches && large.latency_s < small.latency_s);
        assert!(large.miss_bytes > small.miss_bytes);
        // Requests of at most 32 KiB touch at most two 64 KiB pieces: 8 in flight wait for
        // at most 16 round trips at once.
        assert!(small.latency_s >= small.fetches as f64 * 0.1 / 16.0 - 1e-9);
        let differ = ideal(&params(0.1), true, 64 << 10, 0.1, 8);
        assert!(differ.fetches > 0 && differ.fetches < small.fetches / 4);
    }
}
