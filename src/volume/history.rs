//! Generations as history: loading every stored manifest object, listing
//! them for people (`driveblk log`), and rolling back (a NEW generation equal
//! to an old one, committed through the fence; nothing is deleted).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;

use super::commit::{host_name, writer_record};
use super::format::{gen_key, parse_gen_key, ChunkRef, Manifest, FORMAT_VERSION, GEN_PREFIX, PACK_PREFIX};
use super::reader::{read_object, VolumeReader};
use super::{runtime, RemoteOptions, VolumeError, VolumeResult};
use crate::remote::{content_tag, ObjectMeta, PutBody, RemoteError, RemoteUrl};

/// Manifest objects read at once.
const PARALLEL_READS: usize = 8;

/// A writer that committed this recently may still be serving the volume.
pub const DEFAULT_ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Every manifest object of a volume, as stored (deltas unresolved).
pub(crate) struct Generations {
    /// Newest committed generation (found by following the slots).
    pub newest: u64,
    /// Objects that parsed and verified.
    pub objects: BTreeMap<u64, Manifest>,
    /// Objects that exist but are corrupt: generation -> reason.
    pub corrupt: BTreeMap<u64, String>,
    /// Listing metadata of each object (absent when the listing lagged).
    pub meta: BTreeMap<u64, ObjectMeta>,
}

impl Generations {
    /// When generation `g` was created by the remote's clock, if the
    /// listing says: what gc compares with the remote's clock now.
    pub fn stored_ms(&self, g: u64) -> Option<u64> {
        self.meta.get(&g).and_then(|m| m.created_ms)
    }

    /// When generation `g` was created, for people: the remote's clock when
    /// the listing says, else the writer's.
    pub fn created_ms(&self, g: u64) -> Option<u64> {
        self.meta
            .get(&g)
            .and_then(|m| m.created_ms)
            .or_else(|| self.objects.get(&g).and_then(|m| m.writer.as_ref()).map(|w| w.unix_ms))
    }

    /// The generations generation `g` needs to be resolved: itself and its
    /// delta chain back to the nearest full manifest. `Err` names the first
    /// missing or corrupt link.
    pub fn chain(&self, g: u64) -> Result<Vec<u64>, String> {
        let mut out = vec![g];
        let mut cur = g;
        loop {
            let m = match self.objects.get(&cur) {
                Some(m) => m,
                None if self.corrupt.contains_key(&cur) => {
                    return Err(format!("{} is corrupt ({})", gen_key(cur), self.corrupt[&cur]))
                }
                None => return Err(format!("{} is missing", gen_key(cur))),
            };
            match m.parent {
                None => return Ok(out),
                Some(p) => {
                    out.push(p);
                    cur = p;
                }
            }
        }
    }

    /// The first link of generation `g`'s delta chain that is neither
    /// stored nor corrupt (`None` when the chain is whole or only corrupt).
    pub fn missing_link(&self, g: u64) -> Option<u64> {
        let mut cur = g;
        loop {
            match self.objects.get(&cur) {
                Some(m) => cur = m.parent?,
                None if self.corrupt.contains_key(&cur) => return None,
                None => return Some(cur),
            }
        }
    }

    /// Resolves every generation in `gens` (which must be closed under
    /// [`chain`](Self::chain)), in ascending order, calling `f` with each
    /// resolved manifest.
    pub fn for_each_resolved(&self, gens: &BTreeSet<u64>, mut f: impl FnMut(&Manifest)) -> Result<(), String> {
        let mut cur: Option<Manifest> = None;
        for &g in gens {
            let obj = self.objects.get(&g).ok_or_else(|| format!("{} is missing", gen_key(g)))?;
            match obj.parent {
                None => cur = Some(obj.clone()),
                Some(p) => match cur.as_mut() {
                    Some(c) if c.generation == p => c.apply(obj)?,
                    _ => return Err(format!("{} is a delta over {}, which is not at hand", gen_key(g), gen_key(p))),
                },
            }
            f(cur.as_ref().expect("set above"));
        }
        Ok(())
    }
}

/// Reads every manifest object: the listed ones, then onwards by the slot
/// chain up to the newest (a listing may lag behind the newest commits).
pub(crate) async fn load_generations(r: &VolumeReader, listing: &[ObjectMeta]) -> VolumeResult<Generations> {
    let newest = r.newest_manifest().await?.generation;
    let mut meta: BTreeMap<u64, ObjectMeta> = BTreeMap::new();
    for m in listing {
        if let Some(g) = parse_gen_key(&m.key) {
            meta.insert(g, m.clone());
        }
    }
    let listed: Vec<u64> = meta.keys().copied().filter(|&g| g <= newest).collect();
    let reads = futures::stream::iter(
        listed.iter().map(|&g| async move { (g, read_object(&r.remote, &r.url, &r.header, g, None).await) }),
    )
    .buffer_unordered(PARALLEL_READS)
    .collect::<Vec<_>>()
    .await;
    let mut objects = BTreeMap::new();
    let mut corrupt = BTreeMap::new();
    for (g, res) in reads {
        match res {
            Ok(m) => {
                objects.insert(g, m);
            }
            // Listed, then gone (a GC elsewhere): simply absent.
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => {
                meta.remove(&g);
            }
            Err(VolumeError::CorruptManifest { reason, .. }) => {
                corrupt.insert(g, reason);
            }
            Err(e) => return Err(e),
        }
    }
    // Generations newer than the listing shows, by identity.
    let mut top = objects.keys().next_back().copied().unwrap_or(0);
    while top < newest {
        let slot = objects.get(&top).and_then(|m| m.next_slot.clone());
        let m = read_object(&r.remote, &r.url, &r.header, top + 1, slot.as_ref()).await?;
        objects.insert(top + 1, m);
        top += 1;
    }
    Ok(Generations { newest, objects, corrupt, meta })
}

/// The generation number a pack key was written for (`pack-<N>-<hex>`).
pub fn pack_generation(key: &str) -> Option<u64> {
    let rest = key.strip_prefix(PACK_PREFIX)?;
    let digits = rest.get(..20)?;
    digits.parse().ok()
}

/// Every pack frame a resolved manifest references: (pack key, offset, len).
pub(crate) fn frames(m: &Manifest) -> impl Iterator<Item = (&str, u64, u64)> + '_ {
    m.chunks
        .values()
        .flat_map(move |r| {
            let mut v: Vec<(&str, u64, u64)> = Vec::with_capacity(2);
            match r {
                ChunkRef::Packed { pack, offset, len, .. } => v.push((&m.packs[*pack as usize], *offset, *len)),
                ChunkRef::Patched { base, pack, offset, len, .. } => {
                    v.push((&m.packs[*pack as usize], *offset, *len));
                    if let ChunkRef::Packed { pack, offset, len, .. } = &**base {
                        v.push((&m.packs[*pack as usize], *offset, *len));
                    }
                }
                _ => {}
            }
            v
        })
        // A pack's sub-frame index is part of what its chunks need.
        .chain(m.indexes.iter().filter(|(k, _)| m.packs.contains(k)).map(|(k, ix)| (k.as_str(), ix.offset, ix.len)))
}

/// One line of `driveblk log`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogEntry {
    pub generation: u64,
    /// Creation time (remote clock when known), ms since the epoch.
    pub created_ms: Option<u64>,
    pub host: Option<String>,
    pub pid: Option<u32>,
    /// Full manifest (checkpoint) or delta.
    pub checkpoint: bool,
    /// Chunks whose bytes differ from the previous generation.
    pub chunks_changed: u64,
    /// `chunks_changed` in bytes (whole chunks).
    pub bytes_changed: u64,
    /// Bytes of pack frames this generation uploaded.
    pub bytes_uploaded: u64,
    pub image_len: u64,
    /// What made it, when not an ordinary commit ("rollback to 4", "gc").
    pub note: Option<String>,
    /// Why it cannot be read (corrupt, broken chain).
    pub problem: Option<String>,
}

/// What `log` found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Log {
    pub url: String,
    pub newest: u64,
    pub entries: Vec<LogEntry>,
}

/// The note a special writer record carries, or the writer lease a
/// generation took (a commit of its own, changing nothing).
fn note_of(m: &Manifest) -> Option<String> {
    let id = &m.writer.as_ref()?.cache_id;
    if let Some(g) = id.strip_prefix("rollback:") {
        Some(format!("rollback to generation {g}"))
    } else if let Some(what) = id.strip_prefix("gc:") {
        Some(format!("gc {what}"))
    } else {
        m.lease
            .as_ref()
            .filter(|l| l.taken_at == m.generation)
            .map(|l| format!("took the writer lease ({}, pid {})", l.host, l.pid))
    }
}

/// Lists the volume's generations, oldest first.
pub fn log(url: &str, opts: &RemoteOptions) -> VolumeResult<Log> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-log")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, opts).await?;
        let listing = r
            .remote
            .list(GEN_PREFIX)
            .await
            .map_err(|e| VolumeError::remote(format!("listing generations of {}", r.url), e))?;
        let gens = load_generations(&r, &listing).await?;
        let cs = r.header.chunk_size;
        let has_base = r.base.is_some();
        let mut entries = BTreeMap::new();
        // Resolve runs of generations whose chains are whole.
        let mut ok: BTreeSet<u64> = BTreeSet::new();
        let mut broken: HashMap<u64, String> = HashMap::new();
        for &g in gens.objects.keys() {
            match gens.chain(g) {
                Ok(c) => ok.extend(c),
                Err(e) => {
                    broken.insert(g, format!("cannot be read: {e}"));
                }
            }
        }
        ok.retain(|g| !broken.contains_key(g));
        let mut prev: Option<Manifest> = None;
        let res = gens.for_each_resolved(&ok, |m| {
            let obj = &gens.objects[&m.generation];
            let changed = match prev.as_ref().filter(|p| p.generation + 1 == m.generation) {
                Some(p) => {
                    let keys: BTreeSet<u64> = m.chunks.keys().chain(p.chunks.keys()).copied().collect();
                    keys.iter().filter(|&&i| !m.chunk(i, has_base).same_bytes(&p.chunk(i, has_base))).count() as u64
                }
                None => m.chunks.len() as u64,
            };
            let mut seen = BTreeSet::new();
            let uploaded: u64 = frames(obj)
                .filter(|(k, _, _)| pack_generation(k) == Some(m.generation))
                .filter(|&(k, o, _)| seen.insert((k.to_string(), o)))
                .map(|(_, _, l)| l)
                .sum();
            entries.insert(
                m.generation,
                LogEntry {
                    generation: m.generation,
                    created_ms: gens.created_ms(m.generation),
                    host: m.writer.as_ref().map(|w| w.host.clone()),
                    pid: m.writer.as_ref().map(|w| w.pid),
                    checkpoint: obj.parent.is_none(),
                    chunks_changed: changed,
                    bytes_changed: changed * cs,
                    bytes_uploaded: uploaded,
                    image_len: m.image_len,
                    note: note_of(m),
                    problem: None,
                },
            );
            prev = Some(m.clone());
        });
        if let Err(e) = res {
            return Err(VolumeError::CorruptManifest { url: r.url.clone(), key: "(history)".into(), reason: e });
        }
        for (g, why) in broken.into_iter().chain(gens.corrupt.iter().map(|(g, e)| (*g, format!("corrupt: {e}")))) {
            let obj = gens.objects.get(&g);
            entries.insert(
                g,
                LogEntry {
                    generation: g,
                    created_ms: gens.created_ms(g),
                    host: obj.and_then(|m| m.writer.as_ref()).map(|w| w.host.clone()),
                    pid: obj.and_then(|m| m.writer.as_ref()).map(|w| w.pid),
                    checkpoint: obj.is_some_and(|m| m.parent.is_none()),
                    chunks_changed: 0,
                    bytes_changed: 0,
                    bytes_uploaded: 0,
                    image_len: obj.map_or(0, |m| m.image_len),
                    note: obj.and_then(note_of),
                    problem: Some(why),
                },
            );
        }
        Ok(Log { url: r.url.clone(), newest: gens.newest, entries: entries.into_values().collect() })
    })
}

/// Refuses when another host committed the newest generation within
/// `window` (it is probably serving the volume right now), unless `force`.
/// The age is the remote's clock now against the generation object's
/// modification time, never this host's clock against the writer's.
pub async fn check_writer(
    r: &VolumeReader,
    newest: &Manifest,
    window: std::time::Duration,
    force: bool,
) -> VolumeResult<()> {
    let Some(w) = &newest.writer else { return Ok(()) };
    if force || w.host == host_name() {
        return Ok(());
    }
    let age = committed_ago(r, newest).await?;
    if age.is_some_and(|a| a >= window.as_millis() as u64) {
        return Ok(());
    }
    let ago = age.map_or_else(|| "a moment".to_string(), |a| format!("{} s", a / 1000));
    Err(VolumeError::InUse {
        url: r.url.clone(),
        detail: format!(
            "generation {} was committed by {} (pid {}) {ago} ago, so a daemon there is probably serving it; \
             stop it first (or wait {} s), or pass --force",
            newest.generation,
            w.host,
            w.pid,
            window.as_secs().saturating_sub(age.unwrap_or(0) / 1000)
        ),
    })
}

/// How long ago generation `newest` was committed: the remote's clock now
/// against its object's modification time (two hosts' clocks are never
/// compared). None when the remote does not say (a listing that lags).
pub(crate) async fn committed_ago(r: &VolumeReader, newest: &Manifest) -> VolumeResult<Option<u64>> {
    let key = gen_key(newest.generation);
    let at = match r.remote.head(&key).await {
        Ok(m) => m.modified_ms.or(m.created_ms),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(VolumeError::remote(format!("looking up {}/{key}", r.url), e)),
    };
    let Some(at) = at else { return Ok(None) };
    Ok(Some(remote_clock(r).await?.saturating_sub(at)))
}

/// The remote's clock now (`lease::remote_now_ms`): what gc compares the
/// remote's creation times with. On a remote too full to take the probe
/// (a Drive full to the byte, a folder at Drive's item limit, a full
/// disk), the newest time any object there was written: at or before the
/// remote's now, so ages come out shorter and gc deletes less, never more
/// — and gc, the way out of a full remote, still runs.
pub(crate) async fn remote_clock(r: &VolumeReader) -> VolumeResult<u64> {
    let e = match super::lease::remote_now_ms(&r.remote).await {
        Ok(now) => return Ok(now),
        Err(e) => e,
    };
    let full = match e.root() {
        RemoteError::Quota { .. } => true,
        RemoteError::Io { source, .. } => {
            matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
        }
        _ => false,
    };
    let clock = |e| VolumeError::remote(format!("reading the clock of {}", r.url), e);
    if !full {
        return Err(clock(e));
    }
    let listing = r.remote.list("").await.map_err(clock)?;
    let newest = listing.iter().filter_map(|m| m.modified_ms.max(m.created_ms)).max();
    tracing::info!(url = %r.url, error = %e, "the remote is full: its clock is read as the newest time an object was written");
    newest.ok_or_else(|| clock(e))
}

/// The writer lease of the volume whose newest generation is `newest`, when
/// another host holds it (neither released nor expired): a daemon there
/// serves the volume, however long ago it last committed. A holder on this
/// host is left to the caller, as in [`check_writer`].
pub(crate) async fn lease_held_elsewhere(
    r: &VolumeReader,
    newest: &Manifest,
) -> VolumeResult<Option<super::lease::LeaseView>> {
    lease_held(r, newest, false).await
}

/// [`lease_held_elsewhere`], a holder on this host included when
/// `this_host`.
async fn lease_held(
    r: &VolumeReader,
    newest: &Manifest,
    this_host: bool,
) -> VolumeResult<Option<super::lease::LeaseView>> {
    match &newest.lease {
        Some(l) if !l.released && (this_host || l.host != host_name()) => {}
        _ => return Ok(None),
    }
    let view = super::lease::inspect(&r.remote, &r.header, newest, None).await?;
    Ok((view.standing == super::lease::Standing::Held).then_some(view))
}

/// Commits `content` (a resolved manifest) as a full manifest of the
/// generation after `parent` (the newest, resolved), at the slot `parent`
/// reserved: the ordinary fence. `what` goes in the writer record's cache
/// id (`rollback:<G>`, `gc:repack`). Returns the new manifest.
pub(crate) async fn commit_full(
    r: &VolumeReader,
    parent: &Manifest,
    mut content: Manifest,
    what: &str,
) -> VolumeResult<Manifest> {
    let g = parent.generation + 1;
    let key = gen_key(g);
    content.generation = g;
    content.parent = None;
    content.version = FORMAT_VERSION;
    content.prune_packs();
    content.next_slot = r
        .remote
        .reserve(&gen_key(g + 1))
        .await
        .map_err(|e| VolumeError::remote(format!("reserving {}/{}", r.url, gen_key(g + 1)), e))?;
    content.writer = Some(writer_record(what));
    // The writer lease stays with whoever holds it now (a rollback's
    // content is an old generation, whose record is stale): a maintenance
    // commit must never make a held lease look free.
    content.lease = parent.lease.clone();
    let bytes = content.to_bytes();
    let tag = content_tag(&bytes);
    match r.remote.create(&key, parent.next_slot.as_ref(), &tag, PutBody::from_bytes(bytes)).await {
        Ok(_) => Ok(content),
        Err(e) => match e.root() {
            RemoteError::AlreadyExists { tag: Some(t), .. } if *t == tag => Ok(content),
            RemoteError::AlreadyExists { .. } => {
                Err(VolumeError::Conflict { url: r.url.clone(), generation: g, by: "another writer".into() })
            }
            _ => Err(VolumeError::remote(format!("committing {}/{key}", r.url), e)),
        },
    }
}

/// Options of [`rollback`].
#[derive(Clone, Debug, Default)]
pub struct RollbackOptions {
    /// Roll back even if another host committed a moment ago.
    pub force: bool,
    pub remote: RemoteOptions,
}

/// What [`rollback`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackReport {
    /// The generation whose content was restored.
    pub from: u64,
    /// The newest generation before.
    pub previous: u64,
    /// The new generation (equal to `from`).
    pub generation: u64,
}

/// Makes a new generation whose content equals generation `target`'s,
/// after checking every object `target` references is there. Nothing is
/// deleted: the generations in between stay (until `gc` retires them).
pub fn rollback(url: &str, target: u64, opts: &RollbackOptions) -> VolumeResult<RollbackReport> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-rollback")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, &opts.remote).await?;
        let newest = r.manifest();
        check_writer(&r, &newest, DEFAULT_ACTIVE_WINDOW, opts.force).await?;
        // A holder on this host counts too: a daemon serving the volume here
        // would keep the disk from before the rollback and meet a conflict
        // at its next commit (and one that stopped with changes pending
        // would have them refused).
        if !opts.force {
            if let Some(view) = lease_held(&r, &newest, true).await? {
                return Err(VolumeError::InUse {
                    url: r.url.clone(),
                    detail: format!(
                        "its writer lease is {}, so a daemon there is probably serving it (or stopped with \
                         changes not uploaded yet); stop it there first (a clean stop uploads them and releases \
                         the lease), or pass --force",
                        view.describe()
                    ),
                });
            }
        }
        if target >= newest.generation {
            return Err(VolumeError::InvalidOptions(format!(
                "generation {target} is not older than the newest ({}); `driveblk log {}` lists the generations",
                newest.generation, r.url
            )));
        }
        let gone = || {
            VolumeError::InvalidOptions(format!(
                "generation {target} of {} no longer exists (or its delta chain was removed by gc); \
                 `driveblk log {}` lists the ones that do",
                r.url, r.url
            ))
        };
        let old = match r.load_generation(target).await {
            Ok(m) => m,
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => return Err(gone()),
            Err(e) => return Err(e),
        };
        // A hold keeps what the target references from a gc running
        // meanwhile, until the rollback committed (and the newest keeps it).
        let key = super::hold::new_hold_key();
        let hold = super::hold::Hold {
            generation: target,
            what: format!("rollback to {target}"),
            host: super::commit::host_name(),
            created_unix_ms: super::lease::local_now_ms(),
            packs: super::hold::own_objects(&old),
            for_cache: None,
        };
        let body = serde_json::to_vec_pretty(&hold).expect("a hold serialises");
        if !super::hold::place(&r, &key, body, target, super::hold::LISTED_WITHIN).await? {
            return Err(gone());
        }
        let res = restore(&r, &newest, old).await;
        super::hold::release(&r, &key).await;
        let m = res?;
        tracing::info!(url = %r.url, from = target, generation = m.generation, "rolled back");
        Ok(RollbackReport { from: target, previous: newest.generation, generation: m.generation })
    })
}

/// Commits `old`'s content (a resolved generation) as the one after
/// `newest`, after checking every object it references is there.
async fn restore(r: &VolumeReader, newest: &Manifest, old: Manifest) -> VolumeResult<Manifest> {
    let target = old.generation;
    let problems = super::verify::check_manifest_objects(r, &old, 16).await?;
    if !problems.is_empty() {
        let names: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        return Err(VolumeError::InvalidOptions(format!(
            "generation {target} is not intact, so rolling back to it would serve errors: {}; \
             `driveblk verify {}` names the newest intact generation",
            names.join("; "),
            r.url
        )));
    }
    commit_full(r, newest, old, &format!("rollback:{target}")).await
}
