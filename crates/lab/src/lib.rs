//! The lab: runs the seed's experiments against the real binaries and judges them.
//!
//! - [`broker_stats`]: the broker's counters, read off its stats log lines.
//! - [`process`]: child processes with a `ready` line, JSON summaries, signals and deadlines.
//! - [`relay`]: a blackholing TCP relay (partitions without root).
//! - [`netns`]: test hosts in network namespaces (real partitions, root).
//! - [`scenarios`]: one function per experiment, each returning a [`verdict::Verdict`].

pub mod broker_stats;
pub mod netns;
pub mod process;
pub mod relay;
pub mod scenarios;
pub mod verdict;

pub use nix::sys::signal::Signal;
