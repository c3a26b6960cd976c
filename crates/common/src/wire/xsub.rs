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
//!
//! One thing more: **a publisher's newer connection supersedes its older one**, much as a
//! libzmq ROUTER does with `ZMQ_ROUTER_HANDOVER`. A publisher that sets an `Identity` in its
//! READY (ours set their id and instance) may connect again while its older connection is still
//! open with a tail not yet read (the proxy was hung, or the old link half-open). The first
//! messages of the newer connection cut the older one, and whatever still comes from the older
//! after them is discarded (counted, [`XSub::superseded`]); until then the older one's tail
//! flows. Connections are handled in the order of their events, so everything taken from the
//! older came before anything from the newer: a publisher's updates never go back in time
//! through the XSUB, and what it wrote into the older connection and was not read in time is a
//! gap the subscribers prove from the sequence numbers. Without an identity (a stock PUB by
//! default) nothing changes.
//!
//! Whose connection is whose is keyed by identity and IP address: a stranger on another host
//! cannot cut a publisher by claiming its identity. One on the same host (or behind the same
//! NAT) can, by sending under it; the publisher then reconnects and cuts it in turn. That is
//! accepted: any peer that may connect to the XSUB can as well publish under a publisher's
//! name, instance and numbers, and mislead every subscriber, so the XSUB's endpoint is for
//! trusted publishers only (docs/across-hosts.md) whatever we do here; the handovers are
//! counted and logged (throttled) with the address, so such a fight shows.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::logging::Throttle;
use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{self, Batch, Options, Outbox, Server};
use bytes::{Bytes, BytesMut};
use zeromq::ZmqMessage;

/// Batches of publishers' messages waiting for the proxy, at most. A few publishers flood it
/// with small messages, each an allocation of its own: eight of the reader's 32 KiB reads keep
/// it busy, where the server's default of 64 held about 6 MB of 64-byte updates (with libzmq's
/// zpub, 2 publishers and 4 subscribers: peak RSS 18.2 MB at 64, 12.6 MB at 8, and delivery
/// no slower).
const PUBLISHER_BATCHES: usize = 8;

/// The socket types that may connect: publishers.
const PUBLISHERS: &[&[u8]] = &[b"PUB", b"XPUB"];

/// A handover can be caused at will (by a peer on the publisher's host): at most one line a
/// second.
static HANDOVER_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// Who a publisher connection says it is: its address and the `Identity` of its READY.
type Owner = (IpAddr, Bytes);

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
    /// Who each open connection that set an identity says it is.
    owned: HashMap<u64, Owner>,
    /// Per publisher that set an identity, the connection whose messages are handed over: the
    /// one accepted last of those that have sent anything.
    speaking: HashMap<Owner, u64>,
    /// Connections cut because a newer one of the same publisher sent, until they are gone:
    /// what still comes from them is discarded.
    superseded_by: HashSet<u64>,
    handovers: u64,
    superseded: u64,
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
        let options = Options::new("XSUB", PUBLISHERS, limits, max_connections)
            .with_inbound_batches(PUBLISHER_BATCHES);
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
            publishers: HashMap::new(),
            subscribed: HashSet::new(),
            limits,
            joined: 0,
            owned: HashMap::new(),
            speaking: HashMap::new(),
            superseded_by: HashSet::new(),
            handovers: 0,
            superseded: 0,
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

    /// Publisher connections cut because a newer one of the same publisher (same identity,
    /// same address) sent.
    pub fn handovers(&self) -> u64 {
        self.handovers
    }

    /// Messages that came from those connections after they were cut, discarded.
    pub fn superseded(&self) -> u64 {
        self.superseded
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
                if self.publishers.contains_key(&serial) && self.speaks(serial) {
                    return Some(batch);
                }
                if self.superseded_by.contains(&serial) {
                    self.superseded += batch.into_iter().len() as u64;
                }
                None
            }
            server::Event::Joined {
                serial,
                addr,
                identity,
                outbox,
            } => {
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
                if let Some(identity) = identity {
                    self.owned.insert(serial, (addr.ip(), identity));
                }
                self.publishers.insert(serial, outbox);
                None
            }
            server::Event::Left { serial } => {
                if self.publishers.remove(&serial).is_some() {
                    tracing::debug!(serial, "publisher gone");
                }
                self.superseded_by.remove(&serial);
                if let Some(owner) = self.owned.remove(&serial) {
                    if self.speaking.get(&owner) == Some(&serial) {
                        self.speaking.remove(&owner);
                    }
                }
                None
            }
        }
    }

    /// Whether what connection `serial` sent may be handed over: yes if it set no identity, or
    /// if no connection of its publisher accepted later has sent anything. The first messages
    /// of a publisher's newer connection cut its older one (everything taken from the older
    /// came before them; until then the older one's tail still flows), and what the older one
    /// sends after that is discarded.
    fn speaks(&mut self, serial: u64) -> bool {
        let Some(owner) = self.owned.get(&serial) else {
            return true;
        };
        match self.speaking.get(owner).copied() {
            Some(current) if current == serial => true,
            Some(newer) if newer > serial => {
                self.supersede(serial, newer);
                false
            }
            older => {
                let owner = owner.clone();
                if let Some(older) = older {
                    self.supersede(older, serial);
                }
                self.speaking.insert(owner, serial);
                true
            }
        }
    }

    /// Cuts connection `older`: a newer one of the same publisher has sent.
    fn supersede(&mut self, older: u64, newer: u64) {
        self.handovers += 1;
        self.superseded_by.insert(older);
        if let Some(outbox) = self.publishers.remove(&older) {
            outbox.close();
        }
        let owner = self.owned.remove(&older);
        if let Some(held_back) = HANDOVER_LOG.check() {
            let (peer, identity) = owner.map_or_else(Default::default, |(ip, id)| {
                (ip.to_string(), crate::frames::show(&id))
            });
            tracing::info!(
                %identity,
                %peer,
                older,
                newer,
                handovers = self.handovers,
                held_back,
                "a publisher connected again: its older connection cut, the rest of it discarded"
            );
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

    /// A raw publisher from `from` (a loopback address), past its handshake (the XSUB's READY
    /// read), with `identity` in its READY.
    fn raw_publisher(endpoint: &str, from: &str, identity: &[u8]) -> std::net::TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let local: std::net::SocketAddr = format!("{from}:0").parse().expect("address");
        socket.bind(&local.into()).expect("bind");
        let remote: std::net::SocketAddr = endpoint.parse().expect("endpoint");
        socket.connect(&remote.into()).expect("connect");
        let mut peer = std::net::TcpStream::from(socket);
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        peer.write_all(&[zmtp::greeting(), zmtp::ready_as("PUB", Some(identity))].concat())
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.windows(4).any(|w| w == b"XSUB") {
            let n = peer.read(&mut buf).expect("read");
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
        }
        peer
    }

    /// Lets the connections' tasks run without taking their events.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// A publisher connects again with the same identity from the same address: the older
    /// connection's messages still come through until the newer one sends; then the older one
    /// is cut, what came from it after that is discarded (counted), and the newer one's updates
    /// come through. From another address the same identity cuts nobody.
    #[tokio::test(flavor = "current_thread")]
    async fn a_newer_connection_of_a_publisher_supersedes_its_older_one() {
        let mut xsub = xsub();
        let endpoint = xsub.endpoint.trim_start_matches("tcp://").to_string();
        let connect = |from: &'static str| {
            let endpoint = endpoint.clone();
            tokio::task::spawn_blocking(move || raw_publisher(&endpoint, from, b"p1 1234abcd"))
        };
        let first = |msgs: Vec<ZmqMessage>| msgs[0].get(0).map(|f| f.to_vec());
        let mut older = connect("127.0.0.1").await.expect("older");
        older
            .write_all(&zmtp::frame(0, b"10001 a1"))
            .expect("write");
        assert_eq!(first(next(&mut xsub).await), Some(b"10001 a1".to_vec()));
        // The newer one has joined but sent nothing: the older one's tail still flows.
        let mut newer = connect("127.0.0.1").await.expect("newer");
        settle().await;
        older
            .write_all(&zmtp::frame(0, b"10001 a2"))
            .expect("write");
        assert_eq!(first(next(&mut xsub).await), Some(b"10001 a2".to_vec()));
        // The newer one sends; what the older one sends after reaches the XSUB after that.
        newer
            .write_all(&zmtp::frame(0, b"10001 b1"))
            .expect("write");
        settle().await;
        older
            .write_all(&zmtp::frame(0, b"10001 a3"))
            .expect("write");
        settle().await;
        assert_eq!(first(next(&mut xsub).await), Some(b"10001 b1".to_vec()));
        assert!(xsub.try_recv().is_none(), "nothing from the older one");
        assert_eq!((xsub.handovers(), xsub.superseded()), (1, 1));
        // The older connection is closed.
        let mut buf = [0u8; 64];
        let closed = tokio::task::spawn_blocking(move || loop {
            match older.read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        });
        assert!(closed.await.expect("read"));
        // The same identity from another address is someone else: both stay.
        let mut stranger = connect("127.0.0.2").await.expect("stranger");
        stranger
            .write_all(&zmtp::frame(0, b"10001 s1"))
            .expect("write");
        newer
            .write_all(&zmtp::frame(0, b"10001 b2"))
            .expect("write");
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(
                next(&mut xsub)
                    .await
                    .into_iter()
                    .filter_map(|m| m.get(0).map(|f| f.to_vec())),
            );
        }
        got.sort();
        assert_eq!(got, [b"10001 b2".to_vec(), b"10001 s1".to_vec()]);
        assert_eq!(xsub.handovers(), 1);
        assert_eq!(xsub.publishers(), 2);
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
