//! `carousel bench` through the library, on real sockets in 127.55.0.0/16: each test
//! takes its own blocks of third octets so that tests running at once never collide.

use carousel::lab::bench::{self, report::Report, BenchOptions};
use indicatif::ProgressBar;

const NET: u8 = 55;

async fn quick(scenarios: &[&str], algorithms: &[&str], first_block: u8, seed: u64) -> Report {
    sized(true, scenarios, algorithms, first_block, seed).await
}

async fn sized(
    quick: bool,
    scenarios: &[&str],
    algorithms: &[&str],
    first_block: u8,
    seed: u64,
) -> Report {
    let options = BenchOptions {
        scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
        algorithms: algorithms
            .iter()
            .map(|s| s.parse().expect("an algorithm"))
            .collect(),
        seed,
        quick,
        net: NET,
        first_block,
        own: None,
    };
    bench::run(&options, &ProgressBar::hidden()).await.unwrap()
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

/// A small well-formedness check: every tag closes in order, attributes are quoted.
fn check_balanced(html: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let close = rest.find('>').ok_or("a tag does not end")?;
        let tag = &rest[..close];
        rest = &rest[close + 1..];
        if tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
            if top != name.trim() {
                return Err(format!("</{name}> closes <{top}>"));
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().ok_or("an empty tag")?;
            stack.push(name.to_string());
        }
        if tag.matches('"').count() % 2 != 0 {
            return Err(format!("unbalanced quotes in <{tag}>"));
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed: {stack:?}"))
    }
}

/// Every finding's quotes: each number shown in the text, read back from the result it
/// names (found in the JSON independently of the code that wrote the finding), and
/// shown as that number rounds. Scenarios whose numbers support a finding have one.
fn check_findings(json: &serde_json::Value) {
    let findings = json["findings"].as_array().expect("findings");
    let results = json["results"].as_array().unwrap();
    for scenario in [
        "uniform",
        "slow-pod",
        "canary",
        "keepalive",
        "dns",
        "sticky",
        "rolling-update",
        "scale-up",
        "frontends",
        "frontend-pools",
        "affinity-rollout",
    ] {
        assert!(
            findings.iter().any(|f| f["scenario"] == scenario),
            "no finding for {scenario}: {findings:?}"
        );
    }
    for f in findings {
        let text = f["text"].as_str().unwrap();
        let quotes = f["quotes"].as_array().unwrap();
        for q in quotes {
            let result = results
                .iter()
                .find(|r| {
                    r["scenario"] == f["scenario"]
                        && r["algorithm"] == q["algorithm"]
                        && r["affinity"] == q["affinity"]
                })
                .unwrap_or_else(|| panic!("{q} names no result"));
            let field = q["field"].as_str().unwrap();
            let measured = match field.split('.').collect::<Vec<_>>()[..] {
                ["pods", pod, name] => result["pods"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["pod"] == pod)
                    .map(|p| p[name].as_f64().unwrap()),
                [a, b] => result[a][b].as_f64(),
                [a] => result[a].as_f64(),
                _ => None,
            }
            .unwrap_or_else(|| panic!("{field} is not a number of {result}"));
            let value = q["value"].as_f64().unwrap();
            assert!(
                close(value, measured, 1e-9),
                "{text}: {q} against {measured}"
            );
            let shown = q["shown"].as_str().unwrap();
            assert!(text.contains(shown), "{text:?} does not show {shown:?}");
            let number: f64 = shown.split(' ').next().unwrap().parse().unwrap();
            let decimals = shown
                .split(' ')
                .next()
                .unwrap()
                .split('.')
                .nth(1)
                .map_or(0, str::len);
            let scale = match q["unit"].as_str().unwrap() {
                "%" | "points" => 100.0,
                _ => 1.0,
            };
            assert!(
                close(
                    number,
                    measured * scale,
                    0.5 * 10f64.powi(-(decimals as i32)) + 1e-9
                ),
                "{text}: {shown} for {measured}"
            );
        }
    }
    // The slow-pod finding names the algorithm with the lowest p99.
    let slow: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| r["scenario"] == "slow-pod")
        .collect();
    let best = slow
        .iter()
        .min_by(|a, b| {
            a["latency_ms"]["p99"]
                .as_f64()
                .partial_cmp(&b["latency_ms"]["p99"].as_f64())
                .unwrap()
        })
        .unwrap();
    let finding = findings
        .iter()
        .find(|f| f["scenario"] == "slow-pod")
        .unwrap();
    let text = finding["text"].as_str().unwrap();
    assert!(
        text.starts_with(best["algorithm"].as_str().unwrap()) || text.starts_with("No algorithm"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_quick_gives_the_documented_json_and_html() {
    let report = quick(&["all"], &[], 0, 42).await;
    let scenarios: Vec<&str> = bench::scenarios::names().collect();
    assert_eq!(report.scenarios(), scenarios);

    // The JSON has the field names of docs/lab-json.md.
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["seed"], 42);
    let results = json["results"].as_array().unwrap();
    // Sticky runs with affinity off and on; affinity-rollout with it under every
    // algorithm, and without it under maglev alone.
    assert_eq!(results.len(), (scenarios.len() + 1) * 6 + 1);
    for r in results {
        for field in [
            "scenario",
            "algorithm",
            "connections",
            "failed_connections",
            "pods",
            "jain_fairness",
            "max_mean_ratio",
            "latency_ms",
            "stickiness",
            "moved_fraction",
            "protocol",
        ] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
        for q in ["p50", "p99", "p999"] {
            assert!(r["latency_ms"][q].as_f64().unwrap() > 0.0, "{r}");
        }
        let pods = r["pods"].as_array().unwrap();
        for share in ["target_share", "connection_share", "request_share"] {
            let sum: f64 = pods.iter().map(|p| p[share].as_f64().unwrap()).sum();
            assert!(close(sum, 1.0, 1e-6), "{share} sums to {sum} in {r}");
        }
        assert!(r["connections"].as_u64().unwrap() > 0);
    }

    // The 3:1 canary: weighted algorithms give custom three quarters.
    for algorithm in ["weighted-round-robin", "maglev", "random"] {
        let canary = report
            .results
            .iter()
            .find(|r| r.scenario == "canary" && r.algorithm == algorithm)
            .unwrap();
        let custom: f64 = canary
            .pods
            .iter()
            .filter(|p| p.pod.starts_with("custom"))
            .map(|p| p.connection_share)
            .sum();
        let target: f64 = canary
            .pods
            .iter()
            .filter(|p| p.pod.starts_with("custom"))
            .map(|p| p.target_share)
            .sum();
        assert!(close(target, 0.75, 1e-9));
        if algorithm == "weighted-round-robin" {
            assert!(
                close(custom, 0.75, 0.03),
                "{algorithm}: custom got {custom}"
            );
        }
    }

    // DNS over UDP: every flow got an answer to each query it asked (up to five; the
    // run's end cuts the last ones short), and round robin gave each pod a quarter of
    // the flows.
    for r in report.results.iter().filter(|r| r.scenario == "dns") {
        assert_eq!(r.protocol, "UDP");
        assert_eq!(r.failed_connections, 0, "{} lost queries", r.algorithm);
        assert!(
            (r.connections..=5 * r.connections).contains(&r.requests),
            "{}: {} queries over {} flows",
            r.algorithm,
            r.requests,
            r.connections
        );
        if r.algorithm == "round-robin" {
            let flows: Vec<u64> = r.pods.iter().map(|p| p.connections).collect();
            let (min, max) = (flows.iter().min().unwrap(), flows.iter().max().unwrap());
            assert!(max - min <= 1, "{flows:?}");
        }
    }
    assert!(report
        .results
        .iter()
        .all(|r| (r.protocol == "UDP") == (r.scenario == "dns")));

    // Stickiness where clients are many, moves where pods change.
    for r in &report.results {
        assert_eq!(
            r.moved_fraction.is_some(),
            matches!(
                r.scenario.as_str(),
                "rolling-update" | "scale-up" | "affinity-rollout"
            ),
            "{} {}",
            r.scenario,
            r.algorithm
        );
        if r.scenario == "sticky" && r.affinity {
            assert!(r.stickiness.unwrap() > 0.99, "{r:?}");
        }
        if matches!(r.scenario.as_str(), "rolling-update" | "affinity-rollout") {
            assert_eq!(r.failed_connections, 0, "{} lost connections", r.algorithm);
        }
        // Pods used and where the clients ended: the measures of the pathologies.
        let answered = r.pods.iter().filter(|p| p.connections > 0).count() as u64;
        assert_eq!(r.pods_used, answered, "{r:?}");
        assert_eq!(
            r.final_max_mean_ratio.is_some(),
            r.pods.iter().any(|p| p.final_share.is_some()),
            "{r:?}"
        );
    }

    // The run's own record, and findings that agree with the numbers they quote.
    assert_eq!(json["carousel_version"], env!("CARGO_PKG_VERSION"));
    assert!(json["cpus"].as_u64().unwrap() >= 1);
    check_findings(&json);
    let table = report.table();
    for finding in &report.findings {
        let first_words: String = finding
            .text
            .split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            table.contains(&first_words),
            "{first_words:?} in the table:\n{table}"
        );
    }

    // One self-contained page, one chart per scenario.
    let html = report.html();
    check_balanced(&html).unwrap();
    assert_eq!(
        html.matches("class=\"chart scenario-chart\"").count(),
        scenarios.len()
    );
    for scenario in &scenarios {
        assert!(html.contains(&format!("data-scenario=\"{scenario}\"")));
    }
    assert!(html.contains("<summary>Glossary</summary>"));
    for finding in &report.findings {
        let escaped = finding
            .text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        assert!(html.contains(&format!("<li>{escaped}</li>")), "{escaped}");
    }
    assert!(!html.contains("<script"));
    assert!(!html.contains("http://") || !html.contains("src=\"http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pod_hurts_round_robin_more_than_load_aware_balancers() {
    let report = quick(
        &["slow-pod"],
        &["round-robin", "least-connections", "power-of-two-choices"],
        100,
        7,
    )
    .await;
    let p99 = |algorithm: &str| {
        report
            .results
            .iter()
            .find(|r| r.algorithm == algorithm)
            .unwrap()
            .latency_ms
            .p99
    };
    let best = p99("least-connections").min(p99("power-of-two-choices"));
    assert!(best < 0.7 * p99("round-robin"), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_loses_no_connection() {
    let report = quick(&["rolling-update"], &["round-robin", "maglev"], 110, 42).await;
    for r in &report.results {
        assert_eq!(r.failed_connections, 0, "{}", report.table());
        assert!(r.moved_fraction.is_some());
        // Every pod was replaced: the old ones end with no target, the new ones share it.
        assert_eq!(r.pods.len(), 8);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_picks() {
    let mut scenario = bench::scenarios::build("uniform", true).remove(0);
    // One connection at a time, so that the order of picks is the order of draws.
    scenario.concurrency = 1;
    scenario.connections = 120;
    scenario.duration = std::time::Duration::from_secs(20);
    let options = |seed| BenchOptions {
        seed,
        quick: true,
        net: NET,
        ..Default::default()
    };
    let mut picks = Vec::new();
    for (block, seed) in [(120, 5), (121, 5), (122, 6)] {
        let result = bench::run_one(
            &scenario,
            carousel::algorithm::Algorithm::Random,
            &options(seed),
            block,
        )
        .await
        .unwrap();
        assert_eq!(result.connections, 120);
        picks.push(
            result
                .pods
                .iter()
                .map(|p| p.connections)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(picks[0], picks[1]);
    assert_ne!(picks[0], picks[2]);
}

/// kubernetes#5292: kept connections bound the pods used, whatever the balancer; with as
/// many kept connections as pods, rotating and counting balancers reach every pod and
/// hashing on the client address still reaches one pod per frontend at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn few_kept_connections_use_few_pods_and_pools_reach_all_under_round_robin() {
    let algorithms = ["round-robin", "least-connections", "maglev", "random"];
    let one = quick(&["frontends"], &algorithms, 130, 42).await;
    for r in &one.results {
        assert_eq!(r.pods.len(), 50);
        assert_eq!(r.connections, 5, "{}", one.table());
        assert!(r.pods_used <= 5, "{}", one.table());
    }
    let pools = quick(&["frontend-pools"], &algorithms, 135, 42).await;
    let used = |algorithm: &str| {
        pools
            .results
            .iter()
            .find(|r| r.algorithm == algorithm)
            .unwrap()
            .pods_used
    };
    assert_eq!(used("round-robin"), 50, "{}", pools.table());
    assert_eq!(used("least-connections"), 50, "{}", pools.table());
    assert!(used("maglev") <= 5, "{}", pools.table());
    assert!(used("random") < 50, "{}", pools.table());
}

/// kubernetes#55603: under ClientIP affinity, round-robin ends a rolling update with the
/// first new pod holding far more of the clients than the last. Full size: the quick
/// run's 100 clients are too few to show it every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_through_a_rolling_update_piles_clients_on_the_first_new_pod() {
    let report = sized(false, &["affinity-rollout"], &["round-robin"], 140, 42).await;
    let r = report
        .results
        .iter()
        .find(|r| r.affinity)
        .expect("the run with affinity");
    let last = |pod: &str| {
        r.pods
            .iter()
            .find(|p| p.pod == pod)
            .and_then(|p| p.final_share)
            .unwrap()
    };
    assert!(
        last("pod-a-v2") > 1.5 * last("pod-d-v2"),
        "{}",
        report.table()
    );
    assert!(r.final_max_mean_ratio.unwrap() > 1.2, "{}", report.table());
    assert_eq!(r.failed_connections, 0);
}
