//! The master's books: the state of every task, the workers' credits and liveness, and the
//! counts of the summary. Pure bookkeeping, no sockets and no files: the ventilator asks it what
//! to send, the sink tells it what came back, and it is unit-tested on its own.
//!
//! Credit flow: a task is dealt to one worker ([`Books::next_to_send`] with its name; the
//! ventilator puts it on that worker's task connection) only while that worker has room: the
//! `free` of its last report **capped by its contract** (it may hold no more than the `slots` it
//! announced when it said hello, `threads + prefetch`, itself capped by `--max-slots`), less what
//! it holds by these books, less the copies on their way to it. A probe (for a task connection
//! not yet known to be anyone's) takes the room of the workers without a known connection. An
//! `accept` beyond the contract, or of a task the worker already holds, is refused: the task goes
//! to another worker as after a `defer`.
//!
//! A task is open until its first answer, then done or failed. While open it has copies: each on
//! its way (read, sent, not acknowledged) or accepted by a worker. Only a worker that accepted a
//! copy of the task may answer it (`done`/`failed` from anyone else are counted `stray` and change
//! nothing), and a `done` is settled by the master only once it checked the output (path mode: on
//! disk; inline: written), off its loop.
//!
//! A worker whose `done` does not hold up (no output on disk, or no image inline) is distrusted
//! for the rest of the batch: no credit, and every `accept` of it refused, so that a liar or a
//! worker writing somewhere else costs one attempt, not the batch.
//!
//! Delivery limit: a copy lost to the task timeout, a worker lost (silent) or restarted with it,
//! or a `done` without its output, costs the task an attempt; at `--max-attempts` the task fails
//! with the reasons. A copy lost in transit (never acknowledged) or handed back (`defer`, `bye`)
//! costs nothing.
//!
//! Tail copies: once nothing is left to send, a task held far longer than the batch's tasks take
//! (four times the median, at least 0.5 s) gets one backup copy for a worker with room; the first
//! answer wins. A worker that takes tasks and never finishes them (hung, or hoarding) then costs
//! the batch little more than its healthy time, not the task timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::heartbeat::{Heartbeat, Liveness};
use tokio::time::Instant;

use super::Failure;
use crate::filter;
use crate::protocol::{Event, Report, WirePath};

/// A task deferred more often than this (times the number of workers, plus one) in a row waits
/// [`PARK`] before its next try instead of spinning.
const DEFERS_PER_WORKER: u32 = 2;
const PARK: Duration = Duration::from_millis(50);
/// Workers remembered per task as allowed to answer it.
const MAX_ANSWERERS: usize = 8;
/// Reasons kept per task for its failure message.
const MAX_LOSSES: usize = 8;
/// A task held this many times the median task time (accept to done), and at least
/// [`STRAGGLER_MIN`], gets a backup copy once nothing else is left to send.
const STRAGGLER_FACTOR: u32 = 4;
const STRAGGLER_MIN: Duration = Duration::from_millis(500);
/// Task times kept for the median.
const DURATIONS_KEPT: usize = 64;

/// The books' rules, from the master's flags.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    /// Workers are lost after this many of their own heartbeat periods of silence.
    pub liveness: u32,
    /// Attempts a task may cost before it fails.
    pub max_attempts: u32,
    /// Most tasks one worker may hold, whatever `slots` it announces.
    pub max_slots: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Open,
    Done,
    Failed,
}

/// One copy of a task out in the world.
#[derive(Debug)]
struct Copy {
    /// The worker that accepted it; `None` while on its way (being read, sent, unacknowledged).
    worker: Option<String>,
    /// While on its way: the worker it was dealt to (its task connection's), counted in that
    /// worker's `inflight`; `None` for a probe of a connection not yet known to be anyone's.
    to: Option<String>,
    /// When it was sent, or accepted.
    at: Instant,
    /// Handed to the socket (before that, being read): the acknowledgement window runs.
    sent: bool,
    /// Image bytes it carries (inline), counted in transit until acknowledged.
    bytes: u64,
    /// A tail copy beside a held one.
    backup: bool,
}

#[derive(Debug)]
struct Entry {
    rel: PathBuf,
    phase: Phase,
    /// In `pending` or `parked`.
    queued: bool,
    /// A backup copy is wanted beside the held one.
    backup_wanted: bool,
    /// It had its backup (one per task).
    backed_up: bool,
    /// A `done` is being checked or written; other answers wait for the outcome.
    settling: bool,
    copies: Vec<Copy>,
    /// Workers that accepted a copy: the only ones whose answers count.
    answerers: Vec<String>,
    attempts: u32,
    losses: Vec<String>,
    defers: u32,
}

impl Entry {
    /// Whether a new copy should go out now.
    fn wants_copy(&self) -> bool {
        self.phase == Phase::Open
            && !self.settling
            && (self.copies.is_empty()
                || (self.backup_wanted
                    && self.copies.len() == 1
                    && self.copies[0].worker.is_some()))
    }

    fn copy_of(&self, worker: &str) -> Option<usize> {
        self.copies
            .iter()
            .position(|c| c.worker.as_deref() == Some(worker))
    }

    fn unacked_copy(&self) -> Option<usize> {
        self.copies
            .iter()
            .position(|c| c.worker.is_none() && c.sent)
    }
}

#[derive(Debug)]
struct WorkerState {
    /// `free` of its last report.
    free: u32,
    /// Most tasks it may hold: its `slots` at hello, capped by the rules.
    cap: u32,
    /// Copies it accepted and has not answered, by these books.
    held: u32,
    /// Copies dealt to it and not yet acknowledged (being read, or on the wire).
    inflight: u32,
    /// When it was first heard from.
    since: Instant,
    liveness: Liveness,
}

impl WorkerState {
    /// Copies it may be dealt now: its last `free`, capped by its contract, less what is on
    /// its way to it.
    fn room(&self) -> u32 {
        self.free
            .min(self.cap.saturating_sub(self.held))
            .saturating_sub(self.inflight)
    }
}

/// How a `done` turned out once the master looked.
#[derive(Debug, PartialEq)]
pub(super) enum Settled {
    /// The output is there (path) or written (inline).
    Done,
    /// The worker's fault: no output on disk, or no image inline. One attempt lost, and the
    /// worker distrusted.
    Bogus(String),
    /// The master's own fault: the output could not be written. The task fails.
    Unwritable(String),
}

/// What a worker's answer asks of the master.
#[derive(Debug, PartialEq)]
pub(super) enum Answer {
    /// `done` from a worker that held the task: check the output (path) or write it (inline),
    /// then settle with [`Books::settle`].
    Done { id: usize, worker: String },
    /// `failed`, already settled.
    Failed,
}

/// Every task of one batch and every worker heard from.
#[derive(Debug)]
pub(super) struct Books {
    batch: String,
    rules: Rules,
    entries: Vec<Entry>,
    pending: VecDeque<usize>,
    /// Tasks deferred many times in a row wait a little before the next try.
    parked: Vec<(Instant, usize)>,
    workers: HashMap<String, WorkerState>,
    /// Workers whose `done` did not hold up: no credit and no task for the rest of the batch.
    distrusted: BTreeSet<String>,
    /// Copies on their way (read, sent, not acknowledged).
    unacked: u32,
    /// Of those, probes: copies dealt to a connection not yet known to be anyone's.
    probes: u32,
    /// Image bytes of the sent copies not yet acknowledged (inline).
    transit_bytes: u64,
    finished: usize,
    failures: Vec<Failure>,
    by_worker: BTreeMap<String, u64>,
    resent: u64,
    deferred: u64,
    refused: u64,
    stray: u64,
    backups: u64,
    /// Recent accept-to-done times.
    durations: VecDeque<Duration>,
    first_sent: Option<Instant>,
    last_answer: Option<Instant>,
}

impl Books {
    /// Opens the books of `batch` over `rels`; files that are not images by extension are failed
    /// at once, without bothering a worker.
    pub(super) fn new(batch: String, rules: Rules, rels: Vec<PathBuf>) -> Self {
        let mut books = Self {
            batch,
            rules,
            entries: rels
                .into_iter()
                .map(|rel| Entry {
                    rel,
                    phase: Phase::Open,
                    queued: false,
                    backup_wanted: false,
                    backed_up: false,
                    settling: false,
                    copies: Vec::new(),
                    answerers: Vec::new(),
                    attempts: 0,
                    losses: Vec::new(),
                    defers: 0,
                })
                .collect(),
            pending: VecDeque::new(),
            parked: Vec::new(),
            workers: HashMap::new(),
            distrusted: BTreeSet::new(),
            unacked: 0,
            probes: 0,
            transit_bytes: 0,
            finished: 0,
            failures: Vec::new(),
            by_worker: BTreeMap::new(),
            resent: 0,
            deferred: 0,
            refused: 0,
            stray: 0,
            backups: 0,
            durations: VecDeque::new(),
            first_sent: None,
            last_answer: None,
        };
        for i in 0..books.entries.len() {
            if filter::is_image_path(&books.entries[i].rel) {
                books.entries[i].queued = true;
                books.pending.push_back(i);
            } else {
                books.finish(
                    i,
                    Err("not an image file (unsupported extension)".into()),
                    None,
                );
            }
        }
        books
    }

    pub(super) fn total(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn finished(&self) -> usize {
        self.finished
    }

    pub(super) fn is_complete(&self) -> bool {
        self.finished == self.entries.len()
    }

    pub(super) fn workers(&self) -> usize {
        self.workers.len()
    }

    pub(super) fn rel(&self, id: usize) -> &Path {
        &self.entries[id].rel
    }

    /// How many more tasks may be sent now: the workers' room, less the copies on their way.
    pub(super) fn sendable(&self) -> u32 {
        let room = self
            .workers
            .iter()
            .filter(|(w, _)| !self.distrusted.contains(*w))
            .map(|(_, state)| state.room())
            .fold(0u32, u32::saturating_add);
        room.saturating_sub(self.probes)
    }

    /// Copies `worker` may be dealt now (0 for a worker unknown or distrusted).
    pub(super) fn room_of(&self, worker: &str) -> u32 {
        match self.workers.get(worker) {
            Some(state) if !self.distrusted.contains(worker) => state.room(),
            _ => 0,
        }
    }

    /// The room of the workers `linked` says have no task connection known to be theirs (stock
    /// workers, whose PULL sets no identity), heard from at least `settled` ago, less the probes
    /// on their way: how many connections not yet known to be anyone's may get a probe.
    pub(super) fn unlinked_room(&self, linked: impl Fn(&str) -> bool, settled: Duration) -> u32 {
        let now = Instant::now();
        let room = self
            .workers
            .iter()
            .filter(|(w, s)| {
                !linked(w) && !self.distrusted.contains(*w) && now - s.since >= settled
            })
            .map(|(_, s)| s.room())
            .fold(0u32, u32::saturating_add);
        room.saturating_sub(self.probes)
    }

    /// Image bytes sent and not yet acknowledged.
    pub(super) fn transit_bytes(&self) -> u64 {
        self.transit_bytes
    }

    /// The next task to send, dealt to worker `to` (`None`: a probe, for a connection not yet
    /// known to be anyone's), if credits allow one: a copy of it is on its way from now on (to
    /// be read, then [`sent`](Self::sent), or given back with [`unsent`](Self::unsent) or
    /// [`unreadable`](Self::unreadable)).
    pub(super) fn next_to_send(&mut self, to: Option<&str>) -> Option<usize> {
        loop {
            let room = match to {
                Some(w) => self.room_of(w),
                None => self.sendable(),
            };
            if room == 0 {
                return None;
            }
            let i = self.pending.pop_front()?;
            let e = &mut self.entries[i];
            e.queued = false;
            if !e.wants_copy() {
                continue; // answered, or accepted after all, since it was queued
            }
            let backup = !e.copies.is_empty();
            e.backup_wanted = false;
            e.copies.push(Copy {
                worker: None,
                to: to.map(str::to_string),
                at: Instant::now(),
                sent: false,
                bytes: 0,
                backup,
            });
            self.unacked += 1;
            match to.and_then(|w| self.workers.get_mut(w)) {
                Some(state) => state.inflight += 1,
                None => self.probes += 1,
            }
            return Some(i);
        }
    }

    /// The copy of `id` on its way was lost with its connection (closed, or a probe nobody
    /// took): it goes first next time, at no cost. Returns whether there was one.
    pub(super) fn take_back(&mut self, id: usize) -> bool {
        let Some(k) = self.entries[id].unacked_copy() else {
            return false;
        };
        self.drop_copy(id, k);
        if self.requeue(id, true) {
            self.resent += 1;
        }
        true
    }

    /// `worker` is gone (its report connection closed, nothing else of it open): what it held
    /// is lost, at the cost of an attempt each, and sent again.
    pub(super) fn lose_worker(&mut self, worker: &str, why: &str) {
        if self.workers.remove(worker).is_some() {
            tracing::warn!(%worker, why, "worker lost, re-sending its tasks");
            self.release_worker(worker, Some(format!("{worker} lost ({why})")));
        }
    }

    fn launched_copy(&self, id: usize) -> Option<usize> {
        self.entries[id]
            .copies
            .iter()
            .rposition(|c| c.worker.is_none() && !c.sent)
    }

    /// Whether the copy [`next_to_send`](Self::next_to_send) launched for `id` still waits to
    /// be sent (an answer may have settled the task while its image was read).
    pub(super) fn is_launched(&self, id: usize) -> bool {
        self.launched_copy(id).is_some()
    }

    /// Whether task `id` wants a copy sent now (open, not answered, no copy held).
    pub(super) fn wants_copy(&self, id: usize) -> bool {
        self.entries[id].wants_copy()
    }

    /// The launched copy of `id`, carrying `bytes` of image, was handed to the socket.
    pub(super) fn sent(&mut self, id: usize, bytes: u64) {
        let now = Instant::now();
        if let Some(k) = self.launched_copy(id) {
            let c = &mut self.entries[id].copies[k];
            c.sent = true;
            c.at = now;
            c.bytes = bytes;
            self.transit_bytes += bytes;
        }
        self.first_sent.get_or_insert(now);
    }

    /// The launched copy of `id` could not be sent now: the task goes first next time.
    pub(super) fn unsent(&mut self, id: usize) {
        if let Some(k) = self.launched_copy(id) {
            self.drop_copy(id, k);
        }
        self.requeue(id, true);
    }

    /// The image of `id` cannot be read: the task fails with `reason`, without a worker.
    pub(super) fn unreadable(&mut self, id: usize, reason: String) {
        if let Some(k) = self.launched_copy(id) {
            self.drop_copy(id, k);
        }
        if self.entries[id].phase == Phase::Open {
            self.finish(id, Err(reason), None);
        }
    }

    /// Books one report: the worker's credit and liveness, and the task event it carries.
    pub(super) fn on_report(&mut self, report: &Report) -> Option<Answer> {
        let worker = report.worker.as_str();
        if report.event == Event::Bye {
            if self.workers.remove(worker).is_some() {
                tracing::info!(%worker, "worker left");
            }
            self.release_worker(worker, None);
            return None;
        }
        let expiry = Heartbeat {
            interval: Duration::from_millis(report.heartbeat_ms.max(1)),
            liveness: self.rules.liveness,
        };
        let known = self.workers.contains_key(worker);
        let cap = report.slots.min(self.rules.max_slots);
        if !known {
            tracing::info!(%worker, slots = report.slots, cap, "worker joined");
            let state = WorkerState {
                free: 0,
                cap,
                held: 0,
                inflight: 0,
                since: Instant::now(),
                liveness: Liveness::new(expiry),
            };
            self.workers.insert(worker.to_string(), state);
        }
        // (Looked up, not `entry`: a report of a known worker allocates no key.)
        let state = self.workers.get_mut(worker)?;
        if report.event == Event::Hello {
            // Its contract: what it says at hello holds until it says hello again.
            state.cap = cap;
        }
        state.free = report.free;
        state.liveness = Liveness::new(expiry);
        if report.event == Event::Hello && known {
            // A worker says hello again after rebuilding its links: reports it sent on the old
            // ones may be lost (a partition), so what it accepted goes back. The first answer
            // still wins if its own arrives after all. Holding nothing now, it restarted: those
            // copies are lost for good, and cost their tasks an attempt.
            let restarted = report.free >= report.slots;
            self.release_worker(worker, restarted.then(|| format!("{worker} restarted")));
        }
        let (batch, id) = match &report.event {
            Event::Accept { batch, id }
            | Event::Defer { batch, id }
            | Event::Done { batch, id }
            | Event::Failed { batch, id, .. } => (batch, *id),
            Event::Hello | Event::Heartbeat | Event::Bye => return None,
        };
        if *batch != self.batch || id >= self.entries.len() as u64 {
            return None; // a previous master's batch
        }
        let id = id as usize;
        match &report.event {
            Event::Accept { .. } => {
                self.accept(id, worker);
                None
            }
            Event::Defer { .. } => {
                self.defer(id);
                None
            }
            Event::Done { .. } => self.answer(id, worker, None),
            Event::Failed { reason, .. } => self.answer(id, worker, Some(reason.clone())),
            Event::Hello | Event::Heartbeat | Event::Bye => None,
        }
    }

    fn accept(&mut self, id: usize, worker: &str) {
        let Some(state) = self.workers.get(worker) else {
            return;
        };
        let e = &self.entries[id];
        if e.phase != Phase::Open {
            return;
        }
        let unacked = e.unacked_copy();
        let duplicate = e.copy_of(worker).is_some();
        let distrusted = self.distrusted.contains(worker);
        if duplicate || distrusted || state.held >= state.cap {
            // Beyond its contract, a second copy of what it holds, or from a worker whose
            // `done` did not hold up: not its task. It goes elsewhere as after a `defer`; an
            // honest worker gets here only with a backup copy of what it holds.
            self.refused += 1;
            tracing::debug!(%worker, id, duplicate, distrusted, held = state.held, cap = state.cap, "accept refused");
            if let Some(k) = unacked {
                self.drop_copy(id, k);
                self.requeue(id, true);
            }
            return;
        }
        let now = Instant::now();
        let e = &mut self.entries[id];
        match unacked {
            Some(k) => {
                let c = &mut e.copies[k];
                c.worker = Some(worker.to_string());
                c.at = now;
                self.unacked -= 1;
                self.transit_bytes -= c.bytes;
                c.bytes = 0;
                match c.to.take() {
                    Some(to) => {
                        if let Some(to) = self.workers.get_mut(&to) {
                            to.inflight = to.inflight.saturating_sub(1);
                        }
                    }
                    None => self.probes = self.probes.saturating_sub(1),
                }
            }
            // A copy given up on (lost in transit, or its lease ran out) is accepted after all:
            // the worker has it.
            None if !e.settling => e.copies.push(Copy {
                worker: Some(worker.to_string()),
                to: None,
                at: now,
                sent: true,
                bytes: 0,
                backup: false,
            }),
            None => return,
        }
        if !e.answerers.iter().any(|w| w == worker) && e.answerers.len() < MAX_ANSWERERS {
            e.answerers.push(worker.to_string());
        }
        if let Some(state) = self.workers.get_mut(worker) {
            state.held += 1;
        }
    }

    fn defer(&mut self, id: usize) {
        if self.entries[id].phase != Phase::Open {
            return;
        }
        let Some(k) = self.entries[id].unacked_copy() else {
            return; // its copy was given up on already
        };
        self.drop_copy(id, k);
        self.deferred += 1;
        let limit = DEFERS_PER_WORKER * (self.workers.len() as u32 + 1);
        let e = &mut self.entries[id];
        if !e.wants_copy() || e.queued {
            return;
        }
        e.defers += 1;
        if e.defers > limit {
            // Every worker we tried was full although credits said otherwise (a worker whose
            // task link is down): do not spin, wait for the books to settle.
            e.defers = 0;
            e.queued = true;
            self.parked.push((Instant::now() + PARK, id));
        } else {
            self.requeue(id, true);
        }
    }

    fn answer(&mut self, id: usize, worker: &str, failed: Option<String>) -> Option<Answer> {
        let e = &self.entries[id];
        if e.phase != Phase::Open || e.settling {
            return None;
        }
        if !e.answerers.iter().any(|w| w == worker) || self.distrusted.contains(worker) {
            self.stray += 1;
            tracing::debug!(%worker, id, "answer from a worker that never held the task (or is distrusted), ignored");
            return None;
        }
        if let Some(k) = e.copy_of(worker) {
            if failed.is_none() {
                if self.durations.len() == DURATIONS_KEPT {
                    self.durations.pop_front();
                }
                self.durations.push_back(e.copies[k].at.elapsed());
            }
            self.drop_copy(id, k);
        }
        match failed {
            None => {
                self.entries[id].settling = true;
                Some(Answer::Done {
                    id,
                    worker: worker.to_string(),
                })
            }
            Some(reason) => {
                self.finish(id, Err(reason), Some(worker.to_string()));
                Some(Answer::Failed)
            }
        }
    }

    /// Settles a `done` of `worker` once its output was checked (path) or written (inline).
    /// Returns whether the task is done now.
    pub(super) fn settle(&mut self, id: usize, worker: &str, outcome: Settled) -> bool {
        let e = &mut self.entries[id];
        e.settling = false;
        if e.phase != Phase::Open {
            return false;
        }
        match outcome {
            Settled::Done => {
                self.finish(id, Ok(()), Some(worker.to_string()));
                true
            }
            Settled::Bogus(reason) => {
                tracing::warn!(path = %e.rel.display(), %worker, %reason, "a done that does not hold up: worker distrusted");
                self.distrusted.insert(worker.to_string());
                self.lose(id, format!("{worker}: {reason}"));
                false
            }
            Settled::Unwritable(reason) => {
                self.finish(id, Err(reason), None);
                false
            }
        }
    }

    /// Removes copy `k` of task `id` from the counts.
    fn drop_copy(&mut self, id: usize, k: usize) {
        let e = &mut self.entries[id];
        let c = e.copies.swap_remove(k);
        match &c.worker {
            Some(w) => {
                if let Some(state) = self.workers.get_mut(w) {
                    state.held = state.held.saturating_sub(1);
                }
            }
            None => {
                self.unacked -= 1;
                match c.to.as_deref().and_then(|to| self.workers.get_mut(to)) {
                    Some(to) => to.inflight = to.inflight.saturating_sub(1),
                    None if c.to.is_none() => self.probes = self.probes.saturating_sub(1),
                    None => {}
                }
                if c.sent {
                    self.transit_bytes -= c.bytes;
                }
                if c.backup {
                    e.backup_wanted = true;
                }
            }
        }
    }

    /// Queues `id` to be sent again if it wants a copy and is not queued already.
    fn requeue(&mut self, id: usize, front: bool) -> bool {
        let e = &mut self.entries[id];
        if !e.wants_copy() || e.queued {
            return false;
        }
        e.queued = true;
        if front {
            self.pending.push_front(id);
        } else {
            self.pending.push_back(id);
        }
        true
    }

    /// A copy of `id` was lost for `why`: one attempt more, and the task fails at the limit.
    fn lose(&mut self, id: usize, why: String) {
        let e = &mut self.entries[id];
        e.attempts += 1;
        if e.losses.len() < MAX_LOSSES {
            e.losses.push(why);
        }
        if e.attempts >= self.rules.max_attempts {
            let reason = format!(
                "gave up after {} attempts: {}",
                e.attempts,
                e.losses.join("; ")
            );
            self.finish(id, Err(reason), None);
        } else if self.requeue(id, false) {
            self.resent += 1;
        }
    }

    /// Settles task `id`: done (`Ok`) or failed with a reason. Its other copies are forgotten.
    fn finish(&mut self, id: usize, outcome: Result<(), String>, worker: Option<String>) {
        while !self.entries[id].copies.is_empty() {
            self.drop_copy(id, 0);
        }
        let entry = &mut self.entries[id];
        entry.settling = false;
        match outcome {
            Ok(()) => {
                entry.phase = Phase::Done;
                if let Some(w) = worker {
                    *self.by_worker.entry(w).or_default() += 1;
                }
            }
            Err(reason) => {
                entry.phase = Phase::Failed;
                tracing::warn!(path = %entry.rel.display(), %reason, "image failed");
                self.failures.push(Failure {
                    path: WirePath(entry.rel.clone()),
                    reason,
                });
            }
        }
        self.finished += 1;
        self.last_answer = Some(Instant::now());
    }

    /// Takes back every copy `worker` holds: sent again, and with `lost` (why they are gone for
    /// good) at the cost of an attempt each.
    fn release_worker(&mut self, worker: &str, lost: Option<String>) {
        for i in 0..self.entries.len() {
            let Some(k) = self.entries[i].copy_of(worker) else {
                continue;
            };
            self.drop_copy(i, k);
            match &lost {
                Some(why) => self.lose(i, why.clone()),
                None => {
                    if self.requeue(i, false) {
                        self.resent += 1;
                    }
                }
            }
        }
    }

    /// Expires what ran out: workers silent for their liveness window (their copies lost),
    /// copies unacknowledged for `ack_window` (sent again, at no cost) and copies accepted
    /// `task_timeout` ago (lost); and releases parked tasks that waited long enough.
    pub(super) fn expire(&mut self, ack_window: Duration, task_timeout: Duration) -> Expired {
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.liveness.is_expired())
            .map(|(id, _)| id.clone())
            .collect();
        for worker in &lost {
            self.workers.remove(worker);
            tracing::warn!(%worker, "worker silent, re-sending its tasks");
            self.release_worker(worker, Some(format!("{worker} lost (silent)")));
        }
        let now = Instant::now();
        let mut unacked = 0;
        for i in 0..self.entries.len() {
            let mut k = 0;
            while k < self.entries[i].copies.len() {
                let c = &self.entries[i].copies[k];
                let age = now.duration_since(c.at);
                match &c.worker {
                    None if c.sent && age > ack_window => {
                        self.drop_copy(i, k);
                        unacked += 1;
                        if self.requeue(i, false) {
                            self.resent += 1;
                        }
                    }
                    Some(w) if age > task_timeout => {
                        let why = format!(
                            "no answer from {w} within the {} s task timeout",
                            task_timeout.as_secs_f64()
                        );
                        tracing::info!(path = %self.entries[i].rel.display(), worker = %w, "task lease expired");
                        self.drop_copy(i, k);
                        self.lose(i, why);
                    }
                    _ => k += 1,
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = self.parked.drain(..).partition(|(t, _)| *t <= now);
        self.parked = later;
        for (_, i) in due {
            self.entries[i].queued = false;
            self.requeue(i, false);
        }
        Expired { lost, unacked }
    }

    /// Once nothing is left to send and workers have room: a backup copy of each task held
    /// longer than [`STRAGGLER_FACTOR`] times the median task time (at least
    /// [`STRAGGLER_MIN`]), oldest first, as many as there is room. Returns how many.
    pub(super) fn request_backups(&mut self) -> usize {
        if !self.pending.is_empty() || !self.parked.is_empty() {
            return 0;
        }
        let room = self.sendable() as usize;
        if room == 0 || self.durations.is_empty() {
            return 0;
        }
        let mut times: Vec<Duration> = self.durations.iter().copied().collect();
        times.sort();
        let threshold = (times[times.len() / 2] * STRAGGLER_FACTOR).max(STRAGGLER_MIN);
        let now = Instant::now();
        let mut stragglers: Vec<(Instant, usize)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                e.phase == Phase::Open
                    && !e.settling
                    && !e.queued
                    && !e.backed_up
                    && e.copies.len() == 1
                    && e.copies[0].worker.is_some()
                    && now.duration_since(e.copies[0].at) > threshold
            })
            .map(|(i, e)| (e.copies[0].at, i))
            .collect();
        stragglers.sort();
        stragglers.truncate(room);
        for &(_, i) in &stragglers {
            let e = &mut self.entries[i];
            e.backup_wanted = true;
            e.backed_up = true;
            tracing::info!(
                path = %e.rel.display(),
                holder = ?e.copies[0].worker,
                threshold_ms = threshold.as_millis() as u64,
                "held long past the median: a backup copy"
            );
            self.requeue(i, false);
            self.backups += 1;
            self.resent += 1;
        }
        stragglers.len()
    }

    /// The workers currently alive.
    pub(super) fn worker_names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// Counts for the summary.
    pub(super) fn tally(&self) -> Tally {
        Tally {
            done: self
                .entries
                .iter()
                .filter(|e| e.phase == Phase::Done)
                .count(),
            failures: self.failures.clone(),
            by_worker: self.by_worker.clone(),
            resent: self.resent,
            deferred: self.deferred,
            refused: self.refused,
            stray: self.stray,
            backups: self.backups,
            distrusted: self.distrusted.iter().cloned().collect(),
            elapsed: match (self.first_sent, self.last_answer) {
                (Some(a), Some(b)) if b > a => b - a,
                _ => Duration::ZERO,
            },
        }
    }
}

/// What [`Books::expire`] found.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Expired {
    /// Workers silent for their liveness window.
    pub lost: Vec<String>,
    /// Tasks that no worker acknowledged within the window: lost in a connection nobody reads.
    pub unacked: usize,
}

/// The books' share of the summary.
#[derive(Debug)]
pub(super) struct Tally {
    pub done: usize,
    pub failures: Vec<Failure>,
    pub by_worker: BTreeMap<String, u64>,
    pub resent: u64,
    pub deferred: u64,
    pub refused: u64,
    pub stray: u64,
    pub backups: u64,
    pub distrusted: Vec<String>,
    /// First task sent to last answer.
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        liveness: 3,
        max_attempts: 3,
        max_slots: 64,
    };

    fn report(worker: &str, free: u32, event: Event) -> Report {
        Report {
            worker: worker.into(),
            slots: 2,
            free,
            heartbeat_ms: 100,
            event,
        }
    }

    fn books(names: &[&str]) -> Books {
        Books::new("b".into(), RULES, names.iter().map(PathBuf::from).collect())
    }

    /// Sends the next task and returns its id.
    fn send(b: &mut Books) -> usize {
        let id = b.next_to_send(None).expect("credit");
        b.sent(id, 0);
        id
    }

    /// Books of one image, sent to worker `w` (one slot) and, if `accepted`, accepted by it.
    fn one_task(accepted: bool) -> Books {
        let mut b = books(&["a.png"]);
        b.on_report(&report("w", 1, Event::Hello));
        send(&mut b);
        if accepted {
            b.on_report(&report("w", 0, accept(0)));
        }
        b
    }

    fn accept(id: u64) -> Event {
        Event::Accept {
            batch: "b".into(),
            id,
        }
    }

    fn done(id: u64) -> Event {
        Event::Done {
            batch: "b".into(),
            id,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn credits_bound_what_is_in_flight() {
        let mut b = books(&["a.png", "b.png", "c.txt"]);
        assert_eq!(b.finished(), 1, "the text file fails at once");
        assert_eq!(b.next_to_send(None), None, "no worker, no credit");
        b.on_report(&report("w", 1, Event::Hello));
        assert_eq!(send(&mut b), 0);
        assert_eq!(b.next_to_send(None), None, "one credit, one task in flight");
        b.on_report(&report("w", 0, accept(0)));
        b.on_report(&report("w", 1, Event::Heartbeat));
        assert_eq!(b.next_to_send(None), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_holds_no_more_than_its_slots_whatever_free_it_claims() {
        let mut b = books(&["a.png", "b.png", "c.png", "d.png"]);
        // Two slots at hello; then free=100,000 on every report while finishing nothing.
        b.on_report(&report("liar", 100_000, Event::Hello));
        assert_eq!(b.sendable(), 2, "capped by its two slots");
        for _ in 0..2 {
            let id = send(&mut b);
            b.on_report(&report("liar", 100_000, accept(id as u64)));
        }
        assert_eq!(b.sendable(), 0, "it holds its two");
        // A third task it accepts anyway (dealt to it by a stale credit) is refused, and goes
        // elsewhere.
        b.on_report(&report("honest", 1, Event::Hello));
        let id = send(&mut b);
        b.on_report(&report("liar", 100_000, accept(id as u64)));
        assert_eq!(b.tally().refused, 1);
        assert_eq!(b.next_to_send(None), Some(id), "sent again at once");
        // Neither can slots announced later raise the contract, nor hello beyond --max-slots.
        let mut big = report("liar", 100_000, Event::Heartbeat);
        big.slots = 1000;
        b.on_report(&big);
        assert_eq!(b.workers["liar"].cap, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_worker_that_held_the_task_may_answer_it() {
        let mut b = one_task(true);
        assert_eq!(b.on_report(&report("ghost", 1000, done(0))), None);
        let failed = Event::Failed {
            batch: "b".into(),
            id: 0,
            reason: "no".into(),
        };
        assert_eq!(b.on_report(&report("ghost", 1000, failed)), None);
        assert_eq!(b.tally().stray, 2);
        assert_eq!(b.finished(), 0);
        assert_eq!(
            b.on_report(&report("w", 1, done(0))),
            Some(Answer::Done {
                id: 0,
                worker: "w".into()
            })
        );
        // A done that does not hold up (no output) costs an attempt and the task goes again.
        b.settle(
            0,
            "w",
            Settled::Bogus("reported done, but no output on disk".into()),
        );
        assert_eq!(b.finished(), 0);
        assert_eq!(b.tally().distrusted, ["w"]);
        assert_eq!(
            b.sendable(),
            2,
            "the ghost's two slots, none of the distrusted worker's"
        );
        b.on_report(&report("v", 1, Event::Hello));
        let id = send(&mut b);
        b.on_report(&report("w", 1, accept(id as u64)));
        assert_eq!(b.tally().refused, 1, "nor may it take a task");
        assert_eq!(
            b.on_report(&report("w", 1, done(0))),
            None,
            "nor answer one"
        );
        assert_eq!(send(&mut b), 0, "which goes to another worker");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_wins_and_other_batches_are_ignored() {
        let mut b = one_task(true);
        let old = Event::Done {
            batch: "old".into(),
            id: 0,
        };
        assert_eq!(b.on_report(&report("w", 1, old)), None);
        let got = b.on_report(&report("w", 1, done(0)));
        assert_eq!(
            got,
            Some(Answer::Done {
                id: 0,
                worker: "w".into()
            })
        );
        b.settle(0, "w", Settled::Done);
        assert_eq!(b.on_report(&report("w", 1, done(0))), None);
        assert!(b.is_complete());
        assert_eq!(b.tally().by_worker.get("w"), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_is_lost_and_its_tasks_go_back() {
        let mut b = books(&["a.png", "b.png"]);
        b.on_report(&report("w", 2, Event::Hello));
        send(&mut b);
        send(&mut b);
        b.on_report(&report("w", 1, accept(0)));
        tokio::time::advance(Duration::from_millis(350)).await;
        let expired = b.expire(Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(expired.lost, ["w"]);
        assert_eq!(b.workers(), 0);
        assert!(
            b.take_back(1),
            "the copy in transit, lost with its connection"
        );
        assert_eq!(
            b.tally().resent,
            2,
            "the accepted task and the one in transit"
        );
        b.on_report(&report("v", 2, Event::Hello));
        assert!(b.next_to_send(None).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_hello_sends_the_accepted_tasks_again() {
        let mut b = one_task(true);
        b.on_report(&report("w", 1, Event::Hello));
        assert_eq!(b.tally().resent, 1);
        assert_eq!(b.next_to_send(None), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn task_timeout_resends_an_accepted_task() {
        let mut b = one_task(true);
        tokio::time::advance(Duration::from_millis(90)).await;
        b.on_report(&report("w", 1, Event::Heartbeat));
        assert_eq!(
            b.expire(Duration::from_secs(60), Duration::from_millis(50)),
            Expired::default()
        );
        assert_eq!(b.tally().resent, 1);
        assert_eq!(b.next_to_send(None), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_times_out_max_attempts_times_fails_with_the_reasons() {
        let mut b = books(&["poison.png"]);
        b.on_report(&report("w", 2, Event::Hello));
        for attempt in 1..=3 {
            let id = send(&mut b);
            b.on_report(&report("w", 1, accept(id as u64)));
            tokio::time::advance(Duration::from_millis(60)).await;
            b.on_report(&report("w", 2, Event::Heartbeat));
            b.expire(Duration::from_secs(60), Duration::from_millis(50));
            assert_eq!(b.is_complete(), attempt == 3, "attempt {attempt}");
        }
        let t = b.tally();
        assert_eq!(t.failures.len(), 1);
        assert!(
            t.failures[0]
                .reason
                .starts_with("gave up after 3 attempts: no answer from w"),
            "{}",
            t.failures[0].reason
        );
        assert_eq!(b.next_to_send(None), None, "never sent again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_held_far_past_the_median_gets_one_backup_copy() {
        let mut b = books(&["a.png", "b.png"]);
        b.on_report(&report("hoarder", 1, Event::Hello));
        let held = send(&mut b);
        b.on_report(&report("hoarder", 1, accept(held as u64)));
        b.on_report(&report("honest", 1, Event::Hello));
        let other = send(&mut b);
        b.on_report(&report("honest", 0, accept(other as u64)));
        tokio::time::advance(Duration::from_millis(10)).await;
        b.on_report(&report("honest", 1, done(other as u64)));
        b.settle(other, "honest", Settled::Done);
        assert_eq!(b.request_backups(), 0, "not yet past 0.5 s");
        tokio::time::advance(Duration::from_millis(600)).await;
        b.on_report(&report("hoarder", 1, Event::Heartbeat));
        b.on_report(&report("honest", 1, Event::Heartbeat));
        assert_eq!(b.request_backups(), 1);
        assert_eq!(send(&mut b), held);
        // PUSH deals the copy to the hoarder itself: refused (it holds the task), sent again.
        b.on_report(&report("hoarder", 1, accept(held as u64)));
        assert_eq!(b.tally().refused, 1);
        assert_eq!(send(&mut b), held);
        b.on_report(&report("honest", 0, accept(held as u64)));
        assert_eq!(b.request_backups(), 0, "one backup per task");
        assert!(b
            .on_report(&report("honest", 1, done(held as u64)))
            .is_some());
        b.settle(held, "honest", Settled::Done);
        assert!(b.is_complete());
        assert_eq!(b.tally().by_worker.get("honest"), Some(&2));
    }
}
