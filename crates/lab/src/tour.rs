//! The tour: runs scenarios one after the other, narrating each as it goes, prints each verdict
//! and then one summary table, and writes each fault scenario's timeline (SVG) and one HTML
//! report with all of them.

use std::path::PathBuf;

use anyhow::Result;

use crate::report::{self, Outcome, Row};
use crate::scenarios::{Lab, Scenario};
use crate::tape::Tape;
use crate::timeline::Picture;
use crate::verdict::Verdict;

/// How the tour reports.
#[derive(Debug, Clone)]
pub struct Options {
    /// One JSON verdict per line on stdout, nothing else there; no narration.
    pub json: bool,
    /// Narrate each step on stderr.
    pub narrate: bool,
    /// Where the timelines and `index.html` go; `None`: nowhere.
    pub report_dir: Option<PathBuf>,
    /// The command line, for the report's title.
    pub command: String,
}

/// Runs one scenario on a tape of its own: its verdict (an error becomes a failed verdict),
/// what happened, and its timeline picture when it made a fault and recorded deliveries.
pub async fn run_one(lab: &Lab, scenario: &Scenario, narrate: bool) -> Outcome {
    let tape = Tape::new(narrate);
    let result = tape.scope((scenario.run)(lab)).await;
    let elapsed_ms = tape.elapsed().as_millis() as u64;
    let verdict = result.unwrap_or_else(|e| {
        let mut v = Verdict::new(scenario.name, "error");
        v.expect(false, format!("{e:#}"));
        v
    });
    let events = tape.events();
    let faults = !crate::tape::windows(&events, elapsed_ms).is_empty();
    let picture = (faults && !verdict.timelines.is_empty()).then(|| {
        Picture::new(
            scenario.name,
            &verdict.timelines,
            tape.start_unix_ms(),
            &events,
            elapsed_ms,
        )
    });
    Outcome {
        verdict,
        events,
        elapsed_ms,
        picture,
        svg: None,
        svg_text: None,
    }
}

/// Draws the outcome's picture into `dir` (`<scenario>.svg`, and `<scenario>.json` with the
/// data drawn and the events).
pub fn draw(outcome: &mut Outcome, dir: &std::path::Path) -> Result<()> {
    let Some(picture) = &outcome.picture else {
        return Ok(());
    };
    let drawn = picture.svg()?;
    let name = &outcome.verdict.scenario;
    let svg = dir.join(format!("{name}.svg"));
    report::write(&svg, &drawn.svg)?;
    let data = serde_json::json!({ "picture": picture, "events": outcome.events });
    report::write(&dir.join(format!("{name}.json")), &data.to_string())?;
    outcome.svg = Some(svg);
    outcome.svg_text = Some(drawn.svg);
    Ok(())
}

/// What a tour ran.
#[derive(Debug)]
pub struct Tour {
    pub outcomes: Vec<Outcome>,
    /// The HTML report, if written.
    pub index: Option<PathBuf>,
}

impl Tour {
    pub fn all_passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.verdict.passed)
    }
}

/// Runs `scenarios` in order, narrating, printing verdicts and the table, writing the report.
pub async fn run(lab: &Lab, scenarios: &[Scenario], options: &Options) -> Result<Tour> {
    let narrate = options.narrate && !options.json;
    let mut outcomes = Vec::new();
    for scenario in scenarios {
        if options.json {
            eprintln!("running {} ...", scenario.name);
        } else {
            match report::seed_experiment(scenario.name) {
                "-" => eprintln!("\n{}: {}", scenario.name, scenario.about),
                seed => eprintln!("\n{} ({seed}): {}", scenario.name, scenario.about),
            }
        }
        let mut outcome = run_one(lab, scenario, narrate).await;
        if let Some(dir) = &options.report_dir {
            if let Err(e) = draw(&mut outcome, dir) {
                eprintln!("warning: {e:#}");
            }
            if let (Some(svg), false) = (&outcome.svg, options.json) {
                eprintln!("  timeline: {}", svg.display());
            }
        }
        if options.json {
            println!("{}", serde_json::to_string(&outcome.verdict)?);
        } else {
            print!("{}", outcome.verdict.render());
        }
        outcomes.push(outcome);
    }
    let passed = outcomes.iter().filter(|o| o.verdict.passed).count();
    let failed = outcomes.len() - passed;
    if !options.json {
        let rows: Vec<Row> = outcomes.iter().map(Row::of).collect();
        println!("\n{}", report::table(&rows));
        println!("{passed} passed, {failed} failed");
    } else {
        eprintln!("{passed} passed, {failed} failed");
    }
    let mut written = None;
    if let Some(dir) = &options.report_dir {
        let index = dir.join("index.html");
        match report::write(&index, &report::html(&outcomes, &options.command)) {
            Ok(()) => {
                eprintln!("report: {}", index.display());
                written = Some(index);
            }
            Err(e) => eprintln!("warning: {e:#}"),
        }
    }
    if failed > 0 {
        eprintln!("logs of the children: {}", lab.log_dir.display());
    }
    Ok(Tour {
        outcomes,
        index: written,
    })
}
