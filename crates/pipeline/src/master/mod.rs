//! The master: ventilator and sink in one process (zguide `taskvent` + `tasksink` + the
//! `taskwork2` kill switch), each a module of its own around the batch's books:
//!
//! - [`ventilator`]: the bound PUSH that deals tasks, and the task messages;
//! - [`sink`]: the bound PULL that collects worker reports, and inline outputs;
//! - [`controller`]: the bound PUB for heartbeats and `stop`;
//! - [`books`]: every task's state, the workers' credits and liveness (no I/O);
//! - [`io`]: the disk work (inline reads and writes, path-mode output checks), off the loop.
//!
//! This file runs one batch: it checks the inputs, binds the three sockets (with keepalive and
//! `TCP_USER_TIMEOUT`), and turns one loop that moves reports into the books and tasks out of
//! them, and never waits on the disk. A worker the books lose (silent for its liveness window)
//! gets its tasks re-sent, and the ventilator cuts the task links so that PUSH stops dealing to
//! it; so does a task that no worker acknowledged within that window.

mod books;
mod controller;
mod io;
mod sink;
mod ventilator;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::guard::{GuardStats, Limits, Mode};
use common::heartbeat::Heartbeat;
use common::send::Sent;
use common::watchdog::Watchdog;
use common::CancellationToken;
use futures::FutureExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use zeromq::{Socket, ZmqError};

use crate::files;
use crate::filter::Chain;
use crate::protocol::{Control, Event, Report, WirePath};
use books::{Answer, Books, Rules, Settled};
use controller::Controller;
use io::{Io, Outcome};
use sink::Sink;
use ventilator::{TaskSource, Ventilator};

/// Reports handled in a row when they are already waiting, before the next `select!` turn.
const DRAIN: usize = 64;

/// How long the batch loop may stall before the process exits (`common::watchdog`); the loop
/// awaits no file operation (they run in [`io`]), so only a frozen runtime gets here.
const WATCHDOG: Duration = Duration::from_secs(30);

/// An output is taken for this batch's when modified no earlier than this before the batch
/// started: file times come from a coarse clock (and, on a network filesystem, the server's).
const OUTPUT_CLOCK_SLACK: Duration = Duration::from_secs(2);

/// After the task links are cut, the old PUSH keeps the tasks queued on it for its handshake
/// grace (100 ms, `ventilator`): inline, their bytes count as held until then.
const RETIRED_FOR: Duration = Duration::from_millis(200);

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
    /// Inline: image bytes the master holds at most, tasks sent and not yet acknowledged plus
    /// inputs being read (counted at `max_image_bytes`) plus outputs not yet written; no task
    /// leaves while they are at it. At least `max_image_bytes`.
    pub max_inline_bytes: u64,
    pub heartbeat: Heartbeat,
    /// A task accepted this long ago without an answer is sent again (and the worker, told of
    /// it in the task, abandons it).
    pub task_timeout: Duration,
    /// Attempts a task may cost (answers lost to the task timeout, a lost or restarted worker,
    /// a `done` without its output) before it fails.
    pub max_attempts: u32,
    /// Most tasks one worker may hold, whatever `slots` it announces.
    pub max_slots: u32,
    /// Path mode: a `done` counts only with its output on disk. Off only for `--dry-run`
    /// workers, which write nothing (benchmarks of the messaging).
    pub check_outputs: bool,
    /// Broadcast `stop` once the batch is complete.
    pub stop_workers: bool,
    /// Send nothing until this many workers said hello (zguide: start the batch once the
    /// workers are there); afterwards workers may come and go.
    pub min_workers: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Which of the three endpoints get a guard, and what it lets through (see
    /// `common::guard`): reports carry inline outputs, so the message limit must exceed them.
    pub guard: Mode,
    pub limits: Limits,
}

/// `--max-message-bytes` of the master: twice the largest inline input (`--max-image-bytes`,
/// 32 MiB), since an output may come back larger than its input.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 64 << 20;
/// `--max-peer-bytes` of the master: eight inline tasks of the largest size waiting for one
/// worker.
pub const DEFAULT_MAX_PEER_BYTES: u64 = 256 << 20;

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
    #[error("--output {output} is --input {input} or inside it: outputs would land among the inputs; choose an output directory outside the input tree")]
    OutputInInput { output: PathBuf, input: PathBuf },
    #[error("--max-inline-bytes {budget} is below --max-image-bytes {image}: no image could ever be sent")]
    InlineBudget { budget: u64, image: u64 },
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
    #[error(transparent)]
    Endpoint(#[from] common::endpoint::EndpointError),
    #[error("cannot bind {endpoint}")]
    Bind {
        endpoint: String,
        #[source]
        source: ZmqError,
    },
    #[error("--max-message-bytes {limit} is not above --max-image-bytes {image}: inline outputs come back through the guard")]
    GuardTooSmall { limit: u64, image: u64 },
    #[error("cannot listen on {endpoint}")]
    Listen {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<common::guard::BindError> for MasterError {
    fn from(e: common::guard::BindError) -> Self {
        match e {
            common::guard::BindError::Endpoint(e) => Self::Endpoint(e),
            common::guard::BindError::Socket { endpoint, source } => {
                Self::Bind { endpoint, source }
            }
        }
    }
}

impl MasterError {
    fn bind(endpoint: &str) -> impl FnOnce(ZmqError) -> Self {
        let endpoint = endpoint.to_string();
        move |source| Self::Bind { endpoint, source }
    }
}

/// A socket bound on a listener with TCP keepalive and `TCP_USER_TIMEOUT` (`keepalive` idle,
/// four of them before a connection with unacknowledged data is aborted): a worker lost behind a
/// partition releases its connection in seconds, not after the ~15 minutes of retransmissions.
/// With `guard`, the guard owns that listener and the socket listens on a loopback port of its
/// own.
struct Bound<S> {
    socket: S,
    endpoint: String,
    guard: Option<Arc<GuardStats>>,
}

impl<S: Socket> Bound<S> {
    async fn bind(
        endpoint: &str,
        keepalive: Duration,
        guard: Option<Limits>,
    ) -> Result<Self, MasterError> {
        let mut socket = S::new();
        let (bound, guard) = common::guard::bind(&mut socket, endpoint, keepalive, guard).await?;
        Ok(Self {
            socket,
            endpoint: bound,
            guard,
        })
    }

    /// A new socket accepting on `listener` (bound for `endpoint`).
    async fn on(listener: std::net::TcpListener, endpoint: &str) -> Result<Self, MasterError> {
        let mut socket = S::new();
        let bound = socket
            .bind_listener(listener)
            .await
            .map_err(MasterError::bind(endpoint))?;
        Ok(Self {
            socket,
            endpoint: bound.to_string(),
            guard: None,
        })
    }
}

impl<S> std::fmt::Debug for Bound<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
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
    /// Relative to the input: a string, or an array of bytes when the name is not UTF-8.
    pub path: WirePath,
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
    /// `accept`s refused: beyond the worker's slots, or of a task it already held (the task
    /// went to another worker).
    pub refused: u64,
    /// `done`/`failed` from workers that never held the task: ignored.
    pub stray: u64,
    /// Tail copies of tasks held far longer than the median (counted in `resent` too).
    pub backups: u64,
    /// Workers whose `done` did not hold up (path: no output on disk; inline: no image): given
    /// nothing more in this batch.
    pub distrusted: Vec<String>,
    /// Connections the guards cut off for oversized or malformed input, and for letting more
    /// than `--max-peer-bytes` pile up unread.
    pub guard_refused: u64,
    pub guard_stalled: u64,
    pub workers: usize,
    pub interrupted: bool,
    pub filter: String,
    pub transfer: Transfer,
    /// Images reported done by the workers, per 100 ms since the master was ready.
    pub timeline: common::timeline::Timeline,
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
            s.push_str(&format!("  failed {}: {}\n", f.path.display(), f.reason));
        }
        if self.interrupted {
            s.push_str("  interrupted before the end of the batch\n");
        }
        s
    }
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
    let output_resolved = files::resolve(&config.output).map_err(|source| MasterError::Output {
        path: config.output.clone(),
        source,
    })?;
    if output_resolved.starts_with(&input) {
        return Err(MasterError::OutputInInput {
            output: config.output.clone(),
            input,
        });
    }
    if config.transfer == Transfer::Inline && config.max_inline_bytes < config.max_image_bytes {
        return Err(MasterError::InlineBudget {
            budget: config.max_inline_bytes,
            image: config.max_image_bytes,
        });
    }
    // Order matters for "nothing half done": list the input, bind every socket, and only then
    // create the output directory, so a failure before it leaves no trace. The output directory
    // is not inside the input, but a link in the input may lead to it: the walk leaves it out.
    let listing =
        files::list(&input, Some(&output_resolved)).map_err(|source| MasterError::ListInput {
            path: input.clone(),
            source,
        })?;
    if !listing.loops.is_empty() {
        tracing::warn!(links = ?listing.loops, "links to their own ancestors, not walked");
    }
    let rels = listing.files;
    // Keepalive probes are whole seconds.
    let keepalive = config.heartbeat.interval.max(Duration::from_secs(1));
    let guard = |endpoint: &str| -> Result<Option<Limits>, MasterError> {
        Ok(common::guard::wanted(config.guard, endpoint)?.then_some(config.limits))
    };
    let results_guard = guard(&config.results_bind)?;
    if let Some(limits) = results_guard {
        if config.transfer == Transfer::Inline && limits.max_message_bytes <= config.max_image_bytes
        {
            return Err(MasterError::GuardTooSmall {
                limit: limits.max_message_bytes,
                image: config.max_image_bytes,
            });
        }
    }
    let ventilator =
        Ventilator::bind(&config.tasks_bind, keepalive, guard(&config.tasks_bind)?).await?;
    let sink = Sink::bind(&config.results_bind, keepalive, results_guard).await?;
    let controller = Controller::bind(
        &config.control_bind,
        keepalive,
        guard(&config.control_bind)?,
    )
    .await?;
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
        tasks: ventilator.endpoint().to_string(),
        results: sink.endpoint().to_string(),
        control: controller.endpoint().to_string(),
        batch: batch.clone(),
        total: rels.len(),
    };
    on_ready(&endpoints);
    tracing::info!(
        tasks = %endpoints.tasks,
        results = %endpoints.results,
        control = %endpoints.control,
        guarded_tasks = ventilator.guard().is_some(),
        guarded_results = sink.guard().is_some(),
        guarded_control = controller.guard().is_some(),
        images = rels.len(),
        "master ready"
    );

    let rules = Rules {
        liveness: config.heartbeat.liveness,
        max_attempts: config.max_attempts.max(1),
        max_slots: config.max_slots,
    };
    let since = SystemTime::now() - OUTPUT_CLOCK_SLACK;
    let mut m = Master {
        cfg: config,
        books: Books::new(batch.clone(), rules, rels),
        source: TaskSource {
            input,
            output,
            batch,
            filter: config.filter.to_string(),
            timeout_ms: u64::try_from(config.task_timeout.as_millis()).unwrap_or(u64::MAX),
        },
        ventilator,
        sink,
        controller,
        io: Io::new(since),
        staged: HashMap::new(),
        retired: None,
        started: false,
        progress: progress_bar(config.progress),
        timeline: common::timeline::Timeline::start(),
    };
    m.progress.set_length(m.books.total() as u64);
    let started = Instant::now();
    let interrupted = !m.serve(&cancel).await;
    m.progress.finish_and_clear();
    // This batch's temp files only, in its own output directories: another batch writing into
    // the same tree keeps its own.
    let dirs = files::output_dirs(&m.source.output, m.books.rels());
    let batch = m.source.batch.clone();
    let removed = tokio::task::spawn_blocking(move || {
        files::remove_batch_temp_files(dirs.iter().map(PathBuf::as_path), &batch)
    })
    .await
    .unwrap_or(0);
    if removed > 0 {
        tracing::info!(
            removed,
            "removed this batch's temp files left by lost workers"
        );
    }
    if m.cfg.stop_workers && !interrupted {
        m.stop_workers(&cancel).await;
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

/// What became of a task handed to the PUSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Went {
    Queued,
    /// Not taken by that worker; it goes to the next one now.
    Again,
    /// No task link at all: nothing more can go until the next event.
    NoLink,
}

/// One batch in progress: the books between the ventilator, the sink and the controller.
struct Master<'a> {
    cfg: &'a MasterConfig,
    books: Books,
    source: TaskSource,
    ventilator: Ventilator,
    sink: Sink,
    controller: Controller,
    io: Io,
    /// Inline inputs read and not sent yet (no task link at that moment): sent from here next
    /// time rather than read again.
    staged: HashMap<usize, Bytes>,
    /// Inline bytes of the tasks queued on a PUSH just cut, held until it is dropped.
    retired: Option<(Instant, u64)>,
    /// `min_workers` was reached once.
    started: bool,
    progress: ProgressBar,
    timeline: common::timeline::Timeline,
}

impl Master<'_> {
    /// Runs until every task has an answer (true) or `cancel` fires (false).
    async fn serve(&mut self, cancel: &CancellationToken) -> bool {
        let period = self.cfg.heartbeat.interval.min(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = Instant::now() - self.cfg.heartbeat.interval;
        // The tick turns this loop ten times a second; one that stops turning (a frozen runtime,
        // a file operation that never returns) ends the process with status 70 rather than
        // leaving a master that workers wait on forever.
        let watchdog = Watchdog::spawn("master", WATCHDOG.max(self.cfg.heartbeat.expiry()));
        while !self.books.is_complete() {
            watchdog.pet();
            tokio::select! {
                () = cancel.cancelled() => return false,
                (report, image) = self.sink.recv() => {
                    self.on_report(report, image);
                    // Reports already waiting are taken now, not one per turn of this
                    // `select!` with a pump after each (measured with tiny tasks: +10% at one
                    // in flight, the same at 32; docs/performance.md).
                    for _ in 1..DRAIN {
                        let Some((report, image)) = self.sink.recv().now_or_never() else {
                            break;
                        };
                        self.on_report(report, image);
                    }
                }
                outcome = self.io.next(), if self.io.is_busy() => self.on_io(outcome),
                _ = tick.tick() => {
                    if last_beat.elapsed() >= self.cfg.heartbeat.interval {
                        last_beat = Instant::now();
                        self.controller.publish(&Control::Heartbeat {
                            batch: self.source.batch.clone(),
                            heartbeat_ms: self.cfg.heartbeat.interval.as_millis() as u64,
                        });
                    }
                    let expired = self
                        .books
                        .expire(self.cfg.heartbeat.expiry(), self.cfg.task_timeout);
                    if !expired.lost.is_empty() || expired.unacked > 0 {
                        self.cut_task_links(&expired).await;
                    }
                    self.books.request_backups();
                    let books = &self.books;
                    self.staged.retain(|id, _| books.wants_copy(*id));
                }
            }
            self.pump();
            self.progress.set_position(self.books.finished() as u64);
            // zmq.rs's sockets are outside tokio's cooperative budget: without this, reports
            // that keep coming would never let the library's own tasks on this thread run.
            tokio::task::consume_budget().await;
        }
        true
    }

    /// Books a report; a `done` from a worker that held the task goes to [`io`] (output
    /// checked or written) and is settled when that comes back.
    fn on_report(&mut self, report: Report, image: Option<Bytes>) {
        let Some(Answer::Done { id, worker }) = self.books.on_report(&report) else {
            return;
        };
        let dest = self.source.output.join(self.books.rel(id));
        match (self.cfg.transfer, image) {
            (Transfer::Path, _) if self.cfg.check_outputs => self.io.check(id, worker, dest),
            (Transfer::Path, _) => self.settle(id, &worker, Settled::Done),
            (Transfer::Inline, Some(bytes)) => {
                let tag = files::temp_tag(&self.source.batch, "master");
                self.io.write(id, worker, dest, bytes, tag);
            }
            (Transfer::Inline, None) => {
                self.settle(id, &worker, Settled::Bogus("returned no image".into()));
            }
        }
    }

    fn settle(&mut self, id: usize, worker: &str, outcome: Settled) {
        if self.books.settle(id, worker, outcome) {
            self.timeline.record();
        }
    }

    /// A disk job came back: an input read is sent, an output written or checked settles its
    /// task.
    fn on_io(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Read { id, result } => {
                if !self.books.is_launched(id) {
                    return; // answered meanwhile by a worker that held it before
                }
                match result {
                    Ok(bytes) => {
                        self.send_inline(id, bytes);
                    }
                    Err(reason) => self.books.unreadable(id, reason),
                }
            }
            Outcome::Written { id, worker, result } => {
                let settled = result.map_or_else(Settled::Unwritable, |()| Settled::Done);
                self.settle(id, &worker, settled);
            }
            Outcome::Checked(items) => {
                for (id, worker, result) in items {
                    let settled = result.map_or_else(Settled::Bogus, |()| Settled::Done);
                    self.settle(id, &worker, settled);
                }
            }
        }
    }

    /// Whether inline bytes (in transit, being read, waiting to be written) leave room for one
    /// more input at its limit.
    fn inline_room(&self) -> bool {
        let retired = match self.retired {
            Some((until, bytes)) if Instant::now() < until => bytes,
            _ => 0,
        };
        let staged: u64 = self.staged.values().map(|b| b.len() as u64).sum();
        let held = self.books.transit_bytes() + self.io.held_bytes() + staged + retired;
        held == 0 || held.saturating_add(self.cfg.max_image_bytes) <= self.cfg.max_inline_bytes
    }

    /// Sends inline task `id` with its image; kept staged when it cannot go now.
    fn send_inline(&mut self, id: usize, bytes: Bytes) -> bool {
        let msg = self
            .source
            .message(id, self.books.rel(id), Some(bytes.clone()));
        let len = bytes.len() as u64;
        let went = self.send(id, msg, len);
        if went != Went::Queued {
            self.staged.insert(id, bytes);
        }
        went != Went::NoLink
    }

    /// Hands task `id` to the PUSH.
    fn send(&mut self, id: usize, msg: zeromq::ZmqMessage, bytes: u64) -> Went {
        match self.ventilator.send(msg) {
            Sent::Queued => {
                self.books.sent(id, bytes);
                Went::Queued
            }
            Sent::Stalled => {
                // That worker's queue is full: the message was dropped and the worker left
                // the rotation; the task goes to the next one.
                tracing::warn!("a worker stopped reading its tasks");
                self.books.unsent(id);
                Went::Again
            }
            Sent::Failed(e) => {
                // No task link yet (the `hello` came first): retry on the next event.
                tracing::debug!(error = %e, "cannot send task yet");
                self.books.unsent(id);
                Went::NoLink
            }
        }
    }

    /// A worker went silent, or a task vanished without an acknowledgement: a task connection
    /// is open that nobody reads (a hung worker, or one a worker left behind a partition), and
    /// PUSH would go on dealing it every n-th task. Cut every task link; live workers reconnect
    /// at once.
    async fn cut_task_links(&mut self, why: &books::Expired) {
        match self.ventilator.cut().await {
            Ok(()) => {
                tracing::info!(lost = ?why.lost, unacked = why.unacked, "task links cut, live workers reconnect");
                let queued = self.books.transit_bytes();
                self.retired = Some((Instant::now() + RETIRED_FOR, queued));
                self.books.requeue_unacked();
            }
            Err(e) => tracing::error!(error = %e, "cannot renew the task socket"),
        }
    }

    /// Sends pending tasks while workers have announced room for them (inline: while the
    /// bytes held leave room too; the input is read off the loop and sent when read).
    fn pump(&mut self) {
        if !self.started {
            if self.books.workers() < self.cfg.min_workers.max(1) {
                return;
            }
            self.started = true;
            tracing::info!(workers = self.books.workers(), "dispatching");
        }
        loop {
            let inline = self.cfg.transfer == Transfer::Inline;
            if inline && !self.inline_room() {
                return;
            }
            let Some(i) = self.books.next_to_send() else {
                return;
            };
            if inline {
                if let Some(bytes) = self.staged.remove(&i) {
                    if !self.send_inline(i, bytes) {
                        return;
                    }
                } else {
                    let path = self.source.input.join(self.books.rel(i));
                    self.io.read(i, path, self.cfg.max_image_bytes);
                }
                continue;
            }
            let msg = self.source.message(i, self.books.rel(i), None);
            if self.send(i, msg, 0) == Went::NoLink {
                return;
            }
        }
    }

    /// Broadcasts `stop` every 100 ms until every worker known said `bye`, for at most one
    /// liveness window. Workers the master never heard of obey too (they all SUB to the same
    /// PUB); when it knows none (an empty batch), it waits the window for workers to show up
    /// and stops those.
    async fn stop_workers(&mut self, cancel: &CancellationToken) {
        let window = self.cfg.heartbeat.expiry().max(Duration::from_secs(1));
        let deadline = Instant::now() + window;
        let mut known: HashSet<String> = self.books.worker_names().into_iter().collect();
        let await_any = known.is_empty();
        let mut byes = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tracing::info!(workers = known.len(), "telling workers to stop");
        while !(known.is_empty() && (byes > 0 || !await_any)) {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick() => self.controller.publish(&Control::Stop),
                (report, _) = self.sink.recv() => {
                    if report.event == Event::Bye {
                        known.remove(&report.worker);
                        byes += 1;
                    } else {
                        known.insert(report.worker);
                    }
                }
            }
        }
    }

    fn summary(&self, started: Instant, interrupted: bool) -> Summary {
        let t = self.books.tally();
        let secs = t.elapsed.as_secs_f64();
        let guards = [
            self.ventilator.guard(),
            self.sink.guard(),
            self.controller.guard(),
        ];
        let (guard_refused, guard_stalled) = common::guard::totals(guards.into_iter().flatten());
        Summary {
            batch: self.source.batch.clone(),
            total: self.books.total(),
            done: t.done,
            failed: t.failures.len(),
            failures: t.failures,
            workers: t.by_worker.len(),
            by_worker: t.by_worker,
            elapsed_ms: t.elapsed.as_millis() as u64,
            images_per_s: if secs > 0.0 {
                (t.done as f64 / secs * 10.0).round() / 10.0
            } else {
                0.0
            },
            wall_ms: started.elapsed().as_millis() as u64,
            resent: t.resent,
            deferred: t.deferred,
            refused: t.refused,
            stray: t.stray,
            backups: t.backups,
            distrusted: t.distrusted,
            guard_refused,
            guard_stalled,
            interrupted,
            filter: self.source.filter.clone(),
            transfer: self.cfg.transfer,
            timeline: self.timeline.clone(),
        }
    }
}
