//! The weather publisher: updates for its zips at a steady rate, into the proxy's XSUB.
//!
//! zmq.rs's PUB connects once and never again, and cannot hear anything from the proxy. So the
//! publisher keeps two connections to the XSUB: a PUB for the updates, whose monitor reports
//! at once that the proxy died, and an XPUB that only listens, for the proxy's heartbeats
//! (silence means a partition or a proxy restarted behind one). On either it drops both,
//! reconnects with backoff (`common::link`) and goes on. Updates keep being numbered while
//! there is no link, so subscribers count exactly what the outage cost them.
//!
//! The PUB sets `"<id> <instance>"` as its ZMTP identity, the same on every connection of this
//! run: when it connects again while the proxy still holds its older connection (a proxy that
//! hung, a link half-open), the proxy cuts the older one and discards what is left of it, so
//! nothing older than what it forwarded follows (see `common::wire::xsub`). The listening XPUB
//! sets none: it sends nothing.
//!
//! Given two proxies (a proxy pair), it keeps that pair of connections to each, lost and
//! made again each on its own, and sends every update, with its one number, into both: a
//! subscriber of both delivers the first copy and drops the second, so either proxy may die.

use std::collections::BTreeMap;
use std::time::Duration;

use common::heartbeat::Liveness;
use common::link::{self, Backoff, Monitor};
use common::send::{try_send, Sent};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::util::PeerIdentity;
use zeromq::{PubSocket, Socket, SocketRecv, XPubSocket};

use crate::config::PublisherConfig;
use crate::protocol::{Update, Zip};

/// What the publisher prints as JSON with `--json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublisherSummary {
    pub id: String,
    /// This run's instance (hex), as carried in every update.
    pub instance: String,
    /// Updates numbered (sent or not).
    pub sent: u64,
    /// Of those, updates made while there was no link to the proxy (lost by design).
    pub unsent: u64,
    pub reconnects: u64,
    /// Proxy pair: per proxy, in `--connect` order, updates it could not be sent (no link, or
    /// its queue full); empty with one proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsent_by_proxy: Vec<u64>,
    pub elapsed_ms: u64,
    /// Last sequence number per zip: subscribers' `last` should reach it.
    pub by_zip: BTreeMap<String, u64>,
}

/// The two connections to the proxy.
struct Link {
    data: PubSocket,
    data_monitor: Monitor,
    listen: XPubSocket,
    liveness: Liveness,
    /// A subscription reached the listener (so the data socket has it too).
    subscribed: bool,
}

/// A subscribe message (what the XSUB sends upstream).
fn is_subscribe(msg: &zeromq::ZmqMessage) -> bool {
    msg.len() == 1 && msg.get(0).is_some_and(|f| f.first() == Some(&1))
}

/// Most updates made in one turn of the loop (rate 0 or a late timer).
const BURST: u64 = 1000;

/// The data socket's ZMTP identity: `"<id> <instance>"` (the id cut to fit the 255 bytes
/// allowed).
fn identity(id: &str, instance: u64) -> PeerIdentity {
    let id = id.get(..200).unwrap_or(id);
    PeerIdentity::try_from(format!("{id} {instance:x}").into_bytes())
        .expect("1 to 255 bytes, not starting with 0")
}

/// Connects both sockets to `endpoint`, after `delay`; `None` when stopped first.
async fn connect(
    config: PublisherConfig,
    endpoint: String,
    identity: PeerIdentity,
    delay: Duration,
    stop: CancellationToken,
) -> Option<Link> {
    tokio::select! {
        () = stop.cancelled() => return None,
        () = tokio::time::sleep(delay) => {}
    }
    let policy = config.reconnect;
    let mut backoff = Backoff::new(policy.min, policy.max);
    // The data socket first: the XSUB sends it every subscription it holds as it connects,
    // before the listener exists, so a subscription the listener hears has been sent to the
    // data socket already.
    let data = link::connect(&endpoint, &policy, &mut backoff, &stop, |mut options| {
        options.peer_identity(identity.clone());
        PubSocket::with_options(options)
    })
    .await?;
    let listen = link::connect(
        &endpoint,
        &policy,
        &mut backoff,
        &stop,
        XPubSocket::with_options,
    )
    .await?;
    Some(Link {
        data: data.socket,
        data_monitor: data.monitor,
        listen: listen.socket,
        liveness: Liveness::new(config.heartbeat),
        subscribed: false,
    })
}

/// One proxy: its link, or the task making it.
struct Slot {
    endpoint: String,
    link: Option<Link>,
    connecting: Option<JoinHandle<Option<Link>>>,
    unsent: u64,
}

/// What happened on a slot.
enum SlotEvent {
    /// The connecting task ended (`None`: stopped, or failed).
    Connected(Option<Link>),
    /// The link closed.
    Lost(&'static str),
    /// Something read on the listener (`true`: a message).
    Heard(bool),
}

impl Slot {
    fn start_connecting(
        &mut self,
        config: &PublisherConfig,
        identity: &PeerIdentity,
        delay: Duration,
        stop: &CancellationToken,
    ) {
        self.link = None;
        self.connecting = Some(tokio::spawn(connect(
            config.clone(),
            self.endpoint.clone(),
            identity.clone(),
            delay,
            stop.clone(),
        )));
    }

    /// The next event of this slot (pending for ever when idle).
    async fn next(&mut self) -> SlotEvent {
        if let Some(task) = self.connecting.as_mut() {
            let joined = task.await;
            self.connecting = None;
            return SlotEvent::Connected(joined.ok().flatten());
        }
        let Some(l) = self.link.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = l.data_monitor.disconnected() => SlotEvent::Lost("connection closed"),
            msg = l.listen.recv() => {
                l.subscribed |= msg.as_ref().is_ok_and(is_subscribe);
                SlotEvent::Heard(msg.is_ok())
            }
        }
    }
}

/// The next event of any slot, and which.
async fn next_event(slots: &mut [Slot]) -> (usize, SlotEvent) {
    match slots {
        [only] => (0, only.next().await),
        [a, b] => tokio::select! {
            e = a.next() => (0, e),
            e = b.next() => (1, e),
        },
        _ => {
            let (i, e) = futures::future::select_all(
                slots
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| Box::pin(async move { (i, s.next().await) })),
            )
            .await
            .0;
            (i, e)
        }
    }
}

/// The state of one publisher run.
struct Publisher {
    config: PublisherConfig,
    instance: u64,
    seqs: BTreeMap<Zip, u64>,
    summary: PublisherSummary,
    rng: rand::rngs::ThreadRng,
}

impl Publisher {
    fn done(&self) -> bool {
        self.config.count.is_some_and(|n| self.summary.sent >= n)
    }

    /// Makes the next update and sends it into every link there is.
    fn publish(&mut self, slots: &mut [Slot]) {
        let zip = self.config.zips[(self.summary.sent % self.config.zips.len() as u64) as usize];
        let seq = self.seqs.entry(zip).or_default();
        *seq += 1;
        let update = Update {
            zip,
            publisher: self.config.id.clone(),
            instance: self.instance,
            seq: *seq,
            temperature: self.rng.gen_range(-80..135),
            humidity: self.rng.gen_range(10..60),
        };
        self.summary.sent += 1;
        let queued = if let [slot] = slots {
            slot.link
                .as_mut()
                .is_some_and(|l| matches!(try_send(&mut l.data, update.to_message()), Sent::Queued))
        } else {
            let message = update.to_message();
            let mut any = false;
            for slot in slots.iter_mut() {
                let queued = slot.link.as_mut().is_some_and(|l| {
                    matches!(try_send(&mut l.data, message.clone()), Sent::Queued)
                });
                if !queued {
                    slot.unsent += 1;
                }
                any |= queued;
            }
            any
        };
        if !queued {
            self.summary.unsent += 1;
        }
    }

    /// Updates due by now at the configured rate.
    fn due(&self, started: Instant) -> u64 {
        let due = if self.config.rate > 0.0 {
            (started.elapsed().as_secs_f64() * self.config.rate) as u64 + 1
        } else {
            self.summary.sent + BURST
        };
        let due = due.min(self.summary.sent + BURST);
        self.config.count.map_or(due, |n| due.min(n))
    }
}

/// Waits until a subscription reaches the listener, at most `within`.
async fn await_subscription(link: &mut Link, within: Duration, stop: &CancellationToken) {
    if link.subscribed {
        // Heard while the other proxy of a pair was still connecting; give the data socket's
        // reader task its moment all the same.
        tokio::time::sleep(Duration::from_millis(20)).await;
        return;
    }
    let until = Instant::now() + within;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(until) => {
                tracing::info!("no subscriber yet, publishing anyway");
                return;
            }
            msg = link.listen.recv() => {
                let Ok(msg) = msg else { continue };
                link.liveness.heard();
                if is_subscribe(&msg) {
                    link.subscribed = true;
                    // The data socket got the same subscription from the same XSUB broadcast;
                    // give its reader task a moment to apply it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return;
                }
            }
        }
    }
}

/// Before the first update: with `wait_subscriber`, waits until a subscription reaches each
/// proxy linked, all within that time.
async fn begin(slots: &mut [Slot], wait_subscriber: Option<Duration>, stop: &CancellationToken) {
    let Some(within) = wait_subscriber else {
        return;
    };
    let until = Instant::now() + within;
    for link in slots.iter_mut().filter_map(|s| s.link.as_mut()) {
        let left = until.saturating_duration_since(Instant::now());
        await_subscription(link, left, stop).await;
    }
}

/// Publishes until `count` updates are made or `shutdown` fires. `on_ready` runs once, the
/// first time the publisher is connected (and, with `wait_subscriber`, subscribed to).
pub async fn run(
    config: PublisherConfig,
    shutdown: CancellationToken,
    mut on_ready: impl FnMut(u64) + Send,
) -> PublisherSummary {
    let instance = rand::random::<u64>();
    let mut p = Publisher {
        summary: PublisherSummary {
            id: config.id.clone(),
            instance: format!("{instance:x}"),
            ..Default::default()
        },
        instance,
        seqs: BTreeMap::new(),
        rng: rand::thread_rng(),
        config,
    };
    let identity = identity(&p.config.id, instance);
    let mut slots: Vec<Slot> = p
        .config
        .connect
        .iter()
        .map(|endpoint| Slot {
            endpoint: endpoint.clone(),
            link: None,
            connecting: None,
            unsent: 0,
        })
        .collect();
    for slot in &mut slots {
        slot.start_connecting(&p.config, &identity, Duration::ZERO, &shutdown);
    }
    let mut started: Option<Instant> = None;
    let mut start_by: Option<Instant> = None;
    let period = if p.config.rate > 0.0 {
        Duration::from_secs_f64(1.0 / p.config.rate).max(Duration::from_millis(1))
    } else {
        Duration::from_millis(1)
    };
    let mut tick = interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut check = interval(p.config.heartbeat.interval / 2);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let run_started = Instant::now();
    while !p.done() {
        let lost = tokio::select! {
            () = shutdown.cancelled() => break,
            (i, event) = next_event(&mut slots) => match event {
                SlotEvent::Connected(None) => {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    // Failed (never with a retrying connect): try again.
                    Some((i, "connect failed"))
                }
                SlotEvent::Connected(Some(new)) => {
                    tracing::info!(proxy = %slots[i].endpoint, "publisher connected");
                    slots[i].link = Some(new);
                    if started.is_none() {
                        // A pair starts once linked to both, or an expiry after the first
                        // (the other may be down: the first serves alone meanwhile).
                        if slots.iter().all(|s| s.link.is_some()) {
                            begin(&mut slots, p.config.wait_subscriber, &shutdown).await;
                            started = Some(Instant::now());
                            on_ready(instance);
                        } else {
                            start_by.get_or_insert(Instant::now() + p.config.heartbeat.expiry());
                        }
                    }
                    None
                }
                SlotEvent::Lost(why) => Some((i, why)),
                SlotEvent::Heard(ok) => {
                    if let Some(l) = slots[i].link.as_mut().filter(|_| ok) {
                        l.liveness.heard();
                    }
                    None
                }
            },
            () = tokio::time::sleep_until(start_by.unwrap_or(run_started)), if started.is_none() && start_by.is_some() => {
                begin(&mut slots, p.config.wait_subscriber, &shutdown).await;
                started = Some(Instant::now());
                on_ready(instance);
                None
            }
            _ = tick.tick(), if started.is_some() => {
                let due = p.due(started.expect("guarded"));
                while p.summary.sent < due {
                    p.publish(&mut slots);
                }
                None
            }
            _ = check.tick() => {
                slots
                    .iter()
                    .position(|s| s.link.as_ref().is_some_and(|l| l.liveness.is_expired()))
                    .map(|i| (i, "proxy silent"))
            }
        };
        if let Some((i, why)) = lost {
            p.summary.reconnects += 1;
            tracing::warn!(why, proxy = %slots[i].endpoint, "proxy lost, reconnecting");
            slots[i].start_connecting(&p.config, &identity, p.config.reconnect.min, &shutdown);
        }
    }
    for slot in &mut slots {
        if let Some(task) = slot.connecting.take() {
            task.abort();
        }
    }
    if slots.iter().any(|s| s.link.is_some()) {
        // zmq.rs has no linger: let the PUB's queue reach the proxy.
        tokio::time::sleep(link::LINGER).await;
    }
    if slots.len() > 1 {
        p.summary.unsent_by_proxy = slots.iter().map(|s| s.unsent).collect();
    }
    p.summary.elapsed_ms = run_started.elapsed().as_millis() as u64;
    p.summary.by_zip = p.seqs.iter().map(|(z, s)| (z.to_string(), *s)).collect();
    tracing::info!(
        sent = p.summary.sent,
        unsent = p.summary.unsent,
        reconnects = p.summary.reconnects,
        "publisher stopped"
    );
    p.summary
}
