//! Opening a volume on its remote (header, newest committed generation,
//! base file) and fetching single chunks with verification.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::format::{gen_key, parse_gen_key, ChunkRef, Manifest, VolumeHeader, GEN_PREFIX, HEADER_KEY, PATCH_PAGE};
use super::pack::decode_chunk_upto;
use super::saved_index::SavedIndexes;
use super::subframe::PackIndex;
use super::{RemoteOptions, VolumeError, VolumeResult};
use crate::remote::{private, Slot};
use crate::remote::{DynRemote, RemoteUrl, RetryingRemote};

/// Names of the header and manifest copies in a cache directory.
const OFFLINE_HEADER: &str = "volume.json";
const OFFLINE_MANIFEST: &str = "manifest";

/// Wraps a freshly opened backend in the caller's layers, then retry
/// outermost so every attempt passes through (and is counted by) the layers.
pub(crate) fn connect(backend: DynRemote, opts: &RemoteOptions) -> DynRemote {
    let layered = match &opts.layer {
        Some(l) => l(backend),
        None => backend,
    };
    RetryingRemote::wrap(layered, opts.retry.clone())
}

/// The base image file of a volume.
#[derive(Debug)]
pub struct BaseFile {
    pub url: String,
    pub remote: DynRemote,
    pub key: String,
    pub size: u64,
    /// The pinned content revision base chunks are read from (Drive), so
    /// a file replaced since attach is never read as the volume's data.
    pub revision: Option<String>,
    /// What open noticed about the base (replaced but served from its
    /// pinned revision; adopted), for `info` and logs.
    pub note: Option<String>,
}

/// What a volume advises when its base can no longer be read as pinned.
const BASE_ADVICE: &str = "restore the original content (Drive web UI: Manage versions), or re-import the image; `driveblk adopt` before replacing a base keeps a volume independent of it";

/// The remote and key to read the volume at `url`'s base `base_url` from,
/// if the volume may read it. The header naming the base is not
/// authenticated: whoever can write it could point a daemon (often root)
/// at any file the host can read, and base chunks carry no digest. So a
/// base is read only where `attach` finds it for the volume's own backend
/// — a `dir:` file beside the volume's folder (`attach dir:/nas/img
/// dir:/nas/vol`), never through a symbolic link; a Drive file for a
/// Drive volume; an object in the volume's bucket — or when the user
/// allowed it by its URL (`opts.allow_base`).
pub(crate) fn base_backend(url: &RemoteUrl, base_url: &str, opts: &RemoteOptions) -> VolumeResult<(DynRemote, String)> {
    let burl = RemoteUrl::parse(base_url)?;
    if opts.allow_base.iter().any(|a| RemoteUrl::parse(a).is_ok_and(|a| a == burl)) {
        let (backend, key) = burl.object_with(&opts.config);
        return Ok((connect(backend, opts), key));
    }
    let refused = |why: String| VolumeError::BaseRefused { url: url.to_string(), base: base_url.to_string(), why };
    match (url, &burl) {
        (RemoteUrl::Dir { parent, name }, RemoteUrl::Dir { parent: bparent, name: bname }) => {
            if bparent != parent && *bparent != parent.join(name) {
                return Err(refused(format!("which is not in {}, the folder holding the volume", parent.display())));
            }
            let backend = crate::remote::DirRemote::new(bparent.clone()).refusing_symlinks();
            Ok((connect(Arc::new(backend), opts), bname.clone()))
        }
        (RemoteUrl::GDrive(_), RemoteUrl::GDrive(_)) => {
            let (backend, key) = burl.object_with(&opts.config);
            Ok((connect(backend, opts), key))
        }
        (RemoteUrl::ObjStore { kind, bucket, .. }, RemoteUrl::ObjStore { kind: bkind, bucket: bbucket, .. })
            if kind == bkind && bucket == bbucket =>
        {
            let (backend, key) = burl.object_with(&opts.config);
            Ok((connect(backend, opts), key))
        }
        _ => Err(refused("which is on another store than the volume".to_string())),
    }
}

/// The volume's base: its adopted copy when the manifest names one, else
/// the original file, checked against the pin in the header.
async fn open_base(
    url: &RemoteUrl,
    url_s: &str,
    header: &VolumeHeader,
    manifest: &Manifest,
    remote: &DynRemote,
    origins: &[(String, DynRemote)],
    opts: &RemoteOptions,
) -> VolumeResult<Option<BaseFile>> {
    let Some(b) = &header.base else { return Ok(None) };
    if let Some(c) = &manifest.base_copy {
        let copy = adopted_copy(url_s, remote, origins, c, b)?;
        let m = copy.remote.head(&copy.key).await.map_err(|e| {
            VolumeError::remote(format!("the adopted copy {} of base image {} of volume {url_s}", c.key, b.url), e)
        })?;
        if m.size != c.size || (m.md5.is_some() && c.md5.is_some() && m.md5 != c.md5) {
            return Err(VolumeError::BaseChanged {
                url: url_s.to_string(),
                base: format!("{url_s}/{}", c.key),
                what: format!(
                    "the adopted copy holds {} bytes (md5 {:?}), expected {} (md5 {:?})",
                    m.size, m.md5, c.size, c.md5
                ),
            });
        }
        return Ok(Some(copy));
    }
    let (bremote, bkey) = base_backend(url, &b.url, opts)?;
    let meta = bremote
        .head(&bkey)
        .await
        .map_err(|e| VolumeError::remote(format!("base image {} of volume {url_s}", b.url), e))?;
    let changed = |what: String| VolumeError::BaseChanged { url: url_s.to_string(), base: b.url.clone(), what };
    let mut note = None;
    if let Some(rev) = &b.revision {
        let same_md5 = |m: &Option<String>| m.is_none() || b.md5.is_none() || m == &b.md5;
        if meta.revision.as_deref() != Some(rev) || meta.size != b.size || !same_md5(&meta.md5) {
            // The content was replaced: the volume reads the pinned
            // revision if Drive still has it, and never the new content.
            let now = format!(
                "its head revision is now {} ({} bytes, md5 {}), pinned was {rev} ({} bytes, md5 {})",
                meta.revision.as_deref().unwrap_or("?"),
                meta.size,
                meta.md5.as_deref().unwrap_or("?"),
                b.size,
                b.md5.as_deref().unwrap_or("?")
            );
            match bremote.head_revision(&bkey, rev).await {
                Ok(r) if r.size == b.size && same_md5(&r.md5) => {
                    let n = format!("base image {} was replaced since attach ({now}); serving its pinned revision, which Drive keeps forever. Run `driveblk adopt {url_s}` to copy it into the volume", b.url);
                    tracing::warn!("{n}");
                    note = Some(n);
                }
                Ok(r) => {
                    return Err(changed(format!(
                        "{now}, and the pinned revision now reads {} bytes (md5 {:?}); {BASE_ADVICE}",
                        r.size, r.md5
                    )))
                }
                Err(e) if e.is_not_found() => {
                    return Err(changed(format!(
                        "its content was replaced ({now}), and the pinned revision is gone (deleted, or purged by Drive); the volume's base chunks can no longer be read: {BASE_ADVICE}"
                    )))
                }
                Err(e) => return Err(VolumeError::remote(format!("pinned revision {rev} of base image {} of volume {url_s}", b.url), e)),
            }
        }
    } else {
        if meta.size != b.size {
            return Err(changed(format!("size was {}, is now {}; re-attach it", b.size, meta.size)));
        }
        if b.version.is_some() && meta.version.is_some() && meta.version != b.version {
            return Err(changed(format!(
                "version was {}, is now {}; the volume's view of it would silently shift; re-attach it",
                b.version.as_deref().unwrap_or("?"),
                meta.version.as_deref().unwrap_or("?")
            )));
        }
    }
    Ok(Some(BaseFile {
        url: b.url.clone(),
        remote: bremote,
        key: bkey,
        size: b.size,
        revision: b.revision.clone(),
        note,
    }))
}

/// The adopted copy `c` of base `b` as a base file: in the volume's own
/// folder, or (`<origin id>:base-*`, a fork's) in its origin's.
fn adopted_copy(
    url_s: &str,
    remote: &DynRemote,
    origins: &[(String, DynRemote)],
    c: &super::format::BaseCopy,
    b: &super::format::BaseRef,
) -> VolumeResult<BaseFile> {
    let (folder, key) = object_remote(url_s, remote, origins, &c.key)?;
    if let Some(s) = &c.slot {
        folder.locate(key, s);
    }
    let url =
        if Arc::ptr_eq(folder, remote) { format!("{url_s}/{key}") } else { format!("{}/{key}", folder.describe()) };
    Ok(BaseFile {
        url,
        remote: folder.clone(),
        key: key.to_string(),
        size: c.size,
        revision: None,
        note: Some(format!("adopted: base chunks are read from the volume's own copy {} of {}", c.key, b.url)),
    })
}

/// Where an object a manifest names lives: `<volume id>:<key>` names an
/// origin's object (a fork's), anything else one of the volume's folder.
fn object_remote<'a>(
    url_s: &str,
    remote: &'a DynRemote,
    origins: &'a [(String, DynRemote)],
    key: &'a str,
) -> VolumeResult<(&'a DynRemote, &'a str)> {
    match super::format::split_pack_key(key) {
        (None, k) => Ok((remote, k)),
        (Some(vid), k) => match origins.iter().find(|(v, _)| v == vid) {
            Some((_, r)) => Ok((r, k)),
            None => Err(VolumeError::CorruptManifest {
                url: url_s.to_string(),
                key: key.to_string(),
                reason: format!("it names volume {vid}, which is not an origin of this one"),
            }),
        },
    }
}

/// Tells each folder the ids of its objects a manifest lists (Drive finds
/// them by id instead of through a lagging listing).
fn locate_ids(remote: &DynRemote, origins: &[(String, DynRemote)], ids: &BTreeMap<String, crate::remote::Slot>) {
    for (k, slot) in ids {
        if let Ok((r, key)) = object_remote("", remote, origins, k) {
            r.locate(key, slot);
        }
    }
}

/// A volume as committed on the remote: header plus newest manifest.
#[derive(Debug)]
pub struct VolumeReader {
    /// The volume's URL, for messages.
    pub url: String,
    pub remote: DynRemote,
    pub header: VolumeHeader,
    /// The resolved manifest of the generation being served; replaced when
    /// write-back commits a new one (readers of a chunk's ref always see
    /// one whole manifest).
    manifest: ArcSwap<Manifest>,
    pub base: Option<BaseFile>,
    /// The header as read, so a cache can keep a copy.
    header_raw: Bytes,
    /// True when opened from the cache's copies because the remote was
    /// unreachable.
    pub offline: bool,
    /// A fork's origin volumes (id, folder), whose packs its manifests name.
    origins: Vec<(String, DynRemote)>,
    /// The data key of an encrypted volume (`remote` and the origins'
    /// folders seal and open with it; a fork shares its origin's).
    pub key: Option<Arc<super::crypto::VolumeKey>>,
    /// Sub-frame indexes of packs, fetched once each (pack key -> index).
    indexes: IndexCache,
    /// Where fetched indexes are kept across restarts (a cache directory).
    saved: std::sync::OnceLock<SavedIndexes>,
    /// When the served generation was last known to be the newest (read
    /// as such from the remote, or committed by this process), by the wall
    /// clock, which goes on while a laptop sleeps (a monotonic one stops).
    newest_known_at: parking_lot::Mutex<Option<std::time::SystemTime>>,
}

type IndexCache = parking_lot::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<PackIndex>>>>>;

/// Part of a chunk, fetched alone (see [`VolumeReader::fetch_part`]).
pub struct Part {
    /// The reference the bytes were fetched by.
    pub chunk_ref: ChunkRef,
    /// Offset of `data` in the chunk (a sub-frame boundary).
    pub off: u64,
    /// The chunk's bytes from `off` (whole sub-frames, cut at the chunk's
    /// end in the image).
    pub data: Vec<u8>,
    /// Bytes that crossed the link.
    pub wire_bytes: u64,
}

/// The key of an encrypted volume, unwrapped with the caller's key
/// (`None` for a plaintext volume); a missing or wrong key is an error
/// here, at open, before any data is read.
pub(crate) fn volume_key(
    url: &str,
    header: &VolumeHeader,
    opts: &RemoteOptions,
) -> VolumeResult<Option<Arc<super::crypto::VolumeKey>>> {
    super::crypto::open_key(header.crypto.as_ref(), opts.key.as_deref())
        .map_err(|source| VolumeError::Key { url: url.to_string(), source })
}

/// The folders of a fork's origins (nearest first), for pack reads.
fn origin_remotes(
    header: &VolumeHeader,
    opts: &RemoteOptions,
    key: Option<&Arc<super::crypto::VolumeKey>>,
) -> VolumeResult<Vec<(String, DynRemote)>> {
    let Some(o) = &header.origin else { return Ok(Vec::new()) };
    o.chain()
        .into_iter()
        .map(|o| {
            let u = RemoteUrl::parse(&o.url)?;
            Ok((o.volume_id.clone(), super::crypto::wrap(connect(u.folder_with(&opts.config), opts), key)))
        })
        .collect()
}

/// Why `volume.json` cannot be read at `url` when it is not found: in the
/// Drive trash (a click in the web UI), else plainly absent.
pub(crate) async fn missing_header(remote: &DynRemote, url: &str) -> VolumeResult<()> {
    match remote.find_trashed(HEADER_KEY).await {
        Ok(Some(_)) => Err(VolumeError::InTrash { url: url.to_string(), key: HEADER_KEY.to_string() }),
        Ok(None) => Ok(()),
        Err(e) => Err(VolumeError::remote(format!("looking for {url}/{HEADER_KEY} in the trash"), e)),
    }
}

/// What one chunk fetch returned.
pub struct Fetched {
    /// The reference the bytes were fetched by (a commit may replace it
    /// while the fetch is under way).
    pub chunk_ref: ChunkRef,
    /// The uncompressed chunk, exactly `chunk_len(idx)` bytes.
    pub data: Vec<u8>,
    /// Bytes that crossed the link (compressed size for packs).
    pub wire_bytes: u64,
}

impl VolumeReader {
    /// Opens the volume at `url`: reads `volume.json`, finds the newest
    /// `gen-*`, verifies it, and checks the base file is unchanged.
    pub async fn open(url: &RemoteUrl, opts: &RemoteOptions) -> VolumeResult<Arc<Self>> {
        let url_s = url.to_string();
        let remote = connect(url.folder_with(&opts.config), opts);
        // Drive's listings lag behind creates, and a path is found by
        // listing: a volume another host created moments ago is looked
        // for again for a while before it counts as absent.
        let grace = match url.scheme() {
            crate::remote::url::Scheme::GDrive => opts.config.drive.open_grace,
            // Object stores list what they created (S3 has been strongly
            // consistent since 2020; GCS and Azure always were).
            crate::remote::url::Scheme::Dir | crate::remote::url::Scheme::ObjStore => std::time::Duration::ZERO,
        };
        let t0 = std::time::Instant::now();
        let mut wait = std::time::Duration::from_millis(250);
        let header_bytes = loop {
            match remote.get(HEADER_KEY).await {
                Ok(b) => break b,
                Err(e) if e.is_not_found() && t0.elapsed() < grace => {
                    tracing::info!(url = %url_s, "no volume listed there yet; looking again (Drive listings lag behind creates)");
                    tokio::time::sleep(wait.min(grace.saturating_sub(t0.elapsed()))).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
                Err(e) if e.is_not_found() => {
                    missing_header(&remote, &url_s).await?;
                    return Err(VolumeError::NotFound { url: url_s });
                }
                Err(e) => return Err(VolumeError::remote(format!("reading {url_s}/{HEADER_KEY}"), e)),
            }
        };
        let header = VolumeHeader::from_bytes(&header_bytes)
            .map_err(|reason| VolumeError::header(&url_s, &header_bytes, reason))?;
        let key = volume_key(&url_s, &header, opts)?;
        let remote = super::crypto::wrap(remote, key.as_ref());
        let manifest = newest_manifest(&remote, &url_s, &header).await?;
        let origins = origin_remotes(&header, opts, key.as_ref())?;
        locate_ids(&remote, &origins, &manifest.ids);
        let base = open_base(url, &url_s, &header, &manifest, &remote, &origins, opts).await?;
        Ok(Arc::new(Self {
            url: url_s,
            remote,
            header,
            manifest: ArcSwap::from_pointee(manifest),
            base,
            header_raw: header_bytes,
            offline: false,
            origins,
            key,
            indexes: Default::default(),
            saved: Default::default(),
            newest_known_at: parking_lot::Mutex::new(Some(std::time::SystemTime::now())),
        }))
    }

    /// Keeps copies of the header and manifest in a cache directory, so
    /// [`VolumeReader::open_offline`] can start the volume while the
    /// remote is unreachable. Temp + rename: a copy is whole or absent.
    pub fn save_copies(&self, dir: &Path) -> std::io::Result<()> {
        let put = |name: &str, data: &[u8]| -> std::io::Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            let mut f = private::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))
        };
        put(OFFLINE_HEADER, &self.header_raw)?;
        // The manifest holds each chunk's digest: of an encrypted volume it
        // is kept sealed, as on the remote (docs/encryption.md).
        let m = self.manifest().to_bytes();
        match &self.key {
            Some(k) => put(OFFLINE_MANIFEST, &k.seal_local(OFFLINE_MANIFEST, &m))?,
            None => put(OFFLINE_MANIFEST, &m)?,
        }
        std::fs::File::open(dir)?.sync_all()
    }

    /// Keeps `data` (this volume's metadata: chunk digests, pack names) in
    /// file `name` of the cache directory `dir`, sealed as the offline
    /// manifest is for an encrypted volume. Written whole or not at all.
    pub fn save_local(&self, dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
        let sealed;
        let data = match &self.key {
            Some(k) => {
                sealed = k.seal_local(name, data);
                &sealed[..]
            }
            None => data,
        };
        let tmp = dir.join(format!("{name}.tmp"));
        let mut f = private::create(&tmp)?;
        f.write_all(data)?;
        // Durable before it replaces the old copy: a power cut leaves one
        // whole copy or the other.
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    }

    /// What [`save_local`](Self::save_local) kept as `name` in `dir`
    /// (`Ok(None)`: nothing).
    pub fn load_local(&self, dir: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        let b = match std::fs::read(dir.join(name)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match &self.key {
            Some(k) => k.open_local(name, &b).map(Some).map_err(std::io::Error::other),
            None => Ok(Some(b)),
        }
    }

    /// Refuses a volume whose header on the remote says plaintext while the
    /// copy of its header that the cache directory `dir` keeps says
    /// encrypted: nothing authenticates `volume.json`, and whoever can
    /// write the folder could otherwise have this host upload the cache's
    /// changes, and every later write, in clear. Called before anything
    /// is written (docs/encryption.md).
    pub fn check_cache_copy(&self, dir: &Path) -> VolumeResult<()> {
        if self.key.is_some() || self.offline {
            return Ok(());
        }
        let Ok(b) = std::fs::read(dir.join(OFFLINE_HEADER)) else { return Ok(()) };
        // Another volume's copy (a --cache-dir reused) says nothing of this one.
        match VolumeHeader::from_bytes(&b) {
            Ok(h) if h.volume_id == self.header.volume_id && h.crypto.is_some() => {
                Err(VolumeError::Downgraded { url: self.url.clone(), dir: dir.to_path_buf() })
            }
            _ => Ok(()),
        }
    }

    /// True when `dir` holds the copies [`open_offline`](Self::open_offline)
    /// needs.
    pub fn has_offline_copy(dir: &Path) -> bool {
        dir.join(OFFLINE_HEADER).is_file() && dir.join(OFFLINE_MANIFEST).is_file()
    }

    /// Opens from the copies [`save_copies`](Self::save_copies) left in
    /// `dir`, verifying them as strictly as remote ones. Chunks not cached
    /// will fail to fetch until the remote is back (requests are retried
    /// per request, so it recovers by itself).
    pub fn open_offline(url: &RemoteUrl, dir: &Path, opts: &RemoteOptions) -> VolumeResult<Arc<Self>> {
        let url_s = url.to_string();
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| VolumeError::io("reading offline copy", dir.join(name), e))
        };
        let header_raw = Bytes::from(read(OFFLINE_HEADER)?);
        let manifest_raw = Bytes::from(read(OFFLINE_MANIFEST)?);
        let header =
            VolumeHeader::from_bytes(&header_raw).map_err(|reason| VolumeError::header(&url_s, &header_raw, reason))?;
        let vkey = volume_key(&url_s, &header, opts)?;
        let manifest_raw = match &vkey {
            Some(k) if super::crypto::looks_sealed(&manifest_raw) => {
                Bytes::from(k.open_local(OFFLINE_MANIFEST, &manifest_raw).map_err(|reason| {
                    VolumeError::CorruptManifest { url: url_s.clone(), key: "offline copy".into(), reason }
                })?)
            }
            // Kept sealed for every encrypted volume: a copy in clear was
            // not written so, and its plain checksum authenticates nothing.
            Some(_) => {
                return Err(VolumeError::Cache {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "the offline copy of the manifest, {}, is not sealed, but the volume is encrypted (that copy is always kept sealed): it is not used; an online start replaces it",
                        dir.join(OFFLINE_MANIFEST).display()
                    ),
                })
            }
            None => manifest_raw,
        };
        // The manifest names its own generation; from_bytes re-checks the
        // checksum and that it belongs to this header.
        let generation = Manifest::generation_named(&manifest_raw).unwrap_or(0);
        let key = format!("offline copy of {}", gen_key(generation));
        let manifest = Manifest::from_bytes(&manifest_raw, &header, generation)
            .map_err(|reason| VolumeError::manifest(&url_s, key, &manifest_raw, reason))?;
        let remote = super::crypto::wrap(connect(url.folder_with(&opts.config), opts), vkey.as_ref());
        let origins = origin_remotes(&header, opts, vkey.as_ref())?;
        locate_ids(&remote, &origins, &manifest.ids);
        let base = match (&header.base, &manifest.base_copy) {
            (None, _) => None,
            (Some(b), Some(c)) => Some(adopted_copy(&url_s, &remote, &origins, c, b)?),
            (Some(b), None) => {
                let (remote, bkey) = base_backend(url, &b.url, opts)?;
                Some(BaseFile {
                    url: b.url.clone(),
                    remote,
                    key: bkey,
                    size: b.size,
                    revision: b.revision.clone(),
                    note: None,
                })
            }
        };
        Ok(Arc::new(Self {
            url: url_s,
            remote,
            header,
            manifest: ArcSwap::from_pointee(manifest),
            base,
            header_raw,
            offline: true,
            origins,
            key: vkey,
            indexes: Default::default(),
            saved: Default::default(),
            newest_known_at: parking_lot::Mutex::new(None),
        }))
    }

    /// The resolved manifest of the generation being served.
    pub fn manifest(&self) -> Arc<Manifest> {
        self.manifest.load_full()
    }

    /// The generation being served.
    pub fn generation(&self) -> u64 {
        self.manifest.load().generation
    }

    /// Serves `m` from now on (write-back committed it).
    pub fn set_manifest(&self, m: Manifest) {
        locate_ids(&self.remote, &self.origins, &m.ids);
        *self.newest_known_at.lock() = Some(std::time::SystemTime::now());
        self.manifest.store(Arc::new(m));
    }

    /// When the served generation was last known to be the newest, by the
    /// wall clock (None for a volume opened offline).
    pub fn newest_known_at(&self) -> Option<std::time::SystemTime> {
        *self.newest_known_at.lock()
    }

    /// The newest committed generation on the remote now, resolved.
    pub async fn newest_manifest(&self) -> VolumeResult<Manifest> {
        newest_manifest(&self.remote, &self.url, &self.header).await
    }

    /// True when every generation in `from..=to` was committed from the
    /// cache with id `cache_id`.
    pub async fn generations_by(&self, cache_id: &str, from: u64, to: u64) -> VolumeResult<bool> {
        for g in from..=to {
            if self.packs_of_generation_by(cache_id, g).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The packs generation `g`'s object names, if `cache_id` committed it
    /// (None: another writer did, or `driveblk gc` removed it).
    pub async fn packs_of_generation_by(&self, cache_id: &str, g: u64) -> VolumeResult<Option<Vec<String>>> {
        match read_object(&self.remote, &self.url, &self.header, g, None).await {
            Ok(m) if m.writer.as_ref().is_some_and(|w| w.cache_id == cache_id) => Ok(Some(m.packs)),
            Ok(_) => Ok(None),
            // Removed by `driveblk gc`: nothing says it was ours.
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True when every generation in `from..=to` was committed by `gc`
    /// repacking (same content as its parent, packs rewritten), so a writer
    /// whose commit it fenced out may build on the newest instead.
    pub async fn generations_only_repacks(&self, from: u64, to: u64) -> VolumeResult<bool> {
        for g in from..=to {
            let m = match read_object(&self.remote, &self.url, &self.header, g, None).await {
                Ok(m) => m,
                Err(VolumeError::Remote { source, .. }) if source.is_not_found() => return Ok(false),
                Err(e) => return Err(e),
            };
            if m.writer.as_ref().is_none_or(|w| w.cache_id != crate::volume::gc::REPACK_WRITER) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The resolved manifest of an older generation `g` (to check which
    /// cached chunks are still current after others committed).
    pub async fn load_generation(&self, g: u64) -> VolumeResult<Manifest> {
        resolve(&self.remote, &self.url, &self.header, g, BTreeMap::new()).await
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.header.chunk_size
    }

    /// Image length in the open generation.
    pub fn image_len(&self) -> u64 {
        self.manifest.load().image_len
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.manifest.load().chunk_count()
    }

    /// Bytes of image in chunk `idx` (the last one may be short; past the
    /// end, zero).
    pub fn chunk_len(&self, idx: u64) -> usize {
        let start = idx.saturating_mul(self.chunk_size());
        self.image_len().saturating_sub(start).min(self.chunk_size()) as usize
    }

    /// Where chunk `idx` comes from.
    pub fn chunk_ref(&self, idx: u64) -> ChunkRef {
        self.manifest.load().chunk(idx, self.base.is_some())
    }

    /// Fetches and verifies chunk `idx`: a ranged read of its pack frame
    /// (hash-checked) or of the base file; zeroes without a request; for a
    /// patched chunk, its base and its patch frame in parallel, the result
    /// hash-checked.
    pub async fn fetch_chunk(&self, idx: u64) -> VolumeResult<Fetched> {
        // Bytes a shared cache directory gave that fail these checks are
        // fetched again from the remote (`remote::shared`).
        crate::remote::shared::verified(|| self.fetch_chunk_once(idx)).await
    }

    async fn fetch_chunk_once(&self, idx: u64) -> VolumeResult<Fetched> {
        // One manifest for the whole fetch: pack numbers are per manifest.
        let m = self.manifest.load_full();
        let start = idx.saturating_mul(self.chunk_size());
        let want = m.image_len.saturating_sub(start).min(self.chunk_size()) as usize;
        let r = m.chunk(idx, self.base.is_some());
        let mut f = self.fetch_ref(&m, idx, r.clone(), want).await?;
        f.chunk_ref = r;
        Ok(f)
    }

    async fn fetch_ref(&self, m: &Manifest, idx: u64, r: ChunkRef, want: usize) -> VolumeResult<Fetched> {
        match r {
            ChunkRef::Patched { base, pack, offset, len, runs, digest } => {
                let (b, p) =
                    futures::join!(self.fetch_plain(m, idx, &base, want), self.read_frame(m, idx, pack, offset, len));
                let (mut b, frame) = (b?, p?);
                let corrupt = |reason: String| VolumeError::CorruptChunk {
                    url: self.url.clone(),
                    chunk: idx,
                    key: m.packs[pack as usize].clone(),
                    offset,
                    reason,
                };
                // Patches and their hash are over the whole chunk size (the
                // image may have grown or shrunk around a last chunk since).
                let cs = self.chunk_size() as usize;
                b.data.resize(cs, 0);
                let plen = super::pack::patch_len(&runs, PATCH_PAGE, cs);
                let patch = zstd::bulk::decompress(&frame, plen)
                    .map_err(|e| corrupt(format!("patch frame does not decode: {e}")))?;
                super::pack::apply_patch(&mut b.data, &runs, PATCH_PAGE, &patch).map_err(corrupt)?;
                super::pack::check_digest(&b.data, &digest).map_err(|e| corrupt(format!("patched chunk: {e}")))?;
                b.data.truncate(want);
                Ok(Fetched { data: b.data, wire_bytes: b.wire_bytes + len, chunk_ref: ChunkRef::Zero })
            }
            r => self.fetch_plain(m, idx, &r, want).await,
        }
    }

    /// The folder holding pack `key` (this volume's, or an origin's for a
    /// `<volume id>:<key>` entry of a fork) and the key there.
    pub fn pack_remote<'a>(&'a self, key: &'a str) -> VolumeResult<(&'a DynRemote, &'a str)> {
        object_remote(&self.url, &self.remote, &self.origins, key)
    }

    /// The sub-frame index of pack `key`, if fetched already.
    pub fn cached_index(&self, key: &str) -> Option<Arc<PackIndex>> {
        self.indexes.lock().get(key).and_then(|c| c.get().cloned())
    }

    /// Packs of the served generation with a sub-frame index not fetched
    /// yet that hold a chunk `needed` accepts (one not local already), in
    /// the order chunks first name them.
    pub fn indexes_to_fetch(&self, needed: impl Fn(u64) -> bool) -> Vec<String> {
        let m = self.manifest.load();
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (&idx, r) in m.chunks.iter() {
            if !needed(idx) {
                continue;
            }
            if let ChunkRef::Packed { pack, .. } = r {
                let k = &m.packs[*pack as usize];
                if m.indexes.contains_key(k) && seen.insert(*pack) && self.cached_index(k).is_none() {
                    out.push(k.clone());
                }
            }
        }
        out
    }

    /// Keeps the sub-frame indexes this reader fetches in `cache_dir`, and
    /// takes them from there instead of the remote while they match the
    /// served manifest (set once, before serving).
    pub fn keep_indexes_in(&self, cache_dir: &Path) {
        let _ = self.saved.set(SavedIndexes::new(cache_dir, self.key.clone()));
    }

    /// Loads every saved index the served generation names and still lacks
    /// (blocking file reads), and deletes saved ones it no longer names.
    /// Returns how many were loaded.
    pub fn load_saved_indexes(&self) -> usize {
        let Some(saved) = self.saved.get() else { return 0 };
        let m = self.manifest.load_full();
        saved.prune(|k| m.indexes.contains_key(k));
        let mut n = 0;
        for (key, ixr) in &m.indexes {
            if self.cached_index(key).is_some() {
                continue;
            }
            let Some(bytes) = saved.load(key, ixr) else { continue };
            // Its hash matched the manifest's, so a parse error is the
            // pack's own: the remote would give the same bytes.
            if let Ok(ix) = PackIndex::parse(&bytes, ixr.offset) {
                let cell = self.indexes.lock().entry(key.clone()).or_default().clone();
                if cell.set(Arc::new(ix)).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Fetches (once; concurrent callers share the fetch) and verifies the
    /// sub-frame index of pack `key` as the served manifest names it
    /// (from the cache directory's saved copy when it matches).
    /// Ok(None): the pack has none (it predates sub-frames). Returns the
    /// bytes fetched from the remote with it (0 when it was known or saved).
    pub async fn pack_index(&self, key: &str) -> VolumeResult<(Option<Arc<PackIndex>>, u64)> {
        let Some(ixr) = self.manifest.load().indexes.get(key).cloned() else { return Ok((None, 0)) };
        let cell = self.indexes.lock().entry(key.to_string()).or_default().clone();
        let mut fetched = 0;
        let ix = cell
            .get_or_try_init(|| async {
                let saved = self.saved.get().cloned();
                if let Some(s) = saved.clone() {
                    let (k, r) = (key.to_string(), ixr.clone());
                    let local = tokio::task::spawn_blocking(move || s.load(&k, &r)).await.ok().flatten();
                    if let Some(ix) = local.and_then(|b| PackIndex::parse(&b, ixr.offset).ok()) {
                        return Ok(Arc::new(ix));
                    }
                }
                // Bytes a shared cache directory gave that fail the checks
                // are fetched again from the remote (`remote::shared`).
                let (ix, bytes) = crate::remote::shared::verified(|| self.fetch_index_once(key, &ixr)).await?;
                fetched = bytes.len() as u64;
                if let Some(s) = saved {
                    let k = key.to_string();
                    let kept = tokio::task::spawn_blocking(move || s.save(&k, &bytes)).await;
                    if let Ok(Err(e)) = kept {
                        tracing::debug!(pack = %key, error = %e, "could not keep a sub-frame index in the cache directory");
                    }
                }
                Ok::<_, VolumeError>(ix)
            })
            .await?;
        Ok((Some(ix.clone()), fetched))
    }

    /// Reads and checks pack `key`'s sub-frame index once; returns it and
    /// its bytes.
    async fn fetch_index_once(
        &self,
        key: &str,
        ixr: &super::format::PackIndexRef,
    ) -> VolumeResult<(Arc<PackIndex>, Bytes)> {
        let (remote, object) = self.pack_remote(key)?;
        let corrupt = |reason: String| VolumeError::CorruptIndex {
            url: self.url.clone(),
            key: key.to_string(),
            offset: ixr.offset,
            reason,
        };
        let bytes = remote
            .get_range(object, ixr.offset..ixr.offset + ixr.len)
            .await
            .map_err(|e| VolumeError::remote(format!("reading the sub-frame index of {}/{key}", self.url), e))?;
        if bytes.len() as u64 != ixr.len {
            return Err(corrupt(format!("got {} of {} bytes", bytes.len(), ixr.len)));
        }
        let got = super::pack::sha256_hex(&bytes);
        if got != ixr.sha256 {
            return Err(corrupt(format!("sha256 mismatch: expected {}, got {got}", ixr.sha256)));
        }
        let ix = PackIndex::parse(&bytes, ixr.offset).map(Arc::new).map_err(corrupt)?;
        Ok((ix, bytes))
    }

    /// True when part of chunk `idx` can be fetched alone now: it is packed
    /// whole, as sub-frames, in a pack whose index is known.
    pub fn part_ready(&self, idx: u64) -> bool {
        let m = self.manifest.load();
        match m.chunk(idx, self.base.is_some()) {
            ChunkRef::Packed { pack, offset, len, .. } => self
                .cached_index(&m.packs[pack as usize])
                .is_some_and(|ix| ix.entries.get(&offset).is_some_and(|e| e.frame_len() == len)),
            _ => false,
        }
    }

    /// Fetches and verifies only the sub-frames of chunk `idx` covering
    /// its bytes `[off, off + len)`: one ranged read. Ok(None) when the
    /// chunk is not stored as sub-frames of a known index (fetch it whole).
    pub async fn fetch_part(&self, idx: u64, off: u64, len: u64) -> VolumeResult<Option<Part>> {
        // Bytes a shared cache directory gave that fail the checks are
        // fetched again from the remote (`remote::shared`).
        crate::remote::shared::verified(|| self.fetch_part_once(idx, off, len)).await
    }

    async fn fetch_part_once(&self, idx: u64, off: u64, len: u64) -> VolumeResult<Option<Part>> {
        let m = self.manifest.load_full();
        let r = m.chunk(idx, self.base.is_some());
        let ChunkRef::Packed { pack, offset, len: flen, .. } = &r else { return Ok(None) };
        let key = &m.packs[*pack as usize];
        let Some(ix) = self.cached_index(key) else { return Ok(None) };
        let Some(span) = ix.span(*offset, *flen, off, len) else { return Ok(None) };
        let (remote, object) = self.pack_remote(key)?;
        let corrupt = |reason: String| VolumeError::CorruptChunk {
            url: self.url.clone(),
            chunk: idx,
            key: key.clone(),
            offset: span.pack_offset,
            reason,
        };
        let bytes = remote
            .get_range(object, span.pack_offset..span.pack_offset + span.pack_len)
            .await
            .map_err(|e| VolumeError::remote(format!("reading part of chunk {idx} of {} from {key}", self.url), e))?;
        let mut data = ix.decode(*offset, &span, &bytes).map_err(corrupt)?;
        // A chunk stored while it was the image's short last one reads as
        // zeroes past what was stored.
        let chunk_end = m.image_len.saturating_sub(idx * self.chunk_size()).min(self.chunk_size());
        let end = (span.last as u64 * u64::from(ix.sub_size)).min(chunk_end).max(span.raw_offset);
        data.resize((end - span.raw_offset) as usize, 0);
        Ok(Some(Part { chunk_ref: r.clone(), off: span.raw_offset, data, wire_bytes: span.pack_len }))
    }

    /// The header as read from the remote (bytes).
    pub fn header_bytes(&self) -> &Bytes {
        &self.header_raw
    }

    /// Reads one frame of a pack, checking its length.
    async fn read_frame(&self, m: &Manifest, idx: u64, pack: u32, offset: u64, len: u64) -> VolumeResult<Bytes> {
        let key = &m.packs[pack as usize];
        let (remote, object) = self.pack_remote(key)?;
        let frame = remote.get_range(object, offset..offset + len).await.map_err(|e| {
            if e.is_not_found() {
                // Someone deleted, moved or trashed part of the volume
                // folder (or a GC ran with too short a grace period).
                tracing::error!(
                    url = %self.url, key = %key, generation = m.generation,
                    "an object of the volume is missing: it was deleted, moved, renamed or trashed in the folder; \
                     restore it (Drive: untrash it in the web UI), then run `driveblk verify {}`", self.url
                );
            }
            VolumeError::remote(format!("reading chunk {idx} of {} from {key}", self.url), e)
        })?;
        if frame.len() as u64 != len {
            return Err(VolumeError::CorruptChunk {
                url: self.url.clone(),
                chunk: idx,
                key: key.clone(),
                offset,
                reason: format!("pack is too short: got {} of {len} bytes", frame.len()),
            });
        }
        Ok(frame)
    }

    /// A chunk that is zero, from the base, or packed whole.
    async fn fetch_plain(&self, m: &Manifest, idx: u64, r: &ChunkRef, want: usize) -> VolumeResult<Fetched> {
        match r {
            ChunkRef::Zero => Ok(Fetched { data: vec![0; want], wire_bytes: 0, chunk_ref: ChunkRef::Zero }),
            ChunkRef::Base => {
                let base = self.base.as_ref().ok_or_else(|| VolumeError::CorruptManifest {
                    url: self.url.clone(),
                    key: gen_key(m.generation),
                    reason: format!("chunk {idx} refers to a base, but the volume has none"),
                })?;
                let start = idx * self.chunk_size();
                let range = start..start + want as u64;
                let got = match &base.revision {
                    Some(rev) => base.remote.get_range_revision(&base.key, rev, range).await,
                    None => base.remote.get_range(&base.key, range).await,
                };
                let got: Bytes = got.map_err(|e| {
                    VolumeError::remote(format!("reading chunk {idx} of {} from base {}", self.url, base.url), e)
                })?;
                let wire = got.len() as u64;
                // A base shorter than the image (it was grown) reads as
                // zeroes past its end.
                let mut data = got.to_vec();
                data.resize(want, 0);
                Ok(Fetched { data, wire_bytes: wire, chunk_ref: ChunkRef::Zero })
            }
            ChunkRef::Packed { pack, offset, len, digest } => {
                let frame = self.read_frame(m, idx, *pack, *offset, *len).await?;
                let key = &m.packs[*pack as usize];
                let corrupt = |reason: String| VolumeError::CorruptChunk {
                    url: self.url.clone(),
                    chunk: idx,
                    key: key.clone(),
                    offset: *offset,
                    reason,
                };
                // With the pack's index at hand every sub-frame is checked
                // too (what `verify --full` relies on), then the chunk.
                let whole = self
                    .cached_index(key)
                    .and_then(|ix| ix.span(*offset, *len, 0, u64::MAX >> 1).map(|s| (ix, s)))
                    .filter(|(_, s)| s.first == 0 && s.pack_len == *len);
                let mut data = match whole {
                    Some((ix, span)) => {
                        let data = ix.decode(*offset, &span, &frame).map_err(corrupt)?;
                        super::pack::check_digest(&data, digest).map_err(corrupt)?;
                        data
                    }
                    None => decode_chunk_upto(&frame, self.chunk_size() as usize, digest).map_err(corrupt)?,
                };
                data.resize(want, 0);
                Ok(Fetched { data, wire_bytes: *len, chunk_ref: ChunkRef::Zero })
            }
            ChunkRef::Patched { .. } => Err(VolumeError::CorruptManifest {
                url: self.url.clone(),
                key: gen_key(m.generation),
                reason: format!("chunk {idx} is a patch over a patch"),
            }),
        }
    }
}

/// Most deltas fetched at once while resolving (the checkpoint interval of
/// the writer, so one round usually reaches the full manifest).
const RESOLVE_BATCH: u64 = 16;

/// Reads and verifies the manifest object of generation `g`: by its slot
/// when one is known (found by identity, never through a listing), else by
/// key.
pub(crate) async fn read_object(
    remote: &DynRemote,
    url: &str,
    header: &VolumeHeader,
    g: u64,
    slot: Option<&Slot>,
) -> VolumeResult<Manifest> {
    let key = gen_key(g);
    let bytes = remote
        .get_created(&key, slot)
        .await
        .map_err(|e| VolumeError::remote(format!("reading manifest {url}/{key}"), e))?;
    Manifest::from_bytes(&bytes, header, g).map_err(|reason| VolumeError::manifest(url, key, &bytes, reason))
}

/// The resolved manifest of generation `g`: its object, and when that is a
/// delta, the chain back to the newest full manifest, applied in order.
/// `newest` is the object of `g` if the caller already has it.
pub(crate) async fn resolve(
    remote: &DynRemote,
    url: &str,
    header: &VolumeHeader,
    g: u64,
    mut known: BTreeMap<u64, Manifest>,
) -> VolumeResult<Manifest> {
    let top = match known.remove(&g) {
        Some(m) => m,
        None => read_object(remote, url, header, g, None).await?,
    };
    let mut chain = vec![top];
    // Objects read while following the chain by identity need no lookup
    // by name (a listing may not show them yet).
    while let Some(m) = chain.last().and_then(|m| m.parent).and_then(|p| known.remove(&p)) {
        chain.push(m);
    }
    while let Some(p) = chain.last().and_then(|m| m.parent) {
        if p == 0 {
            return Err(VolumeError::CorruptManifest {
                url: url.to_string(),
                key: gen_key(1),
                reason: "generation 1 is a delta; the chain has no full manifest".into(),
            });
        }
        // Fetch a batch of ancestors in parallel: deltas are small and the
        // round trip dominates.
        let lo = p.saturating_sub(RESOLVE_BATCH - 1).max(1);
        let got = futures::future::join_all((lo..=p).rev().map(|q| read_object(remote, url, header, q, None))).await;
        for m in got {
            let m = m?;
            let more = m.parent.is_some();
            chain.push(m);
            if !more {
                break;
            }
        }
    }
    let mut resolved = chain.pop().expect("chain holds at least the top object");
    while let Some(d) = chain.pop() {
        resolved.apply(&d).map_err(|reason| VolumeError::CorruptManifest {
            url: url.to_string(),
            key: gen_key(d.generation),
            reason,
        })?;
    }
    Ok(resolved)
}

/// Finds the newest committed generation and resolves it. A listing
/// gives a starting point (it may lag behind creates on Drive); from
/// there the chain is followed by identity: each manifest names the slot
/// of its successor, and the newest is the one whose successor does not
/// exist.
async fn newest_manifest(remote: &DynRemote, url: &str, header: &VolumeHeader) -> VolumeResult<Manifest> {
    let gens =
        remote.list(GEN_PREFIX).await.map_err(|e| VolumeError::remote(format!("listing generations of {url}"), e))?;
    let listed = gens.iter().filter_map(|m| parse_gen_key(&m.key)).max();
    // The newest generation being corrupt is an error, not a cue to fall
    // back: an older generation would silently lose committed writes.
    let mut top = match (listed, &header.first_slot) {
        (Some(g), _) => read_object(remote, url, header, g, None).await?,
        // Nothing listed yet: generation 1 by the id the header names.
        (None, Some(slot)) => match read_object(remote, url, header, 1, Some(slot)).await {
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => {
                return Err(VolumeError::NoGeneration { url: url.to_string() })
            }
            r => r?,
        },
        (None, None) => return Err(VolumeError::NoGeneration { url: url.to_string() }),
    };
    let mut seen = BTreeMap::new();
    loop {
        let next = top.generation + 1;
        match read_object(remote, url, header, next, top.next_slot.as_ref()).await {
            Ok(m) => {
                seen.insert(top.generation, std::mem::replace(&mut top, m));
            }
            Err(VolumeError::Remote { source, .. }) if source.is_not_found() => break,
            Err(e) => return Err(e),
        }
    }
    let g = top.generation;
    seen.insert(g, top);
    resolve(remote, url, header, g, seen).await
}
