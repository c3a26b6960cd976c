//! A broker pair (the Guide's Binary Star): a primary and a backup that watch each other, so
//! that the shared queue outlives the loss of either. docs/pairs.md has the topology, the
//! rules with their cases, and the figures.
//!
//! Each broker of a pair is in one of four states: `primary` or `backup` (just started, not
//! serving), `active` (serving clients) or `passive` (dropping clients' requests). They tell
//! each other their state and *term* every heartbeat interval over one peer link (the backup's
//! DEALER connected to the primary's peer ROUTER, our own; either side may bind). The rules,
//! in [`Fsm`]:
//!
//! 1. At start the primary becomes active when it hears the backup (starting or passive); the
//!    backup becomes passive when it hears an active peer. A starting broker never serves on
//!    hearing a client alone, except the primary once it has heard no peer for a whole
//!    expiry since its start (it runs alone). A starting backup never serves: it must first
//!    have seen an active primary (Guide: the backup cannot become active on its own).
//! 2. A passive broker becomes active on a client's request only if its peer is *silent*:
//!    nothing heard for `heartbeat x liveness`, or the peer link closed and not heard since.
//!    Both conditions at once, peer silent AND a client at its door, is the Binary Star rule:
//!    two brokers cut off from each other but not from the clients do not both serve, since
//!    the clients stay with the active one and never come to the passive one.
//! 3. A passive broker becomes active when its peer restarts (heard starting): the service
//!    stays where the clients went; the returning broker goes passive. A returning broker
//!    never takes the service back by itself.
//! 4. Each activation takes a term one above any term known; two active brokers that hear
//!    each other (a partition healed) keep the one with the higher term (the one clients came
//!    to last), the primary on a tie; the other yields: passive, its queued requests dropped
//!    (their clients re-send them to the active one).
//!
//! The broker checks its state on a client's request only while it is not active: an active
//! broker's per-message path has one `bool` test more, nothing else.

use std::time::Duration;

use bytes::Bytes;
use common::heartbeat::Heartbeat;
use common::link::{self, Backoff, Reconnect};
use common::send::try_send;
use common::wire::router::{Event, Router};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, Socket, SocketRecv, ZmqMessage};

/// Which broker of the pair this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Self::Primary),
            "backup" => Ok(Self::Backup),
            _ => Err(format!("{s:?}: primary or backup")),
        }
    }
}

/// A broker's state in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The primary, started, not yet serving.
    Primary,
    /// The backup, started, not yet serving.
    Backup,
    /// Serving clients.
    Active,
    /// Dropping clients' requests; takes over when the peer is silent and clients come.
    Passive,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
            Self::Active => "active",
            Self::Passive => "passive",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "primary" => Self::Primary,
            "backup" => Self::Backup,
            "active" => Self::Active,
            "passive" => Self::Passive,
            _ => return None,
        })
    }
}

/// What a pair's broker is told (the flags `--pair`, `--peer-bind`, `--peer-connect`).
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub role: Role,
    /// Where this broker binds its peer ROUTER (the other connects here).
    pub bind: Option<String>,
    /// Where this broker connects its peer DEALER (the other's `bind`).
    pub connect: Option<String>,
}

/// One message on the peer link: `BSTAR <role> <state> <term>`, one frame.
fn encode(role: Role, state: State, term: u64) -> Bytes {
    let role = match role {
        Role::Primary => "primary",
        Role::Backup => "backup",
    };
    Bytes::from(format!("BSTAR {role} {} {term}", state.as_str()))
}

fn decode(frame: &[u8]) -> Option<(State, u64)> {
    let text = std::str::from_utf8(frame).ok()?;
    let mut words = text.split(' ');
    (words.next()? == "BSTAR").then_some(())?;
    let _role = words.next()?;
    let state = State::parse(words.next()?)?;
    let term = words.next()?.parse().ok()?;
    Some((state, term))
}

/// What the peer link tells the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer said its state and term.
    Heard(State, u64),
    /// The peer's connection closed (it exited, or the kernel gave up on it).
    Lost,
}

/// The pair's rules (module doc), without sockets or clocks of its own: every call takes
/// `now`.
#[derive(Debug, Clone)]
pub struct Fsm {
    role: Role,
    state: State,
    term: u64,
    expiry: Duration,
    started: Instant,
    /// When the peer was last heard.
    heard: Option<Instant>,
    /// The peer's link closed after it was last heard.
    lost: bool,
    /// What the peer last said.
    peer: Option<(State, u64)>,
}

impl Fsm {
    pub fn new(role: Role, expiry: Duration, now: Instant) -> Self {
        Self {
            role,
            state: match role {
                Role::Primary => State::Primary,
                Role::Backup => State::Backup,
            },
            term: 0,
            expiry,
            started: now,
            heard: None,
            lost: false,
            peer: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// The peer's last word, if any.
    pub fn peer(&self) -> Option<(State, u64)> {
        self.peer
    }

    /// Nothing heard from the peer for an expiry (since the start, if never), or its link
    /// closed since it was last heard.
    pub fn peer_silent(&self, now: Instant) -> bool {
        match self.heard {
            None => now.duration_since(self.started) >= self.expiry,
            Some(at) => self.lost || now.duration_since(at) >= self.expiry,
        }
    }

    fn activate(&mut self) {
        let peer_term = self.peer.map_or(0, |(_, t)| t);
        self.term = self.term.max(peer_term) + 1;
        self.state = State::Active;
    }

    fn become_passive(&mut self, peer_term: u64) {
        self.term = self.term.max(peer_term);
        self.state = State::Passive;
    }

    /// The peer said `state` at `term`.
    pub fn on_peer(&mut self, state: State, term: u64, now: Instant) {
        self.heard = Some(now);
        self.lost = false;
        self.peer = Some((state, term));
        match (self.state, state) {
            // Rule 1: the pair starts with the primary active.
            (State::Primary, State::Backup | State::Passive) => self.activate(),
            (State::Primary | State::Backup, State::Active) => self.become_passive(term),
            // Rule 4: two active brokers; the higher term stays, the primary on a tie.
            (State::Active, State::Active) => {
                let peer_wins =
                    term > self.term || (term == self.term && self.role == Role::Backup);
                if peer_wins {
                    self.become_passive(term);
                }
            }
            // Rule 3: the peer restarted; the service stays here, where the clients are.
            (State::Passive, State::Primary | State::Backup) => self.activate(),
            // Neither serves: the primary takes it.
            (State::Passive, State::Passive) if self.role == Role::Primary => self.activate(),
            (State::Passive, State::Active) => self.term = self.term.max(term),
            _ => {}
        }
    }

    /// The peer's link closed.
    pub fn on_peer_lost(&mut self) {
        if self.heard.is_some() {
            self.lost = true;
        }
    }

    /// A client's request arrived: whether to serve it (rule 2; an active broker always does).
    pub fn on_client_request(&mut self, now: Instant) -> bool {
        match self.state {
            State::Active => true,
            State::Backup => false,
            State::Primary | State::Passive => {
                if self.peer_silent(now) {
                    self.activate();
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// The broker's end of the peer link: what the peer says, and where to publish our state.
#[derive(Debug)]
pub struct PeerLink {
    /// The bound peer endpoint (port 0 resolved), if this broker binds.
    pub endpoint: Option<String>,
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
    pub ours: watch::Sender<(State, u64)>,
}

/// Limits of the peer ROUTER: a state line is a few dozen bytes.
const PEER_LIMITS: common::wire::limits::Limits = common::wire::limits::Limits {
    max_message_bytes: 1024,
    max_frames: 4,
    max_peer_bytes: 64 << 10,
};

/// Binds (or connects) the peer link and spawns its task, which says our state every
/// heartbeat interval and at once when it changes, and reports what the peer says.
pub fn spawn(
    config: &PairConfig,
    heartbeat: Heartbeat,
    first: (State, u64),
    shutdown: CancellationToken,
) -> Result<PeerLink, crate::BrokerError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (ours, ours_rx) = watch::channel(first);
    let role = config.role;
    let mut endpoint = None;
    if let Some(bind) = &config.bind {
        let keepalive = heartbeat.interval.max(Duration::from_secs(1));
        let listener = common::endpoint::bind_keepalive(bind, keepalive)?;
        let router = Router::serve(listener, PEER_LIMITS, 8).map_err(|source| {
            crate::BrokerError::Serve {
                endpoint: bind.clone(),
                source,
            }
        })?;
        endpoint = Some(router.endpoint.clone());
        tokio::spawn(serve_bound(
            router,
            role,
            heartbeat,
            ours_rx.clone(),
            events_tx.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(connect) = &config.connect {
        tokio::spawn(serve_connected(
            connect.clone(),
            role,
            heartbeat,
            ours_rx,
            events_tx,
            shutdown,
        ));
    }
    Ok(PeerLink {
        endpoint,
        events,
        ours,
    })
}

/// The bound side: the peer is whoever last spoke on the ROUTER; our state goes to it.
async fn serve_bound(
    mut router: Router,
    role: Role,
    heartbeat: Heartbeat,
    mut ours: watch::Receiver<(State, u64)>,
    events: mpsc::UnboundedSender<PeerEvent>,
    shutdown: CancellationToken,
) {
    let mut peer: Option<Bytes> = None;
    let mut tick = interval(heartbeat.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let say = tokio::select! {
            () = shutdown.cancelled() => return,
            event = router.recv() => match event {
                Event::Message(msg) => {
                    let frames = msg.into_vec();
                    let Some(heard) = frames.get(1).and_then(|f| decode(f)) else { continue };
                    let fresh = peer.as_ref() != frames.first();
                    peer = frames.first().cloned();
                    if events.send(PeerEvent::Heard(heard.0, heard.1)).is_err() {
                        return;
                    }
                    // A new connection hears our state at once.
                    fresh
                }
                Event::Gone(id) => {
                    if peer.as_ref() == Some(&id) {
                        peer = None;
                        if events.send(PeerEvent::Lost).is_err() {
                            return;
                        }
                    }
                    false
                }
            },
            _ = tick.tick() => true,
            changed = ours.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
        };
        if let (true, Some(id)) = (say, &peer) {
            let (state, term) = *ours.borrow();
            let _ = router.send_to(id, [encode(role, state, term)].iter());
        }
    }
}

/// The connecting side: a DEALER to the peer's ROUTER, a new one after a closed connection or
/// an expiry of silence.
async fn serve_connected(
    endpoint: String,
    role: Role,
    heartbeat: Heartbeat,
    mut ours: watch::Receiver<(State, u64)>,
    events: mpsc::UnboundedSender<PeerEvent>,
    shutdown: CancellationToken,
) {
    let policy = Reconnect::default();
    let mut backoff = Backoff::new(policy.min, policy.max);
    loop {
        let Some(connected) = link::connect(
            &endpoint,
            &policy,
            &mut backoff,
            &shutdown,
            DealerSocket::with_options,
        )
        .await
        else {
            return;
        };
        let (mut socket, mut monitor) = (connected.socket, connected.monitor);
        let mut heard = Instant::now();
        let mut tick = interval(heartbeat.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let lost = loop {
            let say = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = monitor.disconnected() => break "connection closed",
                msg = socket.recv() => {
                    let Ok(msg) = msg else { break "receive failed" };
                    if let Some((state, term)) = msg.get(0).and_then(|f| decode(f)) {
                        heard = Instant::now();
                        if events.send(PeerEvent::Heard(state, term)).is_err() {
                            return;
                        }
                    }
                    false
                }
                _ = tick.tick() => {
                    if heard.elapsed() > heartbeat.expiry() {
                        break "peer silent";
                    }
                    true
                }
                changed = ours.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
            };
            if say {
                let (state, term) = *ours.borrow();
                let msg = ZmqMessage::from(encode(role, state, term));
                if !try_send(&mut socket, msg).is_queued() {
                    break "send failed";
                }
            }
        };
        tracing::debug!(peer = %endpoint, why = lost, "peer link lost, reconnecting");
        if lost == "connection closed" && events.send(PeerEvent::Lost).is_err() {
            return;
        }
        drop(socket);
        if !backoff.pause(&shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(3);

    fn pair(now: Instant) -> (Fsm, Fsm) {
        (
            Fsm::new(Role::Primary, EXPIRY, now),
            Fsm::new(Role::Backup, EXPIRY, now),
        )
    }

    /// Each hears the other's current state, as the link carries it.
    fn exchange(a: &mut Fsm, b: &mut Fsm, now: Instant) {
        let (sa, ta) = (a.state(), a.term());
        b.on_peer(sa, ta, now);
        let (sb, tb) = (b.state(), b.term());
        a.on_peer(sb, tb, now);
    }

    fn started(now: Instant) -> (Fsm, Fsm) {
        let (mut p, mut b) = pair(now);
        exchange(&mut p, &mut b, now);
        exchange(&mut p, &mut b, now);
        (p, b)
    }

    #[test]
    fn messages_round_trip() {
        let frame = encode(Role::Backup, State::Passive, 7);
        assert_eq!(decode(&frame), Some((State::Passive, 7)));
        assert_eq!(decode(b"BSTAR backup lost 1"), None);
        assert_eq!(decode(b"HELLO"), None);
    }

    #[test]
    fn the_pair_starts_with_the_primary_active() {
        let now = Instant::now();
        let (p, b) = started(now);
        assert_eq!((p.state(), b.state()), (State::Active, State::Passive));
        assert_eq!((p.term(), b.term()), (1, 1));
    }

    #[test]
    fn a_starting_broker_does_not_serve_a_client_before_it_knows() {
        let now = Instant::now();
        let (mut p, mut b) = pair(now);
        assert!(!p.on_client_request(now));
        assert!(!b.on_client_request(now + EXPIRY * 10));
        // The primary alone, after an expiry without a peer, serves.
        assert!(p.on_client_request(now + EXPIRY));
        assert_eq!(p.state(), State::Active);
    }

    #[test]
    fn primary_killed_the_backup_takes_over_when_clients_come() {
        let now = Instant::now();
        let (_, mut b) = started(now);
        let t = now + Duration::from_millis(500);
        assert!(!b.on_client_request(t), "primary alive: the backup refuses");
        b.on_peer_lost();
        assert!(
            b.on_client_request(t),
            "primary's link closed: the backup serves"
        );
        assert_eq!((b.state(), b.term()), (State::Active, 2));
    }

    #[test]
    fn the_backup_needs_silence_not_only_clients() {
        let now = Instant::now();
        let (_, mut b) = started(now);
        assert!(!b.on_client_request(now + EXPIRY - Duration::from_millis(1)));
        assert!(b.on_client_request(now + EXPIRY));
    }

    #[test]
    fn cut_off_from_each_other_but_not_from_clients_only_the_primary_serves() {
        let now = Instant::now();
        let (mut p, b) = started(now);
        // No word for a long time; clients stay with the primary, none come to the backup.
        let later = now + EXPIRY * 20;
        assert!(p.on_client_request(later));
        assert_eq!(b.state(), State::Passive);
        assert!(b.peer_silent(later));
    }

    #[test]
    fn partition_healed_the_returning_primary_yields() {
        let now = Instant::now();
        let (mut p, mut b) = started(now);
        // The primary is cut off from everyone; clients come to the backup after the expiry.
        let t = now + EXPIRY;
        assert!(b.on_client_request(t));
        assert_eq!((b.state(), b.term()), (State::Active, 2));
        assert_eq!(p.state(), State::Active, "the primary knows nothing yet");
        // Healed: each hears the other active.
        exchange(&mut p, &mut b, t + EXPIRY);
        assert_eq!((p.state(), b.state()), (State::Passive, State::Active));
        assert_eq!(p.term(), 2);
        // And the primary refuses clients from now on.
        assert!(!p.on_client_request(t + EXPIRY));
    }

    #[test]
    fn a_restarted_primary_goes_passive() {
        let now = Instant::now();
        let (_, mut b) = started(now);
        b.on_peer_lost();
        assert!(b.on_client_request(now));
        let mut p = Fsm::new(Role::Primary, EXPIRY, now);
        exchange(&mut b, &mut p, now);
        assert_eq!((p.state(), b.state()), (State::Passive, State::Active));
        assert!(!p.on_client_request(now + Duration::from_millis(10)));
    }

    #[test]
    fn a_restarted_peer_of_a_passive_broker_leaves_the_service_with_it() {
        let now = Instant::now();
        let (_, mut b) = started(now);
        // The primary crashed and came back before any client moved: the backup takes the
        // service, the restarted primary goes passive.
        let mut p = Fsm::new(Role::Primary, EXPIRY, now);
        b.on_peer(p.state(), p.term(), now);
        assert_eq!(b.state(), State::Active);
        p.on_peer(b.state(), b.term(), now);
        assert_eq!(p.state(), State::Passive);
    }

    #[test]
    fn backup_killed_the_primary_carries_on_and_the_new_backup_is_passive() {
        let now = Instant::now();
        let (mut p, _) = started(now);
        p.on_peer_lost();
        assert!(p.on_client_request(now));
        let mut b = Fsm::new(Role::Backup, EXPIRY, now);
        exchange(&mut p, &mut b, now);
        assert_eq!((p.state(), b.state()), (State::Active, State::Passive));
    }

    #[test]
    fn two_active_at_one_term_keep_the_primary() {
        let now = Instant::now();
        let (mut p, mut b) = pair(now);
        assert!(p.on_client_request(now + EXPIRY));
        b.on_peer(State::Primary, 0, now); // heard it starting, then nothing
        b.state = State::Active; // as though it had been active at term 1
        b.term = 1;
        exchange(&mut p, &mut b, now + EXPIRY);
        assert_eq!((p.state(), b.state()), (State::Active, State::Passive));
    }
}
