//! Limits on what an image's metadata can make the engine do: how much it
//! asks the storage to pin (a fragmented image must not pin itself whole),
//! and which clusters the allocator may hand out (never one holding
//! metadata, even when the image's refcounts say it is free).

mod qcow2_common;

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use driveblk::format::qcow2::{NoBacking, Qcow2Disk, Qcow2Options, PIN_GRANULE};
use driveblk::format::{Disk, IoMode, IoVec};
use driveblk::tier::LocalFile;
use qcow2_common::*;

const MIB: u64 = 1 << 20;

/// Records the ranges the engine hints as metadata.
#[derive(Default)]
struct Recording {
    hints: Mutex<Vec<Vec<Range<u64>>>>,
}

impl Watch for Recording {
    fn hint_metadata(&self, ranges: &[Range<u64>]) {
        self.hints.lock().unwrap().push(ranges.to_vec());
    }
}

fn granules(ranges: &[Range<u64>]) -> usize {
    let mut g: Vec<u64> = ranges.iter().flat_map(|r| r.start / PIN_GRANULE..=(r.end - 1) / PIN_GRANULE).collect();
    g.sort_unstable();
    g.dedup();
    g.len()
}

/// 4 KiB clusters (one L2 table maps 2 MiB of guest), 1 MiB written at the
/// start of every 2 MiB: QEMU allocates each L2 table right before its 1 MiB
/// of data, so 40 tables end up 1 MiB apart, each alone in its granule.
fn fragmented_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("frag.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p.to_str().unwrap(), &(80 * MIB).to_string()]);
    let cmds: Vec<String> = (0..40u64).map(|i| format!("write -P {} {} 1M", i + 1, i * 2 * MIB)).collect();
    qemu_io(&p, &cmds);
    p
}

#[test]
fn a_fragmented_image_pins_at_most_the_budget_and_reads_the_rest_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let p = fragmented_image(dir.path());
    let want = qemu_raw(&p, &[]);
    let budget = 8 * MIB;
    for read_only in [true, false] {
        let storage =
            Arc::new(Watched { inner: Arc::new(LocalFile::open(&p, read_only).unwrap()), watch: Recording::default() });
        let opts = Qcow2Options { read_only, metadata_pin_bytes: Some(budget), ..Default::default() };
        let disk = Qcow2Disk::open(storage.clone(), opts, &NoBacking).unwrap();
        let hints = storage.watch.hints.lock().unwrap().clone();
        let last = hints.last().expect("no metadata hint");
        let pinned = granules(last) as u64 * PIN_GRANULE;
        assert!(pinned <= budget, "read_only={read_only}: hinted {pinned} bytes of granules, budget {budget}");
        // Everything still reads right: the tables past the budget load on demand.
        assert_same("whole disk", &read_all(&disk), &want);
        if !read_only {
            // And writes into regions whose tables were not pinned work too.
            let mut buf = vec![0xa5u8; 8192];
            disk.write(77 * MIB, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
            disk.write(3 * MIB, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
            disk.close().unwrap();
            drop(disk);
            check(&p);
            let got = qemu_raw(&p, &[]);
            assert!(got[77 * MIB as usize..77 * MIB as usize + 8192].iter().all(|&b| b == 0xa5));
            assert!(got[3 * MIB as usize..3 * MIB as usize + 8192].iter().all(|&b| b == 0xa5));
        }
    }
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn the_allocator_never_hands_out_metadata_whose_refcount_lies() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("liar.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "refcount_bits=16", p.to_str().unwrap(), &(16 * MIB).to_string()]);
    qemu_io(&p, &["write -P 7 0 64k".into(), "write -P 8 1M 64k".into()]);
    let mut img = std::fs::read(&p).unwrap();
    let cs = 65536u64;
    let l1 = be64(&img, 40);
    let rt = be64(&img, 48);
    let block = be64(&img, rt as usize);
    let l2 = be64(&img, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    // Every metadata cluster claims refcount 0: header, refcount table and
    // block, L1, L2. Only the data clusters keep theirs.
    for off in [0, rt, block, l1, l2] {
        let i = (block + off / cs * 2) as usize;
        img[i..i + 2].copy_from_slice(&0u16.to_be_bytes());
    }
    std::fs::write(&p, &img).unwrap();
    let before = qemu_raw(&p, &[]);

    // Writes that each allocate a data cluster: the allocator scans from
    // cluster 0, where the refcounts claim the metadata clusters are free.
    let disk = open(&p, rw());
    let mut want = before.clone();
    for (n, guest) in [2 * MIB, 3 * MIB, 5 * MIB, 9 * MIB, 15 * MIB].into_iter().enumerate() {
        let mut buf = vec![0x30 + n as u8; 65536];
        want[guest as usize..guest as usize + 65536].copy_from_slice(&buf);
        disk.write(guest, &IoVec::from_slice(&mut buf), IoMode::Blocking).unwrap();
    }
    disk.flush(IoMode::Blocking).unwrap();
    assert_same("through the engine", &read_all(&disk), &want);
    disk.close().unwrap();
    drop(disk);

    // QEMU still finds its header, tables and the old data where they were.
    let after = std::fs::read(&p).unwrap();
    assert_eq!(&after[..72], &img[..72], "header overwritten");
    assert_same("through qemu-img", &qemu_raw(&p, &[]), &want);
    assert_same("reopened", &read_all(&open(&p, ro())), &want);
}
