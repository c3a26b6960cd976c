//! The broker's books, without sockets: which requests wait, which worker holds which, which
//! worker slots are free. `broker.rs` moves messages; this decides where they go, and is tested
//! against a plain model under random sequences of events.
//!
//! - Requests wait in a [`RequestQueue`] (per client, served in turn, bounded).
//! - Workers' free slots (READY credits) wait in a least-recently-used queue; only READY or a
//!   reply to a request the worker held gives one; a heartbeat never does.
//! - Every request queued or held is *owned*: one that arrives again while owned is a retry
//!   and is merged, so no request is ever held twice or by two workers.
//! - A purged worker's requests go back to the front of the queue. If the purged worker's reply
//!   comes after all while another worker holds the copy, that reply answers the client and the
//!   copy is marked *answered*: its own reply only frees its worker's slot, and it is dropped,
//!   not re-queued, if that worker is purged too. So no client gets two replies to one request.

use std::collections::VecDeque;

use bytes::Bytes;
use common::frames;
use common::heartbeat::{Heartbeat, Liveness};
use foldhash::{HashMap, HashMapExt};

use crate::protocol::{KeyMap, KeySet, Request, RequestKey};
use crate::queue::{Overflow, RequestQueue};
use crate::stats::BrokerStats;

/// The most requests one worker may hold or be offered (its READY credits): a peer that keeps
/// sending READY cannot grow the broker's memory without bound.
pub const MAX_CREDITS: usize = 10_000;

#[derive(Debug)]
struct Worker {
    liveness: Liveness,
    /// Its entries in the idle queue: requests it can take now.
    credits: usize,
    /// Requests this worker holds, to send elsewhere if it dies.
    held: KeyMap<Request>,
    /// It said DISCONNECT: it answers what it holds and takes nothing more.
    leaving: bool,
}

/// What to do with a reply from a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFate {
    /// Forward it to its client.
    Forward,
    /// The request was answered already: drop it (counted as `stale_replies`).
    Stale,
}

/// Queue, credits and holdings of one broker.
#[derive(Debug)]
pub struct Books {
    heartbeat: Heartbeat,
    queue: RequestQueue,
    /// Keys of every request queued or held by a worker.
    owned: KeySet,
    idle: VecDeque<Bytes>,
    workers: HashMap<Bytes, Worker>,
    /// Keys held by a worker whose client has its reply already (from a worker purged before it
    /// answered): that worker's reply is not forwarded.
    answered: KeySet,
    pub stats: BrokerStats,
}

impl Books {
    pub fn new(max_queued: usize, max_queued_bytes: usize, heartbeat: Heartbeat) -> Self {
        Self {
            heartbeat,
            queue: RequestQueue::new(max_queued, max_queued_bytes),
            owned: KeySet::default(),
            idle: VecDeque::new(),
            workers: HashMap::new(),
            answered: KeySet::default(),
            stats: BrokerStats::default(),
        }
    }

    /// A valid request from a client: merged with the copy already owned, handed out at once
    /// (returned, with its worker: the caller sends it, then says [`Books::handed`] or
    /// [`Books::not_handed`]), queued, or dropped because the queue is full.
    ///
    /// It goes straight to a worker only when nothing waits, so no request overtakes another.
    /// That is the common case with workers holding many requests, and it skips the per-client
    /// queue (which frees a client's queue each time it empties and builds it again).
    #[must_use = "a request handed out at once must be sent"]
    pub fn request(&mut self, request: Request) -> Option<(Bytes, Request)> {
        self.stats.requests_in += 1;
        if !self.owned.insert(request.key().clone()) {
            // A retry of a request still queued or with a worker: its reply answers both.
            self.stats.merged += 1;
            return None;
        }
        if self.queue.is_empty() {
            if let Some(worker_id) = self.take_credit() {
                return Some((worker_id, request));
            }
        }
        let key = request.key().clone();
        match self.queue.push(request) {
            Ok(()) => {}
            Err(overflow) => {
                self.stats.rejected += 1;
                match overflow {
                    Overflow::Displaced(dropped) => {
                        for request in dropped {
                            self.owned.remove(request.key());
                        }
                    }
                    Overflow::Refused(_) => {
                        self.owned.remove(&key);
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
        None
    }

    /// READY: one more free slot for this worker (which is registered on its first READY).
    pub fn ready(&mut self, worker_id: Bytes) {
        let heartbeat = self.heartbeat;
        let worker = self.workers.entry(worker_id.clone()).or_insert_with(|| {
            tracing::info!(worker = %frames::show(&worker_id), "worker ready");
            Worker {
                liveness: Liveness::new(heartbeat),
                credits: 0,
                held: KeyMap::default(),
                leaving: false,
            }
        });
        worker.liveness.heard();
        if worker.leaving || worker.credits + worker.held.len() >= MAX_CREDITS {
            self.stats.bad_backend += 1;
            tracing::warn!(worker = %frames::show(&worker_id), "READY beyond {MAX_CREDITS} credits, or after DISCONNECT, dropped");
        } else {
            worker.credits += 1;
            self.idle.push_back(worker_id);
        }
    }

    /// Any sign of life from a worker that is not a READY or a reply.
    pub fn heard(&mut self, worker_id: &Bytes) {
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.liveness.heard();
        }
    }

    /// DISCONNECT: no more requests for this worker; it stays until it has answered.
    pub fn leaving(&mut self, worker_id: &Bytes) {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return;
        };
        worker.liveness.heard();
        worker.leaving = true;
        worker.credits = 0;
        let held = worker.held.len();
        self.idle.retain(|id| id != worker_id);
        tracing::info!(worker = %frames::show(worker_id), held, "worker leaving");
        if held == 0 {
            self.workers.remove(worker_id);
        }
    }

    /// A reply to the request `key` from a worker.
    pub fn reply(&mut self, worker_id: &Bytes, key: &RequestKey) -> ReplyFate {
        let mut answered = false;
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.liveness.heard();
            // Only a reply to a request it held frees a slot: a late reply from a request we
            // already gave to someone else must not double-book it.
            if worker.held.remove(key).is_some() {
                answered = true;
                if !worker.leaving {
                    worker.credits += 1;
                    self.idle.push_back(worker_id.clone());
                } else if worker.held.is_empty() {
                    self.workers.remove(worker_id);
                }
            }
        }
        if answered {
            self.owned.remove(key);
            if !self.answered.is_empty() && self.answered.remove(key) {
                // Its client has the reply of a worker purged before: this one only freed a slot.
                self.stats.stale_replies += 1;
                return ReplyFate::Stale;
            }
            return ReplyFate::Forward;
        }
        // A late reply from a worker purged meanwhile: it still answers the client, and a
        // queued copy need not run. If the key is no longer owned, the request was answered
        // already and this is a repeat.
        if !self.owned.contains(key) {
            self.stats.stale_replies += 1;
            return ReplyFate::Stale;
        }
        if self.queue.remove(key).is_some() {
            self.owned.remove(key);
            return ReplyFate::Forward;
        }
        // Held by another worker: this reply answers the client, that worker's will not.
        if self.answered.insert(key.clone()) {
            ReplyFate::Forward
        } else {
            self.stats.stale_replies += 1;
            ReplyFate::Stale
        }
    }

    /// The next request to hand out and the least recently used worker with a free slot.
    /// The caller sends it, then says [`Books::handed`] or [`Books::not_handed`].
    pub fn next_dispatch(&mut self) -> Option<(Bytes, Request)> {
        if self.queue.is_empty() {
            return None;
        }
        let worker_id = self.take_credit()?;
        let request = self.queue.pop().expect("queue is not empty");
        Some((worker_id, request))
    }

    /// The least recently used free slot of a live worker, taken.
    fn take_credit(&mut self) -> Option<Bytes> {
        loop {
            let worker_id = self.idle.pop_front()?;
            if let Some(worker) = self.workers.get_mut(&worker_id) {
                worker.credits -= 1;
                return Some(worker_id);
            }
            // A slot of a purged worker.
        }
    }

    /// The worker's queue took the request: it holds it now.
    pub fn handed(&mut self, worker_id: &Bytes, request: Request) {
        self.stats.dispatched += 1;
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.held.insert(request.key().clone(), request);
        }
    }

    /// The worker could not take the request: it goes back first in line, the worker is purged.
    pub fn not_handed(&mut self, worker_id: &Bytes, request: Request, why: &str) {
        self.queue.push_front(request);
        self.purge(worker_id, why);
    }

    /// Purges the workers silent for too long.
    pub fn purge_expired(&mut self) {
        let expired: Vec<Bytes> = self
            .workers
            .iter()
            .filter(|(_, w)| w.liveness.is_expired())
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.purge(&id, "heartbeat expired");
        }
    }

    /// The workers known now.
    pub fn worker_ids(&self) -> impl Iterator<Item = &Bytes> {
        self.workers.keys()
    }

    /// Forgets a worker and puts the requests it held back at the front of the queue.
    pub fn purge(&mut self, worker_id: &Bytes, why: &str) {
        let Some(worker) = self.workers.remove(worker_id) else {
            return;
        };
        self.stats.purged += 1;
        self.idle.retain(|id| id != worker_id);
        let mut requeued = 0;
        for (key, request) in worker.held {
            if self.answered.remove(&key) {
                // Answered already: nothing to run again.
                self.owned.remove(&key);
            } else {
                self.queue.push_front(request);
                requeued += 1;
            }
        }
        self.stats.requeued += requeued;
        tracing::warn!(worker = %frames::show(worker_id), why, requeued, "worker purged");
    }

    /// Drops the queued requests of a client that went away or stopped reading: nobody would
    /// read the replies.
    pub fn forget_client(&mut self, client: &Bytes, why: &str) {
        let dropped = self.queue.remove_client(client);
        for request in &dropped {
            self.owned.remove(request.key());
        }
        if !dropped.is_empty() {
            self.stats.forgotten += dropped.len() as u64;
            tracing::info!(client = %frames::show(client), why, dropped = dropped.len(), "client's queued requests dropped");
        }
    }

    /// Stops queueing: drops what waits and says how many requests workers still hold.
    pub fn close(&mut self) -> (usize, usize) {
        let dropped = self.queue.drain();
        for request in &dropped {
            self.owned.remove(request.key());
        }
        (self.held(), dropped.len())
    }

    /// Requests held by workers.
    pub fn held(&self) -> usize {
        self.workers.values().map(|w| w.held.len()).sum()
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
        self.workers.len()
    }
}

#[cfg(test)]
mod model {
    //! The books against a plain model under random sequences of events: no request lost,
    //! none held twice, credits bounded and matching the idle queue, and every request still
    //! owned served once a worker is there.

    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Event {
        Request {
            client: u8,
            id: u8,
        },
        Ready(u8),
        /// Dispatch all that can be, each send taken or refused.
        Dispatch {
            refuse_every: u8,
        },
        /// A worker answers the n-th request it holds (or a random key, as a repeat would).
        Reply {
            worker: u8,
            nth: u8,
        },
        Purge(u8),
        Leaving(u8),
        Forget(u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0..3u8, 0..12u8).prop_map(|(client, id)| Event::Request { client, id }),
            3 => (0..3u8).prop_map(Event::Ready),
            3 => (0..5u8).prop_map(|refuse_every| Event::Dispatch { refuse_every }),
            4 => (0..3u8, 0..4u8).prop_map(|(worker, nth)| Event::Reply { worker, nth }),
            1 => (0..3u8).prop_map(Event::Purge),
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

    fn owned(books: &Books) -> BTreeSet<RequestKey> {
        books.owned.iter().cloned().collect()
    }

    /// What must hold between any two events.
    fn check(books: &Books) {
        let mut held = BTreeSet::new();
        for (wid, worker) in &books.workers {
            for key in worker.held.keys() {
                assert!(held.insert(key.clone()), "{key:?} held twice");
            }
            let in_idle = books.idle.iter().filter(|i| *i == wid).count();
            assert_eq!(in_idle, worker.credits, "credits of {wid:?} vs idle queue");
            assert!(worker.credits + worker.held.len() <= MAX_CREDITS);
            assert!(!worker.leaving || worker.credits == 0);
        }
        let mut queued = BTreeSet::new();
        let mut copy = books.queue.clone_for_test();
        while let Some(r) = copy.pop() {
            assert!(queued.insert(r.key().clone()), "{:?} queued twice", r.key());
            assert!(!held.contains(r.key()), "{:?} queued and held", r.key());
        }
        assert_eq!(queued.len(), books.queue.len());
        let both: BTreeSet<_> = queued.union(&held).cloned().collect();
        assert_eq!(both, owned(books), "owned = queued + held");
        for key in &books.answered {
            assert!(held.contains(key), "{key:?} answered early but not held");
        }
    }

    /// Worker A takes a request and is purged; worker B takes the copy; A's reply comes after
    /// all. The client gets A's reply; B's only frees B's slot; purging B then runs nothing again.
    #[test]
    fn a_late_reply_answers_once_while_another_worker_holds_the_copy() {
        for purge_b in [false, true] {
            let mut books = Books::new(6, 1 << 20, Heartbeat::default());
            let (a, b) = (id(1), id(2));
            assert!(books.request(request(1, 1)).is_none(), "no worker yet");
            books.ready(a.clone());
            let (to, r) = books.next_dispatch().expect("dispatched");
            assert_eq!(to, a);
            books.handed(&to, r);
            books.purge(&a, "test");
            books.ready(b.clone());
            let (to, r) = books.next_dispatch().expect("dispatched again");
            assert_eq!(to, b);
            let key = r.key().clone();
            books.handed(&to, r);
            assert_eq!(books.reply(&a, &key), ReplyFate::Forward, "A's late reply");
            check(&books);
            if purge_b {
                books.purge(&b, "test");
                assert_eq!(books.queued(), 0, "answered: not queued again");
            } else {
                assert_eq!(books.reply(&b, &key), ReplyFate::Stale, "B's reply");
                assert_eq!(books.idle(), 1, "B's slot is free again");
            }
            assert!(books.owned.is_empty());
            assert!(books.answered.is_empty());
            check(&books);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn no_request_lost_or_held_twice(events in proptest::collection::vec(event(), 1..80)) {
            let mut books = Books::new(6, 20, Heartbeat::default());
            // Keys whose reply went to the client, in any event so far: a key may leave the
            // books later without a reply forwarded then (its copy answered early).
            let mut forwarded = BTreeSet::new();
            for event in events {
                let before = owned(&books);
                let mut answered = BTreeSet::new();
                match event.clone() {
                    Event::Request { client: c, id } => {
                        // A key asked again after its answer is a new request.
                        let key = request(c, id).key().clone();
                        if !books.owned.contains(&key) {
                            forwarded.remove(&key);
                        }
                        if let Some((worker, request)) = books.request(request(c, id)) {
                            books.handed(&worker, request);
                        }
                    }
                    Event::Ready(w) => books.ready(id(w)),
                    Event::Dispatch { refuse_every } => {
                        let mut n = 0u8;
                        while let Some((worker, request)) = books.next_dispatch() {
                            n = n.wrapping_add(1);
                            if refuse_every > 0 && n.is_multiple_of(refuse_every) {
                                books.not_handed(&worker, request, "refused");
                            } else {
                                books.handed(&worker, request);
                            }
                        }
                    }
                    Event::Reply { worker: w, nth } => {
                        let key = books
                            .workers
                            .get(&id(w))
                            .and_then(|wk| wk.held.keys().nth(nth as usize).cloned())
                            .unwrap_or_else(|| request(nth % 3, nth).key().clone());
                        if books.reply(&id(w), &key) == ReplyFate::Forward {
                            prop_assert!(forwarded.insert(key.clone()), "{:?} forwarded twice", key);
                            answered.insert(key);
                        }
                    }
                    Event::Purge(w) => books.purge(&id(w), "test"),
                    Event::Leaving(w) => books.leaving(&id(w)),
                    Event::Forget(c) => books.forget_client(&client(c), "test"),
                }
                check(&books);
                // A key leaves the books only answered or dropped on purpose: its client gone,
                // or the newest of the longest queue displaced by a new request.
                let after = owned(&books);
                let left: Vec<&RequestKey> = before
                    .difference(&after)
                    .filter(|k| !answered.contains(*k) && !forwarded.contains(*k))
                    .collect();
                match event {
                    Event::Forget(c) => prop_assert!(left.iter().all(|k| k.client == client(c))),
                    Event::Request { client: c, .. } => {
                        prop_assert!(left.iter().all(|k| k.client != client(c)), "the sender displaced itself")
                    }
                    _ => prop_assert!(left.is_empty(), "{:?} lost", left),
                }
            }
            // A fresh worker with room for everything: every owned request not answered yet is
            // served, once.
            let still: BTreeSet<RequestKey> = owned(&books)
                .into_iter()
                .filter(|k| !books.answered.contains(k))
                .collect();
            let others: Vec<Bytes> = books.workers.keys().cloned().collect();
            for w in others {
                books.purge(&w, "finale");
            }
            let fresh = id(9);
            for _ in 0..books.queued() {
                books.ready(fresh.clone());
            }
            let mut served = BTreeSet::new();
            while let Some((worker, request)) = books.next_dispatch() {
                prop_assert!(served.insert(request.key().clone()), "served twice");
                prop_assert!(!forwarded.contains(request.key()), "answered, then served again");
                books.handed(&worker, request.clone());
                prop_assert_eq!(books.reply(&worker, request.key()), ReplyFate::Forward);
            }
            prop_assert_eq!(&served, &still);
            prop_assert!(books.owned.is_empty());
            check(&books);
        }
    }
}
