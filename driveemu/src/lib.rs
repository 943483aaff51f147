//! driveemu: a Google Drive API v3 emulator on loopback, for driveblk's tests and benchmarks.
//!
//! It serves the paths of `https://www.googleapis.com` (`/drive/v3/...`, `/upload/drive/v3/...`)
//! and a stand-in for `https://oauth2.googleapis.com/token` at `{base}/token`, over plain HTTP
//! on 127.0.0.1, with faults that can be dialled in while it runs. It is written to Google's
//! documentation, not to any one client. State is in memory; file bytes may live on disk
//! (`Config::data_dir`).

// Errors are the rare path of a test tool; boxing them would only add noise.
#![allow(clippy::result_large_err)]

mod auth;
mod error;
mod faults;
mod http;
mod keys;
mod query;
mod spill;
mod store;
mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rand::SeedableRng;

pub use faults::{Faults, RateLimit, Stats};

/// How the emulator behaves from the start; `Faults` changes most of it later.
#[derive(Debug, Clone)]
pub struct Config {
    /// Added to every request before it is handled.
    pub latency: Duration,
    /// A uniformly random extra of up to this much per request.
    pub jitter: Duration,
    /// Bits per second, shared by all media transfers as one link; None = unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Per-user request quota; over it Drive answers 403 userRateLimitExceeded or 429.
    pub rate_limit: Option<RateLimit>,
    /// Lifetime of issued access tokens (Google: 3600 s).
    pub token_lifetime: Duration,
    /// New files stay out of files.list for this long; files.get by id sees them at once.
    pub listing_lag: Duration,
    /// Seeds ids, tokens and fault dice.
    pub seed: u64,
    /// Keep file bytes of 64 KiB and more in unlinked files here instead of in memory, so
    /// images larger than RAM fit (the kernel's page cache holds what is read).
    pub data_dir: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth_bps: None,
            rate_limit: None,
            token_lifetime: Duration::from_secs(3600),
            listing_lag: Duration::ZERO,
            seed: 0x5eed_d21e,
            data_dir: None,
        }
    }
}

/// Everything the request handlers share.
pub(crate) struct Shared {
    pub cfg: Config,
    pub faults: Faults,
    pub stats: faults::StatsCell,
    pub link: faults::Link,
    pub store: Mutex<store::Store>,
    pub sessions: Mutex<HashMap<String, http::Session>>,
    pub auth: auth::Auth,
    pub rng: Mutex<rand::rngs::StdRng>,
    pub base_url: String,
    /// Where large file bytes go (`Config::data_dir`); None keeps them in memory.
    pub spill: Option<spill::Spill>,
}

impl Shared {
    /// File bytes as the store should keep them: on disk when a data directory is set.
    pub fn keep(&self, data: Bytes) -> Result<Bytes, error::ApiError> {
        match &self.spill {
            Some(s) => s.keep(data),
            None => Ok(data),
        }
    }

    pub fn token_uri(&self) -> String {
        format!("{}/token", self.base_url)
    }
}

enum Runner {
    /// Started on the caller's runtime.
    Task,
    /// Started on a runtime thread of its own.
    Thread(std::thread::JoinHandle<()>),
}

/// See [`Emulator::fault_handle`].
#[derive(Clone)]
pub struct FaultHandle(Arc<Shared>);

impl FaultHandle {
    pub fn faults(&self) -> &Faults {
        &self.0.faults
    }
}

/// A running emulator. Dropping it stops it.
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    runner: Option<Runner>,
}

fn make_shared(cfg: Config, addr: SocketAddr) -> std::io::Result<Arc<Shared>> {
    let seed = cfg.seed;
    let spill = cfg.data_dir.as_deref().map(spill::Spill::new).transpose()?;
    Ok(Arc::new(Shared {
        faults: Faults::new(&cfg),
        stats: Default::default(),
        link: faults::Link::new(),
        store: Mutex::new(store::Store::new(rand::rngs::StdRng::seed_from_u64(seed))),
        sessions: Mutex::new(HashMap::new()),
        auth: auth::Auth::new(rand::rngs::StdRng::seed_from_u64(seed ^ 0xa17)),
        rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed ^ 0xfa17)),
        base_url: format!("http://{addr}"),
        spill,
        cfg,
    }))
}

impl Emulator {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub async fn start(cfg: Config) -> std::io::Result<Emulator> {
        Self::start_on("127.0.0.1:0".parse().expect("literal address"), cfg).await
    }

    /// Like `start`, on a chosen address (the binary's `--listen`).
    pub async fn start_on(addr: SocketAddr, cfg: Config) -> std::io::Result<Emulator> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = make_shared(cfg, addr)?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(http::serve(listener, shared.clone(), rx));
        Ok(Emulator { shared, addr, stop: Some(tx), runner: Some(Runner::Task) })
    }

    /// Starts on a runtime thread of its own, for synchronous tests.
    pub fn start_blocking(cfg: Config) -> std::io::Result<Emulator> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = make_shared(cfg, addr)?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sh = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new().name("driveemu".into()).spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        http::serve(l, sh, rx).await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
        ready_rx.recv().map_err(|_| std::io::Error::other("emulator thread died"))??;
        Ok(Emulator { shared, addr, stop: Some(tx), runner: Some(Runner::Thread(handle)) })
    }

    /// `http://127.0.0.1:PORT`; the API is under `{base}/drive/v3`, uploads under `{base}/upload/drive/v3`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `{base}/token`, standing in for `https://oauth2.googleapis.com/token`.
    pub fn token_uri(&self) -> String {
        self.shared.token_uri()
    }

    /// A service-account key file in Google's format whose key the emulator accepts.
    pub fn service_account_key_json(&self) -> String {
        let a = &self.shared.auth;
        let email = &a.client_email;
        let v = serde_json::json!({
            "type": "service_account",
            "project_id": "driveemu-test",
            "private_key_id": a.private_key_id,
            "private_key": keys::SERVICE_ACCOUNT_KEY_PEM,
            "client_email": email,
            "client_id": a.sa_client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!("https://www.googleapis.com/robot/v1/metadata/x509/{}", email.replace('@', "%40")),
            "universe_domain": "googleapis.com",
        });
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// `{base}/o/oauth2/v2/auth`, standing in for `https://accounts.google.com/o/oauth2/v2/auth`
    /// (the installed-app flow's authorization endpoint; `/o/oauth2/auth` works too).
    pub fn auth_uri(&self) -> String {
        format!("{}/o/oauth2/v2/auth", self.shared.base_url)
    }

    /// (client_id, client_secret) of the "installed app" OAuth client the emulator knows.
    pub fn oauth_client(&self) -> (String, String) {
        (self.shared.auth.oauth_client_id.clone(), self.shared.auth.oauth_client_secret.clone())
    }

    /// A refresh token for that client, as if the user had signed in.
    pub fn issue_refresh_token(&self) -> String {
        self.shared.auth.issue_refresh_token(&self.shared.faults)
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// A handle to the faults that can move into closures and threads (a
    /// test hook that changes a fault at an exact point of a client's work).
    pub fn fault_handle(&self) -> FaultHandle {
        FaultHandle(self.shared.clone())
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.0.lock().clone()
    }

    /// Stops serving and closes every connection.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(Runner::Thread(h)) = self.runner.take() {
            let _ = h.join();
        }
    }

    /// My Drive's root folder id (the `root` alias).
    pub fn root_folder_id(&self) -> String {
        self.shared.store.lock().root_id.clone()
    }

    /// Creates a shared drive (as an admin would in the web UI); returns its id, which is
    /// also the id of its root folder.
    pub fn create_shared_drive(&self, name: &str) -> String {
        self.shared.store.lock().create_drive(name).id
    }

    /// Uploads a file as a person would in the Drive web UI (no auth, no faults). An
    /// unknown parent falls back to My Drive's root. Visible to files.list at once.
    pub fn ui_upload(&self, parent_id: &str, name: &str, data: &[u8]) -> String {
        let mut st = self.shared.store.lock();
        let parent = if st.files.contains_key(st.canon(parent_id)) {
            st.canon(parent_id).to_string()
        } else {
            st.root_id.clone()
        };
        let meta = store::NewFile { name: Some(name.to_string()), parents: vec![parent], ..Default::default() };
        st.create(meta, Some(Bytes::copy_from_slice(data)), true, Duration::ZERO, None).unwrap_or_default()
    }

    /// Creates a folder as a person would in the web UI.
    pub fn ui_create_folder(&self, parent_id: &str, name: &str) -> String {
        let mut st = self.shared.store.lock();
        let parent = if st.files.contains_key(st.canon(parent_id)) {
            st.canon(parent_id).to_string()
        } else {
            st.root_id.clone()
        };
        let meta = store::NewFile {
            name: Some(name.to_string()),
            parents: vec![parent],
            mime_type: Some(store::FOLDER_MIME.into()),
            ..Default::default()
        };
        st.create(meta, None, true, Duration::ZERO, None).unwrap_or_default()
    }

    /// Items whose name starts with `prefix`, trashed ones too, as the web
    /// UI's search finds them: (id, name, trashed), sorted by name.
    pub fn ui_find(&self, prefix: &str) -> Vec<(String, String, bool)> {
        let st = self.shared.store.lock();
        let mut out: Vec<_> = st
            .files
            .values()
            .filter(|f| !f.is_root && f.name.starts_with(prefix))
            .map(|f| (f.id.clone(), f.name.clone(), f.trashed))
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    /// Moves an item (and what is below it) to the trash. Unknown ids are ignored.
    pub fn ui_trash(&self, id: &str) {
        let mut st = self.shared.store.lock();
        let id = st.canon(id).to_string();
        if st.files.get(&id).is_some_and(|f| !f.is_root) {
            st.set_trashed(&id, true);
        }
    }

    /// Restores an item from the trash. Unknown ids are ignored.
    pub fn ui_restore(&self, id: &str) {
        let mut st = self.shared.store.lock();
        let id = st.canon(id).to_string();
        if st.files.contains_key(&id) {
            st.set_trashed(&id, false);
        }
    }

    /// Renames an item (a metadata change: its `version` goes up).
    pub fn ui_rename(&self, id: &str, name: &str) {
        let mut st = self.shared.store.lock();
        if let Ok(f) = st.get_mut(id, true) {
            f.name = name.to_string();
            f.version += 1;
            f.modified_ms = util::now_ms();
        }
    }

    /// Moves an item into another folder (the web UI's Move, or a drag):
    /// its id and name stay, its parent changes, a metadata change. An item
    /// moved into a trashed folder is trashed with it, and one moved out of
    /// one is not any more (unless trashed itself). Unknown ids are ignored.
    pub fn ui_move(&self, id: &str, new_parent: &str) {
        let mut st = self.shared.store.lock();
        let (id, parent) = (st.canon(id).to_string(), st.canon(new_parent).to_string());
        if st.files.get(&parent).is_none_or(|p| p.mime_type != store::FOLDER_MIME) {
            return;
        }
        if let Some(f) = st.files.get_mut(&id).filter(|f| !f.is_root) {
            f.parents = vec![parent];
            f.version += 1;
            f.modified_ms = util::now_ms();
        }
        st.inherit_trash(&id);
    }

    /// Replaces an item's bytes (a new head revision).
    pub fn ui_replace_content(&self, id: &str, data: &[u8]) {
        let _ = self.shared.store.lock().replace_content(id, Bytes::copy_from_slice(data), true, false, None);
    }

    /// Drive's automatic purge of old revisions ("revisions are purged 30
    /// days after newer content is uploaded unless keepForever"), done now:
    /// every revision but the head that is not kept forever is deleted.
    /// Answers how many were purged.
    pub fn ui_purge_revisions(&self, id: &str) -> usize {
        let mut st = self.shared.store.lock();
        let Ok(f) = st.get_mut(id, true) else { return 0 };
        let head = f.revisions.last().map(|r| r.id.clone());
        let before = f.revisions.len();
        f.revisions.retain(|r| r.keep_forever || Some(&r.id) == head.as_ref());
        before - f.revisions.len()
    }

    /// Whether revision `rev` of a file is marked keepForever (None: no such revision).
    pub fn ui_revision_kept(&self, id: &str, rev: &str) -> Option<bool> {
        let st = self.shared.store.lock();
        st.get(id, true).ok().and_then(|f| f.revisions.iter().find(|r| r.id == rev).map(|r| r.keep_forever))
    }

    /// Deletes one revision (Drive web UI: Manage versions, Delete); the last
    /// one is never deleted. The head becomes the newest left.
    pub fn ui_delete_revision(&self, id: &str, rev: &str) {
        let mut st = self.shared.store.lock();
        if let Ok(f) = st.get_mut(id, true) {
            if f.revisions.len() > 1 {
                f.revisions.retain(|r| r.id != rev);
                if let Some(last) = f.revisions.last() {
                    f.content = Some(last.content.clone());
                }
            }
        }
    }

    /// The head revision id of a file.
    pub fn ui_head_revision(&self, id: &str) -> Option<String> {
        let st = self.shared.store.lock();
        st.get(id, true).ok().and_then(|f| f.head_revision_id().map(str::to_string))
    }

    /// Deletes an item for good (as emptying the trash does).
    pub fn ui_delete(&self, id: &str) {
        let mut st = self.shared.store.lock();
        let id = st.canon(id).to_string();
        if st.files.get(&id).is_some_and(|f| !f.is_root) {
            st.delete(&id);
        }
    }

    /// Flags a file as malware/spam: downloads then need `acknowledgeAbuse=true`.
    pub fn ui_flag_abuse(&self, id: &str) {
        if let Ok(f) = self.shared.store.lock().get_mut(id, true) {
            f.abusive = true;
        }
    }

    /// The owner turns downloading off for viewers and commenters (the
    /// file's share settings): for a file shared with the user as a reader
    /// ([`Self::ui_make_read_only`]) `capabilities.canDownload` turns false,
    /// and its downloads and copies answer 403.
    pub fn ui_restrict_download(&self, id: &str) {
        if let Ok(f) = self.shared.store.lock().get_mut(id, true) {
            f.download_restricted = true;
        }
    }

    /// Makes an item read-only for the user (as if shared with them as a reader): every
    /// write to it, or into it if a folder, answers 403 insufficientFilePermissions.
    pub fn ui_make_read_only(&self, id: &str) {
        if let Ok(f) = self.shared.store.lock().get_mut(id, true) {
            f.read_only = true;
        }
    }

    /// Every byte the emulator holds for files, bypassing the API (for
    /// assertions): each file's name with its current content and every
    /// kept revision's, trashed files included, and the bytes of upload
    /// sessions not finished yet (named `upload session`).
    pub fn ui_all_bytes(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        {
            let st = self.shared.store.lock();
            for f in st.files.values() {
                if let Some(c) = &f.content {
                    out.push((f.name.clone(), c.data.to_vec()));
                }
                for r in &f.revisions {
                    out.push((format!("{} revision {}", f.name, r.id), r.content.data.to_vec()));
                }
            }
        }
        for s in self.shared.sessions.lock().values() {
            out.push(("upload session".into(), s.buffered().to_vec()));
        }
        out
    }

    /// A file's current bytes, bypassing the API (for assertions).
    pub fn ui_content(&self, id: &str) -> Option<Vec<u8>> {
        let st = self.shared.store.lock();
        st.get(id, true).ok().and_then(|f| f.content.as_ref().map(|c| c.data.to_vec()))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop_now();
    }
}
