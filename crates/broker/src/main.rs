//! `broker`: the shared queue. Binds the frontend (clients) and backend (workers) ROUTERs,
//! prints `ready frontend=... backend=...` on stdout, serves until Ctrl-C or SIGTERM; with
//! `--json`, its counters as JSON lines (every `--stats-secs` and at exit).

use std::time::Duration;

use broker::config::{DEFAULT_BACKEND, DEFAULT_FRONTEND};
use broker::{Broker, BrokerConfig};
use clap::Parser;
use common::cli::{HeartbeatArgs, LimitArgs};

/// See `common::alloc`: each message read is an allocation of its own.
#[global_allocator]
static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;

/// Shared-queue broker: ROUTER frontend for clients, ROUTER backend for RFC 6 workers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Endpoint clients connect to (port 0 picks a free port).
    #[arg(long, env = "BROKER_FRONTEND", default_value = DEFAULT_FRONTEND, value_parser = common::endpoint::parse_tcp)]
    frontend: String,
    /// Endpoint workers connect to (port 0 picks a free port).
    #[arg(long, env = "BROKER_BACKEND", default_value = DEFAULT_BACKEND, value_parser = common::endpoint::parse_tcp)]
    backend: String,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Connections open at once on each socket, at most; at the bound a new one replaces the
    /// one quiet longest (2 s or more), or is closed. Default: the open-files limit (raised to
    /// its hard limit at start) less 64, shared by the two sockets.
    #[arg(long, env = "BROKER_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Requests waiting for a worker beyond this many are dropped (clients retry).
    #[arg(long, env = "BROKER_MAX_QUEUED", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_queued: u64,
    /// Bytes of the requests waiting for a worker, at most (the flooding client gives way).
    #[arg(long, env = "BROKER_MAX_QUEUED_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
    max_queued_bytes: u64,
    /// A request is dropped once this many workers were lost (cut, disconnected, stalled or
    /// silent) while holding it, and its client's retries of it too: the client gets no reply
    /// (counted `poisoned`, `poisoned_retries`).
    #[arg(long, env = "BROKER_MAX_DELIVERIES", default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..))]
    max_deliveries: u8,
    /// Seconds the loop may stall before the process exits with status 70 for a supervisor
    /// to restart it (at least three heartbeat intervals).
    #[arg(long, env = "BROKER_WATCHDOG_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    watchdog_secs: u64,
    /// Milliseconds to keep forwarding replies in flight after Ctrl-C/SIGTERM.
    #[arg(long, env = "BROKER_DRAIN_MS", default_value_t = 2000)]
    drain_ms: u64,
    /// Print the counters as one JSON line on stdout every --stats-secs and at exit (the last
    /// line).
    #[arg(long)]
    json: bool,
    /// Run as one broker of a pair (docs/pairs.md): `primary` or `backup`. The pair's
    /// brokers tell each other their state every heartbeat interval over the peer link
    /// (`--peer-bind` on one, `--peer-connect` to it on the other); a broker of a pair serves
    /// clients only while active.
    #[arg(long, env = "BROKER_PAIR", value_parser = clap::value_parser!(broker::pair::Role), requires = "peer")]
    pair: Option<broker::pair::Role>,
    /// Where this broker of a pair binds its peer link (port 0 picks a free port; the ready
    /// line says `peer=`).
    #[arg(long, env = "BROKER_PEER_BIND", group = "peer", requires = "pair", value_parser = common::endpoint::parse_tcp)]
    peer_bind: Option<String>,
    /// Where this broker of a pair connects its peer link (the other's `--peer-bind`).
    #[arg(long, env = "BROKER_PEER_CONNECT", group = "peer", requires = "pair", value_parser = common::endpoint::parse_tcp)]
    peer_connect: Option<String>,
    /// Seconds between stats log lines.
    #[arg(long, env = "BROKER_STATS_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    stats_secs: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    common::alloc::tune();
    let args = Args::parse();
    common::logging::init("broker=info,common=info");
    common::cli::exit_code(run(args).await.map(|()| std::process::ExitCode::SUCCESS))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = common::shutdown::on_signals();
    let open_files = common::endpoint::raise_open_files_limit();
    let max_connections = args.max_connections.map_or_else(
        || common::endpoint::max_connections_for(open_files, 2),
        |max| max as usize,
    );
    let config = BrokerConfig {
        frontend: args.frontend,
        backend: args.backend,
        heartbeat: args.heartbeat.heartbeat(),
        max_queued: args.max_queued as usize,
        max_queued_bytes: args.max_queued_bytes as usize,
        watchdog: Duration::from_secs(args.watchdog_secs),
        drain: Duration::from_millis(args.drain_ms),
        stats_every: Duration::from_secs(args.stats_secs),
        limits: args.limits.limits(),
        max_connections,
        max_deliveries: args.max_deliveries,
        pair: args.pair.map(|role| broker::pair::PairConfig {
            role,
            bind: args.peer_bind.clone(),
            connect: args.peer_connect.clone(),
        }),
    };
    let broker = Broker::bind(config).await?;
    let mut ready = vec![
        ("frontend", broker.frontend_endpoint.as_str()),
        ("backend", broker.backend_endpoint.as_str()),
    ];
    if let Some(peer) = broker.peer_endpoint() {
        ready.push(("peer", peer));
    }
    common::ready::announce(&ready);
    let print = |stats: &broker::BrokerStats| {
        if args.json {
            match serde_json::to_string(stats) {
                Ok(line) => println!("{line}"),
                Err(e) => tracing::warn!(error = %e, "cannot print stats"),
            }
        }
    };
    let stats = broker.run_reporting(shutdown, print).await;
    print(&stats);
    Ok(())
}
