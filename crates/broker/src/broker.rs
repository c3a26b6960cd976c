//! The shared queue: ROUTER frontend (clients) and ROUTER backend (workers) in one task.
//!
//! This file moves messages; [`crate::books`] decides where they go (per-client queues served
//! in turn, least-recently-used worker credits, merged retries, re-queue on purge). Heartbeats
//! go to every worker each interval; a worker silent for `interval x liveness`, or whose
//! connection closes, is purged. Both ROUTERs are our own ([`common::wire::router`]): nothing the loop
//! sends ever waits on a peer, and a peer that stopped reading is cut off at its byte bound.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::guard::{GuardStats, Limits};
use common::send::Sent;
use common::watchdog::Watchdog;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

use crate::books::{Books, ReplyFate};
use crate::config::BrokerConfig;
use crate::protocol::{self, FromWorker, Request, HEARTBEAT};
use crate::stats::BrokerStats;
use common::wire::router::{Event, Router};

/// Messages handled from one socket in a row before the other gets its turn. Measured with
/// libzmq's client and workers holding 64 requests each, on zmq.rs's sockets then
/// (docs/performance.md): 16 gave a quarter of the throughput of 256, 64 two thirds; beyond 256
/// nothing more.
const BATCH: usize = 256;

/// Malformed messages are logged once a second at most, with the count held back: a peer can
/// send millions.
static BAD_FRONTEND_LOG: common::logging::Throttle =
    common::logging::Throttle::new(Duration::from_secs(1));
static BAD_BACKEND_LOG: common::logging::Throttle =
    common::logging::Throttle::new(Duration::from_secs(1));

/// Messages handled between two yields to the sockets' reader and writer tasks.
const YIELD_EVERY: usize = 256;

#[derive(Debug, Clone, Copy)]
enum Side {
    Frontend,
    Backend,
}

/// Errors that stop the broker before it serves.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
    #[error("cannot serve {endpoint}: {source}")]
    Serve {
        endpoint: String,
        source: std::io::Error,
    },
}

/// A broker whose sockets are bound; [`Broker::run`] serves until cancelled.
pub struct Broker {
    config: BrokerConfig,
    frontend: Router,
    backend: Router,
    /// Real endpoints (port 0 resolved).
    pub frontend_endpoint: String,
    pub backend_endpoint: String,
    /// Counters of the two sockets' limits.
    socket_stats: [Arc<GuardStats>; 2],
    books: Books,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("frontend", &self.frontend_endpoint)
            .field("backend", &self.backend_endpoint)
            .finish_non_exhaustive()
    }
}

fn bind(endpoint: &str, limits: Limits, config: &BrokerConfig) -> Result<Router, BrokerError> {
    // Keepalive and the user timeout let the kernel drop peers lost behind a partition or no
    // longer reading, releasing their queues.
    let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
    let listener = common::endpoint::bind_keepalive(endpoint, keepalive)?;
    Router::serve(listener, limits, config.max_connections).map_err(|source| BrokerError::Serve {
        endpoint: endpoint.to_string(),
        source,
    })
}

impl Broker {
    /// Binds both sockets.
    pub async fn bind(config: BrokerConfig) -> Result<Self, BrokerError> {
        let frontend = bind(&config.frontend, config.limits, &config)?;
        // Room for the reply to any request the frontend takes (see `backend_limits`).
        let backend = bind(&config.backend, config.backend_limits(), &config)?;
        tracing::info!(
            frontend = %frontend.endpoint,
            backend = %backend.endpoint,
            "broker bound"
        );
        Ok(Self {
            books: Books::new(
                config.max_queued,
                config.max_queued_bytes,
                config.max_deliveries,
                config.heartbeat,
            ),
            config,
            frontend_endpoint: frontend.endpoint.clone(),
            backend_endpoint: backend.endpoint.clone(),
            socket_stats: [frontend.stats().clone(), backend.stats().clone()],
            frontend,
            backend,
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
        // Pinned once: a fresh `cancelled()` each turn would register with the token anew.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let mut since_yield = 0;
        loop {
            watchdog.pet();
            let handled = tokio::select! {
                () = &mut cancelled => break,
                event = self.frontend.recv() => {
                    self.on_frontend(event);
                    1 + self.drain_ready(Side::Frontend)
                }
                event = self.backend.recv() => {
                    self.on_backend(event);
                    1 + self.drain_ready(Side::Backend)
                }
                _ = heartbeat.tick() => {
                    self.on_heartbeat();
                    0
                }
                _ = stats_tick.tick() => {
                    self.refresh_guard_stats();
                    self.log_stats("stats");
                    report(&self.books.stats);
                    0
                }
            };
            self.dispatch();
            // Draining a socket with `try_recv` spends none of tokio's cooperative budget: with
            // a client flooding the frontend this task would never yield, starving the
            // connections' writer tasks on this one thread (measured on zmq.rs's sockets:
            // workers heard nothing for 4 s and reconnected). So it yields once every
            // `YIELD_EVERY` messages.
            since_yield += handled;
            if since_yield >= YIELD_EVERY {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        self.drain(&watchdog).await;
        self.refresh_guard_stats();
        self.log_stats("final stats");
        self.books.stats
    }

    /// Handles the messages already waiting on one socket, up to [`BATCH`], without going back
    /// through `select!` for each (which would build every branch's future anew). Returns how
    /// many it handled.
    fn drain_ready(&mut self, side: Side) -> usize {
        for handled in 0..BATCH {
            let event = match side {
                Side::Frontend => self.frontend.try_recv(),
                Side::Backend => self.backend.try_recv(),
            };
            match (side, event) {
                (_, None) => return handled,
                (Side::Frontend, Some(event)) => self.on_frontend(event),
                (Side::Backend, Some(event)) => self.on_backend(event),
            }
        }
        BATCH
    }

    fn on_frontend(&mut self, event: Event) {
        let msg = match event {
            Event::Message(msg) => msg,
            Event::Gone(client) => return self.books.forget_client(&client, "gone"),
        };
        let peer = msg.get(0).cloned().unwrap_or_default();
        match Request::parse(msg) {
            Ok(request) => {
                let backend = &mut self.backend;
                self.books.request(request, |worker, request| {
                    backend.send_to(worker, request.frames())
                });
            }
            Err(e) => {
                self.books.stats.bad_frontend += 1;
                if let Some(held_back) = BAD_FRONTEND_LOG.check() {
                    tracing::warn!(peer = %frames::show(&peer), error = %e, held_back, "bad message from client dropped");
                }
            }
        }
    }

    fn on_backend(&mut self, event: Event) {
        let msg = match event {
            Event::Message(msg) => msg,
            Event::Gone(worker) => return self.books.purge(&worker, "disconnected"),
        };
        let (worker_id, parsed) = FromWorker::parse(msg);
        match parsed {
            Ok(FromWorker::Ready) => self.books.ready(worker_id),
            Ok(FromWorker::Heartbeat) => self.books.heartbeat(worker_id),
            Ok(FromWorker::Disconnect) => self.books.leaving(&worker_id),
            Ok(FromWorker::Reply(reply)) => {
                if self.books.reply(&worker_id, &protocol::key_of(&reply)) == ReplyFate::Forward {
                    self.reply_to_client(reply);
                }
            }
            Err(e) => {
                self.books.stats.bad_backend += 1;
                if let Some(held_back) = BAD_BACKEND_LOG.check() {
                    tracing::warn!(worker = %frames::show(&worker_id), error = %e, held_back, "bad message from worker dropped");
                }
            }
        }
    }

    fn reply_to_client(&mut self, reply: ZmqMessage) {
        let client = reply.get(0).cloned().unwrap_or_default();
        let stats = &mut self.books.stats;
        match self.frontend.send(reply) {
            Sent::Queued => stats.replies_out += 1,
            Sent::Stalled => {
                stats.undeliverable += 1;
                stats.stalled += 1;
                // Its queue is full: running its other requests now would only feed the same
                // full queue. It may send them again once it reads.
                self.books.forget_client(&client, "not reading");
            }
            Sent::Failed(e) => {
                stats.undeliverable += 1;
                tracing::debug!(error = %e, "reply dropped");
            }
        }
    }

    /// Hands queued requests to idle workers, least recently used first.
    fn dispatch(&mut self) {
        let backend = &mut self.backend;
        self.books
            .dispatch(|worker, request| backend.send_to(worker, request.frames()));
    }

    fn on_heartbeat(&mut self) {
        self.books.purge_expired();
        let heartbeat = [Bytes::from_static(HEARTBEAT)];
        for id in self.books.worker_ids() {
            // A full queue is not fatal: liveness decides, not one heartbeat.
            let _ = self.backend.send_to(id, heartbeat.iter());
        }
    }

    async fn drain(&mut self, watchdog: &Watchdog) {
        let (held, dropped) = self.books.close();
        tracing::info!(
            held,
            dropped,
            "draining: no new requests, waiting for replies in flight"
        );
        let until = Instant::now() + self.config.drain;
        let mut tick = interval(Duration::from_millis(500));
        while self.books.held() > 0 {
            watchdog.pet();
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                msg = self.backend.recv() => self.on_backend(msg),
                _ = tick.tick() => {}
            }
        }
        // What the outboxes hold goes out before the sockets close (not cut mid-frame).
        self.frontend.flush(common::link::LINGER).await;
        self.backend.flush(common::link::LINGER).await;
    }

    fn refresh_guard_stats(&mut self) {
        let stats = &mut self.books.stats;
        (stats.guard_refused, stats.guard_stalled) = common::guard::totals(&self.socket_stats);
        stats.evicted = self.socket_stats.iter().map(|s| s.evicted()).sum();
        stats.turned_away = self.socket_stats.iter().map(|s| s.turned_away()).sum();
    }

    fn log_stats(&self, what: &'static str) {
        let s = &self.books.stats;
        tracing::info!(
            requests_in = s.requests_in,
            replies_out = s.replies_out,
            dispatched = s.dispatched,
            workers = self.books.workers(),
            idle = self.books.idle(),
            queued = self.books.queued(),
            queued_bytes = self.books.queued_bytes(),
            purged = s.purged,
            requeued = s.requeued,
            rejected = s.rejected,
            merged = s.merged,
            forgotten = s.forgotten,
            undeliverable = s.undeliverable,
            stalled = s.stalled,
            stale_replies = s.stale_replies,
            stray_replies = s.stray_replies,
            poisoned = s.poisoned,
            poisoned_retries = s.poisoned_retries,
            parked = s.parked,
            heartbeat_ready = s.heartbeat_ready,
            bad_frontend = s.bad_frontend,
            bad_backend = s.bad_backend,
            guard_refused = s.guard_refused,
            guard_stalled = s.guard_stalled,
            evicted = s.evicted,
            turned_away = s.turned_away,
            "{what}"
        );
    }
}
