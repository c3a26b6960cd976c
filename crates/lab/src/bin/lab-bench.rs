//! `lab-bench`: requests/s and latency through the broker, side by side with a direct
//! DEALER<->ROUTER echo (the ceiling for this library) in the same run. Build with --release.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use broker::ClientSummary;
use clap::Parser;
use lab::process::{Bins, Proc};

/// Broker benchmark: every case against the broker and against a direct echo, same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Requests per client at 1 in flight; ten times as many at higher concurrency.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Runs of each case, alternating direct and broker; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Payload bytes per request.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Directory for the children's logs.
    #[arg(long, default_value = "target/lab-logs/bench")]
    log_dir: PathBuf,
}

struct Case {
    clients: usize,
    workers: usize,
    in_flight: u64,
    capacity: u32,
}

struct Figures {
    rate: f64,
    p50_us: u64,
    p99_us: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    common::logging::init("lab=info");
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; run with cargo run --release -p lab --bin lab-bench");
    }
    // `cargo run --bin lab-bench` builds this binary alone: build the roles it spawns too.
    lab::process::build_roles()?;
    let bins = Bins::locate()?;
    bins.check(&["broker", "worker", "client", "echo"])?;
    let cases = [
        Case {
            clients: 1,
            workers: 1,
            in_flight: 1,
            capacity: 1,
        },
        Case {
            clients: 1,
            workers: 1,
            in_flight: 64,
            capacity: 1,
        },
        Case {
            clients: 4,
            workers: 4,
            in_flight: 64,
            capacity: 1,
        },
        Case {
            clients: 1,
            workers: 1,
            in_flight: 64,
            capacity: 64,
        },
        Case {
            clients: 4,
            workers: 4,
            in_flight: 64,
            capacity: 64,
        },
    ];
    println!("| clients x in flight | workers x capacity | direct req/s | broker req/s | broker/direct | direct p50/p99 us | broker p50/p99 us |");
    println!("|---|---|---|---|---|---|---|");
    for case in &cases {
        let (mut directs, mut brokereds) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            directs.push(direct(&bins, &args, case).await?);
            brokereds.push(brokered(&bins, &args, case).await?);
        }
        let (direct, brokered) = (median(directs), median(brokereds));
        println!(
            "| {} x {} | {} x {} | {:.0} | {:.0} | {:.0}% | {} / {} | {} / {} |",
            case.clients,
            case.in_flight,
            case.workers,
            case.capacity,
            direct.rate,
            brokered.rate,
            100.0 * brokered.rate / direct.rate,
            direct.p50_us,
            direct.p99_us,
            brokered.p50_us,
            brokered.p99_us
        );
    }
    Ok(())
}

/// The run with the median rate.
fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.swap_remove(runs.len() / 2)
}

async fn direct(bins: &Bins, args: &Args, case: &Case) -> Result<Figures> {
    let mut echo = Proc::spawn("echo", &bins.path("echo"), &[], &args.log_dir)?;
    let endpoint = echo.ready(Duration::from_secs(20)).await?["endpoint"].clone();
    clients(bins, args, case, &endpoint).await
}

async fn brokered(bins: &Bins, args: &Args, case: &Case) -> Result<Figures> {
    let a = [
        "--frontend",
        "tcp://127.0.0.1:0",
        "--backend",
        "tcp://127.0.0.1:0",
    ]
    .map(String::from);
    let mut broker = Proc::spawn("broker", &bins.path("broker"), &a, &args.log_dir)?;
    let ready = broker.ready(Duration::from_secs(20)).await?;
    let mut workers = Vec::new();
    for i in 0..case.workers {
        let a = [
            "--connect",
            &ready["backend"],
            "--id",
            &format!("w{i}"),
            "--capacity",
            &case.capacity.to_string(),
        ]
        .map(String::from);
        workers.push(Proc::spawn(
            &format!("worker-{i}"),
            &bins.path("worker"),
            &a,
            &args.log_dir,
        )?);
    }
    // Every worker announced to the broker before the clients start.
    for worker in &mut workers {
        worker.ready(Duration::from_secs(20)).await?;
    }
    clients(bins, args, case, &ready["frontend"]).await
}

async fn clients(bins: &Bins, args: &Args, case: &Case, endpoint: &str) -> Result<Figures> {
    let mut procs = Vec::new();
    for i in 0..case.clients {
        let a = [
            "--connect",
            endpoint,
            "--requests",
            &args.requests.to_string(),
            "--concurrency",
            &case.in_flight.to_string(),
            "--size",
            &args.size.to_string(),
            "--json",
        ]
        .map(String::from);
        procs.push(Proc::spawn(
            &format!("client-{i}"),
            &bins.path("client"),
            &a,
            &args.log_dir,
        )?);
    }
    let mut summaries = Vec::new();
    for p in &mut procs {
        p.wait(Duration::from_secs(600)).await?;
        let s: ClientSummary = p.json().context("client summary")?;
        anyhow::ensure!(s.lost == 0, "{} lost requests", s.lost);
        summaries.push(s);
    }
    let answered: u64 = summaries.iter().map(|s| s.answered).sum();
    let wall_ms = summaries
        .iter()
        .map(|s| s.elapsed_ms)
        .max()
        .unwrap_or(1)
        .max(1);
    let worst = |f: fn(&ClientSummary) -> u64| summaries.iter().map(f).max().unwrap_or(0);
    Ok(Figures {
        rate: answered as f64 * 1000.0 / wall_ms as f64,
        p50_us: worst(|s| s.p50_us),
        p99_us: worst(|s| s.p99_us),
    })
}
