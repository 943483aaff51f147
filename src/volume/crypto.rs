//! Client-side encryption of a volume (docs/encryption.md): the key
//! hierarchy — a random data key, wrapped in `volume.json` by a key derived
//! with argon2id from the user's key file, environment variable or
//! passphrase — and [`EncryptedRemote`], which stores every object of the
//! volume but its header as AES-256-GCM blocks and serves ranged reads of
//! the plaintext, so nothing above it knows encryption exists.
//!
//! Object layout: `DBE1` + a 32-byte salt, then the plaintext in blocks of
//! `block_size` bytes, each sealed on its own (ciphertext + 16-byte tag).
//! Each object is sealed under its own key, HMAC-SHA256(object master key,
//! salt); block `i`'s nonce is `i` (8 bytes, big-endian), 3 zero bytes and
//! a last-block flag; the additional data is the object's key (name), so
//! blocks cannot be moved between objects, reordered, or cut off. Every
//! full-size block is a middle block and the last block is always short
//! (empty when the plaintext fills whole blocks), so a truncated object is
//! always detected. The salt is random for `put` (256 bits: no two
//! objects share a key, whatever the host or generation), and for
//! `create` derived from the object's name and plaintext hash so that a
//! retried commit produces the same bytes and the fence recognises its own
//! landed attempt (the same plaintext at the same name is the only way two
//! objects share a key, and then they are identical).

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::remote::{collect_body, ByteStream, DynRemote, ObjectMeta, PutBody, RemoteError, RemoteResult, Slot};

/// The header's `encryption` value of an encrypted volume.
pub const CIPHER_NAME: &str = "aes-256-gcm";
/// The `scheme` of the `crypto` header field this code writes.
pub const SCHEME: &str = "driveblk-aes256gcm-blocks-v1";
/// Plaintext bytes per sealed block. Small enough that a ranged read of
/// one chunk frame fetches little more than the frame (on average one
/// block), large enough that the 16-byte tags cost 0.1%.
pub const DEFAULT_BLOCK_SIZE: u32 = 16 << 10;
const MAGIC: &[u8; 4] = b"DBE1";
const SALT_LEN: usize = 32;
const HEADER_LEN: u64 = (MAGIC.len() + SALT_LEN) as u64;
const TAG_LEN: u64 = 16;
/// argon2id cost for the key-encryption key: 64 MiB, 3 passes (about a
/// quarter of a second, once per process and volume).
const ARGON2_M_KIB: u32 = 64 << 10;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;

type HmacSha256 = Hmac<Sha256>;

/// Objects stored as they are: the header must say "encrypted, key
/// needed" to anyone; the README is for people browsing the folder; an
/// adopted base copy is a copy of a file that is plaintext on the remote
/// anyway; a clock probe's content is never read.
pub fn is_plaintext_key(key: &str) -> bool {
    key == super::format::HEADER_KEY
        || key == super::verify::README_KEY
        || key.starts_with("base-")
        || key.starts_with(super::lease::PROBE_PREFIX)
}

/// The user's key material (a key file's bytes, an environment variable's
/// value, or a passphrase), from which the key-encryption key is derived.
pub struct UserKey {
    secret: Zeroizing<Vec<u8>>,
    /// Where it came from, for messages (never the secret).
    pub source: String,
    /// True when it came from `DRIVEBLK_KEY_FILE` alone, which may be set
    /// for every volume: a plaintext volume opened with it is served with a
    /// warning, where a key given by a flag is refused ([`open_key`]).
    pub ambient: bool,
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserKey({})", self.source)
    }
}

/// Where the user's key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A file's contents (a trailing newline is dropped).
    File(PathBuf),
    /// The file `DRIVEBLK_KEY_FILE` names, used when no flag gives a key.
    DefaultFile(PathBuf),
    /// The value of an environment variable.
    Env(String),
    /// A passphrase typed at the terminal.
    Prompt,
}

impl KeySource {
    /// Reads the key material.
    pub fn load(&self) -> Result<UserKey, String> {
        let (secret, source) = match self {
            KeySource::File(p) | KeySource::DefaultFile(p) => {
                let b = std::fs::read(p).map_err(|e| format!("reading key file {}: {e}", p.display()))?;
                crate::remote::private::warn_if_exposed(p, "key file", "decrypt the volume");
                match self {
                    KeySource::DefaultFile(_) => (b, format!("key file {} (DRIVEBLK_KEY_FILE)", p.display())),
                    _ => (b, format!("key file {}", p.display())),
                }
            }
            KeySource::Env(v) => {
                let s = std::env::var_os(v).ok_or_else(|| format!("environment variable {v} (the key) is not set"))?;
                (std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec(), format!("environment variable {v}"))
            }
            KeySource::Prompt => (read_passphrase("Volume passphrase: ")?.into_bytes(), "passphrase".to_string()),
        };
        let mut key = UserKey::new(secret, source)?;
        key.ambient = matches!(self, KeySource::DefaultFile(_));
        Ok(key)
    }
}

impl UserKey {
    /// The key material (to compare two entries of a passphrase).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Key material from bytes; a trailing newline is not part of it.
    pub fn new(mut secret: Vec<u8>, source: String) -> Result<Self, String> {
        while secret.last().is_some_and(|&c| c == b'\n' || c == b'\r') {
            secret.pop();
        }
        if secret.len() < 8 {
            return Err(format!("the {source} holds {} bytes; a key needs at least 8", secret.len()));
        }
        Ok(Self { secret: Zeroizing::new(secret), source, ambient: false })
    }
}

/// Reads a line from the terminal with echo off.
fn read_passphrase(prompt: &str) -> Result<String, String> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| format!("a passphrase needs a terminal (/dev/tty: {e}); use --key-file or --key-env"))?;
    let fd = tty.as_raw_fd();
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open terminal; old is a valid termios to fill.
    let have = unsafe { libc::tcgetattr(fd, &mut old) } == 0;
    if have {
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let _ = (&tty).write_all(prompt.as_bytes());
    let mut line = String::new();
    let r = std::io::BufReader::new(&tty).read_line(&mut line);
    if have {
        // SAFETY: restores what tcgetattr returned.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    }
    let _ = (&tty).write_all(b"\n");
    r.map_err(|e| format!("reading the passphrase: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// argon2id parameters and salt of one wrapping of the data key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub alg: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    /// 16 random bytes, hex; new at every wrap (rekey, fork).
    pub salt: String,
}

/// The `crypto` field of `volume.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CryptoHeader {
    pub scheme: String,
    pub block_size: u32,
    /// First 8 bytes of HMAC(data key, "key id"), hex: equal on every
    /// volume sharing the data key (forks), and says nothing about it.
    pub key_id: String,
    pub kdf: KdfParams,
    /// The data key sealed with AES-256-GCM under the key-encryption key:
    /// hex of nonce (12) + ciphertext (32) + tag (16).
    pub wrapped_key: String,
}

/// Why a key did not open a volume.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the volume is encrypted; give its key with --key-file, --key-env or --passphrase")]
    Needed,
    #[error("the {0} does not open this volume (wrong key or passphrase)")]
    Wrong(String),
    #[error("the volume's crypto header is unusable: {0}")]
    Bad(String),
    /// Nothing authenticates `volume.json`: whoever can write the folder
    /// can make an encrypted volume's header say plaintext, and a host
    /// that believed it would upload in clear.
    #[error("the volume's header says it is not encrypted, but a key was given ({0}): refusing (the header may have been replaced on the remote, to have this host write in clear); if the volume really is plaintext, open it without --key-file, --key-env or --passphrase (or a config file's key_file, key_env, key_credential)")]
    NotEncrypted(String),
}

/// A volume's data key and the keys derived from it.
pub struct VolumeKey {
    data_key: Zeroizing<[u8; 32]>,
    object_master: Zeroizing<[u8; 32]>,
    salt_key: Zeroizing<[u8; 32]>,
    pub block_size: u32,
    pub key_id: String,
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeKey({})", self.key_id)
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("hmac takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The key-encryption key; derived once per process for each (key, salt,
/// cost), since argon2 is slow on purpose.
fn kek(user: &UserKey, kdf: &KdfParams) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    type Keks = Mutex<HashMap<[u8; 32], Zeroizing<[u8; 32]>>>;
    static CACHE: OnceLock<Keks> = OnceLock::new();
    if kdf.alg != "argon2id" {
        return Err(KeyError::Bad(format!("unknown key derivation {:?}", kdf.alg)));
    }
    let salt = hex::decode(&kdf.salt).map_err(|_| KeyError::Bad("kdf salt is not hex".into()))?;
    let id = hmac(&salt, &[&user.secret, &kdf.m_kib.to_le_bytes(), &kdf.t.to_le_bytes(), &kdf.p.to_le_bytes()]);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(k) = cache.lock().expect("kek cache").get(&id) {
        return Ok(k.clone());
    }
    // Bounds keep a hostile header from asking for terabytes or years.
    if kdf.m_kib > (4 << 20) || kdf.t > 64 || kdf.p > 64 {
        return Err(KeyError::Bad("argon2 cost is implausibly high".into()));
    }
    let params = argon2::Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32)).map_err(|e| KeyError::Bad(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(&user.secret, &salt, &mut out[..]).map_err(|e| KeyError::Bad(e.to_string()))?;
    cache.lock().expect("kek cache").insert(id, out.clone());
    Ok(out)
}

const WRAP_AAD: &[u8] = b"driveblk data key v1";

impl VolumeKey {
    /// A fresh random data key.
    pub fn generate() -> Self {
        Self::from_data_key(rand::random(), DEFAULT_BLOCK_SIZE)
    }

    fn from_data_key(dk: [u8; 32], block_size: u32) -> Self {
        let data_key = Zeroizing::new(dk);
        let object_master = Zeroizing::new(hmac(&dk, &[b"driveblk object keys"]));
        let salt_key = Zeroizing::new(hmac(&dk, &[b"driveblk create salts"]));
        let key_id = hex::encode(&hmac(&dk, &[b"driveblk key id"])[..8]);
        Self { data_key, object_master, salt_key, block_size, key_id }
    }

    /// The header field holding this data key wrapped under `user`'s key
    /// (a new salt each time).
    pub fn wrap(&self, user: &UserKey) -> Result<CryptoHeader, KeyError> {
        let kdf = KdfParams {
            alg: "argon2id".into(),
            m_kib: ARGON2_M_KIB,
            t: ARGON2_T,
            p: ARGON2_P,
            salt: hex::encode(rand::random::<[u8; 16]>()),
        };
        let kek = kek(user, &kdf)?;
        let nonce: [u8; 12] = rand::random();
        let mut buf = self.data_key.to_vec();
        let tag = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&kek[..]))
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), WRAP_AAD, &mut buf)
            .map_err(|_| KeyError::Bad("sealing the data key failed".into()))?;
        let mut w = nonce.to_vec();
        w.extend_from_slice(&buf);
        w.extend_from_slice(&tag);
        Ok(CryptoHeader {
            scheme: SCHEME.into(),
            block_size: self.block_size,
            key_id: self.key_id.clone(),
            kdf,
            wrapped_key: hex::encode(w),
        })
    }

    /// Unwraps the data key of `h` with `user`'s key. A wrong key fails the
    /// seal's tag check: an error, never a wrong data key.
    pub fn unwrap(h: &CryptoHeader, user: &UserKey) -> Result<Self, KeyError> {
        if h.scheme != SCHEME {
            return Err(KeyError::Bad(format!(
                "scheme {:?} is not supported (this driveblk knows {SCHEME})",
                h.scheme
            )));
        }
        if !(4096..=(1 << 20)).contains(&h.block_size) {
            return Err(KeyError::Bad(format!("block size {} is out of range", h.block_size)));
        }
        let w = hex::decode(&h.wrapped_key).map_err(|_| KeyError::Bad("wrapped_key is not hex".into()))?;
        if w.len() != 12 + 32 + 16 {
            return Err(KeyError::Bad("wrapped_key has the wrong length".into()));
        }
        let kek = kek(user, &h.kdf)?;
        let mut dk = Zeroizing::new([0u8; 32]);
        dk.copy_from_slice(&w[12..44]);
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&kek[..]))
            .decrypt_in_place_detached(Nonce::from_slice(&w[..12]), WRAP_AAD, &mut dk[..], Tag::from_slice(&w[44..]))
            .map_err(|_| KeyError::Wrong(user.source.clone()))?;
        let k = Self::from_data_key(*dk, h.block_size);
        if k.key_id != h.key_id {
            return Err(KeyError::Bad("the data key does not match the header's key_id".into()));
        }
        Ok(k)
    }

    fn object_cipher(&self, salt: &[u8]) -> Aes256Gcm {
        let k = Zeroizing::new(hmac(&self.object_master[..], &[salt]));
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k[..]))
    }

    /// A keyed hash of `data` (HMAC-SHA256 with a key derived from the
    /// data key), hex: what the fence's tags become on the remote, so no
    /// plain hash of a manifest is stored there.
    pub fn keyed_hash(&self, data: &[u8]) -> String {
        hex::encode(hmac(&self.salt_key[..], &[b"tag", data]))
    }

    fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }

    /// A 64-byte key for local use (the SSD cache's AES-256-XTS key pair),
    /// HKDF-SHA256 of the data key with `salt` (per cache) and `label` (per
    /// purpose), so no two caches or purposes share a key and none of them
    /// reveals the data key.
    pub fn derive_local(&self, label: &str, salt: &[u8]) -> Zeroizing<[u8; 64]> {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), &self.data_key[..]);
        let mut out = Zeroizing::new([0u8; 64]);
        hk.expand(label.as_bytes(), &mut out[..]).expect("64 bytes is a valid HKDF-SHA256 length");
        out
    }

    /// `data` sealed like an object named `name` (random salt), for a copy
    /// kept on local disk (the cache's offline manifest).
    pub fn seal_local(&self, name: &str, data: &[u8]) -> Vec<u8> {
        self.seal(name, &rand::random(), data)
    }

    /// Opens what [`seal_local`](Self::seal_local) sealed under `name`.
    pub fn open_local(&self, name: &str, b: &[u8]) -> Result<Vec<u8>, String> {
        let salt = split_header(b)?;
        let c = self.object_cipher(&salt);
        let (out, ended) = open_blocks(&c, name, 0, &b[HEADER_LEN as usize..], self.bs())?;
        if !ended {
            return Err("object is truncated".into());
        }
        Ok(out)
    }

    /// Stored size of a plaintext of `n` bytes.
    pub fn sealed_len(&self, n: u64) -> u64 {
        HEADER_LEN + (n / self.bs()) * (self.bs() + TAG_LEN) + n % self.bs() + TAG_LEN
    }

    /// Plaintext size of a stored object of `n` bytes, if it is a possible size.
    pub fn plain_len(&self, n: u64) -> Option<u64> {
        let body = n.checked_sub(HEADER_LEN)?;
        let (full, rem) = (body / (self.bs() + TAG_LEN), body % (self.bs() + TAG_LEN));
        Some(full * self.bs() + rem.checked_sub(TAG_LEN)?)
    }

    /// Seals a whole plaintext with `salt`.
    fn seal(&self, name: &str, salt: &[u8; SALT_LEN], data: &[u8]) -> Vec<u8> {
        let c = self.object_cipher(salt);
        let mut out = Vec::with_capacity(self.sealed_len(data.len() as u64) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(salt);
        let bs = self.block_size as usize;
        let full = data.len() / bs;
        for i in 0..=full {
            let block = &data[i * bs..((i + 1) * bs).min(data.len())];
            seal_block(&c, name, i as u64, i == full, block, &mut out);
        }
        out
    }
}

fn nonce(idx: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&idx.to_be_bytes());
    n[11] = u8::from(last);
    n
}

fn seal_block(c: &Aes256Gcm, name: &str, idx: u64, last: bool, block: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(block);
    let tag = c
        .encrypt_in_place_detached(Nonce::from_slice(&nonce(idx, last)), name.as_bytes(), &mut out[at..])
        .expect("AES-GCM seals any block under 64 GiB");
    out.extend_from_slice(&tag);
}

/// Opens consecutive sealed blocks starting at block `first`. The last
/// piece may be short only if it is the object's last block.
fn open_blocks(c: &Aes256Gcm, name: &str, first: u64, mut data: &[u8], bs: u64) -> Result<(Vec<u8>, bool), String> {
    let step = (bs + TAG_LEN) as usize;
    let mut out = Vec::with_capacity(data.len());
    let mut idx = first;
    let mut ended = false;
    while !data.is_empty() {
        let n = data.len().min(step);
        if n < TAG_LEN as usize {
            return Err("object is truncated".into());
        }
        let last = n < step;
        let (piece, rest) = data.split_at(n);
        let (ct, tag) = piece.split_at(n - TAG_LEN as usize);
        let at = out.len();
        out.extend_from_slice(ct);
        c.decrypt_in_place_detached(
            Nonce::from_slice(&nonce(idx, last)),
            name.as_bytes(),
            &mut out[at..],
            Tag::from_slice(tag),
        )
        .map_err(|_| format!("block {idx} does not authenticate (tampered, truncated, or another key's)"))?;
        data = rest;
        idx += 1;
        ended = last;
    }
    Ok((out, ended))
}

fn split_header(b: &[u8]) -> Result<[u8; SALT_LEN], String> {
    if b.len() < HEADER_LEN as usize || &b[..4] != MAGIC {
        return Err("not an encrypted driveblk object (no DBE1 header)".into());
    }
    Ok(b[4..HEADER_LEN as usize].try_into().expect("salt length"))
}

/// True when `b` starts like a sealed object (`DBE1`).
pub fn looks_sealed(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

/// AES-256-CTR under a random key that lives only in this process: for
/// spill files (a boot profile's pack while it is built) that this process
/// writes once, reads back and deletes, and that must not hold plaintext on
/// disk. Each byte position has its own keystream byte and the file is
/// written once, so no keystream is ever reused; nothing needs integrity
/// (whatever is read back is checked by its digest where it is used).
pub struct SpillCipher {
    key: Zeroizing<[u8; 32]>,
    iv: [u8; 16],
}

impl std::fmt::Debug for SpillCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpillCipher")
    }
}

impl SpillCipher {
    /// A fresh random key.
    pub fn random() -> Self {
        // The low half of the counter starts at 0: 2^64 blocks before it
        // could wrap into the random high half.
        let mut iv: [u8; 16] = rand::random();
        iv[8..].fill(0);
        Self { key: Zeroizing::new(rand::random()), iv }
    }

    /// Encrypts or decrypts (the same operation) `buf`, which sits at byte
    /// `pos` of the file.
    pub fn apply(&self, pos: u64, buf: &mut [u8]) {
        use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
        let mut c = ctr::Ctr128BE::<aes::Aes256>::new((&*self.key).into(), (&self.iv).into());
        c.seek(pos);
        c.apply_keystream(buf);
    }
}

/// A volume folder whose objects (but the plaintext ones) are sealed with
/// a volume key. Sits above retry, so every attempt of an upload sends the
/// same sealed bytes.
pub struct EncryptedRemote {
    inner: DynRemote,
    key: Arc<VolumeKey>,
    /// Salts of immutable objects read by range (packs, profile packs), so
    /// only the first ranged read of each also reads its header.
    salts: Mutex<HashMap<String, [u8; SALT_LEN]>>,
}

impl std::fmt::Debug for EncryptedRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptedRemote({})", self.inner.describe())
    }
}

/// `remote` with `key`'s encryption, or as it is when the volume is not encrypted.
pub fn wrap(remote: DynRemote, key: Option<&Arc<VolumeKey>>) -> DynRemote {
    match key {
        Some(k) => Arc::new(EncryptedRemote { inner: remote, key: k.clone(), salts: Mutex::new(HashMap::new()) }),
        None => remote,
    }
}

/// The volume key of a header, unwrapped with the caller's key; `None`
/// when the volume is not encrypted. The header is not authenticated, so a
/// key given for a volume whose header says plaintext is refused (the
/// header may have been replaced); one from `DRIVEBLK_KEY_FILE` alone only
/// warns, since that variable may be set for plaintext volumes too.
pub fn open_key(
    crypto: Option<&serde_json::Value>,
    user: Option<&UserKey>,
) -> Result<Option<Arc<VolumeKey>>, KeyError> {
    let Some(v) = crypto else {
        return match user {
            None => Ok(None),
            Some(u) if u.ambient => {
                // Once: a command may open the volume more than once.
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "the volume's header says it is not encrypted: opening it as plaintext, not using the {}, which may be meant for other volumes (given by a flag, the key would be refused). If this volume was encrypted, its header was replaced on the remote: stop, and check who can write there",
                        u.source
                    )
                });
                Ok(None)
            }
            Some(u) => Err(KeyError::NotEncrypted(u.source.clone())),
        };
    };
    let h: CryptoHeader = serde_json::from_value(v.clone()).map_err(|e| KeyError::Bad(e.to_string()))?;
    let user = user.ok_or(KeyError::Needed)?;
    Ok(Some(Arc::new(VolumeKey::unwrap(&h, user)?)))
}

fn is_immutable(key: &str) -> bool {
    key.starts_with(super::format::PACK_PREFIX) || key.ends_with(".pack")
}

impl EncryptedRemote {
    fn bad(&self, op: &'static str, key: &str, why: String) -> RemoteError {
        RemoteError::Fatal {
            remote: self.inner.describe(),
            op,
            key: key.to_string(),
            message: format!("decryption failed: {why}"),
        }
    }

    fn map_meta(&self, mut m: ObjectMeta) -> ObjectMeta {
        if !is_plaintext_key(&m.key) {
            // An impossible size shows as 0 bytes: verify then names it short.
            m.size = self.key.plain_len(m.size).unwrap_or(0);
            m.md5 = None;
            m.sha256 = None;
        }
        m
    }

    fn open_whole(&self, op: &'static str, key: &str, b: &[u8]) -> RemoteResult<Bytes> {
        let salt = split_header(b).map_err(|w| self.bad(op, key, w))?;
        let c = self.key.object_cipher(&salt);
        let (out, ended) =
            open_blocks(&c, key, 0, &b[HEADER_LEN as usize..], self.key.bs()).map_err(|w| self.bad(op, key, w))?;
        if !ended {
            return Err(self.bad(op, key, "object is truncated".into()));
        }
        Ok(Bytes::from(out))
    }

    async fn salt_of(&self, key: &str) -> RemoteResult<[u8; SALT_LEN]> {
        // Read again when a shared cache entry failed verification: the
        // memo may hold what that entry said.
        if let Some(s) = self.salts.lock().expect("salts").get(key).filter(|_| !crate::remote::shared::refreshing()) {
            return Ok(*s);
        }
        let h = self.inner.get_range(key, 0..HEADER_LEN).await?;
        let s = split_header(&h).map_err(|w| self.bad("read", key, w))?;
        if is_immutable(key) {
            let mut m = self.salts.lock().expect("salts");
            if m.len() > 65536 {
                m.clear();
            }
            m.insert(key.to_string(), s);
        }
        Ok(s)
    }

    /// A body sealed block by block as it streams, with a random salt.
    fn seal_stream(&self, key: &str, body: PutBody) -> PutBody {
        let salt: [u8; SALT_LEN] = rand::random();
        let vk = self.key.clone();
        let name = key.to_string();
        let len = body.len().map(|n| vk.sealed_len(n));
        PutBody::from_stream_fn(len, move || {
            let c = vk.object_cipher(&salt);
            let bs = vk.block_size as usize;
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&salt);
            // `buf[pos..]` is what is not sealed yet: sealing advances `pos`,
            // and only the short tail left moves when more arrives, so a
            // 64 MiB piece is not shifted down once per 16 KiB block.
            struct St {
                inner: ByteStream,
                buf: Vec<u8>,
                pos: usize,
                idx: u64,
                done: bool,
            }
            let name = name.clone();
            let st = St { inner: body.stream(), buf: Vec::new(), pos: 0, idx: 0, done: false };
            let blocks = futures::stream::unfold(st, move |mut st| {
                let c = c.clone();
                let name = name.clone();
                async move {
                    if st.done {
                        return None;
                    }
                    loop {
                        if st.buf.len() - st.pos >= bs {
                            // A full block is never the last (the last is short).
                            let mut out = Vec::with_capacity(bs + TAG_LEN as usize);
                            seal_block(&c, &name, st.idx, false, &st.buf[st.pos..st.pos + bs], &mut out);
                            st.pos += bs;
                            st.idx += 1;
                            return Some((Ok(Bytes::from(out)), st));
                        }
                        match st.inner.next().await {
                            Some(Ok(b)) => {
                                st.buf.drain(..st.pos);
                                st.pos = 0;
                                st.buf.extend_from_slice(&b);
                            }
                            Some(Err(e)) => {
                                st.done = true;
                                return Some((Err(e), st));
                            }
                            None => {
                                let mut out = Vec::with_capacity(st.buf.len() - st.pos + TAG_LEN as usize);
                                seal_block(&c, &name, st.idx, true, &st.buf[st.pos..], &mut out);
                                st.done = true;
                                return Some((Ok(Bytes::from(out)), st));
                            }
                        }
                    }
                }
            });
            Box::pin(futures::stream::once(async move { Ok(Bytes::from(head)) }).chain(blocks))
        })
    }
}

#[async_trait]
impl crate::remote::Layer for EncryptedRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        if is_plaintext_key(key) {
            return self.inner.get_range(key, range).await;
        }
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let (bs, step) = (self.key.bs(), self.key.bs() + TAG_LEN);
        let (first, end_block) = (range.start / bs, range.end.div_ceil(bs));
        let crange = HEADER_LEN + first * step..HEADER_LEN + end_block * step;
        // The first read of an object fetches its header alongside.
        let (salt, data) = tokio::try_join!(self.salt_of(key), self.inner.get_range(key, crange))?;
        if data.is_empty() {
            // Wholly past the end: cut, as the trait says (callers check lengths).
            return Ok(Bytes::new());
        }
        let c = self.key.object_cipher(&salt);
        let (plain, ended) = open_blocks(&c, key, first, &data, bs).map_err(|w| self.bad("read", key, w))?;
        if !ended && (plain.len() as u64) < (end_block - first) * bs {
            return Err(self.bad("read", key, "object is truncated".into()));
        }
        let from = (range.start - first * bs) as usize;
        let to = ((range.end - first * bs) as usize).min(plain.len());
        Ok(Bytes::from(plain).slice(from.min(to)..to))
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let b = self.inner.get(key).await?;
        if is_plaintext_key(key) {
            return Ok(b);
        }
        self.open_whole("read", key, &b)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        if is_plaintext_key(key) {
            return self.inner.put(key, body).await;
        }
        let m = self.inner.put(key, self.seal_stream(key, body)).await?;
        Ok(self.map_meta(m))
    }

    async fn head(&self, key: &str) -> RemoteResult<ObjectMeta> {
        Ok(self.map_meta(self.inner.head(key).await?))
    }

    async fn list(&self, prefix: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Ok(self.inner.list(prefix).await?.into_iter().map(|m| self.map_meta(m)).collect())
    }

    async fn list_after(&self, prefix: &str, after: &str) -> RemoteResult<Vec<ObjectMeta>> {
        Ok(self.inner.list_after(prefix, after).await?.into_iter().map(|m| self.map_meta(m)).collect())
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        if is_plaintext_key(key) {
            return self.inner.create(key, slot, tag, body).await;
        }
        let plain = collect_body(&body).await.map_err(|e| RemoteError::Io {
            remote: self.inner.describe(),
            op: "create",
            key: key.to_string(),
            source: e,
        })?;
        // Deterministic: a retried commit seals to the same bytes, so its
        // tag (of the sealed bytes, as `dir:` computes it) recognises it.
        let salt = hmac(&self.key.salt_key[..], &[b"salt", key.as_bytes(), &[0], &Sha256::digest(&plain)]);
        let sealed = self.key.seal(key, &salt, &plain);
        let inner_tag = crate::remote::content_tag(&sealed);
        match self.inner.create(key, slot, &inner_tag, PutBody::from_bytes(sealed)).await {
            Ok(m) => Ok(ObjectMeta { tag: Some(tag.to_string()), ..self.map_meta(m) }),
            Err(RemoteError::AlreadyExists { remote, key, tag: t }) => {
                let t = t.map(|t| if t == inner_tag { tag.to_string() } else { self.key.keyed_hash(t.as_bytes()) });
                Err(RemoteError::AlreadyExists { remote, key, tag: t })
            }
            Err(e) => Err(e),
        }
    }

    async fn head_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<ObjectMeta> {
        Ok(self.map_meta(self.inner.head_created(key, slot).await?))
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        let b = self.inner.get_created(key, slot).await?;
        if is_plaintext_key(key) {
            return Ok(b);
        }
        self.open_whole("read", key, &b)
    }

    async fn find_trashed(&self, key: &str) -> RemoteResult<Option<ObjectMeta>> {
        Ok(self.inner.find_trashed(key).await?.map(|m| self.map_meta(m)))
    }

    async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
        Ok(self.map_meta(self.inner.head_revision(key, revision).await?))
    }

    fn describe(&self) -> String {
        format!("{} (encrypted)", self.inner.describe())
    }

    // A plaintext object (a base image) reads its pinned revision as
    // stored. A sealed object's revision would need that revision's own
    // header to decrypt, and volume objects are never revised, so such a
    // read is refused: never the current content in the revision's place.
    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        if is_plaintext_key(key) {
            return self.inner.get_range_revision(key, revision, range).await;
        }
        Err(RemoteError::Fatal {
            remote: self.inner.describe(),
            op: "read revision",
            key: key.to_string(),
            message: format!(
                "revision {revision} of an encrypted object cannot be read; volume objects are never revised"
            ),
        })
    }
}

/// Rewraps the data key of the encrypted volume at `url` (opened with
/// `opts.key`) under `new`: only `volume.json` is rewritten, nothing else
/// is re-encrypted. Returns the data key's id.
pub fn rekey(url: &str, opts: &super::RemoteOptions, new: &UserKey) -> super::VolumeResult<String> {
    use super::format::{VolumeHeader, HEADER_KEY};
    use super::VolumeError;
    let u = crate::remote::RemoteUrl::parse(url)?;
    let rt = super::runtime("driveblk-rekey")?;
    let remote = super::reader::connect(u.folder_with(&opts.config), opts);
    rt.block_on(async {
        let bytes = remote.get(HEADER_KEY).await.map_err(|e| match e.is_not_found() {
            true => VolumeError::NotFound { url: url.to_string() },
            false => VolumeError::remote(format!("reading {url}/{HEADER_KEY}"), e),
        })?;
        let mut header = VolumeHeader::from_bytes(&bytes).map_err(|reason| VolumeError::header(url, &bytes, reason))?;
        let key_err = |source| VolumeError::Key { url: url.to_string(), source };
        let not_encrypted = || {
            VolumeError::InvalidOptions(format!(
                "{url} is not encrypted; rekey changes the key of an encrypted volume (encrypting an existing one means importing it again with --encrypt)"
            ))
        };
        if header.crypto.is_none() {
            return Err(not_encrypted());
        }
        let Some(key) = open_key(header.crypto.as_ref(), opts.key.as_deref()).map_err(key_err)? else {
            return Err(not_encrypted());
        };
        let h = key.wrap(new).map_err(key_err)?;
        header.crypto = Some(serde_json::to_value(h).expect("crypto header serialises"));
        // One atomic replace of the small header (temp + rename on `dir:`,
        // a content update on Drive): readers see the old wrap or the new.
        remote
            .put(HEADER_KEY, PutBody::from_bytes(header.to_bytes()))
            .await
            .map_err(|e| VolumeError::remote(format!("writing {url}/{HEADER_KEY}"), e))?;
        Ok(key.key_id.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirRemote;

    fn user(s: &str) -> UserKey {
        UserKey::new(s.as_bytes().to_vec(), "test key".into()).unwrap()
    }

    #[test]
    fn wrap_unwrap_and_wrong_key() {
        let k = VolumeKey::generate();
        let h = k.wrap(&user("correct horse battery")).unwrap();
        let k2 = VolumeKey::unwrap(&h, &user("correct horse battery")).unwrap();
        assert_eq!(*k2.data_key, *k.data_key);
        assert!(matches!(VolumeKey::unwrap(&h, &user("wrong horse battery")), Err(KeyError::Wrong(_))));
    }

    /// The header is not authenticated: a key given for a volume whose
    /// header says plaintext is refused; one from DRIVEBLK_KEY_FILE alone
    /// (maybe set for every volume) is not used; no key, no question.
    #[test]
    fn a_key_for_a_plaintext_header_is_refused_unless_from_the_environment() {
        assert!(matches!(open_key(None, Some(&user("given by a flag"))), Err(KeyError::NotEncrypted(_))));
        let mut ambient = user("from the environment");
        ambient.ambient = true;
        assert!(open_key(None, Some(&ambient)).unwrap().is_none());
        assert!(open_key(None, None).unwrap().is_none());
    }

    #[test]
    fn sizes_round_trip() {
        let k = VolumeKey::generate();
        for n in [0u64, 1, 16383, 16384, 16385, 1 << 20, (1 << 20) + 7] {
            assert_eq!(k.plain_len(k.sealed_len(n)), Some(n), "{n}");
            assert_eq!(k.seal("x", &[1; 32], &vec![7u8; n as usize]).len() as u64, k.sealed_len(n));
        }
    }

    /// A body that arrives in uneven pieces (smaller than, across and
    /// larger than a block) seals to what the whole body would, byte for
    /// byte after opening, and to the announced length.
    #[tokio::test]
    async fn a_body_in_uneven_pieces_seals_whole() {
        let dir = tempfile::tempdir().unwrap();
        let inner: DynRemote = Arc::new(DirRemote::new(dir.path()));
        let k = Arc::new(VolumeKey::generate());
        let r = wrap(inner.clone(), Some(&k));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let cuts = [0usize, 7_000, 7_001, 40_000, 40_000, 200_000, 300_000];
        let pieces: Vec<Bytes> = cuts.windows(2).map(|w| Bytes::copy_from_slice(&data[w[0]..w[1]])).collect();
        let body = PutBody::from_stream_fn(Some(data.len() as u64), move || {
            Box::pin(futures::stream::iter(pieces.clone().into_iter().map(Ok)))
        });
        r.put("pack-1", body).await.unwrap();
        assert_eq!(inner.get("pack-1").await.unwrap().len() as u64, k.sealed_len(data.len() as u64));
        assert_eq!(&r.get("pack-1").await.unwrap()[..], &data[..]);
        assert_eq!(&r.get_range("pack-1", 16_000..50_000).await.unwrap()[..], &data[16_000..50_000]);
    }

    #[tokio::test]
    async fn ranges_tamper_truncation_and_nonces() {
        let dir = tempfile::tempdir().unwrap();
        let inner: DynRemote = Arc::new(DirRemote::new(dir.path()));
        let k = Arc::new(VolumeKey::generate());
        let r = wrap(inner.clone(), Some(&k));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        r.put("pack-1", PutBody::from_bytes(data.clone())).await.unwrap();
        assert_eq!(r.head("pack-1").await.unwrap().size, data.len() as u64);
        assert_eq!(&r.get("pack-1").await.unwrap()[..], &data[..]);
        for (a, b) in [
            (0, 1),
            (5, 16384),
            (16384, 16385),
            (16000, 50_000),
            (99_999, 100_000),
            (90_000, 200_000),
            (150_000, 160_000),
        ] {
            let got = r.get_range("pack-1", a..b).await.unwrap();
            let (lo, hi) = ((a as usize).min(data.len()), (b as usize).min(data.len()));
            assert_eq!(&got[..], &data[lo..hi], "{a}..{b}");
        }
        // The same plaintext put twice seals differently (random salts).
        r.put("pack-2", PutBody::from_bytes(data.clone())).await.unwrap();
        let (s1, s2) = (inner.get("pack-1").await.unwrap(), inner.get("pack-2").await.unwrap());
        assert_ne!(s1[4..36], s2[4..36]);
        // Tampering with one byte, or cutting the object, is an error.
        let path = dir.path().join("pack-2");
        let mut b = std::fs::read(&path).unwrap();
        b[50_000] ^= 1;
        std::fs::write(&path, &b).unwrap();
        assert!(r.get("pack-2").await.unwrap_err().to_string().contains("decryption failed"));
        assert!(r.get_range("pack-2", 40_000..60_000).await.is_err());
        assert_eq!(&r.get_range("pack-2", 0..1000).await.unwrap()[..], &data[..1000]);
        let cut = &s1[..s1.len() - 100];
        std::fs::write(dir.path().join("pack-3"), cut).unwrap();
        assert!(r.get("pack-3").await.is_err());
        assert!(r.get_range("pack-3", 98_000..100_000).await.is_err());
        let whole_blocks = &s1[..(HEADER_LEN + 2 * (k.bs() + TAG_LEN)) as usize];
        std::fs::write(dir.path().join("pack-4"), whole_blocks).unwrap();
        assert!(r.get("pack-4").await.is_err(), "a cut on a block boundary is caught too");
        // An object sealed under one name does not open under another.
        std::fs::write(dir.path().join("pack-5"), &s1).unwrap();
        assert!(r.get("pack-5").await.is_err());
        // Creates are deterministic per (name, plaintext) and recognised.
        let t = crate::remote::content_tag(b"manifest");
        r.create("gen-1", None, &t, PutBody::from_bytes(&b"manifest"[..])).await.unwrap();
        match r.create("gen-1", None, &t, PutBody::from_bytes(&b"manifest"[..])).await.unwrap_err() {
            RemoteError::AlreadyExists { tag, .. } => assert_eq!(tag.as_deref(), Some(t.as_str())),
            e => panic!("{e}"),
        }
        match r.create("gen-1", None, "other", PutBody::from_bytes(&b"other"[..])).await.unwrap_err() {
            RemoteError::AlreadyExists { tag, .. } => assert_ne!(tag.as_deref(), Some("other")),
            e => panic!("{e}"),
        }
        assert_eq!(&r.get("gen-1").await.unwrap()[..], b"manifest");
    }

    /// A store that keeps an older revision `r1` of each object as
    /// `KEY@r1`, for revision reads.
    #[derive(Debug)]
    struct Revised(DynRemote);

    #[async_trait]
    impl crate::remote::Layer for Revised {
        fn inner(&self) -> &DynRemote {
            &self.0
        }
        async fn head_revision(&self, key: &str, revision: &str) -> RemoteResult<ObjectMeta> {
            self.0.head(&format!("{key}@{revision}")).await
        }
        async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
            self.0.get_range(&format!("{key}@{revision}"), range).await
        }
    }

    /// A base image replaced since attach is read at its pinned revision
    /// through the encryption layer, and a sealed object's revision read
    /// is refused: neither ever yields the current content in its place.
    #[tokio::test]
    async fn revision_reads_never_return_the_current_content() {
        let dir = tempfile::tempdir().unwrap();
        let store: DynRemote = Arc::new(DirRemote::new(dir.path()));
        let k = Arc::new(VolumeKey::generate());
        let r = wrap(Arc::new(Revised(store.clone())), Some(&k));
        store.put("base-disk.qcow2@r1", PutBody::from_bytes(&b"pinned bytes"[..])).await.unwrap();
        store.put("base-disk.qcow2", PutBody::from_bytes(&b"newer upload"[..])).await.unwrap();
        assert_eq!(&r.get_range_revision("base-disk.qcow2", "r1", 0..6).await.unwrap()[..], b"pinned");
        r.put("pack-1", PutBody::from_bytes(&b"sealed"[..])).await.unwrap();
        store.put("pack-1@r1", PutBody::from_bytes(store.get("pack-1").await.unwrap())).await.unwrap();
        let e = r.get_range_revision("pack-1", "r1", 0..6).await.unwrap_err();
        assert!(e.to_string().contains("cannot be read"), "{e}");
    }

    #[test]
    fn many_objects_never_share_a_salt() {
        let mut seen = std::collections::HashSet::new();
        let k = Arc::new(VolumeKey::generate());
        let dir = tempfile::tempdir().unwrap();
        let r =
            EncryptedRemote { inner: Arc::new(DirRemote::new(dir.path())), key: k, salts: Mutex::new(HashMap::new()) };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for i in 0..2000 {
            let body = r.seal_stream("pack-x", PutBody::from_bytes(vec![0u8; 10]));
            let b = rt.block_on(collect_body(&body)).unwrap();
            assert_eq!(b.len() as u64, r.key.sealed_len(10));
            assert!(seen.insert(b[4..36].to_vec()), "salt repeated at object {i}");
        }
    }
}
