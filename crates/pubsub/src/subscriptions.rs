//! Subscriptions per connection, the index that matches updates to them, and what the proxy
//! asks its publishers for.
//!
//! Each subscriber connection holds a *set* of prefixes, as libzmq's XPUB keeps one: a second
//! subscribe to a prefix it holds changes nothing, an unsubscribe counts only for a prefix it
//! holds, and its end releases everything it held. A prefix goes upstream when its first
//! connection subscribes and is withdrawn when its last one lets go (by unsubscribing or by
//! ending): the XSUB upstream keeps a set, so forwarding one subscriber's unsubscribe would cut
//! the topic off for every other one. The proxy's own heartbeat topic is held like any prefix
//! but never forwarded.
//!
//! Bounds: at most `max_topics` distinct prefixes (heartbeat topic aside), and at most
//! `max_per_connection` per connection; a subscribe beyond either is refused (not held, not
//! forwarded). Prefixes are copied out of the read buffers they came in, once per distinct
//! prefix.
//!
//! Matching does not scan anyone's list: the index maps each prefix to the connections holding
//! it, and an update's topic is looked up once for each distinct prefix length held that is no
//! longer than the topic (zips and `~hb`: two lookups, whatever the number of prefixes; at most
//! one per byte of the topic).
//!
//! [`Pending`] carries the changes to the task that owns the XSUB, coalesced per prefix: never
//! dropped, and never more of them waiting than there are prefixes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use foldhash::HashMapExt;
use tokio::sync::Notify;

use crate::protocol::{Subscription, HEARTBEAT_TOPIC};

/// A connection's place in [`Subscriptions`], from [`Subscriptions::join`] until
/// [`Subscriptions::leave`]; then it may be given to another connection.
pub type Slot = usize;

/// What one subscribe or unsubscribe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Added to (subscribe) or removed from (unsubscribe) the connection's set. `upstream`: it
    /// was the first connection to hold the prefix, or the last: forward the change.
    Changed { upstream: bool },
    /// Subscribe: the connection already held it. Unsubscribe: it did not hold it.
    Unchanged,
    /// Subscribe refused: `max_topics` distinct prefixes are held.
    TableFull,
    /// Subscribe refused: this connection holds `max_per_connection` prefixes.
    ConnectionFull,
}

/// One connection: its payload (the fanout's peer), and each prefix it holds with its position
/// in that prefix's holders (so that letting go of it takes no search).
#[derive(Debug)]
struct Conn<T> {
    peer: T,
    prefixes: HashMap<Bytes, usize>,
    /// The last match this connection was counted in (one delivery per update).
    stamp: u64,
}

/// Every connection's prefixes, indexed by prefix.
#[derive(Debug)]
pub struct Subscriptions<T = ()> {
    /// Each prefix held, with the connections holding it. Looked up for every update: foldhash
    /// (seeded at random per map, as the broker's tables of peer-chosen ids) rather than SipHash.
    by_prefix: foldhash::HashMap<Bytes, Vec<Slot>>,
    /// The distinct lengths of the prefixes held, ascending, each with how many prefixes have
    /// it: matching looks up only these lengths.
    lengths: Vec<(usize, usize)>,
    conns: Vec<Option<Conn<T>>>,
    free: Vec<Slot>,
    stamp: u64,
    max_topics: usize,
    max_per_connection: usize,
}

impl<T> Subscriptions<T> {
    pub fn new(max_topics: usize, max_per_connection: usize) -> Self {
        Self {
            by_prefix: foldhash::HashMap::new(),
            lengths: Vec::new(),
            conns: Vec::new(),
            free: Vec::new(),
            stamp: 0,
            max_topics,
            max_per_connection,
        }
    }

    /// A new connection, holding nothing yet.
    pub fn join(&mut self, peer: T) -> Slot {
        let conn = Some(Conn {
            peer,
            prefixes: HashMap::new(),
            stamp: 0,
        });
        match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = conn;
                slot
            }
            None => {
                self.conns.push(conn);
                self.conns.len() - 1
            }
        }
    }

    /// The connection's payload.
    pub fn peer(&self, slot: Slot) -> Option<&T> {
        self.conns.get(slot)?.as_ref().map(|c| &c.peer)
    }

    /// Prefixes the connection holds.
    pub fn held_by(&self, slot: Slot) -> usize {
        self.conns
            .get(slot)
            .and_then(Option::as_ref)
            .map_or(0, |c| c.prefixes.len())
    }

    pub fn subscribe(&mut self, slot: Slot, prefix: &[u8]) -> Outcome {
        let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else {
            return Outcome::Unchanged;
        };
        if conn.prefixes.contains_key(prefix) {
            return Outcome::Unchanged;
        }
        if conn.prefixes.len() >= self.max_per_connection {
            return Outcome::ConnectionFull;
        }
        let (key, first) = match self.by_prefix.get_key_value(prefix) {
            Some((key, _)) => (key.clone(), false),
            None if self.len() >= self.max_topics && prefix != HEARTBEAT_TOPIC => {
                return Outcome::TableFull;
            }
            // Copied: a slice would keep the whole read buffer it came in alive.
            None => (Bytes::copy_from_slice(prefix), true),
        };
        if first {
            add_length(&mut self.lengths, key.len());
        }
        let holders = self.by_prefix.entry(key.clone()).or_default();
        let at = holders.len();
        holders.push(slot);
        if let Some(conn) = self.conns[slot].as_mut() {
            conn.prefixes.insert(key, at);
        }
        Outcome::Changed {
            upstream: first && prefix != HEARTBEAT_TOPIC,
        }
    }

    pub fn unsubscribe(&mut self, slot: Slot, prefix: &[u8]) -> Outcome {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return Outcome::Unchanged;
        };
        let Some((key, at)) = conn.prefixes.remove_entry(prefix) else {
            return Outcome::Unchanged;
        };
        let last = self.let_go(slot, &key, at);
        Outcome::Changed {
            upstream: last && prefix != HEARTBEAT_TOPIC,
        }
    }

    /// The connection ended: everything it held is let go. Returns its payload and the
    /// prefixes it was the last to hold, to withdraw upstream.
    pub fn leave(&mut self, slot: Slot) -> Option<(T, Vec<Bytes>)> {
        let conn = self.conns.get_mut(slot)?.take()?;
        self.free.push(slot);
        let mut withdrawn = Vec::new();
        for (prefix, at) in conn.prefixes {
            if self.let_go(slot, &prefix, at) && prefix != HEARTBEAT_TOPIC {
                withdrawn.push(prefix);
            }
        }
        Some((conn.peer, withdrawn))
    }

    /// Takes `slot` out of `prefix`'s holders, where it is at `at`; true if it was the last.
    fn let_go(&mut self, slot: Slot, prefix: &Bytes, at: usize) -> bool {
        let Some(holders) = self.by_prefix.get_mut(prefix) else {
            return false;
        };
        debug_assert_eq!(holders.get(at), Some(&slot));
        holders.swap_remove(at);
        if let Some(&moved) = holders.get(at) {
            // The last holder took its place: tell it where it is now.
            if let Some(pos) = self.conns[moved]
                .as_mut()
                .and_then(|c| c.prefixes.get_mut(prefix))
            {
                *pos = at;
            }
        }
        if !holders.is_empty() {
            return false;
        }
        self.by_prefix.remove(prefix);
        remove_length(&mut self.lengths, prefix.len());
        true
    }

    /// The connections holding a prefix of `topic`, each once, appended to `out`.
    pub fn matching(&mut self, topic: &[u8], out: &mut Vec<Slot>) {
        self.stamp += 1;
        let stamp = self.stamp;
        for &(len, _) in &self.lengths {
            if len > topic.len() {
                break;
            }
            let Some(holders) = self.by_prefix.get(&topic[..len]) else {
                continue;
            };
            for &slot in holders {
                if let Some(conn) = self.conns[slot].as_mut() {
                    if conn.stamp != stamp {
                        conn.stamp = stamp;
                        out.push(slot);
                    }
                }
            }
        }
    }

    /// Connections holding exactly `prefix`.
    pub fn count(&self, prefix: &[u8]) -> u64 {
        self.by_prefix.get(prefix).map_or(0, |h| h.len() as u64)
    }

    fn holds_heartbeat(&self) -> bool {
        self.by_prefix.contains_key(HEARTBEAT_TOPIC)
    }

    /// Prefixes asked for upstream (the heartbeat topic is not).
    pub fn len(&self) -> usize {
        self.by_prefix.len() - usize::from(self.holds_heartbeat())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `limit` prefixes asked for upstream, in order, with their counts, for stats.
    pub fn snapshot(&self, limit: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(&Bytes, usize)> = self
            .by_prefix
            .iter()
            .filter(|(p, _)| p.as_ref() != HEARTBEAT_TOPIC)
            .map(|(p, h)| (p, h.len()))
            .collect();
        if all.len() > limit {
            all.select_nth_unstable(limit);
            all.truncate(limit);
        }
        all.sort_unstable();
        all.into_iter()
            .map(|(p, n)| (String::from_utf8_lossy(p).into_owned(), n as u64))
            .collect()
    }
}

fn add_length(lengths: &mut Vec<(usize, usize)>, len: usize) {
    match lengths.binary_search_by_key(&len, |&(l, _)| l) {
        Ok(i) => lengths[i].1 += 1,
        Err(i) => lengths.insert(i, (len, 1)),
    }
}

fn remove_length(lengths: &mut Vec<(usize, usize)>, len: usize) {
    if let Ok(i) = lengths.binary_search_by_key(&len, |&(l, _)| l) {
        lengths[i].1 -= 1;
        if lengths[i].1 == 0 {
            lengths.remove(i);
        }
    }
}

/// Subscription changes on their way upstream, coalesced per prefix: the fanout pushes each
/// change it counts, the task that owns the XSUB takes them. A subscribe and an unsubscribe of
/// the same prefix not yet taken cancel out; nothing is ever dropped, and at most one change
/// per prefix waits (the fanout never waits on the intake, and the intake never falls behind
/// by more than the table's size).
#[derive(Debug, Default)]
pub struct Pending {
    /// Per prefix, the net change to send (+1 subscribe, -1 unsubscribe), in first-pushed
    /// order.
    changes: Mutex<(HashMap<Bytes, i8>, VecDeque<Bytes>)>,
    ready: Notify,
}

impl Pending {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one change to forward.
    pub fn push(&self, prefix: Bytes, subscribe: bool) {
        let mut guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let (net, order) = &mut *guard;
        let delta = if subscribe { 1 } else { -1 };
        match net.get_mut(&prefix) {
            Some(n) => *n += delta,
            None => {
                net.insert(prefix.clone(), delta);
                order.push_back(prefix);
            }
        }
        drop(guard);
        self.ready.notify_one();
    }

    /// Waits until changes may be waiting (cancel-safe).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Up to `max` changes to send, oldest first; if more wait, [`Pending::ready`] fires again.
    pub fn take(&self, max: usize) -> Vec<Subscription> {
        let mut guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let (net, order) = &mut *guard;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(prefix) = order.pop_front() else {
                break;
            };
            match net.remove(&prefix) {
                Some(1) => out.push(Subscription::Subscribe(prefix)),
                Some(-1) => out.push(Subscription::Unsubscribe(prefix)),
                // Cancelled out while waiting.
                _ => {}
            }
        }
        let more = !order.is_empty();
        drop(guard);
        if more {
            self.ready.notify_one();
        }
        out
    }

    /// Changes taken but not sent after all (never attempted): back at the front, coalesced
    /// with any pushed since.
    pub fn put_back(&self, changes: Vec<Subscription>) {
        let mut guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let (net, order) = &mut *guard;
        for change in changes.into_iter().rev() {
            let (prefix, delta) = match change {
                Subscription::Subscribe(p) => (p, 1),
                Subscription::Unsubscribe(p) => (p, -1),
            };
            match net.get_mut(&prefix) {
                Some(n) => *n += delta,
                None => {
                    net.insert(prefix.clone(), delta);
                    order.push_front(prefix);
                }
            }
        }
    }

    /// Changes waiting.
    pub fn len(&self) -> usize {
        let guard = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.values().filter(|&&n| n != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(upstream: bool) -> Outcome {
        Outcome::Changed { upstream }
    }

    fn matching<T>(s: &mut Subscriptions<T>, topic: &[u8]) -> Vec<Slot> {
        let mut out = Vec::new();
        s.matching(topic, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn first_in_and_last_out_go_upstream() {
        let mut s = Subscriptions::<()>::new(10, 10);
        let (a, b) = (s.join(()), s.join(()));
        assert_eq!(s.subscribe(a, b"10001"), changed(true));
        assert_eq!(s.subscribe(b, b"10001"), changed(false));
        assert_eq!(s.count(b"10001"), 2);
        // One of two leaves: the other keeps the topic.
        assert_eq!(s.unsubscribe(a, b"10001"), changed(false));
        assert_eq!(s.unsubscribe(a, b"10001"), Outcome::Unchanged);
        assert_eq!(s.unsubscribe(b, b"10001"), changed(true));
        assert!(s.is_empty());
    }

    #[test]
    fn a_connection_holds_a_set() {
        let mut s = Subscriptions::<()>::new(10, 10);
        let a = s.join(());
        assert_eq!(s.subscribe(a, b"10001"), changed(true));
        assert_eq!(s.subscribe(a, b"10001"), Outcome::Unchanged);
        assert_eq!(s.count(b"10001"), 1);
        assert_eq!(s.unsubscribe(a, b"10001"), changed(true));
        assert!(matching(&mut s, b"10001").is_empty());
    }

    #[test]
    fn an_unsubscribe_counts_only_for_what_that_connection_holds() {
        let mut s = Subscriptions::<()>::new(10, 10);
        let (victim, rogue) = (s.join(()), s.join(()));
        s.subscribe(victim, b"10001");
        assert_eq!(s.unsubscribe(rogue, b"10001"), Outcome::Unchanged);
        assert_eq!(s.count(b"10001"), 1);
        assert_eq!(matching(&mut s, b"10001"), vec![victim]);
    }

    #[test]
    fn leaving_releases_everything_held() {
        let mut s = Subscriptions::new(100, 100);
        let (a, b) = (s.join("a"), s.join("b"));
        for p in ["1", "2", "3"] {
            s.subscribe(a, p.as_bytes());
        }
        s.subscribe(a, HEARTBEAT_TOPIC);
        s.subscribe(b, b"2");
        let (peer, mut withdrawn) = s.leave(a).expect("joined");
        withdrawn.sort();
        assert_eq!(peer, "a");
        assert_eq!(withdrawn, vec![Bytes::from("1"), Bytes::from("3")]);
        assert_eq!(s.snapshot(10), vec![("2".to_string(), 1)]);
        assert!(s.leave(a).is_none(), "once");
        // The slot is reused, empty.
        let c = s.join("c");
        assert_eq!((c, s.held_by(c)), (a, 0));
        assert_eq!(s.peer(c), Some(&"c"));
    }

    #[test]
    fn matching_delivers_once_per_connection_without_a_scan() {
        let mut s = Subscriptions::<()>::new(1000, 1000);
        let (a, b, c) = (s.join(()), s.join(()), s.join(()));
        s.subscribe(a, b"");
        s.subscribe(a, b"1");
        s.subscribe(a, b"10001");
        s.subscribe(b, b"10001");
        s.subscribe(c, HEARTBEAT_TOPIC);
        for i in 0..500 {
            s.subscribe(c, format!("x{i}").as_bytes());
        }
        assert_eq!(matching(&mut s, b"10001"), vec![a, b]);
        assert_eq!(matching(&mut s, b"10002"), vec![a]);
        assert_eq!(matching(&mut s, b"~hb"), vec![a, c]);
        assert_eq!(matching(&mut s, b"x42"), vec![a, c]);
        // Lengths held: 0, 1, 2, 3, 4, 5 ("x0".."x499", "~hb", "10001").
        assert_eq!(s.lengths.len(), 6);
        s.leave(c);
        assert_eq!(s.lengths.len(), 3);
    }

    #[test]
    fn positions_follow_swaps() {
        let mut s = Subscriptions::<()>::new(10, 10);
        let slots: Vec<Slot> = (0..5).map(|_| s.join(())).collect();
        for &slot in &slots {
            s.subscribe(slot, b"10001");
        }
        // Removing from the middle moves the last holder: it must still be able to leave.
        s.unsubscribe(slots[1], b"10001");
        s.leave(slots[4]);
        s.unsubscribe(slots[0], b"10001");
        assert_eq!(matching(&mut s, b"10001"), vec![slots[2], slots[3]]);
        s.leave(slots[2]);
        assert_eq!(s.unsubscribe(slots[3], b"10001"), changed(true));
        assert!(s.by_prefix.is_empty() && s.lengths.is_empty());
    }

    #[test]
    fn heartbeat_topic_stays_local() {
        let mut s = Subscriptions::<()>::new(1, 10);
        let a = s.join(());
        assert_eq!(s.subscribe(a, HEARTBEAT_TOPIC), changed(false));
        assert_eq!(
            s.subscribe(a, b"1"),
            changed(true),
            "not counted in the table"
        );
        assert_eq!(s.unsubscribe(a, HEARTBEAT_TOPIC), changed(false));
        assert_eq!(s.len(), 1);
        assert_eq!(s.snapshot(10), vec![("1".to_string(), 1)]);
    }

    #[test]
    fn table_and_connections_are_bounded() {
        let mut s = Subscriptions::<()>::new(2, 3);
        let (a, b) = (s.join(()), s.join(()));
        assert_eq!(s.subscribe(a, b"1"), changed(true));
        assert_eq!(s.subscribe(a, b"2"), changed(true));
        assert_eq!(s.subscribe(a, b"3"), Outcome::TableFull);
        assert_eq!(s.subscribe(b, b"1"), changed(false), "held already");
        assert_eq!(s.subscribe(a, HEARTBEAT_TOPIC), changed(false));
        assert_eq!(s.subscribe(a, b"4"), Outcome::ConnectionFull);
        assert_eq!((s.len(), s.held_by(a)), (2, 3));
        // A refused prefix is not held: nothing to deliver.
        assert!(matching(&mut s, b"3").is_empty());
        s.leave(a);
        assert_eq!(s.subscribe(b, b"3"), changed(true));
    }

    #[test]
    fn a_prefix_is_copied_out_of_its_buffer() {
        let mut s = Subscriptions::<()>::new(10, 10);
        let a = s.join(());
        let buffer = Bytes::from(vec![b'7'; 4096]);
        s.subscribe(a, &buffer.slice(..5));
        let (key, _) = s.by_prefix.iter().next().expect("held");
        assert_eq!(key.len(), 5);
        assert!(buffer.is_unique(), "the read buffer is not kept");
    }

    #[test]
    fn snapshot_is_bounded_and_sorted() {
        let mut s = Subscriptions::<()>::new(100, 100);
        let a = s.join(());
        for i in (0..50).rev() {
            s.subscribe(a, format!("{i:02}").as_bytes());
        }
        let first = s.snapshot(3);
        assert_eq!(
            first,
            vec![
                ("00".to_string(), 1),
                ("01".to_string(), 1),
                ("02".to_string(), 1)
            ]
        );
        assert_eq!(s.snapshot(100).len(), 50);
    }

    #[test]
    fn pending_changes_coalesce_and_are_never_lost() {
        let p = Pending::new();
        for i in 0..5000 {
            p.push(Bytes::from(format!("p{i}")), true);
        }
        p.push(Bytes::from("p7"), false); // subscribed and withdrawn before it went: nothing
        p.push(Bytes::from("q"), false);
        p.push(Bytes::from("q"), true); // withdrawn and subscribed again: nothing
        p.push(Bytes::from("r"), false);
        assert_eq!(p.len(), 5000);
        let mut all = Vec::new();
        loop {
            let batch = p.take(1024);
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 1024);
            all.extend(batch);
        }
        assert_eq!(all.len(), 5000);
        assert_eq!(all[0], Subscription::Subscribe(Bytes::from("p0")));
        assert!(!all.contains(&Subscription::Subscribe(Bytes::from("p7"))));
        assert_eq!(
            all.last(),
            Some(&Subscription::Unsubscribe(Bytes::from("r")))
        );
        assert!(p.is_empty());
    }

    #[test]
    fn changes_put_back_go_first_and_coalesce() {
        let p = Pending::new();
        for prefix in ["a", "b", "c"] {
            p.push(Bytes::from(prefix), true);
        }
        let taken = p.take(10);
        p.push(Bytes::from("c"), false); // withdrawn before it went: nothing to send
        p.push(Bytes::from("d"), true);
        p.put_back(taken[1..].to_vec());
        assert_eq!(
            p.take(10),
            vec![
                Subscription::Subscribe(Bytes::from("b")),
                Subscription::Subscribe(Bytes::from("d")),
            ]
        );
    }

    #[tokio::test]
    async fn pending_wakes_the_taker() {
        let p = std::sync::Arc::new(Pending::new());
        let taker = {
            let p = p.clone();
            tokio::spawn(async move {
                p.ready().await;
                p.take(10)
            })
        };
        tokio::task::yield_now().await;
        p.push(Bytes::from("10001"), true);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), taker)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(got, vec![Subscription::Subscribe(Bytes::from("10001"))]);
    }
}
