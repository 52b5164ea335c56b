//! The modes benchmark's plot: p99 write latency against the round-trip time, one line per
//! replication mode, one panel per job; the systems without a peer are drawn as flat
//! reference lines, since the RTT does not touch them.

use crate::modes::{Job, Row, System};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const MODES: [(System, RGBColor); 3] = [(System::Async, BLUE), (System::Sync, RED), (System::Predictive, RGBColor(0, 150, 0))];
const LOCAL: [(System, RGBColor); 2] = [(System::NoPeer, RGBColor(120, 120, 120)), (System::QemuNbd, BLACK)];

/// Writes the SVG; jobs with no latency figures (qemu-img convert) get no panel.
pub fn p99_against_rtt(path: &Path, rows: &[Row], jobs: &[Job]) -> Result<()> {
    let panels: Vec<usize> =
        (0..jobs.len()).filter(|&j| rows.iter().any(|r| r.job == j && r.rtt_ms.is_some() && r.fio.p99_us.is_finite())).collect();
    if panels.is_empty() {
        return Err(anyhow!("no replicated row has a latency to plot"));
    }
    let columns = panels.len().min(2);
    let lines = panels.len().div_ceil(columns);
    let root = SVGBackend::new(path, (560 * columns as u32, 380 * lines as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    for (area, &j) in root.split_evenly((lines, columns)).iter().zip(&panels) {
        panel(area, rows, j, &jobs[j].name).map_err(|e| anyhow!("drawing the plot: {e:?}"))?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Row],
    job: usize,
    name: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ms = |r: &Row| r.fio.p99_us / 1000.0;
    let mine: Vec<&Row> = rows.iter().filter(|r| r.job == job && r.fio.p99_us.is_finite() && r.fio.p99_us > 0.0).collect();
    let rtts: Vec<f64> = mine.iter().filter_map(|r| r.rtt_ms).map(|r| r as f64).collect();
    let x_max = rtts.iter().copied().fold(1.0, f64::max);
    let lo = mine.iter().map(|r| ms(r)).fold(f64::INFINITY, f64::min);
    let hi = mine.iter().map(|r| ms(r)).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max * 1.05, (lo / 1.5..hi * 1.5).log_scale())?;
    chart.configure_mesh().x_desc("RTT, ms").y_desc("p99 write latency, ms").draw()?;
    for (system, color) in MODES {
        let mut points: Vec<(f64, f64)> =
            mine.iter().filter(|r| r.system == system).filter_map(|r| r.rtt_ms.map(|t| (t as f64, ms(r)))).collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(system.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    for (system, color) in LOCAL {
        let Some(r) = mine.iter().find(|r| r.system == system) else { continue };
        let y = ms(r);
        chart
            .draw_series(LineSeries::new(vec![(0.0, y), (x_max * 1.05, y)], color.stroke_width(1)))?
            .label(format!("{} (no WAN)", system.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    Ok(())
}
