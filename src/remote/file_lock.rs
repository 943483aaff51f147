//! `flock` with a bounded wait: another process stopped while it holds a
//! lock (SIGSTOP, a debugger, a frozen cgroup) costs a waiter a bounded
//! wait and a clear error, never a hang.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

/// Takes a `flock` on `f` (exclusive or shared), trying again with short
/// pauses for at most `wait` (zero: once). `path` names the file in the
/// error, of kind `TimedOut`.
pub fn lock_within(f: &File, exclusive: bool, wait: Duration, path: &Path) -> io::Result<()> {
    let op = if exclusive { FlockOperation::NonBlockingLockExclusive } else { FlockOperation::NonBlockingLockShared };
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_micros(20);
    loop {
        match flock(f, op) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(Errno::WOULDBLOCK) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has held {} locked for over {:.1} s (stopped?)",
                        path.display(),
                        wait.as_secs_f64()
                    ),
                ))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Lets go of a lock taken by [`lock_within`].
pub fn unlock(f: &File) {
    let _ = flock(f, FlockOperation::Unlock);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_elsewhere_is_waited_for_then_given_up() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let (holder, waiter) = (File::create(&p).unwrap(), File::open(&p).unwrap());
        lock_within(&holder, true, Duration::ZERO, &p).unwrap();
        let t = Instant::now();
        let e = lock_within(&waiter, false, Duration::from_millis(300), &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("locked for over 0.3 s"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Released within the wait: taken.
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            unlock(&holder);
        });
        lock_within(&waiter, false, Duration::from_secs(5), &p).unwrap();
        h.join().unwrap();
    }
}
