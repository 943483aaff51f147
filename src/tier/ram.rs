//! RAM tier: a sharded LRU of whole chunks with a byte cap, plus a pinned
//! set (qcow2 metadata) that is never evicted. Shards keep queue threads
//! from contending on one lock.

use std::collections::HashMap;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

/// One chunk's bytes, shared between the cache, in-flight fetches and
/// readers. Writes patch it in place (under the chunk's stripe lock), so a
/// cached copy never goes stale.
pub type ChunkBuf = Arc<RwLock<Vec<u8>>>;

const SHARDS: usize = 16;

/// The RAM tier.
pub struct RamCache {
    shards: Vec<Mutex<LruCache<u64, ChunkBuf>>>,
    /// Entries per shard; 0 disables the LRU (pins still work).
    shard_cap: usize,
    pinned: RwLock<HashMap<u64, ChunkBuf>>,
    chunk_size: u64,
}

impl RamCache {
    /// A cache holding at most `cap_bytes` of unpinned chunks.
    pub fn new(cap_bytes: u64, chunk_size: u64) -> Self {
        let chunks = (cap_bytes / chunk_size) as usize;
        // Round up per shard so a small cap still caches something, at the
        // cost of overshooting it by less than one chunk per shard.
        let shard_cap = chunks.div_ceil(SHARDS);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(LruCache::unbounded())).collect(),
            shard_cap,
            pinned: RwLock::new(HashMap::new()),
            chunk_size,
        }
    }

    fn shard(&self, idx: u64) -> &Mutex<LruCache<u64, ChunkBuf>> {
        &self.shards[(idx as usize) % SHARDS]
    }

    /// The chunk if resident (pinned or cached), marking it recently used.
    pub fn get(&self, idx: u64) -> Option<ChunkBuf> {
        if let Some(b) = self.pinned.read().get(&idx) {
            return Some(b.clone());
        }
        if self.shard_cap == 0 {
            return None;
        }
        self.shard(idx).lock().get(&idx).cloned()
    }

    /// [`get`](Self::get) without waiting: `Err(())` when another thread
    /// holds the shard (the non-blocking fast path then says WouldBlock
    /// instead of waiting on the queue's thread).
    #[allow(clippy::result_unit_err)]
    pub fn try_get(&self, idx: u64) -> Result<Option<ChunkBuf>, ()> {
        if let Some(b) = self.pinned.try_read().ok_or(())?.get(&idx) {
            return Ok(Some(b.clone()));
        }
        if self.shard_cap == 0 {
            return Ok(None);
        }
        let mut shard = self.shard(idx).try_lock().ok_or(())?;
        Ok(shard.get(&idx).cloned())
    }

    /// Caches a chunk, evicting the least recently used beyond the cap.
    pub fn insert(&self, idx: u64, buf: ChunkBuf) {
        if self.shard_cap == 0 || self.pinned.read().contains_key(&idx) {
            return;
        }
        let mut s = self.shard(idx).lock();
        s.put(idx, buf);
        while s.len() > self.shard_cap {
            s.pop_lru();
        }
    }

    /// Keeps a chunk resident for good (moving it out of the LRU).
    pub fn pin(&self, idx: u64, buf: ChunkBuf) {
        self.shard(idx).lock().pop(&idx);
        self.pinned.write().insert(idx, buf);
    }

    /// True if `idx` is pinned.
    pub fn is_pinned(&self, idx: u64) -> bool {
        self.pinned.read().contains_key(&idx)
    }

    /// Drops an unpinned chunk.
    pub fn remove(&self, idx: u64) {
        self.shard(idx).lock().pop(&idx);
    }

    /// Drops every unpinned chunk; returns the bytes freed.
    pub fn clear(&self) -> u64 {
        let n: usize = self.shards.iter().map(|s| std::mem::replace(&mut *s.lock(), LruCache::unbounded()).len()).sum();
        n as u64 * self.chunk_size
    }

    /// Number of pinned chunks.
    pub fn pinned_count(&self) -> u64 {
        self.pinned.read().len() as u64
    }

    /// Bytes held (cached plus pinned).
    pub fn bytes(&self) -> u64 {
        let cached: usize = self.shards.iter().map(|s| s.lock().len()).sum();
        (cached as u64 + self.pinned_count()) * self.chunk_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(v: u8) -> ChunkBuf {
        Arc::new(RwLock::new(vec![v; 4]))
    }

    #[test]
    fn lru_cap_and_pins() {
        let r = RamCache::new(16 * 2 * 4, 4); // two entries per shard
        for i in 0..3u64 {
            r.insert(i * 16, buf(i as u8)); // all in shard 0
        }
        assert!(r.get(0).is_none(), "oldest evicted");
        assert!(r.get(16).is_some() && r.get(32).is_some());
        r.pin(48, buf(9));
        for i in 4..10u64 {
            r.insert(i * 16, buf(0));
        }
        assert_eq!(r.get(48).unwrap().read()[0], 9);
        assert!(r.is_pinned(48));
        let off = RamCache::new(0, 4);
        off.insert(1, buf(1));
        assert!(off.get(1).is_none());
    }
}
