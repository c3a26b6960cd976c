//! What a scenario reports: pass or fail, the figures that prove it, and why it failed.

use std::collections::BTreeMap;
use std::fmt::Write;

use common::timeline::Timeline;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub scenario: String,
    /// How faults were made (`processes`, `netns`, `relay`).
    pub mode: String,
    pub passed: bool,
    pub figures: BTreeMap<String, Value>,
    /// Each broken expectation, in words.
    pub failures: Vec<String>,
    /// What the roles delivered per 100 ms, by role name (the tour draws them); not in the
    /// JSON verdict line.
    #[serde(skip)]
    pub timelines: Vec<(String, Timeline)>,
}

impl Verdict {
    pub fn new(scenario: &str, mode: &str) -> Self {
        Self {
            scenario: scenario.into(),
            mode: mode.into(),
            passed: true,
            figures: BTreeMap::new(),
            failures: Vec::new(),
            timelines: Vec::new(),
        }
    }

    /// Keeps what `role` delivered per 100 ms, for the scenario's timeline picture. The first
    /// one kept is the flow the fault hits.
    pub fn timeline(&mut self, role: &str, timeline: &Timeline) -> &mut Self {
        self.timelines.push((role.to_string(), timeline.clone()));
        self
    }

    pub fn figure(&mut self, name: &str, value: impl Into<Value>) -> &mut Self {
        self.figures.insert(name.into(), value.into());
        self
    }

    /// Records an expectation; a false one fails the verdict.
    pub fn expect(&mut self, ok: bool, what: impl Into<String>) -> &mut Self {
        if !ok {
            self.passed = false;
            self.failures.push(what.into());
        }
        self
    }

    /// One human-readable block.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let status = if self.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(out, "{status} {} ({})", self.scenario, self.mode);
        let figures: Vec<String> = self
            .figures
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "     {}", figures.join(" "));
        for failure in &self.failures {
            let _ = writeln!(out, "     expected: {failure}");
        }
        out
    }
}
