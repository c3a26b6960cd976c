//! An XSUB socket, on our own ZMTP connections ([`super::server`]) instead of zmq.rs's
//! `XSubSocket`, as the broker's ROUTERs are: the proxy's side facing publishers.
//!
//! Why: zmq.rs's XSUB aborts the process on a frame header announcing a terabyte (nine bytes
//! sent to it, loopback included, unless a guard relay stands in front), drops a stock PUB
//! that sends a ZMTP PING (it knows no commands), and keeps no bound on what a peer makes it
//! hold. Here every limit of the broker's sockets holds on every endpoint: frame and message
//! size and frame count checked on each header before its body is read, the handshake within
//! 5 s, a byte budget for what has been read and not yet handled, a bound on connections, and
//! a publisher that stops reading what we send it (subscriptions, heartbeats) cut off at its
//! byte bound. PING is answered with PONG.
//!
//! What stays as in a stock XSUB: any PUB or XPUB peer (libzmq, pyzmq, zmq.rs); every message a
//! publisher sends handed over as it came; each subscription change (`0x01` or `0x00`, then the
//! prefix) sent to every publisher, and the subscriptions in force sent to each publisher that
//! connects later.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::guard::{GuardStats, Limits};
use crate::wire::server::{self, Batch, Options, Outbox, Server};
use bytes::{Bytes, BytesMut};
use zeromq::ZmqMessage;

/// The socket types that may connect: publishers.
const PUBLISHERS: &[&[u8]] = &[b"PUB", b"XPUB"];

/// A bound XSUB.
#[derive(Debug)]
pub struct XSub {
    server: Server,
    /// Connected publishers by connection.
    publishers: HashMap<u64, Arc<Outbox>>,
    /// The prefixes subscribed upstream, sent to each publisher that joins.
    subscribed: HashSet<Bytes>,
    limits: Limits,
    joined: u64,
    /// The endpoint publishers connect to (port 0 resolved).
    pub endpoint: String,
}

impl XSub {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once.
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let options = Options {
            socket_type: "XSUB",
            peers: PUBLISHERS,
            limits,
            max_connections,
            stall: None,
        };
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
            publishers: HashMap::new(),
            subscribed: HashSet::new(),
            limits,
            joined: 0,
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        self.server.stats()
    }

    /// Publishers that have connected since the start.
    pub fn joined(&self) -> u64 {
        self.joined
    }

    /// Publishers connected now.
    pub fn publishers(&self) -> usize {
        self.publishers.len()
    }

    /// The next messages from publishers (what one read of one connection brought); waits for
    /// them. Cancel-safe.
    pub async fn recv(&mut self) -> Batch {
        loop {
            let event = self.server.recv().await;
            if let Some(batch) = self.take(event) {
                return batch;
            }
        }
    }

    /// The next messages already here, if any.
    pub fn try_recv(&mut self) -> Option<Batch> {
        loop {
            let event = self.server.try_recv()?;
            if let Some(batch) = self.take(event) {
                return Some(batch);
            }
        }
    }

    fn take(&mut self, event: server::Event) -> Option<Batch> {
        match event {
            server::Event::Messages { serial, batch } => {
                self.publishers.contains_key(&serial).then_some(batch)
            }
            server::Event::Joined { serial, outbox, .. } => {
                self.joined += 1;
                tracing::debug!(serial, "publisher connected");
                let mut all = BytesMut::new();
                for prefix in &self.subscribed {
                    let frame = [&[1u8][..], prefix].concat();
                    crate::wire::put_frame(&mut all, 0, &frame);
                }
                // A publisher that cannot take the subscriptions in force has stopped reading.
                if let Err(waiting) = outbox.push_encoded(&all, self.limits.max_peer_bytes) {
                    self.server.stalled(&format!("publisher {serial}"), waiting);
                    return None;
                }
                self.publishers.insert(serial, outbox);
                None
            }
            server::Event::Left { serial } => {
                if self.publishers.remove(&serial).is_some() {
                    tracing::debug!(serial, "publisher gone");
                }
                None
            }
        }
    }

    /// A subscription change, one frame (`0x01` + prefix, or `0x00` + prefix), for every
    /// publisher now and, while in force, for those that join later. Anything else is sent as
    /// it is and not kept.
    pub fn change(&mut self, frame: Bytes) {
        match frame.first() {
            Some(1) => {
                self.subscribed.insert(frame.slice(1..));
            }
            Some(0) => {
                self.subscribed.remove(&frame[1..]);
            }
            _ => {}
        }
        let mut encoded = BytesMut::with_capacity(frame.len() + 9);
        crate::wire::put_frame(&mut encoded, 0, &frame);
        self.broadcast_encoded(&encoded);
    }

    /// `msg` for every publisher (the proxy's heartbeat).
    pub fn broadcast(&mut self, msg: &ZmqMessage) {
        let mut encoded = BytesMut::new();
        crate::wire::put_message(&mut encoded, msg.iter());
        self.broadcast_encoded(&encoded);
    }

    /// Never waits: a publisher whose outbox is full (it stopped reading) is cut off.
    fn broadcast_encoded(&mut self, encoded: &[u8]) {
        let limit = self.limits.max_peer_bytes;
        let server = &self.server;
        self.publishers.retain(|serial, outbox| {
            if outbox.is_closed() {
                return false;
            }
            match outbox.push_encoded(encoded, limit) {
                Ok(()) => true,
                Err(waiting) => {
                    server.stalled(&format!("publisher {serial}"), waiting);
                    false
                }
            }
        });
    }

    /// Stops accepting connections and waits, `linger` at most, until what the outboxes hold
    /// is written to the kernel.
    pub async fn flush(&mut self, linger: std::time::Duration) {
        self.server.stop_accepting();
        server::flush(self.publishers.values(), linger).await;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use bytes::BufMut;

    use crate::zmtp;
    use zeromq::{PubSocket, Socket, SocketSend};

    use super::*;

    /// A subscription change frame: `0x01` (subscribe) or `0x00` (unsubscribe), then the prefix.
    pub fn change_frame(subscribe: bool, prefix: &[u8]) -> Bytes {
        let mut frame = BytesMut::with_capacity(1 + prefix.len());
        frame.put_u8(u8::from(subscribe));
        frame.put_slice(prefix);
        frame.freeze()
    }

    fn xsub() -> XSub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 16,
            max_peer_bytes: 1 << 20,
        };
        XSub::serve(listener, limits, 64).expect("serve")
    }

    async fn next(xsub: &mut XSub) -> Vec<ZmqMessage> {
        tokio::time::timeout(Duration::from_secs(5), xsub.recv())
            .await
            .expect("updates within 5 s")
            .into_iter()
            .collect()
    }

    /// A zmq.rs PUB that connects after a subscription was made is sent it, and its updates on
    /// that prefix come through, frames as sent.
    #[tokio::test(flavor = "current_thread")]
    async fn a_late_publisher_is_sent_the_subscriptions_in_force() {
        let mut xsub = xsub();
        xsub.change(change_frame(true, b"10001"));
        xsub.change(change_frame(true, b"10002"));
        xsub.change(change_frame(false, b"10002"));
        let mut publisher = PubSocket::new();
        publisher.connect(&xsub.endpoint).await.expect("connect");
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "nothing came");
            for topic in ["10002", "10001"] {
                let mut msg = ZmqMessage::from(topic);
                msg.push_back(Bytes::from_static(b"21"));
                publisher.send(msg).await.expect("send");
            }
            if let Ok(batch) = tokio::time::timeout(Duration::from_millis(100), xsub.recv()).await {
                got.extend(batch);
            }
        }
        // zmq.rs's PUB filters by what we sent it: only 10001 passes.
        for msg in &got {
            assert_eq!(msg.get(0).map(|f| f.as_ref()), Some(&b"10001"[..]));
            assert_eq!(msg.get(1).map(|f| f.as_ref()), Some(&b"21"[..]));
        }
        assert_eq!(xsub.joined(), 1);
    }

    /// A raw publisher: PING gets PONG; a frame header over the limit ends its connection
    /// (counted refused) and the XSUB goes on serving others.
    #[tokio::test(flavor = "current_thread")]
    async fn pings_are_answered_and_nine_bytes_do_not_kill_it() {
        let mut xsub = xsub();
        let endpoint = xsub.endpoint.trim_start_matches("tcp://").to_string();
        let handshake = [zmtp::greeting(), zmtp::ready("PUB")].concat();
        let ping = zmtp::frame(0x04, b"\x04PING\x00\x0aabc");
        let polite = tokio::task::spawn_blocking({
            let (endpoint, handshake) = (endpoint.clone(), handshake.clone());
            move || {
                let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
                peer.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                peer.write_all(&[handshake, ping, zmtp::frame(0, b"10001 hi")].concat())
                    .expect("write");
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while !got.windows(4).any(|w| w == b"PONG") {
                    let n = peer.read(&mut buf).expect("read");
                    assert!(n > 0, "closed");
                    got.extend_from_slice(&buf[..n]);
                }
                got
            }
        });
        let got = next(&mut xsub).await;
        assert_eq!(got[0].get(0).map(|f| f.as_ref()), Some(&b"10001 hi"[..]));
        let pong = polite.await.expect("a PONG");
        assert!(pong.ends_with(b"PONGabc"), "{pong:?}");
        let attack = [handshake.clone(), zmtp::huge_header()].concat();
        tokio::task::spawn_blocking(move || zmtp::send_raw(&endpoint, &attack))
            .await
            .expect("sent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while xsub.stats().refused() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not refused");
            assert!(xsub.try_recv().is_none(), "nothing from the attacker");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
