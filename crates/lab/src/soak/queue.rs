//! The soak's shared queue: a broker, its workers and clients in rounds, and their totals.

use super::*;

#[derive(Debug, Default, Serialize)]
pub(super) struct QueueTotals {
    pub(super) rounds: u64,
    pub(super) requests: u64,
    pub(super) answered: u64,
    pub(super) lost: u64,
    pub(super) duplicates: u64,
    pub(super) corrupt: u64,
    pub(super) retries: u64,
    pub(super) reconnects: u64,
    pub(super) failed_rounds: u64,
}

pub(super) struct Queue {
    pub(super) broker: Slot,
    pub(super) frontend: String,
    pub(super) backend: String,
    pub(super) front: Relay,
    pub(super) back: Relay,
    pub(super) workers: Vec<Slot>,
    pub(super) clients: Vec<Option<Proc>>,
    pub(super) totals: QueueTotals,
}

pub(super) async fn start_broker(
    lab: &Lab,
    logs: &Path,
    frontend: &str,
    backend: &str,
) -> Result<Proc> {
    let args = strings(&[
        "--frontend",
        frontend,
        "--backend",
        backend,
        "--stats-secs",
        "10",
    ]);
    let mut broker = spawn(lab, logs, "broker", "broker", &args)?;
    broker.ready(READY_WITHIN).await?;
    Ok(broker)
}

impl Queue {
    pub(super) async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let args = strings(&[
            "--frontend",
            "tcp://127.0.0.1:0",
            "--backend",
            "tcp://127.0.0.1:0",
            "--stats-secs",
            "10",
        ]);
        let mut broker = spawn(lab, logs, "broker", "broker", &args)?;
        let ready = broker.ready(READY_WITHIN).await?;
        let frontend = ready.get("frontend").cloned().context("no frontend")?;
        let backend = ready.get("backend").cloned().context("no backend")?;
        let front = Relay::start(common::endpoint::resolve(&frontend)?).await?;
        let back = Relay::start(common::endpoint::resolve(&backend)?).await?;
        let mut queue = Self {
            broker: Slot::new("broker", broker),
            frontend,
            backend,
            front,
            back,
            workers: Vec::new(),
            clients: (0..CLIENTS).map(|_| None).collect(),
            totals: QueueTotals::default(),
        };
        for i in 0..SQ_WORKERS {
            let w = queue.worker(lab, logs, i).await?;
            queue.workers.push(Slot::new(&format!("sq-w{}", i + 1), w));
        }
        Ok(queue)
    }

    pub(super) async fn worker(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let id = format!("sq-w{}", i + 1);
        let args = strings(&[
            "--connect",
            &self.back.endpoint(),
            "--id",
            &id,
            "--work-ms",
            "2",
        ]);
        let mut w = spawn(lab, logs, &id, "worker", &args)?;
        w.ready(READY_WITHIN).await?;
        Ok(w)
    }

    pub(super) fn client(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let args = strings(&[
            "--connect",
            &self.front.endpoint(),
            "--requests",
            &CLIENT_REQUESTS.to_string(),
            "--concurrency",
            "4",
            "--timeout-ms",
            "1000",
            "--deadline-secs",
            "120",
            "--json",
        ]);
        spawn(lab, logs, &format!("client-{}", i + 1), "client", &args)
    }

    /// Accounts for every client round that ended; starts the next if `more`.
    pub(super) async fn poll(
        &mut self,
        lab: &Lab,
        logs: &Path,
        more: bool,
        failures: &mut Vec<String>,
    ) -> Result<()> {
        for i in 0..self.clients.len() {
            if let Some(c) = &self.clients[i] {
                if !procstat::exited(c.pid()) {
                    continue;
                }
            }
            if let Some(mut c) = self.clients[i].take() {
                let status = c.wait(EXIT_WITHIN).await?;
                self.account(&c, status, failures);
            }
            if more {
                self.clients[i] = Some(self.client(lab, logs, i)?);
            }
        }
        Ok(())
    }

    pub(super) fn account(&mut self, c: &Proc, status: ExitStatus, failures: &mut Vec<String>) {
        let t = &mut self.totals;
        t.rounds += 1;
        t.requests += CLIENT_REQUESTS;
        match c.json::<ClientSummary>() {
            Ok(s) => {
                t.answered += s.answered;
                t.lost += CLIENT_REQUESTS - s.answered.min(CLIENT_REQUESTS);
                t.duplicates += s.duplicates;
                t.corrupt += s.corrupt;
                t.retries += s.retries;
                t.reconnects += s.reconnects;
                if !status.success() || s.answered != CLIENT_REQUESTS {
                    t.failed_rounds += 1;
                    failures.push(format!(
                        "{} round {}: {} of {CLIENT_REQUESTS} answered, {status}",
                        c.name, t.rounds, s.answered
                    ));
                }
            }
            Err(e) => {
                t.lost += CLIENT_REQUESTS;
                t.failed_rounds += 1;
                failures.push(format!("{} round {}: {e:#}", c.name, t.rounds));
            }
        }
    }

    /// Waits for the running rounds to end and accounts for them.
    pub(super) async fn finish(&mut self, failures: &mut Vec<String>) -> Result<()> {
        for i in 0..self.clients.len() {
            if let Some(mut c) = self.clients[i].take() {
                let status = c.wait(Duration::from_secs(150)).await?;
                self.account(&c, status, failures);
            }
        }
        Ok(())
    }
}
