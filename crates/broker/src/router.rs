//! The broker's two ROUTER sockets, written on the TCP streams (ZMTP 3.0, see `common::wire`)
//! instead of zmq.rs's `RouterSocket`.
//!
//! Why: with workers holding many requests the broker's time went to the library, not to its
//! books (docs/performance.md): four SipHash operations on its fair queue per message received,
//! a channel and a task wake-up per message sent, a 100,000-message queue per peer whatever the
//! sizes, and a relay in front (the guard) to keep a nine-byte header from aborting the process.
//! Here:
//!
//! - Each connection has a reader task that decodes every whole message in what one read
//!   returned and hands them to the broker in one batch, over one bounded channel per socket:
//!   when the broker is busy the readers wait, and the kernel pushes back on the peers.
//! - Each connection has an outbox: [`Router::send`] encodes the message into it at once and
//!   wakes the connection's writer task, which writes whatever has gathered in one call.
//! - The limits are checked on the way in, on each frame header before its body is read:
//!   a frame or message over `max_message_bytes`, more than `max_frames` frames, bytes that
//!   are not ZMTP 3, or a handshake not done in [`HANDSHAKE_TIMEOUT`] end the connection
//!   (counted `refused`). A peer with more than `max_peer_bytes` waiting for it to read is cut
//!   off (counted `stalled`): that is what one peer can make the broker hold.
//!
//! What stays as in a stock ROUTER: any DEALER, REQ or ROUTER peer (libzmq, pyzmq, zmq.rs),
//! messages delivered with the peer's routing id in front, the id the peer set in its READY
//! (`Identity`) or else a 5-byte one made here (`0x00` and a counter, as libzmq does), a
//! message to an unknown peer refused, PING answered with PONG. A peer that connects with the
//! id of one still connected takes it over: the old connection is closed and reported gone first.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::guard::{GuardStats, Limits};
use common::send::Sent;
use common::wire::{self, parse_command, protocol_error, Reader};
use foldhash::{HashMap, HashMapExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::{ZmqError, ZmqMessage};

/// How long a new connection has to complete its greeting and READY.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Batches of messages waiting for the broker, per socket (a batch is what one read of one
/// connection held): beyond, the readers wait, and the kernel pushes back on their peers.
const INBOUND_BATCHES: usize = 64;
/// A writer keeps a buffer of at most this much capacity between writes.
const SPARE_BYTES: usize = 1 << 20;
/// The socket types a ROUTER talks to.
const PEERS: &[&[u8]] = &[b"DEALER", b"REQ", b"ROUTER"];

/// What the broker learns from a ROUTER.
#[derive(Debug)]
pub enum Event {
    /// A message, the peer's routing id first.
    Message(ZmqMessage),
    /// The peer's connection ended (or it was cut off, or taken over).
    Gone(Bytes),
}

/// What the connection tasks tell the [`Router`], in order per connection.
#[derive(Debug)]
enum Inbound {
    Joined {
        id: Bytes,
        serial: u64,
        outbox: Arc<Outbox>,
    },
    Messages {
        id: Bytes,
        serial: u64,
        batch: Vec<ZmqMessage>,
    },
    Left {
        id: Bytes,
        serial: u64,
    },
}

/// Encoded messages waiting for one peer's writer task.
#[derive(Debug)]
struct Outbox {
    buf: Mutex<BytesMut>,
    wake: Notify,
    /// Set when the connection ends or is cut: sends fail from then on. (Not `cut.is_cancelled()`,
    /// which takes a lock, on every send.)
    closed: AtomicBool,
    /// Fires when the connection is to end: closed, cut off, or the router stopped.
    cut: CancellationToken,
}

impl Outbox {
    /// `stop` ends the router: it cuts every connection.
    fn new(stop: &CancellationToken) -> Self {
        Self {
            buf: Mutex::new(BytesMut::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            cut: stop.child_token(),
        }
    }

    fn close(&self) {
        self.closed.store(true, Relaxed);
        self.cut.cancel();
    }

    /// Appends `size` bytes written by `put` and wakes the writer; or, if bytes are waiting
    /// already and these would take them over `limit`, closes the outbox (the connection is
    /// cut) and says how many were waiting.
    fn push(&self, size: usize, limit: u64, put: impl FnOnce(&mut BytesMut)) -> Result<(), usize> {
        let mut buf = self.buf.lock().expect("outbox lock");
        let was_empty = buf.is_empty();
        if !was_empty && (buf.len() + size) as u64 > limit {
            let waiting = buf.len();
            drop(buf);
            self.close();
            return Err(waiting);
        }
        buf.reserve(size);
        put(&mut buf);
        drop(buf);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Peer {
    serial: u64,
    outbox: Arc<Outbox>,
}

/// A bound ROUTER.
#[derive(Debug)]
pub struct Router {
    inbound: mpsc::Receiver<Inbound>,
    ready: VecDeque<Event>,
    peers: HashMap<Bytes, Peer>,
    limits: Limits,
    stats: Arc<GuardStats>,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
    _stop: DropGuard,
}

impl Router {
    /// Serves on `listener` (its socket options are inherited by the connections).
    pub fn serve(listener: std::net::TcpListener, limits: Limits) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let (tx, inbound) = mpsc::channel(INBOUND_BATCHES);
        let stop = CancellationToken::new();
        let stats = Arc::new(GuardStats::default());
        tokio::spawn(accept(listener, tx, limits, stats.clone(), stop.clone()));
        Ok(Self {
            inbound,
            ready: VecDeque::new(),
            peers: HashMap::new(),
            limits,
            stats,
            endpoint: format!("tcp://{local}"),
            _stop: stop.drop_guard(),
        })
    }

    /// Connections refused and cut off as stalled.
    pub fn stats(&self) -> &Arc<GuardStats> {
        &self.stats
    }

    /// The next event; waits for one. Cancel-safe.
    pub async fn recv(&mut self) -> Event {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            match self.inbound.recv().await {
                Some(inbound) => self.take(inbound),
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// The next event already here, if any.
    pub fn try_recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            let inbound = self.inbound.try_recv().ok()?;
            self.take(inbound);
        }
    }

    fn take(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Messages { id, serial, batch } => {
                // A connection taken over is heard no more.
                if self.peers.get(&id).is_some_and(|p| p.serial == serial) {
                    self.ready.extend(batch.into_iter().map(Event::Message));
                }
            }
            Inbound::Joined { id, serial, outbox } => {
                if let Some(old) = self.peers.insert(id.clone(), Peer { serial, outbox }) {
                    old.outbox.close();
                    self.ready.push_back(Event::Gone(id));
                }
            }
            Inbound::Left { id, serial } => {
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
        let outbox = &known.outbox;
        if outbox.closed.load(Relaxed) {
            return Sent::Failed(ZmqError::Other("peer gone"));
        }
        let size: usize = frames.clone().map(|f| f.len() + 9).sum();
        let queued = outbox.push(size, self.limits.max_peer_bytes, |buf| {
            wire::put_message(buf, frames);
        });
        match queued {
            Ok(()) => Sent::Queued,
            Err(waiting) => {
                self.stats.stalled.fetch_add(1, Relaxed);
                tracing::warn!(
                    peer = %common::frames::show(peer),
                    waiting,
                    "peer not reading: cut off"
                );
                Sent::Stalled
            }
        }
    }
}

async fn accept(
    listener: TcpListener,
    tx: mpsc::Sender<Inbound>,
    limits: Limits,
    stats: Arc<GuardStats>,
    stop: CancellationToken,
) {
    let mut serial = 0u64;
    while let Some((stream, addr)) = wire::accept(&listener, &stop, "connection").await {
        serial += 1;
        stats.accepted.fetch_add(1, Relaxed);
        let conn = Connection {
            serial,
            addr,
            tx: tx.clone(),
            limits,
            stats: stats.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(conn.run(stream));
    }
}

struct Connection {
    serial: u64,
    addr: SocketAddr,
    tx: mpsc::Sender<Inbound>,
    limits: Limits,
    stats: Arc<GuardStats>,
    stop: CancellationToken,
}

impl Connection {
    fn refused(&self, error: &dyn std::fmt::Display) {
        self.stats.refused.fetch_add(1, Relaxed);
        tracing::info!(peer = %self.addr, error = %error, "connection refused");
    }

    async fn run(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let max_frame = usize::try_from(self.limits.max_message_bytes).unwrap_or(usize::MAX);
        let handshake = wire::handshake(stream, "ROUTER", PEERS, max_frame);
        let peer = tokio::select! {
            () = self.stop.cancelled() => return,
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
                Ok(Ok(peer)) => peer,
                Ok(Err(e)) => return self.refused(&e),
                Err(_) => return self.refused(&"handshake not done in time"),
            },
        };
        let id = match peer.identity {
            Some(id) if id[0] == 0 => {
                return self.refused(&"routing ids starting with 0 are the ROUTER's to give")
            }
            Some(id) => id,
            None => {
                let mut id = vec![0u8];
                id.extend_from_slice(&(self.serial as u32).to_be_bytes());
                Bytes::from(id)
            }
        };
        let outbox = Arc::new(Outbox::new(&self.stop));
        let joined = Inbound::Joined {
            id: id.clone(),
            serial: self.serial,
            outbox: outbox.clone(),
        };
        if self.tx.send(joined).await.is_err() {
            return;
        }
        let writer = tokio::spawn(write_loop(peer.write, outbox.clone()));
        let mut reader = peer.reader;
        let ended = tokio::select! {
            ended = self.read_loop(&id, &mut reader, &outbox) => ended,
            () = outbox.cut.cancelled() => Ok(()),
        };
        if let Err(e) = ended {
            if e.kind() == std::io::ErrorKind::InvalidData {
                self.refused(&e);
            } else {
                tracing::debug!(peer = %self.addr, error = %e, "connection ended");
            }
        }
        outbox.close();
        let _ = self
            .tx
            .send(Inbound::Left {
                id,
                serial: self.serial,
            })
            .await;
        let _ = writer.await;
    }

    /// Decodes every whole message in each read and hands them over in one batch.
    async fn read_loop(
        &self,
        id: &Bytes,
        reader: &mut Reader,
        outbox: &Outbox,
    ) -> std::io::Result<()> {
        let mut parts: VecDeque<Bytes> = VecDeque::new();
        let mut size = 0u64;
        loop {
            let mut batch = Vec::new();
            while let Some(frame) = reader.try_frame()? {
                if frame.is_command() {
                    let (name, body) = parse_command(&frame.body)?;
                    if name == b"PING" {
                        // The PONGs a peer leaves unread count toward its byte bound.
                        let pong = wire::pong(body);
                        let pushed = outbox.push(pong.len(), self.limits.max_peer_bytes, |buf| {
                            buf.extend_from_slice(&pong);
                        });
                        if let Err(waiting) = pushed {
                            self.stats.stalled.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %self.addr, waiting, "peer not reading its PONGs: cut off");
                            return Ok(());
                        }
                    }
                    continue;
                }
                size += frame.body.len() as u64;
                if size > self.limits.max_message_bytes {
                    return Err(protocol_error(format!("message of {size} bytes or more")));
                }
                if parts.len() > self.limits.max_frames as usize {
                    return Err(protocol_error("message of too many frames"));
                }
                if parts.is_empty() {
                    parts.push_back(id.clone());
                }
                let more = frame.more();
                parts.push_back(frame.body);
                if !more {
                    size = 0;
                    let frames = std::mem::replace(&mut parts, VecDeque::with_capacity(4));
                    batch.push(ZmqMessage::try_from(frames).expect("at least the id"));
                }
            }
            if !batch.is_empty() {
                let (id, serial) = (id.clone(), self.serial);
                let messages = Inbound::Messages { id, serial, batch };
                if self.tx.send(messages).await.is_err() {
                    return Ok(());
                }
            }
            if !reader.fill().await? {
                return Ok(());
            }
        }
    }
}

/// Writes whatever gathered in the outbox, in one call each time; ends the connection when the
/// outbox is closed (a peer cut off gets nothing more).
async fn write_loop(mut write: OwnedWriteHalf, outbox: Arc<Outbox>) {
    let mut spare = BytesMut::new();
    loop {
        {
            let mut buf = outbox.buf.lock().expect("outbox lock");
            if !buf.is_empty() {
                std::mem::swap(&mut *buf, &mut spare);
            }
        }
        if spare.is_empty() {
            tokio::select! {
                () = outbox.wake.notified() => continue,
                () = outbox.cut.cancelled() => break,
            }
        }
        tokio::select! {
            written = write.write_all(&spare) => if written.is_err() { break },
            () = outbox.cut.cancelled() => break,
        }
        spare.clear();
        // After a burst, give back what a quiet peer would keep for nothing.
        if spare.capacity() > SPARE_BYTES {
            spare = BytesMut::new();
        }
    }
    outbox.close();
    let _ = socket2::SockRef::from(write.as_ref()).shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use common::zmtp;
    use zeromq::util::PeerIdentity;
    use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend};

    use super::*;

    fn router(max_peer_bytes: u64) -> Router {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 16,
            max_peer_bytes,
        };
        Router::serve(listener, limits).expect("serve")
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

    /// A zmq.rs DEALER with no id gets a 5-byte one (0x00 first), one with an id keeps it; each
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
        assert_eq!((anonymous_id.len(), anonymous_id[0]), (5, 0));
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

    /// A second connection with the id of one still connected takes it over: the first is
    /// reported gone before the second's messages, and replies go to the second.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_reconnecting_with_its_id_takes_it_over() {
        let mut router = router(1 << 20);
        let mut first = dealer(&router.endpoint, Some("w")).await;
        first.send(ZmqMessage::from("1")).await.expect("send");
        assert!(matches!(next(&mut router).await, Event::Message(_)));
        let mut second = dealer(&router.endpoint, Some("w")).await;
        second.send(ZmqMessage::from("2")).await.expect("send");
        match next(&mut router).await {
            Event::Gone(id) => assert_eq!(id.as_ref(), b"w"),
            other => panic!("the first gone first: {other:?}"),
        }
        let Event::Message(msg) = next(&mut router).await else {
            panic!("then the second's message");
        };
        assert_eq!(msg.get(1).map(|f| f.as_ref()), Some(&b"2"[..]));
        let id = Bytes::from_static(b"w");
        assert!(router.send(message(&id, b"to 2")).is_queued());
        let got = second.recv().await.expect("reply");
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"to 2"[..]));
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
    /// header over the size, too many frames, bytes that are not a greeting.
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
