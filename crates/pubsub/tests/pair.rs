//! A proxy pair (issue 20): publishers and our subscribers given two proxies, one of them
//! SIGKILLed for good mid-stream. Our subscribers deliver every update once and miss none; a
//! stock libzmq SUB connected to both proxies gets each update twice while both live.

use std::time::Duration;

use pubsub::{PublisherSummary, SubscriberSummary};

mod support;
use support::*;

/// Every update of `zips` from the publisher, once, none missing, across the kill of one
/// proxy; the copies through the other proxy counted `redundant`, never a duplicate or a gap.
fn assert_lossless(name: &str, s: &SubscriberSummary, p: &PublisherSummary, zips: &[&str]) {
    let sent: u64 = zips.iter().map(|z| p.by_zip[*z]).sum();
    assert_eq!(s.received, sent, "{name} received everything: {s:#?}");
    assert_eq!(
        (s.gaps, s.duplicates, s.late),
        (0, 0, 0),
        "{name}: no gap, no duplicate, nothing late: {s:#?}"
    );
    assert!(s.redundant > 0, "{name} dropped the second copies: {s:#?}");
    for st in &s.streams {
        assert_eq!(st.first, 1, "{name} from the first update of {}", st.zip);
        assert_eq!(Some(&st.last), p.by_zip.get(&st.zip), "{name} to the last");
    }
    assert_eq!(s.by_proxy.len(), 2, "{s:#?}");
}

/// The first proxy SIGKILLed a third of the way through, never restarted: both subscribers get
/// every update once; the publisher sent every update to the survivor.
#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_killed_for_good_costs_our_subscribers_nothing() {
    let _g = heavy().await;
    let logs = logs("pair-kill");
    let mut a = proxy(&logs, "proxy-a", LOOPBACK, LOOPBACK, &[]).await;
    let b = proxy(&logs, "proxy-b", LOOPBACK, LOOPBACK, &[]).await;
    let xpubs = format!("{},{}", a.xpub, b.xpub);
    let xsubs = format!("{},{}", a.xsub, b.xsub);
    let mut s1 = subscriber(&logs, "s1", &xpubs, "10001,10002", &[]).await;
    let mut s2 = subscriber(&logs, "s2", &xpubs, "10002", &[]).await;
    let mut p = feed(
        &logs,
        "p1",
        &xsubs,
        "10001,10002",
        1000,
        &["--count", "6000"],
    );
    p.ready(READY_WITHIN).await.expect("publisher ready");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    a.proc.kill().await.expect("kill proxy a");
    let killed = unix_ms();
    let p: PublisherSummary = summary(&mut p).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s1: SubscriberSummary = stop(&mut s1).await;
    let s2: SubscriberSummary = stop(&mut s2).await;
    eprintln!("publisher: {p:?}");
    for (name, s) in [("s1", &s1), ("s2", &s2)] {
        eprintln!(
            "{name}: received {} redundant {} gaps {} duplicates {} late {} longest silence {} ms, by proxy {:?}",
            s.received,
            s.redundant,
            s.gaps,
            s.duplicates,
            s.late,
            s.longest_silence_ms,
            s.by_proxy
                .iter()
                .map(|x| (x.first, x.redundant, x.reconnects))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(p.sent, 6000);
    assert_eq!(p.unsent, 0, "the survivor took every update: {p:?}");
    assert_eq!(p.unsent_by_proxy.len(), 2);
    assert!(p.unsent_by_proxy[0] > 0, "proxy a was gone: {p:?}");
    assert_eq!(p.unsent_by_proxy[1], 0, "proxy b took everything: {p:?}");
    assert_lossless("s1", &s1, &p, &["10001", "10002"]);
    assert_lossless("s2", &s2, &p, &["10002"]);
    for s in [&s1, &s2] {
        // The flow never stopped: at 1,000 updates/s over two zips, the longest silence is a
        // scheduling hiccup, not a failover.
        assert!(s.longest_silence_ms < 500, "{s:#?}");
        // After the kill only proxy b brought updates first.
        let b_first = &s.by_proxy[1].timeline;
        let after_kill = b_first
            .counts
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                b_first.start_unix_ms + (*i as u64 + 1) * b_first.bucket_ms > killed + 200
            })
            .map(|(_, n)| u64::from(*n))
            .sum::<u64>();
        assert!(after_kill > 0, "{s:#?}");
    }
}

/// One proxy given: the summary is as before (no per-proxy part, nothing redundant).
#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_is_as_before() {
    let _g = heavy().await;
    let logs = logs("pair-single");
    let px = proxy(&logs, "proxy", LOOPBACK, LOOPBACK, &[]).await;
    let got = serves(&logs, &px, 300).await;
    assert_eq!((got.received, got.gaps, got.redundant), (300, 0, 0));
    assert!(got.by_proxy.is_empty());
}

/// A stock libzmq SUB (pyzmq) connected to both proxies of a pair delivers every update twice
/// while both live (it has no way to tell the copies apart), once after one is killed.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(pyzmq_missing, ignore = "needs python3 with pyzmq (pip install pyzmq)")]
async fn a_stock_sub_of_both_proxies_gets_each_update_twice() {
    require_pyzmq();
    let _g = heavy().await;
    let logs = logs("pair-stock-sub");
    let mut a = proxy(&logs, "proxy-a", LOOPBACK, LOOPBACK, &[]).await;
    let b = proxy(&logs, "proxy-b", LOOPBACK, LOOPBACK, &[]).await;
    let xsubs = format!("{},{}", a.xsub, b.xsub);
    let mut sub = py(
        &logs,
        "stock-sub",
        "pair_sub.py",
        &["60", "10001", &a.xpub, &b.xpub],
    );
    sub.ready(READY_WITHIN).await.expect("stock sub ready");
    // Both subscriptions must be in place before the first update: a proxy's last value
    // would otherwise be a third copy of something.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut p = feed(&logs, "p1", &xsubs, "10001", 500, &["--count", "3000"]);
    p.ready(READY_WITHIN).await.expect("publisher ready");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    a.proc.kill().await.expect("kill proxy a");
    let p: PublisherSummary = summary(&mut p).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let got: serde_json::Value = stop(&mut sub).await;
    let n = |k: &str| got[k].as_u64().expect(k);
    eprintln!(
        "stock SUB of both proxies: {} received, {} distinct, {} twice, {} once, {} more",
        n("received"),
        n("distinct"),
        n("twice"),
        n("once"),
        n("more")
    );
    assert_eq!(n("distinct"), p.sent, "{got}");
    assert_eq!(n("received"), n("once") + 2 * n("twice"), "{got}");
    assert_eq!(n("more"), 0, "{got}");
    // About three of the six seconds with both proxies alive: each of those updates twice.
    assert!(n("twice") >= 1000, "{got}");
    assert!(n("once") >= 1000, "{got}");
}

/// Proxy A cut off from everyone (behind relays, both ways blackholed) for 5 s, then healed:
/// through B the subscriber misses nothing; after the healing A's links come back, and what
/// A brings is the other proxy's copies (redundant), or its last values re-sent on the new
/// connection (duplicates of what A itself brought before the cut, never shown).
#[tokio::test(flavor = "multi_thread")]
async fn one_proxy_cut_off_and_healed_costs_our_subscribers_nothing() {
    let _g = heavy().await;
    let logs = logs("pair-partition");
    let a = proxy(&logs, "proxy-a", LOOPBACK, LOOPBACK, &[]).await;
    let b = proxy(&logs, "proxy-b", LOOPBACK, LOOPBACK, &[]).await;
    let resolve = |e: &str| common::endpoint::resolve(e).expect("endpoint");
    let to_xsub = lab::relay::Relay::start(resolve(&a.xsub))
        .await
        .expect("relay");
    let to_xpub = lab::relay::Relay::start(resolve(&a.xpub))
        .await
        .expect("relay");
    let xpubs = format!("{},{}", to_xpub.endpoint(), b.xpub);
    let xsubs = format!("{},{}", to_xsub.endpoint(), b.xsub);
    let mut s1 = subscriber(&logs, "s1", &xpubs, "10001,10002", &[]).await;
    let mut p = feed(
        &logs,
        "p1",
        &xsubs,
        "10001,10002",
        500,
        &["--count", "6000"],
    );
    p.ready(READY_WITHIN).await.expect("publisher ready");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    to_xsub.set_partitioned(true);
    to_xpub.set_partitioned(true);
    tokio::time::sleep(Duration::from_millis(5000)).await;
    to_xsub.set_partitioned(false);
    to_xpub.set_partitioned(false);
    let p: PublisherSummary = summary(&mut p).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s: SubscriberSummary = stop(&mut s1).await;
    eprintln!(
        "publisher unsent {} by proxy {:?}, reconnects {}; s1: received {} redundant {} gaps {} duplicates {} late {} longest silence {} ms, by proxy {:?}",
        p.unsent,
        p.unsent_by_proxy,
        p.reconnects,
        s.received,
        s.redundant,
        s.gaps,
        s.duplicates,
        s.late,
        s.longest_silence_ms,
        s.by_proxy
            .iter()
            .map(|x| (x.first, x.redundant, x.reconnects))
            .collect::<Vec<_>>()
    );
    let sent: u64 = p.by_zip.values().sum();
    assert_eq!(s.received, sent, "{s:#?}");
    assert_eq!((s.gaps, s.late), (0, 0), "{s:#?}");
    // At most one re-sent last value per zip per reconnection to A.
    assert!(
        s.duplicates <= 2 * s.by_proxy[0].reconnects.max(1),
        "{s:#?}"
    );
    assert!(s.longest_silence_ms < 500, "{s:#?}");
    assert!(
        s.by_proxy[0].reconnects >= 1,
        "the link to A was lost: {s:#?}"
    );
    assert_eq!(s.by_proxy[1].reconnects, 0, "{s:#?}");
    assert!(
        p.reconnects >= 1,
        "the publisher's link to A was lost: {p:?}"
    );
}
