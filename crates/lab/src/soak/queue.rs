//! The soak's shared queue: a broker pair (docs/pairs.md), its workers and clients in rounds,
//! and their totals.
//!
//! The primary is reached through relays (frontend, backend, and its peer link to the backup),
//! so that a partition cuts it off from everyone; the backup is reached directly. Clients and
//! workers are given both. A broker fault hits the active one (read off its stats line); a
//! killed broker comes back on its endpoints and goes passive.

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
    /// The primary.
    pub(super) broker: Slot,
    pub(super) frontend: String,
    pub(super) backend: String,
    pub(super) front: Relay,
    pub(super) back: Relay,
    /// The backup, its endpoints (its peer link's too), and the relay the primary's peer link
    /// goes through.
    pub(super) backup: Slot,
    pub(super) backup_frontend: String,
    pub(super) backup_backend: String,
    pub(super) backup_peer: String,
    pub(super) peer: Relay,
    pub(super) workers: Vec<Slot>,
    pub(super) clients: Vec<Option<Proc>>,
    pub(super) totals: QueueTotals,
}

/// One broker of the pair: `primary` connects its peer link to `peer`, `backup` binds it there.
pub(super) async fn start_broker(
    lab: &Lab,
    logs: &Path,
    role: &str,
    frontend: &str,
    backend: &str,
    peer: &str,
) -> Result<(Proc, BTreeMap<String, String>)> {
    let peer_flag = if role == "primary" {
        "--peer-connect"
    } else {
        "--peer-bind"
    };
    let args = strings(&[
        "--pair",
        role,
        peer_flag,
        peer,
        "--frontend",
        frontend,
        "--backend",
        backend,
        "--stats-secs",
        "1",
    ]);
    let name = if role == "primary" {
        "broker"
    } else {
        "backup"
    };
    let mut broker = spawn(lab, logs, name, "broker", &args)?;
    let ready = broker.ready(READY_WITHIN).await?;
    Ok((broker, ready))
}

impl Queue {
    pub(super) async fn start(lab: &Lab, logs: &Path) -> Result<Self> {
        let any = "tcp://127.0.0.1:0";
        let (backup, ready) = start_broker(lab, logs, "backup", any, any, any).await?;
        let field = |k: &str| ready.get(k).cloned().with_context(|| format!("no {k}"));
        let (backup_frontend, backup_backend, backup_peer) =
            (field("frontend")?, field("backend")?, field("peer")?);
        let peer = Relay::start(common::endpoint::resolve(&backup_peer)?).await?;
        let (broker, ready) =
            start_broker(lab, logs, "primary", any, any, &peer.endpoint()).await?;
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
            backup: Slot::new("backup", backup),
            backup_frontend,
            backup_backend,
            backup_peer,
            peer,
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
        let connect = format!("{},{}", self.back.endpoint(), self.backup_backend);
        let args = strings(&["--connect", &connect, "--id", &id, "--work-ms", "2"]);
        let mut w = spawn(lab, logs, &id, "worker", &args)?;
        w.ready(READY_WITHIN).await?;
        Ok(w)
    }

    pub(super) fn client(&self, lab: &Lab, logs: &Path, i: usize) -> Result<Proc> {
        let connect = format!("{},{}", self.front.endpoint(), self.backup_frontend);
        let args = strings(&[
            "--connect",
            &connect,
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

impl Queue {
    /// Whether the backup is the active broker now (its last stats line); else the primary.
    pub(super) fn backup_active(&self) -> bool {
        self.backup.proc.as_ref().is_some_and(|p| {
            crate::broker_stats::all(p)
                .last()
                .is_some_and(|c| c.get("active") == 1)
        })
    }

    /// The active broker's slot (see [`Queue::backup_active`]).
    pub(super) fn active(&mut self) -> &mut Slot {
        if self.backup_active() {
            &mut self.backup
        } else {
            &mut self.broker
        }
    }

    /// Starts the broker of `slot` (named `broker` or `backup`) again on its endpoints.
    pub(super) async fn restart(&mut self, lab: &Lab, logs: &Path, backup: bool) -> Result<()> {
        if backup {
            let (b, _) = start_broker(
                lab,
                logs,
                "backup",
                &self.backup_frontend,
                &self.backup_backend,
                &self.backup_peer,
            )
            .await?;
            self.backup.set(b);
        } else {
            let peer = self.peer.endpoint();
            let (b, _) =
                start_broker(lab, logs, "primary", &self.frontend, &self.backend, &peer).await?;
            self.broker.set(b);
        }
        Ok(())
    }

    /// Cuts (or heals) the primary off from everyone: clients, workers and the backup.
    pub(super) fn set_partitioned(&self, partitioned: bool) {
        for r in [&self.front, &self.back, &self.peer] {
            r.set_partitioned(partitioned);
        }
    }
}
