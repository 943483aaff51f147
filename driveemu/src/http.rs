//! The HTTP front: connection handling, routing, auth/quota/fault gates and every endpoint.
//!
//! Paths are those under `https://www.googleapis.com` (`/drive/v3/...`, `/upload/drive/v3/...`)
//! plus `/token` for the OAuth token endpoint. A handler that decides to "reset" returns
//! `Err(Reset)` to hyper, which drops the connection without an answer.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::{Method, Request, Response};
use rand::Rng;
use serde_json::{json, Value};

use crate::error::{ApiError, OAuthError};
use crate::query;
use crate::store::{is_google_type, FileRec, NewFile, FOLDER_MIME};
use crate::util::{now_ms, opaque, parse_range, parse_rfc3339, RangeAsk, Sel};
use crate::Shared;

pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Returned to hyper to drop the connection mid-request (an injected reset).
#[derive(Debug)]
pub(crate) struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by driveemu")
    }
}
impl std::error::Error for Reset {}

/// Why a handler did not answer normally.
enum Fail {
    Api(ApiError),
    Reset,
}
impl From<ApiError> for Fail {
    fn from(e: ApiError) -> Fail {
        Fail::Api(e)
    }
}
type R = Result<Response<Body>, Fail>;

const CHUNK_GRANULE: u64 = 256 * 1024;
const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_JSON_BODY: usize = 16 << 20;
/// The revisions methods have no `supportsAllDrives` parameter (revisions.get, list,
/// update and delete take only their ids, `acknowledgeAbuse`, paging and `fields`), so
/// they see a shared drive's files whatever the query says.
const REVISIONS_SEE_ALL_DRIVES: bool = true;

/// The file fields of Drive v3's `File` resource, for validating `fields=`.
const FILE_FIELDS: &[&str] = &[
    "kind",
    "driveId",
    "fileExtension",
    "copyRequiresWriterPermission",
    "md5Checksum",
    "contentHints",
    "writersCanShare",
    "viewedByMe",
    "mimeType",
    "exportLinks",
    "parents",
    "thumbnailLink",
    "iconLink",
    "shared",
    "lastModifyingUser",
    "owners",
    "headRevisionId",
    "sharingUser",
    "webViewLink",
    "webContentLink",
    "size",
    "viewersCanCopyContent",
    "permissions",
    "hasThumbnail",
    "spaces",
    "folderColorRgb",
    "id",
    "name",
    "description",
    "starred",
    "trashed",
    "explicitlyTrashed",
    "createdTime",
    "modifiedTime",
    "modifiedByMeTime",
    "viewedByMeTime",
    "sharedWithMeTime",
    "quotaBytesUsed",
    "version",
    "originalFilename",
    "ownedByMe",
    "fullFileExtension",
    "properties",
    "appProperties",
    "isAppAuthorized",
    "teamDriveId",
    "capabilities",
    "hasAugmentedPermissions",
    "trashingUser",
    "thumbnailVersion",
    "trashedTime",
    "modifiedByMe",
    "permissionIds",
    "imageMediaMetadata",
    "videoMediaMetadata",
    "shortcutDetails",
    "contentRestrictions",
    "resourceKey",
    "linkShareMetadata",
    "labelInfo",
    "sha1Checksum",
    "sha256Checksum",
    "inheritedPermissionsDisabled",
    "downloadRestrictions",
    "*",
];

/// A resumable upload session (files.create or files.update with `uploadType=resumable`).
pub(crate) struct Session {
    epoch: u64,
    created: Instant,
    /// None = create; Some(id) = update of that file.
    update_of: Option<String>,
    meta: Value,
    params: HashMap<String, String>,
    content_type: Option<String>,
    /// The total size, once known (X-Upload-Content-Length or a `/N` in Content-Range).
    total: Option<u64>,
    data: Vec<u8>,
    /// The final answer, kept so a status query after completion gets it again.
    done: Option<Value>,
    /// Set by a cut-off chunk or a status query; the next chunk counts as a resume.
    interrupted: bool,
    service_account: bool,
}

impl Session {
    /// The bytes received so far.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.data
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    sh: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if sh.faults.is_down() {
            sh.stats.with(|s| s.resets += 1);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let sh2 = sh.clone();
        let mut stop2 = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let sh = sh2.clone();
                async move { handle(sh, req).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop2.changed() => {}
            }
        });
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

fn json_resp(sh: &Shared, status: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    sh.stats.with(|s| s.bytes_out += body.len() as u64);
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json; charset=UTF-8")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn api_error_resp(sh: &Shared, e: &ApiError) -> Response<Body> {
    sh.stats.with(|s| *s.errors.entry(e.status).or_default() += 1);
    let mut r = json_resp(sh, e.status, &e.body());
    let h = r.headers_mut();
    if let Some(secs) = e.retry_after {
        h.insert("Retry-After", secs.into());
    }
    for (k, v) in &e.headers {
        if let Ok(v) = v.parse() {
            h.insert(*k, v);
        }
    }
    r
}

fn oauth_error_resp(sh: &Shared, e: &OAuthError) -> Response<Body> {
    sh.stats.with(|s| *s.errors.entry(e.status).or_default() += 1);
    json_resp(sh, e.status, &e.body())
}

fn empty(status: u16) -> Response<Body> {
    Response::builder().status(status).body(full(Bytes::new())).unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn roll(sh: &Shared, p: f64) -> bool {
    p > 0.0 && sh.rng.lock().random::<f64>() < p
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Reset> {
    while sh.faults.is_silent() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if sh.faults.is_down() {
        sh.stats.with(|s| s.resets += 1);
        return Err(Reset);
    }
    let (lat, jit) = sh.faults.latency();
    let extra = if jit.is_zero() { Duration::ZERO } else { jit.mul_f64(sh.rng.lock().random::<f64>()) };
    if !(lat + extra).is_zero() {
        tokio::time::sleep(lat + extra).await;
    }
    let (parts, body) = req.into_parts();
    let body: In = body.boxed_unsync();
    let write = matches!(parts.method, Method::POST | Method::PATCH | Method::PUT | Method::DELETE);
    let path = parts.uri.path().to_string();
    let params: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    let out = if path == "/token" {
        token_endpoint(&sh, &parts.method, &parts.headers, body).await
    } else if path == "/o/oauth2/v2/auth" || path == "/o/oauth2/auth" {
        sh.stats.request("authorize");
        Ok(match sh.auth.authorize(&params, &sh.faults) {
            Ok(location) => Response::builder()
                .status(302)
                .header("Location", location)
                .body(full(Bytes::new()))
                .unwrap_or_else(|_| empty(500)),
            Err((status, text)) => Response::builder()
                .status(status)
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(full(text))
                .unwrap_or_else(|_| empty(500)),
        })
    } else if let Some(rest) = path.strip_prefix("/drive/v3/") {
        match method_override(parts.method, &parts.headers, params, body).await {
            Ok((method, params, body)) => api(&sh, method, rest, &params, &parts.headers, body, false).await,
            Err(e) => Err(e),
        }
    } else if let Some(rest) = path.strip_prefix("/upload/drive/v3/") {
        api(&sh, parts.method, rest, &params, &parts.headers, body, true).await
    } else {
        Err(Fail::Api(ApiError::new(404, "global", "notFound", "Not Found")))
    };
    match out {
        Ok(r)
            if write
                && path != "/token"
                && !path.starts_with("/o/oauth2/")
                && (r.status().is_success() || r.status() == 308)
                && roll(&sh, sh.faults.lost_reply_rate()) =>
        {
            sh.stats.with(|s| {
                s.lost_replies += 1;
                s.resets += 1;
            });
            Err(Reset)
        }
        Ok(r) => Ok(r),
        Err(Fail::Api(e)) => Ok(api_error_resp(&sh, &e)),
        Err(Fail::Reset) => {
            sh.stats.with(|s| s.resets += 1);
            Err(Reset)
        }
    }
}

/// A request body, as received or as rebuilt by [`method_override`].
type In = UnsyncBoxBody<Bytes, hyper::Error>;

/// Google's APIs take a POST with `X-HTTP-Method-Override` as the method it
/// names. Google's client libraries send one for a GET whose URL would be
/// over 2,048 characters (a long `files.list` query): a POST whose
/// form-encoded body holds the query's parameters.
async fn method_override(
    method: Method,
    headers: &HeaderMap,
    mut params: HashMap<String, String>,
    body: In,
) -> Result<(Method, HashMap<String, String>, In), Fail> {
    let Some(over) = header(headers, "x-http-method-override") else { return Ok((method, params, body)) };
    if method != Method::POST {
        return Ok((method, params, body));
    }
    let Ok(over) = Method::from_bytes(over.trim().to_ascii_uppercase().as_bytes()) else {
        drain(body).await;
        return Err(ApiError::bad_request("Invalid X-HTTP-Method-Override.").into());
    };
    let form = header(headers, "content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Ok((over, params, body));
    }
    let raw = read_small(body).await?;
    params.extend(form_urlencoded::parse(&raw).into_owned());
    let none: In = Full::new(Bytes::new()).map_err(|e: Infallible| match e {}).boxed_unsync();
    Ok((over, params, none))
}

/// Reads and drops what is left of a refused request's body, so the client sees the error
/// answer rather than a reset caused by unread bytes (bounded: past 256 MiB it drops).
async fn drain(body: In) {
    let mut body = body;
    let mut n = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(d) = frame.into_data() {
            n += d.len();
            if n > 256 << 20 {
                return;
            }
        }
    }
}

/// Reads a small (JSON or form) request body whole.
async fn read_small(body: In) -> Result<Bytes, Fail> {
    let mut buf = Vec::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(Fail::Reset) };
        if let Ok(d) = frame.into_data() {
            buf.extend_from_slice(&d);
            if buf.len() > MAX_JSON_BODY {
                return Err(ApiError::bad_request("Request body too large.").into());
            }
        }
    }
    Ok(Bytes::from(buf))
}

/// Reads a media body through the shared link. `Err(partial)` if it was cut off, by an
/// injected reset (when `may_reset`) or by the client going away.
async fn read_media(sh: &Shared, body: In, expect: Option<u64>, may_reset: bool) -> Result<Vec<u8>, Vec<u8>> {
    let cutoff = match expect {
        Some(n) if n > 0 && may_reset && roll(sh, sh.faults.reset_rate()) => {
            Some(sh.rng.lock().random_range(0..n) as usize)
        }
        _ => None,
    };
    let mut buf = Vec::with_capacity(expect.unwrap_or(0).min(64 << 20) as usize);
    let mut body = body;
    let mut turn = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(buf) };
        let Ok(d) = frame.into_data() else { continue };
        sh.link.pace(&mut turn, d.len(), sh.faults.bandwidth()).await;
        sh.stats.with(|s| s.bytes_in += d.len() as u64);
        buf.extend_from_slice(&d);
        if let Some(c) = cutoff {
            if buf.len() >= c {
                buf.truncate(c);
                return Err(buf);
            }
        }
    }
    Ok(buf)
}

fn flag(params: &HashMap<String, String>, k: &str) -> bool {
    params.get(k).is_some_and(|v| v == "true" || v == "1")
}

fn header<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------- token endpoint

async fn token_endpoint(sh: &Shared, method: &Method, headers: &HeaderMap, body: In) -> R {
    sh.stats.request("token");
    if method != Method::POST {
        return Err(ApiError::new(405, "global", "httpMethodNotAllowed", "Method Not Allowed").into());
    }
    let raw = read_small(body).await?;
    sh.stats.with(|s| s.bytes_in += raw.len() as u64);
    let is_json = header(headers, "content-type").is_some_and(|c| c.starts_with("application/json"));
    let params: HashMap<String, String> = if is_json {
        match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(m)) => m.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string()))).collect(),
            _ => return Ok(oauth_error_resp(sh, &OAuthError::new(400, "invalid_request", "Invalid JSON payload."))),
        }
    } else {
        form_urlencoded::parse(&raw).into_owned().collect()
    };
    // RFC 6749 2.3.1: client credentials may come in an HTTP Basic header instead.
    let basic = header(headers, "authorization").and_then(|h| h.strip_prefix("Basic ")).and_then(|b| {
        use base64::Engine as _;
        let dec = base64::engine::general_purpose::STANDARD.decode(b.trim()).ok()?;
        let s = String::from_utf8(dec).ok()?;
        let (u, p) = s.split_once(':')?;
        let de = |x: &str| form_urlencoded::parse(format!("a={x}").as_bytes()).next().map(|(_, v)| v.into_owned());
        Some((de(u)?, de(p)?))
    });
    match sh.auth.token(&params, basic, &sh.token_uri(), &sh.faults, sh.cfg.token_lifetime) {
        Ok((v, pkce)) => {
            if let Some(method) = pkce {
                sh.stats.request(&format!("token pkce {method}"));
            }
            Ok(json_resp(sh, 200, &v))
        }
        Err(e) => Ok(oauth_error_resp(sh, &e)),
    }
}

// ---------------------------------------------------------------- API dispatch

async fn api(
    sh: &Arc<Shared>,
    method: Method,
    rest: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: In,
    upload: bool,
) -> R {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    // A resumable session URI is its own credential (Drive's upload examples send chunks
    // without Authorization), so a token expiring mid-upload does not break the upload.
    let session_uri = upload && params.contains_key("upload_id");
    let is_sa = match sh.auth.check_bearer(header(headers, "authorization"), &sh.faults) {
        Ok(sa) => sa,
        Err(_) if session_uri => false,
        Err(e) => {
            drain(body).await;
            return Err(e.into());
        }
    };
    if let Err(e) = gates(sh) {
        drain(body).await;
        return Err(e.into());
    }
    let all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    if upload {
        if params.contains_key("upload_id") {
            return session_request(sh, &method, params, headers, body).await;
        }
        let target = match segs.as_slice() {
            ["files"] if method == Method::POST => None,
            ["files", id] if method == Method::PATCH || method == Method::PUT => Some(id.to_string()),
            _ => return Err(ApiError::new(404, "global", "notFound", "Not Found").into()),
        };
        // files.create/update: "If you are uploading data with an /upload URI,
        // this field is required."
        let Some(ut) = params.get("uploadType").map(String::as_str) else {
            drain(body).await;
            return Err(ApiError::new(400, "global", "required", "Required parameter: uploadType")
                .at("parameter", "uploadType")
                .into());
        };
        return match ut {
            "media" => {
                sh.stats.request("upload media");
                simple_upload(sh, target, params, headers, body, is_sa, false).await
            }
            "multipart" => {
                sh.stats.request("upload multipart");
                simple_upload(sh, target, params, headers, body, is_sa, true).await
            }
            "resumable" => {
                sh.stats.request("upload resumable init");
                start_session(sh, target, params, headers, body, is_sa).await
            }
            _ => Err(ApiError::invalid_param_msg("uploadType", format!("Invalid value for uploadType: {ut}")).into()),
        };
    }
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["about"]) => {
            sh.stats.request("about.get");
            about(sh, params)
        }
        (Method::GET, ["files"]) => {
            sh.stats.request("files.list");
            list(sh, params)
        }
        (Method::POST, ["files"]) => {
            sh.stats.request("files.create");
            let raw = read_small(body).await?;
            let meta = parse_json_body(&raw)?;
            let v = do_create(sh, params, &meta, None, None, is_sa)?;
            Ok(json_resp(sh, 200, &v))
        }
        (Method::GET, ["files", "generateIds"]) => {
            sh.stats.request("files.generateIds");
            generate_ids(sh, params)
        }
        (Method::DELETE, ["files", "trash"]) => {
            sh.stats.request("files.emptyTrash");
            let mut st = sh.store.lock();
            let ids: Vec<String> =
                st.files.values().filter(|f| f.trashed && f.drive_id.is_none()).map(|f| f.id.clone()).collect();
            for id in ids {
                st.delete(&id);
            }
            Ok(empty(204))
        }
        (Method::GET, ["files", id]) => {
            if params.get("alt").map(String::as_str) == Some("media") {
                sh.stats.request("files.get media");
                download(sh, id, params, headers, None).await
            } else {
                sh.stats.request("files.get");
                let st = sh.store.lock();
                let f = st.get(id, all)?;
                Ok(json_resp(sh, 200, &file_json(f, params.get("fields"))?))
            }
        }
        (Method::PATCH, ["files", id]) => {
            sh.stats.request("files.update");
            let raw = read_small(body).await?;
            let meta = parse_json_body(&raw)?;
            let mut st = sh.store.lock();
            apply_update(&mut st, id, &meta, params, all)?;
            let f = st.get(id, all)?;
            Ok(json_resp(sh, 200, &file_json(f, params.get("fields"))?))
        }
        (Method::DELETE, ["files", id]) => {
            sh.stats.request("files.delete");
            let mut st = sh.store.lock();
            let f = st.get(id, all)?;
            if f.is_root {
                return Err(ApiError::new(
                    403,
                    "global",
                    "insufficientFilePermissions",
                    "The user does not have sufficient permissions for this file.",
                )
                .into());
            }
            if f.read_only {
                return Err(crate::store::no_write(id).into());
            }
            let fid = f.id.clone();
            st.delete(&fid);
            Ok(empty(204))
        }
        (Method::POST, ["files", id, "copy"]) => {
            sh.stats.request("files.copy");
            let raw = read_small(body).await?;
            let meta = parse_json_body(&raw)?;
            copy(sh, id, &meta, params, is_sa)
        }
        (Method::GET, ["files", id, "revisions"]) => {
            sh.stats.request("revisions.list");
            let st = sh.store.lock();
            let f = st.get(id, REVISIONS_SEE_ALL_DRIVES)?;
            if f.content.is_none() {
                return Err(revisions_unsupported().into());
            }
            let want = want_in(params.get("fields"), Some("revisions"));
            let v = json!({ "kind": "drive#revisionList", "revisions": f.revisions.iter().map(|r| r.to_json(&want)).collect::<Vec<_>>() });
            Ok(json_resp(sh, 200, &mask(&v, params.get("fields"), &default_revision_list)?))
        }
        (Method::GET, ["files", id, "revisions", rid]) => {
            if params.get("alt").map(String::as_str) == Some("media") {
                sh.stats.request("revisions.get media");
                return download(sh, id, params, headers, Some(rid)).await;
            }
            sh.stats.request("revisions.get");
            let st = sh.store.lock();
            let f = st.get(id, REVISIONS_SEE_ALL_DRIVES)?;
            let r = find_revision(f, rid)?;
            let want = want_in(params.get("fields"), None);
            Ok(json_resp(sh, 200, &mask(&r.to_json(&want), params.get("fields"), &default_revision)?))
        }
        (Method::PATCH, ["files", id, "revisions", rid]) => {
            sh.stats.request("revisions.update");
            let raw = read_small(body).await?;
            let meta = parse_json_body(&raw)?;
            let mut st = sh.store.lock();
            let f = st.get_mut(id, REVISIONS_SEE_ALL_DRIVES)?;
            if f.read_only {
                return Err(crate::store::no_write(id).into());
            }
            let rid = if *rid == "head" { f.head_revision_id().unwrap_or("").to_string() } else { rid.to_string() };
            let _ = find_revision(f, &rid)?;
            let obj = meta.as_object().cloned().unwrap_or_default();
            for (k, v) in &obj {
                match (k.as_str(), v) {
                    ("keepForever", Value::Bool(_))
                    | ("published", _)
                    | ("publishAuto", _)
                    | ("publishedOutsideDomain", _) => {}
                    _ => return Err(ApiError::not_writable().into()),
                }
            }
            let r = f.revisions.iter_mut().find(|r| r.id == rid).ok_or_else(|| revision_not_found(&rid))?;
            if let Some(Value::Bool(k)) = obj.get("keepForever") {
                r.keep_forever = *k;
            }
            let want = want_in(params.get("fields"), None);
            let v = r.to_json(&want);
            Ok(json_resp(sh, 200, &mask(&v, params.get("fields"), &default_revision)?))
        }
        (Method::DELETE, ["files", id, "revisions", rid]) => {
            sh.stats.request("revisions.delete");
            let mut st = sh.store.lock();
            let f = st.get_mut(id, REVISIONS_SEE_ALL_DRIVES)?;
            if f.read_only {
                return Err(crate::store::no_write(id).into());
            }
            let rid = find_revision(f, rid)?.id.clone();
            // "The last remaining file version can't be deleted."
            if f.revisions.len() <= 1 {
                return Err(ApiError::new(
                    403,
                    "global",
                    "cannotDeleteLastRevision",
                    "The last remaining revision of a file cannot be deleted.",
                )
                .into());
            }
            f.revisions.retain(|r| r.id != rid);
            // The head is the newest remaining revision.
            if let Some(last) = f.revisions.last() {
                f.content = Some(last.content.clone());
            }
            Ok(empty(204))
        }
        (Method::POST, ["drives"]) => {
            sh.stats.request("drives.create");
            let raw = read_small(body).await?;
            let meta = parse_json_body(&raw)?;
            if params.get("requestId").is_none_or(|r| r.is_empty()) {
                return Err(ApiError::new(400, "global", "required", "Required parameter: requestId")
                    .at("parameter", "requestId")
                    .into());
            }
            let name = meta.get("name").and_then(Value::as_str).unwrap_or("Untitled");
            let d = sh.store.lock().create_drive(name);
            Ok(json_resp(sh, 200, &mask(&d.to_json(), params.get("fields"), &default_drive)?))
        }
        (Method::GET, ["drives"]) => {
            sh.stats.request("drives.list");
            let st = sh.store.lock();
            let mut ds: Vec<_> = st.drives.values().cloned().collect();
            ds.sort_by_key(|d| d.created_ms);
            let v = json!({ "kind": "drive#driveList", "drives": ds.iter().map(|d| d.to_json()).collect::<Vec<_>>() });
            Ok(json_resp(sh, 200, &mask(&v, params.get("fields"), &|v: &Value| v.clone())?))
        }
        (Method::GET, ["drives", id]) => {
            sh.stats.request("drives.get");
            let st = sh.store.lock();
            let d = st.drives.get(*id).ok_or_else(|| {
                ApiError::new(404, "global", "notFound", format!("Shared drive not found: {id}"))
                    .at("parameter", "driveId")
            })?;
            Ok(json_resp(sh, 200, &mask(&d.to_json(), params.get("fields"), &default_drive)?))
        }
        _ => Err(ApiError::new(404, "global", "notFound", "Not Found").into()),
    }
}

/// The per-user quota and the random 5xx, checked after auth as Drive does.
fn gates(sh: &Shared) -> Result<(), ApiError> {
    if let Err((use_429, wait)) = sh.faults.take_rate_token() {
        sh.stats.with(|s| if use_429 { s.rate_limited_429 += 1 } else { s.rate_limited_403 += 1 });
        return Err(if use_429 {
            ApiError::too_many_requests(wait.as_secs_f64().ceil() as u64)
        } else {
            ApiError::user_rate_limit()
        });
    }
    if roll(sh, sh.faults.error_rate()) {
        let status = if sh.rng.lock().random::<bool>() { 503 } else { 500 };
        sh.stats.with(|s| s.injected_5xx += 1);
        return Err(ApiError::backend(status));
    }
    Ok(())
}

fn parse_json_body(raw: &[u8]) -> Result<Value, ApiError> {
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(ApiError::new(400, "global", "parseError", "Parse Error")),
    }
}

fn revisions_unsupported() -> ApiError {
    ApiError::new(403, "global", "revisionsNotSupported", "The file does not support revisions.")
}

fn revision_not_found(rid: &str) -> ApiError {
    ApiError::new(404, "global", "notFound", format!("Revision not found: {rid}.")).at("parameter", "revisionId")
}

fn find_revision<'a>(f: &'a FileRec, rid: &str) -> Result<&'a crate::store::Revision, ApiError> {
    if f.content.is_none() {
        return Err(revisions_unsupported());
    }
    let rid = if rid == "head" { f.head_revision_id().unwrap_or("") } else { rid };
    f.revisions.iter().find(|r| r.id == rid).ok_or_else(|| revision_not_found(rid))
}

fn default_revision(v: &Value) -> Value {
    Sel::parse("kind,id,mimeType,modifiedTime").map(|s| s.apply(v)).unwrap_or_default()
}
fn default_revision_list(v: &Value) -> Value {
    Sel::parse("kind,revisions(kind,id,mimeType,modifiedTime)").map(|s| s.apply(v)).unwrap_or_default()
}
fn default_drive(v: &Value) -> Value {
    Sel::parse("kind,id,name").map(|s| s.apply(v)).unwrap_or_default()
}

/// Applies `fields=` (or the method's default selection when absent).
fn mask(v: &Value, fields: Option<&String>, default: &dyn Fn(&Value) -> Value) -> Result<Value, ApiError> {
    match fields {
        None => Ok(default(v)),
        Some(f) if f.trim().is_empty() => Ok(default(v)),
        Some(f) => Ok(Sel::parse(f)?.apply(v)),
    }
}

fn check_file_fields(sel: &Sel, spec: &str) -> Result<(), ApiError> {
    for n in sel.names() {
        if !FILE_FIELDS.contains(&n.as_str()) {
            return Err(
                ApiError::invalid_param_msg("fields", format!("Invalid field selection {n}")).at("parameter", "fields")
            );
        }
    }
    let _ = spec;
    Ok(())
}

/// Whether a response shaped by `fields` (under member `under`, e.g. "files") keeps a
/// member; malformed specs keep everything (they are refused later anyway).
fn want_in(fields: Option<&String>, under: Option<&str>) -> impl Fn(&str) -> bool {
    let sel = match fields.filter(|s| !s.trim().is_empty()) {
        None => Some(Sel::Some(Default::default())),
        Some(spec) => Sel::parse(spec).ok(),
    };
    let sel = match (sel, under) {
        (Some(s), Some(u)) => s.child(u).or(Some(Sel::Some(Default::default()))),
        (s, _) => s,
    };
    move |k: &str| sel.as_ref().is_none_or(|s| s.child(k).is_some())
}

/// A file resource with `fields=` applied; without it, Drive's default kind/id/name/mimeType.
fn file_json(f: &FileRec, fields: Option<&String>) -> Result<Value, ApiError> {
    let full = f.to_json(&want_in(fields, None));
    match fields.filter(|s| !s.trim().is_empty()) {
        None => Ok(Sel::parse("kind,id,name,mimeType").map(|s| s.apply(&full)).unwrap_or_default()),
        Some(spec) => {
            let sel = Sel::parse(spec)?;
            check_file_fields(&sel, spec)?;
            Ok(sel.apply(&full))
        }
    }
}

// ---------------------------------------------------------------- metadata

const CREATE_WRITABLE: &[&str] = &[
    "id",
    "name",
    "mimeType",
    "parents",
    "description",
    "starred",
    "appProperties",
    "properties",
    "createdTime",
    "modifiedTime",
    "originalFilename",
    "contentHints",
    "copyRequiresWriterPermission",
    "writersCanShare",
    "folderColorRgb",
    "viewedByMeTime",
    "shortcutDetails",
    "contentRestrictions",
    "kind",
    "inheritedPermissionsDisabled",
    "downloadRestrictions",
];
const UPDATE_WRITABLE: &[&str] = &[
    "name",
    "mimeType",
    "description",
    "starred",
    "trashed",
    "appProperties",
    "properties",
    "modifiedTime",
    "originalFilename",
    "contentHints",
    "copyRequiresWriterPermission",
    "writersCanShare",
    "folderColorRgb",
    "viewedByMeTime",
    "contentRestrictions",
    "kind",
    "inheritedPermissionsDisabled",
    "downloadRestrictions",
];

fn str_field(meta: &Value, k: &str) -> Result<Option<String>, ApiError> {
    match meta.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request(format!("Invalid value for field {k}."))),
    }
}

fn time_field(meta: &Value, k: &str) -> Result<Option<i64>, ApiError> {
    match str_field(meta, k)? {
        None => Ok(None),
        Some(s) => {
            parse_rfc3339(&s).map(Some).ok_or_else(|| ApiError::bad_request(format!("Invalid value for {k}: {s}")))
        }
    }
}

/// Property maps: a null value deletes the key (files.update); limits as Drive documents:
/// key + value at most 124 bytes, at most 30 properties per app.
fn props(meta: &Value, k: &str) -> Result<Vec<(String, Option<String>)>, ApiError> {
    let Some(v) = meta.get(k) else { return Ok(vec![]) };
    let Some(m) = v.as_object() else {
        return Err(ApiError::bad_request(format!("Invalid value for field {k}.")));
    };
    let mut out = Vec::new();
    for (key, val) in m {
        let val = match val {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => return Err(ApiError::bad_request(format!("Invalid value for property {key}."))),
        };
        if key.len() + val.as_ref().map_or(0, |v| v.len()) > 124 {
            return Err(ApiError::bad_request(format!(
                "The property {key} exceeds the 124 byte limit on key and value size."
            ))
            .at("other", k));
        }
        out.push((key.clone(), val));
    }
    Ok(out)
}

fn apply_props(map: &mut BTreeMap<String, String>, changes: Vec<(String, Option<String>)>) -> Result<(), ApiError> {
    for (k, v) in changes {
        match v {
            Some(v) => {
                map.insert(k, v);
            }
            None => {
                map.remove(&k);
            }
        }
    }
    if map.len() > 30 {
        return Err(ApiError::bad_request("A file can have at most 30 properties from one app."));
    }
    Ok(())
}

fn check_writable(meta: &Value, allowed: &[&str]) -> Result<(), ApiError> {
    if let Some(obj) = meta.as_object() {
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                if k == "parents" {
                    return Err(ApiError::new(
                        403,
                        "global",
                        "fieldNotWritable",
                        "The parents field is not directly writable in update requests. Use the addParents and removeParents parameters instead.",
                    ));
                }
                if FILE_FIELDS.contains(&k.as_str()) {
                    return Err(ApiError::not_writable());
                }
                // Unknown names: Drive rejects them while parsing the JSON.
                return Err(ApiError::bad_request(format!(
                    "Invalid JSON payload received. Unknown name \"{k}\": Cannot find field."
                )));
            }
        }
    }
    Ok(())
}

fn new_file_from(meta: &Value, params: &HashMap<String, String>) -> Result<NewFile, ApiError> {
    check_writable(meta, CREATE_WRITABLE)?;
    let parents = match meta.get("parents") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request("Invalid value for parents.")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad_request("Invalid value for parents.")),
    };
    let mut nf = NewFile {
        id: str_field(meta, "id")?,
        name: str_field(meta, "name")?,
        mime_type: str_field(meta, "mimeType")?,
        parents,
        description: str_field(meta, "description")?,
        starred: meta.get("starred").and_then(Value::as_bool).unwrap_or(false),
        created_ms: time_field(meta, "createdTime")?,
        modified_ms: time_field(meta, "modifiedTime")?,
        original_filename: str_field(meta, "originalFilename")?,
        keep_forever: flag(params, "keepRevisionForever"),
        ..Default::default()
    };
    apply_props(&mut nf.app_properties, props(meta, "appProperties")?)?;
    apply_props(&mut nf.properties, props(meta, "properties")?)?;
    Ok(nf)
}

/// Quota checks for `len` new bytes landing in My Drive (or a shared drive).
fn check_storage(
    sh: &Shared,
    st: &crate::store::Store,
    len: u64,
    into_shared_drive: bool,
    is_sa: bool,
) -> Result<(), ApiError> {
    if into_shared_drive {
        return Ok(());
    }
    if is_sa && sh.faults.sa_no_quota() {
        return Err(ApiError::new(
            403,
            "usageLimits",
            "storageQuotaExceeded",
            "Service Accounts do not have storage quota. Leverage shared drives, or use OAuth delegation instead.",
        ));
    }
    if let Some(q) = sh.faults.storage_quota() {
        if st.bytes_used().saturating_add(len) > q {
            return Err(ApiError::storage_quota());
        }
    }
    Ok(())
}

/// The folder-size limit for a new item under `parents` (`set_folder_child_limit`).
fn check_children(sh: &Shared, st: &crate::store::Store, parents: &[String]) -> Result<(), ApiError> {
    let Some(limit) = sh.faults.folder_child_limit() else { return Ok(()) };
    for p in parents {
        if st.files.get(p).is_some_and(|f| f.is_root) {
            continue;
        }
        let n = st.files.values().filter(|f| f.parents.iter().any(|q| q == p)).count() as u64;
        if n >= limit {
            return Err(ApiError::folder_full());
        }
    }
    Ok(())
}

fn check_upload_cap(sh: &Shared, len: u64) -> Result<(), ApiError> {
    if let Some(cap) = sh.faults.upload_cap() {
        let used = sh.faults.uploaded_bytes.load(std::sync::atomic::Ordering::SeqCst);
        if used.saturating_add(len) > cap {
            return Err(ApiError::upload_cap());
        }
    }
    Ok(())
}

fn count_upload(sh: &Shared, len: u64) {
    sh.faults.uploaded_bytes.fetch_add(len, std::sync::atomic::Ordering::SeqCst);
}

/// files.create with optional bytes; returns the masked resource. Callers pass bytes that
/// arrived with the request through `Shared::keep` first; a copy's bytes are its source's.
fn do_create(
    sh: &Shared,
    params: &HashMap<String, String>,
    meta: &Value,
    content: Option<Bytes>,
    media_mime: Option<&str>,
    is_sa: bool,
) -> Result<Value, ApiError> {
    let nf = new_file_from(meta, params)?;
    let all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    let mut st = sh.store.lock();
    let (parents, drive) = st.resolve_parents(&nf.parents, all)?;
    check_children(sh, &st, &parents)?;
    let mime = nf.mime_type.clone().or_else(|| media_mime.map(str::to_string)).unwrap_or_default();
    if !is_google_type(&mime) {
        check_storage(sh, &st, content.as_ref().map_or(0, |c| c.len() as u64), drive.is_some(), is_sa)?;
    }
    let id = st.create(nf, content, all, sh.faults.listing_lag(), media_mime)?;
    let f = st.get(&id, true)?;
    file_json(f, params.get("fields"))
}

/// files.update's metadata part: body fields plus addParents/removeParents.
fn apply_update(
    st: &mut crate::store::Store,
    id: &str,
    meta: &Value,
    params: &HashMap<String, String>,
    all: bool,
) -> Result<(), ApiError> {
    check_writable(meta, UPDATE_WRITABLE)?;
    let f = st.get(id, all)?;
    if f.is_root {
        return Err(ApiError::new(
            403,
            "global",
            "insufficientFilePermissions",
            "The user does not have sufficient permissions for this file.",
        ));
    }
    if f.read_only {
        return Err(crate::store::no_write(id));
    }
    let fid = f.id.clone();
    let name = str_field(meta, "name")?;
    let mime = str_field(meta, "mimeType")?;
    let modified = time_field(meta, "modifiedTime")?;
    let app = props(meta, "appProperties")?;
    let prp = props(meta, "properties")?;
    let split = |k: &str| -> Vec<String> {
        params
            .get(k)
            .map(|s| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(|x| st.canon(x).to_string()).collect())
            .unwrap_or_default()
    };
    let add = split("addParents");
    let remove = split("removeParents");
    let mut new_parents = f.parents.clone();
    new_parents.retain(|p| !remove.contains(p));
    let mut new_drive = f.drive_id.clone();
    for p in &add {
        let parent = st.get(p, all).map_err(|_| ApiError::file_not_found(p))?;
        if parent.mime_type != FOLDER_MIME {
            return Err(ApiError::bad_request(format!("The parent {p} is not a folder.")));
        }
        if parent.read_only {
            return Err(crate::store::no_write(p));
        }
        if st.subtree(&fid).contains(p) {
            return Err(ApiError::bad_request("The requested parent would create a cycle in the folder graph."));
        }
        new_drive = parent.drive_id.clone();
        if !new_parents.contains(p) {
            new_parents.push(p.clone());
        }
    }
    if new_parents.len() > 1 {
        return Err(ApiError::new(
            403,
            "global",
            "cannotAddParent",
            "Increasing the number of parents is not allowed.",
        ));
    }
    let trashed = match meta.get("trashed") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(ApiError::bad_request("Invalid value for field trashed.")),
    };
    let moved = new_parents != f.parents;
    let subtree = if moved && new_drive != f.drive_id { st.subtree(&fid) } else { vec![] };
    let f = st.files.get_mut(&fid).ok_or_else(|| ApiError::file_not_found(id))?;
    let mut changed = moved;
    if let Some(n) = name {
        f.name = n;
        changed = true;
    }
    if let Some(m) = mime {
        if m != f.mime_type && (is_google_type(&m) || is_google_type(&f.mime_type)) {
            return Err(ApiError::bad_request("Changing to or from a Google-native type is not supported."));
        }
        f.mime_type = m;
        changed = true;
    }
    if let Some(d) = meta.get("description") {
        f.description = d.as_str().map(str::to_string);
        changed = true;
    }
    if let Some(Value::Bool(s)) = meta.get("starred") {
        f.starred = *s;
        changed = true;
    }
    if let Some(o) = str_field(meta, "originalFilename")? {
        f.original_filename = Some(o);
        changed = true;
    }
    if !app.is_empty() {
        apply_props(&mut f.app_properties, app)?;
        changed = true;
    }
    if !prp.is_empty() {
        apply_props(&mut f.properties, prp)?;
        changed = true;
    }
    f.parents = new_parents;
    if changed {
        f.version += 1;
        f.modified_ms = modified.unwrap_or_else(now_ms);
    } else if let Some(m) = modified {
        f.modified_ms = m;
        f.version += 1;
    }
    for sid in subtree {
        if let Some(x) = st.files.get_mut(&sid) {
            x.drive_id = new_drive.clone();
        }
    }
    if let Some(t) = trashed {
        st.set_trashed(&fid, t);
    }
    if moved {
        // Into or out of a trashed folder: trashed follows the new parent.
        st.inherit_trash(&fid);
    }
    Ok(())
}

// ---------------------------------------------------------------- simple uploads

/// Splits a `multipart/related` body into (metadata JSON, media bytes, media content type).
/// Drive takes exactly two parts, metadata first; the media part runs to the closing
/// delimiter, which is searched from the end so large bodies are not scanned byte by byte.
fn parse_multipart(content_type: &str, body: &[u8]) -> Result<(Value, Bytes, Option<String>), ApiError> {
    let bad = || ApiError::bad_request("Invalid multipart request.");
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_string())
        .ok_or_else(bad)?;
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let find = |from: usize, needle: &[u8]| -> Option<usize> {
        body.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
    };
    // Skips the line break after a delimiter, then splits headers from content.
    let part_start = |mut pos: usize| -> Option<(Vec<(String, String)>, usize)> {
        if body.get(pos..pos + 2) == Some(b"\r\n") {
            pos += 2;
        } else if body.get(pos..pos + 1) == Some(b"\n") {
            pos += 1;
        }
        // Part headers are short: look for their end in the first 64 KiB only.
        let window = &body[pos.min(body.len())..(pos + 65536).min(body.len())];
        let in_window = |needle: &[u8]| window.windows(needle.len()).position(|w| w == needle).map(|p| p + pos);
        let (end, sep) = match (in_window(b"\r\n\r\n"), in_window(b"\n\n")) {
            (Some(a), Some(b)) if b < a => (b, 2),
            (Some(a), _) => (a, 4),
            (None, Some(b)) => (b, 2),
            _ => return None,
        };
        let headers = String::from_utf8_lossy(&body[pos..end])
            .lines()
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
            .collect();
        Some((headers, end + sep))
    };
    let trim_eol = |start: usize, mut end: usize| -> usize {
        if end >= start + 2 && &body[end - 2..end] == b"\r\n" {
            end -= 2;
        } else if end > start && body[end - 1] == b'\n' {
            end -= 1;
        }
        end
    };
    let first = find(0, d).ok_or_else(bad)? + d.len();
    let (_, meta_start) = part_start(first).ok_or_else(bad)?;
    let second = find(meta_start, d).ok_or_else(bad)?;
    let meta = parse_json_body(&body[meta_start..trim_eol(meta_start, second)])?;
    let (media_headers, media_start) = part_start(second + d.len()).ok_or_else(bad)?;
    let closing = format!("{delim}--");
    let close_at = body
        .windows(closing.len())
        .rposition(|w| w == closing.as_bytes())
        .filter(|c| *c >= media_start)
        .ok_or_else(bad)?;
    let media = &body[media_start..trim_eol(media_start, close_at)];
    let media_type = media_headers.iter().find(|(k, _)| k == "content-type").map(|(_, v)| v.clone());
    Ok((meta, Bytes::copy_from_slice(media), media_type))
}

async fn simple_upload(
    sh: &Shared,
    target: Option<String>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: In,
    is_sa: bool,
    multipart: bool,
) -> R {
    let len = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if let Err(e) = check_upload_cap(sh, len.unwrap_or(0)) {
        drain(body).await;
        return Err(e.into());
    }
    let raw = match read_media(sh, body, len, true).await {
        Ok(b) => b,
        // Cut off: a simple upload keeps nothing.
        Err(_) => return Err(Fail::Reset),
    };
    let ctype = header(headers, "content-type").map(str::to_string);
    let (meta, media, media_mime) = if multipart {
        parse_multipart(ctype.as_deref().unwrap_or(""), &raw)?
    } else {
        (json!({}), Bytes::from(raw), ctype.filter(|c| !c.is_empty()))
    };
    check_upload_cap(sh, media.len() as u64)?;
    count_upload(sh, media.len() as u64);
    match target {
        None => {
            let v = do_create(sh, params, &meta, Some(sh.keep(media)?), media_mime.as_deref(), is_sa)?;
            Ok(json_resp(sh, 200, &v))
        }
        Some(id) => {
            let v = do_update_content(sh, &id, params, &meta, media, is_sa)?;
            Ok(json_resp(sh, 200, &v))
        }
    }
}

/// files.update with new bytes (and optional metadata).
fn do_update_content(
    sh: &Shared,
    id: &str,
    params: &HashMap<String, String>,
    meta: &Value,
    media: Bytes,
    is_sa: bool,
) -> Result<Value, ApiError> {
    let all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    let media = sh.keep(media)?;
    let mut st = sh.store.lock();
    let f = st.get(id, all)?;
    if f.content.is_none() {
        return Err(ApiError::bad_request("Google-native files and folders have no binary content to replace."));
    }
    if f.read_only {
        return Err(crate::store::no_write(id));
    }
    let grow = (media.len() as u64).saturating_sub(f.size());
    let in_drive = f.drive_id.is_some();
    check_storage(sh, &st, grow, in_drive, is_sa)?;
    apply_update(&mut st, id, meta, params, all)?;
    st.replace_content(id, media, all, flag(params, "keepRevisionForever"), None)?;
    let f = st.get(id, all)?;
    file_json(f, params.get("fields"))
}

// ---------------------------------------------------------------- resumable uploads

async fn start_session(
    sh: &Shared,
    target: Option<String>,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: In,
    is_sa: bool,
) -> R {
    let raw = read_small(body).await?;
    sh.stats.with(|s| s.bytes_in += raw.len() as u64);
    let meta = parse_json_body(&raw)?;
    let total = match header(headers, "x-upload-content-length") {
        None => None,
        Some(v) => {
            Some(v.trim().parse::<u64>().map_err(|_| ApiError::bad_request("Invalid X-Upload-Content-Length."))?)
        }
    };
    let all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    check_upload_cap(sh, total.unwrap_or(0))?;
    {
        // Validate now, so a doomed upload fails before its bytes are sent.
        let st = sh.store.lock();
        match &target {
            None => {
                let nf = new_file_from(&meta, params)?;
                let (parents, drive) = st.resolve_parents(&nf.parents, all)?;
                check_children(sh, &st, &parents)?;
                let mime = nf.mime_type.clone().unwrap_or_default();
                if let Some(id) = &nf.id {
                    st.check_new_id(id, &mime)?;
                }
                check_storage(sh, &st, total.unwrap_or(0), drive.is_some(), is_sa)?;
            }
            Some(id) => {
                let f = st.get(id, all)?;
                if f.content.is_none() {
                    return Err(ApiError::bad_request(
                        "Google-native files and folders have no binary content to replace.",
                    )
                    .into());
                }
                if f.read_only {
                    return Err(crate::store::no_write(id).into());
                }
                check_writable(&meta, UPDATE_WRITABLE)?;
                let grow = total.unwrap_or(0).saturating_sub(f.size());
                check_storage(sh, &st, grow, f.drive_id.is_some(), is_sa)?;
            }
        }
    }
    let upload_id = format!("AHMx{}", opaque(&mut *sh.rng.lock(), 60));
    let session = Session {
        epoch: sh.faults.session_epoch.load(std::sync::atomic::Ordering::SeqCst),
        created: Instant::now(),
        update_of: target.clone(),
        meta,
        params: params.clone(),
        content_type: header(headers, "x-upload-content-type").map(str::to_string),
        total,
        data: Vec::new(),
        done: None,
        interrupted: false,
        service_account: is_sa,
    };
    sh.sessions.lock().insert(upload_id.clone(), session);
    let path = match &target {
        None => "/upload/drive/v3/files".to_string(),
        Some(id) => format!("/upload/drive/v3/files/{id}"),
    };
    // The host the client reached (a proxy in front of the emulator gets
    // the chunks too, as Google's own front ends do).
    let base = header(headers, "host").map_or_else(|| sh.base_url.clone(), |h| format!("http://{h}"));
    let mut loc = format!("{base}{path}?uploadType=resumable&upload_id={upload_id}");
    for k in ["supportsAllDrives", "fields"] {
        if let Some(v) = params.get(k) {
            loc.push('&');
            loc.push_str(&form_urlencoded::Serializer::new(String::new()).append_pair(k, v).finish());
        }
    }
    Response::builder()
        .status(200)
        .header("Location", loc)
        .header("X-GUploader-UploadID", upload_id)
        .header("Content-Length", "0")
        .body(full(Bytes::new()))
        .map_err(|_| Fail::Api(ApiError::backend(500)))
}

enum CR {
    /// `bytes */N` or `bytes */*`: a status query.
    Query(Option<u64>),
    /// `bytes a-b/N` or `bytes a-b/*`.
    Chunk(u64, u64, Option<u64>),
}

fn parse_content_range(s: &str) -> Option<CR> {
    let s = s.trim();
    // The guide writes the status query without the unit ("set the Content-Range to
    // */2000000"); chunks always carry it.
    let s = match s.strip_prefix("bytes") {
        Some(rest) => rest.trim_start(),
        None if s.starts_with("*/") => s,
        None => return None,
    };
    let (range, total) = s.split_once('/')?;
    let total = if total.trim() == "*" { None } else { Some(total.trim().parse::<u64>().ok()?) };
    if range.trim() == "*" {
        return Some(CR::Query(total));
    }
    let (a, b) = range.trim().split_once('-')?;
    let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
    // Bound the numbers so `b - a + 1` and `b + 1` cannot overflow (Drive caps files far lower).
    (b >= a && b < 1 << 62 && total.is_none_or(|t| t < 1 << 62)).then_some(CR::Chunk(a, b, total))
}

fn session_gone() -> ApiError {
    ApiError::new(404, "global", "notFound", "The upload session was not found or has expired; start a new one.")
}

/// "Resume incomplete": a 308 with the bytes held so far in `Range`, or,
/// for a client that sent `X-GUploader-No-308: yes` (Google's Go client
/// does, since its HTTP stack takes a 308 for a redirect), a 200 carrying
/// `X-HTTP-Status-Code-Override: 308`.
fn incomplete(received: u64, upload_id: &str, headers: &HeaderMap) -> Response<Body> {
    let no_308 =
        headers.get("x-guploader-no-308").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("yes"));
    let mut b = Response::builder()
        .status(if no_308 { 200 } else { 308 })
        .header("X-GUploader-UploadID", upload_id)
        .header("Content-Length", "0");
    if no_308 {
        b = b.header("X-HTTP-Status-Code-Override", "308");
    }
    if received > 0 {
        b = b.header("Range", format!("bytes=0-{}", received - 1));
    }
    b.body(full(Bytes::new())).unwrap_or_else(|_| empty(308))
}

/// What a PUT to a session URI turned out to be, decided before its body is read.
enum Step {
    Answer(Response<Body>),
    Finalize,
    Incomplete(u64),
    /// Read `n` bytes starting at `a`.
    Read {
        a: u64,
        n: u64,
    },
}

async fn session_request(
    sh: &Shared,
    method: &Method,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: In,
) -> R {
    let upload_id = params.get("upload_id").cloned().unwrap_or_default();
    let step = match session_step(sh, method, &upload_id, headers) {
        Ok(s) => s,
        Err(e) => {
            // Refused before reading: drain, so the client reads the answer, not a reset.
            drain(body).await;
            return Err(e.into());
        }
    };
    let (a, n) = match step {
        Step::Answer(r) => {
            drain(body).await;
            return Ok(r);
        }
        Step::Finalize => return finalize(sh, &upload_id),
        Step::Incomplete(received) => return Ok(incomplete(received, &upload_id, headers)),
        Step::Read { a, n } => (a, n),
    };
    let got = read_media(sh, body, Some(n), true).await;
    let (bytes, cut) = match got {
        Ok(v) => (v, false),
        Err(v) => (v, true),
    };
    let mut ss = sh.sessions.lock();
    let Some(s) = ss.get_mut(&upload_id) else { return Err(session_gone().into()) };
    let have = s.data.len() as u64;
    let mut end = (a + bytes.len() as u64).min(a + n);
    if !cut && bytes.len() as u64 != n {
        return Err(ApiError::bad_request("The body is shorter than its Content-Range.").into());
    }
    if cut {
        // A cut-off chunk keeps whole 256 KiB units only, so the client must ask for the
        // status and resume from the Range it gets back.
        end = (end / CHUNK_GRANULE) * CHUNK_GRANULE;
        s.interrupted = true;
    }
    // Keep only what is past what the session already holds (a resent overlap is fine).
    if end > have && have >= a {
        let from = (have - a) as usize;
        let to = (end - a) as usize;
        s.data.extend_from_slice(&bytes[from..to]);
        count_upload(sh, (to - from) as u64);
    }
    if cut {
        return Err(Fail::Reset);
    }
    let received = s.data.len() as u64;
    let complete = s.total == Some(received);
    drop(ss);
    if complete {
        return finalize(sh, &upload_id);
    }
    Ok(incomplete(received, &upload_id, headers))
}

/// Validates a session request against the session's state, without reading its body.
fn session_step(sh: &Shared, method: &Method, upload_id: &str, headers: &HeaderMap) -> Result<Step, ApiError> {
    let epoch = sh.faults.session_epoch.load(std::sync::atomic::Ordering::SeqCst);
    let mut ss = sh.sessions.lock();
    let alive = ss.get(upload_id).is_some_and(|s| s.epoch == epoch && s.created.elapsed() < SESSION_LIFETIME);
    if !alive {
        ss.remove(upload_id);
        sh.stats.request("upload resumable chunk");
        return Err(session_gone());
    }
    if *method == Method::DELETE {
        // Cancelling a session: Google answers 499 Client Closed Request.
        ss.remove(upload_id);
        sh.stats.request("upload resumable cancel");
        return Ok(Step::Answer(empty(499)));
    }
    let Some(s) = ss.get_mut(upload_id) else { return Err(session_gone()) };
    if let Some(done) = s.done.clone() {
        sh.stats.request("upload resumable query");
        return Ok(Step::Answer(json_resp(sh, 200, &done)));
    }
    let clen = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    let cr = match header(headers, "content-range") {
        Some(v) => {
            parse_content_range(v).ok_or_else(|| ApiError::bad_request(format!("Invalid Content-Range: {v}")))?
        }
        // No Content-Range: the whole content in one request (or an empty file).
        None => match clen.unwrap_or(0) {
            0 => CR::Query(Some(0)),
            n => CR::Chunk(0, n - 1, Some(n)),
        },
    };
    match cr {
        CR::Query(total) => {
            sh.stats.request("upload resumable query");
            if clen.unwrap_or(0) != 0 {
                return Err(ApiError::bad_request("A status query has an empty body."));
            }
            if let Some(t) = total {
                if s.total.is_some_and(|old| old != t) || (s.data.len() as u64) > t {
                    return Err(ApiError::bad_request("The total size does not match the upload session."));
                }
                s.total = Some(t);
            }
            s.interrupted = true;
            let received = s.data.len() as u64;
            if s.total == Some(received) {
                return Ok(Step::Finalize);
            }
            Ok(Step::Incomplete(received))
        }
        CR::Chunk(a, b, total) => {
            sh.stats.request("upload resumable chunk");
            let n = b - a + 1;
            if clen.is_some_and(|c| c != n) {
                return Err(ApiError::bad_request("Content-Length does not match Content-Range."));
            }
            let is_final = total.is_some_and(|t| b + 1 == t);
            if let Some(t) = total {
                if b >= t || s.total.is_some_and(|old| old != t) {
                    return Err(ApiError::bad_request("The Content-Range total does not match the upload."));
                }
            }
            if a > s.data.len() as u64 {
                return Err(ApiError::bad_request(format!(
                    "The chunk starts at byte {a} but only {} bytes have been received; query the upload status and resume from there.",
                    s.data.len()
                )));
            }
            if !is_final && n % CHUNK_GRANULE != 0 {
                return Err(ApiError::bad_request(format!(
                    "Invalid request. The number of bytes uploaded is required to be equal or greater than 262144, except for the final request (it's recommended to be the exact multiple of 262144). The received request contained {n} bytes, which does not meet this requirement."
                )));
            }
            check_upload_cap(sh, (b + 1).saturating_sub(s.data.len() as u64))?;
            if s.interrupted {
                s.interrupted = false;
                sh.stats.with(|st| st.uploads_resumed += 1);
            }
            if let Some(t) = total {
                s.total = Some(t);
            }
            Ok(Step::Read { a, n })
        }
    }
}

/// The last byte is in: create or update the file, remember the answer, reply 200.
fn finalize(sh: &Shared, upload_id: &str) -> R {
    let (update_of, meta, params, ctype, data, is_sa) = {
        let ss = sh.sessions.lock();
        let Some(s) = ss.get(upload_id) else { return Err(session_gone().into()) };
        (
            s.update_of.clone(),
            s.meta.clone(),
            s.params.clone(),
            s.content_type.clone(),
            Bytes::from(s.data.clone()),
            s.service_account,
        )
    };
    let res = match &update_of {
        None => sh.keep(data).and_then(|d| do_create(sh, &params, &meta, Some(d), ctype.as_deref(), is_sa)),
        Some(id) => do_update_content(sh, id, &params, &meta, data, is_sa),
    };
    let mut ss = sh.sessions.lock();
    match res {
        Ok(v) => {
            if let Some(s) = ss.get_mut(upload_id) {
                s.done = Some(v.clone());
                s.data = Vec::new();
            }
            drop(ss);
            sh.stats.with(|s| s.uploads_completed += 1);
            // "Upload file data": the final request answers 200 OK (or 201 Created) with the
            // resource; Drive sends 200 for both create and update.
            Ok(json_resp(sh, 200, &v))
        }
        Err(e) => {
            // The session cannot complete any more (409 id in use, quota, parent gone).
            ss.remove(upload_id);
            Err(e.into())
        }
    }
}

// ---------------------------------------------------------------- downloads

async fn download(
    sh: &Arc<Shared>,
    id: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    revision: Option<&str>,
) -> R {
    let all = revision.is_some() || flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    let (data, mime) = {
        let st = sh.store.lock();
        let f = st.get(id, all)?;
        if f.content.is_none() {
            return Err(ApiError::new(
                403,
                "global",
                "fileNotDownloadable",
                "Only files with binary content can be downloaded. Use Export with Docs Editors files.",
            )
            .at("parameter", "alt")
            .into());
        }
        if f.abusive && !flag(params, "acknowledgeAbuse") {
            return Err(ApiError::new(
                403,
                "global",
                "cannotDownloadAbusiveFile",
                "This file has been identified as malware or spam and cannot be downloaded.",
            )
            .into());
        }
        // Drive's answer when the owner turned downloading off for readers
        // (as clients see it; the documented signal is capabilities.canDownload).
        if !f.may_download() {
            return Err(ApiError::new(
                403,
                "global",
                "cannotDownloadFile",
                "This file cannot be downloaded by the user.",
            )
            .into());
        }
        if sh.faults.download_quota_exceeded() {
            return Err(ApiError::download_quota().into());
        }
        match revision {
            None => (f.content.as_ref().map(|c| c.data.clone()).unwrap_or_default(), f.mime_type.clone()),
            Some(rid) => {
                let r = find_revision(f, rid)?;
                (r.content.data.clone(), r.mime.clone())
            }
        }
    };
    let size = data.len() as u64;
    let (status, slice, crange) = match parse_range(header(headers, "range"), size) {
        RangeAsk::Whole => (200, data, None),
        RangeAsk::Part(a, b) => (206, data.slice(a as usize..=b as usize), Some(format!("bytes {a}-{b}/{size}"))),
        RangeAsk::Unsatisfiable => {
            return Err(ApiError::new(416, "global", "requestedRangeNotSatisfiable", "Request range not satisfiable")
                .header("Content-Range", format!("bytes */{size}"))
                .into());
        }
    };
    let len = slice.len();
    let cutoff =
        if len > 0 && roll(sh, sh.faults.reset_rate()) { Some(sh.rng.lock().random_range(0..len)) } else { None };
    let mut b = Response::builder()
        .status(status)
        .header("Content-Type", mime)
        .header("Content-Length", len.to_string())
        .header("Accept-Ranges", "bytes");
    if let Some(cr) = crange {
        b = b.header("Content-Range", cr);
    }
    // Stream in slices through the shared link; an injected reset ends the stream with an
    // error, which makes hyper drop the connection mid-body.
    const SLICE: usize = 64 * 1024;
    let bps = sh.faults.bandwidth();
    let sh_arc = sh.clone();
    let start = (0usize, slice, sh_arc, false, None);
    let stream = futures::stream::unfold(start, move |(pos, data, sh, ended, mut turn)| async move {
        if ended || pos >= data.len() {
            return None;
        }
        let limit = cutoff.unwrap_or(usize::MAX);
        if pos >= limit {
            sh.stats.with(|s| s.resets += 1);
            return Some((
                Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected reset")),
                (pos, data, sh, true, turn),
            ));
        }
        let end = (pos + SLICE).min(data.len()).min(limit.max(pos + 1));
        sh.link.pace(&mut turn, end - pos, bps).await;
        sh.stats.with(|s| s.bytes_out += (end - pos) as u64);
        let frame = Frame::data(data.slice(pos..end));
        Some((Ok(frame), (end, data, sh, false, turn)))
    });
    b.body(StreamBody::new(stream).boxed_unsync()).map_err(|_| Fail::Api(ApiError::backend(500)))
}

// ---------------------------------------------------------------- list, copy, ids, about

/// A count parameter (`count`, `pageSize`): 1 to 1000, `default` when absent.
fn count_param(params: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, Fail> {
    let Some(v) = params.get(name) else { return Ok(default) };
    match v.parse::<usize>() {
        Ok(n) if (1..=1000).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid_param_msg(
            name,
            format!("Invalid value for {name}: {v}. Values must be within the range: [1, 1000]"),
        )
        .into()),
    }
}

fn generate_ids(sh: &Shared, params: &HashMap<String, String>) -> R {
    let count = count_param(params, "count", 10)?;
    let space = params.get("space").map(String::as_str).unwrap_or("drive");
    if space != "drive" && space != "appDataFolder" {
        return Err(ApiError::invalid_param_msg("space", format!("Invalid value for space: {space}")).into());
    }
    let ty = params.get("type").map(String::as_str).unwrap_or("files");
    if ty != "files" && ty != "shortcuts" {
        return Err(ApiError::invalid_param_msg("type", format!("Invalid value for type: {ty}")).into());
    }
    let ids = sh.store.lock().generate_ids(count);
    let v = json!({ "kind": "drive#generatedIds", "space": space, "ids": ids });
    Ok(json_resp(sh, 200, &mask(&v, params.get("fields"), &|v: &Value| v.clone())?))
}

fn about(sh: &Shared, params: &HashMap<String, String>) -> R {
    if params.get("fields").is_none_or(|f| f.is_empty()) {
        return Err(ApiError::new(400, "global", "required", "The 'fields' parameter is required for this method.")
            .at("parameter", "fields")
            .into());
    }
    let st = sh.store.lock();
    let used = st.bytes_used();
    let trash: u64 = st.files.values().filter(|f| f.drive_id.is_none() && f.trashed).map(|f| f.size()).sum();
    let mut quota =
        json!({ "usage": used.to_string(), "usageInDrive": used.to_string(), "usageInDriveTrash": trash.to_string() });
    if let Some(q) = sh.faults.storage_quota() {
        quota["limit"] = json!(q.to_string());
    }
    let v = json!({
        "kind": "drive#about",
        "user": { "kind": "drive#user", "displayName": "Emulated User", "emailAddress": "user@driveemu.test", "me": true, "permissionId": "00000000000000000001" },
        "storageQuota": quota,
        "maxUploadSize": "5242880000000",
        "appInstalled": true,
        "canCreateDrives": true,
    });
    Ok(json_resp(sh, 200, &mask(&v, params.get("fields"), &|v: &Value| v.clone())?))
}

fn copy(sh: &Shared, id: &str, meta: &Value, params: &HashMap<String, String>, is_sa: bool) -> R {
    let all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    let (src_name, src_parents, src_mime, data, src_app, src_props, src_desc, folder) = {
        let st = sh.store.lock();
        let f = st.get(id, all)?;
        // A download restriction restricts copying too ("Whether download
        // and copy is restricted for readers").
        if !f.may_download() {
            return Err(
                ApiError::new(403, "global", "cannotCopyFile", "This file cannot be copied by the user.").into()
            );
        }
        (
            f.name.clone(),
            f.parents.clone(),
            f.mime_type.clone(),
            f.content.as_ref().map(|c| c.data.clone()),
            f.app_properties.clone(),
            f.properties.clone(),
            f.description.clone(),
            f.mime_type == FOLDER_MIME,
        )
    };
    if folder {
        return Err(ApiError::new(403, "global", "cannotCopyFile", "This file cannot be copied by the user.").into());
    }
    let mut m = meta.as_object().cloned().unwrap_or_default();
    // Unnamed copies are called "Copy of <name>" and land in the source's folder.
    m.entry("name").or_insert_with(|| json!(format!("Copy of {src_name}")));
    m.entry("parents").or_insert_with(|| json!(src_parents));
    m.entry("mimeType").or_insert_with(|| json!(src_mime));
    if let Some(d) = src_desc {
        m.entry("description").or_insert_with(|| json!(d));
    }
    let mut app: serde_json::Map<String, Value> = src_app.into_iter().map(|(k, v)| (k, json!(v))).collect();
    if let Some(Value::Object(o)) = m.get("appProperties") {
        app.extend(o.clone());
    }
    m.insert("appProperties".into(), Value::Object(app));
    let mut prp: serde_json::Map<String, Value> = src_props.into_iter().map(|(k, v)| (k, json!(v))).collect();
    if let Some(Value::Object(o)) = m.get("properties") {
        prp.extend(o.clone());
    }
    m.insert("properties".into(), Value::Object(prp));
    let len = data.as_ref().map_or(0, |d| d.len() as u64);
    // Server-side copies count toward the daily upload cap, as Google's help says.
    check_upload_cap(sh, len)?;
    let v = do_create(sh, params, &Value::Object(m), data, None, is_sa)?;
    count_upload(sh, len);
    Ok(json_resp(sh, 200, &v))
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn list(sh: &Shared, params: &HashMap<String, String>) -> R {
    let page_size = count_param(params, "pageSize", 100)?;
    let expr = match params.get("q").filter(|q| !q.trim().is_empty()) {
        Some(q) => Some(query::parse(q)?),
        None => None,
    };
    let include_all = flag(params, "includeItemsFromAllDrives") || flag(params, "includeTeamDriveItems");
    let supports_all = flag(params, "supportsAllDrives") || flag(params, "supportsTeamDrives");
    let drive_id = params.get("driveId").or_else(|| params.get("teamDriveId")).cloned();
    let corpora =
        params
            .get("corpora")
            .cloned()
            .unwrap_or_else(|| if drive_id.is_some() { "drive".into() } else { "user".into() });
    match corpora.as_str() {
        "user" | "domain" => {}
        "drive" => {
            if drive_id.is_none() {
                return Err(ApiError::invalid_param_msg(
                    "driveId",
                    "The driveId parameter must be specified if and only if corpora is set to drive.",
                )
                .into());
            }
        }
        "allDrives" => {}
        _ => return Err(ApiError::invalid_param("corpora").into()),
    }
    if (corpora == "drive" || corpora == "allDrives") && !(include_all && supports_all) {
        return Err(ApiError::new(
            403,
            "global",
            "teamDrivesParameterRequired",
            "The includeItemsFromAllDrives and supportsAllDrives parameters must be set to true to list shared drive items.",
        )
        .into());
    }
    // "Supported values are 'drive' and 'appDataFolder'"; nothing is kept in appDataFolder
    // here, so only a listing that includes 'drive' finds anything.
    let spaces = params.get("spaces").map(String::as_str).unwrap_or("drive");
    let mut in_drive = false;
    for sp in spaces.split(',').map(str::trim) {
        match sp {
            "drive" => in_drive = true,
            "appDataFolder" => {}
            _ => return Err(ApiError::invalid_param("spaces").into()),
        }
    }
    let order = parse_order(params.get("orderBy").map(String::as_str).unwrap_or(""))?;
    let token_key = fnv(&format!(
        "{}|{}|{}|{:?}|{}",
        params.get("q").map(String::as_str).unwrap_or(""),
        params.get("orderBy").map(String::as_str).unwrap_or(""),
        corpora,
        drive_id,
        spaces
    ));
    let offset = match params.get("pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => decode_page_token(t, token_key).ok_or_else(|| ApiError::invalid_param("pageToken"))?,
    };
    let st = sh.store.lock();
    if let Some(d) = &drive_id {
        if !st.drives.contains_key(d) {
            return Err(ApiError::new(404, "global", "notFound", format!("Shared drive not found: {d}"))
                .at("parameter", "driveId")
                .into());
        }
    }
    let now = Instant::now();
    let mut hits: Vec<&FileRec> = st
        .files
        .values()
        .filter(|f| in_drive && !f.is_root && f.listable_at <= now)
        .filter(|f| match corpora.as_str() {
            "drive" => f.drive_id == drive_id,
            "allDrives" => true,
            // The user corpus with includeItemsFromAllDrives also shows the items of the
            // shared drives the user is a member of (all of them, here).
            _ => f.drive_id.is_none() || include_all,
        })
        .filter(|f| expr.as_ref().is_none_or(|e| query::matches(e, f, &st.root_id)))
        .collect();
    hits.sort_by(|a, b| {
        for (key, desc) in &order {
            let o = match *key {
                // "Sorted alphabetically, i.e. 1, 12, 2, 22".
                "name" => a.name.cmp(&b.name),
                // "Sorted using natural sort ordering, i.e. 1, 2, 12, 22".
                "name_natural" => natural_cmp(&a.name, &b.name),
                // Creation order breaks ties of equal timestamps, in the requested direction.
                "createdTime" => (a.created_ms, a.seq).cmp(&(b.created_ms, b.seq)),
                "modifiedTime" => a.modified_ms.cmp(&b.modified_ms),
                "folder" => (b.mime_type == FOLDER_MIME).cmp(&(a.mime_type == FOLDER_MIME)),
                "quotaBytesUsed" => a.size().cmp(&b.size()),
                "starred" => b.starred.cmp(&a.starred),
                _ => std::cmp::Ordering::Equal,
            };
            let o = if *desc { o.reverse() } else { o };
            if o != std::cmp::Ordering::Equal {
                return o;
            }
        }
        a.seq.cmp(&b.seq)
    });
    let take = if sh.faults.short_pages() { sh.rng.lock().random_range(0..=page_size) } else { page_size };
    let want = want_in(params.get("fields"), Some("files"));
    let page: Vec<Value> = hits.iter().skip(offset).take(take).map(|f| f.to_json(&want)).collect();
    let mut v = json!({ "kind": "drive#fileList", "incompleteSearch": false, "files": page });
    if offset + take < hits.len() {
        v["nextPageToken"] = json!(encode_page_token(offset + take, token_key));
    }
    drop(st);
    let out = match params.get("fields").filter(|f| !f.trim().is_empty()) {
        None => Sel::parse("kind,incompleteSearch,nextPageToken,files(kind,id,name,mimeType)")
            .map(|s| s.apply(&v))
            .unwrap_or_default(),
        Some(spec) => {
            let sel = Sel::parse(spec)?;
            for n in sel.names() {
                if !["kind", "nextPageToken", "incompleteSearch", "files", "*"].contains(&n.as_str()) {
                    return Err(ApiError::invalid_param_msg("fields", format!("Invalid field selection {n}")).into());
                }
            }
            if let Some(fs) = sel.child("files") {
                check_file_fields(&fs, spec)?;
            }
            sel.apply(&v)
        }
    };
    Ok(json_resp(sh, 200, &out))
}

fn parse_order(s: &str) -> Result<Vec<(&'static str, bool)>, ApiError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut w = part.split_whitespace();
        let key = w.next().unwrap_or("");
        let desc = match w.next() {
            None => false,
            Some(d) if d.eq_ignore_ascii_case("desc") => true,
            Some(a) if a.eq_ignore_ascii_case("asc") => false,
            Some(_) => return Err(ApiError::invalid_param("orderBy")),
        };
        let k: &'static str = match key {
            "name" => "name",
            "name_natural" => "name_natural",
            "createdTime" => "createdTime",
            // No per-user view history here: these fall back to the modification time.
            "modifiedTime" | "recency" | "modifiedByMeTime" | "viewedByMeTime" | "sharedWithMeTime" => "modifiedTime",
            "folder" => "folder",
            "quotaBytesUsed" => "quotaBytesUsed",
            "starred" => "starred",
            _ => return Err(ApiError::invalid_param("orderBy")),
        };
        out.push((k, desc));
    }
    Ok(out)
}

/// Natural order: runs of digits compare by their numbers, the rest by characters.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        let (Some(ca), Some(cb)) = (a.chars().next(), b.chars().next()) else { return a.len().cmp(&b.len()) };
        if ca.is_ascii_digit() && cb.is_ascii_digit() {
            let na = a.len() - a.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let nb = b.len() - b.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let (da, db) = (a[..na].trim_start_matches('0'), b[..nb].trim_start_matches('0'));
            let o = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
            if o != std::cmp::Ordering::Equal {
                return o;
            }
            (a, b) = (&a[na..], &b[nb..]);
        } else {
            if ca != cb {
                return ca.cmp(&cb);
            }
            (a, b) = (&a[ca.len_utf8()..], &b[cb.len_utf8()..]);
        }
    }
}

fn encode_page_token(offset: usize, key: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{offset}:{key:x}"))
}

fn decode_page_token(t: &str, key: u64) -> Option<usize> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (o, k) = s.split_once(':')?;
    (u64::from_str_radix(k, 16).ok()? == key).then_some(())?;
    o.parse().ok()
}
