//! Test support: locate the binaries, start a broker on free ports, and serialise the heavy
//! scenario tests so that their timing figures are not distorted by each other on 2 cores.

use std::path::PathBuf;
use std::time::Duration;

use lab::process::{Bins, Proc};
use lab::scenarios::{Lab, PartitionMode};
use lab::verdict::Verdict;
use tokio::sync::{Mutex, MutexGuard};

/// The role binaries next to the test executable (`cargo test` builds them first).
pub fn bins() -> Bins {
    let bins = Bins::locate().expect("binaries located");
    bins.check(&["broker", "worker", "client"])
        .expect("role binaries built");
    bins
}

/// A lab whose logs go to a fresh directory under the target dir.
pub fn lab(test: &str, partition: PartitionMode) -> Lab {
    Lab {
        bins: bins(),
        log_dir: log_dir(test),
        partition,
        outage: None,
    }
}

pub fn log_dir(test: &str) -> PathBuf {
    let dir = bins().dir.join("test-logs").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

static HEAVY: Mutex<()> = Mutex::const_new(());

/// Held by tests that run many processes at once.
pub async fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// Runs one lab scenario (serialised with the other heavy tests) and prints its verdict.
pub async fn scenario(name: &str, partition: PartitionMode) -> Verdict {
    let _guard = heavy().await;
    let lab = lab(name, partition);
    let scenario = lab::scenarios::find(name).expect("scenario exists");
    let verdict = (scenario.run)(&lab).await.expect("scenario ran");
    eprintln!("{}", verdict.render());
    verdict
}

/// A numeric figure of a verdict.
pub fn figure(v: &Verdict, name: &str) -> u64 {
    v.figures
        .get(name)
        .and_then(|f| f.as_u64())
        .unwrap_or_else(|| panic!("figure {name} missing"))
}

/// A broker on free loopback ports, with extra flags.
pub async fn broker(test: &str, extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec![
        "--frontend".to_string(),
        "tcp://127.0.0.1:0".into(),
        "--backend".into(),
        "tcp://127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut broker = Proc::spawn("broker", &bins().path("broker"), &args, &log_dir(test))
        .expect("broker starts");
    let ready = broker
        .ready(Duration::from_secs(20))
        .await
        .expect("broker ready");
    (broker, ready["frontend"].clone(), ready["backend"].clone())
}

/// True when CI runs us: there, optional tools must be present rather than skipped.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}
