//! `driveblk auth login` against the emulator's OAuth endpoints, with the
//! test as the browser: the loopback flow sends `state` and a PKCE (S256)
//! challenge to `http://127.0.0.1:PORT`, refuses a redirect that does not
//! carry its state (a local process pushing its own account's code) and
//! keeps waiting, ends at once naming Google's reason when consent is
//! denied, and gives up after its wait naming `--headless`; the headless
//! flow sends state and PKCE too.

mod gdrive_support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gdrive_support::{start, Creds, DriveEnv};

/// A running `driveblk auth login` that has printed its sign-in URL.
struct Login {
    child: Child,
    out: BufReader<ChildStdout>,
    printed: String,
    url: url::Url,
    tok: PathBuf,
    secret: String,
}

/// Starts `driveblk auth login` against the emulator with `extra`
/// arguments and reads up to the sign-in URL it prints. A hung login is
/// killed after two minutes so it cannot hang the test run.
fn login(env: &DriveEnv, extra: &[&str]) -> Login {
    let (cid, secret) = env.emu.oauth_client();
    let tok = env.dir.path().join("login/token.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["auth", "login", "--client-id", &cid, "--scope", "drive"])
        .args(["--auth-uri", &env.emu.auth_uri(), "--token-uri", &env.emu.token_uri()])
        .args(["--token-file", tok.to_str().unwrap()])
        .args(extra)
        .env("DRIVEBLK_OAUTH_CLIENT_SECRET", &secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::spawn(move || {
        for _ in 0..1200 {
            std::thread::sleep(Duration::from_millis(100));
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                return;
            }
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "login printed no URL: {printed}");
        printed.push_str(&line);
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break url::Url::parse(u).unwrap();
        }
    };
    assert!(url.as_str().starts_with(&env.emu.auth_uri()), "{url}");
    Login { child, out, printed, url, tok, secret }
}

impl Login {
    fn param(&self, k: &str) -> Option<String> {
        self.url.query_pairs().find(|(n, _)| n == k).map(|(_, v)| v.into_owned())
    }

    /// Waits up to `t` for the command to end; its exit status, stdout and stderr.
    fn finish(mut self, t: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + t;
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("auth login did not end within {t:?}: {}", self.printed);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.out, &mut rest).unwrap();
        self.printed.push_str(&rest);
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err).unwrap();
        (st, self.printed, err)
    }
}

/// The test's browser: follows no redirects, so each hop can be checked.
struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            http: reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap(),
        }
    }

    /// GETs `url`: the status and the `Location` header, if any.
    fn get(&self, url: &str) -> (u16, Option<String>) {
        let r = self.rt.block_on(self.http.get(url).send()).unwrap();
        let loc = r.headers().get("location").map(|l| l.to_str().unwrap().to_string());
        (r.status().as_u16(), loc)
    }

    /// Signs in at the emulator with the sign-in URL: where Google redirects the browser.
    fn consent(&self, url: &url::Url) -> String {
        let (status, loc) = self.get(url.as_str());
        assert_eq!(status, 302, "{url}");
        loc.unwrap()
    }
}

fn pkce_verified(env: &DriveEnv) -> u64 {
    env.emu.stats().requests.get("token pkce S256").copied().unwrap_or(0)
}

/// The loopback flow end to end: the sign-in URL carries a 128-bit+
/// `state`, an S256 challenge and `redirect_uri=http://127.0.0.1:PORT`;
/// Google's redirect (with the state echoed) completes it, the emulator
/// checks the verifier against the challenge, and the saved refresh token
/// (0600) then works. Nothing secret is printed.
#[test]
fn gdrive_auth_login_installed_app_flow() {
    let env = start(driveemu::Config::default(), Creds::User);
    let l = login(&env, &[]);
    assert_eq!(l.param("code_challenge_method").as_deref(), Some("S256"), "{}", l.url);
    assert!(l.param("code_challenge").is_some_and(|c| c.len() == 43), "{}", l.url);
    let state = l.param("state").unwrap_or_default();
    assert!(state.len() >= 22, "state too short to be 128 random bits: {}", l.url);
    let redirect = url::Url::parse(&l.param("redirect_uri").unwrap()).unwrap();
    assert_eq!(redirect.host_str(), Some("127.0.0.1"), "{redirect}");
    let b = Browser::new();
    let loc = b.consent(&l.url);
    assert!(loc.contains("code=") && loc.contains(&format!("state={state}")), "{loc}");
    let (status, _) = b.get(&loc);
    assert_eq!(status, 200, "the loopback listener answered {status}");
    let (tok, secret) = (l.tok.clone(), l.secret.clone());
    let (st, printed, err) = l.finish(Duration::from_secs(30));
    assert!(st.success(), "{printed}\n{err}");
    assert_eq!(pkce_verified(&env), 1, "the token request carried no matching code_verifier");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&tok).unwrap().permissions().mode() & 0o777, 0o600);
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    let refresh = saved["refresh_token"].as_str().unwrap().to_string();
    for s in [refresh.as_str(), secret.as_str()] {
        assert!(!printed.contains(s) && !err.contains(s), "a secret was printed");
    }
    // The saved grant works.
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["auth", "status"])
        .env("DRIVEBLK_DRIVE_API_URL", env.emu.base_url())
        .env("DRIVEBLK_DRIVE_CREDENTIALS", &tok)
        .env_remove("DRIVEBLK_DRIVE_TOKEN")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success() && text.contains("token:       ok") && text.contains("Drive:       reachable"),
        "{text}"
    );
}

/// Login CSRF: another local process sends the listener a code for its
/// own account (from its own authorization request, without our state),
/// or our redirect with the state changed. Each gets 400 and the command
/// keeps waiting; the user's real redirect then completes the sign-in.
#[test]
fn gdrive_auth_login_refuses_a_redirect_without_its_state() {
    let env = start(driveemu::Config::default(), Creds::User);
    let l = login(&env, &[]);
    let redirect = l.param("redirect_uri").unwrap();
    let b = Browser::new();
    // The attacker's own sign-in, redirected to our listener.
    let mut theirs = url::Url::parse(&env.emu.auth_uri()).unwrap();
    theirs
        .query_pairs_mut()
        .append_pair("client_id", &env.emu.oauth_client().0)
        .append_pair("redirect_uri", &redirect)
        .append_pair("response_type", "code")
        .append_pair("scope", "https://www.googleapis.com/auth/drive");
    let forged = b.consent(&theirs);
    assert!(forged.contains("code=") && !forged.contains("state="), "{forged}");
    assert_eq!(b.get(&forged).0, 400, "a code without our state was taken");
    let mut wrong = url::Url::parse(&forged).unwrap();
    wrong.query_pairs_mut().append_pair("state", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(b.get(wrong.as_str()).0, 400, "a code with another state was taken");
    assert_eq!(b.get(&format!("{redirect}/favicon.ico")).0, 400);
    std::thread::sleep(Duration::from_millis(300));
    let mut l = l;
    assert!(l.child.try_wait().unwrap().is_none(), "login ended on a foreign redirect");
    // The user's own redirect still completes it.
    let loc = b.consent(&l.url);
    assert_eq!(b.get(&loc).0, 200);
    let tok = l.tok.clone();
    let (st, printed, err) = l.finish(Duration::from_secs(30));
    assert!(st.success(), "{printed}\n{err}");
    assert!(tok.exists());
    assert_eq!(pkce_verified(&env), 1);
}

/// The user clicks Cancel: Google redirects with `error=access_denied`
/// (and our state). The command ends at once, non-zero, naming the reason
/// and the way out, and saves nothing.
#[test]
fn gdrive_auth_login_consent_denied_ends_naming_access_denied() {
    let env = start(driveemu::Config::default(), Creds::User);
    env.emu.faults().set_consent_denied(true);
    let l = login(&env, &[]);
    let b = Browser::new();
    let loc = b.consent(&l.url);
    assert!(loc.contains("error=access_denied"), "{loc}");
    b.get(&loc);
    let tok = l.tok.clone();
    let (st, printed, err) = l.finish(Duration::from_secs(10));
    assert!(!st.success(), "{printed}\n{err}");
    assert!(err.contains("access_denied") && err.contains("auth login"), "{err}");
    assert!(!tok.exists());
}

/// No browser ever comes back: the command gives up after its wait,
/// naming `--headless`, instead of waiting for ever.
#[test]
fn gdrive_auth_login_times_out_naming_headless() {
    let env = start(driveemu::Config::default(), Creds::User);
    let l = login(&env, &["--wait-secs", "1"]);
    let (st, printed, err) = l.finish(Duration::from_secs(20));
    assert!(!st.success(), "{printed}\n{err}");
    assert!(err.contains("--headless"), "{err}");
}

/// The headless flow: the printed URL carries state and an S256
/// challenge; a pasted address with another state is refused; the real
/// one is exchanged with the verifier.
#[test]
fn gdrive_auth_login_headless_uses_pkce_and_state() {
    let env = start(driveemu::Config::default(), Creds::User);
    let b = Browser::new();
    // A pasted address that is not from this sign-in.
    let mut l = login(&env, &["--headless"]);
    let mut loc = url::Url::parse(&b.consent(&l.url)).unwrap();
    let pairs: Vec<(String, String)> =
        loc.query_pairs().filter(|(k, _)| k != "state").map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    loc.query_pairs_mut().clear().extend_pairs(pairs).append_pair("state", "not-ours");
    writeln!(l.child.stdin.as_mut().unwrap(), "{loc}").unwrap();
    let (st, printed, err) = l.finish(Duration::from_secs(10));
    assert!(!st.success() && err.contains("state"), "{printed}\n{err}");
    // The real one.
    let mut l = login(&env, &["--headless"]);
    assert_eq!(l.param("code_challenge_method").as_deref(), Some("S256"), "{}", l.url);
    assert!(l.param("state").is_some_and(|s| s.len() >= 22), "{}", l.url);
    let loc = b.consent(&l.url);
    assert!(loc.starts_with("http://127.0.0.1:1/") && loc.contains("state="), "{loc}");
    writeln!(l.child.stdin.as_mut().unwrap(), "{loc}").unwrap();
    let tok = l.tok.clone();
    let (st, printed, err) = l.finish(Duration::from_secs(30));
    assert!(st.success(), "{printed}\n{err}");
    assert!(tok.exists());
    assert_eq!(pkce_verified(&env), 1);
}
