//! Calls into a directory that may stop answering (an NFS server gone
//! away, a FUSE mount whose driver hangs): each call runs on a thread of
//! its own with a deadline. A call that overruns marks the directory
//! hung, and until every overrun call has returned no call is made at
//! all, so callers take their other way at once and no more threads get
//! stuck there. The directory counts as answering again when the last
//! overrun call returns, whatever it returned.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Deadlines of one directory's calls, and whether it answers.
#[derive(Debug)]
pub struct FsDeadline {
    /// What the directory is, for people ("the shared cache directory /x").
    what: String,
    deadline: Duration,
    hung: AtomicBool,
    /// Times the directory stopped answering.
    hangs: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Calls past their deadline that have not returned.
    overrun: usize,
    since: Option<Instant>,
}

/// Where one call is; the caller and the call's thread race to say.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Running,
    Overran,
    Returned,
}

impl FsDeadline {
    /// Calls into `what` with `deadline` each.
    pub fn new(what: String, deadline: Duration) -> Arc<Self> {
        Arc::new(Self {
            what,
            deadline,
            hung: AtomicBool::new(false),
            hangs: AtomicU64::new(0),
            state: Mutex::default(),
        })
    }

    /// True while a call that overran has not returned.
    pub fn is_hung(&self) -> bool {
        self.hung.load(Ordering::Acquire)
    }

    /// Times the directory stopped answering so far.
    pub fn hangs(&self) -> u64 {
        self.hangs.load(Ordering::Relaxed)
    }

    /// Runs `op` on the blocking pool. None when the directory is hung
    /// (`op` is not run) or `op` overran the deadline (it goes on, and
    /// its result is dropped when it returns).
    pub async fn run<T: Send + 'static>(self: &Arc<Self>, op: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if self.is_hung() {
            return None;
        }
        let (call, body) = self.wrap(op);
        let mut h = tokio::task::spawn_blocking(body);
        match tokio::time::timeout(self.deadline, &mut h).await {
            Ok(r) => r.ok(),
            // Returned just as the deadline passed: its result is there.
            Err(_) if self.late(&call) => h.await.ok(),
            Err(_) => None,
        }
    }

    /// [`run`](Self::run) for a caller that is not async (a start): `op`
    /// runs on a thread of its own.
    pub fn run_blocking<T: Send + 'static>(self: &Arc<Self>, op: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if self.is_hung() {
            return None;
        }
        let (call, body) = self.wrap(op);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("fs-deadline".into())
            .spawn(move || {
                let _ = tx.send(body());
            })
            .ok()?;
        match rx.recv_timeout(self.deadline) {
            Ok(r) => Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if self.late(&call) => rx.recv().ok(),
            // Overran, or `op` panicked.
            Err(_) => None,
        }
    }

    /// `op` with the bookkeeping of its return.
    fn wrap<T>(self: &Arc<Self>, op: impl FnOnce() -> T) -> (Arc<Mutex<Call>>, impl FnOnce() -> T) {
        let call = Arc::new(Mutex::new(Call::Running));
        let (me, c) = (self.clone(), call.clone());
        let body = move || {
            let r = op();
            let mut s = c.lock();
            if *s == Call::Overran {
                me.returned();
            }
            *s = Call::Returned;
            r
        };
        (call, body)
    }

    /// The deadline passed: true if the call returned meanwhile (its
    /// result is there to take), else it is counted as overrun.
    fn late(&self, call: &Mutex<Call>) -> bool {
        let mut s = call.lock();
        if *s == Call::Returned {
            return true;
        }
        *s = Call::Overran;
        let mut st = self.state.lock();
        st.overrun += 1;
        if !self.hung.swap(true, Ordering::AcqRel) {
            st.since = Some(Instant::now());
            self.hangs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "{} has not answered in {} s (a network or FUSE mount that hangs?): going on without it until it \
                 answers again",
                self.what,
                self.deadline.as_secs_f64()
            );
        }
        false
    }

    /// An overrun call returned.
    fn returned(&self) {
        let mut st = self.state.lock();
        st.overrun = st.overrun.saturating_sub(1);
        if st.overrun == 0 && self.hung.swap(false, Ordering::AcqRel) {
            let after = st.since.take().map_or(0.0, |t| t.elapsed().as_secs_f64());
            tracing::info!("{} answers again, after {after:.0} s", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO opened for reading blocks until a writer comes: a real call
    /// that hangs, and returns when let go.
    fn fifo(dir: &std::path::Path) -> std::path::PathBuf {
        let p = dir.join("fifo");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_hangs_stops_all_calls_until_it_returns() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let f = FsDeadline::new("the test's directory".into(), Duration::from_millis(200));
        assert_eq!(f.run(|| 7).await, Some(7));
        let q = p.clone();
        let t0 = Instant::now();
        assert!(f.run(move || std::fs::read(&q).map(|v| v.len()).ok()).await.is_none());
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(f.is_hung() && f.hangs() == 1);
        // Nothing runs while it hangs, not even a call that would answer.
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        assert!(f.run(move || r.store(true, Ordering::SeqCst)).await.is_none());
        assert!(f.run_blocking(|| 1).is_none());
        assert!(!ran.load(Ordering::SeqCst), "a call was made into a hung directory");
        // The stuck call returns: the directory answers again.
        std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let t0 = Instant::now();
        while f.is_hung() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the returned call did not clear the hang");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(f.run(|| 8).await, Some(8));
        assert_eq!(f.run_blocking(|| 9), Some(9));
        assert_eq!(f.hangs(), 1);
    }

    #[test]
    fn a_start_waits_no_longer_than_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let p = fifo(d.path());
        let f = FsDeadline::new("the test's directory".into(), Duration::from_millis(200));
        let q = p.clone();
        let t0 = Instant::now();
        assert!(f.run_blocking(move || std::fs::read(&q).is_ok()).is_none());
        assert!(t0.elapsed() < Duration::from_secs(5) && f.is_hung());
        std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let t0 = Instant::now();
        while f.is_hung() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the returned call did not clear the hang");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
