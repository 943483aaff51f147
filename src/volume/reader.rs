//! Opening a volume on its remote (header, newest committed generation,
//! base file) and fetching single chunks with verification.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::format::{gen_key, parse_gen_key, ChunkRef, Manifest, VolumeHeader, GEN_PREFIX, HEADER_KEY};
use super::pack::decode_chunk;
use super::{RemoteOptions, VolumeError, VolumeResult};
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
}

/// A volume as committed on the remote: header plus newest manifest.
#[derive(Debug)]
pub struct VolumeReader {
    /// The volume's URL, for messages.
    pub url: String,
    pub remote: DynRemote,
    pub header: VolumeHeader,
    pub manifest: Manifest,
    pub base: Option<BaseFile>,
    /// The header and manifest as read, so a cache can keep copies.
    header_raw: Bytes,
    manifest_raw: Bytes,
    /// True when opened from the cache's copies because the remote was
    /// unreachable.
    pub offline: bool,
}

/// What one chunk fetch returned.
pub struct Fetched {
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
        let header_bytes = match remote.get(HEADER_KEY).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(VolumeError::NotFound { url: url_s }),
            Err(e) => return Err(VolumeError::remote(format!("reading {url_s}/{HEADER_KEY}"), e)),
        };
        let header = VolumeHeader::from_bytes(&header_bytes)
            .map_err(|reason| VolumeError::BadHeader { url: url_s.clone(), reason })?;
        let gens = remote
            .list(GEN_PREFIX)
            .await
            .map_err(|e| VolumeError::remote(format!("listing generations of {url_s}"), e))?;
        let newest = gens
            .iter()
            .filter_map(|m| parse_gen_key(&m.key))
            .max()
            .ok_or_else(|| VolumeError::NoGeneration { url: url_s.clone() })?;
        let key = gen_key(newest);
        let mbytes =
            remote.get(&key).await.map_err(|e| VolumeError::remote(format!("reading manifest {url_s}/{key}"), e))?;
        // The newest generation being corrupt is an error, not a cue to fall
        // back: an older generation would silently lose committed writes.
        let manifest = Manifest::from_bytes(&mbytes, &header, newest)
            .map_err(|reason| VolumeError::CorruptManifest { url: url_s.clone(), key: key.clone(), reason })?;
        let base = match &header.base {
            None => None,
            Some(b) => {
                let burl = RemoteUrl::parse(&b.url)?;
                let (backend, bkey) = burl.object_with(&opts.config);
                let bremote = connect(backend, opts);
                let meta = bremote
                    .head(&bkey)
                    .await
                    .map_err(|e| VolumeError::remote(format!("base image {} of volume {url_s}", b.url), e))?;
                if meta.size != b.size {
                    return Err(VolumeError::BaseChanged {
                        url: url_s,
                        base: b.url.clone(),
                        what: format!("size was {}, is now {}", b.size, meta.size),
                    });
                }
                if b.version.is_some() && meta.version.is_some() && meta.version != b.version {
                    let what = format!(
                        "version was {}, is now {}",
                        b.version.as_deref().unwrap_or("?"),
                        meta.version.as_deref().unwrap_or("?")
                    );
                    return Err(VolumeError::BaseChanged { url: url_s, base: b.url.clone(), what });
                }
                Some(BaseFile { url: b.url.clone(), remote: bremote, key: bkey, size: meta.size })
            }
        };
        Ok(Arc::new(Self {
            url: url_s,
            remote,
            header,
            manifest,
            base,
            header_raw: header_bytes,
            manifest_raw: mbytes,
            offline: false,
        }))
    }

    /// Keeps copies of the header and manifest in a cache directory, so
    /// [`VolumeReader::open_offline`] can start the volume while the
    /// remote is unreachable. Temp + rename: a copy is whole or absent.
    pub fn save_copies(&self, dir: &Path) -> std::io::Result<()> {
        let put = |name: &str, data: &[u8]| -> std::io::Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))
        };
        put(OFFLINE_HEADER, &self.header_raw)?;
        put(OFFLINE_MANIFEST, &self.manifest_raw)?;
        std::fs::File::open(dir)?.sync_all()
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
        let header = VolumeHeader::from_bytes(&header_raw)
            .map_err(|reason| VolumeError::BadHeader { url: url_s.clone(), reason })?;
        // The manifest names its own generation; from_bytes re-checks the
        // checksum and that it belongs to this header.
        let generation =
            serde_json::from_slice::<serde_json::Value>(manifest_raw.split(|&c| c == b'\n').next().unwrap_or(&[]))
                .ok()
                .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
                .unwrap_or(0);
        let key = format!("offline copy of {}", gen_key(generation));
        let manifest = Manifest::from_bytes(&manifest_raw, &header, generation)
            .map_err(|reason| VolumeError::CorruptManifest { url: url_s.clone(), key, reason })?;
        let base = match &header.base {
            None => None,
            Some(b) => {
                let burl = RemoteUrl::parse(&b.url)?;
                let (backend, bkey) = burl.object_with(&opts.config);
                Some(BaseFile { url: b.url.clone(), remote: connect(backend, opts), key: bkey, size: b.size })
            }
        };
        let remote = connect(url.folder_with(&opts.config), opts);
        Ok(Arc::new(Self { url: url_s, remote, header, manifest, base, header_raw, manifest_raw, offline: true }))
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.manifest.chunk_size
    }

    /// Image length in the open generation.
    pub fn image_len(&self) -> u64 {
        self.manifest.image_len
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.manifest.chunk_count()
    }

    /// Bytes of image in chunk `idx` (the last one may be short; past the
    /// end, zero).
    pub fn chunk_len(&self, idx: u64) -> usize {
        let start = idx.saturating_mul(self.chunk_size());
        self.image_len().saturating_sub(start).min(self.chunk_size()) as usize
    }

    /// Where chunk `idx` comes from.
    pub fn chunk_ref(&self, idx: u64) -> ChunkRef {
        self.manifest.chunk(idx, self.base.is_some())
    }

    /// Fetches and verifies chunk `idx`: a ranged read of its pack frame
    /// (hash-checked) or of the base file; zeroes without a request.
    pub async fn fetch_chunk(&self, idx: u64) -> VolumeResult<Fetched> {
        let want = self.chunk_len(idx);
        match self.chunk_ref(idx) {
            ChunkRef::Zero => Ok(Fetched { data: vec![0; want], wire_bytes: 0 }),
            ChunkRef::Base => {
                let base = self.base.as_ref().ok_or_else(|| VolumeError::CorruptManifest {
                    url: self.url.clone(),
                    key: gen_key(self.manifest.generation),
                    reason: format!("chunk {idx} refers to a base, but the volume has none"),
                })?;
                let start = idx * self.chunk_size();
                let got: Bytes = base.remote.get_range(&base.key, start..start + want as u64).await.map_err(|e| {
                    VolumeError::remote(format!("reading chunk {idx} of {} from base {}", self.url, base.url), e)
                })?;
                let wire = got.len() as u64;
                // A base shorter than the image (it was grown) reads as
                // zeroes past its end.
                let mut data = got.to_vec();
                data.resize(want, 0);
                Ok(Fetched { data, wire_bytes: wire })
            }
            ChunkRef::Packed { pack, offset, len, sha256 } => {
                let key = &self.manifest.packs[pack as usize];
                let frame =
                    self.remote.get_range(key, offset..offset + len).await.map_err(|e| {
                        VolumeError::remote(format!("reading chunk {idx} of {} from {key}", self.url), e)
                    })?;
                let corrupt = |reason: String| VolumeError::CorruptChunk {
                    url: self.url.clone(),
                    chunk: idx,
                    key: key.clone(),
                    offset,
                    reason,
                };
                if frame.len() as u64 != len {
                    return Err(corrupt(format!("pack is too short: got {} of {len} bytes", frame.len())));
                }
                let data = decode_chunk(&frame, want, &sha256).map_err(corrupt)?;
                Ok(Fetched { data, wire_bytes: len })
            }
        }
    }
}
