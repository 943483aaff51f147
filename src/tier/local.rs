//! A local file as storage: positioned vectored I/O straight into the
//! caller's buffers (guest memory), `RWF_NOWAIT` for the non-blocking fast
//! path, hole punching for zeroes, `fdatasync` for flush.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::tier::Storage;
use crate::tier::{IoMode, IoVec};

/// Maximum iovecs per preadv/pwritev call (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// A local image file.
#[derive(Debug)]
pub struct LocalFile {
    file: File,
    path: PathBuf,
    read_only: bool,
    len: AtomicU64,
    /// Cleared once the kernel says RWF_NOWAIT is unsupported here, so we stop
    /// asking (the blocking worker then serves every request).
    nowait_reads: AtomicBool,
    /// The file lives in memory (tmpfs, ramfs): a read never waits on a
    /// device, so the non-blocking path reads at once. (tmpfs refuses
    /// RWF_NOWAIT, which would send every read to the blocking workers.)
    in_memory: bool,
    /// Bumped after every write (of data, zeroes, length) completes;
    /// `synced` is the value the last good `fdatasync` covered, so a flush
    /// with nothing written since costs no fsync.
    written: AtomicU64,
    synced: AtomicU64,
}

impl LocalFile {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        // Without access-time updates: on every read the kernel otherwise
        // checks whether atime is due (about 2.5% of a queue thread serving
        // SSD hits). Only the owner (or CAP_FOWNER) may ask for it.
        let with = |flags| OpenOptions::new().read(true).write(!read_only).custom_flags(flags).open(path);
        let file = match with(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => with(0)?,
            r => r?,
        };
        let meta = file.metadata()?;
        if !meta.is_file() && !meta.file_type().is_block_device_like() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let len = file_len(&file)?;
        let in_memory = in_memory_fs(&file);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            len: AtomicU64::new(len),
            nowait_reads: AtomicBool::new(true),
            in_memory,
            // Unequal: the first flush syncs what earlier openers wrote.
            written: AtomicU64::new(1),
            synced: AtomicU64::new(0),
        })
    }

    /// Takes QEMU's image locks on the file ([`qemu_lock`](super::qemu_lock)):
    /// a writer refuses other writers and readers who need the image to
    /// hold still, a reader refuses writers; QEMU, qemu-img and other
    /// driveblk processes take and honour the same locks. Fails at once, with
    /// `ResourceBusy`, if another process holds a conflicting lock. Held until
    /// the file is closed. Also the `flock` driveblk took before it took
    /// QEMU's locks, so a daemon of an earlier version still serving the
    /// image on this host (an upgrade without a restart) is seen too.
    pub fn lock(&self, exclusive: bool) -> io::Result<()> {
        let access = if exclusive { super::qemu_lock::Access::Write } else { super::qemu_lock::Access::Read };
        super::qemu_lock::lock(&self.file, &self.path, access)?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
        // SAFETY: plain syscall on an owned fd.
        if unsafe { libc::flock(self.file.as_raw_fd(), op) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                // Not WouldBlock: to the layers above that means "retry on a
                // thread that may block".
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "another driveblk (an earlier version, which locks with flock) is using the image {}",
                        self.path.display()
                    ),
                ));
            }
            tracing::debug!(path = %self.path.display(), error = %e, "no flock here");
        }
        Ok(())
    }

    /// Notes that a write finished (well or not: a failed one may still
    /// have changed some bytes), so the next flush syncs.
    fn wrote<T>(&self, r: io::Result<T>) -> io::Result<T> {
        self.written.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn readv_once(&self, offset: u64, iov: &[libc::iovec], nowait: bool) -> io::Result<usize> {
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        let n = iov.len().min(IOV_MAX);
        // SAFETY: the iovecs describe memory valid for writes (IoVec invariant).
        let r = unsafe { libc::preadv2(self.file.as_raw_fd(), iov.as_ptr(), n as i32, offset as i64, flags) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn writev_once(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<usize> {
        let n = iov.len().min(IOV_MAX);
        // SAFETY: the iovecs describe memory valid for reads (IoVec invariant).
        let r = unsafe { libc::pwritev2(self.file.as_raw_fd(), iov.as_ptr(), n as i32, offset as i64, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

trait FileTypeExt {
    fn is_block_device_like(&self) -> bool;
}
impl FileTypeExt for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt as _;
        self.is_block_device()
    }
}

/// True if `file` is on a filesystem held in memory (tmpfs, ramfs).
fn in_memory_fs(file: &File) -> bool {
    // SAFETY: fstatfs fills the struct it is given; an all-zero statfs is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on an owned fd.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    // statfs(2)'s magic numbers of tmpfs and ramfs.
    matches!(st.f_type as u64, 0x0102_1994 | 0x8584_58f6)
}

fn file_len(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // Works for block devices too, where metadata().len() is 0.
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Advances `iov` past `n` consumed bytes.
fn advance(iov: &mut crate::tier::iovec::IoVecs, mut n: usize) {
    let mut drop_count = 0;
    for v in iov.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            drop_count += 1;
        } else {
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iov.drain(..drop_count);
}

impl Storage for LocalFile {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        let total = bufs.len();
        let nowait = mode == IoMode::NonBlocking && !self.in_memory;
        if nowait && !self.nowait_reads.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut iov = bufs.as_iovecs();
        let mut done = 0usize;
        while done < total {
            match self.readv_once(offset + done as u64, &iov, nowait) {
                Ok(0) => {
                    // End of file: the rest reads as zeroes.
                    bufs.fill_zero(done, total - done);
                    return Ok(());
                }
                Ok(n) => {
                    done += n;
                    advance(&mut iov, n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if nowait && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_reads.store(false, Ordering::Relaxed);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                // A short NOWAIT read followed by EAGAIN: the rest is re-read
                // from the start by the blocking worker; reads are idempotent.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, offset: u64, bufs: &IoVec<'_>, mode: IoMode) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "storage is read-only"));
        }
        // Buffered writes mostly land in the page cache without waiting; a
        // write that would extend the file is left to the blocking path so
        // the length bookkeeping stays simple.
        let total = bufs.len() as u64;
        let end = offset.checked_add(total).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if mode == IoMode::NonBlocking && end > self.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut iov = bufs.as_iovecs();
        let mut done = 0u64;
        while done < total {
            match self.writev_once(offset + done, &iov) {
                Ok(0) => return self.wrote(Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"))),
                Ok(n) => {
                    done += n as u64;
                    advance(&mut iov, n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return self.wrote(Err(e)),
            }
        }
        self.len.fetch_max(end, Ordering::AcqRel);
        self.wrote(Ok(()))
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "storage is read-only"));
        }
        if len == 0 {
            return Ok(());
        }
        let r = self.zero_range(offset, len);
        self.wrote(r)
    }

    /// A hole where the filesystem can punch one (QEMU's discard=unmap);
    /// elsewhere the old bytes stay, rather than writing zeroes nobody
    /// needs. Never past the end of the file.
    fn discard_at(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "storage is read-only"));
        }
        let end = offset.saturating_add(len).min(self.len());
        if offset >= end {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an owned fd.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, (end - offset) as i64) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EOPNOTSUPP) { Ok(()) } else { self.wrote(Err(e)) };
        }
        self.wrote(Ok(()))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let r = self.file.set_len(len);
        self.wrote(r)?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Read before the sync: a write finishing during it bumps past it.
        let epoch = self.written.load(Ordering::SeqCst);
        if epoch == self.synced.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.file.sync_data()?;
        self.synced.fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("local file {}", self.path.display())
    }
}

impl LocalFile {
    /// Zeroes `[offset, offset + len)`: holes inside the file; past its
    /// end the file only grows, sparsely (a large trim of a fresh cache
    /// must not write GiBs of zeroes).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let flen = self.len();
        // Punch only inside the file; past its end nothing needs punching.
        let punch_end = (offset + len).min(flen);
        if offset < punch_end {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an owned fd.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, (punch_end - offset) as i64) };
            if r != 0 {
                let e = io::Error::last_os_error();
                // Filesystems without hole punching: write zeroes instead.
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(e);
                }
                write_zero_bytes(&self.file, offset, punch_end - offset)?;
            }
        }
        if offset + len > flen {
            // Its last byte extends the file, a hole before it (set_len
            // could cut off what a concurrent write just put past here).
            self.file.write_all_at(&[0], offset + len - 1)?;
            self.len.fetch_max(offset + len, Ordering::AcqRel);
        }
        Ok(())
    }
}

fn write_zero_bytes(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in memory (tmpfs refuses RWF_NOWAIT) is read on the fast
    /// path, not handed to the blocking workers.
    #[test]
    fn reads_from_tmpfs_never_say_would_block() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else { return };
        let p = dir.path().join("img");
        std::fs::write(&p, vec![9u8; 8192]).unwrap();
        let f = LocalFile::open(&p, true).unwrap();
        if !f.in_memory {
            return; // /dev/shm is not tmpfs here
        }
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            f.read_vectored_at(4096, &IoVec::from_slice(&mut buf), IoMode::NonBlocking).unwrap();
            assert_eq!(buf, vec![9u8; 4096]);
        }
    }

    /// Reads do not update (or check) the access time of a file we own:
    /// the owner's open asks for O_NOATIME.
    #[test]
    fn an_owned_file_opens_without_atime_updates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 4096]).unwrap();
        for read_only in [true, false] {
            let f = LocalFile::open(&p, read_only).unwrap();
            // SAFETY: F_GETFL on an owned fd.
            let flags = unsafe { libc::fcntl(f.file.as_raw_fd(), libc::F_GETFL) };
            assert!(flags >= 0 && flags & libc::O_NOATIME != 0, "flags {flags:#o}");
        }
    }

    #[test]
    fn read_write_zero_and_eof() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = LocalFile::open(&p, false).unwrap();
        f.write_at(100, b"hello").unwrap();
        let mut buf = vec![0u8; 10];
        f.read_at(98, &mut buf).unwrap();
        assert_eq!(&buf, &[7, 7, b'h', b'e', b'l', b'l', b'o', 7, 7, 7]);
        f.write_zeroes_at(4096, 4096).unwrap();
        let mut buf = vec![1u8; 4096];
        f.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Past EOF reads zero.
        let mut buf = vec![1u8; 100];
        f.read_at(8150, &mut buf).unwrap();
        assert_eq!(&buf[..42], &[0u8; 42][..]);
        assert!(buf[42..].iter().all(|&b| b == 0));
        assert_eq!(f.len(), 8192);
        f.write_at(10_000, b"x").unwrap();
        assert_eq!(f.len(), 10_001);
        // Zeroes past the end grow the file sparsely.
        f.write_zeroes_at(8192, 64 << 20).unwrap();
        assert_eq!(f.len(), 8192 + (64 << 20));
        let mut buf = vec![1u8; 4096];
        f.read_at(10_000 - 2048, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 1 << 20);
    }

    /// A discard punches a hole (the blocks are gone, the range reads as
    /// zeroes) and never grows the file.
    #[test]
    fn discard_releases_blocks_and_stays_inside_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 4 << 20]).unwrap();
        let f = LocalFile::open(&p, false).unwrap();
        let blocks = || std::fs::metadata(&p).unwrap().blocks() * 512;
        let before = blocks();
        f.discard_at(1 << 20, 4 << 20).unwrap();
        assert_eq!(f.len(), 4 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
        let mut buf = vec![1u8; 4096];
        f.read_at(1 << 20, &mut buf).unwrap();
        // Filesystems without hole punching keep the old bytes.
        if before - blocks() >= 3 << 20 {
            assert!(buf.iter().all(|&b| b == 0));
        } else {
            assert!(buf.iter().all(|&b| b == 7));
        }
        f.read_at((1 << 20) - 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 512]).unwrap();
        let f = LocalFile::open(&p, true).unwrap();
        assert!(f.write_at(0, b"x").is_err());
        assert!(f.write_zeroes_at(0, 512).is_err());
    }

    /// A flush syncs only when something was written since the last one
    /// (the guest's FLUSH with nothing dirty costs no fdatasync).
    #[test]
    fn flush_syncs_only_after_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let f = LocalFile::open(&p, false).unwrap();
        let pending = |f: &LocalFile| f.written.load(Ordering::SeqCst) != f.synced.load(Ordering::SeqCst);
        assert!(pending(&f), "what earlier openers wrote is synced at the first flush");
        f.flush().unwrap();
        assert!(!pending(&f));
        f.write_at(0, b"x").unwrap();
        assert!(pending(&f));
        f.flush().unwrap();
        assert!(!pending(&f));
        f.write_zeroes_at(0, 4096).unwrap();
        assert!(pending(&f));
        f.flush().unwrap();
        f.set_len(4096).unwrap();
        assert!(pending(&f));
        f.flush().unwrap();
        assert!(!pending(&f));
    }
}
