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

use bytes::Bytes;
use common::wire::{self, parse_command, protocol_error, Reader};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

pub use common::wire::encode;

/// Largest frame, and message, a subscriber may send (subscriptions are short).
pub const MAX_FRAME: usize = 64 * 1024;
/// Most frames in one message from a subscriber (a subscription is one frame): without a bound,
/// empty frames with MORE set would grow the message forever at no size.
pub const MAX_PARTS: usize = 64;
/// The socket types that may connect.
const SUBSCRIBERS: &[&[u8]] = &[b"SUB", b"XSUB"];
/// A writer gathers queued messages into one write up to about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;
/// How long a new connection has to complete its greeting and READY.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    while let Some((stream, addr)) = wire::accept(&listener, &stop, "subscriber").await {
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
    let handshake = wire::handshake(stream, "XPUB", SUBSCRIBERS, MAX_FRAME);
    let (mut reader, write) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(peer)) => (peer.reader, peer.write),
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
        if frame.is_command() {
            let (name, body) = parse_command(&frame.body)?;
            let msg = match name {
                b"PING" => {
                    let _ = replies.try_send(wire::pong(body));
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
        let more = frame.more();
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
    use bytes::{BufMut, BytesMut};
    use common::wire::{
        command, greeting, next_frame, Frame, FLAG_COMMAND, FLAG_LONG, FLAG_MORE, GREETING_LEN,
    };
    use tokio::io::AsyncReadExt;

    async fn read_frames(peer: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        while got.len() < n {
            match next_frame(buf, MAX_FRAME).expect("valid") {
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
}
