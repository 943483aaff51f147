//! The same VM on every host: a small `vm.toml` stored with the volume
//! (machine, CPU, memory, SMBIOS UUID, NIC MAC, disk serial, queues), made
//! once by `driveblk vm init`, from which `driveblk qemu-args` and
//! `driveblk libvirt-xml` generate a QEMU command line and a libvirt domain
//! — so Windows sees the same hardware (no reactivation, same NIC) wherever
//! the volume is served.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::cli::remote::RemoteArgs;
use crate::volume::sidecar;

/// The sidecar's name.
pub const VM_FILE: &str = "vm.toml";

/// A VM's identity and shape. Fields this binary does not know (a newer
/// driveblk's) are ignored with a warning, so one machine upgraded first
/// does not stop the others from serving the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name used for the libvirt domain and the default socket path.
    pub name: String,
    /// QEMU machine type.
    pub machine: String,
    /// QEMU CPU model (`host` = passthrough).
    pub cpu: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// SMBIOS system UUID (Windows activation keys on it).
    pub uuid: String,
    /// The NIC's MAC address.
    pub mac: String,
    /// The disk's serial (what `driveblk serve --serial` must give).
    pub disk_serial: String,
    /// Virtqueues of the disk (`serve --num-queues`).
    pub num_queues: u16,
}

fn check(v: &VmSpec) -> anyhow::Result<()> {
    if v.name.is_empty() || !v.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        bail!("name {:?}: use letters, digits, '-', '_' or '.'", v.name);
    }
    uuid::Uuid::parse_str(&v.uuid).with_context(|| format!("uuid {:?}", v.uuid))?;
    let parts: Vec<&str> = v.mac.split(':').collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err()) {
        bail!("mac {:?} is not like 52:54:00:12:34:56", v.mac);
    }
    if v.disk_serial.is_empty() || v.disk_serial.len() > crate::vhost::config::ID_BYTES {
        bail!("disk_serial must be 1 to {} bytes", crate::vhost::config::ID_BYTES);
    }
    if !v.disk_serial.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("disk_serial {:?}: letters, digits and '-' only", v.disk_serial);
    }
    if v.num_queues == 0 || v.num_queues > 64 {
        bail!("num_queues must be between 1 and 64");
    }
    if v.memory_mib < 64 || v.vcpus == 0 {
        bail!("memory_mib must be at least 64 and vcpus at least 1");
    }
    for (k, s) in [("machine", &v.machine), ("cpu", &v.cpu)] {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')) {
            bail!("{k} {s:?} is not a QEMU model name");
        }
    }
    Ok(())
}

/// A fresh identity: random UUID, a locally administered QEMU-range MAC, a
/// random serial.
pub fn fresh(name: &str, memory_mib: u64, vcpus: u32, num_queues: u16) -> VmSpec {
    let r: [u8; 3] = rand::random();
    let serial: [u8; 6] = rand::random();
    VmSpec {
        name: name.to_string(),
        machine: "q35".into(),
        cpu: "host".into(),
        memory_mib,
        vcpus,
        uuid: uuid::Uuid::new_v4().to_string(),
        mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", r[0], r[1], r[2]),
        disk_serial: format!("DBLK-{}", hex::encode_upper(serial)),
        num_queues,
    }
}

/// Parses and checks a vm.toml; its fields this binary does not know are
/// named in a warning and ignored.
pub fn parse(text: &str) -> anyhow::Result<VmSpec> {
    let (v, unknown) = parse_with_unknown(text)?;
    if !unknown.is_empty() {
        tracing::warn!(
            "{VM_FILE} has fields this driveblk does not know ({}): written by a newer driveblk? They are ignored \
             here; upgrade this machine (docs/restart.md) if they change the VM",
            unknown.join(", ")
        );
    }
    Ok(v)
}

/// [`parse`], and the names of the fields it ignored.
fn parse_with_unknown(text: &str) -> anyhow::Result<(VmSpec, Vec<String>)> {
    let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{VM_FILE}: {e}"))?;
    let v: VmSpec = toml::Value::Table(table.clone()).try_into().map_err(|e| anyhow::anyhow!("{VM_FILE}: {e}"))?;
    check(&v).with_context(|| format!("{VM_FILE} is not valid"))?;
    let known = toml::Value::try_from(&v)?;
    let unknown = table.keys().filter(|k| known.get(k.as_str()).is_none()).cloned().collect();
    Ok((v, unknown))
}

/// The last path segment of a volume URL, as a name.
fn default_name(url: &str) -> String {
    let tail = url.trim_end_matches('/').rsplit(['/', ':', '=']).next().unwrap_or("vm");
    let n: String = tail.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    if n.is_empty() {
        "vm".into()
    } else {
        n
    }
}

/// Shell-quotes one word if it needs it.
fn sh(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_=,./:@%+".contains(c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// QEMU's arguments for the VM, with its disk on `socket`.
pub fn qemu_args(v: &VmSpec, socket: &str, accel: &str) -> Vec<String> {
    let mem = format!("{}M", v.memory_mib);
    let cpu = if accel == "tcg" && v.cpu == "host" { "max".to_string() } else { v.cpu.clone() };
    let a = [
        "-name".to_string(),
        v.name.clone(),
        "-machine".into(),
        format!("{},accel={accel}", v.machine),
        "-cpu".into(),
        cpu,
        "-smp".into(),
        v.vcpus.to_string(),
        "-m".into(),
        mem.clone(),
        // vhost-user needs guest memory the backend can map: memfd, shared.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-uuid".into(),
        v.uuid.clone(),
        // reconnect-ms: QEMU reconnects when driveblk restarts.
        "-chardev".into(),
        format!("socket,id=disk0,path={socket},reconnect-ms=1000"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=disk0,num-queues={},bootindex=1", v.num_queues),
        "-netdev".into(),
        "user,id=net0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=net0,mac={}", v.mac),
    ];
    a.to_vec()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// A libvirt domain for the VM, with its disk on `socket`.
pub fn libvirt_xml(v: &VmSpec, socket: &str, domain_type: &str) -> String {
    let cpu = if v.cpu == "host" {
        "  <cpu mode='host-passthrough'/>\n".to_string()
    } else {
        format!(
            "  <cpu mode='custom' match='exact'>\n    <model fallback='forbid'>{}</model>\n  </cpu>\n",
            xml_escape(&v.cpu)
        )
    };
    format!(
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
{cpu}  <!-- vhost-user needs guest memory driveblk can map -->
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <devices>
    <!-- served by driveblk serve, which gives the guest the disk serial of vm.toml -->
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='{queues}'/>
      <source type='unix' path='{socket}'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <graphics type='vnc' port='-1' listen='127.0.0.1'/>
    <video>
      <model type='virtio'/>
    </video>
  </devices>
</domain>
",
        name = xml_escape(&v.name),
        uuid = v.uuid,
        mem = v.memory_mib,
        vcpus = v.vcpus,
        machine = xml_escape(&v.machine),
        queues = v.num_queues,
        socket = xml_escape(socket),
        mac = v.mac,
    )
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create the volume's vm.toml with a fresh UUID, MAC and disk serial.
    Init(InitArgs),
    /// Show the volume's vm.toml.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The volume to store the VM with.
    pub url: String,
    /// Domain name (default: the volume's last path segment).
    #[arg(long)]
    pub name: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 4096)]
    pub memory_mib: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Virtqueues of the disk (`serve` serves this many unless --num-queues says otherwise).
    #[arg(long, default_value_t = 2)]
    pub num_queues: u16,
    /// QEMU CPU model (host = passthrough; a named model keeps the CPU the
    /// same across hosts of different generations).
    #[arg(long, default_value = "host")]
    pub cpu: String,
    /// QEMU machine type.
    #[arg(long, default_value = "q35")]
    pub machine: String,
    /// Replace an existing vm.toml (a new identity: Windows may ask to reactivate).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The volume whose vm.toml to show.
    pub url: String,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct GenArgs {
    /// The volume whose vm.toml describes the VM.
    pub url: String,
    /// The vhost-user socket `driveblk serve` listens on (default:
    /// /run/driveblk/NAME.sock, as the systemd unit uses).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Accelerator (qemu-args) or domain type (libvirt-xml): kvm, or tcg
    /// (qemu) on a machine without KVM.
    #[arg(long, default_value = "kvm")]
    pub accel: String,
    /// qemu-args: one argument per line (for scripts) instead of a shell line.
    #[arg(long)]
    pub lines: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn load(url: &str, remote: &RemoteArgs) -> anyhow::Result<VmSpec> {
    let Some(bytes) = sidecar::read(url, VM_FILE, &remote.options())? else {
        bail!("{url} has no {VM_FILE} yet: run `driveblk vm init {url}` once");
    };
    parse(&String::from_utf8_lossy(&bytes))
}

fn socket_of(a: &GenArgs, v: &VmSpec) -> String {
    a.socket.as_ref().map_or_else(|| format!("/run/driveblk/{}.sock", v.name), |p| p.display().to_string())
}

pub fn vm(c: VmCommand) -> anyhow::Result<()> {
    match c {
        VmCommand::Init(a) => {
            let mut v =
                fresh(&a.name.clone().unwrap_or_else(|| default_name(&a.url)), a.memory_mib, a.vcpus, a.num_queues);
            v.cpu = a.cpu;
            v.machine = a.machine;
            check(&v)?;
            let text = toml::to_string(&v)?;
            sidecar::write(&a.url, VM_FILE, text.clone().into_bytes(), a.force, &a.remote.options())?;
            print!("{text}");
            eprintln!(
                "stored {VM_FILE} with {}; serve the volume with --serial {} --num-queues {}",
                a.url, v.disk_serial, v.num_queues
            );
            Ok(())
        }
        VmCommand::Show(a) => {
            print!("{}", toml::to_string(&load(&a.url, &a.remote)?)?);
            Ok(())
        }
    }
}

pub fn qemu(a: GenArgs) -> anyhow::Result<()> {
    if !["kvm", "tcg"].contains(&a.accel.as_str()) {
        bail!("--accel must be kvm or tcg");
    }
    let v = load(&a.url, &a.remote)?;
    let args = qemu_args(&v, &socket_of(&a, &v), &a.accel);
    if a.lines {
        for w in args {
            println!("{w}");
        }
    } else {
        let mut out = "qemu-system-x86_64".to_string();
        for pair in args.chunks(2) {
            out += &format!(" \\\n  {}", pair.iter().map(|w| sh(w)).collect::<Vec<_>>().join(" "));
        }
        println!("{out}");
    }
    Ok(())
}

pub fn libvirt(a: GenArgs) -> anyhow::Result<()> {
    let domain = match a.accel.as_str() {
        "kvm" => "kvm",
        "tcg" | "qemu" => "qemu",
        _ => bail!("--accel must be kvm or tcg"),
    };
    let v = load(&a.url, &a.remote)?;
    print!("{}", libvirt_xml(&v, &socket_of(&a, &v), domain));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_specs_are_valid_distinct_and_round_trip() {
        let a = fresh("w10", 4096, 2, 2);
        let b = fresh("w10", 4096, 2, 2);
        check(&a).unwrap();
        assert_ne!((a.uuid.clone(), a.mac.clone(), a.disk_serial.clone()), (b.uuid, b.mac, b.disk_serial));
        assert!(a.disk_serial.len() <= 20);
        assert_eq!(parse(&toml::to_string(&a).unwrap()).unwrap(), a);
        assert!(parse("name = 'x'\nbogus = 1\n").is_err());
        // A newer driveblk's field is ignored, and named.
        let newer = format!("{}disk_wwn = \"0x5000c500a0b1c2d3\"\n", toml::to_string(&a).unwrap());
        let (v, unknown) = parse_with_unknown(&newer).unwrap();
        assert_eq!((v, unknown), (a.clone(), vec!["disk_wwn".to_string()]));
        let mut bad = a.clone();
        bad.mac = "52:54:00:zz:00:00".into();
        assert!(check(&bad).is_err());
    }

    #[test]
    fn qemu_args_carry_the_identity_and_shared_memory() {
        let v = fresh("w10", 2048, 2, 4);
        let a = qemu_args(&v, "/run/driveblk/w10.sock", "kvm").join(" ");
        assert!(a.contains("memory-backend-memfd,id=mem,size=2048M,share=on"), "{a}");
        assert!(a.contains("socket,id=disk0,path=/run/driveblk/w10.sock,reconnect-ms=1000"), "{a}");
        assert!(a.contains("vhost-user-blk-pci,chardev=disk0,num-queues=4"), "{a}");
        assert!(a.contains(&format!("-uuid {}", v.uuid)) && a.contains(&format!("mac={}", v.mac)), "{a}");
        assert_eq!(default_name("gdrive:/vms/win10"), "win10");
        assert_eq!(sh("it's"), r"'it'\''s'");
    }
}
