//! Fuzz target: the SSD cache's state file and journal, as `SsdCache::open`
//! reads them from a cache directory. The target seals what the fuzzer
//! writes (the state file's sha256, each journal record's frame and sum) so
//! it reaches the parsing and the bounds checks behind them; whatever opens
//! is then queried chunk by chunk, persisted, and opened again, which must
//! give back the same map.
//!
//! Input: `[mode][state body len: u16 le][state body][record len: u16 le][record payload]...`
//! mode bit 0: leave the state file unsealed; bit 1: leave the records
//! unsealed; bit 2: open to inspect instead of to serve.
#![no_main]

use driveblk::tier::ssd::{CacheIdentity, OpenMode, SsdCache};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const VOLUME_ID: &str = "0123456789abcdef0123456789abcdef";

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_at_checked(2)?;
    let n = u16::from_le_bytes([len[0], len[1]]) as usize;
    let (chunk, rest) = rest.split_at_checked(n.min(rest.len()))?;
    *data = rest;
    Some(chunk)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let Some(body) = take(&mut rest) else { return };
    // The identity the caller expects is the one the header names (when
    // it is sane), so a well-formed state is reused rather than discarded.
    let header: serde_json::Value = body
        .split(|&c| c == b'\n')
        .next()
        .and_then(|l| serde_json::from_slice(l).ok())
        .unwrap_or(serde_json::Value::Null);
    let chunk_size = header["chunk_size"]
        .as_u64()
        .filter(|c| c.is_power_of_two() && (4096..=(64 << 20)).contains(c))
        .unwrap_or(1 << 20);
    let volume_id = header["volume_id"].as_str().unwrap_or(VOLUME_ID).to_string();
    let checkpoint = header["checkpoint"].as_u64().unwrap_or(0);
    let image_len = header["image_len"].as_u64().unwrap_or(16 << 20).min(1 << 36);

    // Memory-backed when there is a /dev/shm: the target writes files per run.
    let dir = tempfile::Builder::new()
        .prefix("fuzz-cache")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::Builder::new().prefix("fuzz-cache").tempdir())
        .expect("tempdir");
    let mut state = body.to_vec();
    if mode & 1 == 0 {
        let sum = Sha256::digest(&state);
        state.extend_from_slice(&sum);
    }
    std::fs::write(dir.path().join("state"), &state).expect("write state");
    let mut journal = Vec::new();
    while let Some(payload) = take(&mut rest) {
        let start = journal.len();
        if mode & 2 == 0 {
            journal.extend_from_slice(b"DBJ1");
            journal.extend_from_slice(&checkpoint.to_le_bytes());
            journal.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        }
        journal.extend_from_slice(payload);
        if mode & 2 == 0 {
            let sum = Sha256::digest(&journal[start..]);
            journal.extend_from_slice(&sum);
        }
    }
    std::fs::write(dir.path().join("journal"), &journal).expect("write journal");

    let id = || CacheIdentity { volume_id: volume_id.clone(), chunk_size };
    let open_mode = if mode & 4 == 0 { OpenMode::Serve } else { OpenMode::Inspect };
    let Ok(Some((cache, _))) = SsdCache::open(dir.path(), id(), 1, image_len, 1 << 30, open_mode) else { return };
    let chunks = cache.chunk_count();
    let probe = chunks.min(64);
    let mut states = Vec::new();
    for idx in 0..probe {
        states.push(cache.state(idx));
        let _ = cache.has_chunk(idx);
        let _ = cache.has_pages(idx, 0, chunk_size);
        let _ = cache.has_pages(idx, 4096, 8192);
        let _ = cache.dirty_pages(idx);
        let _ = cache.present_pages(idx);
    }
    let _ = (cache.cached_chunks(), cache.partial_chunks(), cache.dirty_chunks(), cache.dirty_set());
    if open_mode == OpenMode::Inspect {
        return;
    }
    // What opened is written back whole and must read the same.
    cache.checkpoint().expect("checkpoint of an opened cache");
    drop(cache);
    let (again, _) = SsdCache::open(dir.path(), id(), 1, image_len, 1 << 30, OpenMode::Serve)
        .expect("reopen after checkpoint")
        .expect("a checkpointed cache opens");
    assert_eq!(again.chunk_count(), chunks, "chunk count changed across a checkpoint");
    for (idx, s) in states.iter().enumerate() {
        assert_eq!(again.state(idx as u64), *s, "chunk {idx} changed state across a checkpoint");
    }
});
