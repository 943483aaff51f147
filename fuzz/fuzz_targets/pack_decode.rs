//! Fuzz target: one pack entry (a zstd frame) decoded against an expected
//! length and digest, as a reader does for every fetched chunk. A frame
//! claiming a huge size must not make the decoder allocate past the
//! expected length; bad data must never come back as Ok.
#![no_main]

use driveblk::volume::digest;
use driveblk::volume::pack::{decode_chunk, PackWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // Expected length: up to 4 MiB (a chunk is at most 64 MiB; the bound
    // keeps each run fast).
    let expected = (usize::from(data[0]) | usize::from(data[1]) << 8 | usize::from(data[2] & 0x3f) << 16) % (4 << 20);
    let frame = &data[3..];
    // Against a digest it cannot match, and against the digest of what it
    // would decode to if it were right.
    if let Ok(out) = decode_chunk(frame, expected, &"0".repeat(64)) {
        panic!("decoded {} bytes that do not match the digest", out.len());
    }
    if let Ok(plain) = zstd::bulk::decompress(frame, expected) {
        if plain.len() == expected {
            let got = decode_chunk(frame, expected, &digest::of(&plain)).expect("a matching frame decodes");
            assert_eq!(got, plain);
        }
    }
    // And the writer's frames decode to what went in.
    let mut w = PackWriter::new();
    let c = w.add(frame).expect("compress");
    let (pack, _) = w.finish();
    let back = decode_chunk(&pack[c.offset as usize..(c.offset + c.len) as usize], frame.len(), &c.digest);
    assert_eq!(back.as_deref(), Ok(frame));
});
