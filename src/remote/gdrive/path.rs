//! `gdrive:` addresses and folder resolution: a path of names from My Drive
//! or from a folder id (a shared drive's id is its root folder's), or one
//! file by id; names are looked up one level at a time (following
//! pagination), missing folders are created on first write (mkdir -p), and
//! a name Drive holds twice is reported with both ids, never guessed.

use std::fmt;

use super::api::{q_escape, ApiError, DriveApi, DriveFile, ErrorKind, FOLDER_MIME};
use super::ids::Kind;

/// Where a path starts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DriveRoot {
    /// The account's My Drive.
    MyDrive,
    /// A folder (or shared drive) by id.
    Id(String),
}

/// A parsed `gdrive:` address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DriveLocation {
    /// `gdrive:/A/B/NAME` or `gdrive:id=FOLDER/B/NAME`: a folder (volume) or
    /// a file (object) named by a path.
    Path { root: DriveRoot, dirs: Vec<String>, name: String },
    /// `gdrive:file=ID`: one existing file, e.g. an image uploaded through
    /// the Drive web UI.
    File { id: String },
}

impl DriveLocation {
    /// Parses what follows `gdrive:`.
    pub fn parse(rest: &str) -> Result<Self, String> {
        let valid_id =
            |id: &str| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if let Some(id) = rest.strip_prefix("file=") {
            if !valid_id(id) {
                return Err(format!("gdrive:file= needs a Drive file id (letters, digits, - and _), not {id:?}"));
            }
            return Ok(DriveLocation::File { id: id.to_string() });
        }
        let (root, path) = match rest.strip_prefix("id=") {
            Some(r) => {
                let (id, path) = r.split_once('/').unwrap_or((r, ""));
                if !valid_id(id) {
                    return Err(format!("gdrive:id= needs a Drive folder id, not {id:?}"));
                }
                (DriveRoot::Id(id.to_string()), path)
            }
            None => (DriveRoot::MyDrive, rest),
        };
        let mut parts: Vec<String> = Vec::new();
        for p in path.split('/').filter(|p| !p.is_empty()) {
            if p == "." || p == ".." {
                return Err(format!("gdrive: paths may not contain {p:?}"));
            }
            parts.push(p.to_string());
        }
        let name = parts.pop().ok_or_else(|| "gdrive: URL has no name: expected gdrive:/Folder/NAME".to_string())?;
        Ok(DriveLocation::Path { root, dirs: parts, name })
    }
}

impl fmt::Display for DriveLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriveLocation::File { id } => write!(f, "gdrive:file={id}"),
            DriveLocation::Path { root, dirs, name } => {
                match root {
                    DriveRoot::MyDrive => f.write_str("gdrive:")?,
                    DriveRoot::Id(id) => write!(f, "gdrive:id={id}")?,
                }
                for d in dirs {
                    write!(f, "/{d}")?;
                }
                write!(f, "/{name}")
            }
        }
    }
}

/// A resolved folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folder {
    pub id: String,
    /// The shared drive holding it, if any (listings must name it).
    pub drive_id: Option<String>,
}

/// Exactly one of `files` named `what`, or an error naming every id when
/// Drive holds the name more than once. Drive's `name =` query matches
/// without regard to case, so the listing may hold other names (`vms`
/// for `VMs`): those are not this one.
pub fn unique(files: Vec<DriveFile>, what: &str, parent: &str) -> Result<Option<DriveFile>, ApiError> {
    let files: Vec<DriveFile> = files.into_iter().filter(|f| f.name == what).collect();
    match files.len() {
        0 => Ok(None),
        1 => Ok(files.into_iter().next()),
        n => {
            let ids: Vec<&str> = files.iter().map(|f| f.id.as_str()).collect();
            Err(ApiError::new(
                ErrorKind::Fatal,
                format!(
                    "Drive folder {parent} holds {n} items named {what:?} (ids {}): driveblk will not guess; move, rename or delete all but one",
                    ids.join(", ")
                ),
            ))
        }
    }
}

/// Whether folder `f`, known by id, is still the one named `name` in folder
/// `parent` (an id or `root`): not trashed, not renamed, and not moved
/// elsewhere in the web UI (a move keeps its name and id; only `parents`
/// says it is no longer at this path).
async fn still_at(api: &DriveApi, f: &DriveFile, name: &str, parent: &str) -> Result<bool, ApiError> {
    if f.trashed || !f.is_folder() || f.name != name {
        return Ok(false);
    }
    // No parents given (Drive lists only the ones this account can
    // discover): nothing says it moved.
    if f.parents.is_empty() || f.parents.iter().any(|p| p == parent) {
        return Ok(true);
    }
    let parent = api.canonical_folder_id(parent).await?;
    Ok(f.parents.contains(&parent))
}

/// Resolves `names` below `root` one level at a time; creates missing
/// folders when `create`, else answers `None` for a missing one.
pub async fn resolve(
    api: &DriveApi,
    root: &DriveRoot,
    names: &[String],
    create: bool,
) -> Result<Option<Folder>, ApiError> {
    let mut cur = match root {
        // "root" is Drive's alias for My Drive's folder.
        DriveRoot::MyDrive => Folder { id: "root".to_string(), drive_id: None },
        DriveRoot::Id(id) => {
            let f = api.get_file(id).await?;
            if !f.is_folder() {
                return Err(ApiError::new(
                    ErrorKind::Fatal,
                    format!(
                        "gdrive:id={id} is a file ({}), not a folder: use gdrive:file={id} for a single file",
                        f.name
                    ),
                ));
            }
            Folder { id: f.id, drive_id: f.drive_id }
        }
    };
    for name in names {
        let slot = (cur.id.clone(), name.clone());
        // A folder this process made: found by id, since a listing may
        // lag behind its create.
        let known = api.folders.lock().get(&slot).cloned();
        if let Some(id) = known {
            match api.get_file(&id).await {
                Ok(f) if still_at(api, &f, name, &cur.id).await? => {
                    cur = Folder { id: f.id, drive_id: f.drive_id.or(cur.drive_id) };
                    continue;
                }
                // Renamed, moved or trashed: no longer at this path; retry
                // a create below if one is still needed.
                Ok(_) => {
                    api.folders.lock().remove(&slot);
                }
                // Not created after all (a failed attempt): retry the
                // create with the same id below if it is still needed.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // A folder this host made (another process): by id as well,
        // confirmed to still be that folder at this path.
        if let Some(id) = api.recorded(Kind::Folder, &cur.id, name) {
            match api.get_file(&id).await {
                Ok(f) if still_at(api, &f, name, &cur.id).await? => {
                    cur = Folder { id: f.id, drive_id: f.drive_id.or(cur.drive_id) };
                    continue;
                }
                Ok(_) => api.record(Kind::Folder, &cur.id, name, ""),
                Err(e) if e.kind == ErrorKind::NotFound => api.record(Kind::Folder, &cur.id, name, ""),
                Err(e) => return Err(e),
            }
        }
        let q = format!(
            "name = '{}' and '{}' in parents and mimeType = '{FOLDER_MIME}' and trashed = false",
            q_escape(name),
            q_escape(&cur.id)
        );
        let found = unique(api.list(&q, cur.drive_id.as_deref()).await?, name, &cur.id)?;
        cur = match found {
            Some(f) => Folder { id: f.id, drive_id: f.drive_id.or(cur.drive_id) },
            None if !create => return Ok(None),
            None => {
                // A pre-generated id, remembered before the request, makes
                // the create idempotent: a retry after a lost reply answers
                // 409 instead of making a second folder.
                let pending = api.folders.lock().get(&slot).cloned();
                let id = match pending {
                    Some(id) => id,
                    None => {
                        let id = api.new_id().await?;
                        api.folders.lock().entry(slot.clone()).or_insert(id).clone()
                    }
                };
                let f = match api.create_folder(&id, name, &cur.id).await {
                    Ok(f) => f,
                    Err(e) if e.kind == ErrorKind::Conflict => api.get_file(&id).await?,
                    Err(e) => return Err(e),
                };
                tracing::info!(folder = %name, id = %f.id, "created Drive folder");
                api.record(Kind::Folder, &cur.id, name, &f.id);
                Folder { id: f.id, drive_id: f.drive_id.or(cur.drive_id) }
            }
        };
    }
    Ok(Some(cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdrive_urls_parse_and_print() {
        let l = DriveLocation::parse("/vms/win10").unwrap();
        assert_eq!(l, DriveLocation::Path { root: DriveRoot::MyDrive, dirs: vec!["vms".into()], name: "win10".into() });
        assert_eq!(l.to_string(), "gdrive:/vms/win10");
        let l = DriveLocation::parse("id=0AbC_d-1/sub/vol").unwrap();
        assert_eq!(l.to_string(), "gdrive:id=0AbC_d-1/sub/vol");
        let l = DriveLocation::parse("file=1xYz").unwrap();
        assert_eq!(l, DriveLocation::File { id: "1xYz".into() });
        assert_eq!(l.to_string(), "gdrive:file=1xYz");
        assert_eq!(DriveLocation::parse("//a//b/").unwrap().to_string(), "gdrive:/a/b");
        assert!(DriveLocation::parse("/").is_err());
        assert!(DriveLocation::parse("").is_err());
        assert!(DriveLocation::parse("id=abc").is_err());
        assert!(DriveLocation::parse("file=").is_err());
        assert!(DriveLocation::parse("file=a/b").is_err());
        assert!(DriveLocation::parse("/a/../b").is_err());
    }

    #[test]
    fn gdrive_duplicates_name_every_id() {
        let f = |id: &str| DriveFile { id: id.into(), name: "gen-2".into(), ..Default::default() };
        assert_eq!(unique(vec![], "gen-2", "p").unwrap(), None);
        assert_eq!(unique(vec![f("a")], "gen-2", "p").unwrap().unwrap().id, "a");
        // Another case of the name is another name.
        let other = DriveFile { id: "b".into(), name: "GEN-2".into(), ..Default::default() };
        assert_eq!(unique(vec![other.clone(), f("a")], "gen-2", "p").unwrap().unwrap().id, "a");
        assert_eq!(unique(vec![other], "gen-2", "p").unwrap(), None);
        let e = unique(vec![f("a1"), f("b2")], "gen-2", "P").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fatal);
        assert!(e.message.contains("a1, b2") && e.message.contains("gen-2"), "{}", e.message);
    }
}
