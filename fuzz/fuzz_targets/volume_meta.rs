//! Fuzz target: volume headers and manifests, through their public entry
//! points only (`VolumeHeader::from_bytes`, `Manifest::from_bytes`). The
//! first byte picks what the rest is: a header, a manifest as stored (with
//! its checksum trailer), or a manifest body the target seals itself so the
//! fuzzer gets past the checksum into the JSON and the checks after it.
#![no_main]

use driveblk::volume::format::{seal, Manifest, VolumeHeader};
use libfuzzer_sys::fuzz_target;

/// The volume id the manifest seeds carry.
const VOLUME_ID: &str = "0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut header = VolumeHeader::new(10 << 20, 1 << 20, None);
    header.volume_id = VOLUME_ID.into();
    match mode % 4 {
        0 => {
            if let Ok(h) = VolumeHeader::from_bytes(rest) {
                // What parsed must round-trip.
                assert_eq!(VolumeHeader::from_bytes(&h.to_bytes()).ok().as_ref(), Some(&h));
            }
        }
        1 => {
            let _ = Manifest::from_bytes(rest, &header, 3);
        }
        _ => {
            if let Ok(m) = Manifest::from_bytes(&seal(rest.to_vec()), &header, 3) {
                let _ = m.chunk_count();
                assert_eq!(Manifest::from_bytes(&m.to_bytes(), &header, 3).ok().as_ref(), Some(&m));
            }
        }
    }
});
