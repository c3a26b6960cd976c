//! The proxy: XSUB bound for publishers, XPUB bound for subscribers, two tasks between them.
//!
//! The intake task owns the XSUB (zmq.rs): it reads updates into a bounded queue (full: the
//! update is dropped and counted), sends subscription changes upstream and heartbeats to
//! publishers; it never waits on a peer. The fanout loop owns the XPUB side, our own ZMTP
//! writer ([`crate::xpub`]): it counts subscriptions (see [`crate::subscriptions`]), re-sends
//! last values to new subscriptions, heartbeats subscribers on the proxy's own topic, and
//! delivers the queue: each update is encoded once and queued to every subscriber whose
//! subscriptions match; each subscriber's writer task sends what is queued in batches. It never
//! waits on a subscriber: one whose queue is full misses updates (counted), one that stopped
//! reading is cut after `stall_timeout`. No peer's error stops either task (unlike
//! `zeromq::proxy`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::guard::{GuardStats, Limits};
use common::send::{try_send, Sent};
use common::watchdog::Watchdog;
use futures::channel::mpsc as events;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketEvent, SocketRecv, XSubSocket, ZmqMessage};

use crate::config::ProxyConfig;
use crate::protocol::{self, Subscription, HEARTBEAT_TOPIC};
use crate::stats::ProxyStats;
use crate::subscriptions::{Change, Subscriptions};
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
    #[error(transparent)]
    Bind(#[from] common::guard::BindError),
}

/// Subscription changes waiting to go upstream, at most (they are rare; a full channel means
/// the intake task is gone).
const UPSTREAM_QUEUE: usize = 1024;
/// Updates delivered per turn of the fanout loop before it looks at its other inputs.
const BATCH: usize = 256;
/// Updates read per turn of the intake loop, at most, when they are ready.
const INTAKE_BATCH: usize = 256;
/// Updates waiting for one subscriber's socket, at most; beyond, it misses them (counted as
/// `slow_dropped`), like a libzmq XPUB at its high-water mark. About 10 MB at 1 KiB.
pub const SUBSCRIBER_QUEUE: usize = 10_000;
/// Connection events (subscriptions, joins) waiting for the fanout loop, at most.
const PEER_EVENTS: usize = 1024;

/// A proxy whose sockets are bound; [`Proxy::run`] serves until cancelled.
pub struct Proxy {
    config: ProxyConfig,
    xsub: XSubSocket,
    xpub: tokio::net::TcpListener,
    xsub_events: events::Receiver<SocketEvent>,
    /// Real endpoints (port 0 resolved).
    pub xsub_endpoint: String,
    pub xpub_endpoint: String,
    /// Random, per process: subscribers and publishers tell a restarted proxy by it.
    pub instance: u64,
    /// Counters of the guard in front of the XSUB, if any.
    guards: Vec<Arc<GuardStats>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("xsub", &self.xsub_endpoint)
            .field("xpub", &self.xpub_endpoint)
            .finish_non_exhaustive()
    }
}

/// Binds the XSUB (keepalive), behind a guard when `guard` is given.
async fn bind<S: Socket>(
    socket: &mut S,
    endpoint: &str,
    keepalive: Duration,
    guard: Option<Limits>,
) -> Result<common::guard::Bound, ProxyError> {
    let listener = listen(endpoint, keepalive, None)?;
    Ok(common::guard::bind_on(socket, listener, endpoint, guard).await?)
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
    peer_errors: AtomicU64,
    publishers_seen: AtomicU64,
}

impl Proxy {
    /// Binds both sockets (keepalive and user timeout on every accepted connection).
    pub async fn bind(config: ProxyConfig) -> Result<Self, ProxyError> {
        let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
        let mut xsub = XSubSocket::new();
        let xsub_events = xsub.monitor();
        // The XSUB is zmq.rs's: the guard stands in front of it where wanted. The XPUB side is
        // our own ZMTP code (crate::xpub), which checks every frame header itself.
        let guard = common::guard::wanted(config.guard, &config.xsub)?.then_some(config.limits);
        let xsub_bound = bind(&mut xsub, &config.xsub, keepalive, guard).await?;
        let xsub_endpoint = xsub_bound.endpoint;
        let (xpub, xpub_endpoint) = bind_xpub(&config.xpub, keepalive, config.stall_timeout)?;
        let instance = rand::random::<u64>();
        tracing::info!(
            xsub = %xsub_endpoint,
            xpub = %xpub_endpoint,
            guarded_xsub = xsub_bound.guard.is_some(),
            instance = format!("{instance:x}"),
            "proxy bound"
        );
        Ok(Self {
            config,
            xsub,
            xpub,
            xsub_events,
            xsub_endpoint,
            xpub_endpoint,
            instance,
            guards: xsub_bound.guard.into_iter().collect(),
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
            xsub_events,
            instance,
            guards,
            ..
        } = self;
        let (data_tx, data_rx) = mpsc::channel(config.queue.max(1));
        let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_QUEUE);
        let (peer_tx, peer_rx) = mpsc::channel(PEER_EVENTS);
        let intake = Arc::new(Intake::default());
        let peers = Arc::new(PeerCounters::default());
        let stop = shutdown.child_token();
        let intake_task = tokio::spawn(run_intake(
            xsub,
            xsub_events,
            data_tx,
            upstream_rx,
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
            subscriptions: Subscriptions::new(config.max_topics),
            cache: HashMap::new(),
            stats: ProxyStats::default(),
            config,
            peers: HashMap::new(),
            peer_counters: peers,
            upstream: upstream_tx,
            instance,
            intake,
            guards,
        };
        fanout.run(data_rx, peer_rx, &shutdown, &mut report).await;
        stop.cancel();
        let _ = intake_task.await;
        let _ = xpub_task.await;
        fanout.log_stats("final stats");
        fanout.snapshot()
    }
}

/// Reads publishers, forwards subscription changes to them, heartbeats them. Never waits on
/// a peer: the XSUB is always read, so publishers are never held back by subscribers.
#[allow(clippy::too_many_arguments)]
async fn run_intake(
    mut xsub: XSubSocket,
    mut events: events::Receiver<SocketEvent>,
    data: mpsc::Sender<ZmqMessage>,
    mut upstream: mpsc::Receiver<ZmqMessage>,
    counters: Arc<Intake>,
    every: Duration,
    instance: u64,
    stop: CancellationToken,
) {
    let mut heartbeat = interval(every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            msg = xsub.recv() => {
                // Then whatever else is ready, without a turn of the select for each (recv
                // is cancel-safe: a pending one dropped loses nothing).
                let mut next = Some(msg);
                let mut more = INTAKE_BATCH;
                while let Some(msg) = next.take() {
                    match msg {
                        Ok(msg) => {
                            counters.messages_in.fetch_add(1, Relaxed);
                            if data.try_send(msg).is_err() {
                                let dropped = counters.dropped.fetch_add(1, Relaxed) + 1;
                                if dropped.is_power_of_two() {
                                    tracing::warn!(dropped, "subscribers are behind: queue full, dropping updates");
                                }
                            }
                        }
                        Err(e) => {
                            counters.peer_errors.fetch_add(1, Relaxed);
                            tracing::info!(error = %e, "publisher connection failed");
                        }
                    }
                    more -= 1;
                    if more > 0 {
                        next = futures::FutureExt::now_or_never(xsub.recv());
                    }
                }
            }
            Some(msg) = upstream.recv() => {
                // XSUB keeps the set and re-sends it to publishers that connect later.
                if !matches!(try_send(&mut xsub, msg), Sent::Queued) {
                    tracing::warn!("a publisher is not reading: subscription change not sent to it");
                }
            }
            Some(event) = events.next() => match event {
                SocketEvent::Accepted(endpoint, _) => {
                    counters.publishers_seen.fetch_add(1, Relaxed);
                    tracing::debug!(%endpoint, "publisher connected");
                }
                SocketEvent::Disconnected(_) => tracing::debug!("publisher gone"),
                _ => {}
            },
            _ = heartbeat.tick() => {
                // Publishers of ours listen for it to notice a dead link; libzmq PUBs ignore it.
                let _ = try_send(&mut xsub, protocol::heartbeat(instance));
            }
        }
    }
}

/// One subscriber connection, as the fanout sees it.
struct Peer {
    addr: std::net::SocketAddr,
    /// Its prefixes, as a stock XPUB keeps them: one entry per subscribe, an unsubscribe
    /// removes one.
    prefixes: Vec<Bytes>,
    queue: mpsc::Sender<Bytes>,
}

impl Peer {
    fn wants(&self, topic: &[u8]) -> bool {
        self.prefixes.iter().any(|p| protocol::matches(p, topic))
    }
}

/// The XPUB side: subscriptions, last values, heartbeats, delivery.
struct Fanout {
    config: ProxyConfig,
    peers: HashMap<u64, Peer>,
    peer_counters: Arc<PeerCounters>,
    upstream: mpsc::Sender<ZmqMessage>,
    subscriptions: Subscriptions,
    /// Last update per topic (first frame), encoded, at most `max_topics`.
    cache: HashMap<Bytes, Bytes>,
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
                    self.log_stats("stats");
                    report(&self.snapshot());
                }
            }
        }
    }

    /// Queues an encoded message to every subscriber whose prefixes match `topic`; never
    /// waits. A full queue: that subscriber misses it. A closed one: it is gone.
    fn send(&mut self, topic: &[u8], wire: Bytes) {
        let mut gone = Vec::new();
        for (id, peer) in &self.peers {
            if !peer.wants(topic) {
                continue;
            }
            match peer.queue.try_send(wire.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.stats.slow_dropped += 1;
                    if self.stats.slow_dropped.is_power_of_two() {
                        tracing::warn!(peer = %peer.addr, slow_dropped = self.stats.slow_dropped, "a subscriber is behind: its queue is full, dropping its updates");
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            self.peers.remove(&id);
        }
    }

    fn deliver(&mut self, msg: ZmqMessage) {
        let wire = xpub::encode(&msg);
        let topic = msg.get(0).cloned().unwrap_or_default();
        if self.config.last_value_cache {
            if let Some(last) = self.cache.get_mut(&topic) {
                *last = wire.clone();
            } else if self.cache.len() < self.config.max_topics {
                self.cache.insert(topic.clone(), wire.clone());
            }
        }
        self.stats.messages_out += 1;
        self.send(&topic, wire);
    }

    fn on_peer(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::Joined { id, addr, queue } => {
                self.stats.subscribers_seen += 1;
                tracing::debug!(peer = %addr, "subscriber connected");
                self.peers.insert(
                    id,
                    Peer {
                        addr,
                        prefixes: Vec::new(),
                        queue,
                    },
                );
            }
            PeerEvent::Left { id } => {
                if let Some(peer) = self.peers.remove(&id) {
                    tracing::debug!(peer = %peer.addr, "subscriber gone");
                }
            }
            PeerEvent::Message { id, msg } => self.on_subscriber(id, msg),
        }
    }

    fn on_subscriber(&mut self, id: u64, msg: ZmqMessage) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        // The connection's own filter, kept as a stock XPUB keeps it.
        if let [frame] = msg.iter().collect::<Vec<_>>()[..] {
            match frame.first() {
                Some(1) => peer.prefixes.push(frame.slice(1..)),
                Some(0) => {
                    if let Some(i) = peer.prefixes.iter().position(|p| p[..] == frame[1..]) {
                        peer.prefixes.swap_remove(i);
                    }
                }
                _ => {}
            }
        }
        let addr = peer.addr;
        let sub = match Subscription::parse(&msg) {
            Ok(sub) => sub,
            Err(e) => {
                self.stats.bad_xpub += 1;
                if self.stats.bad_xpub.is_power_of_two() {
                    let first = msg.get(0).map(|f| frames::show(f)).unwrap_or_default();
                    tracing::warn!(peer = %addr, error = %e, first = %first, bad = self.stats.bad_xpub, "bad message from a subscriber dropped");
                }
                return;
            }
        };
        match &sub {
            Subscription::Subscribe(_) => self.stats.subscribes += 1,
            Subscription::Unsubscribe(_) => self.stats.unsubscribes += 1,
            Subscription::Release { proxy, .. } if *proxy != self.instance => {
                // Made to a proxy that has since restarted: its counts died with it.
                self.stats.stale_releases += 1;
                return;
            }
            Subscription::Release { .. } => self.stats.releases += 1,
        }
        match self.subscriptions.apply(&sub) {
            Change::Upstream(change) => {
                self.stats.forwarded += 1;
                tracing::debug!(prefix = %frames::show(change.prefix()), ?change, "forwarded upstream");
                if self.upstream.try_send(change.to_message()).is_err() {
                    tracing::warn!("intake not keeping up: subscription change lost");
                }
            }
            Change::Refused => {
                self.stats.refused += 1;
                tracing::warn!(peer = %addr, prefix = %frames::show(sub.prefix()), max = self.config.max_topics, "subscription table full: prefix refused");
            }
            Change::Unknown => self.stats.bad_xpub += 1,
            Change::Counted | Change::Local => {}
        }
        if let Subscription::Subscribe(prefix) = &sub {
            self.send_last_values(prefix);
        }
    }

    /// Last value cache: a new subscription gets the latest update of each topic it matches at
    /// once. Every subscriber of those topics gets it too (as through a stock XPUB, which
    /// filters per topic); ours recognise it by its sequence number and count it as a
    /// duplicate.
    fn send_last_values(&mut self, prefix: &[u8]) {
        if !self.config.last_value_cache {
            return;
        }
        let cached: Vec<(Bytes, Bytes)> = self
            .cache
            .iter()
            .filter(|(topic, _)| protocol::matches(prefix, topic))
            .map(|(topic, wire)| (topic.clone(), wire.clone()))
            .collect();
        for (topic, wire) in cached {
            self.stats.cached_sent += 1;
            self.send(&topic, wire);
        }
    }

    fn snapshot(&self) -> ProxyStats {
        let mut s = self.stats.clone();
        s.messages_in = self.intake.messages_in.load(Relaxed);
        s.dropped = self.intake.dropped.load(Relaxed);
        s.peer_errors += self.intake.peer_errors.load(Relaxed);
        s.peer_errors += self.peer_counters.peer_errors.load(Relaxed);
        s.stalled_cut = self.peer_counters.stalled_cut.load(Relaxed);
        s.publishers_seen = self.intake.publishers_seen.load(Relaxed);
        s.topics = self.subscriptions.snapshot();
        (s.guard_refused, s.guard_stalled) = common::guard::totals(&self.guards);
        s
    }

    fn log_stats(&self, what: &'static str) {
        let s = self.snapshot();
        tracing::info!(
            messages_in = s.messages_in,
            messages_out = s.messages_out,
            dropped = s.dropped,
            slow_dropped = s.slow_dropped,
            stalled_cut = s.stalled_cut,
            cached_sent = s.cached_sent,
            subscribes = s.subscribes,
            unsubscribes = s.unsubscribes,
            releases = s.releases,
            forwarded = s.forwarded,
            refused = s.refused,
            topics = s.topics.len(),
            bad_xpub = s.bad_xpub,
            peer_errors = s.peer_errors,
            publishers_seen = s.publishers_seen,
            subscribers_seen = s.subscribers_seen,
            "{what}"
        );
    }
}
