//! Seed, "Divide and Conquer": the image pipeline with one worker, several workers, a worker
//! killed mid-batch, and corrupt input. Real `pipeline` (master) and `pipeline-worker` processes.
//!
//! The verdicts check the master's JSON summary against the files actually on disk: one output
//! per readable input, no temporary file left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Lab, Scenario};
use crate::process::Proc;
use crate::verdict::Verdict;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { name: "pipeline-one-worker", about: "images filtered by one worker: one output per image", run: |l| Box::pin(one_worker(l)) },
        Scenario { name: "pipeline-workers", about: "the same batch with one, then two workers: work spread, speed-up shown", run: |l| Box::pin(workers(l)) },
        Scenario { name: "pipeline-worker-crash", about: "a worker killed (SIGKILL) mid-batch: its images are redone elsewhere, none lost or doubled", run: |l| Box::pin(worker_crash(l)) },
        Scenario { name: "pipeline-corrupt", about: "corrupt and non-image files are reported, the batch goes on, exit status 3", run: |l| Box::pin(corrupt(l)) },
    ]
}

const FILTER: &str = "grayscale,blur:1.5";
const IMAGES: usize = 36;

/// A master on free ports over `input`, writing to `<logs>/out`.
struct Batch {
    master: Proc,
    connect: String,
    output: PathBuf,
    logs: PathBuf,
    lab: Lab,
}

impl Batch {
    async fn start(lab: &Lab, scenario: &str, input: &Path, run: &str) -> Result<Self> {
        let logs = lab.logs_for(scenario);
        let output = logs.join(format!("out-{run}"));
        let _ = std::fs::remove_dir_all(&output);
        let args: Vec<String> = [
            "--input",
            &input.display().to_string(),
            "--output",
            &output.display().to_string(),
            "--filter",
            FILTER,
            "--tasks-bind",
            "tcp://127.0.0.1:0",
            "--results-bind",
            "tcp://127.0.0.1:0",
            "--control-bind",
            "tcp://127.0.0.1:0",
            "--stop-workers",
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let mut master = Proc::spawn(
            &format!("master-{run}"),
            &lab.bins.path("pipeline"),
            &args,
            &logs,
        )?;
        let ready = master.ready(Duration::from_secs(30)).await?;
        let connect = ready
            .get("connect")
            .cloned()
            .context("master's ready line has no connect=")?;
        Ok(Self {
            master,
            connect,
            output,
            logs,
            lab: lab.clone(),
        })
    }

    fn worker(&self, id: &str, extra: &[&str]) -> Result<Proc> {
        let mut args: Vec<String> = ["--connect", &self.connect, "--id", id]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            id,
            &self.lab.bins.path("pipeline-worker"),
            &args,
            &self.logs,
        )
    }

    /// Waits for the master; returns its exit code and JSON summary.
    async fn finish(&mut self) -> Result<(Option<i32>, Value)> {
        let status = self.master.wait(Duration::from_secs(300)).await?;
        let summary: Value = self.master.json()?;
        Ok((status.code(), summary))
    }
}

/// Input images generated once per scenario: `IMAGES` of about `side` pixels.
fn sample_input(lab: &Lab, scenario: &str, side: u32) -> Result<PathBuf> {
    let dir = lab.logs_for(scenario).join("in");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    pipeline::sample::generate(&dir, IMAGES, side).context("cannot generate sample images")?;
    Ok(dir)
}

/// Files under `dir`: (outputs, leftover temporary files).
fn files(dir: &Path) -> (usize, usize) {
    let outputs = pipeline::files::list_files(dir, None)
        .map(|f| f.len())
        .unwrap_or(0);
    (outputs, pipeline::files::temp_files(dir).len())
}

fn u(summary: &Value, field: &str) -> u64 {
    summary.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// Every image done exactly once, on disk too.
fn judge(v: &mut Verdict, summary: &Value, output: &Path, expect_done: u64) {
    let (outputs, temps) = files(output);
    for f in [
        "total",
        "done",
        "failed",
        "resent",
        "deferred",
        "elapsed_ms",
    ] {
        v.figure(f, u(summary, f));
    }
    v.figure("images_per_s", summary["images_per_s"].clone())
        .figure("by_worker", summary["by_worker"].clone())
        .figure("outputs_on_disk", outputs as u64);
    v.expect(
        u(summary, "done") == expect_done,
        format!("{expect_done} images done, got {}", u(summary, "done")),
    )
    .expect(
        outputs as u64 == expect_done,
        format!("{expect_done} output files, found {outputs}"),
    )
    .expect(temps == 0, format!("no temporary file left, found {temps}"));
}

async fn one_worker(lab: &Lab) -> Result<Verdict> {
    let input = sample_input(lab, "pipeline-one-worker", 256)?;
    let mut batch = Batch::start(lab, "pipeline-one-worker", &input, "1").await?;
    let _w = batch.worker("w1", &[])?;
    let (code, summary) = batch.finish().await?;
    let mut v = Verdict::new("pipeline-one-worker", "processes");
    judge(&mut v, &summary, &batch.output, IMAGES as u64);
    v.expect(code == Some(0), format!("master exits 0, got {code:?}"));
    Ok(v)
}

async fn workers(lab: &Lab) -> Result<Verdict> {
    // Larger images than elsewhere: the speed-up shows when filtering, not messaging, dominates.
    let input = sample_input(lab, "pipeline-workers", 1024)?;
    let mut rates = Vec::new();
    let mut v = Verdict::new("pipeline-workers", "processes");
    for n in [1, 2] {
        let mut batch = Batch::start(lab, "pipeline-workers", &input, &n.to_string()).await?;
        let _workers: Vec<Proc> = (1..=n)
            .map(|i| batch.worker(&format!("w{i}"), &[]))
            .collect::<Result<_>>()?;
        let (code, summary) = batch.finish().await?;
        v.expect(
            code == Some(0),
            format!("master with {n} workers exits 0, got {code:?}"),
        );
        let (outputs, _) = files(&batch.output);
        v.expect(
            outputs == IMAGES && u(&summary, "done") == IMAGES as u64,
            format!("{n} workers: every image done once"),
        );
        let by_worker = summary["by_worker"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        v.expect(
            by_worker.len() == n,
            format!("{n} workers all took part, got {by_worker:?}"),
        );
        v.figure(&format!("by_worker_{n}"), Value::Object(by_worker));
        let rate = summary["images_per_s"].as_f64().unwrap_or(0.0);
        v.figure(&format!("images_per_s_{n}"), (rate * 10.0).round() / 10.0);
        rates.push(rate);
    }
    if rates[0] > 0.0 {
        v.figure("speed_up", (rates[1] / rates[0] * 100.0).round() / 100.0);
    }
    Ok(v)
}

async fn worker_crash(lab: &Lab) -> Result<Verdict> {
    let input = sample_input(lab, "pipeline-worker-crash", 256)?;
    let mut batch = Batch::start(lab, "pipeline-worker-crash", &input, "1").await?;
    // Slowed down so that the kill lands mid-batch, with images in the victim's hands.
    let mut victim = batch.worker("victim", &["--delay-ms", "200", "--prefetch", "2"])?;
    let _w2 = batch.worker("w2", &["--delay-ms", "100"])?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    victim.kill().await?;
    let (code, summary) = batch.finish().await?;
    let mut v = Verdict::new("pipeline-worker-crash", "processes");
    judge(&mut v, &summary, &batch.output, IMAGES as u64);
    v.expect(code == Some(0), format!("master exits 0, got {code:?}"));
    v.expect(
        u(&summary, "resent") >= 1,
        "the victim's images were sent again",
    );
    Ok(v)
}

async fn corrupt(lab: &Lab) -> Result<Verdict> {
    let input = sample_input(lab, "pipeline-corrupt", 256)?;
    std::fs::write(
        input.join("truncated.png"),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    )?;
    std::fs::write(input.join("nested/garbage.jpg"), vec![0x5a; 4096])?;
    std::fs::write(input.join("notes.txt"), b"not an image")?;
    let mut batch = Batch::start(lab, "pipeline-corrupt", &input, "1").await?;
    let _w = batch.worker("w1", &[])?;
    let (code, summary) = batch.finish().await?;
    let mut v = Verdict::new("pipeline-corrupt", "processes");
    judge(&mut v, &summary, &batch.output, IMAGES as u64);
    let failures = summary["failures"].as_array().cloned().unwrap_or_default();
    v.figure("failures", Value::Array(failures.clone()));
    v.expect(
        u(&summary, "failed") == 3,
        format!("3 files failed, got {}", u(&summary, "failed")),
    );
    v.expect(
        failures
            .iter()
            .all(|f| f["reason"].as_str().is_some_and(|r| !r.is_empty())),
        "each failure has a reason",
    );
    v.expect(
        code == Some(3),
        format!("master exits 3 when files failed, got {code:?}"),
    );
    Ok(v)
}
