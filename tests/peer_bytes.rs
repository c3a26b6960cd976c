//! What one peer can make the broker hold, in bytes. A client that sends requests of 200 kB and
//! never reads the replies: the broker's ROUTER holds the replies waiting for it up to
//! `--max-peer-bytes` (8 MiB for the client, 4 MiB for the worker), then cuts the client off (`guard_stalled`, and the reply
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
        broker(test, &["--max-peer-bytes", "4194304", "--json"]).await;
    let before = rss_kib(broker.pid());
    // 4 MiB, not more: the client's 64 requests in flight of 200 kB (12.8 MB) must go over it
    // beside what the kernel's buffers take (a few MiB on loopback), or the rogue, holding
    // them all, is purged for its silence instead of cut. The rogue first, so that it holds most of the credits when the requests come.
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

/// A raw DEALER on `frontend` that sends `count` messages, each `message(n)` (whole frames,
/// encoded), and drains what the broker sends back (greeting, READY, PONGs) so that it never
/// stalls. The stream stays open until the returned task is dropped or aborted: a client that
/// leaves takes its queued requests with it.
async fn raw_dealer(
    frontend: &str,
    count: usize,
    message: impl Fn(usize) -> Vec<u8> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncReadExt;
    let addr = frontend.trim_start_matches("tcp://").to_string();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut read, mut write) = stream.into_split();
    tokio::spawn(async move {
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while read.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let handshake = [zmtp::greeting(), zmtp::ready("DEALER")].concat();
        write.write_all(&handshake).await.expect("handshake");
        for n in 0..count {
            write.write_all(&message(n)).await.expect("write");
        }
        // Held open: the requests stay queued while the test measures.
        let _ = drain.await;
        drop(write);
    })
}

/// A tiny request `[""]["p<n>"]["x"]`.
fn tiny_request(n: usize) -> Vec<u8> {
    [
        zmtp::frame(0x01, b""),
        zmtp::frame(0x01, format!("p{n}").as_bytes()),
        zmtp::frame(0x00, b"x"),
    ]
    .concat()
}

/// A ZMTP PING command (TTL 0) whose context is `padding` bytes: legal, answered with a PONG
/// of 16 bytes of context at most, and never kept.
fn padded_ping(padding: usize) -> Vec<u8> {
    let mut body = vec![4u8];
    body.extend(b"PING");
    body.extend([0, 0]);
    body.resize(body.len() + padding, b'p');
    zmtp::frame(0x04, &body)
}

/// The slack allowed over the queue's byte bound for everything else the broker holds.
const RSS_MARGIN_KIB: u64 = 64 * 1024;

/// The padding trick: 2,000 tiny requests, each followed by a PING carrying 100 kB of padding,
/// with no worker to take them. Each request is a few bytes; when its frames were slices of
/// the connection's read buffer, each kept the whole buffer (grown for the PING) alive, and
/// the broker's RSS grew by 380 MiB for a queue that counted 24,890 bytes. Now the reader
/// copies what is kept out of its buffer, and the queue counts what a request holds.
#[tokio::test(flavor = "multi_thread")]
async fn padded_pings_do_not_make_tiny_queued_requests_pin_memory() {
    const REQUESTS: usize = 2_000;
    const PADDING: usize = 100_000;
    let _g = heavy().await;
    let test = "peer-bytes-padding";
    let (mut broker, frontend, _backend) =
        broker(test, &["--max-queued-bytes", "1048576", "--json"]).await;
    let before = rss_kib(broker.pid());
    let dealer = raw_dealer(&frontend, REQUESTS, |n| {
        [tiny_request(n), padded_ping(PADDING)].concat()
    })
    .await;
    let (counters, after) = all_in(&broker, REQUESTS, "every padded request in").await;
    eprintln!(
        "broker RSS {before} KiB, {after} KiB with {} requests queued ({} bytes counted): +{} MiB",
        counters.get("queued"),
        counters.get("queued_bytes"),
        after.saturating_sub(before) / 1024
    );
    assert_eq!(
        counters.get("queued") + counters.get("rejected"),
        REQUESTS as u64,
        "every request queued or refused: {counters:?}"
    );
    assert!(counters.get("queued_bytes") <= 1 << 20, "{counters:?}");
    assert!(
        after <= before + 1024 + RSS_MARGIN_KIB,
        "RSS grew from {before} KiB to {after} KiB for a 1 MiB bound"
    );
    dealer.abort();
    let stats = integration::stop_broker(&mut broker).await;
    assert_eq!(stats.get("guard_refused"), 0, "{stats:?}");
}

/// Requests of 100 kB, ten times as many as `--max-queued-bytes` holds, with no worker: the
/// queue refuses what does not fit (`rejected`), never counts more than its bound, and the
/// broker's RSS stays within the same margin over it.
#[tokio::test(flavor = "multi_thread")]
async fn big_requests_over_the_byte_bound_are_refused_and_rss_stays_bounded() {
    const REQUESTS: usize = 100;
    const BODY: usize = 100_000;
    let _g = heavy().await;
    let test = "peer-bytes-big";
    let (mut broker, frontend, _backend) =
        broker(test, &["--max-queued-bytes", "1048576", "--json"]).await;
    let before = rss_kib(broker.pid());
    let dealer = raw_dealer(&frontend, REQUESTS, |n| {
        [
            zmtp::frame(0x01, b""),
            zmtp::frame(0x01, format!("b{n}").as_bytes()),
            zmtp::frame(0x00, &vec![b'b'; BODY]),
        ]
        .concat()
    })
    .await;
    let (counters, after) = all_in(&broker, REQUESTS, "every big request in").await;
    eprintln!(
        "broker RSS {before} KiB, {after} KiB: +{} MiB; {counters:?}",
        after.saturating_sub(before) / 1024
    );
    let queued = counters.get("queued");
    assert_eq!(
        queued + counters.get("rejected"),
        REQUESTS as u64,
        "{counters:?}"
    );
    // Ten of 100 kB and what each holds besides fit in 1 MiB; not eleven.
    assert!((1..=10).contains(&queued), "{counters:?}");
    assert!(counters.get("queued_bytes") <= 1 << 20, "{counters:?}");
    assert!(
        counters.get("queued_bytes") >= queued * BODY as u64,
        "at least the bodies are counted: {counters:?}"
    );
    assert!(
        after <= before + 1024 + RSS_MARGIN_KIB,
        "RSS grew from {before} KiB to {after} KiB for a 1 MiB bound"
    );
    dealer.abort();
    let stats = integration::stop_broker(&mut broker).await;
    assert_eq!(stats.get("guard_refused"), 0, "{stats:?}");
}

/// Waits until the broker's counters show `n` requests in; its counters then and its RSS (KiB).
async fn all_in(
    broker: &lab::process::Proc,
    n: usize,
    what: &str,
) -> (lab::broker_stats::Counters, u64) {
    let counters = lab::broker_stats::wait_for(broker, Duration::from_secs(60), what, |c| {
        c.get("requests_in") == n as u64
    })
    .await
    .expect("the requests arrive");
    (counters, rss_kib(broker.pid()))
}
