//! The proxy: XSUB bound for publishers, XPUB bound for subscribers, two tasks between them.
//!
//! The intake task owns the XSUB: it reads updates into a bounded queue (full: the update is
//! dropped and counted, like libzmq's high-water mark), sends subscription changes upstream
//! and heartbeats to publishers; it never waits on a peer. The fanout loop owns the XPUB: it
//! counts subscriptions (see [`crate::subscriptions`]), re-sends last values to new
//! subscriptions, heartbeats subscribers on the proxy's own topic and delivers the queue.
//! zmq.rs's XPUB `send()` writes to each matching subscriber in turn and waits for a full
//! one, so a subscriber that stops reading holds the fanout until it is cut: by the kernel
//! (`TCP_USER_TIMEOUT` = `stall_timeout` on its connection) or, failing that, by the proxy
//! after `stall_timeout` of waiting ([`crate::stall`]); meanwhile intake goes on.
//! No peer's error stops either task (unlike `zeromq::proxy`).

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
use zeromq::{
    Socket, SocketEvent, SocketRecv, SocketSend, XPubSocket, XSubSocket, ZmqMessage, ZmqResult,
};

use crate::config::ProxyConfig;
use crate::protocol::{self, Subscription};
use crate::stall;
use crate::stats::ProxyStats;
use crate::subscriptions::{Change, Subscriptions};

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

/// A proxy whose sockets are bound; [`Proxy::run`] serves until cancelled.
pub struct Proxy {
    config: ProxyConfig,
    xsub: XSubSocket,
    xpub: XPubSocket,
    xsub_events: events::Receiver<SocketEvent>,
    xpub_events: events::Receiver<SocketEvent>,
    /// Real endpoints (port 0 resolved).
    pub xsub_endpoint: String,
    pub xpub_endpoint: String,
    /// Random, per process: subscribers and publishers tell a restarted proxy by it.
    pub instance: u64,
    /// The port the XPUB itself listens on (behind the guard, a loopback port of its own).
    xpub_port: u16,
    /// Counters of the guards in front of the sockets, if any.
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

/// Binds `socket` (keepalive, and `user_timeout` on accepted connections), behind a guard
/// when `guard` is given.
async fn bind<S: Socket>(
    socket: &mut S,
    endpoint: &str,
    keepalive: Duration,
    user_timeout: Option<Duration>,
    guard: Option<Limits>,
) -> Result<common::guard::Bound, ProxyError> {
    let listener = common::endpoint::bind_keepalive(endpoint, keepalive)?;
    if let Some(timeout) = user_timeout {
        socket2::SockRef::from(&listener)
            .set_tcp_user_timeout(Some(timeout))
            .map_err(|source| ProxyError::Option {
                endpoint: endpoint.to_string(),
                source,
            })?;
    }
    Ok(common::guard::bind_on(socket, listener, endpoint, guard).await?)
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
        let guard = |endpoint: &str| -> Result<Option<Limits>, ProxyError> {
            Ok(common::guard::wanted(config.guard, endpoint)?.then_some(config.limits))
        };
        let mut xsub = XSubSocket::new();
        let xsub_events = xsub.monitor();
        let xsub_bound = bind(
            &mut xsub,
            &config.xsub,
            keepalive,
            None,
            guard(&config.xsub)?,
        )
        .await?;
        let mut xpub = XPubSocket::new();
        let xpub_events = xpub.monitor();
        let xpub_bound = bind(
            &mut xpub,
            &config.xpub,
            keepalive,
            Some(config.stall_timeout),
            // Subscribers send subscriptions only: the guard names one that sends anything else.
            guard(&config.xpub)?.map(|limits| Limits {
                expect: common::guard::Expect::Subscriptions,
                ..limits
            }),
        )
        .await?;
        let instance = rand::random::<u64>();
        tracing::info!(
            xsub = %xsub_bound.endpoint,
            xpub = %xpub_bound.endpoint,
            guarded_xsub = xsub_bound.guard.is_some(),
            guarded_xpub = xpub_bound.guard.is_some(),
            instance = format!("{instance:x}"),
            "proxy bound"
        );
        let xpub_port = xpub_bound.socket_port;
        let guards = [xsub_bound.guard, xpub_bound.guard]
            .into_iter()
            .flatten()
            .collect();
        let (xsub_endpoint, xpub_endpoint) = (xsub_bound.endpoint, xpub_bound.endpoint);
        Ok(Self {
            config,
            xsub,
            xpub,
            xsub_events,
            xpub_events,
            xsub_endpoint,
            xpub_endpoint,
            instance,
            xpub_port,
            guards,
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
            xpub_events,
            instance,
            xpub_port,
            guards,
            ..
        } = self;
        let (data_tx, data_rx) = mpsc::channel(config.queue.max(1));
        let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_QUEUE);
        let intake = Arc::new(Intake::default());
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
        let mut fanout = Fanout {
            subscriptions: Subscriptions::new(config.max_topics),
            cache: HashMap::new(),
            stats: ProxyStats::default(),
            config,
            xpub,
            upstream: upstream_tx,
            instance,
            intake,
            xpub_port,
            guards,
        };
        fanout
            .run(data_rx, xpub_events, &shutdown, &mut report)
            .await;
        stop.cancel();
        let _ = intake_task.await;
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
            msg = xsub.recv() => match msg {
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
            },
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
                SocketEvent::AcceptFailed(e) => {
                    // Garbage, a greeting cut short, the wrong socket type. zmq.rs does not say
                    // who: behind the guard, the guard has logged the address already.
                    counters.peer_errors.fetch_add(1, Relaxed);
                    tracing::info!(error = %e, "publisher handshake failed");
                }
                _ => {}
            },
            _ = heartbeat.tick() => {
                // Publishers of ours listen for it to notice a dead link; libzmq PUBs ignore it.
                let _ = try_send(&mut xsub, protocol::heartbeat(instance));
            }
        }
    }
}

/// The XPUB side: subscriptions, last values, heartbeats, delivery.
struct Fanout {
    config: ProxyConfig,
    xpub: XPubSocket,
    upstream: mpsc::Sender<ZmqMessage>,
    subscriptions: Subscriptions,
    /// Last update per topic (first frame), at most `max_topics`.
    cache: HashMap<Bytes, ZmqMessage>,
    stats: ProxyStats,
    instance: u64,
    intake: Arc<Intake>,
    /// The XPUB's port, to find its connections in `/proc/net/tcp`.
    xpub_port: u16,
    guards: Vec<Arc<GuardStats>>,
}

impl Fanout {
    async fn run(
        &mut self,
        mut data: mpsc::Receiver<ZmqMessage>,
        mut events: events::Receiver<SocketEvent>,
        shutdown: &CancellationToken,
        report: &mut impl FnMut(&ProxyStats),
    ) {
        let mut heartbeat = interval(self.config.heartbeat.interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stats_tick = interval(self.config.stats_every);
        stats_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        stats_tick.reset();
        // The heartbeat tick turns the loop at least once an interval; a send held by a
        // stalled subscriber lasts at most about the stall timeout.
        let watchdog = Watchdog::spawn(
            "proxy",
            self.config
                .watchdog
                .max(self.config.heartbeat.interval * 3)
                .max(self.config.stall_timeout * 3),
        );
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            watchdog.pet();
            tokio::select! {
                () = shutdown.cancelled() => break,
                msg = self.xpub.recv() => self.on_subscriber(msg, shutdown).await,
                n = data.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break; // intake gone: nothing more will come
                    }
                    for msg in batch.drain(..) {
                        self.deliver(msg, shutdown).await;
                    }
                }
                Some(event) = events.next() => match event {
                    SocketEvent::Accepted(endpoint, _) => {
                        self.stats.subscribers_seen += 1;
                        tracing::debug!(%endpoint, "subscriber connected");
                    }
                    SocketEvent::AcceptFailed(e) => {
                        self.stats.peer_errors += 1;
                        tracing::info!(error = %e, "subscriber handshake failed");
                    }
                    _ => {}
                },
                _ = heartbeat.tick() => {
                    self.stats.heartbeats += 1;
                    self.send(protocol::heartbeat(self.instance), shutdown).await;
                }
                _ = stats_tick.tick() => {
                    self.log_stats("stats");
                    report(&self.snapshot());
                }
            }
        }
    }

    /// One send on the XPUB. It waits while a matching subscriber's buffers are full: every
    /// `stall_timeout` of waiting, the subscribers that stopped reading are cut (see
    /// [`crate::stall`]). Abandoned on shutdown.
    async fn send(&mut self, msg: ZmqMessage, shutdown: &CancellationToken) {
        let (port, stall) = (self.xpub_port, self.config.stall_timeout);
        let mut cut = 0;
        let sent = {
            let send = self.xpub.send(msg);
            tokio::pin!(send);
            // Nearly always ready at once: no timer then.
            match futures::FutureExt::now_or_never(&mut send) {
                Some(r) => r,
                None => loop {
                    tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = &mut send => break r,
                    () = tokio::time::sleep(stall) => cut += stall::cut_stalled(port, stall::MIN_QUEUE),
                    }
                },
            }
        };
        self.stats.stalled_cut += cut as u64;
        self.on_sent(sent);
    }

    fn on_sent(&mut self, sent: ZmqResult<()>) {
        if let Err(e) = sent {
            self.stats.peer_errors += 1;
            tracing::info!(error = %e, "send to a subscriber failed");
        }
    }

    async fn deliver(&mut self, msg: ZmqMessage, shutdown: &CancellationToken) {
        if self.config.last_value_cache {
            let topic = msg.get(0).cloned().unwrap_or_default();
            if self.cache.len() < self.config.max_topics || self.cache.contains_key(&topic) {
                self.cache.insert(topic, msg.clone());
            }
        }
        self.stats.messages_out += 1;
        self.send(msg, shutdown).await;
    }

    async fn on_subscriber(&mut self, msg: ZmqResult<ZmqMessage>, shutdown: &CancellationToken) {
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                self.stats.peer_errors += 1;
                tracing::info!(error = %e, "subscriber connection failed");
                return;
            }
        };
        let sub = match Subscription::parse(&msg) {
            Ok(sub) => sub,
            Err(e) => {
                self.stats.bad_xpub += 1;
                if self.stats.bad_xpub.is_power_of_two() {
                    let first = msg.get(0).map(|f| frames::show(f)).unwrap_or_default();
                    tracing::warn!(error = %e, first = %first, bad = self.stats.bad_xpub, "bad message from a subscriber dropped");
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
                tracing::warn!(prefix = %frames::show(sub.prefix()), max = self.config.max_topics, "subscription table full: prefix refused");
            }
            Change::Unknown => self.stats.bad_xpub += 1,
            Change::Counted | Change::Local => {}
        }
        if let Subscription::Subscribe(prefix) = &sub {
            self.send_last_values(prefix, shutdown).await;
        }
    }

    /// Last value cache: a new subscription gets the latest update of each topic it matches at
    /// once. Every subscriber of those topics gets it too (XPUB filters per topic, not per
    /// peer); ours recognise it by its sequence number and count it as a duplicate.
    async fn send_last_values(&mut self, prefix: &[u8], shutdown: &CancellationToken) {
        if !self.config.last_value_cache {
            return;
        }
        let cached: Vec<ZmqMessage> = self
            .cache
            .iter()
            .filter(|(topic, _)| protocol::matches(prefix, topic))
            .map(|(_, msg)| msg.clone())
            .collect();
        for msg in cached {
            self.stats.cached_sent += 1;
            self.send(msg, shutdown).await;
        }
    }

    fn snapshot(&self) -> ProxyStats {
        let mut s = self.stats.clone();
        s.messages_in = self.intake.messages_in.load(Relaxed);
        s.dropped = self.intake.dropped.load(Relaxed);
        s.peer_errors += self.intake.peer_errors.load(Relaxed);
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
            guard_refused = s.guard_refused,
            guard_stalled = s.guard_stalled,
            "{what}"
        );
    }
}
