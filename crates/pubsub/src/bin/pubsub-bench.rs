//! `pubsub-bench`: delivered updates per second through our proxy, through libzmq's own
//! `zmq_proxy` (pyzmq's `zmq.proxy`), and from zmq.rs PUB straight to SUB with no proxy, on the
//! same zmq.rs publishers and subscribers in this process. Each publisher sends as fast as it
//! can for `--seconds`; loss is what the subscribers did not get of what was sent to them.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use zeromq::{PubSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// Pub/sub benchmark: our proxy against libzmq's zmq_proxy and against no proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds of publishing per case.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 3.0)]
    seconds: f64,
    /// Skip libzmq's proxy (needs python3 with pyzmq).
    #[arg(long)]
    no_libzmq: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Ours,
    Libzmq,
    Direct,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Ours => "our proxy",
            Via::Libzmq => "libzmq zmq_proxy",
            Via::Direct => "zmq.rs PUB->SUB, no proxy",
        }
    }
}

/// A proxy child process, killed on drop.
struct ProxyChild {
    _child: Child,
    xsub: String,
    xpub: String,
}

async fn start_proxy(via: Via) -> Result<ProxyChild> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no binary directory")?;
    let mut cmd = match via {
        Via::Ours => {
            let mut c = Command::new(dir.join("proxy"));
            c.args(["--xsub", "tcp://127.0.0.1:0", "--xpub", "tcp://127.0.0.1:0"]);
            c.env("RUST_LOG", "warn");
            c
        }
        _ => {
            let script =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/py/zmq_proxy.py");
            let mut c = Command::new("python3");
            c.arg(script);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", via.name()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("no ready line")??
        .context("proxy exited")?;
    let Some(fields) = common::ready::parse(&line) else {
        bail!("not a ready line: {line}");
    };
    Ok(ProxyChild {
        _child: child,
        xsub: fields.get("xsub").cloned().context("no xsub")?,
        xpub: fields.get("xpub").cloned().context("no xpub")?,
    })
}

/// One row of the table.
struct Row {
    sent: u64,
    delivered: u64,
    expected: u64,
    secs: f64,
}

/// `pubs` publishers over `topics` topics round robin; `subs` subscribers, subscriber i
/// subscribed to topic i (or to everything when `topics` is 1).
async fn run_case(
    via: Via,
    pubs: usize,
    subs: usize,
    topics: usize,
    size: usize,
    secs: f64,
) -> Result<Row> {
    let proxy = match via {
        Via::Direct => None,
        v => Some(start_proxy(v).await?),
    };
    // Publishers: connect to the proxy, or bind for the subscribers to connect to.
    let mut publishers = Vec::new();
    let mut pub_endpoints = Vec::new();
    for _ in 0..pubs {
        let mut p = PubSocket::new();
        match &proxy {
            Some(px) => p.connect(&px.xsub).await?,
            None => pub_endpoints.push(p.bind("tcp://127.0.0.1:0").await?.to_string()),
        }
        publishers.push(p);
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..subs {
        let mut s = SubSocket::new();
        match &proxy {
            Some(px) => s.connect(&px.xpub).await?,
            None => {
                for ep in &pub_endpoints {
                    s.connect(ep).await?;
                }
            }
        }
        let topic = if topics == 1 {
            String::new()
        } else {
            format!("t{i}")
        };
        s.subscribe(&topic).await?;
        let (received, stop) = (received.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), s.recv()).await
                {
                    received.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    // Subscriptions travel to the publishers (a benchmark may wait; tests may not).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let payload = Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut writers = Vec::new();
    for (n, mut p) in publishers.into_iter().enumerate() {
        let payload = payload.clone();
        writers.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let topic_names: Vec<Bytes> =
                (0..topics).map(|t| Bytes::from(format!("t{t}"))).collect();
            while Instant::now() < deadline {
                for _ in 0..256 {
                    let mut m = ZmqMessage::from(topic_names[(sent as usize + n) % topics].clone());
                    m.push_back(payload.clone());
                    if p.send(m).await.is_ok() {
                        sent += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            drop(p);
            sent
        }));
    }
    let mut sent = 0;
    for w in writers {
        sent += w.await?;
    }
    let elapsed = started.elapsed().as_secs_f64().min(secs + 1.5);
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let expected = if topics == 1 {
        sent * subs as u64
    } else {
        sent
    };
    let delivered = received.load(Relaxed);
    drop(proxy);
    let _ = elapsed;
    Ok(Row {
        sent,
        delivered,
        expected,
        secs,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::logging::init("pubsub=warn");
    common::cli::exit_code(run(args).await.map(|()| std::process::ExitCode::SUCCESS))
}

async fn run(args: Args) -> Result<()> {
    let mut vias = vec![Via::Ours, Via::Libzmq, Via::Direct];
    if args.no_libzmq {
        vias.retain(|v| *v != Via::Libzmq);
    }
    println!("| case | size | via | sent/s | delivered/s | loss |");
    println!("|---|---|---|---|---|---|");
    for (case, pubs, subs, topics) in [
        ("1 pub, 1 sub, all topics", 1, 1, 1),
        ("2 pubs, 4 subs, one topic each", 2, 4, 4),
    ] {
        for size in [64, 1024] {
            for via in &vias {
                let row = run_case(*via, pubs, subs, topics, size, args.seconds).await?;
                let loss = 1.0 - row.delivered as f64 / row.expected.max(1) as f64;
                println!(
                    "| {case} | {size} B | {} | {:.0} | {:.0} | {:.1}% |",
                    via.name(),
                    row.sent as f64 / row.secs,
                    row.delivered as f64 / row.secs,
                    loss * 100.0
                );
            }
        }
    }
    Ok(())
}
