//! The documented rules of the broker's credits (README, docs/architecture.md), each against the
//! real broker: a `--capacity K` worker holds K requests at once, READY credits are capped per
//! worker, a heartbeat never frees a slot; and the client drops late duplicate replies.
//! Raw zmq.rs sockets play the peers whose every frame the test must control.

use std::time::Duration;

use broker::protocol::{HEARTBEAT, READY};
use broker::ClientSummary;
use bytes::Bytes;
use integration::{broker, four_requests_held, heavy, spawn_client, stop_broker};
use lab::broker_stats;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const WITHIN: Duration = Duration::from_secs(20);

fn message(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("at least one frame")
}

async fn recv(socket: &mut impl SocketRecv, within: Duration) -> Option<Vec<Bytes>> {
    tokio::time::timeout(within, socket.recv())
        .await
        .ok()
        .map(|m| m.expect("receive").into_vec())
}

/// A raw worker's next request, skipping the broker's heartbeats.
async fn next_request(worker: &mut DealerSocket, within: Duration) -> Option<Vec<Bytes>> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let frames = recv(worker, left).await?;
        if frames != [Bytes::from_static(HEARTBEAT)] {
            return Some(frames);
        }
    }
}

async fn finish_client(client: &mut lab::process::Proc) -> (ClientSummary, bool) {
    let status = client.wait(Duration::from_secs(60)).await.expect("ends");
    let summary = client.json().expect("client summary");
    (summary, status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_k_worker_holds_k_requests_at_once() {
    let _g = heavy().await;
    let (mut broker, _worker, mut c) = four_requests_held("capacity", &[]).await;
    let (summary, ok) = finish_client(&mut c).await;
    assert!(ok, "{summary:?}");
    assert_eq!((summary.answered, summary.retries), (4, 0));
    assert_eq!(summary.by_worker.get("busy"), Some(&4));
    stop_broker(&mut broker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_credits_are_capped_per_worker() {
    let _g = heavy().await;
    let (mut broker, _frontend, backend) = broker("credit-cap", &[]).await;
    let cap = broker::books::MAX_CREDITS;
    let mut flood = DealerSocket::new();
    flood.connect(&backend).await.expect("connect backend");
    for _ in 0..cap + 5 {
        flood
            .send(ZmqMessage::from(Bytes::from_static(READY)))
            .await
            .expect("send READY");
    }
    let counters = broker_stats::wait_for(&broker, WITHIN, "the READY flood counted", |c| {
        c.get("bad_backend") >= 5
    })
    .await
    .expect("the READYs beyond the cap are refused");
    assert_eq!(counters.get("idle"), cap as u64, "{counters:?}");
    let stats = stop_broker(&mut broker).await;
    assert_eq!(stats.get("bad_backend"), 5, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_never_frees_a_slot() {
    let _g = heavy().await;
    let (mut broker, frontend, backend) = broker("heartbeat-slot", &[]).await;
    let mut raw = DealerSocket::new();
    raw.connect(&backend).await.expect("connect backend");
    raw.send(ZmqMessage::from(Bytes::from_static(READY)))
        .await
        .expect("READY");
    let mut c = spawn_client(
        "heartbeat-slot",
        &frontend,
        2,
        &["--concurrency", "2", "--timeout-ms", "60000"],
    );
    let first = next_request(&mut raw, WITHIN)
        .await
        .expect("the first request");
    // Busy with it, the worker heartbeats. The second request waits at the broker: heartbeats
    // say "alive", not "free".
    for _ in 0..3 {
        raw.send(ZmqMessage::from(Bytes::from_static(HEARTBEAT)))
            .await
            .expect("heartbeat");
    }
    let early = next_request(&mut raw, Duration::from_millis(2500)).await;
    assert!(
        early.is_none(),
        "a second request came while the first was held: {early:?}"
    );
    let mut reply = first;
    reply.push(Bytes::from_static(b"raw"));
    raw.send(message(reply)).await.expect("reply");
    // The reply frees the slot: the second request comes now.
    let mut second = next_request(&mut raw, WITHIN)
        .await
        .expect("the second request after the reply");
    second.push(Bytes::from_static(b"raw"));
    raw.send(message(second)).await.expect("reply");
    let (summary, ok) = finish_client(&mut c).await;
    assert!(ok, "{summary:?}");
    assert_eq!((summary.answered, summary.retries), (2, 0));
    assert_eq!(summary.by_worker.get("raw"), Some(&2));
    let stats = stop_broker(&mut broker).await;
    assert_eq!(stats.get("dispatched"), 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_drops_late_duplicate_replies() {
    // A stand-in broker that answers every request twice, the second time late: after the
    // client has moved on to its next request, just before answering that one.
    let mut fake = RouterSocket::new();
    let endpoint = fake
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut c = spawn_client("duplicates", &endpoint, 5, &["--timeout-ms", "60000"]);
    let mut previous: Option<Vec<Bytes>> = None;
    for _ in 0..5 {
        let mut frames = recv(&mut fake, WITHIN).await.expect("a request");
        frames.push(Bytes::from_static(b"fake"));
        if let Some(late) = previous.replace(frames.clone()) {
            fake.send(message(late)).await.expect("late duplicate");
        }
        fake.send(message(frames)).await.expect("reply");
    }
    let (summary, ok) = finish_client(&mut c).await;
    assert!(ok, "{summary:?}");
    assert_eq!(
        (
            summary.answered,
            summary.duplicates,
            summary.corrupt,
            summary.retries
        ),
        (5, 4, 0, 0),
        "{summary:?}"
    );
    assert_eq!(summary.by_worker.get("fake"), Some(&5));
}
