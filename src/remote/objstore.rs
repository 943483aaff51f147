//! The object-store backends — `s3://`, `gs://`, `az://` — through the
//! `object_store` crate (its request retries, credential chains and
//! conditional puts): a volume folder is a key prefix in a bucket.
//!
//! The commit fence is a create-if-absent (`PutMode::Create`: S3
//! `If-None-Match: *`, GCS `ifGenerationMatch=0`, Azure `If-None-Match: *`).
//! Not every S3 implementation honours it — Garage answers 200 and
//! overwrites — so before the first create this backend tests the store
//! (two creates of one scratch key) and, when the second one lands, refuses
//! every create with a message saying so: writable serving on such a store
//! is refused rather than risking two writers, while import (plain puts)
//! and read-only serving work. `DRIVEBLK_OBJSTORE_UNFENCED=1` is the
//! operator's promise that only one host ever writes a volume there; then a
//! create looks before it writes (catches a second writer that starts
//! later, not one racing in the same instant). See docs/object-stores.md.
//!
//! An object's ETag is its content revision: `attach` pins a base object
//! to it and base reads are GETs `If-Match` it, so a base replaced by a
//! new upload is never read into a disk made of the old one. Set-up
//! mistakes (a missing bucket, plain HTTP without `AWS_ALLOW_HTTP`, a
//! wrong region, a skewed clock, a full bucket) are named in the errors.
//!
//! The client is rebuilt (a new connection pool, a new credential cache)
//! when a request gets no answer in time or the store refuses the
//! credentials: `object_store` dates its cached tokens by a monotonic clock
//! that stops while a laptop sleeps, so after a resume it may keep sending
//! credentials that expired meanwhile, and its pooled connections may be
//! dead. A refused request is sent once more on the new client before the
//! refusal counts.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::client::{
    ClientConfigKey, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody,
    HttpService,
};
use object_store::path::Path as OsPath;
use object_store::{ClientOptions, MultipartUpload, ObjectStore, PutMode, PutOptions, PutPayload, UploadPart};

use super::bwlimit::BwLimit;
use super::config::ObjStoreConfig;
use super::retry::MIN_UPLOAD_RATE;
use super::sent::SentBytes;
use super::{content_tag, ObjectMeta, PutBody, Remote, RemoteError, RemoteResult, Slot};

/// Which cloud's API a URL speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// Amazon S3 and S3-compatible stores (Garage, MinIO, R2, Ceph RGW).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

impl StoreKind {
    /// The URL scheme, with `://`.
    pub fn scheme(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3://",
            StoreKind::Gcs => "gs://",
            StoreKind::Azure => "az://",
        }
    }

    /// The kind of a URL's scheme prefix, and the rest of the URL.
    pub fn strip(url: &str) -> Option<(Self, &str)> {
        [StoreKind::S3, StoreKind::Gcs, StoreKind::Azure]
            .into_iter()
            .find_map(|k| url.strip_prefix(k.scheme()).map(|rest| (k, rest)))
    }
}

/// What a store did when a key was created twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The second create was refused: create-if-absent holds.
    Holds,
    /// The second create landed (the condition is ignored) or the store
    /// does not implement conditional puts.
    Ignored,
}

/// Scratch keys start with the lease's clock-probe prefix, so GC and
/// listings treat a left-over one as scratch.
const FENCE_PROBE_PREFIX: &str = "clock-probe-fence-";

/// A client, or why none could be configured.
type Client = Result<Arc<dyn ObjectStore>, String>;

/// One bucket (container) and a key prefix in it.
pub struct ObjStoreRemote {
    /// The client in use; replaced by a fresh one (see the module doc).
    store: arc_swap::ArcSwap<Client>,
    /// Whether the client was made from the environment, and so can be
    /// made again (a client handed to [`with_store`](Self::with_store) cannot).
    rebuildable: bool,
    kind: StoreKind,
    bucket: String,
    /// Key prefix without leading or trailing `/` (may be empty).
    root: String,
    cfg: ObjStoreConfig,
    fence: tokio::sync::OnceCell<Fence>,
    warned_unfenced: AtomicBool,
    /// A listing showed the bucket exists ([`check_bucket`](Self::check_bucket)).
    bucket_seen: AtomicBool,
}

impl std::fmt::Debug for ObjStoreRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjStoreRemote").field("url", &self.name()).finish()
    }
}

/// The deadline of one HTTP request moving `bytes` of body: the small
/// request's deadline plus the body at [`MIN_UPLOAD_RATE`], the slowest
/// link write-back supports. One total for the client would either fail
/// every 8 MiB part below about 1 Mbit/s per part (a home uplink shared by
/// parts in flight, `--bwlimit`) or wait many minutes on a stalled small
/// read.
fn request_deadline(cfg: &ObjStoreConfig, bytes: u64) -> std::time::Duration {
    cfg.request_timeout + std::time::Duration::from_secs(bytes / MIN_UPLOAD_RATE)
}

/// The largest object S3 stores (5 TiB): the part size of an upload this
/// large is the largest [`part_size`] ever picks.
const MAX_OBJECT: u64 = 5 << 40;

/// The part size of a multipart upload of `len` bytes: the configured one,
/// or larger (in whole MiB) when the body would need more than
/// `max_parts` parts — S3 refuses part 10,001, so a 100 GB base copied in
/// 8 MiB parts would fail after 80 GB were sent.
fn part_size(cfg: &ObjStoreConfig, len: Option<u64>) -> u64 {
    let fit = len.map_or(0, |n| n.div_ceil(cfg.max_parts.max(1)).next_multiple_of(1 << 20));
    cfg.part_size.max(fit).max(1)
}

/// A request that got no answer within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {secs:.1} s ({bytes} bytes of body)")]
struct NoAnswer {
    secs: f64,
    bytes: u64,
}

/// `fut`, failed as an outage (retried above) when it takes longer than
/// [`request_deadline`] for `bytes`, counted past the `--bwlimit` turns
/// its requests were given (waiting for the link and spreading the body
/// over its slot is no outage).
async fn within<T>(
    cfg: &ObjStoreConfig,
    bytes: u64,
    fut: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    let limit = request_deadline(cfg, bytes);
    match super::bwlimit::past_pacing(limit, fut).await {
        Some(r) => r,
        None => Err(object_store::Error::Generic {
            store: "driveblk",
            source: Box::new(NoAnswer { secs: limit.as_secs_f64(), bytes }),
        }),
    }
}

/// Whether `e` is a request that timed out: ours ([`within`]) or the
/// client's own deadline.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<NoAnswer>() {
            return true;
        }
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            if h.kind() == object_store::client::HttpErrorKind::Timeout {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Builds the client for `bucket`; credentials and endpoint come from the
/// environment (each cloud's usual variables and chains: `AWS_*`,
/// `GOOGLE_*`, `AZURE_*`, instance metadata).
pub fn build_store(kind: StoreKind, bucket: &str, cfg: &ObjStoreConfig) -> object_store::Result<Arc<dyn ObjectStore>> {
    use object_store::client::ClientConfigKey as K;
    use object_store::{BackoffConfig, RetryConfig};
    // Deadlines go in as config keys, over what the environment set (a
    // whole ClientOptions would drop e.g. AWS_ALLOW_HTTP).
    // Each request gets its own deadline by its size (`request_deadline`,
    // through `within`); the client's own total timeout is only a backstop
    // for the largest, a part of the largest object.
    let largest = part_size(cfg, Some(MAX_OBJECT)).max(cfg.read_part_size).max(cfg.multipart_threshold);
    let timeouts = [
        (K::Timeout, format!("{}ms", request_deadline(cfg, largest).as_millis())),
        (K::ConnectTimeout, format!("{}ms", cfg.connect_timeout.as_millis())),
    ];
    // object_store retries each request a little; the volume's retry
    // wrapper sits above and decides when to give up for good.
    let retry = RetryConfig { backoff: BackoffConfig::default(), max_retries: 3, retry_timeout: cfg.request_timeout };
    // Requests go through a client that counts bodies as they go (and
    // paces them under `--bwlimit`).
    let connector = || BodyConnector(cfg.bwlimit.clone(), cfg.sent.clone());
    Ok(match kind {
        StoreKind::S3 => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).with_retry(retry);
            for (k, v) in &timeouts {
                b = b.with_config(object_store::aws::AmazonS3ConfigKey::Client(*k), v);
            }
            b = b.with_http_connector(connector());
            plain_http_allowed(&b)?;
            Arc::new(b.build()?)
        }
        StoreKind::Gcs => {
            let mut b =
                object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket).with_retry(retry);
            for (k, v) in &timeouts {
                b = b.with_config(object_store::gcp::GoogleConfigKey::Client(*k), v);
            }
            b = b.with_http_connector(connector());
            Arc::new(b.build()?)
        }
        StoreKind::Azure => {
            let mut b =
                object_store::azure::MicrosoftAzureBuilder::from_env().with_container_name(bucket).with_retry(retry);
            for (k, v) in &timeouts {
                b = b.with_config(object_store::azure::AzureConfigKey::Client(*k), v);
            }
            b = b.with_http_connector(connector());
            Arc::new(b.build()?)
        }
    })
}

/// Warns (once per file) when the service-account key file the GCS
/// client reads is open to other users, as for a Drive credentials file.
fn warn_exposed_gcs_key() {
    for var in ["GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_APPLICATION_CREDENTIALS"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            super::private::warn_if_exposed(
                std::path::Path::new(&p),
                &format!("GCS credentials file ({var})"),
                "use the service account",
            );
        }
    }
}

/// Refuses a plain `http://` endpoint without `AWS_ALLOW_HTTP=true` up
/// front: the client would refuse every request with only "builder
/// error", retried as if the store were down.
fn plain_http_allowed(b: &object_store::aws::AmazonS3Builder) -> object_store::Result<()> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let endpoint = b.get_config_value(&K::Endpoint).unwrap_or_default();
    let allowed = b.get_config_value(&K::Client(ClientConfigKey::AllowHttp)).is_some_and(|v| truthy(&v));
    if endpoint.to_ascii_lowercase().starts_with("http://") && !allowed {
        return Err(object_store::Error::Generic {
            store: "S3",
            source: format!(
                "the endpoint {endpoint} (AWS_ENDPOINT) is plain HTTP, which the client refuses unless \
                 AWS_ALLOW_HTTP=true is set: set it, or give an https:// endpoint"
            )
            .into(),
        });
    }
    Ok(())
}

/// A flag's value as object_store reads one.
fn truthy(v: &str) -> bool {
    matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y")
}

/// The client of object stores: object_store hands its client whole
/// bodies (`Bytes` or a `PutPayload`, never a stream), so its requests go
/// through this connector's client, which sends each body in pieces,
/// counted as the connection takes them ([`Remote::bytes_sent`]) and,
/// under `--bwlimit`, paced on the upload clock every transfer of the
/// process shares. Its reqwest client gets the options object_store would
/// give its own (deadlines, proxy, HTTP/1, plain HTTP allowed or not);
/// each request's deadline adds its body's pacing time.
#[derive(Debug)]
struct BodyConnector(BwLimit, SentBytes);

impl HttpConnector for BodyConnector {
    fn connect(&self, o: &ClientOptions) -> object_store::Result<HttpClient> {
        let bad = |e: String| object_store::Error::Generic { store: "driveblk", source: e.into() };
        let timeout = o.get_config_value(&ClientConfigKey::Timeout).map(|v| duration(&v)).transpose().map_err(bad)?;
        let client = client_like(o).map_err(bad)?;
        Ok(HttpClient::new(BodyService { client, limit: self.0.clone(), sent: self.1.clone(), timeout }))
    }
}

/// A duration as object_store writes them (`30s`, `60000ms`).
fn duration(v: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("bad duration {v:?}: {e}"))
}

/// A reqwest client with the settings `o` would give object_store's own
/// (all but its address shuffling and compression, which driveblk's
/// reqwest is built without). The total deadline is set per request.
fn client_like(o: &ClientOptions) -> Result<reqwest::Client, String> {
    use ClientConfigKey as K;
    let get = |k: K| o.get_config_value(&k);
    let flag = |k: K| get(k).is_some_and(|v| truthy(&v));
    let e = |e: reqwest::Error| e.to_string();
    let ua = get(K::UserAgent).unwrap_or_else(|| concat!("driveblk/", env!("CARGO_PKG_VERSION")).to_string());
    let mut b = reqwest::ClientBuilder::new().user_agent(ua);
    if let Some(p) = get(K::ProxyUrl) {
        let mut proxy = reqwest::Proxy::all(&p).map_err(e)?;
        if let Some(ca) = get(K::ProxyCaCertificate) {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).map_err(e)?);
        }
        if let Some(x) = get(K::ProxyExcludes) {
            proxy = proxy.no_proxy(reqwest::NoProxy::from_string(&x));
        }
        b = b.proxy(proxy);
    }
    if let Some(t) = get(K::ConnectTimeout) {
        b = b.connect_timeout(duration(&t)?);
    }
    if let Some(t) = get(K::PoolIdleTimeout) {
        b = b.pool_idle_timeout(duration(&t)?);
    }
    if let Some(n) = get(K::PoolMaxIdlePerHost) {
        b = b.pool_max_idle_per_host(n.parse().map_err(|_| format!("bad pool size {n:?}"))?);
    }
    // object_store's default: HTTP/1 only (HTTP/2 is slower on stores).
    if get(K::Http2Only).is_some_and(|_| flag(K::Http2Only)) {
        b = b.http2_prior_knowledge();
    } else if get(K::Http1Only).is_none() || flag(K::Http1Only) {
        b = b.http1_only();
    }
    if flag(K::AllowInvalidCertificates) {
        b = b.danger_accept_invalid_certs(true);
    }
    b.https_only(!flag(K::AllowHttp)).build().map_err(e)
}

/// The client that counts, and paces, bodies (see [`BodyConnector`]).
#[derive(Debug)]
struct BodyService {
    client: reqwest::Client,
    limit: BwLimit,
    sent: SentBytes,
    /// The client's deadline of one request, before pacing.
    timeout: Option<std::time::Duration>,
}

#[async_trait]
impl HttpService for BodyService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        use http_body_util::BodyExt;
        let (mut parts, body) = req.into_parts();
        let len = body.content_length() as u64;
        let url = reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        // Waits for the body's turn (a retry by object_store is paced again).
        let turn = if len > 0 { Some(self.limit.upload(len).await) } else { None };
        let body = match (&turn, body.as_bytes()) {
            (None, _) => reqwest::Body::from(body.as_bytes().cloned().unwrap_or_default()),
            (Some(t), Some(b)) => self.sent.body(t, b.clone()),
            (Some(t), None) => reqwest::Body::wrap_stream(self.sent.count(t.pace(body.into_data_stream()))),
        };
        if len > 0 {
            // A stream has no length of its own: S3 refuses chunked bodies.
            parts.headers.entry(http::header::CONTENT_LENGTH).or_insert(len.into());
        }
        let mut r = reqwest::Request::new(parts.method, url);
        *r.headers_mut() = parts.headers;
        *r.body_mut() = Some(body);
        *r.timeout_mut() = self.timeout.map(|t| t + turn.as_ref().map_or(std::time::Duration::ZERO, |t| t.duration()));
        let res = self.client.execute(r).await.map_err(http_error)?;
        drop(turn);
        let (parts, body) = http::Response::<reqwest::Body>::from(res).into_parts();
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body.map_err(http_error))))
    }
}

/// A failed request as object_store's kinds, which decide its retries:
/// time-outs, refused connections and dropped ones are retried.
fn http_error(e: reqwest::Error) -> HttpError {
    let dropped = {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        let mut found = false;
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                found |=
                    matches!(io.kind(), K::ConnectionAborted | K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof);
            }
            cur = err.source();
        }
        found
    };
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else if dropped {
        HttpErrorKind::Interrupted
    } else if e.is_request() || e.is_body() {
        HttpErrorKind::Request
    } else {
        HttpErrorKind::Unknown
    };
    HttpError::new(kind, e)
}

/// A multipart upload neither completed nor aborted yet: dropped (its
/// put given up at a deadline), it is aborted in the background.
struct OpenUpload(Option<Box<dyn MultipartUpload>>);

impl Drop for OpenUpload {
    fn drop(&mut self) {
        if let (Some(mut u), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = u.abort().await;
            });
        }
    }
}

/// The HTTP status a store answered, when the error says (object_store
/// names no public type for it: its request errors read "...status code:
/// 400 Bad Request...").
fn http_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some(at) = text.find("status code: ") {
            let digits: String = text[at + 13..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(s) = digits.parse() {
                return Some(s);
            }
        }
        cur = err.source();
    }
    None
}

/// `e`'s text and the causes it leaves out: object_store's ends at "error
/// sending request" or "builder error", while the refused connection,
/// the TLS or DNS failure is further down the chain.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out = format!("{out}: {t}");
        }
        cur = c.source();
    }
    out
}

/// Whether the store said the bucket (Azure: container) itself is missing.
/// S3 answers 404 for an absent key and an absent bucket alike; only the
/// error code in the body tells them apart.
fn bucket_missing(e: &(dyn std::error::Error + 'static)) -> bool {
    let t = with_causes(e);
    t.contains("NoSuchBucket") || t.contains("ContainerNotFound")
}

/// Whether a refusal is the store being full: a bucket quota (Garage and
/// Ceph answer 403 naming it) or no space left (507, MinIO).
fn store_full(e: &(dyn std::error::Error + 'static)) -> bool {
    match http_status(e) {
        Some(507) => true,
        Some(403) => with_causes(e).to_ascii_lowercase().contains("quota"),
        _ => false,
    }
}

/// Whether the store refused the request's date: S3 signs the time, and
/// refuses one too far from its own (`RequestTimeTooSkewed`; Garage:
/// "Date is too old"), which says nothing about the credentials.
fn clock_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let t = with_causes(e);
    t.contains("RequestTimeTooSkewed") || t.contains("Date is too old")
}

/// Answers worth asking again: timeouts, throttling, server errors (but
/// not "not implemented").
fn retried_status(s: u16) -> bool {
    matches!(s, 408 | 429) || (s >= 500 && s != 501 && s != 507)
}

impl ObjStoreRemote {
    /// A remote rooted at `root` (a key prefix, `a/b/vol`) in `bucket`. A
    /// client that cannot be configured (no region, no credentials) makes
    /// a remote whose every request fails with the reason.
    pub fn new(kind: StoreKind, bucket: &str, root: &str, cfg: &ObjStoreConfig) -> Self {
        if kind == StoreKind::Gcs {
            warn_exposed_gcs_key();
        }
        let store = build_store(kind, bucket, cfg).map_err(|e| e.to_string());
        Self { rebuildable: true, ..Self::with_store(store, kind, bucket, root, cfg) }
    }

    /// A remote over an already built client (never rebuilt).
    pub fn with_store(store: Client, kind: StoreKind, bucket: &str, root: &str, cfg: &ObjStoreConfig) -> Self {
        Self {
            store: arc_swap::ArcSwap::from_pointee(store),
            rebuildable: false,
            kind,
            bucket: bucket.to_string(),
            root: root.trim_matches('/').to_string(),
            cfg: cfg.clone(),
            fence: tokio::sync::OnceCell::new(),
            warned_unfenced: AtomicBool::new(false),
            bucket_seen: AtomicBool::new(false),
        }
    }

    fn name(&self) -> String {
        if self.root.is_empty() {
            format!("{}{}", self.kind.scheme(), self.bucket)
        } else {
            format!("{}{}/{}", self.kind.scheme(), self.bucket, self.root)
        }
    }

    fn store(&self, op: &'static str, key: &str) -> RemoteResult<Arc<dyn ObjectStore>> {
        match &**self.store.load() {
            Ok(s) => Ok(s.clone()),
            Err(e) => Err(RemoteError::Fatal {
                remote: self.name(),
                op,
                key: key.to_string(),
                message: format!("cannot configure the client: {e}"),
            }),
        }
    }

    /// Replaces the client `seen` with a fresh one from the environment (a
    /// new connection pool, a new credential cache), unless another failure
    /// replaced it already. True when the client in use is now newer than
    /// `seen`.
    fn rebuild(&self, seen: &Arc<Client>, why: &str) -> bool {
        if !self.rebuildable {
            return false;
        }
        if !Arc::ptr_eq(&self.store.load(), seen) {
            return true;
        }
        let fresh = match build_store(self.kind, &self.bucket, &self.cfg) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(remote = %self.name(), "cannot make a fresh client ({why}); keeping the old one: {e}");
                return false;
            }
        };
        self.store.compare_and_swap(seen, Arc::new(Ok(fresh)));
        tracing::info!(remote = %self.name(), "made a fresh client: {why}");
        true
    }

    /// Runs one operation `f`. A time-out replaces the client (its pooled
    /// connections may all be dead after a resume or a network change);
    /// a credentials refusal replaces it and sends `f` once more, since
    /// the old client's cached token may be one it wrongly believes valid.
    async fn fresh_on_failure<T, Fut>(&self, op: &'static str, key: &str, f: impl Fn() -> Fut) -> RemoteResult<T>
    where
        Fut: std::future::Future<Output = RemoteResult<T>>,
    {
        let seen = self.store.load_full();
        let r = f().await;
        let (refused, silent) = match r.as_ref().map_err(RemoteError::root) {
            Err(RemoteError::Auth { .. }) => (true, false),
            Err(RemoteError::Io { source, .. }) => (false, source.kind() == std::io::ErrorKind::TimedOut),
            _ => (false, false),
        };
        if refused && self.rebuild(&seen, &format!("the store refused the credentials ({op} {key:?})")) {
            return f().await;
        }
        if silent {
            self.rebuild(&seen, &format!("{op} {key:?} got no answer in time"));
        }
        r
    }

    /// The object path of `key`, refusing keys that could leave the folder.
    fn path(&self, op: &'static str, key: &str) -> RemoteResult<OsPath> {
        let bad = key.is_empty() || key.contains('/') || key.starts_with('.');
        if bad {
            return Err(RemoteError::Fatal {
                remote: self.name(),
                op,
                key: key.to_string(),
                message: "invalid object key (empty, contains '/', or starts with '.')".into(),
            });
        }
        let full = if self.root.is_empty() { key.to_string() } else { format!("{}/{key}", self.root) };
        OsPath::parse(&full).map_err(|e| RemoteError::Fatal {
            remote: self.name(),
            op,
            key: key.to_string(),
            message: format!("invalid object path: {e}"),
        })
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> RemoteError {
        use object_store::Error as E;
        let (remote, key) = (self.name(), key.to_string());
        if timed_out(&e) {
            let source = std::io::Error::new(std::io::ErrorKind::TimedOut, with_causes(&e));
            return RemoteError::Io { remote, op, key, source };
        }
        if bucket_missing(&e) {
            return RemoteError::Fatal { remote, op, key, message: self.no_bucket() };
        }
        if store_full(&e) {
            return RemoteError::Quota { remote, op, key, message: with_causes(&e) };
        }
        if clock_refused(&e) {
            let message = format!(
                "{}: this host's clock differs from the store's by more than it accepts (S3: 15 minutes); \
                 set it right (NTP), then try again",
                with_causes(&e)
            );
            return RemoteError::Fatal { remote, op, key, message };
        }
        let message = with_causes(&e);
        match e {
            E::NotFound { .. } => RemoteError::NotFound { remote, key },
            E::AlreadyExists { .. } => RemoteError::AlreadyExists { remote, key, tag: None },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                RemoteError::Auth { remote, op, key, message: self.refusal_hint(message) }
            }
            // A request the store refused as such (400 bad argument or
            // expired token, 405, 411, 413, 501 not implemented): asking
            // again gets the same answer.
            E::Generic { .. } if matches!(http_status(&e), Some(401 | 403)) => {
                RemoteError::Auth { remote, op, key, message: self.refusal_hint(message) }
            }
            E::Generic { .. }
                if http_status(&e) == Some(400) && self.kind == StoreKind::S3 && !message.contains("<Code>") =>
            {
                // A HEAD's answer has no body to say why.
                let message = format!(
                    "{message} (the store gave no reason; a 400 without one is most often a signing region, \
                     AWS_REGION, other than the store's)"
                );
                RemoteError::Fatal { remote, op, key, message }
            }
            E::Generic { .. } if http_status(&e).is_some_and(|s| (400..600).contains(&s) && !retried_status(s)) => {
                RemoteError::Fatal { remote, op, key, message }
            }
            E::Generic { .. } | E::JoinError { .. } => {
                // Network failures and 5xx answers object_store gave up on.
                RemoteError::Transient { remote, op, key, message, retry_after: None }
            }
            _ => RemoteError::Fatal { remote, op, key, message },
        }
    }

    /// A refusal without the store's reason (a HEAD's answer has no body)
    /// gets the usual ones named.
    fn refusal_hint(&self, message: String) -> String {
        if self.kind != StoreKind::S3 || message.contains("<Code>") {
            return message;
        }
        format!(
            "{message} (the store gave no reason: a key id or secret that is wrong, a permission the key lacks \
             on this bucket, or this host's clock off by more than 15 minutes)"
        )
    }

    /// The error of a store that says the bucket does not exist.
    fn no_bucket(&self) -> String {
        let (what, vars) = match self.kind {
            StoreKind::S3 => ("bucket", " and the endpoint, AWS_ENDPOINT"),
            StoreKind::Gcs => ("bucket", ""),
            StoreKind::Azure => ("container", " and the account, AZURE_STORAGE_ACCOUNT_NAME"),
        };
        format!(
            "the store has no {what} {:?}: check the {what} name in the URL{vars}, or create the {what}",
            self.bucket
        )
    }

    /// A HEAD answered 404: is it the key or the whole bucket? The answer
    /// has no body to say, so the first such answer on this remote lists
    /// one page of its prefix to tell (a missing bucket would otherwise
    /// read as "no volume here: import one"). A listing that fails for
    /// another reason (no list permission, an outage) leaves the 404 as is.
    async fn check_bucket(&self, store: &Arc<dyn ObjectStore>, op: &'static str, key: &str) -> RemoteResult<()> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let root = if self.root.is_empty() { None } else { Some(OsPath::from(self.root.as_str())) };
        let mut listing = store.list(root.as_ref());
        match within(&self.cfg, 0, async { listing.next().await.transpose() }).await {
            Ok(_) => self.bucket_seen.store(true, Ordering::Relaxed),
            Err(e) if bucket_missing(&e) => return Err(self.err(op, key, e)),
            Err(_) => {}
        }
        Ok(())
    }

    fn meta(&self, key: &str, m: &object_store::ObjectMeta) -> ObjectMeta {
        let ms = u64::try_from(m.last_modified.timestamp_millis()).ok();
        ObjectMeta {
            version: m.e_tag.clone().or_else(|| m.version.clone()),
            // The content revision `attach` pins a base to: a new upload
            // to the key gets a new ETag (see `get_range_revision`).
            revision: m.e_tag.clone(),
            // Objects are never modified in place: the store's
            // last-modified time is the creation time, by its clock.
            created_ms: ms,
            modified_ms: ms,
            ..ObjectMeta::new(key, m.size)
        }
    }

    /// Whether this store refuses a second create of one key: tested once
    /// per remote on a scratch key, never assumed from the store's name.
    pub async fn fence(&self) -> RemoteResult<Fence> {
        self.fence.get_or_try_init(|| self.probe_fence()).await.copied()
    }

    async fn probe_fence(&self) -> RemoteResult<Fence> {
        let key = format!("{FENCE_PROBE_PREFIX}{:016x}", rand::random::<u64>());
        let path = self.path("fence probe", &key)?;
        let store = self.store("fence probe", &key)?;
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let first =
            within(&self.cfg, 0, store.put_opts(&path, PutPayload::from_static(b"first"), create.clone())).await;
        let res = match first {
            Err(object_store::Error::NotImplemented | object_store::Error::NotSupported { .. }) => Ok(Fence::Ignored),
            // A store that does not implement the condition (S3 before
            // August 2024: "A header you provided implies functionality
            // that is not implemented").
            Err(e) if http_status(&e) == Some(501) => Ok(Fence::Ignored),
            Err(e) => Err(self.err("fence probe", &key, e)),
            Ok(_) => {
                match within(&self.cfg, 0, store.put_opts(&path, PutPayload::from_static(b"second"), create)).await {
                    Ok(_) => Ok(Fence::Ignored),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(Fence::Holds),
                    Err(e) => Err(self.err("fence probe", &key, e)),
                }
            }
        };
        let _ = within(&self.cfg, 0, store.delete(&path)).await;
        if let Ok(f) = &res {
            tracing::info!(remote = %self.name(), fence = ?f, "tested the store's create-if-absent");
        }
        res
    }

    /// The answer to a create the store refused because `key` exists:
    /// [`RemoteError::AlreadyExists`] with the existing object's tag (the
    /// sha256 of its content, as `dir:` does; manifests are small, so
    /// reading one back is cheap). Never without the tag: a create whose
    /// first attempt landed must be recognised as the caller's own, so a
    /// failed read-back is that read's error (retried, and the create with
    /// it), and an object that cannot be read yet — S3 answers 409 while
    /// a conditional write to the key is still in progress — is transient.
    async fn refused_create(&self, key: &str) -> RemoteError {
        match self.get(key).await {
            Ok(b) => {
                RemoteError::AlreadyExists { remote: self.name(), key: key.to_string(), tag: Some(content_tag(&b)) }
            }
            Err(e) if e.is_not_found() => RemoteError::Transient {
                remote: self.name(),
                op: "create",
                key: key.to_string(),
                message: "the store refused the create as if the object existed (or a conditional write to it \
                          was in progress), but it cannot be read yet"
                    .into(),
                retry_after: None,
            },
            Err(e) => e,
        }
    }

    /// Uploads a large or unsized body as a multipart upload: parts go up
    /// in parallel and the object appears only at completion. An upload
    /// that fails is aborted before the error is returned, and one given up
    /// (its future dropped at a deadline) is aborted in the background, so
    /// no parts are left in the bucket, billed and invisible.
    async fn put_multipart(
        &self,
        store: &Arc<dyn ObjectStore>,
        path: &OsPath,
        key: &str,
        body: &PutBody,
    ) -> RemoteResult<()> {
        let upload = store.put_multipart(path).await.map_err(|e| self.err("put", key, e))?;
        let mut open = OpenUpload(Some(upload));
        let sent = self.send_parts(open.0.as_mut().expect("open"), key, body).await;
        // The guard holds the upload until it is completed or aborted
        // here, so one given up meanwhile is still aborted (an abort after
        // a completion that landed is refused by the store, harmlessly).
        let done = match sent {
            Ok(()) => open.0.as_mut().expect("open").complete().await.map(|_| ()).map_err(|e| self.err("put", key, e)),
            Err(e) => Err(e),
        };
        if done.is_err() {
            if let Err(e) = open.0.as_mut().expect("open").abort().await {
                tracing::warn!(remote = %self.name(), key, "a failed multipart upload could not be aborted; its parts stay in the bucket until a lifecycle rule removes them: {e}");
            }
        }
        open.0 = None;
        done
    }

    /// Cuts `body` into parts of [`part_size`] and sends them, at most
    /// `parallel_parts` at once.
    async fn send_parts(&self, upload: &mut Box<dyn MultipartUpload>, key: &str, body: &PutBody) -> RemoteResult<()> {
        let part = part_size(&self.cfg, body.len()) as usize;
        let mut in_flight = FuturesUnordered::new();
        let mut buf: Vec<u8> = Vec::with_capacity(part);
        let mut parts = 0usize;
        let mut s = body.stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|e| RemoteError::Io {
                remote: self.name(),
                op: "put",
                key: key.to_string(),
                source: e,
            })?;
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let take = rest.len().min(part - buf.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == part {
                    let full = std::mem::replace(&mut buf, Vec::with_capacity(part));
                    self.send_part(upload, &mut in_flight, full, key).await?;
                    parts += 1;
                }
            }
        }
        // The remainder; an upload needs at least one part, even empty.
        if !buf.is_empty() || parts == 0 {
            self.send_part(upload, &mut in_flight, buf, key).await?;
        }
        while let Some(r) = in_flight.next().await {
            r.map_err(|e| self.err("put", key, e))?;
        }
        Ok(())
    }

    /// Starts one part once fewer than `parallel_parts` are in flight.
    async fn send_part(
        &self,
        upload: &mut Box<dyn MultipartUpload>,
        in_flight: &mut FuturesUnordered<UploadPart>,
        data: Vec<u8>,
        key: &str,
    ) -> RemoteResult<()> {
        while in_flight.len() >= self.cfg.parallel_parts.max(1) {
            if let Some(r) = in_flight.next().await {
                r.map_err(|e| self.err("put", key, e))?;
            }
        }
        let (cfg, len) = (self.cfg.clone(), data.len() as u64);
        let part = upload.put_part(PutPayload::from(data));
        in_flight.push(Box::pin(async move { within(&cfg, len, part).await }));
        Ok(())
    }

    /// One ranged GET; a range starting at or past the end is empty.
    async fn get_one(
        &self,
        store: &Arc<dyn ObjectStore>,
        path: &OsPath,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> RemoteResult<Bytes> {
        let opts = object_store::GetOptions {
            range: Some(range.clone().into()),
            if_match: if_match.map(str::to_string),
            ..Default::default()
        };
        let got = async { store.get_opts(path, opts).await?.bytes().await };
        match within(&self.cfg, range.end - range.start, got).await {
            Ok(b) => Ok(b),
            Err(e @ object_store::Error::NotFound { .. }) => Err(self.err("get_range", key, e)),
            Err(object_store::Error::Precondition { .. }) => Err(RemoteError::NotFound {
                remote: self.name(),
                key: format!(
                    "{key} revision {} (the object was replaced since; S3 keeps no old content)",
                    if_match.unwrap_or("?")
                ),
            }),
            // No answer: asking again on this client waits on the same
            // dead connections.
            Err(e) if timed_out(&e) => Err(self.err("get_range", key, e)),
            Err(e) => {
                // S3 answers 416 to a range starting past the end (also
                // for an empty object): say "empty" when that is why.
                match within(&self.cfg, 0, store.head(path)).await {
                    Ok(m) if range.start >= m.size => Ok(Bytes::new()),
                    _ => Err(self.err("get_range", key, e)),
                }
            }
        }
    }
}

/// The operations, each sent once on the client in use (the [`Remote`]
/// methods wrap them in [`ObjStoreRemote::fresh_on_failure`]).
impl ObjStoreRemote {
    /// Ranges longer than a part are read as parallel ranged GETs (one
    /// connection's throughput is the limit on object stores, not the
    /// request count).
    async fn get_range_once(&self, key: &str, range: Range<u64>, if_match: Option<&str>) -> RemoteResult<Bytes> {
        let path = self.path("get_range", key)?;
        let store = self.store("get_range", key)?;
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let part = self.cfg.read_part_size.max(1);
        if range.end - range.start <= part {
            return self.get_one(&store, &path, key, range, if_match).await;
        }
        let parts: Vec<Range<u64>> =
            (range.start..range.end).step_by(part as usize).map(|s| s..(s + part).min(range.end)).collect();
        let got: Vec<Bytes> = futures::stream::iter(parts)
            .map(|r| self.get_one(&store, &path, key, r, if_match))
            .buffered(self.cfg.parallel_parts.max(1))
            .try_collect()
            .await?;
        let mut out = Vec::with_capacity(got.iter().map(Bytes::len).sum());
        for b in &got {
            out.extend_from_slice(b);
            // A short part means the object ended there.
            if (b.len() as u64) < part {
                break;
            }
        }
        Ok(Bytes::from(out))
    }

    async fn put_once(&self, key: &str, body: &PutBody) -> RemoteResult<ObjectMeta> {
        let path = self.path("put", key)?;
        let store = self.store("put", key)?;
        match body.len() {
            Some(n) if n <= self.cfg.multipart_threshold => {
                let data = super::collect_body(body).await.map_err(|e| RemoteError::Io {
                    remote: self.name(),
                    op: "put",
                    key: key.to_string(),
                    source: e,
                })?;
                let n = data.len() as u64;
                within(&self.cfg, n, store.put(&path, PutPayload::from(data)))
                    .await
                    .map_err(|e| self.err("put", key, e))?;
            }
            _ => self.put_multipart(&store, &path, key, body).await?,
        }
        self.head_once(key).await
    }

    async fn head_once(&self, key: &str) -> RemoteResult<ObjectMeta> {
        let path = self.path("head", key)?;
        let store = self.store("head", key)?;
        match within(&self.cfg, 0, store.head(&path)).await {
            Ok(m) => Ok(self.meta(key, &m)),
            Err(e @ object_store::Error::NotFound { .. }) => {
                self.check_bucket(&store, "head", key).await?;
                Err(self.err("head", key, e))
            }
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    /// The objects under `prefix`, past `after` when given (S3 and GCS
    /// start the listing there: `start-after`, `startOffset`).
    async fn list_once(&self, prefix: &str, after: Option<&str>) -> RemoteResult<Vec<ObjectMeta>> {
        let store = self.store("list", prefix)?;
        let root = if self.root.is_empty() { None } else { Some(OsPath::from(self.root.as_str())) };
        let listing = match after {
            Some(a) => store.list_with_offset(root.as_ref(), &self.path("list", a)?),
            None => store.list(root.as_ref()),
        };
        // Each page is a request of its own, with its own deadline.
        let mut listing = listing;
        let mut all: Vec<object_store::ObjectMeta> = Vec::new();
        while let Some(m) = within(&self.cfg, 0, async { listing.next().await.transpose() })
            .await
            .map_err(|e| self.err("list", prefix, e))?
        {
            all.push(m);
        }
        let skip = if self.root.is_empty() { 0 } else { self.root.len() + 1 };
        let mut out: Vec<ObjectMeta> = all
            .iter()
            .filter_map(|m| {
                let key = m.location.as_ref().get(skip..)?;
                (!key.contains('/') && key.starts_with(prefix)).then(|| self.meta(key, m))
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete_once(&self, key: &str) -> RemoteResult<()> {
        let path = self.path("delete", key)?;
        match within(&self.cfg, 0, self.store("delete", key)?.delete(&path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// A conditional put (`PutMode::Create`) where the store was seen to
    /// honour it; refused where it was not, unless the operator declared a
    /// single writer (then: look, then put).
    async fn create_once(&self, key: &str, tag: &str, body: &PutBody) -> RemoteResult<ObjectMeta> {
        let path = self.path("create", key)?;
        let store = self.store("create", key)?;
        let data = super::collect_body(body).await.map_err(|e| RemoteError::Io {
            remote: self.name(),
            op: "create",
            key: key.to_string(),
            source: e,
        })?;
        if self.fence().await? == Fence::Ignored {
            if !self.cfg.unfenced {
                return Err(RemoteError::Fatal {
                    remote: self.name(),
                    op: "create",
                    key: key.to_string(),
                    message: format!(
                        "this store does not refuse a second create of one key (it ignored \
                         If-None-Match: * when tested), so it cannot fence two writers of a volume; \
                         writing is refused. Serve it --read-only, use a store whose conditional \
                         puts hold (AWS S3, GCS, Azure, MinIO, R2), or set {}=1 if you guarantee \
                         only one host ever writes this volume",
                        super::config::ENV_OBJSTORE_UNFENCED
                    ),
                });
            }
            if !self.warned_unfenced.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    remote = %self.name(),
                    "this store ignores conditional creates; {}=1: trusting that only this host writes",
                    super::config::ENV_OBJSTORE_UNFENCED
                );
            }
            match within(&self.cfg, 0, store.head(&path)).await {
                Ok(_) => return Err(self.refused_create(key).await),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("create", key, e)),
            }
            // A plain put: the client may be configured without conditional
            // puts at all (`AWS_CONDITIONAL_PUT=disabled`).
            let n = data.len() as u64;
            return match within(&self.cfg, n, store.put_opts(&path, PutPayload::from(data), PutOptions::default()))
                .await
            {
                Ok(_) => Ok(ObjectMeta { tag: Some(tag.to_string()), ..self.head_once(key).await? }),
                Err(e) => Err(self.err("create", key, e)),
            };
        }
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        let n = data.len() as u64;
        match within(&self.cfg, n, store.put_opts(&path, PutPayload::from(data), opts)).await {
            Ok(_) => {
                let m = self.head_once(key).await?;
                Ok(ObjectMeta { tag: Some(tag.to_string()), ..m })
            }
            Err(object_store::Error::AlreadyExists { .. }) => Err(self.refused_create(key).await),
            Err(e) => Err(self.err("create", key, e)),
        }
    }
}

#[async_trait]
impl Remote for ObjStoreRemote {
    /// Object stores have no folders: a key's prefix is all there is.
    async fn create_folder(&self) -> RemoteResult<()> {
        Ok(())
    }

    /// Paced after the bytes arrived (object_store reads bodies whole).
    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r = self.fresh_on_failure("get_range", key, || self.get_range_once(key, range.clone(), None)).await?;
        self.cfg.bwlimit.downloaded(r.len() as u64).await;
        Ok(r)
    }

    /// A revision is an ETag ([`meta`](Self::meta)): the read is a GET
    /// `If-Match` it, so a base object replaced since it was attached
    /// fails the read (NotFound: the revision is gone) instead of mixing
    /// the new object's bytes into a disk made of the old one's.
    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r =
            self.fresh_on_failure("get_range", key, || self.get_range_once(key, range.clone(), Some(revision))).await?;
        self.cfg.bwlimit.downloaded(r.len() as u64).await;
        Ok(r)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.fresh_on_failure("put", key, || self.put_once(key, &body)).await
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        self.fresh_on_failure("head", key, || self.head_once(key)).await
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        self.fresh_on_failure("list", prefix, || self.list_once(prefix, None)).await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        let mut l = self.fresh_on_failure("list", prefix, || self.list_once(prefix, Some(after))).await?;
        // The offset is the store's order of whole paths; the trait's is keys.
        l.retain(|m| m.key.as_str() > after);
        Ok(l)
    }

    async fn delete(&self, key: &str) -> RemoteResult<()> {
        self.fresh_on_failure("delete", key, || self.delete_once(key)).await
    }

    async fn create(&self, key: &str, _slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.fresh_on_failure("create", key, || self.create_once(key, tag, &body)).await
    }

    fn describe(&self) -> String {
        self.name()
    }

    /// A fresh client: a new connection pool and a new credential cache.
    fn reset_connections(&self) {
        let seen = self.store.load_full();
        self.rebuild(&seen, "a request got no answer in time");
    }

    /// Counted by the client [`build_store`] makes; a client handed in
    /// ([`with_store`](Self::with_store)) is not counted.
    fn bytes_sent(&self) -> Option<u64> {
        self.rebuildable.then(|| self.cfg.sent.delivered())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(StoreKind::strip("s3://b/x"), Some((StoreKind::S3, "b/x")));
        assert_eq!(StoreKind::strip("gs://b"), Some((StoreKind::Gcs, "b")));
        assert_eq!(StoreKind::strip("az://c/p"), Some((StoreKind::Azure, "c/p")));
        assert_eq!(StoreKind::strip("dir:/x"), None);
    }

    /// Points `s3://` clients built from the environment at `endpoint`
    /// (nextest runs each test in its own process).
    fn use_endpoint(endpoint: &str) {
        for (k, v) in [
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
    }

    /// An S3 endpoint answering every request with `status` and an S3
    /// error body; returns its URL (the client's variables set).
    async fn answering(status: &'static str) -> String {
        answering_with(status, "<?xml version=\"1.0\"?><Error><Code>X</Code><Message>m</Message></Error>").await
    }

    /// [`answering`] with the error body `body`.
    async fn answering_with(status: &'static str, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = vec![0u8; 1 << 20];
                    let _ = c.read(&mut b).await;
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = c.write_all(head.as_bytes()).await;
                    let _ = c.write_all(body.as_bytes()).await;
                });
            }
        });
        use_endpoint(&endpoint);
        endpoint
    }

    /// A host whose clock is off: S3 refuses the signature (403
    /// RequestTimeTooSkewed). That is no credentials problem: the error
    /// says to set the clock.
    #[tokio::test]
    async fn a_skewed_clock_is_named_not_taken_for_bad_credentials() {
        answering_with(
            "403 Forbidden",
            "<?xml version=\"1.0\"?><Error><Code>RequestTimeTooSkewed</Code><Message>The difference between \
             the request time and the current time is too large.</Message></Error>",
        )
        .await;
        let r = ObjStoreRemote::new(StoreKind::S3, "b", "v", &ObjStoreConfig::default());
        let e = r.get_range("pack-1", 0..10).await.unwrap_err();
        assert!(matches!(e, RemoteError::Fatal { .. }) && e.to_string().contains("clock"), "{e}");
        assert!(!e.to_string().contains("not authorised"), "{e}");
        // A HEAD's refusal has no body to tell: the clock is among the causes named.
        let e = r.head("volume.json").await.unwrap_err();
        assert!(matches!(e, RemoteError::Auth { .. }) && e.to_string().contains("clock"), "{e}");
    }

    /// A request the store refuses as such (400: a bad argument, an
    /// expired token) is not retried: asking again gets the same answer.
    #[tokio::test]
    async fn a_refused_request_is_not_retried() {
        answering("400 Bad Request").await;
        let r = ObjStoreRemote::new(StoreKind::S3, "b", "v", &ObjStoreConfig::default());
        let e = r.get_range("pack-1", 0..1000).await.unwrap_err();
        assert!(!e.is_retryable() && e.to_string().contains("400"), "{e}");
    }

    /// A store that answers 501 to a conditional put does not implement
    /// the fence: it counts as one that ignores it (refused unless one
    /// writer is declared), not as a passing outage retried for ever.
    #[tokio::test]
    async fn a_store_without_conditional_puts_has_no_fence() {
        answering("501 Not Implemented").await;
        let r = ObjStoreRemote::new(StoreKind::S3, "b", "v", &ObjStoreConfig::default());
        assert_eq!(r.fence().await.unwrap(), Fence::Ignored);
    }

    /// An S3 endpoint that takes a PUT's body at 64 KiB/s (a slow uplink,
    /// `--bwlimit`) and answers HEADs: a 256 KiB put takes 4 s, longer than
    /// the small request's deadline (1 s here), and still succeeds: each
    /// request's deadline grows with its body.
    #[tokio::test]
    async fn a_put_slower_than_the_small_request_deadline_gets_through() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut c = tokio::io::BufReader::new(c);
                    let mut stored = 0u64;
                    loop {
                        let (mut method, mut len) = (String::new(), 0u64);
                        loop {
                            let mut line = String::new();
                            if c.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if method.is_empty() {
                                method = line.split(' ').next().unwrap_or("").to_string();
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut left = len;
                        let mut buf = vec![0u8; 16 << 10];
                        while left > 0 {
                            let n = c.read(&mut buf[..left.min(16 << 10) as usize]).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            left -= n as u64;
                            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        }
                        let reply = if method == "PUT" {
                            stored = len;
                            "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n".to_string()
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: {stored}\r\n\
                                 Last-Modified: Wed, 02 Dec 2026 10:00:00 GMT\r\n\r\n"
                            )
                        };
                        if c.get_mut().write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        use_endpoint(&endpoint);
        let cfg = ObjStoreConfig { request_timeout: std::time::Duration::from_secs(1), ..Default::default() };
        let r = ObjStoreRemote::new(StoreKind::S3, "b", "v", &cfg);
        let t0 = std::time::Instant::now();
        let m = r.put("pack-1", PutBody::from_bytes(vec![7u8; 256 << 10])).await.unwrap();
        assert_eq!(m.size, 256 << 10);
        assert!(t0.elapsed() >= std::time::Duration::from_secs(3), "{:?}", t0.elapsed());
    }

    /// An S3 endpoint that sends a ranged GET's headers and a few bytes,
    /// then nothing: the read fails within a few request deadlines
    /// (object_store's own retries included), instead of waiting for bytes
    /// that never come. The client is built as `s3://` URLs build it, from
    /// the environment (nextest runs each test in its own process).
    #[tokio::test]
    async fn a_body_that_stalls_mid_way_fails_in_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 8192];
                    let _ = c.read(&mut b).await;
                    let head = "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/1000\r\n\
                                Content-Length: 1000\r\nETag: \"e\"\r\n\
                                Last-Modified: Wed, 02 Dec 2026 10:00:00 GMT\r\n\r\n";
                    let _ = c.write_all(head.as_bytes()).await;
                    let _ = c.write_all(&[1u8; 10]).await;
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                });
            }
        });
        use_endpoint(&endpoint);
        let cfg = ObjStoreConfig { request_timeout: std::time::Duration::from_millis(500), ..Default::default() };
        let r = ObjStoreRemote::new(StoreKind::S3, "b", "v", &cfg);
        let t0 = std::time::Instant::now();
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), r.get_range("pack-1", 0..1000)).await;
        let e = got.expect("the read waited on the silent endpoint").unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    /// An S3 endpoint for multipart uploads that records what it was asked
    /// (method, path and query, body length) and answers part `bad` with a
    /// 403 AccessDenied, or never (`hang`).
    async fn s3_multipart_endpoint(bad: Option<u32>, hang: bool) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut b = [0u8; 65536];
                            match c.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&b[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let mut b = [0u8; 65536];
                            match c.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&b[..n]),
                            }
                        }
                        buf.drain(..head_end + len);
                        let line = head.lines().next().unwrap_or_default().to_string();
                        let mut words = line.split(' ');
                        let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
                        log.lock().unwrap().push(format!("{method} {target} {len}"));
                        let part: Option<u32> = target
                            .split(['?', '&'])
                            .find_map(|q| q.strip_prefix("partNumber="))
                            .and_then(|n| n.parse().ok());
                        let (status, extra, body) = match (method, part) {
                            ("PUT", Some(n)) if Some(n) == bad && hang => {
                                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                                return;
                            }
                            ("PUT", Some(n)) if Some(n) == bad => (
                                "403 Forbidden",
                                String::new(),
                                "<Error><Code>AccessDenied</Code><Message>denied</Message></Error>".to_string(),
                            ),
                            ("PUT", Some(n)) => ("200 OK", format!("ETag: \"p{n}\"\r\n"), String::new()),
                            ("POST", _) if !target.contains("uploadId=") => (
                                "200 OK",
                                String::new(),
                                "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>v/pack-1</Key>\
                                 <UploadId>U1</UploadId></InitiateMultipartUploadResult>"
                                    .to_string(),
                            ),
                            ("POST", _) => (
                                "200 OK",
                                String::new(),
                                "<CompleteMultipartUploadResult><ETag>\"all\"</ETag></CompleteMultipartUploadResult>"
                                    .to_string(),
                            ),
                            ("DELETE", _) => ("204 No Content", String::new(), String::new()),
                            ("HEAD", _) => (
                                "200 OK",
                                "ETag: \"all\"\r\nLast-Modified: Wed, 02 Dec 2026 10:00:00 GMT\r\n".to_string(),
                                String::new(),
                            ),
                            _ => ("404 Not Found", String::new(), String::new()),
                        };
                        let resp = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len());
                        if c.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (endpoint, seen)
    }

    /// A remote on `endpoint`, its client configured in code (not from the
    /// environment, which tests running in one process would share).
    fn s3_remote_at(endpoint: &str) -> ObjStoreRemote {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_region("us-east-1")
            .with_bucket_name("b")
            .build()
            .unwrap();
        let cfg =
            ObjStoreConfig { multipart_threshold: 1, part_size: 1 << 20, parallel_parts: 2, ..Default::default() };
        ObjStoreRemote::with_store(Ok(Arc::new(store)), StoreKind::S3, "b", "v", &cfg)
    }

    /// A body cut into parts of `part_size` (the last one short), then the
    /// completion; nothing aborted.
    #[tokio::test]
    async fn multipart_upload_sends_whole_parts_then_completes() {
        let (endpoint, seen) = s3_multipart_endpoint(None, false).await;
        let r = s3_remote_at(&endpoint);
        r.put("pack-1", PutBody::from_bytes(vec![7u8; (5 << 20) / 2])).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        let mut parts: Vec<&String> = seen.iter().filter(|l| l.contains("partNumber=")).collect();
        parts.sort();
        assert_eq!(parts.len(), 3, "{seen:?}");
        let sizes: Vec<&str> = parts.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
        assert_eq!(sizes, ["1048576", "1048576", "524288"], "{seen:?}");
        assert!(seen.iter().any(|l| l.starts_with("POST") && l.contains("uploadId=U1")), "{seen:?}");
        assert!(!seen.iter().any(|l| l.starts_with("DELETE")), "{seen:?}");
    }

    /// A part the store refuses fails the put, and the upload is aborted
    /// (AbortMultipartUpload) so its other parts are not left in the
    /// bucket.
    #[tokio::test]
    async fn multipart_upload_that_fails_is_aborted() {
        let (endpoint, seen) = s3_multipart_endpoint(Some(2), false).await;
        let r = s3_remote_at(&endpoint);
        let e = r.put("pack-1", PutBody::from_bytes(vec![7u8; 4 << 20])).await.unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|l| l.starts_with("DELETE") && l.contains("uploadId=U1")), "{seen:?}");
        assert!(!seen.iter().any(|l| l.starts_with("POST") && l.contains("uploadId=U1")), "{seen:?}");
    }

    /// A put given up at its caller's deadline (a part that never gets an
    /// answer) is aborted in the background.
    #[tokio::test]
    async fn multipart_upload_given_up_is_aborted() {
        let (endpoint, seen) = s3_multipart_endpoint(Some(2), true).await;
        let r = s3_remote_at(&endpoint);
        let put = r.put("pack-1", PutBody::from_bytes(vec![7u8; 4 << 20]));
        assert!(tokio::time::timeout(std::time::Duration::from_secs(2), put).await.is_err());
        let t0 = std::time::Instant::now();
        while !seen.lock().unwrap().iter().any(|l| l.starts_with("DELETE") && l.contains("uploadId=U1")) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", seen.lock().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// object_store's in-memory store honours PutMode::Create: the probe
    /// must say so, and keys must stay inside the prefix.
    #[tokio::test]
    async fn probe_and_prefix_on_a_store_that_fences() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let cfg = ObjStoreConfig { read_part_size: 4, ..Default::default() };
        let r = ObjStoreRemote::with_store(Ok(mem.clone()), StoreKind::S3, "b", "vols/v1", &cfg);
        assert_eq!(r.fence().await.unwrap(), Fence::Holds);
        r.put("pack-1", PutBody::from_bytes(b"hello world".to_vec())).await.unwrap();
        // Split into 4-byte parallel reads, cut at the end.
        assert_eq!(&r.get_range("pack-1", 1..100).await.unwrap()[..], b"ello world");
        assert!(r.get_range("pack-1", 11..20).await.unwrap().is_empty());
        let all: Vec<_> = mem.list(None).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
        assert_eq!(all, vec!["vols/v1/pack-1"]);
        assert!(r.put("a/b", PutBody::from_bytes(vec![])).await.is_err());
    }
}
