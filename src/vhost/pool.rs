//! The I/O pool: threads that run requests which may block (cache misses,
//! remote fetches, cluster allocation, flushes), so the queue workers never do.

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of worker threads fed by a bounded channel.
pub struct IoPool {
    sender: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Starts `threads` workers (at least one) with room for `queued` jobs
    /// waiting (at least one). The queue workers' in-flight caps keep the
    /// jobs submitted below `num_queues * queue_size`; size it to that and a
    /// submit never waits. Past it, `submit` waits for room (backpressure on
    /// the queue worker) rather than growing memory or dropping a request.
    pub fn new(threads: usize, queued: usize) -> std::io::Result<Self> {
        let (tx, rx) = bounded::<Job>(queued.max(1));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(std::thread::Builder::new().name(format!("driveblk-io{i}")).spawn(move || {
                for job in rx {
                    job();
                }
            })?);
        }
        Ok(Self { sender: Mutex::new(Some(tx)), threads: Mutex::new(handles) })
    }

    /// Runs `job` on a worker, waiting for room in the queue if it is full;
    /// after shutdown, runs it on the caller's thread so an accepted request
    /// is never dropped.
    pub fn submit(&self, job: Job) {
        let sender = self.sender.lock().clone();
        match sender {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    (e.into_inner())();
                }
            }
            None => job(),
        }
    }

    /// Lets queued jobs finish, then joins the workers.
    pub fn shutdown(&self) {
        self.sender.lock().take();
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Barrier};
    use std::time::Duration;

    #[test]
    fn a_full_pool_queue_makes_submit_wait_instead_of_growing() {
        let pool = Arc::new(IoPool::new(1, 2).unwrap());
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let started = Arc::new(Barrier::new(2));
        let ran = Arc::new(AtomicUsize::new(0));
        // One job holds the only thread; two more fill the queue.
        let (g, s) = (gate.clone(), started.clone());
        pool.submit(Box::new(move || {
            s.wait();
            let _ = g.lock().recv();
        }));
        started.wait();
        for _ in 0..2 {
            let r = ran.clone();
            pool.submit(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // The next submit must wait for room, not queue a fourth job.
        let (done_tx, done_rx) = mpsc::channel();
        let (p, r) = (pool.clone(), ran.clone());
        let submitter = std::thread::spawn(move || {
            p.submit(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }));
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "submit returned with the queue full: the pool's queue is unbounded"
        );
        release.send(()).unwrap();
        done_rx.recv_timeout(Duration::from_secs(10)).expect("submit never got room");
        submitter.join().unwrap();
        pool.shutdown();
        assert_eq!(ran.load(Ordering::SeqCst), 3, "every submitted job ran");
    }
}
