//! /metrics as Prometheus' own linter reads it: a busy carousel (TCP and UDP traffic,
//! ClientIP affinity, a refusing pod, a reload, health probes) passes
//! `promtool check metrics` (Debian's prometheus package) without a word, and carries
//! kube-proxy's sync families, the build info and the process families.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Service `echo`: UDP port 7 at 127.61.0.2 to a pod at `pod`.
fn udp_service(pod: SocketAddr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: test}}\n\
         spec: {{clusterIP: 127.61.0.2, ports: [{{name: echo, port: 7, targetPort: {port}, protocol: UDP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: echo-1, namespace: test, labels: {{kubernetes.io/service-name: echo}}}}\n\
         addressType: IPv4\nports: [{{name: echo, port: {port}, protocol: UDP}}]\n\
         endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}]\n",
        port = pod.port(),
        ip = pod.ip(),
    )
}

async fn udp_echo_pod() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.61.1.10:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    (addr, task)
}

fn value(text: &str, name: &str) -> f64 {
    metric(text, name, &[]).unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

#[tokio::test]
async fn a_busy_carousels_metrics_pass_promtool_and_carry_kube_proxys_families() {
    let (a, a_task) = echo_server("127.61.1.1").await;
    let (b, b_task) = echo_server("127.61.1.2").await;
    let (c, c_task) = echo_server("127.61.1.4").await;
    let refusing = refusing_addr("127.61.1.3").await;
    let (udp_pod, udp_task) = udp_echo_pod().await;
    let mut web = Svc::new(
        "web",
        "127.61.0.1",
        80,
        vec![Ep::ready(a, "web-a"), Ep::ready(b, "web-b")],
    );
    web.spec.push("sessionAffinity: ClientIP".into());
    let mut flaky = Svc::new("flaky", "127.61.0.3", 80, vec![Ep::ready(refusing, "dead")]);
    flaky.endpoints.push(Ep::ready(a, "alive"));
    let state = state_yaml(&[web.clone(), flaky.clone()]) + &udp_service(udp_pod);
    // Five UDP flows at most: a sixth client's datagram is dropped, and counted.
    let carousel = Carousel::start_configured(&state, |c| c.udp.max_flows = 5).await;

    // TCP through both Services (the refusing pod is ejected), UDP flows, probes.
    for i in 0..20u8 {
        for service in [web.addr(), flaky.addr()] {
            let mut s = TcpStream::connect(service).await.unwrap();
            s.write_all(&[i]).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, [i]);
        }
    }
    for i in 0..5u8 {
        let client = UdpSocket::bind("127.61.2.1:0").await.unwrap();
        client.connect("127.61.0.2:7").await.unwrap();
        client.send(&[i]).await.unwrap();
        let mut buf = [0u8; 16];
        let len = tokio::time::timeout(PATIENCE, client.recv(&mut buf))
            .await
            .expect("an echo")
            .unwrap();
        assert_eq!(&buf[..len], &[i]);
    }
    let sixth = UdpSocket::bind("127.61.2.1:0").await.unwrap();
    sixth.send_to(b"lost", "127.61.0.2:7").await.unwrap();
    eventually(
        "the sixth flow's datagram is dropped and counted",
        || async {
            let text = carousel.metrics_text().await;
            metric(
                &text,
                "carousel_udp_dropped_total",
                &[("reason", "flow_limit")],
            ) == Some(1.0)
        },
    )
    .await;
    for path in ["/healthz", "/livez", "/readyz"] {
        assert_eq!(
            http_get(carousel.health, path).await.unwrap().0,
            200,
            "{path}"
        );
    }

    // A reload that changes one Service: kube-proxy's sync families count it.
    let before = value(
        &carousel.metrics_text().await,
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
    );
    web.endpoints.push(Ep::ready(c, "web-c"));
    carousel.write_state(&(state_yaml(&[web, flaky]) + &udp_service(udp_pod)));
    eventually("the reload is programmed", || async {
        let text = carousel.metrics_text().await;
        value(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count") > before
            && value(&text, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0
    })
    .await;

    let text = carousel.metrics_text().await;
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {}\n{said}",
        out.status
    );

    // Every family says what it is and what it means.
    let typed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let helped: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    assert_eq!(typed, helped);
    for family in [
        "carousel_connections_total",
        "carousel_udp_flows_total",
        "carousel_affinity_lookups_total",
        "carousel_endpoint_ejections_total",
        "carousel_build_info",
        "carousel_sync_errors_total",
        "carousel_sync_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_proxy_healthz_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(typed.contains(family), "{family} missing from\n{text}");
    }

    // The values mean what kube-proxy's do.
    let build = metric(
        &text,
        "carousel_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(build, Some(1.0));
    assert_eq!(
        metric(&text, "kubeproxy_proxy_healthz_total", &[("code", "200")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "kubeproxy_proxy_livez_total", &[("code", "200")]),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
        0.0
    );
    let last = value(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
    let queued = value(
        &text,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    );
    assert!(
        queued > 1.7e9 && last >= queued,
        "queued {queued}, synced {last}"
    );
    assert_eq!(
        value(&text, "carousel_sync_last_timestamp_seconds"),
        last,
        "one sync, two names"
    );
    assert!(value(&text, "process_resident_memory_bytes") > 1e6);

    // The fairness gauge is read every 2 s; then the dashboard has all it reads.
    eventually("the fairness gauge is out", || async {
        metric(
            &carousel.metrics_text().await,
            "carousel_fairness_jain",
            &[],
        )
        .is_some()
    })
    .await;
    dashboard_reads_what_carousel_exports(&carousel.metrics_text().await).await;
    carousel.stop().await;
    for task in [a_task, b_task, c_task, udp_task] {
        task.abort();
    }
}

/// Every expression of deploy/grafana's dashboard reads only families `text` (a
/// running carousel's /metrics) has, and is PromQL that Prometheus parses: promtool
/// checks them as recording rules, Grafana's variables given values.
async fn dashboard_reads_what_carousel_exports(text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/carousel-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut read = BTreeSet::new();
    for (i, panel) in dash["panels"].as_array().unwrap().iter().enumerate() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let title = panel["title"].as_str().unwrap();
            let families = metric_families_in(expr);
            assert!(!families.is_empty(), "{title}: {expr} reads no metric");
            for family in families {
                assert!(
                    exported.contains(family.as_str()),
                    "{title}: {family} is not in a running carousel's /metrics"
                );
                read.insert(family);
            }
            let concrete = expr
                .replace("$__rate_interval", "1m")
                .replace("$namespace", ".*")
                .replace("$service", ".*");
            rules += &format!(
                "      - record: dashboard:panel{i}:{}\n        expr: {}\n",
                target["refId"].as_str().unwrap(),
                serde_json::to_string(&concrete).unwrap()
            );
        }
    }
    // The panels the issue asked for are there.
    for family in [
        "carousel_fairness_jain",
        "carousel_endpoint_weight",
        "carousel_endpoint_ejections_total",
        "carousel_connections_rejected_total",
        "carousel_sync_errors_total",
        "carousel_network_programming_duration_seconds",
    ] {
        assert!(read.contains(family), "no panel reads {family}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rules).unwrap();
    let out = tokio::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_family_reader_finds_every_family_an_expression_names() {
    assert_eq!(
        metric_families_in(
            "rate(carousel_connect_duration_seconds_bucket[1m]) / process_threads + kubeproxy_x_total"
        ),
        ["carousel_connect_duration_seconds", "process_threads", "kubeproxy_x_total"]
    );
}
