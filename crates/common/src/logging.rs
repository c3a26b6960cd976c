//! Logging setup for binaries: human-readable events on stderr, filtered by `RUST_LOG`.
//!
//! stdout is reserved for the `ready` line and JSON summaries that scripts parse.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_filter` (e.g. `"broker=info,common=info"`) applies
/// when `RUST_LOG` is unset. zmq.rs logs through `log`; the `tracing-log` bridge carries it.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Lets `burst` log lines through per `every` (one, with [`Throttle::new`]) and counts the ones
/// held back, for the lines a peer can cause at will (a refused connection, a malformed
/// message): a peer that repeats itself a million times must not write a million lines.
///
/// ```
/// # use std::time::Duration;
/// static REFUSED: common::logging::Throttle = common::logging::Throttle::new(Duration::from_secs(1));
/// if let Some(held_back) = REFUSED.check() {
///     tracing::info!(held_back, "connection refused");
/// }
/// ```
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    burst: u32,
    state: std::sync::Mutex<Window>,
}

/// The current interval: when it ends, lines let through in it, lines held back since the
/// last one let through.
#[derive(Debug)]
struct Window {
    ends: Option<std::time::Instant>,
    passed: u32,
    held_back: u64,
}

impl Throttle {
    /// One line per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        Self::with_burst(every, 1)
    }

    /// `burst` lines per `every` (for lines that come in small groups in ordinary use: a few
    /// workers starting together).
    pub const fn with_burst(every: std::time::Duration, burst: u32) -> Self {
        Self {
            every,
            burst,
            state: std::sync::Mutex::new(Window {
                ends: None,
                passed: 0,
                held_back: 0,
            }),
        }
    }

    /// `Some(lines held back since the last one let through)` if this line may be written.
    pub fn check(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut window = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if window.ends.is_none_or(|ends| now >= ends) {
            window.ends = Some(now + self.every);
            window.passed = 0;
        }
        if window.passed >= self.burst {
            window.held_back += 1;
            return None;
        }
        window.passed += 1;
        Some(std::mem::take(&mut window.held_back))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Throttle;

    #[test]
    fn a_throttle_lets_one_line_through_per_interval_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.check(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.check(), Some(5));
        assert_eq!(throttle.check(), None);
    }

    #[test]
    fn a_throttle_with_a_burst_lets_that_many_through_per_interval() {
        let throttle = Throttle::with_burst(Duration::from_millis(200), 3);
        assert_eq!(
            (0..5).map(|_| throttle.check()).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(0), None, None]
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.check(), Some(2));
    }
}
