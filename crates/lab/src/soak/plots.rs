//! The soak's outputs: the samples as CSV, and the RSS picture.

use super::*;

pub(super) fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from("t_s,process,pid,rss_kib,fds\n");
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{},{},{},{}",
            s.t_s, s.process, s.pid, s.rss_kib, s.fds
        );
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

/// Draws `rss.svg` in `out` again from a `samples.csv` a soak wrote (`lab soak --plot`).
pub fn replot(csv: &Path, out: &Path, seed: u64) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let parsed = (|| {
            Some(Sample {
                t_s: f.first()?.parse().ok()?,
                process: f.get(1)?.to_string(),
                pid: f.get(2)?.parse().ok()?,
                rss_kib: f.get(3)?.parse().ok()?,
                fds: f.get(4)?.parse().ok()?,
            })
        })();
        samples.push(parsed.with_context(|| format!("{}:{}: not a sample", csv.display(), n + 1))?);
    }
    let run_s = samples.iter().map(|s| s.t_s).fold(0.0, f64::max);
    std::fs::create_dir_all(out)?;
    let svg = out.join("rss.svg");
    plot(&svg, &samples, run_s, seed)?;
    Ok(svg)
}

/// Distinct colours dark enough on white, one per process.
pub(super) const COLOURS: [(u8, u8, u8); 16] = [
    (230, 25, 75),
    (60, 150, 60),
    (0, 110, 200),
    (245, 130, 48),
    (145, 30, 180),
    (0, 128, 128),
    (220, 40, 210),
    (150, 100, 30),
    (128, 0, 0),
    (0, 0, 128),
    (120, 120, 0),
    (70, 70, 70),
    (200, 150, 0),
    (0, 170, 170),
    (100, 60, 200),
    (180, 0, 90),
];

/// RSS over time, one line per process (a restarted one continues its line), with the legend
/// beside the plot rather than over it.
pub(super) fn plot(path: &Path, samples: &[Sample], run_s: f64, seed: u64) -> Result<()> {
    use plotters::prelude::*;
    let mut series: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        series
            .entry(&s.process)
            .or_default()
            .push((s.t_s, s.rss_kib as f64 / 1024.0));
    }
    let top = samples.iter().map(|s| s.rss_kib).max().unwrap_or(1024) as f64 / 1024.0 * 1.1;
    let root = SVGBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(1050);
    let caption = format!("lab soak: RSS of every long-lived process (seed {seed})");
    let mut chart = ChartBuilder::on(&left)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..run_s.max(1.0), 0f64..top.max(1.0))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("seconds")
        .y_desc("RSS (MiB)")
        .draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let (r, g, b) = COLOURS[i % COLOURS.len()];
        let colour = RGBColor(r, g, b);
        chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
        let y = 50 + i as i32 * 20;
        right.draw(&PathElement::new(
            vec![(5, y), (28, y)],
            colour.stroke_width(3),
        ))?;
        right.draw(&Text::new(
            name.to_string(),
            (34, y - 7),
            ("sans-serif", 14).into_font(),
        ))?;
    }
    root.present()?;
    Ok(())
}
