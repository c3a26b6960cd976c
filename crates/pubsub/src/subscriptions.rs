//! Counted subscriptions: what the proxy asks its publishers for.
//!
//! zmq.rs's XPUB hands every subscribe and unsubscribe to the application, one per subscriber
//! and without counting, while the XSUB upstream keeps a set: forwarding one subscriber's
//! unsubscribe would cut the topic off for every other subscriber of it. So the proxy counts:
//! a prefix goes upstream on its first subscribe and is withdrawn on its last unsubscribe.
//! The proxy's own heartbeat topic is never forwarded. At most `max_topics` prefixes are held;
//! a subscribe to a new prefix beyond that is refused (not forwarded) and counted.

use std::collections::HashMap;

use bytes::Bytes;

use crate::protocol::{Subscription, HEARTBEAT_TOPIC};

/// What the proxy does with one subscription message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Forward this upstream (first subscriber, or last one gone).
    Upstream(Subscription),
    /// Counted; nothing to forward.
    Counted,
    /// The heartbeat topic: served by the proxy itself.
    Local,
    /// A new prefix while the table is full: not forwarded.
    Refused,
    /// An unsubscribe for a prefix nobody subscribed: ignored.
    Unknown,
}

/// Subscriber counts per prefix.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    counts: HashMap<Bytes, u64>,
    max_topics: usize,
}

impl Subscriptions {
    pub fn new(max_topics: usize) -> Self {
        Self {
            counts: HashMap::new(),
            max_topics,
        }
    }

    pub fn apply(&mut self, sub: &Subscription) -> Change {
        let prefix = sub.prefix();
        if prefix.as_ref() == HEARTBEAT_TOPIC {
            return Change::Local;
        }
        let full = self.counts.len() >= self.max_topics;
        match sub {
            Subscription::Subscribe(_) => match self.counts.get_mut(prefix) {
                Some(n) => {
                    *n += 1;
                    Change::Counted
                }
                None if full => Change::Refused,
                None => {
                    self.counts.insert(prefix.clone(), 1);
                    Change::Upstream(sub.clone())
                }
            },
            Subscription::Unsubscribe(_) | Subscription::Release { .. } => {
                match self.counts.get_mut(prefix) {
                    None => Change::Unknown,
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        Change::Counted
                    }
                    Some(_) => {
                        self.counts.remove(prefix);
                        Change::Upstream(Subscription::Unsubscribe(prefix.clone()))
                    }
                }
            }
        }
    }

    /// Subscribers counted for `prefix`.
    pub fn count(&self, prefix: &[u8]) -> u64 {
        self.counts.get(prefix).copied().unwrap_or(0)
    }

    /// Prefixes currently asked for upstream.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Every prefix and its count, sorted, for stats.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .counts
            .iter()
            .map(|(p, n)| (String::from_utf8_lossy(p).into_owned(), *n))
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: &'static str) -> Subscription {
        Subscription::Subscribe(Bytes::from_static(p.as_bytes()))
    }

    fn unsub(p: &'static str) -> Subscription {
        Subscription::Unsubscribe(Bytes::from_static(p.as_bytes()))
    }

    #[test]
    fn first_in_and_last_out_go_upstream() {
        let mut s = Subscriptions::new(10);
        assert_eq!(s.apply(&sub("10001")), Change::Upstream(sub("10001")));
        assert_eq!(s.apply(&sub("10001")), Change::Counted);
        assert_eq!(s.count(b"10001"), 2);
        // One of two leaves: the other keeps the topic.
        assert_eq!(s.apply(&unsub("10001")), Change::Counted);
        assert_eq!(s.apply(&unsub("10001")), Change::Upstream(unsub("10001")));
        assert_eq!(s.apply(&unsub("10001")), Change::Unknown);
        assert!(s.is_empty());
    }

    #[test]
    fn a_release_counts_out_like_an_unsubscribe() {
        let mut s = Subscriptions::new(10);
        s.apply(&sub("10001"));
        s.apply(&sub("10001"));
        let release = |p: &'static str| Subscription::Release {
            proxy: 1,
            prefix: Bytes::from_static(p.as_bytes()),
        };
        assert_eq!(s.apply(&release("10001")), Change::Counted);
        assert_eq!(s.apply(&release("10001")), Change::Upstream(unsub("10001")));
    }

    #[test]
    fn heartbeat_topic_stays_local() {
        let mut s = Subscriptions::new(10);
        assert_eq!(s.apply(&sub("~hb")), Change::Local);
        assert_eq!(s.apply(&unsub("~hb")), Change::Local);
        assert!(s.is_empty());
    }

    #[test]
    fn table_is_bounded() {
        let mut s = Subscriptions::new(1);
        assert!(matches!(s.apply(&sub("1")), Change::Upstream(_)));
        assert_eq!(s.apply(&sub("2")), Change::Refused);
        assert_eq!(s.apply(&sub("1")), Change::Counted);
        assert_eq!(s.len(), 1);
        assert_eq!(s.snapshot(), vec![("1".to_string(), 2)]);
    }
}
