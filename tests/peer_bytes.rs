//! What one peer can make the broker hold, in bytes. A client that sends requests of 200 kB and
//! never reads the replies: the broker's ROUTER holds the replies waiting for it up to
//! `--max-peer-bytes` (8 MiB here), then cuts the client off (`guard_stalled`, and the reply
//! refused counts as `stalled`); the broker's memory stays within a stated figure and it goes
//! on serving everyone else. The same for a worker that never reads its requests: cut off,
//! purged, its requests given to another. (zmq.rs's ROUTER, which the broker used before, held
//! up to 100,000 messages per peer whatever their size: every reply, +115 MiB here.)

use std::time::Duration;

use broker::BrokerStats;
use common::zmtp;
use integration::{broker, client, heavy, worker};
use lab::Signal;
use tokio::io::AsyncWriteExt;

const REQUESTS: usize = 400;
const BODY: usize = 200_000;

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A DEALER's greeting and READY, then `REQUESTS` requests `[""]["r<n>"][200 kB]`.
fn requests() -> Vec<Vec<u8>> {
    let handshake = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
    let mut all = vec![handshake];
    for n in 0..REQUESTS {
        let id = format!("r{n}");
        let mut r = vec![0x01, 0x00, 0x01, id.len() as u8];
        r.extend(id.as_bytes());
        r.push(0x02);
        r.extend((BODY as u64).to_be_bytes());
        r.extend(std::iter::repeat_n(b'x', BODY));
        all.push(r);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_cut_at_max_peer_bytes_and_the_broker_stays_small() {
    let _g = heavy().await;
    let test = "peer-bytes";
    let (mut broker, frontend, backend) = broker(
        test,
        &[
            "--max-peer-bytes",
            "8388608",
            "--max-queued-bytes",
            "4194304",
            "--json",
        ],
    )
    .await;
    let mut w = worker(test, &backend, &["--capacity", "16"]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    let warm = client(test, &frontend, 100, &["--concurrency", "8"])
        .await
        .0;
    assert_eq!(warm.answered, 100, "{warm:?}");
    let before = rss_kib(broker.pid());

    // The client that never reads: a small receive buffer, a request every 5 ms (about what
    // the worker answers, so that the broker's own request queue does not refuse them), nothing
    // ever read.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let addr = frontend.trim_start_matches("tcp://").parse().expect("addr");
    let mut stream = socket.connect(addr).await.expect("connect");
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        for r in requests() {
            if stream.write_all(&r).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The handshake is not a request.
        (sent.saturating_sub(1), stream)
    });
    let mut peak = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline && !writer.is_finished() {
        peak = peak.max(rss_kib(broker.pid()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then a while longer: replies may still be on their way to the client's outbox.
    for _ in 0..50 {
        peak = peak.max(rss_kib(broker.pid()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_client = client(test, &frontend, 100, &["--concurrency", "8"])
        .await
        .0;
    assert_eq!(after_client.answered, 100, "{after_client:?}");
    broker.signal(Signal::SIGTERM).expect("signal");
    let status = broker.wait(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success(), "{}", broker.log_tail());
    let stats: BrokerStats = broker.json().expect("final stats");
    let sent = if writer.is_finished() {
        writer.await.map(|(sent, _)| sent).unwrap_or_default()
    } else {
        writer.abort();
        0
    };
    eprintln!(
        "{sent} of {REQUESTS} requests of {BODY} B written; broker RSS {before} KiB, peak {peak} KiB (+{} MiB); {stats:?}",
        (peak - before) / 1024
    );
    assert_eq!(stats.guard_stalled, 1, "the client cut off: {stats:?}");
    assert_eq!(stats.stalled, 1, "the reply that found it full: {stats:?}");
    // 8 MiB held for the client (twice that at most: its outbox and the write in progress),
    // 4 MiB of queued requests at most, buffers in flight. Measured (debug build): +8 MiB.
    assert!(
        peak < before + 24 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

/// A worker that announces room for 200 requests and never reads them: the requests waiting for
/// it are held up to `--max-peer-bytes`, then it is cut off; the broker
/// purges it and gives its requests to the real worker, and the client loses none.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_never_reads_is_cut_at_max_peer_bytes_and_its_requests_go_elsewhere() {
    let _g = heavy().await;
    let test = "peer-bytes-worker";
    let (mut broker, frontend, backend) =
        broker(test, &["--max-peer-bytes", "8388608", "--json"]).await;
    let before = rss_kib(broker.pid());
    // The rogue first, so that it holds most of the credits when the requests come.
    let mut rogue_bytes = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
    for _ in 0..200 {
        rogue_bytes.extend([0x00, 0x01, 0x01]); // RFC 6 READY: one credit each
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let addr = backend.trim_start_matches("tcp://").parse().expect("addr");
    let mut rogue = socket.connect(addr).await.expect("connect");
    rogue.write_all(&rogue_bytes).await.expect("ready");
    // The broker's stats line (every second) counts the rogue as a worker once it is READY.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !broker.log_text().contains("workers=1") {
        assert!(tokio::time::Instant::now() < until, "{}", broker.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut w = worker(test, &backend, &["--capacity", "4"]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    let mut peak = before;
    let mut c = integration::spawn_client(
        test,
        &frontend,
        200,
        &[
            "--concurrency",
            "64",
            "--size",
            "200000",
            "--timeout-ms",
            "30000",
        ],
    );
    let status = loop {
        peak = peak.max(rss_kib(broker.pid()));
        if let Ok(status) = c.wait(Duration::from_millis(20)).await {
            break status;
        }
    };
    let summary: broker::ClientSummary = c.json().expect("client summary");
    assert!(status.success(), "{summary:?}");
    assert_eq!((summary.answered, summary.lost), (200, 0), "{summary:?}");
    broker.signal(Signal::SIGTERM).expect("signal");
    let status = broker.wait(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success(), "{}", broker.log_tail());
    let stats: BrokerStats = broker.json().expect("final stats");
    eprintln!(
        "broker RSS {before} KiB, peak {peak} KiB (+{} MiB); {stats:?}",
        (peak - before) / 1024
    );
    assert_eq!(stats.guard_stalled, 1, "the rogue cut off: {stats:?}");
    assert!(stats.purged >= 1 && stats.requeued >= 1, "{stats:?}");
    assert!(
        peak < before + 40 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    drop(rogue);
}
