//! One disk, several machines, on a `dir:` remote with real daemon
//! processes: two hosts alternating (a second writer refused with who and
//! what, a reader not), a forced takeover whose loser is fenced and forks,
//! a holder killed with changes pending keeping its lease, expiry by the
//! remote's clock with host clocks an hour apart, and discard-local; and
//! the offline laptop: a cache caught up by a refused start serves
//! offline, and changes made offline on a volume that moved on fork.

mod common;
#[path = "lease_support/mod.rs"]
mod lease_support;

fn url(p: &std::path::Path) -> String {
    format!("dir:{}", p.display())
}

#[test]
fn two_hosts_alternate_on_one_disk() {
    let d = tempfile::tempdir().unwrap();
    lease_support::two_hosts_alternate(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

#[test]
fn a_forced_takeover_forks_the_old_holders_changes() {
    let d = tempfile::tempdir().unwrap();
    let (v, f) = (url(&d.path().join("remote/vol")), url(&d.path().join("remote/vol-desktop")));
    lease_support::forced_takeover_then_fork(d.path(), &v, &f, &[]);
    // The fork shares the origin's packs: it stores only A's changes.
    let fork_packs: u64 = std::fs::read_dir(d.path().join("remote/vol-desktop"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("pack-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // (Two chunks of 256 KiB changed; after the restart in between they go
    // up whole. The image is 4 MiB of incompressible data.)
    assert!(fork_packs <= (2 * 256 + 16) << 10, "the fork re-uploaded shared data: {fork_packs} bytes of packs");
    // The origin names the fork, for its garbage collection.
    let regs: Vec<_> = std::fs::read_dir(d.path().join("remote/vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fork-") && n.ends_with(".json"))
        .collect();
    assert_eq!(regs.len(), 1, "{regs:?}");
    let reg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("remote/vol").join(&regs[0])).unwrap()).unwrap();
    assert_eq!(reg["url"], f);
    assert!(reg["from_generation"].as_u64().unwrap() >= 1 && reg["created_unix_ms"].as_u64().is_some());
    assert_eq!(format!("fork-{}.json", reg["volume_id"].as_str().unwrap()), regs[0]);
}

#[test]
fn a_killed_holder_keeps_its_lease_and_a_silent_one_expires_by_the_remote_clock() {
    let d = tempfile::tempdir().unwrap();
    lease_support::killed_holder_and_expiry(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

#[test]
fn discard_local_drops_a_fenced_hosts_changes_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    lease_support::discard_local(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

#[test]
fn a_holder_that_slept_through_its_lease_is_fenced_at_its_next_commit() {
    let d = tempfile::tempdir().unwrap();
    lease_support::sleeping_holder_is_fenced(d.path(), &url(&d.path().join("remote/vol")), &[], false);
}

#[test]
fn a_holder_that_slept_while_gc_retired_its_next_generation_is_still_fenced() {
    let d = tempfile::tempdir().unwrap();
    lease_support::sleeping_holder_is_fenced(d.path(), &url(&d.path().join("remote/vol")), &[], true);
}

#[test]
fn a_holder_frozen_mid_commit_while_gc_retired_its_next_generation_is_fenced() {
    let d = tempfile::tempdir().unwrap();
    lease_support::frozen_mid_commit_is_fenced(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

#[test]
fn gc_judges_ages_by_the_remote_clock_only() {
    let d = tempfile::tempdir().unwrap();
    lease_support::gc_by_the_remote_clock(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

#[test]
fn a_copied_cache_directory_is_another_cache() {
    let d = tempfile::tempdir().unwrap();
    lease_support::copied_cache_is_another_cache(d.path(), &url(&d.path().join("remote/vol")), &[]);
}

/// The laptop is refused while the desktop runs (the lease is held), the
/// desktop stops, and the laptop goes offline (here: the remote's folder
/// is gone). Its hydrated cache must still serve the whole disk: the
/// refused start had caught the cache up to the desktop's generation, and
/// the copy of the manifest kept for offline starts must have followed.
/// A copy that could not follow (put back here by hand) makes the offline
/// start refuse, nothing changed, instead of forgetting the cache.
#[test]
fn a_start_refused_for_the_lease_keeps_the_cache_usable_offline() {
    let d = tempfile::tempdir().unwrap();
    let folder = d.path().join("remote/vol");
    let v = url(&folder);
    let a = lease_support::Host::new(d.path(), "desktop", &[], &[]);
    let b = lease_support::Host::new(d.path(), "laptop", &[], &[]);
    let want = lease_support::import(&a, &v);
    let cache = b.cache.to_str().unwrap().to_string();
    b.cli_ok(&["hydrate", "--quiet", &v, "--cache-dir", &cache]);
    let old_copy = std::fs::read(b.cache.join("manifest")).unwrap();
    // The desktop takes the lease (a generation); the laptop is refused.
    let da = a.serve(&v, &[]);
    let e = b.serve_refused(&v, &[]);
    assert!(e.contains("held by desktop"), "{e}");
    assert!(da.stop().success());
    // On the train.
    let away = d.path().join("remote/vol-away");
    std::fs::rename(&folder, &away).unwrap();
    let db = b.serve(&v, &["--remote-wait", "2"]);
    let mut c = lease_support::connect(&db);
    let got = c.read(0, c.capacity as usize);
    drop(c);
    assert!(db.stop().success());
    let log = std::fs::read_to_string(b.log()).unwrap();
    assert!(got.is_ok_and(|g| g == want), "the offline laptop lost its cache: {log}");
    // A copy older than the cache's state (its save failed): refused
    // offline, saying why and what to do...
    std::fs::write(b.cache.join("manifest"), &old_copy).unwrap();
    let e = b.serve_refused(&v, &["--remote-wait", "2"]);
    assert!(e.contains("cannot be served offline") && e.contains("once the remote answers"), "{e}");
    // ...and the cache is whole when the remote is back: nothing fetched.
    std::fs::rename(&away, &folder).unwrap();
    let db = b.serve(&v, &[]);
    let mut c = lease_support::connect(&db);
    assert!(lease_support::read_all(&mut c) == want);
    drop(c);
    assert!(db.stop().success());
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(b.cache.join("status.json")).unwrap()).unwrap();
    assert_eq!(s["remote"]["fetches"], 0, "the refused offline start dropped cached chunks: {s}");
}

/// A laptop started offline (from its cache's copy of the volume) writes;
/// meanwhile the desktop serves, writes and stops. Back online, the
/// laptop's changes meet the volume that moved on: `sync` and the status
/// say so and name the way out (fork or discard-local), not "start
/// again"; its stop exits 78; the remote holds the desktop's disk.
#[test]
fn an_offline_laptop_back_online_after_another_host_committed_is_told_to_fork() {
    let d = tempfile::tempdir().unwrap();
    let folder = d.path().join("remote/vol");
    let v = url(&folder);
    let a = lease_support::Host::new(d.path(), "desktop", &[], &[]);
    let b = lease_support::Host::new(d.path(), "laptop", &[], &[]);
    let base = lease_support::import(&a, &v);
    let cache = b.cache.to_str().unwrap().to_string();
    b.cli_ok(&["hydrate", "--quiet", &v, "--cache-dir", &cache]);
    let away = d.path().join("remote/vol-away");
    std::fs::rename(&folder, &away).unwrap();
    let db = b.serve(&v, &[]);
    std::fs::rename(&away, &folder).unwrap();
    // The desktop, online, writes and stops (commits, releases).
    let mut want_a = base.clone();
    let da = a.serve(&v, &[]);
    let mut c = lease_support::connect(&da);
    lease_support::write(&mut c, 0, &common::pattern(11, 8192), &mut want_a);
    drop(c);
    assert!(da.stop().success());
    // The laptop writes, then asks for an upload.
    let mut want_b = base.clone();
    let mut c = lease_support::connect(&db);
    lease_support::write(&mut c, 1 << 20, &common::pattern(12, 4096), &mut want_b);
    drop(c);
    let o = b.cli(&["sync", &v, "--cache-dir", &cache, "--timeout", "60"]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("moved on") && !e.contains("start again"), "{e}");
    // It was the desktop, a moment ago: not "another writer long ago", nor gc.
    assert!(e.contains("committed by desktop (pid ") && !e.contains("gc had retired"), "{e}");
    assert!(e.contains(&format!("driveblk fork {v} NEWURL")) && e.contains("discard-local"), "{e}");
    let st = b.cli_ok(&["status", "--cache-dir", &cache]);
    assert!(st.contains("CONFLICT") && st.contains("driveblk fork"), "{st}");
    let status = db.stop();
    let log = std::fs::read_to_string(b.log()).unwrap();
    assert_eq!(status.code(), Some(78), "{log}");
    let reader = lease_support::Host::new(d.path(), "reader", &[], &[]);
    let dr = reader.serve(&v, &["--read-only"]);
    let mut rc = common::Client::connect_with(&dr.socket, 1, true);
    assert!(lease_support::read_all(&mut rc) == want_a, "the remote is not the desktop's disk");
    drop(rc);
    assert!(dr.stop().success());
}

#[test]
fn a_running_holder_taken_over_by_force_learns_it_at_its_next_heartbeat() {
    let d = tempfile::tempdir().unwrap();
    lease_support::running_holder_learns_it_was_taken_over(d.path(), &url(&d.path().join("remote/vol")), &[]);
}
