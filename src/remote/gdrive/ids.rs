//! The ids of the Drive folders and files this host created, kept on disk
//! (one JSON line per id), so that another process on the same host — a
//! `serve` started right after `import` — finds them by id (files.get,
//! read-after-write consistent) instead of by a listing, which lags
//! behind creates. Every id read from here is confirmed by files.get
//! before it is trusted; a stale one is forgotten and looked up by name.
//!
//! Each commit appends lines (its packs and generation; gc's deletes
//! append "forgotten" lines), so the file is rewritten without superseded
//! lines whenever it holds more than twice the live ones — at open, and
//! while a daemon runs for months. The rewrite holds an exclusive `flock`
//! on the file and appenders a shared one, so no process's line is lost
//! to a rewrite made at the same moment. In memory too only the newest
//! [`MEMORY_KEEP`] ids are kept ([`Recent`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Lines kept before the file is rewritten without superseded entries,
/// however many are live.
const COMPACT_AT: usize = 20_000;
/// Below this many lines the file is never rewritten (not worth it).
const COMPACT_MIN: usize = 1_000;
/// Entries a rewrite keeps (the newest).
const KEEP: usize = 5_000;

/// Whether a file of `lines` lines, `live` of them live, is worth
/// rewriting.
fn worth_compacting(lines: usize, live: usize) -> bool {
    lines > COMPACT_AT || (lines > COMPACT_MIN && lines > 2 * live)
}

/// Which map an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "d")]
    Folder,
    #[serde(rename = "f")]
    File,
}

#[derive(Serialize, Deserialize)]
struct Line {
    /// The API base URL (one file serves every endpoint).
    u: String,
    k: Kind,
    /// Parent folder id.
    p: String,
    /// Name (a folder's name, or an object's key).
    n: String,
    /// The file id; empty: forgotten.
    i: String,
}

/// (kind, parent id, name) -> id.
pub type Entries = Recent<(Kind, String, String), String>;

/// Ids a process keeps in memory, at most this many (the newest): a daemon
/// that runs for months makes a pack and a generation every few seconds,
/// and the id of an object gc deleted long ago is never asked for again.
/// One evicted that is asked for is looked up by name, as on a new host.
pub const MEMORY_KEEP: usize = 20_000;

/// A map that keeps only its [`MEMORY_KEEP`] most recently inserted
/// entries (an insert of a present key makes it recent again).
pub struct Recent<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Insertion order; an entry whose stamp is not the map's is stale.
    order: std::collections::VecDeque<(K, u64)>,
    stamp: u64,
    cap: usize,
}

impl<K: Clone + Eq + std::hash::Hash, V> Default for Recent<K, V> {
    fn default() -> Self {
        Self::with_cap(MEMORY_KEEP)
    }
}

impl<K, V> IntoIterator for Recent<K, V> {
    type Item = (K, V);
    type IntoIter = std::iter::Map<std::collections::hash_map::IntoIter<K, (V, u64)>, fn((K, (V, u64))) -> (K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter().map(|(k, (v, _))| (k, v))
    }
}

impl<K: Clone + Eq + std::hash::Hash, V> Recent<K, V> {
    /// An empty map keeping at most `cap` entries.
    pub fn with_cap(cap: usize) -> Self {
        Self { map: HashMap::new(), order: Default::default(), stamp: 0, cap: cap.max(1) }
    }

    pub fn new() -> Self {
        Self::default()
    }

    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.get(k).map(|(v, _)| v)
    }

    pub fn insert(&mut self, k: K, v: V) {
        self.stamp += 1;
        self.order.push_back((k.clone(), self.stamp));
        self.map.insert(k, (v, self.stamp));
        while self.map.len() > self.cap {
            let Some((old, stamp)) = self.order.pop_front() else { break };
            if self.map.get(&old).is_some_and(|(_, s)| *s == stamp) {
                self.map.remove(&old);
            }
        }
        // Re-inserts and removals leave stale entries behind: drop them
        // before they outgrow the map.
        if self.order.len() > self.cap.saturating_mul(2) {
            let map = &self.map;
            self.order.retain(|(k, stamp)| map.get(k).is_some_and(|(_, s)| s == stamp));
        }
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.remove(k).map(|(v, _)| v)
    }

    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.contains_key(k)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The on-disk record for one API endpoint.
#[derive(Debug)]
pub struct IdRecord {
    path: Option<PathBuf>,
    api_url: String,
    /// (lines in the file, live lines among them) as of the last read,
    /// plus the lines this process appended since.
    counts: parking_lot::Mutex<(usize, usize)>,
}

/// What the file holds: every line, and how many are live (the last of
/// their endpoint, kind, parent and name, not a "forgotten" one).
fn read_lines(text: &str) -> (Vec<Line>, usize) {
    let all: Vec<Line> = text.lines().filter_map(|l| serde_json::from_str::<Line>(l).ok()).collect();
    let live = {
        let mut last: HashMap<(&str, Kind, &str, &str), bool> = HashMap::new();
        for l in &all {
            last.insert((&l.u, l.k, &l.p, &l.n), !l.i.is_empty());
        }
        last.values().filter(|v| **v).count()
    };
    (all, live)
}

impl IdRecord {
    /// Opens the record at `path` (None: keep nothing) and answers what it
    /// holds for `api_url`. Unreadable lines are skipped: this is a cache.
    pub fn open(path: Option<PathBuf>, api_url: &str) -> (Self, Entries) {
        let mut entries = Entries::new();
        let mut counts = (0, 0);
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                let (all, live) = read_lines(&text);
                for l in all.iter().filter(|l| l.u == api_url) {
                    let key = (l.k, l.p.clone(), l.n.clone());
                    if l.i.is_empty() {
                        entries.remove(&key);
                    } else {
                        entries.insert(key, l.i.clone());
                    }
                }
                counts = (all.len(), live);
            }
        }
        let r = Self { path, api_url: api_url.to_string(), counts: parking_lot::Mutex::new(counts) };
        r.compact_if_worth_it();
        (r, entries)
    }

    /// Records `id` (empty: forgets) for `name` in `parent`.
    pub fn add(&self, kind: Kind, parent: &str, name: &str, id: &str) {
        let Some(p) = &self.path else { return };
        let line = Line { u: self.api_url.clone(), k: kind, p: parent.into(), n: name.into(), i: id.into() };
        let Ok(mut s) = serde_json::to_string(&line) else { return };
        s.push('\n');
        if let Err(e) = append(p, s.as_bytes()) {
            tracing::debug!(path = %p.display(), error = %e, "cannot record a Drive id (lookups fall back to listings)");
            return;
        }
        self.counts.lock().0 += 1;
        self.compact_if_worth_it();
    }

    /// Rewrites the file without superseded lines once it has grown past
    /// twice its live lines (as last counted; counted again under the
    /// lock, since other processes append and rewrite too).
    fn compact_if_worth_it(&self) {
        let Some(p) = &self.path else { return };
        let (lines, live) = *self.counts.lock();
        if !worth_compacting(lines, live) {
            return;
        }
        match compact(p) {
            Ok(now) => *self.counts.lock() = now,
            Err(e) => {
                tracing::debug!(path = %p.display(), error = %e, "cannot rewrite the Drive id record");
                // Not again before it doubles once more.
                *self.counts.lock() = (lines, lines);
            }
        }
    }
}

/// Takes a `flock` on `f`, the record at `p`: others hold it for the
/// time of an append or a rewrite, and a holder stopped for longer costs
/// only this lookup cache.
fn lock(f: &std::fs::File, exclusive: bool, p: &Path) -> std::io::Result<()> {
    crate::remote::file_lock::lock_within(f, exclusive, std::time::Duration::from_secs(1), p)
}

/// Whether `f` is still the file at `p` (not one a rewrite renamed away).
fn is_current(f: &std::fs::File, p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(p)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn append(p: &Path, line: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = p.parent() {
        crate::remote::private::create_dir_all(d)?;
    }
    loop {
        // One write of one line with O_APPEND: concurrent processes
        // interleave whole lines. The shared lock keeps a rewrite out
        // meanwhile; a file a rewrite replaced while we waited is left
        // for the new one.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(p)?;
        lock(&f, false, p)?;
        if is_current(&f, p) {
            return f.write_all(line);
        }
    }
}

/// Rewrites the file with the last entry of each (endpoint, kind, parent,
/// name), keeping the newest [`KEEP`] (a test machine meets a new emulator
/// endpoint every run; ids of old ones are never asked for again), under
/// an exclusive lock, if it is still worth it. Answers the file's (lines,
/// live lines) afterwards.
fn compact(p: &Path) -> std::io::Result<(usize, usize)> {
    use std::io::Read;
    let mut f = loop {
        let f = std::fs::File::open(p)?;
        lock(&f, true, p)?;
        if is_current(&f, p) {
            break f;
        }
    };
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let (all, live) = read_lines(&text);
    if !worth_compacting(all.len(), live) {
        return Ok((all.len(), live));
    }
    let mut last: HashMap<(String, Kind, String, String), (usize, Line)> = HashMap::new();
    for (i, l) in all.into_iter().enumerate() {
        last.insert((l.u.clone(), l.k, l.p.clone(), l.n.clone()), (i, l));
    }
    let mut keep: Vec<(usize, Line)> = last.into_values().filter(|(_, l)| !l.i.is_empty()).collect();
    keep.sort_by_key(|(i, _)| *i);
    let skip = keep.len().saturating_sub(KEEP);
    let mut out = String::new();
    let mut kept = 0;
    for (_, l) in keep.into_iter().skip(skip) {
        if let Ok(s) = serde_json::to_string(&l) {
            out.push_str(&s);
            out.push('\n');
            kept += 1;
        }
    }
    let tmp = p.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut t = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        t.write_all(out.as_bytes())?;
    }
    std::fs::rename(&tmp, p)?;
    Ok((kept, kept))
}

/// Where the record lives: `$XDG_CACHE_HOME/driveblk/gdrive-ids.jsonl`, else
/// `~/.cache/driveblk/gdrive-ids.jsonl`.
pub fn default_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(dir.join("driveblk").join("gdrive-ids.jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdrive_id_record_round_trips_and_forgets() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/ids.jsonl");
        let (r, e) = IdRecord::open(Some(p.clone()), "http://a");
        assert!(e.is_empty());
        r.add(Kind::Folder, "root", "vms", "F1");
        r.add(Kind::File, "F1", "volume.json", "H1");
        r.add(Kind::File, "F1", "gen-1", "G1");
        r.add(Kind::File, "F1", "gen-1", "");
        let (_, other) = IdRecord::open(Some(p.clone()), "http://b");
        assert!(other.is_empty(), "entries are per endpoint");
        let (_, e) = IdRecord::open(Some(p), "http://a");
        assert_eq!(e.get(&(Kind::Folder, "root".into(), "vms".into())).map(String::as_str), Some("F1"));
        assert_eq!(e.get(&(Kind::File, "F1".into(), "volume.json".into())).map(String::as_str), Some("H1"));
        assert!(!e.contains_key(&(Kind::File, "F1".into(), "gen-1".into())));
    }

    /// A daemon running for months: each commit records its generation,
    /// gc forgets old ones. The file stays near its live lines, rewritten
    /// while in use, not only at the next open.
    #[test]
    fn gdrive_id_record_is_compacted_while_in_use() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ids.jsonl");
        let (r, _) = IdRecord::open(Some(p.clone()), "http://a");
        r.add(Kind::Folder, "root", "vms", "F1");
        for g in 0..5000 {
            r.add(Kind::File, "F1", &format!("gen-{g}"), &format!("G{g}"));
            if g >= 2 {
                r.add(Kind::File, "F1", &format!("gen-{}", g - 2), "");
            }
        }
        let lines = std::fs::read_to_string(&p).unwrap().lines().count();
        assert!(lines <= COMPACT_MIN + 1, "{lines} lines for 3 live ids");
        let (_, e) = IdRecord::open(Some(p), "http://a");
        let mut live: Vec<_> = e.into_iter().map(|((_, _, n), i)| (n, i)).collect();
        live.sort();
        assert_eq!(
            live,
            [("gen-4998".into(), "G4998".into()), ("gen-4999".into(), "G4999".into()), ("vms".into(), "F1".into())]
        );
    }

    /// Two processes append to one record while both rewrite it: no line
    /// either wrote is lost to the other's rewrite.
    #[test]
    fn gdrive_id_record_rewrites_lose_no_concurrent_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ids.jsonl");
        let writers: Vec<_> = ["http://a", "http://b"]
            .into_iter()
            .map(|u| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let (r, _) = IdRecord::open(Some(p), u);
                    for g in 0..3000 {
                        r.add(Kind::File, "F", &format!("gen-{g}"), &format!("{u}-{g}"));
                        if g >= 1 {
                            r.add(Kind::File, "F", &format!("gen-{}", g - 1), "");
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        for u in ["http://a", "http://b"] {
            let (_, e) = IdRecord::open(Some(p.clone()), u);
            let live: Vec<_> = e.into_iter().map(|((_, _, n), i)| (n, i)).collect();
            assert_eq!(live, [("gen-2999".to_string(), format!("{u}-2999"))], "{u}");
        }
    }
}
