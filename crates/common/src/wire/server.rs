//! A bound ZMTP socket's connections, for the server sides written on the TCP streams (the
//! broker's ROUTERs, see [`super::router`]): accepting within a bound, the handshake, a reader
//! task and an outbox with its writer task per connection. What the socket type means (routing
//! ids, subscriptions) is the caller's; this hands it each connection's arrival, messages and
//! end, in order per connection, and takes what to send through each connection's [`Outbox`].
//!
//! - A reader task decodes every whole message that one read brought and hands them over in one
//!   batch, over one bounded channel per socket (`Options::inbound_batches`, usually
//!   [`INBOUND_BATCHES`]): when the caller is busy
//!   the readers wait, and the kernel pushes back on the peers. The batches on their way hold
//!   permits of a byte budget per socket ([`INBOUND_BYTES`]), so what the readers have taken in
//!   and the caller has not is bounded in bytes, not only in batches.
//! - An [`Outbox`] takes encoded messages at once, never waiting, and wakes the connection's
//!   writer task, which writes whatever has gathered in one call. One that would hold more than
//!   the peer's byte bound is closed instead: the peer stopped reading and is cut off.
//! - The limits are checked on the way in, on each frame header before its body is read: a
//!   frame or message over `max_message_bytes`, more than `max_frames` frames, bytes that are
//!   not ZMTP 3, or a handshake not done in [`HANDSHAKE_TIMEOUT`] end the connection (counted
//!   `refused`). PING is answered with PONG, within the peer's byte bound.
//! - At most `max_connections` connections are open at once, handshakes included. At the bound
//!   a new connection takes the place of the one heard from least recently, if that one has
//!   been quiet for [`QUIET_ENOUGH_TO_EVICT`] (counted `evicted`); otherwise the newcomer is
//!   closed at once (counted `turned_away`). So idle connections cannot lock everyone out, and
//!   the process never runs out of descriptors for the peers it serves.
//! - The log lines a peer can cause at will are throttled (one a second, with a count).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::ZmqMessage;

use super::{parse_command, protocol_error, reach, Reader, FRAME_OVERHEAD, MESSAGE_OVERHEAD};
use crate::logging::Throttle;
use crate::wire::limits::{GuardStats, Limits};

/// How long a new connection has to complete its greeting and READY.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At the connection bound, a connection silent for this long gives its place to a new one.
/// Longer than the heartbeat interval of our workers and of RFC 6 ones (1 s), so that a live
/// worker is never taken for idle.
pub const QUIET_ENOUGH_TO_EVICT: Duration = Duration::from_secs(2);
/// Batches of messages waiting for the caller, per socket (a batch is what one read of one
/// connection held): beyond, the readers wait, and the kernel pushes back on their peers.
pub const INBOUND_BATCHES: usize = 64;
/// Bytes of those batches, per socket, at most; raised to two of the largest messages allowed
/// so that one always passes. 64 batches of the reader's 32 KiB reads fit.
pub const INBOUND_BYTES: usize = 8 << 20;
/// A writer keeps a buffer of at most this much capacity between writes.
const SPARE_BYTES: usize = 1 << 20;

/// Log lines peers can cause at will: at most one a second each, with a count of the rest.
static REFUSED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static STALLED_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static BOUND_LOG: Throttle = Throttle::new(Duration::from_secs(1));
static UNREACHABLE_LOG: Throttle = Throttle::new(Duration::from_secs(1));

/// A connection's descriptor, for [`reach::Watch::check`] while its write half is borrowed.
struct SocketFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// What a socket is and what it lets in.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Our `Socket-Type`.
    pub socket_type: &'static str,
    /// The peers' socket types we talk to.
    pub peers: &'static [&'static [u8]],
    pub limits: Limits,
    /// Connections open at once, at most (at least 1).
    pub max_connections: usize,
    /// For peers that may never send (a SUB, a PULL): a connection whose writes have not gone
    /// through for this long is cut only if its peer stopped reading; one that cannot be reached
    /// keeps its connection, which carries on when the link heals (see [`super::reach`]). Such a
    /// socket sends with [`Outbox::offer`], which drops what does not fit instead of cutting.
    /// `None`: the byte bound alone decides ([`Outbox::push`]).
    pub stall: Option<Duration>,
    /// Batches waiting for the caller, at most ([`INBOUND_BATCHES`] for a socket with many
    /// peers; fewer where a few peers send a flood of small messages, each an allocation).
    pub inbound_batches: usize,
}

impl Options {
    /// A socket of `socket_type` talking to `peers`: no stall rule (the byte bound alone
    /// decides), [`INBOUND_BATCHES`] batches waiting at most.
    pub fn new(
        socket_type: &'static str,
        peers: &'static [&'static [u8]],
        limits: Limits,
        max_connections: usize,
    ) -> Self {
        Self {
            socket_type,
            peers,
            limits,
            max_connections,
            stall: None,
            inbound_batches: INBOUND_BATCHES,
        }
    }

    /// With [`Options::stall`].
    pub fn with_stall(self, stall: Option<Duration>) -> Self {
        Self { stall, ..self }
    }

    /// With [`Options::inbound_batches`].
    pub fn with_inbound_batches(self, inbound_batches: usize) -> Self {
        Self {
            inbound_batches,
            ..self
        }
    }
}

/// What the connections tell their socket, in order per connection (numbered by `serial`).
#[derive(Debug)]
pub enum Event {
    /// A peer past its handshake, with the `Identity` it set in its READY, if any.
    Joined {
        serial: u64,
        addr: SocketAddr,
        identity: Option<Bytes>,
        outbox: Arc<Outbox>,
    },
    /// The messages one read brought.
    Messages { serial: u64, batch: Batch },
    /// The connection ended: closed, cut off, or refused by the caller.
    Left { serial: u64 },
}

/// Messages of one connection, holding their share of the socket's inbound byte budget until
/// dropped or taken apart.
#[derive(Debug)]
pub struct Batch {
    messages: Vec<ZmqMessage>,
    _budget: OwnedSemaphorePermit,
}

impl IntoIterator for Batch {
    type Item = ZmqMessage;
    type IntoIter = std::vec::IntoIter<ZmqMessage>;

    /// The messages; their bytes leave the budget now (the caller counts what it keeps).
    fn into_iter(self) -> Self::IntoIter {
        self.messages.into_iter()
    }
}

/// Encoded messages waiting for one peer's writer task.
#[derive(Debug)]
pub struct Outbox {
    buf: Mutex<BytesMut>,
    wake: Notify,
    /// Set when the connection ends or is cut: sends fail from then on. (Not `cut.is_cancelled()`,
    /// which takes a lock, on every send.)
    closed: AtomicBool,
    /// Bytes handed to the outbox and not yet written to the kernel: what [`flush`] waits for.
    unwritten: AtomicU64,
    /// Fires when the connection is to end: closed, cut off, evicted, or the socket stopped.
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

    /// Ends the connection; what is waiting is not sent.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.cut.cancel();
    }

    /// Whether the connection ended or is ending (sends fail).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Appends `size` bytes written by `put` and wakes the writer; or, if bytes are waiting
    /// already and these would take them over `limit`, closes the outbox (the connection is
    /// cut) and says how many were waiting.
    pub fn push(
        &self,
        size: usize,
        limit: u64,
        put: impl FnOnce(&mut BytesMut),
    ) -> Result<(), usize> {
        self.append(size, limit, put).inspect_err(|_| self.close())
    }

    /// Appends `encoded` as [`Outbox::push`] does, but drops it (`false`) instead of cutting the
    /// connection when it does not fit, or when the connection has ended.
    pub fn offer(&self, encoded: &[u8], limit: u64) -> bool {
        !self.is_closed()
            && self
                .append(encoded.len(), limit, |buf| buf.extend_from_slice(encoded))
                .is_ok()
    }

    /// Bytes waiting in the outbox, not yet taken by the writer.
    pub fn waiting(&self) -> usize {
        self.buf.lock().expect("outbox lock").len()
    }

    fn append(
        &self,
        size: usize,
        limit: u64,
        put: impl FnOnce(&mut BytesMut),
    ) -> Result<(), usize> {
        let mut buf = self.buf.lock().expect("outbox lock");
        let was_empty = buf.is_empty();
        if !was_empty && (buf.len() + size) as u64 > limit {
            return Err(buf.len());
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

    /// Appends a message of `frames` (MORE on all but the last); see [`Outbox::push`].
    pub fn push_message<'a>(
        &self,
        frames: impl ExactSizeIterator<Item = &'a Bytes> + Clone,
        limit: u64,
    ) -> Result<(), usize> {
        let size: usize = frames.clone().map(|f| f.len() + 9).sum();
        self.push(size, limit, |buf| super::put_message(buf, frames))
    }

    /// Appends a message of `frames` as [`Outbox::offer`] does (dropped if it does not fit).
    pub fn offer_message<'a>(
        &self,
        frames: impl ExactSizeIterator<Item = &'a Bytes> + Clone,
        limit: u64,
    ) -> bool {
        let size: usize = frames.clone().map(|f| f.len() + 9).sum();
        !self.is_closed()
            && self
                .append(size, limit, |buf| super::put_message(buf, frames))
                .is_ok()
    }

    /// Appends bytes already encoded; see [`Outbox::push`].
    pub fn push_encoded(&self, encoded: &[u8], limit: u64) -> Result<(), usize> {
        self.push(encoded.len(), limit, |buf| buf.extend_from_slice(encoded))
    }
}

/// Waits, `linger` at most, until what `outboxes` hold is written to the kernel: the last
/// messages of a socket that stops are not cut mid-frame when it is dropped.
pub async fn flush<'a>(outboxes: impl Iterator<Item = &'a Arc<Outbox>> + Clone, linger: Duration) {
    let until = tokio::time::Instant::now() + linger;
    while outboxes
        .clone()
        .any(|o| !o.is_closed() && o.unwritten.load(Relaxed) > 0)
    {
        if tokio::time::Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A bound socket's connections.
#[derive(Debug)]
pub struct Server {
    events: mpsc::Receiver<Event>,
    stats: Arc<GuardStats>,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
    /// Fires to stop accepting.
    accepting: CancellationToken,
    _stop: DropGuard,
}

impl Server {
    /// Serves on `listener` (its socket options are inherited by the connections).
    pub fn serve(listener: std::net::TcpListener, options: Options) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let (tx, events) = mpsc::channel(options.inbound_batches.max(1));
        let stop = CancellationToken::new();
        let accepting = stop.child_token();
        let stats = Arc::new(GuardStats::default());
        let message = usize::try_from(options.limits.max_message_bytes).unwrap_or(usize::MAX);
        let budget_bytes = INBOUND_BYTES
            .max(message.saturating_mul(2))
            .min(u32::MAX as usize);
        let shared = Shared {
            tx,
            options,
            stats: stats.clone(),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            connections: Arc::new(Connections::new(options.max_connections.max(1))),
        };
        tokio::spawn(accept(listener, shared, stop.clone(), accepting.clone()));
        Ok(Self {
            events,
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

    /// The next event; waits for one (for ever once the socket stopped). Cancel-safe.
    pub async fn recv(&mut self) -> Event {
        match self.events.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        }
    }

    /// The next event already here, if any.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Accepts no more connections.
    pub fn stop_accepting(&self) {
        self.accepting.cancel();
    }

    /// Counts a connection the caller refused (and closed), and logs why, throttled.
    pub fn refused(&self, addr: &SocketAddr, why: &dyn std::fmt::Display) {
        refused(&self.stats, addr, why);
    }

    /// Counts a peer cut off for not reading (its outbox full), and logs it, throttled.
    pub fn stalled(&self, peer: &dyn std::fmt::Display, waiting: usize) {
        self.stats.stalled.fetch_add(1, Relaxed);
        if let Some(held_back) = STALLED_LOG.check() {
            tracing::warn!(%peer, waiting, held_back, "peer not reading: cut off");
        }
    }
}

fn refused(stats: &GuardStats, addr: &SocketAddr, why: &dyn std::fmt::Display) {
    stats.refused.fetch_add(1, Relaxed);
    if let Some(held_back) = REFUSED_LOG.check() {
        tracing::info!(peer = %addr, error = %why, held_back, "connection refused");
    }
}

/// What every connection task of one socket shares.
#[derive(Debug, Clone)]
struct Shared {
    tx: mpsc::Sender<Event>,
    options: Options,
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
    /// Ends the connection (child of the socket's stop token).
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
    while let Some((stream, addr)) = super::accept(&listener, &accepting, "connection").await {
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
        refused(&self.shared.stats, &self.addr, error);
    }

    async fn run(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let options = &self.shared.options;
        let max_frame = usize::try_from(options.limits.max_message_bytes).unwrap_or(usize::MAX);
        let handshake = super::handshake(stream, options.socket_type, options.peers, max_frame);
        let peer = tokio::select! {
            () = self.open.cut.cancelled() => return,
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
                Ok(Ok(peer)) => peer,
                Ok(Err(e)) => return self.refused(&e),
                Err(_) => return self.refused(&"handshake not done in time"),
            },
        };
        self.shared.connections.heard(&self.open);
        let outbox = Arc::new(Outbox::new(self.open.cut.clone()));
        let joined = Event::Joined {
            serial: self.serial,
            addr: self.addr,
            identity: peer.identity,
            outbox: outbox.clone(),
        };
        if self.shared.tx.send(joined).await.is_err() {
            return;
        }
        let writer = tokio::spawn(write_loop(
            peer.write,
            outbox.clone(),
            self.shared.options.stall,
            self.shared.stats.clone(),
            self.addr,
        ));
        let mut reader = peer.reader;
        let ended = tokio::select! {
            ended = self.read_loop(&mut reader, &outbox) => ended,
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
        let left = Event::Left {
            serial: self.serial,
        };
        let _ = self.shared.tx.send(left).await;
        let _ = writer.await;
    }

    /// A publishing socket's peers subscribe with messages (ZMTP 3.0) or with SUBSCRIBE and
    /// CANCEL commands (3.1): the command as the message it stands for.
    fn subscription(&self, name: &[u8], prefix: &[u8]) -> Option<Bytes> {
        if !matches!(self.shared.options.socket_type, "PUB" | "XPUB") {
            return None;
        }
        let flag = match name {
            b"SUBSCRIBE" => 1u8,
            b"CANCEL" => 0u8,
            _ => return None,
        };
        Some([&[flag][..], prefix].concat().into())
    }

    /// Decodes every whole message in each read and hands them over in one batch.
    async fn read_loop(&self, reader: &mut Reader, outbox: &Outbox) -> std::io::Result<()> {
        let limits = &self.shared.options.limits;
        let mut parts: VecDeque<Bytes> = VecDeque::new();
        let mut size = 0u64;
        loop {
            let mut messages = Vec::new();
            let mut batch_bytes = 0;
            while let Some(frame) = reader.try_frame()? {
                if frame.is_command() {
                    let (name, body) = parse_command(&frame.body)?;
                    if let Some(change) = self.subscription(name, body) {
                        // A ZMTP 3.1 subscriber's command, handed over as a 3.0 message.
                        batch_bytes += change.len() + FRAME_OVERHEAD + MESSAGE_OVERHEAD;
                        messages.push(ZmqMessage::from(change));
                        continue;
                    }
                    if name == b"PING" && self.shared.options.stall.is_some() {
                        // Whether a peer reads is the writer's to judge: a PONG that does not
                        // fit is dropped, and a full outbox is no reason to cut.
                        outbox.offer(&super::pong(body), limits.max_peer_bytes);
                    } else if name == b"PING" {
                        // The PONGs a peer leaves unread count toward its byte bound.
                        let pong = super::pong(body);
                        if let Err(waiting) = outbox.push_encoded(&pong, limits.max_peer_bytes) {
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
                if parts.len() >= limits.max_frames as usize {
                    return Err(protocol_error("message of too many frames"));
                }
                let more = frame.more();
                parts.push_back(frame.body);
                if !more {
                    // What the message holds: its bytes, each frame's handle, its own.
                    batch_bytes += size as usize + parts.len() * FRAME_OVERHEAD + MESSAGE_OVERHEAD;
                    size = 0;
                    let frames = std::mem::replace(&mut parts, VecDeque::with_capacity(4));
                    messages.push(ZmqMessage::try_from(frames).expect("at least one frame"));
                }
            }
            if !messages.is_empty() {
                // Waits, reading nothing more, while the socket's batches in flight hold the
                // whole budget.
                let permits = batch_bytes.min(self.shared.budget_bytes) as u32;
                let Ok(budget) = self.shared.budget.clone().acquire_many_owned(permits).await
                else {
                    return Ok(());
                };
                let batch = Batch {
                    messages,
                    _budget: budget,
                };
                let event = Event::Messages {
                    serial: self.serial,
                    batch,
                };
                if self.shared.tx.send(event).await.is_err() {
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
/// outbox is closed (a peer cut off gets nothing more), or, with `stall`, when the peer stopped
/// reading (see [`Options::stall`]).
async fn write_loop(
    mut write: OwnedWriteHalf,
    outbox: Arc<Outbox>,
    stall: Option<Duration>,
    stats: Arc<GuardStats>,
    addr: SocketAddr,
) {
    let mut spare = BytesMut::new();
    let mut watch = reach::Watch::new(write.as_ref());
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
        let socket = write.as_ref().as_raw_fd();
        let written = write.write_all(&spare);
        tokio::pin!(written);
        let mut unreachable = false;
        let done = loop {
            let patience = tokio::time::sleep(stall.unwrap_or(Duration::MAX));
            tokio::select! {
                written = &mut written => break written.is_ok(),
                () = outbox.cut.cancelled() => break false,
                () = patience => match watch.check(&SocketFd(socket)) {
                    reach::Reach::Taking => {}
                    reach::Reach::Stopped => {
                        stats.stalled.fetch_add(1, Relaxed);
                        if let Some(held_back) = STALLED_LOG.check() {
                            tracing::warn!(peer = %addr, held_back, "peer stopped reading: cut off");
                        }
                        break false;
                    }
                    reach::Reach::Unreachable => {
                        if !std::mem::replace(&mut unreachable, true) {
                            stats.unreachable.fetch_add(1, Relaxed);
                            if let Some(held_back) = UNREACHABLE_LOG.check() {
                                tracing::warn!(peer = %addr, held_back, "peer unreachable: keeping its connection for when the link heals");
                            }
                        }
                    }
                },
            }
        };
        if !done {
            break;
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
