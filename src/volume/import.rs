//! Creating volumes: `import` uploads an image file as packs plus
//! generation 1; `attach` makes a volume over an image file already on the
//! remote, uploading nothing but the header and an empty manifest.
//!
//! Order of writes (so a crash never publishes a reference to missing
//! data): every pack, then `volume.json`, then `gen-1` last.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::format::{
    check_chunk_size, gen_key, new_pack_key, BaseRef, ChunkRef, Manifest, VolumeHeader, GEN_PREFIX, HEADER_KEY,
    PACK_PREFIX,
};
use super::pack::PackWriter;
use super::reader::{connect, VolumeReader};
use super::{runtime, RemoteOptions, VolumeError, VolumeInfo, VolumeResult, DEFAULT_CHUNK_SIZE};
use crate::remote::{content_tag, DynRemote, ObjectMeta, PutBody, RemoteUrl};

/// Options for [`import`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub chunk_size: u64,
    /// Target pack size; a pack is uploaded once it reaches this.
    pub pack_size: u64,
    /// Packs uploading at once.
    pub parallel_uploads: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    pub remote: RemoteOptions,
    /// The image's format, recorded in the volume header (`raw`, `qcow2`).
    pub image_format: Option<String>,
    /// Encrypt the volume with a new data key wrapped by `remote.key`.
    pub encrypt: bool,
    /// Store chunks as sub-frames with an index per pack (docs/format.md),
    /// so a miss can fetch part of a chunk; false writes one frame per
    /// chunk, as versions before sub-frames did.
    pub subframes: bool,
}

impl Default for ImportOptions {
    /// 1 MiB chunks in 64 MiB packs, 2 uploads at a time, no progress bar.
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: 64 << 20,
            parallel_uploads: 2,
            progress: false,
            remote: RemoteOptions::default(),
            image_format: None,
            encrypt: false,
            subframes: true,
        }
    }
}

/// Options for [`attach`].
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    /// 0 means the default (1 MiB).
    pub chunk_size: u64,
    pub remote: RemoteOptions,
    /// The image's format, recorded in the volume header (`raw`, `qcow2`).
    pub image_format: Option<String>,
    /// Encrypt the volume (its own objects; the base stays as it is).
    pub encrypt: bool,
}

/// Refuses a key given by a flag for a new volume that is not to be
/// encrypted: the user meant an encrypted volume, and a volume whose header
/// says plaintext refuses that key from then on (`crypto::open_key`). A key
/// from `DRIVEBLK_KEY_FILE` alone may be meant for other volumes.
pub(crate) fn check_key_use(encrypt: bool, opts: &RemoteOptions) -> VolumeResult<()> {
    match opts.key.as_deref() {
        Some(k) if !encrypt && !k.ambient => Err(VolumeError::InvalidOptions(format!(
            "a key was given ({}) without --encrypt: the volume would be stored in clear; add --encrypt to encrypt it under that key, or give no key",
            k.source
        ))),
        _ => Ok(()),
    }
}

/// A new data key for `header`, wrapped by the caller's key, when asked to
/// encrypt (docs/encryption.md).
pub(crate) fn new_key(
    encrypt: bool,
    url: &str,
    header: &mut VolumeHeader,
    opts: &RemoteOptions,
) -> VolumeResult<Option<Arc<super::crypto::VolumeKey>>> {
    if !encrypt {
        return Ok(None);
    }
    let user = opts
        .key
        .as_deref()
        .ok_or_else(|| VolumeError::Key { url: url.to_string(), source: super::crypto::KeyError::Needed })?;
    let key = super::crypto::VolumeKey::generate();
    set_crypto(header, &key, user, url)?;
    Ok(Some(Arc::new(key)))
}

/// Marks `header` encrypted with `key`, wrapped by `user`.
pub(crate) fn set_crypto(
    header: &mut VolumeHeader,
    key: &super::crypto::VolumeKey,
    user: &super::crypto::UserKey,
    url: &str,
) -> VolumeResult<()> {
    let h = key.wrap(user).map_err(|source| VolumeError::Key { url: url.to_string(), source })?;
    header.encryption = super::crypto::CIPHER_NAME.into();
    header.crypto = Some(serde_json::to_value(h).expect("crypto header serialises"));
    Ok(())
}

/// Refuses to create a volume where one exists; clears packs left behind
/// by an import that died before writing its header (nothing refers to
/// them).
pub(crate) async fn prepare_new(remote: &DynRemote, url: &str) -> VolumeResult<()> {
    // The one place a volume's folder is made (writes never make it).
    remote.create_folder().await.map_err(|e| VolumeError::remote(format!("creating the folder of {url}"), e))?;
    match remote.head(HEADER_KEY).await {
        Ok(_) => return Err(VolumeError::AlreadyExists { url: url.to_string() }),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(VolumeError::remote(format!("checking {url}/{HEADER_KEY}"), e)),
    }
    // Packs are only "left by an interrupted import" when no volume owns
    // them: a header in the trash, or generations without a header, mean
    // a volume that lost its header (deleting its packs would destroy it).
    super::reader::missing_header(remote, url).await?;
    let gens = remote.list(GEN_PREFIX).await.map_err(|e| VolumeError::remote(format!("listing {url}"), e))?;
    if !gens.is_empty() {
        return Err(VolumeError::HeaderMissing { url: url.to_string() });
    }
    let stale = remote.list(PACK_PREFIX).await.map_err(|e| VolumeError::remote(format!("listing {url}"), e))?;
    for m in stale {
        tracing::info!(key = %m.key, "removing a pack left by an interrupted import");
        remote.delete(&m.key).await.map_err(|e| VolumeError::remote(format!("deleting stale {url}/{}", m.key), e))?;
    }
    Ok(())
}

/// Writes the header, then the manifest (the commit point). The manifest
/// names the slot of generation 2, so write-back's first commit is fenced
/// on stores whose names are not unique (Drive) as every later one is.
pub(crate) async fn commit_new(
    remote: &DynRemote,
    url: &str,
    header: &VolumeHeader,
    manifest: &Manifest,
) -> VolumeResult<()> {
    let mut manifest = manifest.clone();
    let mut header = header.clone();
    let key = gen_key(manifest.generation);
    let next = gen_key(manifest.generation + 1);
    // Generation 1 at a slot the header names: readers elsewhere follow
    // ids from the header on, never waiting for a listing.
    header.first_slot =
        remote.reserve(&key).await.map_err(|e| VolumeError::remote(format!("reserving {url}/{key}"), e))?;
    manifest.next_slot =
        remote.reserve(&next).await.map_err(|e| VolumeError::remote(format!("reserving {url}/{next}"), e))?;
    remote
        .put(HEADER_KEY, PutBody::from_bytes(header.to_bytes()))
        .await
        .map_err(|e| VolumeError::remote(format!("writing {url}/{HEADER_KEY}"), e))?;
    // Tells people browsing the folder what it is; the volume works
    // without it (`verify --repair` writes a missing one).
    if let Err(e) = super::verify::write_readme(remote, &header.volume_id).await {
        tracing::warn!(error = %e, "could not write the volume folder's README");
    }
    let bytes = manifest.to_bytes();
    let r = match &header.first_slot {
        Some(slot) => remote.create(&key, Some(slot), &content_tag(&bytes), PutBody::from_bytes(bytes)).await,
        None => remote.put(&key, PutBody::from_bytes(bytes)).await,
    };
    r.map_err(|e| VolumeError::remote(format!("committing {url}/{key}"), e))?;
    Ok(())
}

/// A pack's bytes in an upload, handed back for the next pack when the
/// upload is done with them.
struct Recycled {
    buf: Vec<u8>,
    back: crossbeam_channel::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let _ = self.back.send(std::mem::take(&mut self.buf));
    }
}

/// A finished pack upload: its identity goes into the manifest so other
/// hosts open the volume without waiting for a listing to show the pack.
fn record_pack(
    manifest: &mut Manifest,
    r: Result<VolumeResult<ObjectMeta>, tokio::task::JoinError>,
) -> VolumeResult<()> {
    let meta = r.map_err(VolumeError::task("uploading a pack"))??;
    if let Some(slot) = meta.slot {
        manifest.ids.insert(meta.key, slot);
    }
    Ok(())
}

/// Uploads the image file at `image` as a new volume at `url`: chunks it,
/// skips all-zero chunks, compresses each chunk on its own into packs,
/// uploads them, then commits generation 1. The image's bytes are stored
/// as they are (a qcow2 file stays a qcow2 file).
pub fn import(image: &Path, url: &str, opts: &ImportOptions) -> VolumeResult<VolumeInfo> {
    check_chunk_size(opts.chunk_size).map_err(VolumeError::InvalidOptions)?;
    check_key_use(opts.encrypt, &opts.remote)?;
    let u = RemoteUrl::parse(url)?;
    let url_s = u.to_string();
    let mut file = File::open(image).map_err(|e| VolumeError::io("opening image", image, e))?;
    let image_len = file.metadata().map_err(|e| VolumeError::io("reading size of", image, e))?.len();
    let rt = runtime("driveblk-import")?;
    let remote = connect(u.folder_with(&opts.remote.config), &opts.remote);
    rt.block_on(prepare_new(&remote, &url_s))?;

    let mut header = VolumeHeader::new(image_len, opts.chunk_size, None);
    header.image_format = opts.image_format.clone();
    let key = new_key(opts.encrypt, &url_s, &mut header, &opts.remote)?;
    let remote = super::crypto::wrap(remote, key.as_ref());
    let mut manifest = Manifest::new(&header, 1);
    let bar = super::progress::bar_of(opts.progress, image_len, "import", super::progress::Unit::Bytes);
    let cs = opts.chunk_size as usize;
    // A pack ships once it reaches pack_size; one more frame may overshoot.
    // Pack buffers come back when their upload drops them: the next pack
    // reuses the memory instead of faulting in 64 MiB afresh.
    let pack_cap = opts.pack_size as usize + cs + 4096;
    let (spare_tx, spare_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let new_pack = || {
        let p = if opts.subframes { PackWriter::indexed(opts.chunk_size) } else { PackWriter::new() };
        p.in_buffer(spare_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(pack_cap)))
    };
    let mut pack = new_pack();
    let mut uploads: JoinSet<VolumeResult<ObjectMeta>> = JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.parallel_uploads.max(1)));
    let mut pos = 0u64;
    // Ships the current pack in the background; at most
    // `parallel_uploads` are in memory and in flight at once.
    let ship = |pack: PackWriter,
                manifest: &mut Manifest,
                uploads: &mut JoinSet<VolumeResult<ObjectMeta>>|
     -> VolumeResult<()> {
        let key = manifest.packs.last().cloned().expect("pack key registered before its chunks");
        let permit = rt
            .block_on(sem.clone().acquire_owned())
            .map_err(|_| VolumeError::Cancelled("the upload limiter closed"))?;
        let remote = remote.clone();
        let url = url_s.clone();
        let (buf, index) = pack.finish();
        if let Some(ix) = index {
            manifest.indexes.insert(key.clone(), ix);
        }
        let body = PutBody::from_bytes(bytes::Bytes::from_owner(Recycled { buf, back: spare_tx.clone() }));
        uploads.spawn_on(
            async move {
                let r =
                    remote.put(&key, body).await.map_err(|e| VolumeError::remote(format!("uploading {url}/{key}"), e));
                drop(permit);
                r
            },
            rt.handle(),
        );
        Ok(())
    };
    // Chunks are read on one thread and compressed on every core.
    let threads = super::compress::default_threads();
    let sub = pack.sub_size();
    super::compress::compress_file(image, &mut file, image_len, cs, threads, sub, |idx, n, c| {
        if let Some(c) = c {
            if pack.is_empty() {
                manifest.packs.push(new_pack_key(1));
            }
            let pc = pack
                .add_compressed(&c.frame, c.entry.clone(), c.digest.clone())
                .map_err(|e| VolumeError::io("packing a chunk of", image, e))?;
            let pack_no = (manifest.packs.len() - 1) as u32;
            manifest
                .chunks
                .insert(idx, ChunkRef::Packed { pack: pack_no, offset: pc.offset, len: pc.len, digest: pc.digest });
            if pack.len() as u64 >= opts.pack_size {
                ship(std::mem::replace(&mut pack, new_pack()), &mut manifest, &mut uploads)?;
            }
        }
        // Reap finished uploads early so a failure stops the import soon.
        while let Some(r) = uploads.try_join_next() {
            record_pack(&mut manifest, r)?;
        }
        pos += n as u64;
        bar.set_position(pos);
        Ok(())
    })?;
    if !pack.is_empty() {
        ship(pack, &mut manifest, &mut uploads)?;
    }
    rt.block_on(async {
        while let Some(r) = uploads.join_next().await {
            record_pack(&mut manifest, r)?;
        }
        Ok::<(), VolumeError>(())
    })?;
    bar.finish_and_clear();
    // Every pack is durable on the remote; only now publish the volume.
    rt.block_on(commit_new(&remote, &url_s, &header, &manifest))?;
    let r = rt.block_on(VolumeReader::open(&u, &opts.remote))?;
    Ok(VolumeInfo::from_reader(&r))
}

/// The first `n` bytes (fewer in a smaller file) of the image file at
/// `base_url` that [`attach`] would make the base of a volume at
/// `volume_url`, for a look at its format before anything is written.
pub fn base_head(base_url: &str, volume_url: &str, n: u64, opts: &RemoteOptions) -> VolumeResult<Vec<u8>> {
    let vu = RemoteUrl::parse(volume_url)?;
    let bu = RemoteUrl::parse(base_url)?;
    let rt = runtime("driveblk-attach")?;
    rt.block_on(async {
        let (base_remote, key) = super::reader::base_backend(&vu, &bu.to_string(), opts)?;
        let meta = base_remote.head(&key).await.map_err(|e| VolumeError::remote(format!("base image {bu}"), e))?;
        let end = n.min(meta.size);
        if end == 0 {
            return Ok(Vec::new());
        }
        let b = base_remote
            .get_range(&key, 0..end)
            .await
            .map_err(|e| VolumeError::remote(format!("reading the start of base image {bu}"), e))?;
        Ok(b.to_vec())
    })
}

/// Creates a volume at `volume_url` whose base is the image file at
/// `base_url` on the remote: every chunk reads from that file until
/// written. Nothing is uploaded but `volume.json` and an empty `gen-1`.
pub fn attach(base_url: &str, volume_url: &str, opts: &AttachOptions) -> VolumeResult<VolumeInfo> {
    let cs = if opts.chunk_size == 0 { DEFAULT_CHUNK_SIZE } else { opts.chunk_size };
    check_chunk_size(cs).map_err(VolumeError::InvalidOptions)?;
    check_key_use(opts.encrypt, &opts.remote)?;
    let bu = RemoteUrl::parse(base_url)?;
    let vu = RemoteUrl::parse(volume_url)?;
    let rt = runtime("driveblk-attach")?;
    rt.block_on(async {
        // Refused here, before anything is written, where serve would
        // refuse it: away from the volume without --allow-base, or a link.
        let (base_remote, key) = super::reader::base_backend(&vu, &bu.to_string(), &opts.remote)?;
        let meta = base_remote.head(&key).await.map_err(|e| VolumeError::remote(format!("base image {bu}"), e))?;
        // Pin the content, not the file: its head revision is kept
        // forever, so base chunks stay readable from it even after the
        // file is replaced (Drive otherwise purges old revisions). First,
        // so a file this account may not pin leaves no volume behind.
        if let Some(rev) = &meta.revision {
            base_remote
                .keep_revision(&key, rev)
                .await
                .map_err(|e| VolumeError::remote(format!("pinning revision {rev} of base image {bu}"), e))?;
        }
        let remote = connect(vu.folder_with(&opts.remote.config), &opts.remote);
        let url_s = vu.to_string();
        prepare_new(&remote, &url_s).await?;
        let mut header = VolumeHeader::new(meta.size, cs, None);
        let vkey = new_key(opts.encrypt, &url_s, &mut header, &opts.remote)?;
        let remote = super::crypto::wrap(remote, vkey.as_ref());
        let base = BaseRef {
            url: bu.to_string(),
            size: meta.size,
            version: meta.version,
            revision: meta.revision,
            md5: meta.md5,
            sha256: meta.sha256,
        };
        header.base = Some(base);
        header.image_format = opts.image_format.clone();
        let manifest = Manifest::new(&header, 1);
        commit_new(&remote, &url_s, &header, &manifest).await?;
        let r = VolumeReader::open(&vu, &opts.remote).await?;
        Ok(VolumeInfo::from_reader(&r))
    })
}
