//! Self-fed mode: when no endpoint is given, the process binds its own weather PUB, task PUSH
//! and result sink (PULL) on loopback ports and feeds the poll loop over real TCP connections,
//! as the Guide's `mspoller` expects the weather server and the ventilator to run beside it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubsub::protocol::{heartbeat, Update, Zip};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{PubSocket, PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqError};

use crate::task::{Sequence, Task};

/// What the in-process feeders did (in the summary of a self-fed run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedSummary {
    pub updates_sent: u64,
    pub tasks_sent: u64,
    /// Results that reached the in-process sink, as the sink numbered them.
    pub results: Sequence,
}

/// The running feeders and where the poll loop connects to them.
#[derive(Debug)]
pub struct Feed {
    pub pub_endpoint: String,
    pub push_endpoint: String,
    pub sink_endpoint: String,
    summary: Arc<Mutex<FeedSummary>>,
    /// Stops the PUB and the PUSH.
    feeding: CancellationToken,
    /// Stops the sink.
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Feed {
    /// Binds the three sockets on loopback and starts feeding `rate` updates and `rate` tasks
    /// per second (updates round-robin over `zips`), with a proxy-style heartbeat every
    /// `heartbeat_every`.
    pub async fn start(rate: f64, zips: &[Zip], heartbeat_every: Duration) -> anyhow::Result<Self> {
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let summary = Arc::new(Mutex::new(FeedSummary::default()));
        let stop = CancellationToken::new();
        let feeding = stop.child_token();
        let mut tasks = JoinSet::new();
        let instance: u64 = rand::random::<u64>() >> 16;

        let mut publisher = PubSocket::new();
        let pub_endpoint = publisher.bind("tcp://127.0.0.1:0").await?.to_string();
        let mut pusher = PushSocket::new();
        let push_endpoint = pusher.bind("tcp://127.0.0.1:0").await?.to_string();
        let mut sink = PullSocket::new();
        let sink_endpoint = sink.bind("tcp://127.0.0.1:0").await?.to_string();

        let zips: Vec<Zip> = if zips.is_empty() {
            (10001..=10003).filter_map(Zip::new).collect()
        } else {
            zips.to_vec()
        };
        let (s, st) = (summary.clone(), feeding.clone());
        tasks.spawn(async move {
            let mut tick = interval(period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut beat = interval(heartbeat_every);
            let mut seqs = vec![0u64; zips.len()];
            let mut next = 0usize;
            loop {
                tokio::select! {
                    () = st.cancelled() => return,
                    _ = beat.tick() => { let _ = publisher.send(heartbeat(instance)).await; }
                    _ = tick.tick() => {
                        let i = next % zips.len();
                        next += 1;
                        seqs[i] += 1;
                        let update = Update {
                            zip: zips[i],
                            publisher: "self".into(),
                            instance,
                            seq: seqs[i],
                            temperature: rand::random::<i32>().rem_euclid(120) - 30,
                            humidity: rand::random::<u32>() % 100,
                        };
                        let _ = publisher.send(update.to_message()).await;
                        lock(&s).updates_sent += 1;
                    }
                }
            }
        });

        let (s, st) = (summary.clone(), feeding.clone());
        tasks.spawn(async move {
            let mut tick = interval(period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    () = st.cancelled() => return,
                    _ = tick.tick() => {}
                }
                seq += 1;
                let task = Task { instance, seq };
                // No peer yet: PUSH refuses at once (ReturnToSender); keep the number, retry.
                loop {
                    match pusher.send(task.to_message()).await {
                        Ok(()) => break,
                        Err(ZmqError::ReturnToSender { .. }) => {}
                        Err(e) => tracing::debug!(error = %e, "feed push failed"),
                    }
                    tokio::select! {
                        () = st.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                lock(&s).tasks_sent += 1;
            }
        });

        let (s, st) = (summary.clone(), stop.clone());
        tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = st.cancelled() => return,
                    msg = sink.recv() => msg,
                };
                if let Ok(task) = msg
                    .map_err(drop)
                    .and_then(|m| Task::parse(&m.into_vec()).map_err(drop))
                {
                    lock(&s).results.on_task(task);
                }
            }
        });

        Ok(Self {
            pub_endpoint,
            push_endpoint,
            sink_endpoint,
            summary,
            feeding,
            stop,
            tasks,
        })
    }

    /// Stops sending updates and tasks (the loop has stopped reading them).
    pub fn stop_feeding(&self) {
        self.feeding.cancel();
    }

    /// Stops the feeders (after the sink had `linger` to take the last results).
    pub async fn stop(mut self, linger: Duration) -> FeedSummary {
        tokio::time::sleep(linger).await;
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let summary = lock(&self.summary).clone();
        summary
    }
}

fn lock(s: &Mutex<FeedSummary>) -> std::sync::MutexGuard<'_, FeedSummary> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
