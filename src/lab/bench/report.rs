//! What the bench reports and how: the JSON of docs/lab-json.md, a table for
//! the terminal, and one self-contained HTML page with inline SVG charts.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::lab::bench::findings::Finding;
use crate::lab::bench::scenarios;

/// The version of the JSON format; fields may be added, none renamed.
pub(crate) const VERSION: u32 = 1;

/// The whole run: `carousel bench --json FILE`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub(crate) version: u32,
    pub seed: u64,
    pub(crate) quick: bool,
    pub results: Vec<RunResult>,
    // Added fields (docs/lab-json.md lists them all).
    /// The carousel that ran the bench.
    #[serde(default)]
    pub carousel_version: String,
    /// CPUs this host gave the run.
    #[serde(default)]
    pub cpus: usize,
    /// What each scenario found, in words from the numbers above, each number quoted.
    #[serde(default)]
    pub findings: Vec<Finding>,
}

/// One scenario under one algorithm.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    pub algorithm: String,
    pub connections: u64,
    pub failed_connections: u64,
    pub pods: Vec<PodResult>,
    /// Jain's index of each pod's request share over its target share (1: every pod
    /// got exactly its target).
    pub(crate) jain_fairness: f64,
    /// The busiest pod's share over target, against the mean of the same.
    pub(crate) max_mean_ratio: f64,
    pub latency_ms: Latency,
    /// Share of a client's connections that reached its most frequent pod.
    pub stickiness: Option<f64>,
    /// Share of clients whose pod changed across an endpoint change.
    pub moved_fraction: Option<f64>,
    // Added fields beyond the original set (docs/lab-json.md lists them all).
    /// ClientIP affinity on the Service.
    pub affinity: bool,
    /// The Service port's transport, "TCP" or "UDP" (where a connection is a flow).
    #[serde(default = "tcp")]
    pub protocol: String,
    pub requests: u64,
    /// The largest distance between a pod's request share and its target share.
    pub(crate) max_target_deviation: f64,
    /// After the first endpoint change, the time until every pod stays within 5 points
    /// of its target share (window resolution); None when it never does or nothing changed.
    pub(crate) converged_ms: Option<f64>,
    /// Connection shares over equal slices of the run, pods in the order of `pods`.
    pub(crate) windows: Vec<Window>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodResult {
    pub pod: String,
    pub target_share: f64,
    pub connection_share: f64,
    pub(crate) request_share: f64,
    pub connections: u64,
    pub(crate) requests: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Latency {
    pub(crate) p50: f64,
    pub p99: f64,
    pub(crate) p999: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Window {
    pub(crate) start_ms: f64,
    pub(crate) end_ms: f64,
    pub(crate) connection_share: Vec<f64>,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// The scenarios in the order they ran, each once.
    pub fn scenarios(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for r in &self.results {
            if !names.contains(&r.scenario.as_str()) {
                names.push(&r.scenario);
            }
        }
        names
    }

    /// What a scenario over UDP says beside its name: its "connections" are flows.
    fn transport_note(&self, scenario: &str) -> &'static str {
        let udp = self
            .results
            .iter()
            .any(|r| r.scenario == scenario && r.protocol == "UDP");
        match udp {
            true => " (UDP: a connection is a flow, one client socket)",
            false => "",
        }
    }

    /// The tables printed at the end of `carousel bench`, no line wider than 120
    /// columns: per scenario, one of the numbers, then one of each pod's share and
    /// target, the pods as columns, in as many blocks as the width needs.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for scenario in self.scenarios() {
            let results: Vec<&RunResult> = self
                .results
                .iter()
                .filter(|r| r.scenario == scenario)
                .collect();
            let _ = writeln!(out, "== {scenario}{}", self.transport_note(scenario));
            if let Some(about) = scenarios::about(scenario) {
                wrap(&mut out, "  shows: ", about);
            }
            let _ = writeln!(
                out,
                "  {:<NAME$} {:>6} {:>4} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6}",
                "algorithm",
                "conns",
                "fail",
                "jain",
                "max/mn",
                "dev",
                "p50ms",
                "p99ms",
                "p999ms",
                "sticky",
                "moved"
            );
            for r in &results {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
                let _ = writeln!(
                    out,
                    "  {:<NAME$} {:>6} {:>4} {:>6.3} {:>6.2} {:>6.3} {:>7.2} {:>7.2} {:>7.2} {:>6} {:>6}",
                    label(r),
                    r.connections,
                    r.failed_connections,
                    r.jain_fairness,
                    r.max_mean_ratio,
                    r.max_target_deviation,
                    r.latency_ms.p50,
                    r.latency_ms.p99,
                    r.latency_ms.p999,
                    opt(r.stickiness),
                    opt(r.moved_fraction),
                );
            }
            shares_table(&mut out, &results);
            for finding in self.findings.iter().filter(|f| f.scenario == scenario) {
                wrap(&mut out, "  found: ", &finding.text);
            }
            let _ = writeln!(out);
        }
        out
    }

    /// One self-contained page (XHTML, so any XML parser can check it): per scenario a
    /// chart of share against target, one of latency percentiles, and for scenarios
    /// whose pods change, the share over time per algorithm.
    pub fn html(&self) -> String {
        let mut out = String::new();
        out.push_str("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>carousel bench</title>\n<style>\nbody{font-family:sans-serif;margin:2em;color:#222}\nsvg{display:block;margin:0.5em 0 1.5em 0}\ntable{border-collapse:collapse;font-size:0.85em}\ntd,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}\n</style>\n</head>\n<body>\n");
        let _ = writeln!(
            out,
            "<h1>carousel bench</h1>\n<p>carousel {}, {} CPUs, seed {}{}; every number measured through carousel's data path.</p>",
            escape(&self.carousel_version),
            self.cpus,
            self.seed,
            if self.quick { ", quick run" } else { "" }
        );
        out.push_str(GLOSSARY);
        for scenario in self.scenarios() {
            let results: Vec<&RunResult> = self
                .results
                .iter()
                .filter(|r| r.scenario == scenario)
                .collect();
            let _ = writeln!(
                out,
                "<section id=\"scenario-{0}\">\n<h2>{0}{1}</h2>",
                escape(scenario),
                escape(self.transport_note(scenario))
            );
            if let Some(about) = scenarios::about(scenario) {
                let _ = writeln!(out, "<p class=\"shows\">Shows: {}.</p>", escape(about));
            }
            let found: Vec<&Finding> = self
                .findings
                .iter()
                .filter(|f| f.scenario == scenario)
                .collect();
            if !found.is_empty() {
                out.push_str("<ul class=\"findings\">\n");
                for f in found {
                    let _ = writeln!(out, "<li>{}</li>", escape(&f.text));
                }
                out.push_str("</ul>\n");
            }
            out.push_str(&share_chart(scenario, &results));
            out.push_str(&latency_chart(&results));
            if results.iter().any(|r| r.moved_fraction.is_some()) {
                for r in &results {
                    out.push_str(&time_chart(r));
                }
            }
            out.push_str(&html_table(&results));
            out.push_str("</section>\n");
        }
        out.push_str("</body>\n</html>\n");
        out
    }
}

const COLORS: &[&str] = &[
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// The transport of a result written before results had one.
/// The width of the terminal tables, and of their first column.
const WIDTH: usize = 120;
const NAME: usize = 30;

/// Each pod's share of requests and its target share (`25% (25%)`), a column a pod,
/// split into blocks of as many pods as fit in `WIDTH`.
fn shares_table(out: &mut String, results: &[&RunResult]) {
    let mut pods: Vec<&str> = Vec::new();
    for p in results.iter().flat_map(|r| &r.pods) {
        if !pods.contains(&p.pod.as_str()) {
            pods.push(&p.pod);
        }
    }
    // A pod name longer than a column is cut, with an ellipsis.
    let column = pods
        .iter()
        .map(|p| p.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(9, 24);
    let per_block = ((WIDTH - 2 - NAME) / (column + 1)).max(1);
    for block in pods.chunks(per_block) {
        let mut head = format!("  {:<NAME$}", "share (target)");
        for pod in block {
            let _ = write!(head, " {:>column$}", cut(pod, column));
        }
        let _ = writeln!(out, "{head}");
        for r in results {
            let mut line = format!("  {:<NAME$}", label(r));
            for pod in block {
                let cell = r
                    .pods
                    .iter()
                    .find(|p| p.pod == *pod)
                    .map_or("-".into(), |p| {
                        format!(
                            "{:.0}% ({:.0}%)",
                            100.0 * p.request_share,
                            100.0 * p.target_share
                        )
                    });
                let _ = write!(line, " {cell:>column$}");
            }
            let _ = writeln!(out, "{line}");
        }
    }
}

/// `text` after `lead`, wrapped at word boundaries to `WIDTH` columns, the lines after
/// the first indented as far as the lead.
fn wrap(out: &mut String, lead: &str, text: &str) {
    let indent = " ".repeat(lead.chars().count());
    let mut line = lead.to_string();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            let _ = writeln!(out, "{line}");
            line = indent.clone();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    let _ = writeln!(out, "{line}");
}

/// `text` in at most `width` characters: its middle cut out for an ellipsis when longer,
/// since pod names differ at their ends (`web-7d4b9-a1`, `web-7d4b9-b2`).
fn cut(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return text.to_string();
    }
    let head = (width - 1) / 2;
    let tail = width - 1 - head;
    let mut kept: String = chars[..head].iter().collect();
    kept.push('…');
    kept.extend(&chars[chars.len() - tail..]);
    kept
}

/// What the page's columns and words mean.
const GLOSSARY: &str = "<details class=\"glossary\">\n<summary>Glossary</summary>\n<dl>\n\
<dt>share, target</dt><dd>A pod's part of the answered requests, and the part its weights ask for (the weights of the table each connection met, averaged over the run).</dd>\n\
<dt>Jain</dt><dd>Jain's fairness index of each pod's share over its target: 1 when every pod gets exactly its target, 1/n when one of n pods gets everything.</dd>\n\
<dt>max/mean</dt><dd>The busiest pod's share over target against the mean of the same: 1 when balanced, 2 when one pod carries twice its part.</dd>\n\
<dt>dev</dt><dd>The largest distance between a pod's share and its target, in points of share (0.05: five percentage points).</dd>\n\
<dt>p50, p99, p999</dt><dd>Request latency as the client saw it, in milliseconds: half, 99 %, 99.9 % of requests took no longer.</dd>\n\
<dt>stickiness</dt><dd>For clients with more than one connection, the part of a client's connections that reached its most frequent pod: 1 when every client stays on one pod.</dd>\n\
<dt>moved</dt><dd>At each change of the pods, the part of the clients seen before and after whose pod changed.</dd>\n\
<dt>converged</dt><dd>After the first change of the pods, the time until every pod stays within 5 points of its target share.</dd>\n\
</dl>\n</details>\n";

fn tcp() -> String {
    crate::model::Protocol::Tcp.to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(r: &RunResult) -> String {
    if r.affinity {
        format!("{} +affinity", r.algorithm)
    } else {
        r.algorithm.clone()
    }
}

/// Stacked bars, one row per algorithm under a row for the target: each pod's share
/// of requests as a coloured segment.
fn share_chart(scenario: &str, results: &[&RunResult]) -> String {
    let (left, width, row) = (190.0, 600.0, 22.0);
    let rows = results.len() + 1;
    let height = row * rows as f64 + 40.0;
    let mut svg = format!(
        "<svg class=\"chart scenario-chart\" data-scenario=\"{}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\">\n<text x=\"0\" y=\"14\" font-size=\"13\">share of requests per pod, against the target</text>\n",
        escape(scenario),
        left + width + 20.0
    );
    let bar = |svg: &mut String, y: f64, name: &str, shares: Vec<f64>| {
        let _ = writeln!(
            svg,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 15.0,
            escape(name)
        );
        let mut x = left;
        for (i, s) in shares.iter().enumerate() {
            let w = s * width;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{:.1}%</title></rect>",
                row - 4.0,
                COLORS[i % COLORS.len()],
                100.0 * s
            );
            x += w;
        }
    };
    let Some(first) = results.first() else {
        svg.push_str("</svg>\n");
        return svg;
    };
    bar(
        &mut svg,
        24.0,
        "target",
        first.pods.iter().map(|p| p.target_share).collect(),
    );
    for (i, r) in results.iter().enumerate() {
        let y = 24.0 + row * (i + 1) as f64;
        bar(
            &mut svg,
            y,
            &label(r),
            r.pods.iter().map(|p| p.request_share).collect(),
        );
    }
    legend(&mut svg, &first.pods, left, height);
    svg.push_str("</svg>\n");
    svg
}

/// Each pod's colour and name, in a row along the bottom of a chart `height` high.
fn legend(svg: &mut String, pods: &[PodResult], left: f64, height: f64) {
    for (i, p) in pods.iter().enumerate() {
        let x = left + 100.0 * i as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
            height - 12.0,
            COLORS[i % COLORS.len()],
            x + 13.0,
            height - 3.0,
            escape(&p.pod)
        );
    }
}

/// p50, p99 and p999 per algorithm as grouped bars on a shared linear scale.
fn latency_chart(results: &[&RunResult]) -> String {
    let (left, width, group) = (190.0, 560.0, 36.0);
    let height = group * results.len() as f64 + 30.0;
    let max = results
        .iter()
        .map(|r| r.latency_ms.p999)
        .fold(0.001, f64::max);
    let mut svg = format!(
        "<svg class=\"chart latency-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\">\n<text x=\"0\" y=\"14\" font-size=\"13\">latency per request (ms): p50, p99, p999</text>\n",
        left + width + 90.0
    );
    for (i, r) in results.iter().enumerate() {
        let y = 22.0 + group * i as f64;
        let _ = writeln!(
            svg,
            "<text x=\"0\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            y + 18.0,
            escape(&label(r))
        );
        let values = [r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.p999];
        for (j, v) in values.iter().enumerate() {
            let w = (v / max * width).max(1.0);
            let yy = y + 10.0 * j as f64;
            let _ = writeln!(
                svg,
                "<rect x=\"{left}\" y=\"{yy:.1}\" width=\"{w:.1}\" height=\"9\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{v:.2}</text>",
                COLORS[j],
                left + w + 4.0,
                yy + 8.0
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Stacked columns of the connection share per pod, one per window of the run.
fn time_chart(r: &RunResult) -> String {
    let (left, col, height) = (190.0, 40.0, 120.0);
    let mut svg = format!(
        "<svg class=\"chart time-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\">\n<text x=\"0\" y=\"14\" font-size=\"12\">{}: share over time</text>\n",
        left + col * r.windows.len() as f64 + 20.0,
        height + 30.0,
        escape(&label(r))
    );
    for (i, w) in r.windows.iter().enumerate() {
        let x = left + col * i as f64;
        let mut y = 20.0 + height;
        for (p, s) in w.connection_share.iter().enumerate() {
            let h = s * height;
            y -= h;
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {:.0}-{:.0} ms: {:.1}%</title></rect>",
                col - 4.0,
                COLORS[p % COLORS.len()],
                escape(&r.pods[p].pod),
                w.start_ms,
                w.end_ms,
                100.0 * s
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn html_table(results: &[&RunResult]) -> String {
    let mut t = String::from("<table>\n<tr><th>algorithm</th><th>connections</th><th>failed</th><th>Jain</th><th>max/mean</th><th>p50 ms</th><th>p99 ms</th><th>p999 ms</th><th>stickiness</th><th>moved</th></tr>\n");
    for r in results {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
            escape(&label(r)),
            r.connections,
            r.failed_connections,
            r.jain_fairness,
            r.max_mean_ratio,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.p999,
            opt(r.stickiness),
            opt(r.moved_fraction)
        );
    }
    t.push_str("</table>\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(algorithm: &str, affinity: bool, pods: &[&str]) -> RunResult {
        let n = pods.len() as f64;
        RunResult {
            scenario: "rolling-update".into(),
            algorithm: algorithm.into(),
            connections: 1000,
            failed_connections: 0,
            pods: pods
                .iter()
                .map(|p| PodResult {
                    pod: p.to_string(),
                    target_share: 1.0 / n,
                    connection_share: 1.0 / n,
                    request_share: 1.0 / n,
                    connections: 1000 / pods.len() as u64,
                    requests: 1000 / pods.len() as u64,
                })
                .collect(),
            jain_fairness: 1.0,
            max_mean_ratio: 1.0,
            latency_ms: Latency {
                p50: 1234.5,
                p99: 12345.6,
                p999: 123456.7,
            },
            stickiness: Some(0.5),
            moved_fraction: Some(0.25),
            affinity,
            protocol: "TCP".into(),
            requests: 1000,
            max_target_deviation: 0.0,
            converged_ms: None,
            windows: Vec::new(),
        }
    }

    #[test]
    fn the_terminal_table_fits_120_columns_whatever_the_pods() {
        let many: Vec<String> = (0..10)
            .map(|i| format!("kubechaos-custom-5f6c8d9-{i:02}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let report = Report {
            version: VERSION,
            seed: 1,
            quick: true,
            results: vec![
                result("weighted-round-robin", true, &many),
                result("round-robin", false, &many[..9]),
            ],
            carousel_version: "0".into(),
            cpus: 2,
            findings: Vec::new(),
        };
        let table = report.table();
        for line in table.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} wide: {line}",
                line.chars().count()
            );
        }
        // Every pod has its column, its name cut in the middle to fit; the pod a result
        // lacks shows "-".
        for i in 0..10 {
            let name = format!("kubechaos-c…m-5f6c8d9-{i:02}");
            assert_eq!(table.matches(&name).count(), 1, "{name}:\n{table}");
        }
        assert_eq!(table.matches("10% (10%)").count(), 10, "{table}");
        assert_eq!(table.matches("11% (11%)").count(), 9, "{table}");
        let row = table
            .lines()
            .rfind(|l| l.trim_start().starts_with("round-robin "))
            .unwrap();
        assert!(row.trim_end().ends_with(" -"), "{row}");
        assert!(table.contains("weighted-round-robin +affinity"), "{table}");
    }
}
