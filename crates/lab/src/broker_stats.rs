//! The broker's counters as the lab sees them: read from the `stats` and `final stats` lines it
//! logs on stderr (`requests_in=... requeued=... bad_backend=...`). The broker has no
//! machine-readable stats channel yet; these lines are the only place its counters show.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::time::Instant;

use crate::process::Proc;

/// One stats line: counter name to value (`workers`, `idle`, `queued` are gauges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// From the `final stats` line the broker logs on its way out.
    pub last: bool,
    pub values: BTreeMap<String, u64>,
}

impl Counters {
    /// A counter's value; 0 if the line lacks it.
    pub fn get(&self, name: &str) -> u64 {
        self.values.get(name).copied().unwrap_or(0)
    }
}

/// Parses a broker log line; `None` unless it is a stats line.
pub fn parse(line: &str) -> Option<Counters> {
    let (last, rest) = if let Some((_, rest)) = line.split_once(" final stats ") {
        (true, rest)
    } else {
        (false, line.split_once(" stats ")?.1)
    };
    let values: BTreeMap<String, u64> = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    (!values.is_empty()).then_some(Counters { last, values })
}

/// Every stats line `broker` logged so far, oldest first.
pub fn all(broker: &Proc) -> Vec<Counters> {
    broker.log_text().lines().filter_map(parse).collect()
}

/// The `final stats` line of a broker that has exited.
pub fn final_stats(broker: &Proc) -> Result<Counters> {
    match all(broker).into_iter().rev().find(|c| c.last) {
        Some(c) => Ok(c),
        None => bail!(
            "{} logged no final stats\n{}",
            broker.name,
            broker.log_tail()
        ),
    }
}

/// Waits until a stats line satisfies `ok` (start the broker with `--stats-secs 1`).
pub async fn wait_for(
    broker: &Proc,
    within: Duration,
    what: &str,
    ok: impl Fn(&Counters) -> bool,
) -> Result<Counters> {
    let until = Instant::now() + within;
    loop {
        if let Some(c) = all(broker).into_iter().find(|c| ok(c)) {
            crate::tape::record(
                crate::tape::Kind::Note,
                &broker.name,
                format!("{} counted {what}", broker.name),
            );
            return Ok(c);
        }
        if Instant::now() >= until {
            bail!(
                "{}: no stats line showed {what} within {within:?}\n{}",
                broker.name,
                broker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_periodic_and_final_lines() {
        let line = "2026-11-27T18:49:04.429760Z  INFO stats requests_in=3 replies_out=2 \
                    dispatched=3 workers=1 requeued=1 bad_backend=0";
        let c = parse(line).expect("stats line");
        assert!(!c.last);
        assert_eq!((c.get("requests_in"), c.get("requeued")), (3, 1));
        let c = parse("2026-11-27T18:49:05Z  INFO final stats requests_in=7").expect("final");
        assert!(c.last);
        assert_eq!(c.get("requests_in"), 7);
        assert!(parse("2026-11-27T18:49:03Z  INFO broker bound frontend=tcp://x:1").is_none());
    }
}
