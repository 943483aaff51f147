//! QEMU's image locking protocol on a local image file, so that driveblk and
//! QEMU (or qemu-img, qemu-storage-daemon, another driveblk) never write one
//! image at once, and nobody reads an image another process is writing.
//!
//! QEMU (block/file-posix.c) takes shared open-file-description (OFD) locks
//! on one byte per block permission: byte 100 + p while it holds permission
//! p, byte 200 + p while it refuses to share p. Whoever wants p checks that
//! nobody locked 200 + p; whoever refuses p checks that nobody locked
//! 100 + p. Every party takes its own bytes first, then checks, so of two
//! starting at once at least one sees the other. `flock` (which driveblk
//! used before) is a different lock QEMU never looks at.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// QEMU's block permissions (include/block/block-common.h), by bit number.
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;
/// The names QEMU prints (`bdrv_perm_names`).
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// What the opener does with the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads and needs the contents to hold still: nobody may write or
    /// resize it meanwhile (QEMU's readers, `qemu-img convert`, a backing file).
    Read,
    /// Reads, writes and grows it, alone (a QEMU guest disk's format layer).
    Write,
}

impl Access {
    /// The permissions held (QEMU's `perm`).
    fn held(self) -> &'static [u32] {
        match self {
            Access::Read => &[CONSISTENT_READ],
            Access::Write => &[CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE],
        }
    }

    /// The permissions refused to others (QEMU's `~shared_perm`): a qcow2
    /// or raw disk in QEMU shares only reads and unchanged writes.
    fn refused(self) -> &'static [u32] {
        &[WRITE, RESIZE]
    }
}

/// Takes QEMU's locks on `file` for `access` and checks nobody conflicts.
/// A conflict is `ResourceBusy`, worded as qemu-img words it (`Failed to get
/// "write" lock`) and naming the processes that have the file open. On a
/// filesystem without OFD locks it warns and goes on, as QEMU's
/// `locking=auto` does.
pub fn lock(file: &File, path: &Path, access: Access) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let bytes = access
        .held()
        .iter()
        .map(|&p| PERM_BASE + i64::from(p))
        .chain(access.refused().iter().map(|&p| SHARED_BASE + i64::from(p)));
    for b in bytes {
        if let Err(e) = set_read_lock(fd, b) {
            if unsupported(&e) {
                tracing::warn!(path = %path.display(), error = %e, "no OFD locks here: QEMU cannot see that driveblk uses this image");
                return Ok(());
            }
            return Err(conflict(path, &format!("Failed to lock byte {b}"), e));
        }
    }
    for &p in access.held() {
        if locked_by_other(fd, SHARED_BASE + i64::from(p))? {
            let what = format!("Failed to get \"{}\" lock", NAMES[p as usize]);
            return Err(conflict(path, &what, io::ErrorKind::ResourceBusy.into()));
        }
    }
    for &p in access.refused() {
        if locked_by_other(fd, PERM_BASE + i64::from(p))? {
            let what = format!("Failed to get shared \"{}\" lock", NAMES[p as usize]);
            return Err(conflict(path, &what, io::ErrorKind::ResourceBusy.into()));
        }
    }
    Ok(())
}

fn flock_at(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: an all-zero flock is valid; OFD locks need l_pid 0.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = byte;
    l.l_len = 1;
    l
}

fn set_read_lock(fd: i32, byte: i64) -> io::Result<()> {
    let l = flock_at(byte, libc::F_RDLCK);
    // SAFETY: fcntl with a valid flock on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &l as *const libc::flock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True if another open file description holds a lock on `byte` (QEMU's
/// `qemu_lock_fd_test` with an exclusive probe).
fn locked_by_other(fd: i32, byte: i64) -> io::Result<bool> {
    let mut l = flock_at(byte, libc::F_WRLCK);
    // SAFETY: fcntl with a valid flock on a descriptor the caller owns.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut l as *mut libc::flock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS))
}

fn conflict(path: &Path, what: &str, e: io::Error) -> io::Error {
    let users = users_of(path);
    let who = if users.is_empty() { String::new() } else { format!(" ({} has it open)", users.join(", ")) };
    let detail = match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) | None => String::new(),
        Some(_) => format!(": {e}"),
    };
    // Not WouldBlock: to the layers above that means "retry on a thread
    // that may block".
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("{what}{detail}: another process is using the image {}{who}", path.display()),
    )
}

/// Other processes with `path` open, as `NAME (pid N)`, from /proc (what
/// `fuser` does); those we may not look at are skipped.
fn users_of(path: &Path) -> Vec<String> {
    let Ok(target) = path.canonicalize() else { return Vec::new() };
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == target)) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{} (pid {pid})", comm.trim()));
        }
    }
    out
}
