//! The plot of `gallocy-bench workloads`: speedup (sequential / gallocy) against N, one polyline
//! per workload (and consistency mode when there are several), a dashed line at 1.0, the
//! oversubscribed range (N > CPUs) shaded. Plain SVG text.

use std::fmt::Write;

use super::report::{Plan, Results};

const W: f64 = 780.0;
const H: f64 = 470.0;
/// The plot area.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 570.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 410.0;
const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A step of 1, 2, 2.5 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= raw * (1.0 - 1e-9) {
            return m * mag;
        }
    }
    10.0 * mag
}

/// The y axis: linear from 0, or logarithmic (whole decades) when the speedups span more than
/// a factor of 10.
#[derive(Debug, Clone, Copy, PartialEq)]
enum YScale {
    Linear { top: f64, step: f64 },
    Log { lo: i32, hi: i32 },
}

impl YScale {
    /// A scale for the values `ys` (all > 0) and 1.0.
    fn fit(ys: &[f64]) -> YScale {
        let max = ys.iter().copied().fold(1.0f64, f64::max);
        let min = ys.iter().copied().fold(1.0f64, f64::min);
        if max / min > 10.0 {
            let lo = min.log10().floor() as i32;
            let hi = (max * 1.05).log10().ceil() as i32;
            return YScale::Log { lo, hi: hi.max(lo + 1) };
        }
        let step = nice_step(max * 1.1 / 5.0);
        YScale::Linear { top: ((max * 1.1) / step).ceil().max(1.0) * step, step }
    }

    fn is_log(&self) -> bool {
        matches!(self, YScale::Log { .. })
    }

    /// Where `y` sits, from 0 (bottom) to 1 (top).
    fn frac(&self, y: f64) -> f64 {
        match *self {
            YScale::Linear { top, .. } => y / top,
            YScale::Log { lo, hi } => (y.log10() - lo as f64) / (hi - lo) as f64,
        }
    }

    /// The ticks: (value, label).
    fn ticks(&self) -> Vec<(f64, String)> {
        match *self {
            YScale::Linear { top, step } => {
                let n = (top / step).round() as usize;
                (0..=n)
                    .map(|i| {
                        let y = i as f64 * step;
                        (y, if step < 1.0 { format!("{y:.2}") } else { format!("{y:.0}") })
                    })
                    .collect()
            }
            YScale::Log { lo, hi } => (lo..=hi)
                .map(|k| {
                    let y = 10f64.powi(k);
                    (y, format!("{y:.*}", (-k).max(0) as usize))
                })
                .collect(),
        }
    }
}

/// One line of the plot.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

pub fn render(plan: &Plan, res: &Results) -> String {
    let several_modes = plan.modes.len() > 1;
    let mut series = Vec::new();
    for &w in plan.workloads.iter().filter(|w| w.has_baseline()) {
        for &m in &plan.modes {
            let rows = res.rows.iter().filter(|r| r.workload == w && r.mode == m);
            let points: Vec<(f64, f64)> =
                rows.filter(|r| r.speedup().is_finite()).map(|r| (r.n as f64, r.speedup())).collect();
            let mut label = w.name().to_string();
            if several_modes {
                label += &format!(" ({})", m.name());
            }
            if points.is_empty() {
                label += " (no result)";
            }
            series.push(Series { label, points });
        }
    }
    let (mut x0, mut x1) =
        (plan.ranks.iter().copied().min().unwrap_or(1) as f64, plan.ranks.iter().copied().max().unwrap_or(1) as f64);
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let ys: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| *y > 0.0).collect();
    let scale = YScale::fit(&ys);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (RIGHT - LEFT);
    let sy = |y: f64| BOTTOM - scale.frac(y) * (BOTTOM - TOP);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">gallocy workloads: speedup (sequential ms / gallocy ms) against ranks</text>"#,
        (LEFT + RIGHT) / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="42" fill="#555" text-anchor="middle">{}</text>"##,
        (LEFT + RIGHT) / 2.0,
        esc(&format!(
            "transport {}, placement {}, consistency {}, {} CPUs, median of {} runs",
            plan.transport,
            plan.placement,
            plan.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join("/"),
            plan.nproc,
            plan.reps
        ))
    );
    // Oversubscribed range.
    if let Some(&first_over) = plan.ranks.iter().find(|&&n| n > plan.nproc) {
        let below = plan.ranks.iter().copied().filter(|&n| n <= plan.nproc).max();
        let from = sx(below.map_or(x0, |b| (b + first_over) as f64 / 2.0));
        let _ = writeln!(
            s,
            r##"<rect x="{from:.1}" y="{TOP}" width="{:.1}" height="{}" fill="#f2f2f2"/><text x="{:.1}" y="{}" fill="#888" text-anchor="end">N &gt; {} CPUs: oversubscribed</text>"##,
            RIGHT - from,
            BOTTOM - TOP,
            RIGHT - 4.0,
            TOP + 14.0,
            plan.nproc
        );
    }
    // Axes, ticks, grid.
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{BOTTOM}" stroke="black"/>"#
    );
    for &n in &plan.ranks {
        let x = sx(n as f64);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{n}</text>"#,
            BOTTOM + 5.0,
            BOTTOM + 19.0
        );
    }
    for (y, label) in scale.ticks() {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="black"/><line x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT - 5.0,
            LEFT - 8.0,
            py + 4.0,
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">ranks (N)</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 40.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{}</text>"#,
        (TOP + BOTTOM) / 2.0,
        (TOP + BOTTOM) / 2.0,
        if scale.is_log() { "speedup (log scale)" } else { "speedup" }
    );
    // Speedup 1.0.
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{0:.1}" x2="{RIGHT}" y2="{0:.1}" stroke="black" stroke-dasharray="6,4"/><text x="{1}" y="{2:.1}" text-anchor="end" fill="#333">1.0</text>"##,
        sy(1.0),
        RIGHT - 4.0,
        sy(1.0) - 4.0
    );
    // The series and the legend.
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = se.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&se.label)
        );
        for &(x, y) in &se.points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{} N={x}: {y:.2}</title></circle>"#,
                sx(x),
                sy(y),
                esc(&se.label)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{}" y="{:.1}">{}</text>"#,
            RIGHT + 20.0,
            RIGHT + 44.0,
            RIGHT + 50.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(2.2), 2.5);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
        assert_eq!(esc("a<b&\""), "a&lt;b&amp;&quot;");
        let lin = YScale::fit(&[0.5, 1.4]);
        assert!(!lin.is_log());
        assert_eq!(lin.ticks().last().unwrap().1, "2.00");
        let log = YScale::fit(&[0.002, 1.3]);
        assert_eq!(log, YScale::Log { lo: -3, hi: 1 });
        let labels: Vec<String> = log.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.001", "0.01", "0.1", "1", "10"]);
        assert!((log.frac(1.0) - 0.75).abs() < 1e-9);
    }
}
