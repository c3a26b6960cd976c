//! A broker pair (issue 20, docs/pairs.md) on the real processes: the primary killed for good,
//! the primary cut off from everyone and healed, the backup killed, and the two brokers cut
//! off from each other but not from their clients.

use std::time::Duration;

use integration::{bins, figure, log_dir, scenario};
use lab::broker_stats::{self, Counters};
use lab::process::Proc;
use lab::relay::Relay;
use lab::scenarios::PartitionMode;
use lab::verdict::Verdict;

fn assert_no_loss(v: &Verdict) {
    assert!(v.passed, "{}", v.render());
    assert_eq!(figure(v, "answered"), figure(v, "sent"));
    assert_eq!(figure(v, "lost"), 0);
    assert_eq!(figure(v, "duplicates"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_killed_for_good_the_backup_serves_within_2_s() {
    let v = scenario("broker-failover", PartitionMode::Auto).await;
    assert_no_loss(&v);
    assert!(figure(&v, "recovery_ms") <= 2000, "{}", v.render());
    assert_eq!(figure(&v, "backup_activations"), 1);
    assert_eq!(figure(&v, "probe_via_backup"), 20);
}

/// The primary forwarded nothing after the cut, the backup nothing before its takeover, the
/// primary yielded on healing and never served again.
fn assert_one_server_at_a_time(v: &Verdict) {
    assert_no_loss(v);
    assert_eq!(figure(v, "primary_replies_after_cut"), 0, "{}", v.render());
    assert_eq!(figure(v, "primary_activations"), 1);
    assert_eq!(figure(v, "primary_yielded"), 1);
    assert_eq!(figure(v, "backup_activations"), 1);
    assert!(figure(v, "takeover_after_cut_ms") >= 1000);
    assert_eq!(figure(v, "probe_via_backup"), 20);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    no_netns,
    ignore = "network namespaces need root and iproute2 (see tests/build.rs)"
)]
async fn primary_partitioned_in_a_network_namespace_then_healed_one_server_at_a_time() {
    assert!(
        lab::netns::available().await,
        "network namespaces need root and iproute2"
    );
    let v = scenario("broker-failover-partition", PartitionMode::Netns).await;
    assert_eq!(v.mode, "netns");
    assert_one_server_at_a_time(&v);
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_partitioned_through_relays_then_healed_one_server_at_a_time() {
    let v = scenario("broker-failover-partition", PartitionMode::Relay).await;
    assert_eq!(v.mode, "relay");
    assert_one_server_at_a_time(&v);
}

// The other two cases of docs/pairs.md, without the lab's scenarios.

/// A pair on loopback: the backup binding the peer link, the primary connected to it (through
/// a relay when asked).
struct Pair {
    primary: Proc,
    backup: Proc,
    /// Frontends and backends: primary's, backup's.
    frontends: [String; 2],
    backends: [String; 2],
    peer_relay: Option<Relay>,
    /// The backup's peer endpoint (not the relay's), where the primary connects.
    peer: String,
    test: &'static str,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

async fn start_broker(
    test: &str,
    name: &str,
    args: &[&str],
) -> (Proc, std::collections::BTreeMap<String, String>) {
    let local = "tcp://127.0.0.1:0";
    let mut all = strings(&["--frontend", local, "--backend", local, "--stats-secs", "1"]);
    all.extend(strings(args));
    let mut proc = Proc::spawn(
        name,
        &bins().path("broker"),
        &all,
        &log_dir(&format!("{test}-{name}")),
    )
    .expect("broker starts");
    let ready = proc
        .ready(Duration::from_secs(20))
        .await
        .expect("broker ready");
    (proc, ready)
}

/// A backup binding the peer link at `peer_bind` (the primary connects to it).
async fn backup(test: &str, peer_bind: &str) -> (Proc, std::collections::BTreeMap<String, String>) {
    start_broker(
        test,
        "backup",
        &["--pair", "backup", "--peer-bind", peer_bind],
    )
    .await
}

impl Pair {
    async fn start(test: &'static str, relay_peer: bool) -> Self {
        let (backup, b) = backup(test, "tcp://127.0.0.1:0").await;
        let backup_peer = b["peer"].clone();
        let mut peer = backup_peer.clone();
        let mut peer_relay = None;
        if relay_peer {
            let relay = Relay::start(common::endpoint::resolve(&peer).expect("peer address"))
                .await
                .expect("relay")
                .labelled("peer link");
            peer = relay.endpoint();
            peer_relay = Some(relay);
        }
        let (primary, p) = start_broker(
            test,
            "primary",
            &["--pair", "primary", "--peer-connect", &peer],
        )
        .await;
        let pair = Self {
            primary,
            backup,
            frontends: [p["frontend"].clone(), b["frontend"].clone()],
            backends: [p["backend"].clone(), b["backend"].clone()],
            peer_relay,
            peer: backup_peer,
            test,
        };
        wait(&pair.primary, "primary active", |c| c.get("active") == 1).await;
        wait(&pair.backup, "backup passive", |c| {
            c.get("active") == 0 && c.get("term") >= 1
        })
        .await;
        pair
    }

    fn worker(&self, id: &str) -> Proc {
        let connect = self.backends.join(",");
        let args = strings(&["--connect", &connect, "--id", id, "--work-ms", "20"]);
        Proc::spawn(
            id,
            &bins().path("worker"),
            &args,
            &log_dir(&format!("{}-{id}", self.test)),
        )
        .expect("worker starts")
    }

    fn client(&self, requests: u64) -> Proc {
        let connect = self.frontends.join(",");
        let args = strings(&[
            "--connect",
            &connect,
            "--requests",
            &requests.to_string(),
            "--concurrency",
            "2",
            "--timeout-ms",
            "1000",
            "--json",
        ]);
        Proc::spawn(
            "client",
            &bins().path("client"),
            &args,
            &log_dir(&format!("{}-client", self.test)),
        )
        .expect("client starts")
    }
}

async fn wait(broker: &Proc, what: &str, ok: impl Fn(&Counters) -> bool) -> Counters {
    broker_stats::wait_for(broker, Duration::from_secs(20), what, ok)
        .await
        .expect(what)
}

async fn finish(client: &mut Proc) -> broker::ClientSummary {
    let status = client
        .wait(Duration::from_secs(90))
        .await
        .expect("client ends");
    let summary: broker::ClientSummary = client.json().expect("client summary");
    assert!(status.success(), "{summary:?}");
    summary
}

async fn stop(broker: &mut Proc) -> Counters {
    broker.signal(lab::Signal::SIGTERM).expect("sigterm");
    broker
        .wait(Duration::from_secs(30))
        .await
        .expect("broker exits");
    broker_stats::final_stats(broker).expect("final stats")
}

/// The backup killed mid-flow: the primary carries on and its clients notice nothing; a new
/// backup started later goes passive, and the primary stays active.
#[tokio::test(flavor = "multi_thread")]
async fn backup_killed_the_primary_carries_on_and_a_new_backup_is_passive() {
    let _guard = integration::heavy().await;
    let mut pair = Pair::start("backup-killed", false).await;
    let _w1 = pair.worker("w1");
    let _w2 = pair.worker("w2");
    wait(&pair.backup, "2 workers", |c| c.get("workers") >= 2).await;
    let mut client = pair.client(400);
    wait(&pair.primary, "20 replies", |c| c.get("replies_out") >= 20).await;
    pair.backup.kill().await.expect("backup killed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut new_backup, _) = backup(pair.test, &pair.peer).await;
    wait(&new_backup, "new backup passive", |c| {
        c.get("active") == 0 && c.get("term") >= 1
    })
    .await;
    let summary = finish(&mut client).await;
    assert_eq!(
        (summary.answered, summary.lost, summary.duplicates),
        (400, 0, 0)
    );
    assert_eq!(
        summary.reconnects, 0,
        "the client never left the primary: {summary:?}"
    );
    assert_eq!(summary.retries, 0);
    assert_eq!(summary.by_broker[&pair.frontends[0]], 400);
    let backup = stop(&mut new_backup).await;
    let primary = stop(&mut pair.primary).await;
    assert_eq!((backup.get("activations"), backup.get("active")), (0, 0));
    assert_eq!(
        (
            primary.get("activations"),
            primary.get("active"),
            primary.get("yielded")
        ),
        (1, 1, 0)
    );
}

/// The two brokers cut off from each other (their peer link), not from the clients, for
/// longer than the peer expiry, then healed: the clients stay with the primary, so the backup,
/// though its peer is silent, never serves; nothing is re-sent.
#[tokio::test(flavor = "multi_thread")]
async fn brokers_cut_off_from_each_other_but_not_from_clients_only_the_primary_serves() {
    let _guard = integration::heavy().await;
    let mut pair = Pair::start("peers-cut", true).await;
    let _w1 = pair.worker("w1");
    let _w2 = pair.worker("w2");
    wait(&pair.backup, "2 workers", |c| c.get("workers") >= 2).await;
    let mut client = pair.client(800);
    wait(&pair.primary, "20 replies", |c| c.get("replies_out") >= 20).await;
    let relay = pair.peer_relay.as_ref().expect("peer relay");
    relay.set_partitioned(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.set_partitioned(false);
    let summary = finish(&mut client).await;
    assert_eq!(
        (summary.answered, summary.lost, summary.duplicates),
        (800, 0, 0)
    );
    assert_eq!(summary.reconnects, 0, "{summary:?}");
    assert_eq!(summary.by_broker[&pair.frontends[0]], 800);
    let backup = stop(&mut pair.backup).await;
    let primary = stop(&mut pair.primary).await;
    assert_eq!(
        (
            backup.get("activations"),
            backup.get("replies_out"),
            backup.get("refused_inactive")
        ),
        (0, 0, 0)
    );
    assert_eq!((primary.get("activations"), primary.get("yielded")), (1, 0));
    // The backup did find its peer silent meanwhile.
    assert!(
        pair.backup.log_text().contains("pair: peer silent"),
        "{}",
        pair.backup.log_tail()
    );
}

/// The primary hung (SIGSTOP), its connections open: the clients' timeout moves them to the
/// backup, which takes over once the primary has been silent for the expiry; the primary,
/// resumed, hears the backup active at a higher term and yields without serving again.
#[tokio::test(flavor = "multi_thread")]
async fn primary_hung_then_resumed_the_backup_keeps_the_service() {
    let _guard = integration::heavy().await;
    let mut pair = Pair::start("primary-hung", false).await;
    let _w1 = pair.worker("w1");
    let _w2 = pair.worker("w2");
    wait(&pair.backup, "2 workers", |c| c.get("workers") >= 2).await;
    let mut client = pair.client(1000);
    wait(&pair.primary, "20 replies", |c| c.get("replies_out") >= 20).await;
    pair.primary.signal(lab::Signal::SIGSTOP).expect("sigstop");
    wait(&pair.backup, "backup active", |c| c.get("active") == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair.primary.signal(lab::Signal::SIGCONT).expect("sigcont");
    let yielded = wait(&pair.primary, "primary yielded", |c| c.get("yielded") == 1).await;
    let summary = finish(&mut client).await;
    assert_eq!(
        (summary.answered, summary.lost, summary.duplicates),
        (1000, 0, 0)
    );
    let backup = stop(&mut pair.backup).await;
    let primary = stop(&mut pair.primary).await;
    assert_eq!((backup.get("activations"), backup.get("active")), (1, 1));
    assert_eq!((primary.get("activations"), primary.get("active")), (1, 0));
    // Nothing forwarded by the primary after it yielded.
    assert_eq!(primary.get("replies_out"), yielded.get("replies_out"));
}
