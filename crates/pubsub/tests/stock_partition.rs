//! A stock SUB across a real partition (issue 18, case 1; seed experiment Proxy 5 with a libzmq
//! peer): the proxy and a publisher on a test host in a network namespace, a stock libzmq SUB
//! (pyzmq) outside, the link down for 6 s. A stock SUB sends nothing and has no heartbeat, so it
//! cannot learn of a cut made while it was unreachable: the proxy must keep its connection, and
//! the kernel delivers again when the link heals.
//!
//! Needs root (network namespaces) and pyzmq; CI has both.

use std::time::Duration;

use lab::netns::TestHost;
use lab::process::Proc;
use pubsub::ProxyStats;

mod support;
use support::*;

const PARTITION: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(pyzmq_missing, ignore = "needs python3 with pyzmq (pip install pyzmq)")]
async fn a_stock_sub_is_fed_again_within_2_s_of_healing_a_6_s_partition() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: the namespace test must run there"
        );
        eprintln!("skipped: network namespaces need root");
        return;
    }
    require_pyzmq();
    let _g = heavy().await;
    let logs = logs("stock-partition");
    let host = TestHost::create(7).await.expect("test host");
    // Publishers reach the XSUB on the test host's own loopback, which the partition leaves
    // alone; the stock SUB outside reaches the XPUB over the link.
    let xpub = format!("tcp://{}:0", host.ip);
    let mut cmd = host.command(std::path::Path::new(PROXY));
    cmd.args([
        "--xsub",
        "tcp://127.0.0.1:0",
        "--xpub",
        &xpub,
        "--json",
        "--stats-secs",
        "1",
    ]);
    let mut px = Proc::spawn_with("proxy", &mut cmd, &logs).expect("proxy starts");
    let ready = px.ready(READY_WITHIN).await.expect("proxy ready");
    let mut cmd = host.command(std::path::Path::new(PUBLISHER));
    cmd.args([
        "--connect",
        &ready["xsub"],
        "--id",
        "p1",
        "--zips",
        "10001",
        "--rate",
        "200",
        "--json",
    ]);
    let mut p = Proc::spawn_with("p1", &mut cmd, &logs).expect("publisher starts");
    let mut sub = py(
        &logs,
        "stock-sub",
        "stock_subs.py",
        &[&ready["xpub"], "20", "10001"],
    );
    await_topic(&px, "10001", 1).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    host.set_partitioned(true).await.expect("cut");
    let cut = unix_ms();
    tokio::time::sleep(PARTITION).await;
    host.set_partitioned(false).await.expect("heal");
    let healed = unix_ms();

    let status = sub.wait(EXIT_WITHIN).await.expect("stock SUB ends");
    assert!(status.success(), "{}", sub.log_tail());
    let got: StockSubs = sub.json().expect("stock SUB summary");
    let before = got.between("10001", cut - 2000, cut);
    let after = got.between("10001", healed, healed + 2000);
    let last: ProxyStats = stop(&mut px).await;
    let _: pubsub::PublisherSummary = stop(&mut p).await;
    eprintln!("before the cut {before}, in the 2 s after healing {after}; {last:?}");
    assert!(before >= 100, "fed before the cut: {before} in 2 s");
    assert!(
        after >= 100,
        "the stock SUB was not fed again within 2 s of healing: {after} updates (proxy: {last:?})"
    );
    // (`unreachable` counts only a write that waited the stall timeout: at this rate the
    // kernel's buffers hold the whole partition.)
    assert_eq!(last.stalled_cut, 0, "an unreachable SUB was cut: {last:?}");
}
