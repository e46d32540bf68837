//! End to end through the real proxy in bind mode, on real sockets: round-robin,
//! retries, half-close, bulk transfer, reloads, endpoint states and metrics.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use carousel::lab::backend::ask;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ASK: Duration = Duration::from_secs(5);

fn local(ip: &str) -> IpAddr {
    ip.parse().unwrap()
}

/// Asks `n` times and counts answers by pod; panics on any failed connection.
async fn spread(service: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let pod = ask(local("127.0.0.1"), service, ASK)
            .await
            .unwrap_or_else(|e| panic!("connection {i} to {service} failed: {e}"));
        *counts.entry(pod).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_gives_each_pod_exactly_its_share() {
    let pods = pods(&["a", "b", "c"]).await;
    let svc = Svc::new(
        "rr",
        "127.99.1.1",
        8080,
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect(),
    );
    let carousel = Carousel::start(&svc.state()).await;

    let counts = spread(svc.addr(), 3 * 50).await;

    assert_eq!(
        counts,
        BTreeMap::from([("a".into(), 50), ("b".into(), 50), ("c".into(), 50)])
    );
    carousel.stop().await;
}

#[tokio::test]
async fn concurrent_clients_still_get_exact_shares() {
    let pods = pods(&["a", "b", "c", "d"]).await;
    let svc = Svc::new(
        "rr-par",
        "127.99.2.1",
        8080,
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect(),
    );
    let carousel = Carousel::start(&svc.state()).await;

    let workers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(spread(svc.addr(), 50)))
        .collect();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for w in workers {
        for (pod, n) in w.await.unwrap() {
            *total.entry(pod).or_default() += n;
        }
    }

    assert_eq!(total.values().copied().collect::<Vec<_>>(), vec![100; 4]);
    carousel.stop().await;
}

#[tokio::test]
async fn a_refusing_endpoint_is_skipped_without_a_client_error() {
    let pods = pods(&["a", "b"]).await;
    let dead = refusing_addr("127.0.0.1").await;
    let mut eps: Vec<Ep> = pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect();
    eps.push(Ep::ready(dead, "dead"));
    let svc = Svc::new("retry", "127.99.3.1", 8080, eps);
    let carousel = Carousel::start(&svc.state()).await;

    let counts = spread(svc.addr(), 60).await;

    assert_eq!(
        counts.values().sum::<usize>(),
        60,
        "every connection was answered"
    );
    assert!(!counts.contains_key("dead"));
    let text = carousel.metrics_text().await;
    let dead = [("pod", "dead")];
    let errors = metric(
        &text,
        "carousel_connections_total",
        &[dead[0], ("outcome", "connect_error")],
    )
    .unwrap();
    let ejections = metric(&text, "carousel_endpoint_ejections_total", &dead).unwrap();
    assert!(errors >= 1.0, "the dead pod was tried:\n{text}");
    assert_eq!(ejections, errors, "each failure ejects it");
    // Without ejection every third connection would try the dead pod first.
    assert!(errors < 20.0, "an ejected pod is passed over:\n{text}");
    carousel.stop().await;
}

/// Bind mode has no listener for a Service port without endpoints: the client is
/// refused at the SYN, as with kube-proxy. When an endpoint appears, the listener opens.
#[tokio::test]
async fn a_service_without_endpoints_refuses_at_the_syn_until_one_appears() {
    let svc = Svc::new("empty", "127.99.4.1", 8080, Vec::new());
    let carousel = Carousel::start(&svc.state()).await;

    let err = ask(local("127.0.0.1"), svc.addr(), ASK).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err:?}");

    let late = pods(&["pod-late"]).await;
    let svc = Svc::new(
        "empty",
        "127.99.4.1",
        8080,
        vec![Ep::ready(late[0].addr, "pod-late")],
    );
    carousel.write_state(&svc.state());
    eventually("the listener opens", || async {
        ask(local("127.0.0.1"), svc.addr(), ASK).await.ok() == Some("pod-late".to_string())
    })
    .await;
    carousel.stop().await;
}

/// `loadBalancerSourceRanges` in bind mode, which has no packet filter: a client outside
/// the ranges is reset at once at the load-balancer IP; one inside is served, and every
/// client is at the ClusterIP.
#[tokio::test]
async fn a_client_outside_the_source_ranges_is_reset_at_the_load_balancer_ip() {
    let pod = pods(&["pod-lb"]).await;
    let mut svc = Svc::new(
        "ranged",
        "127.99.4.2",
        8080,
        vec![Ep::ready(pod[0].addr, "pod-lb")],
    );
    svc.load_balancer_ips.push("127.99.4.3".into());
    svc.spec
        .push("loadBalancerSourceRanges: [127.0.0.2/32]".into());
    let carousel = Carousel::start(&svc.state()).await;
    let lb: SocketAddr = "127.99.4.3:8080".parse().unwrap();

    assert_eq!(ask(local("127.0.0.2"), lb, ASK).await.unwrap(), "pod-lb");
    let err = ask(local("127.0.0.3"), lb, ASK).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{err:?}"
    );
    assert_eq!(
        ask(local("127.0.0.3"), svc.addr(), ASK).await.unwrap(),
        "pod-lb"
    );
    carousel.stop().await;
}

/// An endpoint's series appear with its first connection through this node, so a
/// node's /metrics grows with the endpoints it uses, not with the cluster; latency
/// histograms are per Service port unless asked per endpoint.
#[tokio::test]
async fn series_appear_with_an_endpoints_first_connection_and_histograms_are_per_port() {
    let used = pods(&["pod-used"]).await;
    let idle = pods(&["pod-idle"]).await;
    let eps = |pods: &[&carousel::lab::backend::Pod]| -> Vec<Ep> {
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect()
    };
    let a = Svc::new("lazy-a", "127.99.4.5", 8080, eps(&[&used[0]]));
    let b = Svc::new("lazy-b", "127.99.4.6", 8080, eps(&[&idle[0]]));
    for per_endpoint in [false, true] {
        let carousel =
            Carousel::start_configured(&state_yaml(&[a.clone(), b.clone()]), |_| {}).await;
        carousel.telemetry.set_endpoint_histograms(per_endpoint);
        assert_eq!(
            ask(local("127.0.0.1"), a.addr(), ASK).await.unwrap(),
            "pod-used"
        );
        let text = carousel.metrics_text().await;
        let ok = [("pod", "pod-used"), ("outcome", "ok")];
        assert_eq!(
            metric(&text, "carousel_connections_total", &ok),
            Some(1.0),
            "{text}"
        );
        assert!(
            !text.contains("pod-idle"),
            "an idle endpoint has no series:\n{text}"
        );
        assert_eq!(
            metric(
                &text,
                "carousel_endpoints",
                &[("service", "lazy-b"), ("state", "ready")]
            ),
            Some(1.0),
            "its Service port still counts it"
        );
        let per_port = r#"carousel_connect_duration_seconds_count{namespace="test",service="lazy-a",port="web"}"#;
        let by_endpoint = format!(
            r#"carousel_connect_duration_seconds_count{{namespace="test",service="lazy-a",port="web",endpoint="{}",pod="pod-used"}}"#,
            used[0].addr
        );
        assert_eq!(text.contains(per_port), !per_endpoint, "{text}");
        assert_eq!(text.contains(&by_endpoint), per_endpoint, "{text}");
        carousel.stop().await;
    }
}

#[tokio::test]
async fn a_client_half_close_still_gets_the_whole_answer() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let svc = Svc::new(
        "half-client",
        "127.99.5.1",
        8080,
        vec![Ep::ready(echo, "echo")],
    );
    let carousel = Carousel::start(&svc.state()).await;

    let mut s = TcpStream::connect(svc.addr()).await.unwrap();
    let sent: Vec<u8> = (0..300_000).map(|i| pattern(1, i)).collect();
    s.write_all(&sent).await.unwrap();
    s.shutdown().await.unwrap(); // our write side is done; the answer must still come
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();

    assert_eq!(got.len(), sent.len());
    assert!(got == sent);
    carousel.stop().await;
}

#[tokio::test]
async fn a_server_half_close_lets_the_client_keep_sending() {
    // The pod speaks first, closes its write side, then reads everything the client sends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"greeting").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let svc = Svc::new(
        "half-server",
        "127.99.6.1",
        8080,
        vec![Ep::ready(pod, "talker")],
    );
    let carousel = Carousel::start(&svc.state()).await;

    let mut s = TcpStream::connect(svc.addr()).await.unwrap();
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).await.unwrap(); // EOF from the pod arrives...
    s.write_all(b"still talking after your FIN").await.unwrap(); // ...and we can still send
    s.shutdown().await.unwrap();

    assert_eq!(greeting, b"greeting");
    assert_eq!(server.await.unwrap(), b"still talking after your FIN");
    carousel.stop().await;
}

#[tokio::test]
async fn sixty_four_mib_arrive_byte_identical() {
    const LEN: u64 = 64 * 1024 * 1024;
    let (echo, _task) = echo_server("127.0.0.1").await;
    let svc = Svc::new("bulk", "127.99.7.1", 8080, vec![Ep::ready(echo, "echo")]);
    let carousel = Carousel::start(&svc.state()).await;

    let s = TcpStream::connect(svc.addr()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut i = 0u64;
        while i < LEN {
            for b in buf.iter_mut() {
                *b = pattern(7, i);
                i += 1;
            }
            w.write_all(&buf).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024];
    let (mut received, mut mismatches) = (0u64, 0u64);
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            mismatches += u64::from(*b != pattern(7, received));
            received += 1;
        }
    }
    writer.await.unwrap();

    assert_eq!(received, LEN);
    assert_eq!(mismatches, 0);
    let text = carousel.metrics_text().await;
    let up = metric(
        &text,
        "carousel_bytes_total",
        &[("service", "bulk"), ("direction", "to_endpoint")],
    );
    assert_eq!(up, Some(LEN as f64));
    carousel.stop().await;
}

async fn roundtrip(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

#[tokio::test]
async fn reload_adds_and_removes_without_cutting_open_connections() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let later = pods(&["later"]).await;
    let a = Svc::new("first", "127.99.8.1", 8080, vec![Ep::ready(echo, "echo")]);
    let carousel = Carousel::start(&a.state()).await;
    let mut open = TcpStream::connect(a.addr()).await.unwrap();
    roundtrip(&mut open, b"before").await;

    // The echo pod leaves the first Service, another pod joins, a second Service appears.
    let a2 = Svc::new(
        "first",
        "127.99.8.1",
        8080,
        vec![Ep::ready(later[0].addr, "later")],
    );
    let b = Svc::new(
        "second",
        "127.99.8.2",
        8080,
        vec![Ep::ready(later[0].addr, "later")],
    );
    carousel.write_state(&state_yaml(&[a2.clone(), b.clone()]));
    eventually("the second Service listens", || async {
        ask(local("127.0.0.1"), b.addr(), ASK).await.is_ok()
    })
    .await;
    assert_eq!(
        spread(a2.addr(), 5).await,
        BTreeMap::from([("later".into(), 5)])
    );
    roundtrip(&mut open, b"during").await;

    // The first Service goes away: its listener closes, the open connection lives on.
    carousel.write_state(&b.state());
    eventually("the first Service stops listening", || async {
        TcpStream::connect(a.addr()).await.is_err()
    })
    .await;
    roundtrip(&mut open, b"after").await;
    carousel.stop().await;
}

#[tokio::test]
async fn a_broken_state_file_keeps_the_last_good_state() {
    let pods = pods(&["a"]).await;
    let svc = Svc::new(
        "steady",
        "127.99.9.1",
        8080,
        vec![Ep::ready(pods[0].addr, "a")],
    );
    let good = svc.state();
    let carousel = Carousel::start(&good).await;

    carousel.write_state(&good.replace("port: 8080", "port: eighty"));
    eventually("the refusal is counted", || async {
        metric_value(&carousel, "carousel_config_errors_total") == Some(1.0)
    })
    .await;
    assert_eq!(
        spread(svc.addr(), 3).await,
        BTreeMap::from([("a".into(), 3)])
    );

    // Written half-way, cut inside an endpoint: still refused, still serving.
    let cut = good.find("conditions: {").unwrap() + "conditions: {rea".len();
    carousel.write_state(&good[..cut]);
    eventually("the second refusal is counted", || async {
        metric_value(&carousel, "carousel_config_errors_total") == Some(2.0)
    })
    .await;
    assert_eq!(
        spread(svc.addr(), 3).await,
        BTreeMap::from([("a".into(), 3)])
    );
    carousel.stop().await;
}

fn metric_value(carousel: &Carousel, name: &str) -> Option<f64> {
    carousel
        .telemetry
        .render()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test]
async fn terminating_endpoints_serve_only_when_no_ready_one_exists() {
    let pods = pods(&["new", "old"]).await;
    let (new, old) = (&pods[0], &pods[1]);
    let both = Svc::new(
        "rolling",
        "127.99.10.1",
        8080,
        vec![
            Ep::ready(new.addr, "new"),
            Ep::terminating(old.addr, "old", true),
        ],
    );
    let carousel = Carousel::start(&both.state()).await;
    assert_eq!(
        spread(both.addr(), 20).await,
        BTreeMap::from([("new".into(), 20)])
    );

    // Only the terminating, still serving pod is left: it takes the connections.
    let mut only_old = both.clone();
    only_old.endpoints = vec![Ep::terminating(old.addr, "old", true)];
    carousel.write_state(&only_old.state());
    eventually("the serving-terminating pod takes over", || async {
        ask(local("127.0.0.1"), both.addr(), ASK)
            .await
            .ok()
            .as_deref()
            == Some("old")
    })
    .await;
    assert_eq!(
        spread(both.addr(), 10).await,
        BTreeMap::from([("old".into(), 10)])
    );

    // Terminating and no longer serving: nobody takes new connections.
    only_old.endpoints = vec![Ep::terminating(old.addr, "old", false)];
    carousel.write_state(&state_yaml(&[only_old]));
    eventually("no endpoint is left", || async {
        ask(local("127.0.0.1"), both.addr(), ASK).await.is_err()
    })
    .await;
    carousel.stop().await;
}

#[tokio::test]
async fn metrics_count_the_connections_each_pod_received() {
    let pods = pods(&["m1", "m2", "m3"]).await;
    let svc = Svc::new(
        "counted",
        "127.99.11.1",
        8080,
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect(),
    );
    let carousel = Carousel::start(&svc.state()).await;

    let counts = spread(svc.addr(), 30).await;
    // Connections close on both sides before the gauge goes down; wait for it.
    eventually("no connection is active", || async {
        let text = carousel.metrics_text().await;
        pods.iter()
            .all(|p| metric(&text, "carousel_connections_active", &[("pod", &p.name)]) == Some(0.0))
    })
    .await;
    let text = carousel.metrics_text().await;

    for pod in &pods {
        let labels = [
            ("namespace", "test"),
            ("service", "counted"),
            ("port", "web"),
            ("endpoint", &pod.addr.to_string()),
            ("pod", &pod.name),
            ("outcome", "ok"),
        ];
        let want = counts[&pod.name] as f64;
        assert_eq!(
            metric(&text, "carousel_connections_total", &labels),
            Some(want),
            "{}:\n{text}",
            pod.name
        );
        assert_eq!(pod.served() as f64, want);
        let down = metric(
            &text,
            "carousel_bytes_total",
            &[("pod", &pod.name), ("direction", "to_client")],
        )
        .unwrap();
        assert!(down > 0.0);
    }
    assert_eq!(
        metric(
            &text,
            "carousel_endpoints",
            &[("service", "counted"), ("state", "ready")]
        ),
        Some(3.0)
    );
    assert!(text.contains("carousel_connect_duration_seconds_bucket{"));
    assert!(text.contains("carousel_connection_duration_seconds_count{"));

    let (status, body) = http_get(carousel.health, "/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(carousel.health, "/metrics").await.unwrap();
    assert_eq!(status, 404, "the health listener serves health only");
    carousel.stop().await;
}

#[tokio::test]
async fn node_ports_listen_on_the_nodeport_addresses() {
    let pods = pods(&["np"]).await;
    let mut svc = Svc::new(
        "nodeport",
        "127.99.12.1",
        8080,
        vec![Ep::ready(pods[0].addr, "np")],
    );
    svc.node_port = Some(30080);
    let node_ip = local("127.99.12.2");
    let carousel = Carousel::start_with(&svc.state(), vec![node_ip]).await;

    assert_eq!(
        spread(SocketAddr::new(node_ip, 30080), 4).await,
        BTreeMap::from([("np".into(), 4)])
    );
    assert_eq!(
        spread(svc.addr(), 4).await,
        BTreeMap::from([("np".into(), 4)])
    );
    carousel.stop().await;
}

#[tokio::test]
async fn an_address_that_is_not_local_is_skipped_and_others_keep_working() {
    let pods = pods(&["ok"]).await;
    // 192.0.2.0/24 is TEST-NET-1: never assigned here, so binding fails; no traffic is sent.
    let remote = Svc::new(
        "remote",
        "192.0.2.10",
        8080,
        vec![Ep::ready(pods[0].addr, "ok")],
    );
    let fine = Svc::new(
        "fine",
        "127.99.13.1",
        8080,
        vec![Ep::ready(pods[0].addr, "ok")],
    );
    let carousel = Carousel::start(&state_yaml(&[remote, fine.clone()])).await;

    assert_eq!(
        spread(fine.addr(), 3).await,
        BTreeMap::from([("ok".into(), 3)])
    );
    carousel.stop().await;
}

/// `spec.healthCheckNodePort` of an `externalTrafficPolicy: Local` Service answers as
/// kube-proxy's does: 200 with this node's ready endpoints counted, 503 when it has none,
/// and the port closes when the Service no longer asks for it.
#[tokio::test]
async fn the_health_check_node_port_reports_this_nodes_endpoints() {
    let pods = pods(&["hc-here", "hc-there"]).await;
    let node_ip: IpAddr = "127.68.0.1".parse().unwrap();
    let health_port = refusing_addr("127.68.0.1").await.port();
    let svc = |here: bool, asks: bool| {
        let mut svc = Svc::new(
            "lb",
            "127.68.0.2",
            80,
            vec![
                Ep::ready(pods[0].addr, "hc-here").on(if here { "node-here" } else { "node-far" }),
                Ep::ready(pods[1].addr, "hc-there").on("node-far"),
            ],
        );
        svc.spec.push("externalTrafficPolicy: Local".into());
        if asks {
            svc.spec.push(format!("healthCheckNodePort: {health_port}"));
        }
        svc
    };
    let carousel = Carousel::start_configured(&svc(true, true).state(), |c| {
        c.mode = carousel::proxy::Mode::Bind {
            nodeport_addresses: vec![node_ip],
        };
        c.locality.node = Some("node-here".into());
    })
    .await;
    let check = SocketAddr::new(node_ip, health_port);
    let (status, body) = http_get(check, "/").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"service": {"namespace": "test", "name": "lb"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    carousel.write_state(&svc(false, true).state());
    eventually("503 without a local endpoint", || async {
        matches!(http_get(check, "/").await, Ok((503, body)) if body.contains(r#""localEndpoints":0"#))
    })
    .await;

    carousel.write_state(&svc(false, false).state());
    eventually("the port closes", || async {
        http_get(check, "/").await.is_err()
    })
    .await;
    carousel.stop().await;
}

/// With `carousel.dev/proxy-protocol`, the pod reads the header first and once, then
/// every byte of the client's in order: from a client that sends 64 KiB at once (more
/// than leaves with the header) and half-closes, and with a pod that speaks first, which
/// gets the header alone before the client has sent anything. Header bytes are not
/// counted as the client's.
#[tokio::test]
async fn the_proxy_header_comes_first_then_every_byte() {
    const LEN: usize = 64 * 1024;
    let pod = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut svc = Svc::new(
        "pp",
        "127.99.7.2",
        8080,
        vec![Ep::ready(pod.local_addr().unwrap(), "pod")],
    );
    svc.annotations
        .push(("carousel.dev/proxy-protocol".into(), "v1".into()));
    let carousel = Carousel::start(&svc.state()).await;
    let header = |client: &TcpStream| {
        let port = client.local_addr().unwrap().port();
        format!("PROXY TCP4 127.0.0.1 127.99.7.2 {port} 8080\r\n")
    };

    // The client first, in bulk.
    let mut client = TcpStream::connect(svc.addr()).await.unwrap();
    let sent: Vec<u8> = (0..LEN as u64).map(|i| pattern(3, i)).collect();
    client.write_all(&sent).await.unwrap();
    client.shutdown().await.unwrap();
    let (mut upstream, _) = pod.accept().await.unwrap();
    let mut received = Vec::new();
    upstream.read_to_end(&mut received).await.unwrap();
    let expected = header(&client);
    assert_eq!(
        String::from_utf8_lossy(&received[..expected.len().min(received.len())]),
        expected
    );
    assert!(
        received[expected.len()..] == sent[..],
        "the client's bytes, in order"
    );
    upstream.write_all(b"ok\n").await.unwrap();
    drop(upstream);
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "ok\n");

    // The pod first: the header arrives alone, and the exchange goes on.
    let mut client = TcpStream::connect(svc.addr()).await.unwrap();
    let (mut upstream, _) = pod.accept().await.unwrap();
    let expected = header(&client);
    let mut got = vec![0u8; expected.len()];
    upstream.read_exact(&mut got).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    upstream.write_all(b"hello\n").await.unwrap();
    let mut hello = [0u8; 6];
    client.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello\n");
    client.write_all(b"bye\n").await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    upstream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye\n");

    let text = carousel.metrics_text().await;
    let labels = [("service", "pp"), ("direction", "to_endpoint")];
    assert_eq!(
        metric(&text, "carousel_bytes_total", &labels),
        Some((LEN + 4) as f64),
        "{text}"
    );
    let labels = [("service", "pp"), ("version", "v1")];
    assert_eq!(
        metric(&text, "carousel_proxy_headers_total", &labels),
        Some(2.0)
    );
    carousel.stop().await;
}
