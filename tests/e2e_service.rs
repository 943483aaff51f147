//! Running driveblk as a service: `serve --config FILE` serves from the
//! file alone, `config check` names the bad line, the systemd template unit
//! passes `systemd-analyze verify`, and under `Type=notify` (NOTIFY_SOCKET)
//! READY=1 comes only once the vhost socket accepts, with STATUS= lines,
//! STOPPING=1 at SIGTERM and EXTEND_TIMEOUT_USEC during the final upload,
//! and its log (stderr, not a terminal) has no colour codes.

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, run_ok, Client};

fn volume(dir: &Path) -> (String, Vec<u8>) {
    let img = dir.join("img.raw");
    let data = common::make_raw(&img, 8 << 20, 3);
    let url = format!("dir:{}", dir.join("vol").display());
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);
    (url, data)
}

/// Kills the daemon if the test fails half way.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(p: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(p).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "driveblk exited early");
        assert!(Instant::now() < deadline, "socket {} never came up", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_reads_everything_from_a_config_file_and_check_names_bad_lines() {
    let d = tempfile::tempdir().unwrap();
    let (url, data) = volume(d.path());
    let sock = d.path().join("from-file.sock");
    let conf = d.path().join("w10.toml");
    std::fs::write(
        &conf,
        format!(
            "# a volume\nsocket = \"{}\"\nvolume = \"{url}\"\nformat = \"raw\"\ncache_dir = \"{}\"\n\
             ram_cache = \"64M\"\nserial = \"from-config\"\nsocket_mode = \"0600\"\n",
            sock.display(),
            d.path().join("cache").display()
        ),
    )
    .unwrap();
    assert!(run_ok(&["config", "check", conf.to_str().unwrap()]).contains(": ok"));
    let mut child = Command::new(bin()).args(["serve", "--config", conf.to_str().unwrap()]).spawn().unwrap();
    wait_for_socket(&sock, &mut child);
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 1 << 20).unwrap(), data[..1 << 20]);
    drop(c);
    let s: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--control", &format!("{}.ctl", sock.display()), "--json"])).unwrap();
    assert_eq!(s["ram"]["cap"], 64 << 20, "ram_cache came from the file: {s}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(common::wait_timeout(&mut child, Duration::from_secs(30)).success());

    // A bad file: serve refuses it, check points at the line.
    std::fs::write(&conf, format!("socket = \"{}\"\nvolume = \"{url}\"\nnum_queues = \"four\"\n", sock.display()))
        .unwrap();
    let out = Command::new(bin()).args(["config", "check", conf.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    let out = Command::new(bin()).args(["serve", "--config", conf.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("line 3"));
}

/// The config file docs/systemd.md shows (its commented keys too) passes
/// `config check` run from a shell, as the docs' first steps do before
/// systemd ever starts the unit: its `drive_credential` names a systemd
/// credential, whose directory exists only under the unit.
#[test]
fn the_config_file_in_the_docs_passes_config_check_from_a_shell() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/systemd.md")).unwrap();
    let toml = doc.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
    // `# key = value` lines are keys the docs offer: checked too.
    let text: String = toml
        .lines()
        .map(|l| {
            let key = l.strip_prefix("# ").filter(|r| r.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')));
            format!("{}\n", key.unwrap_or(l))
        })
        .collect();
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("w10.toml");
    std::fs::write(&conf, &text).unwrap();
    let out = Command::new(bin())
        .args(["config", "check", conf.to_str().unwrap()])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains(": ok"), "{text}\n{stdout}{stderr}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIP: systemd-analyze is not installed (scripts/deps.sh installs systemd)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(bin()).args(["install-unit", "--dir", d.path().to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let unit = std::fs::read_to_string(d.path().join("driveblk@.service")).unwrap();
    assert!(unit.contains(&format!("ExecStart={} serve --config /etc/driveblk/%i.toml", bin())), "{unit}");
    for key in ["Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes", "RuntimeDirectory=driveblk"] {
        assert!(unit.contains(key), "{key} missing");
    }
    let inst = d.path().join("driveblk@w10.service");
    std::fs::copy(d.path().join("driveblk@.service"), &inst).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&inst).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown or misspelt keys are only warnings: any line about the unit fails.
    let about: Vec<&str> = err.lines().filter(|l| l.contains("driveblk@")).collect();
    assert!(out.status.success() && about.is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn sd_notify_ready_only_once_the_socket_accepts_then_stopping_and_extend_timeout() {
    let d = tempfile::tempdir().unwrap();
    let (url, _) = volume(d.path());
    let notify_path = d.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let sock = d.path().join("vhost.sock");
    let child = Command::new(bin())
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &url, "--format", "raw"])
        .args(["--cache-dir", d.path().join("cache").to_str().unwrap(), "--sync-interval", "3600"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(d.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut reap = Reap(child);
    let child = &mut reap.0;
    let mut buf = vec![0u8; 4096];
    let mut recv = |what: &str| -> String {
        let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no sd_notify message while waiting for {what}: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut before_ready = Vec::new();
    loop {
        let m = recv("READY=1");
        if m.lines().any(|l| l == "READY=1") {
            // Right now, with no retry: the socket must accept.
            UnixStream::connect(&sock).expect("READY=1 came before the vhost socket accepted");
            assert!(m.contains("STATUS=serving"), "{m}");
            break;
        }
        before_ready.push(m);
    }
    assert!(
        before_ready.iter().any(|m| m.contains("STATUS=opening volume")),
        "a STATUS line while opening: {before_ready:?}"
    );
    // A flushed change that only the final sync uploads.
    let mut c = Client::connect(&sock, 1);
    c.write(0, &common::pattern(1, 4096)).unwrap();
    c.write(2 << 20, &common::pattern(2, 1 << 20)).unwrap();
    c.flush().unwrap();
    drop(c);
    // While serving, STATUS= says what is pending (refreshed every second).
    loop {
        let m = recv("a STATUS line while serving");
        if m.contains("STATUS=serving; generation") && m.contains("not uploaded") {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut after = Vec::new();
    loop {
        let m = recv("the stop");
        let done = m.contains("STATUS=stopped");
        after.push(m);
        if done {
            break;
        }
    }
    assert!(common::wait_timeout(child, Duration::from_secs(30)).success());
    // As journald would get it: plain text, no colour codes.
    let log = std::fs::read_to_string(d.path().join("log")).unwrap();
    assert!(log.contains("stopped cleanly") && !log.contains('\x1b'), "{log}");
    let all = after.join("\n");
    assert!(all.contains("STOPPING=1"), "{all}");
    // The stop is covered from its first moment (requests in flight on a
    // dead link may outlast TimeoutStopSec before the final sync starts).
    let stopping = after.iter().find(|m| m.contains("STOPPING=1")).unwrap();
    assert!(stopping.contains("EXTEND_TIMEOUT_USEC="), "{stopping}");
    assert!(all.contains("STATUS=final sync"), "{all}");
    assert!(all.contains("EXTEND_TIMEOUT_USEC="), "{all}");
}

#[test]
fn a_volume_imported_with_format_serves_without_format() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.raw");
    let data = common::make_raw(&img, 4 << 20, 9);
    let with = format!("dir:{}", d.path().join("with").display());
    let without = format!("dir:{}", d.path().join("without").display());
    run_ok(&["import", "--quiet", "--format", "raw", img.to_str().unwrap(), &with]);
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &without]);
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &with])).unwrap();
    assert_eq!(info["image_format"], "raw");

    let sock = d.path().join("s.sock");
    let daemon =
        common::Daemon::start(&sock, &["--volume", &with, "--cache-dir", d.path().join("c1").to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 1 << 20).unwrap(), data[..1 << 20]);
    drop(c);
    assert!(daemon.stop().success());

    // A volume that does not record it, and a plain file: --format is needed.
    let out = Command::new(bin())
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &without])
        .args(["--cache-dir", d.path().join("c2").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not record its image format"));
    let out = Command::new(bin())
        .args(["serve", "--socket", sock.to_str().unwrap(), "--image", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--format raw|qcow2 is required for --image"));
}

#[test]
fn progress_off_a_terminal_is_plain_lines() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.raw");
    common::make_raw(&img, 8 << 20, 4);
    let url = format!("dir:{}", d.path().join("vol").display());
    // stderr is a pipe here, as under systemd or in a log file.
    let out = Command::new(bin())
        .args(["import", "--chunk-size", "256K", "--remote-latency-ms", "20", img.to_str().unwrap(), &url])
        .env("DRIVEBLK_PROGRESS_MS", "5")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("import: ")).collect();
    assert!(!lines.is_empty(), "{err}");
    let last = lines.last().unwrap();
    assert!(last.contains("8.00 MiB of 8.00 MiB (100%)") && last.contains("/s"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\r'), "no terminal control codes: {err:?}");
}

/// SIGHUP (a closed terminal, `systemctl kill -s HUP`) does not end the
/// daemon: by default it would exit at once, without a flush, and systemd
/// would not restart it. SIGTERM still stops it cleanly.
#[test]
fn sighup_is_ignored_and_sigterm_still_stops() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.raw");
    let data = common::make_raw(&img, 4 << 20, 11);
    let sock = d.path().join("s.sock");
    let daemon = common::Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "raw"]);
    let pid = daemon.child.as_ref().unwrap().id() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let mut c = Client::connect(&sock, 1);
    assert_eq!(c.read(0, 1 << 20).unwrap(), data[..1 << 20], "the daemon stopped serving after SIGHUP");
    drop(c);
    assert!(daemon.stop().success());
}
