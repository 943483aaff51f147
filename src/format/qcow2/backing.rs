//! Backing files: the [`BackingOpener`] seam that turns a backing file name
//! and format into a [`Disk`], and the default local-file implementation that
//! resolves relative names against the image's directory and detects loops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{corrupt, unsupported, Qcow2Disk, Qcow2Options};
use crate::format::raw::RawDisk;
use crate::format::{Disk, DiskError, DiskResult, ImageFormat};
use crate::tier::{LocalFile, Storage};

/// Longest backing chain followed (QEMU has no fixed limit; this one catches
/// loops that path comparison misses, e.g. through hard links).
pub const MAX_BACKING_DEPTH: usize = 32;

/// Opens a qcow2 image's backing file, read-only.
pub trait BackingOpener: Send + Sync {
    /// `name` is the backing file name exactly as stored in the image,
    /// `format` the backing format extension parsed as an [`ImageFormat`]
    /// (`None` when the image records none).
    fn open_backing(&self, name: &str, format: Option<ImageFormat>) -> DiskResult<Arc<dyn Disk>>;
}

/// For images that must not have a backing file (and for tests): opening
/// one is an error.
pub struct NoBacking;

impl BackingOpener for NoBacking {
    fn open_backing(&self, name: &str, _format: Option<ImageFormat>) -> DiskResult<Arc<dyn Disk>> {
        Err(unsupported(format!(
            "the image is a qcow2 overlay on the backing file {name:?}, which cannot be opened here: \
             use a flattened copy (`qemu-img convert -O qcow2 OVERLAY flat.qcow2` copies the backing \
             file's data in)"
        )))
    }
}

/// Opens backing files from the local filesystem, relative to the directory
/// of the image that names them.
#[derive(Clone, Debug)]
pub struct LocalBackingOpener {
    dir: PathBuf,
    /// Canonical paths of the images above, top first, for loop detection.
    chain: Vec<PathBuf>,
}

impl LocalBackingOpener {
    /// An opener for the backing file of the image at `image_path`.
    pub fn new(image_path: &Path) -> Self {
        let canon = image_path.canonicalize().unwrap_or_else(|_| image_path.to_path_buf());
        let dir = canon.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        Self { dir, chain: vec![canon] }
    }

    fn child(&self, path: &Path) -> Self {
        let mut chain = self.chain.clone();
        chain.push(path.to_path_buf());
        Self { dir: path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")), chain }
    }
}

impl BackingOpener for LocalBackingOpener {
    fn open_backing(&self, name: &str, format: Option<ImageFormat>) -> DiskResult<Arc<dyn Disk>> {
        let rel = Path::new(name);
        let path = if rel.is_absolute() { rel.to_path_buf() } else { self.dir.join(rel) };
        let canon = path.canonicalize().map_err(|e| open_err(&path, e))?;
        if self.chain.contains(&canon) {
            return Err(corrupt(format!("backing chain loop: {} is its own ancestor", canon.display())));
        }
        if self.chain.len() > MAX_BACKING_DEPTH {
            return Err(unsupported(format!("backing chain deeper than {MAX_BACKING_DEPTH} images")));
        }
        // Never guess the format: a raw guest can write a qcow2 header.
        let format = format.ok_or_else(|| {
            unsupported(format!(
                "backing file {name:?} has no recorded format; set one with `qemu-img rebase -u -F <fmt>`"
            ))
        })?;
        let file = LocalFile::open(&canon, true).map_err(|e| open_err(&canon, e))?;
        // QEMU's read lock: nobody may write the base under the overlay.
        file.lock(false).map_err(|source| DiskError::Io { op: "lock backing file", offset: 0, source })?;
        let storage: Arc<dyn Storage> = Arc::new(file);
        match format {
            ImageFormat::Raw => Ok(Arc::new(RawDisk::new(storage, true)?)),
            ImageFormat::Qcow2 => {
                let opts = Qcow2Options { read_only: true, ..Default::default() };
                Ok(Arc::new(Qcow2Disk::open(storage, opts, &self.child(&canon))?))
            }
        }
    }
}

fn open_err(path: &Path, e: std::io::Error) -> DiskError {
    DiskError::Io {
        op: "open backing file",
        offset: 0,
        source: std::io::Error::new(e.kind(), format!("{}: {e}", path.display())),
    }
}
