//! `poll`: one task, several sockets, one `tokio::select!` (see `docs/poll.md`).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use common::cli::{HeartbeatArgs, ReconnectArgs};
use pubsub::protocol::Zip;

const ABOUT: &str = "Reads several sockets at once in one task: weather updates on a SUB, \
tasks on a PULL, results out on a PUSH, a timer and Ctrl-C, in one tokio::select! loop \
(zmq_poll). With no endpoint it feeds itself (its own PUB, PUSH and sink on loopback).";

const AFTER: &str = "\
zmq_poll in Rust:
  zmq_pollitem_t {sub, ZMQ_POLLIN}    ->  ev = sub.next() => ...            (a select! branch)
  zmq_pollitem_t {pull, ZMQ_POLLIN}   ->  ev = pull.next(), if room => ...  (left out while the PUSH is full)
  zmq_pollitem_t {push, ZMQ_POLLOUT}  ->  r = outbox.flush(), if queued => ... (the pending send itself)
  zmq_poll(items, n, timeout)         ->  at = tick.tick() => ...           (--tick-ms)
  rc == -1 && errno == EINTR          ->  () = shutdown.cancelled() => break
A branch completes with its message and the losing branches' futures are dropped: every
branch here is cancel-safe, or keeps its future alive across iterations (the PUSH send).
One task per socket, feeding a channel, is the better design when a socket's handling is
slow or blocks (the others would wait), or sockets need their own back-pressure.

Examples:
  poll                                               # self-fed, Ctrl-C to stop
  poll --sub tcp://127.0.0.1:5556 --zip 10001        # against `cargo run -p pubsub`
  poll --sub tcp://127.0.0.1:5556 --pull tcp://127.0.0.1:5557 --push tcp://127.0.0.1:5558 --json";

#[derive(Debug, Parser)]
#[command(version, about = ABOUT, after_help = AFTER)]
struct Args {
    /// SUB: connect to a proxy's XPUB (e.g. tcp://127.0.0.1:5556) for weather updates.
    #[arg(long, env = "POLL_SUB", value_parser = common::endpoint::parse_tcp)]
    sub: Option<String>,
    /// PULL: connect to a feeder's bound PUSH for tasks (`<instance hex> <seq>`).
    #[arg(long, env = "POLL_PULL", value_parser = common::endpoint::parse_tcp)]
    pull: Option<String>,
    /// PUSH: connect to a sink's bound PULL; each task is sent on as a result (POLLOUT).
    #[arg(long, env = "POLL_PUSH", value_parser = common::endpoint::parse_tcp)]
    push: Option<String>,
    /// A zip code to subscribe to (repeat or comma-separate; default: every update).
    #[arg(long = "zip", env = "POLL_ZIPS", value_delimiter = ',')]
    zips: Vec<Zip>,
    /// Stop after this many updates and tasks, together (duplicates not counted).
    #[arg(long, env = "POLL_COUNT")]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, env = "POLL_DURATION_S", value_parser = common::cli::positive_secs)]
    duration_s: Option<Duration>,
    /// The timer branch's period in milliseconds (the poll timeout; a status line each).
    #[arg(long, env = "POLL_TICK_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    tick_ms: u64,
    /// Results waiting for the PUSH at most; while full, no task is read.
    #[arg(long, env = "POLL_OUT_CAPACITY", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    out_capacity: u64,
    /// On stop, milliseconds the queued results may take to leave.
    #[arg(long, env = "POLL_DRAIN_MS", default_value_t = 1000)]
    drain_ms: u64,
    /// Self-fed mode: updates per second, and tasks per second.
    #[arg(long, env = "POLL_FEED_RATE", default_value_t = 100.0, value_parser = common::cli::positive)]
    feed_rate: f64,
    /// Print only the summary, as one JSON object on stdout (last line), not a line per tick.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    reconnect: ReconnectArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init("poll=info,common=info");
    let shutdown = common::shutdown::on_signals();
    let mut zips = args.zips;
    zips.sort();
    zips.dedup();
    let config = poll::Config {
        sub: args.sub,
        pull: args.pull,
        push: args.push,
        zips,
        tick: Duration::from_millis(args.tick_ms),
        count: args.count,
        duration: args.duration_s,
        out_capacity: args.out_capacity as usize,
        drain: Duration::from_millis(args.drain_ms),
        heartbeat: args.heartbeat.heartbeat(),
        reconnect: args.reconnect.reconnect(),
        feed_rate: args.feed_rate,
        quiet: args.json,
    };
    let result = poll::run(config, shutdown, |fields| {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        common::ready::announce(&fields);
    })
    .await;
    let summary = match result {
        Ok(s) => s,
        Err(e) => return common::cli::exit_code::<anyhow::Error>(Err(e)),
    };
    eprintln!(
        "poll: {} received, {} ticks (at worst {} ms late) in {} ms",
        summary.received, summary.ticks, summary.max_tick_late_ms, summary.elapsed_ms
    );
    if args.json {
        pubsub::print_json(&summary);
    }
    ExitCode::SUCCESS
}
