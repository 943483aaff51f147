//! A queue's second thread: when one pass pops many reads, the queue
//! worker hands half of them here, so one busy queue can use two CPUs (a
//! cache hit is mostly a 4 KiB copy, and copies on two cores run side by
//! side). The worker still pops, parses and completes; the helper only
//! executes the reads it is handed, one at a time, and gives back what it
//! could not finish without blocking. Once the worker is done with its own
//! half it takes the helper's remaining reads back one by one from the
//! end, so it never waits for more than the one read the helper is
//! running: a helper slow to wake, or sharing the worker's CPU, costs no
//! more than the worker alone would.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::format::{Disk, DiskError, IoMode};
use crate::vhost::backend::execute_guarded;
use crate::vhost::request::{status_for, Request, STATUS_OK};

/// Reads a pass needs before half of them go to the helper: below this the
/// hand-off costs about what it saves.
pub const MIN_SPLIT: usize = 8;

/// How long an idle helper waits for the next batch before it sleeps: a
/// busy queue hands it one every few tens of microseconds, and a sleeping
/// thread takes that long again to wake.
const SPIN: Duration = Duration::from_micros(100);

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// What the helper is handed and gives back; the vectors keep their
/// capacity from pass to pass, so a pass allocates nothing.
#[derive(Default)]
struct Batch {
    disk: Option<Arc<dyn Disk>>,
    write_through: bool,
    serial: Vec<u8>,
    /// Reads to run: the helper takes them from the front, the worker
    /// takes back what is left from the back.
    todo: VecDeque<Request>,
    /// (head, used length) of the reads that completed, with any status.
    done: Vec<(u16, u32)>,
    /// Reads that would block: the worker sends them to the I/O pool.
    blocked: Vec<Request>,
    /// Reads the helper never started: the worker runs them itself.
    unrun: VecDeque<Request>,
    /// Reads that failed, with their error, for the worker to log.
    failed: Vec<(u16, &'static str, String)>,
}

struct Inner {
    state: AtomicU8,
    stop: AtomicBool,
    batch: Mutex<Batch>,
}

/// One queue's helper thread; stopped and joined when dropped.
pub struct QueueHelper {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    handle: Thread,
}

/// What a finished batch gave back.
pub struct Finished<'a> {
    batch: parking_lot::MutexGuard<'a, Batch>,
}

impl Finished<'_> {
    /// Completions to put in the used ring.
    pub fn done(&self) -> &[(u16, u32)] {
        &self.batch.done
    }

    /// Reads that would block, for the I/O pool.
    pub fn take_blocked(&mut self) -> impl Iterator<Item = Request> + '_ {
        self.batch.blocked.drain(..)
    }

    /// Reads the helper did not start: the worker runs them.
    pub fn take_unrun(&mut self) -> impl Iterator<Item = Request> + '_ {
        self.batch.unrun.drain(..)
    }

    /// (head, operation, error) of the reads that failed.
    pub fn failed(&self) -> &[(u16, &'static str, String)] {
        &self.batch.failed
    }
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.batch.done.clear();
        self.batch.failed.clear();
        self.batch.blocked.clear();
        self.batch.unrun.clear();
        self.batch.disk = None;
    }
}

impl QueueHelper {
    /// Starts the helper of queue `queue`.
    pub fn spawn(queue: usize) -> std::io::Result<Self> {
        let inner =
            Arc::new(Inner { state: AtomicU8::new(IDLE), stop: AtomicBool::new(false), batch: Mutex::default() });
        let i = inner.clone();
        let thread = std::thread::Builder::new().name(format!("driveblk-q{queue}b")).spawn(move || run(&i))?;
        let handle = thread.thread().clone();
        Ok(Self { inner, thread: Some(thread), handle })
    }

    /// Whether its thread still runs.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Hands `reads` (drained) to the helper; call [`QueueHelper::finish`]
    /// before handing it more.
    pub fn start(
        &self,
        disk: &Arc<dyn Disk>,
        write_through: bool,
        serial: &[u8],
        reads: impl Iterator<Item = Request>,
    ) {
        {
            let mut b = self.inner.batch.lock();
            b.disk = Some(disk.clone());
            b.write_through = write_through;
            if b.serial != serial {
                b.serial = serial.to_vec();
            }
            b.todo.extend(reads);
        }
        self.inner.state.store(POSTED, Ordering::Release);
        // Cheap when the helper is spinning: only a parked thread costs a wake-up.
        self.handle.unpark();
    }

    /// One read of the batch the helper has not started, taken back to
    /// run on the worker (the last one: the helper works from the front).
    pub fn take_back(&self) -> Option<Request> {
        self.inner.batch.lock().todo.pop_back()
    }

    /// Ends the batch handed over by `start`: what the helper ran, and
    /// what it had not started (taken back rather than waited for). Waits
    /// at most for the read the helper is running.
    pub fn finish(&self) -> Finished<'_> {
        if self.inner.state.compare_exchange(POSTED, IDLE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let mut batch = self.inner.batch.lock();
            let Batch { todo, unrun, .. } = &mut *batch;
            unrun.append(todo);
            return Finished { batch };
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while self.inner.state.load(Ordering::Acquire) != DONE {
            spins = spins.wrapping_add(1);
            // The helper may have lost its CPU (to the guest, the client):
            // give ours away rather than spin against it.
            if spins % 64 == 0 && start.elapsed() > Duration::from_micros(20) {
                if !self.alive() {
                    // It died (a panic outside a request): whatever it had
                    // not run comes back, so no chain is left unanswered.
                    tracing::error!("a queue's second thread is gone; the queue runs on one");
                    let mut batch = self.inner.batch.lock();
                    let Batch { todo, unrun, .. } = &mut *batch;
                    unrun.append(todo);
                    return Finished { batch };
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        self.inner.state.store(IDLE, Ordering::Relaxed);
        Finished { batch: self.inner.batch.lock() }
    }
}

impl Drop for QueueHelper {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.handle.unpark();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(inner: &Inner) {
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            // Read before trying to claim: a spin of compare-exchanges
            // would keep stealing the line from the worker.
            if inner.state.load(Ordering::Acquire) == POSTED
                && inner.state.compare_exchange(POSTED, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok()
            {
                break;
            }
            if inner.stop.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 && idle_since.elapsed() > SPIN {
                // `start` stores POSTED before it unparks, so a batch posted
                // after the check above still wakes us. (A batch taken back
                // before we got to it is simply not there any more.)
                // (`Drop` sets `stop`, then unparks.) No timeout: an idle
                // helper never wakes on its own.
                std::thread::park();
            } else {
                std::hint::spin_loop();
            }
        }
        {
            let mut b = inner.batch.lock();
            match b.disk.take() {
                // Never posted without a disk; were it, the worker still
                // gets every read back.
                None => {
                    let Batch { todo, unrun, .. } = &mut *b;
                    unrun.append(todo);
                }
                Some(disk) => {
                    // Taken out for the batch, put back after: the reads run
                    // with the lock let go, so the worker can take some back.
                    let (write_through, serial) = (b.write_through, std::mem::take(&mut b.serial));
                    while let Some(req) = b.todo.pop_front() {
                        let r = MutexGuard::unlocked(&mut b, || {
                            execute_guarded(&req, &*disk, IoMode::NonBlocking, write_through, &serial)
                        });
                        match r {
                            Ok(n) => {
                                let used = req.complete(STATUS_OK, n);
                                b.done.push((req.head, used));
                            }
                            Err(DiskError::WouldBlock) => b.blocked.push(req),
                            Err(e) => {
                                b.failed.push((req.head, req.op_name(), e.to_string()));
                                let used = req.complete(status_for(&e), 0);
                                b.done.push((req.head, used));
                            }
                        }
                    }
                    b.serial = serial;
                }
            }
        }
        inner.state.store(DONE, Ordering::Release);
    }
}
