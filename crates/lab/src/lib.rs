//! The lab: runs the seed's experiments against the real binaries and judges them.
//!
//! - [`broker_stats`]: the broker's counters, read off its stats log lines.
//! - [`process`]: child processes with a `ready` line, JSON summaries, signals and deadlines.
//! - [`relay`]: a blackholing TCP relay (partitions without root).
//! - [`netns`]: test hosts in network namespaces (real partitions, root).
//! - [`procstat`]: RSS, open descriptors and exit of a process, from `/proc`.
//! - [`fuzz`]: `lab fuzz`, random and mutated ZMTP connections thrown at live processes.
//! - [`soak`]: `lab soak`, the three systems together under random faults for minutes.
//! - [`scenarios`]: one function per experiment, each returning a [`verdict::Verdict`].
//! - [`tape`]: what happened in a scenario (starts, kills, cuts, heals), narrated as it happens.
//! - [`timeline`]: deliveries per 100 ms next to the fault windows, drawn as SVG.
//! - [`report`]: the summary table and the HTML report; [`tour`]: runs scenarios with both.

pub mod broker_stats;
pub mod commands;
pub mod fuzz;
pub mod netns;
pub mod process;
pub mod procstat;
pub mod relay;
pub mod report;
pub mod scenarios;
pub mod soak;
pub mod tape;
pub mod timeline;
pub mod tour;
pub mod verdict;

pub use nix::sys::signal::Signal;
