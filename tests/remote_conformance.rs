//! One conformance suite for every backend of the `Remote` trait, run
//! against real stores: `dir:` (a local folder), `gdrive:` (the Drive API
//! emulator), `s3://` (a real Garage started by `scripts/garage.sh`),
//! and `az://` (Azurite, Microsoft's Azure Storage emulator).
//! put/replace, exact and past-the-end ranged reads (parallel on object
//! stores), a multipart-sized object, the bytes each put sends counted, listings confined to one folder,
//! delete, and the commit fence: a second create of one key fails and
//! names the winner's tag, a retried create of one's own bytes succeeds.
//!
//! What the S3 store really guarantees is tested, not assumed: Garage 2.5
//! ignores `If-None-Match: *`, so there the backend refuses creates unless
//! the operator declared a single writer (`DRIVEBLK_OBJSTORE_UNFENCED`).
//! Azurite refuses a second `If-None-Match: *` create, so `az://` is fenced.

#[path = "garage_support/mod.rs"]
mod garage_support;
mod gdrive_support;
#[path = "objstore_emu_support/mod.rs"]
mod objstore_emu_support;

use bytes::Bytes;
use driveblk::remote::objstore::{Fence, ObjStoreRemote, StoreKind};
use driveblk::remote::{
    content_tag, DynRemote, PutBody, RemoteConfig, RemoteError, RemoteUrl, RetryPolicy, RetryingRemote,
};
use gdrive_support::data;

/// The suite. `a` and `b` are two sibling folders (`.../vol` and
/// `.../vol-2`) of one parent. `absent_reads`: also check that a ranged
/// read of an absent key is NotFound (on Drive that takes 30 s: the
/// backend waits out a lagging listing before it believes a name absent).
async fn conformance(a: DynRemote, b: DynRemote, absent_reads: bool) {
    // Empty, and absent keys are NotFound.
    assert!(a.list("").await.unwrap().is_empty());
    assert!(a.head("volume.json").await.unwrap_err().is_not_found());
    if absent_reads {
        assert!(a.get_range("pack-1", 0..10).await.unwrap_err().is_not_found());
    }

    // A new volume's folder is made once; every write below goes into it.
    a.create_folder().await.unwrap();
    b.create_folder().await.unwrap();
    // A small object: exact, cut and past-the-end ranges.
    let small = data(1, 1000);
    let sent = a.bytes_sent().expect("the store counts the bytes it sends");
    let m = a.put("pack-1", PutBody::from_bytes(small.clone())).await.unwrap();
    assert_eq!(m.size, 1000);
    let sent_small = a.bytes_sent().unwrap() - sent;
    assert!(sent_small >= 1000, "{sent_small} bytes counted sent for a 1000-byte object");
    assert!(m.created_ms.is_some() && m.modified_ms.is_some() && m.version.is_some(), "{m:?}");
    assert_eq!(&a.get("pack-1").await.unwrap()[..], &small[..]);
    assert_eq!(&a.get_range("pack-1", 10..20).await.unwrap()[..], &small[10..20]);
    assert_eq!(&a.get_range("pack-1", 990..5000).await.unwrap()[..], &small[990..]);
    assert!(a.get_range("pack-1", 1000..1010).await.unwrap().is_empty());
    assert!(a.get_range("pack-1", 5000..6000).await.unwrap().is_empty());

    // A large object (multipart on object stores), read in ranges that
    // span parts (parallel ranged reads there).
    let big = data(2, (10 << 20) + 5);
    let m = a
        .put(
            "pack-big",
            PutBody::from_stream_fn(None, {
                let big = Bytes::from(big.clone());
                move || {
                    let parts: Vec<std::io::Result<Bytes>> =
                        big.chunks(300 << 10).map(|c| Ok(big.slice_ref(c))).collect();
                    Box::pin(futures::stream::iter(parts))
                }
            }),
        )
        .await
        .unwrap();
    assert_eq!(m.size, big.len() as u64);
    let sent_big = a.bytes_sent().unwrap() - sent - sent_small;
    // Each body counted once (twice at most, a retried part).
    assert!(
        sent_big >= big.len() as u64 && sent_big < 2 * big.len() as u64,
        "{sent_big} bytes counted sent for a {}-byte object",
        big.len()
    );
    assert_eq!(a.head("pack-big").await.unwrap().size, big.len() as u64);
    assert!(a.get("pack-big").await.unwrap() == big, "a large object reads back different");
    let r = (3 << 20) + 7..(9 << 20) + 11;
    assert!(a.get_range("pack-big", r.clone()).await.unwrap() == big[r.start as usize..r.end as usize]);
    let tail = a.get_range("pack-big", (10 << 20) - 3..(40 << 20)).await.unwrap();
    assert_eq!(&tail[..], &big[(10 << 20) - 3..]);

    // put replaces whole.
    let small2 = data(3, 700);
    a.put("pack-1", PutBody::from_bytes(small2.clone())).await.unwrap();
    assert_eq!(&a.get("pack-1").await.unwrap()[..], &small2[..]);

    // Listings: sorted, by prefix, and only this folder (not `vol-2`,
    // whose name starts with this folder's).
    b.put("pack-0", PutBody::from_bytes(vec![1u8; 3])).await.unwrap();
    a.put("gen-00000000000000000001", PutBody::from_bytes(vec![2u8; 5])).await.unwrap();
    let keys = |v: Vec<driveblk::remote::ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(keys(a.list("pack-").await.unwrap()), vec!["pack-1", "pack-big"]);
    assert_eq!(keys(a.list("").await.unwrap()), vec!["gen-00000000000000000001", "pack-1", "pack-big"]);
    let l = a.list("pack-1").await.unwrap();
    assert_eq!((l.len(), l[0].size), (1, 700));
    assert_eq!(keys(b.list("").await.unwrap()), vec!["pack-0"]);

    // Delete, twice.
    a.delete("pack-big").await.unwrap();
    a.delete("pack-big").await.unwrap();
    assert!(a.head("pack-big").await.unwrap_err().is_not_found());
    if absent_reads {
        assert!(a.get_range("pack-big", 0..1).await.unwrap_err().is_not_found());
    }

    // The fence: the first create wins, a second create of the same key
    // fails and names the winner's tag, and the content is the winner's.
    let slot = a.reserve("gen-00000000000000000002").await.unwrap();
    let (ba, bb) = (b"manifest A".to_vec(), b"manifest B".to_vec());
    let (ta, tb) = (content_tag(&ba), content_tag(&bb));
    let key = "gen-00000000000000000002";
    let m = a.create(key, slot.as_ref(), &ta, PutBody::from_bytes(ba.clone())).await.unwrap();
    assert_eq!(m.tag.as_deref(), Some(ta.as_str()));
    match a.create(key, slot.as_ref(), &tb, PutBody::from_bytes(bb.clone())).await {
        Err(RemoteError::AlreadyExists { tag, .. }) => assert_eq!(tag.as_deref(), Some(ta.as_str())),
        other => panic!("a second create of {key} did not fail with AlreadyExists: {other:?}"),
    }
    assert_eq!(&a.get_created(key, slot.as_ref()).await.unwrap()[..], &ba[..]);
    assert_eq!(a.head_created(key, slot.as_ref()).await.unwrap().size, ba.len() as u64);
    // A retry whose first attempt landed recognises its own object.
    let retrying = RetryingRemote::wrap(a.clone(), RetryPolicy::fast());
    let m =
        retrying.create(key, slot.as_ref(), &ta, PutBody::from_bytes(ba.clone())).await.expect("retry of own create");
    assert_eq!(m.tag.as_deref(), Some(ta.as_str()));

    // What lies past a key: only newer generations, whatever is older.
    let (g1, g2) = ("gen-00000000000000000001", "gen-00000000000000000002");
    assert_eq!(keys(a.list_after("gen-", g1).await.unwrap()), vec![g2]);
    assert!(a.list_after("gen-", g2).await.unwrap().is_empty());
    assert_eq!(keys(a.list_after("gen-", "gen-00000000000000000000").await.unwrap()), vec![g1, g2]);
    assert_eq!(keys(a.list_after("pack-", "pack-0").await.unwrap()), vec!["pack-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_conformance() {
    let d = tempfile::tempdir().unwrap();
    let cfg = RemoteConfig::default();
    let at = |n: &str| RemoteUrl::parse(&format!("dir:{}", d.path().join(n).display())).unwrap().folder_with(&cfg);
    conformance(at("vol"), at("vol-2"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gdrive_conformance() {
    let env = gdrive_support::start(driveemu::Config::default(), gdrive_support::Creds::ServiceAccount);
    // Resumable uploads in a few chunks (the support's tiny chunks test
    // resumption elsewhere and would make the large object slow here).
    let mut cfg = env.cfg.clone();
    cfg.drive.chunk_size = 4 << 20;
    let at = |n: &str| RemoteUrl::parse(&format!("gdrive:/vms/{n}")).unwrap().folder_with(&cfg);
    conformance(at("vol"), at("vol-2"), false).await;
}

/// On Garage, with the single-writer declaration (its conditional put does
/// not hold, so the backend looks before it creates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_garage_conformance() {
    let g = garage_support::garage();
    let cfg = g.config(true);
    let base = g.url("vol");
    let at = |u: &str| RemoteUrl::parse(u).unwrap().folder_with(&cfg);
    conformance(at(&base), at(&format!("{base}-2")), true).await;
}

/// What Garage really does with a conditional create, through
/// `object_store` as a caller would use it: the second `PutMode::Create`
/// of one key answers success and overwrites. So the backend's probe finds
/// the fence missing, and without the single-writer declaration every
/// create is refused with a message saying why and what to do; plain puts
/// (import) still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_garage_ignores_if_none_match_so_creates_are_refused() {
    use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
    let g = garage_support::garage();
    let cfg = g.config(false);
    let store = driveblk::remote::objstore::build_store(StoreKind::S3, &g.bucket, &cfg.objstore).unwrap();
    let p = object_store::path::Path::from(format!("raw-{:08x}/gen-2", rand::random::<u32>()));
    let create = PutOptions { mode: PutMode::Create, ..Default::default() };
    store.put_opts(&p, PutPayload::from_static(b"A"), create.clone()).await.unwrap();
    let second = store.put_opts(&p, PutPayload::from_static(b"B"), create).await;
    let now = store.get(&p).await.unwrap().bytes().await.unwrap();
    assert!(
        second.is_ok() && &now[..] == b"B",
        "Garage now refuses a second If-None-Match: * create ({second:?}); update the probe's expectations and \
         docs/object-stores.md"
    );

    let r =
        ObjStoreRemote::new(StoreKind::S3, &g.bucket, &format!("t{:08x}/vol", rand::random::<u32>()), &cfg.objstore);
    assert_eq!(r.fence().await.unwrap(), Fence::Ignored);
    let r: DynRemote = std::sync::Arc::new(r);
    r.put("volume.json", PutBody::from_bytes(b"{}".to_vec())).await.unwrap();
    let e = r.create("gen-2", None, "t", PutBody::from_bytes(b"x".to_vec())).await.unwrap_err();
    let msg = e.to_string();
    assert!(!e.is_retryable() && msg.contains("cannot fence two writers") && msg.contains("--read-only"), "{msg}");
    assert!(r.head("gen-2").await.unwrap_err().is_not_found(), "a refused create wrote anyway");
    // No probe object is left behind.
    assert_eq!(r.list("").await.unwrap().len(), 1);
}

/// On Azurite, fenced for real: its conditional create holds, so no
/// single-writer declaration is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_azurite_conformance() {
    let e = objstore_emu_support::azurite();
    let cfg = e.config();
    let base = e.url("vol");
    let at = |u: &str| RemoteUrl::parse(u).unwrap().folder_with(&cfg);
    conformance(at(&base), at(&format!("{base}-2")), true).await;
}

/// What Azurite does with a second conditional create of one key, through
/// `object_store` as a caller would use it: it refuses it and keeps the
/// first, and the backend's probe reports the fence holding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn az_azurite_refuses_a_second_create_so_the_fence_holds() {
    use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
    let (e, kind) = (objstore_emu_support::azurite(), StoreKind::Azure);
    let cfg = e.config();
    let store = driveblk::remote::objstore::build_store(kind, &e.bucket, &cfg.objstore).unwrap();
    let p = object_store::path::Path::from(format!("raw-{:08x}/gen-2", rand::random::<u32>()));
    let create = PutOptions { mode: PutMode::Create, ..Default::default() };
    store.put_opts(&p, PutPayload::from_static(b"A"), create.clone()).await.unwrap();
    let second = store.put_opts(&p, PutPayload::from_static(b"B"), create).await;
    let now = store.get(&p).await.unwrap().bytes().await.unwrap();
    let r = ObjStoreRemote::new(kind, &e.bucket, &format!("t{:08x}/vol", rand::random::<u32>()), &cfg.objstore);
    let fence = r.fence().await.unwrap();
    assert!(matches!(second, Err(object_store::Error::AlreadyExists { .. })), "{second:?}");
    assert_eq!(&now[..], b"A");
    assert_eq!(fence, Fence::Holds);
}
