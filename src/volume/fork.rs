//! Forks: a new volume whose generation 1 is another volume's generation
//! G, sharing that volume's packs by reference (`<origin id>:<pack key>`
//! entries in its pack table, resolved through the header's `origin`), so
//! nothing already uploaded goes up again. The origin gets a registration
//! object (`fork-<fork id>.json`), a hold (`volume::hold`) that keeps
//! generation G and what it references from garbage collection while the
//! fork exists.

use serde::{Deserialize, Serialize};

use super::commit::writer_record;
use super::format::{split_pack_key, Manifest, OriginRef, VolumeHeader, FORMAT_VERSION, ORIGIN_PACK_SEP};
use super::import::{commit_new, prepare_new};
use super::reader::connect;
use super::{RemoteOptions, VolumeError, VolumeReader, VolumeResult};
use crate::remote::RemoteUrl;

/// Key prefix of fork registrations in an origin volume.
pub const FORK_PREFIX: &str = "fork-";

/// `fork-<fork volume id>.json` in the origin volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkRegistration {
    pub volume_id: String,
    pub url: String,
    /// The origin's generation the fork holds (kept while this exists).
    pub from_generation: u64,
    pub created_unix_ms: u64,
    /// The objects of the origin's folder the fork references (packs, an
    /// adopted base's copy): kept by name, so they stay even once gc
    /// retired the generation's manifest. Absent in registrations made
    /// before 2026-12.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<String>,
}

/// The registration key of fork `volume_id`.
pub fn registration_key(volume_id: &str) -> String {
    format!("{FORK_PREFIX}{volume_id}.json")
}

/// Creates at `new_url` a fork of `origin` whose generation 1 holds the
/// bytes of `from` (a resolved manifest of `origin`). `cache_id` is named
/// as generation 1's writer. Returns the fork's header and generation 1.
pub async fn create_fork(
    origin: &VolumeReader,
    from: &Manifest,
    new_url: &RemoteUrl,
    opts: &RemoteOptions,
    cache_id: &str,
) -> VolumeResult<(VolumeHeader, Manifest)> {
    let url = new_url.to_string();
    let remote = connect(new_url.folder_with(&opts.config), opts);
    prepare_new(&remote, &url).await?;
    let mut header = VolumeHeader::new(from.image_len, origin.header.chunk_size, origin.header.base.clone());
    // A fork reads the origin's packs, so it shares the origin's data key
    // (wrapped afresh by the caller's key).
    if let Some(k) = &origin.key {
        let user = opts
            .key
            .as_deref()
            .ok_or_else(|| VolumeError::Key { url: url.clone(), source: super::crypto::KeyError::Needed })?;
        super::import::set_crypto(&mut header, k, user, &url)?;
    }
    let remote = super::crypto::wrap(remote, origin.key.as_ref());
    header.origin = Some(OriginRef {
        url: origin.url.clone(),
        volume_id: origin.header.volume_id.clone(),
        generation: from.generation,
        origin: origin.header.origin.clone().map(Box::new),
    });
    let mut m = from.clone();
    m.format = super::format::MANIFEST_MAGIC.into();
    m.version = FORMAT_VERSION;
    m.volume_id = header.volume_id.clone();
    m.generation = 1;
    m.parent = None;
    m.next_slot = None;
    m.lease = None;
    m.writer = Some(writer_record(cache_id));
    // The origin's own packs are named through its id; packs it already
    // named through one of its origins stay as they are.
    for key in &mut m.packs {
        if let (None, k) = split_pack_key(key) {
            *key = format!("{}{ORIGIN_PACK_SEP}{k}", origin.header.volume_id);
        }
    }
    let through_origin = |key: String| match split_pack_key(&key) {
        (None, k) => format!("{}{ORIGIN_PACK_SEP}{k}", origin.header.volume_id),
        _ => key,
    };
    m.indexes = std::mem::take(&mut m.indexes).into_iter().map(|(k, ix)| (through_origin(k), ix)).collect();
    m.ids = std::mem::take(&mut m.ids).into_iter().map(|(k, id)| (through_origin(k), id)).collect();
    // An adopted base's copy is the origin's object too.
    if let Some(c) = &mut m.base_copy {
        c.key = through_origin(std::mem::take(&mut c.key));
    }
    // The registration first: from now on GC of the origin keeps `from`.
    let reg = ForkRegistration {
        volume_id: header.volume_id.clone(),
        url: url.clone(),
        from_generation: from.generation,
        created_unix_ms: super::lease::local_now_ms(),
        packs: super::hold::own_objects(from),
    };
    let key = registration_key(&header.volume_id);
    let body = serde_json::to_vec_pretty(&reg).expect("registration serialises");
    if !super::hold::place(origin, &key, body, from.generation, super::hold::LISTED_WITHIN).await? {
        return Err(VolumeError::Unusable(format!(
            "generation {} of {} was removed by gc while the fork was being made, so what it \
             references may be gone; no volume was created at {url}",
            from.generation, origin.url
        )));
    }
    if let Err(e) = commit_new(&remote, &url, &header, &m).await {
        super::hold::release(origin, &key).await;
        return Err(e);
    }
    Ok((header, m))
}
