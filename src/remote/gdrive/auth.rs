//! Drive credentials: bearer tokens from a service-account key (through
//! yup-oauth2, which honours the key's `token_uri`), from a refresh token
//! that `driveblk auth login` saved (refreshed here, so the token URI can
//! come from config — yup-oauth2's AuthorizedUserAuthenticator hard-codes
//! Google's), or a static token. Tokens are refreshed a minute before they
//! expire, and never appear in an error message or a log line. A refresh
//! that fails after the credentials file changed (`driveblk auth login`
//! wrote a new grant, a key was rotated) re-reads the file and tries again,
//! so a running daemon picks up a new login without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use crate::remote::config::{default_token_file, DriveConfig, DriveCredentials, DEFAULT_TOKEN_URI};

/// Refresh this long before a token's stated expiry (a quarter of a
/// shorter lifetime).
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The grant or key no longer works (revoked, expired, deleted client):
    /// a person has to log in again or fix the key.
    #[error("{0}")]
    Rejected(String),
    /// The token endpoint could not be reached or failed; try again later.
    #[error("{0}")]
    Unavailable(String),
    /// No usable credentials are configured.
    #[error("{0}")]
    Config(String),
}

/// The token file `driveblk auth login` writes: the "authorized_user"
/// shape Google's own tools use, plus the token URI it was issued by.
#[derive(Clone, Serialize, Deserialize)]
pub struct AuthorizedUser {
    #[serde(rename = "type")]
    pub kind: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_uri: Option<String>,
    /// The scope granted at login (informational, shown by `auth status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl std::fmt::Debug for AuthorizedUser {
    /// Names the client only: the secret and the refresh token stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizedUser").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl AuthorizedUser {
    /// Writes the file with mode 0600 (temp + rename, so a crash leaves the
    /// old file or the new one).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            crate::remote::private::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// What a credentials file holds.
enum CredentialFile {
    ServiceAccount(Box<yup_oauth2::ServiceAccountKey>),
    User(AuthorizedUser),
}

fn read_credentials(path: &Path) -> Result<CredentialFile, AuthError> {
    let bytes = std::fs::read(path)
        .map_err(|e| AuthError::Config(format!("cannot read Drive credentials {}: {e}", path.display())))?;
    crate::remote::private::warn_if_exposed(path, "Drive credentials file", "use the Drive account");
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let bad = |e: serde_json::Error| {
        // serde_json's message names a position, never the file's content.
        AuthError::Config(format!("Drive credentials {} are not valid JSON: {e}", path.display()))
    };
    let kind: Kind = serde_json::from_slice(&bytes).map_err(bad)?;
    match kind.kind.as_deref() {
        Some("service_account") => {
            let key = yup_oauth2::parse_service_account_key(&bytes).map_err(|e| {
                AuthError::Config(format!("Drive service-account key {} is malformed: {e}", path.display()))
            })?;
            Ok(CredentialFile::ServiceAccount(Box::new(key)))
        }
        Some("authorized_user") => Ok(CredentialFile::User(serde_json::from_slice(&bytes).map_err(bad)?)),
        other => Err(AuthError::Config(format!(
            "Drive credentials {} have type {:?}; expected \"service_account\" (a key from the Cloud console) or \"authorized_user\" (from `driveblk auth login`)",
            path.display(),
            other.unwrap_or("none")
        ))),
    }
}

type YupAuth = yup_oauth2::authenticator::Authenticator<
    yup_oauth2::hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
>;

enum Source {
    Static(String),
    ServiceAccount { key: Box<yup_oauth2::ServiceAccountKey>, auth: OnceCell<YupAuth> },
    User { user: AuthorizedUser, token_uri: String, path: PathBuf },
}

/// Longest a token is used before asking for a new one, whatever the
/// token endpoint said.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A cached access token.
struct Cached {
    token: String,
    /// When to stop using it: its expiry less a safety margin.
    refresh_at: Instant,
}

/// Which version of a credentials file was read: rewriting it (in place,
/// or a new file renamed over it as `auth login` does) changes this.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self { modified: m.modified().ok(), len: m.len(), ino: m.ino() })
    }
}

/// Credentials as read from their source.
struct Loaded {
    source: Source,
    describe: String,
    /// The file's version when it was read (None: not from a file).
    stamp: Option<FileStamp>,
}

/// Bearer tokens for one account.
pub struct Auth {
    /// Swapped when the credentials file changed (see the module doc).
    loaded: parking_lot::Mutex<Arc<Loaded>>,
    /// The credentials file, if they came from one.
    file: Option<PathBuf>,
    /// The token URI configured over the file's own.
    token_uri: Option<String>,
    scope: &'static str,
    /// Shared with the Drive API client, so a reset of its connection pool
    /// reaches the token endpoint's connections too.
    http: Arc<arc_swap::ArcSwap<reqwest::Client>>,
    /// Held across a refresh, so concurrent callers wait for one refresh.
    cached: Mutex<Option<Cached>>,
    /// Set when Drive refused a token before its time: the next fetch
    /// skips yup-oauth2's own cache.
    force_next: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Reads the credentials file at `path`; `token_uri` is the configured
/// override of the file's own.
fn load(path: &Path, token_uri: Option<&str>) -> Result<Loaded, AuthError> {
    // The version is taken before the read: a rewrite in between is seen
    // as a change next time, never missed.
    let stamp = FileStamp::of(path);
    Ok(match read_credentials(path)? {
        CredentialFile::ServiceAccount(mut key) => {
            if let Some(u) = token_uri {
                key.token_uri = u.to_string();
            }
            let describe = format!("service account {}", key.client_email);
            Loaded { source: Source::ServiceAccount { key, auth: OnceCell::new() }, describe, stamp }
        }
        CredentialFile::User(user) => {
            let token_uri = token_uri
                .map(str::to_string)
                .or_else(|| user.token_uri.clone())
                .unwrap_or_else(|| DEFAULT_TOKEN_URI.into());
            let describe = format!("user login {} (OAuth client {})", path.display(), user.client_id);
            Loaded { source: Source::User { user, token_uri, path: path.to_path_buf() }, describe, stamp }
        }
    })
}

impl Auth {
    /// Credentials per `cfg` (files are read now, tokens fetched at first use).
    pub fn from_config(cfg: &DriveConfig, http: reqwest::Client) -> Result<Self, AuthError> {
        Self::with_shared_client(cfg, Arc::new(arc_swap::ArcSwap::from_pointee(http)))
    }

    /// [`from_config`](Self::from_config) with the HTTP client of a Drive
    /// API connection, whose pool resets it follows.
    pub(crate) fn with_shared_client(
        cfg: &DriveConfig,
        http: Arc<arc_swap::ArcSwap<reqwest::Client>>,
    ) -> Result<Self, AuthError> {
        let path = match &cfg.credentials {
            DriveCredentials::StaticToken(t) => {
                let l = Loaded { source: Source::Static(t.clone()), describe: "a static access token".into(), stamp: None };
                return Ok(Self::new(l, None, cfg, http));
            }
            DriveCredentials::File(p) => p.clone(),
            DriveCredentials::Auto => match default_token_file().filter(|p| p.exists()) {
                Some(p) => p,
                None => {
                    return Err(AuthError::Config(
                        "no Google Drive credentials: run `driveblk auth login`, or set DRIVEBLK_DRIVE_CREDENTIALS to a service-account key file, or DRIVEBLK_DRIVE_TOKEN to an access token".into(),
                    ))
                }
            },
        };
        let l = load(&path, cfg.token_uri.as_deref())?;
        Ok(Self::new(l, Some(path), cfg, http))
    }

    fn new(
        loaded: Loaded,
        file: Option<PathBuf>,
        cfg: &DriveConfig,
        http: Arc<arc_swap::ArcSwap<reqwest::Client>>,
    ) -> Self {
        Self {
            loaded: parking_lot::Mutex::new(Arc::new(loaded)),
            file,
            token_uri: cfg.token_uri.clone(),
            scope: cfg.scope.url(),
            http,
            cached: Mutex::new(None),
            force_next: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A name for the account these credentials act as at `api_url`,
    /// stable across processes and restarts and safe to write to disk (a
    /// hash: of the service account's email, of the login's client id and
    /// refresh token, of a static token): the key of the account's
    /// host-wide pacer record.
    pub fn account_key(&self, api_url: &str) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(api_url.trim_end_matches('/').as_bytes());
        h.update([0]);
        match &self.loaded.lock().source {
            Source::Static(t) => h.update(format!("static\0{t}")),
            Source::ServiceAccount { key, .. } => h.update(format!("service\0{}", key.client_email)),
            Source::User { user, .. } => h.update(format!("user\0{}\0{}", user.client_id, user.refresh_token)),
        }
        hex::encode(&h.finalize()[..12])
    }

    /// Who these credentials are, for `auth status` and messages (no secret).
    pub fn describe(&self) -> String {
        self.loaded.lock().describe.clone()
    }

    /// A bearer token valid for at least a minute (as far as we know).
    pub async fn token(&self) -> Result<String, AuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let force = self.force_next.swap(false, std::sync::atomic::Ordering::SeqCst);
        let (token, lifetime) = match self.fetch(force).await {
            Ok(t) => t,
            // A grant refused (or any failure) after the file changed: the
            // person logged in again while this process ran.
            Err(_) if self.reload_if_changed() => self.fetch(true).await?,
            Err(e) => return Err(e),
        };
        // The token endpoint's word, capped: Google's tokens live an hour,
        // and an absurd `expires_in` must not overflow the clock.
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let margin = REFRESH_MARGIN.min(lifetime / 4);
        *cached = Some(Cached { token: token.clone(), refresh_at: Instant::now() + lifetime - margin });
        Ok(token)
    }

    /// Drive refused `token` (401): forget it, so the next call gets a new one.
    pub async fn invalidate(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_none_or(|c| c.token == token) {
            *cached = None;
            self.force_next.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Re-reads the credentials file if it changed since it was read;
    /// true when new credentials are in use. A changed file that cannot
    /// be used (half written, malformed) leaves the old credentials.
    fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.file else { return false };
        let now = FileStamp::of(path);
        if now.is_none() || now == self.loaded.lock().stamp {
            return false;
        }
        match load(path, self.token_uri.as_deref()) {
            Ok(l) => {
                tracing::info!(file = %path.display(), "Drive credentials file changed; using the new credentials");
                *self.loaded.lock() = Arc::new(l);
                true
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), "Drive credentials file changed but cannot be used: {e}");
                false
            }
        }
    }

    /// A fresh token and how long it lives.
    async fn fetch(&self, force: bool) -> Result<(String, Duration), AuthError> {
        let loaded = self.loaded.lock().clone();
        let describe = &loaded.describe;
        match &loaded.source {
            Source::Static(t) => Ok((t.clone(), Duration::from_secs(365 * 86400))),
            Source::ServiceAccount { key, auth } => {
                let a = auth
                    .get_or_try_init(|| async {
                        yup_oauth2::ServiceAccountAuthenticator::builder((**key).clone())
                            .with_timeout(Duration::from_secs(30))
                            .build()
                            .await
                            .map_err(|e| AuthError::Config(format!("service-account authenticator: {e}")))
                    })
                    .await?;
                let scopes = [self.scope];
                let t = if force { a.force_refreshed_token(&scopes).await } else { a.token(&scopes).await };
                let t = t.map_err(|e| yup_error(describe, e))?;
                let token =
                    t.token().ok_or_else(|| AuthError::Unavailable("token endpoint sent no access token".into()))?;
                let lifetime = t
                    .expiration_time()
                    .map(|exp| {
                        let secs = (exp - time_now()).whole_seconds().max(0) as u64;
                        Duration::from_secs(secs)
                    })
                    .unwrap_or(Duration::from_secs(3600));
                Ok((token.to_string(), lifetime))
            }
            Source::User { user, token_uri, path } => {
                let http = (**self.http.load()).clone();
                refresh_grant(&http, user, token_uri, path).await
            }
        }
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Classifies a yup-oauth2 error without echoing anything secret (its
/// messages carry the OAuth error code and description only).
fn yup_error(who: &str, e: yup_oauth2::Error) -> AuthError {
    use yup_oauth2::error::AuthErrorCode as C;
    match &e {
        yup_oauth2::Error::AuthError(a) => match a.error {
            C::InvalidGrant | C::InvalidClient | C::UnauthorizedClient | C::AccessDenied | C::InvalidScope => {
                AuthError::Rejected(format!(
                    "{who}: the token endpoint refused the key ({a}); check the key is current and not deleted, and that the account may use Drive"
                ))
            }
            _ => AuthError::Unavailable(format!("{who}: token endpoint: {a}")),
        },
        _ => AuthError::Unavailable(format!("{who}: token endpoint: {e}")),
    }
}

/// Google's token endpoint answer (RFC 6749 section 5).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<u64>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The refresh-token grant (RFC 6749 section 6).
async fn refresh_grant(
    http: &reqwest::Client,
    user: &AuthorizedUser,
    token_uri: &str,
    path: &Path,
) -> Result<(String, Duration), AuthError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "refresh_token")
        .append_pair("client_id", &user.client_id)
        .append_pair("client_secret", &user.client_secret)
        .append_pair("refresh_token", &user.refresh_token)
        .finish();
    let (status, bytes) = post_form(http, token_uri, body).await?;
    token_answer(status, &bytes, &format!("login {}", path.display()))
}

/// POSTs a form to a token endpoint.
pub(crate) async fn post_form(
    http: &reqwest::Client,
    token_uri: &str,
    body: String,
) -> Result<(reqwest::StatusCode, bytes::Bytes), AuthError> {
    let resp = http
        .post(token_uri)
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .timeout(Duration::from_secs(30))
        .body(body)
        .send()
        .await
        .map_err(|e| AuthError::Unavailable(format!("token endpoint {token_uri}: {}", e.without_url())))?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| AuthError::Unavailable(format!("token endpoint {token_uri}: {}", e.without_url())))?;
    Ok((status, bytes))
}

/// Reads a token endpoint's answer: the token and its lifetime, or the
/// error classified (`invalid_grant` and friends need a person).
pub(crate) fn token_answer(
    status: reqwest::StatusCode,
    bytes: &[u8],
    who: &str,
) -> Result<(String, Duration), AuthError> {
    let parsed: Option<TokenResponse> = serde_json::from_slice(bytes).ok();
    if status.is_success() {
        if let Some(TokenResponse { access_token: Some(t), expires_in, .. }) = parsed {
            return Ok((t, Duration::from_secs(expires_in.unwrap_or(3600))));
        }
        return Err(AuthError::Unavailable(format!("{who}: token endpoint answered {status} without a token")));
    }
    let (code, desc) = match &parsed {
        Some(r) => (r.error.clone().unwrap_or_default(), r.error_description.clone().unwrap_or_default()),
        None => (String::new(), String::new()),
    };
    let detail = if desc.is_empty() { code.clone() } else { format!("{code}: {desc}") };
    match code.as_str() {
        "invalid_grant" => Err(AuthError::Rejected(format!(
            "{who}: Google refused the saved grant ({detail}): it was revoked, or expired (an OAuth client left in \"testing\" issues refresh tokens that expire after 7 days); run `driveblk auth login` again"
        ))),
        "invalid_client" | "unauthorized_client" | "access_denied" | "invalid_scope" => Err(AuthError::Rejected(
            format!("{who}: the token endpoint refused the OAuth client ({detail}); check the client id and secret"),
        )),
        _ if status.is_server_error() || status.as_u16() == 429 => {
            Err(AuthError::Unavailable(format!("{who}: token endpoint answered {status} {detail}")))
        }
        _ => Err(AuthError::Rejected(format!("{who}: token endpoint answered {status} {detail}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdrive_token_errors_are_classified_without_secrets() {
        let ok = token_answer(reqwest::StatusCode::OK, br#"{"access_token":"ya29.x","expires_in":60}"#, "t").unwrap();
        assert_eq!(ok.1, Duration::from_secs(60));
        let e = token_answer(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#,
            "login f",
        )
        .unwrap_err();
        assert!(matches!(e, AuthError::Rejected(_)), "{e}");
        assert!(e.to_string().contains("driveblk auth login"), "{e}");
        let e = token_answer(reqwest::StatusCode::SERVICE_UNAVAILABLE, b"<html>", "t").unwrap_err();
        assert!(matches!(e, AuthError::Unavailable(_)), "{e}");
    }

    /// A token endpoint that says its token lives for ever gets its token
    /// used (for a day at most), not a panic on the clock.
    #[tokio::test]
    async fn gdrive_an_absurd_token_lifetime_is_capped() {
        use super::super::test_http::{response, serve, Reply};
        let base = serve(|_| {
            let body = br#"{"access_token":"ya29.x","expires_in":18446744073709551615}"#;
            Reply::Raw(response("200 OK", &[("Content-Type", "application/json".into())], body))
        })
        .await;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token.json");
        let u = AuthorizedUser {
            kind: "authorized_user".into(),
            client_id: "cid".into(),
            client_secret: "s".into(),
            refresh_token: "r".into(),
            token_uri: Some(format!("{base}/token")),
            scope: None,
        };
        u.save(&p).unwrap();
        let cfg = DriveConfig { credentials: DriveCredentials::File(p), ..Default::default() };
        let auth = Auth::from_config(&cfg, reqwest::Client::new()).unwrap();
        assert_eq!(auth.token().await.unwrap(), "ya29.x");
    }

    #[test]
    fn gdrive_token_file_is_private_and_debug_hides_secrets() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/token.json");
        let u = AuthorizedUser {
            kind: "authorized_user".into(),
            client_id: "cid".into(),
            client_secret: "SECRET".into(),
            refresh_token: "REFRESH".into(),
            token_uri: None,
            scope: None,
        };
        u.save(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let dbg = format!("{u:?}");
        assert!(!dbg.contains("SECRET") && !dbg.contains("REFRESH"), "{dbg}");
        assert!(matches!(read_credentials(&p), Ok(CredentialFile::User(_))));
    }
}
