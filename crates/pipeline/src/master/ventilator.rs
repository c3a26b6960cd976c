//! The ventilator (zguide `taskvent`): the master's bound PUSH, which deals tasks round robin
//! to the workers' PULLs, and the task messages it carries.
//!
//! PUSH cannot leave one peer out: it deals to every connection in turn, and a connected but hung
//! worker (SIGSTOP, a stuck host) takes its share into a connection nobody reads. zmq.rs can
//! neither close one peer nor tell which connection is whose, and its per-peer queues (100,000
//! messages) never fill under the credit flow, so a non-waiting send never sees such a peer as
//! stalled either. So when the books lose a worker, or a task goes unacknowledged for the liveness
//! window (it went into a connection nobody reads), the ventilator [rebinds](Ventilator::cut):
//! a new PUSH on the same listening socket, the old one closed with every connection it had.
//! Live workers notice the closed link and reconnect within their backoff; the hung one cannot,
//! and gets nothing more until it runs again and reconnects. With a guard in front, the listening
//! socket is the guard's loopback one: the guard's relays close with the connections they carry.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::guard::{GuardStats, Limits};
use common::send::{try_send, Sent};
use zeromq::{PushSocket, Socket, ZmqMessage};

use super::{Bound, MasterError};
use crate::protocol::{Task, WirePath};

/// How long a closed PUSH keeps its connections before it is dropped: a worker whose handshake
/// the old socket accepted just before it stopped listening gets closed with the others, instead
/// of staying attached to a socket that sends nothing.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(100);

/// What the ventilator needs to build a task.
#[derive(Debug, Clone)]
pub(super) struct TaskSource {
    pub input: PathBuf,
    pub output: PathBuf,
    pub batch: String,
    pub filter: String,
    /// The master's task timeout, told to the worker so that it abandons the task with it.
    pub timeout_ms: u64,
}

impl TaskSource {
    /// The message of task `id` (`rel` under the input), with the image bytes when inline
    /// (read beforehand, off the loop). Names go as they are on disk ([`WirePath`]).
    pub(super) fn message(&self, id: usize, rel: &Path, image: Option<Bytes>) -> ZmqMessage {
        let on_disk = image.is_none();
        let task = Task {
            batch: self.batch.clone(),
            id: id as u64,
            path: WirePath::from(rel),
            filter: self.filter.clone(),
            input: on_disk.then(|| WirePath(self.input.join(rel))),
            output: on_disk.then(|| WirePath(self.output.join(rel))),
            timeout_ms: Some(self.timeout_ms),
        };
        task.to_message(image)
    }
}

/// The bound task PUSH.
#[derive(Debug)]
pub(super) struct Ventilator {
    bound: Bound<PushSocket>,
    /// The listening socket, kept so that a rebind never gives up the port.
    listener: TcpListener,
}

impl Ventilator {
    /// Binds the task PUSH on `endpoint` with keepalive and `TCP_USER_TIMEOUT` (`keepalive`),
    /// behind a guard when `guard` is given.
    pub(super) async fn bind(
        endpoint: &str,
        keepalive: Duration,
        guard: Option<Limits>,
    ) -> Result<Self, MasterError> {
        let public = common::endpoint::bind_keepalive(endpoint, keepalive)?;
        let (listener, front) = match guard {
            Some(limits) => {
                let front = common::guard::front(public, endpoint, limits)?;
                (front.inner, Some((front.endpoint, front.stats)))
            }
            None => (public, None),
        };
        let mut bound = Bound::on(clone_of(&listener, endpoint)?, endpoint).await?;
        if let Some((public, stats)) = front {
            bound.endpoint = public;
            bound.guard = Some(stats);
        }
        Ok(Self { bound, listener })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.bound.endpoint
    }

    pub(super) fn guard(&self) -> Option<&Arc<GuardStats>> {
        self.bound.guard.as_ref()
    }

    /// Hands a task to the next worker in the rotation without ever waiting on it.
    pub(super) fn send(&mut self, msg: ZmqMessage) -> Sent {
        try_send(&mut self.bound.socket, msg)
    }

    /// Cuts every task connection by moving to a new PUSH on the same listening socket: the way
    /// to stop dealing to a worker that is connected but does not read. Tasks queued on the old
    /// socket are lost with it; the caller puts them back.
    pub(super) async fn cut(&mut self) -> Result<(), MasterError> {
        let endpoint = self.bound.endpoint.clone();
        let clone = clone_of(&self.listener, &endpoint)?;
        // Stop the old accept loop first, so that the listening socket has one owner.
        let _ = self.bound.socket.unbind_all().await;
        let fresh = match Bound::on(clone, &endpoint).await {
            Ok(fresh) => fresh,
            Err(e) => {
                // Keep the old socket listening again rather than lose the task endpoint.
                if let Ok(again) = self.listener.try_clone() {
                    let _ = self.bound.socket.bind_listener(again).await;
                }
                return Err(e);
            }
        };
        let mut fresh = fresh;
        fresh.endpoint = endpoint;
        fresh.guard = self.bound.guard.clone();
        let old = std::mem::replace(&mut self.bound, fresh);
        tokio::spawn(async move {
            tokio::time::sleep(HANDSHAKE_GRACE).await;
            drop(old);
        });
        Ok(())
    }
}

/// A second handle on the listening socket, for zmq.rs to own.
fn clone_of(listener: &TcpListener, endpoint: &str) -> Result<TcpListener, MasterError> {
    listener.try_clone().map_err(|source| MasterError::Listen {
        endpoint: endpoint.to_string(),
        source,
    })
}
