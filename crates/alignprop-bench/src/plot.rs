//! Scaling curves of the benchmark results as one PNG of four panels: AlignProp step time and peak memory against
//! K (checkpointed and full-graph backward) and against the latent size, ours and PyTorch's.

use std::path::Path;

use alignprop_trainer::plot::{Canvas, DrawResult, FONT, Frame, compact, draw_png, legend_corner};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// One curve: label, colour, dashed, points `(x, y)`.
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// One panel: its title, axis descriptions and curves.
struct Panel {
    title: &'static str,
    x_desc: &'static str,
    y_desc: &'static str,
    series: Vec<Series>,
}

/// A panel's size, the height of the header above the panels, and the panels' frame.
const PANEL: (u32, u32) = (600, 400);
const HEADER: u32 = 40;
const FRAME: Frame = Frame {
    margin: 10,
    margin_right: 24,
    title_font: 19,
    label_font: 14,
    desc_font: 15,
    legend_font: 14,
    x_label_area: 46,
    y_label_area: 68,
};
/// Dashes of the full-graph curves (pixels): dash, gap.
const DASH: (u32, u32) = (9, 6);

/// Draws one panel: axes from 0, grid, the series (dashed ones dashed), axis descriptions and the legend where it
/// hides no curve.
fn panel(area: &Canvas<'_>, p: &Panel) -> DrawResult {
    let series: Vec<&Series> = p.series.iter().filter(|s| !s.points.is_empty()).collect();
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let xmax = pts().map(|p| p.0).fold(0.0, f64::max);
    let ymax = pts().map(|p| p.1).fold(0.0, f64::max);
    let x = 0.0..if xmax > 0.0 { xmax * 1.05 } else { 1.0 };
    let mut y = 0.0..if ymax > 0.0 { ymax * 1.1 } else { 1.0 };
    let labels: Vec<&str> = series.iter().map(|s| s.label.as_str()).collect();
    let lines: Vec<Vec<(f64, f64)>> = series.iter().map(|s| s.points.clone()).collect();
    use SeriesLabelPosition::*;
    let corner = legend_corner(
        &lines,
        &x,
        &mut y,
        FRAME.plot_size(area.dim_in_pixel(), p.title),
        FRAME.legend_size(&labels),
        &[UpperLeft, LowerRight, UpperRight, LowerLeft],
    );
    let mut chart = FRAME.chart(area, p.title).build_cartesian_2d(x, y)?;
    FRAME
        .mesh(&mut chart)
        .x_desc(p.x_desc)
        .y_desc(p.y_desc)
        .x_label_formatter(&|v| compact(*v))
        .y_label_formatter(&|v| compact(*v))
        .draw()?;
    for s in &series {
        let color = RGBColor(s.color[0], s.color[1], s.color[2]);
        let line = color.stroke_width(2);
        chart.draw_series(s.points.iter().map(|&q| Circle::new(q, 3, color.filled())))?;
        let points = s.points.iter().copied();
        let anno = if s.dashed {
            chart.draw_series(DashedLineSeries::new(points, DASH.0, DASH.1, line))?
        } else {
            chart.draw_series(LineSeries::new(points, line))?
        };
        // The legend's sample: one 24-pixel stroke, or two dashes of the curve's dash length.
        let (d, g) = (DASH.0 as i32, DASH.1 as i32);
        let (first, second) = if s.dashed {
            ((0, d), (d + g, 2 * d + g))
        } else {
            ((0, 24), (24, 24))
        };
        anno.label(&s.label).legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(first.0, 0), (first.1, 0)], line)
                + PathElement::new(vec![(second.0, 0), (second.1, 0)], line)
        });
    }
    if !series.is_empty() {
        FRAME.draw_legend(&mut chart, corner)?;
    }
    Ok(())
}

/// Reads a `cargo xtask bench` results JSON and writes the four scaling panels to `png`.
pub fn scaling_plot(results_json: &Path, png: &Path) -> Result<(), String> {
    let text_in = std::fs::read_to_string(results_json)
        .map_err(|e| format!("{}: {e}", results_json.display()))?;
    let doc: Value =
        serde_json::from_str(&text_in).map_err(|e| format!("{}: {e}", results_json.display()))?;
    let results = doc
        .get("results")
        .and_then(Value::as_object)
        .ok_or(format!("{}: no `results`", results_json.display()))?;
    let get = |name: &str, side: &str, key: &str| -> Option<f64> {
        results.get(name)?.get(side)?.get(key)?.as_f64()
    };
    let curve =
        |label: &str, color, dashed, side: &str, key: &str, scale: f64, names: &[(f64, String)]| {
            Series {
                label: label.to_string(),
                color,
                dashed,
                points: names
                    .iter()
                    .filter_map(|(x, n)| get(n, side, key).map(|y| (*x, y * scale)))
                    .collect(),
            }
        };
    let ks: Vec<(f64, String)> = [1, 2, 4, 8, 20]
        .iter()
        .map(|k| (*k as f64, format!("scale/k{k}")))
        .collect();
    let ks_full: Vec<(f64, String)> = [1, 2, 4, 8, 20]
        .iter()
        .map(|k| (*k as f64, format!("scale/k{k}_nockpt")))
        .collect();
    let ss: Vec<(f64, String)> = [16, 32, 64]
        .iter()
        .map(|s| (*s as f64, format!("scale/s{s}_k1")))
        .collect();
    let (blue, red) = ([30, 80, 200], [200, 60, 30]);
    let k_series = |key: &str, scale: f64| {
        vec![
            curve("ours, checkpointed", blue, false, "ours", key, scale, &ks),
            curve("ours, full graph", blue, true, "ours", key, scale, &ks_full),
            curve("torch, checkpointed", red, false, "torch", key, scale, &ks),
            curve(
                "torch, full graph",
                red,
                true,
                "torch",
                key,
                scale,
                &ks_full,
            ),
        ]
    };
    let s_series = |key: &str, scale: f64| {
        vec![
            curve("ours (K = 1)", blue, false, "ours", key, scale, &ss),
            curve("torch (K = 1)", red, false, "torch", key, scale, &ss),
        ]
    };
    const K_DESC: &str = "K (differentiated steps, of 20)";
    const S_DESC: &str = "latent side S (image 8·S pixels)";
    const TIME_DESC: &str = "step time (s, median)";
    const MEM_DESC: &str = "peak memory (MiB, RSS)";
    let panels = [
        Panel {
            title: "step time vs K (latent 32)",
            x_desc: K_DESC,
            y_desc: TIME_DESC,
            series: k_series("median_ms", 1e-3),
        },
        Panel {
            title: "peak memory vs K (latent 32)",
            x_desc: K_DESC,
            y_desc: MEM_DESC,
            series: k_series("peak_rss_mib", 1.0),
        },
        Panel {
            title: "step time vs latent size (K = 1)",
            x_desc: S_DESC,
            y_desc: TIME_DESC,
            series: s_series("median_ms", 1e-3),
        },
        Panel {
            title: "peak memory vs latent size (K = 1)",
            x_desc: S_DESC,
            y_desc: MEM_DESC,
            series: s_series("peak_rss_mib", 1.0),
        },
    ];
    let mut header = "AlignProp training step: ours (burn) vs PyTorch".to_string();
    for key in ["date", "machine"] {
        if let Some(v) = doc.get(key).and_then(Value::as_str) {
            header.push_str(" · ");
            header.push_str(v);
        }
    }
    let size = (2 * PANEL.0, HEADER + 2 * PANEL.1);
    draw_png(png, size, |root| {
        let (top, body) = root.split_vertically(HEADER);
        let centred = Pos::new(HPos::Center, VPos::Center);
        let style = TextStyle::from((FONT, 20).into_font()).pos(centred);
        top.draw_text(&header, &style, (size.0 as i32 / 2, HEADER as i32 / 2))?;
        for (area, p) in body.split_evenly((2, 2)).iter().zip(&panels) {
            panel(area, p)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results JSON of the sweep's shape: time grows with K and with S; full-graph memory grows with K.
    fn results() -> String {
        let mut r = serde_json::Map::new();
        let entry = |ms: f64, mib: f64| serde_json::json!({"median_ms": ms, "peak_rss_mib": mib});
        for k in [1, 2, 4, 8, 20] {
            let x = k as f64;
            r.insert(
                format!("scale/k{k}"),
                serde_json::json!({"ours": entry(12e3 + 1.5e3 * x, 720.0), "torch": entry(12e3 + 1.7e3 * x, 1560.0)}),
            );
            r.insert(
                format!("scale/k{k}_nockpt"),
                serde_json::json!({"ours": entry(12e3 + 2.5e3 * x, 700.0 + 150.0 * x), "torch": entry(12e3 + 1.1e3 * x, 1500.0 + 200.0 * x)}),
            );
        }
        for s in [16, 32, 64] {
            let x = s as f64;
            r.insert(
                format!("scale/s{s}_k1"),
                serde_json::json!({"ours": entry(20.0 * x * x, 0.5 * x * x + 300.0), "torch": entry(22.0 * x * x, 0.6 * x * x + 1000.0)}),
            );
        }
        serde_json::json!({"date": "2026-01-01 00:00 UTC", "machine": "test", "results": r})
            .to_string()
    }

    #[test]
    fn scaling_plot_draws_four_panels_of_both_sides() {
        let dir = std::env::temp_dir().join(format!("alignprop-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, png) = (dir.join("results.json"), dir.join("scaling.png"));
        std::fs::write(&json, results()).unwrap();
        scaling_plot(&json, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (2 * PANEL.0, HEADER + 2 * PANEL.1));
        // Each panel holds curves of both colours.
        for (px, py) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (x0, y0) = (px * PANEL.0, HEADER + py * PANEL.1);
            let count = |c: [u8; 3]| {
                (x0..x0 + PANEL.0)
                    .flat_map(|x| (y0..y0 + PANEL.1).map(move |y| (x, y)))
                    .filter(|&(x, y)| img.get_pixel(x, y).0 == c)
                    .count()
            };
            let (blue, red) = (count([30, 80, 200]), count([200, 60, 30]));
            assert!(
                blue > 150 && red > 150,
                "panel {px},{py}: blue {blue}, red {red}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn scaling_plot_without_results_fails_and_with_no_sweep_draws_axes() {
        let dir =
            std::env::temp_dir().join(format!("alignprop-bench-plot-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, png) = (dir.join("results.json"), dir.join("scaling.png"));
        std::fs::write(&json, "{}").unwrap();
        assert!(
            scaling_plot(&json, &png)
                .unwrap_err()
                .contains("no `results`")
        );
        std::fs::write(&json, r#"{"results": {"op/matmul": {}}}"#).unwrap();
        scaling_plot(&json, &png).unwrap();
        assert!(image::open(&png).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
