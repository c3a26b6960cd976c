//! A PUB socket, on our own ZMTP connections ([`super::server`]) instead of zmq.rs's
//! `PubSocket`: the pipeline master's control socket (heartbeats, `stop`).
//!
//! What stays as in a stock PUB: any SUB or XSUB peer (libzmq, pyzmq, zmq.rs); each peer's
//! subscriptions (`0x01` + prefix, cancelled by `0x00` + prefix, as ZMTP 3.0 peers send them)
//! kept per connection, and a message sent only to the connections with a prefix of its first
//! frame; a subscriber whose outbox is full misses the message (a stock PUB drops at its high
//! water mark). PING is answered with PONG. Every limit of [`super::server`] holds on every
//! endpoint, loopback included.
//!
//! A SUB never sends once subscribed, so it cannot learn of a cut made while it was
//! unreachable: the socket is served with `stall` (see [`Options::stall`]), and only a
//! subscriber that stopped reading is ever cut; one behind a partition keeps its connection,
//! which carries on when the link heals.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use foldhash::{HashMap, HashMapExt};
use tokio_util::sync::{CancellationToken, DropGuard};
use zeromq::ZmqMessage;

use crate::wire::limits::{GuardStats, Limits};
use crate::wire::server::{self, Options, Outbox, Server};

/// The socket types a PUB talks to.
const SUBSCRIBERS: &[&[u8]] = &[b"SUB", b"XSUB"];
/// Prefixes one connection may hold; beyond, new ones are ignored (a SUB has a handful).
const MAX_PREFIXES: usize = 1024;

#[derive(Debug)]
struct Subscriber {
    outbox: Arc<Outbox>,
    prefixes: Vec<Bytes>,
}

type Subscribers = Arc<Mutex<HashMap<u64, Subscriber>>>;

/// A bound PUB. Its connections' events are handled by a task of its own, so that publishing
/// never waits and subscriptions are in force as soon as they arrive.
#[derive(Debug)]
pub struct Pub {
    subscribers: Subscribers,
    stats: Arc<GuardStats>,
    limits: Limits,
    /// The endpoint peers connect to (port 0 resolved).
    pub endpoint: String,
    _stop: DropGuard,
}

impl Pub {
    /// Serves on `listener` (its socket options are inherited by the connections), with at most
    /// `max_connections` open at once; a subscriber whose writes make no progress for `stall`
    /// is cut only if it stopped reading (see [`Options::stall`]).
    pub fn serve(
        listener: std::net::TcpListener,
        limits: Limits,
        max_connections: usize,
        stall: Duration,
    ) -> std::io::Result<Self> {
        let options =
            Options::new("PUB", SUBSCRIBERS, limits, max_connections).with_stall(Some(stall));
        let server = Server::serve(listener, options)?;
        let endpoint = server.endpoint.clone();
        let stats = server.stats().clone();
        let subscribers: Subscribers = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        tokio::spawn(serve(server, subscribers.clone(), stop.clone()));
        Ok(Self {
            subscribers,
            stats,
            limits,
            endpoint,
            _stop: stop.drop_guard(),
        })
    }

    /// Connections refused, cut off as stalled, evicted and turned away.
    pub fn stats(&self) -> &Arc<GuardStats> {
        &self.stats
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.lock().expect("subscribers lock").len()
    }

    /// Sends `msg` to every subscriber with a prefix of its first frame; never waits. Returns
    /// how many it was queued for.
    pub fn publish(&self, msg: &ZmqMessage) -> usize {
        let topic = msg.get(0).map(|f| f.as_ref()).unwrap_or_default();
        let mut encoded = BytesMut::new();
        super::put_message(&mut encoded, msg.iter());
        let subscribers = self.subscribers.lock().expect("subscribers lock");
        subscribers
            .values()
            .filter(|s| s.prefixes.iter().any(|p| topic.starts_with(p)))
            .filter(|s| s.outbox.offer(&encoded, self.limits.max_peer_bytes))
            .count()
    }

    /// Waits, `linger` at most, until what the outboxes hold is written to the kernel.
    pub async fn flush(&self, linger: Duration) {
        let outboxes: Vec<Arc<Outbox>> = self
            .subscribers
            .lock()
            .expect("subscribers lock")
            .values()
            .map(|s| s.outbox.clone())
            .collect();
        server::flush(outboxes.iter(), linger).await;
    }
}

/// Takes the connections' events: joins, subscription changes, ends.
async fn serve(mut server: Server, subscribers: Subscribers, stop: CancellationToken) {
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = server.recv() => event,
        };
        let mut subscribers = subscribers.lock().expect("subscribers lock");
        match event {
            server::Event::Joined { serial, outbox, .. } => {
                subscribers.insert(
                    serial,
                    Subscriber {
                        outbox,
                        prefixes: Vec::new(),
                    },
                );
            }
            server::Event::Messages { serial, batch } => {
                let Some(subscriber) = subscribers.get_mut(&serial) else {
                    continue;
                };
                for msg in batch {
                    let Some(frame) = msg.get(0) else { continue };
                    match frame.first() {
                        Some(1) if subscriber.prefixes.len() < MAX_PREFIXES => {
                            subscriber.prefixes.push(frame.slice(1..));
                        }
                        Some(0) => {
                            // One cancel takes back one subscribe, as in libzmq.
                            if let Some(k) =
                                subscriber.prefixes.iter().position(|p| p[..] == frame[1..])
                            {
                                subscriber.prefixes.swap_remove(k);
                            }
                        }
                        _ => {}
                    }
                }
            }
            server::Event::Left { serial } => {
                subscribers.remove(&serial);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zeromq::{Socket, SocketRecv, SubSocket};

    use super::*;
    use crate::zmtp;

    /// A zmq.rs SUB of one prefix gets what matches it, and not the rest; nine bytes on
    /// loopback end only the attacker's connection.
    #[tokio::test(flavor = "current_thread")]
    async fn subscribers_get_what_they_subscribed_to() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let publisher =
            Pub::serve(listener, Limits::default(), 64, Duration::from_secs(2)).expect("serve");
        let endpoint = publisher.endpoint.clone();
        let attack = [zmtp::greeting(), zmtp::ready("SUB"), zmtp::huge_header()].concat();
        tokio::task::spawn_blocking(move || zmtp::send_raw(&endpoint, &attack))
            .await
            .expect("sent");
        let mut sub = SubSocket::new();
        sub.connect(&publisher.endpoint).await.expect("connect");
        sub.subscribe("hb").await.expect("subscribe");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let got = loop {
            assert!(tokio::time::Instant::now() < deadline, "nothing came");
            publisher.publish(&ZmqMessage::from("other"));
            publisher.publish(&ZmqMessage::from("hb 1"));
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
                break got.expect("recv");
            }
        };
        assert_eq!(got.get(0).map(|f| f.as_ref()), Some(&b"hb 1"[..]));
        assert_eq!(publisher.subscribers(), 1);
        assert!(publisher.stats().refused() >= 1, "the nine bytes");
    }
}
