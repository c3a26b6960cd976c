//! The requests waiting for a worker: one FIFO per client, served in turn.
//!
//! One FIFO for everyone lets a client that floods the broker put thousands of requests ahead
//! of everybody else's. Here each client has its own queue and dispatch takes one request from
//! each client in turn, so a newcomer waits for one request per busy client, not for the
//! backlog. The bounds, a count and a number of bytes, are shared: when one is reached, a new
//! request displaces the newest requests of the client that has the most bytes queued (so the
//! flooder pays for its flood), unless that is the sender itself, whose request is refused.

use std::collections::VecDeque;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};

use crate::protocol::{Request, RequestKey};

/// What happened to a request offered to a full queue.
#[derive(Debug)]
pub enum Overflow {
    /// The new request was refused (its client already has the most queued).
    Refused(Request),
    /// The new request was queued; these, the newest of the heaviest client, were dropped.
    Displaced(Vec<Request>),
}

/// One client's queued requests.
#[derive(Debug, Clone, Default)]
struct ClientQueue {
    requests: VecDeque<Request>,
    bytes: usize,
}

/// Requests per client, dispatched round robin over clients, at most `capacity` requests and
/// `max_bytes` bytes in all.
#[derive(Debug)]
pub struct RequestQueue {
    capacity: usize,
    max_bytes: usize,
    len: usize,
    bytes: usize,
    by_client: HashMap<Bytes, ClientQueue>,
    /// Clients with queued requests, in the order they are served.
    turns: VecDeque<Bytes>,
}

impl RequestQueue {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity,
            max_bytes,
            len: 0,
            bytes: 0,
            by_client: HashMap::new(),
            turns: VecDeque::new(),
        }
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn has_room_for(&self, bytes: usize) -> bool {
        self.len < self.capacity && self.bytes + bytes <= self.max_bytes
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a new request at the back of its client's queue, within the bounds.
    pub fn push(&mut self, request: Request) -> Result<(), Overflow> {
        let size = request.bytes();
        if self.has_room_for(size) {
            self.push_back(request);
            return Ok(());
        }
        let heaviest = self
            .by_client
            .iter()
            .max_by_key(|(_, queue)| queue.bytes)
            .map(|(client, queue)| (client.clone(), queue.bytes));
        let mine = self.by_client.get(request.client()).map_or(0, |q| q.bytes);
        let Some((client, most)) = heaviest.filter(|(_, most)| *most > mine + size) else {
            return Err(Overflow::Refused(request));
        };
        // Take from the heaviest while it stays heavier than the sender would be.
        let mut displaced = Vec::new();
        let mut left = most;
        while !self.has_room_for(size) && left > mine + size {
            let Some(dropped) = self.pop_back_of(&client) else {
                break;
            };
            left -= dropped.bytes();
            displaced.push(dropped);
        }
        if !self.has_room_for(size) {
            // Not enough to take from fairly: put them back and refuse.
            for request in displaced.into_iter().rev() {
                self.push_back(request);
            }
            return Err(Overflow::Refused(request));
        }
        self.push_back(request);
        Err(Overflow::Displaced(displaced))
    }

    fn push_back(&mut self, request: Request) {
        let queue = self.by_client.entry(request.client().clone()).or_default();
        if queue.requests.is_empty() {
            self.turns.push_back(request.client().clone());
        }
        queue.bytes += request.bytes();
        self.bytes += request.bytes();
        queue.requests.push_back(request);
        self.len += 1;
    }

    /// Puts back a request that was with a worker: first of its client's, and that client
    /// served first. May exceed the bounds: the request was accepted once already.
    pub fn push_front(&mut self, request: Request) {
        let queue = self.by_client.entry(request.client().clone()).or_default();
        if queue.requests.is_empty() {
            self.turns.push_front(request.client().clone());
        }
        queue.bytes += request.bytes();
        self.bytes += request.bytes();
        queue.requests.push_front(request);
        self.len += 1;
    }

    /// The next request: the oldest of the client whose turn it is.
    pub fn pop(&mut self) -> Option<Request> {
        let client = self.turns.pop_front()?;
        let queue = self
            .by_client
            .get_mut(&client)
            .expect("a client in turn has a queue");
        let request = queue
            .requests
            .pop_front()
            .expect("a client in turn has requests");
        queue.bytes -= request.bytes();
        if queue.requests.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.taken(&request);
        Some(request)
    }

    fn taken(&mut self, request: &Request) {
        self.len -= 1;
        self.bytes -= request.bytes();
    }

    fn pop_back_of(&mut self, client: &Bytes) -> Option<Request> {
        let queue = self.by_client.get_mut(client)?;
        let request = queue.requests.pop_back()?;
        queue.bytes -= request.bytes();
        if queue.requests.is_empty() {
            self.by_client.remove(client);
            self.turns.retain(|c| c != client);
        }
        self.taken(&request);
        Some(request)
    }

    /// Takes out every request of `client` (it went away or stopped reading).
    pub fn remove_client(&mut self, client: &Bytes) -> Vec<Request> {
        let Some(queue) = self.by_client.remove(client) else {
            return Vec::new();
        };
        self.turns.retain(|c| c != client);
        self.len -= queue.requests.len();
        self.bytes -= queue.bytes;
        queue.requests.into()
    }

    /// Takes out the queued request with this key, if any (it was answered meanwhile).
    pub fn remove(&mut self, key: &RequestKey) -> Option<Request> {
        let queue = self.by_client.get_mut(&key.client)?;
        let at = queue.requests.iter().position(|r| r.key() == key)?;
        let request = queue.requests.remove(at)?;
        queue.bytes -= request.bytes();
        if queue.requests.is_empty() {
            self.by_client.remove(&key.client);
            self.turns.retain(|c| c != &key.client);
        }
        self.taken(&request);
        Some(request)
    }

    /// A copy, for tests that inspect the order without disturbing it.
    #[cfg(test)]
    pub fn clone_for_test(&self) -> Self {
        Self {
            capacity: self.capacity,
            max_bytes: self.max_bytes,
            len: self.len,
            bytes: self.bytes,
            by_client: self.by_client.clone(),
            turns: self.turns.clone(),
        }
    }

    /// Empties the queue, returning what it held.
    pub fn drain(&mut self) -> Vec<Request> {
        self.turns.clear();
        self.len = 0;
        self.bytes = 0;
        self.by_client
            .drain()
            .flat_map(|(_, q)| q.requests)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(client: &'static str, id: u64) -> Request {
        let frames = vec![
            Bytes::from_static(client.as_bytes()),
            Bytes::new(),
            Bytes::from(id.to_string()),
        ];
        Request::parse(common::frames::message_of(frames)).expect("valid request")
    }

    fn ids(queue: &mut RequestQueue) -> Vec<RequestKey> {
        std::iter::from_fn(|| queue.pop())
            .map(|r| r.key().clone())
            .collect()
    }

    fn key(client: &'static str, id: u64) -> RequestKey {
        RequestKey::new(
            Bytes::from_static(client.as_bytes()),
            Bytes::from(id.to_string()),
        )
    }

    #[test]
    fn clients_take_turns() {
        let mut q = RequestQueue::new(100, usize::MAX);
        for id in 0..3 {
            q.push(req("A", id)).expect("room");
        }
        q.push(req("B", 0)).expect("room");
        assert_eq!(q.len(), 4);
        assert_eq!(
            ids(&mut q),
            [key("A", 0), key("B", 0), key("A", 1), key("A", 2)]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn a_full_queue_displaces_the_flooder_not_the_newcomer() {
        let mut q = RequestQueue::new(4, usize::MAX);
        for id in 0..4 {
            q.push(req("F", id)).expect("room");
        }
        // The flooder itself is refused...
        assert!(matches!(q.push(req("F", 9)), Err(Overflow::Refused(_))));
        // ...a newcomer displaces the flooder's newest.
        match q.push(req("N", 0)) {
            Err(Overflow::Displaced(r)) => {
                assert_eq!(
                    r.iter().map(|r| r.key().clone()).collect::<Vec<_>>(),
                    [key("F", 3)]
                )
            }
            other => panic!("expected a displacement, got {other:?}"),
        }
        assert_eq!(q.len(), 4);
        assert_eq!(
            ids(&mut q),
            [key("F", 0), key("N", 0), key("F", 1), key("F", 2)]
        );
    }

    #[test]
    fn requeued_requests_go_first_and_removals_keep_the_count() {
        let mut q = RequestQueue::new(10, usize::MAX);
        q.push(req("A", 1)).expect("room");
        q.push(req("B", 1)).expect("room");
        q.push_front(req("B", 0));
        assert_eq!(q.pop().map(|r| r.key().clone()), Some(key("A", 1)));
        q.push(req("A", 2)).expect("room");
        assert_eq!(
            q.remove(&key("A", 2)).map(|r| r.key().clone()),
            Some(key("A", 2))
        );
        assert!(q.remove(&key("A", 2)).is_none());
        assert_eq!(q.remove_client(&Bytes::from_static(b"B")).len(), 2);
        assert!(q.is_empty());
        assert!(q.pop().is_none());
        q.push(req("C", 0)).expect("room");
        assert_eq!(q.drain().len(), 1);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_tiny_request_counts_what_holding_it_costs_not_only_its_bytes() {
        // Four frames, eleven bytes: what 2,000 of them hold is not 22 kB.
        let tiny = sized("client", 1234, 1);
        assert_eq!(tiny.frames().map(Bytes::len).sum::<usize>(), 11);
        assert!(
            tiny.bytes() >= 11 + 4 * common::wire::FRAME_OVERHEAD + common::wire::MESSAGE_OVERHEAD
        );
        let mut q = RequestQueue::new(10_000, 1 << 20);
        let fit = (0..2000)
            .filter(|&id| q.push(sized("client", id, 1)).is_ok())
            .count();
        // Ids of four digits at most: none counts more than `tiny`.
        assert!((1 << 20) / tiny.bytes() <= fit && fit < 2000, "{fit}");
        assert!(q.bytes() <= 1 << 20);
    }

    fn sized(client: &'static str, id: u64, payload: usize) -> Request {
        let frames = vec![
            Bytes::from_static(client.as_bytes()),
            Bytes::new(),
            Bytes::from(id.to_string()),
            Bytes::from(vec![0u8; payload]),
        ];
        Request::parse(common::frames::message_of(frames)).expect("valid request")
    }

    #[test]
    fn the_byte_bound_displaces_as_many_as_it_takes_and_no_more() {
        let small = sized("F", 0, 100).bytes();
        let mut q = RequestQueue::new(100, 10 * small);
        for id in 0..10 {
            q.push(sized("F", id, 100)).expect("room");
        }
        assert_eq!(q.bytes(), 10 * small);
        // Three of the flooder's make room for one a little under three times their size.
        let payload = 3 * small - sized("N", 0, 0).bytes() - 8;
        match q.push(sized("N", 0, payload)) {
            Err(Overflow::Displaced(r)) => assert_eq!(r.len(), 3),
            other => panic!("expected a displacement, got {other:?}"),
        }
        assert!(q.bytes() <= 10 * small);
        // A request bigger than all the flooder could fairly give up is refused, and the
        // flooder keeps what it had.
        let before = q.len();
        assert!(matches!(
            q.push(sized("M", 0, 9 * small)),
            Err(Overflow::Refused(_))
        ));
        assert_eq!(q.len(), before);
        assert!(q.bytes() <= 10 * small);
    }
}
