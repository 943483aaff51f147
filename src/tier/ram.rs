//! RAM tier: sharded whole chunks with a byte cap, evicted by CLOCK (a
//! referenced bit per chunk, a second chance before eviction), plus pinned
//! chunks (qcow2 metadata) that are never evicted. A hit takes one shard's
//! read lock and sets a bit: no global lock, no reordering, no allocation.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use parking_lot::RwLock;

/// One chunk's bytes, shared between the cache, in-flight fetches and
/// readers. Writes patch it in place (under the chunk's stripe lock), so a
/// cached copy never goes stale.
pub type ChunkBuf = Arc<RwLock<Vec<u8>>>;

const SHARDS: usize = 64;

struct Entry {
    buf: ChunkBuf,
    /// Set by every hit; CLOCK clears it once before evicting the chunk.
    referenced: AtomicBool,
    pinned: bool,
}

#[derive(Default)]
struct Shard {
    /// A fast (randomly seeded) hasher: every hit hashes its chunk index.
    map: HashMap<u64, Entry, foldhash::fast::RandomState>,
    /// Unpinned chunks in the map.
    cached: usize,
    /// The CLOCK ring of unpinned chunks. May hold indexes no longer cached
    /// (removed, pinned): the sweep drops them as it passes.
    ring: VecDeque<u64>,
}

impl Shard {
    /// Evicts by CLOCK until at most `cap` unpinned chunks remain.
    fn sweep(&mut self, cap: usize) {
        while self.cached > cap {
            let Some(idx) = self.ring.pop_front() else { break };
            match self.map.get(&idx) {
                Some(e) if !e.pinned => {
                    if e.referenced.swap(false, Ordering::Relaxed) {
                        self.ring.push_back(idx);
                    } else {
                        self.map.remove(&idx);
                        self.cached -= 1;
                    }
                }
                _ => {}
            }
        }
        // Stale ring entries (removed or pinned chunks, and second entries
        // of chunks removed and cached again) are bounded.
        if self.ring.len() > 2 * self.cached + 16 {
            let map = &self.map;
            let mut seen = std::collections::HashSet::new();
            self.ring.retain(|i| map.get(i).is_some_and(|e| !e.pinned) && seen.insert(*i));
        }
    }

    fn remove_unpinned(&mut self, idx: u64) -> bool {
        if self.map.get(&idx).is_some_and(|e| !e.pinned) {
            self.map.remove(&idx);
            self.cached -= 1;
            return true;
        }
        false
    }
}

/// What caching a chunk would do (see [`RamCache::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Its shard has room.
    Room,
    /// It would evict a chunk not read since the clock last passed.
    Replaces,
    /// It would be evicted at once (or it is pinned, or caching is off).
    Refused,
}

/// The RAM tier.
pub struct RamCache {
    shards: Box<[CachePadded<RwLock<Shard>>]>,
    /// Unpinned entries per shard; 0 disables caching (pins still work).
    shard_cap: usize,
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
            shards: (0..SHARDS).map(|_| CachePadded::new(RwLock::new(Shard::default()))).collect(),
            shard_cap,
            chunk_size,
        }
    }

    fn shard(&self, idx: u64) -> &RwLock<Shard> {
        &self.shards[(idx as usize) % SHARDS]
    }

    fn hit(e: &Entry) -> ChunkBuf {
        // Only write the bit when it changes: a hot chunk's line stays shared.
        if !e.pinned && !e.referenced.load(Ordering::Relaxed) {
            e.referenced.store(true, Ordering::Relaxed);
        }
        e.buf.clone()
    }

    /// The chunk if resident (pinned or cached), marking it recently used.
    pub fn get(&self, idx: u64) -> Option<ChunkBuf> {
        self.shard(idx).read().map.get(&idx).map(Self::hit)
    }

    /// Runs `f` on the chunk's bytes if it is resident, marking it
    /// recently used, without waiting for any lock (`Err(())` when the
    /// shard or the chunk is held exclusively) and without touching the
    /// chunk's reference count: the hit path's one read of the chunk.
    #[allow(clippy::result_unit_err)]
    pub fn try_read_with<R>(&self, idx: u64, f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>, ()> {
        let shard = self.shard(idx).try_read().ok_or(())?;
        let Some(e) = shard.map.get(&idx) else { return Ok(None) };
        if !e.pinned && !e.referenced.load(Ordering::Relaxed) {
            e.referenced.store(true, Ordering::Relaxed);
        }
        let data = e.buf.try_read().ok_or(())?;
        Ok(Some(f(&data)))
    }

    /// Whether caching `idx` now would keep it. A new chunk starts
    /// unreferenced, so in a full shard whose chunks were all read since
    /// the clock last passed, the insert's sweep would evict the new chunk
    /// itself. In that case the clock passes now instead (their reference
    /// bits are cleared), and a chunk left unread until the next try makes
    /// room then.
    pub fn admit(&self, idx: u64) -> Admit {
        if self.shard_cap == 0 {
            return Admit::Refused;
        }
        let mut s = self.shard(idx).write();
        if s.map.get(&idx).is_some_and(|e| e.pinned) {
            return Admit::Refused;
        }
        if s.cached < self.shard_cap {
            return Admit::Room;
        }
        if s.map.values().any(|e| !e.pinned && !e.referenced.load(Ordering::Relaxed)) {
            return Admit::Replaces;
        }
        for e in s.map.values_mut().filter(|e| !e.pinned) {
            *e.referenced.get_mut() = false;
        }
        Admit::Refused
    }

    /// Caches a chunk (replacing an unpinned copy), evicting by CLOCK
    /// beyond the cap. A pinned chunk stays as it is.
    pub fn insert(&self, idx: u64, buf: ChunkBuf) {
        if self.shard_cap == 0 {
            return;
        }
        let mut s = self.shard(idx).write();
        match s.map.get_mut(&idx) {
            Some(e) if e.pinned => return,
            Some(e) => e.buf = buf,
            None => {
                // New chunks start unreferenced: one read of a chunk does not
                // make it outlive chunks read again and again.
                s.map.insert(idx, Entry { buf, referenced: AtomicBool::new(false), pinned: false });
                s.cached += 1;
                s.ring.push_back(idx);
            }
        }
        let cap = self.shard_cap;
        s.sweep(cap);
    }

    /// Keeps a chunk resident for good (out of the cap and of eviction).
    pub fn pin(&self, idx: u64, buf: ChunkBuf) {
        let mut s = self.shard(idx).write();
        s.remove_unpinned(idx);
        s.map.insert(idx, Entry { buf, referenced: AtomicBool::new(false), pinned: true });
    }

    /// True if `idx` is pinned.
    pub fn is_pinned(&self, idx: u64) -> bool {
        self.shard(idx).read().map.get(&idx).is_some_and(|e| e.pinned)
    }

    /// Drops an unpinned chunk.
    pub fn remove(&self, idx: u64) {
        self.shard(idx).write().remove_unpinned(idx);
    }

    /// Drops every unpinned chunk; returns the bytes freed.
    pub fn clear(&self) -> u64 {
        let mut n = 0usize;
        for s in self.shards.iter() {
            let mut s = s.write();
            s.map.retain(|_, e| e.pinned);
            n += std::mem::take(&mut s.cached);
            s.ring.clear();
        }
        n as u64 * self.chunk_size
    }

    /// Number of pinned chunks.
    pub fn pinned_count(&self) -> u64 {
        self.shards.iter().map(|s| s.read().map.values().filter(|e| e.pinned).count() as u64).sum()
    }

    /// Bytes held (cached plus pinned).
    pub fn bytes(&self) -> u64 {
        let n: usize = self.shards.iter().map(|s| s.read().map.len()).sum();
        n as u64 * self.chunk_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(v: u8) -> ChunkBuf {
        Arc::new(RwLock::new(vec![v; 4]))
    }

    const S: u64 = SHARDS as u64;

    #[test]
    fn clock_cap_and_pins() {
        let r = RamCache::new(S * 2 * 4, 4); // two entries per shard
        for i in 0..3u64 {
            r.insert(i * S, buf(i as u8)); // all in shard 0
        }
        assert!(r.get(0).is_none(), "oldest unreferenced evicted");
        assert!(r.get(S).is_some() && r.get(2 * S).is_some());
        r.pin(3 * S, buf(9));
        for i in 4..10u64 {
            r.insert(i * S, buf(0));
        }
        assert_eq!(r.get(3 * S).unwrap().read()[0], 9);
        assert!(r.is_pinned(3 * S));
        assert_eq!(r.pinned_count(), 1);
        assert_eq!(r.bytes(), 3 * 4, "two cached and one pinned");
        let off = RamCache::new(0, 4);
        off.insert(1, buf(1));
        assert!(off.get(1).is_none());
        off.pin(1, buf(1));
        assert!(off.get(1).is_some(), "pins work with caching off");
    }

    /// A chunk read since it was cached gets a second chance: the sweep
    /// evicts the unreferenced one after it instead.
    #[test]
    fn referenced_chunks_survive_a_sweep() {
        let r = RamCache::new(S * 2 * 4, 4);
        r.insert(0, buf(0));
        r.insert(S, buf(1));
        assert!(r.get(0).is_some());
        r.insert(2 * S, buf(2));
        assert!(r.get(0).is_some(), "referenced: kept");
        assert!(r.get(S).is_none(), "unreferenced: evicted");
        // Removed and re-inserted chunks do not grow the ring without bound.
        for _ in 0..1000 {
            r.remove(3 * S);
            r.insert(3 * S, buf(3));
        }
        assert!(r.shard(0).read().ring.len() <= 2 * 2 + 17);
        assert_eq!(r.clear(), 2 * 4);
        assert_eq!(r.bytes(), 0);
    }

    /// A full shard whose chunks were all read since the clock passed
    /// refuses a new chunk (the insert would evict it at once) and lets the
    /// clock pass; a chunk left unread until the next try is replaced.
    #[test]
    fn admit_refuses_what_the_sweep_would_drop_and_ages_the_shard() {
        let r = RamCache::new(S * 4, 4); // one entry per shard
        assert_eq!(r.admit(0), Admit::Room);
        r.insert(0, buf(0));
        assert_eq!(r.admit(S), Admit::Replaces, "chunk 0 was never read");
        assert!(r.get(0).is_some());
        assert_eq!(r.admit(S), Admit::Refused, "chunk 0 was read since it came in");
        // The refusal passed the clock: unread since, chunk 0 gives way.
        assert_eq!(r.admit(S), Admit::Replaces);
        r.insert(S, buf(1));
        assert!(r.get(S).is_some() && r.get(0).is_none(), "the admitted chunk stayed");
        // Read again between tries: refused each time.
        for _ in 0..3 {
            assert_eq!(r.admit(2 * S), Admit::Refused);
            assert!(r.get(S).is_some());
        }
        // What the refusal predicts: inserted anyway, the new chunk is the one dropped.
        r.get(S);
        r.insert(2 * S, buf(2));
        assert!(r.get(2 * S).is_none() && r.get(S).is_some());
        r.pin(3 * S, buf(3));
        assert_eq!(r.admit(3 * S), Admit::Refused, "pinned");
        assert_eq!(RamCache::new(0, 4).admit(0), Admit::Refused, "caching off");
    }

    /// The hit path's read: copies under the shard lock, counts as a use,
    /// and never waits for a lock another thread holds exclusively.
    #[test]
    fn try_read_with_reads_marks_and_never_waits() {
        let r = RamCache::new(S * 2 * 4, 4);
        r.insert(0, buf(7));
        assert_eq!(r.try_read_with(0, |d| d[0]), Ok(Some(7)));
        assert_eq!(r.try_read_with(S, |d| d[0]), Ok(None));
        // Read once through try_read_with: referenced, so it survives a sweep.
        r.insert(S, buf(1));
        r.insert(2 * S, buf(2));
        assert!(r.get(0).is_some() && r.get(S).is_none());
        {
            let _shard = r.shard(0).write();
            assert_eq!(r.try_read_with(0, |d| d[0]), Err(()));
        }
        {
            let chunk = r.get(0).unwrap();
            let _w = chunk.write();
            assert_eq!(r.try_read_with(0, |d| d[0]), Err(()));
        }
    }
}
