//! The master: ventilator and sink in one process (zguide `taskvent` + `tasksink` + the
//! `taskwork2` kill switch), each a module of its own around the batch's books:
//!
//! - [`ventilator`]: the bound PUSH that deals tasks by credit, per connection, and the task
//!   messages;
//! - [`sink`]: the bound PULL that collects worker reports, and notices workers gone;
//! - [`controller`]: the bound PUB for heartbeats and `stop`;
//! - [`books`]: every task's state, the workers' credits and liveness (no I/O);
//! - [`io`]: the disk work (inline reads and writes, path-mode output checks), off the loop.
//!
//! This file runs one batch: it checks the inputs, binds the three sockets (our own ZMTP code,
//! `common::wire`, with its limits on every endpoint), and turns one loop that moves reports
//! into the books and tasks out of them, and never waits on the disk. A worker the books lose
//! (its report connections closed, or silent for its liveness window) gets its tasks re-sent;
//! a task connection that closes gives back the tasks on their way on it.

mod books;
mod controller;
mod io;
mod sink;
mod ventilator;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::heartbeat::Heartbeat;
use common::watchdog::Watchdog;
use common::wire::limits::Limits;
use common::wire::push::Unsent;
use common::CancellationToken;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;

use crate::filter::Chain;
use crate::protocol::{Control, Event, Report, WirePath};
use crate::{files, job};
use books::{Answer, Books, Rules, Settled};
use controller::Controller;
use io::{Io, Outcome};
use sink::{Heard, Sink};
use ventilator::{Target, TaskSource, Ventilator, PROBE_GRACE};

/// Reports handled in a row when they are already waiting, before the next `select!` turn.
const DRAIN: usize = 64;

/// How long the batch loop may stall before the process exits (`common::watchdog`); the loop
/// awaits no file operation (they run in [`io`]), so only a frozen runtime gets here.
const WATCHDOG: Duration = Duration::from_secs(30);

/// An output is taken for this batch's when modified no earlier than this before the batch
/// started: file times come from a coarse clock (and, on a network filesystem, the server's).
const OUTPUT_CLOCK_SLACK: Duration = Duration::from_secs(2);

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
    /// Do every image again, even those a killed master of the same job left done in the
    /// output (`crate::job`).
    pub redo: bool,
    /// Send nothing until this many workers said hello (zguide: start the batch once the
    /// workers are there); afterwards workers may come and go.
    pub min_workers: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// What a peer may send to each of the three sockets, and make the master hold: reports
    /// carry inline outputs, so the message limit must exceed `max_image_bytes`.
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
    #[error("--max-message-bytes {limit} is not above --max-image-bytes {image}: inline outputs could not come back")]
    LimitTooSmall { limit: u64, image: u64 },
    #[error("cannot listen on {endpoint}")]
    Listen {
        endpoint: String,
        #[source]
        source: std::io::Error,
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
    /// Images found done in the output by an earlier batch of the same job, not sent.
    pub skipped: usize,
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
        let skipped = self.skipped.to_string();
        common::ready::announce(&[
            ("tasks", &self.tasks),
            ("results", &self.results),
            ("control", &self.control),
            ("connect", &connect),
            ("batch", &self.batch),
            ("total", &total),
            ("skipped", &skipped),
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
    /// Every file listed, those skipped included.
    pub total: usize,
    /// Done in this batch.
    pub done: usize,
    /// Found done in the output by an earlier batch of the same job (a master killed or stopped
    /// before the end), not sent again (`crate::job`).
    pub skipped_done: usize,
    /// An earlier batch of the same job was found in the output: its done images count.
    pub resumed: bool,
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
    /// Tasks a full worker handed back (its reports crossed the task on the wire).
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
    /// Connections the three sockets cut off for oversized or malformed input, and for not
    /// reading (the names are the guard relay's, kept for the tools that read them).
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
        if self.skipped_done > 0 {
            s.push_str(&format!(
                "  {} already done by an earlier batch of this job (not redone)\n",
                self.skipped_done
            ));
        }
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
    if config.transfer == Transfer::Inline
        && config.limits.max_message_bytes <= config.max_image_bytes
    {
        return Err(MasterError::LimitTooSmall {
            limit: config.limits.max_message_bytes,
            image: config.max_image_bytes,
        });
    }
    let max_connections =
        common::endpoint::max_connections_for(common::endpoint::raise_open_files_limit(), 3);
    // A worker that stopped reading its tasks or control messages for this long is cut; one
    // that cannot be reached keeps its connections (common::wire::server).
    let stall = config.heartbeat.expiry().max(Duration::from_secs(1));
    let ventilator = Ventilator::bind(&config.tasks_bind, config.limits, max_connections, stall)?;
    let sink = Sink::bind(
        &config.results_bind,
        keepalive,
        config.limits,
        max_connections,
    )?;
    let controller = Controller::bind(&config.control_bind, config.limits, max_connections, stall)?;
    files::check_writable(&config.output).map_err(|source| MasterError::Output {
        path: config.output.clone(),
        source,
    })?;
    let output = std::fs::canonicalize(&config.output).map_err(|source| MasterError::Output {
        path: config.output.clone(),
        source,
    })?;
    let batch = format!("{:016x}", rand::random::<u64>());
    // The job's record goes to disk before any task can leave. A master of the same job lost
    // earlier left done images (its journal names them): not sent again.
    let filter = config.filter.to_string();
    let job = job::Job::open(&output, &input, &filter, &batch, config.redo).map_err(|source| {
        MasterError::Output {
            path: config.output.clone(),
            source,
        }
    })?;
    let total = rels.len();
    // Every output directory of the job, also those whose images are all done already.
    let mut dirs = files::output_dirs(&output, rels.iter().map(PathBuf::as_path));
    dirs.push(output.clone());
    let rels: Vec<PathBuf> = if job.resumed {
        rels.into_iter()
            .filter(|rel| !job.is_done(rel, &input.join(rel), &output.join(rel)))
            .collect()
    } else {
        rels
    };
    let skipped = total - rels.len();
    // Their temp files were never outputs (their names are not), and nobody renames them now.
    let earlier: Vec<&str> = job.earlier_batches.iter().map(String::as_str).collect();
    let removed = files::remove_batches_temp_files(dirs.iter().map(PathBuf::as_path), &earlier);
    if job.resumed || removed > 0 {
        tracing::info!(
            skipped,
            left = rels.len(),
            removed,
            earlier_batches = earlier.len(),
            "resuming the job in this output: images already done are not sent again, temp files of its earlier batches removed"
        );
    }
    // What this batch gets done goes to the job's journal once its output is on disk (not for
    // `--no-output-check`: `--dry-run` workers write nothing).
    let journal = if config.check_outputs || config.transfer == Transfer::Inline {
        Some(job.journal().map_err(|source| MasterError::Output {
            path: config.output.clone(),
            source,
        })?)
    } else {
        None
    };
    let endpoints = Endpoints {
        tasks: ventilator.endpoint().to_string(),
        results: sink.endpoint().to_string(),
        control: controller.endpoint().to_string(),
        batch: batch.clone(),
        total,
        skipped,
    };
    on_ready(&endpoints);
    tracing::info!(
        tasks = %endpoints.tasks,
        results = %endpoints.results,
        control = %endpoints.control,
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
            filter,
            timeout_ms: u64::try_from(config.task_timeout.as_millis()).unwrap_or(u64::MAX),
        },
        ventilator,
        sink,
        controller,
        io: Io::new(since),
        staged: HashMap::new(),
        planned: HashMap::new(),
        started: false,
        progress: progress_bar(config.progress),
        timeline: common::timeline::Timeline::start(),
        skipped,
        resumed: job.resumed,
        journal,
    };
    m.progress.set_length(m.books.total() as u64);
    let started = Instant::now();
    let interrupted = !m.serve(&cancel).await;
    m.progress.finish_and_clear();
    if let Some(journal) = m.journal.take() {
        let _ = tokio::task::spawn_blocking(move || journal.close()).await;
    }
    // This job's temp files only (this batch's, and those of its killed earlier batches whose
    // workers were still running), in its own output directories: another batch writing into
    // the same tree keeps its own.
    let mut batches = job.earlier_batches;
    batches.push(m.source.batch.clone());
    let removed = tokio::task::spawn_blocking(move || {
        let batches: Vec<&str> = batches.iter().map(String::as_str).collect();
        files::remove_batches_temp_files(dirs.iter().map(PathBuf::as_path), &batches)
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
    /// Its connection is gone: the task goes elsewhere now.
    Again,
    /// Its connection cannot take more now: nothing more goes until the next event.
    Full,
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
    /// Inline inputs read and not sent yet (their connection could not take them): sent from
    /// here next time rather than read again.
    staged: HashMap<usize, Bytes>,
    /// Inline inputs being read, and where each goes once read.
    planned: HashMap<usize, Target>,
    /// `min_workers` was reached once.
    started: bool,
    progress: ProgressBar,
    timeline: common::timeline::Timeline,
    /// Images an earlier batch of the job left done: not in the books.
    skipped: usize,
    resumed: bool,
    /// Where images done are recorded for a master started again on this output.
    journal: Option<job::Journal>,
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
                heard = self.sink.recv() => {
                    self.on_heard(heard);
                    // What is already waiting is taken now, not one batch per turn of this
                    // `select!` with a pump after each.
                    for _ in 1..DRAIN {
                        let Some(heard) = self.sink.try_recv() else { break };
                        self.on_heard(heard);
                    }
                }
                event = self.ventilator.recv() => {
                    for id in self.ventilator.on_event(event) {
                        self.books.take_back(id);
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
                    for id in self.ventilator.expired_probes() {
                        self.books.take_back(id);
                    }
                    let expired = self
                        .books
                        .expire(self.cfg.heartbeat.expiry(), self.cfg.task_timeout);
                    if expired.unacked > 0 {
                        tracing::info!(unacked = expired.unacked, "tasks no worker acknowledged in time: sent again");
                    }
                    self.books.request_backups();
                    let books = &self.books;
                    self.staged.retain(|id, _| books.wants_copy(*id));
                }
            }
            self.pump();
            self.progress.set_position(self.books.finished() as u64);
        }
        true
    }

    /// Books what the sink heard: reports, or a worker whose report connections all closed
    /// (its process is gone, or it is reconnecting: what it held goes elsewhere now).
    fn on_heard(&mut self, heard: Heard) {
        match heard {
            Heard::Reports(reports) => {
                for (report, image) in reports {
                    self.on_report(report, image);
                }
            }
            Heard::Gone(worker) => self.books.lose_worker(&worker, "its connection closed"),
            Heard::Nothing => {}
        }
    }

    /// Books a report; a `done` from a worker that held the task goes to [`io`] (output
    /// checked or written) and is settled when that comes back.
    fn on_report(&mut self, report: Report, image: Option<Bytes>) {
        if let Event::Accept { batch, id } | Event::Defer { batch, id } = &report.event {
            if *batch == self.source.batch {
                if let Ok(id) = usize::try_from(*id) {
                    self.ventilator.acknowledged(id, &report.worker);
                }
            }
        }
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
            if let Some(journal) = &self.journal {
                journal.record(self.books.rel(id));
            }
        }
    }

    /// A disk job came back: an input read is sent, an output written or checked settles its
    /// task.
    fn on_io(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Read { id, result } => {
                let target = self.planned.remove(&id);
                if !self.books.is_launched(id) {
                    return; // answered meanwhile by a worker that held it before
                }
                match (result, target) {
                    (Ok(bytes), Some(target)) => {
                        self.send_inline(id, bytes, &target);
                    }
                    (Ok(bytes), None) => {
                        self.staged.insert(id, bytes);
                        self.books.unsent(id);
                    }
                    (Err(reason), _) => self.books.unreadable(id, reason),
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
        let staged: u64 = self.staged.values().map(|b| b.len() as u64).sum();
        let held = self.books.transit_bytes() + self.io.held_bytes() + staged;
        held == 0 || held.saturating_add(self.cfg.max_image_bytes) <= self.cfg.max_inline_bytes
    }

    /// Sends inline task `id` with its image to `target`; kept staged when it cannot go now.
    fn send_inline(&mut self, id: usize, bytes: Bytes, target: &Target) -> Went {
        let msg = self
            .source
            .message(id, self.books.rel(id), Some(bytes.clone()));
        let len = bytes.len() as u64;
        let went = self.send(id, target, &msg, len);
        if went != Went::Queued {
            self.staged.insert(id, bytes);
        }
        went
    }

    /// Hands task `id` to `target`'s connection.
    fn send(&mut self, id: usize, target: &Target, msg: &zeromq::ZmqMessage, bytes: u64) -> Went {
        match self.ventilator.send(id, target, msg) {
            Ok(()) => {
                self.books.sent(id, bytes);
                Went::Queued
            }
            Err(Unsent::Gone) => {
                self.books.unsent(id);
                Went::Again
            }
            Err(Unsent::Full | Unsent::Cut) => {
                // Its outbox holds its byte bound: that worker is not reading, or cannot be
                // reached. The task goes first next time.
                tracing::debug!(serial = target.serial, "a task connection is full");
                self.books.unsent(id);
                Went::Full
            }
        }
    }

    /// Where the next task goes: the task connection of the worker with the most room, or a
    /// probe of a connection not yet known to be anyone's while a worker without a known one
    /// has room (see `ventilator`).
    fn target(&self) -> Option<Target> {
        let mut best: Option<(u32, &str, u64)> = None;
        for (worker, serial) in self.ventilator.linked() {
            let room = self.books.room_of(worker);
            if room > 0 && best.is_none_or(|(most, _, _)| room > most) {
                best = Some((room, worker, serial));
            }
        }
        if let Some((_, worker, serial)) = best {
            return Some(Target {
                serial,
                worker: Some(worker.to_string()),
            });
        }
        let ventilator = &self.ventilator;
        if self
            .books
            .unlinked_room(|w| ventilator.is_linked(w), PROBE_GRACE)
            == 0
        {
            return None;
        }
        ventilator.probe_target().map(|serial| Target {
            serial,
            worker: None,
        })
    }

    /// Sends pending tasks while workers with a task connection have announced room for them
    /// (inline: while the bytes held leave room too; the input is read off the loop and sent
    /// when read).
    fn pump(&mut self) {
        if !self.started {
            if self.books.workers() < self.cfg.min_workers.max(1) {
                return;
            }
            self.started = true;
            tracing::info!(workers = self.books.workers(), "dispatching");
        }
        let inline = self.cfg.transfer == Transfer::Inline;
        loop {
            if inline && !self.inline_room() {
                return;
            }
            let Some(target) = self.target() else {
                return;
            };
            let Some(i) = self.books.next_to_send(target.worker.as_deref()) else {
                return;
            };
            let went = if inline {
                if let Some(bytes) = self.staged.remove(&i) {
                    self.send_inline(i, bytes, &target)
                } else {
                    let path = self.source.input.join(self.books.rel(i));
                    self.io.read(i, path, self.cfg.max_image_bytes);
                    self.planned.insert(i, target);
                    Went::Queued
                }
            } else {
                let msg = self.source.message(i, self.books.rel(i), None);
                self.send(i, &target, &msg, 0)
            };
            if went == Went::Full {
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
                heard = self.sink.recv() => match heard {
                    Heard::Reports(reports) => {
                        for (report, _) in reports {
                            if report.event == Event::Bye {
                                known.remove(&report.worker);
                                byes += 1;
                            } else {
                                known.insert(report.worker);
                            }
                        }
                    }
                    Heard::Gone(worker) => {
                        known.remove(&worker);
                    }
                    Heard::Nothing => {}
                },
                event = self.ventilator.recv() => {
                    self.ventilator.on_event(event);
                }
            }
        }
        self.controller.flush(Duration::from_millis(200)).await;
    }

    fn summary(&self, started: Instant, interrupted: bool) -> Summary {
        let t = self.books.tally();
        let secs = t.elapsed.as_secs_f64();
        let sockets = [
            self.ventilator.stats(),
            self.sink.stats(),
            self.controller.stats(),
        ];
        let (guard_refused, guard_stalled) = common::wire::limits::totals(sockets);
        Summary {
            batch: self.source.batch.clone(),
            total: self.books.total() + self.skipped,
            done: t.done,
            skipped_done: self.skipped,
            resumed: self.resumed,
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
