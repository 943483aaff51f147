//! The `gdrive:` backend against the Drive API emulator: the Remote trait's
//! semantics (put/replace, ranged reads, list, delete, reserve + fenced
//! create, tags, head_created past a lagging listing), duplicate names,
//! a `gdrive:file=` base, and the error classes (quota, revoked grant).

mod gdrive_support;
mod net_support;

use std::time::Duration;

use bytes::Bytes;
use driveblk::remote::{content_tag, DynRemote, PutBody, RemoteError, RemoteUrl, Slot};
use gdrive_support::{data, start, Creds};

fn folder(env: &gdrive_support::DriveEnv, url: &str) -> DynRemote {
    RemoteUrl::parse(url).unwrap().folder_with(&env.cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_put_get_list_delete_conformance() {
    let env = start(driveemu::Config::default(), Creds::User);
    let r = folder(&env, "gdrive:/vms/sub/vol");
    // Reading a volume that does not exist creates nothing.
    assert!(r.list("").await.unwrap().is_empty());
    assert!(r.head("volume.json").await.unwrap_err().is_not_found());
    assert_eq!(env.emu.stats().requests.get("files.create").copied().unwrap_or(0), 0);

    let small = data(1, 1000);
    r.create_folder().await.unwrap();
    let m = r.put("pack-1", PutBody::from_bytes(small.clone())).await.unwrap();
    assert_eq!(m.size, 1000);
    assert!(m.created_ms.is_some() && m.version.is_some());
    assert_eq!(&r.get_range("pack-1", 10..20).await.unwrap()[..], &small[10..20]);
    // Cut at the end; past the end is empty.
    assert_eq!(&r.get_range("pack-1", 990..2000).await.unwrap()[..], &small[990..]);
    assert!(r.get_range("pack-1", 1000..1010).await.unwrap().is_empty());
    assert_eq!(&r.get("pack-1").await.unwrap()[..], &small[..]);

    // A large body goes up resumably in 256 KiB chunks, md5 checked.
    let big = data(2, (1 << 20) + 12345);
    let m = r.put("pack-2", PutBody::from_bytes(big.clone())).await.unwrap();
    assert_eq!(m.size, big.len() as u64);
    assert_eq!(&r.get_range("pack-2", 300_000..700_000).await.unwrap()[..], &big[300_000..700_000]);
    assert!(env.emu.stats().requests.keys().any(|k| k.contains("resumable")), "{:?}", env.emu.stats().requests);

    // Empty objects read without a Range.
    r.put("empty", PutBody::from_bytes(Vec::new())).await.unwrap();
    assert!(r.get("empty").await.unwrap().is_empty());
    assert!(r.get_range("empty", 0..10).await.unwrap().is_empty());

    // A put to an existing key replaces it (one file, new content).
    let v2 = data(3, 500);
    r.put("pack-1", PutBody::from_bytes(v2.clone())).await.unwrap();
    assert_eq!(&r.get("pack-1").await.unwrap()[..], &v2[..]);
    // Another process (no cache) sees the same single object.
    let other = folder(&env, "gdrive:/vms/sub/vol");
    let keys: Vec<_> = other.list("pack-").await.unwrap().into_iter().map(|m| (m.key, m.size)).collect();
    assert_eq!(keys, vec![("pack-1".to_string(), 500), ("pack-2".to_string(), big.len() as u64)]);
    assert_eq!(&other.get_range("pack-1", 0..500).await.unwrap()[..], &v2[..]);

    r.delete("pack-1").await.unwrap();
    r.delete("pack-1").await.unwrap();
    assert!(other.head("pack-1").await.unwrap_err().is_not_found());
    assert!(other.get_range("pack-1", 0..1).await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_create_at_a_slot_is_the_fence_and_seen_before_listings() {
    let emu_cfg = driveemu::Config { listing_lag: Duration::from_secs(30), ..Default::default() };
    let env = start(emu_cfg, Creds::ServiceAccount);
    // A folder made long ago (the listing shows it), so the other host
    // finds it; the objects in it are new.
    let vols = env.emu.ui_create_folder(&env.emu.root_folder_id(), "vols");
    env.emu.ui_create_folder(&vols, "fenced");
    let a = folder(&env, "gdrive:/vols/fenced");
    // Another host: its own connection, knowing nothing this one wrote.
    let mut other_host = env.cfg.clone();
    other_host.drive.pacer.rate += 1.0;
    let b = RemoteUrl::parse("gdrive:/vols/fenced").unwrap().folder_with(&other_host);
    let slot = a.reserve("gen-2").await.unwrap().expect("Drive needs slots");
    assert!(b.head_created("gen-2", Some(&slot)).await.unwrap_err().is_not_found());
    let (ba, bb) = (b"manifest A".to_vec(), b"manifest B".to_vec());
    let (ta, tb) = (content_tag(&ba), content_tag(&bb));
    let m = a.create("gen-2", Some(&slot), &ta, PutBody::from_bytes(ba.clone())).await.unwrap();
    assert_eq!(m.tag.as_deref(), Some(ta.as_str()));
    // The second writer at the same slot loses and learns the winner's tag.
    match b.create("gen-2", Some(&slot), &tb, PutBody::from_bytes(bb)).await.unwrap_err() {
        RemoteError::AlreadyExists { tag, .. } => assert_eq!(tag.as_deref(), Some(ta.as_str())),
        e => panic!("expected AlreadyExists, got {e}"),
    }
    // The listing lags, files.get by id does not.
    assert!(b.list("gen-").await.unwrap().is_empty(), "the emulator's listing lag is on");
    let h = b.head_created("gen-2", Some(&slot)).await.unwrap();
    assert_eq!((h.size, h.tag.as_deref()), (ba.len() as u64, Some(ta.as_str())));
    assert_eq!(&b.get_created("gen-2", Some(&slot)).await.unwrap()[..], &ba[..]);
    // A retried create of the same bytes is recognised as its own by the retry wrapper.
    let retrying = driveblk::remote::RetryingRemote::wrap(a.clone(), driveblk::remote::RetryPolicy::fast());
    let m = retrying.create("gen-2", Some(&slot), &ta, PutBody::from_bytes(ba.clone())).await.unwrap();
    assert_eq!(m.tag.as_deref(), Some(ta.as_str()));
    // A trashed file counts as not created.
    let slot3 = a.reserve("gen-3").await.unwrap().unwrap();
    a.create("gen-3", Some(&slot3), &ta, PutBody::from_bytes(ba.clone())).await.unwrap();
    env.emu.ui_trash(&slot3.0);
    assert!(b.head_created("gen-3", Some(&slot3)).await.unwrap_err().is_not_found());
    // A slot nobody created at stays NotFound.
    assert!(b.head_created("gen-9", Some(&Slot("unusedid123".into()))).await.unwrap_err().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_duplicate_names_are_reported_with_their_ids() {
    let env = start(driveemu::Config::default(), Creds::User);
    let root = env.emu.root_folder_id();
    let vols = env.emu.ui_create_folder(&root, "dups");
    let v1 = env.emu.ui_create_folder(&vols, "vol");
    let f1 = env.emu.ui_upload(&v1, "gen-1", b"one");
    let f2 = env.emu.ui_upload(&v1, "gen-1", b"two");
    let r = folder(&env, "gdrive:/dups/vol");
    r.create_folder().await.unwrap();
    for e in [r.list("gen-").await.unwrap_err(), r.head("gen-1").await.unwrap_err()] {
        let msg = e.to_string();
        assert!(msg.contains(&f1) && msg.contains(&f2), "{msg}");
        assert!(!e.is_retryable());
    }
    // A duplicated folder name is refused the same way, never guessed.
    let v2 = env.emu.ui_create_folder(&vols, "vol");
    let e = folder(&env, "gdrive:/dups/vol").list("").await.unwrap_err();
    assert!(e.to_string().contains(&v1) && e.to_string().contains(&v2), "{e}");
}

/// Drive's `name =` ignores case: a folder or file whose name differs only
/// in case (a user's own `vms` beside the volume's `VMs`) is another one,
/// never used for it nor counted as its duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_names_that_differ_in_case_are_other_names() {
    let env = start(driveemu::Config::default(), Creds::User);
    let root = env.emu.root_folder_id();
    // The user's own `vms/vol/gen-1`.
    let theirs = env.emu.ui_create_folder(&root, "vms");
    let their_vol = env.emu.ui_create_folder(&theirs, "vol");
    let their_gen = env.emu.ui_upload(&their_vol, "gen-1", b"the user's own");
    let r = folder(&env, "gdrive:/VMs/vol");
    r.create_folder().await.unwrap();
    assert!(r.list("").await.unwrap().is_empty(), "the user's `vms` is not `VMs`");
    r.put("gen-1", PutBody::from_bytes(b"one".to_vec())).await.unwrap();
    assert_eq!(env.emu.ui_content(&their_gen).unwrap(), b"the user's own");
    assert_eq!(&folder(&env, "gdrive:/VMs/vol").get("gen-1").await.unwrap()[..], b"one");
    // A file named `GEN-1` beside `gen-1` is neither it nor its duplicate.
    env.emu.ui_upload(&their_vol, "GEN-1", b"other");
    let fresh = folder(&env, "gdrive:/vms/vol");
    assert_eq!(&fresh.get("gen-1").await.unwrap()[..], b"the user's own");
    let keys: Vec<String> = fresh.list("gen-").await.unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, vec!["gen-1".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_file_id_base_reads_and_pins_content() {
    let env = start(driveemu::Config::default(), Creds::User);
    let root = env.emu.root_folder_id();
    let image = data(7, 3 << 20);
    let id = env.emu.ui_upload(&root, "win10.qcow2", &image);
    let (base, key) = RemoteUrl::parse(&format!("gdrive:file={id}")).unwrap().object_with(&env.cfg);
    assert_eq!(key, id);
    let m = base.head(&key).await.unwrap();
    assert_eq!(m.size, image.len() as u64);
    assert_eq!(&base.get_range(&key, 1_000_000..1_004_096).await.unwrap()[..], &image[1_000_000..1_004_096]);
    // Renaming does not change the pinned version; replacing the content does.
    env.emu.ui_rename(&id, "renamed.qcow2");
    assert_eq!(base.head(&key).await.unwrap().version, m.version);
    env.emu.ui_replace_content(&id, &data(8, 3 << 20));
    assert_ne!(base.head(&key).await.unwrap().version, m.version);
    // Never written.
    assert!(!base.put(&key, PutBody::from_bytes(Bytes::from_static(b"x"))).await.unwrap_err().is_retryable());
    // The same file by path.
    let (by_path, k) = RemoteUrl::parse("gdrive:/renamed.qcow2").unwrap().object_with(&env.cfg);
    assert_eq!(by_path.head(&k).await.unwrap().size, image.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_quota_and_revoked_grant_are_classified() {
    let env = start(driveemu::Config::default(), Creds::User);
    let r = folder(&env, "gdrive:/q/vol");
    r.create_folder().await.unwrap();
    r.put("a", PutBody::from_bytes(data(1, 100))).await.unwrap();
    env.emu.faults().set_storage_quota(Some(10));
    let e = r.put("b", PutBody::from_bytes(data(2, 1000))).await.unwrap_err();
    assert!(matches!(e, RemoteError::Quota { .. }), "{e}");
    assert!(e.is_pause() && e.to_string().contains("storageQuotaExceeded"), "{e}");
    env.emu.faults().set_storage_quota(None);
    env.emu.faults().set_daily_upload_cap(Some(10));
    let e = r.put("c", PutBody::from_bytes(data(3, 1000))).await.unwrap_err();
    assert!(matches!(e, RemoteError::Quota { .. }), "{e}");
    env.emu.faults().set_daily_upload_cap(None);
    env.emu.faults().set_download_quota_exceeded(true);
    let e = r.get_range("a", 0..10).await.unwrap_err();
    assert!(matches!(e, RemoteError::Quota { .. }), "{e}");
    env.emu.faults().set_download_quota_exceeded(false);

    // Revoked grant: the next refresh answers invalid_grant.
    env.emu.faults().revoke_refresh_tokens();
    env.emu.faults().expire_tokens_now();
    let e = r.get_range("a", 0..10).await.unwrap_err();
    assert!(matches!(e, RemoteError::Auth { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("invalid_grant") && msg.contains("auth login"), "{msg}");
    let secret = std::fs::read_to_string(&env.creds_file).unwrap();
    let v: serde_json::Value = serde_json::from_str(&secret).unwrap();
    for s in ["refresh_token", "client_secret"] {
        assert!(!msg.contains(v[s].as_str().unwrap()), "{s} leaked into {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_short_token_lifetime_is_refreshed() {
    let emu_cfg = driveemu::Config { token_lifetime: Duration::from_secs(2), ..Default::default() };
    let env = start(emu_cfg, Creds::User);
    let r = folder(&env, "gdrive:/t/vol");
    r.create_folder().await.unwrap();
    r.put("a", PutBody::from_bytes(data(1, 100))).await.unwrap();
    // Tokens expire early (a 2 s lifetime is inside the refresh margin, and
    // expire_tokens_now invalidates one we still trust): both are renewed.
    env.emu.faults().expire_tokens_now();
    assert_eq!(r.get_range("a", 0..100).await.unwrap().len(), 100);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(r.get_range("a", 0..100).await.unwrap().len(), 100);
}

/// `n` reads of object "x" sent at once: how many failed, and how long all took.
async fn read_at_once(r: &DynRemote, n: usize) -> (usize, Duration) {
    let t0 = std::time::Instant::now();
    let reads = (0..n).map(|_| {
        let r = r.clone();
        async move { r.get_range("x", 0..10).await }
    });
    let results = futures::future::join_all(reads).await;
    (results.iter().filter(|r| r.is_err()).count(), t0.elapsed())
}

/// The pacer keeps one account under Drive's per-user request limit: set
/// to the emulator's limit, a burst of parallel requests draws no
/// rate-limit answer; with pacing off, the same burst does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_pacer_keeps_under_the_per_user_limit() {
    use driveblk::remote::config::PacerConfig;
    let limit = driveemu::RateLimit { per_second: 50.0, burst: 20 };
    let emu_cfg = driveemu::Config { rate_limit: Some(limit), ..Default::default() };
    let mut env = start(emu_cfg, Creds::User);
    // Every read a request of its own (merging would make the 100 one).
    env.cfg.drive.read_merge.window = Duration::ZERO;
    let burst = |env: &gdrive_support::DriveEnv, url: &'static str| {
        let r = folder(env, url);
        async move {
            r.create_folder().await.unwrap();
            r.put("x", PutBody::from_bytes(data(1, 10))).await.ok();
            read_at_once(&r, 100).await
        }
    };
    // Paced at 90% of the limit.
    env.cfg.drive.pacer = PacerConfig::fixed(45.0, 15);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (failed, took) = burst(&env, "gdrive:/paced/vol").await;
    let st = env.emu.stats();
    assert_eq!((failed, st.rate_limited_403 + st.rate_limited_429), (0, 0), "{st:?}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    // Unpaced: Drive pushes back.
    env.cfg.drive.pacer = PacerConfig::fixed(100_000.0, 100_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (failed, _) = burst(&env, "gdrive:/unpaced/vol").await;
    let st = env.emu.stats();
    assert!(failed > 0 && st.rate_limited_403 + st.rate_limited_429 > 0, "{st:?}");
}

/// Started well under an account's real limit, the pacer climbs while reads
/// queue behind it and settles under the limit once Drive refuses: a queue
/// of reads ends far sooner than at the starting rate, every read lands
/// (the refusals are retried), and Drive refused only a few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_pacer_finds_a_limit_above_its_start() {
    use driveblk::remote::config::PacerConfig;
    use driveblk::remote::{RetryPolicy, RetryingRemote};
    let limit = driveemu::RateLimit { per_second: 50.0, burst: 20 };
    let mut env = start(driveemu::Config { rate_limit: Some(limit), ..Default::default() }, Creds::User);
    env.cfg.drive.read_merge.window = Duration::ZERO;
    env.cfg.drive.pacer = PacerConfig { rate: 5.0, burst: 5, max_rate: 200.0 };
    let r = RetryingRemote::wrap(folder(&env, "gdrive:/climb/vol"), RetryPolicy::default());
    r.create_folder().await.unwrap();
    r.put("x", PutBody::from_bytes(data(1, 10))).await.unwrap();
    let (failed, took) = read_at_once(&r, 400).await;
    assert_eq!(failed, 0);
    // At the starting 5/s the 400 reads take 80 s.
    assert!(took < Duration::from_secs(30), "{took:?}");
    let st = env.emu.stats();
    let refused = st.rate_limited_403 + st.rate_limited_429;
    assert!((1..=40).contains(&refused), "{st:?}");
}

/// An upload whose session expires mid-way (404) starts a new session and
/// still lands whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_upload_restarts_when_its_session_is_gone() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let env = Arc::new(start(driveemu::Config::default(), Creds::User));
    let r = folder(&env, "gdrive:/sess/vol");
    r.create_folder().await.unwrap();
    let body = data(11, (1 << 20) + 7);
    let sessions = Arc::new(AtomicU32::new(0));
    let (e2, b2, s2) = (env.clone(), Bytes::from(body.clone()), sessions.clone());
    let put_body = PutBody::from_stream_fn(Some(body.len() as u64), move || {
        let first = s2.fetch_add(1, Ordering::SeqCst) == 0;
        let (env, b) = (e2.clone(), b2.clone());
        let parts: Vec<Bytes> = b.chunks(300 << 10).map(Bytes::copy_from_slice).collect();
        Box::pin(futures::stream::iter(parts.into_iter().enumerate().map(move |(i, p)| {
            // The first session expires once two chunks are on their way.
            if first && i == 2 {
                env.emu.faults().expire_upload_sessions();
            }
            Ok(p)
        })))
    });
    let m = r.put("pack-big", put_body).await.unwrap();
    assert_eq!(m.size, body.len() as u64);
    assert_eq!(sessions.load(Ordering::SeqCst), 2, "one restart");
    assert_eq!(&r.get("pack-big").await.unwrap()[..], &body[..]);
}

/// Files Drive flags as abusive are read with acknowledgeAbuse, by range and whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_abusive_flag_is_acknowledged() {
    let env = start(driveemu::Config::default(), Creds::User);
    let body = data(12, 5000);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "flagged.img", &body);
    env.emu.ui_flag_abuse(&id);
    let (r, key) = RemoteUrl::parse(&format!("gdrive:file={id}")).unwrap().object_with(&env.cfg);
    assert_eq!(&r.get_range(&key, 100..200).await.unwrap()[..], &body[100..200]);
    assert!(env.emu.stats().errors.get(&403).copied().unwrap_or(0) >= 1, "the first read was refused");
    // A whole-file read too (files.get alt=media takes acknowledgeAbuse as a ranged one does).
    assert_eq!(&r.get(&key).await.unwrap()[..], &body[..]);
}

/// A volume in a shared drive, addressed by the drive's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_shared_drive_volume() {
    let env = start(driveemu::Config::default(), Creds::ServiceAccount);
    let drive = env.emu.create_shared_drive("team");
    let r = folder(&env, &format!("gdrive:id={drive}/vms/vol"));
    r.create_folder().await.unwrap();
    r.put("volume.json", PutBody::from_bytes(b"{}".to_vec())).await.unwrap();
    let other = folder(&env, &format!("gdrive:id={drive}/vms/vol"));
    let keys: Vec<_> = other.list("").await.unwrap().into_iter().map(|m| m.key).collect();
    assert_eq!(keys, vec!["volume.json"]);
    assert_eq!(&other.get("volume.json").await.unwrap()[..], b"{}");
}

/// Writes whose replies are lost are retried by the retry wrapper without
/// leaving a duplicate file, even while listings lag; fenced creates
/// recognise their own landed commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_lost_replies_leave_no_duplicates() {
    use driveblk::remote::{RetryPolicy, RetryingRemote};
    let emu_cfg = driveemu::Config { listing_lag: Duration::from_secs(2), ..Default::default() };
    let env = start(emu_cfg, Creds::User);
    env.emu.faults().set_lost_reply_rate(0.3);
    let policy = RetryPolicy {
        max_attempts: 30,
        base_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(50),
        seed: Some(4),
        attempt_timeout: Duration::from_secs(30),
    };
    let r = RetryingRemote::wrap(folder(&env, "gdrive:/lost/vol"), policy);
    r.create_folder().await.unwrap();
    for i in 0..12u64 {
        // Small (multipart) and large (resumable) bodies.
        let len = if i % 3 == 0 { 300 << 10 } else { 2000 };
        r.put(&format!("pack-{i:02}"), PutBody::from_bytes(data(i, len))).await.unwrap();
    }
    for g in 1..6u64 {
        let body = data(100 + g, 500);
        let slot = r.reserve(&format!("gen-{g}")).await.unwrap();
        let m = r.create(&format!("gen-{g}"), slot.as_ref(), &content_tag(&body), PutBody::from_bytes(body)).await;
        assert!(m.is_ok(), "{m:?}");
    }
    env.emu.faults().set_lost_reply_rate(0.0);
    assert!(env.emu.stats().lost_replies > 0, "{:?}", env.emu.stats());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // A fresh view: every key names exactly one file (list refuses duplicates).
    let keys = folder(&env, "gdrive:/lost/vol").list("").await.unwrap();
    assert_eq!(keys.len(), 17, "{keys:?}");
    for i in 0..12u64 {
        let k = format!("pack-{i:02}");
        let want = data(i, if i % 3 == 0 { 300 << 10 } else { 2000 });
        assert_eq!(&r.get(&k).await.unwrap()[..], &want[..], "{k}");
    }
}

/// Every request has a deadline: a Drive that stops answering fails the
/// call (retryably) instead of holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_a_silent_drive_fails_within_the_deadline() {
    let mut env = start(driveemu::Config::default(), Creds::User);
    env.cfg.drive.request_timeout = Duration::from_millis(500);
    let r = folder(&env, "gdrive:/slow/vol");
    r.create_folder().await.unwrap();
    r.put("a", PutBody::from_bytes(data(1, 100))).await.unwrap();
    env.emu.faults().set_latency(Duration::from_secs(30));
    let t0 = std::time::Instant::now();
    let e = r.get_range("a", 0..10).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(e.to_string().contains("timed out"), "{e}");
    env.emu.faults().set_latency(Duration::ZERO);
}

/// After a suspend every pooled connection is dead while the kernel does
/// not know it: Drive's own request deadline fires (before the retry
/// wrapper's), and the pool is dropped with it, so the retry goes out on
/// a fresh connection instead of the next dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_a_time_out_drops_the_dead_pooled_connections() {
    let mut env = start(driveemu::Config::default(), Creds::User);
    let proxy = net_support::SuspendProxy::start(&env.emu.addr().to_string()).await;
    env.cfg.drive.api_url = proxy.url();
    env.cfg.drive.request_timeout = Duration::from_secs(1);
    let r = folder(&env, "gdrive:/sleep/vol");
    r.create_folder().await.unwrap();
    for k in ["a", "b", "c", "d", "e", "f"] {
        r.put(k, PutBody::from_bytes(data(1, 100))).await.unwrap();
    }
    // Six reads at once leave several connections in the pool.
    env.emu.faults().set_latency(Duration::from_millis(200));
    let reads = ["a", "b", "c", "d", "e", "f"].map(|k| r.get_range(k, 0..10));
    for got in futures::future::join_all(reads).await {
        assert_eq!(got.unwrap().len(), 10);
    }
    env.emu.faults().set_latency(Duration::ZERO);
    assert!(proxy.opened() >= 4, "the pool holds {} connections", proxy.opened());

    proxy.suspend();
    net_support::read_after_suspend(r.clone(), "a", 10, Duration::from_secs(5)).await;
}

/// A listing by prefix asks Drive for names with that prefix (`name
/// contains`, a prefix match), not for the whole folder: the commit's
/// check of the generations costs the generations, not every pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_a_listing_by_prefix_asks_for_those_names_only() {
    let env = start(driveemu::Config::default(), Creds::User);
    let r = folder(&env, "gdrive:/many/vol");
    r.create_folder().await.unwrap();
    for i in 0..60u64 {
        r.put(&format!("pack-{i:04}"), PutBody::from_bytes(data(i, 10))).await.unwrap();
    }
    for g in ["gen-1", "gen-2", "gen-10"] {
        r.put(g, PutBody::from_bytes(data(7, 10))).await.unwrap();
    }
    // Names that only look like the prefix are cut by the caller.
    r.put("pack-gen-1", PutBody::from_bytes(data(8, 10))).await.unwrap();
    let other = folder(&env, "gdrive:/many/vol");
    let out0 = env.emu.stats().bytes_out;
    assert_eq!(other.list("").await.unwrap().len(), 64);
    let out1 = env.emu.stats().bytes_out;
    let gens: Vec<String> = other.list("gen-").await.unwrap().into_iter().map(|m| m.key).collect();
    let out2 = env.emu.stats().bytes_out;
    assert_eq!(gens, ["gen-1", "gen-10", "gen-2"]);
    let (whole, narrow) = (out1 - out0, out2 - out1);
    assert!(narrow * 10 < whole, "listing gen- sent {narrow} bytes, the whole folder {whole}");
    assert!(other.listed("gen-2").await.unwrap());
    assert!(!other.listed("gen-3").await.unwrap());
}

/// A base file's revision is pinned keep-forever, and a copy into a volume
/// folder is made server-side (no bytes cross the link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_base_is_pinned_and_copied_server_side() {
    use driveblk::remote::gdrive::{path::DriveLocation, GDriveRemote};
    use driveblk::remote::Remote;
    let env = start(driveemu::Config::default(), Creds::User);
    let image = data(13, 2 << 20);
    let id = env.emu.ui_upload(&env.emu.root_folder_id(), "win10.qcow2", &image);
    let (base, key) = GDriveRemote::object(&DriveLocation::File { id: id.clone() }, &env.cfg.drive);
    let rev = base.pin_revision(&key).await.unwrap();
    let version = base.head(&key).await.unwrap().version.unwrap();
    assert!(version.starts_with(&format!("{rev}:")), "{version} vs {rev}");
    let vol = GDriveRemote::folder(&DriveLocation::parse("/vms/adopted").unwrap(), &env.cfg.drive);
    vol.create_folder().await.unwrap();
    let before = env.emu.stats().bytes_in;
    let slot = vol.reserve("base").await.unwrap().unwrap();
    let m = base.copy_to(&key, &vol, "base", &slot.0).await.unwrap();
    // Retried after a lost reply: the same id answers 409 and finds the copy.
    let again = base.copy_to(&key, &vol, "base", &slot.0).await.unwrap();
    assert_eq!(again.size, m.size);
    assert_eq!(m.size, image.len() as u64);
    assert!(env.emu.stats().bytes_in - before < 4096, "the copy moved bytes");
    assert_eq!(&vol.get("base").await.unwrap()[..], &image[..]);
}

/// `--bwlimit` paces on the wire: an 8 MiB object (one resumable chunk)
/// at 1 MiB/s crosses the link at about the limit in every quarter second,
/// not at line speed in one burst, and takes about 8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_bwlimit_paces_a_chunk_on_the_wire() {
    use driveblk::remote::{BwLimit, BwSchedule};
    let mut env = start(driveemu::Config::default(), Creds::User);
    let proxy = net_support::MeterProxy::start(&env.emu.addr().to_string()).await;
    env.cfg.drive.api_url = proxy.url();
    env.cfg.drive.chunk_size = 8 << 20;
    let rate = 1 << 20;
    env.cfg.set_bwlimit(BwLimit::new(BwSchedule::fixed(Some(rate), None)));
    let r = folder(&env, "gdrive:/paced/vol");
    r.create_folder().await.unwrap();
    let body = data(7, 8 << 20);
    proxy.reset();
    r.put("pack-1", PutBody::from_bytes(body.clone())).await.unwrap();
    net_support::assert_paced(&proxy.up, 1, 8 << 20, rate);
    assert_eq!(&r.get_range("pack-1", 0..1000).await.unwrap()[..], &body[..1000]);
}

/// A paced chunk whose pacing alone takes longer than the request's own
/// deadline (`request_timeout` + its bytes at `min_transfer_rate`) is not
/// failed by it: the deadline allows for the pacing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_a_paced_chunk_outlasts_the_request_deadline() {
    use driveblk::remote::{BwLimit, BwSchedule};
    let mut env = start(driveemu::Config::default(), Creds::User);
    env.cfg.drive.chunk_size = 1 << 20;
    env.cfg.drive.request_timeout = Duration::from_secs(1);
    env.cfg.drive.min_transfer_rate = 1 << 20;
    env.cfg.drive.upload_attempts = 1;
    // 1 MiB at 256 KiB/s: 4 s, where the deadline without pacing is 2 s.
    env.cfg.set_bwlimit(BwLimit::new(BwSchedule::fixed(Some(256 << 10), None)));
    let r = folder(&env, "gdrive:/slow/vol");
    r.create_folder().await.unwrap();
    let t0 = std::time::Instant::now();
    let body = data(8, 1 << 20);
    r.put("pack-1", PutBody::from_bytes(body.clone())).await.expect("a paced chunk timed out on its own pacing");
    assert!(t0.elapsed() >= Duration::from_millis(3900), "{:?}", t0.elapsed());
    assert_eq!(&r.get("pack-1").await.unwrap()[..], &body[..]);
}

/// On a slow uplink (no `--bwlimit`), a chunk that takes longer than
/// `request_timeout` still lands within its own deadline (its bytes at
/// `min_transfer_rate`): reqwest's read deadline, counted from the
/// request's start to its answer, does not apply to bodies going up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_a_chunk_slower_than_request_timeout_lands() {
    let mut env = start(driveemu::Config::default(), Creds::User);
    env.cfg.drive.chunk_size = 1 << 20;
    env.cfg.drive.request_timeout = Duration::from_secs(1);
    env.cfg.drive.min_transfer_rate = 128 << 10;
    env.cfg.drive.upload_attempts = 1;
    let r = folder(&env, "gdrive:/uplink/vol");
    r.create_folder().await.unwrap();
    // 1 MiB at 2 Mbit/s: about 4 s; its deadline is 1 s + 8 s.
    env.emu.faults().set_bandwidth(Some(2_000_000));
    let body = data(9, 1 << 20);
    let t0 = std::time::Instant::now();
    r.put("pack-1", PutBody::from_bytes(body.clone())).await.expect("a slow chunk failed before its deadline");
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    env.emu.faults().set_bandwidth(None);
    assert_eq!(&r.get("pack-1").await.unwrap()[..], &body[..]);
}

/// A download limit reads Drive's answer no faster than the limit (TCP
/// flow control then holds the sender back once the client's receive
/// buffer is full): an 8 MiB ranged read at 1 MiB/s takes about 8 s. How
/// far the server runs ahead is the receive buffer, which Linux sizes
/// itself: on loopback it grows to several MiB (printed, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_bwlimit_paces_a_download_as_it_is_read() {
    use driveblk::remote::{BwLimit, BwSchedule};
    let mut env = start(driveemu::Config::default(), Creds::User);
    let proxy = net_support::MeterProxy::start(&env.emu.addr().to_string()).await;
    env.cfg.drive.api_url = proxy.url();
    let rate = 1 << 20;
    env.cfg.set_bwlimit(BwLimit::new(BwSchedule::fixed(None, Some(rate))));
    let r = folder(&env, "gdrive:/paced/vol");
    r.create_folder().await.unwrap();
    let body = data(10, 8 << 20);
    r.put("pack-1", PutBody::from_bytes(body.clone())).await.unwrap();
    r.head("pack-1").await.unwrap();
    proxy.reset();
    let t0 = std::time::Instant::now();
    let got = r.get_range("pack-1", 0..8 << 20).await.unwrap();
    let took = t0.elapsed();
    assert!(got[..] == body[..]);
    eprintln!(
        "{took:?} for 8 MiB at 1 MiB/s; the server ran {} KiB ahead of the limit; 250 ms windows (KiB): {:?}",
        proxy.down.ahead_of(rate) >> 10,
        proxy.down.windows(Duration::from_millis(250)).iter().map(|b| b >> 10).collect::<Vec<_>>()
    );
    assert!(took >= Duration::from_millis(7900) && took < Duration::from_secs(11), "{took:?}");
}
