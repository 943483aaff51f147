//! Single flight: concurrent requests for the same key share one running
//! task instead of each fetching it (a burst of guest reads into one cold
//! chunk makes one remote request).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::runtime::Handle;

/// A handle on a running flight; clone and await it from any number of
/// callers.
pub type Flight<V> = Shared<BoxFuture<'static, V>>;

/// Merges concurrent work per key.
pub struct SingleFlight<K, V: Clone> {
    running: Arc<Mutex<HashMap<K, Flight<V>>>>,
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
        let mut running = self.running.lock();
        if let Some(f) = running.get(&key) {
            return f.clone();
        }
        let fut = work();
        let map = self.running.clone();
        let k = key.clone();
        let task = rt.spawn(async move {
            let v = fut.await;
            // Removed by the task itself, before waiters wake, so a caller
            // arriving later starts afresh (and finds the data cached).
            map.lock().remove(&k);
            v
        });
        let flight: Flight<V> = async move { task.await.unwrap_or_else(|_| lost()) }.boxed().shared();
        running.insert(key, flight.clone());
        flight
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
}
