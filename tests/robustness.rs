//! What must not take the broker down or make it grow: malformed frames on both sockets,
//! garbage bytes from raw TCP, a flood with no workers; and clean exits on SIGTERM.

use std::io::Write;
use std::time::Duration;

use broker::ClientSummary;
use bytes::Bytes;
use integration::{bins, broker, heavy, log_dir};
use lab::process::Proc;
use lab::Signal;
use zeromq::{DealerSocket, Socket, SocketSend, ZmqMessage};

fn msg(frames: &[&'static [u8]]) -> ZmqMessage {
    ZmqMessage::try_from(
        frames
            .iter()
            .map(|f| Bytes::from_static(f))
            .collect::<Vec<_>>(),
    )
    .expect("frames")
}

fn spawn_client(test: &str, frontend: &str, requests: u64, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "--connect",
        frontend,
        "--requests",
        &requests.to_string(),
        "--json",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        "client",
        &bins().path("client"),
        &args,
        &log_dir(&format!("{test}-client")),
    )
    .expect("client")
}

/// Runs a client to the end: its summary and whether it exited 0.
async fn client(
    test: &str,
    frontend: &str,
    requests: u64,
    extra: &[&str],
) -> (ClientSummary, bool) {
    let mut c = spawn_client(test, frontend, requests, extra);
    let status = c.wait(Duration::from_secs(90)).await.expect("client ends");
    (c.json().expect("client summary"), status.success())
}

fn worker(test: &str, backend: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = ["--connect", backend].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        "worker",
        &bins().path("worker"),
        &args,
        &log_dir(&format!("{test}-worker")),
    )
    .expect("worker")
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_never_takes_the_broker_down() {
    let _g = heavy().await;
    let (mut broker, frontend, backend) = broker("bad-input", &[]).await;

    let mut bad_client = DealerSocket::new();
    bad_client
        .connect(&frontend)
        .await
        .expect("connect frontend");
    for m in [
        msg(&[b"no delimiter"]),
        msg(&[b""]),
        msg(&[b"x", b"y", b"z"]),
        msg(&[&[0xff; 64]]),
    ] {
        bad_client.send(m).await.expect("send");
    }
    let mut bad_worker = DealerSocket::new();
    bad_worker.connect(&backend).await.expect("connect backend");
    for m in [
        msg(&[&[0x07]]),                        // unknown command
        msg(&[b""]),                            // empty frame
        msg(&[b"hello"]),                       // one frame, not a command
        msg(&[b"client", b"no-delimiter"]),     // reply without delimiter
        msg(&[b"client", b""]),                 // reply without body
        msg(&[b"nobody", b"", b"1", b"stray"]), // reply for a client that does not exist
        msg(&[&[0x02]]),                        // heartbeat before READY
    ] {
        bad_worker.send(m).await.expect("send");
    }
    // Raw TCP peers: garbage instead of a ZMTP greeting, a truncated greeting, an instant close.
    for endpoint in [&frontend, &backend] {
        let addr = common::endpoint::resolve(endpoint).expect("addr");
        let mut garbage = std::net::TcpStream::connect(addr).expect("tcp");
        let _ = garbage.write_all(&[0x5a; 4096]);
        let mut truncated = std::net::TcpStream::connect(addr).expect("tcp");
        let _ = truncated.write_all(&[0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3]);
        drop(std::net::TcpStream::connect(addr).expect("tcp"));
        drop(garbage);
        drop(truncated);
    }
    drop(bad_client);
    drop(bad_worker);

    // The broker still serves.
    let _worker = worker("bad-input", &backend, &["--id", "good"]);
    let (summary, ok) = client("bad-input", &frontend, 50, &[]).await;
    assert!(ok, "client failed: {summary:?}\n{}", broker.log_tail());
    assert_eq!(summary.answered, 50);
    assert_eq!(summary.by_worker.get("good"), Some(&50));

    broker.signal(Signal::SIGTERM).expect("sigterm");
    let status = broker
        .wait(Duration::from_secs(15))
        .await
        .expect("broker exits");
    assert!(status.success(), "{}", broker.log_tail());
}

#[tokio::test(flavor = "multi_thread")]
async fn flood_without_workers_keeps_memory_bounded() {
    let _g = heavy().await;
    let (broker, frontend, backend) = broker("flood", &["--max-queued", "100"]).await;
    let before = rss_kib(broker.pid());
    // 20,000 requests of 1 KiB at once, nobody to serve them; the client gives up after 3 s.
    let (summary, ok) = client(
        "flood",
        &frontend,
        20_000,
        &[
            "--concurrency",
            "20000",
            "--size",
            "1024",
            "--deadline-secs",
            "3",
        ],
    )
    .await;
    assert!(
        !ok,
        "a client whose requests were not answered exits non-zero"
    );
    assert_eq!(summary.answered, 0);
    assert_eq!(summary.lost, 20_000);
    let after = rss_kib(broker.pid());
    // 20 MB were sent; a broker keeping them all would grow by at least that much.
    assert!(
        after < before + 15_000,
        "broker grew from {before} KiB to {after} KiB"
    );

    // Once workers come, the broker serves new clients at once.
    let _worker = worker("flood", &backend, &[]);
    let (summary, ok) = client("flood-after", &frontend, 20, &[]).await;
    assert!(ok, "{summary:?}");
    assert_eq!(summary.answered, 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_and_exits_zero() {
    let _g = heavy().await;
    let (mut broker, frontend, backend) = broker("sigterm", &[]).await;
    let mut w = worker(
        "sigterm",
        &backend,
        &["--work-ms", "4000", "--drain-ms", "20000", "--id", "slow"],
    );
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker announced to the broker");
    let mut c = spawn_client("sigterm", &frontend, 1, &["--timeout-ms", "60000"]);
    // The only worker is idle: the request reaches it as soon as the client is connected, well
    // within the 4 s of work. SIGTERM then lets the worker finish and answer before exiting.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.signal(Signal::SIGTERM).expect("sigterm worker");
    let status = c.wait(Duration::from_secs(60)).await.expect("client ends");
    let summary: ClientSummary = c.json().expect("summary");
    assert!(status.success(), "{}\n{}", c.log_tail(), w.log_tail());
    assert_eq!((summary.answered, summary.retries), (1, 0));
    assert_eq!(summary.by_worker.get("slow"), Some(&1));
    assert!(w
        .wait(Duration::from_secs(10))
        .await
        .expect("worker exits")
        .success());

    broker.signal(Signal::SIGTERM).expect("sigterm broker");
    assert!(broker
        .wait(Duration::from_secs(10))
        .await
        .expect("broker exits")
        .success());
}

#[tokio::test(flavor = "multi_thread")]
async fn client_interrupted_reports_and_exits_promptly() {
    let (_broker, frontend, _backend) = broker("client-int", &[]).await;
    let mut c = spawn_client("client-int", &frontend, 10, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.signal(Signal::SIGINT).expect("sigint");
    let status = c
        .wait(Duration::from_secs(10))
        .await
        .expect("client exits on Ctrl-C");
    let summary: ClientSummary = c.json().expect("summary printed");
    assert_eq!(summary.answered, 0);
    assert_eq!(summary.lost, 10);
    assert_eq!(status.code(), Some(1), "unanswered requests mean failure");
}
