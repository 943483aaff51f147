//! The inflight region's protocol, crash point by crash point, and the
//! chain walk used to resubmit.

use vm_memory::{Bytes, GuestAddress};

use super::*;

const QS: u16 = 16;

/// A region as the frontend hands it to a (re)started daemon: the same
/// memfd, mapped again.
fn remap(msg: &VhostUserInflight, file: &File) -> InflightRegion {
    InflightRegion::map(msg, file, 2).unwrap()
}

#[test]
fn fresh_region_has_nothing_to_resubmit() {
    let (msg, file) = InflightRegion::create(2, QS).unwrap();
    assert_eq!(msg.mmap_size as usize, 2 * queue_region_size(QS) + TRAILER);
    assert_eq!(file.metadata().unwrap().len(), msg.mmap_size);
    let r = remap(&msg, &file);
    assert_eq!(r.check(0, 0), None);
    assert_eq!(r.check(0, 0), None, "checked once per mapping");
    // Set up by the first check: a later daemon checks for real.
    assert_eq!(remap(&msg, &file).check(0, 0), Some(Resume { heads: vec![], next_avail: 0 }));
}

#[test]
fn pending_requests_come_back_in_submission_order() {
    let (msg, file) = InflightRegion::create(2, QS).unwrap();
    let r = remap(&msg, &file);
    assert_eq!(r.check(1, 0), None);
    // Popped in this order; head 1 completes (used index 1), the rest is
    // pending when the daemon dies.
    for h in [9, 2, 1, 7] {
        r.get(1, h);
    }
    r.pre_put(1, 1);
    r.post_put(1, 1, 1);
    drop(r);
    let r = remap(&msg, &file);
    assert_eq!(r.check(1, 1), Some(Resume { heads: vec![9, 2, 7], next_avail: 4 }));
    assert_eq!(r.check(0, 0), None, "queue 0 was never used");
    // New chains are counted after the resubmitted ones.
    r.get(1, 3);
    r.post_put(1, 9, 2);
    drop(r);
    assert_eq!(remap(&msg, &file).check(1, 2), Some(Resume { heads: vec![2, 7, 3], next_avail: 5 }));
}

#[test]
fn crash_between_used_ring_and_region_counts_the_request_as_done() {
    let (msg, file) = InflightRegion::create(1, QS).unwrap();
    let r = remap(&msg, &file);
    r.check(0, 0);
    r.get(0, 5);
    r.get(0, 6);
    // 5 reached the used ring (index 1) but the daemon died before post_put.
    r.pre_put(0, 5);
    drop(r);
    assert_eq!(remap(&msg, &file).check(0, 1), Some(Resume { heads: vec![6], next_avail: 2 }));
    // Crash after pre_put but before the used ring moved: 6 is still pending.
    let r = remap(&msg, &file);
    r.pre_put(0, 6);
    drop(r);
    assert_eq!(remap(&msg, &file).check(0, 1), Some(Resume { heads: vec![6], next_avail: 2 }));
}

#[test]
fn hostile_regions_are_refused_or_contained() {
    let (msg, file) = InflightRegion::create(1, QS).unwrap();
    let small = VhostUserInflight::new(queue_region_size(QS) as u64 - 1, 0, 1, QS);
    assert!(InflightRegion::map(&small, &file, 1).is_err());
    let beyond = VhostUserInflight::new(msg.mmap_size, 64, 1, QS);
    assert!(InflightRegion::map(&beyond, &file, 1).is_err());
    let more_queues = VhostUserInflight::new(msg.mmap_size * 4, 0, 4, QS);
    assert!(InflightRegion::map(&more_queues, &file, 1).is_err());
    assert!(InflightRegion::create(1, 0).is_err());
    assert!(InflightRegion::create(0, QS).is_err());
    // Garbage everywhere (a last_batch_head beyond the queue, counters and
    // flags of any value): check stays in bounds and resubmits only real heads.
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0xffu8; msg.mmap_size as usize], 0).unwrap();
    let r = remap(&msg, &file);
    let res = r.check(0, 3).unwrap();
    assert!(res.heads.is_empty(), "flags of 0xff are not 'in flight' (1)");
    r.get(0, QS + 5);
    r.post_put(0, u16::MAX, 4);
    assert_eq!(r.cache_mode(), None, "a trailer of garbage holds no mode");
}

/// The guest's cache mode, recorded by one daemon, is what the next one
/// mapping the same region reads; a fresh region and one without a trailer
/// (an older driveblk's, or a frontend's own) hold none.
#[test]
fn the_cache_mode_outlives_the_daemon_in_the_region() {
    let (msg, file) = InflightRegion::create(2, QS).unwrap();
    let r = remap(&msg, &file);
    assert_eq!(r.cache_mode(), None);
    assert!(r.set_cache_mode(CacheMode::WriteThrough));
    drop(r);
    let r = remap(&msg, &file);
    assert_eq!(r.cache_mode(), Some(CacheMode::WriteThrough));
    r.set_cache_mode(CacheMode::WriteBack);
    drop(r);
    assert_eq!(remap(&msg, &file).cache_mode(), Some(CacheMode::WriteBack));

    let queues = VhostUserInflight::new(2 * queue_region_size(QS) as u64, 0, 2, QS);
    let old = InflightRegion::map(&queues, &file, 2).unwrap();
    assert_eq!(old.cache_mode(), None);
    assert!(!old.set_cache_mode(CacheMode::WriteThrough));
}

#[test]
fn walk_chain_follows_next_and_indirect_tables_and_stops_on_loops() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    let table = GuestAddress(0x1000);
    let put = |at: GuestAddress, i: u64, d: Descriptor| mem.write_obj(d, at.unchecked_add(16 * i)).unwrap();
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    put(table, 4, Descriptor::new(0x100, 16, NEXT, 7));
    put(table, 7, Descriptor::new(0x200, 512, NEXT | WRITE, 2));
    put(table, 2, Descriptor::new(0x300, 1, WRITE, 0));
    let d = walk_chain(&mem, table, QS, 4);
    assert_eq!(d.iter().map(|d| d.addr().0).collect::<Vec<_>>(), vec![0x100, 0x200, 0x300]);
    // An indirect table of two entries behind head 5.
    let ind = GuestAddress(0x2000);
    put(ind, 0, Descriptor::new(0x400, 16, NEXT, 1));
    put(ind, 1, Descriptor::new(0x500, 1, WRITE, 0));
    put(table, 5, Descriptor::new(ind.0, 32, INDIRECT, 0));
    let d = walk_chain(&mem, table, QS, 5);
    assert_eq!(d.iter().map(|d| d.addr().0).collect::<Vec<_>>(), vec![0x400, 0x500]);
    // A loop ends after at most a table's worth of descriptors.
    put(table, 8, Descriptor::new(0x600, 16, NEXT, 9));
    put(table, 9, Descriptor::new(0x700, 16, NEXT, 8));
    assert_eq!(walk_chain(&mem, table, QS, 8).len(), usize::from(QS));
    // A head beyond the table yields nothing.
    assert!(walk_chain(&mem, table, QS, QS).is_empty());
}

/// A resubmitted chain of a thousand indirect descriptors is walked to its
/// status byte without collecting them all, and the parser refuses it there
/// as it refuses such a popped chain.
#[test]
fn walk_chain_keeps_no_more_of_a_huge_chain_than_the_parser_takes() {
    use crate::vhost::request::{Request, MAX_CHAIN_DESCRIPTORS};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
    const N: u16 = 1000;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    let (table, ind, status) = (GuestAddress(0x1000), GuestAddress(0x4000), 0x800u64);
    for i in 0..N - 1 {
        mem.write_obj(Descriptor::new(0x100, 0, 1, i + 1), ind.unchecked_add(16 * u64::from(i))).unwrap();
    }
    mem.write_obj(Descriptor::new(status, 1, 2, 0), ind.unchecked_add(16 * u64::from(N - 1))).unwrap();
    mem.write_obj(Descriptor::new(ind.0, 16 * u32::from(N), 4, 0), table).unwrap();
    let d = walk_chain(&mem, table, QS, 0);
    assert_eq!(d.len(), MAX_CHAIN_DESCRIPTORS + 1);
    assert_eq!(d.last().map(|d| d.addr().0), Some(status), "the status descriptor is kept");
    let req = Request::parse_descriptors(0, d, std::sync::Arc::new(mem.clone()), 1 << 20, false);
    assert!(req.refused().is_some_and(|(_, why)| why.contains("descriptors")), "{:?}", req.op);
    assert_eq!(req.complete(VIRTIO_BLK_S_IOERR as u8, 0), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), VIRTIO_BLK_S_IOERR as u8);
}
