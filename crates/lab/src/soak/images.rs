//! The soak's pipeline: a master over batch after batch, long-lived workers, and their totals.

use super::*;

#[derive(Debug, Default, Serialize)]
pub(super) struct PipeTotals {
    pub(super) batches: u64,
    pub(super) images: u64,
    pub(super) done: u64,
    pub(super) lost: u64,
    pub(super) duplicated: u64,
    pub(super) resent: u64,
    pub(super) failed_batches: u64,
    pub(super) temp_files_left: u64,
}

pub(super) struct Pipe {
    pub(super) input: PathBuf,
    pub(super) out_root: PathBuf,
    /// tasks, results, control: where every master binds.
    pub(super) binds: Vec<String>,
    pub(super) relays: Vec<Relay>,
    pub(super) master: Option<Proc>,
    pub(super) batch: u64,
    pub(super) batch_started: Instant,
    pub(super) workers: Vec<Slot>,
    pub(super) totals: PipeTotals,
}

impl Pipe {
    pub(super) async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let input = logs.join("pipeline-in");
        let _ = std::fs::remove_dir_all(&input);
        std::fs::create_dir_all(&input)?;
        pipeline::sample::generate(&input, IMAGES, 192).context("cannot generate images")?;
        let out_root = logs.join("pipeline-out");
        let _ = std::fs::remove_dir_all(&out_root);
        let any = "tcp://127.0.0.1:0".to_string();
        let mut pipe = Self {
            input,
            out_root,
            binds: vec![any.clone(), any.clone(), any],
            relays: Vec::new(),
            master: None,
            batch: 0,
            batch_started: Instant::now(),
            workers: Vec::new(),
            totals: PipeTotals::default(),
        };
        let ready = pipe.next_batch(lab, logs).await?;
        pipe.binds = ["tasks", "results", "control"]
            .iter()
            .map(|k| ready.get(*k).cloned().context("master's ready line"))
            .collect::<Result<_>>()?;
        for bound in &pipe.binds {
            pipe.relays
                .push(Relay::start(common::endpoint::resolve(bound)?).await?);
        }
        for i in 0..PIPE_WORKERS {
            let w = pipe.worker(lab, logs, i)?;
            pipe.workers.push(Slot::new(&format!("pw{}", i + 1), w));
        }
        Ok(pipe)
    }

    pub(super) fn worker(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let id = format!("pw{}", i + 1);
        let connect: Vec<String> = self.relays.iter().map(Relay::endpoint).collect();
        let args = strings(&[
            "--connect",
            &connect.join(","),
            "--id",
            &id,
            "--delay-ms",
            "60",
        ]);
        spawn(lab, logs, &id, "pipeline-worker", &args)
    }

    pub(super) fn output(&self) -> PathBuf {
        self.out_root.join(format!("batch-{}", self.batch))
    }

    pub(super) async fn next_batch(
        &mut self,
        lab: &Lab,
        logs: &Path,
    ) -> Result<BTreeMap<String, String>> {
        self.batch += 1;
        let output = self.output();
        let args = strings(&[
            "--input",
            &self.input.display().to_string(),
            "--output",
            &output.display().to_string(),
            "--filter",
            FILTER,
            "--tasks-bind",
            &self.binds[0],
            "--results-bind",
            &self.binds[1],
            "--control-bind",
            &self.binds[2],
            "--json",
            "--no-progress",
        ]);
        let mut master = spawn(lab, logs, "pipeline-master", "pipeline", &args)?;
        let ready = master.ready(READY_WITHIN).await?;
        self.master = Some(master);
        self.batch_started = Instant::now();
        Ok(ready)
    }

    /// Judges the batch that ended, if any, and starts the next if `more`.
    pub(super) async fn poll(
        &mut self,
        lab: &Lab,
        logs: &Path,
        more: bool,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        let Some(master) = &mut self.master else {
            return Ok(());
        };
        if !procstat::exited(master.pid()) {
            // A batch of a few seconds that takes minutes is stuck: that is a failure.
            if self.batch_started.elapsed() > Duration::from_secs(180) {
                // Counted as failed when judged below.
                give_up_stuck(self.batch, master, logs, failures).await?;
            } else {
                return Ok(());
            }
        }
        let status = master.wait(EXIT_WITHIN).await?;
        let summary: Result<Value> = master.json();
        self.judge(status, summary, failures);
        self.master = None;
        if more {
            self.next_batch(lab, logs).await?;
        }
        Ok(())
    }

    pub(super) fn judge(
        &mut self,
        status: ExitStatus,
        summary: Result<Value>,
        failures: &mut Vec<String>,
    ) {
        let output = self.output();
        let t = &mut self.totals;
        t.batches += 1;
        t.images += IMAGES as u64;
        let names = |dir: &Path| -> BTreeSet<String> {
            pipeline::files::list_files(dir, None)
                .unwrap_or_default()
                .iter()
                .map(|p| p.display().to_string())
                .collect()
        };
        let inputs = names(&self.input);
        let outputs = names(&output);
        let missing = inputs.difference(&outputs).count() as u64;
        let extra = outputs.difference(&inputs).count() as u64;
        t.temp_files_left += pipeline::files::temp_files(&output).len() as u64;
        let field = |s: &Value, f: &str| s.get(f).and_then(Value::as_u64).unwrap_or(0);
        let (done, failed, resent) = match &summary {
            Ok(s) => (field(s, "done"), field(s, "failed"), field(s, "resent")),
            Err(_) => (0, 0, 0),
        };
        t.done += done.min(IMAGES as u64);
        t.lost += missing;
        t.duplicated += extra + done.saturating_sub(IMAGES as u64);
        t.resent += resent;
        let ok = status.success()
            && summary.is_ok()
            && done == IMAGES as u64
            && failed == 0
            && missing == 0
            && extra == 0;
        if !ok {
            t.failed_batches += 1;
            let why = match &summary {
                Ok(_) => format!(
                    "{status}, {done} done, {failed} failed, {missing} missing on disk, {extra} unexpected"
                ),
                Err(e) => format!("{status}, {e:#}"),
            };
            failures.push(format!("pipeline batch {}: {why}", self.batch));
        }
        let _ = std::fs::remove_dir_all(&output);
    }

    pub(super) async fn finish(&mut self, logs: &Path, failures: &mut Vec<String>) -> Result<()> {
        if let Some(master) = &mut self.master {
            let status = match master.wait(Duration::from_secs(180)).await {
                Ok(status) => status,
                Err(_) => {
                    // Stuck: counted as a failed batch (its images lost), as during the run.
                    give_up_stuck(self.batch, master, logs, failures).await?;
                    master.wait(EXIT_WITHIN).await?
                }
            };
            let summary: Result<Value> = master.json();
            self.judge(status, summary, failures);
            self.master = None;
        }
        Ok(())
    }
}

/// Records batch `batch` as stuck, keeps a [`snapshot`] of its master and kills it.
pub(super) async fn give_up_stuck(
    batch: u64,
    master: &mut Proc,
    logs: &Path,
    failures: &mut Vec<String>,
) -> Result<()> {
    failures.push(format!("pipeline batch {batch} stuck for 180 s"));
    snapshot(master.pid(), &logs.join(format!("stuck-batch-{batch}.txt")));
    master.kill().await
}

/// What a stuck master was doing, kept beside the logs: every TCP socket on the machine with its
/// owner and queues (`ss -tanpi`, to tell a master that stopped accepting from a link that
/// hangs) and, where gdb is installed, the stack of each of its threads.
pub(super) fn snapshot(pid: i32, path: &Path) {
    let pid = pid.to_string();
    let commands: [(&str, &[&str]); 2] = [
        ("ss", &["-tanpi"]),
        ("gdb", &["-batch", "-p", &pid, "-ex", "thread apply all bt"]),
    ];
    let mut text = Vec::new();
    for (program, args) in commands {
        text.extend(format!("$ {program} {}\n", args.join(" ")).into_bytes());
        match std::process::Command::new(program).args(args).output() {
            Ok(out) => text.extend(out.stdout),
            Err(e) => text.extend(format!("cannot run {program}: {e}\n").into_bytes()),
        }
    }
    let _ = std::fs::write(path, text);
}
