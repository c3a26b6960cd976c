//! The tour's summary: one table row per scenario (its seed experiment, verdict and key
//! figures), printed as text, and the self-contained HTML report (the table, then every
//! timeline picture inline with what happened).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::tape::{self, Event};
use crate::timeline::Picture;
use crate::verdict::Verdict;

/// The seed experiment a scenario replays (the README's "Scenarios" table), `-` for the
/// lab's own additions.
pub fn seed_experiment(scenario: &str) -> &'static str {
    match scenario {
        "one-worker" => "Shared Queue 1",
        "two-workers" => "Shared Queue 2",
        "broker-restart" => "Shared Queue 3",
        "partition" => "Shared Queue 4",
        "pipeline-one-worker"
        | "pipeline-workers"
        | "pipeline-worker-crash"
        | "pipeline-corrupt" => "Divide and Conquer",
        "poll" => "zmq_poll",
        "many-pubsub" => "Proxy 1",
        "weather" => "Proxy 2",
        "zip-filter" => "Proxy 3",
        "proxy-restart" => "Proxy 4",
        "pubsub-partition"
        | "pubsub-partition-restart"
        | "pubsub-partition-publishers"
        | "pubsub-partition-subscribers" => "Proxy 5",
        _ => "-",
    }
}

/// One scenario as the tour ran it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    pub events: Vec<Event>,
    pub elapsed_ms: u64,
    /// For scenarios that made a fault and recorded deliveries.
    pub picture: Option<Picture>,
    /// Where the picture was written.
    pub svg: Option<PathBuf>,
    /// The picture's SVG, for the HTML report.
    pub svg_text: Option<String>,
}

/// A table row's key figures (`-` where a scenario has none).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub scenario: String,
    pub seed: String,
    pub verdict: String,
    pub sent: String,
    pub delivered: String,
    pub lost: String,
    pub duplicates: String,
    pub recovery: String,
    pub images_per_s: String,
}

fn num(v: &Verdict, name: &str) -> Option<u64> {
    v.figures.get(name).and_then(Value::as_u64)
}

fn float(v: &Verdict, name: &str) -> Option<f64> {
    v.figures.get(name).and_then(Value::as_f64)
}

/// Sum over the judged subscribers (those with a `<name>_sent` figure) of `<name>_<suffix>`.
fn sum_subscribers(v: &Verdict, suffix: &str) -> Option<u64> {
    let found: Vec<u64> = v
        .figures
        .keys()
        .filter_map(|k| k.strip_suffix("_sent").filter(|name| !name.is_empty()))
        .filter_map(|name| num(v, &format!("{name}_{suffix}")))
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

fn show<T: ToString>(x: Option<T>) -> String {
    x.map_or_else(|| "-".to_string(), |x| x.to_string())
}

impl Row {
    pub fn of(outcome: &Outcome) -> Self {
        let v = &outcome.verdict;
        let verdict = if v.passed { "PASS" } else { "FAIL" };
        let (sent, delivered, lost, duplicates) = if num(v, "answered").is_some() {
            // Shared queue: requests.
            (
                num(v, "sent"),
                num(v, "answered"),
                num(v, "lost"),
                num(v, "duplicates"),
            )
        } else if let Some(total) = num(v, "total") {
            // Pipeline: images; lost is what neither came out nor failed.
            let done = num(v, "done");
            let failed = num(v, "failed").unwrap_or(0);
            let lost = done.map(|d| total.saturating_sub(d + failed));
            (Some(total), done, lost, None)
        } else {
            // Pub/sub: every judged subscriber together, each update counted once per
            // subscriber that asked for it; lost is what their sequence numbers prove missed.
            (
                sum_subscribers(v, "sent").or_else(|| num(v, "sent")),
                sum_subscribers(v, "received"),
                sum_subscribers(v, "gaps"),
                sum_subscribers(v, "duplicates"),
            )
        };
        // The verdict's own recovery figure; else the time from the fault to the flow's return
        // read off the timeline (marked `~`).
        let recovery = match num(v, "recovery_ms") {
            Some(ms) => Some(format!("{ms} ms")),
            None => outcome
                .picture
                .as_ref()
                .and_then(Picture::recovered_after_ms)
                .map(|ms| format!("~{ms} ms")),
        };
        let images_per_s = match (
            float(v, "images_per_s"),
            float(v, "images_per_s_1"),
            float(v, "images_per_s_2"),
        ) {
            (Some(r), _, _) => Some(format!("{r:.1}")),
            (None, Some(a), Some(b)) => Some(format!("{a:.1} -> {b:.1}")),
            _ => None,
        };
        Self {
            scenario: v.scenario.clone(),
            seed: seed_experiment(&v.scenario).to_string(),
            verdict: format!("{verdict} ({})", v.mode),
            sent: show(sent),
            delivered: show(delivered),
            lost: show(lost),
            duplicates: show(duplicates),
            recovery: show(recovery),
            images_per_s: show(images_per_s),
        }
    }

    fn cells(&self) -> [&str; 9] {
        [
            &self.scenario,
            &self.seed,
            &self.verdict,
            &self.sent,
            &self.delivered,
            &self.lost,
            &self.duplicates,
            &self.recovery,
            &self.images_per_s,
        ]
    }
}

const HEADER: [&str; 9] = [
    "scenario",
    "seed experiment",
    "verdict",
    "sent",
    "delivered",
    "lost",
    "dup",
    "recovery",
    "images/s",
];

/// The summary table as aligned text.
pub fn table(rows: &[Row]) -> String {
    let mut widths = HEADER.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.cells()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 9]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Text left, numbers right.
            if i < 3 {
                let _ = write!(out, "{cell:<w$}  ");
            } else {
                let _ = write!(out, "{cell:>w$}  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(HEADER);
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    out.push_str(&line(std::array::from_fn(|i| rule[i].as_str())));
    for row in rows {
        out.push_str(&line(row.cells()));
    }
    out
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The SVG document without its XML declaration, to inline in HTML.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The self-contained HTML report: the table, then each scenario's timeline and narration.
pub fn html(outcomes: &[Outcome], command: &str) -> String {
    let rows: Vec<Row> = outcomes.iter().map(Row::of).collect();
    let passed = outcomes.iter().filter(|o| o.verdict.passed).count();
    let mut h = String::new();
    h.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n\
         <title>lab report</title>\n<style>\n\
         body { font-family: sans-serif; margin: 2em; max-width: 60em; }\n\
         table { border-collapse: collapse; font-size: 0.9em; }\n\
         th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }\n\
         th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }\n\
         .PASS { color: #2c7d2c; } .FAIL { color: #c0392b; font-weight: bold; }\n\
         pre { background: #f6f6f6; padding: 0.6em; font-size: 0.85em; overflow-x: auto; }\n\
         </style>\n</head>\n<body>\n",
    );
    let _ = writeln!(
        h,
        "<h1>lab report</h1>\n<p><code>{}</code>: {passed} passed, {} failed.</p>",
        escape(command),
        outcomes.len() - passed
    );
    h.push_str("<table>\n<tr>");
    for head in HEADER {
        let _ = write!(h, "<th>{}</th>", escape(head));
    }
    h.push_str("</tr>\n");
    for (row, outcome) in rows.iter().zip(outcomes) {
        h.push_str("<tr>");
        for (i, cell) in row.cells().iter().enumerate() {
            let class = match i {
                2 if outcome.verdict.passed => " class=\"PASS\"",
                2 => " class=\"FAIL\"",
                _ => "",
            };
            let cell = match (i, &outcome.picture) {
                (0, Some(_)) => format!("<a href=\"#{0}\">{0}</a>", escape(cell)),
                _ => escape(cell),
            };
            let _ = write!(h, "<td{class}>{cell}</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str(
        "</table>\n<p>recovery: the verdict's figure (longest silence minus the outage); with \
         <code>~</code>, read off the timeline: from the fault's end (its start for a kill \
         nothing replaced or a stop never resumed) to the first delivery after it.</p>\n\
         <p>Each timeline shows what the client, subscriber or master recorded itself, per \
         100 ms; the shaded windows are the lab's own fault events (kill to restart, stop to \
         resume, cut to heal; a line for a kill nothing replaced).</p>\n",
    );
    for outcome in outcomes {
        let v = &outcome.verdict;
        let _ = writeln!(
            h,
            "<h2 id=\"{0}\">{0}</h2>\n<p>{1} &#8212; <span class=\"{2}\">{2}</span> ({3})</p>",
            escape(&v.scenario),
            escape(seed_experiment(&v.scenario)),
            if v.passed { "PASS" } else { "FAIL" },
            escape(&v.mode),
        );
        if let Some(svg) = &outcome.svg_text {
            h.push_str(inline_svg(svg));
            h.push('\n');
        }
        if !v.failures.is_empty() {
            h.push_str("<ul>\n");
            for f in &v.failures {
                let _ = writeln!(h, "<li>expected: {}</li>", escape(f));
            }
            h.push_str("</ul>\n");
        }
        let figures: Vec<String> = v.figures.iter().map(|(k, x)| format!("{k}={x}")).collect();
        let _ = writeln!(
            h,
            "<details><summary>what happened, figures</summary>\n<pre>{}\n\n{}</pre>\n</details>",
            escape(&narration(&outcome.events)),
            escape(&figures.join(" "))
        );
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// The events as the narration printed them.
pub fn narration(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                tape::format_at(std::time::Duration::from_millis(e.at_ms)),
                e.text
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `text` to `path`, creating its directory.
pub fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(v: Verdict) -> Outcome {
        Outcome {
            verdict: v,
            events: Vec::new(),
            elapsed_ms: 0,
            picture: None,
            svg: None,
            svg_text: None,
        }
    }

    #[test]
    fn rows_take_each_patterns_figures() {
        let mut v = Verdict::new("broker-restart", "processes");
        v.figure("sent", 400)
            .figure("answered", 400)
            .figure("lost", 0)
            .figure("duplicates", 0)
            .figure("recovery_ms", 212);
        let row = Row::of(&outcome(v));
        assert_eq!(row.seed, "Shared Queue 3");
        assert_eq!(
            (
                row.sent.as_str(),
                row.delivered.as_str(),
                row.recovery.as_str()
            ),
            ("400", "400", "212 ms")
        );
        let mut v = Verdict::new("proxy-restart", "processes");
        v.figure("sent", 3200)
            .figure("s1_sent", 3200)
            .figure("s2_sent", 1600)
            .figure("stalled_received", 7)
            .figure("s1_received", 2600)
            .figure("s1_gaps", 600)
            .figure("s2_received", 1300)
            .figure("s2_gaps", 300)
            .figure("s2_duplicates", 0);
        let row = Row::of(&outcome(v));
        assert_eq!(
            (row.sent.as_str(), row.delivered.as_str(), row.lost.as_str()),
            ("4800", "3900", "900")
        );
        let mut v = Verdict::new("pipeline-workers", "processes");
        v.figure("images_per_s_1", 10.0)
            .figure("images_per_s_2", 18.5);
        v.expect(false, "a <failure>");
        let row = Row::of(&outcome(v.clone()));
        assert_eq!(row.images_per_s, "10.0 -> 18.5");
        assert!(row.verdict.starts_with("FAIL"));
        let text = table(&[row]);
        assert!(text.starts_with("scenario"), "{text}");
        assert!(html(&[outcome(v)], "lab").contains("a &lt;failure&gt;"));
    }
}
