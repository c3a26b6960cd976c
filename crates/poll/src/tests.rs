//! Properties of the select loop's branches, in one process over loopback TCP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::link::Reconnect;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, PushSocket, Socket, SocketSend};

use crate::pull::{PullBranch, PullEvent};
use crate::task::{Sequence, Task};

/// How many receives the cancellation test cancels: `POLL_CANCELS`, else a million (~4 s in
/// a debug build on 2 busy cores).
fn cancels_wanted() -> u64 {
    std::env::var("POLL_CANCELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The stand-in for a timer that fires as often as possible: ready at once (cancelling a
/// pending receive before the runtime polled any I/O) or, one time in 32, after one yield
/// to the runtime (which lets the feeder and the I/O driver run); chosen at random, as a fixed
/// rhythm can lock in step with the receive's and never cancel it.
async fn timer() {
    if !rand::random::<u8>().is_multiple_of(32) {
        std::future::ready(()).await
    } else {
        tokio::task::yield_now().await
    }
}

/// A PULL receive that loses the race is dropped. Here it loses most races on purpose: a
/// `biased` select polls the receive first and, whenever it is pending, lets an always-ready
/// branch (see [`timer`]) win and cancel
/// it. The feeder's numbers must still come out complete, once each, in order.
#[tokio::test(flavor = "current_thread")]
async fn no_task_lost_or_doubled_across_many_cancelled_receives() {
    let wanted = cancels_wanted();
    let mut push = PushSocket::new();
    let endpoint = push
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let links = CancellationToken::new();
    let mut pull = PullBranch::new(&endpoint, Reconnect::default(), links.clone());

    // The feeder keeps at most WINDOW tasks ahead of the receiver, so that the receive is
    // often pending (and cancelled) rather than always ready.
    const WINDOW: u64 = 2;
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let stop_feeding = stop.clone();
    let taken = received.clone();
    let mut feeder = tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop_feeding.is_cancelled() {
            if seq >= taken.load(Ordering::Relaxed) + WINDOW {
                tokio::task::yield_now().await;
                continue;
            }
            seq += 1;
            if push
                .send(Task { instance: 7, seq }.to_message())
                .await
                .is_err()
            {
                // No peer yet: the same number again.
                seq -= 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        seq
    });

    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut tasks = Sequence::default();
    let mut cancelled = 0u64;
    let mut sent: Option<u64> = None;
    loop {
        if sent.is_some_and(|n| tasks.received + tasks.duplicates >= n) {
            break;
        }
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                panic!("stuck: {tasks:?}, {cancelled} cancelled, sent {sent:?}")
            }
            ev = pull.next() => match ev {
                PullEvent::Task(t) => {
                    tasks.on_task(t);
                    received.fetch_add(1, Ordering::Relaxed);
                }
                PullEvent::Connected => {}
                // The feeder closes its socket when done.
                PullEvent::Lost if feeder.is_finished() => {}
                other => panic!("unexpected {other:?}"),
            },
            n = &mut feeder, if sent.is_none() => sent = Some(n.expect("feeder")),
            () = timer(), if sent.is_none() => {
                cancelled += 1;
                if cancelled == wanted {
                    stop.cancel();
                }
            }
        }
    }
    let sent = sent.expect("feeder done");
    eprintln!(
        "{sent} tasks through {cancelled} cancelled receives in {:?}",
        started.elapsed()
    );
    assert!(cancelled >= wanted);
    assert_eq!(tasks.duplicates, 0, "{tasks:?}");
    assert_eq!(tasks.gaps, 0, "{tasks:?}");
    assert_eq!((tasks.first, tasks.last, tasks.received), (1, sent, sent));
    links.cancel();
}

/// The timer branch fires on time while every socket is silent (connected, nothing sent).
#[tokio::test(flavor = "current_thread")]
async fn timer_fires_while_every_socket_is_silent() {
    let mut publisher = PubSocket::new();
    let sub = publisher
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut feeder = PushSocket::new();
    let pull = feeder
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut sink = zeromq::PullSocket::new();
    let push = sink
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let config = crate::Config {
        sub: Some(sub),
        pull: Some(pull),
        push: Some(push),
        tick: Duration::from_millis(50),
        duration: Some(Duration::from_millis(1500)),
        quiet: true,
        ..crate::Config::default()
    };
    let run = crate::run(config, CancellationToken::new(), |_| {});
    let summary = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the run ends on time")
        .expect("runs");
    eprintln!("{summary:?}");
    assert_eq!(summary.received, 0);
    // 1.5 s / 50 ms = 30 ticks (+1 at once); a loop blocked on a socket would show few.
    assert!(summary.ticks >= 25, "{} ticks", summary.ticks);
    assert!(summary.ticks <= 32, "{} ticks", summary.ticks);
    drop((publisher, feeder, sink));
}
