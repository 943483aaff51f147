//! Request streams: synthetic fio-like patterns, the "boot" read trace, and fixed request lists.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// SplitMix64: tiny, fast and fully determined by its seed, so a `--seed` reproduces the exact
/// offsets on every machine (no dependency on a rand crate's algorithm choices).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in 0..n (n > 0). The modulo bias is < n / 2^64: irrelevant for block counts.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The SplitMix64 output function; also used to derive verify patterns from (tag, offset).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl Rw {
    pub fn writes(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write | Rw::Randrw)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Req {
    pub write: bool,
    pub offset: u64,
    pub len: u32,
}

/// Where a queue thread takes its next request from.
pub enum Source {
    /// Endless fio-style pattern over `[base, base + len)`.
    ///
    /// With `stride` > 0, sequential patterns place request i in the i-th `stride`-sized slot of
    /// the range, at a random `bs`-aligned offset inside it (thinly scattered I/O).
    Synthetic { rw: Rw, rng: Rng, bs: u64, base: u64, len: u64, pos: u64, read_pct: u32, stride: u64 },
    /// A finite list shared by all queue threads; the atomic cursor keeps the global issue order
    /// close to the list order even when several queues pull from it.
    List { reqs: Arc<Vec<Req>>, next: Arc<AtomicUsize> },
}

impl Source {
    pub fn next(&mut self) -> Option<Req> {
        match self {
            Source::Synthetic { rw, rng, bs, base, len, pos, read_pct, stride } => {
                let blocks = *len / *bs;
                let (write, offset) = match rw {
                    Rw::Randread => (false, rng.below(blocks) * *bs),
                    Rw::Randwrite => (true, rng.below(blocks) * *bs),
                    Rw::Randrw => (rng.below(100) >= *read_pct as u64, rng.below(blocks) * *bs),
                    Rw::Read | Rw::Write if *stride > 0 => {
                        if *pos >= *len / *stride {
                            *pos = 0;
                        }
                        let o = *pos * *stride + rng.below(*stride / *bs) * *bs;
                        *pos += 1;
                        (*rw == Rw::Write, o)
                    }
                    Rw::Read | Rw::Write => {
                        if *pos + *bs > blocks * *bs {
                            *pos = 0;
                        }
                        let o = *pos;
                        *pos += *bs;
                        (*rw == Rw::Write, o)
                    }
                };
                Some(Req { write, offset: *base + offset, len: *bs as u32 })
            }
            Source::List { reqs, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed);
                reqs.get(i).copied()
            }
        }
    }
}

/// Parameters of the synthetic "Windows-10-boot-like" read trace.
#[derive(Clone, Copy)]
pub struct BootParams {
    pub reads: u64,
    pub bytes: u64,
    /// Files live in the first `span` bytes of the device.
    pub span: u64,
    pub seed: u64,
    /// A boot that differs from the seed's: this share of its files (0.0..=1.0) is replaced by
    /// other files (same sizes, elsewhere in the span), and as many are moved to another place
    /// in the read order. 0 is the seed's boot itself.
    pub differ: f64,
}

const KIB4: u64 = 4096;

/// Generates the boot trace: files scattered over the span, each read front to back in 4–32 KiB
/// requests, with a few files open at once (boot runs several processes that read in parallel).
///
/// Request sizes follow a geometric distribution capped over 1..=8 pages whose mean is solved so
/// that `reads` requests total about `bytes`; file lengths (in requests) are heavy-tailed like a
/// real system volume (many small DLLs/configs, a few large binaries).
pub fn boot_trace(p: &BootParams) -> Vec<Req> {
    let mut rng = Rng::new(p.seed ^ 0xb007_b007_b007_b007);
    let target_pages = (p.bytes as f64 / p.reads.max(1) as f64 / KIB4 as f64).clamp(1.0, 8.0);
    let q = solve_geometric(target_pages);
    let mut sizes = Vec::with_capacity(p.reads as usize);
    for _ in 0..p.reads {
        let mut k = 1;
        while k < 8 && rng.unit() >= q {
            k += 1;
        }
        sizes.push(k * KIB4);
    }

    // Chop the size sequence into files. Pareto(alpha 1.2) request counts, capped so one file
    // never dominates the trace; fixed seed so the file layout is part of the trace.
    let span_pages = (p.span / KIB4).max(1);
    let mut files: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut i = 0;
    while i < sizes.len() {
        let n = ((1.0 / (1.0 - rng.unit()).powf(1.0 / 1.2)) as usize).clamp(1, 400);
        let chunk: Vec<u64> = sizes[i..(i + n).min(sizes.len())].to_vec();
        i += chunk.len();
        let file_len: u64 = chunk.iter().sum();
        let max_start = span_pages.saturating_sub(file_len / KIB4).max(1);
        files.push((rng.below(max_start) * KIB4, chunk));
    }
    if p.differ > 0.0 {
        // Its own generator: the seed's files stay exactly where they were.
        let mut vr = Rng::new(p.seed ^ 0xd1ff_d1ff_d1ff_d1ff);
        let n = files.len() as u64;
        for f in files.iter_mut() {
            if vr.unit() < p.differ {
                let len: u64 = f.1.iter().sum();
                f.0 = vr.below(span_pages.saturating_sub(len / KIB4).max(1)) * KIB4;
            }
        }
        for _ in 0..(n as f64 * p.differ) as u64 {
            let (a, b) = (vr.below(n) as usize, vr.below(n) as usize);
            files.swap(a, b);
        }
    }

    // Interleave up to 4 open files: each step continues a random open file.
    let mut out = Vec::with_capacity(sizes.len());
    let mut open: Vec<(u64, std::vec::IntoIter<u64>)> = Vec::new();
    let mut pending = files.into_iter();
    loop {
        while open.len() < 4 {
            match pending.next() {
                Some((start, chunk)) => open.push((start, chunk.into_iter())),
                None => break,
            }
        }
        if open.is_empty() {
            break;
        }
        let f = rng.below(open.len() as u64) as usize;
        match open[f].1.next() {
            Some(len) => {
                // Only a file longer than the whole span (tiny test spans) can run past it.
                if open[f].0 + len <= span_pages * KIB4 {
                    out.push(Req { write: false, offset: open[f].0, len: len as u32 });
                }
                open[f].0 += len;
            }
            None => {
                open.swap_remove(f);
            }
        }
    }
    out
}

/// Mean of the sampled size in pages: geometric P(k) = q(1-q)^(k-1) for k < 8, with the whole
/// remaining tail (1-q)^7 landing on 8 (that is what the sampling loop in `boot_trace` does).
fn truncated_mean(q: f64) -> f64 {
    let (mut mean, mut w) = (0.0, 1.0);
    for k in 1..8 {
        mean += k as f64 * q * w;
        w *= 1.0 - q;
    }
    mean + 8.0 * w
}

/// Finds q such that `truncated_mean(q) == mean` (1..=8); the mean falls as q grows.
fn solve_geometric(mean: f64) -> f64 {
    let (mut lo, mut hi) = (0.0, 1.0);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if truncated_mean(mid) > mean {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_trace_matches_parameters() {
        let p = BootParams { reads: 60_000, bytes: 600 << 20, span: 6 << 30, seed: 7, differ: 0.0 };
        let t = boot_trace(&p);
        assert_eq!(t.len(), 60_000);
        let total: u64 = t.iter().map(|r| r.len as u64).sum();
        let ratio = total as f64 / p.bytes as f64;
        assert!((0.95..1.05).contains(&ratio), "total {total}");
        assert!(t.iter().all(|r| !r.write && r.offset + r.len as u64 <= p.span));
        assert!(t.iter().all(|r| r.len % 4096 == 0 && (4096..=32768).contains(&r.len)));
        // Deterministic from the seed.
        let again = boot_trace(&p);
        assert!(t.iter().zip(&again).all(|(a, b)| a.offset == b.offset && a.len == b.len));
    }

    /// The "10%-different boot" reads about 90% of what the seed's boot reads.
    #[test]
    fn a_differing_boot_shares_most_pages() {
        let p = BootParams { reads: 20_000, bytes: 200 << 20, span: 4 << 30, seed: 1, differ: 0.0 };
        let pages = |t: &[Req]| -> std::collections::HashSet<u64> {
            t.iter().flat_map(|r| r.offset / 4096..(r.offset + r.len as u64) / 4096).collect()
        };
        let a = pages(&boot_trace(&p));
        let b = pages(&boot_trace(&BootParams { differ: 0.1, ..p }));
        let shared = a.intersection(&b).count() as f64 / a.len() as f64;
        assert!((0.8..0.97).contains(&shared), "shared {shared}");
    }

    #[test]
    fn stride_places_one_request_per_slot() {
        let mut s = Source::Synthetic {
            rw: Rw::Write,
            rng: Rng::new(3),
            bs: 4096,
            base: 1 << 30,
            len: 8 << 20,
            pos: 0,
            read_pct: 0,
            stride: 1 << 20,
        };
        let reqs: Vec<Req> = (0..16).map(|_| s.next().unwrap()).collect();
        for (i, r) in reqs.iter().enumerate() {
            let slot = (i as u64 % 8) << 20;
            assert!(r.write && r.len == 4096 && r.offset % 4096 == 0);
            assert!(
                (1 << 30) + slot <= r.offset && r.offset + 4096 <= (1 << 30) + slot + (1 << 20),
                "{i}: {}",
                r.offset
            );
        }
        // Not all at the start of their slot.
        assert!(reqs.iter().any(|r| r.offset % (1 << 20) != 0));
    }
}
