//! Shared helpers for the volume/tier integration tests: source images made
//! with qemu-img, remote layers that count and inject faults, whole-image
//! reads through a Storage.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{DynRemote, FaultPlan, MetricsRemote, RemoteMetrics, RetryPolicy, ShapedRemote, Shaping};
use driveblk::tier::CacheOptions;
use driveblk::tier::Storage;
use driveblk::volume::RemoteOptions;
use rand::{Rng, SeedableRng};

pub const CS: u64 = 256 << 10;

/// A deterministic raw image of `len` bytes: random data in some regions,
/// zeroes elsewhere, so imports have both packed and zero chunks.
pub fn raw_image(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    let mut pos = 0;
    while pos < len {
        let run = rng.random_range(4096..(600 << 10)).min(len - pos);
        if rng.random_bool(0.6) {
            // Half random, half repetitive, so compression has work to do.
            for (i, b) in data[pos..pos + run].iter_mut().enumerate() {
                *b = if i % 2 == 0 { rng.random() } else { (i % 251) as u8 };
            }
        }
        pos += run;
    }
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// A qcow2 image converted by qemu-img from a raw image; returns the qcow2
/// path and the qcow2 file's own bytes (what a volume stores).
pub fn qcow2_image(dir: &Path, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let (raw, _) = raw_image(dir, "src.raw", len, seed);
    let q = dir.join("src.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&q).status().unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&q).unwrap();
    (q, bytes)
}

/// `qemu-img compare` of two images (format given for both).
pub fn qemu_compare(fmt: &str, a: &Path, b: &Path) -> bool {
    Command::new("qemu-img").args(["compare", "-q", "-f", fmt, "-F", fmt]).arg(a).arg(b).status().unwrap().success()
}

/// Reads all of `s` in pieces of varying, unaligned sizes.
pub fn read_all(s: &dyn Storage) -> std::io::Result<Vec<u8>> {
    let len = s.len() as usize;
    let mut out = vec![0u8; len];
    let mut pos = 0;
    let mut step = 777usize;
    while pos < len {
        let n = step.min(len - pos);
        s.read_vectored_at(pos as u64, &IoVec::from_slice(&mut out[pos..pos + n]), IoMode::Blocking)?;
        pos += n;
        step = (step * 7 + 4096) % (300 << 10) + 1;
    }
    Ok(out)
}

/// Remote options with a metrics layer (and optional faults/shaping) under
/// fast retries.
pub fn counted(metrics: Arc<RemoteMetrics>, faults: Option<Arc<FaultPlan>>, shaping: Shaping) -> RemoteOptions {
    let layer = Arc::new(move |r: DynRemote| -> DynRemote {
        let r = match &faults {
            Some(f) => ShapedRemote::wrap(r, shaping.clone(), f.clone()),
            None if shaping.latency > Duration::ZERO || shaping.bandwidth_bps.is_some() => {
                ShapedRemote::wrap(r, shaping.clone(), FaultPlan::new(0))
            }
            None => r,
        };
        MetricsRemote::wrap(r, metrics.clone())
    });
    RemoteOptions {
        layer: Some(layer),
        retry: RetryPolicy {
            max_attempts: 30,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            seed: Some(3),
            attempt_timeout: Duration::from_secs(60),
        },
        config: Default::default(),
        key: None,
        allow_base: Vec::new(),
    }
}

/// Cache options with small, test-friendly sizes.
pub fn cache_opts(dir: &Path, remote: RemoteOptions) -> CacheOptions {
    let mut o = CacheOptions::new(dir);
    o.ram_cache = 8 * CS;
    o.ssd_cache = 1 << 30;
    o.remote = remote;
    o
}

/// `dir:` URL for a path.
pub fn url(p: &Path) -> String {
    format!("dir:{}", p.display())
}

/// A remote request as a queue in front of the remote sees it: which
/// call, its key, where a ranged read starts and its length, and whether
/// it went marked speculative ([`driveblk::remote::priority`]).
#[derive(Clone, Debug)]
pub struct Marked {
    pub call: &'static str,
    pub key: String,
    pub start: u64,
    pub len: u64,
    pub speculative: bool,
}

/// A remote layer that logs each ranged read, put and create with its mark.
#[derive(Debug)]
pub struct MarkedRemote {
    inner: DynRemote,
    log: Arc<parking_lot::Mutex<Vec<Marked>>>,
}

impl MarkedRemote {
    fn note(&self, call: &'static str, key: &str, start: u64, len: u64) {
        let speculative = driveblk::remote::priority::current().is_some_and(|m| m.holds());
        self.log.lock().push(Marked { call, key: key.to_string(), start, len, speculative });
    }
}

/// The layer of [`MarkedRemote`], and its log.
pub fn marked_layer() -> (driveblk::remote::RemoteLayer, Arc<parking_lot::Mutex<Vec<Marked>>>) {
    let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let l2 = log.clone();
    let layer: driveblk::remote::RemoteLayer =
        Arc::new(move |inner| Arc::new(MarkedRemote { inner, log: l2.clone() }) as DynRemote);
    (layer, log)
}

/// Puts a [`MarkedRemote`] around the remote `o` gives (and its layers).
pub fn with_marks(o: &mut RemoteOptions) -> Arc<parking_lot::Mutex<Vec<Marked>>> {
    let (marks, log) = marked_layer();
    let under = o.layer.take();
    o.layer = Some(Arc::new(move |r: DynRemote| {
        let r = match &under {
            Some(l) => l(r),
            None => r,
        };
        marks(r)
    }));
    log
}

#[async_trait::async_trait]
impl driveblk::remote::layer::Layer for MarkedRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> driveblk::remote::RemoteResult<bytes::Bytes> {
        self.note("get_range", key, range.start, range.end - range.start);
        self.inner.get_range(key, range).await
    }

    async fn put(
        &self,
        key: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.note("put", key, 0, 0);
        self.inner.put(key, body).await
    }

    async fn create(
        &self,
        key: &str,
        slot: Option<&driveblk::remote::Slot>,
        tag: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.note("create", key, 0, 0);
        self.inner.create(key, slot, tag, body).await
    }
}

/// A remote whose ranged reads of packs wait at a gate until the test opens it, to
/// force exact interleavings (a fetch in flight while a write lands).
#[derive(Debug)]
pub struct GatedRemote {
    pub inner: DynRemote,
    pub gate: Arc<tokio::sync::Semaphore>,
    pub waiting: Arc<std::sync::atomic::AtomicU64>,
    /// Gate pack uploads instead of pack reads.
    pub puts: bool,
}

/// A remote layer that holds pack reads (or, with `puts`, pack uploads)
/// at a gate; returns it with the gate and the count of requests waiting.
pub fn gated_layer(
    puts: bool,
) -> (driveblk::remote::RemoteLayer, Arc<tokio::sync::Semaphore>, Arc<std::sync::atomic::AtomicU64>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (g2, w2) = (gate.clone(), waiting.clone());
    let layer: driveblk::remote::RemoteLayer = Arc::new(move |inner| {
        Arc::new(GatedRemote { inner, gate: g2.clone(), waiting: w2.clone(), puts }) as DynRemote
    });
    (layer, gate, waiting)
}

impl GatedRemote {
    async fn pass(&self, key: &str, put: bool) {
        if key.starts_with("pack-") && put == self.puts {
            self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
        }
    }
}

#[async_trait::async_trait]
impl driveblk::remote::Remote for GatedRemote {
    async fn create_folder(&self) -> driveblk::remote::RemoteResult<()> {
        self.inner.create_folder().await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> driveblk::remote::RemoteResult<bytes::Bytes> {
        // Only chunk reads (or uploads) wait; opening the volume goes
        // straight through, and so do reads of a pack's sub-frame index
        // (a few KiB at its end; chunk frames here are 64 KiB or more).
        if range.end - range.start > 16 << 10 {
            self.pass(key, false).await;
        }
        self.inner.get_range(key, range).await
    }
    async fn put(
        &self,
        key: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.pass(key, true).await;
        self.inner.put(key, body).await
    }
    async fn head(&self, key: &str) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> driveblk::remote::RemoteResult<Vec<driveblk::remote::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> driveblk::remote::RemoteResult<()> {
        self.inner.delete(key).await
    }
    async fn create(
        &self,
        key: &str,
        slot: Option<&driveblk::remote::Slot>,
        tag: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.inner.create(key, slot, tag, body).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A volume of random bytes (every chunk packed, nothing compresses) in
/// 1 MiB chunks and 4 MiB packs at `d/remote/vol`: its URL and its bytes.
pub fn random_volume(d: &Path, len: usize, seed: u64) -> (String, Vec<u8>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let src = d.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    let vurl = url(&d.join("remote/vol"));
    let io = driveblk::volume::ImportOptions { chunk_size: 1 << 20, pack_size: 4 << 20, ..Default::default() };
    driveblk::volume::import(&src, &vurl, &io).unwrap();
    (vurl, data)
}

/// Stored bytes of every packed chunk of the served generation: what a
/// cold read of the whole volume costs when each chunk crosses the link
/// once (whole, or as sub-frames fetched once each).
pub fn packed_bytes(v: &driveblk::volume::VolumeReader) -> u64 {
    (0..v.chunk_count())
        .map(|i| match v.chunk_ref(i) {
            driveblk::volume::ChunkRef::Packed { len, .. } => len,
            _ => 0,
        })
        .sum()
}

/// Bytes of every pack's sub-frame index (each fetched at most once).
pub fn index_bytes(v: &driveblk::volume::VolumeReader) -> u64 {
    v.manifest().indexes.values().map(|r| r.len).sum()
}

/// Waits (bounded) until every pack's sub-frame index is known.
pub fn indexes_known(s: &driveblk::tier::tiered::TieredStore) {
    let t0 = std::time::Instant::now();
    while !s.volume().indexes_to_fetch(|_| true).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the packs' indexes were never fetched");
        std::thread::sleep(Duration::from_millis(5));
    }
}
