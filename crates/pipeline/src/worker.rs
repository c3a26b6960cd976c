//! The worker (zguide `taskwork2`): PULLs tasks from the master's PUSH, processes them on blocking
//! threads, PUSHes reports to the master's PULL, and SUBscribes to the master's control PUB.
//!
//! Flow control: the worker holds at most `threads + prefetch` tasks. Every report carries
//! `free`, and the master deals tasks to this worker's task connection (named by the PULL's ZMTP
//! `Identity`, the worker's name) only while it has room; a task that arrives while the worker
//! is full anyway (a stock master dealing round robin, or a backup copy of one held here) is
//! answered with `defer` and the master sends it elsewhere.
//!
//! Reconnection: `zeromq` 0.7 PUSH/PULL never reconnect. The report PUSH is rebuilt on loss; the
//! task PULL is connected again in place when its connection drops (dropping a `PullSocket`
//! leaves its connections open and the master would keep dealing tasks into them). The control
//! SUB reconnects by itself, but with a backoff that grows to 30 s: when the master's heartbeats
//! stop for the liveness window, every link is closed and built afresh (the task PULL's
//! connections closed explicitly: the master deals to the newest connection of a name, and an
//! older one left open would take over whenever the newest closes).
//!
//! Batches: a task belongs to its master's batch. When the worker hears of a newer batch (a
//! heartbeat or a task of a restarted master), queued tasks of the old one are dropped, and one
//! still running discards its output instead of renaming it over the new batch's.
//!
//! Abandoned attempts: a task carries the master's task timeout. Once that much time has passed
//! since it arrived, the master has sent it elsewhere, so the worker gives it up: queued, it is
//! dropped; running, its slot is freed at once, the job stops at its next step (and never
//! renames its output into place), and its outcome is never reported. A job stuck in a system
//! call keeps its thread until the call returns; a task the worker already holds is deferred.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::heartbeat::{Heartbeat, Liveness};
use common::link::{self, Backoff, Monitor, Reconnect};
use common::CancellationToken;
use tokio::task::JoinSet;
use zeromq::util::PeerIdentity;
use zeromq::{PullSocket, PushSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket};

use crate::files;
use crate::filter::Chain;
use crate::protocol::{Control, Event, Report, Task};

/// Validated worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Master's task endpoint (its PUSH).
    pub tasks: String,
    /// Master's report endpoint (its PULL).
    pub results: String,
    /// Master's control endpoint (its PUB); without it the worker never hears `stop` and relies
    /// on socket events alone to notice a lost master.
    pub control: Option<String>,
    /// Name in reports and in the master's per-worker counts.
    pub id: String,
    /// Images processed at the same time.
    pub threads: u32,
    /// Tasks held waiting beyond `threads`, to hide the round trip between two tasks.
    pub prefetch: u32,
    /// Memory the image decoder may allocate for one image.
    pub max_decode_bytes: u64,
    pub heartbeat: Heartbeat,
    pub reconnect: Reconnect,
    /// How long running images may take to finish on shutdown.
    pub drain: Duration,
    /// Answer `done` without touching files: measures messaging alone.
    pub dry_run: bool,
    /// Extra time spent on every image: simulates a slow worker in tests and demos.
    pub delay: Duration,
    /// Test hook: an image whose relative path contains this text never finishes (its job waits
    /// until abandoned), standing in for a read stuck on a hung network mount.
    pub stall_on: Option<String>,
}

impl WorkerConfig {
    pub fn slots(&self) -> u32 {
        self.threads + self.prefetch
    }
}

/// Why the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The master broadcast `stop`.
    Stopped,
    /// Ctrl-C, SIGTERM or the caller's token.
    Cancelled,
}

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot subscribe to control messages")]
    Subscribe(#[source] zeromq::ZmqError),
}

/// Abandoned jobs still running whose slots were freed; beyond this many, an abandoned job's
/// slot stays taken until it returns, so that stuck threads cannot pile up without bound.
const MAX_ABANDONED: usize = 16;

/// A finished job: its number, its task, and its result (`None`: abandoned, not reported).
type Outcome = (u64, Task, Option<Result<Option<Bytes>, String>>);

/// A task accepted and not started.
struct Queued {
    task: Task,
    image: Option<Bytes>,
    /// When it arrived, for the output's "newer than this" check.
    received: SystemTime,
    /// When the master gives it up (its task timeout after arrival).
    deadline: Option<tokio::time::Instant>,
}

/// A job on a blocking thread.
struct Running {
    batch: String,
    id: u64,
    deadline: Option<tokio::time::Instant>,
    /// Set when abandoned: the job stops at its next step and writes nothing.
    abort: Arc<AtomicBool>,
}

/// The batch the worker serves now, shared with running jobs.
#[derive(Debug, Clone, Default)]
struct CurrentBatch(Arc<Mutex<Option<String>>>);

impl CurrentBatch {
    /// Notes that `batch` is current; true when it replaces another one.
    fn set(&self, batch: &str) -> bool {
        let Ok(mut current) = self.0.lock() else {
            return false;
        };
        let replaced = current.as_deref().is_some_and(|b| b != batch);
        if current.as_deref() != Some(batch) {
            *current = Some(batch.to_string());
        }
        replaced
    }

    /// Whether an output of `batch` is still wanted (yes until another batch is heard of).
    fn is(&self, batch: &str) -> bool {
        self.0
            .lock()
            .map(|current| current.as_deref().is_none_or(|b| b == batch))
            .unwrap_or(true)
    }
}

/// The task PULL and its monitor.
struct TaskLink {
    pull: PullSocket,
    monitor: Monitor,
}

impl TaskLink {
    /// A task PULL whose ZMTP `Identity` is the worker's name (`id`, when 1 to 255 bytes): the
    /// master deals a connection tasks by the credit of the worker it belongs to, and so knows
    /// it is ours from its first byte (master::ventilator).
    fn new(connect_timeout: Duration, id: &str) -> Self {
        let mut options = SocketOptions::default();
        options.connect_timeout(connect_timeout);
        if (1..=PeerIdentity::MAX_LENGTH).contains(&id.len()) {
            if let Ok(identity) = PeerIdentity::try_from(id.as_bytes().to_vec()) {
                options.peer_identity(identity);
            }
        }
        let mut pull = PullSocket::with_options(options);
        let monitor = Monitor::new(pull.monitor());
        Self { pull, monitor }
    }

    /// Closes every connection of the PULL: `PullSocket` has no `Drop` that does it.
    fn close(self) {
        self.pull.backend().shutdown();
    }
}

/// Runs the worker until the master says `stop` or `cancel` fires.
pub async fn run(
    config: WorkerConfig,
    cancel: CancellationToken,
) -> Result<WorkerExit, WorkerError> {
    let mut w = Worker::new(config);
    let exit = w.serve(&cancel).await;
    w.drain().await;
    exit
}

struct Worker {
    cfg: WorkerConfig,
    tag: String,
    backoff: Backoff,
    /// Tasks accepted and not started.
    queue: VecDeque<Queued>,
    jobs: JoinSet<Outcome>,
    /// Jobs running, by number.
    running: HashMap<u64, Running>,
    /// Jobs abandoned and still running, by number.
    abandoned: HashMap<u64, Running>,
    next_job: u64,
    results: Option<(PushSocket, Monitor)>,
    batch: CurrentBatch,
    done: u64,
}

impl Worker {
    fn new(cfg: WorkerConfig) -> Self {
        let tag: String = cfg
            .id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(32)
            .collect();
        let backoff = Backoff::new(cfg.reconnect.min, cfg.reconnect.max);
        Self {
            cfg,
            tag,
            backoff,
            queue: VecDeque::new(),
            jobs: JoinSet::new(),
            running: HashMap::new(),
            abandoned: HashMap::new(),
            next_job: 0,
            results: None,
            batch: CurrentBatch::default(),
            done: 0,
        }
    }

    fn free(&self) -> u32 {
        let stuck = self.abandoned.len().saturating_sub(MAX_ABANDONED);
        let held = self.running.len() + self.queue.len() + stuck;
        self.cfg.slots().saturating_sub(held as u32)
    }

    /// Whether task `id` of `batch` is queued or running here.
    fn holds(&self, batch: &str, id: u64) -> bool {
        self.queue
            .iter()
            .any(|q| q.task.id == id && q.task.batch == batch)
            || self
                .running
                .values()
                .any(|r| r.id == id && r.batch == batch)
    }

    /// Gives up what outlived its task timeout: the master has sent it elsewhere.
    fn abandon_expired(&mut self) {
        let now = tokio::time::Instant::now();
        let past = |deadline: &Option<tokio::time::Instant>| deadline.is_some_and(|d| d <= now);
        let before = self.queue.len();
        self.queue.retain(|q| !past(&q.deadline));
        if self.queue.len() < before {
            tracing::warn!(
                dropped = before - self.queue.len(),
                "queued tasks past their timeout dropped"
            );
        }
        let expired: Vec<u64> = self
            .running
            .iter()
            .filter(|(_, r)| past(&r.deadline))
            .map(|(n, _)| *n)
            .collect();
        for n in expired {
            if let Some(job) = self.running.remove(&n) {
                tracing::warn!(
                    id = job.id,
                    "task past its timeout, abandoned; its slot is free"
                );
                job.abort.store(true, Ordering::Relaxed);
                self.abandoned.insert(n, job);
            }
        }
        self.start_queued();
    }

    fn report(&self, event: Event) -> Report {
        Report {
            worker: self.cfg.id.clone(),
            slots: self.cfg.slots(),
            free: self.free(),
            heartbeat_ms: self.cfg.heartbeat.interval.as_millis() as u64,
            event,
        }
    }

    /// Sends a report; on failure the link is dropped and rebuilt at the next loop turn. Reports
    /// lost with a dead master are worthless: a new master starts a new batch.
    async fn send(&mut self, event: Event, image: Option<Bytes>) {
        let msg = self.report(event).to_message(image);
        if let Some((push, _)) = self.results.as_mut() {
            if let Err(e) = push.send(msg).await {
                tracing::info!(error = %e, "master unreachable, reconnecting");
                self.results = None;
            }
        }
    }

    async fn connect_results(&mut self, cancel: &CancellationToken) -> bool {
        let got = link::connect(
            &self.cfg.results,
            &self.cfg.reconnect,
            &mut self.backoff,
            cancel,
            PushSocket::with_options,
        )
        .await;
        match got {
            Some(c) => {
                self.results = Some((c.socket, c.monitor));
                self.send(Event::Hello, None).await;
                true
            }
            None => false,
        }
    }

    /// Connects the one task PULL socket again and again until it succeeds or `cancel` fires.
    async fn connect_tasks(&mut self, link: &mut TaskLink, cancel: &CancellationToken) -> bool {
        let mut attempts = 0u32;
        loop {
            let r = tokio::select! {
                () = cancel.cancelled() => return false,
                r = link.pull.connect(&self.cfg.tasks) => r,
            };
            match r {
                Ok(()) => {
                    tracing::info!(endpoint = %self.cfg.tasks, "task link up");
                    self.backoff.reset();
                    return true;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts == 1 {
                        tracing::info!(endpoint = %self.cfg.tasks, error = %e, "master unreachable, retrying");
                    }
                }
            }
            if !self.backoff.pause(cancel).await {
                return false;
            }
        }
    }

    async fn connect_control(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<Option<SubSocket>>, WorkerError> {
        let Some(ep) = self.cfg.control.clone() else {
            return Ok(Some(None));
        };
        let got = link::connect(
            &ep,
            &self.cfg.reconnect,
            &mut self.backoff,
            cancel,
            SubSocket::with_options,
        )
        .await;
        let Some(mut c) = got else {
            return Ok(None);
        };
        c.socket
            .subscribe("")
            .await
            .map_err(WorkerError::Subscribe)?;
        Ok(Some(Some(c.socket)))
    }

    async fn serve(&mut self, cancel: &CancellationToken) -> Result<WorkerExit, WorkerError> {
        let Some(mut control) = self.connect_control(cancel).await? else {
            return Ok(WorkerExit::Cancelled);
        };
        let mut tasks = TaskLink::new(self.cfg.reconnect.connect_timeout, &self.cfg.id);
        if !self.connect_tasks(&mut tasks, cancel).await {
            return Ok(WorkerExit::Cancelled);
        }
        let mut master = Liveness::new(self.cfg.heartbeat);
        let mut tick = tokio::time::interval(self.cfg.heartbeat.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(worker = %self.cfg.id, slots = self.cfg.slots(), "worker ready");
        loop {
            if self.results.is_none() {
                if !self.connect_results(cancel).await {
                    return Ok(WorkerExit::Cancelled);
                }
                // However long reconnecting took, the master gets a full window from here.
                master.heard();
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(WorkerExit::Cancelled),
                msg = recv_control(&mut control) => match msg {
                    Some(Control::Stop) => {
                        tracing::info!("master says stop");
                        return Ok(WorkerExit::Stopped);
                    }
                    Some(Control::Heartbeat { batch, heartbeat_ms }) => {
                        self.serve_batch(&batch);
                        master = Liveness::new(Heartbeat {
                            interval: Duration::from_millis(heartbeat_ms.max(1)),
                            liveness: self.cfg.heartbeat.liveness,
                        });
                    }
                    None => {}
                },
                msg = tasks.pull.recv() => match msg {
                    Ok(msg) => {
                        master.heard();
                        self.on_task(&msg).await;
                    }
                    // PULL recv returns per-peer errors (e.g. a reset): not fatal.
                    Err(e) => tracing::debug!(error = %e, "task link error"),
                },
                Some(joined) = self.jobs.join_next(), if !self.jobs.is_empty() => {
                    self.on_outcome(joined).await;
                }
                _ = tasks.monitor.disconnected() => {
                    tracing::info!("task link lost, reconnecting");
                    if !self.connect_tasks(&mut tasks, cancel).await {
                        return Ok(WorkerExit::Cancelled);
                    }
                    master.heard();
                }
                () = results_lost(&mut self.results) => {
                    tracing::info!("report link lost, reconnecting");
                    self.results = None;
                }
                _ = tick.tick() => {
                    self.abandon_expired();
                    if control.is_some() && master.is_expired() {
                        // A master that went silent without a socket event (partition, or a
                        // restart we did not see): start every link afresh.
                        tracing::info!(silent_ms = master.silent_for().as_millis() as u64, "master silent, reconnecting");
                        self.results = None;
                        drop(control);
                        control = match self.connect_control(cancel).await? {
                            Some(c) => c,
                            None => return Ok(WorkerExit::Cancelled),
                        };
                        std::mem::replace(&mut tasks, TaskLink::new(self.cfg.reconnect.connect_timeout, &self.cfg.id)).close();
                        if !self.connect_tasks(&mut tasks, cancel).await {
                            return Ok(WorkerExit::Cancelled);
                        }
                        master = Liveness::new(self.cfg.heartbeat);
                    } else {
                        self.send(Event::Heartbeat, None).await;
                    }
                }
            }
        }
    }

    /// Notes the master's batch; when it is a new one, queued tasks of the old one are dropped
    /// (their master is gone) and running ones will discard their outputs.
    fn serve_batch(&mut self, batch: &str) {
        if self.batch.set(batch) {
            let before = self.queue.len();
            self.queue.retain(|q| q.task.batch == batch);
            tracing::info!(
                batch,
                dropped = before - self.queue.len(),
                "new batch: earlier tasks dropped"
            );
        }
    }

    async fn on_task(&mut self, msg: &zeromq::ZmqMessage) {
        let (task, image) = match Task::from_message(msg) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed task");
                return;
            }
        };
        let (batch, id) = (task.batch.clone(), task.id);
        self.serve_batch(&batch);
        if self.free() == 0 || self.holds(&batch, id) {
            // Full; or a second copy of a task held here (the master sent a backup copy and
            // PUSH dealt it back to us): someone else should have it.
            tracing::debug!(id, "full or held already, deferring task");
            self.send(Event::Defer { batch, id }, None).await;
            return;
        }
        let deadline = task
            .timeout_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        self.queue.push_back(Queued {
            task,
            image,
            received: SystemTime::now(),
            deadline,
        });
        self.start_queued();
        self.send(Event::Accept { batch, id }, None).await;
    }

    fn start_queued(&mut self) {
        while self.running.len() < self.cfg.threads as usize {
            let Some(Queued {
                task,
                image,
                received,
                deadline,
            }) = self.queue.pop_front()
            else {
                return;
            };
            let (max, tag, dry) = (
                self.cfg.max_decode_bytes,
                self.tag.clone(),
                self.cfg.dry_run,
            );
            let delay = self.cfg.delay;
            let stall = self
                .cfg
                .stall_on
                .as_deref()
                .is_some_and(|s| task.path.0.to_string_lossy().contains(s));
            let current = self.batch.clone();
            let abort = Arc::new(AtomicBool::new(false));
            let n = self.next_job;
            self.next_job += 1;
            self.running.insert(
                n,
                Running {
                    batch: task.batch.clone(),
                    id: task.id,
                    deadline,
                    abort: abort.clone(),
                },
            );
            if dry && delay.is_zero() && !stall {
                // Nothing to do: no thread to hand it to (a blocking thread's hand-off and
                // wake-up cost more than the rest of a tiny task's trip).
                self.jobs.spawn(async move { (n, task, Some(Ok(None))) });
                continue;
            }
            self.jobs.spawn_blocking(move || {
                let stop = || abort.load(Ordering::Relaxed);
                pause(delay, &stop);
                if stall {
                    pause(Duration::MAX, &stop);
                }
                if stop() {
                    return (n, task, None);
                }
                let result = if dry {
                    Ok(None)
                } else {
                    // Not once abandoned, not over an output of a newer batch (a restarted
                    // master), nor over one written since this task arrived (a copy of it done
                    // elsewhere).
                    let wanted = || {
                        !stop()
                            && current.is(&task.batch)
                            && !task
                                .output
                                .as_ref()
                                .is_some_and(|p| files::modified_after(p.as_path(), received))
                    };
                    execute(&task, image, max, &tag, &wanted)
                };
                let result = (!stop()).then_some(result);
                (n, task, result)
            });
        }
    }

    async fn on_outcome(&mut self, joined: Result<Outcome, tokio::task::JoinError>) {
        let (n, task, result) = match joined {
            Ok(o) => o,
            Err(e) => {
                // Only a panic in the image code gets here; the task id is lost with it, and
                // the master re-sends the task after its lease. Its slot: see below.
                tracing::error!(error = %e, "image job panicked");
                self.forget_panicked();
                self.start_queued();
                return;
            }
        };
        self.running.remove(&n);
        let abandoned = self.abandoned.remove(&n).is_some();
        self.start_queued();
        let Some(result) = result.filter(|_| !abandoned) else {
            tracing::debug!(id = task.id, "an abandoned job returned");
            return;
        };
        let (batch, id) = (task.batch, task.id);
        match result {
            Ok(image) => {
                self.done += 1;
                tracing::debug!(id, path = %task.path.display(), "done");
                self.send(Event::Done { batch, id }, image).await;
            }
            Err(reason) => {
                tracing::warn!(id, path = %task.path.display(), %reason, "failed");
                self.send(Event::Failed { batch, id, reason }, None).await;
            }
        }
    }

    /// A job panicked and its number went with it: the running entries whose jobs are gone
    /// (more entries than jobs left) are dropped, oldest first, so that the slot comes back.
    fn forget_panicked(&mut self) {
        while self.running.len() + self.abandoned.len() > self.jobs.len() {
            let oldest = self
                .running
                .keys()
                .chain(self.abandoned.keys())
                .min()
                .copied();
            let Some(n) = oldest else { break };
            if self.running.remove(&n).is_none() {
                self.abandoned.remove(&n);
            }
        }
    }

    /// Finishes running images for at most `drain`, then says goodbye; queued tasks are left to
    /// the master, which re-sends them on `bye`.
    async fn drain(&mut self) {
        self.queue.clear();
        let deadline = tokio::time::Instant::now() + self.cfg.drain;
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, self.jobs.join_next()).await {
                Ok(Some(joined)) => self.on_outcome(joined).await,
                Ok(None) | Err(_) => break,
            }
        }
        self.jobs.abort_all();
        self.send(Event::Bye, None).await;
        // zmq.rs has no ZMQ_LINGER: `send` returns once the message is queued to the peer's
        // writer task, and exiting at once loses it. Without the `bye` the master would only
        // notice our absence after a liveness window.
        if self.results.is_some() {
            tokio::time::sleep(common::link::LINGER).await;
        }
        tracing::info!(worker = %self.cfg.id, done = self.done, "worker stopped");
    }
}

async fn recv_control(control: &mut Option<SubSocket>) -> Option<Control> {
    let Some(sub) = control.as_mut() else {
        return std::future::pending().await;
    };
    match sub.recv().await {
        Ok(msg) => Control::from_message(&msg)
            .map_err(|e| tracing::debug!(error = %e, "ignoring control message"))
            .ok(),
        Err(e) => {
            tracing::debug!(error = %e, "control link error");
            None
        }
    }
}

async fn results_lost(results: &mut Option<(PushSocket, Monitor)>) {
    match results.as_mut() {
        Some((_, monitor)) => {
            let _ = monitor.disconnected().await;
        }
        None => std::future::pending().await,
    }
}

/// Sleeps `total` in short steps, returning early once `stop` says so.
fn pause(total: Duration, stop: &dyn Fn() -> bool) {
    let start = std::time::Instant::now();
    while !stop() {
        let left = total.saturating_sub(start.elapsed());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// Processes one task on the calling (blocking) thread: `Ok(Some(bytes))` when the output goes
/// back inline, `Ok(None)` when it was written to the shared filesystem. A path-mode input is
/// refused before reading when it is not a regular file or is larger than `max_decode_bytes`
/// (an encoded image is smaller than its pixels). `wanted` is asked just before the output
/// replaces the final file: no means a newer output is in place (which stays) or the job was
/// abandoned. The temp file's name carries the batch ([`files::temp_tag`]).
pub fn execute(
    task: &Task,
    image: Option<Bytes>,
    max_decode_bytes: u64,
    writer_tag: &str,
    wanted: &dyn Fn() -> bool,
) -> Result<Option<Bytes>, String> {
    let input = match (image, &task.input) {
        (Some(bytes), _) => bytes,
        (None, Some(path)) => Bytes::from(files::read_input(path.as_path(), max_decode_bytes)?),
        (None, None) => return Err("task carries neither an input path nor image bytes".into()),
    };
    let chain = Chain::parse(&task.filter).map_err(|e| e.to_string())?;
    // The extension names the output format; only it is read from the name.
    let name = task
        .output
        .as_ref()
        .unwrap_or(&task.path)
        .0
        .to_string_lossy();
    let out = crate::filter::process(&input, &chain, &name, max_decode_bytes)
        .map_err(|e| e.to_string())?;
    match &task.output {
        Some(path) => {
            let tag = files::temp_tag(&task.batch, writer_tag);
            let kept = files::write_atomic_if(path.as_path(), &out, &tag, wanted)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            if !kept {
                tracing::info!(batch = %task.batch, path = %task.path.display(), "output not renamed into place: a newer one is there, or the task was abandoned");
            }
            Ok(None)
        }
        None => Ok(Some(Bytes::from(out))),
    }
}

/// `host-pid`, the default worker name.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_of_a_replaced_batch_are_not_wanted() {
        let current = CurrentBatch::default();
        assert!(
            current.is("a"),
            "before any batch is heard of, every output is wanted"
        );
        assert!(!current.set("a"), "the first batch replaces nothing");
        assert!(current.is("a"));
        assert!(
            current.set("b"),
            "a restarted master's batch replaces the old one"
        );
        assert!(!current.is("a"));
        assert!(current.is("b"));
    }
}
