//! An XPUB socket on our own ZMTP connections ([`super::server`]): the proxy's side facing
//! subscribers.
//!
//! What stays as in a stock XPUB: any SUB or XSUB peer (libzmq, pyzmq, zmq.rs); its
//! subscriptions handed over as messages (`0x01` or `0x00`, then the prefix; a ZMTP 3.1 peer's
//! SUBSCRIBE and CANCEL commands arrive as the same messages), and anything else it sends as it
//! came; a subscriber that cannot take an update misses it, as at libzmq's high-water mark.
//! What the caller does with subscriptions (matching, releasing a connection's when it ends) is
//! its own.
//!
//! What differs: every limit of the server layer, on every endpoint; the high-water mark is in
//! bytes (`max_peer_bytes` waiting per subscriber); and a subscriber whose writes have waited
//! `stall` is cut only if it stopped reading. One that cannot be reached keeps its connection,
//! which carries on when the link heals: a stock SUB sends nothing, and would never learn of
//! a cut made during a partition (see [`super::reach`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{Event, Options, Outbox, Server};

/// The socket types that may connect: subscribers.
const SUBSCRIBERS: &[&[u8]] = &[b"SUB", b"XSUB"];

/// A bound XPUB.
#[derive(Debug)]
pub struct XPub {
    server: Server,
    limit: u64,
    /// The endpoint subscribers connect to (port 0 resolved).
    pub endpoint: String,
}

impl XPub {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once; see the module's notes for `limits` and `stall`.
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
        stall: Duration,
    ) -> std::io::Result<Self> {
        let options =
            Options::new("XPUB", SUBSCRIBERS, limits, max_connections).with_stall(Some(stall));
        let server = Server::serve(listener, options)?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            server,
            limit: limits.max_peer_bytes,
        })
    }

    /// Connections refused, cut off for not reading, kept while unreachable, evicted and turned
    /// away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        self.server.stats()
    }

    /// The next event: a subscriber joined (with its outbox), sent messages, or left. Waits for
    /// one. Cancel-safe.
    pub async fn recv(&mut self) -> Event {
        self.server.recv().await
    }

    /// The next event already here, if any.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.server.try_recv()
    }

    /// Queues a message of `frames` for one subscriber; false if it missed it (no room, or
    /// gone).
    pub fn send<'a>(
        &self,
        to: &Outbox,
        frames: impl ExactSizeIterator<Item = &'a Bytes> + Clone,
    ) -> bool {
        to.offer_message(frames, self.limit)
    }

    /// Waits, `linger` at most, until what `outboxes` hold is written to the kernel.
    pub async fn flush<'a>(
        &self,
        outboxes: impl Iterator<Item = &'a Arc<Outbox>> + Clone,
        linger: Duration,
    ) {
        super::server::flush(outboxes, linger).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        command, greeting, next_frame, parse_command, Frame, FLAG_COMMAND, FLAG_LONG, FLAG_MORE,
        GREETING_LEN,
    };
    use bytes::{BufMut, BytesMut};
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use zeromq::ZmqMessage;

    async fn read_frames(peer: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        while got.len() < n {
            match next_frame(buf, 1 << 20).expect("valid") {
                Some(f) => got.push(f),
                None => {
                    let read = tokio::time::timeout(Duration::from_secs(5), peer.read_buf(buf));
                    assert!(read.await.expect("a frame within 5 s").expect("read") > 0);
                }
            }
        }
        got
    }

    /// A SUB in raw bytes, past its handshake, and what it read beyond.
    async fn raw_sub(addr: &str) -> (TcpStream, BytesMut) {
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
        (peer, buf)
    }

    fn first(event: Event) -> (u64, ZmqMessage) {
        match event {
            Event::Messages { serial, batch } => {
                let mut all = batch.into_iter();
                (serial, all.next().expect("a message"))
            }
            other => panic!("not a message: {other:?}"),
        }
    }

    /// A raw ZMTP peer: handshake as a SUB, a ZMTP 3.1 SUBSCRIBE command handed over as the
    /// 3.0 message, PING answered, an update delivered, then a frame header over the limit
    /// ends the connection (counted `refused`).
    #[tokio::test]
    async fn serves_a_raw_zmtp_subscriber() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 64,
            max_peer_bytes: 1 << 20,
        };
        let mut xpub = XPub::serve(listener, limits, 16, Duration::from_secs(2)).expect("serve");
        let addr = xpub.endpoint.trim_start_matches("tcp://").to_string();

        let (mut peer, mut buf) = raw_sub(&addr).await;

        let Event::Joined { serial, outbox, .. } = xpub.recv().await else {
            panic!("not joined first");
        };
        peer.write_all(&command("SUBSCRIBE", b"10001"))
            .await
            .expect("write");
        let (from, msg) = first(xpub.recv().await);
        assert_eq!(from, serial);
        assert_eq!(msg.get(0).map(|f| f.as_ref()), Some(&b"\x0110001"[..]));

        peer.write_all(&command("PING", b"\x00\x0aabc"))
            .await
            .expect("write");
        let pong = read_frames(&mut peer, &mut buf, 1).await;
        assert_eq!(pong[0].flags, FLAG_COMMAND);
        assert_eq!(
            parse_command(&pong[0].body).expect("pong"),
            (&b"PONG"[..], &b"abc"[..])
        );
        let update = [Bytes::from_static(b"10001"), Bytes::from_static(b"body")];
        assert!(xpub.send(&outbox, update.iter()));
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
        let left = tokio::time::timeout(Duration::from_secs(5), xpub.recv()).await;
        assert!(matches!(left, Ok(Event::Left { serial: left }) if left == serial));
        assert_eq!(xpub.stats().refused.load(Relaxed), 1);
    }

    /// A subscriber that never reads: its outbox fills and what does not fit is dropped (the
    /// connection is kept); after `stall` without progress, its kernel still acknowledging, it
    /// is cut (counted `stalled`), never counted `unreachable`.
    #[tokio::test]
    async fn a_subscriber_that_stops_reading_misses_updates_then_is_cut() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let limits = Limits {
            max_message_bytes: 64 * 1024,
            max_frames: 64,
            max_peer_bytes: 256 * 1024,
        };
        let stall = Duration::from_millis(500);
        let mut xpub = XPub::serve(listener, limits, 16, stall).expect("serve");
        let addr = xpub.endpoint.trim_start_matches("tcp://").to_string();
        // Past its handshake, it never reads again.
        let (sub, _) = raw_sub(&addr).await;
        let Event::Joined { serial, outbox, .. } = xpub.recv().await else {
            panic!("not joined first");
        };
        let body = Bytes::from(vec![7u8; 16 * 1024]);
        let frames = [Bytes::from_static(b"t"), body];
        let mut dropped = 0;
        for _ in 0..2_000 {
            if !xpub.send(&outbox, frames.iter()) {
                dropped += 1;
            }
            tokio::task::yield_now().await;
        }
        assert!(dropped > 0, "a peer that never reads missed nothing");
        let left = tokio::time::timeout(stall * 10, xpub.recv()).await;
        assert!(
            matches!(left, Ok(Event::Left { serial: left }) if left == serial),
            "{left:?}"
        );
        assert_eq!(xpub.stats().stalled(), 1);
        assert_eq!(xpub.stats().unreachable(), 0);
        drop(sub);
    }
}
