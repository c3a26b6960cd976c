//! `pipeline-worker`: PULLs image tasks from a `pipeline` master, filters them on blocking
//! threads and reports back. Serves batch after batch until told to stop or signalled.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use common::cli::{HeartbeatArgs, ReconnectArgs};
use pipeline::WorkerConfig;

/// Image pipeline worker: connects to a master's task, report and control endpoints.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Master endpoints, comma-separated, in the order tasks,results[,control]: the `connect=`
    /// value of the master's ready line. Without control, `--stop-workers` cannot reach us.
    #[arg(
        long,
        env = "PIPELINE_CONNECT",
        value_delimiter = ',',
        value_parser = common::endpoint::parse_tcp,
        default_value = "tcp://127.0.0.1:5557,tcp://127.0.0.1:5558,tcp://127.0.0.1:5561"
    )]
    connect: Vec<String>,
    /// Name in the master's per-worker counts; default HOST-PID.
    #[arg(long, env = "PIPELINE_WORKER_ID")]
    id: Option<String>,
    /// Images processed at the same time (run one worker per core, or raise this).
    #[arg(long, env = "PIPELINE_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Tasks held waiting beyond --threads, to hide the round trip to the master.
    #[arg(long, env = "PIPELINE_PREFETCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=1024))]
    prefetch: u32,
    /// Memory the decoder may allocate for one image, in MiB; larger images fail.
    #[arg(long, env = "PIPELINE_MAX_DECODE_MIB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    max_decode_mib: u64,
    /// Seconds running images may take to finish on shutdown.
    #[arg(long, env = "PIPELINE_DRAIN_S", default_value_t = 5)]
    drain_s: u64,
    /// Answer every task as done without touching any file (measures messaging alone).
    #[arg(long, hide = true)]
    dry_run: bool,
    /// Extra milliseconds spent on every image (simulates a slow worker).
    #[arg(long, hide = true, default_value_t = 0)]
    delay_ms: u64,
    /// Test hook: images whose path contains this text never finish (until abandoned).
    #[arg(long, hide = true)]
    stall_on: Option<String>,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    reconnect: ReconnectArgs,
}

/// See `common::alloc`: a tiny task is allocations above all (JSON in and out).
#[global_allocator]
static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;

// One thread, like every role on zmq.rs: the library takes its peer-map locks both
// asynchronously (held across awaits) and with blocking calls, and on a multi-threaded
// runtime the two can deadlock every worker thread (docs/architecture.md, "One thread").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    common::alloc::tune();
    let args = Args::parse();
    common::logging::init("pipeline=info,common=info");
    if !(2..=3).contains(&args.connect.len()) {
        eprintln!("error: --connect takes 2 or 3 endpoints (tasks,results[,control])");
        return ExitCode::FAILURE;
    }
    common::cli::exit_code(run(args).await.map(|()| ExitCode::SUCCESS))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = WorkerConfig {
        tasks: args.connect[0].clone(),
        results: args.connect[1].clone(),
        control: args.connect.get(2).cloned(),
        id: args.id.unwrap_or_else(pipeline::worker::default_id),
        threads: args.threads,
        prefetch: args.prefetch,
        max_decode_bytes: args.max_decode_mib << 20,
        heartbeat: args.heartbeat.heartbeat(),
        reconnect: args.reconnect.reconnect(),
        drain: Duration::from_secs(args.drain_s),
        dry_run: args.dry_run,
        delay: Duration::from_millis(args.delay_ms),
        stall_on: args.stall_on,
    };
    let cancel = common::shutdown::on_signals();
    // A client has nothing bound: `ready` says the process runs and handles signals; it
    // connects (and reconnects) on its own from here.
    let slots = config.slots().to_string();
    common::ready::announce(&[("worker", &config.id), ("slots", &slots)]);
    let exit = pipeline::worker::run(config, cancel)
        .await
        .context("worker failed")?;
    tracing::info!(?exit, "exiting");
    Ok(())
}
