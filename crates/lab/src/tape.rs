//! What happened during a scenario: every process started, ready, signalled, killed or exited,
//! every link cut and healed, with its time since the scenario's start.
//!
//! The functions that act report here themselves ([`crate::process::Proc`], [`crate::relay`],
//! [`crate::netns`], [`crate::broker_stats`]): a scenario run inside [`Tape::scope`] is
//! narrated as it goes (`  +1.20s broker SIGKILLed`, on stderr) and leaves the tape its
//! fault windows come from. Outside a scope (the integration tests) nothing is recorded.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

/// What kind of step an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A process was started.
    Start,
    /// A process printed its ready line.
    Ready,
    /// A process was killed (SIGKILL): a fault.
    Kill,
    /// A process was stopped (SIGSTOP): a fault, until [`Kind::Resume`].
    Stop,
    /// A stopped process was continued (SIGCONT).
    Resume,
    /// A process was asked to finish (SIGTERM, SIGINT).
    Term,
    /// A process exited by itself or after [`Kind::Term`].
    Exit,
    /// A link was cut: a fault, until [`Kind::Heal`] of the same link.
    Cut,
    /// A cut link was restored.
    Heal,
    /// Something the lab waited for came true.
    Note,
}

/// One step.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Since the scenario's start.
    pub at_ms: u64,
    pub kind: Kind,
    /// The process or link it concerns.
    pub subject: String,
    /// The narration line, without the time.
    pub text: String,
}

/// A fault: from a kill, stop or cut to the restart, resume or heal that ended it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    /// What the fault was (the narration of its start).
    pub what: String,
    pub start_ms: u64,
    /// When it ended: equal to `start_ms` for a kill nothing replaced (an instant), the end of
    /// the tape for a stop never continued or a cut never healed.
    pub end_ms: u64,
    /// Never ended (a stop never continued, a cut never healed).
    pub open: bool,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    start_unix_ms: u64,
    narrate: bool,
    events: Vec<Event>,
}

/// A scenario's events; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Tape {
    inner: Arc<Mutex<Inner>>,
}

tokio::task_local! {
    static CURRENT: Tape;
}

/// Records an event on the tape of the running scenario, if any, and narrates it.
pub fn record(kind: Kind, subject: &str, text: impl Into<String>) {
    let _ = CURRENT.try_with(|tape| tape.push(kind, subject, text.into()));
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// `broker-2` and `broker` are the same role: a restart replaces a killed process.
fn role(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

impl Tape {
    /// A tape starting now; `narrate` prints each event on stderr as it is recorded.
    pub fn new(narrate: bool) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                started: Instant::now(),
                start_unix_ms: unix_ms(),
                narrate,
                events: Vec::new(),
            })),
        }
    }

    /// Runs `f` with this tape as the current one: the actions it takes are recorded here.
    pub async fn scope<F: std::future::Future>(&self, f: F) -> F::Output {
        CURRENT.scope(self.clone(), f).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, kind: Kind, subject: &str, text: String) {
        let mut inner = self.lock();
        let at = inner.started.elapsed();
        if inner.narrate {
            eprintln!("  {} {text}", format_at(at));
        }
        inner.events.push(Event {
            at_ms: at.as_millis() as u64,
            kind,
            subject: subject.to_string(),
            text,
        });
    }

    /// Wall-clock time of the start, in ms since the Unix epoch (to place the roles' timelines).
    pub fn start_unix_ms(&self) -> u64 {
        self.lock().start_unix_ms
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.lock().started.elapsed()
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// The faults, in order of their start, each ended as described in [`Window`]; `end_ms` is
    /// the tape's end for faults still open.
    pub fn windows(&self, end_ms: u64) -> Vec<Window> {
        windows(&self.events(), end_ms)
    }
}

/// `+1.20s`.
pub fn format_at(at: Duration) -> String {
    let mut s = String::new();
    let _ = write!(s, "+{:.2}s", at.as_secs_f64());
    s
}

/// The fault windows of `events` (see [`Window`]).
pub fn windows(events: &[Event], end_ms: u64) -> Vec<Window> {
    let mut windows = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let later = &events[i + 1..];
        let ended = match e.kind {
            Kind::Kill => Some(
                later
                    .iter()
                    .find(|l| l.kind == Kind::Start && role(&l.subject) == role(&e.subject))
                    .map_or(e.at_ms, |l| l.at_ms),
            ),
            Kind::Stop => later
                .iter()
                .find(|l| l.subject == e.subject && matches!(l.kind, Kind::Resume | Kind::Kill))
                .map(|l| l.at_ms),
            Kind::Cut => later
                .iter()
                .find(|l| l.subject == e.subject && l.kind == Kind::Heal)
                .map(|l| l.at_ms),
            _ => continue,
        };
        windows.push(Window {
            what: e.text.clone(),
            start_ms: e.at_ms,
            end_ms: ended.unwrap_or(end_ms).max(e.at_ms),
            open: ended.is_none(),
        });
    }
    windows
}

/// Overlapping windows joined (two relays cut at once are one partition), their texts too.
pub fn merged(windows: &[Window]) -> Vec<Window> {
    let mut sorted = windows.to_vec();
    sorted.sort_by_key(|w| w.start_ms);
    let mut out: Vec<Window> = Vec::new();
    for w in sorted {
        match out.last_mut() {
            Some(last) if w.start_ms <= last.end_ms && w.end_ms > last.start_ms => {
                if w.end_ms >= last.end_ms {
                    last.open = w.open;
                }
                last.end_ms = last.end_ms.max(w.end_ms);
                if !last.what.contains(&w.what) {
                    last.what = format!("{}; {}", last.what, w.what);
                }
            }
            _ => out.push(w),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at_ms: u64, kind: Kind, subject: &str) -> Event {
        Event {
            at_ms,
            kind,
            subject: subject.into(),
            text: format!("{subject} {kind:?}"),
        }
    }

    #[test]
    fn a_kill_lasts_until_the_same_role_starts_again() {
        let events = [
            ev(0, Kind::Start, "broker"),
            ev(100, Kind::Start, "probe"),
            ev(1000, Kind::Kill, "broker"),
            ev(1200, Kind::Start, "probe"),
            ev(2500, Kind::Start, "broker-2"),
            ev(3000, Kind::Kill, "w1"),
        ];
        let w = windows(&events, 9000);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].start_ms, w[0].end_ms), (1000, 2500));
        // Nothing replaced w1: an instant.
        assert_eq!((w[1].start_ms, w[1].end_ms), (3000, 3000));
    }

    #[test]
    fn stops_and_cuts_last_until_resumed_or_healed_else_to_the_end() {
        let events = [
            ev(10, Kind::Cut, "frontend"),
            ev(20, Kind::Cut, "backend"),
            ev(4510, Kind::Heal, "frontend"),
            ev(4520, Kind::Heal, "backend"),
            ev(5000, Kind::Stop, "w1"),
        ];
        let w = windows(&events, 9000);
        assert_eq!((w[2].start_ms, w[2].end_ms, w[2].open), (5000, 9000, true));
        assert!(!w[0].open);
        let m = merged(&w);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].start_ms, m[0].end_ms), (10, 4520));
    }

    #[tokio::test]
    async fn only_a_scoped_run_records() {
        record(Kind::Note, "x", "outside");
        let tape = Tape::new(false);
        tape.scope(async { record(Kind::Note, "x", "inside") })
            .await;
        let events = tape.events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].text, "inside");
        assert_eq!(format_at(Duration::from_millis(1204)), "+1.20s");
    }
}
