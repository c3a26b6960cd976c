//! The seed's Shared Queue experiments 1-4 and a worker crash, each run as the lab runs it:
//! real broker, worker and client processes, real kills and partitions.

use integration::{figure, scenario};
use lab::scenarios::PartitionMode;
use lab::verdict::Verdict;

fn assert_no_loss(v: &Verdict) {
    assert!(v.passed, "{}", v.render());
    assert_eq!(figure(v, "answered"), figure(v, "sent"));
    assert_eq!(figure(v, "lost"), 0);
    assert_eq!(figure(v, "duplicates"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn experiment_1_one_client_one_worker() {
    let v = scenario("one-worker", PartitionMode::Auto).await;
    assert_no_loss(&v);
    assert_eq!(figure(&v, "answered"), 200);
    assert_eq!(figure(&v, "retries"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn experiment_2_second_worker_shares_the_load() {
    let v = scenario("two-workers", PartitionMode::Auto).await;
    assert_no_loss(&v);
    // One request in flight: least recently used alternates between the two idle workers.
    assert_eq!(figure(&v, "retries"), 0);
    let by_worker = v.figures["by_worker"].as_object().expect("by_worker map");
    assert_eq!(by_worker.len(), 2, "both workers answered: {by_worker:?}");
    for n in by_worker.values() {
        let n = n.as_u64().expect("count");
        assert!(n.abs_diff(100) <= 1, "{by_worker:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn experiment_3_broker_killed_and_restarted() {
    let v = scenario("broker-restart", PartitionMode::Auto).await;
    assert_no_loss(&v);
    assert!(figure(&v, "reconnects") >= 1, "the client had to reconnect");
    assert!(figure(&v, "recovery_ms") <= 1000, "{}", v.render());
}

#[tokio::test(flavor = "multi_thread")]
async fn experiment_4_partition_through_relay() {
    let v = scenario("partition", PartitionMode::Relay).await;
    assert_eq!(v.mode, "relay");
    assert_no_loss(&v);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_netns,
    ignore = "network namespaces need root and iproute2 (see tests/build.rs)"
)]
async fn experiment_4_partition_in_network_namespaces() {
    assert!(
        lab::netns::available().await,
        "network namespaces need root and iproute2"
    );
    let v = scenario("partition", PartitionMode::Netns).await;
    assert_eq!(v.mode, "netns");
    assert_no_loss(&v);
}

/// The broker gave a lost worker's request to another: no client retry, counted as re-queued.
fn assert_broker_requeued(v: &Verdict) {
    assert_no_loss(v);
    assert_eq!(
        figure(v, "retries"),
        0,
        "the broker, not the client, re-sent the request"
    );
    assert!(figure(v, "requeued") >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_request_is_covered_by_another() {
    assert_broker_requeued(&scenario("worker-crash", PartitionMode::Auto).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_worker_is_purged_and_another_answers_within_the_liveness_window() {
    assert_broker_requeued(&scenario("worker-hang", PartitionMode::Auto).await);
}
