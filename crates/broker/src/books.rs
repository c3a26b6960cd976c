//! The broker's books, without sockets: which requests wait, which worker holds which, which
//! worker slots are free. `broker.rs` moves messages; this decides where they go, and is tested
//! against a plain model under random sequences of events.
//!
//! - Requests wait in a [`RequestQueue`] (per client, served in turn, bounded).
//! - Workers' free slots (READY credits) wait in a least-recently-used queue; only READY or a
//!   reply to a request the worker held gives one; a heartbeat gives none, except from a
//!   worker the books do not know (next).
//! - A worker first heard through a HEARTBEAT (an id never seen READY, or purged since) is
//!   registered with one credit, as though it had sent READY (RFC 6 workers hold one request at
//!   a time); its later heartbeats give nothing. A stock Paranoid Pirate worker (the Guide's
//!   ppworker) sends READY only when it opens a socket: when the broker restarts, libzmq
//!   reconnects that socket underneath and the worker sends only heartbeats (first those it
//!   queued while the broker was down), so it would sit idle until its own liveness ran out
//!   and it opened a new socket (issue 17, case 6: the first reply 2.2-2.5 s after the
//!   restart, 0.05 s with the Guide's queue; 0.09 s now). This is not the Guide queue's "any message is READY"
//!   (the trap `../shared/notes/protocols.md` warns of): that gives a credit for every
//!   message, so a worker heartbeating while busy is sent a second request; here a heartbeat
//!   gives one credit, once, and only to a worker the books hold nothing of (a purged
//!   worker's requests went back to the queue). Our own workers send their READYs first on
//!   every new connection, so they are registered with all their credits as before. A worker
//!   purged while it was alive (stopped, then resumed on its old connection) gets that one
//!   credit when it heartbeats again, even one of ours with more; if it is still busy with
//!   the request it was purged with, the new one waits behind it at the worker.
//! - Every request queued or held is *owned*: one that arrives again while owned and not yet
//!   answered is a retry and is merged, so no request is ever held twice or by two workers. An
//!   owned request has one entry, by key, that says where it is (queued, or held by a worker,
//!   which keeps it to re-queue): a request costs one lookup to record and a reply one to
//!   settle.
//! - Workers live in slots: the idle queue and the held requests point at them by number, and
//!   only a message from a worker looks its identity up.
//! - A purged worker's requests go back to the front of the queue. If the purged worker's reply
//!   comes after all while another worker holds the copy, that reply answers the client and the
//!   copy is marked *answered*: its own reply only frees its worker's slot, and it is dropped,
//!   not re-queued, if that worker is purged too. So no client gets two replies to one request.
//! - A reply answers a request only from a worker that held it: its holder, or one purged while
//!   holding it (kept, by routing id, with the request: at most the delivery limit of them). A
//!   reply from any other backend peer, to a request queued or held by someone else, is
//!   dropped (`stray_replies`): no peer can answer a request it was never given. (A worker of
//!   ours that reconnects gets a new routing id, so its late reply to a request held before is
//!   dropped too, and the copy's worker answers.)
//! - A request is a new request once its key is answered, even while a worker still holds the
//!   answered copy (a stock REQ sends "Hello" again, with the same key): it is not merged but
//!   *parked* in that entry, and queued (first in line: it was accepted already) as soon as the
//!   copy's worker frees the key, by its stale reply or by being purged; then it runs on
//!   whichever worker comes. Its own retries while parked are merged. (It cannot run beside the
//!   copy: the two would have one key, and a reply could not tell which it answers.)
//! - A request has a delivery limit (`--max-deliveries`, as RabbitMQ's quorum queues' delivery
//!   limit or SQS's maximum receive count): each worker purged while holding it (cut,
//!   disconnected, stalled, silent) counts one delivery, and the purge that brings it to the
//!   limit drops it instead of re-queueing it (`poisoned`, logged with its client). A request
//!   that kills or cuts every worker that takes it would otherwise go round for ever. Its key
//!   is remembered ([`MAX_POISONED`] keys at most, the oldest forgotten first) and any later
//!   arrival of it, a client's retry, is dropped at once (`poisoned_retries`): its client gets
//!   no reply (our client counts it lost at its deadline). A worker that said DISCONNECT and
//!   answered costs nothing; neither does a worker that could not be sent the request.

use std::collections::VecDeque;

use bytes::Bytes;
use common::frames;
use common::heartbeat::{Heartbeat, Liveness};
use common::send::Sent;
use foldhash::{HashMap, HashMapExt};

use crate::protocol::{KeyMap, Request, RequestKey};
use crate::queue::{Overflow, RequestQueue};
use crate::stats::BrokerStats;

/// The most requests one worker may hold or be offered (its READY credits): a peer that keeps
/// sending READY cannot grow the broker's memory without bound.
pub const MAX_CREDITS: usize = 10_000;

/// Poisoned keys remembered, at most: beyond, the oldest is forgotten (a retry of it would run
/// again, and cost the delivery limit again).
pub const MAX_POISONED: usize = 4096;

/// Peer-caused log lines (a poisoned request, a stray reply) written at most once a second.
static POISONED_LOG: common::logging::Throttle =
    common::logging::Throttle::new(std::time::Duration::from_secs(1));
static STRAY_LOG: common::logging::Throttle =
    common::logging::Throttle::new(std::time::Duration::from_secs(1));
/// So are the lines of workers coming and going, and of clients' dropped requests, 20 a second:
/// a peer that connects and vanishes in a loop must not write a line each time.
static EXTRA_READY_LOG: common::logging::Throttle =
    common::logging::Throttle::new(std::time::Duration::from_secs(1));
static JOINED_LOG: common::logging::Throttle =
    common::logging::Throttle::with_burst(std::time::Duration::from_secs(1), 20);
static LEAVING_LOG: common::logging::Throttle =
    common::logging::Throttle::with_burst(std::time::Duration::from_secs(1), 20);
static PURGED_LOG: common::logging::Throttle =
    common::logging::Throttle::with_burst(std::time::Duration::from_secs(1), 20);
static FORGOTTEN_LOG: common::logging::Throttle =
    common::logging::Throttle::with_burst(std::time::Duration::from_secs(1), 20);

/// A worker's place in [`Books::workers`]: what the idle queue and the held requests point at,
/// so that neither hashes its identity.
type Slot = u32;

#[derive(Debug)]
struct Worker {
    id: Bytes,
    liveness: Liveness,
    /// Its entries in the idle queue: requests it can take now.
    credits: usize,
    /// Requests this worker holds (in [`Books::requests`]).
    held: usize,
    /// It said DISCONNECT: it answers what it holds and takes nothing more.
    leaving: bool,
}

/// The worker in a slot in use.
fn in_slot(workers: &mut [Option<Worker>], slot: Slot) -> &mut Worker {
    workers[slot as usize].as_mut().expect("a slot in use")
}

/// The least recently used free slot of a live worker, taken. (Slots of purged workers leave
/// the idle queue with them, so every entry is live.)
fn take_credit(idle: &mut VecDeque<Slot>, workers: &mut [Option<Worker>]) -> Option<Slot> {
    let slot = idle.pop_front()?;
    in_slot(workers, slot).credits -= 1;
    Some(slot)
}

/// Offers `request` to the worker in `slot` through `send`: held by that worker now (the place
/// to record), or refused (the request back, and why).
#[allow(clippy::result_large_err)] // Both sides carry the request itself: boxing would allocate.
fn offer(
    workers: &mut [Option<Worker>],
    stats: &mut BrokerStats,
    slot: Slot,
    request: Request,
    send: impl FnOnce(&Bytes, &Request) -> Sent,
) -> Result<Place, (Request, &'static str)> {
    let worker = in_slot(workers, slot);
    match send(&worker.id, &request) {
        Sent::Queued => {
            worker.held += 1;
            stats.dispatched += 1;
            Ok(Place::Held {
                worker: slot,
                request,
                answered: false,
            })
        }
        Sent::Stalled => Err((request, "not reading")),
        Sent::Failed(_) => Err((request, "send failed")),
    }
}

/// An owned request: where it is, and what it has cost.
#[derive(Debug)]
struct Owned {
    place: Place,
    /// Nothing until a worker is purged while holding it (a box then: the straight path,
    /// request to worker to reply, allocates nothing for it).
    history: Option<Box<History>>,
}

impl Owned {
    fn new(place: Place) -> Self {
        Self {
            place,
            history: None,
        }
    }

    /// Whether `worker` held it and was purged while holding it.
    fn held_before_by(&self, worker: &Bytes) -> bool {
        self.history
            .as_ref()
            .is_some_and(|h| h.past.iter().any(|id| id == worker))
    }
}

/// What an owned request went through, once a worker holding it was purged.
#[derive(Debug, Default)]
struct History {
    /// The workers purged while holding it, oldest first (fewer than the delivery limit).
    past: Vec<Bytes>,
    /// A new request with the same key, arrived after this one was answered while a worker
    /// still holds the answered copy: queued when that worker frees the key.
    parked: Option<Request>,
}

/// Where an owned request is.
#[derive(Debug)]
enum Place {
    /// In the queue, waiting for a worker.
    Queued,
    /// With a worker, kept to send elsewhere if that worker dies.
    Held {
        worker: Slot,
        request: Request,
        /// Its client has the reply already, from a worker purged before it answered: this
        /// worker's reply only frees its slot, and the request is not re-queued if it dies.
        answered: bool,
    },
}

/// What to do with a reply from a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFate {
    /// Forward it to its client.
    Forward,
    /// The request was answered already: drop it (counted as `stale_replies`).
    Stale,
    /// From a worker that never held the request (neither its holder nor one purged while
    /// holding it): drop it (counted as `stray_replies`).
    Stray,
}

/// Keys of the requests dropped at the delivery limit, by their seeded 64-bit hash
/// ([`RequestKey::digest`]), not their frames: a key's first body frame may be a megabyte, and
/// [`MAX_POISONED`] hashes are 64 KiB at most. (A request whose key shares the hash of a
/// poisoned one would be dropped: a chance in 2^64 / 4,096, about 4 x 10^15, per request.)
#[derive(Debug, Default)]
struct Poisoned {
    digests: std::collections::HashSet<u64, nohash_hasher::BuildNoHashHasher<u64>>,
    /// Oldest first.
    order: VecDeque<u64>,
}

impl Poisoned {
    fn contains(&self, key: &RequestKey) -> bool {
        !self.order.is_empty() && self.digests.contains(&key.digest())
    }

    fn insert(&mut self, key: &RequestKey) {
        if self.digests.insert(key.digest()) {
            self.order.push_back(key.digest());
            if self.order.len() > MAX_POISONED {
                let oldest = self.order.pop_front().expect("not empty");
                self.digests.remove(&oldest);
            }
        }
    }
}

/// Queue, credits and holdings of one broker.
#[derive(Debug)]
pub struct Books {
    heartbeat: Heartbeat,
    queue: RequestQueue,
    /// Every request queued or held by a worker, by key: one lookup per request and one per
    /// reply.
    requests: KeyMap<Owned>,
    /// A request is dropped when this many workers were purged while holding it.
    max_deliveries: u8,
    poisoned: Poisoned,
    /// New requests parked behind answered copies (see [`History::parked`]).
    parked: usize,
    /// Free slots of live workers, least recently used first.
    idle: VecDeque<Slot>,
    workers: Vec<Option<Worker>>,
    slots: HashMap<Bytes, Slot>,
    free_slots: Vec<Slot>,
    pub stats: BrokerStats,
}

impl Books {
    /// `max_deliveries`: see [`Books::purge`] (at least 1).
    pub fn new(
        max_queued: usize,
        max_queued_bytes: usize,
        max_deliveries: u8,
        heartbeat: Heartbeat,
    ) -> Self {
        Self {
            heartbeat,
            queue: RequestQueue::new(max_queued, max_queued_bytes),
            requests: KeyMap::default(),
            max_deliveries: max_deliveries.max(1),
            poisoned: Poisoned::default(),
            parked: 0,
            idle: VecDeque::new(),
            workers: Vec::new(),
            slots: HashMap::new(),
            free_slots: Vec::new(),
            stats: BrokerStats::default(),
        }
    }

    /// A valid request from a client: merged with the copy already owned, handed out at once
    /// (through `send`, which moves it to a worker: see [`Books::dispatch`]), queued, or
    /// dropped because the queue is full.
    ///
    /// It goes straight to a worker only when nothing waits, so no request overtakes another.
    /// That is the common case with workers holding many requests, and it skips the per-client
    /// queue (which frees a client's queue each time it empties and builds it again).
    pub fn request(&mut self, request: Request, send: impl FnOnce(&Bytes, &Request) -> Sent) {
        self.stats.requests_in += 1;
        if self.poisoned.contains(request.key()) {
            // A retry of a request dropped at the delivery limit.
            self.stats.poisoned_retries += 1;
            return;
        }
        let key = request.key().clone();
        let place = match self.requests.entry(key) {
            std::collections::hash_map::Entry::Occupied(owned) => {
                let owned = owned.into_mut();
                if let Place::Held { answered: true, .. } = owned.place {
                    let history = owned.history.get_or_insert_default();
                    if history.parked.is_none() {
                        // Answered already: a new request with the same key, parked until the
                        // answered copy's worker frees the key.
                        history.parked = Some(request);
                        self.parked += 1;
                        self.stats.parked += 1;
                        return;
                    }
                }
                // A retry of a request still queued or with a worker (or parked), not yet
                // answered: its reply answers both.
                self.stats.merged += 1;
                return;
            }
            std::collections::hash_map::Entry::Vacant(place) => place,
        };
        if self.queue.is_empty() {
            if let Some(slot) = take_credit(&mut self.idle, &mut self.workers) {
                match offer(&mut self.workers, &mut self.stats, slot, request, send) {
                    Ok(held) => {
                        place.insert(Owned::new(held));
                    }
                    Err((request, why)) => {
                        place.insert(Owned::new(Place::Queued));
                        self.queue.push_front(request);
                        self.refused(slot, why);
                    }
                }
                return;
            }
        }
        place.insert(Owned::new(Place::Queued));
        self.push_queued(request);
    }

    /// Puts at the back of its client's queue a request whose entry says queued; if the queue
    /// is full, it or another is dropped (`rejected`), with its entry.
    fn push_queued(&mut self, request: Request) {
        let key = request.key().clone();
        match self.queue.push(request) {
            Ok(()) => {}
            Err(overflow) => {
                self.stats.rejected += 1;
                match overflow {
                    Overflow::Displaced(dropped) => {
                        for request in dropped {
                            self.requests.remove(request.key());
                        }
                    }
                    Overflow::Refused(_) => {
                        self.requests.remove(&key);
                    }
                }
                if self.stats.rejected.is_power_of_two() {
                    tracing::warn!(
                        queued = self.queue.len(),
                        rejected = self.stats.rejected,
                        "queue full, dropping requests"
                    );
                }
            }
        }
    }

    /// Hands queued requests to workers with a free slot, least recently used first, through
    /// `send`: [`Sent::Queued`] means the worker holds it now; anything else puts it back first
    /// in line and purges that worker (it stopped reading, or is gone).
    pub fn dispatch(&mut self, mut send: impl FnMut(&Bytes, &Request) -> Sent) {
        while !self.queue.is_empty() {
            let Some(slot) = take_credit(&mut self.idle, &mut self.workers) else {
                return;
            };
            let request = self.queue.pop().expect("queue is not empty");
            let owned = self.requests.get_mut(request.key()).expect("owned");
            match offer(&mut self.workers, &mut self.stats, slot, request, &mut send) {
                Ok(held) => owned.place = held,
                Err((request, why)) => {
                    self.queue.push_front(request);
                    self.refused(slot, why);
                }
            }
        }
    }

    /// A worker could not take a request: it is purged.
    fn refused(&mut self, slot: Slot, why: &str) {
        let id = in_slot(&mut self.workers, slot).id.clone();
        self.purge(&id, why);
    }

    /// READY: one more free slot for this worker (which is registered on its first READY).
    pub fn ready(&mut self, worker_id: Bytes) {
        let slot = match self.slots.get(&worker_id) {
            Some(&slot) => slot,
            None => self.register(worker_id, "READY"),
        };
        let worker = in_slot(&mut self.workers, slot);
        worker.liveness.heard();
        if worker.leaving || worker.credits + worker.held >= MAX_CREDITS {
            self.stats.bad_backend += 1;
            if let Some(held_back) = EXTRA_READY_LOG.check() {
                tracing::warn!(worker = %frames::show(&worker.id), held_back, "READY beyond {MAX_CREDITS} credits, or after DISCONNECT, dropped");
            }
        } else {
            worker.credits += 1;
            self.idle.push_back(slot);
        }
    }

    /// A new worker, first heard `via` READY or HEARTBEAT.
    fn register(&mut self, id: Bytes, via: &'static str) -> Slot {
        if let Some(held_back) = JOINED_LOG.check() {
            tracing::info!(worker = %frames::show(&id), via, held_back, "worker ready");
        }
        let worker = Worker {
            id: id.clone(),
            liveness: Liveness::new(self.heartbeat),
            credits: 0,
            held: 0,
            leaving: false,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.workers[slot as usize] = Some(worker);
                slot
            }
            None => {
                self.workers.push(Some(worker));
                Slot::try_from(self.workers.len() - 1).expect("fewer than 2^32 workers")
            }
        };
        self.slots.insert(id, slot);
        slot
    }

    fn forget_worker(&mut self, slot: Slot) -> Option<Worker> {
        let worker = self.workers[slot as usize].take()?;
        self.slots.remove(&worker.id);
        self.free_slots.push(slot);
        Some(worker)
    }

    /// HEARTBEAT: a sign of life; from a worker the books do not know, READY as well (one
    /// credit: see the module doc).
    pub fn heartbeat(&mut self, worker_id: Bytes) {
        match self.slots.get(&worker_id) {
            Some(&slot) => in_slot(&mut self.workers, slot).liveness.heard(),
            None => {
                // Never seen READY, or purged since: READY too (see the module doc).
                self.stats.heartbeat_ready += 1;
                let slot = self.register(worker_id, "HEARTBEAT");
                let worker = in_slot(&mut self.workers, slot);
                worker.liveness.heard();
                worker.credits += 1;
                self.idle.push_back(slot);
            }
        }
    }

    /// DISCONNECT: no more requests for this worker; it stays until it has answered.
    pub fn leaving(&mut self, worker_id: &Bytes) {
        let Some(&slot) = self.slots.get(worker_id) else {
            return;
        };
        let worker = in_slot(&mut self.workers, slot);
        worker.liveness.heard();
        worker.leaving = true;
        worker.credits = 0;
        let held = worker.held;
        self.idle.retain(|&s| s != slot);
        if let Some(held_back) = LEAVING_LOG.check() {
            tracing::info!(worker = %frames::show(worker_id), held, held_back, "worker leaving");
        }
        if held == 0 {
            self.forget_worker(slot);
        }
    }

    /// A reply to the request `key` from a worker.
    pub fn reply(&mut self, worker_id: &Bytes, key: &RequestKey) -> ReplyFate {
        let slot = self.slots.get(worker_id).copied();
        if let Some(slot) = slot {
            in_slot(&mut self.workers, slot).liveness.heard();
        }
        let Some(owned) = self.requests.remove(key) else {
            // No longer owned: answered already, and this is a repeat.
            self.stats.stale_replies += 1;
            return ReplyFate::Stale;
        };
        match owned.place {
            Place::Held {
                worker, answered, ..
            } if Some(worker) == slot => {
                // Only a reply to a request it held frees a slot: a late reply from a request
                // we already gave to someone else must not double-book it.
                let worker = in_slot(&mut self.workers, worker);
                worker.held -= 1;
                if !worker.leaving {
                    worker.credits += 1;
                    self.idle.push_back(slot.expect("its own"));
                } else if worker.held == 0 {
                    self.forget_worker(slot.expect("its own"));
                }
                if answered {
                    // Its client has the reply of a worker purged before: this one only freed
                    // a slot, and the key, for a new request parked behind it.
                    self.stats.stale_replies += 1;
                    if let Some(parked) = owned.history.and_then(|h| h.parked) {
                        self.unpark(parked);
                    }
                    return ReplyFate::Stale;
                }
                ReplyFate::Forward
            }
            // Neither its holder nor one purged while holding it: not an answer.
            _ if !owned.held_before_by(worker_id) => {
                self.requests.insert(key.clone(), owned);
                self.stats.stray_replies += 1;
                if let Some(held_back) = STRAY_LOG.check() {
                    tracing::info!(
                        worker = %frames::show(worker_id),
                        client = %frames::show(&key.client),
                        held_back,
                        "reply from a worker that never held the request dropped"
                    );
                }
                ReplyFate::Stray
            }
            // A late reply from a worker purged meanwhile: it still answers the client. Held by
            // another worker now: that worker's reply will not be forwarded.
            Place::Held {
                worker,
                request,
                answered,
            } => {
                self.requests.insert(
                    key.clone(),
                    Owned {
                        place: Place::Held {
                            worker,
                            request,
                            answered: true,
                        },
                        history: owned.history,
                    },
                );
                if answered {
                    self.stats.stale_replies += 1;
                    ReplyFate::Stale
                } else {
                    ReplyFate::Forward
                }
            }
            // Queued again, from a worker purged while holding it: the copy need not run.
            Place::Queued => {
                self.queue.remove(key);
                ReplyFate::Forward
            }
        }
    }

    /// Purges the workers silent for too long.
    pub fn purge_expired(&mut self) {
        let expired: Vec<Bytes> = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.liveness.is_expired())
            .map(|w| w.id.clone())
            .collect();
        for id in expired {
            self.purge(&id, "heartbeat expired");
        }
    }

    /// The workers known now.
    pub fn worker_ids(&self) -> impl Iterator<Item = &Bytes> {
        self.workers.iter().flatten().map(|w| &w.id)
    }

    /// Forgets a worker and puts the requests it held back at the front of the queue; one
    /// that has now cost `max_deliveries` workers is dropped instead (`poisoned`), and its
    /// later arrivals with it.
    pub fn purge(&mut self, worker_id: &Bytes, why: &str) {
        let Some(&slot) = self.slots.get(worker_id) else {
            return;
        };
        let worker = self.forget_worker(slot).expect("a slot in use");
        self.stats.purged += 1;
        self.idle.retain(|&s| s != slot);
        let mut requeue = Vec::with_capacity(worker.held);
        let mut poisoned = Vec::new();
        let mut unparked = Vec::new();
        if worker.held > 0 {
            // Copied: a purged worker's id outlives its connection's read buffer here.
            let id = Bytes::copy_from_slice(worker_id);
            let max = usize::from(self.max_deliveries);
            self.requests.retain(|key, owned| match owned.place {
                Place::Held { worker, .. } if worker == slot => {
                    match std::mem::replace(&mut owned.place, Place::Queued) {
                        // Answered already: nothing to run again, but a new request parked
                        // behind it is queued, in a fresh entry.
                        Place::Held { answered: true, .. } => {
                            match owned.history.take().and_then(|h| h.parked) {
                                Some(parked) => {
                                    unparked.push(parked);
                                    true
                                }
                                None => false,
                            }
                        }
                        Place::Held { request, .. } => {
                            let history = owned.history.get_or_insert_default();
                            history.past.push(id.clone());
                            if history.past.len() >= max {
                                poisoned.push(key.clone());
                                false
                            } else {
                                requeue.push(request);
                                true
                            }
                        }
                        Place::Queued => unreachable!("matched as held"),
                    }
                }
                _ => true,
            });
        }
        let requeued = requeue.len();
        for request in requeue {
            self.queue.push_front(request);
        }
        self.parked -= unparked.len();
        for request in unparked {
            self.queue.push_front(request);
        }
        self.stats.requeued += requeued as u64;
        if let Some(held_back) = PURGED_LOG.check() {
            tracing::warn!(worker = %frames::show(worker_id), why, requeued, poisoned = poisoned.len(), held_back, "worker purged");
        }
        for key in poisoned {
            self.poisoned.insert(&key);
            self.stats.poisoned += 1;
            if let Some(held_back) = POISONED_LOG.check() {
                tracing::warn!(
                    client = %frames::show(&key.client),
                    request = %frames::show(&key.id),
                    deliveries = self.max_deliveries,
                    held_back,
                    "request dropped: every worker that held it was lost (the delivery limit); its retries are dropped too"
                );
            }
        }
    }

    /// Queues a new request that was parked behind an answered copy whose worker has freed
    /// the key: first in line (it was accepted when it was parked).
    fn unpark(&mut self, request: Request) {
        self.parked -= 1;
        self.requests
            .insert(request.key().clone(), Owned::new(Place::Queued));
        self.queue.push_front(request);
    }

    /// Takes out the parked requests `which` picks (a scan of every entry: only when some are
    /// parked, which takes a purge and a late reply).
    fn take_parked(&mut self, which: impl Fn(&Request) -> bool) -> usize {
        if self.parked == 0 {
            return 0;
        }
        let mut taken = 0;
        for owned in self.requests.values_mut() {
            if let Some(history) = &mut owned.history {
                if history.parked.as_ref().is_some_and(&which) {
                    history.parked = None;
                    taken += 1;
                }
            }
        }
        self.parked -= taken;
        taken
    }

    /// Drops the queued (and parked) requests of a client that went away or stopped reading:
    /// nobody would read the replies.
    pub fn forget_client(&mut self, client: &Bytes, why: &str) {
        let dropped = self.queue.remove_client(client);
        for request in &dropped {
            self.requests.remove(request.key());
        }
        let dropped = dropped.len() + self.take_parked(|request| request.client() == client);
        if dropped > 0 {
            self.stats.forgotten += dropped as u64;
            if let Some(held_back) = FORGOTTEN_LOG.check() {
                tracing::info!(client = %frames::show(client), why, dropped, held_back, "client's queued requests dropped");
            }
        }
    }

    /// Stops queueing: drops what waits (queued or parked) and says how many requests workers
    /// still hold.
    pub fn close(&mut self) -> (usize, usize) {
        let dropped = self.queue.drain();
        for request in &dropped {
            self.requests.remove(request.key());
        }
        let parked = self.take_parked(|_| true);
        (self.held(), dropped.len() + parked)
    }

    /// Requests held by workers.
    pub fn held(&self) -> usize {
        self.workers.iter().flatten().map(|w| w.held).sum()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes()
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    pub fn workers(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod model {
    //! The books against a plain model under random sequences of events: no request lost,
    //! none held twice, credits bounded and matching the idle queue, no request held more
    //! than the delivery limit allows, a poisoned request never served again, no client given
    //! two replies for one request, and every request still owned (or parked: a key asked
    //! again after its answer) served once a worker is there.

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// The delivery limit of the random runs: low, so that they reach it.
    const MAX_DELIVERIES: u8 = 2;

    #[derive(Debug, Clone)]
    enum Event {
        Request {
            client: u8,
            id: u8,
        },
        Ready(u8),
        Heartbeat(u8),
        /// Dispatch all that can be, each send taken or refused.
        Dispatch {
            refuse_every: u8,
        },
        /// A worker answers the n-th request it holds (or a random key, as a repeat or a
        /// stray would).
        Reply {
            worker: u8,
            nth: u8,
        },
        /// A worker answers the n-th request it was ever sent (late, after a purge perhaps).
        LateReply {
            worker: u8,
            nth: u8,
        },
        /// A client sends again one of the last three requests answered (a REQ's next
        /// "Hello").
        Again(u8),
        Purge(u8),
        Leaving(u8),
        Forget(u8),
    }

    /// Events of `clients` clients sending requests numbered below `ids`.
    fn event(clients: u8, ids: u8) -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0..clients, 0..ids).prop_map(|(client, id)| Event::Request { client, id }),
            3 => (0..3u8).prop_map(Event::Ready),
            2 => (0..3u8).prop_map(Event::Heartbeat),
            3 => (0..5u8).prop_map(|refuse_every| Event::Dispatch { refuse_every }),
            4 => (0..3u8, 0..4u8).prop_map(|(worker, nth)| Event::Reply { worker, nth }),
            2 => (0..3u8, 0..8u8).prop_map(|(worker, nth)| Event::LateReply { worker, nth }),
            2 => (0..3u8).prop_map(Event::Again),
            2 => (0..3u8).prop_map(Event::Purge),
            1 => (0..3u8).prop_map(Event::Leaving),
            1 => (0..3u8).prop_map(Event::Forget),
        ]
    }

    fn id(n: u8) -> Bytes {
        Bytes::from(vec![b'W', n])
    }

    fn client(n: u8) -> Bytes {
        Bytes::from(vec![b'C', n])
    }

    fn request(c: u8, id: u8) -> Request {
        let frames = vec![client(c), Bytes::new(), Bytes::from(id.to_string())];
        Request::parse(frames::message_of(frames)).expect("valid")
    }

    fn key(c: u8, id: u8) -> RequestKey {
        request(c, id).key().clone()
    }

    fn owned(books: &Books) -> BTreeSet<RequestKey> {
        books.requests.keys().cloned().collect()
    }

    /// Keys held by a worker whose client has the reply already, and no new request parked.
    fn answered_early(books: &Books) -> BTreeSet<RequestKey> {
        books
            .requests
            .iter()
            .filter(|(_, owned)| matches!(owned.place, Place::Held { answered: true, .. }))
            .filter(|(_, owned)| owned.history.as_ref().is_none_or(|h| h.parked.is_none()))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Keys with a new request parked.
    fn parked(books: &Books) -> BTreeSet<RequestKey> {
        books
            .requests
            .iter()
            .filter(|(_, owned)| owned.history.as_ref().is_some_and(|h| h.parked.is_some()))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Whether a request with `key` arriving now is a new one: not owned, or owned answered
    /// with nothing parked yet (not poisoned in either case).
    fn is_new(books: &Books, key: &RequestKey) -> bool {
        match books.requests.get(key) {
            None => !books.poisoned.contains(key),
            Some(owned) => {
                matches!(owned.place, Place::Held { answered: true, .. })
                    && owned.history.as_ref().is_none_or(|h| h.parked.is_none())
            }
        }
    }

    /// The keys `worker` holds.
    fn held_by(books: &Books, worker: &Bytes) -> Vec<RequestKey> {
        let Some(&slot) = books.slots.get(worker) else {
            return Vec::new();
        };
        books
            .requests
            .iter()
            .filter(
                |(_, owned)| matches!(owned.place, Place::Held { worker, .. } if worker == slot),
            )
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Sends everything, or refuses every `refuse_every`-th send (0: none); the sends taken
    /// go to `log`.
    fn sender(
        refuse_every: u8,
        log: &mut Vec<(Bytes, RequestKey)>,
    ) -> impl FnMut(&Bytes, &Request) -> Sent + '_ {
        let mut n = 0u8;
        move |worker, request| {
            n = n.wrapping_add(1);
            if refuse_every > 0 && n.is_multiple_of(refuse_every) {
                Sent::Stalled
            } else {
                log.push((worker.clone(), request.key().clone()));
                Sent::Queued
            }
        }
    }

    /// Sends everything and forgets it.
    fn send_all(_: &Bytes, _: &Request) -> Sent {
        Sent::Queued
    }

    /// What must hold between any two events.
    fn check(books: &Books) {
        let mut held = BTreeSet::new();
        let mut held_per_slot = vec![0; books.workers.len()];
        let mut parked = 0;
        for (key, owned) in &books.requests {
            if let Some(request) = owned.history.as_ref().and_then(|h| h.parked.as_ref()) {
                parked += 1;
                assert_eq!(request.key(), key);
                assert!(
                    matches!(owned.place, Place::Held { answered: true, .. }),
                    "{key:?} parked behind a copy not answered"
                );
            }
            assert!(!books.poisoned.contains(key), "{key:?} poisoned and owned");
            if let Some(history) = &owned.history {
                assert!(
                    history.past.len() < usize::from(books.max_deliveries),
                    "{key:?} past its delivery limit: {history:?}"
                );
            }
            if let Place::Held {
                worker, request, ..
            } = &owned.place
            {
                assert_eq!(request.key(), key);
                assert!(held.insert(key.clone()), "{key:?} held twice");
                assert!(
                    books.workers[*worker as usize].is_some(),
                    "{key:?} held by a purged worker"
                );
                held_per_slot[*worker as usize] += 1;
            }
        }
        assert_eq!(books.parked, parked);
        assert!(books.poisoned.order.len() <= MAX_POISONED);
        assert_eq!(books.poisoned.order.len(), books.poisoned.digests.len());
        let mut live = 0;
        for (slot, worker) in books.workers.iter().enumerate() {
            let Some(worker) = worker else {
                assert!(
                    books.free_slots.contains(&(slot as Slot)),
                    "slot {slot} lost"
                );
                continue;
            };
            live += 1;
            assert_eq!(books.slots.get(&worker.id), Some(&(slot as Slot)));
            let in_idle = books.idle.iter().filter(|&&s| s as usize == slot).count();
            assert_eq!(
                in_idle, worker.credits,
                "credits of {:?} vs idle queue",
                worker.id
            );
            assert_eq!(worker.held, held_per_slot[slot], "held by {:?}", worker.id);
            assert!(worker.credits + worker.held <= MAX_CREDITS);
            assert!(!worker.leaving || worker.credits == 0);
        }
        assert_eq!(books.slots.len(), live);
        let mut queued = BTreeSet::new();
        let mut copy = books.queue.clone_for_test();
        while let Some(r) = copy.pop() {
            assert!(queued.insert(r.key().clone()), "{:?} queued twice", r.key());
            assert!(!held.contains(r.key()), "{:?} queued and held", r.key());
        }
        assert_eq!(queued.len(), books.queue.len());
        let both: BTreeSet<_> = queued.union(&held).cloned().collect();
        assert_eq!(both, owned(books), "owned = queued + held");
    }

    /// Worker A takes a request and is purged; worker B takes the copy; A's reply comes after
    /// all. The client gets A's reply; B's only frees B's slot; purging B then runs nothing again.
    #[test]
    fn a_late_reply_answers_once_while_another_worker_holds_the_copy() {
        for purge_b in [false, true] {
            let mut books = Books::new(6, 1 << 20, 5, Heartbeat::default());
            let (a, b) = (id(1), id(2));
            let key = key(1, 1);
            books.request(request(1, 1), |_, _| panic!("no worker yet"));
            books.ready(a.clone());
            let mut to = Vec::new();
            books.dispatch(sender(0, &mut to));
            books.purge(&a, "test");
            books.ready(b.clone());
            books.dispatch(sender(0, &mut to));
            let to: Vec<Bytes> = to.into_iter().map(|(worker, _)| worker).collect();
            assert_eq!(to, [a.clone(), b.clone()], "to A, then to B");
            assert_eq!(books.reply(&a, &key), ReplyFate::Forward, "A's late reply");
            check(&books);
            if purge_b {
                books.purge(&b, "test");
                assert_eq!(books.queued(), 0, "answered: not queued again");
            } else {
                assert_eq!(books.reply(&b, &key), ReplyFate::Stale, "B's reply");
                assert_eq!(books.idle(), 1, "B's slot is free again");
            }
            assert!(books.requests.is_empty());
            check(&books);
        }
    }

    /// Issue 17, case 4: A holds "Hello" and is purged, B holds the copy, A's late reply
    /// answers. The client's next "Hello" (same key) is a new request: parked while B holds
    /// the answered copy (its retries merged), then run once B frees the key, by its stale
    /// reply or by being purged; dropped if its client goes.
    #[test]
    fn a_request_arriving_after_its_key_was_answered_is_run() {
        for how in ["reply", "purge", "forget"] {
            let mut books = Books::new(6, 1 << 20, 5, Heartbeat::default());
            let (a, b, c) = (id(1), id(2), id(3));
            books.ready(a.clone());
            books.request(request(1, 1), send_all);
            books.purge(&a, "test");
            books.ready(b.clone());
            books.dispatch(send_all);
            assert_eq!(
                books.reply(&a, &key(1, 1)),
                ReplyFate::Forward,
                "A's late reply"
            );
            books.request(request(1, 1), |_, _| panic!("parked, not sent"));
            books.request(request(1, 1), |_, _| panic!("merged, not sent"));
            assert_eq!((books.stats.parked, books.stats.merged), (1, 1));
            check(&books);
            match how {
                "reply" => assert_eq!(books.reply(&b, &key(1, 1)), ReplyFate::Stale),
                "purge" => books.purge(&b, "test"),
                _ => {
                    books.forget_client(&client(1), "test");
                    assert_eq!(books.stats.forgotten, 1);
                    assert_eq!(books.reply(&b, &key(1, 1)), ReplyFate::Stale);
                    assert!(books.requests.is_empty(), "nothing left to run");
                    check(&books);
                    continue;
                }
            }
            check(&books);
            assert_eq!(books.queued(), 1, "the new Hello queued ({how})");
            books.ready(c.clone());
            let mut to = Vec::new();
            books.dispatch(sender(0, &mut to));
            // B, its slot free again after its reply, or C.
            let [(worker, sent)] = &to[..] else {
                panic!("sent once: {to:?}")
            };
            assert_eq!(sent, &key(1, 1));
            assert_eq!(books.reply(worker, sent), ReplyFate::Forward, "its answer");
            assert!(books.requests.is_empty());
            check(&books);
        }
    }

    /// A reply answers only from a worker that held the request: its holder, or one purged
    /// while holding it; from any other peer it is dropped, whether the request is held by
    /// another worker or queued again.
    #[test]
    fn a_reply_from_a_worker_that_never_held_the_request_is_dropped() {
        let (a, b, x) = (id(1), id(2), id(7));
        // Held by A: X, and a peer never heard of, are strays.
        let mut books = Books::new(6, 1 << 20, 5, Heartbeat::default());
        books.ready(a.clone());
        books.request(request(1, 1), send_all);
        books.ready(x.clone());
        assert_eq!(books.reply(&x, &key(1, 1)), ReplyFate::Stray);
        assert_eq!(books.reply(&id(8), &key(1, 1)), ReplyFate::Stray);
        check(&books);
        // Queued again after A's purge: X's reply is still a stray; A's late one answers.
        books.purge(&a, "test");
        assert_eq!(books.reply(&x, &key(1, 1)), ReplyFate::Stray);
        assert_eq!(books.queued(), 1, "still queued");
        assert_eq!(books.reply(&a, &key(1, 1)), ReplyFate::Forward);
        assert_eq!(books.queued(), 0, "answered: the copy need not run");
        assert_eq!(books.stats.stray_replies, 3);
        check(&books);
        // Held by B after A's purge: X's reply is a stray, A's answers, B's is stale.
        let mut books = Books::new(6, 1 << 20, 5, Heartbeat::default());
        books.ready(a.clone());
        books.request(request(1, 1), send_all);
        books.purge(&a, "test");
        books.ready(b.clone());
        books.ready(x.clone());
        books.dispatch(send_all);
        assert_eq!(books.reply(&x, &key(1, 1)), ReplyFate::Stray);
        assert_eq!(books.reply(&a, &key(1, 1)), ReplyFate::Forward);
        assert_eq!(books.reply(&b, &key(1, 1)), ReplyFate::Stale);
        assert!(books.requests.is_empty());
        check(&books);
    }

    /// Issue 17, case 6: a worker first heard through a heartbeat gets one credit, as for
    /// READY, and its later heartbeats none; a worker registered by READY gets none from its
    /// heartbeats, busy or idle; a purged worker heard again gets one.
    #[test]
    fn a_heartbeat_from_a_worker_never_seen_stands_for_one_ready() {
        let mut books = Books::new(6, 1 << 20, 5, Heartbeat::default());
        let (a, b) = (id(1), id(2));
        for _ in 0..3 {
            books.heartbeat(a.clone());
        }
        assert_eq!((books.idle(), books.stats.heartbeat_ready), (1, 1));
        books.ready(b.clone());
        books.heartbeat(b.clone());
        assert_eq!(books.idle(), 2, "B's heartbeat: nothing");
        books.request(request(1, 1), send_all);
        books.request(request(1, 2), send_all);
        assert_eq!(books.idle(), 0);
        books.heartbeat(a.clone());
        books.heartbeat(b.clone());
        assert_eq!(books.idle(), 0, "busy and heartbeating: no second request");
        check(&books);
        // Purged (its request queued again) and heard again: one credit, and the request.
        books.purge(&a, "test");
        books.heartbeat(a.clone());
        let mut to = Vec::new();
        books.dispatch(sender(0, &mut to));
        assert_eq!(to.len(), 1);
        assert_eq!(to[0].0, a);
        assert_eq!(books.stats.heartbeat_ready, 2);
        check(&books);
    }

    /// A request that costs every worker holding it: three workers purged while holding it
    /// (limit 3), and it is dropped, counted, and its retries are dropped on arrival; another
    /// client's request with the same body is not.
    #[test]
    fn a_request_is_dropped_at_the_delivery_limit_and_its_retries_with_it() {
        let mut books = Books::new(6, 1 << 20, 3, Heartbeat::default());
        books.request(request(1, 1), |_, _| panic!("no worker yet"));
        for n in 1..=3 {
            books.ready(id(n));
            let mut to = Vec::new();
            books.dispatch(sender(0, &mut to));
            assert_eq!(to, [(id(n), key(1, 1))], "delivery {n}");
            books.purge(&id(n), "test");
            check(&books);
        }
        assert_eq!((books.stats.requeued, books.stats.poisoned), (2, 1));
        assert!(books.requests.is_empty() && books.queued() == 0);
        // Its retry is dropped; its late reply is a stale one; a request of another client
        // with the same first frame is served.
        books.ready(id(4));
        books.request(request(1, 1), |_, _| panic!("poisoned: never sent"));
        assert_eq!(books.stats.poisoned_retries, 1);
        assert_eq!(books.reply(&id(3), &key(1, 1)), ReplyFate::Stale);
        let mut to = Vec::new();
        books.request(request(2, 1), sender(0, &mut to));
        assert_eq!(to, [(id(4), key(2, 1))]);
        check(&books);
        // A worker that leaves and answers costs nothing: a limit of 1 is not reached.
        let mut books = Books::new(6, 1 << 20, 1, Heartbeat::default());
        books.ready(id(1));
        books.request(request(1, 1), send_all);
        books.leaving(&id(1));
        assert_eq!(books.reply(&id(1), &key(1, 1)), ReplyFate::Forward);
        assert_eq!(books.stats.poisoned, 0);
        // Nor does a worker that could not be sent the request.
        books.ready(id(2));
        books.request(request(1, 2), |_, _| Sent::Stalled);
        books.ready(id(3));
        let mut to = Vec::new();
        books.dispatch(sender(0, &mut to));
        assert_eq!(to, [(id(3), key(1, 2))]);
        assert_eq!(books.stats.poisoned, 0);
        check(&books);
    }

    #[test]
    fn poisoned_keys_are_bounded_and_the_oldest_forgotten_first() {
        let mut poisoned = Poisoned::default();
        let keys: Vec<RequestKey> = (0..MAX_POISONED + 2)
            .map(|n| RequestKey::new(client(1), Bytes::from(n.to_string())))
            .collect();
        for key in &keys {
            poisoned.insert(key);
            poisoned.insert(key);
        }
        assert_eq!(poisoned.order.len(), MAX_POISONED);
        assert!(!poisoned.contains(&keys[0]) && !poisoned.contains(&keys[1]));
        assert!(keys[2..].iter().all(|k| poisoned.contains(k)));
    }

    /// One random run: the books after each event against what the model knows.
    fn run(events: Vec<Event>) -> Result<(), TestCaseError> {
        let mut books = Books::new(6, 20, MAX_DELIVERIES, Heartbeat::default());
        let max = usize::from(MAX_DELIVERIES);
        // Keys whose reply went to the client, in any event so far: a key may leave the
        // books later without a reply forwarded then (its copy answered early).
        let mut forwarded: BTreeSet<RequestKey> = BTreeSet::new();
        // Workers the request of each key was sent to, since it arrived (as a new
        // request).
        let mut sent_to: BTreeMap<RequestKey, Vec<Bytes>> = BTreeMap::new();
        // Keys dropped at the delivery limit.
        let mut poisoned = BTreeSet::new();
        // Keys whose request was dropped with its client while parked: a key may leave the
        // books later without a reply (its answered copy freed).
        let mut gone = BTreeSet::new();
        // The keys answered, oldest first.
        let mut last_answers: Vec<RequestKey> = Vec::new();
        // Every key each worker was ever sent, oldest first.
        let mut ever: BTreeMap<Bytes, Vec<RequestKey>> = BTreeMap::new();
        for event in events {
            let event = match event {
                Event::Again(nth) => {
                    let Some(key) = last_answers.iter().rev().nth(usize::from(nth)) else {
                        continue;
                    };
                    let id = std::str::from_utf8(&key.id)
                        .expect("text")
                        .parse()
                        .expect("a number");
                    Event::Request {
                        client: key.client[1],
                        id,
                    }
                }
                event => event,
            };
            let before = owned(&books);
            let mut answered = BTreeSet::new();
            let mut sent = Vec::new();
            match event.clone() {
                Event::Request { client: c, id } => {
                    // A key asked again after its answer is a new request.
                    let key = key(c, id);
                    if poisoned.contains(&key) {
                        books.request(request(c, id), sender(0, &mut sent));
                        prop_assert!(
                            !books.requests.contains_key(&key),
                            "a poisoned key runs again"
                        );
                    } else {
                        if is_new(&books, &key) {
                            forwarded.remove(&key);
                            sent_to.remove(&key);
                            gone.remove(&key);
                        }
                        books.request(request(c, id), sender(0, &mut sent));
                    }
                }
                Event::Ready(w) => books.ready(id(w)),
                Event::Heartbeat(w) => {
                    let known = books.slots.contains_key(&id(w));
                    let idle = books.idle();
                    books.heartbeat(id(w));
                    let credits = if known { 0 } else { 1 };
                    prop_assert_eq!(books.idle(), idle + credits, "a heartbeat's credits");
                }
                Event::Dispatch { refuse_every } => books.dispatch(sender(refuse_every, &mut sent)),
                Event::Reply { worker: w, nth } => {
                    let mut held = held_by(&books, &id(w));
                    held.sort();
                    let key = held
                        .get(nth as usize)
                        .cloned()
                        .unwrap_or_else(|| key(nth % 3, nth));
                    if books.reply(&id(w), &key) == ReplyFate::Forward {
                        prop_assert!(forwarded.insert(key.clone()), "{:?} forwarded twice", key);
                        answered.insert(key);
                    }
                }
                Event::LateReply { worker: w, nth } => {
                    let Some(key) = ever
                        .get(&id(w))
                        .and_then(|keys| keys.get(nth as usize))
                        .cloned()
                    else {
                        continue;
                    };
                    if books.reply(&id(w), &key) == ReplyFate::Forward {
                        prop_assert!(forwarded.insert(key.clone()), "{:?} forwarded twice", key);
                        answered.insert(key);
                    }
                }
                Event::Purge(w) => books.purge(&id(w), "test"),
                Event::Leaving(w) => books.leaving(&id(w)),
                Event::Again(_) => unreachable!("made a request above"),
                Event::Forget(c) => {
                    let were = parked(&books);
                    books.forget_client(&client(c), "test");
                    gone.extend(were.difference(&parked(&books)).cloned());
                }
            }
            check(&books);
            last_answers.extend(answered.iter().cloned());
            // A reply answers only from a worker its request (since it arrived) was sent to.
            for key in &answered {
                let (Event::Reply { worker: w, .. } | Event::LateReply { worker: w, .. }) = event
                else {
                    unreachable!("only replies answer");
                };
                prop_assert!(
                    sent_to.get(key).is_some_and(|to| to.contains(&id(w))),
                    "{:?} answered by W{}, never sent it: {:?}",
                    key,
                    w,
                    sent_to.get(key)
                );
            }
            for (worker, key) in sent {
                ever.entry(worker.clone()).or_default().push(key.clone());
                prop_assert!(!poisoned.contains(&key), "{:?} poisoned, then served", key);
                let to = sent_to.entry(key.clone()).or_default();
                to.push(worker);
                prop_assert!(
                    to.len() <= max,
                    "{:?} held more than {} times: {:?}",
                    key,
                    max,
                    to
                );
            }
            // A key leaves the books only answered or dropped on purpose: its client gone,
            // the newest of the longest queue displaced by a new request, or at the
            // delivery limit (held that many times).
            let after = owned(&books);
            let mut left: Vec<&RequestKey> = before
                .difference(&after)
                .filter(|k| !answered.contains(*k) && !forwarded.contains(*k) && !gone.contains(*k))
                .collect();
            left.retain(|k| {
                if !books.poisoned.contains(k) {
                    return true;
                }
                poisoned.insert((*k).clone());
                false
            });
            for k in &poisoned {
                if before.contains(k) && !after.contains(k) {
                    prop_assert_eq!(
                        sent_to.get(k).map_or(0, Vec::len),
                        max,
                        "{:?} poisoned early",
                        k
                    );
                }
            }
            match event {
                Event::Forget(c) => prop_assert!(left.iter().all(|k| k.client == client(c))),
                Event::Request { client: c, .. } => {
                    prop_assert!(
                        left.iter().all(|k| k.client != client(c)),
                        "the sender displaced itself"
                    )
                }
                _ => prop_assert!(left.is_empty(), "{:?} lost", left),
            }
        }
        // A fresh worker with room for everything: every owned request not answered yet is
        // served, once (but those the finale's purges bring to the delivery limit).
        let early = answered_early(&books);
        let mut still: BTreeSet<RequestKey> = owned(&books)
            .into_iter()
            .filter(|k| !early.contains(k))
            .collect();
        let others: Vec<Bytes> = books.worker_ids().cloned().collect();
        for w in others {
            books.purge(&w, "finale");
        }
        still.retain(|k| !books.poisoned.contains(k));
        let fresh = id(9);
        for _ in 0..books.queued() {
            books.ready(fresh.clone());
        }
        let mut sent = Vec::new();
        books.dispatch(sender(0, &mut sent));
        let mut served = BTreeSet::new();
        for (worker, key) in sent {
            prop_assert_eq!(&worker, &fresh);
            prop_assert!(!forwarded.contains(&key), "answered, then served again");
            prop_assert!(!poisoned.contains(&key), "poisoned, then served again");
            prop_assert_eq!(books.reply(&worker, &key), ReplyFate::Forward);
            prop_assert!(served.insert(key), "served twice");
        }
        prop_assert_eq!(&served, &still);
        prop_assert!(books.requests.is_empty());
        check(&books);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn no_request_lost_or_held_twice(events in proptest::collection::vec(event(3, 12), 1..80)) {
            run(events)?;
        }

        /// Few keys: requests asked again after their answer, late replies and strays often.
        #[test]
        fn no_request_lost_or_held_twice_on_few_keys(events in proptest::collection::vec(event(1, 2), 1..80)) {
            run(events)?;
        }
    }
}
