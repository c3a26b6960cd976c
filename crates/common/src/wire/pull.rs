//! A PULL socket, on our own ZMTP connections ([`super::server`]) instead of zmq.rs's
//! `PullSocket`: the pipeline master's report socket.
//!
//! Unlike a stock PULL it says which connection each batch of messages came by, and when each
//! connection joins and leaves: the master learns that a worker's process is gone the moment
//! its report connection closes, not a liveness window later.
//!
//! What stays as in a stock PULL: any PUSH peer (libzmq, pyzmq, zmq.rs), messages as sent,
//! PING answered with PONG; every limit of [`super::server`] on every endpoint, loopback
//! included, and the byte budget on what has been read and not yet handled.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{self, Batch, Options, Server};

/// The socket types a PULL talks to.
const PUSHES: &[&[u8]] = &[b"PUSH"];

/// What the caller learns of its connections, in order per connection.
#[derive(Debug)]
pub enum Event {
    /// A PUSH past its handshake, with the `Identity` it set in its READY, if any.
    Joined {
        serial: u64,
        addr: SocketAddr,
        identity: Option<Bytes>,
    },
    /// The messages one read of that connection brought.
    Messages { serial: u64, batch: Batch },
    /// The connection ended (closed, cut off, refused).
    Left { serial: u64 },
}

/// A bound PULL.
#[derive(Debug)]
pub struct Pull {
    server: Server,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
}

impl Pull {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once.
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let options = Options::new("PULL", PUSHES, limits, max_connections);
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        self.server.stats()
    }

    fn event(event: server::Event) -> Event {
        match event {
            server::Event::Joined {
                serial,
                addr,
                identity,
                ..
            } => Event::Joined {
                serial,
                addr,
                identity,
            },
            server::Event::Messages { serial, batch } => Event::Messages { serial, batch },
            server::Event::Left { serial } => Event::Left { serial },
        }
    }

    /// The next event; waits for one. Cancel-safe.
    pub async fn recv(&mut self) -> Event {
        Self::event(self.server.recv().await)
    }

    /// The next event already here, if any.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.server.try_recv().map(Self::event)
    }

    /// Accepts no more connections.
    pub fn stop_accepting(&self) {
        self.server.stop_accepting();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

    use super::*;
    use crate::zmtp;

    async fn next(pull: &mut Pull) -> Event {
        tokio::time::timeout(Duration::from_secs(5), pull.recv())
            .await
            .expect("an event within 5 s")
    }

    /// Messages of a zmq.rs PUSH come with their connection, whose end is told; nine bytes on
    /// loopback end only the attacker's connection.
    #[tokio::test(flavor = "current_thread")]
    async fn messages_come_with_their_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut pull = Pull::serve(listener, Limits::default(), 64).expect("serve");
        let endpoint = pull.endpoint.clone();
        let attack = [zmtp::greeting(), zmtp::huge_header()].concat();
        tokio::task::spawn_blocking(move || zmtp::send_raw(&endpoint, &attack))
            .await
            .expect("sent");
        let mut push = PushSocket::new();
        push.connect(&pull.endpoint).await.expect("connect");
        push.send(ZmqMessage::from("one")).await.expect("send");
        let Event::Joined { serial, .. } = next(&mut pull).await else {
            panic!("a join first");
        };
        let Event::Messages {
            serial: from,
            batch,
        } = next(&mut pull).await
        else {
            panic!("then the message");
        };
        assert_eq!(from, serial);
        let got: Vec<ZmqMessage> = batch.into_iter().collect();
        assert_eq!(got[0].get(0).map(|f| f.as_ref()), Some(&b"one"[..]));
        drop(push);
        assert!(matches!(next(&mut pull).await, Event::Left { serial: s } if s == serial));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pull.stats().refused() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the nine bytes not refused"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
