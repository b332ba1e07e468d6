//! Charts as a self-contained SVG: per topology, throughput by write size
//! (grouped bars with min-max whiskers) and ping-pong latency percentiles
//! (log scale).
use std::fmt::Write as _;

use super::{
    Workload,
    report::{Machine, Stat, Summary},
};

const PANEL_W: f64 = 580.0;
const PANEL_H: f64 = 330.0;
const COLORS: [&str; 8] = [
    "#555555", "#1b7837", "#2166ac", "#d6604d", "#8073ac", "#e08214", "#35978f", "#c51b7d",
];

struct Chart {
    title: String,
    unit: &'static str,
    groups: Vec<String>,
    /// [group][series]
    values: Vec<Vec<Option<Stat>>>,
    log: bool,
}

pub fn render(summary: &Summary, machine: &Machine) -> String {
    let mut charts = Vec::new();
    for &topo in &summary.topologies {
        let bulk: Vec<Workload> = summary
            .workloads
            .iter()
            .copied()
            .filter(|w| matches!(w, Workload::Bulk { .. }))
            .collect();
        if !bulk.is_empty() {
            charts.push(Chart {
                title: format!("{topo}: bulk throughput by write size"),
                unit: "GB/s",
                groups: bulk
                    .iter()
                    .map(|w| w.label().trim_start_matches("bulk ").to_string())
                    .collect(),
                values: bulk
                    .iter()
                    .map(|&w| {
                        summary
                            .systems
                            .iter()
                            .map(|s| summary.stat(topo, w, s, "gbps"))
                            .collect()
                    })
                    .collect(),
                log: false,
            });
        }
        let pp = Workload::PingPong { size: 64 };
        if summary.workloads.contains(&pp) {
            let pcts = [("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")];
            charts.push(Chart {
                title: format!("{topo}: 64 B ping-pong round trip"),
                unit: "us (log)",
                groups: pcts.iter().map(|(l, _)| l.to_string()).collect(),
                values: pcts
                    .iter()
                    .map(|(_, m)| {
                        summary
                            .systems
                            .iter()
                            .map(|s| summary.stat(topo, pp, s, m))
                            .collect()
                    })
                    .collect(),
                log: true,
            });
        }
    }
    let rows = charts.len().div_ceil(2).max(1);
    let width = 2.0 * PANEL_W + 30.0;
    let height = 90.0 + rows as f64 * (PANEL_H + 20.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="15" y="24" font-size="16" font-weight="bold">zc bench</text><text x="15" y="42">{} | {} reps, median, whiskers min-max</text>"#,
        esc(&machine.line()),
        summary.reps
    );
    // Legend.
    let mut x = 15.0;
    for (i, s) in summary.systems.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="54" width="12" height="12" fill="{}"/><text x="{}" y="65">{}</text>"#,
            COLORS[i % COLORS.len()],
            x + 16.0,
            esc(s)
        );
        x += 30.0 + 8.0 * s.len() as f64;
    }
    for (i, c) in charts.iter().enumerate() {
        let x0 = 15.0 + (i % 2) as f64 * (PANEL_W + 15.0);
        let y0 = 80.0 + (i / 2) as f64 * (PANEL_H + 20.0);
        draw(&mut out, x0, y0, c);
    }
    out.push_str("</svg>\n");
    out
}

fn draw(out: &mut String, x0: f64, y0: f64, c: &Chart) {
    let (left, top, bottom) = (55.0, 28.0, 40.0);
    let (pw, ph) = (PANEL_W - left - 10.0, PANEL_H - top - bottom);
    let (px, py) = (x0 + left, y0 + top);
    let _ = writeln!(
        out,
        r##"<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#ddd"/><text x="{}" y="{}" font-weight="bold">{}</text>"##,
        x0 + 8.0,
        y0 + 18.0,
        esc(&c.title)
    );
    let all: Vec<f64> = c
        .values
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.max)
        .filter(|v| *v > 0.0)
        .collect();
    let Some(hi) = all.iter().copied().reduce(f64::max) else {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">no data</text>"#,
            px + 10.0,
            py + 20.0
        );
        return;
    };
    // The log axis starts a decade below the smallest whisker end.
    let lo_log = c
        .values
        .iter()
        .flatten()
        .flatten()
        .map(|s| s.min)
        .filter(|v| *v > 0.0)
        .reduce(f64::min)
        .unwrap_or(1.0)
        .log10()
        .floor();
    let hi_log = hi.log10().ceil().max(lo_log + 1.0);
    let (ymax, ticks): (f64, Vec<f64>) = if c.log {
        let t = (lo_log as i32..=hi_log as i32)
            .map(|e| 10f64.powi(e))
            .collect();
        (10f64.powf(hi_log), t)
    } else {
        let step = nice_step(hi * 1.1 / 5.0);
        let n = (hi * 1.1 / step).ceil() as usize;
        (
            (n as f64) * step,
            (0..=n).map(|i| i as f64 * step).collect(),
        )
    };
    let y_of = |v: f64| -> f64 {
        let f = if c.log {
            (v.max(10f64.powf(lo_log)).log10() - lo_log) / (hi_log - lo_log)
        } else {
            v / ymax
        };
        py + ph - f.clamp(0.0, 1.0) * ph
    };
    for t in &ticks {
        let y = y_of(*t);
        let _ = writeln!(
            out,
            r##"<line x1="{px}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            px + pw,
            px - 5.0,
            y + 4.0,
            tick_label(*t)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" transform="rotate(-90 {:.1} {:.1})" text-anchor="middle">{}</text>"#,
        x0 + 14.0,
        py + ph / 2.0,
        x0 + 14.0,
        py + ph / 2.0,
        c.unit
    );
    let groups = c.groups.len().max(1) as f64;
    let gw = pw / groups;
    for (g, (label, vals)) in c.groups.iter().zip(&c.values).enumerate() {
        let gx = px + g as f64 * gw;
        let n = vals.len().max(1) as f64;
        let bw = (gw * 0.8) / n;
        for (i, v) in vals.iter().enumerate() {
            let Some(s) = v else { continue };
            let x = gx + gw * 0.1 + i as f64 * bw;
            let y = y_of(s.median);
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                (bw - 2.0).max(1.0),
                (py + ph - y).max(0.0),
                COLORS[i % COLORS.len()],
                tick_label(s.median)
            );
            let cx = x + bw / 2.0 - 1.0;
            let _ = writeln!(
                out,
                r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#000"/>"##,
                y_of(s.min),
                y_of(s.max)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            py + ph + 16.0,
            esc(label)
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{px}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#000"/>"##,
        py + ph,
        px + pw,
        py + ph
    );
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

fn tick_label(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
