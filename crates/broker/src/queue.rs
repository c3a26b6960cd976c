//! The requests waiting for a worker: one FIFO per client, served in turn.
//!
//! One FIFO for everyone lets a client that floods the broker put thousands of requests ahead
//! of everybody else's. Here each client has its own queue and dispatch takes one request from
//! each client in turn, so a newcomer waits for one request per busy client, not for the
//! backlog. The bound is shared: when it is reached, a new request displaces the newest request
//! of the client that has the most queued (so the flooder pays for its flood), unless that is
//! the sender itself, whose new request is refused.

use std::collections::VecDeque;

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};

use crate::protocol::{Request, RequestKey};

/// What happened to a request offered to a full queue.
#[derive(Debug)]
pub enum Overflow {
    /// The new request was refused (its client already has the most queued).
    Refused(Request),
    /// The new request was queued; this one, the newest of the longest queue, was dropped.
    Displaced(Request),
}

/// Requests per client, dispatched round robin over clients, at most `capacity` in all.
#[derive(Debug)]
pub struct RequestQueue {
    capacity: usize,
    len: usize,
    by_client: HashMap<Bytes, VecDeque<Request>>,
    /// Clients with queued requests, in the order they are served.
    turns: VecDeque<Bytes>,
}

impl RequestQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            len: 0,
            by_client: HashMap::new(),
            turns: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a new request at the back of its client's queue, within the bound.
    pub fn push(&mut self, request: Request) -> Result<(), Overflow> {
        if self.len < self.capacity {
            self.push_back(request);
            return Ok(());
        }
        let longest = self
            .by_client
            .iter()
            .max_by_key(|(_, queue)| queue.len())
            .map(|(client, queue)| (client.clone(), queue.len()));
        let mine = self
            .by_client
            .get(request.client())
            .map_or(0, VecDeque::len);
        match longest {
            Some((client, most)) if most > mine + 1 => {
                let displaced = self
                    .pop_back_of(&client)
                    .expect("the longest queue is not empty");
                self.push_back(request);
                Err(Overflow::Displaced(displaced))
            }
            _ => Err(Overflow::Refused(request)),
        }
    }

    fn push_back(&mut self, request: Request) {
        let queue = self.by_client.entry(request.client().clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(request.client().clone());
        }
        queue.push_back(request);
        self.len += 1;
    }

    /// Puts back a request that was with a worker: first of its client's, and that client
    /// served first. May exceed the bound: the request was accepted once already.
    pub fn push_front(&mut self, request: Request) {
        let queue = self.by_client.entry(request.client().clone()).or_default();
        if queue.is_empty() {
            self.turns.push_front(request.client().clone());
        }
        queue.push_front(request);
        self.len += 1;
    }

    /// The next request: the oldest of the client whose turn it is.
    pub fn pop(&mut self) -> Option<Request> {
        let client = self.turns.pop_front()?;
        let queue = self
            .by_client
            .get_mut(&client)
            .expect("a client in turn has a queue");
        let request = queue.pop_front().expect("a client in turn has requests");
        if queue.is_empty() {
            self.by_client.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        self.len -= 1;
        Some(request)
    }

    fn pop_back_of(&mut self, client: &Bytes) -> Option<Request> {
        let queue = self.by_client.get_mut(client)?;
        let request = queue.pop_back()?;
        if queue.is_empty() {
            self.by_client.remove(client);
            self.turns.retain(|c| c != client);
        }
        self.len -= 1;
        Some(request)
    }

    /// Takes out every request of `client` (it went away or stopped reading).
    pub fn remove_client(&mut self, client: &Bytes) -> Vec<Request> {
        let Some(queue) = self.by_client.remove(client) else {
            return Vec::new();
        };
        self.turns.retain(|c| c != client);
        self.len -= queue.len();
        queue.into()
    }

    /// Takes out the queued request with this key, if any (it was answered meanwhile).
    pub fn remove(&mut self, key: &RequestKey) -> Option<Request> {
        let queue = self.by_client.get_mut(&key.0)?;
        let at = queue.iter().position(|r| r.key() == *key)?;
        let request = queue.remove(at);
        if queue.is_empty() {
            self.by_client.remove(&key.0);
            self.turns.retain(|c| c != &key.0);
        }
        self.len -= 1;
        request
    }

    /// A copy, for tests that inspect the order without disturbing it.
    #[cfg(test)]
    pub fn clone_for_test(&self) -> Self {
        Self {
            capacity: self.capacity,
            len: self.len,
            by_client: self.by_client.clone(),
            turns: self.turns.clone(),
        }
    }

    /// Empties the queue, returning what it held.
    pub fn drain(&mut self) -> Vec<Request> {
        self.turns.clear();
        self.len = 0;
        self.by_client.drain().flat_map(|(_, q)| q).collect()
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

    fn ids(queue: &mut RequestQueue) -> Vec<(Bytes, Bytes)> {
        std::iter::from_fn(|| queue.pop())
            .map(|r| r.key())
            .collect()
    }

    fn key(client: &'static str, id: u64) -> RequestKey {
        (
            Bytes::from_static(client.as_bytes()),
            Bytes::from(id.to_string()),
        )
    }

    #[test]
    fn clients_take_turns() {
        let mut q = RequestQueue::new(100);
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
        let mut q = RequestQueue::new(4);
        for id in 0..4 {
            q.push(req("F", id)).expect("room");
        }
        // The flooder itself is refused...
        assert!(matches!(q.push(req("F", 9)), Err(Overflow::Refused(_))));
        // ...a newcomer displaces the flooder's newest.
        match q.push(req("N", 0)) {
            Err(Overflow::Displaced(r)) => assert_eq!(r.key(), key("F", 3)),
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
        let mut q = RequestQueue::new(10);
        q.push(req("A", 1)).expect("room");
        q.push(req("B", 1)).expect("room");
        q.push_front(req("B", 0));
        assert_eq!(q.pop().map(|r| r.key()), Some(key("A", 1)));
        q.push(req("A", 2)).expect("room");
        assert_eq!(q.remove(&key("A", 2)).map(|r| r.key()), Some(key("A", 2)));
        assert!(q.remove(&key("A", 2)).is_none());
        assert_eq!(q.remove_client(&Bytes::from_static(b"B")).len(), 2);
        assert!(q.is_empty());
        assert!(q.pop().is_none());
        q.push(req("C", 0)).expect("room");
        assert_eq!(q.drain().len(), 1);
        assert_eq!(q.len(), 0);
    }
}
