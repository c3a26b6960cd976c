//! The tour's pictures and report: the SVG timelines and the HTML report parse, and a
//! timeline's shaded fault window lies where the lab's own fault events put it, over the
//! silence in the deliveries the client itself recorded (a real broker restart).

use std::path::PathBuf;

use common::timeline::Timeline;
use lab::process::Bins;
use lab::scenarios::{Lab, PartitionMode};
use lab::tape::{Event, Kind};
use lab::timeline::{Drawn, Picture, FAULT_FILL, RECOVERY_COLOR};
use plotters::style::RGBColor;

fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

fn attr(node: &roxmltree::Node, name: &str) -> f64 {
    node.attribute(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} on {node:?}"))
}

/// The shaded fault windows drawn (full-height rectangles of the fault fill; the legend's
/// swatch is small), as (from, to) in ms.
fn shaded(drawn: &Drawn) -> Vec<(f64, f64)> {
    let doc = roxmltree::Document::parse(&drawn.svg).expect("the SVG parses as XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(&hex(FAULT_FILL)))
        .filter(|n| attr(n, "height") > 100.0)
        .map(|n| {
            let x = attr(&n, "x");
            (drawn.ms_at(x), drawn.ms_at(x + attr(&n, "width")))
        })
        .collect()
}

/// The x (ms) of the vertical recovery line.
fn recovery_line(drawn: &Drawn) -> Option<f64> {
    let doc = roxmltree::Document::parse(&drawn.svg).expect("the SVG parses as XML");
    doc.descendants()
        .filter(|n| {
            n.has_tag_name("polyline") && n.attribute("stroke") == Some(&hex(RECOVERY_COLOR))
        })
        .find_map(|n| {
            let points = n.attribute("points")?;
            let xs: Vec<f64> = points
                .split_whitespace()
                .filter_map(|p| p.split(',').next()?.parse().ok())
                .collect();
            // The marker spans the plot: two points, one x.
            (xs.len() == 2 && xs[0] == xs[1]).then(|| drawn.ms_at(xs[0]))
        })
}

/// A pixel of the 760 px picture, in ms of its axis, and a pixel more for rounding.
fn px_ms(drawn: &Drawn) -> f64 {
    2.0 * drawn.span_ms as f64 / f64::from(drawn.x_px.1 - drawn.x_px.0)
}

fn event(at_ms: u64, kind: Kind, subject: &str) -> Event {
    Event {
        at_ms,
        kind,
        subject: subject.into(),
        text: format!("{subject} {kind:?}"),
    }
}

#[test]
fn the_shaded_window_and_the_recovery_mark_lie_on_the_faults_times() {
    // A client that started 200 ms into the scenario: 8 replies per 100 ms, none from the
    // kill (1000 ms) to 100 ms after the restart (2500 ms).
    let start_unix_ms = 1_800_000_000_000;
    let mut t = Timeline::default();
    t.start_unix_ms = start_unix_ms + 200;
    t.bucket_ms = 100;
    t.counts = (0..50)
        .map(|i| match 200 + i * 100 {
            1000..=2599 => 0,
            _ => 8,
        })
        .collect();
    let events = [
        event(0, Kind::Start, "broker"),
        event(1000, Kind::Kill, "broker"),
        event(1100, Kind::Start, "probe"),
        event(2500, Kind::Start, "broker-2"),
    ];
    let picture = Picture::new(
        "broker-restart",
        &[("client".into(), t)],
        start_unix_ms,
        &events,
        5000,
    );
    assert_eq!(picture.recovery_ms, Some(2600));
    let drawn = picture.svg().expect("drawn");
    let windows = shaded(&drawn);
    assert_eq!(windows.len(), 1, "{windows:?}");
    let (from, to) = windows[0];
    let tolerance = px_ms(&drawn);
    assert!(
        (from - 1000.0).abs() <= tolerance,
        "window starts at {from} ms"
    );
    assert!((to - 2500.0).abs() <= tolerance, "window ends at {to} ms");
    let mark = recovery_line(&drawn).expect("recovery marked");
    assert!(
        (mark - 2600.0).abs() <= tolerance,
        "recovery marked at {mark} ms"
    );
}

fn lab(test: &str) -> Lab {
    lab::process::build_roles().expect("role binaries build");
    let bins = Bins::locate().expect("binaries located");
    bins.check(&["broker", "worker", "client"])
        .expect("role binaries built");
    let log_dir = bins.dir.join("test-logs").join(test);
    let _ = std::fs::remove_dir_all(&log_dir);
    Lab {
        bins,
        log_dir,
        partition: PartitionMode::Relay,
        outage: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_broker_restart_is_drawn_where_it_happened_and_reported() {
    let lab = lab("report");
    let dir: PathBuf = lab.log_dir.join("report");
    let scenario = lab::scenarios::find("broker-restart").expect("scenario");
    let options = lab::tour::Options {
        json: true,
        narrate: false,
        report_dir: Some(dir.clone()),
        command: "lab broker-restart".into(),
    };
    let tour = lab::tour::run(&lab, &[scenario], &options)
        .await
        .expect("tour ran");
    let outcome = &tour.outcomes[0];
    let v = &outcome.verdict;
    assert!(v.passed, "{}", v.render());

    // The lab's own events: the kill, then the new broker.
    let kill = outcome
        .events
        .iter()
        .find(|e| e.kind == Kind::Kill && e.subject == "broker")
        .expect("the kill was recorded");
    assert_eq!(kill.text, "broker SIGKILLed");
    let restart = outcome
        .events
        .iter()
        .find(|e| e.kind == Kind::Start && e.subject == "broker-2")
        .expect("the restart was recorded");

    // The picture on disk is the one drawn, and parses; its one shaded window is the outage.
    let picture = outcome
        .picture
        .as_ref()
        .expect("a fault scenario has a picture");
    let drawn = picture.svg().expect("drawn");
    let svg = std::fs::read_to_string(dir.join("broker-restart.svg")).expect("SVG written");
    assert_eq!(svg, drawn.svg);
    let windows = shaded(&drawn);
    assert_eq!(windows.len(), 1, "{windows:?}");
    let (from, to) = windows[0];
    let tolerance = px_ms(&drawn);
    assert!(
        (from - kill.at_ms as f64).abs() <= tolerance,
        "window from {from} ms, kill at {} ms",
        kill.at_ms
    );
    assert!(
        (to - restart.at_ms as f64).abs() <= tolerance,
        "window to {to} ms, restart at {} ms",
        restart.at_ms
    );
    // The scenario's own outage figure (its clocks, not the tape's) agrees.
    let outage = v.figures["outage_ms"].as_f64().expect("outage_ms");
    assert!(
        ((to - from) - outage).abs() <= tolerance + 250.0,
        "window {} ms wide, outage {outage} ms",
        to - from
    );

    // The client's own record: replies before the kill, none while the broker was down,
    // replies again after the recovery mark, which comes after the restart and within the
    // verdict's recovery time (a bucket's slack).
    let client = &picture.series[0];
    assert_eq!(client.role, "client");
    let at = |i: usize| client.offset_ms + (i as u64 * client.bucket_ms) as i64;
    let (kill_ms, restart_ms) = (kill.at_ms as i64, restart.at_ms as i64);
    let before: u32 = (0..client.counts.len())
        .filter(|&i| at(i + 1) <= kill_ms)
        .map(|i| client.counts[i])
        .sum();
    let during: u32 = (0..client.counts.len())
        .filter(|&i| at(i) >= kill_ms + 100 && at(i + 1) <= restart_ms)
        .map(|i| client.counts[i])
        .sum();
    assert!(before >= 20, "replies before the kill: {before}");
    assert_eq!(during, 0, "replies while the broker was down");
    let mark = recovery_line(&drawn).expect("recovery marked");
    let recovery = v.figures["recovery_ms"].as_f64().expect("recovery_ms");
    assert!(
        mark >= restart_ms as f64 - tolerance
            && mark <= restart_ms as f64 + recovery + 100.0 + tolerance,
        "recovery marked at {mark} ms, restart at {restart_ms} ms, recovery {recovery} ms"
    );

    // The report: well-formed, the table's row, the picture inline.
    let index = tour.index.as_ref().expect("report written");
    let html = std::fs::read_to_string(index).expect("report readable");
    // `<!DOCTYPE html>` is a (trivial) DTD.
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc =
        roxmltree::Document::parse_with_options(&html, options).expect("the report parses as XML");
    let row: String = doc
        .descendants()
        .filter(|n| n.has_tag_name("tr"))
        .map(|tr| {
            tr.descendants()
                .filter(|n| n.is_text())
                .filter_map(|n| n.text())
                .collect::<Vec<_>>()
                .join("|")
        })
        .find(|r| r.starts_with("broker-restart|"))
        .expect("a table row for broker-restart");
    assert!(row.contains("Shared Queue 3|PASS"), "{row}");
    assert!(row.contains("|400|400|0|0|"), "{row}");
    let svgs = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "svg")
        .count();
    assert_eq!(svgs, 1, "the timeline inline");
    // Timelines are recorded per 100 ms: nothing finer is claimed.
    assert_eq!(client.bucket_ms, 100);
}
