//! Progress of long operations (import, export, hydrate, sync): on a
//! terminal an indicatif bar with rate and ETA; otherwise (journald, a log
//! file, CI) a plain line every few seconds; nothing when not asked for.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What a bar counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Chunks,
}

/// How often the plain lines come: every 10 s, or
/// `DRIVEBLK_PROGRESS_MS` milliseconds.
fn line_every() -> Duration {
    std::env::var("DRIVEBLK_PROGRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&ms: &u64| ms > 0)
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// A bar of `len` chunks labelled `what` (see [`bar_of`]).
pub fn bar(on: bool, len: u64, what: &str) -> Progress {
    bar_of(on, len, what, Unit::Chunks)
}

/// A bar of `len` units labelled `what`: drawn on a terminal, plain
/// periodic lines on stderr otherwise, hidden when `on` is false.
pub fn bar_of(on: bool, len: u64, what: &str, unit: Unit) -> Progress {
    if !on {
        return Progress { bar: ProgressBar::hidden(), lines: None };
    }
    if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(len);
        let tpl = match unit {
            Unit::Bytes => "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            Unit::Chunks => "{msg:>8} [{bar:40}] {pos}/{len} chunks {per_sec} ETA {eta}",
        };
        b.set_style(ProgressStyle::with_template(tpl).unwrap_or_else(|_| ProgressStyle::default_bar()));
        b.set_message(what.to_string());
        return Progress { bar: b, lines: None };
    }
    // Not a terminal: the bar only keeps count; a thread prints lines.
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let every = line_every();
    let (bar, d, w) = (b.clone(), done.clone(), what.to_string());
    let _ = std::thread::Builder::new().name("driveblk-progress".into()).spawn(move || {
        let mut next = t0 + every;
        while !d.load(Ordering::Acquire) {
            std::thread::sleep(every.min(Duration::from_millis(100)));
            if Instant::now() >= next && !d.load(Ordering::Acquire) {
                eprintln!("{}", line(&w, unit, bar.position(), bar.length().unwrap_or(0), t0.elapsed()));
                next += every;
            }
        }
    });
    Progress { bar: b, lines: Some(Lines { done, what: what.to_string(), unit, t0 }) }
}

/// One plain progress line: `import: 1.2 GiB of 4.0 GiB (30%), 50.0 MiB/s, about 57 s left`.
pub fn line(what: &str, unit: Unit, pos: u64, len: u64, elapsed: Duration) -> String {
    let fmt = |n: u64| match unit {
        Unit::Bytes => indicatif::BinaryBytes(n).to_string(),
        Unit::Chunks => format!("{n} chunks"),
    };
    let pct = if len == 0 { 100.0 } else { pos as f64 * 100.0 / len as f64 };
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = pos as f64 / secs;
    let rate_s = match unit {
        Unit::Bytes => format!("{}/s", indicatif::BinaryBytes(rate as u64)),
        Unit::Chunks => format!("{rate:.1} chunks/s"),
    };
    let eta = if rate > 0.0 && len > pos {
        format!(", about {} left", indicatif::HumanDuration(Duration::from_secs_f64((len - pos) as f64 / rate)))
    } else {
        String::new()
    };
    let len_s = if len == 0 { String::new() } else { format!(" of {}", fmt(len)) };
    format!("{what}: {}{len_s} ({pct:.0}%), {rate_s}{eta}", fmt(pos).trim_end_matches(" chunks"))
}

/// A progress display; finish it, or drop it.
pub struct Progress {
    bar: ProgressBar,
    lines: Option<Lines>,
}

/// The plain-lines mode's state.
struct Lines {
    done: Arc<AtomicBool>,
    what: String,
    unit: Unit,
    t0: Instant,
}

impl Progress {
    pub fn set_length(&self, n: u64) {
        self.bar.set_length(n);
    }
    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n);
    }
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    pub fn set_message(&self, m: impl Into<std::borrow::Cow<'static, str>>) {
        self.bar.set_message(m);
    }
    /// Ends the display; in plain-lines mode, with a last line.
    pub fn finish_and_clear(&self) {
        if let Some(l) = &self.lines {
            if !l.done.swap(true, Ordering::AcqRel) {
                let (pos, len) = (self.bar.position(), self.bar.length().unwrap_or(0));
                eprintln!("{}", line(&l.what, l.unit, pos, len, l.t0.elapsed()));
            }
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(l) = &self.lines {
            l.done.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_give_amount_rate_and_eta() {
        let l = line("import", Unit::Bytes, 1 << 30, 4 << 30, Duration::from_secs(10));
        assert_eq!(l, "import: 1.00 GiB of 4.00 GiB (25%), 102.40 MiB/s, about 30 seconds left");
        let l = line("hydrate", Unit::Chunks, 50, 100, Duration::from_secs(5));
        assert!(l.starts_with("hydrate: 50 of 100 chunks (50%), 10.0 chunks/s, about 5 seconds left"), "{l}");
    }
}
