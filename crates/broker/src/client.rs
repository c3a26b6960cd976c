//! The Lazy Pirate client: a DEALER that speaks the REQ envelope and keeps K requests in flight.
//!
//! Each request carries an id in its first body frame. A request unanswered for `timeout` is
//! sent again; if nothing at all came back in that time, or the connection closed, the link is
//! taken for dead: a new socket, reconnect with backoff, and every outstanding request resent.
//! Replies to requests already answered are counted as duplicates and dropped.
//!
//! Given the two brokers of a pair (docs/pairs.md), each lost link moves on to the next broker,
//! and everything outstanding is re-sent there; a broker that is not active drops the requests,
//! and the timeout moves the client on again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use common::frames;
use common::link::{self, Backoff};
use common::send::try_send;
use serde::{Deserialize, Serialize};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, Socket, SocketRecv};

use crate::config::ClientConfig;
use crate::protocol::{self, Reply};

/// What the client prints as JSON with `--json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientSummary {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    /// Late replies to requests already answered, discarded.
    pub duplicates: u64,
    /// Requests sent again after a timeout or a reconnect.
    pub retries: u64,
    pub reconnects: u64,
    /// Replies whose payload was not the one sent (an echo worker never does this).
    pub corrupt: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub elapsed_ms: u64,
    /// The longest time without any reply while requests were outstanding.
    pub longest_gap_ms: u64,
    /// Replies per worker name (`unknown` for workers that do not sign replies).
    pub by_worker: BTreeMap<String, u64>,
    /// Replies (first answers) per 100 ms since the start.
    #[serde(default)]
    pub timeline: common::timeline::Timeline,
    /// Given several brokers (a pair): replies (first answers) per broker endpoint, and their
    /// timelines. Empty with one broker.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_broker: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timeline_by_broker: BTreeMap<String, common::timeline::Timeline>,
}

struct Pending {
    payload: Bytes,
    first_sent: Instant,
    last_sent: Instant,
}

struct State {
    config: ClientConfig,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    answered: HashSet<u64>,
    latencies: Vec<u64>,
    summary: ClientSummary,
    /// When the last reply arrived (for `longest_gap_ms`).
    last_reply: Instant,
    /// Since when the current link has been silent: the last reply or the link's start.
    quiet_since: Instant,
    /// With several brokers: the one the current link goes to.
    broker: Option<String>,
}

enum LinkEnd {
    Lost(&'static str),
    Finished,
}

impl State {
    fn payload(&self, id: u64) -> Bytes {
        let mut text = format!("request {id}").into_bytes();
        if text.len() < self.config.size {
            text.resize(self.config.size, b'.');
        }
        Bytes::from(text)
    }

    fn done(&self) -> bool {
        self.pending.is_empty() && self.next_id >= self.config.requests
    }

    async fn send(&mut self, socket: &mut DealerSocket, id: u64) -> Result<(), ()> {
        let pending = self
            .pending
            .get_mut(&id)
            .expect("only pending ids are sent");
        pending.last_sent = Instant::now();
        let body = protocol::request_body(id, pending.payload.clone());
        let mut frames = vec![Bytes::new()];
        frames.extend(body);
        // Never wait: a broker that stopped reading is as good as gone (reconnect).
        match try_send(socket, frames::message_of(frames)) {
            common::send::Sent::Queued => Ok(()),
            _ => Err(()),
        }
    }

    /// Starts new requests up to the concurrency limit.
    async fn fill(&mut self, socket: &mut DealerSocket) -> Result<(), ()> {
        while self.pending.len() < self.config.concurrency && self.next_id < self.config.requests {
            let id = self.next_id;
            self.next_id += 1;
            let now = Instant::now();
            let payload = self.payload(id);
            self.pending.insert(
                id,
                Pending {
                    payload,
                    first_sent: now,
                    last_sent: now,
                },
            );
            self.summary.sent += 1;
            self.send(socket, id).await?;
        }
        Ok(())
    }

    fn on_reply(&mut self, frames: &[Bytes]) {
        let Some(reply) = Reply::parse(frames) else {
            tracing::warn!(frames = frames.len(), "unreadable reply dropped");
            return;
        };
        let now = Instant::now();
        let gap = now.duration_since(self.last_reply).as_millis() as u64;
        self.summary.longest_gap_ms = self.summary.longest_gap_ms.max(gap);
        self.last_reply = now;
        self.quiet_since = now;
        match self.pending.remove(&reply.id) {
            Some(p) => {
                if p.payload != reply.payload {
                    self.summary.corrupt += 1;
                }
                self.answered.insert(reply.id);
                self.summary.answered += 1;
                self.summary.timeline.record_at(now);
                self.latencies
                    .push(now.duration_since(p.first_sent).as_micros() as u64);
                let worker = reply.worker.unwrap_or_else(|| "unknown".into());
                *self.summary.by_worker.entry(worker).or_default() += 1;
                if let Some(broker) = &self.broker {
                    if let Some(n) = self.summary.by_broker.get_mut(broker) {
                        *n += 1;
                    }
                    if let Some(t) = self.summary.timeline_by_broker.get_mut(broker) {
                        t.record_at(now);
                    }
                }
            }
            None if self.answered.contains(&reply.id) => self.summary.duplicates += 1,
            None => tracing::warn!(id = reply.id, "reply to a request never sent dropped"),
        }
    }

    /// Resends what timed out; `Err` when the link looks dead (nothing heard within `timeout`).
    async fn retry(&mut self, socket: &mut DealerSocket) -> Result<(), &'static str> {
        let timeout = self.config.timeout;
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_sent) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        if overdue.is_empty() {
            return Ok(());
        }
        if now.duration_since(self.quiet_since) >= timeout {
            return Err("no reply within the timeout");
        }
        for id in overdue {
            self.summary.retries += 1;
            self.send(socket, id).await.map_err(|_| "send failed")?;
        }
        Ok(())
    }

    /// After a reconnect, everything outstanding goes out again on the new link.
    async fn resend_all(&mut self, socket: &mut DealerSocket) -> Result<(), ()> {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            self.summary.retries += 1;
            self.send(socket, id).await?;
        }
        Ok(())
    }

    async fn serve(
        &mut self,
        socket: &mut DealerSocket,
        monitor: &mut link::Monitor,
        stop: &CancellationToken,
    ) -> LinkEnd {
        if self.resend_all(socket).await.is_err() || self.fill(socket).await.is_err() {
            return LinkEnd::Lost("send failed");
        }
        // Waiting for a first reply on a new link starts now, not at the outage.
        self.quiet_since = Instant::now();
        let mut tick = interval((self.config.timeout / 4).max(Duration::from_millis(5)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.done() {
                return LinkEnd::Finished;
            }
            tokio::select! {
                () = stop.cancelled() => return LinkEnd::Finished,
                _ = monitor.disconnected() => return LinkEnd::Lost("connection closed"),
                msg = socket.recv() => {
                    let Ok(msg) = msg else { return LinkEnd::Lost("receive failed") };
                    self.on_reply(&msg.into_vec());
                    if self.fill(socket).await.is_err() {
                        return LinkEnd::Lost("send failed");
                    }
                }
                _ = tick.tick() => {
                    if let Err(why) = self.retry(socket).await {
                        return LinkEnd::Lost(why);
                    }
                }
            }
        }
    }

    fn finish(mut self, started: Instant) -> ClientSummary {
        let mut s = self.summary;
        s.lost = s.sent - s.answered + (self.config.requests - self.next_id);
        s.elapsed_ms = started.elapsed().as_millis() as u64;
        self.latencies.sort_unstable();
        let pct = |q: f64| -> u64 {
            if self.latencies.is_empty() {
                return 0;
            }
            let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
            self.latencies[i]
        };
        s.p50_us = pct(0.50);
        s.p99_us = pct(0.99);
        s.max_us = self.latencies.last().copied().unwrap_or(0);
        s
    }
}

/// Sends `requests` requests and returns when all are answered, at the deadline, or on
/// `shutdown`, whichever comes first.
pub async fn run(config: ClientConfig, shutdown: CancellationToken) -> ClientSummary {
    let started = Instant::now();
    // The deadline and Ctrl-C both stop the client; a child token keeps them apart from the
    // caller's token.
    let stop = shutdown.child_token();
    let deadline = tokio::spawn({
        let stop = stop.clone();
        let deadline = config.deadline;
        async move {
            tokio::time::sleep(deadline).await;
            tracing::warn!(?deadline, "deadline reached, giving up");
            stop.cancel();
        }
    });
    let mut backoff = Backoff::new(config.reconnect.min, config.reconnect.max);
    let mut state = State {
        next_id: 0,
        pending: HashMap::new(),
        answered: HashSet::new(),
        latencies: Vec::with_capacity(config.requests.min(1 << 20) as usize),
        summary: ClientSummary {
            timeline: common::timeline::Timeline::start(),
            ..ClientSummary::default()
        },
        last_reply: started,
        quiet_since: started,
        broker: None,
        config,
    };
    let endpoints = state.config.connect.clone();
    if endpoints.len() > 1 {
        for e in &endpoints {
            state.summary.by_broker.insert(e.clone(), 0);
            let timeline = common::timeline::Timeline::start();
            state.summary.timeline_by_broker.insert(e.clone(), timeline);
        }
    }
    let reconnect = state.config.reconnect;
    // The broker to try next (several: a pair's).
    let mut next = 0;
    while !state.done() && !stop.is_cancelled() {
        let Some((connected, endpoint)) =
            connect_any(&endpoints, &mut next, &reconnect, &mut backoff, &stop).await
        else {
            break;
        };
        if endpoints.len() > 1 {
            tracing::info!(broker = %endpoint, "linked to broker");
            state.broker = Some(endpoint);
        }
        let (mut socket, mut monitor) = (connected.socket, connected.monitor);
        match state.serve(&mut socket, &mut monitor, &stop).await {
            LinkEnd::Finished => break,
            LinkEnd::Lost(why) => {
                state.summary.reconnects += 1;
                tracing::warn!(
                    why,
                    outstanding = state.pending.len(),
                    "broker link lost, reconnecting"
                );
                drop(socket);
                // A pair's other broker is tried next.
                next += 1;
                if !backoff.pause(&stop).await {
                    break;
                }
            }
        }
    }
    deadline.abort();
    state.finish(started)
}

/// Connects to one of `endpoints`, starting at `next` (modulo their number) and moving on to
/// the next after each failed attempt; `next` is left at the one that connected. With one
/// endpoint this is [`link::connect`].
async fn connect_any(
    endpoints: &[String],
    next: &mut usize,
    policy: &link::Reconnect,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> Option<(link::Connected<DealerSocket>, String)> {
    if let [endpoint] = endpoints {
        let connected =
            link::connect(endpoint, policy, backoff, stop, DealerSocket::with_options).await?;
        return Some((connected, endpoint.clone()));
    }
    loop {
        *next %= endpoints.len().max(1);
        let endpoint = endpoints.get(*next)?;
        let mut options = zeromq::SocketOptions::default();
        options.connect_timeout(policy.connect_timeout);
        let mut socket = DealerSocket::with_options(options);
        let monitor = link::Monitor::new(socket.monitor());
        let attempt = tokio::select! {
            () = stop.cancelled() => return None,
            r = socket.connect(endpoint) => r,
        };
        match attempt {
            Ok(()) => {
                backoff.reset();
                let connected = link::Connected { socket, monitor };
                return Some((connected, endpoint.clone()));
            }
            Err(e) => {
                tracing::info!(broker = %endpoint, error = %e, "broker unreachable, trying the next");
                *next += 1;
            }
        }
        drop(socket);
        if !backoff.pause(stop).await {
            return None;
        }
    }
}
