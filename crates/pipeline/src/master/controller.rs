//! The controller (zguide `taskwork2`'s kill switch): the master's bound PUB, on which every
//! worker hears the master's heartbeats (with the batch id) and `stop`.

use std::time::Duration;

use common::send::try_send;
use zeromq::{PubSocket, Socket};

use super::{bind_keepalive, MasterError};
use crate::protocol::Control;

/// The bound control PUB.
pub(super) struct Controller {
    publisher: PubSocket,
    endpoint: String,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub(super) async fn bind(endpoint: &str, keepalive: Duration) -> Result<Self, MasterError> {
        let mut publisher = PubSocket::new();
        let endpoint = bind_keepalive(&mut publisher, endpoint, keepalive).await?;
        Ok(Self {
            publisher,
            endpoint,
        })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Publishes a message; a subscriber that does not read simply misses it.
    pub(super) fn publish(&mut self, control: &Control) {
        let _ = try_send(&mut self.publisher, control.to_message());
    }
}
