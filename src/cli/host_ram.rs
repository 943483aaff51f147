//! The RAM tiers of the daemons of one host: each volume's daemon records
//! its `--ram-cache` in a host record (`$DRIVEBLK_LINK/ram`), and a start
//! that takes the live daemons' sum past a quarter of the host's memory
//! says so, naming them: each tier is held on top of its guest's memory
//! once the guest has read that much, so three default daemons on a
//! laptop take 3 GiB it may not have.

use std::path::Path;

use crate::remote::host_state::{alive, get_u64, put_u64, HostRecord};

/// Daemons tracked; more still serve, uncounted.
const SLOTS: usize = 64;

/// Records this process's RAM tier of `bytes` in the record at `path`,
/// forgets daemons that ended, and answers the live daemons' tiers
/// (pid, bytes), this one included.
pub fn register(path: &Path, bytes: u64) -> std::io::Result<Vec<(u32, u64)>> {
    let rec = HostRecord::open(path, SLOTS * 16)?;
    let me = std::process::id() as u64;
    rec.update(|r| {
        let mut mine = None;
        for s in (0..SLOTS).map(|i| i * 16) {
            let pid = get_u64(r, s);
            if pid == me {
                mine = Some(s);
            } else if pid != 0 && !alive(pid) {
                r[s..s + 16].fill(0);
            }
        }
        if let Some(s) = mine.or_else(|| (0..SLOTS).map(|i| i * 16).find(|&s| get_u64(r, s) == 0)) {
            put_u64(r, s, me);
            put_u64(r, s + 8, bytes);
        }
        (0..SLOTS)
            .map(|i| i * 16)
            .filter(|&s| get_u64(r, s) != 0)
            .map(|s| (get_u64(r, s) as u32, get_u64(r, s + 8)))
            .collect()
    })
}

/// The host's memory in bytes (`MemTotal`), if the kernel says.
fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// At a volume's start: records its RAM tier and warns when the live
/// daemons' tiers add up to more than a quarter of the host's memory. A
/// record that cannot be used costs only the warning.
pub fn check_at_start(ram_cache: u64) {
    let Ok(dir) = super::cache_dir::link_dir() else { return };
    let daemons = match register(&dir.join("ram"), ram_cache) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!("cannot record this daemon's RAM tier in {}: {e}", dir.display());
            return;
        }
    };
    let (Some(total), sum) = (mem_total(), daemons.iter().map(|d| d.1).sum::<u64>()) else { return };
    if daemons.len() > 1 && sum > total / 4 {
        let me = std::process::id();
        let others: Vec<String> = daemons
            .iter()
            .filter(|d| d.0 != me)
            .map(|(pid, b)| format!("pid {pid} {}", super::size::human(*b)))
            .collect();
        tracing::warn!(
            "the RAM tiers of the {} driveblk daemons on this host add up to {} of its {} memory, on top of their \
             guests' (this one {}; {}): give some of them less (--ram-cache 256M, ram_cache = \"256M\")",
            daemons.len(),
            super::size::human(sum),
            super::size::human(total),
            super::size::human(ram_cache),
            others.join(", ")
        );
    } else if sum > total / 4 {
        tracing::warn!(
            "--ram-cache {} is more than a quarter of this host's {} memory, on top of the guest's",
            super::size::human(ram_cache),
            super::size::human(total)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_daemons_tier_is_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ram");
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let rec = HostRecord::open(&p, SLOTS * 16).unwrap();
        rec.update(|r| {
            put_u64(r, 0, child.id() as u64);
            put_u64(r, 8, 5 << 30);
        })
        .unwrap();
        let live = register(&p, 1 << 30).unwrap();
        assert_eq!(live.iter().map(|d| d.1).sum::<u64>(), 6 << 30, "{live:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        let live = register(&p, 1 << 30).unwrap();
        assert_eq!(live, vec![(std::process::id(), 1 << 30)]);
    }
}
