//! Frames on the broker's two sockets, as typed values. Pure: no sockets, unit-tested.
//!
//! Frontend (clients, REQ-compatible envelope), as the frontend ROUTER sees it:
//! `[client-id][""][body...]`. Backend (workers, Paranoid Pirate Protocol, ZeroMQ RFC 6):
//! `[worker-id][0x01]` READY, `[worker-id][0x02]` HEARTBEAT, and
//! `[worker-id][client-id][""][body...]` for a reply; plus `[worker-id][0x05]` DISCONNECT, our
//! one extension (the command of the Majordomo Protocol, RFC 7), for a worker that is stopping. Our own clients put a request id in the
//! first body frame; our workers echo the body and add their name as a last frame.

use bytes::Bytes;
use zeromq::ZmqMessage;

/// RFC 6 READY: the worker can take one (more) request.
pub const READY: &[u8] = &[0x01];
/// RFC 6 HEARTBEAT, sent both ways.
pub const HEARTBEAT: &[u8] = &[0x02];
/// DISCONNECT (as in RFC 7), worker to broker: send me nothing more; I answer what I hold.
pub const DISCONNECT: &[u8] = &[0x05];

/// Why a message was refused; logged with the peer and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("no frames after the identity")]
    Empty,
    #[error("missing empty delimiter frame")]
    NoDelimiter,
    #[error("empty body")]
    NoBody,
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    #[error("one-frame message of {0} bytes is not a command")]
    NotACommand(usize),
}

/// What identifies a request in flight: the client identity and the first body frame (our
/// clients' request id; a REQ client has one request in flight at a time).
///
/// The books look a key up four or five times per request (owned, held, answered), and a
/// libzmq client's first frame is its whole body. So the key is hashed once, when it is
/// made, with a per-process random seed (the frames come from peers), and the maps keyed by
/// it use that hash as is ([`KeyMap`], [`KeySet`]): measured, that took a third off what the
/// books spend on a reply (docs/performance.md).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestKey {
    pub client: Bytes,
    pub id: Bytes,
    hash: u64,
}

impl RequestKey {
    pub fn new(client: Bytes, id: Bytes) -> Self {
        static SEED: std::sync::LazyLock<foldhash::fast::RandomState> =
            std::sync::LazyLock::new(Default::default);
        let hash = std::hash::BuildHasher::hash_one(&*SEED, (&client[..], &id[..]));
        Self { client, id, hash }
    }

    /// The key's 64-bit hash (seeded per process): what the books remember of a key they must
    /// recognise later without keeping its frames (a first body frame may be a megabyte).
    pub fn digest(&self) -> u64 {
        self.hash
    }
}

impl std::fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequestKey")
            .field(&self.client)
            .field(&self.id)
            .finish()
    }
}

impl std::hash::Hash for RequestKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl nohash_hasher::IsEnabled for RequestKey {}

/// A map keyed by requests, hashed once per key (see [`RequestKey`]).
pub type KeyMap<V> =
    std::collections::HashMap<RequestKey, V, nohash_hasher::BuildNoHashHasher<RequestKey>>;
/// A set of requests, hashed once per key (see [`RequestKey`]).
pub type KeySet =
    std::collections::HashSet<RequestKey, nohash_hasher::BuildNoHashHasher<RequestKey>>;

/// A client request, `[client-id][""][body...]`, kept as received: forwarding it to a worker
/// only puts the worker's identity in front; no frame is copied.
#[derive(Debug, Clone)]
pub struct Request {
    msg: ZmqMessage,
    key: RequestKey,
    /// The memory it holds (what queueing it costs): see [`Request::bytes`].
    bytes: usize,
}

/// Checks `[client-id][""][body...]`.
fn check_envelope(msg: &ZmqMessage) -> Result<(), Malformed> {
    match msg.get(1) {
        None => Err(Malformed::Empty),
        Some(delimiter) if !delimiter.is_empty() => Err(Malformed::NoDelimiter),
        Some(_) if msg.len() == 2 => Err(Malformed::NoBody),
        Some(_) => Ok(()),
    }
}

/// The key of a checked envelope (a request, or the reply that answers it).
pub fn key_of(msg: &ZmqMessage) -> RequestKey {
    let frame = |i| msg.get(i).cloned().expect("checked envelope");
    RequestKey::new(frame(0), frame(2))
}

/// What a queued request holds beyond its message ([`common::wire::MESSAGE_OVERHEAD`]
/// and [`common::wire::FRAME_OVERHEAD`] per frame): the `Request` itself in its client's queue (112 bytes,
/// the queue growing by doubling) and its entry in the books (key and place, about 200 bytes,
/// in a map kept under 7/8 full that grows by doubling). Measured, a release broker with no
/// worker: its RSS grew by 787-793 bytes per queued request of four tiny frames (14,500 and
/// 29,000 of them, just after the maps had doubled, the worst case; 601 at 50,000) and by 51
/// per frame more; with these constants such a request counts 908 bytes, and 64 per frame more.
pub const QUEUED_OVERHEAD: usize = 384;

impl Request {
    /// Parses a message from the frontend ROUTER.
    pub fn parse(msg: ZmqMessage) -> Result<Self, Malformed> {
        check_envelope(&msg)?;
        use common::wire::{FRAME_OVERHEAD, MESSAGE_OVERHEAD};
        let frames: usize = msg.iter().map(|f| f.len() + FRAME_OVERHEAD).sum();
        let bytes = frames + MESSAGE_OVERHEAD + QUEUED_OVERHEAD;
        let key = key_of(&msg);
        Ok(Self { msg, key, bytes })
    }

    pub fn client(&self) -> &Bytes {
        self.msg.get(0).expect("checked envelope")
    }

    /// The memory it holds while queued, counted by `--max-queued-bytes`: its frames' bytes
    /// and what holding them costs (the frames read by `common::wire::Reader` hold their own
    /// memory and nothing more: see there), plus its place in the queue and the books.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn key(&self) -> &RequestKey {
        &self.key
    }

    /// Its frames, `[client-id][""][body...]`: what goes to a worker after the worker's id (the
    /// ROUTER encodes them straight from here; no message is built to forward it).
    pub fn frames(&self) -> impl ExactSizeIterator<Item = &Bytes> + Clone {
        self.msg.iter()
    }
}

/// A message from a worker, as received on the backend.
#[derive(Debug, Clone)]
pub enum FromWorker {
    Ready,
    Heartbeat,
    Disconnect,
    /// A reply, `[client-id][""][body...]`: exactly what the frontend ROUTER sends on.
    Reply(ZmqMessage),
}

impl FromWorker {
    /// Splits a backend message into the worker's identity and what the worker said.
    pub fn parse(msg: ZmqMessage) -> (Bytes, Result<Self, Malformed>) {
        let mut frames = msg.into_vecdeque();
        let worker = frames.pop_front().unwrap_or_default();
        let parsed = match frames.len() {
            0 => Err(Malformed::Empty),
            1 => match frames[0].as_ref() {
                READY => Ok(Self::Ready),
                HEARTBEAT => Ok(Self::Heartbeat),
                DISCONNECT => Ok(Self::Disconnect),
                [other] => Err(Malformed::UnknownCommand(*other)),
                other => Err(Malformed::NotACommand(other.len())),
            },
            _ => {
                let msg = ZmqMessage::try_from(frames).expect("two frames or more");
                check_envelope(&msg).map(|()| Self::Reply(msg))
            }
        };
        (worker, parsed)
    }
}

/// Body of one of our clients' requests: `[request-id][payload]`.
pub fn request_body(id: u64, payload: Bytes) -> Vec<Bytes> {
    vec![Bytes::from(id.to_string()), payload]
}

/// A reply as our client reads it (after the empty delimiter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    pub payload: Bytes,
    /// The answering worker's name, when the worker adds one (ours do, a stock echo does not).
    pub worker: Option<String>,
}

impl Reply {
    /// Parses `[""][request-id][payload][worker-name]?` as received by a DEALER client.
    pub fn parse(frames: &[Bytes]) -> Option<Self> {
        let [delimiter, id, payload, rest @ ..] = frames else {
            return None;
        };
        if !delimiter.is_empty() {
            return None;
        }
        let id = std::str::from_utf8(id).ok()?.parse().ok()?;
        let worker = match rest {
            [] => None,
            [name] => Some(String::from_utf8_lossy(name).into_owned()),
            _ => return None,
        };
        Some(Self {
            id,
            payload: payload.clone(),
            worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    /// What the backend ROUTER sends a worker: its id, then the request's frames.
    fn to_worker(request: &Request, worker: &'static [u8]) -> ZmqMessage {
        let mut frames = vec![b(worker)];
        frames.extend(request.frames().cloned());
        common::frames::message_of(frames)
    }

    fn m(frames: &[&'static [u8]]) -> ZmqMessage {
        common::frames::message_of(frames.iter().map(|f| b(f)).collect())
    }

    #[test]
    fn request_round_trips_to_worker_and_back() {
        let req = Request::parse(m(&[b"C", b"", b"7", b"hi"])).expect("valid");
        assert_eq!(req.key(), &RequestKey::new(b(b"C"), b(b"7")));
        assert_eq!(req.client(), &b(b"C"));
        let to_worker = to_worker(&req, b"W");
        assert_eq!(
            to_worker.clone().into_vec(),
            m(&[b"W", b"C", b"", b"7", b"hi"]).into_vec()
        );
        // The worker echoes it; the backend ROUTER shows the worker's identity in front.
        let (worker, reply) = FromWorker::parse(to_worker);
        assert_eq!(worker, b(b"W"));
        let Ok(FromWorker::Reply(reply)) = reply else {
            panic!("a reply")
        };
        assert_eq!(
            reply.clone().into_vec(),
            m(&[b"C", b"", b"7", b"hi"]).into_vec()
        );
        assert_eq!(&key_of(&reply), req.key());
    }

    #[test]
    fn rejects_malformed_requests() {
        let parse = |frames: &[&'static [u8]]| Request::parse(m(frames)).err();
        assert_eq!(parse(&[b"C"]), Some(Malformed::Empty));
        assert_eq!(parse(&[b"C", b"x", b"y"]), Some(Malformed::NoDelimiter));
        assert_eq!(parse(&[b"C", b""]), Some(Malformed::NoBody));
    }

    #[test]
    fn parses_worker_commands() {
        let parse = |frames: &[&'static [u8]]| FromWorker::parse(m(frames)).1;
        assert!(matches!(parse(&[b"W", READY]), Ok(FromWorker::Ready)));
        assert!(matches!(
            parse(&[b"W", HEARTBEAT]),
            Ok(FromWorker::Heartbeat)
        ));
        assert!(matches!(
            parse(&[b"W", DISCONNECT]),
            Ok(FromWorker::Disconnect)
        ));
        let error = |frames: &[&'static [u8]]| parse(frames).err();
        assert_eq!(error(&[b"W", &[0x07]]), Some(Malformed::UnknownCommand(7)));
        assert_eq!(error(&[b"W", b""]), Some(Malformed::NotACommand(0)));
        assert_eq!(error(&[b"W"]), Some(Malformed::Empty));
        assert_eq!(error(&[b"W", b"C", b"x"]), Some(Malformed::NoDelimiter));
        assert_eq!(error(&[b"W", b"C", b""]), Some(Malformed::NoBody));
    }

    #[test]
    fn client_reply_parsing() {
        let r = Reply::parse(&[b(b""), b(b"42"), b(b"p"), b(b"w1")]).expect("reply");
        assert_eq!((r.id, r.worker.as_deref()), (42, Some("w1")));
        let r = Reply::parse(&[b(b""), b(b"42"), b(b"p")]).expect("stock echo");
        assert_eq!(r.worker, None);
        assert!(Reply::parse(&[b(b""), b(b"x"), b(b"p")]).is_none());
        assert!(Reply::parse(&[b(b"42"), b(b"p")]).is_none());
        assert_eq!(request_body(3, b(b"p")), vec![b(b"3"), b(b"p")]);
    }

    mod fuzz {
        //! Every parser on arbitrary frames: no panic, and what parses round-trips.

        use proptest::prelude::*;

        use super::*;

        fn frames() -> impl Strategy<Value = Vec<Bytes>> {
            let frame = prop_oneof![
                Just(Bytes::new()),
                Just(Bytes::from_static(READY)),
                Just(Bytes::from_static(HEARTBEAT)),
                Just(Bytes::from_static(DISCONNECT)),
                proptest::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from),
            ];
            proptest::collection::vec(frame, 1..7)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn parsers_never_panic_and_round_trip(frames in frames()) {
                let msg = common::frames::message_of(frames.clone());
                if let Ok(request) = Request::parse(msg.clone()) {
                    prop_assert_eq!(request.client(), &frames[0]);
                    let (worker, back) = FromWorker::parse(to_worker(&request, b"W"));
                    prop_assert_eq!(worker, Bytes::from_static(b"W"));
                    match back {
                        Ok(FromWorker::Reply(reply)) => prop_assert_eq!(&key_of(&reply), request.key()),
                        other => prop_assert!(false, "a request did not come back as a reply: {:?}", other),
                    }
                }
                let (_, parsed) = FromWorker::parse(msg);
                if let Ok(FromWorker::Reply(reply)) = parsed {
                    prop_assert!(reply.len() >= 3);
                }
                if let Some(reply) = Reply::parse(&frames) {
                    prop_assert_eq!(reply.payload, frames[2].clone());
                }
            }
        }
    }
}
