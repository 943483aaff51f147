//! The writer lease: which host may write a volume, decided on the remote
//! alone. Taking it is a commit through the fence (a generation whose
//! manifest carries a `lease` record), so the chain of generations orders
//! holders and two hosts can never both take it. The holder keeps a small
//! heartbeat object (`lease-<cache id>.json`, overwritten) saying how many
//! bytes it still has to upload, and "released" after a clean stop with
//! everything synced. A holder with bytes pending keeps the lease for as
//! long as it takes; one with nothing pending that went silent longer than
//! its ttl — measured by the remote's clock on both ends, never by
//! comparing two hosts' clocks — may be taken over.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::commit::{host_name, writer_record, CommitOptions, GenerationBuilder};
use super::format::{gen_key, LeaseRecord, Manifest, VolumeHeader};
use super::{VolumeError, VolumeReader, VolumeResult};
use crate::remote::{DynRemote, PutBody, RemoteResult};

/// Key prefix of heartbeat objects.
pub const HEARTBEAT_PREFIX: &str = "lease-";
/// `format` of a heartbeat object.
pub const HEARTBEAT_MAGIC: &str = "driveblk-lease";
/// Key prefix of the scratch objects that read the remote's clock.
pub const PROBE_PREFIX: &str = "clock-probe-";
/// How long a holder with nothing pending may stay silent.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90);

/// The heartbeat key of the cache `cache_id`.
pub fn heartbeat_key(cache_id: &str) -> String {
    format!("{HEARTBEAT_PREFIX}{cache_id}.json")
}

/// This host's clock, ms since the epoch. Only ever recorded for people to
/// read, never compared with another host's. `DRIVEBLK_TEST_CLOCK_OFFSET_S`
/// skews it (tests: two hosts whose clocks disagree).
pub fn local_now_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let skew = std::env::var("DRIVEBLK_TEST_CLOCK_OFFSET_S").ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    (now + skew * 1000).max(0) as u64
}

/// The ttl this host declares in its lease (`DRIVEBLK_LEASE_TTL_MS`
/// overrides the default, for tests).
pub fn ttl() -> Duration {
    std::env::var("DRIVEBLK_LEASE_TTL_MS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&ms| ms >= 200)
        .map_or(DEFAULT_TTL, Duration::from_millis)
}

/// A heartbeat object.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Heartbeat {
    format: String,
    volume_id: String,
    #[serde(flatten)]
    lease: LeaseRecord,
    /// The holder's clock at renewal (informative).
    renewed_unix_ms: u64,
}

/// Whether a lease may be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Nobody holds it.
    Free,
    /// Its holder stopped cleanly with everything uploaded.
    Released,
    /// Its holder had nothing pending and went silent past its ttl.
    Expired,
    /// This cache holds it (a restart re-takes it).
    Ours,
    /// Another host holds it.
    Held,
}

/// What the remote says about a volume's lease.
#[derive(Clone, Debug)]
pub struct LeaseView {
    pub standing: Standing,
    /// The holder as last heard of (heartbeat, else the newest manifest).
    pub holder: Option<LeaseRecord>,
    /// How long the holder has been silent, by the remote's clock.
    pub silent_ms: Option<u64>,
    /// The volume's newest generation.
    pub generation: u64,
}

impl LeaseView {
    /// True when this host may take the lease without forcing.
    pub fn may_take(&self) -> bool {
        self.standing != Standing::Held
    }

    /// One line for people: who holds it and what is pending.
    pub fn describe(&self) -> String {
        let Some(h) = &self.holder else { return "free (nobody holds the lease)".into() };
        let who = format!("{} (pid {})", h.host, h.pid);
        let since = h.since_ms.map(|ms| format!(" since {}", local_time(ms))).unwrap_or_default();
        let silent = self.silent_ms.map(|ms| format!(", last heard from {} s ago", ms / 1000)).unwrap_or_default();
        match self.standing {
            Standing::Free => "free".into(),
            Standing::Released => {
                format!("free: released by {who} after a clean stop at generation {}", h.generation)
            }
            Standing::Expired => format!(
                "free: {who} held it{since} with nothing pending and has been silent longer than {} s",
                h.ttl_ms / 1000
            ),
            Standing::Ours => {
                format!("held by this cache: {who}{since}, {} not yet uploaded", pending(h.pending_bytes))
            }
            Standing::Held if h.pending_bytes > 0 => {
                format!("held by {who}{since}, {} not yet uploaded{silent}", human(h.pending_bytes))
            }
            Standing::Held => format!("held by {who}{since}, nothing pending{silent}"),
        }
    }

    /// True when the holder wrote its heartbeat within its ttl: its daemon
    /// is most likely running there now.
    fn holder_alive(&self) -> bool {
        match (&self.holder, self.silent_ms) {
            (Some(h), Some(s)) => s <= h.ttl_ms,
            _ => false,
        }
    }

    /// The refusal a second writer of volume `url` gets: who holds it and
    /// what to do. `copy_of`: the cache this one is a copy of (a directory
    /// copied, restored or moved, `ssd/place.rs`): when that cache holds
    /// the lease, the refusal says so.
    pub fn refusal_to(&self, url: &str, copy_of: Option<&str>) -> String {
        let d = self.describe();
        match &self.holder {
            Some(h) if copy_of == Some(h.cache_id.as_str()) => format!(
                "{d} — this cache directory looks like a copy of cache {}, the holder's (copied, restored from a \
                 backup or a snapshot, or moved from another machine), so the lease is not its own: {}; if the \
                 original is gone for good, `--force-takeover` takes the lease",
                h.cache_id,
                if h.pending_bytes > 0 {
                    "start the original and let it sync"
                } else {
                    "stop the original (a clean stop releases the lease)"
                }
            ),
            // Served right here by another daemon (another --cache-dir): the
            // way is that daemon, not a takeover that forks what it writes.
            Some(h) if h.host == host_name() && self.holder_alive() && is_local_daemon(h.pid) => format!(
                "{d} — that is driveblk pid {} on this host: the volume is already served here. Use that daemon \
                 (`driveblk status {url}`, `driveblk sync {url}`, with its --cache-dir if it has one), or stop it (a \
                 clean stop releases the lease) and start this one; one volume is served writable by one daemon \
                 at a time (`--force-takeover` would fork what that one writes from then on)",
                h.pid
            ),
            // Still running there (the user forgot to stop it): starting it
            // again is not the way. `sync` waits as long as the uplink needs
            // (a stop gives up after --sync-timeout), then a clean stop
            // releases.
            Some(h) if h.pending_bytes > 0 && self.holder_alive() => format!(
                "{d} — it is running there: run `driveblk sync {url}` there (it waits until they are uploaded), \
                 then stop it there (a clean stop releases the lease) and start here; or `--force-takeover` to fork \
                 them"
            ),
            Some(h) if h.pending_bytes > 0 => format!(
                "{d} — start it there and let it sync (or run `driveblk sync {url}` there), or `--force-takeover` to \
                 fork them"
            ),
            Some(h) => format!(
                "{d} — stop it there (a clean stop releases the lease), wait until it has been silent for {} s, \
                 or use `--force-takeover`",
                h.ttl_ms / 1000
            ),
            None => d,
        }
    }
}

/// True when `pid` is another driveblk process running on this host.
pub fn is_local_daemon(pid: u32) -> bool {
    pid != std::process::id()
        && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "driveblk")
}

fn pending(b: u64) -> String {
    if b == 0 {
        "nothing".into()
    } else {
        human(b)
    }
}

/// Bytes for people (GiB with one decimal, and so on).
pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A remote timestamp as local wall-clock time ("18:02", or with the date
/// when it is not today).
pub fn local_time(ms: u64) -> String {
    let tm = |secs: i64| {
        let t = secs as libc::time_t;
        // SAFETY: localtime_r writes only into `out`.
        let mut out: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut out).is_null() };
        ok.then_some(out)
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    match (tm((ms / 1000) as i64), tm(now)) {
        (Some(t), Some(n)) if (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday) => {
            format!("{:02}:{:02}", t.tm_hour, t.tm_min)
        }
        (Some(t), _) => {
            format!("{}-{:02}-{:02} {:02}:{:02}", t.tm_year + 1900, t.tm_mon + 1, t.tm_mday, t.tm_hour, t.tm_min)
        }
        _ => format!("{} ms after the epoch", ms),
    }
}

/// The remote's clock now: the modification time of a scratch object
/// written for the purpose (then deleted). On `dir:` that is the folder's
/// file system's clock (an NFS server's, for a share); on Drive, Google's.
pub async fn remote_now_ms(remote: &DynRemote) -> RemoteResult<u64> {
    let key = format!("{PROBE_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
    let meta = remote.put(&key, PutBody::from_bytes(&b"clock probe\n"[..])).await?;
    let _ = remote.delete(&key).await;
    let meta = match meta.modified_ms {
        Some(_) => meta,
        None => remote.head(&key).await.unwrap_or(meta),
    };
    let ms = meta.modified_ms.ok_or_else(|| crate::remote::RemoteError::Fatal {
        remote: remote.describe(),
        op: "put",
        key,
        message: "the remote reports no modification time".into(),
    })?;
    Ok(end_of_second(ms))
}

/// A time read to the whole second (an S3 store's `Last-Modified` header)
/// taken at the end of its second: listings give milliseconds, and an
/// object made earlier in that second must not look made after "now"
/// (gc would keep it as young, whatever its grace).
fn end_of_second(ms: u64) -> u64 {
    if ms % 1000 == 0 {
        ms + 999
    } else {
        ms
    }
}

/// Reads the holder's heartbeat: its record and when it was written (by
/// the remote's clock). None when absent, or not a heartbeat of this
/// volume's lease. A heartbeat that cannot be read is an error, never
/// "absent": a holder alive behind a failed read would lose its lease.
/// One in the Drive trash (a click in the web UI) still says when its
/// holder last wrote it: `record` (the manifest's) stands in for its body.
async fn read_heartbeat(
    remote: &DynRemote,
    header: &VolumeHeader,
    record: &LeaseRecord,
) -> VolumeResult<Option<(LeaseRecord, u64)>> {
    let key = heartbeat_key(&record.cache_id);
    let failed = |e| VolumeError::remote(format!("reading the lease heartbeat {key}"), e);
    let meta = match remote.head(&key).await {
        Ok(m) => m,
        Err(e) if e.is_not_found() => {
            return match remote.find_trashed(&key).await.map_err(failed)? {
                Some(m) => {
                    tracing::warn!(key = %key, "the lease heartbeat is in the Drive trash; its holder restores it at its next write");
                    Ok(m.modified_ms.map(|ms| (record.clone(), ms)))
                }
                None => Ok(None),
            };
        }
        Err(e) => return Err(failed(e)),
    };
    let body = match remote.get(&key).await {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    let hb = match serde_json::from_slice::<Heartbeat>(&body) {
        Ok(hb) => hb,
        // A heartbeat by its name that this binary cannot parse is a newer
        // driveblk's: its holder may be alive, so it is not "absent".
        Err(e)
            if serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(HEARTBEAT_MAGIC)) =>
        {
            return Err(VolumeError::Newer {
                what: format!("the lease heartbeat {key}"),
                detail: format!("its fields do not parse here: {e}"),
            });
        }
        Err(_) => return Ok(None),
    };
    if hb.format != HEARTBEAT_MAGIC || hb.volume_id != header.volume_id || hb.lease.cache_id != record.cache_id {
        return Ok(None);
    }
    let Some(ms) = meta.modified_ms else { return Ok(None) };
    let mut rec = hb.lease;
    // The first heartbeat is what dates the lease.
    rec.since_ms = rec.since_ms.or(Some(ms));
    Ok(Some((rec, ms)))
}

/// The lease of the volume whose newest resolved manifest is `newest`, as
/// seen by the cache `mine` (None: a bystander, e.g. `status`).
pub async fn inspect(
    remote: &DynRemote,
    header: &VolumeHeader,
    newest: &Manifest,
    mine: Option<&str>,
) -> VolumeResult<LeaseView> {
    let generation = newest.generation;
    let Some(rec) = newest.lease.clone() else {
        return Ok(LeaseView { standing: Standing::Free, holder: None, silent_ms: None, generation });
    };
    let hb = if mine == Some(rec.cache_id.as_str()) {
        // Ours: what it says is only shown, never judged.
        read_heartbeat(remote, header, &rec).await.ok().flatten()
    } else {
        read_heartbeat(remote, header, &rec).await?
    };
    let hb = hb.filter(|(h, _)| h.taken_at == rec.taken_at);
    // Without a heartbeat of this lease (its holder stopped before the
    // first one), the manifest that took it stands in, dated by the remote.
    let (holder, heard_ms) = match hb {
        Some((h, ms)) => (h, Some(ms)),
        None => {
            let ms = remote.head(&gen_key(rec.taken_at)).await.ok().and_then(|m| m.modified_ms);
            (rec.clone(), ms)
        }
    };
    let view = |standing, silent_ms| LeaseView { standing, holder: Some(holder.clone()), silent_ms, generation };
    if mine == Some(rec.cache_id.as_str()) {
        return Ok(view(Standing::Ours, None));
    }
    if holder.released {
        return Ok(view(Standing::Released, None));
    }
    let silent = match heard_ms {
        Some(heard) => {
            let now = remote_now_ms(remote)
                .await
                .map_err(|e| VolumeError::remote(format!("reading the clock of {}", remote.describe()), e))?;
            Some(now.saturating_sub(heard))
        }
        None => None,
    };
    if holder.pending_bytes > 0 {
        // Changes wait on that host: no expiry, ever.
        return Ok(view(Standing::Held, silent));
    }
    match silent {
        Some(s) if s > holder.ttl_ms => Ok(view(Standing::Expired, silent)),
        _ => Ok(view(Standing::Held, silent)),
    }
}

/// What a host asks for when taking the lease.
#[derive(Clone, Debug)]
pub struct Claim {
    /// This host's cache directory id.
    pub cache_id: String,
    /// Bytes of local changes not yet uploaded.
    pub pending_bytes: u64,
    /// Take it even from a live holder (whose pending changes then fork).
    pub force: bool,
    /// The cache this one was found to be a copy of (for the refusal).
    pub copy_of: Option<String>,
    pub ttl: Duration,
    /// Taken to commit changes made on the generation served (a store
    /// opened offline, or one that uploads a stopped daemon's changes), not
    /// at a start: a volume that moved on past that generation is a
    /// conflict those changes fork from, not a start to try again.
    pub committing: bool,
}

/// A lease taken: the generation that took it, and the handle that keeps
/// it.
pub struct Taken {
    /// The resolved manifest of the generation that took the lease.
    pub manifest: Manifest,
    pub holder: LeaseHolder,
    /// The lease this forced takeover broke, if any.
    pub forked: Option<LeaseView>,
}

/// Takes the lease of the volume `vol` serves (its served generation must
/// be the newest; the take is a commit on top of it). Refuses with
/// [`VolumeError::LeaseHeld`] while another host holds it, unless
/// `claim.force`.
pub async fn acquire(vol: &VolumeReader, claim: &Claim, commit: CommitOptions) -> VolumeResult<Taken> {
    let parent = vol.manifest();
    let view = inspect(&vol.remote, &vol.header, &parent, Some(&claim.cache_id)).await?;
    let mut forked = None;
    if !view.may_take() {
        if !claim.force {
            return Err(VolumeError::LeaseHeld {
                url: vol.url.clone(),
                holder: view.refusal_to(&vol.url, claim.copy_of.as_deref()),
            });
        }
        let h = view.holder.clone().expect("a held lease has a holder");
        tracing::warn!(
            "--force-takeover: taking the lease of {} from {} (pid {}); {} — {}",
            vol.url,
            h.host,
            h.pid,
            if h.pending_bytes > 0 {
                format!(
                    "its {} not yet uploaded stay on {} and fork there: its next commit is refused, and \
                     `driveblk fork {} NEWURL` on that host saves them as a new volume",
                    human(h.pending_bytes),
                    h.host,
                    vol.url
                )
            } else {
                "it had nothing pending, so nothing forks unless it writes again".to_string()
            },
            view.describe()
        );
        forked = Some(view.clone());
    } else if view.standing == Standing::Expired {
        tracing::info!(url = %vol.url, "taking over an expired lease: {}", view.describe());
    }
    let g = parent.generation + 1;
    let record = LeaseRecord {
        host: host_name(),
        pid: std::process::id(),
        cache_id: claim.cache_id.clone(),
        taken_at: g,
        since_ms: None,
        ttl_ms: claim.ttl.as_millis() as u64,
        generation: g,
        pending_bytes: claim.pending_bytes,
        released: false,
    };
    let mut b =
        GenerationBuilder::new(vol.remote.clone(), &vol.url, &vol.header, parent.clone(), vol.base.is_some(), commit);
    b.set_lease(Some(record.clone()));
    // Known as the newest a moment ago (the usual take, at start): no
    // generation after it can be old enough for gc to have retired the
    // one this commit creates, so the check for that gap needs no listing
    // (unless the create comes much later: `commit::LISTING_FRESH`).
    if let Some(at) = vol.newest_known_at() {
        b.generations_listed(Ok(Vec::new()), at);
    }
    let manifest = match b.commit(writer_record(&claim.cache_id)).await {
        Ok((m, _)) => m,
        // The changes waiting here were made on `parent`, and the volume
        // moved on without them: whoever holds the lease now, they fork
        // (the caller adopts generations that turn out to be its own).
        Err(e @ VolumeError::Conflict { .. }) if claim.committing => return Err(e),
        Err(VolumeError::Conflict { .. }) => {
            // Someone committed first: most likely another host taking the
            // lease at the same moment.
            let newest = vol.newest_manifest().await?;
            let v = inspect(&vol.remote, &vol.header, &newest, Some(&claim.cache_id)).await?;
            let holder = if v.may_take() {
                format!("the volume moved on to generation {} while starting; start again", newest.generation)
            } else {
                v.refusal_to(&vol.url, claim.copy_of.as_deref())
            };
            return Err(VolumeError::LeaseHeld { url: vol.url.clone(), holder });
        }
        Err(e) => return Err(e),
    };
    // The holder taken over may hold changes (or make them when its laptop
    // wakes): its `fork` needs the generation they are based on, whatever
    // gc's retention says meanwhile. That is the newest (the holder's last
    // commit), or the one its heartbeat names if older (a heartbeat may lag
    // behind a commit, a commit behind its install after a crash).
    let taken_from = forked.as_ref().or((view.standing == Standing::Expired).then_some(&view));
    if let Some(h) = taken_from.and_then(|v| v.holder.as_ref()) {
        let how = if forked.is_some() { "taken over by force" } else { "expired" };
        let mut bases = vec![parent.generation];
        if h.generation < parent.generation {
            bases.push(h.generation);
        }
        for g in bases {
            let base = if g == parent.generation { Ok((*parent).clone()) } else { vol.load_generation(g).await };
            match base {
                Ok(m) => {
                    super::hold::keep_for_cache(vol, &m, &h.cache_id, &h.host, &format!("whose lease was {how}")).await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "generation {g}, which {}'s changes may be based on, cannot be read: a fork of them may not work", h.host)
                }
            }
        }
    }
    // Back with nothing to fork: holds kept for this cache's changes go
    // (in the background: a start waits for no extra request).
    tokio::spawn(super::hold::release_for_cache(vol.remote.clone(), vol.url.clone(), claim.cache_id.clone()));
    let holder = LeaseHolder::new(vol.remote.clone(), &vol.header.volume_id, record);
    if let Err(e) = holder.renew(g, claim.pending_bytes).await {
        // The lease is ours by the generation alone; the next renewal
        // writes the heartbeat.
        tracing::warn!(error = %e, "could not write the lease heartbeat yet");
    }
    Ok(Taken { manifest, holder, forked })
}

/// Keeps a lease: heartbeats, and release at a clean stop.
pub struct LeaseHolder {
    remote: DynRemote,
    volume_id: String,
    key: String,
    /// The record as last written; the async mutex orders heartbeats, so
    /// a renewal never lands after the release.
    state: tokio::sync::Mutex<LeaseRecord>,
    snapshot: parking_lot::Mutex<LeaseRecord>,
}

impl LeaseHolder {
    /// The handle of a lease recorded by an earlier process of the same
    /// cache (to release it after its changes were dropped).
    pub fn resume(remote: DynRemote, volume_id: &str, record: LeaseRecord) -> Self {
        Self::new(remote, volume_id, record)
    }

    fn new(remote: DynRemote, volume_id: &str, record: LeaseRecord) -> Self {
        Self {
            remote,
            volume_id: volume_id.to_string(),
            key: heartbeat_key(&record.cache_id),
            snapshot: parking_lot::Mutex::new(record.clone()),
            state: tokio::sync::Mutex::new(record),
        }
    }

    /// The record to carry in a commit at generation `generation` with
    /// `pending` bytes still local after it.
    pub fn record_for(&self, generation: u64, pending: u64) -> LeaseRecord {
        LeaseRecord { generation, pending_bytes: pending, ..self.snapshot.lock().clone() }
    }

    /// The record as last written.
    pub fn record(&self) -> LeaseRecord {
        self.snapshot.lock().clone()
    }

    /// Writes the heartbeat: the generation served and the bytes pending.
    /// Does nothing once released.
    pub async fn renew(&self, generation: u64, pending: u64) -> VolumeResult<()> {
        self.write(generation, pending, false).await
    }

    /// Releases the lease (a clean stop with nothing pending): the next
    /// host may take it at once.
    pub async fn release(&self, generation: u64) -> VolumeResult<()> {
        self.write(generation, 0, true).await
    }

    async fn write(&self, generation: u64, pending: u64, release: bool) -> VolumeResult<()> {
        let mut rec = self.state.lock().await;
        if rec.released {
            return Ok(());
        }
        let mut next = LeaseRecord { generation, pending_bytes: pending, released: release, ..rec.clone() };
        let hb = Heartbeat {
            format: HEARTBEAT_MAGIC.into(),
            volume_id: self.volume_id.clone(),
            lease: next.clone(),
            renewed_unix_ms: local_now_ms(),
        };
        let body = serde_json::to_vec(&hb).expect("heartbeat serialises");
        let meta = self
            .remote
            .put(&self.key, PutBody::from_bytes(body))
            .await
            .map_err(|e| VolumeError::remote(format!("writing the lease heartbeat {}", self.key), e))?;
        if next.since_ms.is_none() {
            // The first heartbeat dates the lease by the remote's clock.
            next.since_ms = meta.modified_ms;
        }
        *rec = next.clone();
        *self.snapshot.lock() = next;
        Ok(())
    }
}

/// The lease of the volume at `url`, as any host sees it (`status URL`).
pub async fn inspect_volume(vol: &VolumeReader) -> VolumeResult<LeaseView> {
    inspect(&vol.remote, &vol.header, &vol.manifest(), None).await
}

/// The writer lease of the volume at `url`, as any host sees it
/// (`driveblk status URL`).
pub fn lease_status(url: &str, opts: &super::RemoteOptions) -> VolumeResult<LeaseView> {
    let u = crate::remote::RemoteUrl::parse(url)?;
    let rt = super::runtime("driveblk-status")?;
    let vol = rt.block_on(VolumeReader::open(&u, opts))?;
    rt.block_on(inspect_volume(&vol))
}
