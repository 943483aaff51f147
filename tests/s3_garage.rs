//! Volumes on a real S3 store — a one-node Garage started by
//! `scripts/garage.sh`, no mock — through the unchanged CLI and daemon,
//! read by libblkio: import and read-only serving work on a store whose
//! conditional put does not hold while writable serving is refused with
//! the reason; with the single-writer declaration, two hosts alternate
//! (write-back sync at stop, a second writer refused by the lease, a
//! reader served); a cold boot streams the boot profile from the bucket;
//! gc frees objects there; a base object replaced while a volume on it is
//! served is never mixed into the disk. Only the URL (and the store's
//! variables) differ from `dir:`.

mod common;
#[path = "garage_support/mod.rs"]
mod garage_support;
#[path = "lease_support/mod.rs"]
mod lease_support;

use common::{run_ok, Client, Daemon};
use lease_support::{connect, import, read_all, write, Host};

/// Lets writes through on Garage (see docs/object-stores.md), for this
/// process and every driveblk it starts.
fn declare_single_writer() {
    std::env::set_var("DRIVEBLK_OBJSTORE_UNFENCED", "1");
}

#[test]
fn s3_import_and_read_only_serve_work_but_writable_serving_is_refused_without_a_fence() {
    let g = garage_support::garage();
    let url = g.url("vol");
    let d = tempfile::tempdir().unwrap();
    let a = Host::new(d.path(), "desktop", &[], &[]);
    let want = import(&a, &url);
    // A writer is refused before the guest gets a disk, and told why.
    let e = a.serve_refused(&url, &[]);
    assert!(e.contains("cannot fence two writers") && e.contains("--read-only"), "{e}");
    // The refusal committed nothing: the volume is still at generation 1.
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    assert_eq!(info["generation"], 1, "{info}");
    // A reader is served, from an empty cache, through the bucket.
    let da = a.serve(&url, &["--read-only"]);
    let mut c = Client::connect_with(&da.socket, 1, true);
    assert!(read_all(&mut c) == want, "a cold read through S3 differs from the image");
    drop(c);
    assert!(da.stop().success());
}

#[test]
fn s3_two_hosts_alternate_on_one_disk() {
    let g = garage_support::garage();
    declare_single_writer();
    let d = tempfile::tempdir().unwrap();
    lease_support::two_hosts_alternate(d.path(), &g.url("vol"), &[]);
}

/// The declaration also works with a client told not to send conditional
/// puts at all (object_store's `AWS_CONDITIONAL_PUT=disabled`): creates are
/// then plain puts after a look.
#[test]
fn s3_two_hosts_alternate_with_conditional_puts_disabled_in_the_client() {
    let g = garage_support::garage();
    declare_single_writer();
    std::env::set_var("AWS_CONDITIONAL_PUT", "disabled");
    let d = tempfile::tempdir().unwrap();
    lease_support::two_hosts_alternate(d.path(), &g.url("vol"), &[]);
}

#[test]
fn s3_boot_profile_saved_at_stop_and_streamed_by_the_next_cold_start() {
    let g = garage_support::garage();
    declare_single_writer();
    let url = g.url("vol");
    let d = tempfile::tempdir().unwrap();
    let a = Host::new(d.path(), "desktop", &[], &[]);
    let want = import(&a, &url);
    let status = |cache: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&run_ok(&["status", "--cache-dir", cache.to_str().unwrap(), "--json"])).unwrap()
    };
    let boot = |c: &mut Client| {
        for i in 0..20u64 {
            let off = (i * 7_919 * 4096) % (c.capacity - 16384);
            assert!(c.read(off, 8192).unwrap() == want[off as usize..off as usize + 8192]);
        }
    };
    let serve = |cache: &std::path::Path, extra: &[&str]| {
        let sock = d.path().join("sock");
        let mut args = vec!["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::start(&sock, &args)
    };
    // First boot: recorded, saved to the bucket at stop.
    let cache1 = d.path().join("cache1");
    let dm = serve(&cache1, &[]);
    let mut c = Client::connect(&dm.socket, 1);
    boot(&mut c);
    drop(c);
    assert!(dm.stop().success());
    let info: serde_json::Value = serde_json::from_str(&run_ok(&["info", "--json", &url])).unwrap();
    assert!(info["boot_profile"]["bytes"].as_u64().unwrap_or(0) >= 20 * 8192, "{info}");
    // Another machine, empty cache, read-only: the profile streams in and
    // the boot's reads then wait on nothing.
    let cache2 = d.path().join("cache2");
    let dm = serve(&cache2, &["--read-only"]);
    let mut st = status(&cache2);
    for _ in 0..50 {
        let p = &st["boot_profile"];
        if p["segments"].as_u64().unwrap_or(0) > 0 && p["segments_done"] == p["segments"] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        st = status(&cache2);
    }
    assert_eq!(st["boot_profile"]["segments_done"], st["boot_profile"]["segments"], "{st}");
    let misses = st["remote"]["misses"].as_u64().unwrap();
    let mut c = Client::connect_with(&dm.socket, 1, true);
    boot(&mut c);
    let after = status(&cache2);
    assert_eq!(after["remote"]["misses"].as_u64().unwrap(), misses, "boot reads waited on S3: {after}");
    drop(c);
    assert!(dm.stop().success());
}

#[test]
fn s3_gc_frees_superseded_packs() {
    let g = garage_support::garage();
    declare_single_writer();
    let url = g.url("vol");
    let d = tempfile::tempdir().unwrap();
    let a = Host::new(d.path(), "desktop", &[], &[]);
    let mut want = import(&a, &url);
    // Rewrite the whole disk twice, each time synced at stop: the
    // imported packs and the first rewrite's are dead after the second.
    for seed in [31, 32] {
        let dm = a.serve(&url, &[]);
        let mut c = connect(&dm);
        write(&mut c, 0, &common::pattern(seed, lease_support::SIZE), &mut want);
        drop(c);
        assert!(dm.stop().success());
    }
    let o = a.cli(&["gc", &url, "--keep-generations", "1", "--grace", "0s", "--force", "--json"]);
    assert!(o.status.success(), "gc: {}", String::from_utf8_lossy(&o.stderr));
    let gc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let deleted = gc["deleted"].as_array().map(|d| d.len()).unwrap_or(0);
    assert!(deleted > 0, "gc freed nothing on S3: {gc}");
    let o = a.cli(&["verify", &url]);
    assert!(o.status.success(), "verify after gc: {}", String::from_utf8_lossy(&o.stdout));
    // A fresh reader sees the newest data.
    let b = Host::new(d.path(), "laptop", &[], &[]);
    let db = b.serve(&url, &["--read-only"]);
    let mut c = Client::connect_with(&db.socket, 1, true);
    assert!(read_all(&mut c) == want);
    drop(c);
    assert!(db.stop().success());
}

/// A base image in the bucket, replaced by another upload while a volume
/// attached to it is served: S3 keeps no old content, so the volume must
/// not read the new object's bytes into a disk made of the old one's. The
/// pin is the object's ETag: a base read is a GET `If-Match` it, and one
/// replaced since fails (the guest gets an I/O error for it), never mixes;
/// the next start refuses the volume, saying the base was replaced.
#[test]
fn s3_a_base_replaced_while_served_is_never_mixed_into_the_disk() {
    use driveblk::remote::{PutBody, RemoteUrl};
    let g = garage_support::garage();
    declare_single_writer();
    let url = g.url("vol");
    let base_url = format!("{}/disk.raw", url.rsplit_once('/').unwrap().0);
    let d = tempfile::tempdir().unwrap();
    let a = Host::new(d.path(), "desktop", &[], &[]);
    let (old, new) = (common::pattern(41, lease_support::SIZE), common::pattern(42, lease_support::SIZE));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upload = |data: &Vec<u8>| {
        let (r, key) = RemoteUrl::parse(&base_url).unwrap().object_with(&g.config(true));
        rt.block_on(r.put(&key, PutBody::from_bytes(data.clone()))).unwrap();
    };
    upload(&old);
    a.cli_ok(&["attach", "--format", "raw", "--chunk-size", lease_support::CHUNK, &base_url, &url]);
    let da = a.serve(&url, &["--read-only", "--readahead-chunks", "0"]);
    let mut c = Client::connect_with(&da.socket, 1, true);
    assert!(c.read(0, 4096).unwrap() == old[..4096]);
    upload(&new);
    let off = 3 << 20;
    match c.read(off as u64, 4096) {
        Ok(got) if got == new[off..off + 4096] => panic!("a read after the base was replaced served the new bytes"),
        Ok(_) => panic!("a read after the base was replaced returned bytes of neither object"),
        Err(_) => {}
    }
    drop(c);
    assert!(da.stop().success());
    let e = a.serve_refused(&url, &["--read-only"]);
    assert!(e.contains("base image") && e.contains("pinned revision is gone"), "{e}");
}
