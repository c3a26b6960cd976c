//! `zmq_poll` in Rust: one task reading several sockets of different kinds at once, with a
//! timer and the shutdown signal, each handled as it becomes ready, in one `tokio::select!`
//! loop (the seed's opening example and the ZeroMQ Guide's `mspoller`).
//!
//! - [`poller`]: the loop, its configuration and its per-branch summary.
//! - [`sub`], [`pull`]: `ZMQ_POLLIN` branches (weather updates on a SUB, tasks on a PULL).
//! - [`outbox`]: the `ZMQ_POLLOUT` branch (results on a PUSH that may have no or a slow peer).
//! - [`task`]: the numbered tasks and their accounting; [`feed`]: the self-fed mode.
//!
//! Each branch module says why its future is cancel-safe; `docs/poll.md` maps the C API
//! (`zmq_pollitem_t`, `ZMQ_POLLIN`, `ZMQ_POLLOUT`, the timeout) onto this and says when one
//! task per socket is the better design.

pub mod feed;
pub mod outbox;
pub mod poller;
pub mod pull;
pub mod sub;
pub mod task;

pub use poller::{run, Config, Summary};

#[cfg(test)]
mod tests;
