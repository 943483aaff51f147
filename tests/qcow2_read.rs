//! Read path against QEMU: images built by qemu-img/qemu-io across option
//! combinations must read byte-identical to `qemu-img convert -O raw`.

mod qcow2_common;

use std::path::Path;

use driveblk::format::Disk;
use qcow2_common::*;

const MIB: u64 = 1 << 20;

/// Writes a spread of patterned, zeroed and discarded ranges with qemu-io.
fn populate(path: &Path, size: u64, cluster: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut cmds = Vec::new();
    for i in 0..40 {
        let len = (1 + rng.below(4 * cluster.max(4096) / 512)) * 512;
        let off = rng.below((size - len) / 512) * 512;
        let c = match i % 8 {
            6 => format!("write -z {off} {len}"),
            7 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", 1 + rng.below(250)),
        };
        cmds.push(c);
    }
    // Both ends of the disk, unaligned to clusters.
    cmds.push(format!("write -P 77 0 {}", 512 * 3));
    cmds.push(format!("write -P 78 {} 1024", size - 1024));
    qemu_io(path, &cmds);
}

fn create(path: &Path, opts: &str, size: u64) {
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, path.to_str().unwrap(), &size.to_string()]);
}

fn compare_with_qemu(path: &Path) {
    let want = qemu_raw(path, &[]);
    let disk = open(path, ro());
    assert_same(&format!("{} read-only", path.display()), &read_all(&disk), &want);
    drop(disk);
    // A writable open loads and validates the refcounts too.
    let disk = open(path, rw());
    assert_same(&format!("{} read-write", path.display()), &read_all(&disk), &want);
    disk.close().unwrap();
    check(path);
}

#[test]
fn option_matrix_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64)] = &[
        ("cluster_size=65536", 64 * 1024),
        ("cluster_size=512", 512),
        ("cluster_size=4096", 4096),
        ("cluster_size=2097152", 2 * MIB),
        ("compat=0.10,cluster_size=65536", 64 * 1024),
        ("compat=0.10,cluster_size=512", 512),
        ("lazy_refcounts=on", 64 * 1024),
        ("refcount_bits=1,cluster_size=4096", 4096),
        ("refcount_bits=2", 64 * 1024),
        ("refcount_bits=4,cluster_size=512", 512),
        ("refcount_bits=8", 64 * 1024),
        ("refcount_bits=32,cluster_size=1024", 1024),
        ("refcount_bits=64,cluster_size=512", 512),
        ("extended_l2=on,cluster_size=65536", 64 * 1024),
        ("extended_l2=on,cluster_size=16384", 16 * 1024),
        ("extended_l2=on,cluster_size=2097152", 2 * MIB),
        ("compression_type=zstd", 64 * 1024),
    ];
    for (i, (opts, cluster)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("m{i}.qcow2"));
        let size = 24 * MIB + 7 * 512;
        create(&path, opts, size);
        populate(&path, size & !511, *cluster, i as u64 + 1);
        compare_with_qemu(&path);
    }
}

#[test]
fn compressed_images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Compressible, incompressible and zero data side by side, in a raw source.
    let src = dir.path().join("src.raw");
    let mut rng = Rng(7);
    let mut bytes = vec![0u8; 16 * MIB as usize];
    for (i, chunk) in bytes.chunks_mut(MIB as usize / 2).enumerate() {
        match i % 4 {
            0 => chunk.fill(i as u8 + 1),
            1 => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
            2 => {}
            _ => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 700) as u8),
        }
    }
    std::fs::write(&src, &bytes).unwrap();
    for (name, opts) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
        ("zlib-512", "compression_type=zlib,cluster_size=512"),
        ("zstd-2m", "compression_type=zstd,cluster_size=2097152"),
        ("zlib-extl2", "compression_type=zlib,extended_l2=on"),
        ("v2", "compat=0.10"),
    ] {
        let out = dir.path().join(format!("c-{name}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_same(name, &qemu_raw(&out, &[]), &bytes);
        compare_with_qemu(&out);
    }
}

#[test]
fn backing_chains_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut rng = Rng(3);
    let size = 8 * MIB;
    std::fs::write(&base, (0..size).map(|_| rng.next() as u8).collect::<Vec<u8>>()).unwrap();
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid.to_str().unwrap()]);
    populate(&mid, size, 65536, 11);
    // A top layer bigger than its backing file, with a relative name and
    // extended L2, so subclusters fall through to the backing file.
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        &(12 * MIB).to_string(),
    ]);
    populate(&top, 12 * MIB, 65536, 12);
    let want = qemu_raw(&top, &[]);
    // Open from another working directory: names resolve against the image's.
    let disk = open(&top, ro());
    assert_same("top of chain", &read_all(&disk), &want);
    assert!(disk.describe().contains("backing mid.qcow2"));
}

#[test]
fn snapshots_are_listed_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    create(&path, "cluster_size=65536", 8 * MIB);
    populate(&path, 8 * MIB, 65536, 21);
    qemu_img(&["snapshot", "-c", "first", path.to_str().unwrap()]);
    let want_first = qemu_raw(&path, &[]);
    populate(&path, 8 * MIB, 65536, 22);
    qemu_img(&["snapshot", "-c", "second", path.to_str().unwrap()]);
    populate(&path, 8 * MIB, 65536, 23);
    let want_active = qemu_raw(&path, &[]);

    let info = {
        let f = driveblk::tier::LocalFile::open(&path, true).unwrap();
        driveblk::format::qcow2::info(&f).unwrap()
    };
    let names: Vec<&str> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);

    let active = open(&path, ro());
    assert_eq!(active.snapshots().len(), 2);
    assert_same("active", &read_all(&active), &want_active);
    let first = open(&path, driveblk::format::qcow2::Qcow2Options { snapshot: Some("first".into()), ..ro() });
    assert!(first.read_only());
    assert_same("snapshot first", &read_all(&first), &want_first);
    // By id too.
    let by_id = open(&path, driveblk::format::qcow2::Qcow2Options { snapshot: Some("1".into()), ..ro() });
    assert_same("snapshot id 1", &read_all(&by_id), &want_first);

    // Writable opens keep the snapshots (see qcow2_write::snapshots_survive_writes).
    open(&path, rw()).close().unwrap();
    assert_same("snapshot first after rw open", &qemu_raw(&path, &["-l", "snapshot.name=first"]), &want_first);
}
