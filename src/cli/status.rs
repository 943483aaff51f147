//! Daemon status: what a serving daemon reports about itself (tiers, hit
//! rates, write-back, remote latency, boot profile, errors, and any section
//! another part registers), answered live over the control socket
//! (`control.rs`) and also written to `<cache dir>/status.json` every second
//! (temp file + rename, so readers never see half a file) so the last state
//! of a stopped daemon stays readable; `render` shows it to people.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};

use crate::cli::size::human;
use crate::remote::RemoteMetrics;
use crate::tier::stats::TierStats;
use crate::tier::tiered::TieredStore;

/// Where the daemon is in its life (systemd STATUS= lines say the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Opening = 0,
    Serving = 1,
    Stopping = 2,
    FinalSync = 3,
    Stopped = 4,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Opening => "opening",
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
            Phase::FinalSync => "final-sync",
            Phase::Stopped => "stopped",
        }
    }
}

/// The daemon's [`Phase`], shared.
#[derive(Clone, Debug, Default)]
pub struct PhaseHandle(Arc<AtomicU8>);

impl PhaseHandle {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Release);
    }

    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Opening,
            1 => Phase::Serving,
            2 => Phase::Stopping,
            3 => Phase::FinalSync,
            _ => Phase::Stopped,
        }
    }
}

/// A named section of the status, computed at each request (e.g. `lease`).
pub type Section = Box<dyn Fn() -> Value + Send + Sync>;

/// Everything the daemon reports; shared by the control socket, the
/// status file and the metrics endpoint.
pub struct DaemonStatus {
    pub store: Arc<TieredStore>,
    pub metrics: Arc<RemoteMetrics>,
    pub url: String,
    pub control_socket: Option<PathBuf>,
    /// Where `--metrics` serves, once bound (the port the kernel chose for port 0).
    pub metrics_url: std::sync::OnceLock<String>,
    phase: PhaseHandle,
    sections: Vec<(String, Section)>,
}

impl DaemonStatus {
    pub fn new(store: Arc<TieredStore>, metrics: Arc<RemoteMetrics>, url: String) -> Self {
        Self {
            store,
            metrics,
            url,
            control_socket: None,
            metrics_url: std::sync::OnceLock::new(),
            phase: PhaseHandle::default(),
            sections: Vec::new(),
        }
    }

    /// Adds a section, reported under `name` (after the built-in ones).
    pub fn add_section(&mut self, name: &str, f: Section) {
        self.sections.push((name.to_string(), f));
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.set(p);
    }

    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// A handle that sets the phase without keeping the store alive (the
    /// store must drop when serving ends: it saves the boot profile then).
    pub fn phase_handle(&self) -> PhaseHandle {
        self.phase.clone()
    }

    /// The status as JSON (the control socket's and status.json's format).
    pub fn to_json(&self) -> Value {
        let running = self.phase() != Phase::Stopped;
        let mut v = to_json(&self.store.stats(), std::process::id(), running);
        let m = self.metrics.snapshot();
        let l = self.metrics.latency();
        v["url"] = json!(self.url);
        v["state"] = json!(self.phase().name());
        v["control_socket"] = json!(self.control_socket.as_ref().map(|p| p.display().to_string()));
        v["metrics_url"] = json!(self.metrics_url.get());
        v["remote"]["requests"] = json!({
            "gets": m.gets, "puts": m.puts, "heads": m.heads, "lists": m.lists, "deletes": m.deletes,
            "errors": m.errors, "in_flight": m.in_flight, "bytes_read": m.bytes_read, "bytes_written": m.bytes_written,
        });
        v["remote"]["latency_ms"] = json!({
            "count": l.count, "p50": l.p50_ms, "p90": l.p90_ms, "p99": l.p99_ms, "max": l.max_ms,
        });
        for (name, f) in &self.sections {
            v[name.as_str()] = f();
        }
        v
    }
}

/// Periodically writes a store's statistics to a file.
pub struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusWriter {
    /// Writes `path` every `every`, and hands each snapshot to `tick`
    /// (systemd STATUS= lines).
    pub fn start(
        status: Arc<DaemonStatus>,
        path: PathBuf,
        every: Duration,
        tick: impl Fn(&Value) + Send + 'static,
    ) -> anyhow::Result<Self> {
        // The first snapshot before returning: a client that finds the
        // vhost socket up also finds the file (and the control socket).
        write_atomic(&path, &status.to_json()).with_context(|| format!("cannot write {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("driveblk-status".into()).spawn(move || loop {
            let running = !s.load(Ordering::Acquire);
            if !running {
                status.set_phase(Phase::Stopped);
            }
            let v = status.to_json();
            if let Err(e) = write_atomic(&path, &v) {
                tracing::debug!("cannot write {}: {e}", path.display());
            }
            if running {
                tick(&v);
            }
            if !running {
                return;
            }
            // Sleep in small steps so shutdown does not wait a whole period.
            let mut slept = Duration::ZERO;
            while slept < every && !s.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(50));
                slept += Duration::from_millis(50);
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Writes a last snapshot marked not running, and stops.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_atomic(path: &Path, v: &Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    crate::remote::private::write(&tmp, &serde_json::to_vec_pretty(v).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

/// The status file's contents.
pub fn to_json(s: &TierStats, pid: u32, running: bool) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Drive merges ranged reads asked at once: reads asked vs requests sent.
    let drive = crate::remote::gdrive::read_merge_totals();
    let pacer = crate::remote::gdrive::pacer_totals();
    json!({
        "pid": pid,
        "running": running,
        "updated_unix": now,
        "volume_id": s.volume_id,
        "generation": s.generation,
        "offline": s.offline,
        "image_len": s.image_len,
        "chunk_size": s.chunk_size,
        "chunks": { "total": s.chunks_total, "cached": s.chunks_cached, "dirty": s.chunks_dirty,
                    "pinned": s.chunks_pinned, "zero": s.chunks_zero },
        "ram": { "bytes": s.ram_bytes, "cap": s.ram_cap, "hits": s.ram_hits, "promotions": s.ram_promotions },
        "ssd": { "bytes": s.ssd_bytes, "cap": s.ssd_cap, "free_bytes": s.ssd_free, "min_free": s.ssd_min_free, "hits": s.ssd_hits,
                 "evictions": s.ssd_evictions },
        "zero_hits": s.zero_hits,
        "remote": { "misses": s.misses, "guest_wait_ms": s.guest_wait_ms, "fetches": s.remote_fetches, "bytes": s.remote_bytes,
                    "errors": s.fetch_errors, "readahead_chunks": s.readahead_chunks,
                    "guest_timeouts": s.remote_timeouts,
                    "bytes_by_source": { "miss": s.bytes_miss, "profile": s.bytes_profile,
                        "readahead": s.bytes_readahead, "hydrate": s.bytes_hydrate, "stream": s.bytes_stream,
                        "index": s.bytes_index },
                    "speculative_budget": s.speculative_budget,
                    "part_fetches": s.part_fetches },
        "hot_set": { "chunks": s.hot_chunks, "local": s.hot_local, "pinned": s.pinned_chunks,
                     "pinned_local": s.pinned_local, "pinning": s.pinning, "offline_ready": s.offline_ready },
        "hydrate": { "running": s.hydrating, "total": s.hydrate_total, "done": s.hydrate_done, "complete": s.hydrated },
        "chunks_partial": s.chunks_partial,
        "hit_rate": hit_rates(s),
        "sync": s.sync.as_ref().map(|y| json!({
            "dirty_bytes": s.dirty_bytes,
            "uploading": y.uploading, "uploading_chunks": y.uploading_chunks, "uploading_done": y.uploading_done,
            "generations_committed": y.generations_committed, "bytes_uploaded": y.bytes_uploaded,
            "since_commit_secs": y.since_commit_secs, "last_rate_bps": y.last_rate_bps,
            "last_error": y.last_error, "paused": y.paused, "conflict": y.conflict,
            "frozen_bytes": y.frozen_bytes,
        })),
        "drive_reads": { "asked": drive.0, "requests": drive.1, "merged": drive.2 },
        "drive_pacer": pacer.map(|p| json!({ "rate": p.rate, "refusals": p.refusals })),
        "boot_profile": {
            "recording": s.profile_recording, "recorded_bytes": s.profile_recorded_bytes, "saved": s.profile_saved,
            "segments": s.profile_segments, "segments_done": s.profile_segments_done,
            "bytes": s.profile_bytes, "waits": s.profile_waits, "ahead": s.profile_ahead,
        },
    })
}

/// One line for `systemctl status`: state, generation, what is pending.
pub fn summary(v: &Value) -> String {
    let u = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let mut s = format!("{}; generation {}", v["state"].as_str().unwrap_or("serving"), u("/generation"));
    if v.pointer("/sync").is_some_and(|y| !y.is_null()) {
        s += &format!("; {} not uploaded", human(u("/sync/dirty_bytes")));
        if v.pointer("/sync/uploading").and_then(Value::as_bool) == Some(true) {
            s += " (uploading)";
        }
        if let Some(c) = v.pointer("/sync/conflict").and_then(Value::as_str) {
            s += &format!("; CONFLICT: {c}");
        } else if v.pointer("/lease/lost").is_some_and(Value::is_string) {
            s += "; LEASE LOST to another host (its guest's writes here fork)";
        } else if let Some(e) = v.pointer("/sync/last_error").and_then(Value::as_str) {
            s += &format!("; sync error: {e}");
        }
    }
    if v.pointer("/hydrate/running").and_then(Value::as_bool) == Some(true) {
        s += &format!("; hydrating {}/{}", u("/hydrate/done"), u("/hydrate/total"));
    }
    if v.pointer("/offline").and_then(Value::as_bool) == Some(true) {
        s += "; OFFLINE (remote unreachable at start)";
    }
    s
}

/// Shares of chunk-parts read served by RAM, SSD, known zeroes, and the
/// remote (a miss), in percent.
fn hit_rates(s: &TierStats) -> Value {
    let total = s.ram_hits + s.ssd_hits + s.zero_hits + s.misses;
    let pct = |n: u64| if total == 0 { 0.0 } else { (n as f64 * 1000.0 / total as f64).round() / 10.0 };
    json!({ "ram": pct(s.ram_hits), "ssd": pct(s.ssd_hits), "zero": pct(s.zero_hits), "remote": pct(s.misses) })
}

/// Keys `render` shows itself; any other object-valued key is a section
/// another part added, shown generically.
const KNOWN_KEYS: &[&str] = &[
    "pid",
    "running",
    "updated_unix",
    "volume_id",
    "generation",
    "offline",
    "image_len",
    "chunk_size",
    "chunks",
    "ram",
    "ssd",
    "zero_hits",
    "remote",
    "hot_set",
    "hydrate",
    "chunks_partial",
    "hit_rate",
    "sync",
    "lease",
    "drive_reads",
    "drive_pacer",
    "boot_profile",
    "url",
    "state",
    "control_socket",
    "metrics_url",
];

/// Renders a status for people.
pub fn render(v: &Value) -> String {
    let u = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let b = |p: &str| v.pointer(p).and_then(Value::as_bool).unwrap_or(false);
    let pct = |a: u64, t: u64| if t == 0 { 0.0 } else { a as f64 * 100.0 / t as f64 };
    let age = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(u("/updated_unix"));
    let mut out = String::new();
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    let phase = v["state"].as_str().unwrap_or("serving");
    let state = if b("/running") {
        format!("{phase} (pid {}, updated {age} s ago)", u("/pid"))
    } else {
        "stopped (last state before it stopped)".into()
    };
    out += &format!(
        "volume      {}  generation {}{}\n",
        v["volume_id"].as_str().unwrap_or("?"),
        u("/generation"),
        if b("/offline") { "  (offline: remote unreachable at start)" } else { "" }
    );
    out += &format!("daemon      {state}\n");
    if let Some(m) = v["metrics_url"].as_str().filter(|_| b("/running")) {
        out += &format!("metrics     {m}\n");
    }
    out += &format!(
        "image       {} in {} chunks of {}\n",
        human(u("/image_len")),
        u("/chunks/total"),
        human(u("/chunk_size"))
    );
    out += &format!(
        "local       {} chunks cached ({:.1}%), {} partly, {} dirty (not uploaded), {} zero\n",
        u("/chunks/cached"),
        pct(u("/chunks/cached") + u("/chunks/zero"), u("/chunks/total")),
        u("/chunks_partial"),
        u("/chunks/dirty"),
        u("/chunks/zero")
    );
    out += &format!("RAM tier    {} of {}, {} hits\n", human(u("/ram/bytes")), human(u("/ram/cap")), u("/ram/hits"));
    let free = v.pointer("/ssd/free_bytes").and_then(Value::as_u64).map_or(String::new(), |f| {
        format!(
            ", {} free on its disk{} (clean data keeps {} free)",
            human(f),
            if f < u("/ssd/cap") { ", less than the cap" } else { "" },
            human(u("/ssd/min_free"))
        )
    });
    out += &format!(
        "SSD tier    {} of {}, {} hits, {} evictions{free}\n",
        human(u("/ssd/bytes")),
        human(u("/ssd/cap")),
        u("/ssd/hits"),
        u("/ssd/evictions")
    );
    out += &format!(
        "remote      {} misses (the guest waited {:.1} s), {} fetches, {} downloaded, {} errors, {} chunks read ahead\n",
        u("/remote/misses"),
        u("/remote/guest_wait_ms") as f64 / 1000.0,
        u("/remote/fetches"),
        human(u("/remote/bytes")),
        u("/remote/errors"),
        u("/remote/readahead_chunks")
    );
    if u("/remote/bytes") > 0 {
        let by: Vec<String> = ["miss", "profile", "readahead", "hydrate", "stream", "index"]
            .iter()
            .map(|k| (k, u(&format!("/remote/bytes_by_source/{k}"))))
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {}", human(n)))
            .collect();
        if !by.is_empty() {
            out += &format!(
                "downloaded  {}; speculative work may have {} in flight\n",
                by.join(", "),
                human(u("/remote/speculative_budget"))
            );
        }
    }
    out += &format!(
        "hit rate    RAM {:.1}%, SSD {:.1}%, zero {:.1}%, remote {:.1}%\n",
        f("/hit_rate/ram"),
        f("/hit_rate/ssd"),
        f("/hit_rate/zero"),
        f("/hit_rate/remote")
    );
    if u("/remote/latency_ms/count") > 0 {
        out += &format!(
            "latency     {} remote requests: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} failed attempts\n",
            u("/remote/latency_ms/count"),
            f("/remote/latency_ms/p50"),
            f("/remote/latency_ms/p90"),
            f("/remote/latency_ms/p99"),
            f("/remote/latency_ms/max"),
            u("/remote/requests/errors")
        );
    }
    if u("/drive_reads/asked") > 0 {
        out += &format!(
            "Drive reads {} ranged reads in {} requests ({} merged into shared requests)\n",
            u("/drive_reads/asked"),
            u("/drive_reads/requests"),
            u("/drive_reads/merged")
        );
    }
    if v.pointer("/drive_pacer/rate").is_some() {
        out += &format!(
            "Drive pacer {:.0} requests/s in force; {} rate-limit refusals\n",
            f("/drive_pacer/rate"),
            u("/drive_pacer/refusals")
        );
    }
    let (done, total) = (u("/hydrate/done"), u("/hydrate/total"));
    let hyd = if b("/hydrate/complete") {
        "complete: no read goes to the remote".to_string()
    } else if b("/hydrate/running") {
        format!("running, {done}/{total} chunks ({:.1}%)", pct(done, total))
    } else {
        "off".to_string()
    };
    out += &format!("hydration   {hyd}\n");
    let (hot, hot_local) = (u("/hot_set/chunks"), u("/hot_set/local"));
    let pinned = if u("/hot_set/pinned") > 0 {
        format!(", {}/{} pinned chunks local", u("/hot_set/pinned_local"), u("/hot_set/pinned"))
    } else {
        String::new()
    };
    out += &format!(
        "offline     {}{pinned}\n",
        match v.pointer("/hot_set/offline_ready").and_then(Value::as_bool) {
            Some(true) => "ready: the guest's hot set is all local".to_string(),
            Some(false) =>
                format!("not ready: {hot_local} of {hot} hot-set chunks local (`driveblk hydrate --pin profile`)"),
            None => "unknown: no boot profile or pins yet".to_string(),
        }
    );
    if u("/remote/guest_timeouts") > 0 {
        out += &format!(
            "GUEST I/O   {} requests failed: the remote did not answer within --remote-wait\n",
            u("/remote/guest_timeouts")
        );
    }
    if let Some(y) = v.get("sync").filter(|y| !y.is_null()) {
        let yu = |k: &str| y.get(k).and_then(Value::as_u64).unwrap_or(0);
        let mut line = format!(
            "{} not uploaded{}, {} generations committed ({} uploaded)",
            human(yu("dirty_bytes")),
            if y.get("uploading").and_then(Value::as_bool).unwrap_or(false) {
                format!(
                    ", uploading {} chunks ({} up, {} copied aside for it)",
                    yu("uploading_chunks"),
                    yu("uploading_done"),
                    human(yu("frozen_bytes"))
                )
            } else {
                String::new()
            },
            yu("generations_committed"),
            human(yu("bytes_uploaded"))
        );
        if let Some(s) = y.get("since_commit_secs").and_then(Value::as_u64) {
            line += &format!(", last commit {s} s ago");
            if yu("last_rate_bps") > 0 {
                line += &format!(" at {}/s", human(yu("last_rate_bps")));
            }
        }
        out += &format!("write-back  {line}\n");
        if let Some(lost) = v.pointer("/lease/lost").and_then(Value::as_str) {
            out += &format!("lease       LOST: {lost}\n");
        } else if let Some(l) = v.get("lease").filter(|l| !l.is_null()) {
            let state = if l.get("released").and_then(Value::as_bool).unwrap_or(false) { "released" } else { "held" };
            out += &format!(
                "lease       {state} by this host since generation {}\n",
                l.get("taken_at").and_then(Value::as_u64).unwrap_or(0)
            );
        }
        if let Some(c) = y.get("conflict").and_then(Value::as_str) {
            out += &format!("CONFLICT    {c}\n");
        } else if let Some(e) = y.get("last_error").and_then(Value::as_str) {
            let what = if y.get("paused").and_then(Value::as_bool).unwrap_or(false) { "PAUSED" } else { "retrying" };
            out += &format!("sync error  {what}: {e}\n");
        }
    }
    let (sd, st) = (u("/boot_profile/segments_done"), u("/boot_profile/segments"));
    let mut prof = Vec::new();
    if st > 0 {
        prof.push(format!(
            "replayed {sd}/{st} segments ({} of pages, {} guest misses served by it, {} of them ahead of the stream)",
            human(u("/boot_profile/bytes")),
            u("/boot_profile/waits"),
            u("/boot_profile/ahead")
        ));
    }
    if b("/boot_profile/recording") {
        prof.push(format!("recording this boot ({} so far)", human(u("/boot_profile/recorded_bytes"))));
    }
    if u("/boot_profile/saved") > 0 {
        prof.push("saved this boot's profile to the remote".into());
    }
    if prof.is_empty() {
        prof.push("none".into());
    }
    out += &format!("boot prof.  {}\n", prof.join("; "));
    if let Some(obj) = v.as_object() {
        for (k, sec) in obj.iter().filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str())) {
            out += &format!("{k:<11} {}\n", render_section(sec));
        }
    }
    out
}

/// A section shown as `key value, key value` (nested objects flattened).
fn render_section(v: &Value) -> String {
    match v {
        Value::Object(m) => m
            .iter()
            .filter(|(_, x)| !x.is_null())
            .map(|(k, x)| format!("{k} {}", render_section(x)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::String(s) => s.clone(),
        Value::Null => "none".into(),
        other => other.to_string(),
    }
}

/// Reads `<dir>/status.json`.
pub fn read(dir: &Path) -> anyhow::Result<Value> {
    let p = dir.join("status.json");
    let bytes = std::fs::read(&p).with_context(|| {
        format!("no status at {}: is a daemon serving a volume with this --cache-dir?", p.display())
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a driveblk status file", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_added_by_other_parts_are_rendered() {
        let v = json!({
            "running": true, "state": "serving", "generation": 7, "volume_id": "abc",
            "sync": {"dirty_bytes": 2097152, "uploading": true},
            "peers": {"holder": "host-a", "expires_in_secs": 30, "stolen": null},
        });
        let out = render(&v);
        let line = out.lines().find(|l| l.starts_with("peers")).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(line, "peers       expires_in_secs 30, holder host-a");
        assert!(!out.lines().any(|l| l.starts_with("state") || l.starts_with("url")), "built-in keys once: {out}");
        assert_eq!(summary(&v), "serving; generation 7; 2.0 MiB not uploaded (uploading)");
    }

    /// Every key of a daemon's own status is shown in its own words, once:
    /// none comes back as a raw `key value, ...` section.
    #[test]
    fn a_daemons_own_keys_are_not_shown_again_raw() {
        let mut v = to_json(&TierStats { sync: Some(Default::default()), ..Default::default() }, 42, true);
        v["state"] = json!("serving");
        v["lease"] = json!({"cache_id": "c1", "taken_at": 3, "released": false});
        let out = render(&v);
        for k in ["hot_set", "drive_reads", "drive_pacer"] {
            assert!(!out.lines().any(|l| l.starts_with(k)), "{k} shown raw: {out}");
        }
        assert_eq!(out.lines().filter(|l| l.starts_with("lease")).count(), 1, "{out}");
    }
}
