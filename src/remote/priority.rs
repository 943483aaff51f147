//! Which remote requests nobody waits for: a task-local mark, set by the
//! tier around its speculative fetches and its background uploads, that
//! the layers queueing requests (Drive's pacer, read merging) read to serve
//! a guest's requests first. A request without the mark is served first:
//! misses, metadata, uploads something waits for.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static SPECULATIVE: Option<Speculative>;
}

/// The mark of a speculative request: it stays speculative until `raised`
/// says a guest now waits for it too. A deferred one also waits for the
/// other speculative work (a boot profile's upload behind the guest's
/// changes going up).
#[derive(Clone)]
pub struct Speculative {
    raised: Arc<dyn Fn() -> bool + Send + Sync>,
    deferred: bool,
}

impl std::fmt::Debug for Speculative {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speculative").field("raised", &(self.raised)()).field("deferred", &self.deferred).finish()
    }
}

impl Speculative {
    /// A mark that stays until `raised` answers true.
    pub fn new(raised: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self { raised: Arc::new(raised), deferred: false }
    }

    /// The mark of work that also waits for the other speculative work.
    pub fn deferred(self) -> Self {
        Self { deferred: true, ..self }
    }

    /// Whether the work waits for the other speculative work too.
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// True while no guest waits for the request.
    pub fn holds(&self) -> bool {
        !(self.raised)()
    }

    /// The mark of a request made for several callers (a merged read): it
    /// holds only while it holds for every one of them.
    pub fn all(marks: Vec<Option<Speculative>>) -> Option<Speculative> {
        let marks: Vec<Speculative> = marks.into_iter().collect::<Option<_>>()?;
        let deferred = marks.iter().all(Speculative::is_deferred);
        Some(Self { deferred, ..Self::new(move || marks.iter().any(|m| !m.holds())) })
    }
}

/// Runs `f` with every remote request it makes (in this task) marked
/// speculative by `mark`.
pub async fn speculative<F: Future>(mark: Speculative, f: F) -> F::Output {
    SPECULATIVE.scope(Some(mark), f).await
}

/// Runs `f` with `mark` (none: not speculative, whatever the running task
/// is), as a layer that makes a request for another task's read passes
/// that task's mark on.
pub async fn with<F: Future>(mark: Option<Speculative>, f: F) -> F::Output {
    SPECULATIVE.scope(mark, f).await
}

/// The mark of the running task's requests, if it has one.
pub fn current() -> Option<Speculative> {
    SPECULATIVE.try_with(|m| m.clone()).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn the_mark_holds_in_its_scope_until_raised() {
        assert!(current().is_none());
        let guest = Arc::new(AtomicBool::new(false));
        let g = guest.clone();
        speculative(Speculative::new(move || g.load(Ordering::SeqCst)), async {
            assert!(current().expect("marked").holds());
            guest.store(true, Ordering::SeqCst);
            assert!(!current().expect("marked").holds());
        })
        .await;
        assert!(current().is_none());
        // A request made for a task without the mark, inside one with it.
        speculative(Speculative::new(|| false), async {
            with(None, async { assert!(current().is_none()) }).await;
            assert!(current().is_some());
        })
        .await;
    }

    #[test]
    fn a_request_for_several_is_speculative_only_if_speculative_for_all() {
        let spec = || Some(Speculative::new(|| false));
        assert!(Speculative::all(vec![spec(), spec()]).expect("all marked").holds());
        assert!(Speculative::all(vec![spec(), None]).is_none());
        let raised = Some(Speculative::new(|| true));
        assert!(!Speculative::all(vec![spec(), raised]).expect("all marked").holds());
        // Deferred only if deferred for all.
        let deferred = || Some(Speculative::new(|| false).deferred());
        assert!(Speculative::all(vec![deferred(), deferred()]).expect("all marked").is_deferred());
        assert!(!Speculative::all(vec![deferred(), spec()]).expect("all marked").is_deferred());
    }
}
