//! Test support: build and locate the binaries, start a broker, workers and clients on free
//! ports, and serialise the heavy scenario tests so that their timing figures are not distorted
//! by each other on 2 cores.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use broker::ClientSummary;

use lab::process::{Bins, Proc};
use lab::scenarios::{Lab, PartitionMode};
use lab::verdict::Verdict;
use tokio::sync::{Mutex, MutexGuard};

/// The role binaries next to the test executable, built first: `cargo test --workspace` builds
/// them, but `cargo test -p integration` alone would leave them stale (once per test binary).
pub fn bins() -> Bins {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| lab::process::build_roles().map_err(|e| format!("{e:#}")))
        .as_ref()
        .expect("role binaries build");
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

/// A broker on free loopback ports logging its counters every second, with extra flags.
pub async fn broker(test: &str, extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec![
        "--frontend".to_string(),
        "tcp://127.0.0.1:0".into(),
        "--backend".into(),
        "tcp://127.0.0.1:0".into(),
        "--stats-secs".into(),
        "1".into(),
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

/// Stops a broker with SIGTERM, checks it exits 0, and returns its final counters.
pub async fn stop_broker(broker: &mut Proc) -> lab::broker_stats::Counters {
    broker.signal(lab::Signal::SIGTERM).expect("sigterm broker");
    let status = broker
        .wait(Duration::from_secs(30))
        .await
        .expect("broker exits");
    assert!(status.success(), "{}", broker.log_tail());
    lab::broker_stats::final_stats(broker).expect("final stats")
}

/// Starts role `role` (`client`, `worker`) with `args` then `extra`; its log under `<test>-<role>`.
fn spawn_role(role: &str, test: &str, args: &[&str], extra: &[&str]) -> Proc {
    let args: Vec<String> = args.iter().chain(extra).map(|s| s.to_string()).collect();
    let logs = log_dir(&format!("{test}-{role}"));
    Proc::spawn(role, &bins().path(role), &args, &logs).expect(role)
}

/// A client sending `requests` to `frontend` (`--json`), with extra flags.
pub fn spawn_client(test: &str, frontend: &str, requests: u64, extra: &[&str]) -> Proc {
    let requests = requests.to_string();
    let args = ["--connect", frontend, "--requests", &requests, "--json"];
    spawn_role("client", test, &args, extra)
}

/// Runs a client to the end: its summary and whether it exited 0.
pub async fn client(
    test: &str,
    frontend: &str,
    requests: u64,
    extra: &[&str],
) -> (ClientSummary, bool) {
    let mut c = spawn_client(test, frontend, requests, extra);
    let status = c.wait(Duration::from_secs(90)).await.expect("client ends");
    (c.json().expect("client summary"), status.success())
}

/// A worker connected to `backend`, with extra flags (not waited for: see [`Proc::ready`]).
pub fn worker(test: &str, backend: &str, extra: &[&str]) -> Proc {
    spawn_role("worker", test, &["--connect", backend], extra)
}

/// A broker (with `broker_extra` flags) whose one worker, named `busy`, holds four requests of a
/// client at once: `--capacity 4`, 3 s of work each, and the broker's counters show four
/// dispatched and none answered (a count, not a timing). Returns broker, worker and client.
pub async fn four_requests_held(test: &str, broker_extra: &[&str]) -> (Proc, Proc, Proc) {
    let (broker, frontend, backend) = broker(test, broker_extra).await;
    let mut w = worker(
        test,
        &backend,
        &["--capacity", "4", "--work-ms", "3000", "--id", "busy"],
    );
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker announced");
    let c = spawn_client(
        test,
        &frontend,
        4,
        &["--concurrency", "4", "--timeout-ms", "60000"],
    );
    lab::broker_stats::wait_for(
        &broker,
        Duration::from_secs(20),
        "four dispatched, none answered",
        |c| c.get("dispatched") == 4 && c.get("replies_out") == 0,
    )
    .await
    .expect("the worker holds four requests at once");
    (broker, w, c)
}

/// Fails, rather than skips, when pyzmq is missing: a test that runs must run for real (the
/// build-time ignore is in `build.rs`).
pub fn require_pyzmq() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import zmq"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with pyzmq is not installed (pip install pyzmq, then touch tests/build.rs)"
    );
}

/// A broker with a 64 KiB message limit (enforced by its own ROUTERs on both sockets, loopback
/// too: there is no switch), `--json` counters, and one ready worker of capacity `capacity`:
/// broker, worker, frontend, backend.
pub async fn limited_broker(test: &str, capacity: u32) -> (Proc, Proc, String, String) {
    let flags = ["--max-message-bytes", "65536", "--json"];
    let (broker, frontend, backend) = broker(test, &flags).await;
    let mut w = worker(test, &backend, &["--capacity", &capacity.to_string()]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    (broker, w, frontend, backend)
}
