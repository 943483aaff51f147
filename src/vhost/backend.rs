//! The vhost-user-blk backend: one epoll worker per virtqueue pops chains,
//! runs each request at once if it can complete without waiting, and hands
//! the rest to the I/O pool. Completions are added to the used ring from
//! whichever thread finishes them, so a slow request never holds up the
//! requests behind it (virtio allows out-of-order completion).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::format::{Disk, DiskError, IoMode};
use crate::vhost::config::{protocol_features, virtio_features, DeviceConfig, VirtioBlkConfig, WRITEBACK_OFFSET};
use crate::vhost::pool::IoPool;
use crate::vhost::ratelimit::LogLimiter;
use crate::vhost::request::{status_for, GuestMem, Request, STATUS_OK};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Requests accepted from one queue and not yet in its used ring.
#[derive(Default)]
struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    fn add(&self, n: usize) {
        *self.count.lock() += n;
    }

    fn sub(&self, n: usize) {
        let mut c = self.count.lock();
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self, queue: usize) {
        let mut c = self.count.lock();
        while *c > 0 {
            if self.idle.wait_for(&mut c, Duration::from_secs(5)).timed_out() && *c > 0 {
                tracing::warn!(queue, inflight = *c, "still waiting for in-flight requests to complete");
            }
        }
    }
}

/// State shared by the queue workers and the I/O pool.
struct Shared {
    disk: Arc<dyn Disk>,
    cfg: DeviceConfig,
    pool: Arc<IoPool>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMem>>>,
    event_idx: AtomicBool,
    /// Virtio "writeback" (WCE): false means every write is flushed before
    /// it completes (also forced when the driver did not negotiate FLUSH).
    writeback: AtomicBool,
    inflight: Vec<Inflight>,
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    log_limit: LogLimiter,
}

/// The vhost-user-blk device for one frontend connection. Cheap to clone.
#[derive(Clone)]
pub struct BlockBackend {
    shared: Arc<Shared>,
}

impl BlockBackend {
    /// A backend serving `disk` with the given settings, running blocking
    /// requests on `pool`.
    pub fn new(disk: Arc<dyn Disk>, cfg: DeviceConfig, pool: Arc<IoPool>) -> Self {
        let inflight = (0..cfg.num_queues).map(|_| Inflight::default()).collect();
        Self {
            shared: Arc::new(Shared {
                disk,
                cfg,
                pool,
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                inflight,
                exit_notifiers: Mutex::new(Vec::new()),
                log_limit: LogLimiter::new(10, Duration::from_secs(1)),
            }),
        }
    }

    /// Tells the queue worker threads of this connection to exit.
    pub fn stop_workers(&self) {
        for n in self.shared.exit_notifiers.lock().drain(..) {
            let _ = n.notify();
        }
    }

    /// Waits until every accepted request of every queue has completed.
    pub fn wait_idle(&self) {
        for (q, f) in self.shared.inflight.iter().enumerate() {
            f.wait_idle(q);
        }
    }

    fn process_queue(&self, qidx: usize, vring: &Vring) -> io::Result<()> {
        let sh = &self.shared;
        let Some(atomic) = sh.mem.read().clone() else { return Ok(()) };
        let event_idx = sh.event_idx.load(Ordering::Relaxed);
        let capacity = sh.disk.capacity();
        let read_only = sh.cfg.read_only || sh.disk.read_only();
        let write_through = !sh.writeback.load(Ordering::Relaxed);
        let mut done: Vec<(u16, u32)> = Vec::new();
        let mut dispatched = false;
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // Order matters: read the avail index first, then snapshot guest
            // memory, then pop only the chains that index covers. A frontend
            // maps a buffer's region (acked) before it publishes a chain using
            // it, so this snapshot holds every region those chains touch; one
            // taken earlier could predate a region just added.
            let (chains, mem): (Vec<_>, _) = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let ring_mem = atomic.memory();
                let ready = match queue.avail_idx(&*ring_mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) as usize,
                    Err(e) => {
                        self.warn(format_args!("queue {qidx}: cannot read the available ring: {e}"));
                        return Ok(());
                    }
                };
                let mem = atomic.memory().into_inner();
                match queue.iter(mem.clone()) {
                    Ok(it) => (it.take(ready).collect(), mem),
                    Err(e) => {
                        self.warn(format_args!("queue {qidx}: cannot read the available ring: {e}"));
                        return Ok(());
                    }
                }
            };
            tracing::trace!(queue = qidx, chains = chains.len(), "popped");
            sh.inflight[qidx].add(chains.len());
            for chain in chains {
                let req = Request::parse(chain, mem.clone(), capacity, read_only);
                if let Some((status, reason)) = req.refused() {
                    self.warn(format_args!("queue {qidx}: request refused: {reason}"));
                    done.push((req.head, req.complete(status, 0)));
                    continue;
                }
                match execute_guarded(&req, &*sh.disk, IoMode::NonBlocking, write_through, &sh.cfg.serial) {
                    Ok(n) => done.push((req.head, req.complete(STATUS_OK, n))),
                    Err(DiskError::WouldBlock) => {
                        tracing::trace!(queue = qidx, head = req.head, "would block: to the I/O pool");
                        dispatched = true;
                        self.dispatch(qidx, vring.clone(), req, write_through)
                    }
                    Err(e) => {
                        self.warn(format_args!("queue {qidx}: {:?} failed: {e}", req.op_name()));
                        done.push((req.head, req.complete(status_for(&e), 0)));
                    }
                }
            }
            if !done.is_empty() {
                sh.complete(qidx, vring, &done);
                done.clear();
            }
            // Before going back to sleep, poll the ring briefly with guest
            // notifications still off: a busy guest's next request usually
            // arrives within microseconds, and catching it here saves both
            // its kick and our wake-up. Not when this wake-up handed work to
            // the I/O pool: its threads need the CPU more than we do.
            if event_idx && !dispatched && self.poll_for_more(vring, &atomic.memory()) {
                continue;
            }
            // With EVENT_IDX, re-enabling notifications reports whether new
            // chains arrived meanwhile; without it one pass is enough.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Spins for up to `poll_us` microseconds waiting for new chains in the
    /// avail ring; true if some arrived.
    fn poll_for_more(&self, vring: &Vring, mem: &GuestMem) -> bool {
        let budget = Duration::from_micros(self.shared.cfg.poll_us);
        if budget.is_zero() {
            return false;
        }
        let start = std::time::Instant::now();
        loop {
            {
                let state = vring.get_ref();
                let q = state.get_queue();
                match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(idx) if idx.0 != q.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            if start.elapsed() >= budget {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Runs a request that would block on the I/O pool.
    fn dispatch(&self, qidx: usize, vring: Vring, req: Request, write_through: bool) {
        let sh = self.shared.clone();
        let job = move || {
            let (status, written) =
                match execute_guarded(&req, &*sh.disk, IoMode::Blocking, write_through, &sh.cfg.serial) {
                    Ok(n) => (STATUS_OK, n),
                    Err(e) => {
                        if let Some(suppressed) = sh.log_limit.allow() {
                            tracing::warn!(queue = qidx, suppressed, "{} failed: {e}", req.op_name());
                        }
                        (status_for(&e), 0)
                    }
                };
            let len = req.complete(status, written);
            sh.complete(qidx, &vring, &[(req.head, len)]);
        };
        self.shared.pool.submit(Box::new(job));
    }

    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.shared.log_limit.allow() {
            tracing::warn!(suppressed, "{msg}");
        }
    }
}

/// Runs a request, turning a panic anywhere below into an I/O error for
/// this request: every accepted chain must reach the used ring, or the
/// guest's queue stalls for good.
fn execute_guarded(
    req: &Request,
    disk: &dyn Disk,
    mode: IoMode,
    write_through: bool,
    serial: &[u8],
) -> Result<u32, DiskError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| req.execute(disk, mode, write_through, serial))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("internal error while serving a {} request: {msg}", req.op_name());
            Err(DiskError::Io { op: "internal error", offset: 0, source: io::Error::other(msg) })
        }
    }
}

impl Shared {
    /// Puts completed requests in the used ring and notifies the guest if it
    /// asked to be notified.
    fn complete(&self, qidx: usize, vring: &Vring, done: &[(u16, u32)]) {
        let notify = {
            let mut state = vring.get_mut();
            for &(head, len) in done {
                if let Err(e) = state.add_used(head, len) {
                    tracing::warn!(queue = qidx, head, "cannot add to used ring: {e}");
                }
            }
            if self.event_idx.load(Ordering::Relaxed) {
                state.needs_notification().unwrap_or(true)
            } else {
                true
            }
        };
        tracing::trace!(queue = qidx, completed = done.len(), notify, "completed");
        if notify {
            if let Err(e) = vring.signal_used_queue() {
                tracing::debug!(queue = qidx, "cannot signal used queue: {e}");
            }
        }
        self.inflight[qidx].sub(done.len());
    }
}

impl Request {
    fn op_name(&self) -> &'static str {
        use crate::vhost::request::Operation::*;
        match self.op {
            Read { .. } => "read",
            Write { .. } => "write",
            Flush => "flush",
            GetId { .. } => "get-id",
            Discard(_) => "discard",
            WriteZeroes(_) => "write-zeroes",
            Refused { .. } => "refused request",
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shared.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.shared.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        virtio_features(self.shared.cfg.read_only || self.shared.disk.read_only())
    }

    fn acked_features(&self, features: u64) {
        // Without FLUSH the driver cannot ask for durability, so every write
        // must be durable on completion (virtio 5.2.5).
        if features & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
            self.shared.writeback.store(false, Ordering::Relaxed);
        } else if features & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            self.shared.writeback.store(true, Ordering::Relaxed);
        }
        self.shared.event_idx.store(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let sh = &self.shared;
        VirtioBlkConfig::new(
            sh.disk.capacity(),
            sh.disk.discard_granularity(),
            &sh.cfg,
            sh.writeback.load(Ordering::Relaxed),
        )
        .read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The only writable field is the cache mode byte (CONFIG_WCE).
        if offset == WRITEBACK_OFFSET && buf.len() == 1 {
            self.shared.writeback.store(buf[0] != 0, Ordering::Relaxed);
            tracing::info!(writeback = buf[0] != 0, "guest set the cache mode");
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("config write at {offset}+{} refused", buf.len())))
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        *self.shared.mem.write() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let keep = notifier.try_clone().ok()?;
        self.shared.exit_notifiers.lock().push(keep);
        Some((consumer, notifier))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(f) = self.shared.inflight.get(queue_index as usize) {
            f.wait_idle(queue_index as usize);
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], _thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // Spurious calls (e.g. when a vring is enabled) are harmless: an empty
        // queue yields no chains.
        match vrings.get(device_event as usize) {
            Some(vring) => self.process_queue(device_event as usize, vring),
            None => Ok(()),
        }
    }
}
