//! `proxy`: the XSUB/XPUB proxy. Binds the XSUB (publishers) and XPUB (subscribers), prints
//! `ready xsub=... xpub=...` on stdout, serves until Ctrl-C or SIGTERM; with `--json`, its
//! counters as JSON lines (every `--stats-secs` and at exit).

use std::time::Duration;

use clap::Parser;
use common::cli::{HeartbeatArgs, LimitArgs};
use pubsub::config::{DEFAULT_SUBSCRIBER_BYTES, DEFAULT_XPUB, DEFAULT_XSUB};
use pubsub::{Proxy, ProxyConfig, ProxyStats};

/// See `common::alloc`: each message read from a publisher is an allocation of its own.
#[global_allocator]
static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;

/// Pub/sub proxy: XSUB for publishers, XPUB for subscribers, subscriptions per connection,
/// heartbeats on its own topic, last value cache.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Endpoint publishers connect to (port 0 picks a free port).
    #[arg(long, env = "PROXY_XSUB", default_value = DEFAULT_XSUB, value_parser = common::endpoint::parse_tcp)]
    xsub: String,
    /// Endpoint subscribers connect to (port 0 picks a free port).
    #[arg(long, env = "PROXY_XPUB", default_value = DEFAULT_XPUB, value_parser = common::endpoint::parse_tcp)]
    xpub: String,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Publisher connections open at once, at most; at the bound a new one replaces the one
    /// quiet longest (2 s or more), or is closed. Default: the open-files limit (raised to its
    /// hard limit at start) less 64, shared by the two sockets.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Bytes waiting for one subscriber, at most (its high-water mark); beyond, it misses
    /// updates (counted `slow_dropped`) and the others never wait for it.
    #[arg(long, env = "PROXY_SUBSCRIBER_BYTES", default_value_t = DEFAULT_SUBSCRIBER_BYTES, value_parser = clap::value_parser!(u64).range(1024..))]
    subscriber_bytes: u64,
    /// Distinct subscription prefixes held at most; beyond, new ones are refused.
    #[arg(long, env = "PROXY_MAX_TOPICS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_topics: u64,
    /// Prefixes one subscriber connection may hold at most; beyond, its new ones are refused
    /// (counted, and logged once a second at most).
    #[arg(long, env = "PROXY_MAX_PREFIXES_PER_CONNECTION", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_prefixes_per_connection: u64,
    /// Milliseconds a subscriber may take no data before it is cut, if it stopped reading (its
    /// kernel still acknowledges); one that cannot be reached keeps its connection for when the
    /// link heals. The other subscribers never wait for it.
    #[arg(long, env = "PROXY_STALL_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..))]
    stall_timeout_ms: u64,
    /// Do not re-send the last update of each topic to new subscriptions.
    #[arg(long, env = "PROXY_NO_LAST_VALUE")]
    no_last_value: bool,
    /// Seconds the loop may stall before the process exits with status 70.
    #[arg(long, env = "PROXY_WATCHDOG_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    watchdog_secs: u64,
    /// Print the counters as one JSON line on stdout every --stats-secs and at exit.
    #[arg(long)]
    json: bool,
    /// Seconds between stats lines.
    #[arg(long, env = "PROXY_STATS_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    stats_secs: u64,
}

// One thread, as the broker: the proxy's work is one task, and on two cores its readers and
// writers on a second thread cost more in wake-ups and cross-thread frees than they gained
// (libzmq's zpub/zsub, 1 KiB 1x1: 42-46 CPU ticks against 57-70; 2x4 64 B: peak RSS 6.5 MB
// against 13 MB; delivery no slower).
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    common::alloc::tune();
    let args = Args::parse();
    common::logging::init("pubsub=info,common=info");
    common::cli::exit_code(run(args).await.map(|()| std::process::ExitCode::SUCCESS))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = common::shutdown::on_signals();
    let open_files = common::endpoint::raise_open_files_limit();
    let max_connections = args.max_connections.map_or_else(
        || common::endpoint::max_connections_for(open_files, 2),
        |max| max as usize,
    );
    let config = ProxyConfig {
        xsub: args.xsub,
        xpub: args.xpub,
        heartbeat: args.heartbeat.heartbeat(),
        subscriber_bytes: args.subscriber_bytes,
        max_topics: args.max_topics as usize,
        max_prefixes_per_connection: args.max_prefixes_per_connection as usize,
        stall_timeout: Duration::from_millis(args.stall_timeout_ms),
        last_value_cache: !args.no_last_value,
        watchdog: Duration::from_secs(args.watchdog_secs),
        stats_every: Duration::from_secs(args.stats_secs),
        limits: args.limits.limits(),
        max_connections,
    };
    let proxy = Proxy::bind(config).await?;
    common::ready::announce(&[
        ("xsub", &proxy.xsub_endpoint),
        ("xpub", &proxy.xpub_endpoint),
    ]);
    let print = |stats: &ProxyStats| {
        if args.json {
            pubsub::print_json(stats);
        }
    };
    let stats = proxy.run_reporting(shutdown, print).await;
    print(&stats);
    Ok(())
}
