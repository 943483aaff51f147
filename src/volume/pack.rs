//! Packs: many chunks concatenated, each its own zstd frame, so any one
//! chunk is a single ranged read and decodes alone. A pack has no header;
//! the manifest holds every frame's offset, length and hash.

use sha2::{Digest, Sha256};

/// zstd level for packs: fast enough to import at disk speed on one core,
/// and the remote link is the bottleneck anyway.
pub const ZSTD_LEVEL: i32 = 3;

/// Builds one pack in memory.
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    chunks: usize,
}

/// Where a chunk landed in a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedChunk {
    pub offset: u64,
    pub len: u64,
    /// Hex sha256 of the uncompressed data.
    pub sha256: String,
}

impl PackWriter {
    /// An empty pack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one chunk, compressed on its own.
    pub fn add(&mut self, data: &[u8]) -> std::io::Result<PackedChunk> {
        let frame = zstd::bulk::compress(data, ZSTD_LEVEL)?;
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(&frame);
        self.chunks += 1;
        Ok(PackedChunk { offset, len: frame.len() as u64, sha256: sha256_hex(data) })
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// The finished pack.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Decodes one frame and verifies it is exactly `expected_len` bytes whose
/// sha256 is `expected_sha256`. Errors say what was wrong; bad data is never
/// returned.
pub fn decode_chunk(frame: &[u8], expected_len: usize, expected_sha256: &str) -> Result<Vec<u8>, String> {
    // The capacity bound stops a corrupt frame from claiming a huge size.
    let data = zstd::bulk::decompress(frame, expected_len).map_err(|e| format!("zstd frame does not decode: {e}"))?;
    if data.len() != expected_len {
        return Err(format!("decoded to {} bytes, expected {expected_len}", data.len()));
    }
    let got = sha256_hex(&data);
    if got != expected_sha256 {
        return Err(format!("sha256 mismatch: expected {expected_sha256}, got {got}"));
    }
    Ok(data)
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
        let pack = w.finish();
        let fb = &pack[pb.offset as usize..(pb.offset + pb.len) as usize];
        assert_eq!(decode_chunk(fb, b.len(), &pb.sha256).unwrap(), b);
        let fa = &pack[pa.offset as usize..(pa.offset + pa.len) as usize];
        assert_eq!(decode_chunk(fa, a.len(), &pa.sha256).unwrap(), a);
        assert!(decode_chunk(fa, a.len(), &pb.sha256).unwrap_err().contains("sha256"));
        let mut bad = fb.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(decode_chunk(&bad, b.len(), &pb.sha256).is_err());
        assert!(decode_chunk(&fb[..fb.len() - 1], b.len(), &pb.sha256).is_err());
    }
}
