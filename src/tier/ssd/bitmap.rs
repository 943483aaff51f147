//! Page bitmaps of partial chunks: bit i of the words says page i of the
//! chunk is present.

use super::PAGE;

/// Page bitmap of one partial chunk: bit i of the words = page i present.
pub(super) type Bitmap = Box<[u64]>;

/// Words of a page bitmap of a chunk of `chunk_size` bytes.
pub(crate) fn bitmap_words(chunk_size: u64) -> usize {
    chunk_size.div_ceil(PAGE).div_ceil(64) as usize
}

/// Whether a page bitmap marks `page`.
pub(crate) fn bit(m: &[u64], page: u64) -> bool {
    m.get((page / 64) as usize).is_some_and(|w| (w >> (page % 64)) & 1 == 1)
}

/// Copies into `chunk` the pages of `under` that `present` (a page bitmap)
/// does not mark; past the end of `under` they become zeroes.
pub fn overlay_absent(chunk: &mut [u8], under: &[u8], present: &[u64]) {
    let page = PAGE as usize;
    for (p, dst) in chunk.chunks_mut(page).enumerate() {
        if !bit(present, p as u64) {
            let src = under.get(p * page..).unwrap_or(&[]);
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
            dst[n..].fill(0);
        }
    }
}

/// Pages a bitmap marks.
pub(super) fn popcount(m: &[u64]) -> u64 {
    m.iter().map(|w| u64::from(w.count_ones())).sum()
}
