//! The SSD cache's state journal: changes to the chunk map appended as
//! checksummed records after the last checkpoint (the `state` file), so a
//! flush that changed a few chunks costs one small append and one fsync,
//! not a rewrite of the whole map. Records name the checkpoint they follow;
//! replay stops at the first record that is torn or does not verify (a
//! record is only acknowledged once its fsync returned, so a torn one never
//! was).
//!
//! A write the guest sees complete changes the map before its FLUSH
//! persists it; a crash of the process in between must not lose it (the
//! next process would acknowledge that FLUSH without it). So such a write
//! also appends a *volatile* record, without an fsync, naming the kernel's
//! boot id: the page cache holds it and the data written before it as long
//! as the host runs, so it is replayed only on the same boot (a host crash
//! may have kept the record but not the data; the guest's unflushed writes
//! may be lost then, as on any disk with a write cache). A volatile record
//! is the last word on its chunk until a later record names the chunk, so
//! the next persist names every chunk one named, even one whose state is
//! back to what the checkpoint says.
//!
//! A record may also carry guest writes (bytes at an offset of the data
//! file): a write-ahead log for the writes that would otherwise need a
//! second sync (ssd.rs, "logged chunks"). Replay hands them back in order
//! to be written again; they go under their own magic, so a binary that
//! predates them does not misread one (the state's version refuses it
//! first). A whole record of a kind this binary does not know is an
//! error, not the end of the replay: the records after it would be lost.
//!
//! The file is written with zeroes ahead of the records (preallocated,
//! overwritten in place): an fdatasync of a record then changes no file
//! size or extent, so it costs a data write, not a filesystem journal
//! commit. A checkpoint starts the records over at offset 0 without
//! truncating; what follows the last record (zeroes, records naming an
//! older checkpoint) stops the replay.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"DBJ1";
/// A volatile record: its payload starts with the boot id it was written in.
const MAGIC_VOLATILE: &[u8; 4] = b"DBJV";
/// A record carrying guest writes after its map changes.
const MAGIC_WRITES: &[u8; 4] = b"DBJ2";
const BOOT: usize = 36;
/// Magic, checkpoint id, payload length.
const HEAD: usize = 4 + 8 + 4;
const SUM: usize = 32;
/// Largest payload accepted on replay (a record for every chunk of a huge
/// image with bitmaps stays far below this).
const MAX_PAYLOAD: usize = 256 << 20;
/// The file is extended with zeroes in steps of at least this many bytes,
const PREALLOC: u64 = 1 << 20;
/// and of at most this many: a step is as long as the file already is, so
/// a new cache's journal filling with tens of MiB of logged writes pays a
/// handful of slower syncs (each extension's fdatasync also writes its
/// zeroes and the new size), not one every 250 small writes.
const PREALLOC_MAX_STEP: u64 = 8 << 20;

/// One chunk's new entry in the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub idx: u64,
    pub state: u8,
    /// The page bitmap, for states that keep one.
    pub bitmap: Option<Box<[u64]>>,
}

/// Guest bytes written at `at` in the data file, carried by a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub at: u64,
    pub bytes: Vec<u8>,
}

/// The map changes of one persist, and the writes logged with them. A
/// record with writes and no changes changes no map field on replay (its
/// generation and image length are not read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub image_len: u64,
    pub changes: Vec<Change>,
    pub writes: Vec<Logged>,
}

impl Record {
    fn encode(&self, words: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(20 + self.changes.len() * 10);
        p.extend_from_slice(&self.generation.to_le_bytes());
        p.extend_from_slice(&self.image_len.to_le_bytes());
        p.extend_from_slice(&(self.changes.len() as u32).to_le_bytes());
        for c in &self.changes {
            p.extend_from_slice(&c.idx.to_le_bytes());
            p.push(c.state);
            match &c.bitmap {
                Some(m) => {
                    p.push(1);
                    for w in m.iter().chain(std::iter::repeat(&0)).take(words) {
                        p.extend_from_slice(&w.to_le_bytes());
                    }
                }
                None => p.push(0),
            }
        }
        if !self.writes.is_empty() {
            p.extend_from_slice(&(self.writes.len() as u32).to_le_bytes());
            for w in &self.writes {
                p.extend_from_slice(&w.at.to_le_bytes());
                p.extend_from_slice(&(w.bytes.len() as u32).to_le_bytes());
                p.extend_from_slice(&w.bytes);
            }
        }
        p
    }

    fn decode(p: &[u8], words: usize, with_writes: bool) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = p.get(at..at.checked_add(n)?)?;
            at += n;
            Some(s)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let generation = u64_of(take(8)?);
        let image_len = u64_of(take(8)?);
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        // Each change takes at least 10 bytes: bound n before allocating.
        if n > p.len() / 10 {
            return None;
        }
        let mut changes = Vec::with_capacity(n);
        for _ in 0..n {
            let idx = u64_of(take(8)?);
            let state = take(1)?[0];
            let bitmap = match take(1)?[0] {
                0 => None,
                1 => Some((0..words).map(|_| take(8).map(u64_of)).collect::<Option<Box<[u64]>>>()?),
                _ => return None,
            };
            changes.push(Change { idx, state, bitmap });
        }
        let mut writes = Vec::new();
        if with_writes {
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            // Each write takes at least 12 bytes: bound n before allocating.
            if n == 0 || n > p.len() / 12 {
                return None;
            }
            writes.reserve(n);
            for _ in 0..n {
                let at = u64_of(take(8)?);
                let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                writes.push(Logged { at, bytes: take(len)?.to_vec() });
            }
        }
        (at == p.len()).then_some(Record { generation, image_len, changes, writes })
    }
}

/// The journal file of one cache directory.
pub struct Journal {
    file: File,
    path: PathBuf,
    checkpoint: u64,
    len: u64,
    /// Bytes of the file written (records or zeroes): appends below this
    /// allocate nothing.
    alloc: u64,
    words: usize,
    boot: Option<[u8; BOOT]>,
    /// Records appended since the last fdatasync.
    unsynced: bool,
}

/// This boot of the kernel (None where it cannot be told: then no volatile
/// record is written, nor trusted).
fn boot_id() -> Option<[u8; BOOT]> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| <[u8; BOOT]>::try_from(s.trim().as_bytes()).ok());
    if id.is_none() {
        // Said once: the promise it weakens is the README's.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "cannot read this boot's id (/proc/sys/kernel/random/boot_id): writes completed but not yet \
                 flushed are not kept across a daemon crash (a FLUSH still makes them durable)"
            )
        });
    }
    id
}

impl Journal {
    /// Opens (creating) `dir/journal` for appending after checkpoint
    /// `checkpoint`; what it held before is kept until [`reset`](Self::reset).
    pub fn open(dir: &Path, checkpoint: u64, words: usize) -> io::Result<Self> {
        let path = dir.join("journal");
        let existed = path.exists();
        let file = crate::remote::private::options().create(true).truncate(false).read(true).write(true).open(&path)?;
        if !existed {
            // The name must survive a crash before the first record does.
            File::open(dir)?.sync_all()?;
        }
        let len = file.metadata()?.len();
        Ok(Self { file, path, checkpoint, len, alloc: len, words, boot: boot_id(), unsynced: false })
    }

    /// Bytes of records in the journal (the file may be longer).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the journal holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `rec` and makes it durable. An error here must be treated
    /// as a failed fsync (the record may or may not be there).
    pub fn append(&mut self, rec: &Record) -> io::Result<()> {
        self.append_unsynced(rec)?;
        self.sync()
    }

    /// Appends `rec` without an fdatasync: a later [`sync`](Self::sync)
    /// (or [`append`](Self::append)) makes it durable. Until then it is in
    /// the page cache: a crash of the process keeps it, a crash of the
    /// host may keep it, tear it (the replay stops there) or lose it.
    pub fn append_unsynced(&mut self, rec: &Record) -> io::Result<()> {
        let magic = if rec.writes.is_empty() { MAGIC } else { MAGIC_WRITES };
        let buf = self.frame(magic, &[], rec);
        self.extend(self.len + buf.len() as u64)?;
        self.file.write_all_at(&buf, self.len)?;
        self.len += buf.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Makes every record appended so far durable (nothing to do when
    /// they are). An error must be treated as a failed fsync.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// True while records appended are not yet durable.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Appends `rec` as a volatile record (no fsync; see the module doc),
    /// trusted on replay only during this boot. A failed append leaves
    /// nothing the next append does not overwrite.
    pub fn append_volatile(&mut self, rec: &Record) -> io::Result<()> {
        let Some(boot) = self.boot else { return Ok(()) };
        let buf = self.frame(MAGIC_VOLATILE, &boot, rec);
        self.extend(self.len + buf.len() as u64)?;
        self.file.write_all_at(&buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Writes zeroes up to at least `need` bytes (the next fdatasync makes
    /// them durable with the size).
    fn extend(&mut self, need: u64) -> io::Result<()> {
        if need <= self.alloc {
            return Ok(());
        }
        let step = self.alloc.clamp(PREALLOC, PREALLOC_MAX_STEP);
        let end = need.max(self.alloc + step).next_multiple_of(PREALLOC);
        self.file.write_all_at(&vec![0u8; (end - self.alloc) as usize], self.alloc)?;
        self.alloc = end;
        Ok(())
    }

    fn frame(&self, magic: &[u8; 4], prefix: &[u8], rec: &Record) -> Vec<u8> {
        let payload = rec.encode(self.words);
        let mut buf = Vec::with_capacity(HEAD + prefix.len() + payload.len() + SUM);
        buf.extend_from_slice(magic);
        buf.extend_from_slice(&self.checkpoint.to_le_bytes());
        buf.extend_from_slice(&((prefix.len() + payload.len()) as u32).to_le_bytes());
        buf.extend_from_slice(prefix);
        buf.extend_from_slice(&payload);
        let sum = Sha256::digest(&buf);
        buf.extend_from_slice(&sum);
        buf
    }

    /// Starts over after checkpoint `checkpoint` was written: records are
    /// overwritten from offset 0 (the old ones name the old checkpoint, so
    /// they are ignored, synced or not). The first step of zeroes is made
    /// durable now, so the appends that follow change no file size.
    pub fn reset(&mut self, checkpoint: u64) -> io::Result<()> {
        self.len = 0;
        self.checkpoint = checkpoint;
        self.unsynced = false;
        if self.alloc < PREALLOC {
            self.extend(PREALLOC)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// The records of `dir/journal` that follow checkpoint `checkpoint`, in
    /// order, up to the first that is torn or does not verify; volatile
    /// records of another boot are skipped. A record that verifies but is
    /// of a kind this binary does not know (a newer driveblk's), or does
    /// not decode, is an error: the records after it would be dropped.
    pub fn replay(dir: &Path, checkpoint: u64, words: usize) -> Result<Vec<Record>, String> {
        Self::replay_on(dir, checkpoint, words, boot_id())
    }

    /// [`replay`](Self::replay) as after a reboot: durable records only.
    #[cfg(test)]
    pub fn replay_durable(dir: &Path, checkpoint: u64, words: usize) -> Result<Vec<Record>, String> {
        Self::replay_on(dir, checkpoint, words, None)
    }

    fn replay_on(dir: &Path, checkpoint: u64, words: usize, boot: Option<[u8; BOOT]>) -> Result<Vec<Record>, String> {
        let mut bytes = Vec::new();
        match File::open(dir.join("journal")) {
            Ok(mut f) => {
                if f.read_to_end(&mut bytes).is_err() {
                    return Ok(Vec::new());
                }
            }
            Err(_) => return Ok(Vec::new()),
        }
        let mut out = Vec::new();
        let mut at = 0usize;
        while bytes.len() - at >= HEAD + SUM {
            let head = &bytes[at..at + HEAD];
            let volatile = &head[..4] == MAGIC_VOLATILE;
            let with_writes = &head[..4] == MAGIC_WRITES;
            let known = &head[..4] == MAGIC || volatile || with_writes;
            if u64::from_le_bytes(head[4..12].try_into().expect("8 bytes")) != checkpoint {
                break;
            }
            let n = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
            if n > MAX_PAYLOAD || bytes.len() - at < HEAD + n + SUM {
                break;
            }
            let body = &bytes[at..at + HEAD + n];
            if Sha256::digest(body).as_slice() != &bytes[at + HEAD + n..at + HEAD + n + SUM] {
                break;
            }
            // Checksummed and naming this checkpoint: written whole, for
            // this state. Not understanding it must not end the replay
            // quietly (the changes after it would be lost).
            let unusable = |what: &str| {
                format!(
                    "journal record at offset {at} is {what} (written by a newer driveblk, or damaged); the \
                     records after it cannot be replayed"
                )
            };
            if !known {
                return Err(unusable(&format!("of an unknown kind {:?}", String::from_utf8_lossy(&head[..4]))));
            }
            let mut payload = &body[HEAD..];
            if volatile {
                if payload.len() < BOOT {
                    return Err(unusable("too short for a volatile record"));
                }
                let this_boot = boot.is_some_and(|b| payload[..BOOT] == b);
                payload = &payload[BOOT..];
                if !this_boot {
                    // The host restarted since: its data may be gone.
                    at += HEAD + n + SUM;
                    continue;
                }
            }
            match Record::decode(payload, words, with_writes) {
                Some(r) => out.push(r),
                None => return Err(unusable("not laid out as this driveblk reads it")),
            }
            at += HEAD + n + SUM;
        }
        Ok(out)
    }

    /// The journal's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn rec(g: u64, idx: u64, state: u8, bits: Option<u64>) -> Record {
        Record {
            generation: g,
            image_len: 1 << 20,
            changes: vec![Change { idx, state, bitmap: bits.map(|b| vec![b, 0].into_boxed_slice()) }],
            writes: Vec::new(),
        }
    }

    #[test]
    fn records_replay_in_order_and_a_torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 7, 2).unwrap();
        let (a, b, c) = (rec(1, 3, 2, None), rec(1, 4, 3, Some(0b101)), rec(2, 3, 1, None));
        j.append(&a).unwrap();
        j.append(&b).unwrap();
        j.append(&c).unwrap();
        assert_eq!(Journal::replay(d.path(), 7, 2).unwrap(), vec![a.clone(), b.clone(), c.clone()]);
        // Another checkpoint's journal is not this one's.
        assert!(Journal::replay(d.path(), 8, 2).unwrap().is_empty());
        // A torn last record (a crash mid-append) is dropped, the rest kept.
        let f = OpenOptions::new().write(true).open(d.path().join("journal")).unwrap();
        f.write_all_at(&[0u8; 5], j.len() - 5).unwrap();
        assert_eq!(Journal::replay(d.path(), 7, 2).unwrap(), vec![a.clone(), b.clone()]);
        // A flipped bit stops the replay there.
        let mut bytes = std::fs::read(d.path().join("journal")).unwrap();
        bytes[HEAD + 2] ^= 1;
        std::fs::write(d.path().join("journal"), &bytes).unwrap();
        assert!(Journal::replay(d.path(), 7, 2).unwrap().is_empty());
        // Reset starts over for a new checkpoint.
        let mut j = Journal::open(d.path(), 7, 2).unwrap();
        j.reset(9).unwrap();
        j.append(&c).unwrap();
        assert_eq!(Journal::replay(d.path(), 9, 2).unwrap(), vec![c]);
    }

    #[test]
    fn a_whole_record_of_an_unknown_kind_is_an_error_not_the_end() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 7, 2).unwrap();
        let (a, b) = (rec(1, 3, 2, None), rec(1, 4, 2, None));
        j.append(&a).unwrap();
        // A newer driveblk's kind of record, checksummed, for this
        // checkpoint, then one this binary knows.
        let f = OpenOptions::new().write(true).open(d.path().join("journal")).unwrap();
        let unknown = j.frame(b"DBJ9", &[], &b);
        f.write_all_at(&unknown, j.len()).unwrap();
        let known = j.frame(MAGIC, &[], &b);
        f.write_all_at(&known, j.len() + unknown.len() as u64).unwrap();
        let e = Journal::replay(d.path(), 7, 2).unwrap_err();
        assert!(e.contains("unknown kind \"DBJ9\"") && e.contains("newer driveblk"), "{e}");
        // A checksummed record of a known kind that does not decode, too.
        let mut bad = j.frame(MAGIC, &[], &b);
        bad.truncate(HEAD);
        bad.extend_from_slice(&[1, 2, 3]);
        bad[12..16].copy_from_slice(&3u32.to_le_bytes());
        let sum = Sha256::digest(&bad);
        bad.extend_from_slice(&sum);
        f.write_all_at(&bad, j.len()).unwrap();
        let e = Journal::replay(d.path(), 7, 2).unwrap_err();
        assert!(e.contains("not laid out"), "{e}");
    }

    /// A journal in a new directory, started over after `checkpoint`.
    fn reset_journal(checkpoint: u64) -> (tempfile::TempDir, Journal) {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 0, 2).unwrap();
        j.reset(checkpoint).unwrap();
        (d, j)
    }

    fn file_len(d: &tempfile::TempDir) -> u64 {
        std::fs::metadata(d.path().join("journal")).unwrap().len()
    }

    /// Appends after a checkpoint change no file size (their fdatasync is a
    /// data write, not a filesystem metadata commit), and a checkpoint
    /// overwrites the old records in place rather than truncating.
    #[test]
    fn appends_overwrite_preallocated_zeroes() {
        let (d, mut j) = reset_journal(5);
        let size = || file_len(&d);
        assert_eq!(size(), PREALLOC);
        let recs: Vec<Record> = (0..50).map(|i| rec(1, i, 2, None)).collect();
        for r in &recs {
            j.append(r).unwrap();
        }
        assert_eq!(size(), PREALLOC, "an append grew the file");
        assert_eq!(Journal::replay(d.path(), 5, 2).unwrap(), recs);
        j.reset(6).unwrap();
        j.append(&recs[0]).unwrap();
        assert_eq!(size(), PREALLOC);
        assert_eq!(
            Journal::replay(d.path(), 6, 2).unwrap(),
            vec![recs[0].clone()],
            "older records after the new ones were replayed"
        );
        assert!(Journal::replay(d.path(), 5, 2).unwrap().is_empty());
    }

    /// A journal that fills with logged writes grows in doubling steps (up
    /// to PREALLOC_MAX_STEP): few extensions, each one a slower sync.
    #[test]
    fn a_growing_journal_extends_in_doubling_steps() {
        let (d, mut j) = reset_journal(1);
        let size = || file_len(&d);
        let mut r = rec(1, 1, 2, None);
        r.writes = vec![Logged { at: 0, bytes: vec![5; 4096] }];
        let (mut sizes, mut appended) = (vec![size()], 0);
        while j.len() < 32 << 20 {
            j.append_unsynced(&r).unwrap();
            appended += 1;
            if size() != *sizes.last().unwrap() {
                sizes.push(size());
            }
        }
        j.sync().unwrap();
        let mib = |n: u64| n << 20;
        assert_eq!(sizes, [1, 2, 4, 8, 16, 24, 32, 40].map(mib), "sizes the journal grew through");
        assert_eq!(Journal::replay(d.path(), 1, 2).unwrap().len(), appended);
    }

    #[test]
    fn volatile_records_replay_on_the_same_boot_only() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 7, 2).unwrap();
        j.boot = Some([b'a'; BOOT]);
        let (a, b, c) = (rec(1, 3, 2, None), rec(1, 4, 4, Some(0b1)), rec(1, 4, 4, Some(0b11)));
        j.append(&a).unwrap();
        j.append_volatile(&b).unwrap();
        j.append(&c).unwrap();
        let on = |boot| Journal::replay_on(d.path(), 7, 2, boot).unwrap();
        assert_eq!(on(Some([b'a'; BOOT])), vec![a.clone(), b, c.clone()]);
        // After a reboot the volatile record is skipped, the later ones kept.
        assert_eq!(on(Some([b'b'; BOOT])), vec![a.clone(), c.clone()]);
        assert_eq!(on(None), vec![a, c]);
    }

    #[test]
    fn records_carry_writes_and_unsynced_ones_replay_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path(), 3, 2).unwrap();
        let mut a = rec(1, 3, 2, None);
        a.writes = vec![Logged { at: 4096, bytes: vec![7; 4096] }, Logged { at: 9, bytes: vec![1, 2, 3] }];
        let b = Record {
            generation: 1,
            image_len: 1 << 20,
            changes: Vec::new(),
            writes: vec![Logged { at: 0, bytes: vec![9; 512] }],
        };
        let c = rec(1, 4, 2, None);
        j.append(&a).unwrap();
        assert!(!j.is_unsynced());
        j.append_unsynced(&b).unwrap();
        assert!(j.is_unsynced());
        j.append_unsynced(&c).unwrap();
        assert_eq!(Journal::replay_durable(d.path(), 3, 2).unwrap(), vec![a.clone(), b.clone(), c.clone()]);
        j.sync().unwrap();
        assert!(!j.is_unsynced());
        // A torn write-carrying record ends the replay.
        let f = OpenOptions::new().write(true).open(d.path().join("journal")).unwrap();
        let at_c = j.len() - (HEAD + c.encode(2).len() + SUM) as u64;
        f.write_all_at(&[0xff; 3], at_c - 40).unwrap();
        assert_eq!(Journal::replay(d.path(), 3, 2).unwrap(), vec![a]);
    }
}
