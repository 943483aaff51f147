//! Concurrency stress: threads read and write their own interleaved 4 KiB
//! blocks while the RAM and SSD tiers are tiny (constant eviction) and
//! readahead runs; every read of a thread's own block must show its latest
//! write, and the final image must match the model — in this store and
//! after a restart.

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::Arc;

use driveblk::format::{IoMode, IoVec};
use driveblk::tier::Storage;
use driveblk::volume::{self, ImportOptions};
use rand::{Rng, SeedableRng};
use support::*;

const THREADS: usize = 4;
const BLOCK: usize = 4096;

#[test]
fn concurrent_reads_and_writes_stay_coherent_under_eviction() {
    let d = tempfile::tempdir().unwrap();
    let (src, bytes) = raw_image(d.path(), "src.raw", 8 << 20, 31);
    let vurl = url(&d.path().join("remote/vol"));
    volume::import(&src, &vurl, &ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }).unwrap();
    let cache = d.path().join("c");
    let mut o = cache_opts(&cache, Default::default());
    o.ram_cache = 2 * CS;
    o.ssd_cache = 5 * CS;
    let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
    let nblocks = bytes.len() / BLOCK;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            let mut model = bytes.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                let mine: Vec<usize> = (0..nblocks).filter(|b| b % THREADS == t).collect();
                for _ in 0..300 {
                    let blk = mine[rng.random_range(0..mine.len())];
                    let off = blk * BLOCK;
                    if rng.random_bool(0.2) {
                        let mut data = vec![0u8; BLOCK];
                        rng.fill(&mut data[..]);
                        let mode = if rng.random_bool(0.5) { IoMode::NonBlocking } else { IoMode::Blocking };
                        let r = s.write_vectored_at(off as u64, &IoVec::from_slice(&mut data), mode);
                        match r {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s
                                .write_vectored_at(off as u64, &IoVec::from_slice(&mut data), IoMode::Blocking)
                                .unwrap(),
                            Err(e) => panic!("{e}"),
                        }
                        model[off..off + BLOCK].copy_from_slice(&data);
                    } else {
                        // Read a span around the block (touching others'
                        // blocks too); check only our own.
                        let start = off.saturating_sub(BLOCK * THREADS);
                        let end = (off + BLOCK * (THREADS + 1)).min(model.len());
                        let mut b = vec![0u8; end - start];
                        let r = s.read_vectored_at(start as u64, &IoVec::from_slice(&mut b), IoMode::NonBlocking);
                        match r {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                s.read_vectored_at(start as u64, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap()
                            }
                            Err(e) => panic!("{e}"),
                        }
                        for x in (start..end).step_by(BLOCK) {
                            if (x / BLOCK) % THREADS == t {
                                assert!(
                                    b[x - start..x - start + BLOCK] == model[x..x + BLOCK],
                                    "thread {t} block {}",
                                    x / BLOCK
                                );
                            }
                        }
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut expect = bytes.clone();
    for blk in 0..nblocks {
        let m = &models[blk % THREADS];
        expect[blk * BLOCK..(blk + 1) * BLOCK].copy_from_slice(&m[blk * BLOCK..(blk + 1) * BLOCK]);
    }
    assert!(read_all(&*s).unwrap() == expect, "final image differs");
    let st = s.stats();
    assert!(st.ssd_evictions > 0, "{st:?}");
    s.flush().unwrap();
    drop(s);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    assert!(read_all(&*s).unwrap() == expect, "after restart");
    let _ = Arc::strong_count(&s);
}
