//! Drive API v3 over HTTP: one account's pooled HTTP/1.1 client, its pacer
//! and its credentials; the calls the backend makes (files.get, list,
//! generateIds, create, update, delete, ranged `alt=media` reads) and the
//! mapping of Drive's answers to error classes. Only the base URL differs
//! between Google and an emulator.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Deserialize;

use super::auth::{Auth, AuthError};
use super::ids::{Entries, IdRecord, Kind, Recent};
use super::pacer::Pacer;
use crate::remote::bwlimit::Turn;
use crate::remote::config::DriveConfig;

/// The file fields every metadata call asks for.
pub const FILE_FIELDS: &str =
    "id,name,mimeType,size,md5Checksum,sha256Checksum,headRevisionId,version,createdTime,modifiedTime,appProperties,trashed,explicitlyTrashed,parents,driveId,capabilities/canDownload";
/// Drive's folder MIME type.
pub const FOLDER_MIME: &str = "application/vnd.google-apps.folder";
/// The appProperty holding a created object's tag.
pub const TAG_PROPERTY: &str = "driveblkTag";
/// [`DOWNLOAD_REFUSED`]'s text, for `concat!`.
macro_rules! download_refused {
    () => {
        "Drive does not let this account download the file: its owner turned downloading off for viewers and \
         commenters, or your organisation's policy forbids it. A copy is refused the same way: ask the owner to \
         allow downloads"
    };
}

/// IDs fetched per `files.generateIds` call (Drive allows up to 1,000).
const ID_BATCH: u32 = 100;

/// A Drive file resource (the fields in [`FILE_FIELDS`]).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DriveFile {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mime_type: String,
    /// Decimal string (int64 in JSON as Google encodes it); absent for folders.
    pub size: Option<String>,
    pub md5_checksum: Option<String>,
    pub sha256_checksum: Option<String>,
    pub head_revision_id: Option<String>,
    pub version: Option<String>,
    /// RFC 3339.
    pub created_time: Option<String>,
    #[serde(default)]
    pub modified_time: Option<String>,
    pub app_properties: Option<HashMap<String, String>>,
    #[serde(default)]
    pub trashed: bool,
    /// Trashed itself, as opposed to with a folder above it.
    #[serde(default)]
    pub explicitly_trashed: bool,
    #[serde(default)]
    pub parents: Vec<String>,
    /// Set for items in a shared drive.
    pub drive_id: Option<String>,
    /// What this account may do with the file (only `canDownload` is asked).
    pub capabilities: Option<Capabilities>,
}

/// The part of a file's `capabilities` driveblk asks for.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// False when this account may not download the file: its owner turned
    /// downloading off for viewers and commenters, or a policy of the
    /// organisation forbids it ("Download and export files" asks clients
    /// to check it before downloading).
    pub can_download: Option<bool>,
}

impl DriveFile {
    /// Size in bytes (0 when Drive reports none).
    pub fn size(&self) -> u64 {
        self.size.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    pub fn is_folder(&self) -> bool {
        self.mime_type == FOLDER_MIME
    }

    /// Drive says this account may not download the file (absent: may).
    pub fn download_refused(&self) -> bool {
        self.capabilities.as_ref().and_then(|c| c.can_download) == Some(false)
    }

    /// The tag stored at create time.
    pub fn tag(&self) -> Option<String> {
        self.app_properties.as_ref().and_then(|p| p.get(TAG_PROPERTY).cloned())
    }

    /// What pins a file's content: the head revision and the md5, neither
    /// of which a rename, star or share changes (`version` does).
    pub fn content_version(&self) -> Option<String> {
        match (&self.head_revision_id, &self.md5_checksum) {
            (Some(r), Some(m)) => Some(format!("{r}:{m}")),
            (Some(r), None) => Some(r.clone()),
            (None, Some(m)) => Some(format!("md5:{m}")),
            (None, None) => self.version.as_ref().map(|v| format!("v{v}")),
        }
    }

    /// `createdTime` in ms since the Unix epoch.
    pub fn created_ms(&self) -> Option<u64> {
        rfc3339_ms(self.created_time.as_deref()?)
    }

    /// `modifiedTime` in ms since the Unix epoch (Drive's clock).
    pub fn modified_ms(&self) -> Option<u64> {
        rfc3339_ms(self.modified_time.as_deref()?)
    }
}

fn rfc3339_ms(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A revision resource (the fields driveblk asks for).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DriveRevision {
    pub id: String,
    pub size: Option<String>,
    pub md5_checksum: Option<String>,
    #[serde(default)]
    pub keep_forever: bool,
}

impl DriveRevision {
    /// Size in bytes (0 when Drive reports none).
    pub fn size(&self) -> u64 {
        self.size.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0)
    }
}

/// The revision fields driveblk asks for.
pub const REVISION_FIELDS: &str = "id,size,md5Checksum,keepForever";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileList {
    next_page_token: Option<String>,
    #[serde(default)]
    files: Vec<DriveFile>,
}

#[derive(Deserialize)]
struct GeneratedIds {
    #[serde(default)]
    ids: Vec<String>,
}

/// What kind of failure Drive reported; the backend turns it into a
/// [`RemoteError`](crate::remote::RemoteError) with its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Rate limits, 5xx, timeouts, resets: retrying helps.
    Transient,
    /// Storage full, daily upload cap, download quota.
    Quota,
    /// Credentials refused.
    Auth,
    NotFound,
    /// 409: a file with the requested id exists.
    Conflict,
    /// 416: the range starts past the end.
    RangeNotSatisfiable,
    /// 403 cannotDownloadAbusiveFile: retry with acknowledgeAbuse.
    Abusive,
    /// Anything retrying cannot fix.
    Fatal,
    /// An outage the call already retried through (a resumable upload's
    /// chunks, each resumed): the retry wrapper must not restart it from
    /// byte 0, and it is no reason to pause write-back for a person.
    GaveUp,
}

/// A classified Drive failure. The message is Drive's own plus advice; it
/// never holds a token, a secret or a session URI.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub status: Option<u16>,
    pub reason: String,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(s) = self.status {
            write!(f, "HTTP {s} ")?;
        }
        if !self.reason.is_empty() {
            write!(f, "{}: ", self.reason)?;
        }
        f.write_str(&self.message)
    }
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, status: None, reason: String::new(), message: message.into(), retry_after: None }
    }

    /// A transport failure (connect, reset, timeout, broken body). The URL
    /// is dropped: an upload session URI is a credential of sorts.
    pub fn transport(e: reqwest::Error) -> Self {
        let what = if e.is_timeout() { "timed out" } else { "connection failed" };
        Self::new(ErrorKind::Transient, format!("{what}: {}", error_chain(&e.without_url())))
    }

    fn from_auth(e: AuthError) -> Self {
        match e {
            AuthError::Unavailable(m) => Self::new(ErrorKind::Transient, m),
            AuthError::Rejected(m) | AuthError::Config(m) => Self::new(ErrorKind::Auth, m),
        }
    }
}

/// An error and its sources on one line (reqwest hides the cause of a
/// reset or a refused connection in the chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// Google's JSON error shape.
#[derive(Deserialize, Default)]
struct ErrorBody {
    error: Option<ErrorDetail>,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize, Default)]
struct ErrorItem {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

/// Classifies a failed answer from Drive. `upload` tells a daily-upload-cap
/// 403 (which reads "User rate limit exceeded.") from a request-rate one.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8], upload: bool) -> ApiError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let detail = parsed.error.unwrap_or_default();
    let first = detail.errors.first();
    let reason = first.map(|e| e.reason.clone()).unwrap_or_default();
    let item_msg = first.map(|e| e.message.clone()).unwrap_or_default();
    let message = if !detail.message.is_empty() {
        detail.message.clone()
    } else if !item_msg.is_empty() {
        item_msg.clone()
    } else {
        status.canonical_reason().unwrap_or("error").to_string()
    };
    let retry_after = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
    let code = status.as_u16();
    let (kind, advice): (ErrorKind, &str) = match (code, reason.as_str()) {
        (403, "cannotDownloadAbusiveFile") => (ErrorKind::Abusive, ""),
        // As Drive answers a download its owner turned off for viewers (not
        // in the "Resolve errors" guide; `capabilities.canDownload`, which
        // `head` checks, is the documented way to see it coming).
        (403, "cannotDownloadFile") => (ErrorKind::Fatal, concat!(" (", download_refused!(), ")")),
        (403 | 429, "userRateLimitExceeded") if upload && is_upload_cap(&item_msg, &detail.message) => (
            ErrorKind::Quota,
            " (the daily upload limit of about 750 GB per user is used up; uploads resume by themselves tomorrow)",
        ),
        (403 | 429, "rateLimitExceeded" | "userRateLimitExceeded" | "sharingRateLimitExceeded") => {
            (ErrorKind::Transient, "")
        }
        // A count of items, not bytes: "The file limit for this shared drive
        // has been exceeded." Space bought or freed elsewhere does not help.
        (403 | 429, "teamDriveFileLimitExceeded") => (
            ErrorKind::Quota,
            " (the shared drive holds as many items as Drive allows in one shared drive: \
             run `driveblk gc` with the volume's URL to delete what no kept generation needs, \
             or keep the volume in another shared drive)",
        ),
        (403 | 429, "storageQuotaExceeded" | "quotaExceeded") => (
            ErrorKind::Quota,
            " (the Drive is full: free space, buy storage, or use a shared drive; a service account has no storage of its own)",
        ),
        (403 | 429, "dailyLimitExceeded" | "activeItemCreationLimitExceeded" | "uploadLimitExceeded") => {
            (ErrorKind::Quota, " (a Drive quota is used up; it resets by itself)")
        }
        (403 | 429, "downloadQuotaExceeded") => (
            ErrorKind::Quota,
            " (Drive limits downloads of this file for now; cached data keeps working, and it lifts by itself within a day)",
        ),
        // Not a permission: Drive's limit of 500,000 items directly in one
        // folder ("Resolve errors"). Only gc deletes objects of a volume.
        (403, "numChildrenInNonRootLimitExceeded") => (
            ErrorKind::Quota,
            " (the volume's folder holds as many items as Drive allows in one folder, 500,000: \
             run `driveblk gc` with the volume's URL to delete what no kept generation needs; \
             fewer kept generations (`--keep-generations`) free more)",
        ),
        (403, "appNotAuthorizedToFile") => (
            ErrorKind::Fatal,
            " (with the drive.file scope driveblk may only open files it created: log in with `driveblk auth login --scope drive` to attach a file uploaded another way)",
        ),
        (403, "insufficientPermissions") => (
            ErrorKind::Auth,
            " (the credentials lack a Drive scope: run `driveblk auth login` again, or check the key's scopes)",
        ),
        (403, "insufficientFilePermissions" | "forbidden" | "domainPolicy") => {
            (ErrorKind::Fatal, " (this account may not do that to this file or folder: check its sharing settings; a volume shared with it read-only is served with `serve --read-only`)")
        }
        (401, _) => (
            ErrorKind::Auth,
            " (Drive refused the credentials even after a refresh: run `driveblk auth login`, or check the key)",
        ),
        (404, _) => (ErrorKind::NotFound, ""),
        (409, _) => (ErrorKind::Conflict, ""),
        (416, _) => (ErrorKind::RangeNotSatisfiable, ""),
        (408 | 429, _) => (ErrorKind::Transient, ""),
        (500..=599, _) => (ErrorKind::Transient, ""),
        (403, _) => (ErrorKind::Fatal, " (permission denied)"),
        _ => (ErrorKind::Fatal, ""),
    };
    ApiError { kind, status: Some(code), reason, message: format!("{message}{advice}"), retry_after }
}

/// Why a file this account may see cannot be read, and the way out.
pub const DOWNLOAD_REFUSED: &str = download_refused!();

/// The daily upload cap answers 403 userRateLimitExceeded like request
/// throttling does, but with the message "User rate limit exceeded." (as
/// observed, and as rclone matches it; the cap's answer is not documented).
/// That text in that case, with or without its full stop: the documented
/// throttling answer, "User Rate Limit Exceeded" (Resolve errors guide) or
/// with the project-quota advice after it, is to be retried with backoff
/// (Usage limits guide), never taken for the cap.
fn is_upload_cap(item_msg: &str, top: &str) -> bool {
    let cap = |m: &str| m.strip_suffix('.').unwrap_or(m) == "User rate limit exceeded";
    cap(item_msg) || cap(top)
}

/// The longest `Retry-After` taken: a server's wish, not a reason to hang.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// A `Retry-After` value (RFC 9110 10.2.3): seconds, or an HTTP date.
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO)
        }
    };
    Some(d.min(RETRY_AFTER_MAX))
}

/// Escapes a value for a `q` string literal (backslash and single quote).
pub fn q_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// One account's connection to Drive.
pub struct DriveApi {
    /// Swapped for a fresh client (a fresh pool) by
    /// [`reset_connections`](Self::reset_connections); shared with the
    /// credentials' token requests.
    http: std::sync::Arc<arc_swap::ArcSwap<reqwest::Client>>,
    /// The client of requests that carry a body up (chunks, small
    /// uploads): no read deadline, since reqwest counts that one from the
    /// request's start to its answer's headers, body included, so a chunk
    /// slower than `request_timeout` (a slow uplink, `--bwlimit`) would
    /// fail every time. Their own deadline (`timeout_for` plus the pacing)
    /// bounds them. Replaced with `http`.
    http_up: arc_swap::ArcSwap<reqwest::Client>,
    /// When the pool was last replaced: requests that time out together
    /// (all on connections that died in one sleep) replace it once.
    last_reset: parking_lot::Mutex<Option<std::time::Instant>>,
    /// `{base}/drive/v3`
    api: String,
    /// `{base}/upload/drive/v3`
    upload: String,
    auth: Result<Auth, String>,
    pub(crate) pacer: Pacer,
    pub(crate) cfg: DriveConfig,
    ids: parking_lot::Mutex<Vec<String>>,
    /// The id behind My Drive's `root` alias (a folder's `parents` name
    /// the id, never the alias), fetched once when needed.
    root_id: tokio::sync::OnceCell<String>,
    /// Single flight for refilling `ids`.
    ids_refill: tokio::sync::Mutex<()>,
    /// (parent id, name) -> id of folders this process created or is
    /// creating: a listing may not show them yet, and a create retried
    /// after a lost reply must reuse the id (409) rather than make a twin.
    pub(crate) folders: parking_lot::Mutex<HashMap<(String, String), String>>,
    /// folder id -> key -> file id of objects this process wrote or saw,
    /// shared by every remote of the account: a listing may lag behind a
    /// create, but an object this process made is found by id at once.
    /// (folder id, key) -> file id; the newest [`super::ids::MEMORY_KEEP`]
    /// only, or a daemon that runs for months keeps every pack it made.
    pub(crate) known: parking_lot::Mutex<Recent<(String, String), String>>,
    /// Ids this host recorded on disk (see `ids.rs`), loaded at start.
    record: IdRecord,
    /// What the record holds now, so an id is appended once.
    pub(crate) recorded: parking_lot::Mutex<Entries>,
    /// Ranged reads asked, requests sent for them, reads merged
    /// (`remote/merge.rs`), for every remote of the account.
    pub read_merge: std::sync::Arc<crate::remote::merge::MergeStats>,
    /// Bytes of upload bodies the client took, for every remote of the
    /// account ([`Remote::bytes_sent`](crate::remote::Remote::bytes_sent)).
    pub(crate) sent: crate::remote::sent::SentBytes,
}

/// The HTTP client of a Drive account (`up`: the one for bodies going up,
/// without the read deadline).
fn http_client(cfg: &DriveConfig, up: bool) -> reqwest::Client {
    // HTTP/1.1 only (no http2 feature): Drive's HTTP/2 streams have been
    // seen to stall; parallel reads use pooled connections instead. A read
    // that waits this long between bytes is on a dead connection (a silent
    // peer, a network that changed under it): it fails and is retried on a
    // fresh one instead of waiting out the whole request deadline.
    let b = reqwest::Client::builder().connect_timeout(cfg.connect_timeout);
    let b = if up { b } else { b.read_timeout(cfg.request_timeout) };
    b.pool_max_idle_per_host(64)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("driveblk/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

impl std::fmt::Debug for DriveApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveApi").field("api", &self.api).finish_non_exhaustive()
    }
}

impl DriveApi {
    /// A client for `cfg`. Credentials that cannot be loaded make every
    /// call fail with an [`ErrorKind::Auth`] error naming the problem.
    pub fn new(cfg: &DriveConfig) -> Self {
        let http = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(http_client(cfg, false)));
        let base = cfg.api_url.trim_end_matches('/');
        let auth = Auth::with_shared_client(cfg, http.clone()).map_err(|e| e.to_string());
        // One request budget per account on this host (see `pacer.rs`).
        let pacer = match (&cfg.shared_pacer_dir, &auth) {
            (Some(dir), Ok(a)) => Pacer::shared(cfg.pacer, &Pacer::record_path(dir, &a.account_key(base))),
            _ => Pacer::new(cfg.pacer),
        };
        let (record, recorded) = IdRecord::open(cfg.id_record.clone(), base);
        let mut known = Recent::new();
        for ((kind, parent, name), id) in recorded.iter() {
            if *kind == Kind::File {
                known.insert((parent.clone(), name.clone()), id.clone());
            }
        }
        Self {
            api: format!("{base}/drive/v3"),
            upload: format!("{base}/upload/drive/v3"),
            http,
            http_up: arc_swap::ArcSwap::from_pointee(http_client(cfg, true)),
            last_reset: parking_lot::Mutex::new(None),
            auth,
            pacer,
            cfg: cfg.clone(),
            ids: parking_lot::Mutex::new(Vec::new()),
            root_id: tokio::sync::OnceCell::new(),
            ids_refill: tokio::sync::Mutex::new(()),
            folders: parking_lot::Mutex::new(HashMap::new()),
            known: parking_lot::Mutex::new(known),
            record,
            recorded: parking_lot::Mutex::new(recorded),
            read_merge: Default::default(),
            sent: Default::default(),
        }
    }

    /// The id this host recorded for `name` in `parent`, if any.
    pub fn recorded(&self, kind: Kind, parent: &str, name: &str) -> Option<String> {
        self.recorded.lock().get(&(kind, parent.to_string(), name.to_string())).cloned()
    }

    /// Records on disk that `name` in `parent` is `id` (empty: forget it).
    pub fn record(&self, kind: Kind, parent: &str, name: &str, id: &str) {
        let key = (kind, parent.to_string(), name.to_string());
        {
            let mut r = self.recorded.lock();
            let same = match r.get(&key) {
                Some(old) => old == id,
                None => id.is_empty(),
            };
            if same {
                return;
            }
            if id.is_empty() {
                r.remove(&key);
            } else {
                r.insert(key, id.to_string());
            }
        }
        self.record.add(kind, parent, name, id);
    }

    /// The credentials, or why there are none.
    pub fn auth(&self) -> Result<&Auth, ApiError> {
        self.auth.as_ref().map_err(|m| ApiError::new(ErrorKind::Auth, m.clone()))
    }

    /// The raw HTTP client.
    pub fn http(&self) -> reqwest::Client {
        (**self.http.load()).clone()
    }

    /// The HTTP client of requests carrying a body up (the upload
    /// session's chunks).
    pub fn http_up(&self) -> reqwest::Client {
        (**self.http_up.load()).clone()
    }

    /// Replaces the connection pool: requests in flight finish on their
    /// connections, new ones open fresh connections. Requests that time out
    /// within a second of a reset were sent on the old pool, so they do
    /// not replace the new one again.
    pub fn reset_connections(&self) {
        {
            let mut last = self.last_reset.lock();
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        tracing::debug!(api = %self.api, "dropping pooled Drive connections after a request got no answer");
        self.http.store(std::sync::Arc::new(http_client(&self.cfg, false)));
        self.http_up.store(std::sync::Arc::new(http_client(&self.cfg, true)));
    }

    /// A transport failure as an [`ApiError`]. A time-out also replaces
    /// the pool: after a laptop's sleep or a network change every pooled
    /// connection may be dead, and Drive's own deadlines fire before the
    /// retry wrapper's, so without this each retry would take the next
    /// dead connection.
    pub fn transport(&self, e: reqwest::Error) -> ApiError {
        if e.is_timeout() {
            self.reset_connections();
        }
        ApiError::transport(e)
    }

    /// Deadline for a request moving `bytes` of body (a paced one adds its
    /// turn's [`duration`](crate::remote::bwlimit::Turn::duration)).
    pub fn timeout_for(&self, bytes: u64) -> Duration {
        self.cfg.request_timeout + Duration::from_secs(bytes / self.cfg.min_transfer_rate.max(1))
    }

    /// Sends one request: paced, authorised, with one token refresh on 401.
    /// Answers with the response when `accept(status)`, else the classified
    /// error (a rate-limit answer also spends the pacer's burst).
    pub async fn send(
        &self,
        build: impl Fn(&str) -> RequestBuilder,
        accept: impl Fn(StatusCode) -> bool,
        upload: bool,
    ) -> Result<Response, ApiError> {
        let auth = self.auth()?;
        let mut refreshed = false;
        loop {
            self.pacer.acquire().await;
            let token = auth.token().await.map_err(ApiError::from_auth)?;
            let resp = build(&token).send().await.map_err(|e| self.transport(e))?;
            let status = resp.status();
            if accept(status) {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                // Expired or revoked early: one fresh token, then give up.
                auth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap_or_default();
            let e = classify(status, &headers, &body, upload);
            if e.kind == ErrorKind::Transient && matches!(status.as_u16(), 403 | 429) {
                self.pacer.throttled();
            }
            return Err(e);
        }
    }

    /// Sends and decodes a JSON answer.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> RequestBuilder,
        upload: bool,
    ) -> Result<T, ApiError> {
        let resp = self.send(build, |s| s.is_success(), upload).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(ErrorKind::Transient, format!("unreadable answer from Drive: {e}")))
    }

    fn req(&self, method: Method, url: &str, token: &str, timeout: Duration) -> RequestBuilder {
        self.http.load().request(method, url).bearer_auth(token).timeout(timeout)
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> String {
        let mut u = match url::Url::parse(path) {
            Ok(u) => u,
            Err(_) => return path.to_string(),
        };
        u.query_pairs_mut().extend_pairs(query.iter().copied());
        u.to_string()
    }

    fn file_url(&self, id: &str) -> String {
        format!("{}/files/{}", self.api, urlencode(id))
    }

    /// files.get: a file's metadata by id (never a listing; follows creates
    /// at once).
    pub async fn get_file(&self, id: &str) -> Result<DriveFile, ApiError> {
        let url = self.url(&self.file_url(id), &[("fields", FILE_FIELDS), ("supportsAllDrives", "true")]);
        let t = self.cfg.request_timeout;
        self.json(|tok| self.req(Method::GET, &url, tok, t), false).await
    }

    /// The id of folder `id`, with My Drive's `root` alias turned into the
    /// id Drive lists in `parents` (one files.get, the first time).
    pub async fn canonical_folder_id(&self, id: &str) -> Result<String, ApiError> {
        if id != "root" {
            return Ok(id.to_string());
        }
        self.root_id.get_or_try_init(|| async { Ok(self.get_file("root").await?.id) }).await.cloned()
    }

    /// files.list over every page. `drive_id` scopes the query to a shared
    /// drive (whose items a plain user-corpus query would miss).
    pub async fn list(&self, q: &str, drive_id: Option<&str>) -> Result<Vec<DriveFile>, ApiError> {
        self.list_pages(q, drive_id, None, |_| true).await
    }

    /// files.list in the order `order_by` (e.g. `name desc`), page after
    /// page while `more` (shown each page's files) says to go on.
    pub async fn list_pages(
        &self,
        q: &str,
        drive_id: Option<&str>,
        order_by: Option<&str>,
        mut more: impl FnMut(&[DriveFile]) -> bool + Send,
    ) -> Result<Vec<DriveFile>, ApiError> {
        let fields = format!("nextPageToken,files({FILE_FIELDS})");
        // Ordered, the caller likely wants the first few: smaller pages.
        let size = if order_by.is_some() { "100" } else { "1000" };
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut query: Vec<(&str, &str)> = vec![
                ("q", q),
                ("fields", &fields),
                ("pageSize", size),
                ("supportsAllDrives", "true"),
                ("includeItemsFromAllDrives", "true"),
                ("spaces", "drive"),
            ];
            if let Some(o) = order_by {
                query.push(("orderBy", o));
            }
            if let Some(d) = drive_id {
                query.push(("corpora", "drive"));
                query.push(("driveId", d));
            }
            if let Some(p) = &page {
                query.push(("pageToken", p));
            }
            let url = self.url(&format!("{}/files", self.api), &query);
            let t = self.cfg.request_timeout;
            let l: FileList = self.json(|tok| self.req(Method::GET, &url, tok, t), false).await?;
            let go_on = more(&l.files);
            out.extend(l.files);
            // Pages may be short or empty before the end: only a missing
            // token ends the listing.
            match l.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) if go_on => page = Some(t),
                _ => return Ok(out),
            }
        }
    }

    /// An unused file id from `files.generateIds` (pooled, fetched 100 at a
    /// time).
    pub async fn new_id(&self) -> Result<String, ApiError> {
        loop {
            if let Some(id) = self.ids.lock().pop() {
                return Ok(id);
            }
            let _one = self.ids_refill.lock().await;
            if !self.ids.lock().is_empty() {
                continue;
            }
            let n = ID_BATCH.to_string();
            let url = self.url(
                &format!("{}/files/generateIds", self.api),
                &[("count", n.as_str()), ("space", "drive"), ("type", "files")],
            );
            let t = self.cfg.request_timeout;
            let g: GeneratedIds = self.json(|tok| self.req(Method::GET, &url, tok, t), false).await?;
            if g.ids.is_empty() {
                return Err(ApiError::new(ErrorKind::Transient, "files.generateIds returned no ids"));
            }
            self.ids.lock().extend(g.ids);
        }
    }

    /// files.create of a folder with a pre-generated id (so a retry after a
    /// lost reply answers 409 instead of making a second folder).
    pub async fn create_folder(&self, id: &str, name: &str, parent: &str) -> Result<DriveFile, ApiError> {
        let url = self.url(&format!("{}/files", self.api), &[("fields", FILE_FIELDS), ("supportsAllDrives", "true")]);
        let meta = serde_json::json!({ "id": id, "name": name, "mimeType": FOLDER_MIME, "parents": [parent] });
        let t = self.cfg.request_timeout;
        self.json(|tok| self.req(Method::POST, &url, tok, t).json(&meta), false).await
    }

    /// One-request upload of a small body: files.create (multipart, with
    /// `meta`) when `existing` is None, else files.update of its content.
    pub async fn upload_simple(
        &self,
        meta: &serde_json::Value,
        existing: Option<&str>,
        data: Bytes,
    ) -> Result<DriveFile, ApiError> {
        let boundary = format!("driveblk{:016x}", rand::random::<u64>());
        let mut body = BytesMut::with_capacity(data.len() + 512);
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(meta.to_string().as_bytes());
        body.extend_from_slice(
            format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let body = body.freeze();
        let query = [("uploadType", "multipart"), ("fields", FILE_FIELDS), ("supportsAllDrives", "true")];
        let (method, url) = match existing {
            None => (Method::POST, self.url(&format!("{}/files", self.upload), &query)),
            Some(id) => (Method::PATCH, self.url(&format!("{}/files/{}", self.upload, urlencode(id)), &query)),
        };
        let ctype = format!("multipart/related; boundary={boundary}");
        let len = body.len() as u64;
        // Paced on the wire (again on each attempt); the deadline allows
        // for the pacing.
        let turn = self.cfg.bwlimit.upload(len).await;
        let t = self.timeout_for(len) + turn.duration();
        self.json(
            |tok| {
                self.http_up
                    .load()
                    .request(method.clone(), &url)
                    .bearer_auth(tok)
                    .timeout(t)
                    .header(CONTENT_TYPE, ctype.as_str())
                    .header(CONTENT_LENGTH, len)
                    .body(self.sent.body(&turn, body.clone()))
            },
            true,
        )
        .await
    }

    /// Starts a resumable upload session: files.create (POST) or, for
    /// `existing`, files.update (PATCH). Answers the session URI.
    pub async fn start_resumable(
        &self,
        meta: &serde_json::Value,
        existing: Option<&str>,
        len: Option<u64>,
    ) -> Result<String, ApiError> {
        let query = [("uploadType", "resumable"), ("fields", FILE_FIELDS), ("supportsAllDrives", "true")];
        let (method, url) = match existing {
            None => (Method::POST, self.url(&format!("{}/files", self.upload), &query)),
            Some(id) => (Method::PATCH, self.url(&format!("{}/files/{}", self.upload, urlencode(id)), &query)),
        };
        let t = self.cfg.request_timeout;
        let resp = self
            .send(
                |tok| {
                    let mut r = self
                        .req(method.clone(), &url, tok, t)
                        .header("X-Upload-Content-Type", "application/octet-stream")
                        .json(meta);
                    if let Some(n) = len {
                        r = r.header("X-Upload-Content-Length", n);
                    }
                    r
                },
                |s| s.is_success(),
                true,
            )
            .await?;
        resp.headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| ApiError::new(ErrorKind::Transient, "resumable upload started without a session URI"))
    }

    /// revisions.update `keepForever: true` on revision `rev` of file `id`:
    /// Drive then never purges it (at most 200 such revisions per file).
    pub async fn keep_revision(&self, id: &str, rev: &str) -> Result<(), ApiError> {
        let url =
            self.url(&format!("{}/revisions/{}", self.file_url(id), urlencode(rev)), &[("fields", "id,keepForever")]);
        let body = serde_json::json!({ "keepForever": true });
        let t = self.cfg.request_timeout;
        self.send(|tok| self.req(Method::PATCH, &url, tok, t).json(&body), |s| s.is_success(), false).await?;
        Ok(())
    }

    /// files.update `trashed: false`: takes file `id` out of the trash.
    pub async fn untrash(&self, id: &str) -> Result<DriveFile, ApiError> {
        let url = self.url(&self.file_url(id), &[("fields", FILE_FIELDS), ("supportsAllDrives", "true")]);
        let body = serde_json::json!({ "trashed": false });
        let t = self.cfg.request_timeout;
        self.json(|tok| self.req(Method::PATCH, &url, tok, t).json(&body), true).await
    }

    /// revisions.get: one revision's metadata (size, md5, keepForever).
    pub async fn get_revision(&self, id: &str, rev: &str) -> Result<DriveRevision, ApiError> {
        let url =
            self.url(&format!("{}/revisions/{}", self.file_url(id), urlencode(rev)), &[("fields", REVISION_FIELDS)]);
        let t = self.cfg.request_timeout;
        self.json(|tok| self.req(Method::GET, &url, tok, t), false).await
    }

    /// files.copy of `id` into folder `parent` as `name`, with the
    /// pre-generated id `new_id` (server-side: no bytes cross the link).
    pub async fn copy(&self, id: &str, new_id: &str, name: &str, parent: &str) -> Result<DriveFile, ApiError> {
        let url =
            self.url(&format!("{}/copy", self.file_url(id)), &[("fields", FILE_FIELDS), ("supportsAllDrives", "true")]);
        let body = serde_json::json!({ "id": new_id, "name": name, "parents": [parent] });
        let t = self.cfg.request_timeout;
        self.json(|tok| self.req(Method::POST, &url, tok, t).json(&body), true).await
    }

    /// files.delete (permanent). An absent file is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        let url = self.url(&self.file_url(id), &[("supportsAllDrives", "true")]);
        let t = self.cfg.request_timeout;
        match self.send(|tok| self.req(Method::DELETE, &url, tok, t), |s| s.is_success(), false).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of file `id` (`alt=media` with `Range`), cut at the
    /// end of the file. A 206 must carry the asked start in
    /// `Content-Range`; a 200 means the server ignored the range, and only
    /// the asked bytes are kept (the rest of the body is not read).
    pub async fn read_range(&self, id: &str, range: Range<u64>) -> Result<Bytes, ApiError> {
        self.read_range_at(id, None, range).await
    }

    /// [`read_range`](Self::read_range) of revision `rev` when given
    /// (revisions.get `alt=media`: the bytes of that revision, whatever
    /// the file's head is now).
    pub async fn read_range_at(&self, id: &str, rev: Option<&str>, range: Range<u64>) -> Result<Bytes, ApiError> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let mut ack = false;
        let path = match rev {
            Some(r) => format!("{}/revisions/{}", self.file_url(id), urlencode(r)),
            None => self.file_url(id),
        };
        loop {
            // revisions.get takes no supportsAllDrives (not one of its parameters).
            let mut query = vec![("alt", "media")];
            if rev.is_none() {
                query.push(("supportsAllDrives", "true"));
            }
            if ack {
                query.push(("acknowledgeAbuse", "true"));
            }
            let url = self.url(&path, &query);
            let want = range.end - range.start;
            // Consumed at the limit as it arrives (TCP holds the sender
            // back); the deadline allows for the pacing.
            let turn = self.cfg.bwlimit.download(want).await;
            let t = self.timeout_for(want) + turn.duration();
            let header = format!("bytes={}-{}", range.start, range.end - 1);
            let r = self
                .send(
                    |tok| self.req(Method::GET, &url, tok, t).header(RANGE, header.as_str()),
                    |s| s.is_success(),
                    false,
                )
                .await;
            match r {
                Ok(resp) => return read_ranged_body(resp, range, &turn, |e| self.transport(e)).await,
                Err(e) if e.kind == ErrorKind::Abusive && !ack => {
                    tracing::warn!(file = id, "Drive flags this file as abusive; reading it with acknowledgeAbuse");
                    ack = true;
                }
                Err(e) if e.kind == ErrorKind::RangeNotSatisfiable => return Ok(Bytes::new()),
                Err(e) => return Err(e),
            }
        }
    }

    /// One ranged read as Drive answers it: status, `Content-Range`, body
    /// length (for `selftest`).
    pub async fn probe_range(
        &self,
        id: &str,
        rev: Option<&str>,
        range: Range<u64>,
    ) -> Result<(u16, Option<String>, Bytes), ApiError> {
        let url = match rev {
            Some(r) => self.url(&format!("{}/revisions/{}", self.file_url(id), urlencode(r)), &[("alt", "media")]),
            None => self.url(&self.file_url(id), &[("alt", "media"), ("supportsAllDrives", "true")]),
        };
        let header = format!("bytes={}-{}", range.start, range.end.saturating_sub(1));
        let t = self.cfg.request_timeout;
        let resp = self
            .send(|tok| self.req(Method::GET, &url, tok, t).header(RANGE, header.as_str()), |s| s.is_success(), false)
            .await?;
        let status = resp.status().as_u16();
        let cr = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        Ok((status, cr, body))
    }

    /// The whole content of file `id`, without a Range header (which an
    /// empty file would answer with 416).
    pub async fn read_all(&self, id: &str, size_hint: u64) -> Result<Bytes, ApiError> {
        let mut query = vec![("alt", "media"), ("supportsAllDrives", "true")];
        loop {
            let turn = self.cfg.bwlimit.download(size_hint).await;
            let t = self.timeout_for(size_hint) + turn.duration();
            let url = self.url(&self.file_url(id), &query);
            match self.send(|tok| self.req(Method::GET, &url, tok, t), |s| s.is_success(), false).await {
                Ok(resp) => return read_paced(resp, u64::MAX, &turn, |e| self.transport(e)).await,
                // As for ranged reads: files.get takes acknowledgeAbuse for a flagged file.
                Err(e) if e.kind == ErrorKind::Abusive && query.len() == 2 => {
                    tracing::warn!(file = id, "Drive flags this file as abusive; reading it with acknowledgeAbuse");
                    query.push(("acknowledgeAbuse", "true"));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Takes exactly the asked bytes from a ranged read's answer (`transport`
/// turns a failed body read into the error).
async fn read_ranged_body(
    resp: Response,
    range: Range<u64>,
    turn: &Turn,
    transport: impl Fn(reqwest::Error) -> ApiError,
) -> Result<Bytes, ApiError> {
    let want = range.end - range.start;
    if resp.status() == StatusCode::PARTIAL_CONTENT {
        let cr = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (start, end_incl) = cr.as_deref().and_then(parse_content_range).ok_or_else(|| {
            ApiError::new(ErrorKind::Transient, format!("206 answer with a bad Content-Range {cr:?}"))
        })?;
        if start != range.start || end_incl < start {
            return Err(ApiError::new(
                ErrorKind::Transient,
                format!("asked bytes {}-{}, Drive sent {start}-{end_incl}", range.start, range.end - 1),
            ));
        }
        // Saturating: the end is the server's word (`bytes 0-18446744073709551615/*`).
        let expect = (end_incl - start).saturating_add(1).min(want);
        let body = read_paced(resp, want, turn, &transport).await?;
        if (body.len() as u64) < expect {
            return Err(ApiError::new(ErrorKind::Transient, format!("short read: {} of {expect} bytes", body.len())));
        }
        return Ok(body.slice(..expect as usize));
    }
    // 200: the whole file from byte 0. Skip to the start, keep `want`
    // bytes, and drop the connection rather than read a 40 GB image.
    let mut out = BytesMut::with_capacity(want.min(64 << 20) as usize);
    let mut pos = 0u64;
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(&transport)?;
        let (c0, c1) = (pos, pos + chunk.len() as u64);
        pos = c1;
        turn.until(c1.saturating_sub(range.start).min(want)).await;
        let lo = range.start.max(c0);
        let hi = range.end.min(c1);
        if lo < hi {
            out.extend_from_slice(&chunk[(lo - c0) as usize..(hi - c0) as usize]);
        }
        if pos >= range.end {
            break;
        }
    }
    Ok(out.freeze())
}

/// A response's body, at most `cap` bytes of it: read whole when `turn`
/// is free, else piece by piece, each read only once the turn has reached
/// it, so the sender is held back by TCP flow control (a socket buffer's
/// worth may come early).
async fn read_paced(
    resp: Response,
    cap: u64,
    turn: &Turn,
    transport: impl Fn(reqwest::Error) -> ApiError,
) -> Result<Bytes, ApiError> {
    if !turn.is_paced() {
        return resp.bytes().await.map_err(transport);
    }
    let mut out = BytesMut::with_capacity(resp.content_length().unwrap_or(0).min(cap).min(64 << 20) as usize);
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(&transport)?;
        out.extend_from_slice(&chunk);
        turn.until(out.len() as u64).await;
        if out.len() as u64 >= cap {
            break;
        }
    }
    Ok(out.freeze())
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, _total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Percent-encodes a path segment (file ids are URL-safe already; this is
/// for safety against odd input, never for trust).
pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str, upload: bool) -> ApiError {
        classify(StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), body.as_bytes(), upload)
    }

    fn google(code: u16, reason: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message,
            "errors": [{"domain": "usageLimits", "reason": reason, "message": message}]}})
        .to_string()
    }

    #[test]
    fn gdrive_errors_map_to_classes() {
        let rate = google(403, "userRateLimitExceeded", "User Rate Limit Exceeded. Rate of requests for user exceed configured project quota. You may consider re-evaluating expected per-user traffic to the API and adjust project quota limits accordingly.");
        assert_eq!(err(403, &rate, false).kind, ErrorKind::Transient);
        assert_eq!(err(403, &rate, true).kind, ErrorKind::Transient);
        let cap = google(403, "userRateLimitExceeded", "User rate limit exceeded.");
        assert_eq!(err(403, &cap, true).kind, ErrorKind::Quota);
        let bare = google(403, "userRateLimitExceeded", "User rate limit exceeded");
        assert_eq!(err(403, &bare, true).kind, ErrorKind::Quota);
        assert_eq!(err(403, &cap, false).kind, ErrorKind::Transient);
        // The Resolve errors guide's own sample of per-user throttling: back
        // off and retry (Usage limits guide), on an upload too.
        let documented = google(403, "userRateLimitExceeded", "User Rate Limit Exceeded");
        assert_eq!(err(403, &documented, true).kind, ErrorKind::Transient);
        assert_eq!(err(403, &documented, false).kind, ErrorKind::Transient);
        assert_eq!(
            err(403, &google(403, "rateLimitExceeded", "Rate Limit Exceeded"), false).kind,
            ErrorKind::Transient
        );
        assert_eq!(err(429, &google(429, "rateLimitExceeded", "Too many"), false).kind, ErrorKind::Transient);
        // A quota's reason is final whichever of 403 or 429 carries it: a
        // 429 is retried only when it says it is throttling.
        assert_eq!(err(429, &google(429, "dailyLimitExceeded", "x"), false).kind, ErrorKind::Quota);
        assert_eq!(err(429, &google(429, "storageQuotaExceeded", "x"), true).kind, ErrorKind::Quota);
        assert_eq!(err(429, &cap, true).kind, ErrorKind::Quota);
        assert_eq!(err(429, &google(429, "unknownReason", "x"), false).kind, ErrorKind::Transient);
        let full =
            err(403, &google(403, "storageQuotaExceeded", "The user's Drive storage quota has been exceeded."), true);
        assert_eq!(full.kind, ErrorKind::Quota);
        assert!(full.message.contains("shared drive"), "{full}");
        // A shared drive full of items: gc, not storage, is the way out.
        let items = err(
            403,
            &google(403, "teamDriveFileLimitExceeded", "The file limit for this shared drive has been exceeded."),
            true,
        );
        assert_eq!(items.kind, ErrorKind::Quota);
        assert!(items.message.contains("driveblk gc") && !items.message.contains("buy storage"), "{items}");
        assert_eq!(err(403, &google(403, "downloadQuotaExceeded", "x"), false).kind, ErrorKind::Quota);
        assert_eq!(err(403, &google(403, "insufficientFilePermissions", "x"), false).kind, ErrorKind::Fatal);
        assert_eq!(err(403, &google(403, "insufficientPermissions", "x"), false).kind, ErrorKind::Auth);
        assert!(err(403, &google(403, "appNotAuthorizedToFile", "x"), false).message.contains("--scope drive"));
        assert_eq!(err(403, &google(403, "cannotDownloadAbusiveFile", "x"), false).kind, ErrorKind::Abusive);
        // Downloading turned off by the owner: final, and said as such.
        let refused =
            err(403, &google(403, "cannotDownloadFile", "This file cannot be downloaded by the user."), false);
        assert_eq!(refused.kind, ErrorKind::Fatal);
        assert!(refused.message.contains("owner turned downloading off"), "{refused}");
        assert_eq!(err(401, &google(401, "authError", "Invalid Credentials"), false).kind, ErrorKind::Auth);
        assert_eq!(err(404, &google(404, "notFound", "File not found: x."), false).kind, ErrorKind::NotFound);
        assert_eq!(err(409, "", true).kind, ErrorKind::Conflict);
        assert_eq!(err(416, "", false).kind, ErrorKind::RangeNotSatisfiable);
        assert_eq!(err(500, &google(500, "backendError", "Backend Error"), false).kind, ErrorKind::Transient);
        assert_eq!(err(503, "<html>unavailable</html>", false).kind, ErrorKind::Transient);
        assert_eq!(err(400, &google(400, "badRequest", "Invalid Value"), false).kind, ErrorKind::Fatal);
        let e = err(403, &google(403, "storageQuotaExceeded", "full"), true);
        assert_eq!(e.to_string(), format!("HTTP 403 storageQuotaExceeded: {}", e.message));
    }

    #[test]
    fn gdrive_retry_after_is_read() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &h, b"", false);
        assert_eq!((e.kind, e.retry_after), (ErrorKind::Transient, Some(Duration::from_secs(7))));
        // An HTTP date, and never longer than the cap.
        let at = std::time::SystemTime::now() + Duration::from_secs(120);
        let secs = retry_after(&httpdate::fmt_http_date(at)).unwrap().as_secs();
        assert!((118..=120).contains(&secs), "{secs}");
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(retry_after("999999"), Some(RETRY_AFTER_MAX));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn gdrive_content_range_and_q_escaping() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(q_escape(r"it's a\b"), r"it\'s a\\b");
    }

    fn response(status: u16, content_range: Option<&str>, body: &'static [u8]) -> Response {
        let mut b = http::Response::builder().status(status);
        if let Some(cr) = content_range {
            b = b.header("Content-Range", cr);
        }
        Response::from(b.body(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn gdrive_ranged_reads_take_only_the_asked_bytes() {
        // 206 with the asked range.
        let r = read_ranged_body(response(206, Some("bytes 2-4/10"), b"234"), 2..5, &Turn::free(), ApiError::transport)
            .await
            .unwrap();
        assert_eq!(&r[..], b"234");
        // 206 cut at the end of the file.
        let r = read_ranged_body(response(206, Some("bytes 8-9/10"), b"89"), 8..20, &Turn::free(), ApiError::transport)
            .await
            .unwrap();
        assert_eq!(&r[..], b"89");
        // 206 for another range than asked is refused (retryable).
        let e = read_ranged_body(response(206, Some("bytes 0-2/10"), b"012"), 2..5, &Turn::free(), ApiError::transport)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
        // 206 without Content-Range is refused.
        assert!(read_ranged_body(response(206, None, b"234"), 2..5, &Turn::free(), ApiError::transport).await.is_err());
        // An end past any file is cut to what was asked, not overflowed.
        let r = read_ranged_body(
            response(206, Some("bytes 0-18446744073709551615/*"), b"012"),
            0..3,
            &Turn::free(),
            ApiError::transport,
        )
        .await
        .unwrap();
        assert_eq!(&r[..], b"012");
        // A short body is refused.
        assert!(read_ranged_body(response(206, Some("bytes 2-4/10"), b"23"), 2..5, &Turn::free(), ApiError::transport)
            .await
            .is_err());
        // 200: the range was ignored; only the asked bytes are kept.
        let r = read_ranged_body(response(200, None, b"0123456789"), 2..5, &Turn::free(), ApiError::transport)
            .await
            .unwrap();
        assert_eq!(&r[..], b"234");
        let r = read_ranged_body(response(200, None, b"0123456789"), 8..20, &Turn::free(), ApiError::transport)
            .await
            .unwrap();
        assert_eq!(&r[..], b"89");
    }

    /// A server that sends a ranged read's headers and a few bytes, then
    /// nothing (a silent peer, a dead NAT entry): the read fails within
    /// the request deadline, retryable, instead of waiting for bytes that
    /// never come.
    #[tokio::test]
    async fn gdrive_a_body_that_stalls_mid_way_fails_in_time() {
        use super::super::test_http::{serve, Reply};
        let base = serve(|_| {
            let head =
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/1000\r\nContent-Length: 1000\r\n\r\n";
            let mut b = head.as_bytes().to_vec();
            b.extend_from_slice(&[1u8; 10]);
            Reply::Stall(b)
        })
        .await;
        let cfg = crate::remote::config::DriveConfig {
            api_url: base,
            credentials: crate::remote::config::DriveCredentials::StaticToken("t".into()),
            request_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let api = DriveApi::new(&cfg);
        let t0 = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(20), api.read_range("f", 0..1000)).await;
        let e = r.expect("the read waited on the silent server").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn gdrive_file_fields() {
        let f: DriveFile = serde_json::from_str(
            r#"{"id":"abc","name":"gen-2","size":"12","md5Checksum":"m","headRevisionId":"r1","version":"7",
                "createdTime":"2024-05-01T10:00:00.123Z","appProperties":{"driveblkTag":"t"},"trashed":false}"#,
        )
        .unwrap();
        assert_eq!(f.size(), 12);
        assert_eq!(f.tag().as_deref(), Some("t"));
        assert_eq!(f.content_version().as_deref(), Some("r1:m"));
        assert_eq!(f.created_ms(), Some(1714557600123));
    }
}
