//! Bad input on both proxy sockets, with default flags, on loopback. Both are the proxy's own
//! ZMTP code. The XSUB (`common::wire::xsub`) refuses the nine bytes that abort a bare zmq.rs
//! process, oversized frames, MORE floods, garbage and greetings cut short: the connection ends,
//! counted in `guard_refused` and logged with the peer's address (once a second at most). The
//! XPUB side (`pubsub::xpub`) refuses the same input itself (counted in `peer_errors`) and counts
//! and names a subscriber that sends anything but subscriptions (`bad_xpub`). A subscriber that
//! stops reading costs the others nothing and is cut off. Real updates reach a real subscriber
//! throughout.

use std::time::Duration;

use common::zmtp::{self, frame, greeting, huge_header as nine_bytes};

use pubsub::{PublisherSummary, SubscriberSummary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::*;

/// Greeting and READY of a SUB socket.
fn sub_handshake() -> Vec<u8> {
    [greeting(), zmtp::ready("SUB")].concat()
}

fn attacks() -> Vec<(&'static str, Vec<u8>)> {
    let mut all = zmtp::attacks();
    all.push(("garbage", b"GET / HTTP/1.1\r\n\r\nnot zmtp at all".to_vec()));
    all.push(("a greeting cut short", greeting()[..11].to_vec()));
    all
}

fn bad_subscriptions() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "not a subscription",
            [sub_handshake(), frame(0, b"\x05junk")].concat(),
        ),
        (
            "two frames",
            [sub_handshake(), frame(0x01, b"\x01a"), frame(0, b"b")].concat(),
        ),
        ("empty", [sub_handshake(), frame(0, b"")].concat()),
    ]
}

/// Connects, writes `bytes`, then reads until the proxy closes (bounded).
async fn send_raw(endpoint: &str, bytes: &[u8]) {
    let mut stream = TcpStream::connect(endpoint.trim_start_matches("tcp://"))
        .await
        .expect("connect");
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
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

/// Connections cut on the XPUB by the proxy's own reader, after a good handshake: a flood of
/// empty frames with MORE set, and a frame over its 64 KiB.
fn xpub_floods() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty frames with MORE after READY", {
            let mut s = sub_handshake();
            for _ in 0..5000 {
                s.extend([0x01, 0x00]);
            }
            s
        }),
        ("one frame over 64 KiB after READY", {
            let mut s = sub_handshake();
            s.push(0x02);
            s.extend(100_000u64.to_be_bytes());
            s.extend(vec![0u8; 1000]);
            s
        }),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_peers_are_cut_off_on_both_proxy_sockets_and_updates_still_flow() {
    let _g = heavy().await;
    let logs = logs("guard");
    let mut px = proxy_with_stats(&logs, &["--max-message-bytes", "65536"]).await;
    for (_, bytes) in attacks() {
        send_raw(&px.xsub, &bytes).await;
    }
    let guarded = attacks().len() as u64;
    for (_, bytes) in attacks().into_iter().chain(xpub_floods()) {
        send_raw(&px.xpub, &bytes).await;
    }
    let refused_by_xpub = (attacks().len() + xpub_floods().len()) as u64;
    for (_, bytes) in bad_subscriptions() {
        send_raw(&px.xpub, &bytes).await;
    }
    // A release that is not one: counted like the other bad subscriptions.
    send_raw(&px.xpub, &[sub_handshake(), frame(0, b"\x02junk")].concat()).await;
    let bad = bad_subscriptions().len() as u64 + 1;
    let stats = await_stats(&px.proc, READY_WITHIN, |s| {
        s.guard_refused >= guarded && s.peer_errors >= refused_by_xpub && s.bad_xpub >= bad
    })
    .await;
    assert_eq!(stats.guard_refused, guarded, "{stats:?}");
    assert_eq!(stats.bad_xpub, bad, "{stats:?}");
    assert!(stats.topics.is_empty(), "no junk forwarded: {stats:?}");

    let s = serves(&logs, &px, 50).await;
    assert_eq!((s.received, s.gaps), (50, 0));

    let last: pubsub::ProxyStats = stop(&mut px.proc).await;
    assert_eq!(last.guard_refused, guarded, "{last:?}");
    let log = px.proc.log_text();
    let named = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("peer=127.0.0.1:"))
            .count() as u64
    };
    // Both sockets' refusals are logged with the peer's address, once a second at most (a
    // peer can cause them at will); the counts above have every one.
    assert!(
        named("connection refused") >= 1,
        "the refusals logged with the peer's address"
    );
    assert_eq!(last.peer_errors, refused_by_xpub, "{last:?}");
    assert!(
        named("bad message from a subscriber") >= 1,
        "bad subscriptions named"
    );
}

/// A subscriber that subscribes and never reads again: its queue at the proxy fills, it misses
/// updates (counted), no one else waits for it, it is cut off after `--stall-timeout-ms`, and
/// the proxy's memory stays bounded meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_stops_reading_costs_the_others_nothing_and_is_cut() {
    let _g = heavy().await;
    let logs = logs("guard-stalled");
    let mut px = proxy_with_stats(&logs, &["--stall-timeout-ms", "2000"]).await;
    let before = rss_kib(px.proc.pid());
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let addr = px.xpub.trim_start_matches("tcp://").parse().expect("addr");
    let mut stalled = socket.connect(addr).await.expect("connect");
    stalled
        .write_all(&[sub_handshake(), frame(0, b"\x0110001")].concat())
        .await
        .expect("subscribe");
    // Then never read.
    let mut p = feed(&logs, "p1", &px.xsub, "10001", 50_000, &[]);
    let mut s = subscriber(&logs, "sub", &px.xpub, "10001", &["--count", "20000"]).await;
    let mut peak = before;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        peak = peak.max(rss_kib(px.proc.pid()));
        if proxy_stats(&px.proc)
            .last()
            .is_some_and(|s| s.stalled_cut >= 1)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled subscriber was never cut: {:?}",
            proxy_stats(&px.proc).last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s: SubscriberSummary = summary(&mut s).await;
    // No one waited on the stalled subscriber: the healthy one missed nothing.
    assert_eq!((s.received, s.gaps), (20_000, 0), "{s:?}");
    let _: PublisherSummary = stop(&mut p).await;
    let last: pubsub::ProxyStats = stop(&mut px.proc).await;
    assert_eq!(last.stalled_cut, 1, "{last:?}");
    assert!(
        last.slow_dropped > 0,
        "the stalled one missed updates, counted: {last:?}"
    );
    eprintln!("proxy RSS {before} KiB, peak {peak} KiB; {last:?}");
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    drop(stalled);
}

/// With default flags, nine bytes on loopback (a frame header announcing a terabyte) sent to
/// either socket end that connection only: the proxy serves on. (Its XSUB was zmq.rs's, behind
/// a guard only for endpoints not on loopback, and the nine bytes aborted the process.)
#[tokio::test(flavor = "multi_thread")]
async fn nine_bytes_on_loopback_do_not_kill_the_proxy() {
    let _g = heavy().await;
    let logs = logs("nine-bytes");
    let mut px = proxy_with_stats(&logs, &[]).await;
    send_raw(&px.xpub, &[greeting(), nine_bytes()].concat()).await;
    send_raw(&px.xsub, &[greeting(), nine_bytes()].concat()).await;
    send_raw(&px.xsub, &nine_bytes()).await;
    let stats = await_stats(&px.proc, READY_WITHIN, |s| s.guard_refused >= 2).await;
    assert_eq!(stats.guard_refused, 2, "{stats:?}");
    let s = serves(&logs, &px, 20).await;
    assert_eq!((s.received, s.gaps), (20, 0), "the proxy serves on");
    let last: pubsub::ProxyStats = stop(&mut px.proc).await;
    assert_eq!(last.guard_refused, 2, "{last:?}");
}
