//! Holds on generations: objects in a volume's folder that keep one
//! generation, and everything it references, from garbage collection while
//! something that will reference it is being made — a rollback
//! (`hold-*.json`, removed once it committed) or a fork (its
//! `fork-*.json` registration, for as long as the fork exists) — and the
//! handshake that makes a new hold one a concurrent gc cannot miss.
//!
//! A hold names the objects the generation references, so it keeps them
//! by name however long it lives, even once gc retired the manifest. gc
//! deletes the manifests it retires first, then lists the holds again,
//! then deletes packs minus what any hold names. The maker
//! of a hold puts it, waits until the remote's listing shows it to everyone
//! (Drive's listings lag behind creates), and only then checks that the
//! generation's manifest is still stored. If it is, gc deletes it (if at
//! all) after that, so gc's second listing comes later still and shows the
//! hold. If it is not, gc got there first: the maker stops, having
//! referenced nothing.
//!
//! A hold *for a cache* (`for_cache`) is placed by a host that takes the
//! writer lease over from another (forced, or expired while it slept): it
//! keeps the generation the old holder's changes are based on, so its
//! `fork` still works however long it takes to come back. It never expires;
//! that cache's `fork` or `discard-local` removes it, and so does its next
//! take of the lease (it came back with nothing to fork).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::format::{gen_key, split_pack_key, Manifest};
use super::history::frames;
use super::{VolumeError, VolumeReader, VolumeResult};
use crate::remote::{DynRemote, PutBody};

/// Key prefix of holds (`hold-<16 hex>.json`).
pub const HOLD_PREFIX: &str = "hold-";

/// A hold older than this (remote clock) is a leftover of a maker that
/// stopped before removing it: gc no longer honours it, and deletes it.
pub const HOLD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long a maker waits for its hold to be listed before giving up.
pub const LISTED_WITHIN: Duration = Duration::from_secs(120);

/// `hold-<16 hex>.json`: keeps `generation` while something is made from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub generation: u64,
    /// What placed it ("rollback to 4"), for people reading the folder.
    pub what: String,
    pub host: String,
    pub created_unix_ms: u64,
    /// The objects of the folder the generation references, kept by name
    /// (gc may have retired the generation's manifest meanwhile).
    pub packs: Vec<String>,
    /// The cache whose local changes are based on the generation (a
    /// holder taken over): the hold never expires, and goes when that
    /// cache forks, discards its changes or takes the lease again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_cache: Option<String>,
}

/// The objects of its own folder that resolved manifest `m` references:
/// its packs (not an origin's `<id>:<key>` ones) and an adopted base's copy.
pub fn own_objects(m: &Manifest) -> Vec<String> {
    let mut out: std::collections::BTreeSet<String> =
        frames(m).map(|(k, _, _)| k).filter(|k| split_pack_key(k).0.is_none()).map(str::to_string).collect();
    if let Some(c) = m.base_copy.as_ref().filter(|c| split_pack_key(&c.key).0.is_none()) {
        out.insert(c.key.clone());
    }
    out.into_iter().collect()
}

/// A fresh hold key.
pub fn new_hold_key() -> String {
    format!("{HOLD_PREFIX}{}.json", hex::encode(rand::random::<[u8; 8]>()))
}

/// Writes `body` at `key` in `r`'s folder, waits (at most `within`) until
/// the listing shows it, then checks generation `generation` is still
/// stored. `Ok(true)`: from now on gc keeps the generation while the
/// object exists. `Ok(false)`: gc removed the generation first; the
/// object was removed again. On an error it is removed too (best effort).
pub(crate) async fn place(
    r: &VolumeReader,
    key: &str,
    body: Vec<u8>,
    generation: u64,
    within: Duration,
) -> VolumeResult<bool> {
    let res = match r.remote.put(key, PutBody::from_bytes(body)).await {
        // Its reply may be what was lost: removed below all the same.
        Err(e) => Err(VolumeError::remote(format!("writing {}/{key}", r.url), e)),
        Ok(_) => confirm(r, key, generation, within).await,
    };
    if !matches!(res, Ok(true)) {
        release(r, key).await;
    }
    res
}

async fn confirm(r: &VolumeReader, key: &str, generation: u64, within: Duration) -> VolumeResult<bool> {
    let t0 = Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        if r.remote.listed(key).await.map_err(|e| VolumeError::remote(format!("listing {}/{key}", r.url), e))? {
            break;
        }
        if t0.elapsed() >= within {
            return Err(VolumeError::Unusable(format!(
                "{}/{key} was written but the remote's listing still does not show it after {} s \
                 (Drive's listings lag behind creates), so a gc elsewhere could miss it; nothing was \
                 changed — try again",
                r.url,
                within.as_secs()
            )));
        }
        tracing::debug!(url = %r.url, key, "not listed yet; looking again");
        tokio::time::sleep(wait.min(within.saturating_sub(t0.elapsed()))).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
    // Read, not just looked up: a lookup by name may still show a manifest
    // deleted a moment ago; its content is fetched by id.
    match r.remote.get(&gen_key(generation)).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(VolumeError::remote(format!("reading {}/{}", r.url, gen_key(generation)), e)),
    }
}

/// Removes a hold (best effort: one left behind expires after
/// [`HOLD_LIFETIME`]).
pub(crate) async fn release(r: &VolumeReader, key: &str) {
    if let Err(e) = r.remote.delete(key).await {
        tracing::warn!(url = %r.url, key, error = %e, "could not remove a hold; gc removes it once it expires");
    }
}

/// Keeps generation `m` (resolved) for the changes of the cache `cache_id`
/// on host `host`, which lost the writer lease (`what` says how). Best
/// effort: a failure is logged (the old holder's fork then depends on
/// retention, as before).
pub(crate) async fn keep_for_cache(r: &VolumeReader, m: &Manifest, cache_id: &str, host: &str, what: &str) {
    let hold = Hold {
        generation: m.generation,
        what: format!("the changes of {host} (cache {cache_id}), {what}"),
        host: super::commit::host_name(),
        created_unix_ms: super::lease::local_now_ms(),
        packs: own_objects(m),
        for_cache: Some(cache_id.to_string()),
    };
    let key = new_hold_key();
    let body = serde_json::to_vec_pretty(&hold).expect("hold serialises");
    match place(r, &key, body, m.generation, LISTED_WITHIN).await {
        Ok(true) => tracing::info!(
            url = %r.url,
            generation = m.generation,
            "gc keeps generation {} for {host}'s changes ({key}) until that host forks or discards them",
            m.generation
        ),
        Ok(false) => {
            tracing::warn!(url = %r.url, generation = m.generation, "generation {} is gone already: {host}'s changes on it can no longer be forked", m.generation)
        }
        Err(e) => {
            tracing::warn!(url = %r.url, error = %e, "could not keep generation {} for {host}'s changes", m.generation)
        }
    }
}

/// Removes the holds kept for the cache `cache_id` (it forked, discarded
/// its changes, or took the lease again with none) from the volume at
/// `url`. Best effort: one left is listed by gc.
pub(crate) async fn release_for_cache(remote: DynRemote, url: String, cache_id: String) {
    let listing = match remote.list(HOLD_PREFIX).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(url = %url, error = %e, "could not list holds to remove this cache's");
            return;
        }
    };
    for m in listing {
        let Ok(b) = remote.get(&m.key).await else { continue };
        let Ok(h) = serde_json::from_slice::<Hold>(&b) else { continue };
        if h.for_cache.as_deref() != Some(cache_id.as_str()) {
            continue;
        }
        match remote.delete(&m.key).await {
            Ok(()) => {
                tracing::info!(url = %url, key = %m.key, generation = h.generation, "removed the hold on generation {} kept for this cache's changes", h.generation)
            }
            Err(e) => {
                tracing::warn!(url = %url, key = %m.key, error = %e, "could not remove the hold kept for this cache's changes; gc lists it")
            }
        }
    }
}
