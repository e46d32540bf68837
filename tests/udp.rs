//! UDP Services end to end in bind mode: Debian's dnsmasq as the pods (one per pod
//! address, each answering `who.test` with its own address, over UDP and TCP), the real
//! proxy from a state file, and DNS queries from real sockets on 127.0.0.0/8, each from
//! a fresh source port unless a test says otherwise. Each client socket is connected to
//! the Service address, so it accepts only answers that come from it.
//!
//! Each test owns 127.78.N.0/24: the Service at .1:53, pods at .10 and up on port 5353,
//! clients at .100 and up.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carousel::proxy::udp::UdpConfig;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const POD_PORT: u16 = 5353;
const ANSWER: Duration = Duration::from_secs(2);

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 78, net, host))
}

fn service(net: u8) -> SocketAddr {
    SocketAddr::new(ip(net, 1), 53)
}

/// A dnsmasq pod, stopped on drop.
struct DnsPod {
    name: String,
    /// The address it answers `who.test` with: its own, for a pod of its own address.
    ip: IpAddr,
    addr: SocketAddr,
    child: Child,
}

impl DnsPod {
    /// Starts dnsmasq on `ip`:5353 (UDP and TCP), answering `who.test` with `ip`, and
    /// waits until it answers.
    async fn start(name: &str, ip: IpAddr) -> DnsPod {
        DnsPod::start_at(name, SocketAddr::new(ip, POD_PORT), ip).await
    }

    /// Starts dnsmasq on `addr`, answering `who.test` with `answer`, and waits until it
    /// answers.
    async fn start_at(name: &str, addr: SocketAddr, answer: IpAddr) -> DnsPod {
        let child = dnsmasq(Command::new("dnsmasq"), &[addr.ip()], addr.port(), answer);
        let from = match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        eventually(&format!("dnsmasq answers on {addr}"), || async move {
            query(from, addr).await.ok() == Some(answer)
        })
        .await;
        DnsPod {
            name: name.into(),
            ip: answer,
            addr,
            child,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DnsPod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Four dnsmasq pods of test `net`.
async fn dns_pods(net: u8) -> Vec<DnsPod> {
    let mut pods = Vec::new();
    for i in 0..4u8 {
        pods.push(DnsPod::start(&format!("dns-{i}"), ip(net, 10 + i)).await);
    }
    pods
}

/// A DNS query for `who.test`, type A, with this id.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32);
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // recursion desired; one question
    for label in ["who", "test"] {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The address in the one A record of an answer to query `id`.
fn dns_answer(id: u16, answer: &[u8]) -> io::Result<IpAddr> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if answer.len() < 12 + 4 || answer[..2] != id.to_be_bytes() {
        return Err(bad("not an answer to this query"));
    }
    if u16::from_be_bytes([answer[6], answer[7]]) != 1 {
        return Err(bad("not one answer record"));
    }
    let a = &answer[answer.len() - 4..];
    Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])))
}

/// One query from a fresh port on `from` to `server`, over UDP: the address answered.
async fn query(from: IpAddr, server: SocketAddr) -> io::Result<IpAddr> {
    ask_on(&client(from, server).await?, ANSWER).await
}

/// A socket on a fresh port of `from`, connected to `server`.
async fn client(from: IpAddr, server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind((from, 0)).await?;
    socket.connect(server).await?;
    Ok(socket)
}

/// `n` queries, each from a port of its own: the sockets stay open until all are
/// answered, so no port is used twice (a port used again would be the same flow).
async fn queries(n: usize, from: IpAddr, server: SocketAddr) -> Vec<IpAddr> {
    let mut sockets = Vec::new();
    let mut answers = Vec::new();
    for i in 0..n {
        let socket = client(from, server).await.expect("a client socket");
        let answer = ask_on(&socket, ANSWER).await;
        answers.push(answer.unwrap_or_else(|e| panic!("query {i}: {e}")));
        sockets.push(socket);
    }
    answers
}

/// One query on `socket` (connected to the Service), answered within `wait`.
async fn ask_on(socket: &UdpSocket, wait: Duration) -> io::Result<IpAddr> {
    let id = socket.local_addr()?.port();
    socket.send(&dns_query(id)).await?;
    let mut buf = [0u8; 512];
    let len = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
    dns_answer(id, &buf[..len])
}

/// One query over TCP (RFC 1035 4.2.2: a two-byte length before each message).
async fn query_tcp(server: SocketAddr) -> io::Result<IpAddr> {
    let mut stream = TcpStream::connect(server).await?;
    let q = dns_query(4242);
    stream.write_all(&(q.len() as u16).to_be_bytes()).await?;
    stream.write_all(&q).await?;
    let len = stream.read_u16().await?;
    let mut answer = vec![0; len.into()];
    stream.read_exact(&mut answer).await?;
    dns_answer(4242, &answer)
}

/// The state file: a Service as cluster DNS publishes itself (UDP 53 `dns`, TCP 53
/// `dns-tcp`, both to port 5353 of the pods), one EndpointSlice, and a Pod object per
/// pod with `labels(i)`.
fn dns_state(
    net: u8,
    pods: &[DnsPod],
    spec: Value,
    annotations: Value,
    labels: impl Fn(usize) -> Value,
) -> String {
    let name = format!("dns-{net}");
    let mut service_spec = json!({
        "clusterIP": ip(net, 1).to_string(),
        "ports": [
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
        ],
    });
    if let (Some(s), Some(extra)) = (service_spec.as_object_mut(), spec.as_object()) {
        s.extend(extra.clone());
    }
    let mut docs = vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "test", "annotations": annotations},
            "spec": service_spec,
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "test",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": POD_PORT, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": POD_PORT, "protocol": "TCP"}],
            "endpoints": pods.iter().map(|p| json!({
                "addresses": [p.ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": p.name, "namespace": "test"},
            })).collect::<Vec<_>>(),
        }),
    ];
    for (i, p) in pods.iter().enumerate() {
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": "test", "labels": labels(i)},
            "status": {"podIP": p.ip.to_string()},
        }));
    }
    docs.iter().map(|d| format!("---\n{d}\n")).collect()
}

/// The pod names behind answers, counted.
fn by_pod(pods: &[DnsPod], answers: &[IpAddr]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        let pod = pods
            .iter()
            .find(|p| p.ip == *a)
            .expect("an answer from a pod");
        *counts.entry(pod.name.clone()).or_default() += 1;
    }
    counts
}

/// How many of `n` queries, each from a port of its own, each pod answered, in pod
/// order.
async fn shares(n: usize, net: u8, pods: &[DnsPod]) -> Vec<usize> {
    let answers = queries(n, ip(net, 100), service(net)).await;
    pods.iter()
        .map(|p| answers.iter().filter(|a| **a == p.ip).count())
        .collect()
}

async fn start(state: &str, udp: UdpConfig) -> Carousel {
    Carousel::start_configured(state, |c| c.udp = udp).await
}

#[tokio::test]
async fn four_hundred_queries_reach_four_dnsmasq_pods_a_hundred_each_and_tcp_dns_works_beside() {
    let net = 1;
    let pods = dns_pods(net).await;
    let carousel = start(
        &dns_state(net, &pods, json!({}), json!({}), |_| json!({})),
        UdpConfig::default(),
    )
    .await;
    assert_eq!(shares(400, net, &pods).await, [100, 100, 100, 100]);
    // TCP 53 of the same Service is a port of its own, served beside.
    let tcp = query_tcp(service(net)).await.expect("a TCP DNS answer");
    assert!(pods.iter().any(|p| p.ip == tcp), "{tcp}");

    let metrics = carousel.metrics_text().await;
    for pod in &pods {
        let series = |name, extra: &[(&str, &str)]| {
            let mut labels = vec![("port", "dns"), ("pod", pod.name.as_str())];
            labels.extend_from_slice(extra);
            metric(&metrics, name, &labels)
        };
        assert_eq!(series("carousel_udp_flows_total", &[]), Some(100.0));
        for direction in ["to_endpoint", "to_client"] {
            assert_eq!(
                series("carousel_udp_datagrams_total", &[("direction", direction)]),
                Some(100.0),
                "{} {direction}",
                pod.name
            );
        }
    }
    carousel.stop().await;
}

#[tokio::test]
async fn weights_send_three_quarters_to_the_canary_pods() {
    let net = 2;
    let pods = dns_pods(net).await;
    let labels = |i: usize| json!({"version": if i < 2 { "custom" } else { "original" }});
    let annotations = json!({
        "carousel.dev/load-balancer": "weighted-round-robin",
        "carousel.dev/weights": "version=custom:3,version=original:1",
    });
    let carousel = start(
        &dns_state(net, &pods, json!({}), annotations, labels),
        UdpConfig::default(),
    )
    .await;
    assert_eq!(shares(400, net, &pods).await, [150, 150, 50, 50]);
    carousel.stop().await;
}

#[tokio::test]
async fn client_ip_affinity_keeps_each_client_on_one_pod_across_flows() {
    let net = 3;
    let pods = dns_pods(net).await;
    let carousel = start(
        &dns_state(
            net,
            &pods,
            json!({"sessionAffinity": "ClientIP"}),
            json!({}),
            |_| json!({}),
        ),
        UdpConfig::default(),
    )
    .await;
    let mut seen: BTreeMap<IpAddr, Vec<IpAddr>> = BTreeMap::new();
    for round in 0..10 {
        for client in 0..8 {
            let from = ip(net, 100 + client);
            let a = query(from, service(net))
                .await
                .unwrap_or_else(|e| panic!("round {round}, client {from}: {e}"));
            seen.entry(from).or_default().push(a);
        }
    }
    for (client, answers) in &seen {
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{client} moved: {answers:?}"
        );
    }
    // Eight clients over four pods by round-robin for each first flow: two each.
    let firsts: Vec<IpAddr> = seen.values().map(|a| a[0]).collect();
    let counts = by_pod(&pods, &firsts);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [2, 2, 2, 2]);
    carousel.stop().await;
}

#[tokio::test]
async fn a_killed_pod_costs_a_retry_and_keeps_no_flow() {
    let net = 4;
    let mut pods = dns_pods(net).await;
    let carousel = start(
        &dns_state(net, &pods, json!({}), json!({}), |_| json!({})),
        UdpConfig::default(),
    )
    .await;
    // Forty clients, each on one socket (one flow each), ten per pod.
    let mut clients = Vec::new();
    for _ in 0..40 {
        let socket = UdpSocket::bind((ip(net, 100), 0)).await.unwrap();
        socket.connect(service(net)).await.unwrap();
        ask_on(&socket, ANSWER).await.expect("a first answer");
        clients.push(socket);
    }
    let dead = pods[3].ip;
    let dead_name = pods[3].name.clone();
    pods[3].kill();
    // Each client asks again on its flow, retrying as a resolver does: the ten whose
    // flow was on the dead pod lose one query to it and get the next one answered.
    let mut retried = 0;
    for (i, socket) in clients.iter().enumerate() {
        let mut answer = None;
        for _attempt in 0..3 {
            match ask_on(socket, Duration::from_millis(300)).await {
                Ok(a) => {
                    answer = Some(a);
                    break;
                }
                Err(_) => retried += 1,
            }
        }
        let answer = answer.unwrap_or_else(|| panic!("client {i} got no answer in 3 tries"));
        assert_ne!(answer, dead);
    }
    assert!((10..=20).contains(&retried), "{retried} retries");
    let metrics = carousel.metrics_text().await;
    let active = metric(
        &metrics,
        "carousel_udp_flows_active",
        &[("port", "dns"), ("pod", &dead_name)],
    );
    assert_eq!(active, Some(0.0), "no flow stays on the dead pod");
    carousel.stop().await;
}

/// Descriptors open in this process.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn flows_past_the_cap_are_dropped_counted_and_all_expire_on_time() {
    let net = 5;
    let pods = dns_pods(net).await;
    let udp = UdpConfig {
        idle_timeout: Duration::from_secs(3),
        max_flows: 2_000,
    };
    let carousel = start(
        &dns_state(net, &pods, json!({}), json!({}), |_| json!({})),
        udp,
    )
    .await;
    let baseline = open_descriptors();
    // 50 000 flows from distinct source ports: a socket each, closed once its query is
    // out, in bursts of 100 that carousel (on this test's thread) reads between; all
    // sent well within the idle timeout.
    let one = dns_query(1);
    for burst in 0..500 {
        for _ in 0..100 {
            let socket = std::net::UdpSocket::bind((ip(net, 100), 0)).unwrap();
            socket.send_to(&one, service(net)).unwrap();
        }
        if burst % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    eventually("the cap's worth of flows, and the rest dropped", || async {
        let metrics = carousel.metrics_text().await;
        let opened = total(&metrics, "carousel_udp_flows_total", &[]);
        let active = total(&metrics, "carousel_udp_flows_active", &[]);
        let dropped = total(
            &metrics,
            "carousel_udp_dropped_total",
            &[("reason", "flow_limit")],
        );
        assert!(
            opened <= 2_000.0 && active <= 2_000.0,
            "{opened} opened, {active} active"
        );
        opened == 2_000.0 && dropped > 0.0
    })
    .await;
    assert!(open_descriptors() >= baseline + 2_000, "a socket per flow");
    // Idle for 3 s, every flow ends, and its socket with it.
    eventually("every flow expires", || async {
        let metrics = carousel.metrics_text().await;
        total(&metrics, "carousel_udp_flows_active", &[]) == 0.0
    })
    .await;
    eventually("descriptors are back to the baseline", || async {
        open_descriptors() <= baseline
    })
    .await;
    // And new flows are served again.
    let a = query(ip(net, 101), service(net)).await.expect("an answer");
    assert!(pods.iter().any(|p| p.ip == a));
    carousel.stop().await;
}

/// A UDP echo pod: sends every datagram back as it came.
async fn echo_pod(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let socket = UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let _ = socket.send_to(&buf[..len], from).await;
        }
    })
}

/// The state file of Service `echo`, UDP port 7 at `ip(net, 1)`, to `pods` (port 7000),
/// with `sessionAffinity`.
fn echo_state(net: u8, pods: &[SocketAddr], affinity: &str) -> String {
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "test"},
        "spec": {"clusterIP": ip(net, 1).to_string(), "sessionAffinity": affinity,
                 "ports": [{"name": "echo", "port": 7, "targetPort": 7000, "protocol": "UDP"}]},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "echo-1", "namespace": "test",
                     "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "ports": [{"name": "echo", "port": 7000, "protocol": "UDP"}],
        "endpoints": pods.iter().map(|p| json!({
            "addresses": [p.ip().to_string()], "conditions": {"ready": true},
        })).collect::<Vec<_>>(),
    });
    format!("---\n{service}\n---\n{slice}\n")
}

#[tokio::test]
async fn empty_and_largest_datagrams_go_through_whole() {
    let net = 6;
    let pod = SocketAddr::new(ip(net, 10), 7000);
    let echo = echo_pod(pod).await;
    let state = echo_state(net, &[pod], "None");
    let carousel = start(&state, UdpConfig::default()).await;
    let socket = UdpSocket::bind((ip(net, 100), 0)).await.unwrap();
    socket.connect((ip(net, 1), 7)).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    // The largest payload IPv4 carries: 65 535 less the IP and UDP headers.
    for size in [0usize, 1, 1_500, 65_507] {
        let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        socket.send(&sent).await.unwrap();
        let len = tokio::time::timeout(ANSWER, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no echo of {size} bytes"))
            .unwrap();
        assert_eq!(len, size);
        assert!(buf[..len] == sent[..], "{size} bytes changed");
    }
    carousel.stop().await;
    echo.abort();
}

/// What makes a pod of `flooding_pod` flood.
const FLOOD: &[u8] = b"flood";

/// A UDP pod on `addr`, in a thread of its own so its flood does not wait on the test's
/// runtime: it echoes every datagram, except `FLOOD`, which it answers with `replies`
/// datagrams of 1 KiB as fast as its socket takes them. It stops once `stop` is set.
fn flooding_pod(
    addr: SocketAddr,
    replies: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let socket = std::net::UdpSocket::bind(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if &buf[..len] == FLOOD {
                let chunk = [0x5a; 1024];
                for _ in 0..replies {
                    let _ = socket.send_to(&chunk, from);
                }
            } else {
                let _ = socket.send_to(&buf[..len], from);
            }
        }
    })
}

/// This process's resident memory, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Sums the samples of `name` whose labels include `labels`.
fn total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One client floods a Service and never reads, and makes a pod flood it back: carousel
/// queues nothing (its memory stays where it was), and other clients of the same
/// Service, and of cluster DNS beside it, keep their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_and_a_pod_that_floods_leave_other_flows_served() {
    let (net, dns_net) = (7, 8);
    let dns = DnsPod::start("dns-solo", ip(dns_net, 10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let pods = [ip(net, 10), ip(net, 11)].map(|a| SocketAddr::new(a, 7000));
    let threads = pods.map(|p| flooding_pod(p, 20_000, stop.clone()));
    let dns_pods = std::slice::from_ref(&dns);
    let state = echo_state(net, &pods, "ClientIP")
        + &dns_state(dns_net, dns_pods, json!({}), json!({}), |_| json!({}));
    let carousel = start(&state, UdpConfig::default()).await;
    let (echo_service, dns_service) = (SocketAddr::new(ip(net, 1), 7), service(dns_net));
    // Warm up: both Services answer, and carousel's memory is measured after.
    query(ip(net, 100), dns_service).await.expect("DNS answers");
    let before = resident();

    // The flooder: one socket (one flow) that sends datagrams of 1 KiB until the other
    // clients are done (30 s at most), asks its pod for a flood with every
    // ten-thousandth, and never reads.
    let done = Arc::new(AtomicBool::new(false));
    let flooding = done.clone();
    let flooder = std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind((ip(net, 200), 0)).unwrap();
        socket.connect(echo_service).unwrap();
        let chunk = [0xa5; 1024];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for n in 0u64.. {
            if flooding.load(Ordering::Relaxed) {
                return true;
            }
            if n % 10_000 == 0 && std::time::Instant::now() > deadline {
                return false;
            }
            let _ = socket.send(if n % 10_000 == 0 { FLOOD } else { &chunk });
        }
        unreachable!("the loop returns")
    });
    // Meanwhile, other clients: echoes on the same Service (ClientIP affinity keeps them
    // on the pod the flooder's address did not get) and DNS queries beside it,
    // each from a port of its own, each with a resolver's retries (three, 1 s apart).
    let mut answered = 0;
    for i in 0..50u16 {
        let echo = client(ip(net, 101), echo_service).await.unwrap();
        let resolver = client(ip(net, 102), dns_service).await.unwrap();
        let mut buf = [0u8; 64];
        let mut echoed = false;
        for _ in 0..3 {
            echo.send(&i.to_be_bytes()).await.unwrap();
            let wait = Duration::from_secs(1);
            if let Ok(Ok(len)) = tokio::time::timeout(wait, echo.recv(&mut buf)).await {
                echoed = buf[..len] == i.to_be_bytes();
                break;
            }
        }
        assert!(echoed, "echo {i} during the flood");
        let mut dns_answer = None;
        for _ in 0..3 {
            if let Ok(a) = ask_on(&resolver, Duration::from_secs(1)).await {
                dns_answer = Some(a);
                break;
            }
        }
        assert_eq!(dns_answer, Some(dns.ip), "DNS query {i} during the flood");
        answered += 1;
    }
    done.store(true, Ordering::Relaxed);
    assert!(
        flooder.join().unwrap(),
        "the flood lasted as long as the other clients"
    );
    assert_eq!(answered, 50);

    // The floods went through carousel, both ways (as much as the kernel's socket
    // buffers let through; on a loaded machine that can be little), and it kept none.
    let metrics = carousel.metrics_text().await;
    let to_client = total(
        &metrics,
        "carousel_udp_datagrams_total",
        &[("service", "echo"), ("direction", "to_client")],
    );
    let to_endpoint = total(
        &metrics,
        "carousel_udp_datagrams_total",
        &[("service", "echo"), ("direction", "to_endpoint")],
    );
    assert!(
        to_client > 1_000.0 && to_endpoint > 100.0,
        "{to_client} to the client, {to_endpoint} to the pods"
    );
    let grown = resident().saturating_sub(before);
    assert!(
        grown < 32 << 20,
        "resident memory grew {grown} bytes through the flood"
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    carousel.stop().await;
}

/// IPv6 in bind mode: a Service on ::1 port 53 over UDP, four dnsmasq pods on ::1 at
/// ports of their own (an EndpointSlice each, as during a targetPort change), each
/// answering with an IPv4 address that names it: 400 queries, 100 each.
#[tokio::test]
async fn an_ipv6_service_spreads_four_hundred_queries_a_hundred_each() {
    let local = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let mut pods = Vec::new();
    for i in 0..4u8 {
        let addr = SocketAddr::new(local, 5361 + u16::from(i));
        pods.push(DnsPod::start_at(&format!("dns6-{i}"), addr, ip(9, 10 + i)).await);
    }
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dns6", "namespace": "test"},
        "spec": {"clusterIP": "::1", "ipFamilies": ["IPv6"],
                 "ports": [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]},
    });
    let mut state = format!("---\n{service}\n");
    for p in &pods {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": p.name, "namespace": "test",
                         "labels": {"kubernetes.io/service-name": "dns6"}},
            "addressType": "IPv6",
            "ports": [{"name": "dns", "port": p.addr.port(), "protocol": "UDP"}],
            "endpoints": [{"addresses": ["::1"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": p.name, "namespace": "test"}}],
        });
        state += &format!("---\n{slice}\n");
    }
    let carousel = start(&state, UdpConfig::default()).await;
    let answers = queries(400, local, SocketAddr::new(local, 53)).await;
    assert_eq!(
        by_pod(&pods, &answers).into_values().collect::<Vec<_>>(),
        [100; 4]
    );
    carousel.stop().await;
}
