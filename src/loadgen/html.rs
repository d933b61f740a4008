//! A self-contained HTML report of one run: the summary table, the latency histogram and
//! completions per second, drawn as inline SVG (no scripts, no network), so the file opens
//! in any browser straight from disk.

use std::fmt::Write as _;

use super::report::Summary;

const W: f64 = 760.0;
const H: f64 = 260.0;
const PAD: f64 = 48.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

/// Axes with a title and a y-axis maximum label.
fn frame(out: &mut String, title: &str, x_label: &str, y_max: &str) {
    let _ = write!(
        out,
        r##"<svg role="img" aria-label="{t}" width="{W}" height="{h}" viewBox="0 0 {W} {h}">
<text x="{PAD}" y="18" class="title">{t}</text>
<line x1="{PAD}" y1="{y0}" x2="{x1}" y2="{y0}" class="axis"/>
<line x1="{PAD}" y1="30" x2="{PAD}" y2="{y0}" class="axis"/>
<text x="{xl}" y="{yl}" class="label" text-anchor="middle">{xlab}</text>
<text x="{lx}" y="36" class="label" text-anchor="end">{y_max}</text>
<text x="{lx}" y="{y0}" class="label" text-anchor="end">0</text>
"##,
        t = escape(title),
        h = H + 30.0,
        y0 = H,
        x1 = W - 10.0,
        xl = (W + PAD) / 2.0,
        yl = H + 26.0,
        xlab = escape(x_label),
        lx = PAD - 4.0,
    );
}

fn histogram_svg(s: &Summary, out: &mut String) {
    let max = s
        .histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(0)
        .max(1);
    frame(
        out,
        "Latency histogram",
        "latency (upper edge of each bar, ms)",
        &max.to_string(),
    );
    let n = s.histogram.len().max(1) as f64;
    let bw = (W - PAD - 10.0) / n;
    for (i, b) in s.histogram.iter().enumerate() {
        let h = (H - 30.0) * b.count as f64 / max as f64;
        let x = PAD + i as f64 * bw;
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" class="bar"><title>≤ {m:.2} ms: {c} requests ({f:.1} %)</title></rect>"#,
            y = H - h,
            w = (bw - 2.0).max(1.0),
            m = b.mark * 1e3,
            c = b.count,
            f = b.frequency * 100.0,
        );
        if i % 4 == 0 || i + 1 == s.histogram.len() {
            let _ = write!(
                out,
                r#"<text x="{cx:.1}" y="{ty}" class="tick" text-anchor="middle">{m:.2}</text>"#,
                cx = x + bw / 2.0,
                ty = H + 12.0,
                m = b.mark * 1e3,
            );
        }
    }
    out.push_str("</svg>\n");
}

fn throughput_svg(s: &Summary, out: &mut String) {
    let max = s.per_second.iter().copied().max().unwrap_or(0).max(1);
    frame(
        out,
        "Completed requests per second",
        "seconds since the start of measurement",
        &max.to_string(),
    );
    let n = s.per_second.len();
    let step = (W - PAD - 10.0) / (n.max(2) - 1) as f64;
    let points: Vec<String> = s
        .per_second
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            format!(
                "{:.1},{:.1}",
                PAD + i as f64 * step,
                H - (H - 30.0) * v as f64 / max as f64
            )
        })
        .collect();
    let _ = write!(
        out,
        r#"<polyline points="{}" class="line"/>"#,
        points.join(" ")
    );
    for (i, &v) in s.per_second.iter().enumerate() {
        let _ = write!(
            out,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" class="dot"><title>second {i}: {v} requests</title></circle>"#,
            x = PAD + i as f64 * step,
            y = H - (H - 30.0) * v as f64 / max as f64,
        );
        if n <= 12 || i % (n / 10).max(1) == 0 {
            let _ = write!(
                out,
                r#"<text x="{x:.1}" y="{ty}" class="tick" text-anchor="middle">{i}</text>"#,
                x = PAD + i as f64 * step,
                ty = H + 12.0,
            );
        }
    }
    out.push_str("</svg>\n");
}

/// The report page. `title` names the run (target, model, concurrency...).
pub fn render(title: &str, s: &Summary) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #1d2430; }}
h1 {{ font-size: 20px; }} table {{ border-collapse: collapse; margin: 12px 0 20px; }}
td, th {{ border: 1px solid #ccd3dd; padding: 4px 10px; text-align: right; }}
th {{ background: #eef2f7; text-align: left; }}
.title {{ font-size: 14px; font-weight: 600; fill: #1d2430; }}
.label, .tick {{ font-size: 11px; fill: #4a5566; }}
.axis {{ stroke: #4a5566; stroke-width: 1; }}
.bar {{ fill: #3b7dd8; }} .line {{ fill: none; stroke: #d8663b; stroke-width: 2; }}
.dot {{ fill: #d8663b; }} svg {{ display: block; margin: 8px 0 24px; }}
</style></head><body>
<h1>{t}</h1>
<table>
<tr><th>Count</th><td>{count}</td><th>Requests/sec</th><td>{rps:.2}</td></tr>
<tr><th>Total</th><td>{total:.2} s</td><th>Average</th><td>{avg}</td></tr>
<tr><th>Fastest</th><td>{fast}</td><th>Slowest</th><td>{slow}</td></tr>
</table>
<table><tr><th>Percentile</th>"#,
        t = escape(title),
        count = s.count,
        rps = s.rps,
        total = s.total as f64 / 1e9,
        avg = ms(s.average),
        fast = ms(s.fastest),
        slow = ms(s.slowest),
    );
    for p in &s.latency_distribution {
        let _ = write!(out, "<th>p{}</th>", p.percentage);
    }
    out.push_str("</tr><tr><th>Latency</th>");
    for p in &s.latency_distribution {
        let _ = write!(out, "<td>{}</td>", ms(p.latency));
    }
    out.push_str("</tr></table>\n<table><tr><th>Status</th><th>Responses</th></tr>");
    for (k, v) in &s.status_code_distribution {
        let _ = write!(out, "<tr><td>{}</td><td>{v}</td></tr>", escape(k));
    }
    for (k, v) in &s.error_distribution {
        let _ = write!(out, "<tr><td>{}</td><td>{v}</td></tr>", escape(k));
    }
    out.push_str("</table>\n");
    histogram_svg(s, &mut out);
    throughput_svg(s, &mut out);
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::loadgen::report::Outcome;

    #[test]
    fn the_report_holds_the_numbers_and_both_plots() {
        let o = Outcome {
            latencies_ns: (1..=500).map(|i| i * 20_000).collect(),
            statuses: BTreeMap::from([("OK".into(), 500), ("<429>".into(), 3)]),
            elapsed: Duration::from_secs(5),
            per_second: vec![90, 110, 100, 101, 102],
            ..Default::default()
        };
        let html = render("grpc 127.0.0.1:8081 add_sub c=8", &o.summary());
        assert!(html.contains("<td>503</td>"), "count");
        assert!(html.contains("100.60"), "requests/sec");
        assert_eq!(html.matches("class=\"bar\"").count(), 20);
        assert_eq!(html.matches("class=\"dot\"").count(), 5);
        assert!(html.contains("&lt;429&gt;"), "escaped status");
        assert!(!html.contains("<script"), "no scripts");
    }
}
