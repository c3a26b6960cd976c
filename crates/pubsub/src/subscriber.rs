//! The weather subscriber: an XSUB (a SUB that can also send) on the proxy's XPUB, subscribed to
//! its zips and to the proxy's heartbeat topic.
//!
//! It averages the temperature per zip and accounts for every update by its sequence number
//! (see [`crate::tracker`]). A closed connection, or silence (no update, no heartbeat) for
//! `interval x liveness`, ends the link: the socket is dropped and a fresh one connects and
//! subscribes again (zmq.rs's own SUB reconnection backs off to 30 s and never hears a proxy
//! that restarted behind a partition). The proxy releases the old connection's subscriptions
//! when that connection ends, as libzmq's XPUB does; on a clean stop the subscriber
//! unsubscribes first.
//!
//! Given two proxies (a proxy pair), it keeps a link to each, in a task of its own that
//! connects, subscribes, watches the heartbeats and reconnects exactly as above, and hands what
//! it reads to the one loop that accounts for it. Every update then comes twice: the first copy
//! is delivered, the second (the other proxy's) is dropped and counted `redundant`
//! ([`crate::tracker`]), so the loss of either proxy costs nothing. With one proxy none of this
//! runs: the loop reads the socket itself, as before.

use std::collections::BTreeMap;
use std::time::Duration;

use common::frames;
use common::heartbeat::Heartbeat;
use common::heartbeat::Liveness;
use common::link::{self, Backoff, Reconnect};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, XSubSocket};

use crate::config::SubscriberConfig;
use crate::protocol::{Incoming, Update, Zip, HEARTBEAT_TOPIC};
use crate::tracker::{Seen, StreamSummary, Tracker};

/// Per zip, in the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ZipSummary {
    pub received: u64,
    pub avg_temperature: f64,
}

/// What the subscriber prints as JSON with `--json` (the last stdout line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriberSummary {
    /// Updates received, duplicates not counted.
    pub received: u64,
    /// Updates it can prove it missed (sequence numbers skipped), all streams together.
    pub gaps: u64,
    /// Updates it had skipped that came after a newer one (counted in `received`, not shown).
    #[serde(default)]
    pub late: u64,
    /// Updates received again (re-sent last values), not shown twice.
    pub duplicates: u64,
    /// Proxy pair: the copies that came through the other proxy after the first (dropped).
    #[serde(default)]
    pub redundant: u64,
    pub reconnects: u64,
    /// The longest time between two updates, from the first one on.
    pub longest_silence_ms: u64,
    /// From start to the first update (a late joiner with the last value cache: at once).
    pub first_update_ms: Option<u64>,
    pub heartbeats: u64,
    /// Messages that were neither an update nor a heartbeat.
    pub bad: u64,
    /// Different proxy instances heard (a restarted proxy is a new one).
    pub proxies: u64,
    pub elapsed_ms: u64,
    pub by_zip: BTreeMap<String, ZipSummary>,
    /// Per (publisher, zip): first and last sequence numbers, gaps, duplicates.
    pub streams: Vec<StreamSummary>,
    /// Updates received (duplicates not counted) per 100 ms since the start.
    #[serde(default)]
    pub timeline: common::timeline::Timeline,
    /// Proxy pair: per proxy, in `--connect` order (empty with one proxy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_proxy: Vec<ProxySummary>,
}

/// One proxy of a pair, as its subscriber saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxySummary {
    pub endpoint: String,
    /// Updates this proxy brought first (delivered).
    pub first: u64,
    /// Copies this proxy brought after the other (dropped).
    pub redundant: u64,
    /// Links to this proxy lost.
    pub reconnects: u64,
    /// Updates this proxy brought first, per 100 ms.
    pub timeline: common::timeline::Timeline,
}

enum LinkEnd {
    Lost(&'static str),
    Finished,
}

struct State {
    config: SubscriberConfig,
    started: Instant,
    tracker: Tracker,
    summary: SubscriberSummary,
    temperature_sums: BTreeMap<String, i64>,
    last_update: Option<Instant>,
    proxies: Vec<u64>,
}

impl State {
    fn done(&self) -> bool {
        self.config
            .count
            .is_some_and(|n| self.summary.received >= n)
    }

    fn on_update(&mut self, update: Update, link: usize, on_update: &mut dyn FnMut(&Update, f64)) {
        match self.tracker.on_update_via(&update, link) {
            Seen::New { .. } => {}
            Seen::Late => {
                self.summary.received += 1;
                return;
            }
            Seen::Duplicate => return,
            Seen::Redundant => {
                self.summary.redundant += 1;
                if let Some(p) = self.summary.by_proxy.get_mut(link) {
                    p.redundant += 1;
                }
                return;
            }
        }
        let now = Instant::now();
        if let Some(p) = self.summary.by_proxy.get_mut(link) {
            p.first += 1;
            p.timeline.record_at(now);
        }
        match self.last_update {
            Some(last) => {
                let silence = now.duration_since(last).as_millis() as u64;
                self.summary.longest_silence_ms = self.summary.longest_silence_ms.max(silence);
            }
            None => {
                self.summary.first_update_ms =
                    Some(now.duration_since(self.started).as_millis() as u64);
            }
        }
        self.last_update = Some(now);
        self.summary.received += 1;
        self.summary.timeline.record_at(now);
        let zip = update.zip.to_string();
        let sum = self.temperature_sums.entry(zip.clone()).or_default();
        *sum += i64::from(update.temperature);
        let entry = self.summary.by_zip.entry(zip).or_default();
        entry.received += 1;
        entry.avg_temperature = *sum as f64 / entry.received as f64;
        on_update(&update, entry.avg_temperature);
    }

    fn on_bad(&mut self, e: &dyn std::fmt::Display) {
        self.summary.bad += 1;
        if self.summary.bad.is_power_of_two() {
            tracing::warn!(error = %e, "unreadable message dropped");
        }
    }

    async fn serve(
        &mut self,
        socket: &mut XSubSocket,
        monitor: &mut link::Monitor,
        stop: &CancellationToken,
        on_ready: &mut dyn FnMut(),
        on_update: &mut dyn FnMut(&Update, f64),
    ) -> LinkEnd {
        for zip in &self.config.zips {
            if socket.subscribe(&zip.to_string()).await.is_err() {
                return LinkEnd::Lost("cannot subscribe");
            }
        }
        // Last: once a heartbeat arrives, the proxy has every zip subscription too.
        let heartbeat_topic = String::from_utf8_lossy(HEARTBEAT_TOPIC).into_owned();
        if socket.subscribe(&heartbeat_topic).await.is_err() {
            return LinkEnd::Lost("cannot subscribe");
        }
        let mut liveness = Liveness::new(self.config.heartbeat);
        let mut tick = interval(self.config.heartbeat.interval / 2);
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
                    liveness.heard();
                    match Incoming::parse(&msg.into_vec()) {
                        Ok(Incoming::Update(update)) => {
                            // A last value can come before the first heartbeat.
                            if self.summary.received == 0 && self.proxies.is_empty() {
                                on_ready();
                            }
                            self.on_update(update, 0, on_update);
                        }
                        Ok(Incoming::Heartbeat(instance)) => {
                            self.summary.heartbeats += 1;
                            if !self.proxies.contains(&instance) {
                                if self.proxies.is_empty() && self.summary.received == 0 {
                                    on_ready();
                                }
                                self.proxies.push(instance);
                                tracing::info!(proxy = format!("{instance:x}"), "hearing the proxy");
                            }
                        }
                        Err(e) => self.on_bad(&e),
                    }
                }
                _ = tick.tick() => {
                    if liveness.is_expired() {
                        return LinkEnd::Lost("proxy silent");
                    }
                }
            }
        }
    }
}

/// Receives until `count` updates, `duration`, or `shutdown`. `on_ready` runs once, when the
/// proxy is first heard (every subscription is in place) or a first (last-value) update comes; `on_update` for each new update,
/// with the running average temperature of its zip.
pub async fn run(
    config: SubscriberConfig,
    shutdown: CancellationToken,
    mut on_ready: impl FnMut() + Send,
    mut on_update: impl FnMut(&Update, f64) + Send,
) -> SubscriberSummary {
    let started = Instant::now();
    let stop = shutdown.child_token();
    let timer = config.duration.map(|d| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.cancel();
        })
    });
    let mut state = State {
        config,
        started,
        tracker: Tracker::default(),
        summary: SubscriberSummary {
            timeline: common::timeline::Timeline::start(),
            ..SubscriberSummary::default()
        },
        temperature_sums: BTreeMap::new(),
        last_update: None,
        proxies: Vec::new(),
    };
    if state.config.connect.len() > 1 {
        run_pair(&mut state, &stop, &mut on_ready, &mut on_update).await;
    } else {
        run_single(&mut state, &stop, &mut on_ready, &mut on_update).await;
    }
    if let Some(timer) = timer {
        timer.abort();
    }
    let mut s = state.summary;
    s.gaps = state.tracker.gaps();
    s.late = state.tracker.late();
    s.duplicates = state.tracker.duplicates();
    s.streams = state.tracker.summaries();
    s.proxies = state.proxies.len() as u64;
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    s
}

/// One proxy: the loop reads the socket itself.
async fn run_single(
    state: &mut State,
    stop: &CancellationToken,
    on_ready: &mut dyn FnMut(),
    on_update: &mut dyn FnMut(&Update, f64),
) {
    let mut backoff = Backoff::new(state.config.reconnect.min, state.config.reconnect.max);
    let endpoint = state.config.connect.first().cloned().unwrap_or_default();
    let policy = state.config.reconnect;
    while !state.done() && !stop.is_cancelled() {
        let Some(connected) = link::connect(
            &endpoint,
            &policy,
            &mut backoff,
            stop,
            XSubSocket::with_options,
        )
        .await
        else {
            break;
        };
        let (mut socket, mut monitor) = (connected.socket, connected.monitor);
        match state
            .serve(&mut socket, &mut monitor, stop, on_ready, on_update)
            .await
        {
            LinkEnd::Finished => {
                leave(&mut socket, &state.config.zips).await;
                break;
            }
            LinkEnd::Lost(why) => {
                state.summary.reconnects += 1;
                tracing::warn!(why, "proxy link lost, reconnecting");
                drop(socket);
                if !backoff.pause(stop).await {
                    break;
                }
            }
        }
    }
}

/// What a pair's link task hands to the loop.
enum LinkEvent {
    Incoming(usize, Incoming),
    Bad(String),
    Lost(usize),
}

/// Messages read ahead by a link task, at most, while the loop is busy.
const PAIR_QUEUE: usize = 1024;

/// A proxy pair: a task per proxy reads its link; this loop accounts for what they bring.
async fn run_pair(
    state: &mut State,
    stop: &CancellationToken,
    on_ready: &mut dyn FnMut(),
    on_update: &mut dyn FnMut(&Update, f64),
) {
    let endpoints = state.config.connect.clone();
    state.summary.by_proxy = endpoints
        .iter()
        .map(|e| ProxySummary {
            endpoint: e.clone(),
            timeline: common::timeline::Timeline::start(),
            ..ProxySummary::default()
        })
        .collect();
    let (tx, mut rx) = mpsc::channel(PAIR_QUEUE);
    let links_stop = stop.child_token();
    let tasks: Vec<_> = endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            tokio::spawn(pair_link(
                i,
                endpoint.clone(),
                state.config.zips.clone(),
                state.config.heartbeat,
                state.config.reconnect,
                tx.clone(),
                links_stop.clone(),
            ))
        })
        .collect();
    drop(tx);
    // Ready once every proxy is heard, or an expiry after the first one was (a proxy of the
    // pair may be down: the other serves alone).
    let mut heard = vec![false; endpoints.len()];
    let mut ready = false;
    let mut ready_by: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    while !state.done() {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(ready_by.unwrap_or(far)), if !ready && ready_by.is_some() => {
                ready = true;
                on_ready();
                continue;
            }
            event = rx.recv() => event,
        };
        let Some(event) = event else { break };
        let link = match event {
            LinkEvent::Incoming(link, Incoming::Update(update)) => {
                state.on_update(update, link, on_update);
                link
            }
            LinkEvent::Incoming(link, Incoming::Heartbeat(instance)) => {
                state.summary.heartbeats += 1;
                if !state.proxies.contains(&instance) {
                    state.proxies.push(instance);
                    tracing::info!(proxy = format!("{instance:x}"), link, "hearing a proxy");
                }
                link
            }
            LinkEvent::Bad(e) => {
                state.on_bad(&e);
                continue;
            }
            LinkEvent::Lost(link) => {
                state.summary.reconnects += 1;
                state.summary.by_proxy[link].reconnects += 1;
                continue;
            }
        };
        if !ready && !heard[link] {
            heard[link] = true;
            ready_by.get_or_insert(Instant::now() + state.config.heartbeat.expiry());
            if heard.iter().all(|h| *h) {
                ready = true;
                on_ready();
            }
        }
    }
    links_stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}

/// One proxy of a pair: connects, subscribes, reads, and reconnects when the link is lost
/// (closed, or silent for the expiry), until `stop`; then unsubscribes.
async fn pair_link(
    link: usize,
    endpoint: String,
    zips: Vec<Zip>,
    heartbeat: Heartbeat,
    policy: Reconnect,
    tx: mpsc::Sender<LinkEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(policy.min, policy.max);
    while !stop.is_cancelled() {
        let Some(connected) = link::connect(
            &endpoint,
            &policy,
            &mut backoff,
            &stop,
            XSubSocket::with_options,
        )
        .await
        else {
            break;
        };
        let (mut socket, mut monitor) = (connected.socket, connected.monitor);
        match relay(
            link,
            &mut socket,
            &mut monitor,
            &zips,
            heartbeat,
            &tx,
            &stop,
        )
        .await
        {
            LinkEnd::Finished => {
                leave(&mut socket, &zips).await;
                break;
            }
            LinkEnd::Lost(why) => {
                tracing::warn!(why, proxy = %endpoint, "proxy link lost, reconnecting");
                if tx.send(LinkEvent::Lost(link)).await.is_err() {
                    break;
                }
                drop(socket);
                if !backoff.pause(&stop).await {
                    break;
                }
            }
        }
    }
}

/// Subscribes on one link of a pair and hands what it reads to the loop, until the link is
/// lost or `stop`.
async fn relay(
    link: usize,
    socket: &mut XSubSocket,
    monitor: &mut link::Monitor,
    zips: &[Zip],
    heartbeat: Heartbeat,
    tx: &mpsc::Sender<LinkEvent>,
    stop: &CancellationToken,
) -> LinkEnd {
    for zip in zips {
        if socket.subscribe(&zip.to_string()).await.is_err() {
            return LinkEnd::Lost("cannot subscribe");
        }
    }
    let heartbeat_topic = String::from_utf8_lossy(HEARTBEAT_TOPIC).into_owned();
    if socket.subscribe(&heartbeat_topic).await.is_err() {
        return LinkEnd::Lost("cannot subscribe");
    }
    let mut liveness = Liveness::new(heartbeat);
    let mut tick = interval(heartbeat.interval / 2);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return LinkEnd::Finished,
            _ = monitor.disconnected() => return LinkEnd::Lost("connection closed"),
            msg = socket.recv() => {
                let Ok(msg) = msg else { return LinkEnd::Lost("receive failed") };
                liveness.heard();
                match Incoming::parse(&msg.into_vec()) {
                    Ok(incoming) => LinkEvent::Incoming(link, incoming),
                    Err(e) => LinkEvent::Bad(e.to_string()),
                }
            }
            _ = tick.tick() => {
                if liveness.is_expired() {
                    return LinkEnd::Lost("proxy silent");
                }
                continue;
            }
        };
        tokio::select! {
            () = stop.cancelled() => return LinkEnd::Finished,
            sent = tx.send(event) => if sent.is_err() { return LinkEnd::Finished },
        }
    }
}

/// Unsubscribes everything so the proxy's counts drop, and lets that leave (bounded).
async fn leave(socket: &mut XSubSocket, zips: &[Zip]) {
    let topics = zips
        .iter()
        .map(|z| z.to_string())
        .chain([String::from_utf8_lossy(HEARTBEAT_TOPIC).into_owned()]);
    let unsubscribe = async {
        for topic in topics {
            if let Err(e) = socket.unsubscribe(&topic).await {
                tracing::debug!(topic = %frames::show(topic.as_bytes()), error = %e, "unsubscribe failed");
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), unsubscribe).await;
    tokio::time::sleep(link::LINGER).await;
}
