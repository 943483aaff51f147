//! Fault injection knobs (all adjustable while the emulator runs) and the request statistics.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The per-user request quota: a token bucket of `burst` requests refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

const NONE: u64 = u64::MAX;

/// Faults to inject; every setter takes effect for the next request.
pub struct Faults {
    error_rate: AtomicU64,
    reset_rate: AtomicU64,
    lost_reply_rate: AtomicU64,
    latency_us: AtomicU64,
    jitter_us: AtomicU64,
    bandwidth_bps: AtomicU64,
    listing_lag_us: AtomicU64,
    rate: Mutex<Option<Bucket>>,
    rate_alternate: AtomicU64,
    pub(crate) token_epoch: AtomicU64,
    pub(crate) refresh_epoch: AtomicU64,
    pub(crate) session_epoch: AtomicU64,
    storage_quota: AtomicU64,
    folder_child_limit: AtomicU64,
    upload_cap: AtomicU64,
    pub(crate) uploaded_bytes: AtomicU64,
    download_quota: AtomicBool,
    down: AtomicBool,
    silent: AtomicBool,
    sa_no_quota: AtomicBool,
    short_pages: AtomicBool,
    consent_denied: AtomicBool,
}

impl Faults {
    pub(crate) fn new(cfg: &crate::Config) -> Faults {
        let f = Faults {
            error_rate: AtomicU64::new(0f64.to_bits()),
            reset_rate: AtomicU64::new(0f64.to_bits()),
            lost_reply_rate: AtomicU64::new(0f64.to_bits()),
            latency_us: AtomicU64::new(cfg.latency.as_micros() as u64),
            jitter_us: AtomicU64::new(cfg.jitter.as_micros() as u64),
            bandwidth_bps: AtomicU64::new(cfg.bandwidth_bps.unwrap_or(NONE)),
            listing_lag_us: AtomicU64::new(cfg.listing_lag.as_micros() as u64),
            rate: Mutex::new(None),
            rate_alternate: AtomicU64::new(0),
            token_epoch: AtomicU64::new(0),
            refresh_epoch: AtomicU64::new(0),
            session_epoch: AtomicU64::new(0),
            storage_quota: AtomicU64::new(NONE),
            folder_child_limit: AtomicU64::new(NONE),
            upload_cap: AtomicU64::new(NONE),
            uploaded_bytes: AtomicU64::new(0),
            download_quota: AtomicBool::new(false),
            down: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            sa_no_quota: AtomicBool::new(false),
            short_pages: AtomicBool::new(false),
            consent_denied: AtomicBool::new(false),
        };
        f.set_rate_limit(cfg.rate_limit);
        f
    }

    /// Probability (0..=1) that an API request answers 500 or 503 with Google's error JSON.
    pub fn set_error_rate(&self, p: f64) {
        self.error_rate.store(p.clamp(0.0, 1.0).to_bits(), Ordering::SeqCst);
    }
    /// Probability (0..=1) that a media download or an upload body is cut off mid-body
    /// (the connection is dropped).
    pub fn set_reset_rate(&self, p: f64) {
        self.reset_rate.store(p.clamp(0.0, 1.0).to_bits(), Ordering::SeqCst);
    }
    /// Probability (0..=1) that a write (POST, PATCH, PUT, DELETE) is carried out but its
    /// answer is lost: the connection drops instead. Retries must recognise their own
    /// earlier success (e.g. a 409 for a create with a pre-generated id).
    pub fn set_lost_reply_rate(&self, p: f64) {
        self.lost_reply_rate.store(p.clamp(0.0, 1.0).to_bits(), Ordering::SeqCst);
    }
    pub fn set_rate_limit(&self, r: Option<RateLimit>) {
        *self.rate.lock() = r.map(|limit| Bucket { limit, tokens: limit.burst.max(1) as f64, last: Instant::now() });
    }
    /// The user at the authorization endpoint clicks "Cancel": the loopback redirect
    /// carries `error=access_denied` instead of a code.
    pub fn set_consent_denied(&self, on: bool) {
        self.consent_denied.store(on, Ordering::SeqCst);
    }
    pub(crate) fn consent_denied(&self) -> bool {
        self.consent_denied.load(Ordering::SeqCst)
    }
    /// Makes every refresh token issued so far answer `invalid_grant`.
    pub fn revoke_refresh_tokens(&self) {
        self.refresh_epoch.fetch_add(1, Ordering::SeqCst);
    }
    /// Makes every access token issued so far answer 401 (as if its hour had run out).
    pub fn expire_tokens_now(&self) {
        self.token_epoch.fetch_add(1, Ordering::SeqCst);
    }
    /// Forgets every resumable upload session (their URIs answer 404, as expired ones do).
    pub fn expire_upload_sessions(&self) {
        self.session_epoch.fetch_add(1, Ordering::SeqCst);
    }
    /// Storage quota in bytes for My Drive (trash included); None = unlimited.
    pub fn set_storage_quota(&self, bytes: Option<u64>) {
        self.storage_quota.store(bytes.unwrap_or(NONE), Ordering::SeqCst);
    }
    /// The most items a folder other than a root may hold directly (Drive's is 500,000;
    /// "Resolve errors": `numChildrenInNonRootLimitExceeded`); a create into a full folder
    /// answers that 403. Trashed children count (Drive does not say; the stricter reading).
    /// None = unlimited.
    pub fn set_folder_child_limit(&self, items: Option<u64>) {
        self.folder_child_limit.store(items.unwrap_or(NONE), Ordering::SeqCst);
    }
    /// The daily upload cap (Drive's 750 GB/day) in bytes; None = unlimited. Setting it
    /// starts a new "day": the bytes counted so far are forgotten.
    pub fn set_daily_upload_cap(&self, bytes: Option<u64>) {
        self.uploaded_bytes.store(0, Ordering::SeqCst);
        self.upload_cap.store(bytes.unwrap_or(NONE), Ordering::SeqCst);
    }
    /// While true, every `alt=media` download answers 403 downloadQuotaExceeded.
    pub fn set_download_quota_exceeded(&self, on: bool) {
        self.download_quota.store(on, Ordering::SeqCst);
    }
    pub fn set_latency(&self, d: Duration) {
        self.latency_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
    pub fn set_jitter(&self, d: Duration) {
        self.jitter_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
    /// The shared link's bandwidth in bits per second; None = unlimited.
    pub fn set_bandwidth(&self, bps: Option<u64>) {
        self.bandwidth_bps.store(bps.unwrap_or(NONE), Ordering::SeqCst);
    }
    pub fn set_listing_lag(&self, d: Duration) {
        self.listing_lag_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
    /// While true, every connection is dropped at once (new and kept-alive ones).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// While true, the service is a silent peer (a stalled network, a
    /// laptop between networks): connections are accepted by the kernel and
    /// requests are read, but nothing answers until it is false again;
    /// requests held meanwhile are answered then.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
    /// While true, uploads of files with bytes into My Drive answer 403 storageQuotaExceeded
    /// "Service Accounts do not have storage quota" when made with a service-account token,
    /// as Drive does since 2024 (shared drives still work).
    pub fn set_service_account_has_no_quota(&self, on: bool) {
        self.sa_no_quota.store(on, Ordering::SeqCst);
    }

    /// While true, files.list pages hold a random number of items (empty ones included)
    /// before the end, as Drive's reference warns they may; `nextPageToken` still leads on.
    pub fn set_short_pages(&self, on: bool) {
        self.short_pages.store(on, Ordering::SeqCst);
    }
    pub(crate) fn short_pages(&self) -> bool {
        self.short_pages.load(Ordering::SeqCst)
    }

    pub(crate) fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate.load(Ordering::SeqCst))
    }
    pub(crate) fn reset_rate(&self) -> f64 {
        f64::from_bits(self.reset_rate.load(Ordering::SeqCst))
    }
    pub(crate) fn lost_reply_rate(&self) -> f64 {
        f64::from_bits(self.lost_reply_rate.load(Ordering::SeqCst))
    }
    pub(crate) fn latency(&self) -> (Duration, Duration) {
        (
            Duration::from_micros(self.latency_us.load(Ordering::SeqCst)),
            Duration::from_micros(self.jitter_us.load(Ordering::SeqCst)),
        )
    }
    pub(crate) fn bandwidth(&self) -> Option<u64> {
        Some(self.bandwidth_bps.load(Ordering::SeqCst)).filter(|b| *b != NONE && *b > 0)
    }
    pub(crate) fn listing_lag(&self) -> Duration {
        Duration::from_micros(self.listing_lag_us.load(Ordering::SeqCst))
    }
    pub(crate) fn folder_child_limit(&self) -> Option<u64> {
        Some(self.folder_child_limit.load(Ordering::SeqCst)).filter(|n| *n != NONE)
    }
    pub(crate) fn storage_quota(&self) -> Option<u64> {
        Some(self.storage_quota.load(Ordering::SeqCst)).filter(|b| *b != NONE)
    }
    pub(crate) fn upload_cap(&self) -> Option<u64> {
        Some(self.upload_cap.load(Ordering::SeqCst)).filter(|b| *b != NONE)
    }
    pub(crate) fn download_quota_exceeded(&self) -> bool {
        self.download_quota.load(Ordering::SeqCst)
    }
    pub(crate) fn is_silent(&self) -> bool {
        self.silent.load(Ordering::SeqCst)
    }
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
    pub(crate) fn sa_no_quota(&self) -> bool {
        self.sa_no_quota.load(Ordering::SeqCst)
    }

    /// Takes one request from the bucket. `Err(Some(wait))` = over quota; the caller answers
    /// 403 userRateLimitExceeded and 429 rateLimitExceeded in turn (Drive sends both).
    /// Once empty, the bucket refuses every request until it refills, so refusals come in
    /// bursts, as they do from Drive.
    pub(crate) fn take_rate_token(&self) -> Result<(), (bool, Duration)> {
        let mut g = self.rate.lock();
        let Some(b) = g.as_mut() else { return Ok(()) };
        let now = Instant::now();
        let dt = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        let refill = if b.limit.per_second.is_finite() { dt * b.limit.per_second.max(0.0) } else { 0.0 };
        b.tokens = (b.tokens + refill).min(b.limit.burst.max(1) as f64);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let rate = b.limit.per_second;
        let wait = if rate.is_finite() && rate > 0.0 { ((1.0 - b.tokens) / rate).clamp(0.0, 3600.0) } else { 3600.0 };
        let use_429 = self.rate_alternate.fetch_add(1, Ordering::SeqCst) % 2 == 1;
        Err((use_429, Duration::from_secs_f64(wait)))
    }
}

/// What the emulator has seen and sent, for tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Requests by kind, e.g. "files.get", "files.get media", "upload resumable chunk", "token";
    /// "token pkce S256" (or "plain") counts code exchanges whose `code_verifier` matched
    /// the authorization request's challenge.
    pub requests: BTreeMap<String, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Every 4xx/5xx answer, by status code.
    pub errors: BTreeMap<u16, u64>,
    pub rate_limited_403: u64,
    pub rate_limited_429: u64,
    /// 5xx answers the fault injector chose.
    pub injected_5xx: u64,
    /// Connections dropped on purpose (resets mid-body, lost replies and `set_down`).
    pub resets: u64,
    /// Writes carried out whose answer was then dropped (`set_lost_reply_rate`).
    pub lost_replies: u64,
    /// Resumable chunks that arrived after the session had been interrupted or queried.
    pub uploads_resumed: u64,
    /// Resumable uploads completed.
    pub uploads_completed: u64,
}

#[derive(Default)]
pub(crate) struct StatsCell(pub Mutex<Stats>);

impl StatsCell {
    pub fn request(&self, kind: &str) {
        *self.0.lock().requests.entry(kind.to_string()).or_default() += 1;
    }
    pub fn with(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.0.lock())
    }
}

/// One shared link: transfers take turns in slices, so together they never beat the cap.
pub(crate) struct Link {
    busy_until: Mutex<Instant>,
}

/// How late a transfer may come back for its next slice and still find the link as it
/// left it: a timer wakes up to a millisecond or so late and the frame then has to be
/// written, while a real link keeps sending from its buffers meanwhile. Without this a
/// lone transfer lost that gap on every 64 KiB slice (about 70% of a 200 Mbit/s link).
const CONTINUE_SLACK: Duration = Duration::from_millis(5);

impl Link {
    pub fn new() -> Link {
        Link { busy_until: Mutex::new(Instant::now()) }
    }

    /// Waits until `bytes` more could have crossed a link of `bps` bits per second.
    /// `turn` is the transfer's own: where its last slice ended (None before its first).
    pub async fn pace(&self, turn: &mut Option<Instant>, bytes: usize, bps: Option<u64>) {
        let Some(bps) = bps else { return };
        let dur = Duration::from_secs_f64(bytes as f64 * 8.0 / bps as f64);
        let until = self.reserve(Instant::now(), turn, dur);
        tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    }

    /// Books `dur` of the link at `now` for a transfer whose last slice ended at `turn`,
    /// and returns when it ends. A transfer back within [`CONTINUE_SLACK`] of its last
    /// slice's end goes on from where the link is; anything else (a first slice, a reader
    /// that stopped reading) starts no earlier than `now`.
    fn reserve(&self, now: Instant, turn: &mut Option<Instant>, dur: Duration) -> Instant {
        let mut g = self.busy_until.lock();
        let continues = turn.is_some_and(|t| now.saturating_duration_since(t) <= CONTINUE_SLACK);
        let start = if continues { *g } else { (*g).max(now) };
        *g = start + dur;
        *turn = Some(*g);
        *g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_transfer_back_late_by_a_timer_tick_loses_no_link_time() {
        let link = Link::new();
        let t0 = Instant::now() + 1000 * MS;
        let mut turn = None;
        assert_eq!(link.reserve(t0, &mut turn, 3 * MS), t0 + 3 * MS);
        // Back 1 ms after its slice ended, the link idle meanwhile: it goes on from there.
        assert_eq!(link.reserve(t0 + 4 * MS, &mut turn, 3 * MS), t0 + 6 * MS);
        // A reader that stopped for 50 ms does not get that time back.
        assert_eq!(link.reserve(t0 + 56 * MS, &mut turn, 3 * MS), t0 + 59 * MS);
        // A new transfer on an idle link starts now, not where the link was last busy.
        let mut other = None;
        assert_eq!(link.reserve(t0 + 60 * MS, &mut other, 3 * MS), t0 + 63 * MS);
        // Two at once take turns: the second waits for the first's slice.
        let mut a = None;
        let mut b = None;
        assert_eq!(link.reserve(t0 + 100 * MS, &mut a, 3 * MS), t0 + 103 * MS);
        assert_eq!(link.reserve(t0 + 100 * MS, &mut b, 3 * MS), t0 + 106 * MS);
    }
}
