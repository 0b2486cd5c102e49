//! Log lines a guest or a vfio-user client can cause at will, rate-limited: each kind of line
//! of each device (or connection) keeps a [`Limiter`] and writes at most [`BURST`] lines per
//! [`WINDOW`]; the next line written says how many were left out. A guest that rings a million
//! bad doorbells or rewrites a bad DSR in a loop costs its neighbours a few lines of log, not a
//! disk.

use std::time::{Duration, Instant};

/// Lines of one kind written per window, at most.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The budget of one kind of guest-caused log line.
#[derive(Debug, Clone)]
pub struct Limiter {
    burst: u32,
    window: Duration,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(BURST, WINDOW)
    }
}

impl Limiter {
    /// At most `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> Limiter {
        Limiter {
            burst,
            window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were left out since the
    /// last one written; `None` when this one is left out (and counted).
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.start {
            Some(s) if now.duration_since(s) < self.window => {}
            _ => {
                self.start = Some(now);
                self.used = 0;
            }
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// `log::log!` through a [`Limiter`]: `limited!(log::Level::Info, limiter, "format", args…)`.
/// A line after some were left out ends with how many.
#[macro_export]
macro_rules! limited {
    ($level:expr, $limiter:expr, $($arg:tt)+) => {
        match $limiter.allow() {
            Some(0) => log::log!($level, $($arg)+),
            Some(n) => log::log!(
                $level,
                "{} ({n} more like it not logged)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    };
}

/// `log::warn!` through a [`Limiter`]: `limited_warn!(limiter, "format", args…)`.
#[macro_export]
macro_rules! limited_warn {
    ($limiter:expr, $($arg:tt)+) => {
        $crate::limited!(log::Level::Warn, $limiter, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let mut l = Limiter::new(3, Duration::from_millis(200));
        assert_eq!(
            (0..1000).filter_map(|_| l.allow()).collect::<Vec<_>>(),
            vec![0, 0, 0]
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow(), Some(997), "the first line of a new window");
        assert_eq!(l.allow(), Some(0));
    }

    #[test]
    fn the_default_allows_ten_a_minute() {
        let mut l = Limiter::default();
        assert_eq!((0..1_000_000).filter(|_| l.allow().is_some()).count(), 10);
    }
}
