//! Images as real tools leave them, handed to `import`, `attach` and
//! `serve`: one a running QEMU (qemu-storage-daemon) still has open, one
//! driveblk serves while QEMU tries to open it, disk formats driveblk does
//! not serve (VMDK, VDI, VHDX, VHD, QED) and compressed images, a qcow2
//! QEMU marked corrupt or keeping its data in another file. Each is refused
//! by name with the way out, or served as qemu-img reads it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, run_ok, serve_fails, Client, Daemon};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `driveblk ARGS`, which must fail; its stderr.
fn driveblk_fails(args: &[&str]) -> String {
    let out = run(bin(), args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "driveblk {args:?} succeeded: {err}");
    err
}

/// A 16 MiB qcow2 holding data at a few places, and its guest view.
fn make_qcow2(dir: &Path, name: &str, opts: &str) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.src.raw"));
    let mut data = vec![0u8; 16 << 20];
    for (i, off) in [0usize, 3 << 20, (9 << 20) + 4096, (16 << 20) - 65536].into_iter().enumerate() {
        let n = 65536.min(data.len() - off);
        data[off..off + n].copy_from_slice(&common::pattern(i as u64 + 1, n));
    }
    std::fs::write(&raw, &data).unwrap();
    let img = dir.join(format!("{name}.qcow2"));
    must("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", opts, p(&raw), p(&img)]);
    (img, data)
}

/// The whole disk as the daemon serves it.
fn read_disk(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::with_capacity(c.capacity as usize);
    while (out.len() as u64) < c.capacity {
        let n = (c.capacity - out.len() as u64).min(4 << 20) as usize;
        out.extend(c.read(out.len() as u64, n).unwrap());
    }
    out
}

/// A qemu-storage-daemon with the image open, exporting it over NBD
/// (writable or read-only), as a running VM has it; SIGTERM on drop.
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(dir: &Path, img: &Path, writable: bool) -> Qsd {
        let sock = dir.join(format!("qsd-{}.sock", if writable { "rw" } else { "ro" }));
        let ro = if writable { "" } else { ",read-only=on" };
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,filename={},node-name=f0{ro}", p(img)),
                "--blockdev",
                &format!("driver=qcow2,file=f0,node-name=q0{ro}"),
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", p(&sock)),
                "--export",
                &format!("type=nbd,id=e0,node-name=q0,writable={}", if writable { "on" } else { "off" }),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon");
        let mut q = Qsd { child };
        // The export (and so its permissions and locks) is up once the
        // NBD socket accepts.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(q.child.try_wait().unwrap().is_none(), "qemu-storage-daemon exited");
            assert!(Instant::now() < deadline, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts a QEMU (qemu-storage-daemon) opening `img` for writing, which
/// must be refused at once (else it would run on); its stderr.
fn qsd_open_fails(img: &Path) -> String {
    let mut child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={},node-name=f0", p(img)),
            "--blockdev",
            "driver=qcow2,file=f0,node-name=q0",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-storage-daemon opened {} for writing", p(img));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!st.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// A Windows disk still open in a running VM: importing it would copy a
/// disk the guest is writing (no consistent volume), and serving it next to
/// QEMU would have two writers corrupt it. QEMU marks its use with OFD
/// locks (qemu-img refuses such an image: "Failed to get shared "write"
/// lock"), which driveblk did not look at (it took an `flock` QEMU never
/// sees). Now import and serve refuse it by QEMU's rules, naming who holds
/// it, and a VM holding the image read-only does not stop an import.
#[test]
fn an_image_a_running_vm_has_open_is_refused_by_import_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = make_qcow2(dir.path(), "win10", "cluster_size=65536");
    let remote = dir.path().join("remote");
    let url = format!("dir:{}/vol", p(&remote));
    let sock = dir.path().join("sock");
    {
        let _vm = Qsd::start(dir.path(), &img, true);
        let formats: [&[&str]; 2] = [&["--format", "qcow2"], &[]];
        for fmt in formats {
            let mut args = vec!["import", "--quiet"];
            args.extend_from_slice(fmt);
            args.extend_from_slice(&[p(&img), &url]);
            let err = driveblk_fails(&args);
            assert!(
                err.contains("is in use by a running VM")
                    && err.contains("Failed to get shared \"write\" lock")
                    && err.contains("qemu-storage")
                    && err.contains("shut the VM down first")
                    && err.contains("nothing was uploaded"),
                "{err}"
            );
            assert!(!remote.exists(), "the import touched the remote");
        }
        let err = serve_fails(&sock, &["--image", p(&img), "--format", "qcow2"]);
        assert!(err.contains("in use by another process") && err.contains("Failed to get \"write\" lock"), "{err}");
        let err = serve_fails(&sock, &["--image", p(&img), "--format", "qcow2", "--read-only"]);
        assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    }
    // Readers share: a VM with the disk read-only, and the import.
    let _reader = Qsd::start(dir.path(), &img, false);
    run_ok(&["import", "--quiet", "--format", "qcow2", p(&img), &url]);
    let cache = dir.path().join("cache");
    let d = Daemon::start(&sock, &["--volume", &url, "--cache-dir", p(&cache), "--read-only"]);
    let mut c = Client::connect_with(&sock, 1, true);
    assert!(read_disk(&mut c) == want, "the imported volume differs from the image");
    drop(c);
    assert!(d.stop().success());
}

/// The other way round: while driveblk serves a local image, QEMU tools
/// see it in use as they would see another QEMU (before, `qemu-img info`
/// read it and a second QEMU opened it for writing under the daemon).
#[test]
fn an_image_driveblk_serves_is_in_use_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_qcow2(dir.path(), "disk", "cluster_size=65536");
    let sock = dir.path().join("sock");
    let d = Daemon::start(&sock, &["--image", p(&img), "--format", "qcow2"]);
    let info = run("qemu-img", &["info", p(&img)]);
    let err = String::from_utf8_lossy(&info.stderr);
    assert!(!info.status.success() && err.contains("Failed to get shared \"write\" lock"), "qemu-img info: {err}");
    // What qemu-img offers for a look at an image in use still works.
    must("qemu-img", &["info", "-U", p(&img)]);
    assert!(qsd_open_fails(&img).contains("Failed to get \"write\" lock"));
    assert!(d.stop().success());
    must("qemu-img", &["info", p(&img)]);

    // Served read-only: QEMU may read it, not write it.
    let d = Daemon::start(&sock, &["--image", p(&img), "--format", "qcow2", "--read-only"]);
    must("qemu-img", &["info", p(&img)]);
    assert!(qsd_open_fails(&img).contains("Failed to get \"write\" lock"));
    assert!(d.stop().success());
    must("qemu-img", &["check", p(&img)]);
}

/// A driveblk of an earlier version (it locked with `flock`, not QEMU's
/// locks) still serving an image on this host after an upgrade: the new
/// one sees it and refuses, for writing and for reading.
#[test]
fn an_image_an_earlier_driveblk_serves_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_qcow2(dir.path(), "disk", "cluster_size=65536");
    let sock = dir.path().join("sock");
    // What an earlier daemon held while serving it writable: `flock -x`.
    // `cat` holds it until its stdin closes; `-o`: the lock is flock's own.
    let mut old = std::process::Command::new("flock")
        .args(["-x", "-o", p(&img), "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = std::time::Instant::now();
    while !String::from_utf8_lossy(&run("cat", &["/proc/locks"]).stdout).contains("FLOCK") {
        assert!(held.elapsed() < std::time::Duration::from_secs(10), "flock never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for ro in [false, true] {
        let mut args = vec!["--image", p(&img), "--format", "qcow2"];
        if ro {
            args.push("--read-only");
        }
        let err = serve_fails(&sock, &args);
        assert!(err.contains("another driveblk (an earlier version"), "read-only {ro}: {err}");
    }
    drop(old.stdin.take());
    assert!(old.wait().unwrap().success());
    let d = Daemon::start(&sock, &["--image", p(&img), "--format", "qcow2"]);
    assert!(d.stop().success());
}

/// The base of an overlay driveblk serves is held as QEMU holds backing
/// files: others may read it, nobody may write it under the overlay; and
/// a base a VM is writing is refused.
#[test]
fn the_base_of_a_served_overlay_is_locked_against_writers() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = make_qcow2(dir.path(), "base", "cluster_size=65536");
    let top = dir.path().join("top.qcow2");
    must("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&top), "16M"]);
    let sock = dir.path().join("sock");
    let d = Daemon::start(&sock, &["--image", p(&top), "--format", "qcow2"]);
    assert!(qsd_open_fails(&base).contains("Failed to get \"write\" lock"));
    must("qemu-img", &["info", p(&base)]);
    assert!(d.stop().success());
    let _vm = Qsd::start(dir.path(), &base, true);
    let err = serve_fails(&sock, &["--image", p(&top), "--format", "qcow2"]);
    assert!(err.contains("lock backing file") && err.contains("Failed to get shared \"write\" lock"), "{err}");
}

/// A disk converted from VirtualBox, VMware or Hyper-V, or downloaded
/// compressed, was stored byte for byte and, served as raw, the guest
/// found the container's header where its boot sector should be (given
/// `--format qcow2`, only "bad magic"). Now `import` and `attach` say what
/// the file is and name the command that converts it, before anything is
/// uploaded; a qcow2 given as raw is refused too, unless `--force-raw`.
#[test]
fn other_formats_and_compressed_images_are_refused_naming_the_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let (q, want) = make_qcow2(dir.path(), "src", "cluster_size=65536");
    let remote = dir.path().join("remote");
    let url = format!("dir:{}/vol", p(&remote));
    for (fmt, name) in [("vmdk", "VMDK"), ("vdi", "VDI"), ("vhdx", "VHDX"), ("vpc", "VHD"), ("qed", "QED")] {
        let img = dir.path().join(format!("disk.{fmt}"));
        must("qemu-img", &["convert", "-q", "-f", "qcow2", "-O", fmt, p(&q), p(&img)]);
        let formats: [&[&str]; 3] = [&[], &["--format", "raw"], &["--format", "qcow2"]];
        for format in formats {
            let mut args = vec!["import", "--quiet"];
            args.extend_from_slice(format);
            args.extend_from_slice(&[p(&img), &url]);
            let err = driveblk_fails(&args);
            let convert = format!("qemu-img convert -f {fmt} -O qcow2 {}", p(&img));
            assert!(
                err.contains(&format!("is a {name}")) && err.contains(&convert) && err.contains("nothing was uploaded"),
                "{fmt} {format:?}: {err}"
            );
            assert!(!remote.exists(), "the import touched the remote");
        }
    }
    let packers: [(&[&str], &str); 2] = [(&["gzip", "-k"], "gunzip"), (&["xz", "-k", "-T1", "-0"], "unxz")];
    for (tool, unpack) in packers {
        let mut args = tool[1..].to_vec();
        args.push(p(&q));
        must(tool[0], &args);
        let packed = dir.path().join(format!("src.qcow2.{}", if tool[0] == "gzip" { "gz" } else { "xz" }));
        let formats: [&[&str]; 2] = [&[], &["--format", "qcow2"]];
        for format in formats {
            let mut args = vec!["import", "--quiet"];
            args.extend_from_slice(format);
            args.extend_from_slice(&[p(&packed), &url]);
            let err = driveblk_fails(&args);
            assert!(err.contains("not a disk image") && err.contains(&format!("`{unpack} {}`", p(&packed))), "{err}");
        }
    }
    let err = driveblk_fails(&["import", "--quiet", "--format", "raw", p(&q), &url]);
    assert!(err.contains("is a qcow2 image: import it with --format qcow2") && err.contains("--force-raw"), "{err}");
    assert!(!remote.exists(), "the import touched the remote");

    // The way out named: convert, import, and the guest sees its disk.
    let conv = dir.path().join("disk.qcow2");
    must("qemu-img", &["convert", "-q", "-f", "vmdk", "-O", "qcow2", p(&dir.path().join("disk.vmdk")), p(&conv)]);
    run_ok(&["import", "--quiet", "--format", "qcow2", p(&conv), &url]);
    let sock = dir.path().join("sock");
    let cache = dir.path().join("cache");
    let d = Daemon::start(&sock, &["--volume", &url, "--cache-dir", p(&cache), "--read-only"]);
    let mut c = Client::connect_with(&sock, 1, true);
    assert!(read_disk(&mut c) == want, "the converted disk differs");
    drop(c);
    assert!(d.stop().success());
    // A raw disk whose first sector holds an image (a guest's container).
    let url2 = format!("dir:{}/vol2", p(&remote));
    run_ok(&["import", "--quiet", "--format", "raw", "--force-raw", p(&q), &url2]);

    // attach: a VMDK uploaded by hand next to the volume.
    std::fs::copy(dir.path().join("disk.vmdk"), remote.join("disk.vmdk")).unwrap();
    let base = format!("dir:{}/disk.vmdk", p(&remote));
    let att = format!("dir:{}/att", p(&remote));
    for format in ["raw", "qcow2"] {
        let err = driveblk_fails(&["attach", "--format", format, &base, &att]);
        assert!(err.contains("is a VMDK") && err.contains("qemu-img convert -f vmdk -O qcow2"), "{err}");
        assert!(!remote.join("att").exists(), "the attach wrote a volume");
    }
}

/// A qcow2 QEMU marked corrupt was uploaded, and every writable serve of
/// the volume then failed with "repair it with `qemu-img check -r all`",
/// which needs the file the user no longer has in hand: the import refuses
/// it now, naming the repair. One keeping its data in an external file
/// (`data_file`) is refused naming `qemu-img convert`.
#[test]
fn a_qcow2_marked_corrupt_or_with_a_data_file_is_refused_naming_the_way_out() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let (img, want) = make_qcow2(dir.path(), "c", "cluster_size=65536");
    // The corrupt bit: incompatible features (big-endian at 72), bit 1.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(79)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(79)).unwrap();
    f.write_all(&[b[0] | 2]).unwrap();
    drop(f);
    let remote = dir.path().join("remote");
    let url = format!("dir:{}/vol", p(&remote));
    let err = driveblk_fails(&["import", "--quiet", "--format", "qcow2", p(&img), &url]);
    assert!(
        err.contains("marked corrupt")
            && err.contains(&format!("qemu-img check -r all {}", p(&img)))
            && err.contains("nothing was uploaded"),
        "{err}"
    );
    assert!(!remote.exists(), "the import touched the remote");
    must("qemu-img", &["check", "-q", "-r", "all", p(&img)]);
    run_ok(&["import", "--quiet", "--format", "qcow2", p(&img), &url]);
    let sock = dir.path().join("sock");
    let cache = dir.path().join("cache");
    let d = Daemon::start(&sock, &["--volume", &url, "--cache-dir", p(&cache)]);
    let mut c = Client::connect(&sock, 1);
    assert!(read_disk(&mut c) == want, "the repaired disk differs");
    c.write(4 << 20, &[7u8; 4096]).unwrap();
    c.flush().unwrap();
    drop(c);
    assert!(d.stop().success());

    let data = dir.path().join("ext.data");
    let ext = dir.path().join("ext.qcow2");
    must("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", p(&data)), p(&ext), "16M"]);
    let url2 = format!("dir:{}/vol2", p(&remote));
    let err = driveblk_fails(&["import", "--quiet", "--format", "qcow2", p(&ext), &url2]);
    assert!(err.contains("external data file") && err.contains("qemu-img convert -O qcow2"), "{err}");
    let err = serve_fails(&sock, &["--image", p(&ext), "--format", "qcow2"]);
    assert!(err.contains("external data file") && err.contains("qemu-img convert -O qcow2"), "{err}");

    // Encrypted (LUKS), as virt-manager can make it: the decrypting copy named.
    let enc = dir.path().join("enc.qcow2");
    must(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=hunter2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            p(&enc),
            "16M",
        ],
    );
    let url3 = format!("dir:{}/vol3", p(&remote));
    let err = driveblk_fails(&["import", "--quiet", "--format", "qcow2", p(&enc), &url3]);
    assert!(err.contains("encrypted qcow2") && err.contains("qemu-img convert --object secret"), "{err}");
    let err = serve_fails(&sock, &["--image", p(&enc), "--format", "qcow2"]);
    assert!(err.contains("encrypted qcow2") && err.contains("qemu-img convert --object secret"), "{err}");
}

/// A qcow2 uploaded by hand that a volume could not serve (an overlay
/// whose base stayed behind, one QEMU marked corrupt) was attached without
/// a look, and only `serve` said so; `attach --format qcow2` now refuses it
/// before writing the volume, naming the way out.
#[test]
fn attach_refuses_a_qcow2_a_volume_could_not_serve() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    let (good, _) = make_qcow2(&remote, "good", "cluster_size=65536");
    let top = remote.join("top.qcow2");
    must("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "good.qcow2", "-F", "qcow2", p(&top), "16M"]);
    let bad = remote.join("bad.qcow2");
    std::fs::copy(&good, &bad).unwrap();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&bad).unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(79)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(79)).unwrap();
    f.write_all(&[b[0] | 2]).unwrap();
    drop(f);
    let vol = format!("dir:{}/vol", p(&remote));
    for (file, says) in [("top.qcow2", "overlay on a backing file"), ("bad.qcow2", "qemu-img check -r all")] {
        let base = format!("dir:{}/{file}", p(&remote));
        let err = driveblk_fails(&["attach", "--format", "qcow2", &base, &vol]);
        assert!(err.contains("cannot be served as a qcow2") && err.contains(says), "{file}: {err}");
        assert!(!remote.join("vol").exists(), "{file}: the attach wrote a volume");
    }
    run_ok(&["attach", "--format", "qcow2", &format!("dir:{}/good.qcow2", p(&remote)), &vol]);
}

/// Runs qemu-io commands on a qcow2 image.
fn qemu_io(img: &Path, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend_from_slice(&["-c", *c]);
    }
    args.push(p(img));
    run("qemu-io", &args)
}

/// The guest's view of a qcow2 per QEMU.
fn qemu_view(img: &Path, extra: &[&str]) -> Vec<u8> {
    let out = img.with_extension("view.raw");
    let mut args = vec!["convert", "-q", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[p(img), p(&out)]);
    must("qemu-img", &args);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

/// Images as QEMU, libvirt and virt-manager leave them: preallocated,
/// version 2, extended L2, zstd, the smallest and largest clusters, dirty
/// after a kill -9 with lazy refcounts, with a persistent dirty bitmap (a
/// libvirt backup's), with an internal snapshot (virt-manager's). Each is
/// imported, served writable from the volume (the guest sees what qemu-img
/// sees), written, stopped and exported: the export passes `qemu-img
/// check`, holds the guest's writes, keeps the snapshot, and QEMU can write
/// it again.
#[test]
fn qcow2_images_as_qemu_leaves_them_serve_write_and_export_like_qemu() {
    let cases: &[(&str, &str)] = &[
        ("prealloc-metadata", "preallocation=metadata"),
        ("prealloc-falloc", "preallocation=falloc"),
        ("prealloc-full", "preallocation=full"),
        ("v2", "compat=0.10"),
        ("extended-l2", "extended_l2=on"),
        ("zstd", "compression_type=zstd"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2097152"),
        ("dirty", "lazy_refcounts=on"),
        ("bitmap", "cluster_size=65536"),
        ("snapshot", "cluster_size=65536"),
    ];
    for &(name, opts) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = make_qcow2(dir.path(), name, opts);
        let mut snap = None;
        match name {
            "zstd" => assert!(qemu_io(&img, &["write -c -P 0x33 6M 1M"]).status.success()),
            "dirty" => {
                // QEMU killed with lazy refcounts: the dirty bit stays set.
                assert!(!qemu_io(&img, &["write -P 0x44 1M 1M", "flush", "sigraise 9"]).status.success());
                assert_eq!(std::fs::read(&img).unwrap()[79] & 1, 1, "the dirty bit is set");
            }
            "bitmap" => {
                must("qemu-img", &["bitmap", "--add", p(&img), "b0"]);
                assert!(qemu_io(&img, &["write -P 0x55 2M 64k"]).status.success());
            }
            "snapshot" => {
                must("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
                snap = Some(qemu_view(&img, &[]));
                assert!(qemu_io(&img, &["write -P 0x66 0 128k"]).status.success());
            }
            _ => {}
        }
        let mut want = qemu_view(&img, &[]);
        let remote = dir.path().join("remote");
        let url = format!("dir:{}/vol", p(&remote));
        run_ok(&["import", "--quiet", "--format", "qcow2", p(&img), &url]);
        let sock = dir.path().join("sock");
        let cache = dir.path().join("cache");
        let d = Daemon::start(&sock, &["--volume", &url, "--cache-dir", p(&cache), "--boot-profile", "off"]);
        let mut c = Client::connect(&sock, 1);
        assert!(read_disk(&mut c) == want, "{name}: the served disk differs from qemu-img's view");
        for (i, off) in [0u64, 5 << 20, (16 << 20) - 4096].into_iter().enumerate() {
            let data = common::pattern(100 + i as u64, 4096);
            c.write(off, &data).unwrap();
            want[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
        c.flush().unwrap();
        drop(c);
        assert!(d.stop().success(), "{name}: the daemon's stop");
        let out = dir.path().join("export.qcow2");
        run_ok(&["export", "--quiet", &url, p(&out), "--cache-dir", p(&cache)]);
        let check = run("qemu-img", &["check", p(&out)]);
        // 0: clean; 3: leaked clusters only (allowed, as after a crash).
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "{name}: qemu-img check of the export: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(qemu_view(&out, &[]) == want, "{name}: the export differs from what the guest wrote");
        if let Some(s) = &snap {
            assert!(&qemu_view(&out, &["-l", "snapshot.name=s1"]) == s, "{name}: the snapshot changed");
        }
        // QEMU writes the export again, and still finds it consistent.
        let w = run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 7M 64k", p(&out)]);
        assert!(w.status.success() && !String::from_utf8_lossy(&w.stdout).contains("error"), "{name}: {w:?}");
        let check = run("qemu-img", &["check", p(&out)]);
        assert!(matches!(check.status.code(), Some(0 | 3)), "{name}: {}", String::from_utf8_lossy(&check.stdout));
    }
}
