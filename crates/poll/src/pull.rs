//! The PULL branch: tasks from a feeder's bound PUSH, `ZMQ_POLLIN` on a PULL.
//!
//! [`PullBranch::next`] is cancel-safe for the same reasons as the SUB branch's: zmq.rs's PULL
//! `recv` (`pull.rs`, `SocketRecv for PullSocket`) only awaits `self.fair_queue.next()`, a
//! `Stream` whose partial frames live in the socket, and returns a dequeued message in the same
//! poll; the monitor is an `mpsc::Receiver`; and the reconnect future, which is not
//! cancel-safe, is kept in `self.state` and resumed, never rebuilt.
//!
//! zmq.rs does not reconnect PULL sockets, and a `PullSocket` has no `Drop`: dropping one leaves
//! its TCP connections open and the PUSH keeps sending into them, lost. So this branch keeps
//! one socket for its whole life and, when the monitor reports the feeder gone, calls
//! `connect()` again on that same socket, with capped exponential backoff.

use common::link::{Backoff, Monitor, Reconnect};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use zeromq::{PullSocket, Socket, SocketOptions, SocketRecv};

use crate::task::{NotATask, Task};

/// What one call of [`PullBranch::next`] gives.
#[derive(Debug)]
pub enum PullEvent {
    Task(Task),
    Bad(NotATask),
    Connected,
    Lost,
}

struct Up {
    socket: PullSocket,
    monitor: Monitor,
}

enum State {
    Connecting(BoxFuture<'static, Option<Up>>),
    Up(Box<Up>),
    Stopped,
}

/// A PULL socket connected to one endpoint, reconnected in place when the feeder goes.
pub struct PullBranch {
    endpoint: String,
    policy: Reconnect,
    cancel: CancellationToken,
    state: State,
}

impl std::fmt::Debug for PullBranch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullBranch")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl PullBranch {
    pub fn new(endpoint: &str, policy: Reconnect, cancel: CancellationToken) -> Self {
        let mut options = SocketOptions::default();
        options.connect_timeout(policy.connect_timeout);
        let mut socket = PullSocket::with_options(options);
        // Before connect(): the monitor must exist when the first connection is made.
        let monitor = Monitor::new(socket.monitor());
        let mut branch = Self {
            endpoint: endpoint.to_string(),
            policy,
            cancel,
            state: State::Stopped,
        };
        branch.state = branch.connecting(Up { socket, monitor }, false);
        branch
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    fn connecting(&self, mut up: Up, pause_first: bool) -> State {
        let endpoint = self.endpoint.clone();
        let cancel = self.cancel.clone();
        let mut backoff = Backoff::new(self.policy.min, self.policy.max);
        State::Connecting(Box::pin(async move {
            if pause_first && !backoff.pause(&cancel).await {
                return None;
            }
            let mut attempts = 0u64;
            loop {
                let attempt = tokio::select! {
                    () = cancel.cancelled() => return None,
                    r = up.socket.connect(&endpoint) => r,
                };
                match attempt {
                    Ok(()) => {
                        tracing::info!(endpoint, attempts, "pull connected");
                        return Some(up);
                    }
                    Err(e) => {
                        attempts += 1;
                        if attempts == 1 {
                            tracing::info!(endpoint, error = %e, "feeder unreachable, retrying");
                        }
                    }
                }
                if !backoff.pause(&cancel).await {
                    return None;
                }
            }
        }))
    }

    /// The next thing that happened on this socket. Cancel-safe (see the module comment).
    pub async fn next(&mut self) -> PullEvent {
        loop {
            match &mut self.state {
                State::Stopped => std::future::pending::<()>().await,
                State::Connecting(fut) => match fut.as_mut().await {
                    Some(up) => {
                        self.state = State::Up(Box::new(up));
                        return PullEvent::Connected;
                    }
                    None => self.state = State::Stopped,
                },
                State::Up(up) => {
                    tokio::select! {
                        // Messages first: a feeder that sent and closed has its last tasks
                        // read before its departure is acted on.
                        biased;
                        msg = up.socket.recv() => match msg {
                            Ok(msg) => {
                                return match Task::parse(&msg.into_vec()) {
                                    Ok(task) => PullEvent::Task(task),
                                    Err(e) => PullEvent::Bad(e),
                                };
                            }
                            // Per-peer errors (a reset) are not fatal: the monitor tells.
                            Err(e) => {
                                tracing::debug!(error = %e, "pull receive error");
                                continue;
                            }
                        },
                        _ = up.monitor.disconnected() => {}
                    }
                    tracing::warn!(endpoint = %self.endpoint, "feeder gone, reconnecting");
                    let State::Up(up) = std::mem::replace(&mut self.state, State::Stopped) else {
                        unreachable!("matched Up above")
                    };
                    self.state = self.connecting(*up, true);
                    return PullEvent::Lost;
                }
            }
        }
    }
}
