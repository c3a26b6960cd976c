//! The sink (zguide `tasksink`): the master's bound PULL (`common::wire::pull`, our own ZMTP
//! code, a PULL on the wire for any PUSH), which collects every worker's reports, and knows by
//! which connection each came: a worker whose report connections have all closed is gone (its
//! process died, or it reconnects), and the master learns it at once, not a liveness window
//! later. Outputs that come back inline are written by `master::io`, off the loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::wire::limits::{GuardStats, Limits};
use common::wire::pull::{self, Pull};
use std::collections::HashMap;

use super::MasterError;
use crate::protocol::Report;

/// What the loop learns from the sink.
#[derive(Debug)]
pub(super) enum Heard {
    /// Reports (with, for an inline `done`, the output bytes), in order, all from one connection.
    Reports(Vec<(Report, Option<Bytes>)>),
    /// Every report connection of this worker has closed.
    Gone(String),
    Nothing,
}

/// The bound report PULL.
#[derive(Debug)]
pub(super) struct Sink {
    pull: Pull,
    /// The worker each report connection speaks for (its last report's `worker`).
    speaks_for: HashMap<u64, String>,
    /// Report connections open per worker.
    open: HashMap<String, u32>,
}

impl Sink {
    /// Binds the report PULL with keepalive and `TCP_USER_TIMEOUT` (`keepalive` idle): its peers
    /// heartbeat, so a connection gone silent behind a partition is released in seconds.
    pub(super) fn bind(
        endpoint: &str,
        keepalive: Duration,
        limits: Limits,
        max_connections: usize,
    ) -> Result<Self, MasterError> {
        let listener = common::endpoint::bind_keepalive(endpoint, keepalive)?;
        let pull = Pull::serve(listener, limits, max_connections).map_err(|source| {
            MasterError::Listen {
                endpoint: endpoint.to_string(),
                source,
            }
        })?;
        Ok(Self {
            pull,
            speaks_for: HashMap::new(),
            open: HashMap::new(),
        })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.pull.endpoint
    }

    pub(super) fn stats(&self) -> &Arc<GuardStats> {
        self.pull.stats()
    }

    /// The next event. Cancel-safe.
    pub(super) async fn recv(&mut self) -> Heard {
        let event = self.pull.recv().await;
        self.take(event)
    }

    /// The next event already here, if any.
    pub(super) fn try_recv(&mut self) -> Option<Heard> {
        let event = self.pull.try_recv()?;
        Some(self.take(event))
    }

    fn take(&mut self, event: pull::Event) -> Heard {
        match event {
            pull::Event::Joined { .. } => Heard::Nothing,
            pull::Event::Messages { serial, batch } => {
                let mut reports = Vec::new();
                for msg in batch {
                    match Report::from_message(&msg) {
                        Ok(report) => reports.push(report),
                        Err(e) => tracing::warn!(error = %e, "ignoring malformed report"),
                    }
                }
                if let Some((last, _)) = reports.last() {
                    self.speaks(serial, &last.worker);
                }
                Heard::Reports(reports)
            }
            pull::Event::Left { serial } => {
                let Some(worker) = self.speaks_for.remove(&serial) else {
                    return Heard::Nothing;
                };
                if self.close_one(&worker) {
                    Heard::Gone(worker)
                } else {
                    Heard::Nothing
                }
            }
        }
    }

    /// Connection `serial` speaks for `worker` now.
    fn speaks(&mut self, serial: u64, worker: &str) {
        if self.speaks_for.get(&serial).map(String::as_str) == Some(worker) {
            return;
        }
        if let Some(old) = self.speaks_for.insert(serial, worker.to_string()) {
            self.close_one(&old);
        }
        *self.open.entry(worker.to_string()).or_default() += 1;
    }

    /// One report connection of `worker` fewer; true when it was the last.
    fn close_one(&mut self, worker: &str) -> bool {
        let Some(n) = self.open.get_mut(worker) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.open.remove(worker);
            return true;
        }
        false
    }
}
