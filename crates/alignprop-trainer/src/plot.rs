//! Plots drawn with `plotters` into an RGB buffer and written as PNG by `image` (plotters' own encoder would pull
//! a second `image` version), in egui's embedded Ubuntu font (no system fonts needed): the reward curve of a
//! training run, and the pieces other plots share ([`draw_png`], [`Frame`], [`legend_corner`], [`compact`]).

use std::error::Error;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::prelude::*;

/// The font family every plot's text uses (registered by [`register_font`]).
pub const FONT: &str = "sans-serif";

/// What a drawing closure of [`draw_png`] returns: plotters' errors convert into it with `?`.
pub type DrawResult = Result<(), Box<dyn Error>>;

/// The drawing area [`draw_png`] hands to its closure.
pub type Canvas<'b> = DrawingArea<BitMapBackend<'b>, Shift>;

/// Registers the embedded font as [`FONT`] (once per process; plotters' `ab_glyph` text knows no other fonts).
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ok = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        )
        .is_ok();
        assert!(ok, "the embedded Ubuntu Light font does not parse");
    });
}

/// Draws a `(width, height)` picture with `draw` (given the whole picture, white) and writes it to `path` as
/// PNG, creating its folder.
pub fn draw_png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&Canvas<'_>) -> DrawResult,
) -> Result<(), String> {
    register_font();
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into));
        drawn.map_err(|e| format!("{}: cannot draw the plot: {e}", path.display()))?;
    }
    save_rgb_png(buf, (w, h), path)
}

/// Writes a packed RGB8 buffer of `(width, height)` pixels to `path` as PNG, creating its folder.
pub fn save_rgb_png(buf: Vec<u8>, (w, h): (u32, u32), path: &Path) -> Result<(), String> {
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| format!("{}: the RGB buffer is not {w}x{h}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("{}: cannot write PNG: {e}", path.display()))
}

/// A short tick label: at most 4 significant digits, no trailing zeros ("0", "0.05", "2", "12.5", "1500"),
/// exponent notation below 0.001 and from 10^6 on.
pub fn compact(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{e}", trim_zeros(m));
    }
    let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The layout and font sizes of one chart (title, axes, legend), shared by the plots so they look alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame {
    /// Blank border around the chart (the right one is wider: the last x tick label is centred on the edge).
    pub margin: u32,
    pub margin_right: u32,
    pub title_font: u32,
    /// Tick labels.
    pub label_font: u32,
    /// Axis descriptions.
    pub desc_font: u32,
    pub legend_font: u32,
    /// Height under the x axis (tick labels and description) and width left of the y axis.
    pub x_label_area: u32,
    pub y_label_area: u32,
}

/// The legend's inner margin and the width of its line-style samples' column (samples are 24 pixels long).
const LEGEND_MARGIN: u32 = 8;
const LEGEND_SAMPLE: u32 = 32;

impl Frame {
    /// A chart on `area` titled `title`, with this frame's margins and label areas.
    pub fn chart<'a, 'b>(
        &self,
        area: &'a Canvas<'b>,
        title: &str,
    ) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
        let mut b = ChartBuilder::on(area);
        b.margin(self.margin)
            .margin_right(self.margin_right)
            .caption(title, (FONT, self.title_font))
            .x_label_area_size(self.x_label_area)
            .y_label_area_size(self.y_label_area);
        b
    }

    /// The mesh of `chart` in the shared look: tick labels and axis descriptions in [`FONT`] at this frame's sizes,
    /// a light grey grid at the ticks, no minor grid lines. Callers add their descriptions and formatters, then
    /// draw it.
    pub fn mesh<'a, 'c, X, Y, XT, YT>(
        &self,
        chart: &'c mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
    ) -> MeshStyle<'a, 'c, X, Y, BitMapBackend<'a>>
    where
        X: Ranged<ValueType = XT> + ValueFormatter<XT>,
        Y: Ranged<ValueType = YT> + ValueFormatter<YT>,
    {
        let mut mesh = chart.configure_mesh();
        mesh.label_style((FONT, self.label_font))
            .axis_desc_style((FONT, self.desc_font))
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(TRANSPARENT);
        mesh
    }

    /// The plotting area's size (pixels inside the axes) of [`Frame::chart`] on an area of `area` pixels.
    pub fn plot_size(&self, area: (u32, u32), title: &str) -> (u32, u32) {
        register_font();
        let text_h = (FONT, self.title_font)
            .into_font()
            .box_size(title)
            .map_or(self.title_font, |(_, h)| h);
        let title_h = text_h + 2 * (text_h / 2).min(5);
        (
            area.0
                .saturating_sub(self.margin + self.margin_right + self.y_label_area),
            area.1
                .saturating_sub(2 * self.margin + title_h + self.x_label_area),
        )
    }

    /// The size of the legend box [`Frame::draw_legend`] draws for `labels`.
    pub fn legend_size(&self, labels: &[&str]) -> (u32, u32) {
        register_font();
        let font = (FONT, self.legend_font).into_font();
        let mut text = MultiLineText::<(i32, i32), &str>::new((0, 0), font);
        for l in labels {
            text.push_line(*l);
        }
        let (w, h) = text.estimate_dimension().unwrap_or((0, 0));
        (
            w.max(0) as u32 + LEGEND_SAMPLE + 2 * LEGEND_MARGIN,
            h.max(0) as u32 + 2 * LEGEND_MARGIN,
        )
    }

    /// Draws the legend of `chart`'s labelled series at `position`.
    pub fn draw_legend<'a, CT: CoordTranslate>(
        &self,
        chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
        position: SeriesLabelPosition,
    ) -> DrawResult {
        chart
            .configure_series_labels()
            .position(position)
            .margin(LEGEND_MARGIN)
            .legend_area_size(LEGEND_SAMPLE)
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(170, 170, 170))
            .label_font((FONT, self.legend_font))
            .draw()?;
        Ok(())
    }
}

/// Where a legend of `legend` pixels covers none of `lines` (polylines in data coordinates, on axes spanning
/// `x` and `y`, in a plotting area of `plot` pixels): the first free corner of `corners`. When none is free,
/// `y` is raised until the lines stay below the legend and the first upper corner of `corners` is returned.
pub fn legend_corner(
    lines: &[Vec<(f64, f64)>],
    x: &Range<f64>,
    y: &mut Range<f64>,
    plot: (u32, u32),
    legend: (u32, u32),
    corners: &[SeriesLabelPosition],
) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    const GAP: f64 = 6.0; // plotters draws the box 5 pixels in from the corner; a pixel more for the line width.
    let (pw, ph) = (plot.0 as f64, plot.1 as f64);
    let (lw, lh) = (legend.0 as f64 + GAP, legend.1 as f64 + GAP);
    let to_px = |y: &Range<f64>, (a, b): (f64, f64)| {
        (
            (a - x.start) / (x.end - x.start) * pw,
            (y.end - b) / (y.end - y.start) * ph,
        )
    };
    let covers = |corner: &SeriesLabelPosition, y: &Range<f64>| {
        let (x0, x1) = match corner {
            UpperLeft | LowerLeft | MiddleLeft => (0.0, lw),
            _ => (pw - lw, pw),
        };
        let (y0, y1) = match corner {
            UpperLeft | UpperRight | UpperMiddle => (0.0, lh),
            _ => (ph - lh, ph),
        };
        lines.iter().any(|line| {
            let px: Vec<(f64, f64)> = line.iter().map(|&p| to_px(y, p)).collect();
            let inside = |(a, b): (f64, f64)| a >= x0 && a <= x1 && b >= y0 && b <= y1;
            px.iter().any(|&p| inside(p))
                || px.windows(2).any(|w| {
                    let n = ((w[1].0 - w[0].0).abs().max((w[1].1 - w[0].1).abs()) / 2.0).ceil();
                    (1..n as usize).any(|i| {
                        let t = i as f64 / n;
                        inside((
                            w[0].0 + (w[1].0 - w[0].0) * t,
                            w[0].1 + (w[1].1 - w[0].1) * t,
                        ))
                    })
                })
        })
    };
    if let Some(c) = corners.iter().find(|c| !covers(c, y)) {
        return c.clone();
    }
    let top = lines
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let free = ((lh + 2.0) / ph).min(0.6);
    if top.is_finite() && top > y.start {
        y.end = y.end.max(y.start + (top - y.start) / (1.0 - free));
    }
    corners
        .iter()
        .find(|c| matches!(c, UpperLeft | UpperRight | UpperMiddle))
        .cloned()
        .unwrap_or(UpperRight)
}

/// The size of `reward_curve.png`.
pub const REWARD_CURVE_SIZE: (u32, u32) = (800, 450);
/// The colour of the training reward (line; its ± std band is a light tint of it).
pub const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
/// The colour of the eval reward (line and markers).
pub const EVAL_COLOR: RGBColor = RGBColor(230, 97, 1);

const REWARD_FRAME: Frame = Frame {
    margin: 12,
    margin_right: 24,
    title_font: 24,
    label_font: 15,
    desc_font: 17,
    legend_font: 15,
    x_label_area: 48,
    y_label_area: 72,
};

/// What `reward_curve.png` shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardCurve {
    /// The title above the plot (e.g. `reward: <run name>`).
    pub title: String,
    /// The y axis' description (e.g. `brightness reward`).
    pub y_label: String,
    /// The training batches: (optimizer step, reward mean, reward std).
    pub train: Vec<(f64, f64, f64)>,
    /// The evaluations: (optimizer step, eval reward mean).
    pub eval: Vec<(f64, f64)>,
}

/// Draws `curve` to `path` (PNG, [`REWARD_CURVE_SIZE`]): the training reward mean per step as a line over a
/// shaded ± std band, the eval reward as a second line with markers, a legend, integer step ticks. Points that
/// are not finite are left out; with no points at all only the axes are drawn.
pub fn reward_curve(curve: &RewardCurve, path: &Path) -> Result<(), String> {
    let train: Vec<(f64, f64, f64)> = curve
        .train
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .map(|(s, m, d)| (s, m, if d.is_finite() { d.abs() } else { 0.0 }))
        .collect();
    let eval: Vec<(f64, f64)> = curve
        .eval
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let steps = train.iter().map(|p| p.0).chain(eval.iter().map(|p| p.0));
    let (x_range, x_ticks) = match min_max(steps) {
        None => (0.0..1.0, 2),
        Some((lo, hi)) if hi - lo < 1.0 => (lo - 0.5..hi + 0.5, 2),
        Some((lo, hi)) => {
            // A margin so that the first and last markers are not cut in half by the axes.
            let pad = ((hi - lo) * 0.02).max(0.2);
            // At most one tick per step: plotters then picks steps of 1, 2, 5, 10 ... (whole numbers).
            (lo - pad..hi + pad, ((hi - lo).floor() as usize + 1).min(11))
        }
    };
    let values = train
        .iter()
        .flat_map(|p| [p.1 - p.2, p.1 + p.2])
        .chain(eval.iter().map(|p| p.1));
    let mut y_range = match min_max(values) {
        None => 0.0..1.0,
        Some((lo, hi)) => {
            let pad = if hi - lo > 1e-12 * hi.abs().max(1.0) {
                (hi - lo) * 0.06
            } else {
                (lo.abs() * 0.05).max(0.05)
            };
            lo - pad..hi + pad
        }
    };
    let band = train.len() > 1 && train.iter().any(|p| p.2 > 0.0);
    let mut labels = Vec::new();
    if band {
        labels.push("train reward ± std");
    }
    if !train.is_empty() {
        labels.push("train reward (batch mean)");
    }
    if !eval.is_empty() {
        labels.push("eval reward (mean)");
    }
    // The legend goes where it hides nothing: the band's edges and a few lines across it stand for the band.
    let mut lines: Vec<Vec<(f64, f64)>> = (0..=4)
        .map(|i| {
            let f = i as f64 / 2.0 - 1.0;
            train.iter().map(|p| (p.0, p.1 + f * p.2)).collect()
        })
        .collect();
    lines.push(eval.clone());
    use SeriesLabelPosition::*;
    let legend_at = legend_corner(
        &lines,
        &x_range,
        &mut y_range,
        REWARD_FRAME.plot_size(REWARD_CURVE_SIZE, &curve.title),
        REWARD_FRAME.legend_size(&labels),
        &[LowerRight, UpperLeft, UpperRight, LowerLeft],
    );
    draw_png(path, REWARD_CURVE_SIZE, |root| {
        let frame = REWARD_FRAME;
        let mut chart = frame
            .chart(root, &curve.title)
            .build_cartesian_2d(x_range, y_range)?;
        frame
            .mesh(&mut chart)
            .x_desc("optimizer step")
            .y_desc(&curve.y_label)
            .x_labels(x_ticks)
            .y_labels(8)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{}", x.round() as i64)
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| compact(*y))
            .draw()?;
        if band {
            let fill = TRAIN_COLOR.mix(0.18);
            let outline: Vec<(f64, f64)> = train
                .iter()
                .map(|p| (p.0, p.1 + p.2))
                .chain(train.iter().rev().map(|p| (p.0, p.1 - p.2)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(outline, fill.filled())))?
                .label(labels[0])
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 24, y + 6)], fill.filled()));
        }
        if !train.is_empty() {
            let line = TRAIN_COLOR.stroke_width(2);
            chart
                .draw_series(LineSeries::new(train.iter().map(|p| (p.0, p.1)), line))?
                .label("train reward (batch mean)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], line));
            if train.len() == 1 {
                // A line of one point draws nothing.
                let (s, m, _) = train[0];
                chart.draw_series(std::iter::once(Circle::new(
                    (s, m),
                    4,
                    TRAIN_COLOR.filled(),
                )))?;
            }
        }
        if !eval.is_empty() {
            let line = EVAL_COLOR.stroke_width(2);
            let marker = EVAL_COLOR.filled();
            chart.draw_series(eval.iter().map(|&p| Circle::new(p, 4, marker)))?;
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), line))?
                .label("eval reward (mean)")
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (24, 0)], line)
                        + Circle::new((12, 0), 4, marker)
                });
        }
        if !labels.is_empty() {
            frame.draw_legend(&mut chart, legend_at)?;
        }
        Ok(())
    })
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_png(name: &str) -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("alignprop-plot-{}", std::process::id()))
            .join(name)
    }

    fn count(img: &image::RgbImage, c: RGBColor) -> usize {
        img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count()
    }

    #[test]
    fn reward_curve_draws_both_series_and_the_title() {
        let curve = RewardCurve {
            title: "reward: test_run".into(),
            y_label: "brightness reward".into(),
            train: (0..12)
                .map(|i| (i as f64, 0.4 + 0.01 * i as f64, 0.03))
                .collect(),
            eval: vec![(0.0, 0.41), (5.0, 0.45), (10.0, 0.5)],
        };
        let path = temp_png("reward_curve.png");
        reward_curve(&curve, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), REWARD_CURVE_SIZE);
        let (train, eval) = (count(&img, TRAIN_COLOR), count(&img, EVAL_COLOR));
        assert!(train > 200, "train line pixels: {train}");
        assert!(eval > 200, "eval line pixels: {eval}");
        let title_ink = (250..550)
            .flat_map(|x| (0..36).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
            .count();
        assert!(title_ink > 50, "title pixels: {title_ink}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn reward_curve_of_nothing_draws_axes() {
        let path = temp_png("reward_curve_empty.png");
        let one = RewardCurve {
            title: "reward: one".into(),
            y_label: "x".into(),
            train: vec![(3.0, 0.5, f64::NAN)],
            eval: vec![(3.0, f64::NAN)],
        };
        for curve in [RewardCurve::default(), one] {
            reward_curve(&curve, &path).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), REWARD_CURVE_SIZE);
            assert_eq!(count(&img, EVAL_COLOR), 0);
        }
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn legend_goes_to_a_free_corner_or_above_the_lines() {
        use SeriesLabelPosition::*;
        let corners = [UpperLeft, UpperRight];
        let (x, plot, legend) = (0.0..10.0, (500, 300), (100, 60));
        // A rising line crosses the upper right corner only.
        let rising = vec![vec![(0.0, 0.0), (10.0, 10.0)]];
        let mut y = 0.0..10.0;
        assert_eq!(
            legend_corner(&rising, &x, &mut y, plot, legend, &corners),
            UpperLeft
        );
        assert_eq!(y, 0.0..10.0);
        // A flat line at the top crosses both: the axis is raised above it.
        let flat = vec![vec![(0.0, 9.5), (10.0, 9.5)]];
        let corner = legend_corner(&flat, &x, &mut y, plot, legend, &corners);
        assert_eq!(corner, UpperLeft);
        assert!(y.end > 12.0, "{y:?}");
        let mut y2 = y.clone();
        assert_eq!(
            legend_corner(&flat, &x, &mut y2, plot, legend, &corners),
            UpperLeft
        );
        assert_eq!(y2, y, "the raised axis leaves the corner free");
    }

    #[test]
    fn compact_labels() {
        let cases = [
            (0.0, "0"),
            (1e-17, "0"),
            (0.05, "0.05"),
            (0.30000000000000004, "0.3"),
            (2.0, "2"),
            (12.5, "12.5"),
            (1500.0, "1500"),
            (-0.25, "-0.25"),
            (0.0001, "1e-4"),
            (2.5e6, "2.5e6"),
        ];
        for (v, s) in cases {
            assert_eq!(compact(v), s, "{v}");
        }
    }
}
