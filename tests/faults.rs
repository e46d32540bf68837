//! The fault table, on real sockets: pods that refuse, hang, reset or die; a broken
//! state file; a rolling update under load; connection limits and idle connections.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carousel::lab::backend::{ask, Pod};
use common::*;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ASK: Duration = Duration::from_secs(5);

fn client_ip() -> std::net::IpAddr {
    "127.0.0.1".parse().unwrap()
}

/// Asks `n` times; returns the answers by pod and the number of failed connections.
async fn tally(service: SocketAddr, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut counts = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match ask(client_ip(), service, ASK).await {
            Ok(pod) => *counts.entry(pod).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (counts, failed)
}

/// A listener whose accept queue is full and never drained: SYNs to it are dropped, as
/// with a blackholed pod, and a connect only times out.
async fn blackhole() -> (SocketAddr, Socket, Vec<TcpStream>) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
    {
        fillers.push(s);
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (addr, socket, fillers)
}

#[tokio::test]
async fn a_blackholed_pod_costs_a_timeout_once_then_is_passed_over() {
    let healthy = pods(&["a", "b"]).await;
    let (hole, _listener, _fillers) = blackhole().await;
    let mut eps: Vec<Ep> = healthy.iter().map(|p| Ep::ready(p.addr, &p.name)).collect();
    eps.push(Ep::ready(hole, "hole"));
    let svc = Svc::new("hole", "127.98.1.1", 8080, eps);
    let carousel = Carousel::start_configured(&svc.state(), |c| {
        c.forward.connect_timeout = Duration::from_millis(300);
    })
    .await;

    let (counts, failed) = tally(svc.addr(), 30).await;

    assert_eq!(failed, 0, "no client saw the blackhole");
    assert_eq!(counts.values().sum::<usize>(), 30);
    let text = carousel.metrics_text().await;
    let timeouts = metric(
        &text,
        "carousel_connections_total",
        &[("pod", "hole"), ("outcome", "connect_error")],
    )
    .unwrap();
    assert!(
        (1.0..10.0).contains(&timeouts),
        "ejected after the first timeout, not tried every third time: {timeouts}"
    );
    carousel.stop().await;
}

#[tokio::test]
async fn a_pod_that_resets_mid_stream_is_ejected_and_new_connections_go_elsewhere() {
    let healthy = pods(&["steady"]).await;
    // A pod that accepts, reads the request, then resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetter = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    });
    let svc = Svc::new(
        "resetting",
        "127.98.2.1",
        8080,
        vec![
            Ep::ready(resetter, "resetter"),
            Ep::ready(healthy[0].addr, "steady"),
        ],
    );
    let carousel = Carousel::start(&svc.state()).await;

    // Round-robin sends the first connection to the resetter (lower port or not, one of
    // the first two is); keep asking until a client has met the reset.
    let mut saw_reset = false;
    for _ in 0..2 {
        if let Err(e) = ask(client_ip(), svc.addr(), ASK).await {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "the reset reaches the client as a reset"
            );
            saw_reset = true;
        }
    }
    assert!(
        saw_reset,
        "one of two round-robin picks is the resetting pod"
    );
    let (counts, failed) = tally(svc.addr(), 10).await;
    assert_eq!(
        (failed, counts),
        (0, BTreeMap::from([("steady".into(), 10)])),
        "ejected: new connections avoid it"
    );
    let text = carousel.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "carousel_endpoint_ejections_total",
            &[("pod", "resetter")]
        ),
        Some(1.0)
    );
    carousel.stop().await;
}

#[tokio::test]
async fn a_dead_pod_with_open_connections_costs_no_new_connection_and_comes_back() {
    let survivor = pods(&["survivor"]).await;
    let mut doomed = Some(
        Pod::start("doomed", "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
    );
    let doomed_addr = doomed.as_ref().unwrap().addr;
    let svc = Svc::new(
        "dying",
        "127.98.3.1",
        8080,
        vec![
            Ep::ready(doomed_addr, "doomed"),
            Ep::ready(survivor[0].addr, "survivor"),
        ],
    );
    let carousel = Carousel::start(&svc.state()).await;
    let (counts, failed) = tally(svc.addr(), 4).await;
    assert_eq!((failed, counts.len()), (0, 2));

    // An open connection to the doomed pod, then the pod's process dies.
    let mut open = TcpStream::connect(svc.addr()).await.unwrap();
    open.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    drop(doomed.take());
    let (counts, failed) = tally(svc.addr(), 20).await;
    assert_eq!(
        (failed, counts),
        (0, BTreeMap::from([("survivor".into(), 20)]))
    );

    // The pod comes back on the same address: carousel takes it back by itself.
    let revived = Pod::start("revived", doomed_addr).await.unwrap();
    eventually("the revived pod gets connections again", || async {
        ask(client_ip(), svc.addr(), ASK).await.ok().as_deref() == Some("revived")
    })
    .await;
    assert!(revived.served() >= 1);
    carousel.stop().await;
}

#[tokio::test]
async fn a_deleted_or_half_written_state_file_keeps_the_last_good_state_until_fixed() {
    let first = pods(&["first"]).await;
    let second = pods(&["second"]).await;
    let svc = Svc::new(
        "edited",
        "127.98.4.1",
        8080,
        vec![Ep::ready(first[0].addr, "first")],
    );
    let carousel = Carousel::start(&svc.state()).await;
    let errors = |c: &Carousel| {
        let text = c.telemetry.render();
        text.lines()
            .find(|l| l.starts_with("carousel_config_errors_total "))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap()
    };

    std::fs::remove_file(&carousel.state).unwrap();
    eventually("the missing file is reported", || async {
        errors(&carousel) == 1.0
    })
    .await;
    assert_eq!(
        tally(svc.addr(), 3).await,
        (BTreeMap::from([("first".into(), 3)]), 0)
    );

    let mut fixed = svc.clone();
    fixed.endpoints = vec![Ep::ready(second[0].addr, "second")];
    let text = fixed.state();
    carousel.write_state(&text[..text.len() - 12]); // cut inside the last endpoint
    eventually("the half-written file is refused", || async {
        errors(&carousel) == 2.0
    })
    .await;
    assert_eq!(
        tally(svc.addr(), 3).await,
        (BTreeMap::from([("first".into(), 3)]), 0)
    );

    carousel.write_state(&text);
    eventually("the fix is picked up", || async {
        ask(client_ip(), svc.addr(), ASK).await.ok().as_deref() == Some("second")
    })
    .await;
    carousel.stop().await;
}

#[tokio::test]
async fn a_rolling_update_under_steady_load_fails_no_connection() {
    let old = pods(&["old-1", "old-2", "old-3"]).await;
    let new = pods(&["new-1", "new-2", "new-3"]).await;
    let svc_with = |eps: Vec<Ep>| Svc::new("rolling", "127.98.5.1", 8080, eps);
    let ready = |p: &Pod| Ep::ready(p.addr, &p.name);
    let carousel = Carousel::start(&svc_with(old.iter().map(ready).collect()).state()).await;
    let service = svc_with(Vec::new()).addr();

    // A client opening connections continuously while the pods are replaced one by one,
    // and 50 more after the update is done (bounded: at most 200 000 connections).
    let done = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let done = done.clone();
        async move {
            let mut seen: Vec<String> = Vec::new();
            let mut failed = Vec::new();
            let mut after_done = 0;
            for _ in 0..200_000 {
                match ask(client_ip(), service, ASK).await {
                    Ok(pod) => seen.push(pod),
                    Err(e) => failed.push(e.to_string()),
                }
                if done.load(Ordering::Relaxed) {
                    after_done += 1;
                    if after_done == 50 {
                        break;
                    }
                }
            }
            (seen, failed)
        }
    });
    for step in 0..3 {
        // New pod i turns ready and old pod i starts terminating (still serving), then goes.
        let mut eps: Vec<Ep> = new[..=step].iter().map(ready).collect();
        eps.extend(old[step + 1..].iter().map(ready));
        eps.push(Ep::terminating(old[step].addr, &old[step].name, true));
        carousel.write_state(&svc_with(eps.clone()).state());
        tokio::time::sleep(Duration::from_millis(400)).await;
        eps.pop();
        carousel.write_state(&svc_with(eps).state());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    done.store(true, Ordering::Relaxed);
    let (seen, failed) = load.await.unwrap();

    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(
        seen.len() > 100,
        "the load ran through the update ({} connections)",
        seen.len()
    );
    let tail: Vec<&String> = seen.iter().rev().take(30).collect();
    assert!(
        tail.iter().all(|p| p.starts_with("new-")),
        "after the update only new pods answer: {tail:?}"
    );
    carousel.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_at_once_and_counted() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let svc = Svc::new("limited", "127.98.6.1", 8080, vec![Ep::ready(echo, "echo")]);
    let carousel = Carousel::start_configured(&svc.state(), |c| c.max_connections = Some(2)).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(svc.addr()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        held.push(s);
    }
    let mut third = TcpStream::connect(svc.addr()).await.unwrap();
    let mut buf = [0u8; 4];
    let refused = third.read(&mut buf).await;
    assert!(
        matches!(refused, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{refused:?}"
    );
    let text = carousel.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "carousel_connections_rejected_total",
            &[("reason", "max_connections")]
        ),
        Some(1.0)
    );

    drop(held.pop());
    eventually("a slot frees up", || async {
        let Ok(mut s) = TcpStream::connect(svc.addr()).await else {
            return false;
        };
        let mut got = [0u8; 4];
        s.write_all(b"pong").await.is_ok() && s.read_exact(&mut got).await.is_ok()
    })
    .await;
    carousel.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let svc = Svc::new("idle", "127.98.7.1", 8080, vec![Ep::ready(echo, "echo")]);
    let carousel = Carousel::start_configured(&svc.state(), |c| {
        c.forward.idle_timeout = Some(Duration::from_millis(400));
    })
    .await;

    let mut idle = TcpStream::connect(svc.addr()).await.unwrap();
    let mut busy = TcpStream::connect(svc.addr()).await.unwrap();
    // The busy one talks every 100 ms for 1.2 s, three idle timeouts' worth.
    for _ in 0..12 {
        busy.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        busy.read_exact(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(PATIENCE, idle.read(&mut buf))
        .await
        .expect("the idle connection is closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    carousel.stop().await;
}

/// A Service address that another process holds (a plain listener, no SO_REUSEPORT):
/// bind mode cannot listen there. The failure is counted as a sync error and retried with
/// backoff, not left until the next table change; once the address is free, the listener
/// opens and the Service answers.
#[tokio::test]
async fn a_listener_that_cannot_open_is_retried_until_it_can() {
    let pods = pods(&["retry-a"]).await;
    let squatter = TcpListener::bind("127.67.0.1:0").await.unwrap();
    let service = squatter.local_addr().unwrap();
    let svc = Svc::new(
        "retry",
        "127.67.0.1",
        service.port(),
        vec![Ep::ready(pods[0].addr, "retry-a")],
    );
    let carousel = Carousel::start(&svc.state()).await;
    eventually("sync errors are counted", || async {
        metric(
            &carousel.metrics_text().await,
            "carousel_sync_errors_total",
            &[],
        )
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    drop(squatter);
    eventually("the listener opens once the address is free", || async {
        ask(client_ip(), service, ASK)
            .await
            .is_ok_and(|pod| pod == "retry-a")
    })
    .await;
    // Retried with backoff (0.4-0.8 s, then 0.8-1.6 s...), not in a loop.
    let errors = metric(
        &carousel.metrics_text().await,
        "carousel_sync_errors_total",
        &[],
    )
    .unwrap();
    assert!(errors < 20.0, "{errors} sync errors");
    carousel.stop().await;
}
