//! `publisher`: weather updates for some zip codes into the proxy's XSUB; reconnects by itself.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use common::cli::{HeartbeatArgs, ReconnectArgs};
use pubsub::config::DEFAULT_XSUB;
use pubsub::protocol::{parse_zip_list, parse_zip_range, Zip};
use pubsub::PublisherConfig;

/// Weather publisher: temperature and humidity per zip code, numbered per (publisher, zip).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The proxy's XSUB endpoint; for a proxy pair, both (`--connect A,B` or twice): every
    /// update goes to each.
    #[arg(long, env = "PUBLISHER_CONNECT", default_value = DEFAULT_XSUB, value_delimiter = ',', value_parser = common::endpoint::parse_tcp)]
    connect: Vec<String>,
    /// Name carried in every update (letters, digits, '-', '_').
    #[arg(long, env = "PUBLISHER_ID", default_value = "publisher", value_parser = parse_id)]
    id: String,
    /// Zip codes, comma-separated.
    #[arg(long, env = "PUBLISHER_ZIPS", value_parser = |s: &str| parse_zip_list(s).map(ZipList), conflicts_with = "zip_range")]
    zips: Option<ZipList>,
    /// Zip codes A to B inclusive (default 10000-10009).
    #[arg(long, env = "PUBLISHER_ZIP_RANGE", value_parser = |s: &str| parse_zip_range(s).map(ZipList))]
    zip_range: Option<ZipList>,
    /// Updates per second, all zips together (0: as fast as possible).
    #[arg(long, env = "PUBLISHER_RATE", default_value_t = 100.0)]
    rate: f64,
    /// Stop after this many updates (default: until stopped).
    #[arg(long, env = "PUBLISHER_COUNT")]
    count: Option<u64>,
    /// Before the first update, wait up to this many milliseconds for a subscription to reach
    /// the publisher (the slow-joiner cure).
    #[arg(long, env = "PUBLISHER_WAIT_SUBSCRIBER_MS")]
    wait_subscriber_ms: Option<u64>,
    /// Print the summary as one JSON object on stdout (last line).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    reconnect: ReconnectArgs,
}

/// A parsed zip list (a newtype: clap takes `Option<Vec<_>>` for a repeated flag).
#[derive(Debug, Clone)]
struct ZipList(Vec<Zip>);

fn parse_id(text: &str) -> Result<String, String> {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} must be letters, digits, '-' or '_'"))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init("pubsub=info,common=info");
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        eprintln!("error: --rate must be a number of updates per second, 0 or more");
        return ExitCode::from(2);
    }
    let shutdown = common::shutdown::on_signals();
    let zips = args
        .zips
        .or(args.zip_range)
        .map(|list| list.0)
        .unwrap_or_else(|| (10_000..10_010).filter_map(Zip::new).collect());
    let config = PublisherConfig {
        connect: args.connect,
        id: args.id,
        zips,
        rate: args.rate,
        count: args.count,
        wait_subscriber: args.wait_subscriber_ms.map(Duration::from_millis),
        heartbeat: args.heartbeat.heartbeat(),
        reconnect: args.reconnect.reconnect(),
    };
    let id = config.id.clone();
    let summary = pubsub::publisher::run(config, shutdown, |instance| {
        common::ready::announce(&[("publisher", &id), ("instance", &format!("{instance:x}"))]);
    })
    .await;
    eprintln!(
        "publisher {}: {} sent, {} while unconnected, {} reconnects, {} ms",
        summary.id, summary.sent, summary.unsent, summary.reconnects, summary.elapsed_ms
    );
    if args.json {
        pubsub::print_json(&summary);
    }
    ExitCode::SUCCESS
}
