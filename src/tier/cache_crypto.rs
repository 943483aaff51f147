//! The encrypted SSD cache (`serve --encrypt-cache`, docs/encryption.md):
//! cache files whose every 4 KiB page is AES-256-XTS ciphertext, tweaked
//! by the page's index in the file, under a key derived from the volume's
//! data key and the cache's own id.
//!
//! XTS is the disk-encryption mode (dm-crypt/LUKS, BitLocker): length
//! preserving, so the data file keeps its layout, sparse holes and page
//! addressing, and needs no stored nonce or tag, so a crash can never leave
//! a page whose tag is out of step with its bytes. It gives confidentiality
//! only: see docs/encryption.md for what someone with the disk can do.
//!
//! An all-zero ciphertext page reads as an all-zero plaintext page: holes
//! (punched zeroes, space never written, past the end of the file) stay
//! holes. A real page encrypts to all zeroes with probability 2^-32768.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use crate::tier::{IoMode, IoVec};
use crate::tier::{LocalFile, Storage};
use crate::volume::crypto::VolumeKey;

/// The unit of encryption: one XTS data unit.
pub const PAGE: u64 = 4096;
/// The cipher named in the state file of an encrypted cache.
pub const CIPHER: &str = "aes-256-xts";
/// HKDF label of the data file's key.
const DATA_LABEL: &str = "driveblk ssd cache v1: data";

/// How a cache directory's files are to be kept.
#[derive(Clone, Debug, Default)]
pub enum Sealing {
    /// In plaintext (the default).
    #[default]
    Plain,
    /// Encrypted under keys derived from this volume key.
    Sealed(Arc<VolumeKey>),
    /// As the cache already is (export, fork): an encrypted cache needs the
    /// key, a new one is plaintext.
    AsFound(Option<Arc<VolumeKey>>),
}

impl Sealing {
    /// The state file's `sealed` value this asks for (None: as found).
    pub fn wanted(&self) -> Option<String> {
        match self {
            Sealing::Plain => Some(String::new()),
            Sealing::Sealed(k) => Some(tag(k)),
            Sealing::AsFound(_) => None,
        }
    }

    fn key(&self) -> Option<&Arc<VolumeKey>> {
        match self {
            Sealing::Plain | Sealing::AsFound(None) => None,
            Sealing::Sealed(k) | Sealing::AsFound(Some(k)) => Some(k),
        }
    }

    /// The data file of the cache with id `cache_id` whose state says
    /// `sealed` ("" for plaintext).
    pub fn data_file(&self, file: LocalFile, sealed: &str, cache_id: &str) -> Result<CacheFile, String> {
        if sealed.is_empty() {
            return Ok(CacheFile::Plain(file));
        }
        match self.key() {
            Some(k) if tag(k) == sealed => Ok(CacheFile::sealed(file, PageCipher::for_cache(k, cache_id))),
            Some(k) => {
                Err(format!("it is encrypted ({sealed}) under another data key than this volume's ({})", tag(k)))
            }
            None => Err("it is encrypted (--encrypt-cache); opening it needs the volume's key".into()),
        }
    }
}

/// The state file's `sealed` value of a cache encrypted under `key`: the
/// cipher and the data key's id (a cache of another data key is not reused).
pub fn tag(key: &VolumeKey) -> String {
    format!("{CIPHER}/{}", key.key_id)
}

/// "plaintext", or the cipher, for messages.
pub fn describe(sealed: &str) -> String {
    if sealed.is_empty() {
        "plaintext".into()
    } else {
        format!("encrypted ({sealed})")
    }
}

/// AES-256-XTS over whole pages.
pub struct PageCipher {
    xts: Xts128<Aes256>,
}

impl PageCipher {
    /// The data file's cipher of the cache with id `cache_id` (random per
    /// cache directory): HKDF-SHA256 of the data key, salted with the id,
    /// so two caches of one volume never share a key (the same page offset
    /// in two caches is encrypted differently).
    pub fn for_cache(key: &VolumeKey, cache_id: &str) -> Self {
        Self::from_key(&key.derive_local(DATA_LABEL, cache_id.as_bytes()))
    }

    /// A cipher under a random key held only by this process (for files
    /// no later process reads, such as the write-back's frozen copies).
    pub fn random() -> Self {
        let k = zeroize::Zeroizing::new(rand::random::<[u8; 64]>());
        Self::from_key(&k)
    }

    fn from_key(k: &[u8; 64]) -> Self {
        let c1 = Aes256::new_from_slice(&k[..32]).expect("32-byte AES-256 key");
        let c2 = Aes256::new_from_slice(&k[32..]).expect("32-byte AES-256 key");
        Self { xts: Xts128::new(c1, c2) }
    }

    /// Encrypts whole pages in place; `buf` starts at page `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert_eq!(buf.len() as u64 % PAGE, 0);
        for (i, p) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
            self.xts.encrypt_sector(p, get_tweak_default(u128::from(first + i as u64)));
        }
    }

    /// Decrypts whole pages in place; all-zero pages (holes) stay zero.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert_eq!(buf.len() as u64 % PAGE, 0);
        for (i, p) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
            if p.iter().all(|&b| b == 0) {
                continue;
            }
            self.xts.decrypt_sector(p, get_tweak_default(u128::from(first + i as u64)));
        }
    }
}

/// A file of the cache directory: plaintext, or encrypted page by page.
// One per cache file, read in place on every SSD hit: not boxed.
#[allow(clippy::large_enum_variant)]
pub enum CacheFile {
    Plain(LocalFile),
    Sealed(SealedFile),
}

impl CacheFile {
    /// `file` encrypted with `cipher`.
    pub fn sealed(file: LocalFile, cipher: PageCipher) -> Self {
        CacheFile::Sealed(SealedFile { file, cipher })
    }

    /// True when encrypted.
    pub fn is_sealed(&self) -> bool {
        matches!(self, CacheFile::Sealed(_))
    }

    /// What writing `bufs` at `offset` leaves in the file, as stored: where
    /// it goes and its bytes. For plaintext, the write itself; encrypted,
    /// the whole pages it touches as ciphertext (the pages at its edges are
    /// read first). A journal record carries this, so a replay puts it back
    /// with [`write_stored`](Self::write_stored), no key needed and no
    /// plaintext in the journal. Caller keeps others from writing those
    /// pages until it is written (as for a write).
    pub fn stored_write(&self, offset: u64, bufs: &IoVec<'_>) -> io::Result<(u64, Vec<u8>)> {
        match self {
            CacheFile::Plain(_) => Ok((offset, bufs.to_vec())),
            CacheFile::Sealed(f) => {
                let len = bufs.len() as u64;
                let (a, n) = SealedFile::pages_around(offset, len)?;
                let mut buf = vec![0u8; n as usize];
                f.seal_range(a, &mut buf, offset, len, Some(bufs), IoMode::Blocking)?;
                Ok((a, buf))
            }
        }
    }

    /// Writes bytes made by [`stored_write`](Self::stored_write) as they are.
    pub fn write_stored(&self, at: u64, bytes: &[u8]) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.write_at(at, bytes),
            CacheFile::Sealed(f) => f.file.write_at(at, bytes),
        }
    }
}

/// A local file whose pages are stored encrypted. Byte ranges that are not
/// whole pages are read and written through their pages (read, decrypt,
/// patch, encrypt, write): callers never write one page from two threads at
/// once, nor read a page while it is written (the SSD tier's per-chunk
/// stripe locks; pages never straddle chunks).
pub struct SealedFile {
    file: LocalFile,
    cipher: PageCipher,
}

/// Larger bounces are allocated per call instead of kept per thread.
const KEEP_SCRATCH: usize = 4 << 20;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a page-aligned bounce buffer of `n` bytes (its content is
/// undefined), reused per thread so a hit allocates nothing.
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    if n > KEEP_SCRATCH {
        return f(&mut vec![0u8; n]);
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < n {
                v.resize(n, 0);
            }
            f(&mut v[..n])
        }
        // Not reentered today; stay correct if it ever is.
        Err(_) => f(&mut vec![0u8; n]),
    })
}

impl SealedFile {
    /// Reads and decrypts whole pages at `at` (a page boundary) into `buf`.
    fn read_pages(&self, at: u64, buf: &mut [u8], mode: IoMode) -> io::Result<()> {
        self.file.read_vectored_at(at, &IoVec::from_slice(buf), mode)?;
        self.cipher.decrypt(buf, at / PAGE);
        Ok(())
    }

    /// The whole pages around [offset, offset + len): where they start and
    /// how many bytes they span.
    fn pages_around(offset: u64, len: u64) -> io::Result<(u64, u64)> {
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let a = offset / PAGE * PAGE;
        Ok((a, end.next_multiple_of(PAGE) - a))
    }

    /// Fills `buf` (the whole pages from `a`) with the ciphertext they hold
    /// once `len` bytes at `offset` are written, taken from `src` (None:
    /// zeroes): the pages at the edges are read and decrypted, the range
    /// patched, the lot encrypted.
    fn seal_range(
        &self,
        a: u64,
        buf: &mut [u8],
        offset: u64,
        len: u64,
        src: Option<&IoVec<'_>>,
        mode: IoMode,
    ) -> io::Result<()> {
        let end = offset + len;
        let e = a + buf.len() as u64;
        let n = buf.len();
        let p = PAGE as usize;
        if offset % PAGE != 0 {
            self.read_pages(a, &mut buf[..p], mode)?;
        }
        if end % PAGE != 0 && (e - PAGE > a || offset % PAGE == 0) {
            self.read_pages(e - PAGE, &mut buf[n - p..], mode)?;
        }
        let piece = &mut buf[(offset - a) as usize..(end - a) as usize];
        match src {
            Some(v) => v.copy_to_slice(0, piece),
            None => piece.fill(0),
        }
        self.cipher.encrypt(buf, a / PAGE);
        Ok(())
    }

    /// Writes `len` bytes at `offset`, taken from `src` (None: zeroes).
    fn write_range(&self, offset: u64, len: u64, src: Option<&IoVec<'_>>, mode: IoMode) -> io::Result<()> {
        let (a, n) = Self::pages_around(offset, len)?;
        with_scratch(n as usize, |buf| {
            self.seal_range(a, buf, offset, len, src, mode)?;
            self.file.write_vectored_at(a, &IoVec::from_slice(buf), mode)
        })
    }
}

impl Storage for SealedFile {
    fn len(&self) -> u64 {
        self.file.len()
    }

    fn read_only(&self) -> bool {
        self.file.read_only()
    }

    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        let len = bufs.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let a = offset / PAGE * PAGE;
        let e = end.next_multiple_of(PAGE);
        with_scratch((e - a) as usize, |buf| {
            self.read_pages(a, buf, mode)?;
            bufs.copy_from_slice(0, &buf[(offset - a) as usize..(end - a) as usize]);
            Ok(())
        })
    }

    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        if bufs.is_empty() {
            return Ok(());
        }
        self.write_range(offset, bufs.len() as u64, Some(bufs), mode)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Whole pages become holes (zero ciphertext reads as zero
        // plaintext); the edges of part pages are written encrypted.
        let (a, e) = (offset.next_multiple_of(PAGE), end / PAGE * PAGE);
        if a >= e {
            return self.write_range(offset, len, None, IoMode::Blocking);
        }
        if offset < a {
            self.write_range(offset, a - offset, None, IoMode::Blocking)?;
        }
        self.file.write_zeroes_at(a, e - a)?;
        if e < end {
            self.write_range(e, end - e, None, IoMode::Blocking)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Never cut a page: its ciphertext is only whole.
        self.file.set_len(len.next_multiple_of(PAGE))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.flush()
    }

    fn describe(&self) -> String {
        format!("encrypted {}", self.file.describe())
    }
}

impl Storage for CacheFile {
    fn len(&self) -> u64 {
        match self {
            CacheFile::Plain(f) => f.len(),
            CacheFile::Sealed(f) => f.len(),
        }
    }

    fn read_only(&self) -> bool {
        match self {
            CacheFile::Plain(f) => f.read_only(),
            CacheFile::Sealed(f) => f.read_only(),
        }
    }

    #[inline]
    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.read_vectored_at(offset, bufs, mode),
            CacheFile::Sealed(f) => f.read_vectored_at(offset, bufs, mode),
        }
    }

    #[inline]
    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.write_vectored_at(offset, bufs, mode),
            CacheFile::Sealed(f) => f.write_vectored_at(offset, bufs, mode),
        }
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.write_zeroes_at(offset, len),
            CacheFile::Sealed(f) => f.write_zeroes_at(offset, len),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.set_len(len),
            CacheFile::Sealed(f) => f.set_len(len),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self {
            CacheFile::Plain(f) => f.flush(),
            CacheFile::Sealed(f) => f.flush(),
        }
    }

    fn describe(&self) -> String {
        match self {
            CacheFile::Plain(f) => f.describe(),
            CacheFile::Sealed(f) => f.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(dir: &std::path::Path) -> (CacheFile, std::path::PathBuf) {
        let p = dir.join("data");
        std::fs::write(&p, b"").unwrap();
        (CacheFile::sealed(LocalFile::open(&p, false).unwrap(), PageCipher::random()), p)
    }

    fn read(f: &CacheFile, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0xeeu8; len];
        f.read_at(off, &mut v).unwrap();
        v
    }

    /// Any byte range reads back what was written, around page edges, over
    /// holes and past the end; the file never holds the plaintext.
    #[test]
    fn unaligned_ranges_round_trip_and_stay_encrypted() {
        let d = tempfile::tempdir().unwrap();
        let (f, path) = sealed(d.path());
        let mut model = vec![0u8; 5 * PAGE as usize];
        let pattern: Vec<u8> = (0..model.len()).map(|i| b"SECRETPLAINTEXT!"[i % 16]).collect();
        for &(off, len) in &[(0u64, 4096usize), (100, 50), (4000, 300), (8192, 8192), (12000, 5000), (3, 1)] {
            f.write_at(off, &pattern[off as usize..off as usize + len]).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&pattern[off as usize..off as usize + len]);
            assert_eq!(read(&f, 0, model.len()), model, "after writing [{off}, +{len})");
        }
        f.write_zeroes_at(4090, 8300).unwrap();
        model[4090..4090 + 8300].fill(0);
        assert_eq!(read(&f, 0, model.len()), model);
        assert_eq!(read(&f, 5000, 7000), model[5000..12000]);
        // Past the end: zeroes.
        assert_eq!(read(&f, 40960, 100), vec![0u8; 100]);
        let raw = std::fs::read(&path).unwrap();
        assert!(raw.windows(8).all(|w| w != b"SECRETPL"), "plaintext on disk");
        // And the same bytes in another cache's file (another key) differ.
        let d2 = tempfile::tempdir().unwrap();
        let (g, path2) = sealed(d2.path());
        g.write_at(0, &pattern[..4096]).unwrap();
        assert_ne!(std::fs::read(&path2).unwrap()[..4096], raw[..4096]);
    }

    /// The SSD tier over a sealed data file: writes of whole pages, of
    /// part of a page (read-modify-write) and clean installs read back after
    /// a reopen; the data file holds none of it in clear; a cache kept
    /// otherwise, or under another key, or without the key, is refused.
    #[test]
    fn a_sealed_ssd_cache_reopens_refuses_mismatches_and_holds_no_plaintext() {
        use crate::tier::ssd::{CacheIdentity, OpenMode, SsdCache, CLEAN, DIRTY, DIRTY_PARTIAL};
        const CS: u64 = 64 << 10;
        let d = tempfile::tempdir().unwrap();
        let key = Arc::new(VolumeKey::generate());
        let id = CacheIdentity { volume_id: "ab".repeat(16), chunk_size: CS };
        let open = |s: &Sealing| SsdCache::open_sealed(d.path(), id.clone(), 1, 4 * CS, 1 << 30, OpenMode::Serve, s);
        let secret: Vec<u8> = b"TOPSECRET-PAGE!!".iter().copied().cycle().take(PAGE as usize).collect();
        let clean: Vec<u8> = b"CLEAN-CHUNK-DATA".iter().copied().cycle().take(CS as usize).collect();
        let (c, _) = open(&Sealing::Sealed(key.clone())).unwrap().unwrap();
        assert!(c.is_sealed());
        {
            let _g = c.lock_write(0);
            let mut w = secret.clone();
            c.write(0, PAGE, &IoVec::from_slice(&mut w), None).unwrap();
        }
        {
            let _g = c.lock_write(1);
            assert!(c.install_clean(1, &clean).unwrap());
            let mut w = secret[..100].to_vec();
            c.write(1, 10, &IoVec::from_slice(&mut w), None).unwrap();
        }
        c.persist().unwrap();
        drop(c);
        let mut want1 = clean.clone();
        want1[10..110].copy_from_slice(&secret[..100]);

        let (c, _) = open(&Sealing::Sealed(key.clone())).unwrap().unwrap();
        assert_eq!((c.state(0), c.state(1)), (DIRTY_PARTIAL, DIRTY));
        let mut page = vec![0u8; PAGE as usize];
        c.read(0, PAGE, &IoVec::from_slice(&mut page), IoMode::Blocking).unwrap();
        assert_eq!(page, secret);
        assert_eq!(c.read_chunk(1).unwrap(), want1);
        drop(c);
        let raw = std::fs::read(d.path().join("data")).unwrap();
        for probe in [&b"TOPSECRET"[..], b"CLEAN-CHUNK"] {
            assert!(!raw.windows(probe.len()).any(|w| w == probe), "plaintext in the data file");
        }

        let err = |s: &Sealing| match open(s) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened as {s:?}"),
        };
        assert!(err(&Sealing::Plain).contains("unsaved writes"));
        assert!(err(&Sealing::AsFound(None)).contains("needs the volume's key"));
        assert!(err(&Sealing::AsFound(Some(Arc::new(VolumeKey::generate())))).contains("another data key"));
        let (c, _) = open(&Sealing::AsFound(Some(key.clone()))).unwrap().unwrap();
        assert!(c.is_sealed() && c.read_chunk(1).unwrap() == want1);
        drop(c);

        // A clean plaintext cache asked to be sealed starts afresh.
        let d2 = tempfile::tempdir().unwrap();
        let open2 = |s: &Sealing| SsdCache::open_sealed(d2.path(), id.clone(), 1, 4 * CS, 1 << 30, OpenMode::Serve, s);
        let (c, _) = open2(&Sealing::Plain).unwrap().unwrap();
        {
            let _g = c.lock_write(2);
            assert!(c.install_clean(2, &clean).unwrap());
        }
        c.persist().unwrap();
        drop(c);
        let (c, o) = open2(&Sealing::Sealed(key)).unwrap().unwrap();
        assert!(matches!(o, crate::tier::ssd::Opened::Discarded(_)), "{o:?}");
        assert!(c.is_sealed() && c.state(2) != CLEAN);
    }

    /// Each cache derives its own key from the data key.
    #[test]
    fn caches_of_one_volume_have_different_keys() {
        let k = VolumeKey::generate();
        let (mut a, mut b) = (vec![7u8; 4096], vec![7u8; 4096]);
        PageCipher::for_cache(&k, "aaaa").encrypt(&mut a, 0);
        PageCipher::for_cache(&k, "bbbb").encrypt(&mut b, 0);
        assert_ne!(a, b);
        PageCipher::for_cache(&k, "aaaa").decrypt(&mut a, 0);
        assert_eq!(a, vec![7u8; 4096]);
    }
}
