//! Deliveries per 100 ms: a compact record of when a role received what it counts (a client's
//! replies, a subscriber's updates, a master's finished images), for the lab's timelines.
//!
//! The first bucket starts at `start_unix_ms` (wall clock), so that the lab can lay the record
//! next to its own fault events, taken on the same machine's clock. Buckets are counted from a
//! monotonic clock after that. Memory is bounded: past [`MAX_BUCKETS`] (an hour), later
//! deliveries are not recorded.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The width of a bucket.
pub const BUCKET: Duration = Duration::from_millis(100);
/// At most an hour of buckets.
pub const MAX_BUCKETS: usize = 36_000;

/// Deliveries per [`BUCKET`] since `start_unix_ms`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// Wall-clock start of the first bucket, in ms since the Unix epoch (0: never started).
    pub start_unix_ms: u64,
    /// The width of a bucket in ms (100).
    pub bucket_ms: u64,
    /// Deliveries in each bucket.
    pub counts: Vec<u32>,
    #[serde(skip)]
    started: Option<Instant>,
}

/// Equal records (the monotonic start is not part of the record).
impl PartialEq for Timeline {
    fn eq(&self, other: &Self) -> bool {
        (self.start_unix_ms, self.bucket_ms, &self.counts)
            == (other.start_unix_ms, other.bucket_ms, &other.counts)
    }
}

impl Timeline {
    /// A timeline whose first bucket starts now.
    pub fn start() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            start_unix_ms: unix.as_millis() as u64,
            bucket_ms: BUCKET.as_millis() as u64,
            counts: Vec::new(),
            started: Some(Instant::now()),
        }
    }

    /// Counts one delivery now.
    pub fn record(&mut self) {
        self.record_at(Instant::now());
    }

    /// Counts one delivery at `at` (ignored before the start, past [`MAX_BUCKETS`], or on a
    /// timeline never started).
    pub fn record_at(&mut self, at: Instant) {
        let Some(started) = self.started else { return };
        let Some(since) = at.checked_duration_since(started) else {
            return;
        };
        let i = (since.as_millis() / BUCKET.as_millis()) as usize;
        if i >= MAX_BUCKETS {
            return;
        }
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    /// All deliveries recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_100_ms_bucket() {
        let mut t = Timeline::start();
        let t0 = t.started.expect("started");
        t.record_at(t0);
        t.record_at(t0 + Duration::from_millis(99));
        t.record_at(t0 + Duration::from_millis(250));
        t.record_at(t0 + BUCKET * MAX_BUCKETS as u32);
        assert_eq!(t.counts, vec![2, 0, 1]);
        assert_eq!(t.total(), 3);
        assert_eq!(t.bucket_ms, 100);
        assert!(t.start_unix_ms > 0);
    }

    #[test]
    fn an_unstarted_timeline_records_nothing() {
        let mut t = Timeline::default();
        t.record();
        assert!(t.counts.is_empty());
    }
}
