//! Seed, "Shared Queue pattern", experiments 1-4, plus a worker killed mid-request.
//!
//! Every scenario runs the real `broker`, `worker` and `client` binaries. Recovery time is read
//! off the client: its longest silence between two replies, minus the length of the outage the
//! scenario made (which also proves the outage hit a live flow).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use broker::ClientSummary;
use tokio::time::Instant;

use super::{Lab, PartitionMode, Scenario};
use crate::netns::{self, TestHost};
use crate::process::Proc;
use crate::relay::Relay;
use crate::verdict::Verdict;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { name: "one-worker", about: "seed 1: one client, one worker, every request answered", run: |l| Box::pin(one_worker(l)) },
        Scenario { name: "two-workers", about: "seed 2: a second worker shares the load", run: |l| Box::pin(two_workers(l)) },
        Scenario { name: "broker-restart", about: "seed 3: broker killed (SIGKILL) and restarted; clients and workers resume by themselves", run: |l| Box::pin(broker_restart(l)) },
        Scenario { name: "partition", about: "seed 4: network partition longer than the heartbeat expiry, then healed", run: |l| Box::pin(partition(l)) },
        Scenario { name: "worker-crash", about: "a worker killed mid-request: another worker answers its request", run: |l| Box::pin(worker_crash(l)) },
    ]
}

const READY_WITHIN: Duration = Duration::from_secs(20);
const CLIENT_WITHIN: Duration = Duration::from_secs(120);

/// Where clients and workers run relative to the broker.
enum Net {
    /// All on loopback.
    Local,
    /// Clients and workers on a test host in a network namespace.
    Netns(TestHost),
    /// Clients and workers reach the broker through relays (frontend, backend).
    Relay(Relay, Relay),
}

impl Net {
    fn mode(&self) -> &'static str {
        match self {
            Net::Local => "processes",
            Net::Netns(_) => "netns",
            Net::Relay(..) => "relay",
        }
    }

    fn spawn(&self, name: &str, program: &Path, args: &[String], logs: &Path) -> Result<Proc> {
        match self {
            Net::Netns(host) => Proc::spawn_with(name, host.command(program).args(args), logs),
            _ => Proc::spawn(name, program, args, logs),
        }
    }

    /// Cuts (`true`) or restores (`false`) the link between the broker and everyone else.
    async fn set_partitioned(&self, partitioned: bool) -> Result<()> {
        match self {
            Net::Netns(host) => host.set_partitioned(partitioned).await,
            Net::Relay(front, back) => {
                front.set_partitioned(partitioned);
                back.set_partitioned(partitioned);
                Ok(())
            }
            Net::Local => Ok(()),
        }
    }
}

/// What to build a topology on.
enum Setup {
    Local,
    Netns(TestHost),
    Relay,
}

/// A broker and the endpoints clients and workers should use.
struct Topology {
    net: Net,
    broker: Proc,
    frontend: String,
    backend: String,
    /// Where clients and workers connect (the relays' in relay mode).
    client_endpoint: String,
    worker_endpoint: String,
    logs: std::path::PathBuf,
    lab: Lab,
}

impl Topology {
    async fn start(lab: &Lab, scenario: &str, setup: Setup) -> Result<Self> {
        let logs = lab.logs_for(scenario);
        let host = match &setup {
            Setup::Netns(test_host) => test_host.host_ip.clone(),
            _ => "127.0.0.1".into(),
        };
        let (broker, frontend, backend) = start_broker(
            lab,
            &logs,
            &format!("tcp://{host}:0"),
            &format!("tcp://{host}:0"),
            "broker",
        )
        .await?;
        let (client_endpoint, worker_endpoint, net) = match setup {
            Setup::Relay => {
                let front = Relay::start(common::endpoint::resolve(&frontend)?).await?;
                let back = Relay::start(common::endpoint::resolve(&backend)?).await?;
                (front.endpoint(), back.endpoint(), Net::Relay(front, back))
            }
            Setup::Netns(test_host) => (frontend.clone(), backend.clone(), Net::Netns(test_host)),
            Setup::Local => (frontend.clone(), backend.clone(), Net::Local),
        };
        Ok(Self {
            net,
            broker,
            frontend,
            backend,
            client_endpoint,
            worker_endpoint,
            logs,
            lab: lab.clone(),
        })
    }

    /// Starts a worker and waits until it has announced itself to the broker.
    async fn worker(&self, id: &str, work_ms: u64) -> Result<Proc> {
        let args = strings(&[
            "--connect",
            &self.worker_endpoint,
            "--id",
            id,
            "--work-ms",
            &work_ms.to_string(),
        ]);
        let mut worker = self
            .net
            .spawn(id, &self.lab.bins.path("worker"), &args, &self.logs)?;
        worker.ready(READY_WITHIN).await?;
        Ok(worker)
    }

    fn client(&self, requests: u64, concurrency: u64, timeout_ms: u64) -> Result<Proc> {
        // Long enough for the run and whatever outage the lab was asked to make.
        let deadline_secs = 90 + self.lab.outage.unwrap_or_default().as_secs();
        let args = strings(&[
            "--connect",
            &self.client_endpoint,
            "--requests",
            &requests.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
            "--deadline-secs",
            &deadline_secs.to_string(),
            "--json",
        ]);
        self.net
            .spawn("client", &self.lab.bins.path("client"), &args, &self.logs)
    }

    /// Kills the broker and starts a new one on the same endpoints; returns the outage length.
    async fn restart_broker(&mut self, down_for: Duration) -> Result<Duration> {
        self.broker.kill().await?;
        let killed = Instant::now();
        tokio::time::sleep(down_for).await;
        let (broker, _, _) = start_broker(
            &self.lab,
            &self.logs,
            &self.frontend,
            &self.backend,
            "broker-2",
        )
        .await?;
        self.broker = broker;
        Ok(killed.elapsed())
    }
}

async fn start_broker(
    lab: &Lab,
    logs: &Path,
    frontend: &str,
    backend: &str,
    name: &str,
) -> Result<(Proc, String, String)> {
    let args = strings(&["--frontend", frontend, "--backend", backend]);
    let mut broker = Proc::spawn(name, &lab.bins.path("broker"), &args, logs)?;
    let ready = broker.ready(READY_WITHIN).await?;
    let fe = ready
        .get("frontend")
        .cloned()
        .context("ready line has no frontend")?;
    let be = ready
        .get("backend")
        .cloned()
        .context("ready line has no backend")?;
    Ok((broker, fe, be))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Waits for the client and reads its JSON summary.
async fn finish_client(client: &mut Proc) -> Result<(ClientSummary, bool)> {
    let status = client.wait(CLIENT_WITHIN).await?;
    let summary: ClientSummary = client.json().with_context(|| client.log_tail())?;
    Ok((summary, status.success()))
}

/// The expectations every scenario shares: all answered, nothing lost or corrupt, exit 0.
fn judge_client(v: &mut Verdict, s: &ClientSummary, exit_ok: bool, requests: u64) {
    v.figure("sent", s.sent)
        .figure("answered", s.answered)
        .figure("lost", s.lost)
        .figure("duplicates", s.duplicates)
        .figure("retries", s.retries)
        .figure("p50_us", s.p50_us)
        .figure("p99_us", s.p99_us)
        .figure("longest_gap_ms", s.longest_gap_ms);
    v.expect(
        s.answered == requests,
        format!("{requests} answered, got {}", s.answered),
    )
    .expect(s.lost == 0, format!("nothing lost, lost {}", s.lost))
    .expect(
        s.corrupt == 0,
        format!("no corrupt reply, got {}", s.corrupt),
    )
    .expect(exit_ok, "client exits 0");
}

async fn one_worker(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "one-worker", Setup::Local).await?;
    let _worker = topo.worker("w1", 0).await?;
    let requests = 200;
    let mut client = topo.client(requests, 1, 2500)?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("one-worker", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests);
    v.figure("by_worker", serde_json::to_value(&summary.by_worker)?);
    v.expect(
        summary.by_worker.get("w1") == Some(&requests),
        "every reply from w1",
    );
    Ok(v)
}

async fn two_workers(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "two-workers", Setup::Local).await?;
    let _w1 = topo.worker("w1", 10).await?;
    let _w2 = topo.worker("w2", 10).await?;
    let requests = 200;
    let mut client = topo.client(requests, 4, 2500)?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("two-workers", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests);
    v.figure("by_worker", serde_json::to_value(&summary.by_worker)?);
    for w in ["w1", "w2"] {
        let got = summary.by_worker.get(w).copied().unwrap_or(0);
        v.expect(
            got * 10 >= requests * 3,
            format!("{w} answers at least 30% of requests, answered {got}"),
        );
    }
    Ok(v)
}

async fn broker_restart(lab: &Lab) -> Result<Verdict> {
    let mut topo = Topology::start(lab, "broker-restart", Setup::Local).await?;
    let _w1 = topo.worker("w1", 20).await?;
    let _w2 = topo.worker("w2", 20).await?;
    // About 100 requests/s: the flow outlives the outage.
    let requests = 400;
    let mut client = topo.client(requests, 2, 1000)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let down_for = lab.outage.unwrap_or(Duration::from_millis(1500));
    let outage = topo.restart_broker(down_for).await?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("broker-restart", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests);
    judge_recovery(&mut v, &summary, "outage_ms", outage, 3000);
    Ok(v)
}

/// Recovery is the client's longest silence minus the outage; a silence shorter than the
/// outage means the fault missed the flow, and the scenario proved nothing.
fn judge_recovery(
    v: &mut Verdict,
    summary: &ClientSummary,
    outage_name: &str,
    outage: Duration,
    limit_ms: u64,
) {
    let outage_ms = outage.as_millis() as u64;
    let recovery_ms = summary.longest_gap_ms.saturating_sub(outage_ms);
    v.figure(outage_name, outage_ms)
        .figure("recovery_ms", recovery_ms)
        .figure("reconnects", summary.reconnects);
    v.expect(
        summary.longest_gap_ms >= outage_ms,
        "the fault interrupted a live flow",
    )
    .expect(
        recovery_ms <= limit_ms,
        format!(
            "replies flow again within {limit_ms} ms of the fault's end, took {recovery_ms} ms"
        ),
    );
}

async fn partition(lab: &Lab) -> Result<Verdict> {
    let use_netns = match lab.partition {
        PartitionMode::Netns => true,
        PartitionMode::Relay => false,
        PartitionMode::Auto => netns::available().await,
    };
    let setup = if use_netns {
        Setup::Netns(
            TestHost::create(0)
                .await
                .context("cannot create the test host (needs root and iproute2)")?,
        )
    } else {
        Setup::Relay
    };
    let topo = Topology::start(lab, "partition", setup).await?;
    let _w1 = topo.worker("w1", 20).await?;
    let _w2 = topo.worker("w2", 20).await?;
    let requests = 500;
    let mut client = topo.client(requests, 2, 1000)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // By default longer than the workers' heartbeat expiry (3 s): the broker purges them, and
    // they reconnect.
    let cut = lab.outage.unwrap_or(Duration::from_millis(4500));
    topo.net.set_partitioned(true).await?;
    let started = Instant::now();
    tokio::time::sleep(cut).await;
    topo.net.set_partitioned(false).await?;
    let outage = started.elapsed();
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("partition", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests);
    judge_recovery(&mut v, &summary, "partition_ms", outage, 4000);
    Ok(v)
}

async fn worker_crash(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "worker-crash", Setup::Local).await?;
    let mut w1 = topo.worker("w1", 300).await?;
    let _w2 = topo.worker("w2", 300).await?;
    let requests = 20;
    // A client timeout far longer than the run: any request of the dead worker must be answered
    // because the broker gave it to the other worker, not because the client retried.
    let mut client = topo.client(requests, 2, 30_000)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    w1.kill().await?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("worker-crash", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests);
    v.figure("by_worker", serde_json::to_value(&summary.by_worker)?)
        .figure("max_us", summary.max_us);
    v.expect(
        summary.retries == 0,
        format!("no client retry needed, got {}", summary.retries),
    );
    v.expect(
        summary.by_worker.get("w2").copied().unwrap_or(0) > requests / 2,
        "the surviving worker answers the rest",
    );
    Ok(v)
}
