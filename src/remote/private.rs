//! Local files only their owner may open: a cache directory holds the
//! guest's disk, credentials and key files hold secrets, so none of them
//! may follow the umask (every layer creates its files through here).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Creates `dir` and any missing parent, each 0700 (an existing one keeps
/// its mode: see [`warn_if_open_dir`]).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Options whose file, when this open creates it, is 0600.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates or truncates `path` for writing, 0600 when created.
pub fn create(path: &Path) -> io::Result<File> {
    options().write(true).create(true).truncate(true).open(path)
}

/// `std::fs::write`, the file 0600 when created.
pub fn write(path: &Path, data: &[u8]) -> io::Result<()> {
    create(path)?.write_all(data)
}

/// Paths already warned about: once per path per process.
static WARNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn first_warning(p: &Path) -> bool {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.iter().any(|w| w == p) {
        return false;
    }
    warned.push(p.to_path_buf());
    true
}

/// The mode bits of `p` when group or others have any (`None` otherwise,
/// or when it cannot be read).
fn open_mode(p: &Path) -> Option<u32> {
    let mode = std::fs::metadata(p).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Warns (once per file) when the secret file `p` is open to other users:
/// `what` names it ("key file"), `harm` says what a reader can do ("decrypt
/// the volume"). Not refused: the file may sit where its owner cannot
/// change the mode (a mounted secret).
pub fn warn_if_exposed(p: &Path, what: &str, harm: &str) {
    if let Some(mode) = open_mode(p) {
        if first_warning(p) {
            tracing::warn!(
                "{what} {} can be read or written by other users (mode {mode:03o}): whoever reads it can {harm}; run `chmod 600 {}`",
                p.display(),
                p.display()
            );
        }
    }
}

/// Warns (once per directory) when the cache directory `dir` is open to
/// other users, as versions before 0700 caches made it: its files hold
/// the guest's disk.
pub fn warn_if_open_dir(dir: &Path) {
    if let Some(mode) = open_mode(dir) {
        if first_warning(dir) {
            tracing::warn!(
                "cache directory {} is open to other users (mode {mode:03o}): its files hold the guest's disk; run `chmod -R go= {}`",
                dir.display(),
                dir.display()
            );
        }
    }
}
