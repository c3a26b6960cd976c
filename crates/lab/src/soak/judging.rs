//! The soak's samples of each process and the judging of its memory and descriptors.

use super::*;

#[derive(Debug, Clone, Serialize)]
pub(super) struct Sample {
    pub(super) t_s: f64,
    pub(super) process: String,
    pub(super) pid: i32,
    pub(super) rss_kib: u64,
    pub(super) fds: u64,
}

/// First, last and largest value of one measure of one process.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Spread {
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) max: u64,
    /// Largest of the first quarter of the run, and of the last quarter.
    pub(super) first_quarter_max: u64,
    pub(super) last_quarter_max: u64,
}

pub(super) fn spread(
    samples: &[&Sample],
    value: impl Fn(&Sample) -> u64,
    run_s: f64,
) -> Option<Spread> {
    let first = value(samples.first()?);
    let last = value(samples.last()?);
    let max = samples.iter().map(|s| value(s)).max()?;
    let quarter = |lo: f64, hi: f64| {
        samples
            .iter()
            .filter(|s| s.t_s >= lo && s.t_s <= hi)
            .map(|s| value(s))
            .max()
    };
    Some(Spread {
        first,
        last,
        max,
        first_quarter_max: quarter(0.0, run_s / 4.0)?,
        last_quarter_max: quarter(run_s * 3.0 / 4.0, run_s)?,
    })
}

/// One process's figures (instances; RSS and descriptors as first, last, max) and the ways it
/// is not flat: the last quarter's peak beyond the first quarter's plus the tolerance.
/// `None` without samples in both quarters.
pub(super) fn judge_process(
    name: &str,
    samples: &[&Sample],
    run_s: f64,
) -> Option<(Value, Vec<String>)> {
    let instances = samples.iter().map(|s| s.pid).collect::<BTreeSet<_>>().len();
    let rss = spread(samples, |s| s.rss_kib, run_s)?;
    let fds = spread(samples, |s| s.fds, run_s)?;
    let rss_limit =
        rss.first_quarter_max + RSS_SLACK_KIB + rss.first_quarter_max * RSS_SLACK_PERCENT / 100;
    let fd_limit = fds.first_quarter_max + FD_SLACK;
    let mut failures = Vec::new();
    if rss.last_quarter_max > rss_limit {
        failures.push(format!(
            "{name}: RSS flat, last quarter's peak {} KiB <= {rss_limit} KiB (first quarter's {} KiB)",
            rss.last_quarter_max, rss.first_quarter_max
        ));
    }
    if fds.last_quarter_max > fd_limit {
        failures.push(format!(
            "{name}: descriptors flat, last quarter's peak {} <= {fd_limit} (first quarter's {})",
            fds.last_quarter_max, fds.first_quarter_max
        ));
    }
    let figures = json!({
        "instances": instances,
        "rss_kib": [rss.first, rss.last, rss.max],
        "fds": [fds.first, fds.last, fds.max],
        "quarters_rss_kib": [rss.first_quarter_max, rss.last_quarter_max],
        "quarters_fds": [fds.first_quarter_max, fds.last_quarter_max],
    });
    Some((figures, failures))
}
