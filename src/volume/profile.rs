//! Boot profiles (docs/format.md, "`profile-*` — boot profiles"): the 4 KiB
//! pages of the image a VM read while booting, in first-touch order, stored
//! as a profile pack (the pages' bytes cut into ~1 MiB zstd segments) plus a
//! small checksummed index, so the next cold start can stream its whole boot
//! working set with a few parallel ranged reads.
//!
//! This module is the format: the index's (de)serialisation and validation,
//! the builder that writes a pack (through a temporary file) and commits it,
//! and the reader side (`find_latest`, `fetch_segment`). Recording and
//! replaying live in the tier.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::crypto::SpillCipher;
use super::format::{seal, unseal, ChunkRef, Manifest, VolumeHeader};
use super::pack::{decode_chunk, sha256_hex, ZSTD_LEVEL};
use super::reader::VolumeReader;
use super::{VolumeError, VolumeResult};
use crate::remote::{private, ByteStream, DynRemote, PutBody};

/// Key prefix of profile indexes and packs.
pub const PROFILE_PREFIX: &str = "profile-";
/// `format` field of a profile index.
pub const PROFILE_MAGIC: &str = "driveblk-profile";
/// Version of the profile format (independent of the volume format's):
/// 1, or 2 for an index whose segments also come from older profiles'
/// packs (a delta, `packs`), which a version-1 reader must not read.
pub const PROFILE_VERSION: u32 = 1;
/// Version of an index that names other packs (`packs`).
pub const PROFILE_VERSION_DELTA: u32 = 2;
/// Granularity of a profile: extents are whole pages (but for a tail that
/// ends at the image end).
pub const PAGE_SIZE: u64 = 4096;
/// Uncompressed bytes per segment (a segment ends at the first extent
/// boundary at or past this; an extent longer than this is split across
/// segments at page boundaries).
pub const SEGMENT_BYTES: u64 = 1 << 20;
/// Most uncompressed bytes a reader accepts in one segment (the builder
/// writes at most `2 * SEGMENT_BYTES`), so a hostile index cannot make a
/// reader allocate without bound.
pub const MAX_SEGMENT_RAW: u64 = 4 << 20;
/// Largest profile index a reader parses. A recorded boot of 4 GiB of
/// pages in 4 KiB runs is ~1M extents, about 20 MiB of JSON; past this the
/// index is not one we wrote, and parsing it would only cost memory.
pub const MAX_INDEX_BYTES: usize = 64 << 20;
/// Largest image a profile may describe: qcow2's largest host offset
/// (2^56), beyond any volume we serve. Bounds every loop over an extent's
/// chunks and pages before it runs.
pub const MAX_IMAGE_LEN: u64 = 1 << 56;
/// Suffix of a profile pack's key: the index key plus this.
pub const PACK_SUFFIX: &str = ".pack";
/// `chunk_refs` value of a chunk served from the base image.
pub const BASE_DIGEST: &str = "base";

/// A run of image bytes `[offset, offset + len)`. (De)serialised as a
/// 2-element array `[offset, len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "[u64; 2]", into = "[u64; 2]")]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl From<[u64; 2]> for Extent {
    fn from([offset, len]: [u64; 2]) -> Self {
        Self { offset, len }
    }
}

impl From<Extent> for [u64; 2] {
    fn from(e: Extent) -> Self {
        [e.offset, e.len]
    }
}

impl Extent {
    /// One past the last byte (saturating: validation rejects overflow).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// One zstd frame of a profile pack and the image extents it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Byte offset of the frame in the pack.
    pub offset: u64,
    /// Compressed length of the frame.
    pub len: u64,
    /// Decoded length: the sum of the extents' lengths.
    pub raw_len: u64,
    /// Hex sha256 of the decoded bytes.
    pub sha256: String,
    /// Image extents whose bytes, concatenated in this order, are the
    /// decoded frame.
    pub extents: Vec<Extent>,
    /// Boots since one last read these pages (0: the boot that saved the
    /// profile). Profiles learn: each save keeps the older profile's
    /// unread pages a few boots longer, then lets them go.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub age: u32,
    /// Which pack holds the frame: 0 this profile's own (`pack`), `k` the
    /// index's `packs[k - 1]` (an older profile's, reused by a delta).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pack: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A profile index: what `profile-<gen>-<ms>-<hex>` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileIndex {
    pub format: String,
    pub version: u32,
    pub volume_id: String,
    /// The manifest generation whose bytes the pages hold.
    pub generation: u64,
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    pub page_size: u64,
    pub chunk_size: u64,
    /// Image length in `generation`.
    pub image_len: u64,
    /// Key of the profile pack.
    pub pack: String,
    /// Older profiles' packs some segments are read from (version 2): a
    /// profile that learned uploads only its new pages and names the
    /// frames it kept where they already are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<String>,
    /// For every chunk an extent touches: its digest in `generation` (see
    /// [`ref_digest`]). A replay on a later generation skips the pages of
    /// chunks whose digest changed.
    pub chunk_refs: BTreeMap<u64, String>,
    pub segments: Vec<Segment>,
}

impl ProfileIndex {
    /// Serialises like a manifest: one line of compact JSON, then
    /// `sha256:<hex of that line>`, newline-terminated.
    pub fn to_bytes(&self) -> Vec<u8> {
        seal(serde_json::to_vec(self).expect("profile index serialises"))
    }

    /// Verifies the trailer, parses, and checks the index against the
    /// volume header and for internal consistency. Errors say what is wrong.
    pub fn from_bytes(b: &[u8], header: &VolumeHeader) -> Result<Self, String> {
        if b.len() > MAX_INDEX_BYTES {
            return Err(format!("{} bytes, more than the {MAX_INDEX_BYTES} a profile index may have", b.len()));
        }
        let body = unseal(b)?;
        let p: Self = serde_json::from_slice(body).map_err(|e| format!("not valid JSON for a profile index: {e}"))?;
        p.validate(header)?;
        Ok(p)
    }

    /// The checks of [`from_bytes`](Self::from_bytes) after parsing.
    fn validate(&self, header: &VolumeHeader) -> Result<(), String> {
        if self.format != PROFILE_MAGIC || !(PROFILE_VERSION..=PROFILE_VERSION_DELTA).contains(&self.version) {
            return Err(format!(
                "format {:?} version {} is not {PROFILE_MAGIC:?} version {PROFILE_VERSION} or {PROFILE_VERSION_DELTA}",
                self.format, self.version
            ));
        }
        if self.version == PROFILE_VERSION && !self.packs.is_empty() {
            return Err(format!("names other packs but is version {PROFILE_VERSION}"));
        }
        if self.volume_id != header.volume_id {
            return Err(format!("belongs to volume {}, not {}", self.volume_id, header.volume_id));
        }
        if self.chunk_size != header.chunk_size {
            return Err(format!("chunk size {} differs from the header's {}", self.chunk_size, header.chunk_size));
        }
        if self.page_size != PAGE_SIZE {
            return Err(format!("page size {} is not {PAGE_SIZE}", self.page_size));
        }
        let pack_key = |k: &str| k.starts_with(PROFILE_PREFIX) && k.ends_with(PACK_SUFFIX) && !k.contains('/');
        if !pack_key(&self.pack) {
            return Err(format!("pack key {:?} is not a profile pack key", self.pack));
        }
        if let Some(k) = self.packs.iter().find(|k| !pack_key(k) || **k == self.pack) {
            return Err(format!("other pack {k:?} is not another profile pack key"));
        }
        // Sizes first: everything below loops over extents and chunks, and
        // the tier sizes its replay tables from them.
        if self.image_len == 0 || self.image_len > MAX_IMAGE_LEN {
            return Err(format!("image length {} is not between 1 and {MAX_IMAGE_LEN}", self.image_len));
        }
        let chunks = self.image_len.div_ceil(self.chunk_size);
        if let Some((&last, _)) = self.chunk_refs.last_key_value() {
            if last >= chunks {
                return Err(format!("chunk_refs names chunk {last}, past the image end ({chunks} chunks)"));
            }
        }
        for (idx, d) in &self.chunk_refs {
            if d != BASE_DIGEST && !super::digest::is_valid(d) {
                return Err(format!(
                    "chunk_refs entry of chunk {idx} is {d:?}, neither a chunk digest nor {BASE_DIGEST:?}"
                ));
            }
        }
        let mut pack_end = 0u64;
        let mut total_raw = 0u64;
        // Frames in other packs: no two may overlap (checked after sorting).
        let mut others: Vec<(u32, u64, u64)> = Vec::new();
        // Every extent is whole pages but a tail at the image end, so a
        // segment within MAX_SEGMENT_RAW has at most this many.
        let max_extents = (MAX_SEGMENT_RAW / PAGE_SIZE + 1) as usize;
        for (i, s) in self.segments.iter().enumerate() {
            let bad = |what: String| format!("segment {i}: {what}");
            if !super::digest::is_hex64(&s.sha256) {
                return Err(bad(format!("sha256 {:?} is not 64 hex digits", s.sha256)));
            }
            if s.extents.is_empty() {
                return Err(bad("has no extents".into()));
            }
            if s.extents.len() > max_extents {
                return Err(bad(format!("{} extents, more than {max_extents}", s.extents.len())));
            }
            let mut sum = 0u64;
            for e in &s.extents {
                self.check_extent(e).map_err(|w| bad(format!("extent [{}, {}] {w}", e.offset, e.len)))?;
                sum = sum.saturating_add(e.len);
            }
            if s.raw_len != sum {
                return Err(bad(format!("raw_len {} differs from the extents' total {sum}", s.raw_len)));
            }
            if s.raw_len > MAX_SEGMENT_RAW {
                return Err(bad(format!("raw_len {} exceeds the limit of {MAX_SEGMENT_RAW}", s.raw_len)));
            }
            // A page is recorded once: the profile cannot hold more than the image.
            total_raw = total_raw.saturating_add(s.raw_len);
            if total_raw > self.image_len {
                return Err(bad(format!("segments hold more bytes than the image has ({})", self.image_len)));
            }
            if s.len == 0 || s.len > s.raw_len + s.raw_len / 8 + 4096 {
                return Err(bad(format!("implausible compressed length {} for {} raw bytes", s.len, s.raw_len)));
            }
            let end = s.offset.checked_add(s.len).ok_or_else(|| bad("frame end overflows".into()))?;
            if s.pack as usize > self.packs.len() {
                return Err(bad(format!("names pack {} of {}", s.pack, self.packs.len())));
            }
            if s.pack > 0 {
                others.push((s.pack, s.offset, end));
                continue;
            }
            if s.offset < pack_end {
                return Err(bad(format!("frame at {} overlaps the previous one (ending at {pack_end})", s.offset)));
            }
            pack_end = end;
        }
        others.sort_unstable();
        if let Some(w) = others.windows(2).find(|w| w[0].0 == w[1].0 && w[1].1 < w[0].2) {
            return Err(format!("two frames of pack {} overlap (at {} and {})", w[0].0, w[0].1, w[1].1));
        }
        Ok(())
    }

    /// Page alignment, bounds, and a `chunk_refs` entry for every chunk.
    fn check_extent(&self, e: &Extent) -> Result<(), String> {
        if e.offset % PAGE_SIZE != 0 {
            return Err(format!("starts at an offset that is not a multiple of {PAGE_SIZE}"));
        }
        if e.len == 0 {
            return Err("is empty".into());
        }
        // Before the chunk loop below: no extent is longer than its segment.
        if e.len > MAX_SEGMENT_RAW {
            return Err(format!("is longer than a segment may be ({MAX_SEGMENT_RAW})"));
        }
        let end = e.offset.checked_add(e.len).ok_or("overflows")?;
        if end > self.image_len {
            return Err(format!("reaches past the image end ({})", self.image_len));
        }
        if e.len % PAGE_SIZE != 0 && end != self.image_len {
            return Err(format!(
                "has a length that is not a multiple of {PAGE_SIZE} and does not end at the image end"
            ));
        }
        for idx in e.offset / self.chunk_size..=(end - 1) / self.chunk_size {
            if !self.chunk_refs.contains_key(&idx) {
                return Err(format!("touches chunk {idx}, which has no chunk_refs entry"));
            }
        }
        Ok(())
    }

    /// Total uncompressed bytes (sum of raw_len).
    pub fn raw_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.raw_len).sum()
    }

    /// Length of this profile's own pack: the end of its last frame (its
    /// segments are in pack order).
    pub fn pack_len(&self) -> u64 {
        self.segments.iter().rev().find(|s| s.pack == 0).map_or(0, |s| s.offset + s.len)
    }

    /// Key of the pack holding segment `seg`'s frame.
    pub fn pack_key(&self, seg: usize) -> &str {
        match self.segments[seg].pack {
            0 => &self.pack,
            k => &self.packs[k as usize - 1],
        }
    }
}

/// The digest recorded in `chunk_refs` for a chunk ref: Some(sha256) for
/// Packed, Some("base") for Base, None for Zero (zero chunks are never put
/// in a profile).
pub fn ref_digest(r: &ChunkRef) -> Option<String> {
    match r {
        ChunkRef::Zero => None,
        ChunkRef::Base => Some(BASE_DIGEST.into()),
        ChunkRef::Packed { digest, .. } | ChunkRef::Patched { digest, .. } => Some(digest.clone()),
    }
}

/// Key of a profile index: sorts by generation, then creation time; random
/// within that so two hosts never collide.
pub fn profile_key(generation: u64, created_unix_ms: u64) -> String {
    format!("{PROFILE_PREFIX}{generation:020}-{created_unix_ms:013}-{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// Parses a profile index key into (generation, created unix millis);
/// `None` for anything else (including `.pack` keys).
pub fn parse_profile_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(PROFILE_PREFIX)?;
    let mut parts = rest.split('-');
    let (g, t, r) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|c| c.is_ascii_digit());
    let hexd = r.len() == 8 && r.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if parts.next().is_some() || !digits(g, 20) || !digits(t, 13) || !hexd {
        return None;
    }
    Some((g.parse().ok()?, t.parse().ok()?))
}

/// Builds a profile pack in a temporary file (a profile may be GBs: never
/// hold it all in memory), then uploads it.
///
/// `add` compresses and writes synchronously (a few ms per segment): call
/// it from a thread that may block.
pub struct ProfileBuilder {
    /// The volume's URL, for messages.
    url: String,
    volume_id: String,
    manifest: Manifest,
    has_base: bool,
    /// The temporary pack file; removed on drop.
    tmp_path: PathBuf,
    tmp: Option<File>,
    /// Bytes of frames written to `tmp`.
    pack_len: u64,
    /// Finished segments (their frames are in `tmp`).
    segments: Vec<Segment>,
    /// The open segment: raw bytes and extents so far.
    raw: Vec<u8>,
    extents: Vec<Extent>,
    raw_total: u64,
    chunk_refs: BTreeMap<u64, String>,
    /// Age of the pages being added (see [`Segment::age`]).
    age: u32,
    /// Other profiles' packs that reused segments are read from.
    packs: Vec<String>,
    /// Encrypts the temporary pack (see [`seal_spill`](Self::seal_spill)).
    spill: Option<Arc<SpillCipher>>,
}

impl std::fmt::Debug for ProfileBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileBuilder")
            .field("url", &self.url)
            .field("tmp", &self.tmp_path)
            .field("segments", &self.segments.len())
            .field("raw_bytes", &self.raw_total)
            .finish()
    }
}

impl ProfileBuilder {
    /// `tmp_dir`: where the temporary pack file goes (the volume's cache
    /// directory). Takes generation, chunk size, image length and chunk
    /// refs from `vol`.
    pub fn new(tmp_dir: &Path, vol: &VolumeReader) -> VolumeResult<Self> {
        Self::with_parts(tmp_dir, &vol.url, &vol.header, (*vol.manifest()).clone(), vol.base.is_some())
    }

    /// [`new`](Self::new) from the pieces of a reader.
    fn with_parts(
        tmp_dir: &Path,
        url: &str,
        header: &VolumeHeader,
        manifest: Manifest,
        has_base: bool,
    ) -> VolumeResult<Self> {
        let tmp_path = tmp_dir.join(format!(".profile-{}.tmp", hex::encode(rand::random::<[u8; 8]>())));
        let tmp =
            private::create(&tmp_path).map_err(|e| VolumeError::io("creating temporary profile pack", &tmp_path, e))?;
        Ok(Self {
            url: url.to_string(),
            volume_id: header.volume_id.clone(),
            manifest,
            has_base,
            tmp_path,
            tmp: Some(tmp),
            pack_len: 0,
            segments: Vec::new(),
            raw: Vec::new(),
            extents: Vec::new(),
            raw_total: 0,
            chunk_refs: BTreeMap::new(),
            age: 0,
            packs: Vec::new(),
            spill: None,
        })
    }

    /// Keeps the temporary pack encrypted on disk, under a key only this
    /// process holds (an encrypted SSD cache must not hold plaintext pages
    /// in its directory). Call before the first [`add`](Self::add).
    pub fn seal_spill(&mut self) {
        self.spill = Some(Arc::new(SpillCipher::random()));
    }

    /// Appends one extent's bytes (offset a multiple of PAGE_SIZE,
    /// data.len() a multiple of PAGE_SIZE unless it ends at image_len;
    /// caller guarantees these hold the committed generation's bytes).
    /// Adjacent extents (this one starts where the previous ended) are
    /// merged. Pages in Zero chunks must not be passed (an error naming the
    /// chunk). Records chunk_refs for the chunks touched.
    pub fn add(&mut self, offset: u64, data: &[u8]) -> VolumeResult<()> {
        let image_len = self.manifest.image_len;
        let len = data.len() as u64;
        let end = offset.checked_add(len);
        let invalid = |what: String| VolumeError::Unusable(format!("boot profile extent [{offset}, {len}]: {what}"));
        if offset % PAGE_SIZE != 0 {
            return Err(invalid(format!("offset is not a multiple of {PAGE_SIZE}")));
        }
        if len == 0 {
            return Err(invalid("no data".into()));
        }
        let end = match end {
            Some(e) if e <= image_len => e,
            _ => return Err(invalid(format!("reaches past the image end ({image_len})"))),
        };
        if len % PAGE_SIZE != 0 && end != image_len {
            return Err(invalid(format!("length is not a multiple of {PAGE_SIZE} and does not end at the image end")));
        }
        // Check every chunk before writing anything, so an error leaves the
        // builder as it was.
        let cs = self.manifest.chunk_size;
        let mut refs = Vec::new();
        for idx in offset / cs..=(end - 1) / cs {
            match ref_digest(&self.manifest.chunk(idx, self.has_base)) {
                Some(d) => refs.push((idx, d)),
                None => return Err(invalid(format!("chunk {idx} is a zero chunk; zero chunks are never profiled"))),
            }
        }
        self.chunk_refs.extend(refs);

        let mut pos = 0usize;
        while pos < data.len() {
            let room = SEGMENT_BYTES.saturating_sub(self.raw.len() as u64);
            let rest = (data.len() - pos) as u64;
            // An add no longer than a segment goes whole into the open one
            // (which ends once it reaches SEGMENT_BYTES); a longer one fills
            // the open segment up to SEGMENT_BYTES, cut at a page boundary.
            let take = if len <= SEGMENT_BYTES { rest } else { rest.min(room / PAGE_SIZE * PAGE_SIZE) };
            if take == 0 {
                self.finish_segment()?;
                continue;
            }
            let piece = Extent { offset: offset + pos as u64, len: take };
            match self.extents.last_mut() {
                Some(last) if last.end() == piece.offset => last.len += take,
                _ => self.extents.push(piece),
            }
            self.raw.extend_from_slice(&data[pos..pos + take as usize]);
            self.raw_total += take;
            pos += take as usize;
            if self.raw.len() as u64 >= SEGMENT_BYTES {
                self.finish_segment()?;
            }
        }
        Ok(())
    }

    /// The digest a profile built now records for chunk `idx` (None: a
    /// zero chunk, never profiled).
    pub fn chunk_digest(&self, idx: u64) -> Option<String> {
        ref_digest(&self.manifest.chunk(idx, self.has_base))
    }

    /// Appends a segment of an older profile as it is, read from that
    /// profile's pack (`pack_key`) instead of uploaded again: a profile
    /// that learned sends only its new pages. `old_refs` is that profile's
    /// `chunk_refs`: every chunk the segment touches must have the same
    /// digest now, or its frame holds bytes this generation replaced and
    /// is refused (an error; nothing is added). The open segment stays
    /// open, so new pages between reused ones still fill whole frames.
    pub fn reuse(
        &mut self,
        pack_key: &str,
        seg: &Segment,
        old_refs: &BTreeMap<u64, String>,
        age: u32,
    ) -> VolumeResult<()> {
        let cs = self.manifest.chunk_size;
        let mut refs = Vec::new();
        for e in &seg.extents {
            if e.len == 0 || e.end() > self.manifest.image_len {
                return Err(VolumeError::Unusable(format!(
                    "reused boot profile extent [{}, {}] is empty or past the image end",
                    e.offset, e.len
                )));
            }
            for idx in e.offset / cs..=(e.end() - 1) / cs {
                match ref_digest(&self.manifest.chunk(idx, self.has_base)) {
                    Some(d) if old_refs.get(&idx) == Some(&d) => refs.push((idx, d)),
                    Some(_) => {
                        return Err(VolumeError::Unusable(format!(
                        "reused boot profile segment holds chunk {idx} as it was before a newer generation changed it"
                    )))
                    }
                    None => {
                        return Err(VolumeError::Unusable(format!(
                            "reused boot profile segment touches zero chunk {idx}"
                        )))
                    }
                }
            }
        }
        self.chunk_refs.extend(refs);
        let k = match self.packs.iter().position(|p| p == pack_key) {
            Some(i) => i,
            None => {
                self.packs.push(pack_key.to_string());
                self.packs.len() - 1
            }
        };
        self.segments.push(Segment { age, pack: k as u32 + 1, ..seg.clone() });
        self.raw_total += seg.raw_len;
        Ok(())
    }

    /// The age of the pages added from now on (a segment holds pages of
    /// one age).
    pub fn set_age(&mut self, age: u32) -> VolumeResult<()> {
        if age != self.age {
            self.finish_segment()?;
            self.age = age;
        }
        Ok(())
    }

    /// Uncompressed bytes added so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_total
    }

    /// Compresses the open segment into the temporary file.
    fn finish_segment(&mut self) -> VolumeResult<()> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let ioerr = |path: &Path, e| VolumeError::io("writing temporary profile pack", path, e);
        let mut frame = zstd::bulk::compress(&self.raw, ZSTD_LEVEL).map_err(|e| ioerr(&self.tmp_path, e))?;
        if let Some(c) = &self.spill {
            c.apply(self.pack_len, &mut frame);
        }
        let f = self.tmp.as_mut().expect("temporary pack open until upload");
        f.write_all(&frame).map_err(|e| ioerr(&self.tmp_path, e))?;
        self.segments.push(Segment {
            offset: self.pack_len,
            len: frame.len() as u64,
            raw_len: self.raw.len() as u64,
            sha256: sha256_hex(&self.raw),
            extents: std::mem::take(&mut self.extents),
            age: self.age,
            pack: 0,
        });
        self.pack_len += frame.len() as u64;
        self.raw.clear();
        Ok(())
    }

    /// Finishes the last segment, then uploads the pack and the index
    /// ([`seal`](Self::seal) into `dir`, then [`PendingProfile::upload`]).
    /// Returns the index key; an empty builder uploads nothing and returns
    /// `Ok(None)`. On an error the sealed files stay in `dir`.
    pub async fn upload(self, remote: &DynRemote) -> VolumeResult<Option<String>> {
        let dir = self.tmp_path.parent().map(Path::to_path_buf).unwrap_or_default();
        match self.seal(&dir)? {
            Some(p) => p.upload(remote).await.map(Some),
            None => Ok(None),
        }
    }

    /// Finishes the last segment and seals the profile in `dir`'s
    /// [`PENDING_DIR`]: the pack file and the index it is committed with,
    /// both fsynced, so an upload cut short (a shutdown, a crash, a lost
    /// link) resumes at the next start. Takes the key now: the profile is
    /// of this generation and this moment, whenever it goes up. An empty
    /// builder seals nothing.
    pub fn seal(mut self, dir: &Path) -> VolumeResult<Option<PendingProfile>> {
        self.finish_segment()?;
        if self.segments.is_empty() {
            return Ok(None);
        }
        let tmp = self.tmp.take().expect("temporary pack open until sealed");
        tmp.sync_all().map_err(|e| VolumeError::io("flushing temporary profile pack", &self.tmp_path, e))?;
        drop(tmp);
        let created_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let key = profile_key(self.manifest.generation, created_unix_ms);
        let packs = std::mem::take(&mut self.packs);
        let index = ProfileIndex {
            format: PROFILE_MAGIC.into(),
            version: if packs.is_empty() { PROFILE_VERSION } else { PROFILE_VERSION_DELTA },
            volume_id: self.volume_id.clone(),
            generation: self.manifest.generation,
            created_unix_ms,
            page_size: PAGE_SIZE,
            chunk_size: self.manifest.chunk_size,
            image_len: self.manifest.image_len,
            pack: format!("{key}{PACK_SUFFIX}"),
            packs,
            chunk_refs: std::mem::take(&mut self.chunk_refs),
            segments: std::mem::take(&mut self.segments),
        };
        let pending = dir.join(PENDING_DIR);
        let io = |what: &'static str, path: &Path, e| VolumeError::io(what, path, e);
        private::create_dir_all(&pending).map_err(|e| io("creating", &pending, e))?;
        // Older sealed profiles are superseded: this one learned from them.
        PendingProfile::remove_all(&pending);
        let spill = self.spill.clone();
        let p = PendingProfile { url: self.url.clone(), dir: pending.clone(), key: key.clone(), index, spill };
        // A pack encrypted under this process's key cannot be read by the
        // next one: marked, so a later start drops it rather than upload
        // ciphertext it cannot decrypt.
        if p.spill.is_some() {
            write_synced(&p.dir.join(SPILL_MARK), b"").map_err(|e| io("writing", &p.dir, e))?;
        }
        // The pack first, then the index: a sealed profile is one whose
        // index file exists (a crash between leaves an orphan pack that the
        // next seal or start removes).
        std::fs::rename(&self.tmp_path, p.pack_path()).map_err(|e| io("sealing the profile pack in", &pending, e))?;
        // An encrypted cache's sealed profile dies with this process (the
        // mark above), so its index is kept in memory only: on disk it
        // would be plaintext (page extents, digests of chunk contents).
        if p.spill.is_none() {
            write_synced(&p.index_path(), &p.index.to_bytes()).map_err(|e| io("writing", &p.index_path(), e))?;
        }
        if let Ok(d) = File::open(&pending) {
            let _ = d.sync_all();
        }
        Ok(Some(p))
    }
}

/// Subdirectory of a cache directory holding a sealed boot profile not
/// yet uploaded (see [`ProfileBuilder::seal`]).
pub const PENDING_DIR: &str = "profile-pending";

/// In [`PENDING_DIR`]: the sealed pack is encrypted under the sealing
/// process's key (an encrypted cache); no later process can upload it.
const SPILL_MARK: &str = "spill-key-gone";

/// A boot profile sealed on local disk, waiting to go up: its pack file
/// and its index, named by the key it will have on the remote.
pub struct PendingProfile {
    url: String,
    dir: PathBuf,
    /// The index key it is uploaded under.
    pub key: String,
    pub index: ProfileIndex,
    /// Decrypts the pack file (an encrypted cache's, this process only).
    spill: Option<Arc<SpillCipher>>,
}

impl std::fmt::Debug for PendingProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingProfile").field("url", &self.url).field("key", &self.key).finish()
    }
}

impl PendingProfile {
    fn pack_path(&self) -> PathBuf {
        self.dir.join(format!("{}{PACK_SUFFIX}", self.key))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join(&self.key)
    }

    /// The sealed profile in cache directory `cache_dir`, if one is whole
    /// and belongs to this volume (anything else there is removed).
    /// `encrypted_cache`: the cache is encrypted now, so a profile sealed
    /// in clear (before it was) is removed too: its pack holds the boot's
    /// pages as they are.
    pub fn find(cache_dir: &Path, url: &str, header: &VolumeHeader, encrypted_cache: bool) -> Option<PendingProfile> {
        let dir = cache_dir.join(PENDING_DIR);
        let entries = std::fs::read_dir(&dir).ok()?;
        let why = if dir.join(SPILL_MARK).exists() {
            Some("sealed under an earlier process's cache key")
        } else if encrypted_cache {
            Some("sealed in clear, before the cache was encrypted")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::info!(dir = %dir.display(), "dropping a boot profile {why}");
            Self::remove_all(&dir);
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        let mut found = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if parse_profile_key(&name).is_none() {
                continue;
            }
            let index = std::fs::read(e.path()).ok().and_then(|b| ProfileIndex::from_bytes(&b, header).ok());
            let Some(index) = index else { continue };
            let p = PendingProfile { url: url.to_string(), dir: dir.clone(), key: name, index, spill: None };
            let whole = std::fs::metadata(p.pack_path()).is_ok_and(|m| m.len() == p.index.pack_len());
            if whole && found.as_ref().is_none_or(|f: &PendingProfile| f.key < p.key) {
                found = Some(p);
            }
        }
        // Keep the newest whole one; drop the rest (older, torn, foreign).
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = found.as_ref().is_some_and(|f| name == f.key || name == format!("{}{PACK_SUFFIX}", f.key));
            if !keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
        found
    }

    fn remove_all(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Drops the sealed files (uploaded, or a newer profile made this one
    /// useless), and the directory once empty.
    pub fn discard(self) {
        let _ = std::fs::remove_file(self.index_path());
        let _ = std::fs::remove_file(self.pack_path());
        let _ = std::fs::remove_file(self.dir.join(SPILL_MARK));
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Uploads the pack (streamed from its file), then the index — the
    /// commit rule — and removes the sealed files. Returns the index key.
    /// On an error the files stay for the next attempt.
    pub async fn upload(self, remote: &DynRemote) -> VolumeResult<String> {
        let key = self.key.clone();
        let pack = self.index.pack.clone();
        let path = self.pack_path();
        let len = self.index.pack_len();
        // A delta whose every segment is reused has no pack of its own.
        if len > 0 {
            let spill = self.spill.clone();
            let body = PutBody::from_stream_fn(Some(len), move || file_stream(path.clone(), len, spill.clone()));
            remote
                .put(&pack, body)
                .await
                .map_err(|e| VolumeError::remote(format!("uploading boot profile pack {}/{pack}", self.url), e))?;
        }
        remote
            .put(&key, PutBody::from_bytes(self.index.to_bytes()))
            .await
            .map_err(|e| VolumeError::remote(format!("uploading boot profile index {}/{key}", self.url), e))?;
        tracing::info!(
            url = %self.url,
            key = %key,
            segments = self.index.segments.len(),
            raw_bytes = self.index.raw_bytes(),
            pack_bytes = len,
            "boot profile uploaded"
        );
        self.discard();
        Ok(key)
    }
}

/// Writes `data` to `path` through a temporary file, fsynced, renamed.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = private::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Drop for ProfileBuilder {
    fn drop(&mut self) {
        self.tmp = None;
        if let Err(e) = std::fs::remove_file(&self.tmp_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.tmp_path.display(), error = %e, "could not remove temporary profile pack");
            }
        }
    }
}

/// The first `len` bytes of the file at `path`, in pieces of up to 1 MiB
/// (decrypted with `spill` when given); an error if the file is shorter.
fn file_stream(path: PathBuf, len: u64, spill: Option<Arc<SpillCipher>>) -> ByteStream {
    use tokio::io::AsyncReadExt;
    const PIECE: u64 = 1 << 20;
    let state = (path, None::<tokio::fs::File>, 0u64);
    Box::pin(futures::stream::try_unfold(state, move |(path, file, done)| {
        let spill = spill.clone();
        async move {
            if done >= len {
                return Ok(None);
            }
            let mut f = match file {
                Some(f) => f,
                None => tokio::fs::File::open(&path).await?,
            };
            let mut buf = vec![0u8; PIECE.min(len - done) as usize];
            f.read_exact(&mut buf).await?;
            if let Some(c) = &spill {
                c.apply(done, &mut buf);
            }
            let n = buf.len() as u64;
            Ok(Some((Bytes::from(buf), (path, Some(f), done + n))))
        }
    }))
}

/// The newest profile index of the volume (by key order) that parses and
/// validates against `header`; `Ok(None)` when there is none. A corrupt
/// index is skipped with a warning naming it, trying the next newest (a
/// profile is an optimisation: a bad one must never stop a volume from
/// serving). `.pack` keys are ignored when listing.
pub async fn find_latest(remote: &DynRemote, header: &VolumeHeader) -> VolumeResult<Option<(String, ProfileIndex)>> {
    let url = remote.describe();
    let listed = remote
        .list(PROFILE_PREFIX)
        .await
        .map_err(|e| VolumeError::remote(format!("listing boot profiles of {url}"), e))?;
    let mut keys: Vec<(u64, u64, String)> =
        listed.into_iter().filter_map(|m| parse_profile_key(&m.key).map(|(g, t)| (g, t, m.key))).collect();
    keys.sort();
    for (generation, _, key) in keys.into_iter().rev() {
        let bytes = match remote.get(&key).await {
            Ok(b) => b,
            // Deleted between list and get (a GC): try the next one.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(VolumeError::remote(format!("reading boot profile {url}/{key}"), e)),
        };
        let parsed = ProfileIndex::from_bytes(&bytes, header).and_then(|p| {
            if p.generation != generation {
                Err(format!("says generation {} but its key says {generation}", p.generation))
            } else if p.pack != format!("{key}{PACK_SUFFIX}") {
                Err(format!("names pack {:?}, not its own {key}{PACK_SUFFIX}", p.pack))
            } else {
                Ok(p)
            }
        });
        match parsed {
            Ok(p) => return Ok(Some((key, p))),
            Err(reason) => {
                let e = VolumeError::CorruptProfile { url: url.clone(), key: key.clone(), reason };
                tracing::warn!(key = %key, error = %e, "skipping a corrupt boot profile");
            }
        }
    }
    Ok(None)
}

/// Ranged read of segment `seg`'s frame from the pack, decoded (bounded by
/// raw_len) and sha256-checked: the raw bytes (extents concatenated). A
/// short read, a frame that does not decode to exactly raw_len bytes, or a
/// hash mismatch is [`VolumeError::CorruptProfile`]; bad bytes are never
/// returned.
pub async fn fetch_segment(remote: &DynRemote, url: &str, index: &ProfileIndex, seg: usize) -> VolumeResult<Bytes> {
    // Bytes a shared cache directory gave that fail the checks are fetched
    // again from the remote (`remote::shared`).
    crate::remote::shared::verified(|| fetch_segment_once(remote, url, index, seg)).await
}

async fn fetch_segment_once(remote: &DynRemote, url: &str, index: &ProfileIndex, seg: usize) -> VolumeResult<Bytes> {
    let s = index.segments.get(seg).ok_or_else(|| {
        VolumeError::Unusable(format!(
            "boot profile {} has {} segments; there is no segment {seg}",
            index.pack,
            index.segments.len()
        ))
    })?;
    // `from_bytes` checked these; an index built by hand may not have been.
    let pack = match s.pack as usize {
        0 => &index.pack,
        k => index.packs.get(k - 1).unwrap_or(&index.pack),
    };
    let corrupt = |reason: String| VolumeError::CorruptProfile {
        url: url.to_string(),
        key: pack.clone(),
        reason: format!("segment {seg} (offset {}, {} bytes): {reason}", s.offset, s.len),
    };
    if s.raw_len > MAX_SEGMENT_RAW || s.offset.checked_add(s.len).is_none() || s.pack as usize > index.packs.len() {
        return Err(corrupt(format!("implausible segment (raw_len {}, pack {})", s.raw_len, s.pack)));
    }
    let frame = match remote.get_range(pack, s.offset..s.offset + s.len).await {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return Err(corrupt("the pack is missing".into())),
        Err(e) => return Err(VolumeError::remote(format!("reading segment {seg} of boot profile {url}/{pack}"), e)),
    };
    if frame.len() as u64 != s.len {
        return Err(corrupt(format!("pack is too short: got {} of {} bytes", frame.len(), s.len)));
    }
    let data = decode_chunk(&frame, s.raw_len as usize, &s.sha256).map_err(corrupt)?;
    Ok(Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::DirRemote;
    use std::sync::Arc;

    const CS: u64 = 64 << 10;

    /// A header, and a generation-3 manifest over `image_len` bytes where
    /// chunk 2 is zero, chunk 3 is from a (pretend) base and the rest are
    /// packed.
    fn volume(image_len: u64) -> (VolumeHeader, Manifest) {
        let h = VolumeHeader::new(image_len, CS, None);
        let mut m = Manifest::new(&h, 3);
        m.packs.push("pack-x".into());
        for idx in 0..m.chunk_count() {
            let r = match idx {
                2 => ChunkRef::Zero,
                3 => ChunkRef::Base,
                _ => ChunkRef::Packed { pack: 0, offset: 0, len: 1, digest: format!("{idx:064x}") },
            };
            m.chunks.insert(idx, r);
        }
        (h, m)
    }

    fn data(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
    }

    fn index(h: &VolumeHeader) -> ProfileIndex {
        let extents = vec![Extent { offset: 0, len: 8192 }, Extent { offset: 3 * CS, len: 4096 }];
        ProfileIndex {
            format: PROFILE_MAGIC.into(),
            version: PROFILE_VERSION,
            volume_id: h.volume_id.clone(),
            generation: 3,
            created_unix_ms: 1_700_000_000_000,
            page_size: PAGE_SIZE,
            chunk_size: CS,
            image_len: h.image_len,
            pack: format!("{}{PACK_SUFFIX}", profile_key(3, 1_700_000_000_000)),
            packs: Vec::new(),
            chunk_refs: [(0, "a".repeat(64)), (3, BASE_DIGEST.to_string())].into_iter().collect(),
            segments: vec![Segment {
                offset: 0,
                len: 100,
                raw_len: 12288,
                sha256: "b".repeat(64),
                extents,
                age: 0,
                pack: 0,
            }],
        }
    }

    #[test]
    fn index_roundtrip_and_validation() {
        let (h, _) = volume(1 << 20);
        let p = index(&h);
        let b = p.to_bytes();
        assert!(b.starts_with(b"{\"format\":\"driveblk-profile\""));
        assert!(String::from_utf8_lossy(&b).contains("\"extents\":[[0,8192],[196608,4096]]"));
        assert_eq!(ProfileIndex::from_bytes(&b, &h).unwrap(), p);
        assert_eq!(p.raw_bytes(), 12288);
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert!(ProfileIndex::from_bytes(&bad, &h).unwrap_err().contains("checksum"));
        assert!(ProfileIndex::from_bytes(&b[..b.len() - 5], &h).is_err());

        let reject = |f: &dyn Fn(&mut ProfileIndex), want: &str| {
            let mut q = index(&h);
            f(&mut q);
            let e = ProfileIndex::from_bytes(&q.to_bytes(), &h).unwrap_err();
            assert!(e.contains(want), "{e:?} does not contain {want:?}");
        };
        reject(&|q| q.volume_id = "0".repeat(32), "belongs to volume");
        reject(&|q| q.version = 3, "version 3");
        // A delta names other packs, and only as version 2.
        let other = format!("{}{PACK_SUFFIX}", profile_key(2, 1_600_000_000_000));
        reject(&|q| q.packs = vec![other.clone()], "names other packs but is version 1");
        let mut delta = index(&h);
        (delta.version, delta.packs, delta.segments[0].pack) = (2, vec![other.clone()], 1);
        let b2 = delta.to_bytes();
        assert!(String::from_utf8_lossy(&b2).contains("\"pack\":1"));
        assert_eq!(ProfileIndex::from_bytes(&b2, &h).unwrap().pack_key(0), other);
        reject(&|q| (q.version, q.packs, q.segments[0].pack) = (2, vec![other.clone()], 2), "names pack 2 of 1");
        reject(&|q| (q.version, q.packs) = (2, vec!["gen-1".into()]), "not another profile pack key");
        reject(&|q| q.chunk_size = CS * 2, "chunk size");
        reject(&|q| q.page_size = 512, "page size");
        reject(&|q| q.segments[0].extents[0].offset = 512, "not a multiple of 4096");
        reject(&|q| q.segments[0].extents[0].len = 4000, "not a multiple of 4096");
        reject(&|q| q.segments[0].extents[0].len = 0, "is empty");
        reject(&|q| q.segments[0].extents[1].offset = (1 << 20) - 4096 + 4096, "past the image end");
        reject(&|q| q.segments[0].extents[1].offset = u64::MAX - 4095, "overflows");
        reject(&|q| q.segments[0].raw_len = 8192, "raw_len 8192 differs");
        reject(&|q| q.segments[0].len = 0, "implausible");
        reject(&|q| q.segments[0].len = 20000, "implausible");
        reject(&|q| q.segments[0].sha256 = "B".repeat(64), "sha256");
        reject(&|q| q.segments[0].extents.clear(), "no extents");
        reject(&|q| drop(q.chunk_refs.remove(&3)), "chunk 3, which has no chunk_refs entry");
        reject(&|q| drop(q.chunk_refs.insert(5, "zero".into())), "chunk_refs entry of chunk 5");
        reject(&|q| q.pack = "gen-1".into(), "not a profile pack key");
        reject(
            &|q| {
                let mut s = q.segments[0].clone();
                s.offset = 50;
                q.segments.push(s);
            },
            "overlaps",
        );
        reject(
            &|q| {
                let s = &mut q.segments[0];
                s.extents = vec![Extent { offset: 0, len: 5 << 19 }, Extent { offset: 5 << 19, len: 5 << 19 }];
                s.raw_len = 5 << 20;
                q.image_len = 8 << 20;
                q.chunk_refs = (0..80).map(|i| (i, BASE_DIGEST.to_string())).collect();
            },
            "exceeds the limit",
        );
        // Sizes a hostile index could use to drive allocations or loops.
        reject(&|q| q.image_len = 0, "image length 0");
        reject(&|q| q.image_len = u64::MAX, "is not between 1 and");
        reject(&|q| drop(q.chunk_refs.insert(u64::MAX / CS, BASE_DIGEST.into())), "past the image end");
        reject(&|q| q.segments[0].extents[1].len = 1 << 40, "longer than a segment");
        reject(
            &|q| {
                let s = &mut q.segments[0];
                s.extents = (0..2000).map(|i| Extent { offset: i * 4096, len: 4096 }).collect();
                s.raw_len = 2000 * 4096;
            },
            "extents, more than",
        );
        reject(
            &|q| {
                // The same pages over and over: more bytes than the image.
                let s = q.segments[0].clone();
                q.segments = (0..200u64)
                    .map(|i| Segment {
                        offset: i * 100,
                        extents: vec![Extent { offset: 0, len: 8192 }],
                        raw_len: 8192,
                        ..s.clone()
                    })
                    .collect();
            },
            "more bytes than the image",
        );
        let huge = vec![b' '; MAX_INDEX_BYTES + 1];
        assert!(ProfileIndex::from_bytes(&huge, &h).unwrap_err().contains("more than the"));
        // A tail that ends exactly at the image end need not be whole pages.
        let mut q = index(&h);
        q.image_len = 3 * CS + 1000;
        q.segments[0].extents[1].len = 1000;
        q.segments[0].raw_len = 8192 + 1000;
        assert_eq!(ProfileIndex::from_bytes(&q.to_bytes(), &h).unwrap(), q);
    }

    #[test]
    fn keys_and_digests() {
        let k = profile_key(7, 1_700_000_000_123);
        assert_eq!(parse_profile_key(&k), Some((7, 1_700_000_000_123)));
        assert_eq!(parse_profile_key(&format!("{k}{PACK_SUFFIX}")), None);
        assert_eq!(parse_profile_key("profile-7-1-aa"), None);
        assert!(profile_key(7, 999) < profile_key(7, 1000));
        assert!(profile_key(7, 9_999_999_999_999) < profile_key(8, 0));
        assert_eq!(ref_digest(&ChunkRef::Zero), None);
        assert_eq!(ref_digest(&ChunkRef::Base).as_deref(), Some("base"));
        let p = ChunkRef::Packed { pack: 0, offset: 0, len: 1, digest: "c".repeat(64) };
        assert_eq!(ref_digest(&p), Some("c".repeat(64)));
    }

    /// An encrypted cache's sealed profile leaves nothing readable on disk:
    /// its pack is encrypted under the process's key and its index (page
    /// extents, digests of chunk contents) stays in memory; it still goes
    /// up. A later start drops what is left of one; a profile sealed in
    /// clear is dropped once the cache is encrypted.
    #[test]
    fn an_encrypted_caches_sealed_profile_keeps_its_index_off_disk() {
        let d = tempfile::tempdir().unwrap();
        let (h, m) = volume(8 * CS);
        let mut b = ProfileBuilder::with_parts(d.path(), "dir:/x", &h, m, true).unwrap();
        b.seal_spill();
        let page = data(0, 4096);
        b.add(0, &page).unwrap();
        let p = b.seal(d.path()).unwrap().unwrap();
        for e in std::fs::read_dir(d.path().join(PENDING_DIR)).unwrap() {
            let (name, bytes) = (e.as_ref().unwrap().file_name(), std::fs::read(e.unwrap().path()).unwrap());
            assert!(name.to_string_lossy().ends_with(PACK_SUFFIX) || name == SPILL_MARK, "{name:?} on disk");
            assert!(!bytes.windows(page.len()).any(|w| w == page), "{name:?} holds the page in clear");
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let remote: DynRemote = Arc::new(DirRemote::new(d.path().join("vol")));
        rt.block_on(remote.create_folder()).unwrap();
        let key = rt.block_on(p.upload(&remote)).unwrap();
        let (_, index) = rt.block_on(find_latest(&remote, &h)).unwrap().unwrap();
        assert_eq!(rt.block_on(fetch_segment(&remote, "dir:/x", &index, 0)).unwrap(), page, "{key}");
        // Sealed in clear, then the cache is encrypted: dropped, not kept.
        let (h, m) = volume(8 * CS);
        let mut b = ProfileBuilder::with_parts(d.path(), "dir:/x", &h, m, true).unwrap();
        b.add(0, &page).unwrap();
        b.seal(d.path()).unwrap().unwrap();
        assert!(PendingProfile::find(d.path(), "dir:/x", &h, true).is_none());
        assert!(!d.path().join(PENDING_DIR).exists());
    }

    #[test]
    fn builder_segments_merges_and_splits() {
        let d = tempfile::tempdir().unwrap();
        let image_len = 40 * CS + 1000;
        let (h, m) = volume(image_len);
        let mut b = ProfileBuilder::with_parts(d.path(), "dir:/x", &h, m, true).unwrap();
        let tmp = b.tmp_path.clone();
        assert!(tmp.exists());
        let mut want: Vec<(u64, u64)> = Vec::new();
        let mut add = |b: &mut ProfileBuilder, off: u64, len: u64| {
            b.add(off, &data(off, len)).unwrap();
            want.push((off, len));
        };
        // Three adjacent pages: one extent.
        add(&mut b, 0, 4096);
        add(&mut b, 4096, 4096);
        add(&mut b, 8192, 8192);
        // A page of the base chunk.
        add(&mut b, 3 * CS, 4096);
        // 1.5 MiB in one add, split at the segment boundary.
        add(&mut b, 5 * CS, 3 * SEGMENT_BYTES / 2);
        // The tail, short of a page.
        add(&mut b, 40 * CS, 1000);
        // A zero chunk is refused, and changes nothing.
        let before = b.raw_bytes();
        let e = b.add(2 * CS + 4096, &[0u8; 4096]).unwrap_err();
        assert!(matches!(&e, VolumeError::Unusable(s) if s.contains("chunk 2")), "{e}");
        let e = b.add(CS, &vec![1u8; (CS + 4096) as usize]).unwrap_err();
        assert!(e.to_string().contains("chunk 2"), "{e}");
        assert!(b.add(100, &[0u8; 4096]).is_err());
        assert!(b.add(4 * CS, &[0u8; 100]).is_err());
        assert!(b.add(40 * CS, &[0u8; 4096]).is_err());
        assert_eq!(b.raw_bytes(), before);
        assert_eq!(before, want.iter().map(|w| w.1).sum::<u64>());

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let remote: DynRemote = Arc::new(DirRemote::new(d.path().join("vol")));
        rt.block_on(remote.create_folder()).unwrap();
        let key = rt.block_on(b.upload(&remote)).unwrap().unwrap();
        assert!(!tmp.exists(), "temp pack removed after upload");
        let (k2, p) = rt.block_on(find_latest(&remote, &h)).unwrap().unwrap();
        assert_eq!(k2, key);
        assert_eq!(p.generation, 3);
        assert_eq!(p.pack, format!("{key}.pack"));
        assert_eq!(p.raw_bytes(), before);
        assert_eq!(p.segments.len(), 2);
        assert_eq!(p.segments[0].raw_len, SEGMENT_BYTES);
        assert_eq!(p.segments[0].extents[0], Extent { offset: 0, len: 16384 });
        assert_eq!(p.segments[1].extents[0].offset, p.segments[0].extents.last().unwrap().end());
        assert_eq!(p.chunk_refs[&3], "base");
        assert_eq!(p.chunk_refs[&0], format!("{:064x}", 0));
        assert!(!p.chunk_refs.contains_key(&2) && !p.chunk_refs.contains_key(&4));
        let mut got = Vec::new();
        for i in 0..p.segments.len() {
            got.extend_from_slice(&rt.block_on(fetch_segment(&remote, "dir:/x", &p, i)).unwrap());
        }
        let expect: Vec<u8> = want.iter().flat_map(|&(o, l)| data(o, l)).collect();
        assert!(got == expect);
        assert!(rt.block_on(fetch_segment(&remote, "dir:/x", &p, 2)).is_err());

        // Empty: nothing uploaded, temp file gone; dropped: temp file gone.
        let b = ProfileBuilder::with_parts(d.path(), "dir:/x", &h, volume(image_len).1, true).unwrap();
        assert_eq!(rt.block_on(b.upload(&remote)).unwrap(), None);
        let b = ProfileBuilder::with_parts(d.path(), "dir:/x", &h, volume(image_len).1, true).unwrap();
        drop(b);
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("vol")]);
        assert_eq!(rt.block_on(remote.list(PROFILE_PREFIX)).unwrap().len(), 2);
    }
}
