//! A fleet booting one golden volume, through the daemon and libblkio:
//! daemons started together with a shared cache directory fetch each range
//! from the remote (the Drive emulator, counting what it sends) about
//! once; a corrupted or hostile shared entry is never served (plaintext and
//! encrypted volumes; the encrypted volume's entries hold no plaintext); a
//! second host serves from a filled shared directory with the remote slow;
//! ephemeral disks write without a lease, upload nothing, and lose their
//! writes at the next start.

mod common;
mod gdrive_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{run_ok, Client, Daemon};
use gdrive_support::{start, Creds};

const MIB: usize = 1 << 20;

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.capacity as usize);
    let mut off = 0;
    while off < c.capacity {
        let n = (c.capacity - off).min(MIB as u64) as usize;
        out.extend(c.read(off, n).unwrap());
        off += n as u64;
    }
    out
}

/// A stopped daemon's last status.
fn status(cache: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(cache.join("status.json")).unwrap()).unwrap()
}

/// Every entry file of a shared directory.
fn entries(shared: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for sub in std::fs::read_dir(shared).unwrap().flatten() {
        if sub.path().is_dir() {
            for e in std::fs::read_dir(sub.path()).unwrap().flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.len() == 64 {
                    v.push(e.path());
                }
            }
        }
    }
    v.sort();
    v
}

/// Four daemons, each with an empty cache, boot one Drive volume at the
/// same moment: with a shared directory the emulator sends the volume's
/// bytes about once, not four times.
#[test]
fn fleet_of_daemons_fetches_each_chunk_about_once() {
    const N: usize = 4;
    let emu_cfg =
        driveemu::Config { latency: Duration::from_millis(20), bandwidth_bps: Some(200_000_000), ..Default::default() };
    let env = start(emu_cfg, Creds::User);
    let flags = ["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()];
    let img = env.dir.path().join("golden.raw");
    let want = Arc::new(common::make_raw(&img, 16 * MIB, 41));
    let mut args = vec!["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), "gdrive:/fleet/golden"];
    args.extend_from_slice(&flags);
    let o = Command::new(common::bin()).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let shared = env.dir.path().join("shared");
    let mut daemons = Vec::new();
    for i in 0..N {
        let cache = env.dir.path().join(format!("cache{i}"));
        let sock = env.dir.path().join(format!("sock{i}"));
        let mut a = vec![
            "--volume",
            "gdrive:/fleet/golden",
            "--format",
            "raw",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--shared-cache",
            shared.to_str().unwrap(),
            "--ephemeral",
        ];
        a.extend_from_slice(&flags);
        daemons.push((Daemon::start(&sock, &a), sock, cache));
    }
    let before = env.emu.stats().bytes_out;
    let go = Arc::new(Barrier::new(N));
    let readers: Vec<_> = daemons
        .iter()
        .map(|(_, sock, _)| {
            let (sock, go, want) = (sock.clone(), go.clone(), want.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, 1);
                go.wait();
                assert!(read_all(&mut c) == *want, "a fleet member read wrong bytes");
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let sent = env.emu.stats().bytes_out - before;
    // Each of the 64 chunks fetched about once (a wait that ran out may
    // fetch one twice); without sharing this is N times the volume.
    assert!(sent < (want.len() as u64) * 3 / 2, "the remote sent {sent} bytes for {N} boots of a 16 MiB volume");
    let mut stored = 0;
    let mut hits = 0;
    for (d, _, cache) in daemons {
        assert!(d.stop().success());
        let st = status(&cache);
        stored += st["shared_cache"]["stored"].as_u64().unwrap();
        hits += st["shared_cache"]["hits"].as_u64().unwrap();
    }
    assert!(stored >= 64 && hits >= 64 * (N as u64 - 1) / 2, "stored {stored}, hits {hits}");
    assert_eq!(entries(&shared).len() as u64, stored);
}

/// Imports `data` as a volume (encrypted with `key` if given).
fn import(dir: &Path, name: &str, data: &[u8], key: Option<&Path>) -> String {
    let img = dir.join(format!("{name}.raw"));
    std::fs::write(&img, data).unwrap();
    let url = format!("dir:{}/remote/{name}", dir.display());
    let mut a = vec!["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), &url];
    let k;
    if let Some(key) = key {
        k = key.to_str().unwrap().to_string();
        a.extend_from_slice(&["--encrypt", "--key-file", &k]);
    }
    run_ok(&a);
    url
}

fn serve(dir: &Path, name: &str, url: &str, extra: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let cache = dir.join(format!("cache-{name}"));
    let sock = dir.join(format!("sock-{name}"));
    let mut a =
        vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"];
    a.extend_from_slice(extra);
    (Daemon::start(&sock, &a), sock, cache)
}

/// A shared directory whose entries were flipped, truncated and swapped
/// (a hostile neighbour writes valid-looking bytes of another range): a
/// daemon reading through it still serves exactly the volume, fetching the
/// bad ranges again and repairing the entries. An encrypted volume's
/// entries hold ciphertext only.
#[test]
fn corrupted_shared_entries_are_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, common::pattern(7, 32)).unwrap();
    let data = common::pattern(43, 8 * MIB);
    for (name, k) in [("plain", None), ("sealed", Some(key.as_path()))] {
        let url = import(dir.path(), name, &data, k);
        let shared = dir.path().join(format!("shared-{name}"));
        let mut extra = vec!["--shared-cache", shared.to_str().unwrap()];
        if k.is_some() {
            extra.extend_from_slice(&["--key-file", key.to_str().unwrap()]);
        }
        // Host A fills the shared directory.
        let (d, sock, _) = serve(dir.path(), &format!("{name}-a"), &url, &extra);
        let mut c = Client::connect(&sock, 1);
        assert!(read_all(&mut c) == data);
        drop(c);
        assert!(d.stop().success());
        let files = entries(&shared);
        assert!(files.len() >= 32, "{name}: {} entries", files.len());
        let good: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        if k.is_some() {
            for off in (0..data.len()).step_by(MIB / 2) {
                let window = &data[off..off + 64];
                assert!(
                    !good.iter().any(|e| e.windows(64).any(|w| w == window)),
                    "plaintext at {off} is in the shared directory of an encrypted volume"
                );
            }
        }
        // Damage every entry: flip a byte, cut one short, swap two.
        for (i, f) in files.iter().enumerate() {
            let mut b = good[i].clone();
            match i % 3 {
                0 => {
                    let m = b.len() / 2;
                    b[m] ^= 0x55;
                }
                1 => b.truncate(b.len() / 2 + 1),
                _ => b = good[(i + 1) % good.len()].clone(),
            }
            std::fs::write(f, b).unwrap();
        }
        // Host B: empty cache, the damaged shared directory.
        let (d, sock, cache) = serve(dir.path(), &format!("{name}-b"), &url, &extra);
        let mut c = Client::connect(&sock, 1);
        assert!(read_all(&mut c) == data, "{name}: bytes from a damaged shared entry were served");
        drop(c);
        assert!(d.stop().success());
        let st = status(&cache);
        assert!(st["shared_cache"]["refreshed"].as_u64().unwrap() > 0, "{name}: {}", st["shared_cache"]);
        // The bad entries were replaced by the remote's bytes.
        let now: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        assert!(now == good, "{name}: damaged entries were not repaired");
    }
}

/// Host A fills the shared directory; host B, over a slow remote, serves
/// the whole volume from it. B is ephemeral: it writes while host C holds
/// the writer lease, uploads nothing, and its writes are gone at its next
/// start, ephemeral or not.
#[test]
fn second_host_serves_from_a_filled_shared_dir_and_ephemeral_writes_stay_local() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::pattern(44, 8 * MIB);
    let url = import(dir.path(), "golden", &data, None);
    let shared = dir.path().join("shared");
    let sh = ["--shared-cache", shared.to_str().unwrap()];
    let (d, sock, _) = serve(dir.path(), "a", &url, &sh);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == data);
    drop(c);
    assert!(d.stop().success());

    // Host C serves the volume writable: it holds the writer lease.
    let (dc, _, _) = serve(dir.path(), "c", &url, &[]);

    // Host B: 300 ms to the remote, everything found in the shared directory.
    let mut b_args = sh.to_vec();
    b_args.extend_from_slice(&["--ephemeral", "--remote-latency-ms", "300"]);
    let (d, sock, cache_b) = serve(dir.path(), "b", &url, &b_args);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == data);
    let mine = common::pattern(45, MIB);
    c.write(MIB as u64, &mine).unwrap();
    c.flush().unwrap();
    assert!(c.read(MIB as u64, MIB).unwrap() == mine);
    drop(c);
    assert!(d.stop().success());
    let st = status(&cache_b);
    let remote_read = st["remote"]["requests"]["bytes_read"].as_u64().unwrap();
    assert!(remote_read < (data.len() / 20) as u64, "host B read {remote_read} bytes from the remote");
    assert!(st["shared_cache"]["hits"].as_u64().unwrap() >= 32, "{}", st["shared_cache"]);
    assert!(st["remote"]["requests"]["puts"].as_u64().unwrap() == 0, "an ephemeral disk uploaded: {}", st["remote"]);

    // B again, ephemeral: its earlier writes are gone.
    let (d, sock, _) = serve(dir.path(), "b", &url, &b_args);
    let mut c = Client::connect(&sock, 1);
    assert!(c.read(MIB as u64, MIB).unwrap() == data[MIB..2 * MIB], "an ephemeral disk kept writes across a restart");
    c.write(3 * MIB as u64, &mine).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    assert!(dc.stop().success());

    // B as a normal writable daemon on the same cache: the ephemeral
    // writes are dropped, never uploaded as the volume's.
    let (d, sock, _) = serve(dir.path(), "b", &url, &[]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == data);
    drop(c);
    assert!(d.stop().success());
    // (Its generations since are lease records only.)
    let out = dir.path().join("export.raw");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "an ephemeral disk's writes reached the golden volume");
}

/// `--ephemeral` refuses a cache holding real changes not yet uploaded
/// (it would drop them).
#[test]
fn ephemeral_refuses_a_cache_with_pending_changes() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::pattern(46, 2 * MIB);
    let url = import(dir.path(), "vol", &data, None);
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let c_s = cache.to_str().unwrap();
    // A writable daemon whose upload cannot finish (0 s at stop).
    let d = Daemon::start(
        &sock,
        &[
            "--volume",
            &url,
            "--format",
            "raw",
            "--cache-dir",
            c_s,
            "--sync-timeout",
            "0",
            "--remote-latency-ms",
            "2000",
        ],
    );
    let mut c = Client::connect(&sock, 1);
    c.write(0, &common::pattern(47, 65536)).unwrap();
    c.flush().unwrap();
    drop(c);
    d.stop();
    let log = dir.path().join("refused.log");
    let mut child = Command::new(common::bin())
        .args(["serve", "--socket", sock.to_str().unwrap(), "--volume", &url, "--format", "raw"])
        .args(["--cache-dir", c_s, "--ephemeral"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // (Were it not refused, it would serve until stopped: the wait fails.)
    assert!(!common::wait_timeout(&mut child, Duration::from_secs(60)).success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("--ephemeral would drop"), "{err}");
}
