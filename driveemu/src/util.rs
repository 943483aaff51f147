//! Small wire helpers: RFC 3339 times, Drive-looking ids, `Range` headers and `fields=` masks.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::Value;

use crate::error::ApiError;

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

// Howard Hinnant's civil-calendar algorithms (days <-> y/m/d), so no date crate is needed.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats like Drive does: `2026-11-29T22:24:20.123Z` (UTC, milliseconds).
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Parses RFC 3339 (`2012-06-04T12:00:00`, optional fraction, optional `Z`/offset; Drive's
/// search guide treats a time without zone as UTC) into epoch milliseconds.
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse::<i64>().ok() };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32);
    }
    let offset_min = if i == b.len() || &s[i..] == "Z" || &s[i..] == "z" {
        0
    } else if (b[i] == b'+' || b[i] == b'-') && b.len() == i + 6 && b[i + 3] == b':' {
        let oh = num(i + 1..i + 3)?;
        let om = num(i + 4..i + 6)?;
        let sign = if b[i] == b'+' { 1 } else { -1 };
        sign * (oh * 60 + om)
    } else {
        return None;
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86400 + h * 3600 + mi * 60 + se) - offset_min * 60) * 1000 + frac_ms)
}

const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A file id shaped like Drive's: 33 characters of `[A-Za-z0-9_-]`, starting with `1`.
pub(crate) fn new_file_id(rng: &mut impl Rng) -> String {
    let mut s = String::with_capacity(33);
    s.push('1');
    for _ in 0..32 {
        s.push(ID_CHARS[rng.random_range(0..ID_CHARS.len())] as char);
    }
    s
}

/// A shared-drive (or My Drive root) id shaped like Drive's: `0A` + 17 characters + `Uk9PVA`.
pub(crate) fn new_root_id(rng: &mut impl Rng) -> String {
    let mut s = String::from("0A");
    for _ in 0..17 {
        s.push(ID_CHARS[rng.random_range(0..62)] as char);
    }
    s.push_str("Uk9PVA");
    s
}

/// An opaque token of `n` url-safe characters.
pub(crate) fn opaque(rng: &mut impl Rng, n: usize) -> String {
    (0..n).map(|_| ID_CHARS[rng.random_range(0..ID_CHARS.len())] as char).collect()
}

/// What a `Range: bytes=...` header asks of a body of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeAsk {
    /// No usable single range: serve everything with 200 (multi-ranges fall here too).
    Whole,
    /// Serve `start..=end` with 206.
    Part(u64, u64),
    /// 416 Range Not Satisfiable.
    Unsatisfiable,
}

pub(crate) fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(h) = header else { return RangeAsk::Whole };
    let Some(spec) = h.trim().strip_prefix("bytes=") else { return RangeAsk::Whole };
    if spec.contains(',') {
        // Drive serves single ranges; several ranges are answered with the whole body.
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAsk::Whole };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix range: the last n bytes.
        let Ok(n) = b.parse::<u64>() else { return RangeAsk::Whole };
        if n == 0 || size == 0 {
            return RangeAsk::Unsatisfiable;
        }
        return RangeAsk::Part(size.saturating_sub(n), size - 1);
    }
    let Ok(start) = a.parse::<u64>() else { return RangeAsk::Whole };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            // RFC 9110: an invalid range-spec makes the header ignorable.
            _ => return RangeAsk::Whole,
        }
    };
    if start >= size {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(start, end.min(size - 1))
}

/// A parsed `fields=` selector: `*` or a set of named sub-selections.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Sel {
    All,
    Some(BTreeMap<String, Sel>),
}

impl Sel {
    /// Parses the partial-response syntax: `a,b(c,d),e/f,*`.
    pub fn parse(s: &str) -> Result<Sel, ApiError> {
        let bad = || ApiError::invalid_param_msg("fields", format!("Invalid field selection {s}"));
        let chars: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
        let mut pos = 0;
        let sel = parse_list(&chars, &mut pos).ok_or_else(bad)?;
        if pos != chars.len() {
            return Err(bad());
        }
        Ok(sel)
    }

    fn merge(&mut self, other: Sel) {
        match (self, other) {
            (Sel::All, _) => {}
            (me @ Sel::Some(_), Sel::All) => *me = Sel::All,
            (Sel::Some(a), Sel::Some(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(old) => old.merge(v),
                        None => {
                            a.insert(k, v);
                        }
                    }
                }
            }
        }
    }

    /// The sub-selection for `key`, if selected.
    pub fn child(&self, key: &str) -> Option<Sel> {
        match self {
            Sel::All => Some(Sel::All),
            Sel::Some(m) => m.get(key).cloned().or_else(|| m.get("*").cloned()),
        }
    }

    /// Keeps only the selected members of `v` (arrays are masked element by element).
    pub fn apply(&self, v: &Value) -> Value {
        match (self, v) {
            (Sel::All, _) => v.clone(),
            (Sel::Some(_), Value::Array(items)) => Value::Array(items.iter().map(|i| self.apply(i)).collect()),
            (Sel::Some(m), Value::Object(obj)) => {
                let mut out = serde_json::Map::new();
                for (k, val) in obj {
                    let sub = m.get(k).or_else(|| m.get("*"));
                    if let Some(sub) = sub {
                        out.insert(k.clone(), sub.apply(val));
                    }
                }
                Value::Object(out)
            }
            (Sel::Some(_), other) => other.clone(),
        }
    }

    /// Names selected at this level (for validating them against a resource's fields).
    pub fn names(&self) -> Vec<String> {
        match self {
            Sel::All => vec![],
            Sel::Some(m) => m.keys().cloned().collect(),
        }
    }
}

fn parse_list(c: &[char], pos: &mut usize) -> Option<Sel> {
    let mut out = Sel::Some(BTreeMap::new());
    loop {
        let item = parse_item(c, pos)?;
        out.merge(item);
        if *pos < c.len() && c[*pos] == ',' {
            *pos += 1;
            continue;
        }
        return Some(out);
    }
}

fn parse_item(c: &[char], pos: &mut usize) -> Option<Sel> {
    let start = *pos;
    while *pos < c.len() && (c[*pos].is_alphanumeric() || c[*pos] == '_' || c[*pos] == '*' || c[*pos] == '-') {
        *pos += 1;
    }
    if *pos == start {
        return None;
    }
    let name: String = c[start..*pos].iter().collect();
    let sub = if *pos < c.len() && c[*pos] == '/' {
        *pos += 1;
        parse_item(c, pos)?
    } else if *pos < c.len() && c[*pos] == '(' {
        *pos += 1;
        let inner = parse_list(c, pos)?;
        if *pos >= c.len() || c[*pos] != ')' {
            return None;
        }
        *pos += 1;
        inner
    } else {
        Sel::All
    };
    if name == "*" {
        return Some(Sel::All);
    }
    let mut m = BTreeMap::new();
    m.insert(name, sub);
    Some(Sel::Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn time_round_trip() {
        let ms = 1_764_455_060_123;
        let s = rfc3339(ms);
        assert_eq!(parse_rfc3339(&s), Some(ms));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_rfc3339("2012-06-04T12:00:00-08:00"), parse_rfc3339("2012-06-04T20:00:00Z"));
        assert_eq!(parse_rfc3339("nonsense"), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100), RangeAsk::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), RangeAsk::Part(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), RangeAsk::Part(90, 99));
        assert_eq!(parse_range(Some("bytes=95-200"), 100), RangeAsk::Part(95, 99));
        assert_eq!(parse_range(Some("bytes=100-200"), 100), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=9-1"), 100), RangeAsk::Whole);
        assert_eq!(parse_range(None, 100), RangeAsk::Whole);
    }

    #[test]
    fn fields_mask() {
        let sel = Sel::parse("nextPageToken,files(id,name),x/y").unwrap();
        let v = json!({"kind":"k","nextPageToken":"t","files":[{"id":"1","name":"a","size":"3"}],"x":{"y":1,"z":2}});
        assert_eq!(sel.apply(&v), json!({"nextPageToken":"t","files":[{"id":"1","name":"a"}],"x":{"y":1}}));
        assert_eq!(Sel::parse("*").unwrap(), Sel::All);
        assert!(Sel::parse("files(id").is_err());
        assert!(Sel::parse("a,,b").is_err());
    }
}
