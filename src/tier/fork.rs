//! What to do with a cache's local changes once the volume moved on under
//! them (a forced takeover, a stolen lease): save them as a new volume that
//! shares the old one's data (`fork`), or drop them (`discard_local`).
//! Never decided silently.

use std::path::Path;

use super::cache_crypto::Sealing;
use super::ssd::{CacheIdentity, OpenMode, SsdCache};
use crate::remote::RemoteUrl;
use crate::volume::fork::create_fork;
use crate::volume::lease::{inspect, LeaseHolder};
use crate::volume::{runtime, RemoteOptions, VolumeError, VolumeReader, VolumeResult};

/// Files of a cache directory that describe its volume and contents
/// (`lock` and `status.json` stay).
pub(crate) const CACHE_FILES: [&str; 7] =
    ["state", "journal", "data", "frozen", "dirty-pages", "volume.json", "manifest"];

/// What [`fork`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forked {
    /// The new volume's id.
    pub volume_id: String,
    /// The origin's generation it starts from (the cache's base).
    pub from_generation: u64,
    /// Chunks of local changes the cache holds, now the fork's to upload.
    pub dirty_chunks: u64,
}

/// Creates at `new_url` a fork of the volume at `url` holding the state of
/// the cache in `cache_dir`: the generation its data is based on, plus its
/// local changes. The fork's generation 1 references the origin's packs
/// (nothing is uploaded again); the cache is re-tied to the fork, so
/// serving or syncing `new_url` with it uploads the changes there.
pub fn fork(url: &str, new_url: &str, cache_dir: &Path, remote: &RemoteOptions) -> VolumeResult<Forked> {
    let u = RemoteUrl::parse(url)?;
    let nu = RemoteUrl::parse(new_url)?;
    let rt = runtime("driveblk-fork")?;
    let origin = rt.block_on(VolumeReader::open(&u, remote))?;
    origin.check_cache_copy(cache_dir)?;
    if !cache_dir.join("state").exists() {
        return Err(VolumeError::Cache { dir: cache_dir.to_path_buf(), reason: "holds no cache to fork".into() });
    }
    let id = CacheIdentity { volume_id: origin.header.volume_id.clone(), chunk_size: origin.chunk_size() };
    let sealing = Sealing::AsFound(origin.key.clone());
    let (mut ssd, _) = SsdCache::open_sealed(
        cache_dir,
        id,
        origin.generation(),
        origin.image_len(),
        u64::MAX,
        OpenMode::Serve,
        &sealing,
    )?
    .ok_or_else(|| VolumeError::Cache { dir: cache_dir.to_path_buf(), reason: "could not be opened".into() })?;
    let g = ssd.generation();
    let from =
        if g == origin.generation() { (*origin.manifest()).clone() } else { rt.block_on(origin.load_generation(g))? };
    let dirty = ssd.dirty_chunks();
    let (header, _) = rt.block_on(create_fork(&origin, &from, &nu, remote, ssd.cache_id()))?;
    // The fork's registration keeps `from` from now on.
    rt.block_on(crate::volume::hold::release_for_cache(
        origin.remote.clone(),
        origin.url.clone(),
        ssd.cache_id().to_string(),
    ));
    let new_id = CacheIdentity { volume_id: header.volume_id.clone(), chunk_size: header.chunk_size };
    ssd.rebind(new_id, 1).map_err(|e| VolumeError::io("re-tying the cache to the fork in", cache_dir, e))?;
    drop(ssd);
    // The offline copies were the origin's; opening the fork writes its own.
    for f in ["volume.json", "manifest"] {
        let _ = std::fs::remove_file(cache_dir.join(f));
    }
    Ok(Forked { volume_id: header.volume_id, from_generation: g, dirty_chunks: dirty })
}

/// Drops the local changes of the cache in `cache_dir` (and everything
/// else it holds: the next start follows the volume's newest generation).
/// If this cache held the volume's writer lease, it is released. Returns
/// the bytes of changes dropped, or `None` for a cache whose state could
/// not be read (so what it held is unknown). A cache a newer driveblk
/// wrote is refused unless `force` (its state is sound: that version can
/// still upload its writes), and its lease is never released here.
pub fn discard_local(url: &str, cache_dir: &Path, remote: &RemoteOptions, force: bool) -> VolumeResult<Option<u64>> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-discard")?;
    let vol = rt.block_on(VolumeReader::open(&u, remote))?;
    // Releasing the lease writes to the remote.
    vol.check_cache_copy(cache_dir)?;
    let id = CacheIdentity { volume_id: vol.header.volume_id.clone(), chunk_size: vol.chunk_size() };
    let sealing = Sealing::AsFound(vol.key.clone());
    // A cache whose state cannot be read is what `serve` refuses and
    // points here for: it goes whole, and what it held is unknown. Its
    // lease is released if the state's header still names the holder
    // (else it stays until it runs out, or `serve --force-takeover`).
    if let Some(gone) = super::ssd::remove_damaged(cache_dir, &CACHE_FILES, force)? {
        tracing::warn!(dir = %cache_dir.display(), why = %gone.why, "removed a cache whose state could not be read");
        if let Some(cache_id) = gone.cache_id {
            release_lease(&rt, &vol, &cache_id)?;
            rt.block_on(crate::volume::hold::release_for_cache(vol.remote.clone(), vol.url.clone(), cache_id.clone()));
        }
        return Ok(None);
    }
    let Some((ssd, _)) =
        SsdCache::open_sealed(cache_dir, id, vol.generation(), vol.image_len(), u64::MAX, OpenMode::Inspect, &sealing)?
    else {
        return Ok(Some(0));
    };
    let dropped = ssd.dirty_data_chunks() * vol.chunk_size();
    let cache_id = ssd.cache_id().to_string();
    // Under the directory lock: no daemon uses it meanwhile.
    super::ssd::remove_files(cache_dir, &CACHE_FILES)?;
    drop(ssd);
    release_lease(&rt, &vol, &cache_id)?;
    rt.block_on(crate::volume::hold::release_for_cache(vol.remote.clone(), vol.url.clone(), cache_id.clone()));
    Ok(Some(dropped))
}

/// Releases the volume's writer lease if the cache `cache_id` holds it.
fn release_lease(rt: &tokio::runtime::Runtime, vol: &VolumeReader, cache_id: &str) -> VolumeResult<()> {
    let newest = vol.manifest();
    if let Some(rec) = newest.lease.clone().filter(|r| r.cache_id == cache_id) {
        let view = rt.block_on(inspect(&vol.remote, &vol.header, &newest, None))?;
        let current = view.holder.unwrap_or(rec);
        let h = LeaseHolder::resume(vol.remote.clone(), &vol.header.volume_id, current);
        rt.block_on(h.release(newest.generation))?;
        tracing::info!(url = %vol.url, "released the writer lease this cache held");
    }
    Ok(())
}
