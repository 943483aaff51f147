//! Scatter-gather buffers over guest memory: the one place that touches raw
//! pointers, so every layer below the vhost layer moves data without bounce
//! copies and without `unsafe`.

use std::marker::PhantomData;

/// One contiguous run of memory a request reads into or writes from.
#[derive(Clone, Copy, Debug)]
struct Segment {
    ptr: *mut u8,
    len: usize,
}

/// A list of memory segments that together form one request's data buffer.
///
/// The lifetime ties the vector to the memory it points into. The vhost layer
/// builds `IoVec<'static>` over guest memory and keeps the guest-memory guard
/// alive until the request completes, which is what makes that sound.
#[derive(Clone, Debug, Default)]
pub struct IoVec<'a> {
    segs: Vec<Segment>,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoVec is a set of (pointer, length) pairs into memory that stays
// mapped for its lifetime; moving it between threads is what out-of-order
// completion requires, and concurrent guest access is the guest's business
// (virtio gives the device exclusive use of a buffer until it is used).
unsafe impl Send for IoVec<'_> {}
unsafe impl Sync for IoVec<'_> {}

impl<'a> IoVec<'a> {
    /// An empty vector.
    pub fn new() -> Self {
        Self { segs: Vec::new(), len: 0, _mem: PhantomData }
    }

    /// A vector over one mutable byte slice (tests, metadata, bounce edges).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let mut v = Self::new();
        // SAFETY: the slice is valid and borrowed mutably for 'a.
        unsafe { v.push_raw(buf.as_mut_ptr(), buf.len()) };
        v
    }

    /// Appends a raw segment.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes for `'a`.
    pub unsafe fn push_raw(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.segs.push(Segment { ptr, len });
        self.len += len;
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
        let mut skip = offset;
        let mut want = len;
        for s in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let take = (s.len - skip).min(want);
            // SAFETY: a sub-range of a segment that is valid for 'a.
            unsafe { out.push_raw(s.ptr.add(skip), take) };
            skip = 0;
            want -= take;
        }
        out
    }

    /// Copies `src` into the vector starting at byte `offset` of the vector.
    pub fn copy_from_slice(&self, offset: usize, src: &[u8]) {
        let mut done = 0;
        self.for_each_range(offset, src.len(), |ptr, n| {
            // SAFETY: ptr..ptr+n lies inside a valid segment; src has n bytes left.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, n) };
            done += n;
        });
    }

    /// Copies bytes from the vector starting at `offset` into `dst`.
    pub fn copy_to_slice(&self, offset: usize, dst: &mut [u8]) {
        let mut done = 0;
        let len = dst.len();
        self.for_each_range(offset, len, |ptr, n| {
            // SAFETY: as in copy_from_slice, in the other direction.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst.as_mut_ptr().add(done), n) };
            done += n;
        });
    }

    /// Fills `[offset, offset + len)` of the vector with zeroes.
    pub fn fill_zero(&self, offset: usize, len: usize) {
        self.for_each_range(offset, len, |ptr, n| {
            // SAFETY: ptr..ptr+n lies inside a valid segment.
            unsafe { std::ptr::write_bytes(ptr, 0, n) };
        });
    }

    /// Copies the whole vector into a new Vec (for tests and small metadata).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    /// The segments as `libc::iovec`s for preadv/pwritev.
    pub fn as_iovecs(&self) -> Vec<libc::iovec> {
        self.segs.iter().map(|s| libc::iovec { iov_base: s.ptr.cast(), iov_len: s.len }).collect()
    }

    fn for_each_range(&self, offset: usize, len: usize, mut f: impl FnMut(*mut u8, usize)) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len), "IoVec range out of bounds");
        let mut skip = offset;
        let mut want = len;
        for s in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let take = (s.len - skip).min(want);
            // SAFETY: skip < s.len so the pointer stays inside the segment.
            f(unsafe { s.ptr.add(skip) }, take);
            skip = 0;
            want -= take;
        }
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
}
