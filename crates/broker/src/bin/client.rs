//! `client`: sends N requests through the broker (Lazy Pirate) and checks every reply.
//! Exits 0 only when every request was answered.

use std::process::ExitCode;
use std::time::Duration;

use broker::config::DEFAULT_FRONTEND;
use broker::ClientConfig;
use clap::Parser;
use common::cli::ReconnectArgs;

/// Lazy Pirate client: N distinct requests, K in flight, retries and reconnects by itself.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The broker's frontend endpoint; for a broker pair, both (`--connect P,B` or twice): the
    /// first is tried first, and each lost link moves on to the next.
    #[arg(long, env = "CLIENT_CONNECT", default_value = DEFAULT_FRONTEND, value_delimiter = ',', value_parser = common::endpoint::parse_tcp)]
    connect: Vec<String>,
    /// Number of requests to send.
    #[arg(long, env = "CLIENT_REQUESTS", default_value_t = 10)]
    requests: u64,
    /// Requests kept in flight at once.
    #[arg(long, env = "CLIENT_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,
    /// Payload bytes per request.
    #[arg(long, env = "CLIENT_SIZE", default_value_t = 0)]
    size: usize,
    /// Milliseconds before an unanswered request is sent again.
    #[arg(long, env = "CLIENT_TIMEOUT_MS", default_value_t = 2500, value_parser = clap::value_parser!(u64).range(10..))]
    timeout_ms: u64,
    /// Seconds after which the client gives up and reports what was lost.
    #[arg(long, env = "CLIENT_DEADLINE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_secs: u64,
    /// Print the summary as one JSON object on stdout (last line).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    reconnect: ReconnectArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init("broker=info,common=info");
    let shutdown = common::shutdown::on_signals();
    let config = ClientConfig {
        connect: args.connect,
        requests: args.requests,
        concurrency: args.concurrency as usize,
        size: args.size,
        timeout: Duration::from_millis(args.timeout_ms),
        deadline: Duration::from_secs(args.deadline_secs),
        reconnect: args.reconnect.reconnect(),
    };
    let summary = broker::client::run(config, shutdown).await;
    eprintln!(
        "client: {} sent, {} answered, {} lost, {} duplicates, {} retries, {} reconnects, p50 {} us, p99 {} us, {} ms",
        summary.sent, summary.answered, summary.lost, summary.duplicates, summary.retries,
        summary.reconnects, summary.p50_us, summary.p99_us, summary.elapsed_ms
    );
    if args.json {
        match serde_json::to_string(&summary) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot encode summary: {e}"),
        }
    }
    if summary.lost == 0 && summary.corrupt == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
