//! The shared queue (seed: "Shared Queue pattern"): a broker with ROUTER sockets facing clients
//! (frontend) and workers (backend), Lazy Pirate clients and Paranoid Pirate workers.
//!
//! ```text
//!  client (DEALER) ──► frontend ROUTER ─┐        ┌─ backend ROUTER ◄── worker (DEALER)
//!  client (DEALER) ──►                  └ broker ┘                ◄── worker (DEALER)
//! ```
//!
//! Each role is a library function; the binaries only parse flags and print.

pub mod books;
pub mod broker;
pub mod client;
pub mod config;
pub mod pair;
pub mod protocol;
pub mod queue;
pub mod stats;
pub mod worker;

pub use broker::{Broker, BrokerError};
pub use client::ClientSummary;
pub use config::{BrokerConfig, ClientConfig, WorkerConfig};
pub use stats::BrokerStats;
