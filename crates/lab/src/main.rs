//! `lab`: runs the seed's experiments against the real binaries and prints a verdict for each.
//! With no scenario named, it runs them all: the tour, narrated step by step, ending with one
//! summary table and an HTML report of the fault scenarios' timelines.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use lab::process::Bins;
use lab::scenarios::{self, Lab, PartitionMode};

/// Scenario runner: starts brokers, workers and clients, kills and partitions them, and judges
/// the outcome from the clients' own counts.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<lab::commands::Command>,
    /// Scenarios to run (default: all). `lab --list` names them.
    scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// How to emulate partitions.
    #[arg(long, env = "LAB_PARTITION", value_enum, default_value_t = PartitionMode::Auto)]
    partition: PartitionMode,
    /// Milliseconds the broker stays down (broker-restart) or the partition lasts (partition);
    /// defaults 1500 and 4500.
    #[arg(long, env = "LAB_OUTAGE_MS")]
    outage_ms: Option<u64>,
    /// Directory for the children's logs.
    #[arg(
        long,
        env = "LAB_LOG_DIR",
        default_value = "target/lab-logs",
        global = true
    )]
    log_dir: PathBuf,
    /// Print verdicts as JSON lines instead of text (no narration, no table).
    #[arg(long, global = true)]
    json: bool,
    /// Do not narrate each step on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Directory for the timelines (SVG) and the HTML report (index.html).
    #[arg(long, env = "LAB_REPORT_DIR", default_value = "target/lab-report")]
    report_dir: PathBuf,
    /// Do not build the role binaries first (they must be next to `lab`, or in LAB_BIN_DIR).
    #[arg(long, env = "LAB_NO_BUILD", global = true)]
    no_build: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init("lab=info");
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    if let Some(command) = args.command {
        return lab::commands::run(command, args.log_dir, args.no_build, args.json).await;
    }
    let all = scenarios::all();
    if args.list {
        let width = all.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &all {
            println!("{:<width$}  {}", s.name, s.about);
        }
        return Ok(true);
    }
    let chosen = if args.scenarios.is_empty() {
        all
    } else {
        args.scenarios
            .iter()
            .map(|name| {
                scenarios::find(name)
                    .with_context(|| format!("unknown scenario {name:?} (see lab --list)"))
            })
            .collect::<Result<Vec<_>>>()?
    };
    if !args.no_build {
        lab::process::build_roles()?;
    }
    let lab = Lab {
        bins: Bins::locate()?,
        log_dir: args.log_dir,
        partition: args.partition,
        outage: args.outage_ms.map(std::time::Duration::from_millis),
    };
    lab.bins
        .check(&["broker", "worker", "client", "pipeline", "pipeline-worker"])?;
    let options = lab::tour::Options {
        json: args.json,
        narrate: !args.quiet,
        report_dir: Some(args.report_dir),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    Ok(lab::tour::run(&lab, &chosen, &options).await?.all_passed())
}
