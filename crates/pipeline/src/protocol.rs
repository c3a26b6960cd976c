//! The pipeline's messages and their frames. Pure: no sockets, unit-tested by round trips.
//!
//! - tasks (master PUSH -> worker PULL): frame 0 JSON [`Task`]; frame 1 the image bytes when
//!   the task is inline (`input` is `null`).
//! - reports (worker PUSH -> master PULL): frame 0 JSON [`Report`]; frame 1 the output image
//!   when a `done` answers an inline task (`output` was `null`).
//! - control (master PUB -> worker SUB): one JSON frame [`Control`].
//!
//! JSON keeps every message readable and writable from a stock libzmq binding (pyzmq). File
//! names are bytes on Linux, not text: a [`WirePath`] is a JSON string when the name is UTF-8
//! and an array of its bytes otherwise, so that no name is ever converted lossily.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeromq::ZmqMessage;

/// Why a received message is refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed {kind} message: {source}")]
    Json {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{0} message has no frames")]
    Empty(&'static str),
}

/// A file name as it is on disk, bytes and all. On the wire: a JSON string when it is valid
/// UTF-8 (every name a person types), else a JSON array of its bytes (`[99,97,102,233]` for
/// `caf\xe9`), which a Python peer turns back into a path with `bytes(value)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WirePath(pub PathBuf);

impl WirePath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// For logs and messages only: lossy where the name is not UTF-8.
    pub fn display(&self) -> std::path::Display<'_> {
        self.0.display()
    }
}

impl From<PathBuf> for WirePath {
    fn from(p: PathBuf) -> Self {
        Self(p)
    }
}

impl From<&Path> for WirePath {
    fn from(p: &Path) -> Self {
        Self(p.to_path_buf())
    }
}

impl From<&str> for WirePath {
    fn from(s: &str) -> Self {
        Self(PathBuf::from(s))
    }
}

impl From<String> for WirePath {
    fn from(s: String) -> Self {
        Self(PathBuf::from(s))
    }
}

impl Serialize for WirePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.to_str() {
            Some(text) => serializer.serialize_str(text),
            None => serializer.collect_seq(self.0.as_os_str().as_bytes()),
        }
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Bytes(Vec<u8>),
        }
        Ok(match Form::deserialize(deserializer)? {
            Form::Text(text) => Self(PathBuf::from(text)),
            Form::Bytes(bytes) => Self(PathBuf::from(OsString::from_vec(bytes))),
        })
    }
}

/// One image to process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Identifies the master's run; reports for another batch are ignored.
    pub batch: String,
    /// Index of the task in its batch.
    pub id: u64,
    /// Path relative to the input and output directories (for logs and inline output naming).
    pub path: WirePath,
    /// Filter chain specification, validated by the master.
    pub filter: String,
    /// Absolute input path on a shared filesystem, or `null`: the bytes are in frame 1.
    pub input: Option<WirePath>,
    /// Absolute output path on a shared filesystem, or `null`: return the bytes in frame 1.
    pub output: Option<WirePath>,
    /// The master's `--task-timeout-s`: past this much time after the task arrived, the master
    /// has sent it elsewhere and the worker abandons it (a job running then stops at its next
    /// step and its output is never renamed into place). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// What a worker tells the master. Every report carries the worker's capacity so that a master
/// that (re)starts learns a worker from any message, not only from `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub worker: String,
    /// Tasks the worker holds at most (running and queued).
    pub slots: u32,
    /// Tasks it can take now.
    pub free: u32,
    /// The worker's heartbeat interval: the master expires it after `liveness` of these.
    pub heartbeat_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The event a report announces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Connected (or reconnected).
    Hello,
    /// Still alive; sent every `heartbeat_ms`.
    Heartbeat,
    /// The task was received and will be processed here.
    Accept { batch: String, id: u64 },
    /// The task arrived while the worker was full (its reports crossed the task on the wire, or
    /// a stock master deals round robin): send it again, elsewhere.
    Defer { batch: String, id: u64 },
    /// Output written (or, inline, carried in frame 1).
    Done { batch: String, id: u64 },
    /// The image cannot be processed; `reason` is shown to the user.
    Failed {
        batch: String,
        id: u64,
        reason: String,
    },
    /// Leaving: tasks accepted and not done must go elsewhere.
    Bye,
}

/// What the master broadcasts to every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// The master is alive; workers expire it after `liveness` of `heartbeat_ms`.
    Heartbeat { batch: String, heartbeat_ms: u64 },
    /// Exit after finishing what you hold (`--stop-workers`).
    Stop,
}

fn to_frame<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("plain structs always serialize"))
}

fn from_frame<T: for<'de> Deserialize<'de>>(
    kind: &'static str,
    msg: &ZmqMessage,
) -> Result<(T, Option<Bytes>), ProtocolError> {
    let head = msg.get(0).ok_or(ProtocolError::Empty(kind))?;
    let value =
        serde_json::from_slice(head).map_err(|source| ProtocolError::Json { kind, source })?;
    Ok((value, msg.get(1).cloned()))
}

impl Task {
    pub fn to_message(&self, image: Option<Bytes>) -> ZmqMessage {
        let mut frames = vec![to_frame(self)];
        frames.extend(image);
        common::frames::message_of(frames)
    }

    /// The task and, when inline, its image bytes.
    pub fn from_message(msg: &ZmqMessage) -> Result<(Self, Option<Bytes>), ProtocolError> {
        from_frame("task", msg)
    }
}

impl Report {
    pub fn to_message(&self, image: Option<Bytes>) -> ZmqMessage {
        let mut frames = vec![to_frame(self)];
        frames.extend(image);
        common::frames::message_of(frames)
    }

    pub fn from_message(msg: &ZmqMessage) -> Result<(Self, Option<Bytes>), ProtocolError> {
        from_frame("report", msg)
    }
}

impl Control {
    pub fn to_message(&self) -> ZmqMessage {
        common::frames::message_of(vec![to_frame(self)])
    }

    pub fn from_message(msg: &ZmqMessage) -> Result<Self, ProtocolError> {
        from_frame("control", msg).map(|(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_round_trips_with_and_without_bytes() {
        let task = Task {
            batch: "b1".into(),
            id: 7,
            path: "sub/a.png".into(),
            filter: "grayscale".into(),
            input: None,
            output: Some("/out/sub/a.png".into()),
            timeout_ms: Some(3000),
        };
        let (back, bytes) = Task::from_message(&task.to_message(Some(Bytes::from_static(b"img"))))
            .expect("decodes");
        assert_eq!(back, task);
        assert_eq!(bytes.as_deref(), Some(&b"img"[..]));
        let (_, none) = Task::from_message(&task.to_message(None)).expect("decodes");
        assert!(none.is_none());
    }

    #[test]
    fn names_that_are_not_utf8_travel_as_bytes() {
        let name = |b: &[u8]| WirePath(PathBuf::from(OsString::from_vec(b.to_vec())));
        let task = Task {
            batch: "b".into(),
            id: 1,
            path: name(b"caf\xe9.png"),
            filter: "invert".into(),
            input: Some(name(b"/in/\xff\xfe.png")),
            output: Some(name(b"/out/\xfe\xff.png")),
            timeout_ms: None,
        };
        let msg = task.to_message(None);
        let json: serde_json::Value =
            serde_json::from_slice(&msg.get(0).expect("frame")[..]).expect("json");
        assert_eq!(
            json["path"],
            serde_json::json!([99, 97, 102, 233, 46, 112, 110, 103])
        );
        assert!(
            json.get("timeout_ms").is_none(),
            "absent when there is none"
        );
        let (back, _) = Task::from_message(&msg).expect("decodes");
        assert_eq!(back, task);
        let plain: Task = serde_json::from_str(
            r#"{"batch":"b","id":2,"path":"a.png","filter":"invert","input":"/in/a.png","output":null}"#,
        )
        .expect("a stock peer's task");
        assert_eq!(plain.path, WirePath::from("a.png"));
        assert_eq!(plain.timeout_ms, None);
    }

    #[test]
    fn report_wire_form_is_flat_json() {
        let r = Report {
            worker: "w1".into(),
            slots: 2,
            free: 1,
            heartbeat_ms: 1000,
            event: Event::Failed {
                batch: "b".into(),
                id: 3,
                reason: "bad".into(),
            },
        };
        let msg = r.to_message(None);
        let json: serde_json::Value =
            serde_json::from_slice(&msg.get(0).expect("frame")[..]).expect("json");
        assert_eq!(json["type"], "failed");
        assert_eq!(json["worker"], "w1");
        assert_eq!(json["id"], 3);
        assert_eq!(Report::from_message(&msg).expect("decodes").0, r);
        let hello: Report = serde_json::from_str(
            r#"{"type":"hello","worker":"py","slots":1,"free":1,"heartbeat_ms":500}"#,
        )
        .expect("hand-written hello");
        assert_eq!(hello.event, Event::Hello);
    }

    #[test]
    fn control_round_trips_and_garbage_is_an_error() {
        let stop = Control::Stop;
        assert_eq!(
            Control::from_message(&stop.to_message()).expect("decodes"),
            stop
        );
        let junk = common::frames::message_of(vec![Bytes::from_static(b"KILL")]);
        assert!(Control::from_message(&junk).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    //! The parsers on random and mutated frames: they never panic, and every valid message comes
    //! back from its own frames.

    use proptest::prelude::*;

    use super::*;

    fn id() -> impl Strategy<Value = (String, u64)> {
        (".{0,12}", any::<u64>())
    }

    /// UTF-8 names and raw byte names alike.
    fn wire_path() -> impl Strategy<Value = WirePath> {
        prop_oneof![
            ".{0,20}".prop_map(WirePath::from),
            proptest::collection::vec(any::<u8>(), 0..20)
                .prop_map(|b| WirePath(PathBuf::from(OsString::from_vec(b)))),
        ]
    }

    fn task() -> impl Strategy<Value = Task> {
        (
            id(),
            wire_path(),
            ".{0,20}",
            proptest::option::of(wire_path()),
            proptest::option::of(wire_path()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |((batch, id), path, filter, input, output, timeout_ms)| Task {
                    batch,
                    id,
                    path,
                    filter,
                    input,
                    output,
                    timeout_ms,
                },
            )
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Hello),
            Just(Event::Heartbeat),
            Just(Event::Bye),
            id().prop_map(|(batch, id)| Event::Accept { batch, id }),
            id().prop_map(|(batch, id)| Event::Defer { batch, id }),
            id().prop_map(|(batch, id)| Event::Done { batch, id }),
            (id(), ".{0,20}").prop_map(|((batch, id), reason)| Event::Failed { batch, id, reason }),
        ]
    }

    fn report() -> impl Strategy<Value = Report> {
        (".{0,12}", any::<u32>(), any::<u32>(), any::<u64>(), event()).prop_map(
            |(worker, slots, free, heartbeat_ms, event)| Report {
                worker,
                slots,
                free,
                heartbeat_ms,
                event,
            },
        )
    }

    fn control() -> impl Strategy<Value = Control> {
        prop_oneof![
            Just(Control::Stop),
            id().prop_map(|(batch, heartbeat_ms)| Control::Heartbeat {
                batch,
                heartbeat_ms
            }),
        ]
    }

    fn image() -> impl Strategy<Value = Option<Bytes>> {
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from))
    }

    /// The first frame of `msg` with the byte at `at` replaced by `byte`, or cut there.
    fn mutate(msg: &ZmqMessage, at: usize, byte: u8, cut: bool) -> ZmqMessage {
        let mut frames: Vec<Bytes> = msg.iter().cloned().collect();
        let mut head = frames[0].to_vec();
        if !head.is_empty() {
            let at = at % head.len();
            if cut {
                head.truncate(at);
            } else {
                head[at] = byte;
            }
        }
        frames[0] = Bytes::from(head);
        common::frames::message_of(frames)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn random_frames_never_panic(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 1..4),
        ) {
            let msg = common::frames::message_of(frames.into_iter().map(Bytes::from).collect());
            let _ = Task::from_message(&msg);
            let _ = Report::from_message(&msg);
            let _ = Control::from_message(&msg);
        }

        #[test]
        fn messages_round_trip_and_mutations_never_panic(
            t in task(),
            r in report(),
            c in control(),
            img in image(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let msg = t.to_message(img.clone());
            let (back, bytes) = Task::from_message(&msg).expect("a task");
            prop_assert_eq!(back, t);
            prop_assert_eq!(&bytes, &img);
            let _ = Task::from_message(&mutate(&msg, at, byte, cut));

            let msg = r.to_message(img.clone());
            let (back, bytes) = Report::from_message(&msg).expect("a report");
            prop_assert_eq!(back, r);
            prop_assert_eq!(&bytes, &img);
            let _ = Report::from_message(&mutate(&msg, at, byte, cut));

            let msg = c.to_message();
            prop_assert_eq!(Control::from_message(&msg).expect("a control"), c);
            let _ = Control::from_message(&mutate(&msg, at, byte, cut));
        }
    }
}
