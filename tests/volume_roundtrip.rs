//! Import / attach / export round trips through the tiered store, with
//! qemu-img-made qcow2 sources: cold, hot, warm (SSD only) and restart
//! reads equal the source byte for byte; exports compare equal.

#[path = "tier_support/mod.rs"]
mod support;

use std::sync::Arc;

use driveblk::format::{IoMode, IoVec};
use driveblk::remote::{RemoteMetrics, Shaping};
use driveblk::tier::ExportOptions;
use driveblk::tier::Storage;
use driveblk::volume::{self, AttachOptions, ImportOptions, VolumeError};
use support::*;

fn import_opts() -> ImportOptions {
    ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() }
}

#[test]
fn import_then_read_cold_hot_warm_restart() {
    let d = tempfile::tempdir().unwrap();
    let (src, bytes) = qcow2_image(d.path(), 12 << 20, 1);
    let vurl = url(&d.path().join("remote/vm1"));
    let info = volume::import(&src, &vurl, &import_opts()).unwrap();
    assert_eq!(info.image_len, bytes.len() as u64);
    assert_eq!(info.generation, 1);
    assert_eq!(info.chunk_size, CS);
    assert!(info.chunks_packed > 0 && info.chunk_size * info.chunks_total >= info.image_len);
    assert_eq!(info.chunks_packed + info.chunks_zero, info.chunks_total);
    assert!(info.packs > 1, "1 MiB packs: several of them");
    assert_eq!(volume::info(&vurl).unwrap(), info);
    // Importing over an existing volume is refused.
    let e = volume::import(&src, &vurl, &import_opts()).unwrap_err();
    assert!(matches!(e, VolumeError::AlreadyExists { .. }), "{e}");

    let cache = d.path().join("cache");
    let m = Arc::new(RemoteMetrics::default());
    // Cold: empty cache; every packed chunk fetched exactly once.
    {
        let s = driveblk::tier::open_volume(&vurl, cache_opts(&cache, counted(m.clone(), None, Shaping::default())))
            .unwrap();
        assert_eq!(s.len(), bytes.len() as u64);
        // A non-blocking read of a cold chunk says WouldBlock (and starts
        // the fetch); the blocking retry gets the data.
        let first_packed = (0..info.chunks_total)
            .find(|&i| matches!(s.volume().chunk_ref(i), volume::ChunkRef::Packed { .. }))
            .unwrap();
        let mut b = vec![0u8; 4096];
        let off = first_packed * CS;
        let e = s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
        assert_eq!(&b[..], &bytes[off as usize..off as usize + 4096]);
        // Now in RAM: the non-blocking path completes inline.
        s.read_vectored_at(off, &IoVec::from_slice(&mut b), IoMode::NonBlocking).unwrap();

        assert!(read_all(&*s).unwrap() == bytes, "cold read differs");
        let st = s.stats();
        // Each chunk's bytes crossed the link once: whole, or as runs of
        // sub-frames (a miss's run, then the rest) that never overlap. The
        // packs' sub-frame indexes come on top, each at most once.
        assert_eq!(st.remote_bytes - st.bytes_index, packed_bytes(s.volume()), "{st:?}");
        assert!(st.bytes_index <= index_bytes(s.volume()), "{st:?}");
        assert!(st.misses > 0);
        assert_eq!(st.zero_hits > 0, info.chunks_zero > 0);
        assert_eq!(st.chunks_cached, info.chunks_packed);
        // Hot: same store again, nothing fetched.
        assert!(read_all(&*s).unwrap() == bytes, "hot read differs");
        let st2 = s.stats();
        assert_eq!(st2.remote_fetches, st.remote_fetches);
        assert!(st2.ram_hits > st.ram_hits);
    }
    // Warm: new store, RAM off, all from SSD with no remote reads.
    {
        let mut o = cache_opts(&cache, counted(m.clone(), None, Shaping::default()));
        o.ram_cache = 0;
        let s = driveblk::tier::open_volume(&vurl, o).unwrap();
        assert!(matches!(s.cache_opened(), driveblk::tier::ssd::Opened::Reused { .. }), "{:?}", s.cache_opened());
        let gets = m.snapshot().gets;
        assert!(read_all(&*s).unwrap() == bytes, "warm read differs");
        assert_eq!(m.snapshot().gets, gets, "warm read went remote");
        let st = s.stats();
        assert_eq!((st.remote_fetches, st.ram_hits), (0, 0));
        assert!(st.ssd_hits > 0);
    }
    // Restart with RAM: same answer.
    let s =
        driveblk::tier::open_volume(&vurl, cache_opts(&cache, counted(m.clone(), None, Shaping::default()))).unwrap();
    assert!(read_all(&*s).unwrap() == bytes, "read after restart differs");
    assert_eq!(s.stats().remote_fetches, 0);
    drop(s);

    // Export equals the source, with and without the cache directory.
    let out = d.path().join("out.qcow2");
    let sum = driveblk::tier::export(&vurl, &out, &ExportOptions::default()).unwrap();
    assert_eq!(sum.chunks_from_remote, info.chunks_packed);
    assert!(std::fs::read(&out).unwrap() == bytes);
    assert!(qemu_compare("qcow2", &src, &out));
    let out2 = d.path().join("out2.qcow2");
    let sum =
        driveblk::tier::export(&vurl, &out2, &ExportOptions { cache_dir: Some(cache.clone()), ..Default::default() })
            .unwrap();
    assert_eq!((sum.chunks_from_remote, sum.dirty_chunks), (0, 0));
    assert!(qemu_compare("qcow2", &src, &out2));
}

#[test]
fn attach_serves_base_file_without_upload() {
    let d = tempfile::tempdir().unwrap();
    let drive = d.path().join("drive");
    std::fs::create_dir_all(&drive).unwrap();
    let (src, bytes) = qcow2_image(d.path(), 5 << 20, 2);
    let base = drive.join("win10.qcow2");
    std::fs::copy(&src, &base).unwrap();
    let vurl = url(&drive.join("win10-vol"));
    let info = volume::attach(&url(&base), &vurl, &AttachOptions { chunk_size: CS, ..Default::default() }).unwrap();
    assert_eq!(info.image_len, bytes.len() as u64);
    assert_eq!(info.chunks_base, info.chunks_total);
    assert_eq!(info.packs, 0);
    let mut names: Vec<String> = std::fs::read_dir(drive.join("win10-vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["README.txt".to_string(), "gen-00000000000000000001".to_string(), "volume.json".to_string()],
        "nothing but metadata (and the folder's README) uploaded"
    );

    let m = Arc::new(RemoteMetrics::default());
    // Read-only: a writable store would take the writer lease (a put).
    let mut o = cache_opts(&d.path().join("c"), counted(m.clone(), None, Shaping::default()));
    o.read_only = true;
    let s = driveblk::tier::open_volume(&vurl, o).unwrap();
    assert!(read_all(&*s).unwrap() == bytes);
    assert_eq!(m.snapshot().puts, 0);
    drop(s);
    let out = d.path().join("out.qcow2");
    driveblk::tier::export(&vurl, &out, &ExportOptions::default()).unwrap();
    assert!(qemu_compare("qcow2", &base, &out));

    // A base that changes under the volume is refused, not silently served.
    std::fs::OpenOptions::new().append(true).open(&base).unwrap().set_len(bytes.len() as u64 + 512).unwrap();
    let e = volume::info(&vurl).unwrap_err();
    assert!(matches!(e, VolumeError::BaseChanged { .. }), "{e}");
}

/// `adopt` on a `dir:` volume: the base is copied into the volume folder
/// (through this host: no server-side copy on a folder), a generation names
/// the copy, and the volume reads the same bytes after the original is gone.
#[test]
fn adopted_dir_base_outlives_the_original() {
    let d = tempfile::tempdir().unwrap();
    let drive = d.path().join("drive");
    std::fs::create_dir_all(&drive).unwrap();
    let (src, _) = qcow2_image(d.path(), 3 << 20, 3);
    let base = drive.join("base.qcow2");
    std::fs::copy(&src, &base).unwrap();
    let vurl = url(&drive.join("vol"));
    volume::attach(&url(&base), &vurl, &AttachOptions { chunk_size: CS, ..Default::default() }).unwrap();
    let info = volume::adopt(&vurl, &Default::default()).unwrap();
    assert_eq!(info.generation, 2);
    assert!(drive.join("vol/base-00000000000000000002").exists());
    std::fs::remove_file(&base).unwrap();
    let out = d.path().join("out.qcow2");
    driveblk::tier::export(&vurl, &out, &ExportOptions::default()).unwrap();
    assert!(qemu_compare("qcow2", &src, &out));
    // A fork reads the base from the origin's copy, not its own folder.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let furl = url(&drive.join("fork"));
    rt.block_on(async {
        let opts = volume::RemoteOptions::default();
        let origin =
            volume::VolumeReader::open(&driveblk::remote::RemoteUrl::parse(&vurl).unwrap(), &opts).await.unwrap();
        let from = (*origin.manifest()).clone();
        let fork_url = driveblk::remote::RemoteUrl::parse(&furl).unwrap();
        volume::fork::create_fork(&origin, &from, &fork_url, &opts, "test").await.unwrap();
    });
    assert!(!drive.join("fork/base-00000000000000000002").exists(), "nothing is copied");
    let out = d.path().join("fork.qcow2");
    driveblk::tier::export(&furl, &out, &ExportOptions::default()).unwrap();
    assert!(qemu_compare("qcow2", &src, &out), "the fork of an adopted volume reads back equal");
    // Whoever can write the folder swaps the copy for a link to a host
    // file of the same size: not read (base chunks carry no digest).
    let copy = drive.join("vol/base-00000000000000000002");
    let secret = d.path().join("secret");
    std::fs::write(&secret, vec![b'S'; std::fs::metadata(&copy).unwrap().len() as usize]).unwrap();
    std::fs::remove_file(&copy).unwrap();
    std::os::unix::fs::symlink(&secret, &copy).unwrap();
    let out = d.path().join("swapped.qcow2");
    let e = driveblk::tier::export(&vurl, &out, &ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
}

#[test]
fn missing_volume_error_says_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let e = volume::info(&url(&d.path().join("nothing"))).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("no volume at dir:") && msg.contains("driveblk import"), "{msg}");
    let e = volume::info("http://x/y").unwrap_err();
    assert!(e.to_string().contains("expected dir:/path/NAME"), "{e}");
}

#[test]
fn raw_image_with_odd_length_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let len = (3 << 20) + 12345;
    let (src, bytes) = raw_image(d.path(), "odd.raw", len, 9);
    let vurl = url(&d.path().join("r/odd"));
    let info = volume::import(&src, &vurl, &import_opts()).unwrap();
    assert_eq!(info.image_len, len as u64);
    let s = driveblk::tier::open_volume(&vurl, cache_opts(&d.path().join("c"), Default::default())).unwrap();
    assert!(read_all(&*s).unwrap() == bytes);
    // Past the end reads zeroes.
    let mut b = vec![1u8; 100];
    s.read_vectored_at(len as u64 - 50, &IoVec::from_slice(&mut b), IoMode::Blocking).unwrap();
    assert_eq!(&b[..50], &bytes[len - 50..]);
    assert!(b[50..].iter().all(|&x| x == 0));
    drop(s);
    let out = d.path().join("out.raw");
    driveblk::tier::export(&vurl, &out, &ExportOptions::default()).unwrap();
    assert!(std::fs::read(&out).unwrap() == bytes);
}
