//! `carousel status`, the binary as a user runs it, against a carousel running in this
//! process on real sockets: Services on 127.58.x.1, pods on 127.58.x.10+ and [::1].

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use carousel::lab::backend::{ask, Pod};
use carousel::status::{self, State};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_carousel");
const ASK: Duration = Duration::from_secs(5);

/// Pod names as long as Deployments and StatefulSets make them.
const LONG_V4: &str = "checkout-service-canary-with-a-long-deployment-name-7d4b9c8f6d-x2x9z";
const LONG_V6: &str = "checkout-service-ipv6-only-replica-with-a-long-name-5f6c8b7a9e-q8w7e";
const REFUSING: &str = "refuses-every-connection";

/// `carousel status ARGS`, bounded in time.
async fn status_binary(args: &[&str]) -> Output {
    tokio::time::timeout(
        PATIENCE,
        Command::new(BIN)
            .arg("status")
            .args(args)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("carousel status ends by itself")
    .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The block of `text` (tables are a blank line apart) whose title starts with `title`.
fn block<'a>(text: &'a str, title: &str) -> &'a str {
    text.split("\n\n")
        .find(|b| b.starts_with(title))
        .unwrap_or_else(|| panic!("no {title} in:\n{text}"))
}

async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

/// The value of `name{label}` in `carousel`'s /metrics now.
async fn read(carousel: &Carousel, name: &str, label: (&str, &str)) -> Option<f64> {
    metric(&carousel.metrics_text().await, name, &[label])
}

async fn pod(name: &str, addr: &str) -> Pod {
    Pod::start(name, addr.parse().unwrap()).await.unwrap()
}

/// One Service with a long-named pod, an IPv6 pod and a pod that refuses connections,
/// and a second whose one pod starts terminating while a connection to it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_long_names_ipv6_ejected_and_draining_pods_in_whole_tables() {
    let v4 = pod(LONG_V4, "127.58.1.10:0").await;
    let v6 = pod(LONG_V6, "[::1]:0").await;
    let refusing = refusing_addr("127.58.1.12").await;
    let web = Svc::new(
        "web",
        "127.58.1.1",
        8080,
        vec![
            Ep::ready(v4.addr, LONG_V4),
            Ep::ready(v6.addr, LONG_V6),
            Ep::ready(refusing, REFUSING),
        ],
    );
    let (leaving, _leaving_task) = echo_server("127.58.2.10").await;
    let (staying, _staying_task) = echo_server("127.58.2.11").await;
    let drain = |leaving_ep: Ep| {
        Svc::new(
            "drain",
            "127.58.2.1",
            8080,
            vec![leaving_ep, Ep::ready(staying, "staying")],
        )
    };
    let yaml = state_yaml(&[
        web.clone(),
        Svc::new(
            "drain",
            "127.58.2.1",
            8080,
            vec![Ep::ready(leaving, "leaving")],
        ),
    ]);
    let carousel = Carousel::start(&yaml).await;
    // A connection to the pod that is about to terminate, held open across the change.
    let mut held = TcpStream::connect("127.58.2.1:8080").await.unwrap();
    echo_once(&mut held, b"before").await;
    carousel.write_state(&state_yaml(&[
        web.clone(),
        drain(Ep::terminating(leaving, "leaving", true)),
    ]));
    eventually("the terminating pod's weight is 0", || async {
        read(&carousel, "carousel_endpoint_weight", ("pod", "leaving")).await == Some(0.0)
    })
    .await;

    // The refusing pod is passed over (its connects fail and eject it) until a read of
    // status finds it ejected: each ejection lasts 0.5 s at first, longer on each
    // failure in a row.
    let url = format!("{}", carousel.metrics);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let text = loop {
        for _ in 0..3 {
            let answer = ask("127.0.0.1".parse().unwrap(), web.addr(), ASK).await;
            assert!(
                matches!(answer.as_deref(), Ok(LONG_V4 | LONG_V6)),
                "{answer:?}"
            );
        }
        let out = status_binary(&["--metrics-url", &url]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let row = text.lines().find(|l| l.contains(REFUSING));
        if row.is_some_and(|r| r.contains("| ejected (")) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusing pod never showed as ejected:\n{text}"
        );
    };

    let table = block(&text, "test/web port web  fairness");
    let lines: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with('|') || l.starts_with('+'))
        .collect();
    assert_eq!(
        lines.len(),
        1 + 1 + 1 + 3 + 1,
        "borders, header and 3 rows:\n{table}"
    );
    let width = lines[0].chars().count();
    assert!(
        lines.iter().all(|l| l.chars().count() == width),
        "every line of the table is as wide:\n{table}"
    );
    let row = |pod: &str| lines.iter().find(|l| l.contains(pod)).copied();
    let v4_row = row(LONG_V4).expect("the long name whole, on one line");
    assert!(v4_row.contains(&v4.addr.to_string()), "{v4_row}");
    assert!(v4_row.contains("| active "), "{v4_row}");
    let v6_row = row(LONG_V6).expect("the IPv6 pod's name whole");
    assert!(
        v6_row.contains(&format!("[::1]:{}", v6.addr.port())),
        "{v6_row}"
    );
    assert!(v6_row.contains("| active "), "{v6_row}");
    let refusing_row = row(REFUSING).unwrap();
    assert!(
        refusing_row.contains(&refusing.to_string()),
        "{refusing_row}"
    );
    assert!(refusing_row.contains("s left) |"), "{refusing_row}");

    let drained = block(&text, "test/drain port web");
    let leaving_row = drained
        .lines()
        .find(|l| l.contains("| leaving "))
        .unwrap_or_else(|| panic!("{drained}"));
    let cells: Vec<&str> = leaving_row.split('|').map(str::trim).collect();
    // | pod | endpoint | state | weight | active | total | share |
    let endpoint = leaving.to_string();
    assert_eq!(
        cells[1..6],
        ["leaving", endpoint.as_str(), "draining", "0", "1"],
        "{drained}"
    );

    // The same in the model, and the gauge behind "ejected".
    let snapshot = status::snapshot(&url.parse().unwrap()).await.unwrap();
    let web_status = snapshot
        .services
        .iter()
        .find(|s| s.service == "web")
        .unwrap();
    let refused = web_status.pods.iter().find(|p| p.pod == REFUSING).unwrap();
    // Ejected still, or over by now: never anything else.
    match refused.state {
        State::Ejected => {
            let left = refused.ejected_seconds_left.unwrap();
            assert!(left > 0.0 && left <= 30.0, "{refused:?}");
        }
        state => assert_eq!(state, State::Active, "{refused:?}"),
    }
    let metrics = carousel.metrics_text().await;
    let until = |pod| {
        metric(
            &metrics,
            "carousel_endpoint_ejected_until_seconds",
            &[("pod", pod)],
        )
    };
    assert_eq!(until(LONG_V4), Some(0.0), "a pod never ejected");
    assert!(until(REFUSING).unwrap() > 1.7e9, "a unix time");
    drop(held);
    carousel.stop().await;
}

/// Right after start one pick over four pods reads 0.25: a dash until the window holds
/// ten picks per pod, the index after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fairness_is_hidden_until_the_window_holds_enough_picks() {
    let pods = pods(&["fair-a", "fair-b", "fair-c", "fair-d"]).await;
    let svc = Svc::new(
        "fair",
        "127.58.3.1",
        8080,
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect(),
    );
    let carousel = Carousel::start(&svc.state()).await;
    let url: status::MetricsUrl = format!("http://{}/metrics", carousel.metrics)
        .parse()
        .unwrap();
    let local = "127.0.0.1".parse().unwrap();
    ask(local, svc.addr(), ASK).await.unwrap();
    let window = || {
        read(
            &carousel,
            "carousel_fairness_window_picks",
            ("service", "fair"),
        )
    };
    eventually("the fairness gauge has the first pick", || async {
        window().await == Some(1.0)
    })
    .await;
    let early = status::snapshot(&url).await.unwrap();
    let fair = &early.services[0];
    let fairness = fair.fairness.as_ref().unwrap();
    assert_eq!(fairness.jain, 0.25, "one pick over four pods: {fair:?}");
    assert_eq!(
        (fairness.window_picks, fairness.meaningful),
        (Some(1), false)
    );
    assert_eq!(fair.shown_fairness(), None);
    let out = status_binary(&["--metrics-url", &url.to_string()]).await;
    assert!(
        stdout(&out).contains("test/fair port web  fairness — (1 recent pick, shown from 10)"),
        "{}",
        stdout(&out)
    );

    for _ in 0..40 {
        ask(local, svc.addr(), ASK).await.unwrap();
    }
    eventually("the window holds the new picks", || async {
        window().await.is_some_and(|n| n >= 40.0)
    })
    .await;
    let later = status::snapshot(&url).await.unwrap();
    let fair = &later.services[0];
    assert_eq!(fair.fairness.as_ref().unwrap().needed_picks, 40);
    let shown = fair.shown_fairness().expect("shown from 40 picks");
    assert!(shown > 0.99, "round-robin: {fair:?}");
    let out = status_binary(&["--metrics-url", &url.to_string()]).await;
    let text = stdout(&out);
    let title = text.lines().next().unwrap();
    assert!(
        title.starts_with("test/fair port web  fairness ")
            && !title.contains('—')
            && title.contains(" recent picks)"),
        "{text}"
    );
    carousel.stop().await;
}

/// `-o json` is the model as one document, with the numbers /metrics has.
#[tokio::test]
async fn json_output_matches_the_metrics() {
    let pods = pods(&["json-a", "json-b"]).await;
    let svc = Svc::new(
        "json",
        "127.58.4.1",
        8080,
        pods.iter().map(|p| Ep::ready(p.addr, &p.name)).collect(),
    );
    let carousel = Carousel::start(&svc.state()).await;
    let local = "127.0.0.1".parse().unwrap();
    for _ in 0..5 {
        ask(local, svc.addr(), ASK).await.unwrap();
    }
    let url = format!("http://{}/metrics", carousel.metrics);
    let out = status_binary(&["--metrics-url", &url, "-o", "json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = carousel.metrics_text().await;
    assert_eq!(json["metrics_url"], url);
    assert!(json["time"].as_f64().unwrap() > 1.7e9);
    let services = json["services"].as_array().unwrap();
    assert_eq!(services.len(), 1);
    let s = &services[0];
    assert_eq!(s["namespace"], "test");
    assert_eq!(s["service"], "json");
    assert_eq!(s["port"], "web");
    assert_eq!(s["protocol"], "TCP");
    let pods_json = s["pods"].as_array().unwrap();
    assert_eq!(pods_json.len(), 2);
    let mut total = 0.0;
    for p in pods_json {
        let pod = p["pod"].as_str().unwrap();
        let labels = [("service", "json"), ("pod", pod)];
        let ok = metric(
            &text,
            "carousel_connections_total",
            &[labels[0], labels[1], ("outcome", "ok")],
        )
        .unwrap();
        assert_eq!(p["total"].as_f64(), Some(ok), "{p}");
        assert_eq!(
            p["active"].as_f64(),
            metric(&text, "carousel_connections_active", &labels),
            "{p}"
        );
        assert_eq!(
            p["weight"].as_f64(),
            metric(&text, "carousel_endpoint_weight", &labels),
            "{p}"
        );
        assert_eq!(p["state"], "active");
        assert_eq!(p["ejected_seconds_left"], serde_json::Value::Null);
        total += ok;
    }
    assert_eq!(total, 5.0);
    let shares: f64 = pods_json.iter().map(|p| p["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{s}");
    carousel.stop().await;
}

/// `--watch` prints a snapshot per interval, a blank line apart when not on a terminal,
/// until Ctrl-C, which ends it with status 0.
#[tokio::test]
async fn watch_prints_snapshot_after_snapshot_until_ctrl_c() {
    let pods = pods(&["watched"]).await;
    let svc = Svc::new(
        "watch",
        "127.58.5.1",
        8080,
        vec![Ep::ready(pods[0].addr, "watched")],
    );
    let carousel = Carousel::start(&svc.state()).await;
    ask("127.0.0.1".parse().unwrap(), svc.addr(), ASK)
        .await
        .unwrap();
    let authority = carousel.metrics.to_string();
    let mut child = Command::new(BIN)
        .args(["status", "--metrics-url", &authority, "--watch", "200ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let header = format!("Every 200ms: http://{authority}/metrics  ");
    tokio::time::timeout(PATIENCE, async {
        while seen
            .iter()
            .filter(|l: &&String| l.starts_with(&header))
            .count()
            < 3
        {
            seen.push(lines.next_line().await.unwrap().expect("more snapshots"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than three snapshots:\n{}", seen.join("\n")));
    let all = seen.join("\n");
    let first = all.find(&header).unwrap();
    let second = first + 1 + all[first + 1..].find(&header).unwrap();
    assert!(
        all[first..second].contains("| watched "),
        "a whole snapshot:\n{all}"
    );
    assert!(
        all[..second].ends_with("\n\n\n"),
        "the table's own blank line, then the one between snapshots:\n{all:?}"
    );
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("Ctrl-C ends the watch")
        .unwrap();
    assert!(status.success(), "{status}");
    carousel.stop().await;
}

/// Nothing listens: one line and status 1; with `--watch` it says so and keeps trying.
/// A URL status cannot use is a usage error (status 2).
#[tokio::test]
async fn an_unreachable_carousel_is_one_line_and_status_1_or_retried_when_watching() {
    let dead = refusing_addr("127.58.6.1").await.to_string();
    let out = status_binary(&["--metrics-url", &dead]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("Error: cannot read http://{dead}/metrics: ")),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    assert!(out.stdout.is_empty());

    let mut child = Command::new(BIN)
        .args(["status", "--metrics-url", &dead, "--watch", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for _ in 0..2 {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("an error line per attempt")
            .unwrap()
            .expect("still running");
        assert!(line.starts_with("Error: cannot read "), "{line}");
    }
    assert!(child.try_wait().unwrap().is_none(), "still trying");
    child.kill().await.unwrap();

    for (url, says) in [
        ("https://127.0.0.1:10249/metrics", "plain HTTP"),
        ("::1:10249", "in brackets"),
    ] {
        let out = status_binary(&["--metrics-url", url]).await;
        assert_eq!(out.status.code(), Some(2), "{url}: {out:?}");
        assert!(stderr(&out).contains(says), "{url}: {}", stderr(&out));
    }
    let out = status_binary(&["--watch", "1ms"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("shorter than 100ms"),
        "{}",
        stderr(&out)
    );
}
