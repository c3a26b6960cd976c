//! The proxy: XSUB bound for publishers, XPUB bound for subscribers, one task between them.
//!
//! Both sockets are our own ZMTP code ([`common::wire::xsub`], [`common::wire::xpub`]): their
//! limits on every endpoint, loopback included, a bound on connections, and no peer's error
//! stops the proxy (unlike `zeromq::proxy`). One task owns both, as `zmq_proxy` does: each
//! update read from a publisher is matched to the connections holding a prefix of its topic
//! (found in an index, not by a scan; see [`crate::subscriptions`]) and written into each one's
//! outbox at once; each subscriber's writer task sends what gathered in one call. Nothing
//! queues between the two sides: while the task is busy the XSUB's readers wait, and the kernel
//! pushes back on publishers. The task never waits on a subscriber: one whose outbox holds
//! `--subscriber-bytes` misses updates (counted `slow_dropped`), like a libzmq XPUB at its
//! high-water mark; one that stopped reading is cut after `--stall-timeout-ms`; one that cannot
//! be reached keeps its connection for when the link heals (counted `unreachable`).
//!
//! The same task keeps each connection's subscriptions and releases them when it ends (as
//! libzmq's XPUB does), sends what publishers are asked for upstream (the XSUB keeps that set
//! and gives it to publishers that connect later), sends a new subscription the last values it
//! matches (on that connection only), and heartbeats both sides.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::logging::Throttle;
use common::watchdog::Watchdog;
use common::wire::limits::{GuardStats, Limits};
use common::wire::server::{Event, Outbox};
use common::wire::xpub::XPub;
use common::wire::xsub::XSub;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

use crate::config::ProxyConfig;
use crate::protocol::{self, Subscription, HEARTBEAT_TOPIC};
use crate::stats::{ProxyStats, TOPICS_SHOWN};
use crate::subscriptions::{Outcome, Slot, Subscriptions};

/// Errors that stop the proxy before it serves.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
    #[error("cannot serve {endpoint}: {source}")]
    Serve {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// Batches (what one read of one publisher brought) handled per turn of the loop, at most,
/// when they are ready.
const INTAKE_BATCHES: usize = 64;
/// Largest message a subscriber may send (a subscription is one short frame), and most frames.
const SUBSCRIBER_MESSAGE: u64 = 64 * 1024;
const SUBSCRIBER_FRAMES: u32 = 64;

/// A proxy whose sockets are bound; [`Proxy::run`] serves until cancelled.
pub struct Proxy {
    config: ProxyConfig,
    xsub: XSub,
    xpub: XPub,
    /// Real endpoints (port 0 resolved).
    pub xsub_endpoint: String,
    pub xpub_endpoint: String,
    /// Random, per process: subscribers and publishers tell a restarted proxy by it.
    pub instance: u64,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("xsub", &self.xsub_endpoint)
            .field("xpub", &self.xpub_endpoint)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds both sockets. Neither side has a user timeout: a peer cut off by a partition keeps
    /// its connection for when the link heals (see [`common::endpoint::bind_patient`]).
    pub async fn bind(config: ProxyConfig) -> Result<Self, ProxyError> {
        let serve_err = |endpoint: &str| {
            let endpoint = endpoint.to_string();
            move |source| ProxyError::Serve { endpoint, source }
        };
        let listener = common::endpoint::bind_patient(&config.xsub)?;
        let xsub = XSub::serve(listener, config.limits, config.max_connections)
            .map_err(serve_err(&config.xsub))?;
        let listener = common::endpoint::bind_patient(&config.xpub)?;
        let limits = Limits {
            max_message_bytes: SUBSCRIBER_MESSAGE,
            max_frames: SUBSCRIBER_FRAMES,
            max_peer_bytes: config.subscriber_bytes,
        };
        let xpub = XPub::serve(
            listener,
            limits,
            config.max_connections,
            config.stall_timeout,
        )
        .map_err(serve_err(&config.xpub))?;
        let instance = rand::random::<u64>();
        tracing::info!(
            xsub = %xsub.endpoint,
            xpub = %xpub.endpoint,
            instance = format!("{instance:x}"),
            "proxy bound"
        );
        Ok(Self {
            xsub_endpoint: xsub.endpoint.clone(),
            xpub_endpoint: xpub.endpoint.clone(),
            config,
            xsub,
            xpub,
            instance,
        })
    }

    /// Serves until `shutdown` fires; returns the final stats.
    pub async fn run(self, shutdown: CancellationToken) -> ProxyStats {
        self.run_reporting(shutdown, |_| {}).await
    }

    /// [`Proxy::run`], handing the counters to `report` every `stats_every`.
    pub async fn run_reporting(
        self,
        shutdown: CancellationToken,
        mut report: impl FnMut(&ProxyStats),
    ) -> ProxyStats {
        let Self {
            config,
            xsub,
            xpub,
            instance,
            ..
        } = self;
        let mut proxy = Running {
            subscriptions: Subscriptions::new(
                config.max_topics,
                config.max_prefixes_per_connection,
            ),
            slots: HashMap::new(),
            targets: Vec::new(),
            cache: foldhash::HashMap::default(),
            cached_topics: BTreeSet::new(),
            stats: ProxyStats::default(),
            config,
            xsub,
            xpub,
            instance,
        };
        proxy.run(&shutdown, &mut report).await;
        let outboxes: Vec<Arc<Outbox>> = proxy
            .subscriptions
            .peers()
            .map(|p| p.outbox.clone())
            .collect();
        proxy
            .xpub
            .flush(outboxes.iter(), common::link::LINGER)
            .await;
        proxy.xsub.flush(common::link::LINGER).await;
        let stats = proxy.snapshot();
        log_stats("final stats", &stats);
        stats
    }
}

/// One subscriber connection, as the proxy sees it (its prefixes are in [`Subscriptions`]).
#[derive(Debug)]
struct Peer {
    addr: std::net::SocketAddr,
    outbox: Arc<Outbox>,
}

/// The proxy at work: both sockets, subscriptions, last values.
struct Running {
    config: ProxyConfig,
    xsub: XSub,
    xpub: XPub,
    /// Every connection's prefixes, and the connections themselves.
    subscriptions: Subscriptions<Peer>,
    /// The XPUB side's connections (by serial), to their slots.
    slots: HashMap<u64, Slot>,
    /// Scratch: the connections an update goes to.
    targets: Vec<Slot>,
    /// Last update per topic (first frame, when more follow), at most `max_topics`; and the same
    /// topics in order, to find those a new prefix matches without a scan. Each update read is
    /// an allocation of its own, so keeping one pins nothing else. Looked up for every update:
    /// foldhash rather than SipHash.
    cache: foldhash::HashMap<Bytes, ZmqMessage>,
    cached_topics: BTreeSet<Bytes>,
    stats: ProxyStats,
    instance: u64,
}

impl Running {
    async fn run(&mut self, shutdown: &CancellationToken, report: &mut impl FnMut(&ProxyStats)) {
        let mut heartbeat = interval(self.config.heartbeat.interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stats_tick = interval(self.config.stats_every);
        stats_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        stats_tick.reset();
        // The heartbeat tick turns the loop at least once an interval; nothing in it waits on
        // a peer.
        let watchdog = Watchdog::spawn(
            "proxy",
            self.config.watchdog.max(self.config.heartbeat.interval * 3),
        );
        loop {
            watchdog.pet();
            tokio::select! {
                () = shutdown.cancelled() => break,
                batch = self.xsub.recv() => {
                    // Then whatever else is ready, without a turn of the select for each.
                    let mut next = Some(batch);
                    let mut more = INTAKE_BATCHES;
                    while let Some(batch) = next.take() {
                        for msg in batch {
                            self.deliver(msg);
                        }
                        more -= 1;
                        if more > 0 {
                            next = self.xsub.try_recv();
                        }
                    }
                }
                event = self.xpub.recv() => self.on_subscriber(event),
                _ = heartbeat.tick() => {
                    // Publishers of ours listen for it to notice a dead link; libzmq PUBs
                    // ignore it. Subscribers of ours hold its topic.
                    let msg = protocol::heartbeat(self.instance);
                    self.xsub.broadcast(&msg);
                    self.stats.heartbeats += 1;
                    self.send(HEARTBEAT_TOPIC, &msg);
                }
                _ = stats_tick.tick() => {
                    let stats = self.snapshot();
                    log_stats("stats", &stats);
                    report(&stats);
                }
            }
        }
    }

    /// Writes `msg` into the outbox of every connection holding a prefix of `topic`, once
    /// each; never waits. One with no room misses it.
    fn send(&mut self, topic: &[u8], msg: &ZmqMessage) {
        let mut targets = std::mem::take(&mut self.targets);
        self.subscriptions.matching(topic, &mut targets);
        for slot in targets.drain(..) {
            if let Some(peer) = self.subscriptions.peer(slot) {
                if !self.xpub.send(&peer.outbox, msg.iter()) {
                    missed(peer, &mut self.stats);
                }
            }
        }
        self.targets = targets;
    }

    fn deliver(&mut self, msg: ZmqMessage) {
        self.stats.messages_in += 1;
        let topic = msg.get(0).cloned().unwrap_or_default();
        self.stats.messages_out += 1;
        self.send(&topic, &msg);
        // Only an update whose topic is a frame of its own has a last value to keep: a
        // single-frame message (a stock publisher's usual form) is its own topic, and each one
        // would be a new entry.
        if self.config.last_value_cache && msg.len() > 1 {
            if let Some(last) = self.cache.get_mut(&topic[..]) {
                *last = msg;
            } else if self.cache.len() < self.config.max_topics {
                // Copied: the key outlives this message.
                let topic = Bytes::copy_from_slice(&topic);
                self.cached_topics.insert(topic.clone());
                self.cache.insert(topic, msg);
            }
        }
    }

    fn on_subscriber(&mut self, event: Event) {
        match event {
            Event::Joined {
                serial,
                addr,
                outbox,
                ..
            } => {
                self.stats.subscribers_seen += 1;
                tracing::debug!(peer = %addr, "subscriber connected");
                let slot = self.subscriptions.join(Peer { addr, outbox });
                self.slots.insert(serial, slot);
            }
            Event::Left { serial } => {
                if let Some(slot) = self.slots.remove(&serial) {
                    self.release(slot);
                }
            }
            Event::Messages { serial, batch } => {
                let Some(&slot) = self.slots.get(&serial) else {
                    return;
                };
                for msg in batch {
                    self.on_subscription(slot, &msg);
                }
            }
        }
    }

    /// A connection ended: what it held is let go, and what nobody else holds is withdrawn
    /// upstream (as libzmq's XPUB does).
    fn release(&mut self, slot: Slot) {
        let held = self.subscriptions.held_by(slot) as u64;
        let Some((peer, withdrawn)) = self.subscriptions.leave(slot) else {
            return;
        };
        self.stats.released += held;
        tracing::debug!(peer = %peer.addr, held, withdrawn = withdrawn.len(), "subscriber gone");
        for prefix in withdrawn {
            self.forward(Subscription::Unsubscribe(prefix));
        }
    }

    /// A change of what the proxy asks publishers for: to every publisher now, and kept by the
    /// XSUB for those that connect later.
    fn forward(&mut self, change: Subscription) {
        self.stats.forwarded += 1;
        tracing::debug!(change = ?change, "forwarded upstream");
        if let Some(frame) = change.to_message().get(0) {
            self.xsub.change(frame.clone());
        }
    }

    fn on_subscription(&mut self, slot: Slot, msg: &ZmqMessage) {
        let addr = self.subscriptions.peer(slot).map(|p| p.addr);
        // Only for the log lines (throttled): no allocation per message.
        let peer = || addr.map(|a| a.to_string()).unwrap_or_default();
        let sub = match Subscription::parse(msg) {
            Ok(sub) => sub,
            Err(e) => {
                self.stats.bad_xpub += 1;
                static BAD: Throttle = Throttle::new(Duration::from_secs(1));
                if let Some(held_back) = BAD.check() {
                    let first = msg.get(0).map(|f| frames::show(f)).unwrap_or_default();
                    tracing::warn!(peer = %peer(), error = %e, first = %first, bad = self.stats.bad_xpub, held_back, "bad message from a subscriber dropped");
                }
                return;
            }
        };
        match sub {
            Subscription::Subscribe(prefix) => {
                self.stats.subscribes += 1;
                match self.subscriptions.subscribe(slot, &prefix) {
                    Outcome::Changed { upstream } => {
                        if upstream {
                            let prefix = Bytes::copy_from_slice(&prefix);
                            self.forward(Subscription::Subscribe(prefix));
                        }
                        self.send_last_values(slot, &prefix);
                    }
                    Outcome::Unchanged => {}
                    Outcome::TableFull => {
                        self.stats.refused += 1;
                        static FULL: Throttle = Throttle::new(Duration::from_secs(1));
                        if let Some(held_back) = FULL.check() {
                            tracing::warn!(peer = %peer(), prefix = %frames::show(&prefix), max = self.config.max_topics, refused = self.stats.refused, held_back, "subscription table full: prefix refused");
                        }
                    }
                    Outcome::ConnectionFull => {
                        self.stats.refused_per_connection += 1;
                        static MANY: Throttle = Throttle::new(Duration::from_secs(1));
                        if let Some(held_back) = MANY.check() {
                            tracing::warn!(peer = %peer(), prefix = %frames::show(&prefix), max = self.config.max_prefixes_per_connection, refused = self.stats.refused_per_connection, held_back, "a subscriber holds its bound of prefixes: prefix refused");
                        }
                    }
                }
            }
            Subscription::Unsubscribe(prefix) => {
                self.stats.unsubscribes += 1;
                match self.subscriptions.unsubscribe(slot, &prefix) {
                    Outcome::Changed { upstream: true } => {
                        let prefix = Bytes::copy_from_slice(&prefix);
                        self.forward(Subscription::Unsubscribe(prefix));
                    }
                    Outcome::Changed { upstream: false } => {}
                    // Not held by this connection: whoever holds it keeps it.
                    _ => self.stats.bad_xpub += 1,
                }
            }
        }
    }

    /// Last value cache: a subscription a connection did not hold gets the latest update of
    /// each topic its prefix matches at once, on that connection only.
    fn send_last_values(&mut self, slot: Slot, prefix: &[u8]) {
        if !self.config.last_value_cache {
            return;
        }
        let Some(peer) = self.subscriptions.peer(slot) else {
            return;
        };
        let from = (Bound::Included(prefix), Bound::Unbounded);
        for topic in self.cached_topics.range::<[u8], _>(from) {
            if !topic.starts_with(prefix) {
                break;
            }
            let Some(last) = self.cache.get(topic) else {
                continue;
            };
            if !self.xpub.send(&peer.outbox, last.iter()) {
                missed(peer, &mut self.stats);
                break; // its outbox is full: the rest would not fit either
            }
            self.stats.cached_sent += 1;
        }
    }

    fn snapshot(&self) -> ProxyStats {
        let mut s = self.stats.clone();
        let xpub = self.xpub.stats();
        s.peer_errors = xpub.refused();
        s.stalled_cut = xpub.stalled();
        s.unreachable = xpub.unreachable();
        s.publishers_seen = self.xsub.joined();
        s.handovers = self.xsub.handovers();
        s.superseded = self.xsub.superseded();
        s.topics_held = self.subscriptions.len() as u64;
        s.topics = self.subscriptions.snapshot(TOPICS_SHOWN);
        let xsub: &GuardStats = self.xsub.stats();
        (s.guard_refused, s.guard_stalled) = (xsub.refused(), xsub.stalled());
        s
    }
}

/// Counts an update `peer` missed (its outbox full, or it is leaving), with a throttled warning.
fn missed(peer: &Peer, stats: &mut ProxyStats) {
    if peer.outbox.is_closed() {
        return; // its `Left` follows
    }
    stats.slow_dropped += 1;
    static BEHIND: Throttle = Throttle::new(Duration::from_secs(1));
    if let Some(held_back) = BEHIND.check() {
        tracing::warn!(peer = %peer.addr, slow_dropped = stats.slow_dropped, held_back, "a subscriber is behind: its outbox is full, dropping its updates");
    }
}

fn log_stats(what: &'static str, s: &ProxyStats) {
    tracing::info!(
        messages_in = s.messages_in,
        messages_out = s.messages_out,
        slow_dropped = s.slow_dropped,
        stalled_cut = s.stalled_cut,
        unreachable = s.unreachable,
        cached_sent = s.cached_sent,
        subscribes = s.subscribes,
        unsubscribes = s.unsubscribes,
        released = s.released,
        forwarded = s.forwarded,
        refused = s.refused,
        refused_per_connection = s.refused_per_connection,
        topics = s.topics_held,
        bad_xpub = s.bad_xpub,
        peer_errors = s.peer_errors,
        publishers_seen = s.publishers_seen,
        handovers = s.handovers,
        superseded = s.superseded,
        subscribers_seen = s.subscribers_seen,
        "{what}"
    );
}
