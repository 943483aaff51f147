//! One disk, several machines, on the Drive emulator (real daemon
//! processes): the same scenarios as `e2e_lease.rs` — the lease is taken
//! through the fence (a create at a pre-generated file id), its heartbeat
//! is a file updated in place whose `modifiedTime` dates it, expiry
//! is judged against Drive's clock, and a copied cache directory is
//! another cache.

mod common;
#[path = "gdrive_support/mod.rs"]
mod gdrive_support;
#[path = "lease_support/mod.rs"]
mod lease_support;

use std::time::{Duration, Instant};

use gdrive_support::{start, Creds};
use lease_support::Host;

fn drive() -> (gdrive_support::DriveEnv, Vec<String>) {
    let env = start(driveemu::Config::default(), Creds::User);
    let flags = vec![
        "--drive-api-url".to_string(),
        env.emu.base_url(),
        "--drive-credentials".to_string(),
        env.creds_file.display().to_string(),
    ];
    (env, flags)
}

#[test]
fn gdrive_two_hosts_alternate_on_one_disk() {
    let (env, flags) = drive();
    lease_support::two_hosts_alternate(env.dir.path(), "gdrive:/lease/vol", &flags);
}

#[test]
fn gdrive_a_forced_takeover_forks_the_old_holders_changes() {
    let (env, flags) = drive();
    lease_support::forced_takeover_then_fork(env.dir.path(), "gdrive:/lease/vol", "gdrive:/lease/vol-desktop", &flags);
}

#[test]
fn gdrive_a_killed_holder_keeps_its_lease_and_a_silent_one_expires_by_drives_clock() {
    let (env, flags) = drive();
    lease_support::killed_holder_and_expiry(env.dir.path(), "gdrive:/lease/vol", &flags);
}

#[test]
fn gdrive_a_holder_that_slept_through_its_lease_is_fenced_at_its_next_commit() {
    let (env, flags) = drive();
    lease_support::sleeping_holder_is_fenced(env.dir.path(), "gdrive:/lease/vol", &flags, false);
}

#[test]
fn gdrive_a_running_holder_taken_over_by_force_learns_it_at_its_next_heartbeat() {
    let (env, flags) = drive();
    lease_support::running_holder_learns_it_was_taken_over(env.dir.path(), "gdrive:/lease/vol", &flags);
}

#[test]
fn gdrive_a_copied_cache_directory_is_another_cache() {
    let (env, flags) = drive();
    lease_support::copied_cache_is_another_cache(env.dir.path(), "gdrive:/lease/vol", &flags);
}

/// A heartbeat trashed in the web UI while its holder runs: the holder's
/// next heartbeat restores it, and another host still hears a holder that
/// cannot (stopped, a laptop's lid closed) by the trashed file's time,
/// instead of taking its lease for silent by the older manifest's.
#[test]
fn gdrive_a_trashed_heartbeat_keeps_its_holders_lease() {
    let (env, flags) = drive();
    let url = "gdrive:/lease/vol";
    // A heartbeat every 1.5 s: the other host's `status` has 4.5 s to look.
    let a = Host::new(env.dir.path(), "desktop", &flags, &[("DRIVEBLK_LEASE_TTL_MS", "6000")]);
    let b = Host::new(env.dir.path(), "laptop", &flags, &[]);
    lease_support::import(&a, url);
    let da = a.serve(url, &[]);
    // Serving past its ttl: the manifest that took the lease is older.
    std::thread::sleep(Duration::from_secs(7));
    let heartbeat = || env.emu.ui_find("lease-").into_iter().next().expect("a heartbeat");
    env.emu.ui_trash(&heartbeat().0);
    assert!(heartbeat().2);
    let t0 = Instant::now();
    while heartbeat().2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the holder never restored its heartbeat");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = da.child.as_ref().unwrap().id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    env.emu.ui_trash(&heartbeat().0);
    let l = b.lease(url);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(l["standing"], "held", "{l}");
    assert!(da.stop().success());
}

/// The volume's folder moved to the Drive trash while a holder serves it:
/// its heartbeat says so in the log (everything written there would go
/// when the trash is emptied), and does not take the heartbeat back out
/// of a trashed folder as it does a heartbeat trashed by itself.
#[test]
fn gdrive_a_trashed_volume_folder_is_reported_by_the_heartbeat() {
    let (env, flags) = drive();
    let url = "gdrive:/lease/vol";
    let a = Host::new(env.dir.path(), "desktop", &flags, &[("DRIVEBLK_LEASE_TTL_MS", "2000")]);
    lease_support::import(&a, url);
    let da = a.serve(url, &[]);
    let folder = env.emu.ui_find("vol").into_iter().find(|f| f.1 == "vol").unwrap().0;
    env.emu.ui_trash(&folder);
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(a.log()).unwrap_or_default();
        if log.contains("the volume's folder is in the Drive trash") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the heartbeat never said the folder is in the trash:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let heartbeat = env.emu.ui_find("lease-").into_iter().next().unwrap();
    assert!(heartbeat.2, "the heartbeat was taken out of a trashed folder");
    env.emu.ui_restore(&folder);
    assert!(da.stop().success());
}
