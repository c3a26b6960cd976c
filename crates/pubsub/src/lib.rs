//! Weather pub/sub through an XSUB/XPUB proxy (seed: "Proxy", experiments 1-5).
//!
//! ```text
//!  publisher PUB(+XPUB) ──► xsub XSUB ─┐       ┌─ XPUB xpub ◄── subscriber XSUB
//!  publisher PUB(+XPUB) ──►            └ proxy ┘            ◄── subscriber XSUB
//! ```
//!
//! Updates flow left to right, subscriptions right to left (counted by the proxy), and the
//! proxy's heartbeats both ways. Each role is a library function; the binaries only parse flags
//! and print.

pub mod config;
pub mod protocol;
pub mod proxy;
pub mod publisher;
pub mod stats;
pub mod subscriber;
pub mod subscriptions;
pub mod tracker;

pub use config::{ProxyConfig, PublisherConfig, SubscriberConfig};
pub use proxy::{Proxy, ProxyError};
pub use publisher::PublisherSummary;
pub use stats::ProxyStats;
pub use subscriber::SubscriberSummary;

/// Prints `value` as one JSON line on stdout: the binaries' `--json` contract.
pub fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(line) => println!("{line}"),
        Err(e) => tracing::warn!(error = %e, "cannot encode as JSON"),
    }
}
