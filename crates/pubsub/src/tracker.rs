//! Gap and duplicate accounting on the subscriber side, from the sequence numbers.
//!
//! Each (publisher, zip) is a stream numbered 1, 2, 3... by the publisher; ZeroMQ keeps the
//! order of one stream, so a number below or equal to the last one seen is a duplicate (a
//! re-sent last value) and a jump is a gap of exactly the numbers skipped. A new publisher
//! instance (the publisher restarted) starts the stream afresh. Updates before the first one
//! seen are not gaps: a late joiner missed nothing it asked for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::protocol::{Update, Zip};

/// Streams tracked at most: a subscriber fed by ever new publisher names stays bounded. Updates
/// of streams beyond it are shown but not accounted for.
pub const MAX_STREAMS: usize = 100_000;

/// What one update was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen before; `missed` updates of its stream were skipped just before it.
    New { missed: u64 },
    /// Seen already (or from an instance that has since restarted): not shown again.
    Duplicate,
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
    pub duplicates: u64,
    /// Times the publisher was seen to restart (new instance).
    pub restarts: u64,
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
    duplicates: u64,
}

/// All streams seen by one subscriber.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    streams: BTreeMap<(String, Zip), Stream>,
}

impl Tracker {
    pub fn on_update(&mut self, u: &Update) -> Seen {
        let key = (u.publisher.clone(), u.zip);
        let Some(s) = self.streams.get_mut(&key) else {
            if self.streams.len() >= MAX_STREAMS {
                return Seen::New { missed: 0 };
            }
            self.streams.insert(
                key,
                Stream {
                    instance: u.instance,
                    retired: Vec::new(),
                    first: u.seq,
                    last: u.seq,
                    received: 1,
                    gaps: 0,
                    duplicates: 0,
                },
            );
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
            return Seen::New { missed: 0 };
        }
        if u.seq <= s.last {
            s.duplicates += 1;
            return Seen::Duplicate;
        }
        let missed = u.seq - s.last - 1;
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
                duplicates: s.duplicates,
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

    #[test]
    fn the_number_of_streams_is_bounded() {
        let mut t = Tracker::default();
        for i in 0..=MAX_STREAMS {
            t.on_update(&u(&format!("p{i}"), 1, 1));
        }
        assert_eq!(t.summaries().len(), MAX_STREAMS);
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
