//! Frames on the broker's two sockets, as typed values. Pure: no sockets, unit-tested.
//!
//! Frontend (clients, REQ-compatible envelope), as the frontend ROUTER sees it:
//! `[client-id][""][body...]`. Backend (workers, Paranoid Pirate Protocol, ZeroMQ RFC 6):
//! `[worker-id][0x01]` READY, `[worker-id][0x02]` HEARTBEAT, and
//! `[worker-id][client-id][""][body...]` for a reply. Our own clients put a request id in the
//! first body frame; our workers echo the body and add their name as a last frame.

use bytes::Bytes;

/// RFC 6 READY: the worker can take one (more) request.
pub const READY: &[u8] = &[0x01];
/// RFC 6 HEARTBEAT, sent both ways.
pub const HEARTBEAT: &[u8] = &[0x02];

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

/// A client request as received on the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub client: Bytes,
    pub body: Vec<Bytes>,
}

impl Request {
    /// Parses `[client-id][""][body...]`.
    pub fn parse(mut frames: Vec<Bytes>) -> Result<Self, Malformed> {
        if frames.len() < 2 {
            return Err(Malformed::Empty);
        }
        let body = frames.split_off(2);
        if !frames[1].is_empty() {
            return Err(Malformed::NoDelimiter);
        }
        if body.is_empty() {
            return Err(Malformed::NoBody);
        }
        let client = frames.swap_remove(0);
        Ok(Self { client, body })
    }

    /// What identifies this request in flight: the client and the first body frame (our
    /// clients' request id; a REQ client has one request in flight at a time).
    pub fn key(&self) -> (Bytes, Bytes) {
        (self.client.clone(), self.body[0].clone())
    }

    /// Frames for the backend ROUTER: `[worker-id][client-id][""][body...]`.
    pub fn to_worker(&self, worker: &Bytes) -> Vec<Bytes> {
        let mut frames = Vec::with_capacity(3 + self.body.len());
        frames.push(worker.clone());
        frames.push(self.client.clone());
        frames.push(Bytes::new());
        frames.extend(self.body.iter().cloned());
        frames
    }
}

/// A message from a worker, as received on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    Ready,
    Heartbeat,
    /// A reply for `client`; `body` is what goes back to it.
    Reply {
        client: Bytes,
        body: Vec<Bytes>,
    },
}

impl FromWorker {
    /// Parses everything after the worker's identity frame.
    pub fn parse(frames: Vec<Bytes>) -> Result<Self, Malformed> {
        match frames.len() {
            0 => Err(Malformed::Empty),
            1 => match frames[0].as_ref() {
                READY => Ok(Self::Ready),
                HEARTBEAT => Ok(Self::Heartbeat),
                [other] => Err(Malformed::UnknownCommand(*other)),
                other => Err(Malformed::NotACommand(other.len())),
            },
            _ => {
                let request = Request::parse(frames)?;
                Ok(Self::Reply {
                    client: request.client,
                    body: request.body,
                })
            }
        }
    }
}

/// Frames for the frontend ROUTER: `[client-id][""][body...]`.
pub fn to_client(client: Bytes, body: Vec<Bytes>) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(2 + body.len());
    frames.push(client);
    frames.push(Bytes::new());
    frames.extend(body);
    frames
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

    #[test]
    fn request_round_trips_to_worker_and_back() {
        let req = Request::parse(vec![b(b"C"), b(b""), b(b"7"), b(b"hi")]).expect("valid");
        assert_eq!(req.key(), (b(b"C"), b(b"7")));
        let to_worker = req.to_worker(&b(b"W"));
        assert_eq!(to_worker, vec![b(b"W"), b(b"C"), b(b""), b(b"7"), b(b"hi")]);
        // The backend ROUTER strips the worker identity; the worker echoes the rest.
        let reply = FromWorker::parse(to_worker[1..].to_vec()).expect("reply");
        assert_eq!(
            reply,
            FromWorker::Reply {
                client: b(b"C"),
                body: vec![b(b"7"), b(b"hi")]
            }
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        assert_eq!(Request::parse(vec![b(b"C")]), Err(Malformed::Empty));
        assert_eq!(
            Request::parse(vec![b(b"C"), b(b"x"), b(b"y")]),
            Err(Malformed::NoDelimiter)
        );
        assert_eq!(
            Request::parse(vec![b(b"C"), b(b"")]),
            Err(Malformed::NoBody)
        );
    }

    #[test]
    fn parses_worker_commands() {
        assert_eq!(FromWorker::parse(vec![b(READY)]), Ok(FromWorker::Ready));
        assert_eq!(
            FromWorker::parse(vec![b(HEARTBEAT)]),
            Ok(FromWorker::Heartbeat)
        );
        assert_eq!(
            FromWorker::parse(vec![b(&[0x07])]),
            Err(Malformed::UnknownCommand(7))
        );
        assert_eq!(
            FromWorker::parse(vec![b(b"")]),
            Err(Malformed::NotACommand(0))
        );
        assert_eq!(FromWorker::parse(vec![]), Err(Malformed::Empty));
        assert_eq!(
            FromWorker::parse(vec![b(b"C"), b(b"x")]),
            Err(Malformed::NoDelimiter)
        );
    }

    #[test]
    fn client_reply_parsing() {
        let r = Reply::parse(&[b(b""), b(b"42"), b(b"p"), b(b"w1")]).expect("reply");
        assert_eq!((r.id, r.worker.as_deref()), (42, Some("w1")));
        let r = Reply::parse(&[b(b""), b(b"42"), b(b"p")]).expect("stock echo");
        assert_eq!(r.worker, None);
        assert!(Reply::parse(&[b(b""), b(b"x"), b(b"p")]).is_none());
        assert!(Reply::parse(&[b(b"42"), b(b"p")]).is_none());
        assert_eq!(
            to_client(b(b"C"), request_body(3, b(b"p"))),
            vec![b(b"C"), b(b""), b(b"3"), b(b"p")]
        );
    }
}
