//! Unit tests of the SSD tier: state file, journal, pages, eviction.

use std::fs::OpenOptions;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::state_file::{read_state_with, Unusable, PAGES_KEPT_VERSION, PLAIN_VERSION, SEALED_VERSION, STATE_VERSION};
use super::*;

/// Identity of test volume `n`.
fn id(n: u64) -> CacheIdentity {
    CacheIdentity { volume_id: format!("{n:032x}"), chunk_size: 4096 }
}

#[test]
fn install_evict_dirty_and_reopen() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("c");
    let (c, o) = SsdCache::open(&dir, id(1), 1, 10 * 4096, 4 * 4096, OpenMode::Serve).unwrap().unwrap();
    assert_eq!(o, Opened::Fresh);
    // A second opener is refused while the first holds the lock.
    assert!(SsdCache::open(&dir, id(1), 1, 10 * 4096, 4 * 4096, OpenMode::Serve).is_err());
    for i in 0..4 {
        let _g = c.lock_write(i);
        assert!(c.install_clean(i, &vec![i as u8 + 1; 4096]).unwrap());
    }
    let mut b = [0u8; 8];
    let g = c.lock_write(1);
    let mut w = *b"dirtydat";
    c.write(1, 100, &IoVec::from_slice(&mut w), None).unwrap();
    drop(g);
    // Over the cap: the clean chunk not used since (0) goes, never dirty 1.
    {
        let _g = c.lock_write(5);
        assert!(c.install_clean(5, &vec![6u8; 4096]).unwrap());
    }
    assert_eq!(c.state(0), ABSENT);
    assert_eq!(c.state(1), DIRTY);
    c.read(5, 0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert_eq!(b, [6u8; 8]);
    c.persist().unwrap();
    drop(c);
    let (c, o) = SsdCache::open(&dir, id(1), 1, 10 * 4096, 4 * 4096, OpenMode::Serve).unwrap().unwrap();
    assert_eq!(o, Opened::Reused { cached: 4, dirty: 1 });
    c.read(1, 100, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert_eq!(&b, b"dirtydat");
    drop(c);
    // Another volume with dirty data: refused, not discarded.
    let e = SsdCache::open(&dir, id(2), 1, 10 * 4096, 4 * 4096, OpenMode::Serve).err().unwrap();
    assert!(e.to_string().contains("unsaved writes"), "{e}");
    // It says what works (export, fork and discard-local open the new
    // volume and refuse the same way): move the directory aside.
    assert!(e.to_string().contains("re-imported or replaced?") && e.to_string().contains(".old`"), "{e}");
}

#[test]
fn flushes_with_nothing_new_leave_the_state_file_alone() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let (c, _) = SsdCache::open(d.path(), id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    let ino = || std::fs::metadata(d.path().join("state")).unwrap().ino();
    let first = ino();
    c.persist().unwrap();
    assert_eq!(ino(), first, "no change: the map is not rewritten");
    let mut w = *b"abcd";
    {
        let _g = c.lock_write(1);
        c.write(1, 0, &IoVec::from_slice(&mut w), Some(&[0u8; 4096])).unwrap();
    }
    let journal = || c.journal.lock().as_ref().unwrap().len();
    let j0 = journal();
    c.persist().unwrap();
    assert_eq!(ino(), first, "a chunk became dirty: a journal record, not a new map");
    let j1 = journal();
    assert!(j1 > j0 && j1 - j0 < 200, "one small record ({} bytes)", j1 - j0);
    {
        let _g = c.lock_write(1);
        c.write(1, 8, &IoVec::from_slice(&mut w), None).unwrap();
    }
    c.persist().unwrap();
    assert_eq!((ino(), journal()), (first, j1), "a write into a dirty chunk needs an fsync of data, nothing else");
    drop(c);
    let (c, o) = SsdCache::open(d.path(), id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!(o, Opened::Reused { cached: 1, dirty: 1 });
    let mut b = [0u8; 12];
    c.read(1, 0, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert_eq!(&b, b"abcd\0\0\0\0abcd");
}

#[test]
fn the_journal_replays_after_a_crash_up_to_a_torn_record() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = SsdCache::open(d.path(), id(1), 1, 64 * 4096, 1 << 30, OpenMode::Serve).unwrap().unwrap();
    // Many small persists: states, bitmaps (a partial chunk), generation.
    for i in 0..40u64 {
        let _g = c.lock_write(i);
        let mut w = [i as u8 + 1; 16];
        c.write(i, 0, &IoVec::from_slice(&mut w), Some(&[0u8; 4096])).unwrap();
        drop(_g);
        c.persist().unwrap();
    }
    {
        let _g = c.lock_write(50);
        assert!(c.install_pages(50, 0, &[9u8; 4096]).unwrap() || c.state(50) == PARTIAL || c.state(50) == CLEAN);
    }
    c.set_generation(7);
    c.persist().unwrap();
    let used = c.journal.lock().as_ref().unwrap().len();
    // A crash: no close, no checkpoint. The reopened cache has it all.
    std::mem::forget(c);
    let d2 = d.path().to_path_buf();
    // The lock of the forgotten cache is this process's; reopen reads
    // the files as a new process would.
    let l = read_state(&d2.join("state")).unwrap().unwrap();
    assert_eq!(l.header.generation, 7);
    assert!((0..40).all(|i| l.states[i] == DIRTY), "{:?}", &l.states[..40]);
    assert!(l.states[50] == CLEAN || (l.states[50] == PARTIAL && l.maps.contains_key(&50)));
    // A torn last record loses only that persist.
    use std::os::unix::fs::FileExt;
    let j = d2.join("journal");
    std::fs::OpenOptions::new().write(true).open(&j).unwrap().write_all_at(&[0u8; 3], used - 3).unwrap();
    let l = read_state(&d2.join("state")).unwrap().unwrap();
    assert_eq!(l.header.generation, 1, "the last record (generation 7) was torn");
    assert!((0..40).all(|i| l.states[i] == DIRTY));
}

#[test]
fn mismatched_clean_cache_is_discarded() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = SsdCache::open(d.path(), id(1), 1, 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    {
        let _g = c.lock_write(0);
        c.install_clean(0, &[1u8; 4096]).unwrap();
    }
    c.persist().unwrap();
    drop(c);
    let (c, o) = SsdCache::open(d.path(), id(2), 1, 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert!(matches!(o, Opened::Discarded(ref w) if w.contains("belongs to volume")), "{o:?}");
    assert_eq!(c.state(0), ABSENT);
    drop(c);
    // Damaged state file: refused with a reason, the data file kept.
    std::fs::write(d.path().join("data"), [7u8; 4096]).unwrap();
    std::fs::write(d.path().join("state"), b"garbage garbage garbage garbage garbage").unwrap();
    let e = SsdCache::open(d.path(), id(2), 1, 4096, 1 << 20, OpenMode::Serve).err().unwrap();
    assert!(e.to_string().contains("checksum") && e.to_string().contains("discard-local"), "{e}");
    assert_eq!(std::fs::read(d.path().join("data")).unwrap(), [7u8; 4096]);
    // Removing it is asked for separately, and leaves a sound one alone.
    let gone = remove_damaged(d.path(), &["state", "data"], false).unwrap().unwrap();
    assert!(gone.why.contains("checksum") && gone.cache_id.is_none(), "{gone:?}");
    assert!(!d.path().join("data").exists());
    let (c, o) = SsdCache::open(d.path(), id(2), 1, 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!(o, Opened::Fresh);
    c.persist().unwrap();
    drop(c);
    assert!(remove_damaged(d.path(), &["state", "data"], false).unwrap().is_none());
    assert!(d.path().join("state").exists());
    // A lost state file with data left: refused, and removed when asked.
    std::fs::remove_file(d.path().join("state")).unwrap();
    std::fs::write(d.path().join("data"), [7u8; 4096]).unwrap();
    let e = SsdCache::open(d.path(), id(2), 1, 4096, 1 << 20, OpenMode::Serve).err().unwrap();
    assert!(e.to_string().contains("state file is missing"), "{e}");
    assert_eq!(std::fs::read(d.path().join("data")).unwrap(), [7u8; 4096]);
    assert!(remove_damaged(d.path(), &["state", "data"], false).unwrap().is_some());
    assert!(SsdCache::open(d.path(), id(2), 1, 4096, 1 << 20, OpenMode::Serve).unwrap().is_some());
}

#[test]
fn a_state_a_newer_driveblk_wrote_is_refused_as_newer_before_its_checksum_is_read() {
    let d = tempfile::tempdir().unwrap();
    drop(SsdCache::open(d.path(), id(1), 1, 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap());
    // A newer layout after the header line: its checksum is not this one's.
    let newer = format!("{{\"format\":\"driveblk-cache\",\"version\":{}}}\nwhatever follows", STATE_VERSION + 1);
    std::fs::write(d.path().join("state"), newer).unwrap();
    assert!(matches!(read_state(&d.path().join("state")), Err(Unusable::Newer(v)) if v == STATE_VERSION + 1));
    let e = SsdCache::open(d.path(), id(1), 1, 4096, 1 << 20, OpenMode::Serve).err().unwrap().to_string();
    assert!(e.contains("newer driveblk") && !e.contains("checksum") && !e.contains("cannot be used"), "{e}");
    let e = remove_damaged(d.path(), &["state", "data"], false).unwrap_err().to_string();
    assert!(e.contains("newer driveblk") && e.contains("--force"), "{e}");
    assert!(d.path().join("state").exists());
    let gone = remove_damaged(d.path(), &["state", "data"], true).unwrap().unwrap();
    assert_eq!(gone.cache_id, None, "a forced removal of a newer cache named its lease for release");
    assert!(!d.path().join("state").exists());
}

const CS: u64 = 64 * 1024;
const P: usize = PAGE as usize;

fn id64() -> CacheIdentity {
    CacheIdentity { volume_id: "cd".repeat(16), chunk_size: CS }
}

fn open64(dir: &Path, len: u64, cap: u64) -> (SsdCache, Opened) {
    SsdCache::open(dir, id64(), 1, len, cap, OpenMode::Serve).unwrap().unwrap()
}

/// The remote bytes of chunk `idx`: every page distinct.
fn remote(idx: u64) -> Vec<u8> {
    (0..CS).map(|i| ((i / PAGE) as u8).wrapping_mul(7) ^ (idx as u8).wrapping_add(i as u8)).collect()
}

/// Installs chunk `idx` whole and clean, as fetched.
fn install(c: &SsdCache, idx: u64) {
    let _g = c.lock_write(idx);
    assert!(c.install_clean(idx, &remote(idx)).unwrap());
}

fn pages(c: &SsdCache, idx: u64, first: usize, n: usize) -> bool {
    let _g = c.lock_write(idx);
    c.install_pages(idx, (first * P) as u64, &remote(idx)[first * P..(first + n) * P]).unwrap()
}

fn read_at(c: &SsdCache, idx: u64, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    c.read(idx, off, &IoVec::from_slice(&mut v), IoMode::Blocking).unwrap();
    v
}

/// What the state file on disk says right now, as durable as it is
/// (after a host crash: without the volatile records).
fn on_disk(dir: &Path) -> Loaded {
    read_state_with(&dir.join("state"), Journal::replay_durable).unwrap().unwrap()
}

#[test]
fn ssd_pages_install_read_complete() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 0, 2, 3));
    assert_eq!(c.state(0), PARTIAL);
    assert!(!c.has_chunk(0));
    assert!(c.has_pages(0, 2 * PAGE, 3 * PAGE));
    assert!(c.has_pages(0, 2 * PAGE + 100, 10));
    assert!(c.has_pages(0, 0, 0));
    assert!(!c.has_pages(0, PAGE, 2 * PAGE), "page 1 is missing");
    assert!(!c.has_pages(0, 4 * PAGE, PAGE + 1), "page 5 is missing");
    assert!(!c.has_pages(0, 0, CS + 1));
    assert!(!c.has_pages(1, 0, 0));
    assert_eq!((c.partial_chunks(), c.cached_chunks(), c.cached_bytes()), (1, 0, 3 * PAGE));
    assert_eq!(c.chunks_in(PARTIAL), vec![0]);
    assert_eq!(read_at(&c, 0, 2 * PAGE, 3 * P), remote(0)[2 * P..5 * P]);
    // Rewriting present pages is fine and counts nothing twice.
    assert!(pages(&c, 0, 3, 3));
    assert_eq!(c.cached_bytes(), 4 * PAGE);
    // Every page present: the chunk is clean, its bitmap gone.
    assert!(pages(&c, 0, 0, 2));
    assert!(pages(&c, 0, 6, 10));
    assert_eq!(c.state(0), CLEAN);
    assert!(c.has_chunk(0) && c.has_pages(0, 0, CS));
    assert_eq!((c.partial_chunks(), c.cached_chunks(), c.cached_bytes()), (0, 1, CS));
    assert_eq!(c.read_chunk(0).unwrap(), remote(0));
    // Clean, dirty or past the end: refused, bytes left alone.
    assert!(!pages(&c, 0, 0, 1));
    {
        let _g = c.lock_write(1);
        let mut w = vec![9u8; CS as usize];
        c.write(1, 0, &IoVec::from_slice(&mut w), None).unwrap();
        assert!(!c.install_pages(1, 0, &remote(1)[..P]).unwrap());
        assert!(!c.install_pages(4, 0, &remote(1)[..P]).unwrap());
        // Misaligned or past the chunk: a caller bug, reported.
        assert!(c.install_pages(2, 100, &remote(2)[..P]).is_err());
        assert!(c.install_pages(2, CS - PAGE, &remote(2)[..2 * P]).is_err());
        assert!(c.install_pages(2, 0, &remote(2)[..100]).is_err());
    }
    assert_eq!(c.read_chunk(1).unwrap(), vec![9u8; CS as usize]);
    assert_eq!(c.state(2), ABSENT);
    assert_eq!(c.cached_bytes(), 2 * CS);
}

#[test]
fn ssd_install_clean_over_partial() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 0, 4, 2));
    c.persist().unwrap();
    {
        let _g = c.lock_write(0);
        assert!(c.install_clean(0, &remote(0)).unwrap());
        assert!(!c.install_clean(0, &remote(0)).unwrap());
    }
    assert_eq!(c.state(0), CLEAN);
    assert_eq!((c.partial_chunks(), c.cached_chunks(), c.cached_bytes()), (0, 1, CS));
    assert!(c.needs_persist());
    c.persist().unwrap();
    assert!(!c.needs_persist());
    drop(c);
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 1, dirty: 0 });
    assert_eq!((c.partial_chunks(), c.cached_bytes()), (0, CS));
    assert_eq!(c.read_chunk(0).unwrap(), remote(0));
}

/// kill -9 between a guest write and its FLUSH: the next process's
/// flush must cover that write (the bug: it acknowledged the flush and
/// the page read back as the remote's bytes).
#[test]
fn ssd_writes_survive_a_process_crash_before_their_flush() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let write = |c: &SsdCache, idx: u64, off: usize, byte: u8, fill: Option<&[u8]>| {
        let _g = c.lock_write(idx);
        let mut w = vec![byte; P];
        c.write(idx, off as u64, &IoVec::from_slice(&mut w), fill).unwrap();
    };
    // Flushed: chunk 0 dirty in part.
    write(&c, 0, 0, 1, None);
    c.persist().unwrap();
    // Then, unflushed: a new page of chunk 0, a page of absent chunk 1,
    // a partial write of absent chunk 2 (with its fill), zeroed chunk 3.
    write(&c, 0, 3 * P, 2, None);
    write(&c, 1, 5 * P, 3, None);
    write(&c, 2, P, 4, Some(&remote(2)));
    {
        let _l = c.lock_many(3..4);
        c.zero_chunks(3..4).unwrap();
    }
    // The process dies: no persist; its page cache stays.
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    // The next process's first flush.
    c.persist().unwrap();
    drop(c);
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 1, dirty: 4 });
    assert_eq!((c.state(0), c.state(1), c.state(2), c.state(3)), (DIRTY_PARTIAL, DIRTY_PARTIAL, DIRTY, ZERO_DIRTY));
    assert!(c.has_pages(0, 0, PAGE) && c.has_pages(0, 3 * PAGE, PAGE) && !c.has_pages(0, PAGE, PAGE));
    assert!(c.has_pages(1, 5 * PAGE, PAGE) && !c.has_pages(1, 0, PAGE));
    assert_eq!(read_at(&c, 0, 0, P), vec![1u8; P]);
    assert_eq!(read_at(&c, 0, 3 * PAGE, P), vec![2u8; P]);
    assert_eq!(read_at(&c, 1, 5 * PAGE, P), vec![3u8; P]);
    let mut want2 = remote(2);
    want2[P..2 * P].fill(4);
    assert_eq!(c.read_chunk(2).unwrap(), want2);
    assert_eq!(c.read_chunk(3).unwrap(), vec![0u8; CS as usize]);
}

/// A volatile record is the journal's last word on its chunk until a
/// durable record names the chunk again. A chunk written (volatile
/// record: dirty), committed (clean) and evicted (absent) before any
/// persist ends as the map on disk already calls it; the persist that
/// records the eviction must still name it, or a crash after the hole
/// punch replays "dirty" over zeroes (the bug: the next commit would
/// have uploaded them over the committed bytes).
#[test]
fn ssd_a_persist_supersedes_the_volatile_records_before_it() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    c.persist().unwrap();
    let mut w = remote(1);
    {
        let _g = c.lock_write(1);
        c.write(1, 0, &IoVec::from_slice(&mut w), None).unwrap();
    }
    assert_eq!(c.state(1), DIRTY);
    {
        let _g = c.lock_write(1);
        assert!(c.mark_clean(1, c.seq(1)));
    }
    assert_eq!(c.drop_clean().unwrap(), 1);
    assert_eq!(c.state(1), ABSENT);
    // The process dies: its page cache (journal included) stays.
    drop(c);
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 0, dirty: 0 }, "the evicted chunk came back");
    assert_eq!(c.state(1), ABSENT);
}

/// A write into a chunk zeroed whole since the last persist, dirty on
/// disk before: its state is back to what the map on disk says, but the
/// volatile "zeroed" record is the replay's last word on it, so the write
/// records again (the bug: after a kill -9 the chunk read as zeroes). Also
/// when a commit made the zeroed chunk absent before a whole-chunk write.
#[test]
fn ssd_a_write_after_zeroing_survives_a_process_crash() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let write = |c: &SsdCache, idx: u64, off: u64, w: &mut [u8]| {
        let _g = c.lock_write(idx);
        c.write(idx, off, &IoVec::from_slice(w), None).unwrap();
    };
    write(&c, 0, 0, &mut vec![5u8; CS as usize]);
    write(&c, 1, 0, &mut vec![5u8; CS as usize]);
    c.persist().unwrap();
    {
        let _l = c.lock_many(0..2);
        c.zero_chunks(0..2).unwrap();
    }
    write(&c, 0, PAGE, &mut vec![6u8; P]);
    {
        let _g = c.lock_write(1);
        assert!(c.mark_clean(1, c.seq(1)));
    }
    assert_eq!(c.state(1), ABSENT);
    write(&c, 1, 0, &mut vec![7u8; CS as usize]);
    assert_eq!((c.state(0), c.state(1)), (DIRTY, DIRTY));
    // The process dies: its page cache (journal included) stays.
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let mut want0 = vec![0u8; CS as usize];
    want0[P..2 * P].fill(6);
    assert!(c.read_chunk(0).unwrap() == want0, "the write after zeroing was lost");
    assert!(c.read_chunk(1).unwrap() == vec![7u8; CS as usize], "the write after the commit was lost");
}

/// A chunk dirty in part on disk, completed by a fill (a read of one of
/// its absent pages fetched it): a write into a page the fill supplied
/// survives a kill -9 (the bug: nothing recorded the fill, the write went
/// dirty -> dirty and recorded nothing either, the replay brought back the
/// chunk without that page, and the next fill wrote the remote's bytes
/// over the guest's).
#[test]
fn ssd_a_write_into_a_filled_page_survives_a_process_crash() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let write = |c: &SsdCache, off: u64, byte: u8| {
        let _g = c.lock_write(0);
        c.write(0, off, &IoVec::from_slice(&mut vec![byte; P]), None).unwrap();
    };
    write(&c, 0, 1);
    assert_eq!(c.state(0), DIRTY_PARTIAL);
    c.persist().unwrap();
    {
        let _g = c.lock_write(0);
        assert!(c.fill_missing(0, &remote(0)).unwrap());
    }
    assert_eq!(c.state(0), DIRTY);
    write(&c, 3 * PAGE, 2);
    // The process dies: its page cache (journal included) stays.
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(c.has_pages(0, 3 * PAGE, PAGE), "the written page is not held after the crash");
    let mut want = remote(0);
    want[..P].fill(1);
    want[3 * P..4 * P].fill(2);
    assert!(c.read_chunk_over(0, &remote(0)).unwrap() == want, "the written page read back otherwise");
}

/// A guest trimming a large region of a fresh cache: zeroed chunks hold
/// no space, also past the end of the data file (the bug: zeroes were
/// written there, GiBs of them for a large trim).
#[test]
fn ssd_zeroing_past_the_data_file_end_takes_no_space() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let n = SsdCache::MAX_BATCH;
    let (c, _) = open64(d.path(), n * CS, 1 << 30);
    {
        let _g = c.lock_write(0);
        c.write(0, 0, &IoVec::from_slice(&mut vec![5u8; P]), Some(&remote(0))).unwrap();
    }
    {
        let _l = c.lock_many(0..n);
        c.zero_chunks(0..n).unwrap();
    }
    c.persist().unwrap();
    let held = std::fs::metadata(d.path().join("data")).unwrap().blocks() * 512;
    assert!(held <= CS, "{held} bytes held by {n} zeroed chunks");
    {
        let _g = c.lock_write(n - 1);
        c.write(n - 1, PAGE, &IoVec::from_slice(&mut vec![6u8; P]), None).unwrap();
    }
    let mut want = vec![0u8; CS as usize];
    want[P..2 * P].fill(6);
    assert!(c.read_chunk(n - 1).unwrap() == want);
    assert!(c.read_chunk(0).unwrap() == vec![0u8; CS as usize]);
}

/// The first write into a clean chunk whose record could not be made
/// durable (a full disk under the journal) leaves the chunk clean, so the
/// next write tries to record it again (the bug: the chunk stayed dirty in
/// memory, and the next write changed its bytes, with no record, under a
/// map on disk that still called them the remote's).
#[test]
fn ssd_a_first_write_whose_record_fails_leaves_the_chunk_clean() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 0);
    c.persist().unwrap();
    // Every journal append from here on fails as on a full disk.
    let full = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", full.path().join("journal")).unwrap();
    *c.journal.lock() = Some(Journal::open(full.path(), 0, bitmap_words(CS)).unwrap());
    let write = |c: &SsdCache| {
        let _g = c.lock_write(0);
        c.write(0, PAGE, &IoVec::from_slice(&mut vec![7u8; P]), None)
    };
    assert!(write(&c).is_err());
    assert_eq!(c.state(0), CLEAN);
    assert!(write(&c).is_err(), "a write went in with no record");
    assert_eq!(on_disk(d.path()).states[0], CLEAN);
    assert!(c.read_chunk(0).unwrap() == remote(0), "a chunk the map on disk calls clean changed");
}

/// The same for chunks the map on disk calls partial: written by whole
/// pages (dirty in part) or with the fill (dirty), a failed record leaves
/// them partial.
#[test]
fn ssd_a_first_write_whose_record_fails_leaves_the_chunk_partial() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    for idx in 0..2 {
        assert!(pages(&c, idx, 0, 2));
        // Not evicted when the full disk makes room for the write.
        c.set_pinned(idx);
    }
    c.persist().unwrap();
    let full = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", full.path().join("journal")).unwrap();
    *c.journal.lock() = Some(Journal::open(full.path(), 0, bitmap_words(CS)).unwrap());
    let write = |c: &SsdCache, idx: u64, off: u64, len: usize, fill: Option<&[u8]>| {
        let _g = c.lock_write(idx);
        c.write(idx, off, &IoVec::from_slice(&mut vec![7u8; len]), fill)
    };
    for _ in 0..2 {
        assert!(write(&c, 0, 0, P, None).is_err(), "a write went in with no record");
        assert_eq!(c.state(0), PARTIAL);
        assert!(write(&c, 1, 100, 10, Some(&remote(1))).is_err(), "a write went in with no record");
        assert_eq!(c.state(1), PARTIAL);
    }
    assert_eq!(on_disk(d.path()).states[..2], [PARTIAL, PARTIAL]);
    for idx in 0..2 {
        assert!(c.has_pages(idx, 0, 2 * PAGE));
        assert_eq!(read_at(&c, idx, 0, 2 * P), remote(idx)[..2 * P]);
    }
    assert_eq!((c.partial_chunks(), c.cached_bytes(), c.dirty_chunks()), (2, 4 * PAGE, 0));
}

/// The first write into a chunk the map on disk calls clean (or
/// partial) makes "not clean" durable before its bytes change, as
/// after a host crash (durable journal records only) the map would
/// otherwise call modified bytes the remote's; and it costs no fsync of
/// the data file (a later flush still has the write to sync).
#[test]
fn ssd_first_write_to_a_clean_chunk_is_recorded_durably_without_a_data_sync() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 0);
    {
        let _g = c.lock_write(1);
        assert!(c.install_pages(1, 0, &remote(1)[..2 * P]).unwrap());
    }
    c.persist().unwrap();
    let synced = c.persisted.lock().data_epoch;
    let mut w = vec![7u8; P];
    {
        let _g = c.lock_write(0);
        c.write(0, 2 * PAGE, &IoVec::from_slice(&mut w), None).unwrap();
    }
    {
        let _g = c.lock_write(1);
        c.write(1, PAGE, &IoVec::from_slice(&mut w), None).unwrap();
    }
    let after_reboot = read_state_with(&d.path().join("state"), Journal::replay_durable).unwrap().unwrap();
    assert_eq!(after_reboot.states[0], DIRTY, "the clean chunk's change was not durable before its write");
    assert_eq!(after_reboot.states[1], DIRTY_PARTIAL, "the partial chunk's change was not durable before its write");
    // Only the pages synced before: the map claims no unsynced byte.
    assert_eq!(after_reboot.maps[&1][0], 0b11);
    assert_eq!(c.persisted.lock().data_epoch, synced, "the data file was synced for a map change");
    assert!(c.needs_persist() || c.data_epoch.load(Ordering::SeqCst) > synced);
    c.persist().unwrap();
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(read_at(&c, 0, 2 * PAGE, P), w);
    assert_eq!(read_at(&c, 1, PAGE, P), w);
    assert_eq!(read_at(&c, 1, 0, P), remote(1)[..P].to_vec());
}

/// A chunk the map on disk still calls partial, completed since (clean in
/// memory): its first write, and zeroing it, make "not clean" durable
/// first too, or after a host crash the map would call the changed (or
/// punched) pages the remote's.
#[test]
fn ssd_a_chunk_completed_since_the_map_said_partial_is_recorded_before_it_changes() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 0, 0, 2));
    assert!(pages(&c, 1, 0, 2));
    c.persist().unwrap();
    install(&c, 0);
    install(&c, 1);
    assert_eq!((c.state(0), c.state(1)), (CLEAN, CLEAN));
    assert_eq!(on_disk(d.path()).states[..2], [PARTIAL, PARTIAL]);
    let mut w = vec![7u8; P];
    {
        let _g = c.lock_write(0);
        c.write(0, 0, &IoVec::from_slice(&mut w), None).unwrap();
    }
    let after_reboot = read_state_with(&d.path().join("state"), Journal::replay_durable).unwrap().unwrap();
    assert_ne!(after_reboot.states[0], PARTIAL, "the written chunk's map still claims its pages");
    assert!(!after_reboot.maps.contains_key(&0));
    assert_eq!(after_reboot.states[1], PARTIAL);
    {
        let _g = c.lock_many(1..2);
        c.zero_chunks(1..2).unwrap();
    }
    let after_reboot = read_state_with(&d.path().join("state"), Journal::replay_durable).unwrap().unwrap();
    assert_ne!(after_reboot.states[1], PARTIAL, "the zeroed chunk's map still claims its pages");
    assert!(!after_reboot.maps.contains_key(&1));
}

#[test]
fn ssd_a_small_first_write_rides_in_its_record_and_survives_a_lost_page() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 0);
    c.persist().unwrap();
    let epoch = c.data_epoch.load(Ordering::SeqCst);
    let mut w = vec![7u8; P];
    {
        let _g = c.lock_write(0);
        c.write(0, 2 * PAGE, &IoVec::from_slice(&mut w), None).unwrap();
    }
    assert_eq!(c.data_epoch.load(Ordering::SeqCst), epoch, "the write owes the data file a sync");
    assert!(!c.journal.lock().as_ref().unwrap().is_unsynced(), "the record is not durable");
    // The host dies with the written page not on disk: the data file
    // holds the clean bytes there again.
    drop(c);
    let data = OpenOptions::new().write(true).open(d.path().join("data")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&data, &remote(0)[2 * P..3 * P], 2 * PAGE).unwrap();
    let after_reboot = read_state_with(&d.path().join("state"), Journal::replay_durable).unwrap().unwrap();
    assert_eq!(after_reboot.states[0], DIRTY);
    // Looking (export, fork) sees the write, and so does serving.
    let (c, _) = SsdCache::open(d.path(), id64(), 1, 4 * CS, 1 << 30, OpenMode::Inspect).unwrap().unwrap();
    assert_eq!(read_at(&c, 0, 2 * PAGE, P), w);
    drop(c);
    std::os::unix::fs::FileExt::write_all_at(&data, &remote(0)[2 * P..3 * P], 2 * PAGE).unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(c.state(0), DIRTY);
    assert_eq!(read_at(&c, 0, 2 * PAGE, P), w);
    assert_eq!(read_at(&c, 0, 3 * PAGE, P), remote(0)[3 * P..4 * P].to_vec());
}

/// An encrypted cache logs too, its records carrying the written pages
/// as ciphertext: the journal holds no plaintext, and a replay with the
/// pages lost from the data file gives the writes back.
#[test]
fn ssd_an_encrypted_cache_logs_ciphertext_and_replays_it() {
    use crate::volume::crypto::VolumeKey;
    let d = tempfile::tempdir().unwrap();
    let sealing = Sealing::Sealed(Arc::new(VolumeKey::generate()));
    let open = |mode| SsdCache::open_sealed(d.path(), id64(), 1, 4 * CS, 1 << 30, mode, &sealing).unwrap().unwrap();
    let (c, _) = open(OpenMode::Serve);
    install(&c, 0);
    c.persist().unwrap();
    let before = std::fs::read(d.path().join("data")).unwrap();
    let epoch = c.data_epoch.load(Ordering::SeqCst);
    let small: Vec<u8> = b"SMALL-SECRET-512".iter().copied().cycle().take(512).collect();
    let page: Vec<u8> = b"PAGE-SECRET-4096".iter().copied().cycle().take(P).collect();
    {
        let _g = c.lock_write(0);
        c.write(0, 2 * PAGE + 1536, &IoVec::from_slice(&mut small.clone()), None).unwrap();
    }
    assert_eq!(c.data_epoch.load(Ordering::SeqCst), epoch, "the first write did not ride in its record");
    assert!(!c.journal.lock().as_ref().unwrap().is_unsynced(), "the record is not durable");
    let journal = || c.journal.lock().as_ref().unwrap().len();
    let logged = journal();
    {
        let _g = c.lock_write(0);
        c.write(0, 5 * PAGE, &IoVec::from_slice(&mut page.clone()), None).unwrap();
    }
    assert!(journal() > logged, "a write into a logged chunk did not go to the journal");
    c.persist().unwrap();
    assert_eq!(c.data_epoch.load(Ordering::SeqCst), epoch, "the FLUSH synced the data file");
    drop(c);
    let j = std::fs::read(d.path().join("journal")).unwrap();
    for probe in [&b"SMALL-SECRET"[..], b"PAGE-SECRET"] {
        assert!(!j.windows(probe.len()).any(|w| w == probe), "plaintext in the journal");
    }
    assert_eq!(on_disk(d.path()).header.version, SEALED_VERSION);
    // The host dies with neither page on disk.
    let lose = || {
        let data = OpenOptions::new().write(true).open(d.path().join("data")).unwrap();
        for pg in [2, 5] {
            let r = pg * P..(pg + 1) * P;
            std::os::unix::fs::FileExt::write_all_at(&data, &before[r], (pg * P) as u64).unwrap();
        }
    };
    let mut want = remote(0);
    want[2 * P + 1536..2 * P + 2048].copy_from_slice(&small);
    want[5 * P..6 * P].copy_from_slice(&page);
    lose();
    let (c, _) = open(OpenMode::Inspect);
    assert_eq!(c.read_chunk(0).unwrap(), want, "looking at the cache");
    drop(c);
    lose();
    let (c, _) = open(OpenMode::Serve);
    assert_eq!(c.state(0), DIRTY);
    assert_eq!(c.read_chunk(0).unwrap(), want, "serving the cache");
}

#[test]
fn ssd_a_replay_never_puts_a_logged_chunks_older_bytes_over_newer_ones() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let write = |c: &SsdCache, byte: u8| {
        let _g = c.lock_write(0);
        let mut w = vec![byte; P];
        c.write(0, 2 * PAGE, &IoVec::from_slice(&mut w), None).unwrap();
    };
    install(&c, 0);
    c.persist().unwrap();
    write(&c, 1);
    c.persist().unwrap();
    let journal = || c.journal.lock().as_ref().unwrap().len();
    let before = journal();
    write(&c, 2);
    assert!(journal() > before, "a write into a logged chunk did not go to the journal");
    c.persist().unwrap();
    // Committed, evicted, fetched again from a newer generation whose
    // page 2 differs from both writes.
    {
        let _g = c.lock_write(0);
        assert!(c.mark_clean(0, c.seq(0)));
    }
    c.persist().unwrap();
    assert_eq!(c.drop_clean().unwrap(), 1);
    let mut newer = remote(0);
    newer[2 * P..3 * P].fill(9);
    {
        let _g = c.lock_write(0);
        assert!(c.install_clean(0, &newer).unwrap());
    }
    c.persist().unwrap();
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(c.state(0), CLEAN);
    assert_eq!(c.read_chunk(0).unwrap(), newer, "a replay wrote a logged record's bytes over newer ones");
    // And the newest logged bytes win over older ones of the same chunk.
    write(&c, 3);
    write(&c, 4);
    c.persist().unwrap();
    drop(c);
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(read_at(&c, 0, 2 * PAGE, P), vec![4u8; P]);
}

#[test]
fn ssd_a_journal_write_past_the_map_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let rec = Record { writes: vec![Logged { at: 4 * CS - 10, bytes: vec![1; 20] }], ..Record::default() };
    c.journal.lock().as_mut().unwrap().append(&rec).unwrap();
    drop(c);
    let err = SsdCache::open(d.path(), id64(), 1, 4 * CS, 1 << 30, OpenMode::Serve).err().unwrap().to_string();
    assert!(err.contains("writes past the map"), "{err}");
}

#[test]
fn ssd_write_over_persisted_partial() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 0, 0, 4));
    assert!(pages(&c, 1, 0, 4));
    c.persist().unwrap();
    assert_eq!(on_disk(d.path()).states[..2], [PARTIAL, PARTIAL]);
    // The guest's view of chunk 0 (what the caller fetched as fill).
    let mut want = remote(0);
    want[100..108].copy_from_slice(b"newbytes");
    {
        let _g = c.lock_write(0);
        let mut w = *b"newbytes";
        c.write(0, 100, &IoVec::from_slice(&mut w), Some(&remote(0))).unwrap();
    }
    // The map stopped claiming chunk 0's pages before they changed
    // (persisted during the write), and never calls them clean.
    let l = on_disk(d.path());
    assert_eq!(l.states[..2], [ABSENT, PARTIAL]);
    assert!(!l.maps.contains_key(&0) && l.maps.contains_key(&1));
    assert_eq!(c.state(0), DIRTY);
    assert_eq!((c.partial_chunks(), c.dirty_chunks(), c.cached_bytes()), (1, 1, CS + 4 * PAGE));
    // A partial chunk never persisted needs no extra persist: still the
    // absent path, with the fill.
    assert!(pages(&c, 2, 1, 1));
    {
        let _g = c.lock_write(2);
        let mut w = vec![5u8; P];
        c.write(2, 0, &IoVec::from_slice(&mut w), Some(&remote(2))).unwrap();
    }
    assert_eq!(on_disk(d.path()).states[2], ABSENT);
    c.persist().unwrap();
    drop(c);
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 2, dirty: 2 });
    assert_eq!((c.state(0), c.state(1), c.state(2)), (DIRTY, PARTIAL, DIRTY));
    assert_eq!(c.read_chunk(0).unwrap(), want);
    let mut want2 = remote(2);
    want2[..P].fill(5);
    assert_eq!(c.read_chunk(2).unwrap(), want2);
}

#[test]
fn ssd_zero_chunks_over_partial() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 1, 3, 5));
    assert!(pages(&c, 2, 0, 1));
    c.persist().unwrap();
    {
        let _g = c.lock_many(0..3);
        c.zero_chunks(0..3).unwrap();
    }
    // The stored map stopped calling the partial pages clean before
    // the hole punch (zeroed chunks read as zeroes whatever the file holds).
    assert_eq!(on_disk(d.path()).states[..3], [ABSENT, ZERO_DIRTY, ZERO_DIRTY]);
    for i in 0..3 {
        assert_eq!(c.state(i), ZERO_DIRTY);
        assert_eq!(c.read_chunk(i).unwrap(), vec![0u8; CS as usize]);
    }
    // Zeroed chunks hold no space.
    assert_eq!((c.partial_chunks(), c.cached_chunks(), c.cached_bytes(), c.dirty_chunks()), (0, 0, 0, 3));
    c.persist().unwrap();
    let l = on_disk(d.path());
    assert_eq!((l.states[..3].to_vec(), l.maps.len()), (vec![ZERO_DIRTY; 3], 0));
}

#[test]
fn ssd_eviction_counts_bytes_lru() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 16 * CS, 2 * CS);
    install(&c, 0);
    assert!(pages(&c, 1, 0, 4));
    assert!(pages(&c, 2, 0, 4));
    assert_eq!(c.cached_bytes(), CS + 8 * PAGE);
    // 32 KiB over: the sweep clears every bit, then takes the first
    // chunk it passes again (whole chunk 0).
    install(&c, 3);
    assert_eq!((c.state(0), c.state(1), c.state(2), c.state(3)), (ABSENT, PARTIAL, PARTIAL, CLEAN));
    assert_eq!((c.evictions(), c.cached_bytes()), (1, CS + 8 * PAGE));
    // Reading chunk 1 gives it a second chance: chunk 2 goes next.
    read_at(&c, 1, 0, 8);
    // Exactly at the cap: no eviction.
    assert!(pages(&c, 5, 0, 8));
    assert_eq!((c.evictions(), c.cached_bytes()), (1, 2 * CS));
    // Over by one page: partial chunk 2 (16 KiB, at least a tenth of
    // the cap) goes, nothing else.
    assert!(pages(&c, 6, 0, 1));
    assert_eq!((c.state(1), c.state(2), c.state(5), c.state(6)), (PARTIAL, ABSENT, PARTIAL, PARTIAL));
    assert_eq!((c.evictions(), c.partial_chunks(), c.cached_bytes()), (2, 3, 2 * CS - 3 * PAGE));
    assert_eq!(c.read_chunk(2).unwrap(), vec![0u8; CS as usize], "hole punched");
    // The eviction persisted the map without chunk 2's bitmap.
    let l = on_disk(d.path());
    assert_eq!((l.states[2], l.maps.contains_key(&2)), (ABSENT, false));
    // Dirty chunks are never evicted: with the cap full of them, pages
    // do not fit.
    for i in 8..10 {
        let _g = c.lock_write(i);
        let mut w = vec![1u8; CS as usize];
        c.write(i, 0, &IoVec::from_slice(&mut w), None).unwrap();
    }
    assert!(!pages(&c, 10, 0, 1));
    assert_eq!(c.state(10), ABSENT);
    assert_eq!(c.chunks_in(PARTIAL), Vec::<u64>::new());
    assert_eq!(c.cached_bytes(), 2 * CS);
}

#[test]
fn ssd_bitmaps_persist_and_v1_opens() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert!(pages(&c, 0, 0, 1));
    assert!(pages(&c, 2, 15, 1));
    c.persist().unwrap();
    assert!(!c.needs_persist());
    // A page into an already partial chunk changes no state byte.
    assert!(pages(&c, 0, 7, 2));
    assert!(c.needs_persist());
    c.persist().unwrap();
    assert!(!c.needs_persist());
    // Those changes went to the journal; a checkpoint writes the map.
    c.checkpoint().unwrap();
    let raw = std::fs::read(d.path().join("state")).unwrap();
    let nl = raw.iter().position(|&b| b == b'\n').unwrap();
    let h: serde_json::Value = serde_json::from_slice(&raw[..nl]).unwrap();
    assert_eq!((h["version"].as_u64(), h["partial"].as_u64()), (Some(5), Some(2)));
    assert_eq!(raw.len(), nl + 1 + 4 + 2 * 16 + 32);
    assert_eq!(raw[nl + 5..nl + 5 + 16], [0, 0, 0, 0, 0, 0, 0, 0, 0b1000_0001, 0b1, 0, 0, 0, 0, 0, 0]);
    drop(c);
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 0, dirty: 0 });
    assert_eq!((c.partial_chunks(), c.cached_bytes()), (2, 4 * PAGE));
    assert!(c.has_pages(0, 0, PAGE) && c.has_pages(0, 7 * PAGE, 2 * PAGE) && !c.has_pages(0, 0, 2 * PAGE));
    assert!(c.has_pages(2, CS - 1, 1) && !c.has_pages(2, 0, 1));
    assert_eq!(read_at(&c, 2, CS - PAGE, P), remote(2)[15 * P..]);
    assert!(pages(&c, 2, 0, 15));
    assert_eq!(c.state(2), CLEAN);
    {
        let _g = c.lock_write(1);
        let mut w = vec![3u8; CS as usize];
        c.write(1, 0, &IoVec::from_slice(&mut w), None).unwrap();
    }
    c.persist().unwrap();
    drop(c);
    // A version 1 file (as older driveblk wrote it) still opens.
    let hdr = format!(
        r#"{{"format":"driveblk-cache","version":1,"volume_id":"{}","generation":1,"chunk_size":{CS},"image_len":{},"chunks":4}}"#,
        "cd".repeat(16),
        4 * CS
    );
    let file = state_file(&hdr, &[ABSENT, DIRTY, CLEAN, ABSENT], &[], true);
    std::fs::write(d.path().join("state"), file).unwrap();
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 2, dirty: 1 });
    assert_eq!(c.partial_chunks(), 0);
    assert_eq!(c.read_chunk(1).unwrap(), vec![3u8; CS as usize]);
    assert_eq!(c.read_chunk(2).unwrap(), remote(2));
    drop(c);
    // ... but not with a partial chunk in it.
    let file = state_file(&hdr, &[ABSENT, DIRTY, PARTIAL, ABSENT], &[], true);
    std::fs::write(d.path().join("state"), file).unwrap();
    let e = SsdCache::open(d.path(), id64(), 1, 4 * CS, 1 << 30, OpenMode::Inspect).err().unwrap();
    assert!(e.to_string().contains("does not match"), "{e}");
}

fn state_file(header: &str, states: &[u8], bitmaps: &[(u64, u64)], good_sum: bool) -> Vec<u8> {
    let mut b = header.as_bytes().to_vec();
    b.push(b'\n');
    b.extend_from_slice(states);
    for (idx, word) in bitmaps {
        b.extend_from_slice(&idx.to_le_bytes());
        b.extend_from_slice(&word.to_le_bytes());
    }
    let sum = Sha256::digest(&b);
    b.extend_from_slice(&sum);
    if !good_sum {
        let n = b.len();
        b[n - 40] ^= 1;
    }
    b
}

#[test]
fn ssd_damaged_bitmaps_are_refused() {
    let hdr = |partial: u64| {
        format!(
            r#"{{"format":"driveblk-cache","version":2,"volume_id":"{}","generation":1,"chunk_size":{CS},"image_len":{},"chunks":3,"partial":{partial}}}"#,
            "cd".repeat(16),
            3 * CS
        )
    };
    let st = [PARTIAL, ABSENT, PARTIAL];
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (state_file(&hdr(2), &st, &[(0, 1), (2, 1 << 20)], true), "past the chunk's last page"),
        (state_file(&hdr(2), &st, &[(0, 1)], true), "page bitmaps are"),
        (state_file(&hdr(1), &st, &[(0, 1)], true), "header says 1"),
        (state_file(&hdr(2), &st, &[(0, 1), (2, 1)], false), "checksum"),
        (state_file(&hdr(2), &st, &[(0, 1), (2, 0)], true), "has no pages"),
        (state_file(&hdr(2), &st, &[(0, 1), (1, 1)], true), "not partial"),
        (state_file(&hdr(2), &st, &[(2, 1), (0, 1)], true), "out of order"),
    ];
    let d = tempfile::tempdir().unwrap();
    // The well-formed variant opens.
    std::fs::write(d.path().join("data"), b"").unwrap();
    std::fs::write(d.path().join("state"), state_file(&hdr(2), &st, &[(0, 1), (2, 0xffff)], true)).unwrap();
    let (c, o) = open64(d.path(), 3 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 0, dirty: 0 });
    assert_eq!((c.partial_chunks(), c.cached_bytes()), (2, 17 * PAGE));
    drop(c);
    for (file, why) in cases {
        std::fs::write(d.path().join("state"), &file).unwrap();
        for mode in [OpenMode::Inspect, OpenMode::Serve] {
            let e = SsdCache::open(d.path(), id64(), 1, 3 * CS, 1 << 30, mode).err().unwrap();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }
}

#[test]
fn ssd_short_last_page() {
    let d = tempfile::tempdir().unwrap();
    let len = CS + PAGE + 808;
    let (c, _) = open64(d.path(), len, 1 << 30);
    let tail = &remote(1)[P..P + 808];
    {
        let _g = c.lock_write(1);
        // Short data must end exactly at the image end.
        assert!(c.install_pages(1, 0, &remote(1)[..808]).is_err());
        assert!(c.install_pages(1, PAGE, tail).unwrap());
    }
    assert_eq!(c.state(1), PARTIAL);
    assert!(c.has_pages(1, PAGE, 808) && !c.has_pages(1, 0, 1));
    assert_eq!(c.cached_bytes(), PAGE, "the short page counts as a whole page");
    assert_eq!(read_at(&c, 1, PAGE, 808), tail);
    // Both pages of the image's last chunk present: clean.
    assert!(pages(&c, 1, 0, 1));
    assert_eq!(c.state(1), CLEAN);
    let got = c.read_chunk(1).unwrap();
    assert_eq!(got[..P + 808], remote(1)[..P + 808]);
    assert!(got[P + 808..].iter().all(|&b| b == 0));
    // A whole (padded) last page is accepted too.
    {
        let _g = c.lock_write(0);
        assert!(c.install_pages(0, 0, &remote(0)[..P]).unwrap());
    }
    drop(c);
    let (c2, _) = open64(&d.path().join("other"), len, 1 << 30);
    let _g = c2.lock_write(1);
    assert!(c2.install_pages(1, PAGE, &remote(1)[P..2 * P]).unwrap());
    assert!(c2.install_pages(1, 2 * PAGE, &remote(1)[2 * P..3 * P]).is_err(), "past the image end");
}

#[test]
fn ssd_concurrent_page_installs() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 64 * CS, 1 << 30);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = &c;
            s.spawn(move || {
                for i in (t..64).step_by(4) {
                    for p in (0..16).step_by(2) {
                        assert!(pages(c, i, p, 1));
                    }
                    if i % 2 == 0 {
                        let _g = c.lock_read(i);
                        assert!(c.has_pages(i, 0, PAGE) && !c.has_pages(i, PAGE, 1));
                    }
                }
                c.persist().unwrap();
            });
        }
    });
    assert_eq!((c.partial_chunks(), c.cached_bytes()), (64, 64 * 8 * PAGE));
    c.persist().unwrap();
    assert_eq!(on_disk(d.path()).maps.len(), 64);
}

#[test]
fn a_kept_record_of_changed_pages_is_refused_by_binaries_that_predate_it() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 1);
    {
        let _g = c.lock_write(1);
        c.write(1, 3 * PAGE, &IoVec::from_slice(&mut vec![9u8; P]), None).unwrap();
    }
    c.persist().unwrap();
    assert_eq!(on_disk(d.path()).header.version, PLAIN_VERSION);
    // A stop that leaves changes: the state a binary that predates the
    // record accepts (versions up to 6) is no longer what is on disk.
    c.keep_dirty_pages().unwrap();
    assert!(d.path().join("dirty-pages").exists());
    assert_eq!(on_disk(d.path()).header.version, PAGES_KEPT_VERSION);
    assert!(PAGES_KEPT_VERSION > SEALED_VERSION.max(PLAIN_VERSION));
    c.checkpoint().unwrap();
    assert_eq!(on_disk(d.path()).header.version, PAGES_KEPT_VERSION, "a later checkpoint kept the version");
    drop(c);
    // The next start takes the record back and writes the plain version again.
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    let set = c.dirty_pages(1).expect("the changed pages came back");
    assert_eq!(set[0], 1 << 3);
    assert!(!d.path().join("dirty-pages").exists());
    assert_eq!(on_disk(d.path()).header.version, PLAIN_VERSION);
}

#[test]
fn a_record_of_changed_pages_is_taken_only_beside_a_state_that_announces_it() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 1);
    {
        let _g = c.lock_write(1);
        c.write(1, 3 * PAGE, &IoVec::from_slice(&mut vec![9u8; P]), None).unwrap();
    }
    c.keep_dirty_pages().unwrap();
    drop(c);
    // The same map in a state of a version that predates the record, as a
    // binary that ignores the record writes it (one that wrote into chunk
    // 1 since, outside the pages the record names).
    let mut l = on_disk(d.path());
    assert_eq!(l.header.version, PAGES_KEPT_VERSION);
    l.header.version = PLAIN_VERSION;
    std::fs::write(d.path().join("state"), super::state_file::encode(&l.header, &l.states, &l.maps).unwrap()).unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(c.state(1), DIRTY);
    assert!(c.dirty_pages(1).is_none(), "a stale record of changed pages was trusted: the chunk must go up whole");
    assert!(!d.path().join("dirty-pages").exists(), "the stale record was left");
}

/// A zeroing whose persist failed (a full disk when the map is written)
/// leaves the map on disk calling the chunk clean: a write into it after
/// records it first, so that map never calls changed bytes the remote's.
#[test]
fn ssd_a_write_after_a_zeroing_whose_persist_failed_is_recorded() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 0);
    c.persist().unwrap();
    // Without a journal every change is a whole map written; the next one
    // goes to a full disk (once: the failed temporary file is removed).
    *c.journal.lock() = None;
    std::os::unix::fs::symlink("/dev/full", d.path().join("state.tmp")).unwrap();
    {
        let _l = c.lock_many(0..1);
        assert!(c.zero_chunks(0..1).is_err());
    }
    assert_eq!(on_disk(d.path()).states[0], CLEAN);
    {
        let _g = c.lock_write(0);
        c.write(0, PAGE, &IoVec::from_slice(&mut vec![9u8; P]), None).unwrap();
    }
    assert_ne!(on_disk(d.path()).states[0], CLEAN, "bytes changed under a map on disk that calls them clean");
    let mut want = vec![0u8; CS as usize];
    want[P..2 * P].fill(9);
    assert!(c.read_chunk(0).unwrap() == want);
}

/// An eviction whose persist failed (a full disk when the map is written)
/// keeps its victims cached: the map on disk still claims their bytes, so
/// a write into one records first, as into any clean chunk.
#[test]
fn ssd_an_eviction_whose_persist_failed_keeps_its_victims() {
    for kept in [CLEAN, PARTIAL] {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = open64(d.path(), 4 * CS, CS);
        if kept == CLEAN {
            install(&c, 0);
        } else {
            assert!(pages(&c, 0, 2, 3));
        }
        c.persist().unwrap();
        // Without a journal every change is a whole map written; the next
        // one goes to a full disk (once: the failed temporary file is removed).
        *c.journal.lock() = None;
        std::os::unix::fs::symlink("/dev/full", d.path().join("state.tmp")).unwrap();
        {
            // Chunk 1 needs chunk 0's room.
            let _g = c.lock_write(1);
            assert!(c.install_clean(1, &remote(1)).is_err());
        }
        assert_eq!(on_disk(d.path()).states[0], kept);
        assert_eq!(c.state(0), kept, "the victim stays as the map on disk says");
        assert_eq!(read_at(&c, 0, 2 * PAGE, P), remote(0)[2 * P..3 * P]);
        {
            let _g = c.lock_write(0);
            c.write(0, 0, &IoVec::from_slice(&mut vec![9u8; CS as usize]), None).unwrap();
        }
        assert_ne!(on_disk(d.path()).states[0], kept, "bytes changed under a map on disk that calls them the remote's");
        assert!(c.read_chunk(0).unwrap() == vec![9u8; CS as usize]);
    }
}

/// A zeroing whose persist failed still changes which write a commit may
/// call uploaded: a cut taken before it no longer marks its chunks clean
/// (that would bring the cut's bytes back where the guest read zeroes).
#[test]
fn ssd_a_zeroing_whose_persist_failed_outdates_the_cut() {
    let d = tempfile::tempdir().unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    install(&c, 1);
    c.persist().unwrap();
    {
        let _g = c.lock_write(0);
        c.write(0, 0, &IoVec::from_slice(&mut vec![7u8; CS as usize]), None).unwrap();
    }
    let cut = c.seq(0);
    *c.journal.lock() = None;
    std::os::unix::fs::symlink("/dev/full", d.path().join("state.tmp")).unwrap();
    {
        let _l = c.lock_many(0..2);
        assert!(c.zero_chunks(0..2).is_err());
    }
    assert_eq!(c.state(0), ZERO_DIRTY);
    assert!(!c.mark_clean(0, cut), "a commit of the cut before the zeroing cleaned the zeroed chunk");
    assert!(c.read_chunk(0).unwrap() == vec![0u8; CS as usize]);
}

/// The header line of the state file in `dir`.
fn header_of(dir: &Path) -> serde_json::Value {
    let raw = std::fs::read(dir.join("state")).unwrap();
    let nl = raw.iter().position(|&b| b == b'\n').unwrap();
    serde_json::from_slice(&raw[..nl]).unwrap()
}

/// A copy of the cache directory `from` at `to` (a new directory, its
/// files copied as `cp -a` would).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A restart keeps the cache's id, a rename keeps it, and a copy of the
/// directory (another inode) is another cache: a new id, the original's
/// noted, the changes kept. Looking at a copy changes nothing.
#[test]
fn a_copied_cache_directory_gets_an_id_of_its_own() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let (c, _) = SsdCache::open(&a, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    let a_id = c.cache_id().to_string();
    assert_eq!(c.copy_of(), None);
    {
        let _g = c.lock_write(1);
        let mut w = *b"pending!";
        c.write(1, 0, &IoVec::from_slice(&mut w), Some(&[0u8; 4096])).unwrap();
    }
    c.persist().unwrap();
    drop(c);
    let h = header_of(&a);
    assert_eq!(h["dir_inode"].as_u64(), Some(std::fs::metadata(&a).unwrap().ino()), "{h}");
    assert_eq!(h["machine"].as_str(), Some(place::machine_hash()), "{h}");
    // A restart (after a crash too: the state is what it reads) keeps it.
    let (c, _) = SsdCache::open(&a, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!((c.cache_id(), c.copy_of()), (a_id.as_str(), None));
    drop(c);
    // A copy: another cache, its changes kept.
    let b = d.path().join("b");
    copy_dir(&a, &b);
    // Looked at, it is not the original either, and stays as it was.
    let before = std::fs::read(b.join("state")).unwrap();
    let (c, _) = SsdCache::open(&b, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Inspect).unwrap().unwrap();
    assert_ne!(c.cache_id(), a_id);
    assert_eq!(c.copy_of(), Some(a_id.as_str()));
    drop(c);
    assert_eq!(std::fs::read(b.join("state")).unwrap(), before, "inspecting a copy changed its state");
    let (c, o) = SsdCache::open(&b, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!(o, Opened::Reused { cached: 1, dirty: 1 });
    let b_id = c.cache_id().to_string();
    assert!(b_id != a_id && b_id.len() == 32, "{b_id}");
    assert_eq!(c.copy_of(), Some(a_id.as_str()));
    assert_eq!(&read_at(&c, 1, 0, 8), b"pending!");
    drop(c);
    let h = header_of(&b);
    assert_eq!((h["cache_id"].as_str(), h["copy_of"].as_str()), (Some(b_id.as_str()), Some(a_id.as_str())));
    // The copy's restarts keep its new id; so does a rename.
    let b2 = d.path().join("b2");
    std::fs::rename(&b, &b2).unwrap();
    let (c, _) = SsdCache::open(&b2, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!((c.cache_id(), c.copy_of()), (b_id.as_str(), Some(a_id.as_str())));
    drop(c);
    // The original is still itself.
    let (c, _) = SsdCache::open(&a, id(1), 1, 4 * 4096, 1 << 20, OpenMode::Serve).unwrap().unwrap();
    assert_eq!((c.cache_id(), c.copy_of()), (a_id.as_str(), None));
    drop(c);
    // A damaged copy names no cache whose lease `discard-local` would
    // release: the id in it is the original's.
    let e = d.path().join("e");
    copy_dir(&a, &e);
    for dir in [&a, &e] {
        let mut s = std::fs::read(dir.join("state")).unwrap();
        let n = s.len();
        s[n - 1] ^= 1;
        std::fs::write(dir.join("state"), s).unwrap();
    }
    assert_eq!(remove_damaged(&e, &["state", "data"], false).unwrap().unwrap().cache_id, None);
    assert_eq!(remove_damaged(&a, &["state", "data"], false).unwrap().unwrap().cache_id, Some(a_id));
}

/// A state written before places were recorded keeps its id (an upgrade
/// is not a copy) and records the place at the next checkpoint; one
/// written on another machine is a copy.
#[test]
fn a_state_without_a_place_keeps_its_id_and_one_from_another_machine_does_not() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let cid = "ab".repeat(16);
    let hdr = |extra: &str| {
        format!(
            r#"{{"format":"driveblk-cache","version":5,"volume_id":"{}","chunk_size":{CS},"generation":3,"cache_id":"{cid}","image_len":{},"chunks":4,"partial":0,"checkpoint":1{extra}}}"#,
            "cd".repeat(16),
            4 * CS
        )
    };
    std::fs::write(d.path().join("data"), vec![3u8; 3 * CS as usize]).unwrap();
    std::fs::write(d.path().join("state"), state_file(&hdr(""), &[ABSENT, DIRTY, CLEAN, ABSENT], &[], true)).unwrap();
    let (c, o) = open64(d.path(), 4 * CS, 1 << 30);
    assert_eq!(o, Opened::Reused { cached: 2, dirty: 1 });
    assert_eq!((c.cache_id(), c.copy_of()), (cid.as_str(), None));
    drop(c);
    let h = header_of(d.path());
    assert_eq!(h["cache_id"].as_str(), Some(cid.as_str()));
    assert_eq!(h["dir_inode"].as_u64(), Some(std::fs::metadata(d.path()).unwrap().ino()));
    assert_eq!(h["version"].as_u64(), Some(PLAIN_VERSION as u64));
    // The same directory, written on another machine (a share): a copy.
    let ino = std::fs::metadata(d.path()).unwrap().ino();
    let elsewhere = hdr(&format!(r#","machine":"{}","dir_inode":{ino}"#, "00".repeat(16)));
    std::fs::write(d.path().join("state"), state_file(&elsewhere, &[ABSENT, DIRTY, CLEAN, ABSENT], &[], true)).unwrap();
    let (c, _) = open64(d.path(), 4 * CS, 1 << 30);
    assert_ne!(c.cache_id(), cid);
    assert_eq!(c.copy_of(), Some(cid.as_str()));
    drop(c);
    // A data key id is only for encrypted version 8 states.
    let bad = hdr(r#","key_id":"0123""#);
    std::fs::write(d.path().join("state"), state_file(&bad, &[ABSENT, DIRTY, CLEAN, ABSENT], &[], true)).unwrap();
    let e = SsdCache::open(d.path(), id64(), 1, 4 * CS, 1 << 30, OpenMode::Inspect).err().unwrap();
    assert!(e.to_string().contains("data key id"), "{e}");
}

/// A copy of an encrypted cache gets its own id, but its data file is
/// the original's ciphertext: it keeps the original's key (a version
/// older binaries refuse, as they would derive another).
#[test]
fn an_encrypted_copy_keeps_its_originals_data_key() {
    use crate::volume::crypto::VolumeKey;
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    let sealing = Sealing::Sealed(Arc::new(VolumeKey::generate()));
    let open =
        |dir: &Path, mode| SsdCache::open_sealed(dir, id64(), 1, 4 * CS, 1 << 30, mode, &sealing).unwrap().unwrap();
    let (c, _) = open(&a, OpenMode::Serve);
    install(&c, 0);
    let a_id = c.cache_id().to_string();
    {
        let _g = c.lock_write(2);
        let mut w = vec![5u8; CS as usize];
        c.write(2, 0, &IoVec::from_slice(&mut w), None).unwrap();
    }
    c.persist().unwrap();
    drop(c);
    let b = d.path().join("b");
    copy_dir(&a, &b);
    let (c, _) = open(&b, OpenMode::Serve);
    assert_ne!(c.cache_id(), a_id);
    assert_eq!(c.read_chunk(0).unwrap(), remote(0));
    assert_eq!(c.read_chunk(2).unwrap(), vec![5u8; CS as usize]);
    drop(c);
    let h = header_of(&b);
    assert_eq!((h["version"].as_u64(), h["key_id"].as_str()), (Some(8), Some(a_id.as_str())), "{h}");
    // Again, and a copy of the copy: still the first key.
    let (c, _) = open(&b, OpenMode::Inspect);
    assert_eq!(c.read_chunk(2).unwrap(), vec![5u8; CS as usize]);
    drop(c);
    let e = d.path().join("e");
    copy_dir(&b, &e);
    let (c, _) = open(&e, OpenMode::Serve);
    assert_eq!(c.read_chunk(0).unwrap(), remote(0));
    drop(c);
    assert_eq!(header_of(&e)["key_id"].as_str(), Some(a_id.as_str()));
    // The original writes the sealed version, without a key id.
    let (c, _) = open(&a, OpenMode::Serve);
    drop(c);
    assert_eq!(header_of(&a)["version"].as_u64(), Some(SEALED_VERSION as u64));
    assert!(header_of(&a).get("key_id").is_none());
}
