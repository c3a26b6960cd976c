//! `subscriber`: weather updates for some zip codes from the proxy's XPUB, with the running
//! average temperature per zip; accounts for gaps and duplicates, reconnects by itself.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use common::cli::{HeartbeatArgs, ReconnectArgs};
use pubsub::config::DEFAULT_XPUB;
use pubsub::protocol::Zip;
use pubsub::SubscriberConfig;

/// Weather subscriber: prints the updates of its zips and their running average temperature.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The proxy's XPUB endpoint; for a proxy pair, both (`--connect A,B` or twice): subscribed
    /// through each, every update delivered once.
    #[arg(long, env = "SUBSCRIBER_CONNECT", default_value = DEFAULT_XPUB, value_delimiter = ',', value_parser = common::endpoint::parse_tcp)]
    connect: Vec<String>,
    /// A zip code to subscribe to (repeat the flag, or comma-separate; default 10001).
    #[arg(long = "zip", env = "SUBSCRIBER_ZIPS", value_delimiter = ',')]
    zips: Vec<Zip>,
    /// Stop after this many updates (duplicates not counted).
    #[arg(long, env = "SUBSCRIBER_COUNT", conflicts_with = "duration_s")]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, env = "SUBSCRIBER_DURATION_S", value_parser = common::cli::positive_secs)]
    duration_s: Option<Duration>,
    /// Print only the summary, as one JSON object on stdout (last line), not each update.
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
    common::logging::init("pubsub=info,common=info");
    let shutdown = common::shutdown::on_signals();
    let mut zips = args.zips;
    if zips.is_empty() {
        zips.extend(Zip::new(10001));
    }
    zips.sort();
    zips.dedup();
    let config = SubscriberConfig {
        connect: args.connect,
        zips,
        count: args.count,
        duration: args.duration_s,
        print_updates: !args.json,
        heartbeat: args.heartbeat.heartbeat(),
        reconnect: args.reconnect.reconnect(),
    };
    let print = config.print_updates;
    let summary = pubsub::subscriber::run(
        config,
        shutdown,
        || common::ready::announce(&[("subscriber", "subscribed")]),
        |update, avg| {
            if print {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "{} {} #{}: {} degrees, {}% humidity (average {avg:.1})",
                    update.zip, update.publisher, update.seq, update.temperature, update.humidity
                );
            }
        },
    )
    .await;
    eprintln!(
        "subscriber: {} received ({} late), {} gaps, {} duplicates, {} redundant, {} reconnects, longest silence {} ms",
        summary.received,
        summary.late,
        summary.gaps,
        summary.duplicates,
        summary.redundant,
        summary.reconnects,
        summary.longest_silence_ms
    );
    if args.json {
        pubsub::print_json(&summary);
    }
    ExitCode::SUCCESS
}
