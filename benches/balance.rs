//! What a balancer costs: `pick()` for every algorithm at 3 to 10 000 endpoints, a
//! ClientIP affinity hit, and building each balancer from 10 000 endpoints.
//!
//! `baseline/*` measures the floor on this machine, for reading the rest on a busy one:
//! one atomic add (every shared-state pick does at least one) and one clock read (every
//! affinity lookup does one).
//!
//! cargo bench --bench balance -- --warm-up-time 1 --measurement-time 2

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use carousel::addr::PodAddr;
use carousel::balance::{self, AffinityStats, Backend, Backends, BuildOptions};
use carousel::model::{Algorithm, Balancing};
use carousel::telemetry::{names, Telemetry};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use metrics::Label;

const SIZES: [usize; 4] = [3, 100, 1_000, 10_000];

/// Distinct clients the picks cycle through, so that hashing algorithms do not hit one
/// cache line every time.
const CLIENTS: usize = 1024;

/// `n` endpoints with weights 1 to 4 and 1 to 3 open connections each (so that
/// least-connections has to scan rather than stop at an idle endpoint).
fn backends(n: usize) -> Backends {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1);
            let b = Backend::new(PodAddr(SocketAddr::from((ip, 8080))), 1 + (i % 4) as u32);
            b.active.store(1 + (i % 3) as u32, Ordering::Relaxed);
            b
        })
        .collect()
}

fn clients() -> Vec<IpAddr> {
    (0..CLIENTS)
        .map(|i| IpAddr::V4(Ipv4Addr::new(192, 168, (i / 256) as u8, (i % 256) as u8)))
        .collect()
}

fn options() -> BuildOptions {
    BuildOptions {
        seed: Some(42),
        ..Default::default()
    }
}

fn baseline(c: &mut Criterion) {
    let counter = AtomicUsize::new(0);
    c.bench_function("baseline/fetch_add", |b| {
        b.iter(|| counter.fetch_add(1, Ordering::Relaxed))
    });
    c.bench_function("baseline/instant_now", |b| {
        b.iter(tokio::time::Instant::now)
    });
}

fn pick(c: &mut Criterion) {
    let clients = clients();
    for algorithm in Algorithm::ALL {
        let mut group = c.benchmark_group(format!("pick/{algorithm}"));
        for n in SIZES {
            let balancer = balance::build(algorithm, backends(n), &options());
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % CLIENTS;
                    balancer.pick(black_box(clients[i]))
                })
            });
        }
        group.finish();
    }
}

/// A remembered client over round-robin at 1 000 endpoints, with real metric handles.
fn affinity_hit(c: &mut Criterion) {
    let telemetry = Telemetry::new();
    let labels = |result: &'static str| vec![Label::new("result", result)];
    let stats = AffinityStats {
        hit: telemetry.counter(names::AFFINITY_LOOKUPS_TOTAL, labels("hit")),
        miss: telemetry.counter(names::AFFINITY_LOOKUPS_TOTAL, labels("miss")),
        expired: telemetry.counter(names::AFFINITY_LOOKUPS_TOTAL, labels("expired")),
        overflow: telemetry.counter(names::AFFINITY_OVERFLOW_TOTAL, Vec::new()),
        entries: telemetry.gauge(names::AFFINITY_ENTRIES, Vec::new()),
    };
    let balancing = Balancing {
        algorithm: Algorithm::RoundRobin,
        affinity: Some(Duration::from_secs(10_800)),
    };
    let picker = balance::rebuild_or_build(None, &balancing, backends(1_000), &options(), stats);
    let clients = clients();
    for client in &clients {
        picker.pick(*client); // remember every client first: the loop below only hits
    }
    c.bench_function("affinity/hit/1000", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            picker.pick(black_box(clients[i]))
        })
    });
    // As the data path calls it: with the clock reading the connection already took.
    let now = tokio::time::Instant::now();
    c.bench_function("affinity/hit_at/1000", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % CLIENTS;
            picker.pick_at(black_box(clients[i]), now)
        })
    });
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build/10000");
    group.sample_size(20);
    let set = backends(10_000);
    for algorithm in Algorithm::ALL {
        group.bench_function(algorithm.name(), |b| {
            b.iter(|| balance::build(algorithm, black_box(set.clone()), &options()))
        });
    }
    group.finish();
}

criterion_group!(benches, baseline, pick, affinity_hit, build);
criterion_main!(benches);
