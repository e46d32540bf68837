//! The `carousel` binary as a user runs it: `run --from-file`, `demo`, and a bad file.

mod common;

use std::process::Stdio;
use std::time::Duration;

use carousel::lab::backend::{ask, Pod};
use common::*;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_carousel");

#[tokio::test]
async fn run_serves_a_state_file_and_exits_cleanly_on_sigterm() {
    let pod = Pod::start("solo", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let svc = Svc::new(
        "cli",
        "127.99.20.1",
        8080,
        vec![Ep::ready(pod.addr, "solo")],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(&state, svc.state()).unwrap();

    let mut child = Command::new(BIN)
        .args(["run", "--from-file"])
        .arg(&state)
        .args([
            "--metrics-bind-address",
            "127.99.20.2:10249",
            "--healthz-bind-address",
            "127.99.20.2:10256",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = "127.99.20.2:10256".parse().unwrap();
    eventually("carousel reports healthy", || async {
        matches!(http_get(health, "/healthz").await, Ok((200, _)))
    })
    .await;

    assert_eq!(
        ask(
            "127.0.0.1".parse().unwrap(),
            svc.addr(),
            Duration::from_secs(5)
        )
        .await
        .unwrap(),
        "solo"
    );
    let (status, body) = http_get("127.99.20.2:10249".parse().unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(r#"pod="solo",outcome="ok"} 1"#), "{body}");

    sigterm_and_expect_a_clean_exit(&mut child).await;
}

#[tokio::test]
async fn a_bad_first_state_file_is_refused_naming_document_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    let svc = Svc::new("bad", "127.99.21.1", 8080, Vec::new());
    std::fs::write(
        &state,
        state_yaml(&[svc]).replace("port: 8080", "port: 99999"),
    )
    .unwrap();

    let out = Command::new(BIN)
        .args([
            "run",
            "--metrics-bind-address",
            "127.99.21.2:10249",
            "--healthz-bind-address",
            "127.99.21.2:10256",
            "--from-file",
        ])
        .arg(&state)
        .output()
        .await
        .unwrap();

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("document 1 (Service bad): spec.ports[0].port: 99999 is not a port"),
        "{stderr}"
    );
    // Said once, on one line, and with no colour codes in a pipe (`kubectl logs`).
    assert_eq!(stderr.matches("is not a port").count(), 1, "{stderr}");
    assert!(
        stderr.contains(" INFO carousel: carousel starting version="),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

#[tokio::test]
async fn demo_runs_by_itself_and_shows_the_round_robin_split() {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .args(["demo", "--connections", "400"])
            .output(),
    )
    .await
    .expect("the demo ends by itself")
    .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round_robin = stdout
        .split("== ")
        .find(|s| s.starts_with("round-robin"))
        .expect("a round-robin phase");
    for pod in [
        "kubechaos-original-7d4b9-a1",
        "kubechaos-original-7d4b9-b2",
        "kubechaos-custom-5f6c8-c3",
        "kubechaos-custom-5f6c8-d4",
    ] {
        let line = round_robin.lines().find(|l| l.contains(pod)).expect(pod);
        assert!(line.contains(" 100 ") && line.contains("25.0%"), "{line}");
    }
    // One kept connection reaches one pod with all 400 requests; 400 connections of one
    // request each rotate over the four; and the demo says why.
    let keepalive = stdout
        .split("== ")
        .find(|s| s.starts_with("keep-alive"))
        .expect("a keep-alive phase");
    let (kept, rotating) = keepalive
        .split_once("400 connections, one request each")
        .expect("both halves of the keep-alive phase");
    let shares: Vec<&str> = kept
        .lines()
        .filter(|l| l.contains("kubechaos-"))
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    let mut sorted = shares.clone();
    sorted.sort();
    assert_eq!(sorted, ["0.0%", "0.0%", "0.0%", "100.0%"], "{kept}");
    let rotated = rotating
        .lines()
        .filter(|l| l.contains("kubechaos-") && l.contains(" 100 ") && l.contains("25.0%"))
        .count();
    assert_eq!(rotated, 4, "{rotating}");
    assert!(
        rotating.contains("balances connections, not requests")
            && rotating.contains("Connection: close"),
        "{rotating}"
    );
    let canary = stdout
        .split("== ")
        .find(|s| s.starts_with("canary 3:1"))
        .expect("a canary phase");
    for (pod, share) in [
        ("kubechaos-original-7d4b9-a1", "12.5%"),
        ("kubechaos-custom-5f6c8-c3", "37.5%"),
    ] {
        let line = canary.lines().find(|l| l.contains(pod)).expect(pod);
        assert!(line.contains(share), "{line}");
    }
    let affinity = stdout
        .split("== ")
        .find(|s| s.starts_with("ClientIP affinity"))
        .expect("an affinity phase");
    let clients: Vec<&str> = affinity
        .lines()
        .filter(|l| l.trim_start().starts_with("127.77.2."))
        .collect();
    assert_eq!(clients.len(), 8, "{affinity}");
    assert!(
        clients.iter().all(|l| !l.contains(',')),
        "each client stays on one pod:\n{affinity}"
    );
    assert!(stdout.contains("/metrics"));
}

/// A carousel binary on a state file with one echo pod, its health port, and the Service.
struct Running {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    health: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    service: std::net::SocketAddr,
}

async fn start_binary(
    net: u8,
    echo: std::net::SocketAddr,
    extra: &[&str],
    wrap: Option<&str>,
) -> Running {
    let svc = Svc::new(
        "bin",
        &format!("127.97.{net}.1"),
        8080,
        vec![Ep::ready(echo, "echo")],
    );
    start_serving(net, &[svc], extra, wrap).await
}

/// Starts the binary on a state file of `services`, with its health and metrics servers
/// on 127.97.`net`.2; `service` is the first Service's address.
async fn start_serving(net: u8, services: &[Svc], extra: &[&str], wrap: Option<&str>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(&state, state_yaml(services)).unwrap();
    let (health, metrics) = (
        format!("127.97.{net}.2:10256"),
        format!("127.97.{net}.2:10249"),
    );
    let mut args: Vec<String> = vec![
        "run".into(),
        "--from-file".into(),
        state.display().to_string(),
    ];
    args.extend([
        "--healthz-bind-address".into(),
        health.clone(),
        "--metrics-bind-address".into(),
        metrics.clone(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = match wrap {
        // e.g. `ulimit -n 40 && exec "$0" "$@"`: the limit applies to carousel alone.
        Some(script) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(script).arg(BIN).args(&args);
            c
        }
        None => {
            let mut c = Command::new(BIN);
            c.args(&args);
            c
        }
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let running = Running {
        child,
        _dir: dir,
        state,
        health: health.parse().unwrap(),
        metrics: metrics.parse().unwrap(),
        service: services[0].addr(),
    };
    eventually("carousel is ready", || async {
        matches!(http_get(running.health, "/readyz").await, Ok((200, _)))
    })
    .await;
    running
}

impl Running {
    async fn metrics_text(&self) -> String {
        let (status, text) = http_get(self.metrics, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        text
    }

    async fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("still running").to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .await
            .unwrap()
            .success());
    }
}

async fn echo_once(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

#[tokio::test]
async fn sigterm_stops_accepting_reports_not_ready_and_drains_then_exits_zero() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let mut c = start_binary(1, echo, &[], None).await;
    let mut open = tokio::net::TcpStream::connect(c.service).await.unwrap();
    echo_once(&mut open, b"before").await;

    c.signal("-TERM").await;
    eventually("/readyz turns 503", || async {
        matches!(http_get(c.health, "/readyz").await, Ok((503, _)))
    })
    .await;
    eventually("the listener is closed", || async {
        tokio::net::TcpStream::connect(c.service).await.is_err()
    })
    .await;
    echo_once(&mut open, b"during the drain").await;
    assert!(
        c.child.try_wait().unwrap().is_none(),
        "still draining while a connection is open"
    );

    drop(open);
    let status = tokio::time::timeout(PATIENCE, c.child.wait())
        .await
        .expect("exits once drained")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// An echo pod that reports how each of its connections ended: `Ok(())` at a clean
/// end of stream, the error kind otherwise.
async fn recording_echo() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), std::io::ErrorKind>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let ended = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            if let Err(e) = s.write_all(&buf[..n]).await {
                                break Err(e.kind());
                            }
                        }
                        Err(e) => break Err(e.kind()),
                    }
                };
                let _ = tx.send(ended);
            });
        }
    });
    (addr, rx)
}

/// What a client that reads to the end sees next on `s`.
async fn read_end(s: &mut tokio::net::TcpStream) -> Result<usize, std::io::ErrorKind> {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("the connection ends")
        .map_err(|e| e.kind())
}

#[tokio::test]
async fn a_second_signal_or_the_drain_timeout_resets_what_is_open_and_exits_non_zero() {
    use std::io::ErrorKind::ConnectionReset;
    let (pod, mut ended) = recording_echo().await;
    let mut twice = start_binary(2, pod, &[], None).await;
    let mut open = tokio::net::TcpStream::connect(twice.service).await.unwrap();
    echo_once(&mut open, b"x").await;
    twice.signal("-TERM").await;
    eventually("/readyz turns 503", || async {
        matches!(http_get(twice.health, "/readyz").await, Ok((503, _)))
    })
    .await;
    twice.signal("-TERM").await;
    let status = tokio::time::timeout(PATIENCE, twice.child.wait())
        .await
        .expect("exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(1), "a cut drain is a failure: {status}");
    // Neither side may take the cut transfer for a complete one.
    assert_eq!(read_end(&mut open).await, Err(ConnectionReset));
    assert_eq!(ended.recv().await, Some(Err(ConnectionReset)));

    let mut timed = start_binary(3, pod, &["--drain-timeout", "300ms"], None).await;
    let mut open = tokio::net::TcpStream::connect(timed.service).await.unwrap();
    echo_once(&mut open, b"y").await;
    timed.signal("-TERM").await;
    let status = tokio::time::timeout(PATIENCE, timed.child.wait())
        .await
        .expect("exits at the drain timeout")
        .unwrap();
    assert_eq!(status.code(), Some(1), "a cut drain is a failure: {status}");
    assert_eq!(read_end(&mut open).await, Err(ConnectionReset));
    assert_eq!(ended.recv().await, Some(Err(ConnectionReset)));
}

#[tokio::test]
async fn sighup_sigquit_and_the_user_signals_drain_as_sigterm_does() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    for (net, sig) in [(5, "-HUP"), (6, "-QUIT"), (7, "-USR1"), (8, "-USR2")] {
        let mut c = start_binary(net, echo, &[], None).await;
        let mut open = tokio::net::TcpStream::connect(c.service).await.unwrap();
        echo_once(&mut open, b"before").await;
        c.signal(sig).await;
        eventually("/readyz turns 503", || async {
            matches!(http_get(c.health, "/readyz").await, Ok((503, _)))
        })
        .await;
        echo_once(&mut open, b"during the drain").await;
        assert!(
            c.child.try_wait().unwrap().is_none(),
            "{sig}: still draining"
        );
        drop(open);
        let status = tokio::time::timeout(PATIENCE, c.child.wait())
            .await
            .expect("exits once drained")
            .unwrap();
        assert!(status.success(), "{sig}: {status}");
    }
}

#[tokio::test]
async fn idle_telemetry_clients_cannot_take_the_data_paths_descriptors() {
    use tokio::io::AsyncReadExt;
    let (echo, _task) = echo_server("127.0.0.1").await;
    let c = start_binary(9, echo, &[], Some(r#"ulimit -n 256 && exec "$0" "$@""#)).await;
    // More idle connections to the health and metrics ports than carousel has
    // descriptors: each sends nothing, as a slowloris client does.
    let mut idle = Vec::new();
    for addr in [c.health, c.metrics] {
        for _ in 0..200 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
    }
    let mut s = tokio::net::TcpStream::connect(c.service).await.unwrap();
    tokio::time::timeout(PATIENCE, echo_once(&mut s, b"still served"))
        .await
        .expect("the data path still accepts and connects");
    // Past the cap they are closed at once; the rest once the header timeout passes.
    let deadline = carousel::telemetry::HEADER_TIMEOUT + PATIENCE;
    for s in &mut idle {
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(deadline, s.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "an idle telemetry connection stays open");
    }
    assert!(matches!(http_get(c.health, "/healthz").await, Ok((200, _))));
}

#[tokio::test]
async fn descriptor_exhaustion_backs_off_and_recovers() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    let c = start_binary(4, echo, &[], Some(r#"ulimit -n 48 && exec "$0" "$@""#)).await;

    // Far more connections than 48 descriptors allow: carousel runs out while accepting.
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(c.service),
        )
        .await
        {
            held.push(s);
        }
    }
    // Out of descriptors for a second: the accept loop must rest, not spin.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(held);

    // Descriptors free up: new connections work again, and the process never died.
    eventually("new connections are served again", || async {
        let Ok(mut s) = tokio::net::TcpStream::connect(c.service).await else {
            return false;
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut got = [0u8; 2];
        s.write_all(b"ok").await.is_ok() && s.read_exact(&mut got).await.is_ok()
    })
    .await;
    let (status, text) = http_get(c.metrics, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let errors: f64 = text
        .lines()
        .find(|l| l.starts_with("carousel_accept_errors_total "))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .expect("accept errors are counted");
    // Each failed accept rests 100 ms: a few seconds of exhaustion on two listeners can
    // count a few dozen; a busy loop would count hundreds of thousands.
    assert!((1.0..=200.0).contains(&errors), "accept errors: {errors}");
}

#[tokio::test]
async fn a_weights_annotation_of_ten_thousand_bad_entries_costs_one_bounded_log_line() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    // 169 KB, under Kubernetes' limit for annotations: once 10 000 warnings, each with
    // the whole value (1.69 GB of log, 3.57 GB resident).
    let value = vec!["version=custom:x"; 10_000].join(",");
    let mut svc = Svc::new("huge", "127.97.11.1", 8080, vec![Ep::ready(echo, "echo")]);
    svc.annotations
        .push(("carousel.dev/weights".into(), value.clone()));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("carousel.log");
    let wrap = format!(r#"exec "$0" "$@" 2>{}"#, log.display());
    let c = start_serving(11, &[svc], &[], Some(&wrap)).await;
    let mut s = tokio::net::TcpStream::connect(c.service).await.unwrap();
    tokio::time::timeout(
        PATIENCE,
        echo_once(&mut s, b"weights ignored, still served"),
    )
    .await
    .expect("served");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("carousel.dev/weights"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("over the limit of 4096"), "{}", lines[0]);
    assert!(text.len() < 16 * 1024, "{} bytes of log", text.len());
    let errors = metric(&c.metrics_text().await, "carousel_config_errors_total", &[]);
    assert_eq!(errors, Some(1.0));
}

#[tokio::test]
async fn an_unknown_field_warns_and_a_bad_enum_in_a_later_version_is_refused_keeping_the_old_state()
{
    let (echo, _task) = echo_server("127.0.0.1").await;
    let mut svc = Svc::new("typo", "127.97.12.1", 8080, vec![Ep::ready(echo, "echo")]);
    svc.spec.push("sesionAffinity: ClientIP".into());
    let endpoints =
        "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: typo, namespace: test}\n";
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("carousel.log");
    let wrap = format!(r#"exec "$0" "$@" 2>{}"#, log.display());
    let c = start_serving(12, std::slice::from_ref(&svc), &[], Some(&wrap)).await;
    // A second good version adds a v1 Endpoints object: that is logged, and the unknown
    // field, which is not new, is not logged again.
    let good = format!("{}{endpoints}", svc.state());
    replace_file(&c.state, &good);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the v1 Endpoints object is reported", || async {
        log_text().contains("objects of kind v1 Endpoints are ignored")
    })
    .await;
    let text = log_text();
    let warning = "document 1 (Service test/typo): unknown field spec.sesionAffinity, ignored";
    assert!(
        text.lines()
            .any(|l| l.contains(" WARN ") && l.contains(warning)),
        "{text}"
    );
    // Logged once, not again for the second version that has it too.
    assert_eq!(text.matches(warning).count(), 1, "{text}");
    assert!(
        text.contains("write them as discovery.k8s.io/v1 EndpointSlice objects instead (see docs/state-file.md)"),
        "{text}"
    );
    let mut s = tokio::net::TcpStream::connect(c.service).await.unwrap();
    tokio::time::timeout(PATIENCE, echo_once(&mut s, b"served despite the typo"))
        .await
        .expect("served");
    // The unknown field counts as a configuration error.
    let errors = || async { metric(&c.metrics_text().await, "carousel_config_errors_total", &[]) };
    assert_eq!(errors().await, Some(1.0));

    let bad = good.replace("sesionAffinity: ClientIP", "sessionAffinity: ClientIp");
    replace_file(&c.state, &bad);
    eventually("the bad version is refused and counted", || async {
        errors().await == Some(2.0)
    })
    .await;
    let text = log_text();
    let refusal = text
        .lines()
        .find(|l| l.contains("state file refused"))
        .unwrap_or_else(|| panic!("no refusal in {text}"));
    assert!(
        refusal.contains(
            r#"state file refused, keeping the last good state: document 1 (Service typo): spec.sessionAffinity: Unsupported value: "ClientIp": supported values: "ClientIP", "None""#
        ),
        "{refusal}"
    );
    // The old Service still forwards, on the open connection and on a new one.
    echo_once(&mut s, b"still served").await;
    let mut again = tokio::net::TcpStream::connect(c.service).await.unwrap();
    tokio::time::timeout(PATIENCE, echo_once(&mut again, b"and to a new connection"))
        .await
        .expect("served after the refusal");
}

/// Replaces the file whole, by a rename, as an editor or `kubectl get > tmp; mv` does.
fn replace_file(path: &std::path::Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

#[tokio::test]
async fn a_first_state_file_with_a_bad_enum_value_exits_1_naming_the_field_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    let mut svc = Svc::new("sticky", "127.99.22.1", 8080, Vec::new());
    svc.spec.push("sessionAffinity: ClientIp".into());
    std::fs::write(&state, svc.state()).unwrap();

    let out = Command::new(BIN)
        .args([
            "run",
            "--metrics-bind-address",
            "127.99.22.2:10249",
            "--healthz-bind-address",
            "127.99.22.2:10256",
            "--from-file",
        ])
        .arg(&state)
        .output()
        .await
        .unwrap();

    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("sessionAffinity"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(
            r#"document 1 (Service sticky): spec.sessionAffinity: Unsupported value: "ClientIp": supported values: "ClientIP", "None""#
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn past_half_the_descriptor_limit_bind_mode_refuses_listeners_by_count_and_keeps_serving() {
    let (echo, _task) = echo_server("127.0.0.1").await;
    // 2 000 Service addresses under a limit of 1 024 descriptors: once, every descriptor
    // went to listeners, and then the health and metrics servers, the state file and
    // SIGTERM all stopped working. Listeners may take half the limit.
    let services: Vec<Svc> = (0..2000)
        .map(|i| {
            let ip = format!("127.96.{}.{}", i / 200, 1 + i % 200);
            Svc::new(&format!("s{i}"), &ip, 80, vec![Ep::ready(echo, "echo")])
        })
        .collect();
    let mut c = start_serving(
        10,
        &services,
        &[],
        Some(r#"ulimit -n 1024 && exec "$0" "$@""#),
    )
    .await;
    let refused = |text: &str| metric(text, "carousel_listeners_refused", &[]);
    let text = c.metrics_text().await;
    assert_eq!(refused(&text), Some(1488.0), "{text}");
    // The first addresses are served; the health server answers.
    let mut s = tokio::net::TcpStream::connect(c.service).await.unwrap();
    tokio::time::timeout(PATIENCE, echo_once(&mut s, b"served"))
        .await
        .expect("the first Service is served");
    drop(s);
    assert!(matches!(http_get(c.health, "/healthz").await, Ok((200, _))));
    // The state file is still read: a smaller table, of addresses that were refused,
    // gets every listener back.
    let last = &services[1990..];
    let next = c.state.with_extension("next");
    std::fs::write(&next, state_yaml(last)).unwrap();
    std::fs::rename(&next, &c.state).unwrap();
    eventually("the refused addresses are listened on", || async {
        refused(&c.metrics_text().await) == Some(0.0)
    })
    .await;
    let mut s = tokio::net::TcpStream::connect(last[9].addr())
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, echo_once(&mut s, b"served"))
        .await
        .expect("a Service refused before is served now");
    drop(s);
    sigterm_and_expect_a_clean_exit(&mut c.child).await;
}

#[tokio::test]
async fn run_serves_a_cluster_through_a_kubeconfig() {
    let api = common::fake_apiserver::FakeApiServer::start().await;
    let _pod = Pod::start("in-cluster", "127.66.11.10:9000".parse().unwrap())
        .await
        .unwrap();
    api.apply(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "cli", "namespace": "test"},
        "spec": {"clusterIP": "127.66.11.1", "ports": [{"name": "web", "port": 8080, "targetPort": 9000}]},
    }));
    api.apply(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "cli-1", "namespace": "test", "labels": {"kubernetes.io/service-name": "cli"}},
        "addressType": "IPv4", "ports": [{"name": "web", "port": 9000}],
        "endpoints": [{"addresses": ["127.66.11.10"], "targetRef": {"kind": "Pod", "name": "in-cluster"}}],
    }));
    let mut child = Command::new(BIN)
        .args(["run", "--kubeconfig"])
        .arg(api.kubeconfig())
        .args([
            "--proxy-mode",
            "bind",
            "--metrics-bind-address",
            "127.66.11.2:10249",
            "--healthz-bind-address",
            "127.66.11.2:10256",
        ])
        .env_remove("NODE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = "127.66.11.2:10256".parse().unwrap();
    eventually("carousel reports healthy", || async {
        matches!(http_get(health, "/healthz").await, Ok((200, _)))
    })
    .await;
    let service = "127.66.11.1:8080".parse().unwrap();
    let answer = ask(
        "127.0.0.1".parse().unwrap(),
        service,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer.unwrap(), "in-cluster");

    sigterm_and_expect_a_clean_exit(&mut child).await;
}

/// An API server address where nothing listens: one warning names it and the cause,
/// however many attempts follow; `--master` without a scheme is refused at once.
#[tokio::test]
async fn a_wrong_api_address_is_named_once() {
    let dead = refusing_addr("127.66.12.1").await;
    let mut child = Command::new(BIN)
        .args(["run", "--master", &format!("http://{dead}")])
        .args([
            "--proxy-mode",
            "bind",
            "--metrics-bind-address",
            "127.66.12.2:0",
            "--healthz-bind-address",
            "127.66.12.2:0",
        ])
        .env("HOME", "/nonexistent")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Several attempts of both watches: 0, 0.4-0.8, 1.2-2.4, 2.8-5.6 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sigterm_and_expect_a_clean_exit(&mut child).await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert_eq!(warnings.len(), 1, "one line for the outage:\n{stderr}");
    assert!(
        warnings[0].contains(&dead.to_string()) && warnings[0].contains("Connection refused"),
        "the line names the server and the cause: {}",
        warnings[0]
    );

    let output = Command::new(BIN)
        .args(["run", "--master", "kubernetes-api:6443"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--master") && stderr.contains("kubernetes-api:6443"),
        "{stderr}"
    );
}

#[tokio::test]
async fn service_selector_is_refused_with_a_state_file() {
    let output = Command::new(BIN)
        .args([
            "run",
            "--from-file",
            "state.yaml",
            "--service-selector",
            "a=b",
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--service-selector"), "{stderr}");
}

/// Sends SIGTERM to `child` and checks that it exits 0 in time.
async fn sigterm_and_expect_a_clean_exit(child: &mut tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// `--log-format json`, as a log collector reads it: every line one JSON object; the
/// start-up line says version, mode and listeners; a reload says what it changed; a
/// pod that refuses every connection is logged at most once a second however many
/// connections it refuses.
#[tokio::test]
async fn json_logs_say_what_starts_what_reloads_and_bound_what_fails() {
    let refusing = refusing_addr("127.99.25.10").await;
    let dead = Svc::new(
        "dead",
        "127.99.25.1",
        8080,
        vec![Ep::ready(refusing, "dead-a")],
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.yaml");
    std::fs::write(&state, dead.state()).unwrap();
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "run", "--from-file"])
        .arg(&state)
        .args([
            "--metrics-bind-address",
            "127.99.25.2:10249",
            "--healthz-bind-address",
            "127.99.25.2:10256",
            "--connect-timeout",
            "500ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let health = "127.99.25.2:10256".parse().unwrap();
    eventually("carousel reports healthy", || async {
        matches!(http_get(health, "/healthz").await, Ok((200, _)))
    })
    .await;
    // 200 connections to a pod that refuses them all, as fast as they fail.
    let mut connected = 0;
    for _ in 0..200 {
        // Each is accepted, then reset once every pod has refused it.
        let Ok(mut s) = tokio::net::TcpStream::connect(dead.addr()).await else {
            continue;
        };
        connected += 1;
        let mut buf = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
    }
    assert!(connected >= 100, "{connected} of 200 connections accepted");
    // A reload that adds a Service.
    let extra = Svc::new("extra", "127.99.25.3", 8080, vec![Ep::ready(refusing, "x")]);
    let next = dir.path().join("next.yaml");
    std::fs::write(&next, state_yaml(&[dead, extra])).unwrap();
    std::fs::rename(&next, &state).unwrap();
    eventually("the reload is applied", || async {
        tokio::net::TcpStream::connect("127.99.25.3:8080")
            .await
            .is_ok()
    })
    .await;
    sigterm_and_expect_a_clean_exit(&mut child).await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();

    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with = |message: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .collect()
    };
    let start = with("carousel starting");
    assert_eq!(start.len(), 1, "{stderr}");
    let fields = &start[0]["fields"];
    assert_eq!(fields["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(fields["mode"], "bind");
    assert_eq!(fields["metrics"], "127.99.25.2:10249");
    assert!(start[0]["level"] == "INFO" && start[0]["timestamp"].is_string());

    let reloads = with("state file reloaded");
    assert_eq!(reloads.len(), 1, "one reload, one line:\n{stderr}");
    assert_eq!(
        reloads[0]["fields"]["message"],
        "state file reloaded: 1 Service added (test/extra), 0 changed, 0 removed; endpoints 1 -> 2"
    );

    // Bounded: a line a second per Service port at most (refusals and ejections share
    // it), each saying how many it held back.
    let refused = with("no endpoint accepted the connection");
    let ejected = with("endpoint out of rotation");
    assert!(!(refused.is_empty() && ejected.is_empty()), "{stderr}");
    assert!(
        refused.len() + ejected.len() <= 20,
        "{} lines for 200 refusals:\n{stderr}",
        refused.len() + ejected.len()
    );
    assert!(refused
        .iter()
        .chain(&ejected)
        .all(|l| l["fields"]["held_back"].is_u64()));
}
