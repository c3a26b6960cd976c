//! The shared queue: ROUTER frontend (clients) and ROUTER backend (workers) in one task.
//!
//! Requests wait in a bounded FIFO; workers' free slots (READY credits) wait in a
//! least-recently-used queue. Heartbeats go to every worker each interval; a worker silent
//! for `interval x liveness`, or whose connection closes, is purged and the requests it held go
//! back to the front of the queue, so another worker answers them.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::heartbeat::Liveness;
use common::link::Monitor;
use foldhash::{HashMap, HashMapExt};
use futures::FutureExt;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::config::BrokerConfig;
use crate::protocol::{self, FromWorker, Request, RequestKey, HEARTBEAT};
use crate::stats::BrokerStats;

/// Errors that stop the broker before it serves.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
    #[error("cannot bind {endpoint}")]
    Bind {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
}

/// The most requests one worker may hold or be offered (its READY credits): a peer that keeps
/// sending READY cannot grow the broker's memory without bound.
pub const MAX_CREDITS: usize = 10_000;

#[derive(Debug)]
struct Worker {
    liveness: Liveness,
    /// Its entries in the idle queue: requests it can take now.
    credits: usize,
    /// Requests this worker holds, to send elsewhere if it dies.
    held: HashMap<RequestKey, Request>,
}

/// A broker whose sockets are bound; [`Broker::run`] serves until cancelled.
pub struct Broker {
    config: BrokerConfig,
    frontend: RouterSocket,
    backend: RouterSocket,
    frontend_monitor: Monitor,
    backend_monitor: Monitor,
    /// Real endpoints (port 0 resolved).
    pub frontend_endpoint: String,
    pub backend_endpoint: String,
    queue: VecDeque<Request>,
    idle: VecDeque<Bytes>,
    workers: HashMap<Bytes, Worker>,
    stats: BrokerStats,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("frontend", &self.frontend_endpoint)
            .field("backend", &self.backend_endpoint)
            .finish_non_exhaustive()
    }
}

async fn bind(
    endpoint: &str,
    keepalive: Duration,
) -> Result<(RouterSocket, Monitor, String), BrokerError> {
    // Keepalive lets the kernel drop peers lost behind a partition, releasing their queues.
    let listener = common::endpoint::bind_keepalive(endpoint, keepalive)?;
    let mut socket = RouterSocket::new();
    let monitor = Monitor::new(socket.monitor());
    let bound = socket
        .bind_listener(listener)
        .await
        .map_err(|source| BrokerError::Bind {
            endpoint: endpoint.to_string(),
            source,
        })?;
    Ok((socket, monitor, bound.to_string()))
}

/// Why a message could not be handed to a peer's queue.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    Zmq(#[from] zeromq::ZmqError),
    #[error("peer not reading")]
    Stalled,
}

/// Sends, but gives up after `limit` so one stalled peer (full queue) cannot stall the loop.
/// The common case, room in the queue, completes on the first poll without arming a timer.
async fn send_bounded(
    socket: &mut RouterSocket,
    msg: ZmqMessage,
    limit: Duration,
) -> Result<(), SendError> {
    let mut send = socket.send(msg);
    if let Some(result) = (&mut send).now_or_never() {
        return Ok(result?);
    }
    match tokio::time::timeout(limit, send).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SendError::Stalled),
    }
}

impl Broker {
    /// Binds both sockets.
    pub async fn bind(config: BrokerConfig) -> Result<Self, BrokerError> {
        let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
        let (frontend, frontend_monitor, frontend_endpoint) =
            bind(&config.frontend, keepalive).await?;
        let (backend, backend_monitor, backend_endpoint) = bind(&config.backend, keepalive).await?;
        tracing::info!(frontend = %frontend_endpoint, backend = %backend_endpoint, "broker bound");
        Ok(Self {
            config,
            frontend,
            backend,
            frontend_monitor,
            backend_monitor,
            frontend_endpoint,
            backend_endpoint,
            queue: VecDeque::new(),
            idle: VecDeque::new(),
            workers: HashMap::new(),
            stats: BrokerStats::default(),
        })
    }

    /// Serves until `shutdown` fires, then drains briefly and returns the final stats.
    pub async fn run(mut self, shutdown: CancellationToken) -> BrokerStats {
        let mut heartbeat = interval(self.config.heartbeat.interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stats_tick = interval(self.config.stats_every);
        stats_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        stats_tick.reset();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                msg = self.frontend.recv() => self.on_frontend(msg).await,
                msg = self.backend.recv() => self.on_backend(msg).await,
                worker = self.backend_monitor.disconnected() => self.purge(&worker, "disconnected"),
                client = self.frontend_monitor.disconnected() => self.forget_client(&client),
                _ = heartbeat.tick() => self.on_heartbeat().await,
                _ = stats_tick.tick() => self.log_stats("stats"),
            }
            self.dispatch().await;
        }
        self.drain().await;
        self.log_stats("final stats");
        self.stats
    }

    async fn on_frontend(&mut self, msg: zeromq::ZmqResult<ZmqMessage>) {
        let Ok(msg) = msg else { return };
        let peer = msg.get(0).cloned().unwrap_or_default();
        match Request::parse(msg) {
            Ok(request) => {
                self.stats.requests_in += 1;
                if self.queue.len() >= self.config.max_queued {
                    self.stats.rejected += 1;
                    if self.stats.rejected.is_power_of_two() {
                        tracing::warn!(
                            queued = self.queue.len(),
                            rejected = self.stats.rejected,
                            "queue full, dropping requests"
                        );
                    }
                } else {
                    self.queue.push_back(request);
                }
            }
            Err(e) => {
                self.stats.bad_frontend += 1;
                tracing::warn!(peer = %frames::show(&peer), error = %e, "bad message from client dropped");
            }
        }
    }

    async fn on_backend(&mut self, msg: zeromq::ZmqResult<ZmqMessage>) {
        let Ok(msg) = msg else { return };
        let (worker_id, parsed) = FromWorker::parse(msg);
        match parsed {
            Ok(FromWorker::Ready) => {
                let worker = self.workers.entry(worker_id.clone()).or_insert_with(|| {
                    tracing::info!(worker = %frames::show(&worker_id), "worker ready");
                    Worker {
                        liveness: Liveness::new(self.config.heartbeat),
                        credits: 0,
                        held: HashMap::new(),
                    }
                });
                worker.liveness.heard();
                if worker.credits + worker.held.len() >= MAX_CREDITS {
                    self.stats.bad_backend += 1;
                    tracing::warn!(worker = %frames::show(&worker_id), "READY beyond {MAX_CREDITS} credits dropped");
                } else {
                    worker.credits += 1;
                    self.idle.push_back(worker_id);
                }
            }
            Ok(FromWorker::Heartbeat) => {
                if let Some(worker) = self.workers.get_mut(&worker_id) {
                    worker.liveness.heard();
                }
            }
            Ok(FromWorker::Reply(reply)) => {
                if let Some(worker) = self.workers.get_mut(&worker_id) {
                    worker.liveness.heard();
                    // Only a reply to a request it held frees a slot: a late reply from a
                    // request we already gave to someone else must not double-book it.
                    if worker.held.remove(&protocol::key_of(&reply)).is_some() {
                        worker.credits += 1;
                        self.idle.push_back(worker_id);
                    }
                }
                self.reply_to_client(reply).await;
            }
            Err(e) => {
                self.stats.bad_backend += 1;
                tracing::warn!(worker = %frames::show(&worker_id), error = %e, "bad message from worker dropped");
            }
        }
    }

    async fn reply_to_client(&mut self, reply: ZmqMessage) {
        match send_bounded(&mut self.frontend, reply, self.config.send_timeout).await {
            Ok(()) => self.stats.replies_out += 1,
            Err(e) => {
                self.stats.undeliverable += 1;
                tracing::debug!(error = %e, "reply dropped");
            }
        }
    }

    /// Hands queued requests to idle workers, least recently used first.
    async fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(worker_id) = self.idle.pop_front() else {
                return;
            };
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                continue; // a slot of a purged worker
            };
            worker.credits -= 1;
            let request = self.queue.pop_front().expect("queue is not empty");
            let msg = request.to_worker(&worker_id);
            match send_bounded(&mut self.backend, msg, self.config.send_timeout).await {
                Ok(()) => {
                    self.stats.dispatched += 1;
                    if let Some(worker) = self.workers.get_mut(&worker_id) {
                        worker.held.insert(request.key(), request);
                    }
                }
                _ => {
                    self.queue.push_front(request);
                    self.purge(&worker_id, "send failed");
                }
            }
        }
    }

    async fn on_heartbeat(&mut self) {
        let expired: Vec<Bytes> = self
            .workers
            .iter()
            .filter(|(_, w)| w.liveness.is_expired())
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.purge(&id, "heartbeat expired");
        }
        let ids: Vec<Bytes> = self.workers.keys().cloned().collect();
        for id in ids {
            let msg = frames::message_of(vec![id.clone(), Bytes::from_static(HEARTBEAT)]);
            // A full queue is not fatal: liveness decides, not one heartbeat.
            let _ = send_bounded(&mut self.backend, msg, self.config.send_timeout).await;
        }
    }

    /// Forgets a worker and puts the requests it held back at the front of the queue.
    fn purge(&mut self, worker_id: &Bytes, why: &str) {
        let Some(worker) = self.workers.remove(worker_id) else {
            return;
        };
        self.stats.purged += 1;
        self.idle.retain(|id| id != worker_id);
        let requeued = worker.held.len();
        for (_, request) in worker.held {
            self.queue.push_front(request);
        }
        self.stats.requeued += requeued as u64;
        tracing::warn!(worker = %frames::show(worker_id), why, requeued, "worker purged");
    }

    /// Drops the queued requests of a client that went away: nobody would read the replies.
    fn forget_client(&mut self, client: &Bytes) {
        let before = self.queue.len();
        self.queue.retain(|r| r.client() != client);
        let dropped = before - self.queue.len();
        if dropped > 0 {
            tracing::info!(client = %frames::show(client), dropped, "client gone, its queued requests dropped");
        }
    }

    async fn drain(&mut self) {
        let held: usize = self.workers.values().map(|w| w.held.len()).sum();
        let dropped = self.queue.len();
        tracing::info!(
            held,
            dropped,
            "draining: no new requests, waiting for replies in flight"
        );
        self.queue.clear();
        let until = Instant::now() + self.config.drain;
        while self.workers.values().any(|w| !w.held.is_empty()) {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                msg = self.backend.recv() => self.on_backend(msg).await,
            }
        }
        tokio::time::sleep(common::link::LINGER).await;
    }

    fn log_stats(&self, what: &'static str) {
        let s = &self.stats;
        tracing::info!(
            requests_in = s.requests_in,
            replies_out = s.replies_out,
            dispatched = s.dispatched,
            workers = self.workers.len(),
            idle = self.idle.len(),
            queued = self.queue.len(),
            purged = s.purged,
            requeued = s.requeued,
            rejected = s.rejected,
            undeliverable = s.undeliverable,
            bad_frontend = s.bad_frontend,
            bad_backend = s.bad_backend,
            "{what}"
        );
    }
}
