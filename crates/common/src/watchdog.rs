//! A loop watchdog: defence in depth for a process whose event loop stops turning.
//!
//! A role's loop calls [`Watchdog::pet`] every time round. A plain OS thread (not a task: a
//! parked runtime thread would park it too) checks every second; if the loop has not come round
//! for the limit, it says so on stderr and exits the process with status 70 (`EX_SOFTWARE`), so
//! that a supervisor restarts it instead of leaving a live process that serves no one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit status of a process stopped by its watchdog.
pub const EXIT_STUCK: i32 = 70;

/// The loop's side of the watchdog. Dropping it stops the watch.
#[derive(Debug)]
pub struct Watchdog {
    start: Instant,
    /// Milliseconds since `start` of the last pet; `u64::MAX` once dropped.
    last: Arc<AtomicU64>,
}

impl Watchdog {
    /// Starts watching: `what` names the loop in the message, `limit` is how long it may stall.
    pub fn spawn(what: &'static str, limit: Duration) -> Self {
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let seen = last.clone();
        let check = limit.min(Duration::from_secs(1));
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(check);
                let pet = seen.load(Ordering::Relaxed);
                if pet == u64::MAX {
                    return;
                }
                let stalled = start.elapsed().saturating_sub(Duration::from_millis(pet));
                if stalled > limit {
                    eprintln!(
                        "error: {what} loop stuck for {:.1} s, exiting so that a supervisor restarts it",
                        stalled.as_secs_f64()
                    );
                    std::process::exit(EXIT_STUCK);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the watchdog thread");
        }
        Self { start, last }
    }

    /// The loop came round.
    pub fn pet(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.last.store(u64::MAX, Ordering::Relaxed);
    }
}
