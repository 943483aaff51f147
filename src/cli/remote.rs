//! Options shared by every command that talks to a remote: where Google
//! Drive is and how to authenticate to it, and link simulation for tests
//! and benchmarks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::remote::config::{DriveCredentials, DriveScope, PacerConfig};
use crate::remote::shaped::{FaultPlan, ShapedRemote, Shaping};
use crate::remote::RemoteConfig;
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

    /// Drive request pacing, RATE[,BURST] requests/s for the account.
    /// Also DRIVEBLK_DRIVE_PACER. Default 20,100.
    #[arg(long, value_name = "RATE[,BURST]", value_parser = parse_pacer)]
    pub drive_pacer: Option<PacerConfig>,
}

fn parse_scope(s: &str) -> Result<DriveScope, String> {
    DriveScope::parse(s).ok_or_else(|| format!("{s:?}: expected drive.file or drive"))
}

fn parse_pacer(s: &str) -> Result<PacerConfig, String> {
    PacerConfig::parse(s).ok_or_else(|| format!("{s:?}: expected RATE[,BURST] with RATE > 0, e.g. 20,100"))
}

impl RemoteArgs {
    /// The remote options these arguments ask for.
    pub fn options(&self) -> RemoteOptions {
        let mut opts = RemoteOptions { config: Arc::new(self.config()), ..RemoteOptions::default() };
        if self.remote_latency_ms > 0 || self.remote_bandwidth_mbit > 0 {
            let shaping = Shaping {
                latency: Duration::from_millis(self.remote_latency_ms),
                bandwidth_bps: (self.remote_bandwidth_mbit > 0).then(|| self.remote_bandwidth_mbit * 1_000_000),
            };
            opts.layer = Some(Arc::new(move |inner| ShapedRemote::wrap(inner, shaping.clone(), FaultPlan::new(0))));
        }
        opts
    }
}

impl RemoteArgs {
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
        c
    }
}
