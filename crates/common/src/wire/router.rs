//! A ROUTER socket, written on the TCP streams (ZMTP 3.0, see [`crate::wire`]) instead of
//! zmq.rs's `RouterSocket`: the broker's frontend and backend.
//!
//! Why: with workers holding many requests the broker's time went to the library, not to its
//! books (docs/performance.md): four SipHash operations on its fair queue per message received,
//! a channel and a task wake-up per message sent, a 100,000-message queue per peer whatever the
//! sizes, and a relay in front (the guard) to keep a nine-byte header from aborting the process.
//! The connections (reader and writer tasks, outboxes, the limits, the bound on connections)
//! are [`super::server`]'s; this adds what makes it a ROUTER: routing ids.
//!
//! What stays as in a stock ROUTER: any DEALER, REQ or ROUTER peer (libzmq, pyzmq, zmq.rs),
//! messages delivered with the peer's routing id in front, the id the peer set in its READY
//! (`Identity`, 1 to 255 bytes, not starting with a zero byte) or else one made here (`0x00`
//! and a 64-bit connection number: libzmq's 32-bit counter could come round to a live id), a
//! message to an unknown peer refused, PING answered with PONG. A peer with more than
//! `max_peer_bytes` waiting for it to read is cut off (counted `stalled`): that is what one
//! peer can make the broker hold.
//!
//! **A connection owns its id**, as in a libzmq ROUTER with `ZMQ_ROUTER_HANDOVER` off (its
//! default): a second connection claiming the id of one still open is refused (closed, counted
//! `refused`), so nobody can take another peer's replies by naming it. The id passes to a new
//! connection only once the old one is known to be over (its reader or writer has ended); a
//! libzmq peer retries every 100 ms until then. Our own clients and workers set no id: each
//! connection gets a fresh one, so a half-open old connection never locks them out.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::logging::Throttle;
use crate::send::Sent;
use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{self, Options, Outbox, Server};
use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use zeromq::{ZmqError, ZmqMessage};

pub use crate::wire::server::{HANDSHAKE_TIMEOUT, QUIET_ENOUGH_TO_EVICT};

/// The socket types a ROUTER talks to.
const PEERS: &[&[u8]] = &[b"DEALER", b"REQ", b"ROUTER"];
/// The longest routing id a peer may set (libzmq's limit too: the length is one byte).
pub const MAX_ID_BYTES: usize = 255;

static ID_IN_USE_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// What the broker learns from a ROUTER.
#[derive(Debug)]
pub enum Event {
    /// A message, the peer's routing id first.
    Message(ZmqMessage),
    /// The peer's connection ended (or it was cut off).
    Gone(Bytes),
}

#[derive(Debug)]
struct Peer {
    serial: u64,
    outbox: Arc<Outbox>,
}

/// A bound ROUTER.
#[derive(Debug)]
pub struct Router {
    server: Server,
    ready: VecDeque<Event>,
    /// Connected peers by routing id.
    peers: HashMap<Bytes, Peer>,
    /// The routing id of each connection that has one (a refused one has none).
    ids: HashMap<u64, Bytes>,
    limits: Limits,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
}

/// The routing id of connection `serial`: the one its peer set, checked, or a fresh one.
fn routing_id(identity: Option<Bytes>, serial: u64) -> Result<Bytes, &'static str> {
    match identity {
        Some(id) if id[0] == 0 => Err("routing ids starting with 0 are the ROUTER's to give"),
        Some(id) if id.len() > MAX_ID_BYTES => Err("routing id over 255 bytes"),
        Some(id) => Ok(id),
        None => {
            let mut id = Vec::with_capacity(9);
            id.push(0);
            id.extend_from_slice(&serial.to_be_bytes());
            Ok(Bytes::from(id))
        }
    }
}

impl Router {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once.
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let options = Options::new("ROUTER", PEERS, limits, max_connections);
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
            ready: VecDeque::new(),
            peers: HashMap::new(),
            ids: HashMap::new(),
            limits,
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        self.server.stats()
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
            server::Event::Messages { serial, batch } => {
                // A connection refused for its id is heard no more.
                if let Some(id) = self.ids.get(&serial) {
                    self.ready.extend(batch.into_iter().map(|mut msg| {
                        msg.push_front(id.clone());
                        Event::Message(msg)
                    }));
                }
            }
            server::Event::Joined {
                serial,
                addr,
                identity,
                outbox,
            } => {
                let id = match routing_id(identity, serial) {
                    Ok(id) => id,
                    Err(why) => {
                        outbox.close();
                        return self.server.refused(&addr, &why);
                    }
                };
                match self.peers.entry(id.clone()) {
                    Entry::Vacant(place) => {
                        place.insert(Peer { serial, outbox });
                    }
                    // The old connection is over, its `Left` not here yet: the id passes on.
                    Entry::Occupied(mut place) if place.get().outbox.is_closed() => {
                        let old = place.insert(Peer { serial, outbox });
                        self.ids.remove(&old.serial);
                        self.ready.push_back(Event::Gone(id.clone()));
                    }
                    Entry::Occupied(place) => {
                        outbox.close();
                        self.server.refused(&addr, &"its routing id is in use");
                        if let Some(held_back) = ID_IN_USE_LOG.check() {
                            tracing::info!(peer = %addr, id = %crate::frames::show(place.key()), held_back, "a second connection claimed a routing id in use");
                        }
                        return;
                    }
                }
                self.ids.insert(serial, id);
            }
            server::Event::Left { serial } => {
                let Some(id) = self.ids.remove(&serial) else {
                    return;
                };
                if self.peers.get(&id).is_some_and(|p| p.serial == serial) {
                    self.peers.remove(&id);
                    self.ready.push_back(Event::Gone(id));
                }
            }
        }
    }

    /// Queues `msg` (routing id first) for its peer; see [`Router::send_to`].
    pub fn send(&mut self, msg: ZmqMessage) -> Sent {
        let mut frames = msg.iter();
        match frames.next() {
            Some(peer) => self.send_to(peer, frames),
            None => Sent::Failed(ZmqError::Other("no routing id")),
        }
    }

    /// Queues a message of `frames` for `peer`; never waits. A peer with more than
    /// `max_peer_bytes` already waiting is cut off and the message dropped (`Stalled`). (What
    /// one peer pins is then at most twice that: the outbox, and the write in progress.)
    pub fn send_to<'a>(
        &mut self,
        peer: &Bytes,
        frames: impl ExactSizeIterator<Item = &'a Bytes> + Clone,
    ) -> Sent {
        let Some(known) = self.peers.get(peer) else {
            return Sent::Failed(ZmqError::Other("no such peer"));
        };
        if known.outbox.is_closed() {
            return Sent::Failed(ZmqError::Other("peer gone"));
        }
        match known
            .outbox
            .push_message(frames, self.limits.max_peer_bytes)
        {
            Ok(()) => Sent::Queued,
            Err(waiting) => {
                self.server.stalled(&crate::frames::show(peer), waiting);
                Sent::Stalled
            }
        }
    }

    /// Stops accepting connections and waits, `linger` at most, until what the outboxes hold
    /// is written to the kernel: the last replies of a drain are not cut mid-frame when the
    /// router is dropped.
    pub async fn flush(&mut self, linger: Duration) {
        self.server.stop_accepting();
        server::flush(self.peers.values().map(|p| &p.outbox), linger).await;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use crate::zmtp;
    use zeromq::util::PeerIdentity;
    use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

    use super::*;

    fn router(max_peer_bytes: u64) -> Router {
        bounded_router(max_peer_bytes, 64)
    }

    fn bounded_router(max_peer_bytes: u64, max_connections: usize) -> Router {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 16,
            max_peer_bytes,
        };
        Router::serve(listener, limits, max_connections).expect("serve")
    }

    async fn dealer(endpoint: &str, id: Option<&str>) -> DealerSocket {
        let mut options = SocketOptions::default();
        if let Some(id) = id {
            options.peer_identity(PeerIdentity::try_from(id.as_bytes().to_vec()).expect("id"));
        }
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await.expect("connect");
        dealer
    }

    async fn next(router: &mut Router) -> Event {
        tokio::time::timeout(Duration::from_secs(5), router.recv())
            .await
            .expect("an event within 5 s")
    }

    fn message(id: &Bytes, body: &'static [u8]) -> ZmqMessage {
        ZmqMessage::try_from(vec![id.clone(), Bytes::from_static(body)]).expect("frames")
    }

    /// A zmq.rs DEALER with no id gets a 9-byte one (0x00 first), one with an id keeps it; each
    /// message comes with its sender's id in front and a reply to that id reaches only it.
    #[tokio::test(flavor = "current_thread")]
    async fn routes_by_the_peers_ids() {
        let mut router = router(1 << 20);
        let mut anonymous = dealer(&router.endpoint, None).await;
        let mut named = dealer(&router.endpoint, Some("w1")).await;
        anonymous.send(ZmqMessage::from("a")).await.expect("send");
        named.send(ZmqMessage::from("n")).await.expect("send");
        let mut ids = HashMap::new();
        for _ in 0..2 {
            let Event::Message(msg) = next(&mut router).await else {
                panic!("a message first");
            };
            let body = msg.get(1).cloned().expect("body");
            ids.insert(body, msg.get(0).cloned().expect("id"));
        }
        let anonymous_id = ids[&Bytes::from_static(b"a")].clone();
        assert_eq!((anonymous_id.len(), anonymous_id[0]), (9, 0));
        let named_id = ids[&Bytes::from_static(b"n")].clone();
        assert_eq!(named_id.as_ref(), b"w1");

        assert!(router.send(message(&named_id, b"to n")).is_queued());
        assert!(router.send(message(&anonymous_id, b"to a")).is_queued());
        let got = named.recv().await.expect("reply");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"to n"[..]));
        let got = anonymous.recv().await.expect("reply");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"to a"[..]));
        let unknown = Bytes::from_static(b"nobody");
        assert!(matches!(
            router.send(message(&unknown, b"x")),
            Sent::Failed(_)
        ));

        drop(named);
        match next(&mut router).await {
            Event::Gone(id) => assert_eq!(id, named_id),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            router.send(message(&named_id, b"x")),
            Sent::Failed(_)
        ));
    }

    /// A second connection claiming the id of one still open is refused: it is closed, none of
    /// its messages reach the broker, and replies keep going to the first. Once the first has
    /// gone, the id is free again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_owns_its_id() {
        let mut router = router(1 << 20);
        let mut first = dealer(&router.endpoint, Some("w")).await;
        first.send(ZmqMessage::from("1")).await.expect("send");
        assert!(matches!(next(&mut router).await, Event::Message(_)));
        let endpoint = router.endpoint.trim_start_matches("tcp://").to_string();
        let thief = std::thread::spawn(move || {
            let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
            let ready = zmtp::ready_as("DEALER", Some(b"w"));
            peer.write_all(&[zmtp::greeting(), ready, zmtp::frame(0, b"stolen")].concat())
                .expect("handshake");
            peer.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            // Our greeting and READY, then the close.
            while let Ok(n) = peer.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let id = Bytes::from_static(b"w");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while router.stats().refused() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never refused");
            if let Some(event) = router.try_recv() {
                panic!("{event:?} from the thief");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(router.send(message(&id, b"to 1")).is_queued());
        let got = tokio::task::spawn_blocking(move || thief.join().expect("thief"))
            .await
            .expect("joined");
        assert!(
            !got.windows(4).any(|w| w == b"to 1"),
            "the thief got a reply"
        );
        let reply = first.recv().await.expect("reply");
        assert_eq!(reply.get(0).map(|f| f.as_ref()), Some(&b"to 1"[..]));
        first.send(ZmqMessage::from("2")).await.expect("send");
        let Event::Message(msg) = next(&mut router).await else {
            panic!("the first is still heard");
        };
        assert_eq!(msg.get(1).map(|f| f.as_ref()), Some(&b"2"[..]));

        drop(first);
        match next(&mut router).await {
            Event::Gone(gone) => assert_eq!(gone, id),
            other => panic!("{other:?}"),
        }
        let mut second = dealer(&router.endpoint, Some("w")).await;
        second.send(ZmqMessage::from("3")).await.expect("send");
        let Event::Message(msg) = next(&mut router).await else {
            panic!("the id is free again");
        };
        assert_eq!(msg.get(0).map(|f| f.as_ref()), Some(&b"w"[..]));
    }

    /// What the outboxes hold when the router stops is written whole first: a large reply
    /// queued just before the end reaches its peer (dropped at once, it was cut mid-frame).
    #[tokio::test(flavor = "current_thread")]
    async fn a_flushed_router_sends_what_it_holds_before_it_closes() {
        let mut router = router(1 << 20);
        let mut peer = dealer(&router.endpoint, None).await;
        peer.send(ZmqMessage::from("hi")).await.expect("send");
        let Event::Message(hello) = next(&mut router).await else {
            panic!("a message first");
        };
        let id = hello.get(0).cloned().expect("id");
        let big = Bytes::from(vec![7u8; 8 << 20]);
        let msg = ZmqMessage::try_from(vec![id, big]).expect("frames");
        assert!(router.send(msg).is_queued());
        router.flush(Duration::from_secs(10)).await;
        drop(router);
        let got = tokio::time::timeout(Duration::from_secs(10), peer.recv())
            .await
            .expect("in time")
            .expect("the whole message");
        assert_eq!(got.get(0).map(Bytes::len), Some(8 << 20));
    }

    /// At the connection bound a newcomer is closed at once while every open connection was
    /// heard from lately; once one has been quiet for long enough, a newcomer takes its place.
    #[tokio::test(flavor = "current_thread")]
    async fn at_the_connection_bound_the_quietest_gives_way() {
        let mut router = bounded_router(1 << 20, 3);
        let endpoint = router.endpoint.trim_start_matches("tcp://").to_string();
        let handshake = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut peer = std::net::TcpStream::connect(&endpoint).expect("connect");
            peer.write_all(&handshake).expect("handshake");
            idle.push(peer);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let newcomer = |endpoint: String| {
            tokio::task::spawn_blocking(move || {
                let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
                peer.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut buf = [0u8; 256];
                // Closed at once: end of stream (or a reset) before any greeting.
                !matches!(peer.read(&mut buf), Ok(0) | Err(_))
            })
        };
        while router
            .stats()
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            < 3
        {
            assert!(tokio::time::Instant::now() < deadline, "not accepted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !newcomer(endpoint.clone()).await.expect("read"),
            "served at the bound"
        );
        assert_eq!(router.stats().turned_away(), 1);
        assert_eq!(router.stats().evicted(), 0);
        tokio::time::sleep(QUIET_ENOUGH_TO_EVICT + Duration::from_millis(200)).await;
        let mut dealer = dealer(&router.endpoint, None).await;
        dealer.send(ZmqMessage::from("in")).await.expect("send");
        // The evicted one is reported gone, then the newcomer heard.
        assert!(matches!(next(&mut router).await, Event::Gone(_)));
        let Event::Message(msg) = next(&mut router).await else {
            panic!("the newcomer is heard");
        };
        assert_eq!(msg.get(1).map(|f| f.as_ref()), Some(&b"in"[..]));
        assert_eq!(router.stats().evicted(), 1);
        drop(idle);
    }

    /// A raw peer that completes the handshake, sends one message and never reads: once more
    /// than `max_peer_bytes` wait for it, the message is refused as `Stalled`, the peer is cut
    /// off (counted) and reported gone, and sends to it fail.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_that_does_not_read_is_cut_off_at_the_byte_bound() {
        let mut router = router(256 * 1024);
        let endpoint = router.endpoint.trim_start_matches("tcp://").to_string();
        let raw = std::thread::spawn(move || {
            let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
            peer.write_all(&[zmtp::greeting(), zmtp::ready("DEALER")].concat())
                .expect("handshake");
            peer.write_all(&zmtp::frame(0, b"hello")).expect("message");
            // Never reads; holds the connection until it is cut.
            let mut sink = [0u8; 1];
            std::thread::sleep(Duration::from_secs(20));
            let _ = peer.read(&mut sink);
        });
        let Event::Message(hello) = next(&mut router).await else {
            panic!("its message first");
        };
        let id = hello.get(0).cloned().expect("id");
        let body = Bytes::from(vec![7u8; 32 * 1024]);
        let mut sent = 0;
        let stalled = loop {
            let msg = ZmqMessage::try_from(vec![id.clone(), body.clone()]).expect("frames");
            match router.send(msg) {
                Sent::Queued => sent += 1,
                other => break other,
            }
            assert!(sent < 10_000, "never refused");
            // Let the writer move what it can into the kernel's buffers.
            tokio::task::yield_now().await;
        };
        assert!(matches!(stalled, Sent::Stalled), "{stalled:?}");
        assert_eq!(router.stats().stalled(), 1);
        match next(&mut router).await {
            Event::Gone(gone) => assert_eq!(gone, id),
            other => panic!("{other:?}"),
        }
        assert!(matches!(router.send(message(&id, b"x")), Sent::Failed(_)));
        drop(raw);
    }

    /// PING is answered with PONG and its context (16 bytes at most); a peer that sends PINGs
    /// and never reads the PONGs is cut off at its byte bound like any other.
    #[tokio::test(flavor = "current_thread")]
    async fn pings_get_pongs_within_the_byte_bound() {
        let mut router = router(256 * 1024);
        let endpoint = router.endpoint.trim_start_matches("tcp://").to_string();
        let handshake = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
        let ping = |context: &[u8]| zmtp::frame(0x04, &[b"\x04PING\x00\x0a", context].concat());
        let (one, flood) = (ping(&[b'c'; 40]), ping(b"x"));
        let polite = tokio::task::spawn_blocking({
            let (endpoint, handshake) = (endpoint.clone(), handshake.clone());
            move || {
                let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
                peer.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                peer.write_all(&[handshake, one].concat()).expect("write");
                // Our greeting (64) and READY, then the PONG.
                let mut got = Vec::new();
                let mut buf = [0u8; 512];
                while !got.windows(4).any(|w| w == b"PONG") {
                    let n = peer.read(&mut buf).expect("read");
                    assert!(n > 0, "closed");
                    got.extend_from_slice(&buf[..n]);
                }
                let at = got.windows(4).position(|w| w == b"PONG").expect("PONG");
                got[at + 4..].to_vec()
            }
        });
        let rude = std::thread::spawn(move || {
            let mut peer = std::net::TcpStream::connect(endpoint).expect("connect");
            let mut all = handshake;
            for _ in 0..1_000_000 {
                all.extend_from_slice(&flood);
            }
            // Writes until cut off; never reads.
            let _ = peer.write_all(&all);
        });
        let context = polite.await.expect("a PONG");
        assert!(
            context.starts_with(&[b'c'; 16]) && context.len() == 16,
            "{context:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while router.stats().stalled() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the PING flooder was never cut off"
            );
            let _ = router.try_recv();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rude.join().expect("flooder");
    }

    /// Input over the limits ends the connection before the broker sees any of it: a frame
    /// header over the size, too many frames, bytes that are not a greeting, a routing id over
    /// 255 bytes (libzmq's limit) or starting with a zero byte (the ROUTER's own).
    #[tokio::test(flavor = "current_thread")]
    async fn input_over_the_limits_is_refused() {
        let mut router = router(1 << 20);
        let endpoint = router.endpoint.clone();
        let handshake = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
        let mut too_many = handshake.clone();
        for _ in 0..20 {
            too_many.extend(zmtp::frame(0x01, b""));
        }
        let attacks = vec![
            zmtp::huge_header(),
            [handshake.clone(), zmtp::huge_header()].concat(),
            [handshake.clone(), zmtp::frame(0, &vec![0u8; 100_000])].concat(),
            too_many,
            [handshake.clone(), b"\xF0garbage".to_vec()].concat(),
            [
                zmtp::greeting(),
                zmtp::ready_as("DEALER", Some(&[b'x'; 256])),
                zmtp::frame(0, b"hello"),
            ]
            .concat(),
            [
                zmtp::greeting(),
                zmtp::ready_as("DEALER", Some(b"\0mine")),
                zmtp::frame(0, b"hello"),
            ]
            .concat(),
        ];
        let n = attacks.len() as u64;
        tokio::task::spawn_blocking(move || {
            for attack in attacks {
                assert!(zmtp::send_raw(&endpoint, &attack), "connected");
            }
        })
        .await
        .expect("attacks sent");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while router.stats().refused() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "refused {}",
                router.stats().refused()
            );
            // Joined and gone, never a message.
            if let Some(Event::Message(msg)) = router.try_recv() {
                panic!("{msg:?} got through");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while let Some(event) = router.try_recv() {
            assert!(matches!(event, Event::Gone(_)), "{event:?}");
        }
    }
}
