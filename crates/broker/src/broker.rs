//! The shared queue: ROUTER frontend (clients) and ROUTER backend (workers) in one task.
//!
//! Requests wait in a bounded queue per client, served in turn; workers' free slots (READY
//! credits) wait in a least-recently-used queue. Heartbeats go to every worker each interval; a
//! worker silent for `interval x liveness`, or whose connection closes, is purged and the
//! requests it held go back to the front of the queue, so another worker answers them.
//! A request already queued or with a worker (same client, same first body frame) is a retry
//! and is not run again. Nothing the loop sends ever waits on a peer: a peer that stopped
//! reading is skipped at once (see `common::send`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::guard::GuardStats;
use common::heartbeat::Liveness;
use common::link::Monitor;
use common::send::{try_send, Sent};
use common::watchdog::Watchdog;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{RouterSocket, Socket, SocketRecv, ZmqMessage};

use crate::config::BrokerConfig;
use crate::protocol::{self, FromWorker, Request, RequestKey, HEARTBEAT};
use crate::queue::{Overflow, RequestQueue};
use crate::stats::BrokerStats;

/// Errors that stop the broker before it serves.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Bind(#[from] common::guard::BindError),
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
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
    /// It said DISCONNECT: it answers what it holds and takes nothing more.
    leaving: bool,
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
    /// Counters of the guards in front of the sockets, if any.
    guards: Vec<Arc<GuardStats>>,
    queue: RequestQueue,
    /// Keys of every request queued or held by a worker: a request that arrives again while
    /// its key is here is a retry of one the broker already owns.
    owned: HashSet<RequestKey>,
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

/// One bound ROUTER: the socket, its monitor, the endpoint peers use, the guard's counters.
type Bound = (RouterSocket, Monitor, String, Option<Arc<GuardStats>>);

async fn bind(endpoint: &str, config: &BrokerConfig) -> Result<Bound, BrokerError> {
    // Keepalive and the user timeout let the kernel drop peers lost behind a partition or no
    // longer reading, releasing their queues.
    let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
    let limits = common::guard::wanted(config.guard, endpoint)?.then_some(config.limits);
    let mut socket = RouterSocket::new();
    let monitor = Monitor::new(socket.monitor());
    let (bound, guard) = common::guard::bind(&mut socket, endpoint, keepalive, limits).await?;
    Ok((socket, monitor, bound, guard))
}

impl Broker {
    /// Binds both sockets.
    pub async fn bind(config: BrokerConfig) -> Result<Self, BrokerError> {
        let (frontend, frontend_monitor, frontend_endpoint, frontend_guard) =
            bind(&config.frontend, &config).await?;
        let (backend, backend_monitor, backend_endpoint, backend_guard) =
            bind(&config.backend, &config).await?;
        tracing::info!(
            frontend = %frontend_endpoint,
            backend = %backend_endpoint,
            guarded_frontend = frontend_guard.is_some(),
            guarded_backend = backend_guard.is_some(),
            "broker bound"
        );
        Ok(Self {
            queue: RequestQueue::new(config.max_queued),
            config,
            frontend,
            backend,
            frontend_monitor,
            backend_monitor,
            frontend_endpoint,
            backend_endpoint,
            guards: [frontend_guard, backend_guard]
                .into_iter()
                .flatten()
                .collect(),
            owned: HashSet::new(),
            idle: VecDeque::new(),
            workers: HashMap::new(),
            stats: BrokerStats::default(),
        })
    }

    /// Serves until `shutdown` fires, then drains briefly and returns the final stats.
    pub async fn run(self, shutdown: CancellationToken) -> BrokerStats {
        self.run_reporting(shutdown, |_| {}).await
    }

    /// [`Broker::run`], handing the counters to `report` every `stats_every`.
    pub async fn run_reporting(
        mut self,
        shutdown: CancellationToken,
        mut report: impl FnMut(&BrokerStats),
    ) -> BrokerStats {
        let mut heartbeat = interval(self.config.heartbeat.interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut stats_tick = interval(self.config.stats_every);
        stats_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        stats_tick.reset();
        // The heartbeat tick turns the loop at least once an interval, busy or idle.
        let watchdog = Watchdog::spawn(
            "broker",
            self.config.watchdog.max(self.config.heartbeat.interval * 3),
        );
        loop {
            watchdog.pet();
            // zmq.rs's sockets are not part of tokio's cooperative budget: with a client
            // flooding the frontend, `recv()` is always ready and this task would never yield,
            // starving the library's writer tasks on this one thread (measured: workers heard
            // nothing for 4 s and reconnected). This yields once every 128 turns.
            tokio::task::consume_budget().await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                msg = self.frontend.recv() => self.on_frontend(msg),
                msg = self.backend.recv() => self.on_backend(msg),
                worker = self.backend_monitor.disconnected() => self.purge(&worker, "disconnected"),
                client = self.frontend_monitor.disconnected() => self.forget_client(&client, "gone"),
                _ = heartbeat.tick() => self.on_heartbeat(),
                _ = stats_tick.tick() => {
                    self.refresh_guard_stats();
                    self.log_stats("stats");
                    report(&self.stats);
                }
            }
            self.dispatch();
        }
        self.drain(&watchdog).await;
        self.refresh_guard_stats();
        self.log_stats("final stats");
        self.stats
    }

    fn on_frontend(&mut self, msg: zeromq::ZmqResult<ZmqMessage>) {
        let Ok(msg) = msg else { return };
        let peer = msg.get(0).cloned().unwrap_or_default();
        let request = match Request::parse(msg) {
            Ok(request) => request,
            Err(e) => {
                self.stats.bad_frontend += 1;
                tracing::warn!(peer = %frames::show(&peer), error = %e, "bad message from client dropped");
                return;
            }
        };
        self.stats.requests_in += 1;
        let key = request.key();
        if self.owned.contains(&key) {
            // A retry of a request still queued or with a worker: its reply answers both.
            self.stats.merged += 1;
            return;
        }
        match self.queue.push(request) {
            Ok(()) => {
                self.owned.insert(key);
            }
            Err(overflow) => {
                self.stats.rejected += 1;
                if let Overflow::Displaced(dropped) = overflow {
                    self.owned.remove(&dropped.key());
                    self.owned.insert(key);
                }
                if self.stats.rejected.is_power_of_two() {
                    tracing::warn!(
                        queued = self.queue.len(),
                        rejected = self.stats.rejected,
                        "queue full, dropping requests"
                    );
                }
            }
        }
    }

    fn on_backend(&mut self, msg: zeromq::ZmqResult<ZmqMessage>) {
        let Ok(msg) = msg else { return };
        let (worker_id, parsed) = FromWorker::parse(msg);
        match parsed {
            Ok(FromWorker::Ready) => self.on_ready(worker_id),
            Ok(FromWorker::Heartbeat) => {
                if let Some(worker) = self.workers.get_mut(&worker_id) {
                    worker.liveness.heard();
                }
            }
            Ok(FromWorker::Disconnect) => self.on_leaving(worker_id),
            Ok(FromWorker::Reply(reply)) => self.on_reply(worker_id, reply),
            Err(e) => {
                self.stats.bad_backend += 1;
                tracing::warn!(worker = %frames::show(&worker_id), error = %e, "bad message from worker dropped");
            }
        }
    }

    fn on_ready(&mut self, worker_id: Bytes) {
        let worker = self.workers.entry(worker_id.clone()).or_insert_with(|| {
            tracing::info!(worker = %frames::show(&worker_id), "worker ready");
            Worker {
                liveness: Liveness::new(self.config.heartbeat),
                credits: 0,
                held: HashMap::new(),
                leaving: false,
            }
        });
        worker.liveness.heard();
        if worker.leaving || worker.credits + worker.held.len() >= MAX_CREDITS {
            self.stats.bad_backend += 1;
            tracing::warn!(worker = %frames::show(&worker_id), "READY beyond {MAX_CREDITS} credits, or after DISCONNECT, dropped");
        } else {
            worker.credits += 1;
            self.idle.push_back(worker_id);
        }
    }

    /// The worker is stopping: no more requests for it; it stays until it has answered.
    fn on_leaving(&mut self, worker_id: Bytes) {
        let Some(worker) = self.workers.get_mut(&worker_id) else {
            return;
        };
        worker.liveness.heard();
        worker.leaving = true;
        worker.credits = 0;
        let held = worker.held.len();
        self.idle.retain(|id| id != &worker_id);
        tracing::info!(worker = %frames::show(&worker_id), held, "worker leaving");
        if held == 0 {
            self.workers.remove(&worker_id);
        }
    }

    fn on_reply(&mut self, worker_id: Bytes, reply: ZmqMessage) {
        let key = protocol::key_of(&reply);
        let mut answered = false;
        if let Some(worker) = self.workers.get_mut(&worker_id) {
            worker.liveness.heard();
            // Only a reply to a request it held frees a slot: a late reply from a request we
            // already gave to someone else must not double-book it.
            if worker.held.remove(&key).is_some() {
                answered = true;
                if !worker.leaving {
                    worker.credits += 1;
                    self.idle.push_back(worker_id);
                } else if worker.held.is_empty() {
                    self.workers.remove(&worker_id);
                }
            }
        }
        if !answered {
            // A late reply from a worker purged meanwhile: it still answers the client, and
            // the queued copy need not run. If the key is no longer owned, the request was
            // answered already and this is a repeat.
            if !self.owned.contains(&key) {
                self.stats.stale_replies += 1;
                return;
            }
            if self.queue.remove(&key).is_none() {
                // Held by another worker, whose reply will free its slot.
                self.reply_to_client(reply);
                return;
            }
        }
        self.owned.remove(&key);
        self.reply_to_client(reply);
    }

    fn reply_to_client(&mut self, reply: ZmqMessage) {
        let client = reply.get(0).cloned().unwrap_or_default();
        match try_send(&mut self.frontend, reply) {
            Sent::Queued => self.stats.replies_out += 1,
            Sent::Stalled => {
                self.stats.undeliverable += 1;
                self.stats.stalled += 1;
                // Its queue is full: running its other requests now would only feed the same
                // full queue. It may send them again once it reads.
                self.forget_client(&client, "not reading");
            }
            Sent::Failed(e) => {
                self.stats.undeliverable += 1;
                tracing::debug!(error = %e, "reply dropped");
            }
        }
    }

    /// Hands queued requests to idle workers, least recently used first.
    fn dispatch(&mut self) {
        while !self.queue.is_empty() {
            let Some(worker_id) = self.idle.pop_front() else {
                return;
            };
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                continue; // a slot of a purged worker
            };
            worker.credits -= 1;
            let request = self.queue.pop().expect("queue is not empty");
            match try_send(&mut self.backend, request.to_worker(&worker_id)) {
                Sent::Queued => {
                    self.stats.dispatched += 1;
                    if let Some(worker) = self.workers.get_mut(&worker_id) {
                        worker.held.insert(request.key(), request);
                    }
                }
                why => {
                    self.queue.push_front(request);
                    let why = if matches!(why, Sent::Stalled) {
                        "not reading"
                    } else {
                        "send failed"
                    };
                    self.purge(&worker_id, why);
                }
            }
        }
    }

    fn on_heartbeat(&mut self) {
        let expired: Vec<Bytes> = self
            .workers
            .iter()
            .filter(|(_, w)| w.liveness.is_expired())
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.purge(&id, "heartbeat expired");
        }
        for id in self.workers.keys() {
            let msg = frames::message_of(vec![id.clone(), Bytes::from_static(HEARTBEAT)]);
            // A full queue is not fatal: liveness decides, not one heartbeat.
            let _ = try_send(&mut self.backend, msg);
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

    /// Drops the queued requests of a client that went away or stopped reading: nobody would
    /// read the replies.
    fn forget_client(&mut self, client: &Bytes, why: &str) {
        let dropped = self.queue.remove_client(client);
        for request in &dropped {
            self.owned.remove(&request.key());
        }
        if !dropped.is_empty() {
            self.stats.forgotten += dropped.len() as u64;
            tracing::info!(client = %frames::show(client), why, dropped = dropped.len(), "client's queued requests dropped");
        }
    }

    async fn drain(&mut self, watchdog: &Watchdog) {
        let held: usize = self.workers.values().map(|w| w.held.len()).sum();
        let dropped = self.queue.drain().len();
        tracing::info!(
            held,
            dropped,
            "draining: no new requests, waiting for replies in flight"
        );
        let until = Instant::now() + self.config.drain;
        let mut tick = interval(Duration::from_millis(500));
        while self.workers.values().any(|w| !w.held.is_empty()) {
            watchdog.pet();
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                msg = self.backend.recv() => self.on_backend(msg),
                _ = tick.tick() => {}
            }
        }
        tokio::time::sleep(common::link::LINGER).await;
    }

    fn refresh_guard_stats(&mut self) {
        self.stats.guard_refused = self.guards.iter().map(|g| g.refused()).sum();
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
            merged = s.merged,
            forgotten = s.forgotten,
            undeliverable = s.undeliverable,
            stalled = s.stalled,
            stale_replies = s.stale_replies,
            bad_frontend = s.bad_frontend,
            bad_backend = s.bad_backend,
            guard_refused = s.guard_refused,
            "{what}"
        );
    }
}
