//! Liveness: a peer is alive while it sent anything within `interval x liveness`.
//!
//! `zeromq` 0.7 has no ZMTP heartbeats and a partition leaves TCP connections open, so every
//! connecting role keeps one of these per link (RFC 6 timing: 1000 ms x 3 by default).

use std::time::Duration;
use tokio::time::Instant;

/// Heartbeat timing shared by both ends of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval: Duration,
    pub liveness: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(1000),
            liveness: 3,
        }
    }
}

impl Heartbeat {
    /// How long a peer may stay silent before it is taken for dead.
    pub fn expiry(&self) -> Duration {
        self.interval * self.liveness
    }
}

/// When we last heard from one peer.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    last_heard: Instant,
    expiry: Duration,
}

impl Liveness {
    pub fn new(heartbeat: Heartbeat) -> Self {
        Self {
            last_heard: Instant::now(),
            expiry: heartbeat.expiry(),
        }
    }

    /// Any traffic from the peer counts, not only heartbeats.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    pub fn is_expired(&self) -> bool {
        self.last_heard.elapsed() > self.expiry
    }

    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_after_interval_times_liveness() {
        let hb = Heartbeat {
            interval: Duration::from_millis(100),
            liveness: 3,
        };
        let mut l = Liveness::new(hb);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(!l.is_expired());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.is_expired());
        l.heard();
        assert!(!l.is_expired());
    }
}
