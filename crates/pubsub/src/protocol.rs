//! Frames of the weather pub/sub, as typed values. Pure: no sockets, unit-tested.
//!
//! An update is two frames, `[zip][body]`: the zip as five ASCII digits (zero-padded, so a stock
//! SUB subscribing to `"10001"` gets exactly that zip), then the body as ASCII text,
//! `"<publisher> <instance> <seq> <temperature> <humidity>"`. `instance` (hex) changes each time
//! a publisher starts, `seq` counts from 1 per (publisher, zip): a subscriber can prove gaps
//! and duplicates. The proxy heartbeats on a topic of its own, `[~hb][<proxy instance>]`,
//! which no zip prefix matches. Subscriptions travel upstream as one frame: `0x01` + prefix to
//! subscribe, `0x00` + prefix to unsubscribe (ZMTP 3.0, as libzmq sends them). (Until
//! subscriptions belonged to their connection at the proxy, our subscribers also sent a
//! RELEASE, `0x02`, for a lost connection's subscriptions; a connection's end releases them now,
//! and `0x02` is refused like any other first byte.)

use std::fmt;

use bytes::Bytes;
use zeromq::ZmqMessage;

/// The proxy's heartbeat topic: subscribers of ours subscribe to it, zip filters never match it.
pub const HEARTBEAT_TOPIC: &[u8] = b"~hb";

/// Highest zip code (five digits).
pub const MAX_ZIP: u32 = 99_999;

/// Why frames were refused; logged with the peer and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("expected {expected} frames, got {got}")]
    Frames { expected: usize, got: usize },
    #[error("empty subscription frame")]
    EmptySubscription,
    #[error("subscription frame starts with {0:#04x}, not 0x00 or 0x01")]
    SubscriptionKind(u8),
    #[error("topic {0:?} is not a five-digit zip")]
    Topic(String),
    #[error("body is not `publisher instance seq temperature humidity`: {0:?}")]
    Body(String),
    #[error("heartbeat body is not a hex proxy instance: {0:?}")]
    Heartbeat(String),
}

/// Why a zip list given by a user cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadZips {
    #[error("{0:?} is not a zip code (0 to 99999)")]
    Zip(String),
    #[error("{0:?} is not a range A-B with A <= B")]
    Range(String),
    #[error("no zip codes given")]
    Empty,
}

/// A zip code, the topic of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Zip(u32);

impl Zip {
    pub fn new(code: u32) -> Option<Self> {
        (code <= MAX_ZIP).then_some(Self(code))
    }

    pub fn code(self) -> u32 {
        self.0
    }

    /// The topic frame (and the subscription prefix): five digits.
    pub fn topic(self) -> Bytes {
        Bytes::from(self.to_string())
    }

    /// Parses a topic frame: exactly five ASCII digits.
    pub fn from_topic(frame: &[u8]) -> Result<Self, Malformed> {
        let bad = || Malformed::Topic(String::from_utf8_lossy(frame).into_owned());
        if frame.len() != 5 || !frame.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        let text = std::str::from_utf8(frame).map_err(|_| bad())?;
        text.parse().ok().and_then(Self::new).ok_or_else(bad)
    }
}

impl fmt::Display for Zip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:05}", self.0)
    }
}

impl std::str::FromStr for Zip {
    type Err = BadZips;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse()
            .ok()
            .and_then(Zip::new)
            .ok_or_else(|| BadZips::Zip(s.to_string()))
    }
}

/// Parses `10001,10002` (a list) for clap.
pub fn parse_zip_list(text: &str) -> Result<Vec<Zip>, BadZips> {
    let zips = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Zip>, _>>()?;
    if zips.is_empty() {
        return Err(BadZips::Empty);
    }
    Ok(zips)
}

/// Parses `10000-10009` (an inclusive range) for clap.
pub fn parse_zip_range(text: &str) -> Result<Vec<Zip>, BadZips> {
    let bad = || BadZips::Range(text.to_string());
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (a, b): (Zip, Zip) = (a.parse()?, b.parse()?);
    if a > b {
        return Err(bad());
    }
    Ok((a.code()..=b.code()).filter_map(Zip::new).collect())
}

/// One weather update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub zip: Zip,
    /// The publisher's name (`--id`), no spaces.
    pub publisher: String,
    /// Changes each time the publisher process starts.
    pub instance: u64,
    /// 1, 2, 3... per (publisher, zip).
    pub seq: u64,
    /// Degrees (Fahrenheit in the Guide's example; any unit here).
    pub temperature: i32,
    /// Relative humidity, percent.
    pub humidity: u32,
}

impl Update {
    pub fn to_message(&self) -> ZmqMessage {
        let body = format!(
            "{} {:x} {} {} {}",
            self.publisher, self.instance, self.seq, self.temperature, self.humidity
        );
        let mut msg = ZmqMessage::from(self.zip.topic());
        msg.push_back(Bytes::from(body));
        msg
    }

    /// Parses `[zip][body]`.
    pub fn parse(frames: &[Bytes]) -> Result<Self, Malformed> {
        let [topic, body] = frames else {
            return Err(Malformed::Frames {
                expected: 2,
                got: frames.len(),
            });
        };
        let zip = Zip::from_topic(topic)?;
        let text = std::str::from_utf8(body)
            .map_err(|_| Malformed::Body(String::from_utf8_lossy(body).into_owned()))?;
        let bad = || Malformed::Body(text.to_string());
        let mut fields = text.split(' ');
        let mut next = || fields.next().ok_or_else(bad);
        let publisher = next()?.to_string();
        let instance = u64::from_str_radix(next()?, 16).map_err(|_| bad())?;
        let seq = next()?.parse().map_err(|_| bad())?;
        let temperature = next()?.parse().map_err(|_| bad())?;
        let humidity = next()?.parse().map_err(|_| bad())?;
        if publisher.is_empty() || fields.next().is_some() {
            return Err(bad());
        }
        Ok(Self {
            zip,
            publisher,
            instance,
            seq,
            temperature,
            humidity,
        })
    }
}

/// The proxy's heartbeat, `[~hb][instance as hex]`.
pub fn heartbeat(instance: u64) -> ZmqMessage {
    let mut msg = ZmqMessage::from(Bytes::from_static(HEARTBEAT_TOPIC));
    msg.push_back(Bytes::from(format!("{instance:x}")));
    msg
}

/// What a subscriber or publisher receives from the proxy's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Update(Update),
    /// A heartbeat from the proxy instance given.
    Heartbeat(u64),
}

impl Incoming {
    pub fn parse(frames: &[Bytes]) -> Result<Self, Malformed> {
        match frames {
            [topic, body] if topic.as_ref() == HEARTBEAT_TOPIC => {
                let text = String::from_utf8_lossy(body);
                u64::from_str_radix(&text, 16)
                    .map(Self::Heartbeat)
                    .map_err(|_| Malformed::Heartbeat(text.into_owned()))
            }
            _ => Update::parse(frames).map(Self::Update),
        }
    }
}

/// A subscription message as an XPUB receives it from a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    Subscribe(Bytes),
    Unsubscribe(Bytes),
}

impl Subscription {
    /// Parses one message from a subscriber: one frame, `0x01`/`0x00` then the prefix.
    pub fn parse(msg: &ZmqMessage) -> Result<Self, Malformed> {
        if msg.len() != 1 {
            return Err(Malformed::Frames {
                expected: 1,
                got: msg.len(),
            });
        }
        let frame = msg.get(0).expect("one frame");
        match frame.first() {
            None => Err(Malformed::EmptySubscription),
            Some(1) => Ok(Self::Subscribe(frame.slice(1..))),
            Some(0) => Ok(Self::Unsubscribe(frame.slice(1..))),
            Some(&other) => Err(Malformed::SubscriptionKind(other)),
        }
    }

    pub fn prefix(&self) -> &Bytes {
        match self {
            Self::Subscribe(p) | Self::Unsubscribe(p) => p,
        }
    }

    /// The one-frame message an XSUB sends upstream for this.
    pub fn to_message(&self) -> ZmqMessage {
        let mut frame = Vec::with_capacity(self.prefix().len() + 1);
        frame.push(match self {
            Self::Subscribe(_) => 1,
            Self::Unsubscribe(_) => 0,
        });
        frame.extend_from_slice(self.prefix());
        ZmqMessage::from(Bytes::from(frame))
    }
}

/// Whether `topic` (a message's first frame) starts with `prefix`, as SUB filtering does.
pub fn matches(prefix: &[u8], topic: &[u8]) -> bool {
    topic.starts_with(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> Update {
        Update {
            zip: Zip::new(1001).expect("zip"),
            publisher: "p1".into(),
            instance: 0xabc,
            seq: 7,
            temperature: -12,
            humidity: 55,
        }
    }

    #[test]
    fn update_round_trips() {
        let u = update();
        let msg = u.to_message();
        let frames = msg.into_vec();
        assert_eq!(frames[0].as_ref(), b"01001");
        assert_eq!(frames[1].as_ref(), b"p1 abc 7 -12 55");
        assert_eq!(Update::parse(&frames), Ok(u.clone()));
        assert_eq!(Incoming::parse(&frames), Ok(Incoming::Update(u)));
    }

    #[test]
    fn heartbeat_round_trips_and_no_zip_matches_it() {
        let frames = heartbeat(0x1f).into_vec();
        assert_eq!(Incoming::parse(&frames), Ok(Incoming::Heartbeat(0x1f)));
        assert!(!matches(b"0", HEARTBEAT_TOPIC));
        assert!(!matches(b"10001", HEARTBEAT_TOPIC));
    }

    #[test]
    fn rejects_bad_updates() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let parse = |frames: &[Bytes]| Update::parse(frames).is_err();
        assert!(parse(&[b("10001")]));
        assert!(parse(&[b("1001"), b("p 1 1 1 1")]));
        assert!(parse(&[b("1000a"), b("p 1 1 1 1")]));
        assert!(parse(&[b("10001"), b("p 1 1 1")]));
        assert!(parse(&[b("10001"), b("p 1 1 1 1 1")]));
        assert!(parse(&[b("10001"), b("p zz 1 1 1")]));
        assert!(parse(&[b("10001"), b(" 1 1 1 1")]));
        assert!(parse(&[b("10001"), Bytes::from_static(&[0xff, 0xfe])]));
        assert!(Incoming::parse(&[b("~hb"), b("xyz")]).is_err());
    }

    #[test]
    fn subscriptions_parse_and_encode() {
        let sub = Subscription::parse(&ZmqMessage::from(Bytes::from_static(b"\x0110001")));
        assert_eq!(
            sub,
            Ok(Subscription::Subscribe(Bytes::from_static(b"10001")))
        );
        let unsub = Subscription::parse(&ZmqMessage::from(Bytes::from_static(b"\x00")));
        assert_eq!(unsub, Ok(Subscription::Unsubscribe(Bytes::new())));
        let sub = sub.expect("valid");
        assert_eq!(
            sub.to_message().into_vec()[0].as_ref(),
            b"\x0110001".as_slice()
        );
        let bad = |frame: &'static [u8]| {
            Subscription::parse(&ZmqMessage::from(Bytes::from_static(frame))).err()
        };
        assert_eq!(bad(b""), Some(Malformed::EmptySubscription));
        assert_eq!(bad(b"\x03x"), Some(Malformed::SubscriptionKind(3)));
        // The retired RELEASE is refused like any other kind.
        assert_eq!(bad(b"\x02ab 10001"), Some(Malformed::SubscriptionKind(2)));
        let mut two = ZmqMessage::from("\x01a");
        two.push_back(Bytes::from_static(b"b"));
        assert!(Subscription::parse(&two).is_err());
    }

    #[test]
    fn zip_lists_and_ranges() {
        let z = |c| Zip::new(c).expect("zip");
        assert_eq!(parse_zip_list("10001, 2"), Ok(vec![z(10001), z(2)]));
        assert_eq!(parse_zip_range("10000-10002").map(|v| v.len()), Ok(3));
        assert!(parse_zip_range("3-2").is_err());
        assert!(parse_zip_list("100000").is_err());
        assert!(parse_zip_list(",").is_err());
        assert_eq!(z(7).to_string(), "00007");
        assert_eq!(Zip::from_topic(b"00007"), Ok(z(7)));
    }
}

#[cfg(test)]
mod fuzz {
    //! The parsers on random and mutated frames: they never panic, and every valid value comes
    //! back from its own frames.

    use proptest::prelude::*;

    use super::*;

    fn frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4)
    }

    fn update() -> impl Strategy<Value = Update> {
        (
            0..=MAX_ZIP,
            "[^ ]{1,12}",
            any::<u64>(),
            any::<u64>(),
            any::<i32>(),
            any::<u32>(),
        )
            .prop_map(
                |(zip, publisher, instance, seq, temperature, humidity)| Update {
                    zip: Zip::new(zip).expect("in range"),
                    publisher,
                    instance,
                    seq,
                    temperature,
                    humidity,
                },
            )
    }

    fn subscription() -> impl Strategy<Value = Subscription> {
        let prefix = proptest::collection::vec(any::<u8>(), 0..12).prop_map(Bytes::from);
        prop_oneof![
            prefix.clone().prop_map(Subscription::Subscribe),
            prefix.prop_map(Subscription::Unsubscribe),
        ]
    }

    fn frames_of(msg: &ZmqMessage) -> Vec<Bytes> {
        msg.iter().cloned().collect()
    }

    /// `frames` with the byte at `at` (over all frames) replaced by `byte`, or cut there.
    fn mutate(mut frames: Vec<Bytes>, at: usize, byte: u8, cut: bool) -> Vec<Bytes> {
        let total: usize = frames.iter().map(Bytes::len).sum();
        if total == 0 {
            return frames;
        }
        let (mut at, mut i) = (at % total, 0);
        while at >= frames[i].len() {
            at -= frames[i].len();
            i += 1;
        }
        let mut frame = frames[i].to_vec();
        if cut {
            frame.truncate(at);
        } else {
            frame[at] = byte;
        }
        frames[i] = Bytes::from(frame);
        frames
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_frames_never_panic(frames in frames(), text in ".{0,20}") {
            let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
            let _ = Update::parse(&frames);
            let _ = Incoming::parse(&frames);
            if let Some(msg) = common::frames::message(frames.clone()) {
                let _ = Subscription::parse(&msg);
            }
            for frame in &frames {
                let _ = Zip::from_topic(frame);
            }
            let _ = parse_zip_list(&text);
            let _ = parse_zip_range(&text);
        }

        #[test]
        fn updates_round_trip_and_mutations_never_panic(
            u in update(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let frames = frames_of(&u.to_message());
            prop_assert_eq!(Update::parse(&frames), Ok(u.clone()));
            prop_assert_eq!(Incoming::parse(&frames), Ok(Incoming::Update(u)));
            let mutated = mutate(frames, at, byte, cut);
            let _ = Incoming::parse(&mutated);
        }

        #[test]
        fn subscriptions_and_heartbeats_round_trip(
            s in subscription(),
            instance in any::<u64>(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let msg = s.to_message();
            prop_assert_eq!(Subscription::parse(&msg), Ok(s));
            let hb = frames_of(&heartbeat(instance));
            prop_assert_eq!(Incoming::parse(&hb), Ok(Incoming::Heartbeat(instance)));
            if let Some(mutated) = common::frames::message(mutate(frames_of(&msg), at, byte, cut)) {
                let _ = Subscription::parse(&mutated);
            }
        }
    }
}
