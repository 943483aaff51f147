//! On-remote structures of a volume (see docs/format.md): the immutable
//! `volume.json` header, `gen-<N>` manifests and the naming of objects.
//! Pure data and (de)serialisation; no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::remote::Slot;

/// Version of the volume format this code writes. Version 2 added
/// generations written as deltas over their parent, the commit fence (each
/// manifest names the slot of its successor), the writer of each
/// generation, and a reserved `crypto` header field. Version 3 records
/// chunk digests as BLAKE3 (`digest`, see [`super::digest`]) and writes
/// pack indexes of BLAKE3 sub-frame hashes. Older volumes still open (and
/// their new generations are written in version 3; chunks written before
/// keep their SHA-256 digests).
pub const FORMAT_VERSION: u32 = 3;
/// Oldest version this code reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// `format` field of `volume.json`.
pub const HEADER_MAGIC: &str = "driveblk-volume";
/// `format` field of a manifest.
pub const MANIFEST_MAGIC: &str = "driveblk-manifest";
/// Key of the volume header.
pub const HEADER_KEY: &str = "volume.json";
/// Key prefix of manifests.
pub const GEN_PREFIX: &str = "gen-";
/// Key prefix of packs.
pub const PACK_PREFIX: &str = "pack-";
/// Default chunk size: large enough that a 40 GB image is ~40k chunks and a
/// manifest stays a few MB, small enough that a 4 KiB miss costs one
/// quick ranged read.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Smallest and largest chunk sizes accepted (powers of two).
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Most chunks an image may span (64 TiB at the default chunk size). Every
/// chunk costs memory in a serving daemon, so a header, manifest or cache
/// journal claiming more is damaged or hostile, not a bigger disk.
pub const MAX_CHUNKS: u64 = 1 << 26;

/// How chunks inside packs are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
}

/// The existing image file a volume layers over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// Remote URL of the file, e.g. `dir:/mnt/drive/win10.qcow2`.
    pub url: String,
    /// Its size when the volume was attached.
    pub size: u64,
    /// Its version stamp then (dir: mtime); a change means the file was
    /// modified and the volume's view of it would silently shift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The content revision the volume is pinned to (Drive:
    /// `headRevisionId` at attach, marked `keepForever`). Set, it is what
    /// pins the base: renames, stars and shares change nothing, and base
    /// chunks are read from this revision even after the file's content
    /// is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// md5 of the pinned content as the store reported it (Drive `md5Checksum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// sha256 of the pinned content as the store reported it (Drive `sha256Checksum`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The volume a fork was made from (`driveblk fork`): the fork's manifests
/// name that volume's packs as `<volume_id>:<pack key>`, so the data they
/// share is never uploaded twice. `origin` is the origin's own origin (a
/// fork of a fork), so the whole chain is known without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRef {
    /// Remote URL of the origin volume.
    pub url: String,
    pub volume_id: String,
    /// The origin's generation the fork started from (its generation 1
    /// holds exactly that generation's bytes).
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Box<OriginRef>>,
}

impl OriginRef {
    /// The chain of origins, nearest first.
    pub fn chain(&self) -> Vec<&OriginRef> {
        let mut out = vec![self];
        while let Some(o) = out.last().and_then(|o| o.origin.as_deref()) {
            if out.len() >= MAX_ORIGIN_DEPTH {
                break;
            }
            out.push(o);
        }
        out
    }
}

/// Most origins a fork chain may have (a fork of a fork of ...).
pub const MAX_ORIGIN_DEPTH: usize = 16;

/// `volume.json`: written once when the volume is created, never changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHeader {
    pub format: String,
    pub version: u32,
    /// Random 128-bit id, hex; ties caches and manifests to this volume.
    pub volume_id: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// Length of the image file at creation (generations may change it).
    pub image_len: u64,
    pub chunk_size: u64,
    pub compression: Compression,
    /// "none", or "aes-256-gcm" with `crypto` set (docs/encryption.md).
    pub encryption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
    /// The image's format (`raw`, `qcow2`) as the user gave it at import
    /// or attach, so `serve` needs no `--format`. Never guessed from the
    /// bytes: a raw guest can write a qcow2 header. Absent in volumes made
    /// before it existed (and ignored by builds that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_format: Option<String>,
    /// Client-side encryption: the wrapped data key and how it is wrapped
    /// (`crypto::CryptoHeader`). Builds that predate it refuse the volume
    /// ("encrypted") instead of serving ciphertext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypto: Option<serde_json::Value>,
    /// Set on a fork: the volume whose packs its manifests may name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<OriginRef>,
    /// The slot generation 1 was created at (Drive: a pre-generated file
    /// id), so a reader finds the first generation — and from it, by the
    /// slots each manifest names, the newest — without a listing, which may
    /// lag behind creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_slot: Option<Slot>,
}

impl VolumeHeader {
    /// A new header with a fresh id.
    pub fn new(image_len: u64, chunk_size: u64, base: Option<BaseRef>) -> Self {
        Self {
            format: HEADER_MAGIC.into(),
            version: FORMAT_VERSION,
            volume_id: hex::encode(rand::random::<[u8; 16]>()),
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            image_len,
            chunk_size,
            compression: Compression::Zstd,
            encryption: "none".into(),
            base,
            image_format: None,
            crypto: None,
            origin: None,
            first_slot: None,
        }
    }

    /// Checks the fields a reader relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != HEADER_MAGIC {
            return Err(format!("format is {:?}, expected {HEADER_MAGIC:?}", self.format));
        }
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.version) {
            return Err(format!(
                "format version {} is not supported (this driveblk reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})",
                self.version
            ));
        }
        check_chunk_size(self.chunk_size)?;
        if self.image_len.div_ceil(self.chunk_size) > MAX_CHUNKS {
            return Err(format!("image length {} is more than {MAX_CHUNKS} chunks", self.image_len));
        }
        match (self.encryption.as_str(), &self.crypto) {
            ("none", None) => {}
            (super::crypto::CIPHER_NAME, Some(_)) => {}
            (e, _) => return Err(format!("encryption {e:?} is not supported, or its crypto field is missing")),
        }
        if self.volume_id.len() != 32 || hex::decode(&self.volume_id).is_err() {
            return Err(format!("volume_id {:?} is not 32 hex digits", self.volume_id));
        }
        if let Some(o) = &self.origin {
            let chain = o.chain();
            if chain.len() >= MAX_ORIGIN_DEPTH {
                return Err(format!("the fork chain is deeper than {MAX_ORIGIN_DEPTH}"));
            }
            if chain.iter().any(|o| o.volume_id.len() != 32 || hex::decode(&o.volume_id).is_err()) {
                return Err("an origin's volume_id is not 32 hex digits".into());
            }
        }
        Ok(())
    }

    /// Serialises as pretty JSON (the header is meant to be read by people).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("header serialises");
        v.push(b'\n');
        v
    }

    /// Parses and validates.
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if let Some(v) = newer_version(b, HEADER_MAGIC) {
            return Err(newer(v));
        }
        let h: Self = serde_json::from_slice(b).map_err(|e| format!("not valid JSON for a volume header: {e}"))?;
        h.validate()?;
        Ok(h)
    }
}

/// The format version a volume object (`magic`: its `format` field) says
/// it is in, when that is past what this binary reads. Only `{format,
/// version}` are read — of the whole object (the header), or of its first
/// line (a manifest, before its trailer) — so a newer layout of the rest
/// is told apart from damage.
pub fn newer_version(b: &[u8], magic: &str) -> Option<u32> {
    #[derive(Deserialize)]
    struct Versioned {
        format: String,
        version: u32,
    }
    let v: Versioned =
        serde_json::from_slice(b).ok().or_else(|| serde_json::from_slice(b.split(|&c| c == b'\n').next()?).ok())?;
    (v.format == magic && v.version > FORMAT_VERSION).then_some(v.version)
}

/// Why an object [`newer_version`] found newer is refused.
fn newer(version: u32) -> String {
    format!("written by a newer driveblk (format version {version}; this one reads up to {FORMAT_VERSION})")
}

/// Checks that a chunk size is a power of two within bounds.
pub fn check_chunk_size(cs: u64) -> Result<(), String> {
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(format!("chunk size {cs} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"));
    }
    Ok(())
}

/// Where one chunk's bytes come from in a generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkRef {
    /// All zeroes; nothing stored.
    Zero,
    /// The same byte range of the base image file.
    Base,
    /// A zstd frame inside a pack.
    Packed {
        /// Index into [`Manifest::packs`].
        pack: u32,
        /// Byte offset of the compressed frame in the pack.
        offset: u64,
        /// Compressed length.
        len: u64,
        /// [Digest](super::digest) of the uncompressed chunk (`sha256`
        /// in versions 1 and 2).
        #[serde(alias = "sha256")]
        digest: String,
    },
    /// Some pages changed over an earlier version of the chunk (`base`:
    /// zero, base or packed, never itself patched): one zstd frame in a
    /// pack holds the changed pages' bytes, in page order, for the page
    /// runs listed. A cold read is two ranged reads (base and patch). So
    /// thousands of scattered 4 KiB writes upload what changed, not whole
    /// chunks; a chunk whose patch grows large is written whole again.
    Patched {
        base: Box<ChunkRef>,
        /// Index into [`Manifest::packs`] of the patch frame's pack.
        pack: u32,
        offset: u64,
        len: u64,
        /// `[first page, page count]` runs of [`PATCH_PAGE`] bytes, sorted,
        /// not overlapping.
        runs: Vec<[u32; 2]>,
        /// [Digest](super::digest) of the whole chunk after patching.
        #[serde(alias = "sha256")]
        digest: String,
    },
}

/// Page size of patches.
pub const PATCH_PAGE: u64 = 4096;

impl ChunkRef {
    /// The digest of the chunk's bytes when the reference records it
    /// (packed and patched chunks).
    pub fn content_digest(&self) -> Option<&str> {
        match self {
            ChunkRef::Packed { digest, .. } | ChunkRef::Patched { digest, .. } => Some(digest),
            _ => None,
        }
    }

    /// True when two references name the same bytes (pack numbering
    /// differs between manifests, so stored chunks compare by hash).
    pub fn same_bytes(&self, other: &ChunkRef) -> bool {
        match (self.content_digest(), other.content_digest()) {
            (Some(a), Some(b)) => a == b,
            (None, None) => self == other,
            _ => false,
        }
    }
}

/// `gen-<N>`: the chunk map of one committed generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub volume_id: String,
    pub generation: u64,
    /// Image length in this generation.
    pub image_len: u64,
    pub chunk_size: u64,
    /// Pack keys referenced by `chunks`.
    pub packs: Vec<String>,
    /// In a full manifest, chunks not listed are [`ChunkRef::Base`] when
    /// the volume has a base, [`ChunkRef::Zero`] otherwise — so an attach
    /// writes an empty map and a sparse import lists only its data. In a
    /// delta, only the chunks that changed since `parent` are listed.
    pub chunks: BTreeMap<u64, ChunkRef>,
    /// Set when this object is a delta: it lists only what changed since
    /// generation `parent` (always `generation - 1`). Readers resolve a
    /// delta by applying the chain from the newest full manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// The slot of generation `generation + 1` (Drive: a pre-generated file
    /// id): whoever creates it first commits; everyone else is fenced out.
    /// `None` on stores whose keys are unique (the key is the fence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_slot: Option<Slot>,
    /// Who committed this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<Writer>,
    /// The writer lease as of this generation (`volume::lease`): who holds
    /// it. Absent: nobody (the volume was imported, or written by a build
    /// without leases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRecord>,
    /// Set once the base was adopted (copied into the volume folder):
    /// base chunks are read from that copy. A delta without it inherits
    /// its parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_copy: Option<BaseCopy>,
    /// key -> slot (Drive: file id) of objects this manifest names, so
    /// readers find them by identity, never waiting for a listing. A
    /// delta lists the ids it adds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ids: BTreeMap<String, Slot>,
    /// pack key -> where its sub-frame index lies (`subframe.rs`): packs
    /// listed here hold their whole chunks as sub-frames, so part of a chunk
    /// can be fetched and verified alone. A delta lists the packs it adds;
    /// readers that predate it read every chunk whole (the frames still
    /// decode as one zstd stream).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub indexes: BTreeMap<String, PackIndexRef>,
}

/// Where a pack's sub-frame index lies in it, and its sha256: the one hash
/// per pack that authenticates every sub-frame's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndexRef {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

/// Who holds a volume's writer lease: recorded in every manifest its
/// holder commits (taking it is a commit through the fence, so the chain of
/// generations orders holders), and in the holder's heartbeat object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub host: String,
    pub pid: u32,
    /// The holder's cache directory id (a restart of the same cache
    /// re-takes its own lease).
    pub cache_id: String,
    /// The generation whose commit took the lease.
    pub taken_at: u64,
    /// When it was taken, by the remote's clock (ms since the epoch), once
    /// known (the first heartbeat tells).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Silence (by the remote's clock) after which a holder with nothing
    /// pending counts as gone.
    pub ttl_ms: u64,
    /// The newest generation the holder committed or serves.
    pub generation: u64,
    /// Local changes not yet uploaded, bytes. While above zero the lease
    /// never expires.
    pub pending_bytes: u64,
    /// Set by a clean stop after a full sync (heartbeat only).
    #[serde(default)]
    pub released: bool,
}

/// Separates an origin volume's id from a pack key in a fork's pack table.
pub const ORIGIN_PACK_SEP: char = ':';

/// Splits a pack-table entry into (origin volume id, key): `None` for a
/// pack of the volume itself.
pub fn split_pack_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once(ORIGIN_PACK_SEP) {
        Some((vid, k)) => (Some(vid), k),
        None => (None, key),
    }
}

/// The volume's own copy of its base image (`driveblk adopt`): an object
/// in the volume's folder that base chunks are read from instead of the
/// original file, which may then be renamed, replaced or deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseCopy {
    /// Key of the copy in the volume folder (`base-<generation:020>`).
    pub key: String,
    /// Where it was created (Drive: its file id), so it is found by
    /// identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Slot>,
    pub size: u64,
    /// md5 of the copy as the store reported it; equals the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
}

/// Who committed a generation, and from which cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub host: String,
    pub pid: u32,
    /// The local cache that held the data (random id of its directory):
    /// lets a cache recognise generations it committed itself.
    pub cache_id: String,
    /// Commit time by the writer's clock, ms since the epoch (informative).
    pub unix_ms: u64,
}

impl Manifest {
    /// An empty manifest for `header`.
    pub fn new(header: &VolumeHeader, generation: u64) -> Self {
        Self {
            format: MANIFEST_MAGIC.into(),
            version: FORMAT_VERSION,
            volume_id: header.volume_id.clone(),
            generation,
            image_len: header.image_len,
            chunk_size: header.chunk_size,
            packs: Vec::new(),
            chunks: BTreeMap::new(),
            parent: None,
            next_slot: None,
            writer: None,
            lease: None,
            base_copy: None,
            ids: BTreeMap::new(),
            indexes: BTreeMap::new(),
        }
    }

    /// True for a delta over the previous generation.
    pub fn is_delta(&self) -> bool {
        self.parent.is_some()
    }

    /// Applies `delta` (generation `self.generation + 1`) to this resolved
    /// manifest, which becomes the resolved manifest of the delta's
    /// generation.
    pub fn apply(&mut self, delta: &Manifest) -> Result<(), String> {
        if delta.parent != Some(self.generation) || delta.generation != self.generation + 1 {
            return Err(format!(
                "generation {} is a delta over {:?}, expected one over {}",
                delta.generation, delta.parent, self.generation
            ));
        }
        for (idx, r) in &delta.chunks {
            let mut r = r.clone();
            self.intern(&mut r, &delta.packs);
            self.chunks.insert(*idx, r);
        }
        self.generation = delta.generation;
        self.image_len = delta.image_len;
        // The resolved map now holds what the delta's writer wrote: a full
        // manifest written from it must say that version, or binaries that
        // only read the older one take it for theirs and fail on its fields.
        self.version = self.version.max(delta.version);
        let n = self.chunk_count();
        self.chunks.retain(|&i, _| i < n);
        self.next_slot = delta.next_slot.clone();
        self.writer = delta.writer.clone();
        self.lease = delta.lease.clone();
        if delta.base_copy.is_some() {
            self.base_copy = delta.base_copy.clone();
        }
        self.ids.extend(delta.ids.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.indexes.extend(delta.indexes.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(())
    }

    /// Renumbers the pack references of `r` (numbered in `packs`) into
    /// this manifest's pack table, adding keys it lacks.
    fn intern(&mut self, r: &mut ChunkRef, packs: &[String]) {
        let mut map = |pack: &mut u32| {
            let key = &packs[*pack as usize];
            *pack = match self.packs.iter().position(|k| k == key) {
                Some(p) => p,
                None => {
                    self.packs.push(key.clone());
                    self.packs.len() - 1
                }
            } as u32;
        };
        match r {
            ChunkRef::Packed { pack, .. } => map(pack),
            ChunkRef::Patched { base, pack, .. } => {
                map(pack);
                if let ChunkRef::Packed { pack, .. } = &mut **base {
                    map(pack);
                }
            }
            _ => {}
        }
    }

    /// Drops packs no chunk refers to and renumbers the rest (a resolved
    /// manifest accumulates packs whose chunks were all rewritten).
    pub fn prune_packs(&mut self) {
        let mut used: Vec<Option<u32>> = vec![None; self.packs.len()];
        let mut packs = Vec::new();
        let old = &self.packs;
        let mut renumber = |pack: &mut u32| {
            let p = *pack as usize;
            *pack = *used[p].get_or_insert_with(|| {
                packs.push(old[p].clone());
                (packs.len() - 1) as u32
            });
        };
        for r in self.chunks.values_mut() {
            match r {
                ChunkRef::Packed { pack, .. } => renumber(pack),
                ChunkRef::Patched { base, pack, .. } => {
                    renumber(pack);
                    if let ChunkRef::Packed { pack, .. } = &mut **base {
                        renumber(pack);
                    }
                }
                _ => {}
            }
        }
        self.packs = packs;
        let copy = self.base_copy.as_ref().map(|c| c.key.clone());
        let packs = &self.packs;
        self.ids.retain(|k, _| packs.contains(k) || copy.as_ref() == Some(k));
        self.indexes.retain(|k, _| packs.contains(k));
    }

    /// Number of chunks covering the image.
    pub fn chunk_count(&self) -> u64 {
        self.image_len.div_ceil(self.chunk_size)
    }

    /// Where chunk `idx` comes from; chunks past the end are zero.
    pub fn chunk(&self, idx: u64, has_base: bool) -> ChunkRef {
        match self.chunks.get(&idx) {
            Some(r) => r.clone(),
            None if has_base && idx < self.chunk_count() => ChunkRef::Base,
            None => ChunkRef::Zero,
        }
    }

    /// Serialises: one line of compact JSON, then `sha256:<hex of that
    /// line>`. The trailer catches truncation and bit rot that would still
    /// parse as JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        seal(serde_json::to_vec(self).expect("manifest serialises"))
    }

    /// The generation a stored manifest says it is (read from its JSON
    /// line, before the trailer), for a copy kept under no generation's
    /// key; [`from_bytes`](Self::from_bytes) then checks it whole.
    pub fn generation_named(b: &[u8]) -> Option<u64> {
        serde_json::from_slice::<serde_json::Value>(b.split(|&c| c == b'\n').next().unwrap_or(&[]))
            .ok()
            .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
    }

    /// Verifies the trailer, parses, and checks the manifest against the
    /// volume header and the generation its key names.
    pub fn from_bytes(b: &[u8], header: &VolumeHeader, generation: u64) -> Result<Self, String> {
        if let Some(v) = newer_version(b, MANIFEST_MAGIC) {
            return Err(newer(v));
        }
        let body = unseal(b)?;
        let m: Self = serde_json::from_slice(body).map_err(|e| format!("not valid JSON for a manifest: {e}"))?;
        if m.format != MANIFEST_MAGIC || !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.version) {
            return Err(format!(
                "format {:?} version {} is not {MANIFEST_MAGIC:?} version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}",
                m.format, m.version
            ));
        }
        if m.parent.is_some_and(|p| p.checked_add(1) != Some(generation)) {
            return Err(format!("is a delta over generation {:?}, not over its predecessor", m.parent));
        }
        if m.volume_id != header.volume_id {
            return Err(format!("belongs to volume {}, not {}", m.volume_id, header.volume_id));
        }
        if m.generation != generation {
            return Err(format!("says generation {} but is stored as generation {generation}", m.generation));
        }
        if m.chunk_size != header.chunk_size {
            return Err(format!("chunk size {} differs from the header's {}", m.chunk_size, header.chunk_size));
        }
        for key in &m.packs {
            if let (Some(vid), _) = split_pack_key(key) {
                let known = header.origin.as_ref().is_some_and(|o| o.chain().iter().any(|o| o.volume_id == vid));
                if !known {
                    return Err(format!("pack {key:?} names volume {vid}, which is not an origin of this one"));
                }
            }
        }
        // A fork names its origin's copy as `<origin id>:base-*`.
        let copy_ok = |key: &str| match split_pack_key(key) {
            (None, k) => k.starts_with("base-"),
            (Some(vid), k) => {
                k.starts_with("base-")
                    && header.origin.as_ref().is_some_and(|o| o.chain().iter().any(|o| o.volume_id == vid))
            }
        };
        if m.base_copy.as_ref().is_some_and(|c| !copy_ok(&c.key)) || (m.base_copy.is_some() && header.base.is_none()) {
            return Err(
                "names a copy of a base, but the volume has none (or the copy's key is not base-*, or names a \
                 volume that is not an origin of this one)"
                    .into(),
            );
        }
        for (k, ix) in &m.indexes {
            if !m.packs.contains(k)
                || ix.len == 0
                || ix.len > super::subframe::MAX_INDEX
                || ix.offset.checked_add(ix.len).is_none()
                || ix.sha256.len() != 64
            {
                return Err(format!("pack index entry for {k:?} is implausible or names no listed pack"));
            }
        }
        let n = m.chunk_count();
        if n > MAX_CHUNKS {
            return Err(format!("image length {} is more than {MAX_CHUNKS} chunks", m.image_len));
        }
        for (idx, r) in &m.chunks {
            if *idx >= n {
                return Err(format!("chunk {idx} lies past the image end ({n} chunks)"));
            }
            m.check_ref(*idx, r, header, true)?;
        }
        Ok(m)
    }

    /// Checks one reference against the pack table and the header.
    fn check_ref(&self, idx: u64, r: &ChunkRef, header: &VolumeHeader, top: bool) -> Result<(), String> {
        let frame = |pack: u32, offset: u64, len: u64, digest: &str| {
            if pack as usize >= self.packs.len() {
                return Err(format!("chunk {idx} names pack #{pack}, but only {} packs are listed", self.packs.len()));
            }
            // The frame's end is computed for every read of it.
            if len == 0
                || len > 2 * self.chunk_size + 4096
                || !super::digest::is_valid(digest)
                || offset.checked_add(len).is_none()
            {
                return Err(format!(
                    "chunk {idx} has an implausible entry (offset {offset}, len {len}, digest {digest:?})"
                ));
            }
            Ok(())
        };
        match r {
            ChunkRef::Zero => Ok(()),
            ChunkRef::Base if header.base.is_none() => {
                Err(format!("chunk {idx} refers to a base, but the volume has none"))
            }
            ChunkRef::Base => Ok(()),
            ChunkRef::Packed { pack, offset, len, digest } => frame(*pack, *offset, *len, digest),
            ChunkRef::Patched { .. } if !top => Err(format!("chunk {idx} is a patch over a patch")),
            ChunkRef::Patched { base, pack, offset, len, runs, digest, .. } => {
                frame(*pack, *offset, *len, digest)?;
                self.check_ref(idx, base, header, false)?;
                let pages = self.chunk_size.div_ceil(PATCH_PAGE);
                let mut next = 0u64;
                for [first, count] in runs {
                    let (first, count) = (u64::from(*first), u64::from(*count));
                    if count == 0 || first < next || first + count > pages {
                        return Err(format!("chunk {idx} has a patch with bad page runs"));
                    }
                    next = first + count;
                }
                if runs.is_empty() {
                    return Err(format!("chunk {idx} has an empty patch"));
                }
                Ok(())
            }
        }
    }
}

/// Appends the `sha256:<hex>` trailer line to a one-line body (manifests,
/// profile indexes): it catches truncation and bit rot that would still
/// parse as JSON.
pub fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = hex::encode(Sha256::digest(&body));
    body.push(b'\n');
    body.extend_from_slice(b"sha256:");
    body.extend_from_slice(sum.as_bytes());
    body.push(b'\n');
    body
}

/// Checks the trailer [`seal`] added and returns the body.
pub fn unseal(b: &[u8]) -> Result<&[u8], String> {
    let text = b.strip_suffix(b"\n").ok_or("truncated: missing final newline")?;
    let split = text.iter().rposition(|&c| c == b'\n').ok_or("truncated: missing sha256 trailer line")?;
    let (body, trailer) = (&text[..split], &text[split + 1..]);
    let want = trailer.strip_prefix(b"sha256:").ok_or("malformed sha256 trailer line")?;
    let got = hex::encode(Sha256::digest(body));
    if want != got.as_bytes() {
        return Err(format!("checksum mismatch (trailer {}, content hashes to {got})", String::from_utf8_lossy(want)));
    }
    Ok(body)
}

/// Key of generation `n`'s manifest; zero-padded so keys sort by number.
pub fn gen_key(n: u64) -> String {
    format!("{GEN_PREFIX}{n:020}")
}

/// Parses a manifest key back into its generation number.
pub fn parse_gen_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(GEN_PREFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A fresh pack key for generation `generation`: sortable by generation,
/// random within it so an aborted upload never collides with its retry.
pub fn new_pack_key(generation: u64) -> String {
    format!("{PACK_PREFIX}{generation:020}-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// True for keys of objects written once and never replaced (packs and
/// boot profile packs, each named with random bits): their byte ranges may
/// be kept and shared by key (`remote::shared`).
pub fn is_immutable_key(key: &str) -> bool {
    key.starts_with(PACK_PREFIX) || (key.starts_with(super::profile::PROFILE_PREFIX) && key.ends_with(".pack"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_roundtrip_and_corruption() {
        let h = VolumeHeader::new(10 << 20, DEFAULT_CHUNK_SIZE, None);
        let mut m = Manifest::new(&h, 3);
        m.packs.push(new_pack_key(3));
        m.chunks.insert(2, ChunkRef::Packed { pack: 0, offset: 0, len: 10, digest: "a".repeat(64) });
        m.chunks.insert(4, ChunkRef::Zero);
        let b = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&b, &h, 3).unwrap(), m);
        assert!(Manifest::from_bytes(&b, &h, 4).is_err());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(Manifest::from_bytes(&bad, &h, 3).unwrap_err().contains("checksum"));
        assert!(Manifest::from_bytes(&b[..b.len() - 10], &h, 3).is_err());
        assert_eq!(m.chunk(2, false), m.chunks[&2]);
        assert_eq!(m.chunk(3, true), ChunkRef::Base);
        assert_eq!(m.chunk(3, false), ChunkRef::Zero);
        assert_eq!(parse_gen_key(&gen_key(42)), Some(42));
        assert_eq!(parse_gen_key("gen-12"), None);
        assert!(gen_key(9) < gen_key(10));
    }

    #[test]
    fn deltas_apply_and_patched_chunks_keep_their_packs() {
        let h = VolumeHeader::new(8 << 20, DEFAULT_CHUNK_SIZE, None);
        let mut full = Manifest::new(&h, 1);
        full.packs = vec!["pack-a".into(), "pack-b".into()];
        let sha = |c: char| c.to_string().repeat(64);
        full.chunks.insert(0, ChunkRef::Packed { pack: 1, offset: 0, len: 10, digest: sha('a') });
        full.chunks.insert(1, ChunkRef::Packed { pack: 0, offset: 5, len: 10, digest: sha('b') });
        let mut d = Manifest::new(&h, 2);
        d.parent = Some(1);
        d.packs = vec!["pack-c".into(), "pack-b".into()];
        d.chunks.insert(
            0,
            ChunkRef::Patched {
                base: Box::new(ChunkRef::Packed { pack: 1, offset: 0, len: 10, digest: sha('a') }),
                pack: 0,
                offset: 0,
                len: 7,
                runs: vec![[0, 1], [5, 2]],
                digest: sha('c'),
            },
        );
        d.chunks.insert(1, ChunkRef::Zero);
        let b = d.to_bytes();
        let parsed = Manifest::from_bytes(&b, &h, 2).unwrap();
        assert_eq!(parsed, d);
        assert!(Manifest::from_bytes(&b, &h, 3).is_err(), "a delta must sit on its predecessor");
        full.apply(&parsed).unwrap();
        assert_eq!(full.generation, 2);
        full.prune_packs();
        // pack-a is no longer referenced; the patch's base still points at pack-b.
        let mut keys = full.packs.clone();
        keys.sort();
        assert_eq!(keys, vec!["pack-b".to_string(), "pack-c".to_string()]);
        match &full.chunks[&0] {
            ChunkRef::Patched { base, pack, .. } => {
                assert_eq!(full.packs[*pack as usize], "pack-c");
                match **base {
                    ChunkRef::Packed { pack, .. } => assert_eq!(full.packs[pack as usize], "pack-b"),
                    ref r => panic!("{r:?}"),
                }
            }
            r => panic!("{r:?}"),
        }
        assert!(full.chunks[&0].same_bytes(&ChunkRef::Packed { pack: 9, offset: 1, len: 1, digest: sha('c') }));
        // Bad runs are refused.
        let mut bad = parsed.clone();
        if let Some(ChunkRef::Patched { runs, .. }) = bad.chunks.get_mut(&0) {
            *runs = vec![[5, 2], [0, 1]];
        }
        assert!(Manifest::from_bytes(&bad.to_bytes(), &h, 2).unwrap_err().contains("page runs"));
    }

    /// A frame or pack index whose end does not fit in 64 bits (a hostile
    /// or damaged manifest) is refused when the manifest is read, not
    /// overflowed when the frame is.
    #[test]
    fn frame_ends_must_not_overflow() {
        let h = VolumeHeader::new(4 << 20, DEFAULT_CHUNK_SIZE, None);
        let mut m = Manifest::new(&h, 1);
        m.packs.push(new_pack_key(1));
        m.chunks.insert(0, ChunkRef::Packed { pack: 0, offset: u64::MAX - 5, len: 10, digest: "a".repeat(64) });
        assert!(Manifest::from_bytes(&m.to_bytes(), &h, 1).unwrap_err().contains("implausible"));
        m.chunks.insert(0, ChunkRef::Packed { pack: 0, offset: 0, len: 10, digest: "a".repeat(64) });
        assert_eq!(Manifest::from_bytes(&m.to_bytes(), &h, 1).unwrap(), m);
        let k = m.packs[0].clone();
        m.indexes.insert(k, PackIndexRef { offset: u64::MAX, len: 10, sha256: "b".repeat(64) });
        assert!(Manifest::from_bytes(&m.to_bytes(), &h, 1).unwrap_err().contains("implausible"));
    }

    #[test]
    fn fork_pack_entries_must_name_an_origin() {
        let mut h = VolumeHeader::new(4 << 20, DEFAULT_CHUNK_SIZE, None);
        let origin = "ab".repeat(16);
        let mut m = Manifest::new(&h, 1);
        m.packs.push(format!("{origin}:{}", new_pack_key(3)));
        m.chunks.insert(0, ChunkRef::Packed { pack: 0, offset: 0, len: 10, digest: "a".repeat(64) });
        let b = m.to_bytes();
        assert!(Manifest::from_bytes(&b, &h, 1).unwrap_err().contains("not an origin"));
        h.origin = Some(OriginRef { url: "dir:/o".into(), volume_id: origin.clone(), generation: 3, origin: None });
        assert_eq!(Manifest::from_bytes(&b, &h, 1).unwrap(), m);
        assert_eq!(split_pack_key(&m.packs[0]), (Some(origin.as_str()), &m.packs[0][33..]));
        assert_eq!(split_pack_key("pack-1"), (None, "pack-1"));
        assert_eq!(VolumeHeader::from_bytes(&h.to_bytes()).unwrap(), h);
        let mut bad = h.clone();
        bad.origin.as_mut().unwrap().volume_id = "x".into();
        assert!(VolumeHeader::from_bytes(&bad.to_bytes()).is_err());
    }

    #[test]
    fn header_validation() {
        let h = VolumeHeader::new(1, DEFAULT_CHUNK_SIZE, None);
        assert_eq!(VolumeHeader::from_bytes(&h.to_bytes()).unwrap(), h);
        let mut h2 = h.clone();
        h2.version = 99;
        assert!(VolumeHeader::from_bytes(&h2.to_bytes()).unwrap_err().contains("version 99"));
        assert!(VolumeHeader::from_bytes(b"{").is_err());
        assert!(check_chunk_size(3 << 20).is_err());
    }

    #[test]
    fn a_full_manifest_resolved_over_newer_deltas_says_their_version() {
        let h = VolumeHeader::new(8 << 20, DEFAULT_CHUNK_SIZE, None);
        // A volume imported by a version 2 binary, then written by this one.
        let mut full = Manifest::new(&h, 1);
        full.version = 2;
        let mut d = Manifest::new(&h, 2);
        d.parent = Some(1);
        d.chunks.insert(0, ChunkRef::Zero);
        full.apply(&d).unwrap();
        assert_eq!(full.version, FORMAT_VERSION, "a full checkpoint written from it would claim version 2");
    }

    #[test]
    fn an_object_of_a_newer_version_is_refused_as_newer_before_its_fields_are_read() {
        let h = VolumeHeader::new(1 << 20, DEFAULT_CHUNK_SIZE, None);
        let newer = FORMAT_VERSION + 1;
        // A newer layout: fields this one requires are missing, others added.
        let m = seal(format!(r#"{{"format":"{MANIFEST_MAGIC}","version":{newer},"generation":1,"map":{{}}}}"#).into());
        let e = Manifest::from_bytes(&m, &h, 1).unwrap_err();
        assert!(e.contains("newer driveblk") && e.contains(&format!("format version {newer}")), "{e}");
        assert_eq!(newer_version(&m, MANIFEST_MAGIC), Some(newer));
        let hb = format!("{{\n  \"format\": \"{HEADER_MAGIC}\",\n  \"version\": {newer},\n  \"id\": \"x\"\n}}\n");
        let e = VolumeHeader::from_bytes(hb.as_bytes()).unwrap_err();
        assert!(e.contains("newer driveblk"), "{e}");
        // This version, or another object's magic, is not newer.
        assert_eq!(newer_version(&Manifest::new(&h, 1).to_bytes(), MANIFEST_MAGIC), None);
        assert_eq!(newer_version(&m, HEADER_MAGIC), None);
    }
}
