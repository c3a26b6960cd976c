//! The master's disk work, off its loop: reading inline inputs, writing inline outputs and
//! checking that path-mode outputs are on disk. Each job runs on a blocking thread, at most
//! [`MAX_JOBS`] at once and the rest queued in order, and the loop takes the outcomes as they
//! come: a slow disk (a one-second fsync) delays those images, never the heartbeats and reports
//! that keep workers and master in touch.
//!
//! Memory: the bytes this module holds (inputs being read, counted at their limit until read;
//! outputs waiting to be written) are counted in [`Io::held_bytes`], which the master adds to
//! the task bytes in transit and keeps under `--max-inline-bytes`.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::files;

/// Disk jobs running at once.
const MAX_JOBS: usize = 4;

/// A finished job.
#[derive(Debug)]
pub(super) enum Outcome {
    /// An inline input, read (or why not).
    Read {
        id: usize,
        result: Result<Bytes, String>,
    },
    /// An inline output, written (or why not).
    Written {
        id: usize,
        worker: String,
        result: Result<(), String>,
    },
    /// Path-mode outputs checked: `(id, worker, on disk or why not)`.
    Checked(Vec<(usize, String, Result<(), String>)>),
}

#[derive(Debug)]
enum Job {
    Read {
        id: usize,
        path: PathBuf,
        max: u64,
    },
    Write {
        id: usize,
        worker: String,
        dest: PathBuf,
        bytes: Bytes,
        tag: String,
    },
    Check(Vec<(usize, String, PathBuf)>),
}

/// The queue and the running jobs.
#[derive(Debug)]
pub(super) struct Io {
    running: JoinSet<(Outcome, u64)>,
    queue: VecDeque<Job>,
    /// Checks not started yet: the next check job takes them all.
    checks: Vec<(usize, String, PathBuf)>,
    /// Outputs older than this are not this batch's.
    since: SystemTime,
    held_bytes: u64,
}

impl Io {
    pub(super) fn new(since: SystemTime) -> Self {
        Self {
            running: JoinSet::new(),
            queue: VecDeque::new(),
            checks: Vec::new(),
            since,
            held_bytes: 0,
        }
    }

    /// Image bytes held: inputs being read (at their limit) and outputs not yet written.
    pub(super) fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Whether an outcome is to come.
    pub(super) fn is_busy(&self) -> bool {
        !self.running.is_empty()
    }

    /// Reads input `path` of task `id`, refusing more than `max` bytes.
    pub(super) fn read(&mut self, id: usize, path: PathBuf, max: u64) {
        self.held_bytes += max;
        self.queue.push_back(Job::Read { id, path, max });
        self.start();
    }

    /// Writes the output of task `id` that `worker` sent back, atomically, to `dest`.
    pub(super) fn write(
        &mut self,
        id: usize,
        worker: String,
        dest: PathBuf,
        bytes: Bytes,
        tag: String,
    ) {
        self.held_bytes += bytes.len() as u64;
        self.queue.push_back(Job::Write {
            id,
            worker,
            dest,
            bytes,
            tag,
        });
        self.start();
    }

    /// Checks that `worker`'s output of task `id` is on disk at `dest`.
    pub(super) fn check(&mut self, id: usize, worker: String, dest: PathBuf) {
        self.checks.push((id, worker, dest));
        self.start();
    }

    fn start(&mut self) {
        while self.running.len() < MAX_JOBS {
            let job = match self.queue.pop_front() {
                Some(job) => job,
                None if !self.checks.is_empty() => Job::Check(std::mem::take(&mut self.checks)),
                None => return,
            };
            let since = self.since;
            self.running.spawn_blocking(move || run(job, since));
        }
    }

    /// The next outcome; pending for ever when nothing runs (guard with [`is_busy`](Self::is_busy)).
    /// Cancel-safe.
    pub(super) async fn next(&mut self) -> Outcome {
        loop {
            match self.running.join_next().await {
                Some(Ok((outcome, released))) => {
                    self.held_bytes = self.held_bytes.saturating_sub(released);
                    self.start();
                    return outcome;
                }
                // Jobs catch their own panics; a cancelled one cannot happen (never aborted).
                Some(Err(e)) => tracing::error!(error = %e, "disk job lost"),
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Runs one job; returns its outcome and the bytes it held.
fn run(job: Job, since: SystemTime) -> (Outcome, u64) {
    let guarded = |f: &mut dyn FnMut() -> Result<(), String>| {
        std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err("panicked".into()))
    };
    match job {
        Job::Read { id, path, max } => {
            let mut bytes = Bytes::new();
            let result = guarded(&mut || {
                bytes = Bytes::from(files::read_input(&path, max)?);
                Ok(())
            })
            .map(|()| bytes);
            (Outcome::Read { id, result }, max)
        }
        Job::Write {
            id,
            worker,
            dest,
            bytes,
            tag,
        } => {
            let held = bytes.len() as u64;
            let result = guarded(&mut || {
                files::write_atomic(&dest, &bytes, &tag)
                    .map_err(|e| format!("cannot write {}: {e}", dest.display()))
            });
            (Outcome::Written { id, worker, result }, held)
        }
        Job::Check(items) => {
            let checked = items
                .into_iter()
                .map(|(id, worker, dest)| {
                    let result = guarded(&mut || files::output_on_disk(&dest, since));
                    (id, worker, result)
                })
                .collect();
            (Outcome::Checked(checked), 0)
        }
    }
}
