// SPDX-License-Identifier: GPL-2.0

//! `results.png`: time per page and the Rust/C ratio per workload, and
//! READ_UNLOCKABLE time against N.
//!
//! Text is drawn by ab_glyph from an embedded DejaVu Sans, so the plot
//! needs neither system fonts nor fontconfig.

use crate::report::{unlockable_series, Results, Row, Side};
use crate::table::fmt_ns;
use crate::workload::Resolve;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::error::Error;
use std::path::Path;
use std::sync::Once;

type R<T> = Result<T, Box<dyn Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

const FONT: &str = "sans-serif";
const C_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const RUST_COLOR: RGBColor = RGBColor(0xd9, 0x5f, 0x02);
const FASTER: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const SLOWER: RGBColor = RGBColor(0xd6, 0x27, 0x28);

const WIDTH: u32 = 1700;
const ROW_PX: u32 = 30;
/// Left margin of the per-workload panels, for the workload names.
const NAMES_PX: u32 = 360;
/// Caption, margins and x axis of a chart: what is not rows.
const CHART_EXTRA_PX: u32 = 110;
const GROWTH_PX: u32 = 520;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Cannot fail: the font is a well-formed TTF shipped in a crate.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draw `res` into a PNG at `path`.
pub fn draw(res: &Results, path: &Path) -> R<()> {
    register_font();
    let n = res.workloads.len().max(1);
    let rows_px = CHART_EXTRA_PX + ROW_PX * n as u32;
    let root = BitMapBackend::new(path, (WIDTH, 60 + rows_px + GROWTH_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let accel = res.vm.accel.to_uppercase();
    let body = root.titled(
        &format!(
            "dmirror: C test_hmm.ko vs Rust rust_hmm_dmirror.ko  (VM: {accel}, kernel {})",
            res.vm.guest.kernel
        ),
        (FONT, 26),
    )?;
    let (rows_area, growth_area) = body.split_vertically(rows_px);
    let (time_area, ratio_area) = rows_area.split_horizontally(1080);
    per_page_panel(&root, &time_area, &res.workloads)?;
    ratio_panel(&ratio_area, &res.workloads)?;
    growth_panel(&growth_area, res)?;
    root.present()?;
    Ok(())
}

/// Row `i` (0 = first workload) is drawn at y = n - 1 - i: top to bottom.
fn row_y(i: usize, n: usize) -> f64 {
    (n - 1 - i) as f64
}

/// The range of positive values, widened for breathing room on a log axis.
fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        (1.0, 10.0)
    } else {
        (lo / 2.0, hi * 2.0)
    }
}

/// Time per page, C and Rust bars side by side, whiskers min-max.
fn per_page_panel(root: &Area, area: &Area, rows: &[Row]) -> R<()> {
    let n = rows.len().max(1);
    let (lo, hi) = log_bounds(rows.iter().flat_map(|r| {
        [&r.c, &r.rust]
            .into_iter()
            .filter_map(Side::measured)
            .flat_map(|m| [m.ns_per_page.min, m.ns_per_page.max])
    }));
    let mut chart = ChartBuilder::on(area)
        .caption("time per page (median; whiskers: min-max)", (FONT, 20))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(NAMES_PX)
        .build_cartesian_2d((lo..hi).log_scale(), -0.5..(n as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ns per page (log scale)")
        .x_label_formatter(&|v| fmt_ns(*v))
        .label_style((FONT, 14))
        .draw()?;

    for (i, r) in rows.iter().enumerate() {
        let y = row_y(i, n);
        // The workload's name, right-aligned against the axis.
        let (px, py) = chart.backend_coord(&(lo, y));
        root.draw(&Text::new(
            r.name.clone(),
            (px - 8, py),
            (FONT, 14)
                .into_font()
                .into_text_style(root)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
        for (side, dy, color) in [(&r.c, 0.2, C_COLOR), (&r.rust, -0.2, RUST_COLOR)] {
            let y = y + dy;
            match side {
                Side::Ok(m) => {
                    let s = &m.ns_per_page;
                    chart.draw_series([Rectangle::new(
                        [(lo, y - 0.17), (s.median, y + 0.17)],
                        color.filled(),
                    )])?;
                    chart.draw_series([PathElement::new(
                        vec![(s.min, y), (s.max, y)],
                        BLACK.stroke_width(1),
                    )])?;
                    for x in [s.min, s.max] {
                        chart.draw_series([PathElement::new(
                            vec![(x, y - 0.1), (x, y + 0.1)],
                            BLACK.stroke_width(1),
                        )])?;
                    }
                }
                other => {
                    chart.draw_series([EmptyElement::at((lo, y))
                        + Text::new(
                            status_word(other),
                            (6, -7),
                            (FONT, 12).into_font().color(&color),
                        )])?;
                }
            }
        }
    }
    // A legend of two swatches.
    for (k, (label, color)) in [("C", C_COLOR), ("Rust", RUST_COLOR)]
        .into_iter()
        .enumerate()
    {
        let (px, py) = chart.backend_coord(&(hi, n as f64 - 0.5));
        let x = px - 130 + 65 * k as i32;
        root.draw(&Rectangle::new(
            [(x, py + 6), (x + 14, py + 20)],
            color.filled(),
        ))?;
        root.draw(&Text::new(label, (x + 18, py + 6), (FONT, 15).into_font()))?;
    }
    Ok(())
}

fn status_word(s: &Side) -> &'static str {
    match s {
        Side::Ok(_) => "",
        Side::Skipped { .. } => "skipped (EOPNOTSUPP)",
        Side::Failed { .. } => "FAILED",
        Side::Missing => "not run",
    }
}

/// Rust/C throughput per workload: a bar from 1 (equal), green when Rust
/// is as fast or faster, red when slower; whiskers from the quartiles.
fn ratio_panel(area: &Area, rows: &[Row]) -> R<()> {
    let n = rows.len().max(1);
    let spans: Vec<Option<(f64, f64, f64)>> = rows
        .iter()
        .map(|r| {
            let (c, rust) = (r.c.measured()?, r.rust.measured()?);
            let (c, rust) = (&c.time_ns, &rust.time_ns);
            Some((c.median / rust.median, c.q1 / rust.q3, c.q3 / rust.q1))
        })
        .collect();
    // A log axis: 0.5 and 2 are the same distance from 1.
    let lo = spans.iter().flatten().map(|s| s.1).fold(0.5f64, f64::min) * 0.9;
    let hi = spans.iter().flatten().map(|s| s.2).fold(2.0f64, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Rust / C pages/s (>= 1: Rust as fast or faster)",
            (FONT, 20),
        )
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(0)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(powers_of_two(lo, hi)),
            -0.5..(n as f64 - 0.5),
        )?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ratio of medians (log scale); whiskers: C q1/Rust q3 .. C q3/Rust q1")
        .x_label_formatter(&|v| format!("{v:.2}"))
        .label_style((FONT, 14))
        .draw()?;
    chart.draw_series([PathElement::new(
        vec![(1.0, -0.5), (1.0, n as f64 - 0.5)],
        BLACK.stroke_width(2),
    )])?;
    for (i, span) in spans.iter().enumerate() {
        let y = row_y(i, n);
        let Some((ratio, wlo, whi)) = *span else {
            chart.draw_series([
                EmptyElement::at((1.0, y)) + Text::new("n/a", (6, -7), (FONT, 12).into_font())
            ])?;
            continue;
        };
        let color = if ratio >= 1.0 { FASTER } else { SLOWER };
        chart.draw_series([Rectangle::new(
            [(1.0, y - 0.3), (ratio, y + 0.3)],
            color.mix(0.8).filled(),
        )])?;
        chart.draw_series([PathElement::new(
            vec![(wlo, y), (whi, y)],
            BLACK.stroke_width(1),
        )])?;
        chart.draw_series([EmptyElement::at((ratio.max(1.0), y))
            + Text::new(format!("{ratio:.2}"), (5, -7), (FONT, 13).into_font())])?;
    }
    Ok(())
}

/// 1/8, 1/4, ... 4, 8: ratio ticks within [lo, hi].
fn powers_of_two(lo: f64, hi: f64) -> Vec<f64> {
    (-8..=8)
        .map(|k| 2f64.powi(k))
        .filter(|v| (lo..=hi).contains(v))
        .collect()
}

/// One line of the growth panel: a module and a handler.
struct Series {
    label: String,
    color: RGBAColor,
    points: Vec<Point>,
}

/// N pages, and the ioctl time in ns.
struct Point {
    n: f64,
    median: f64,
    min: f64,
    max: f64,
}

/// READ_UNLOCKABLE whole-ioctl time against N, log-log: a slope-1 line
/// is linear growth.
fn growth_panel(area: &Area, res: &Results) -> R<()> {
    let series: Vec<Series> = [
        ("C", "c", C_COLOR, Resolve::Page),
        ("Rust", "rust", RUST_COLOR, Resolve::Page),
        ("C", "c", C_COLOR, Resolve::Block),
        ("Rust", "rust", RUST_COLOR, Resolve::Block),
    ]
    .into_iter()
    .map(|(label, module, color, resolve)| {
        let (how, color) = match resolve {
            Resolve::Page => ("page per fault", color.to_rgba()),
            Resolve::Block => ("2 MiB block per fault", color.mix(0.45)),
        };
        let points = unlockable_series(&res.workloads, module, resolve)
            .into_iter()
            .map(|(n, m)| Point {
                n: n as f64,
                median: m.time_ns.median,
                min: m.time_ns.min,
                max: m.time_ns.max,
            })
            .collect();
        Series {
            label: format!("{label}, {how}"),
            color,
            points,
        }
    })
    .filter(|s| !s.points.is_empty())
    .collect();
    if series.is_empty() {
        return Ok(());
    }
    let (xlo, xhi) = log_bounds(series.iter().flat_map(|s| s.points.iter().map(|p| p.n)));
    let (ylo, yhi) = log_bounds(
        series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.min, p.max])),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(
            "READ_UNLOCKABLE over userfaultfd-MISSING memory: ioctl time vs N pages (log-log)",
            (FONT, 20),
        )
        .margin(15)
        .margin_left(NAMES_PX / 2)
        .margin_right(NAMES_PX / 2)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((xlo..xhi).log_scale(), (ylo..yhi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("N (pages read)")
        .y_desc("time per ioctl (median; whiskers min-max)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| fmt_ns(*v))
        .label_style((FONT, 14))
        .draw()?;
    for s in &series {
        let style = s.color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.n, p.median)),
                style,
            ))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        chart.draw_series(
            s.points
                .iter()
                .map(|p| Circle::new((p.n, p.median), 4, s.color.filled())),
        )?;
        chart.draw_series(s.points.iter().map(|p| {
            PathElement::new(vec![(p.n, p.min), (p.n, p.max)], s.color.stroke_width(1))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{compare, tests::run};

    #[test]
    fn draws_a_png() {
        let res = compare(Some(&run("c", 1)), Some(&run("rust", 2)), "vm-run: tcg, x");
        let dir = std::env::temp_dir().join(format!("hmm-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        draw(&res, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounds() {
        assert_eq!(log_bounds([4.0, 0.0, 10.0].into_iter()), (2.0, 20.0));
        assert_eq!(log_bounds(std::iter::empty()), (1.0, 10.0));
        assert_eq!(powers_of_two(0.3, 2.5), [0.5, 1.0, 2.0]);
    }
}
