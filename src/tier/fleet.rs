//! Serving one golden volume to a fleet: the shared cache directory slipped
//! under a volume's remote reads, and ephemeral caches (the guest writes
//! into its private cache only; nothing is uploaded and the writes are
//! dropped at the next open).

use std::path::Path;
use std::sync::Arc;

use super::fork::CACHE_FILES;
use super::open::CacheOptions;
use super::ssd::{CacheIdentity, OpenMode, SsdCache};
use crate::remote::{private, DynRemote, SharedCache};
use crate::volume::format::is_immutable_key;
use crate::volume::{RemoteOptions, VolumeError, VolumeReader, VolumeResult};

/// `remote` with ranged reads of the volume's immutable objects (packs,
/// profile packs, pinned base revisions) served through `shared`. The
/// layer sits above the caller's layers and under retry and decryption,
/// so entries hold exactly the bytes the remote sent (ciphertext for an
/// encrypted volume) and only real remote reads are counted below it.
pub fn with_shared(remote: &RemoteOptions, shared: &Arc<SharedCache>) -> RemoteOptions {
    let mut o = remote.clone();
    let below = o.layer.take();
    let shared = shared.clone();
    o.layer = Some(Arc::new(move |inner: DynRemote| {
        let inner = match &below {
            Some(l) => l(inner),
            None => inner,
        };
        shared.wrap(inner, is_immutable_key)
    }));
    o
}

/// Marker file of a cache directory serving an ephemeral disk: while it
/// exists, the cache's dirty chunks are a throwaway guest's writes.
pub const EPHEMERAL_MARKER: &str = "ephemeral";

/// Before a store opens `opts.cache_dir` for `vol`: drops everything an
/// earlier ephemeral run left (whatever this run's mode: its writes must
/// never be uploaded), and for an ephemeral run refuses a cache holding
/// real changes not yet uploaded, then marks the directory.
pub fn prepare_cache(opts: &CacheOptions, vol: &VolumeReader) -> VolumeResult<()> {
    let dir = &opts.cache_dir;
    let marker = dir.join(EPHEMERAL_MARKER);
    let leftover = marker.exists();
    if leftover || opts.ephemeral {
        let id = CacheIdentity { volume_id: vol.header.volume_id.clone(), chunk_size: vol.chunk_size() };
        // Under the directory's lock: no daemon uses it meanwhile.
        if let Some((ssd, _)) = SsdCache::open(dir, id, vol.generation(), vol.image_len(), u64::MAX, OpenMode::Inspect)?
        {
            if leftover {
                super::ssd::remove_files(dir, &CACHE_FILES)?;
                tracing::info!(dir = %dir.display(), "dropped the cache of an earlier ephemeral run (its guest's writes)");
            } else if ssd.dirty_chunks() > 0 {
                return Err(VolumeError::Cache {
                    dir: dir.clone(),
                    reason: format!(
                        "holds {} chunks of changes not yet uploaded, which --ephemeral would drop; upload them \
                         (`driveblk sync`), save them (`driveblk fork`) or drop them (`driveblk discard-local`) \
                         first, or give this ephemeral disk its own --cache-dir",
                        ssd.dirty_chunks()
                    ),
                });
            }
            drop(ssd);
        }
        if leftover && !opts.ephemeral {
            remove_synced(dir, &marker)?;
        }
    }
    if opts.ephemeral && !leftover {
        write_synced(dir, &marker)?;
    }
    Ok(())
}

fn write_synced(dir: &Path, path: &Path) -> VolumeResult<()> {
    let r = (|| -> std::io::Result<()> {
        private::create_dir_all(dir)?;
        private::write(path, b"this cache serves an ephemeral disk: its writes are dropped at the next start\n")?;
        std::fs::File::open(path)?.sync_all()?;
        std::fs::File::open(dir)?.sync_all()
    })();
    r.map_err(|e| VolumeError::io("marking the cache ephemeral", path, e))
}

fn remove_synced(dir: &Path, path: &Path) -> VolumeResult<()> {
    std::fs::remove_file(path)
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| VolumeError::io("removing", path, e))
}
