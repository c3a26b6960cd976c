//! The tasks that arrive on the PULL socket, and the results that leave on the PUSH. Pure.
//!
//! A task is one frame of ASCII text, `"<feeder instance as hex> <seq>"`: `seq` counts from 1
//! per feeder instance, so the receiving end can prove gaps and duplicates (a feeder that
//! restarts is a new instance and starts again at 1). A result is the task's frame, sent on.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use zeromq::ZmqMessage;

/// One task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub instance: u64,
    pub seq: u64,
}

/// Why a message on the PULL socket is not a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotATask(pub String);

impl std::fmt::Display for NotATask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a task (`<instance hex> <seq>`): {:?}", self.0)
    }
}

impl Task {
    pub fn to_message(self) -> ZmqMessage {
        ZmqMessage::from(Bytes::from(format!("{:x} {}", self.instance, self.seq)))
    }

    /// Parses a one-frame message.
    pub fn parse(frames: &[Bytes]) -> Result<Self, NotATask> {
        let bad = || {
            let text: Vec<String> = frames
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            NotATask(text.join("|"))
        };
        let [frame] = frames else { return Err(bad()) };
        let text = std::str::from_utf8(frame).map_err(|_| bad())?;
        let (instance, seq) = text.split_once(' ').ok_or_else(bad)?;
        Ok(Self {
            instance: u64::from_str_radix(instance, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Accounts for one feeder's numbered tasks: how many, which ones were skipped or seen twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// Tasks received, duplicates not counted.
    pub received: u64,
    /// Numbers skipped (each missing number once).
    pub gaps: u64,
    /// Numbers at or below the last one seen.
    pub duplicates: u64,
    /// First and last numbers seen of the current feeder instance.
    pub first: u64,
    pub last: u64,
    /// Feeder instances seen (a restarted feeder is a new one).
    pub feeders: u64,
    #[serde(skip)]
    instance: Option<u64>,
}

/// What one task was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate,
}

impl Sequence {
    pub fn on_task(&mut self, task: Task) -> Seen {
        if self.instance != Some(task.instance) {
            self.instance = Some(task.instance);
            self.feeders += 1;
            self.first = task.seq;
            self.last = task.seq;
            self.received += 1;
            return Seen::New;
        }
        if task.seq <= self.last {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.gaps += task.seq - self.last - 1;
        self.last = task.seq;
        self.received += 1;
        Seen::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        let t = Task {
            instance: 0xbeef,
            seq: 42,
        };
        let frames = t.to_message().into_vec();
        assert_eq!(frames[0].as_ref(), b"beef 42");
        assert_eq!(Task::parse(&frames), Ok(t));
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert!(Task::parse(&[b("beef")]).is_err());
        assert!(Task::parse(&[b("zz 1")]).is_err());
        assert!(Task::parse(&[b("1 x")]).is_err());
        assert!(Task::parse(&[b("1 1"), b("1 2")]).is_err());
        assert!(Task::parse(&[]).is_err());
    }

    #[test]
    fn sequence_counts_gaps_duplicates_and_restarts() {
        let mut s = Sequence::default();
        let t = |instance, seq| Task { instance, seq };
        for seq in [1, 2, 3, 5, 5, 4, 9] {
            s.on_task(t(1, seq));
        }
        assert_eq!((s.received, s.gaps, s.duplicates), (5, 4, 2));
        assert_eq!(s.on_task(t(2, 1)), Seen::New);
        assert_eq!((s.feeders, s.first, s.last), (2, 1, 1));
    }
}
