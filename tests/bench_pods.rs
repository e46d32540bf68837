//! `carousel bench --pods`: the scenarios on real pods, here four Debian nginx servers
//! on 127.59.0.10-13, named and weighted by a state file. nginx's own access logs are
//! the check: every request and connection the report gives a pod is one that pod's
//! nginx logged, no more, no fewer. The bench's own addresses are in 127.57.0.0/16.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use carousel::lab::bench::{self, own::OwnPods, BenchOptions};
use indicatif::ProgressBar;

const NET: u8 = 57;
const PODS: [&str; 4] = ["web-0", "web-1", "web-2", "web-3"];

fn pod_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 59, 0, 10 + i as u8], 8080))
}

/// The nginx servers; stopped when dropped, whatever the test did.
struct Nginx {
    children: Vec<Child>,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_nginx(dir: &Path) -> Nginx {
    let mut nginx = Nginx {
        children: Vec::new(),
    };
    for (i, name) in PODS.iter().enumerate() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let addr = pod_addr(i);
        let conf = common::nginx_conf(
            &d,
            "$connection $connection_requests",
            &format!("    server {{ listen {addr}; location / {{ return 200 \"{name}\\n\"; }} }}"),
        );
        let conf_path = dir.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's nginx package)");
        nginx.children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..PODS.len() {
        while std::net::TcpStream::connect(pod_addr(i)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}",
                pod_addr(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    nginx
}

/// One Service over the four pods; its weights give version v2 (web-0, web-1) twice
/// the share of v1, as a canary would.
fn state_file(dir: &Path) -> PathBuf {
    let mut text = String::from(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {carousel.dev/weights: 'version=v2:2'}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
",
    );
    for (i, name) in PODS.iter().enumerate() {
        let version = if i < 2 { "v2" } else { "v1" };
        text += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{version: {version}}}}}\n"
        );
    }
    text += "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
";
    for (i, name) in PODS.iter().enumerate() {
        let ip = pod_addr(i).ip();
        text += &format!(
            "- {{addresses: [{ip}], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {name}}}}}\n"
        );
    }
    let path = dir.join("state.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Requests and distinct connections in one nginx's access log.
fn logged(log: &Path) -> (u64, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let connections: BTreeSet<&str> = text.lines().filter_map(|l| l.split(' ').next()).collect();
    (text.lines().count() as u64, connections.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenarios_run_on_real_pods_and_every_count_is_what_the_pods_logged() {
    let dir = tempfile::tempdir().unwrap();
    let nginx = start_nginx(dir.path());
    let state = state_file(dir.path());
    let own = OwnPods::load(&state, None, None).unwrap();
    let weights: Vec<(String, u32)> = own.pods.iter().map(|p| (p.pod.clone(), p.weight)).collect();
    assert_eq!(
        weights,
        PODS.iter()
            .zip([2, 2, 1, 1])
            .map(|(p, w)| (p.to_string(), w))
            .collect::<Vec<_>>()
    );
    let options = BenchOptions {
        scenarios: vec!["all".into()],
        algorithms: Vec::new(),
        seed: 7,
        quick: true,
        net: NET,
        first_block: 0,
        own: Some(own.clone()),
    };
    let report = bench::run(&options, &ProgressBar::hidden()).await.unwrap();
    assert_eq!(
        report.scenarios(),
        ["uniform", "canary", "keepalive", "sticky"]
    );
    assert_eq!(report.own_pods.as_ref(), Some(&own));

    // The report's counts per pod, over every run, against each nginx's log.
    let mut requests: BTreeMap<&str, u64> = BTreeMap::new();
    let mut connections: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &report.results {
        assert_eq!(r.failed_connections, 0, "{} / {}", r.scenario, r.algorithm);
        for p in &r.pods {
            *requests.entry(p.pod.as_str()).or_default() += p.requests;
            *connections.entry(p.pod.as_str()).or_default() += p.connections;
        }
    }
    drop(nginx); // nginx writes its log lines as it answers; stopped, they are all there
    for pod in PODS {
        let (lines, conns) = logged(&dir.path().join(pod).join("access.log"));
        assert!(lines > 0, "{pod} served nothing");
        assert_eq!(
            requests[pod], lines,
            "{pod}: requests in the report and in nginx's log"
        );
        assert_eq!(connections[pod] as usize, conns, "{pod}: connections");
    }

    // Canary follows the file's weights: v2's two pods a third each.
    let canary = report
        .results
        .iter()
        .find(|r| r.scenario == "canary" && r.algorithm == "weighted-round-robin")
        .unwrap();
    for p in &canary.pods {
        let target = if p.pod == "web-0" || p.pod == "web-1" {
            2.0 / 6.0
        } else {
            1.0 / 6.0
        };
        assert!((p.target_share - target).abs() < 1e-9, "{p:?}");
        assert!((p.connection_share - target).abs() < 0.02, "{p:?}");
    }
    // A kept connection stays on its pod: keepalive's six connections carried every
    // request, each on one nginx connection.
    for r in report.results.iter().filter(|r| r.scenario == "keepalive") {
        assert_eq!(r.connections, 6, "{}", r.algorithm);
        assert!(r.requests > 6 * 10, "{}: {}", r.algorithm, r.requests);
    }

    // The report says whose pods and what the latencies are, in every form.
    let table = report.table();
    assert!(
        table.starts_with("Your pods: shop/web port http from "),
        "{table}"
    );
    assert!(
        table.contains("web-0 at 127.59.0.10:8080 (weight 2)"),
        "{table}"
    );
    assert!(report.html().contains("Latencies are real"));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["own_pods"]["pods"][3]["address"], "127.59.0.13:8080");
    assert!(json["own_pods"]["latency"]
        .as_str()
        .unwrap()
        .starts_with("real"));
}

#[test]
fn a_scenario_that_needs_the_labs_pods_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_file(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_carousel"))
        .args(["bench", "--scenario", "slow-pod", "--pods"])
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"slow-pod\" needs the lab's own pods")
            && stderr.contains("uniform, canary, keepalive, sticky"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_carousel"))
        .args(["bench", "--service", "shop/web"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--pods"), "{stderr}");
}
