//! Rate-limited warnings, so a hostile or buggy guest cannot flood the log.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lets at most `per_window` messages through per `window`; counts the rest
/// and reports the count with the next message that passes.
pub struct LogLimiter {
    state: Mutex<State>,
    per_window: u32,
    window: Duration,
}

struct State {
    start: Instant,
    passed: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self { state: Mutex::new(State { start: Instant::now(), passed: 0, suppressed: 0 }), per_window, window }
    }

    /// `Some(suppressed_since_last)` if this message may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock();
        let now = Instant::now();
        if now.duration_since(s.start) >= self.window {
            s.start = now;
            s.passed = 0;
        }
        if s.passed < self.per_window {
            s.passed += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_reports_suppressed() {
        let l = LogLimiter::new(2, Duration::from_millis(50));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(l.allow(), Some(2));
    }
}
