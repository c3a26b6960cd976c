//! Peers that are slow, hung or repeat themselves (issue: "never wait on a peer"): a client
//! that stops reading, killed mid-flood; Lazy Pirate retries under load; two requests with the
//! same body in flight at once; a worker stopped with SIGTERM while requests keep coming.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use broker::{BrokerStats, ClientSummary};
use bytes::Bytes;
use integration::{bins, broker, heavy, log_dir, require_pyzmq};
use lab::process::Proc;
use lab::Signal;
use tokio::time::{timeout, Instant};
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

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

/// Starts a worker and waits for it to announce itself to the broker.
async fn ready_worker(test: &str, backend: &str, extra: &[&str]) -> Proc {
    let mut w = worker(test, backend, extra);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    w
}

/// Runs our client to the end: its summary and whether it exited 0.
async fn client(test: &str, frontend: &str, args: &[&str]) -> (ClientSummary, bool) {
    let mut all: Vec<String> = ["--connect", frontend, "--json"].map(String::from).to_vec();
    all.extend(args.iter().map(|s| s.to_string()));
    let mut c = Proc::spawn(
        "client",
        &bins().path("client"),
        &all,
        &log_dir(&format!("{test}-client")),
    )
    .expect("client");
    let status = c.wait(Duration::from_secs(120)).await.expect("client ends");
    let summary: ClientSummary = c.json().expect("client summary");
    (summary, status.success())
}

/// SIGTERMs the broker (started with `--json`) and returns its final counters; it must exit 0.
async fn stop_broker(mut broker: Proc) -> BrokerStats {
    broker.signal(Signal::SIGTERM).expect("signal broker");
    let status = broker
        .wait(Duration::from_secs(20))
        .await
        .expect("broker exits on SIGTERM");
    assert!(
        status.success(),
        "broker exit: {status:?}\n{}",
        broker.log_tail()
    );
    broker.json().expect("broker's final stats")
}

/// The broker's latest counters (its `--json` lines on stdout).
fn stats_of(broker: &Proc) -> Option<BrokerStats> {
    let lines = broker.stdout();
    lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// A raw DEALER speaking the REQ envelope, for cases our client never produces.
async fn raw_client(frontend: &str) -> DealerSocket {
    let mut dealer = DealerSocket::new();
    dealer.connect(frontend).await.expect("connect");
    dealer
}

async fn send_body(dealer: &mut DealerSocket, body: &str) {
    let frames = vec![Bytes::new(), Bytes::from(body.to_string())];
    dealer
        .send(ZmqMessage::try_from(frames).expect("frames"))
        .await
        .expect("send");
}

/// The next reply's body and answering worker, within `within`.
async fn recv_reply(dealer: &mut DealerSocket, within: Duration) -> Option<(String, String)> {
    let msg = timeout(within, dealer.recv()).await.ok()?.ok()?;
    let frames = msg.into_vec();
    let text = |i: usize| String::from_utf8_lossy(&frames[i]).into_owned();
    (frames.len() == 3).then(|| (text(1), text(2)))
}

/// Case 1 and 2: a stock libzmq DEALER floods the broker and never reads, so the replies waiting
/// for it pass `--max-peer-bytes` and it is cut off; then it is SIGKILLed. Others are served throughout, and the broker stops cleanly.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_pyzmq,
    ignore = "python3 with pyzmq was not installed when built (see tests/build.rs)"
)]
async fn a_client_that_stops_reading_starves_no_one_and_cannot_freeze_the_broker() {
    require_pyzmq();
    let _g = heavy().await;
    let test = "stalled-client";
    // A long heartbeat gives the bound sockets a long TCP user timeout (4 intervals), so the
    // kernel does not cut the flooder first and the replies waiting for it pile up.
    let (broker, frontend, backend) = broker(
        test,
        &[
            "--json",
            "--max-queued",
            "500000",
            "--heartbeat-ms",
            "10000",
            // 1 MiB of replies waiting for it (35,000 or so) and it is cut off.
            "--max-peer-bytes",
            "1048576",
        ],
    )
    .await;
    let _w = ready_worker(
        test,
        &backend,
        &["--capacity", "64", "--heartbeat-ms", "10000"],
    )
    .await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/flood_dealer.py");
    let mut flooder = Proc::spawn(
        "flooder",
        std::path::Path::new("python3"),
        &[
            script.display().to_string(),
            frontend.clone(),
            "400000".into(),
            "10".into(),
        ],
        &log_dir(&format!("{test}-flooder")),
    )
    .expect("flooder");
    flooder
        .ready(Duration::from_secs(120))
        .await
        .expect("flooder sent everything");
    // Wait until the broker reports the flooder cut off: over 1 MiB waited for it to read.
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats_of(&broker).is_none_or(|s| s.stalled == 0) {
        assert!(
            Instant::now() < deadline,
            "the flooder's reply queue never filled: {:?}",
            stats_of(&broker)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (during, ok) = client(
        test,
        &frontend,
        &["--requests", "20", "--deadline-secs", "5"],
    )
    .await;
    assert!(
        ok && during.answered == 20,
        "while a client does not read: {during:?}"
    );

    flooder.kill().await.expect("SIGKILL the flooder");
    let (after, ok) = client(
        test,
        &frontend,
        &["--requests", "20", "--deadline-secs", "5"],
    )
    .await;
    assert!(ok && after.answered == 20, "after it died: {after:?}");
    assert_eq!(after.duplicates, 0);

    stop_broker(broker).await;
}

/// Case 3: 64 in flight to one slow worker. Requests wait longer than the client's timeout, so
/// it re-sends them; the broker recognises each copy and runs every request once.
#[tokio::test(flavor = "multi_thread")]
async fn retries_of_queued_requests_are_not_run_twice() {
    let _g = heavy().await;
    let test = "retries-merged";
    let (broker, frontend, backend) = broker(test, &["--json"]).await;
    let _w = ready_worker(test, &backend, &["--work-ms", "50"]).await;
    let (summary, ok) = client(
        test,
        &frontend,
        &[
            "--requests",
            "200",
            "--concurrency",
            "64",
            "--timeout-ms",
            "1000",
        ],
    )
    .await;
    assert!(ok && summary.answered == 200, "{summary:?}");
    assert!(summary.retries > 0, "the client never retried: {summary:?}");
    let stats = stop_broker(broker).await;
    // Every retry is merged, except one that crosses its reply on the wire (the broker has
    // answered and forgotten it): that one runs again. Before the merge: ~650 runs.
    let ran_again = stats.dispatched.saturating_sub(200);
    assert!(
        stats.dispatched >= 200 && ran_again <= 3,
        "each request runs once: {stats:?}"
    );
    assert_eq!(stats.merged + ran_again, summary.retries, "{stats:?}");
    assert!(summary.duplicates <= ran_again, "{summary:?}");
}

/// Case 4: two requests with the same body from one DEALER in flight at once are one request,
/// answered once, and never cost the worker a slot: afterwards 4 distinct requests to a
/// capacity-4 worker still run side by side.
#[tokio::test(flavor = "multi_thread")]
async fn identical_bodies_in_flight_are_answered_once_and_leak_no_credit() {
    let _g = heavy().await;
    let test = "identical-bodies";
    let (broker, frontend, backend) = broker(test, &["--json"]).await;
    let work = Duration::from_millis(1000);
    let _w = ready_worker(
        test,
        &backend,
        &[
            "--capacity",
            "4",
            "--work-ms",
            &work.as_millis().to_string(),
        ],
    )
    .await;
    let mut dealer = raw_client(&frontend).await;
    for pair in 0..3 {
        send_body(&mut dealer, &format!("same {pair}")).await;
        send_body(&mut dealer, &format!("same {pair}")).await;
    }
    let mut got = BTreeMap::new();
    while let Some((body, _)) = recv_reply(&mut dealer, 3 * work).await {
        *got.entry(body).or_insert(0) += 1;
    }
    let once: BTreeMap<String, i32> = (0..3).map(|p| (format!("same {p}"), 1)).collect();
    assert_eq!(got, once, "each pair answered exactly once");

    let started = Instant::now();
    for i in 0..4 {
        send_body(&mut dealer, &format!("distinct {i}")).await;
    }
    for _ in 0..4 {
        recv_reply(&mut dealer, 10 * work)
            .await
            .expect("distinct request answered");
    }
    // Side by side they take one work period; one at a time (leaked credits), four.
    let took = started.elapsed();
    assert!(
        took < 2 * work + work / 2,
        "4 requests took {took:?}: slots leaked"
    );
    let stats = stop_broker(broker).await;
    assert_eq!(stats.merged, 3, "{stats:?}");
    assert_eq!(stats.dispatched, 7, "{stats:?}");
}

/// Case 9: a worker stopped with SIGTERM says DISCONNECT: the broker sends it nothing more,
/// it answers what it holds, and no request has to be re-queued after it leaves.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_worker_is_sent_nothing_more() {
    let _g = heavy().await;
    let test = "worker-leaving";
    let (broker, frontend, backend) = broker(test, &["--json"]).await;
    let args = ["--capacity", "2", "--work-ms", "400", "--drain-ms", "5000"];
    let mut leaving =
        ready_worker(test, &backend, &[&["--id", "leaving"], &args[..]].concat()).await;
    let _staying = ready_worker(test, &backend, &[&["--id", "staying"], &args[..]].concat()).await;
    let mut dealer = raw_client(&frontend).await;
    let total = 40;
    let mut sent = 0;
    while sent < 8 {
        send_body(&mut dealer, &format!("r{sent}")).await;
        sent += 1;
    }
    let mut answered = BTreeMap::new();
    let mut signalled = false;
    while answered.len() < total {
        let (body, by) = recv_reply(&mut dealer, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("stalled after {} replies", answered.len()));
        *answered.entry(body).or_insert(0) += 1;
        // Stop it once it is busy: it holds requests and the queue is never empty.
        if by == "leaving" && !signalled {
            leaving.signal(Signal::SIGTERM).expect("SIGTERM the worker");
            signalled = true;
        }
        if sent < total {
            send_body(&mut dealer, &format!("r{sent}")).await;
            sent += 1;
        }
    }
    assert!(
        answered.values().all(|n| *n == 1),
        "answered twice: {answered:?}"
    );
    let status = leaving
        .wait(Duration::from_secs(20))
        .await
        .expect("the worker exits");
    assert!(status.success(), "{}", leaving.log_tail());
    let stats = stop_broker(broker).await;
    assert_eq!(
        stats.requeued, 0,
        "nothing was sent to the leaving worker: {stats:?}"
    );
    assert_eq!(stats.dispatched, total as u64, "{stats:?}");
}

/// Clients take turns, and a full queue makes the flooder give way: a DEALER that sends new
/// requests far faster than the worker serves them (the queue holds 1,000) does not delay
/// another client's 20 requests, which FIFO would put behind seconds of work, or refuse.
#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_client_does_not_delay_the_others() {
    let _g = heavy().await;
    let test = "fair-queue";
    let (broker, frontend, backend) = broker(test, &["--json", "--max-queued", "1000"]).await;
    let _w = ready_worker(test, &backend, &["--work-ms", "2"]).await;
    let mut dealer = raw_client(&frontend).await;
    let flooder = tokio::spawn(async move {
        // Until the test aborts it (bounded all the same).
        for i in 0..100_000_000u64 {
            send_body(&mut dealer, &format!("flood {i}")).await;
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats_of(&broker).is_none_or(|s| s.rejected < 10_000) {
        assert!(Instant::now() < deadline, "the queue never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (other, ok) = client(
        test,
        &frontend,
        &[
            "--requests",
            "20",
            "--concurrency",
            "20",
            "--deadline-secs",
            "5",
        ],
    )
    .await;
    flooder.abort();
    assert!(ok && other.answered == 20, "{other:?}");
    assert_eq!(other.retries, 0, "{other:?}");
    stop_broker(broker).await;
}

/// Found by the 30-minute soak: a worker hung (SIGSTOP) while it holds a request is purged and
/// the request goes to a second worker; when the hung one resumes, one of the two replies
/// answers the client, and the other must not reach the client again. (Which one: the late
/// reply answers if it comes on the hung worker's old connection; ours, resumed, finds the
/// broker silent and reconnects first, under a new routing id, and a reply from a peer that
/// never held the request is dropped as stray: then the spare's answers.)
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_workers_late_reply_and_the_requeued_copy_answer_the_client_once() {
    let _g = heavy().await;
    let test = "late-reply-requeued";
    // Liveness 3 x 200 ms: a worker silent for 0.6 s is purged.
    let hb = ["--heartbeat-ms", "200"];
    let (broker, frontend, backend) = broker(test, &[&hb[..], &["--json"]].concat()).await;
    let work = ["--work-ms", "3000"];
    let hung = ready_worker(
        test,
        &backend,
        &[&hb[..], &work, &["--id", "hung"]].concat(),
    )
    .await;
    let mut dealer = raw_client(&frontend).await;
    send_body(&mut dealer, "once").await;
    let counters = |what: &'static str, done: fn(&lab::broker_stats::Counters) -> bool| {
        lab::broker_stats::wait_for(&broker, Duration::from_secs(20), what, done)
    };
    counters("the request dispatched", |c| c.get("dispatched") == 1)
        .await
        .expect("the first worker holds the request");
    hung.signal(Signal::SIGSTOP).expect("SIGSTOP");
    let _spare = ready_worker(
        test,
        &backend,
        &[&hb[..], &work, &["--id", "spare"]].concat(),
    )
    .await;
    counters("purged and dispatched again", |c| {
        c.get("purged") >= 1 && c.get("dispatched") == 2
    })
    .await
    .expect("the hung worker purged, its request with the spare");
    // Its 3 s of work are over by now or soon: the late reply goes out as it resumes, about two
    // seconds before the spare's.
    hung.signal(Signal::SIGCONT).expect("SIGCONT");
    let mut replies = Vec::new();
    while let Some(reply) = recv_reply(&mut dealer, Duration::from_secs(6)).await {
        replies.push(reply);
    }
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
    assert_eq!(replies[0].0, "once");
    let stats = stop_broker(broker).await;
    assert_eq!(
        (stats.replies_out, stats.stale_replies + stats.stray_replies),
        (1, 1),
        "the other reply dropped: {stats:?}"
    );
}
