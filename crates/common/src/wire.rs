//! ZMTP 3 (NULL mechanism) on a TCP stream, for the server sides we write ourselves instead of
//! using zmq.rs's sockets. The one home of that layer:
//!
//! - here: encoding, decoding with a size limit checked on each frame header before any memory
//!   is taken for the body, and the greeting and READY handshake with any libzmq, pyzmq or
//!   zmq.rs peer;
//! - [`server`]: a bound socket's connections (the bound on them, reader and writer tasks, the
//!   byte budgets, the limits), whatever the socket type;
//! - one file per socket type on top: [`router`] (the broker's frontend and backend), [`xsub`]
//!   (the proxy's side facing publishers). The proxy's XPUB (`pubsub::xpub`) still has its own
//!   connection code.
//!
//! [`crate::zmtp`] has the raw bytes tests and the fuzzer attack with.

pub mod router;
pub mod server;
pub mod xsub;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use zeromq::ZmqMessage;

pub const GREETING_LEN: usize = 64;
pub const FLAG_MORE: u8 = 0x01;
pub const FLAG_LONG: u8 = 0x02;
pub const FLAG_COMMAND: u8 = 0x04;

/// Appends one frame: flags (LONG added when the body needs it), size, body.
pub fn put_frame(out: &mut BytesMut, flags: u8, body: &[u8]) {
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

/// Appends a message's frames, MORE on all but the last.
pub fn put_message<'a>(out: &mut BytesMut, frames: impl ExactSizeIterator<Item = &'a Bytes>) {
    let last = frames.len().saturating_sub(1);
    for (i, frame) in frames.enumerate() {
        put_frame(out, if i < last { FLAG_MORE } else { 0 }, frame);
    }
}

/// One message in wire form, encoded once (the proxy shares it among subscribers).
pub fn encode(msg: &ZmqMessage) -> Bytes {
    let size: usize = msg.iter().map(|f| f.len() + 9).sum();
    let mut out = BytesMut::with_capacity(size);
    put_message(&mut out, msg.iter());
    out.freeze()
}

/// Our greeting: ZMTP 3.0, NULL mechanism. (3.0, not 3.1: a libzmq subscriber then sends its
/// subscriptions as `0x01`/`0x00` messages, which every peer understands.)
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[8] = 0x01;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// A command frame.
pub fn command(name: &str, body: &[u8]) -> Bytes {
    let mut cmd = BytesMut::with_capacity(1 + name.len() + body.len());
    cmd.put_u8(name.len() as u8);
    cmd.put_slice(name.as_bytes());
    cmd.put_slice(body);
    let mut out = BytesMut::new();
    put_frame(&mut out, FLAG_COMMAND, &cmd);
    out.freeze()
}

/// The PONG that answers a PING whose command body is `ping`: its context (after the 2-byte
/// TTL) echoed, 16 bytes at most (RFC 37), so that a peer sending large PINGs and reading
/// nothing cannot make the answers it leaves unread outgrow what it sends.
pub fn pong(ping: &[u8]) -> Bytes {
    let context = ping.get(2..).unwrap_or_default();
    command("PONG", &context[..context.len().min(16)])
}

/// READY with our `Socket-Type`.
pub fn ready(socket_type: &str) -> Bytes {
    let mut props = BytesMut::new();
    props.put_u8(b"Socket-Type".len() as u8);
    props.put_slice(b"Socket-Type");
    props.put_u32(socket_type.len() as u32);
    props.put_slice(socket_type.as_bytes());
    command("READY", &props)
}

pub fn protocol_error(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// One frame read from a peer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub flags: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn is_command(&self) -> bool {
        self.flags & FLAG_COMMAND != 0
    }

    pub fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

/// Takes one whole frame off the front of `buf`, if there is one. A header announcing more
/// than `max_frame` bytes is an error at once.
pub fn next_frame(buf: &mut BytesMut, max_frame: usize) -> std::io::Result<Option<Frame>> {
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
    if len > max_frame {
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
#[derive(Debug)]
pub struct Reader {
    read: OwnedReadHalf,
    buf: BytesMut,
    max_frame: usize,
}

impl Reader {
    /// The next frame, waiting for it; `None` at a clean end of the stream.
    pub async fn frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The next frame already read, if whole.
    pub fn try_frame(&mut self) -> std::io::Result<Option<Frame>> {
        next_frame(&mut self.buf, self.max_frame)
    }

    /// Reads what the socket has; false at a clean end of the stream.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(16 * 1024);
        }
        if self.read.read_buf(&mut self.buf).await? == 0 {
            return if self.buf.is_empty() {
                Ok(false)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        Ok(true)
    }
}

/// A command's name and body.
pub fn parse_command(body: &Bytes) -> std::io::Result<(&[u8], &[u8])> {
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
pub fn property<'a>(mut props: &'a [u8], name: &[u8]) -> std::io::Result<Option<&'a [u8]>> {
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

/// A peer past the handshake.
#[derive(Debug)]
pub struct Handshaken {
    pub reader: Reader,
    pub write: OwnedWriteHalf,
    /// The peer's `Identity` property (ROUTER routing id), if it set a non-empty one.
    pub identity: Option<Bytes>,
}

/// Greeting and READY as a `socket_type` server that talks to the `peers` types; frames of
/// more than `max_frame` bytes end the connection from then on.
pub async fn handshake(
    stream: TcpStream,
    socket_type: &str,
    peers: &[&[u8]],
    max_frame: usize,
) -> std::io::Result<Handshaken> {
    let (mut read, mut write) = stream.into_split();
    write.write_all(&greeting()).await?;
    write.write_all(&ready(socket_type)).await?;
    // Checked as it comes: a peer that sends a few wrong bytes and waits is refused at once.
    let mut theirs = [0u8; GREETING_LEN];
    let mut have = 0;
    while have < GREETING_LEN {
        let n = read.read(&mut theirs[have..]).await?;
        if n == 0 {
            return Err(protocol_error(format!(
                "greeting cut short after {have} bytes"
            )));
        }
        have += n;
        if theirs[0] != 0xff || (have > 9 && theirs[9] & 0x01 != 0x01) {
            return Err(protocol_error("not a ZMTP greeting"));
        }
        if have > 10 && theirs[10] < 3 {
            return Err(protocol_error(format!("ZMTP {}.x peer", theirs[10])));
        }
    }
    if !theirs[12..32].starts_with(b"NULL\0") {
        return Err(protocol_error("security mechanism other than NULL"));
    }
    let mut reader = Reader {
        read,
        buf: BytesMut::with_capacity(16 * 1024),
        max_frame,
    };
    let frame = reader
        .frame()
        .await?
        .ok_or_else(|| protocol_error("closed before READY"))?;
    let (name, props) = parse_command(&frame.body)?;
    if !frame.is_command() || name != b"READY" {
        return Err(protocol_error("first frame is not READY"));
    }
    match property(props, b"Socket-Type")? {
        Some(theirs) if peers.contains(&theirs) => {}
        Some(other) => {
            return Err(protocol_error(format!(
                "a {} cannot talk to a {socket_type}",
                String::from_utf8_lossy(other)
            )))
        }
        None => return Err(protocol_error("READY without Socket-Type")),
    }
    let identity = property(props, b"Identity")?
        .filter(|id| !id.is_empty())
        .map(Bytes::copy_from_slice);
    Ok(Handshaken {
        reader,
        write,
        identity,
    })
}

/// The next connection on `listener`, or `None` once `stop` fires. A failed accept (out of
/// descriptors, say) is logged and retried 100 ms later.
pub async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a {what}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
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
            while let Some(f) = next_frame(&mut buf, 1024).expect("valid") {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = next_frame(&mut buf, 1024).expect("valid") {
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
        assert!(next_frame(&mut buf, 1 << 20).is_err());
        let mut buf = BytesMut::from(&[0x80, 1][..]);
        assert!(next_frame(&mut buf, 1 << 20).is_err(), "unknown flag bits");
    }

    #[test]
    fn a_pong_echoes_16_bytes_of_context_at_most() {
        let body = |context: &[u8]| [&b"\x00\x0a"[..], context].concat();
        for (context, echoed) in [(&b"abc"[..], &b"abc"[..]), (&[7u8; 40][..], &[7u8; 16][..])] {
            let pong = pong(&body(context));
            let mut buf = BytesMut::from(&pong[..]);
            let frame = next_frame(&mut buf, 1024).expect("valid").expect("whole");
            assert_eq!(
                parse_command(&frame.body).expect("command"),
                (&b"PONG"[..], echoed)
            );
        }
    }

    #[test]
    fn reads_ready_properties() {
        let ready = ready("XPUB");
        let mut buf = BytesMut::from(&ready[..]);
        let frame = next_frame(&mut buf, 1024).expect("valid").expect("whole");
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
