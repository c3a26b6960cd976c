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

/// Lets one log line through per `every` and counts the ones held back, for the lines a peer
/// can cause at will (a refused connection, a malformed message): a peer that repeats itself a
/// million times must not write a million lines.
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
    /// When the next line may pass, and how many were held back since the last one.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Self {
        Self {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(lines held back since the last one let through)` if this line may be written.
    pub fn check(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (next, held_back) = &mut *state;
        if next.is_some_and(|next| now < next) {
            *held_back += 1;
            return None;
        }
        *next = Some(now + self.every);
        Some(std::mem::take(held_back))
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
}
