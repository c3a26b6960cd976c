//! Validated settings of the three roles (no clap types here; the binaries map flags to these).

use std::time::Duration;

use common::heartbeat::Heartbeat;
use common::link::Reconnect;
use common::wire::limits::Limits;

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
    /// What one peer may send, and make the broker hold (see [`common::wire::router`]): the
    /// frontend's; the backend's are derived from them ([`BrokerConfig::backend_limits`]).
    pub limits: Limits,
    /// Connections open at once on each socket, at most (see [`common::wire::router`]).
    pub max_connections: usize,
    /// A request is dropped (`poisoned`) once this many workers were lost while holding it,
    /// and its retries with it (see [`crate::books`]). At least 1.
    pub max_deliveries: u8,
    /// One broker of a pair (docs/pairs.md); `None`: a broker alone, always serving.
    pub pair: Option<crate::pair::PairConfig>,
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
            max_deliveries: 5,
            pair: None,
        }
    }
}

/// Bytes a reply may carry beyond its request: the client's routing id in front (at most
/// [`common::wire::router::MAX_ID_BYTES`], 255) and what a worker adds, our workers' name (255 bytes
/// is room enough for any name we give), 510 in all; 1 KiB leaves the rest spare. (The empty
/// delimiter is 0 bytes, and frame headers are not counted.)
pub const REPLY_EXTRA_BYTES: u64 = 1 << 10;
/// Frames a reply may carry beyond its request: the client's routing id and our workers' name,
/// 2; 4 leaves two spare.
pub const REPLY_EXTRA_FRAMES: u32 = 4;

impl BrokerConfig {
    /// The backend's limits, derived from the frontend's ([`BrokerConfig::limits`]) so that a
    /// request the frontend accepts can always come back as a reply. A worker's reply is the
    /// request, `[client-id][""][body...]` as the worker got it, plus its name at the end:
    /// with the same limits as the frontend, a request at the frontend's size or frame limit
    /// made every worker's reply too big, the backend cut each worker that took it, and the
    /// books handed the request to the next, without end. The backend takes
    /// `max_message_bytes` + [`REPLY_EXTRA_BYTES`] and `max_frames` + [`REPLY_EXTRA_FRAMES`];
    /// `max_peer_bytes` stays (a request waiting for a worker to read it is within the
    /// frontend's size). A stock worker whose replies outgrow that is cut, and the request is
    /// dropped at the delivery limit.
    pub fn backend_limits(&self) -> Limits {
        Limits {
            max_message_bytes: self
                .limits
                .max_message_bytes
                .saturating_add(REPLY_EXTRA_BYTES),
            max_frames: self.limits.max_frames.saturating_add(REPLY_EXTRA_FRAMES),
            max_peer_bytes: self.limits.max_peer_bytes,
        }
    }
}

/// An echo worker speaking RFC 6.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The brokers' backends: one, or both of a pair (the worker serves each on a link of
    /// its own, so that the backup already knows it when it takes over).
    pub connect: Vec<String>,
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
    /// The brokers' frontends: one, or both of a pair (the first is tried first; each lost
    /// link moves on to the next).
    pub connect: Vec<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_takes_any_reply_to_a_request_the_frontend_takes() {
        let config = BrokerConfig::default();
        let (front, back) = (config.limits, config.backend_limits());
        assert_eq!(back.max_message_bytes, front.max_message_bytes + 1024);
        assert_eq!(back.max_frames, front.max_frames + 4);
        assert_eq!(back.max_peer_bytes, front.max_peer_bytes);
        // The largest request, as a worker sends its reply back: the client's id in front, the
        // worker's name at the end, both at 255 bytes.
        let id = common::wire::router::MAX_ID_BYTES as u64;
        let reply_bytes = id + front.max_message_bytes + 255;
        let reply_frames = 1 + front.max_frames + 1;
        assert!(reply_bytes <= back.max_message_bytes);
        assert!(reply_frames <= back.max_frames);
        // No overflow at the flags' extremes.
        let mut huge = config;
        huge.limits.max_message_bytes = u64::MAX;
        huge.limits.max_frames = u32::MAX;
        assert_eq!(huge.backend_limits().max_message_bytes, u64::MAX);
        assert_eq!(huge.backend_limits().max_frames, u32::MAX);
    }
}
