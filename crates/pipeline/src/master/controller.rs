//! The controller (zguide `taskwork2`'s kill switch): the master's bound PUB, on which every
//! worker hears the master's heartbeats (with the batch id) and `stop`.

use std::sync::Arc;
use std::time::Duration;

use common::guard::{GuardStats, Limits};
use common::send::try_send;
use zeromq::PubSocket;

use super::{Bound, MasterError};
use crate::protocol::Control;

/// The bound control PUB.
#[derive(Debug)]
pub(super) struct Controller(Bound<PubSocket>);

impl Controller {
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

    /// Publishes a message; a subscriber that does not read simply misses it.
    pub(super) fn publish(&mut self, control: &Control) {
        let _ = try_send(&mut self.0.socket, control.to_message());
    }
}
