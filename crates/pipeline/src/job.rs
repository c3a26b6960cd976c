//! A job's record in its output directory, so that a master started again on the same output
//! (after its host was lost mid-batch, on that host or another) finishes the batch without
//! redoing the images already done.
//!
//! Two files at the output's root, never listed as inputs or outputs (an output tree may be the
//! next stage's input):
//!
//! - [`JOB_FILE`] (`.pipeline-job`), the **record**: the job's input and filter, a random job
//!   id, and the batches that worked on it. Written atomically (temp file, fsync, rename, fsync
//!   of the directory) before the ready line, so before any task leaves.
//! - `.pipeline-job.ID.done`, the job's **journal**: one line per image done, a JSON string (or
//!   array of bytes) and a newline, appended by the master once the image's output is on disk
//!   (path mode: the worker's `done` checked there; inline: written by the master), off the
//!   master's loop, many lines per write, synced once a second and at the end.
//!
//! A master finding the record of the same input and filter **resumes** the job: an image is
//! done when the journal names it *and* its output is still a regular, non-empty file no older
//! than its input (an input edited since is done again, as `make` would). Anything else is sent.
//! Any other record, none, or `--redo` starts a **new job**: a new id, so an empty journal.
//!
//! Why a journal and not the outputs alone: a file under an output's name is always whole
//! ([`files::write_atomic`]), but the disk cannot say whose it is. A worker of an earlier job
//! (another filter) still finishing its last image when a new job starts renames its output
//! after the new job began; with time stamps alone a restarted master took that file for its
//! own (`tests/restart.rs`). The journal names only what this job's own batches checked.
//!
//! Safe after a SIGKILL (or a power cut) at any moment: a journal line is written only after its
//! output is durable, so a line means a whole output; a line lost (not yet written, or not yet
//! synced when the host went down: at most a second's worth) means an image done again, never
//! one lost; a torn last line
//! (no newline, or not JSON) is ignored. The record is replaced atomically: the old one (or
//! none) holds until the new one is whole. Temp files are named after their batch and never
//! taken for outputs; the next batch of the job, knowing the earlier batches from the record,
//! removes theirs.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::files::{self, TEMP_SUFFIX};
use crate::protocol::WirePath;

/// The record's name at the root of the output directory. Names starting with it are the
/// job's own files, never an input or an output.
pub const JOB_FILE: &str = ".pipeline-job";

/// The journal is synced at most this often (and at the end). A line is only ever written after
/// its output is durable, so the sync is not what makes the journal right, only what bounds the
/// images a power cut makes a restart redo: syncing each group cost 5% of the images/s of 16 px
/// images (two fsyncs per output already, on the same disk).
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Batches remembered in the record (their temp files are removed by the later ones).
const MAX_BATCHES: usize = 64;

/// The record as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// The input directory, resolved.
    input: WirePath,
    /// The filter chain, in its canonical form.
    filter: String,
    /// Names the journal.
    id: String,
    /// The batches of this job, oldest first, the current one last.
    batches: Vec<String>,
}

/// The job a batch belongs to.
#[derive(Debug)]
pub struct Job {
    /// The record found was this job's (same input and filter, no `--redo`).
    pub resumed: bool,
    /// The job's earlier batches (killed or finished): their temp files are not outputs, and
    /// are removed.
    pub earlier_batches: Vec<String>,
    /// Images the journal says are done (relative paths).
    done: HashSet<PathBuf>,
    journal: PathBuf,
}

impl Job {
    /// Opens the job of `input` filtered by `filter` in `output` for `batch`: resumes the record
    /// found there when it is of the same input and filter and `redo` is off, else starts a new
    /// one. The record, with `batch` added, is on disk (synced) when this returns.
    pub fn open(
        output: &Path,
        input: &Path,
        filter: &str,
        batch: &str,
        redo: bool,
    ) -> std::io::Result<Self> {
        let path = output.join(JOB_FILE);
        let found: Option<Record> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let same = found
            .as_ref()
            .filter(|r| r.input.as_path() == input && r.filter == filter);
        // Earlier batches are remembered only for the same job: another job's batch may still
        // be running into the same tree, and its temp files are its own.
        let mut batches = same.map(|r| r.batches.clone()).unwrap_or_default();
        let earlier_batches = batches.clone();
        batches.push(batch.to_string());
        if batches.len() > MAX_BATCHES {
            batches.drain(..batches.len() - MAX_BATCHES);
        }
        let resumed = same.filter(|_| !redo).map(|r| r.id.clone());
        let id = resumed
            .clone()
            .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
        let journal = output.join(format!("{JOB_FILE}.{id}.done"));
        let done = if resumed.is_some() {
            read_journal(&journal)
        } else {
            HashSet::new()
        };
        let record = Record {
            input: WirePath(input.to_path_buf()),
            filter: filter.to_string(),
            id,
            batches,
        };
        let tag = files::temp_tag(batch, "master");
        write_record(&path, &record, &tag)?;
        if let Some(old) = found.filter(|r| Some(&r.id) != resumed.as_ref()) {
            // The earlier job's journal: its images are not this job's.
            let _ = std::fs::remove_file(output.join(format!("{JOB_FILE}.{}.done", old.id)));
        }
        Ok(Self {
            resumed: resumed.is_some(),
            earlier_batches,
            done,
            journal,
        })
    }

    /// Whether image `rel` is already done in this job: named in the journal, its output
    /// (`output`) a regular non-empty file, modified no earlier than its input (`input`).
    pub fn is_done(&self, rel: &Path, input: &Path, output: &Path) -> bool {
        if !self.done.contains(rel) {
            return false;
        }
        let Ok(out) = std::fs::symlink_metadata(output) else {
            return false;
        };
        let Ok(made) = out.modified() else {
            return false;
        };
        if !out.is_file() || out.len() == 0 {
            return false;
        }
        std::fs::metadata(input)
            .and_then(|m| m.modified())
            .is_ok_and(|edited| made >= edited)
    }

    /// Opens the journal for appending; its lines are written and synced on a thread of its own.
    pub fn journal(&self) -> std::io::Result<Journal> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)?;
        file.sync_all()?;
        if let Some(dir) = self.journal.parent() {
            files::sync_dir(dir)?;
        }
        let (tx, rx) = mpsc::channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut unsynced = false;
                let mut synced_at = Instant::now();
                loop {
                    // Lines written and not synced are synced within SYNC_EVERY; with none, the
                    // thread sleeps until the next line.
                    let first = if unsynced {
                        let wait = SYNC_EVERY.saturating_sub(synced_at.elapsed());
                        match rx.recv_timeout(wait) {
                            Ok(rel) => Some(rel),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        match rx.recv() {
                            Ok(rel) => Some(rel),
                            Err(_) => break,
                        }
                    };
                    buf.clear();
                    // Everything already waiting goes in one write.
                    for rel in first
                        .into_iter()
                        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    {
                        line(&mut buf, rel);
                    }
                    if !buf.is_empty() {
                        report(file.write_all(&buf));
                        unsynced = true;
                    }
                    if unsynced && synced_at.elapsed() >= SYNC_EVERY {
                        report(file.sync_data());
                        (unsynced, synced_at) = (false, Instant::now());
                    }
                }
                if unsynced {
                    report(file.sync_data());
                }
            })?;
        Ok(Journal {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

fn report(result: std::io::Result<()>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot write the job's journal: a restart would redo these images");
    }
}

fn line(buf: &mut Vec<u8>, rel: PathBuf) {
    if serde_json::to_writer(&mut *buf, &WirePath(rel)).is_ok() {
        buf.push(b'\n');
    }
}

/// The images a journal names; a torn or garbled line is ignored.
fn read_journal(path: &Path) -> HashSet<PathBuf> {
    let Ok(bytes) = std::fs::read(path) else {
        return HashSet::new();
    };
    // A last line without its newline was torn.
    let end = bytes.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    bytes[..end]
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<WirePath>(l).ok())
        .map(|p| p.0)
        .collect()
}

/// Appends the images done to the job's journal, off the master's loop.
#[derive(Debug)]
pub struct Journal {
    tx: Option<mpsc::Sender<PathBuf>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    /// Image `rel` is done: its output is on disk.
    pub fn record(&self, rel: &Path) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(rel.to_path_buf());
        }
    }

    /// Writes and syncs what is left; blocks until then.
    pub fn close(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `record` atomically to `dest` (temp file, fsync, rename, fsync of the directory).
fn write_record(dest: &Path, record: &Record, tag: &str) -> std::io::Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = parent.join(format!(
        "{JOB_FILE}.{tag}-{}{TEMP_SUFFIX}",
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        files::sync_dir(parent)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pipeline-job-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("in")).expect("scratch dir");
        std::fs::create_dir_all(d.join("out")).expect("scratch dir");
        d
    }

    fn done(job: &Job, d: &Path, rel: &str) -> bool {
        job.is_done(
            Path::new(rel),
            &d.join("in").join(rel),
            &d.join("out").join(rel),
        )
    }

    #[test]
    fn a_job_resumes_only_with_the_same_input_and_filter() {
        let d = scratch("resume");
        let (input, output) = (d.join("in"), d.join("out"));
        for rel in ["a.png", "b.png", "c.png"] {
            std::fs::write(input.join(rel), b"in").expect("input");
        }
        std::thread::sleep(Duration::from_millis(20));
        let first = Job::open(&output, &input, "invert", "b1", false).expect("open");
        assert!(!first.resumed && first.earlier_batches.is_empty());
        let journal = first.journal().expect("journal");
        for rel in ["a.png", "b.png"] {
            files::write_atomic(&output.join(rel), b"out", "x").expect("output");
            journal.record(Path::new(rel));
        }
        journal.close();
        // c.png's output is there, but the journal does not name it (another job's worker).
        files::write_atomic(&output.join("c.png"), b"out", "x").expect("output");
        let again = Job::open(&output, &input, "invert", "b2", false).expect("open");
        assert!(again.resumed);
        assert_eq!(again.earlier_batches, ["b1"]);
        assert!(done(&again, &d, "a.png") && done(&again, &d, "b.png"));
        assert!(!done(&again, &d, "c.png"));
        // An input edited after its output was made is done again; so is a missing output.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(input.join("a.png"), b"edited").expect("edit");
        std::fs::remove_file(output.join("b.png")).expect("rm");
        assert!(!done(&again, &d, "a.png") && !done(&again, &d, "b.png"));
        // Another filter is another job: nothing done, earlier batches and journal forgotten.
        let other = Job::open(&output, &input, "grayscale", "b3", false).expect("open");
        assert!(!other.resumed && other.earlier_batches.is_empty());
        other.journal().expect("journal").record(Path::new("c.png"));
        let back = Job::open(&output, &input, "invert", "b4", false).expect("open");
        assert!(!back.resumed);
        // And --redo starts the job afresh, remembering its batches.
        let redo = Job::open(&output, &input, "invert", "b5", true).expect("open");
        assert!(!redo.resumed && !done(&redo, &d, "c.png"));
        assert_eq!(redo.earlier_batches, ["b4"]);
        assert!(files::temp_files(&output).is_empty());
        let journals = std::fs::read_dir(&output)
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".done"))
            .count();
        assert_eq!(journals, 0, "journals of jobs replaced are removed");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_line_or_an_empty_output_is_not_done() {
        let d = scratch("torn");
        let (input, output) = (d.join("in"), d.join("out"));
        for rel in ["a.png", "b.png", "c.png"] {
            std::fs::write(input.join(rel), b"in").expect("input");
        }
        let job = Job::open(&output, &input, "invert", "b1", false).expect("open");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(output.join("a.png"), b"out").expect("output");
        std::fs::write(output.join("b.png"), b"").expect("empty output");
        std::fs::write(output.join("c.png"), b"out").expect("output");
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&job.journal)
            .expect("journal");
        f.write_all(b"\"a.png\"\n\"b.png\"\n\0\0\0\n\"c.pn")
            .expect("write");
        let again = Job::open(&output, &input, "invert", "b2", false).expect("open");
        assert!(done(&again, &d, "a.png"));
        assert!(!done(&again, &d, "b.png") && !done(&again, &d, "c.png"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_record_starts_a_new_job() {
        let d = scratch("garbled");
        let (input, output) = (d.join("in"), d.join("out"));
        std::fs::write(output.join(JOB_FILE), b"{\"input\":").expect("garbled");
        let job = Job::open(&output, &input, "invert", "b1", false).expect("open");
        assert!(!job.resumed);
        let _ = std::fs::remove_dir_all(&d);
    }
}
