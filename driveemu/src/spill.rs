//! Keeps large file bytes on disk instead of in memory, for images bigger than the machine's RAM.
//!
//! Each blob goes into a file of its own in the data directory, is mapped, and the file is
//! unlinked at once: the mapping keeps the bytes (the page cache holds what is read, and the
//! kernel may drop it), and the disk space comes back when the last `Bytes` of the blob is
//! dropped — on a crash too, since nothing is left with a name.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::error::ApiError;

/// Blobs smaller than this stay in memory: a file and a mapping each cost more than they save.
const MIN_SPILL: usize = 64 * 1024;

pub(crate) struct Spill {
    dir: PathBuf,
    seq: AtomicU64,
}

impl Spill {
    pub fn new(dir: &Path) -> std::io::Result<Spill> {
        std::fs::create_dir_all(dir)?;
        Ok(Spill { dir: dir.to_path_buf(), seq: AtomicU64::new(0) })
    }

    /// The same bytes, backed by an unlinked file when they are large enough.
    pub fn keep(&self, data: Bytes) -> Result<Bytes, ApiError> {
        if data.len() < MIN_SPILL {
            return Ok(data);
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("blob-{}-{n}", std::process::id()));
        let mapped = (|| {
            let mut f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
            let r = f.write_all(&data).and_then(|()| {
                // SAFETY: the file is this process's own, unlinked below before anyone else
                // could open it by name, and never written again: the mapping cannot change.
                unsafe { memmap2::Mmap::map(&f) }
            });
            std::fs::remove_file(&path)?;
            r
        })();
        match mapped {
            Ok(m) => Ok(Bytes::from_owner(m)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                // Drive's answer to a failure on its side, which clients retry.
                eprintln!("driveemu: cannot keep {} bytes in {}: {e}", data.len(), self.dir.display());
                Err(ApiError::backend(500))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blobs_live_in_unlinked_files_and_read_back() {
        let dir = std::env::temp_dir().join(format!("driveemu-spill-{}", std::process::id()));
        let s = Spill::new(&dir).unwrap();
        let small = Bytes::from(vec![7u8; 100]);
        assert_eq!(s.keep(small.clone()).unwrap(), small);
        let big: Vec<u8> = (0..MIN_SPILL * 3).map(|i| (i * 31 % 251) as u8).collect();
        let kept = s.keep(Bytes::from(big.clone())).unwrap();
        assert_eq!(&kept[..], &big[..]);
        assert_eq!(&kept.slice(1000..5000)[..], &big[1000..5000]);
        // Nothing is left with a name: the bytes live only as long as the mapping.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
