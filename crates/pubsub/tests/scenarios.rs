//! The lab's pub/sub scenarios that need a partition, run from the test suite: through the
//! blackholing relay (anyone), and in network namespaces when root.

use std::path::Path;

use lab::process::Bins;
use lab::scenarios::{Lab, PartitionMode};
use lab::verdict::Verdict;

mod support;
use support::{heavy, logs, PROXY};

async fn run(name: &str, partition: PartitionMode) -> Verdict {
    let _g = heavy().await;
    let dir = Path::new(PROXY).parent().expect("binary directory");
    let lab = Lab {
        bins: Bins { dir: dir.into() },
        log_dir: logs(name),
        partition,
        outage: None,
    };
    let scenario = lab::scenarios::find(name).expect("scenario exists");
    let verdict = (scenario.run)(&lab).await.expect("scenario ran");
    eprintln!("{}", verdict.render());
    verdict
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_through_the_relay_is_recovered() {
    let v = run("pubsub-partition", PartitionMode::Relay).await;
    assert!(v.passed, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_restarted_during_a_partition_is_recovered() {
    let v = run("pubsub-partition-restart", PartitionMode::Relay).await;
    assert!(v.passed, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_in_network_namespaces_is_recovered() {
    if !root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: the namespace test must run there"
        );
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let v = run("pubsub-partition", PartitionMode::Netns).await;
    assert!(v.passed, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn late_joiner_gets_last_values_at_once() {
    let v = run("late-joiner", PartitionMode::Relay).await;
    assert!(v.passed, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_subscriber_is_cut_and_the_others_go_on() {
    let v = run("stalled-subscriber", PartitionMode::Relay).await;
    assert!(v.passed, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_of_either_side_alone_is_recovered() {
    for name in [
        "pubsub-partition-publishers",
        "pubsub-partition-subscribers",
    ] {
        let v = run(name, PartitionMode::Relay).await;
        assert!(v.passed, "{}", v.render());
    }
}

/// A proxy pair, one proxy SIGKILLed for good: nothing missed, each update delivered once.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_failover_costs_nothing() {
    let v = run("proxy-failover", PartitionMode::Relay).await;
    assert!(v.passed, "{}", v.render());
}
