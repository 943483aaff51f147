//! QCOW2 through the whole daemon, with QEMU as the oracle: the same seeded
//! workload goes through driveblk (libblkio client, several queues at once)
//! and through qemu-io on a copy; then `qemu-img compare` and `qemu-img
//! check` must agree. Also: kill -9 in the middle of a write workload leaves
//! an image `qemu-img check` accepts, with every flushed write present; a
//! discard gives the freed clusters' space back to the file system, as
//! QEMU's discard=unmap does, and never a cluster a snapshot still holds.

mod common;
mod qcow2_common;

use std::path::Path;
use std::process::Command;

use common::{Client, Daemon};
use qcow2_common::{check, qemu_img, qemu_io, qemu_raw, Rng};

/// One operation of the workload, applied identically to both sides.
#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, byte: u8 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Flush,
}

/// A workload confined to `[start, start + span)`, so queues working on
/// disjoint ranges give a deterministic result while still sharing clusters
/// and L2 tables at the range edges.
fn workload(seed: u64, start: u64, span: u64, n: usize) -> Vec<Op> {
    let mut r = Rng(seed | 1);
    let mut ops = Vec::new();
    for _ in 0..n {
        let sectors = span / 512;
        let off_s = r.below(sectors);
        let max_len = (sectors - off_s).min(if r.below(4) == 0 { 2048 } else { 256 });
        let len = (1 + r.below(max_len)) * 512;
        let off = start + off_s * 512;
        ops.push(match r.below(20) {
            0..=13 => Op::Write { off, len, byte: 1 + r.below(255) as u8 },
            14..=15 => Op::Discard { off, len },
            16..=18 => Op::Zero { off, len, unmap: r.below(2) == 0 },
            _ => Op::Flush,
        });
    }
    ops
}

fn qemu_io_script(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| match op {
            Op::Write { off, len, byte } => format!("write -P {byte} {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            Op::Zero { off, len, unmap } => format!("write -z {} {off} {len}", if *unmap { "-u" } else { "" }),
            Op::Flush => "flush".to_string(),
        })
        .collect()
}

fn run_qemu_io(img: &Path, backing_fmt_opts: &str, ops: &[Op]) {
    // qemu-io takes commands on stdin; one process for the whole workload.
    use std::io::Write;
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", img.to_str().unwrap()])
        .args(if backing_fmt_opts.is_empty() { vec![] } else { vec![backing_fmt_opts] })
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in qemu_io_script(ops) {
        writeln!(stdin, "{line}").unwrap();
    }
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// Applies the per-queue workloads through driveblk, one thread per queue.
fn run_driveblk(c: &mut Client, per_queue: &[Vec<Op>]) {
    let base = c.region.addr;
    let slot = common::BUF_LEN / per_queue.len();
    std::thread::scope(|s| {
        for (qi, (q, ops)) in c.queues.iter_mut().zip(per_queue).enumerate() {
            s.spawn(move || {
                let buf = (base + qi * slot) as *mut u8;
                let mut comps: Vec<_> = (0..1).map(|_| std::mem::MaybeUninit::uninit()).collect();
                for op in ops {
                    match *op {
                        Op::Write { off, len, byte } => {
                            assert!(len as usize <= slot);
                            unsafe { std::ptr::write_bytes(buf, byte, len as usize) };
                            q.write(off, buf, len as usize, 0, blkio::ReqFlags::empty());
                        }
                        Op::Discard { off, len } => q.discard(off, len, 0, blkio::ReqFlags::empty()),
                        Op::Zero { off, len, unmap } => {
                            let f = if unmap { blkio::ReqFlags::empty() } else { blkio::ReqFlags::NO_UNMAP };
                            q.write_zeroes(off, len, 0, f)
                        }
                        Op::Flush => q.flush(0, blkio::ReqFlags::empty()),
                    }
                    let mut t = std::time::Duration::from_secs(60);
                    let n = q.do_io(&mut comps, 1, Some(&mut t), None).unwrap();
                    assert_eq!(n, 1, "timeout on {op:?}");
                    let comp = unsafe { comps[0].assume_init_read() };
                    assert_eq!(comp.ret, 0, "{op:?} failed on queue {qi}");
                }
            });
        }
    });
}

/// Builds a base image in `dir` for a scenario; returns (image, extra qemu-io args).
fn make_image(dir: &Path, scenario: &str, size: u64) -> std::path::PathBuf {
    let img = dir.join("a.qcow2");
    let s = size.to_string();
    match scenario {
        "sparse" => {
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), &s]);
        }
        "small-clusters-refcount16" => {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096,refcount_bits=16,lazy_refcounts=on",
                img.to_str().unwrap(),
                &s,
            ]);
        }
        "backing" => {
            let raw = dir.join("base.raw");
            std::fs::write(&raw, common::pattern(77, size as usize)).unwrap();
            let back = dir.join("base.qcow2");
            qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), back.to_str().unwrap()]);
            qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img.to_str().unwrap()]);
        }
        "compressed" => {
            let raw = dir.join("src.raw");
            // Half compressible text, half random: compressed and stored clusters.
            let mut data = common::pattern(78, size as usize);
            for (i, b) in data.iter_mut().enumerate().take(size as usize / 2) {
                *b = b"driveblk compressible "[i % 22];
            }
            std::fs::write(&raw, data).unwrap();
            qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ]);
        }
        other => panic!("unknown scenario {other}"),
    }
    img
}

fn differential(scenario: &str, seed: u64) {
    const SIZE: u64 = 48 << 20;
    const QUEUES: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let img = make_image(dir.path(), scenario, SIZE);
    // The oracle works on a copy next to it (same relative backing path).
    let oracle = dir.path().join("b.qcow2");
    std::fs::copy(&img, &oracle).unwrap();
    let span = SIZE / QUEUES as u64;
    // Ranges deliberately not cluster-aligned: neighbouring queues share clusters.
    let per_queue: Vec<Vec<Op>> =
        (0..QUEUES).map(|q| workload(seed * 31 + q as u64, q as u64 * span, span - 512 * 3, 150)).collect();

    let sock = dir.path().join("sock");
    let d = Daemon::start(
        &sock,
        &["--image", img.to_str().unwrap(), "--format", "qcow2", "--num-queues", &QUEUES.to_string()],
    );
    let mut c = Client::connect(&sock, QUEUES as i32);
    assert_eq!(c.capacity, SIZE);
    run_driveblk(&mut c, &per_queue);
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());

    let all: Vec<Op> = per_queue.concat();
    run_qemu_io(&oracle, "", &all);
    check(&img);
    check(&oracle);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2", img.to_str().unwrap(), oracle.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{scenario}: images differ: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn differential_sparse_image() {
    differential("sparse", 1);
}

#[test]
fn differential_small_clusters_lazy_refcounts() {
    differential("small-clusters-refcount16", 2);
}

#[test]
fn differential_overlay_on_backing_file() {
    differential("backing", 3);
}

#[test]
fn differential_compressed_image() {
    differential("compressed", 4);
}

#[test]
fn kill_9_during_writes_leaves_a_consistent_image_with_flushed_data() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), &SIZE.to_string()]);
    let sock = dir.path().join("sock");
    for round in 0..3u64 {
        let mut d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2"]);
        let mut c = Client::connect(&sock, 1);
        // Flushed writes: must survive.
        let flushed: Vec<(u64, Vec<u8>)> = (0..20)
            .map(|i| {
                let off = ((round * 20 + i) * 1_234_567) % (SIZE - (256 << 10)) / 512 * 512;
                (off, common::pattern(round * 100 + i, 64 << 10))
            })
            .collect();
        for (off, data) in &flushed {
            c.write(*off, data).unwrap();
        }
        c.flush().unwrap();
        // Unflushed writes in flight when the process dies.
        let base = c.region.addr;
        for i in 0..32u64 {
            let off = (i * 7_654_321) % (SIZE - (128 << 10)) / 512 * 512;
            c.queues[0].write(off, (base + (i as usize) * 4096) as *const u8, 4096, 0, blkio::ReqFlags::empty());
        }
        let mut comps: Vec<_> = (0..1).map(|_| std::mem::MaybeUninit::uninit()).collect();
        let mut t = std::time::Duration::from_millis(1);
        let _ = c.queues[0].do_io(&mut comps, 0, Some(&mut t), None);
        let mut child = d.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        drop(c);
        check(&img);
        // Every flushed write is there, read by QEMU itself. Later unflushed
        // writes may overlap flushed ranges, so only check ranges untouched by them.
        let raw = dir.path().join("out.raw");
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
        let got = std::fs::read(&raw).unwrap();
        let unflushed: Vec<(u64, u64)> =
            (0..32u64).map(|i| ((i * 7_654_321) % (SIZE - (128 << 10)) / 512 * 512, 4096)).collect();
        for (off, data) in &flushed {
            let overlapped = unflushed.iter().any(|(uo, ul)| *uo < off + data.len() as u64 && *off < uo + ul);
            if !overlapped {
                assert!(
                    got[*off as usize..*off as usize + data.len()] == data[..],
                    "round {round}: flushed write at {off} lost"
                );
            }
        }
        let _ = std::fs::remove_file(&sock);
    }
}

/// Bytes the file system holds for `path` (holes excluded).
fn allocated(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

/// True if the guest reads `[off, off + len)` as zeroes.
fn reads_zero(c: &mut Client, off: u64, len: u64) -> bool {
    (off..off + len)
        .step_by(4 << 20)
        .all(|o| c.read(o, (off + len - o).min(4 << 20) as usize).unwrap().iter().all(|&b| b == 0))
}

/// A 32 MiB image, 64 KiB clusters, its first 24 MiB written with byte 7.
fn written_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img.to_str().unwrap(), "32M"]);
    qemu_io(&img, &["write -P 7 0 24M".into()]);
    img
}

#[test]
fn discard_punches_the_freed_clusters_out_of_the_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path());
    let before = allocated(&img);
    let sock = dir.path().join("sock");
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1);
    c.discard(4 << 20, 16 << 20).unwrap();
    c.flush().unwrap();
    // Released at the guest's FLUSH, while the guest runs.
    let freed = before.saturating_sub(allocated(&img));
    assert!(freed >= 15 << 20, "the discard released {freed} of 16 MiB of the image file");
    assert!(reads_zero(&mut c, 4 << 20, 16 << 20));
    assert!(c.read((4 << 20) - 4096, 4096).unwrap().iter().all(|&b| b == 7));
    assert!(c.read(20 << 20, 4096).unwrap().iter().all(|&b| b == 7));
    // Freed clusters are reused: the file does not grow for new data.
    let len = std::fs::metadata(&img).unwrap().len();
    c.write(8 << 20, &[9u8; 1 << 20]).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "new data went past the freed clusters");
    assert_eq!(check(&img), 0, "leaked clusters after a clean stop");
    let mut want = vec![0u8; 32 << 20];
    want[..4 << 20].fill(7);
    want[8 << 20..9 << 20].fill(9);
    want[20 << 20..24 << 20].fill(7);
    assert!(qemu_raw(&img, &["-f", "qcow2"]) == want, "QEMU reads something else");
}

#[test]
fn discard_keeps_clusters_a_snapshot_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path());
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let before = allocated(&img);
    let sock = dir.path().join("sock");
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2"]);
    let mut c = Client::connect(&sock, 1);
    c.discard(0, 24 << 20).unwrap();
    c.flush().unwrap();
    assert!(reads_zero(&mut c, 0, 24 << 20));
    drop(c);
    assert!(d.stop().success());
    assert!(allocated(&img) >= before, "space of clusters the snapshot holds was released");
    check(&img);
    let snap = qemu_raw(&img, &["-f", "qcow2", "-l", "snapshot.name=s1"]);
    assert!(snap[..24 << 20].iter().all(|&b| b == 7), "the snapshot lost its data");
}

/// A damaged image whose refcounts call a data cluster free is refused
/// for writing when its L2 tables load at open ("refcount 0"). With tables
/// loaded on demand (`--metadata-cache`, or a cold volume fetching them in
/// the background) the check ran when the table loaded, against refcounts
/// that had changed meanwhile: the allocator had handed the "free" cluster
/// out as a new L2 table, the check saw refcount 1 and passed, and the
/// guest read that L2 table as its data (and its writes there would have
/// overwritten it). Now the read fails, and the new data stays intact.
#[test]
fn a_cluster_free_by_its_refcount_is_never_shared_with_a_table_loaded_later() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let sock = dir.path().join("sock");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img.to_str().unwrap(), "16M"]);
    // One 4 KiB cluster in each of six L2 tables (one per 2 MiB).
    qemu_io(&img, &(0..6).map(|i| format!("write -P {} {} 4k", i + 1, i << 21)).collect::<Vec<_>>());
    let mut b = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], off: usize| u64::from_be_bytes(b[off..off + 8].try_into().unwrap());
    let mask = 0x00ff_ffff_ffff_fe00;
    let (l1, rt) = (be64(&b, 40) as usize, be64(&b, 48) as usize);
    let l2 = (be64(&b, l1 + 5 * 8) & mask) as usize;
    let data = (be64(&b, l2) & mask) as usize;
    let block = (be64(&b, rt) & mask) as usize;
    // The sixth table's data cluster: refcount 0 (16-bit refcounts).
    b[block + 2 * (data / 4096)..block + 2 * (data / 4096) + 2].fill(0);
    std::fs::write(&img, &b).unwrap();

    // 4 tables of the 6 in memory: they load on demand.
    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2", "--metadata-cache", "16K"]);
    let mut c = Client::connect(&sock, 1);
    // A write to a range with no L2 table yet: the new table and its data
    // take the lowest free clusters, the "free" one first.
    let new = vec![0xabu8; 4096];
    c.write(14 << 20, &new).unwrap();
    c.flush().unwrap();
    let got = c.read(10 << 20, 4096);
    assert!(got.is_err(), "the damaged table was served: {:?}..", got.map(|v| v[..16].to_vec()));
    assert!(c.read(14 << 20, 4096).unwrap() == new);
    drop(c);
    assert!(d.stop().success());
}

/// The same when the "free" cluster is taken for a new refcount block:
/// 512-byte clusters, the refcount table's entry for the block counting
/// clusters 256..511 lost, and an L2 entry naming cluster 256. Once the
/// clusters below are used, the allocator puts a new block there, and the
/// guest was served that block as its data.
#[test]
fn a_cluster_free_by_its_refcount_is_never_a_new_refcount_block_served_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let sock = dir.path().join("sock");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img.to_str().unwrap(), "4M"]);
    qemu_io(&img, &["write -P 1 0 256k".to_string()]);
    let mut b = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], off: usize| u64::from_be_bytes(b[off..off + 8].try_into().unwrap());
    let mask = 0x00ff_ffff_ffff_fe00;
    let (l1, rt) = (be64(&b, 40) as usize, be64(&b, 48) as usize);
    // 16-bit refcounts: a block counts 256 clusters. Cluster 256, the
    // first block 1 counts, holds data (not an L2 table).
    let first = 256 * 512u64;
    assert!((0..8).all(|i| be64(&b, l1 + 8 * i) & mask != first), "cluster 256 is an L2 table");
    b[rt + 8..rt + 16].fill(0);
    // Guest sector 1 now maps to that cluster.
    let l2 = (be64(&b, l1) & mask) as usize;
    b[l2 + 8..l2 + 16].copy_from_slice(&(first | 1 << 63).to_be_bytes());
    std::fs::write(&img, &b).unwrap();

    let d = Daemon::start(&sock, &["--image", img.to_str().unwrap(), "--format", "qcow2", "--metadata-cache", "2K"]);
    let mut c = Client::connect(&sock, 1);
    // A write past the data: clusters 0..255 are all in use, so the next
    // ones come from range 1, whose new block goes to its first cluster.
    let new = vec![0xabu8; 4096];
    c.write(2 << 20, &new).unwrap();
    c.flush().unwrap();
    let got = c.read(512, 512);
    assert!(got.is_err(), "the damaged table was served: {:?}..", got.map(|v| v[..16].to_vec()));
    assert!(c.read(2 << 20, 4096).unwrap() == new);
    drop(c);
    assert!(d.stop().success());
}
