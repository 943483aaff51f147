//! Options shared by every command that talks to a remote: where Google
//! Drive is and how to authenticate to it, and link simulation for tests
//! and benchmarks.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::Args;

use crate::cli::size::parse_size;
use crate::remote::config::{DriveCredentials, DriveScope, PacerConfig};
use crate::remote::shaped::{FaultPlan, ShapedRemote, Shaping};
use crate::remote::{BwEntry, BwLimit, BwSchedule, RemoteConfig};
use crate::volume::crypto::{KeySource, UserKey};
use crate::volume::RemoteOptions;

#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Simulate a slower link: add this many milliseconds to every remote
    /// request (testing and benchmarks).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub remote_latency_ms: u64,

    /// Simulate a slower link: cap remote transfers at this many Mbit/s in
    /// total (testing and benchmarks). 0 = no cap.
    #[arg(long, value_name = "MBIT", default_value_t = 0)]
    pub remote_bandwidth_mbit: u64,

    /// Limit remote bandwidth, in bytes per second, like rclone: `2M`
    /// (both ways), `1M:10M` (up:down), `off`, or a timetable by local
    /// time of day: `"08:00,512K 19:00,2M:off 23:00,off"`. Upload limits
    /// start at 16K. Paced on the wire and shared by every transfer:
    /// uploads go out in 64 KiB pieces at the rate, never in line-speed
    /// bursts; Drive downloads are read no faster (a receive buffer's
    /// worth may come early), other downloads are paced after they
    /// arrived.
    #[arg(long, value_name = "LIMIT", value_parser = parse_bwlimit)]
    pub bwlimit: Option<BwSchedule>,

    /// Google Drive API base URL (an emulator, a proxy). Also
    /// DRIVEBLK_DRIVE_API_URL. Default: https://www.googleapis.com.
    #[arg(long, value_name = "URL")]
    pub drive_api_url: Option<String>,

    /// OAuth token endpoint, overriding the one in the credentials. Also
    /// DRIVEBLK_DRIVE_TOKEN_URI.
    #[arg(long, value_name = "URL")]
    pub drive_token_uri: Option<String>,

    /// Drive credentials: a service-account key JSON or a token file from
    /// `driveblk auth login`. Also DRIVEBLK_DRIVE_CREDENTIALS (and
    /// DRIVEBLK_DRIVE_TOKEN for a static access token). Default: the
    /// login's token file under the config dir.
    #[arg(long, value_name = "FILE")]
    pub drive_credentials: Option<PathBuf>,

    /// OAuth scope: drive.file (files driveblk made) or drive (needed to
    /// attach an image uploaded another way). Also DRIVEBLK_DRIVE_SCOPE.
    #[arg(long, value_name = "SCOPE", value_parser = parse_scope)]
    pub drive_scope: Option<DriveScope>,

    /// Drive request pacing for the account: start at RATE requests/s with
    /// bursts of BURST, climb to MAX while requests queue and Drive does
    /// not refuse (without MAX the rate is fixed). Also
    /// DRIVEBLK_DRIVE_PACER. Default 20,100,200.
    #[arg(long, value_name = "RATE[,BURST[,MAX]]", value_parser = parse_pacer)]
    pub drive_pacer: Option<PacerConfig>,

    /// The key of an encrypted volume: a file holding it (any bytes; a
    /// random 32-byte file is best). Also DRIVEBLK_KEY_FILE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["key_env", "passphrase"])]
    pub key_file: Option<PathBuf>,

    /// The key of an encrypted volume: the environment variable holding it.
    #[arg(long, value_name = "VAR", conflicts_with = "passphrase")]
    pub key_env: Option<String>,

    /// The key of an encrypted volume: a passphrase, asked on the terminal.
    #[arg(long)]
    pub passphrase: bool,

    /// Let the volume read its base image at URL (as `info` shows it) even
    /// away from the volume: a `dir:` file outside the folder holding the
    /// volume or through a symbolic link, a file on another store. The
    /// volume's header is not authenticated, so such a base is read only
    /// when the user says so. Repeatable.
    #[arg(long, value_name = "URL")]
    pub allow_base: Vec<String>,
}

/// Parses one rate: `off`, or a size per second (`512K`, `10M`).
fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(None);
    }
    match parse_size(s)? {
        0 => Ok(None),
        n => Ok(Some(n)),
    }
}

/// Parses a `--bwlimit` value (see the flag's help).
pub fn parse_bwlimit(s: &str) -> Result<BwSchedule, String> {
    let mut entries = Vec::new();
    for part in s.split_whitespace() {
        let (from_minute, rates) = match part.split_once(',') {
            Some((hm, rates)) => {
                let (h, m) = hm.split_once(':').ok_or_else(|| format!("{hm:?} is not a time of day HH:MM"))?;
                let (h, m): (u32, u32) = (
                    h.parse().map_err(|_| format!("{hm:?} is not a time of day HH:MM"))?,
                    m.parse().map_err(|_| format!("{hm:?} is not a time of day HH:MM"))?,
                );
                if h > 23 || m > 59 {
                    return Err(format!("{hm:?} is not a time of day HH:MM"));
                }
                (h * 60 + m, rates)
            }
            None => (0, part),
        };
        let (up, down) = match rates.split_once(':') {
            Some((u, d)) => (parse_rate(u)?, parse_rate(d)?),
            None => {
                let r = parse_rate(rates)?;
                (r, r)
            }
        };
        // An upload attempt's deadline allows its body at this rate and no
        // slower: under a lower limit every attempt would time out while
        // paced, and be retried for ever.
        if let Some(u) = up.filter(|&u| u < crate::remote::retry::MIN_UPLOAD_RATE) {
            return Err(format!(
                "upload limit {u} bytes/s in {part:?} is below {} KiB/s, the slowest upload driveblk waits for",
                crate::remote::retry::MIN_UPLOAD_RATE >> 10
            ));
        }
        entries.push(BwEntry { from_minute, up, down });
    }
    if entries.is_empty() {
        return Err("empty --bwlimit".into());
    }
    Ok(BwSchedule { entries })
}

fn parse_scope(s: &str) -> Result<DriveScope, String> {
    DriveScope::parse(s).ok_or_else(|| format!("{s:?}: expected drive.file or drive"))
}

fn parse_pacer(s: &str) -> Result<PacerConfig, String> {
    PacerConfig::parse(s)
        .ok_or_else(|| format!("{s:?}: expected RATE[,BURST[,MAX]] with 0 < RATE <= MAX, e.g. 20,100,200"))
}

impl RemoteArgs {
    /// The remote options these arguments ask for.
    pub fn options(&self) -> RemoteOptions {
        let mut opts =
            RemoteOptions { config: Arc::new(self.config()), key: self.user_key(), ..RemoteOptions::default() };
        opts.allow_base = self.allow_base.clone();
        let shaping = (self.remote_latency_ms > 0 || self.remote_bandwidth_mbit > 0).then(|| Shaping {
            latency: Duration::from_millis(self.remote_latency_ms),
            bandwidth_bps: (self.remote_bandwidth_mbit > 0).then(|| self.remote_bandwidth_mbit * 1_000_000),
        });
        if let Some(sh) = shaping {
            opts.layer = Some(Arc::new(move |inner| ShapedRemote::wrap(inner, sh.clone(), FaultPlan::new(0))));
        }
        opts
    }

    /// The process's `--bwlimit` limiter, made once: every remote of every
    /// volume this command opens shares its clocks, and so does every
    /// other driveblk process of this host (`link_dir`).
    fn bwlimit(&self) -> BwLimit {
        static LIMIT: OnceLock<BwLimit> = OnceLock::new();
        LIMIT
            .get_or_init(|| {
                let Some(s) = self.bwlimit.clone() else { return BwLimit::default() };
                match super::cache_dir::link_dir() {
                    Ok(d) => BwLimit::host_wide(s, &d.join("bwlimit")),
                    Err(e) => {
                        tracing::warn!("--bwlimit holds for this process alone: {e:#}");
                        BwLimit::new(s)
                    }
                }
            })
            .clone()
    }
}

impl RemoteArgs {
    /// Where the volume key comes from: the flags, then DRIVEBLK_KEY_FILE
    /// (which may be set for every volume: `open_key` treats it apart).
    pub fn key_source(&self) -> Option<KeySource> {
        if let Some(p) = &self.key_file {
            return Some(KeySource::File(p.clone()));
        }
        if let Some(v) = &self.key_env {
            return Some(KeySource::Env(v.clone()));
        }
        if self.passphrase {
            return Some(KeySource::Prompt);
        }
        std::env::var_os("DRIVEBLK_KEY_FILE").filter(|v| !v.is_empty()).map(|p| KeySource::DefaultFile(p.into()))
    }

    /// The user's key, loaded once per process (a passphrase is asked
    /// once). A key that cannot be read ends the command: going on would
    /// only fail later with "key needed".
    fn user_key(&self) -> Option<Arc<UserKey>> {
        static LOADED: OnceLock<Option<Arc<UserKey>>> = OnceLock::new();
        let src = self.key_source()?;
        LOADED
            .get_or_init(|| match src.load() {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            })
            .clone()
    }

    /// The remote configuration: the environment, then these flags.
    pub fn config(&self) -> RemoteConfig {
        let mut c = RemoteConfig::from_env_or_default();
        let d = &mut c.drive;
        if let Some(u) = &self.drive_api_url {
            d.api_url = u.trim_end_matches('/').to_string();
        }
        if let Some(u) = &self.drive_token_uri {
            d.token_uri = Some(u.clone());
        }
        if let Some(p) = &self.drive_credentials {
            d.credentials = DriveCredentials::File(p.clone());
        }
        if let Some(s) = self.drive_scope {
            d.scope = s;
        }
        if let Some(p) = self.drive_pacer {
            d.pacer = p;
        }
        // Every process of this host on one account shares its request
        // budget (Drive limits the account, not the process).
        d.shared_pacer_dir = crate::cli::cache_dir::link_dir().ok();
        c.set_bwlimit(self.bwlimit());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwlimit_values_parse_like_rclone() {
        let s = parse_bwlimit("2M").unwrap();
        assert_eq!(s.entries, vec![BwEntry { from_minute: 0, up: Some(2 << 20), down: Some(2 << 20) }]);
        let s = parse_bwlimit("1M:off").unwrap();
        assert_eq!((s.entries[0].up, s.entries[0].down), (Some(1 << 20), None));
        let s = parse_bwlimit("08:00,512K 19:00,2M:10M 23:00,off").unwrap();
        assert_eq!(s.entries.len(), 3);
        assert_eq!(s.entries[1], BwEntry { from_minute: 19 * 60, up: Some(2 << 20), down: Some(10 << 20) });
        assert!(s.entries[2].up.is_none() && s.entries[2].down.is_none());
        assert!(parse_bwlimit("25:00,1M").is_err());
        assert!(parse_bwlimit("fast").is_err());
        // Uploads slower than an attempt's deadline allows never finish.
        assert!(parse_bwlimit("8K").unwrap_err().contains("below 16 KiB/s"));
        assert!(parse_bwlimit("08:00,1M:off 19:00,8K:off").is_err());
        assert!(parse_bwlimit("16K:4K").is_ok());
    }
}
