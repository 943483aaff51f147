//! virtio-blk requests: parsing a descriptor chain into a [`Request`] and
//! running it against a [`Disk`]. Knows nothing about queues or sockets, so
//! unit tests feed it chains built by virtio-queue's mock queue.
//!
//! Every chain becomes a request, valid or not: an invalid one carries the
//! status to report, so the caller always has something to put in the used
//! ring (a chain that never gets `add_used` would stall the guest forever).

use std::ops::Deref;
use std::sync::Arc;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::format::{Disk, DiskError, IoMode, IoVec};
use crate::vhost::config::{ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SEG_MAX, SIZE_MAX};

/// Size of `virtio_blk_outhdr` (type u32, reserved u32, sector u64).
const HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment.
const SEGMENT_LEN: usize = 16;
/// Most descriptors a chain may have: `SEG_MAX` data segments plus one for
/// the header and one for the status, as a driver that honours `seg_max`
/// lays them out. Anything longer is refused before its pieces are
/// collected, so a hostile chain (an indirect table of 65535 entries)
/// cannot make us allocate for it.
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// A chain's pieces (address, length), inline for the usual header + data +
/// status layout: parsing a request does not touch the heap.
type Pieces = SmallVec<[(GuestAddress, usize); 4]>;

/// Guest memory type the device serves.
pub type GuestMem = GuestMemoryMmap<()>;

/// One discard or write-zeroes extent, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What a request asks for, after validation.
#[derive(Debug)]
pub enum Operation {
    Read {
        offset: u64,
        data: IoVec<'static>,
    },
    Write {
        offset: u64,
        data: IoVec<'static>,
    },
    Flush,
    GetId {
        data: IoVec<'static>,
    },
    Discard(Vec<Extent>),
    WriteZeroes(Vec<Extent>),
    /// Refused without touching the disk: the status to report and why.
    Refused {
        status: u8,
        reason: String,
    },
}

/// A parsed request, holding the guest memory it points into alive.
#[derive(Debug)]
pub struct Request {
    /// Head descriptor index: what goes into the used ring.
    pub head: u16,
    pub op: Operation,
    /// The status byte in guest memory; `None` when the chain had no usable
    /// one (the request is then completed with used length 0).
    status: Option<IoVec<'static>>,
    /// Keeps the memory mapping that `op`'s buffers point into alive until
    /// the request completes, even if the frontend remaps memory meanwhile.
    _mem: Arc<GuestMem>,
}

impl Request {
    /// Parses a descriptor chain. Never fails: problems become
    /// [`Operation::Refused`].
    pub fn parse<M>(chain: DescriptorChain<M>, mem: Arc<GuestMem>, capacity: u64, read_only: bool) -> Request
    where
        M: Deref<Target = GuestMem>,
    {
        Self::parse_descriptors(chain.head_index(), chain, mem, capacity, read_only)
    }

    /// [`parse`](Self::parse) from the descriptors of the chain at `head`,
    /// however they were walked (a resubmitted chain is walked from its head
    /// index, not popped from the avail ring).
    pub fn parse_descriptors(
        head: u16,
        chain: impl IntoIterator<Item = Descriptor>,
        mem: Arc<GuestMem>,
        capacity: u64,
        read_only: bool,
    ) -> Request {
        let mut readable = Pieces::new();
        let mut writable = Pieces::new();
        let mut order_error = false;
        let mut descriptors = 0usize;
        for desc in chain {
            let piece = (desc.addr(), desc.len() as usize);
            descriptors += 1;
            if descriptors > MAX_CHAIN_DESCRIPTORS {
                // Keep walking (bounded by virtio-queue's chain limits) only
                // to find the status byte, which is the last writable
                // descriptor's; collect nothing else.
                if desc.is_write_only() {
                    writable.clear();
                    writable.push(piece);
                }
                continue;
            }
            if desc.is_write_only() {
                writable.push(piece);
            } else if !writable.is_empty() {
                // virtio 2.7.4.2: device-readable descriptors come first.
                order_error = true;
            } else {
                readable.push(piece);
            }
        }

        // The request owns the mapping; parsing borrows it (no reference
        // count traffic on the shared mapping per request).
        let mut req = Request { head, op: Operation::Flush, status: None, _mem: mem };
        let mem: &GuestMem = &req._mem;
        // The status byte is the last byte of the last writable descriptor.
        req.status = match writable.last_mut() {
            Some((addr, len)) if *len > 0 => {
                let status_addr = addr.checked_add(*len as u64 - 1);
                *len -= 1;
                if *len == 0 {
                    writable.pop();
                }
                status_addr.and_then(|a| guest_iovec(mem, &[(a, 1)]).ok())
            }
            _ => None,
        };
        let refuse = |status: u8, reason: String| Operation::Refused { status, reason };
        if req.status.is_none() {
            req.op = refuse(VIRTIO_BLK_S_IOERR as u8, "chain has no writable status byte".into());
            return req;
        }
        if order_error {
            req.op = refuse(VIRTIO_BLK_S_IOERR as u8, "readable descriptor after a writable one".into());
            return req;
        }
        if descriptors > MAX_CHAIN_DESCRIPTORS {
            req.op = refuse(
                VIRTIO_BLK_S_IOERR as u8,
                format!("chain of {descriptors} descriptors, more than seg_max {SEG_MAX} + header + status"),
            );
            return req;
        }

        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = read_gathered(mem, &readable, 0, &mut header) {
            req.op = refuse(VIRTIO_BLK_S_IOERR as u8, format!("request header unreadable: {e}"));
            return req;
        }
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let out_data = skip(&readable, HEADER_LEN);

        // size_max / seg_max bound every data transfer (the status byte and
        // the header were split off already): a request past them is refused
        // rather than served, so a guest cannot make one request pin more
        // guest memory or I/O than it was told it may.
        let data_pieces = match req_type {
            VIRTIO_BLK_T_IN => Some(&writable),
            VIRTIO_BLK_T_OUT => Some(&out_data),
            _ => None,
        };
        if let Some(pieces) = data_pieces {
            if let Err(reason) = check_segments(pieces) {
                req.op = refuse(VIRTIO_BLK_S_IOERR as u8, reason);
                return req;
            }
        }

        req.op = match req_type {
            VIRTIO_BLK_T_IN => {
                match data_range(sector, total(&writable), capacity)
                    .and_then(|off| guest_iovec(mem, &writable).map(|data| Operation::Read { offset: off, data }))
                {
                    Ok(op) => op,
                    Err(reason) => refuse(VIRTIO_BLK_S_IOERR as u8, format!("read: {reason}")),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if read_only {
                    refuse(VIRTIO_BLK_S_IOERR as u8, "write to a read-only disk".into())
                } else {
                    match data_range(sector, total(&out_data), capacity)
                        .and_then(|off| guest_iovec(mem, &out_data).map(|data| Operation::Write { offset: off, data }))
                    {
                        Ok(op) => op,
                        Err(reason) => refuse(VIRTIO_BLK_S_IOERR as u8, format!("write: {reason}")),
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => Operation::Flush,
            VIRTIO_BLK_T_GET_ID => match guest_iovec(mem, &writable) {
                Ok(data) => Operation::GetId { data },
                Err(reason) => refuse(VIRTIO_BLK_S_IOERR as u8, format!("get-id: {reason}")),
            },
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let zeroes = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                if read_only {
                    refuse(VIRTIO_BLK_S_IOERR as u8, "discard/write-zeroes on a read-only disk".into())
                } else {
                    match parse_extents(mem, &out_data, zeroes, capacity) {
                        Ok(ext) if zeroes => Operation::WriteZeroes(ext),
                        Ok(ext) => Operation::Discard(ext),
                        Err((status, reason)) => refuse(status, reason),
                    }
                }
            }
            other => refuse(VIRTIO_BLK_S_UNSUPP as u8, format!("unknown request type {other}")),
        };
        req
    }

    /// Runs the request. `Err(WouldBlock)` (only with `NonBlocking`) means
    /// nothing visible happened that a blocking retry would not redo.
    /// `Ok` carries the number of bytes written into guest data buffers.
    pub fn execute(&self, disk: &dyn Disk, mode: IoMode, write_through: bool, serial: &[u8]) -> Result<u32, DiskError> {
        match &self.op {
            Operation::Read { offset, data } => {
                disk.read(*offset, data, mode)?;
                Ok(data.len() as u32)
            }
            Operation::Write { offset, data } => {
                if write_through && mode == IoMode::NonBlocking {
                    return Err(DiskError::WouldBlock);
                }
                disk.write(*offset, data, mode)?;
                if write_through {
                    disk.flush(mode)?;
                }
                Ok(0)
            }
            Operation::Flush => disk.flush(mode).map(|_| 0),
            Operation::GetId { .. } => Ok(self.write_id(serial)),
            // Not flushed in write-through mode: a discarded range may read
            // as its old contents (nothing advertises that it reads as
            // zeroes), so there is nothing that must be stable.
            Operation::Discard(extents) => {
                for e in extents {
                    disk.discard(e.offset, e.len, mode)?;
                }
                Ok(0)
            }
            // Zeroes are data: in write-through mode they are stable when
            // the request completes, as a write's are (virtio 1.2 5.2.6.2).
            Operation::WriteZeroes(extents) => {
                if write_through && mode == IoMode::NonBlocking {
                    return Err(DiskError::WouldBlock);
                }
                for e in extents {
                    disk.write_zeroes(e.offset, e.len, e.unmap, mode)?;
                }
                if write_through {
                    disk.flush(mode)?;
                }
                Ok(0)
            }
            Operation::Refused { .. } => Ok(0),
        }
    }

    /// Fills a GET_ID buffer with the serial (padded with NULs up to 20 bytes,
    /// as the spec allows a non-terminated 20-byte id). Returns bytes written.
    fn write_id(&self, serial: &[u8]) -> u32 {
        if let Operation::GetId { data } = &self.op {
            let mut id = [0u8; ID_BYTES];
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let len = data.len().min(ID_BYTES);
            data.copy_from_slice(0, &id[..len]);
            len as u32
        } else {
            0
        }
    }

    /// The status a refused request reports, if it was refused at parse time.
    pub fn refused(&self) -> Option<(u8, &str)> {
        match &self.op {
            Operation::Refused { status, reason } => Some((*status, reason)),
            _ => None,
        }
    }

    /// Writes the status byte and returns the used-ring length:
    /// bytes written into guest memory plus the status byte.
    pub fn complete(&self, status: u8, data_written: u32) -> u32 {
        match &self.status {
            Some(s) => {
                s.copy_from_slice(0, &[status]);
                data_written.saturating_add(1)
            }
            None => 0,
        }
    }
}

/// The virtio status for a failed disk operation: the one place this mapping
/// lives.
pub fn status_for(err: &DiskError) -> u8 {
    match err {
        DiskError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
        DiskError::WouldBlock
        | DiskError::OutOfRange { .. }
        | DiskError::ReadOnly
        | DiskError::Corrupt(_)
        | DiskError::Io { .. } => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// Success status.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;

fn total(pieces: &[(GuestAddress, usize)]) -> u64 {
    pieces.iter().map(|p| p.1 as u64).sum()
}

/// The pieces after skipping the first `n` bytes.
fn skip(pieces: &[(GuestAddress, usize)], mut n: usize) -> Pieces {
    let mut out = Pieces::new();
    for &(addr, len) in pieces {
        if n >= len {
            n -= len;
            continue;
        }
        // n < len, and addr + len was a valid descriptor address range.
        out.push((GuestAddress(addr.0.wrapping_add(n as u64)), len - n));
        n = 0;
    }
    out
}

/// Checks data segments against the advertised `seg_max` and `size_max`.
///
/// The segment count is enforced as advertised. `size_max` bounds the
/// request as a whole (at most `seg_max * size_max` bytes, the most a driver
/// honouring both can send), not each segment: libblkio sends one
/// descriptor per buffer whatever its size (4 MiB reads in our own tests),
/// and a long segment costs us nothing more than a short one, since guest
/// memory is never copied.
fn check_segments(pieces: &[(GuestAddress, usize)]) -> Result<(), String> {
    if pieces.len() > SEG_MAX as usize {
        return Err(format!("{} data segments, more than seg_max {SEG_MAX}", pieces.len()));
    }
    let max = u64::from(SEG_MAX) * u64::from(SIZE_MAX);
    let len = total(pieces);
    if len > max {
        return Err(format!("{len} data bytes, more than seg_max {SEG_MAX} x size_max {SIZE_MAX}"));
    }
    Ok(())
}

/// Validates a data transfer's size and range; returns its byte offset.
fn data_range(sector: u64, len: u64, capacity: u64) -> Result<u64, String> {
    if len % SECTOR_SIZE != 0 {
        return Err(format!("data length {len} is not a multiple of {SECTOR_SIZE}"));
    }
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(|| format!("sector {sector} overflows"))?;
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(offset),
        _ => Err(format!("sector {sector} + {len} bytes is past the end of the disk ({capacity} bytes)")),
    }
}

/// Maps guest address ranges to an `IoVec` over the host mapping.
fn guest_iovec(mem: &GuestMem, pieces: &[(GuestAddress, usize)]) -> Result<IoVec<'static>, String> {
    let mut v = IoVec::new();
    for &(addr, len) in pieces {
        // A buffer inside one region (nearly all of them) takes one lookup;
        // one that spans regions goes through the general iterator.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
            // SAFETY: the slice lies in a guest memory mapping that the
            // request keeps alive (Request::_mem) until it completes.
            unsafe { v.push_guest(slice) };
            continue;
        }
        let mut got = 0usize;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|e| format!("buffer at {:#x}+{len} outside guest memory: {e}", addr.0))?;
            got += slice.len();
            // SAFETY: the slice lies in a guest memory mapping that the
            // request keeps alive (Request::_mem) until it completes.
            unsafe { v.push_guest(slice) };
        }
        if got != len {
            return Err(format!("buffer at {:#x}+{len} outside guest memory", addr.0));
        }
    }
    Ok(v)
}

/// Reads `buf.len()` bytes starting `skip` bytes into the gathered pieces.
fn read_gathered(
    mem: &GuestMem,
    pieces: &[(GuestAddress, usize)],
    skip_bytes: usize,
    buf: &mut [u8],
) -> Result<(), String> {
    let need = buf.len();
    let mut done = 0usize;
    for (addr, len) in self::skip(pieces, skip_bytes) {
        if done == need {
            break;
        }
        let n = len.min(need - done);
        let dst = &mut buf[done..done + n];
        match GuestMemoryBackend::get_slice(mem, addr, n) {
            // One region: a single lookup and copy.
            Ok(src) => {
                src.copy_to(dst);
            }
            Err(_) => mem.read_slice(dst, addr).map_err(|e| format!("at {:#x}: {e}", addr.0))?,
        }
        done += n;
    }
    if done < need {
        return Err(format!("only {done} of {need} bytes present"));
    }
    Ok(())
}

/// Parses discard / write-zeroes segments.
fn parse_extents(
    mem: &GuestMem,
    pieces: &[(GuestAddress, usize)],
    zeroes: bool,
    capacity: u64,
) -> Result<Vec<Extent>, (u8, String)> {
    let ioerr = |s: String| (VIRTIO_BLK_S_IOERR as u8, s);
    let unsupp = |s: String| (VIRTIO_BLK_S_UNSUPP as u8, s);
    let len = total(pieces);
    if len == 0 || len % SEGMENT_LEN as u64 != 0 {
        return Err(ioerr(format!("segment data of {len} bytes is not a non-empty multiple of {SEGMENT_LEN}")));
    }
    let count = len / SEGMENT_LEN as u64;
    if count > MAX_DISCARD_SEG as u64 {
        return Err(unsupp(format!("{count} segments, more than the {MAX_DISCARD_SEG} advertised")));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let mut seg = [0u8; SEGMENT_LEN];
        read_gathered(mem, pieces, i * SEGMENT_LEN, &mut seg).map_err(|e| ioerr(format!("segment {i}: {e}")))?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Unmap is only defined for write-zeroes; other bits are reserved.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (!zeroes && unmap) {
            return Err(unsupp(format!("segment {i}: unsupported flags {flags:#x}")));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(ioerr(format!(
                "segment {i}: {num_sectors} sectors, more than the {MAX_DISCARD_SECTORS} advertised"
            )));
        }
        let bytes = num_sectors as u64 * SECTOR_SIZE;
        let offset = data_range(sector, bytes, capacity).map_err(|e| ioerr(format!("segment {i}: {e}")))?;
        out.push(Extent { offset, len: bytes, unmap });
    }
    Ok(out)
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
