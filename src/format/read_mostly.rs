//! A reader-writer lock for state every request reads and few write (the
//! qcow2 tables, the qcow2 I/O gate): crossbeam's `ShardedLock`, where each
//! thread reads through its own cache-padded shard, so queue threads never
//! write one shared cache line to take it; a write takes every shard.
//! Poisoning is ignored, as with parking_lot: a panic in one request must
//! not fail every later one.

use std::sync::{PoisonError, TryLockError};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

/// See the module documentation.
pub struct ReadMostly<T>(ShardedLock<T>);

/// Shared access to a [`ReadMostly`].
pub type ReadGuard<'a, T> = ShardedLockReadGuard<'a, T>;

impl<T> ReadMostly<T> {
    pub fn new(t: T) -> Self {
        Self(ShardedLock::new(t))
    }

    pub fn read(&self) -> ReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// None when a writer holds it.
    pub fn try_read(&self) -> Option<ReadGuard<'_, T>> {
        match self.0.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    pub fn write(&self) -> ShardedLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_share_writers_exclude_and_panics_do_not_poison() {
        let l = std::sync::Arc::new(ReadMostly::new(1u32));
        {
            let _a = l.read();
            let _b = l.read();
            assert!(l.try_read().is_some());
        }
        let w = l.write();
        let l2 = l.clone();
        assert!(std::thread::spawn(move || l2.try_read().is_none()).join().unwrap());
        drop(w);
        let l3 = l.clone();
        let _ = std::thread::spawn(move || {
            let _g = l3.write();
            panic!("poison it");
        })
        .join();
        *l.write() += 1;
        assert_eq!(*l.read(), 2);
    }
}
