//! Encrypted volumes end to end (docs/encryption.md): the driveblk binary
//! on real `dir:` remotes, the guest's side through libblkio. A round trip
//! import → serve → write → sync → fresh cache → read back; the remote
//! folder holds none of the guest's bytes (while a plaintext volume given
//! the same writes does); a wrong or missing key fails at open with a
//! clear message; tampered ciphertext is an error, never data; `rekey`
//! moves the volume to a new key and the old one stops working.

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, run_ok, Client, Daemon};

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

/// Runs driveblk, expecting failure; returns its stderr.
fn run_err(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(bin()).args(args).envs(env.iter().copied()).output().unwrap();
    assert!(!out.status.success(), "driveblk {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn serve(sock: &Path, url: &str, cache: &Path, key: &[&str]) -> Daemon {
    let mut args = vec!["--volume", url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(key);
    Daemon::start(sock, &args)
}

/// Every file of the folder, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes the guest's secret (incompressible bytes, so a plaintext pack
/// holds them literally) and returns the expected disk.
fn guest_session(sock: &Path, url: &str, cache: &Path, key: &[&str], mut want: Vec<u8>, secret: &[u8]) -> Vec<u8> {
    let d = serve(sock, url, cache, key);
    let mut c = Client::connect(sock, 1);
    assert!(read_all(&mut c) == want, "cold read differs from the imported image");
    for off in [4096u64, 3 << 20, (SIZE as u64) - 65536] {
        c.write(off, secret).unwrap();
        want[off as usize..off as usize + secret.len()].copy_from_slice(secret);
    }
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    want
}

#[test]
fn encrypted_round_trip_and_the_remote_holds_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let want = common::make_raw(&img, SIZE, 7);
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, "correct horse battery staple\n").unwrap();
    let kf = keyfile.to_str().unwrap();
    let secret = common::pattern(99, 64 << 10);
    let sock = dir.path().join("sock");

    // The control: a plaintext volume given the same writes holds them
    // literally, so the search below would find them if they were there.
    let plain_url = format!("dir:{}/remote/plain", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", img.to_str().unwrap(), &plain_url]);
    guest_session(&sock, &plain_url, &dir.path().join("cache-p"), &[], want.clone(), &secret);
    let plain = files(&dir.path().join("remote/plain"));
    assert!(plain.iter().any(|(_, b)| contains(b, &secret[..64])), "control: the plaintext volume holds the write");
    assert!(plain.iter().any(|(_, b)| contains(b, &want[1 << 20..(1 << 20) + 64])), "control: and the image");

    let url = format!("dir:{}/remote/enc", dir.path().display());
    let info =
        run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kf, img.to_str().unwrap(), &url]);
    assert!(info.contains("encrypted   yes"), "{info}");
    // The guest's session keys from an environment variable this time.
    let key_env = ["--key-env", "VOLKEY"];
    std::env::set_var("VOLKEY", "correct horse battery staple");
    let want = guest_session(&sock, &url, &dir.path().join("cache-1"), &key_env, want, &secret);
    let st: serde_json::Value = serde_json::from_str(&run_ok(&[
        "status",
        "--cache-dir",
        dir.path().join("cache-1").to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert!(st["encryption"].as_str().unwrap_or("").starts_with("encrypted"), "{st}");
    assert!(st["generation"].as_u64().unwrap() >= 2, "the writes were committed: {st}");

    // Another machine: a fresh cache reads the guest's writes back.
    let d = serve(&sock, &url, &dir.path().join("cache-2"), &["--key-file", kf]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_all(&mut c) == want, "an encrypted volume read back differs");
    drop(c);
    assert!(d.stop().success());

    // What the remote holds: neither the image nor the guest's writes,
    // nor any manifest, lease or profile in clear; only the header says
    // what the folder is.
    let enc = files(&dir.path().join("remote/enc"));
    assert!(enc.iter().any(|(n, _)| n.starts_with("profile-")), "a boot profile was saved: {enc:?}");
    for (name, bytes) in &enc {
        for probe in
            [&secret[..32], &secret[40_000..40_032], &want[1 << 20..(1 << 20) + 32], &want[5 << 20..(5 << 20) + 32]]
        {
            assert!(!contains(bytes, probe), "{name} holds plaintext");
        }
        if name != "volume.json" && name != "README.txt" {
            assert_eq!(&bytes[..4], b"DBE1", "{name} is not sealed");
            for word in [&b"driveblk-"[..], b"sha256", b"\"generation\""] {
                assert!(!contains(bytes, word), "{name} shows {:?}", String::from_utf8_lossy(word));
            }
        }
    }
    let header = String::from_utf8(enc.iter().find(|(n, _)| n == "volume.json").unwrap().1.clone()).unwrap();
    assert!(header.contains("\"encryption\": \"aes-256-gcm\"") && header.contains("wrapped_key"), "{header}");

    // Maintenance works through the encryption: verify hashes every chunk,
    // gc deletes and repacks (new sealed packs), export reads it all back.
    run_ok(&["verify", &url, "--full", "--key-file", kf]);
    run_ok(&["gc", &url, "--keep-generations", "1", "--grace", "0s", "--force", "--key-file", kf]);
    run_ok(&["verify", &url, "--full", "--key-file", kf]);
    let out = dir.path().join("export.raw");
    run_ok(&["export", "--quiet", &url, out.to_str().unwrap(), "--key-file", kf]);
    assert!(std::fs::read(&out).unwrap() == want, "export after gc differs");
}

#[test]
fn wrong_or_missing_key_fails_at_open_and_rekey_moves_the_volume_to_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_raw(&img, 1 << 20, 3);
    let (old, new, wrong) = (dir.path().join("old"), dir.path().join("new"), dir.path().join("wrong"));
    std::fs::write(&old, "the old key, a long one").unwrap();
    std::fs::write(&new, rand::random::<[u8; 32]>()).unwrap();
    std::fs::write(&wrong, "not the key at all").unwrap();
    let (old, new, wrong) = (old.to_str().unwrap(), new.to_str().unwrap(), wrong.to_str().unwrap());
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", old, img.to_str().unwrap(), &url]);

    let e = run_err(&["info", &url], &[]);
    assert!(e.contains("is encrypted") && e.contains("--key-file"), "{e}");
    let e = run_err(&["info", &url, "--key-file", wrong], &[]);
    assert!(e.contains("does not open this volume"), "{e}");
    // serve refuses at open, before any guest sees a byte.
    let cache = dir.path().join("cache");
    let sock = dir.path().join("sock");
    let e = run_err(
        &[
            "serve",
            "--socket",
            sock.to_str().unwrap(),
            "--volume",
            &url,
            "--cache-dir",
            cache.to_str().unwrap(),
            "--key-file",
            wrong,
        ],
        &[],
    );
    assert!(e.contains("does not open this volume"), "{e}");
    assert!(run_ok(&["info", &url, "--key-file", old]).contains("encrypted   yes"));

    // Rekey: only volume.json changes; the new key opens, the old does not.
    let before = files(&dir.path().join("remote/vol"));
    let out = run_ok(&["rekey", &url, "--key-file", old, "--new-key-file", new]);
    assert!(out.contains("only volume.json"), "{out}");
    let after = files(&dir.path().join("remote/vol"));
    assert_eq!(before.len(), after.len());
    for ((n1, b1), (n2, b2)) in before.iter().zip(&after) {
        assert_eq!(n1, n2);
        assert_eq!(b1 == b2, n1 != "volume.json", "{n1}");
    }
    let e = run_err(&["info", &url, "--key-file", old], &[]);
    assert!(e.contains("does not open this volume"), "{e}");
    assert!(run_ok(&["info", &url, "--key-file", new]).contains("encrypted   yes"));
    let e = run_err(&["rekey", &url, "--key-file", wrong, "--new-key-file", old], &[]);
    assert!(e.contains("does not open this volume"), "{e}");
    // A plaintext volume has nothing to rekey.
    let purl = format!("dir:{}/remote/plain", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", img.to_str().unwrap(), &purl]);
    assert!(run_err(&["rekey", &purl, "--key-file", old, "--new-key-file", new], &[]).contains("not encrypted"));
}

#[test]
fn tampered_ciphertext_is_an_error_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let want = common::make_raw(&img, SIZE, 11);
    let kf = dir.path().join("key");
    std::fs::write(&kf, "tamper test key").unwrap();
    let kf = kf.to_str().unwrap();
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kf, img.to_str().unwrap(), &url]);
    let folder = dir.path().join("remote/vol");
    let pack = files(&folder).into_iter().find(|(n, _)| n.starts_with("pack-")).unwrap().0;
    let mut bytes = std::fs::read(folder.join(&pack)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01; // one bit: still decompresses if not authenticated
    std::fs::write(folder.join(&pack), &bytes).unwrap();

    let sock = dir.path().join("sock");
    let cache = dir.path().join("cache");
    let d = serve(&sock, &url, &cache, &["--key-file", kf, "--boot-profile", "off"]);
    let mut c = Client::connect(&sock, 1);
    let mut errors = 0;
    let mut off = 0u64;
    while off < c.capacity {
        match c.read(off, 1 << 20) {
            Ok(got) => assert!(got == want[off as usize..off as usize + (1 << 20)], "wrong data at {off}"),
            Err(_) => errors += 1,
        }
        off += 1 << 20;
    }
    assert!((1..=2).contains(&errors), "the tampered chunk (or the two sharing its block) fails: {errors}");
    drop(c);
    assert!(d.stop().success());

    // A tampered manifest: the volume does not open.
    let gen = files(&folder).into_iter().find(|(n, _)| n.starts_with("gen-")).unwrap().0;
    let mut g = std::fs::read(folder.join(&gen)).unwrap();
    let n = g.len();
    g[n - 20] ^= 0x80;
    std::fs::write(folder.join(&gen), &g).unwrap();
    let e = run_err(&["info", &url, "--key-file", kf], &[]);
    assert!(e.contains("decryption failed"), "{e}");
}

/// `driveblk serve ARGS` with `env`, which must fail; returns its stderr.
fn serve_fails_env(sock: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(bin())
        .args(["serve", "--socket", sock.to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = common::wait_timeout(&mut child, std::time::Duration::from_secs(60));
    assert!(!st.success(), "serve {args:?} succeeded");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// The remote's operator (whom encryption is against) replaces the header
/// of an encrypted volume with a plaintext one — same id and chunk size;
/// nothing authenticates it — and the newest manifest with a plaintext one
/// (its checksum is a plain sha256). Opened as it says, write-back would
/// upload the cache's unsaved writes, and every later one, in clear. A
/// host given the key refuses it; so does one that holds a cache of the
/// volume and no key (the cache's copy of the header remembers), with the
/// key from DRIVEBLK_KEY_FILE or without; export with that cache too. Each
/// refusal comes before anything is written: the folder is unchanged.
#[test]
fn a_header_swapped_to_plaintext_is_refused_before_anything_is_written() {
    use driveblk::volume::format::{gen_key, parse_gen_key, Manifest, VolumeHeader};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_raw(&img, SIZE, 5);
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, "the downgrade test key").unwrap();
    let kf = keyfile.to_str().unwrap();
    let url = format!("dir:{}/remote/vol", dir.path().display());
    let folder = dir.path().join("remote/vol");
    run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kf, img.to_str().unwrap(), &url]);

    // A session that leaves writes in the cache: a kill -9 after a flush
    // and after one more write.
    let (sock, cache) = (dir.path().join("sock"), dir.path().join("cache"));
    let cache_s = cache.to_str().unwrap();
    let mut d = serve(&sock, &url, &cache, &["--key-file", kf]);
    let mut c = Client::connect(&sock, 1);
    let secret = common::pattern(77, 64 << 10);
    c.write(1 << 20, &secret).unwrap();
    c.flush().unwrap();
    c.write(4 << 20, &secret).unwrap();
    d.child.as_mut().unwrap().kill().unwrap();
    d.child.as_mut().unwrap().wait().unwrap();
    drop(c);

    // The forgery: a plaintext header and an empty plaintext manifest as
    // the newest generation.
    let mut header = VolumeHeader::from_bytes(&std::fs::read(folder.join("volume.json")).unwrap()).unwrap();
    header.encryption = "none".into();
    header.crypto = None;
    std::fs::write(folder.join("volume.json"), header.to_bytes()).unwrap();
    let newest = files(&folder).iter().filter_map(|(n, _)| parse_gen_key(n)).max().unwrap();
    std::fs::write(folder.join(gen_key(newest)), Manifest::new(&header, newest).to_bytes()).unwrap();
    let before = files(&folder);
    let untouched = |what: &str| {
        let now = files(&folder);
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&now), names(&before), "{what}: objects appeared or went");
        assert!(now == before, "{what}: an object of the folder changed");
    };
    let args = ["--volume", &url, "--format", "raw", "--cache-dir", cache_s];

    // Given the key: the header says plaintext, the user says encrypted.
    let e = serve_fails_env(&sock, &[&args[..], &["--key-file", kf][..]].concat(), &[]);
    assert!(e.contains("says it is not encrypted") && e.contains("a key was given"), "{e}");
    untouched("serve --key-file");
    // No key: the cache's copy of the header says encrypted.
    let e = serve_fails_env(&sock, &args, &[]);
    assert!(e.contains("says it is not encrypted") && e.contains("nothing was written"), "{e}");
    untouched("serve without a key");
    // The key only in DRIVEBLK_KEY_FILE (maybe set for every volume): a
    // warning, and the cache's refusal.
    let e = serve_fails_env(&sock, &args, &[("DRIVEBLK_KEY_FILE", kf)]);
    assert!(e.contains("DRIVEBLK_KEY_FILE") && e.contains("nothing was written"), "{e}");
    untouched("serve with DRIVEBLK_KEY_FILE");
    let out = dir.path().join("export.raw");
    let e = run_err(&["export", "--quiet", &url, out.to_str().unwrap(), "--cache-dir", cache_s], &[]);
    assert!(e.contains("says it is not encrypted") && e.contains("nothing was written"), "{e}");
    assert!(!out.exists());
    untouched("export with the cache");
}

/// A key given by a flag for a plaintext volume is refused (whoever can
/// write the folder can make any volume's header say plaintext); a key
/// from DRIVEBLK_KEY_FILE, which may be set for every volume, is not used,
/// with a warning. `import` with a key but without --encrypt is refused
/// before anything is created: the user meant an encrypted volume.
#[test]
fn a_key_given_for_a_plaintext_volume_is_refused_unless_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_raw(&img, 1 << 20, 4);
    let kf = dir.path().join("key");
    std::fs::write(&kf, "a key for another volume").unwrap();
    let kf = kf.to_str().unwrap();
    let url = format!("dir:{}/remote/plain", dir.path().display());
    let e = run_err(&["import", "--quiet", "--format", "raw", "--key-file", kf, img.to_str().unwrap(), &url], &[]);
    assert!(e.contains("--encrypt"), "{e}");
    assert!(!dir.path().join("remote/plain/volume.json").exists(), "nothing was created");
    run_ok(&["import", "--quiet", "--format", "raw", img.to_str().unwrap(), &url]);
    let e = run_err(&["info", &url, "--key-file", kf], &[]);
    assert!(e.contains("says it is not encrypted") && e.contains("a key was given"), "{e}");
    let out = Command::new(bin()).args(["info", &url]).env("DRIVEBLK_KEY_FILE", kf).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("encrypted   no"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DRIVEBLK_KEY_FILE") && log.contains("not encrypted"), "{log}");
}

/// An offline start of an encrypted volume uses the cache's copy of the
/// manifest only sealed: a copy in clear (never written for an encrypted
/// volume) is refused, naming the file.
#[test]
fn an_offline_manifest_copy_in_clear_is_refused_for_an_encrypted_volume() {
    use driveblk::volume::crypto::{CryptoHeader, UserKey, VolumeKey};
    use driveblk::volume::{RemoteOptions, VolumeHeader, VolumeReader};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_raw(&img, 1 << 20, 6);
    let secret = "the offline test key";
    let kf = dir.path().join("key");
    std::fs::write(&kf, secret).unwrap();
    let kf = kf.to_str().unwrap();
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kf, img.to_str().unwrap(), &url]);
    let (sock, cache) = (dir.path().join("sock"), dir.path().join("cache"));
    let d = serve(&sock, &url, &cache, &["--key-file", kf]);
    let mut c = Client::connect(&sock, 1);
    c.read(0, 4096).unwrap();
    drop(c);
    assert!(d.stop().success());

    let u = driveblk::remote::RemoteUrl::parse(&url).unwrap();
    let user = std::sync::Arc::new(UserKey::new(secret.as_bytes().to_vec(), "test".into()).unwrap());
    let opts = RemoteOptions { key: Some(user.clone()), ..Default::default() };
    VolumeReader::open_offline(&u, &cache, &opts).expect("the sealed copy opens");
    let header = VolumeHeader::from_bytes(&std::fs::read(cache.join("volume.json")).unwrap()).unwrap();
    let ch: CryptoHeader = serde_json::from_value(header.crypto.unwrap()).unwrap();
    let key = VolumeKey::unwrap(&ch, &user).unwrap();
    let manifest = cache.join("manifest");
    let plain = key.open_local("manifest", &std::fs::read(&manifest).unwrap()).unwrap();
    std::fs::write(&manifest, plain).unwrap();
    let e = VolumeReader::open_offline(&u, &cache, &opts).unwrap_err().to_string();
    assert!(e.contains(&manifest.display().to_string()) && e.contains("not sealed"), "{e}");
}

/// A key file others may read is used, with a warning naming the fix.
#[test]
fn a_key_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    common::make_raw(&img, 1 << 20, 8);
    let kf = dir.path().join("key");
    std::fs::write(&kf, "the permissions test key").unwrap();
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let kfs = kf.to_str().unwrap();
    let url = format!("dir:{}/remote/vol", dir.path().display());
    run_ok(&["import", "--quiet", "--format", "raw", "--encrypt", "--key-file", kfs, img.to_str().unwrap(), &url]);
    let info = |what: &str| {
        let out = Command::new(bin()).args(["info", &url, "--key-file", kfs]).output().unwrap();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = info("0644");
    assert!(log.contains("chmod 600") && log.contains(kfs), "{log}");
    std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = info("0600");
    assert!(!log.contains("chmod 600"), "{log}");
}
