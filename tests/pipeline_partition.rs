//! A stock pipeline worker across a real partition (issue 19, case 4): the master on a test host
//! in a network namespace, a stock libzmq worker (pyzmq: PULL tasks, PUSH reports with ZMTP
//! heartbeats, SUB control) outside, the link down for 30 s. A stock PULL and SUB send nothing,
//! so they cannot learn of a cut made while they were unreachable: the master must keep those
//! connections (no user timeout on their listeners, and the writers cut only a peer that stopped
//! reading, never an unreachable one), and deal the worker tasks again on its old task
//! connection as soon as its reports come back. On zmq.rs's sockets the master cut them during
//! the partition and the stock worker did no image in the 25 s and 70 s after healing.
//!
//! Needs root (network namespaces) and pyzmq; CI has both.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integration::{bins, heavy, log_dir};
use lab::netns::TestHost;
use lab::process::Proc;

const PARTITION: Duration = Duration::from_secs(30);
/// The master's built-in sample set (no `--input`).
const IMAGES: u64 = 36;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
#[cfg_attr(
    no_netns,
    ignore = "network namespaces need root and iproute2 (see tests/build.rs)"
)]
async fn a_stock_worker_resumes_within_2_s_of_healing_a_30_s_partition() {
    assert!(
        lab::netns::available().await,
        "network namespaces need root and iproute2"
    );
    integration::require_pyzmq();
    let _g = heavy().await;
    let logs = log_dir("pipeline-stock-partition");
    std::fs::create_dir_all(&logs).expect("logs");
    let output = logs.join("out");
    std::fs::create_dir_all(&output).expect("output dir");
    let bins = bins();
    let host = TestHost::create(9).await.expect("test host");
    let any = format!("tcp://{}:0", host.ip);
    let mut cmd = host.command(&bins.path("pipeline"));
    cmd.args(["--output", &output.display().to_string()]);
    cmd.args([
        "--tasks-bind",
        &any,
        "--results-bind",
        &any,
        "--control-bind",
        &any,
    ]);
    cmd.args([
        "--filter",
        "invert",
        "--stop-workers",
        "--no-progress",
        "--json",
    ]);
    let mut master = Proc::spawn_with("master", &mut cmd, &logs).expect("master starts");
    let ready = master
        .ready(Duration::from_secs(30))
        .await
        .expect("master ready");
    let eps: Vec<String> = ready["connect"].split(',').map(String::from).collect();
    let script: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/stock_pipeline_worker.py");
    let args: Vec<String> = [
        script.display().to_string(),
        eps[0].clone(),
        eps[1].clone(),
        eps[2].clone(),
        "stock".into(),
        "100".into(),
        "120".into(),
    ]
    .to_vec();
    let mut worker =
        Proc::spawn("stock-worker", Path::new("python3"), &args, &logs).expect("python3 starts");

    tokio::time::sleep(Duration::from_secs(2)).await;
    host.set_partitioned(true).await.expect("cut");
    let cut = unix_ms();
    tokio::time::sleep(PARTITION).await;
    host.set_partitioned(false).await.expect("heal");
    let healed = unix_ms();

    let status = master
        .wait(Duration::from_secs(90))
        .await
        .expect("master ends");
    let summary: serde_json::Value = master.json().expect("master summary");
    let wstatus = worker
        .wait(Duration::from_secs(30))
        .await
        .expect("worker ends");
    assert!(wstatus.success(), "{}", worker.log_tail());
    let got: serde_json::Value = worker.json().expect("worker summary");
    let done: Vec<u64> = got["done_unix_ms"]
        .as_array()
        .expect("done times")
        .iter()
        .filter_map(|t| t.as_u64())
        .collect();
    let before = done.iter().filter(|&&t| t < cut).count();
    let first_after = done.iter().find(|&&t| t >= healed).map(|t| t - healed);
    eprintln!(
        "{before} images before the cut, first after healing +{first_after:?} ms, {} in all; master: {summary}",
        done.len()
    );
    assert!(status.success(), "master: {}", master.log_tail());
    assert_eq!(summary["done"], IMAGES, "{summary}");
    assert!(
        before >= 5,
        "the stock worker worked before the cut: {before}"
    );
    let first_after = first_after.expect("the stock worker did no image after healing");
    assert!(
        first_after <= 2000,
        "the stock worker resumed {first_after} ms after healing, not within 2 s"
    );
}
