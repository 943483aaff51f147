//! The SSD tier's state file: its format and versions, and reading it
//! back (checksum, header, the state map, page bitmaps, then the journal
//! records after its checkpoint). A state file is one JSON header line,
//! a state byte per chunk, the bitmaps of partial chunks, and a SHA-256 of
//! all that.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::bitmap::{bit, bitmap_words, popcount, Bitmap};
use super::{has_bitmap, CacheIdentity, ABSENT, DIRTY, PAGE, PARTIAL, ZERO_DIRTY};
use crate::tier::journal::{Journal, Logged, Record};
use crate::volume::format::MAX_CHUNKS;

pub(super) const STATE_MAGIC: &str = "driveblk-cache";
/// Version 2 added partial chunks and their page bitmaps; version 3 keyed
/// the cache by volume alone (the generation its clean chunks match is a
/// field, so committing a generation keeps the cache) and gave each cache
/// directory an id. Version 4 is an encrypted cache (`sealed`), so older
/// binaries refuse it rather than read ciphertext as data. Versions 1 to
/// 4 are still read. Version 5 is a plain cache whose journal may carry
/// guest writes (journal.rs), and version 6 an encrypted one whose journal
/// may carry them as stored (ciphertext pages): older binaries refuse
/// them rather than replay the map without the writes. Version 7 is
/// either, written while the directory holds a record of changed pages
/// (`dirty_pages.rs`): a binary that does not know that record would
/// write into the dirty chunks without removing it, and the next start
/// would then upload patches that leave those pages out, so older
/// binaries refuse it. Version 8 is an encrypted cache whose data file's
/// key derives from another id than its own (`key_id`: a copy of another
/// cache directory, place.rs): older binaries would derive the key from
/// `cache_id` and read its pages as garbage, so they refuse it.
///
/// A state of a version past this one is a newer driveblk's: its header
/// line is read first, before the checksum, and it is refused as such
/// (`Unusable::Newer`), never as damaged (which points at `discard-local`).
///
/// Where the directory was when the state was written (`machine`,
/// `dir_inode`, `dir_subvol`) and what it was found to be a copy of (`copy_of`) are
/// optional fields of any version: an older binary ignores them (and
/// drops them at its next checkpoint), a state without them is taken as
/// written here and gets them at the next one.
pub(super) const STATE_VERSION: u32 = 8;
/// The version a plain cache writes.
pub(super) const PLAIN_VERSION: u32 = 5;
/// The version an encrypted cache writes.
pub(super) const SEALED_VERSION: u32 = 6;
/// The version either writes while a record of changed pages may exist.
pub(super) const PAGES_KEPT_VERSION: u32 = 7;
/// The version an encrypted cache writes whose data key derives from
/// `key_id` (a copy of another cache), whatever else holds.
pub(super) const KEY_APART_VERSION: u32 = 8;

/// The version a cache writes: plain or sealed, or while a record of
/// changed pages may exist the one binaries that predate it refuse, or,
/// for an encrypted copy of another cache, the one binaries that would
/// derive its key wrongly refuse.
pub(super) fn version(sealed: bool, pages_kept: bool, key_apart: bool) -> u32 {
    if key_apart {
        KEY_APART_VERSION
    } else if pages_kept {
        PAGES_KEPT_VERSION
    } else if sealed {
        SEALED_VERSION
    } else {
        PLAIN_VERSION
    }
}

/// The state file's header line.
#[derive(Serialize, Deserialize)]
pub(super) struct StateHeader {
    pub(super) format: String,
    pub(super) version: u32,
    #[serde(flatten)]
    pub(super) id: CacheIdentity,
    /// The generation whose bytes the clean and partial chunks hold.
    pub(super) generation: u64,
    /// Random id of this cache directory (version 3); manifests name the
    /// cache that committed them.
    #[serde(default)]
    pub(super) cache_id: String,
    /// Local image length (grows when the guest's image file grows).
    pub(super) image_len: u64,
    pub(super) chunks: u64,
    /// Partial chunks, whose bitmaps follow the state bytes (version 2).
    #[serde(default)]
    pub(super) partial: u64,
    /// Id of this checkpoint: journal records that follow it name it.
    #[serde(default)]
    pub(super) checkpoint: u64,
    /// The data file's encryption (cache_crypto.rs), "" for plaintext.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) sealed: String,
    /// Which machine wrote this state (place.rs: a hash of its machine
    /// id); "" in states written before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) machine: String,
    /// The inode of the cache directory this state was written in (0:
    /// not recorded). Its device is left out: device numbers may change
    /// across reboots, a directory's inode does not.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) dir_inode: u64,
    /// The btrfs subvolume of that directory (0: not btrfs, or not
    /// recorded): a snapshot keeps the directory's inode, not this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(super) dir_subvol: u64,
    /// The id of the cache this directory was found to be a copy of, for
    /// the lease's refusal ("" when it is not known to be one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) copy_of: String,
    /// For an encrypted cache found to be a copy: the id its data file's
    /// key derives from (the original's; the pages are its ciphertext).
    /// "" when that is `cache_id`. Only in version 8.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(super) key_id: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A parsed state file.
pub(super) struct Loaded {
    pub(super) header: StateHeader,
    pub(super) states: Vec<u8>,
    pub(super) maps: HashMap<u64, Bitmap>,
    /// Guest writes the journal carried, in order, to write again.
    pub(super) writes: Vec<Logged>,
}

/// The bytes of a state file: `header`, a byte per chunk, the bitmaps of
/// the partial chunks in chunk order, and the checksum of all that.
pub(super) fn encode(header: &StateHeader, states: &[u8], maps: &HashMap<u64, Bitmap>) -> io::Result<Vec<u8>> {
    let words = bitmap_words(header.id.chunk_size);
    let mut body = serde_json::to_vec(header).map_err(io::Error::other)?;
    body.push(b'\n');
    body.extend_from_slice(states);
    let mut partial: Vec<_> = maps.iter().collect();
    partial.sort_unstable_by_key(|(idx, _)| **idx);
    for (idx, m) in partial {
        body.extend_from_slice(&idx.to_le_bytes());
        for w in m.iter().chain(std::iter::repeat(&0)).take(words) {
            body.extend_from_slice(&w.to_le_bytes());
        }
    }
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    Ok(body)
}

/// Why a state file cannot be used.
#[derive(Debug)]
pub(super) enum Unusable {
    /// A newer driveblk wrote it (its version is past [`STATE_VERSION`]):
    /// nothing is wrong with it, this binary cannot read it.
    Newer(u32),
    /// It is damaged, or does not hold what its header says.
    Damaged(String),
}

/// The version a state file's header line names when it is past
/// [`STATE_VERSION`]. Read before the checksum and the rest: a newer
/// binary may lay out what follows differently.
fn newer_version(b: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Versioned {
        format: String,
        version: u32,
    }
    let line = b.split(|&c| c == b'\n').next()?;
    let v: Versioned = serde_json::from_slice(line).ok()?;
    (v.format == STATE_MAGIC && v.version > STATE_VERSION).then_some(v.version)
}

/// Reads the state file at `path` and the journal beside it; `None` when
/// there is no state file, `Err(why)` when it cannot be used.
pub(super) fn read_state(path: &Path) -> Result<Option<Loaded>, Unusable> {
    read_state_with(path, Journal::replay)
}

/// [`read_state`] with `replay` reading the journal.
pub(super) fn read_state_with(path: &Path, replay: Replay) -> Result<Option<Loaded>, Unusable> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Unusable::Damaged(format!("cannot read state file: {e}"))),
    };
    if let Some(v) = newer_version(&b) {
        return Err(Unusable::Newer(v));
    }
    parse(path, &b, replay).map(Some).map_err(Unusable::Damaged)
}

/// Reads the journal of a cache directory: the records after a checkpoint.
pub(super) type Replay = fn(&Path, u64, usize) -> Result<Vec<Record>, String>;

/// Parses the state file `b` read from `path`, and applies the journal.
fn parse(path: &Path, b: &[u8], replay: Replay) -> Result<Loaded, String> {
    if b.len() < 33 {
        return Err("state file is truncated".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("state file checksum mismatch".into());
    }
    let nl = body.iter().position(|&c| c == b'\n').ok_or("state file has no header line")?;
    let h: StateHeader = serde_json::from_slice(&body[..nl]).map_err(|e| format!("state header: {e}"))?;
    if h.format != STATE_MAGIC || !(1..=STATE_VERSION).contains(&h.version) {
        return Err(format!(
            "state file is {:?} version {}, expected {STATE_MAGIC:?} version 1 to {STATE_VERSION}",
            h.format, h.version
        ));
    }
    if h.id.chunk_size == 0 {
        return Err("state file has chunk size 0".into());
    }
    if !h.key_id.is_empty() && (h.version < KEY_APART_VERSION || h.sealed.is_empty()) {
        return Err(format!(
            "state file version {} names a data key id, which only encrypted version 8 may",
            h.version
        ));
    }
    let rest = &body[nl + 1..];
    // Before version 3 a cache was tied to one generation and had no id,
    // and no chunk was dirty in part.
    let max_state = match h.version {
        1 => DIRTY,
        2 => PARTIAL,
        _ => ZERO_DIRTY,
    };
    if h.image_len.div_ceil(h.id.chunk_size) > MAX_CHUNKS || h.chunks > MAX_CHUNKS {
        return Err(format!("state file claims an image of {} bytes, more than {MAX_CHUNKS} chunks", h.image_len));
    }
    if h.chunks > rest.len() as u64 {
        return Err("state map does not match its header".into());
    }
    let (states, mut bitmaps) = rest.split_at(h.chunks as usize);
    if states.iter().any(|&s| s > max_state) {
        return Err("state map does not match its header".into());
    }
    let partial = states.iter().filter(|&&s| has_bitmap(s)).count() as u64;
    if partial != h.partial {
        return Err(format!("state map has {partial} partial chunks, its header says {}", h.partial));
    }
    let words = bitmap_words(h.id.chunk_size);
    let entry = 8 + 8 * words as u64;
    if Some(bitmaps.len() as u64) != partial.checked_mul(entry) {
        return Err(format!("page bitmaps are {} bytes, expected {partial} of {entry}", bitmaps.len()));
    }
    let pages = h.id.chunk_size.div_ceil(PAGE);
    let mut maps = HashMap::with_capacity(partial as usize);
    let mut prev = None;
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    while !bitmaps.is_empty() {
        let (e, tail) = bitmaps.split_at(entry as usize);
        bitmaps = tail;
        let idx = u64_at(e, 0);
        if prev.is_some_and(|p| idx <= p) || !states.get(idx as usize).is_some_and(|&s| has_bitmap(s)) {
            return Err(format!("page bitmap for chunk {idx}, which is not partial (or out of order)"));
        }
        prev = Some(idx);
        let m: Bitmap = (0..words).map(|w| u64_at(e, 1 + w)).collect();
        if popcount(&m) == 0 {
            return Err(format!("partial chunk {idx} has no pages"));
        }
        if (pages..words as u64 * 64).any(|p| bit(&m, p)) {
            return Err(format!("page bitmap of chunk {idx} has bits past the chunk's last page"));
        }
        maps.insert(idx, m);
    }
    let mut l = Loaded { header: h, states: states.to_vec(), maps, writes: Vec::new() };
    if let Some(dir) = path.parent() {
        let records = replay(dir, l.header.checkpoint, words)?;
        apply_journal(&mut l, records)?;
    }
    Ok(l)
}

/// Applies the journal records that follow the checkpoint `l` was read from.
fn apply_journal(l: &mut Loaded, records: Vec<Record>) -> Result<(), String> {
    let cs = l.header.id.chunk_size;
    let pages = cs.div_ceil(PAGE);
    let words = bitmap_words(cs);
    for rec in records {
        // A record of logged writes alone changes no map field.
        if !rec.changes.is_empty() || rec.writes.is_empty() {
            let chunks = rec.image_len.div_ceil(cs);
            if chunks > MAX_CHUNKS {
                return Err("journal record with an implausible image length".into());
            }
            if (l.states.len() as u64) < chunks {
                l.states.resize(chunks as usize, ABSENT);
            }
            for c in rec.changes {
                let ok = c.state <= ZERO_DIRTY
                    && has_bitmap(c.state) == c.bitmap.is_some()
                    && (c.idx as usize) < l.states.len()
                    && c.bitmap
                        .as_ref()
                        .is_none_or(|m| popcount(m) > 0 && !(pages..words as u64 * 64).any(|p| bit(m, p)));
                if !ok {
                    return Err(format!("journal record for chunk {} does not fit the map", c.idx));
                }
                l.states[c.idx as usize] = c.state;
                match c.bitmap {
                    Some(m) => {
                        l.maps.insert(c.idx, m);
                    }
                    None => {
                        l.maps.remove(&c.idx);
                    }
                }
            }
            l.header.generation = rec.generation;
            l.header.image_len = rec.image_len;
        }
        let end = l.states.len() as u64 * cs;
        if rec.writes.iter().any(|w| w.at.checked_add(w.bytes.len() as u64).is_none_or(|e| e > end)) {
            return Err("journal record writes past the map".into());
        }
        l.writes.extend(rec.writes);
    }
    Ok(())
}
