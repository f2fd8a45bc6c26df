//! A small line plot of the eval reward over training steps, drawn directly into a PNG (no font needed: the
//! numbers are in `eval.jsonl`; the picture shows the trend).

use std::path::Path;

use image::{Rgb, RgbImage};

const W: u32 = 640;
const H: u32 = 360;
const MARGIN: u32 = 30;

/// Draws `points` (step, value) as a polyline with markers and a light grid, y range padded by 5 %.
pub fn reward_curve(points: &[(f64, f64)], path: &Path) -> Result<(), String> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let (x0, x1) = (MARGIN as f64, (W - MARGIN) as f64);
    let (y0, y1) = ((H - MARGIN) as f64, MARGIN as f64);
    // Grid and axes.
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        line(&mut img, (x0, y), (x1, y), Rgb([225, 225, 225]));
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        line(&mut img, (x, y0), (x, y1), Rgb([225, 225, 225]));
    }
    line(&mut img, (x0, y0), (x1, y0), Rgb([0, 0, 0]));
    line(&mut img, (x0, y0), (x0, y1), Rgb([0, 0, 0]));
    if !points.is_empty() {
        let (smin, smax) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (vmin, vmax) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((vmax - vmin) * 0.05).max(1e-9);
        let (vmin, vmax) = (vmin - pad, vmax + pad);
        let map = |(s, v): (f64, f64)| {
            let fx = if smax > smin {
                (s - smin) / (smax - smin)
            } else {
                0.5
            };
            (
                x0 + (x1 - x0) * fx,
                y0 + (y1 - y0) * (v - vmin) / (vmax - vmin),
            )
        };
        let blue = Rgb([31, 119, 180]);
        for w in points.windows(2) {
            line(&mut img, map(w[0]), map(w[1]), blue);
        }
        for &p in points {
            let (x, y) = map(p);
            for dx in -2..=2 {
                for dy in -2..=2 {
                    put(&mut img, x + dx as f64, y + dy as f64, blue);
                }
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    img.save(path)
        .map_err(|e| format!("{}: cannot write PNG: {e}", path.display()))
}

fn put(img: &mut RgbImage, x: f64, y: f64, c: Rgb<u8>) {
    if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (ax, ay): (f64, f64), (bx, by): (f64, f64), c: Rgb<u8>) {
    let n = (bx - ax).abs().max((by - ay).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(img, ax + (bx - ax) * t, ay + (by - ay) * t, c);
        put(img, ax + (bx - ax) * t, ay + (by - ay) * t + 1.0, c);
    }
}
