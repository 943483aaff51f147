//! The control socket of a daemon serving a volume: `status` is live (no
//! waiting for the status file), `drop-cache` drops clean data but keeps
//! local changes, `hydrate` and `hydrate --pin` go through the running
//! daemon, bad requests get an error reply, the socket takes
//! `--socket-mode`, and after a stop the socket is gone and `status` shows
//! the last state from the file.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use common::{bin, run_ok, Client, Daemon};
use serde_json::Value;

fn status(cache: &Path) -> Value {
    serde_json::from_str(&run_ok(&["status", "--cache-dir", cache.to_str().unwrap(), "--json"])).unwrap()
}

/// A raw image of `len` pattern bytes imported as the `dir:` volume `vol`
/// under `dir`: its bytes and URL.
fn raw_volume(dir: &Path, len: usize, seed: u64) -> (Vec<u8>, String) {
    let img = dir.join("img.raw");
    let data = common::make_raw(&img, len, seed);
    let url = format!("dir:{}", dir.join("vol").display());
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);
    (data, url)
}

/// One raw request line on the control socket, one reply.
fn raw_request(ctl: &Path, line: &str) -> Value {
    let mut s = UnixStream::connect(ctl).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut r = String::new();
    BufReader::new(s).read_line(&mut r).unwrap();
    serde_json::from_str(&r).unwrap()
}

#[test]
fn control_socket_status_drop_cache_hydrate_and_errors() {
    let d = tempfile::tempdir().unwrap();
    let (data, url) = raw_volume(d.path(), 16 << 20, 7);
    let cache = d.path().join("cache");
    let sock = d.path().join("vhost.sock");
    let ctl = d.path().join("vhost.sock.ctl");
    let daemon = Daemon::start(
        &sock,
        // No boot profile, so no first-boot stream fetching chunks while
        // the test counts what is cached.
        &[
            "--volume",
            &url,
            "--format",
            "raw",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--socket-mode",
            "0660",
            "--boot-profile",
            "off",
        ],
    );
    // Both sockets take the mode asked for.
    for p in [&sock, &ctl] {
        assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o660, "{}", p.display());
    }

    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 4 << 20).unwrap(), data[..4 << 20]);
    // Live: the reads just done are counted at once.
    let s = status(&cache);
    assert_eq!(s["state"], "serving");
    assert_eq!(s["control_socket"].as_str().unwrap(), ctl.to_str().unwrap());
    assert!(s["remote"]["fetches"].as_u64().unwrap() >= 4, "{s}");
    assert!(s["remote"]["latency_ms"]["count"].as_u64().unwrap() > 0, "remote latency recorded: {s}");
    // A healthy remote: its answers (a key not there yet among them) are no
    // failed attempts (status: "N failed attempts"; a Prometheus counter).
    assert_eq!(s["remote"]["requests"]["errors"], 0, "{s}");
    assert!(s["ssd"]["bytes"].as_u64().unwrap() >= 4 << 20, "{s}");

    // A local change, then drop-cache: clean data goes, the change stays.
    let w = common::pattern(9, 1 << 20);
    c.write(8 << 20, &w).unwrap();
    c.flush().unwrap();
    let before = status(&cache)["remote"]["fetches"].as_u64().unwrap();
    let r: Value =
        serde_json::from_str(&run_ok(&["drop-cache", "--control", ctl.to_str().unwrap(), "--json"])).unwrap();
    assert!(r["ssd_chunks_dropped"].as_u64().unwrap() >= 4, "{r}");
    let s = status(&cache);
    assert!(s["ssd"]["bytes"].as_u64().unwrap() <= 1 << 20, "only the changed chunk stays on SSD: {s}");
    assert_eq!(c.read(8 << 20, 1 << 20).unwrap(), w, "the local change survives drop-cache");
    assert_eq!(c.read(0, 4 << 20).unwrap(), data[..4 << 20]);
    let after = status(&cache)["remote"]["fetches"].as_u64().unwrap();
    assert!(after >= before + 4, "dropped chunks are fetched again ({before} -> {after})");

    // Hydrate through the running daemon (the cache is locked by it).
    run_ok(&["hydrate", &url, "--cache-dir", cache.to_str().unwrap(), "--quiet"]);
    assert_eq!(status(&cache)["hydrate"]["complete"], true);

    // Bad requests get an error reply, and the connection stays usable.
    let v = raw_request(&ctl, r#"{"cmd":"format-disk"}"#);
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("bad request"), "{v}");
    let v = raw_request(&ctl, "not json");
    assert_eq!(v["ok"], false);
    let v = raw_request(&ctl, r#"{"cmd":"status"}"#);
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["volume_id"], s["volume_id"]);

    drop(c);
    assert!(daemon.stop().success());
    assert!(!ctl.exists(), "the control socket is removed at stop");
    let s = status(&cache);
    assert_eq!(s["running"], false, "a stopped daemon's last state comes from its status file: {s}");
    assert_eq!(s["state"], "stopped");
    // drop-cache needs a running daemon and says so.
    let out = Command::new(bin()).args(["drop-cache", "--cache-dir", cache.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running daemon"));
}

/// A plain HTTP GET (no client crate needed for one request).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn prometheus_endpoint_serves_the_status_figures() {
    let d = tempfile::tempdir().unwrap();
    let (data, url) = raw_volume(d.path(), 8 << 20, 5);
    let sock = d.path().join("vhost.sock");
    let cache = d.path().join("cache");
    let daemon = Daemon::start(
        &sock,
        &["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--metrics", "127.0.0.1:0"],
    );
    // Port 0: the daemon binds a free port and the status says which.
    let metrics_url = status(&cache)["metrics_url"].as_str().expect("status gives the metrics URL").to_string();
    let addr = metrics_url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).unwrap().to_string();
    assert!(!addr.ends_with(":0"), "{metrics_url}");
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 2 << 20).unwrap(), data[..2 << 20]);
    c.write(4 << 20, &common::pattern(2, 4096)).unwrap();
    c.flush().unwrap();
    let page = http_get(&addr, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let value = |line: &str| -> f64 {
        let l = page.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line} missing:\n{page}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("driveblk_remote_fetches_total ") >= 2.0);
    assert!(value("driveblk_remote_requests_total{op=\"get\"}") >= 2.0);
    assert!(value("driveblk_remote_latency_seconds{quantile=\"0.99\"}") > 0.0);
    assert_eq!(value("driveblk_up{state=\"serving\"}"), 1.0);
    assert!(page.contains("# TYPE driveblk_reads_total counter"), "{page}");
    assert!(http_get(&addr, "/").starts_with("HTTP/1.1 404"));
    drop(c);
    assert!(daemon.stop().success());
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the endpoint closes with the daemon");
    // The stop committed the write. A restart knows how old that commit
    // is (wall clock, from the generation's record) before it commits
    // anything itself: the metric used to be missing until then.
    let daemon = Daemon::start(
        &sock,
        &["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--metrics", "127.0.0.1:0"],
    );
    let metrics_url = status(&cache)["metrics_url"].as_str().unwrap().to_string();
    let addr = metrics_url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).unwrap().to_string();
    let page = http_get(&addr, "/metrics");
    let line = page.lines().find(|l| l.starts_with("driveblk_seconds_since_commit "));
    let age: f64 = line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).expect(&page);
    assert!((0.0..60.0).contains(&age), "{page}");
    assert!(daemon.stop().success());
}

/// `hydrate --pin` with the VM running: the daemon holds the cache, so the
/// pins go to it over the control socket; it fetches them behind the
/// guest's reads, the command waits until they are local, and the pins are
/// kept at the next start.
#[test]
fn hydrate_pin_goes_through_the_running_daemon() {
    let d = tempfile::tempdir().unwrap();
    let (data, url) = raw_volume(d.path(), 16 << 20, 11);
    let sock = d.path().join("vhost.sock");
    let serve = |cache: &Path, profile: &str| {
        let args = [
            "--volume",
            &url,
            "--format",
            "raw",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--boot-profile",
            profile,
            "--remote-latency-ms",
            "20",
        ];
        Daemon::start(&sock, &args)
    };
    // A boot that reads the first 2 MiB records a profile of 2 chunks.
    let daemon = serve(&d.path().join("cache-rec"), "record");
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 2 << 20).unwrap(), data[..2 << 20]);
    drop(c);
    assert!(daemon.stop().success());

    // Another machine: the VM runs (no profile stream), and the user pins.
    let cache = d.path().join("cache");
    let daemon = serve(&cache, "off");
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(12 << 20, 4096).unwrap(), data[12 << 20..(12 << 20) + 4096]);
    let pin = |spec: &str| {
        let out = Command::new(bin())
            .args(["hydrate", &url, "--cache-dir", cache.to_str().unwrap(), "--pin", spec, "--quiet"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "hydrate --pin {spec} with the daemon running: {err}");
        err
    };
    let out = pin("8M+2M");
    assert!(out.contains("pinned 2 chunks (2.0 MiB)") && out.contains("through the daemon"), "{out}");
    let out = pin("profile");
    assert!(out.contains("pinned 4 chunks") && out.contains("offline-ready"), "{out}");
    // The guest kept running all along, and reads what it always read.
    assert_eq!(c.read(8 << 20, 2 << 20).unwrap(), data[8 << 20..10 << 20]);
    let s = status(&cache);
    assert_eq!(s["hot_set"]["pinned"], 4, "{s}");
    assert_eq!(s["hot_set"]["pinned_local"], 4, "{s}");
    assert_eq!(s["hot_set"]["pinning"], false, "{s}");
    assert_eq!(s["hot_set"]["offline_ready"], true, "{s}");
    // Nothing to pin is refused with a reason.
    let v = raw_request(&d.path().join("vhost.sock.ctl"), r#"{"cmd":"pin"}"#);
    assert!(v["error"].as_str().unwrap().contains("nothing to pin"), "{v}");
    drop(c);
    assert!(daemon.stop().success());

    // The pins were saved: the next start keeps them, and they stay local.
    let daemon = serve(&cache, "off");
    let t0 = std::time::Instant::now();
    let mut s = status(&cache);
    while s["hot_set"]["pinning"] != false && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        s = status(&cache);
    }
    assert_eq!(s["hot_set"]["pinned"], 4, "{s}");
    assert_eq!(s["hot_set"]["pinned_local"], 4, "{s}");
    assert_eq!(s["remote"]["bytes_by_source"]["hydrate"], 0, "pinned chunks already local are not fetched again: {s}");
    assert!(daemon.stop().success());
}
