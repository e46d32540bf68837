//! End to end, one test per balancer: a state file, the real proxy in bind mode, pods
//! that answer their name, and connections from real sockets on 127.0.0.0/8.
//!
//! Each test owns 127.88.N.0/24 (the Service at .1:8080, pods at .10 and up, clients at
//! .100 and up), so the tests run in parallel without meeting.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use carousel::addr::PodAddr;
use carousel::balance::{self, Backend, Backends, BuildOptions};
use carousel::discovery::convert::Scope;
use carousel::lab::backend::{ask, Pod};
use carousel::proxy::{ProxyConfig, ProxyError};
use carousel::run::{run_from_file, FileRun, RunError};
use carousel::shutdown::Shutdown;
use carousel::status;
use carousel::telemetry::Telemetry;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SEED: u64 = 42;
const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Polls of /healthz or /metrics before giving up, 10 ms apart.
const POLLS: usize = 1000;
const CANARY: &str = "version=custom:3,version=original:1";

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 88, net, host))
}

/// One pod of a test: its name and labels.
struct PodSpec {
    name: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

const fn pod(name: &'static str, labels: &'static [(&'static str, &'static str)]) -> PodSpec {
    PodSpec { name, labels }
}

/// The kubechaos example: two original pods and two custom ones.
const KUBECHAOS: &[PodSpec] = &[
    pod("original-a1", &[("version", "original")]),
    pod("original-b2", &[("version", "original")]),
    pod("custom-c3", &[("version", "custom")]),
    pod("custom-d4", &[("version", "custom")]),
];

const THREE: &[PodSpec] = &[pod("pod-a", &[]), pod("pod-b", &[]), pod("pod-c", &[])];

/// A running carousel with its pods.
struct Proxy {
    net: u8,
    service: SocketAddr,
    metrics: SocketAddr,
    pods: Vec<Pod>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
    _state: tempfile::NamedTempFile,
}

impl Proxy {
    /// Starts the pods and carousel for a Service in 127.88.`net`.0/24 with these
    /// annotations, and waits until it serves.
    async fn start(
        net: u8,
        pods: &[PodSpec],
        annotations: &[(&str, &str)],
        affinity: bool,
    ) -> Proxy {
        let mut started = Vec::new();
        for (i, spec) in pods.iter().enumerate() {
            let addr = SocketAddr::new(ip(net, 10 + i as u8), 0);
            started.push(Pod::start(spec.name, addr).await.expect("pod starts"));
        }
        let state = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(
            state.path(),
            state_yaml(net, pods, &started, annotations, affinity),
        )
        .expect("state file written");

        let telemetry = Telemetry::new();
        let metrics = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("metrics port");
        let health = TcpListener::bind("127.0.0.1:0").await.expect("health port");
        let metrics_addr = metrics.local_addr().expect("metrics address");
        let health_addr = health.local_addr().expect("health address");
        let stop = CancellationToken::new();
        let run = FileRun {
            path: PathBuf::from(state.path()),
            scope: Scope::default(),
            proxy: ProxyConfig {
                balance: BuildOptions {
                    seed: Some(SEED),
                    ..Default::default()
                },
                ..Default::default()
            },
        };
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                // Stopping abandons the drain at once: a test's connections are its own.
                let abandon = stop.clone().cancelled_owned();
                run_from_file(
                    run,
                    telemetry,
                    metrics,
                    health,
                    Shutdown::new(stop.cancelled_owned(), abandon),
                )
                .await
            }
        });
        // /healthz answers 200 once the first table is applied, listeners included: no
        // probe connection that would use up a pick.
        let mut ready = false;
        for _ in 0..POLLS {
            if http_get(health_addr, "/healthz").await.0 == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ready, "carousel never became healthy");
        Proxy {
            net,
            service: SocketAddr::new(ip(net, 1), 8080),
            metrics: metrics_addr,
            pods: started,
            stop,
            task,
            _state: state,
        }
    }

    /// `total` connections from `clients` in turn, `concurrency` at a time; the pod that
    /// answered each, by client. Fails the test on any failed connection.
    async fn drive(
        &self,
        clients: &[IpAddr],
        total: usize,
        concurrency: usize,
    ) -> BTreeMap<IpAddr, BTreeMap<String, usize>> {
        let per_worker = total.div_ceil(concurrency);
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let (clients, service) = (clients.to_vec(), self.service);
            let count = per_worker.min(total.saturating_sub(w * per_worker));
            workers.push(tokio::spawn(async move {
                let mut seen = Vec::with_capacity(count);
                for i in 0..count {
                    let client = clients[(w * per_worker + i) % clients.len()];
                    seen.push((client, ask(client, service, ASK_TIMEOUT).await));
                }
                seen
            }));
        }
        let mut by_client: BTreeMap<IpAddr, BTreeMap<String, usize>> = BTreeMap::new();
        for worker in workers {
            for (client, answer) in worker.await.expect("client worker") {
                let pod = answer.unwrap_or_else(|e| panic!("connection from {client}: {e}"));
                *by_client.entry(client).or_default().entry(pod).or_default() += 1;
            }
        }
        by_client
    }

    /// `total` connections from this test's default client: answers per pod.
    async fn shares(&self, total: usize, concurrency: usize) -> BTreeMap<String, usize> {
        let by_client = self.drive(&[ip(self.net, 200)], total, concurrency).await;
        by_client.into_values().next().unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    fn pod_name(&self, addr: SocketAddr) -> &str {
        let pod = self.pods.iter().find(|p| p.addr == addr);
        &pod.expect("a pod of this test").name
    }

    async fn stop(self) {
        self.stop.cancel();
        // A test abandons the drain at once: ending cleanly or with the drain cut are
        // both a clean stop here.
        match self.task.await.expect("carousel task") {
            Ok(()) | Err(RunError::Proxy(ProxyError::DrainCut { .. })) => {}
            Err(e) => panic!("carousel run: {e}"),
        }
    }
}

/// The state file: a Service, one EndpointSlice per pod (each pod has its own port)
/// and the Pods with their labels, as JSON documents (JSON is YAML).
fn state_yaml(
    net: u8,
    specs: &[PodSpec],
    pods: &[Pod],
    annotations: &[(&str, &str)],
    affinity: bool,
) -> String {
    let service = format!("svc-{net}");
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = json!({
        "clusterIP": ip(net, 1).to_string(),
        "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
    });
    if affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    let mut docs = vec![json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "namespace": "default", "annotations": annotations},
        "spec": spec,
    })];
    for (spec, pod) in specs.iter().zip(pods) {
        let labels: serde_json::Map<String, Value> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        docs.push(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-{}", spec.name),
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": pod.addr.port(), "protocol": "TCP"}],
            "endpoints": [{
                "addresses": [pod.addr.ip().to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": spec.name, "namespace": "default"},
            }],
        }));
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": spec.name, "namespace": "default", "labels": labels},
            "status": {"podIP": pod.addr.ip().to_string()},
        }));
    }
    docs.iter().map(|d| format!("---\n{d}\n")).collect()
}

/// A minimal HTTP/1.1 GET: the status and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let Ok(Ok(text)) = tokio::time::timeout(ASK_TIMEOUT, exchange).await else {
        return (0, String::new());
    };
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// The value of the series `name` whose labels include every one of `labels`, summed
/// over the series that match (parsed as `carousel status` parses them).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching = status::samples(text).into_iter().filter(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|value| value == v))
    });
    matching.map(|s| s.value).reduce(|a, b| a + b)
}

fn share(counts: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = counts.values().sum();
    let matching: usize = counts
        .iter()
        .filter(|(pod, _)| pod.starts_with(prefix))
        .map(|(_, n)| n)
        .sum();
    matching as f64 / total as f64
}

#[tokio::test]
async fn round_robin_gives_every_pod_the_same_share() {
    let proxy = Proxy::start(1, THREE, &[], false).await;
    let counts = proxy.shares(300, 8).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [100, 100, 100]
    );
    let metrics = proxy.metrics().await;
    for p in THREE {
        let ok = metric(
            &metrics,
            "carousel_connections_total",
            &[("pod", p.name), ("outcome", "ok")],
        );
        assert_eq!(ok, Some(100.0), "{}", p.name);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn weighted_round_robin_gives_exact_weighted_shares() {
    const TIERS: &[PodSpec] = &[
        pod("tier-a", &[("tier", "a")]),
        pod("tier-b", &[("tier", "b")]),
        pod("tier-c", &[("tier", "c")]),
    ];
    let annotations = [
        ("carousel.dev/load-balancer", "weighted-round-robin"),
        ("carousel.dev/weights", "tier=a:1,tier=b:2,tier=c:3"),
    ];
    let proxy = Proxy::start(2, TIERS, &annotations, false).await;
    let counts = proxy.shares(600, 8).await;
    let expected: BTreeMap<String, usize> = [("tier-a", 100), ("tier-b", 200), ("tier-c", 300)]
        .map(|(p, n)| (p.to_string(), n))
        .into();
    assert_eq!(counts, expected);
    proxy.stop().await;
}

/// The kubechaos canary: custom pods weigh 3, original ones 1, so three quarters of
/// the connections go to custom without changing a replica count.
#[tokio::test]
async fn the_kubechaos_canary_sends_three_quarters_to_custom() {
    let annotations = [
        ("carousel.dev/load-balancer", "weighted-round-robin"),
        ("carousel.dev/weights", CANARY),
    ];
    let proxy = Proxy::start(3, KUBECHAOS, &annotations, false).await;
    let counts = proxy.shares(4000, 16).await;
    let custom = share(&counts, "custom");
    assert!(
        (custom - 0.75).abs() <= 0.02,
        "custom share {custom}: {counts:?}"
    );
    // carousel's own count agrees with the pods'.
    let metrics = proxy.metrics().await;
    let custom_ok = ["custom-c3", "custom-d4"]
        .iter()
        .map(|p| {
            metric(
                &metrics,
                "carousel_connections_total",
                &[("pod", p), ("outcome", "ok")],
            )
        })
        .map(|v| v.unwrap_or(0.0))
        .sum::<f64>();
    assert_eq!(
        custom_ok as usize,
        counts["custom-c3"] + counts["custom-d4"]
    );
    proxy.stop().await;
}

/// Opens a connection through the proxy that sends nothing: the pod waits for a
/// request, so the connection stays open (and counted) until dropped.
async fn hold_open(source: IpAddr, service: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind");
    socket.connect(service).await.expect("connect")
}

/// Polls /metrics until `carousel_connections_active` adds up to `n` on this Service.
async fn wait_active(proxy: &Proxy, n: f64) -> String {
    for _ in 0..POLLS {
        let metrics = proxy.metrics().await;
        if metric(&metrics, "carousel_connections_active", &[]) == Some(n) {
            return metrics;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {n} active connections");
}

#[tokio::test]
async fn least_connections_sends_new_connections_to_the_idle_pod() {
    let annotations = [("carousel.dev/load-balancer", "least-connections")];
    let proxy = Proxy::start(4, THREE, &annotations, false).await;
    let client = ip(4, 200);
    // Two long connections: least-connections puts them on two different pods.
    let first = hold_open(client, proxy.service).await;
    wait_active(&proxy, 1.0).await;
    let second = hold_open(client, proxy.service).await;
    let metrics = wait_active(&proxy, 2.0).await;
    let busy = |p: &PodSpec| {
        metric(&metrics, "carousel_connections_active", &[("pod", p.name)]) == Some(1.0)
    };
    let idle: Vec<&str> = THREE.iter().filter(|p| !busy(p)).map(|p| p.name).collect();
    assert_eq!(idle.len(), 1, "{metrics}");
    // Every new connection goes to the idle pod, where round-robin would rotate. Each
    // one is let go before the next, so that the idle pod is idle again.
    for _ in 0..20 {
        let answer = ask(client, proxy.service, ASK_TIMEOUT)
            .await
            .expect("answer");
        assert_eq!(answer, idle[0]);
        wait_active(&proxy, 2.0).await;
    }
    drop((first, second));
    proxy.stop().await;
}

#[tokio::test]
async fn power_of_two_choices_follows_the_weights_when_idle() {
    let annotations = [
        ("carousel.dev/load-balancer", "power-of-two-choices"),
        ("carousel.dev/weights", CANARY),
    ];
    let proxy = Proxy::start(5, KUBECHAOS, &annotations, false).await;
    let counts = proxy.shares(1000, 4).await;
    let custom = share(&counts, "custom");
    assert!(
        (custom - 0.75).abs() <= 0.05,
        "custom share {custom}: {counts:?}"
    );
    assert_eq!(counts.len(), 4, "every pod is picked: {counts:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn maglev_keeps_every_client_on_its_hashed_pod() {
    let annotations = [("carousel.dev/load-balancer", "maglev")];
    let proxy = Proxy::start(6, KUBECHAOS, &annotations, false).await;
    let clients: Vec<IpAddr> = (0..16).map(|i| ip(6, 100 + i)).collect();
    let by_client = proxy.drive(&clients, 16 * 5, 8).await;
    // The same table, built here from the same addresses, says where each client goes:
    // Maglev's hashes are fixed, so every carousel agrees.
    let mut addrs: Vec<SocketAddr> = proxy.pods.iter().map(|p| p.addr).collect();
    addrs.sort();
    let backends: Backends = addrs.iter().map(|a| Backend::new(PodAddr(*a), 1)).collect();
    let maglev = balance::build(
        carousel::algorithm::Algorithm::Maglev,
        backends,
        &BuildOptions::default(),
    );
    for client in &clients {
        let pods = &by_client[client];
        let expected = proxy.pod_name(addrs[maglev.pick(*client).expect("a pick")]);
        let only: Vec<&str> = pods.keys().map(String::as_str).collect();
        assert_eq!(only, [expected], "client {client}");
    }
    let used: std::collections::BTreeSet<&String> =
        by_client.values().flat_map(|m| m.keys()).collect();
    assert!(used.len() > 1, "16 clients all hashed to one pod");
    proxy.stop().await;
}

#[tokio::test]
async fn random_follows_the_weights() {
    let annotations = [
        ("carousel.dev/load-balancer", "random"),
        ("carousel.dev/weights", CANARY),
    ];
    let proxy = Proxy::start(7, KUBECHAOS, &annotations, false).await;
    let counts = proxy.shares(1000, 8).await;
    let custom = share(&counts, "custom");
    assert!(
        (custom - 0.75).abs() <= 0.05,
        "custom share {custom}: {counts:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn client_ip_affinity_keeps_each_client_on_one_pod() {
    let proxy = Proxy::start(8, KUBECHAOS, &[], true).await;
    let clients: Vec<IpAddr> = (0..8).map(|i| ip(8, 100 + i)).collect();
    // One connection from each client in turn: round-robin hands out the pods in order.
    let first = proxy.drive(&clients, 8, 1).await;
    // Then many more, concurrently: each client stays where it started.
    let rest = proxy.drive(&clients, 8 * 9, 8).await;
    for (i, client) in clients.iter().enumerate() {
        let start: Vec<&String> = first[client].keys().collect();
        let later: Vec<&String> = rest[client].keys().collect();
        assert_eq!(start, later, "client {client}");
        assert_eq!(start[0], &proxy.pods[i % 4].name, "client {client}");
    }
    let metrics = proxy.metrics().await;
    let lookups = |result| {
        metric(
            &metrics,
            "carousel_affinity_lookups_total",
            &[("result", result)],
        )
    };
    assert_eq!(lookups("miss"), Some(8.0), "{metrics}");
    assert_eq!(lookups("hit"), Some(72.0), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "carousel_affinity_entries",
            &[("service", "svc-8")]
        ),
        Some(8.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_annotation_falls_back_to_round_robin_and_is_counted() {
    let annotations = [("carousel.dev/load-balancer", "fastest-please")];
    let proxy = Proxy::start(9, THREE, &annotations, false).await;
    let counts = proxy.shares(300, 8).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [100, 100, 100]
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "carousel_config_errors_total", &[]),
        Some(1.0),
        "{metrics}"
    );
    proxy.stop().await;
}
