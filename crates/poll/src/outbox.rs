//! The PUSH branch: results out to a sink, `ZMQ_POLLOUT` on a PUSH.
//!
//! In C one polls a PUSH for `ZMQ_POLLOUT` and sends only when it is set, so a slow or absent
//! peer never blocks the loop. Here the pending send *is* the `POLLOUT` branch: the loop
//! `select!`s on [`Outbox::flush`] while a result waits, and serves its other branches
//! meanwhile.
//!
//! zmq.rs's `send` is **not** cancel-safe: a cancelled `send()` that was waiting for room in a
//! peer's queue drops its message (`backend.rs`, `send_round_robin` awaits
//! `send_to_peer_queue` with the message moved in; measured, see the notes). With no peer at
//! all PUSH `send` does not wait, it fails at once with `ReturnToSender` (libzmq would block).
//! So:
//!
//! - the send future is built once per message, owns the socket and a copy of the message,
//!   and is kept in `self.state` across calls and loop iterations; `flush` only resumes it, so
//!   losing the race to another branch cancels nothing;
//! - the message leaves the queue only when its send completed with `Ok`; on an error (no
//!   peer, peer gone) the socket is dropped (PUSH sockets drop cleanly), a new one connects
//!   with capped exponential backoff, and the same message is sent again;
//! - the queue is bounded: the loop stops reading tasks while it is full (it polls the PULL
//!   for `POLLIN` only while the PUSH has room), so back-pressure reaches the feeder and memory
//!   stays bounded.
//!
//! What zmq.rs cannot tell us: a message accepted by the socket just before its peer died
//! (`Ok`) is lost with the connection. The sink sees that as a gap in the task numbers.

use std::collections::VecDeque;

use common::link::{self, Backoff, Connected, Reconnect};
use futures::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage, ZmqResult};

type Sending = BoxFuture<'static, (Connected<PushSocket>, ZmqResult<()>)>;

enum State {
    Connecting(BoxFuture<'static, Option<Connected<PushSocket>>>),
    Idle(Box<Connected<PushSocket>>),
    /// A send in progress.
    Sending(Sending),
    Stopped,
}

/// What one call of [`Outbox::flush`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// The head of the queue was taken by the socket, after waiting this long.
    Sent {
        waited_ms: u64,
    },
    Connected,
    /// The socket refused or lost the message (kept, to be sent again).
    Lost,
}

/// A bounded queue of results in front of a PUSH socket that reconnects by itself.
pub struct Outbox {
    endpoint: String,
    policy: Reconnect,
    cancel: CancellationToken,
    capacity: usize,
    queue: VecDeque<ZmqMessage>,
    /// Since when the head of the queue has been waiting for the socket to take it.
    head_since: Option<Instant>,
    state: State,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("endpoint", &self.endpoint)
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(
        endpoint: &str,
        capacity: usize,
        policy: Reconnect,
        cancel: CancellationToken,
    ) -> Self {
        let mut outbox = Self {
            endpoint: endpoint.to_string(),
            policy,
            cancel,
            capacity: capacity.max(1),
            queue: VecDeque::new(),
            head_since: None,
            state: State::Stopped,
        };
        outbox.state = outbox.connecting(false);
        outbox
    }

    fn connecting(&self, pause_first: bool) -> State {
        let endpoint = self.endpoint.clone();
        let policy = self.policy;
        let cancel = self.cancel.clone();
        let mut backoff = Backoff::new(policy.min, policy.max);
        State::Connecting(Box::pin(async move {
            if pause_first && !backoff.pause(&cancel).await {
                return None;
            }
            link::connect(
                &endpoint,
                &policy,
                &mut backoff,
                &cancel,
                PushSocket::with_options,
            )
            .await
        }))
    }

    /// Room for another result: the loop reads tasks only while this holds.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.capacity
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Idle(_) | State::Sending(_))
    }

    /// Queues a result; `false` (not queued) when full, which the loop prevents.
    pub fn push(&mut self, msg: ZmqMessage) -> bool {
        if !self.has_room() {
            return false;
        }
        self.queue.push_back(msg);
        true
    }

    /// Moves the head of the queue on by one step. Call only while [`Self::queued`] > 0 (else
    /// it waits for ever). Cancel-safe: see the module comment.
    pub async fn flush(&mut self) -> Flushed {
        if !self.queue.is_empty() && self.head_since.is_none() {
            self.head_since = Some(Instant::now());
        }
        loop {
            match &mut self.state {
                State::Stopped => std::future::pending::<()>().await,
                State::Connecting(fut) => match fut.as_mut().await {
                    Some(c) => {
                        self.state = State::Idle(Box::new(c));
                        return Flushed::Connected;
                    }
                    None => self.state = State::Stopped,
                },
                State::Idle(_) => {
                    let Some(msg) = self.queue.front().cloned() else {
                        return std::future::pending().await;
                    };
                    let State::Idle(mut c) = std::mem::replace(&mut self.state, State::Stopped)
                    else {
                        unreachable!("matched Idle above")
                    };
                    let send: Sending = Box::pin(async move {
                        let r = c.socket.send(msg).await;
                        (*c, r)
                    });
                    self.state = State::Sending(send);
                }
                State::Sending(fut) => {
                    let (c, result) = fut.as_mut().await;
                    match result {
                        Ok(()) => {
                            self.queue.pop_front();
                            self.state = State::Idle(Box::new(c));
                            let waited = self.head_since.take().map(|t| t.elapsed());
                            return Flushed::Sent {
                                waited_ms: waited.unwrap_or_default().as_millis() as u64,
                            };
                        }
                        Err(e) => {
                            tracing::warn!(endpoint = %self.endpoint, error = %e, "push refused, reconnecting");
                            drop(c);
                            self.state = self.connecting(true);
                            return Flushed::Lost;
                        }
                    }
                }
            }
        }
    }
}
