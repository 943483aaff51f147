//! `serve --metrics ADDR`: the daemon's status figures as Prometheus
//! metrics on `http://ADDR/metrics`, refreshed from the same status the
//! control socket answers at each scrape.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use serde_json::Value;

use crate::cli::status::DaemonStatus;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}

/// One sample: metric name, help, kind, an optional label, and where its
/// value is in the status JSON (booleans count as 0/1).
struct Spec {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    label: Option<(&'static str, &'static str)>,
    pointer: &'static str,
    /// Multiplier (milliseconds to seconds).
    scale: f64,
}

const fn c(name: &'static str, help: &'static str, pointer: &'static str) -> Spec {
    Spec { name, help, kind: Kind::Counter, label: None, pointer, scale: 1.0 }
}
const fn g(name: &'static str, help: &'static str, pointer: &'static str) -> Spec {
    Spec { name, help, kind: Kind::Gauge, label: None, pointer, scale: 1.0 }
}
const fn cl(name: &'static str, help: &'static str, l: (&'static str, &'static str), pointer: &'static str) -> Spec {
    Spec { name, help, kind: Kind::Counter, label: Some(l), pointer, scale: 1.0 }
}
const fn gl(name: &'static str, help: &'static str, l: (&'static str, &'static str), pointer: &'static str) -> Spec {
    Spec { name, help, kind: Kind::Gauge, label: Some(l), pointer, scale: 1.0 }
}
const fn ms(q: &'static str, pointer: &'static str) -> Spec {
    Spec {
        name: "driveblk_remote_latency_seconds",
        help: "Remote request latency quantiles since start (each retry attempt counts).",
        kind: Kind::Gauge,
        label: Some(("quantile", q)),
        pointer,
        scale: 0.001,
    }
}

const HITS: &str = "Chunk parts read, by where they were found.";
const CHUNKS: &str = "Chunks of the image, by state in the local cache.";
const REQS: &str = "Remote requests (each retry attempt counts), by operation.";

const SPECS: &[Spec] = &[
    g("driveblk_generation", "Newest committed generation served.", "/generation"),
    g("driveblk_offline", "1 when started from the cache's copy (remote unreachable).", "/offline"),
    g("driveblk_image_bytes", "Length of the image.", "/image_len"),
    gl("driveblk_chunks", CHUNKS, ("state", "total"), "/chunks/total"),
    gl("driveblk_chunks", CHUNKS, ("state", "cached"), "/chunks/cached"),
    gl("driveblk_chunks", CHUNKS, ("state", "dirty"), "/chunks/dirty"),
    gl("driveblk_chunks", CHUNKS, ("state", "zero"), "/chunks/zero"),
    gl("driveblk_chunks", CHUNKS, ("state", "partial"), "/chunks_partial"),
    gl("driveblk_cache_bytes", "Bytes held by each tier.", ("tier", "ram"), "/ram/bytes"),
    gl("driveblk_cache_bytes", "Bytes held by each tier.", ("tier", "ssd"), "/ssd/bytes"),
    gl("driveblk_cache_capacity_bytes", "Capacity of each tier.", ("tier", "ram"), "/ram/cap"),
    gl("driveblk_cache_capacity_bytes", "Capacity of each tier.", ("tier", "ssd"), "/ssd/cap"),
    cl("driveblk_reads_total", HITS, ("from", "ram"), "/ram/hits"),
    cl("driveblk_reads_total", HITS, ("from", "ssd"), "/ssd/hits"),
    cl("driveblk_reads_total", HITS, ("from", "zero"), "/zero_hits"),
    cl("driveblk_reads_total", HITS, ("from", "remote"), "/remote/misses"),
    c("driveblk_ssd_evictions_total", "Chunks evicted from the SSD tier.", "/ssd/evictions"),
    g("driveblk_ssd_disk_free_bytes", "Bytes free on the SSD tier's filesystem.", "/ssd/free_bytes"),
    g(
        "driveblk_ssd_min_free_bytes",
        "Bytes the SSD tier's clean data leaves free on its filesystem (--ssd-min-free).",
        "/ssd/min_free",
    ),
    c("driveblk_remote_fetches_total", "Chunks fetched from the remote.", "/remote/fetches"),
    c("driveblk_remote_fetch_bytes_total", "Bytes of chunks fetched.", "/remote/bytes"),
    c("driveblk_remote_fetch_errors_total", "Chunk fetches that failed.", "/remote/errors"),
    c("driveblk_readahead_chunks_total", "Chunks read ahead.", "/remote/readahead_chunks"),
    cl("driveblk_remote_requests_total", REQS, ("op", "get"), "/remote/requests/gets"),
    cl("driveblk_remote_requests_total", REQS, ("op", "put"), "/remote/requests/puts"),
    cl("driveblk_remote_requests_total", REQS, ("op", "head"), "/remote/requests/heads"),
    cl("driveblk_remote_requests_total", REQS, ("op", "list"), "/remote/requests/lists"),
    cl("driveblk_remote_requests_total", REQS, ("op", "delete"), "/remote/requests/deletes"),
    c("driveblk_remote_request_errors_total", "Remote request attempts that failed.", "/remote/requests/errors"),
    c("driveblk_remote_read_bytes_total", "Bytes read from the remote.", "/remote/requests/bytes_read"),
    c("driveblk_remote_written_bytes_total", "Bytes written to the remote.", "/remote/requests/bytes_written"),
    g("driveblk_remote_in_flight", "Remote requests in flight.", "/remote/requests/in_flight"),
    ms("0.5", "/remote/latency_ms/p50"),
    ms("0.9", "/remote/latency_ms/p90"),
    ms("0.99", "/remote/latency_ms/p99"),
    ms("1", "/remote/latency_ms/max"),
    g("driveblk_dirty_bytes", "Bytes of local changes not committed yet.", "/sync/dirty_bytes"),
    g("driveblk_sync_uploading", "1 while a generation uploads.", "/sync/uploading"),
    g(
        "driveblk_sync_frozen_bytes",
        "Bytes of the uploading generation copied aside in the cache (chunks rewritten since its cut).",
        "/sync/frozen_bytes",
    ),
    c("driveblk_generations_committed_total", "Generations this daemon committed.", "/sync/generations_committed"),
    c("driveblk_uploaded_bytes_total", "Pack bytes this daemon uploaded.", "/sync/bytes_uploaded"),
    g(
        "driveblk_seconds_since_commit",
        "Seconds since the newest generation was committed (wall clock, by its commit record).",
        "/sync/since_commit_secs",
    ),
    g("driveblk_sync_paused", "1 when write-back waits for a person (quota, credentials).", "/sync/paused"),
    g("driveblk_hydrate_chunks_done", "Chunks hydration has made local.", "/hydrate/done"),
    g("driveblk_hydrate_chunks_total", "Chunks hydration has to make local.", "/hydrate/total"),
    g("driveblk_hydrated", "1 when every chunk is local.", "/hydrate/complete"),
    g("driveblk_boot_profile_recording", "1 while this boot is being recorded.", "/boot_profile/recording"),
    g("driveblk_boot_profile_segments_done", "Boot profile segments streamed.", "/boot_profile/segments_done"),
];

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

/// The registry, rebuilt from one status snapshot.
fn render(status: &Value) -> anyhow::Result<String> {
    let reg = Registry::new();
    let mut counters: HashMap<&str, IntCounterVec> = HashMap::new();
    let mut gauges: HashMap<&str, GaugeVec> = HashMap::new();
    for s in SPECS {
        let labels: Vec<&str> = s.label.iter().map(|(k, _)| *k).collect();
        match s.kind {
            Kind::Counter if !counters.contains_key(s.name) => {
                let v = IntCounterVec::new(Opts::new(s.name, s.help), &labels)?;
                reg.register(Box::new(v.clone()))?;
                counters.insert(s.name, v);
            }
            Kind::Gauge if !gauges.contains_key(s.name) => {
                let v = GaugeVec::new(Opts::new(s.name, s.help), &labels)?;
                reg.register(Box::new(v.clone()))?;
                gauges.insert(s.name, v);
            }
            _ => {}
        }
        let Some(x) = status.pointer(s.pointer).and_then(number) else { continue };
        let values: Vec<&str> = s.label.iter().map(|(_, v)| *v).collect();
        match s.kind {
            Kind::Counter => counters[s.name].with_label_values(&values).inc_by(x as u64),
            Kind::Gauge => gauges[s.name].with_label_values(&values).set(x * s.scale),
        }
    }
    let up =
        GaugeVec::new(Opts::new("driveblk_up", "1 while the daemon serves; labelled with its state."), &["state"])?;
    reg.register(Box::new(up.clone()))?;
    up.with_label_values(&[status["state"].as_str().unwrap_or("serving")]).set(1.0);
    let err = GaugeVec::new(
        Opts::new("driveblk_sync_error", "1 while the last upload attempt failed or another machine committed first."),
        &["kind"],
    )?;
    reg.register(Box::new(err.clone()))?;
    err.with_label_values(&["error"])
        .set(f64::from(u8::from(status.pointer("/sync/last_error").is_some_and(|e| !e.is_null()))));
    err.with_label_values(&["conflict"])
        .set(f64::from(u8::from(status.pointer("/sync/conflict").is_some_and(|e| !e.is_null()))));
    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// The HTTP endpoint; stops when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

/// Binds the metrics address. `serve` does this before it opens the volume:
/// several daemons on one host (one per VM disk) given the same port from a
/// copied config would otherwise each open their volume, take its writer
/// lease, and only then fail, at every restart.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot serve metrics on {addr}: the port is in use by another process (another driveblk serving \
             another volume?): give each daemon a port of its own (`--metrics 127.0.0.1:{}`, `metrics = ...` in \
             its config file), or port 0 for any free one (`driveblk status` shows it)",
            addr.port().wrapping_add(1)
        ),
        _ => anyhow::anyhow!("cannot serve metrics on {addr}: {e}"),
    })
}

impl MetricsServer {
    /// Serves the metrics on `listener` (from [`bind`]).
    pub fn start(listener: TcpListener, status: Arc<DaemonStatus>) -> anyhow::Result<Self> {
        let addr = listener.local_addr().context("the metrics socket has no address")?;
        let server = Arc::new(
            tiny_http::Server::from_listener(listener, None)
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?,
        );
        // Port 0 asks the kernel for a free port: report the one it chose.
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let url = format!("http://{bound}/metrics");
        tracing::info!(addr = %bound, "Prometheus metrics at {url}");
        let _ = status.metrics_url.set(url);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("driveblk-metrics".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    let resp = if req.url() == "/metrics" || req.url().starts_with("/metrics?") {
                        match render(&status.to_json()) {
                            Ok(body) => tiny_http::Response::from_string(body).with_header(
                                tiny_http::Header::from_bytes("Content-Type", TextEncoder::new().format_type())
                                    .expect("valid header"),
                            ),
                            Err(e) => tiny_http::Response::from_string(format!("{e:#}")).with_status_code(500),
                        }
                    } else {
                        tiny_http::Response::from_string("driveblk: metrics are at /metrics\n").with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .context("cannot start the metrics thread")?;
        Ok(Self { server, thread: Some(thread) })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_renders_from_a_status() {
        let v = serde_json::json!({
            "generation": 4, "state": "serving", "ram": {"hits": 10, "bytes": 5, "cap": 9},
            "remote": {"latency_ms": {"p50": 12.0}, "requests": {"gets": 3}},
            "sync": {"dirty_bytes": 4096, "uploading": true, "last_error": null, "conflict": "x"},
        });
        let text = render(&v).unwrap();
        assert!(text.contains("driveblk_generation 4"), "{text}");
        assert!(text.contains("driveblk_reads_total{from=\"ram\"} 10"), "{text}");
        assert!(text.contains("driveblk_remote_latency_seconds{quantile=\"0.5\"} 0.012"), "{text}");
        assert!(text.contains("driveblk_remote_requests_total{op=\"get\"} 3"), "{text}");
        assert!(text.contains("driveblk_sync_uploading 1"), "{text}");
        assert!(text.contains("driveblk_sync_error{kind=\"conflict\"} 1"), "{text}");
        assert!(text.contains("driveblk_up{state=\"serving\"} 1"), "{text}");
    }
}
