//! Remote configuration: where each backend's service is and how to
//! authenticate to it. `gdrive:` needs most; `s3://`, `gs://` and `az://`
//! take endpoints and credentials from each cloud's usual variables (read
//! by `object_store`) plus the few settings here; `dir:` ignores it.
//!
//! Every field can come from the command line or from the environment, so
//! tests and scripts can point the unchanged CLI at an emulator (only base
//! URLs differ from production).

use std::path::PathBuf;
use std::time::Duration;

use super::bwlimit::BwLimit;

/// Google's production Drive API host.
pub const DEFAULT_DRIVE_API_URL: &str = "https://www.googleapis.com";
/// Google's OAuth 2.0 token endpoint.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Google's OAuth 2.0 authorization endpoint (for `driveblk auth login`).
pub const DEFAULT_AUTH_URI: &str = "https://accounts.google.com/o/oauth2/auth";

/// Env var: Drive API base URL (e.g. an emulator's `http://127.0.0.1:PORT`).
pub const ENV_API_URL: &str = "DRIVEBLK_DRIVE_API_URL";
/// Env var: OAuth token URI override.
pub const ENV_TOKEN_URI: &str = "DRIVEBLK_DRIVE_TOKEN_URI";
/// Env var: path of a credentials file (service-account key JSON or an
/// authorized-user token file written by `driveblk auth login`).
pub const ENV_CREDENTIALS: &str = "DRIVEBLK_DRIVE_CREDENTIALS";
/// Env var: a static bearer token (scripts; it is not refreshed).
pub const ENV_TOKEN: &str = "DRIVEBLK_DRIVE_TOKEN";
/// Env var: OAuth scope, `drive.file` (default) or `drive`.
pub const ENV_SCOPE: &str = "DRIVEBLK_DRIVE_SCOPE";
/// Env var: pacer as `RATE[,BURST[,MAX]]` requests per second.
pub const ENV_PACER: &str = "DRIVEBLK_DRIVE_PACER";

/// Env var: `1` declares that only one host ever writes the volumes on an
/// object store whose conditional puts do not hold (Garage), so writing
/// is allowed there without a fence (`remote/objstore.rs`).
pub const ENV_OBJSTORE_UNFENCED: &str = "DRIVEBLK_OBJSTORE_UNFENCED";

/// Which Drive OAuth scope to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DriveScope {
    /// Only files driveblk created or the user opened with it: enough for
    /// volumes driveblk made, and not a restricted scope.
    #[default]
    File,
    /// Every file of the account: needed to attach an image uploaded
    /// through the Drive web UI (`gdrive:file=ID`, or a path to it).
    Full,
}

impl DriveScope {
    /// The scope URL sent to the token endpoint.
    pub fn url(self) -> &'static str {
        match self {
            DriveScope::File => "https://www.googleapis.com/auth/drive.file",
            DriveScope::Full => "https://www.googleapis.com/auth/drive",
        }
    }

    /// Parses `drive.file`, `file`, `drive` or `full` (or the scope URL).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().trim_start_matches("https://www.googleapis.com/auth/") {
            "drive.file" | "file" => Some(DriveScope::File),
            "drive" | "full" => Some(DriveScope::Full),
            _ => None,
        }
    }
}

/// Where Drive credentials come from. Resolved in this order when
/// [`DriveCredentials::Auto`]: `DRIVEBLK_DRIVE_TOKEN`, then
/// `DRIVEBLK_DRIVE_CREDENTIALS`, then the token file `driveblk auth login`
/// wrote under the config dir.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub enum DriveCredentials {
    /// Pick from the environment and the config dir at first use.
    #[default]
    Auto,
    /// A file: a service-account key (`"type": "service_account"`) or an
    /// authorized-user token file (`"type": "authorized_user"`).
    File(PathBuf),
    /// A bearer token used as is (expires in about an hour; not refreshed).
    StaticToken(String),
}

impl std::fmt::Debug for DriveCredentials {
    /// Never shows a static token (configs end up in logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveCredentials::Auto => f.write_str("Auto"),
            DriveCredentials::File(p) => f.debug_tuple("File").field(p).finish(),
            DriveCredentials::StaticToken(_) => f.write_str("StaticToken(<redacted>)"),
        }
    }
}

/// A token-bucket pacer's settings, shared by every request of one account.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PacerConfig {
    /// Requests per second to start at.
    pub rate: f64,
    /// Requests that may go at once after a quiet spell.
    pub burst: u32,
    /// Most requests per second the rate may climb to while requests queue
    /// and Drive does not refuse (`rate` for a fixed rate).
    pub max_rate: f64,
}

impl Default for PacerConfig {
    /// Start at 20 requests/s with bursts of 100 (twice rclone's fixed
    /// 100 ms spacing) and climb to 200/s while requests queue and Drive
    /// does not refuse: Google documents 325,000 quota units per minute per
    /// user (older projects: 12,000 requests a minute, 200/s), and backend
    /// checks may answer 429 sooner, which halves the rate. The emulator
    /// tests `gdrive_pacer_keeps_under_the_per_user_limit` and
    /// `gdrive_pacer_finds_a_limit_above_its_start` show both modes.
    fn default() -> Self {
        Self { rate: 20.0, burst: 100, max_rate: 200.0 }
    }
}

impl PacerConfig {
    /// A pacer that never climbs above `rate`.
    pub fn fixed(rate: f64, burst: u32) -> Self {
        Self { rate, burst, max_rate: rate }
    }

    /// Parses `RATE[,BURST[,MAX]]`; without MAX the rate is fixed.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(',');
        let rate: f64 = it.next()?.trim().parse().ok()?;
        let burst = match it.next() {
            Some(b) => b.trim().parse().ok()?,
            None => Self::default().burst,
        };
        let max_rate: f64 = match it.next() {
            Some(m) => m.trim().parse().ok()?,
            None => rate,
        };
        (rate > 0.0 && burst > 0 && max_rate >= rate && it.next().is_none()).then_some(Self { rate, burst, max_rate })
    }
}

/// How to reach Google Drive.
#[derive(Clone, Debug, PartialEq)]
pub struct DriveConfig {
    /// Base URL of the API host; the API is at `{api_url}/drive/v3`,
    /// uploads at `{api_url}/upload/drive/v3`.
    pub api_url: String,
    /// Overrides the token URI of the credentials (a service-account key
    /// names its own; a token file may too).
    pub token_uri: Option<String>,
    pub credentials: DriveCredentials,
    pub scope: DriveScope,
    pub pacer: PacerConfig,
    /// Bodies larger than this go up as resumable uploads in chunks (the
    /// upload guide keeps multipart for files of 5 MB or less).
    pub resumable_threshold: u64,
    /// Resumable upload chunk size; a multiple of 256 KiB.
    pub chunk_size: u64,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline of one small request (metadata, a ranged read of a few MiB).
    pub request_timeout: Duration,
    /// Slowest transfer rate (bytes/s) a request's deadline allows for its
    /// body, on top of `request_timeout`.
    pub min_transfer_rate: u64,
    /// Attempts of one upload chunk (with resume in between) before the
    /// upload gives up; uploads retry inside the backend so the retry
    /// wrapper does not restart them from byte 0.
    pub upload_attempts: u32,
    /// First backoff between chunk attempts; doubles up to 16 s.
    pub upload_backoff: Duration,
    /// The on-disk record of ids this host created (`gdrive/ids.rs`), so
    /// other processes here find new folders and objects by id. None:
    /// keep none. The CLI uses `$XDG_CACHE_HOME/driveblk/gdrive-ids.jsonl`.
    pub id_record: Option<PathBuf>,
    /// Where the host-wide pacer records live, one per account
    /// (`gdrive/pacer.rs`): every process of this host that uses the
    /// account shares one request budget through it. None: this process
    /// paces only its own requests. The CLI uses `link_dir` (`$DRIVEBLK_LINK`,
    /// else `<cache root>/link`).
    pub shared_pacer_dir: Option<PathBuf>,
    /// Merging of ranged reads asked at once (`remote/merge.rs`).
    pub read_merge: super::merge::MergeConfig,
    /// How long opening a volume looks again for a header it does not
    /// find (listings lag behind creates: another host may have created
    /// it moments ago) before answering "no volume".
    pub open_grace: Duration,
    /// `--bwlimit`: the process's limiter (set through
    /// [`RemoteConfig::set_bwlimit`]).
    pub bwlimit: BwLimit,
}

impl Default for DriveConfig {
    fn default() -> Self {
        Self {
            api_url: DEFAULT_DRIVE_API_URL.to_string(),
            token_uri: None,
            credentials: DriveCredentials::Auto,
            scope: DriveScope::File,
            pacer: PacerConfig::default(),
            resumable_threshold: 5_000_000,
            chunk_size: 8 << 20,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            min_transfer_rate: 16 << 10,
            upload_attempts: 10,
            upload_backoff: Duration::from_secs(1),
            id_record: None,
            shared_pacer_dir: None,
            read_merge: super::merge::MergeConfig::default(),
            open_grace: Duration::from_secs(10),
            bwlimit: BwLimit::default(),
        }
    }
}

/// How to use an object store (`s3://`, `gs://`, `az://`). Endpoint,
/// region and credentials are the cloud's own variables (`AWS_ENDPOINT`,
/// `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`,
/// ...), read by `object_store`'s builders with their credential chains.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjStoreConfig {
    /// Bodies larger than this (or of unknown size) go up as multipart
    /// uploads.
    pub multipart_threshold: u64,
    /// Multipart part size (S3: at least 5 MiB except the last); larger
    /// for a body that would otherwise need more than `max_parts` parts.
    pub part_size: u64,
    /// Most parts one multipart upload may have (S3 and GCS: 10,000).
    pub max_parts: u64,
    /// Ranged reads longer than this are split into parallel GETs.
    pub read_part_size: u64,
    /// Parts in flight at once, per upload or per read.
    pub parallel_parts: usize,
    /// Deadline of one HTTP request (a part of at most `part_size`).
    pub request_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// The operator guarantees a single writer ([`ENV_OBJSTORE_UNFENCED`]).
    pub unfenced: bool,
    /// `--bwlimit`: the process's limiter (set through
    /// [`RemoteConfig::set_bwlimit`]); when it limits, the client paces
    /// request bodies.
    pub bwlimit: BwLimit,
    /// Upload bytes the client took, shared by the stores made from this
    /// configuration ([`Remote::bytes_sent`](super::Remote::bytes_sent)).
    pub sent: super::sent::SentBytes,
}

impl Default for ObjStoreConfig {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            max_parts: 10_000,
            read_part_size: 8 << 20,
            parallel_parts: 4,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            unfenced: false,
            bwlimit: BwLimit::default(),
            sent: Default::default(),
        }
    }
}

/// Configuration of the remote layer, shared by every remote a command opens.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RemoteConfig {
    pub drive: DriveConfig,
    pub objstore: ObjStoreConfig,
}

/// Why an environment variable could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl RemoteConfig {
    /// Paces every backend's transfers with `limit` (one per process:
    /// every remote shares its clocks).
    pub fn set_bwlimit(&mut self, limit: BwLimit) {
        self.drive.bwlimit = limit.clone();
        self.objstore.bwlimit = limit;
    }

    /// The limiter the backends pace with (`dir:` takes it from here).
    pub fn bwlimit(&self) -> &BwLimit {
        &self.drive.bwlimit
    }

    /// Defaults overridden by the `DRIVEBLK_DRIVE_*` environment variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut c = Self::default();
        c.drive.id_record = super::gdrive::ids::default_path();
        c.apply_env()?;
        Ok(c)
    }

    /// [`from_env`](Self::from_env), falling back to the defaults (with a
    /// warning) when a variable is malformed: used where no error can be
    /// returned (`RemoteUrl::folder`).
    pub fn from_env_or_default() -> Self {
        Self::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring malformed Drive settings in the environment");
            Self::default()
        })
    }

    /// Applies the `DRIVEBLK_DRIVE_*` variables that are set.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let d = &mut self.drive;
        if let Some(v) = var(ENV_API_URL) {
            d.api_url = v.trim_end_matches('/').to_string();
        }
        if let Some(v) = var(ENV_TOKEN_URI) {
            d.token_uri = Some(v);
        }
        if let Some(v) = var(ENV_CREDENTIALS) {
            d.credentials = DriveCredentials::File(PathBuf::from(v));
        }
        if let Some(v) = var(ENV_TOKEN) {
            d.credentials = DriveCredentials::StaticToken(v);
        }
        if let Some(v) = var(ENV_SCOPE) {
            d.scope = DriveScope::parse(&v).ok_or(ConfigError {
                var: ENV_SCOPE,
                value: v,
                expected: "drive.file or drive",
            })?;
        }
        if let Some(v) = var(ENV_OBJSTORE_UNFENCED) {
            self.objstore.unfenced = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => return Err(ConfigError { var: ENV_OBJSTORE_UNFENCED, value: v, expected: "1 or 0" }),
            };
        }
        let d = &mut self.drive;
        if let Some(v) = var(ENV_PACER) {
            d.pacer = PacerConfig::parse(&v).ok_or(ConfigError {
                var: ENV_PACER,
                value: v,
                expected: "RATE[,BURST[,MAX]], e.g. 20,100,200",
            })?;
        }
        Ok(())
    }
}

/// driveblk's config dir: `$XDG_CONFIG_HOME/driveblk`, else
/// `~/.config/driveblk`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("driveblk"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config").join("driveblk"))
}

/// Where `driveblk auth login` keeps the account's refresh token.
pub fn default_token_file() -> Option<PathBuf> {
    config_dir().map(|d| d.join("gdrive-token.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scope_and_pacer() {
        assert_eq!(DriveScope::parse("drive"), Some(DriveScope::Full));
        assert_eq!(DriveScope::parse("https://www.googleapis.com/auth/drive.file"), Some(DriveScope::File));
        assert_eq!(DriveScope::parse("drive.readonly"), None);
        assert_eq!(PacerConfig::parse("10,50"), Some(PacerConfig::fixed(10.0, 50)));
        assert_eq!(PacerConfig::parse("10,50,80"), Some(PacerConfig { rate: 10.0, burst: 50, max_rate: 80.0 }));
        assert_eq!(PacerConfig::parse("10,50,5"), None, "a ceiling under the start");
        assert_eq!(PacerConfig::parse("2.5"), Some(PacerConfig::fixed(2.5, 100)));
        assert_eq!(PacerConfig::parse("0,1"), None);
        assert_eq!(PacerConfig::parse("x"), None);
    }

    #[test]
    fn gdrive_config_debug_hides_a_static_token() {
        let mut c = RemoteConfig::default();
        c.drive.credentials = DriveCredentials::StaticToken("ya29.SECRET".into());
        let s = format!("{c:?}");
        assert!(!s.contains("SECRET") && s.contains("redacted"), "{s}");
    }
}
