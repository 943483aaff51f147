//! Crash consistency: a workload runs on an in-memory storage that records
//! every write and sync; a crash at a random point (possibly inside a flush)
//! keeps what was synced plus a random subset of later sectors. The result
//! must pass `qemu-img check` with no corruption (leaks allowed), reopen
//! writable with the engine, and hold every write completed before the last
//! completed flush.

mod qcow2_common;

use std::path::Path;
use std::sync::Arc;

use driveblk::format::qcow2::{LocalBackingOpener, Qcow2Disk, Qcow2Options};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::tier::Storage;
use qcow2_common::*;

const MIB: u64 = 1 << 20;

fn crash_trials(create: &str, size: u64, cluster: u64, backing: bool, trials: u64) {
    crash_trials_snap(create, size, cluster, backing, trials, false)
}

fn crash_trials_snap(create: &str, size: u64, cluster: u64, backing: bool, trials: u64, snapshot: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng0 = Rng(42);
    let mut bargs: Vec<&str> = vec![];
    if backing {
        let data: Vec<u8> = (0..size).map(|_| rng0.next() as u8).collect();
        std::fs::write(dir.path().join("base.raw"), data).unwrap();
        bargs = vec!["-b", "base.raw", "-F", "raw"];
    }
    let img = dir.path().join("img.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", create];
    args.extend(bargs);
    let size_s = size.to_string();
    args.extend([img.to_str().unwrap(), size_s.as_str()]);
    qemu_img(&args);
    qemu_io(&img, &[format!("write -P 9 0 {}", 4 * cluster), format!("write -P 8 {} {}", size / 2, 3 * cluster)]);
    if snapshot {
        qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    }
    let initial_bytes = std::fs::read(&img).unwrap();
    let initial_view = qemu_raw(&img, &[]);

    for trial in 0..trials {
        let mut rng = Rng(trial * 7919 + 1);
        let storage = Arc::new(CrashStorage::new(initial_bytes.clone()));
        let s: Arc<dyn Storage> = storage.clone();
        let disk = Qcow2Disk::open(s, Qcow2Options::default(), &LocalBackingOpener::new(&img)).unwrap();
        let sectors = (size / 512) as usize;
        let mut model = initial_view.clone();
        let mut flushed = model.clone();
        // Sectors whose durable content is unknown: written since the last
        // completed flush, or discarded (old contents or zeroes are both fine).
        // Written since the last completed flush: old or new content.
        let mut pending = vec![false; sectors];
        // Discarded and not rewritten since: old content or zeroes.
        let mut discarded = vec![false; sectors];
        let crash_op = rng.below(60);
        let mut crash_at = storage.events();
        for k in 0..=crash_op {
            let start_events = storage.events();
            // Half the crashes land inside a flush, where ordering matters most.
            let kind = if k == crash_op && rng.below(2) == 0 { 9 } else { rng.below(11) };
            let len = (1 + rng.below(3 * cluster / 512)) * 512;
            let off = rng.below((size - len) / 512 + 1) * 512;
            let (s0, s1) = ((off / 512) as usize, ((off + len) / 512) as usize);
            let mut is_flush = false;
            if std::env::var("CRASH_DEBUG").is_ok() {
                eprintln!("op {k}: kind {kind} off {off} len {len} events {start_events}");
            }
            match kind {
                0..=4 => {
                    let pat = rng.below(255) as u8 + 1;
                    let mut buf = vec![pat; len as usize];
                    disk.write(off, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
                    model[off as usize..(off + len) as usize].fill(pat);
                }
                5 | 6 => {
                    disk.write_zeroes(off, len, rng.below(2) == 0, IoMode::Blocking).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                7 | 10 => {
                    disk.discard(off, len, IoMode::Blocking).unwrap();
                    // Unknown from now on until rewritten.
                    discarded[s0..s1].fill(true);
                }
                8 | 9 => {
                    disk.flush(IoMode::Blocking).unwrap();
                    is_flush = true;
                }
                _ => unreachable!(),
            }
            if kind < 7 {
                pending[s0..s1].fill(true);
                discarded[s0..s1].fill(false);
            }
            if k == crash_op {
                let end = storage.events();
                crash_at = start_events + rng.below((end - start_events) as u64 + 1) as usize;
                if is_flush && crash_at == end {
                    flushed = model.clone();
                    pending.fill(false);
                }
            } else if is_flush {
                flushed = model.clone();
                pending.fill(false);
            }
        }
        let image = storage.crash_image(crash_at, &mut rng);
        drop(disk);
        let crashed = dir.path().join("crashed.qcow2");
        std::fs::write(&crashed, &image).unwrap();
        check(&crashed);
        let view = qemu_raw(&crashed, &[]);
        for s in 0..sectors {
            if !pending[s] && !discarded[s] {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    view[r.clone()] == flushed[r.clone()],
                    "trial {trial}: sector {s} lost a flushed write (crash at event {crash_at}): got {:?} want {:?}",
                    &view[r.start..r.start + 4],
                    &flushed[r.start..r.start + 4]
                );
            }
        }
        if snapshot {
            assert_same(
                &format!("trial {trial}: snapshot after crash"),
                &qemu_raw(&crashed, &["-l", "snapshot.name=s1"]),
                &initial_view,
            );
        }
        // The engine reopens the crashed image writable and agrees with QEMU.
        let d = open(&crashed, rw());
        assert_same(&format!("trial {trial}: engine on crashed image"), &read_all(&d), &view);
        d.close().unwrap();
        check(&crashed);
    }
    let _ = Path::new("");
}

#[test]
fn crash_v3_64k() {
    crash_trials("cluster_size=65536", 8 * MIB, 65536, false, 40);
}

#[test]
fn crash_4k_raw_backing() {
    crash_trials("cluster_size=4096", 4 * MIB, 4096, true, 40);
}

#[test]
fn crash_extended_l2_backing() {
    crash_trials("cluster_size=65536,extended_l2=on", 8 * MIB, 65536, true, 30);
}

#[test]
fn crash_512_refcount64_growth() {
    crash_trials("cluster_size=512,refcount_bits=64", 4 * MIB, 512, false, 40);
}

#[test]
fn crash_v2() {
    crash_trials("compat=0.10,cluster_size=4096", 4 * MIB, 4096, false, 30);
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// Runs `steps` once, then rebuilds the file for a crash at every event
/// boundary (with none, all, and random subsets of the unsynced writes)
/// and checks each one.
fn exhaustive(create: &str, size: u64, steps: &[Step], points: usize) {
    exhaustive_from(create, size, &[], steps, points)
}

/// [`exhaustive`] on an image qemu-io first ran `setup` on.
fn exhaustive_from(create: &str, size: u64, setup: &[&str], steps: &[Step], points: usize) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", create, img.to_str().unwrap(), &size.to_string()]);
    if !setup.is_empty() {
        qemu_io(&img, &setup.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    }
    let storage = Arc::new(CrashStorage::new(std::fs::read(&img).unwrap()));
    let s: Arc<dyn Storage> = storage.clone();
    let disk = Qcow2Disk::open(s, Qcow2Options::default(), &LocalBackingOpener::new(&img)).unwrap();
    let mut model = qemu_raw(&img, &[]);
    // (events when the flush returned, model then, steps done)
    let mut flushes = vec![(0usize, model.clone(), 0usize)];
    for (i, st) in steps.iter().enumerate() {
        match *st {
            Step::Write(off, len, pat) => {
                let mut b = vec![pat; len as usize];
                disk.write(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
                model[off as usize..(off + len) as usize].fill(pat);
            }
            Step::Zero(off, len, unmap) => {
                disk.write_zeroes(off, len, unmap, IoMode::Blocking).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Step::Discard(off, len) => disk.discard(off, len, IoMode::Blocking).unwrap(),
            Step::Flush => {
                disk.flush(IoMode::Blocking).unwrap();
                flushes.push((storage.events(), model.clone(), i + 1));
            }
        }
    }
    let total = storage.events();
    let stride = (total / points).max(1);
    if create.contains("refcount_bits=64") {
        let now = storage.crash_image_with(total, &mut || true);
        assert_ne!(now[48..56], std::fs::read(&img).unwrap()[48..56], "refcount table should have moved");
    }
    let crashed = dir.path().join("crashed.qcow2");
    let mut rng = Rng(5);
    for p in (0..=total).step_by(stride).chain([total]) {
        let (_, want, done) = flushes.iter().rev().find(|(e, _, _)| *e <= p).unwrap().clone();
        // Sectors that may legitimately differ from `want`.
        let mut unsure = vec![false; (size / 512) as usize];
        for (i, st) in steps.iter().enumerate() {
            let (off, len, disc) = match *st {
                Step::Write(o, l, _) | Step::Zero(o, l, _) => (o, l, false),
                Step::Discard(o, l) => (o, l, true),
                Step::Flush => continue,
            };
            let r = (off / 512) as usize..((off + len) / 512) as usize;
            if i >= done || disc {
                unsure[r].fill(true);
            } else {
                unsure[r].fill(false);
            }
        }
        for variant in 0..4 {
            let image = match variant {
                0 => storage.crash_image_with(p, &mut || false),
                1 => storage.crash_image_with(p, &mut || true),
                _ => storage.crash_image(p, &mut rng),
            };
            std::fs::write(&crashed, &image).unwrap();
            check(&crashed);
            let view = qemu_raw(&crashed, &[]);
            for (s, u) in unsure.iter().enumerate() {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    u | (view[r.clone()] == want[r.clone()]),
                    "crash at event {p}/{total}: sector {s} lost a flushed write"
                );
            }
        }
    }
}

/// Allocation, free and reuse around flushes, crashed at every event.
#[test]
fn crash_every_event_alloc_free_reuse() {
    const C: u64 = 65536;
    exhaustive(
        "cluster_size=65536",
        4 * MIB,
        &[
            Step::Write(0, 3 * C, 1),
            Step::Write(10 * C + 512, 1024, 2),
            Step::Flush,
            Step::Discard(C, C),
            Step::Zero(2 * C, C, true),
            Step::Write(20 * C, 2 * C, 3),
            Step::Flush,
            // Reuses the clusters freed above.
            Step::Write(30 * C, 3 * C, 4),
            Step::Zero(0, C, false),
            Step::Write(512, 512, 5),
            Step::Flush,
            Step::Discard(0, 40 * C),
            Step::Flush,
            Step::Write(5 * C, 4 * C, 6),
            Step::Flush,
        ],
        usize::MAX,
    );
}

/// Refcount blocks and table relocation (512-byte clusters, 64-bit
/// refcounts), crashed at sampled events including inside the flushes that
/// write the new table and header.
#[test]
fn crash_sampled_events_refcount_table_growth() {
    let mut steps = Vec::new();
    for i in 0..12u64 {
        steps.push(Step::Write(i * 256 * 1024 + 512 * (i % 3), 256 * 1024, i as u8 + 1));
        if i % 3 == 2 {
            steps.push(Step::Flush);
        }
    }
    steps.push(Step::Discard(0, 1 << 20));
    steps.push(Step::Flush);
    steps.push(Step::Write(4 << 20, 512 * 1024, 99));
    steps.push(Step::Flush);
    exhaustive("cluster_size=512,refcount_bits=64", 6 * MIB, &steps, 40);
}

/// Copy-on-write out of compressed clusters frees the host cluster they
/// shared, which is then zeroed in storage and reused: never before the
/// tables pointing away from it are durable, or a crash would leave the
/// flushed compressed data zeroed under a table still naming it.
#[test]
fn crash_every_event_compressed_rewrite_releases_after_the_tables() {
    const C: u64 = 65536;
    exhaustive_from(
        "cluster_size=65536",
        2 * MIB,
        &["write -c -P 11 0 64k", "write -c -P 12 64k 64k", "write -c -P 13 128k 64k"],
        &[
            Step::Write(512, 512, 1),
            Step::Write(C + 4096, 512, 2),
            Step::Flush,
            Step::Discard(2 * C, C),
            Step::Flush,
            // Reuses the released clusters.
            Step::Write(8 * C, 4 * C, 3),
            Step::Flush,
        ],
        usize::MAX,
    );
}

#[test]
fn crash_with_internal_snapshot() {
    crash_trials_snap("cluster_size=65536", 8 * MIB, 65536, false, 30, true);
}

/// QEMU killed mid-session with lazy refcounts leaves the dirty bit set and
/// refcounts behind the tables. Opening writable rebuilds them (counting
/// snapshot references), fixes COPIED flags and clears the bit: afterwards
/// `qemu-img check` finds nothing, not even leaks, and the data is intact.
#[test]
fn qemu_crash_with_lazy_refcounts_is_repaired() {
    for (opts, snapshot) in
        [("cluster_size=65536", false), ("cluster_size=4096", true), ("cluster_size=65536,extended_l2=on", true)]
    {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lazy.qcow2");
        let o = format!("{opts},lazy_refcounts=on");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, p.to_str().unwrap(), "16M"]);
        qemu_io(&p, &["write -P 1 0 1M".into(), "write -z 2M 128k".into()]);
        if snapshot {
            qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
        }
        let snap_view = qemu_raw(&p, &[]);
        // Kill qemu-io after writing: the dirty bit stays set.
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 2 512k 1M",
                "-c",
                "write -P 3 5M 300k",
                "-c",
                "flush",
                "-c",
                "sigraise 9",
            ])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes[79] & 1, 1, "{opts}: qemu-io should have left the dirty bit set");
        let want = qemu_raw(&p, &[]);
        let disk = open(&p, rw());
        assert_same(opts, &read_all(&disk), &want);
        let mut buf = vec![9u8; 70000];
        disk.write(7 << 20, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
        disk.close().unwrap();
        drop(disk);
        assert_eq!(std::fs::read(&p).unwrap()[79] & 1, 0, "{opts}: dirty bit cleared");
        assert_eq!(check(&p), 0, "{opts}");
        let mut after = want.clone();
        after[7 << 20..(7 << 20) + 70000].fill(9);
        assert_same(opts, &qemu_raw(&p, &[]), &after);
        if snapshot {
            assert_same(opts, &qemu_raw(&p, &["-l", "snapshot.name=s1"]), &snap_view);
        }
    }
}
