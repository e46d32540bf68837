//! The client's address reaches the pods: PROXY protocol headers read by real servers
//! (Debian's nginx for TCP), in network namespaces this test creates and removes, in
//! nftables mode (clients dial a ClusterIP from their own namespace) and in bind mode.
//! Needs root, `ip`, `nft` and `nginx` (CI installs them).

mod common;
#[path = "netns/lab.rs"]
mod lab;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{metric, state_yaml, Ep, Svc};
use lab::*;
use serde_json::Value;

/// nginx's PROXY-protocol port in every pod.
const NGINX_PORT: u16 = 8081;

/// Debian's nginx in pod `i` (from 1), on port 8081 of its IPv4 and IPv6 address with
/// `listen ... proxy_protocol`: each request is answered with the pod's name and the
/// client and Service addresses its PROXY header carried, and logged with them. Returns
/// the access log's path; nginx stops with the lab.
fn start_nginx(lab: &mut Lab, i: usize, name: &str) -> PathBuf {
    let dir = lab.dir.path().join(format!("nginx{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let v4 = Lab::pod_v4(i).ip();
    let v6 = Lab::pod_v6(i).ip();
    let conf = common::nginx_conf(
        &dir,
        "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port $remote_addr",
        &format!(
            r#"    server {{
        listen {v4}:{NGINX_PORT} proxy_protocol;
        listen [{v6}]:{NGINX_PORT} proxy_protocol;
        location / {{
            return 200 "{name} $proxy_protocol_addr $proxy_protocol_server_addr $proxy_protocol_server_port\n";
        }}
    }}"#
        ),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = lab
        .in_ns(&format!("pod{i}"), "nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian's nginx package)");
    lab.children.push(child);
    let pod = format!("pod{i}");
    lab.until(
        &format!("nginx listens in {pod}"),
        Duration::from_secs(10),
        || {
            let out = lab
                .in_ns(&pod, "ss")
                .args(["-ltnH", &format!("sport = :{NGINX_PORT}")])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count() == 2
        },
    );
    dir.join("access.log")
}

/// One line of nginx's access log: what the PROXY header said, and who connected.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Logged {
    client: String,
    service: String,
    service_port: String,
    /// The connection's own source: carousel, from the node.
    peer: String,
}

fn access_log(path: &PathBuf) -> Vec<Logged> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 5, "an access log line: {line:?}");
            Logged {
                client: f[0].into(),
                service: f[2].into(),
                service_port: f[3].into(),
                peer: f[4].into(),
            }
        })
        .collect()
}

/// A Service at `ip:80` over the nginx of every pod, sending `version` headers.
fn proxied(name: &str, ip: &str, version: &str, pods: &[&str], v6: bool) -> Svc {
    let endpoints = (1..=pods.len())
        .map(|i| {
            let ip = if v6 {
                Lab::pod_v6(i).ip()
            } else {
                Lab::pod_v4(i).ip()
            };
            Ep::ready((ip, NGINX_PORT).into(), pods[i - 1])
        })
        .collect();
    let mut svc = Svc::new(name, ip, 80, endpoints);
    svc.annotations
        .push(("carousel.dev/proxy-protocol".into(), version.into()));
    svc
}

/// Several clients, each from its own address, dial each Service; every answer and
/// every line nginx logged carries the client's own address and the Service address it
/// dialed, for v1 and v2, IPv4 and IPv6, and /metrics counts each header.
fn proxy_protocol_reaches_nginx(mode: &str) {
    let pods = ["pp-a", "pp-b"];
    let mut lab = Lab::new(&pods);
    let logs: Vec<PathBuf> = (1..=pods.len())
        .map(|i| start_nginx(&mut lab, i, pods[i - 1]))
        .collect();
    let node = lab.ns("node");
    lab.add_client_v6(&["fd00:c::3", "fd00:c::4"]);
    let services = [
        ("pp-v1", "10.96.0.60", "v1", false),
        ("pp-v2", "10.96.0.61", "v2", false),
        ("pp-v1-six", "fd00:96::60", "v1", true),
        ("pp-v2-six", "fd00:96::61", "v2", true),
    ];
    if mode == "bind" {
        // Bind mode listens on the Service addresses themselves: the node holds them.
        for (_, addr, _, _) in services {
            ip(&format!("-n {node} addr add {addr} dev lo"));
        }
    }
    let svcs: Vec<Svc> = services
        .iter()
        .map(|(name, addr, version, v6)| proxied(name, addr, version, &pods, *v6))
        .collect();
    lab.write_state(&state_yaml(&svcs));
    let child = lab.spawn_carousel(mode, "carousel.log", &[]);
    lab.carousel = Some(child);
    lab.wait_healthy();

    let v4_clients: Vec<String> = (2..=9).map(|i| format!("10.0.0.{i}")).collect();
    let v6_clients: Vec<String> = (2..=4).map(|i| format!("fd00:c::{i}")).collect();
    let per_client = 4;
    let mut asked = BTreeMap::new();
    for (_, addr, _, v6) in services {
        let sources = if v6 { &v6_clients } else { &v4_clients };
        let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
        let count = sources.len() * per_client;
        let answer: Value = lab.ask_http("client", addr, 80, count, &refs);
        assert_eq!(
            answer["errors"],
            0,
            "{mode}: {addr}: {answer}\n{}",
            lab.log()
        );
        for source in sources {
            let seen = answer["seen"][source.as_str()].as_object().unwrap();
            let mut by_pod = BTreeMap::new();
            for (body, n) in seen {
                let words: Vec<&str> = body.split(' ').collect();
                assert_eq!(
                    words[1..],
                    [source.as_str(), addr, "80"],
                    "{mode}: the pod's view of a client of {addr}: {body:?}"
                );
                by_pod.insert(words[0].to_string(), n.as_u64().unwrap());
            }
            assert_eq!(
                by_pod.values().sum::<u64>(),
                per_client as u64,
                "{mode}: {answer}"
            );
            *asked.entry((source.clone(), addr)).or_insert(0) += per_client;
        }
        // Both pods served: the header went to every endpoint, not to one.
        let pods_seen: std::collections::BTreeSet<String> = answer["seen"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|m| m.as_object().unwrap().keys())
            .map(|body| body.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(pods_seen.len(), pods.len(), "{mode}: {addr}: {answer}");
    }

    // nginx's own log: one line per request, each naming the client that made it and the
    // Service address it dialed; the connection itself came from the node.
    let mut logged = BTreeMap::new();
    for (i, log) in logs.iter().enumerate() {
        let node_side = [
            format!("10.244.{}.1", i + 1),
            format!("fd00:244:{}::1", i + 1),
        ];
        for line in access_log(log) {
            assert_eq!(line.service_port, "80", "{line:?}");
            assert!(
                node_side.contains(&line.peer),
                "{mode}: nginx's peer is the node: {line:?}"
            );
            let addr = services
                .iter()
                .map(|s| s.1)
                .find(|a| *a == line.service)
                .unwrap_or_else(|| panic!("{mode}: a logged Service address: {line:?}"));
            *logged.entry((line.client, addr)).or_insert(0) += 1;
        }
    }
    assert_eq!(logged, asked, "{mode}: nginx logged these clients");

    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    for (name, _, version, v6) in services {
        let clients = if v6 {
            v6_clients.len()
        } else {
            v4_clients.len()
        };
        let labels = [("service", name), ("version", version)];
        assert_eq!(
            metric(&metrics, "carousel_proxy_headers_total", &labels),
            Some((clients * per_client) as f64),
            "{mode}: {name}:\n{metrics}"
        );
    }
}

#[test]
fn proxy_protocol_headers_reach_nginx_in_nftables_mode() {
    proxy_protocol_reaches_nginx("nftables");
}

#[test]
fn proxy_protocol_headers_reach_nginx_in_bind_mode() {
    proxy_protocol_reaches_nginx("bind");
}

/// A Service that does not ask for a header sends none: the client's first bytes are the
/// pod's first bytes.
#[test]
fn services_without_the_annotation_send_no_header() {
    let pods = ["plain-a"];
    let mut lab = Lab::new(&pods);
    let mut echo = lab
        .in_ns("pod1", "python3")
        .args([AGENT, "echo", "9090"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(echo.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    lab.children.push(echo);
    assert_eq!(ready.trim(), "ready");
    let svc = Svc::new(
        "plain",
        "10.96.0.62",
        90,
        vec![Ep::ready("10.244.1.2:9090".parse().unwrap(), "plain-a")],
    );
    lab.write_state(&svc.state());
    lab.start_carousel();
    let result = run(lab.in_ns("client", "python3").args([
        AGENT,
        "stream",
        "10.96.0.62",
        "90",
        "100000",
        "1",
    ]));
    let result: Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(result["same"], true, "{result}");
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert_eq!(
        metric(&metrics, "carousel_proxy_headers_total", &[]),
        None,
        "{metrics}"
    );
}

/// Debian's dnsdist in pod `i` (from 1), on port 5353 (UDP and TCP) of its IPv4 and IPv6
/// address, taking PROXY v2 headers from the node: each query is answered with the
/// client address its header gave (an A record for IPv4 clients, AAAA for IPv6) and
/// logged with it. Returns the query log's path; dnsdist stops with the lab.
fn start_dnsdist(lab: &mut Lab, i: usize) -> PathBuf {
    let dir = lab.dir.path().join(format!("dnsdist{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("queries.log");
    let conf = format!(
        r#"setLocal("10.244.{i}.2:5353")
addLocal("[fd00:244:{i}::2]:5353")
setSecurityPollSuffix("")
setACL({{"0.0.0.0/0", "::/0"}})
setProxyProtocolACL({{"10.244.{i}.1/32", "fd00:244:{i}::1/128"}})
addAction(AllRule(), LogAction("{log}", false, true, false))
addAction(AllRule(), LuaAction(function(dq) return DNSAction.Spoof, dq.remoteaddr:toString() end))
"#,
        log = log.display()
    );
    let conf_path = dir.join("dnsdist.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = lab
        .in_ns(&format!("pod{i}"), "dnsdist")
        .args(["--supervised", "--disable-syslog", "-C"])
        .arg(&conf_path)
        .stdout(std::fs::File::create(dir.join("dnsdist.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("dnsdist.err")).unwrap())
        .spawn()
        .expect("dnsdist (Debian's dnsdist package)");
    lab.children.push(child);
    let pod = format!("pod{i}");
    lab.until(
        &format!("dnsdist listens in {pod}"),
        Duration::from_secs(10),
        || {
            let out = lab
                .in_ns(&pod, "ss")
                .args(["-lunH", "sport = :5353"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().count() == 2
        },
    );
    log
}

/// What the dnsdist of every pod printed and logged, for a failure's message.
fn dnsdist_output(lab: &Lab) -> String {
    let mut all = String::new();
    for i in 1..=2 {
        for file in ["dnsdist.out", "dnsdist.err", "queries.log"] {
            let path = lab.dir.path().join(format!("dnsdist{i}")).join(file);
            let text = std::fs::read_to_string(path).unwrap_or_default();
            all += &format!("pod{i} {file}:\n{text}\n");
        }
    }
    all
}

/// DNS over UDP with `carousel.dev/proxy-protocol: v2`: every datagram of every flow
/// starts with a header that dnsdist reads, so each client's answer is its own address,
/// from several addresses, IPv4 and IPv6; both pods log the clients they served.
fn udp_proxy_protocol_reaches_dnsdist(mode: &str) {
    let mut lab = Lab::new(&["unused-a", "unused-b"]);
    let logs = [start_dnsdist(&mut lab, 1), start_dnsdist(&mut lab, 2)];
    let node = lab.ns("node");
    lab.add_client_v6(&["fd00:c::3", "fd00:c::4"]);
    let v2 = serde_json::json!({"annotations": {"carousel.dev/proxy-protocol": "v2"}});
    let services = [("10.96.0.70", false), ("fd00:96::70", true)];
    if mode == "bind" {
        for (addr, _) in services {
            ip(&format!("-n {node} addr add {addr} dev lo"));
        }
    }
    lab.write_state(&format!(
        "{}{}",
        dns_service_with("dns-pp", services[0].0, 2, false, v2.clone()),
        dns_service_with("dns-pp-six", services[1].0, 2, true, v2),
    ));
    let child = lab.spawn_carousel(mode, "carousel.log", &[]);
    lab.carousel = Some(child);
    lab.wait_healthy();

    let per_client = 6;
    let mut flows = 0;
    for (addr, v6) in services {
        let sources: Vec<String> = match v6 {
            true => (2..=4).map(|i| format!("fd00:c::{i}")).collect(),
            false => (2..=9).map(|i| format!("10.0.0.{i}")).collect(),
        };
        let count = sources.len() * per_client;
        let out = run(lab
            .in_ns("client", "python3")
            .env("AGENT_TIMEOUT", "2")
            .env("AGENT_QTYPE", if v6 { "AAAA" } else { "A" })
            .args([AGENT, "dns", addr, "53", &count.to_string()])
            .args(&sources));
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            answer["errors"],
            0,
            "{mode}: {addr}: {answer}\n{}\n{}",
            lab.log(),
            dnsdist_output(&lab)
        );
        for source in &sources {
            assert_eq!(
                answer["seen"][source.as_str()],
                serde_json::json!({source.as_str(): per_client}),
                "{mode}: {addr}: what dnsdist saw of {source}: {answer}"
            );
        }
        flows += count;
    }
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            text.lines().count() >= 2
                && text
                    .lines()
                    .all(|l| l.contains("10.0.0.") || l.contains("[fd00:c::")),
            "{mode}: dnsdist's log names the clients, in both pods:\n{text}"
        );
    }
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    let headers: f64 = ["dns-pp", "dns-pp-six"]
        .iter()
        .map(|service| {
            let labels = [("service", *service), ("port", "dns"), ("version", "v2")];
            metric(&metrics, "carousel_proxy_headers_total", &labels).unwrap_or(0.0)
        })
        .sum();
    assert_eq!(headers, flows as f64, "{mode}: one per flow:\n{metrics}");
}

#[test]
fn udp_proxy_protocol_reaches_dnsdist_in_nftables_mode() {
    udp_proxy_protocol_reaches_dnsdist("nftables");
}

#[test]
fn udp_proxy_protocol_reaches_dnsdist_in_bind_mode() {
    udp_proxy_protocol_reaches_dnsdist("bind");
}

/// The port of the peer servers: each answers with its pod's name and the address the
/// connection came from.
const PEER_PORT: u16 = 8082;

/// `agent.py peer` in pod `i`, named `name`, on port 8082.
fn start_peer(lab: &mut Lab, i: usize, name: &str) {
    let index = agent(
        lab,
        &format!("pod{i}"),
        &["peer", name, &PEER_PORT.to_string()],
    );
    let mut line = String::new();
    BufReader::new(lab.children[index].stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "peer server in pod{i}");
}

/// A Service at `ip:80` over the peer server of pod `i` (IPv6 when `v6`), on `node`.
fn peer_service(name: &str, ip: &str, i: usize, v6: bool, node: &str, transparent: bool) -> Svc {
    let addr = if v6 { Lab::pod_v6(i) } else { Lab::pod_v4(i) };
    let pod = format!("pod-{}", (b'a' + i as u8 - 1) as char);
    let mut svc = Svc::new(
        name,
        ip,
        80,
        vec![Ep::ready((addr.ip(), PEER_PORT).into(), &pod).on(node)],
    );
    if transparent {
        svc.annotations
            .push(("carousel.dev/source".into(), "transparent".into()));
    }
    svc
}

/// What each source address was answered, from `lab.ask`'s JSON: `{source: {answer: n}}`.
fn answers(answer: &Value) -> BTreeMap<String, BTreeMap<String, u64>> {
    serde_json::from_value(answer["seen"].clone()).unwrap()
}

/// `n` answers `answer` for each of `sources`.
fn each(
    sources: &[&str],
    answer: impl Fn(&str) -> String,
    n: u64,
) -> BTreeMap<String, BTreeMap<String, u64>> {
    sources
        .iter()
        .map(|s| (s.to_string(), BTreeMap::from([(answer(s), n)])))
        .collect()
}

fn sources_total(metrics: &str, service: &str, port: &str, source: &str) -> Option<f64> {
    let labels = [("service", service), ("port", port), ("source", source)];
    metric(metrics, "carousel_source_connections_total", &labels)
}

/// `carousel.dev/source: transparent` in nftables mode: a pod on this node sees each
/// client's own address (clients outside the node from several addresses, IPv4 and
/// IPv6; a pod on an address-less veth; the node itself), over TCP and UDP, and the
/// replies reach the clients. Where the replies would not come back, the connection
/// leaves from the node's address and is counted so: a pod on another node, a client
/// behind a bridge. Other traffic is unaffected: a Service without the annotation, and
/// connections straight to the pod, from outside and from the node. `carousel cleanup`
/// leaves no rule or route behind.
#[test]
fn transparent_source_reaches_pods_on_this_node() {
    let mut lab = Lab::new(&["unused-a", "unused-b"]);
    start_peer(&mut lab, 1, "pod-a");
    start_peer(&mut lab, 2, "pod-b");
    start_dnsdist(&mut lab, 1);
    lab.add_calico_client("calico");
    lab.add_bridge_client("bridged");
    let node = lab.ns("node");
    // Calico's nodes route 169.254.1.1 somewhere (their default route): proxy_arp
    // answers only for an address the node has a route to.
    ip(&format!("-n {node} route add default via 10.0.0.2"));
    lab.add_client_v6(&["fd00:c::3", "fd00:c::4"]);
    let svcs = [
        peer_service("tp", "10.96.0.80", 1, false, "node-a", true),
        peer_service("tp-six", "fd00:96::80", 1, true, "node-a", true),
        peer_service("tp-remote", "10.96.0.81", 2, false, "node-b", true),
        peer_service("plain", "10.96.0.82", 1, false, "node-a", false),
    ];
    let dns = dns_service_with(
        "dns-tp",
        "10.96.0.83",
        1,
        false,
        serde_json::json!({"annotations": {"carousel.dev/source": "transparent"}, "nodeName": "node-a"}),
    );
    lab.write_state(&format!("{}{dns}", state_yaml(&svcs)));
    lab.start_carousel_with(&["--node-name", "node-a"]);

    let v4: Vec<String> = (2..=9).map(|i| format!("10.0.0.{i}")).collect();
    let v4: Vec<&str> = v4.iter().map(String::as_str).collect();
    let v6 = ["fd00:c::2", "fd00:c::3", "fd00:c::4"];
    let seen = |role: &str, host: &str, sources: &[&str], n: usize| {
        let answer = lab.ask(role, host, 80, n, sources);
        assert_eq!(
            answer["errors"],
            0,
            "{role} to {host}: {answer}\n{}",
            lab.log()
        );
        answers(&answer)
    };
    let pod_a = |source: &str| format!("pod-a {source}");
    // The pod on this node sees each client.
    assert_eq!(seen("client", "10.96.0.80", &v4, 16), each(&v4, pod_a, 2));
    assert_eq!(seen("client", "fd00:96::80", &v6, 6), each(&v6, pod_a, 2));
    let one = |answer: &str| {
        BTreeMap::from([("-".to_string(), BTreeMap::from([(answer.to_string(), 2)]))])
    };
    assert_eq!(
        seen("calico", "10.96.0.80", &[], 2),
        one("pod-a 10.244.200.2")
    );
    assert_eq!(
        seen("calico", "fd00:96::80", &[], 2),
        one("pod-a fd00:244:200::2")
    );
    assert_eq!(seen("node", "10.96.0.80", &[], 2), one("pod-a 10.0.0.1"));
    // Where the replies would not come back: from the node's address.
    assert_eq!(
        seen("bridged", "10.96.0.80", &[], 2),
        one("pod-a 10.244.1.1")
    );
    assert_eq!(
        seen("client", "10.96.0.81", &v4, 16),
        each(&v4, |_| "pod-b 10.244.2.1".into(), 2)
    );
    // Other traffic: as without carousel.
    assert_eq!(
        seen("client", "10.96.0.82", &v4, 16),
        each(&v4, |_| "pod-a 10.244.1.1".into(), 2)
    );
    let direct = lab.ask("client", "10.244.1.2", PEER_PORT, 2, &["10.0.0.5"]);
    assert_eq!(answers(&direct), each(&["10.0.0.5"], pod_a, 2), "{direct}");
    let direct = lab.ask("node", "10.244.1.2", PEER_PORT, 2, &[]);
    assert_eq!(answers(&direct), one("pod-a 10.244.1.1"), "{direct}");

    // UDP: dnsdist answers each query with the address it came from.
    let out = run(lab
        .in_ns("client", "python3")
        .env("AGENT_TIMEOUT", "2")
        .args([AGENT, "dns", "10.96.0.83", "53", "16"])
        .args(&v4));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer["errors"],
        0,
        "{answer}\n{}\n{}",
        lab.log(),
        dnsdist_output(&lab)
    );
    assert_eq!(
        answers(&answer),
        each(&v4, |s| s.to_string(), 2),
        "{answer}"
    );

    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    let counted = [
        ("tp", "web", "client", Some(16.0 + 2.0 + 2.0)),
        ("tp", "web", "node", Some(2.0)),
        ("tp-six", "web", "client", Some(6.0 + 2.0)),
        ("tp-six", "web", "node", None),
        ("tp-remote", "web", "node", Some(16.0)),
        ("tp-remote", "web", "client", None),
        ("plain", "web", "node", None),
        ("plain", "web", "client", None),
        ("dns-tp", "dns", "client", Some(16.0)),
    ];
    for (service, port, source, want) in counted {
        assert_eq!(
            sources_total(&metrics, service, port, source),
            want,
            "{service} {port} {source}:\n{metrics}"
        );
    }
    let log = lab.log();
    for (pod, why) in [
        ("pod-b", "the endpoint is not on this node"),
        ("pod-a", "the connection came through a bridge"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("reached from the node's address")
                    && l.contains(&format!("pod={pod}"))
                    && l.contains(why)),
            "the log says why {pod} falls back ({why}):\n{log}"
        );
    }

    // Stopped, then cleaned up: nothing of carousel's is left.
    lab.signal_carousel("-TERM");
    run(lab.in_ns("node", BIN).arg("cleanup"));
    assert_eq!(lab.nft("list tables"), "");
    for family in ["-4", "-6"] {
        let rules = lab.node_ip(&format!("{family} rule show"));
        assert!(!rules.contains("0x4342"), "{rules}");
        let routes = lab.node_ip(&format!("{family} route show table all"));
        assert!(!routes.contains("table 17218"), "{routes}");
    }
}

/// Bind mode has no rules to bring a pod's replies back: a transparent Service's
/// connections leave from the node's address, counted so, and the log says why.
#[test]
fn transparent_source_falls_back_in_bind_mode() {
    let mut lab = Lab::new(&["unused-a"]);
    start_peer(&mut lab, 1, "pod-a");
    let node = lab.ns("node");
    ip(&format!("-n {node} addr add 10.96.0.80 dev lo"));
    lab.write_state(&state_yaml(&[peer_service(
        "tp",
        "10.96.0.80",
        1,
        false,
        "node-a",
        true,
    )]));
    let child = lab.spawn_carousel("bind", "carousel.log", &["--node-name", "node-a"]);
    lab.carousel = Some(child);
    lab.wait_healthy();
    let answer = lab.ask("client", "10.96.0.80", 80, 4, &["10.0.0.2", "10.0.0.3"]);
    assert_eq!(
        answers(&answer),
        each(&["10.0.0.2", "10.0.0.3"], |_| "pod-a 10.244.1.1".into(), 2),
        "{answer}\n{}",
        lab.log()
    );
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert_eq!(
        sources_total(&metrics, "tp", "web", "node"),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        sources_total(&metrics, "tp", "web", "client"),
        None,
        "{metrics}"
    );
    let log = lab.log();
    assert!(
        log.contains("transparent source needs nftables mode"),
        "{log}"
    );
}
