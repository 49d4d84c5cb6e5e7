//! `--report FILE.html`: one self-contained page a person can open offline — inline SVG
//! charts (no script, no CDN) of throughput and latency (p50/p99) per second for each of the
//! run's time series, then the whole summary as a table (the same fields as `--json`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::series::{Point, Series};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 32.0;

/// Writes the report for a run: `title`, the series' charts, and `summary` as a table.
pub fn write_report<T: Serialize>(
    path: &Path,
    title: &str,
    summary: &T,
    series: &[Series],
) -> anyhow::Result<()> {
    let value = serde_json::to_value(summary)?;
    let html = render(title, &value, series);
    std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn render(title: &str, summary: &serde_json::Value, series: &[Series]) -> String {
    let mut h = String::new();
    let t = escape(title);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
         body{{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:900px}}\
         h2{{margin-top:32px;font-size:17px}}svg{{background:#fafafa;border:1px solid #ddd}}\
         table{{border-collapse:collapse}}td{{border-bottom:1px solid #eee;padding:2px 10px;\
         font-family:ui-monospace,monospace;font-size:12px;vertical-align:top}}\
         .k{{color:#555}}.legend span{{margin-right:16px}}</style></head><body>\n<h1>{t}</h1>\n"
    );
    if series.iter().all(|s| s.points().is_empty()) {
        h.push_str("<p>No per-second data was recorded.</p>\n");
    }
    for s in series {
        let points = s.points();
        if points.is_empty() {
            continue;
        }
        let name = escape(s.name());
        let unit = escape(s.unit());
        let _ = writeln!(h, "<h2>{name}</h2>");
        let counts: Vec<Option<f64>> = points.iter().map(|p| Some(p.count as f64)).collect();
        h.push_str(&chart(&format!("{unit}/s"), &[("#3b6fb6", &counts)], true));
        let p50: Vec<Option<f64>> = points.iter().map(|p| p.p50_ms).collect();
        let p99: Vec<Option<f64>> = points.iter().map(|p| p.p99_ms).collect();
        if p50.iter().any(Option::is_some) {
            h.push_str(
                "<div class=\"legend\"><span style=\"color:#2a9d5b\">■ p50</span>\
                 <span style=\"color:#d1495b\">■ p99</span> latency (ms) per second</div>\n",
            );
            h.push_str(&chart("ms", &[("#2a9d5b", &p50), ("#d1495b", &p99)], false));
        }
        h.push_str(&points_table(&points));
    }
    h.push_str("<h2>Summary</h2>\n<table>\n");
    let mut rows = Vec::new();
    flatten("", summary, &mut rows);
    for (k, v) in rows {
        let _ = writeln!(
            h,
            "<tr><td class=\"k\">{}</td><td>{}</td></tr>",
            escape(&k),
            escape(&v)
        );
    }
    h.push_str("</table>\n</body></html>\n");
    h
}

/// The per-second numbers under a chart, folded away.
fn points_table(points: &[Point]) -> String {
    let mut h = String::from(
        "<details><summary>per-second values</summary><table>\
         <tr><td>second</td><td>count</td><td>p50 ms</td><td>p99 ms</td></tr>\n",
    );
    let ms = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
    for p in points {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            p.second,
            p.count,
            ms(p.p50_ms),
            ms(p.p99_ms)
        );
    }
    h.push_str("</table></details>\n");
    h
}

/// A round axis maximum at or above `v`.
fn nice_max(v: f64) -> f64 {
    if v.is_nan() || v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|m| *m >= v)
        .unwrap_or(10.0 * mag)
}

fn fmt_tick(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// An SVG chart over seconds 0..n: bars (`bars`) or lines, one per `(colour, values)`.
fn chart(y_label: &str, lines: &[(&str, &Vec<Option<f64>>)], bars: bool) -> String {
    let n = lines.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(1);
    let max = lines
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    let y_max = nice_max(max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let step = plot_w / n as f64;
    let x_of = |i: usize| LEFT + step * (i as f64 + 0.5);
    let y_of = |v: f64| TOP + plot_h * (1.0 - v / y_max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-size=\"11\">"
    );
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let y = y_of(v);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e3e3e3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
    }
    let every = (n / 10).max(1);
    for i in (0..n).step_by(every) {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{i}s</text>",
            x_of(i),
            HEIGHT - BOTTOM + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (colour, values) in lines {
        if bars {
            let w = (step * 0.8).max(1.0);
            for (i, v) in values.iter().enumerate() {
                if let Some(v) = v {
                    let y = y_of(*v);
                    let _ = writeln!(
                        s,
                        "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{i}s: {}</title></rect>",
                        x_of(i) - w / 2.0,
                        (TOP + plot_h - y).max(0.0),
                        fmt_tick(*v)
                    );
                }
            }
        } else {
            // Gaps (seconds without a value) break the line.
            let mut run: Vec<String> = Vec::new();
            let flush = |run: &mut Vec<String>, s: &mut String| {
                if run.len() == 1 {
                    let _ = writeln!(
                        s,
                        "<circle cx=\"{}\" r=\"2\" fill=\"{colour}\"/>",
                        run[0].replace(',', "\" cy=\"")
                    );
                } else if run.len() > 1 {
                    let _ = writeln!(
                        s,
                        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" points=\"{}\"/>",
                        run.join(" ")
                    );
                }
                run.clear();
            };
            for (i, v) in values.iter().enumerate() {
                match v {
                    Some(v) => run.push(format!("{:.1},{:.1}", x_of(i), y_of(*v))),
                    None => flush(&mut run, &mut s),
                }
            }
            flush(&mut run, &mut s);
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Flattens JSON into `path = value` rows (objects by key, arrays by index).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                flatten(&join(k), x, out);
            }
        }
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&join(&i.to_string()), x, out);
            }
        }
        Value::Number(n) => {
            let text = match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.3}"),
                _ => n.to_string(),
            };
            out.push((prefix.to_string(), text));
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_with_charts_and_the_summary() {
        let mut s = Series::new("claims", "answers");
        s.record(100, 1_000);
        s.record(1_500_000, 3_000);
        let summary = serde_json::json!({"scenario": "claims", "latency": {"p99_ms": 2.5},
            "codes": {"ok": 2}, "note": "<b>"});
        let page = render("claims run", &summary, &[s]);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("<svg"));
        assert!(page.contains("<polyline"));
        assert!(page.contains("latency.p99_ms"));
        assert!(page.contains("&lt;b&gt;"));
        assert!(!page.contains("http://cdn") && !page.contains("<script"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(180.0), 200.0);
        assert_eq!(nice_max(2100.0), 2500.0);
    }
}
