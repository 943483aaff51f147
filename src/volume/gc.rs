//! Garbage collection (`driveblk gc`): retention of generations, deleting
//! the packs, patches, profiles and manifests nothing kept references, and
//! repacking mostly-dead packs — safe against a concurrent writer and
//! against readers still serving an older generation (docs/format.md,
//! "Retention and garbage collection").
//!
//! Rules, each for a reason:
//! - the newest generation, the retention's, every fork's (`fork-*.json`)
//!   and every generation whose successor is younger than the grace period
//!   (a reader may still serve it) are kept, with their delta chains;
//! - every manifest object that survives keeps everything it references,
//!   so any generation `log` lists can be read and rolled back to;
//! - only listed objects older than the grace period (by the remote's
//!   `createdTime`) are deleted, never one missing from the listing, never
//!   a pack written for a generation newer than the newest (a writer's,
//!   about to be committed), nor, for 24 h, one never committed that was
//!   written for a generation of the newest's writer's current run of
//!   commits (an upload it had cut short and resumes: `commit::Uploaded`),
//!   never `volume.json`, `README.txt`, `fork-*` (registrations) or
//!   `lease-*` (the writer lease's heartbeats); a
//!   leftover `clock-probe-*` (a host stopped between writing and deleting
//!   it) is garbage once older than the grace period;
//! - a fork's `<origin volume id>:<key>` pack entries are the origin's
//!   objects: never deleted or repacked from this folder (they are not in
//!   its listing; the origin keeps them by the fork's registration);
//! - holds (`volume::hold`: a rollback's `hold-*.json`, a fork's
//!   registration) keep their generation and the objects they name;
//! - manifests are deleted first; then the holds are listed again and the
//!   generations committed since the plan are read (by slot), and packs
//!   are deleted minus what those name or reference.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;

use super::commit::RESUME_SPARED;
use super::format::{new_pack_key, parse_gen_key, ChunkRef, Manifest, GEN_PREFIX, PACK_PREFIX};
use super::history::{
    check_writer, commit_full, committed_ago, frames, lease_held_elsewhere, load_generations, pack_generation,
    remote_clock, Generations, DEFAULT_ACTIVE_WINDOW,
};
use super::hold::{Hold, HOLD_LIFETIME, HOLD_PREFIX};
use super::lease::PROBE_PREFIX;
use super::pack::{decode_chunk_upto, PackWriter};
use super::profile::{find_latest, parse_profile_key, PACK_SUFFIX, PROFILE_PREFIX};
use super::reader::{read_object, VolumeReader};
use super::{runtime, RemoteOptions, VolumeError, VolumeResult};
use crate::remote::{ObjectMeta, PutBody, RemoteUrl};

/// The writer record's `cache_id` of a generation gc committed by
/// repacking: same content as its parent.
pub const REPACK_WRITER: &str = "gc:repack";

/// Key prefix of fork registrations (written by `driveblk fork` in the
/// origin volume).
pub const FORK_PREFIX: &str = super::fork::FORK_PREFIX;

/// A fork registration: `fork-<fork volume id>.json` in the origin volume.
/// While it exists, generation `from_generation` and every object it names
/// (or, in an older one naming none, that generation references) is kept.
pub use super::fork::ForkRegistration as ForkRef;

/// Which generations are kept (besides the newest, forks' and those a
/// reader may still serve).
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// The K newest generations.
    pub keep_generations: u64,
    /// Generations younger than this many days.
    pub keep_days: Option<f64>,
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_generations: 10, keep_days: None }
    }
}

/// Default grace period: objects younger than this are never deleted.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Options of [`gc`].
#[derive(Clone, Debug)]
pub struct GcOptions {
    pub retention: Retention,
    /// Objects created less than this long ago (remote clock) are kept.
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
    /// Run even though another host committed a moment ago.
    pub force: bool,
    /// A pack only the newest generation uses is rewritten when more than
    /// this share of its bytes is dead.
    pub repack_dead_share: f64,
    /// When the newest generation uses more packs than this, its small
    /// packs are merged (Drive folders and shared drives have item limits).
    pub max_packs: usize,
    /// Size of packs written by a repack.
    pub pack_size: u64,
    /// A writer that committed within this is active: gc then writes no
    /// generation (a repack would fence it out), and refuses altogether
    /// when that writer is another host (unless `force`).
    pub active_window: Duration,
    pub parallel: usize,
    pub remote: RemoteOptions,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            grace: DEFAULT_GRACE,
            dry_run: false,
            force: false,
            repack_dead_share: 0.5,
            max_packs: 256,
            pack_size: 32 << 20,
            active_window: DEFAULT_ACTIVE_WINDOW,
            parallel: 8,
            remote: RemoteOptions::default(),
        }
    }
}

/// What one [`gc`] did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub url: String,
    pub dry_run: bool,
    /// Newest generation at the start.
    pub newest: u64,
    /// Generations kept by retention, forks and readers.
    pub kept: Vec<u64>,
    /// Generations kept only because a kept one's delta chain needs them,
    /// or because they are too young to delete.
    pub also_kept: Vec<u64>,
    pub forks: Vec<ForkRef>,
    pub objects_before: u64,
    pub bytes_before: u64,
    pub objects_after: u64,
    pub bytes_after: u64,
    /// Objects deleted (or to delete): key and size.
    pub deleted: Vec<(String, u64)>,
    /// Leftovers of writes cut short (`dir:` hidden temp files), which no
    /// listing shows and the counts leave out, deleted (or to delete).
    pub scratch: Vec<(String, u64)>,
    /// Unreferenced objects left because they are younger than the grace
    /// period (or written for a generation not committed yet).
    pub young: u64,
    /// Packs rewritten into new ones.
    pub repacked: Vec<String>,
    /// The generation the repack committed.
    pub repack_generation: Option<u64>,
    /// Why no repack or checkpoint was written although one was due.
    pub repack_skipped: Option<String>,
    /// Bytes of objects the kept generations need, after.
    pub live_bytes: u64,
    /// Bytes still stored that no kept generation needs, after (dead
    /// frames inside live packs, young objects).
    pub dead_bytes: u64,
    /// Holds kept for a cache's changes after its lease was taken over
    /// (`volume::hold`): generation and what it is for. They never expire.
    pub held_for_changes: Vec<(u64, String)>,
}

/// A GC plan over one snapshot of the folder.
struct Plan {
    newest: Manifest,
    listing: Vec<ObjectMeta>,
    kept: BTreeSet<u64>,
    surviving: BTreeSet<u64>,
    forks: Vec<ForkRef>,
    delete: Vec<ObjectMeta>,
    young: u64,
    /// Pack key -> live bytes (distinct frames surviving generations use).
    live: HashMap<String, u64>,
    /// Pack key -> surviving generations that use it.
    users: HashMap<String, BTreeSet<u64>>,
    /// Generations kept only for the newest's delta chain.
    chain_only: BTreeSet<u64>,
    /// Every manifest as loaded: what a generation held after planning
    /// references is found here after its manifest was deleted.
    gens: Generations,
    /// What forks' registrations and holds kept when planned.
    held: Held,
    /// Holds kept for a cache's changes: generation and what for.
    held_for_changes: Vec<(u64, String)>,
}

impl Plan {
    fn bytes_before(&self) -> u64 {
        self.listing.iter().map(|m| m.size).sum()
    }
}

/// Reads and parses the JSON object `key` that keeps something (`what`
/// names it in messages); `None` when it is gone since listed.
async fn read_keeper<T: serde::de::DeserializeOwned>(
    r: &VolumeReader,
    key: &str,
    what: &str,
    advice: &str,
) -> VolumeResult<Option<T>> {
    let b = match r.remote.get(key).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(VolumeError::remote(format!("reading {what} {}/{key}", r.url), e)),
    };
    serde_json::from_slice(&b).map(Some).map_err(|e| {
        VolumeError::Unusable(format!(
            "{what} {}/{key} is not valid ({e}); gc will not guess what it keeps — {advice}",
            r.url
        ))
    })
}

/// Reads the fork registrations in the listing.
async fn read_forks(r: &VolumeReader, listing: &[ObjectMeta]) -> VolumeResult<Vec<ForkRef>> {
    let mut out = Vec::new();
    for m in listing.iter().filter(|m| m.key.starts_with(FORK_PREFIX) && m.key.ends_with(".json")) {
        out.extend(read_keeper(r, &m.key, "fork registration", "fix or remove it").await?);
    }
    Ok(out)
}

/// What holds keep: generations, and objects by name.
#[derive(Default)]
struct Held {
    generations: BTreeSet<u64>,
    objects: BTreeSet<String>,
}

impl Held {
    fn of(forks: &[ForkRef], holds: &[Hold]) -> Self {
        let mut h = Held::default();
        for f in forks {
            h.generations.insert(f.from_generation);
            h.objects.extend(f.packs.iter().cloned());
        }
        for x in holds {
            h.generations.insert(x.generation);
            h.objects.extend(x.packs.iter().cloned());
        }
        h
    }
}

/// The live holds (`hold-*.json` younger than [`HOLD_LIFETIME`], by the
/// remote's clock when listed, or kept for a cache's changes: those never
/// expire), and the keys of those that expired (garbage).
async fn read_holds(r: &VolumeReader, listing: &[ObjectMeta], now: u64) -> VolumeResult<(Vec<Hold>, Vec<String>)> {
    let mut held = Vec::new();
    let mut expired = Vec::new();
    let lifetime = HOLD_LIFETIME.as_millis() as u64;
    for m in listing.iter().filter(|m| m.key.starts_with(HOLD_PREFIX)) {
        // Gone: its maker finished and removed it.
        let Some(h) = read_keeper::<Hold>(r, &m.key, "hold", "remove it, or wait until it expires").await? else {
            continue;
        };
        let created = m.created_ms.unwrap_or(h.created_unix_ms);
        if h.for_cache.is_none() && created.saturating_add(lifetime) <= now {
            expired.push(m.key.clone());
        } else {
            held.push(h);
        }
    }
    Ok((held, expired))
}

/// Makes a plan from a fresh listing.
async fn plan(r: &VolumeReader, opts: &GcOptions, now: u64) -> VolumeResult<Plan> {
    let listing = r.remote.list("").await.map_err(|e| VolumeError::remote(format!("listing {}", r.url), e))?;
    let gens = load_generations(r, &listing).await?;
    if let Some((g, why)) = gens.corrupt.iter().next() {
        return Err(VolumeError::CorruptManifest {
            url: r.url.clone(),
            key: super::format::gen_key(*g),
            reason: format!("{why}; gc stops here — run `driveblk verify {}`", r.url),
        });
    }
    let forks = read_forks(r, &listing).await?;
    let (holds, expired_holds) = read_holds(r, &listing, now).await?;
    let n = gens.newest;
    let grace = opts.grace.as_millis() as u64;
    let old_enough = |created: Option<u64>| created.is_some_and(|c| c.saturating_add(grace) <= now);
    // Retention.
    let mut kept: BTreeSet<u64> = BTreeSet::new();
    kept.insert(n);
    kept.extend(gens.objects.keys().rev().take(opts.retention.keep_generations as usize).copied());
    if let Some(days) = opts.retention.keep_days {
        let horizon = now.saturating_sub((days * 86_400_000.0) as u64);
        kept.extend(gens.objects.keys().copied().filter(|&g| gens.stored_ms(g).is_none_or(|c| c >= horizon)));
    }
    let held = Held::of(&forks, &holds);
    let held_for_changes: Vec<(u64, String)> =
        holds.iter().filter(|h| h.for_cache.is_some()).map(|h| (h.generation, h.what.clone())).collect();
    kept.extend(held.generations.iter().copied().filter(|g| gens.objects.contains_key(g)));
    // A reader may still serve g while the generation that replaced it
    // is young (or of unknown age).
    let stored: Vec<u64> = gens.objects.keys().copied().collect();
    for w in stored.windows(2) {
        if !old_enough(gens.stored_ms(w[1])) {
            kept.insert(w[0]);
        }
    }
    // Every object that cannot go (unlisted, young) survives, with chains.
    let mut protect = kept.clone();
    for &g in gens.objects.keys() {
        let listed = gens.meta.contains_key(&g);
        if !listed || !old_enough(gens.stored_ms(g)) {
            protect.insert(g);
        }
    }
    // The newest's delta chain below it: a full manifest of the newest (a
    // repack commits one) lets these go.
    let chain_only: BTreeSet<u64> =
        gens.chain(n).unwrap_or_default().into_iter().filter(|g| *g != n && !protect.contains(g)).collect();
    let mut surviving = BTreeSet::new();
    for &g in &protect {
        let chain = gens.chain(g).map_err(|why| VolumeError::CorruptManifest {
            url: r.url.clone(),
            key: super::format::gen_key(g),
            reason: format!("its delta chain is broken ({why}); gc stops here — run `driveblk verify {}`", r.url),
        })?;
        surviving.extend(chain);
    }
    // What the surviving generations reference.
    let mut frames_by_pack: HashMap<String, BTreeSet<(u64, u64)>> = HashMap::new();
    let mut users: HashMap<String, BTreeSet<u64>> = HashMap::new();
    let mut newest = None;
    gens.for_each_resolved(&surviving, |m| {
        for (k, o, l) in frames(m) {
            frames_by_pack.entry(k.to_string()).or_default().insert((o, l));
            users.entry(k.to_string()).or_default().insert(m.generation);
        }
        if m.generation == n {
            newest = Some(m.clone());
        }
    })
    .map_err(|reason| VolumeError::CorruptManifest { url: r.url.clone(), key: "(chain)".into(), reason })?;
    let newest = newest.expect("the newest generation survives");
    let live: HashMap<String, u64> =
        frames_by_pack.into_iter().map(|(k, fr)| (k, fr.iter().map(|(_, l)| l).sum())).collect();
    // Profiles: the newest index readers use — the newest that parses
    // (`find_latest`) — and what it reads are kept, and older ones go; a
    // newer one this gc cannot read (damaged, or a newer driveblk's) is
    // left alone. With none readable, the newest by key stands in.
    let mut indexes: Vec<((u64, u64), &str)> =
        listing.iter().filter_map(|m| parse_profile_key(&m.key).map(|t| (t, m.key.as_str()))).collect();
    indexes.sort();
    let latest = find_latest(&r.remote, &r.header).await?;
    let newest_profile = match &latest {
        Some((k, _)) => Some(k.clone()),
        None => indexes.last().map(|(_, k)| k.to_string()),
    };
    let kept_packs = latest.map(|(_, p)| p.packs).unwrap_or_default();
    // A daemon that started before the newest profile was saved may still
    // stream an older one: those go only once the newest is old enough.
    let profiles_settled = newest_profile
        .as_deref()
        .is_none_or(|k| old_enough(listing.iter().find(|m| m.key == k).and_then(|m| m.created_ms)));
    let resumable_from = writers_own_run(&gens.objects, n);
    let mut delete = Vec::new();
    let mut young = 0u64;
    for m in &listing {
        let key = m.key.as_str();
        let dead = if let Some(g) = parse_gen_key(key) {
            !surviving.contains(&g) && g < n && gens.objects.contains_key(&g)
        } else if key.starts_with(PACK_PREFIX) {
            if live.contains_key(key) || held.objects.contains(key) {
                false
            } else if pack_generation(key).is_none_or(|pg| pg > n) {
                // Written for a generation not committed yet: a writer's,
                // about to be committed (it may only build on the newest).
                young += 1;
                false
            } else if pack_generation(key).is_some_and(|pg| {
                pg >= resumable_from && gens.objects.get(&pg).is_none_or(|g| !g.packs.iter().any(|k| k == key))
            }) && m.created_ms.is_some_and(|c| c.saturating_add(RESUME_SPARED.as_millis() as u64) > now)
            {
                // Never committed, by the writer whose run of commits its
                // generation is in: an upload cut short that this writer may
                // still commit (`commit::Uploaded`), whatever the grace.
                young += 1;
                false
            } else {
                true
            }
        } else if key.starts_with(HOLD_PREFIX) {
            expired_holds.iter().any(|k| k == key)
        } else if key.starts_with(PROBE_PREFIX) {
            // A clock probe is deleted by its writer right after; one left
            // over is garbage (the grace period below spares one in flight).
            true
        } else if key.starts_with(PROFILE_PREFIX) {
            // Only what is older than the newest index (a newer pack with
            // no index yet is an upload in flight).
            let older = |index: &str| newest_profile.as_deref().is_some_and(|np| index < np);
            profiles_settled
                && match key.strip_suffix(PACK_SUFFIX) {
                    Some(index) => older(index) && !kept_packs.iter().any(|p| p == key),
                    None => parse_profile_key(key).is_some() && older(key),
                }
        } else {
            false
        };
        if !dead {
            continue;
        }
        if old_enough(m.created_ms) {
            delete.push(m.clone());
        } else {
            young += 1;
        }
    }
    Ok(Plan {
        newest,
        listing,
        kept,
        surviving,
        forks,
        delete,
        young,
        live,
        users,
        chain_only,
        gens,
        held,
        held_for_changes,
    })
}

/// Packs worth rewriting: used only by the newest generation (and the
/// delta chain a full manifest of it frees), and mostly dead by what the
/// newest uses; or, when the newest uses too many packs, its small ones.
fn repack_candidates(p: &Plan, opts: &GcOptions) -> Vec<String> {
    let n = p.newest.generation;
    let sizes: HashMap<&str, u64> = p.listing.iter().map(|m| (m.key.as_str(), m.size)).collect();
    let only_newest = |k: &str| p.users.get(k).is_some_and(|u| u.iter().all(|g| *g == n || p.chain_only.contains(g)));
    let mut newest_live: HashMap<&str, BTreeSet<(u64, u64)>> = HashMap::new();
    for (k, o, l) in frames(&p.newest) {
        newest_live.entry(k).or_default().insert((o, l));
    }
    let mut out: BTreeSet<String> = BTreeSet::new();
    for k in &p.newest.packs {
        let Some(&size) = sizes.get(k.as_str()) else { continue };
        let live: u64 = newest_live.get(k.as_str()).map_or(0, |f| f.iter().map(|(_, l)| l).sum());
        if only_newest(k) && size > 0 && (size.saturating_sub(live)) as f64 > opts.repack_dead_share * size as f64 {
            out.insert(k.clone());
        }
    }
    if p.newest.packs.len() > opts.max_packs {
        let small: Vec<&String> = p
            .newest
            .packs
            .iter()
            .filter(|k| only_newest(k) && sizes.get(k.as_str()).is_some_and(|&s| s < opts.pack_size / 4))
            .collect();
        if small.len() >= 2 {
            out.extend(small.into_iter().cloned());
        }
    }
    out.into_iter().collect()
}

/// Copies the frames the newest generation uses from `packs` into new
/// packs (verifying whole chunks' hashes on the way), and commits a full
/// manifest pointing at them. Returns the new generation.
async fn repack(r: &VolumeReader, newest: &Manifest, packs: &[String], opts: &GcOptions) -> VolumeResult<Manifest> {
    let cs = r.header.chunk_size as usize;
    let g = newest.generation + 1;
    let mut m = newest.clone();
    let old: BTreeSet<u32> =
        m.packs.iter().enumerate().filter(|(_, k)| packs.contains(k)).map(|(i, _)| i as u32).collect();
    // (old pack, offset) -> (new pack index, new offset, new length)
    let mut moved: HashMap<(u32, u64), (u32, u64, u64)> = HashMap::new();
    let mut new_packs: Vec<(String, PackWriter)> = Vec::new();
    for &pi in &old {
        let key = m.packs[pi as usize].clone();
        let body = r.remote.get(&key).await.map_err(|e| VolumeError::remote(format!("reading {}/{key}", r.url), e))?;
        // The frames of this pack the newest uses, and the hash a whole
        // chunk's frame must decode to.
        let mut want: BTreeMap<u64, (u64, Option<String>)> = BTreeMap::new();
        for cr in m.chunks.values() {
            match cr {
                ChunkRef::Packed { pack, offset, len, digest } if *pack == pi => {
                    want.insert(*offset, (*len, Some(digest.clone())));
                }
                ChunkRef::Patched { base, pack, offset, len, .. } => {
                    if *pack == pi {
                        want.entry(*offset).or_insert((*len, None));
                    }
                    if let ChunkRef::Packed { pack, offset, len, digest } = &**base {
                        if *pack == pi {
                            want.insert(*offset, (*len, Some(digest.clone())));
                        }
                    }
                }
                _ => {}
            }
        }
        for (off, (len, sha)) in want {
            let end = (off + len) as usize;
            let frame = body.get(off as usize..end).ok_or_else(|| VolumeError::CorruptChunk {
                url: r.url.clone(),
                chunk: 0,
                key: key.clone(),
                offset: off,
                reason: format!("pack is {} bytes, a frame ends at {end}", body.len()),
            })?;
            if new_packs.last().is_none_or(|(_, b)| b.len() as u64 >= opts.pack_size) {
                new_packs.push((new_pack_key(g), PackWriter::indexed(r.header.chunk_size)));
            }
            let (_, nb) = new_packs.last_mut().expect("pushed above");
            // Whole chunks are checked, then written in the current shape
            // (sub-frames); patches are copied as they are.
            let pc = match &sha {
                Some(sha) => {
                    let data = decode_chunk_upto(frame, cs, sha).map_err(|reason| VolumeError::CorruptChunk {
                        url: r.url.clone(),
                        chunk: 0,
                        key: key.clone(),
                        offset: off,
                        reason,
                    })?;
                    nb.add(&data).map_err(|e| VolumeError::io("compressing a chunk for", PathBuf::from(&r.url), e))?
                }
                None => nb.add_raw_frame(frame),
            };
            moved.insert((pi, off), ((new_packs.len() - 1) as u32, pc.offset, pc.len));
        }
    }
    // New pack indexes follow the old table.
    let base_idx = m.packs.len() as u32;
    m.packs.extend(new_packs.iter().map(|(k, _)| k.clone()));
    let remap = |pack: &mut u32, offset: &mut u64, len: &mut u64| {
        if let Some(&(np, no, nl)) = moved.get(&(*pack, *offset)) {
            *pack = base_idx + np;
            *offset = no;
            *len = nl;
        }
    };
    for cr in m.chunks.values_mut() {
        match cr {
            ChunkRef::Packed { pack, offset, len, .. } => remap(pack, offset, len),
            ChunkRef::Patched { base, pack, offset, len, .. } => {
                remap(pack, offset, len);
                if let ChunkRef::Packed { pack, offset, len, .. } = &mut **base {
                    remap(pack, offset, len);
                }
            }
            _ => {}
        }
    }
    // Packs first, then the manifest naming them.
    for (k, w) in new_packs {
        let (b, index) = w.finish();
        if let Some(ix) = index {
            m.indexes.insert(k.clone(), ix);
        }
        let meta = r
            .remote
            .put(&k, PutBody::from_bytes(b))
            .await
            .map_err(|e| VolumeError::remote(format!("uploading {}/{k}", r.url), e))?;
        // Other hosts read the new pack by id, never waiting for a listing.
        if let Some(slot) = meta.slot {
            m.ids.insert(k, slot);
        }
    }
    commit_full(r, newest, m, REPACK_WRITER).await
}

/// Deletes `objs`, `parallel` at once; an object already gone is fine.
async fn delete_all(r: &VolumeReader, objs: &[ObjectMeta], parallel: usize) -> VolumeResult<()> {
    // Manifests first: a generation never outlives what it references.
    let mut order: Vec<&ObjectMeta> = objs.iter().collect();
    order.sort_by_key(|m| (!m.key.starts_with(GEN_PREFIX), m.key.clone()));
    let (gens, rest): (Vec<&ObjectMeta>, Vec<&ObjectMeta>) =
        order.into_iter().partition(|m| m.key.starts_with(GEN_PREFIX));
    for batch in [gens, rest] {
        let res = futures::stream::iter(batch.into_iter().map(|m| async move {
            r.remote.delete(&m.key).await.map_err(|e| VolumeError::remote(format!("deleting {}/{}", r.url, m.key), e))
        }))
        .buffer_unordered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
        for x in res {
            x?;
        }
    }
    Ok(())
}

/// One planning + deleting round: the manifests that go first, then the
/// packs and other objects — minus what became needed meanwhile. Between
/// the two, the holds are listed again (a fork or rollback that placed one
/// after the plan: `volume::hold`), and then the newest generation is read
/// again, by slots (generations committed meanwhile: a writer builds on the newest,
/// which survives, and names its new packs for a generation gc never
/// deletes packs of; a rollback, whose hold may be gone by now, names older
/// packs). In that order: a rollback that removed its hold before the
/// second listing committed before the re-read.
async fn round(r: &VolumeReader, opts: &GcOptions, report: &mut GcReport) -> VolumeResult<Plan> {
    // The remote's clock, as the creation times it is compared with.
    let now = remote_clock(r).await?;
    let mut p = plan(r, opts, now).await?;
    if opts.dry_run || p.delete.is_empty() {
        return Ok(p);
    }
    let (manifests, mut rest): (Vec<ObjectMeta>, Vec<ObjectMeta>) =
        p.delete.drain(..).partition(|m| m.key.starts_with(GEN_PREFIX));
    delete_all(r, &manifests, opts.parallel).await?;
    report.deleted.extend(manifests.iter().map(|m| (m.key.clone(), m.size)));
    let mut used: BTreeSet<String> = BTreeSet::new();
    let now_held = held_now(r, now).await?;
    used.extend(now_held.objects.iter().cloned());
    // A hold naming no objects (made before holds named them): what its
    // generation references, from the manifests as loaded.
    let newly: BTreeSet<u64> = now_held
        .generations
        .difference(&p.held.generations)
        .copied()
        .filter(|g| p.gens.objects.contains_key(g))
        .collect();
    if !newly.is_empty() {
        tracing::info!(url = %r.url, generations = ?newly, "generations held while gc planned; keeping what they use");
        let mut chains = BTreeSet::new();
        for &g in &newly {
            chains.extend(p.gens.chain(g).map_err(|why| VolumeError::CorruptManifest {
                url: r.url.clone(),
                key: super::format::gen_key(g),
                reason: format!("held, but its delta chain is broken ({why}); gc stops before deleting packs"),
            })?);
        }
        p.gens
            .for_each_resolved(&chains, |m| {
                if newly.contains(&m.generation) {
                    used.extend(frames(m).map(|(k, _, _)| k.to_string()));
                }
            })
            .map_err(|reason| VolumeError::CorruptManifest { url: r.url.clone(), key: "(chain)".into(), reason })?;
    }
    p.held.generations.extend(now_held.generations);
    p.held.objects.extend(now_held.objects);
    // By the slots each generation reserved for the next, never by a
    // listing: one lagging behind would show neither the new generations
    // nor (deleted just now) the old ones.
    let mut cur = p.newest.clone();
    loop {
        let g = cur.generation + 1;
        let next = match read_object(&r.remote, &r.url, &r.header, g, cur.next_slot.as_ref()).await {
            Ok(m) => m,
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => break,
            Err(e) => return Err(e),
        };
        tracing::info!(url = %r.url, generation = g, "generation committed while gc planned; keeping what it uses");
        if next.parent.is_some() {
            cur.apply(&next).map_err(|reason| VolumeError::CorruptManifest {
                url: r.url.clone(),
                key: super::format::gen_key(g),
                reason,
            })?;
        } else {
            cur = next;
        }
        used.extend(frames(&cur).map(|(k, _, _)| k.to_string()));
    }
    rest.retain(|m| !used.contains(&m.key));
    delete_all(r, &rest, opts.parallel).await?;
    report.deleted.extend(rest.iter().map(|m| (m.key.clone(), m.size)));
    p.delete = manifests;
    p.delete.extend(rest);
    Ok(p)
}

/// What fork registrations and live holds keep now (a fresh listing of
/// just those), judged at `now` (the remote's clock).
async fn held_now(r: &VolumeReader, now: u64) -> VolumeResult<Held> {
    let mut listing =
        r.remote.list(FORK_PREFIX).await.map_err(|e| VolumeError::remote(format!("listing {}", r.url), e))?;
    listing.extend(r.remote.list(HOLD_PREFIX).await.map_err(|e| VolumeError::remote(format!("listing {}", r.url), e))?);
    let forks = read_forks(r, &listing).await?;
    let (holds, _) = read_holds(r, &listing, now).await?;
    Ok(Held::of(&forks, &holds))
}

/// Runs gc on the volume at `url`.
pub fn gc(url: &str, opts: &GcOptions) -> VolumeResult<GcReport> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-gc")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, &opts.remote).await?;
        gc_open(&r, opts).await
    })
}

/// [`gc`] on an open volume.
pub async fn gc_open(r: &VolumeReader, opts: &GcOptions) -> VolumeResult<GcReport> {
    // What sits in the trash is invisible to the plan: a fork registration
    // or a hold there keeps nothing, a newest generation there makes an
    // older one look newest. Restored, either would name deleted packs.
    let trashed = r
        .remote
        .list_trashed("")
        .await
        .map_err(|e| VolumeError::remote(format!("listing the trash of {}", r.url), e))?;
    if !trashed.is_empty() {
        let mut keys: Vec<&str> = trashed.iter().map(|m| m.key.as_str()).take(5).collect();
        if trashed.len() > keys.len() {
            keys.push("…");
        }
        let keys =
            format!("{} object{} ({})", trashed.len(), if trashed.len() == 1 { "" } else { "s" }, keys.join(", "));
        return Err(VolumeError::GcTrash { url: r.url.clone(), keys });
    }
    let newest = r.newest_manifest().await?;
    check_writer(r, &newest, opts.active_window, opts.force).await?;
    let mut report = GcReport { url: r.url.clone(), dry_run: opts.dry_run, ..Default::default() };
    let first = round(r, opts, &mut report).await?;
    report.newest = first.newest.generation;
    report.objects_before = first.listing.len() as u64;
    report.bytes_before = first.bytes_before();
    report.forks = first.forks.clone();
    report.held_for_changes = first.held_for_changes.clone();
    let mut added: Vec<(String, u64)> = Vec::new();
    if opts.dry_run {
        for m in &first.delete {
            report.deleted.push((m.key.clone(), m.size));
        }
    }
    let mut last = first;
    let candidates = repack_candidates(&last, opts);
    let want_commit = !candidates.is_empty();
    if want_commit && !opts.dry_run {
        // By the remote's clock on both ends; unknown counts as a moment ago.
        let active = last.newest.writer.is_some()
            && committed_ago(r, &last.newest).await?.is_none_or(|a| a < opts.active_window.as_millis() as u64);
        // A daemon on another host holding the writer lease serves the
        // volume however long ago it last committed.
        let held = if active || opts.force { None } else { lease_held_elsewhere(r, &last.newest).await? };
        if active && !opts.force {
            report.repack_skipped = Some(format!(
                "generation {} was committed less than {} s ago (the volume is being written); \
                 repacking would fence that writer out — gc deleted only",
                last.newest.generation,
                opts.active_window.as_secs()
            ));
        } else if let Some(view) = held {
            report.repack_skipped = Some(format!(
                "the writer lease is {}; repacking would fence that writer out — gc deleted only \
                 (--force repacks anyway)",
                view.describe()
            ));
        } else {
            match repack(r, &last.newest, &candidates, opts).await {
                Ok(m) => {
                    report.repack_generation = Some(m.generation);
                    report.repacked = candidates.clone();
                    added.push((super::format::gen_key(m.generation), m.to_bytes().len() as u64));
                    let next = round(r, opts, &mut report).await?;
                    last = next;
                }
                Err(VolumeError::Conflict { .. }) => {
                    report.repack_skipped = Some("a writer committed meanwhile; repack left for the next gc".into());
                }
                Err(e) => return Err(e),
            }
        }
    } else if want_commit {
        report.repacked = candidates;
    }
    report.kept = last.kept.iter().copied().collect();
    report.also_kept = last.surviving.difference(&last.kept).copied().collect();
    report.young = last.young;
    // Counts after: from the last listing (which shows the repack's new
    // objects when the store lists at once) minus what that round deleted.
    let deleted: BTreeSet<&str> = report.deleted.iter().map(|(k, _)| k.as_str()).collect();
    let remaining: Vec<&ObjectMeta> = last.listing.iter().filter(|m| !deleted.contains(m.key.as_str())).collect();
    let mut objects_after = remaining.len() as u64;
    let mut bytes_after: u64 = remaining.iter().map(|m| m.size).sum();
    if opts.dry_run {
        objects_after = report.objects_before - report.deleted.len() as u64;
        bytes_after = report.bytes_before - report.deleted.iter().map(|(_, s)| s).sum::<u64>();
    }
    let listed: BTreeSet<&str> = last.listing.iter().map(|m| m.key.as_str()).collect();
    for (k, s) in &added {
        if !listed.contains(k.as_str()) {
            objects_after += 1;
            bytes_after += s;
        }
    }
    report.objects_after = objects_after;
    report.bytes_after = bytes_after;
    let (live, dead) = space_of(&last);
    report.live_bytes = live;
    report.dead_bytes = dead;
    sweep_scratch(r, opts, &mut report).await?;
    Ok(report)
}

/// How long a leftover of a write ([`Remote::list_scratch`]) must have
/// gone unwritten before gc deletes it, whatever the grace period: a
/// write under way keeps its file's time fresh, and no attempt lasts this
/// long without writing.
///
/// [`Remote::list_scratch`]: crate::remote::Remote::list_scratch
const SCRATCH_MIN_AGE: Duration = Duration::from_secs(3600);

/// Deletes the leftovers of writes cut short (`dir:` temp files), which
/// no listing shows, once older than the grace period by the remote's
/// clock.
async fn sweep_scratch(r: &VolumeReader, opts: &GcOptions, report: &mut GcReport) -> VolumeResult<()> {
    let scratch = r.remote.list_scratch().await.map_err(|e| VolumeError::remote(format!("listing {}", r.url), e))?;
    if scratch.is_empty() {
        return Ok(());
    }
    let now = remote_clock(r).await?;
    let age = opts.grace.max(SCRATCH_MIN_AGE).as_millis() as u64;
    for m in scratch {
        if m.modified_ms.or(m.created_ms).is_none_or(|t| t.saturating_add(age) > now) {
            continue;
        }
        if !opts.dry_run {
            r.remote
                .delete_scratch(&m.key)
                .await
                .map_err(|e| VolumeError::remote(format!("deleting {}/{}", r.url, m.key), e))?;
        }
        report.scratch.push((m.key, m.size));
    }
    Ok(())
}

/// Live and dead bytes of a plan's snapshot.
fn space_of(p: &Plan) -> (u64, u64) {
    let mut live = 0u64;
    let mut dead = 0u64;
    let deleting: BTreeSet<&str> = p.delete.iter().map(|d| d.key.as_str()).collect();
    for m in &p.listing {
        if m.key.starts_with(PACK_PREFIX) {
            let held = if p.held.objects.contains(&m.key) { m.size } else { 0 };
            let l = p.live.get(&m.key).copied().unwrap_or(0).max(held).min(m.size);
            live += l;
            dead += m.size - l;
        } else if let Some(g) = parse_gen_key(&m.key) {
            if p.surviving.contains(&g) {
                live += m.size;
            } else {
                dead += m.size;
            }
        } else if deleting.contains(m.key.as_str()) {
            dead += m.size;
        } else {
            live += m.size;
        }
    }
    (live, dead)
}

/// Space used on the remote, and what gc would free.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    pub objects: u64,
    pub used_bytes: u64,
    /// Bytes the kept generations (and the newest boot profile) need.
    pub live_bytes: u64,
    /// Everything else: dead frames inside packs still in use, and whole
    /// objects nothing kept needs.
    pub dead_bytes: u64,
    /// What `gc` with these options would delete now.
    pub reclaimable_now: u64,
    pub generations: u64,
}

/// Live vs dead bytes of the volume (a gc dry run's view).
pub async fn space_open(r: &VolumeReader, opts: &GcOptions) -> VolumeResult<Space> {
    let p = plan(r, opts, remote_clock(r).await?).await?;
    let (live, dead) = space_of(&p);
    Ok(Space {
        objects: p.listing.len() as u64,
        used_bytes: p.bytes_before(),
        live_bytes: live,
        dead_bytes: dead,
        reclaimable_now: p.delete.iter().map(|m| m.size).sum(),
        generations: p.listing.iter().filter(|m| parse_gen_key(&m.key).is_some()).count() as u64,
    })
}

/// [`space_open`] for a URL.
pub fn space(url: &str, opts: &GcOptions) -> VolumeResult<Space> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-space")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, &opts.remote).await?;
        space_open(&r, opts).await
    })
}

/// The first generation of the newest's writer's current run of commits:
/// every generation from it to `newest` that is still there was committed
/// by that one cache (generations retention removed are skipped). A pack
/// named for one of them may be that writer's upload cut short, which it
/// still means to commit (`commit::Uploaded`). `newest + 1` when gc itself
/// committed the newest (a repack) or nobody is named.
pub(crate) fn writers_own_run(objects: &BTreeMap<u64, Manifest>, newest: u64) -> u64 {
    let writer = |g: &Manifest| g.writer.as_ref().map(|w| w.cache_id.clone());
    let Some(who) = objects.get(&newest).and_then(writer).filter(|c| c != REPACK_WRITER) else {
        return newest + 1;
    };
    let mut from = newest;
    for (&g, m) in objects.range(..newest).rev() {
        if writer(m).as_deref() != Some(who.as_str()) {
            break;
        }
        from = g;
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::format::{VolumeHeader, Writer, DEFAULT_CHUNK_SIZE};

    /// Generations by the writers named (None: no writer record), from 1.
    fn chain(writers: &[(u64, Option<&str>)]) -> BTreeMap<u64, Manifest> {
        let h = VolumeHeader::new(4 << 20, DEFAULT_CHUNK_SIZE, None);
        writers
            .iter()
            .map(|&(g, w)| {
                let mut m = Manifest::new(&h, g);
                m.writer = w.map(|c| Writer { host: "h".into(), pid: 1, cache_id: c.into(), unix_ms: 0 });
                (g, m)
            })
            .collect()
    }

    #[test]
    fn a_writers_own_run_ends_at_another_writer_or_gc() {
        let run = |w: &[(u64, Option<&str>)]| writers_own_run(&chain(w), w.last().unwrap().0);
        // The newest's writer committed 3 and 4 (its leases), after b's 2.
        assert_eq!(run(&[(1, None), (2, Some("b")), (3, Some("a")), (4, Some("a"))]), 3);
        // Generations retention removed are skipped, not a break in the run.
        assert_eq!(run(&[(1, Some("b")), (3, Some("a")), (6, Some("a"))]), 3);
        // Another writer's generation since: a's earlier uploads are garbage.
        assert_eq!(run(&[(1, Some("a")), (2, Some("b"))]), 2);
        // gc repacked, or nobody is named: no run at all.
        assert_eq!(run(&[(1, Some("a")), (2, Some(REPACK_WRITER))]), 3);
        assert_eq!(run(&[(1, Some("a")), (2, None)]), 3);
    }
}
