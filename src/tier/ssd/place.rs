//! Where a cache directory lives: this machine and the directory itself.
//! A cache's id is what manifests and the writer lease name as "this
//! cache" (a restart re-takes its own lease, adopts its own commits). A
//! copy of the directory — `cp -a` to pre-warm another machine, a backup
//! restored, one share mounted on two machines — must not pass for the
//! cache it was copied from, so the state records where it was written,
//! and an open that finds it elsewhere gives the copy an id of its own.
//!
//! The machine is a hash of `/etc/machine-id` (systemd: never to be shown
//! as it is), else of the host name. The directory is its inode alone: a
//! device number may change across reboots (disks enumerated in another
//! order), which must not look like a copy; a copy, even on the same file
//! system, is a new inode. A rename within a file system keeps it (a
//! move, not a copy: the original is gone). On btrfs a snapshot keeps
//! every inode number of its source, so there the directory is also its
//! subvolume: a snapshot (a rollback to one, a `btrfs receive`) is a new
//! subvolume, which a reboot never renumbers.
//!
//! FAT and exFAT have no inode numbers: the kernel (or a FUSE driver)
//! makes them up at every mount, so there the directory is not recorded,
//! and only a copy to another machine is told from the cache itself.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Where a state file is being written, or was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Place {
    /// This machine (`machine_hash`).
    pub(super) machine: String,
    /// The cache directory's inode (0 where the file system has no
    /// lasting ones).
    pub(super) inode: u64,
    /// Its btrfs subvolume (0 on other file systems).
    pub(super) subvol: u64,
}

impl Place {
    /// The place of the cache directory `dir` on this machine.
    pub(super) fn here(dir: &Path) -> std::io::Result<Self> {
        let f = File::open(dir)?;
        let inode = if lasting_inodes(&f) { f.metadata()?.ino() } else { 0 };
        Ok(Self { machine: machine_hash().to_string(), inode, subvol: btrfs_subvolume(&f) })
    }

    /// Why a state recorded at `machine` / `inode` / `subvol` was not
    /// written here (None: it was, or it records no place, as before it
    /// did).
    pub(super) fn moved_from(&self, machine: &str, inode: u64, subvol: u64) -> Option<String> {
        if !machine.is_empty() && machine != self.machine {
            Some("its state was written on another machine".into())
        } else if inode != 0 && self.inode != 0 && inode != self.inode {
            Some(format!("its state was written in another directory (inode {inode}; this one is {})", self.inode))
        } else if subvol != 0 && subvol != self.subvol {
            Some(format!(
                "its state was written in another btrfs subvolume (id {subvol}; this one is {}), as a snapshot's is",
                self.subvol
            ))
        } else {
            None
        }
    }
}

/// False on file systems whose inode numbers are made up at mount (FAT,
/// exFAT; FUSE drivers, which may): a remount would look like a copy.
fn lasting_inodes(dir: &File) -> bool {
    const MSDOS_SUPER_MAGIC: u64 = 0x4d44;
    const EXFAT_SUPER_MAGIC: u64 = 0x2011_bab0;
    const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
    rustix::fs::fstatfs(dir)
        .is_ok_and(|st| !matches!(st.f_type as u64, MSDOS_SUPER_MAGIC | EXFAT_SUPER_MAGIC | FUSE_SUPER_MAGIC))
}

/// The id of the btrfs subvolume holding the open directory `dir` (0 on
/// other file systems, or when it cannot be asked).
fn btrfs_subvolume(dir: &File) -> u64 {
    const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;
    /// `BTRFS_IOC_INO_LOOKUP`: `_IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)`.
    const INO_LOOKUP: u64 = 0xd000_9412;
    /// `struct btrfs_ioctl_ino_lookup_args`.
    #[repr(C)]
    struct InoLookup {
        treeid: u64,
        objectid: u64,
        name: [u8; 4080],
    }
    match rustix::fs::fstatfs(dir) {
        Ok(st) if st.f_type as u64 == BTRFS_SUPER_MAGIC => {}
        _ => return 0,
    }
    // Tree 0 and the first free object id: the subvolume of the fd itself,
    // which btrfs answers without privileges.
    let mut a = InoLookup { treeid: 0, objectid: 256, name: [0; 4080] };
    // SAFETY: the ioctl reads and writes the struct it is given, whose
    // layout is the kernel's.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), INO_LOOKUP as _, &mut a as *mut InoLookup) };
    if r == 0 {
        a.treeid
    } else {
        0
    }
}

/// This machine, as recorded in state files: 32 hex digits of a hash of
/// its machine id (or host name), never the id itself.
pub(super) fn machine_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let raw = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .find(|s| !s.is_empty())
            .map(|id| format!("machine-id:{id}"))
            // The system's name, not DRIVEBLK_HOSTNAME (which names a host in
            // messages and may be changed at will).
            .unwrap_or_else(|| format!("host:{}", crate::volume::commit::system_hostname().unwrap_or_default()));
        let mut h = Sha256::new();
        h.update(b"driveblk cache place v1\n");
        h.update(raw.as_bytes());
        hex::encode(&h.finalize()[..16])
    })
}
