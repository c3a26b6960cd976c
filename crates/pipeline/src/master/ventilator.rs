//! The ventilator (zguide `taskvent`): the master's bound PUSH (`common::wire::push`, our own
//! ZMTP code, a PUSH on the wire for any PULL), its task connections and whose they are, and the
//! task messages it carries.
//!
//! A stock PUSH deals round robin to every connection, so a connected worker that never reads
//! (hung, or a stray stock PULL) takes its share of tasks into a connection nobody reads. Here
//! the master deals by credit, per connection: a task goes only to the task connection of a
//! worker with room in the books (its last `free`, capped by its contract, less what is on its
//! way to it). Whose a connection is:
//!
//! - **named**: our workers set the ZMTP `Identity` of their task PULL to their name (the
//!   `worker` of their reports), so the connection is theirs from its first byte. The newest
//!   connection of a name is the one dealt to (the worker reconnected; an older one is gone or
//!   half-open); an older one still open takes over if the newest closes. (Closing the older
//!   one instead would make two processes started with one `--id` close each other's
//!   connections for ever.)
//! - **learned**: a stock PULL sets no identity. Such a connection gets a **probe** (one task)
//!   only while some worker heard from for [`PROBE_GRACE`] has room and no connection known to
//!   be its own; the worker that accepts the probe owns the connection from then on, and it is
//!   dealt by that worker's credit. A probe nobody accepts within [`PROBE_WINDOW`] is taken back
//!   (sent elsewhere at no cost) and the connection gets no other probe for [`MUTED_FOR`]: a
//!   stray PULL that never reads costs the batch at most one probe window now and then, and
//!   when every worker's connection is known (our workers) it gets nothing at all.
//!
//! Nothing is ever rebound: a connection closes only when its peer goes, or stops reading
//! (`common::wire::server`'s stall rule: a peer that cannot be reached keeps its connection, so
//! a stock PULL behind a partition gets tasks again as soon as the link heals).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::wire::limits::{GuardStats, Limits};
use common::wire::push::{self, Push, Unsent};
use std::collections::HashMap;
use tokio::time::Instant;
use zeromq::ZmqMessage;

use super::MasterError;
use crate::protocol::{Task, WirePath};

/// A worker heard from this long without a connection known to be its own may have its
/// connection probed: our workers' named connection usually joins within milliseconds of their
/// `hello`, and must not lose its first tasks to a stray's probe meanwhile.
pub(super) const PROBE_GRACE: Duration = Duration::from_millis(300);
/// A probe not accepted within this long is taken back.
pub(super) const PROBE_WINDOW: Duration = Duration::from_secs(1);
/// A connection whose probe was not accepted gets no other one for this long.
pub(super) const MUTED_FOR: Duration = Duration::from_secs(10);

/// What the ventilator needs to build a task.
#[derive(Debug, Clone)]
pub(super) struct TaskSource {
    pub input: PathBuf,
    pub output: PathBuf,
    pub batch: String,
    pub filter: String,
    /// The master's task timeout, told to the worker so that it abandons the task with it.
    pub timeout_ms: u64,
}

impl TaskSource {
    /// The message of task `id` (`rel` under the input), with the image bytes when inline
    /// (read beforehand, off the loop). Names go as they are on disk ([`WirePath`]).
    pub(super) fn message(&self, id: usize, rel: &Path, image: Option<Bytes>) -> ZmqMessage {
        let on_disk = image.is_none();
        let task = Task {
            batch: self.batch.clone(),
            id: id as u64,
            path: WirePath::from(rel),
            filter: self.filter.clone(),
            input: on_disk.then(|| WirePath(self.input.join(rel))),
            output: on_disk.then(|| WirePath(self.output.join(rel))),
            timeout_ms: Some(self.timeout_ms),
        };
        task.to_message(image)
    }
}

/// One task connection.
#[derive(Debug)]
struct Link {
    /// The worker it belongs to: named by its identity, or learned from an accepted probe.
    worker: Option<String>,
    /// The task of its probe on its way, and since when.
    probe: Option<(usize, Instant)>,
    /// No probe before this.
    muted_until: Option<Instant>,
}

/// Where a task goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub serial: u64,
    /// The worker whose credit it takes; `None` for a probe.
    pub worker: Option<String>,
}

/// The bound task PUSH and its connections.
#[derive(Debug)]
pub(super) struct Ventilator {
    push: Push,
    links: HashMap<u64, Link>,
    /// The task connection of each worker that has one (the newest).
    of_worker: HashMap<String, u64>,
    /// The connection each task's copy on its way was last sent on.
    via: HashMap<usize, u64>,
}

impl Ventilator {
    /// Binds the task PUSH on `endpoint`. Its peers never send, so the listener has no user
    /// timeout, and a connection whose writes do not go through for `stall` is cut only if its
    /// peer stopped reading (`common::wire::server`).
    pub(super) fn bind(
        endpoint: &str,
        limits: Limits,
        max_connections: usize,
        stall: Duration,
    ) -> Result<Self, MasterError> {
        let listener = common::endpoint::bind_patient(endpoint)?;
        let push =
            Push::serve(listener, limits, max_connections, Some(stall)).map_err(|source| {
                MasterError::Listen {
                    endpoint: endpoint.to_string(),
                    source,
                }
            })?;
        Ok(Self {
            push,
            links: HashMap::new(),
            of_worker: HashMap::new(),
            via: HashMap::new(),
        })
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.push.endpoint
    }

    pub(super) fn stats(&self) -> &Arc<GuardStats> {
        self.push.stats()
    }

    /// The next connection event. Cancel-safe.
    pub(super) async fn recv(&mut self) -> push::Event {
        self.push.recv().await
    }

    /// Books a connection event; returns the tasks whose copies on their way were lost with a
    /// connection that left.
    pub(super) fn on_event(&mut self, event: push::Event) -> Vec<usize> {
        match event {
            push::Event::Joined {
                serial,
                addr,
                identity,
            } => {
                let worker = identity.and_then(|id| String::from_utf8(id.to_vec()).ok());
                tracing::debug!(serial, %addr, worker = ?worker, "task connection");
                if let Some(name) = &worker {
                    self.of_worker.insert(name.clone(), serial);
                }
                self.links.insert(
                    serial,
                    Link {
                        worker,
                        probe: None,
                        muted_until: None,
                    },
                );
                Vec::new()
            }
            push::Event::Left { serial } => self.left(serial),
        }
    }

    fn left(&mut self, serial: u64) -> Vec<usize> {
        if let Some(link) = self.links.remove(&serial) {
            if let Some(name) = link.worker {
                if self.of_worker.get(&name) == Some(&serial) {
                    self.of_worker.remove(&name);
                    // An older connection of the same worker still open takes over.
                    let older = self
                        .links
                        .iter()
                        .filter(|(_, l)| l.worker.as_deref() == Some(name.as_str()))
                        .map(|(s, _)| *s)
                        .max();
                    if let Some(older) = older {
                        self.of_worker.insert(name, older);
                    }
                }
            }
        }
        let lost: Vec<usize> = self
            .via
            .iter()
            .filter(|(_, s)| **s == serial)
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            self.via.remove(id);
        }
        lost
    }

    /// Whether `worker` has a task connection known to be its own.
    pub(super) fn is_linked(&self, worker: &str) -> bool {
        self.of_worker.contains_key(worker)
    }

    /// The workers with a task connection, and theirs.
    pub(super) fn linked(&self) -> impl Iterator<Item = (&str, u64)> {
        self.of_worker.iter().map(|(w, s)| (w.as_str(), *s))
    }

    /// A connection not known to be anyone's that may get a probe now.
    pub(super) fn probe_target(&self) -> Option<u64> {
        let now = Instant::now();
        self.links
            .iter()
            .filter(|(_, l)| {
                l.worker.is_none()
                    && l.probe.is_none()
                    && l.muted_until.is_none_or(|until| now >= until)
            })
            .map(|(serial, _)| *serial)
            .min()
    }

    /// Sends task `id` on `target`'s connection; never waits. On failure the task was not sent.
    pub(super) fn send(
        &mut self,
        id: usize,
        target: &Target,
        msg: &ZmqMessage,
    ) -> Result<(), Unsent> {
        match self.push.send(target.serial, msg) {
            Ok(()) => {
                self.via.insert(id, target.serial);
                if target.worker.is_none() {
                    if let Some(link) = self.links.get_mut(&target.serial) {
                        link.probe = Some((id, Instant::now()));
                    }
                }
                Ok(())
            }
            Err(Unsent::Gone) => {
                // Its `Left` follows; until then it is no one's.
                if let Some(name) = self
                    .links
                    .get(&target.serial)
                    .and_then(|l| l.worker.clone())
                {
                    if self.of_worker.get(&name) == Some(&target.serial) {
                        self.of_worker.remove(&name);
                    }
                }
                if let Some(link) = self.links.get_mut(&target.serial) {
                    link.worker = None;
                    link.muted_until = Some(Instant::now() + MUTED_FOR);
                }
                Err(Unsent::Gone)
            }
            Err(e) => Err(e),
        }
    }

    /// `worker` acknowledged task `id` (accepted or deferred it): the connection it came by is
    /// that worker's from now on (a probe's connection learned, or one that changed hands).
    pub(super) fn acknowledged(&mut self, id: usize, worker: &str) {
        let Some(serial) = self.via.remove(&id) else {
            return;
        };
        let Some(link) = self.links.get_mut(&serial) else {
            return;
        };
        if link.probe.is_some_and(|(probe, _)| probe == id) {
            link.probe = None;
        }
        if link.worker.as_deref() == Some(worker) {
            return;
        }
        tracing::info!(serial, %worker, "task connection learned from an acknowledgement");
        if let Some(old) = link.worker.replace(worker.to_string()) {
            if self.of_worker.get(&old) == Some(&serial) {
                self.of_worker.remove(&old);
            }
        }
        self.of_worker.insert(worker.to_string(), serial);
    }

    /// Probes not accepted within [`PROBE_WINDOW`]: their connections are muted for a while,
    /// their tasks returned to be taken back.
    pub(super) fn expired_probes(&mut self) -> Vec<usize> {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (serial, link) in &mut self.links {
            if let Some((id, at)) = link.probe {
                if now - at >= PROBE_WINDOW {
                    link.probe = None;
                    link.muted_until = Some(now + MUTED_FOR);
                    if self.via.get(&id) == Some(serial) {
                        self.via.remove(&id);
                    }
                    expired.push(id);
                }
            }
        }
        if !expired.is_empty() {
            tracing::info!(
                probes = expired.len(),
                "task connections that took no probe: muted"
            );
        }
        expired
    }
}
