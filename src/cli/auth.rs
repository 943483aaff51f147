//! `driveblk auth login|status` and `driveblk selftest`: signing a personal
//! Google account in with the user's own OAuth client (loopback redirect,
//! or a headless paste-the-redirect-URL variant), showing which
//! credentials are in use, and checking Drive's behaviour. No token or
//! secret is ever printed.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::cli::remote::RemoteArgs;
use crate::remote::config::{default_token_file, DriveScope, DEFAULT_AUTH_URI, DEFAULT_TOKEN_URI};
use crate::remote::gdrive::auth::{post_form, token_answer, Auth, AuthorizedUser};
use crate::remote::gdrive::{api_for, selftest};
use crate::remote::RemoteUrl;

/// Env var: the OAuth client id for `auth login`.
pub const ENV_CLIENT_ID: &str = "DRIVEBLK_OAUTH_CLIENT_ID";
/// Env var: the OAuth client secret for `auth login` (keeps it out of
/// shell history and `ps`).
pub const ENV_CLIENT_SECRET: &str = "DRIVEBLK_OAUTH_CLIENT_SECRET";

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Sign a Google account in and save its refresh token (0600) under
    /// the config dir.
    Login(LoginArgs),
    /// Show which Drive credentials are in use and whether they work.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Your OAuth client's id (a "Desktop app" client from your Google
    /// Cloud project). Also DRIVEBLK_OAUTH_CLIENT_ID.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Your OAuth client's secret. Prefer DRIVEBLK_OAUTH_CLIENT_SECRET or
    /// --client-secret-file.
    #[arg(long)]
    pub client_secret: Option<String>,
    /// The client's JSON as downloaded from the Cloud console.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["client_id", "client_secret"])]
    pub client_secret_file: Option<PathBuf>,
    /// drive.file (only files driveblk creates) or drive (also attach
    /// images uploaded another way).
    #[arg(long, default_value = "drive.file", value_parser = |s: &str| DriveScope::parse(s).ok_or("expected drive.file or drive"))]
    pub scope: DriveScope,
    /// No browser on this machine: print the sign-in URL, open it
    /// anywhere, then paste back the address the browser ends on.
    #[arg(long)]
    pub headless: bool,
    /// Where to save the token. Default: $XDG_CONFIG_HOME/driveblk/gdrive-token.json.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Authorization endpoint (tests, proxies).
    #[arg(long, value_name = "URL", default_value = DEFAULT_AUTH_URI)]
    pub auth_uri: String,
    /// Token endpoint. Default: the client file's, else Google's.
    #[arg(long, value_name = "URL")]
    pub token_uri: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// A Drive folder to test in (created if missing; test files are
    /// deleted afterwards), e.g. gdrive:/driveblk-selftest.
    pub url: String,
    /// Seconds to wait before using an id generated at the start (checks
    /// that generated ids stay valid).
    #[arg(long, default_value_t = 5)]
    pub id_age_secs: u64,
    /// Longest wait for a new file to show up in a listing.
    #[arg(long, default_value_t = 60)]
    pub listing_wait_secs: u64,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Runs `driveblk auth ...`.
pub fn run(cmd: AuthCommand) -> anyhow::Result<()> {
    match cmd {
        AuthCommand::Login(a) => login(a),
        AuthCommand::Status(a) => status(a),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")
}

fn client(a: &LoginArgs) -> anyhow::Result<yup_oauth2::ApplicationSecret> {
    let mut secret = match &a.client_secret_file {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            yup_oauth2::parse_application_secret(bytes)
                .with_context(|| format!("{} is not an OAuth client JSON (\"installed\" or \"web\")", p.display()))?
        }
        None => {
            let id = a.client_id.clone().or_else(|| std::env::var(ENV_CLIENT_ID).ok());
            let secret = a.client_secret.clone().or_else(|| std::env::var(ENV_CLIENT_SECRET).ok());
            let (Some(client_id), Some(client_secret)) = (id, secret) else {
                bail!(
                    "auth login needs your own OAuth client: --client-secret-file FILE, or --client-id and {ENV_CLIENT_SECRET} (see docs/drive.md, \"Set up\")"
                );
            };
            yup_oauth2::ApplicationSecret {
                client_id,
                client_secret,
                token_uri: DEFAULT_TOKEN_URI.into(),
                auth_uri: a.auth_uri.clone(),
                ..Default::default()
            }
        }
    };
    if let Some(t) = &a.token_uri {
        secret.token_uri = t.clone();
    }
    if a.auth_uri != DEFAULT_AUTH_URI || secret.auth_uri.is_empty() {
        secret.auth_uri = a.auth_uri.clone();
    }
    Ok(secret)
}

/// Captures the token yup-oauth2's installed flow obtains.
struct Capture(parking_lot::Mutex<Option<yup_oauth2::storage::TokenInfo>>);

#[async_trait::async_trait]
impl yup_oauth2::storage::TokenStorage for Capture {
    async fn set(
        &self,
        _scopes: &[&str],
        token: yup_oauth2::storage::TokenInfo,
    ) -> Result<(), yup_oauth2::storage::TokenStorageError> {
        *self.0.lock() = Some(token);
        Ok(())
    }
    async fn get(&self, _scopes: &[&str]) -> Option<yup_oauth2::storage::TokenInfo> {
        None
    }
}

fn login(a: LoginArgs) -> anyhow::Result<()> {
    let secret = client(&a)?;
    let path = a.token_file.clone().or_else(default_token_file).context("no config dir: set HOME or --token-file")?;
    let rt = runtime()?;
    let refresh = if a.headless {
        rt.block_on(headless(&secret, a.scope))?
    } else {
        let cap = Arc::new(Capture(parking_lot::Mutex::new(None)));
        struct Shared(Arc<Capture>);
        #[async_trait::async_trait]
        impl yup_oauth2::storage::TokenStorage for Shared {
            async fn set(
                &self,
                s: &[&str],
                t: yup_oauth2::storage::TokenInfo,
            ) -> Result<(), yup_oauth2::storage::TokenStorageError> {
                self.0.set(s, t).await
            }
            async fn get(&self, s: &[&str]) -> Option<yup_oauth2::storage::TokenInfo> {
                self.0.get(s).await
            }
        }
        rt.block_on(async {
            let auth = yup_oauth2::InstalledFlowAuthenticator::builder(
                secret.clone(),
                yup_oauth2::InstalledFlowReturnMethod::HTTPRedirect,
            )
            .force_account_selection(true)
            .with_storage(Box::new(Shared(cap.clone())))
            .build()
            .await
            .context("starting the sign-in flow")?;
            eprintln!("Opening a loopback listener for Google's redirect; sign in with the URL below.");
            auth.token(&[a.scope.url()]).await.map_err(|e| anyhow::anyhow!("sign-in failed: {e}"))?;
            anyhow::Ok(())
        })?;
        let token = cap.0.lock().take();
        token.and_then(|t| t.refresh_token).context(
            "Google sent no refresh token (it does so only at the first consent): revoke driveblk's access at myaccount.google.com/permissions and log in again",
        )?
    };
    let user = AuthorizedUser {
        kind: "authorized_user".into(),
        client_id: secret.client_id.clone(),
        client_secret: secret.client_secret.clone(),
        refresh_token: refresh,
        token_uri: Some(secret.token_uri.clone()),
        scope: Some(a.scope.url().into()),
    };
    user.save(&path).with_context(|| format!("saving {}", path.display()))?;
    println!("Signed in; token saved to {} (mode 0600).", path.display());
    if a.scope == DriveScope::File {
        println!("Scope drive.file: driveblk sees only files it created. To attach an image uploaded another way, log in with --scope drive.");
    }
    Ok(())
}

/// Where the browser is sent after consent in the headless flow: a
/// loopback address that fails to load on the browser's machine, leaving
/// the code in its address bar for the user to paste.
const HEADLESS_REDIRECT: &str = "http://127.0.0.1:1/";

async fn headless(secret: &yup_oauth2::ApplicationSecret, scope: DriveScope) -> anyhow::Result<String> {
    let mut url = url::Url::parse(&secret.auth_uri).context("bad auth URI")?;
    url.query_pairs_mut()
        .append_pair("client_id", &secret.client_id)
        .append_pair("redirect_uri", HEADLESS_REDIRECT)
        .append_pair("response_type", "code")
        .append_pair("scope", scope.url())
        .append_pair("access_type", "offline")
        .append_pair("prompt", "consent");
    println!("Open this URL in a browser on any machine and sign in:\n\n  {url}\n");
    println!("The browser then fails to load a page at 127.0.0.1. Copy the whole address from its address bar and paste it here:");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the pasted address")?;
    let code = code_from_paste(&line).context("no `code=` in what was pasted")?;
    let http = reqwest::Client::new();
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .append_pair("client_id", &secret.client_id)
        .append_pair("client_secret", &secret.client_secret)
        .append_pair("redirect_uri", HEADLESS_REDIRECT)
        .finish();
    let (status, bytes) = post_form(&http, &secret.token_uri, body).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    token_answer(status, &bytes, "sign-in").map_err(|e| anyhow::anyhow!("{e}"))?;
    #[derive(serde::Deserialize)]
    struct R {
        refresh_token: Option<String>,
    }
    serde_json::from_slice::<R>(&bytes).ok().and_then(|r| r.refresh_token).context(
        "Google sent no refresh token; revoke driveblk's access at myaccount.google.com/permissions and try again",
    )
}

/// The authorization code from a pasted redirect address (or a bare code).
pub fn code_from_paste(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    match url::Url::parse(s) {
        Ok(u) => u.query_pairs().find(|(k, _)| k == "code").map(|(_, v)| v.into_owned()),
        Err(_) if !s.contains(['?', '&', '=', ' ']) => Some(s.to_string()),
        Err(_) => None,
    }
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let cfg = a.remote.config();
    let d = &cfg.drive;
    println!("Drive API:   {}", d.api_url);
    println!("scope:       {}", d.scope.url());
    println!(
        "pacer:       {} requests/s, burst {}, climbing to {} requests/s",
        d.pacer.rate, d.pacer.burst, d.pacer.max_rate
    );
    let http = reqwest::Client::new();
    let auth = match Auth::from_config(d, http) {
        Ok(a) => a,
        Err(e) => {
            println!("credentials: none usable");
            bail!("{e}");
        }
    };
    println!("credentials: {}", auth.describe());
    let rt = runtime()?;
    match rt.block_on(auth.token()) {
        Ok(_) => println!("token:       ok (obtained; not shown)"),
        Err(e) => {
            println!("token:       FAILED");
            bail!("{e}");
        }
    }
    let api = api_for(d);
    match rt.block_on(api.get_file("root")) {
        Ok(_) => println!("Drive:       reachable"),
        Err(e) => println!("Drive:       {e}"),
    }
    Ok(())
}

/// Runs `driveblk selftest URL`.
pub fn selftest_cmd(a: SelftestArgs) -> anyhow::Result<()> {
    let url = RemoteUrl::parse(&a.url)?;
    let RemoteUrl::GDrive(loc) = url else { bail!("selftest checks Google Drive: give a gdrive: folder URL") };
    let cfg = a.remote.config();
    let rt = runtime()?;
    let opts = selftest::Options {
        id_age: std::time::Duration::from_secs(a.id_age_secs),
        listing_wait: std::time::Duration::from_secs(a.listing_wait_secs),
    };
    let report = rt.block_on(selftest::run(&loc, &cfg.drive, &opts));
    for c in &report {
        println!("{c}");
    }
    let failed = report.iter().filter(|c| !c.ok).count();
    println!("{} passed, {} failed", report.len() - failed, failed);
    if failed > 0 {
        bail!("{failed} Drive behaviour(s) differ from what driveblk relies on");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdrive_login_code_is_taken_from_the_pasted_address() {
        assert_eq!(code_from_paste("http://127.0.0.1:1/?code=4/0Ab-c&scope=x\n").as_deref(), Some("4/0Ab-c"));
        assert_eq!(code_from_paste(" 4/0Abc ").as_deref(), Some("4/0Abc"));
        assert_eq!(code_from_paste("http://127.0.0.1:1/?error=access_denied"), None);
        assert_eq!(code_from_paste(""), None);
    }
}
