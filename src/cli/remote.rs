//! Options shared by every command that talks to a remote: link simulation
//! for tests and benchmarks.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cli::size::parse_size;
use crate::remote::shaped::{FaultPlan, ShapedRemote, Shaping};
use crate::remote::{BwEntry, BwLimitRemote, BwSchedule};
use crate::volume::RemoteOptions;

#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Simulate a slower link: add this many milliseconds to every remote
    /// request (testing and benchmarks).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub remote_latency_ms: u64,

    /// Simulate a slower link: cap remote transfers at this many Mbit/s in
    /// total (testing and benchmarks). 0 = no cap.
    #[arg(long, value_name = "MBIT", default_value_t = 0)]
    pub remote_bandwidth_mbit: u64,

    /// Limit remote bandwidth, in bytes per second, like rclone: `2M`
    /// (both ways), `1M:10M` (up:down), `off`, or a timetable by local
    /// time of day: `"08:00,512K 19:00,2M:off 23:00,off"`.
    #[arg(long, value_name = "LIMIT", value_parser = parse_bwlimit)]
    pub bwlimit: Option<BwSchedule>,
}

/// Parses one rate: `off`, or a size per second (`512K`, `10M`).
fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(None);
    }
    match parse_size(s)? {
        0 => Ok(None),
        n => Ok(Some(n)),
    }
}

/// Parses a `--bwlimit` value (see the flag's help).
pub fn parse_bwlimit(s: &str) -> Result<BwSchedule, String> {
    let mut entries = Vec::new();
    for part in s.split_whitespace() {
        let (from_minute, rates) = match part.split_once(',') {
            Some((hm, rates)) => {
                let (h, m) = hm.split_once(':').ok_or_else(|| format!("{hm:?} is not a time of day HH:MM"))?;
                let (h, m): (u32, u32) = (
                    h.parse().map_err(|_| format!("{hm:?} is not a time of day HH:MM"))?,
                    m.parse().map_err(|_| format!("{hm:?} is not a time of day HH:MM"))?,
                );
                if h > 23 || m > 59 {
                    return Err(format!("{hm:?} is not a time of day HH:MM"));
                }
                (h * 60 + m, rates)
            }
            None => (0, part),
        };
        let (up, down) = match rates.split_once(':') {
            Some((u, d)) => (parse_rate(u)?, parse_rate(d)?),
            None => {
                let r = parse_rate(rates)?;
                (r, r)
            }
        };
        entries.push(BwEntry { from_minute, up, down });
    }
    if entries.is_empty() {
        return Err("empty --bwlimit".into());
    }
    Ok(BwSchedule { entries })
}

impl RemoteArgs {
    /// The remote options these arguments ask for.
    pub fn options(&self) -> RemoteOptions {
        let mut opts = RemoteOptions::default();
        let shaping = (self.remote_latency_ms > 0 || self.remote_bandwidth_mbit > 0).then(|| Shaping {
            latency: Duration::from_millis(self.remote_latency_ms),
            bandwidth_bps: (self.remote_bandwidth_mbit > 0).then(|| self.remote_bandwidth_mbit * 1_000_000),
        });
        let limit = self.bwlimit.clone().filter(|s| !s.is_unlimited()).map(Arc::new);
        if shaping.is_some() || limit.is_some() {
            opts.layer = Some(Arc::new(move |inner| {
                let inner = match &shaping {
                    Some(sh) => ShapedRemote::wrap(inner, sh.clone(), FaultPlan::new(0)),
                    None => inner,
                };
                match &limit {
                    Some(l) => BwLimitRemote::wrap(inner, l.clone()),
                    None => inner,
                }
            }));
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwlimit_values_parse_like_rclone() {
        let s = parse_bwlimit("2M").unwrap();
        assert_eq!(s.entries, vec![BwEntry { from_minute: 0, up: Some(2 << 20), down: Some(2 << 20) }]);
        let s = parse_bwlimit("1M:off").unwrap();
        assert_eq!((s.entries[0].up, s.entries[0].down), (Some(1 << 20), None));
        let s = parse_bwlimit("08:00,512K 19:00,2M:10M 23:00,off").unwrap();
        assert_eq!(s.entries.len(), 3);
        assert_eq!(s.entries[1], BwEntry { from_minute: 19 * 60, up: Some(2 << 20), down: Some(10 << 20) });
        assert!(s.entries[2].up.is_none() && s.entries[2].down.is_none());
        assert!(parse_bwlimit("25:00,1M").is_err());
        assert!(parse_bwlimit("fast").is_err());
    }
}
