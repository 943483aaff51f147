//! The I/O pool: threads that run requests which may block (cache misses,
//! remote fetches, cluster allocation, flushes), so the queue workers never do.

use crossbeam_channel::{unbounded, Sender};
use parking_lot::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of worker threads fed by a channel.
pub struct IoPool {
    sender: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = unbounded::<Job>();
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

    /// Runs `job` on a worker; after shutdown, runs it on the caller's thread
    /// so an accepted request is never dropped.
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
