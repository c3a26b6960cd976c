//! What must not take the broker down or make it grow: malformed frames on both sockets,
//! garbage bytes from raw TCP, a flood with no workers; and clean exits on SIGTERM, with the
//! replies in flight delivered. Waits are on the broker's counters (its stats lines, every
//! second), never on the clock.

use std::io::Write;
use std::time::Duration;

use broker::ClientSummary;
use bytes::Bytes;
use integration::{broker, client, four_requests_held, heavy, spawn_client, stop_broker, worker};
use lab::broker_stats;
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

const WITHIN: Duration = Duration::from_secs(20);

/// A field of `/proc/PID/status` in KiB: `VmRSS` (now) or `VmHWM` (the peak so far).
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
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
        msg(&[&[0x02]]),                        // heartbeat before READY (taken as READY)
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
    // Every bad message arrived and was counted (the raw TCP peers never got past the greeting).
    broker_stats::wait_for(&broker, WITHIN, "the bad messages counted", |c| {
        c.get("bad_frontend") >= 4 && c.get("bad_backend") >= 5
    })
    .await
    .expect("bad input reached the broker");
    drop(bad_client);
    drop(bad_worker);

    // The broker still serves.
    let _worker = worker("bad-input", &backend, &["--id", "good"]);
    let (summary, ok) = client("bad-input", &frontend, 50, &[]).await;
    assert!(ok, "client failed: {summary:?}\n{}", broker.log_tail());
    assert_eq!((summary.answered, summary.retries), (50, 0), "{summary:?}");
    assert_eq!(summary.by_worker.get("good"), Some(&50));

    let stats = stop_broker(&mut broker).await;
    // 4 malformed requests; 5 malformed worker messages (the reply for a client that does not
    // exist is well formed, and dropped otherwise; the heartbeat before READY is well formed and
    // registers the peer with one credit, and the peer is purged when it goes).
    assert_eq!(
        (stats.get("bad_frontend"), stats.get("bad_backend")),
        (4, 5),
        "{stats:?}"
    );
    assert_eq!(stats.get("replies_out"), 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn flood_without_workers_keeps_memory_bounded() {
    let _g = heavy().await;
    let (mut broker, frontend, backend) = broker("flood", &["--max-queued", "100"]).await;
    let before = status_kib(broker.pid(), "VmRSS");
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
    // The peak, not the resident size after the client left (its queued requests are dropped
    // then). 20 MB were sent; a broker queueing them all peaks at least that much higher.
    let peak = status_kib(broker.pid(), "VmHWM");
    eprintln!("broker: {before} KiB resident before the flood, peak {peak} KiB");
    assert!(
        peak < before + 10_000,
        "broker peaked at {peak} KiB during the flood, from {before} KiB"
    );

    // Once workers come, the broker serves new clients at once.
    let _worker = worker("flood", &backend, &[]);
    let (summary, ok) = client("flood-after", &frontend, 20, &[]).await;
    assert!(ok, "{summary:?}");
    assert_eq!((summary.answered, summary.retries), (20, 0), "{summary:?}");
    let stats = stop_broker(&mut broker).await;
    assert!(stats.get("rejected") >= 19_000, "{stats:?}");
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
    // The request reached the worker (dispatched, unanswered: 4 s of work); SIGTERM then lets
    // the worker finish and answer before exiting.
    broker_stats::wait_for(&broker, WITHIN, "the request dispatched", |c| {
        c.get("dispatched") == 1 && c.get("replies_out") == 0
    })
    .await
    .expect("request with the worker");
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
    let stats = stop_broker(&mut broker).await;
    assert_eq!((stats.get("dispatched"), stats.get("requeued")), (1, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_sigterm_forwards_the_replies_in_flight() {
    let _g = heavy().await;
    // SIGTERM finds four replies in flight.
    let (mut broker, _worker, mut c) =
        four_requests_held("broker-drain", &["--drain-ms", "20000"]).await;
    let stats = stop_broker(&mut broker).await;
    assert_eq!(stats.get("replies_out"), 4, "{stats:?}");
    let status = c.wait(Duration::from_secs(30)).await.expect("client ends");
    let summary: ClientSummary = c.json().expect("summary");
    assert!(status.success(), "{summary:?}\n{}", c.log_tail());
    assert_eq!((summary.answered, summary.retries), (4, 0));
    assert_eq!(summary.by_worker.get("busy"), Some(&4));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_interrupted_reports_and_exits_promptly() {
    let (broker, frontend, _backend) = broker("client-int", &[]).await;
    let mut c = spawn_client("client-int", &frontend, 10, &["--concurrency", "10"]);
    // Its requests are queued (no worker): the client runs, its signal handlers installed.
    broker_stats::wait_for(&broker, WITHIN, "the client's requests", |c| {
        c.get("requests_in") >= 10
    })
    .await
    .expect("client started");
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
