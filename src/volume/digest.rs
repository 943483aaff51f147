//! Content digests of stored chunks: BLAKE3 for what this version writes,
//! the SHA-256 that format versions 1 and 2 wrote still verified.
//!
//! A digest is text in the manifest: `blake3:<64 hex>`, or 64 bare hex
//! digits for SHA-256. BLAKE3 because import hashes every byte of the
//! image: SHA-256 (even with the CPU's SHA extensions) was half of an
//! import's CPU, BLAKE3 is about four times faster on the same core.

use sha2::{Digest, Sha256};

const BLAKE3_PREFIX: &str = "blake3:";

/// The digest this version records for `data`.
pub fn of(data: &[u8]) -> String {
    let mut s = String::with_capacity(BLAKE3_PREFIX.len() + 64);
    s.push_str(BLAKE3_PREFIX);
    s.push_str(blake3::hash(data).to_hex().as_str());
    s
}

/// The digest of `data` computed the way `like` was (so a chunk written
/// by an older version is compared with what that version recorded).
pub fn of_like(data: &[u8], like: &str) -> String {
    if like.starts_with(BLAKE3_PREFIX) {
        of(data)
    } else {
        hex::encode(Sha256::digest(data))
    }
}

/// True when `data` has digest `want`.
pub fn matches(data: &[u8], want: &str) -> bool {
    is_valid(want) && of_like(data, want) == want
}

/// [`matches`] for `data` whose digest by [`of`] is already `known`: hashes
/// again only when `want` is of the older kind.
pub fn matches_known(data: &[u8], known: &str, want: &str) -> bool {
    if want.starts_with(BLAKE3_PREFIX) {
        known == want
    } else {
        matches(data, want)
    }
}

/// True when `s` is a well-formed digest of either kind.
pub fn is_valid(s: &str) -> bool {
    is_hex64(s.strip_prefix(BLAKE3_PREFIX).unwrap_or(s))
}

/// True when `s` is 64 lowercase hex digits (a bare SHA-256, or the hex
/// of a BLAKE3 digest).
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_verify_and_differ_from_each_other() {
        let data = b"driveblk chunk";
        let new = of(data);
        assert!(new.starts_with("blake3:") && is_valid(&new), "{new}");
        assert!(matches(data, &new));
        assert!(!matches(b"driveblk chunK", &new));
        // What versions 1 and 2 recorded: bare hex SHA-256.
        let old = hex::encode(Sha256::digest(data));
        assert!(is_valid(&old) && matches(data, &old));
        assert_eq!(of_like(data, &old), old);
        assert!(!matches(b"other", &old));
        for bad in ["", "blake3:", "xyz", &old[..63], &format!("sha1:{old}"), &old.to_uppercase()] {
            assert!(!is_valid(bad) && !matches(data, bad), "{bad:?}");
            assert!(!matches_known(data, &new, bad), "{bad:?}");
        }
        // With the digest known, a BLAKE3 digest compares as it is and an
        // old SHA-256 one is computed.
        assert!(matches_known(data, &new, &new));
        assert!(!matches_known(data, &new, &of(b"other")));
        assert!(matches_known(data, &new, &old));
        assert!(!matches_known(b"other", &of(b"other"), &old));
    }
}
