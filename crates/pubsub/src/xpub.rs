//! The proxy's XPUB side, written on the TCP streams themselves (ZMTP 3.0, NULL mechanism).
//!
//! zmq.rs's `XPubSocket::send` writes each message to each matching subscriber with its own
//! `sendto` (a flush per message, behind an async lock) and waits on a full subscriber; on
//! loopback each such call also runs the receiver's TCP stack, so the fanout spent its time in
//! the kernel and delivered 3 to 8 times less than libzmq's proxy. Here each subscriber has
//! its own bounded queue of encoded messages and a writer task that drains everything ready
//! into one buffer and writes it with one call: the busier the stream, the larger the batch.
//!
//! What stays as in a stock XPUB: the greeting and READY handshake with any SUB or XSUB
//! (libzmq, pyzmq, zmq.rs), subscriptions read from each connection and kept per connection
//! (`0x01`/`0x00` messages, and ZMTP 3.1 SUBSCRIBE/CANCEL commands), every message from a
//! subscriber handed to the proxy, PING answered with PONG. What differs:
//!
//! - A subscriber whose queue ([`PeerOptions::queue`] messages) is full misses updates, counted
//!   (`slow_dropped`), like libzmq's high-water mark; the others are never held.
//! - A subscriber whose socket has not taken a write for `stall_timeout` (it stopped reading)
//!   is cut (`shutdown(2)`, counted as `stalled_cut`); it reconnects when it wakes.
//! - Frames from subscribers are at most [`MAX_FRAME`] bytes and a message at most that in
//!   all, and [`MAX_PARTS`] frames: a larger header, or a flood of empty frames with MORE set,
//!   ends that connection before any memory is taken for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

/// Largest frame, and message, a subscriber may send (subscriptions are short).
pub const MAX_FRAME: usize = 64 * 1024;
/// Most frames in one message from a subscriber (a subscription is one frame): without a bound,
/// empty frames with MORE set would grow the message forever at no size.
pub const MAX_PARTS: usize = 64;
/// A writer gathers queued messages into one write up to about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;
/// How long a new connection has to complete its greeting and READY.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const GREETING_LEN: usize = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

/// Settings of every subscriber connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerOptions {
    /// Encoded messages waiting for one subscriber's socket, at most.
    pub queue: usize,
    /// A write that waits this long (the subscriber stopped reading) cuts the connection.
    pub stall_timeout: Duration,
}

/// Counters kept by the connection tasks.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub stalled_cut: AtomicU64,
    pub peer_errors: AtomicU64,
}

/// What the connection tasks tell the fanout, in order per connection.
#[derive(Debug)]
pub enum PeerEvent {
    /// Handshake done: queue encoded messages (see [`encode`]) for it on `queue`.
    Joined {
        id: u64,
        addr: SocketAddr,
        queue: mpsc::Sender<Bytes>,
    },
    /// A message from it (a subscription, or anything else it sent).
    Message { id: u64, msg: ZmqMessage },
    /// Its connection ended.
    Left { id: u64 },
}

/// One message in ZMTP 3 wire form, encoded once and shared by every subscriber it goes to.
pub fn encode(msg: &ZmqMessage) -> Bytes {
    let frames = msg.iter().collect::<Vec<_>>();
    let size: usize = frames.iter().map(|f| f.len() + 9).sum();
    let mut out = BytesMut::with_capacity(size);
    for (i, frame) in frames.iter().enumerate() {
        let more = if i + 1 < frames.len() { FLAG_MORE } else { 0 };
        put_frame(&mut out, more, frame);
    }
    out.freeze()
}

fn put_frame(out: &mut BytesMut, flags: u8, body: &[u8]) {
    match u8::try_from(body.len()) {
        Ok(len) => {
            out.put_u8(flags);
            out.put_u8(len);
        }
        Err(_) => {
            out.put_u8(flags | FLAG_LONG);
            out.put_u64(body.len() as u64);
        }
    }
    out.put_slice(body);
}

fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[8] = 0x01;
    g[9] = 0x7f;
    g[10] = 3; // ZMTP 3.0: libzmq then sends subscriptions as 0x01/0x00 messages
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn command(name: &str, body: &[u8]) -> Bytes {
    let mut cmd = BytesMut::new();
    cmd.put_u8(name.len() as u8);
    cmd.put_slice(name.as_bytes());
    cmd.put_slice(body);
    let mut out = BytesMut::new();
    put_frame(&mut out, FLAG_COMMAND, &cmd);
    out.freeze()
}

fn ready() -> Bytes {
    let mut props = BytesMut::new();
    props.put_u8(b"Socket-Type".len() as u8);
    props.put_slice(b"Socket-Type");
    props.put_u32(4);
    props.put_slice(b"XPUB");
    command("READY", &props)
}

fn protocol_error(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// One frame read from a subscriber.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    flags: u8,
    body: Bytes,
}

/// Takes one whole frame off the front of `buf`, if there is one. A header announcing more
/// than [`MAX_FRAME`] is an error at once.
fn next_frame(buf: &mut BytesMut) -> std::io::Result<Option<Frame>> {
    let Some(&flags) = buf.first() else {
        return Ok(None);
    };
    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
        return Err(protocol_error(format!("bad frame flags {flags:#04x}")));
    }
    let (header, len) = if flags & FLAG_LONG != 0 {
        if buf.len() < 9 {
            return Ok(None);
        }
        let len = u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"));
        (9, usize::try_from(len).unwrap_or(usize::MAX))
    } else {
        if buf.len() < 2 {
            return Ok(None);
        }
        (2, usize::from(buf[1]))
    };
    if len > MAX_FRAME {
        return Err(protocol_error(format!("frame of {len} bytes")));
    }
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    buf.advance(header);
    Ok(Some(Frame {
        flags,
        body: buf.split_to(len).freeze(),
    }))
}

/// Reads frames from one connection.
struct Reader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    async fn frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = next_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }
}

/// A command's name and body.
fn parse_command(body: &Bytes) -> std::io::Result<(&[u8], &[u8])> {
    let len = usize::from(
        *body
            .first()
            .ok_or_else(|| protocol_error("empty command"))?,
    );
    if body.len() < 1 + len {
        return Err(protocol_error("command name past its frame"));
    }
    Ok((&body[1..1 + len], &body[1 + len..]))
}

/// The value of property `name` in a READY command's body.
fn property<'a>(mut props: &'a [u8], name: &[u8]) -> std::io::Result<Option<&'a [u8]>> {
    let bad = || protocol_error("bad READY properties");
    while let Some((&len, rest)) = props.split_first() {
        let len = usize::from(len);
        let key = rest.get(..len).ok_or_else(bad)?;
        let rest = &rest[len..];
        let size = rest.get(..4).ok_or_else(bad)?;
        let size = u32::from_be_bytes(size.try_into().expect("4 bytes")) as usize;
        let value = rest.get(4..4 + size).ok_or_else(bad)?;
        if key.eq_ignore_ascii_case(name) {
            return Ok(Some(value));
        }
        props = &rest[4 + size..];
    }
    Ok(None)
}

/// Greeting and READY; returns the reader, positioned after the peer's READY.
async fn handshake(stream: TcpStream) -> std::io::Result<(Reader, OwnedWriteHalf)> {
    let (mut read, mut write) = stream.into_split();
    write.write_all(&greeting()).await?;
    write.write_all(&ready()).await?;
    let mut theirs = [0u8; GREETING_LEN];
    read.read_exact(&mut theirs).await?;
    if theirs[0] != 0xff || theirs[9] & 0x01 != 0x01 {
        return Err(protocol_error("not a ZMTP greeting"));
    }
    if theirs[10] < 3 {
        return Err(protocol_error(format!("ZMTP {}.x peer", theirs[10])));
    }
    if !theirs[12..32].starts_with(b"NULL\0") {
        return Err(protocol_error("security mechanism other than NULL"));
    }
    let mut reader = Reader {
        read,
        buf: BytesMut::with_capacity(4096),
    };
    let frame = reader
        .frame()
        .await?
        .ok_or_else(|| protocol_error("closed before READY"))?;
    let (name, props) = parse_command(&frame.body)?;
    if frame.flags & FLAG_COMMAND == 0 || name != b"READY" {
        return Err(protocol_error("first frame is not READY"));
    }
    match property(props, b"Socket-Type")? {
        Some(b"SUB" | b"XSUB") => Ok((reader, write)),
        Some(other) => Err(protocol_error(format!(
            "a {} cannot subscribe",
            String::from_utf8_lossy(other)
        ))),
        None => Err(protocol_error("READY without Socket-Type")),
    }
}

/// Accepts subscribers until `stop`; each connection gets a reader task (this function's
/// child) and a writer task.
pub async fn serve(
    listener: TcpListener,
    events: mpsc::Sender<PeerEvent>,
    options: PeerOptions,
    counters: Arc<PeerCounters>,
    stop: CancellationToken,
) {
    let mut next_id = 0u64;
    loop {
        let (stream, addr) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a subscriber");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        next_id += 1;
        let (id, events, counters, stop) =
            (next_id, events.clone(), counters.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = connection(id, stream, addr, events, options, counters) => {}
            }
        });
    }
}

async fn connection(
    id: u64,
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<PeerEvent>,
    options: PeerOptions,
    counters: Arc<PeerCounters>,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, write) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream)).await
    {
        Ok(Ok(halves)) => halves,
        Ok(Err(e)) => {
            counters.peer_errors.fetch_add(1, Relaxed);
            tracing::info!(peer = %addr, error = %e, "subscriber handshake failed");
            return;
        }
        Err(_) => {
            counters.peer_errors.fetch_add(1, Relaxed);
            tracing::info!(peer = %addr, "subscriber handshake timed out");
            return;
        }
    };
    let (queue, queued) = mpsc::channel(options.queue.max(1));
    // Commands to send (PONG) go through the same queue, in order with updates.
    let replies = queue.clone();
    if events
        .send(PeerEvent::Joined { id, addr, queue })
        .await
        .is_err()
    {
        return;
    }
    let cut = CancellationToken::new();
    let stall = Stall::default();
    let writer = tokio::spawn(write_loop(
        write,
        queued,
        addr,
        options.stall_timeout,
        counters.clone(),
        stall.clone(),
        cut.clone(),
    ));
    let ended = tokio::select! {
        ended = read_loop(id, &mut reader, &events, &replies) => ended,
        // The writer cut a stalled peer or failed: its reads end too.
        () = cut.cancelled() => Ok(()),
    };
    match ended {
        // The kernel's user timeout (the stall timeout) ended the connection: the reads may see
        // it before the writer does.
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => stall.cut(&counters, addr, "kernel"),
        Err(e) => {
            counters.peer_errors.fetch_add(1, Relaxed);
            tracing::info!(peer = %addr, error = %e, "subscriber connection failed");
        }
        Ok(()) => {}
    }
    let _ = events.send(PeerEvent::Left { id }).await;
    drop(replies);
    writer.abort();
}

async fn read_loop(
    id: u64,
    reader: &mut Reader,
    events: &mpsc::Sender<PeerEvent>,
    replies: &mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut parts: Option<ZmqMessage> = None;
    let mut size = 0;
    while let Some(frame) = reader.frame().await? {
        if frame.flags & FLAG_COMMAND != 0 {
            let (name, body) = parse_command(&frame.body)?;
            let msg = match name {
                b"PING" => {
                    // Context after the 2-byte TTL, echoed back.
                    let context = body.get(2..).unwrap_or_default();
                    let _ = replies.try_send(command("PONG", context));
                    continue;
                }
                b"SUBSCRIBE" => [&[1u8][..], body].concat(),
                b"CANCEL" => [&[0u8][..], body].concat(),
                _ => continue, // PONG, ERROR, properties...: nothing to do
            };
            parts = None;
            size = 0;
            let msg = ZmqMessage::from(Bytes::from(msg));
            if events.send(PeerEvent::Message { id, msg }).await.is_err() {
                return Ok(());
            }
            continue;
        }
        size += frame.body.len();
        if size > MAX_FRAME {
            return Err(protocol_error(format!("message of over {MAX_FRAME} bytes")));
        }
        let more = frame.flags & FLAG_MORE != 0;
        match &mut parts {
            Some(msg) if msg.len() >= MAX_PARTS => {
                return Err(protocol_error(format!(
                    "message of over {MAX_PARTS} frames"
                )));
            }
            Some(msg) => msg.push_back(frame.body),
            None => parts = Some(ZmqMessage::from(frame.body)),
        }
        if !more {
            size = 0;
            if let Some(msg) = parts.take() {
                if events.send(PeerEvent::Message { id, msg }).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Whether a connection was cut as stalled, so that it is counted once, by its reads or its
/// writer, whichever sees it first.
#[derive(Debug, Clone, Default)]
struct Stall(Arc<std::sync::atomic::AtomicBool>);

impl Stall {
    fn cut(&self, counters: &PeerCounters, addr: SocketAddr, by: &str) {
        if !self.0.swap(true, Relaxed) {
            counters.stalled_cut.fetch_add(1, Relaxed);
            tracing::warn!(peer = %addr, by, "subscriber stopped reading: cut");
        }
    }
}

/// Drains the queue into one buffer per write. A write that cannot progress for
/// `stall_timeout` cuts the connection.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut queued: mpsc::Receiver<Bytes>,
    addr: SocketAddr,
    stall_timeout: Duration,
    counters: Arc<PeerCounters>,
    stall: Stall,
    cut: CancellationToken,
) {
    let mut batch = Vec::with_capacity(1024);
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    while queued.recv_many(&mut batch, 1024).await > 0 {
        for msg in batch.drain(..) {
            buf.extend_from_slice(&msg);
        }
        while buf.len() < WRITE_BATCH {
            match queued.try_recv() {
                Ok(msg) => buf.extend_from_slice(&msg),
                Err(_) => break,
            }
        }
        match tokio::time::timeout(stall_timeout, write.write_all(&buf)).await {
            Ok(Ok(())) => buf.clear(),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                // The kernel's user timeout (the listener's, = stall timeout) came first.
                stall.cut(&counters, addr, "kernel");
                break;
            }
            Ok(Err(e)) => {
                tracing::info!(peer = %addr, error = %e, "subscriber gone");
                break;
            }
            Err(_) => {
                stall.cut(&counters, addr, "stall timeout");
                let _ = socket2::SockRef::from(write.as_ref()).shutdown(std::net::Shutdown::Both);
                break;
            }
        }
    }
    cut.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_short_and_long_frames() {
        let mut msg = ZmqMessage::from(Bytes::from_static(b"10001"));
        msg.push_back(Bytes::from(vec![b'x'; 300]));
        let wire = encode(&msg);
        assert_eq!(&wire[..7], b"\x01\x0510001");
        assert_eq!(wire[7], FLAG_LONG);
        assert_eq!(&wire[8..16], &300u64.to_be_bytes());
        assert_eq!(wire.len(), 7 + 9 + 300);
    }

    #[test]
    fn decodes_frames_split_anywhere() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, FLAG_MORE, b"\x01a");
        put_frame(&mut wire, 0, &[7u8; 400]);
        let wire = wire.freeze();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = next_frame(&mut buf).expect("valid") {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = next_frame(&mut buf).expect("valid") {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].body.as_ref(), b"\x01a");
            assert_eq!(got[1].body.len(), 400);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn refuses_a_huge_header_before_its_body() {
        let mut buf = BytesMut::from(&[FLAG_LONG, 0x7f, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(next_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&[0x80, 1][..]);
        assert!(next_frame(&mut buf).is_err(), "unknown flag bits");
    }

    async fn read_frames(peer: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        while got.len() < n {
            match next_frame(buf).expect("valid") {
                Some(f) => got.push(f),
                None => {
                    let read = tokio::time::timeout(Duration::from_secs(5), peer.read_buf(buf));
                    assert!(read.await.expect("a frame within 5 s").expect("read") > 0);
                }
            }
        }
        got
    }

    /// A raw ZMTP peer against [`serve`]: handshake, a ZMTP 3.1 SUBSCRIBE command, PING, an
    /// update delivered, then a frame header over the limit ends the connection.
    #[tokio::test]
    async fn serves_a_raw_zmtp_subscriber() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (events_tx, mut events) = mpsc::channel(16);
        let counters = Arc::new(PeerCounters::default());
        let stop = CancellationToken::new();
        let options = PeerOptions {
            queue: 16,
            stall_timeout: Duration::from_secs(5),
        };
        tokio::spawn(serve(
            listener,
            events_tx,
            options,
            counters.clone(),
            stop.clone(),
        ));

        let mut peer = TcpStream::connect(addr).await.expect("connect");
        let mut theirs = [0u8; GREETING_LEN];
        peer.read_exact(&mut theirs).await.expect("greeting");
        assert_eq!((theirs[0], theirs[9], theirs[10]), (0xff, 0x7f, 3));
        let mut sub_ready = BytesMut::new();
        sub_ready.put_u8(11);
        sub_ready.put_slice(b"Socket-Type");
        sub_ready.put_u32(3);
        sub_ready.put_slice(b"SUB");
        peer.write_all(&greeting()).await.expect("write");
        peer.write_all(&command("READY", &sub_ready))
            .await
            .expect("write");
        let mut buf = BytesMut::new();
        let ready = read_frames(&mut peer, &mut buf, 1).await;
        assert_eq!(parse_command(&ready[0].body).expect("command").0, b"READY");

        let PeerEvent::Joined { id, queue, .. } = events.recv().await.expect("joined") else {
            panic!("not joined first");
        };
        peer.write_all(&command("SUBSCRIBE", b"10001"))
            .await
            .expect("write");
        match events.recv().await.expect("message") {
            PeerEvent::Message { id: from, msg } => {
                assert_eq!(from, id);
                assert_eq!(msg.get(0).map(|f| f.as_ref()), Some(&b"\x0110001"[..]));
            }
            other => panic!("{other:?}"),
        }
        peer.write_all(&command("PING", b"\x00\x0aabc"))
            .await
            .expect("write");
        let pong = read_frames(&mut peer, &mut buf, 1).await;
        assert_eq!(pong[0].flags, FLAG_COMMAND);
        assert_eq!(
            parse_command(&pong[0].body).expect("pong"),
            (&b"PONG"[..], &b"abc"[..])
        );
        let mut update = ZmqMessage::from(Bytes::from_static(b"10001"));
        update.push_back(Bytes::from_static(b"body"));
        queue.send(encode(&update)).await.expect("queued");
        let got = read_frames(&mut peer, &mut buf, 2).await;
        assert_eq!(
            (got[0].flags, got[0].body.as_ref()),
            (FLAG_MORE, &b"10001"[..])
        );
        assert_eq!((got[1].flags, got[1].body.as_ref()), (0, &b"body"[..]));

        // A header announcing 16 MiB: the connection ends before any body is sent.
        let mut huge = vec![FLAG_LONG];
        huge.extend_from_slice(&(16u64 << 20).to_be_bytes());
        peer.write_all(&huge).await.expect("write");
        let left = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert!(matches!(left, Ok(Some(PeerEvent::Left { id: left })) if left == id));
        assert_eq!(counters.peer_errors.load(Relaxed), 1);
        stop.cancel();
    }

    #[test]
    fn reads_ready_properties() {
        let ready = ready();
        let mut buf = BytesMut::from(&ready[..]);
        let frame = next_frame(&mut buf).expect("valid").expect("whole");
        assert_eq!(frame.flags, FLAG_COMMAND);
        let (name, props) = parse_command(&frame.body).expect("command");
        assert_eq!(name, b"READY");
        assert_eq!(
            property(props, b"socket-type").expect("props"),
            Some(&b"XPUB"[..])
        );
        assert_eq!(property(props, b"Identity").expect("props"), None);
        assert!(property(&[20, b'a'], b"x").is_err());
    }
}
