//! Single flight: concurrent requests for the same key share one running
//! task instead of each fetching it (a burst of guest reads into one cold
//! chunk makes one remote request). A flight started as speculative work
//! is raised to urgent when a guest request joins it ([`Urgency`]).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::Notify;

use crate::remote::priority::Speculative;

/// A handle on a running flight; clone and await it from any number of
/// callers.
pub type Flight<V> = Shared<BoxFuture<'static, V>>;

/// Whether a guest waits on a flight: speculative work waiting for its
/// turn on the link stops waiting once it is.
#[derive(Debug, Default)]
pub struct Urgency {
    urgent: AtomicBool,
    /// Set once the work is admitted to the link (its request is sent).
    sent: AtomicBool,
    notify: Notify,
}

impl Urgency {
    /// A flight urgent (a guest waits) or not from the start.
    pub fn new(urgent: bool) -> Arc<Self> {
        Arc::new(Self { urgent: AtomicBool::new(urgent), sent: AtomicBool::new(false), notify: Notify::new() })
    }

    /// Notes that the flight's request went on the wire.
    pub fn mark_sent(&self) {
        self.sent.store(true, Ordering::SeqCst);
    }

    /// True when a guest waiting now would be the first to hurry the
    /// flight: it is neither urgent already nor on the wire.
    pub fn idle(&self) -> bool {
        !self.is_urgent() && !self.sent.load(Ordering::SeqCst)
    }

    /// True once a guest waits on the flight.
    pub fn is_urgent(&self) -> bool {
        self.urgent.load(Ordering::SeqCst)
    }

    /// Marks the flight urgent and wakes whoever waits in [`raised`](Self::raised).
    pub fn raise(&self) {
        if !self.urgent.swap(true, Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// The mark of the flight's remote requests: speculative until a guest
    /// waits (so Drive's pacer lets guests' requests go first).
    pub fn mark(self: &Arc<Self>) -> Speculative {
        let me = self.clone();
        Speculative::new(move || me.is_urgent())
    }

    /// Completes once the flight is urgent.
    pub async fn raised(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_urgent() {
                return;
            }
            n.await;
        }
    }
}

/// The flights running now, each with its urgency.
type Running<K, V> = Arc<Mutex<HashMap<K, (Flight<V>, Arc<Urgency>)>>>;

/// Merges concurrent work per key.
pub struct SingleFlight<K, V: Clone> {
    running: Running<K, V>,
}

impl<K, V> Default for SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self { running: Arc::new(Mutex::new(HashMap::new())) }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the flight for `key`, or starts `work` as a task on `rt` when
    /// none is running. The work runs to completion even if every caller
    /// stops waiting — a non-blocking miss starts a fetch and walks away.
    /// `lost` makes the value if the task dies (panic or runtime shutdown).
    pub fn join<F>(&self, rt: &Handle, key: K, work: impl FnOnce() -> F, lost: fn() -> V) -> Flight<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        self.join_as(rt, key, true, |_| work(), lost)
    }

    /// [`join`](Self::join) with a priority: `urgent` when a guest waits.
    /// `work` gets the flight's [`Urgency`], which a later urgent join
    /// raises (a readahead a guest now waits for jumps the queue).
    pub fn join_as<F>(
        &self,
        rt: &Handle,
        key: K,
        urgent: bool,
        work: impl FnOnce(Arc<Urgency>) -> F,
        lost: fn() -> V,
    ) -> Flight<V>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut running = self.running.lock();
        if let Some((f, u)) = running.get(&key) {
            if urgent {
                u.raise();
            }
            return f.clone();
        }
        let urgency = Urgency::new(urgent);
        let fut = work(urgency.clone());
        let map = self.running.clone();
        let k = key.clone();
        let task = rt.spawn(async move {
            // Removed by the task itself, before waiters wake, so a caller
            // arriving later starts afresh (and finds the data cached);
            // removed on drop too, so work that panicked or was cancelled
            // does not leave its `lost` value to every later caller.
            let _done = Remove { map, key: Some(k) };
            fut.await
        });
        let flight: Flight<V> = async move { task.await.unwrap_or_else(|_| lost()) }.boxed().shared();
        running.insert(key, (flight.clone(), urgency));
        flight
    }

    /// The flight for `key`, when one is running.
    pub fn get(&self, key: &K) -> Option<Flight<V>> {
        self.running.lock().get(key).map(|(f, _)| f.clone())
    }

    /// The urgency of the flight for `key`, when one is running.
    pub fn urgency(&self, key: &K) -> Option<Arc<Urgency>> {
        self.running.lock().get(key).map(|(_, u)| u.clone())
    }

    /// True when a flight for `key` is running.
    pub fn contains(&self, key: &K) -> bool {
        self.running.lock().contains_key(key)
    }

    /// Number of flights running.
    pub fn len(&self) -> usize {
        self.running.lock().len()
    }

    /// True when nothing is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Takes a finished (or dead) flight out of the running map.
struct Remove<K: Eq + Hash, V: Clone> {
    map: Running<K, V>,
    key: Option<K>,
}

impl<K: Eq + Hash, V: Clone> Drop for Remove<K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.map.lock().remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn concurrent_joins_run_once() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sf: SingleFlight<u32, u32> = SingleFlight::default();
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let r = runs.clone();
        let a = sf.join(
            rt.handle(),
            1,
            || async move {
                r.fetch_add(1, Ordering::SeqCst);
                let _ = rx.await;
                7
            },
            || 0,
        );
        let b = sf.join(rt.handle(), 1, || async { 99 }, || 0);
        assert_eq!(sf.len(), 1);
        tx.send(()).unwrap();
        assert_eq!(rt.block_on(a), 7);
        assert_eq!(rt.block_on(b), 7);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(sf.is_empty());
    }

    /// A flight whose work panics answers its waiters with `lost`, and
    /// the next caller starts a new flight instead of getting that answer
    /// again for as long as the process runs.
    #[test]
    fn a_panicked_flight_is_not_left_behind() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sf: SingleFlight<u32, u32> = SingleFlight::default();
        let a = sf.join(rt.handle(), 1, || async { panic!("a fetch hit a bug") }, || 0);
        assert_eq!(rt.block_on(a), 0);
        assert!(sf.is_empty(), "the dead flight is still registered");
        let b = sf.join(rt.handle(), 1, || async { 7 }, || 0);
        assert_eq!(rt.block_on(b), 7);
    }

    /// A speculative flight waiting for its turn is woken when a guest
    /// joins it.
    #[test]
    fn an_urgent_join_raises_a_speculative_flight() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sf: SingleFlight<u32, bool> = SingleFlight::default();
        let a = sf.join_as(
            rt.handle(),
            1,
            false,
            |u| async move {
                u.raised().await;
                u.is_urgent()
            },
            || false,
        );
        let b = sf.join_as(rt.handle(), 2, false, |u| async move { u.is_urgent() }, || true);
        assert!(!rt.block_on(b), "nobody raised flight 2");
        let c = sf.join_as(rt.handle(), 1, true, |_| async { false }, || false);
        assert!(rt.block_on(a));
        assert!(rt.block_on(c));
    }
}
