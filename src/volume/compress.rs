//! Chunks of an image file read on one thread, compressed and hashed on
//! every core, handed back in order: import runs at the speed of the slower
//! of the disk and zstd on every core, not of one core doing both in turn.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crossbeam_channel::{bounded, unbounded};

use super::digest;
use super::pack::ZSTD_LEVEL;
use super::{VolumeError, VolumeResult};

/// Chunks in the pipeline per compression thread: enough that a thread
/// never waits for the reader or the sink, little memory (a few MiB).
const PER_THREAD: usize = 4;

/// One non-zero chunk, compressed on its own.
pub struct Compressed {
    /// Its zstd frame, or its sub-frames concatenated.
    pub frame: Vec<u8>,
    /// The sub-frames, when compressed as such.
    pub entry: Option<super::subframe::Entry>,
    /// [Digest](super::digest) of the uncompressed bytes.
    pub digest: String,
}

/// A chunk on its way back: its buffer (returned to the reader's pool after
/// the sink) and its frame, or why reading or compressing failed.
type Done = (u64, io::Result<(Vec<u8>, Option<Compressed>)>);

/// Reads the first `len` bytes of `file` (the image at `image`) in chunks
/// of `cs` bytes and calls `sink(index, bytes, compressed)` for each in
/// order; `compressed` is `None` for an all-zero chunk. Reading, the
/// `threads` compression threads and the sink all run at once, and chunk
/// and frame buffers are reused, so the steady state allocates nothing
/// (fresh 1 MiB buffers cost a page fault per 4 KiB). With `sub`, chunks
/// are compressed as sub-frames of that many bytes.
#[allow(clippy::too_many_arguments)]
pub fn compress_file(
    image: &Path,
    file: &mut File,
    len: u64,
    cs: usize,
    threads: usize,
    sub: Option<u32>,
    mut sink: impl FnMut(u64, usize, Option<&Compressed>) -> VolumeResult<()>,
) -> VolumeResult<()> {
    let threads = threads.max(1);
    let in_flight = threads * PER_THREAD + 2;
    let chunks = len.div_ceil(cs as u64);
    std::thread::scope(|s| {
        // Chunk buffers: the reader takes one per chunk and the sink gives
        // it back, which also bounds how far the reader runs ahead.
        let (free_tx, free_rx) = bounded::<Vec<u8>>(in_flight);
        for _ in 0..in_flight {
            let _ = free_tx.send(Vec::with_capacity(cs));
        }
        let (frame_tx, frame_rx) = unbounded::<Vec<u8>>();
        let (work_tx, work_rx) = bounded::<(u64, Vec<u8>)>(in_flight);
        let (done_tx, done_rx) = bounded::<Done>(in_flight);
        {
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for idx in 0..chunks {
                    // The sink gone (it failed): stop reading.
                    let Ok(mut buf) = free_rx.recv() else { return };
                    buf.clear();
                    let n = (len - idx * cs as u64).min(cs as u64);
                    let r = match (&mut *file).take(n).read_to_end(&mut buf) {
                        Ok(m) if m as u64 == n => Ok(()),
                        Ok(_) => Err(io::ErrorKind::UnexpectedEof.into()),
                        Err(e) => Err(e),
                    };
                    let sent = match r {
                        Ok(()) => work_tx.send((idx, buf)).is_ok(),
                        Err(e) => {
                            let _ = done_tx.send((idx, Err(e)));
                            false
                        }
                    };
                    if !sent {
                        return;
                    }
                }
            });
        }
        for _ in 0..threads {
            let (work_rx, done_tx, frame_rx) = (work_rx.clone(), done_tx.clone(), frame_rx.clone());
            s.spawn(move || {
                let mut z = match zstd::bulk::Compressor::new(ZSTD_LEVEL) {
                    Ok(z) => z,
                    Err(e) => {
                        let _ = done_tx.send((u64::MAX, Err(e)));
                        return;
                    }
                };
                for (idx, buf) in work_rx.iter() {
                    let r =
                        compress_one(&mut z, &buf, sub, || frame_rx.try_recv().unwrap_or_default()).map(|c| (buf, c));
                    if done_tx.send((idx, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop((work_rx, done_tx, frame_rx));
        // Results arrive in any order; the sink takes them in order. At most
        // `in_flight` wait here, since each holds one of the pool's buffers.
        let mut waiting: BTreeMap<u64, io::Result<Packed>> = BTreeMap::new();
        let mut next = 0u64;
        for (idx, r) in done_rx.iter() {
            if idx == u64::MAX {
                r.map_err(|e| VolumeError::io("starting a compressor for", image, e))?;
                continue;
            }
            waiting.insert(idx, r);
            while let Some(r) = waiting.remove(&next) {
                let (buf, c) = r.map_err(|e| VolumeError::io("reading or compressing a chunk of", image, e))?;
                sink(next, buf.len(), c.as_ref())?;
                let _ = free_tx.send(buf);
                if let Some(c) = c {
                    let _ = frame_tx.send(c.frame);
                }
                next += 1;
            }
            if next == chunks {
                break;
            }
        }
        if next != chunks {
            return Err(VolumeError::io(
                "compressing",
                image,
                io::Error::other("a compression thread stopped before the end of the image"),
            ));
        }
        Ok(())
    })
}

/// A chunk's buffer (back to the pool after the sink) and its compressed
/// form (`None`: all zeroes).
type Packed = (Vec<u8>, Option<Compressed>);

/// Compresses one chunk into a buffer from `frame` (a recycled one when
/// there is one) and hashes it; `None` for an all-zero chunk.
fn compress_one(
    z: &mut zstd::bulk::Compressor<'_>,
    data: &[u8],
    sub: Option<u32>,
    frame: impl FnOnce() -> Vec<u8>,
) -> io::Result<Option<Compressed>> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let mut frame = frame();
    if let Some(sub) = sub {
        let entry = super::subframe::compress_with(z, data, sub, &mut frame)?;
        return Ok(Some(Compressed { frame, entry: Some(entry), digest: digest::of(data) }));
    }
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(data.len()));
    z.compress_to_buffer(data, &mut frame)?;
    Ok(Some(Compressed { frame, entry: None, digest: digest::of(data) }))
}

/// Threads for compression: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks come back in order, zero chunks as `None`, each frame
    /// decoding to its chunk, the short last chunk included.
    #[test]
    fn chunks_come_back_in_order_whatever_the_threads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let cs = 4096usize;
        let n = PER_THREAD * 7 + 5;
        let mut data = vec![0u8; cs * n + 1000];
        for (i, c) in data.chunks_mut(cs).enumerate() {
            if i % 3 != 1 {
                c.iter_mut().enumerate().for_each(|(j, b)| *b = (i * 7 + j % 13) as u8 | 1);
            }
        }
        std::fs::write(&p, &data).unwrap();
        for threads in [1, 2, 5] {
            let mut f = File::open(&p).unwrap();
            let mut seen = Vec::new();
            compress_file(&p, &mut f, data.len() as u64, cs, threads, None, |idx, len, c| {
                let want = &data[idx as usize * cs..idx as usize * cs + len];
                match c {
                    None => assert!(want.iter().all(|&b| b == 0), "chunk {idx}"),
                    Some(c) => {
                        assert_eq!(zstd::bulk::decompress(&c.frame, cs).unwrap(), want, "chunk {idx}");
                        assert_eq!(c.digest, digest::of(want));
                    }
                }
                seen.push(idx);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, (0..n as u64 + 1).collect::<Vec<_>>(), "threads {threads}");
        }
    }

    /// A short file and a failing sink both end the import with an error,
    /// and no thread is left waiting (the scope would hang).
    #[test]
    fn read_errors_and_sink_errors_stop_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let cs = 4096usize;
        std::fs::write(&p, vec![7u8; cs * 40]).unwrap();
        let mut f = File::open(&p).unwrap();
        let mut seen = 0u64;
        let e = compress_file(&p, &mut f, (cs * 100) as u64, cs, 2, None, |_, _, _| {
            seen += 1;
            Ok(())
        });
        assert!(e.is_err(), "an image shorter than its length must fail");
        assert_eq!(seen, 40, "every chunk before the short read reaches the sink");
        let mut f = File::open(&p).unwrap();
        let e = compress_file(&p, &mut f, (cs * 40) as u64, cs, 2, None, |idx, _, _| {
            if idx == 5 {
                return Err(VolumeError::InvalidOptions("sink full".into()));
            }
            Ok(())
        });
        assert!(matches!(e, Err(VolumeError::InvalidOptions(_))));
    }
}
