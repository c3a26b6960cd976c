//! The soak's run: start everything, make faults, sample, stop, count and judge.

use super::*;

pub(super) struct Soak {
    pub(super) lab: Lab,
    pub(super) logs: PathBuf,
    pub(super) rng: StdRng,
    pub(super) started: Instant,
    pub(super) queue: Queue,
    pub(super) pipe: Pipe,
    pub(super) pubsub: PubSub,
    pub(super) samples: Vec<Sample>,
    pub(super) faults: Vec<FaultRecord>,
    pub(super) failures: Vec<String>,
}

impl Soak {
    /// Every long-lived slot, for sampling (the master too: one per batch).
    pub(super) fn slots(&self) -> Vec<&Slot> {
        let mut all = vec![&self.queue.broker, &self.queue.backup];
        all.extend(&self.queue.workers);
        all.extend(&self.pipe.workers);
        all.push(&self.pubsub.proxy);
        all.extend(&self.pubsub.publishers);
        all.extend(&self.pubsub.subscribers);
        all
    }

    pub(super) fn slots_mut(&mut self) -> Vec<&mut Slot> {
        let mut all = vec![&mut self.queue.broker, &mut self.queue.backup];
        all.extend(&mut self.queue.workers);
        all.extend(&mut self.pipe.workers);
        all.push(&mut self.pubsub.proxy);
        all.extend(&mut self.pubsub.publishers);
        all.extend(&mut self.pubsub.subscribers);
        all
    }

    /// Reads RSS and descriptors of every process; a long-lived one that exited by itself is
    /// a failure (reaped, and its slot stays empty).
    pub(super) async fn sample(&mut self) -> Result<()> {
        let t_s = self.started.elapsed().as_secs_f64();
        let mut live: Vec<(String, i32)> = self
            .slots()
            .iter()
            .filter_map(|s| s.proc.as_ref().map(|p| (s.name.clone(), p.pid())))
            .collect();
        if let Some(m) = &self.pipe.master {
            live.push(("pipeline-master".into(), m.pid()));
        }
        // The lab itself, for its relays' connections; shown, not judged (it keeps the samples).
        live.push((LAB.into(), std::process::id() as i32));
        let me = std::process::id() as i32;
        for (process, pid) in live {
            // A child caught between fork and exec is still a copy of the lab (its descriptors
            // and all): not a sample of the role.
            if pid != me && procstat::same_program(pid, me) {
                continue;
            }
            if let (Some(rss_kib), Some(fds)) = (procstat::rss_kib(pid), procstat::open_fds(pid)) {
                if !procstat::exited(pid) {
                    self.samples.push(Sample {
                        t_s,
                        process,
                        pid,
                        rss_kib,
                        fds,
                    });
                }
            }
        }
        let mut died = Vec::new();
        for slot in self.slots_mut() {
            if let Some(p) = &mut slot.proc {
                if procstat::exited(p.pid()) {
                    let status = p.wait(EXIT_WITHIN).await?;
                    died.push(format!(
                        "{} exited by itself at {t_s:.0} s ({status})\n{}",
                        slot.name,
                        p.log_tail()
                    ));
                    slot.proc = None;
                }
            }
        }
        self.failures.extend(died);
        Ok(())
    }

    pub(super) async fn apply(&mut self, fault: Fault) -> Result<String> {
        let q = &mut self.queue;
        let p = &mut self.pipe;
        let ps = &mut self.pubsub;
        let target = match fault {
            // The active broker of the pair; `undo` brings back whichever is down or stopped.
            Fault::KillBroker => {
                let b = q.active();
                b.kill().await?;
                b.name.clone()
            }
            Fault::HangBroker => {
                let b = q.active();
                b.signal(Signal::SIGSTOP)?;
                b.name.clone()
            }
            Fault::KillWorker(i) => {
                q.workers[i].kill().await?;
                q.workers[i].name.clone()
            }
            Fault::HangWorker(i) => {
                q.workers[i].signal(Signal::SIGSTOP)?;
                q.workers[i].name.clone()
            }
            Fault::PartitionQueue => {
                q.set_partitioned(true);
                "clients+workers+backup|broker".into()
            }
            Fault::KillPipelineWorker(i) => {
                p.workers[i].kill().await?;
                p.workers[i].name.clone()
            }
            Fault::HangPipelineWorker(i) => {
                p.workers[i].signal(Signal::SIGSTOP)?;
                p.workers[i].name.clone()
            }
            Fault::PartitionPipeline => {
                p.relays.iter().for_each(|r| r.set_partitioned(true));
                "workers|master".into()
            }
            Fault::KillProxy => {
                ps.proxy.kill().await?;
                "proxy".into()
            }
            Fault::HangProxy => {
                ps.proxy.signal(Signal::SIGSTOP)?;
                "proxy".into()
            }
            Fault::HangSubscriber(i) => {
                ps.subscribers[i].signal(Signal::SIGSTOP)?;
                ps.subscribers[i].name.clone()
            }
            Fault::PartitionPubsub(side) => {
                ps.set_partitioned(side, true);
                match side {
                    Side::Both => "publishers+subscribers|proxy",
                    Side::Publishers => "publishers|proxy",
                    Side::Subscribers => "subscribers|proxy",
                }
                .into()
            }
        };
        Ok(target)
    }

    pub(super) async fn undo(&mut self, fault: Fault) -> Result<()> {
        let (lab, logs) = (&self.lab, &self.logs);
        match fault {
            Fault::KillBroker => {
                let q = &mut self.queue;
                let backup = q.backup.proc.is_none();
                q.restart(lab, logs, backup).await?;
            }
            Fault::HangBroker => {
                self.queue.broker.signal(Signal::SIGCONT)?;
                self.queue.backup.signal(Signal::SIGCONT)?;
            }
            Fault::KillWorker(i) => {
                let w = self.queue.worker(lab, logs, i).await?;
                self.queue.workers[i].set(w);
            }
            Fault::HangWorker(i) => self.queue.workers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionQueue => self.queue.set_partitioned(false),
            Fault::KillPipelineWorker(i) => {
                let w = self.pipe.worker(lab, logs, i)?;
                self.pipe.workers[i].set(w);
            }
            Fault::HangPipelineWorker(i) => self.pipe.workers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionPipeline => {
                self.pipe
                    .relays
                    .iter()
                    .for_each(|r| r.set_partitioned(false));
            }
            Fault::KillProxy => {
                let ps = &mut self.pubsub;
                let (proxy, _, _) = start_proxy(lab, logs, &ps.xsub, &ps.xpub).await?;
                ps.proxy.set(proxy);
            }
            Fault::HangProxy => self.pubsub.proxy.signal(Signal::SIGCONT)?,
            Fault::HangSubscriber(i) => self.pubsub.subscribers[i].signal(Signal::SIGCONT)?,
            Fault::PartitionPubsub(side) => self.pubsub.set_partitioned(side, false),
        }
        Ok(())
    }

    pub(super) async fn poll_work(&mut self, more: bool) -> Result<()> {
        let (lab, logs) = (&self.lab, &self.logs);
        self.queue.poll(lab, logs, more, &mut self.failures).await?;
        self.pipe.poll(lab, logs, more, &mut self.failures).await
    }

    /// Faults until `config.duration` has passed, then a quiet settle: work goes on all along.
    pub(super) async fn run_faults(&mut self, config: &SoakConfig) -> Result<()> {
        let end = self.started + config.duration;
        let mut next_fault = self.started + Duration::from_secs(3);
        // The fault in force: what, until when, since when, its record, failed undo attempts.
        let mut active: Option<(Fault, Instant, Instant, usize, u32)> = None;
        let mut next_sample = Instant::now();
        let mut sabotage = config.sabotage;
        loop {
            let now = Instant::now();
            if sabotage == Some(Sabotage::KillMaster) && now >= self.started + config.duration / 2 {
                if let Some(master) = &self.pipe.master {
                    tracing::warn!("sabotage: killing the pipeline master");
                    master.signal(Signal::SIGKILL)?;
                    sabotage = None;
                }
            }
            if let Some((fault, until, since, record, attempts)) = active {
                if now >= until {
                    // A restart that fails (no ready line on a starved machine) is tried again
                    // a few times; either way the run goes on and its figures are kept.
                    match self.undo(fault).await {
                        Err(e) if attempts < 3 => {
                            self.fail(format!("undoing {} failed: {e:#}", fault.kind()));
                            active = Some((
                                fault,
                                Instant::now() + SAMPLE_EVERY,
                                since,
                                record,
                                attempts + 1,
                            ));
                        }
                        result => {
                            if let Err(e) = result {
                                self.fail(format!(
                                    "undoing {} failed, given up: {e:#}",
                                    fault.kind()
                                ));
                            }
                            self.faults[record].held_ms = since.elapsed().as_millis() as u64;
                            active = None;
                            next_fault = Instant::now()
                                + Duration::from_millis(self.rng.gen_range(1500..=5000));
                        }
                    }
                }
            } else if now >= end + SETTLE {
                break;
            } else if now >= next_fault && now < end {
                let (fault, hold) = Fault::pick(&mut self.rng);
                let target = match self.apply(fault).await {
                    Ok(target) => target,
                    Err(e) => {
                        self.fail(format!("making {} failed: {e:#}", fault.kind()));
                        "?".into()
                    }
                };
                self.faults.push(FaultRecord {
                    at_s: self.started.elapsed().as_secs_f64(),
                    kind: fault.kind(),
                    target,
                    held_ms: hold.as_millis() as u64,
                });
                tracing::info!(
                    kind = fault.kind(),
                    hold_ms = hold.as_millis() as u64,
                    "fault"
                );
                let now = Instant::now();
                active = Some((fault, now + hold, now, self.faults.len() - 1, 0));
            }
            if now >= next_sample {
                if let Err(e) = self.sample().await {
                    self.fail(format!("sampling failed: {e:#}"));
                }
                next_sample += SAMPLE_EVERY;
            }
            if let Err(e) = self.poll_work(true).await {
                self.fail(format!("{e:#}"));
            }
            tokio::time::sleep(TICK).await;
        }
        Ok(())
    }

    /// Records a failure (at most 100: a broken run repeats itself).
    pub(super) fn fail(&mut self, failure: String) {
        tracing::warn!("{failure}");
        if self.failures.len() < 100 && self.failures.last() != Some(&failure) {
            self.failures.push(failure);
        }
    }
}

/// Runs the soak and judges it. Writes `samples.csv`, `report.json` and `rss.svg` to
/// `config.out`.
pub async fn run(lab: &Lab, config: &SoakConfig) -> Result<Verdict> {
    lab.bins.check(&[
        "broker",
        "worker",
        "client",
        "pipeline",
        "pipeline-worker",
        "proxy",
        "publisher",
        "subscriber",
    ])?;
    let logs = lab.logs_for("soak");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    let queue = Queue::start(lab, &logs).await?;
    let pipe = Pipe::start(lab, &logs).await?;
    let pubsub = PubSub::start(lab, &logs).await?;
    let mut soak = Soak {
        lab: lab.clone(),
        logs,
        rng: StdRng::seed_from_u64(config.seed),
        started: Instant::now(),
        queue,
        pipe,
        pubsub,
        samples: Vec::new(),
        faults: Vec::new(),
        failures: Vec::new(),
    };
    for slot in soak.slots() {
        tracing::info!(process = %slot.name, pid = slot.proc.as_ref().map(Proc::pid), "started");
    }
    if let Err(e) = soak.run_faults(config).await {
        soak.fail(format!("the run stopped early: {e:#}"));
    }
    let run_s = soak.started.elapsed().as_secs_f64();

    let mut v = Verdict::new("soak", "relay");
    v.figure("seed", config.seed)
        .figure(
            "fault_minutes",
            (config.duration.as_secs_f64() / 60.0 * 100.0).round() / 100.0,
        )
        .figure("run_s", run_s.round() as u64);
    // Whatever fails from here on is a failure of the verdict, not an error: the figures and
    // samples gathered so far are still written.
    if let Err(e) = soak.queue.finish(&mut soak.failures).await {
        soak.fail(format!("the last client rounds: {e:#}"));
    }
    if let Err(e) = soak.pipe.finish(&soak.logs, &mut soak.failures).await {
        soak.fail(format!("the last pipeline batch: {e:#}"));
    }
    if let Err(e) = soak.pubsub.finish(&mut v).await {
        soak.fail(format!("pub/sub summaries: {e:#}"));
    }
    // Publishers and subscribers were stopped and judged above.
    let q = &mut soak.queue;
    let mut rest: Vec<&mut Slot> = vec![&mut q.broker, &mut q.backup, &mut soak.pubsub.proxy];
    rest.extend(&mut q.workers);
    rest.extend(&mut soak.pipe.workers);
    for slot in rest {
        match slot.stop().await {
            Ok(Some(status)) => v.expect(
                status.success(),
                format!("{} exits 0 on SIGTERM, got {status}", slot.name),
            ),
            Ok(None) => &mut v,
            Err(e) => v.expect(false, format!("{} stops on SIGTERM: {e:#}", slot.name)),
        };
    }

    // Work: lost and duplicated.
    let q = &soak.queue.totals;
    v.figure("requests", q.requests)
        .figure("requests_answered", q.answered)
        .figure("requests_lost", q.lost)
        .figure("requests_duplicated", q.duplicates)
        .figure("requests_retried", q.retries)
        .figure("client_rounds", q.rounds);
    v.expect(q.rounds > 0, "some client rounds ran");
    v.expect(q.lost == 0, format!("no request lost, lost {}", q.lost))
        .expect(
            q.duplicates == 0,
            format!("no request answered twice, got {}", q.duplicates),
        )
        .expect(
            q.corrupt == 0,
            format!("no corrupt reply, got {}", q.corrupt),
        );
    let p = &soak.pipe.totals;
    v.figure("batches", p.batches)
        .figure("images", p.images)
        .figure("images_done", p.done)
        .figure("images_lost", p.lost)
        .figure("images_duplicated", p.duplicated)
        .figure("images_resent", p.resent)
        .figure("temp_files_left", p.temp_files_left);
    v.expect(p.batches > 0, "some pipeline batches ran");
    v.expect(p.lost == 0, format!("no image lost, lost {}", p.lost))
        .expect(
            p.duplicated == 0,
            format!("no image done twice, got {}", p.duplicated),
        );

    // Faults.
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &soak.faults {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    v.figure("faults", soak.faults.len() as u64)
        .figure("faults_by_kind", serde_json::to_value(&by_kind)?);
    v.expect(!soak.faults.is_empty(), "faults were made");

    // Memory and descriptors.
    let mut processes = BTreeMap::new();
    let names: BTreeSet<&str> = soak.samples.iter().map(|s| s.process.as_str()).collect();
    for name in names {
        let mine: Vec<&Sample> = soak.samples.iter().filter(|s| s.process == name).collect();
        let Some((figures, failures)) = judge_process(name, &mine, run_s) else {
            continue;
        };
        if name != LAB {
            for failure in failures {
                v.expect(false, failure);
            }
        }
        processes.insert(name.to_string(), figures);
    }
    v.figure("samples", soak.samples.len() as u64)
        .figure("processes", serde_json::to_value(&processes)?);

    for failure in std::mem::take(&mut soak.failures) {
        v.expect(false, failure);
    }

    let csv = config.out.join("samples.csv");
    write_csv(&csv, &soak.samples)?;
    let svg = config.out.join("rss.svg");
    if let Err(e) = plot(&svg, &soak.samples, run_s, config.seed) {
        v.expect(false, format!("cannot draw {}: {e:#}", svg.display()));
    }
    v.figure("samples_csv", csv.display().to_string())
        .figure("rss_svg", svg.display().to_string());
    let report = json!({"verdict": v, "faults": soak.faults, "queue": soak.queue.totals, "pipeline": soak.pipe.totals});
    std::fs::write(
        config.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(v)
}
