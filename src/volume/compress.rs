//! Chunks of an image file read on one thread and compressed and hashed on
//! all cores, handed back in order: import runs at the speed of the slower
//! of the disk and zstd on every core, not of one core doing both in turn.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use crossbeam_channel::bounded;

use super::pack::{sha256_hex, ZSTD_LEVEL};
use super::{VolumeError, VolumeResult};

/// Chunks read ahead and compressed together: enough to keep every core
/// busy between hand-offs, little memory (16 chunks, two batches in hand).
const BATCH: usize = 16;

/// One non-zero chunk, compressed on its own.
pub struct Compressed {
    /// Its zstd frame, or its sub-frames concatenated.
    pub frame: Vec<u8>,
    /// The sub-frames, when compressed as such.
    pub entry: Option<super::subframe::Entry>,
    /// Hex sha256 of the uncompressed bytes.
    pub sha256: String,
}

/// Reads the first `len` bytes of `file` (the image at `image`) in chunks
/// of `cs` bytes and calls `sink(index, bytes, compressed)` for each in
/// order; `compressed` is `None` for an all-zero chunk. Reading overlaps
/// compression, which runs on `threads` threads. With `sub`, chunks are
/// compressed as sub-frames of that many bytes.
pub fn compress_file(
    image: &Path,
    file: &mut File,
    len: u64,
    cs: usize,
    threads: usize,
    sub: Option<u32>,
    mut sink: impl FnMut(u64, usize, Option<Compressed>) -> VolumeResult<()>,
) -> VolumeResult<()> {
    let threads = threads.max(1);
    std::thread::scope(|s| {
        let (tx, rx) = bounded::<io::Result<Vec<Vec<u8>>>>(1);
        s.spawn(move || {
            let mut pos = 0u64;
            while pos < len {
                let mut batch = Vec::with_capacity(BATCH);
                while batch.len() < BATCH && pos < len {
                    let n = (len - pos).min(cs as u64);
                    let mut v = Vec::with_capacity(n as usize);
                    match (&mut *file).take(n).read_to_end(&mut v) {
                        Ok(m) if m as u64 == n => {}
                        Ok(_) => {
                            let _ = tx.send(Err(io::ErrorKind::UnexpectedEof.into()));
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    batch.push(v);
                    pos += n;
                }
                // The consumer gone (it failed): stop reading.
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
        });
        let mut idx = 0u64;
        for batch in rx.iter() {
            let batch = batch.map_err(|e| VolumeError::io("reading image", image, e))?;
            let out = compress_batch(&batch, threads, sub)
                .map_err(|e| VolumeError::io("compressing a chunk of", image, e))?;
            for (data, c) in batch.iter().zip(out) {
                sink(idx, data.len(), c)?;
                idx += 1;
            }
        }
        Ok(())
    })
}

/// Compresses `batch` split over `threads` threads, results in order.
fn compress_batch(batch: &[Vec<u8>], threads: usize, sub: Option<u32>) -> io::Result<Vec<Option<Compressed>>> {
    let per = batch.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = batch
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(|d| compress_one(d, sub)).collect::<io::Result<Vec<_>>>()))
            .collect();
        let mut out = Vec::with_capacity(batch.len());
        for p in parts {
            out.extend(p.join().map_err(|_| io::Error::other("a compression thread failed"))??);
        }
        Ok(out)
    })
}

fn compress_one(data: &[u8], sub: Option<u32>) -> io::Result<Option<Compressed>> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let (frame, entry) = match sub {
        Some(sub) => {
            let (f, e) = super::subframe::compress(data, sub, ZSTD_LEVEL)?;
            (f, Some(e))
        }
        None => (zstd::bulk::compress(data, ZSTD_LEVEL)?, None),
    };
    Ok(Some(Compressed { frame, entry, sha256: sha256_hex(data) }))
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
        let n = BATCH * 3 + 5;
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
                        assert_eq!(c.sha256, sha256_hex(want));
                    }
                }
                seen.push(idx);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, (0..n as u64 + 1).collect::<Vec<_>>(), "threads {threads}");
        }
    }
}
