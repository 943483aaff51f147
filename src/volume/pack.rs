//! Packs: many chunks concatenated, each its own zstd frame (or, indexed,
//! its own run of sub-frames), so any one chunk is a single ranged read and
//! decodes alone. A pack has no header; the manifest holds every frame's
//! offset, length and hash, and an indexed pack ends with its sub-frame
//! index (`subframe.rs`).

use sha2::{Digest, Sha256};

/// zstd level for packs: fast enough to import at disk speed on one core,
/// and the remote link is the bottleneck anyway.
pub const ZSTD_LEVEL: i32 = 3;

/// Builds one pack in memory.
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    chunks: usize,
    /// Set when chunks are written as sub-frames (the index, so far).
    index: Option<super::subframe::PackIndex>,
}

/// Where a chunk landed in a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedChunk {
    pub offset: u64,
    pub len: u64,
    /// [Digest](super::digest) of the uncompressed data.
    pub digest: String,
}

impl PackWriter {
    /// An empty pack of single-frame chunks (the shape before sub-frames).
    pub fn new() -> Self {
        Self::default()
    }

    /// This pack built in `buf` (its contents dropped, its capacity kept),
    /// so filling it neither grows nor faults in fresh memory.
    pub fn in_buffer(mut self, mut buf: Vec<u8>) -> Self {
        buf.clear();
        self.buf = buf;
        self
    }

    /// An empty pack for chunks of `chunk_size` bytes: chunks larger than a
    /// sub-frame are written as sub-frames, with an index at the end.
    pub fn indexed(chunk_size: u64) -> Self {
        let sub = super::subframe::SUB_SIZE;
        Self { index: (chunk_size > u64::from(sub)).then(|| super::subframe::PackIndex::new(sub)), ..Self::default() }
    }

    /// Appends one chunk, compressed on its own (as sub-frames in an
    /// indexed pack).
    pub fn add(&mut self, data: &[u8]) -> std::io::Result<PackedChunk> {
        self.add_digested(data, super::digest::of(data))
    }

    /// [`add`](Self::add) for a chunk whose digest (by `digest::of`) the
    /// caller already has.
    pub fn add_digested(&mut self, data: &[u8], digest: String) -> std::io::Result<PackedChunk> {
        let offset = self.buf.len() as u64;
        let frame = match &mut self.index {
            Some(ix) => {
                let (frames, entry) = super::subframe::compress(data, ix.sub_size, ZSTD_LEVEL)?;
                ix.entries.insert(offset, entry);
                frames
            }
            None => zstd::bulk::compress(data, ZSTD_LEVEL)?,
        };
        self.buf.extend_from_slice(&frame);
        self.chunks += 1;
        Ok(PackedChunk { offset, len: frame.len() as u64, digest })
    }

    /// Appends raw bytes (a patch) as one frame; returns its place, without
    /// a digest: a patch is checked by its patched chunk's digest. Patches
    /// are read whole: never indexed.
    pub fn add_frame(&mut self, data: &[u8]) -> std::io::Result<PackedChunk> {
        let frame = zstd::bulk::compress(data, ZSTD_LEVEL)?;
        Ok(self.add_raw_frame(&frame))
    }

    /// Appends an already compressed frame (a patch copied by a repack) as
    /// it is.
    pub fn add_raw_frame(&mut self, frame: &[u8]) -> PackedChunk {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(frame);
        self.chunks += 1;
        PackedChunk { offset, len: frame.len() as u64, digest: String::new() }
    }

    /// Appends a chunk compressed elsewhere (`super::compress`): its frame
    /// (its sub-frames, with `entry` describing them, in an indexed pack)
    /// and the digest of its uncompressed bytes.
    pub fn add_compressed(
        &mut self,
        frame: &[u8],
        entry: Option<super::subframe::Entry>,
        digest: String,
    ) -> std::io::Result<PackedChunk> {
        let offset = self.buf.len() as u64;
        match (&mut self.index, entry) {
            (Some(ix), Some(e)) if e.frame_len() == frame.len() as u64 => {
                ix.entries.insert(offset, e);
            }
            (None, None) => {}
            _ => return Err(std::io::Error::other("chunk compressed for another pack shape")),
        }
        self.buf.extend_from_slice(frame);
        self.chunks += 1;
        Ok(PackedChunk { offset, len: frame.len() as u64, digest })
    }

    /// Uncompressed bytes per sub-frame when chunks go in as sub-frames.
    pub fn sub_size(&self) -> Option<u32> {
        self.index.as_ref().map(|ix| ix.sub_size)
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// The finished pack, and where its index lies in it (for the
    /// manifest) when it has one.
    pub fn finish(mut self) -> (Vec<u8>, Option<super::format::PackIndexRef>) {
        match self.index.take() {
            Some(ix) if !ix.entries.is_empty() => {
                let enc = ix.encode();
                let r = super::format::PackIndexRef {
                    offset: self.buf.len() as u64,
                    len: enc.len() as u64,
                    sha256: sha256_hex(&enc),
                };
                self.buf.extend_from_slice(&enc);
                (self.buf, Some(r))
            }
            _ => (self.buf, None),
        }
    }
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Decodes one frame and verifies it is exactly `expected_len` bytes whose
/// [digest](super::digest) is `expected`. Errors say what was wrong; bad
/// data is never returned.
pub fn decode_chunk(frame: &[u8], expected_len: usize, expected: &str) -> Result<Vec<u8>, String> {
    // The capacity bound stops a corrupt frame from claiming a huge size.
    let data = zstd::bulk::decompress(frame, expected_len).map_err(|e| format!("zstd frame does not decode: {e}"))?;
    if data.len() != expected_len {
        return Err(format!("decoded to {} bytes, expected {expected_len}", data.len()));
    }
    check_digest(&data, expected)?;
    Ok(data)
}

/// Checks that `data` has digest `expected`; the error says what it has.
pub fn check_digest(data: &[u8], expected: &str) -> Result<(), String> {
    if super::digest::matches(data, expected) {
        return Ok(());
    }
    let got = super::digest::of_like(data, expected);
    Err(format!("digest mismatch: expected {expected}, got {got}"))
}

/// Decodes a stored chunk frame of at most `max_len` bytes whose digest is
/// `expected`. A chunk stored while it was the image's last, short
/// chunk decodes shorter than the chunk is now (the image grew since; the
/// rest reads as zeroes): the caller pads or cuts to the length it needs.
pub fn decode_chunk_upto(frame: &[u8], max_len: usize, expected: &str) -> Result<Vec<u8>, String> {
    let data = zstd::bulk::decompress(frame, max_len).map_err(|e| format!("zstd frame does not decode: {e}"))?;
    check_digest(&data, expected)?;
    Ok(data)
}

/// Bytes of a patch's frame: its runs' pages, the chunk's last page cut at
/// `chunk_len` (the image's last chunk may be short).
pub fn patch_len(runs: &[[u32; 2]], page: u64, chunk_len: usize) -> usize {
    runs.iter()
        .map(|[first, count]| {
            let start = u64::from(*first) * page;
            let end = ((u64::from(*first) + u64::from(*count)) * page).min(chunk_len as u64);
            end.saturating_sub(start) as usize
        })
        .sum()
}

/// Applies a decoded patch (`runs`' pages, in order) onto `chunk`.
pub fn apply_patch(chunk: &mut [u8], runs: &[[u32; 2]], page: u64, patch: &[u8]) -> Result<(), String> {
    if patch.len() != patch_len(runs, page, chunk.len()) {
        return Err(format!("patch holds {} bytes, its runs need {}", patch.len(), patch_len(runs, page, chunk.len())));
    }
    let mut pos = 0;
    for [first, count] in runs {
        let start = (u64::from(*first) * page) as usize;
        let end = (((u64::from(*first) + u64::from(*count)) * page) as usize).min(chunk.len());
        if start >= end {
            continue;
        }
        chunk[start..end].copy_from_slice(&patch[pos..pos + end - start]);
        pos += end - start;
    }
    Ok(())
}

/// The patch bytes of `runs` taken from `chunk`.
pub fn extract_patch(chunk: &[u8], runs: &[[u32; 2]], page: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(patch_len(runs, page, chunk.len()));
    for [first, count] in runs {
        let start = (u64::from(*first) * page) as usize;
        let end = (((u64::from(*first) + u64::from(*count)) * page) as usize).min(chunk.len());
        if start < end {
            out.extend_from_slice(&chunk[start..end]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_alone_and_corruption_is_caught() {
        let mut w = PackWriter::new();
        let a = vec![1u8; 5000];
        let b: Vec<u8> = (0..7000u32).map(|i| (i * 31 % 251) as u8).collect();
        let pa = w.add(&a).unwrap();
        let pb = w.add(&b).unwrap();
        let (pack, _) = w.finish();
        let fb = &pack[pb.offset as usize..(pb.offset + pb.len) as usize];
        assert_eq!(decode_chunk(fb, b.len(), &pb.digest).unwrap(), b);
        let fa = &pack[pa.offset as usize..(pa.offset + pa.len) as usize];
        assert_eq!(decode_chunk(fa, a.len(), &pa.digest).unwrap(), a);
        assert!(decode_chunk(fa, a.len(), &pb.digest).unwrap_err().contains("digest mismatch"));
        let mut bad = fb.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(decode_chunk(&bad, b.len(), &pb.digest).is_err());
        assert!(decode_chunk(&fb[..fb.len() - 1], b.len(), &pb.digest).is_err());
    }
}
