//! The sink (zguide `tasksink`): the master's bound PULL, which fair-queues every worker's
//! reports. Outputs that come back inline are written by `master::io`, off the loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::guard::{GuardStats, Limits};
use zeromq::{PullSocket, SocketRecv};

use super::{Bound, MasterError};
use crate::protocol::Report;

/// The bound report PULL.
#[derive(Debug)]
pub(super) struct Sink(Bound<PullSocket>);

impl Sink {
    pub(super) async fn bind(
        endpoint: &str,
        keepalive: Duration,
        guard: Option<Limits>,
    ) -> Result<Self, MasterError> {
        Bound::bind(endpoint, keepalive, guard).await.map(Self)
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    pub(super) fn guard(&self) -> Option<&Arc<GuardStats>> {
        self.0.guard.as_ref()
    }

    /// The next well-formed report and, for an inline `done`, the output bytes. Malformed
    /// messages and per-peer errors are logged and skipped. Cancel-safe.
    pub(super) async fn recv(&mut self) -> (Report, Option<Bytes>) {
        loop {
            match self.0.socket.recv().await {
                Ok(msg) => match Report::from_message(&msg) {
                    Ok(report) => return report,
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed report"),
                },
                Err(e) => tracing::debug!(error = %e, "report link error"),
            }
        }
    }
}
