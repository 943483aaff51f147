//! Pinned ranges: the parts of the image a user wants kept in the local
//! cache whatever else comes and goes (the guest's hot set, to run without
//! a network), saved in the cache directory so every start re-applies them.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the pins in a cache directory.
pub const PINS_FILE: &str = "pins.json";

/// What is pinned: byte ranges of the image, and/or every chunk the
/// volume's newest boot profile touches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    /// `[start, end)` byte ranges of the image.
    #[serde(default)]
    pub ranges: Vec<[u64; 2]>,
    /// The chunks of the newest boot profile, whichever it is at each start.
    #[serde(default)]
    pub profile: bool,
}

impl Pins {
    /// True when nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.profile
    }

    /// Adds `other` to these pins.
    pub fn merge(&mut self, other: &Pins) {
        for r in &other.ranges {
            if !self.ranges.contains(r) {
                self.ranges.push(*r);
            }
        }
        self.profile |= other.profile;
    }

    /// The chunks of `chunk_size` bytes the ranges cover, within
    /// `image_len`.
    pub fn range_chunks(&self, chunk_size: u64, image_len: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for &[start, end] in &self.ranges {
            let end = end.min(image_len);
            if start < end {
                out.extend(start / chunk_size..=(end - 1) / chunk_size);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The pins saved in cache directory `dir` (none if it has no file).
    pub fn load(dir: &Path) -> io::Result<Pins> {
        match std::fs::read(path(dir)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path(dir).display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Pins::default()),
            Err(e) => Err(e),
        }
    }

    /// Saves the pins in `dir` (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!(".{PINS_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        {
            use std::io::Write;
            let mut f = crate::remote::private::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path(dir))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(PINS_FILE)
}

/// Parses `--pin` ranges: `START-END` or `START+LEN` byte ranges with size
/// suffixes, comma-separated, e.g. `0-1G,20G+512M`.
pub fn parse_ranges(s: &str, parse_size: impl Fn(&str) -> Result<u64, String>) -> Result<Vec<Range<u64>>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let r = if let Some((a, b)) = part.split_once('+') {
            let start = parse_size(a)?;
            let len = parse_size(b)?;
            start..start.checked_add(len).ok_or_else(|| format!("{part:?}: range overflows"))?
        } else if let Some((a, b)) = part.split_once('-') {
            parse_size(a)?..parse_size(b)?
        } else {
            return Err(format!("{part:?}: expected START-END or START+LEN (e.g. 0-1G, 20G+512M)"));
        };
        if r.start >= r.end {
            return Err(format!("{part:?}: empty range"));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err("no range given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_chunks_and_round_trip() {
        let p = Pins { ranges: vec![[0, 1], [4 << 20, (8 << 20) + 1], [100 << 20, 200 << 20]], profile: true };
        assert_eq!(p.range_chunks(4 << 20, 10 << 20), vec![0, 1, 2]);
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Pins::load(d.path()).unwrap(), Pins::default());
        p.save(d.path()).unwrap();
        assert_eq!(Pins::load(d.path()).unwrap(), p);
        std::fs::write(d.path().join(PINS_FILE), b"{\"ranges\": 3}").unwrap();
        assert!(Pins::load(d.path()).is_err(), "a damaged pins file is an error, not an empty set");
    }

    #[test]
    fn range_syntax() {
        let size = |s: &str| -> Result<u64, String> {
            let (n, m) = match s.strip_suffix('M') {
                Some(n) => (n, 1 << 20),
                None => s.strip_suffix('K').map_or((s, 1), |n| (n, 1 << 10)),
            };
            n.parse::<u64>().map(|v| v * m).map_err(|e| e.to_string())
        };
        assert_eq!(parse_ranges("0-1M, 2M+4K", size).unwrap(), vec![0..1 << 20, (2 << 20)..(2 << 20) + 4096]);
        assert!(parse_ranges("5M-1M", size).is_err());
        assert!(parse_ranges("12", size).is_err());
        assert!(parse_ranges("", size).is_err());
    }
}
