//! What any cold-start design can reach on a boot trace: replays it against an ideal daemon
//! (no CPU time, a profile that is all local at once, misses that cost exactly one round trip
//! and no transfer time) to bound the wall time from below by round trips, and the link time
//! from below by the bytes those misses and the profile move.

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
