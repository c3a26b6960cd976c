//! The master: ventilator and sink in one process (zguide `taskvent` + `tasksink` + the
//! `taskwork2` kill switch). It binds a PUSH for tasks, a PULL for worker reports and a PUB for
//! control (heartbeats, `stop`), and keeps the batch's books.
//!
//! Credit flow: the master keeps in flight no more tasks than the workers report free slots
//! (`Σ free - tasks sent and not yet acknowledged`), so nothing piles up in the 100,000-message
//! per-peer queues of `zeromq` 0.7 and a late worker gets work as soon as it says `hello`.
//! Every task is acknowledged (`accept`/`defer`) and answered (`done`/`failed`); the first answer
//! wins. A task is sent again when its worker goes silent or says `bye`, when its `accept` does
//! not come within the liveness window (lost in a dead connection), or after `task_timeout`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::heartbeat::{Heartbeat, Liveness};
use common::CancellationToken;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use zeromq::{PubSocket, PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqError};

use crate::files;
use crate::filter::{self, Chain};
use crate::protocol::{Control, Event, Report, Task};

/// How image bytes reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    /// Tasks carry absolute paths: workers share the master's filesystem (same host, or the
    /// same mount points elsewhere) and write outputs themselves.
    Path,
    /// Tasks carry the image bytes and reports carry the output bytes; the master writes.
    Inline,
}

/// Validated master settings.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Input tree; `None` generates the built-in sample set in a temporary directory.
    pub input: Option<PathBuf>,
    pub output: PathBuf,
    pub filter: Chain,
    pub tasks_bind: String,
    pub results_bind: String,
    pub control_bind: String,
    pub transfer: Transfer,
    /// Larger files are reported as failed in inline mode (bounds memory per task).
    pub max_image_bytes: u64,
    pub heartbeat: Heartbeat,
    /// A task accepted this long ago without an answer is sent again.
    pub task_timeout: Duration,
    /// Broadcast `stop` once the batch is complete.
    pub stop_workers: bool,
    /// Send nothing until this many workers said hello (zguide: start the batch once the
    /// workers are there); afterwards workers may come and go.
    pub min_workers: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Why a batch cannot start. Nothing has been written when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("input directory {0} does not exist or is not a directory")]
    MissingInput(PathBuf),
    #[error("cannot list input directory {path}")]
    ListInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("output directory {path} is not writable")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the sample images in {path}")]
    Sample {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {endpoint}")]
    Bind {
        endpoint: String,
        #[source]
        source: ZmqError,
    },
}

/// The bound endpoints, as printed on the `ready` line.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub tasks: String,
    pub results: String,
    pub control: String,
    pub batch: String,
    pub total: usize,
}

impl Endpoints {
    /// `tasks,results,control` with wildcard hosts replaced by loopback: the value of
    /// `pipeline-worker --connect` on this host.
    pub fn connect(&self) -> String {
        [&self.tasks, &self.results, &self.control]
            .map(|e| e.replace("0.0.0.0", "127.0.0.1"))
            .join(",")
    }

    /// Prints the `ready` line on stdout.
    pub fn announce(&self) {
        let connect = self.connect();
        let total = self.total.to_string();
        common::ready::announce(&[
            ("tasks", &self.tasks),
            ("results", &self.results),
            ("control", &self.control),
            ("connect", &connect),
            ("batch", &self.batch),
            ("total", &total),
        ]);
    }
}

/// One file that produced no output, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    pub path: String,
    pub reason: String,
}

/// The batch's outcome; `--json` prints it as one line.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub batch: String,
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub failures: Vec<Failure>,
    pub by_worker: BTreeMap<String, u64>,
    /// First task sent to last answer.
    pub elapsed_ms: u64,
    /// `done / elapsed`.
    pub images_per_s: f64,
    /// From the `ready` line to the end, including waiting for workers.
    pub wall_ms: u64,
    /// Tasks sent again after a worker loss, a lost acknowledgement or a timeout.
    pub resent: u64,
    /// Tasks a full worker handed back (PUSH round robin hit a busy worker).
    pub deferred: u64,
    pub workers: usize,
    pub interrupted: bool,
    pub filter: String,
    pub transfer: Transfer,
}

impl Summary {
    /// Human-readable form, several lines.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{} of {} images done, {} failed in {:.2} s ({:.1} images/s, wall {:.2} s), {} re-sent, {} worker(s)\n",
            self.done,
            self.total,
            self.failed,
            self.elapsed_ms as f64 / 1000.0,
            self.images_per_s,
            self.wall_ms as f64 / 1000.0,
            self.resent,
            self.workers,
        );
        for (w, n) in &self.by_worker {
            s.push_str(&format!("  worker {w}: {n}\n"));
        }
        for f in &self.failures {
            s.push_str(&format!("  failed {}: {}\n", f.path, f.reason));
        }
        if self.interrupted {
            s.push_str("  interrupted before the end of the batch\n");
        }
        s
    }
}

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

/// Checks the inputs, binds the sockets, calls `on_ready` and runs the batch to its end (or
/// until `cancel`). A preparation error leaves nothing written.
pub async fn run(
    config: MasterConfig,
    cancel: CancellationToken,
    on_ready: impl FnOnce(&Endpoints),
) -> Result<Summary, MasterError> {
    let (input, sample_dir) = match &config.input {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = std::env::temp_dir().join(format!("pipeline-sample-{}", std::process::id()));
            crate::sample::generate(&dir, 36, 320).map_err(|source| MasterError::Sample {
                path: dir.clone(),
                source,
            })?;
            tracing::info!(dir = %dir.display(), "no --input: generated 36 sample images");
            (dir.clone(), Some(dir))
        }
    };
    let result = run_on(&config, &input, cancel, on_ready).await;
    if let Some(dir) = sample_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

async fn run_on(
    config: &MasterConfig,
    input: &Path,
    cancel: CancellationToken,
    on_ready: impl FnOnce(&Endpoints),
) -> Result<Summary, MasterError> {
    if !input.is_dir() {
        return Err(MasterError::MissingInput(input.to_path_buf()));
    }
    let input = std::fs::canonicalize(input).map_err(|source| MasterError::ListInput {
        path: input.to_path_buf(),
        source,
    })?;
    // Order matters for "nothing half done": list the input, bind every socket, and only then
    // create the output directory, so a failure before it leaves no trace.
    let output_guess = std::fs::canonicalize(&config.output).ok();
    let rels = files::list_files(&input, output_guess.as_deref()).map_err(|source| {
        MasterError::ListInput {
            path: input.clone(),
            source,
        }
    })?;
    let bind_err = |endpoint: &str| {
        let endpoint = endpoint.to_string();
        move |source| MasterError::Bind { endpoint, source }
    };
    let mut tasks = PushSocket::new();
    let tasks_ep = tasks
        .bind(&config.tasks_bind)
        .await
        .map_err(bind_err(&config.tasks_bind))?;
    let mut results = PullSocket::new();
    let results_ep = results
        .bind(&config.results_bind)
        .await
        .map_err(bind_err(&config.results_bind))?;
    let mut control = PubSocket::new();
    let control_ep = control
        .bind(&config.control_bind)
        .await
        .map_err(bind_err(&config.control_bind))?;
    files::check_writable(&config.output).map_err(|source| MasterError::Output {
        path: config.output.clone(),
        source,
    })?;
    let output = std::fs::canonicalize(&config.output).map_err(|source| MasterError::Output {
        path: config.output.clone(),
        source,
    })?;
    let batch = format!("{:016x}", rand::random::<u64>());
    let endpoints = Endpoints {
        tasks: tasks_ep.to_string(),
        results: results_ep.to_string(),
        control: control_ep.to_string(),
        batch: batch.clone(),
        total: rels.len(),
    };
    on_ready(&endpoints);
    tracing::info!(tasks = %endpoints.tasks, results = %endpoints.results, control = %endpoints.control, images = rels.len(), "master ready");

    let mut m = Master {
        cfg: config,
        input,
        output,
        batch,
        filter: config.filter.to_string(),
        entries: rels
            .into_iter()
            .map(|p| Entry {
                rel: p.to_string_lossy().into_owned(),
                status: Status::Pending,
                defers: 0,
            })
            .collect(),
        pending: VecDeque::new(),
        parked: Vec::new(),
        workers: HashMap::new(),
        unacked: 0,
        started: false,
        finished: 0,
        failures: Vec::new(),
        by_worker: BTreeMap::new(),
        resent: 0,
        deferred: 0,
        first_sent: None,
        last_answer: None,
        progress: progress_bar(config.progress),
        tasks,
        control,
    };
    m.progress.set_length(m.entries.len() as u64);
    m.reject_non_images();
    let started = Instant::now();
    let interrupted = !m.serve(&mut results, &cancel).await;
    m.progress.finish_and_clear();
    let removed = files::remove_temp_files(&m.output);
    if removed > 0 {
        tracing::info!(removed, "removed temp files left by lost workers");
    }
    if m.cfg.stop_workers && !interrupted {
        m.stop_workers(&mut results, &cancel).await;
    }
    Ok(m.summary(started, interrupted))
}

fn progress_bar(visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
    {
        bar.set_style(style);
    }
    bar
}

struct Master<'a> {
    cfg: &'a MasterConfig,
    input: PathBuf,
    output: PathBuf,
    batch: String,
    filter: String,
    entries: Vec<Entry>,
    pending: VecDeque<usize>,
    /// Tasks deferred many times in a row wait a little before the next try.
    parked: Vec<(Instant, usize)>,
    workers: HashMap<String, WorkerState>,
    /// Tasks sent and neither accepted nor deferred yet.
    unacked: u32,
    /// `min_workers` was reached once.
    started: bool,
    finished: usize,
    failures: Vec<Failure>,
    by_worker: BTreeMap<String, u64>,
    resent: u64,
    deferred: u64,
    first_sent: Option<Instant>,
    last_answer: Option<Instant>,
    progress: ProgressBar,
    tasks: PushSocket,
    control: PubSocket,
}

impl Master<'_> {
    fn reject_non_images(&mut self) {
        for i in 0..self.entries.len() {
            if filter::is_image_path(Path::new(&self.entries[i].rel)) {
                self.pending.push_back(i);
            } else {
                self.finish(
                    i,
                    Err("not an image file (unsupported extension)".into()),
                    None,
                );
            }
        }
    }

    /// Runs until every task has an answer (true) or `cancel` fires (false).
    async fn serve(&mut self, results: &mut PullSocket, cancel: &CancellationToken) -> bool {
        let period = self.cfg.heartbeat.interval.min(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = Instant::now() - self.cfg.heartbeat.interval;
        while self.finished < self.entries.len() {
            tokio::select! {
                () = cancel.cancelled() => return false,
                msg = results.recv() => match msg {
                    Ok(msg) => self.on_report(&msg).await,
                    Err(e) => tracing::debug!(error = %e, "report link error"),
                },
                _ = tick.tick() => {
                    if last_beat.elapsed() >= self.cfg.heartbeat.interval {
                        last_beat = Instant::now();
                        let beat = Control::Heartbeat {
                            batch: self.batch.clone(),
                            heartbeat_ms: self.cfg.heartbeat.interval.as_millis() as u64,
                        };
                        let _ = self.control.send(beat.to_message()).await;
                    }
                    self.check_leases();
                }
            }
            self.pump().await;
        }
        true
    }

    fn sendable(&self) -> u32 {
        let free: u32 = self.workers.values().map(|w| w.free).sum();
        free.saturating_sub(self.unacked)
    }

    /// Sends pending tasks while workers have announced room for them.
    async fn pump(&mut self) {
        if !self.started {
            if self.workers.len() < self.cfg.min_workers.max(1) {
                return;
            }
            self.started = true;
            tracing::info!(workers = self.workers.len(), "dispatching");
        }
        while self.sendable() > 0 {
            let Some(i) = self.pending.pop_front() else {
                return;
            };
            if self.entries[i].status != Status::Pending {
                continue; // stale: answered or accepted after a lease ran out
            }
            let Some(msg) = self.task_message(i).await else {
                continue;
            };
            match self.tasks.send(msg).await {
                Ok(()) => {
                    self.entries[i].status = Status::Sent { at: Instant::now() };
                    self.unacked += 1;
                    self.first_sent.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    // No task link yet (the `hello` came first): retry on the next event.
                    tracing::debug!(error = %e, "cannot send task yet");
                    self.pending.push_front(i);
                    return;
                }
            }
        }
    }

    async fn task_message(&mut self, i: usize) -> Option<zeromq::ZmqMessage> {
        let rel = self.entries[i].rel.clone();
        let src = self.input.join(&rel);
        let dst = self.output.join(&rel);
        let mut task = Task {
            batch: self.batch.clone(),
            id: i as u64,
            path: rel,
            filter: self.filter.clone(),
            input: Some(src.to_string_lossy().into_owned()),
            output: Some(dst.to_string_lossy().into_owned()),
        };
        if self.cfg.transfer == Transfer::Path {
            return Some(task.to_message(None));
        }
        let bytes = match read_bounded(&src, self.cfg.max_image_bytes).await {
            Ok(b) => b,
            Err(reason) => {
                self.finish(i, Err(reason), None);
                return None;
            }
        };
        task.input = None;
        task.output = None;
        Some(task.to_message(Some(bytes)))
    }

    async fn on_report(&mut self, msg: &zeromq::ZmqMessage) {
        let (report, image) = match Report::from_message(msg) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed report");
                return;
            }
        };
        let worker = report.worker.clone();
        let expiry = Heartbeat {
            interval: Duration::from_millis(report.heartbeat_ms.max(1)),
            liveness: self.cfg.heartbeat.liveness,
        };
        if report.event == Event::Bye {
            if self.workers.remove(&worker).is_some() {
                tracing::info!(%worker, "worker left");
            }
            self.requeue_worker(&worker);
            return;
        }
        let state = self.workers.entry(worker.clone()).or_insert_with(|| {
            tracing::info!(%worker, slots = report.slots, "worker joined");
            WorkerState {
                free: 0,
                liveness: Liveness::new(expiry),
            }
        });
        state.free = report.free;
        state.liveness = Liveness::new(expiry);
        let (batch, id) = match &report.event {
            Event::Accept { batch, id }
            | Event::Defer { batch, id }
            | Event::Done { batch, id }
            | Event::Failed { batch, id, .. } => (batch, *id as usize),
            Event::Hello | Event::Heartbeat | Event::Bye => return,
        };
        if *batch != self.batch || id >= self.entries.len() {
            return; // a previous master's batch
        }
        let was_sent = matches!(self.entries[id].status, Status::Sent { .. });
        let was_final = matches!(self.entries[id].status, Status::Done | Status::Failed);
        if was_final {
            return;
        }
        match report.event {
            Event::Accept { .. } => {
                if was_sent {
                    self.unacked -= 1;
                }
                if !matches!(self.entries[id].status, Status::Accepted { .. }) {
                    self.entries[id].status = Status::Accepted {
                        worker,
                        at: Instant::now(),
                    };
                }
            }
            Event::Defer { .. } => {
                if !was_sent {
                    return;
                }
                self.unacked -= 1;
                self.deferred += 1;
                let e = &mut self.entries[id];
                e.status = Status::Pending;
                e.defers += 1;
                if e.defers > 2 * (self.workers.len() as u32 + 1) {
                    // Every worker we tried was full although credits said otherwise (a worker
                    // whose task link is down): do not spin, wait for the books to settle.
                    e.defers = 0;
                    self.parked
                        .push((Instant::now() + Duration::from_millis(50), id));
                } else {
                    self.pending.push_front(id);
                }
            }
            Event::Done { .. } => {
                if was_sent {
                    self.unacked -= 1;
                }
                let outcome = match (self.cfg.transfer, image) {
                    (Transfer::Path, _) => Ok(()),
                    (Transfer::Inline, Some(bytes)) => self.write_output(id, bytes).await,
                    (Transfer::Inline, None) => Err("worker returned no image".to_string()),
                };
                self.finish(id, outcome, Some(worker));
            }
            Event::Failed { reason, .. } => {
                if was_sent {
                    self.unacked -= 1;
                }
                self.finish(id, Err(reason), Some(worker));
            }
            Event::Hello | Event::Heartbeat | Event::Bye => {}
        }
    }

    async fn write_output(&self, id: usize, bytes: Bytes) -> Result<(), String> {
        let dest = self.output.join(&self.entries[id].rel);
        tokio::task::spawn_blocking(move || {
            files::write_atomic(&dest, &bytes, "master")
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))
        })
        .await
        .map_err(|e| format!("writer failed: {e}"))?
    }

    fn finish(&mut self, id: usize, outcome: Result<(), String>, worker: Option<String>) {
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
        self.progress.inc(1);
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

    fn check_leases(&mut self) {
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.liveness.is_expired())
            .map(|(id, _)| id.clone())
            .collect();
        for worker in lost {
            self.workers.remove(&worker);
            tracing::warn!(%worker, "worker silent, re-sending its tasks");
            self.requeue_worker(&worker);
        }
        let ack_window = self.cfg.heartbeat.expiry();
        let now = Instant::now();
        for (i, e) in self.entries.iter_mut().enumerate() {
            let expired = match &e.status {
                Status::Sent { at } => now.duration_since(*at) > ack_window,
                Status::Accepted { at, .. } => now.duration_since(*at) > self.cfg.task_timeout,
                _ => false,
            };
            if expired {
                if matches!(e.status, Status::Sent { .. }) {
                    self.unacked -= 1;
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
    }

    /// Broadcasts `stop` until every known worker said `bye`, or one liveness window passes
    /// (workers we never heard of obey too: they all SUB to the same PUB).
    async fn stop_workers(&mut self, results: &mut PullSocket, cancel: &CancellationToken) {
        let deadline = Instant::now() + self.cfg.heartbeat.expiry().max(Duration::from_secs(1));
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tracing::info!(workers = self.workers.len(), "telling workers to stop");
        while Instant::now() < deadline && !self.workers.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => {
                    let _ = self.control.send(Control::Stop.to_message()).await;
                }
                msg = results.recv() => {
                    if let Ok(msg) = msg {
                        if let Ok((r, _)) = Report::from_message(&msg) {
                            if r.event == Event::Bye {
                                self.workers.remove(&r.worker);
                            }
                        }
                    }
                }
            }
        }
    }

    fn summary(&self, started: Instant, interrupted: bool) -> Summary {
        let done = self
            .entries
            .iter()
            .filter(|e| e.status == Status::Done)
            .count();
        let elapsed = match (self.first_sent, self.last_answer) {
            (Some(a), Some(b)) if b > a => b - a,
            _ => Duration::ZERO,
        };
        let secs = elapsed.as_secs_f64();
        Summary {
            batch: self.batch.clone(),
            total: self.entries.len(),
            done,
            failed: self.failures.len(),
            failures: self.failures.clone(),
            by_worker: self.by_worker.clone(),
            elapsed_ms: elapsed.as_millis() as u64,
            images_per_s: if secs > 0.0 {
                (done as f64 / secs * 10.0).round() / 10.0
            } else {
                0.0
            },
            wall_ms: started.elapsed().as_millis() as u64,
            resent: self.resent,
            deferred: self.deferred,
            workers: self.by_worker.len(),
            interrupted,
            filter: self.filter.clone(),
            transfer: self.cfg.transfer,
        }
    }
}

async fn read_bounded(path: &Path, max: u64) -> Result<Bytes, String> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > max {
        return Err(format!(
            "{} bytes, more than --max-image-bytes {max} for inline transfer",
            meta.len()
        ));
    }
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|e| format!("cannot read: {e}"))
}
