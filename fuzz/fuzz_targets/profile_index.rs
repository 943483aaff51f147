//! Fuzz target: boot profile indexes (`ProfileIndex::from_bytes`), sealed
//! by the target so the fuzzer reaches the JSON and the bounds checks;
//! whatever validates is then indexed the way a replay does
//! (`tier::boot::Replay`) and queried, which must stay bounded.
#![no_main]

use driveblk::tier::boot::Replay;
use driveblk::volume::format::{seal, VolumeHeader};
use driveblk::volume::profile::ProfileIndex;
use libfuzzer_sys::fuzz_target;

const VOLUME_ID: &str = "0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut header = VolumeHeader::new(16 << 20, 64 << 10, None);
    header.volume_id = VOLUME_ID.into();
    let bytes = if mode & 1 == 0 { seal(rest.to_vec()) } else { rest.to_vec() };
    let Ok(index) = ProfileIndex::from_bytes(&bytes, &header) else { return };
    assert!(index.raw_bytes() <= index.image_len);
    let cs = header.chunk_size;
    let chunks = index.image_len.div_ceil(cs);
    let replay = Replay::new("profile-fuzz".into(), index, cs, |idx| idx % 3 != 1);
    for idx in 0..chunks.min(64) {
        let _ = replay.covering(idx, 0, cs);
        let _ = replay.covering(idx, 4096, 8192);
        let _ = replay.usable(idx);
    }
});
