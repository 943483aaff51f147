//! Fuzz target: a pack's sub-frame index (a zstd skippable frame) parsed as
//! a reader does after its hash matched, then used: spans and decodes of
//! what follows in the input. Nothing may panic or allocate without bound,
//! an index that parses re-encodes to the same bytes, and sub-frames that
//! do not match their hashes never decode as Ok.
#![no_main]

use driveblk::volume::subframe::PackIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // The first 4 bytes split the input into the index and a "pack".
    let cut = (u32::from_le_bytes(data[..4].try_into().unwrap()) as usize) % data.len().max(1);
    let rest = &data[4..];
    let (ix_bytes, pack) = rest.split_at(cut.min(rest.len()));
    let Ok(ix) = PackIndex::parse(ix_bytes, pack.len() as u64) else { return };
    assert_eq!(ix.encode(), ix_bytes, "an index that parses re-encodes to itself");
    for (&off, e) in ix.entries.iter().take(8) {
        let flen = e.frame_len();
        for (at, len) in [(0, u64::MAX >> 1), (u64::from(ix.sub_size), 1), (u64::from(e.raw_len) / 2, 4096)] {
            let Some(span) = ix.span(off, flen, at, len) else { continue };
            let end = span.pack_offset + span.pack_len;
            assert!(end <= pack.len() as u64, "a span lies inside the frames the index checked");
            let got = ix.decode(off, &span, &pack[span.pack_offset as usize..end as usize]);
            if let Ok(d) = got {
                assert!(d.len() as u64 <= span.raw_len);
            }
        }
    }
});
