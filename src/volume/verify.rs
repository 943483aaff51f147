//! Checking that a volume's folder still holds what its generations need
//! (`driveblk verify`, and the quick check `serve` runs at open): people
//! trash, move, rename or delete files in the Drive web UI, and desktop
//! sync clients mirror folders. Also the folder's README object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use futures::StreamExt;

use super::format::{gen_key, ChunkRef, Manifest};
use super::history::{frames, load_generations};
use super::reader::VolumeReader;
use super::{runtime, RemoteOptions, VolumeError, VolumeResult};
use crate::remote::{DynRemote, ObjectMeta, PutBody, RemoteUrl};

/// Key of the README object in a volume folder.
pub const README_KEY: &str = "README.txt";

/// What the README says.
pub fn readme_text(volume_id: &str) -> String {
    format!(
        "This folder is a driveblk volume (id {volume_id}): a virtual machine's disk image,\n\
         stored as many small files that only driveblk can put back together.\n\
         \n\
         Do not edit, rename, move, trash or delete anything in this folder, and do\n\
         not let a sync client (Drive for desktop) modify it: a missing file makes\n\
         parts of the disk unreadable. driveblk never changes a file in place; old\n\
         files are removed only by `driveblk gc`.\n\
         \n\
         If something was removed: untrash it (Drive web UI: Trash, Restore), then\n\
         run `driveblk verify URL` — it names what is missing and the newest intact\n\
         generation (`driveblk rollback URL GEN` makes that the current one).\n"
    )
}

/// Writes the README object (replacing one that is there).
pub async fn write_readme(remote: &DynRemote, volume_id: &str) -> VolumeResult<()> {
    remote
        .put(README_KEY, PutBody::from_bytes(readme_text(volume_id).into_bytes()))
        .await
        .map(|_| ())
        .map_err(|e| VolumeError::remote(format!("writing {}/{README_KEY}", remote.describe()), e))
}

/// What is wrong with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// Not in the folder (deleted, moved or renamed).
    Missing,
    /// In the trash (Drive): restore it.
    Trashed,
    /// Shorter than the frames in it need.
    Short { size: u64, need: u64 },
    /// Content does not match its recorded hash (`--full`).
    Corrupt(String),
    /// A manifest that is corrupt or whose delta chain is broken.
    Manifest(String),
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub kind: ProblemKind,
    /// Generations it makes unreadable.
    pub generations: Vec<u64>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ProblemKind::Missing => write!(f, "{} is missing (deleted, moved or renamed)", self.key),
            ProblemKind::Trashed => write!(f, "{} is in the Drive trash", self.key),
            ProblemKind::Short { size, need } => {
                write!(f, "{} is {size} bytes, but its chunks need {need} (truncated or replaced)", self.key)
            }
            ProblemKind::Corrupt(why) => write!(f, "{} is damaged: {why}", self.key),
            ProblemKind::Manifest(why) => write!(f, "{}: {why}", self.key),
        }
    }
}

/// Checks that every pack `m` (a resolved manifest) references exists,
/// is not trashed and is long enough for its frames (metadata only: one
/// `head` per pack, `parallel` at once).
pub async fn check_manifest_objects(r: &VolumeReader, m: &Manifest, parallel: usize) -> VolumeResult<Vec<Problem>> {
    let mut need: BTreeMap<String, u64> = BTreeMap::new();
    for (k, o, l) in frames(m) {
        let e = need.entry(k.to_string()).or_default();
        *e = (*e).max(o + l);
    }
    check_objects(r, &need, &HashMap::new(), parallel).await
}

/// Checks objects `need` (key -> bytes needed): from `listed` metadata
/// when the listing shows them, else by `head` (a listing may lag), and
/// for an absent one, whether it sits in the trash. A fork's packs of its
/// origin (`<volume id>:<key>`) are checked in the origin's folder.
async fn check_objects(
    r: &VolumeReader,
    need: &BTreeMap<String, u64>,
    listed: &HashMap<String, ObjectMeta>,
    parallel: usize,
) -> VolumeResult<Vec<Problem>> {
    let results = futures::stream::iter(need.iter().map(|(key, &need)| async move {
        let (remote, object) = r.pack_remote(key)?;
        let meta = match listed.get(key) {
            Some(m) => Ok(m.clone()),
            None => remote.head(object).await,
        };
        let kind = match meta {
            Ok(m) if m.size < need => Some(ProblemKind::Short { size: m.size, need }),
            Ok(_) => None,
            Err(e) if e.is_not_found() => match remote.find_trashed(object).await {
                Ok(Some(_)) => Some(ProblemKind::Trashed),
                Ok(None) => Some(ProblemKind::Missing),
                Err(e) => return Err(VolumeError::remote(format!("looking for {key} in the trash"), e)),
            },
            Err(e) => return Err(VolumeError::remote(format!("checking {}/{key}", remote.describe()), e)),
        };
        Ok(kind.map(|kind| Problem { key: key.clone(), kind, generations: Vec::new() }))
    }))
    .buffer_unordered(parallel.max(1))
    .collect::<Vec<_>>()
    .await;
    let mut out = Vec::new();
    for r in results {
        if let Some(p) = r? {
            out.push(p);
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Options of [`verify`].
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Download every referenced frame and check its hash.
    pub full: bool,
    /// Write the README object when it is missing.
    pub repair: bool,
    /// Requests at once.
    pub parallel: usize,
    pub remote: RemoteOptions,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { full: false, repair: false, parallel: 16, remote: RemoteOptions::default() }
    }
}

/// Whether the folder's README is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readme {
    Present,
    Missing,
    /// Missing, and written by `--repair`.
    Written,
}

/// What [`verify`] found.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub url: String,
    pub newest: u64,
    /// Generations checked (every stored one).
    pub generations: Vec<u64>,
    /// Packs checked.
    pub objects_checked: u64,
    /// Frames downloaded and hash-checked (`--full`).
    pub frames_checked: u64,
    pub problems: Vec<Problem>,
    /// The newest generation with no problem.
    pub newest_intact: Option<u64>,
    pub readme: Readme,
}

impl VerifyReport {
    /// True when nothing is wrong with any generation.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// What the user can do, in a few lines.
    pub fn advice(&self) -> String {
        if self.is_clean() {
            return format!("all {} generations are intact", self.generations.len());
        }
        let mut s = String::new();
        if self.problems.iter().any(|p| p.kind == ProblemKind::Trashed) {
            s += "- restore the trashed files: Drive web UI, Trash, select them, Restore; then verify again\n";
        }
        if self.problems.iter().any(|p| matches!(p.kind, ProblemKind::Missing | ProblemKind::Short { .. })) {
            s += "- put missing files back where they were (moved or renamed ones: move/rename back; deleted ones: \
                  from the Drive trash, or an earlier revision for a replaced file); then verify again\n";
        }
        if let Some(p) = self.problems.iter().find(|p| p.generations.iter().any(|g| *g > self.newest)) {
            s += &format!(
                "- {} is the newest committed generation: until it is restored, readers serve generation {} \
                 and write-back cannot commit — restore it first\n",
                p.key, self.newest
            );
        }
        match self.newest_intact {
            Some(g) if g == self.newest => {
                s += &format!("- the newest generation {g} is intact: the volume serves correctly; only older generations are affected\n")
            }
            Some(g) => s += &format!(
                "- or give up the damaged generations: generation {g} is the newest fully intact one — \
                 `driveblk rollback {} {g}` makes it current (or fork from it)\n",
                self.url
            ),
            None => s += "- no generation is fully intact: restore the files above, or import the image again\n",
        }
        s
    }
}

/// Checks every stored generation's manifest chain and the objects it
/// references: present, not trashed, long enough (cheap: one listing plus
/// a `head` per object the listing misses); with `full`, every referenced
/// frame is downloaded and hash-checked too.
pub fn verify(url: &str, opts: &VerifyOptions) -> VolumeResult<VerifyReport> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-verify")?;
    rt.block_on(async {
        let r = VolumeReader::open(&u, &opts.remote).await?;
        let listing = r.remote.list("").await.map_err(|e| VolumeError::remote(format!("listing {}", r.url), e))?;
        let gens = load_generations(&r, &listing).await?;
        let listed: HashMap<String, ObjectMeta> = listing.iter().map(|m| (m.key.clone(), m.clone())).collect();
        let mut problems: Vec<Problem> = Vec::new();
        let mut bad: BTreeSet<u64> = BTreeSet::new();
        let mut ok: BTreeSet<u64> = BTreeSet::new();
        // Manifests missing from a chain, by the generations they break.
        let mut gaps: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for &g in gens.objects.keys().chain(gens.corrupt.keys()) {
            match gens.chain(g) {
                Ok(c) => ok.extend(c),
                Err(why) => {
                    bad.insert(g);
                    match gens.missing_link(g) {
                        Some(m) => gaps.entry(m).or_default().push(g),
                        None => problems.push(Problem {
                            key: gen_key(g),
                            kind: ProblemKind::Manifest(format!("cannot be read: {why}")),
                            generations: vec![g],
                        }),
                    }
                }
            }
        }
        // The newest's successor in the trash: readers then silently serve
        // the generation before it, and the next commit is fenced forever.
        let next = gen_key(gens.newest + 1);
        if let Ok(Some(_)) = r.remote.find_trashed(&next).await {
            gaps.entry(gens.newest + 1).or_default().push(gens.newest + 1);
        }
        for (m, users) in gaps {
            let key = gen_key(m);
            let kind = match r.remote.find_trashed(&key).await {
                Ok(Some(_)) => ProblemKind::Trashed,
                _ => ProblemKind::Missing,
            };
            problems.push(Problem { key, kind, generations: users });
        }
        ok.retain(|g| !bad.contains(g));
        // Which generations reference which pack, and how far into it.
        let mut need: BTreeMap<String, u64> = BTreeMap::new();
        let mut users: HashMap<String, BTreeSet<u64>> = HashMap::new();
        let mut full_refs: FullRefs = BTreeMap::new();
        gens.for_each_resolved(&ok, |m| {
            for (k, o, l) in frames(m) {
                let e = need.entry(k.to_string()).or_default();
                *e = (*e).max(o + l);
                users.entry(k.to_string()).or_default().insert(m.generation);
            }
            if opts.full {
                for (&idx, cr) in &m.chunks {
                    let id = match cr {
                        ChunkRef::Packed { pack, offset, .. } => (m.packs[*pack as usize].clone(), *offset, None),
                        ChunkRef::Patched { base, pack, offset, .. } => {
                            let b = match &**base {
                                ChunkRef::Packed { pack, offset, .. } => {
                                    Some((m.packs[*pack as usize].clone(), *offset))
                                }
                                _ => None,
                            };
                            (m.packs[*pack as usize].clone(), *offset, b)
                        }
                        _ => continue,
                    };
                    full_refs.entry(id).or_insert((m.generation, idx));
                }
            }
        })
        .map_err(|reason| VolumeError::CorruptManifest {
            url: r.url.clone(),
            key: "(chain)".into(),
            reason,
        })?;
        for mut p in check_objects(&r, &need, &listed, opts.parallel).await? {
            p.generations = users.get(&p.key).map(|s| s.iter().copied().collect()).unwrap_or_default();
            problems.push(p);
        }
        let mut frames_checked = 0;
        if opts.full {
            let (f, mut p) = check_frames(&r, &gens, &full_refs, &problems, opts.parallel).await?;
            frames_checked = f;
            problems.append(&mut p);
        }
        let broken: BTreeSet<u64> = problems.iter().flat_map(|p| p.generations.iter().copied()).collect();
        let all: Vec<u64> =
            gens.objects.keys().chain(gens.corrupt.keys()).copied().collect::<BTreeSet<_>>().into_iter().collect();
        let newest_intact = all.iter().rev().copied().find(|g| !broken.contains(g) && ok.contains(g));
        let readme = if listed.contains_key(README_KEY) || r.remote.head(README_KEY).await.is_ok() {
            Readme::Present
        } else if opts.repair {
            write_readme(&r.remote, &r.header.volume_id).await?;
            Readme::Written
        } else {
            Readme::Missing
        };
        Ok(VerifyReport {
            url: r.url.clone(),
            newest: gens.newest,
            generations: all,
            objects_checked: need.len() as u64,
            frames_checked,
            problems,
            newest_intact,
            readme,
        })
    })
}

/// Distinct chunk references (pack, offset, and a patch's base frame) ->
/// a (generation, chunk) that uses it.
type FullRefs = BTreeMap<(String, u64, Option<(String, u64)>), (u64, u64)>;

/// Downloads and hash-checks every distinct chunk reference once, through
/// a reader pinned at a generation that uses it.
async fn check_frames(
    r: &VolumeReader,
    gens: &super::history::Generations,
    refs: &FullRefs,
    known: &[Problem],
    parallel: usize,
) -> VolumeResult<(u64, Vec<Problem>)> {
    let gone: BTreeSet<&str> = known.iter().map(|p| p.key.as_str()).collect();
    // Group by generation: the reader serves one manifest at a time.
    let mut by_gen: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for ((key, _, base), (g, idx)) in refs {
        if gone.contains(key.as_str()) || base.as_ref().is_some_and(|(b, _)| gone.contains(b.as_str())) {
            continue;
        }
        by_gen.entry(*g).or_default().push((*idx, key.clone()));
    }
    let mut checked = 0u64;
    let mut bad: BTreeMap<String, (String, BTreeSet<u64>)> = BTreeMap::new();
    for (g, chunks) in by_gen {
        let m = match gens.objects.get(&g) {
            Some(_) => r.load_generation(g).await?,
            None => continue,
        };
        r.set_manifest(m);
        // Sub-frame indexes first: with one known, a chunk's every
        // sub-frame is checked as well as the chunk.
        for key in r.indexes_to_fetch(|_| true) {
            if gone.contains(key.as_str()) {
                continue;
            }
            if let Err(e) = r.pack_index(&key).await {
                let reason = match &e {
                    VolumeError::CorruptIndex { reason, .. } => format!("sub-frame index: {reason}"),
                    e => e.to_string(),
                };
                bad.entry(key).or_insert((reason, BTreeSet::new())).1.insert(g);
            }
        }
        let res =
            futures::stream::iter(chunks.into_iter().map(|(idx, key)| async move { (key, r.fetch_chunk(idx).await) }))
                .buffer_unordered(parallel.max(1))
                .collect::<Vec<_>>()
                .await;
        for (key, f) in res {
            checked += 1;
            if let Err(e) = f {
                let reason = match &e {
                    VolumeError::CorruptChunk { reason, .. } => reason.clone(),
                    e => e.to_string(),
                };
                bad.entry(key).or_insert((reason, BTreeSet::new())).1.insert(g);
            }
        }
    }
    let problems = bad
        .into_iter()
        .map(|(key, (why, gs))| Problem { key, kind: ProblemKind::Corrupt(why), generations: gs.into_iter().collect() })
        .collect();
    Ok((checked, problems))
}

/// The cheap part of verify for `serve`: the newest generation's packs
/// exist and are not trashed (heads, `parallel` at once). Returns the
/// problems; logs each as an error with what to do.
pub async fn check_newest(r: &VolumeReader, parallel: usize) -> VolumeResult<Vec<Problem>> {
    let m = r.manifest();
    let problems = check_manifest_objects(r, &m, parallel).await?;
    for p in &problems {
        tracing::error!(
            url = %r.url, generation = m.generation,
            "volume folder damaged: {p}; chunks in it cannot be read. Restore it (Drive: untrash it in the web UI), \
             then run `driveblk verify {}`", r.url
        );
    }
    Ok(problems)
}

/// Runs [`check_newest`] to completion on its own small runtime (call it
/// from a thread of its own: a serve must not wait for it).
pub fn check_at_open_blocking(r: &VolumeReader) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return tracing::warn!(error = %e, "cannot check the volume's objects at open"),
    };
    let t0 = std::time::Instant::now();
    match rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(120), check_newest(r, 8)).await }) {
        Ok(Ok(p)) if p.is_empty() => tracing::info!(
            generation = r.generation(),
            ms = t0.elapsed().as_millis() as u64,
            "every object of the newest generation is in the volume folder"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not check the volume's objects at open"),
        Err(_) => tracing::warn!("checking the volume's objects at open took over 120 s; gave up"),
    }
}
