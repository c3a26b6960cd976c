//! The `poll` binary (one task, several sockets, one `tokio::select!`) against real peers: the
//! pubsub proxy and publisher, and a PUSH feeder and PULL sink played by the test. Each test
//! reads the binary's `--json` summary (per-branch counts).

use std::time::Duration;

use integration::{bins, figure, heavy, log_dir, scenario};
use lab::process::Proc;
use lab::scenarios::PartitionMode;
use lab::Signal;
use poll::task::{Sequence, Task};
use poll::Summary;
use pubsub::protocol::{Update, Zip};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqError};

const READY: Duration = Duration::from_secs(20);

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn spawn(test: &str, role: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        role,
        &bins().path(role),
        &strings(args),
        &log_dir(&format!("{test}-{role}")),
    )
    .expect(role)
}

/// A proxy on the endpoints given (port 0: free ones); its `(xsub, xpub)` once ready.
async fn proxy(test: &str, xsub: &str, xpub: &str) -> (Proc, String, String) {
    let mut p = spawn(test, "proxy", &["--xsub", xsub, "--xpub", xpub]);
    let ready = p.ready(READY).await.expect("proxy ready");
    (p, ready["xsub"].clone(), ready["xpub"].clone())
}

/// Runs `poll` to its end and returns its summary.
/// Binds `socket` on a free loopback port; its endpoint.
async fn bind_free<S: Socket>(socket: &mut S) -> String {
    socket
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string()
}

/// `poll` on `xpub` (zip 10001) and `pull`, ticking every 100 ms for `secs` seconds, with a JSON
/// summary and `extra` flags.
fn spawn_poll(test: &str, xpub: &str, pull: &str, secs: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--sub",
        xpub,
        "--zip",
        "10001",
        "--pull",
        pull,
        "--tick-ms",
        "100",
        "--duration-s",
        secs,
        "--json",
    ];
    args.extend_from_slice(extra);
    spawn(test, "poll", &args)
}

async fn finish(mut poll: Proc) -> Summary {
    let status = poll
        .wait(Duration::from_secs(120))
        .await
        .expect("poll ends");
    assert!(status.success(), "{}", poll.log_tail());
    let summary: Summary = poll.json().expect("poll summary");
    eprintln!("{}", serde_json::to_string(&summary).unwrap_or_default());
    summary
}

/// A PUSH bound on `endpoint` sending numbered tasks of one instance every `every` (zero: as
/// fast as the socket takes them) until `stop`; a refused send (no peer) is retried with the
/// same number. Returns the socket and how many tasks it sent.
fn feeder(
    mut push: PushSocket,
    instance: u64,
    every: Duration,
    stop: CancellationToken,
) -> JoinHandle<(PushSocket, u64)> {
    tokio::spawn(async move {
        let mut seq = 0;
        while !stop.is_cancelled() {
            let task = Task {
                instance,
                seq: seq + 1,
            };
            let sent = tokio::select! {
                () = stop.cancelled() => break,
                r = push.send(task.to_message()) => r,
            };
            match sent {
                Ok(()) => seq += 1,
                Err(ZmqError::ReturnToSender { .. }) => sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("feeder: {e}"),
            }
            if every.is_zero() {
                if seq.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            } else {
                sleep(every).await;
            }
        }
        // zmq.rs has no linger: let the last tasks leave before the socket may be dropped.
        sleep(Duration::from_millis(300)).await;
        (push, seq)
    })
}

/// Neither socket starves the other: while the PULL is flooded as fast as a PUSH can send, the
/// SUB still gets every update of a 50/s publisher through the real proxy, each within a fraction
/// of a second of the previous one (a `biased` select that polls the PULL first fails this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sockets_are_served_while_one_floods() {
    let _heavy = heavy().await;
    let test = "poll-flood";
    let (_proxy, xsub, xpub) = proxy(test, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0").await;
    let mut push = PushSocket::new();
    let pull_ep = bind_free(&mut push).await;
    let mut poll = spawn_poll(test, &xpub, &pull_ep, "5", &[]);
    poll.ready(READY).await.expect("poll ready");
    let mut publisher = spawn(
        test,
        "publisher",
        &[
            "--connect",
            &xsub,
            "--id",
            "quiet",
            "--zips",
            "10001",
            "--rate",
            "50",
            "--wait-subscriber-ms",
            "10000",
        ],
    );
    publisher.ready(READY).await.expect("publisher ready");
    let stop = CancellationToken::new();
    let flood = feeder(push, 1, Duration::ZERO, stop.clone());
    let summary = finish(poll).await;
    stop.cancel();
    let _ = flood.await;
    let _ = publisher.signal(Signal::SIGTERM);

    let sub = summary.sub.clone().expect("sub figures");
    let pull = summary.pull.clone().expect("pull figures");
    assert!(pull.tasks.received >= 20_000, "no flood: {pull:?}");
    assert_eq!((pull.tasks.gaps, pull.tasks.duplicates), (0, 0), "{pull:?}");
    // ~4 s of a 50/s publisher after both were up; every one of them, none late.
    assert!(sub.updates >= 100, "the quiet SUB starved: {sub:?}");
    assert_eq!((sub.gaps, sub.duplicates), (0, 0), "{sub:?}");
    // Served promptly too: 20 ms apart when sent; starved, it is seconds (or one update).
    assert!(sub.longest_silence_ms < 1000, "{sub:?}");
    assert!(summary.max_tick_late_ms < 1000, "{summary:?}");
}

/// The POLLOUT case: results go to a PUSH whose sink is not there for 2.5 s. Meanwhile the loop
/// keeps serving the SUB and the timer, takes exactly `--out-capacity` tasks and then stops
/// reading the PULL (back-pressure); once the sink binds, every result arrives, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollout_waits_for_its_peer_without_blocking_the_other_branches() {
    let _heavy = heavy().await;
    let test = "poll-pollout";
    const TASKS: u64 = 3000;
    let mut publisher = PubSocket::new();
    let sub_ep = bind_free(&mut publisher).await;
    let mut push = PushSocket::new();
    let pull_ep = bind_free(&mut push).await;
    let sink_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let sink_ep = format!("tcp://127.0.0.1:{sink_port}");

    let stop = CancellationToken::new();
    let updates = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let zip = Zip::new(10001).expect("zip");
            let mut seq = 0;
            while !stop.is_cancelled() {
                seq += 1;
                let u = Update {
                    zip,
                    publisher: "test".into(),
                    instance: 1,
                    seq,
                    temperature: 20,
                    humidity: 50,
                };
                let _ = publisher.send(u.to_message()).await;
                sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut poll = spawn(
        test,
        "poll",
        &[
            "--sub",
            &sub_ep,
            "--pull",
            &pull_ep,
            "--push",
            &sink_ep,
            "--out-capacity",
            "200",
            "--tick-ms",
            "100",
            "--duration-s",
            "6",
            "--drain-ms",
            "5000",
            "--reconnect-max-ms",
            "200",
            "--json",
        ],
    );
    poll.ready(READY).await.expect("poll ready");
    let feeding = tokio::spawn(async move {
        for seq in 1..=TASKS {
            push.send(Task { instance: 9, seq }.to_message())
                .await
                .expect("feeder sends");
        }
        sleep(Duration::from_secs(10)).await;
        drop(push);
    });
    sleep(Duration::from_millis(2500)).await;
    let sink_started = Instant::now();
    let mut sink = PullSocket::new();
    sink.bind(&sink_ep).await.expect("sink binds");
    let mut results = Sequence::default();
    while results.received + results.duplicates < TASKS {
        let msg = tokio::time::timeout(Duration::from_secs(30), sink.recv())
            .await
            .expect("results keep coming")
            .expect("sink receives");
        results.on_task(Task::parse(&msg.into_vec()).expect("a result"));
    }
    eprintln!(
        "all results {:?} after the sink bound",
        sink_started.elapsed()
    );
    let summary = finish(poll).await;
    stop.cancel();
    let _ = updates.await;
    feeding.abort();

    assert_eq!((results.gaps, results.duplicates), (0, 0), "{results:?}");
    assert_eq!((results.first, results.last), (1, TASKS));
    let (sub, pull, push) = (
        summary.sub.clone().expect("sub"),
        summary.pull.clone().expect("pull"),
        summary.push.clone().expect("push"),
    );
    // The other branches kept being served while the send waited.
    assert!(sub.updates >= 200, "{sub:?}");
    assert!(sub.longest_silence_ms < 500, "{sub:?}");
    assert!(summary.max_tick_late_ms < 300, "{summary:?}");
    assert!(summary.ticks >= 50, "{summary:?}");
    assert_eq!(pull.tasks.received, TASKS, "{pull:?}");
    assert_eq!(
        (push.sent, push.unsent, push.max_queued),
        (TASKS, 0, 200),
        "{push:?}"
    );
    assert!(
        push.longest_wait_ms >= 1500,
        "the first result did not wait: {push:?}"
    );
    assert!(
        pull.paused_ms >= 1500,
        "the PULL was not left out while full: {pull:?}"
    );
}

/// Peers that die and come back do not stop the loop: the real proxy is SIGKILLed and
/// restarted on the same ports, later the task feeder closes and a new one binds the same port.
/// The timer never stops, the SUB hears the new proxy and gets updates again, and every task of
/// both feeders arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_die_and_come_back_do_not_stop_the_loop() {
    let _heavy = heavy().await;
    let test = "poll-restart";
    let (mut proxy1, xsub, xpub) = proxy(test, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0").await;
    let mut push = PushSocket::new();
    let pull_ep = bind_free(&mut push).await;
    let mut poll = spawn_poll(test, &xpub, &pull_ep, "10", &["--reconnect-max-ms", "300"]);
    poll.ready(READY).await.expect("poll ready");
    let started = Instant::now();
    let mut publisher = spawn(
        test,
        "publisher",
        &[
            "--connect",
            &xsub,
            "--id",
            "w",
            "--zips",
            "10001",
            "--rate",
            "50",
        ],
    );
    publisher.ready(READY).await.expect("publisher ready");
    let stop1 = CancellationToken::new();
    let feeder1 = feeder(push, 1, Duration::from_millis(10), stop1.clone());

    sleep(Duration::from_secs(2)).await;
    proxy1.kill().await.expect("proxy killed");
    sleep(Duration::from_secs(1)).await;
    let (_proxy2, _, _) = proxy(test, &xsub, &xpub).await;

    sleep(Duration::from_secs(1)).await;
    stop1.cancel();
    let (push1, sent1) = feeder1.await.expect("feeder 1");
    drop(push1);
    sleep(Duration::from_millis(500)).await;
    let mut push = PushSocket::new();
    push.bind(&pull_ep).await.expect("the feeder binds again");
    let stop2 = CancellationToken::new();
    let feeder2 = feeder(push, 2, Duration::from_millis(10), stop2.clone());
    // Stop feeding well before poll stops, so that every task sent is received.
    let until = started + Duration::from_secs(8);
    tokio::time::sleep_until(until).await;
    stop2.cancel();
    let (_push2, sent2) = feeder2.await.expect("feeder 2");
    let summary = finish(poll).await;
    let _ = publisher.signal(Signal::SIGTERM);

    let (sub, pull) = (
        summary.sub.clone().expect("sub"),
        summary.pull.clone().expect("pull"),
    );
    assert_eq!(sub.proxies, 2, "the new proxy was not heard: {sub:?}");
    assert!(sub.reconnects >= 1, "{sub:?}");
    let last = sub.last_update_ms.expect("updates");
    assert!(
        last + 1000 >= summary.elapsed_ms.min(9500),
        "no update near the end: {sub:?}"
    );
    assert_eq!(pull.tasks.feeders, 2, "{pull:?}");
    assert!(pull.reconnects >= 1, "{pull:?}");
    assert_eq!(pull.tasks.received, sent1 + sent2, "{pull:?}");
    assert_eq!((pull.tasks.gaps, pull.tasks.duplicates), (0, 0), "{pull:?}");
    assert_eq!((pull.tasks.first, pull.tasks.last), (1, sent2), "{pull:?}");
    // The timer branch never stopped: ~100 ticks in 10 s.
    assert!(summary.ticks >= 90, "{summary:?}");
    assert!(summary.max_tick_late_ms < 500, "{summary:?}");
}

/// Bad flags: one `error:` line, a non-zero exit, no panic.
#[tokio::test]
async fn bad_flags_are_one_line_errors() {
    for args in [
        &["--tick-ms", "0"][..],
        &["--sub", "nowhere"],
        &["--duration-s", "-1"],
        &["--zip", "123456"],
    ] {
        let out = std::process::Command::new(bins().path("poll"))
            .args(args)
            .output()
            .expect("poll runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// The lab's `poll` scenario: real proxy, publisher and poll, a flooding feeder and a sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_scenario_poll_passes() {
    let v = scenario("poll", PartitionMode::Auto).await;
    assert!(v.passed, "{}", v.render());
    assert_eq!(figure(&v, "results_received"), figure(&v, "tasks_sent"));
    assert_eq!(figure(&v, "updates_received"), figure(&v, "updates_sent"));
}

/// `--help` explains the mapping from zmq_poll; with no endpoint the binary feeds itself and
/// every branch is served: updates and tasks received, every result reached its own sink.
#[tokio::test]
async fn help_and_self_fed_mode() {
    let out = std::process::Command::new(bins().path("poll"))
        .arg("--help")
        .output()
        .expect("poll runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in [
        "Usage:",
        "ZMQ_POLLIN",
        "ZMQ_POLLOUT",
        "timeout",
        "One task per socket",
    ] {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
    let poll = spawn(
        "poll-self-fed",
        "poll",
        &["--duration-s", "2", "--feed-rate", "200", "--json"],
    );
    let summary = finish(poll).await;
    let (sub, pull, push, feed) = (
        summary.sub.clone().expect("sub"),
        summary.pull.clone().expect("pull"),
        summary.push.clone().expect("push"),
        summary.feed.clone().expect("feed"),
    );
    assert!(sub.updates >= 200 && sub.heartbeats >= 1, "{sub:?}");
    assert!(pull.tasks.received >= 200, "{pull:?}");
    assert_eq!((pull.tasks.gaps, pull.tasks.duplicates), (0, 0), "{pull:?}");
    assert_eq!(
        (push.sent, push.unsent),
        (pull.tasks.received, 0),
        "{push:?}"
    );
    assert_eq!(feed.results.received, push.sent, "{feed:?}");
    // The feeders stop when the loop does: at most a few tasks were in flight then.
    assert!(feed.tasks_sent >= pull.tasks.received, "{feed:?}");
    assert!(
        feed.tasks_sent - pull.tasks.received <= 5,
        "{feed:?} {pull:?}"
    );
    assert_eq!(
        (feed.results.gaps, feed.results.duplicates),
        (0, 0),
        "{feed:?}"
    );
}
