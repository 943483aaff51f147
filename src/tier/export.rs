//! Exporting a volume to a standalone image file: the committed chunks from
//! the remote, overlaid with the local cache's chunks when its directory is
//! given (which is how writes not uploaded yet get out).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::cache_crypto::Sealing;
use super::ssd::{CacheIdentity, OpenMode, SsdCache, DIRTY, DIRTY_PARTIAL, PAGE};
use crate::remote::{private, RemoteUrl};
use crate::volume::{runtime, ChunkRef, RemoteOptions, VolumeError, VolumeReader, VolumeResult};

/// Copies into `chunk` the pages of `local` that `present` marks.
fn overlay_present(chunk: &mut [u8], local: &[u8], present: &[u64]) {
    let page = PAGE as usize;
    for (p, dst) in chunk.chunks_mut(page).enumerate() {
        if present.get(p / 64).is_some_and(|w| (w >> (p % 64)) & 1 == 1) {
            let src = &local[p * page..];
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
        }
    }
}

/// Bytes of chunks an export keeps in flight by default. A remote that
/// gives each request a first-byte delay and shares its bandwidth between
/// transfers (Drive, object stores, any TCP path with a round trip) moves
/// in-flight / (delay + in-flight / bandwidth): on a 200 Mbit/s link with a
/// 100 ms round trip, 16 MiB fill 63% of it (measured) and 64 MiB 90%.
const IN_FLIGHT_BYTES: u64 = 64 << 20;

/// Options for [`export`].
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// The volume's cache directory: its dirty chunks (local writes not yet
    /// uploaded) are included, and its clean chunks save downloads. The
    /// daemon serving the volume must be stopped (the directory is locked).
    pub cache_dir: Option<PathBuf>,
    /// Parallel chunk fetches; 0: as many chunks as make 64 MiB.
    pub parallel: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    pub remote: RemoteOptions,
}

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Length of the written file.
    pub bytes: u64,
    pub chunks_from_remote: u64,
    pub chunks_from_cache: u64,
    /// Of those from the cache, how many held local writes.
    pub dirty_chunks: u64,
    /// Chunks left as holes.
    pub zero_chunks: u64,
}

/// Writes the image file of the volume at `url` to `file` (via a temp name
/// and rename, so `file` is either the complete image or untouched).
fn export_without_cache(url: &str, file: &Path, opts: &ExportOptions) -> VolumeResult<ExportSummary> {
    export(url, file, &ExportOptions { cache_dir: None, ..opts.clone() })
}

pub fn export(url: &str, file: &Path, opts: &ExportOptions) -> VolumeResult<ExportSummary> {
    let u = RemoteUrl::parse(url)?;
    let rt = runtime("driveblk-export")?;
    let reader = rt.block_on(VolumeReader::open(&u, &opts.remote))?;
    // Cached chunks a newer generation changed (a clean cache of an older
    // generation): fetched from the remote instead.
    let mut stale = std::collections::HashSet::new();
    let mut newest = false;
    let cache = match &opts.cache_dir {
        None => None,
        Some(dir) => {
            reader.check_cache_copy(dir)?;
            let id = CacheIdentity { volume_id: reader.header.volume_id.clone(), chunk_size: reader.chunk_size() };
            let sealing = Sealing::AsFound(reader.key.clone());
            let c = SsdCache::open_sealed(
                dir,
                id,
                reader.generation(),
                reader.image_len(),
                u64::MAX,
                OpenMode::Inspect,
                &sealing,
            )?;
            if c.is_none() {
                tracing::warn!(dir = %dir.display(), "cache directory holds nothing for this volume; exporting the remote copy only");
            }
            if let Some((c, _)) = &c {
                if c.generation() != reader.generation() {
                    let old = rt.block_on(reader.load_generation(c.generation()));
                    match old {
                        // The cache's chunks hold its generation's bytes plus
                        // its changes: export exactly that view, not a mix
                        // with a newer generation committed elsewhere.
                        Ok(m) if c.dirty_chunks() > 0 => {
                            tracing::warn!(
                                cache = c.generation(),
                                remote = reader.generation(),
                                "exporting the cache's generation with its local changes, not the newer one on the \
                                 remote (export without --cache-dir for that)"
                            );
                            reader.set_manifest(m);
                        }
                        // Nothing local to keep: the newest generation, with
                        // only the cached chunks it did not change.
                        Ok(m) => {
                            let (new, has_base) = (reader.manifest(), reader.base.is_some());
                            newest = true;
                            stale = (0..new.chunk_count().max(m.chunk_count()))
                                .filter(|&i| !m.chunk(i, has_base).same_bytes(&new.chunk(i, has_base)))
                                .collect();
                        }
                        Err(e) if c.dirty_chunks() > 0 => return Err(e),
                        // Its clean chunks may be stale; use none of them.
                        Err(_) => return export_without_cache(url, file, opts),
                    }
                }
            }
            c.map(|(c, _)| c)
        }
    };
    let len = cache.as_ref().filter(|_| !newest).map_or(reader.image_len(), |c| c.len());
    let cs = reader.chunk_size();
    let tmp = file
        .with_file_name(format!(".{}.driveblk-partial", file.file_name().and_then(|n| n.to_str()).unwrap_or("export")));
    // The export is the guest's disk in clear: a new file only its owner
    // can read, whatever the umask, and never through a link someone
    // planted at this predictable name (unlinking removes the link, not
    // what it points to; O_EXCL then refuses one planted since).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(VolumeError::io("removing the stale", &tmp, e))
        }
        _ => {}
    }
    let out = private::options()
        .create_new(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| VolumeError::io("creating", &tmp, e))?;
    // Sparse: chunks never written stay holes and read as zeroes.
    out.set_len(len).map_err(|e| VolumeError::io("sizing", &tmp, e))?;
    let nchunks = len.div_ceil(cs);
    let bar = crate::volume::progress::bar(opts.progress, nchunks, "export");
    let mut sum = ExportSummary { bytes: len, ..Default::default() };
    let write = |idx: u64, data: &[u8]| -> VolumeResult<()> {
        let n = (len - idx * cs).min(cs) as usize;
        let data = &data[..n.min(data.len())];
        if data.iter().all(|&b| b == 0) {
            return Ok(());
        }
        out.write_all_at(data, idx * cs).map_err(|e| VolumeError::io("writing", &tmp, e))
    };
    let mut remote_idx = Vec::new();
    for idx in 0..nchunks {
        // Only whole chunks come from the cache; a partial one (some pages
        // prefetched) is fetched from the remote like an absent one, and
        // one dirty in part is fetched and overlaid with its local pages.
        if cache.as_ref().is_some_and(|c| c.state(idx) == DIRTY_PARTIAL) {
            remote_idx.push(idx);
            continue;
        }
        match cache.as_ref().filter(|c| c.has_chunk(idx) && !stale.contains(&idx)) {
            Some(c) => {
                let st = c.state(idx);
                let data = c.read_chunk(idx).map_err(|e| VolumeError::io("reading cache of", c.dir(), e))?;
                write(idx, &data)?;
                sum.chunks_from_cache += 1;
                sum.dirty_chunks += (st == DIRTY) as u64;
                bar.inc(1);
            }
            _ if reader.chunk_ref(idx) == ChunkRef::Zero => {
                sum.zero_chunks += 1;
                bar.inc(1);
            }
            _ => remote_idx.push(idx),
        }
    }
    let parallel = match opts.parallel {
        0 => (IN_FLIGHT_BYTES / cs.max(1)).clamp(8, 1024) as usize,
        n => n,
    };
    rt.block_on(async {
        let r = &reader;
        let mut s = futures::stream::iter(remote_idx)
            .map(|idx| async move { (idx, r.fetch_chunk(idx).await) })
            // Unordered: an answer frees its slot at once (writes are
            // positional). In order, a window's answers waited for its
            // slowest and the link idled a round trip per window.
            .buffer_unordered(parallel);
        while let Some((idx, res)) = s.next().await {
            let mut data = res?.data;
            if let Some(c) = cache.as_ref() {
                if let Some(present) = c.present_pages(idx) {
                    data.resize(cs as usize, 0);
                    let local = c.read_chunk(idx).map_err(|e| VolumeError::io("reading cache of", c.dir(), e))?;
                    overlay_present(&mut data, &local, &present);
                    sum.dirty_chunks += 1;
                }
            }
            write(idx, &data)?;
            sum.chunks_from_remote += 1;
            bar.inc(1);
        }
        Ok::<(), VolumeError>(())
    })?;
    bar.finish_and_clear();
    out.sync_all().map_err(|e| VolumeError::io("syncing", &tmp, e))?;
    drop(out);
    std::fs::rename(&tmp, file).map_err(|e| VolumeError::io("renaming export into place at", file, e))?;
    Ok(sum)
}
