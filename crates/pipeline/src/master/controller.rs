//! The controller (zguide `taskwork2`'s kill switch): the master's bound PUB
//! (`common::wire::publish`, our own ZMTP code, a PUB on the wire for any SUB), on which every
//! worker hears the master's heartbeats (with the batch id) and `stop`.

use std::sync::Arc;
use std::time::Duration;

use common::wire::limits::{GuardStats, Limits};
use common::wire::publish::Pub;

use super::MasterError;
use crate::protocol::Control;

/// The bound control PUB.
#[derive(Debug)]
pub(super) struct Controller(Pub);

impl Controller {
    /// Binds the control PUB on `endpoint`. Its peers never send once subscribed, so the
    /// listener has no user timeout, and a subscriber whose writes do not go through for
    /// `stall` is cut only if it stopped reading (`common::wire::server`).
    pub(super) fn bind(
        endpoint: &str,
        limits: Limits,
        max_connections: usize,
        stall: Duration,
    ) -> Result<Self, MasterError> {
        let listener = common::endpoint::bind_patient(endpoint)?;
        Pub::serve(listener, limits, max_connections, stall)
            .map(Self)
            .map_err(|source| MasterError::Listen {
                endpoint: endpoint.to_string(),
                source,
            })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    pub(super) fn stats(&self) -> &Arc<GuardStats> {
        self.0.stats()
    }

    /// Publishes a message; a subscriber that does not read simply misses it.
    pub(super) fn publish(&mut self, control: &Control) {
        self.0.publish(&control.to_message());
    }

    /// Waits, `linger` at most, until what was published is written to the kernel.
    pub(super) async fn flush(&self, linger: Duration) {
        self.0.flush(linger).await;
    }
}
