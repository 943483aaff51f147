//! Write path against QEMU: one seeded workload (unaligned writes, discards,
//! write-zeroes with and without unmap, flushes; over holes, backing data
//! and compressed clusters; part of it from several threads at once) is
//! applied through `Qcow2Disk` and through `qemu-io` on a copy of the same
//! image. Afterwards `qemu-img compare` must find them equal and
//! `qemu-img check` must find both clean (ours also leak-free).

mod qcow2_common;

use std::path::Path;

use driveblk::format::qcow2::Qcow2Disk;
use driveblk::format::{Disk, DiskResult, IoMode, IoVec};
use qcow2_common::*;

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

impl Op {
    fn qemu(&self) -> String {
        match *self {
            Op::Write { off, len, pat } => format!("write -P {pat} {off} {len}"),
            Op::Zero { off, len, unmap: false } => format!("write -z {off} {len}"),
            Op::Zero { off, len, unmap: true } => format!("write -z -u {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Flush => "flush".into(),
        }
    }
}

/// Runs an op the way the vhost layer does: non-blocking first, then
/// blocking if the engine says it would block.
fn apply(disk: &Qcow2Disk, op: &Op) -> DiskResult<()> {
    let attempt = |mode: IoMode| match *op {
        Op::Write { off, len, pat } => {
            let mut buf = vec![pat; len as usize];
            let v = IoVec::from_slice(&mut buf);
            disk.write(off, &v, mode)
        }
        Op::Zero { off, len, unmap } => disk.write_zeroes(off, len, unmap, mode),
        Op::Discard { off, len } => disk.discard(off, len, mode),
        Op::Flush => disk.flush(mode),
    };
    match attempt(IoMode::NonBlocking) {
        Err(e) if e.is_would_block() => attempt(IoMode::Blocking),
        r => r,
    }
}

struct Config {
    name: &'static str,
    create: &'static str,
    size: u64,
    cluster: u64,
    /// "", "raw" or "qcow2" backing file.
    backing: &'static str,
    /// Start from `qemu-img convert -c` output (compressed clusters).
    compressed: bool,
    discard: bool,
}

fn sector_range(rng: &mut Rng, size: u64, max_len: u64) -> (u64, u64) {
    let len = (1 + rng.below(max_len / 512)) * 512;
    let off = rng.below((size - len) / 512 + 1) * 512;
    (off, len)
}

/// Ops confined to the 4 KiB stripes `stripe % threads == t`, so threads
/// touch disjoint bytes (often in the same cluster) and order is irrelevant.
fn thread_ops(seed: u64, t: u64, threads: u64, size: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng(seed * 1000 + t);
    let stripes = size / 4096;
    (0..n)
        .map(|_| {
            let stripe = rng.below(stripes / threads) * threads + t;
            let first = rng.below(8);
            let count = 1 + rng.below(8 - first);
            let off = stripe * 4096 + first * 512;
            let len = count * 512;
            if rng.below(6) == 0 {
                Op::Zero { off, len, unmap: rng.below(2) == 0 }
            } else {
                Op::Write { off, len, pat: 1 + rng.below(250) as u8 }
            }
        })
        .collect()
}

fn serial_ops(seed: u64, cfg: &Config, n: usize) -> Vec<Op> {
    let mut rng = Rng(seed);
    let max = 3 * cfg.cluster.max(4096);
    (0..n)
        .map(|_| match rng.below(12) {
            0..=5 => {
                let (off, len) = sector_range(&mut rng, cfg.size, max);
                Op::Write { off, len, pat: 1 + rng.below(250) as u8 }
            }
            6 | 7 => {
                let (off, len) = sector_range(&mut rng, cfg.size, max);
                Op::Zero { off, len, unmap: rng.below(2) == 0 }
            }
            8 | 9 if cfg.discard => {
                let (off, len) = sector_range(&mut rng, cfg.size, max);
                Op::Discard { off, len }
            }
            10 => Op::Flush,
            _ => {
                // Whole-cluster aligned writes (direct, no copy-on-write).
                let clusters = cfg.size / cfg.cluster;
                let c = rng.below(clusters);
                let n = 1 + rng.below((clusters - c).min(3));
                Op::Write { off: c * cfg.cluster, len: n * cfg.cluster, pat: 1 + rng.below(250) as u8 }
            }
        })
        .collect()
}

fn setup(dir: &Path, cfg: &Config) -> std::path::PathBuf {
    let size = cfg.size.to_string();
    let mut rng = Rng(99);
    let mut backing_args: Vec<String> = Vec::new();
    match cfg.backing {
        "raw" => {
            // Backing smaller than the image: the tail reads as zeroes.
            let data: Vec<u8> = (0..cfg.size - 3 * MIB).map(|_| rng.next() as u8).collect();
            std::fs::write(dir.join("base.raw"), data).unwrap();
            backing_args = vec!["-b".into(), "base.raw".into(), "-F".into(), "raw".into()];
        }
        "qcow2" => {
            let base = dir.join("base.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &size]);
            let cmds: Vec<String> = (0..30)
                .map(|i| {
                    let (off, len) = sector_range(&mut rng, cfg.size, 4 * cfg.cluster.max(4096));
                    format!("write -P {} {off} {len}", 100 + i)
                })
                .collect();
            qemu_io(&base, &cmds);
            backing_args = vec!["-b".into(), "base.qcow2".into(), "-F".into(), "qcow2".into()];
        }
        _ => {}
    }
    let img = dir.join("img.qcow2");
    let mut args: Vec<String> =
        vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into(), "-o".into(), cfg.create.into()];
    args.extend(backing_args);
    args.push(img.to_str().unwrap().into());
    args.push(size.clone());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&a);
    // Pre-existing state: allocated, zero and discarded clusters.
    let mut cmds = Vec::new();
    for i in 0..40 {
        let (off, len) = sector_range(&mut rng, cfg.size, 4 * cfg.cluster.max(4096));
        cmds.push(match i % 5 {
            4 => format!("write -z {off} {len}"),
            _ => format!("write -P {} {off} {len}", 1 + i),
        });
    }
    qemu_io(&img, &cmds);
    if cfg.compressed {
        let tmp = dir.join("tmp.qcow2");
        std::fs::rename(&img, &tmp).unwrap();
        // With a backing file, keep it: only clusters that differ from it
        // are written (compressed) into the new image.
        let mut args = vec!["convert", "-q", "-c", "-O", "qcow2", "-o", cfg.create];
        let (bname, bfmt) = match cfg.backing {
            "raw" => ("base.raw", "raw"),
            "qcow2" => ("base.qcow2", "qcow2"),
            _ => ("", ""),
        };
        let bpath = dir.join(bname);
        if !bname.is_empty() {
            args.extend(["-B", bpath.to_str().unwrap(), "-F", bfmt]);
        }
        args.extend([tmp.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        let map = qemu_img(&["map", "--output=json", img.to_str().unwrap()]);
        assert!(map.contains("\"compressed\": true"), "no compressed clusters: {map}");
        if !bname.is_empty() {
            assert!(qemu_img(&["info", img.to_str().unwrap()]).contains("backing file"));
        }
        std::fs::remove_file(&tmp).unwrap();
    }
    img
}

fn differential(cfg: &Config, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path(), cfg);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&img, &ours).unwrap();
    std::fs::copy(&img, &theirs).unwrap();

    let threads = 4;
    let per_thread: Vec<Vec<Op>> = (0..threads).map(|t| thread_ops(seed, t, threads, cfg.size, 60)).collect();
    let serial = serial_ops(seed, cfg, 250);

    let disk = open(&ours, rw());
    std::thread::scope(|s| {
        for ops in &per_thread {
            let disk = &disk;
            s.spawn(move || {
                for op in ops {
                    apply(disk, op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
                }
            });
        }
    });
    // Serial phase, with concurrent readers hammering the disk meanwhile.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let disk = &disk;
        let stop = &stop;
        s.spawn(move || {
            let mut rng = Rng(seed ^ 0x5555);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (off, len) = sector_range(&mut rng, cfg.size, 256 * 1024);
                let mut buf = vec![0u8; len as usize];
                disk.read(off, &IoVec::from_slice(&mut buf), IoMode::Blocking).expect("concurrent read");
            }
        });
        for op in &serial {
            apply(disk, op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let our_view = read_all(&disk);
    disk.close().unwrap();
    drop(disk);

    let mut cmds: Vec<String> = per_thread.iter().flatten().map(Op::qemu).collect();
    cmds.extend(serial.iter().map(Op::qemu));
    qemu_io(&theirs, &cmds);

    let want = qemu_raw(&theirs, &[]);
    assert_same(&format!("{}: engine view vs qemu", cfg.name), &our_view, &want);
    assert_same(&format!("{}: qemu reading ours vs qemu", cfg.name), &qemu_raw(&ours, &[]), &want);
    qemu_img(&["compare", "-q", ours.to_str().unwrap(), theirs.to_str().unwrap()]);
    let leaks = check(&ours);
    assert_eq!(leaks, 0, "{}: our image leaks clusters after a clean close", cfg.name);
    check(&theirs);
    // And it reopens and reads the same through the engine.
    let again = open(&ours, ro());
    assert_same(&format!("{}: reopened", cfg.name), &read_all(&again), &want);
}

fn refcount_table_offset(path: &Path) -> u64 {
    let h = std::fs::read(path).unwrap();
    u64::from_be_bytes(h[48..56].try_into().unwrap())
}

macro_rules! diff_test {
    ($name:ident, $create:expr, $size:expr, $cluster:expr, $backing:expr, $compressed:expr, $discard:expr) => {
        #[test]
        fn $name() {
            let cfg = Config {
                name: stringify!($name),
                create: $create,
                size: $size,
                cluster: $cluster,
                backing: $backing,
                compressed: $compressed,
                discard: $discard,
            };
            for seed in 1..=2 {
                differential(&cfg, seed);
            }
        }
    };
}

diff_test!(v3_64k, "cluster_size=65536", 16 * MIB, 65536, "", false, true);
diff_test!(v3_512_refcount64, "cluster_size=512,refcount_bits=64", 8 * MIB, 512, "", false, true);
diff_test!(v3_4k_refcount1_lazy, "cluster_size=4096,refcount_bits=1,lazy_refcounts=on", 8 * MIB, 4096, "", false, true);
diff_test!(v3_raw_backing, "cluster_size=65536", 16 * MIB, 65536, "raw", false, true);
diff_test!(v3_qcow2_backing_2m, "cluster_size=2097152", 32 * MIB, 2 * MIB, "qcow2", false, true);
diff_test!(extl2_qcow2_backing, "extended_l2=on,cluster_size=65536", 16 * MIB, 65536, "qcow2", false, true);
diff_test!(extl2_no_backing_16k, "extended_l2=on,cluster_size=16384", 8 * MIB, 16384, "", false, true);
diff_test!(v2_no_backing, "compat=0.10,cluster_size=65536", 16 * MIB, 65536, "", false, true);
// v2 discard over a backing file lets QEMU expose the backing data again
// (we keep the old data instead; both are allowed), so no discards here.
diff_test!(v2_raw_backing, "compat=0.10,cluster_size=4096", 8 * MIB, 4096, "raw", false, false);
diff_test!(compressed_zlib, "compression_type=zlib", 16 * MIB, 65536, "", true, true);
diff_test!(compressed_zstd_backing, "compression_type=zstd", 16 * MIB, 65536, "raw", true, true);

/// Filling a disk with 512-byte clusters and 64-bit refcounts (64 clusters
/// per refcount block) forces new refcount blocks and several relocations
/// of the refcount table, interleaved with flushes and reads.
#[test]
fn refcount_table_growth_sequential_fill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let size = 24 * MIB;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    let rt_before = refcount_table_offset(&path);
    let disk = open(&path, rw());
    let chunk = 192 * 1024u64;
    let mut expect = vec![0u8; size as usize];
    let mut off = 0;
    let mut i = 0u8;
    while off < size {
        let n = chunk.min(size - off);
        let mut buf: Vec<u8> = (0..n).map(|j| (j as u8) ^ i).collect();
        expect[off as usize..(off + n) as usize].copy_from_slice(&buf);
        apply_write(&disk, off, &mut buf);
        if i % 7 == 0 {
            disk.flush(IoMode::Blocking).unwrap();
        }
        off += n;
        i = i.wrapping_add(1);
    }
    assert_same("engine view", &read_all(&disk), &expect);
    disk.close().unwrap();
    drop(disk);
    assert_ne!(refcount_table_offset(&path), rt_before, "refcount table should have moved");
    assert_eq!(check(&path), 0);
    assert_same("qemu view", &qemu_raw(&path, &[]), &expect);
}

fn apply_write(disk: &Qcow2Disk, off: u64, buf: &mut [u8]) {
    let r = disk.write(off, &IoVec::from_slice(buf), IoMode::NonBlocking);
    match r {
        Err(e) if e.is_would_block() => disk.write(off, &IoVec::from_slice(buf), IoMode::Blocking).unwrap(),
        r => r.unwrap(),
    }
}

/// Writing to an image with internal snapshots: L2 tables and data clusters
/// shared with the snapshots are copied before they change, so every
/// snapshot still reads as it did, the active layer matches QEMU, and
/// `qemu-img check` finds no leak or corruption.
fn snapshot_differential(create: &str, backing: &'static str) {
    let cfg = Config {
        name: "snapshots",
        create: "",
        size: 8 * MIB,
        cluster: 65536,
        backing,
        compressed: false,
        discard: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config { create: Box::leak(create.to_string().into_boxed_str()), ..cfg };
    let img = setup(dir.path(), &cfg);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io(&img, &["write -P 201 0 200k".into(), "write -z 1m 128k".into(), "discard 2m 512k".into()]);
    qemu_img(&["snapshot", "-c", "s2", img.to_str().unwrap()]);
    let want_s1 = qemu_raw(&img, &["-l", "snapshot.name=s1"]);
    let want_s2 = qemu_raw(&img, &["-l", "snapshot.name=s2"]);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&img, &ours).unwrap();
    std::fs::copy(&img, &theirs).unwrap();
    let ops = serial_ops(5, &cfg, 200);
    let l1_entry0 = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
        u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap())
    };
    let before = l1_entry0(&ours);
    assert_eq!(before >> 63, 0, "after a snapshot the L2 table is shared");
    let disk = open(&ours, rw());
    for op in &ops {
        apply(&disk, op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    disk.close().unwrap();
    drop(disk);
    assert_eq!(l1_entry0(&ours) >> 63, 1, "the shared L2 table was copied");
    assert_ne!(l1_entry0(&ours) & 0x00ff_ffff_ffff_fe00, before & 0x00ff_ffff_ffff_fe00);
    qemu_io(&theirs, &ops.iter().map(Op::qemu).collect::<Vec<_>>());
    assert_same("active layer", &qemu_raw(&ours, &[]), &qemu_raw(&theirs, &[]));
    assert_same("snapshot s1 kept", &qemu_raw(&ours, &["-l", "snapshot.name=s1"]), &want_s1);
    assert_same("snapshot s2 kept", &qemu_raw(&ours, &["-l", "snapshot.name=s2"]), &want_s2);
    let s1 = open(&ours, driveblk::format::qcow2::Qcow2Options { snapshot: Some("s1".into()), ..ro() });
    assert_same("engine serving s1", &read_all(&s1), &want_s1);
    assert_eq!(check(&ours), 0, "leaks after writing over snapshots");
}

#[test]
fn snapshots_survive_writes() {
    snapshot_differential("cluster_size=65536", "");
}

#[test]
fn snapshots_survive_writes_extended_l2_backing() {
    snapshot_differential("cluster_size=65536,extended_l2=on", "raw");
}

#[test]
fn snapshots_survive_writes_v2_small_clusters() {
    snapshot_differential("compat=0.10,cluster_size=4096", "");
}
