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
    assert!(stdout.contains("/metrics"));
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
