//! ZMTP 3 (NULL mechanism) on a TCP stream, for the server sides we write ourselves instead of
//! using zmq.rs's sockets. The one home of that layer:
//!
//! - here: encoding, decoding with a size limit checked on each frame header before any memory
//!   is taken for the body, and the greeting and READY handshake with any libzmq, pyzmq or
//!   zmq.rs peer;
//! - [`server`]: a bound socket's connections (the bound on them, reader and writer tasks, the
//!   byte budgets, the limits), whatever the socket type;
//! - one file per socket type on top: [`router`] (the broker's frontend and backend), [`xsub`]
//!   (the proxy's side facing publishers), [`xpub`] (its side facing subscribers), and the
//!   pipeline master's [`push`] (tasks, on the connection the caller chooses), [`pull`] (reports,
//!   with the connection each came by) and [`publish`] (control);
//! - [`limits`]: what a peer may send and make a socket hold, and the counters of what each
//!   socket refused;
//! - [`reach`]: whether a peer whose writes wait stopped reading or cannot be reached.
//!
//! [`crate::zmtp`] has the raw bytes tests and the fuzzer attack with.

pub mod limits;
pub mod publish;
pub mod pull;
pub mod push;
pub mod reach;
pub mod router;
pub mod server;
pub mod xpub;
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

/// Why a frame header is refused.
#[derive(Debug, Clone, Copy)]
enum Refused {
    Flags(u8),
    Size(u64),
}

impl From<Refused> for std::io::Error {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Flags(flags) => protocol_error(format!("bad frame flags {flags:#04x}")),
            Refused::Size(len) => protocol_error(format!("frame of {len} bytes")),
        }
    }
}

/// Flags, header length and body length of the frame whose header starts `buf`, if the header
/// is whole. A header announcing more than `max_frame` bytes is refused at once, before any
/// memory is taken for its body.
#[inline]
fn header(buf: &[u8], max_frame: usize) -> Result<Option<(u8, usize, usize)>, Refused> {
    let Some(&flags) = buf.first() else {
        return Ok(None);
    };
    if flags & !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND) != 0 {
        return Err(Refused::Flags(flags));
    }
    let (header, len) = if flags & FLAG_LONG != 0 {
        let Some(size) = buf.get(1..9) else {
            return Ok(None);
        };
        (9, u64::from_be_bytes(size.try_into().expect("8 bytes")))
    } else {
        let Some(&len) = buf.get(1) else {
            return Ok(None);
        };
        (2, u64::from(len))
    };
    match usize::try_from(len) {
        Ok(len) if len <= max_frame => Ok(Some((flags, header, len))),
        _ => Err(Refused::Size(len)),
    }
}

/// Takes one whole frame off the front of `buf`, if there is one, its body copied out (so it
/// does not keep `buf`'s allocation alive). A header announcing more than `max_frame` bytes is
/// an error at once. For tests and tools; connections read through a [`Reader`].
pub fn next_frame(buf: &mut BytesMut, max_frame: usize) -> std::io::Result<Option<Frame>> {
    let Some((flags, header, len)) = header(buf, max_frame)? else {
        return Ok(None);
    };
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return Ok(None);
    }
    let body = Bytes::copy_from_slice(&buf[header..header + len]);
    buf.advance(header + len);
    Ok(Some(Frame { flags, body }))
}

/// The reader's buffer, allocated once per connection and never grown.
const READ_BUF: usize = 32 * 1024;
/// A frame body of this size or more is read into an allocation of its own, of exactly its
/// size (what the buffer already holds of it copied in, the rest read straight into it); a
/// smaller one is copied out of the buffer. Either way no frame shares memory with the buffer
/// or with another frame, so a kept frame holds its own bytes and nothing more. (When frames
/// were slices of a growing buffer, a few bytes kept could hold a whole buffer grown for a
/// large frame: 2,000 tiny queued requests, each read next to a padded PING, held 380 MiB.)
const OWN_ALLOCATION: usize = 8 * 1024;
/// The buffer's data moves back to its start when less than this is free after it.
const MIN_READ: usize = 8 * 1024;

/// What a frame read by a [`Reader`] holds beyond its body, once in a message: its `Bytes`
/// handle (32 bytes) in the message's frame list, which grows by doubling, and its header,
/// copied with it when its message is gathered. (Measured with [`MESSAGE_OVERHEAD`].)
pub const FRAME_OVERHEAD: usize = 64;
/// What a message read by a [`Reader`] holds beyond its frames: its allocation's reference
/// count and length (16 bytes), the rounding up to the allocation's size class (up to 63), the
/// allocator's own header (16), and its frame list (a `VecDeque` of 4 handles to start with,
/// 128). Measured on the broker (`broker::protocol::QUEUED_OVERHEAD`, which adds what the
/// queue and the books keep for a request): RSS per queued request of four tiny frames
/// 787-793 bytes, 51 more per frame.
pub const MESSAGE_OVERHEAD: usize = 256;

/// A small message's bytes, inline in the allocation of their reference count.
#[derive(Debug)]
struct Inline<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn inline<const N: usize>(src: &[u8]) -> Bytes {
    let mut owner = Inline {
        len: src.len(),
        bytes: [0; N],
    };
    owner.bytes[..src.len()].copy_from_slice(src);
    Bytes::from_owner(owner)
}

/// A copy of `src` that can be sliced into frames without another allocation: a small one
/// in one allocation with its reference count (`Bytes::from_owner`), a larger one in a `Vec`
/// (whose first slice adds the count's allocation).
fn copy_message(src: &[u8]) -> Bytes {
    match src.len() {
        0..=32 => inline::<32>(src),
        33..=48 => inline::<48>(src),
        49..=64 => inline::<64>(src),
        65..=80 => inline::<80>(src),
        81..=96 => inline::<96>(src),
        97..=112 => inline::<112>(src),
        113..=128 => inline::<128>(src),
        129..=160 => inline::<160>(src),
        161..=192 => inline::<192>(src),
        193..=224 => inline::<224>(src),
        225..=256 => inline::<256>(src),
        257..=320 => inline::<320>(src),
        321..=384 => inline::<384>(src),
        385..=448 => inline::<448>(src),
        449..=512 => inline::<512>(src),
        _ => Bytes::copy_from_slice(src),
    }
}

/// Reads frames from one connection (in production an [`OwnedReadHalf`]), into a buffer of
/// fixed size whatever the peer sends.
#[derive(Debug)]
pub struct Reader<R = OwnedReadHalf> {
    read: R,
    /// Of capacity `READ_BUF`, never more: its pages are touched only as reads fill them, so an
    /// idle connection costs a page, not the whole buffer.
    buf: BytesMut,
    /// What is read and not yet decoded: `buf[start..]`.
    start: usize,
    /// Bytes the frame at `start` needs in the buffer, header included, once its header
    /// is whole (a header alone needs 9 at most).
    want: usize,
    /// A large frame being read into its own allocation (capacity: its length), with its flags.
    large: Option<(u8, BytesMut)>,
    /// The frames (headers and bodies) still to hand out of a message gathered whole: the
    /// bytes at `start`, copied.
    message: Bytes,
    /// How many frames at `start` are in `message`.
    gathered: usize,
    /// Whether frames of a message not gathered whole were handed out, and not its last.
    in_message: bool,
    max_frame: usize,
    /// Frame headers `gather` looked at (tests: never many times each).
    #[cfg(test)]
    scanned: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> Reader<R> {
    /// Reads from `read`; a frame header announcing more than `max_frame` bytes is an error.
    pub fn new(read: R, max_frame: usize) -> Self {
        Self {
            read,
            buf: BytesMut::with_capacity(READ_BUF),
            start: 0,
            want: 0,
            large: None,
            message: Bytes::new(),
            gathered: 0,
            in_message: false,
            max_frame,
            #[cfg(test)]
            scanned: 0,
        }
    }

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
        if let Some((_, body)) = &self.large {
            if body.len() < body.capacity() {
                return Ok(None);
            }
            let (flags, body) = self.large.take().expect("a large frame");
            if flags & FLAG_COMMAND == 0 {
                self.in_message = flags & FLAG_MORE != 0;
            }
            return Ok(Some(Frame {
                flags,
                body: body.freeze(),
            }));
        }
        let data = &self.buf[self.start..];
        let Some((flags, header, len)) = header(data, self.max_frame)? else {
            self.want = 9;
            return Ok(None);
        };
        if self.gathered > 0 {
            // Whole in the buffer, and copied with its header into `message` (see `gather`).
            self.gathered -= 1;
            self.start += header + len;
            self.message.advance(header);
            let body = if self.gathered == 0 {
                std::mem::take(&mut self.message)
            } else {
                self.message.split_to(len)
            };
            return Ok(Some(Frame { flags, body }));
        }
        if len >= OWN_ALLOCATION {
            let have = len.min(data.len() - header);
            let mut body = BytesMut::with_capacity(len);
            body.extend_from_slice(&data[header..header + have]);
            self.start += header + have;
            self.large = Some((flags, body));
            return self.try_frame();
        }
        if data.len() < header + len {
            self.want = header + len;
            return Ok(None);
        }
        if flags & FLAG_COMMAND == 0 {
            // Only at a message's first frame: tried at each of its frames, a message of many
            // not all read yet would be scanned again and again.
            if flags & FLAG_MORE != 0 && !self.in_message && self.gather(header + len) {
                return self.try_frame();
            }
            self.in_message = flags & FLAG_MORE != 0;
        }
        let at = self.start + header;
        let body = Bytes::copy_from_slice(&self.buf[at..at + len]);
        self.start = at + len;
        Ok(Some(Frame { flags, body }))
    }

    /// When the buffer holds the whole message whose first frame (`first` bytes, header
    /// included) is at `start`, in frames all small and none a command: copies them (headers
    /// and all, in one piece) into one allocation, `message`, sliced as they are handed out,
    /// instead of one allocation per frame. A message's frames are kept or dropped together, so
    /// that is still memory of its own; it saves an allocation per frame and the one a frame's
    /// first clone would make (the request key's).
    fn gather(&mut self, first: usize) -> bool {
        let data = &self.buf[self.start..];
        let (mut at, mut frames) = (first, 1);
        loop {
            #[cfg(test)]
            {
                self.scanned += 1;
            }
            match header(&data[at..], self.max_frame) {
                Ok(Some((flags, header, len)))
                    if len < OWN_ALLOCATION
                        && flags & FLAG_COMMAND == 0
                        && at + header + len <= data.len() =>
                {
                    at += header + len;
                    frames += 1;
                    if flags & FLAG_MORE == 0 {
                        break;
                    }
                }
                _ => return false,
            }
        }
        self.message = copy_message(&data[..at]);
        self.gathered = frames;
        true
    }

    /// Reads what the socket has; false at a clean end of the stream.
    pub async fn fill(&mut self) -> std::io::Result<bool> {
        let n = if let Some((_, body)) = &mut self.large {
            if body.len() == body.capacity() {
                return Ok(true); // whole: `read_buf` would grow it
            }
            // Capacity is the frame's length: the read stops at the frame's end.
            self.read.read_buf(body).await?
        } else {
            let pending = self.buf.len() - self.start;
            if pending == 0 {
                self.buf.clear();
                self.start = 0;
            } else if READ_BUF - self.buf.len() < MIN_READ || self.start + self.want > READ_BUF {
                // At most a frame under `OWN_ALLOCATION` and its header: it fits once moved.
                self.buf.copy_within(self.start.., 0);
                self.buf.truncate(pending);
                self.start = 0;
            }
            // Never full here (see above), so `read_buf` reads into the room left and does not
            // grow the buffer.
            self.read.read_buf(&mut self.buf).await?
        };
        if n == 0 {
            return if self.start == self.buf.len() && self.large.is_none() {
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
    let mut reader = Reader::new(read, max_frame);
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

    /// An `AsyncRead` that hands out its bytes in pieces of at most `step`.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.data.len() - self.at);
            buf.put_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Small, empty, command and large frames (one over the buffer's size), in one stream.
    fn mixed_stream() -> (Bytes, Vec<(u8, Vec<u8>)>) {
        let frames = vec![
            (FLAG_MORE, b"".to_vec()),
            (FLAG_MORE, b"\x01a".to_vec()),
            (
                FLAG_COMMAND,
                [&b"\x04PING\x00\x00"[..], &[b'p'; 3000]].concat(),
            ),
            (0, vec![7u8; 400]),
            (FLAG_MORE, vec![8u8; OWN_ALLOCATION]),
            (FLAG_MORE, vec![9u8; OWN_ALLOCATION - 1]),
            (0, (0..READ_BUF * 3 + 5).map(|i| i as u8).collect()),
            (0, b"last".to_vec()),
        ];
        let mut wire = BytesMut::new();
        for (flags, body) in &frames {
            put_frame(&mut wire, *flags, body);
        }
        (wire.freeze(), frames)
    }

    async fn read_all<R: tokio::io::AsyncRead + Unpin>(reader: &mut Reader<R>) -> Vec<Frame> {
        let mut got = Vec::new();
        while let Some(frame) = reader.frame().await.expect("valid") {
            got.push(frame);
        }
        got
    }

    /// Each frame the reader returns owns an allocation of exactly its length: nothing it keeps
    /// holds the reader's buffer or another frame's bytes.
    fn assert_owns_exactly(frame: Frame) {
        let len = frame.body.len();
        if len == 0 {
            return; // `Bytes::new()`: no allocation at all
        }
        let owned = frame
            .body
            .try_into_mut()
            .unwrap_or_else(|_| panic!("a frame of {len} bytes shares its allocation"));
        assert_eq!(
            owned.capacity(),
            len,
            "a frame of {len} bytes in a bigger allocation"
        );
    }

    #[tokio::test]
    async fn the_reader_decodes_a_stream_split_anywhere_into_frames_that_own_their_bytes() {
        let (wire, frames) = mixed_stream();
        let expected: Vec<Frame> = frames
            .iter()
            .map(|(flags, body)| Frame {
                // As on the wire: LONG kept.
                flags: flags | if body.len() > 255 { FLAG_LONG } else { 0 },
                body: Bytes::copy_from_slice(body),
            })
            .collect();
        // Two reads cut anywhere (every cut in the small frames and around the large ones'
        // headers and the buffer's size, a stride elsewhere), then a byte at a time, and a few
        // odd read sizes.
        let cuts = (0..wire.len()).filter(|&c| c < 4000 || c % 97 == 0 || c % READ_BUF < 16);
        for cut in cuts {
            let two = AsyncReadExt::chain(&wire[..cut], &wire[cut..]);
            let got = read_all(&mut Reader::new(two, READ_BUF * 4)).await;
            assert_eq!(got, expected, "cut at {cut}");
        }
        for step in [
            1,
            2,
            3,
            9,
            1000,
            OWN_ALLOCATION + 1,
            READ_BUF - 1,
            usize::MAX,
        ] {
            let trickle = Trickle {
                data: wire.to_vec(),
                at: 0,
                step,
            };
            let mut reader = Reader::new(trickle, READ_BUF * 4);
            let got = read_all(&mut reader).await;
            assert_eq!(got, expected, "reads of {step} bytes");
            assert_eq!(reader.buf.capacity(), READ_BUF, "the buffer never grows");
            got.into_iter().for_each(assert_owns_exactly);
        }
    }

    #[tokio::test]
    async fn a_message_whole_in_the_buffer_is_copied_into_one_allocation_of_its_own() {
        // Messages of three small frames (up to 700 bytes in all, so both ways of copying them
        // are taken) and of one, and a command between them.
        let mut wire = BytesMut::new();
        let mut messages = Vec::new();
        for n in 0..2000u32 {
            let id = n.to_string();
            let frames = vec![
                id.as_bytes().to_vec(),
                vec![1; 3],
                vec![2; n as usize * 7 % 700],
            ];
            for (i, body) in frames.iter().enumerate() {
                put_frame(&mut wire, if i < 2 { FLAG_MORE } else { 0 }, body);
            }
            messages.push(frames);
            if n % 7 == 0 {
                put_frame(&mut wire, FLAG_COMMAND, b"\x04PING\x00\x00");
                put_frame(&mut wire, 0, id.as_bytes());
                messages.push(vec![id.into_bytes()]);
            }
        }
        let wire = wire.freeze();
        let head = |body: &Bytes| if body.len() > 255 { 9 } else { 2 };
        // Each frame right after its header, in one piece of memory.
        let after = |a: &Bytes, b: &Bytes| a.as_ptr().wrapping_add(a.len() + head(b)) == b.as_ptr();
        let (mut inline, mut in_vec) = (0, 0);
        for step in [1, 5, 1000, usize::MAX] {
            let trickle = Trickle {
                data: wire.to_vec(),
                at: 0,
                step,
            };
            let got = read_all(&mut Reader::new(trickle, 1024)).await;
            let mut got = got.into_iter().filter(|f| !f.is_command()).map(|f| f.body);
            let mut last: Option<(usize, usize)> = None;
            for frames in &messages {
                let bodies: Vec<Bytes> = got.by_ref().take(frames.len()).collect();
                assert_eq!(&bodies, frames);
                // Never in one piece with the message before it (as when frames were slices
                // of the reader's buffer): all were alive together when read.
                if let Some((end, _)) = last {
                    assert_ne!(
                        end + head(&bodies[0]),
                        bodies[0].as_ptr() as usize,
                        "step {step}"
                    );
                }
                let tail = bodies.last().expect("a frame");
                last = Some((tail.as_ptr() as usize + tail.len(), tail.len()));
                if bodies.len() < 2 || !bodies.windows(2).all(|w| after(&w[0], &w[1])) {
                    continue; // not gathered whole: each frame on its own, as checked above
                }
                let size: usize = bodies.iter().map(|b| head(b) + b.len()).sum();
                if size <= 512 {
                    // In one allocation with its reference count (`copy_message`).
                    inline += 1;
                    continue;
                }
                // In a `Vec` of exactly its size: the first frame alone, once the others are
                // dropped, owns it from its body to the end.
                in_vec += 1;
                let first = bodies.into_iter().next().expect("a frame");
                let from_first = size - head(&first);
                let owned = first.try_into_mut().expect("nothing else shares it");
                assert_eq!(owned.capacity(), from_first);
            }
        }
        assert!(
            inline > 1000 && in_vec > 500,
            "gathered: {inline} and {in_vec}"
        );
    }

    #[tokio::test]
    async fn a_message_of_many_frames_not_all_read_is_scanned_once() {
        // 40,000 empty frames and a last one: more than one read's worth.
        let mut wire = BytesMut::new();
        for _ in 0..40_000 {
            put_frame(&mut wire, FLAG_MORE, b"");
        }
        put_frame(&mut wire, 0, b"end");
        let trickle = Trickle {
            data: wire.to_vec(),
            at: 0,
            step: usize::MAX,
        };
        let mut reader = Reader::new(trickle, 1024);
        let got = read_all(&mut reader).await;
        assert_eq!(got.len(), 40_001);
        assert!(
            reader.scanned <= 40_001,
            "{} headers scanned",
            reader.scanned
        );
    }

    #[test]
    fn a_message_copy_keeps_its_bytes_and_slices_of_it_outlive_it() {
        for len in [0, 1, 31, 32, 33, 100, 255, 448, 449, 512, 513, 4000] {
            let src: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let copy = copy_message(&src);
            assert_eq!(copy, src);
            let tail = copy.slice(len / 2..);
            drop(copy);
            assert_eq!(tail, src[len / 2..]);
        }
    }

    #[tokio::test]
    async fn the_reader_refuses_a_huge_header_and_tells_a_cut_frame_from_a_clean_end() {
        let huge = [FLAG_LONG, 0x7f, 0, 0, 0, 0, 0, 0, 0];
        let mut reader = Reader::new(&huge[..], 1 << 20);
        let e = reader.frame().await.expect_err("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(reader.large.is_none(), "nothing taken for its body");
        // One byte over the limit, large or small.
        for limit in [255, OWN_ALLOCATION * 2] {
            let mut wire = BytesMut::new();
            put_frame(&mut wire, 0, &vec![1u8; limit + 1]);
            let e = Reader::new(&wire[..9], limit).frame().await;
            assert!(e.is_err(), "{limit}");
            let mut at_limit = BytesMut::new();
            put_frame(&mut at_limit, 0, &vec![1u8; limit]);
            let mut reader = Reader::new(&at_limit[..], limit);
            assert_eq!(read_all(&mut reader).await.len(), 1);
        }
        let (wire, _) = mixed_stream();
        for cut in [1, 3, 20, wire.len() - 100, wire.len() - 1] {
            let mut reader = Reader::new(&wire[..cut], READ_BUF * 4);
            let e = loop {
                match reader.frame().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("a stream cut at {cut} taken for a clean end"),
                    Err(e) => break e,
                }
            };
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "cut at {cut}");
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
