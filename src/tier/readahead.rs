//! Sequential-stream detection for readahead: remembers a few recent
//! streams and, once one has read enough back-to-back bytes, says which
//! chunks to fetch ahead of it (the window doubles as the stream goes on).

use parking_lot::Mutex;

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

/// Tracks streams; thread-safe.
pub struct Readahead {
    chunk_size: u64,
    max_chunks: u64,
    streams: Mutex<([Stream; STREAMS], u64)>,
}

impl Readahead {
    /// `max_chunks` = 0 disables readahead.
    pub fn new(chunk_size: u64, max_chunks: u64) -> Self {
        Self { chunk_size, max_chunks, streams: Mutex::new(([Stream::default(); STREAMS], 0)) }
    }

    /// Records a read of `[offset, offset+len)`; returns the chunk range to
    /// fetch ahead (empty when the read is not part of a sequential stream).
    pub fn observe(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if self.max_chunks == 0 || len == 0 {
            return 0..0;
        }
        let end = offset + len;
        let mut g = self.streams.lock();
        let (streams, clock) = &mut *g;
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
