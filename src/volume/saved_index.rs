//! Packs' sub-frame indexes kept in a cache directory (`indexes/<pack
//! key>`), so a restart does not fetch them again: written after a
//! verified fetch (temp + rename), used only when they match the length and
//! sha256 the served manifest gives (a damaged or stale one is deleted and
//! fetched again), sealed like the manifest copy on an encrypted volume.
//! A fork names its origin's packs `<origin id>:<pack key>`; on disk the
//! `:` is a `+` (FAT and exFAT refuse `:` in a name, and no key has `+`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crypto::VolumeKey;
use super::format::PackIndexRef;

/// The folder of saved indexes in a cache directory.
pub const DIR: &str = "indexes";

/// A cache directory's saved indexes.
#[derive(Clone, Debug)]
pub struct SavedIndexes {
    dir: PathBuf,
    /// An encrypted volume's key: an index holds hashes of the plaintext.
    key: Option<Arc<VolumeKey>>,
}

impl SavedIndexes {
    /// The saved indexes under `cache_dir`.
    pub fn new(cache_dir: &Path, key: Option<Arc<VolumeKey>>) -> Self {
        Self { dir: cache_dir.join(DIR), key }
    }

    /// The file of pack `key`; None for a key that is not a plain file
    /// name (manifests come from the remote: never a path out of `dir`).
    fn path(&self, key: &str) -> Option<PathBuf> {
        let plain = !key.is_empty()
            && key.len() <= 200
            && !key.starts_with('.')
            && key.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_:.".contains(&c));
        plain.then(|| self.dir.join(key.replace(':', "+")))
    }

    /// Name the seal binds a file's bytes to (a file moved to another
    /// pack's name does not open).
    fn seal_name(key: &str) -> String {
        format!("{DIR}/{key}")
    }

    /// The saved index of pack `key` when it is exactly what `r` names
    /// (its length and sha256); a file that is not is deleted.
    pub fn load(&self, key: &str, r: &PackIndexRef) -> Option<Vec<u8>> {
        let p = self.path(key)?;
        let raw = std::fs::read(&p).ok()?;
        let plain = match &self.key {
            Some(k) => k.open_local(&Self::seal_name(key), &raw).ok(),
            None => Some(raw),
        };
        match plain {
            Some(b) if b.len() as u64 == r.len && super::pack::sha256_hex(&b) == r.sha256 => Some(b),
            _ => {
                tracing::info!(pack = %key, file = %p.display(), "saved sub-frame index does not match the manifest; fetching it again");
                let _ = std::fs::remove_file(&p);
                None
            }
        }
    }

    /// Saves the verified index `bytes` of pack `key` (temp + rename: a
    /// file is whole or absent; a torn one after a crash fails its hash).
    pub fn save(&self, key: &str, bytes: &[u8]) -> std::io::Result<()> {
        let Some(p) = self.path(key) else { return Ok(()) };
        crate::remote::private::create_dir_all(&self.dir)?;
        let data = match &self.key {
            Some(k) => k.seal_local(&Self::seal_name(key), bytes),
            None => bytes.to_vec(),
        };
        let tmp = self.dir.join(format!(".{}.tmp", key.replace(':', "+")));
        crate::remote::private::write(&tmp, &data)?;
        std::fs::rename(&tmp, p)
    }

    /// Deletes saved indexes of packs `keep` rejects (no longer named by
    /// the served generation), leftover temp files, and files named with a
    /// `:` (kept so before: no longer read).
    pub fn prune(&self, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name.contains(':') || !keep(&name.replace('+', ":")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(b: &[u8]) -> PackIndexRef {
        PackIndexRef { offset: 0, len: b.len() as u64, sha256: crate::volume::pack::sha256_hex(b) }
    }

    /// A saved index loads only while it matches; a damaged one is
    /// deleted; keys that are not file names are never written.
    #[test]
    fn saved_indexes_load_only_when_they_match() {
        let d = tempfile::tempdir().unwrap();
        let s = SavedIndexes::new(d.path(), None);
        s.save("pack-1", b"index one").unwrap();
        assert_eq!(s.load("pack-1", &r(b"index one")).as_deref(), Some(&b"index one"[..]));
        assert_eq!(s.load("pack-1", &r(b"index two")), None);
        assert!(!d.path().join("indexes/pack-1").exists(), "a mismatching file is deleted");
        for bad in ["../escape", "a/b", ".hidden", ""] {
            s.save(bad, b"x").unwrap();
            assert_eq!(s.load(bad, &r(b"x")), None);
        }
        assert!(!d.path().join("escape").exists());
        s.save("pack-2", b"two").unwrap();
        s.save("pack-3", b"three").unwrap();
        s.prune(|k| k == "pack-3");
        assert_eq!(s.load("pack-2", &r(b"two")), None);
        assert!(s.load("pack-3", &r(b"three")).is_some());
        // A fork's name for its origin's pack: no `:` on disk (exFAT).
        s.save("0123abcd:pack-4", b"four").unwrap();
        assert!(d.path().join("indexes/0123abcd+pack-4").exists());
        s.prune(|k| k == "0123abcd:pack-4");
        assert!(s.load("0123abcd:pack-4", &r(b"four")).is_some());
    }
}
