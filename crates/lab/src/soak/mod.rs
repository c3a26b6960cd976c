//! The soak: the three systems at once for minutes under random faults, then a count of what was
//! lost or duplicated and a look at every long-lived process's memory and file descriptors.
//!
//! - Shared queue: a broker pair (docs/pairs.md), three workers and two clients of both in
//!   rounds of 400 requests (Lazy Pirate: every request must be answered, none twice).
//! - Pipeline: a master over a batch of images, again and again on the same endpoints, and
//!   three long-lived workers (every image of every batch done, exactly once, on disk).
//! - Pub/sub: a proxy, two publishers and three subscribers (every update a subscriber misses
//!   must show as a gap it can prove from the sequence numbers; none received twice).
//!
//! Faults come one at a time, at seeded random moments: SIGKILL of the active broker, the proxy or a
//! worker (restarted after a moment), SIGSTOP/SIGCONT hangs, and partitions made by the
//! blackholing [`Relay`] in front of each system (no root needed). One worker of each kind
//! (`sq-w1`, `pw1`), the publishers and the subscribers are never killed: their memory is
//! judged over the whole run, not reset by a restart.
//!
//! Every second the lab reads VmRSS and the open descriptors of each long-lived process from
//! `/proc` ([`crate::procstat`]); a process is flat when the largest value of the last quarter of
//! the run is within a tolerance of the largest of the first quarter. The samples go to
//! `samples.csv`, the figures to `report.json`, and a picture of RSS over time to `rss.svg`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};
use broker::ClientSummary;
use pubsub::{PublisherSummary, SubscriberSummary};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::process::Proc;
use crate::relay::Relay;
use crate::scenarios::Lab;
use crate::verdict::Verdict;
use crate::{procstat, Signal};

mod faults;
mod images;
mod judging;
mod plots;
mod queue;
mod run;
mod weather;

use faults::*;
use images::*;
use judging::*;
use plots::*;
use queue::*;
use weather::*;

pub use plots::replot;
pub use run::run;

/// What a soak is asked to do.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// How long faults are made; the run takes about 20 s more (start, settle, stop).
    pub duration: Duration,
    pub seed: u64,
    /// Where `samples.csv`, `report.json` and `rss.svg` go.
    pub out: PathBuf,
    /// Break something the soak does not recover, to see the verdict fail.
    pub sabotage: Option<Sabotage>,
}

/// A fault the soak does not recover from, to check that its verdict notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sabotage {
    /// SIGKILL the pipeline master halfway through the run: its batch is lost.
    KillMaster,
}

/// How often each process is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);
/// After the last fault, time for everything to reconnect before the final counts.
const SETTLE: Duration = Duration::from_secs(6);
const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// RSS tolerance: the last quarter's peak may exceed the first quarter's by this many KiB plus
/// [`RSS_SLACK_PERCENT`] of it. The processes here live in 4 to 16 MiB; the allocator keeps
/// freed pages and a tokio runtime spreads buffers over its threads' arenas, so a healthy one
/// wanders by a few hundred KiB (1 MiB at most in the runs of docs/soak.md). A leak of a few
/// dozen bytes per request or update (a 30-minute run carries over a million of each) grows
/// by more than this.
pub const RSS_SLACK_KIB: u64 = 4 * 1024;
pub const RSS_SLACK_PERCENT: u64 = 25;
/// Descriptor tolerance: a few connections being re-established at the moment of a sample
/// (a reconnect holds the old and the new socket for a moment); a descriptor leaked per fault
/// or per reconnect (hundreds of them) shows far beyond.
pub const FD_SLACK: u64 = 8;

/// The lab's own name in the samples.
const LAB: &str = "lab";
const SQ_WORKERS: usize = 3;
const CLIENTS: usize = 2;
const CLIENT_REQUESTS: u64 = 400;
const PIPE_WORKERS: usize = 3;
const IMAGES: usize = 36;
const FILTER: &str = "grayscale,blur:1.5";
const ZIPS: [&str; 4] = ["10001", "10002", "10003", "10004"];
const PUBLISHERS: [&str; 2] = ["p1", "p2"];
const SUBSCRIBERS: [(&str, &str); 3] = [
    ("s1", "10001"),
    ("s2", "10002,10003"),
    ("s3", "10001,10002,10003,10004"),
];

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A long-lived role: its current process (none while killed) and how many were started.
#[derive(Debug)]
struct Slot {
    name: String,
    proc: Option<Proc>,
    instances: u32,
}

impl Slot {
    fn new(name: &str, proc: Proc) -> Self {
        Self {
            name: name.into(),
            proc: Some(proc),
            instances: 1,
        }
    }

    fn set(&mut self, proc: Proc) {
        self.proc = Some(proc);
        self.instances += 1;
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        match &self.proc {
            Some(p) => p.signal(signal),
            None => Ok(()),
        }
    }

    async fn kill(&mut self) -> Result<()> {
        match self.proc.take() {
            Some(mut p) => p.kill().await,
            None => Ok(()),
        }
    }

    /// SIGTERM and wait: the exit status, if it was running.
    async fn stop(&mut self) -> Result<Option<ExitStatus>> {
        let Some(p) = self.proc.as_mut() else {
            return Ok(None);
        };
        p.signal(Signal::SIGCONT)?;
        p.signal(Signal::SIGTERM)?;
        Ok(Some(p.wait(EXIT_WITHIN).await?))
    }
}

fn spawn(lab: &Lab, logs: &Path, name: &str, bin: &str, args: &[String]) -> Result<Proc> {
    Proc::spawn(name, &lab.bins.path(bin), args, logs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: impl Fn(f64) -> u64, fds: impl Fn(f64) -> u64) -> Vec<Sample> {
        (0..=100)
            .map(|t| {
                let t_s = t as f64;
                Sample {
                    t_s,
                    process: "x".into(),
                    pid: 1,
                    rss_kib: rss(t_s),
                    fds: fds(t_s),
                }
            })
            .collect()
    }

    fn failures(samples: &[Sample]) -> Vec<String> {
        let refs: Vec<&Sample> = samples.iter().collect();
        judge_process("x", &refs, 100.0)
            .expect("both quarters sampled")
            .1
    }

    #[test]
    fn a_wandering_process_is_flat() {
        // A start-up peak, then a few MiB up and down, descriptors coming and going.
        let s = samples(
            |t| {
                if t < 5.0 {
                    30_000
                } else {
                    20_000 + (t as u64 % 7) * 500
                }
            },
            |t| 12 + (t as u64 % 3),
        );
        assert!(failures(&s).is_empty(), "{:?}", failures(&s));
    }

    #[test]
    fn a_leak_is_not() {
        // 200 KiB and one descriptor more every second.
        let s = samples(|t| 10_000 + t as u64 * 200, |t| 12 + t as u64);
        let f = failures(&s);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(
            f[0].contains("RSS") && f[1].contains("descriptors"),
            "{f:?}"
        );
    }
}
