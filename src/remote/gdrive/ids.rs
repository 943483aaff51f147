//! The ids of the Drive folders and files this host created, kept on disk
//! (one JSON line per id), so that another process on the same host — a
//! `serve` started right after `import` — finds them by id (files.get,
//! read-after-write consistent) instead of by a listing, which lags
//! behind creates. Every id read from here is confirmed by files.get
//! before it is trusted; a stale one is forgotten and looked up by name.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Lines kept before the file is rewritten without superseded entries.
const COMPACT_AT: usize = 20_000;
/// Entries a rewrite keeps (the newest).
const KEEP: usize = 5_000;

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
pub type Entries = HashMap<(Kind, String, String), String>;

/// The on-disk record for one API endpoint.
#[derive(Debug)]
pub struct IdRecord {
    path: Option<PathBuf>,
    api_url: String,
    lock: parking_lot::Mutex<()>,
}

impl IdRecord {
    /// Opens the record at `path` (None: keep nothing) and answers what it
    /// holds for `api_url`. Unreadable lines are skipped: this is a cache.
    pub fn open(path: Option<PathBuf>, api_url: &str) -> (Self, Entries) {
        let mut entries = Entries::new();
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                let mut lines = 0usize;
                let mut all: Vec<Line> = Vec::new();
                for l in text.lines().filter_map(|l| serde_json::from_str::<Line>(l).ok()) {
                    lines += 1;
                    if l.u == api_url {
                        let key = (l.k, l.p.clone(), l.n.clone());
                        if l.i.is_empty() {
                            entries.remove(&key);
                        } else {
                            entries.insert(key, l.i.clone());
                        }
                    }
                    all.push(l);
                }
                if lines > COMPACT_AT {
                    compact(p, all);
                }
            }
        }
        (Self { path, api_url: api_url.to_string(), lock: parking_lot::Mutex::new(()) }, entries)
    }

    /// Records `id` (empty: forgets) for `name` in `parent`.
    pub fn add(&self, kind: Kind, parent: &str, name: &str, id: &str) {
        let Some(p) = &self.path else { return };
        let line = Line { u: self.api_url.clone(), k: kind, p: parent.into(), n: name.into(), i: id.into() };
        let Ok(mut s) = serde_json::to_string(&line) else { return };
        s.push('\n');
        let _g = self.lock.lock();
        if let Err(e) = append(p, s.as_bytes()) {
            tracing::debug!(path = %p.display(), error = %e, "cannot record a Drive id (lookups fall back to listings)");
        }
    }
}

fn append(p: &Path, line: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    // One write of one line with O_APPEND: concurrent processes interleave
    // whole lines.
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(p)?;
    f.write_all(line)
}

/// Rewrites the file with the last entry of each (endpoint, kind, parent,
/// name), keeping the newest [`KEEP`] (a test machine meets a new emulator
/// endpoint every run; ids of old ones are never asked for again).
fn compact(p: &Path, all: Vec<Line>) {
    let mut last: HashMap<(String, Kind, String, String), (usize, Line)> = HashMap::new();
    for (i, l) in all.into_iter().enumerate() {
        last.insert((l.u.clone(), l.k, l.p.clone(), l.n.clone()), (i, l));
    }
    let mut keep: Vec<(usize, Line)> = last.into_values().filter(|(_, l)| !l.i.is_empty()).collect();
    keep.sort_by_key(|(i, _)| *i);
    let skip = keep.len().saturating_sub(KEEP);
    let mut out = String::new();
    for (_, l) in keep.into_iter().skip(skip) {
        if let Ok(s) = serde_json::to_string(&l) {
            out.push_str(&s);
            out.push('\n');
        }
    }
    let tmp = p.with_extension("tmp");
    if std::fs::write(&tmp, out).is_ok() {
        let _ = std::fs::rename(&tmp, p);
    }
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
}
