//! Sequential-stream detection for readahead: remembers a few recent
//! streams and, once one has read enough back-to-back bytes, says which
//! chunks to fetch ahead of it (the window doubles as the stream goes on).
//!
//! Streams are tracked per thread: each virtqueue has its own thread and a
//! guest stream is submitted on one queue, so detection needs no lock and
//! shares no memory between queues; random reads cost a scan of eight
//! entries on the thread's own table.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

const STREAMS: usize = 8;
/// Back-to-back bytes before a stream counts as sequential.
const TRIGGER: u64 = 256 << 10;

#[derive(Clone, Copy, Default)]
struct Stream {
    next: u64,
    run: u64,
    /// Chunks up to here were already requested for this stream.
    issued_to: u64,
    last_use: u64,
}

/// One thread's streams: whose they are (a [`Readahead`]'s id), the
/// streams and their clock.
type Table = (u64, [Stream; STREAMS], u64);

thread_local! {
    static TABLE: RefCell<Table> = const { RefCell::new((0, [Stream { next: 0, run: 0, issued_to: 0, last_use: 0 }; STREAMS], 0)) };
}

/// Tracks streams; thread-safe.
pub struct Readahead {
    chunk_size: u64,
    max_chunks: u64,
    /// Tells this detector's streams apart in a thread's table (a thread
    /// serving another store starts over: readahead is only a hint).
    id: u64,
}

impl Readahead {
    /// `max_chunks` = 0 disables readahead.
    pub fn new(chunk_size: u64, max_chunks: u64) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self { chunk_size, max_chunks, id: NEXT.fetch_add(1, Ordering::Relaxed) }
    }

    /// Records a read of `[offset, offset+len)`; returns the chunk range to
    /// fetch ahead (empty when the read is not part of a sequential stream).
    pub fn observe(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if self.max_chunks == 0 || len == 0 {
            return 0..0;
        }
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            if t.0 != self.id {
                *t = (self.id, [Stream::default(); STREAMS], 0);
            }
            let (_, streams, clock) = &mut *t;
            self.observe_in(streams, clock, offset, len)
        })
    }

    fn observe_in(
        &self,
        streams: &mut [Stream; STREAMS],
        clock: &mut u64,
        offset: u64,
        len: u64,
    ) -> std::ops::Range<u64> {
        let end = offset + len;
        *clock += 1;
        let now = *clock;
        // The same read again (a non-blocking attempt retried on a worker)
        // is not a new stream.
        if streams.iter().any(|s| s.run > 0 && s.next == end) {
            return 0..0;
        }
        let i = match streams.iter().position(|s| s.run > 0 && s.next == offset) {
            Some(i) => {
                streams[i].run += len;
                i
            }
            None => {
                let i = (0..STREAMS).min_by_key(|&i| streams[i].last_use).unwrap_or(0);
                streams[i] = Stream { next: end, run: len, issued_to: 0, last_use: now };
                return 0..0;
            }
        };
        let s = &mut streams[i];
        s.next = end;
        s.last_use = now;
        if s.run < TRIGGER {
            return 0..0;
        }
        let window = (s.run / self.chunk_size).clamp(2, self.max_chunks);
        let cur = (end - 1) / self.chunk_size;
        let from = (cur + 1).max(s.issued_to);
        let to = cur + 1 + window;
        if from >= to {
            return 0..0;
        }
        s.issued_to = to;
        from..to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_reads_trigger_growing_window() {
        let r = Readahead::new(1 << 20, 8);
        let mut got = Vec::new();
        for i in 0..40u64 {
            got.push(r.observe((i * 128) << 10, 128 << 10));
        }
        assert!(got[0].is_empty());
        assert_eq!(got[1], 1..3); // 256 KiB in: fetch chunks 1 and 2
        assert!(got[2].is_empty(), "nothing re-issued");
        // Repeating the last read (a retry) neither triggers nor resets.
        assert!(r.observe((39 * 128) << 10, 128 << 10).is_empty());
        // 5 MiB in, the window is 5 chunks past the current one.
        assert_eq!(got.iter().map(|g| g.end).max(), Some(10));
        // Random reads never trigger.
        let r = Readahead::new(1 << 20, 8);
        for i in 0..20u64 {
            assert!(r.observe((i * 7919 % 97) << 20, 4096).is_empty());
        }
    }
}
