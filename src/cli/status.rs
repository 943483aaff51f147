//! `driveblk status`: a serving daemon writes its tier counters to
//! `<cache dir>/status.json` every second (temp file + rename, so readers
//! never see half a file); the `status` command reads and shows them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{json, Value};

use crate::cli::size::human;
use crate::tier::stats::TierStats;
use crate::tier::tiered::TieredStore;

/// Periodically writes a store's statistics to a file.
pub struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatusWriter {
    pub fn start(store: Arc<TieredStore>, path: PathBuf, every: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pid = std::process::id();
        let thread = std::thread::Builder::new().name("driveblk-status".into()).spawn(move || loop {
            let running = !s.load(Ordering::Acquire);
            if let Err(e) = write_atomic(&path, &to_json(&store.stats(), pid, running)) {
                tracing::debug!("cannot write {}: {e}", path.display());
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
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

/// The status file's contents.
pub fn to_json(s: &TierStats, pid: u32, running: bool) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Drive merges ranged reads asked at once: reads asked vs requests sent.
    let drive = crate::remote::gdrive::read_merge_totals();
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
        "ram": { "bytes": s.ram_bytes, "cap": s.ram_cap, "hits": s.ram_hits },
        "ssd": { "bytes": s.ssd_bytes, "cap": s.ssd_cap, "hits": s.ssd_hits, "evictions": s.ssd_evictions },
        "zero_hits": s.zero_hits,
        "remote": { "misses": s.misses, "fetches": s.remote_fetches, "bytes": s.remote_bytes,
                    "errors": s.fetch_errors, "readahead_chunks": s.readahead_chunks },
        "hydrate": { "running": s.hydrating, "total": s.hydrate_total, "done": s.hydrate_done, "complete": s.hydrated },
        "chunks_partial": s.chunks_partial,
        "sync": s.sync.as_ref().map(|y| json!({
            "dirty_bytes": s.dirty_bytes,
            "uploading": y.uploading, "uploading_chunks": y.uploading_chunks,
            "generations_committed": y.generations_committed, "bytes_uploaded": y.bytes_uploaded,
            "since_commit_secs": y.since_commit_secs, "last_rate_bps": y.last_rate_bps,
            "last_error": y.last_error, "paused": y.paused, "conflict": y.conflict,
        })),
        "drive_reads": { "asked": drive.0, "requests": drive.1, "merged": drive.2 },
        "boot_profile": {
            "recording": s.profile_recording, "recorded_bytes": s.profile_recorded_bytes, "saved": s.profile_saved,
            "segments": s.profile_segments, "segments_done": s.profile_segments_done,
            "bytes": s.profile_bytes, "waits": s.profile_waits,
        },
    })
}

/// Renders a status file for people.
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
    let state =
        if b("/running") { format!("serving (pid {}, updated {age} s ago)", u("/pid")) } else { "stopped".into() };
    out += &format!(
        "volume      {}  generation {}{}\n",
        v["volume_id"].as_str().unwrap_or("?"),
        u("/generation"),
        if b("/offline") { "  (offline: remote unreachable at start)" } else { "" }
    );
    out += &format!("daemon      {state}\n");
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
    out += &format!(
        "SSD tier    {} of {}, {} hits, {} evictions\n",
        human(u("/ssd/bytes")),
        human(u("/ssd/cap")),
        u("/ssd/hits"),
        u("/ssd/evictions")
    );
    out += &format!(
        "remote      {} misses, {} fetches, {} downloaded, {} errors, {} chunks read ahead\n",
        u("/remote/misses"),
        u("/remote/fetches"),
        human(u("/remote/bytes")),
        u("/remote/errors"),
        u("/remote/readahead_chunks")
    );
    if u("/drive_reads/asked") > 0 {
        out += &format!(
            "Drive reads {} ranged reads in {} requests ({} merged into shared requests)\n",
            u("/drive_reads/asked"),
            u("/drive_reads/requests"),
            u("/drive_reads/merged")
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
    if let Some(y) = v.get("sync").filter(|y| !y.is_null()) {
        let yu = |k: &str| y.get(k).and_then(Value::as_u64).unwrap_or(0);
        let mut line = format!(
            "{} not uploaded{}, {} generations committed ({} uploaded)",
            human(yu("dirty_bytes")),
            if y.get("uploading").and_then(Value::as_bool).unwrap_or(false) {
                format!(", uploading {} chunks", yu("uploading_chunks"))
            } else {
                String::new()
            },
            yu("generations_committed"),
            human(yu("bytes_uploaded"))
        );
        if let Some(s) = y.get("since_commit_secs").and_then(Value::as_u64) {
            line += &format!(", last commit {s} s ago at {}/s", human(yu("last_rate_bps")));
        }
        out += &format!("write-back  {line}\n");
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
            "replayed {sd}/{st} segments ({} of pages, {} guest misses served by it)",
            human(u("/boot_profile/bytes")),
            u("/boot_profile/waits")
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
    out
}

/// Reads `<dir>/status.json`.
pub fn read(dir: &Path) -> anyhow::Result<Value> {
    let p = dir.join("status.json");
    let bytes = std::fs::read(&p).with_context(|| {
        format!("no status at {}: is a daemon serving a volume with this --cache-dir?", p.display())
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a driveblk status file", p.display()))
}
