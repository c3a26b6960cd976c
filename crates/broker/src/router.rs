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
//!   when the broker is busy the readers wait, and the kernel pushes back on the peers. The
//!   batches on their way hold permits of a byte budget per socket ([`INBOUND_BYTES`]), so what
//!   the readers have taken in and the broker has not is bounded in bytes, not only in batches.
//! - Each connection has an outbox: [`Router::send`] encodes the message into it at once and
//!   wakes the connection's writer task, which writes whatever has gathered in one call.
//! - The limits are checked on the way in, on each frame header before its body is read:
//!   a frame or message over `max_message_bytes`, more than `max_frames` frames, bytes that
//!   are not ZMTP 3, or a handshake not done in [`HANDSHAKE_TIMEOUT`] end the connection
//!   (counted `refused`). A peer with more than `max_peer_bytes` waiting for it to read is cut
//!   off (counted `stalled`): that is what one peer can make the broker hold.
//! - At most `max_connections` connections are open at once, handshakes included. At the bound
//!   a new connection takes the place of the one heard from least recently, if that one has
//!   been quiet for [`QUIET_ENOUGH_TO_EVICT`] (counted `evicted`); otherwise the newcomer is
//!   closed at once (counted `turned_away`). So idle connections cannot lock everyone out, and
//!   the process never runs out of descriptors for the peers it serves.
//!
//! What stays as in a stock ROUTER: any DEALER, REQ or ROUTER peer (libzmq, pyzmq, zmq.rs),
//! messages delivered with the peer's routing id in front, the id the peer set in its READY
//! (`Identity`, 1 to 255 bytes, not starting with a zero byte) or else one made here (`0x00`
//! and a 64-bit connection number: libzmq's 32-bit counter could wrap onto a live id), a
//! message to an unknown peer refused, PING answered with PONG.
//!
//! **A connection owns its id**, as in a libzmq ROUTER with `ZMQ_ROUTER_HANDOVER` off (its
//! default): a second connection claiming the id of one still open is refused (closed, counted
//! `refused`), so nobody can take another peer's replies by naming it. The id passes to a new
//! connection only once the old one is known to be over (its reader or writer has ended); a
//! libzmq peer retries every 100 ms until then. Our own clients and workers set no id: each
//! connection gets a fresh one, so a half-open old connection never locks them out.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::guard::{GuardStats, Limits};
use common::logging::Throttle;
use common::send::Sent;
use common::wire::{self, parse_command, protocol_error, Reader};
use foldhash::{HashMap, HashMapExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::{ZmqError, ZmqMessage};

/// How long a new connection has to complete its greeting and READY.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At the connection bound, a connection silent for this long gives its place to a new one.
/// Longer than the heartbeat interval of our workers and of RFC 6 ones (1 s), so that a live
/// worker is never taken for idle.
pub const QUIET_ENOUGH_TO_EVICT: Duration = Duration::from_secs(2);
/// Batches of messages waiting for the broker, per socket (a batch is what one read of one
/// connection held): beyond, the readers wait, and the kernel pushes back on their peers.
const INBOUND_BATCHES: usize = 64;
/// Bytes of those batches, per socket, at most; raised to two of the largest messages allowed
/// so that one always passes. 64 batches of the reader's usual 16-64 KiB reads fit.
const INBOUND_BYTES: usize = 8 << 20;
/// What one message costs beyond its frames' bytes in a batch (its frame list and headers).
const MESSAGE_OVERHEAD: usize = 128;
/// A writer keeps a buffer of at most this much capacity between writes.
const SPARE_BYTES: usize = 1 << 20;
/// The socket types a ROUTER talks to.
const PEERS: &[&[u8]] = &[b"DEALER", b"REQ", b"ROUTER"];
/// The longest routing id a peer may set (libzmq's limit too: the length is one byte).
pub const MAX_ID_BYTES: usize = 255;

/// Log lines peers can cause at will: at most one a second each, with a count of the rest.
static REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static STALLED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static BOUND_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// What the broker learns from a ROUTER.
#[derive(Debug)]
pub enum Event {
    /// A message, the peer's routing id first.
    Message(ZmqMessage),
    /// The peer's connection ended (or it was cut off).
    Gone(Bytes),
}

/// What the connection tasks tell the [`Router`], in order per connection.
#[derive(Debug)]
enum Inbound {
    Joined {
        id: Bytes,
        serial: u64,
        addr: SocketAddr,
        outbox: Arc<Outbox>,
    },
    Messages {
        id: Bytes,
        serial: u64,
        batch: Vec<ZmqMessage>,
        /// Its share of [`INBOUND_BYTES`], given back when the router takes the batch.
        _budget: Option<OwnedSemaphorePermit>,
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
    /// Bytes handed to the outbox and not yet written to the kernel: what [`Router::flush`]
    /// waits for.
    unwritten: AtomicU64,
    /// Fires when the connection is to end: closed, cut off, evicted, or the router stopped.
    cut: CancellationToken,
}

impl Outbox {
    fn new(cut: CancellationToken) -> Self {
        Self {
            buf: Mutex::new(BytesMut::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            unwritten: AtomicU64::new(0),
            cut,
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
        let before = buf.len();
        put(&mut buf);
        self.unwritten
            .fetch_add((buf.len() - before) as u64, Relaxed);
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
    /// Fires to stop accepting (see [`Router::flush`]).
    accepting: CancellationToken,
    _stop: DropGuard,
}

impl Router {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once.
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let (tx, inbound) = mpsc::channel(INBOUND_BATCHES);
        let stop = CancellationToken::new();
        let accepting = stop.child_token();
        let stats = Arc::new(GuardStats::default());
        let message = usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX);
        let budget_bytes = INBOUND_BYTES
            .max(message.saturating_mul(2))
            .min(u32::MAX as usize);
        let shared = Shared {
            tx,
            limits,
            stats: stats.clone(),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            connections: Arc::new(Connections::new(max_connections.max(1))),
        };
        tokio::spawn(accept(listener, shared, stop.clone(), accepting.clone()));
        Ok(Self {
            inbound,
            ready: VecDeque::new(),
            peers: HashMap::new(),
            limits,
            stats,
            endpoint: format!("tcp://{local}"),
            accepting,
            _stop: stop.drop_guard(),
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
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
            Inbound::Messages {
                id, serial, batch, ..
            } => {
                // A connection refused for its id is heard no more.
                if self.peers.get(&id).is_some_and(|p| p.serial == serial) {
                    self.ready.extend(batch.into_iter().map(Event::Message));
                }
            }
            Inbound::Joined {
                id,
                serial,
                addr,
                outbox,
            } => match self.peers.entry(id) {
                Entry::Vacant(place) => {
                    place.insert(Peer { serial, outbox });
                }
                // The old connection is over, its `Left` not here yet: the id passes on.
                Entry::Occupied(mut place) if place.get().outbox.closed.load(Relaxed) => {
                    place.insert(Peer { serial, outbox });
                    self.ready.push_back(Event::Gone(place.key().clone()));
                }
                Entry::Occupied(place) => {
                    outbox.close();
                    self.stats.refused.fetch_add(1, Relaxed);
                    if let Some(held_back) = REFUSED_LOG.check() {
                        tracing::info!(peer = %addr, id = %common::frames::show(place.key()), held_back, "connection refused: its routing id is in use");
                    }
                }
            },
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
                if let Some(held_back) = STALLED_LOG.check() {
                    tracing::warn!(
                        peer = %common::frames::show(peer),
                        waiting,
                        held_back,
                        "peer not reading: cut off"
                    );
                }
                Sent::Stalled
            }
        }
    }

    /// Stops accepting connections and waits, `linger` at most, until what the outboxes hold
    /// is written to the kernel: the last replies of a drain are not cut mid-frame when the
    /// router is dropped.
    pub async fn flush(&mut self, linger: Duration) {
        self.accepting.cancel();
        let until = tokio::time::Instant::now() + linger;
        while self
            .peers
            .values()
            .any(|p| !p.outbox.closed.load(Relaxed) && p.outbox.unwritten.load(Relaxed) > 0)
        {
            if tokio::time::Instant::now() >= until {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What every connection task of one socket shares.
#[derive(Debug, Clone)]
struct Shared {
    tx: mpsc::Sender<Inbound>,
    limits: Limits,
    stats: Arc<GuardStats>,
    /// [`INBOUND_BYTES`] (or two of the largest messages) as permits.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
    connections: Arc<Connections>,
}

/// The open connections of one socket, handshakes included: what the bound counts, and what
/// it evicts from.
#[derive(Debug)]
struct Connections {
    max: usize,
    start: Instant,
    open: Mutex<HashMap<u64, Arc<Open>>>,
}

/// One open connection, as the accept loop sees it.
#[derive(Debug)]
struct Open {
    /// When bytes last came from the peer, in milliseconds since [`Connections::start`].
    heard_ms: AtomicU64,
    /// Ends the connection (child of the router's stop token).
    cut: CancellationToken,
}

impl Connections {
    fn new(max: usize) -> Self {
        Self {
            max,
            start: Instant::now(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Registers connection `serial`, making room at the bound by evicting the connection heard
    /// from least recently if it has been quiet long enough; `None` if there is no room.
    fn open(&self, serial: u64, stop: &CancellationToken, stats: &GuardStats) -> Option<Arc<Open>> {
        let now = self.now_ms();
        let mut open = self.open.lock().expect("connections lock");
        if open.len() >= self.max {
            let quietest = open
                .iter()
                .min_by_key(|(_, c)| c.heard_ms.load(Relaxed))
                .map(|(&serial, c)| (serial, c.heard_ms.load(Relaxed)));
            let quiet_enough = QUIET_ENOUGH_TO_EVICT.as_millis() as u64;
            match quietest {
                Some((oldest, heard)) if now.saturating_sub(heard) >= quiet_enough => {
                    if let Some(evicted) = open.remove(&oldest) {
                        evicted.cut.cancel();
                    }
                    stats.evicted.fetch_add(1, Relaxed);
                    log_bound(self.max, stats);
                }
                _ => {
                    stats.turned_away.fetch_add(1, Relaxed);
                    log_bound(self.max, stats);
                    return None;
                }
            }
        }
        let conn = Arc::new(Open {
            heard_ms: AtomicU64::new(now),
            cut: stop.child_token(),
        });
        open.insert(serial, conn.clone());
        Some(conn)
    }

    fn heard(&self, conn: &Open) {
        conn.heard_ms.store(self.now_ms(), Relaxed);
    }

    fn close(&self, serial: u64) {
        self.open.lock().expect("connections lock").remove(&serial);
    }
}

fn log_bound(max: usize, stats: &GuardStats) {
    if let Some(held_back) = BOUND_LOG.check() {
        tracing::warn!(
            max_connections = max,
            evicted = stats.evicted(),
            turned_away = stats.turned_away(),
            held_back,
            "at the connection bound"
        );
    }
}

async fn accept(
    listener: TcpListener,
    shared: Shared,
    stop: CancellationToken,
    accepting: CancellationToken,
) {
    let mut serial = 0u64;
    while let Some((stream, addr)) = wire::accept(&listener, &accepting, "connection").await {
        serial += 1;
        shared.stats.accepted.fetch_add(1, Relaxed);
        let Some(open) = shared.connections.open(serial, &stop, &shared.stats) else {
            // Closed at once: the peer learns now, and its descriptor is ours again.
            drop(stream);
            continue;
        };
        let conn = Connection {
            serial,
            addr,
            open,
            shared: shared.clone(),
        };
        tokio::spawn(conn.run(stream));
    }
}

struct Connection {
    serial: u64,
    addr: SocketAddr,
    open: Arc<Open>,
    shared: Shared,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.connections.close(self.serial);
    }
}

impl Connection {
    fn refused(&self, error: &dyn std::fmt::Display) {
        self.shared.stats.refused.fetch_add(1, Relaxed);
        if let Some(held_back) = REFUSED_LOG.check() {
            tracing::info!(peer = %self.addr, error = %error, held_back, "connection refused");
        }
    }

    /// The routing id of a peer past its handshake: its own, checked, or a fresh one.
    fn routing_id(&self, identity: Option<Bytes>) -> Result<Bytes, &'static str> {
        match identity {
            Some(id) if id[0] == 0 => Err("routing ids starting with 0 are the ROUTER's to give"),
            Some(id) if id.len() > MAX_ID_BYTES => Err("routing id over 255 bytes"),
            Some(id) => Ok(id),
            None => {
                let mut id = Vec::with_capacity(9);
                id.push(0);
                id.extend_from_slice(&self.serial.to_be_bytes());
                Ok(Bytes::from(id))
            }
        }
    }

    async fn run(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let limits = self.shared.limits;
        let max_frame = usize::try_from(limits.max_message_bytes).unwrap_or(usize::MAX);
        let handshake = wire::handshake(stream, "ROUTER", PEERS, max_frame);
        let peer = tokio::select! {
            () = self.open.cut.cancelled() => return,
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
                Ok(Ok(peer)) => peer,
                Ok(Err(e)) => return self.refused(&e),
                Err(_) => return self.refused(&"handshake not done in time"),
            },
        };
        self.shared.connections.heard(&self.open);
        let id = match self.routing_id(peer.identity) {
            Ok(id) => id,
            Err(why) => return self.refused(&why),
        };
        let outbox = Arc::new(Outbox::new(self.open.cut.clone()));
        let joined = Inbound::Joined {
            id: id.clone(),
            serial: self.serial,
            addr: self.addr,
            outbox: outbox.clone(),
        };
        if self.shared.tx.send(joined).await.is_err() {
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
            .shared
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
        let limits = &self.shared.limits;
        let mut parts: VecDeque<Bytes> = VecDeque::new();
        let mut size = 0u64;
        loop {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            while let Some(frame) = reader.try_frame()? {
                if frame.is_command() {
                    let (name, body) = parse_command(&frame.body)?;
                    if name == b"PING" {
                        // The PONGs a peer leaves unread count toward its byte bound.
                        let pong = wire::pong(body);
                        let pushed = outbox.push(pong.len(), limits.max_peer_bytes, |buf| {
                            buf.extend_from_slice(&pong);
                        });
                        if let Err(waiting) = pushed {
                            self.shared.stats.stalled.fetch_add(1, Relaxed);
                            if let Some(held_back) = STALLED_LOG.check() {
                                tracing::warn!(peer = %self.addr, waiting, held_back, "peer not reading its PONGs: cut off");
                            }
                            return Ok(());
                        }
                    }
                    continue;
                }
                size += frame.body.len() as u64;
                if size > limits.max_message_bytes {
                    return Err(protocol_error(format!("message of {size} bytes or more")));
                }
                if parts.len() > limits.max_frames as usize {
                    return Err(protocol_error("message of too many frames"));
                }
                if parts.is_empty() {
                    parts.push_back(id.clone());
                }
                let more = frame.more();
                parts.push_back(frame.body);
                if !more {
                    batch_bytes += size as usize + MESSAGE_OVERHEAD;
                    size = 0;
                    let frames = std::mem::replace(&mut parts, VecDeque::with_capacity(4));
                    batch.push(ZmqMessage::try_from(frames).expect("at least the id"));
                }
            }
            if !batch.is_empty() {
                // Waits, reading nothing more, while the socket's batches in flight hold the
                // whole budget.
                let budget = self.shared.budget.clone();
                let permits = batch_bytes.min(self.shared.budget_bytes) as u32;
                let Ok(permit) = budget.acquire_many_owned(permits).await else {
                    return Ok(());
                };
                let messages = Inbound::Messages {
                    id: id.clone(),
                    serial: self.serial,
                    batch,
                    _budget: Some(permit),
                };
                if self.shared.tx.send(messages).await.is_err() {
                    return Ok(());
                }
            }
            if !reader.fill().await? {
                return Ok(());
            }
            self.shared.connections.heard(&self.open);
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
        outbox.unwritten.fetch_sub(spare.len() as u64, Relaxed);
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
        while router.stats().accepted.load(Relaxed) < 3 {
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
