//! Counters the proxy logs every `--stats-secs` and at exit (and prints as JSON with `--json`).

use serde::{Deserialize, Serialize};

/// Prefixes listed in [`ProxyStats::topics`], at most (every stats line carries them).
pub const TOPICS_SHOWN: usize = 1000;

/// Proxy counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Messages read from publishers.
    pub messages_in: u64,
    /// Messages handed to the XPUB (each reaches every matching subscriber with room for it).
    pub messages_out: u64,
    /// Updates a subscriber missed because its outbox was full (once per subscriber).
    #[serde(default)]
    pub slow_dropped: u64,
    /// Subscriber connections cut because they stopped reading for the stall timeout (their
    /// kernel still acknowledging).
    pub stalled_cut: u64,
    /// Subscribers found unreachable while writes to them waited, whose connections were kept
    /// for when the link heals (once per episode).
    #[serde(default)]
    pub unreachable: u64,
    /// Last values re-sent for new subscriptions.
    pub cached_sent: u64,
    pub heartbeats: u64,
    /// Subscribe and unsubscribe messages received from subscribers (a subscribe to a prefix
    /// the connection holds already, or an unsubscribe of one it does not hold, changes
    /// nothing).
    pub subscribes: u64,
    pub unsubscribes: u64,
    /// Subscriptions let go because their connection ended.
    #[serde(default)]
    pub released: u64,
    /// Subscription changes forwarded to publishers (first connection to hold a prefix, or
    /// last to let it go).
    pub forwarded: u64,
    /// Subscriptions to new prefixes refused because the table was full (`--max-topics`).
    pub refused: u64,
    /// Subscriptions refused because the connection held `--max-prefixes-per-connection`.
    #[serde(default)]
    pub refused_per_connection: u64,
    /// Malformed messages from subscribers (not a subscription), and unsubscribes of a prefix
    /// the connection does not hold.
    pub bad_xpub: u64,
    /// Receive errors reported by either socket (peer reset, bad handshake...).
    pub peer_errors: u64,
    /// Connections accepted from publishers and from subscribers.
    pub publishers_seen: u64,
    pub subscribers_seen: u64,
    /// Publisher connections cut because a newer one of the same publisher (same identity,
    /// same address) joined, and the messages that still came from them, discarded: a
    /// publisher never goes back in time through the proxy.
    #[serde(default)]
    pub handovers: u64,
    #[serde(default)]
    pub superseded: u64,
    /// Connections the guards cut off: oversized or malformed input (garbage, a greeting cut
    /// short), and peers that let more than `--max-peer-bytes` pile up unread.
    pub guard_refused: u64,
    pub guard_stalled: u64,
    /// Prefixes currently asked for upstream, and the first [`TOPICS_SHOWN`] of them in order
    /// with the number of connections holding each.
    #[serde(default)]
    pub topics_held: u64,
    pub topics: Vec<(String, u64)>,
}
