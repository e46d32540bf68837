//! /metrics as Prometheus' own linter reads it: a busy carousel (TCP and UDP traffic,
//! ClientIP affinity, a refusing pod, a reload, health probes) passes
//! `promtool check metrics` (Debian's prometheus package) without a word, and carries
//! kube-proxy's sync families, the build info and the process families.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
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
    let carousel = Carousel::start(&state).await;

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
    carousel.stop().await;
    for task in [a_task, b_task, c_task, udp_task] {
        task.abort();
    }
}
