//! What every role of the workspace shares, and nothing role-specific.
//!
//! - [`endpoint`]: endpoint validation and bound listeners with TCP keepalive and user timeout.
//! - [`send`]: sends that never wait on a stalled peer.
//! - [`link`]: the reconnection machinery (`zeromq` 0.7 only reconnects SUB/XSUB sockets).
//! - [`heartbeat`]: liveness bookkeeping for application-level heartbeats.
//! - [`ready`]: the one `ready k=v ...` line a server prints on stdout, and its parser.
//! - [`timeline`]: deliveries per 100 ms, for the lab's timelines.
//! - [`wire`]: ZMTP 3 on a TCP stream, for the server sides written without zmq.rs.
//! - [`zmtp`]: raw ZMTP 3 bytes, for the wire fuzzer and the tests that attack the roles.
//! - [`logging`], [`shutdown`], [`cli`], [`watchdog`]: process plumbing every binary needs.
//! - [`alloc`]: the servers' allocator (mimalloc, tuned to give memory back).

pub mod alloc;
pub mod cli;
pub mod endpoint;
pub mod frames;
pub mod heartbeat;
pub mod link;
pub mod logging;
pub mod ready;
pub mod send;
pub mod shutdown;
pub mod timeline;
pub mod watchdog;
pub mod wire;
pub mod zmtp;

pub use tokio_util::sync::CancellationToken;
