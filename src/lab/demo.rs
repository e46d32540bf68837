//! `carousel demo`: the kubechaos example on one machine. Four in-process pods, the
//! real proxy in bind mode on 127.77.0.1:3000, and traffic through it, phase by phase:
//! round-robin, one kept-alive connection (why a browser keeps reaching one pod), the
//! 3:1 canary, and ClientIP affinity.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_yaml::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::algorithm::Algorithm;
use crate::discovery::convert::Scope;
use crate::discovery::file;
use crate::lab::backend::{self, Pod};
use crate::proxy::{self, ProxyConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Endpoints, Telemetry};

/// The state the demo runs: the same file as `deploy/examples/kubechaos-state.yaml`.
pub(crate) const STATE: &str = include_str!("../../deploy/examples/kubechaos-state.yaml");

const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1)), 3000);
const CONCURRENCY: usize = 16;
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start pod {pod} on {addr}: {source}")]
    Pod {
        pod: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the embedded state does not load: {0}")]
    State(#[from] file::StateFileError),
    #[error("cannot bind the metrics listener: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("phase {phase}: {failed} of {total} connections failed (last error: {last})")]
    Failed {
        phase: &'static str,
        failed: usize,
        total: usize,
        last: String,
    },
}

/// One step of the demo: how the Service is annotated and who the clients are.
struct Phase {
    name: &'static str,
    explain: &'static str,
    annotations: &'static [(&'static str, &'static str)],
    affinity: bool,
    clients: u8,
    /// The balancer this phase needs, when it is not always there.
    needs: Option<&'static str>,
    /// Every request on one kept connection, beside one connection per request.
    keepalive: bool,
}

const PHASES: &[Phase] = &[
    Phase {
        name: "round-robin",
        explain: "the default: each pod gets the same share",
        annotations: &[],
        affinity: false,
        clients: 1,
        needs: None,
        keepalive: false,
    },
    Phase {
        name: "keep-alive",
        explain: "why refreshing a browser keeps reaching the same pod",
        annotations: &[],
        affinity: false,
        clients: 1,
        needs: None,
        keepalive: true,
    },
    Phase {
        name: "canary 3:1",
        explain: "carousel.dev/weights: version=custom:3,version=original:1 — three quarters to custom, no replica change",
        annotations: &[
            ("carousel.dev/load-balancer", "weighted-round-robin"),
            ("carousel.dev/weights", "version=custom:3,version=original:1"),
        ],
        affinity: false,
        clients: 1,
        needs: Some("weighted-round-robin"),
        keepalive: false,
    },
    Phase {
        name: "ClientIP affinity",
        explain: "spec.sessionAffinity: ClientIP — eight clients, each stays on one pod",
        annotations: &[],
        affinity: true,
        clients: 8,
        needs: Some("session-affinity"),
        keepalive: false,
    },
];

/// Runs the demo and prints what it saw.
pub async fn run(connections: u32) -> Result<(), DemoError> {
    let pods = start_pods().await?;
    let telemetry = Telemetry::new();
    let metrics = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Metrics)?;
    let metrics_addr = metrics.local_addr().map_err(DemoError::Metrics)?;
    let stop = CancellationToken::new();
    tokio::spawn(telemetry::serve(
        metrics,
        telemetry.clone(),
        Endpoints::Metrics,
        stop.clone().cancelled_owned(),
    ));
    let (tables, updates) = watch::channel(Arc::new(state(&PHASES[0])?));
    let proxy = tokio::spawn(proxy::run(
        ProxyConfig::default(),
        None,
        updates,
        telemetry.clone(),
        Shutdown::new(
            stop.clone().cancelled_owned(),
            // Every demo connection has finished by the time the demo stops.
            std::future::ready(()),
        ),
    ));

    println!(
        "carousel demo: Service default/kubechaos-svc at {SERVICE}, four pods on 127.77.1.1-4:3000"
    );
    println!("metrics: http://{metrics_addr}/metrics (while the demo runs)\n");
    let mut result = Ok(());
    for phase in PHASES {
        if let Some(needed) = phase.needs {
            if !available(needed) {
                println!(
                    "== {}: skipped — the {needed} balancer is not built yet\n",
                    phase.name
                );
                continue;
            }
        }
        tables.send_replace(Arc::new(state(phase)?));
        // Let the proxy apply the table before the first connection of the phase.
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("== {}: {}", phase.name, phase.explain);
        let ran = if phase.keepalive {
            run_keepalive(phase, connections as usize, &pods).await
        } else {
            run_phase(phase, connections as usize, &pods).await
        };
        if let Err(e) = ran {
            result = Err(e);
            break;
        }
    }
    print_own_count(&telemetry, metrics_addr);
    stop.cancel();
    let _ = proxy.await;
    result
}

/// The four pods, on 127.77.1.1-4:3000.
async fn start_pods() -> Result<Vec<Pod>, DemoError> {
    let mut pods = Vec::new();
    for (i, name) in pod_names().iter().enumerate() {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 77, 1, i as u8 + 1)), 3000);
        let pod = Pod::start(name, addr)
            .await
            .map_err(|source| DemoError::Pod {
                pod: name.clone(),
                addr,
                source,
            })?;
        pods.push(pod);
    }
    Ok(pods)
}

/// carousel's own count of the connections, beside the pods' answers.
fn print_own_count(telemetry: &Telemetry, metrics_addr: SocketAddr) {
    println!(
        "The shares above were counted from the pods' answers; carousel's own count is in\n\
         carousel_connections_total at http://{metrics_addr}/metrics:"
    );
    for line in telemetry.render().lines() {
        if line.starts_with("carousel_connections_total{") && line.contains("outcome=\"ok\"") {
            println!("  {line}");
        }
    }
}

fn pod_names() -> Vec<String> {
    [
        "kubechaos-original-7d4b9-a1",
        "kubechaos-original-7d4b9-b2",
        "kubechaos-custom-5f6c8-c3",
        "kubechaos-custom-5f6c8-d4",
    ]
    .map(String::from)
    .to_vec()
}

fn available(needed: &str) -> bool {
    needed == "session-affinity" || needed.parse::<Algorithm>().is_ok()
}

/// The embedded state with this phase's annotations and affinity.
fn state(phase: &Phase) -> Result<crate::model::ServiceTable, DemoError> {
    let mut text = String::new();
    for doc in serde_yaml::Deserializer::from_str(STATE) {
        let mut value: Value =
            serde::Deserialize::deserialize(doc).expect("the embedded state is YAML");
        if value["kind"] == "Service" {
            let annotations: serde_yaml::Mapping = phase
                .annotations
                .iter()
                .map(|(k, v)| (Value::from(*k), Value::from(*v)))
                .collect();
            value["metadata"]["annotations"] = Value::Mapping(annotations);
            if phase.affinity {
                value["spec"]["sessionAffinity"] = Value::from("ClientIP");
            }
        }
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&value).expect("a YAML value serializes"));
    }
    Ok(file::parse(&text, &Scope::default())?.table)
}

/// Sends `total` connections through the Service and shows where they went.
async fn run_phase(phase: &Phase, total: usize, pods: &[Pod]) -> Result<(), DemoError> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("  {prefix:30} {bar:40.cyan/blue} {pos:>6} {msg}")
        .expect("the template is valid")
        .progress_chars("█▉▊▋▌▍▎▏ ");
    let per_pod: BTreeMap<String, ProgressBar> = pods
        .iter()
        .map(|p| {
            let bar = bars.add(ProgressBar::new(total as u64).with_style(style.clone()));
            bar.set_prefix(p.name.clone());
            (p.name.clone(), bar)
        })
        .collect();
    let clients: Vec<IpAddr> = (1..=phase.clients)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 77, 2, i)))
        .collect();
    let workers = ask_all(&clients, total);
    let mut by_client: BTreeMap<IpAddr, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failed = 0;
    let mut last_error = String::new();
    for worker in workers {
        for (client, answer) in worker.await.expect("a demo worker panicked") {
            match answer {
                Ok(pod) => {
                    if let Some(bar) = per_pod.get(&pod) {
                        bar.inc(1);
                    }
                    *by_client.entry(client).or_default().entry(pod).or_default() += 1;
                }
                Err(e) => {
                    failed += 1;
                    last_error = e.to_string();
                }
            }
        }
    }
    for bar in per_pod.values() {
        bar.finish_and_clear();
    }
    print_shares(&by_client, pods, total, "connections");
    if phase.clients > 1 {
        print_clients(&by_client);
    }
    if failed > 0 {
        return Err(DemoError::Failed {
            phase: phase.name,
            failed,
            total,
            last: last_error,
        });
    }
    Ok(())
}

/// `total` requests on one kept connection, as a browser sends them, beside `total`
/// connections of one request each: the first all reach one pod, the others rotate.
async fn run_keepalive(phase: &Phase, total: usize, pods: &[Pod]) -> Result<(), DemoError> {
    let client = IpAddr::V4(Ipv4Addr::new(127, 77, 2, 1));
    let kept = backend::ask_keepalive(client, SERVICE, total, ASK_TIMEOUT)
        .await
        .map_err(|e| DemoError::Failed {
            phase: phase.name,
            failed: total,
            total,
            last: e.to_string(),
        })?;
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for pod in kept {
        *by_pod.entry(pod).or_default() += 1;
    }
    println!("  one connection, kept alive, {total} requests:");
    print_shares(&BTreeMap::from([(client, by_pod)]), pods, total, "requests");
    println!("  {total} connections, one request each:");
    run_phase(phase, total, pods).await?;
    println!(
        "  Why: carousel, like kube-proxy, balances connections, not requests. A browser keeps\n  \
         one connection open and sends every refresh over it, so the pod picked for that\n  \
         connection answers them all. To spread requests: new connections (`Connection: close`,\n  \
         or a client that reconnects), or a per-request (layer 7) balancer in front, such as an\n  \
         ingress or a service mesh.\n"
    );
    Ok(())
}

/// A client and the pod that answered it, or why none did.
type Answer = (IpAddr, std::io::Result<String>);

/// `total` connections from `clients` in turn, over CONCURRENCY tasks; each task's
/// answers, with the client that asked.
fn ask_all(clients: &[IpAddr], total: usize) -> Vec<JoinHandle<Vec<Answer>>> {
    let per_worker = total.div_ceil(CONCURRENCY);
    (0..CONCURRENCY)
        .map(|w| {
            let clients = clients.to_vec();
            let count = per_worker.min(total.saturating_sub(w * per_worker));
            tokio::spawn(async move {
                let mut seen = Vec::with_capacity(count);
                for i in 0..count {
                    let client = clients[(w * per_worker + i) % clients.len()];
                    seen.push((client, backend::ask(client, SERVICE, ASK_TIMEOUT).await));
                }
                seen
            })
        })
        .collect()
}

fn print_shares(
    by_client: &BTreeMap<IpAddr, BTreeMap<String, usize>>,
    pods: &[Pod],
    total: usize,
    counted: &str,
) {
    println!("  {:<30} {:>11} {:>7}", "pod", counted, "share");
    for pod in pods {
        let n: usize = by_client.values().filter_map(|m| m.get(&pod.name)).sum();
        let share = 100.0 * n as f64 / total as f64;
        println!(
            "  {:<30} {n:>11} {share:>6.1}% {}",
            pod.name,
            "#".repeat((share / 2.0).round() as usize)
        );
    }
    println!();
}

fn print_clients(by_client: &BTreeMap<IpAddr, BTreeMap<String, usize>>) {
    println!("  {:<12} pods reached (connections)", "client");
    for (client, pods) in by_client {
        let list: Vec<String> = pods.iter().map(|(p, n)| format!("{p} ({n})")).collect();
        println!("  {:<12} {}", client, list.join(", "));
    }
    println!();
}
