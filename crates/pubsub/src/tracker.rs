//! Gap and duplicate accounting on the subscriber side, from the sequence numbers.
//!
//! Each (publisher, zip) is a stream numbered 1, 2, 3... by the publisher. ZeroMQ keeps the
//! order of one connection, so a jump is a gap of exactly the numbers skipped, and a number
//! below or equal to the last one seen is either a duplicate (a re-sent last value) or *late*:
//! one of the numbers skipped, arriving after all. That happens across a publisher's
//! reconnection: what it wrote into the old connection (held by a partition, say) can reach
//! the proxy after what it writes into the new one. A late update fills its gap and counts as
//! received, but is not shown (the subscriber has a newer value). The last [`MAX_MISSED`]
//! gaps of each stream are remembered for this; an older one stays a gap and its late numbers
//! count as duplicates. A new publisher instance (the publisher restarted) starts the stream
//! afresh. Updates before the first one seen are not gaps: a late joiner missed nothing it
//! asked for.
//!
//! A subscriber of a proxy pair gets every update twice, once through each proxy (its
//! *links*, numbered from 0). Each stream keeps the last number that came through each link:
//! a number already seen that is new on its link is the other proxy's copy, *redundant*
//! (dropped, counted apart, neither a duplicate nor a gap); one its link brought already is a
//! duplicate, as with one proxy. With one link, the last number of the link is the stream's,
//! so nothing is ever redundant and the accounting is the same as before.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::protocol::{Update, Zip};

/// Streams tracked at most: a subscriber fed by ever new publisher names stays bounded. Updates
/// of streams beyond it are shown but not accounted for.
pub const MAX_STREAMS: usize = 100_000;
/// Gaps remembered per stream, so that their numbers arriving late are told from duplicates.
pub const MAX_MISSED: usize = 64;
/// Links (proxies) told apart per stream; a link beyond is counted as the last one.
pub const MAX_LINKS: usize = 2;

/// What one update was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen before; `missed` updates of its stream were skipped just before it.
    New { missed: u64 },
    /// One of the numbers skipped before, arriving after a newer one: it fills its gap, and
    /// is not shown (it is older than what was).
    Late,
    /// Seen already (or from an instance that has since restarted): not shown again.
    Duplicate,
    /// Seen already through another link (the other proxy of a pair was first): not shown
    /// again, not a duplicate.
    Redundant,
}

/// One stream's figures, as the subscriber's JSON summary shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    pub publisher: String,
    pub zip: String,
    /// The current instance of the publisher (hex).
    pub instance: String,
    /// First and last sequence numbers seen of the current instance.
    pub first: u64,
    pub last: u64,
    pub received: u64,
    pub gaps: u64,
    /// Of the numbers skipped, those that came after all (counted in `received`, not in `gaps`).
    #[serde(default)]
    pub late: u64,
    pub duplicates: u64,
    /// Copies that came through the other proxy of a pair after the first (dropped).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redundant: u64,
    /// Times the publisher was seen to restart (new instance).
    pub restarts: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone)]
struct Stream {
    instance: u64,
    /// Earlier instances: their late updates are duplicates, not a restart.
    retired: Vec<u64>,
    first: u64,
    last: u64,
    received: u64,
    gaps: u64,
    late: u64,
    duplicates: u64,
    redundant: u64,
    /// The highest number of the current instance that came through each link (0: none).
    via: [u64; MAX_LINKS],
    /// The last gaps (first and last number skipped), oldest first.
    missed: VecDeque<(u64, u64)>,
}

impl Stream {
    fn new(instance: u64, seq: u64, link: usize) -> Self {
        let mut via = [0; MAX_LINKS];
        via[link] = seq;
        Self {
            instance,
            retired: Vec::new(),
            first: seq,
            last: seq,
            received: 1,
            gaps: 0,
            late: 0,
            duplicates: 0,
            redundant: 0,
            via,
            missed: VecDeque::new(),
        }
    }

    /// Takes `seq` out of the remembered gaps, if it is in one.
    fn fill(&mut self, seq: u64) -> bool {
        let Some(i) = self.missed.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return false;
        };
        let (a, b) = self.missed[i];
        match (seq == a, seq == b) {
            (true, true) => {
                self.missed.remove(i);
            }
            (true, false) => self.missed[i].0 = seq + 1,
            (false, true) => self.missed[i].1 = seq - 1,
            (false, false) => {
                self.missed[i].1 = seq - 1;
                self.missed.insert(i + 1, (seq + 1, b));
                if self.missed.len() > MAX_MISSED {
                    self.missed.pop_front();
                }
            }
        }
        true
    }
}

/// All streams seen by one subscriber.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    streams: BTreeMap<(String, Zip), Stream>,
}

impl Tracker {
    /// An update of a single proxy (link 0).
    pub fn on_update(&mut self, u: &Update) -> Seen {
        self.on_update_via(u, 0)
    }

    /// An update that came through `link` (0 or 1: the proxies of a pair).
    pub fn on_update_via(&mut self, u: &Update, link: usize) -> Seen {
        let link = link.min(MAX_LINKS - 1);
        let key = (u.publisher.clone(), u.zip);
        let Some(s) = self.streams.get_mut(&key) else {
            if self.streams.len() >= MAX_STREAMS {
                return Seen::New { missed: 0 };
            }
            self.streams
                .insert(key, Stream::new(u.instance, u.seq, link));
            return Seen::New { missed: 0 };
        };
        if u.instance != s.instance {
            if s.retired.contains(&u.instance) {
                s.duplicates += 1;
                return Seen::Duplicate;
            }
            s.retired.push(s.instance);
            if s.retired.len() > 16 {
                s.retired.remove(0);
            }
            s.instance = u.instance;
            s.first = u.seq;
            s.last = u.seq;
            s.received += 1;
            s.missed.clear();
            s.via = [0; MAX_LINKS];
            s.via[link] = u.seq;
            return Seen::New { missed: 0 };
        }
        let via = &mut s.via[link];
        let new_on_link = u.seq > *via;
        *via = (*via).max(u.seq);
        if u.seq <= s.last {
            if s.fill(u.seq) {
                s.gaps -= 1;
                s.late += 1;
                s.received += 1;
                return Seen::Late;
            }
            if new_on_link {
                s.redundant += 1;
                return Seen::Redundant;
            }
            s.duplicates += 1;
            return Seen::Duplicate;
        }
        let missed = u.seq - s.last - 1;
        if missed > 0 {
            s.missed.push_back((s.last + 1, u.seq - 1));
            if s.missed.len() > MAX_MISSED {
                s.missed.pop_front();
            }
        }
        s.gaps += missed;
        s.last = u.seq;
        s.received += 1;
        Seen::New { missed }
    }

    pub fn gaps(&self) -> u64 {
        self.streams.values().map(|s| s.gaps).sum()
    }

    pub fn duplicates(&self) -> u64 {
        self.streams.values().map(|s| s.duplicates).sum()
    }

    pub fn late(&self) -> u64 {
        self.streams.values().map(|s| s.late).sum()
    }

    pub fn redundant(&self) -> u64 {
        self.streams.values().map(|s| s.redundant).sum()
    }

    pub fn summaries(&self) -> Vec<StreamSummary> {
        self.streams
            .iter()
            .map(|((publisher, zip), s)| StreamSummary {
                publisher: publisher.clone(),
                zip: zip.to_string(),
                instance: format!("{:x}", s.instance),
                first: s.first,
                last: s.last,
                received: s.received,
                gaps: s.gaps,
                late: s.late,
                duplicates: s.duplicates,
                redundant: s.redundant,
                restarts: s.retired.len() as u64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(publisher: &str, instance: u64, seq: u64) -> Update {
        Update {
            zip: Zip::new(10001).expect("zip"),
            publisher: publisher.into(),
            instance,
            seq,
            temperature: 1,
            humidity: 2,
        }
    }

    #[test]
    fn counts_gaps_and_duplicates_per_stream() {
        let mut t = Tracker::default();
        assert_eq!(t.on_update(&u("a", 1, 5)), Seen::New { missed: 0 });
        assert_eq!(t.on_update(&u("a", 1, 6)), Seen::New { missed: 0 });
        assert_eq!(t.on_update(&u("a", 1, 10)), Seen::New { missed: 3 });
        assert_eq!(t.on_update(&u("a", 1, 10)), Seen::Duplicate);
        assert_eq!(t.on_update(&u("b", 1, 1)), Seen::New { missed: 0 });
        assert_eq!((t.gaps(), t.duplicates()), (3, 1));
        let s = &t.summaries()[0];
        assert_eq!((s.first, s.last, s.received, s.gaps), (5, 10, 3, 3));
        // received + gaps covers first..=last exactly.
        assert_eq!(s.received + s.gaps, s.last - s.first + 1);
    }

    /// Numbers skipped that come after all fill their gap once; a second copy is a duplicate.
    #[test]
    fn late_numbers_fill_their_gaps() {
        let mut t = Tracker::default();
        t.on_update(&u("a", 1, 1));
        assert_eq!(t.on_update(&u("a", 1, 10)), Seen::New { missed: 8 });
        assert_eq!(t.on_update(&u("a", 1, 5)), Seen::Late);
        assert_eq!(t.on_update(&u("a", 1, 2)), Seen::Late);
        assert_eq!(t.on_update(&u("a", 1, 9)), Seen::Late);
        assert_eq!(t.on_update(&u("a", 1, 5)), Seen::Duplicate);
        assert_eq!(t.on_update(&u("a", 1, 10)), Seen::Duplicate);
        assert_eq!((t.gaps(), t.late(), t.duplicates()), (5, 3, 2));
        let s = &t.summaries()[0];
        assert_eq!(s.received + s.gaps, s.last - s.first + 1);
        for seq in [3, 4, 6, 7, 8] {
            assert_eq!(t.on_update(&u("a", 1, seq)), Seen::Late, "{seq}");
        }
        assert_eq!((t.gaps(), t.late()), (0, 8));
        assert_eq!(t.on_update(&u("a", 1, 11)), Seen::New { missed: 0 });
    }

    /// Only the last `MAX_MISSED` gaps are remembered: a number of an older one is a duplicate.
    #[test]
    fn only_the_last_gaps_are_remembered() {
        let mut t = Tracker::default();
        t.on_update(&u("a", 1, 1));
        for i in 1..=(MAX_MISSED as u64 + 1) {
            t.on_update(&u("a", 1, 1 + 2 * i));
        }
        assert_eq!(
            t.on_update(&u("a", 1, 2)),
            Seen::Duplicate,
            "the oldest gap is forgotten"
        );
        assert_eq!(t.on_update(&u("a", 1, 4)), Seen::Late);
    }

    #[test]
    fn the_number_of_streams_is_bounded() {
        let mut t = Tracker::default();
        for i in 0..=MAX_STREAMS {
            t.on_update(&u(&format!("p{i}"), 1, 1));
        }
        assert_eq!(t.summaries().len(), MAX_STREAMS);
    }

    fn via(t: &mut Tracker, seq: u64, link: usize) -> Seen {
        t.on_update_via(&u("a", 1, seq), link)
    }

    /// Through a pair, the second copy of each number is redundant, whichever proxy is ahead;
    /// a copy a link brought twice is still a duplicate; a number the leading proxy lost and
    /// the other brought fills its gap.
    #[test]
    fn the_other_proxys_copies_are_redundant() {
        let mut t = Tracker::default();
        assert_eq!(via(&mut t, 1, 0), Seen::New { missed: 0 });
        assert_eq!(via(&mut t, 1, 1), Seen::Redundant);
        assert_eq!(via(&mut t, 2, 1), Seen::New { missed: 0 });
        assert_eq!(via(&mut t, 3, 1), Seen::New { missed: 0 });
        assert_eq!(via(&mut t, 2, 0), Seen::Redundant);
        assert_eq!(via(&mut t, 3, 0), Seen::Redundant);
        // A re-sent last value on link 0: a duplicate, as with one proxy.
        assert_eq!(via(&mut t, 3, 0), Seen::Duplicate);
        // Link 0 skips 4 (lost there), link 1 brings it after.
        assert_eq!(via(&mut t, 5, 0), Seen::New { missed: 1 });
        assert_eq!(via(&mut t, 4, 1), Seen::Late);
        assert_eq!(via(&mut t, 5, 1), Seen::Redundant);
        // Link 0 gone for good: link 1 alone carries on.
        assert_eq!(via(&mut t, 6, 1), Seen::New { missed: 0 });
        assert_eq!(
            (t.gaps(), t.duplicates(), t.redundant(), t.late()),
            (0, 1, 4, 1)
        );
        let s = &t.summaries()[0];
        assert_eq!(s.received + s.gaps, s.last - s.first + 1);
    }

    #[test]
    fn a_restarted_publisher_starts_a_new_stream() {
        let mut t = Tracker::default();
        t.on_update(&u("a", 1, 100));
        assert_eq!(t.on_update(&u("a", 2, 1)), Seen::New { missed: 0 });
        assert_eq!(t.on_update(&u("a", 1, 101)), Seen::Duplicate);
        assert_eq!(t.gaps(), 0);
        assert_eq!(t.summaries()[0].restarts, 1);
    }
}
