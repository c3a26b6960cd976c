//! Validated settings of the three roles (no clap types here; the binaries map flags to these).

use std::time::Duration;

use common::guard::Limits;
use common::heartbeat::Heartbeat;
use common::link::Reconnect;

pub const DEFAULT_FRONTEND: &str = "tcp://127.0.0.1:5559";
pub const DEFAULT_BACKEND: &str = "tcp://127.0.0.1:5560";

/// The broker (shared queue).
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Where clients connect (ROUTER, bound).
    pub frontend: String,
    /// Where workers connect (ROUTER, bound).
    pub backend: String,
    pub heartbeat: Heartbeat,
    /// Requests waiting for a worker beyond this are dropped (counted as `rejected`).
    pub max_queued: usize,
    /// The same bound in bytes (all frames of the waiting requests).
    pub max_queued_bytes: usize,
    /// A loop that does not come round for this long exits the process (status 70), so that
    /// a supervisor restarts it; at least three heartbeat intervals.
    pub watchdog: Duration,
    /// On shutdown, how long to keep forwarding replies of requests already with workers.
    pub drain: Duration,
    /// How often to log a stats line.
    pub stats_every: Duration,
    /// What one peer may send, and make the broker hold (see [`crate::router`]).
    pub limits: Limits,
    /// Connections open at once on each socket, at most (see [`crate::router`]).
    pub max_connections: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            frontend: DEFAULT_FRONTEND.into(),
            backend: DEFAULT_BACKEND.into(),
            heartbeat: Heartbeat::default(),
            max_queued: 10_000,
            max_queued_bytes: 64 << 20,
            watchdog: Duration::from_secs(10),
            drain: Duration::from_secs(2),
            stats_every: Duration::from_secs(5),
            limits: Limits::default(),
            max_connections: common::endpoint::max_connections_for(1024, 2),
        }
    }
}

/// An echo worker speaking RFC 6.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub connect: String,
    /// Added as the last frame of every reply so clients can count replies per worker.
    pub name: String,
    /// Simulated work per request.
    pub work: Duration,
    /// Requests this worker may hold at once (READY credits; 1 is plain RFC 6).
    pub capacity: u32,
    pub heartbeat: Heartbeat,
    pub reconnect: Reconnect,
    /// On shutdown, how long to finish requests in hand.
    pub drain: Duration,
}

/// A Lazy Pirate client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect: String,
    pub requests: u64,
    pub concurrency: usize,
    /// Payload bytes per request (at least the text `request <id>`).
    pub size: usize,
    /// A request unanswered for this long is sent again.
    pub timeout: Duration,
    /// The client gives up after this, reporting what was lost.
    pub deadline: Duration,
    pub reconnect: Reconnect,
}
