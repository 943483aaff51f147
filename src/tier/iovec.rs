//! Scatter-gather buffers over guest memory: the one place that touches raw
//! pointers, so every layer below the vhost layer moves data without bounce
//! copies and without `unsafe`.
//!
//! Segments are vm-memory `VolatileSlice`s and every copy in or out goes
//! through their volatile copy routines, as vm-memory intends for memory the
//! guest may touch concurrently: the compiler may not assume the bytes stay
//! put between two accesses, nor elide or merge them. Zero-copy I/O
//! (`preadv`/`pwritev` straight into guest memory) hands the kernel the
//! slices' addresses, which is what the kernel does for QEMU too.

use std::marker::PhantomData;

use smallvec::SmallVec;
use vm_memory::VolatileSlice;

/// Segments kept inline: a request's buffers are a few segments, so the
/// hot path builds and slices vectors without touching the heap.
const INLINE: usize = 4;

/// `iovec`s for one `preadv`/`pwritev`, inline up to [`INLINE`].
pub type IoVecs = SmallVec<[libc::iovec; INLINE]>;

/// Source of the zeroes `fill_zero` copies in, a page at a time.
static ZEROES: [u8; 4096] = [0u8; 4096];

/// A list of memory segments that together form one request's data buffer.
///
/// The lifetime ties the vector to the memory it points into. The vhost layer
/// builds `IoVec<'static>` over guest memory and keeps the guest-memory guard
/// alive until the request completes, which is what makes that sound.
#[derive(Clone, Debug, Default)]
pub struct IoVec<'a> {
    segs: SmallVec<[VolatileSlice<'a>; INLINE]>,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoVec is a set of (pointer, length) pairs into memory that stays
// mapped for its lifetime; moving it between threads is what out-of-order
// completion requires, and concurrent guest access is the guest's business
// (virtio gives the device exclusive use of a buffer until it is used; the
// volatile copies keep a guest that breaks that rule from being undefined
// behaviour on our side).
unsafe impl Send for IoVec<'_> {}
unsafe impl Sync for IoVec<'_> {}

impl<'a> IoVec<'a> {
    /// An empty vector.
    pub fn new() -> Self {
        Self { segs: SmallVec::new(), len: 0, _mem: PhantomData }
    }

    /// A vector over one mutable byte slice (tests, metadata, bounce edges).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let mut v = Self::new();
        v.push(VolatileSlice::from(buf));
        v
    }

    /// Appends a raw segment.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes for `'a`.
    pub unsafe fn push_raw(&mut self, ptr: *mut u8, len: usize) {
        // SAFETY: the caller vouches for the range and its lifetime.
        self.push(unsafe { VolatileSlice::new(ptr, len) });
    }

    /// Appends a slice of guest memory, outliving the borrow it came from.
    ///
    /// # Safety
    /// The memory behind `slice` must stay mapped for `'a` (the vhost layer
    /// keeps the guest-memory mapping alive until the request completes).
    pub unsafe fn push_guest(&mut self, slice: VolatileSlice<'_>) {
        // SAFETY: as the caller guarantees; the range came from vm-memory.
        self.push(unsafe { VolatileSlice::new(slice.ptr_guard_mut().as_ptr(), slice.len()) });
    }

    fn push(&mut self, s: VolatileSlice<'a>) {
        if s.is_empty() {
            return;
        }
        self.len += s.len();
        self.segs.push(s);
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the vector holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-range `[offset, offset + len)` of this vector, sharing memory.
    ///
    /// Panics if the range is out of bounds; callers split by lengths they
    /// computed from `len()`.
    pub fn slice(&self, offset: usize, len: usize) -> IoVec<'a> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "IoVec::slice out of range");
        let mut out = IoVec::new();
        self.for_each_range(offset, len, |s| out.push(s));
        out
    }

    /// Copies `src` into the vector starting at byte `offset` of the vector.
    pub fn copy_from_slice(&self, offset: usize, src: &[u8]) {
        let mut done = 0;
        self.for_each_range(offset, src.len(), |s| {
            let n = s.len();
            s.copy_from(&src[done..done + n]);
            done += n;
        });
    }

    /// Copies bytes from the vector starting at `offset` into `dst`.
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        let len = dst.len();
        self.for_each_range(offset, len, |s| {
            let n = s.len();
            s.copy_to(&mut dst[done..done + n]);
            done += n;
        });
    }

    /// Fills `[offset, offset + len)` of the vector with zeroes.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.for_each_range(offset, len, |s| {
            let mut at = 0;
            while at < s.len() {
                let n = (s.len() - at).min(ZEROES.len());
                sub(&s, at, n).copy_from(&ZEROES[..n]);
                at += n;
            }
        });
    }

    /// Copies the whole vector into a new Vec (for tests and small metadata).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    /// The segments as `libc::iovec`s for preadv/pwritev.
    pub fn as_iovecs(&self) -> IoVecs {
        self.segs
            .iter()
            .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
            .collect()
    }

    /// Calls `f` with the sub-slices covering `[offset, offset + len)`.
    fn for_each_range(&self, offset: usize, len: usize, mut f: impl FnMut(VolatileSlice<'a>)) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "IoVec range out of bounds");
        let mut skip = offset;
        let mut want = len;
        for s in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let take = (s.len() - skip).min(want);
            f(sub(s, skip, take));
            skip = 0;
            want -= take;
        }
    }
}

/// `[at, at + n)` of a segment; callers stay within it.
fn sub<'a>(s: &VolatileSlice<'a>, at: usize, n: usize) -> VolatileSlice<'a> {
    match s.subslice(at, n) {
        Ok(v) => v,
        // Unreachable: every caller derives `at + n <= s.len()` from the
        // lengths it walks. Kept as a panic, like slice()'s bounds check,
        // since silently moving fewer bytes would be a wrong-bytes bug.
        Err(e) => panic!("IoVec segment sub-range {at}+{n} of {}: {e}", s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_and_copy_span_segments() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut v = IoVec::new();
        unsafe {
            v.push_raw(a.as_mut_ptr(), a.len());
            v.push_raw(b.as_mut_ptr(), b.len());
        }
        v.copy_from_slice(1, &[1, 2, 3, 4]);
        assert_eq!(v.to_vec(), vec![0, 1, 2, 3, 4, 0, 0, 0]);
        let s = v.slice(2, 4);
        assert_eq!(s.len(), 4);
        assert_eq!(s.to_vec(), vec![2, 3, 4, 0]);
        s.fill_zero(1, 2);
        drop(v);
        drop(s);
        assert_eq!(a, [0, 1, 2]);
        assert_eq!(b, [0, 0, 0, 0, 0]);
    }

    #[test]
    fn long_fills_and_copies_cross_segments_and_zero_pages() {
        let mut a = vec![1u8; 5000];
        let mut b = vec![2u8; 9000];
        let mut v = IoVec::new();
        unsafe {
            v.push_raw(a.as_mut_ptr(), a.len());
            v.push_raw(b.as_mut_ptr(), b.len());
        }
        // Longer than the 4 KiB zero page, across the segment boundary.
        v.fill_zero(100, 13_000);
        let src: Vec<u8> = (0..14_000u32).map(|i| (i % 253) as u8).collect();
        v.copy_from_slice(0, &src[..50]);
        let got = v.to_vec();
        assert_eq!(&got[..50], &src[..50]);
        assert!(got[100..13_100].iter().all(|&x| x == 0));
        assert!(got[13_100..].iter().all(|&x| x == 2));
        v.copy_from_slice(0, &src);
        let mut back = vec![0u8; 14_000];
        v.copy_to_slice(0, &mut back);
        assert_eq!(back, src);
        assert_eq!(v.as_iovecs().iter().map(|i| i.iov_len).sum::<usize>(), 14_000);
        drop(v);
        assert_eq!(a[..], src[..5000]);
        assert_eq!(b[..], src[5000..]);
    }
}
