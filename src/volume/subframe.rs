//! Sub-frames: a chunk stored as independent zstd frames of a fixed
//! uncompressed size, and the pack index (a zstd skippable frame at the end
//! of the pack) listing each one's compressed length and hash, so a miss
//! fetches, decodes and verifies only the part of a chunk it needs. Index
//! version 2 holds BLAKE3 hashes; version 1 (SHA-256) is still read.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// Uncompressed bytes per sub-frame: the default qcow2 cluster, so a
/// guest's cluster-sized miss is one sub-frame.
pub const SUB_SIZE: u32 = 64 << 10;
/// Bytes of hash kept per sub-frame. The index itself is hashed in full
/// by the manifest, so these only have to resist a second preimage of a
/// writer's sub-frame (128 bits), not collisions an attacker chooses.
pub const HASH_LEN: usize = 16;
/// zstd skippable frame magic used for the index (0x184D2A50..5F are
/// skippable; `zstd -d` ignores them).
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A5D;
const MAGIC: &[u8; 4] = b"DBSX";
/// Index version written: sub-frame hashes are BLAKE3. Version 1 (read
/// still) held SHA-256 ones.
const VERSION: u8 = 2;
/// Largest chunk an entry may describe (the largest chunk size).
const MAX_RAW: u32 = 64 << 20;
/// Largest index accepted (a 64 GiB pack of 64 KiB sub-frames).
pub const MAX_INDEX: u64 = 32 << 20;

/// One chunk frame's sub-frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Uncompressed length of the chunk as stored.
    pub raw_len: u32,
    /// Compressed length and truncated hash (of the uncompressed bytes) of
    /// each sub-frame, in order: BLAKE3 as [`compress`] makes them.
    pub subs: Vec<(u32, [u8; HASH_LEN])>,
}

impl Entry {
    /// Total compressed length.
    pub fn frame_len(&self) -> u64 {
        self.subs.iter().map(|s| u64::from(s.0)).sum()
    }
}

/// A pack's index: chunk frame offset -> its sub-frames.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackIndex {
    pub sub_size: u32,
    pub entries: BTreeMap<u64, Entry>,
    /// The hash its entries hold (what the index version says).
    pub hash: SubHash,
}

/// The hash of an index's sub-frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SubHash {
    /// Index version 1.
    Sha256,
    /// Index version 2, what this version writes.
    #[default]
    Blake3,
}

impl SubHash {
    /// Truncated hash of `data`.
    pub fn short(self, data: &[u8]) -> [u8; HASH_LEN] {
        let mut h = [0u8; HASH_LEN];
        match self {
            SubHash::Sha256 => h.copy_from_slice(&Sha256::digest(data)[..HASH_LEN]),
            SubHash::Blake3 => h.copy_from_slice(&blake3::hash(data).as_bytes()[..HASH_LEN]),
        }
        h
    }
}

/// Where sub-frames `first..last` of a chunk lie, and what they decode to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Byte offset in the pack and length of the compressed run.
    pub pack_offset: u64,
    pub pack_len: u64,
    /// Uncompressed offset in the chunk and length (inside `raw_len`).
    pub raw_offset: u64,
    pub raw_len: u64,
    pub first: usize,
    pub last: usize,
}

/// Compresses `data` as sub-frames of `sub_size` bytes; returns the frames
/// concatenated and the entry describing them.
pub fn compress(data: &[u8], sub_size: u32, level: i32) -> std::io::Result<(Vec<u8>, Entry)> {
    let mut out = Vec::new();
    let e = compress_with(&mut zstd::bulk::Compressor::new(level)?, data, sub_size, &mut out)?;
    Ok((out, e))
}

/// [`compress`] with a caller's compressor, into `out` (cleared first):
/// import's threads reuse both for every chunk.
pub fn compress_with(
    c: &mut zstd::bulk::Compressor<'_>,
    data: &[u8],
    sub_size: u32,
    out: &mut Vec<u8>,
) -> std::io::Result<Entry> {
    out.clear();
    let mut subs = Vec::with_capacity(data.len().div_ceil(sub_size as usize).max(1));
    // An empty chunk still gets one (empty) frame, so it decodes.
    let pieces: Vec<&[u8]> = if data.is_empty() { vec![data] } else { data.chunks(sub_size as usize).collect() };
    for p in pieces {
        let start = out.len();
        out.resize(start + zstd::zstd_safe::compress_bound(p.len()), 0);
        let n = c.compress_to_buffer(p, &mut out[start..])?;
        out.truncate(start + n);
        subs.push((n as u32, SubHash::Blake3.short(p)));
    }
    Ok(Entry { raw_len: data.len() as u32, subs })
}

impl PackIndex {
    /// An empty index of `sub_size` sub-frames.
    pub fn new(sub_size: u32) -> Self {
        Self { sub_size, entries: BTreeMap::new(), hash: SubHash::Blake3 }
    }

    /// The sub-frames of the frame at `frame_offset` (`frame_len` bytes, as
    /// the manifest says) covering uncompressed bytes `[off, off + len)`.
    /// None when the index does not describe that frame (it is then read
    /// whole).
    pub fn span(&self, frame_offset: u64, frame_len: u64, off: u64, len: u64) -> Option<Span> {
        let e = self.entries.get(&frame_offset)?;
        if e.frame_len() != frame_len || len == 0 || off >= u64::from(e.raw_len) {
            return None;
        }
        let ss = u64::from(self.sub_size);
        let first = (off / ss) as usize;
        let last = ((off + len).div_ceil(ss) as usize).min(e.subs.len());
        let skip: u64 = e.subs[..first].iter().map(|s| u64::from(s.0)).sum();
        let take: u64 = e.subs[first..last].iter().map(|s| u64::from(s.0)).sum();
        let raw_offset = first as u64 * ss;
        let raw_end = (last as u64 * ss).min(u64::from(e.raw_len));
        Some(Span {
            pack_offset: frame_offset + skip,
            pack_len: take,
            raw_offset,
            raw_len: raw_end - raw_offset,
            first,
            last,
        })
    }

    /// Decodes and verifies the compressed run `bytes` of `span` (frame at
    /// `frame_offset`): every sub-frame must decode to exactly its size and
    /// match its hash. Bad data is never returned.
    pub fn decode(&self, frame_offset: u64, span: &Span, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let e = self.entries.get(&frame_offset).ok_or("no index entry for the frame")?;
        if bytes.len() as u64 != span.pack_len {
            return Err(format!("got {} of {} bytes of sub-frames", bytes.len(), span.pack_len));
        }
        let ss = self.sub_size as usize;
        let mut out = Vec::with_capacity(span.raw_len as usize);
        let mut pos = 0usize;
        let mut d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
        for i in span.first..span.last {
            let (clen, h) = &e.subs[i];
            let frame = &bytes[pos..pos + *clen as usize];
            pos += *clen as usize;
            let want = (e.raw_len as usize - i * ss).min(ss);
            let data = d.decompress(frame, want).map_err(|err| format!("sub-frame {i} does not decode: {err}"))?;
            if data.len() != want {
                return Err(format!("sub-frame {i} decoded to {} bytes, expected {want}", data.len()));
            }
            if &self.hash.short(&data) != h {
                return Err(format!("sub-frame {i} hash mismatch"));
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// The index as a zstd skippable frame (magic, length, payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(MAGIC);
        p.push(match self.hash {
            SubHash::Sha256 => 1,
            SubHash::Blake3 => VERSION,
        });
        p.push(HASH_LEN as u8);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&self.sub_size.to_le_bytes());
        p.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (off, e) in &self.entries {
            p.extend_from_slice(&off.to_le_bytes());
            p.extend_from_slice(&e.raw_len.to_le_bytes());
            p.extend_from_slice(&(e.subs.len() as u32).to_le_bytes());
            for (clen, h) in &e.subs {
                p.extend_from_slice(&clen.to_le_bytes());
                p.extend_from_slice(h);
            }
        }
        let mut out = Vec::with_capacity(p.len() + 8);
        out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Parses an index written by [`encode`](Self::encode), checking it
    /// describes frames that lie before `index_offset` (where the index
    /// starts in its pack) without overlapping.
    pub fn parse(bytes: &[u8], index_offset: u64) -> Result<Self, String> {
        let mut r = Reader(bytes);
        if r.u32()? != SKIPPABLE_MAGIC {
            return Err("not a skippable frame".into());
        }
        let plen = r.u32()? as usize;
        if plen != r.0.len() {
            return Err(format!("frame says {plen} payload bytes, {} follow", r.0.len()));
        }
        if r.take(4)? != MAGIC {
            return Err("bad index magic".into());
        }
        let v = r.take(4)?;
        let hash = match v[0] {
            1 => SubHash::Sha256,
            VERSION => SubHash::Blake3,
            _ => return Err(format!("unsupported index version {} (this driveblk reads 1 and {VERSION})", v[0])),
        };
        if v[1] as usize != HASH_LEN {
            return Err(format!("unsupported hash length {} in the index", v[1]));
        }
        // Reserved: zero (one encoding per index; a later version says otherwise).
        if v[2..] != [0, 0] {
            return Err(format!("reserved index bytes are {:?}, not zero", &v[2..]));
        }
        let sub_size = r.u32()?;
        if !(4096..=MAX_RAW).contains(&sub_size) || !sub_size.is_power_of_two() {
            return Err(format!("implausible sub-frame size {sub_size}"));
        }
        let n = r.u32()? as usize;
        let mut entries = BTreeMap::new();
        let mut end_prev = 0u64;
        for _ in 0..n {
            let off = r.u64()?;
            let raw_len = r.u32()?;
            let count = r.u32()? as usize;
            if raw_len > MAX_RAW || count != (raw_len.div_ceil(sub_size) as usize).max(1) {
                return Err(format!("entry at {off}: {count} sub-frames for {raw_len} bytes"));
            }
            // Each sub-frame needs 4 + HASH_LEN bytes: a count the input
            // cannot hold is refused before anything is allocated for it.
            if count.saturating_mul(4 + HASH_LEN) > r.0.len() {
                return Err("index is truncated".into());
            }
            let mut subs = Vec::with_capacity(count);
            for _ in 0..count {
                let clen = r.u32()?;
                let mut h = [0u8; HASH_LEN];
                h.copy_from_slice(r.take(HASH_LEN)?);
                if clen == 0 {
                    return Err(format!("entry at {off}: empty sub-frame"));
                }
                subs.push((clen, h));
            }
            let e = Entry { raw_len, subs };
            let end = off.checked_add(e.frame_len()).ok_or("entry overflows")?;
            if off < end_prev || end > index_offset {
                return Err(format!("entry at {off} overlaps another or the index"));
            }
            end_prev = end;
            entries.insert(off, e);
        }
        if !r.0.is_empty() {
            return Err(format!("{} trailing bytes", r.0.len()));
        }
        Ok(Self { sub_size, entries, hash })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("index is truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3f).collect()
    }

    #[test]
    fn sub_frames_decode_whole_and_in_part() {
        let d = data(300_000);
        let (frames, e) = compress(&d, SUB_SIZE, 3).unwrap();
        // The concatenation is an ordinary multi-frame zstd stream.
        assert_eq!(zstd::bulk::decompress(&frames, 1 << 20).unwrap(), d);
        let mut pack = vec![7u8; 10];
        pack.extend_from_slice(&frames);
        let mut ix = PackIndex::new(SUB_SIZE);
        ix.entries.insert(10, e);
        let at = pack.len() as u64;
        let enc = ix.encode();
        pack.extend_from_slice(&enc);
        // zstd -d skips the index.
        assert_eq!(zstd::stream::decode_all(&pack[10..]).unwrap(), d);
        let ix = PackIndex::parse(&enc, at).unwrap();
        let s = ix.span(10, frames.len() as u64, 70_000, 100).unwrap();
        assert_eq!((s.first, s.last, s.raw_offset, s.raw_len), (1, 2, 65536, 65536));
        let got = ix.decode(10, &s, &pack[s.pack_offset as usize..(s.pack_offset + s.pack_len) as usize]).unwrap();
        assert_eq!(got, d[65536..131072]);
        let s = ix.span(10, frames.len() as u64, 250_000, 60_000).unwrap();
        assert_eq!((s.first, s.last, s.raw_len), (3, 5, 300_000 - 196_608));
        let mut run = pack[s.pack_offset as usize..(s.pack_offset + s.pack_len) as usize].to_vec();
        assert_eq!(ix.decode(10, &s, &run).unwrap(), d[196_608..]);
        let mid = run.len() / 2;
        run[mid] ^= 1;
        assert!(ix.decode(10, &s, &run).is_err());
        // A frame the index does not describe (or of another length) is read whole.
        assert!(ix.span(11, frames.len() as u64, 0, 1).is_none());
        assert!(ix.span(10, frames.len() as u64 + 1, 0, 1).is_none());
    }

    #[test]
    fn bad_indexes_are_refused() {
        let (frames, e) = compress(&data(200_000), SUB_SIZE, 3).unwrap();
        let mut ix = PackIndex::new(SUB_SIZE);
        ix.entries.insert(0, e);
        let enc = ix.encode();
        assert!(PackIndex::parse(&enc, frames.len() as u64).is_ok());
        assert!(PackIndex::parse(&enc, frames.len() as u64 - 1).is_err(), "overlaps the index");
        for cut in 0..enc.len() {
            assert!(PackIndex::parse(&enc[..cut], 1 << 30).is_err());
        }
        let mut bad = enc.clone();
        bad[8] = b'X';
        assert!(PackIndex::parse(&bad, 1 << 30).is_err());
        // Found by the fuzz target: reserved bytes set parsed, and re-encoded as zero.
        let mut bad = enc.clone();
        bad[14] = 1;
        assert!(PackIndex::parse(&bad, 1 << 30).unwrap_err().contains("reserved"));
    }

    /// Packs written before index version 2 hold SHA-256 sub-frame hashes:
    /// they still decode, and each kind is checked as its version says.
    #[test]
    fn version_1_indexes_of_sha256_hashes_still_verify() {
        let d = data(200_000);
        let (frames, mut e) = compress(&d, SUB_SIZE, 3).unwrap();
        let blake3_subs = e.subs.clone();
        for (i, s) in e.subs.iter_mut().enumerate() {
            let end = ((i + 1) * SUB_SIZE as usize).min(d.len());
            s.1 = SubHash::Sha256.short(&d[i * SUB_SIZE as usize..end]);
        }
        let mut ix = PackIndex::new(SUB_SIZE);
        ix.hash = SubHash::Sha256;
        ix.entries.insert(0, e);
        let enc = ix.encode();
        assert_eq!(enc[12], 1, "written as version 1");
        let parsed = PackIndex::parse(&enc, frames.len() as u64).unwrap();
        assert_eq!(parsed.hash, SubHash::Sha256);
        let s = parsed.span(0, frames.len() as u64, 0, d.len() as u64).unwrap();
        assert_eq!(parsed.decode(0, &s, &frames).unwrap(), d);
        // The same hashes read as version 2 (BLAKE3) are a mismatch, and
        // BLAKE3 hashes verify only as version 2.
        let mut wrong = enc.clone();
        wrong[12] = VERSION;
        let wrong = PackIndex::parse(&wrong, frames.len() as u64).unwrap();
        assert!(wrong.decode(0, &s, &frames).unwrap_err().contains("hash mismatch"));
        let mut ix = PackIndex::new(SUB_SIZE);
        ix.entries.insert(0, Entry { raw_len: d.len() as u32, subs: blake3_subs });
        let v2 = PackIndex::parse(&ix.encode(), frames.len() as u64).unwrap();
        assert_eq!(v2.hash, SubHash::Blake3);
        assert_eq!(v2.decode(0, &s, &frames).unwrap(), d);
        let mut bad = ix.encode();
        bad[12] = 3;
        assert!(PackIndex::parse(&bad, 1 << 30).unwrap_err().contains("version 3"));
    }
}
