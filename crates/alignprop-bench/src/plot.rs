//! Scaling curves of the benchmark results as one PNG: AlignProp step time and peak memory against K
//! (checkpointed and full-graph backward) and against the latent size, ours and PyTorch's.

use std::path::Path;

use font8x8::legacy::BASIC_LEGACY;
use image::{Rgb, RgbImage};
use serde_json::Value;

/// One curve: label, colour, dashed, points `(x, y)`.
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

const PW: u32 = 480;
const PH: u32 = 320;
const M: u32 = 48;

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, color: [u8; 3]) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = BASIC_LEGACY.get(ch as usize).copied().unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + (i * 8 + col) as i64, y + row as i64);
                    if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height()
                    {
                        img.put_pixel(px as u32, py as u32, Rgb(color));
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), color: [u8; 3], dashed: bool) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
    for i in 0..=n {
        if dashed && (i / 5) % 2 == 1 {
            continue;
        }
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(color));
            }
        }
    }
}

/// Draws one panel at `(ox, oy)`: axes from 0, grid, the series, axis labels and the legend.
fn panel(img: &mut RgbImage, ox: u32, oy: u32, title: &str, xlabel: &str, series: &[Series]) {
    let (x0, x1) = ((ox + M) as f64, (ox + PW - 16) as f64);
    let (y0, y1) = ((oy + PH - M) as f64, (oy + 28) as f64);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let xmax = pts.clone().map(|p| p.0).fold(0.0, f64::max).max(1e-9) * 1.05;
    let ymax = pts.map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        line(img, (x0, y), (x1, y), [225, 225, 225], false);
        text(
            img,
            ox as i64 + 2,
            y as i64 - 4,
            &format_num(ymax * i as f64 / 4.0),
            [90, 90, 90],
        );
    }
    line(img, (x0, y0), (x1, y0), [0, 0, 0], false);
    line(img, (x0, y0), (x0, y1), [0, 0, 0], false);
    text(img, (ox + M) as i64, oy as i64 + 8, title, [0, 0, 0]);
    text(
        img,
        (ox + PW / 2) as i64,
        (oy + PH - 20) as i64,
        xlabel,
        [0, 0, 0],
    );
    let map = |(x, y): (f64, f64)| (x0 + (x1 - x0) * x / xmax, y0 + (y1 - y0) * y / ymax);
    for (k, s) in series.iter().enumerate() {
        let mut prev = None;
        for &p in &s.points {
            let q = map(p);
            if let Some(a) = prev {
                line(img, a, q, s.color, s.dashed);
            }
            for dx in -2..=2 {
                for dy in -2..=2 {
                    let (px, py) = (q.0 as i64 + dx, q.1 as i64 + dy);
                    if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height()
                    {
                        img.put_pixel(px as u32, py as u32, Rgb(s.color));
                    }
                }
            }
            text(
                img,
                q.0 as i64 - 4,
                y0 as i64 + 6,
                &format_num(p.0),
                [90, 90, 90],
            );
            prev = Some(q);
        }
        text(
            img,
            (ox + M + 8) as i64,
            (oy + 40 + 12 * k as u32) as i64,
            &s.label,
            s.color,
        );
    }
}

fn format_num(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
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
            curve("ours (K=1)", blue, false, "ours", key, scale, &ss),
            curve("torch (K=1)", red, false, "torch", key, scale, &ss),
        ]
    };
    let mut img = RgbImage::from_pixel(2 * PW, 2 * PH, Rgb([255, 255, 255]));
    panel(
        &mut img,
        0,
        0,
        "AlignProp step time (s) vs K",
        "K",
        &k_series("median_ms", 1e-3),
    );
    panel(
        &mut img,
        PW,
        0,
        "peak memory (MiB) vs K",
        "K",
        &k_series("peak_rss_mib", 1.0),
    );
    panel(
        &mut img,
        0,
        PH,
        "step time (s) vs latent size",
        "latent side",
        &s_series("median_ms", 1e-3),
    );
    panel(
        &mut img,
        PW,
        PH,
        "peak memory (MiB) vs latent size",
        "latent side",
        &s_series("peak_rss_mib", 1.0),
    );
    img.save(png).map_err(|e| format!("{}: {e}", png.display()))
}
