//! PNG charts for the trainer's reports: horizontal bar charts of labelled counts (class distributions), line
//! charts of named series (loss and metric curves) and labelled heatmaps (confusion matrices).
//!
//! Text is drawn with a font compiled into the binary (`assets/DejaVuSans-subset.ttf`, ASCII and Latin-1), so a
//! chart renders the same on a build server without any fonts installed as on a workstation. Charts are rendered
//! into an in-memory RGB buffer and encoded with the `image` crate the rest of the workspace already uses.
//!
//! Every chart sizes itself from its content (one row per bar or heatmap row), so 140 article types stay legible.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};
use std::sync::Once;

/// The family name the embedded font is registered under. Plotters' own defaults (legends, axis descriptions) ask
/// for "sans-serif", so registering under that name makes every piece of text use the embedded font.
const FONT_FAMILY: &str = "sans-serif";
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
static REGISTER: Once = Once::new();

/// Series colours, chosen to stay distinguishable for the common forms of colour blindness (Okabe–Ito).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
];

/// Why a chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The chart's data is inconsistent (e.g. a series with another length than the labels).
    #[error("invalid chart {title:?}: {reason}")]
    Invalid { title: String, reason: String },
    /// Plotters failed while drawing.
    #[error("drawing chart {title:?} failed")]
    Draw {
        title: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Encoding or writing the PNG failed.
    #[error("writing chart {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

/// Horizontal bars, one row per label, top to bottom in the order given. With several series the bars are
/// stacked (e.g. the train, val and test counts of each class).
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Caption above the chart.
    pub title: String,
    /// Description of the value axis, e.g. "items".
    pub value_label: String,
    /// Row labels, top to bottom.
    pub labels: Vec<String>,
    /// `(name, values)`; every `values` has one non-negative entry per label. A single series draws no legend.
    pub series: Vec<(String, Vec<f64>)>,
}

/// Lines through `(x, y)` points, one per named series, with a legend.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Caption above the chart.
    pub title: String,
    /// Description of the x axis, e.g. "epoch".
    pub x_label: String,
    /// Description of the y axis, e.g. "loss".
    pub y_label: String,
    /// `(name, points)`; points are drawn in the order given. Non-finite points are skipped.
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// A matrix of values drawn as coloured cells (white = the smallest value, dark blue = the largest), rows top to
/// bottom, columns left to right: a confusion matrix is `rows` = true class, `cols` = predicted class.
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// Caption above the chart.
    pub title: String,
    /// Description of the row axis, e.g. "true class".
    pub row_axis: String,
    /// Description of the column axis, e.g. "predicted class".
    pub col_axis: String,
    /// One label per row, top to bottom.
    pub row_labels: Vec<String>,
    /// One label per column, left to right.
    pub col_labels: Vec<String>,
    /// `values[row][col]`; non-finite cells are drawn grey.
    pub values: Vec<Vec<f64>>,
    /// Print each cell's value in it (skipped automatically when cells are too small to hold text).
    pub annotate: bool,
}

fn register_font() {
    REGISTER.call_once(|| {
        // Invariant: the font is a fixed asset compiled into the binary; the `fonts_are_embedded` test parses it.
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_err() {
            panic!("embedded font assets/DejaVuSans-subset.ttf does not parse");
        }
    });
}

fn invalid(title: &str, reason: impl Into<String>) -> PlotError {
    PlotError::Invalid { title: title.into(), reason: reason.into() }
}

fn font(size: u32) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&BLACK)
}

/// Rough width of `text` in pixels at `size`; only used to reserve room for labels.
fn text_width(text: &str, size: u32) -> u32 {
    (text.chars().count() as f64 * f64::from(size) * 0.6).ceil() as u32
}

/// Draws into an RGB buffer of `width`×`height` and writes it as PNG.
fn render(
    path: &Path,
    title: &str,
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), BoxError>,
) -> Result<(), PlotError> {
    register_font();
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        let draw_err = |source| PlotError::Draw { title: title.into(), source };
        draw(&root).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(Box::new(e)))?;
    }
    // Invariant: the buffer was allocated with exactly width * height * 3 bytes above.
    let img = image::RgbImage::from_raw(width, height, buf).expect("buffer matches the image size");
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Converts plotters' errors, which borrow nothing, into a boxed source.
fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BoxError {
    Box::new(e)
}

/// Writes `chart` as a PNG at `path`.
pub fn bar_chart(chart: &BarChart, path: &Path) -> Result<(), PlotError> {
    let n = chart.labels.len();
    let title = chart.title.as_str();
    if n == 0 {
        return Err(invalid(title, "no labels"));
    }
    if chart.series.is_empty() {
        return Err(invalid(title, "no series"));
    }
    for (name, values) in &chart.series {
        if values.len() != n {
            return Err(invalid(title, format!("series {name:?} has {} values for {n} labels", values.len())));
        }
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(invalid(title, format!("series {name:?} has the value {v}; bars need finite values >= 0")));
        }
    }
    let totals: Vec<f64> = (0..n).map(|i| chart.series.iter().map(|(_, v)| v[i]).sum()).collect();
    let max = totals.iter().copied().fold(0.0, f64::max);
    let x_max = if max > 0.0 { max * 1.12 } else { 1.0 };
    let label_width = chart.labels.iter().map(|l| text_width(l, 13)).max().unwrap_or(0).clamp(40, 320);
    let height = (n as u32 * 22 + 110).max(220);
    let width = 760 + label_width;
    let legend = chart.series.len() > 1;
    render(path, title, width, height, |root| {
        root.fill(&WHITE).map_err(boxed)?;
        let mut ctx = ChartBuilder::on(root)
            .caption(title, font(18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_width + 10)
            .build_cartesian_2d(0.0..x_max, segments(n))
            .map_err(boxed)?;
        // Row 0 is drawn at the top: plotters' y axis grows upwards.
        let row = |i: usize| n - 1 - i;
        ctx.configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_style(font(13))
            .x_label_style(font(12))
            .x_desc(chart.value_label.as_str())
            .axis_desc_style(font(13))
            .x_label_formatter(&|v| if x_max >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(r) if *r < n => chart.labels[n - 1 - *r].clone(),
                _ => String::new(),
            })
            .draw()
            .map_err(boxed)?;
        let mut offsets = vec![0.0; n];
        for (k, (name, values)) in chart.series.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            let bars: Vec<_> = (0..n)
                .filter(|&i| values[i] > 0.0)
                .map(|i| {
                    let (x0, x1) = (offsets[i], offsets[i] + values[i]);
                    Rectangle::new(
                        [(x0, SegmentValue::Exact(row(i))), (x1, SegmentValue::Exact(row(i) + 1))],
                        colour.filled(),
                    )
                })
                .collect();
            for i in 0..n {
                offsets[i] += values[i];
            }
            let series = ctx.draw_series(bars).map_err(boxed)?;
            if legend {
                series
                    .label(name.as_str())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
            }
        }
        // The total at the end of each bar, so small classes can be read without squinting at the axis.
        let totals_text = (0..n).map(|i| {
            Text::new(format_count(totals[i]), (totals[i] + x_max * 0.005, SegmentValue::CenterOf(row(i))), font(11))
        });
        ctx.draw_series(totals_text).map_err(boxed)?;
        if legend {
            ctx.configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(font(13))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(boxed)?;
        }
        Ok(())
    })
}

/// `n` category slots for a segmented axis. Plotters' integer ranges include their end, so `0..n` would make `n + 1`.
fn segments(n: usize) -> plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordusize> {
    (0..n.saturating_sub(1)).into_segmented()
}

fn format_count(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v:.3}") }
}

/// Writes `chart` as a PNG at `path`.
pub fn line_chart(chart: &LineChart, path: &Path) -> Result<(), PlotError> {
    let title = chart.title.as_str();
    let points = || chart.series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    if points().next().is_none() {
        return Err(invalid(title, "no finite points in any series"));
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    // A single point or a flat line still needs a non-empty range to draw.
    if x1 - x0 <= f64::EPSILON {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = if y1 - y0 <= f64::EPSILON { 1.0 } else { (y1 - y0) * 0.05 };
    let (y0, y1) = (y0 - pad, y1 + pad);
    render(path, title, 900, 560, |root| {
        root.fill(&WHITE).map_err(boxed)?;
        let mut ctx = ChartBuilder::on(root)
            .caption(title, font(18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(boxed)?;
        ctx.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc(chart.y_label.as_str())
            .axis_desc_style(font(13))
            .label_style(font(12))
            .draw()
            .map_err(boxed)?;
        for (k, (name, pts)) in chart.series.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            ctx.draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(boxed)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(boxed)?;
        Ok(())
    })
}

/// Writes `map` as a PNG at `path`.
pub fn heatmap(map: &Heatmap, path: &Path) -> Result<(), PlotError> {
    let title = map.title.as_str();
    let (rows, cols) = (map.row_labels.len(), map.col_labels.len());
    if rows == 0 || cols == 0 {
        return Err(invalid(title, "no rows or no columns"));
    }
    if map.values.len() != rows {
        return Err(invalid(title, format!("{} value rows for {rows} row labels", map.values.len())));
    }
    if let Some((r, row)) = map.values.iter().enumerate().find(|(_, row)| row.len() != cols) {
        return Err(invalid(title, format!("row {r} has {} values for {cols} column labels", row.len())));
    }
    let finite = map.values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let cell = (720 / rows.max(cols) as u32).clamp(12, 60);
    let row_label_width = map.row_labels.iter().map(|l| text_width(l, 12)).max().unwrap_or(0).clamp(30, 240);
    let col_label_height = map.col_labels.iter().map(|l| text_width(l, 12)).max().unwrap_or(0).clamp(30, 240);
    let width = cols as u32 * cell + row_label_width + 70;
    let height = rows as u32 * cell + col_label_height + 100;
    let annotate = map.annotate && cell >= 28;
    render(path, title, width, height, |root| {
        root.fill(&WHITE).map_err(boxed)?;
        let mut ctx = ChartBuilder::on(root)
            .caption(title, font(18))
            .margin(12)
            .x_label_area_size(col_label_height + 24)
            .y_label_area_size(row_label_width + 24)
            .build_cartesian_2d(segments(cols), segments(rows))
            .map_err(boxed)?;
        ctx.configure_mesh()
            .disable_mesh()
            // Column labels are drawn below, rotated: plotters centres rotated axis labels on the axis line.
            .x_labels(cols)
            .x_label_formatter(&|_| String::new())
            .y_labels(rows)
            .x_desc(map.col_axis.as_str())
            .y_desc(map.row_axis.as_str())
            .axis_desc_style(font(13))
            .y_label_style(font(12))
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(r) if *r < rows => map.row_labels[rows - 1 - *r].clone(),
                _ => String::new(),
            })
            .draw()
            .map_err(boxed)?;
        let cells = (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))).map(|(r, c)| {
            let v = map.values[r][c];
            let y = rows - 1 - r;
            let colour = if v.is_finite() { shade(v, lo, hi) } else { RGBColor(190, 190, 190) };
            Rectangle::new(
                [
                    (SegmentValue::Exact(c), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(c + 1), SegmentValue::Exact(y + 1)),
                ],
                colour.filled(),
            )
        });
        ctx.draw_series(cells).map_err(boxed)?;
        let style = font(12).transform(FontTransform::Rotate90).pos(Pos::new(HPos::Left, VPos::Center));
        for (c, label) in map.col_labels.iter().enumerate() {
            let (x, y) = ctx.backend_coord(&(SegmentValue::CenterOf(c), SegmentValue::Exact(0)));
            root.draw(&Text::new(label.as_str(), (x, y + 10), style.clone())).map_err(boxed)?;
        }
        if annotate {
            let texts = (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))).filter_map(|(r, c)| {
                let v = map.values[r][c];
                if !v.is_finite() {
                    return None;
                }
                // Dark cells get white text.
                let dark = hi > lo && (v - lo) / (hi - lo) > 0.55;
                let style =
                    font(11).color(if dark { &WHITE } else { &BLACK }).pos(Pos::new(HPos::Center, VPos::Center));
                Some(Text::new(
                    format_count(v),
                    (SegmentValue::CenterOf(c), SegmentValue::CenterOf(rows - 1 - r)),
                    style,
                ))
            });
            ctx.draw_series(texts).map_err(boxed)?;
        }
        Ok(())
    })
}

/// White (lowest) to dark blue (highest), linear in the value.
fn shade(v: f64, lo: f64, hi: f64) -> RGBColor {
    let t = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.0 };
    let mix = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
    RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    /// Pixels that are neither white nor (nearly) grey: how much of the chart is coloured data.
    fn count_colour(img: &image::RgbImage, colour: RGBColor) -> usize {
        img.pixels().filter(|p| p.0 == [colour.0, colour.1, colour.2]).count()
    }

    fn dark_pixels(img: &image::RgbImage, x0: u32, x1: u32) -> usize {
        (0..img.height())
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 100)
            .count()
    }

    #[test]
    fn fonts_are_embedded() {
        assert!(ab_glyph_parses(FONT));
    }

    fn ab_glyph_parses(bytes: &'static [u8]) -> bool {
        plotters::style::register_font("probe", FontStyle::Normal, bytes).is_ok()
    }

    #[test]
    fn bar_chart_draws_proportional_stacked_bars_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bars.png");
        let chart = BarChart {
            title: "colour".into(),
            value_label: "items".into(),
            labels: vec!["Black".into(), "Blue".into(), "a much longer class name".into()],
            series: vec![("train".into(), vec![300.0, 100.0, 0.0]), ("test".into(), vec![100.0, 0.0, 10.0])],
        };
        bar_chart(&chart, &path).unwrap();
        let img = decode(&path);
        // Three rows are shorter than the minimum chart height.
        assert_eq!(img.height(), 220);
        let (train, test) = (count_colour(&img, PALETTE[0]), count_colour(&img, PALETTE[1]));
        // Bar areas follow the totals per series (400 train vs 110 test), minus what the legend swatches add.
        let ratio = train as f64 / test as f64;
        assert!((2.8..4.4).contains(&ratio), "train/test pixel ratio {ratio} ({train} vs {test})");
        // Labels are drawn: the label column on the left holds dark text pixels.
        assert!(dark_pixels(&img, 0, 120) > 100, "no label text drawn");
    }

    #[test]
    fn bar_chart_rejects_inconsistent_series() {
        let dir = tempfile::tempdir().unwrap();
        let chart = BarChart {
            title: "t".into(),
            value_label: "n".into(),
            labels: vec!["a".into(), "b".into()],
            series: vec![("s".into(), vec![1.0])],
        };
        let err = bar_chart(&chart, &dir.path().join("x.png")).unwrap_err().to_string();
        assert!(err.contains("series \"s\" has 1 values for 2 labels"), "{err}");
        let chart = BarChart { series: vec![("s".into(), vec![1.0, f64::NAN])], ..chart };
        assert!(bar_chart(&chart, &dir.path().join("x.png")).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn line_chart_draws_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let chart = LineChart {
            title: "loss".into(),
            x_label: "epoch".into(),
            y_label: "loss".into(),
            series: vec![
                ("train".into(), (0..20).map(|i| (f64::from(i), 2.0 / f64::from(i + 1))).collect()),
                ("val".into(), vec![(0.0, 2.5), (10.0, f64::NAN), (19.0, 0.4)]),
            ],
        };
        line_chart(&chart, &path).unwrap();
        let img = decode(&path);
        assert_eq!(img.dimensions(), (900, 560));
        assert!(count_colour(&img, PALETTE[0]) > 200);
        assert!(count_colour(&img, PALETTE[1]) > 200);
        let empty = LineChart { series: vec![("x".into(), vec![(f64::NAN, 1.0)])], ..chart };
        assert!(matches!(line_chart(&empty, &path), Err(PlotError::Invalid { .. })));
    }

    #[test]
    fn heatmap_shades_cells_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cm.png");
        let map = Heatmap {
            title: "confusion".into(),
            row_axis: "true".into(),
            col_axis: "predicted".into(),
            row_labels: vec!["cat".into(), "dog".into()],
            col_labels: vec!["cat".into(), "dog".into()],
            values: vec![vec![90.0, 10.0], vec![0.0, 50.0]],
            annotate: true,
        };
        heatmap(&map, &path).unwrap();
        let img = decode(&path);
        // The largest cell is the darkest colour of the scale, and a quarter of the cells are exactly that.
        let darkest = count_colour(&img, shade(90.0, 0.0, 90.0));
        let cell = (720 / 2u32).clamp(12, 60) as usize;
        assert!(darkest > cell * cell / 2, "darkest cell has {darkest} pixels");
        let bad = Heatmap { values: vec![vec![1.0]], ..map };
        assert!(heatmap(&bad, &path).unwrap_err().to_string().contains("1 value rows for 2 row labels"));
    }
}
