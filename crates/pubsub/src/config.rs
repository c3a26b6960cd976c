//! Validated settings of the three roles (no clap types here; the binaries map flags to these).

use std::time::Duration;

use common::heartbeat::Heartbeat;
use common::link::Reconnect;
use common::wire::limits::Limits;

use crate::protocol::Zip;

/// Publishers connect here (the proxy's XSUB). The broker has 5559/5560, the pipeline
/// 5557/5558/5561.
pub const DEFAULT_XSUB: &str = "tcp://127.0.0.1:5555";
/// Subscribers connect here (the proxy's XPUB).
pub const DEFAULT_XPUB: &str = "tcp://127.0.0.1:5556";

/// Bytes waiting for one subscriber, at most, by default: about 1,000 updates of 1 KiB (libzmq's
/// high-water mark), more of smaller ones.
pub const DEFAULT_SUBSCRIBER_BYTES: u64 = 1 << 20;

/// The XSUB/XPUB proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub xsub: String,
    pub xpub: String,
    /// Heartbeats to subscribers and publishers go out every `heartbeat.interval`.
    pub heartbeat: Heartbeat,
    /// Bytes waiting for one subscriber, at most (beyond, it misses updates, counted, like a
    /// libzmq XPUB at its high-water mark).
    pub subscriber_bytes: u64,
    /// Distinct subscription prefixes held at most.
    pub max_topics: usize,
    /// Prefixes one subscriber connection holds at most.
    pub max_prefixes_per_connection: usize,
    /// A subscriber whose writes have waited this long is cut if it stopped reading (its kernel
    /// acknowledges with a zero window); one that cannot be reached is kept.
    pub stall_timeout: Duration,
    /// Re-send the last update of each topic to a new subscription (last value cache).
    pub last_value_cache: bool,
    /// The loop may stall this long before the process exits with status 70.
    pub watchdog: Duration,
    pub stats_every: Duration,
    /// What one publisher may send, and make the XSUB hold (see `common::wire::server`).
    pub limits: Limits,
    /// Publisher connections open at once, at most (see `common::wire::server`).
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            xsub: DEFAULT_XSUB.into(),
            xpub: DEFAULT_XPUB.into(),
            heartbeat: Heartbeat::default(),
            subscriber_bytes: DEFAULT_SUBSCRIBER_BYTES,
            max_topics: 100_000,
            max_prefixes_per_connection: 10_000,
            stall_timeout: Duration::from_millis(2000),
            last_value_cache: true,
            watchdog: Duration::from_secs(10),
            stats_every: Duration::from_secs(5),
            limits: Limits::default(),
            max_connections: common::endpoint::max_connections_for(1024, 2),
        }
    }
}

/// A weather publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The proxy's XSUB; for a proxy pair, both: every update goes to each.
    pub connect: Vec<String>,
    /// Name carried in every update (no spaces).
    pub id: String,
    pub zips: Vec<Zip>,
    /// Updates per second, all zips together; 0: as fast as possible.
    pub rate: f64,
    /// Stop after this many updates; `None`: until stopped.
    pub count: Option<u64>,
    /// Wait until a subscription reaches this publisher before the first update, at most this
    /// long (`None`: start at once).
    pub wait_subscriber: Option<Duration>,
    /// Expect the proxy's heartbeats at this rhythm; silence means a lost link.
    pub heartbeat: Heartbeat,
    pub reconnect: Reconnect,
}

/// A weather subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The proxy's XPUB; for a proxy pair, both: subscribed through each, every update
    /// delivered once.
    pub connect: Vec<String>,
    pub zips: Vec<Zip>,
    /// Stop after this many updates (duplicates not counted).
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Print each update and the running average on stdout.
    pub print_updates: bool,
    pub heartbeat: Heartbeat,
    pub reconnect: Reconnect,
}
