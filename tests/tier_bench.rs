//! Rough numbers for the tiered store (ignored by default; run with
//! `cargo test --release --test tier_bench -- --ignored --nocapture`):
//! import rate, cold reads through a simulated 200 Mbit/s / 20 ms link,
//! warm (SSD) and hot (RAM) read rates.

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{RemoteMetrics, Shaping};
use driveblk::tier::Storage;
use driveblk::volume::{self, ImportOptions};
use rand::{Rng, SeedableRng};
use support::*;

fn seq_read(s: &dyn Storage, io: usize) -> Duration {
    let len = s.len() as usize;
    let mut b = vec![0u8; io];
    let t0 = Instant::now();
    let mut pos = 0;
    while pos < len {
        let n = io.min(len - pos);
        s.read_vectored_at(pos as u64, &IoVec::from_slice(&mut b[..n]), IoMode::Blocking).unwrap();
        pos += n;
    }
    t0.elapsed()
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

#[test]
#[ignore]
fn bench_tiers() {
    let d = tempfile::tempdir().unwrap();
    let len = 256 << 20;
    let (src, _) = raw_image(d.path(), "src.raw", len, 41);
    let vurl = url(&d.path().join("remote/vol"));
    let t0 = Instant::now();
    let info = volume::import(&src, &vurl, &ImportOptions::default()).unwrap();
    let el = t0.elapsed();
    println!(
        "import: {:.0} MB/s ({} packed chunks, {} zero, {:.0}% of packed bytes after zstd)",
        mbps(len, el),
        info.chunks_packed,
        info.chunks_zero,
        100.0 * info.packed_bytes as f64 / (info.chunks_packed * info.chunk_size) as f64
    );
    let link = Shaping { latency: Duration::from_millis(20), bandwidth_bps: Some(200_000_000) };
    let m = Arc::new(RemoteMetrics::default());
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, link.clone()));
    o.ram_cache = 64 << 20;
    {
        let s = driveblk::tier::open_volume(&vurl, o.clone()).unwrap();
        let el = seq_read(&*s, 128 << 10);
        let st = s.stats();
        println!(
            "cold sequential (200 Mbit/s, 20 ms): {:.1} MB/s of image, {:.1} MB/s on the wire; readahead {} chunks",
            mbps(len, el),
            mbps(st.remote_bytes as usize, el),
            st.readahead_chunks
        );
    }
    {
        let mut o2 = cache_opts(&d.path().join("c2"), counted(m.clone(), None, link));
        o2.readahead_chunks = 0;
        let s = driveblk::tier::open_volume(&vurl, o2).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut b = vec![0u8; 4096];
        let n = 100;
        let t0 = Instant::now();
        for _ in 0..n {
            let off = rng.random_range(0..(len as u64 / 4096)) * 4096;
            s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        }
        println!("cold random 4 KiB: {:.1} ms per read", t0.elapsed().as_secs_f64() * 1e3 / n as f64);
    }
    let mut warm = o.clone();
    warm.ram_cache = 0;
    let s = driveblk::tier::open_volume(&vurl, warm).unwrap();
    println!("warm (SSD) sequential 128 KiB: {:.0} MB/s", mbps(len, seq_read(&*s, 128 << 10)));
    drop(s);
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    let part = 48 << 20;
    let mut b = vec![0u8; part];
    s.read_vectored_at(0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    let t0 = Instant::now();
    let mut x = vec![0u8; 64 << 10];
    // A non-blocking read may say "would block" (a lock held by a background
    // task, a page not in the page cache): the daemon then reads blocking,
    // and so does this.
    let (mut reads, mut blocked) = (0, 0);
    for _ in 0..4 {
        for off in (0..part).step_by(64 << 10) {
            let buf = IoVec::from_slice(&mut x);
            reads += 1;
            match s.read_vectored_at(off as u64, &buf, IoMode::NonBlocking) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    s.read_vectored_at(off as u64, &buf, IoMode::Blocking).unwrap();
                }
                r => r.unwrap(),
            }
        }
    }
    println!(
        "hot (RAM) non-blocking 64 KiB: {:.0} MB/s ({blocked} of {reads} reads would have blocked)",
        mbps(4 * part, t0.elapsed())
    );
}
