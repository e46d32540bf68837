//! UDP side by side: DNS-sized queries (40 bytes, answered with 100) through carousel
//! (bind mode, the release binary), through nginx stream's UDP proxy (Debian's
//! nginx-light with libnginx-mod-stream, one worker, `proxy_responses 1` as its DNS
//! guide says), and straight to the pods, in one run.
//!
//! Two loads, each 64 queries in flight (closed loop, one client task each):
//! - **steady**: 64 client sockets, each a flow that asks again and again;
//! - **fresh**: every query from a socket of its own on an address of its own, as stub
//!   resolvers in many pods ask: every query is a new flow, so this is the cost of a
//!   flow's setup and end.
//!
//! Per contestant and load: queries answered per second, latency p50/p99, queries lost
//! (no answer in 500 ms), the proxy's CPU per query (utime + stime of its processes, from
//! /proc) and its peak resident memory. Each number is the median over rounds; the
//! ratios are medians of same-round ratios, so the machine's drift cancels. The proxy
//! runs on CPU 1, the pods and the load on CPU 0 (as `../shared/peerbench` does for
//! TCP), so each side has a core.
//!
//! A measurement, not a test: it asserts nothing about time. Needs `cargo build
//! --release` first, and nginx for its column (skipped, and said so, without it).
//!
//!   cargo bench --bench udp_peers             # 3 rounds of 3 s per load
//!   UDP_ROUNDS=5 UDP_SECONDS=5 cargo bench --bench udp_peers
//!   UDP_CONTESTANTS=direct,carousel UDP_LOADS=fresh cargo bench --bench udp_peers

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::UdpSocket;

const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/carousel");
const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// The pods: three answering threads on these addresses.
const PODS: [&str; 3] = ["127.0.1.1:5353", "127.0.1.2:5353", "127.0.1.3:5353"];
const CAROUSEL: &str = "127.0.2.1:53";
const NGINX: &str = "127.0.2.2:53";
const IN_FLIGHT: usize = 64;
const LOADS: [&str; 2] = ["steady", "fresh"];
const QUERY: usize = 40;
const ANSWER: usize = 100;
/// A query without an answer in this long is lost.
const LOST_AFTER: Duration = Duration::from_millis(500);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`: nothing criterion-like to list
    }
    let rounds = env_or("UDP_ROUNDS", 3);
    let seconds = Duration::from_secs(env_or("UDP_SECONDS", 3));
    assert!(
        Path::new(BIN).exists(),
        "build the release binary first: cargo build --release"
    );
    // The load and the pods on CPU 0, every thread of this process; the proxies on 1.
    pin(&format!("{}", std::process::id()), "0", true);
    let stop = Arc::new(AtomicBool::new(false));
    let pods: Vec<_> = PODS
        .iter()
        .map(|p| answering_pod(p, stop.clone()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut contestants = vec!["direct", "carousel"];
    if Path::new(NGINX_STREAM).exists() {
        contestants.push("nginx-stream");
    } else {
        println!("nginx-stream skipped: apt-get install nginx-light libnginx-mod-stream");
    }
    if let Ok(only) = std::env::var("UDP_CONTESTANTS") {
        contestants.retain(|c| only.split(',').any(|o| o == *c));
    }
    let loads: Vec<&'static str> = match std::env::var("UDP_LOADS") {
        Ok(only) => LOADS
            .into_iter()
            .filter(|l| only.split(',').any(|o| o == *l))
            .collect(),
        Err(_) => LOADS.to_vec(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut results: BTreeMap<(&str, &str), Vec<Outcome>> = BTreeMap::new();
    for round in 0..rounds {
        for &load in &loads {
            // The order turns from one round to the next.
            let mut order = contestants.clone();
            order.rotate_left(round as usize % contestants.len());
            for name in order {
                let proxy = Proxy::start(name, load, dir.path());
                let outcome = runtime.block_on(drive(load, proxy.target(), seconds, &proxy));
                results.entry((name, load)).or_default().push(outcome);
                drop(proxy);
            }
        }
    }
    print!(
        "{}",
        report(&contestants, &loads, &results, rounds, seconds)
    );
    stop.store(true, Ordering::Relaxed);
    for pod in pods {
        pod.join().unwrap();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect("a whole number"))
}

/// `taskset` for `pid` (with `all`, every thread of it) onto `cpus`.
fn pin(pid: &str, cpus: &str, all: bool) {
    let mut args = vec!["-pc", cpus, pid];
    if all {
        args.insert(0, "-a");
    }
    let status = Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux) runs");
    assert!(status.success(), "taskset {cpus} {pid}");
}

/// A pod: answers each query with `ANSWER` bytes that start with the query's first two
/// (its id), until `stop`.
fn answering_pod(addr: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let socket = StdUdpSocket::bind(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let (mut query, mut answer) = ([0u8; 512], [0x61u8; ANSWER]);
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, from)) = socket.recv_from(&mut query) {
                if len >= 2 {
                    answer[..2].copy_from_slice(&query[..2]);
                    let _ = socket.send_to(&answer, from);
                }
            }
        }
    })
}

/// A contestant, running on CPU 1 until dropped (none for `direct`).
struct Proxy {
    name: &'static str,
    child: Option<Child>,
}

impl Proxy {
    fn start(name: &'static str, load: &str, dir: &Path) -> Proxy {
        let mut command = match name {
            "direct" => return Proxy { name, child: None },
            "carousel" => carousel(dir, load),
            "nginx-stream" => nginx(dir),
            other => unreachable!("no contestant {other}"),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let proxy = Proxy {
            name,
            child: Some(child),
        };
        proxy.wait_answering();
        proxy
    }

    /// Where queries go: the proxy, or for `direct` the pods in turn.
    fn target(&self) -> Target {
        match self.name {
            "direct" => Target::Pods(PODS.map(|p| p.parse().unwrap()).to_vec()),
            "carousel" => Target::One(CAROUSEL.parse().unwrap()),
            _ => Target::One(NGINX.parse().unwrap()),
        }
    }

    fn wait_answering(&self) {
        let to = self.target().nth(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let _ = socket.send_to(&[0; QUERY], to);
            if socket.recv(&mut [0; 512]).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "{} does not answer", self.name);
        }
    }

    /// CPU time (utime + stime) of the proxy's processes: it and its children.
    fn cpu(&self) -> Duration {
        self.tree().iter().map(|&pid| stat(pid).0).sum()
    }

    /// Resident memory of the proxy's processes, peak of each (VmHWM), summed.
    fn peak_rss(&self) -> u64 {
        self.tree().iter().map(|&pid| peak_rss(pid)).sum()
    }

    fn tree(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let root = child.id();
        let mut pids = vec![root];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid != root && stat(pid).1 == Some(root) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// carousel in bind mode from a state file: one UDP Service port over the three pods.
/// For the fresh load, flows end 500 ms after their answer (`--udp-idle-timeout`): at
/// tens of thousands of new flows a second, 30 s would hold more flows than the cap, and
/// more sockets than the node has ephemeral ports; nginx ends its sessions at the answer.
fn carousel(dir: &Path, load: &str) -> Command {
    let (ip, port) = CAROUSEL.split_once(':').unwrap();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dns", "namespace": "bench"},
        "spec": {"clusterIP": ip, "ports": [{"name": "dns", "port": port.parse::<u16>().unwrap(),
                 "targetPort": 5353, "protocol": "UDP"}]},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "dns-1", "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": PODS.iter().map(|p| json!({
            "addresses": [p.split_once(':').unwrap().0], "conditions": {"ready": true},
        })).collect::<Vec<_>>(),
    });
    let state = dir.join("state.yaml");
    std::fs::write(&state, format!("---\n{service}\n---\n{slice}\n")).unwrap();
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1", BIN, "run", "--from-file"])
        .arg(&state)
        .args([
            "--metrics-bind-address",
            "127.0.2.9:10249",
            "--healthz-bind-address",
            "127.0.2.9:10256",
        ]);
    if load == "fresh" {
        command.args(["--udp-idle-timeout", "500ms"]);
    }
    command.env("RUST_LOG", "warn");
    command
}

/// nginx stream, one worker, the three pods as its upstream; a session ends at its
/// answer (`proxy_responses 1`), as nginx's guide sets it up for DNS.
fn nginx(dir: &Path) -> Command {
    let servers: String = PODS.iter().map(|p| format!("server {p};\n")).collect();
    let conf = format!(
        "load_module {NGINX_STREAM};\nworker_processes 1;\ndaemon off;\npid {pid};\n\
         error_log stderr error;\nevents {{ worker_connections 65536; }}\n\
         stream {{\n upstream pods {{\n{servers} }}\n server {{\n  listen {NGINX} udp;\n  \
         proxy_pass pods;\n  proxy_responses 1;\n  proxy_timeout 30s;\n }}\n}}\n",
        pid = dir.join("nginx.pid").display(),
    );
    let path: PathBuf = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1", "nginx", "-e", "stderr", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path);
    command
}

/// Where a load's queries go.
#[derive(Clone)]
enum Target {
    One(SocketAddr),
    /// `direct`: client `i` asks pod `i` modulo their number.
    Pods(Vec<SocketAddr>),
}

impl Target {
    fn nth(&self, i: usize) -> SocketAddr {
        match self {
            Target::One(a) => *a,
            Target::Pods(pods) => pods[i % pods.len()],
        }
    }
}

/// One contestant's numbers for one load.
#[derive(Clone, Debug)]
struct Outcome {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    lost: usize,
    cpu_per_query: Option<Duration>,
    peak_rss: Option<u64>,
}

/// Runs `load` against `target` for `seconds`, 64 queries in flight.
async fn drive(load: &str, target: Target, seconds: Duration, proxy: &Proxy) -> Outcome {
    let fresh = load == "fresh";
    let cpu_before = proxy.cpu();
    let start = Instant::now();
    let until = start + seconds;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let to = target.nth(i);
        clients.spawn(client(i as u8, to, fresh, until));
    }
    let (mut times, mut lost) = (Vec::new(), 0);
    while let Some(done) = clients.join_next().await {
        let (t, l) = done.unwrap();
        times.extend(t);
        lost += l;
    }
    let elapsed = start.elapsed();
    let cpu = proxy.cpu().saturating_sub(cpu_before);
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    let answered = times.len().max(1);
    Outcome {
        per_second: times.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        lost,
        cpu_per_query: proxy.child.as_ref().map(|_| cpu / answered as u32),
        peak_rss: proxy.child.as_ref().map(|_| proxy.peak_rss()),
    }
}

/// Client `n`: asks `to` until `until`, each query from the same socket or (`fresh`) a
/// new one on an address of its own (127.3.n.1 to 127.3.n.254 in turn), as clients in
/// many pods would: a new flow each. Returns the answered queries' times and the lost
/// count.
async fn client(n: u8, to: SocketAddr, fresh: bool, until: Instant) -> (Vec<Duration>, usize) {
    let (mut times, mut lost) = (Vec::new(), 0);
    let mut socket = None;
    let mut query = [0x71u8; QUERY];
    let mut answer = [0u8; 512];
    let mut id = 0u16;
    while Instant::now() < until {
        if fresh || socket.is_none() {
            let host = 1 + (id % 254) as u8;
            let s = UdpSocket::bind((Ipv4Addr::new(127, 3, n, host), 0))
                .await
                .unwrap();
            s.connect(to).await.unwrap();
            socket = Some(s);
        }
        let s = socket.as_ref().unwrap();
        id = id.wrapping_add(1);
        query[..2].copy_from_slice(&id.to_be_bytes());
        let sent = Instant::now();
        let _ = s.send(&query).await;
        let answered = async {
            loop {
                match s.recv(&mut answer).await {
                    Ok(n) if n == ANSWER && answer[..2] == id.to_be_bytes() => return,
                    _ => continue, // a late answer to a lost query, or an ICMP error
                }
            }
        };
        match tokio::time::timeout(LOST_AFTER, answered).await {
            Ok(()) => times.push(sent.elapsed()),
            Err(_) => lost += 1,
        }
    }
    (times, lost)
}

/// utime + stime of `pid`, and its parent.
fn stat(pid: u32) -> (Duration, Option<u32>) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (Duration::ZERO, None);
    };
    // The fields after the command, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // state is field 3 of stat, so index 0 here: ppid 1, utime 11, stime 12.
    let hz = 100; // USER_HZ on Linux
    let cpu = Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz);
    (cpu, fields.get(1).and_then(|p| p.parse().ok()))
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The table: a column per contestant, a block per load.
fn report(
    contestants: &[&'static str],
    loads: &[&'static str],
    results: &BTreeMap<(&'static str, &'static str), Vec<Outcome>>,
    rounds: u64,
    seconds: Duration,
) -> String {
    let mut out = format!(
        "UDP, {QUERY}-byte queries answered with {ANSWER} bytes, {IN_FLIGHT} in flight, \
         {rounds} rounds of {}s (medians)\n",
        seconds.as_secs()
    );
    out += &format!("{:<28}", "");
    for c in contestants {
        out += &format!("{c:>14}");
    }
    out.push('\n');
    for &load in loads {
        let of = |c: &'static str| &results[&(c, load)];
        type Row<'a> = (&'a str, Box<dyn Fn(&Outcome) -> Option<f64>>);
        let rows: [Row; 6] = [
            ("queries/s", Box::new(|o| Some(o.per_second))),
            ("p50 µs", Box::new(|o| Some(o.p50.as_secs_f64() * 1e6))),
            ("p99 µs", Box::new(|o| Some(o.p99.as_secs_f64() * 1e6))),
            ("lost", Box::new(|o| Some(o.lost as f64))),
            (
                "proxy CPU µs/query",
                Box::new(|o| o.cpu_per_query.map(|d| d.as_secs_f64() * 1e6)),
            ),
            (
                "proxy peak RSS MiB",
                Box::new(|o| o.peak_rss.map(|b| b as f64 / (1 << 20) as f64)),
            ),
        ];
        out += &format!(
            "{load} ({})\n",
            match load {
                "steady" => "64 flows, each asking again",
                _ => "every query a new flow, from its own address; carousel --udp-idle-timeout 500ms",
            }
        );
        for (name, value) in &rows {
            out += &format!("  {name:<26}");
            for c in contestants {
                let values: Vec<f64> = of(c).iter().filter_map(value).collect();
                out += &match values.is_empty() {
                    true => format!("{:>14}", "-"),
                    false => format!("{:>14.1}", median(values)),
                };
            }
            out.push('\n');
        }
        // Same-round ratios of the rate.
        for base in ["direct", "nginx-stream"] {
            if !contestants.contains(&base) {
                continue;
            }
            out += &format!("  {:<26}", format!("queries/s / {base}"));
            for c in contestants {
                let ratios: Vec<f64> = of(c)
                    .iter()
                    .zip(of(base))
                    .map(|(o, b)| o.per_second / b.per_second)
                    .collect();
                out += &format!("{:>14.2}", median(ratios));
            }
            out.push('\n');
        }
    }
    out
}
