//! Hostile and corrupt images: hand-patched headers and tables must fail to
//! open with a clear error, or fail only the affected request; never panic,
//! hang or allocate without bound.

mod common;
mod qcow2_common;

use std::path::{Path, PathBuf};

use driveblk::format::{Disk, IoMode, IoVec};
use qcow2_common::*;

const MIB: u64 = 1 << 20;

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid 16 MiB image with data in the first and last clusters.
fn base_image(dir: &Path, opts: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p.to_str().unwrap(), &(16 * MIB).to_string()]);
    qemu_io(&p, &["write -P 1 0 128k".into(), format!("write -P 2 {} 64k", 16 * MIB - 65536)]);
    let bytes = std::fs::read(&p).unwrap();
    (p, bytes)
}

/// Writes `bytes` as a new image and tries to open it both ways.
fn open_patched(dir: &Path, name: &str, bytes: &[u8]) -> (Result<(), String>, Result<(), String>) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let ro = try_open(&p, ro()).map(|d| exercise(&d)).map_err(|e| e.to_string());
    std::fs::write(&p, bytes).unwrap();
    let rw = try_open(&p, rw()).map(|d| exercise(&d)).map_err(|e| e.to_string());
    (ro, rw)
}

/// Reads the whole disk (errors allowed) and writes a little if writable.
fn exercise(d: &dyn Disk) {
    let cap = d.capacity();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < cap {
        let n = MIB.min(cap - off) as usize;
        let _ = d.read(off, &IoVec::from_slice(&mut buf[..n]), IoMode::Blocking);
        off += MIB;
    }
    if !d.read_only() {
        let mut b = vec![7u8; 4096];
        let _ = d.write(cap / 2, &IoVec::from_slice(&mut b), IoMode::Blocking);
        let _ = d.discard(0, cap.min(4 * MIB), IoMode::Blocking);
        let _ = d.flush(IoMode::Blocking);
    }
}

fn expect_open_error(dir: &Path, name: &str, bytes: &[u8], needle: &str) {
    let (r_o, r_w) = open_patched(dir, name, bytes);
    for (mode, r) in [("read-only", r_o), ("read-write", r_w)] {
        let e = r.err().unwrap_or_else(|| panic!("{name}: {mode} open should fail"));
        assert!(e.contains(needle), "{name}: {mode} error {e:?} should mention {needle:?}");
    }
}

#[test]
fn bad_header_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = base_image(dir.path(), "cluster_size=65536");
    let d = dir.path();

    let mut b = good.clone();
    b[0] = b'X';
    expect_open_error(d, "magic", &b, "not a qcow2 image");

    let mut b = good.clone();
    put32(&mut b, 4, 4);
    expect_open_error(d, "version", &b, "version 4");

    for bits in [0u32, 8, 22, 63, u32::MAX] {
        let mut b = good.clone();
        put32(&mut b, 20, bits);
        expect_open_error(d, &format!("cluster_bits_{bits}"), &b, "cluster_bits");
    }

    let mut b = good.clone();
    put32(&mut b, 36, u32::MAX);
    expect_open_error(d, "l1_huge", &b, "L1 table");
    let mut b = good.clone();
    put32(&mut b, 36, 0);
    expect_open_error(d, "l1_small", &b, "L1 table too small");
    let mut b = good.clone();
    put64(&mut b, 40, 1 << 50);
    expect_open_error(d, "l1_past_eof", &b, "past the end");
    let mut b = good.clone();
    put64(&mut b, 40, 4097);
    expect_open_error(d, "l1_unaligned", &b, "not cluster-aligned");

    let mut b = good.clone();
    put64(&mut b, 24, u64::MAX);
    expect_open_error(d, "size_huge", &b, "L1 table");

    let mut b = good.clone();
    put32(&mut b, 32, 1);
    expect_open_error(d, "encrypted", &b, "encrypted");

    let mut b = good.clone();
    put64(&mut b, 72, 1 << 10);
    expect_open_error(d, "unknown_incompat", &b, "unknown incompatible features");
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 2);
    expect_open_error(d, "external_data", &b, "external data file");

    let mut b = good.clone();
    put32(&mut b, 96, 7);
    expect_open_error(d, "refcount_order", &b, "refcount_order");
    let mut b = good.clone();
    put32(&mut b, 100, 40);
    expect_open_error(d, "header_length_small", &b, "header_length");
    let mut b = good.clone();
    put32(&mut b, 100, 1 << 20);
    expect_open_error(d, "header_length_big", &b, "header_length");

    // Refcount table: too big, past the end.
    let mut b = good.clone();
    put32(&mut b, 56, u32::MAX);
    let (_, r_w) = open_patched(d, "reftable_huge", &b);
    assert!(r_w.unwrap_err().contains("refcount table"));

    // Backing file name outside the first cluster / too long.
    let mut b = good.clone();
    put64(&mut b, 8, 65530);
    put32(&mut b, 16, 100);
    expect_open_error(d, "backing_name", &b, "backing file name");

    // Snapshot table past the end, and absurdly many snapshots.
    let mut b = good.clone();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 1 << 40);
    expect_open_error(d, "snapshots_past_eof", &b, "snapshot table");
    let mut b = good.clone();
    put32(&mut b, 60, u32::MAX);
    put64(&mut b, 64, 65536);
    expect_open_error(d, "snapshots_many", &b, "snapshots");
    // A snapshot entry whose lengths overrun the file.
    let mut b = good.clone();
    let len = b.len();
    b.resize(len + 65536, 0);
    put32(&mut b, 60, 1);
    put64(&mut b, 64, len as u64);
    b[len + 12..len + 16].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    put32(&mut b, len + 36, 1000);
    let (r_o, _) = open_patched(d, "snapshot_overrun", &b);
    assert!(r_o.unwrap_err().contains("snapshot"));
}

#[test]
fn bad_extensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, good) = base_image(d, "cluster_size=65536");
    let hl = u32::from_be_bytes(good[100..104].try_into().unwrap()) as usize;
    // qemu-img writes a feature name table first: make its length overrun.
    let mut b = good.clone();
    put32(&mut b, hl + 4, 0xffff_fff0);
    expect_open_error(d, "ext_len", &b, "overruns the header");
    // An encryption header extension.
    let mut b = good.clone();
    put32(&mut b, hl, 0x0537_be77);
    expect_open_error(d, "ext_crypto", &b, "encrypted");
    // An unknown incompatible bit is reported by name from the feature table.
    let mut b = good.clone();
    put64(&mut b, 72, 1 << 4 | 1 << 9);
    let e = open_patched(d, "ext_name", &b).0.unwrap_err();
    assert!(e.contains("unknown"), "{e}");
}

#[test]
fn bad_table_entries_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, good) = base_image(d, "cluster_size=65536");
    let l1 = be64(&good, 40) as usize;
    let rt = be64(&good, 48) as usize;
    let l2 = (be64(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rb = be64(&good, rt) as usize;

    // L1 entry past the end of the file.
    let mut b = good.clone();
    put64(&mut b, l1, 1 << 45 | 1 << 63);
    expect_open_error(d, "l1_entry_eof", &b, "past the end");
    // Two L1 entries sharing one L2 table (4 KiB clusters: 2 MiB per table).
    {
        let sub = d.join("small");
        std::fs::create_dir(&sub).unwrap();
        let (_, small) = base_image(&sub, "cluster_size=4096");
        let l1s = be64(&small, 40) as usize;
        let mut b = small.clone();
        let e = be64(&b, l1s);
        put64(&mut b, l1s + 8, e);
        let (r_o, r_w) = open_patched(d, "l2_shared", &b);
        assert!(r_o.unwrap_err().contains("overlaps"));
        assert!(r_w.unwrap_err().contains("overlaps"));
    }
    // L1 entry pointing at the refcount table.
    let mut b = good.clone();
    put64(&mut b, l1, rt as u64 | 1 << 63);
    expect_open_error(d, "l2_is_reftable", &b, "overlaps");

    // L2 entry past EOF: read-only open works, the read of that cluster fails.
    let mut b = good.clone();
    put64(&mut b, l2, 1 << 40 | 1 << 63);
    let p = d.join("l2_entry_eof");
    std::fs::write(&p, &b).unwrap();
    let disk = try_open(&p, qcow2_common::ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk.read(0, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    // The rest of the disk still reads.
    disk.read(65536, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    assert_eq!(buf[0], 1);
    let e = try_open(&p, qcow2_common::rw()).err().unwrap().to_string();
    assert!(e.contains("refcount 0"), "{e}");

    // L2 entry pointing into metadata (the L1 table): refused for writing.
    let mut b = good.clone();
    put64(&mut b, l2, l1 as u64 | 1 << 63);
    let (_, r_w) = open_patched(d, "l2_into_l1", &b);
    assert!(r_w.unwrap_err().contains("overlaps image metadata"));
    // Unaligned data offset: the read fails.
    let mut b = good.clone();
    put64(&mut b, l2, (l2 as u64 + 65536 + 512) | 1 << 63);
    let (r_o, _) = open_patched(d, "l2_unaligned", &b);
    r_o.unwrap();
    // Compressed entry with garbage: that read fails, no panic.
    let mut b = good.clone();
    put64(&mut b, l2, 1 << 62 | (l2 as u64 + 65536) | 3 << 54);
    let p = d.join("l2_compressed_garbage");
    std::fs::write(&p, &b).unwrap();
    let disk = try_open(&p, qcow2_common::ro()).unwrap();
    let err = disk.read(0, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap_err();
    assert!(err.to_string().contains("compressed"), "{err}");

    // Refcount block entry past EOF / unaligned.
    let mut b = good.clone();
    put64(&mut b, rt, 1 << 44);
    let (r_o, r_w) = open_patched(d, "refblock_eof", &b);
    r_o.unwrap();
    assert!(r_w.unwrap_err().contains("past the end"));
    let mut b = good.clone();
    put64(&mut b, rt, rb as u64 + 8);
    let (_, r_w) = open_patched(d, "refblock_unaligned", &b);
    assert!(r_w.unwrap_err().contains("not cluster-aligned"));
    // Refcount of a data cluster zeroed: writable open refuses.
    let mut b = good.clone();
    let data_cluster = (be64(&good, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    b[rb + 2 * data_cluster as usize..rb + 2 * data_cluster as usize + 2].fill(0);
    let (r_o, r_w) = open_patched(d, "refcount_zero", &b);
    r_o.unwrap();
    assert!(r_w.unwrap_err().contains("refcount 0"));
}

/// A writable open holds every refcount block in memory: a refcount table
/// naming blocks that count only clusters past the end of the file (each
/// block itself a distinct cluster of a sparse file, so a 2 TiB file costs
/// nothing to make) had us read them all; now the image is refused, for
/// writing only, naming the table. The daemon says the same.
#[test]
fn refcount_blocks_past_the_end_of_the_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, good) = base_image(d, "cluster_size=65536");
    let rt = be64(&good, 48) as usize;
    // 64 KiB clusters, 16-bit refcounts: block i counts from i * 2 GiB.
    let mut b = good.clone();
    let end = b.len().next_multiple_of(65536);
    b.resize(end + 16 * 65536, 0);
    for i in 1..=16 {
        put64(&mut b, rt + 8 * i, (end + (i - 1) * 65536) as u64);
    }
    let (r_o, r_w) = open_patched(d, "refblocks_past_eof", &b);
    r_o.unwrap();
    let e = r_w.unwrap_err();
    assert!(e.contains("refcount block 1 ") && e.contains("past the end of the file"), "{e}");
    let img = d.join("refblocks_past_eof");
    std::fs::write(&img, &b).unwrap();
    let err = common::serve_fails(&d.join("sock"), &["--image", img.to_str().unwrap(), "--format", "qcow2"]);
    assert!(err.contains("past the end of the file"), "{err}");
    // A block that counts the cluster at the end of the file (where the
    // next allocation goes: QEMU can leave such a block when it crashes
    // before the data it allocated is written) is fine: the file ends at
    // 2 GiB, where block 1 starts counting.
    let mut b = good.clone();
    let end = b.len().next_multiple_of(65536);
    b.resize(end + 65536, 0);
    put64(&mut b, rt + 8, end as u64);
    let p = d.join("refblock_at_eof");
    std::fs::write(&p, &b).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(2 << 30).unwrap();
    let disk = try_open(&p, rw()).unwrap();
    let mut w = vec![9u8; 65536];
    disk.write(MIB, &IoVec::from_slice(&mut w), IoMode::Blocking).unwrap();
    disk.flush(IoMode::Blocking).unwrap();
}

/// A writable open reads every internal snapshot's L1 table: 9 snapshots
/// each naming its own 32 MiB table in a sparse file had us read 288 MiB
/// into memory (65536 of them, 2 TiB). Past 256 MiB in all the writable
/// open is refused, saying what to do; read-only still serves.
#[test]
fn snapshot_l1_tables_past_the_memory_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p, _) = base_image(d, "cluster_size=65536");
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let mut b = std::fs::read(&p).unwrap();
    let (nb, table) = (u32::from_be_bytes(b[60..64].try_into().unwrap()), be64(&b, 64) as usize);
    assert_eq!(nb, 1);
    let h = &b[table..table + 40];
    let extra = u32::from_be_bytes(h[36..40].try_into().unwrap()) as usize;
    let (id, name) = (u16::from_be_bytes([h[12], h[13]]) as usize, u16::from_be_bytes([h[14], h[15]]) as usize);
    let entry_len = (40 + extra + id + name).next_multiple_of(8);
    // (the file may end before the last entry's padding)
    let mut entry = b[table..(table + entry_len).min(b.len())].to_vec();
    entry.resize(entry_len, 0);
    let l1_bytes: u64 = 32 << 20;
    let new_table = b.len().next_multiple_of(65536);
    let first_l1 = (new_table + 65536) as u64;
    let n = 9;
    b.resize(new_table, 0);
    for k in 0..n {
        let mut e = entry.clone();
        e[0..8].copy_from_slice(&(first_l1 + k * l1_bytes).to_be_bytes());
        e[8..12].copy_from_slice(&((l1_bytes / 8) as u32).to_be_bytes());
        b.extend_from_slice(&e);
    }
    put32(&mut b, 60, n as u32);
    put64(&mut b, 64, new_table as u64);
    let img = d.join("snapshot_l1s");
    let write = || {
        std::fs::write(&img, &b).unwrap();
        // The tables: a hole of 288 MiB.
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(first_l1 + n * l1_bytes).unwrap();
    };
    write();
    let e = try_open(&img, rw()).err().expect("the writable open should be refused").to_string();
    assert!(e.contains("snapshots' L1 tables add up to") && e.contains("read-only"), "{e}");
    write();
    let disk = try_open(&img, ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read(0, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    assert_eq!(buf[0], 1);
}

/// Images QEMU marked corrupt open read-only only.
#[test]
fn corrupt_bit_refuses_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, good) = base_image(d, "cluster_size=65536,refcount_bits=1");
    let mut b = good.clone();
    put64(&mut b, 72, 2);
    let (r_o, r_w) = open_patched(d, "corrupt_bit", &b);
    r_o.unwrap();
    assert!(r_w.unwrap_err().contains("corrupt"));
}

#[test]
fn backing_loops_and_missing_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap()]);
    let e = try_open(&b, ro()).err().unwrap().to_string();
    assert!(e.contains("loop"), "{e}");
    // Self loop.
    let c = d.join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", c.to_str().unwrap(), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", c.to_str().unwrap()]);
    let e = try_open(&c, ro()).err().unwrap().to_string();
    assert!(e.contains("loop"), "{e}");
    // Missing backing file.
    let m = d.join("m.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", m.to_str().unwrap(), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "nonexistent.raw", "-F", "raw", m.to_str().unwrap()]);
    let e = try_open(&m, ro()).err().unwrap().to_string();
    assert!(e.contains("nonexistent.raw"), "{e}");
    // Deep chain beyond the cap.
    let mut prev = "base.raw".to_string();
    std::fs::write(d.join(&prev), vec![1u8; 1 << 16]).unwrap();
    let mut fmt = "raw";
    for i in 0..40 {
        let name = format!("l{i}.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", &prev, "-F", fmt, d.join(&name).to_str().unwrap()]);
        prev = name;
        fmt = "qcow2";
    }
    let e = try_open(&d.join(&prev), ro()).err().unwrap().to_string();
    assert!(e.contains("deeper"), "{e}");
}

/// Random byte damage to the metadata of valid images: whatever happens,
/// no panic (a panic fails the test) and no hang.
#[test]
fn random_metadata_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (k, opts) in
        ["cluster_size=4096", "cluster_size=512,refcount_bits=2", "extended_l2=on", "compat=0.10"].iter().enumerate()
    {
        let p = d.join(format!("src{k}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p.to_str().unwrap(), "4M"]);
        qemu_io(&p, &["write -P 1 0 64k".into(), "write -z 1m 64k".into(), "write -P 3 3m 100k".into()]);
        let good = std::fs::read(&p).unwrap();
        let cs = 1usize << u32::from_be_bytes(good[20..24].try_into().unwrap());
        let meta_end = good.len().min(cs * 8);
        let mut rng = Rng(k as u64 + 100);
        for t in 0..60 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(6) {
                let i = rng.below(meta_end as u64) as usize;
                b[i] = rng.next() as u8;
            }
            let _ = open_patched(d, &format!("dmg{k}-{t}"), &b);
        }
    }
}
