//! Interoperability with libzmq peers (pyzmq): a stock REQ client through the broker (also with
//! libzmq's ZMTP heartbeats, which the broker's ROUTER must answer), and a stock RFC 6 DEALER
//! worker serving our client. Ignored outside CI when pyzmq was missing at
//! build time (see `build.rs`); under CI a missing pyzmq fails them.

use std::path::PathBuf;
use std::time::Duration;

use broker::ClientSummary;
use integration::{bins, broker, heavy, log_dir, require_pyzmq};
use lab::process::Proc;

fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("py")
        .join(name)
        .display()
        .to_string()
}

/// `req_client.py` (a stock REQ client) sending `requests` through a broker to one of our
/// workers, its extra arguments after the count; its JSON summary, once it exited 0.
async fn req_client_through_the_broker(
    test: &str,
    requests: u32,
    extra: &[&str],
) -> serde_json::Value {
    require_pyzmq();
    let _g = heavy().await;
    let (_broker, frontend, backend) = broker(test, &[]).await;
    let logs = log_dir(test);
    let args = ["--connect", &backend, "--id", "rust-worker"].map(String::from);
    let _worker = Proc::spawn("worker", &bins().path("worker"), &args, &logs).expect("worker");
    let mut args = vec![script("req_client.py"), frontend, requests.to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut client = Proc::spawn("req-client", std::path::Path::new("python3"), &args, &logs)
        .expect("python client");
    let status = client
        .wait(Duration::from_secs(60))
        .await
        .expect("client ends");
    let summary: serde_json::Value = client.json().expect("summary");
    assert_eq!(summary["answered"], requests, "{}", client.log_tail());
    assert!(status.success(), "{}", client.log_tail());
    summary
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
async fn stock_req_client_works_through_the_broker() {
    req_client_through_the_broker("interop-req", 100, &[]).await;
}

/// libzmq with `ZMQ_HEARTBEAT_IVL` 100 ms pings the broker and drops the connection when no
/// PONG comes back within 300 ms: idle for 1.5 s halfway, the client must keep its connection.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
async fn a_stock_client_with_zmtp_heartbeats_keeps_its_connection() {
    let summary = req_client_through_the_broker("interop-ping", 20, &["100"]).await;
    assert_eq!(summary["disconnects"], 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
async fn stock_rfc6_worker_serves_our_client() {
    require_pyzmq();
    let _g = heavy().await;
    let (_broker, frontend, backend) = broker("interop-worker", &[]).await;
    let logs = log_dir("interop-worker");
    let mut worker = Proc::spawn(
        "rfc6-worker",
        std::path::Path::new("python3"),
        &[script("rfc6_worker.py"), backend],
        &logs,
    )
    .expect("python worker");
    worker
        .ready(Duration::from_secs(20))
        .await
        .expect("python worker started");
    let args = [
        "--connect",
        &frontend,
        "--requests",
        "100",
        "--concurrency",
        "4",
        "--json",
    ]
    .map(String::from);
    let mut client = Proc::spawn("client", &bins().path("client"), &args, &logs).expect("client");
    let status = client
        .wait(Duration::from_secs(60))
        .await
        .expect("client ends");
    let summary: ClientSummary = client.json().expect("summary");
    assert_eq!(summary.answered, 100, "{}", client.log_tail());
    assert_eq!(summary.lost, 0);
    assert_eq!(summary.corrupt, 0);
    // A stock worker does not sign its replies.
    assert_eq!(summary.by_worker.get("unknown"), Some(&100));
    assert!(status.success());
}
