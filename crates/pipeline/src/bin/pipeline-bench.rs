//! `pipeline-bench`: images/s through the pipeline with 1 and 2 worker processes, against an
//! in-process baseline (same filter, same images, same number of threads: the ceiling), and
//! tiny tasks/s to show the messaging overhead alone. Run it in release:
//! `cargo run --release -p pipeline --bin pipeline-bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use common::heartbeat::Heartbeat;
use common::CancellationToken;
use pipeline::filter::Chain;
use pipeline::{MasterConfig, Summary, Transfer};
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Benchmark of the image pipeline (release build recommended).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Images in the generated set.
    #[arg(long, env = "BENCH_IMAGES", default_value_t = 160)]
    images: usize,
    /// Approximate side of the generated images, in pixels.
    #[arg(long, env = "BENCH_SIDE", default_value_t = 1024)]
    side: u32,
    /// Filter chain applied by every variant.
    #[arg(long, env = "BENCH_FILTER", default_value = "grayscale,blur:3.0")]
    filter: String,
    /// Worker counts (and baseline thread counts) to measure.
    #[arg(
        long,
        env = "BENCH_WORKERS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    workers: Vec<usize>,
    /// Runs of every variant; the best is reported.
    #[arg(long, env = "BENCH_REPEAT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Tiny tasks for the messaging-overhead measurement.
    #[arg(long, env = "BENCH_TINY", default_value_t = 20_000)]
    tiny: usize,
    /// Directory for generated inputs and outputs; a fresh temporary one by default.
    #[arg(long, env = "BENCH_DIR")]
    dir: Option<PathBuf>,
}

/// See `common::alloc`: the master runs in this process, as in `pipeline`.
#[global_allocator]
static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;

// One thread, as the `pipeline` binary runs its master (the in-process baseline uses threads of
// its own).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    common::alloc::tune();
    let args = Args::parse();
    common::logging::init("pipeline=warn,common=warn");
    common::cli::exit_code(run(args).await.map(|()| ExitCode::SUCCESS))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let chain = Chain::parse(&args.filter).context("invalid --filter")?;
    let worker_bin = std::env::current_exe()?
        .with_file_name("pipeline-worker")
        .canonicalize()
        .context("pipeline-worker must be built next to pipeline-bench")?;
    let root = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pipeline-bench-{}", std::process::id()))
    });
    let input = root.join("in");
    eprintln!(
        "generating {} images of about {} px ...",
        args.images, args.side
    );
    let rels = pipeline::sample::generate(&input, args.images, args.side)?;
    let mb: u64 = rels
        .iter()
        .filter_map(|r| std::fs::metadata(input.join(r)).ok())
        .map(|m| m.len())
        .sum::<u64>()
        >> 20;
    println!(
        "{} images, about {} px, {mb} MiB, filter `{}`, {} CPUs",
        args.images,
        args.side,
        chain,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Variants are interleaved and each keeps its best of --repeat runs, so that load from
    // other processes on a shared machine penalises all of them alike and as little as possible.
    let mut best: Vec<(f64, f64)> = vec![(0.0, 0.0); args.workers.len()];
    for round in 0..args.repeat {
        for (k, &n) in args.workers.iter().enumerate() {
            let ips = baseline(&input, &root.join(format!("base-{n}")), &rels, &chain, n)?;
            let piped = pipeline_run(
                &input,
                &root.join(format!("pipe-{n}")),
                &chain,
                &worker_bin,
                n,
                &[],
            )
            .await?;
            anyhow::ensure!(piped.done == rels.len(), "pipeline lost images: {piped:?}");
            eprintln!(
                "round {round}: {n} thread(s) {ips:.1}/s, {n} worker(s) {:.1}/s",
                piped.images_per_s
            );
            best[k].0 = best[k].0.max(ips);
            best[k].1 = best[k].1.max(piped.images_per_s);
        }
    }
    println!();
    println!(
        "| variant (best of {}) | images/s | vs 1 worker | vs baseline, same threads |",
        args.repeat
    );
    println!("|---|---|---|---|");
    let one = best.first().map_or(1.0, |b| b.1);
    for (&n, &(ips, piped)) in args.workers.iter().zip(&best) {
        println!("| in-process baseline, {n} thread(s) | {ips:.1} | | |");
        println!(
            "| pipeline, {n} worker process(es) | {piped:.1} | {:.2}x | {:.2}x |",
            piped / one,
            piped / ips
        );
    }
    if args.tiny > 0 {
        let tiny_in = root.join("tiny");
        std::fs::create_dir_all(&tiny_in)?;
        for i in 0..args.tiny {
            std::fs::write(tiny_in.join(format!("t{i:06}.png")), b"")?;
        }
        println!();
        println!("| messaging only ({} tiny tasks) | tasks/s |", args.tiny);
        println!("|---|---|");
        for prefetch in ["1", "32"] {
            let s = pipeline_run(
                &tiny_in,
                &root.join("tiny-out"),
                &chain,
                &worker_bin,
                1,
                &["--dry-run", "--prefetch", prefetch],
            )
            .await?;
            println!(
                "| master + 1 `--dry-run` worker, prefetch {prefetch} (task, accept, done) | {:.0} |",
                s.images_per_s
            );
        }
        println!(
            "| raw zmq.rs PUSH -> PULL, same task message, one way | {:.0} |",
            raw_push_pull(args.tiny * 5).await?
        );
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}

/// The ceiling: `threads` threads take images from a shared counter and do exactly what a
/// worker does (read, decode, filter, encode, atomic write).
fn baseline(
    input: &Path,
    output: &Path,
    rels: &[String],
    chain: &Chain,
    threads: usize,
) -> anyhow::Result<f64> {
    let next = AtomicUsize::new(0);
    let filter = chain.to_string();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(rel) = rels.get(i) else { break };
                let task = pipeline::protocol::Task {
                    batch: "base".into(),
                    id: i as u64,
                    path: rel.as_str().into(),
                    filter: filter.clone(),
                    input: Some(input.join(rel).into()),
                    output: Some(output.join(rel).into()),
                    timeout_ms: None,
                };
                if let Err(e) = pipeline::worker::execute(&task, None, 512 << 20, "base", &|| true)
                {
                    eprintln!("baseline: {rel}: {e}");
                }
            });
        }
    });
    Ok(rels.len() as f64 / started.elapsed().as_secs_f64())
}

/// Kills the worker processes if the benchmark bails out early.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn pipeline_run(
    input: &Path,
    output: &Path,
    chain: &Chain,
    worker_bin: &Path,
    workers: usize,
    worker_args: &[&str],
) -> anyhow::Result<Summary> {
    let _ = std::fs::remove_dir_all(output);
    let config = MasterConfig {
        input: Some(input.to_path_buf()),
        output: output.to_path_buf(),
        filter: chain.clone(),
        tasks_bind: "tcp://127.0.0.1:0".into(),
        results_bind: "tcp://127.0.0.1:0".into(),
        control_bind: "tcp://127.0.0.1:0".into(),
        transfer: Transfer::Path,
        max_image_bytes: 32 << 20,
        max_inline_bytes: 64 << 20,
        heartbeat: Heartbeat::default(),
        task_timeout: Duration::from_secs(120),
        max_attempts: 3,
        max_slots: 64,
        // `--dry-run` workers write nothing: their `done` cannot be checked on disk.
        check_outputs: !worker_args.contains(&"--dry-run"),
        stop_workers: true,
        redo: true,
        // The clock starts with the first task: let every worker be there by then.
        min_workers: workers,
        progress: false,
        limits: common::wire::limits::Limits {
            max_message_bytes: pipeline::master::DEFAULT_MAX_MESSAGE_BYTES,
            max_peer_bytes: pipeline::master::DEFAULT_MAX_PEER_BYTES,
            ..Default::default()
        },
    };
    let mut children = Workers(Vec::new());
    let mut spawn_error = None;
    let summary = pipeline::master::run(config, CancellationToken::new(), |eps| {
        for i in 0..workers {
            let child = Command::new(worker_bin)
                .args(["--connect", &eps.connect(), "--threads", "1"])
                .args(["--id", &format!("bench-{i}")])
                .args(worker_args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn();
            match child {
                Ok(c) => children.0.push(c),
                Err(e) => spawn_error = Some(e),
            }
        }
    })
    .await?;
    if let Some(e) = spawn_error {
        return Err(e).context("cannot start pipeline-worker");
    }
    for c in &mut children.0 {
        let _ = c.wait();
    }
    children.0.clear();
    Ok(summary)
}

/// zmq.rs alone: one PUSH, one PULL, `n` task-sized messages.
async fn raw_push_pull(n: usize) -> anyhow::Result<f64> {
    let mut pull = PullSocket::new();
    let ep = pull.bind("tcp://127.0.0.1:0").await?;
    let mut push = PushSocket::new();
    push.connect(&ep.to_string()).await?;
    let body = br#"{"batch":"0123456789abcdef","id":12345,"path":"nested/sample-001.png","filter":"grayscale,blur:2","input":"/tmp/in/nested/sample-001.png","output":"/tmp/out/nested/sample-001.png"}"#;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            push.send(ZmqMessage::from(body.to_vec())).await?;
        }
        Ok::<_, zeromq::ZmqError>(push)
    });
    for _ in 0..n {
        pull.recv().await?;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(sender.await?);
    Ok(rate)
}
