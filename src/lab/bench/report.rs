//! What the bench reports: the data of a run, its JSON (docs/lab-json.md) and the
//! tables for the terminal. The HTML page is drawn from it in `page`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::lab::bench::findings::Finding;
use crate::lab::bench::own::OwnPods;
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
    /// With `--pods`: the real pods the runs went to, and what their latencies are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_pods: Option<OwnPods>,
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
    /// Pods that answered at least one request.
    #[serde(default)]
    pub pods_used: u64,
    /// Over the connections begun after the last endpoint change, the busiest pod's
    /// share over target against the mean of the same; None when nothing changed.
    #[serde(default)]
    pub final_max_mean_ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodResult {
    pub pod: String,
    pub target_share: f64,
    pub connection_share: f64,
    pub(crate) request_share: f64,
    pub connections: u64,
    pub requests: u64,
    /// Its share of the connections begun after the last endpoint change; None when
    /// nothing changed.
    #[serde(default)]
    pub final_share: Option<f64>,
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
    pub(crate) fn transport_note(&self, scenario: &str) -> &'static str {
        let udp = self
            .results
            .iter()
            .any(|r| r.scenario == scenario && r.protocol == "UDP");
        match udp {
            true => " (UDP: a connection is a flow, one client socket)",
            false => "",
        }
    }

    /// With `--pods`, which real pods the runs went to and what the latencies are.
    pub(crate) fn pods_note(&self) -> Option<String> {
        let own = self.own_pods.as_ref()?;
        let pods: Vec<String> = own
            .pods
            .iter()
            .map(|p| format!("{} at {} (weight {})", p.pod, p.address, p.weight))
            .collect();
        Some(format!(
            "Your pods: {} port {} from {}: {}. Latencies are {}.",
            own.service,
            own.port,
            own.state_file.display(),
            pods.join(", "),
            own.latency
        ))
    }

    /// The results of one scenario, in the order they ran.
    pub(crate) fn results_of(&self, scenario: &str) -> Vec<&RunResult> {
        self.results
            .iter()
            .filter(|r| r.scenario == scenario)
            .collect()
    }

    /// The tables printed at the end of `carousel bench`, no line wider than 120
    /// columns: per scenario, one of the numbers, then one of each pod's share and
    /// target, the pods as columns, in as many blocks as the width needs.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if let Some(note) = self.pods_note() {
            wrap(&mut out, "", &note);
        }
        for scenario in self.scenarios() {
            let results = self.results_of(scenario);
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
}

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
pub(crate) fn cut(text: &str, width: usize) -> String {
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

/// The transport of a result written before results had one.
fn tcp() -> String {
    crate::model::Protocol::Tcp.to_string()
}

/// A result's row name: its algorithm, and whether ClientIP affinity was on.
pub(crate) fn label(r: &RunResult) -> String {
    if r.affinity {
        format!("{} +affinity", r.algorithm)
    } else {
        r.algorithm.clone()
    }
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
                    final_share: None,
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
            pods_used: pods.len() as u64,
            final_max_mean_ratio: None,
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
            own_pods: None,
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
