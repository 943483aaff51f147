//! The SSD tier's chunk map: one slot per chunk (state, pin, recency,
//! write sequence), in segments that never move, so a lookup takes no lock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

#[derive(Default)]
pub(super) struct Slot {
    pub(super) state: AtomicU8,
    pub(super) pinned: AtomicBool,
    /// Set by every access; eviction (CLOCK) clears it once before
    /// evicting the chunk, so a chunk in use gets a second chance.
    pub(super) referenced: AtomicBool,
    /// Write sequence of the newest write to a dirty chunk: write-back
    /// marks a chunk clean only if no write came after the copy it uploaded.
    pub(super) seq: AtomicU64,
    /// The journal holds records carrying writes into this chunk (module
    /// doc): its bytes change only through more of them until the next
    /// checkpoint. Set and cleared under the journal lock.
    pub(super) logged: AtomicBool,
}

/// Slots per segment of [`Slots`].
const SEG: usize = 4096;

/// The chunk map: slots in segments that never move. Growing the map adds
/// segments and publishes a new list of them, so a lookup takes no lock
/// (one arc-swap load) and no update to a slot is lost to a copy.
pub(super) struct Slots {
    segs: ArcSwap<Vec<Arc<[Slot]>>>,
    len: AtomicUsize,
    grow: Mutex<()>,
}

/// All slots as of one moment, for scans.
pub(super) struct SlotsView {
    segs: Arc<Vec<Arc<[Slot]>>>,
    pub(super) len: usize,
}

impl SlotsView {
    pub(super) fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.segs.iter().flat_map(|s| s.iter()).take(self.len)
    }

    /// Slot `i` as of this view.
    pub(super) fn get(&self, i: usize) -> Option<&Slot> {
        (i < self.len).then(|| self.segs.get(i / SEG).map(|seg| &seg[i % SEG])).flatten()
    }
}

fn segment() -> Arc<[Slot]> {
    (0..SEG).map(|_| Slot::default()).collect()
}

impl Slots {
    pub(super) fn new(n: usize) -> Self {
        Self {
            segs: ArcSwap::from_pointee((0..n.div_ceil(SEG)).map(|_| segment()).collect()),
            len: AtomicUsize::new(n),
            grow: Mutex::new(()),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// `f` on slot `idx`; None past the end.
    pub(super) fn with<R>(&self, idx: u64, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let i = usize::try_from(idx).ok().filter(|&i| i < self.len())?;
        self.segs.load().get(i / SEG).map(|seg| f(&seg[i % SEG]))
    }

    /// Grows the map to at least `n` slots.
    pub(super) fn grow(&self, n: usize) {
        let _g = self.grow.lock();
        if n <= self.len() {
            return;
        }
        let cur = self.segs.load_full();
        if n.div_ceil(SEG) > cur.len() {
            let mut segs = (*cur).clone();
            segs.resize_with(n.div_ceil(SEG), segment);
            self.segs.store(Arc::new(segs));
        }
        // Segments first, then the length that lets lookups reach them.
        self.len.store(n, Ordering::Release);
    }

    pub(super) fn view(&self) -> SlotsView {
        let len = self.len();
        SlotsView { segs: self.segs.load_full(), len }
    }
}
