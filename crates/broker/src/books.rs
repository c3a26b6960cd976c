//! The broker's books, without sockets: which requests wait, which worker holds which, which
//! worker slots are free. `broker.rs` moves messages; this decides where they go, and is tested
//! against a plain model under random sequences of events.
//!
//! - Requests wait in a [`RequestQueue`] (per client, served in turn, bounded).
//! - Workers' free slots (READY credits) wait in a least-recently-used queue; only READY or a
//!   reply to a request the worker held gives one; a heartbeat never does.
//! - Every request queued or held is *owned*: one that arrives again while owned is a retry
//!   and is merged, so no request is ever held twice or by two workers.
//! - A purged worker's requests go back to the front of the queue.

use std::collections::VecDeque;

use bytes::Bytes;
use common::frames;
use common::heartbeat::{Heartbeat, Liveness};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use crate::protocol::{Request, RequestKey};
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
    held: HashMap<RequestKey, Request>,
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
    owned: HashSet<RequestKey>,
    idle: VecDeque<Bytes>,
    workers: HashMap<Bytes, Worker>,
    pub stats: BrokerStats,
}

impl Books {
    pub fn new(max_queued: usize, heartbeat: Heartbeat) -> Self {
        Self {
            heartbeat,
            queue: RequestQueue::new(max_queued),
            owned: HashSet::new(),
            idle: VecDeque::new(),
            workers: HashMap::new(),
            stats: BrokerStats::default(),
        }
    }

    /// A valid request from a client: queued, merged with the copy already owned, or dropped
    /// because the queue is full.
    pub fn request(&mut self, request: Request) {
        self.stats.requests_in += 1;
        let key = request.key();
        if self.owned.contains(&key) {
            // A retry of a request still queued or with a worker: its reply answers both.
            self.stats.merged += 1;
            return;
        }
        match self.queue.push(request) {
            Ok(()) => {
                self.owned.insert(key);
            }
            Err(overflow) => {
                self.stats.rejected += 1;
                if let Overflow::Displaced(dropped) = overflow {
                    self.owned.remove(&dropped.key());
                    self.owned.insert(key);
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

    /// READY: one more free slot for this worker (which is registered on its first READY).
    pub fn ready(&mut self, worker_id: Bytes) {
        let heartbeat = self.heartbeat;
        let worker = self.workers.entry(worker_id.clone()).or_insert_with(|| {
            tracing::info!(worker = %frames::show(&worker_id), "worker ready");
            Worker {
                liveness: Liveness::new(heartbeat),
                credits: 0,
                held: HashMap::new(),
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
        if !answered {
            // A late reply from a worker purged meanwhile: it still answers the client, and a
            // queued copy need not run. If the key is no longer owned, the request was
            // answered already and this is a repeat.
            if !self.owned.contains(key) {
                self.stats.stale_replies += 1;
                return ReplyFate::Stale;
            }
            if self.queue.remove(key).is_none() {
                // Held by another worker, whose reply will free its slot.
                return ReplyFate::Forward;
            }
        }
        self.owned.remove(key);
        ReplyFate::Forward
    }

    /// The next request to hand out and the least recently used worker with a free slot.
    /// The caller sends it, then says [`Books::handed`] or [`Books::not_handed`].
    pub fn next_dispatch(&mut self) -> Option<(Bytes, Request)> {
        while !self.queue.is_empty() {
            let worker_id = self.idle.pop_front()?;
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                continue; // a slot of a purged worker
            };
            worker.credits -= 1;
            let request = self.queue.pop().expect("queue is not empty");
            return Some((worker_id, request));
        }
        None
    }

    /// The worker's queue took the request: it holds it now.
    pub fn handed(&mut self, worker_id: &Bytes, request: Request) {
        self.stats.dispatched += 1;
        if let Some(worker) = self.workers.get_mut(worker_id) {
            worker.held.insert(request.key(), request);
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
        let requeued = worker.held.len();
        for (_, request) in worker.held {
            self.queue.push_front(request);
        }
        self.stats.requeued += requeued as u64;
        tracing::warn!(worker = %frames::show(worker_id), why, requeued, "worker purged");
    }

    /// Drops the queued requests of a client that went away or stopped reading: nobody would
    /// read the replies.
    pub fn forget_client(&mut self, client: &Bytes, why: &str) {
        let dropped = self.queue.remove_client(client);
        for request in &dropped {
            self.owned.remove(&request.key());
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
            self.owned.remove(&request.key());
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

    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}
