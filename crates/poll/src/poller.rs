//! The poll loop: one task, one `tokio::select!`, every socket handled as it becomes ready.
//!
//! ```text
//!  zmq_pollitem_t items[] = {            tokio::select! {
//!    { sub,  0, ZMQ_POLLIN,  0 },          ev = sub.next()               => ...,
//!    { pull, 0, ZMQ_POLLIN,  0 },          ev = pull.next(), if room     => ...,
//!    { push, 0, ZMQ_POLLOUT, 0 },          r  = outbox.flush(), if queued => ...,
//!  };                                      at = tick.tick()              => ...,   // the timeout
//!  zmq_poll(items, 3, timeout);            () = shutdown.cancelled()     => break,
//!                                        }
//! ```
//!
//! Differences that matter:
//!
//! - `zmq_poll` says "readable"; a `select!` branch *completes* with the message. The futures
//!   of the branches that lost are dropped, so every branch future must be cancel-safe or be
//!   kept alive across iterations. Ours are both: see [`crate::sub`], [`crate::pull`] and
//!   [`crate::outbox`] for the reasoning per socket; `Interval::tick` and
//!   `CancellationToken::cancelled` are cancel-safe (tokio documents both).
//! - `select!` starts polling at a random branch each time, so a flooding socket cannot starve
//!   the others (a `biased;` select, like a C loop that always drains the first item first,
//!   can), *provided the task yields to the runtime now and then*: `zmq_poll` is a system
//!   call that always looks at every socket, a `select!` only sees what the runtime's I/O
//!   driver reported, and the driver runs only when the task yields. The loop spends
//!   tokio's cooperative budget each iteration for that (`consume_budget`).
//! - `ZMQ_POLLOUT` is a branch only while a result waits, and the PULL is polled for `POLLIN`
//!   only while the outbox has room: the C idiom of polling the input only when the output can
//!   take more, here as `if` preconditions.
//! - The timeout is a branch of its own (an `Interval`), so it fires on time while every socket
//!   is silent, and also while they are busy (`max_tick_late_ms` measures how late it was).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use common::heartbeat::Heartbeat;
use common::link::{Reconnect, LINGER};
use pubsub::protocol::Zip;
use pubsub::tracker::{Seen, StreamSummary, Tracker};
use serde::{Deserialize, Serialize};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::feed::{Feed, FeedSummary};
use crate::outbox::{Flushed, Outbox};
use crate::pull::{PullBranch, PullEvent};
use crate::sub::{SubBranch, SubEvent};
use crate::task::{self, Sequence};

/// What to poll. With no endpoint at all the process feeds itself (see [`crate::feed`]).
#[derive(Debug, Clone)]
pub struct Config {
    /// SUB: connect to a proxy's XPUB (or any weather PUB).
    pub sub: Option<String>,
    /// PULL: connect to a feeder's bound PUSH.
    pub pull: Option<String>,
    /// PUSH: connect to a sink's bound PULL; each task received is sent on as a result.
    pub push: Option<String>,
    /// Zips to subscribe to (empty: every update).
    pub zips: Vec<Zip>,
    /// The timer branch's period (a status line on stdout unless `quiet`).
    pub tick: Duration,
    /// Stop after this many updates and tasks, together.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Results held for the PUSH at most; while full, no task is read.
    pub out_capacity: usize,
    /// On stop, how long queued results may take to leave.
    pub drain: Duration,
    /// The proxy's heartbeat rhythm: a SUB silent for `interval x liveness` is rebuilt.
    pub heartbeat: Heartbeat,
    pub reconnect: Reconnect,
    /// Self-fed mode: updates and tasks per second, each.
    pub feed_rate: f64,
    /// No status line per tick.
    pub quiet: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            sub: None,
            pull: None,
            push: None,
            zips: Vec::new(),
            tick: Duration::from_millis(1000),
            count: None,
            duration: None,
            out_capacity: 1000,
            drain: Duration::from_millis(1000),
            heartbeat: Heartbeat::default(),
            reconnect: Reconnect::default(),
            feed_rate: 100.0,
            quiet: false,
        }
    }
}

/// The SUB branch's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubSummary {
    /// Updates received, duplicates (re-sent last values) not counted.
    pub updates: u64,
    /// Updates skipped, proven from the per-(publisher, zip) sequence numbers.
    pub gaps: u64,
    pub duplicates: u64,
    pub heartbeats: u64,
    /// Proxy (or self-feed) instances heard.
    pub proxies: u64,
    pub bad: u64,
    /// Links lost and rebuilt.
    pub reconnects: u64,
    /// Longest time between two updates, from the first on.
    pub longest_silence_ms: u64,
    /// When the last update came, from the start of the run.
    pub last_update_ms: Option<u64>,
    pub by_zip: BTreeMap<String, u64>,
    /// Per (publisher, zip): first and last sequence numbers, gaps, duplicates.
    pub streams: Vec<StreamSummary>,
}

/// The PULL branch's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PullSummary {
    #[serde(flatten)]
    pub tasks: Sequence,
    pub bad: u64,
    pub reconnects: u64,
    pub longest_silence_ms: u64,
    /// Time the branch was left out because the outbox was full (back-pressure).
    pub paused_ms: u64,
}

/// The PUSH (POLLOUT) branch's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushSummary {
    pub sent: u64,
    /// Results still queued when the run ended (after the drain).
    pub unsent: u64,
    /// Sends the socket refused or lost (each retried).
    pub refused: u64,
    pub reconnects: u64,
    /// Longest time a result waited at the head of the queue for the socket to take it.
    pub longest_wait_ms: u64,
    pub max_queued: u64,
}

/// The `--json` summary: per-branch counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub elapsed_ms: u64,
    /// Times the timer branch fired.
    pub ticks: u64,
    /// How late the timer branch fired at worst: a branch that blocked the loop shows here.
    pub max_tick_late_ms: u64,
    /// Updates and tasks received (what `--count` counts).
    pub received: u64,
    pub sub: Option<SubSummary>,
    pub pull: Option<PullSummary>,
    pub push: Option<PushSummary>,
    /// Self-fed mode: what the in-process feeders sent and the sink got.
    pub feed: Option<FeedSummary>,
}

/// Resolves with `f`'s output, or never when there is no `f`: a branch for an absent socket.
async fn maybe<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs the loop until `count`, `duration` or `shutdown`. `on_ready` gets the endpoints once
/// the SUB is subscribed and the PULL connected (the PUSH may still wait for its peer).
pub async fn run(
    mut config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&[(&str, String)]),
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let feed = if config.sub.is_none() && config.pull.is_none() && config.push.is_none() {
        let feed = Feed::start(config.feed_rate, &config.zips, config.heartbeat.interval).await?;
        config.sub = Some(feed.pub_endpoint.clone());
        config.pull = Some(feed.push_endpoint.clone());
        config.push = Some(feed.sink_endpoint.clone());
        Some(feed)
    } else {
        None
    };
    // Ends the branches' connection attempts; cancelled after the final drain, not at the stop.
    let links = CancellationToken::new();
    let mut sub = config.sub.as_deref().map(|ep| {
        SubBranch::new(
            ep,
            &config.zips,
            config.heartbeat,
            config.reconnect,
            links.clone(),
        )
    });
    let mut pull = config
        .pull
        .as_deref()
        .map(|ep| PullBranch::new(ep, config.reconnect, links.clone()));
    let mut outbox = config
        .push
        .as_deref()
        .map(|ep| Outbox::new(ep, config.out_capacity, config.reconnect, links.clone()));

    let mut summary = Summary {
        sub: sub.as_ref().map(|_| SubSummary::default()),
        pull: pull.as_ref().map(|_| PullSummary::default()),
        push: outbox.as_ref().map(|_| PushSummary::default()),
        ..Summary::default()
    };
    let mut tracker = Tracker::default();
    let mut proxies: Vec<u64> = Vec::new();
    let mut last_update: Option<Instant> = None;
    let mut last_task: Option<Instant> = None;
    let mut paused_since: Option<Instant> = None;
    let mut on_ready = Some(on_ready);

    let mut tick = interval(config.tick);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = tokio::time::sleep(
        config
            .duration
            .unwrap_or(Duration::from_secs(u64::MAX >> 2)),
    );
    tokio::pin!(end);

    loop {
        // A socket whose messages are already buffered is ready at every poll, and zmq.rs's
        // decoding of buffered frames spends none of tokio's cooperative budget: a flooded
        // PULL kept this task from ever returning to the runtime, so no timer fired and no
        // other socket's I/O was polled (measured: 1 tick in 11 s, the SUB starved). Spending
        // one unit per iteration makes the task yield every 128 iterations, the runtime polls
        // its timers and sockets, and select!'s random order then shares the loop fairly.
        tokio::task::consume_budget().await;
        if config.count.is_some_and(|n| summary.received >= n) {
            break;
        }
        if on_ready.is_some()
            && sub.as_ref().is_none_or(SubBranch::is_connected)
            && pull.as_ref().is_none_or(PullBranch::is_connected)
        {
            if let Some(f) = on_ready.take() {
                let mut fields = Vec::new();
                for (k, v) in [
                    ("sub", &config.sub),
                    ("pull", &config.pull),
                    ("push", &config.push),
                ] {
                    if let Some(v) = v {
                        fields.push((k, v.clone()));
                    }
                }
                f(&fields);
            }
        }
        // POLLIN on the PULL only while the POLLOUT side can take its result.
        let room = outbox.as_ref().is_none_or(Outbox::has_room);
        let queued = outbox.as_ref().is_some_and(|o| o.queued() > 0);
        match (room, paused_since) {
            (false, None) => paused_since = Some(Instant::now()),
            (true, Some(since)) => {
                if let Some(p) = summary.pull.as_mut() {
                    p.paused_ms += ms(since.elapsed());
                }
                paused_since = None;
            }
            _ => {}
        }

        tokio::select! {
            // Shutdown and the run's end: cancel-safe (a token, a pinned Sleep).
            () = shutdown.cancelled() => break,
            () = &mut end => break,

            // ZMQ_POLLIN on the SUB. Cancel-safe: `SubBranch::next`.
            ev = maybe(sub.as_mut().map(SubBranch::next)) => {
                let s = summary.sub.get_or_insert_with(SubSummary::default);
                match ev {
                    SubEvent::Update(u) => {
                        if let Seen::Duplicate = tracker.on_update(&u) {
                            continue;
                        }
                        let now = Instant::now();
                        if let Some(last) = last_update {
                            s.longest_silence_ms = s.longest_silence_ms.max(ms(now - last));
                        }
                        last_update = Some(now);
                        s.last_update_ms = Some(ms(now - started));
                        s.updates += 1;
                        *s.by_zip.entry(u.zip.to_string()).or_default() += 1;
                        summary.received += 1;
                    }
                    SubEvent::Heartbeat(instance) => {
                        s.heartbeats += 1;
                        if !proxies.contains(&instance) && proxies.len() < 1024 {
                            proxies.push(instance);
                        }
                    }
                    SubEvent::Bad(e) => {
                        s.bad += 1;
                        if s.bad.is_power_of_two() {
                            tracing::warn!(error = %e, "unreadable update dropped");
                        }
                    }
                    SubEvent::Connected => tracing::info!("sub subscribed"),
                    SubEvent::Lost(_) => s.reconnects += 1,
                }
            }

            // ZMQ_POLLIN on the PULL, only while the outbox has room. Cancel-safe:
            // `PullBranch::next`.
            ev = maybe(pull.as_mut().map(PullBranch::next)), if room => {
                let p = summary.pull.get_or_insert_with(PullSummary::default);
                match ev {
                    PullEvent::Task(t) => {
                        if let task::Seen::Duplicate = p.tasks.on_task(t) {
                            continue;
                        }
                        let now = Instant::now();
                        if let Some(last) = last_task {
                            p.longest_silence_ms = p.longest_silence_ms.max(ms(now - last));
                        }
                        last_task = Some(now);
                        summary.received += 1;
                        if let Some(o) = outbox.as_mut() {
                            o.push(t.to_message());
                            if let Some(push) = summary.push.as_mut() {
                                push.max_queued = push.max_queued.max(o.queued() as u64);
                            }
                        }
                    }
                    PullEvent::Bad(e) => {
                        p.bad += 1;
                        if p.bad.is_power_of_two() {
                            tracing::warn!(error = %e, "unreadable task dropped");
                        }
                    }
                    PullEvent::Connected => {}
                    PullEvent::Lost => p.reconnects += 1,
                }
            }

            // ZMQ_POLLOUT on the PUSH, only while a result waits. Not cancel-safe in zmq.rs,
            // so `Outbox::flush` resumes one send future kept across iterations.
            r = maybe(outbox.as_mut().map(Outbox::flush)), if queued => {
                flushed(&mut summary, r);
            }

            // The timeout: fires on time whatever the sockets do.
            at = tick.tick() => {
                summary.ticks += 1;
                summary.max_tick_late_ms = summary.max_tick_late_ms.max(ms(at.elapsed()));
                if !config.quiet {
                    status(&summary, started, outbox.as_ref());
                }
            }
        }
    }
    if let (Some(since), Some(p)) = (paused_since, summary.pull.as_mut()) {
        p.paused_ms += ms(since.elapsed());
    }

    if let Some(feed) = &feed {
        feed.stop_feeding();
    }
    // Results still queued get `drain` to leave, then the branches stop connecting.
    if let Some(o) = outbox.as_mut() {
        let deadline = Instant::now() + config.drain;
        while o.queued() > 0 {
            match tokio::time::timeout_at(deadline, o.flush()).await {
                Ok(r) => flushed(&mut summary, r),
                Err(_) => break,
            }
        }
        if let Some(push) = summary.push.as_mut() {
            push.unsent = o.queued() as u64;
        }
        tokio::time::sleep(LINGER).await;
    }
    links.cancel();
    if let Some(s) = summary.sub.as_mut() {
        s.gaps = tracker.gaps();
        s.duplicates = tracker.duplicates();
        s.proxies = proxies.len() as u64;
        s.streams = tracker.summaries();
    }
    if let Some(feed) = feed {
        summary.feed = Some(feed.stop(LINGER).await);
    }
    summary.elapsed_ms = ms(started.elapsed());
    Ok(summary)
}

fn flushed(summary: &mut Summary, r: Flushed) {
    let Some(push) = summary.push.as_mut() else {
        return;
    };
    match r {
        Flushed::Sent { waited_ms } => {
            push.sent += 1;
            push.longest_wait_ms = push.longest_wait_ms.max(waited_ms);
        }
        Flushed::Connected => {}
        Flushed::Lost => {
            push.refused += 1;
            push.reconnects += 1;
        }
    }
}

/// One human line per tick on stdout.
fn status(s: &Summary, started: Instant, outbox: Option<&Outbox>) {
    let mut line = format!("{:>6.1}s", started.elapsed().as_secs_f64());
    if let Some(sub) = &s.sub {
        line.push_str(&format!(
            "  sub: {} updates {} heartbeats",
            sub.updates, sub.heartbeats
        ));
    }
    if let Some(p) = &s.pull {
        line.push_str(&format!("  pull: {} tasks", p.tasks.received));
    }
    if let (Some(push), Some(o)) = (&s.push, outbox) {
        let state = if o.is_connected() { "" } else { " (no peer)" };
        line.push_str(&format!(
            "  push: {} sent {} waiting{state}",
            push.sent,
            o.queued()
        ));
    }
    println!("{line}");
}
