//! SVG plots of a run's time series (the plotters crate).

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Report, Sample};

/// Writes `convergence.svg` (share of complete tables, mean table size) and `load.svg`
/// (bytes per node per second, requests completed and failed per sample) into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let samples = &report.samples;
    if samples.is_empty() {
        return Ok(());
    }
    let end = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    line_chart(
        &dir.join("convergence.svg"),
        &format!("{}: tables complete", report.name),
        end,
        "share of nodes whose table holds every node up",
        &[("complete", samples, |s: &Sample| s.complete, &BLUE)],
        1.0,
    )?;
    let max_members = samples.iter().map(|s| s.members_mean).fold(1.0, f64::max);
    line_chart(
        &dir.join("members.svg"),
        &format!("{}: table size", report.name),
        end,
        "mean members up in a table",
        &[("members", samples, |s: &Sample| s.members_mean, &GREEN)],
        max_members * 1.05,
    )?;
    let max_bytes = samples
        .iter()
        .map(|s| s.bytes_per_node_s / 1000.0)
        .fold(1.0, f64::max);
    line_chart(
        &dir.join("traffic.svg"),
        &format!("{}: traffic", report.name),
        end,
        "kB sent per node per second",
        &[(
            "kB/s",
            samples,
            |s: &Sample| s.bytes_per_node_s / 1000.0,
            &RED,
        )],
        max_bytes * 1.05,
    )?;
    let max_requests = samples
        .iter()
        .map(|s| s.completed.max(s.failed) as f64)
        .fold(1.0, f64::max);
    line_chart(
        &dir.join("requests.svg"),
        &format!("{}: requests per sample", report.name),
        end,
        "requests",
        &[
            ("completed", samples, |s: &Sample| s.completed as f64, &BLUE),
            ("failed", samples, |s: &Sample| s.failed as f64, &RED),
        ],
        max_requests * 1.05,
    )?;
    Ok(())
}

type Series<'a> = (&'a str, &'a [Sample], fn(&Sample) -> f64, &'a RGBColor);

fn line_chart(
    path: &Path,
    title: &str,
    end_s: f64,
    y_label: &str,
    series: &[Series<'_>],
    y_max: f64,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..end_s, 0.0..y_max)
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    chart
        .configure_mesh()
        .x_desc("virtual time (s)")
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    for (name, samples, value, color) in series {
        let color = **color;
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t_s, value(s))),
                &color,
            ))
            .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    Ok(())
}
