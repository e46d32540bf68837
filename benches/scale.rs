//! carousel at cluster scale: the release binary in nftables mode, in a network namespace
//! of its own, fed S Services × E endpoints by the fake API server through kube's real
//! client (and, for comparison, by a state file holding the same objects). It prints,
//! per size and source: time to the first ready `/healthz`, resident memory, idle CPU,
//! the size and scrape time of `/metrics`, how long new connections take to follow one
//! EndpointSlice change (p50/p99 over 100 changes), resident memory after churn (pods
//! replaced in slices, Services created and deleted), the latency of new connections
//! idle and during the churn, and the time from SIGTERM to exit.
//!
//! A measurement, not a test: it asserts nothing about time. Needs root (namespaces,
//! nftables) and `cargo build --release` first.
//!
//!   cargo bench --bench scale                 # 5000x50 and 10000x50, API and file
//!   SCALE=5000x50 SOURCES=api cargo bench --bench scale
//!
//! SCALE_CHURN=N changes the number of churn events, SCALE_LOG=path keeps carousel's log
//! (RUST_LOG sets its level), SCALE_WRAP="heaptrack -o /tmp/ht" runs carousel under a
//! profiler.

#[path = "../tests/common/fake_apiserver.rs"]
#[allow(dead_code)] // the bench uses part of the tests' server
mod fake_apiserver;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, Kind};
use serde_json::{json, Value};

const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/carousel");
/// Churn events per run: slice rewrites with new pods, and Services created and deleted.
const CHURN: usize = 100_000;
/// SCALE_CHURN overrides the number of churn events.
fn churn_events() -> usize {
    std::env::var("SCALE_CHURN").map_or(CHURN, |n| n.parse().expect("SCALE_CHURN is a count"))
}

/// The churn runs in this many rounds, with memory read after each.
const CHURN_ROUNDS: usize = 4;
/// Changes timed for the "new connections follow" figure.
const FOLLOW_CHANGES: usize = 100;
const METRICS: &str = "127.0.0.1:10249";
const HEALTH: &str = "127.0.0.1:10256";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`: nothing criterion-like to list
    }
    let sizes = std::env::var("SCALE").unwrap_or_else(|_| "5000x50,10000x50".into());
    let sources = std::env::var("SOURCES").unwrap_or_else(|_| "api,file".into());
    assert!(
        std::path::Path::new(BIN).exists(),
        "build the release binary first: cargo build --release"
    );
    for size in sizes.split(',') {
        let (s, e) = size.split_once('x').expect("SCALE is SxE,...");
        let (services, endpoints) = (s.parse().unwrap(), e.parse().unwrap());
        for source in sources.split(',') {
            let report = measure(services, endpoints, source == "file");
            println!("{size} from {source}:\n{report}");
        }
    }
}

/// A network namespace, removed on drop with whatever carousel left in it.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("carousel-scale-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        // Like a node, the namespace routes the Service range somewhere, so that its own
        // connections get as far as the output hook, which hands them to carousel.
        run(
            "ip",
            &[
                "-n", &name, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ],
        );
        run(
            "ip",
            &["-n", &name, "addr", "add", "10.255.255.1/30", "dev", "v0"],
        );
        run("ip", &["-n", &name, "link", "set", "v0", "up"]);
        run("ip", &["-n", &name, "link", "set", "v1", "up"]);
        run(
            "ip",
            &["-n", &name, "route", "add", "10.0.0.0/8", "dev", "v0"],
        );
        Netns(name)
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = std::fs::File::open(&path).expect("the namespace");
                    // SAFETY: setns(2) on a descriptor open for the whole call; it moves
                    // only this short-lived thread into the namespace.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the thread in the namespace")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.0, BIN, "cleanup"])
            .stdout(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 50)},
        "spec": {"clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// The slice of Service `i`, its pods numbered from `generation * endpoints`.
fn slice(i: usize, endpoints: usize, generation: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            let n = (i * endpoints + e + generation * 7919) % (1 << 22);
            json!({"addresses": [format!("10.{}.{}.{}", 128 + (n >> 16), (n >> 8) & 255, n & 255)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", e % 100),
                   "targetRef": {"kind": "Pod", "namespace": format!("ns-{}", i % 50),
                                 "name": format!("svc-{i}-{generation}-{e}")}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-a"), "namespace": format!("ns-{}", i % 50),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

/// The Service whose slice the "follow" figure changes, and its slice naming one pod.
fn follow_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "follow", "namespace": "bench"},
        "spec": {"clusterIP": "10.95.0.1", "ports": [{"name": "web", "port": 80, "targetPort": 9000}]},
    })
}

fn follow_slice(pod: usize) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "follow-1", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "follow"}},
        "addressType": "IPv4",
        "ports": [{"name": "web", "port": 9000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [format!("127.0.0.{}", 10 + pod)],
                       "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("pod-{pod}")}}],
    })
}

/// A pod inside the namespace: answers every connection with its name.
fn start_pod(ns: &Netns, pod: usize) {
    let listener = ns
        .enter(|| TcpListener::bind(format!("127.0.0.{}:9000", 10 + pod)))
        .expect("pod listener");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(format!("pod-{pod}\n").as_bytes());
        }
    });
}

/// One connection to the follow Service from inside the namespace: the pod that
/// answered, and the time from connect to its answer (timed inside the namespace,
/// without the thread hop into it).
fn ask_timed(ns: &Netns) -> Option<(String, Duration)> {
    ns.enter(|| {
        let at = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&"10.95.0.1:80".parse().unwrap(), Duration::from_secs(1))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        (!out.is_empty()).then(|| (out.trim().to_string(), at.elapsed()))
    })
}

fn ask(ns: &Netns) -> Option<String> {
    ask_timed(ns).map(|(pod, _)| pod)
}

/// p50 and p99 of `times`, or "-".
fn p50_p99(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "-".into();
    }
    times.sort();
    format!(
        "p50 {:.2} ms, p99 {:.2} ms",
        percentile(times, 0.5).as_secs_f64() * 1e3,
        percentile(times, 0.99).as_secs_f64() * 1e3
    )
}

/// `GET path` on `addr` inside the namespace: status line and body.
fn get(ns: &Netns, addr: &str, path: &str) -> Option<(String, Vec<u8>)> {
    ns.enter(|| {
        let mut s =
            TcpStream::connect_timeout(&addr.parse::<SocketAddr>().ok()?, Duration::from_secs(1))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
        let status = String::from_utf8_lossy(&out[..end])
            .lines()
            .next()?
            .to_string();
        Some((status, out[end + 4..].to_vec()))
    })
}

/// Resident memory (kB) and CPU ticks (user + system) of `pid`.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    (rss, ticks)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn measure(services: usize, endpoints: usize, from_file: bool) -> String {
    let ns = Netns::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let api = FakeApiServer::start_on_std(ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    let mut objects = Vec::with_capacity(2 * services + 2);
    for i in 0..services {
        objects.push(service(i));
        objects.push(slice(i, endpoints, 0));
    }
    objects.push(follow_service());
    objects.push(follow_slice(0));
    for pod in 0..2 {
        start_pod(&ns, pod);
    }
    let mut args = vec![
        "run",
        "--proxy-mode",
        "nftables",
        "--metrics-bind-address",
        METRICS,
        "--healthz-bind-address",
        HEALTH,
    ];
    let state_arg = state.display().to_string();
    let kubeconfig = api.kubeconfig().display().to_string();
    if from_file {
        // JSON documents are YAML documents.
        let text: Vec<String> = objects.iter().map(Value::to_string).collect();
        std::fs::write(&state, text.join("\n---\n")).unwrap();
        args.extend(["--from-file", &state_arg]);
    } else {
        for object in &objects {
            api.apply(object.clone());
        }
        args.extend(["--kubeconfig", &kubeconfig]);
    }
    drop(objects);
    // What the server itself takes to answer carousel's two lists, one after the other:
    // part of "ready", and not carousel's to cut.
    let listed = Instant::now();
    let api_addr = api.addr.to_string();
    let mut list_bytes = 0;
    if !from_file {
        for path in [
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ] {
            list_bytes += get(&ns, &api_addr, path).map_or(0, |(_, body)| body.len());
        }
    }
    let listed = listed.elapsed();
    eprintln!(
        "  the server lists {:.1} MB in {:.2} s",
        list_bytes as f64 / 1e6,
        listed.as_secs_f64()
    );
    // SCALE_LOG=path keeps carousel's log, at RUST_LOG's level (warn unless set).
    let log_path = std::env::var("SCALE_LOG")
        .unwrap_or_else(|_| dir.path().join("carousel.log").display().to_string());
    let log = std::fs::File::create(log_path).unwrap();
    let started = Instant::now();
    // SCALE_WRAP="heaptrack -o /tmp/ht" runs carousel under a profiler (the figures
    // are then the wrapper's).
    let wrap = std::env::var("SCALE_WRAP").unwrap_or_default();
    let mut child: Child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .args(wrap.split_whitespace())
        .arg(BIN)
        .args(&args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    // Bounded: two minutes.
    eprintln!("  started carousel ({} objects applied)", 2 * services + 2);
    let ready = loop {
        if get(&ns, HEALTH, "/healthz").is_some_and(|(s, _)| s.contains(" 200 ")) {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("  ready after {:.2} s", ready.as_secs_f64());
    // `ip netns exec` execs carousel, so the child's pid is carousel's.
    std::thread::sleep(Duration::from_secs(15));
    let (rss_settled, t0) = usage(pid);
    std::thread::sleep(Duration::from_secs(10));
    let (_, t1) = usage(pid);
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let idle_cpu = (t1 - t0) as f64 / ticks_per_second / 10.0 * 100.0;
    let scrape = Instant::now();
    let metrics = get(&ns, METRICS, "/metrics").map_or(0, |(_, body)| body.len());
    let scrape = scrape.elapsed();

    eprintln!("  ready, settled, scraped");
    let mut follow = Vec::new();
    let (_, follow_ticks) = usage(pid);
    let follow_started = Instant::now();
    if !from_file {
        for change in 1..=FOLLOW_CHANGES {
            std::thread::sleep(Duration::from_millis(250));
            let pod = change % 2;
            let at = Instant::now();
            api.apply(follow_slice(pod));
            // Bounded: 5 000 asks.
            for _ in 0..5_000 {
                if ask(&ns).as_deref() == Some(format!("pod-{pod}").as_str()) {
                    break;
                }
            }
            follow.push(at.elapsed());
        }
        follow.sort();
    }
    // carousel's CPU per change: its CPU over the changes, less what it spends idle
    // over as long, shared out (it includes the connections that watch for the change).
    let follow_cpu = {
        let (_, ticks) = usage(pid);
        let busy = (ticks - follow_ticks) as f64 / ticks_per_second;
        let idle =
            (t1 - t0) as f64 / ticks_per_second / 10.0 * follow_started.elapsed().as_secs_f64();
        (busy - idle).max(0.0) / follow.len().max(1) as f64
    };

    eprintln!("  followed {} changes", follow.len());
    // New connections while nothing changes, and then while the cluster churns.
    let mut idle_asks: Vec<Duration> = (0..200)
        .filter_map(|_| ask_timed(&ns).map(|(_, t)| t))
        .collect();
    let mut churn_asks: Vec<Duration> = Vec::new();
    let mut failed_asks = 0;
    let churn = if from_file {
        String::from("-")
    } else {
        // Pods replaced in slices, and Services created and deleted, in turn, in four
        // rounds: memory read after each, settled, shows whether it grows with the
        // events or stays at one level.
        let events = churn_events();
        let mut after_rounds = Vec::new();
        for n in 0..events {
            if n % 10 == 9 {
                let i = services + n;
                if (n / 10) % 2 == 0 {
                    api.apply(service(i));
                } else {
                    api.delete(
                        Kind::Service,
                        &format!("ns-{}", (i - 10) % 50),
                        &format!("svc-{}", i - 10),
                    );
                }
            } else {
                api.apply(slice(n % services, endpoints, 1 + n / services));
            }
            if n % 500 == 0 {
                match ask_timed(&ns) {
                    Some((_, t)) => churn_asks.push(t),
                    None => failed_asks += 1,
                }
            }
            if (n + 1) % (events / CHURN_ROUNDS).max(1) == 0 && after_rounds.len() < CHURN_ROUNDS {
                // Settling: the watch catches up, freed memory goes back.
                std::thread::sleep(Duration::from_secs(10));
                let (rss, _) = usage(pid);
                eprintln!("  churn {}: {} MB", n + 1, rss / 1024);
                after_rounds.push((rss / 1024).to_string());
            }
        }
        std::thread::sleep(Duration::from_secs(50));
        let (rss_60, _) = usage(pid);
        format!(
            "{} MB after each quarter (10 s settled), {} MB 60 s after",
            after_rounds.join(" / "),
            rss_60 / 1024
        )
    };

    let stop = Instant::now();
    run("kill", &["-TERM", &pid.to_string()]);
    // Bounded: 60 s.
    let exit = loop {
        if child.try_wait().unwrap().is_some() {
            break stop.elapsed();
        }
        if stop.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break stop.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let follow = match follow.is_empty() {
        true => "-".to_string(),
        false => format!(
            "p50 {:.1} ms, p99 {:.1} ms; carousel CPU {:.2} ms a change",
            percentile(&follow, 0.5).as_secs_f64() * 1e3,
            percentile(&follow, 0.99).as_secs_f64() * 1e3,
            follow_cpu * 1e3
        ),
    };
    format!(
        "  ready after       {:.2} s\n  resident memory   {} MB (settled)\n  idle CPU          {idle_cpu:.2} % of a core\n  /metrics          {:.2} MB in {:.0} ms\n  follow a change   {follow}\n  after {} churn events  {churn}\n  new connections   idle {}; during churn {} ({failed_asks} failed)\n  SIGTERM to exit   {:.0} ms\n",
        ready.as_secs_f64(),
        rss_settled / 1024,
        metrics as f64 / 1e6,
        scrape.as_secs_f64() * 1e3,
        churn_events(),
        p50_p99(&mut idle_asks),
        p50_p99(&mut churn_asks),
        exit.as_secs_f64() * 1e3
    )
}
