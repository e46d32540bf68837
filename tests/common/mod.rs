//! Test harness: a carousel running in-process from a state file in a temp dir, with
//! its telemetry on port 0, and the pods, echo servers and clients the tests drive.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use carousel::balance::BuildOptions;
use carousel::discovery::convert::Scope;
use carousel::proxy::{ForwardConfig, Mode, ProxyConfig};
use carousel::run::{self, FileRun};
use carousel::shutdown::Shutdown;
use carousel::telemetry::Telemetry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// An endpoint of a state file.
#[derive(Clone, Debug)]
pub struct Ep {
    pub addr: SocketAddr,
    pub pod: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName` of the endpoint.
    pub node: Option<String>,
}

impl Ep {
    pub fn ready(addr: SocketAddr, pod: &str) -> Self {
        Self {
            addr,
            pod: pod.into(),
            ready: true,
            serving: true,
            terminating: false,
            node: None,
        }
    }

    /// The same endpoint, on node `node`.
    pub fn on(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }
    /// Terminating but still serving (KEP-1669).
    pub fn terminating(addr: SocketAddr, pod: &str, serving: bool) -> Self {
        Self {
            addr,
            pod: pod.into(),
            ready: false,
            serving,
            terminating: true,
            node: None,
        }
    }
}

/// A Service with one TCP port named `web`, and one EndpointSlice per endpoint port.
#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ep>,
    /// Extra `spec` fields, one per line, e.g. `externalTrafficPolicy: Local`.
    pub spec: Vec<String>,
    /// Annotations of the Service.
    pub annotations: Vec<(String, String)>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<String>,
}

impl Svc {
    pub fn new(name: &str, cluster_ip: &str, port: u16, endpoints: Vec<Ep>) -> Self {
        Self {
            name: name.into(),
            cluster_ip: cluster_ip.parse().expect("test cluster IP"),
            port,
            node_port: None,
            endpoints,
            spec: Vec::new(),
            annotations: Vec::new(),
            load_balancer_ips: Vec::new(),
        }
    }

    /// A state file holding just this Service.
    pub fn state(&self) -> String {
        state_yaml(std::slice::from_ref(self))
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.cluster_ip, self.port)
    }
}

/// Renders Services as a state file: each Service, then one EndpointSlice per endpoint
/// port and address family.
pub fn state_yaml(services: &[Svc]) -> String {
    let mut y = String::new();
    for s in services {
        let kind = if s.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let node_port = s
            .node_port
            .map(|p| format!("\n      nodePort: {p}"))
            .unwrap_or_default();
        let annotations: Vec<String> = s
            .annotations
            .iter()
            .map(|(k, v)| format!("{k}: \"{v}\""))
            .collect();
        let extra: String = s.spec.iter().map(|line| format!("  {line}\n")).collect();
        write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: test, annotations: {{{annotations}}}}}\n\
             spec:\n  type: {kind}\n  clusterIP: {ip}\n{extra}  ports:\n    - name: web\n      port: {port}\n      targetPort: web{node_port}\n",
            name = s.name,
            annotations = annotations.join(", "),
            ip = s.cluster_ip,
            port = s.port,
        )
        .unwrap();
        if !s.load_balancer_ips.is_empty() {
            let ingress: Vec<String> = s
                .load_balancer_ips
                .iter()
                .map(|ip| format!("{{ip: {ip}}}"))
                .collect();
            writeln!(
                y,
                "status: {{loadBalancer: {{ingress: [{}]}}}}",
                ingress.join(", ")
            )
            .unwrap();
        }
        let mut groups: Vec<(u16, bool)> = s
            .endpoints
            .iter()
            .map(|e| (e.addr.port(), e.addr.is_ipv6()))
            .collect();
        groups.sort();
        groups.dedup();
        for (i, (port, v6)) in groups.iter().enumerate() {
            write!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata:\n  name: {name}-{i}\n  namespace: test\n  labels: {{kubernetes.io/service-name: {name}}}\n\
                 addressType: {family}\nports: [{{name: web, port: {port}, protocol: TCP}}]\nendpoints:\n",
                name = s.name,
                family = if *v6 { "IPv6" } else { "IPv4" },
            )
            .unwrap();
            for e in s
                .endpoints
                .iter()
                .filter(|e| (e.addr.port(), e.addr.is_ipv6()) == (*port, *v6))
            {
                let node = e
                    .node
                    .as_deref()
                    .map(|n| format!("\n    nodeName: {n}"))
                    .unwrap_or_default();
                write!(
                    y,
                    "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {r}, serving: {s}, terminating: {t}}}\n    targetRef: {{kind: Pod, name: {pod}, namespace: test}}{node}\n",
                    ip = e.addr.ip(),
                    r = e.ready,
                    s = e.serving,
                    t = e.terminating,
                    pod = e.pod,
                )
                .unwrap();
            }
        }
    }
    y
}

/// A carousel running in this process.
pub struct Carousel {
    _dir: tempfile::TempDir,
    pub state: PathBuf,
    pub telemetry: Arc<Telemetry>,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    stop: CancellationToken,
    abandon: CancellationToken,
    task: JoinHandle<Result<(), run::RunError>>,
}

impl Carousel {
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, Vec::new()).await
    }

    pub async fn start_with(yaml: &str, nodeport_addresses: Vec<IpAddr>) -> Self {
        Self::start_configured(yaml, |c| c.mode = Mode::Bind { nodeport_addresses }).await
    }

    /// Starts with the test defaults, changed by `configure`.
    pub async fn start_configured(yaml: &str, configure: impl FnOnce(&mut ProxyConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state.yaml");
        std::fs::write(&state, yaml).expect("write state");
        let telemetry = Telemetry::new();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (metrics_addr, health_addr) =
            (metrics.local_addr().unwrap(), health.local_addr().unwrap());
        let mut proxy = ProxyConfig {
            forward: ForwardConfig {
                connect_timeout: Duration::from_secs(1),
                ..ForwardConfig::default()
            },
            balance: BuildOptions {
                seed: Some(7),
                ..BuildOptions::default()
            },
            ..ProxyConfig::default()
        };
        configure(&mut proxy);
        let config = FileRun {
            path: state.clone(),
            scope: Scope::default(),
            proxy,
        };
        let stop = CancellationToken::new();
        let abandon = CancellationToken::new();
        let task = tokio::spawn(run::run_from_file(
            config,
            telemetry.clone(),
            metrics,
            health,
            Shutdown::new(
                stop.clone().cancelled_owned(),
                abandon.clone().cancelled_owned(),
            ),
        ));
        let c = Carousel {
            _dir: dir,
            state,
            telemetry,
            metrics: metrics_addr,
            health: health_addr,
            stop,
            abandon,
            task,
        };
        eventually("the first table is applied", || async {
            c.telemetry.health().last_sync().is_some()
        })
        .await;
        c
    }

    /// Replaces the state file (written in place, as an editor would).
    /// Replaces the state file as a careful writer does: written beside it, then
    /// renamed into place.
    pub fn write_state(&self, yaml: &str) {
        let next = self.state.with_extension("next");
        std::fs::write(&next, yaml).expect("write state");
        std::fs::rename(&next, &self.state).expect("rename state");
    }

    /// Stops without waiting for open connections.
    pub async fn stop(self) {
        self.stop.cancel();
        self.abandon.cancel();
        ended_or_cut(self.task.await.expect("carousel task"));
    }

    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }
}

/// Waits until `check` holds, up to `PATIENCE`; panics naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: test\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the one series of `name` whose labels include every `label="value"` given.
/// Parsed as `carousel status` parses it.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    carousel::status::samples(text)
        .into_iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|value| value == v))
        })
        .map(|s| s.value)
}

/// An echo server on `ip` (port from the OS): echoes until the client half-closes,
/// then half-closes too.
pub async fn echo_server(ip: &str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// How an in-process carousel that a test stopped must have ended: cleanly, or with its
/// drain cut, which a test that abandons the drain at once asks for.
pub fn ended_or_cut(result: Result<(), run::RunError>) {
    use carousel::proxy::ProxyError;
    match result {
        Ok(()) | Err(run::RunError::Proxy(ProxyError::DrainCut { .. })) => {}
        Err(e) => panic!("carousel run: {e}"),
    }
}

/// Pods on 127.0.0.1 (ports from the OS) that answer their names.
pub async fn pods(names: &[&str]) -> Vec<carousel::lab::backend::Pod> {
    let mut pods = Vec::new();
    for name in names {
        let pod = carousel::lab::backend::Pod::start(name, "127.0.0.1:0".parse().unwrap());
        pods.push(pod.await.unwrap());
    }
    pods
}

/// A port on `ip` that nothing listens on: connecting there is refused.
pub async fn refusing_addr(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    listener.local_addr().unwrap()
}

/// Deterministic test data: byte `i` of stream `seed`.
pub fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// A Debian nginx configuration that keeps everything under `dir` and runs as one
/// foreground process (a test's child): `log_format` names the access log's line,
/// `server` is the `server { ... }` block.
pub fn nginx_conf(dir: &std::path::Path, log_format: &str, server: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format line '{log_format}';
    access_log {d}/access.log line;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_requests 100000;
{server}
}}
"#
    )
}

pub mod fake_apiserver;

/// Runs `f` on a thread that entered the network namespace `netns` (`ip netns add`):
/// sockets it makes stay in that namespace, and /proc/sys/net is that namespace's.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns(2) on a descriptor that is open for the whole call; it
                // changes only this short-lived thread's network namespace.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace")
    })
}

/// A TCP listener on `addr` inside the network namespace `netns`, for a process that
/// lives outside it.
pub fn listen_in_netns(netns: &str, addr: SocketAddr) -> std::net::TcpListener {
    in_netns(netns, || {
        std::net::TcpListener::bind(addr).expect("bind in the namespace")
    })
}

/// A carousel running in this process against a (fake) API server, in bind mode.
pub struct ClusterCarousel {
    pub telemetry: Arc<Telemetry>,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), run::RunError>>,
}

/// The flags of `carousel run` that the cluster tests vary.
#[derive(Clone, Debug, Default)]
pub struct ClusterFlags {
    pub proxy_name: Option<String>,
    pub service_selector: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

impl ClusterCarousel {
    /// Starts carousel with the kubeconfig of `api`; does not wait for the first sync.
    pub async fn start(api: &fake_apiserver::FakeApiServer, flags: ClusterFlags) -> Self {
        let telemetry = Telemetry::new();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (metrics_addr, health_addr) =
            (metrics.local_addr().unwrap(), health.local_addr().unwrap());
        let config = run::ClusterRun {
            kubeconfig: Some(api.kubeconfig().to_owned()),
            master: None,
            service_selector: flags.service_selector,
            scope: Scope {
                proxy_name: flags.proxy_name,
            },
            proxy: ProxyConfig {
                forward: ForwardConfig {
                    connect_timeout: Duration::from_secs(1),
                    ..ForwardConfig::default()
                },
                mode: Mode::Bind {
                    nodeport_addresses: Vec::new(),
                },
                balance: BuildOptions {
                    seed: Some(7),
                    ..BuildOptions::default()
                },
                locality: carousel::model::Locality {
                    node: flags.node_name.as_deref().map(Into::into),
                    zone: flags.zone.as_deref().map(Into::into),
                },
                ..ProxyConfig::default()
            },
        };
        let stop = CancellationToken::new();
        // Stopping a test carousel drains nothing: the abandon future is ready at once.
        let task = tokio::spawn(run::run_from_cluster(
            config,
            telemetry.clone(),
            metrics,
            health,
            Shutdown::new(stop.clone().cancelled_owned(), std::future::ready(())),
        ));
        ClusterCarousel {
            telemetry,
            metrics: metrics_addr,
            health: health_addr,
            stop,
            task,
        }
    }

    /// Starts carousel and waits for its first applied table.
    pub async fn synced(api: &fake_apiserver::FakeApiServer, flags: ClusterFlags) -> Self {
        let c = Self::start(api, flags).await;
        eventually("the first table is applied", || async {
            c.telemetry.health().last_sync().is_some()
        })
        .await;
        c
    }

    pub async fn stop(self) {
        self.stop.cancel();
        ended_or_cut(self.task.await.expect("carousel task"));
    }

    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }
}

/// dnsmasq as a DNS pod: in the foreground, no configuration, resolver or cache,
/// listening on `addresses` at `port` (UDP and TCP) and answering `who.test` with
/// `answer`. `command` is how it starts (`dnsmasq`, or `ip netns exec NS dnsmasq`).
pub fn dnsmasq(
    mut command: std::process::Command,
    addresses: &[IpAddr],
    port: u16,
    answer: IpAddr,
) -> std::process::Child {
    command
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--pid-file",
            "--user=root",
            "--cache-size=0",
        ])
        .arg(format!("--port={port}"))
        .args(addresses.iter().map(|a| format!("--listen-address={a}")))
        .arg(format!("--address=/who.test/{answer}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dnsmasq (Debian's dnsmasq-base) runs")
}

/// The metric families (carousel's, kube-proxy's, the process') a PromQL expression
/// reads, histogram suffixes removed: what the dashboard's expressions are checked by.
pub fn metric_families_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(i) = ["carousel_", "kubeproxy_", "process_"]
        .iter()
        .filter_map(|prefix| rest.find(prefix))
        .min()
    {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
            .unwrap_or(name);
        found.push(base.to_string());
        rest = &tail[end..];
    }
    found
}
