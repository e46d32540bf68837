//! A node in network namespaces, for the end-to-end tests of nftables and bind mode: a
//! client namespace, a node namespace running the carousel binary, and pod namespaces
//! with backends on pod-like addresses (10.244.x.y), all removed on drop, pass or fail.
//! Included by the test binaries that use it (`#[path]`), beside `mod common`.
#![allow(dead_code)] // each test binary uses its own part of the lab

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::{dnsmasq, Ep};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_carousel");
pub const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/agent.py");
pub const POD_PORT: u16 = 8080;
pub const CLIENTS: usize = 8;

/// Namespaces, processes and files of one test; all removed on drop, pass or fail.
pub struct Lab {
    pub prefix: String,
    pub namespaces: Vec<String>,
    pub children: Vec<Child>,
    pub carousel: Option<Child>,
    /// Environment for carousel, beside the test's own.
    pub carousel_env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ip(args: &str) {
    run(Command::new("ip").args(args.split_whitespace()));
}

impl Lab {
    /// A node with a client, and one pod namespace per name, each pod serving its name
    /// on port 8080 at 10.244.i.2 and fd00:244:i::2.
    pub fn new(pods: &[&str]) -> Lab {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "cx{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            prefix,
            namespaces: Vec::new(),
            children: Vec::new(),
            carousel: None,
            carousel_env: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let node = lab.add_ns("node");
        // A Kubernetes node forwards, whatever the host this test runs on does (a new
        // namespace takes the host's IPv4 setting): without it, proxy ARP, which
        // Calico's address-less veths rely on, answers nobody.
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run(Command::new("ip").args(["netns", "exec", &node, "sysctl", "-qw", key]));
        }
        let client = lab.add_ns("client");
        ip(&format!(
            "-n {node} link add n0 type veth peer name c0 netns {client}"
        ));
        ip(&format!("-n {node} addr add 10.0.0.1/24 dev n0"));
        ip(&format!("-n {node} addr add fd00:c::1/64 dev n0 nodad"));
        ip(&format!("-n {node} link set n0 up"));
        // Like any node, this one routes the Service ranges somewhere, so that its own
        // processes can dial a ClusterIP before the output hook redirects the connection.
        ip(&format!("-n {node} route add 10.96.0.0/12 dev n0"));
        ip(&format!("-n {node} -6 route add fd00:96::/64 dev n0"));
        for i in 0..CLIENTS {
            ip(&format!("-n {client} addr add 10.0.0.{}/24 dev c0", i + 2));
        }
        ip(&format!("-n {client} addr add fd00:c::2/64 dev c0 nodad"));
        ip(&format!("-n {client} link set c0 up"));
        ip(&format!("-n {client} route add default via 10.0.0.1"));
        ip(&format!("-n {client} -6 route add default via fd00:c::1"));
        for (i, name) in pods.iter().enumerate() {
            let i = i + 1;
            let pod = lab.add_ns(&format!("pod{i}"));
            ip(&format!(
                "-n {node} link add p{i} type veth peer name eth0 netns {pod}"
            ));
            ip(&format!("-n {node} addr add 10.244.{i}.1/24 dev p{i}"));
            ip(&format!(
                "-n {node} addr add fd00:244:{i}::1/64 dev p{i} nodad"
            ));
            ip(&format!("-n {node} link set p{i} up"));
            ip(&format!("-n {pod} addr add 10.244.{i}.2/24 dev eth0"));
            ip(&format!(
                "-n {pod} addr add fd00:244:{i}::2/64 dev eth0 nodad"
            ));
            ip(&format!("-n {pod} link set eth0 up"));
            ip(&format!("-n {pod} route add default via 10.244.{i}.1"));
            ip(&format!(
                "-n {pod} -6 route add default via fd00:244:{i}::1"
            ));
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &pod,
                    "python3",
                    AGENT,
                    "serve",
                    name,
                    &POD_PORT.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "ready", "pod {name} did not start");
            lab.children.push(child);
        }
        lab
    }

    pub fn add_ns(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        ip(&format!("netns add {name}"));
        self.namespaces.push(name.clone());
        ip(&format!("-n {name} link set lo up"));
        name
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn in_ns(&self, role: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role), program]);
        cmd
    }

    /// The IPv4 and IPv6 endpoint of pod `i` (from 1).
    pub fn pod_v4(i: usize) -> SocketAddr {
        format!("10.244.{i}.2:{POD_PORT}").parse().unwrap()
    }
    pub fn pod_v6(i: usize) -> SocketAddr {
        format!("[fd00:244:{i}::2]:{POD_PORT}").parse().unwrap()
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.yaml")
    }

    pub fn write_state(&self, yaml: &str) {
        std::fs::write(self.state_path(), yaml).unwrap();
    }

    /// Starts carousel in the node namespace and waits until it reports healthy.
    pub fn start_carousel(&mut self) {
        self.start_carousel_with(&[]);
    }

    pub fn start_carousel_with(&mut self, extra: &[&str]) {
        let child = self.spawn_carousel("nftables", "carousel.log", extra);
        self.wait_healthy();
        self.carousel = Some(child);
    }

    /// A carousel in the node namespace in `mode`, its metrics on 10249 and health on
    /// 10256, its log in `log`.
    pub fn spawn_carousel(&self, mode: &str, log: &str, extra: &[&str]) -> Child {
        self.in_ns("node", BIN)
            .envs(self.carousel_env.iter().map(|(k, v)| (k, v)))
            .args(["run", "--proxy-mode", mode, "--from-file"])
            .arg(self.state_path())
            .args(extra)
            .args([
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--healthz-bind-address",
                "127.0.0.1:10256",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join(log)).unwrap())
            .spawn()
            .unwrap()
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self
            .get("http://127.0.0.1:10256/healthz")
            .starts_with("200")
        {
            assert!(
                Instant::now() < deadline,
                "carousel did not become healthy:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Polls `done` every 50 ms for up to `patience`; fails naming `what`, with the log.
    pub fn until(&self, what: &str, patience: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + patience;
        while !done() {
            assert!(Instant::now() < deadline, "{what}:\n{}", self.log());
            sleep(Duration::from_millis(50));
        }
    }

    pub fn log_named(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.log_named("carousel.log")
    }

    /// Sends a signal to carousel and waits for it to exit; returns whether it exited 0.
    pub fn signal_carousel(&mut self, signal: &str) -> bool {
        let mut child = self.carousel.take().expect("carousel runs");
        run(Command::new("kill").args([signal, &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "carousel did not exit after {signal}"
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// A GET from inside the node namespace: "STATUS\nBODY".
    pub fn get(&self, url: &str) -> String {
        let out = self
            .in_ns("node", "python3")
            .args([AGENT, "get", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `count` connections from namespace `role` to `host:port`, from `sources` in turn.
    pub fn ask(&self, role: &str, host: &str, port: u16, count: usize, sources: &[&str]) -> Value {
        self.ask_within("5", role, host, port, count, sources)
    }

    /// [`Lab::ask`] with an HTTP GET for each connection: the bodies, by source.
    pub fn ask_http(
        &self,
        role: &str,
        host: &str,
        port: u16,
        count: usize,
        sources: &[&str],
    ) -> Value {
        let out = run(self
            .in_ns(role, "python3")
            .args([AGENT, "http", host, &port.to_string(), &count.to_string()])
            .args(sources));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// [`Lab::ask`] with one second for each connection: for connections that get no
    /// answer at all.
    pub fn ask_briefly(
        &self,
        role: &str,
        host: &str,
        port: u16,
        count: usize,
        sources: &[&str],
    ) -> Value {
        self.ask_within("1", role, host, port, count, sources)
    }

    /// `count` connections, `seconds` for each.
    pub fn ask_within(
        &self,
        seconds: &str,
        role: &str,
        host: &str,
        port: u16,
        count: usize,
        sources: &[&str],
    ) -> Value {
        let out = run(self
            .in_ns(role, "python3")
            .env("AGENT_TIMEOUT", seconds)
            .args([AGENT, "ask", host, &port.to_string(), &count.to_string()])
            .args(sources));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Connections per pod over all sources; asserts that none failed.
    pub fn spread(&self, role: &str, host: &str, port: u16, count: usize) -> Vec<(String, u64)> {
        let answer = self.ask(role, host, port, count, &[]);
        assert_eq!(
            answer["errors"],
            0,
            "{answer}\ncarousel log:\n{}",
            self.log()
        );
        let mut pods: Vec<(String, u64)> = answer["seen"]["-"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect();
        pods.sort();
        pods
    }

    /// Waits until carousel's `set` holds `element`, as `nft list set` prints it.
    pub fn wait_for_element(&self, set: &str, element: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .nft(&format!("list set inet carousel {set}"))
            .contains(element)
        {
            assert!(
                Instant::now() < deadline,
                "{element} never reached set {set}:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    pub fn nft(&self, args: &str) -> String {
        let out = run(self.in_ns("node", "nft").args(args.split_whitespace()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ss ARGS` in the node, its output.
    pub fn node_ss(&self, args: &str) -> String {
        let out = run(self.in_ns("node", "ss").args(args.split_whitespace()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip ARGS` in the node, its output.
    pub fn node_ip(&self, args: &str) -> String {
        let out = run(self.in_ns("node", "ip").args(args.split_whitespace()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// dnsmasq in pod `i` (from 1) on port 5353 of its addresses, UDP and TCP,
    /// answering `who.test` with the pod's IPv4 address; stopped with the lab.
    pub fn start_dns(&mut self, i: usize) {
        let v4 = Lab::pod_v4(i).ip();
        let v6 = Lab::pod_v6(i).ip();
        let dnsmasq_in_pod = self.in_ns(&format!("pod{i}"), "dnsmasq");
        let child = dnsmasq(dnsmasq_in_pod, &[v4, v6], 5353, v4);
        self.children.push(child);
        let pod = format!("pod{i}");
        self.until(
            &format!("dnsmasq answers in {pod}"),
            Duration::from_secs(10),
            || self.dns_spread(&pod, &v4.to_string(), 5353, 1).1 == 0,
        );
    }

    /// `count` DNS queries over UDP from namespace `role` to `host:port`, each from a
    /// port of its own: the pods' addresses answered, counted, and the errors.
    pub fn dns_spread(
        &self,
        role: &str,
        host: &str,
        port: u16,
        count: usize,
    ) -> (Vec<(String, u64)>, u64) {
        let out = run(self.in_ns(role, "python3").env("AGENT_TIMEOUT", "2").args([
            AGENT,
            "dns",
            host,
            &port.to_string(),
            &count.to_string(),
        ]));
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut seen: Vec<(String, u64)> = answer["seen"]["-"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        seen.sort();
        (seen, answer["errors"].as_u64().unwrap())
    }

    /// More IPv6 addresses for the client namespace, each already known to the node's
    /// neighbour table, as the address of a host that has been on the network is: a
    /// first reply does not wait on neighbour discovery under a loaded machine.
    pub fn add_client_v6(&mut self, addrs: &[&str]) {
        let client = self.ns("client");
        for addr in addrs {
            ip(&format!("-n {client} addr add {addr}/64 dev c0 nodad"));
            // One datagram from the node makes it resolve the address.
            run(self.in_ns("node", "python3").args([
                "-c",
                "import socket,sys; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))",
                addr,
            ]));
            self.until(
                &format!("the node knows {addr}"),
                Duration::from_secs(10),
                || {
                    let neigh = self.node_ip(&format!("-6 neigh show {addr} dev n0"));
                    ["REACHABLE", "STALE", "DELAY"]
                        .iter()
                        .any(|s| neigh.contains(s))
                },
            );
        }
    }

    /// A client pod wired as Calico, Cilium and the AWS VPC CNI wire pods: a /32 (and a
    /// /128) on eth0 with the default route via 169.254.1.1 on-link (IPv6: via the host
    /// veth's link-local address); the host veth has no IPv4 address and answers ARP by
    /// proxy_arp, and the node routes the /32 to it.
    pub fn add_calico_client(&mut self, role: &str) {
        let node = self.ns("node");
        let pod = self.add_ns(role);
        let (v4, v6) = ("10.244.200.2", "fd00:244:200::2");
        let sysctl = |ns: &str, key: &str| {
            run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", key]));
        };
        ip(&format!(
            "-n {node} link add cali1 type veth peer name eth0 netns {pod}"
        ));
        ip(&format!(
            "-n {node} link set cali1 address ee:ee:ee:ee:ee:ee"
        ));
        sysctl(&node, "net.ipv4.conf.cali1.proxy_arp=1");
        sysctl(&node, "net.ipv6.conf.cali1.accept_dad=0");
        sysctl(&pod, "net.ipv6.conf.eth0.accept_dad=0");
        ip(&format!("-n {node} link set cali1 up"));
        ip(&format!("-n {node} route add {v4}/32 dev cali1"));
        ip(&format!("-n {node} -6 route add {v6}/128 dev cali1"));
        ip(&format!("-n {pod} addr add {v4}/32 dev eth0"));
        ip(&format!("-n {pod} addr add {v6}/128 dev eth0 nodad"));
        ip(&format!("-n {pod} link set eth0 up"));
        ip(&format!(
            "-n {pod} route add 169.254.1.1 dev eth0 scope link"
        ));
        ip(&format!(
            "-n {pod} route add default via 169.254.1.1 dev eth0"
        ));
        ip(&format!(
            "-n {pod} -6 route add default via fe80::ecee:eeff:feee:eeee dev eth0"
        ));
        let host_v4 = self.node_ip("-4 addr show dev cali1");
        assert!(
            !host_v4.contains("inet "),
            "an address-less host veth: {host_v4}"
        );
    }

    /// A client pod behind a bridge with an address, as flannel's cni0.
    pub fn add_bridge_client(&mut self, role: &str) {
        let node = self.ns("node");
        let pod = self.add_ns(role);
        ip(&format!("-n {node} link add cni0 type bridge"));
        ip(&format!("-n {node} addr add 10.244.201.1/24 dev cni0"));
        ip(&format!("-n {node} link set cni0 up"));
        ip(&format!(
            "-n {node} link add veth1 type veth peer name eth0 netns {pod}"
        ));
        ip(&format!("-n {node} link set veth1 master cni0"));
        ip(&format!("-n {node} link set veth1 up"));
        ip(&format!("-n {pod} addr add 10.244.201.2/24 dev eth0"));
        ip(&format!("-n {pod} link set eth0 up"));
        ip(&format!("-n {pod} route add default via 10.244.201.1"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in self.children.iter_mut().chain(self.carousel.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Removing a namespace removes its interfaces and its nftables tables with it.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn pods_named(names: &[&str], addr: impl Fn(usize) -> SocketAddr) -> Vec<Ep> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| Ep::ready(addr(i + 1), n))
        .collect()
}

/// Starts `agent.py ARGS` in namespace `role` and keeps it with the lab.
pub fn agent(lab: &mut Lab, role: &str, args: &[&str]) -> usize {
    let child = lab
        .in_ns(role, "python3")
        .arg(AGENT)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    lab.children.push(child);
    lab.children.len() - 1
}

/// The JSON that the agent `index` printed when it ended.
pub fn agent_result(lab: &mut Lab, index: usize) -> Value {
    let mut out = String::new();
    std::io::Read::read_to_string(lab.children[index].stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        lab.children[index].wait().unwrap().success(),
        "agent: {out}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("agent printed {out:?}: {e}"))
}

/// A cluster DNS Service as CoreDNS publishes itself, at `cluster_ip`: UDP 53 `dns` and
/// TCP 53 `dns-tcp`, both to port 5353 of the first `pods` pods (their IPv6 addresses
/// when `v6`).
pub fn dns_service(name: &str, cluster_ip: &str, pods: usize, v6: bool) -> String {
    dns_service_with(name, cluster_ip, pods, v6, serde_json::json!({}))
}

/// `dns_service` with `extra` merged into the Service's spec, but for `annotations`,
/// which go to its metadata, `"nodePort": true`, which puts node port 30053 on its UDP
/// port, and `"nodeName"`, which places every endpoint on that node.
pub fn dns_service_with(
    name: &str,
    cluster_ip: &str,
    pods: usize,
    v6: bool,
    extra: Value,
) -> String {
    let mut extra = extra;
    let node = extra.as_object_mut().and_then(|e| e.remove("nodeName"));
    let endpoints: Vec<Value> = (1..=pods)
        .map(|i| {
            let ip = if v6 { Lab::pod_v6(i).ip() } else { Lab::pod_v4(i).ip() };
            let mut endpoint = serde_json::json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("dns-{i}"), "namespace": "kube-system"},
            });
            if let Some(node) = &node {
                endpoint["nodeName"] = node.clone();
            }
            endpoint
        })
        .collect();
    let mut spec = serde_json::json!({"clusterIP": cluster_ip, "ports": [
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
    ]});
    let annotations = extra
        .as_object_mut()
        .and_then(|e| e.remove("annotations"))
        .unwrap_or_else(|| serde_json::json!({}));
    if extra.as_object_mut().and_then(|e| e.remove("nodePort")) == Some(Value::Bool(true)) {
        spec["type"] = "NodePort".into();
        spec["ports"][0]["nodePort"] = 30053.into();
    }
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let service = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "kube-system", "annotations": annotations},
        "spec": spec,
    });
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "kube-system",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"},
                  {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    format!("---\n{service}\n---\n{slice}\n")
}
