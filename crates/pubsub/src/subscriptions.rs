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

use std::collections::HashMap;

use bytes::Bytes;
use foldhash::HashMapExt;

use crate::protocol::HEARTBEAT_TOPIC;

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
    /// Every connection's payload.
    pub fn peers(&self) -> impl Iterator<Item = &T> {
        self.conns.iter().flatten().map(|c| &c.peer)
    }

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
}
