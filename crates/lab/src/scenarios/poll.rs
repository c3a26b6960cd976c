//! Seed, opening example (`zmq_poll`) and the Guide's `mspoller`: one `poll` process reads a
//! SUB (weather updates through the real proxy from the real publisher) and a PULL (tasks
//! flooded by a PUSH feeder of the lab's) in one select loop, and sends each task on as a
//! result on a PUSH (POLLOUT) to a sink of the lab's.
//!
//! The verdict judges per-branch counts from `poll --json`, the publisher's summary and what
//! the feeder sent and the sink received: every update and every task once, in order, and the
//! quiet SUB served promptly while the PULL floods.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{Lab, Scenario};
use crate::process::Proc;
use crate::verdict::Verdict;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { name: "poll", about: "seed zmq_poll: one task serves a SUB (via the proxy) and a flooded PULL, results out on a PUSH; nothing lost, neither starved", run: |l| Box::pin(poll(l)) },
    ]
}

const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(120);
const UPDATES: u64 = 1000;
const RATE: &str = "200";
/// Enough to flood the PULL for most of the run (~60k tasks/s unoptimised, far more in release).
const TASKS: u64 = if cfg!(debug_assertions) {
    50_000
} else {
    300_000
};
/// The feeder's instance, as `poll` expects a task: one frame `"<instance hex> <seq>"`.
const INSTANCE: u64 = 0xfeed;

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn task(seq: u64) -> ZmqMessage {
    ZmqMessage::from(format!("{INSTANCE:x} {seq}"))
}

fn result_seq(msg: &ZmqMessage) -> Option<u64> {
    let text = std::str::from_utf8(msg.get(0)?).ok()?;
    let (instance, seq) = text.split_once(' ')?;
    (u64::from_str_radix(instance, 16).ok()? == INSTANCE)
        .then(|| seq.parse().ok())
        .flatten()
}

fn num(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or(0)
}

async fn poll(lab: &Lab) -> Result<Verdict> {
    lab.bins.check(&["proxy", "publisher", "poll"])?;
    let logs = lab.logs_for("poll");
    let loopback = "tcp://127.0.0.1:0";
    let mut proxy = Proc::spawn(
        "proxy",
        &lab.bins.path("proxy"),
        &strings(&["--xsub", loopback, "--xpub", loopback]),
        &logs,
    )?;
    let ready = proxy.ready(READY_WITHIN).await?;
    let xsub = ready
        .get("xsub")
        .cloned()
        .context("ready line has no xsub")?;
    let xpub = ready
        .get("xpub")
        .cloned()
        .context("ready line has no xpub")?;

    let mut feeder = PushSocket::new();
    let feed_ep = feeder.bind(loopback).await?.to_string();
    let mut sink = PullSocket::new();
    let sink_ep = sink.bind(loopback).await?.to_string();

    let count = (UPDATES + TASKS).to_string();
    let mut poller = Proc::spawn(
        "poll",
        &lab.bins.path("poll"),
        &strings(&[
            "--sub",
            &xpub,
            "--zip",
            "10001",
            "--pull",
            &feed_ep,
            "--push",
            &sink_ep,
            "--count",
            &count,
            "--duration-s",
            "90",
            "--tick-ms",
            "100",
            "--json",
        ]),
        &logs,
    )?;
    poller.ready(READY_WITHIN).await?;

    // The sink reads every result until it has them all (bounded by the run's deadline).
    let sink_task = tokio::spawn(async move {
        let (mut got, mut in_order, mut last) = (0u64, true, 0u64);
        while got < TASKS {
            let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(30), sink.recv()).await
            else {
                break;
            };
            let seq = result_seq(&msg).unwrap_or(0);
            in_order &= seq == last + 1;
            last = seq;
            got += 1;
        }
        (got, in_order, last)
    });

    let mut publisher = Proc::spawn(
        "publisher",
        &lab.bins.path("publisher"),
        &strings(&[
            "--connect",
            &xsub,
            "--id",
            "weather",
            "--zips",
            "10001",
            "--rate",
            RATE,
            "--count",
            &UPDATES.to_string(),
            "--wait-subscriber-ms",
            "10000",
            "--json",
        ]),
        &logs,
    )?;
    publisher.ready(READY_WITHIN).await?;

    // Flood the PULL while the updates trickle in: as fast as the socket takes the tasks.
    let feeding = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < TASKS {
            match feeder.send(task(sent + 1)).await {
                Ok(()) => sent += 1,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            if sent.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        // zmq.rs has no linger: keep the socket until poll has read everything.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(feeder);
    });

    let published = publisher.wait(EXIT_WITHIN).await?;
    anyhow::ensure!(
        published.success(),
        "publisher failed\n{}",
        publisher.log_tail()
    );
    let published: Value = publisher.json()?;
    let status = poller.wait(EXIT_WITHIN).await?;
    feeding.abort();
    anyhow::ensure!(status.success(), "poll failed\n{}", poller.log_tail());
    let summary: Value = poller.json()?;
    let (results, in_order, last) = sink_task.await.context("sink")?;
    proxy.signal(crate::Signal::SIGTERM)?;
    let _ = proxy.wait(Duration::from_secs(10)).await;

    let sent = num(&published, "/sent");
    let before_first: u64 = summary
        .pointer("/sub/streams")
        .and_then(Value::as_array)
        .map(|s| s.iter().map(|st| num(st, "/first").saturating_sub(1)).sum())
        .unwrap_or(0);
    let mut v = Verdict::new("poll", "processes");
    v.figure("updates_sent", sent)
        .figure("updates_received", num(&summary, "/sub/updates"))
        .figure("update_gaps", num(&summary, "/sub/gaps"))
        .figure("update_duplicates", num(&summary, "/sub/duplicates"))
        .figure("updates_before_first", before_first)
        .figure(
            "sub_longest_silence_ms",
            num(&summary, "/sub/longest_silence_ms"),
        )
        .figure("tasks_sent", TASKS)
        .figure("tasks_received", num(&summary, "/pull/received"))
        .figure("task_gaps", num(&summary, "/pull/gaps"))
        .figure("task_duplicates", num(&summary, "/pull/duplicates"))
        .figure("results_sent", num(&summary, "/push/sent"))
        .figure("results_received", results)
        .figure("ticks", num(&summary, "/ticks"))
        .figure("max_tick_late_ms", num(&summary, "/max_tick_late_ms"))
        .figure("elapsed_ms", num(&summary, "/elapsed_ms"));
    v.expect(
        num(&summary, "/sub/updates") + before_first == sent && sent == UPDATES,
        format!("every one of the {UPDATES} updates received (before the first: {before_first})"),
    )
    .expect(
        before_first == 0,
        "the first update was the publisher's first",
    )
    .expect(
        num(&summary, "/sub/gaps") == 0 && num(&summary, "/sub/duplicates") == 0,
        "no update lost or doubled",
    )
    .expect(
        num(&summary, "/pull/received") == TASKS
            && num(&summary, "/pull/gaps") == 0
            && num(&summary, "/pull/duplicates") == 0,
        format!("every one of the {TASKS} tasks received once"),
    )
    .expect(
        results == TASKS && in_order && last == TASKS,
        format!("the sink got all {TASKS} results once, in order"),
    )
    // Updates come every 5 ms; a SUB starved by the flood would be silent for seconds.
    .expect(
        num(&summary, "/sub/longest_silence_ms") < 1000,
        "the SUB served within 1 s all along while the PULL floods",
    )
    .expect(
        num(&summary, "/max_tick_late_ms") < 1000,
        "the timer fired within 1 s of its time all along",
    );
    Ok(v)
}
