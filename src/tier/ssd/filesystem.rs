//! What the file system under a cache directory can do, asked once when a
//! cache is opened to serve: files only their owner can read (the cache
//! holds the guest's disk), and a data file as long as the image (chunk N
//! lives at N × chunk size: sparse where the file system has holes, every
//! byte taken on disk where it has none, as on exFAT and FAT). A file
//! system that cannot give what the cache needs is refused here, by name,
//! with the way out, before a guest write meets the errno.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::remote::private;
use crate::volume::lease::human;

/// The probe file's length: a file system with holes allocates none of it.
const PROBE_LEN: u64 = 1 << 20;
/// The largest file FAT holds (4 GiB less a byte).
const FAT_MAX_FILE: u64 = (4 << 30) - 1;

/// The file system under `dir` as `mount` names it ("xfs", "btrfs",
/// "fuseblk (/dev/sdb1)"), else by its magic number.
/// `dir` need not exist: its nearest existing parent is asked.
pub(crate) fn name(dir: &Path) -> String {
    let dir = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    from_mountinfo(dir).unwrap_or_else(|| from_magic(dir))
}

/// Why a cache directory on a read-only mount cannot be used.
pub(crate) fn read_only(dir: &Path) -> String {
    format!(
        "it is on {}, mounted read-only, and driveblk writes in a cache directory it uses (its lock and state, \
         even to read it): remount it read-write, or copy the directory to a writable file system and pass that \
         as --cache-dir",
        name(dir)
    )
}

/// The type of the mount whose device is `dir`'s, from
/// `/proc/self/mountinfo` (FUSE ones with their source: "fuseblk" alone
/// says nothing of exFAT or NTFS).
fn from_mountinfo(dir: &Path) -> Option<String> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let want = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let mut f = l.split(' ');
        if f.nth(2)? != want {
            return None;
        }
        let mut after = l.split(" - ").nth(1)?.split(' ');
        let (kind, source) = (after.next()?, after.next().unwrap_or_default());
        Some(if kind.starts_with("fuse") { format!("{kind} ({source})") } else { kind.to_string() })
    })
}

/// The file system's name from its `statfs` magic number.
fn from_magic(dir: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(dir) else { return "an unknown file system".into() };
    let magic = st.f_type as u64;
    let name = match magic {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x4d44 => "vfat",
        0x2011_bab0 => "exfat",
        0x7366_746e => "ntfs3",
        0x6573_5546 => "fuse",
        0x794c_7630 => "overlay",
        0x6969 => "nfs",
        0x2fc1_2fc1 => "zfs",
        0xf2f5_2010 => "f2fs",
        _ => return format!("file system type {magic:#x}"),
    };
    name.into()
}

/// True when `dir` is on a file system held in memory (tmpfs, ramfs),
/// which a reboot or a power loss empties.
pub(crate) fn in_memory(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|st| matches!(st.f_type as u64, 0x0102_1994 | 0x8584_58f6))
}

/// True for FAT by its name or magic number (a FUSE FAT included).
fn is_fat(name: &str, dir: &Path) -> bool {
    let kind = name.split(' ').next().unwrap_or_default();
    matches!(kind, "vfat" | "msdos" | "fat" | "fuse.fusefat")
        || rustix::fs::statfs(dir).is_ok_and(|st| st.f_type as u64 == 0x4d44)
}

/// What the probe found.
struct Found {
    /// The mode a file created 0600 got.
    mode: u32,
    /// A file's length takes no disk space until written.
    holes: bool,
    /// The file system refused a file as long as the image (`EFBIG`).
    too_long: bool,
}

/// Creates `p` (0600), lengthens it to find holes, and to `image_len`
/// where that costs nothing.
fn probe(p: &Path, image_len: u64) -> Result<Found, String> {
    let f = private::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .map_err(|e| format!("cannot create a file there ({e})"))?;
    let mode = f.metadata().map_err(|e| format!("cannot read a file's mode there ({e})"))?.mode() & 0o777;
    f.set_len(PROBE_LEN).map_err(|e| format!("cannot set a file's length there ({e})"))?;
    let blocks = f.metadata().map_err(|e| format!("cannot read a file's size there ({e})"))?.blocks();
    let holes = blocks * 512 < PROBE_LEN / 2;
    let too_long =
        holes && image_len > PROBE_LEN && f.set_len(image_len).is_err_and(|e| e.raw_os_error() == Some(libc::EFBIG));
    Ok(Found { mode, holes, too_long })
}

/// Checks that the file system under `dir` can hold a cache (whose files
/// are `sealed`, encrypted, or not) of an image `image_len` bytes long
/// whose data file is `data_len` bytes now. Ok: whether it has holes (where
/// it has none, evicting a chunk frees no disk space). Err: why not, naming
/// the file system and the way out. The caller holds the directory's lock.
pub(super) fn check(dir: &Path, image_len: u64, data_len: u64, sealed: bool) -> Result<bool, String> {
    let fs = name(dir);
    // Probes a killed process left (the caller holds the directory's lock).
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".probe-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let p = dir.join(format!(".probe-{}", std::process::id()));
    let found = probe(&p, image_len);
    let _ = std::fs::remove_file(&p);
    let found = found.map_err(|why| format!("it is on {fs}, which {why}"))?;
    if found.mode & 0o077 != 0 {
        let why = format!(
            "it is on {fs}, which keeps no Unix permissions there: a file created for its owner alone (mode 600) \
             gets mode {:03o}, open to other users",
            found.mode
        );
        if !sealed {
            return Err(format!(
                "{why}, and the cache holds the guest's disk. Mount it with `uid=$(id -u),umask=077` (FAT, exFAT, \
                 NTFS), serve an encrypted volume with --encrypt-cache, or pass a --cache-dir on ext4, XFS or btrfs"
            ));
        }
        tracing::warn!(dir = %dir.display(), "{why}; the cache is encrypted, so they can read only ciphertext");
    }
    let grows = "the cache's data file keeps each chunk at its offset in the image, so it grows to the image's \
                 length";
    if found.too_long {
        return Err(format!(
            "it is on {fs}, which cannot hold a file of {} ({image_len} bytes, the image's length): {grows}. Pass \
             a --cache-dir on a file system that holds files that large (XFS, btrfs, ext4 with 4 KiB blocks)",
            human(image_len)
        ));
    }
    if found.holes {
        return Ok(true);
    }
    if is_fat(&fs, dir) && image_len > FAT_MAX_FILE {
        return Err(format!(
            "it is on {fs}, which holds files of at most 4 GiB, and the image is {} ({image_len} bytes): {grows}. \
             Pass a --cache-dir on ext4, XFS or btrfs (or exFAT with room for the whole image)",
            human(image_len)
        ));
    }
    let need = image_len.saturating_sub(data_len);
    let free = rustix::fs::statvfs(dir).map(|st| st.f_bavail.saturating_mul(st.f_frsize)).unwrap_or(u64::MAX);
    let holes = format!(
        "it is on {fs}, which has no sparse files: the cache's data file, which keeps each chunk at its offset in \
         the image, takes the image's whole length on this disk whatever --ssd-cache says, and eviction frees none \
         of it"
    );
    if need > free {
        return Err(format!(
            "{holes}; it needs {} more, and {} are free. Free space there, or pass a --cache-dir on ext4, XFS or \
             btrfs, which keep only what is cached",
            human(need),
            human(free)
        ));
    }
    // Write-back's copies of chunks rewritten while they upload (the
    // `frozen` file, also at their offsets) may take as much again.
    let frozen = std::fs::metadata(dir.join("frozen")).map_or(0, |m| m.len());
    let worst = need.saturating_add(image_len.saturating_sub(frozen));
    if worst > free {
        tracing::warn!(
            dir = %dir.display(),
            image = %human(image_len),
            free = %human(free),
            "{holes}; with the copies write-back keeps of chunks rewritten while they upload (as much again, at \
             worst) it may need {} more, and a guest write fails when the disk is full: free space there, or use a \
             --cache-dir on ext4, XFS or btrfs",
            human(worst)
        );
    } else {
        tracing::warn!(dir = %dir.display(), image = %human(image_len), "{holes}");
    }
    Ok(false)
}
