//! The API source's cost: one EndpointSlice change applied to a store of 10 000
//! Services × 10 endpoints (and that table's memory), and from a slice change at a
//! fake API server to new connections following it, through kube's client and the proxy.

#[path = "../tests/common/fake_apiserver.rs"]
#[allow(dead_code)] // the bench uses part of the tests' server
mod fake_apiserver;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carousel::balance::BuildOptions;
use carousel::discovery::convert::Scope;
use carousel::discovery::kube::COALESCE;
use carousel::discovery::store::Store;
use carousel::lab::backend::{ask, Pod};
use carousel::model::Locality;
use carousel::proxy::routes::{RouteBuilder, RouteTable};
use carousel::proxy::{ForwardConfig, Mode, ProxyConfig};
use carousel::run::{self, ClusterRun};
use carousel::shutdown::Shutdown;
use carousel::telemetry::Telemetry;
use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::runtime::watcher::Event;
use serde_json::{json, Value};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

fn service_json(i: usize) -> Value {
    json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

fn slice_json(i: usize, generation: u8) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            json!({"addresses": [format!("10.{}.{}.{}", 100 + generation, i / 250, (i % 250) as u8 ^ e as u8)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", e % 3),
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("svc-{i}-pod-{e}")}})
        })
        .collect();
    json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn big_store() -> Store {
    let mut store = Store::new(Scope::default(), None);
    store.apply_service(Event::Init);
    for i in 0..SERVICES {
        let svc: core::Service = serde_json::from_value(service_json(i)).unwrap();
        store.apply_service(Event::InitApply(svc));
    }
    store.apply_service(Event::InitDone);
    store.apply_slice(Event::Init);
    for i in 0..SERVICES {
        let s: discovery::EndpointSlice = serde_json::from_value(slice_json(i, 0)).unwrap();
        store.apply_slice(Event::InitApply(s));
    }
    store.apply_slice(Event::InitDone);
    store
}

/// Resident memory of this process, from /proc (Linux), in bytes.
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn one_slice_change(c: &mut Criterion) {
    // The first build's RSS growth also counts the garbage of parsing 20 000 objects,
    // which the allocator keeps. A second build, with the first still alive, reuses that
    // garbage: its growth is close to what a store and its table really hold.
    let start = rss();
    let mut warm = big_store();
    let warm_table = warm.flush().table.expect("the first table");
    let warmed = rss();
    let mut store = big_store();
    let first = store.flush().table.expect("the first table");
    let after = rss();
    if let (Some(s), Some(w), Some(a)) = (start, warmed, after) {
        println!(
            "store + its table, {SERVICES} Services x {ENDPOINTS} endpoints: \
             RSS growth {:.1} MB for the first build (with parse garbage), \
             {:.1} MB for a second one",
            w.saturating_sub(s) as f64 / 1e6,
            a.saturating_sub(w) as f64 / 1e6
        );
    }
    drop((first, warm_table, warm));
    // Alternate between two versions of one slice: every apply is a real change.
    let slices: Vec<discovery::EndpointSlice> = (0..2)
        .map(|g| serde_json::from_value(slice_json(SERVICES / 2, g)).unwrap())
        .collect();
    let mut turn = 0;
    c.bench_function(
        "apply one EndpointSlice change + publish (10k Services)",
        |b| {
            b.iter(|| {
                turn ^= 1;
                store.apply_slice(Event::Apply(slices[turn].clone()));
                let table = store.flush().table.expect("a changed table");
                Arc::new(table)
            })
        },
    );
    c.bench_function(
        "apply one EndpointSlice change, no publish (10k Services)",
        |b| {
            b.iter(|| {
                turn ^= 1;
                store.apply_slice(Event::Apply(slices[turn].clone()));
            })
        },
    );

    // The proxy's side: the route table for the new snapshot. Untouched Services are the
    // same `Arc` and keep their routes; only the changed one is rebuilt.
    let telemetry = Telemetry::new();
    let options = BuildOptions::default();
    let here = Locality::default();
    // Publish what the unpublished applies left, so that the next apply is a change
    // whatever their count was.
    let _ = store.flush();
    turn ^= 1;
    store.apply_slice(Event::Apply(slices[turn].clone()));
    let table = Arc::new(store.flush().table.expect("a changed table"));
    let started = std::time::Instant::now();
    let mut routes =
        RouteBuilder::new(&telemetry, options).build(&table, &RouteTable::default(), &here);
    println!(
        "route table from scratch, {SERVICES} Services x {ENDPOINTS} endpoints: {:?}",
        started.elapsed()
    );
    c.bench_function(
        "one EndpointSlice change: publish + route table rebuild (10k Services)",
        |b| {
            b.iter(|| {
                turn ^= 1;
                store.apply_slice(Event::Apply(slices[turn].clone()));
                let table = Arc::new(store.flush().table.expect("a changed table"));
                routes = RouteBuilder::new(&telemetry, options).build(&table, &routes, &here);
            })
        },
    );
}

fn pod_ip(host: u8) -> SocketAddr {
    SocketAddr::from(([127, 66, 200, host], 9000))
}

/// A slice pointing at pod `name` alone.
fn bench_slice(pod: &Pod) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "follow-1", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "follow"}},
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": pod.addr.port(), "protocol": "TCP"}],
        "endpoints": [{"addresses": [pod.addr.ip().to_string()],
                       "targetRef": {"kind": "Pod", "namespace": "bench", "name": pod.name}}],
    })
}

fn slice_change_to_traffic(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let service = SocketAddr::from(([127, 66, 200, 1], 8080));
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    let (api, pods, stop, task) = rt.block_on(async {
        let api = fake_apiserver::FakeApiServer::start().await;
        let pods = vec![
            Pod::start("one", pod_ip(10)).await.unwrap(),
            Pod::start("two", pod_ip(11)).await.unwrap(),
        ];
        api.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "follow", "namespace": "bench"},
            "spec": {"clusterIP": "127.66.200.1",
                     "ports": [{"name": "web", "port": 8080, "targetPort": 9000}]},
        }));
        api.apply(bench_slice(&pods[0]));
        let config = ClusterRun {
            master: None,
            kubeconfig: Some(api.kubeconfig().to_owned()),
            service_selector: None,
            scope: Scope::default(),
            proxy: ProxyConfig {
                forward: ForwardConfig {
                    connect_timeout: Duration::from_secs(1),
                    ..ForwardConfig::default()
                },
                mode: Mode::Bind {
                    nodeport_addresses: Vec::new(),
                },
                balance: BuildOptions {
                    seed: Some(1),
                    ..BuildOptions::default()
                },
                ..ProxyConfig::default()
            },
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let task = tokio::spawn(run::run_from_cluster(
            config,
            Telemetry::new(),
            metrics,
            health,
            Shutdown::new(stop.clone().cancelled_owned(), std::future::ready(())),
        ));
        // Bounded: the first sync takes well under a second.
        for _ in 0..500 {
            if ask(client, service, Duration::from_secs(1))
                .await
                .ok()
                .as_deref()
                == Some("one")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (api, pods, stop, task)
    });
    let mut group = c.benchmark_group("end to end");
    group.sample_size(20);
    let mut turn = 0;
    group.bench_function(
        "slice change at the API server to new connections following",
        |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // A quiet spell first (not timed), so that the change is published
                        // at once rather than held to the end of a coalescing window.
                        tokio::time::sleep(COALESCE * 2).await;
                        turn ^= 1;
                        let target = &pods[turn];
                        let started = Instant::now();
                        api.apply(bench_slice(target));
                        // Bounded: gives up after 10 000 asks (far beyond any target).
                        for _ in 0..10_000 {
                            if ask(client, service, Duration::from_secs(1))
                                .await
                                .ok()
                                .as_deref()
                                == Some(target.name.as_str())
                            {
                                break;
                            }
                        }
                        total += started.elapsed();
                    }
                    total
                })
            })
        },
    );
    group.finish();
    rt.block_on(async {
        stop.cancel();
        let _ = task.await;
        drop(api);
    });
}

criterion_group!(benches, one_slice_change, slice_change_to_traffic);
criterion_main!(benches);
