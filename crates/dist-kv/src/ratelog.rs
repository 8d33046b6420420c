//! Rate limits for log lines a peer can trigger (a refused connection, a refused PUT, a dropped
//! message): a burst of lines per window, then silence, and the next line allowed says how many
//! were left out. A flood of hostile connections costs a few lines, not a line each.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of log line's limit; see the module docs.
#[derive(Debug)]
pub(crate) struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// At most `burst` lines per `window`.
    pub(crate) const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            state: Mutex::new(State {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being the lines left out since the last
    /// one written; `None` when this one is to be left out.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at `now`.
    pub(crate) fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let in_window = s
            .start
            .is_some_and(|t| now.saturating_duration_since(t) < self.window);
        if !in_window {
            s.start = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// Logs a warning through `limit`: `warn_limited!(LIMIT, field = value, ...; "message")`, with a
/// `suppressed` field counting the lines left out before it.
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let l = RateLimit::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(l.allow_at(t0 + Duration::from_secs(1)), None);
        }
        // The next window starts with the count of the five left out.
        assert_eq!(l.allow_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(11)), Some(0));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(12)), None);
    }
}
