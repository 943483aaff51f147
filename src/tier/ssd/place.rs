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
//! move, not a copy: the original is gone).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Where a state file is being written, or was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Place {
    /// This machine (`machine_hash`).
    pub(super) machine: String,
    /// The cache directory's inode.
    pub(super) inode: u64,
}

impl Place {
    /// The place of the cache directory `dir` on this machine.
    pub(super) fn here(dir: &Path) -> std::io::Result<Self> {
        Ok(Self { machine: machine_hash().to_string(), inode: std::fs::metadata(dir)?.ino() })
    }

    /// Why a state recorded at `machine` / `inode` was not written here
    /// (None: it was, or it records no place, as before it did).
    pub(super) fn moved_from(&self, machine: &str, inode: u64) -> Option<String> {
        if !machine.is_empty() && machine != self.machine {
            Some("its state was written on another machine".into())
        } else if inode != 0 && inode != self.inode {
            Some(format!("its state was written in another directory (inode {inode}; this one is {})", self.inode))
        } else {
            None
        }
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
