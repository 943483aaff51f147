//! The VM stored with a volume: `vm init` makes one identity (and refuses
//! to replace it without --force), `libvirt-xml` passes libvirt's own
//! schema check, and `qemu-args` starts a real QEMU whose vhost-user-blk
//! device negotiates with driveblk, which took the queue count (and disk
//! serial) from the same vm.toml (QEMU's -daemonize parent exits 0 only
//! once every device is realized).

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, run_ok, Daemon};

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
}

fn field<'a>(toml: &'a str, key: &str) -> &'a str {
    let l = toml.lines().find(|l| l.starts_with(&format!("{key} = "))).unwrap();
    l.split_once(" = ").unwrap().1.trim_matches('"')
}

#[test]
fn vm_init_then_libvirt_xml_validates_and_qemu_args_start_qemu() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.raw");
    common::make_raw(&img, 4 << 20, 1);
    let url = format!("dir:{}", d.path().join("w10").display());
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);

    let spec = run_ok(&["vm", "init", &url, "--memory-mib", "128", "--vcpus", "1", "--num-queues", "2"]);
    assert_eq!(field(&spec, "name"), "w10");
    assert_eq!(run_ok(&["vm", "show", &url]), spec, "vm.toml is stored with the volume");
    let again = Command::new(bin()).args(["vm", "init", &url]).output().unwrap();
    assert!(!again.status.success(), "a second init must not change the VM's identity");
    assert_eq!(run_ok(&["vm", "show", &url]), spec);

    let sock = d.path().join("w10.sock");
    let xml = run_ok(&["libvirt-xml", &url, "--socket", sock.to_str().unwrap()]);
    assert!(xml.contains("<disk type='vhostuser' device='disk'>"), "{xml}");
    assert!(xml.contains(&format!("<source type='unix' path='{}'>", sock.display())), "{xml}");
    assert!(xml.contains(&format!("<uuid>{}</uuid>", field(&spec, "uuid"))), "{xml}");
    assert!(xml.contains("<access mode='shared'/>"), "{xml}");
    if have("virt-xml-validate") && have("xmllint") {
        let f = d.path().join("dom.xml");
        std::fs::write(&f, &xml).unwrap();
        let out = Command::new("virt-xml-validate").arg(&f).arg("domain").output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("SKIP virt-xml-validate: install libvirt-clients and libxml2-utils (scripts/deps.sh)");
    }

    if !have("qemu-system-x86_64") {
        eprintln!("SKIP qemu: qemu-system-x86_64 not installed (scripts/deps.sh)");
        return;
    }
    // No --serial or --num-queues: serve takes them from vm.toml, and QEMU
    // (num-queues=2 from the same file) would refuse a 1-queue backend.
    let daemon = Daemon::start(
        &sock,
        &["--volume", &url, "--format", "raw", "--cache-dir", d.path().join("cache").to_str().unwrap()],
    );
    let args = run_ok(&["qemu-args", &url, "--accel", "tcg", "--socket", sock.to_str().unwrap(), "--lines"]);
    let pidfile = d.path().join("qemu.pid");
    let out = Command::new("qemu-system-x86_64")
        .args(args.lines())
        .args(["-display", "none", "-S", "-monitor", "none", "-serial", "none", "-daemonize", "-pidfile"])
        .arg(&pidfile)
        .output()
        .unwrap();
    let pid: Option<i32> = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse().ok());
    if let Some(pid) = pid {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(out.status.success(), "QEMU refused the generated arguments: {}", String::from_utf8_lossy(&out.stderr));
    assert!(pid.is_some(), "QEMU started");
    drop(daemon);
    let _ = Path::new(&pidfile);
}

/// The VM's disk identity holds on every start: serve keeps a copy of
/// vm.toml in its cache directory and uses it when the remote is
/// unreachable (else an offline laptop shows its guest another disk serial
/// and one queue where QEMU asks for two); a vm.toml that does not parse
/// stops serve, and one with fields a newer driveblk added still serves.
#[test]
fn serve_takes_the_disk_identity_from_vm_toml_offline_too_and_refuses_a_broken_one() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img.raw");
    common::make_raw(&img, 4 << 20, 1);
    let remote = d.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    let url = format!("dir:{}", remote.join("w10").display());
    run_ok(&["import", "--quiet", img.to_str().unwrap(), &url]);
    let spec = run_ok(&["vm", "init", &url, "--memory-mib", "128", "--vcpus", "1", "--num-queues", "2"]);
    let serial = field(&spec, "disk_serial").to_string();
    let sock = d.path().join("w10.sock");
    let cache = d.path().join("cache");
    let args = ["--volume", &url, "--format", "raw", "--cache-dir", cache.to_str().unwrap(), "--boot-profile", "off"];
    let log = d.path().join("serve.log");
    // Serves with vm.toml's serial and two queues (a client asking for two
    // is refused by a one-queue backend).
    let serves_vm = |whence: &str| {
        let daemon = Daemon::start_logged(&sock, &args, &[], Some(&log));
        let c = common::Client::connect(&sock, 2);
        drop(c);
        assert!(daemon.stop().success());
        let l = std::fs::read_to_string(&log).unwrap();
        assert!(l.contains(&format!("serial={serial}")) && l.contains("queues=2"), "{whence}: {l}");
        l
    };
    serves_vm("online");
    assert!(cache.join("vm.toml").exists(), "no copy of vm.toml kept in the cache directory");

    // The remote is unreachable (its folder moved away): the copy serves.
    let gone = d.path().join("remote-gone");
    std::fs::rename(&remote, &gone).unwrap();
    let l = serves_vm("offline");
    assert!(l.contains("offline") || l.contains("unreachable"), "{l}");
    std::fs::rename(&gone, &remote).unwrap();

    // A newer driveblk's field: ignored with a warning, the rest used.
    let vm = remote.join("w10/vm.toml");
    std::fs::write(&vm, format!("{spec}disk_wwn = \"0x5000c500a0b1c2d3\"\n")).unwrap();
    let l = serves_vm("with an unknown field");
    assert!(l.contains("disk_wwn"), "the unknown field was not named: {l}");

    // A vm.toml that does not parse: serve stops, saying which and how out.
    std::fs::write(&vm, spec.replace("num_queues = 2", "num_queues = \"two\"")).unwrap();
    let err = common::serve_fails(&sock, &args);
    assert!(err.contains("vm.toml") && err.contains("cannot be used") && err.contains("--serial"), "{err}");
}
