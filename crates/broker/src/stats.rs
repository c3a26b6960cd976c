//! Counters the broker logs periodically and on exit.

use serde::{Deserialize, Serialize};

/// Broker counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStats {
    /// Valid requests received from clients.
    pub requests_in: u64,
    /// Replies handed to clients' queues.
    pub replies_out: u64,
    /// Requests handed to workers (re-dispatches after a purge count again).
    pub dispatched: u64,
    /// Workers forgotten (silent, disconnected or unreachable).
    pub purged: u64,
    /// Requests given back to the queue because their worker was purged.
    pub requeued: u64,
    /// Requests dropped because the queue was full (refused, or displaced by another
    /// client's).
    pub rejected: u64,
    /// Requests that arrived while the same request (client, first body frame) was already
    /// queued or with a worker, and not answered yet: retries, not run again.
    pub merged: u64,
    /// Queued requests dropped because their client went away or stopped reading.
    pub forgotten: u64,
    /// Replies whose client was gone or not reading.
    pub undeliverable: u64,
    /// Of those, replies to a client whose queue was full (it stopped reading).
    pub stalled: u64,
    /// Replies to requests already answered (a worker repeating itself), dropped.
    pub stale_replies: u64,
    /// Replies from a backend peer that never held the request (neither its worker nor one
    /// purged while holding it), dropped.
    #[serde(default)]
    pub stray_replies: u64,
    /// Malformed messages from clients.
    pub bad_frontend: u64,
    /// Malformed messages from workers.
    pub bad_backend: u64,
    /// Connections the sockets cut off for breaking the limits (oversized frames or messages,
    /// too many frames, not ZMTP 3, a handshake not done in time). The name is the one the
    /// roles behind `common::guard` report.
    pub guard_refused: u64,
    /// Connections the sockets cut off because more than `--max-peer-bytes` waited for the peer
    /// to read (a client not reading its replies, a worker not reading its requests).
    #[serde(default)]
    pub guard_stalled: u64,
    /// Quiet connections closed to make room for new ones at `--max-connections`.
    #[serde(default)]
    pub evicted: u64,
    /// New connections closed at once at `--max-connections` (every open one heard lately).
    #[serde(default)]
    pub turned_away: u64,
    /// Requests dropped at the delivery limit (`--max-deliveries`): that many workers were
    /// lost (cut, disconnected, stalled or silent) while holding each. Never answered.
    #[serde(default)]
    pub poisoned: u64,
    /// Requests dropped on arrival because their key (client, first body frame) was poisoned:
    /// the clients' retries of poisoned requests.
    #[serde(default)]
    pub poisoned_retries: u64,
    /// New requests that arrived while a worker still held an answered copy with their key
    /// (a stock REQ's next "Hello"): parked, and run once that worker freed the key.
    #[serde(default)]
    pub parked: u64,
    /// Workers first heard through a HEARTBEAT (never seen READY, or purged since), taken as
    /// READY with one credit: a stock RFC 6 worker reconnected by libzmq under a restarted
    /// broker, or a worker purged while alive.
    #[serde(default)]
    pub heartbeat_ready: u64,
    /// Pair only (`--pair`): 1 while this broker serves clients, 0 while it does not (starting,
    /// or passive). Always 1 without a pair.
    #[serde(default)]
    pub active: u64,
    /// Pair only: the term of the last activation this broker knows of (docs/pairs.md).
    #[serde(default)]
    pub term: u64,
    /// Pair only: times this broker became active.
    #[serde(default)]
    pub activations: u64,
    /// Pair only: times it stopped serving because its peer was active at a higher term.
    #[serde(default)]
    pub yielded: u64,
    /// Pair only: clients' requests dropped because this broker was not active (their
    /// clients time out and go to the other broker).
    #[serde(default)]
    pub refused_inactive: u64,
}
