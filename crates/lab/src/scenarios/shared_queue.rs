//! Seed, "Shared Queue pattern", experiments 1-4, plus a worker killed mid-request.
//!
//! Every scenario runs the real `broker`, `worker` and `client` binaries. Recovery time is read
//! off the client: its longest silence between two replies, minus the length of the outage the
//! scenario made (which also proves the outage hit a live flow). A second stall cannot hide
//! behind the longest one: outside a fault nothing may be sent twice, and after one only the
//! requests in flight at the one reconnect the fault causes; any other silence as long as the
//! client's 1 s timeout would cost a reconnect of its own. After a fault, a probe checks that
//! every worker answers again.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use broker::ClientSummary;
use tokio::time::Instant;

use super::{Lab, PartitionMode, Scenario};
use crate::broker_stats;
use crate::netns::{self, TestHost};
use crate::process::Proc;
use crate::relay::Relay;
use crate::verdict::Verdict;
use crate::Signal;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { name: "one-worker", about: "seed 1: one client, one worker, every request answered", run: |l| Box::pin(one_worker(l)) },
        Scenario { name: "two-workers", about: "seed 2: a second worker shares the load", run: |l| Box::pin(two_workers(l)) },
        Scenario { name: "broker-restart", about: "seed 3: broker killed (SIGKILL) and restarted; clients and workers resume by themselves", run: |l| Box::pin(broker_restart(l)) },
        Scenario { name: "partition", about: "seed 4: network partition longer than the heartbeat expiry, then healed", run: |l| Box::pin(partition(l)) },
        Scenario { name: "worker-crash", about: "a worker killed mid-request: another worker answers its request", run: |l| Box::pin(worker_crash(l)) },
        Scenario { name: "worker-hang", about: "a worker hung (SIGSTOP) holding a request: purged after the liveness window, another answers", run: |l| Box::pin(worker_hang(l)) },
        Scenario { name: "broker-failover", about: "a broker pair: the primary SIGKILLed and never restarted; the backup takes over", run: |l| Box::pin(broker_failover(l)) },
        Scenario { name: "broker-failover-partition", about: "a broker pair: the primary cut off from everyone, then healed; never both serving, the backup stays active", run: |l| Box::pin(broker_failover_partition(l)) },
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
                let front = Relay::start(common::endpoint::resolve(&frontend)?)
                    .await?
                    .labelled("frontend");
                let back = Relay::start(common::endpoint::resolve(&backend)?)
                    .await?
                    .labelled("backend");
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
        self.spawn_client("client", requests, concurrency, timeout_ms)
    }

    fn spawn_client(
        &self,
        name: &str,
        requests: u64,
        concurrency: u64,
        timeout_ms: u64,
    ) -> Result<Proc> {
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
            .spawn(name, &self.lab.bins.path("client"), &args, &self.logs)
    }

    /// Kills the broker and starts a new one on the same endpoints. Returns the outage (from
    /// the kill to the new broker's spawn) and the new broker's start-up (spawn to ready line):
    /// start-up is part of the recovery, not of the fault.
    async fn restart_broker(&mut self, down_for: Duration) -> Result<(Duration, Duration)> {
        self.broker.kill().await?;
        let killed = Instant::now();
        tokio::time::sleep(down_for).await;
        let spawned = Instant::now();
        let (broker, _, _) = start_broker(
            &self.lab,
            &self.logs,
            &self.frontend,
            &self.backend,
            "broker-2",
        )
        .await?;
        self.broker = broker;
        Ok((spawned - killed, spawned.elapsed()))
    }

    /// After a fault: a second client at one request in flight, whose requests LRU balancing
    /// alternates between idle workers. Every worker named must answer some of them.
    async fn probe_workers(&self, v: &mut Verdict, workers: &[&str]) -> Result<()> {
        let requests = 20;
        let mut probe = self.spawn_client("probe", requests, 1, 2500)?;
        let (summary, ok) = finish_client(&mut probe).await?;
        v.figure("probe_by_worker", serde_json::to_value(&summary.by_worker)?);
        v.expect(
            ok && summary.answered == requests && summary.retries == 0,
            format!(
                "after the fault, {requests} probe requests answered without retry, got {} answered, {} retries",
                summary.answered, summary.retries
            ),
        );
        for w in workers {
            v.expect(
                summary.by_worker.get(*w).copied().unwrap_or(0) > 0,
                format!("{w} answers again after the fault"),
            );
        }
        Ok(())
    }
}

async fn start_broker(
    lab: &Lab,
    logs: &Path,
    frontend: &str,
    backend: &str,
    name: &str,
) -> Result<(Proc, String, String)> {
    // A stats line every second: scenarios wait on the broker's counters, not on the clock.
    let args = strings(&[
        "--frontend",
        frontend,
        "--backend",
        backend,
        "--stats-secs",
        "1",
    ]);
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

/// The expectations every scenario shares: all answered, nothing lost, corrupt or answered
/// twice, exit 0, and at most `max_retries` requests sent again.
fn judge_client(
    v: &mut Verdict,
    s: &ClientSummary,
    exit_ok: bool,
    requests: u64,
    max_retries: u64,
) {
    v.timeline("client", &s.timeline)
        .figure("sent", s.sent)
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
    .expect(
        s.duplicates == 0,
        format!("no duplicate reply, got {}", s.duplicates),
    )
    .expect(
        s.retries <= max_retries,
        format!("at most {max_retries} requests re-sent, got {}", s.retries),
    )
    .expect(exit_ok, "client exits 0");
}

/// After a fault, only what was in flight when it hit may be sent again, each request at most
/// twice: once by its own timeout while the link still looks alive (a reply to another request
/// came just before the fault), once at the reconnect. More means a request was lost elsewhere
/// and the client had to time out on it (a stall of its own).
fn retries_allowed(s: &ClientSummary, concurrency: u64) -> u64 {
    concurrency * (s.reconnects + 1)
}

async fn one_worker(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "one-worker", Setup::Local).await?;
    let _worker = topo.worker("w1", 0).await?;
    let requests = 200;
    let mut client = topo.client(requests, 1, 2500)?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("one-worker", topo.net.mode());
    // README: no retry. A broker that loses a request makes the client time out and re-send.
    judge_client(&mut v, &summary, ok, requests, 0);
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
    // One request in flight: both workers are idle whenever a request comes, so the choice is
    // the broker's alone. Least recently used alternates strictly; a fixed or most-recent
    // order gives every request to one worker. (With more in flight than workers, both are
    // always busy and any order gives 50/50.)
    let mut client = topo.client(requests, 1, 2500)?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("two-workers", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests, 0);
    v.figure("by_worker", serde_json::to_value(&summary.by_worker)?);
    for w in ["w1", "w2"] {
        let got = summary.by_worker.get(w).copied().unwrap_or(0);
        v.expect(
            got.abs_diff(requests / 2) <= 1,
            format!(
                "{w} answers every other request (least recently used), answered {got} of {requests}"
            ),
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
    flowing(&topo).await?;
    let down_for = lab.outage.unwrap_or(Duration::from_millis(1500));
    let (outage, startup) = topo.restart_broker(down_for).await?;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("broker-restart", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests, retries_allowed(&summary, 2));
    v.figure("startup_ms", startup.as_millis() as u64);
    // docs/performance.md: target 1 s, the new broker's start-up included.
    judge_recovery(&mut v, &summary, "outage_ms", outage, 1000);
    topo.probe_workers(&mut v, &["w1", "w2"]).await?;
    Ok(v)
}

/// Waits until replies flow through the broker, so that the fault hits a live flow.
async fn flowing(topo: &Topology) -> Result<()> {
    broker_stats::wait_for(&topo.broker, READY_WITHIN, "20 replies", |c| {
        c.get("replies_out") >= 20
    })
    .await
    .map(drop)
}

/// Recovery is the client's longest silence minus the outage; a silence shorter than the
/// outage means the fault missed the flow, and the scenario proved nothing. Other silences are
/// bounded through the reconnect count (see below) and the retries (see [`retries_allowed`]).
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
    )
    // Any silence of a client timeout (1 s, here below the targets) with requests outstanding
    // makes the client reconnect: one reconnect means the fault's was the only long silence.
    .expect(
        summary.reconnects == 1,
        format!(
            "one reconnect, for the fault alone, got {}",
            summary.reconnects
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
    flowing(&topo).await?;
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
    judge_client(&mut v, &summary, ok, requests, retries_allowed(&summary, 2));
    // docs/performance.md: target 2 s.
    judge_recovery(&mut v, &summary, "partition_ms", outage, 2000);
    topo.probe_workers(&mut v, &["w1", "w2"]).await?;
    Ok(v)
}

async fn worker_crash(lab: &Lab) -> Result<Verdict> {
    // The kernel closes a dead worker's connection: the broker re-queues at once. The request
    // was dispatched up to one stats interval before the kill; 2 s more for a busy machine (the
    // heartbeat expiry alone would take 3-4 s).
    lost_worker(lab, "worker-crash", Signal::SIGKILL, Duration::from_secs(3)).await
}

async fn worker_hang(lab: &Lab) -> Result<Verdict> {
    // A stopped worker keeps its connection open: only the heartbeat expiry finds it. Its
    // request was dispatched up to one stats interval (1 s) before the stop, the expiry is
    // noticed on the next heartbeat tick, and a second more for a busy machine: about 7 s,
    // against the client's 30 s timeout were the worker never purged.
    let hb = common::heartbeat::Heartbeat::default();
    let within = hb.expiry() + hb.interval * 3 + Duration::from_secs(1);
    lost_worker(lab, "worker-hang", Signal::SIGSTOP, within).await
}

/// Two workers; `signal` hits w1 while it holds a request. The broker must give that request to
/// w2 by itself, within `within` of the request's first send.
async fn lost_worker(
    lab: &Lab,
    scenario: &'static str,
    signal: Signal,
    within: Duration,
) -> Result<Verdict> {
    let mut topo = Topology::start(lab, scenario, Setup::Local).await?;
    // w1 announces first, so the first request goes to it (least recently used); it would take
    // a minute, so it surely still holds that request when the signal comes. w2 answers the rest.
    let w1 = topo.worker("w1", 60_000).await?;
    let _w2 = topo.worker("w2", 50).await?;
    let requests = 20;
    // A client timeout far beyond the liveness window: the lost worker's request must come back
    // because the broker re-queued it, not because the client re-sent it.
    let mut client = topo.client(requests, 2, 30_000)?;
    broker_stats::wait_for(&topo.broker, READY_WITHIN, "two requests dispatched", |c| {
        c.get("dispatched") >= 2
    })
    .await?;
    w1.signal(signal)?;
    let (summary, ok) = finish_client(&mut client).await?;
    topo.broker.signal(Signal::SIGTERM)?;
    topo.broker.wait(READY_WITHIN).await?;
    let stats = broker_stats::final_stats(&topo.broker)?;
    let mut v = Verdict::new(scenario, topo.net.mode());
    judge_client(&mut v, &summary, ok, requests, 0);
    v.figure("by_worker", serde_json::to_value(&summary.by_worker)?)
        .figure("max_us", summary.max_us)
        .figure("requeued", stats.get("requeued"))
        .figure("purged", stats.get("purged"));
    v.expect(
        stats.get("requeued") >= 1,
        format!(
            "the broker re-queued w1's request, requeued={}",
            stats.get("requeued")
        ),
    )
    .expect(
        summary.by_worker.get("w2") == Some(&requests),
        "every reply from w2",
    )
    .expect(
        summary.max_us <= within.as_micros() as u64,
        format!("w1's request answered within {within:?}"),
    );
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// A broker pair (issue 20, docs/pairs.md): a primary and a backup, clients and workers given
// both.

/// One broker of a pair as the others reach it.
struct PairBroker {
    proc: Proc,
    /// Where clients and workers connect (a relay's endpoint in relay mode).
    frontend: String,
    backend: String,
}

/// Where the primary runs relative to everyone else.
enum PairNet {
    Local,
    /// The primary alone on a test host.
    Netns(TestHost),
    /// Everyone reaches the primary through relays: the peer link (in front of the backup),
    /// the primary's frontend and backend.
    Relay([Relay; 3]),
}

impl PairNet {
    fn mode(&self) -> &'static str {
        match self {
            PairNet::Local => "processes",
            PairNet::Netns(_) => "netns",
            PairNet::Relay(_) => "relay",
        }
    }

    /// Cuts (`true`) or heals the primary's links to everyone (backup, clients, workers).
    async fn set_partitioned(&self, partitioned: bool) -> Result<()> {
        match self {
            PairNet::Netns(host) => host.set_partitioned(partitioned).await,
            PairNet::Relay(relays) => {
                relays.iter().for_each(|r| r.set_partitioned(partitioned));
                Ok(())
            }
            PairNet::Local => Ok(()),
        }
    }
}

struct PairTopology {
    net: PairNet,
    primary: PairBroker,
    backup: PairBroker,
    logs: std::path::PathBuf,
    lab: Lab,
}

fn ready_field(ready: &std::collections::BTreeMap<String, String>, key: &str) -> Result<String> {
    ready
        .get(key)
        .cloned()
        .with_context(|| format!("ready line has no {key}"))
}

impl PairTopology {
    /// Starts the backup, then the primary (on a test host with `PairNet::Netns`), and waits
    /// until the primary is active and the backup passive.
    async fn start(lab: &Lab, scenario: &str, net: PairNet, relay: bool) -> Result<Self> {
        let logs = lab.logs_for(scenario);
        let program = lab.bins.path("broker");
        // The backup binds the peer link and the primary connects to it: the backup hears of
        // a killed primary from its own ROUTER, whose connection's end it sees at once.
        let (host, backup_host) = match &net {
            PairNet::Netns(test_host) => (test_host.ip.clone(), test_host.host_ip.clone()),
            _ => ("127.0.0.1".into(), "127.0.0.1".into()),
        };
        let local = "tcp://127.0.0.1:0";
        let args = strings(&[
            "--pair",
            "backup",
            "--frontend",
            local,
            "--backend",
            local,
            "--peer-bind",
            &format!("tcp://{backup_host}:0"),
            "--stats-secs",
            "1",
        ]);
        let mut backup = Proc::spawn("backup", &program, &args, &logs)?;
        let ready = backup.ready(READY_WITHIN).await?;
        let backup = PairBroker {
            proc: backup,
            frontend: ready_field(&ready, "frontend")?,
            backend: ready_field(&ready, "backend")?,
        };
        let mut peer = ready_field(&ready, "peer")?;
        // In relay mode the primary reaches the backup, and everyone the primary, through a
        // relay of their own (`relay` asks for them).
        let mut relays = Vec::new();
        if relay {
            let r = Relay::start(common::endpoint::resolve(&peer)?)
                .await?
                .labelled("peer link");
            peer = r.endpoint();
            relays.push(r);
        }
        let any = format!("tcp://{host}:0");
        let args = strings(&[
            "--pair",
            "primary",
            "--frontend",
            &any,
            "--backend",
            &any,
            "--peer-connect",
            &peer,
            "--stats-secs",
            "1",
        ]);
        let mut primary = match &net {
            PairNet::Netns(test_host) => {
                Proc::spawn_with("primary", test_host.command(&program).args(&args), &logs)?
            }
            _ => Proc::spawn("primary", &program, &args, &logs)?,
        };
        let ready = primary.ready(READY_WITHIN).await?;
        let (mut frontend, mut backend) = (
            ready_field(&ready, "frontend")?,
            ready_field(&ready, "backend")?,
        );
        let net = if relay {
            for (endpoint, label) in [
                (&mut frontend, "primary frontend"),
                (&mut backend, "primary backend"),
            ] {
                let r = Relay::start(common::endpoint::resolve(endpoint)?)
                    .await?
                    .labelled(label);
                *endpoint = r.endpoint();
                relays.push(r);
            }
            let relays: [Relay; 3] = relays
                .try_into()
                .map_err(|_| anyhow::anyhow!("three relays"))?;
            PairNet::Relay(relays)
        } else {
            net
        };
        let topo = Self {
            net,
            primary: PairBroker {
                proc: primary,
                frontend,
                backend,
            },
            backup,
            logs,
            lab: lab.clone(),
        };
        broker_stats::wait_for(&topo.primary.proc, READY_WITHIN, "primary active", |c| {
            c.get("active") == 1
        })
        .await?;
        broker_stats::wait_for(&topo.backup.proc, READY_WITHIN, "backup passive", |c| {
            c.get("active") == 0 && c.get("term") >= 1
        })
        .await?;
        Ok(topo)
    }

    /// A worker of both brokers, announced to both.
    async fn worker(&self, id: &str, work_ms: u64) -> Result<Proc> {
        let connect = format!("{},{}", self.primary.backend, self.backup.backend);
        let args = strings(&[
            "--connect",
            &connect,
            "--id",
            id,
            "--work-ms",
            &work_ms.to_string(),
        ]);
        let mut worker = Proc::spawn(id, &self.lab.bins.path("worker"), &args, &self.logs)?;
        worker.ready(READY_WITHIN).await?;
        Ok(worker)
    }

    /// Waits until both brokers count `n` workers.
    async fn workers_known(&self, n: u64) -> Result<()> {
        for b in [&self.primary.proc, &self.backup.proc] {
            broker_stats::wait_for(b, READY_WITHIN, &format!("{n} workers"), |c| {
                c.get("workers") >= n
            })
            .await?;
        }
        Ok(())
    }

    /// A client of both brokers, the primary first.
    fn client(&self, name: &str, requests: u64, concurrency: u64, timeout_ms: u64) -> Result<Proc> {
        let connect = format!("{},{}", self.primary.frontend, self.backup.frontend);
        let deadline_secs = 90 + self.lab.outage.unwrap_or_default().as_secs();
        let args = strings(&[
            "--connect",
            &connect,
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
        Proc::spawn(name, &self.lab.bins.path("client"), &args, &self.logs)
    }

    /// The client's deliveries through each broker, as timelines of their own.
    fn broker_timelines(&self, v: &mut Verdict, s: &ClientSummary) {
        for (label, endpoint) in [
            ("via primary", &self.primary.frontend),
            ("via backup", &self.backup.frontend),
        ] {
            if let Some(t) = s.timeline_by_broker.get(endpoint) {
                v.timeline(label, t);
            }
        }
    }

    /// After the fault: a new client of both brokers (the primary first) at one request in
    /// flight. Every request must come back, all through the backup, from every worker.
    async fn probe(&self, v: &mut Verdict, workers: &[&str]) -> Result<()> {
        let requests = 20;
        let mut probe = self.client("probe", requests, 1, 1000)?;
        let (summary, ok) = finish_client(&mut probe).await?;
        let via_backup = summary
            .by_broker
            .get(&self.backup.frontend)
            .copied()
            .unwrap_or(0);
        v.figure("probe_by_worker", serde_json::to_value(&summary.by_worker)?)
            .figure("probe_via_backup", via_backup);
        v.expect(
            ok && summary.answered == requests && summary.duplicates == 0,
            format!(
                "after the fault, {requests} probe requests answered, got {}",
                summary.answered
            ),
        )
        .expect(
            via_backup == requests,
            format!("the probe served by the backup alone, {via_backup} of {requests}"),
        );
        for w in workers {
            v.expect(
                summary.by_worker.get(*w).copied().unwrap_or(0) > 0,
                format!("{w} answers again after the fault"),
            );
        }
        Ok(())
    }
}

/// The final counters of a broker stopped with SIGTERM.
async fn stop_for_stats(proc: &mut Proc) -> Result<broker_stats::Counters> {
    proc.signal(Signal::SIGTERM)?;
    proc.wait(READY_WITHIN).await?;
    broker_stats::final_stats(proc)
}

/// A broker's `pair: state changed` lines: (to, unix ms, replies_out then).
fn transitions(proc: &Proc) -> Vec<(String, u64, u64)> {
    proc.log_text()
        .lines()
        .filter(|l| l.contains("pair: state changed"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k))
                    .map(|v| v.trim_matches('"').to_string())
            };
            Some((
                field("to=")?,
                field("unix_ms=")?.parse().ok()?,
                field("replies_out=")?.parse().ok()?,
            ))
        })
        .collect()
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The checks both failover scenarios share on the backup: it took over once, at term 2,
/// having served nothing before, and is active at the end. Returns its takeover's unix ms.
fn judge_backup(v: &mut Verdict, backup: &Proc, stats: &broker_stats::Counters) -> Option<u64> {
    let moves = transitions(backup);
    let takeover = moves.iter().find(|(to, _, _)| to == "active").cloned();
    v.figure("backup_activations", stats.get("activations"))
        .figure("backup_replies", stats.get("replies_out"))
        .figure("backup_refused", stats.get("refused_inactive"));
    v.expect(
        stats.get("activations") == 1 && stats.get("active") == 1 && stats.get("yielded") == 0,
        format!(
            "the backup took over once and stayed active (activations {}, active at the end {}, yielded {})",
            stats.get("activations"),
            stats.get("active"),
            stats.get("yielded")
        ),
    );
    match &takeover {
        Some((_, _, replies_before)) => {
            v.expect(
                *replies_before == 0,
                format!("the backup served nothing before it took over, {replies_before} replies"),
            );
        }
        None => {
            v.expect(false, "the backup logged its takeover");
        }
    }
    takeover.map(|(_, at, _)| at)
}

async fn broker_failover(lab: &Lab) -> Result<Verdict> {
    let mut topo = PairTopology::start(lab, "broker-failover", PairNet::Local, false).await?;
    let _w1 = topo.worker("w1", 20).await?;
    let _w2 = topo.worker("w2", 20).await?;
    topo.workers_known(2).await?;
    // About 100 requests/s: the flow outlives the failover by seconds.
    let requests = 400;
    let mut client = topo.client("client", requests, 2, 1000)?;
    broker_stats::wait_for(&topo.primary.proc, READY_WITHIN, "20 replies", |c| {
        c.get("replies_out") >= 20
    })
    .await?;
    topo.primary.proc.kill().await?;
    let killed_unix_ms = unix_ms_now();
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("broker-failover", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests, retries_allowed(&summary, 2));
    topo.broker_timelines(&mut v, &summary);
    v.figure("by_broker", serde_json::to_value(&summary.by_broker)?);
    // Nothing replaced the primary: its kill is an instant, and the recovery is the client's
    // longest silence. Issue 20: replies through the backup within 2 s.
    let recovery_ms = summary.longest_gap_ms;
    v.figure("recovery_ms", recovery_ms)
        .figure("reconnects", summary.reconnects);
    v.expect(
        recovery_ms <= 2000,
        format!("replies flow again through the backup within 2000 ms of the kill, took {recovery_ms} ms"),
    )
    .expect(
        summary.by_broker.get(&topo.backup.frontend).copied().unwrap_or(0) > 0,
        "the backup answered after the kill",
    );
    topo.probe(&mut v, &["w1", "w2"]).await?;
    let stats = stop_for_stats(&mut topo.backup.proc).await?;
    if let Some(at) = judge_backup(&mut v, &topo.backup.proc, &stats) {
        v.figure("takeover_after_kill_ms", at.saturating_sub(killed_unix_ms));
    }
    Ok(v)
}

async fn broker_failover_partition(lab: &Lab) -> Result<Verdict> {
    let use_netns = match lab.partition {
        PartitionMode::Netns => true,
        PartitionMode::Relay => false,
        PartitionMode::Auto => netns::available().await,
    };
    let net = if use_netns {
        PairNet::Netns(
            TestHost::create(1)
                .await
                .context("cannot create the test host (needs root and iproute2)")?,
        )
    } else {
        PairNet::Local
    };
    let mut topo = PairTopology::start(lab, "broker-failover-partition", net, !use_netns).await?;
    let _w1 = topo.worker("w1", 20).await?;
    let _w2 = topo.worker("w2", 20).await?;
    topo.workers_known(2).await?;
    let requests = 1500;
    let mut client = topo.client("client", requests, 2, 1000)?;
    broker_stats::wait_for(&topo.primary.proc, READY_WITHIN, "20 replies", |c| {
        c.get("replies_out") >= 20
    })
    .await?;
    // Longer than the peer expiry (3 s) and the clients' moves: the backup takes over during
    // the cut.
    let cut = lab.outage.unwrap_or(Duration::from_millis(8000));
    topo.net.set_partitioned(true).await?;
    let cut_unix_ms = unix_ms_now();
    let primary_lines_at_cut = broker_stats::all(&topo.primary.proc).len();
    let started = Instant::now();
    tokio::time::sleep(cut).await;
    topo.net.set_partitioned(false).await?;
    let healed_unix_ms = unix_ms_now();
    let outage = started.elapsed();
    // Healed: the primary hears the backup active at a higher term and yields.
    let yielded =
        broker_stats::wait_for(&topo.primary.proc, READY_WITHIN, "primary yielded", |c| {
            c.get("yielded") >= 1 && c.get("active") == 0
        })
        .await;
    let (summary, ok) = finish_client(&mut client).await?;
    let mut v = Verdict::new("broker-failover-partition", topo.net.mode());
    judge_client(&mut v, &summary, ok, requests, retries_allowed(&summary, 2));
    topo.broker_timelines(&mut v, &summary);
    v.figure("by_broker", serde_json::to_value(&summary.by_broker)?)
        .figure("partition_ms", outage.as_millis() as u64)
        .figure("reconnects", summary.reconnects)
        .figure("failover_ms", summary.longest_gap_ms)
        // The clients' outage ends with the takeover, during the cut: recovery is counted
        // from the cut.
        .figure("recovery_ms", summary.longest_gap_ms);
    v.expect(
        yielded.is_ok(),
        "after healing, the primary yields to the backup (passive)",
    );
    // Issue 20 gives no bound here; the expiry (3 s), the client's timeout (1 s) and its
    // moves between the two make about 5 s.
    v.expect(
        summary.longest_gap_ms <= 8000,
        format!(
            "replies flow again through the backup within 8 s of the cut, took {} ms",
            summary.longest_gap_ms
        ),
    );
    topo.probe(&mut v, &["w1", "w2"]).await?;
    let backup_stats = stop_for_stats(&mut topo.backup.proc).await?;
    let primary_stats = stop_for_stats(&mut topo.primary.proc).await?;
    let takeover = judge_backup(&mut v, &topo.backup.proc, &backup_stats);
    let primary_yield = transitions(&topo.primary.proc)
        .into_iter()
        .find(|(to, at, _)| to == "passive" && *at >= healed_unix_ms);
    if let Some((_, at, _)) = primary_yield {
        v.figure("yield_after_heal_ms", at - healed_unix_ms);
    }
    // Never both serving: the primary forwarded no reply from its first stats line after the
    // cut to its end, and the backup none before its takeover, at least an expiry after the cut.
    let lines = broker_stats::all(&topo.primary.proc);
    let after_cut = lines
        .get(primary_lines_at_cut)
        .map_or(0, |c| c.get("replies_out"));
    let primary_after_cut = primary_stats.get("replies_out").saturating_sub(after_cut);
    v.figure("primary_replies_after_cut", primary_after_cut)
        .figure("primary_activations", primary_stats.get("activations"))
        .figure("primary_yielded", primary_stats.get("yielded"))
        .figure("primary_refused", primary_stats.get("refused_inactive"));
    v.expect(
        primary_after_cut == 0,
        format!("the primary forwarded no reply after the cut, {primary_after_cut}"),
    )
    .expect(
        primary_stats.get("activations") == 1 && primary_stats.get("active") == 0,
        format!(
            "the returning primary never took the service back (activations {}, active at the end {})",
            primary_stats.get("activations"),
            primary_stats.get("active")
        ),
    );
    if let Some(at) = takeover {
        let after = at.saturating_sub(cut_unix_ms);
        v.figure("takeover_after_cut_ms", after);
        v.expect(
            at >= cut_unix_ms + 1000,
            format!(
                "the backup took over only after the primary's silence, {after} ms after the cut"
            ),
        );
    }
    Ok(v)
}
