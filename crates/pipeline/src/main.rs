//! `pipeline`: the master of the image pipeline. Binds tasks (PUSH), results (PULL) and control
//! (PUB), prints `ready ...`, runs one batch and prints its summary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use common::cli::{HeartbeatArgs, LimitArgs};
use pipeline::filter::Chain;
use pipeline::{MasterConfig, Transfer, WorkerConfig};

/// Exit status of a batch in which some files produced no output.
const EXIT_SOME_FAILED: u8 = 3;

/// Filter every image of a directory tree with a pool of workers (PUSH/PULL divide and conquer).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory of images to filter, walked recursively. Without it, a built-in sample set
    /// of 36 images is generated in a temporary directory.
    #[arg(long, env = "PIPELINE_INPUT")]
    input: Option<PathBuf>,
    /// Directory for the results; each keeps its input's relative path. Created if missing.
    #[arg(long, env = "PIPELINE_OUTPUT", default_value = "pipeline-out")]
    output: PathBuf,
    /// Filter chain applied left to right: grayscale, invert, blur:SIGMA, resize:WxH,
    /// thumbnail:N, brighten:N, contrast:C, edges. Example: grayscale,blur:2.0
    #[arg(long, env = "PIPELINE_FILTER", default_value = "grayscale,blur:1.5")]
    filter: String,
    /// Endpoint to bind for tasks (workers PULL from it).
    #[arg(long, env = "PIPELINE_TASKS_BIND", default_value = "tcp://127.0.0.1:5557", value_parser = common::endpoint::parse_tcp)]
    tasks_bind: String,
    /// Endpoint to bind for worker reports (workers PUSH to it).
    #[arg(long, env = "PIPELINE_RESULTS_BIND", default_value = "tcp://127.0.0.1:5558", value_parser = common::endpoint::parse_tcp)]
    results_bind: String,
    /// Endpoint to bind for control messages: heartbeats and stop (workers SUB to it).
    #[arg(long, env = "PIPELINE_CONTROL_BIND", default_value = "tcp://127.0.0.1:5561", value_parser = common::endpoint::parse_tcp)]
    control_bind: String,
    /// How images reach workers: `path` (shared filesystem, workers write outputs) or `inline`
    /// (bytes over the wire, the master writes outputs; for workers without the filesystem).
    #[arg(long, env = "PIPELINE_TRANSFER", value_enum, default_value_t = TransferArg::Path)]
    transfer: TransferArg,
    /// Largest input file sent inline, in bytes; larger ones are reported as failed.
    #[arg(long, env = "PIPELINE_MAX_IMAGE_BYTES", default_value_t = 32 << 20)]
    max_image_bytes: u64,
    /// Inline: image bytes the master holds at most (tasks sent and not yet accepted, inputs
    /// being read, outputs waiting for the disk); no task leaves while they are at it.
    /// Default: 2 x --max-image-bytes.
    #[arg(long, env = "PIPELINE_MAX_INLINE_BYTES")]
    max_inline_bytes: Option<u64>,
    /// Seconds a worker may spend on one image before it is sent to another worker (the
    /// worker, told of it, abandons the image then).
    #[arg(long, env = "PIPELINE_TASK_TIMEOUT_S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    task_timeout_s: u64,
    /// Attempts an image may cost (answers lost to the task timeout, a lost or restarted
    /// worker, a done without its output) before it fails with their reasons.
    #[arg(long, env = "PIPELINE_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Most tasks one worker may hold at once, whatever slots (threads + prefetch) it announces.
    #[arg(long, env = "PIPELINE_MAX_SLOTS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_slots: u32,
    /// Take a path-mode done without checking its output is on disk: only for `--dry-run`
    /// workers, which write nothing (messaging benchmarks).
    #[arg(long, hide = true)]
    no_output_check: bool,
    /// Tell every worker to exit once the batch is complete.
    #[arg(long, env = "PIPELINE_STOP_WORKERS")]
    stop_workers: bool,
    /// Filter every image again. Without it, a master started on the output of the same job
    /// (same input and filter: a master killed or stopped mid-batch) sends only the images not
    /// done yet.
    #[arg(long, env = "PIPELINE_REDO")]
    redo: bool,
    /// Send no task until this many workers have connected (then any number may come and go).
    #[arg(long, env = "PIPELINE_MIN_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    min_workers: u64,
    /// Print the summary as one JSON object, the last line on stdout.
    #[arg(long, env = "PIPELINE_JSON")]
    json: bool,
    /// Never draw the progress bar (it is drawn only when stderr is a terminal).
    #[arg(long, env = "PIPELINE_NO_PROGRESS")]
    no_progress: bool,
    /// Also run this many workers inside the master process (one image at a time each),
    /// so that one command does the whole job.
    #[arg(long, env = "PIPELINE_LOCAL_WORKERS", default_value_t = 0)]
    local_workers: u32,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransferArg {
    Path,
    Inline,
}

/// See `common::alloc`: each report read is an allocation of its own, and a batch of tiny
/// tasks is allocations above all.
#[global_allocator]
static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;

// One thread, like every role on zmq.rs: the library takes its peer-map locks both
// asynchronously (held across awaits) and with blocking calls, and on a multi-threaded
// runtime the two can deadlock every worker thread (docs/architecture.md, "One thread").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    common::alloc::tune();
    let args: Args = common::cli::parse_with_guard_defaults(
        pipeline::master::DEFAULT_MAX_MESSAGE_BYTES,
        pipeline::master::DEFAULT_MAX_PEER_BYTES,
    );
    common::logging::init("pipeline=info,common=info");
    common::cli::exit_code(run(args).await)
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let filter = Chain::parse(&args.filter).context("invalid --filter")?;
    let config = MasterConfig {
        input: args.input.clone(),
        output: args.output.clone(),
        filter,
        tasks_bind: args.tasks_bind.clone(),
        results_bind: args.results_bind.clone(),
        control_bind: args.control_bind.clone(),
        transfer: match args.transfer {
            TransferArg::Path => Transfer::Path,
            TransferArg::Inline => Transfer::Inline,
        },
        max_image_bytes: args.max_image_bytes,
        max_inline_bytes: args
            .max_inline_bytes
            .unwrap_or(args.max_image_bytes.saturating_mul(2)),
        heartbeat: args.heartbeat.heartbeat(),
        task_timeout: Duration::from_secs(args.task_timeout_s),
        max_attempts: args.max_attempts,
        max_slots: args.max_slots,
        check_outputs: !args.no_output_check,
        stop_workers: args.stop_workers,
        redo: args.redo,
        min_workers: usize::try_from(args.min_workers)
            .unwrap_or(usize::MAX)
            .max(args.local_workers as usize),
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        limits: args.limits.limits(),
    };
    let cancel = common::shutdown::on_signals();
    let locals = cancel.child_token();
    let (local_count, heartbeat) = (args.local_workers, config.heartbeat);
    let summary = pipeline::master::run(config, cancel.clone(), |endpoints| {
        endpoints.announce();
        for n in 0..local_count {
            let cfg = WorkerConfig {
                tasks: endpoints.tasks.replace("0.0.0.0", "127.0.0.1"),
                results: endpoints.results.replace("0.0.0.0", "127.0.0.1"),
                control: Some(endpoints.control.replace("0.0.0.0", "127.0.0.1")),
                id: format!("local-{n}"),
                threads: 1,
                prefetch: 1,
                max_decode_bytes: 512 << 20,
                heartbeat,
                reconnect: common::link::Reconnect::default(),
                drain: Duration::from_secs(5),
                dry_run: false,
                delay: Duration::ZERO,
                stall_on: None,
            };
            let token = locals.clone();
            tokio::spawn(async move {
                if let Err(e) = pipeline::worker::run(cfg, token).await {
                    tracing::error!(error = %e, "local worker failed");
                }
            });
        }
    })
    .await?;
    locals.cancel();
    if args.json {
        eprint!("{}", summary.render());
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(if summary.failed > 0 && !summary.interrupted {
        ExitCode::from(EXIT_SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}
