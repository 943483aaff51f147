//! Serving a disk on a vhost-user socket: owns the listening socket, serves
//! one frontend at a time with a fresh `VhostUserDaemon` per connection
//! (a daemon cannot be reused after its frontend leaves), and shuts down
//! cleanly on request: in-flight requests finish, the disk is flushed and
//! closed, the socket file is removed.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::format::{Disk, IoMode};
use crate::vhost::backend::BlockBackend;
use crate::vhost::config::DeviceConfig;
use crate::vhost::pool::IoPool;
use crate::vhost::ratelimit::LogLimiter;
use crate::vhost::request::GuestMem;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {path} is in use by a running daemon; stop it or choose another --socket")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user: {0}")]
    Vhost(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Asks a running [`Server`] to stop; cheap to clone, usable from a signal
/// thread.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

struct StopState {
    requested: AtomicBool,
    wake: EventNotifier,
    /// The connection being served and its backend.
    current: Mutex<Option<(ShutdownHandle, BlockBackend)>>,
    /// How long the requests in flight get to complete before the frontend
    /// is let go ([`DeviceConfig::stop_drain`]).
    drain: Duration,
}

impl StopHandle {
    /// Requests shutdown: the current frontend's requests in flight complete
    /// while it is still connected (no new ones are taken), then it is
    /// disconnected; the server returns once the disk is closed. Blocks
    /// for that first step, at most [`DeviceConfig::stop_drain`].
    pub fn stop(&self) {
        self.inner.requested.store(true, Ordering::Release);
        let _ = self.inner.wake.notify();
        let current = self.inner.current.lock().clone();
        if let Some((h, backend)) = current {
            backend.drain(self.inner.drain);
            h.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }
}

/// A vhost-user-blk server for one disk on one socket.
pub struct Server {
    disk: Arc<dyn Disk>,
    cfg: DeviceConfig,
    socket: PathBuf,
    listener: Listener,
    pool: Arc<IoPool>,
    stop: StopHandle,
    wake: EventConsumer,
}

impl Server {
    /// Binds the socket (replacing a stale socket file, refusing a live one)
    /// and starts the I/O pool.
    pub fn bind(disk: Arc<dyn Disk>, cfg: DeviceConfig, socket: &Path) -> Result<Self, ServeError> {
        Self::bind_with(disk, cfg, socket, &|_| Ok(()))
    }

    /// Like [`bind`](Self::bind), with `prepare` run on the listening socket
    /// (owner, mode) before it appears at `socket`: it is bound under a
    /// temporary name and renamed, so nobody connects before `prepare`.
    pub fn bind_with(
        disk: Arc<dyn Disk>,
        cfg: DeviceConfig,
        socket: &Path,
        prepare: &dyn Fn(&Path) -> io::Result<()>,
    ) -> Result<Self, ServeError> {
        let listener = bind_socket(socket, prepare)?;
        // Room for every request the queues' in-flight caps let through.
        let pool = Arc::new(IoPool::new(cfg.io_threads, usize::from(cfg.num_queues) * usize::from(cfg.queue_size))?);
        let (wake, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let stop = StopHandle {
            inner: Arc::new(StopState {
                requested: AtomicBool::new(false),
                wake: notifier,
                current: Mutex::new(None),
                drain: cfg.stop_drain,
            }),
        };
        Ok(Self { disk, cfg, socket: socket.to_path_buf(), listener: Listener::from(listener), pool, stop, wake })
    }

    /// A handle that stops the server from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves frontends one after another until stopped, then flushes and
    /// closes the disk and removes the socket.
    pub fn run(mut self) -> Result<(), ServeError> {
        let result = self.serve_loop();
        self.pool.shutdown();
        let close = self.disk.close();
        let _ = fs::remove_file(&self.socket);
        if let Err(e) = &close {
            tracing::error!("closing the image failed: {e}");
        }
        result?;
        close.map_err(|e| ServeError::Io(io::Error::other(e.to_string())))
    }

    fn serve_loop(&mut self) -> Result<(), ServeError> {
        loop {
            if !self.wait_for_frontend()? {
                return Ok(());
            }
            let backend = BlockBackend::new(self.disk.clone(), self.cfg.clone(), self.pool.clone())?;
            let mem = GuestMemoryAtomic::new(GuestMem::new());
            let mut daemon = VhostUserDaemon::new("driveblk".into(), backend.clone(), mem)
                .map_err(|e| ServeError::Vhost(e.to_string()))?;
            backend.register_resume(&daemon.get_epoll_handlers())?;
            if let Err(e) = daemon.start(&mut self.listener) {
                tracing::warn!("frontend connection failed: {e}");
                backend.stop_workers();
                continue;
            }
            tracing::info!("frontend connected");
            let refuser = Refuser::start(&self.listener, &self.socket)
                .inspect_err(|e| tracing::warn!("cannot watch the socket for other frontends: {e}"))
                .ok();
            *self.stop.inner.current.lock() = daemon.shutdown_handle().map(|h| (h, backend.clone()));
            // A stop requested between the accept and storing the handle.
            if self.stop.requested() {
                backend.drain(self.stop.inner.drain);
                daemon.request_shutdown();
            }
            let res = daemon.wait();
            if let Some(r) = refuser {
                r.stop();
            }
            self.stop.inner.current.lock().take();
            backend.wait_idle();
            backend.stop_workers();
            match res {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
                )) => tracing::info!("frontend disconnected"),
                Err(e) => tracing::warn!("frontend connection ended: {e}"),
            }
            // The guest may be gone for good: make its writes durable now.
            if let Err(e) = self.disk.flush(IoMode::Blocking) {
                tracing::error!("flush after disconnect failed: {e}");
            }
            if self.stop.requested() {
                return Ok(());
            }
        }
    }

    /// Blocks until a frontend is waiting to be accepted (true) or a stop was
    /// requested (false).
    fn wait_for_frontend(&self) -> Result<bool, ServeError> {
        loop {
            if self.stop.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of two pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if fds[1].revents != 0 {
                let _ = self.wake.consume();
                continue;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }
}

/// While a frontend is served, others that connect to the socket are
/// accepted and closed at once, with a warning: left in the backlog, a
/// second VM's QEMU would wait in silence (no timeout) and get the disk the
/// moment the first VM leaves, two VMs on one disk in sequence without
/// anyone knowing.
struct Refuser {
    done: EventNotifier,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refuser {
    fn start(listener: &Listener, socket: &Path) -> io::Result<Self> {
        // SAFETY: dup of a listening socket this server owns; the copy is
        // owned by the thread.
        let fd = unsafe { libc::dup(listener.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (consumer, done) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let socket = socket.display().to_string();
        let thread = std::thread::Builder::new()
            .name("driveblk-refuse".into())
            .spawn(move || refuse_others(fd, consumer, &socket))?;
        Ok(Self { done, thread: Some(thread) })
    }

    fn stop(mut self) {
        let _ = self.done.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refuse_others(listener: OwnedFd, done: EventConsumer, socket: &str) {
    let limit = LogLimiter::new(1, Duration::from_secs(10));
    loop {
        match poll_in(&[done.as_raw_fd(), listener.as_raw_fd()], -1) {
            Ok([false, true]) => {}
            Ok([false, false]) => continue,
            _ => return,
        }
        // The frontend served may be on its way out (a probe that connects
        // and closes, the VM's QEMU restarted): if serving ends within a
        // second, the newcomer is the next frontend, not a second one.
        if !matches!(poll_in(&[done.as_raw_fd()], 1000), Ok([false])) {
            return;
        }
        // SAFETY: accept on a listening socket we own; the new descriptor
        // is owned (and closed) right here.
        let conn = unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from accept4.
        drop(unsafe { OwnedFd::from_raw_fd(conn) });
        if let Some(suppressed) = limit.allow() {
            tracing::warn!(
                suppressed,
                "another frontend connected to {socket} while one is served: refused (one disk serves one VM)"
            );
        }
    }
}

/// Polls `fds` for input (`timeout_ms`, -1: no limit); which are readable.
fn poll_in<const N: usize>(fds: &[RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    loop {
        // SAFETY: p is a valid array of N pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(p.map(|f| f.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether a socket can be bound at `path`: nothing there, or a socket
/// file nobody listens on (left by a crash). A live socket or a file that
/// is not a socket is refused. `serve` asks before opening a volume, so a
/// second daemon given a used path touches no volume.
pub fn socket_free(path: &Path) -> Result<(), ServeError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if socket_is_live(path) {
                return Err(ServeError::SocketInUse { path: path.to_path_buf() });
            }
            Ok(())
        }
        Ok(_) => Err(ServeError::NotASocket { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Binds a listening socket at `path` (see [`socket_free`]): bound under a
/// temporary name, prepared (owner, mode), then moved into place, so QEMU
/// never connects to a socket it may not use.
fn bind_socket(path: &Path, prepare: &dyn Fn(&Path) -> io::Result<()>) -> Result<UnixListener, ServeError> {
    socket_free(path)?;
    if fs::symlink_metadata(path).is_ok() {
        tracing::info!(path = %path.display(), "replacing stale socket file");
        fs::remove_file(path)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|source| ServeError::Bind { path: path.to_path_buf(), source })?;
    let ready = prepare(&tmp).and_then(|()| rename_noreplace(&tmp, path));
    if let Err(source) = ready {
        let _ = fs::remove_file(&tmp);
        if source.kind() == io::ErrorKind::AlreadyExists {
            // Another daemon given the same path bound it meanwhile.
            return Err(ServeError::SocketInUse { path: path.to_path_buf() });
        }
        return Err(ServeError::Bind { path: path.to_path_buf(), source });
    }
    Ok(l)
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`:
/// two daemons started at once with one socket path must not take each
/// other's socket. Falls back to a plain rename where the filesystem
/// cannot do it.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(rustix::fs::CWD, from, rustix::fs::CWD, to, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => fs::rename(from, to),
        Err(e) => Err(e.into()),
    }
}

/// True if some process listens on the socket. Looks in /proc/net/unix first
/// so a live vhost-user daemon is not disturbed by a probe connection (an
/// idle one would take it for a frontend). The table lists the name a
/// socket was bound under: `PATH` itself, or `PATH.<pid>.tmp` for one a
/// daemon bound and then moved into place (see [`bind_socket`]).
fn socket_is_live(path: &Path) -> bool {
    if let Ok(table) = fs::read_to_string("/proc/net/unix") {
        let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let names = [want.as_os_str().to_string_lossy().into_owned(), path.as_os_str().to_string_lossy().into_owned()];
        let ours = |p: &str| {
            names.iter().any(|n| {
                p == n
                    || p.strip_prefix(n.as_str())
                        .and_then(|r| r.strip_prefix('.'))
                        .and_then(|r| r.strip_suffix(".tmp"))
                        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        let listed = table.lines().skip(1).any(|line| {
            let mut cols = line.split_whitespace();
            // Num RefCount Protocol Flags Type St Inode Path
            let flags = cols.nth(3).and_then(|f| u32::from_str_radix(f, 16).ok()).unwrap_or(0);
            let p = cols.nth(3);
            flags & 0x10000 != 0 && p.is_some_and(ours)
        });
        if listed {
            return true;
        }
    }
    UnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's socket, bound under a temporary name and moved into
    /// place, is found live in /proc/net/unix: no probe connection lands
    /// in its backlog (an idle daemon would take it for a frontend).
    #[test]
    fn a_moved_live_socket_is_found_without_a_probe() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("vm.sock");
        let l = bind_socket(&path, &|_| Ok(())).unwrap();
        l.set_nonblocking(true).unwrap();
        assert!(socket_is_live(&path));
        assert!(matches!(socket_free(&path), Err(ServeError::SocketInUse { .. })));
        assert_eq!(l.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock, "a probe connected");
        // Gone: the file stays, nobody listens, so it is free to replace.
        drop(l);
        assert!(path.exists() && !socket_is_live(&path));
        socket_free(&path).unwrap();
        let l = bind_socket(&path, &|_| Ok(())).unwrap();
        drop(l);
        // The move into place never replaces a socket bound meanwhile.
        let other = d.path().join("other.sock");
        drop(UnixListener::bind(&other).unwrap());
        let e = rename_noreplace(&other, &path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }
}
