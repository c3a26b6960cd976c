//! `worker`: an echo service behind the broker, speaking RFC 6 (Paranoid Pirate). Prints
//! `ready worker=NAME` on stdout the first time it has announced itself to a broker.

use std::time::Duration;

use broker::config::DEFAULT_BACKEND;
use broker::WorkerConfig;
use clap::Parser;
use common::cli::{HeartbeatArgs, ReconnectArgs};

/// Echo worker: replies with the request body (plus its name) after simulated work.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The broker's backend endpoint; for a broker pair, both (`--connect P,B` or twice): the
    /// worker serves each on a link of its own.
    #[arg(long, env = "WORKER_CONNECT", default_value = DEFAULT_BACKEND, value_delimiter = ',', value_parser = common::endpoint::parse_tcp)]
    connect: Vec<String>,
    /// Name added to every reply (default: worker-<pid>).
    #[arg(long, env = "WORKER_ID")]
    id: Option<String>,
    /// Milliseconds of simulated work per request.
    #[arg(long, env = "WORKER_WORK_MS", default_value_t = 0)]
    work_ms: u64,
    /// Requests held at once (READY credits; 1 is plain RFC 6).
    #[arg(long, env = "WORKER_CAPACITY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    capacity: u32,
    /// Milliseconds to finish requests in hand after Ctrl-C/SIGTERM.
    #[arg(long, env = "WORKER_DRAIN_MS", default_value_t = 2000)]
    drain_ms: u64,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    reconnect: ReconnectArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    common::logging::init("broker=info,common=info");
    let shutdown = common::shutdown::on_signals();
    let config = WorkerConfig {
        connect: args.connect,
        name: args
            .id
            .unwrap_or_else(|| format!("worker-{}", std::process::id())),
        work: Duration::from_millis(args.work_ms),
        capacity: args.capacity,
        heartbeat: args.heartbeat.heartbeat(),
        reconnect: args.reconnect.reconnect(),
        drain: Duration::from_millis(args.drain_ms),
    };
    let name = config.name.clone();
    let mut announced = false;
    // stdout contract: one `ready` line, the first time the broker has our READY.
    broker::worker::run(config, shutdown, || {
        if !std::mem::replace(&mut announced, true) {
            common::ready::announce(&[("worker", &name)]);
        }
    })
    .await;
}
