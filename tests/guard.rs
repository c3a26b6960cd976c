//! Bad input at the sockets: the nine bytes that abort a bare zmq.rs process, oversized
//! messages and empty-frame floods. The broker's ROUTERs are its own and check the limits
//! themselves, always, loopback too: every attack is cut off and counted, and everything else
//! passes. Every other bound socket is our own too and refuses the same input: the proxy's
//! (`crates/pubsub/tests/guard.rs`) and the pipeline master's (`crates/pipeline/tests/sockets.rs`,
//! where the nine bytes used to abort a master on zmq.rs's sockets with its default flags).

use std::time::Duration;

use broker::BrokerStats;
use common::zmtp::send_raw;
use integration::{broker, client, heavy, limited_broker, worker};
use lab::Signal;

/// The nine bytes after a greeting, and without one.
fn nine_bytes() -> [Vec<u8>; 2] {
    let huge = common::zmtp::huge_header();
    [[common::zmtp::greeting(), huge.clone()].concat(), huge]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_cuts_off_oversized_input_and_passes_the_rest() {
    let _g = heavy().await;
    let test = "guard";
    let (mut broker, _worker, frontend, backend) = limited_broker(test, 4).await;

    let mut attacks = common::zmtp::attacks();
    for endpoint in [&frontend, &backend] {
        for (what, bytes) in &mut attacks {
            assert!(send_raw(endpoint, bytes), "{what}: cannot reach {endpoint}");
        }
    }
    let (summary, _) = client(test, &frontend, 200, &["--concurrency", "8"]).await;
    assert_eq!(summary.answered, 200, "{summary:?}");
    assert_eq!(summary.lost, 0);

    broker.signal(Signal::SIGTERM).expect("signal");
    let status = broker.wait(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success(), "{}", broker.log_tail());
    let stats: BrokerStats = broker.json().expect("final stats");
    assert_eq!(stats.guard_refused, 8, "every attack cut off: {stats:?}");
}

/// The broker's promise with its default flags, on loopback: the nine bytes at either socket
/// are cut off and counted, and it goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn nine_bytes_on_loopback_leave_the_broker_serving() {
    let _g = heavy().await;
    let test = "nine-bytes-broker";
    let (mut broker, frontend, backend) = broker(test, &["--json"]).await;
    for endpoint in [&frontend, &backend] {
        for bytes in nine_bytes() {
            assert!(send_raw(endpoint, &bytes), "cannot reach {endpoint}");
        }
    }
    let mut w = worker(test, &backend, &["--capacity", "4"]);
    w.ready(Duration::from_secs(20))
        .await
        .expect("worker ready");
    let (summary, ok) = client(test, &frontend, 100, &["--concurrency", "4"]).await;
    assert!(ok, "{summary:?}");
    assert_eq!((summary.answered, summary.lost), (100, 0), "{summary:?}");

    broker.signal(Signal::SIGTERM).expect("signal");
    let status = broker.wait(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success(), "{}", broker.log_tail());
    let stats: BrokerStats = broker.json().expect("final stats");
    assert_eq!(stats.guard_refused, 4, "each attack cut off: {stats:?}");
}
