//! Where a volume's cache lives when no `--cache-dir` is given: one
//! directory per volume id under the cache root, found from any spelling
//! of the volume's URL (`dir:./vol`, `dir:/abs/vol`, a symlinked path,
//! `gdrive:/path` or `gdrive:id=…`), so `serve`, `status`, `sync` and
//! `export` always agree on it.
//!
//! `<root>/<volume id>/` holds the cache; `<root>/by-url/<hash of the
//! canonical URL>` is a symlink to it, so a later command finds it without
//! asking the remote (which may be down). On a file system without
//! symlinks (exFAT, FAT) it is a file holding the link's target.
//! `<root>/link/` holds the records every process of the host shares
//! (`link_dir`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::remote::RemoteUrl;
use crate::tier::cache_dir_for;
use crate::volume::{self, RemoteOptions};

/// The cache root: $DRIVEBLK_CACHE, /var/cache/driveblk (root) or
/// ~/.cache/driveblk.
pub fn root() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("DRIVEBLK_CACHE") {
        Ok(PathBuf::from(d))
    } else if unsafe { libc::geteuid() } == 0 {
        Ok(PathBuf::from("/var/cache/driveblk"))
    } else if let Some(h) = std::env::var_os("HOME") {
        Ok(PathBuf::from(h).join(".cache/driveblk"))
    } else {
        bail!("no cache directory: pass --cache-dir or set DRIVEBLK_CACHE")
    }
}

/// Where the limits every driveblk process of this host shares live
/// (`--bwlimit`'s clocks, a Drive account's request budget):
/// $DRIVEBLK_LINK, else `link` under the cache root. Processes given
/// different directories keep separate limits (two uplinks).
pub fn link_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("DRIVEBLK_LINK").filter(|v| !v.is_empty()) {
        Some(d) => Ok(PathBuf::from(d)),
        None => Ok(root()?.join("link")),
    }
}

/// One spelling per place: `dir:` paths absolute with symlinks resolved,
/// Drive URLs as the parser writes them back.
pub fn canonical_url(url: &str) -> anyhow::Result<String> {
    let u = RemoteUrl::parse(url)?;
    if let Some(p) = u.path() {
        let real = match (p.parent().and_then(canonicalize_within), p.file_name()) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => p,
        };
        return Ok(format!("dir:{}", real.display()));
    }
    Ok(u.to_string())
}

/// How long resolving a `dir:` URL's folder may take: on a hung NFS mount
/// the call never returns, and the cache must still be found to serve
/// from its copy of the volume.
const RESOLVE_WAIT: Duration = Duration::from_secs(5);

/// `dir` with symlinks resolved, or None when it cannot be (missing) or
/// does not answer within [`RESOLVE_WAIT`] (the path as written is used
/// then; the same unless it goes through a symlink).
fn canonicalize_within(dir: &Path) -> Option<PathBuf> {
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.to_path_buf();
    // Left behind if stuck: a thread in the kernel cannot be cancelled.
    std::thread::Builder::new()
        .name("driveblk-resolve".into())
        .spawn(move || tx.send(std::fs::canonicalize(d)))
        .ok()?;
    match rx.recv_timeout(RESOLVE_WAIT) {
        Ok(r) => r.ok(),
        Err(_) => {
            tracing::warn!(
                folder = %dir.display(),
                "the folder did not answer within {} s (a hung mount?); taking its path as written",
                RESOLVE_WAIT.as_secs()
            );
            None
        }
    }
}

fn hash16(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

/// The cache directory of the volume at `url`. `lookup`: when no earlier
/// command recorded it, read the volume's id from the remote (waiting at
/// most `wait`) and record it; otherwise fail with a message naming
/// `--cache-dir`.
pub fn for_url(url: &str, opts: &RemoteOptions, lookup: bool, wait: Duration) -> anyhow::Result<PathBuf> {
    let root = root()?;
    let canonical = canonical_url(url)?;
    let alias = root.join("by-url").join(hash16(&canonical));
    if let Some(target) = recorded(&alias) {
        return Ok(root.join("by-url").join(target));
    }
    // Caches made before caches were keyed by volume id: named by a hash
    // of the URL as typed.
    for legacy in [root.join(hash16(url)), root.join(hash16(&canonical))] {
        if legacy.join("volume.json").is_file() || legacy.join("state").exists() {
            return Ok(legacy);
        }
    }
    if !lookup {
        bail!(
            "no cache is known for {url} on this machine (under {}): pass --cache-dir, or serve it once",
            root.display()
        );
    }
    let id = volume::volume_id(url, opts, wait).with_context(|| {
        format!("cannot find the cache directory of {url}: the volume's id comes from the remote; pass --cache-dir")
    })?;
    let dir = cache_dir_for(&root, &id);
    record(&root, &alias, &id)?;
    Ok(dir)
}

/// Where `alias` points: a symlink's target, or the target written in
/// the file that stands for one.
fn recorded(alias: &Path) -> Option<PathBuf> {
    if let Ok(target) = std::fs::read_link(alias) {
        return Some(target);
    }
    let text = std::fs::read_to_string(alias).ok()?;
    let target = PathBuf::from(text.trim_end_matches('\n'));
    // Only what `record` writes: `../<volume id>`.
    (target.parent() == Some(Path::new("..")) && target.file_name().is_some()).then_some(target)
}

/// Records `alias` -> `<root>/<id>` (relative, so the root can move): a
/// symlink, or where the file system has none, a file holding its target.
fn record(root: &Path, alias: &Path, id: &str) -> anyhow::Result<()> {
    let by_url = root.join("by-url");
    crate::remote::private::create_dir_all(&by_url).with_context(|| format!("cannot create {}", by_url.display()))?;
    let tmp = by_url.join(format!(".{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let target = Path::new("..").join(id);
    let made = match std::os::unix::fs::symlink(&target, &tmp) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS | libc::EOPNOTSUPP)) => {
            crate::remote::private::write(&tmp, format!("{}\n", target.display()).as_bytes())
        }
        r => r,
    };
    made.and_then(|_| std::fs::rename(&tmp, alias)).with_context(|| format!("cannot record {}", alias.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_folder_are_one_url() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let a = canonical_url(&format!("dir:{}/real/vol", d.path().display())).unwrap();
        let b = canonical_url(&format!("dir:{}/link/./vol", d.path().display())).unwrap();
        let c = canonical_url(&format!("dir://{}/real/x/../vol", d.path().display())).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, canonical_url(&format!("dir:{}/real/other", d.path().display())).unwrap());
    }
}
