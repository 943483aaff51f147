//! Base images on Google Drive, against the Drive API emulator: a
//! `gdrive:file=` base is pinned by its head revision and checksum (that
//! revision marked keepForever), so renames change nothing and a replaced
//! file is never read as the volume's data; `adopt` copies the base into
//! the volume folder server-side so the original can go; and a volume is
//! found by id right after import, whatever the listings show.

mod common;
mod gdrive_support;
mod tier_support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use driveblk::remote::RetryPolicy;
use driveblk::tier::ExportOptions;
use driveblk::volume::{self, AttachOptions, RemoteOptions};
use gdrive_support::{start, Creds, DriveEnv};

fn remote_opts(env: &DriveEnv) -> RemoteOptions {
    RemoteOptions {
        layer: None,
        retry: RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(100),
            seed: Some(3),
            attempt_timeout: Duration::from_secs(60),
        },
        config: Arc::new(env.cfg.clone()),
        key: None,
        allow_base: Vec::new(),
    }
}

fn export(env: &DriveEnv, url: &str) -> Vec<u8> {
    let out = env.dir.path().join("out.img");
    let eo = ExportOptions { cache_dir: None, parallel: 4, progress: false, remote: remote_opts(env) };
    driveblk::tier::export(url, &out, &eo).unwrap();
    std::fs::read(&out).unwrap()
}

fn md5_hex(b: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(b))
}

#[test]
fn gdrive_base_is_pinned_to_its_revision() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(31, 3 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "win10.qcow2", &image);
    let rev0 = env.emu.ui_head_revision(&id).unwrap();
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env), image_format: None, encrypt: false };
    let url = "gdrive:/vms/pinned";
    let info = volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    let b = info.base.clone().unwrap();
    assert_eq!(b.revision.as_deref(), Some(rev0.as_str()));
    assert_eq!(b.md5.as_deref(), Some(md5_hex(&image).as_str()));
    assert!(b.sha256.is_some(), "{b:?}");
    assert_eq!(env.emu.ui_revision_kept(&id, &rev0), Some(true), "the pinned revision is kept forever");
    // A rename (a metadata change: `version` goes up) changes nothing.
    env.emu.ui_rename(&id, "renamed.qcow2");
    let i = volume::info_with(url, &remote_opts(&env)).unwrap();
    assert_eq!(i.base_note, None);
    assert!(export(&env, url) == image);
    // The content is replaced, and Drive purges the revisions it need not keep.
    env.emu.ui_replace_content(&id, &gdrive_support::data(32, 3 << 20));
    env.emu.ui_purge_revisions(&id);
    let i = volume::info_with(url, &remote_opts(&env)).unwrap();
    let note = i.base_note.unwrap_or_default();
    assert!(note.contains("replaced") && note.contains("driveblk adopt"), "{note}");
    let reads_before = env.emu.stats().requests.get("revisions.get media").copied().unwrap_or(0);
    assert!(export(&env, url) == image, "the volume reads the pinned revision, never the new content");
    assert!(env.emu.stats().requests.get("revisions.get media").copied().unwrap_or(0) > reads_before);
    // The pinned revision deleted (Manage versions): refused, saying what happened and what to do.
    env.emu.ui_delete_revision(&id, &rev0);
    let e = volume::info_with(url, &remote_opts(&env)).unwrap_err().to_string();
    assert!(e.contains("pinned revision is gone") && e.contains("Manage versions"), "{e}");
}

#[test]
fn gdrive_adopted_base_outlives_the_original() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(41, 3 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "base.img", &image);
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env), image_format: None, encrypt: false };
    let url = "gdrive:/vms/adopted";
    volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    let bytes_in = env.emu.stats().bytes_in;
    let info = volume::adopt(url, &remote_opts(&env)).unwrap();
    assert_eq!(info.generation, 2);
    assert!(info.base_note.unwrap_or_default().contains("adopted"));
    assert_eq!(env.emu.stats().requests.get("files.copy").copied(), Some(1), "server-side copy");
    assert!(env.emu.stats().bytes_in - bytes_in < 64 << 10, "no base bytes were uploaded");
    // Adopting again changes nothing.
    assert_eq!(volume::adopt(url, &remote_opts(&env)).unwrap().generation, 2);
    // The original goes: trashed, then deleted for good.
    env.emu.ui_trash(&id);
    assert!(export(&env, url) == image);
    env.emu.ui_delete(&id);
    assert!(export(&env, url) == image, "the adopted volume reads its own copy");
    // Another process (the CLI) reads it too.
    let out = env.dir.path().join("cli.img");
    let o = Command::new(env!("CARGO_BIN_EXE_driveblk"))
        .args(["export", "--quiet", url, out.to_str().unwrap()])
        .args(["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()])
        .env("XDG_CACHE_HOME", env.dir.path().join("xdg-cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == image);
}

/// A base replaced before `adopt`: the copy is made of the pinned
/// revision (through this host), never of the new content.
#[test]
fn gdrive_adopt_after_replacement_copies_the_pinned_revision() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(51, 2 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "base.img", &image);
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env), image_format: None, encrypt: false };
    let url = "gdrive:/vms/adopt-late";
    volume::attach(&format!("gdrive:file={id}"), url, &ao).unwrap();
    env.emu.ui_replace_content(&id, &gdrive_support::data(52, 2 << 20));
    volume::adopt(url, &remote_opts(&env)).unwrap();
    env.emu.ui_delete(&id);
    assert!(export(&env, url) == image);
}

/// Listings lag behind creates. A volume imported by one process opens
/// and reads at once in another process on the same host (a minute's lag
/// here): the folder and objects it created are found by id (files.get)
/// from the host's id record. Without the record, and without waiting,
/// the same open finds nothing — the lag is real. Another host (no
/// record; a 3 s lag) waits for the listing to show the volume, then
/// follows ids from the header: generation 1 at the slot the header names.
#[test]
fn gdrive_new_volume_opens_in_another_process_despite_lagging_listings() {
    let env = start(driveemu::Config { listing_lag: Duration::from_secs(60), ..Default::default() }, Creds::User);
    let (img, bytes) = tier_support::raw_image(env.dir.path(), "disk.raw", 2 << 20, 61);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_driveblk"))
            .args(args)
            .args(["--drive-api-url", &env.emu.base_url(), "--drive-credentials", env.creds_file.to_str().unwrap()])
            .env("XDG_CACHE_HOME", env.dir.path().join("host"))
            .output()
            .unwrap()
    };
    let o = run(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), "gdrive:/lag/vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = env.dir.path().join("out.raw");
    let o = run(&["export", "--quiet", "gdrive:/lag/vol", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes);
    // Elsewhere: no record, no patience.
    let mut other = remote_opts(&env);
    let mut cfg = env.cfg.clone();
    cfg.drive.pacer.rate = 9_001.0; // another DriveApi: nothing known
    cfg.drive.id_record = None;
    cfg.drive.open_grace = Duration::ZERO;
    other.config = Arc::new(cfg.clone());
    let e = volume::info_with("gdrive:/lag/vol", &other).unwrap_err();
    assert!(matches!(e, volume::VolumeError::NotFound { .. }), "{e}");
    // Another host, a few seconds' lag: it waits for the listing, then
    // follows ids (header -> generation 1 -> its successors).
    env.emu.faults().set_listing_lag(Duration::from_secs(3));
    let o = run(&["import", "--quiet", "--chunk-size", "256K", img.to_str().unwrap(), "gdrive:/lag2/vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    cfg.drive.pacer.rate = 9_002.0;
    cfg.drive.open_grace = Duration::from_secs(30);
    other.config = Arc::new(cfg);
    let eo = ExportOptions { cache_dir: None, parallel: 4, progress: false, remote: other };
    let out2 = env.dir.path().join("out2.raw");
    driveblk::tier::export("gdrive:/lag2/vol", &out2, &eo).unwrap();
    assert!(std::fs::read(&out2).unwrap() == bytes);
}

/// A boot asks for many neighbouring ranges at once, and Drive limits
/// requests per user: 64 adjacent 64 KiB reads of one file issued
/// together reach the emulator as a handful of requests and return the
/// same bytes. With merging off (window 0) each is a request of its own.
#[test]
fn gdrive_adjacent_reads_are_merged() {
    let env = start(driveemu::Config { latency: Duration::from_millis(2), ..Default::default() }, Creds::User);
    let data = gdrive_support::data(71, 4 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "big.img", &data);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let reads = |cfg: driveblk::remote::RemoteConfig| -> u64 {
        let url = driveblk::remote::RemoteUrl::parse(&format!("gdrive:file={id}")).unwrap();
        let (r, key) = url.object_with(&cfg);
        let before = env.emu.stats().requests.get("files.get media").copied().unwrap_or(0);
        let got = rt.block_on(futures::future::join_all((0..64u64).map(|i| {
            let (r, key) = (r.clone(), key.clone());
            async move { r.get_range(&key, i * 65536..(i + 1) * 65536).await.unwrap() }
        })));
        for (i, b) in got.iter().enumerate() {
            assert!(b[..] == data[i * 65536..(i + 1) * 65536], "read {i} differs");
        }
        env.emu.stats().requests.get("files.get media").copied().unwrap_or(0) - before
    };
    let merged = reads(env.cfg.clone());
    assert!(merged <= 4, "64 adjacent reads took {merged} requests");
    let mut off = env.cfg.clone();
    off.drive.read_merge.window = Duration::ZERO;
    off.drive.pacer.rate = 9_999.0; // another account config: its own counters
    assert_eq!(reads(off.clone()), 64);
    let (asked, sent, _) = driveblk::remote::gdrive::api_for(&env.cfg.drive).read_merge.snapshot();
    assert_eq!((asked, sent), (64, merged));
}

/// Calls `after` once a put of `key` has landed (a test hook in the
/// remote stack).
struct AfterPut {
    inner: driveblk::remote::DynRemote,
    key: &'static str,
    after: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for AfterPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait::async_trait]
impl driveblk::remote::Remote for AfterPut {
    async fn create_folder(&self) -> driveblk::remote::RemoteResult<()> {
        self.inner.create_folder().await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> driveblk::remote::RemoteResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(
        &self,
        key: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        let m = self.inner.put(key, body).await?;
        if key == self.key {
            (self.after)();
        }
        Ok(m)
    }
    async fn head(&self, key: &str) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> driveblk::remote::RemoteResult<Vec<driveblk::remote::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> driveblk::remote::RemoteResult<()> {
        self.inner.delete(key).await
    }
    async fn reserve(&self, key: &str) -> driveblk::remote::RemoteResult<Option<driveblk::remote::Slot>> {
        self.inner.reserve(key).await
    }
    async fn create(
        &self,
        key: &str,
        slot: Option<&driveblk::remote::Slot>,
        tag: &str,
        body: driveblk::remote::PutBody,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.inner.create(key, slot, tag, body).await
    }
    async fn head_created(
        &self,
        key: &str,
        slot: Option<&driveblk::remote::Slot>,
    ) -> driveblk::remote::RemoteResult<driveblk::remote::ObjectMeta> {
        self.inner.head_created(key, slot).await
    }
    async fn get_created(
        &self,
        key: &str,
        slot: Option<&driveblk::remote::Slot>,
    ) -> driveblk::remote::RemoteResult<bytes::Bytes> {
        self.inner.get_created(key, slot).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The header is listed but the generations are not yet (they were
/// created after it, and the listing lags): another host still opens the
/// volume, reading generation 1 at the slot the header names and following
/// slots from there — no listing of generations needed.
#[test]
fn gdrive_generations_found_by_id_from_the_header() {
    let env = start(driveemu::Config::default(), Creds::User);
    let (img, bytes) = tier_support::raw_image(env.dir.path(), "disk.raw", 1 << 20, 62);
    let mut opts = remote_opts(&env);
    // From the header on, new files stay out of listings for a minute.
    let faults = env.emu.fault_handle();
    let hook: Arc<dyn Fn() + Send + Sync> = Arc::new(move || faults.faults().set_listing_lag(Duration::from_secs(60)));
    opts.layer = Some(Arc::new(move |inner| {
        Arc::new(AfterPut { inner, key: "volume.json", after: hook.clone() }) as driveblk::remote::DynRemote
    }));
    let io = driveblk::volume::ImportOptions {
        chunk_size: 256 << 10,
        pack_size: 1 << 20,
        parallel_uploads: 2,
        progress: false,
        remote: opts,
        image_format: None,
        encrypt: false,
        subframes: true,
    };
    volume::import(&img, "gdrive:/byid/vol", &io).unwrap();
    let mut cfg = env.cfg.clone();
    cfg.drive.pacer.rate = 9_003.0; // another host: its own DriveApi, nothing known
    let mut other = remote_opts(&env);
    other.config = Arc::new(cfg);
    let i = volume::info_with("gdrive:/byid/vol", &other).unwrap();
    assert_eq!(i.generation, 1);
    let eo = ExportOptions { cache_dir: None, parallel: 4, progress: false, remote: other };
    let out = env.dir.path().join("byid.raw");
    driveblk::tier::export("gdrive:/byid/vol", &out, &eo).unwrap();
    assert!(std::fs::read(&out).unwrap() == bytes);
}

/// Write-back's packs are found by id too: a generation committed while
/// listings lag an hour behind creates is read at once on another host
/// (its own DriveApi, no id record, no patience for listings) — the
/// manifest names each new pack's file id. Without the ids the new pack is
/// invisible there and the export fails.
#[test]
fn gdrive_written_packs_found_by_id_on_another_host() {
    use driveblk::format::{IoMode, IoVec};
    use driveblk::tier::Storage;
    let env = start(driveemu::Config::default(), Creds::User);
    let (img, mut bytes) = tier_support::raw_image(env.dir.path(), "disk.raw", 1 << 20, 63);
    let io = driveblk::volume::ImportOptions {
        chunk_size: 256 << 10,
        pack_size: 1 << 20,
        parallel_uploads: 2,
        progress: false,
        remote: remote_opts(&env),
        image_format: None,
        encrypt: false,
        subframes: true,
    };
    volume::import(&img, "gdrive:/wpack/vol", &io).unwrap();
    // From now on nothing new shows in a listing for an hour.
    env.emu.faults().set_listing_lag(Duration::from_secs(3600));
    let mut o = tier_support::cache_opts(&env.dir.path().join("cache-a"), remote_opts(&env));
    o.boot_profile = driveblk::tier::boot::BootProfileMode::Off;
    let s = driveblk::tier::open_volume("gdrive:/wpack/vol", o).unwrap();
    let mut data = gdrive_support::data(64, 300 << 10);
    let off = 100 << 10;
    s.write_vectored_at(off, &IoVec::from_slice(&mut data), IoMode::Blocking).unwrap();
    bytes[off as usize..off as usize + data.len()].copy_from_slice(&data);
    let t = s.flush_point().unwrap();
    s.wait_durable(t).unwrap();
    assert_eq!(s.close(Duration::from_secs(60)), 0, "everything uploaded");
    drop(s);
    let mut cfg = env.cfg.clone();
    cfg.drive.pacer.rate = 9_004.0; // another host: its own DriveApi, nothing known
    cfg.drive.id_record = None;
    cfg.drive.open_grace = Duration::ZERO;
    let mut other = remote_opts(&env);
    other.config = Arc::new(cfg);
    let i = volume::info_with("gdrive:/wpack/vol", &other).unwrap();
    assert!(i.generation >= 2, "the write-back generation is found by id: {}", i.generation);
    let eo = ExportOptions { cache_dir: None, parallel: 4, progress: false, remote: other };
    let out = env.dir.path().join("wpack.raw");
    driveblk::tier::export("gdrive:/wpack/vol", &out, &eo).unwrap();
    assert!(std::fs::read(&out).unwrap() == bytes, "another host reads the written bytes");
}

/// An encrypted volume attached to a base on another store (a local file)
/// never adopts it: the copy would put the whole image on Drive in clear.
#[test]
fn gdrive_an_encrypted_volume_never_adopts_a_base_from_another_store() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(33, 2 << 20);
    let base = env.dir.path().join("base.raw");
    std::fs::write(&base, &image).unwrap();
    let keyf = env.dir.path().join("key");
    std::fs::write(&keyf, gdrive_support::data(34, 32)).unwrap();
    let mut ro = remote_opts(&env);
    ro.key = Some(Arc::new(driveblk::volume::crypto::KeySource::File(keyf).load().unwrap()));
    let ao = AttachOptions { chunk_size: 1 << 20, remote: ro.clone(), image_format: None, encrypt: true };
    let url = "gdrive:/vms/enc-attached";
    // A base on another store than the volume is read only when allowed.
    let base = format!("dir:{}", base.display());
    let e = volume::attach(&base, url, &ao).unwrap_err().to_string();
    assert!(e.contains("on another store") && e.contains(&format!("--allow-base {base}")), "{e}");
    ro.allow_base = vec![base.clone()];
    let ao = AttachOptions { remote: ro.clone(), ..ao };
    volume::attach(&base, url, &ao).unwrap();
    let e = volume::adopt(url, &ro).unwrap_err().to_string();
    assert!(e.contains("on another store") && e.contains("import --encrypt"), "{e}");
    assert!(env.emu.ui_find("base-").is_empty(), "a copy of the base reached Drive");
}

/// A file shared with this account to view: attach cannot pin its
/// revision, and says so with the way out before writing anything; the
/// copy the user makes in the web UI attaches and reads. A file whose
/// owner turned downloading off is refused by name, at attach and, for a
/// volume attached before, when the volume is opened (not at the guest's
/// first read of it).
#[test]
fn gdrive_base_this_account_may_only_view_is_refused_with_the_way_out() {
    let env = start(driveemu::Config::default(), Creds::User);
    let image = gdrive_support::data(61, 2 << 20);
    let root = env.emu.root_folder_id();
    let ao = AttachOptions { chunk_size: 1 << 20, remote: remote_opts(&env), image_format: None, encrypt: false };
    let id = env.emu.ui_upload(&root, "golden.img", &image);
    env.emu.ui_make_read_only(&id);
    let e = volume::attach(&format!("gdrive:file={id}"), "gdrive:/viewer/vm", &ao).unwrap_err().to_string();
    assert!(e.contains("may view the file but not keep its revisions") && e.contains("Make a"), "{e}");
    assert!(env.emu.ui_find("viewer").is_empty(), "nothing written: {:?}", env.emu.ui_find("viewer"));
    // The user's own copy ("Make a copy": Drive copies it on its side).
    let copy = env.emu.ui_upload(&root, "Copy of golden.img", &image);
    volume::attach(&format!("gdrive:file={copy}"), "gdrive:/viewer/vm", &ao).unwrap();
    assert!(export(&env, "gdrive:/viewer/vm") == image);

    // The owner turns downloading off for viewers and commenters.
    env.emu.ui_restrict_download(&id);
    let e = volume::attach(&format!("gdrive:file={id}"), "gdrive:/viewer/vm2", &ao).unwrap_err().to_string();
    assert!(e.contains("does not let this account download"), "{e}");
    // A volume attached while this account could: refused when opened.
    let team = env.emu.ui_upload(&root, "team.img", &image);
    volume::attach(&format!("gdrive:file={team}"), "gdrive:/viewer/team", &ao).unwrap();
    env.emu.ui_make_read_only(&team);
    env.emu.ui_restrict_download(&team);
    let e = volume::info_with("gdrive:/viewer/team", &remote_opts(&env)).unwrap_err().to_string();
    assert!(e.contains("does not let this account download"), "{e}");
}
