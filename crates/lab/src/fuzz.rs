//! A wire-level fuzzer: thousands of random and mutated ZMTP connections (greetings, commands,
//! frame headers, multipart bodies) thrown at live processes, after which they must still serve
//! a real round trip and their memory must be back near where it started. Seeded, so that a
//! failure can be replayed with the same `--seed`.
//!
//! Each target starts its process (every bound socket of every role is our own ZMTP code,
//! `common::wire`, which checks its limits always, loopback included), with a 64 KiB message
//! limit or its defaults ([`FuzzConfig::default_limits`]), names the endpoints to attack (with the socket type
//! a legitimate peer there would announce), and proves service before and after with the real
//! client binaries. Adding a target is one entry in [`targets`].

use std::time::Duration;

use anyhow::{Context, Result};
use common::zmtp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::Proc;
use crate::scenarios::{Lab, Run};
use crate::verdict::Verdict;
use crate::{procstat, Signal};

/// What a fuzz run is asked to do.
#[derive(Debug, Clone)]
pub struct FuzzConfig {
    /// Connections thrown, all endpoints of the target together.
    pub connections: usize,
    pub seed: u64,
    /// Connections open at once.
    pub at_once: usize,
    /// Start every target with its default limits (`--max-message-bytes` of 1 MiB for the
    /// broker and the proxy, 64 MiB for the pipeline master), not the fuzzer's 64 KiB: what a
    /// role started with no flag at all withstands on loopback.
    pub default_limits: bool,
}

impl Default for FuzzConfig {
    fn default() -> Self {
        Self {
            connections: 3000,
            seed: 0x5eed_2026,
            at_once: 32,
            default_limits: false,
        }
    }
}

/// Growth of the resident memory after the fuzzing that still counts as "back near where it
/// started": the allocator keeps some freed pages, a leak per connection (thousands of them)
/// shows well beyond.
pub const RSS_SLACK_KIB: u64 = 16 * 1024;

/// A process the fuzzer can attack.
#[derive(Debug, Clone, Copy)]
pub struct FuzzTarget {
    pub name: &'static str,
    pub about: &'static str,
    pub run: for<'a> fn(&'a Lab, &'a FuzzConfig) -> Run<'a>,
}

/// Every target. All three take
/// `--max-message-bytes` and `--max-frames`: a new target with these flags goes here.
pub fn targets() -> Vec<FuzzTarget> {
    vec![
        FuzzTarget {
            name: "broker",
            about: "the shared-queue broker, frontend (as clients) and backend (as workers)",
            run: |l, c| Box::pin(broker(l, c)),
        },
        FuzzTarget {
            name: "proxy",
            about: "the pub/sub proxy, XSUB (as publishers) and XPUB (as subscribers)",
            run: |l, c| Box::pin(proxy(l, c)),
        },
        FuzzTarget {
            name: "pipeline",
            about: "a pipeline master, tasks, results and control",
            run: |l, c| Box::pin(pipeline(l, c)),
        },
    ]
}

/// Looks a target up by name.
pub fn find(name: &str) -> Option<FuzzTarget> {
    targets().into_iter().find(|t| t.name == name)
}

/// A well-formed session of a `socket_type` peer: greeting, READY, then a few short messages.
pub fn session(rng: &mut StdRng, socket_type: &str) -> Vec<u8> {
    let mut s = [zmtp::greeting(), zmtp::ready(socket_type)].concat();
    for i in 0..rng.gen_range(0..4) {
        let body = format!("fuzz {i}");
        s.extend([0x01, 0x00]);
        s.extend([0x00, body.len() as u8]);
        s.extend(body.as_bytes());
    }
    s
}

/// One connection's bytes: random bytes, or a session with bytes flipped, cut or inserted, a
/// long frame header of a random size, or thousands of frames with MORE set.
pub fn case(rng: &mut StdRng, socket_type: &str) -> Vec<u8> {
    let mut s = session(rng, socket_type);
    match rng.gen_range(0..6) {
        0 => (0..rng.gen_range(1..300)).map(|_| rng.gen()).collect(),
        1 => {
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..s.len());
                s[at] = rng.gen();
            }
            s
        }
        2 => {
            s.truncate(rng.gen_range(0..s.len()));
            s
        }
        3 => {
            let at = rng.gen_range(0..s.len());
            let junk: Vec<u8> = (0..rng.gen_range(1..40)).map(|_| rng.gen()).collect();
            s.splice(at..at, junk);
            s
        }
        4 => {
            // A long frame header with a random size right after the handshake.
            s.push(rng.gen::<u8>() | 0x02);
            s.extend(rng.gen::<u64>().to_be_bytes());
            s
        }
        _ => {
            for _ in 0..rng.gen_range(1..3000) {
                s.extend([0x01, 0x00]);
            }
            s
        }
    }
}

/// Connects, writes `bytes`, reads whatever comes back for a moment, and vanishes.
pub async fn throw(addr: &str, bytes: &[u8]) {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
    else {
        return;
    };
    let _ = stream.write_all(bytes).await;
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// An endpoint to attack and the socket type a legitimate peer announces there.
#[derive(Debug, Clone)]
pub struct Surface {
    pub endpoint: String,
    pub socket_type: &'static str,
}

/// Throws `config.connections` connections at `surfaces` in turn, `config.at_once` at a time.
/// Returns how many were thrown.
pub async fn attack(surfaces: &[Surface], config: &FuzzConfig) -> usize {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let at_once = config.at_once.max(1);
    let mut thrown = 0;
    while thrown < config.connections {
        let batch: Vec<_> = (0..at_once.min(config.connections - thrown))
            .map(|i| {
                let s = &surfaces[(thrown + i) % surfaces.len()];
                let addr = s.endpoint.trim_start_matches("tcp://").to_string();
                let bytes = case(&mut rng, s.socket_type);
                tokio::spawn(async move { throw(&addr, &bytes).await })
            })
            .collect();
        thrown += batch.len();
        for t in batch {
            let _ = t.await;
        }
    }
    thrown
}

/// Runs one target and returns its verdict (an error becomes a failed verdict).
pub async fn run(target: &FuzzTarget, lab: &Lab, config: &FuzzConfig) -> Verdict {
    match (target.run)(lab, config).await {
        Ok(v) => v,
        Err(e) => {
            let mut v = Verdict::new(&format!("fuzz-{}", target.name), "wire");
            v.figure("seed", config.seed);
            v.expect(false, format!("{e:#}"));
            v
        }
    }
}

/// The message limit every target is started with.
const LIMIT_FLAGS: [&str; 2] = ["--max-message-bytes", "65536"];

/// The limit flags a target is started with: the fuzzer's, or none ([`FuzzConfig::default_limits`]).
fn limit_flags(config: &FuzzConfig) -> Vec<String> {
    if config.default_limits {
        Vec::new()
    } else {
        strings(&LIMIT_FLAGS)
    }
}

/// How the verdict names the limits the target ran with.
fn limits_name(config: &FuzzConfig) -> &'static str {
    if config.default_limits {
        "its defaults"
    } else {
        "64 KiB messages"
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The course every target runs (`guard` names the limits, recorded in the verdict as `limits`): service proven
/// before (`serves("before")`, skipped unless `before_too`), RSS read, the attack, the process alive, service proven again, RSS back near where
/// it started. Leaves `target` running.
async fn course<F, Fut>(
    v: &mut Verdict,
    target: &mut Proc,
    surfaces: &[Surface],
    config: &FuzzConfig,
    guard: &str,
    serves: F,
    before_too: bool,
) -> Result<bool>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    v.figure("seed", config.seed).figure("limits", guard);
    if before_too {
        let ok = serves("before").await?;
        v.expect(ok, format!("{} serves before the fuzzing", target.name));
    }
    let before = procstat::rss_kib(target.pid()).context("gone before the fuzzing")?;
    let thrown = attack(surfaces, config).await;
    v.figure("connections", thrown as u64)
        .figure("rss_before_kib", before);
    if procstat::exited(target.pid()) {
        let status = target.wait(Duration::from_secs(5)).await?;
        v.expect(
            false,
            format!(
                "the {} survives the fuzzing, it exited: {status}",
                target.name
            ),
        );
        return Ok(false);
    }
    let ok = serves("after").await?;
    let after = procstat::rss_kib(target.pid()).unwrap_or(u64::MAX);
    v.figure("rss_after_kib", after);
    v.expect(ok, format!("{} serves after the fuzzing", target.name))
        .expect(
            after <= before + RSS_SLACK_KIB,
            format!(
                "RSS back near where it started: {before} KiB before, {after} KiB after (slack {RSS_SLACK_KIB} KiB)"
            ),
        );
    Ok(true)
}

/// SIGTERM, exit 0, and the guard's count from the last JSON stats line, if any.
async fn stop(v: &mut Verdict, target: &mut Proc) -> Result<()> {
    target.signal(Signal::SIGTERM)?;
    let status = target.wait(Duration::from_secs(20)).await?;
    v.expect(
        status.success(),
        format!("the {} exits 0, got {status}", target.name),
    );
    let refused = target
        .stdout()
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|stats| stats.get("guard_refused").and_then(|r| r.as_u64()));
    if let Some(refused) = refused {
        v.figure("guard_refused", refused);
    }
    Ok(())
}

async fn broker(lab: &Lab, config: &FuzzConfig) -> Result<Verdict> {
    let name = "fuzz-broker";
    let logs = lab.logs_for(name);
    let mut args = strings(&[
        "--frontend",
        "tcp://127.0.0.1:0",
        "--backend",
        "tcp://127.0.0.1:0",
        "--stats-secs",
        "1",
        "--json",
    ]);
    args.extend(limit_flags(config));
    let mut broker = Proc::spawn("broker", &lab.bins.path("broker"), &args, &logs)?;
    let ready = broker.ready(Duration::from_secs(20)).await?;
    let frontend = ready.get("frontend").cloned().context("no frontend")?;
    let backend = ready.get("backend").cloned().context("no backend")?;
    let worker_args = strings(&["--connect", &backend, "--capacity", "8", "--id", "w1"]);
    let mut worker = Proc::spawn("worker", &lab.bins.path("worker"), &worker_args, &logs)?;
    worker.ready(Duration::from_secs(20)).await?;

    let mut v = Verdict::new(name, "wire");
    // Legitimate peers: clients (DEALER speaking the REQ envelope) and workers (DEALER).
    let surfaces = [
        Surface {
            endpoint: frontend.clone(),
            socket_type: "DEALER",
        },
        Surface {
            endpoint: backend,
            socket_type: "DEALER",
        },
    ];
    let serves = |run: &'static str| round_trip(lab, &logs, &frontend, run);
    let guard = limits_name(config);
    if course(&mut v, &mut broker, &surfaces, config, guard, serves, true).await? {
        stop(&mut v, &mut broker).await?;
        let refused = v.figures.get("guard_refused").and_then(|r| r.as_u64());
        v.expect(
            refused.is_some_and(|r| r > 0),
            "its ROUTERs refused some of the bad connections",
        );
    }
    let _ = worker.kill().await;
    Ok(v)
}

/// The pub/sub proxy: publishers' side (XSUB, peers are PUB) and subscribers' side (XPUB,
/// peers are SUB); service is 200 updates from a real publisher to a real subscriber.
pub async fn proxy(lab: &Lab, config: &FuzzConfig) -> Result<Verdict> {
    let name = "fuzz-proxy";
    let logs = lab.logs_for(name);
    let mut args = strings(&[
        "--xsub",
        "tcp://127.0.0.1:0",
        "--xpub",
        "tcp://127.0.0.1:0",
        "--json",
        "--stats-secs",
        "1",
    ]);
    args.extend(limit_flags(config));
    let mut proxy = Proc::spawn("proxy", &lab.bins.path("proxy"), &args, &logs)?;
    let ready = proxy.ready(Duration::from_secs(20)).await?;
    let xsub = ready.get("xsub").cloned().context("no xsub")?;
    let xpub = ready.get("xpub").cloned().context("no xpub")?;
    let mut v = Verdict::new(name, "wire");
    let surfaces = [
        Surface {
            endpoint: xsub.clone(),
            socket_type: "PUB",
        },
        Surface {
            endpoint: xpub.clone(),
            socket_type: "SUB",
        },
    ];
    let serves = |run: &'static str| updates_flow(lab, &logs, &xsub, &xpub, run);
    let guard = limits_name(config);
    if course(&mut v, &mut proxy, &surfaces, config, guard, serves, true).await? {
        stop(&mut v, &mut proxy).await?;
    }
    Ok(v)
}

/// A pipeline master waiting for workers: its tasks (peers are PULL), results (PUSH) and
/// control (SUB) endpoints; service is the whole batch done by a real worker afterwards.
pub async fn pipeline(lab: &Lab, config: &FuzzConfig) -> Result<Verdict> {
    let name = "fuzz-pipeline";
    let logs = lab.logs_for(name);
    let input = logs.join("in");
    let _ = std::fs::remove_dir_all(&input);
    std::fs::create_dir_all(&input)?;
    pipeline::sample::generate(&input, 12, 64).context("cannot generate images")?;
    let output = logs.join("out");
    let _ = std::fs::remove_dir_all(&output);
    let mut args = strings(&[
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--tasks-bind",
        "tcp://127.0.0.1:0",
        "--results-bind",
        "tcp://127.0.0.1:0",
        "--control-bind",
        "tcp://127.0.0.1:0",
        "--stop-workers",
        "--no-progress",
        "--json",
    ]);
    args.extend(limit_flags(config));
    let mut master = Proc::spawn("master", &lab.bins.path("pipeline"), &args, &logs)?;
    let ready = master.ready(Duration::from_secs(20)).await?;
    let connect = ready.get("connect").cloned().context("no connect")?;
    let endpoints: Vec<&str> = connect.split(',').collect();
    anyhow::ensure!(
        endpoints.len() == 3,
        "connect= has not three endpoints: {connect}"
    );
    let surfaces: Vec<Surface> = endpoints
        .iter()
        .zip(["PULL", "PUSH", "SUB"])
        .map(|(e, t)| Surface {
            endpoint: e.to_string(),
            socket_type: t,
        })
        .collect();
    let mut v = Verdict::new(name, "wire");
    // One batch per master: service is proven after the fuzzing only, by the batch itself.
    let serves = |_: &'static str| async { Ok(true) };
    let guard = limits_name(config);
    if course(&mut v, &mut master, &surfaces, config, guard, serves, false).await? {
        let worker_args = strings(&["--connect", &connect, "--id", "w1"]);
        let _worker = Proc::spawn(
            "worker",
            &lab.bins.path("pipeline-worker"),
            &worker_args,
            &logs,
        )?;
        let status = master.wait(Duration::from_secs(120)).await?;
        let summary: serde_json::Value = master.json()?;
        let done = summary.get("done").and_then(|d| d.as_u64()).unwrap_or(0);
        v.figure("images_done", done);
        if let Some(refused) = summary.get("guard_refused").and_then(|r| r.as_u64()) {
            v.figure("guard_refused", refused);
        }
        v.expect(
            status.success() && done == 12,
            format!("a real worker then does the whole batch: 12 images, got {done}, {status}"),
        );
    }
    Ok(v)
}

/// A real subscriber gets 200 updates of a real publisher through the proxy.
async fn updates_flow(
    lab: &Lab,
    logs: &std::path::Path,
    xsub: &str,
    xpub: &str,
    run: &str,
) -> Result<bool> {
    let sub_args = strings(&[
        "--connect",
        xpub,
        "--zip",
        "10001",
        "--count",
        "200",
        "--json",
    ]);
    let mut sub = Proc::spawn(
        &format!("subscriber-{run}"),
        &lab.bins.path("subscriber"),
        &sub_args,
        logs,
    )?;
    sub.ready(Duration::from_secs(20)).await?;
    let pub_args = strings(&[
        "--connect",
        xsub,
        "--id",
        "fuzz",
        "--zips",
        "10001",
        "--rate",
        "1000",
        "--count",
        "200",
        "--wait-subscriber-ms",
        "10000",
        "--json",
    ]);
    let mut publisher = Proc::spawn(
        &format!("publisher-{run}"),
        &lab.bins.path("publisher"),
        &pub_args,
        logs,
    )?;
    let published = publisher.wait(Duration::from_secs(60)).await?.success();
    let Ok(status) = sub.wait(Duration::from_secs(20)).await else {
        return Ok(false);
    };
    let got: pubsub::SubscriberSummary = sub.json()?;
    Ok(published && status.success() && got.received == 200)
}

/// A real client's 200 requests through `frontend`: all answered, exit 0.
async fn round_trip(lab: &Lab, logs: &std::path::Path, frontend: &str, name: &str) -> Result<bool> {
    let args: Vec<String> = [
        "--connect",
        frontend,
        "--requests",
        "200",
        "--concurrency",
        "8",
        "--deadline-secs",
        "60",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let mut client = Proc::spawn(name, &lab.bins.path("client"), &args, logs)?;
    let status = client.wait(Duration::from_secs(90)).await?;
    let summary: broker::ClientSummary = client.json()?;
    Ok(status.success() && summary.answered == 200 && summary.lost == 0)
}
