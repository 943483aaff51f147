//! Encrypted volumes on Google Drive, end to end against the Drive API
//! emulator (docs/encryption.md): an encrypted volume imported to Drive is
//! served (with an encrypted SSD cache), written back, read by a second
//! host with the key and refused without it or with a wrong one, forked
//! (the fork stays encrypted and the parent's key opens it), and no byte
//! the emulator stores — any file, any revision, any unfinished upload —
//! holds the guest's data, while a plaintext volume in the same emulator
//! does (the control).

mod common;
mod gdrive_support;
mod tier_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gdrive_support::{start, Creds};

const SIZE: usize = 4 << 20;

fn read_all(c: &mut common::Client) -> Vec<u8> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < c.capacity {
        let n = (c.capacity - off).min(1 << 20) as usize;
        out.extend(c.read(off, n).expect("a guest read failed"));
        off += n as u64;
    }
    out
}

/// The names of stored objects holding one of `probes`.
fn holders(all: &[(String, Vec<u8>)], probes: &[&[u8]]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, b) in all {
        for (i, p) in probes.iter().enumerate() {
            if b.windows(p.len()).any(|w| w == *p) {
                out.push(format!("{name} holds probe {i}"));
            }
        }
    }
    out
}

#[test]
fn gdrive_encrypted_volume_serves_writes_back_forks_and_drive_holds_no_plaintext() {
    let env = start(driveemu::Config { latency: Duration::from_millis(2), ..Default::default() }, Creds::User);
    let dir = env.dir.path();
    let api = env.emu.base_url();
    let flags = ["--drive-api-url", api.as_str(), "--drive-credentials", env.creds_file.to_str().unwrap()];
    let keyfile = dir.join("key");
    std::fs::write(&keyfile, gdrive_support::data(5, 32)).unwrap();
    let wrongkey = dir.join("wrong");
    std::fs::write(&wrongkey, gdrive_support::data(6, 32)).unwrap();
    let kf = keyfile.to_str().unwrap();
    let run = |args: &[&str]| -> String {
        let o = Command::new(common::bin()).args(args).args(flags).output().unwrap();
        assert!(o.status.success(), "driveblk {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let sock = dir.join("sock");
    let serve = |url: &str, cache: &Path, extra: &[&str]| {
        let mut a = vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.extend_from_slice(&flags);
        common::Daemon::start(&sock, &a)
    };
    let serve_err = |url: &str, cache: &Path, extra: &[&str]| -> String {
        let mut a = vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.extend_from_slice(&flags);
        common::serve_fails(&sock, &a)
    };

    // The control: a plaintext volume's packs hold its image literally.
    let (plain_img, plain_bytes) = tier_support::raw_image(dir, "plain.raw", SIZE, 70);
    run(&["import", "--quiet", "--chunk-size", "256K", plain_img.to_str().unwrap(), "gdrive:/vms/plain"]);
    let found = holders(&env.emu.ui_all_bytes(), &[&plain_bytes[SIZE / 2..SIZE / 2 + 32]]);
    assert!(!found.is_empty(), "control: the plaintext volume's bytes are in the emulator");

    let (img, image) = tier_support::raw_image(dir, "disk.raw", SIZE, 71);
    let url = "gdrive:/vms/enc";
    run(&["import", "--quiet", "--chunk-size", "256K", "--encrypt", "--key-file", kf, img.to_str().unwrap(), url]);

    // Host A: serves with an encrypted cache, writes, syncs at stop.
    let secret = gdrive_support::data(72, 64 << 10);
    let small = gdrive_support::data(73, 1536);
    let mut want = image.clone();
    let d = serve(url, &dir.join("cache-a"), &["--key-file", kf, "--encrypt-cache"]);
    let mut c = common::Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "host A reads the imported image");
    for (off, b) in [(8192usize, &secret), ((1 << 20) + 512, &small), (SIZE - (64 << 10), &secret)] {
        c.write(off as u64, b).unwrap();
        want[off..off + b.len()].copy_from_slice(b);
    }
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success(), "host A stops cleanly (its final sync finished)");

    // Host B: without the key, or with a wrong one, refused at open;
    // with it, a fresh cache reads every write of host A.
    let err = serve_err(url, &dir.join("cache-b"), &[]);
    assert!(err.contains("encrypted") && err.contains("key"), "{err}");
    let err = serve_err(url, &dir.join("cache-b"), &["--key-file", wrongkey.to_str().unwrap()]);
    assert!(err.contains("does not open this volume"), "{err}");
    let mut d = serve(url, &dir.join("cache-b"), &["--key-file", kf]);
    let mut c = common::Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "host B reads host A's writes");

    // Fork: host B's unsaved changes (kill -9 after a flush) become a new
    // volume on Drive sharing the parent's packs and data key.
    let fork_write = gdrive_support::data(74, 8192);
    c.write(3 << 20, &fork_write).unwrap();
    c.flush().unwrap();
    let mut want_fork = want.clone();
    want_fork[3 << 20..(3 << 20) + 8192].copy_from_slice(&fork_write);
    d.child.as_mut().unwrap().kill().unwrap();
    d.child.as_mut().unwrap().wait().unwrap();
    drop(c);
    let forked = "gdrive:/vms/enc-fork";
    run(&["fork", url, forked, "--cache-dir", dir.join("cache-b").to_str().unwrap(), "--key-file", kf]);
    assert!(run(&["info", forked, "--key-file", kf]).contains("encrypted"), "the fork is encrypted");
    let err = serve_err(forked, &dir.join("cache-c"), &[]);
    assert!(err.contains("encrypted") && err.contains("key"), "{err}");
    let d = serve(forked, &dir.join("cache-c"), &["--key-file", kf]);
    let mut c = common::Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want_fork, "the fork, read with the parent's key on a third host");
    drop(c);
    assert!(d.stop().success());

    // Nothing the emulator stores holds the guest's bytes.
    let probes: Vec<&[u8]> = vec![
        &image[100_000..100_032],
        &image[SIZE - 100_000..SIZE - 100_000 + 32],
        &secret[..32],
        &secret[40_000..40_032],
        &small[1000..1032],
        &fork_write[..32],
    ];
    assert!(probes.iter().all(|p| p.iter().any(|&b| b != 0)), "probes of data, not of zeroes");
    let all = env.emu.ui_all_bytes();
    assert_eq!(holders(&all, &probes), Vec::<String>::new(), "plaintext stored on Drive");
    let sealed = all.iter().filter(|(_, b)| b.starts_with(b"DBE1")).count();
    assert!(sealed >= 6, "sealed objects on Drive: {sealed}");
}
