//! Reconnection for sockets that `connect()`.
//!
//! `zeromq` 0.7 connects DEALER, PUSH, PULL and PUB sockets once and never again, and its
//! `connect()` gives up on errors other than "connection refused". The recipe that works
//! (measured, see `docs/architecture.md`): a short connect timeout, a monitor created before
//! `connect()`, and on any failure a fresh socket after a capped exponential backoff.

use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketEvent, SocketOptions};

/// How long a stopping role waits for its last messages to leave. zmq.rs has no `ZMQ_LINGER`:
/// a message sent just before the process exits may still sit in the socket's queue.
pub const LINGER: Duration = Duration::from_millis(200);

/// How a connecting role retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// First pause after a failed attempt or a lost link.
    pub min: Duration,
    /// The pause doubles up to this.
    pub max: Duration,
    /// One attempt (TCP + ZMTP handshake) gives up after this.
    pub connect_timeout: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(1000),
        }
    }
}

/// Capped exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The pause to take now; the one after it is twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Waits out the next delay; `false` if `cancel` fired first (the caller stops).
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// A connected socket and the monitor that reports its loss.
#[derive(Debug)]
pub struct Connected<S> {
    pub socket: S,
    pub monitor: Monitor,
}

/// Socket events, narrowed to what a connecting role acts on.
#[derive(Debug)]
pub struct Monitor(mpsc::Receiver<SocketEvent>);

impl Monitor {
    pub fn new(receiver: mpsc::Receiver<SocketEvent>) -> Self {
        Self(receiver)
    }

    /// Resolves with the identity of the next peer that is gone. Cancel-safe. If the socket
    /// stops reporting (dropped monitor) this never resolves, and heartbeats are left to notice.
    pub async fn disconnected(&mut self) -> Bytes {
        loop {
            match self.0.next().await {
                Some(SocketEvent::Disconnected(peer)) => return peer.into(),
                Some(_) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Builds sockets with `make` and connects them to `endpoint` until one connects or `cancel`
/// fires (then `None`). `backoff` is reset on success so the next outage starts short.
pub async fn connect<S, F>(
    endpoint: &str,
    policy: &Reconnect,
    backoff: &mut Backoff,
    cancel: &CancellationToken,
    make: F,
) -> Option<Connected<S>>
where
    S: Socket,
    F: Fn(SocketOptions) -> S,
{
    let mut attempts = 0u64;
    loop {
        let mut options = SocketOptions::default();
        options.connect_timeout(policy.connect_timeout);
        let mut socket = make(options);
        let monitor = Monitor::new(socket.monitor());
        let attempt = tokio::select! {
            () = cancel.cancelled() => return None,
            r = socket.connect(endpoint) => r,
        };
        match attempt {
            Ok(()) => {
                if attempts > 0 {
                    tracing::info!(endpoint, attempts, "connected");
                } else {
                    tracing::debug!(endpoint, "connected");
                }
                backoff.reset();
                return Some(Connected { socket, monitor });
            }
            Err(e) => {
                attempts += 1;
                if attempts == 1 {
                    tracing::info!(endpoint, error = %e, "peer unreachable, retrying");
                } else {
                    tracing::debug!(endpoint, attempts, error = %e, "connect failed");
                }
            }
        }
        drop(socket);
        if !backoff.pause(cancel).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[tokio::test]
    async fn connect_gives_up_when_cancelled() {
        // Nothing listens on this port of the discard range: every attempt is refused.
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
        });
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let got = connect(
            "tcp://127.0.0.1:9",
            &Reconnect::default(),
            &mut backoff,
            &cancel,
            zeromq::DealerSocket::with_options,
        )
        .await;
        assert!(got.is_none());
    }

    #[tokio::test]
    async fn connect_reaches_a_late_server() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let server_endpoint = endpoint.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut router = zeromq::RouterSocket::new();
            router.bind(&server_endpoint).await.expect("bind");
            router
        });
        let cancel = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(100));
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            connect(
                &endpoint,
                &Reconnect::default(),
                &mut backoff,
                &cancel,
                zeromq::DealerSocket::with_options,
            ),
        )
        .await
        .expect("connects within the deadline");
        assert!(got.is_some());
        drop(server.await);
    }
}
