//! The master's books: the state of every task, the workers' credits and liveness, and the
//! counts of the summary. Pure bookkeeping, no sockets and no files: the ventilator asks it what
//! to send, the sink tells it what came back, and it is unit-tested on its own.
//!
//! Credit flow: no more tasks in flight than the workers announced free slots
//! (`Σ free - unacknowledged`). A task is pending, sent (not yet acknowledged), accepted by a
//! worker, done or failed; the first answer wins.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::time::Duration;

use common::heartbeat::{Heartbeat, Liveness};
use tokio::time::Instant;

use super::Failure;
use crate::filter;
use crate::protocol::{Event, Report};

/// A task deferred more often than this (times the number of workers, plus one) in a row waits
/// [`PARK`] before its next try instead of spinning.
const DEFERS_PER_WORKER: u32 = 2;
const PARK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Pending,
    Sent { at: Instant },
    Accepted { worker: String, at: Instant },
    Done,
    Failed,
}

#[derive(Debug)]
struct Entry {
    rel: String,
    status: Status,
    defers: u32,
}

#[derive(Debug)]
struct WorkerState {
    free: u32,
    liveness: Liveness,
}

/// What a worker's answer asks of the master.
#[derive(Debug, PartialEq)]
pub(super) enum Answer {
    /// `done`: the output is written (path) or in the report (inline); settle with
    /// [`Books::finish`].
    Done { id: usize, worker: String },
    /// `failed`, already settled.
    Failed,
}

/// Every task of one batch and every worker heard from.
#[derive(Debug)]
pub(super) struct Books {
    batch: String,
    /// Workers are lost after this many of their own heartbeat periods of silence.
    liveness: u32,
    entries: Vec<Entry>,
    pending: VecDeque<usize>,
    /// Tasks deferred many times in a row wait a little before the next try.
    parked: Vec<(Instant, usize)>,
    workers: HashMap<String, WorkerState>,
    /// Tasks sent and neither accepted nor deferred yet (the entries in `Sent`).
    unacked: u32,
    finished: usize,
    failures: Vec<Failure>,
    by_worker: BTreeMap<String, u64>,
    resent: u64,
    deferred: u64,
    first_sent: Option<Instant>,
    last_answer: Option<Instant>,
}

impl Books {
    /// Opens the books of `batch` over `rels`; files that are not images by extension are failed
    /// at once, without bothering a worker.
    pub(super) fn new(batch: String, liveness: u32, rels: Vec<String>) -> Self {
        let mut books = Self {
            batch,
            liveness,
            entries: rels
                .into_iter()
                .map(|rel| Entry {
                    rel,
                    status: Status::Pending,
                    defers: 0,
                })
                .collect(),
            pending: VecDeque::new(),
            parked: Vec::new(),
            workers: HashMap::new(),
            unacked: 0,
            finished: 0,
            failures: Vec::new(),
            by_worker: BTreeMap::new(),
            resent: 0,
            deferred: 0,
            first_sent: None,
            last_answer: None,
        };
        for i in 0..books.entries.len() {
            if filter::is_image_path(Path::new(&books.entries[i].rel)) {
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

    pub(super) fn rel(&self, id: usize) -> &str {
        &self.entries[id].rel
    }

    /// How many more tasks may be sent now.
    pub(super) fn sendable(&self) -> u32 {
        let free: u32 = self.workers.values().map(|w| w.free).sum();
        free.saturating_sub(self.unacked)
    }

    /// The next task to send, if credits allow one.
    pub(super) fn next_to_send(&mut self) -> Option<usize> {
        while self.sendable() > 0 {
            let i = self.pending.pop_front()?;
            if self.entries[i].status == Status::Pending {
                return Some(i);
            }
            // Stale: answered or accepted after its lease ran out.
        }
        None
    }

    pub(super) fn sent(&mut self, id: usize) {
        self.entries[id].status = Status::Sent { at: Instant::now() };
        self.unacked += 1;
        self.first_sent.get_or_insert_with(Instant::now);
    }

    /// `id` could not be sent now: it goes first next time.
    pub(super) fn unsent(&mut self, id: usize) {
        self.pending.push_front(id);
    }

    /// Books one report: the worker's credit and liveness, and the task event it carries.
    pub(super) fn on_report(&mut self, report: &Report) -> Option<Answer> {
        let worker = report.worker.clone();
        if report.event == Event::Bye {
            if self.workers.remove(&worker).is_some() {
                tracing::info!(%worker, "worker left");
            }
            self.requeue_worker(&worker);
            return None;
        }
        let expiry = Heartbeat {
            interval: Duration::from_millis(report.heartbeat_ms.max(1)),
            liveness: self.liveness,
        };
        let state = self.workers.entry(worker.clone()).or_insert_with(|| {
            tracing::info!(%worker, slots = report.slots, "worker joined");
            WorkerState {
                free: 0,
                liveness: Liveness::new(expiry),
            }
        });
        state.free = report.free;
        state.liveness = Liveness::new(expiry);
        if report.event == Event::Hello {
            // A worker says hello again after rebuilding its links: reports it sent on the old
            // ones may be lost (a partition), so what it accepted goes back. The first answer
            // still wins if its own arrives after all.
            self.requeue_worker(&worker);
        }
        let (batch, id) = match &report.event {
            Event::Accept { batch, id }
            | Event::Defer { batch, id }
            | Event::Done { batch, id }
            | Event::Failed { batch, id, .. } => (batch, *id as usize),
            Event::Hello | Event::Heartbeat | Event::Bye => return None,
        };
        if *batch != self.batch || id >= self.entries.len() {
            return None; // a previous master's batch
        }
        let was_sent = matches!(self.entries[id].status, Status::Sent { .. });
        if matches!(self.entries[id].status, Status::Done | Status::Failed) {
            return None;
        }
        if was_sent {
            self.unacked -= 1;
        }
        match &report.event {
            Event::Accept { .. } => {
                if !matches!(self.entries[id].status, Status::Accepted { .. }) {
                    self.entries[id].status = Status::Accepted {
                        worker,
                        at: Instant::now(),
                    };
                }
                None
            }
            Event::Defer { .. } => {
                if was_sent {
                    self.defer(id);
                }
                None
            }
            Event::Done { .. } => Some(Answer::Done { id, worker }),
            Event::Failed { reason, .. } => {
                self.finish(id, Err(reason.clone()), Some(worker));
                Some(Answer::Failed)
            }
            Event::Hello | Event::Heartbeat | Event::Bye => None,
        }
    }

    fn defer(&mut self, id: usize) {
        self.deferred += 1;
        let limit = DEFERS_PER_WORKER * (self.workers.len() as u32 + 1);
        let e = &mut self.entries[id];
        e.status = Status::Pending;
        e.defers += 1;
        if e.defers > limit {
            // Every worker we tried was full although credits said otherwise (a worker whose
            // task link is down): do not spin, wait for the books to settle.
            e.defers = 0;
            self.parked.push((Instant::now() + PARK, id));
        } else {
            self.pending.push_front(id);
        }
    }

    /// Settles task `id`: done (`Ok`) or failed with a reason.
    pub(super) fn finish(
        &mut self,
        id: usize,
        outcome: Result<(), String>,
        worker: Option<String>,
    ) {
        let entry = &mut self.entries[id];
        match outcome {
            Ok(()) => {
                entry.status = Status::Done;
                if let Some(w) = worker {
                    *self.by_worker.entry(w).or_default() += 1;
                }
            }
            Err(reason) => {
                entry.status = Status::Failed;
                tracing::warn!(path = %entry.rel, %reason, "image failed");
                self.failures.push(Failure {
                    path: entry.rel.clone(),
                    reason,
                });
            }
        }
        self.finished += 1;
        self.last_answer = Some(Instant::now());
    }

    /// Puts back every task `worker` accepted and did not answer.
    fn requeue_worker(&mut self, worker: &str) {
        for (i, e) in self.entries.iter_mut().enumerate() {
            if matches!(&e.status, Status::Accepted { worker: w, .. } if w == worker) {
                e.status = Status::Pending;
                self.pending.push_back(i);
                self.resent += 1;
            }
        }
    }

    /// Puts back every task sent and not acknowledged: called when the task link was cut, so
    /// they are lost in a hung worker's connection (or, rarely, on their way to a live worker,
    /// which then does one twice: the first answer wins).
    pub(super) fn requeue_unacked(&mut self) {
        for (i, e) in self.entries.iter_mut().enumerate() {
            if matches!(e.status, Status::Sent { .. }) {
                e.status = Status::Pending;
                self.pending.push_back(i);
                self.resent += 1;
            }
        }
        self.unacked = 0;
    }

    /// Expires what ran out: workers silent for their liveness window (their tasks go back),
    /// tasks unacknowledged for `ack_window` and tasks accepted `task_timeout` ago; and releases
    /// parked tasks that waited long enough.
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
            self.requeue_worker(worker);
        }
        let now = Instant::now();
        let mut unacked = 0;
        for (i, e) in self.entries.iter_mut().enumerate() {
            let expired = match &e.status {
                Status::Sent { at } => now.duration_since(*at) > ack_window,
                Status::Accepted { at, .. } => now.duration_since(*at) > task_timeout,
                _ => false,
            };
            if expired {
                if matches!(e.status, Status::Sent { .. }) {
                    self.unacked -= 1;
                    unacked += 1;
                }
                tracing::info!(path = %e.rel, "task lease expired, re-sending");
                e.status = Status::Pending;
                self.pending.push_back(i);
                self.resent += 1;
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = self.parked.drain(..).partition(|(t, _)| *t <= now);
        self.parked = later;
        self.pending.extend(due.into_iter().map(|(_, i)| i));
        Expired { lost, unacked }
    }

    /// The workers currently alive.
    pub(super) fn worker_names(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// Counts for the summary: `(done, failures, by_worker, resent, deferred, elapsed)`.
    pub(super) fn tally(&self) -> Tally {
        Tally {
            done: self
                .entries
                .iter()
                .filter(|e| e.status == Status::Done)
                .count(),
            failures: self.failures.clone(),
            by_worker: self.by_worker.clone(),
            resent: self.resent,
            deferred: self.deferred,
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
    /// First task sent to last answer.
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(worker: &str, free: u32, event: Event) -> Report {
        Report {
            worker: worker.into(),
            slots: 2,
            free,
            heartbeat_ms: 100,
            event,
        }
    }

    /// Books of one image, sent to worker `w` (one slot) and, if `accepted`, accepted by it.
    fn one_task(accepted: bool) -> Books {
        let mut b = Books::new("b".into(), 3, vec!["a.png".into()]);
        b.on_report(&report("w", 1, Event::Hello));
        let id = b.next_to_send().expect("credit");
        b.sent(id);
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

    #[tokio::test(start_paused = true)]
    async fn credits_bound_what_is_in_flight() {
        let mut b = Books::new(
            "b".into(),
            3,
            vec!["a.png".into(), "b.png".into(), "c.txt".into()],
        );
        assert_eq!(b.finished(), 1, "the text file fails at once");
        assert_eq!(b.next_to_send(), None, "no worker, no credit");
        b.on_report(&report("w", 1, Event::Hello));
        assert_eq!(b.next_to_send(), Some(0));
        b.sent(0);
        assert_eq!(b.next_to_send(), None, "one credit, one task in flight");
        b.on_report(&report("w", 0, accept(0)));
        b.on_report(&report("w", 1, Event::Heartbeat));
        assert_eq!(b.next_to_send(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_wins_and_other_batches_are_ignored() {
        let mut b = one_task(false);
        let old = Event::Done {
            batch: "old".into(),
            id: 0,
        };
        assert_eq!(b.on_report(&report("w", 1, old)), None);
        let done = Event::Done {
            batch: "b".into(),
            id: 0,
        };
        let got = b.on_report(&report("w", 1, done.clone()));
        assert_eq!(
            got,
            Some(Answer::Done {
                id: 0,
                worker: "w".into()
            })
        );
        b.finish(0, Ok(()), Some("w".into()));
        assert_eq!(b.on_report(&report("x", 1, done)), None);
        assert!(b.is_complete());
        assert_eq!(b.tally().by_worker.get("w"), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_is_lost_and_its_tasks_go_back() {
        let mut b = Books::new("b".into(), 3, vec!["a.png".into(), "b.png".into()]);
        b.on_report(&report("w", 2, Event::Hello));
        for _ in 0..2 {
            let id = b.next_to_send().expect("credit");
            b.sent(id);
        }
        b.on_report(&report("w", 1, accept(0)));
        tokio::time::advance(Duration::from_millis(350)).await;
        let expired = b.expire(Duration::from_secs(60), Duration::from_secs(60));
        assert_eq!(expired.lost, ["w"]);
        assert_eq!(b.workers(), 0);
        b.requeue_unacked();
        assert_eq!(
            b.tally().resent,
            2,
            "the accepted task and the one in transit"
        );
        b.on_report(&report("v", 2, Event::Hello));
        assert!(b.next_to_send().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_hello_sends_the_accepted_tasks_again() {
        let mut b = one_task(true);
        b.on_report(&report("w", 1, Event::Hello));
        assert_eq!(b.tally().resent, 1);
        assert_eq!(b.next_to_send(), Some(0));
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
        assert_eq!(b.next_to_send(), Some(0));
    }
}
