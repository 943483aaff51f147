//! The vhost-user-blk backend: one epoll worker per virtqueue pops chains,
//! runs each request at once if it can complete without waiting (half the
//! reads of a big pass on the queue's second thread, `helper`), and hands
//! the rest to the I/O pool. Completions are added to the used ring from
//! whichever thread finishes them, so a slow request never holds up the
//! requests behind it (virtio allows out-of-order completion). Every chain
//! is recorded in the frontend's inflight region from pop to completion, so
//! a daemon restarted after a crash resubmits exactly the unfinished ones.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use smallvec::SmallVec;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::format::{Disk, DiskError, IoMode};
use crate::vhost::config::{protocol_features, virtio_features, DeviceConfig, VirtioBlkConfig, WRITEBACK_OFFSET};
use crate::vhost::helper::{QueueHelper, MIN_SPLIT};
use crate::vhost::inflight::{walk_chain, CacheMode, InflightRegion};
use crate::vhost::pool::IoPool;
use crate::vhost::ratelimit::LogLimiter;
use crate::vhost::request::{status_for, GuestMem, Operation, Request, STATUS_OK};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMem>>;

/// Requests accepted from one queue and not yet in its used ring, capped:
/// a guest that republishes descriptors still in flight (or a queue size
/// the guest lies about) cannot make the worker pop without bound. When the
/// cap is hit the worker stops popping that queue; the completion that
/// frees room wakes it through `resume`, since the guest will not kick for
/// chains it already published.
struct Inflight {
    state: Mutex<InflightState>,
    idle: Condvar,
    /// Registered with the queue's epoll handler (see
    /// [`BlockBackend::register_resume`]); written when a throttled queue
    /// has room again.
    resume: EventNotifier,
    resume_consumer: EventConsumer,
}

#[derive(Default)]
struct InflightState {
    count: usize,
    /// The worker left chains in the avail ring for lack of room.
    throttled: bool,
    /// Stopping: nothing more is accepted (see [`BlockBackend::drain`]).
    /// Under the same lock as `count`, so a reservation is either counted
    /// before the drain waits or refused.
    draining: bool,
}

impl Inflight {
    fn new() -> io::Result<Self> {
        let (resume_consumer, resume) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(Self { state: Mutex::new(InflightState::default()), idle: Condvar::new(), resume, resume_consumer })
    }

    /// Accepts up to `want` more requests with at most `cap` in flight;
    /// returns how many. Granting fewer marks the queue throttled, under
    /// the same lock `sub` takes, so the wake-up cannot be missed.
    fn reserve(&self, want: usize, cap: usize) -> usize {
        let mut st = self.state.lock();
        if st.draining {
            return 0;
        }
        let granted = want.min(cap.saturating_sub(st.count));
        st.count += granted;
        if granted < want {
            st.throttled = true;
        }
        granted
    }

    fn sub(&self, n: usize) {
        let mut st = self.state.lock();
        st.count = st.count.saturating_sub(n);
        if st.throttled {
            st.throttled = false;
            if let Err(e) = self.resume.notify() {
                tracing::warn!("cannot wake a throttled queue: {e}");
            }
        }
        if st.count == 0 {
            self.idle.notify_all();
        }
    }

    /// Gives back a reservation the worker could not use because the ring
    /// is unreadable, and clears `throttled` without waking the queue: a
    /// resume would find the same ring and fail again, for ever. The
    /// guest's next kick brings the worker back.
    fn release_unread(&self, n: usize) {
        let mut st = self.state.lock();
        st.count = st.count.saturating_sub(n);
        st.throttled = false;
        if st.count == 0 {
            self.idle.notify_all();
        }
    }

    fn start_draining(&self) {
        self.state.lock().draining = true;
    }

    fn draining(&self) -> bool {
        self.state.lock().draining
    }

    /// Waits until nothing is in flight or `until` passes; returns how many
    /// requests are still in flight.
    fn wait_idle_until(&self, until: std::time::Instant) -> usize {
        let mut st = self.state.lock();
        while st.count > 0 && !self.idle.wait_until(&mut st, until).timed_out() {}
        st.count
    }

    fn wait_idle(&self, queue: usize) {
        let mut st = self.state.lock();
        while st.count > 0 {
            if self.idle.wait_for(&mut st, Duration::from_secs(5)).timed_out() && st.count > 0 {
                tracing::warn!(queue, inflight = st.count, "still waiting for in-flight requests to complete");
            }
        }
    }
}

/// What the cache mode is derived from.
#[derive(Default)]
struct CacheState {
    /// The driver's features at the last SET_FEATURES.
    features: Option<u64>,
    /// The mode the guest chose (a config write of the WCE byte, here or
    /// to a previous daemon: the region's trailer); None: never set.
    chosen: Option<bool>,
}

impl CacheState {
    /// Write back or not (virtio 5.2.5): a driver without FLUSH cannot ask
    /// for durability, so every write must be durable on completion; one
    /// with FLUSH but not CONFIG_WCE gets write-back; one with both gets
    /// the mode it chose, write-back until it chooses. Before the features
    /// are known, the chosen mode.
    fn effective(&self) -> bool {
        match self.features {
            Some(f) if f & (1 << VIRTIO_BLK_F_FLUSH) == 0 => false,
            Some(f) if !settable(f) => true,
            _ => self.chosen.unwrap_or(true),
        }
    }
}

/// The driver may set the cache mode: FLUSH and CONFIG_WCE negotiated.
fn settable(features: u64) -> bool {
    features & (1 << VIRTIO_BLK_F_FLUSH) != 0 && features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0
}

/// State shared by the queue workers and the I/O pool.
struct Shared {
    disk: Arc<dyn Disk>,
    cfg: DeviceConfig,
    pool: Arc<IoPool>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMem>>>,
    event_idx: AtomicBool,
    /// The effective cache mode, virtio "writeback" (WCE): false means
    /// every write is flushed before it completes. Derived from `mode` by
    /// [`CacheState::effective`].
    writeback: AtomicBool,
    mode: Mutex<CacheState>,
    inflight: Vec<Inflight>,
    /// The frontend's inflight tracking region (`SET_INFLIGHT_FD`), if it
    /// sent one: popped chains are recorded there until they complete, so a
    /// daemon restarted after a crash resubmits exactly the unfinished ones.
    region: RwLock<Option<Arc<InflightRegion>>>,
    exit_notifiers: Mutex<Vec<EventNotifier>>,
    log_limit: LogLimiter,
    /// Each queue's second thread, when the device has them.
    helpers: Vec<QueueHelper>,
}

/// The vhost-user-blk device for one frontend connection. Cheap to clone.
#[derive(Clone)]
pub struct BlockBackend {
    shared: Arc<Shared>,
}

impl BlockBackend {
    /// A backend serving `disk` with the given settings, running blocking
    /// requests on `pool`. Fails only if an eventfd cannot be created.
    pub fn new(disk: Arc<dyn Disk>, cfg: DeviceConfig, pool: Arc<IoPool>) -> io::Result<Self> {
        let inflight = (0..cfg.num_queues).map(|_| Inflight::new()).collect::<io::Result<Vec<_>>>()?;
        // Only where every queue can have two CPUs: otherwise the second
        // threads take turns with the other queues' first ones (two queues
        // on two CPUs ran at half speed with them).
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let helpers = if cfg.queue_threads >= 2 && cpus >= 2 * usize::from(cfg.num_queues) {
            (0..usize::from(cfg.num_queues)).map(QueueHelper::spawn).collect::<io::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            shared: Arc::new(Shared {
                disk,
                cfg,
                pool,
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                mode: Mutex::new(CacheState::default()),
                inflight,
                region: RwLock::new(None),
                exit_notifiers: Mutex::new(Vec::new()),
                log_limit: LogLimiter::new(10, Duration::from_secs(1)),
                helpers,
            }),
        })
    }

    /// The cache mode across a daemon restart: QEMU answers the guest from
    /// its own copy of the mode byte and never sends it to a new daemon, so
    /// a guest that chose write-through would silently get write-back. The
    /// mode a previous daemon recorded in the region QEMU kept (only ever
    /// one the guest set) is taken back; a region holding none (a new one
    /// after a device reset) is given the mode the guest set here, if any.
    fn keep_cache_mode(&self, region: &InflightRegion) {
        let mut st = self.shared.mode.lock();
        let Some(mode) = region.cache_mode() else {
            if let Some(writeback) = st.chosen {
                region.set_cache_mode(if writeback { CacheMode::WriteBack } else { CacheMode::WriteThrough });
            }
            return;
        };
        let writeback = mode == CacheMode::WriteBack;
        let known = st.chosen.replace(writeback).is_some();
        if !known && st.effective() == writeback {
            let mode = if writeback { "write back" } else { "write through" };
            tracing::info!("the guest's cache mode ({mode}), set before this daemon started, is kept");
        }
        self.apply_cache_mode(&st);
    }

    /// Makes the effective mode the one `st` gives, saying so when it
    /// changes: the mode a guest runs in is worth a line.
    fn apply_cache_mode(&self, st: &CacheState) {
        let writeback = st.effective();
        if self.shared.writeback.swap(writeback, Ordering::Relaxed) != writeback {
            let why = match st.features {
                Some(f) if f & (1 << VIRTIO_BLK_F_FLUSH) == 0 => "the driver did not negotiate FLUSH",
                Some(f) if f & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 => "the driver negotiated FLUSH, not CONFIG_WCE",
                _ if st.chosen.is_some() => "the guest's choice",
                Some(_) => "the driver negotiated FLUSH (write back until the guest chooses)",
                None => "the default",
            };
            let mode = if writeback { "write back" } else { "write through" };
            tracing::info!("serving the guest {mode}: {why}");
        }
    }

    /// Registers each queue's resume event with the epoll handler of the
    /// thread serving that queue (one thread per queue, see
    /// `queues_per_thread`). Without it a throttled queue would only resume
    /// on the guest's next kick.
    pub fn register_resume<H: std::ops::Deref<Target = VringEpollHandler<Self>>>(
        &self,
        handlers: &[H],
    ) -> io::Result<()> {
        let nq = self.shared.cfg.num_queues as u64;
        for (q, f) in self.shared.inflight.iter().enumerate() {
            let h = handlers.get(q).ok_or_else(|| io::Error::other(format!("no epoll handler for queue {q}")))?;
            h.register_listener(f.resume_consumer.as_raw_fd(), EventSet::IN, resume_event(nq, q))?;
        }
        Ok(())
    }

    /// Tells the queue worker threads of this connection to exit.
    pub fn stop_workers(&self) {
        for n in self.shared.exit_notifiers.lock().drain(..) {
            let _ = n.notify();
        }
    }

    /// The first step of a stop, while the frontend is still connected:
    /// accepts no more requests (the guest's new ones wait in the ring for
    /// the next daemon) and waits, at most `within`, for those accepted to
    /// complete. Their completions must reach the guest through the
    /// frontend's notifiers, which it tears down when the connection ends;
    /// a request completed after that sits in the used ring with no
    /// interrupt, and the guest's I/O hangs. True if all completed.
    pub fn drain(&self, within: Duration) -> bool {
        let sh = &self.shared;
        for f in &sh.inflight {
            f.start_draining();
        }
        let start = std::time::Instant::now();
        let until = start + within;
        let inflight: usize = sh.inflight.iter().map(|f| f.state.lock().count).sum();
        if inflight > 0 {
            tracing::info!(inflight, "stopping: the requests in flight complete before the frontend is let go");
        }
        let left: usize = sh.inflight.iter().map(|f| f.wait_idle_until(until)).sum();
        if left > 0 {
            tracing::warn!(
                left,
                secs = within.as_secs(),
                "stopping: requests still in flight after the stop's wait: letting the frontend go anyway (they complete afterwards; the next daemon on the socket signals the guest when QEMU reconnects)"
            );
        } else if inflight > 0 {
            tracing::info!(ms = start.elapsed().as_millis() as u64, "stopping: every request in flight completed");
        }
        left == 0
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
        // Stopping: new requests wait in the ring for the next daemon.
        if sh.inflight[qidx].draining() {
            return Ok(());
        }
        let region = sh.region.read().clone();
        let event_idx = sh.event_idx.load(Ordering::Relaxed);
        let capacity = sh.disk.capacity();
        let read_only = sh.cfg.read_only || sh.disk.read_only();
        let write_through = !sh.writeback.load(Ordering::Relaxed);
        // Inline up to a typical batch: a pass allocates nothing.
        let mut done: SmallVec<[(u16, u32); 32]> = SmallVec::new();
        let mut dispatched = false;
        loop {
            let mut throttled = false;
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // Order matters: read the avail index first, then snapshot guest
            // memory, then pop only the chains that index covers. A frontend
            // maps a buffer's region (acked) before it publishes a chain using
            // it, so this snapshot holds every region those chains touch; one
            // taken earlier could predate a region just added.
            // Chains borrow the snapshot (declared first, so it outlives
            // them) instead of each holding a count on the shared mapping.
            let mem: Arc<GuestMem>;
            let chains: SmallVec<[_; 32]>;
            let mut resubmit = Vec::new();
            {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                // Stopped (GET_VRING_BASE) or not started: the frontend owns
                // the ring's indices, so nothing is popped or resubmitted.
                if !queue.ready() {
                    return Ok(());
                }
                let ring_mem = atomic.memory();
                // First pass after a (re)connect with an inflight region:
                // the chains a previous daemon left unfinished run first,
                // and popping resumes after the last chain it took.
                if let Some(r) = &region {
                    let used = queue.used_idx(&*ring_mem, std::sync::atomic::Ordering::Acquire).map(|i| i.0);
                    if let Some(resume) = used.ok().and_then(|used| r.check(qidx, used).map(|res| (used, res))) {
                        let (used, resume) = resume;
                        queue.set_next_avail(resume.next_avail);
                        queue.set_next_used(used);
                        let table = GuestAddress(queue.desc_table());
                        resubmit =
                            resume.heads.iter().map(|&h| (h, walk_chain(&ring_mem, table, queue.size(), h))).collect();
                        if sh.inflight[qidx].reserve(resubmit.len(), usize::MAX) < resubmit.len() {
                            // Stopping: they stay recorded in the region
                            // for the next daemon.
                            return Ok(());
                        }
                        // Every start after a stop/cont or a reconnect
                        // finds the region: worth a line only when it
                        // held requests.
                        if resubmit.is_empty() {
                            tracing::debug!(
                                queue = qidx,
                                used,
                                next_avail = resume.next_avail,
                                "nothing left in flight"
                            );
                        } else {
                            tracing::info!(
                                queue = qidx,
                                resubmitted = resubmit.len(),
                                used,
                                next_avail = resume.next_avail,
                                "resuming the requests a previous daemon left in flight"
                            );
                        }
                    }
                }
                let ready = match queue.avail_idx(&*ring_mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(idx) => idx.0.wrapping_sub(queue.next_avail()) as usize,
                    Err(e) => {
                        self.warn(format_args!("queue {qidx}: cannot read the available ring: {e}"));
                        return Ok(());
                    }
                };
                // Never more in flight than the ring holds: a driver cannot
                // legitimately have more chains outstanding than entries.
                let cap = usize::from(queue.size()).clamp(1, usize::from(sh.cfg.queue_size.max(1)));
                let granted = sh.inflight[qidx].reserve(ready, cap);
                if granted < ready {
                    throttled = true;
                    tracing::debug!(queue = qidx, ready, granted, "in-flight cap reached: not popping more");
                }
                mem = atomic.memory().into_inner();
                match queue.iter(&*mem) {
                    Ok(it) => {
                        chains = it.take(granted).collect();
                        // The avail index said `granted` chains are there;
                        // return the reservation of any the iterator did not yield.
                        if chains.len() < granted {
                            sh.inflight[qidx].sub(granted - chains.len());
                        }
                        // Recorded before anything runs: a crash from here
                        // on resubmits them.
                        if let Some(r) = &region {
                            for c in &chains {
                                r.get(qidx, c.head_index());
                            }
                        }
                    }
                    Err(e) => {
                        sh.inflight[qidx].release_unread(granted);
                        self.warn(format_args!("queue {qidx}: cannot read the available ring: {e}"));
                        if resubmit.is_empty() {
                            return Ok(());
                        }
                        chains = SmallVec::new();
                    }
                }
            }
            tracing::trace!(queue = qidx, chains = chains.len(), "popped");
            let resubmitted = resubmit
                .into_iter()
                .map(|(head, descs)| Request::parse_descriptors(head, descs, mem.clone(), capacity, read_only));
            let popped = chains.into_iter().map(|chain| Request::parse(chain, mem.clone(), capacity, read_only));
            let mut reqs: SmallVec<[Request; 32]> = resubmitted.chain(popped).collect();
            // Half the reads of a big pass run on the queue's helper, at the
            // same time as the rest run here.
            let reads = if sh.helpers.is_empty() {
                0
            } else {
                reqs.iter().filter(|r| matches!(r.op, Operation::Read { .. })).count()
            };
            let helper = sh.helpers.get(qidx).filter(|h| reads >= MIN_SPLIT && h.alive() && !holds_a_stream(&reqs));
            if let Some(h) = helper {
                let mut give = reads / 2;
                let mut mine: SmallVec<[Request; 32]> = SmallVec::new();
                let mut theirs: SmallVec<[Request; 32]> = SmallVec::new();
                for r in reqs.drain(..) {
                    if give > 0 && matches!(r.op, Operation::Read { .. }) {
                        give -= 1;
                        theirs.push(r);
                    } else {
                        mine.push(r);
                    }
                }
                h.start(&sh.disk, write_through, &sh.cfg.serial, theirs.into_iter());
                reqs = mine;
            }
            let mut run_here = |req: Request| {
                if let Some((status, reason)) = req.refused() {
                    self.warn(format_args!("queue {qidx}: request refused: {reason}"));
                    done.push((req.head, req.complete(status, 0)));
                    return;
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
            };
            for req in reqs {
                run_here(req);
            }
            if let Some(h) = helper {
                // The helper's reads it has not started: here, from the last.
                while let Some(req) = h.take_back() {
                    run_here(req);
                }
                let mut fin = h.finish();
                // Not started by the helper yet: quicker here than waiting.
                for req in fin.take_unrun() {
                    run_here(req);
                }
                done.extend_from_slice(fin.done());
                for (head, op, e) in fin.failed() {
                    self.warn(format_args!("queue {qidx}: {op:?} (head {head}) failed: {e}"));
                }
                for req in fin.take_blocked() {
                    tracing::trace!(queue = qidx, head = req.head, "would block: to the I/O pool");
                    dispatched = true;
                    self.dispatch(qidx, vring.clone(), req, write_through);
                }
            }
            if !done.is_empty() {
                sh.complete(qidx, vring, &done);
                done.clear();
            }
            if throttled {
                // Chains are left in the ring: the completion that frees room
                // writes the resume event and we come back for them. (If
                // the completions above freed room already, that event is
                // pending now.)
                break;
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
        self.shared.warn(msg)
    }
}

/// Whether one read of the pass starts where another ends: part of a
/// sequential stream, which the tier's readahead detects per thread, so
/// such a pass is not split between a queue's two threads.
fn holds_a_stream(reqs: &[Request]) -> bool {
    let mut spans: SmallVec<[(u64, u64); 32]> = reqs
        .iter()
        .filter_map(|r| match &r.op {
            Operation::Read { offset, data } => Some((*offset, offset.saturating_add(data.len() as u64))),
            _ => None,
        })
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[0].1 == w[1].0)
}

/// Whether the queue is enabled and not stopped: a resume event can
/// outlive GET_VRING_BASE, after which the queue must not move.
fn serving(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// The epoll `data` of queue `q`'s resume event: past the range
/// vhost-user-backend reserves for queues and its exit event.
fn resume_event(num_queues: u64, q: usize) -> u64 {
    num_queues + 1 + q as u64
}

/// Runs a request, turning a panic anywhere below into an I/O error for
/// this request: every accepted chain must reach the used ring, or the
/// guest's queue stalls for good.
pub(crate) fn execute_guarded(
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
    /// A warning under the log limit: a guest can cause any number of them.
    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(suppressed, "{msg}");
        }
    }

    /// Puts completed requests in the used ring and notifies the guest if it
    /// asked to be notified.
    fn complete(&self, qidx: usize, vring: &Vring, done: &[(u16, u32)]) {
        let region = self.region.read();
        let notify = {
            let mut state = vring.get_mut();
            let size = state.get_queue().size();
            for &(head, len) in done {
                // A head the queue does not have (a guest can name 0xffff)
                // has no used entry to take: the chain is dropped.
                if head >= size {
                    self.warn(format_args!(
                        "queue {qidx}: chain head {head} is beyond the {size}-entry queue: dropped"
                    ));
                    continue;
                }
                // Inflight record order (libvhost-user's vu_queue_push): a
                // crash between any two steps is repaired by `check`.
                if let Some(r) = region.as_deref() {
                    r.pre_put(qidx, head);
                }
                if let Err(e) = state.add_used(head, len) {
                    self.warn(format_args!("queue {qidx}: cannot add head {head} to the used ring: {e}"));
                }
                if let Some(r) = region.as_deref() {
                    r.post_put(qidx, head, state.get_queue().next_used());
                }
            }
            if self.event_idx.load(Ordering::Relaxed) {
                state.needs_notification().unwrap_or(true)
            } else {
                true
            }
        };
        drop(region);
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
    pub(crate) fn op_name(&self) -> &'static str {
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
        // Every SET_FEATURES: firmware (SeaBIOS acks no FLUSH) and then the
        // guest's own driver negotiate on one connection, and each gets the
        // mode its features call for.
        let mut st = self.shared.mode.lock();
        st.features = Some(features);
        self.apply_cache_mode(&st);
        drop(st);
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
            // Only a driver that negotiated FLUSH and CONFIG_WCE may change
            // the mode (virtio 5.2.5); otherwise the one `acked_features`
            // forced stays, or a guest without FLUSH could turn write-through
            // off. Ignored rather than refused: an error here ends the
            // connection. A write before the features are known is kept:
            // `acked_features` forces the mode then if it must.
            let sh = &self.shared;
            let mut st = sh.mode.lock();
            if st.features.is_some_and(|f| !settable(f)) {
                sh.warn(format_args!("cache mode write ignored: FLUSH and CONFIG_WCE were not negotiated"));
                return Ok(());
            }
            st.chosen = Some(buf[0] != 0);
            tracing::info!(writeback = buf[0] != 0, "guest set the cache mode");
            self.apply_cache_mode(&st);
            // Only a mode the guest set goes in the region: the next
            // daemon takes it as the guest's choice.
            if let Some(r) = sh.region.read().as_deref() {
                r.set_cache_mode(if buf[0] != 0 { CacheMode::WriteBack } else { CacheMode::WriteThrough });
            }
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("config write at {offset}+{} refused", buf.len())))
        }
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        InflightRegion::create(msg.num_queues, msg.queue_size)
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region = InflightRegion::map(msg, &file, self.shared.cfg.num_queues as usize)?;
        tracing::debug!(queues = msg.num_queues, queue_size = msg.queue_size, "inflight tracking region mapped");
        self.keep_cache_mode(&region);
        *self.shared.region.write() = Some(Arc::new(region));
        Ok(())
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

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // One queue per thread (`queues_per_thread`): the thread's index is
        // the queue's, and `vrings` holds just that queue, whose events
        // arrive as local index 0.
        let qidx = thread_id;
        let nq = self.shared.cfg.num_queues as u64;
        if u64::from(device_event) > nq {
            // A throttled queue has room again.
            let q = (u64::from(device_event) - nq - 1) as usize;
            let Some(f) = self.shared.inflight.get(q) else { return Ok(()) };
            let _ = f.resume_consumer.consume();
            return match vrings.first() {
                Some(vring) if q == qidx && serving(vring) => self.process_queue(qidx, vring),
                _ => Ok(()),
            };
        }
        // Spurious calls (e.g. when a vring is enabled) are harmless: an empty
        // queue yields no chains.
        match vrings.get(device_event as usize) {
            Some(vring) => self.process_queue(qidx, vring),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
