//! The control socket: a daemon serving a volume answers `status`, `sync`,
//! `hydrate`, `pin` and `drop-cache` on a unix socket (by default
//! `<socket>.ctl`), one JSON request per line, one JSON reply per line; and
//! the client side that `driveblk status|sync|hydrate|drop-cache` use to
//! find and ask it.
//!
//! Protocol (docs/systemd.md): `{"cmd":"status"}`, `{"cmd":"sync",
//! "timeout_secs":600}`, `{"cmd":"hydrate"}`, `{"cmd":"pin","profile":true,
//! "ranges":[[0,1048576]]}`, `{"cmd":"drop-cache"}`; replies
//! `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cli::serve::default_cache_dir;
use crate::cli::size::human;
use crate::cli::status::{self, DaemonStatus};

/// Longest request line accepted (requests are tiny).
const MAX_LINE: u64 = 64 << 10;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// One request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's status (`driveblk status --json` prints it).
    Status,
    /// Cut a generation now and wait until the changes flushed before the
    /// request are committed on the remote.
    Sync {
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Start downloading the whole volume into the SSD tier.
    Hydrate,
    /// Pin the newest boot profile's chunks and/or `[start, end)` byte
    /// ranges of the image (kept at every start) and start fetching them.
    Pin {
        #[serde(default)]
        profile: bool,
        #[serde(default)]
        ranges: Vec<[u64; 2]>,
    },
    /// Drop the clean data of the RAM and SSD tiers.
    DropCache,
}

/// The control socket's server, one thread accepting, one per connection.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The control socket path for a vhost socket: `<socket>.ctl`.
pub fn default_path(vhost_socket: &Path) -> PathBuf {
    let mut s = vhost_socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

impl ControlServer {
    /// Binds `path` (a stale socket is replaced, a live one refused), with
    /// `prepare` (owner, mode) run before the socket appears there.
    pub fn bind(path: &Path, prepare: &dyn Fn(&Path) -> anyhow::Result<()>) -> anyhow::Result<(UnixListener, PathBuf)> {
        Self::check_free(path)?;
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let l = UnixListener::bind(&tmp).with_context(|| format!("cannot listen on {}", path.display()))?;
        let moved = prepare(&tmp).and_then(|()| {
            crate::vhost::rename_noreplace(&tmp, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    anyhow!("control socket {} is in use by a running daemon", path.display())
                }
                _ => anyhow::Error::new(e).context(format!("cannot create {}", path.display())),
            })
        });
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok((l, path.to_path_buf()))
    }

    /// Fails unless a control socket can be bound at `path` (nothing
    /// there, or a socket nobody listens on).
    pub fn check_free(path: &Path) -> anyhow::Result<()> {
        match crate::vhost::socket_free(path) {
            Ok(()) => Ok(()),
            Err(crate::vhost::ServeError::SocketInUse { .. }) => {
                bail!("control socket {} is in use by a running daemon", path.display())
            }
            Err(crate::vhost::ServeError::NotASocket { .. }) => {
                bail!("{} exists and is not a socket; refusing to replace it", path.display())
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("control socket {}", path.display()))),
        }
    }

    /// Serves `status` on an already bound listener until [`stop`](Self::stop).
    pub fn start(listener: UnixListener, path: PathBuf, status: Arc<DaemonStatus>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new().name("driveblk-control".into()).spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    let _ = reply(&conn, Err(anyhow!("too many control connections")));
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                // Weak: an idle client must not keep the store alive after
                // serving ends (it saves the boot profile when dropped).
                let (status, active) = (Arc::downgrade(&status), active.clone());
                let spawned = std::thread::Builder::new().name("driveblk-control-conn".into()).spawn(move || {
                    serve_conn(conn, &status);
                    active.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    tracing::warn!("cannot start a control connection thread");
                }
            }
        })?;
        Ok(Self { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// Stops accepting and removes the socket file. Connections being
    /// served finish on their own.
    pub fn stop(self) {}
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_conn(conn: UnixStream, status: &std::sync::Weak<DaemonStatus>) {
    // An idle client must not hold a thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let _ = reply(&w, Err(anyhow!("request longer than {MAX_LINE} bytes")));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let Some(status) = status.upgrade() else {
            let _ = reply(&w, Err(anyhow!("the daemon is stopping")));
            return;
        };
        let res = serde_json::from_str::<Request>(&line)
            .map_err(|e| anyhow!("bad request: {e}"))
            .and_then(|req| execute(&req, &status));
        drop(status);
        if reply(&w, res).is_err() {
            return;
        }
    }
}

fn reply(mut w: &UnixStream, res: anyhow::Result<Value>) -> std::io::Result<()> {
    let v = match res {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    };
    let mut line = serde_json::to_vec(&v).unwrap_or_default();
    line.push(b'\n');
    w.write_all(&line)
}

fn execute(req: &Request, st: &DaemonStatus) -> anyhow::Result<Value> {
    let store = &st.store;
    match req {
        Request::Status => Ok(st.to_json()),
        Request::Sync { timeout_secs } => {
            let timeout = Duration::from_secs(timeout_secs.unwrap_or(3600));
            tracing::info!("sync requested");
            wait_synced(store, timeout, || {
                if st.phase() == status::Phase::Stopped {
                    bail!("the daemon stopped before the sync finished; run `driveblk sync` again");
                }
                Ok(())
            })
        }
        Request::Hydrate => {
            store.start_hydrate();
            let s = store.stats();
            Ok(json!({ "running": s.hydrating, "total": s.hydrate_total, "done": s.hydrate_done }))
        }
        Request::Pin { profile, ranges } => {
            if !profile && ranges.is_empty() {
                bail!("nothing to pin: give \"profile\": true and/or \"ranges\"");
            }
            if let Some([s, e]) = ranges.iter().find(|[s, e]| s >= e) {
                bail!("empty byte range [{s}, {e}) to pin");
            }
            tracing::info!(profile, ranges = ranges.len(), "pin requested");
            store.pin(&crate::tier::pins::Pins { ranges: ranges.clone(), profile: *profile }).context("cannot pin")?;
            let s = store.stats();
            Ok(json!({ "pinned": s.pinned_chunks, "pinned_local": s.pinned_local, "pinning": s.pinning }))
        }
        Request::DropCache => {
            let (ram, ssd) = store.drop_clean().context("cannot drop the cache")?;
            let s = store.stats();
            Ok(json!({ "ram_bytes_dropped": ram, "ssd_chunks_dropped": ssd,
                       "ssd_bytes": s.ssd_bytes, "ram_bytes": s.ram_bytes, "dirty_bytes": s.dirty_bytes }))
        }
    }
}

/// Cuts a generation of every write flushed so far and waits, up to
/// `timeout`, until it is committed, while the guest keeps running
/// (`driveblk sync`, and a stop's upload before it lets the guest go).
/// `check` runs every 100 ms; its error ends the wait.
pub fn wait_synced(
    store: &crate::tier::TieredStore,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let Some(before) = store.sync_status() else { bail!("the volume is served read-only: nothing to sync") };
    let t0 = Instant::now();
    store.request_sync();
    loop {
        let y = store.sync_status().unwrap_or_default();
        if let Some(c) = y.conflict {
            bail!("{c}");
        }
        let dirty = store.stats().dirty_bytes;
        // A cut taken after the request holds every write flushed
        // before it; with nothing dirty there is nothing to cut.
        if y.committed_cut > before.last_cut || (dirty == 0 && !y.uploading) {
            return Ok(json!({
                "generation": store.volume().generation(),
                "committed_cut": y.committed_cut,
                "dirty_bytes": dirty,
                "seconds": t0.elapsed().as_secs_f64(),
            }));
        }
        if t0.elapsed() >= timeout {
            bail!(
                "{} still not uploaded after {} s: {}",
                human(dirty),
                timeout.as_secs(),
                y.last_error.unwrap_or_else(|| "the upload is slow".into())
            );
        }
        check()?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one request to the daemon at `path` and returns its result.
pub fn request(path: &Path, req: &Request) -> anyhow::Result<Value> {
    request_within(path, req, reply_wait(req))
}

/// How long a client waits for the daemon's reply: a daemon that is hung
/// (stopped, stuck on a dead mount) must not hang `status` or `sync` with
/// it. A sync gets its own timeout, which the daemon keeps, and a margin.
fn reply_wait(req: &Request) -> Duration {
    match req {
        Request::Sync { timeout_secs } => Duration::from_secs(timeout_secs.unwrap_or(3600).saturating_add(30)),
        Request::Status | Request::Hydrate | Request::Pin { .. } | Request::DropCache => Duration::from_secs(60),
    }
}

fn request_within(path: &Path, req: &Request, wait: Duration) -> anyhow::Result<Value> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the control socket {}", path.display()))?;
    conn.set_read_timeout(Some(wait))?;
    conn.set_write_timeout(Some(wait))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    let mut r = BufReader::new(conn);
    let mut resp = String::new();
    match r.read_line(&mut resp) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            bail!("the daemon at {} did not answer within {} s: it may be hung", path.display(), wait.as_secs_f64())
        }
        r => r.context("the daemon closed the control connection")?,
    };
    let v: Value = serde_json::from_str(&resp).context("the daemon's reply is not JSON")?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("the daemon refused the request"))
    }
}

/// How a client names the daemon: its control socket, or the volume (its
/// cache directory's status file says where the socket is).
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The daemon's control socket (default: found through the volume's
    /// cache directory).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// The control socket of a live daemon serving from `cache_dir`, if any.
pub fn find(control: Option<&Path>, cache_dir: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = control {
        return Ok(Some(p.to_path_buf()));
    }
    let Some(dir) = cache_dir else { return Ok(None) };
    let Ok(v) = status::read(dir) else { return Ok(None) };
    if !v["running"].as_bool().unwrap_or(false) {
        return Ok(None);
    }
    let Some(p) = v["control_socket"].as_str().map(PathBuf::from) else { return Ok(None) };
    // A daemon killed -9 leaves "running" behind: trust only a live socket,
    // and only one whose daemon serves this cache's volume (another daemon
    // may have bound the same path since).
    if UnixStream::connect(&p).is_err() {
        return Ok(None);
    }
    let same = |live: &Value| ["url", "volume_id"].iter().all(|k| v[*k].is_null() || live[*k] == v[*k]);
    match request_within(&p, &Request::Status, Duration::from_secs(10)) {
        Ok(live) if same(&live) => Ok(Some(p)),
        Ok(live) => {
            tracing::warn!(
                socket = %p.display(),
                serves = %live["url"],
                "the control socket named in {} belongs to a daemon serving another volume now",
                dir.display()
            );
            Ok(None)
        }
        // A hung daemon: its commands say so themselves.
        Err(_) => Ok(Some(p)),
    }
}

/// The cache directory a client command means: `--cache-dir`, else the
/// volume's default one.
pub fn cache_dir_of(url: Option<&str>, cache_dir: Option<&Path>) -> Option<PathBuf> {
    cache_dir
        .map(Path::to_path_buf)
        .or_else(|| url.and_then(|u| default_cache_dir(u, &crate::volume::RemoteOptions::default()).ok()))
}

#[derive(Debug, Args)]
pub struct DropCacheArgs {
    /// The volume the daemon serves (finds its cache directory).
    #[arg(required_unless_present_any = ["cache_dir", "control"])]
    pub url: Option<String>,
    /// The cache directory given to `serve --cache-dir`.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print the daemon's JSON reply.
    #[arg(long)]
    pub json: bool,
}

/// `driveblk drop-cache`: the daemon drops the clean data of its RAM and
/// SSD tiers (local changes stay); later reads fetch it again.
pub fn drop_cache(a: DropCacheArgs) -> anyhow::Result<()> {
    let dir = cache_dir_of(a.url.as_deref(), a.cache_dir.as_deref());
    let Some(ctl) = find(a.control.control.as_deref(), dir.as_deref())? else {
        bail!("no running daemon serves this volume (no live control socket found; pass --control PATH)");
    };
    let v = request(&ctl, &Request::DropCache)?;
    if a.json {
        println!("{v}");
    } else {
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        println!(
            "dropped {} of RAM and {} SSD chunks; {} still cached on SSD, {} of local changes kept",
            human(u("ram_bytes_dropped")),
            u("ssd_chunks_dropped"),
            human(u("ssd_bytes")),
            human(u("dirty_bytes"))
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that accepts but never answers (stopped, hung) fails the
    /// request after the wait, not never.
    #[test]
    fn a_silent_daemon_fails_the_request_in_time() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ctl");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let held: Vec<UnixStream> = l.incoming().map_while(Result::ok).collect();
            drop(held);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let r = request_within(&p, &Request::Status, Duration::from_millis(300));
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        let got = rx.recv_timeout(Duration::from_secs(20)).expect("the client still waits on a silent daemon");
        assert!(got.unwrap_err().contains("did not answer within 0.3 s"));
        assert_eq!(reply_wait(&Request::Sync { timeout_secs: Some(600) }), Duration::from_secs(630));
    }
}
