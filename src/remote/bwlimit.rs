//! Bandwidth limits (`--bwlimit`, like rclone's): a wrapper that paces
//! uploads and downloads to an average byte rate, optionally by time of
//! day, so a long sync leaves a home uplink to the rest of the house most
//! of the time. It spaces whole requests (each waits its share of the
//! rate, then goes at line speed): a 16 MiB pack still fills the uplink
//! while it goes, and a download is paced after it arrived.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{DynRemote, ObjectMeta, PutBody, RemoteResult, Slot};

/// Upload and download limits from one time of day on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwEntry {
    /// Minutes after local midnight the entry starts at.
    pub from_minute: u32,
    /// Bytes per second up; None = unlimited.
    pub up: Option<u64>,
    /// Bytes per second down; None = unlimited.
    pub down: Option<u64>,
}

/// A day's timetable of limits: the entry with the latest start at or
/// before the current local time applies (the last one wraps past
/// midnight). One entry starting at 0 is a plain limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BwSchedule {
    pub entries: Vec<BwEntry>,
}

impl BwSchedule {
    /// The entry in force at `minute` after local midnight.
    pub fn at(&self, minute: u32) -> Option<&BwEntry> {
        let mut sorted: Vec<&BwEntry> = self.entries.iter().collect();
        sorted.sort_by_key(|e| e.from_minute);
        sorted.iter().rev().find(|e| e.from_minute <= minute).or(sorted.last()).copied()
    }

    /// True when nothing is limited at any time.
    pub fn is_unlimited(&self) -> bool {
        self.entries.iter().all(|e| e.up.is_none() && e.down.is_none())
    }
}

/// Minutes after local midnight now.
fn local_minute() -> u32 {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r fills the struct we own; a zeroed tm is valid input.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return 0;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u32
}

/// Paces one direction: each transfer reserves its share of the rate on a
/// shared clock, so many parallel requests together stay under it.
#[derive(Debug, Default)]
struct Pacer {
    free_at: Mutex<Option<Instant>>,
}

impl Pacer {
    async fn pace(&self, bytes: u64, rate: Option<u64>) {
        let Some(rate) = rate.filter(|r| *r > 0) else { return };
        let dur = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let (start, done) = {
            let mut free = self.free_at.lock();
            let now = Instant::now();
            let start = free.map_or(now, |f| f.max(now));
            *free = Some(start + dur);
            (start, start + dur)
        };
        let mut held = Reservation { pacer: self, start, dur, done: false };
        tokio::time::sleep_until(done).await;
        held.done = true;
    }
}

/// A share of the rate reserved by a transfer that has not gone yet. A
/// transfer given up while it waits (its attempt's deadline, a guest that
/// stopped waiting) hands back the part not yet due: kept, each retry of
/// a timed-out upload would queue behind its own earlier attempts, and
/// the upload would never go.
struct Reservation<'a> {
    pacer: &'a Pacer,
    start: Instant,
    dur: Duration,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = Instant::now();
        let unused = self.dur.saturating_sub(now.saturating_duration_since(self.start));
        let mut free = self.pacer.free_at.lock();
        if let Some(f) = *free {
            *free = Some(f.checked_sub(unused).unwrap_or(now).max(now));
        }
    }
}

/// The bandwidth-limiting wrapper.
#[derive(Debug)]
pub struct BwLimitRemote {
    inner: DynRemote,
    schedule: Arc<BwSchedule>,
    up: Pacer,
    down: Pacer,
}

impl BwLimitRemote {
    /// Wraps `inner` under `schedule`.
    pub fn wrap(inner: DynRemote, schedule: Arc<BwSchedule>) -> DynRemote {
        Arc::new(Self { inner, schedule, up: Pacer::default(), down: Pacer::default() })
    }

    fn rates(&self) -> (Option<u64>, Option<u64>) {
        self.schedule.at(local_minute()).map_or((None, None), |e| (e.up, e.down))
    }
}

#[async_trait]
impl super::Layer for BwLimitRemote {
    fn inner(&self) -> &DynRemote {
        &self.inner
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r = self.inner.get_range(key, range).await?;
        self.down.pace(r.len() as u64, self.rates().1).await;
        Ok(r)
    }

    async fn get(&self, key: &str) -> RemoteResult<Bytes> {
        let r = self.inner.get(key).await?;
        self.down.pace(r.len() as u64, self.rates().1).await;
        Ok(r)
    }

    async fn put(&self, key: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.up.pace(body.len().unwrap_or(0), self.rates().0).await;
        self.inner.put(key, body).await
    }

    async fn create(&self, key: &str, slot: Option<&Slot>, tag: &str, body: PutBody) -> RemoteResult<ObjectMeta> {
        self.up.pace(body.len().unwrap_or(0), self.rates().0).await;
        self.inner.create(key, slot, tag, body).await
    }

    async fn get_created(&self, key: &str, slot: Option<&Slot>) -> RemoteResult<Bytes> {
        let r = self.inner.get_created(key, slot).await?;
        self.down.pace(r.len() as u64, self.rates().1).await;
        Ok(r)
    }

    async fn get_range_revision(&self, key: &str, revision: &str, range: Range<u64>) -> RemoteResult<Bytes> {
        let r = self.inner.get_range_revision(key, revision, range).await?;
        self.down.pace(r.len() as u64, self.rates().1).await;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::DirRemote;

    #[test]
    fn timetable_picks_the_entry_in_force() {
        let e = |m, up| BwEntry { from_minute: m, up, down: None };
        let s = BwSchedule { entries: vec![e(8 * 60, Some(1)), e(19 * 60, Some(2)), e(23 * 60, None)] };
        assert_eq!(s.at(9 * 60).unwrap().up, Some(1));
        assert_eq!(s.at(20 * 60).unwrap().up, Some(2));
        assert_eq!(s.at(23 * 60 + 30).unwrap().up, None);
        // Before the first entry, the last one of the previous day applies.
        assert_eq!(s.at(60).unwrap().up, None);
    }

    /// An upload given up while it waits for its turn (its attempt timed
    /// out) does not hold the link for the retry that follows.
    #[tokio::test(start_paused = true)]
    async fn a_transfer_given_up_hands_back_its_share() {
        let p = Pacer::default();
        let t0 = Instant::now();
        let gave_up = tokio::time::timeout(Duration::from_millis(100), p.pace(1 << 20, Some(1 << 20))).await;
        assert!(gave_up.is_err());
        p.pace(512 << 10, Some(1 << 20)).await;
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(600) && el < Duration::from_millis(700), "{el:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn uploads_are_paced_to_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let sched = Arc::new(BwSchedule { entries: vec![BwEntry { from_minute: 0, up: Some(1 << 20), down: None }] });
        let r = BwLimitRemote::wrap(Arc::new(DirRemote::new(d.path())), sched);
        let t0 = Instant::now();
        for i in 0..4 {
            r.put(&format!("p{i}"), PutBody::from_bytes(vec![0u8; 512 << 10])).await.unwrap();
        }
        // 2 MiB at 1 MiB/s.
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(2000) && el < Duration::from_millis(2100), "{el:?}");
        // Downloads are not limited by this schedule.
        let t0 = Instant::now();
        r.get("p0").await.unwrap();
        assert!(t0.elapsed() < Duration::from_millis(10));
    }
}
