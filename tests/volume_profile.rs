//! Boot profiles against a real `dir:` volume: a profile built from an
//! imported image's bytes streams back exactly those bytes, segment by
//! segment; corruption of the pack or of an index is caught and contained.

use std::path::Path;
use std::sync::Arc;

use driveblk::remote::RemoteUrl;
use driveblk::volume::profile::{
    fetch_segment, find_latest, Extent, ProfileBuilder, ProfileIndex, PACK_SUFFIX, PROFILE_PREFIX, SEGMENT_BYTES,
};
use driveblk::volume::{self, ImportOptions, RemoteOptions, VolumeError, VolumeReader};
use rand::{Rng, SeedableRng};

const CS: u64 = 64 << 10;
/// Chunk 10 of the image is all zeroes (a Zero chunk after import).
const ZERO_CHUNK: u64 = 10;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Imports an image of random bytes (8 MiB + 3000, so the tail is short of
/// a page) with one zero chunk; returns the volume URL and the image bytes.
fn random_volume(dir: &Path) -> (String, Vec<u8>) {
    let len = (8 << 20) + 3000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    data[(ZERO_CHUNK * CS) as usize..((ZERO_CHUNK + 1) * CS) as usize].fill(0);
    let src = dir.join("src.raw");
    std::fs::write(&src, &data).unwrap();
    let url = format!("dir:{}", dir.join("remote/vm").display());
    let opts = ImportOptions { chunk_size: CS, pack_size: 1 << 20, ..Default::default() };
    volume::import(&src, &url, &opts).unwrap();
    (url, data)
}

fn open(rt: &tokio::runtime::Runtime, url: &str) -> Arc<VolumeReader> {
    rt.block_on(VolumeReader::open(&RemoteUrl::parse(url).unwrap(), &RemoteOptions::default())).unwrap()
}

/// `adds` merged where adjacent: the extents a profile must list.
fn merged(adds: &[(u64, u64)]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &(offset, len) in adds {
        match out.last_mut() {
            Some(l) if l.offset + l.len == offset => l.len += len,
            _ => out.push(Extent { offset, len }),
        }
    }
    out
}

fn bytes_at(img: &[u8], e: &Extent) -> Vec<u8> {
    img[e.offset as usize..(e.offset + e.len) as usize].to_vec()
}

/// Flips one byte of an object file in the volume folder.
fn flip(folder: &Path, key: &str, at: u64) {
    let p = folder.join(key);
    let mut b = std::fs::read(&p).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(&p, b).unwrap();
}

#[test]
fn profile_roundtrip_corruption_and_newest() {
    let d = tempfile::tempdir().unwrap();
    let (url, img) = random_volume(d.path());
    let folder = d.path().join("remote/vm");
    let cache = d.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let rt = rt();
    let vol = open(&rt, &url);
    let image_len = img.len() as u64;
    assert!(matches!(vol.chunk_ref(ZERO_CHUNK), volume::ChunkRef::Zero));

    // First-touch order, as a recorder would see it.
    let mut adds: Vec<(u64, u64)> = vec![(0, 4096), (4096, 4096), (8192, 4096)];
    adds.extend((0..100).map(|i| ((1 << 20) + i * 8192, 4096)));
    adds.extend((0..8).map(|i| ((3 << 20) + i * CS, CS)));
    adds.push((5 << 20, 3 * SEGMENT_BYTES / 2));
    adds.push((200 << 10, 4096));
    adds.push((image_len - 3000, 3000));
    let mut b = ProfileBuilder::new(&cache, &vol).unwrap();
    for &(o, l) in &adds {
        b.add(o, &img[o as usize..(o + l) as usize]).unwrap();
    }
    // A page of a zero chunk is refused and changes nothing.
    let raw = b.raw_bytes();
    let e = b.add(ZERO_CHUNK * CS + 4096, &[0u8; 4096]).unwrap_err();
    assert!(matches!(&e, VolumeError::Unusable(s) if s.contains("chunk 10")), "{e}");
    assert_eq!(b.raw_bytes(), raw);
    let total: u64 = adds.iter().map(|a| a.1).sum();
    assert_eq!(raw, total);
    assert!(total > 2 << 20);
    let key1 = rt.block_on(b.upload(&vol.remote)).unwrap().unwrap();
    assert!(std::fs::read_dir(&cache).unwrap().next().is_none(), "temp pack left behind");

    let (k, p) = rt.block_on(find_latest(&vol.remote, &vol.header)).unwrap().unwrap();
    assert_eq!(k, key1);
    assert_eq!(p.pack, format!("{key1}{PACK_SUFFIX}"));
    assert_eq!((p.generation, p.image_len, p.chunk_size, p.page_size), (1, image_len, CS, 4096));
    assert_eq!(p.raw_bytes(), total);
    assert!(p.segments.len() >= 3, "{} segments", p.segments.len());
    assert!(!p.chunk_refs.contains_key(&ZERO_CHUNK));
    assert_eq!(p.chunk_refs[&0], volume::profile::ref_digest(&vol.chunk_ref(0)).unwrap());
    // Adjacent adds merged; the 1.5 MiB extent split across segments.
    assert_eq!(p.segments[0].extents[0], Extent { offset: 0, len: 12288 });
    let all: Vec<(u64, u64)> = p.segments.iter().flat_map(|s| s.extents.iter().map(|e| (e.offset, e.len))).collect();
    assert_eq!(merged(&all), merged(&adds));
    let split = p.segments.windows(2).any(|w| {
        let (a, b) = (w[0].extents.last().unwrap(), w[1].extents[0]);
        a.offset + a.len == b.offset && b.offset > 5 << 20 && b.offset < (5 << 20) + 3 * SEGMENT_BYTES / 2
    });
    assert!(split, "the long extent was not split: {:?}", p.segments.iter().map(|s| &s.extents).collect::<Vec<_>>());

    // Every segment decodes to exactly the image's bytes at its extents.
    let mut streamed = Vec::new();
    for (i, s) in p.segments.iter().enumerate() {
        let got = rt.block_on(fetch_segment(&vol.remote, &url, &p, i)).unwrap();
        let want: Vec<u8> = s.extents.iter().flat_map(|e| bytes_at(&img, e)).collect();
        assert!(got[..] == want[..], "segment {i} differs");
        streamed.extend_from_slice(&got);
    }
    let want: Vec<u8> = merged(&adds).iter().flat_map(|e| bytes_at(&img, e)).collect();
    assert!(streamed == want, "streamed profile differs from the image");

    // Validation against this volume's header.
    let reject = |f: &dyn Fn(&mut ProfileIndex), want: &str| {
        let mut q = p.clone();
        f(&mut q);
        let e = ProfileIndex::from_bytes(&q.to_bytes(), &vol.header).unwrap_err();
        assert!(e.contains(want), "{e:?} does not contain {want:?}");
    };
    assert_eq!(ProfileIndex::from_bytes(&p.to_bytes(), &vol.header).unwrap(), p);
    reject(&|q| q.volume_id = "f".repeat(32), "belongs to volume");
    reject(&|q| q.segments[1].extents[0].offset += 512, "not a multiple of 4096");
    reject(&|q| q.segments[0].extents[0].offset = image_len.next_multiple_of(4096), "past the image end");
    reject(&|q| q.segments[0].raw_len += 4096, "differs from the extents' total");
    reject(&|q| drop(q.chunk_refs.remove(&0)), "chunk 0, which has no chunk_refs entry");

    // One corrupt byte in segment 1's frame: only segment 1 fails.
    let s1 = &p.segments[1];
    flip(&folder, &p.pack, s1.offset + s1.len / 2);
    let e = rt.block_on(fetch_segment(&vol.remote, &url, &p, 1)).unwrap_err();
    assert!(matches!(&e, VolumeError::CorruptProfile { key, .. } if *key == p.pack), "{e}");
    assert_eq!(e.into_io().kind(), std::io::ErrorKind::InvalidData);
    for i in (0..p.segments.len()).filter(|&i| i != 1) {
        rt.block_on(fetch_segment(&vol.remote, &url, &p, i)).unwrap();
    }

    // An empty builder uploads nothing.
    let before = rt.block_on(vol.remote.list(PROFILE_PREFIX)).unwrap();
    let empty = ProfileBuilder::new(&cache, &vol).unwrap();
    assert_eq!(rt.block_on(empty.upload(&vol.remote)).unwrap(), None);
    assert_eq!(rt.block_on(vol.remote.list(PROFILE_PREFIX)).unwrap(), before);

    // A second, newer profile is the one found.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut b = ProfileBuilder::new(&cache, &vol).unwrap();
    b.add(CS, &img[CS as usize..(CS + 8192) as usize]).unwrap();
    let key2 = rt.block_on(b.upload(&vol.remote)).unwrap().unwrap();
    assert!(key2 > key1);
    let (k, p2) = rt.block_on(find_latest(&vol.remote, &vol.header)).unwrap().unwrap();
    assert_eq!(k, key2);
    assert_eq!(p2.segments.len(), 1);
    assert_eq!(rt.block_on(fetch_segment(&vol.remote, &url, &p2, 0)).unwrap()[..], img[CS as usize..][..8192]);

    // Its index corrupted: skipped, the older one is returned. A stray pack
    // without an index and an unparseable key are ignored.
    flip(&folder, &key2, 40);
    std::fs::write(folder.join(format!("{PROFILE_PREFIX}99999999999999999999-9999999999999-ffffffff.pack")), b"x")
        .unwrap();
    std::fs::write(folder.join(format!("{PROFILE_PREFIX}junk")), b"x").unwrap();
    let (k, _) = rt.block_on(find_latest(&vol.remote, &vol.header)).unwrap().unwrap();
    assert_eq!(k, key1);
    // Neither left: none.
    flip(&folder, &key1, 40);
    assert!(rt.block_on(find_latest(&vol.remote, &vol.header)).unwrap().is_none());
}
