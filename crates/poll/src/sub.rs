//! The SUB branch: weather updates from the proxy's XPUB (or our own PUB), `ZMQ_POLLIN` on a SUB.
//!
//! [`SubBranch::next`] is what the poll loop `select!`s on. It is cancel-safe, and this is
//! why: everything that must survive a cancelled call lives in `self`, not in the future.
//!
//! - Connected: it awaits `SubSocket::recv`, the monitor and a liveness tick. zmq.rs's SUB
//!   `recv` (`sub.rs`, `SocketRecv for SubSocket`) is a loop over `self.fair_queue.next()`:
//!   the partly read frames are buffered in the socket's `FairQueue`/`ZmqFramedRead` streams,
//!   and a message taken out of the queue is returned in the same poll, with no `.await` in
//!   between. Dropping the future between two polls loses nothing (PULL's `recv` is the same
//!   loop; `docs/poll.md` has the million cancelled receives measured). The monitor is an
//!   `mpsc::Receiver` (`next()` is cancel-safe) and `Interval::tick` is documented cancel-safe.
//! - Reconnecting: the connect-and-subscribe future is *not* cancel-safe (a half-made socket
//!   would be dropped and the backoff restarted), so it is boxed and kept in `self.state`
//!   across calls; each call resumes the same future (`fut.as_mut().await`).
//! - State changes happen only after an await completed, with no await after them.
//!
//! zmq.rs reconnects SUB sockets by itself, but backs off to 30 s and never notices a proxy
//! that restarted behind a partition (`docs/pubsub.md`). So, as
//! the pubsub subscriber does, the branch subscribes to the proxy's heartbeat topic too, and a
//! closed connection or silence for `interval x liveness` drops the socket; a fresh one is
//! connected with `common::link::connect` and capped exponential backoff.

use common::heartbeat::{Heartbeat, Liveness};
use common::link::{self, Backoff, Monitor, Reconnect};
use futures::future::BoxFuture;
use pubsub::protocol::{Incoming, Malformed, Update, Zip, HEARTBEAT_TOPIC};
use tokio::time::{interval, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SubSocket};

/// What one call of [`SubBranch::next`] gives.
#[derive(Debug)]
pub enum SubEvent {
    Update(Update),
    /// A heartbeat of the proxy instance given.
    Heartbeat(u64),
    Bad(Malformed),
    /// Connected and subscribed (the first time, or again).
    Connected,
    /// The link is gone; a new one is being made.
    Lost(&'static str),
}

struct Up {
    socket: SubSocket,
    monitor: Monitor,
    liveness: Liveness,
    check: Interval,
}

enum State {
    Connecting(BoxFuture<'static, Option<Up>>),
    Up(Box<Up>),
    /// Stopped while connecting: never ready again.
    Stopped,
}

/// A SUB socket on one endpoint, subscribed to some zips, that comes back by itself.
pub struct SubBranch {
    endpoint: String,
    topics: Vec<String>,
    heartbeat: Heartbeat,
    policy: Reconnect,
    cancel: CancellationToken,
    state: State,
}

impl std::fmt::Debug for SubBranch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubBranch")
            .field("endpoint", &self.endpoint)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl SubBranch {
    /// Starts connecting at once (in the first call of `next`). An empty `zips` subscribes to
    /// everything. `cancel` ends connection attempts.
    pub fn new(
        endpoint: &str,
        zips: &[Zip],
        heartbeat: Heartbeat,
        policy: Reconnect,
        cancel: CancellationToken,
    ) -> Self {
        let mut topics: Vec<String> = zips.iter().map(Zip::to_string).collect();
        if topics.is_empty() {
            topics.push(String::new());
        }
        // Last: once a heartbeat arrives, every zip subscription has reached the proxy too.
        topics.push(String::from_utf8_lossy(HEARTBEAT_TOPIC).into_owned());
        let mut branch = Self {
            endpoint: endpoint.to_string(),
            topics,
            heartbeat,
            policy,
            cancel,
            state: State::Stopped,
        };
        branch.state = branch.connecting(false);
        branch
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    fn connecting(&self, pause_first: bool) -> State {
        let mut backoff = Backoff::new(self.policy.min, self.policy.max);
        let endpoint = self.endpoint.clone();
        let topics = self.topics.clone();
        let policy = self.policy;
        let cancel = self.cancel.clone();
        let heartbeat = self.heartbeat;
        State::Connecting(Box::pin(async move {
            if pause_first && !backoff.pause(&cancel).await {
                return None;
            }
            loop {
                let c = link::connect(
                    &endpoint,
                    &policy,
                    &mut backoff,
                    &cancel,
                    SubSocket::with_options,
                )
                .await?;
                let mut socket = c.socket;
                let mut subscribed = true;
                for topic in &topics {
                    if socket.subscribe(topic).await.is_err() {
                        subscribed = false;
                        break;
                    }
                }
                if subscribed {
                    let mut check = interval(heartbeat.interval / 2);
                    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    let up = Up {
                        socket,
                        monitor: c.monitor,
                        liveness: Liveness::new(heartbeat),
                        check,
                    };
                    return Some(up);
                }
                drop(socket);
                if !backoff.pause(&cancel).await {
                    return None;
                }
            }
        }))
    }

    /// The next thing that happened on this socket. Cancel-safe (see the module comment).
    pub async fn next(&mut self) -> SubEvent {
        loop {
            match &mut self.state {
                State::Stopped => std::future::pending::<()>().await,
                State::Connecting(fut) => match fut.as_mut().await {
                    Some(up) => {
                        self.state = State::Up(Box::new(up));
                        return SubEvent::Connected;
                    }
                    None => self.state = State::Stopped,
                },
                State::Up(up) => {
                    let lost = tokio::select! {
                        // Messages first: what a departing publisher sent is read before its
                        // departure is acted on.
                        biased;
                        msg = up.socket.recv() => match msg {
                            Ok(msg) => {
                                up.liveness.heard();
                                return match Incoming::parse(&msg.into_vec()) {
                                    Ok(Incoming::Update(u)) => SubEvent::Update(u),
                                    Ok(Incoming::Heartbeat(i)) => SubEvent::Heartbeat(i),
                                    Err(e) => SubEvent::Bad(e),
                                };
                            }
                            // Per-peer errors (e.g. a reset) are not fatal to the socket; the
                            // monitor or the liveness check says whether the link is gone.
                            Err(e) => {
                                tracing::debug!(error = %e, "sub receive error");
                                continue;
                            }
                        },
                        _ = up.monitor.disconnected() => "connection closed",
                        _ = up.check.tick() => {
                            if !up.liveness.is_expired() {
                                continue;
                            }
                            "publisher silent"
                        }
                    };
                    tracing::warn!(endpoint = %self.endpoint, why = lost, "sub link lost, reconnecting");
                    self.state = self.connecting(true);
                    return SubEvent::Lost(lost);
                }
            }
        }
    }
}
