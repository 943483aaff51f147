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
