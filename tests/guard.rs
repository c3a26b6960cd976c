//! The guard in front of the broker's sockets: the nine bytes that abort a bare zmq.rs process,
//! oversized messages and empty-frame floods are cut off and counted, and everything else
//! passes, our peers and libzmq's alike.

use std::time::Duration;

use broker::BrokerStats;
use common::zmtp::send_raw;
use integration::{broker, client, guarded_broker, heavy};
use lab::Signal;

#[tokio::test(flavor = "multi_thread")]
async fn the_guard_cuts_off_oversized_input_and_passes_the_rest() {
    let _g = heavy().await;
    let test = "guard";
    let (mut broker, _worker, frontend, backend) = guarded_broker(test, 4).await;

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

/// Without the guard the same nine bytes abort the broker: the attack is real, and the test
/// above would fail if the guard let it through.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_guard_nine_bytes_abort_the_broker() {
    let _g = heavy().await;
    let (mut broker, frontend, _backend) = broker("unguarded", &["--guard", "never"]).await;
    send_raw(
        &frontend,
        &[common::zmtp::greeting(), common::zmtp::huge_header()].concat(),
    );
    let status = broker
        .wait(Duration::from_secs(20))
        .await
        .expect("the broker dies");
    assert!(!status.success(), "a bare zmq.rs survived: {status:?}");
}
