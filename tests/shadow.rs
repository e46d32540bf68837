//! Shadow evaluation, the fairness gauge and `carousel status` against a running
//! carousel, on real sockets in 127.55.190.0/24 (Service, pods) and 127.55.191.0/24
//! (clients).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use carousel::algorithm::Algorithm;
use carousel::lab::bench::load::{BenchPod, Client, PodSpec};
use carousel::model::Protocol;
use carousel::status;
use common::{eventually, metric, Carousel, Ep, Svc};

const CLIENTS: u8 = 40;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_algorithms_count_their_picks_per_pod() {
    let mut pods = Vec::new();
    for i in 0..4u8 {
        let spec = PodSpec::new(&format!("pod-{i}"), Duration::ZERO);
        let addr = SocketAddr::from(([127, 55, 190, 10 + i], 0));
        pods.push(BenchPod::start(&spec, addr, Protocol::Tcp).await.unwrap());
    }
    let endpoints = pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect();
    let svc = Svc::new("web", "127.55.190.1", 8000, endpoints);
    let carousel = Carousel::start_configured(&svc.state(), |c| {
        c.shadow = vec![Algorithm::Maglev, Algorithm::RoundRobin];
    })
    .await;

    for _ in 0..ROUNDS {
        for c in 1..=CLIENTS {
            let source = IpAddr::V4(Ipv4Addr::new(127, 55, 191, c));
            let mut client = Client::connect(source, svc.addr(), Protocol::Tcp)
                .await
                .unwrap();
            client.request().await.unwrap();
        }
    }

    let text = carousel.metrics_text().await;
    let total = usize::from(CLIENTS) * ROUNDS;
    let shadow = |algorithm: &str, pod: &str| {
        metric(
            &text,
            "carousel_shadow_picks_total",
            &[("service", "web"), ("algorithm", algorithm), ("pod", pod)],
        )
        .unwrap_or(0.0)
    };
    let maglev: Vec<f64> = pods.iter().map(|p| shadow("maglev", &p.name)).collect();
    assert_eq!(maglev.iter().sum::<f64>() as usize, total, "{text}");
    // Maglev hashes the client: forty clients land on more than one pod.
    assert!(
        maglev.iter().filter(|n| **n > 0.0).count() > 1,
        "{maglev:?}"
    );
    // A round-robin shadow of a round-robin Service sees exactly the real picks.
    for p in &pods {
        let real = metric(
            &text,
            "carousel_connections_total",
            &[("pod", &p.name), ("outcome", "ok")],
        )
        .unwrap();
        assert_eq!(shadow("round-robin", &p.name), real, "{}", p.name);
        assert_eq!(real as usize, total / pods.len());
    }

    // `carousel status` reads the same carousel.
    let url: status::MetricsUrl = format!("http://{}/metrics", carousel.metrics)
        .parse()
        .unwrap();
    // Round-robin over four pods: once the fairness task has seen the picks, it is 1.
    eventually("the fairness gauge reads 1", || async {
        let snapshot = status::snapshot(&url).await.unwrap();
        snapshot
            .services
            .iter()
            .any(|s| s.shown_fairness().is_some_and(|f| (f - 1.0).abs() < 1e-9))
    })
    .await;
    let services = status::snapshot(&url).await.unwrap().services;
    let web = services.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(web.pods.len(), 4);
    assert!(web
        .pods
        .iter()
        .all(|p| p.state == status::State::Active && p.weight == Some(1)));
    assert!((web.pods.iter().map(|p| p.share).sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(
        (web.shown_fairness().unwrap() - 1.0).abs() < 1e-9,
        "{web:?}"
    );
    carousel.stop().await;
}
