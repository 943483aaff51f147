//! What any cold-start design can reach on a boot trace: replays it against an ideal daemon
//! (no CPU time, a profile that is all local at once, misses that cost exactly one round trip
//! and no transfer time) to bound the wall time from below by round trips, and the link time
//! from below by the bytes those misses and the profile move; and against one whose link also
//! carries a stream (the image for a first boot, the profile for a profiled boot) beside the
//! misses, which is what a cold start with nothing local can at best do.

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
    /// Round trips the misses cost and the bytes they moved.
    pub fetches: u64,
    pub miss_bytes: u64,
    /// Bytes the stream moved before the boot ended.
    pub stream_bytes: u64,
}

/// Like [`ideal`], with the link carrying a stream beside the misses, as a real cold start
/// must: from the first read the stream moves its pages in turn at `rate` bytes/s, less what
/// the misses take, skipping pages misses brought, and a page it passed is local. For a first
/// boot it streams the image front to back; with `profiled`, the recorded boot's pages in the
/// order that boot first read them (its profile), which are then not local from the start. A
/// miss costs one round trip and then its bytes' time on the link ahead of the stream (misses
/// in turn among themselves): an ideal priority no real link gives; a page the stream brings
/// sooner than that is waited for instead. No CPU time.
pub fn streamed(p: &BootParams, profiled: bool, unit: u64, rtt_s: f64, rate: f64, qd: usize) -> Streamed {
    let trace = boot_trace(p);
    let order: Vec<u64> = if profiled {
        let mut seen = HashSet::new();
        boot_trace(&BootParams { differ: 0.0, ..*p }).iter().flat_map(pages).filter(|pg| seen.insert(*pg)).collect()
    } else {
        (0..p.span / PAGE).collect()
    };
    let at: HashMap<u64, usize> =
        if profiled { order.iter().enumerate().map(|(i, &pg)| (pg, i)).collect() } else { HashMap::new() };
    let pos = |pg: u64| if profiled { at.get(&pg).copied().unwrap_or(usize::MAX) } else { pg as usize };
    let mut lands: HashMap<u64, u64> = HashMap::new();
    let mut in_flight: BinaryHeap<Reverse<u64>> = BinaryHeap::new();
    let rtt = (rtt_s * 1e9) as u64;
    let xfer = (unit as f64 / rate * 1e9) as u64;
    let (mut now, mut miss_bytes, mut link_free) = (0u64, 0u64, 0u64);
    // The stream's next page (an index into `order`) and the bytes it moved.
    let (mut next, mut moved) = (0usize, 0u64);
    for r in &trace {
        if in_flight.len() >= qd.max(1) {
            let Reverse(t) = in_flight.pop().expect("queue is full");
            now = now.max(t);
        }
        let streamed = ((now as f64 / 1e9 * rate) as u64).saturating_sub(miss_bytes);
        while moved < streamed && next < order.len() {
            if !lands.contains_key(&(order[next] * PAGE / unit)) {
                moved += PAGE;
            }
            next += 1;
        }
        let mut done = now;
        for pg in pages(r) {
            let key = pg * PAGE / unit;
            // A page the stream brings sooner than a round trip would is waited for.
            let by_stream = pos(pg)
                .checked_sub(next)
                .map(|ahead| now.saturating_add((ahead as f64 * PAGE as f64 / rate * 1e9) as u64));
            let t = match lands.get(&key) {
                Some(&t) => t,
                None if pos(pg) < next => continue,
                None if by_stream.is_some_and(|t| t <= now + rtt + xfer) => by_stream.unwrap_or(now),
                None => {
                    miss_bytes += unit;
                    let start = (now + rtt).max(link_free);
                    link_free = start + xfer;
                    lands.insert(key, link_free);
                    link_free
                }
            };
            done = done.max(t);
        }
        in_flight.push(Reverse(done));
    }
    while let Some(Reverse(t)) = in_flight.pop() {
        now = now.max(t);
    }
    Streamed { unit, wall_s: now as f64 / 1e9, fetches: lands.len() as u64, miss_bytes, stream_bytes: moved }
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
        let first = streamed(&p, false, 64 << 10, 0.1, rate, 8);
        assert!(first.wall_s < alone.latency_s, "{} vs {}", first.wall_s, alone.latency_s);
        assert!(first.wall_s <= p.span as f64 / rate + 0.2, "{}", first.wall_s);
        assert!(first.stream_bytes + first.miss_bytes >= 40 << 20);
        let profiled = streamed(&params(0.1), true, 256 << 10, 0.1, rate, 8);
        let local = ideal(&params(0.1), true, 256 << 10, 0.1, 8);
        let profile_s = local.profile_bytes as f64 / rate;
        assert!(profiled.wall_s >= profile_s * 0.8, "{} vs {profile_s}", profiled.wall_s);
        assert!(profiled.wall_s > local.latency_s);
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
