//! A snapshot as text, a table per Service port (comfy-table: columns as wide as their
//! content, or wrapped to fit a terminal), or as one JSON document.

use std::fmt::Write as _;

use comfy_table::presets::ASCII_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};

use super::{Fairness, PodStatus, ServiceStatus, Snapshot, State};

const COLUMNS: [&str; 7] = [
    "pod", "endpoint", "state", "weight", "active", "total", "share",
];
/// Where the numbers start: they are right-aligned.
const FIRST_NUMBER: usize = 3;

/// The tables `carousel status` prints, each at most `width` columns wide when the
/// content allows (long cells wrap); with no width, as wide as the content.
pub fn render(snapshot: &Snapshot, width: Option<u16>) -> String {
    if snapshot.services.is_empty() {
        return "no Service has a series yet\n".to_string();
    }
    let mut out = String::new();
    for s in &snapshot.services {
        let _ = writeln!(out, "{}", title(s));
        let _ = writeln!(out, "{}", table(&s.pods, width));
        out.push('\n');
    }
    out
}

/// `namespace/service port P`, its protocol when UDP, and its fairness.
fn title(s: &ServiceStatus) -> String {
    // A UDP port's active, total and share count flows.
    let protocol = match s.protocol {
        "UDP" => " UDP (flows)",
        _ => "",
    };
    format!(
        "{}/{} port {}{protocol}  fairness {}",
        s.namespace,
        s.service,
        s.port,
        fairness(s.fairness.as_ref())
    )
}

fn fairness(fairness: Option<&Fairness>) -> String {
    let Some(f) = fairness else {
        return "— (no picks yet)".to_string();
    };
    let picks = |n: u64| match n {
        1 => "1 recent pick".to_string(),
        n => format!("{n} recent picks"),
    };
    match (f.meaningful, f.window_picks) {
        (true, Some(n)) => format!("{:.3} (Jain, {})", f.jain, picks(n)),
        (true, None) => format!("{:.3} (Jain)", f.jain),
        (false, Some(n)) => format!("— ({}, shown from {})", picks(n), f.needed_picks),
        (false, None) => format!("— (too few picks, shown from {})", f.needed_picks),
    }
}

fn table(pods: &[PodStatus], width: Option<u16>) -> Table {
    let mut table = Table::new();
    table.load_preset(ASCII_FULL_CONDENSED);
    match width {
        Some(width) => {
            table
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(width);
        }
        None => {
            table.set_content_arrangement(ContentArrangement::Disabled);
        }
    }
    table.set_header(COLUMNS);
    for p in pods {
        table.add_row(row(p));
    }
    for i in FIRST_NUMBER..COLUMNS.len() {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

fn row(p: &PodStatus) -> [String; 7] {
    let state = match (p.state, p.ejected_seconds_left) {
        // Whole seconds, rounded up: "0s left" would read as back already.
        (State::Ejected, Some(left)) => format!("ejected ({}s left)", left.ceil()),
        (state, _) => state.as_str().to_string(),
    };
    [
        if p.pod.is_empty() { "-" } else { &p.pod }.to_string(),
        p.endpoint.clone(),
        state,
        p.weight.map_or("-".to_string(), |w| w.to_string()),
        p.active.to_string(),
        p.total.to_string(),
        format!("{:.1}%", 100.0 * p.share),
    ]
}

/// The snapshot as one JSON document (its shape is in docs/cli.md), with a newline.
pub fn render_json(snapshot: &Snapshot) -> String {
    // A Snapshot holds strings, numbers and options only: it always serializes.
    let mut text = serde_json::to_string_pretty(snapshot).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, with_ejections, CAPTURED, NOW};
    use super::super::{parse, MetricsUrl, Snapshot};
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        let url: MetricsUrl = "127.0.0.1:10249".parse().unwrap();
        Snapshot::new(&url, text, at(NOW))
    }

    /// The lines of each table (those that start with a border).
    fn table_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with('|') || l.starts_with('+'))
            .collect()
    }

    fn same_width(text: &str) -> usize {
        let widths: Vec<usize> = table_lines(text)
            .iter()
            .map(|l| l.chars().count())
            .collect();
        assert!(!widths.is_empty(), "{text}");
        assert!(widths.iter().all(|w| *w == widths[0]), "{text}");
        widths[0]
    }

    #[test]
    fn a_captured_snapshot_renders_titles_states_and_shares() {
        let text = render(&snapshot(&with_ejections()), None);
        assert!(
            text.contains(
                "default/kubechaos-svc port http  fairness 0.998 (Jain, 120 recent picks)"
            ),
            "{text}"
        );
        assert!(
            text.contains("kube-system/kube-dns port dns UDP (flows)  fairness — (no picks yet)"),
            "{text}"
        );
        let original = text
            .lines()
            .find(|l| l.contains("kubechaos-original-7d4b9-a1"))
            .unwrap();
        assert!(original.contains("| ejected (13s left) |"), "{original}");
        assert!(original.contains("25.0%"), "{original}");
        let drained = text.lines().find(|l| l.contains("10.0.0.1:80")).unwrap();
        assert!(drained.contains("| draining "), "{drained}");
        same_width(text.split("\n\n").next().unwrap());
    }

    #[test]
    fn long_pod_names_and_ipv6_endpoints_widen_their_columns() {
        let pod = "checkout-service-canary-with-a-very-long-deployment-name-7d4b9c8f6d-x2x9z";
        let endpoint = "[fd00:1234:5678:9abc:def0:1234:5678:9abc]:65535";
        let text = format!(
            "carousel_connections_total{{namespace=\"n\",service=\"s\",port=\"p\",endpoint=\"{endpoint}\",pod=\"{pod}\",outcome=\"ok\"}} 7\n\
             carousel_endpoint_weight{{namespace=\"n\",service=\"s\",port=\"p\",endpoint=\"{endpoint}\",pod=\"{pod}\"}} 1\n\
             carousel_connections_total{{namespace=\"n\",service=\"s\",port=\"p\",endpoint=\"10.0.0.1:80\",pod=\"short\",outcome=\"ok\"}} 7\n"
        );
        let table = render(&snapshot(&text), None);
        let width = same_width(&table);
        let row = table.lines().find(|l| l.contains(pod)).expect("whole name");
        assert!(row.contains(endpoint), "{table}");
        assert!(width > pod.len() + endpoint.len(), "{table}");
        // Fitted to 80 columns, cells wrap and every line keeps the width.
        let fitted = render(&snapshot(&text), Some(80));
        assert!(same_width(&fitted) <= 80, "{fitted}");
        let joined: String = table_lines(&fitted).concat();
        assert!(joined.contains("| short "), "{fitted}");
        assert!(!joined.contains(pod), "wrapped:\n{fitted}");
    }

    #[test]
    fn an_empty_snapshot_says_so() {
        assert_eq!(
            render(&snapshot("carousel_config_errors_total 0\n"), None),
            "no Service has a series yet\n"
        );
    }

    #[test]
    fn fairness_too_early_is_a_dash_with_the_picks_it_needs() {
        let text = CAPTURED.to_string()
            + "carousel_fairness_window_picks{namespace=\"default\",service=\"kubechaos-svc\",port=\"http\"} 3\n";
        let rendered = render(&snapshot(&text), None);
        assert!(
            rendered.contains("port http  fairness — (3 recent picks, shown from 20)"),
            "{rendered}"
        );
    }

    #[test]
    fn json_holds_the_same_model() {
        let snapshot = snapshot(&with_ejections());
        let json: serde_json::Value = serde_json::from_str(&render_json(&snapshot)).unwrap();
        assert_eq!(json["metrics_url"], "http://127.0.0.1:10249/metrics");
        assert_eq!(json["time"], NOW as f64);
        let web = &json["services"][0];
        assert_eq!(web["namespace"], "default");
        assert_eq!(web["protocol"], "TCP");
        assert_eq!(web["fairness"]["jain"], 0.998);
        assert_eq!(web["fairness"]["window_picks"], 120);
        assert_eq!(web["fairness"]["needed_picks"], 20);
        assert_eq!(web["fairness"]["meaningful"], true);
        let pod = &web["pods"][0];
        assert_eq!(pod["pod"], "kubechaos-original-7d4b9-a1");
        assert_eq!(pod["endpoint"], "127.77.1.1:3000");
        assert_eq!(pod["state"], "ejected");
        assert_eq!(pod["ejected_seconds_left"], 12.5);
        assert_eq!(pod["weight"], 1);
        assert_eq!(pod["active"], 1);
        assert_eq!(pod["total"], 30);
        assert_eq!(pod["share"], 0.25);
        assert_eq!(
            web["pods"][1]["ejected_seconds_left"],
            serde_json::Value::Null
        );
        assert_eq!(json["services"][1]["fairness"], serde_json::Value::Null);
        assert_eq!(json["services"][1]["pods"][1]["state"], "unknown");
        let parsed = parse(&with_ejections(), at(NOW));
        assert_eq!(snapshot.services, parsed);
    }
}
