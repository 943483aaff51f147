//! `--verify`: data patterns that are a pure function of (run tag, device offset), plus a bitmap
//! of the blocks a run wrote.
//!
//! Because the content depends only on the offset, two in-flight writes to the same block (random
//! writes, several queues) carry identical bytes and the final content is known without tracking
//! write order. The tag mixes in a per-run nonce so data left by an earlier run cannot pass.

use crate::workload::mix;

/// Fills `buf` with the pattern for the device bytes starting at `offset` (8-byte aligned).
pub fn fill(buf: &mut [u8], offset: u64, tag: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(tag, offset + 8 * i as u64).to_le_bytes());
    }
}

/// Returns the device offset of the first byte in `buf` that differs from the expected pattern.
pub fn check(buf: &[u8], offset: u64, tag: u64) -> Option<u64> {
    for (i, w) in buf.chunks_exact(8).enumerate() {
        let pos = offset + 8 * i as u64;
        let want = word(tag, pos).to_le_bytes();
        if w != want {
            let byte = w.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Some(pos + byte as u64);
        }
    }
    None
}

fn word(tag: u64, pos: u64) -> u64 {
    mix(tag ^ pos.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// One bit per `bs`-sized block of the tested range.
#[derive(Clone)]
pub struct Bitmap {
    bits: Vec<u64>,
    bs: u64,
}

impl Bitmap {
    pub fn new(range: u64, bs: u64) -> Self {
        Bitmap { bits: vec![0; (range / bs).div_ceil(64) as usize], bs }
    }

    pub fn set(&mut self, offset: u64) {
        let b = offset / self.bs;
        self.bits[(b / 64) as usize] |= 1 << (b % 64);
    }

    pub fn merge(&mut self, other: &Bitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Offsets of all set blocks, ascending.
    pub fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(move |(i, &w)| {
            (0..64).filter(move |j| w & (1 << j) != 0).map(move |j| (i as u64 * 64 + j) * self.bs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_roundtrip_and_detects_corruption() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, 8192, 42);
        assert_eq!(check(&buf, 8192, 42), None);
        assert_eq!(check(&buf, 4096, 42), Some(4096)); // wrong place
        assert_eq!(check(&buf, 8192, 43), Some(8192)); // stale run
        buf[100] ^= 1;
        assert_eq!(check(&buf, 8192, 42), Some(8292));
    }

    #[test]
    fn bitmap_offsets() {
        let mut b = Bitmap::new(1 << 20, 4096);
        b.set(0);
        b.set(65 * 4096);
        let mut c = Bitmap::new(1 << 20, 4096);
        c.set(3 * 4096);
        b.merge(&c);
        assert_eq!(b.offsets().collect::<Vec<_>>(), vec![0, 3 * 4096, 65 * 4096]);
    }
}
