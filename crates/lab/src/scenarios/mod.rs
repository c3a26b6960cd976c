//! The seed's experiments as runnable scenarios. Each starts the real binaries, makes its fault,
//! and returns a [`Verdict`] with the figures that prove the outcome.

pub mod pipeline;
pub mod poll;
pub mod pubsub;
pub mod shared_queue;

use std::path::PathBuf;

use anyhow::Result;

use crate::process::Bins;
use crate::verdict::Verdict;

/// How to emulate a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionMode {
    /// Network namespaces if root and iproute2 are there, else the relay.
    Auto,
    /// Test hosts in network namespaces; the link is taken down.
    Netns,
    /// A blackholing TCP relay on loopback.
    Relay,
}

/// What every scenario needs.
#[derive(Debug, Clone)]
pub struct Lab {
    pub bins: Bins,
    /// Children's stderr logs go here.
    pub log_dir: PathBuf,
    pub partition: PartitionMode,
    /// How long the broker stays down, or the partition lasts; `None`: each scenario's default.
    pub outage: Option<std::time::Duration>,
}

impl Lab {
    /// A log directory of its own under `dir` for one scenario run.
    pub fn logs_for(&self, scenario: &str) -> PathBuf {
        self.log_dir.join(scenario)
    }
}

/// What running a scenario gives: a future borrowing the lab.
pub type Run<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Verdict>> + Send + 'a>>;

/// A scenario's name, what it shows, and how to run it.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Lab) -> Run<'_>,
}

/// Every scenario, in the seed's order.
pub fn all() -> Vec<Scenario> {
    let mut all = shared_queue::scenarios();
    all.extend(pipeline::scenarios());
    all.extend(pubsub::scenarios());
    all.extend(poll::scenarios());
    all
}

/// Looks a scenario up by name.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}
