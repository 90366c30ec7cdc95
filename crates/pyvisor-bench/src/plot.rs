//! The latency-vs-concurrency plot (SVG), floor and pyvisor on one chart.

use std::path::Path;

use plotters::prelude::*;

pub fn latency_vs_concurrency(path: &Path, points: &[(usize, u64, u64)]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_c = points.iter().map(|p| p.0).max().unwrap_or(64) as f64;
    let max_y = points.iter().map(|p| p.1.max(p.2)).max().unwrap_or(1) as f64 * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("p50 latency vs calls outstanding (1 Python process)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((1f64..max_c).log_scale(), 0f64..max_y)?;
    chart.configure_mesh().x_desc("concurrency (calls outstanding)").y_desc("p50 latency (µs)").draw()?;
    let floor: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, p.1 as f64)).collect();
    let pyv: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, p.2 as f64)).collect();
    chart.draw_series(LineSeries::new(floor.clone(), &BLUE))?.label("raw floor").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart.draw_series(floor.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))?;
    chart.draw_series(LineSeries::new(pyv.clone(), &RED))?.label("pyvisor").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart.draw_series(pyv.iter().map(|p| Circle::new(*p, 3, RED.filled())))?;
    chart.configure_series_labels().background_style(WHITE).border_style(BLACK).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present()?;
    Ok(())
}
