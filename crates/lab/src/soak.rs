//! The soak: the three systems at once for minutes under random faults, then a count of what was
//! lost or duplicated and a look at every long-lived process's memory and file descriptors.
//!
//! - Shared queue: a broker, three workers and two clients in rounds of 400 requests (Lazy
//!   Pirate: every request must be answered, none twice).
//! - Pipeline: a master over a batch of images, again and again on the same endpoints, and
//!   three long-lived workers (every image of every batch done, exactly once, on disk).
//! - Pub/sub: a proxy, two publishers and three subscribers (every update a subscriber misses
//!   must show as a gap it can prove from the sequence numbers; none received twice).
//!
//! Faults come one at a time, at seeded random moments: SIGKILL of the broker, the proxy or a
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

// ---------------------------------------------------------------------------------------------
// Shared queue

#[derive(Debug, Default, Serialize)]
struct QueueTotals {
    rounds: u64,
    requests: u64,
    answered: u64,
    lost: u64,
    duplicates: u64,
    corrupt: u64,
    retries: u64,
    reconnects: u64,
    failed_rounds: u64,
}

struct Queue {
    broker: Slot,
    frontend: String,
    backend: String,
    front: Relay,
    back: Relay,
    workers: Vec<Slot>,
    clients: Vec<Option<Proc>>,
    totals: QueueTotals,
}

async fn start_broker(lab: &Lab, logs: &Path, frontend: &str, backend: &str) -> Result<Proc> {
    let args = strings(&[
        "--frontend",
        frontend,
        "--backend",
        backend,
        "--stats-secs",
        "10",
    ]);
    let mut broker = spawn(lab, logs, "broker", "broker", &args)?;
    broker.ready(READY_WITHIN).await?;
    Ok(broker)
}

impl Queue {
    async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let args = strings(&[
            "--frontend",
            "tcp://127.0.0.1:0",
            "--backend",
            "tcp://127.0.0.1:0",
            "--stats-secs",
            "10",
        ]);
        let mut broker = spawn(lab, logs, "broker", "broker", &args)?;
        let ready = broker.ready(READY_WITHIN).await?;
        let frontend = ready.get("frontend").cloned().context("no frontend")?;
        let backend = ready.get("backend").cloned().context("no backend")?;
        let front = Relay::start(common::endpoint::resolve(&frontend)?).await?;
        let back = Relay::start(common::endpoint::resolve(&backend)?).await?;
        let mut queue = Self {
            broker: Slot::new("broker", broker),
            frontend,
            backend,
            front,
            back,
            workers: Vec::new(),
            clients: (0..CLIENTS).map(|_| None).collect(),
            totals: QueueTotals::default(),
        };
        for i in 0..SQ_WORKERS {
            let w = queue.worker(lab, logs, i).await?;
            queue.workers.push(Slot::new(&format!("sq-w{}", i + 1), w));
        }
        Ok(queue)
    }

    async fn worker(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let id = format!("sq-w{}", i + 1);
        let args = strings(&[
            "--connect",
            &self.back.endpoint(),
            "--id",
            &id,
            "--work-ms",
            "2",
        ]);
        let mut w = spawn(lab, logs, &id, "worker", &args)?;
        w.ready(READY_WITHIN).await?;
        Ok(w)
    }

    fn client(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let args = strings(&[
            "--connect",
            &self.front.endpoint(),
            "--requests",
            &CLIENT_REQUESTS.to_string(),
            "--concurrency",
            "4",
            "--timeout-ms",
            "1000",
            "--deadline-secs",
            "120",
            "--json",
        ]);
        spawn(lab, logs, &format!("client-{}", i + 1), "client", &args)
    }

    /// Accounts for every client round that ended; starts the next if `more`.
    async fn poll(
        &mut self,
        lab: &Lab,
        logs: &Path,
        more: bool,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        for i in 0..self.clients.len() {
            if let Some(c) = &self.clients[i] {
                if !procstat::exited(c.pid()) {
                    continue;
                }
            }
            if let Some(mut c) = self.clients[i].take() {
                let status = c.wait(EXIT_WITHIN).await?;
                self.account(&c, status, failures);
            }
            if more {
                self.clients[i] = Some(self.client(lab, logs, i)?);
            }
        }
        Ok(())
    }

    fn account(&mut self, c: &Proc, status: ExitStatus, failures: &mut Vec<String>) {
        let t = &mut self.totals;
        t.rounds += 1;
        t.requests += CLIENT_REQUESTS;
        match c.json::<ClientSummary>() {
            Ok(s) => {
                t.answered += s.answered;
                t.lost += CLIENT_REQUESTS - s.answered.min(CLIENT_REQUESTS);
                t.duplicates += s.duplicates;
                t.corrupt += s.corrupt;
                t.retries += s.retries;
                t.reconnects += s.reconnects;
                if !status.success() || s.answered != CLIENT_REQUESTS {
                    t.failed_rounds += 1;
                    failures.push(format!(
                        "{} round {}: {} of {CLIENT_REQUESTS} answered, {status}",
                        c.name, t.rounds, s.answered
                    ));
                }
            }
            Err(e) => {
                t.lost += CLIENT_REQUESTS;
                t.failed_rounds += 1;
                failures.push(format!("{} round {}: {e:#}", c.name, t.rounds));
            }
        }
    }

    /// Waits for the running rounds to end and accounts for them.
    async fn finish(&mut self, failures: &mut Vec<String>) -> Result<()> {
        for i in 0..self.clients.len() {
            if let Some(mut c) = self.clients[i].take() {
                let status = c.wait(Duration::from_secs(150)).await?;
                self.account(&c, status, failures);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Pipeline

#[derive(Debug, Default, Serialize)]
struct PipeTotals {
    batches: u64,
    images: u64,
    done: u64,
    lost: u64,
    duplicated: u64,
    resent: u64,
    failed_batches: u64,
    temp_files_left: u64,
}

struct Pipe {
    input: PathBuf,
    out_root: PathBuf,
    /// tasks, results, control: where every master binds.
    binds: Vec<String>,
    relays: Vec<Relay>,
    master: Option<Proc>,
    batch: u64,
    batch_started: Instant,
    workers: Vec<Slot>,
    totals: PipeTotals,
}

impl Pipe {
    async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let input = logs.join("pipeline-in");
        let _ = std::fs::remove_dir_all(&input);
        std::fs::create_dir_all(&input)?;
        pipeline::sample::generate(&input, IMAGES, 192).context("cannot generate images")?;
        let out_root = logs.join("pipeline-out");
        let _ = std::fs::remove_dir_all(&out_root);
        let any = "tcp://127.0.0.1:0".to_string();
        let mut pipe = Self {
            input,
            out_root,
            binds: vec![any.clone(), any.clone(), any],
            relays: Vec::new(),
            master: None,
            batch: 0,
            batch_started: Instant::now(),
            workers: Vec::new(),
            totals: PipeTotals::default(),
        };
        let ready = pipe.next_batch(lab, logs).await?;
        pipe.binds = ["tasks", "results", "control"]
            .iter()
            .map(|k| ready.get(*k).cloned().context("master's ready line"))
            .collect::<Result<_>>()?;
        for bound in &pipe.binds {
            pipe.relays
                .push(Relay::start(common::endpoint::resolve(bound)?).await?);
        }
        for i in 0..PIPE_WORKERS {
            let w = pipe.worker(lab, logs, i)?;
            pipe.workers.push(Slot::new(&format!("pw{}", i + 1), w));
        }
        Ok(pipe)
    }

    fn worker(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let id = format!("pw{}", i + 1);
        let connect: Vec<String> = self.relays.iter().map(Relay::endpoint).collect();
        let args = strings(&[
            "--connect",
            &connect.join(","),
            "--id",
            &id,
            "--delay-ms",
            "60",
        ]);
        spawn(lab, logs, &id, "pipeline-worker", &args)
    }

    fn output(&self) -> PathBuf {
        self.out_root.join(format!("batch-{}", self.batch))
    }

    async fn next_batch(&mut self, lab: &Lab, logs: &Path) -> Result<BTreeMap<String, String>> {
        self.batch += 1;
        let output = self.output();
        let args = strings(&[
            "--input",
            &self.input.display().to_string(),
            "--output",
            &output.display().to_string(),
            "--filter",
            FILTER,
            "--tasks-bind",
            &self.binds[0],
            "--results-bind",
            &self.binds[1],
            "--control-bind",
            &self.binds[2],
            "--json",
            "--no-progress",
        ]);
        let mut master = spawn(lab, logs, "pipeline-master", "pipeline", &args)?;
        let ready = master.ready(READY_WITHIN).await?;
        self.master = Some(master);
        self.batch_started = Instant::now();
        Ok(ready)
    }

    /// Judges the batch that ended, if any, and starts the next if `more`.
    async fn poll(
        &mut self,
        lab: &Lab,
        logs: &Path,
        more: bool,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        let Some(master) = &mut self.master else {
            return Ok(());
        };
        if !procstat::exited(master.pid()) {
            // A batch of a few seconds that takes minutes is stuck: that is a failure.
            if self.batch_started.elapsed() > Duration::from_secs(180) {
                // Counted as failed when judged below.
                give_up_stuck(self.batch, master, logs, failures).await?;
            } else {
                return Ok(());
            }
        }
        let status = master.wait(EXIT_WITHIN).await?;
        let summary: Result<Value> = master.json();
        self.judge(status, summary, failures);
        self.master = None;
        if more {
            self.next_batch(lab, logs).await?;
        }
        Ok(())
    }

    fn judge(&mut self, status: ExitStatus, summary: Result<Value>, failures: &mut Vec<String>) {
        let output = self.output();
        let t = &mut self.totals;
        t.batches += 1;
        t.images += IMAGES as u64;
        let names = |dir: &Path| -> BTreeSet<String> {
            pipeline::files::list_files(dir, None)
                .unwrap_or_default()
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        let inputs = names(&self.input);
        let outputs = names(&output);
        let missing = inputs.difference(&outputs).count() as u64;
        let extra = outputs.difference(&inputs).count() as u64;
        t.temp_files_left += pipeline::files::temp_files(&output).len() as u64;
        let field = |s: &Value, f: &str| s.get(f).and_then(Value::as_u64).unwrap_or(0);
        let (done, failed, resent) = match &summary {
            Ok(s) => (field(s, "done"), field(s, "failed"), field(s, "resent")),
            Err(_) => (0, 0, 0),
        };
        t.done += done.min(IMAGES as u64);
        t.lost += missing;
        t.duplicated += extra + done.saturating_sub(IMAGES as u64);
        t.resent += resent;
        let ok = status.success()
            && summary.is_ok()
            && done == IMAGES as u64
            && failed == 0
            && missing == 0
            && extra == 0;
        if !ok {
            t.failed_batches += 1;
            let why = match &summary {
                Ok(_) => format!(
                    "{status}, {done} done, {failed} failed, {missing} missing on disk, {extra} unexpected"
                ),
                Err(e) => format!("{status}, {e:#}"),
            };
            failures.push(format!("pipeline batch {}: {why}", self.batch));
        }
        let _ = std::fs::remove_dir_all(&output);
    }

    async fn finish(&mut self, logs: &Path, failures: &mut Vec<String>) -> Result<()> {
        if let Some(master) = &mut self.master {
            let status = match master.wait(Duration::from_secs(180)).await {
                Ok(status) => status,
                Err(_) => {
                    // Stuck: counted as a failed batch (its images lost), as during the run.
                    give_up_stuck(self.batch, master, logs, failures).await?;
                    master.wait(EXIT_WITHIN).await?
                }
            };
            let summary: Result<Value> = master.json();
            self.judge(status, summary, failures);
            self.master = None;
        }
        Ok(())
    }
}

/// Records batch `batch` as stuck, keeps a [`snapshot`] of its master and kills it.
async fn give_up_stuck(
    batch: u64,
    master: &mut Proc,
    logs: &Path,
    failures: &mut Vec<String>,
) -> Result<()> {
    failures.push(format!("pipeline batch {batch} stuck for 180 s"));
    snapshot(master.pid(), &logs.join(format!("stuck-batch-{batch}.txt")));
    master.kill().await
}

/// What a stuck master was doing, kept beside the logs: every TCP socket on the machine with its
/// owner and queues (`ss -tanpi`, to tell a master that stopped accepting from a link that
/// hangs) and, where gdb is installed, the stack of each of its threads.
fn snapshot(pid: i32, path: &Path) {
    let pid = pid.to_string();
    let commands: [(&str, &[&str]); 2] = [
        ("ss", &["-tanpi"]),
        ("gdb", &["-batch", "-p", &pid, "-ex", "thread apply all bt"]),
    ];
    let mut text = Vec::new();
    for (program, args) in commands {
        text.extend(format!("$ {program} {}\n", args.join(" ")).into_bytes());
        match std::process::Command::new(program).args(args).output() {
            Ok(out) => text.extend(out.stdout),
            Err(e) => text.extend(format!("cannot run {program}: {e}\n").into_bytes()),
        }
    }
    let _ = std::fs::write(path, text);
}

// ---------------------------------------------------------------------------------------------
// Pub/sub

/// Which links of the proxy a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Both,
    Publishers,
    Subscribers,
}

struct PubSub {
    proxy: Slot,
    xsub: String,
    xpub: String,
    to_xsub: Relay,
    to_xpub: Relay,
    publishers: Vec<Slot>,
    subscribers: Vec<Slot>,
}

async fn start_proxy(
    lab: &Lab,
    logs: &Path,
    xsub: &str,
    xpub: &str,
) -> Result<(Proc, String, String)> {
    // No last value cache: it re-sends the last update of each zip to every re-subscription by
    // design (see the late-joiner scenario), which subscribers count as duplicates. Off, any
    // duplicate is a fault.
    let args = strings(&[
        "--xsub",
        xsub,
        "--xpub",
        xpub,
        "--no-last-value",
        "--stats-secs",
        "10",
    ]);
    let mut proxy = spawn(lab, logs, "proxy", "proxy", &args)?;
    let ready = proxy.ready(READY_WITHIN).await?;
    let xsub = ready.get("xsub").cloned().context("no xsub")?;
    let xpub = ready.get("xpub").cloned().context("no xpub")?;
    Ok((proxy, xsub, xpub))
}

impl PubSub {
    async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let any = "tcp://127.0.0.1:0";
        let (proxy, xsub, xpub) = start_proxy(lab, logs, any, any).await?;
        let to_xsub = Relay::start(common::endpoint::resolve(&xsub)?).await?;
        let to_xpub = Relay::start(common::endpoint::resolve(&xpub)?).await?;
        let mut subscribers = Vec::new();
        for (name, zips) in SUBSCRIBERS {
            let args = strings(&["--connect", &to_xpub.endpoint(), "--zip", zips, "--json"]);
            let mut s = spawn(lab, logs, name, "subscriber", &args)?;
            s.ready(READY_WITHIN).await?;
            subscribers.push(Slot::new(name, s));
        }
        let mut publishers = Vec::new();
        for name in PUBLISHERS {
            let range = format!("{}-{}", ZIPS[0], ZIPS[ZIPS.len() - 1]);
            let args = strings(&[
                "--connect",
                &to_xsub.endpoint(),
                "--id",
                name,
                "--zip-range",
                &range,
                "--rate",
                "200",
                "--wait-subscriber-ms",
                "10000",
                "--json",
            ]);
            let mut p = spawn(lab, logs, name, "publisher", &args)?;
            p.ready(READY_WITHIN).await?;
            publishers.push(Slot::new(name, p));
        }
        Ok(Self {
            proxy: Slot::new("proxy", proxy),
            xsub,
            xpub,
            to_xsub,
            to_xpub,
            publishers,
            subscribers,
        })
    }

    fn set_partitioned(&self, side: Side, partitioned: bool) {
        if side != Side::Subscribers {
            self.to_xsub.set_partitioned(partitioned);
        }
        if side != Side::Publishers {
            self.to_xpub.set_partitioned(partitioned);
        }
    }

    /// Stops the publishers, lets the last updates arrive, stops the subscribers, and judges
    /// each subscriber against what the publishers numbered.
    async fn finish(&mut self, v: &mut Verdict) -> Result<()> {
        let mut sent = Vec::new();
        for p in &mut self.publishers {
            let status = p.stop().await?;
            let proc = p.proc.as_ref().context("publisher gone")?;
            v.expect(
                status.is_some_and(|s| s.success()),
                format!("{} exits 0 on SIGTERM", p.name),
            );
            sent.push(proc.json::<PublisherSummary>()?);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut figures = BTreeMap::new();
        let (mut total_received, mut total_gaps, mut total_late, mut total_dups) = (0, 0, 0, 0);
        for (s, (name, zips)) in self.subscribers.iter_mut().zip(SUBSCRIBERS) {
            let status = s.stop().await?;
            let proc = s.proc.as_ref().context("subscriber gone")?;
            v.expect(
                status.is_some_and(|s| s.success()),
                format!("{name} exits 0 on SIGTERM"),
            );
            let got: SubscriberSummary = proc.json()?;
            let zips: Vec<&str> = zips.split(',').collect();
            judge_subscriber(v, name, &got, &zips, &sent);
            total_received += got.received;
            total_gaps += got.gaps;
            total_late += got.late;
            total_dups += got.duplicates;
            figures.insert(
                name.to_string(),
                json!({"received": got.received, "gaps": got.gaps, "late": got.late, "duplicates": got.duplicates, "reconnects": got.reconnects, "proxies": got.proxies}),
            );
        }
        v.figure("updates_sent", sent.iter().map(|p| p.sent).sum::<u64>())
            .figure("updates_unsent", sent.iter().map(|p| p.unsent).sum::<u64>())
            .figure("updates_received", total_received)
            .figure("updates_gaps", total_gaps)
            .figure("updates_late", total_late)
            .figure("updates_duplicated", total_dups)
            .figure("subscribers", Value::Object(figures.into_iter().collect()));
        Ok(())
    }
}

/// A subscriber received exactly what was numbered for its zips from its first update of each
/// stream on, minus the gaps it proves; it reached the last number of each stream; and it got
/// nothing twice.
fn judge_subscriber(
    v: &mut Verdict,
    name: &str,
    s: &SubscriberSummary,
    zips: &[&str],
    publishers: &[PublisherSummary],
) {
    let sent: u64 = publishers
        .iter()
        .flat_map(|p| zips.iter().map(|z| p.by_zip.get(*z).copied().unwrap_or(0)))
        .sum();
    let before_first: u64 = s.streams.iter().map(|st| st.first.saturating_sub(1)).sum();
    v.expect(
        s.received + s.gaps + before_first == sent,
        format!(
            "{name}: received {} + proven gaps {} + before its first {before_first} = numbered {sent}",
            s.received, s.gaps
        ),
    );
    v.expect(
        s.duplicates == 0,
        format!(
            "{name} received nothing twice, got {} duplicates",
            s.duplicates
        ),
    );
    for p in publishers {
        for z in zips {
            let last = p.by_zip.get(*z).copied().unwrap_or(0);
            let reached = s
                .streams
                .iter()
                .any(|st| st.publisher == p.id && st.zip == *z && st.last == last);
            v.expect(
                reached,
                format!("{name} got the last update of {} {z} ({last})", p.id),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillBroker,
    HangBroker,
    KillWorker(usize),
    HangWorker(usize),
    PartitionQueue,
    KillPipelineWorker(usize),
    HangPipelineWorker(usize),
    PartitionPipeline,
    KillProxy,
    HangProxy,
    HangSubscriber(usize),
    PartitionPubsub(Side),
}

impl Fault {
    fn kind(self) -> &'static str {
        match self {
            Fault::KillBroker => "kill-broker",
            Fault::HangBroker => "hang-broker",
            Fault::KillWorker(_) => "kill-worker",
            Fault::HangWorker(_) => "hang-worker",
            Fault::PartitionQueue => "partition-queue",
            Fault::KillPipelineWorker(_) => "kill-pipeline-worker",
            Fault::HangPipelineWorker(_) => "hang-pipeline-worker",
            Fault::PartitionPipeline => "partition-pipeline",
            Fault::KillProxy => "kill-proxy",
            Fault::HangProxy => "hang-proxy",
            Fault::HangSubscriber(_) => "hang-subscriber",
            Fault::PartitionPubsub(_) => "partition-pubsub",
        }
    }

    /// A random fault and how long it lasts (a killed process stays down that long).
    fn pick(rng: &mut StdRng) -> (Self, Duration) {
        // Workers 2 and 3 may be killed; worker 1 of each kind only hangs (see the module doc).
        let killable = |rng: &mut StdRng, n: usize| rng.gen_range(1..n);
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.gen_range(lo..=hi));
        match rng.gen_range(0..12) {
            0 => (Fault::KillBroker, ms(rng, 300, 2000)),
            // Hangs of the broker and the proxy stay below their 10 s watchdog.
            1 => (Fault::HangBroker, ms(rng, 1000, 4000)),
            2 => (
                Fault::KillWorker(killable(rng, SQ_WORKERS)),
                ms(rng, 300, 2000),
            ),
            3 => (
                Fault::HangWorker(rng.gen_range(0..SQ_WORKERS)),
                ms(rng, 1000, 6000),
            ),
            4 => (Fault::PartitionQueue, ms(rng, 1000, 6000)),
            5 => (
                Fault::KillPipelineWorker(killable(rng, PIPE_WORKERS)),
                ms(rng, 300, 2000),
            ),
            6 => (
                Fault::HangPipelineWorker(rng.gen_range(0..PIPE_WORKERS)),
                ms(rng, 1000, 6000),
            ),
            7 => (Fault::PartitionPipeline, ms(rng, 1000, 6000)),
            8 => (Fault::KillProxy, ms(rng, 300, 2000)),
            9 => (Fault::HangProxy, ms(rng, 1000, 4000)),
            10 => (
                Fault::HangSubscriber(rng.gen_range(0..SUBSCRIBERS.len())),
                ms(rng, 1000, 5000),
            ),
            _ => {
                let side = [Side::Both, Side::Publishers, Side::Subscribers][rng.gen_range(0..3)];
                (Fault::PartitionPubsub(side), ms(rng, 1000, 6000))
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct FaultRecord {
    at_s: f64,
    kind: &'static str,
    target: String,
    held_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Samples

#[derive(Debug, Clone, Serialize)]
struct Sample {
    t_s: f64,
    process: String,
    pid: i32,
    rss_kib: u64,
    fds: u64,
}

/// First, last and largest value of one measure of one process.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    first: u64,
    last: u64,
    max: u64,
    /// Largest of the first quarter of the run, and of the last quarter.
    first_quarter_max: u64,
    last_quarter_max: u64,
}

fn spread(samples: &[&Sample], value: impl Fn(&Sample) -> u64, run_s: f64) -> Option<Spread> {
    let first = value(samples.first()?);
    let last = value(samples.last()?);
    let max = samples.iter().map(|s| value(s)).max()?;
    let quarter = |lo: f64, hi: f64| {
        samples
            .iter()
            .filter(|s| s.t_s >= lo && s.t_s <= hi)
            .map(|s| value(s))
            .max()
    };
    Some(Spread {
        first,
        last,
        max,
        first_quarter_max: quarter(0.0, run_s / 4.0)?,
        last_quarter_max: quarter(run_s * 3.0 / 4.0, run_s)?,
    })
}

/// One process's figures (instances; RSS and descriptors as first, last, max) and the ways it
/// is not flat: the last quarter's peak beyond the first quarter's plus the tolerance.
/// `None` without samples in both quarters.
fn judge_process(name: &str, samples: &[&Sample], run_s: f64) -> Option<(Value, Vec<String>)> {
    let instances = samples.iter().map(|s| s.pid).collect::<BTreeSet<_>>().len();
    let rss = spread(samples, |s| s.rss_kib, run_s)?;
    let fds = spread(samples, |s| s.fds, run_s)?;
    let rss_limit =
        rss.first_quarter_max + RSS_SLACK_KIB + rss.first_quarter_max * RSS_SLACK_PERCENT / 100;
    let fd_limit = fds.first_quarter_max + FD_SLACK;
    let mut failures = Vec::new();
    if rss.last_quarter_max > rss_limit {
        failures.push(format!(
            "{name}: RSS flat, last quarter's peak {} KiB <= {rss_limit} KiB (first quarter's {} KiB)",
            rss.last_quarter_max, rss.first_quarter_max
        ));
    }
    if fds.last_quarter_max > fd_limit {
        failures.push(format!(
            "{name}: descriptors flat, last quarter's peak {} <= {fd_limit} (first quarter's {})",
            fds.last_quarter_max, fds.first_quarter_max
        ));
    }
    let figures = json!({
        "instances": instances,
        "rss_kib": [rss.first, rss.last, rss.max],
        "fds": [fds.first, fds.last, fds.max],
        "quarters_rss_kib": [rss.first_quarter_max, rss.last_quarter_max],
        "quarters_fds": [fds.first_quarter_max, fds.last_quarter_max],
    });
    Some((figures, failures))
}

// ---------------------------------------------------------------------------------------------
// The run

struct Soak {
    lab: Lab,
    logs: PathBuf,
    rng: StdRng,
    started: Instant,
    queue: Queue,
    pipe: Pipe,
    pubsub: PubSub,
    samples: Vec<Sample>,
    faults: Vec<FaultRecord>,
    failures: Vec<String>,
}

impl Soak {
    /// Every long-lived slot, for sampling (the master too: one per batch).
    fn slots(&self) -> Vec<&Slot> {
        let mut all = vec![&self.queue.broker];
        all.extend(&self.queue.workers);
        all.extend(&self.pipe.workers);
        all.push(&self.pubsub.proxy);
        all.extend(&self.pubsub.publishers);
        all.extend(&self.pubsub.subscribers);
        all
    }

    fn slots_mut(&mut self) -> Vec<&mut Slot> {
        let mut all = vec![&mut self.queue.broker];
        all.extend(&mut self.queue.workers);
        all.extend(&mut self.pipe.workers);
        all.push(&mut self.pubsub.proxy);
        all.extend(&mut self.pubsub.publishers);
        all.extend(&mut self.pubsub.subscribers);
        all
    }

    /// Reads RSS and descriptors of every process; a long-lived one that exited by itself is
    /// a failure (reaped, and its slot stays empty).
    async fn sample(&mut self) -> Result<()> {
        let t_s = self.started.elapsed().as_secs_f64();
        let mut live: Vec<(String, i32)> = self
            .slots()
            .iter()
            .filter_map(|s| s.proc.as_ref().map(|p| (s.name.clone(), p.pid())))
            .collect();
        if let Some(m) = &self.pipe.master {
            live.push(("pipeline-master".into(), m.pid()));
        }
        // The lab itself, for its relays' connections; shown, not judged (it keeps the samples).
        live.push((LAB.into(), std::process::id() as i32));
        let me = std::process::id() as i32;
        for (process, pid) in live {
            // A child caught between fork and exec is still a copy of the lab (its descriptors
            // and all): not a sample of the role.
            if pid != me && procstat::same_program(pid, me) {
                continue;
            }
            if let (Some(rss_kib), Some(fds)) = (procstat::rss_kib(pid), procstat::open_fds(pid)) {
                if !procstat::exited(pid) {
                    self.samples.push(Sample {
                        t_s,
                        process,
                        pid,
                        rss_kib,
                        fds,
                    });
                }
            }
        }
        let mut died = Vec::new();
        for slot in self.slots_mut() {
            if let Some(p) = &mut slot.proc {
                if procstat::exited(p.pid()) {
                    let status = p.wait(EXIT_WITHIN).await?;
                    died.push(format!(
                        "{} exited by itself at {t_s:.0} s ({status})\n{}",
                        slot.name,
                        p.log_tail()
                    ));
                    slot.proc = None;
                }
            }
        }
        self.failures.extend(died);
        Ok(())
    }

    async fn apply(&mut self, fault: Fault) -> Result<String> {
        let q = &mut self.queue;
        let p = &mut self.pipe;
        let ps = &mut self.pubsub;
        let target = match fault {
            Fault::KillBroker => {
                q.broker.kill().await?;
                "broker".to_string()
            }
            Fault::HangBroker => {
                q.broker.signal(Signal::SIGSTOP)?;
                "broker".into()
            }
            Fault::KillWorker(i) => {
                q.workers[i].kill().await?;
                q.workers[i].name.clone()
            }
            Fault::HangWorker(i) => {
                q.workers[i].signal(Signal::SIGSTOP)?;
                q.workers[i].name.clone()
            }
            Fault::PartitionQueue => {
                q.front.set_partitioned(true);
                q.back.set_partitioned(true);
                "clients+workers|broker".into()
            }
            Fault::KillPipelineWorker(i) => {
                p.workers[i].kill().await?;
                p.workers[i].name.clone()
            }
            Fault::HangPipelineWorker(i) => {
                p.workers[i].signal(Signal::SIGSTOP)?;
                p.workers[i].name.clone()
            }
            Fault::PartitionPipeline => {
                p.relays.iter().for_each(|r| r.set_partitioned(true));
                "workers|master".into()
            }
            Fault::KillProxy => {
                ps.proxy.kill().await?;
                "proxy".into()
            }
            Fault::HangProxy => {
                ps.proxy.signal(Signal::SIGSTOP)?;
                "proxy".into()
            }
            Fault::HangSubscriber(i) => {
                ps.subscribers[i].signal(Signal::SIGSTOP)?;
                ps.subscribers[i].name.clone()
            }
            Fault::PartitionPubsub(side) => {
                ps.set_partitioned(side, true);
                match side {
                    Side::Both => "publishers+subscribers|proxy",
                    Side::Publishers => "publishers|proxy",
                    Side::Subscribers => "subscribers|proxy",
                }
                .into()
            }
        };
        Ok(target)
    }

    async fn undo(&mut self, fault: Fault) -> Result<()> {
        let (lab, logs) = (&self.lab, &self.logs);
        match fault {
            Fault::KillBroker => {
                let q = &mut self.queue;
                let b = start_broker(lab, logs, &q.frontend, &q.backend).await?;
                q.broker.set(b);
            }
            Fault::HangBroker => self.queue.broker.signal(Signal::SIGCONT)?,
            Fault::KillWorker(i) => {
                let w = self.queue.worker(lab, logs, i).await?;
                self.queue.workers[i].set(w);
            }
            Fault::HangWorker(i) => self.queue.workers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionQueue => {
                self.queue.front.set_partitioned(false);
                self.queue.back.set_partitioned(false);
            }
            Fault::KillPipelineWorker(i) => {
                let w = self.pipe.worker(lab, logs, i)?;
                self.pipe.workers[i].set(w);
            }
            Fault::HangPipelineWorker(i) => self.pipe.workers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionPipeline => {
                self.pipe
                    .relays
                    .iter()
                    .for_each(|r| r.set_partitioned(false));
            }
            Fault::KillProxy => {
                let ps = &mut self.pubsub;
                let (proxy, _, _) = start_proxy(lab, logs, &ps.xsub, &ps.xpub).await?;
                ps.proxy.set(proxy);
            }
            Fault::HangProxy => self.pubsub.proxy.signal(Signal::SIGCONT)?,
            Fault::HangSubscriber(i) => self.pubsub.subscribers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionPubsub(side) => self.pubsub.set_partitioned(side, false),
        }
        Ok(())
    }

    async fn poll_work(&mut self, more: bool) -> Result<()> {
        let (lab, logs) = (&self.lab, &self.logs);
        self.queue.poll(lab, logs, more, &mut self.failures).await?;
        self.pipe.poll(lab, logs, more, &mut self.failures).await
    }

    /// Faults until `config.duration` has passed, then a quiet settle: work goes on all along.
    async fn run_faults(&mut self, config: &SoakConfig) -> Result<()> {
        let end = self.started + config.duration;
        let mut next_fault = self.started + Duration::from_secs(3);
        // The fault in force: what, until when, since when, its record, failed undo attempts.
        let mut active: Option<(Fault, Instant, Instant, usize, u32)> = None;
        let mut next_sample = Instant::now();
        let mut sabotage = config.sabotage;
        loop {
            let now = Instant::now();
            if sabotage == Some(Sabotage::KillMaster) && now >= self.started + config.duration / 2 {
                if let Some(master) = &self.pipe.master {
                    tracing::warn!("sabotage: killing the pipeline master");
                    master.signal(Signal::SIGKILL)?;
                    sabotage = None;
                }
            }
            if let Some((fault, until, since, record, attempts)) = active {
                if now >= until {
                    // A restart that fails (no ready line on a starved machine) is tried again
                    // a few times; either way the run goes on and its figures are kept.
                    match self.undo(fault).await {
                        Err(e) if attempts < 3 => {
                            self.fail(format!("undoing {} failed: {e:#}", fault.kind()));
                            active = Some((
                                fault,
                                Instant::now() + SAMPLE_EVERY,
                                since,
                                record,
                                attempts + 1,
                            ));
                        }
                        result => {
                            if let Err(e) = result {
                                self.fail(format!(
                                    "undoing {} failed, given up: {e:#}",
                                    fault.kind()
                                ));
                            }
                            self.faults[record].held_ms = since.elapsed().as_millis() as u64;
                            active = None;
                            next_fault = Instant::now()
                                + Duration::from_millis(self.rng.gen_range(1500..=5000));
                        }
                    }
                }
            } else if now >= end + SETTLE {
                break;
            } else if now >= next_fault && now < end {
                let (fault, hold) = Fault::pick(&mut self.rng);
                let target = match self.apply(fault).await {
                    Ok(target) => target,
                    Err(e) => {
                        self.fail(format!("making {} failed: {e:#}", fault.kind()));
                        "?".into()
                    }
                };
                self.faults.push(FaultRecord {
                    at_s: self.started.elapsed().as_secs_f64(),
                    kind: fault.kind(),
                    target,
                    held_ms: hold.as_millis() as u64,
                });
                tracing::info!(
                    kind = fault.kind(),
                    hold_ms = hold.as_millis() as u64,
                    "fault"
                );
                let now = Instant::now();
                active = Some((fault, now + hold, now, self.faults.len() - 1, 0));
            }
            if now >= next_sample {
                if let Err(e) = self.sample().await {
                    self.fail(format!("sampling failed: {e:#}"));
                }
                next_sample += SAMPLE_EVERY;
            }
            if let Err(e) = self.poll_work(true).await {
                self.fail(format!("{e:#}"));
            }
            tokio::time::sleep(TICK).await;
        }
        Ok(())
    }

    /// Records a failure (at most 100: a broken run repeats itself).
    fn fail(&mut self, failure: String) {
        tracing::warn!("{failure}");
        if self.failures.len() < 100 && self.failures.last() != Some(&failure) {
            self.failures.push(failure);
        }
    }
}

/// Runs the soak and judges it. Writes `samples.csv`, `report.json` and `rss.svg` to
/// `config.out`.
pub async fn run(lab: &Lab, config: &SoakConfig) -> Result<Verdict> {
    lab.bins.check(&[
        "broker",
        "worker",
        "client",
        "pipeline",
        "pipeline-worker",
        "proxy",
        "publisher",
        "subscriber",
    ])?;
    let logs = lab.logs_for("soak");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    let queue = Queue::start(lab, &logs).await?;
    let pipe = Pipe::start(lab, &logs).await?;
    let pubsub = PubSub::start(lab, &logs).await?;
    let mut soak = Soak {
        lab: lab.clone(),
        logs,
        rng: StdRng::seed_from_u64(config.seed),
        started: Instant::now(),
        queue,
        pipe,
        pubsub,
        samples: Vec::new(),
        faults: Vec::new(),
        failures: Vec::new(),
    };
    for slot in soak.slots() {
        tracing::info!(process = %slot.name, pid = slot.proc.as_ref().map(Proc::pid), "started");
    }
    if let Err(e) = soak.run_faults(config).await {
        soak.fail(format!("the run stopped early: {e:#}"));
    }
    let run_s = soak.started.elapsed().as_secs_f64();

    let mut v = Verdict::new("soak", "relay");
    v.figure("seed", config.seed)
        .figure(
            "fault_minutes",
            (config.duration.as_secs_f64() / 60.0 * 100.0).round() / 100.0,
        )
        .figure("run_s", run_s.round() as u64);
    // Whatever fails from here on is a failure of the verdict, not an error: the figures and
    // samples gathered so far are still written.
    if let Err(e) = soak.queue.finish(&mut soak.failures).await {
        soak.fail(format!("the last client rounds: {e:#}"));
    }
    if let Err(e) = soak.pipe.finish(&soak.logs, &mut soak.failures).await {
        soak.fail(format!("the last pipeline batch: {e:#}"));
    }
    if let Err(e) = soak.pubsub.finish(&mut v).await {
        soak.fail(format!("pub/sub summaries: {e:#}"));
    }
    // Publishers and subscribers were stopped and judged above.
    let q = &mut soak.queue;
    let mut rest: Vec<&mut Slot> = vec![&mut q.broker, &mut soak.pubsub.proxy];
    rest.extend(&mut q.workers);
    rest.extend(&mut soak.pipe.workers);
    for slot in rest {
        match slot.stop().await {
            Ok(Some(status)) => v.expect(
                status.success(),
                format!("{} exits 0 on SIGTERM, got {status}", slot.name),
            ),
            Ok(None) => &mut v,
            Err(e) => v.expect(false, format!("{} stops on SIGTERM: {e:#}", slot.name)),
        };
    }

    // Work: lost and duplicated.
    let q = &soak.queue.totals;
    v.figure("requests", q.requests)
        .figure("requests_answered", q.answered)
        .figure("requests_lost", q.lost)
        .figure("requests_duplicated", q.duplicates)
        .figure("requests_retried", q.retries)
        .figure("client_rounds", q.rounds);
    v.expect(q.rounds > 0, "some client rounds ran");
    v.expect(q.lost == 0, format!("no request lost, lost {}", q.lost))
        .expect(
            q.duplicates == 0,
            format!("no request answered twice, got {}", q.duplicates),
        )
        .expect(
            q.corrupt == 0,
            format!("no corrupt reply, got {}", q.corrupt),
        );
    let p = &soak.pipe.totals;
    v.figure("batches", p.batches)
        .figure("images", p.images)
        .figure("images_done", p.done)
        .figure("images_lost", p.lost)
        .figure("images_duplicated", p.duplicated)
        .figure("images_resent", p.resent)
        .figure("temp_files_left", p.temp_files_left);
    v.expect(p.batches > 0, "some pipeline batches ran");
    v.expect(p.lost == 0, format!("no image lost, lost {}", p.lost))
        .expect(
            p.duplicated == 0,
            format!("no image done twice, got {}", p.duplicated),
        );

    // Faults.
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &soak.faults {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    v.figure("faults", soak.faults.len() as u64)
        .figure("faults_by_kind", serde_json::to_value(&by_kind)?);
    v.expect(!soak.faults.is_empty(), "faults were made");

    // Memory and descriptors.
    let mut processes = BTreeMap::new();
    let names: BTreeSet<&str> = soak.samples.iter().map(|s| s.process.as_str()).collect();
    for name in names {
        let mine: Vec<&Sample> = soak.samples.iter().filter(|s| s.process == name).collect();
        let Some((figures, failures)) = judge_process(name, &mine, run_s) else {
            continue;
        };
        if name != LAB {
            for failure in failures {
                v.expect(false, failure);
            }
        }
        processes.insert(name.to_string(), figures);
    }
    v.figure("samples", soak.samples.len() as u64)
        .figure("processes", serde_json::to_value(&processes)?);

    for failure in std::mem::take(&mut soak.failures) {
        v.expect(false, failure);
    }

    let csv = config.out.join("samples.csv");
    write_csv(&csv, &soak.samples)?;
    let svg = config.out.join("rss.svg");
    if let Err(e) = plot(&svg, &soak.samples, run_s, config.seed) {
        v.expect(false, format!("cannot draw {}: {e:#}", svg.display()));
    }
    v.figure("samples_csv", csv.display().to_string())
        .figure("rss_svg", svg.display().to_string());
    let report = json!({"verdict": v, "faults": soak.faults, "queue": soak.queue.totals, "pipeline": soak.pipe.totals});
    std::fs::write(
        config.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(v)
}

fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from("t_s,process,pid,rss_kib,fds\n");
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{},{},{},{}",
            s.t_s, s.process, s.pid, s.rss_kib, s.fds
        );
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// Draws `rss.svg` in `out` again from a `samples.csv` a soak wrote (`lab soak --plot`).
pub fn replot(csv: &Path, out: &Path, seed: u64) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let parsed = (|| {
            Some(Sample {
                t_s: f.first()?.parse().ok()?,
                process: f.get(1)?.to_string(),
                pid: f.get(2)?.parse().ok()?,
                rss_kib: f.get(3)?.parse().ok()?,
                fds: f.get(4)?.parse().ok()?,
            })
        })();
        samples.push(parsed.with_context(|| format!("{}:{}: not a sample", csv.display(), n + 1))?);
    }
    let run_s = samples.iter().map(|s| s.t_s).fold(0.0, f64::max);
    std::fs::create_dir_all(out)?;
    let svg = out.join("rss.svg");
    plot(&svg, &samples, run_s, seed)?;
    Ok(svg)
}

/// Distinct colours dark enough on white, one per process.
const COLOURS: [(u8, u8, u8); 16] = [
    (230, 25, 75),
    (60, 150, 60),
    (0, 110, 200),
    (245, 130, 48),
    (145, 30, 180),
    (0, 128, 128),
    (220, 40, 210),
    (150, 100, 30),
    (128, 0, 0),
    (0, 0, 128),
    (120, 120, 0),
    (70, 70, 70),
    (200, 150, 0),
    (0, 170, 170),
    (100, 60, 200),
    (180, 0, 90),
];

/// RSS over time, one line per process (a restarted one continues its line), with the legend
/// beside the plot rather than over it.
fn plot(path: &Path, samples: &[Sample], run_s: f64, seed: u64) -> Result<()> {
    use plotters::prelude::*;
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        series
            .entry(&s.process)
            .or_default()
            .push((s.t_s, s.rss_kib as f64 / 1024.0));
    }
    let top = samples.iter().map(|s| s.rss_kib).max().unwrap_or(1024) as f64 / 1024.0 * 1.1;
    let root = SVGBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(1050);
    let caption = format!("lab soak: RSS of every long-lived process (seed {seed})");
    let mut chart = ChartBuilder::on(&left)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..run_s.max(1.0), 0f64..top.max(1.0))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("seconds")
        .y_desc("RSS (MiB)")
        .draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let (r, g, b) = COLOURS[i % COLOURS.len()];
        let colour = RGBColor(r, g, b);
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
        let y = 50 + i as i32 * 20;
        right.draw(&PathElement::new(
            vec![(5, y), (28, y)],
            colour.stroke_width(3),
        ))?;
        right.draw(&Text::new(
            name.to_string(),
            (34, y - 7),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
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
