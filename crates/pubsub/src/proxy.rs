//! The proxy: XSUB bound for publishers, XPUB bound for subscribers, two tasks between them.
//!
//! The intake task owns the XSUB, our own ZMTP socket ([`common::wire::xsub`]: its limits on
//! every endpoint, loopback included): it reads updates into a bounded queue (full: the update
//! is dropped and counted), sends subscription changes upstream and heartbeats to publishers;
//! it never waits on a peer (a publisher that stops reading is cut off at its byte bound). The fanout loop owns the XPUB side, our own ZMTP
//! writer ([`crate::xpub`]): it keeps each connection's subscriptions and releases them when
//! the connection ends (see [`crate::subscriptions`]), hands the changes of what publishers are
//! asked for to the intake (coalesced, never dropped), sends a new subscription the last values
//! it matches, heartbeats subscribers on the proxy's own topic, and delivers the queue: each
//! update is encoded once and queued to every connection holding a prefix of its topic (found
//! in an index, not by a scan); each subscriber's writer task sends what is queued in batches.
//! It never waits on a subscriber: one whose queue is full misses updates (counted), one that
//! stopped reading is cut after `stall_timeout`. No peer's error stops either task (unlike
//! `zeromq::proxy`).

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::guard::GuardStats;
use common::logging::Throttle;
use common::watchdog::Watchdog;
use common::wire::xsub::XSub;
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

use crate::config::ProxyConfig;
use crate::protocol::{self, Subscription, HEARTBEAT_TOPIC};
use crate::stats::{ProxyStats, TOPICS_SHOWN};
use crate::subscriptions::{Outcome, Pending, Slot, Subscriptions};
use crate::xpub::{self, PeerCounters, PeerEvent, PeerOptions};

/// Errors that stop the proxy before it serves.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
    #[error("cannot set the stall timeout on {endpoint}")]
    Option {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve {endpoint}: {source}")]
    Serve {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// Subscription changes sent upstream per turn of the intake loop, at most (the rest wait,
/// coalesced, for the next turn).
const UPSTREAM_BATCH: usize = 1024;
/// Updates delivered per turn of the fanout loop before it looks at its other inputs.
const BATCH: usize = 256;
/// Batches (what one read of one publisher brought) handled per turn of the intake loop, at
/// most, when they are ready.
const INTAKE_BATCHES: usize = 64;
/// Updates waiting for one subscriber's socket, at most; beyond, it misses them (counted as
/// `slow_dropped`), like a libzmq XPUB at its high-water mark. About 10 MB at 1 KiB.
pub const SUBSCRIBER_QUEUE: usize = 10_000;
/// Connection events (subscriptions, joins) waiting for the fanout loop, at most.
const PEER_EVENTS: usize = 1024;

/// A proxy whose sockets are bound; [`Proxy::run`] serves until cancelled.
pub struct Proxy {
    config: ProxyConfig,
    xsub: XSub,
    xpub: tokio::net::TcpListener,
    /// Real endpoints (port 0 resolved).
    pub xsub_endpoint: String,
    pub xpub_endpoint: String,
    /// Random, per process: subscribers and publishers tell a restarted proxy by it.
    pub instance: u64,
    /// Counters of the XSUB's limits.
    xsub_stats: Arc<GuardStats>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("xsub", &self.xsub_endpoint)
            .field("xpub", &self.xpub_endpoint)
            .finish_non_exhaustive()
    }
}

/// A listener with keepalive and, when given, a user timeout on every accepted connection.
fn listen(
    endpoint: &str,
    keepalive: Duration,
    user_timeout: Option<Duration>,
) -> Result<std::net::TcpListener, ProxyError> {
    let listener = common::endpoint::bind_keepalive(endpoint, keepalive)?;
    if let Some(timeout) = user_timeout {
        socket2::SockRef::from(&listener)
            .set_tcp_user_timeout(Some(timeout))
            .map_err(|source| ProxyError::Option {
                endpoint: endpoint.to_string(),
                source,
            })?;
    }
    Ok(listener)
}

/// Our XPUB's listener (see [`crate::xpub`]) and its endpoint.
fn bind_xpub(
    endpoint: &str,
    keepalive: Duration,
    user_timeout: Duration,
) -> Result<(tokio::net::TcpListener, String), ProxyError> {
    let option = |source| ProxyError::Option {
        endpoint: endpoint.to_string(),
        source,
    };
    let listener = listen(endpoint, keepalive, Some(user_timeout))?;
    listener.set_nonblocking(true).map_err(option)?;
    let addr = listener.local_addr().map_err(option)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(option)?;
    Ok((listener, format!("tcp://{addr}")))
}

/// Counters kept by the intake task, read by the fanout loop for stats.
#[derive(Debug, Default)]
struct Intake {
    messages_in: AtomicU64,
    dropped: AtomicU64,
    publishers_seen: AtomicU64,
    /// Publisher connections superseded by a newer one, and the messages discarded from them
    /// (see [`XSub::superseded`]).
    handovers: AtomicU64,
    superseded: AtomicU64,
}

impl Intake {
    fn note(&self, xsub: &XSub) {
        self.publishers_seen.store(xsub.joined(), Relaxed);
        self.handovers.store(xsub.handovers(), Relaxed);
        self.superseded.store(xsub.superseded(), Relaxed);
    }
}

impl Proxy {
    /// Binds both sockets (keepalive and user timeout on every accepted connection).
    pub async fn bind(config: ProxyConfig) -> Result<Self, ProxyError> {
        let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
        // Both sides are our own ZMTP code, which checks every frame header itself.
        let listener = listen(&config.xsub, keepalive, None)?;
        let xsub =
            XSub::serve(listener, config.limits, config.max_connections).map_err(|source| {
                ProxyError::Serve {
                    endpoint: config.xsub.clone(),
                    source,
                }
            })?;
        let xsub_endpoint = xsub.endpoint.clone();
        let xsub_stats = xsub.stats().clone();
        let (xpub, xpub_endpoint) = bind_xpub(&config.xpub, keepalive, config.stall_timeout)?;
        let instance = rand::random::<u64>();
        tracing::info!(
            xsub = %xsub_endpoint,
            xpub = %xpub_endpoint,
            instance = format!("{instance:x}"),
            "proxy bound"
        );
        Ok(Self {
            config,
            xsub,
            xpub,
            xsub_endpoint,
            xpub_endpoint,
            instance,
            xsub_stats,
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
            xsub_stats,
            ..
        } = self;
        let (data_tx, data_rx) = mpsc::channel(config.queue.max(1));
        let upstream = Arc::new(Pending::new());
        let (peer_tx, peer_rx) = mpsc::channel(PEER_EVENTS);
        let intake = Arc::new(Intake::default());
        let peers = Arc::new(PeerCounters::default());
        let stop = shutdown.child_token();
        let intake_task = tokio::spawn(run_intake(
            xsub,
            data_tx,
            upstream.clone(),
            intake.clone(),
            config.heartbeat.interval,
            instance,
            stop.clone(),
        ));
        let xpub_task = tokio::spawn(xpub::serve(
            xpub,
            peer_tx,
            PeerOptions {
                queue: SUBSCRIBER_QUEUE,
                stall_timeout: config.stall_timeout,
            },
            peers.clone(),
            stop.clone(),
        ));
        let mut fanout = Fanout {
            subscriptions: Subscriptions::new(
                config.max_topics,
                config.max_prefixes_per_connection,
            ),
            slots: HashMap::new(),
            targets: Vec::new(),
            cache: HashMap::new(),
            cached_topics: BTreeSet::new(),
            stats: ProxyStats::default(),
            config,
            peer_counters: peers,
            upstream,
            instance,
            intake,
            guards: vec![xsub_stats],
        };
        fanout.run(data_rx, peer_rx, &shutdown, &mut report).await;
        stop.cancel();
        let _ = intake_task.await;
        let _ = xpub_task.await;
        let stats = fanout.snapshot();
        log_stats("final stats", &stats);
        stats
    }
}

/// Reads publishers, forwards subscription changes to them, heartbeats them. Never waits on
/// a peer: the XSUB is always read, so publishers are never held back by subscribers, and a
/// change goes into every publisher's outbox at once (the XSUB keeps the set in force and sends
/// it to publishers that connect later).
async fn run_intake(
    mut xsub: XSub,
    data: mpsc::Sender<ZmqMessage>,
    upstream: Arc<Pending>,
    counters: Arc<Intake>,
    every: Duration,
    instance: u64,
    stop: CancellationToken,
) {
    let mut heartbeat = interval(every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            batch = xsub.recv() => {
                // Then whatever else is ready, without a turn of the select for each.
                let mut next = Some(batch);
                let mut more = INTAKE_BATCHES;
                while let Some(batch) = next.take() {
                    for msg in batch {
                        counters.messages_in.fetch_add(1, Relaxed);
                        if data.try_send(msg).is_err() {
                            let dropped = counters.dropped.fetch_add(1, Relaxed) + 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(dropped, "subscribers are behind: queue full, dropping updates");
                            }
                        }
                    }
                    more -= 1;
                    if more > 0 {
                        next = xsub.try_recv();
                    }
                }
                counters.note(&xsub);
            }
            // Coalesced per prefix by the fanout.
            () = upstream.ready() => {
                for change in upstream.take(UPSTREAM_BATCH) {
                    if let Some(frame) = change.to_message().get(0) {
                        xsub.change(frame.clone());
                    }
                }
            }
            _ = heartbeat.tick() => {
                // Publishers of ours listen for it to notice a dead link; libzmq PUBs ignore it.
                xsub.broadcast(&protocol::heartbeat(instance));
                counters.note(&xsub);
            }
        }
    }
    xsub.flush(common::link::LINGER).await;
}

/// One subscriber connection, as the fanout sees it (its prefixes are in [`Subscriptions`]).
#[derive(Debug)]
struct Peer {
    addr: std::net::SocketAddr,
    queue: mpsc::Sender<Bytes>,
}

/// Queues `wire` to `peer`; false if it has no room (counted: it misses the update) or is gone
/// (its `Left` follows).
fn queue(peer: &Peer, wire: Bytes, stats: &mut ProxyStats) -> bool {
    match peer.queue.try_send(wire) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            stats.slow_dropped += 1;
            static BEHIND: Throttle = Throttle::new(Duration::from_secs(1));
            if let Some(held_back) = BEHIND.check() {
                tracing::warn!(peer = %peer.addr, slow_dropped = stats.slow_dropped, held_back, "a subscriber is behind: its queue is full, dropping its updates");
            }
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// The XPUB side: subscriptions, last values, heartbeats, delivery.
struct Fanout {
    config: ProxyConfig,
    /// Every connection's prefixes, and the connections themselves.
    subscriptions: Subscriptions<Peer>,
    /// The XPUB side's connection ids, to their slots.
    slots: HashMap<u64, Slot>,
    /// Scratch: the connections an update goes to.
    targets: Vec<Slot>,
    peer_counters: Arc<PeerCounters>,
    upstream: Arc<Pending>,
    /// Last update per topic (first frame), encoded, at most `max_topics`; and the same topics
    /// in order, to find those a new prefix matches without a scan.
    cache: HashMap<Bytes, Bytes>,
    cached_topics: BTreeSet<Bytes>,
    stats: ProxyStats,
    instance: u64,
    intake: Arc<Intake>,
    guards: Vec<Arc<GuardStats>>,
}

impl Fanout {
    async fn run(
        &mut self,
        mut data: mpsc::Receiver<ZmqMessage>,
        mut peers: mpsc::Receiver<PeerEvent>,
        shutdown: &CancellationToken,
        report: &mut impl FnMut(&ProxyStats),
    ) {
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
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            watchdog.pet();
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(event) = peers.recv() => self.on_peer(event),
                n = data.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break; // intake gone: nothing more will come
                    }
                    for msg in batch.drain(..) {
                        self.deliver(msg);
                    }
                }
                _ = heartbeat.tick() => {
                    self.stats.heartbeats += 1;
                    let msg = protocol::heartbeat(self.instance);
                    self.send(HEARTBEAT_TOPIC, xpub::encode(&msg));
                }
                _ = stats_tick.tick() => {
                    let stats = self.snapshot();
                    log_stats("stats", &stats);
                    report(&stats);
                }
            }
        }
    }

    /// Queues an encoded message to every connection holding a prefix of `topic`, once each;
    /// never waits. A full queue: that subscriber misses it.
    fn send(&mut self, topic: &[u8], wire: Bytes) {
        let mut targets = std::mem::take(&mut self.targets);
        self.subscriptions.matching(topic, &mut targets);
        for slot in targets.drain(..) {
            if let Some(peer) = self.subscriptions.peer(slot) {
                queue(peer, wire.clone(), &mut self.stats);
            }
        }
        self.targets = targets;
    }

    fn deliver(&mut self, msg: ZmqMessage) {
        let wire = xpub::encode(&msg);
        let topic = msg.get(0).map_or(&[][..], |t| &t[..]);
        if self.config.last_value_cache {
            if let Some(last) = self.cache.get_mut(topic) {
                *last = wire.clone();
            } else if self.cache.len() < self.config.max_topics {
                // Copied: the frame is a slice of a larger read.
                let topic = Bytes::copy_from_slice(topic);
                self.cached_topics.insert(topic.clone());
                self.cache.insert(topic, wire.clone());
            }
        }
        self.stats.messages_out += 1;
        self.send(topic, wire);
    }

    fn on_peer(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Joined { id, addr, queue } => {
                self.stats.subscribers_seen += 1;
                tracing::debug!(peer = %addr, "subscriber connected");
                let slot = self.subscriptions.join(Peer { addr, queue });
                self.slots.insert(id, slot);
            }
            PeerEvent::Left { id } => {
                if let Some(slot) = self.slots.remove(&id) {
                    self.release(slot);
                }
            }
            PeerEvent::Message { id, msg } => self.on_subscriber(id, msg),
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
            self.forward(prefix, false);
        }
    }

    /// A change of what the proxy asks publishers for: on its way to the intake task, which
    /// sends it upstream (coalesced per prefix, never dropped).
    fn forward(&mut self, prefix: Bytes, subscribe: bool) {
        self.stats.forwarded += 1;
        tracing::debug!(prefix = %frames::show(&prefix), subscribe, "forwarded upstream");
        self.upstream.push(prefix, subscribe);
    }

    fn on_subscriber(&mut self, id: u64, msg: ZmqMessage) {
        let Some(&slot) = self.slots.get(&id) else {
            return;
        };
        let addr = self.subscriptions.peer(slot).map(|p| p.addr);
        // Only for the log lines (throttled): no allocation per message.
        let peer = || addr.map(|a| a.to_string()).unwrap_or_default();
        let sub = match Subscription::parse(&msg) {
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
                            self.forward(Bytes::copy_from_slice(&prefix), true);
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
                        self.forward(Bytes::copy_from_slice(&prefix), false);
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
            let Some(wire) = self.cache.get(topic) else {
                continue;
            };
            if !queue(peer, wire.clone(), &mut self.stats) {
                break; // its queue is full: the rest would not fit either
            }
            self.stats.cached_sent += 1;
        }
    }

    fn snapshot(&self) -> ProxyStats {
        let mut s = self.stats.clone();
        s.messages_in = self.intake.messages_in.load(Relaxed);
        s.dropped = self.intake.dropped.load(Relaxed);
        s.peer_errors += self.peer_counters.peer_errors.load(Relaxed);
        s.stalled_cut = self.peer_counters.stalled_cut.load(Relaxed);
        s.publishers_seen = self.intake.publishers_seen.load(Relaxed);
        s.handovers = self.intake.handovers.load(Relaxed);
        s.superseded = self.intake.superseded.load(Relaxed);
        s.upstream_pending = self.upstream.len() as u64;
        s.topics_held = self.subscriptions.len() as u64;
        s.topics = self.subscriptions.snapshot(TOPICS_SHOWN);
        (s.guard_refused, s.guard_stalled) = common::guard::totals(&self.guards);
        s
    }
}

fn log_stats(what: &'static str, s: &ProxyStats) {
    tracing::info!(
        messages_in = s.messages_in,
        messages_out = s.messages_out,
        dropped = s.dropped,
        slow_dropped = s.slow_dropped,
        stalled_cut = s.stalled_cut,
        cached_sent = s.cached_sent,
        subscribes = s.subscribes,
        unsubscribes = s.unsubscribes,
        released = s.released,
        forwarded = s.forwarded,
        upstream_pending = s.upstream_pending,
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
