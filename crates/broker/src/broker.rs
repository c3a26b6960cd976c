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
use common::send::Sent;
use common::watchdog::Watchdog;
use common::wire::limits::{GuardStats, Limits};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

use crate::books::{Books, ReplyFate};
use crate::config::BrokerConfig;
use crate::pair::{Fsm, PeerEvent, PeerLink, State};
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
    /// Whether clients' requests are taken: always without a pair; in a pair, while active.
    serving: bool,
    pair: Option<Pair>,
}

/// A pair's broker: its rules and its link to the other (see [`crate::pair`]).
struct Pair {
    fsm: Fsm,
    link: PeerLink,
    /// Stops the link's task when the broker stops.
    stop: CancellationToken,
    /// The peer was silent at the last heartbeat tick (for the log).
    silent: bool,
    /// The bound peer endpoint, for the ready line.
    endpoint: Option<String>,
}

/// The next word from the peer; never, without a pair (the branch is disabled then).
async fn next_peer_event(pair: &mut Option<Pair>) -> PeerEvent {
    match pair {
        Some(pair) => match pair.link.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        let pair = match &config.pair {
            None => None,
            Some(pair_config) => {
                let fsm = Fsm::new(pair_config.role, config.heartbeat.expiry(), Instant::now());
                let stop = CancellationToken::new();
                let link = crate::pair::spawn(
                    pair_config,
                    config.heartbeat,
                    (fsm.state(), fsm.term()),
                    stop.clone(),
                )?;
                tracing::info!(role = fsm.state().as_str(), peer_bind = ?link.endpoint, peer_connect = ?pair_config.connect, "pair: started, not serving yet");
                Some(Pair {
                    fsm,
                    endpoint: link.endpoint.clone(),
                    link,
                    stop,
                    silent: false,
                })
            }
        };
        let mut books = Books::new(
            config.max_queued,
            config.max_queued_bytes,
            config.max_deliveries,
            config.heartbeat,
        );
        let serving = pair.is_none();
        books.stats.active = u64::from(serving);
        Ok(Self {
            books,
            serving,
            pair,
            config,
            frontend_endpoint: frontend.endpoint.clone(),
            backend_endpoint: backend.endpoint.clone(),
            socket_stats: [frontend.stats().clone(), backend.stats().clone()],
            frontend,
            backend,
        })
    }

    /// The bound peer endpoint of a pair's broker (port 0 resolved), if it binds one.
    pub fn peer_endpoint(&self) -> Option<&str> {
        self.pair.as_ref().and_then(|p| p.endpoint.as_deref())
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
                event = next_peer_event(&mut self.pair), if self.pair.is_some() => {
                    self.on_peer(event);
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
        if let Some(pair) = &self.pair {
            pair.stop.cancel();
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
        // In a pair, a broker not active drops requests, unless this one makes it take over.
        if !self.serving && !self.admit() {
            self.books.stats.refused_inactive += 1;
            return;
        }
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

    /// A client's request came while not serving: the pair's rules say whether to take over.
    #[cold]
    fn admit(&mut self) -> bool {
        let Some(pair) = &mut self.pair else {
            return false;
        };
        let before = pair.fsm.state();
        let admitted = pair.fsm.on_client_request(Instant::now());
        self.after_pair_event(before, "a client came and the peer is silent");
        admitted
    }

    fn on_peer(&mut self, event: PeerEvent) {
        let Some(pair) = &mut self.pair else { return };
        let before = pair.fsm.state();
        let why = match event {
            PeerEvent::Heard(state, term) => {
                if pair.silent {
                    pair.silent = false;
                    tracing::info!(
                        peer = state.as_str(),
                        peer_term = term,
                        "pair: peer heard again"
                    );
                }
                pair.fsm.on_peer(state, term, Instant::now());
                match state {
                    State::Active => "the peer is active",
                    State::Passive => "the peer is passive",
                    State::Primary | State::Backup => "the peer (re)started",
                }
            }
            PeerEvent::Lost => {
                tracing::warn!("pair: peer link closed: the peer is taken for silent");
                pair.fsm.on_peer_lost();
                "the peer's link closed"
            }
        };
        self.after_pair_event(before, why);
    }

    /// Acts on a change of the pair's state: serving or not, the queue dropped on yielding,
    /// the new state said to the peer and logged.
    fn after_pair_event(&mut self, before: State, why: &str) {
        let Some(pair) = &mut self.pair else { return };
        let (state, term) = (pair.fsm.state(), pair.fsm.term());
        let stats = &mut self.books.stats;
        stats.term = term;
        pair.link.ours.send_if_modified(|ours| {
            let changed = *ours != (state, term);
            *ours = (state, term);
            changed
        });
        if state == before {
            return;
        }
        self.serving = state == State::Active;
        stats.active = u64::from(self.serving);
        let peer = pair
            .fsm
            .peer()
            .map(|(s, _)| s.as_str())
            .unwrap_or("unknown");
        if self.serving {
            stats.activations += 1;
        }
        tracing::warn!(
            from = before.as_str(),
            to = state.as_str(),
            term,
            peer,
            why,
            replies_out = stats.replies_out,
            unix_ms = unix_ms(),
            "pair: state changed"
        );
        if before == State::Active {
            stats.yielded += 1;
            // Its clients re-send to the active broker; what workers hold is answered if the
            // client is still here.
            let (held, dropped) = self.books.close();
            tracing::warn!(
                held,
                dropped,
                "pair: yielded to the peer, queued requests dropped"
            );
        }
    }

    fn on_heartbeat(&mut self) {
        if let Some(pair) = &mut self.pair {
            let silent = pair.fsm.peer_silent(Instant::now());
            if silent && !pair.silent {
                tracing::warn!(state = pair.fsm.state().as_str(), "pair: peer silent");
            }
            pair.silent = silent;
        }
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
        (stats.guard_refused, stats.guard_stalled) =
            common::wire::limits::totals(&self.socket_stats);
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
            active = s.active,
            term = s.term,
            activations = s.activations,
            yielded = s.yielded,
            refused_inactive = s.refused_inactive,
            "{what}"
        );
    }
}
