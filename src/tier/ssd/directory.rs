//! The cache directory around the state: its lock (one process at a
//! time), and the removal of a cache whose state cannot be used.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::place::Place;
use super::state_file::{read_state, Unusable, STATE_VERSION};
use crate::volume::{VolumeError, VolumeResult};

/// An error about the cache in `dir`.
pub(super) fn cache_err(dir: &Path, reason: impl Into<String>) -> VolumeError {
    VolumeError::Cache { dir: dir.to_path_buf(), reason: reason.into() }
}

/// Why a cache with an unusable state file is refused, and what to do.
pub(super) fn damaged_reason(dir: &Path, why: &str) -> String {
    format!(
        "its state cannot be used ({why}). It may hold writes not yet uploaded, so nothing in it was \
         changed: copy the directory aside if they matter, then start again from the volume on the remote \
         with `driveblk discard-local VOLUME --cache-dir {}`",
        dir.display()
    )
}

/// Why a cache whose state a newer driveblk wrote is refused, and what to
/// do: that state is sound, and may hold writes not yet uploaded.
pub(super) fn newer_reason(dir: &Path, version: u32) -> String {
    format!(
        "it was written by a newer driveblk (cache state v{version}, this one reads up to v{STATE_VERSION}): run \
         that version (and `driveblk sync` it) before using this one; nothing was changed. Once it is synced, \
         `driveblk discard-local VOLUME --cache-dir {} --force` lets this version start the cache over",
        dir.display()
    )
}

/// For a directory without a state file: why its data file cannot be
/// trusted, if it holds bytes (the state is written at a cache's first
/// open, before any data, so only a state lost since leaves that).
pub(super) fn lost_state(dir: &Path) -> Option<String> {
    let n = std::fs::metadata(dir.join("data")).map(|m| m.len()).unwrap_or(0);
    (n > 0).then(|| format!("the state file is missing, and the data file holds {n} bytes"))
}

/// A cache removed because its state file could not be used.
#[derive(Debug)]
pub struct RemovedDamaged {
    /// Why the state could not be used.
    pub why: String,
    /// The cache's id, if its state's header line still names one (the
    /// writer lease names the cache that holds it).
    pub cache_id: Option<String>,
}

/// Removes the files of the cache in `dir` if its state file cannot be
/// used, under the directory's lock; `None` (and nothing changed) if the
/// state is sound or absent. A state a newer driveblk wrote is sound, not
/// damaged: it is refused unless `force`, and when forced its writer lease
/// is left alone (`cache_id` None: this binary cannot tell what that
/// state says of it).
pub fn remove_damaged(dir: &Path, files: &[&str], force: bool) -> VolumeResult<Option<RemovedDamaged>> {
    let lock_path = dir.join("lock");
    let lock = match OpenOptions::new().write(true).open(&lock_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VolumeError::io("opening", &lock_path, e)),
    };
    lock_exclusive(&lock, dir)?;
    let why = match read_state(&dir.join("state")) {
        Err(Unusable::Newer(v)) if !force => {
            return Err(cache_err(
                dir,
                format!(
                    "it was written by a newer driveblk (cache state v{v}, this one reads up to v{STATE_VERSION}) \
                     and may hold writes not yet uploaded: run that version and `driveblk sync` it; nothing was \
                     changed. `--force` removes it anyway, with whatever it held"
                ),
            ));
        }
        Err(Unusable::Newer(v)) => {
            tracing::warn!(dir = %dir.display(), "removing a cache a newer driveblk wrote (--force); a writer lease it holds is not released");
            remove_files(dir, files)?;
            return Ok(Some(RemovedDamaged {
                why: format!("written by a newer driveblk (cache state v{v})"),
                cache_id: None,
            }));
        }
        Err(Unusable::Damaged(why)) => why,
        Ok(Some(_)) => return Ok(None),
        Ok(None) => match lost_state(dir) {
            Some(why) => why,
            None => return Ok(None),
        },
    };
    let cache_id = std::fs::read(dir.join("state")).ok().and_then(|b| {
        let line = b.split(|&c| c == b'\n').next()?;
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        let id = v.get("cache_id")?.as_str()?;
        // A state written elsewhere (a copy of another cache's directory)
        // names that cache, whose lease is not this directory's to release.
        let machine = v.get("machine").and_then(|m| m.as_str()).unwrap_or_default();
        let inode = v.get("dir_inode").and_then(|i| i.as_u64()).unwrap_or(0);
        let subvol = v.get("dir_subvol").and_then(|i| i.as_u64()).unwrap_or(0);
        let here = Place::here(dir).ok()?;
        if let Some(why) = here.moved_from(machine, inode, subvol) {
            tracing::warn!(dir = %dir.display(), "the damaged state names cache {id}, but {why}: a copy of that cache, whose writer lease stays");
            return None;
        }
        (id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
    });
    remove_files(dir, files)?;
    Ok(Some(RemovedDamaged { why, cache_id }))
}

/// Removes `files` from the cache directory `dir` (those not there are
/// fine). Callers hold the directory's lock.
pub(crate) fn remove_files(dir: &Path, files: &[&str]) -> VolumeResult<()> {
    for f in files {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(VolumeError::io("removing", dir.join(f), e)),
        }
    }
    Ok(())
}

/// Takes the cache directory's lock (its `lock` file, open as `lock`),
/// failing at once if another process holds it.
pub(super) fn lock_exclusive(lock: &File, dir: &Path) -> VolumeResult<()> {
    // SAFETY: plain syscall on an owned fd.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(cache_err(dir, "in use by another driveblk process (stop it first, or use another --cache-dir)"));
    }
    Ok(())
}
