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

/// Connects both sockets, after `delay`; `None` when stopped first.
async fn connect(
    config: PublisherConfig,
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
    let data = link::connect(
        &config.connect,
        &policy,
        &mut backoff,
        &stop,
        |mut options| {
            options.peer_identity(identity.clone());
            PubSocket::with_options(options)
        },
    )
    .await?;
    let listen = link::connect(
        &config.connect,
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
    })
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

    /// Makes the next update and sends it if there is a link.
    fn publish(&mut self, link: Option<&mut Link>) {
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
        let queued = link
            .is_some_and(|l| matches!(try_send(&mut l.data, update.to_message()), Sent::Queued));
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
                if msg.len() == 1 && msg.get(0).is_some_and(|f| f.first() == Some(&1)) {
                    // The data socket got the same subscription from the same XSUB broadcast;
                    // give its reader task a moment to apply it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return;
                }
            }
        }
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
    let mut connecting: Option<JoinHandle<Option<Link>>> = Some(tokio::spawn(connect(
        p.config.clone(),
        identity.clone(),
        Duration::ZERO,
        shutdown.clone(),
    )));
    let mut link: Option<Link> = None;
    let mut started: Option<Instant> = None;
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
            joined = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                let Ok(Some(mut new)) = joined else { break };
                if started.is_none() {
                    if let Some(within) = p.config.wait_subscriber {
                        await_subscription(&mut new, within, &shutdown).await;
                    }
                    started = Some(Instant::now());
                    on_ready(instance);
                }
                tracing::info!(proxy = %p.config.connect, "publisher connected");
                link = Some(new);
                None
            }
            _ = tick.tick(), if started.is_some() => {
                let due = p.due(started.expect("guarded"));
                while p.summary.sent < due {
                    p.publish(link.as_mut());
                }
                None
            }
            heard = async {
                let l = link.as_mut().expect("guarded");
                tokio::select! {
                    _ = l.data_monitor.disconnected() => None,
                    msg = l.listen.recv() => Some(msg.is_ok()),
                }
            }, if link.is_some() => match heard {
                None => Some("connection closed"),
                Some(ok) => {
                    if let Some(l) = link.as_mut().filter(|_| ok) {
                        l.liveness.heard();
                    }
                    None
                }
            },
            _ = check.tick() => {
                link.as_ref().filter(|l| l.liveness.is_expired()).map(|_| "proxy silent")
            }
        };
        if let Some(why) = lost {
            p.summary.reconnects += 1;
            tracing::warn!(why, "proxy lost, reconnecting");
            link = None;
            connecting = Some(tokio::spawn(connect(
                p.config.clone(),
                identity.clone(),
                p.config.reconnect.min,
                shutdown.clone(),
            )));
        }
    }
    if let Some(task) = connecting {
        task.abort();
    }
    if link.is_some() {
        // zmq.rs has no linger: let the PUB's queue reach the proxy.
        tokio::time::sleep(link::LINGER).await;
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
