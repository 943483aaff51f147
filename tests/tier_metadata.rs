//! qcow2 metadata on a slow remote: opening a volume waits only for the
//! header, L1 and refcount tables; the L2 tables stream in the background
//! (behind guest misses) while the guest's first reads are answered, and
//! every read is right before, during and after.

#[path = "tier_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driveblk::format::qcow2::{NoBacking, Qcow2Disk, Qcow2Options};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::remote::{RemoteMetrics, Shaping};
use driveblk::tier::{open_volume, Storage};
use support::*;

/// Regions of the guest disk with data, one L2 table each.
const REGIONS: u64 = 160;
/// Guest bytes one L2 table maps with 4 KiB clusters (512 entries).
const REGION: u64 = 2 << 20;

fn pattern(k: u64) -> u8 {
    (k % 250) as u8 + 1
}

/// A qcow2 image with 4 KiB clusters and 64 KiB of data at the start of
/// each of `REGIONS` 2 MiB regions: each region has its own L2 table, and
/// the tables lie spread over the file (interleaved with the data), so each
/// sits in its own 64 KiB chunk.
fn many_tables(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tables.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(&p)
        .arg((REGIONS * REGION).to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for k in 0..REGIONS {
        io.arg("-c").arg(format!("write -q -P {} {} 64k", pattern(k), k * REGION));
    }
    assert!(io.arg(&p).status().unwrap().success());
    p
}

fn read(d: &dyn Disk, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    d.read(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    b
}

/// The first guest read is answered while most L2 tables are still on
/// their way; the rest arrive, are pinned, and every region reads right.
/// (Without the background prefetch, opening fetched every table first, so
/// nothing was left pending by the time of the first read.)
#[test]
fn the_first_read_does_not_wait_for_every_l2_table() {
    let d = tempfile::tempdir().unwrap();
    let img = many_tables(d.path());
    let vurl = url(&d.path().join("remote/vol"));
    let io = driveblk::volume::ImportOptions { chunk_size: 64 << 10, ..Default::default() };
    driveblk::volume::import(&img, &vurl, &io).unwrap();

    // 100 ms per request: the tables alone take many round trips.
    let metrics = Arc::new(RemoteMetrics::default());
    let shaping = Shaping { latency: Duration::from_millis(100), bandwidth_bps: None };
    let mut o = cache_opts(&d.path().join("cache"), counted(metrics, None, shaping));
    o.read_only = true;
    o.readahead_chunks = 0;
    let store = open_volume(&vurl, o).unwrap();
    let storage: Arc<dyn Storage> = store.clone();
    let disk = Qcow2Disk::open(storage, Qcow2Options { read_only: true, ..Default::default() }, &NoBacking).unwrap();

    // A region in the middle: its table is far down the prefetch order.
    let k = REGIONS / 2;
    assert_eq!(read(&disk, k * REGION + 4096, 4096), vec![pattern(k); 4096]);
    let pending = store.metadata_pending();
    assert!(pending > REGIONS / 4, "the first read waited for the metadata prefetch ({pending} chunks left)");

    // The rest comes in the background; reads stay right meanwhile.
    let t0 = Instant::now();
    let mut k = 0;
    while store.metadata_pending() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the metadata prefetch never finished");
        assert_eq!(read(&disk, k * REGION, 512), vec![pattern(k); 512], "region {k}");
        k = (k + 7) % REGIONS;
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in 0..REGIONS {
        assert_eq!(read(&disk, k * REGION + 60 * 1024, 4096), vec![pattern(k); 4096], "region {k}");
        assert_eq!(read(&disk, k * REGION + (1 << 20), 4096), vec![0; 4096], "hole in region {k}");
    }
    // The prefetch went as speculative work, behind guest misses.
    assert!(store.stats().bytes_hydrate > 0);
}
