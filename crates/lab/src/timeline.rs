//! A scenario's timeline picture: what the roles delivered per 100 ms (their own records, see
//! [`common::timeline`]), laid on the scenario's clock next to the lab's fault windows (from
//! its [`crate::tape`]), with the moment the flow came back marked. Drawn as SVG by `plotters`.

use anyhow::{anyhow, Result};
use common::timeline::Timeline;
use plotters::prelude::*;
use serde::Serialize;

use crate::tape::{self, Window};

/// One role's deliveries, on the scenario's clock.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub role: String,
    /// Where its first bucket starts, in ms since the scenario's start (negative: before).
    pub offset_ms: i64,
    pub bucket_ms: u64,
    pub counts: Vec<u32>,
}

impl Series {
    /// `timeline` placed on a scenario that started at `start_unix_ms`.
    pub fn place(role: &str, timeline: &Timeline, start_unix_ms: u64) -> Self {
        Self {
            role: role.to_string(),
            offset_ms: timeline.start_unix_ms as i64 - start_unix_ms as i64,
            bucket_ms: timeline.bucket_ms.max(1),
            counts: timeline.counts.clone(),
        }
    }

    /// Start of bucket `i` on the scenario's clock (ms).
    fn at(&self, i: usize) -> i64 {
        self.offset_ms + (i as u64 * self.bucket_ms) as i64
    }

    /// Where the record ends on the scenario's clock (ms).
    pub fn end_ms(&self) -> i64 {
        self.at(self.counts.len())
    }
}

/// Everything a timeline picture shows.
#[derive(Debug, Clone, Serialize)]
pub struct Picture {
    pub scenario: String,
    /// The first series is the flow the fault hits.
    pub series: Vec<Series>,
    /// The lab's faults, overlapping ones merged.
    pub windows: Vec<Window>,
    /// When deliveries came back after the faults (ms since the scenario's start).
    pub recovery_ms: Option<u64>,
    /// The x axis runs from 0 to here (ms).
    pub span_ms: u64,
}

/// What [`Picture::svg`] drew, and where its x axis lies (pixels), to read positions back.
#[derive(Debug, Clone)]
pub struct Drawn {
    pub svg: String,
    /// Pixel x of 0 ms and of `span_ms` on the plotting area.
    pub x_px: (i32, i32),
    pub span_ms: u64,
}

impl Drawn {
    /// The time (ms) at pixel `x`.
    pub fn ms_at(&self, x: f64) -> f64 {
        let (x0, x1) = self.x_px;
        (x - f64::from(x0)) / f64::from((x1 - x0).max(1)) * self.span_ms as f64
    }
}

/// The fill of a fault window (tests find the shading by it).
pub const FAULT_FILL: RGBColor = RGBColor(214, 39, 40);
const FAULT_OPACITY: f64 = 0.2;
/// The recovery marker.
pub const RECOVERY_COLOR: RGBColor = RGBColor(44, 160, 44);
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

const WIDTH: u32 = 900;
const HEIGHT: u32 = 260;
/// The key's column, right of the plot.
const LEGEND_WIDTH: u32 = 200;

impl Picture {
    /// The picture of a scenario run: `timelines` by role, placed on the tape's clock.
    pub fn new(
        scenario: &str,
        timelines: &[(String, Timeline)],
        start_unix_ms: u64,
        events: &[tape::Event],
        end_ms: u64,
    ) -> Self {
        let series: Vec<Series> = timelines
            .iter()
            .filter(|(_, t)| t.start_unix_ms > 0)
            .map(|(role, t)| Series::place(role, t, start_unix_ms))
            .collect();
        let series_end = series.iter().map(Series::end_ms).max().unwrap_or(0).max(0) as u64;
        let span_ms = end_ms.max(series_end).max(1000);
        let windows = tape::merged(&tape::windows(events, span_ms));
        let recovery_ms = series.first().and_then(|s| recovery(s, &windows));
        Self {
            scenario: scenario.to_string(),
            series,
            windows,
            recovery_ms,
            span_ms,
        }
    }

    /// From the end of the last fault to the flow's return, like the verdicts' recovery; from
    /// its start when it never ended or had no length (a kill nothing replaced, a stop never
    /// continued: the system had to get over it by itself).
    pub fn recovered_after_ms(&self) -> Option<u64> {
        let last = self.windows.iter().max_by_key(|w| w.end_ms)?;
        let from = match last.open || last.end_ms == last.start_ms {
            true => last.start_ms,
            false => last.end_ms,
        };
        Some(self.recovery_ms?.saturating_sub(from))
    }

    /// The picture as a standalone SVG document.
    pub fn svg(&self) -> Result<Drawn> {
        let mut svg = String::new();
        let x_px = {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
            self.draw(&root)
                .map_err(|e| anyhow!("cannot draw {}: {e}", self.scenario))?
        };
        Ok(Drawn {
            svg,
            x_px,
            span_ms: self.span_ms,
        })
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(i32, i32), Box<dyn std::error::Error + 'static>>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (plot, key) = root.split_horizontally(WIDTH - LEGEND_WIDTH);
        let span_s = self.span_ms as f64 / 1000.0;
        let top = self
            .series
            .iter()
            .flat_map(|s| s.counts.iter().copied())
            .max()
            .unwrap_or(0) as f64;
        // Whole-number ticks even for a trickle.
        let top = (top * 1.1).max(5.0);
        let mut chart = ChartBuilder::on(&plot)
            .caption(
                format!("{}: delivered per 100 ms", self.scenario),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..span_s, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("seconds since the scenario's start")
            .y_desc("per 100 ms")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 11))
            .draw()?;
        let s = |ms: u64| ms as f64 / 1000.0;
        // Faults under the flows.
        for w in &self.windows {
            if w.end_ms > w.start_ms {
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(s(w.start_ms), 0.0), (s(w.end_ms), top)],
                    FAULT_FILL.mix(FAULT_OPACITY).filled(),
                )))?;
            } else {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(s(w.start_ms), 0.0), (s(w.start_ms), top)],
                    FAULT_FILL.stroke_width(2),
                )))?;
            }
        }
        for (i, series) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            // A step line: each bucket's count across its 100 ms.
            let mut points = Vec::with_capacity(series.counts.len() * 2 + 2);
            for (b, &c) in series.counts.iter().enumerate() {
                let (from, to) = (series.at(b), series.at(b + 1));
                points.push((from.max(0) as f64 / 1000.0, f64::from(c)));
                points.push((to.max(0) as f64 / 1000.0, f64::from(c)));
            }
            chart.draw_series(LineSeries::new(points, color.stroke_width(1)))?;
        }
        if let Some(at) = self.recovery_ms {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(s(at), 0.0), (s(at), top)],
                RECOVERY_COLOR.stroke_width(2),
            )))?;
        }
        // The key, beside the plot so that it hides nothing.
        let font = ("sans-serif", 11).into_font();
        let mut y = 40;
        let mut line =
            |text: String, swatch: Option<Swatch>| -> Result<(), Box<dyn std::error::Error>> {
                match swatch {
                    Some(Swatch::Line(color)) => {
                        key.draw(&PathElement::new(
                            vec![(4, y), (20, y)],
                            color.stroke_width(2),
                        ))
                        .map_err(|e| e.to_string())?;
                    }
                    Some(Swatch::Area) => {
                        key.draw(&Rectangle::new(
                            [(4, y - 5), (20, y + 5)],
                            FAULT_FILL.mix(FAULT_OPACITY).filled(),
                        ))
                        .map_err(|e| e.to_string())?;
                    }
                    None => {}
                }
                key.draw(&Text::new(text, (26, y - 6), font.clone()))
                    .map_err(|e| e.to_string())?;
                y += 16;
                Ok(())
            };
        for (i, series) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            line(
                format!("{} (its own record)", series.role),
                Some(Swatch::Line(color)),
            )?;
        }
        if !self.windows.is_empty() {
            line("fault: kill to restart,".into(), Some(Swatch::Area))?;
            line("stop to resume, cut to heal".into(), None)?;
        }
        if let Some(at) = self.recovery_ms {
            let at = tape::format_at(std::time::Duration::from_millis(at));
            line(
                format!("flowing again at {at}"),
                Some(Swatch::Line(RECOVERY_COLOR)),
            )?;
            if let Some(after) = self.recovered_after_ms() {
                line(
                    format!("({:.2} s after the fault)", after as f64 / 1000.0),
                    None,
                )?;
            }
        }
        let (xs, _) = chart.plotting_area().get_pixel_range();
        root.present()?;
        Ok((xs.start, xs.end))
    }
}

/// A key entry's mark.
enum Swatch {
    Line(RGBColor),
    Area,
}

/// When deliveries came back: the end of the longest silence (a run of empty buckets) that
/// overlaps the faults or begins within half a second of their end (the last deliveries before
/// a kill may land just after it), or else the first delivery after the last fault ended.
fn recovery(series: &Series, windows: &[Window]) -> Option<u64> {
    let first = windows.iter().map(|w| w.start_ms).min()? as i64;
    let last = windows.iter().map(|w| w.end_ms).max()? as i64;
    let mut silences = Vec::new();
    let mut silence_start: Option<i64> = None;
    for (i, &c) in series.counts.iter().enumerate() {
        match (c, silence_start) {
            (0, None) => silence_start = Some(series.at(i)),
            (0, Some(_)) => {}
            (_, Some(from)) => {
                silences.push((from, series.at(i)));
                silence_start = None;
            }
            (_, None) => {}
        }
    }
    let found = silences
        .into_iter()
        .filter(|&(from, to)| (from <= last && to > first) || (from > last && from <= last + 500))
        .max_by_key(|&(from, to)| (to - from, to))
        .map(|(_, to)| to)
        .or_else(|| {
            (0..series.counts.len())
                .find(|&i| series.counts[i] > 0 && series.at(i + 1) > last)
                .map(|i| series.at(i).max(last))
        })?;
    u64::try_from(found).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_ms: u64, end_ms: u64) -> Window {
        Window {
            what: "broker SIGKILLed".into(),
            start_ms,
            end_ms,
            open: false,
        }
    }

    fn series(counts: &[u32]) -> Series {
        Series {
            role: "client".into(),
            offset_ms: 50,
            bucket_ms: 100,
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn recovery_is_the_end_of_the_silence_the_fault_made() {
        // Flow, a short dip before the fault, the fault's silence, flow again.
        let s = series(&[5, 0, 5, 5, 0, 0, 0, 0, 0, 3, 5]);
        assert_eq!(recovery(&s, &[window(420, 700)]), Some(950));
    }

    #[test]
    fn a_silence_just_after_an_instant_fault_is_its_silence() {
        // A report that was in flight lands in the bucket after the kill at 474 ms.
        let s = series(&[0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 34]);
        assert_eq!(recovery(&s, &[window(474, 474)]), Some(1050));
    }

    #[test]
    fn without_a_silence_recovery_is_the_first_delivery_after_the_fault() {
        let s = series(&[5, 5, 5, 5, 5]);
        assert_eq!(recovery(&s, &[window(220, 220)]), Some(220));
        assert_eq!(recovery(&s, &[]), None);
    }
}
