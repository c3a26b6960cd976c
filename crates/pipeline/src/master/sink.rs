//! The sink (zguide `tasksink`): the master's bound PULL, which fair-queues every worker's
//! reports, and the writer of outputs that come back inline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use zeromq::{PullSocket, Socket, SocketRecv};

use super::{bind_keepalive, MasterError};
use crate::files;
use crate::protocol::Report;

/// The bound report PULL.
pub(super) struct Sink {
    pull: PullSocket,
    endpoint: String,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Sink {
    pub(super) async fn bind(endpoint: &str, keepalive: Duration) -> Result<Self, MasterError> {
        let mut pull = PullSocket::new();
        let endpoint = bind_keepalive(&mut pull, endpoint, keepalive).await?;
        Ok(Self { pull, endpoint })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next well-formed report and, for an inline `done`, the output bytes. Malformed
    /// messages and per-peer errors are logged and skipped. Cancel-safe.
    pub(super) async fn recv(&mut self) -> (Report, Option<Bytes>) {
        loop {
            match self.pull.recv().await {
                Ok(msg) => match Report::from_message(&msg) {
                    Ok(report) => return report,
                    Err(e) => tracing::warn!(error = %e, "ignoring malformed report"),
                },
                Err(e) => tracing::debug!(error = %e, "report link error"),
            }
        }
    }
}

/// Writes an output that came back inline, off the runtime threads.
pub(super) async fn write_output(output: &Path, rel: &str, bytes: Bytes) -> Result<(), String> {
    let dest: PathBuf = output.join(rel);
    tokio::task::spawn_blocking(move || {
        files::write_atomic(&dest, &bytes, "master")
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))
    })
    .await
    .map_err(|e| format!("writer failed: {e}"))?
}
