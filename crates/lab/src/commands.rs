//! The lab's subcommands besides the scenarios: `lab fuzz` and `lab soak`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fuzz::{self, FuzzConfig};
use crate::process::Bins;
use crate::scenarios::{Lab, PartitionMode};
use crate::soak::{self, SoakConfig};
use crate::verdict::Verdict;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Throw thousands of random and mutated ZMTP connections at a live process (limits on),
    /// then check it still serves and its memory is back near where it started.
    Fuzz(FuzzArgs),
    /// Run the shared queue, the pipeline and pub/sub together under random faults for
    /// minutes; count lost and duplicated work, watch memory and descriptors.
    Soak(SoakArgs),
}

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Connections to throw (per target).
    #[arg(long, default_value_t = 3000)]
    pub connections: usize,
    /// Seed of the random connections (replay a failure with the same seed).
    #[arg(long, default_value_t = 0x5eed_2026)]
    pub seed: u64,
    /// Targets, comma-separated (default: all): broker, proxy, pipeline.
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// Start each target with its default limits instead of the fuzzer's 64 KiB message limit
    /// (every socket checks its limits always, loopback included).
    #[arg(long)]
    pub default_limits: bool,
}

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Minutes of faults (fractions allowed); the run takes about 20 s more.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seed of the faults' kinds, targets, lengths and moments.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the samples (CSV), the report (JSON) and the RSS picture (SVG) go.
    #[arg(long, default_value = "target/soak")]
    pub out: PathBuf,
    /// Break something the soak does not recover from (to see its verdict fail).
    #[arg(long, value_enum, hide = true)]
    pub sabotage: Option<soak::Sabotage>,
    /// Only draw `rss.svg` in --out again from the samples.csv of an earlier soak.
    #[arg(long, value_name = "SAMPLES_CSV")]
    pub plot: Option<PathBuf>,
}

/// Runs a subcommand; prints its verdicts. `Ok(true)` when all passed.
pub async fn run(command: Command, log_dir: PathBuf, no_build: bool, json: bool) -> Result<bool> {
    if !no_build {
        crate::process::build_roles()?;
    }
    let lab = Lab {
        bins: Bins::locate()?,
        log_dir,
        partition: PartitionMode::Relay,
        outage: None,
    };
    let verdicts = match command {
        Command::Fuzz(args) => {
            let chosen = if args.target.is_empty() {
                fuzz::targets()
            } else {
                args.target
                    .iter()
                    .map(|t| {
                        let names: Vec<_> = fuzz::targets().iter().map(|t| t.name).collect();
                        fuzz::find(t).with_context(|| {
                            format!("unknown fuzz target {t:?} (known: {})", names.join(", "))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            lab.bins.check(&["broker", "worker", "client"])?;
            let config = FuzzConfig {
                connections: args.connections,
                seed: args.seed,
                default_limits: args.default_limits,
                ..FuzzConfig::default()
            };
            let mut verdicts = Vec::new();
            for target in &chosen {
                eprintln!(
                    "fuzzing {} with {} connections (seed {}) ...",
                    target.name, config.connections, config.seed
                );
                verdicts.push(fuzz::run(target, &lab, &config).await);
            }
            verdicts
        }
        Command::Soak(SoakArgs {
            plot: Some(csv),
            out,
            seed,
            ..
        }) => {
            let svg = soak::replot(&csv, &out, seed)?;
            println!("{}", svg.display());
            return Ok(true);
        }
        Command::Soak(args) => {
            anyhow::ensure!(
                args.minutes.is_finite() && args.minutes > 0.0,
                "--minutes must be a positive number of minutes, got {}",
                args.minutes
            );
            let config = SoakConfig {
                duration: Duration::from_secs_f64(args.minutes * 60.0),
                seed: args.seed,
                out: args.out,
                sabotage: args.sabotage,
            };
            eprintln!("soaking for {} min (seed {}) ...", args.minutes, args.seed);
            let verdict = match soak::run(&lab, &config).await {
                Ok(v) => v,
                Err(e) => {
                    let mut v = Verdict::new("soak", "relay");
                    v.expect(false, format!("{e:#}"));
                    v
                }
            };
            vec![verdict]
        }
    };
    let mut passed = true;
    for v in &verdicts {
        passed &= v.passed;
        if json {
            println!("{}", serde_json::to_string(v)?);
        } else {
            print!("{}", v.render());
        }
    }
    if !passed {
        eprintln!("logs of the children: {}", lab.log_dir.display());
    }
    Ok(passed)
}
