//! The echo worker: a DEALER connected to the broker's backend, speaking RFC 6.
//!
//! It announces `capacity` READY credits, heartbeats every interval, and takes the broker for
//! dead after `interval x liveness` of silence or a closed connection; then it builds a new
//! socket, reconnects with backoff and announces itself again. Requests in hand when the link
//! drops are still answered, on the new link. On shutdown it says DISCONNECT, so the broker
//! sends it nothing more, and answers what it holds.

use bytes::Bytes;
use common::frames;
use common::heartbeat::Liveness;
use common::link::{self, Backoff};
use common::send::try_send;
use tokio::task::JoinSet;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, Socket, SocketRecv, ZmqMessage};

use crate::config::WorkerConfig;
use crate::protocol::{DISCONNECT, HEARTBEAT, READY};

/// Counters a worker reports when it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerStats {
    pub served: u64,
    pub reconnects: u64,
}

enum LinkEnd {
    Lost(&'static str),
    Shutdown,
}

/// Serves until `shutdown` fires, then finishes the requests in hand (bounded by `drain`).
/// `on_ready` runs each time the worker has (re)connected and announced its credits.
///
/// Given several brokers (a pair's), it serves each on a link of its own, with its READY
/// credits and its own requests in hand: the backup of a pair knows the worker before it
/// takes over, and only the active one sends it requests.
pub async fn run(
    config: WorkerConfig,
    shutdown: CancellationToken,
    on_ready: impl FnMut() + Send,
) -> WorkerStats {
    let on_ready = std::sync::Mutex::new(on_ready);
    let ready = || {
        if let Ok(mut f) = on_ready.lock() {
            f();
        }
    };
    let links = config
        .connect
        .iter()
        .map(|endpoint| run_link(&config, endpoint, &shutdown, &ready));
    let all = futures::future::join_all(links).await;
    let stats = all.iter().fold(WorkerStats::default(), |a, s| WorkerStats {
        served: a.served + s.served,
        reconnects: a.reconnects + s.reconnects,
    });
    tracing::info!(worker = %config.name, served = stats.served, reconnects = stats.reconnects, "worker stopped");
    stats
}

/// One broker's link, until `shutdown`.
async fn run_link(
    config: &WorkerConfig,
    endpoint: &str,
    shutdown: &CancellationToken,
    on_ready: &(dyn Fn() + Sync),
) -> WorkerStats {
    let mut stats = WorkerStats::default();
    let mut jobs: JoinSet<Vec<Bytes>> = JoinSet::new();
    let mut backoff = Backoff::new(config.reconnect.min, config.reconnect.max);
    loop {
        let Some(connected) = link::connect(
            endpoint,
            &config.reconnect,
            &mut backoff,
            shutdown,
            DealerSocket::with_options,
        )
        .await
        else {
            break;
        };
        let mut socket = connected.socket;
        let mut monitor = connected.monitor;
        match serve(
            config,
            endpoint,
            &mut socket,
            &mut monitor,
            &mut jobs,
            &mut stats,
            shutdown,
            on_ready,
        )
        .await
        {
            LinkEnd::Shutdown => {
                finish(config, &mut socket, &mut jobs, &mut stats).await;
                break;
            }
            LinkEnd::Lost(why) => {
                stats.reconnects += 1;
                tracing::warn!(worker = %config.name, broker = endpoint, why, "broker lost, reconnecting");
                drop(socket);
                if !backoff.pause(shutdown).await {
                    break;
                }
            }
        }
    }
    stats
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &WorkerConfig,
    endpoint: &str,
    socket: &mut DealerSocket,
    monitor: &mut link::Monitor,
    jobs: &mut JoinSet<Vec<Bytes>>,
    stats: &mut WorkerStats,
    shutdown: &CancellationToken,
    on_ready: &(dyn Fn() + Sync),
) -> LinkEnd {
    for _ in 0..config.capacity {
        if !send(socket, ZmqMessage::from(Bytes::from_static(READY))) {
            return LinkEnd::Lost("cannot send READY");
        }
    }
    tracing::info!(worker = %config.name, broker = endpoint, capacity = config.capacity, "worker ready");
    on_ready();
    let mut liveness = Liveness::new(config.heartbeat);
    let mut tick = interval(config.heartbeat.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return LinkEnd::Shutdown,
            _ = monitor.disconnected() => return LinkEnd::Lost("connection closed"),
            msg = socket.recv() => {
                let Ok(msg) = msg else { return LinkEnd::Lost("receive failed") };
                liveness.heard();
                let Some(reply) = take_request(config, msg, jobs) else { continue };
                // No simulated work: answer at once (a timer would round up to 1 ms).
                if !send(socket, frames::message_of(reply)) {
                    return LinkEnd::Lost("cannot send reply");
                }
                stats.served += 1;
            }
            Some(done) = jobs.join_next() => {
                let Ok(reply) = done else { continue };
                if !send(socket, frames::message_of(reply)) {
                    return LinkEnd::Lost("cannot send reply");
                }
                stats.served += 1;
            }
            _ = tick.tick() => {
                if liveness.is_expired() {
                    return LinkEnd::Lost("broker silent");
                }
                if !send(socket, ZmqMessage::from(Bytes::from_static(HEARTBEAT))) {
                    return LinkEnd::Lost("cannot send heartbeat");
                }
            }
        }
    }
}

/// Sends without waiting: a broker that stopped reading is as good as gone.
fn send(socket: &mut DealerSocket, msg: ZmqMessage) -> bool {
    try_send(socket, msg).is_queued()
}

/// Takes a request from the broker: with simulated work it becomes a job and `None` is
/// returned; without, the reply to send at once. Heartbeats and junk give `None`.
fn take_request(
    config: &WorkerConfig,
    msg: ZmqMessage,
    jobs: &mut JoinSet<Vec<Bytes>>,
) -> Option<Vec<Bytes>> {
    let mut frames = msg.into_vec();
    if frames.len() == 1 && frames[0].as_ref() == HEARTBEAT {
        return None;
    }
    if frames.len() < 3 || !frames[1].is_empty() {
        tracing::warn!(first = %frames.first().map(|f| frames::show(f)).unwrap_or_default(), "unexpected message from broker dropped");
        return None;
    }
    frames.push(Bytes::from(config.name.clone()));
    if config.work.is_zero() {
        return Some(frames);
    }
    let work = config.work;
    jobs.spawn(async move {
        tokio::time::sleep(work).await;
        frames
    });
    None
}

/// Says DISCONNECT, then answers the requests in hand, for at most `drain`, heartbeating
/// meanwhile so that the broker does not purge us and give our requests to someone else.
/// A request the broker sent before it read our DISCONNECT is in hand too, and answered.
async fn finish(
    config: &WorkerConfig,
    socket: &mut DealerSocket,
    jobs: &mut JoinSet<Vec<Bytes>>,
    stats: &mut WorkerStats,
) {
    send(socket, ZmqMessage::from(Bytes::from_static(DISCONNECT)));
    let until = Instant::now() + config.drain;
    let mut tick = interval(config.heartbeat.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while !jobs.is_empty() {
        tokio::select! {
            () = tokio::time::sleep_until(until) => break,
            done = jobs.join_next() => {
                let Some(Ok(reply)) = done else { continue };
                if send(socket, frames::message_of(reply)) {
                    stats.served += 1;
                }
            }
            _ = tick.tick() => {
                send(socket, ZmqMessage::from(Bytes::from_static(HEARTBEAT)));
            }
            msg = socket.recv() => {
                let Ok(msg) = msg else { break };
                if let Some(reply) = take_request(config, msg, jobs) {
                    if send(socket, frames::message_of(reply)) {
                        stats.served += 1;
                    }
                }
            }
        }
    }
    jobs.abort_all();
    tokio::time::sleep(link::LINGER).await;
}
