//! Which 4 KiB pages of each dirty chunk changed since it was last clean,
//! kept across a clean stop so write-back still uploads patches after a
//! restart.
//!
//! The sets live in memory. At a stop that leaves changes they are written
//! to the cache directory's `dirty-pages` file; the next start takes them
//! back and removes the file (durably) before the first write. A set that
//! says too little would lose writes (a patch leaves out pages that
//! changed), so the file is only ever trusted while nothing has written
//! since it was saved: any change to the sets after saving removes it, and
//! a file that is damaged or of another chunk size is ignored. Without it
//! a dirty chunk counts as changed everywhere and goes up whole.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::ssd::{bitmap_words, PAGE};

/// The file's name in the cache directory.
const FILE: &str = "dirty-pages";
const MAGIC: &[u8] = b"driveblk-dirty-pages 1\n";

/// Page bitmap of one chunk: bit i of the words = page i changed.
pub type Bitmap = Box<[u64]>;

/// The changed-page sets of a cache's dirty chunks.
pub struct DirtyPages {
    sets: Mutex<HashMap<u64, Bitmap>>,
    chunk_size: u64,
    dir: PathBuf,
    /// The file holds the sets as they are now (removed before they change).
    kept: AtomicBool,
}

impl DirtyPages {
    /// Empty sets for a cache in `dir` (nothing taken from the file).
    pub fn new(dir: &Path, chunk_size: u64) -> Self {
        Self { sets: Mutex::new(HashMap::new()), chunk_size, dir: dir.to_path_buf(), kept: AtomicBool::new(false) }
    }

    /// Takes back the sets a clean stop kept, for the chunks `dirty` says
    /// are still dirty, and removes the file durably first: from here on
    /// only memory holds them. A file that cannot be read or removed is
    /// not used (those chunks go up whole).
    pub fn take(&self, dirty: impl Fn(u64) -> bool) -> io::Result<usize> {
        let path = self.dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        if let Err(e) = std::fs::remove_file(&path).and_then(|()| sync_dir(&self.dir)) {
            // Still there: the first change must remove it, or fail.
            self.kept.store(true, Ordering::SeqCst);
            return Err(e);
        }
        let Some(sets) = decode(&bytes, self.chunk_size) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged", path.display())));
        };
        let mut map = self.sets.lock();
        for (idx, set) in sets {
            if dirty(idx) {
                map.insert(idx, set);
            }
        }
        Ok(map.len())
    }

    /// From now on the file may hold the sets: the cache state says so
    /// (see [`DirtyPages::announced`]) before [`DirtyPages::keep`] writes it.
    pub fn announce(&self) {
        self.kept.store(true, Ordering::SeqCst);
    }

    /// Whether the file may hold the sets: the cache state is then written
    /// with a version that binaries not knowing the file refuse.
    pub fn announced(&self) -> bool {
        self.kept.load(Ordering::SeqCst)
    }

    /// Writes the sets to the file (temp, fsync, rename, fsync of the
    /// folder), where the next start takes them back.
    pub fn keep(&self) -> io::Result<()> {
        let map = self.sets.lock();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut f = crate::remote::private::create(&tmp)?;
        f.write_all(&encode(&map, self.chunk_size))?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        sync_dir(&self.dir)?;
        self.kept.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Records that pages [off, off + len) of chunk `idx` change. A chunk
    /// becoming dirty (`was_dirty` false) starts a fresh set; one already
    /// dirty without a set stays "changed everywhere".
    pub fn note(&self, idx: u64, was_dirty: bool, off: u64, len: u64) -> io::Result<()> {
        let mut map = self.sets.lock();
        self.unkeep()?;
        let m = if was_dirty {
            match map.get_mut(&idx) {
                Some(m) => m,
                None => return Ok(()),
            }
        } else {
            map.entry(idx).insert_entry(vec![0u64; bitmap_words(self.chunk_size)].into_boxed_slice()).into_mut()
        };
        let end = (off + len).min(self.chunk_size);
        for p in off / PAGE..end.div_ceil(PAGE) {
            m[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(())
    }

    /// Forgets chunk `idx`'s set: it is clean, or changed everywhere. The
    /// file goes too, though a set it still held would only say more than
    /// needed (the chunk clean since, or zeroed: then not loaded, and the
    /// next write into it removes the file anyway).
    pub fn forget(&self, idx: u64) {
        let mut map = self.sets.lock();
        if map.remove(&idx).is_some() {
            if let Err(e) = self.unkeep() {
                tracing::warn!(error = %e, "could not remove the cache's record of changed pages");
            }
        }
    }

    /// Chunk `idx`'s set (None: unknown, treat every page as changed).
    pub fn get(&self, idx: u64) -> Option<Bitmap> {
        self.sets.lock().get(&idx).cloned()
    }

    /// Before the sets change: the file no longer describes them. Called
    /// under the sets' lock.
    fn unkeep(&self) -> io::Result<()> {
        if self.kept.load(Ordering::Relaxed) {
            match std::fs::remove_file(self.dir.join(FILE)) {
                Ok(()) => sync_dir(&self.dir)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.kept.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// MAGIC, chunk size, count, then (index, words) per chunk, then a BLAKE3
/// hash of all that: a torn or damaged file is never read as sets.
fn encode(map: &HashMap<u64, Bitmap>, chunk_size: u64) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend(chunk_size.to_le_bytes());
    b.extend((map.len() as u64).to_le_bytes());
    for (idx, set) in map {
        b.extend(idx.to_le_bytes());
        for w in set.iter() {
            b.extend(w.to_le_bytes());
        }
    }
    let hash = blake3::hash(&b);
    b.extend(hash.as_bytes());
    b
}

fn decode(b: &[u8], chunk_size: u64) -> Option<Vec<(u64, Bitmap)>> {
    let (body, hash) = b.split_at_checked(b.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != hash {
        return None;
    }
    let rest = body.strip_prefix(MAGIC)?;
    let mut words = rest.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
    if rest.len() % 8 != 0 || words.next()? != chunk_size {
        return None;
    }
    let count = words.next()?;
    let per = bitmap_words(chunk_size);
    if (rest.len() / 8 - 2) as u64 != count.checked_mul(per as u64 + 1)? {
        return None;
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let idx = words.next()?;
        let set: Bitmap = words.by_ref().take(per).collect();
        out.push((idx, set));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 1 << 20;

    #[test]
    fn sets_kept_at_a_stop_come_back_once_for_chunks_still_dirty() {
        let d = tempfile::tempdir().unwrap();
        let a = DirtyPages::new(d.path(), CS);
        a.note(3, false, 8192, 100).unwrap();
        a.note(3, true, CS - 4096, 4096).unwrap();
        a.note(7, false, 0, 4096).unwrap();
        a.keep().unwrap();
        let b = DirtyPages::new(d.path(), CS);
        assert_eq!(b.take(|i| i == 3).unwrap(), 1, "chunk 7 is no longer dirty");
        let set = b.get(3).unwrap();
        let pages: Vec<u64> = (0..CS / PAGE).filter(|&p| set[(p / 64) as usize] >> (p % 64) & 1 == 1).collect();
        assert_eq!(pages, [2, CS / PAGE - 1]);
        assert!(b.get(7).is_none());
        assert!(!d.path().join(FILE).exists(), "taken sets are in memory only");
        assert_eq!(DirtyPages::new(d.path(), CS).take(|_| true).unwrap(), 0);
    }

    #[test]
    fn a_change_after_keeping_removes_the_file() {
        let d = tempfile::tempdir().unwrap();
        let a = DirtyPages::new(d.path(), CS);
        a.note(1, false, 0, 4096).unwrap();
        a.keep().unwrap();
        a.forget(2); // no set: nothing changes
        assert!(d.path().join(FILE).exists());
        a.note(1, true, 4096, 4096).unwrap();
        assert!(!d.path().join(FILE).exists(), "a file that says too little would lose writes");
        a.keep().unwrap();
        a.forget(1);
        assert!(!d.path().join(FILE).exists());
    }

    #[test]
    fn a_damaged_file_or_another_chunk_size_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let a = DirtyPages::new(d.path(), CS);
        a.note(1, false, 0, 4096).unwrap();
        a.keep().unwrap();
        let good = std::fs::read(d.path().join(FILE)).unwrap();
        let mut bad = good.clone();
        bad[MAGIC.len() + 20] ^= 1;
        std::fs::write(d.path().join(FILE), &bad).unwrap();
        assert!(DirtyPages::new(d.path(), CS).take(|_| true).is_err());
        assert!(!d.path().join(FILE).exists(), "a damaged file is removed");
        std::fs::write(d.path().join(FILE), &good[..good.len() - 1]).unwrap();
        assert!(DirtyPages::new(d.path(), CS).take(|_| true).is_err());
        std::fs::write(d.path().join(FILE), &good).unwrap();
        let other = DirtyPages::new(d.path(), CS * 2);
        assert!(other.take(|_| true).is_err());
        assert!(other.get(1).is_none());
    }
}
