//! The output: a readable table on stdout, one `RESULT {json}` line for
//! scripts, and hand-written SVG plots (latency CDFs, resources over time).

use std::{fmt::Write as _, path::Path};

use anyhow::Context;
use serde_json::{Map, Value};

use crate::stats::Summary;

/// A target from issue 5 and whether this run met it.
pub struct Target {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    /// true: value must be ≥ limit; false: ≤ limit.
    pub at_least: bool,
    pub unit: String,
}

impl Target {
    /// Met or missed: printed and in the JSON; never fails a run (targets are
    /// for full runs).
    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.limit
        } else {
            self.value <= self.limit
        }
    }
}

/// One scenario's results.
pub struct Report {
    pub scenario: String,
    pub params: Map<String, Value>,
    rows: Vec<(String, String)>,
    results: Map<String, Value>,
    pub targets: Vec<Target>,
    pub plots: Vec<String>,
    pub notes: Vec<String>,
    /// Correctness failures (loss, duplicates, dead sockets, leaks): what
    /// `--strict` fails on.
    pub problems: Vec<String>,
}

/// Nanoseconds as milliseconds, the unit the targets are written in.
pub fn ms(nanos: u64) -> String {
    format!("{:.3} ms", nanos as f64 / 1e6)
}

/// Bytes as MiB, the unit memory is read in.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            params: Map::new(),
            rows: Vec::new(),
            results: Map::new(),
            targets: Vec::new(),
            plots: Vec::new(),
            notes: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// An input of the run, so a result can be compared only with results of
    /// the same inputs.
    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.insert(key.to_string(), value.into());
    }

    /// A figure: `key` in the JSON, `label` and `human` in the table (no
    /// row when `label` is empty: a value that another row already shows).
    pub fn add(&mut self, key: &str, label: &str, value: impl Into<Value>, human: String) {
        self.results.insert(key.to_string(), value.into());
        if !label.is_empty() {
            self.rows.push((label.to_string(), human));
        }
    }

    /// A whole latency summary under `prefix` (values in ns in the JSON).
    pub fn latency(&mut self, prefix: &str, label: &str, s: &Summary) {
        self.results.insert(
            format!("{prefix}_ns"),
            serde_json::to_value(s).unwrap_or(Value::Null),
        );
        self.rows.push((
            format!("{label} p50 / p90 / p99"),
            format!("{} / {} / {}", ms(s.p50), ms(s.p90), ms(s.p99)),
        ));
        self.rows.push((
            format!("{label} p99.9 / max"),
            format!("{} / {}  (n={})", ms(s.p999), ms(s.max), s.count),
        ));
    }

    /// A target and this run's value (`at_least`: the value must reach the
    /// limit, else stay below it).
    pub fn target(&mut self, name: &str, value: f64, limit: f64, at_least: bool, unit: &str) {
        self.targets.push(Target {
            name: name.to_string(),
            value,
            limit,
            at_least,
            unit: unit.to_string(),
        });
    }

    /// A correctness failure: `--strict` exits 3 on any.
    pub fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    /// Context a reader of the figures needs (limits of this machine, log
    /// lines).
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The table for people, then the `RESULT {json}` line for scripts, on
    /// stdout.
    pub fn print(&self) {
        let width = self
            .rows
            .iter()
            .map(|(l, _)| l.len())
            .max()
            .unwrap_or(10)
            .max(24);
        let mut out = String::new();
        let _ = writeln!(out, "\n== notify-bridge-bench {} ==", self.scenario);
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
            .collect();
        let _ = writeln!(out, "   {}", params.join(" "));
        let _ = writeln!(out, "{}", "-".repeat(width + 32));
        for (label, value) in &self.rows {
            let _ = writeln!(out, "{label:<width$}  {value}");
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "{}", "-".repeat(width + 32));
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "{:<width$}  {} {:.3} {} (target {} {} {})",
                    format!("target: {}", t.name),
                    if t.met() { "MET   " } else { "MISSED" },
                    t.value,
                    t.unit,
                    if t.at_least { ">=" } else { "<=" },
                    t.limit,
                    t.unit
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        for problem in &self.problems {
            let _ = writeln!(out, "PROBLEM: {problem}");
        }
        for plot in &self.plots {
            let _ = writeln!(out, "plot: {plot}");
        }
        print!("{out}");
        println!("RESULT {}", self.json());
    }

    /// Everything in one JSON object: the `RESULT` line that scripts and
    /// docs/performance.md read.
    pub fn json(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "value": t.value, "limit": t.limit,
                    "at_least": t.at_least, "unit": t.unit, "met": t.met(),
                })
            })
            .collect();
        serde_json::json!({
            "scenario": self.scenario,
            "params": self.params,
            "results": self.results,
            "targets": targets,
            "plots": self.plots,
            "notes": self.notes,
            "problems": self.problems,
        })
    }
}

/// One line on a plot.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// An axis: range, scale and tick labels.
pub struct Axis {
    pub label: String,
    pub log: bool,
    pub min: f64,
    pub max: f64,
    pub ticks: Vec<(f64, String)>,
}

impl Axis {
    fn pos(&self, v: f64, len: f64) -> f64 {
        let (lo, hi, v) = if self.log {
            (self.min.log10(), self.max.log10(), v.max(self.min).log10())
        } else {
            (self.min, self.max, v)
        };
        if hi <= lo {
            return 0.0;
        }
        ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * len
    }

    /// A linear axis from 0 to a rounded-up `max` with about 5 ticks.
    pub fn linear(label: &str, max: f64) -> Self {
        let max = if max > 0.0 { max } else { 1.0 };
        let raw = max / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(raw);
        let top = (max / step).ceil() * step;
        let ticks = (0..=((top / step).round() as usize))
            .map(|i| {
                let v = i as f64 * step;
                (v, trim_number(v))
            })
            .collect();
        Self {
            label: label.to_string(),
            log: false,
            min: 0.0,
            max: top,
            ticks,
        }
    }

    /// A latency axis in microseconds, log scale, whole decades.
    pub fn latency_us(min_us: f64, max_us: f64) -> Self {
        let lo = 10f64.powf(min_us.max(1.0).log10().floor());
        let hi = 10f64.powf(max_us.max(lo * 10.0).log10().ceil());
        let mut ticks = Vec::new();
        let mut v = lo;
        while v <= hi * 1.0001 {
            let label = if v >= 1e6 {
                format!("{} s", trim_number(v / 1e6))
            } else if v >= 1e3 {
                format!("{} ms", trim_number(v / 1e3))
            } else {
                format!("{} µs", trim_number(v))
            };
            ticks.push((v, label));
            v *= 10.0;
        }
        Self {
            label: "latency, publish → frame received (log scale)".into(),
            log: true,
            min: lo,
            max: hi,
            ticks,
        }
    }

    /// Percentiles on a "nines" scale: y = −log10(1 − p), so the tail shows.
    pub fn nines() -> Self {
        Self {
            label: "percentile".into(),
            log: false,
            min: 0.0,
            max: 4.0,
            ticks: vec![
                (0.0, "0".into()),
                (std::f64::consts::LOG10_2, "50".into()),
                (1.0, "90".into()),
                (2.0, "99".into()),
                (3.0, "99.9".into()),
                (4.0, "99.99".into()),
            ],
        }
    }
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A latency CDF series from histogram points (ns, fraction).
pub fn cdf_series(name: &str, cdf: &[(f64, f64)]) -> Series {
    Series {
        name: name.to_string(),
        points: cdf
            .iter()
            .map(|(ns, f)| (ns / 1e3, -(1.0 - f.min(0.9999)).log10()))
            .collect(),
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The plot area inside the SVG canvas: one place for the margins that the
/// frame, the ticks and the lines must agree on.
struct Canvas {
    w: f64,
    h: f64,
    left: f64,
    top: f64,
    /// Width and height of the plot area.
    pw: f64,
    ph: f64,
}

impl Canvas {
    fn new() -> Self {
        let (w, h) = (760.0, 460.0);
        let (left, right, top, bottom) = (70.0, 20.0, 40.0, 60.0);
        Self {
            w,
            h,
            left,
            top,
            pw: w - left - right,
            ph: h - top - bottom,
        }
    }

    /// Where a data point lands, in SVG coordinates (y grows downwards).
    fn point(&self, x: &Axis, y: &Axis, vx: f64, vy: f64) -> (f64, f64) {
        (
            self.left + x.pos(vx, self.pw),
            self.top + self.ph - y.pos(vy, self.ph),
        )
    }
}

/// Writes a line plot as a standalone SVG file (no plotting crate: the
/// plots are simple and the bench's dependencies stay few).
pub fn write_svg(
    path: &Path,
    title: &str,
    x: &Axis,
    y: &Axis,
    series: &[Series],
) -> anyhow::Result<()> {
    let c = Canvas::new();
    let mut s = String::new();
    svg_header(&mut s, &c, title);
    svg_grid(&mut s, &c, x, y);
    svg_frame(&mut s, &c, x, y);
    for (i, series) in series.iter().enumerate() {
        svg_series(&mut s, &c, x, y, i, series);
    }
    s.push_str("</svg>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}

/// The `<svg>` element, a white background and the title.
fn svg_header(s: &mut String, c: &Canvas, title: &str) {
    let (w, h) = (c.w, c.h);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
}

/// Grid lines and tick labels of both axes.
fn svg_grid(s: &mut String, c: &Canvas, x: &Axis, y: &Axis) {
    let (left, top, pw, ph) = (c.left, c.top, c.pw, c.ph);
    for (v, label) in &x.ticks {
        let px = left + x.pos(*v, pw);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 16.0,
            esc(label)
        );
    }
    for (v, label) in &y.ticks {
        let py = top + ph - y.pos(*v, ph);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            esc(label)
        );
    }
}

/// The plot area's border and the two axis labels.
fn svg_frame(s: &mut String, c: &Canvas, x: &Axis, y: &Axis) {
    let (left, top, pw, ph) = (c.left, c.top, c.pw, c.ph);
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        c.h - 18.0,
        esc(&x.label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(&y.label)
    );
}

/// The `i`-th series: its line, and its entry in the legend.
fn svg_series(s: &mut String, c: &Canvas, x: &Axis, y: &Axis, i: usize, series: &Series) {
    let color = COLORS[i % COLORS.len()];
    let points: Vec<String> = series
        .points
        .iter()
        .map(|(vx, vy)| {
            let (px, py) = c.point(x, y, *vx, *vy);
            format!("{px:.1},{py:.1}")
        })
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
        points.join(" ")
    );
    let (left, ly) = (c.left, c.top + 16.0 + 18.0 * i as f64);
    let _ = writeln!(
        s,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
        left + 10.0,
        left + 34.0,
        left + 40.0,
        ly + 4.0,
        esc(&series.name)
    );
}

/// Writes the latency CDF of one or more runs.
pub fn latency_plot(
    path: &Path,
    title: &str,
    runs: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let (mut lo, mut hi) = (f64::MAX, 1.0f64);
    for (_, cdf) in runs {
        for (ns, _) in cdf {
            lo = lo.min(ns / 1e3);
            hi = hi.max(ns / 1e3);
        }
    }
    if lo == f64::MAX {
        lo = 1.0;
    }
    let series: Vec<Series> = runs.iter().map(|(n, c)| cdf_series(n, c)).collect();
    write_svg(
        path,
        title,
        &Axis::latency_us(lo, hi),
        &Axis::nines(),
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_plot_and_targets() {
        let dir = std::env::temp_dir().join(format!("nbb-{}", std::process::id()));
        let path = dir.join("t.svg");
        latency_plot(
            &path,
            "t",
            &[("a".into(), vec![(1000.0, 0.5), (5000.0, 1.0)])],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<polyline") && svg.contains("µs"));
        let _ = std::fs::remove_dir_all(dir);
        let mut r = Report::new("x");
        r.target("t", 1.0, 2.0, false, "ms");
        assert!(r.targets[0].met());
        assert_eq!(Axis::linear("x", 9.3).max, 10.0);
    }
}
