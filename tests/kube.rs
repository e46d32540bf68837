//! End to end against a fake API server that speaks the real protocol: kube's own client
//! reads a kubeconfig pointing at it, and real pods answer behind the Services. Each
//! test has its own 127.66.N.0/24 (Services on .1-.9:8080, pods on .10 and up:9000).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use carousel::lab::backend::{ask, Pod};
use common::fake_apiserver::{label_selector_matches, FakeApiServer, Kind};
use common::*;
use serde_json::{json, Value};

const ASK: Duration = Duration::from_secs(5);
const SERVICE_PORT: u16 = 8080;
const POD_PORT: u16 = 9000;
/// Reconnection after an outage waits for kube-runtime's backoff (up to 30 s a step).
const OUTAGE_PATIENCE: Duration = Duration::from_secs(90);

fn ip(n: u8, host: u8) -> IpAddr {
    IpAddr::from([127, 66, n, host])
}

fn addr(n: u8, host: u8) -> SocketAddr {
    SocketAddr::new(ip(n, host), SERVICE_PORT)
}

/// A ClusterIP Service in namespace `test` selecting `app=<selector>`, port `web`
/// 8080 → 9000.
fn service(name: &str, cluster_ip: IpAddr, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "test", "labels": {}, "annotations": {}},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "selector": {"app": app},
            "ports": [{"name": "web", "port": SERVICE_PORT, "targetPort": POD_PORT, "protocol": "TCP"}],
        },
    })
}

/// One endpoint of a slice.
#[derive(Clone, Debug)]
struct E {
    addr: SocketAddr,
    pod: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zone_hint: Option<String>,
}

impl E {
    fn ready(pod: &Pod) -> E {
        E {
            addr: pod.addr,
            pod: pod.name.clone(),
            ready: true,
            serving: true,
            terminating: false,
            node: None,
            zone_hint: None,
        }
    }

    /// Started, not ready yet.
    fn starting(pod: &Pod) -> E {
        E {
            ready: false,
            serving: false,
            ..E::ready(pod)
        }
    }

    /// Terminating, still serving (KEP-1669).
    fn terminating(pod: &Pod) -> E {
        E {
            ready: false,
            serving: true,
            terminating: true,
            ..E::ready(pod)
        }
    }

    fn on(mut self, node: &str) -> E {
        self.node = Some(node.into());
        self
    }

    fn hint(mut self, zone: &str) -> E {
        self.zone_hint = Some(zone.into());
        self
    }
}

/// An EndpointSlice of Service `service` as the EndpointSlice controller writes it:
/// labelled with the Service, stamped with the time of the change. All endpoints
/// share the port of the first one, and its address family.
fn slice(name: &str, service: &str, endpoints: &[E]) -> Value {
    let port = endpoints.first().map_or(POD_PORT, |e| e.addr.port());
    let family = match endpoints.first() {
        Some(e) if e.addr.is_ipv6() => "IPv6",
        _ => "IPv4",
    };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut v = json!({
                "addresses": [e.addr.ip().to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "targetRef": {"kind": "Pod", "namespace": "test", "name": e.pod},
            });
            if let Some(node) = &e.node {
                v["nodeName"] = json!(node);
            }
            if let Some(zone) = &e.zone_hint {
                v["hints"] = json!({"forZones": [{"name": zone}]});
            }
            v
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "test",
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string()},
        },
        "addressType": family,
        "ports": [{"name": "web", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn pod_object(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "test", "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "kubechaos"}]},
           "status": {"phase": "Running"}})
}

fn node_object(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

/// Pods answering their name on 127.66.n.(first..):9000.
async fn pods(n: u8, first: u8, names: &[&str]) -> Vec<Pod> {
    let mut pods = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let at = SocketAddr::new(ip(n, first + i as u8), POD_PORT);
        pods.push(Pod::start(name, at).await.unwrap());
    }
    pods
}

/// Asks `n` times; counts answers by pod; panics on any failed connection.
async fn spread(service: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let pod = ask("127.0.0.1".parse().unwrap(), service, ASK)
            .await
            .unwrap_or_else(|e| panic!("connection {i} to {service} failed: {e}"));
        *counts.entry(pod).or_default() += 1;
    }
    counts
}

/// Waits until a round of asks reaches exactly the pods `expected`, each of them.
async fn settles_on(service: SocketAddr, expected: &[&str]) {
    settles_on_within(PATIENCE, service, expected).await
}

async fn settles_on_within(patience: Duration, service: SocketAddr, expected: &[&str]) {
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let mut seen = BTreeSet::new();
        for _ in 0..expected.len() * 3 {
            if let Ok(pod) = ask("127.0.0.1".parse().unwrap(), service, ASK).await {
                seen.insert(pod);
            }
        }
        if seen == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} never settled on {want:?}; last round reached {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn eventually_within<F, Fut>(patience: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node_flags(node: &str) -> ClusterFlags {
    ClusterFlags {
        node_name: Some(node.into()),
        ..ClusterFlags::default()
    }
}

#[tokio::test]
async fn kubechaos_round_robin_then_three_to_one_by_weights() {
    let api = FakeApiServer::start().await;
    let svc_ip = ip(1, 1);
    let original = pods(1, 10, &["original-1", "original-2"]).await;
    let custom = pods(1, 20, &["custom-1", "custom-2"]).await;
    for p in &original {
        api.apply(pod_object(
            &p.name,
            json!({"app": "kubechaos", "version": "original"}),
        ));
    }
    for p in &custom {
        api.apply(pod_object(
            &p.name,
            json!({"app": "kubechaos", "version": "custom"}),
        ));
    }
    api.apply(service("kubechaos-svc", svc_ip, "kubechaos"));
    let eps = |pods: &[Pod]| pods.iter().map(E::ready).collect::<Vec<_>>();
    api.apply(slice(
        "kubechaos-svc-orig",
        "kubechaos-svc",
        &eps(&original),
    ));
    api.apply(slice("kubechaos-svc-cust", "kubechaos-svc", &eps(&custom)));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;

    let counts = spread(addr(1, 1), 4 * 50).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![50; 4],
        "{counts:?}"
    );
    let pod_requests = || -> Vec<String> {
        api.requests()
            .into_iter()
            .filter(|r| r.contains("/pods?"))
            .collect()
    };
    let pod_watches = || pod_requests().len();
    assert_eq!(pod_watches(), 0, "no Service weighs by label: no pod watch");

    let mut weighted = service("kubechaos-svc", svc_ip, "kubechaos");
    weighted["metadata"]["annotations"] = json!({
        "carousel.dev/load-balancer": "weighted-round-robin",
        "carousel.dev/weights": "version=custom:3,version=original:1",
    });
    api.apply(weighted);
    eventually("the pod metadata watch starts", || async {
        pod_watches() > 0
    })
    .await;
    eventually("three watches", || async { api.open_watches() == 3 }).await;
    // Only the weighted Service's namespace, and only pods with a label a rule names:
    // the cluster's other pods cost this node nothing.
    for request in pod_requests() {
        let (path, query) = request.split_once('?').unwrap();
        assert_eq!(path, "GET /api/v1/namespaces/test/pods", "{request}");
        let selector = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "labelSelector")
            .map(|(_, v)| v.into_owned());
        assert_eq!(
            selector.as_deref(),
            Some("version in (custom,original)"),
            "{request}"
        );
    }

    eventually("connections split 3:1 custom:original", || async {
        let counts = spread(addr(1, 1), 8 * 10).await;
        let of = |prefix: &str| -> usize {
            counts
                .iter()
                .filter(|(p, _)| p.starts_with(prefix))
                .map(|(_, n)| n)
                .sum()
        };
        of("custom") == 60 && of("original") == 20
    })
    .await;
    assert!(carousel
        .metrics_text()
        .await
        .contains("carousel_config_errors_total 0"));

    // The annotation goes: the pod watch stops again.
    api.apply(service("kubechaos-svc", svc_ip, "kubechaos"));
    settles_on(
        addr(1, 1),
        &["custom-1", "custom-2", "original-1", "original-2"],
    )
    .await;
    // Services and EndpointSlices are watched still; pods no more.
    eventually("the pod watch closes", || async { api.open_watches() == 2 }).await;
    carousel.stop().await;
}

#[tokio::test]
async fn rolling_update_loses_no_connection_and_drains_terminating_pods() {
    let api = FakeApiServer::start().await;
    let old = pods(2, 10, &["v1-a", "v1-b", "v1-c"]).await;
    let new = pods(2, 20, &["v2-a", "v2-b", "v2-c"]).await;
    api.apply(service("roll", ip(2, 1), "roll"));
    let mut current: Vec<E> = old.iter().map(E::ready).collect();
    api.apply(slice("roll-x1", "roll", &current));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    settles_on(addr(2, 1), &["v1-a", "v1-b", "v1-c"]).await;

    // One client opening connections back to back for the whole update.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            for _ in 0..50_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match ask("127.0.0.1".parse().unwrap(), addr(2, 1), ASK).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };

    let terminating_applied = |count: usize, since: SystemTime| {
        let carousel = &carousel;
        async move {
            let text = carousel.metrics_text().await;
            let gauge = metric(
                &text,
                "carousel_endpoints",
                &[("service", "roll"), ("state", "terminating")],
            );
            gauge == Some(count as f64)
                && carousel
                    .telemetry
                    .health()
                    .last_sync()
                    .is_some_and(|t| t > since)
        }
    };
    for i in 0..3 {
        // The new pod starts, then turns ready.
        current.push(E::starting(&new[i]));
        api.apply(slice("roll-x1", "roll", &current));
        current.pop();
        current.push(E::ready(&new[i]));
        api.apply(slice("roll-x1", "roll", &current));
        // The old pod turns terminating but keeps serving while it drains.
        let since = SystemTime::now();
        current[0] = E::terminating(&old[i]);
        api.apply(slice("roll-x1", "roll", &current));
        eventually("the terminating pod is applied", || {
            terminating_applied(1, since)
        })
        .await;
        let served = old[i].served();
        // A few dozen new connections after the switch...
        let before = new[i].served();
        eventually("new connections reach the new pod", || async {
            new[i].served() >= before + 5
        })
        .await;
        // ...none of which reached the terminating pod (one may have been in flight).
        assert!(
            old[i].served() <= served + 1,
            "{} got {} new connections while terminating",
            old[i].name,
            old[i].served() - served
        );
        // Then it is gone.
        let since = SystemTime::now();
        current.remove(0);
        api.apply(slice("roll-x1", "roll", &current));
        eventually("the old pod is removed", || terminating_applied(0, since)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.await.unwrap();
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(ok > 0);
    settles_on(addr(2, 1), &["v2-a", "v2-b", "v2-c"]).await;

    // Every slice change was measured from its trigger time to its programming, under
    // carousel's name and kube-proxy's, and counted as kube-proxy counts changes.
    let text = carousel.metrics_text().await;
    let value = |name: &str| metric(&text, name, &[]);
    for name in [
        "carousel_network_programming_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
    ] {
        assert!(
            value(name).is_some_and(|n| n >= 3.0),
            "{name} recorded:\n{text}"
        );
    }
    assert_eq!(
        value("carousel_network_programming_duration_seconds_count"),
        value("kubeproxy_network_programming_duration_seconds_count"),
    );
    // Four slice changes per rolled pod, all programmed by now.
    let changes = value("kubeproxy_sync_proxy_rules_endpoint_changes_total");
    assert!(changes.is_some_and(|n| n >= 12.0), "{changes:?}");
    assert_eq!(
        value("kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        Some(0.0)
    );
    carousel.stop().await;
}

#[tokio::test]
async fn scale_up_then_blue_green_by_selector() {
    let api = FakeApiServer::start().await;
    let blue = pods(3, 10, &["blue-1", "blue-2", "blue-3", "blue-4", "blue-5"]).await;
    let green = pods(3, 30, &["green-1", "green-2"]).await;
    api.apply(service("bg", ip(3, 1), "bg"));
    api.apply(slice(
        "bg-blue",
        "bg",
        &[E::ready(&blue[0]), E::ready(&blue[1]), E::ready(&blue[2])],
    ));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    let counts = spread(addr(3, 1), 3 * 20).await;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![20; 3]);

    // Scale 3 → 5: the controller adds the new pods to the slice.
    api.apply(slice(
        "bg-blue",
        "bg",
        &blue.iter().map(E::ready).collect::<Vec<_>>(),
    ));
    settles_on(
        addr(3, 1),
        &["blue-1", "blue-2", "blue-3", "blue-4", "blue-5"],
    )
    .await;
    let counts = spread(addr(3, 1), 5 * 20).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![20; 5],
        "{counts:?}"
    );

    // Blue/green: the selector switches; new slices replace the old ones.
    let mut switched = service("bg", ip(3, 1), "bg");
    switched["spec"]["selector"] = json!({"app": "bg", "version": "green"});
    api.apply(switched);
    api.apply(slice(
        "bg-green",
        "bg",
        &green.iter().map(E::ready).collect::<Vec<_>>(),
    ));
    api.delete(Kind::EndpointSlice, "test", "bg-blue");
    settles_on(addr(3, 1), &["green-1", "green-2"]).await;
    let counts = spread(addr(3, 1), 2 * 20).await;
    assert_eq!(
        counts,
        BTreeMap::from([("green-1".into(), 20), ("green-2".into(), 20)])
    );
    carousel.stop().await;
}

#[tokio::test]
async fn service_proxy_name_and_selector_choose_the_services_server_side() {
    let api = FakeApiServer::start().await;
    let pod = pods(4, 10, &["p"]).await;
    let labelled = |name: &str, host: u8, labels: Value| {
        let mut s = service(name, ip(4, host), "p");
        s["metadata"]["labels"] = labels;
        s
    };
    api.apply(labelled(
        "mine",
        1,
        json!({"service.kubernetes.io/service-proxy-name": "carousel"}),
    ));
    api.apply(labelled(
        "theirs",
        2,
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
    ));
    api.apply(labelled("plain", 3, json!({})));
    api.apply(labelled(
        "mine-batch",
        4,
        json!({"service.kubernetes.io/service-proxy-name": "carousel", "tier": "batch"}),
    ));
    // A Service without a selector, with a slice written by hand.
    let mut manual = labelled(
        "mine-manual",
        5,
        json!({"service.kubernetes.io/service-proxy-name": "carousel"}),
    );
    manual["spec"].as_object_mut().unwrap().remove("selector");
    api.apply(manual);
    for name in ["mine", "theirs", "plain", "mine-batch", "mine-manual"] {
        api.apply(slice(&format!("{name}-1"), name, &[E::ready(&pod[0])]));
    }

    let carousel = ClusterCarousel::synced(
        &api,
        ClusterFlags {
            proxy_name: Some("carousel".into()),
            service_selector: Some("tier!=batch".into()),
            ..ClusterFlags::default()
        },
    )
    .await;
    settles_on(addr(4, 1), &["p"]).await;
    settles_on(addr(4, 5), &["p"]).await;
    for host in [2, 3, 4] {
        assert!(
            ask("127.0.0.1".parse().unwrap(), addr(4, host), ASK)
                .await
                .is_err(),
            "127.66.4.{host} is not carousel's"
        );
    }
    let selector = api
        .requests()
        .into_iter()
        .find(|r| r.starts_with("GET /api/v1/services?"))
        .expect("a Service list");
    assert!(
        selector.contains("labelSelector=service.kubernetes.io%2Fservice-proxy-name%3Dcarousel%2C%21service.kubernetes.io%2Fheadless%2Ctier%21%3Dbatch"),
        "{selector}"
    );
    carousel.stop().await;

    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    settles_on(addr(4, 3), &["p"]).await;
    for host in [1, 2, 4, 5] {
        assert!(
            ask("127.0.0.1".parse().unwrap(), addr(4, host), ASK)
                .await
                .is_err(),
            "127.66.4.{host} is labelled for some proxy"
        );
    }
    carousel.stop().await;
}

#[tokio::test]
async fn internal_traffic_policy_local_keeps_to_this_node() {
    let api = FakeApiServer::start().await;
    let p = pods(5, 10, &["here", "there"]).await;
    api.apply(node_object("node-a", "zone-a"));
    let mut svc = service("local", ip(5, 1), "local");
    svc["spec"]["internalTrafficPolicy"] = json!("Local");
    api.apply(svc);
    api.apply(slice(
        "local-1",
        "local",
        &[E::ready(&p[0]).on("node-a"), E::ready(&p[1]).on("node-b")],
    ));
    let carousel = ClusterCarousel::synced(&api, node_flags("node-a")).await;
    settles_on(addr(5, 1), &["here"]).await;
    let counts = spread(addr(5, 1), 20).await;
    assert_eq!(counts, BTreeMap::from([("here".into(), 20)]));
    carousel.stop().await;
}

#[tokio::test]
async fn prefer_close_follows_the_zone_of_this_nodes_node_object_as_it_changes() {
    let api = FakeApiServer::start().await;
    let p = pods(6, 10, &["a-1", "b-1", "a-2"]).await;
    api.apply(node_object("node-z", "zone-a"));
    api.apply(node_object("node-other", "zone-b"));
    let mut svc = service("close", ip(6, 1), "close");
    svc["spec"]["trafficDistribution"] = json!("PreferClose");
    api.apply(svc);
    api.apply(slice(
        "close-1",
        "close",
        &[
            E::ready(&p[0]).hint("zone-a"),
            E::ready(&p[1]).hint("zone-b"),
            E::ready(&p[2]).hint("zone-a"),
        ],
    ));
    let carousel = ClusterCarousel::synced(&api, node_flags("node-z")).await;
    settles_on(addr(6, 1), &["a-1", "a-2"]).await;
    let node_watch = api
        .requests()
        .into_iter()
        .find(|r| r.starts_with("GET /api/v1/nodes?"))
        .expect("a Node list");
    assert!(
        node_watch.contains("fieldSelector=metadata.name%3Dnode-z"),
        "{node_watch}"
    );
    // The node is relabelled: zone preferences follow at once, without a restart.
    api.apply(node_object("node-z", "zone-b"));
    settles_on(addr(6, 1), &["b-1"]).await;
    carousel.stop().await;
}

#[tokio::test]
async fn ipv4_and_ipv6_slices_are_both_served() {
    let api = FakeApiServer::start().await;
    let v4 = pods(7, 10, &["v4"]).await;
    let v6 = Pod::start("v6", "[::1]:0".parse().unwrap()).await.unwrap();
    api.apply(service("dual", ip(7, 1), "dual"));
    api.apply(slice("dual-v4", "dual", &[E::ready(&v4[0])]));
    api.apply(slice("dual-v6", "dual", &[E::ready(&v6)]));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    settles_on(addr(7, 1), &["v4", "v6"]).await;
    let counts = spread(addr(7, 1), 20).await;
    assert_eq!(
        counts,
        BTreeMap::from([("v4".into(), 10), ("v6".into(), 10)])
    );
    carousel.stop().await;
}

#[tokio::test]
async fn an_api_server_outage_keeps_serving_and_catches_up_after() {
    let api = FakeApiServer::start().await;
    let p = pods(8, 10, &["a", "b", "c"]).await;
    api.apply(service("outage", ip(8, 1), "outage"));
    api.apply(slice(
        "outage-1",
        "outage",
        &[E::ready(&p[0]), E::ready(&p[1])],
    ));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    settles_on(addr(8, 1), &["a", "b"]).await;

    api.stop().await;
    // The cluster changes while carousel cannot see it.
    api.apply(slice(
        "outage-1",
        "outage",
        &[E::ready(&p[1]), E::ready(&p[2])],
    ));
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut asked = 0;
    while tokio::time::Instant::now() < until && asked < 100_000 {
        let pod = ask("127.0.0.1".parse().unwrap(), addr(8, 1), ASK)
            .await
            .unwrap_or_else(|e| panic!("connection {asked} during the outage failed: {e}"));
        assert!(pod == "a" || pod == "b", "the last table serves: {pod}");
        asked += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(asked > 0);
    assert!(carousel.telemetry.health().last_sync().is_some());

    api.restart().await;
    settles_on_within(OUTAGE_PATIENCE, addr(8, 1), &["b", "c"]).await;
    carousel.stop().await;
}

/// The times of the dropped requests for `path`.
fn dropped_at(api: &FakeApiServer, path: &str) -> Vec<std::time::Instant> {
    api.dropped_requests()
        .into_iter()
        .filter(|(_, p)| p == path)
        .map(|(at, _)| at)
        .collect()
}

/// Against an API server that drops every request, each watch retries after pauses that
/// double (0.8 s doubling, jittered into the upper half of each window), not about once a
/// second; once a list completes, the next failure starts again from the first pause.
#[tokio::test]
async fn a_failing_api_server_is_retried_with_doubling_pauses() {
    const WINDOW: Duration = Duration::from_secs(13);
    let api = FakeApiServer::start().await;
    api.fail_requests(true);
    let carousel = ClusterCarousel::start(&api, ClusterFlags::default()).await;
    tokio::time::sleep(WINDOW).await;
    let paths = [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ];
    for path in paths {
        let times = dropped_at(&api, path);
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        // Pauses in [0.4, 0.8), [0.8, 1.6), [1.6, 3.2), [3.2, 6.4), [6.4, 12.8): 5 or 6
        // attempts in 13 s. A retry about once a second would make 9 or more.
        assert!(
            (5..=6).contains(&times.len()),
            "{path}: {} attempts in {WINDOW:?}, gaps {gaps:?}",
            times.len()
        );
        // Each pause is drawn from a window twice the last one's: every gap is longer.
        assert!(
            gaps.windows(2).all(|g| g[1] > g[0]),
            "{path}: the pauses do not grow: {gaps:?}"
        );
        assert!(gaps[0] >= Duration::from_millis(400), "{path}: {gaps:?}");
    }
    // Unhealthy all along: there never was a first table.
    assert!(carousel.telemetry.health().last_sync().is_none());

    // Back: the lists complete and the first table is applied.
    api.fail_requests(false);
    eventually_within(
        Duration::from_secs(30),
        "the first sync after the outage",
        || async { carousel.telemetry.health().last_sync().is_some() },
    )
    .await;
    // A new failure starts from the first pause again: the completed list reset it.
    api.fail_requests(true);
    let before = dropped_at(&api, paths[0]).len();
    api.expire_watches();
    eventually_within(
        Duration::from_secs(10),
        "two attempts after the reset",
        || async { dropped_at(&api, paths[0]).len() >= before + 2 },
    )
    .await;
    // The ended watch (410 Gone) is the first failure of the new streak and the dropped
    // relist the second: the pause between the two dropped requests comes from the
    // second window, under 1.6 s. Without the reset it would be 12.8 s or more.
    let times = dropped_at(&api, paths[0]);
    let gap = times[before + 1] - times[before];
    assert!(
        gap < carousel::discovery::backoff::INITIAL * 2 + Duration::from_millis(300),
        "the pauses start over after a completed list; this one was {gap:?}"
    );
    carousel.stop().await;
}

#[tokio::test]
async fn a_410_gone_relists_without_duplicates_or_leftovers() {
    let api = FakeApiServer::start().await;
    let p = pods(9, 10, &["a", "b", "c", "d", "e"]).await;
    api.apply(service("gone", ip(9, 1), "gone"));
    api.apply(service("gone-too", ip(9, 2), "gone"));
    api.apply(slice("gone-1", "gone", &[E::ready(&p[0]), E::ready(&p[1])]));
    api.apply(slice("gone-2", "gone", &[E::ready(&p[2])]));
    let carousel = ClusterCarousel::synced(&api, ClusterFlags::default()).await;
    settles_on(addr(9, 1), &["a", "b", "c"]).await;

    // Changes no watch hears of, then every watch ends with 410 Gone.
    api.delete_quietly(Kind::EndpointSlice, "test", "gone-2");
    api.apply_quietly(slice("gone-1", "gone", &[E::ready(&p[1]), E::ready(&p[3])]));
    api.apply_quietly(slice("gone-3", "gone", &[E::ready(&p[4])]));
    api.delete_quietly(Kind::Service, "test", "gone-too");
    api.expire_watches();

    settles_on_within(OUTAGE_PATIENCE, addr(9, 1), &["b", "d", "e"]).await;
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?"))
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "the slices were listed again after the 410");
    // Round-robin over exactly three endpoints: a duplicate would show as a double share.
    let counts = spread(addr(9, 1), 3 * 20).await;
    assert_eq!(
        counts,
        BTreeMap::from([("b".into(), 20), ("d".into(), 20), ("e".into(), 20)])
    );
    let text = carousel.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "carousel_endpoints",
            &[("service", "gone"), ("state", "ready")]
        ),
        Some(3.0),
        "{text}"
    );
    eventually("the deleted Service stops listening", || async {
        ask("127.0.0.1".parse().unwrap(), addr(9, 2), ASK)
            .await
            .is_err()
    })
    .await;
    carousel.stop().await;
}

#[tokio::test]
async fn health_is_503_until_the_first_full_sync() {
    let api = FakeApiServer::start().await;
    let p = pods(10, 10, &["ok"]).await;
    api.apply(service("health", ip(10, 1), "health"));
    api.apply(slice("health-1", "health", &[E::ready(&p[0])]));

    // The API server answers, but withholds its lists.
    api.hold_lists();
    let carousel = ClusterCarousel::start(&api, ClusterFlags::default()).await;
    eventually("carousel asks for the lists", || async {
        api.requests().iter().any(|r| r.contains("/services?"))
    })
    .await;
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(carousel.health, path).await.unwrap();
        assert_eq!(status, 503, "{path}: {body}");
    }
    assert!(ask("127.0.0.1".parse().unwrap(), addr(10, 1), ASK)
        .await
        .is_err());
    api.release_lists();
    eventually("healthz turns 200", || async {
        matches!(http_get(carousel.health, "/healthz").await, Ok((200, _)))
    })
    .await;
    let (_, body) = http_get(carousel.health, "/readyz").await.unwrap();
    assert!(body.contains("last sync"), "{body}");
    settles_on(addr(10, 1), &["ok"]).await;
    carousel.stop().await;

    // And with the API server down from the start.
    api.stop().await;
    let carousel = ClusterCarousel::start(&api, ClusterFlags::default()).await;
    let (status, _) = http_get(carousel.health, "/healthz").await.unwrap();
    assert_eq!(status, 503);
    api.restart().await;
    eventually_within(OUTAGE_PATIENCE, "healthz turns 200", || async {
        matches!(http_get(carousel.health, "/healthz").await, Ok((200, _)))
    })
    .await;
    carousel.stop().await;
}

/// kube-proxy's health contract: `/healthz` answers its JSON, and turns 503 with
/// `nodeEligible: false` while this Node carries the cluster autoscaler's deletion taint
/// (load balancers then stop sending here); `/livez` stays 200, so the pod is not
/// restarted for it.
#[tokio::test]
async fn a_node_the_autoscaler_removes_is_not_eligible() {
    let api = FakeApiServer::start().await;
    let p = pods(11, 10, &["el"]).await;
    api.apply(service("eligible", ip(11, 1), "eligible"));
    api.apply(slice("eligible-1", "eligible", &[E::ready(&p[0])]));
    api.apply(node_object("node-el", "zone-a"));
    let carousel = ClusterCarousel::synced(&api, node_flags("node-el")).await;
    let (status, body) = http_get(carousel.health, "/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["nodeEligible"], true, "{body}");
    assert!(
        humantime::parse_rfc3339(report["lastUpdated"].as_str().unwrap()).is_ok()
            && humantime::parse_rfc3339(report["currentTime"].as_str().unwrap()).is_ok(),
        "{body}"
    );

    let mut tainted = node_object("node-el", "zone-a");
    tainted["spec"] =
        json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]});
    api.apply(tainted);
    eventually("healthz turns 503", || async {
        matches!(http_get(carousel.health, "/healthz").await, Ok((503, _)))
    })
    .await;
    let (_, body) = http_get(carousel.health, "/healthz").await.unwrap();
    assert!(body.contains(r#""nodeEligible": false"#), "{body}");
    assert_eq!(http_get(carousel.health, "/livez").await.unwrap().0, 200);
    // Still proxying: the node's own pods and clients keep their Services.
    settles_on(addr(11, 1), &["el"]).await;

    api.apply(node_object("node-el", "zone-a"));
    eventually("healthz turns 200 again", || async {
        matches!(http_get(carousel.health, "/healthz").await, Ok((200, _)))
    })
    .await;
    carousel.stop().await;
}

#[test]
fn the_fake_servers_label_selectors() {
    let labels: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    for (selector, expected) in [
        ("app", true),
        ("!app", false),
        ("!service.kubernetes.io/headless", true),
        ("app=web", true),
        ("app==web", true),
        ("app!=web", false),
        ("app in (web, api)", true),
        ("app notin (web,api)", false),
        ("app=web,tier=back", false),
        ("app in (api,db),tier", false),
        ("missing!=x", true),
    ] {
        assert_eq!(
            label_selector_matches(selector, &labels),
            expected,
            "{selector}"
        );
    }
}

#[test]
fn rbac_grants_read_only_access_to_what_the_watches_need() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/base/rbac.yaml"
    ))
    .expect("deploy/base/rbac.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect();
    let kind = |d: &serde_yaml::Value| d["kind"].as_str().unwrap_or("").to_string();
    let role = docs
        .iter()
        .find(|d| kind(d) == "ClusterRole")
        .expect("a ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let verbs: Vec<&str> = rule["verbs"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(verbs, ["get", "list", "watch"], "read-only: {rule:?}");
        for group in rule["apiGroups"].as_sequence().unwrap() {
            for resource in rule["resources"].as_sequence().unwrap() {
                granted.insert(format!(
                    "{}/{}",
                    group.as_str().unwrap(),
                    resource.as_str().unwrap()
                ));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from(
            [
                "/services",
                "/nodes",
                "/pods",
                "discovery.k8s.io/endpointslices"
            ]
            .map(String::from)
        )
    );
    let account = docs.iter().find(|d| kind(d) == "ServiceAccount").unwrap();
    assert_eq!(account["metadata"]["name"].as_str(), Some("carousel"));
    assert_eq!(
        account["metadata"]["namespace"].as_str(),
        Some("kube-system")
    );
    let binding = docs
        .iter()
        .find(|d| kind(d) == "ClusterRoleBinding")
        .unwrap();
    assert_eq!(binding["roleRef"]["name"].as_str(), Some("carousel"));
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some("carousel"));
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some("kube-system")
    );
}
