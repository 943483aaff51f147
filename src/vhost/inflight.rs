//! vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`):
//! a shared memory region that QEMU keeps across backend restarts, recording
//! per queue which descriptor heads were accepted and not yet completed, so
//! a restarted daemon resubmits exactly those (in submission order) and
//! resumes popping where the dead one stopped.
//!
//! Layout and protocol as in QEMU's `docs/interop/vhost-user.rst` ("Inflight
//! I/O tracking", split virtqueues) and libvhost-user, which QEMU's
//! vhost-user-blk is tested against: per queue a 16-byte header
//! (`features: u64, version: u16, desc_num: u16, last_batch_head: u16,
//! used_idx: u16`) followed by `desc_num` 16-byte `DescStateSplit`
//! (`inflight: u8, padding: [u8; 5], next: u16, counter: u64`).
//!
//! After the queues, a region this backend created holds a small trailer of
//! its own (the region is the backend's; the frontend only keeps it): the
//! cache mode the guest chose (virtio `CONFIG_WCE`). QEMU answers the guest
//! from its own copy of that byte and never sends it again, so a restarted
//! daemon learns it here; the region lives exactly as long as that copy
//! matters, in the same QEMU, and a region without the trailer (made by an
//! older driveblk) just has no mode to give back.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::vhost::request::{GuestMem, MAX_CHAIN_DESCRIPTORS};

/// `version` once a queue's region is in use (libvhost-user's `INFLIGHT_VERSION`).
const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC_STATE: usize = 16;
/// Per-queue regions start on this boundary (libvhost-user's `INFLIGHT_ALIGNMENT`).
const ALIGN: usize = 64;
/// The largest split virtqueue.
const MAX_QUEUE_SIZE: u16 = 32768;
/// The trailer after the queue regions: magic, then the cache mode byte.
const TRAILER: usize = 64;
/// "DBI1" regions may hold a mode a daemon derived from the features
/// instead of one the guest set (firmware without FLUSH recorded
/// write-through): they are ignored.
const TRAILER_MAGIC: &[u8; 4] = b"DBI2";
const OFF_CACHE_MODE: usize = 4;

// Header field offsets.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// DescStateSplit field offsets.
const OFF_INFLIGHT: usize = 0;
const OFF_COUNTER: usize = 8;

/// Bytes of one queue's region. libvhost-user sizes it as
/// `ALIGN_UP(16 * queue_size + 2, 64)`, which equals this for every queue
/// size not of the form 4k + 3; this one always holds the header.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC_STATE * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// What a queue must do after a (re)connect: the chains a previous backend
/// left in flight, oldest first, and where to resume popping.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    pub heads: Vec<u16>,
    pub next_avail: u16,
}

/// One mapped inflight region, covering every queue of the device. All
/// writes to a queue's part happen under that queue's vring lock.
pub struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    queue_size: u16,
    queues: Vec<QueueState>,
    /// Offset of the trailer, when the region has one.
    trailer: Option<usize>,
}

/// The guest's cache mode as kept in the region's trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    WriteBack,
    WriteThrough,
}

struct QueueState {
    /// Submission counter of the next chain popped.
    counter: AtomicU64,
    /// The region came from the frontend and the queue has not been
    /// checked for requests to resubmit yet.
    needs_check: AtomicBool,
}

// SAFETY: the mapping is owned by this value and only accessed through
// volatile reads/writes of plain integers; callers serialize per queue.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// Answers `GET_INFLIGHT_FD`: a new zeroed region in a sealed memfd for
    /// `num_queues` queues of `queue_size` entries, and the reply to send.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(VhostUserInflight, File)> {
        check_geometry(num_queues, queue_size)?;
        let size = queue_region_size(queue_size) * usize::from(num_queues) + TRAILER;
        // SAFETY: a NUL-terminated name and valid flags.
        let fd =
            unsafe { libc::memfd_create(c"driveblk-inflight".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        // The frontend maps it with this size: it must not shrink under it.
        // SAFETY: fcntl on a descriptor we own.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((VhostUserInflight::new(size as u64, 0, num_queues, queue_size), file))
    }

    /// Maps the region the frontend sends with `SET_INFLIGHT_FD` (a new one
    /// or one a previous backend used). At most `max_queues` queues.
    pub fn map(msg: &VhostUserInflight, file: &File, max_queues: usize) -> io::Result<Self> {
        check_geometry(msg.num_queues, msg.queue_size)?;
        if usize::from(msg.num_queues) > max_queues {
            return Err(invalid(format!("inflight region for {} queues, device has {max_queues}", msg.num_queues)));
        }
        let need = queue_region_size(msg.queue_size) * usize::from(msg.num_queues);
        if msg.mmap_size < need as u64 {
            return Err(invalid(format!("inflight region of {} bytes, {need} needed", msg.mmap_size)));
        }
        let file_len = file.metadata()?.len();
        if msg.mmap_offset.checked_add(need as u64).is_none_or(|end| end > file_len) {
            return Err(invalid(format!("inflight region {}+{need} beyond its file ({file_len})", msg.mmap_offset)));
        }
        let queues_len = need;
        let with_trailer = need + TRAILER;
        let trailer = (msg.mmap_size >= with_trailer as u64
            && msg.mmap_offset.checked_add(with_trailer as u64).is_some_and(|end| end <= file_len))
        .then_some(queues_len);
        let need = if trailer.is_some() { with_trailer } else { queues_len };
        let offset =
            libc::off_t::try_from(msg.mmap_offset).map_err(|_| invalid("inflight offset out of range".into()))?;
        // SAFETY: a fresh shared mapping of a range checked to lie in the file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                need,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| invalid("mmap returned null".into()))?;
        let queues = (0..msg.num_queues)
            .map(|_| QueueState { counter: AtomicU64::new(0), needs_check: AtomicBool::new(true) })
            .collect();
        let region = Self { base, len: need, queue_size: msg.queue_size, queues, trailer };
        for q in 0..usize::from(msg.num_queues) {
            // As libvhost-user: the size this backend tracks is the one negotiated now.
            region.write_u16(q, OFF_DESC_NUM, msg.queue_size);
        }
        Ok(region)
    }

    /// Runs once per queue after `SET_INFLIGHT_FD`, when the ring is live
    /// (`used_idx` is the used ring's index): repairs a completion
    /// interrupted between the used ring and the region, and returns the
    /// chains still in flight (oldest first) and the avail position after
    /// the last chain the previous backend popped. `None` when there is
    /// nothing to do (already checked, or a fresh region).
    pub fn check(&self, q: usize, used_idx: u16) -> Option<Resume> {
        let st = self.queues.get(q)?;
        if !st.needs_check.swap(false, Ordering::AcqRel) {
            return None;
        }
        if self.read_u16(q, OFF_VERSION) == 0 {
            self.write_u16(q, OFF_VERSION, VERSION);
            return None;
        }
        if self.read_u16(q, OFF_USED_IDX) != used_idx {
            // The crash came after the used ring took `last_batch_head` and
            // before its flag was cleared: that one is complete.
            let last = self.read_u16(q, OFF_LAST_BATCH_HEAD);
            if last < self.queue_size {
                self.write_desc_u8(q, last, OFF_INFLIGHT, 0);
            }
            compiler_fence(Ordering::SeqCst);
            self.write_u16(q, OFF_USED_IDX, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|&h| self.read_desc_u8(q, h, OFF_INFLIGHT) == 1)
            .map(|h| (self.read_desc_u64(q, h, OFF_COUNTER), h))
            .collect();
        pending.sort_unstable();
        if let Some(&(max, _)) = pending.last() {
            st.counter.store(max.wrapping_add(1), Ordering::Relaxed);
        }
        let next_avail = used_idx.wrapping_add(pending.len() as u16);
        Some(Resume { heads: pending.into_iter().map(|(_, h)| h).collect(), next_avail })
    }

    /// The cache mode a previous backend recorded in this region, if any.
    pub fn cache_mode(&self) -> Option<CacheMode> {
        let t = self.trailer?;
        let magic: Vec<u8> = (0..4).map(|i| self.read_u8(t + i)).collect();
        if magic != TRAILER_MAGIC {
            return None;
        }
        match self.read_u8(t + OFF_CACHE_MODE) {
            1 => Some(CacheMode::WriteBack),
            2 => Some(CacheMode::WriteThrough),
            _ => None,
        }
    }

    /// Records the cache mode for a backend that takes this region over;
    /// false when the region has no trailer.
    pub fn set_cache_mode(&self, mode: CacheMode) -> bool {
        let Some(t) = self.trailer else { return false };
        self.write_u8(t + OFF_CACHE_MODE, if mode == CacheMode::WriteBack { 1 } else { 2 });
        for (i, b) in TRAILER_MAGIC.iter().enumerate() {
            self.write_u8(t + i, *b);
        }
        true
    }

    /// A chain with this head was popped: in flight from now on.
    pub fn get(&self, q: usize, head: u16) {
        if usize::from(head) >= usize::from(self.queue_size) || q >= self.queues.len() {
            return;
        }
        let c = self.queues[q].counter.fetch_add(1, Ordering::Relaxed);
        self.write_desc_u64(q, head, OFF_COUNTER, c);
        compiler_fence(Ordering::SeqCst);
        self.write_desc_u8(q, head, OFF_INFLIGHT, 1);
    }

    /// About to put `head` in the used ring.
    pub fn pre_put(&self, q: usize, head: u16) {
        if q < self.queues.len() {
            self.write_u16(q, OFF_LAST_BATCH_HEAD, head);
            compiler_fence(Ordering::SeqCst);
        }
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn post_put(&self, q: usize, head: u16, used_idx: u16) {
        if usize::from(head) >= usize::from(self.queue_size) || q >= self.queues.len() {
            return;
        }
        compiler_fence(Ordering::SeqCst);
        self.write_desc_u8(q, head, OFF_INFLIGHT, 0);
        compiler_fence(Ordering::SeqCst);
        self.write_u16(q, OFF_USED_IDX, used_idx);
    }

    fn queue_off(&self, q: usize) -> usize {
        q * queue_region_size(self.queue_size)
    }

    fn desc_off(&self, q: usize, head: u16, field: usize) -> usize {
        self.queue_off(q) + HEADER + usize::from(head) * DESC_STATE + field
    }

    fn ptr(&self, off: usize, size: usize) -> *mut u8 {
        assert!(off + size <= self.len, "inflight region access out of bounds");
        // SAFETY: in bounds of the mapping, checked above.
        unsafe { self.base.as_ptr().add(off) }
    }

    fn read_u16(&self, q: usize, field: usize) -> u16 {
        // SAFETY: aligned (even offset in a page-aligned mapping), in bounds.
        u16::from_le(unsafe { self.ptr(self.queue_off(q) + field, 2).cast::<u16>().read_volatile() })
    }

    fn write_u16(&self, q: usize, field: usize, v: u16) {
        // SAFETY: as read_u16.
        unsafe { self.ptr(self.queue_off(q) + field, 2).cast::<u16>().write_volatile(v.to_le()) }
    }

    fn read_u8(&self, off: usize) -> u8 {
        // SAFETY: in bounds.
        unsafe { self.ptr(off, 1).read_volatile() }
    }

    fn write_u8(&self, off: usize, v: u8) {
        // SAFETY: in bounds.
        unsafe { self.ptr(off, 1).write_volatile(v) }
    }

    fn read_desc_u8(&self, q: usize, head: u16, field: usize) -> u8 {
        // SAFETY: in bounds.
        unsafe { self.ptr(self.desc_off(q, head, field), 1).read_volatile() }
    }

    fn write_desc_u8(&self, q: usize, head: u16, field: usize, v: u8) {
        // SAFETY: in bounds.
        unsafe { self.ptr(self.desc_off(q, head, field), 1).write_volatile(v) }
    }

    fn read_desc_u64(&self, q: usize, head: u16, field: usize) -> u64 {
        // SAFETY: 8-aligned (16-byte entries after a 16-byte header), in bounds.
        u64::from_le(unsafe { self.ptr(self.desc_off(q, head, field), 8).cast::<u64>().read_volatile() })
    }

    fn write_desc_u64(&self, q: usize, head: u16, field: usize, v: u64) {
        // SAFETY: as read_desc_u64.
        unsafe { self.ptr(self.desc_off(q, head, field), 8).cast::<u64>().write_volatile(v.to_le()) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(invalid(format!("inflight region for {num_queues} queues of {queue_size} refused")));
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The descriptors of the chain whose head is `head`, walked the way
/// virtio-queue's `DescriptorChain` walks a popped one (indirect tables,
/// bounded by the table size, at most 4 GiB in all): a resubmitted chain is
/// named by its head, not popped from the avail ring, and virtio-queue
/// builds chains only from the avail ring.
///
/// Past the most descriptors a request may have, only the last writable one
/// is kept (in one slot after the cap): the parser refuses such a chain and
/// reports it in that descriptor's status byte, as for a popped chain, and
/// a hostile region naming chains of 65535 indirect descriptors costs no
/// more memory than short ones.
pub fn walk_chain(mem: &GuestMem, desc_table: GuestAddress, queue_size: u16, head: u16) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut size, mut next) = (desc_table, queue_size, head);
    let mut ttl = size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && next < size {
        let Some(addr) = table.checked_add(u64::from(next) * DESC_STATE as u64) else { break };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else { break };
        if desc.refers_to_indirect_table() {
            let len = desc.len();
            if indirect || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                break;
            }
            (table, size, next, indirect) = (desc.addr(), (len / 16) as u16, 0, true);
            ttl = size;
            continue;
        }
        let Some(b) = bytes.checked_add(desc.len()) else { break };
        bytes = b;
        if desc.has_next() {
            next = desc.next();
            ttl -= 1;
        } else {
            ttl = 0;
        }
        if out.len() > MAX_CHAIN_DESCRIPTORS {
            if desc.is_write_only() {
                out.pop();
                out.push(desc);
            }
        } else {
            out.push(desc);
        }
    }
    out
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;
