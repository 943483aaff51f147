//! `driveblk auth login|status` and `driveblk selftest`: signing a personal
//! Google account in with the user's own OAuth client (a redirect to a
//! listener on 127.0.0.1, or a headless paste-the-redirect-URL variant;
//! both with `state` and PKCE), showing which credentials are in use, and
//! checking Drive's behaviour. No token or secret is ever printed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    /// How long to wait for the browser to come back from Google (not
    /// with --headless).
    #[arg(long, value_name = "SECS", default_value_t = LOGIN_WAIT_SECS)]
    pub wait_secs: u64,
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

fn login(a: LoginArgs) -> anyhow::Result<()> {
    let secret = client(&a)?;
    let path = a.token_file.clone().or_else(default_token_file).context("no config dir: set HOME or --token-file")?;
    let rt = runtime()?;
    let refresh = if a.headless {
        rt.block_on(headless(&secret, a.scope))?
    } else {
        loopback(&rt, &secret, a.scope, Duration::from_secs(a.wait_secs))?
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

/// One sign-in attempt's secrets (Google's "OAuth 2.0 for iOS & Desktop
/// Apps"): the `state` Google echoes on its redirect, which ties the
/// redirect to this attempt (else any local process could hand us a code
/// for its own account: login CSRF), and the PKCE verifier whose S256
/// challenge the authorization request carries (a code caught on its way
/// back is useless without it). Each is 256 random bits in base64url: 43
/// characters, PKCE's minimum length, all in its unreserved alphabet.
struct Attempt {
    state: String,
    verifier: String,
}

/// What a redirect (or a pasted address) says about this attempt.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The authorization code.
    Code(String),
    /// Google ended the sign-in: `error` (and `error_description`).
    Refused(String),
    /// Not this attempt's redirect: no `state`, or another one.
    NotOurs,
    /// This attempt's state but neither a code nor an error.
    NoCode,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Attempt {
    fn new() -> Attempt {
        Attempt { state: b64url(&rand::random::<[u8; 32]>()), verifier: b64url(&rand::random::<[u8; 32]>()) }
    }

    /// BASE64URL(SHA256(verifier)), no padding: `code_challenge_method=S256`.
    fn challenge(&self) -> String {
        use sha2::Digest;
        b64url(&sha2::Sha256::digest(self.verifier.as_bytes()))
    }

    /// The authorization request: offline access (a refresh token), and
    /// consent asked again so Google sends one even after an earlier grant.
    fn auth_url(
        &self,
        secret: &yup_oauth2::ApplicationSecret,
        scope: DriveScope,
        redirect: &str,
    ) -> anyhow::Result<url::Url> {
        let mut url = url::Url::parse(&secret.auth_uri).context("bad auth URI")?;
        url.query_pairs_mut()
            .append_pair("client_id", &secret.client_id)
            .append_pair("redirect_uri", redirect)
            .append_pair("response_type", "code")
            .append_pair("scope", scope.url())
            .append_pair("code_challenge", &self.challenge())
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", &self.state)
            .append_pair("access_type", "offline")
            .append_pair("prompt", "select_account consent");
        Ok(url)
    }

    /// Reads a redirect's query string.
    fn answer(&self, query: &str) -> Answer {
        let get =
            |k: &str| url::form_urlencoded::parse(query.as_bytes()).find(|(n, _)| n == k).map(|(_, v)| v.into_owned());
        if get("state").as_deref() != Some(self.state.as_str()) {
            return Answer::NotOurs;
        }
        if let Some(e) = get("error") {
            return Answer::Refused(match get("error_description").filter(|d| !d.is_empty()) {
                Some(d) => format!("{e} ({d})"),
                None => e,
            });
        }
        get("code").filter(|c| !c.is_empty()).map_or(Answer::NoCode, Answer::Code)
    }

    /// Exchanges the code at the token endpoint (grant `authorization_code`
    /// with the PKCE verifier) for the refresh token.
    async fn exchange(
        &self,
        secret: &yup_oauth2::ApplicationSecret,
        code: &str,
        redirect: &str,
    ) -> anyhow::Result<String> {
        let http = reqwest::Client::new();
        let body = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("code_verifier", &self.verifier)
            .append_pair("client_id", &secret.client_id)
            .append_pair("client_secret", &secret.client_secret)
            .append_pair("redirect_uri", redirect)
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
}

/// The error for a sign-in Google ended with `error=` (the user clicked
/// Cancel, or the account may not use the app).
fn refused(why: &str) -> anyhow::Error {
    let hint = if why.starts_with("access_denied") {
        " (Cancel was clicked, or the account is not a test user of an OAuth app still in \"testing\")"
    } else {
        ""
    };
    anyhow::anyhow!("Google refused the sign-in: {why}{hint}; run `driveblk auth login` again")
}

/// How long `auth login` waits for the browser by default.
const LOGIN_WAIT_SECS: u64 = 600;

/// The loopback flow: listen on 127.0.0.1 (only) at a port the system
/// picks, send the browser to Google with `redirect_uri=http://127.0.0.1:PORT`,
/// and wait for the redirect that carries this attempt's state. Anything
/// else gets 400 and the wait goes on; `error=` ends the sign-in; so does
/// the wait running out.
fn loopback(
    rt: &tokio::runtime::Runtime,
    secret: &yup_oauth2::ApplicationSecret,
    scope: DriveScope,
    wait: Duration,
) -> anyhow::Result<String> {
    let server = tiny_http::Server::http("127.0.0.1:0").map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on 127.0.0.1 for Google's redirect ({e}); sign in with `driveblk auth login --headless`"
        )
    })?;
    let port = server.server_addr().to_ip().map(|a| a.port()).context("the loopback listener has no port")?;
    let redirect = format!("http://127.0.0.1:{port}");
    let attempt = Attempt::new();
    let url = attempt.auth_url(secret, scope, &redirect)?;
    println!("Open this URL in a browser on this machine and sign in:\n\n  {url}\n");
    eprintln!("Waiting up to {} for Google's redirect to {redirect} (Ctrl-C to stop).", minutes(wait));
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let req = match server.recv_timeout(left).context("the loopback listener failed")? {
            Some(r) => r,
            None => bail!(
                "no sign-in came back within {} (Google sends the browser to {redirect}, which must be this machine); run `driveblk auth login` again, or `driveblk auth login --headless` when the browser runs elsewhere",
                minutes(wait)
            ),
        };
        let query = req.url().split_once('?').map_or("", |(_, q)| q).to_string();
        match attempt.answer(&query) {
            Answer::NotOurs | Answer::NoCode => {
                respond(
                    req,
                    400,
                    "Not this sign-in",
                    "This address only takes Google's answer to the sign-in driveblk started.",
                );
            }
            Answer::Refused(why) => {
                respond(
                    req,
                    200,
                    "Sign-in not completed",
                    &format!("Google said: {why}. Nothing was saved; see the terminal."),
                );
                return Err(refused(&why));
            }
            Answer::Code(code) => {
                return match rt.block_on(attempt.exchange(secret, &code, &redirect)) {
                    Ok(r) => {
                        respond(req, 200, "Signed in", "driveblk is signed in. You can close this tab.");
                        Ok(r)
                    }
                    Err(e) => {
                        respond(req, 200, "Sign-in not completed", &format!("{e:#}. See the terminal."));
                        Err(e)
                    }
                };
            }
        }
    }
}

fn minutes(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Answers the browser with a small page (best effort: the browser may be gone).
fn respond(req: tiny_http::Request, status: u16, title: &str, text: &str) {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>driveblk: {t}</title></head><body style=\"font-family:sans-serif;margin:3em\"><h1>{t}</h1><p>{x}</p></body></html>",
        t = esc(title),
        x = esc(text)
    );
    let mut resp = tiny_http::Response::from_string(html).with_status_code(status);
    if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", "text/html; charset=utf-8") {
        resp = resp.with_header(h);
    }
    let _ = req.respond(resp);
}

/// Where the browser is sent after consent in the headless flow: a
/// loopback address that fails to load on the browser's machine, leaving
/// the code in its address bar for the user to paste.
const HEADLESS_REDIRECT: &str = "http://127.0.0.1:1/";

async fn headless(secret: &yup_oauth2::ApplicationSecret, scope: DriveScope) -> anyhow::Result<String> {
    let attempt = Attempt::new();
    let url = attempt.auth_url(secret, scope, HEADLESS_REDIRECT)?;
    println!("Open this URL in a browser on any machine and sign in:\n\n  {url}\n");
    println!("The browser then fails to load a page at 127.0.0.1. Copy the whole address from its address bar and paste it here:");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the pasted address")?;
    let code = code_from_paste(&attempt, &line)?;
    attempt.exchange(secret, &code, HEADLESS_REDIRECT).await
}

/// The authorization code from a pasted redirect address, which must carry
/// this attempt's state, or a bare code (PKCE ties that to this attempt).
fn code_from_paste(attempt: &Attempt, s: &str) -> anyhow::Result<String> {
    let s = s.trim();
    match url::Url::parse(s) {
        Ok(u) => match attempt.answer(u.query().unwrap_or("")) {
            Answer::Code(c) => Ok(c),
            Answer::Refused(why) => Err(refused(&why)),
            Answer::NotOurs => bail!(
                "the pasted address is not the answer to this sign-in (its `state` is missing or differs): open the URL printed above, sign in, and paste the address the browser then shows"
            ),
            Answer::NoCode => bail!("no `code=` in the pasted address; paste the whole address the browser ends on"),
        },
        Err(_) if !s.is_empty() && !s.contains(['?', '&', '=', ' ']) => Ok(s.to_string()),
        Err(_) => bail!("no `code=` in what was pasted; paste the whole address the browser ends on"),
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
    if let Some(dir) = &d.shared_pacer_dir {
        let base = d.api_url.trim_end_matches('/');
        let record = crate::remote::gdrive::pacer::Pacer::record_path(dir, &auth.account_key(base));
        println!("pacer:       shared by this host's processes on this account ({})", record.display());
    }
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
        let at = Attempt::new();
        let st = &at.state;
        let code = |s: &str| code_from_paste(&at, s).map_err(|e| e.to_string());
        assert_eq!(code(&format!("http://127.0.0.1:1/?code=4/0Ab-c&scope=x&state={st}\n")).as_deref(), Ok("4/0Ab-c"));
        assert_eq!(code(" 4/0Abc ").as_deref(), Ok("4/0Abc"));
        assert!(code("http://127.0.0.1:1/?code=4/0Ab-c&scope=x").unwrap_err().contains("state"));
        assert!(code("http://127.0.0.1:1/?code=4/0Ab-c&state=other").unwrap_err().contains("state"));
        let denied = code(&format!("http://127.0.0.1:1/?error=access_denied&state={st}")).unwrap_err();
        assert!(denied.contains("access_denied") && denied.contains("auth login"), "{denied}");
        assert!(code("").is_err());
    }

    /// RFC 7636 appendix B: the verifier `dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk`
    /// gives the S256 challenge `E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM`;
    /// state and verifier are 43 characters of PKCE's alphabet, fresh each time.
    #[test]
    fn gdrive_login_pkce_challenge_is_s256_of_the_verifier() {
        let at = Attempt { state: String::new(), verifier: "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into() };
        assert_eq!(at.challenge(), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let (a, b) = (Attempt::new(), Attempt::new());
        for s in [&a.state, &a.verifier] {
            assert_eq!(s.len(), 43);
            assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || b"-._~".contains(&c)), "{s}");
        }
        assert!(a.state != b.state && a.verifier != b.verifier && a.state != a.verifier);
    }
}
