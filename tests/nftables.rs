//! nftables mode end to end, in network namespaces this test creates and removes: a
//! client namespace, a node namespace running the carousel binary in nftables mode, and
//! pod namespaces with backends on pod-like addresses (10.244.x.y). Needs root, `ip` and
//! `nft` (CI installs them).

mod common;
#[path = "netns/lab.rs"]
mod lab;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{state_yaml, Ep, Svc};
use lab::*;
use serde_json::Value;

/// The lines of `ip route show table all` that belong to these tables.
fn tables(routes: &str, ids: &[&str]) -> String {
    routes
        .lines()
        .filter(|l| ids.iter().any(|id| l.contains(&format!(" table {id} "))))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(p, n)| (p.to_string(), *n)).collect()
}

#[test]
fn cluster_ips_and_node_ports_reach_every_pod_in_turn() {
    let names = ["pod-a", "pod-b", "pod-c"];
    let mut lab = Lab::new(&names);
    let mut svc = Svc::new("web", "10.96.0.10", 80, pods_named(&names, Lab::pod_v4));
    svc.node_port = Some(30080);
    lab.write_state(&svc.state());
    lab.start_carousel();

    let want = counts(&[("pod-a", 40), ("pod-b", 40), ("pod-c", 40)]);
    assert_eq!(
        lab.spread("client", "10.96.0.10", 80, 120),
        want,
        "ClusterIP from a client"
    );
    let want = counts(&[("pod-a", 10), ("pod-b", 10), ("pod-c", 10)]);
    assert_eq!(
        lab.spread("client", "10.0.0.1", 30080, 30),
        want,
        "NodePort on the node's address"
    );
    assert_eq!(
        lab.spread("node", "10.96.0.10", 80, 30),
        want,
        "ClusterIP from the node itself"
    );
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert!(
        metrics.contains(r#"pod="pod-a",outcome="ok"} 60"#),
        "{metrics}"
    );
}

/// Every way a connection reaches a Service on a node: pods on an address-less veth
/// (Calico style, IPv4 and IPv6) and behind an addressed bridge (flannel style), a client
/// outside the node, and a process on the node; to ClusterIPs and to a node port.
#[test]
fn every_cni_wiring_reaches_cluster_ips_and_node_ports() {
    let names = ["cni-a", "cni-b"];
    let mut lab = Lab::new(&names);
    lab.add_calico_client("calico");
    lab.add_bridge_client("flannel");
    // Calico's nodes route 169.254.1.1 somewhere (their default route): proxy_arp
    // answers only for an address the node has a route to.
    ip(&format!(
        "-n {} route add default via 10.0.0.2",
        lab.ns("node")
    ));
    let mut v4 = Svc::new("web4", "10.96.0.70", 80, pods_named(&names, Lab::pod_v4));
    v4.node_port = Some(30070);
    let v6 = Svc::new("web6", "fd00:96::70", 80, pods_named(&names, Lab::pod_v6));
    lab.write_state(&state_yaml(&[v4, v6]));
    lab.start_carousel();

    let want = counts(&[("cni-a", 5), ("cni-b", 5)]);
    for (role, host, port) in [
        ("calico", "10.96.0.70", 80),
        ("calico", "fd00:96::70", 80),
        ("calico", "10.0.0.1", 30070),
        ("flannel", "10.96.0.70", 80),
        ("flannel", "10.244.201.1", 30070),
        ("client", "10.96.0.70", 80),
        ("client", "fd00:96::70", 80),
        ("client", "10.0.0.1", 30070),
        ("node", "10.96.0.70", 80),
        ("node", "fd00:96::70", 80),
        ("node", "10.0.0.1", 30070),
    ] {
        assert_eq!(
            lab.spread(role, host, port, 10),
            want,
            "from {role} to {host}:{port}"
        );
    }
}

/// A rollout on one node: while clients open 200 connections a second and three long
/// streams run, a second carousel starts beside the first, on the same addresses and
/// ports, as a DaemonSet's surge pod does, and the first gets SIGTERM as soon as the
/// second says it is starting. The first waits until the second is ready, stops
/// accepting, hands over what waits in its accept queue, and finishes its streams. No
/// connection fails, every stream comes back byte for byte, and the rules stay.
fn handover(mode: &str, service_ip: &str) {
    let names = ["ho-a", "ho-b"];
    let mut lab = Lab::new(&names);
    for i in 1..=names.len() {
        let echo = agent(&mut lab, &format!("pod{i}"), &["echo", "9090"]);
        let mut line = String::new();
        BufReader::new(lab.children[echo].stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    if mode == "bind" {
        // Bind mode listens on the Service address itself: the node holds it.
        ip(&format!(
            "-n {} addr add {service_ip}/32 dev lo",
            lab.ns("node")
        ));
    }
    let web = Svc::new("web", service_ip, 80, pods_named(&names, Lab::pod_v4));
    let streams = Svc::new(
        "streams",
        service_ip,
        90,
        (1..=names.len())
            .map(|i| Ep::ready(format!("10.244.{i}.2:9090").parse().unwrap(), names[i - 1]))
            .collect(),
    );
    lab.write_state(&state_yaml(&[web, streams]));
    let mut first = lab.spawn_carousel(mode, "carousel.log", &[]);
    lab.wait_healthy();

    let churn = agent(&mut lab, "client", &["churn", service_ip, "80", "7", "200"]);
    let long: Vec<usize> = (0..3)
        .map(|_| {
            agent(
                &mut lab,
                "client",
                &["stream", service_ip, "90", "4000000", "5"],
            )
        })
        .collect();
    sleep(Duration::from_secs(1));
    let second = lab.spawn_carousel(mode, "second.log", &[]);
    lab.carousel = Some(second);
    // As soon as the second is there (its name in the node's abstract socket space):
    // starting, or, from a state file often already, ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !["starting", "successor"].iter().any(|role| {
        lab.node_ss("-xa")
            .contains(&format!("carousel/127.0.0.1:10256/{role}"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the second carousel never said it was starting:\n{}\n{}",
            lab.node_ss("-xa"),
            lab.log_named("second.log")
        );
        sleep(Duration::from_millis(5));
    }
    run(Command::new("kill").args(["-TERM", &first.id().to_string()]));

    let churned = agent_result(&mut lab, churn);
    for stream in long {
        let result = agent_result(&mut lab, stream);
        assert_eq!(
            result["same"], true,
            "a long stream through the handover: {result}"
        );
    }
    assert_eq!(
        churned["errors"],
        0,
        "{mode}: connections failed during the handover: {churned}\nfirst:\n{}\nsecond:\n{}",
        lab.log(),
        lab.log_named("second.log")
    );
    assert!(churned["ok"].as_u64().unwrap() > 500, "{churned}");
    let status = first.wait().unwrap();
    assert!(
        status.success(),
        "the first carousel exited {status}:\n{}",
        lab.log()
    );
    assert!(
        lab.log().contains("a successor is ready: handing over"),
        "{}",
        lab.log()
    );
    // The second took over: it serves the next connections alone, and counted them.
    assert_eq!(lab.spread("client", service_ip, 80, 10).len(), 2);
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert!(
        metrics.contains(
            r#"service="web",port="web",endpoint="10.244.1.2:8080",pod="ho-a",outcome="ok"}"#
        ),
        "{metrics}"
    );
}

/// A listener that closes while another of its group (SO_REUSEPORT) is open hands the
/// connection waiting in its accept queue to that other listener once carousel has turned
/// request migration on in its namespace; without it the kernel resets the connection.
#[test]
fn a_closing_listener_hands_its_queued_connections_to_its_group() {
    use carousel::proxy::listener::{bind, migrate_queued_connections_on_close};
    use tokio::io::AsyncWriteExt;

    let lab = Lab::new(&[]);
    for migrate in [false, true] {
        let handed_over = common::in_netns(&lab.ns("node"), move || {
            if migrate {
                migrate_queued_connections_on_close();
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let addr: SocketAddr = "127.0.0.1:7100".parse().unwrap();
                let first = bind(addr, None).unwrap();
                let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                // Queued on the first (the only one when it connected), never accepted.
                let second = bind(addr, None).unwrap();
                drop(first);
                let accepted =
                    tokio::time::timeout(Duration::from_millis(500), second.accept()).await;
                let written = client.write_all(b"x").await;
                match accepted {
                    Ok(Ok(_)) => {
                        assert!(written.is_ok());
                        true
                    }
                    _ => false,
                }
            })
        });
        assert_eq!(handed_over, migrate, "request migration {migrate}");
    }
}

#[test]
fn a_rollout_in_nftables_mode_loses_no_connection() {
    handover("nftables", "10.96.0.90");
}

#[test]
fn a_rollout_in_bind_mode_loses_no_connection() {
    handover("bind", "10.96.0.95");
}

/// What someone else does to carousel's rules is repaired within one `--sync-period`:
/// a flushed ruleset, a deleted table, a deleted policy rule, a deleted set element.
#[test]
fn rules_someone_removed_are_restored_within_a_sync_period() {
    let names = ["fix-a", "fix-b"];
    let mut lab = Lab::new(&names);
    let svc = Svc::new("fix", "10.96.0.80", 80, pods_named(&names, Lab::pod_v4));
    lab.write_state(&svc.state());
    lab.start_carousel_with(&["--sync-period", "1s"]);
    let want = counts(&[("fix-a", 2), ("fix-b", 2)]);
    assert_eq!(lab.spread("client", "10.96.0.80", 80, 4), want);
    let ruleset = lab.nft("list ruleset");
    // Each run in the node namespace.
    let damage: [(&str, &[&str]); 4] = [
        ("nft flush ruleset", &["nft", "flush", "ruleset"]),
        (
            "a deleted table",
            &["nft", "delete", "table", "inet", "carousel"],
        ),
        (
            "a deleted policy rule",
            &["ip", "rule", "del", "priority", "17218"],
        ),
        (
            "a deleted set element",
            &[
                "nft",
                "delete element inet carousel services4 { 10.96.0.80 . tcp . 80 }",
            ],
        ),
    ];
    for (what, command) in damage {
        run(lab.in_ns("node", command[0]).args(&command[1..]));
        lab.until(
            &format!("{what} was not repaired"),
            Duration::from_secs(5),
            || {
                lab.nft("list ruleset") == ruleset
                    && lab
                        .node_ip("rule show")
                        .contains("fwmark 0x4342 lookup 17218")
            },
        );
        assert_eq!(
            lab.spread("client", "10.96.0.80", 80, 4),
            want,
            "after {what}"
        );
    }
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert!(
        metrics.contains("carousel_sync_errors_total 0"),
        "{metrics}"
    );
}

/// kube-proxy's health rule: a change that has waited longer than twice the sync period
/// without being programmed turns `/healthz` (and `/livez`) 503, with the time of the
/// last sync that worked; once the node can be programmed again, 200.
#[test]
fn health_turns_503_while_a_change_cannot_be_programmed() {
    let mut lab = Lab::new(&["st-a"]);
    // nft(8) that refuses while the flag file exists.
    let flag = lab.dir.path().join("refuse");
    let bin = lab.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let real =
        String::from_utf8(run(Command::new("sh").args(["-c", "command -v nft"])).stdout).unwrap();
    std::fs::write(
        bin.join("nft"),
        format!(
            "#!/bin/sh\nif [ -e {} ]; then echo 'refused by the test' >&2; exit 1; fi\nexec {} \"$@\"\n",
            flag.display(),
            real.trim()
        ),
    )
    .unwrap();
    run(Command::new("chmod").arg("+x").arg(bin.join("nft")));
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    lab.carousel_env.push(("PATH".into(), path));
    let one = Svc::new(
        "one",
        "10.96.0.110",
        80,
        vec![Ep::ready(Lab::pod_v4(1), "st-a")],
    );
    lab.write_state(&one.state());
    lab.start_carousel_with(&["--sync-period", "1s"]);
    assert!(lab.get("http://127.0.0.1:10256/healthz").starts_with("200"));

    std::fs::write(&flag, "").unwrap();
    lab.nft("delete table inet carousel");
    let two = Svc::new(
        "two",
        "10.96.0.111",
        80,
        vec![Ep::ready(Lab::pod_v4(1), "st-a")],
    );
    lab.write_state(&state_yaml(&[one.clone(), two.clone()]));
    lab.until("healthz stayed 200", Duration::from_secs(10), || {
        lab.get("http://127.0.0.1:10256/healthz").starts_with("503")
    });
    assert!(lab.get("http://127.0.0.1:10256/livez").starts_with("503"));
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    let errors: f64 = common::metric(&metrics, "carousel_sync_errors_total", &[]).unwrap();
    assert!(errors >= 1.0, "{metrics}");
    assert_eq!(
        lab.log().matches("cannot program the node").count(),
        1,
        "one line per streak:\n{}",
        lab.log()
    );

    std::fs::remove_file(&flag).unwrap();
    lab.until("healthz stayed 503", Duration::from_secs(10), || {
        lab.get("http://127.0.0.1:10256/healthz").starts_with("200")
    });
    assert_eq!(
        lab.spread("client", "10.96.0.111", 80, 2),
        counts(&[("st-a", 2)])
    );
}

/// Node ports are served on the node's addresses inside `--nodeport-addresses`, by
/// default on every one but loopback (kube-proxy's nftables mode), and on 127.0.0.1 only
/// when asked.
#[test]
fn node_ports_follow_nodeport_addresses_and_skip_loopback_unless_asked() {
    let mut lab = Lab::new(&["np-a"]);
    let mut svc = Svc::new(
        "np",
        "10.96.0.120",
        80,
        vec![Ep::ready(Lab::pod_v4(1), "np-a")],
    );
    svc.node_port = Some(30120);
    lab.write_state(&svc.state());
    let served = |lab: &Lab, host: &str| lab.ask("node", host, 30120, 1, &[])["errors"] == 0;
    for (flags, expected) in [
        (
            vec![],
            [
                ("10.0.0.1", true),
                ("10.244.1.1", true),
                ("127.0.0.1", false),
            ],
        ),
        (
            vec!["--nodeport-addresses", "10.0.0.0/24"],
            [
                ("10.0.0.1", true),
                ("10.244.1.1", false),
                ("127.0.0.1", false),
            ],
        ),
        (
            vec!["--nodeport-addresses", "127.0.0.1/32"],
            [
                ("10.0.0.1", false),
                ("10.244.1.1", false),
                ("127.0.0.1", true),
            ],
        ),
    ] {
        lab.start_carousel_with(&flags);
        for (host, serve) in expected {
            assert_eq!(served(&lab, host), serve, "{flags:?}: node port on {host}");
        }
        assert!(lab.signal_carousel("-TERM"));
    }
}

#[test]
fn ipv6_services_are_redirected_too() {
    let names = ["six-a", "six-b"];
    let mut lab = Lab::new(&names);
    let svc = Svc::new("six", "fd00:96::a", 80, pods_named(&names, Lab::pod_v6));
    lab.write_state(&svc.state());
    lab.start_carousel();

    let want = counts(&[("six-a", 10), ("six-b", 10)]);
    assert_eq!(lab.spread("client", "fd00:96::a", 80, 20), want);
}

#[test]
fn carousels_own_connections_skip_the_redirect_even_to_a_service_address() {
    // The Service address *is* the pod's address: without the socket mark, carousel's
    // connection to the pod would be redirected back to carousel, forever.
    let mut lab = Lab::new(&["loop-a"]);
    let svc = Svc::new(
        "loop",
        "10.244.1.2",
        POD_PORT,
        vec![Ep::ready(Lab::pod_v4(1), "loop-a")],
    );
    lab.write_state(&svc.state());
    lab.start_carousel();

    assert_eq!(
        lab.spread("client", "10.244.1.2", POD_PORT, 5),
        counts(&[("loop-a", 5)])
    );
    let metrics = lab.get("http://127.0.0.1:10249/metrics");
    assert!(
        metrics.contains(r#"pod="loop-a",outcome="ok"} 5"#),
        "the connections went through carousel:\n{metrics}"
    );
}

#[test]
fn a_reload_changes_the_elements_over_netlink_and_the_table_holds_nothing_stale() {
    let names = ["r-a", "r-b"];
    let mut lab = Lab::new(&names);
    let first = Svc::new("first", "10.96.0.20", 80, pods_named(&names, Lab::pod_v4));
    lab.write_state(&first.state());
    lab.start_carousel();
    assert_eq!(lab.spread("client", "10.96.0.20", 80, 4).len(), 2);

    // A change to each of the three sets: their keys differ in layout.
    let mut second = Svc::new("second", "10.96.0.21", 81, pods_named(&names, Lab::pod_v4));
    second.node_port = Some(30085);
    let six = Svc::new("six", "fd00:96::21", 80, pods_named(&names, Lab::pod_v6));
    lab.write_state(&state_yaml(&[second, six]));
    lab.wait_for_element("services4", "10.96.0.21 . tcp . 81");
    lab.wait_for_element("services6", "fd00:96::21 . tcp . 80");
    lab.wait_for_element("nodeports", "tcp . 30085");
    assert!(!lab
        .nft("list set inet carousel services4")
        .contains("10.96.0.20"));
    let want = counts(&[("r-a", 2), ("r-b", 2)]);
    assert_eq!(
        lab.spread("client", "10.96.0.21", 81, 4),
        want,
        "new ClusterIP"
    );
    assert_eq!(lab.spread("client", "fd00:96::21", 80, 4), want, "new IPv6");
    assert_eq!(
        lab.spread("client", "10.0.0.1", 30085, 4),
        want,
        "new node port"
    );

    // And back: every element of the second state goes.
    lab.write_state(&first.state());
    lab.wait_for_element("services4", "10.96.0.20 . tcp . 80");
    assert!(!lab
        .nft("list set inet carousel services4")
        .contains("10.96.0.21"));
    assert!(!lab.nft("list set inet carousel services6").contains("fd00"));
    assert!(!lab
        .nft("list set inet carousel nodeports")
        .contains("30085"));
    assert_eq!(lab.spread("client", "10.96.0.20", 80, 4), want);
    assert!(
        !lab.log().contains("refused"),
        "every change went over netlink, none was rewritten whole:\n{}",
        lab.log()
    );
}

#[test]
fn a_change_the_kernel_refuses_falls_back_to_rewriting_the_whole_table() {
    let names = ["f-a"];
    let mut lab = Lab::new(&names);
    let svc = |name: &str, ip: &str| Svc::new(name, ip, 80, pods_named(&names, Lab::pod_v4));
    lab.write_state(&state_yaml(&[
        svc("gone", "10.96.0.70"),
        svc("kept", "10.96.0.71"),
    ]));
    lab.start_carousel();

    // Someone else edits carousel's table: the element carousel is about to remove is
    // gone already, so the kernel refuses the removal, and the whole batch with it.
    lab.nft("delete element inet carousel services4 { 10.96.0.70 . tcp . 80 }");
    lab.write_state(&state_yaml(&[
        svc("kept", "10.96.0.71"),
        svc("new", "10.96.0.72"),
    ]));
    lab.wait_for_element("services4", "10.96.0.72 . tcp . 80");
    let set = lab.nft("list set inet carousel services4");
    assert!(
        set.contains("10.96.0.71 . tcp . 80") && !set.contains("10.96.0.70"),
        "{set}"
    );
    assert_eq!(
        lab.spread("client", "10.96.0.72", 80, 3),
        counts(&[("f-a", 3)])
    );
    let log = lab.log();
    assert!(
        log.contains("rewriting carousel's table")
            && log.contains("refused to delete 10.96.0.70 . tcp . 80 in set services4")
            && log.contains("No such file or directory"),
        "the refusal is reported with its element and errno:\n{log}"
    );
    assert_eq!(lab.nft("list tables").matches("carousel").count(), 1);
}

#[test]
fn restarts_converge_and_cleanup_removes_only_carousels_table() {
    let mut lab = Lab::new(&["c-a"]);
    // Someone else's table, which carousel must never touch.
    let bystander = "table inet bystander {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport 9999 counter packets 0 bytes 0 accept\n\t}\n}\n";
    let mut nft = lab.in_ns("node", "nft");
    nft.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = nft.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), bystander.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let svc = Svc::new(
        "keep",
        "10.96.0.30",
        80,
        vec![Ep::ready(Lab::pod_v4(1), "c-a")],
    );
    lab.write_state(&state_yaml(&[svc]));
    // Someone else's policy routing, which carousel must never touch either.
    let node = lab.ns("node");
    ip(&format!(
        "-n {node} rule add priority 1000 fwmark 0x99 lookup 99"
    ));
    ip(&format!(
        "-n {node} route add local default dev lo table 99"
    ));
    let policy = |lab: &Lab| {
        [
            lab.node_ip("-4 rule show"),
            lab.node_ip("-6 rule show"),
            lab.node_ip("-4 route show table 99"),
            tables(&lab.node_ip("-4 route show table all"), &["99", "17218"]),
            tables(&lab.node_ip("-6 route show table all"), &["99", "17218"]),
        ]
        .join("")
    };
    let before = policy(&lab);

    lab.start_carousel();
    let ruleset = lab.nft("list ruleset");
    let installed = policy(&lab);
    for family in ["-4", "-6"] {
        assert!(
            lab.node_ip(&format!("{family} rule show"))
                .contains("fwmark 0x4342 lookup 17218"),
            "carousel's {family} policy rule:\n{installed}"
        );
        assert!(
            lab.node_ip(&format!("{family} route show table all"))
                .contains("local default dev lo table 17218"),
            "carousel's {family} route"
        );
    }
    // A crash leaves the rules behind; the next start converges to the same table.
    assert!(!lab.signal_carousel("-KILL"));
    lab.start_carousel();
    assert_eq!(
        lab.nft("list ruleset"),
        ruleset,
        "restart after a crash: no duplicates"
    );
    assert_eq!(
        policy(&lab),
        installed,
        "restart after a crash: one rule, one route"
    );
    assert_eq!(lab.nft("list tables").matches("carousel").count(), 1);
    assert_eq!(
        lab.spread("client", "10.96.0.30", 80, 3),
        counts(&[("c-a", 3)])
    );

    // SIGTERM exits 0 and leaves the rules for the next carousel: a restart is no
    // outage of the node's Services. Only `carousel cleanup` removes them, and nothing
    // else.
    assert!(
        lab.signal_carousel("-TERM"),
        "exit status after SIGTERM:\n{}",
        lab.log()
    );
    assert_eq!(lab.nft("list ruleset"), ruleset, "SIGTERM keeps the rules");
    assert_eq!(policy(&lab), installed, "SIGTERM keeps the policy routes");
    run(lab.in_ns("node", BIN).arg("cleanup"));
    assert_eq!(lab.nft("list tables"), "table inet bystander\n");
    assert_eq!(lab.nft("list table inet bystander"), bystander);
    assert_eq!(
        policy(&lab),
        before,
        "the policy routes are gone, the bystander's kept"
    );

    // After a crash too.
    lab.start_carousel();
    assert!(!lab.signal_carousel("-KILL"));
    assert!(lab.nft("list tables").contains("table inet carousel"));
    run(lab.in_ns("node", BIN).arg("cleanup"));
    assert_eq!(lab.nft("list tables"), "table inet bystander\n");
    assert_eq!(lab.nft("list table inet bystander"), bystander);
    assert_eq!(policy(&lab), before);
}

#[test]
fn external_traffic_policy_local_keeps_node_port_traffic_on_this_node() {
    let names = ["here", "there"];
    let mut lab = Lab::new(&names);
    let mut svc = Svc::new(
        "local",
        "10.96.0.40",
        80,
        vec![
            Ep::ready(Lab::pod_v4(1), "here").on("node-a"),
            Ep::ready(Lab::pod_v4(2), "there").on("node-b"),
        ],
    );
    svc.node_port = Some(30090);
    svc.spec.push("externalTrafficPolicy: Local".into());
    let mut remote_only = Svc::new(
        "remote-only",
        "10.96.0.41",
        80,
        vec![Ep::ready(Lab::pod_v4(2), "there").on("node-b")],
    );
    remote_only.node_port = Some(30091);
    remote_only.spec.push("externalTrafficPolicy: Local".into());
    lab.write_state(&state_yaml(&[svc, remote_only]));
    lab.start_carousel_with(&["--node-name", "node-a"]);

    assert_eq!(
        lab.spread("client", "10.0.0.1", 30090, 6),
        counts(&[("here", 6)]),
        "node port: local pods only"
    );
    assert_eq!(
        lab.spread("client", "10.96.0.40", 80, 6),
        counts(&[("here", 3), ("there", 3)]),
        "ClusterIP: every pod"
    );
    // No local endpoint: the connection is refused, not sent to another node.
    let answer = lab.ask("client", "10.0.0.1", 30091, 3, &[]);
    assert_eq!(answer["errors"], 3, "{answer}");
    assert_eq!(
        lab.spread("client", "10.96.0.41", 80, 2),
        counts(&[("there", 2)])
    );
}

#[test]
fn weights_and_client_ip_affinity_hold_in_nftables_mode() {
    let names = ["orig", "cust"];
    let mut lab = Lab::new(&names);
    let mut canary = Svc::new("canary", "10.96.0.50", 80, pods_named(&names, Lab::pod_v4));
    canary.annotations = vec![
        (
            "carousel.dev/load-balancer".into(),
            "weighted-round-robin".into(),
        ),
        (
            "carousel.dev/weights".into(),
            "version=custom:3,version=original:1".into(),
        ),
    ];
    let mut sticky = Svc::new("sticky", "10.96.0.51", 80, pods_named(&names, Lab::pod_v4));
    sticky.spec.push("sessionAffinity: ClientIP".into());
    let pods = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: orig, namespace: test, labels: {version: original}}\n\
                ---\napiVersion: v1\nkind: Pod\nmetadata: {name: cust, namespace: test, labels: {version: custom}}\n";
    lab.write_state(&(state_yaml(&[canary, sticky]) + pods));
    lab.start_carousel();

    assert_eq!(
        lab.spread("client", "10.96.0.50", 80, 400),
        counts(&[("cust", 300), ("orig", 100)])
    );

    let sources: Vec<String> = (0..CLIENTS).map(|i| format!("10.0.0.{}", i + 2)).collect();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    let answer = lab.ask("client", "10.96.0.51", 80, 10 * CLIENTS, &sources);
    assert_eq!(
        each_client_on_one_pod(&answer),
        2,
        "new clients are still balanced: {answer}"
    );
}

/// Checks that an agent's `seen` has every one of `CLIENTS` source addresses on one pod,
/// with no error, and returns how many pods they used.
fn each_client_on_one_pod(answer: &Value) -> usize {
    assert_eq!(answer["errors"], 0, "{answer}");
    let seen = answer["seen"].as_object().unwrap();
    assert_eq!(seen.len(), CLIENTS, "{answer}");
    for (source, pods) in seen {
        assert_eq!(
            pods.as_object().unwrap().len(),
            1,
            "{source} stays on one pod: {answer}"
        );
    }
    let used: std::collections::BTreeSet<&String> = seen
        .values()
        .flat_map(|p| p.as_object().unwrap().keys())
        .collect();
    used.len()
}

#[test]
fn external_and_load_balancer_ips_are_redirected_too() {
    let names = ["ext-a", "ext-b"];
    let mut lab = Lab::new(&names);
    let mut svc = Svc::new("exposed", "10.96.0.60", 80, pods_named(&names, Lab::pod_v4));
    svc.spec.push("externalIPs: [10.97.0.100]".into());
    svc.load_balancer_ips.push("10.98.0.1".into());
    lab.write_state(&svc.state());
    lab.start_carousel();

    let want = counts(&[("ext-a", 5), ("ext-b", 5)]);
    assert_eq!(
        lab.spread("client", "10.97.0.100", 80, 10),
        want,
        "an external IP"
    );
    assert_eq!(
        lab.spread("client", "10.98.0.1", 80, 10),
        want,
        "a load-balancer IP"
    );
    let set = lab.nft("list set inet carousel services4");
    assert!(
        set.contains("10.97.0.100 . tcp . 80") && set.contains("10.98.0.1 . tcp . 80"),
        "{set}"
    );
}

/// A node whose default route leads somewhere, as a Calico node's does: proxy_arp answers
/// only for an address the node has a route to (169.254.1.1, the pods' gateway).
fn route_default(lab: &Lab) {
    ip(&format!(
        "-n {} route add default via 10.0.0.2",
        lab.ns("node")
    ));
}

/// A Service port without endpoints is refused at the SYN, as with kube-proxy: every
/// kind of client sees ECONNREFUSED at once, at the ClusterIP and at the node port. Once
/// an endpoint appears, the same addresses are served.
#[test]
fn a_service_port_without_endpoints_is_refused_at_the_syn() {
    let mut lab = Lab::new(&["late"]);
    lab.add_calico_client("calico");
    lab.add_bridge_client("flannel");
    route_default(&lab);
    let services = |endpoints: bool| {
        let pods = |addr| match endpoints {
            true => vec![Ep::ready(addr, "late")],
            false => Vec::new(),
        };
        let mut v4 = Svc::new("empty4", "10.96.0.80", 80, pods(Lab::pod_v4(1)));
        v4.node_port = Some(30081);
        let v6 = Svc::new("empty6", "fd00:96::80", 80, pods(Lab::pod_v6(1)));
        state_yaml(&[v4, v6])
    };
    lab.write_state(&services(false));
    lab.start_carousel();

    let clients = [
        ("calico", "10.96.0.80", 80),
        ("calico", "fd00:96::80", 80),
        ("calico", "10.0.0.1", 30081),
        ("flannel", "10.96.0.80", 80),
        ("client", "10.96.0.80", 80),
        ("client", "fd00:96::80", 80),
        ("client", "10.0.0.1", 30081),
        ("node", "10.96.0.80", 80),
        ("node", "fd00:96::80", 80),
        ("node", "10.0.0.1", 30081),
    ];
    for (role, host, port) in clients {
        let answer = lab.ask_briefly(role, host, port, 2, &[]);
        assert_eq!(
            answer["kinds"]["refused"], 2,
            "from {role} to {host}:{port}: {answer}"
        );
    }
    assert!(lab
        .nft("list set inet carousel refused4")
        .contains("10.96.0.80 . tcp . 80"));

    lab.write_state(&services(true));
    lab.wait_for_element("services6", "fd00:96::80 . tcp . 80");
    lab.wait_for_element("nodeports", "tcp . 30081");
    for (role, host, port) in clients {
        assert_eq!(
            lab.spread(role, host, port, 2),
            counts(&[("late", 2)]),
            "from {role} to {host}:{port}"
        );
    }
    assert!(!lab
        .nft("list set inet carousel refused4")
        .contains("10.96.0.80"));
}

/// `loadBalancerSourceRanges`: at the load-balancer IP only clients inside a range get
/// through; the others get no answer at all, as with kube-proxy. The ClusterIP stays open
/// to every client, and a change of the ranges takes effect.
#[test]
fn load_balancer_source_ranges_keep_other_clients_out() {
    let mut lab = Lab::new(&["lb-a"]);
    lab.add_calico_client("calico");
    route_default(&lab);
    let service = |ranges: &str| {
        let mut svc = Svc::new(
            "guarded",
            "10.96.0.90",
            80,
            vec![Ep::ready(Lab::pod_v4(1), "lb-a")],
        );
        svc.spec
            .push(format!("loadBalancerSourceRanges: [{ranges}]"));
        svc.load_balancer_ips.push("10.98.0.9".into());
        svc.state()
    };
    lab.write_state(&service("10.0.0.2/32, 10.244.200.0/24"));
    lab.start_carousel();

    assert_eq!(
        lab.spread("calico", "10.98.0.9", 80, 3),
        counts(&[("lb-a", 3)])
    );
    let inside = lab.ask("client", "10.98.0.9", 80, 3, &["10.0.0.2"]);
    assert_eq!(inside["errors"], 0, "{inside}");
    let outside = lab.ask_briefly("client", "10.98.0.9", 80, 2, &["10.0.0.3"]);
    assert_eq!(
        outside["kinds"]["timeout"], 2,
        "dropped, not refused: {outside}"
    );
    let cluster_ip = lab.ask("client", "10.96.0.90", 80, 2, &["10.0.0.3"]);
    assert_eq!(cluster_ip["errors"], 0, "{cluster_ip}");
    let allowed = lab.nft("list set inet carousel allowed4");
    assert!(
        allowed.contains("10.98.0.9 . tcp . 80 . 10.0.0.2"),
        "{allowed}"
    );

    lab.write_state(&service("10.0.0.3/32"));
    lab.until("the new ranges apply", Duration::from_secs(10), || {
        lab.nft("list set inet carousel allowed4")
            .contains("10.0.0.3")
    });
    let now_inside = lab.ask("client", "10.98.0.9", 80, 2, &["10.0.0.3"]);
    assert_eq!(now_inside["errors"], 0, "{now_inside}");
    let now_outside = lab.ask_briefly("calico", "10.98.0.9", 80, 1, &[]);
    assert_eq!(now_outside["kinds"]["timeout"], 1, "{now_outside}");
}

/// An `externalTrafficPolicy: Local` Service on a node without its pods: a client from
/// outside gets nothing at its node port or load-balancer IP, but a pod (inside
/// `--cluster-cidr`) and the node itself reach every endpoint there, as with kube-proxy,
/// instead of being turned away.
#[test]
fn pods_and_the_node_reach_an_etp_local_services_external_addresses_at_every_endpoint() {
    let mut lab = Lab::new(&["far"]);
    lab.add_calico_client("calico");
    route_default(&lab);
    let mut svc = Svc::new(
        "local-elsewhere",
        "10.96.0.95",
        80,
        vec![Ep::ready(Lab::pod_v4(1), "far").on("node-b")],
    );
    svc.node_port = Some(30095);
    svc.spec.push("externalTrafficPolicy: Local".into());
    svc.load_balancer_ips.push("10.98.0.5".into());
    lab.write_state(&svc.state());
    lab.start_carousel_with(&["--node-name", "node-a", "--cluster-cidr", "10.244.0.0/16"]);

    for (host, port) in [("10.0.0.1", 30095), ("10.98.0.5", 80)] {
        let outside = lab.ask("client", host, port, 2, &[]);
        assert_eq!(
            outside["errors"], 2,
            "from outside to {host}:{port}: {outside}"
        );
        for role in ["calico", "node"] {
            assert_eq!(
                lab.spread(role, host, port, 2),
                counts(&[("far", 2)]),
                "from {role} to {host}:{port}"
            );
        }
    }
}

/// In nftables mode, a load balancer outside the node asks `healthCheckNodePort` on the
/// node's address: 200 with this node's endpoint count while one is local, 503 once the
/// local pod leaves, and 200 again when it is back.
#[test]
fn the_health_check_node_port_answers_an_outside_load_balancer() {
    let mut lab = Lab::new(&["hc-a", "hc-b"]);
    let service = |here: &str| {
        let mut svc = Svc::new(
            "checked",
            "10.96.0.97",
            80,
            vec![
                Ep::ready(Lab::pod_v4(1), "hc-a").on(here),
                Ep::ready(Lab::pod_v4(2), "hc-b").on("node-b"),
            ],
        );
        svc.node_port = Some(30097);
        svc.spec.push("externalTrafficPolicy: Local".into());
        svc.spec.push("healthCheckNodePort: 30197".into());
        svc.load_balancer_ips.push("10.98.0.97".into());
        svc.state()
    };
    lab.write_state(&service("node-a"));
    lab.start_carousel_with(&["--node-name", "node-a"]);
    // The status and the JSON body of one GET from the client outside the node.
    let ask = |lab: &Lab| -> (String, Value) {
        let out = lab
            .in_ns("client", "python3")
            .args([AGENT, "get", "http://10.0.0.1:30197/"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
        (
            status.to_string(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let report = |n: u64| {
        serde_json::json!({"service": {"namespace": "test", "name": "checked"},
                           "localEndpoints": n, "serviceProxyHealthy": true})
    };
    lab.until(
        "200 with one local endpoint",
        Duration::from_secs(10),
        || ask(&lab) == ("200".to_string(), report(1)),
    );
    lab.write_state(&service("node-c"));
    lab.until(
        "503 without a local endpoint",
        Duration::from_secs(10),
        || {
            let (status, body) = ask(&lab);
            status == "503" && body["localEndpoints"] == 0
        },
    );
    lab.write_state(&service("node-a"));
    lab.until(
        "200 once the local pod is back",
        Duration::from_secs(10),
        || ask(&lab) == ("200".to_string(), report(1)),
    );
}

/// Cluster DNS over UDP in nftables mode: 400 queries from fresh ports reach four dnsmasq
/// pods 100 each, at the ClusterIP (IPv4 and IPv6), a node port and an external IP, from
/// outside the node, Calico and flannel pods and the node itself; dig over UDP and TCP.
#[test]
fn udp_dns_reaches_every_pod_in_turn_at_every_address_from_every_wiring() {
    let names = ["dns-1", "dns-2", "dns-3", "dns-4"];
    let mut lab = Lab::new(&names);
    for i in 1..=4 {
        lab.start_dns(i);
    }
    lab.add_calico_client("calico");
    lab.add_bridge_client("flannel");
    route_default(&lab);
    let outside = serde_json::json!({"nodePort": true, "externalIPs": ["10.97.0.53"]});
    let state = dns_service_with("dns4", "10.96.0.10", 4, false, outside)
        + &dns_service("dns6", "fd00:96::10", 4, true)
        + &dns_service("empty", "10.96.0.11", 0, false);
    lab.write_state(&state);
    lab.start_carousel();
    let each: Vec<(String, u64)> = (1..=4).map(|i| (format!("10.244.{i}.2"), 100)).collect();
    for (role, host, port) in [
        ("client", "10.96.0.10", 53),
        ("client", "fd00:96::10", 53),
        ("client", "10.0.0.1", 30053),
        ("client", "10.97.0.53", 53),
        ("calico", "10.96.0.10", 53),
        ("calico", "fd00:96::10", 53),
        ("flannel", "10.96.0.10", 53),
        ("node", "10.96.0.10", 53),
    ] {
        let (seen, errors) = lab.dns_spread(role, host, port, 400);
        assert_eq!(
            (&seen, errors),
            (&each, 0),
            "400 queries from {role} to {host}:{port}:\n{}",
            lab.log()
        );
    }
    // A real resolver, over UDP, and over TCP to port 53/TCP of the same Service.
    for transport in ["+notcp", "+tcp"] {
        let out = run(lab.in_ns("client", "dig").args([
            "+short",
            "+tries=1",
            "+time=2",
            transport,
            "@10.96.0.10",
            "who.test",
        ]));
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(answer.starts_with("10.244."), "dig {transport}: {answer:?}");
    }
    // A UDP port without endpoints answers ICMP port unreachable, as kube-proxy's does.
    let out = run(lab
        .in_ns("client", "python3")
        .env("AGENT_TIMEOUT", "2")
        .args([AGENT, "dns", "10.96.0.11", "53", "1"]));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["errors"], 1, "{answer}");
    assert!(
        answer["last_error"].as_str().unwrap().contains("refused"),
        "{answer}"
    );
}

/// UDP in nftables mode keeps the Service's balancing: weights 3:1 by pod label give the
/// two custom pods 150 of 400 queries each, and ClientIP affinity keeps every client
/// address on one pod across its flows while new clients are still spread.
#[test]
fn udp_weights_and_client_ip_affinity_hold_in_nftables_mode() {
    let names = ["dns-1", "dns-2", "dns-3", "dns-4"];
    let mut lab = Lab::new(&names);
    for i in 1..=4 {
        lab.start_dns(i);
    }
    let weighted = serde_json::json!({"annotations": {
        "carousel.dev/load-balancer": "weighted-round-robin",
        "carousel.dev/weights": "version=custom:3,version=original:1",
    }});
    let sticky = serde_json::json!({"sessionAffinity": "ClientIP"});
    let mut state = dns_service_with("canary", "10.96.0.12", 4, false, weighted)
        + &dns_service_with("sticky", "10.96.0.13", 4, false, sticky);
    for i in 1..=4 {
        let version = if i <= 2 { "custom" } else { "original" };
        state += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: dns-{i}, namespace: kube-system, labels: {{version: {version}}}}}\n"
        );
    }
    lab.write_state(&state);
    lab.start_carousel();

    let (seen, errors) = lab.dns_spread("client", "10.96.0.12", 53, 400);
    let want: Vec<(String, u64)> = [150, 150, 50, 50]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("10.244.{}.2", i + 1), *n))
        .collect();
    assert_eq!((seen, errors), (want, 0), "{}", lab.log());

    let sources: Vec<String> = (0..CLIENTS).map(|i| format!("10.0.0.{}", i + 2)).collect();
    let mut agent = lab.in_ns("client", "python3");
    agent
        .env("AGENT_TIMEOUT", "2")
        .args([
            AGENT,
            "dns",
            "10.96.0.13",
            "53",
            &(10 * CLIENTS).to_string(),
        ])
        .args(&sources);
    let answer: Value = serde_json::from_slice(&run(&mut agent).stdout).unwrap();
    assert!(
        each_client_on_one_pod(&answer) > 1,
        "new clients are still balanced: {answer}"
    );
}
