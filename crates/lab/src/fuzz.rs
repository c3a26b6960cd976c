//! A wire-level fuzzer: thousands of random and mutated ZMTP connections (greetings, commands,
//! frame headers, multipart bodies) thrown at live processes, after which they must still serve
//! a real round trip and their memory must be back near where it started. Seeded, so that a
//! failure can be replayed with the same `--seed`.
//!
//! Each target starts its process with the guard on, names the endpoints to attack (with the
//! socket type a legitimate peer there would announce), and proves service before and after
//! with the real client binaries. Adding a target is one entry in [`targets`].

use std::time::Duration;

use anyhow::{Context, Result};
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
    /// The guard mode the target is started with (`always`; `never` shows what the fuzzer
    /// does to an unguarded process).
    pub guard: String,
}

impl Default for FuzzConfig {
    fn default() -> Self {
        Self {
            connections: 3000,
            seed: 0x5eed_2026,
            at_once: 32,
            guard: "always".into(),
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

/// Every target. The pipeline master and the pub/sub proxy take the same `--guard`,
/// `--max-message-bytes` and `--max-frames` flags as the broker: their targets go here.
pub fn targets() -> Vec<FuzzTarget> {
    vec![
        FuzzTarget {
            name: "broker",
            about: "the shared-queue broker, frontend (as clients) and backend (as workers)",
            run: |l, c| Box::pin(broker(l, c)),
        },
        // LEAD: add `pipeline` (tasks/results/control) and `proxy` (xsub/xpub) here once they have --guard.
    ]
}

/// Looks a target up by name.
pub fn find(name: &str) -> Option<FuzzTarget> {
    targets().into_iter().find(|t| t.name == name)
}

/// A ZMTP 3.0 NULL greeting, as any peer sends first.
pub fn greeting() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// A well-formed session of a `socket_type` peer: greeting, READY, then a few short messages.
pub fn session(rng: &mut StdRng, socket_type: &str) -> Vec<u8> {
    let mut s = greeting();
    let mut ready = vec![5u8];
    ready.extend(b"READY");
    ready.push(11);
    ready.extend(b"Socket-Type");
    ready.extend((socket_type.len() as u32).to_be_bytes());
    ready.extend(socket_type.as_bytes());
    s.extend([0x04, ready.len() as u8]);
    s.extend(ready);
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

async fn broker(lab: &Lab, config: &FuzzConfig) -> Result<Verdict> {
    let name = "fuzz-broker";
    let logs = lab.logs_for(name);
    let args: Vec<String> = [
        "--frontend",
        "tcp://127.0.0.1:0",
        "--backend",
        "tcp://127.0.0.1:0",
        "--guard",
        &config.guard,
        "--max-message-bytes",
        "65536",
        "--stats-secs",
        "1",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let mut broker = Proc::spawn("broker", &lab.bins.path("broker"), &args, &logs)?;
    let ready = broker.ready(Duration::from_secs(20)).await?;
    let frontend = ready.get("frontend").cloned().context("no frontend")?;
    let backend = ready.get("backend").cloned().context("no backend")?;
    let worker_args: Vec<String> = ["--connect", &backend, "--capacity", "8", "--id", "w1"]
        .map(String::from)
        .to_vec();
    let mut worker = Proc::spawn("worker", &lab.bins.path("worker"), &worker_args, &logs)?;
    worker.ready(Duration::from_secs(20)).await?;

    let mut v = Verdict::new(name, "wire");
    v.figure("seed", config.seed)
        .figure("guard", config.guard.as_str());
    let warm = round_trip(lab, &logs, &frontend, "client-before").await?;
    v.expect(warm, "200 requests answered before the fuzzing");
    let before = procstat::rss_kib(broker.pid()).context("broker gone before the fuzzing")?;
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
    let thrown = attack(&surfaces, config).await;
    v.figure("connections", thrown as u64)
        .figure("rss_before_kib", before);
    if procstat::exited(broker.pid()) {
        let status = broker.wait(Duration::from_secs(5)).await?;
        v.expect(
            false,
            format!("the broker survives the fuzzing, it exited: {status}"),
        );
        return Ok(v);
    }
    let after_ok = round_trip(lab, &logs, &frontend, "client-after").await?;
    let after = procstat::rss_kib(broker.pid()).unwrap_or(u64::MAX);
    v.figure("rss_after_kib", after);
    v.expect(after_ok, "200 requests answered after the fuzzing")
        .expect(
            after <= before + RSS_SLACK_KIB,
            format!(
                "RSS back near where it started: {before} KiB before, {after} KiB after (slack {RSS_SLACK_KIB} KiB)"
            ),
        );
    broker.signal(Signal::SIGTERM)?;
    let status = broker.wait(Duration::from_secs(20)).await?;
    v.expect(
        status.success(),
        format!("the broker exits 0, got {status}"),
    );
    let stats: broker::BrokerStats = broker.json()?;
    v.figure("guard_refused", stats.guard_refused);
    v.expect(
        stats.guard_refused > 0,
        "the guard refused some of the bad connections",
    );
    let _ = worker.kill().await;
    Ok(v)
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
