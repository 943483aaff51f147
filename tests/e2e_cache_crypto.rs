//! The encrypted SSD cache end to end (`serve --encrypt-cache`,
//! docs/encryption.md): the driveblk binary on real `dir:` remotes, the
//! guest's side through libblkio. After reads, page-aligned and unaligned
//! writes, a kill -9 with unflushed writes, a restart, write-back and a
//! fork, no file of the cache directory holds any of the guest's bytes —
//! while a plaintext cache given the same I/O holds them (the control) —
//! and every byte reads back right. The option needs an encrypted volume,
//! and a plaintext cache holding unsaved writes is refused, not mixed.

mod common;

use std::path::{Path, PathBuf};

use common::{run_ok, Client, Daemon};

const SIZE: usize = 8 << 20;

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < c.capacity {
        let n = (c.capacity - off).min(1 << 20) as usize;
        out.extend(c.read(off, n).unwrap());
        off += n as u64;
    }
    out
}

fn serve(sock: &Path, url: &str, cache: &Path, extra: &[&str]) -> Daemon {
    let mut args = vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(sock, &args)
}

/// `serve` that must fail at open; returns its stderr.
fn serve_err(sock: &Path, url: &str, cache: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::serve_fails(sock, &args)
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&e.path()));
        } else if t.is_file() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

/// The probes of `plain` found in some file under `dir`.
fn found(dir: &Path, probes: &[&[u8]]) -> Vec<String> {
    let all = files(dir);
    let mut hits = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        for (path, b) in &all {
            if b.windows(p.len()).any(|w| w == *p) {
                hits.push(format!("probe {i} in {}", path.display()));
            }
        }
    }
    hits
}

/// The guest's I/O of a session: reads everything (the cache fills with
/// the image), writes `secret` whole pages at three places and `small`
/// at an offset inside a page (read-modify-write of the page), flushes,
/// then writes `late` without a flush. Returns the expected disk.
fn guest_io(c: &mut Client, mut want: Vec<u8>, secret: &[u8], small: &[u8], late: &[u8]) -> Vec<u8> {
    assert!(read_all(c) == want, "cold read differs from the volume");
    let mut put = |c: &mut Client, off: usize, b: &[u8]| {
        c.write(off as u64, b).unwrap();
        want[off..off + b.len()].copy_from_slice(b);
    };
    for off in [4096, 3 << 20, SIZE - 65536] {
        put(c, off, secret);
    }
    put(c, (1 << 20) + 1536, small);
    c.flush().unwrap();
    put(c, 5 << 20, late);
    want
}

#[test]
fn an_encrypted_cache_holds_no_plaintext_and_survives_kill_restart_writeback_fork() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    let img = p("disk.raw");
    let image = common::make_raw(&img, SIZE, 7);
    let keyfile = p("key");
    std::fs::write(&keyfile, rand_key()).unwrap();
    let kf = keyfile.to_str().unwrap();
    let key = ["--key-file", kf];
    let (secret, small, late) = (common::pattern(99, 64 << 10), common::pattern(98, 512), common::pattern(97, 8192));
    let probes: Vec<&[u8]> = vec![
        &secret[..32],
        &secret[50_000..50_032],
        &small[100..132],
        &late[..32],
        &late[6000..6032],
        &image[(2 << 20) + 8192..(2 << 20) + 8224],
        &image[(6 << 20) + 100..(6 << 20) + 132],
    ];
    let sock = p("sock");
    let import = |name: &str| {
        let url = format!("dir:{}", p(name).display());
        run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kf, img.to_str().unwrap(), &url]);
        url
    };

    // The control: a plaintext cache of an encrypted volume, given the
    // same I/O and a kill -9, holds it all in clear — so the searches
    // below would find the bytes if they were there.
    let ctl = import("ctl");
    let mut d = serve(&sock, &ctl, &p("cache-p"), &key);
    let mut c = Client::connect(&sock, 1);
    let want_ctl = guest_io(&mut c, image.clone(), &secret, &small, &late);
    d.child.as_mut().unwrap().kill().unwrap();
    d.child.as_mut().unwrap().wait().unwrap();
    drop(c);
    let hits = found(&p("cache-p"), &probes);
    // Some in two files: a plaintext cache's journal carries small writes.
    let probed: std::collections::HashSet<_> = hits.iter().map(|h| h.split(" in ").next().unwrap()).collect();
    assert_eq!(probed.len(), probes.len(), "control: a plaintext cache holds every probe: {hits:?}");
    // It holds unsaved writes in clear: not turned into an encrypted cache.
    let err = serve_err(&sock, &ctl, &p("cache-p"), &["--key-file", kf, "--encrypt-cache"]);
    assert!(err.contains("unsaved writes") && err.contains("plaintext"), "{err}");
    let d = serve(&sock, &ctl, &p("cache-p"), &key);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want_ctl, "the plaintext cache after the refusal");
    drop(c);
    assert!(d.stop().success());
    let enc = status_encryption(&p("cache-p"));
    assert!(enc.starts_with("encrypted") && enc.contains("the local cache holds plaintext"), "{enc}");

    // The option needs an encrypted volume.
    let plain = format!("dir:{}", p("plain").display());
    run_ok(&["import", "--quiet", "--format", "raw", img.to_str().unwrap(), &plain]);
    let err = serve_err(&sock, &plain, &p("cache-x"), &["--encrypt-cache"]);
    assert!(err.contains("--encrypt-cache needs an encrypted volume"), "{err}");

    // Encrypted: the same I/O, a kill -9 after an unflushed write.
    let url = import("enc");
    let cache = p("cache-e");
    let enc = ["--key-file", kf, "--encrypt-cache"];
    let mut d = serve(&sock, &url, &cache, &enc);
    let mut c = Client::connect(&sock, 1);
    let want = guest_io(&mut c, image.clone(), &secret, &small, &late);
    d.child.as_mut().unwrap().kill().unwrap();
    d.child.as_mut().unwrap().wait().unwrap();
    drop(c);
    assert_eq!(found(&cache, &probes), Vec::<String>::new(), "plaintext in the encrypted cache after kill -9");
    let state = std::fs::read(cache.join("state")).unwrap();
    assert!(state.windows(11).any(|w| w == b"aes-256-xts"), "the state names the cipher");

    // Restart: every write is there (the flushed ones, and the unflushed
    // one through the journal's volatile record), read from the cache.
    let d = serve(&sock, &url, &cache, &enc);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "the encrypted cache after kill -9 and restart");
    drop(c);
    assert!(d.stop().success(), "a clean stop syncs");
    let st = status_encryption(&cache);
    assert!(st.contains("the local cache is encrypted") && !st.contains("plaintext"), "{st}");
    assert_eq!(found(&cache, &probes), Vec::<String>::new(), "plaintext in the encrypted cache after restart");

    // Written back: a fresh plaintext cache elsewhere reads every write.
    let d = serve(&sock, &url, &p("cache-f"), &key);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "written back from an encrypted cache");
    drop(c);
    assert!(d.stop().success());

    // Served without the flag, an encrypted cache stays encrypted.
    let mut d = serve(&sock, &url, &cache, &key);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "an encrypted cache served without the flag");
    let fork_write = common::pattern(96, 4096);
    c.write(7 << 20, &fork_write).unwrap();
    c.flush().unwrap();
    let mut want_fork = want.clone();
    want_fork[7 << 20..(7 << 20) + 4096].copy_from_slice(&fork_write);
    d.child.as_mut().unwrap().kill().unwrap();
    d.child.as_mut().unwrap().wait().unwrap();
    drop(c);
    assert_eq!(found(&cache, &[&fork_write[..32]]), Vec::<String>::new(), "served without the flag");

    // Export overlays the encrypted cache's changes.
    let out = p("export.raw");
    run_ok(&[
        "export",
        "--quiet",
        &url,
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--key-file",
        kf,
    ]);
    assert!(std::fs::read(&out).unwrap() == want_fork, "export with an encrypted cache");
    std::fs::remove_file(&out).unwrap();

    // Fork: the cache's changes become a new volume, encrypted under the
    // same data key (the parent's key opens it), and the re-tied cache
    // stays encrypted.
    let forked = format!("dir:{}", p("fork").display());
    run_ok(&["fork", &url, &forked, "--cache-dir", cache.to_str().unwrap(), "--key-file", kf]);
    let d = serve(&sock, &forked, &cache, &enc);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want_fork, "the fork through the re-tied encrypted cache");
    drop(c);
    assert!(d.stop().success());
    assert_eq!(found(&cache, &probes), Vec::<String>::new(), "plaintext in the cache after the fork");
    let d = serve(&sock, &forked, &p("cache-g"), &key);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want_fork, "the fork from a fresh cache");
    drop(c);
    assert!(d.stop().success());
    let mut remote_probes = probes.clone();
    remote_probes.push(&fork_write[..32]);
    assert_eq!(found(&p("fork"), &remote_probes), Vec::<String>::new(), "plaintext in the fork's folder");
    let info = run_ok(&["info", &forked, "--key-file", kf]);
    assert!(info.contains("encrypted"), "{info}");
}

/// What `driveblk status` of the cache in `dir` says of encryption.
fn status_encryption(dir: &Path) -> String {
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", "--cache-dir", dir.to_str().unwrap(), "--json"])).unwrap();
    st["encryption"].as_str().unwrap_or_default().to_string()
}

/// 32 random bytes (a key file).
fn rand_key() -> Vec<u8> {
    common::pattern(std::process::id() as u64, 32)
}
