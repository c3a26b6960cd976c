//! A PUSH socket whose caller deals, on our own ZMTP connections ([`super::server`]) instead of
//! zmq.rs's `PushSocket`: the pipeline master's task socket.
//!
//! Why the caller deals: a stock PUSH deals round robin to every connection, whoever is behind
//! it. A connected peer that never reads (a hung worker, a stray tool) takes its share into a
//! connection nobody reads, and zmq.rs can neither leave one connection out nor tell which is
//! whose. Here each connection is named to the caller when it joins (with the `Identity` its
//! peer set in READY, if any) and when it leaves, and [`Push::send`] puts a message on the one
//! connection the caller chose: the master deals by credit, to connections whose workers
//! announced room (crates/pipeline, `master::ventilator`).
//!
//! What stays as in a stock PUSH: on the wire it is a PUSH, for any PULL peer (libzmq, pyzmq,
//! zmq.rs); PING is answered with PONG. A PULL sends no messages: one that does is cut off
//! (counted `refused`, logged with its address). Every limit of [`super::server`] holds on every endpoint, loopback
//! included (a frame header claiming a terabyte ends that connection, never the process).
//!
//! A PULL never sends, so it cannot learn of a cut made while it was unreachable: with
//! `stall` set (see [`Options::stall`]) a connection whose writes do not go through is cut only
//! when its peer stopped reading, and a message that does not fit within the peer's byte bound
//! is refused ([`Unsent::Full`]) instead of cutting the connection.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt};
use zeromq::ZmqMessage;

use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{self, Options, Outbox, Server};

/// The socket types a PUSH talks to.
const PULLS: &[&[u8]] = &[b"PULL"];

/// What the caller learns of its connections.
#[derive(Debug)]
pub enum Event {
    /// A PULL past its handshake, with the `Identity` it set in its READY, if any.
    Joined {
        serial: u64,
        addr: SocketAddr,
        identity: Option<Bytes>,
    },
    /// The connection ended (closed, cut off, refused).
    Left { serial: u64 },
}

/// Why a message was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// No such connection, or it ended.
    Gone,
    /// The peer's outbox holds its byte bound already (it is not reading, or unreachable): the
    /// message was dropped, the connection kept.
    Full,
    /// The peer's outbox held its byte bound already and it was cut off (no `stall`).
    Cut,
}

/// A bound PUSH.
#[derive(Debug)]
pub struct Push {
    server: Server,
    links: HashMap<u64, (Arc<Outbox>, SocketAddr)>,
    ready: VecDeque<Event>,
    limits: Limits,
    /// Unreachable peers keep their connections: sends that do not fit are refused.
    patient: bool,
    /// Reused to encode each message.
    scratch: BytesMut,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
}

impl Push {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once; `stall` as in [`Options::stall`].
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
        stall: Option<Duration>,
    ) -> std::io::Result<Self> {
        let options = Options::new("PUSH", PULLS, limits, max_connections).with_stall(stall);
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
            links: HashMap::new(),
            ready: VecDeque::new(),
            limits,
            patient: stall.is_some(),
            scratch: BytesMut::new(),
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        self.server.stats()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.links.len()
    }

    /// The next event; waits for one. Cancel-safe.
    pub async fn recv(&mut self) -> Event {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            let event = self.server.recv().await;
            self.take(event);
        }
    }

    /// The next event already here, if any.
    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let event = self.server.try_recv()?;
            self.take(event);
        }
    }

    fn take(&mut self, event: server::Event) {
        match event {
            server::Event::Joined {
                serial,
                addr,
                identity,
                outbox,
            } => {
                self.links.insert(serial, (outbox, addr));
                self.ready.push_back(Event::Joined {
                    serial,
                    addr,
                    identity,
                });
            }
            server::Event::Messages { serial, .. } => {
                // A PULL has nothing to say: whoever speaks here is not one.
                if let Some((outbox, addr)) = self.links.get(&serial) {
                    outbox.close();
                    self.server.refused(addr, &"a message from a PULL");
                }
            }
            server::Event::Left { serial } => {
                if self.links.remove(&serial).is_some() {
                    self.ready.push_back(Event::Left { serial });
                }
            }
        }
    }

    /// Queues `msg` for connection `serial`; never waits.
    pub fn send(&mut self, serial: u64, msg: &ZmqMessage) -> Result<(), Unsent> {
        let Some((outbox, _)) = self.links.get(&serial) else {
            return Err(Unsent::Gone);
        };
        if outbox.is_closed() {
            return Err(Unsent::Gone);
        }
        let limit = self.limits.max_peer_bytes;
        if self.patient {
            self.scratch.clear();
            super::put_message(&mut self.scratch, msg.iter());
            if outbox.offer(&self.scratch, limit) {
                return Ok(());
            }
            if self.scratch.capacity() > 1 << 20 {
                self.scratch = BytesMut::new();
            }
            return Err(if outbox.is_closed() {
                Unsent::Gone
            } else {
                Unsent::Full
            });
        }
        match outbox.push_message(msg.iter(), limit) {
            Ok(()) => Ok(()),
            Err(waiting) => {
                self.server
                    .stalled(&format!("connection {serial}"), waiting);
                Err(Unsent::Cut)
            }
        }
    }

    /// Whether connection `serial` is open.
    pub fn is_open(&self, serial: u64) -> bool {
        self.links.get(&serial).is_some_and(|(o, _)| !o.is_closed())
    }

    /// Ends connection `serial` (its `Left` follows).
    pub fn close(&mut self, serial: u64) {
        if let Some((outbox, _)) = self.links.get(&serial) {
            outbox.close();
        }
    }

    /// Stops accepting connections and waits, `linger` at most, until what the outboxes hold
    /// is written to the kernel.
    pub async fn flush(&mut self, linger: Duration) {
        self.server.stop_accepting();
        server::flush(self.links.values().map(|(o, _)| o), linger).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zeromq::util::PeerIdentity;
    use zeromq::{PullSocket, Socket, SocketOptions, SocketRecv};

    use super::*;
    use crate::zmtp;

    fn push() -> Push {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 16,
            max_peer_bytes: 1 << 20,
        };
        Push::serve(listener, limits, 64, Some(Duration::from_secs(2))).expect("serve")
    }

    async fn next(push: &mut Push) -> Event {
        tokio::time::timeout(Duration::from_secs(5), push.recv())
            .await
            .expect("an event within 5 s")
    }

    /// Two zmq.rs PULLs, one named: each message goes to the connection chosen, frames as sent,
    /// and the name comes with the connection.
    #[tokio::test(flavor = "current_thread")]
    async fn each_message_goes_to_the_connection_chosen() {
        let mut push = push();
        let mut options = SocketOptions::default();
        options.peer_identity(PeerIdentity::try_from(b"w1".to_vec()).expect("id"));
        let mut named = PullSocket::with_options(options);
        named.connect(&push.endpoint).await.expect("connect");
        let mut plain = PullSocket::new();
        plain.connect(&push.endpoint).await.expect("connect");
        let mut serials = HashMap::new();
        for _ in 0..2 {
            let Event::Joined {
                serial, identity, ..
            } = next(&mut push).await
            else {
                panic!("not a join");
            };
            serials.insert(identity, serial);
        }
        let to_named = serials[&Some(Bytes::from_static(b"w1"))];
        let to_plain = serials[&None];
        let msg = |s: &'static str| {
            ZmqMessage::try_from(vec![
                Bytes::from_static(s.as_bytes()),
                Bytes::from_static(b"x"),
            ])
            .expect("frames")
        };
        push.send(to_named, &msg("for w1")).expect("sent");
        push.send(to_plain, &msg("for the other")).expect("sent");
        let got = tokio::time::timeout(Duration::from_secs(5), named.recv())
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"for w1"[..]));
        assert_eq!(got.get(1).map(|f| f.as_ref()), Some(&b"x"[..]));
        let got = tokio::time::timeout(Duration::from_secs(5), plain.recv())
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"for the other"[..]));
        // Dropping a zmq.rs PULL leaves its connections open: closed explicitly.
        plain.backend().shutdown();
        assert!(matches!(next(&mut push).await, Event::Left { serial } if serial == to_plain));
        assert_eq!(push.send(to_plain, &msg("late")), Err(Unsent::Gone));
    }

    /// Nine bytes claiming a 1 TiB frame, on loopback: that connection is refused, the socket
    /// serves on; a PULL that speaks is refused too.
    #[tokio::test(flavor = "current_thread")]
    async fn nine_bytes_end_a_connection_not_the_socket() {
        let mut push = push();
        let endpoint = push.endpoint.clone();
        let attack = [zmtp::greeting(), zmtp::ready("PULL"), zmtp::huge_header()].concat();
        tokio::task::spawn_blocking(move || zmtp::send_raw(&endpoint, &attack))
            .await
            .expect("sent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while push.stats().refused() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not refused");
            while push.try_recv().is_some() {}
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A "PULL" that speaks is no PULL: refused too.
        let endpoint = push.endpoint.clone();
        let chatty = [zmtp::greeting(), zmtp::ready("PULL"), zmtp::frame(0, b"hi")].concat();
        // Not awaited: it reads until the connection closes, which takes this loop's turns.
        let chatty = tokio::task::spawn_blocking(move || zmtp::send_raw(&endpoint, &chatty));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while push.stats().refused() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the chatty PULL not refused"
            );
            while push.try_recv().is_some() {}
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(chatty.await.expect("sent"), "cannot reach the PUSH");
        let mut pull = PullSocket::new();
        pull.connect(&push.endpoint).await.expect("connect");
        // The attackers' connections joined first (their READYs were good): the PULL's is third.
        let serial = loop {
            match next(&mut push).await {
                Event::Joined { serial, .. } if serial > 2 => break serial,
                _ => {}
            }
        };
        push.send(serial, &ZmqMessage::from("still here"))
            .expect("sent");
        let got = tokio::time::timeout(Duration::from_secs(5), pull.recv())
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"still here"[..]));
    }
}
