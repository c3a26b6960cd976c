//! The guard: a message-size limit in front of a bound zmq.rs socket.
//!
//! `zeromq` 0.7 has no `ZMQ_MAXMSGSIZE`: a frame header claiming a 1 TiB frame makes it
//! allocate that much and abort the process, even before the handshake, and a flood of empty
//! frames with MORE set grows its memory without bound. The guard owns the public listener,
//! accepts each connection itself, and relays it to the socket over a loopback hop while reading
//! the ZMTP stream as it passes: the greeting's signature and version, then each frame header.
//! A peer that announces a frame or a message over the limit, too many frames in one message,
//! or bytes that are not ZMTP 3 is cut off before the library sees the offending header, logged
//! once with its address and counted. Everything the socket sends goes back untouched, through
//! a buffer of at most `max_peer_bytes` per peer: the guard reads the socket's side as fast as it
//! comes, so the library's per-peer queue (100,000 messages, whatever their size) stays near
//! empty, and a peer that lets more than that pile up (it stopped reading, or reads slower than
//! it is sent to) is cut off, logged and counted as stalled. That is the bound, in bytes, on
//! what one peer can make a role hold.
//!
//! ```text
//!  peer ──tcp──► guard (public endpoint, keepalive, user timeout) ──loopback──► zmq.rs socket
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zeromq::Socket;

use crate::endpoint::{self, EndpointError};

/// What one peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, and largest sum of the frames of one message (commands included).
    pub max_message_bytes: u64,
    /// Most frames in one message (bounds a flood of empty frames with MORE set).
    pub max_frames: u32,
    /// Most bytes the socket sent that the peer has not taken yet, held by the guard; beyond,
    /// the peer is cut off as stalled.
    pub max_peer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_frames: 1024,
            max_peer_bytes: 16 << 20,
        }
    }
}

/// When a bound socket gets a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Guard every endpoint except loopback ones (only local processes can reach those).
    Auto,
    Always,
    Never,
}

/// Counters of one guarded endpoint.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Connections relayed.
    pub accepted: AtomicU64,
    /// Connections cut off for breaking the limits or not speaking ZMTP 3 (garbage, a greeting
    /// cut short or not finished in time).
    pub refused: AtomicU64,
    /// Connections cut off because more than `max_peer_bytes` waited for the peer to read.
    pub stalled: AtomicU64,
    /// Quiet connections closed to make room for a new one at the connection bound (our own
    /// sockets only).
    pub evicted: AtomicU64,
    /// New connections closed at once at the connection bound, every open one having been heard
    /// from lately (our own sockets only).
    pub turned_away: AtomicU64,
    /// Connections whose peer could not be reached while writes waited, kept for when the link
    /// heals (our own sockets for peers that may never send only).
    pub unreachable: AtomicU64,
}

impl GuardStats {
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn unreachable(&self) -> u64 {
        self.unreachable.load(Ordering::Relaxed)
    }

    pub fn turned_away(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }
}

/// The sum of `refused` and of `stalled` over several guards.
pub fn totals<'a>(guards: impl IntoIterator<Item = &'a Arc<GuardStats>>) -> (u64, u64) {
    guards
        .into_iter()
        .fold((0, 0), |(r, s), g| (r + g.refused(), s + g.stalled()))
}

/// Why a peer was cut off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("not a ZMTP 3 greeting")]
    Greeting,
    #[error("reserved bits set in frame flags {0:#04x}")]
    Flags(u8),
    #[error("frame of {0} bytes over the limit")]
    Frame(u64),
    #[error("message of {0} bytes or more over the limit")]
    Message(u64),
    #[error("message of more than {0} frames")]
    Frames(u32),
    #[error("greeting cut short after {0} bytes")]
    Truncated(usize),
    #[error("greeting not finished within {0:?}")]
    Slow(Duration),
    #[error("{0} bytes waiting for the peer to read")]
    Stalled(u64),
}

/// A peer has this long to send its whole greeting (zmq.rs would wait for it forever).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

const GREETING: usize = 64;
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Bytes of the greeting seen so far.
    Greeting(usize),
    /// Bytes of a frame header seen so far (flags, then 1 or 8 size bytes).
    Header { bytes: [u8; 9], have: usize },
    /// Body bytes still to pass.
    Body(u64),
}

/// Reads a ZMTP 3 stream from a peer as it passes and says when it breaks the limits.
#[derive(Debug, Clone)]
pub struct Inspector {
    limits: Limits,
    state: State,
    message_bytes: u64,
    message_frames: u32,
}

impl Inspector {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Greeting(0),
            message_bytes: 0,
            message_frames: 0,
        }
    }

    /// Bytes of the greeting seen, while it is not complete.
    pub fn in_greeting(&self) -> Option<usize> {
        match self.state {
            State::Greeting(seen) => Some(seen),
            _ => None,
        }
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        while !data.is_empty() {
            match &mut self.state {
                State::Greeting(seen) => {
                    let take = (GREETING - *seen).min(data.len());
                    for (i, byte) in data[..take].iter().enumerate() {
                        let at = *seen + i;
                        // Signature 0xFF, 8 padding bytes, 0x7F; then the major version.
                        let ok = match at {
                            0 => *byte == 0xFF,
                            9 => byte & 0x01 == 0x01,
                            10 => *byte >= 3,
                            _ => true,
                        };
                        if !ok {
                            return Err(Violation::Greeting);
                        }
                    }
                    *seen += take;
                    data = &data[take..];
                    if *seen == GREETING {
                        self.state = State::Header {
                            bytes: [0; 9],
                            have: 0,
                        };
                    }
                }
                State::Header { bytes, have } => {
                    let flags = if *have == 0 { data[0] } else { bytes[0] };
                    if flags & !(MORE | LONG | COMMAND) != 0 {
                        return Err(Violation::Flags(flags));
                    }
                    let need = if flags & LONG != 0 { 9 } else { 2 };
                    let take = (need - *have).min(data.len());
                    bytes[*have..*have + take].copy_from_slice(&data[..take]);
                    *have += take;
                    data = &data[take..];
                    if *have == need {
                        let size = if need == 9 {
                            u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"))
                        } else {
                            u64::from(bytes[1])
                        };
                        self.frame(flags, size)?;
                        self.state = if size == 0 {
                            State::Header {
                                bytes: [0; 9],
                                have: 0,
                            }
                        } else {
                            State::Body(size)
                        };
                    }
                }
                State::Body(left) => {
                    let take = (*left).min(data.len() as u64);
                    *left -= take;
                    data = &data[take as usize..];
                    if *left == 0 {
                        self.state = State::Header {
                            bytes: [0; 9],
                            have: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks one frame header against the limits.
    fn frame(&mut self, flags: u8, size: u64) -> Result<(), Violation> {
        if size > self.limits.max_message_bytes {
            return Err(Violation::Frame(size));
        }
        if flags & COMMAND != 0 {
            return Ok(());
        }
        self.message_bytes += size;
        self.message_frames += 1;
        if self.message_bytes > self.limits.max_message_bytes {
            return Err(Violation::Message(self.message_bytes));
        }
        if self.message_frames > self.limits.max_frames {
            return Err(Violation::Frames(self.limits.max_frames));
        }
        if flags & MORE == 0 {
            self.message_bytes = 0;
            self.message_frames = 0;
        }
        Ok(())
    }
}

/// True when `mode` puts a guard in front of `endpoint`.
pub fn wanted(mode: Mode, endpoint: &str) -> Result<bool, EndpointError> {
    Ok(match mode {
        Mode::Always => true,
        Mode::Never => false,
        Mode::Auto => !endpoint::resolve(endpoint)?.ip().is_loopback(),
    })
}

/// Binds `socket` to `endpoint` the way every role's server side binds: TCP keepalive and user
/// timeout (see [`endpoint::bind_keepalive`]) and, when `guard` is given, the guard in front.
/// Returns the endpoint peers connect to (port 0 resolved) and the guard's counters.
pub async fn bind<S: Socket>(
    socket: &mut S,
    endpoint: &str,
    idle: Duration,
    guard: Option<Limits>,
) -> Result<(String, Option<Arc<GuardStats>>), BindError> {
    let public = endpoint::bind_keepalive(endpoint, idle)?;
    let bound = bind_on(socket, public, endpoint, guard).await?;
    Ok((bound.endpoint, bound.guard))
}

/// A socket bound by [`bind_on`].
#[derive(Debug)]
pub struct Bound {
    /// Where peers connect (the guard's endpoint when guarded).
    pub endpoint: String,
    /// The port the zmq.rs socket itself listens on (a loopback port of its own when guarded).
    pub socket_port: u16,
    pub guard: Option<Arc<GuardStats>>,
}

/// [`bind`] on a listener the caller prepared (socket options set on it are inherited by the
/// connections the guard accepts).
pub async fn bind_on<S: Socket>(
    socket: &mut S,
    public: std::net::TcpListener,
    endpoint: &str,
    guard: Option<Limits>,
) -> Result<Bound, BindError> {
    let bind_err = |source| BindError::Socket {
        endpoint: endpoint.to_string(),
        source,
    };
    let Some(limits) = guard else {
        let bound = socket.bind_listener(public).await.map_err(bind_err)?;
        let socket_port = endpoint::resolve(&bound.to_string())
            .map(|a| a.port())
            .unwrap_or_default();
        return Ok(Bound {
            endpoint: bound.to_string(),
            socket_port,
            guard: None,
        });
    };
    let front = front(public, endpoint, limits)?;
    let socket_port = front
        .inner
        .local_addr()
        .map(|a| a.port())
        .unwrap_or_default();
    socket.bind_listener(front.inner).await.map_err(bind_err)?;
    Ok(Bound {
        endpoint: front.endpoint,
        socket_port,
        guard: Some(front.stats),
    })
}

/// A guard running in front of a listener, for a socket to bind on `inner`.
#[derive(Debug)]
pub struct Front {
    /// A loopback listener of the guard's: bind the zmq.rs socket on it (or on clones of it).
    pub inner: std::net::TcpListener,
    /// The public endpoint, as peers reach it.
    pub endpoint: String,
    pub stats: Arc<GuardStats>,
}

/// Starts a guard on `public` (bound for `endpoint`) relaying every connection to a new
/// loopback listener, which it returns for the socket to bind on.
pub fn front(
    public: std::net::TcpListener,
    endpoint: &str,
    limits: Limits,
) -> Result<Front, EndpointError> {
    let io_err = |source| EndpointError::Bind {
        endpoint: endpoint.to_string(),
        source,
    };
    let inner = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err)?;
    let inner_addr = inner.local_addr().map_err(io_err)?;
    let public_addr = public.local_addr().map_err(io_err)?;
    public.set_nonblocking(true).map_err(io_err)?;
    let stats = Arc::new(GuardStats::default());
    // The guard relays on a thread of its own, so on a 2-core machine the extra hop runs beside
    // the role's loop instead of taking turns with it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err)?;
    let counters = stats.clone();
    std::thread::Builder::new()
        .name("guard".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(public) {
                    Ok(public) => accept(public, inner_addr, limits, counters).await,
                    Err(e) => tracing::error!(error = %e, "guard cannot listen"),
                }
            })
        })
        .map_err(io_err)?;
    tracing::debug!(endpoint, %inner_addr, "guard in front");
    Ok(Front {
        inner,
        endpoint: format!("tcp://{public_addr}"),
        stats,
    })
}

/// Why a server socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot bind {endpoint}")]
    Socket {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
}

async fn accept(public: TcpListener, inner: SocketAddr, limits: Limits, stats: Arc<GuardStats>) {
    loop {
        match public.accept().await {
            Ok((peer, addr)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(peer, addr, inner, limits, stats.clone()));
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "guard cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Relays one connection until either side closes, the peer breaks the limits or it stalls.
async fn relay(
    peer: TcpStream,
    addr: SocketAddr,
    inner: SocketAddr,
    limits: Limits,
    stats: Arc<GuardStats>,
) {
    let socket = match TcpStream::connect(inner).await {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(peer = %addr, error = %e, "guard cannot reach its socket");
            return;
        }
    };
    let _ = peer.set_nodelay(true);
    let _ = socket.set_nodelay(true);
    let (mut from_peer, to_peer) = peer.into_split();
    let (from_socket, mut to_socket) = socket.into_split();
    let cut = |counter: &AtomicU64, violation: Violation| {
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %addr, %violation, "peer cut off");
    };
    let upstream = async {
        let mut inspector = Inspector::new(limits);
        let mut buf = vec![0u8; CHUNK];
        let greeting_until = tokio::time::Instant::now() + GREETING_TIMEOUT;
        loop {
            let read = from_peer.read(&mut buf);
            let read = match inspector.in_greeting() {
                Some(_) => match tokio::time::timeout_at(greeting_until, read).await {
                    Ok(read) => read,
                    Err(_) => return cut(&stats.refused, Violation::Slow(GREETING_TIMEOUT)),
                },
                None => read.await,
            };
            let n = match read {
                Ok(0) | Err(_) => {
                    // A peer that hangs up in the middle of its greeting did not speak ZMTP;
                    // one that sent nothing at all (a port probe) is not worth a line.
                    if let Some(seen @ 1..) = inspector.in_greeting() {
                        cut(&stats.refused, Violation::Truncated(seen));
                    }
                    return;
                }
                Ok(n) => n,
            };
            if let Err(violation) = inspector.feed(&buf[..n]) {
                return cut(&stats.refused, violation);
            }
            if to_socket.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        match downstream(from_socket, to_peer, limits.max_peer_bytes).await {
            Ok(()) => {}
            Err(held) => cut(&stats.stalled, Violation::Stalled(held)),
        }
    };
    // Whichever way ends first ends the connection: both sockets close when dropped.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

/// Bytes read at once from either side.
const CHUNK: usize = 64 * 1024;
/// How long the socket's last bytes may take to reach a peer after the socket closed it.
const FLUSH: Duration = Duration::from_secs(1);

/// Copies what the socket sends to the peer, reading the socket as fast as it writes and
/// holding what the peer has not taken yet; `Err(bytes held)` when that goes over `max`.
async fn downstream(
    mut from_socket: tokio::net::tcp::OwnedReadHalf,
    mut to_peer: tokio::net::tcp::OwnedWriteHalf,
    max: u64,
) -> Result<(), u64> {
    use std::task::Poll;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    let mut held = bytes::BytesMut::new();
    let mut chunk = vec![0u8; CHUNK];
    let socket_closed = std::future::poll_fn(|cx| loop {
        let mut progress = false;
        let mut read = ReadBuf::new(&mut chunk);
        match std::pin::Pin::new(&mut from_socket).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(true)),
            Poll::Ready(Ok(())) => {
                held.extend_from_slice(read.filled());
                if held.len() as u64 > max {
                    return Poll::Ready(Err(held.len() as u64));
                }
                progress = true;
            }
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(true)),
            Poll::Pending => {}
        }
        if !held.is_empty() {
            match std::pin::Pin::new(&mut to_peer).poll_write(cx, &held) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    let _ = held.split_to(n);
                    progress = true;
                }
                Poll::Ready(_) => return Poll::Ready(Ok(false)),
                Poll::Pending => {}
            }
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await?;
    if socket_closed && !held.is_empty() {
        let _ = tokio::time::timeout(FLUSH, to_peer.write_all(&held)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zmtp::{frame, greeting};

    fn limits() -> Limits {
        Limits {
            max_message_bytes: 1000,
            max_frames: 4,
            ..Limits::default()
        }
    }

    #[test]
    fn passes_a_well_formed_stream_fed_a_byte_at_a_time() {
        let mut stream = greeting();
        stream.extend(frame(COMMAND, b"\x05READY"));
        stream.extend(frame(MORE, b""));
        stream.extend(frame(LONG, &[7u8; 900]));
        for _ in 0..10 {
            stream.extend(frame(0, b"hello"));
        }
        let mut inspector = Inspector::new(limits());
        for byte in &stream {
            inspector
                .feed(std::slice::from_ref(byte))
                .expect("well formed");
        }
        let mut whole = Inspector::new(limits());
        whole.feed(&stream).expect("well formed in one piece");
    }

    #[test]
    fn the_nine_byte_header_is_refused_before_its_body() {
        let mut inspector = Inspector::new(limits());
        // Even before the handshake: straight after the greeting.
        let mut stream = greeting();
        stream.push(LONG);
        stream.extend((1u64 << 40).to_be_bytes());
        assert_eq!(inspector.feed(&stream), Err(Violation::Frame(1 << 40)));
        // And without a greeting at all.
        let mut raw = vec![LONG];
        raw.extend((1u64 << 40).to_be_bytes());
        assert_eq!(
            Inspector::new(limits()).feed(&raw),
            Err(Violation::Greeting)
        );
    }

    #[test]
    fn refuses_big_messages_frame_floods_and_bad_flags() {
        let mut stream = greeting();
        stream.extend(frame(MORE, &[1u8; 600]));
        stream.extend(frame(0, &[1u8; 600]));
        assert_eq!(
            Inspector::new(limits()).feed(&stream),
            Err(Violation::Message(1200))
        );
        let mut flood = greeting();
        for _ in 0..5 {
            flood.extend(frame(MORE, b""));
        }
        assert_eq!(
            Inspector::new(limits()).feed(&flood),
            Err(Violation::Frames(4))
        );
        let mut bad = greeting();
        bad.push(0x80);
        assert_eq!(
            Inspector::new(limits()).feed(&bad),
            Err(Violation::Flags(0x80))
        );
        let mut old = greeting();
        old[10] = 1;
        assert_eq!(
            Inspector::new(limits()).feed(&old),
            Err(Violation::Greeting)
        );
    }

    #[test]
    fn auto_mode_guards_all_but_loopback() {
        assert!(!wanted(Mode::Auto, "tcp://127.0.0.1:0").expect("valid"));
        assert!(wanted(Mode::Auto, "tcp://0.0.0.0:0").expect("valid"));
        assert!(wanted(Mode::Always, "tcp://127.0.0.1:0").expect("valid"));
        assert!(!wanted(Mode::Never, "tcp://0.0.0.0:0").expect("valid"));
    }
}

#[cfg(test)]
mod fuzz {
    //! The inspector on random and mutated streams: it never panics, whatever it is fed and
    //! however the stream is cut into reads, and what it lets through keeps to the limits.

    use proptest::prelude::*;

    use super::*;

    /// A stream of frames, each `(flags, body length)`, after a valid greeting.
    fn stream(frames: &[(u8, u16)]) -> Vec<u8> {
        let mut s = vec![0u8; GREETING];
        s[0] = 0xFF;
        s[9] = 0x7F;
        s[10] = 3;
        for &(flags, len) in frames {
            let flags = flags & (MORE | COMMAND);
            if len > 255 {
                s.push(flags | LONG);
                s.extend(u64::from(len).to_be_bytes());
            } else {
                s.push(flags);
                s.push(len as u8);
            }
            s.extend(std::iter::repeat_n(0xAB, len as usize));
        }
        s
    }

    /// The largest message of a well-formed stream, and its most frames.
    fn largest(frames: &[(u8, u16)]) -> (u64, u32) {
        let (mut bytes, mut count, mut most, mut max_frames) = (0u64, 0u32, 0u64, 0u32);
        for &(flags, len) in frames {
            if flags & COMMAND != 0 {
                most = most.max(u64::from(len));
                continue;
            }
            bytes += u64::from(len);
            count += 1;
            most = most.max(bytes);
            max_frames = max_frames.max(count);
            if flags & MORE == 0 {
                bytes = 0;
                count = 0;
            }
        }
        (most, max_frames)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), cut in 1usize..50) {
            let mut inspector = Inspector::new(Limits { max_message_bytes: 300, max_frames: 4, ..Limits::default() });
            for chunk in bytes.chunks(cut) {
                if inspector.feed(chunk).is_err() {
                    break;
                }
            }
        }

        #[test]
        fn accepts_exactly_what_keeps_to_the_limits(
            frames in proptest::collection::vec((any::<u8>(), 0u16..700), 0..12),
            cut in 1usize..300,
            flip in proptest::option::of((0usize..2000, any::<u8>())),
        ) {
            let limits = Limits { max_message_bytes: 1000, max_frames: 5, ..Limits::default() };
            let mut bytes = stream(&frames);
            let mutated = match flip {
                Some((at, byte)) if at < bytes.len() && bytes[at] != byte => {
                    bytes[at] = byte;
                    true
                }
                _ => false,
            };
            let mut inspector = Inspector::new(limits);
            let verdict = bytes.chunks(cut).try_for_each(|c| inspector.feed(c));
            if !mutated {
                let (most, max_frames) = largest(&frames);
                let within = most <= limits.max_message_bytes && max_frames <= limits.max_frames;
                prop_assert_eq!(verdict.is_ok(), within, "{:?}", verdict);
            }
        }
    }
}
