//! The `gdrive:` backend: a volume is a Drive folder, an object is a file
//! in it named by its key; a base image may be one file by id. Implements
//! the [`Remote`] trait's semantics on a store whose names are not unique:
//! keys are looked up (and duplicates reported), puts replace in place and
//! are made idempotent with pre-generated ids, and creates at a reserved
//! slot (a `files.generateIds` id) are the commit fence — a second create
//! with that id answers 409.

pub mod api;
pub mod auth;
pub mod ids;
pub mod pacer;
pub mod path;
pub mod selftest;
#[cfg(test)]
pub(crate) mod test_http;
pub mod upload;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};

use self::api::{ApiError, DriveApi, DriveFile, ErrorKind, TAG_PROPERTY};
use self::path::{resolve, unique, DriveLocation, DriveRoot, Folder};
use super::config::DriveConfig;
use super::{ObjectMeta, PutBody, Remote, RemoteError, RemoteResult, Slot};

pub use self::path::DriveLocation as Location;

/// One [`DriveApi`] per distinct configuration, for the life of the
/// process: every remote of one account (a volume and its base, and the
/// remotes of later calls) shares the pacer, the token, the connection pool
/// and what this process knows about the objects it wrote. A process uses
/// a handful of configurations at most.
pub fn api_for(cfg: &DriveConfig) -> Arc<DriveApi> {
    let mut clients = CLIENTS.lock();
    if let Some((_, a)) = clients.iter().find(|(c, _)| c == cfg) {
        return a.clone();
    }
    let a = Arc::new(DriveApi::new(cfg));
    clients.push((cfg.clone(), a.clone()));
    a
}

/// Ranged reads asked of Drive, requests sent for them, and reads merged
/// into a shared request, summed over every account this process uses
/// (for `status`).
pub fn read_merge_totals() -> (u64, u64, u64) {
    api_totals(|a| a.read_merge.snapshot())
}

/// The Drive pacer's rate in force (the highest over this process's
/// accounts) and the rate-limit refusals Drive gave them all, or None when
/// this process has not used Drive (for `status`).
pub fn pacer_totals() -> Option<pacer::PacerStats> {
    let clients = CLIENTS.lock();
    (!clients.is_empty()).then(|| {
        clients.iter().map(|(_, a)| a.pacer.stats()).fold(pacer::PacerStats::default(), |s, x| pacer::PacerStats {
            rate: s.rate.max(x.rate),
            refusals: s.refusals + x.refusals,
        })
    })
}

fn api_totals(f: impl Fn(&DriveApi) -> (u64, u64, u64)) -> (u64, u64, u64) {
    CLIENTS.lock().iter().map(|(_, a)| f(a)).fold((0, 0, 0), |s, x| (s.0 + x.0, s.1 + x.1, s.2 + x.2))
}

/// Every [`DriveApi`] this process made, by configuration.
static CLIENTS: parking_lot::Mutex<Vec<(DriveConfig, Arc<DriveApi>)>> = parking_lot::Mutex::new(Vec::new());

/// What a remote is rooted at.
#[derive(Debug, Clone)]
enum Target {
    /// A folder named by a path; resolved at first use.
    Folder { root: DriveRoot, names: Vec<String> },
    /// One file by id (read-only; its key is its id).
    File { id: String },
}

/// A Drive folder (or single file) as a [`Remote`].
pub struct GDriveRemote {
    api: Arc<DriveApi>,
    target: Target,
    name: String,
    /// The folder once resolved (single flight: the lock is held while
    /// resolving, so concurrent first calls do not each create it).
    folder: tokio::sync::Mutex<Option<Folder>>,
    /// The resolved folder's id, for the account-wide key -> id map
    /// (`DriveApi::known`; names of objects are never changed by driveblk,
    /// so an id stays right until a delete).
    folder_key: parking_lot::Mutex<Option<String>>,
    /// key -> the pre-generated id a create of that key uses, kept until it
    /// lands, so a put retried after a lost reply reuses it (409, not a
    /// duplicate file).
    pending: parking_lot::Mutex<HashMap<String, String>>,
    /// key -> file id from [`Remote::locate`] (ids a manifest recorded):
    /// used before any name lookup, so objects another machine created
    /// moments ago are read without waiting for a listing to show them.
    located: parking_lot::Mutex<ids::Recent<String, String>>,
}

impl std::fmt::Debug for GDriveRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl GDriveRemote {
    /// The folder `location` names (a volume). For `gdrive:file=` this
    /// remote is the single file.
    pub fn folder(location: &DriveLocation, cfg: &DriveConfig) -> Self {
        let target = match location {
            DriveLocation::Path { root, dirs, name } => {
                let mut names = dirs.clone();
                names.push(name.clone());
                Target::Folder { root: root.clone(), names }
            }
            DriveLocation::File { id } => Target::File { id: id.clone() },
        };
        Self::new(target, location.to_string(), cfg)
    }

    /// The parent folder of the object `location` names, and its key (how a
    /// base image is opened). For `gdrive:file=ID` the remote is the file
    /// and the key is its id.
    pub fn object(location: &DriveLocation, cfg: &DriveConfig) -> (Self, String) {
        match location {
            DriveLocation::Path { root, dirs, name } => {
                let shown = match root {
                    DriveRoot::MyDrive => format!("gdrive:/{}", dirs.join("/")),
                    DriveRoot::Id(id) if dirs.is_empty() => format!("gdrive:id={id}"),
                    DriveRoot::Id(id) => format!("gdrive:id={id}/{}", dirs.join("/")),
                };
                let t = Target::Folder { root: root.clone(), names: dirs.clone() };
                (Self::new(t, shown, cfg), name.clone())
            }
            DriveLocation::File { id } => {
                (Self::new(Target::File { id: id.clone() }, location.to_string(), cfg), id.clone())
            }
        }
    }

    fn new(target: Target, name: String, cfg: &DriveConfig) -> Self {
        Self {
            api: api_for(cfg),
            target,
            name,
            folder: tokio::sync::Mutex::new(None),
            folder_key: parking_lot::Mutex::new(None),
            pending: parking_lot::Mutex::new(HashMap::new()),
            located: parking_lot::Mutex::new(ids::Recent::new()),
        }
    }

    /// The account connection (for `selftest` and `auth status`).
    pub fn api(&self) -> &Arc<DriveApi> {
        &self.api
    }

    fn err(&self, op: &'static str, key: &str, e: ApiError) -> RemoteError {
        let (remote, key) = (self.name.clone(), key.to_string());
        let message = e.to_string();
        match e.kind {
            ErrorKind::Transient => RemoteError::Transient { remote, op, key, message, retry_after: e.retry_after },
            ErrorKind::Quota => RemoteError::Quota { remote, op, key, message },
            ErrorKind::Auth => RemoteError::Auth { remote, op, key, message },
            ErrorKind::NotFound => RemoteError::NotFound { remote, key },
            ErrorKind::Conflict | ErrorKind::RangeNotSatisfiable | ErrorKind::Abusive | ErrorKind::Fatal => {
                RemoteError::Fatal { remote, op, key, message }
            }
            ErrorKind::GaveUp => RemoteError::RetriesExhausted {
                op,
                key: key.clone(),
                attempts: self.api.cfg.upload_attempts,
                last: Box::new(RemoteError::Transient { remote, op, key, message, retry_after: e.retry_after }),
            },
        }
    }

    fn fatal(&self, op: &'static str, key: &str, message: impl Into<String>) -> RemoteError {
        RemoteError::Fatal { remote: self.name.clone(), op, key: key.to_string(), message: message.into() }
    }

    /// A write into the volume's folder while it is in the Drive trash.
    fn folder_in_trash(&self, op: &'static str, key: &str) -> RemoteError {
        self.fatal(op, key, "the volume's folder is in the Drive trash (restore it: Drive web UI, Trash, Restore)")
    }

    fn not_found(&self, key: &str) -> RemoteError {
        RemoteError::NotFound { remote: self.name.clone(), key: key.to_string() }
    }

    /// Refuses writes to a single-file remote.
    fn writable(&self, op: &'static str, key: &str) -> RemoteResult<()> {
        match &self.target {
            Target::Folder { .. } => Ok(()),
            Target::File { .. } => Err(self.fatal(op, key, "gdrive:file= names one existing file, which driveblk never writes; a volume needs a folder (gdrive:/path or gdrive:id=FOLDER/NAME)")),
        }
    }

    /// The folder, resolved once; `create` makes missing folders (writes
    /// do, reads never do). `None`: it does not exist (yet).
    async fn folder_id(&self, op: &'static str, key: &str, create: bool) -> RemoteResult<Option<Folder>> {
        let (root, names) = match &self.target {
            Target::Folder { root, names } => (root, names),
            Target::File { .. } => return Err(self.fatal(op, key, "a gdrive:file= remote has no folder")),
        };
        let mut g = self.folder.lock().await;
        if let Some(f) = g.as_ref() {
            return Ok(Some(f.clone()));
        }
        let f = resolve(&self.api, root, names, create).await.map_err(|e| self.err(op, key, e))?;
        if let Some(f) = &f {
            tracing::debug!(remote = %self.name, id = %f.id, "resolved Drive folder");
            *g = Some(f.clone());
            *self.folder_key.lock() = Some(f.id.clone());
        }
        Ok(f)
    }

    /// The folder a write goes into. Writes never make it (only
    /// [`create_folder`](Remote::create_folder) does, for a new volume): a
    /// volume folder renamed, moved or deleted in the web UI would be made
    /// again empty at the old path, and commits land there unseen.
    async fn write_folder(&self, op: &'static str, key: &str) -> RemoteResult<Folder> {
        self.folder_id(op, key, false).await?.ok_or_else(|| {
            self.fatal(
                op,
                key,
                "the volume's folder is not on Drive at this path (renamed, moved, trashed or deleted in the web UI?): \
                 put it back, or pass its new path; writes never make it again",
            )
        })
    }

    /// The file id of `key`, if this process knows it.
    fn known_id(&self, key: &str) -> Option<String> {
        let folder = self.folder_key.lock().clone();
        let known = folder.and_then(|f| self.api.known.lock().get(&(f, key.to_string())).cloned());
        known.or_else(|| self.located.lock().get(key).cloned())
    }

    fn remember(&self, key: &str, id: &str) {
        if let Some(folder) = self.folder_key.lock().clone() {
            self.api.known.lock().insert((folder, key.to_string()), id.to_string());
        }
    }

    /// [`remember`](Self::remember) an object this process created, and
    /// record it on disk for other processes on this host.
    fn created(&self, key: &str, id: &str) {
        self.remember(key, id);
        if let Some(folder) = self.folder_key.lock().clone() {
            self.api.record(ids::Kind::File, &folder, key, id);
        }
    }

    fn forget(&self, key: &str) {
        self.located.lock().remove(key);
        if let Some(folder) = self.folder_key.lock().clone() {
            self.api.record(ids::Kind::File, &folder, key, "");
            self.api.known.lock().remove(&(folder, key.to_string()));
        }
    }

    /// The objects under `prefix`, past `after` when given: then listed
    /// newest name first, reading stops at the first key at or before
    /// `after` — unless Drive ignored the order (its documented limit for
    /// users with about a million files), seen as keys out of order: then
    /// every page is read.
    async fn list_past(&self, prefix: &str, after: Option<&str>) -> RemoteResult<Vec<ObjectMeta>> {
        let past = |name: &str| after.is_none_or(|a| name > a);
        if let Target::File { id } = &self.target {
            return match self.lookup("list", id).await? {
                Some(f) if id.starts_with(prefix) && past(id) => Ok(vec![self.meta(id, &f)]),
                _ => Ok(Vec::new()),
            };
        }
        let Some(folder) = self.folder_id("list", prefix, false).await? else { return Ok(Vec::new()) };
        let q = listing_query(&folder.id, prefix);
        let drive = folder.drive_id.as_deref();
        let files = match after {
            None => self.api.list(&q, drive).await,
            Some(after) => {
                let (mut last, mut sorted) = (None::<String>, true);
                let counter = |n: &str| {
                    n.len() == after.len()
                        && n.strip_prefix(prefix).is_some_and(|d| d.bytes().all(|c| c.is_ascii_digit()))
                };
                self.api
                    .list_pages(&q, drive, Some("name desc"), |page| {
                        for f in page.iter().filter(|f| counter(&f.name)) {
                            sorted &= last.as_deref().is_none_or(|l| f.name.as_str() <= l);
                            last = Some(f.name.clone());
                        }
                        !(sorted && last.as_deref().is_some_and(|l| l <= after))
                    })
                    .await
            }
        }
        .map_err(|e| self.err("list", prefix, e))?;
        let mut by_name: HashMap<String, Vec<DriveFile>> = HashMap::new();
        for f in files.into_iter().filter(|f| !f.is_folder() && f.name.starts_with(prefix) && past(&f.name)) {
            by_name.entry(f.name.clone()).or_default().push(f);
        }
        let mut out = Vec::with_capacity(by_name.len());
        for (name, files) in by_name {
            let f = unique(files, &name, &self.name).map_err(|e| self.err("list", &name, e))?.expect("non-empty");
            self.remember(&name, &f.id);
            out.push(self.meta(&name, &f));
        }
        // Objects this process wrote that the listing does not show yet
        // (it lags behind creates): confirmed by id, so a deleted or
        // trashed one is dropped, never listed.
        let listed: std::collections::HashSet<String> = out.iter().map(|m| m.key.clone()).collect();
        let unlisted: Vec<(String, String)> = self
            .known_keys()
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix) && past(k) && !listed.contains(k))
            .collect();
        let checks = futures::stream::iter(unlisted.into_iter().map(|(key, id)| async move {
            let r = self.api.get_file(&id).await;
            (key, r)
        }))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
        for (key, r) in checks {
            match r {
                Ok(f) if !f.trashed && f.name == key => out.push(self.meta(&key, &f)),
                Ok(_) => self.forget(&key),
                Err(e) if e.kind == ErrorKind::NotFound => self.forget(&key),
                Err(e) => return Err(self.err("list", &key, e)),
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Keys this process knows in the folder, with their ids.
    fn known_keys(&self) -> Vec<(String, String)> {
        let Some(folder) = self.folder_key.lock().clone() else { return Vec::new() };
        self.api
            .known
            .lock()
            .iter()
            .filter(|((f, _), _)| *f == folder)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The file named `key` in the folder, looked up by name (this lags
    /// behind creates; see `head_created`). Duplicates are an error.
    async fn lookup(&self, op: &'static str, key: &str) -> RemoteResult<Option<DriveFile>> {
        if let Target::File { id } = &self.target {
            if key != id {
                return Err(self.not_found(key));
            }
            return self.get_by_id(op, key, id).await.map(Some).or_else(|e| {
                if e.is_not_found() {
                    Ok(None)
                } else {
                    Err(e)
                }
            });
        }
        let Some(folder) = self.folder_id(op, key, false).await? else { return Ok(None) };
        let q = format!(
            "name = '{}' and '{}' in parents and trashed = false",
            api::q_escape(key),
            api::q_escape(&folder.id)
        );
        let files = self.api.list(&q, folder.drive_id.as_deref()).await.map_err(|e| self.err(op, key, e))?;
        let files: Vec<DriveFile> = files.into_iter().filter(|f| !f.is_folder()).collect();
        let f = unique(files, key, &self.name).map_err(|e| self.err(op, key, e))?;
        if let Some(f) = &f {
            self.remember(key, &f.id);
        }
        Ok(f)
    }

    /// files.get by id; a trashed file counts as absent.
    async fn get_by_id(&self, op: &'static str, key: &str, id: &str) -> RemoteResult<DriveFile> {
        let f = self.api.get_file(id).await.map_err(|e| self.err(op, key, e))?;
        if f.trashed {
            return Err(self.not_found(key));
        }
        Ok(f)
    }

    /// Current metadata of `key`: through its cached id when known (a
    /// files.get, fresh), else by name.
    async fn find(&self, op: &'static str, key: &str) -> RemoteResult<DriveFile> {
        if let Target::Folder { .. } = &self.target {
            // Resolved first, so ids this process knows in it are found.
            if self.folder_id(op, key, false).await?.is_none() {
                return Err(self.not_found(key));
            }
        }
        let cached = self.known_id(key);
        if let Some(id) = cached {
            match self.get_by_id(op, key, &id).await {
                Ok(f) if f.name == key || matches!(self.target, Target::File { .. }) => return Ok(f),
                // Renamed by someone: not this key any more.
                Ok(_) => self.forget(key),
                // Deleted behind our back: forget the id, look again.
                Err(e) if e.is_not_found() => {
                    self.forget(key);
                }
                Err(e) => return Err(e),
            }
        }
        self.lookup(op, key).await?.ok_or_else(|| self.not_found(key))
    }

    /// [`find_id`](Self::find_id) for an object a reader knows exists (a
    /// pack a manifest names, a profile pack): another machine may have
    /// created it moments ago, and Drive's listings lag behind creates, so
    /// a miss is looked up again for up to [`LISTING_GRACE`] before it
    /// counts as not found.
    async fn find_id_within_lag(&self, op: &'static str, key: &str) -> RemoteResult<String> {
        let t0 = std::time::Instant::now();
        let mut wait = std::time::Duration::from_millis(250);
        loop {
            match self.find_id(op, key).await {
                Err(e) if e.is_not_found() && t0.elapsed() < LISTING_GRACE => {
                    tracing::debug!(key, "not listed yet; looking again (Drive listings lag behind creates)");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }

    /// The id of `key` (cached, or looked up).
    async fn find_id(&self, op: &'static str, key: &str) -> RemoteResult<String> {
        if let Target::File { id } = &self.target {
            return if key == id { Ok(id.clone()) } else { Err(self.not_found(key)) };
        }
        if self.folder_id(op, key, false).await?.is_none() {
            return Err(self.not_found(key));
        }
        if let Some(id) = self.known_id(key) {
            return Ok(id);
        }
        Ok(self.lookup(op, key).await?.ok_or_else(|| self.not_found(key))?.id)
    }

    /// Marks the current content revision of `key` keep-forever, so Drive
    /// never purges the bytes a volume's base was pinned to (renames and
    /// shares do not make revisions; replacing the content does, and is
    /// detected through [`ObjectMeta::version`]). Answers the revision id.
    pub async fn pin_revision(&self, key: &str) -> RemoteResult<String> {
        let f = self.find("pin_revision", key).await?;
        let rev = f
            .head_revision_id
            .clone()
            .ok_or_else(|| self.fatal("pin_revision", key, "Drive reports no head revision for this file"))?;
        self.api.keep_revision(&f.id, &rev).await.map_err(|e| self.err("pin_revision", key, e))?;
        Ok(rev)
    }

    /// Copies `key` server-side into `dest` as `dest_key` (how a volume
    /// adopts its base so it no longer depends on the original file), with
    /// the pre-generated id `id` (a slot `dest.reserve` gave): a retry
    /// after a lost reply gets 409 and finds the copy instead of making a
    /// second one. files.copy copies the head revision.
    pub async fn copy_to(&self, key: &str, dest: &GDriveRemote, dest_key: &str, id: &str) -> RemoteResult<ObjectMeta> {
        let src = self.find("copy", key).await?;
        dest.writable("copy", dest_key)?;
        let folder = dest.write_folder("copy", dest_key).await?;
        let f = match self.api.copy(&src.id, id, dest_key, &folder.id).await {
            Ok(f) => f,
            Err(e) if e.kind == ErrorKind::Conflict => {
                let f = self.api.get_file(id).await.map_err(|e| dest.err("copy", dest_key, e))?;
                if f.name != dest_key || f.trashed {
                    return Err(dest.fatal("copy", dest_key, format!("id {id} holds another file ({:?})", f.name)));
                }
                f
            }
            Err(e) => return Err(dest.err("copy", dest_key, e)),
        };
        dest.created(dest_key, &f.id);
        Ok(dest.meta(dest_key, &f))
    }

    fn meta(&self, key: &str, f: &DriveFile) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: f.size(),
            version: f.content_version(),
            sha256: f.sha256_checksum.clone(),
            tag: f.tag(),
            created_ms: f.created_ms(),
            modified_ms: f.modified_ms(),
            revision: f.head_revision_id.clone(),
            md5: f.md5_checksum.clone(),
            slot: Some(Slot(f.id.clone())),
        }
    }

    /// Uploads `body` as a new file (`meta` names id, name, parents) or as
    /// the new content of `existing`: one request when small, else a
    /// resumable session. Checks Drive's md5 against the bytes sent.
    async fn upload(
        &self,
        meta: &serde_json::Value,
        existing: Option<&str>,
        body: &PutBody,
    ) -> Result<DriveFile, ApiError> {
        let small = body.len().is_some_and(|n| n <= self.api.cfg.resumable_threshold);
        if small {
            let data = super::collect_body(body)
                .await
                .map_err(|e| ApiError::new(ErrorKind::Fatal, format!("reading the upload's body: {e}")))?;
            let md5 = hex::encode(Md5::digest(&data));
            let len = data.len() as u64;
            let f = self.api.upload_simple(meta, existing, Bytes::from(data)).await?;
            upload::check_landed(&f, len, &md5)?;
            Ok(f)
        } else {
            Ok(upload::resumable(&self.api, meta, existing, body).await?.0)
        }
    }

    /// Creates `key` with the pre-generated `id` (and `tag`), answering
    /// `Err(Conflict)` if a file with that id exists already.
    async fn create_with_id(
        &self,
        folder: &Folder,
        key: &str,
        id: &str,
        tag: Option<&str>,
        body: &PutBody,
    ) -> Result<DriveFile, ApiError> {
        let mut meta = serde_json::json!({ "id": id, "name": key, "parents": [folder.id] });
        if let Some(t) = tag {
            meta["appProperties"] = serde_json::json!({ TAG_PROPERTY: t });
        }
        self.upload(&meta, None, body).await
    }

    /// md5 and length of a body (to recognise a landed earlier attempt).
    async fn body_md5(body: &PutBody) -> std::io::Result<(String, u64)> {
        use futures::StreamExt;
        let mut h = Md5::new();
        let mut n = 0u64;
        let mut s = body.stream();
        while let Some(c) = s.next().await {
            let c = c?;
            n += c.len() as u64;
            h.update(&c);
        }
        Ok((hex::encode(h.finalize()), n))
    }
}

/// The files.list query for the objects in folder `folder` whose keys
/// start with `prefix`. A prefix narrows it with `name contains`, which
/// Drive documents as a prefix match on a name (case-insensitive, and on
/// each word of it): a superset of the keys wanted, cut to them by the
/// caller, so a listing of `gen-` costs the generations, not every pack.
fn listing_query(folder: &str, prefix: &str) -> String {
    let q = format!("'{}' in parents and trashed = false", api::q_escape(folder));
    if prefix.is_empty() {
        q
    } else {
        format!("{q} and name contains '{}'", api::q_escape(prefix))
    }
}

/// Why `attach` cannot pin a file shared with this account to view, and the way out.
const NOT_PINNABLE: &str = "this account may view the file but not keep its revisions (only its owner and \
     editors may), and a volume keeps the revision its base is read from, so that the owner replacing the file \
     never changes your disk. Make a copy you own and attach that: in the Drive web UI, the file's menu, Make a \
     copy (Drive copies it on its side; nothing is downloaded). Or ask the owner to make you an editor";

/// How long a read waits for an object it knows exists to show up in a
/// listing (measured lags are seconds; `driveblk selftest` reports it).
const LISTING_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

#[async_trait]
impl Remote for GDriveRemote {
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let id = self.find_id_within_lag("get_range", key).await?;
        match self.api.read_range(&id, range.clone()).await {
            Ok(b) => Ok(b),
            // A cached id whose file was deleted: look the key up afresh once.
            Err(e) if e.kind == ErrorKind::NotFound && matches!(self.target, Target::Folder { .. }) => {
                self.forget(key);
                let id = self.find_id("get_range", key).await?;
                self.api.read_range(&id, range).await.map_err(|e| self.err("get_range", key, e))
            }
            Err(e) => Err(self.err("get_range", key, e)),
        }
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let f = self.find("get", key).await?;
        if f.size() == 0 {
            return Ok(Bytes::new());
        }
        self.api.read_all(&f.id, f.size()).await.map_err(|e| self.err("get", key, e))
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.writable("put", key)?;
        let folder = self.write_folder("put", key).await?;
        let cached = self.known_id(key);
        let existing = match cached {
            Some(id) => Some(id),
            None => self.lookup("put", key).await?.map(|f| f.id),
        };
        if let Some(id) = existing {
            // Keys are unique: a put to an existing key replaces its content.
            match self.upload(&serde_json::json!({}), Some(&id), &body).await {
                // Trashed with its folder: everything written there is in
                // the trash, to be lost when it is emptied. Say so, every time.
                Ok(f) if f.trashed && !f.explicitly_trashed => return Err(self.folder_in_trash("put", key)),
                // Trashed itself in the web UI: a put leaves the key
                // readable by name (a holder's heartbeat others look for),
                // so it comes back out.
                Ok(f) if f.trashed => {
                    tracing::warn!(remote = %self.name, key, "this object was in the Drive trash; restoring it");
                    let f = self.api.untrash(&id).await.map_err(|e| self.err("put", key, e))?;
                    return Ok(self.meta(key, &f));
                }
                Ok(f) => return Ok(self.meta(key, &f)),
                // Deleted since it was seen (a lagging listing, another
                // host): create it afresh below.
                Err(e) if e.kind == ErrorKind::NotFound => {
                    self.forget(key);
                }
                Err(e) => return Err(self.err("put", key, e)),
            }
        }
        let pending = self.pending.lock().get(key).cloned();
        let id = match pending {
            Some(id) => id,
            None => {
                let id = self.api.new_id().await.map_err(|e| self.err("put", key, e))?;
                self.pending.lock().entry(key.to_string()).or_insert(id).clone()
            }
        };
        let f = match self.create_with_id(&folder, key, &id, None, &body).await {
            Ok(f) => f,
            Err(e) if e.kind == ErrorKind::Conflict => {
                // An earlier attempt of this put landed (its reply was
                // lost): the same bytes are done; other bytes replace them.
                let f = self.api.get_file(&id).await.map_err(|e| self.err("put", key, e))?;
                let (md5, len) = Self::body_md5(&body).await.map_err(|e| self.fatal("put", key, e.to_string()))?;
                if f.size() == len && f.md5_checksum.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&md5)) {
                    f
                } else {
                    self.upload(&serde_json::json!({}), Some(&id), &body).await.map_err(|e| self.err("put", key, e))?
                }
            }
            Err(e) => return Err(self.err("put", key, e)),
        };
        if f.trashed {
            // Made in a folder trashed while this process serves it ("trashed,
            // either explicitly or from a trashed parent folder"). Its id
            // stays pending: the put retried once the folder is restored
            // finds it (409).
            return Err(self.folder_in_trash("put", key));
        }
        self.created(key, &f.id);
        self.pending.lock().remove(key);
        Ok(self.meta(key, &f))
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        let f = self.find("head", key).await?;
        // Said when the file is opened (a base at attach and at every
        // start), not at the guest's first read of it.
        if f.download_refused() {
            return Err(self.fatal("head", key, api::DOWNLOAD_REFUSED));
        }
        Ok(self.meta(key, &f))
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.list_past(prefix, None).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.list_past(prefix, Some(after)).await
    }

    /// The folder's files.list as another host's `list` queries it, without
    /// what this process knows it created: both the whole folder (what
    /// `list("")` and older builds ask) and by the key's kind (`hold-`, as
    /// `list(prefix)` narrows it), since Drive may index names apart.
    async fn listed(&self, key: &str) -> RemoteResult<bool> {
        if let Target::File { .. } = &self.target {
            return Ok(self.lookup("listed", key).await?.is_some());
        }
        let Some(folder) = self.folder_id("listed", key, false).await? else { return Ok(false) };
        let kind = key.find('-').map_or(key, |i| &key[..=i]);
        for q in [listing_query(&folder.id, ""), listing_query(&folder.id, kind)] {
            let files = self.api.list(&q, folder.drive_id.as_deref()).await.map_err(|e| self.err("listed", key, e))?;
            if !files.iter().any(|f| !f.is_folder() && f.name == key) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.writable("delete", key)?;
        let id = match self.find_id("delete", key).await {
            Ok(id) => id,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        self.api.delete(&id).await.map_err(|e| self.err("delete", key, e))?;
        self.forget(key);
        Ok(())
    }

    /// A file id from `files.generateIds`: creating with it is exclusive.
    async fn reserve(&self, key: &str) -> RemoteResult<Option<Slot>> {
        self.writable("reserve", key)?;
        Ok(Some(Slot(self.api.new_id().await.map_err(|e| self.err("reserve", key, e))?)))
    }

    /// With a slot: files.create with that id; Drive answers 409 to every
    /// later create with it, which is the fence. Without a slot: best
    /// effort only (look for the name, then create) — Drive names are not
    /// unique, so two writers could both succeed; callers that need a
    /// fence reserve a slot.
    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.writable("create", key)?;
        let folder = self.write_folder("create", key).await?;
        // A create is a commit (a generation, the lease): never into a folder
        // trashed while this process serves it, where it goes when the trash
        // is emptied. Asked of the folder itself: a file made in it may not
        // say it is trashed.
        let f = self.api.get_file(&folder.id).await.map_err(|e| self.err("create", key, e))?;
        if f.trashed {
            return Err(self.folder_in_trash("create", key));
        }
        let id = match slot {
            Some(s) => s.0.clone(),
            None => {
                if let Some(f) = self.lookup("create", key).await? {
                    return Err(RemoteError::AlreadyExists {
                        remote: self.name.clone(),
                        key: key.into(),
                        tag: f.tag(),
                    });
                }
                let pending = self.pending.lock().get(key).cloned();
                match pending {
                    Some(id) => id,
                    None => {
                        let id = self.api.new_id().await.map_err(|e| self.err("create", key, e))?;
                        self.pending.lock().entry(key.to_string()).or_insert(id).clone()
                    }
                }
            }
        };
        match self.create_with_id(&folder, key, &id, Some(tag), &body).await {
            // Trashed with the folder since it was asked: not committed
            // until restored (the create retried then answers 409 with
            // this tag, which the retry wrapper takes for this one).
            Ok(f) if f.trashed => Err(self.folder_in_trash("create", key)),
            Ok(f) => {
                self.created(key, &f.id);
                self.pending.lock().remove(key);
                Ok(ObjectMeta { tag: Some(tag.to_string()), ..self.meta(key, &f) })
            }
            Err(e) if e.kind == ErrorKind::Conflict => {
                let f = self.api.get_file(&id).await.map_err(|e| self.err("create", key, e))?;
                Err(RemoteError::AlreadyExists { remote: self.name.clone(), key: key.into(), tag: f.tag() })
            }
            Err(e) => Err(self.err("create", key, e)),
        }
    }

    /// The one place a volume's folder (and missing parents) is made.
    async fn create_folder(&self) -> RemoteResult<()> {
        self.writable("create_folder", "")?;
        self.folder_id("create_folder", "", true).await?;
        Ok(())
    }

    /// The folder's trashed files whose names start with `prefix` (trashed
    /// files keep their parents).
    async fn list_trashed(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        if let Target::File { .. } = &self.target {
            return Ok(Vec::new());
        }
        let Some(folder) = self.folder_id("list_trashed", prefix, false).await? else { return Ok(Vec::new()) };
        let q = format!("'{}' in parents and trashed = true", api::q_escape(&folder.id));
        let files =
            self.api.list(&q, folder.drive_id.as_deref()).await.map_err(|e| self.err("list_trashed", prefix, e))?;
        let mut out: Vec<ObjectMeta> =
            files.iter().filter(|f| f.name.starts_with(prefix)).map(|f| self.meta(&f.name, f)).collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A trashed file of this name in the folder: by the id this process
    /// knows, else by a query for trashed files (trashed files keep their
    /// parents).
    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        if let Target::File { .. } = &self.target {
            return Ok(None);
        }
        let Some(folder) = self.folder_id("find_trashed", key, false).await? else { return Ok(None) };
        if let Some(id) = self.known_id(key) {
            if let Ok(f) = self.api.get_file(&id).await {
                if f.trashed && f.name == key {
                    return Ok(Some(self.meta(key, &f)));
                }
            }
        }
        let q = format!(
            "name = '{}' and '{}' in parents and trashed = true",
            api::q_escape(key),
            api::q_escape(&folder.id)
        );
        let files =
            self.api.list(&q, folder.drive_id.as_deref()).await.map_err(|e| self.err("find_trashed", key, e))?;
        // `name =` ignores case: only this very name is this key.
        Ok(files.into_iter().find(|f| !f.is_folder() && f.name == key).map(|f| self.meta(key, &f)))
    }

    /// files.get on the slot's id: follows a create at once, where a
    /// listing may lag behind it.
    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        let Some(slot) = slot else { return self.head(key).await };
        let f = self.get_by_id("head_created", key, &slot.0).await?;
        if f.name != key {
            return Err(self.fatal(
                "head_created",
                key,
                format!("slot {} holds a file named {:?}, not this key", slot.0, f.name),
            ));
        }
        Ok(self.meta(key, &f))
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        let Some(s) = slot else { return self.get(key).await };
        let m = self.head_created(key, slot).await?;
        if m.size == 0 {
            return Ok(Bytes::new());
        }
        self.api.read_all(&s.0, m.size).await.map_err(|e| self.err("get_created", key, e))
    }

    /// revisions.update `keepForever: true`: Drive then never purges the
    /// revision (otherwise it may, 30 days after newer content arrives).
    async fn keep_revision(&self, key: &str, revision: &str) -> RemoteResult<()> {
        let id = self.find_id("keep_revision", key).await?;
        match self.api.keep_revision(&id, revision).await {
            // A file shared with this account to view or comment on: only
            // its owner and editors may keep a revision.
            Err(e) if e.status == Some(403) && e.reason == "insufficientFilePermissions" => {
                Err(self.fatal("keep_revision", key, NOT_PINNABLE))
            }
            r => r.map_err(|e| self.err("keep_revision", key, e)),
        }
    }

    /// revisions.get: size and md5 of one revision; NotFound once Drive
    /// has purged or someone deleted it.
    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        let id = self.find_id("head_revision", key).await?;
        let r = self.api.get_revision(&id, revision).await.map_err(|e| self.err("head_revision", key, e))?;
        Ok(ObjectMeta { revision: Some(r.id.clone()), md5: r.md5_checksum.clone(), ..ObjectMeta::new(key, r.size()) })
    }

    /// revisions.get `alt=media` with `Range`: the pinned bytes even after
    /// the file's content was replaced.
    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let id = self.find_id_within_lag("get_range", key).await?;
        self.api.read_range_at(&id, Some(revision), range).await.map_err(|e| self.err("get_range", key, e))
    }

    /// Remembers the file id a slot names for `key` (ids are immutable;
    /// a deleted file is noticed by the next files.get and looked up again).
    fn locate(&self, key: &str, slot: &Slot) {
        if matches!(self.target, Target::Folder { .. }) && self.known_id(key).is_none() {
            self.located.lock().insert(key.to_string(), slot.0.clone());
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn reset_connections(&self) {
        self.api.reset_connections()
    }

    fn bytes_sent(&self) -> Option<u64> {
        Some(self.api.sent.delivered())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::config::{DriveCredentials, PacerConfig};

    /// A put whose first attempt landed but whose reply was lost is
    /// retried: the retry reuses the key's pre-generated id, gets 409, and
    /// recognises the file instead of making a second one.
    /// A daemon that runs for months sees and makes far more objects than
    /// it will ever ask for again (gc deletes them elsewhere): the ids it
    /// keeps in memory are bounded, the newest kept; an older one is looked
    /// up by name again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_the_ids_kept_in_memory_are_bounded() {
        use super::test_http::{response, serve, Reply};
        let n = ids::MEMORY_KEEP + 5_000;
        let files: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"id": format!("id{i}"), "name": format!("pack-{i:08}"), "size": "1"}))
            .collect();
        let listing = serde_json::to_vec(&serde_json::json!({ "files": files })).unwrap();
        let folder = br#"{"id": "fld", "name": "vol", "mimeType": "application/vnd.google-apps.folder"}"#;
        let base = serve(move |req| {
            let ok = |b: &[u8]| Reply::Raw(response("200 OK", &[("Content-Type", "application/json".into())], b));
            if req.path.starts_with("/drive/v3/files/fld") {
                ok(folder)
            } else if req.path.starts_with("/drive/v3/files?") {
                ok(&listing)
            } else {
                Reply::Raw(response("404 Not Found", &[], b"{}"))
            }
        })
        .await;
        let cfg = DriveConfig {
            api_url: base,
            credentials: DriveCredentials::StaticToken("t".into()),
            id_record: None,
            ..DriveConfig::default()
        };
        let loc = DriveLocation::Path { root: DriveRoot::Id("fld".into()), dirs: vec![], name: "x".into() };
        let (r, _) = GDriveRemote::object(&loc, &cfg);
        assert_eq!(r.list("pack-").await.unwrap().len(), n);
        for i in 0..n {
            r.locate(&format!("gen-{i:08}"), &Slot(format!("g{i}")));
            r.api.record(ids::Kind::File, "fld", &format!("gen-{i:08}"), &format!("g{i}"));
        }
        assert_eq!(r.api.known.lock().len(), ids::MEMORY_KEEP);
        assert_eq!(r.located.lock().len(), ids::MEMORY_KEEP);
        assert_eq!(r.api.recorded.lock().len(), ids::MEMORY_KEEP);
        // The newest are kept, the oldest gone.
        assert_eq!(r.known_id(&format!("gen-{:08}", n - 1)).as_deref(), Some(format!("g{}", n - 1).as_str()));
        assert_eq!(r.known_id("gen-00000000"), None);
        // An object made now is known at once, within the bound.
        r.created("pack-new", "id-new");
        assert_eq!(r.known_id("pack-new").as_deref(), Some("id-new"));
        assert_eq!(r.api.known.lock().len(), ids::MEMORY_KEEP);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gdrive_put_retried_after_a_lost_reply_makes_no_duplicate() {
        let lagging = driveemu::Config { listing_lag: std::time::Duration::from_secs(2), ..Default::default() };
        let emu = driveemu::Emulator::start(lagging).await.unwrap();
        let d = tempfile::tempdir().unwrap();
        let key_file = d.path().join("sa.json");
        std::fs::write(&key_file, emu.service_account_key_json()).unwrap();
        let cfg = DriveConfig {
            api_url: emu.base_url(),
            credentials: DriveCredentials::File(key_file),
            pacer: PacerConfig::fixed(1000.0, 1000),
            ..DriveConfig::default()
        };
        let loc = DriveLocation::parse("/vol").unwrap();
        let r = GDriveRemote::folder(&loc, &cfg);
        r.create_folder().await.unwrap();
        let body = PutBody::from_bytes(b"pack bytes".to_vec());
        r.put("pack-0", body.clone()).await.unwrap();
        // The first attempt of "pack-1": its id is taken, and the file
        // lands, but the caller never hears back.
        let folder = r.folder_id("put", "pack-1", true).await.unwrap().unwrap();
        let id = r.api.new_id().await.unwrap();
        r.pending.lock().insert("pack-1".into(), id.clone());
        r.create_with_id(&folder, "pack-1", &id, None, &body).await.unwrap();
        // The retry: the listing does not show the file yet, so only the
        // remembered id saves us from a second file.
        r.put("pack-1", body.clone()).await.unwrap();
        // Once the listing has caught up, the key must name one file.
        tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
        let other = GDriveRemote::folder(&loc, &cfg);
        let listed: Vec<_> = other.list("pack-1").await.unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(listed, vec!["pack-1"]);
        assert_eq!(other.find_id("head", "pack-1").await.unwrap(), id);
        // Three uploads: pack-0, pack-1, and the retry answered 409; the
        // same bytes are not uploaded again.
        assert_eq!(emu.stats().requests.get("upload multipart").copied(), Some(3), "{:?}", emu.stats().requests);
    }
}
