//! One queue's closed-loop I/O driver: keeps `iodepth` requests in flight on a `Blkioq` and
//! records per-request submit→completion latency.

use crate::hist::Histogram;
use crate::verify::{self, Bitmap};
use crate::workload::{Req, Rng, Source};
use anyhow::{bail, Context, Result};
use blkio::{Blkioq, Completion, Errno, ReqFlags};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which requests count, and when to stop submitting.
#[derive(Clone, Copy)]
pub struct Window {
    /// Requests before this are warmup and are not measured.
    pub warm_until: Instant,
    /// Stop submitting at this time. Without a quota, exactly the completions that land in
    /// `[warm_until, end]` are measured, so IOPS = measured ops / (end - warm_until).
    pub end: Option<Instant>,
    /// Stop after this many requests submitted after warmup; those requests are the measured ones.
    pub quota: Option<u64>,
}

pub enum VerifyMode {
    Off,
    /// Fill write buffers with the offset pattern and remember which blocks were written.
    Write {
        tag: u64,
        written: Bitmap,
    },
    /// Compare every read against the offset pattern.
    Check {
        tag: u64,
    },
}

/// What write buffers hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataMode {
    /// Filled once at start (non-zero, non-repeating within a buffer) and reused by every write.
    Reuse,
    /// Fresh pseudo-random bytes for every write: incompressible, and never equal to earlier data.
    Random,
    /// Fresh for every write; each 4 KiB block is 2 KiB of random bytes then 2 KiB of zeroes
    /// (about 2:1 for a compressor, like fio's buffer_compress_percentage=50).
    Compressible,
}

pub struct Job {
    pub index: usize,
    pub q: Blkioq,
    /// Start of this queue's part of the mapped memory region: `iodepth` slots of `slot_len`.
    pub buf_base: usize,
    pub slot_len: usize,
    pub iodepth: usize,
    pub source: Source,
    pub window: Window,
    pub verify: VerifyMode,
    /// Set by any queue that fails, so the others stop promptly instead of running to the end.
    pub stop: Arc<AtomicBool>,
    pub io_timeout: Duration,
    pub data: DataMode,
    /// Seeds the bytes of `DataMode::Random`/`Compressible`.
    pub data_rng: Rng,
    /// After every this many completed writes, a FLUSH (0: never). The write that triggers it
    /// completes, for the measurement, when its FLUSH does.
    pub flush_every: u64,
}

pub struct Outcome {
    pub hist: Histogram,
    pub ops: u64,
    pub bytes: u64,
    pub reads: u64,
    pub writes: u64,
    /// Submit time of the first measured request and completion time of the last one.
    pub first_submit: Option<Instant>,
    pub last_complete: Option<Instant>,
    pub written: Option<Bitmap>,
    pub verified: u64,
    /// FLUSH requests completed.
    pub flushes: u64,
}

struct InFlight {
    req: Req,
    submitted: Instant,
    measured: bool,
    /// The FLUSH that follows this write is in flight.
    flushing: bool,
}

/// Fills `buf` for a write of `mode` (Reuse leaves it alone).
fn fill_data(buf: &mut [u8], mode: DataMode, rng: &mut Rng) {
    let random_part = match mode {
        DataMode::Reuse => return,
        DataMode::Random => 4096,
        DataMode::Compressible => 2048,
    };
    for block in buf.chunks_mut(4096) {
        let n = random_part.min(block.len());
        let (head, tail) = block.split_at_mut(n);
        for w in head.chunks_mut(8) {
            let v = rng.next_u64().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
        tail.fill(0);
    }
}

/// Runs the job to completion; any failed or mismatching request is an error.
/// The queue is handed back so a later phase (verify read-back) can reuse it.
pub fn run(job: Job) -> Result<(Blkioq, Outcome)> {
    let index = job.index;
    let stop = job.stop.clone();
    let r = run_inner(job);
    if r.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    r.with_context(|| format!("queue {index}"))
}

fn run_inner(job: Job) -> Result<(Blkioq, Outcome)> {
    let Job {
        index: _,
        mut q,
        buf_base,
        slot_len,
        iodepth,
        mut source,
        window,
        mut verify,
        stop,
        io_timeout,
        data,
        mut data_rng,
        flush_every,
    } = job;
    let mut slots: Vec<Option<InFlight>> = (0..iodepth).map(|_| None).collect();
    let mut completions: Vec<MaybeUninit<Completion>> = (0..iodepth).map(|_| MaybeUninit::uninit()).collect();
    let mut out = Outcome {
        hist: Histogram::new(),
        ops: 0,
        bytes: 0,
        reads: 0,
        writes: 0,
        first_submit: None,
        last_complete: None,
        written: None,
        verified: 0,
        flushes: 0,
    };
    let mut writes_done = 0u64;
    let mut in_flight = 0usize;
    let mut measured_submitted = 0u64;
    let completion_window = window.end.is_some() && window.quota.is_none();

    // SAFETY: slot `i` of this queue is [buf_base + i*slot_len, +slot_len) inside a region that
    // main allocated and mapped for this queue only; the region lives as long as `q` (Blkioq
    // holds the region registry), and a slot is touched by the CPU only while no request on it
    // is in flight.
    let slot_buf = |slot: usize, len: usize| unsafe {
        std::slice::from_raw_parts_mut((buf_base + slot * slot_len) as *mut u8, len)
    };

    // Queues up the next request on `slot`; false when the workload is over for this queue.
    let mut submit = |q: &mut Blkioq,
                      slot: usize,
                      slots: &mut Vec<Option<InFlight>>,
                      verify: &mut VerifyMode,
                      measured_submitted: &mut u64|
     -> bool {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if window.end.is_some_and(|end| now >= end) {
            return false;
        }
        let measured = now >= window.warm_until;
        if measured {
            if window.quota.is_some_and(|quota| *measured_submitted >= quota) {
                return false;
            }
            *measured_submitted += 1;
        }
        let Some(req) = source.next() else { return false };
        debug_assert!(req.len as usize <= slot_len);
        let buf = slot_buf(slot, req.len as usize);
        if req.write {
            if let VerifyMode::Write { tag, written } = verify {
                verify::fill(buf, req.offset, *tag);
                written.set(req.offset);
            } else {
                fill_data(buf, data, &mut data_rng);
            }
            q.write(req.offset, buf.as_ptr(), buf.len(), slot, ReqFlags::empty());
        } else {
            q.read(req.offset, buf.as_mut_ptr(), buf.len(), slot, ReqFlags::empty());
        }
        slots[slot] = Some(InFlight { req, submitted: Instant::now(), measured, flushing: false });
        true
    };

    for slot in 0..iodepth {
        if !submit(&mut q, slot, &mut slots, &mut verify, &mut measured_submitted) {
            break;
        }
        in_flight += 1;
    }

    while in_flight > 0 {
        let mut timeout = io_timeout;
        // min_completions = 1 blocks on the queue's completion eventfd (inside libblkio), which
        // is what a guest driver does too; busy-polling would steal a core from the daemon on
        // small machines.
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == Errno::TIME => {
                bail!("no completion within {:?} with {in_flight} requests in flight (daemon hung?)", io_timeout)
            }
            Err(e) => bail!("blkioq do_io failed: {e} ({:?})", e.errno()),
        };
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            let f = slots[slot].take().context("completion for an idle slot")?;
            in_flight -= 1;
            let kind = match (f.req.write, f.flushing) {
                (_, true) => "flush after a write",
                (true, false) => "write",
                (false, false) => "read",
            };
            if c.ret != 0 {
                bail!(
                    "{kind} of {} bytes at offset {} failed: {}",
                    f.req.len,
                    f.req.offset,
                    Errno::from_raw_os_error(-c.ret)
                );
            }
            if let (VerifyMode::Check { tag }, false) = (&verify, f.req.write) {
                if let Some(bad) = verify::check(slot_buf(slot, f.req.len as usize), f.req.offset, *tag) {
                    bail!(
                        "verify: data mismatch at device byte {bad} (read of {} bytes at offset {})",
                        f.req.len,
                        f.req.offset
                    );
                }
                out.verified += 1;
            }
            if f.flushing {
                out.flushes += 1;
            } else if f.req.write && flush_every > 0 {
                writes_done += 1;
                if writes_done % flush_every == 0 {
                    q.flush(slot, ReqFlags::empty());
                    slots[slot] = Some(InFlight { flushing: true, ..f });
                    in_flight += 1;
                    continue;
                }
            }
            let measured = if completion_window {
                now >= window.warm_until && window.end.is_some_and(|end| now <= end)
            } else {
                f.measured
            };
            if measured {
                out.hist.record(now.duration_since(f.submitted).as_nanos() as u64);
                out.ops += 1;
                out.bytes += f.req.len as u64;
                if f.req.write {
                    out.writes += 1;
                } else {
                    out.reads += 1;
                }
                if out.first_submit.is_none_or(|t| f.submitted < t) {
                    out.first_submit = Some(f.submitted);
                }
                out.last_complete = Some(now);
            }
            if submit(&mut q, slot, &mut slots, &mut verify, &mut measured_submitted) {
                in_flight += 1;
            }
        }
    }

    if let VerifyMode::Write { written, .. } = verify {
        out.written = Some(written);
    }
    Ok((q, out))
}
