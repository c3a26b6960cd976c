//! `pubsub-bench`: delivered updates per second through our proxy, through libzmq's own
//! `zmq_proxy` (pyzmq's `zmq.proxy`), and from zmq.rs PUB straight to SUB with no proxy, on the
//! same zmq.rs publishers and subscribers in this process. Each publisher sends as fast as it
//! can (or at `--rate`) for `--seconds`; loss is what the subscribers did not get of what was
//! sent to them. The three are interleaved, `--rounds` times, and the medians printed: timings
//! on a shared machine drift, and interleaving spreads the drift over all three alike.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use zeromq::{PubSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

/// Pub/sub benchmark: our proxy against libzmq's zmq_proxy and against no proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Seconds of publishing per case.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 2.0)]
    seconds: f64,
    /// Rounds; each runs every case through every path, interleaved. Medians are printed.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Paths to measure (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    via: Vec<Via>,
    /// Cases to run: `1x1` (1 publisher, 1 subscriber of everything), `2x4` (2 publishers, 4
    /// subscribers of one topic each). Default: both.
    #[arg(long, value_delimiter = ',', value_parser = ["1x1", "2x4"])]
    case: Vec<String>,
    /// Message body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 1024])]
    size: Vec<usize>,
    /// Updates per second per publisher; 0: as fast as it can.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Skip libzmq's proxy (needs python3 with pyzmq).
    #[arg(long)]
    no_libzmq: bool,
    /// Also measure this proxy binary (an older build of ours, say), same flags as ours.
    #[arg(long, value_name = "PROXY")]
    before: Option<PathBuf>,
    /// Print each proxy's process id on stderr (to attach perf or strace to it).
    #[arg(long)]
    show_pid: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Ours,
    Before,
    Libzmq,
    Direct,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Ours => "our proxy",
            Via::Before => "our proxy, --before build",
            Via::Libzmq => "libzmq zmq_proxy",
            Via::Direct => "zmq.rs PUB->SUB, no proxy",
        }
    }
}

/// A proxy child process, killed on drop.
struct ProxyChild {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    xsub: String,
    xpub: String,
}

impl ProxyChild {
    /// Stops the proxy; ours prints its final counters (messages in, dropped at subscribers' outboxes).
    async fn stop(mut self) -> Option<pubsub::ProxyStats> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let mut last = None;
        let read = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if let Ok(stats) = serde_json::from_str::<pubsub::ProxyStats>(&line) {
                    last = Some(stats);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        let _ = self.child.kill().await;
        last
    }
}

async fn start_proxy(via: Via, before: Option<&PathBuf>, show_pid: bool) -> Result<ProxyChild> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no binary directory")?;
    let mut cmd = match via {
        Via::Ours | Via::Before => {
            let binary = match before {
                Some(path) if via == Via::Before => path.clone(),
                _ => dir.join("proxy"),
            };
            let mut c = Command::new(binary);
            c.args(["--xsub", "tcp://127.0.0.1:0", "--xpub", "tcp://127.0.0.1:0"]);
            c.args(["--json", "--stats-secs", "3600"]);
            c.env("RUST_LOG", "error");
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
    if show_pid {
        eprintln!("{} pid {}", via.name(), child.id().unwrap_or_default());
    }
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
        child,
        lines,
        xsub: fields.get("xsub").cloned().context("no xsub")?,
        xpub: fields.get("xpub").cloned().context("no xpub")?,
    })
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// Updates per second the publishers handed to their sockets.
    sent: f64,
    /// Updates per second received, from the start to the last one received.
    delivered: f64,
    /// Share of what was sent to the subscribers they did not get.
    loss: f64,
    /// Share of the updates sent that our proxy read (`None` for the others).
    proxy_in: Option<f64>,
    /// Share of the updates due to subscribers that our proxy dropped at their outboxes.
    slow_dropped: Option<f64>,
}

/// `pubs` publishers over `topics` topics round robin; `subs` subscribers, subscriber i
/// subscribed to topic i (or to everything when `topics` is 1).
#[allow(clippy::too_many_arguments)]
async fn run_case(
    via: Via,
    pubs: usize,
    subs: usize,
    topics: usize,
    size: usize,
    secs: f64,
    rate: f64,
    before: Option<&PathBuf>,
    show_pid: bool,
) -> Result<Row> {
    let proxy = match via {
        Via::Direct => None,
        v => Some(start_proxy(v, before, show_pid).await?),
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
    let last_received = Arc::new(Mutex::new(Instant::now()));
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
        let (received, last_received, stop) =
            (received.clone(), last_received.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), s.recv()).await
                {
                    // Our proxy's heartbeats and re-sent last values are not updates.
                    if m.get(0).is_some_and(|t| t.starts_with(b"t")) {
                        n += 1;
                        if n.is_multiple_of(1024) {
                            received.fetch_add(1024, Relaxed);
                            *last_received.lock().expect("lock") = Instant::now();
                        }
                    }
                }
            }
            received.fetch_add(n % 1024, Relaxed);
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
            loop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                if rate > 0.0 && sent as f64 >= rate * (now - started).as_secs_f64() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
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
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let until_last = (*last_received.lock().expect("lock") - started)
        .as_secs_f64()
        .max(secs);
    let expected = if topics == 1 {
        sent * subs as u64
    } else {
        sent
    };
    let delivered = received.load(Relaxed);
    let stats = match proxy {
        Some(px) => px.stop().await,
        None => None,
    };
    Ok(Row {
        sent: sent as f64 / secs,
        delivered: delivered as f64 / until_last,
        loss: 1.0 - delivered as f64 / expected.max(1) as f64,
        proxy_in: stats
            .as_ref()
            .map(|s| s.messages_in as f64 / sent.max(1) as f64),
        slow_dropped: stats
            .as_ref()
            .map(|s| s.slow_dropped as f64 / expected.max(1) as f64),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::logging::init("pubsub=warn");
    common::cli::exit_code(run(args).await.map(|()| std::process::ExitCode::SUCCESS))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

async fn run(args: Args) -> Result<()> {
    let mut vias = if args.via.is_empty() {
        vec![Via::Ours, Via::Before, Via::Libzmq, Via::Direct]
    } else {
        args.via.clone()
    };
    if args.before.is_none() {
        vias.retain(|v| *v != Via::Before);
    }
    if args.no_libzmq {
        vias.retain(|v| *v != Via::Libzmq);
    }
    let cases: Vec<(&str, usize, usize, usize)> = [
        ("1x1", "1 pub, 1 sub, all topics", 1, 1, 1),
        ("2x4", "2 pubs, 4 subs, one topic each", 2, 4, 4),
    ]
    .into_iter()
    .filter(|(key, ..)| args.case.is_empty() || args.case.iter().any(|c| c == key))
    .map(|(_, name, p, s, t)| (name, p, s, t))
    .collect();
    let mut table: Vec<(String, Vec<Row>)> = Vec::new();
    for round in 1..=args.rounds {
        for &(case, pubs, subs, topics) in &cases {
            for &size in &args.size {
                for &via in &vias {
                    let row = run_case(
                        via,
                        pubs,
                        subs,
                        topics,
                        size,
                        args.seconds,
                        args.rate,
                        args.before.as_ref(),
                        args.show_pid,
                    )
                    .await?;
                    let key = format!("| {case} | {size} B | {} |", via.name());
                    eprintln!(
                        "round {round} {key} delivered {:.0}/s, loss {}",
                        row.delivered,
                        percent(row.loss)
                    );
                    match table.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, rows)) => rows.push(row),
                        None => table.push((key, vec![row])),
                    }
                }
            }
        }
    }
    println!(
        "Medians of {} interleaved rounds, {} s each{}.",
        args.rounds,
        args.seconds,
        if args.rate > 0.0 {
            format!(", {} updates/s per publisher", args.rate)
        } else {
            ", publishers flooding".to_string()
        }
    );
    println!("| case | size | via | sent/s | delivered/s | loss | read by our proxy | dropped at subscribers' outboxes |");
    println!("|---|---|---|---|---|---|---|---|");
    for (key, rows) in table {
        let col = |f: fn(&Row) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(f).collect();
            if v.is_empty() {
                "".to_string()
            } else {
                percent(median(v))
            }
        };
        println!(
            "{key} {:.0} | {:.0} | {} | {} | {} |",
            median(rows.iter().map(|r| r.sent).collect()),
            median(rows.iter().map(|r| r.delivered).collect()),
            percent(median(rows.iter().map(|r| r.loss).collect())),
            col(|r| r.proxy_in),
            col(|r| r.slow_dropped),
        );
    }
    Ok(())
}
