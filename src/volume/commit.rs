//! Committing a generation: the changed chunks go up in packs first, then
//! the manifest is created with the fence (create-if-absent at the slot its
//! parent named), so two writers can never both commit generation N+1 and
//! a retried commit whose reply was lost recognises its own.
//!
//! A generation is written as a delta over its parent (O(change), not
//! O(image)); every [`CommitOptions::checkpoint_every`] generations, or
//! when a delta would be large anyway, as a full manifest, so a reader
//! resolves at most that many deltas.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::digest;
use super::format::{
    gen_key, new_pack_key, parse_gen_key, ChunkRef, LeaseRecord, Manifest, VolumeHeader, Writer, GEN_PREFIX, PATCH_PAGE,
};
use super::pack::{extract_patch, PackWriter};
use super::{VolumeError, VolumeResult};
use crate::remote::{content_tag, DynRemote, ObjectMeta, PutBody, RemoteError, RemoteResult};

/// How generations are packed and written.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// A pack is uploaded once it reaches this many bytes: few, large
    /// objects suit a cloud drive (request quotas, item limits).
    pub pack_size: u64,
    /// Packs uploading at once.
    pub parallel_uploads: usize,
    /// Every this many generations the manifest is written in full.
    pub checkpoint_every: u64,
}

impl Default for CommitOptions {
    /// Four 16 MiB uploads at once: with a round trip per request (Drive's
    /// resumable chunks), two 32 MiB uploads left a 100 ms / 200 Mbit/s
    /// link idle 17% of the time (scripts/bench-drive.sh); the bytes in
    /// flight stay 64 MiB.
    fn default() -> Self {
        Self { pack_size: 16 << 20, parallel_uploads: 4, checkpoint_every: 16 }
    }
}

/// A patch goes up instead of the whole chunk while it covers at most
/// this share of the chunk's pages (1/MAX_PATCH_SHARE); past it, the chunk
/// is written whole again (compaction).
const MAX_PATCH_SHARE: u64 = 4;

/// Whether chunk changes `changed` (a page bitmap) over its parent version
/// `old` go up as a patch: returns the patch's base and its page runs
/// (merged with `old`'s own patch, so reads stay two ranged reads), or
/// None when the chunk should be written whole.
fn patch_plan(old: &ChunkRef, changed: &[u64], chunk_len: usize) -> Option<(ChunkRef, Vec<[u32; 2]>)> {
    let pages = (chunk_len as u64).div_ceil(PATCH_PAGE);
    let mut set: Vec<bool> =
        (0..pages).map(|p| changed.get((p / 64) as usize).is_some_and(|w| (w >> (p % 64)) & 1 == 1)).collect();
    let base = match old {
        ChunkRef::Patched { base, runs, .. } => {
            for [first, count] in runs {
                for p in *first..first + count {
                    if let Some(b) = set.get_mut(p as usize) {
                        *b = true;
                    }
                }
            }
            (**base).clone()
        }
        r => r.clone(),
    };
    let n = set.iter().filter(|&&b| b).count() as u64;
    if n == 0 || n * MAX_PATCH_SHARE > pages {
        return None;
    }
    let mut runs: Vec<[u32; 2]> = Vec::new();
    for (p, _) in set.iter().enumerate().filter(|(_, &b)| b) {
        match runs.last_mut() {
            Some([first, count]) if *first + *count == p as u32 => *count += 1,
            _ => runs.push([p as u32, 1]),
        }
    }
    Some((base, runs))
}

/// What a commit uploaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Chunks whose bytes were packed whole.
    pub chunks_packed: u64,
    /// Chunks uploaded as a patch of their changed pages.
    pub chunks_patched: u64,
    /// Chunks recorded as zero (nothing uploaded).
    pub chunks_zero: u64,
    /// Chunks whose bytes equal the parent's (nothing uploaded).
    pub chunks_unchanged: u64,
    /// Chunks an earlier attempt at this generation had uploaded already
    /// (nothing uploaded again; see [`Uploaded`]).
    pub chunks_resumed: u64,
    /// Bytes of packs uploaded.
    pub pack_bytes: u64,
    /// Packs uploaded.
    pub packs: u64,
    /// Bytes of the manifest object.
    pub manifest_bytes: u64,
    /// Whether the manifest was written in full.
    pub full: bool,
}

/// Chunks uploaded for a generation that was never committed (its commit
/// failed, or the process stopped first). A later attempt reuses each
/// chunk whose bytes are still those uploaded instead of uploading it
/// again, so a long upload on a slow link that is cut short resumes where
/// it was. A pack is reused only once the remote says it is still there,
/// and only while `gc` must spare it whatever its grace period:
/// - named for a generation newer than the parent: gc never deletes those
///   (a writer's upload about to be committed);
/// - or named for a generation that this cache, and only it, committed
///   since (the writer lease it takes at each start, or gives back at a
///   stop, is a generation), and created less than [`RESUME_WINDOW`] ago
///   by the remote's clock: gc spares such a pack for [`RESUME_SPARED`]
///   by that clock (`gc::writers_own_run`). Since the rest of the upload
///   may take arbitrarily long (a laptop suspended mid-upload), each
///   reused pack is checked again right before the create.
///
/// A pack a generation in the cache's run names is never reused, even if
/// the record still lists it (a process killed between a commit and
/// forgetting its record): it is committed, and gc spares only packs no
/// generation references.
///
/// Held as a delta manifest of the generation attempted over its parent,
/// listing only chunks whose packs landed; shared between a store's
/// attempts and kept in its cache directory across restarts.
#[derive(Clone, Debug, Default)]
pub struct Uploaded {
    record: Arc<parking_lot::Mutex<Option<Manifest>>>,
    /// Woken each time a pack's chunks are recorded.
    grew: Arc<tokio::sync::Notify>,
}

impl Uploaded {
    /// What to keep for the next process, if anything was uploaded.
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        self.record.lock().as_ref().filter(|m| !m.chunks.is_empty()).map(Manifest::to_bytes)
    }

    /// Returns once more chunks have been recorded (at once if some were
    /// since the last call), so the record can be kept as it grows.
    pub async fn grown(&self) {
        self.grew.notified().await
    }

    /// Takes back what [`to_bytes`](Self::to_bytes) kept, checked against
    /// `header`.
    pub fn restore(&self, b: &[u8], header: &VolumeHeader) -> Result<(), String> {
        let generation = Manifest::generation_named(b).ok_or("no generation")?;
        *self.record.lock() = Some(Manifest::from_bytes(b, header, generation)?);
        Ok(())
    }

    /// The generation the chunks were uploaded for, and how many there are.
    pub fn summary(&self) -> Option<(u64, usize)> {
        self.record.lock().as_ref().map(|m| (m.generation, m.chunks.len()))
    }

    /// The lowest generation a pack holding a recorded frame was written
    /// for (a patch's base is the parent's, not the upload's).
    pub fn lowest_pack_generation(&self) -> Option<u64> {
        let u = self.record.lock();
        let m = u.as_ref()?;
        m.chunks
            .values()
            .filter_map(|r| match r {
                ChunkRef::Packed { pack, .. } | ChunkRef::Patched { pack, .. } => m.packs.get(*pack as usize),
                _ => None,
            })
            .filter_map(|k| super::history::pack_generation(k))
            .min()
    }

    /// Forgets everything (the generation was committed, or will never be).
    pub fn clear(&self) {
        *self.record.lock() = None;
    }
}

/// How long after its upload a pack not committed may still be reused
/// when gc no longer spares it by its name (see [`Uploaded`]).
pub const RESUME_WINDOW: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// How long gc spares a pack a writer may still reuse (see [`Uploaded`]):
/// [`RESUME_WINDOW`] plus the rest of an upload, and hours of clock skew.
pub const RESUME_SPARED: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How long a listing of the generations made before a commit's create
/// still counts for its gap check ([`GenerationBuilder::commit`]), by the
/// wall clock (which, unlike the monotonic clock, runs on while a laptop
/// is suspended).
const LISTING_FRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// The index of pack `key` in `table` (added if new).
fn pack_index(table: &mut Vec<String>, key: &str) -> u32 {
    match table.iter().position(|k| k == key) {
        Some(p) => p as u32,
        None => {
            table.push(key.to_string());
            (table.len() - 1) as u32
        }
    }
}

/// `r` (packs indexed in `from`) with its packs indexed in `to`.
fn reindex(r: &ChunkRef, from: &[String], to: &mut Vec<String>) -> ChunkRef {
    let mut r = r.clone();
    if let ChunkRef::Patched { base, pack, .. } = &mut r {
        *pack = pack_index(to, &from[*pack as usize]);
        if let ChunkRef::Packed { pack, .. } = base.as_mut() {
            *pack = pack_index(to, &from[*pack as usize]);
        }
    } else if let ChunkRef::Packed { pack, .. } = &mut r {
        *pack = pack_index(to, &from[*pack as usize]);
    }
    r
}

/// Builds generation `parent.generation + 1`.
pub struct GenerationBuilder {
    remote: DynRemote,
    url: String,
    header: VolumeHeader,
    parent: Arc<Manifest>,
    has_base: bool,
    delta: Manifest,
    pack: PackWriter,
    uploads: JoinSet<VolumeResult<ObjectMeta>>,
    sem: Arc<Semaphore>,
    opts: CommitOptions,
    stats: CommitStats,
    /// Index in `delta.packs` of the pack being filled.
    current: u32,
    /// Where chunks uploaded for this generation are recorded as their
    /// packs land, and found again by a later attempt.
    uploaded: Option<Uploaded>,
    /// Pack key -> the chunks framed into it, until it lands.
    in_pack: std::collections::HashMap<String, Vec<u64>>,
    /// Packs of `uploaded` checked on the remote: whether they may be reused.
    checked: std::collections::HashMap<String, bool>,
    /// See [`resume`](Self::resume).
    own_since: u64,
    /// See [`resume`](Self::resume).
    committed: std::collections::HashSet<String>,
    /// The remote's clock, read once for [`young`](Self::young).
    remote_now: Option<u64>,
    /// A listing of `gen-*` the caller made, and when by the wall clock
    /// (see [`generations_listed`](Self::generations_listed)).
    listed: Option<(RemoteResult<Vec<ObjectMeta>>, std::time::SystemTime)>,
}

impl GenerationBuilder {
    /// A builder of the generation after `parent` (a resolved manifest).
    pub fn new(
        remote: DynRemote,
        url: &str,
        header: &VolumeHeader,
        parent: Arc<Manifest>,
        has_base: bool,
        opts: CommitOptions,
    ) -> Self {
        let mut delta = Manifest::new(header, parent.generation + 1);
        delta.parent = Some(parent.generation);
        delta.image_len = parent.image_len;
        Self {
            remote,
            url: url.to_string(),
            header: header.clone(),
            sem: Arc::new(Semaphore::new(opts.parallel_uploads.max(1))),
            parent,
            has_base,
            delta,
            pack: PackWriter::indexed(header.chunk_size),
            uploads: JoinSet::new(),
            opts,
            stats: CommitStats::default(),
            current: 0,
            uploaded: None,
            in_pack: Default::default(),
            checked: Default::default(),
            own_since: u64::MAX,
            committed: Default::default(),
            remote_now: None,
            listed: None,
        }
    }

    /// Records the chunks this attempt uploads in `uploaded` as their packs
    /// land, and reuses those an earlier attempt left there. `own_since`:
    /// generations `own_since..=parent` were all committed by this cache
    /// (`parent + 1` when the parent was not); `committed`: the packs those
    /// generations' objects name, never reused.
    pub fn resume(&mut self, uploaded: &Uploaded, own_since: u64, committed: std::collections::HashSet<String>) {
        self.uploaded = Some(uploaded.clone());
        self.own_since = own_since;
        self.committed = committed;
    }

    /// True when nothing was added that differs from the parent (every
    /// chunk unchanged, the image length too): a generation would say
    /// nothing new.
    pub fn changes_nothing(&self) -> bool {
        self.delta.chunks.is_empty()
            && self.delta.image_len == self.parent.image_len
            && self.pack.is_empty()
            && self.stats.packs == 0
    }

    /// The generation being built.
    pub fn generation(&self) -> u64 {
        self.delta.generation
    }

    /// Sets the image length of the new generation.
    pub fn set_image_len(&mut self, len: u64) {
        self.delta.image_len = len;
    }

    /// Records the writer lease in the new generation (its holder's
    /// commits carry it; a commit that takes the lease sets a new one).
    pub fn set_lease(&mut self, lease: Option<LeaseRecord>) {
        self.delta.lease = lease;
    }

    /// Records chunk `idx`'s new content (exactly its bytes in the image;
    /// the last chunk may be short). All-zero chunks are recorded as zero
    /// and chunks equal to the parent's as unchanged: neither uploads
    /// anything. `changed`, when known, is a bitmap of the 4 KiB pages that
    /// differ from the parent's version: if few did, only they go up, as a
    /// patch over that version (merged with its earlier patch, so a cold
    /// read stays two ranged reads).
    pub async fn add_chunk(&mut self, idx: u64, data: Vec<u8>, changed: Option<&[u64]>) -> VolumeResult<()> {
        let old = self.parent.chunk(idx, self.has_base);
        let want = old.content_digest().map(str::to_string);
        // Scanned and hashed off the async workers (guest misses wait on
        // them), once for both the comparison and the new reference.
        // Compared in the kind the parent recorded (an older version's
        // chunk has a SHA-256 digest).
        let (data, data_digest, same) = tokio::task::spawn_blocking(move || {
            if data.iter().all(|&b| b == 0) {
                return (data, None, false);
            }
            let d = digest::of(&data);
            let same = want.is_some_and(|w| digest::matches_known(&data, &d, &w));
            (data, Some(d), same)
        })
        .await
        .map_err(VolumeError::task("hashing a chunk"))?;
        let Some(data_digest) = data_digest else {
            if old == ChunkRef::Zero {
                self.stats.chunks_unchanged += 1;
            } else {
                self.delta.chunks.insert(idx, ChunkRef::Zero);
                self.stats.chunks_zero += 1;
            }
            return Ok(());
        };
        if same {
            self.stats.chunks_unchanged += 1;
            return Ok(());
        }
        if let Some(r) = self.resumable(idx, &data, &data_digest).await? {
            self.delta.chunks.insert(idx, r);
            self.stats.chunks_resumed += 1;
            return Ok(());
        }
        let cs = self.header.chunk_size as usize;
        let patch = changed.and_then(|bits| patch_plan(&old, bits, cs));
        // A patched chunk is hashed and patched at the full chunk size (a
        // short last chunk padded with zeroes), so the image growing later
        // changes nothing about it.
        let mut padded_digest = String::new(); // set when patched
        let body = match &patch {
            Some((_, runs)) => {
                let mut full = data;
                padded_digest = if full.len() == cs {
                    data_digest.clone()
                } else {
                    full.resize(cs, 0);
                    digest::of(&full)
                };
                extract_patch(&full, runs, PATCH_PAGE)
            }
            None => data,
        };
        let whole_digest = patch.is_none().then_some(data_digest);
        let (pack_no, pc) = self.pack_frame(body, whole_digest).await?;
        if self.uploaded.is_some() {
            self.in_pack.entry(self.delta.packs[pack_no as usize].clone()).or_default().push(idx);
        }
        let r = match patch {
            Some((mut base, runs)) => {
                // The base names a pack of the parent's table; the delta
                // has a table of its own.
                if let ChunkRef::Packed { pack, .. } = &mut base {
                    *pack = self.local_pack(&self.parent.packs[*pack as usize].clone());
                }
                self.stats.chunks_patched += 1;
                ChunkRef::Patched {
                    base: Box::new(base),
                    pack: pack_no,
                    offset: pc.offset,
                    len: pc.len,
                    runs,
                    digest: padded_digest,
                }
            }
            None => {
                self.stats.chunks_packed += 1;
                ChunkRef::Packed { pack: pack_no, offset: pc.offset, len: pc.len, digest: pc.digest }
            }
        };
        self.delta.chunks.insert(idx, r);
        if self.pack.len() as u64 >= self.opts.pack_size {
            self.ship().await?;
        }
        Ok(())
    }

    /// The index of pack `key` in the delta's pack table (added if new).
    fn local_pack(&mut self, key: &str) -> u32 {
        pack_index(&mut self.delta.packs, key)
    }

    /// Chunk `idx`'s reference from an earlier attempt, if that attempt
    /// uploaded exactly these bytes (`data`, whose digest is `data_digest`),
    /// a patch is over the bytes the parent holds, and the pack holding
    /// them may be reused (see [`Uploaded`]).
    async fn resumable(&mut self, idx: u64, data: &[u8], data_digest: &str) -> VolumeResult<Option<ChunkRef>> {
        let Some(uploaded) = self.uploaded.clone() else { return Ok(None) };
        let (r, key, slot, index, table) = {
            let u = uploaded.record.lock();
            let Some(m) = u.as_ref() else { return Ok(None) };
            let Some(r) = m.chunks.get(&idx) else { return Ok(None) };
            let pack = match r {
                ChunkRef::Packed { pack, .. } | ChunkRef::Patched { pack, .. } => *pack as usize,
                _ => return Ok(None),
            };
            let key = m.packs[pack].clone();
            (r.clone(), key.clone(), m.ids.get(&key).cloned(), m.indexes.get(&key).cloned(), m.packs.clone())
        };
        let same = match &r {
            ChunkRef::Packed { digest, .. } => digest == data_digest,
            // A patched chunk's digest is of the chunk at full size.
            ChunkRef::Patched { digest, .. } => {
                let cs = self.header.chunk_size as usize;
                if data.len() == cs {
                    digest == data_digest
                } else {
                    let mut full = data.to_vec();
                    full.resize(cs, 0);
                    *digest == digest::of(&full)
                }
            }
            _ => false,
        };
        if !same {
            return Ok(None);
        }
        // A patch applies to its base's bytes: the parent's version of the
        // chunk (its base, if itself patched) must hold them still.
        let base_now = match &r {
            ChunkRef::Patched { base, .. } => {
                let now = match self.parent.chunk(idx, self.has_base) {
                    ChunkRef::Patched { base, .. } => *base,
                    other => other,
                };
                if !base.same_bytes(&now) {
                    return Ok(None);
                }
                Some(now)
            }
            _ => None,
        };
        let usable = match self.checked.get(&key) {
            Some(&usable) => usable,
            None => {
                if let Some(s) = &slot {
                    self.remote.locate(&key, s);
                }
                let usable = match self.remote.head(&key).await {
                    Ok(meta) => {
                        let named = super::history::pack_generation(&key);
                        !self.committed.contains(&key)
                            && match named {
                                Some(g) if g > self.parent.generation => true,
                                Some(g) if g >= self.own_since => self.young(&meta).await?,
                                _ => false,
                            }
                    }
                    Err(e) if e.is_not_found() => {
                        tracing::warn!(pack = %key, "a pack uploaded earlier and not committed is gone: its chunks go up again");
                        false
                    }
                    Err(e) => return Err(VolumeError::remote(format!("checking {}/{key}", self.url), e)),
                };
                self.checked.insert(key.clone(), usable);
                usable
            }
        };
        if !usable {
            return Ok(None);
        }
        if let Some(ix) = index {
            self.delta.indexes.insert(key.clone(), ix);
        }
        if let Some(s) = slot {
            self.delta.ids.insert(key.clone(), s);
        }
        let mut r = reindex(&r, &table, &mut self.delta.packs);
        if let (ChunkRef::Patched { base, .. }, Some(mut now)) = (&mut r, base_now) {
            // The base names a pack of the parent's table.
            if let ChunkRef::Packed { pack, .. } = &mut now {
                *pack = self.local_pack(&self.parent.packs[*pack as usize].clone());
            }
            **base = now;
        }
        Ok(Some(r))
    }

    /// Whether a pack uploaded earlier (`meta`, just looked up) is still
    /// within [`RESUME_WINDOW`] of its creation, by the remote's clock (gc
    /// judges its [`RESUME_SPARED`] by the same clock).
    async fn young(&mut self, meta: &ObjectMeta) -> VolumeResult<bool> {
        let Some(created) = meta.created_ms else { return Ok(false) };
        let now = match self.remote_now {
            Some(now) => now,
            None => {
                let now = super::lease::remote_now_ms(&self.remote)
                    .await
                    .map_err(|e| VolumeError::remote(format!("reading the clock of {}", self.url), e))?;
                self.remote_now = Some(now);
                now
            }
        };
        Ok(created.saturating_add(RESUME_WINDOW.as_millis() as u64) > now)
    }

    /// The packs uploaded earlier that this commit reuses were checked as
    /// their chunks were added; the uploads since may have taken hours (a
    /// laptop suspended mid-upload), long enough for gc to delete one it
    /// spares only for [`RESUME_SPARED`] after its creation. So, right
    /// before the create, each is looked up again and, when only its age
    /// spares it, must still be within [`RESUME_WINDOW`] by the remote's
    /// clock now. If one is not, nothing is created: the commit fails and
    /// its retry uploads those chunks again.
    async fn check_reused_still_spared(&mut self) -> VolumeResult<()> {
        let reused: Vec<String> = self
            .checked
            .iter()
            .filter(|(k, &usable)| usable && self.delta.packs.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        if reused.is_empty() {
            return Ok(());
        }
        self.remote_now = None;
        let mut stale = Vec::new();
        for key in reused {
            let spared_by_name = super::history::pack_generation(&key).is_some_and(|g| g > self.parent.generation);
            let ok = match self.remote.head(&key).await {
                Ok(meta) => spared_by_name || self.young(&meta).await?,
                Err(e) if e.is_not_found() => false,
                Err(e) => return Err(VolumeError::remote(format!("checking {}/{key}", self.url), e)),
            };
            if !ok {
                self.checked.insert(key.clone(), false);
                stale.push(key);
            }
        }
        if stale.is_empty() {
            return Ok(());
        }
        Err(VolumeError::Unusable(format!(
            "{} pack(s) of {} uploaded by an earlier attempt and reused by this commit ({}) are gone or old \
             enough for gc to delete by now (this commit took hours: was the machine suspended?); nothing was \
             committed, and the next attempt uploads their chunks again",
            stale.len(),
            self.url,
            stale.join(", ")
        )))
    }

    /// Records in [`Uploaded`] the chunks of pack `key`, which just landed.
    fn record_landed(&mut self, key: &str, slot: Option<&crate::remote::Slot>) {
        let (Some(uploaded), Some(idxs)) = (&self.uploaded, self.in_pack.remove(key)) else { return };
        let mut u = uploaded.record.lock();
        let m = u.get_or_insert_with(|| {
            let mut m = Manifest::new(&self.header, self.delta.generation);
            m.parent = self.delta.parent;
            m
        });
        for idx in idxs {
            if let Some(r) = self.delta.chunks.get(&idx) {
                let r = reindex(r, &self.delta.packs, &mut m.packs);
                m.chunks.insert(idx, r);
            }
        }
        if let Some(ix) = self.delta.indexes.get(key) {
            m.indexes.insert(key.to_string(), ix.clone());
        }
        if let Some(s) = slot {
            m.ids.insert(key.to_string(), s.clone());
        }
        drop(u);
        uploaded.grew.notify_one();
    }

    /// Compresses `body` into the current pack: a whole chunk (with its
    /// digest) as sub-frames, a patch (no digest) as one frame. Returns the
    /// pack's index in the delta's table and the frame's place.
    async fn pack_frame(
        &mut self,
        body: Vec<u8>,
        whole_digest: Option<String>,
    ) -> VolumeResult<(u32, super::pack::PackedChunk)> {
        if self.pack.is_empty() {
            self.delta.packs.push(new_pack_key(self.delta.generation));
            self.current = (self.delta.packs.len() - 1) as u32;
        }
        let pack = std::mem::take(&mut self.pack);
        let (pack, pc) = tokio::task::spawn_blocking(move || {
            let mut pack = pack;
            // A patch is one frame, read whole; a chunk is sub-frames.
            let pc = match whole_digest {
                Some(d) => pack.add_digested(&body, d),
                None => pack.add_frame(&body),
            };
            (pack, pc)
        })
        .await
        .map_err(VolumeError::task("compressing a pack"))?;
        self.pack = pack;
        let pc = pc.map_err(|e| VolumeError::io("compressing chunk for", std::path::PathBuf::from(&self.url), e))?;
        Ok((self.current, pc))
    }

    /// Uploads the current pack in the background (at most
    /// `parallel_uploads` at once).
    async fn ship(&mut self) -> VolumeResult<()> {
        if self.pack.is_empty() {
            return Ok(());
        }
        // Reap finished uploads so a failure stops the commit early.
        while let Some(r) = self.uploads.try_join_next() {
            self.landed(r)?;
        }
        let key = self.delta.packs[self.current as usize].clone();
        let (body, index) = std::mem::replace(&mut self.pack, PackWriter::indexed(self.delta.chunk_size)).finish();
        if let Some(ix) = index {
            self.delta.indexes.insert(key.clone(), ix);
        }
        let body = PutBody::from_bytes(body);
        let permit =
            self.sem.clone().acquire_owned().await.map_err(|_| VolumeError::Cancelled("the upload limiter closed"))?;
        let remote = self.remote.clone();
        let url = self.url.clone();
        self.stats.packs += 1;
        // The upload runs in a task of its own: it keeps the committer's
        // mark (a background commit's packs are speculative work).
        let mark = crate::remote::priority::current();
        self.uploads.spawn(crate::remote::priority::with(mark, async move {
            let r = remote.put(&key, body).await.map_err(|e| VolumeError::remote(format!("uploading {url}/{key}"), e));
            drop(permit);
            r
        }));
        Ok(())
    }

    /// Accounts a finished pack upload; its identity goes into the manifest
    /// so other hosts find the pack without waiting for a listing.
    fn landed(&mut self, r: Result<VolumeResult<ObjectMeta>, tokio::task::JoinError>) -> VolumeResult<()> {
        let meta = r.map_err(VolumeError::task("uploading a pack"))??;
        self.stats.pack_bytes += meta.size;
        self.record_landed(&meta.key, meta.slot.as_ref());
        if let Some(slot) = meta.slot {
            self.delta.ids.insert(meta.key, slot);
        }
        Ok(())
    }

    /// Uploads what is left, then commits: creates the manifest at the
    /// slot the parent reserved. Returns the resolved manifest of the new
    /// generation. [`VolumeError::Conflict`] if another writer committed
    /// that generation first (nothing of ours is then referenced).
    pub async fn commit(mut self, writer: Writer) -> VolumeResult<(Manifest, CommitStats)> {
        let (g, key, resolved, bytes) = self.prepare(writer).await?;
        // Listed after the uploads, right before the create: they may take
        // minutes, and a laptop suspended meanwhile wakes days later. Only
        // generations past ours matter: a listing of them costs what is
        // newer, not every generation since the volume was made.
        let listed = match self.listed.take() {
            Some((l, at)) if at.elapsed().is_ok_and(|e| e < LISTING_FRESH) => l,
            _ => self.remote.list_after(GEN_PREFIX, &key).await,
        };
        self.check_not_in_a_gap(g, &key, listed).await?;
        self.check_reused_still_spared().await?;
        let tag = content_tag(&bytes);
        match self.remote.create(&key, self.parent.next_slot.as_ref(), &tag, PutBody::from_bytes(bytes)).await {
            Ok(_) => Ok((resolved, self.stats)),
            Err(e) => match e.root() {
                RemoteError::AlreadyExists { .. } => {
                    let by = match self.committed_by(g, &key).await {
                        Ok(by) => by,
                        // Taken, yet unreadable: on Drive, a generation
                        // moved to the trash in the web UI, which every
                        // reader now skips (the newest they see is older).
                        Err(e) if e.is_not_found() => {
                            if let Ok(Some(_)) = self.remote.find_trashed(&key).await {
                                return Err(VolumeError::InTrash { url: self.url.clone(), key });
                            }
                            "another writer".to_string()
                        }
                        Err(_) => "another writer".to_string(),
                    };
                    Err(VolumeError::Conflict { url: self.url.clone(), generation: g, by })
                }
                _ => Err(VolumeError::remote(format!("committing {}/{key}", self.url), e)),
            },
        }
    }

    /// Who committed generation `g` (at `key`, the slot the parent
    /// reserved), as conflicts name them.
    async fn committed_by(&self, g: u64, key: &str) -> RemoteResult<String> {
        let b = self.remote.get_created(key, self.parent.next_slot.as_ref()).await?;
        Ok(Manifest::from_bytes(&b, &self.header, g)
            .ok()
            .and_then(|m| m.writer)
            .map_or_else(|| "another writer".to_string(), |w| format!("{} (pid {})", w.host, w.pid)))
    }
}

impl GenerationBuilder {
    /// Lands every pack, reserves the next slot and builds the manifest:
    /// the generation, its key, its resolved manifest and the object's
    /// bytes.
    async fn prepare(&mut self, writer: Writer) -> VolumeResult<(u64, String, Manifest, Vec<u8>)> {
        self.ship().await?;
        while let Some(r) = self.uploads.join_next().await {
            self.landed(r)?;
        }
        let g = self.delta.generation;
        let key = gen_key(g);
        let next_key = gen_key(g + 1);
        self.delta.next_slot = self
            .remote
            .reserve(&next_key)
            .await
            .map_err(|e| VolumeError::remote(format!("reserving {}/{next_key}", self.url), e))?;
        self.delta.writer = Some(writer);
        let mut resolved = (*self.parent).clone();
        resolved.apply(&self.delta).map_err(|reason| VolumeError::CorruptManifest {
            url: self.url.clone(),
            key: key.clone(),
            reason,
        })?;
        let full = g % self.opts.checkpoint_every.max(1) == 0 || self.delta.chunks.len() * 2 > resolved.chunks.len();
        if full {
            resolved.prune_packs();
        }
        let object = if full { resolved.clone() } else { self.delta.clone() };
        let bytes = object.to_bytes();
        self.stats.manifest_bytes = bytes.len() as u64;
        self.stats.full = full;
        Ok((g, key, resolved, bytes))
    }

    /// What the caller knows of the generations as of `at` (a listing of
    /// `gen-*`, or none past the parent), so the commit makes no listing of
    /// its own — unless its create comes more than [`LISTING_FRESH`] of
    /// wall-clock time after `at`.
    pub fn generations_listed(&mut self, listed: RemoteResult<Vec<ObjectMeta>>, at: std::time::SystemTime) {
        self.listed = Some((listed, at));
    }

    /// A create-if-absent only sees that the key is absent now: a writer
    /// that slept through others' commits (a laptop suspended for a
    /// weekend) finds generation `g` free again once gc retired it, and
    /// its create would succeed in a gap no reader ever looks at. So a
    /// listing made before the create must show no newer generation (one
    /// listed then cannot be built on this one); else the commit is a
    /// conflict, nothing is created, and the local changes are kept.
    ///
    /// Usually `g` is still there, committed by a host that went on past
    /// it (an offline laptop back after another wrote): the conflict names
    /// that host. Only a `g` that is gone is gc's gap.
    async fn check_not_in_a_gap(&self, g: u64, key: &str, listed: RemoteResult<Vec<ObjectMeta>>) -> VolumeResult<()> {
        // Unchecked, the create could land in a gap no reader sees, and
        // the chunks would be marked clean: the commit fails (and is
        // retried, its packs reused) instead.
        let listed = listed.map_err(|e| {
            VolumeError::remote(format!("listing the generations of {} to check the commit is the newest", self.url), e)
        })?;
        let Some(newer) = listed.iter().filter_map(|m| parse_gen_key(&m.key)).filter(|&n| n > g).max() else {
            return Ok(());
        };
        let by = match self.committed_by(g, key).await {
            Ok(by) => format!("{by} (the volume is at generation {newer} now)"),
            Err(e) if e.is_not_found() => {
                tracing::warn!(url = %self.url, generation = g, newest = newer, "generation {g} is free again only because gc retired it: the volume moved on long ago");
                format!("another writer long ago (the volume is at generation {newer}; gc had retired {g})")
            }
            Err(_) => format!("another writer (the volume is at generation {newer})"),
        };
        Err(VolumeError::Conflict { url: self.url.clone(), generation: g, by })
    }
}

/// The host name, for [`Writer`] records, leases and messages.
/// `DRIVEBLK_HOSTNAME` overrides it (two "machines" on one test host, or a
/// friendlier name than the system's).
pub fn host_name() -> String {
    if let Some(h) = std::env::var("DRIVEBLK_HOSTNAME").ok().filter(|h| !h.is_empty()) {
        return h;
    }
    system_hostname().unwrap_or_else(|| "unknown-host".into())
}

/// The system's host name (not `DRIVEBLK_HOSTNAME`).
pub(crate) fn system_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return None;
    }
    let n = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..n].to_vec()).ok().filter(|s| !s.is_empty())
}

/// A writer record for this process and cache.
pub fn writer_record(cache_id: &str) -> Writer {
    Writer {
        host: host_name(),
        pid: std::process::id(),
        cache_id: cache_id.to_string(),
        unix_ms: super::lease::local_now_ms(),
    }
}
