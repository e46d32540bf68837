//! Command-line flags and their defaults, in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::algorithm::Algorithm;
use crate::status::{MetricsUrl, Output, StatusError};

#[derive(Debug, Parser)]
#[command(
    name = "carousel",
    version,
    about = "A node-local L4 proxy for Kubernetes Services with pluggable balancers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How log lines are written to stderr: text, or one JSON object a line (for log
    /// collectors)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL target: message key=value ...`, coloured only on a terminal.
    Text,
    /// One JSON object a line: timestamp, level, target, fields (message among them).
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Proxy the Services of a cluster (or of a state file).
    Run(Box<RunArgs>),
    /// The whole thing on one machine: pods, a Service and traffic, no cluster needed.
    Demo(DemoArgs),
    /// Run the balancers side by side on the same load, over the real data path.
    Bench(BenchArgs),
    /// Services, pods and their share of connections, from a running carousel's /metrics.
    Status(StatusArgs),
    /// Remove every rule carousel installed (its nftables table), and nothing else.
    Cleanup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// Listen on each Service address directly.
    Bind,
    /// Redirect Service traffic to one listener with nftables.
    Nftables,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kubeconfig for the cluster (default: in-cluster, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, conflicts_with = "from_file")]
    pub(crate) kubeconfig: Option<PathBuf>,

    /// The API server, e.g. https://10.0.0.10:6443, in place of the in-cluster address or the
    /// kubeconfig's server (credentials still come from them). Needed where carousel
    /// replaces kube-proxy: the in-cluster address is a ClusterIP only a working proxy
    /// routes. Empty: not set.
    #[arg(long, value_name = "URL", value_parser = parse_master, conflicts_with = "from_file")]
    pub(crate) master: Option<String>,

    /// Proxy the Services of this file of Kubernetes objects instead of a cluster's; reloaded on change.
    #[arg(long, value_name = "STATE.yaml")]
    pub from_file: Option<PathBuf>,

    /// How Service traffic reaches carousel (default: nftables in a cluster, bind with --from-file).
    #[arg(long, value_enum)]
    pub proxy_mode: Option<ProxyMode>,

    /// Own only Services labelled service.kubernetes.io/service-proxy-name=NAME (empty:
    /// not set, so only Services without that label, as kube-proxy).
    #[arg(long, value_name = "NAME")]
    pub(crate) service_proxy_name: Option<String>,

    /// Further restrict the Services handled (a label selector, applied by the API server).
    #[arg(long, value_name = "LABEL_SELECTOR", conflicts_with = "from_file")]
    pub(crate) service_selector: Option<String>,

    /// This node's name, for node-local traffic policies.
    #[arg(long, env = "NODE_NAME")]
    pub(crate) node_name: Option<String>,

    /// This node's zone, for topology-aware routing.
    #[arg(long)]
    pub(crate) zone: Option<String>,

    /// Where /metrics is served.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// Where /healthz, /livez and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,

    /// nftables mode: the port of the listener that Service traffic is redirected to.
    #[arg(long, default_value_t = 10262)]
    pub redirect_port: u16,

    /// Addresses that serve node ports (default 127.0.0.1/32 with --from-file).
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub(crate) nodeport_addresses: Vec<IpNet>,

    /// The pod networks of the cluster, as kube-proxy's flag: a client inside one is a
    /// pod, and reaches an `externalTrafficPolicy: Local` Service's external addresses
    /// at every endpoint. This node's `spec.podCIDRs` and addresses count without it.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
    pub(crate) cluster_cidr: Vec<IpNet>,

    /// Latency histograms (connect and connection duration) per endpoint instead of per
    /// Service port: 44 more series for every endpoint with traffic.
    #[arg(long)]
    pub(crate) endpoint_histograms: bool,

    /// Give up on an endpoint that has not accepted within this time and try the next.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,

    /// Endpoints tried for one connection before the client is closed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub(crate) connect_attempts: u8,

    /// On SIGTERM, how long open connections may take to finish before carousel exits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How often the node's rules (or bind mode's listeners) are checked and repaired, as
    /// kube-proxy's flag; a failed sync is retried sooner, with backoff.
    #[arg(long, default_value = "30s", value_parser = parse_sync_period)]
    pub(crate) sync_period: Duration,

    /// Refuse new connections beyond this many open ones (default: no limit).
    #[arg(long, value_name = "N")]
    pub(crate) max_connections: Option<usize>,

    /// Close a connection that carried no byte either way for this long (default: never, as kube-proxy).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) tcp_idle_timeout: Option<Duration>,

    /// End a UDP flow (a client address and port to a Service port) after this long
    /// without a datagram either way; its next datagram picks an endpoint again.
    /// conntrack's UDP timeout, as kube-proxy's users have it.
    #[arg(long, default_value = "30s", value_parser = parse_udp_idle_timeout)]
    pub(crate) udp_idle_timeout: Duration,

    /// UDP flows open at most at once; the datagrams of new flows beyond are dropped and
    /// counted (carousel_udp_dropped_total{reason="flow_limit"}). Each takes a socket.
    #[arg(long, default_value_t = crate::proxy::udp::DEFAULT_MAX_FLOWS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_udp_flows: u32,

    /// TCP keepalive on both sides of every connection: idle time before the first probe ("0s": off).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) tcp_keepalive: Duration,

    /// Seed for the balancers that draw random numbers (reproducible runs).
    #[arg(long)]
    pub(crate) seed: Option<u64>,

    /// Also run these algorithms beside each Service's own, only counting where they
    /// would have sent each connection (carousel_shadow_picks_total).
    #[arg(long, value_delimiter = ',', value_name = "a,b,...")]
    pub(crate) shadow: Vec<Algorithm>,
}

impl RunArgs {
    /// `--master`, unless empty.
    pub fn master(&self) -> Option<&str> {
        self.master.as_deref().filter(|m| !m.is_empty())
    }

    /// `--service-proxy-name`, unless empty.
    pub fn service_proxy_name(&self) -> Option<&str> {
        self.service_proxy_name.as_deref().filter(|n| !n.is_empty())
    }
}

/// A duration of at least 100 ms and, with `max`, at most its duration (named as its
/// text says).
fn duration_from_100ms(value: &str, max: Option<(Duration, &str)>) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if duration < Duration::from_millis(100) {
        return Err(format!("{value} is shorter than 100ms"));
    }
    match max {
        Some((max, said)) if duration > max => Err(format!("{value} is longer than {said}")),
        _ => Ok(duration),
    }
}

/// A duration of at least 100 ms: a shorter period would rewrite the rules in a loop.
fn parse_sync_period(value: &str) -> Result<Duration, String> {
    duration_from_100ms(value, None)
}

/// A UDP idle timeout: at least 100ms (a flow must outlive one round trip), at most a day.
fn parse_udp_idle_timeout(value: &str) -> Result<Duration, String> {
    duration_from_100ms(value, Some((Duration::from_secs(86_400), "a day")))
}

/// An http(s) URL with a host, or empty (a ConfigMap value that leaves it unset).
/// A scenario's name or `all`: a usage error (exit 2) otherwise, listing the names.
fn parse_scenario(value: &str) -> Result<String, String> {
    if value == "all" || crate::lab::bench::scenarios::names().any(|n| n == value) {
        return Ok(value.to_string());
    }
    let known: Vec<&str> = crate::lab::bench::scenarios::names().collect();
    Err(format!(
        "unknown scenario (known: {}, or all)",
        known.join(", ")
    ))
}

fn parse_master(value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let uri: hyper::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(host)) if !host.is_empty() => Ok(value.to_string()),
        _ => Err(format!(
            "{value:?} is not an API server URL such as https://10.0.0.10:6443"
        )),
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Connections per phase.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub connections: u32,
}

/// `carousel bench --help` lists the scenarios, one line each (kept in step with
/// `lab::bench::scenarios::ABOUT` by a test).
pub(crate) const BENCH_SCENARIOS_HELP: &str = "Scenarios:
  uniform           four equal pods, many clients: the baseline spread
  slow-pod          one pod ten times slower: p99/p999 per algorithm
  canary            custom:original weights 3:1: observed against target share
  keepalive         six long-lived connections, many requests each: balancing is per connection
  dns               UDP, a flow per client socket asking five queries: balancing is per flow
  sticky            many client addresses with ClientIP affinity off and on: stickiness, imbalance
  rolling-update    pods replaced one by one under load: failed connections, clients moved
  scale-up          two pods join mid-run: how fast each algorithm gives them their share
  frontends         kubernetes#5292: 5 frontends keep one connection each to 50 pods: pods used
  frontend-pools    the 5 frontends keep 10 connections each: which algorithms reach all 50 pods
  affinity-rollout  kubernetes#55603: ClientIP affinity through a rolling update piles clients on the first new pods";

#[derive(Debug, Args)]
#[command(after_help = BENCH_SCENARIOS_HELP)]
pub struct BenchArgs {
    /// The scenario to run, or all.
    #[arg(long, default_value = "all", value_name = "NAME|all", value_parser = parse_scenario)]
    pub scenario: String,

    /// The algorithms to compare (default: every one).
    #[arg(long, value_delimiter = ',', value_name = "a,b,...")]
    pub algorithms: Vec<Algorithm>,

    /// Write the results as JSON (the format of docs/lab-json.md).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write one self-contained HTML page with the charts.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Seed for the balancers that draw random numbers.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Shorter runs (under 10 s in all), for a first look and for tests.
    #[arg(long)]
    pub quick: bool,

    /// Run on real pods instead of the lab's: the ready endpoints of one Service port in
    /// this state file, asked HTTP/1.1 GET / (uniform, canary, keepalive, sticky only).
    #[arg(long, value_name = "STATE.yaml")]
    pub pods: Option<PathBuf>,

    /// With --pods: the Service, when the file has several.
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "pods")]
    pub service: Option<String>,

    /// With --pods: the Service's port, by name or number, when it has several TCP ports.
    #[arg(long, value_name = "NAME|NUMBER", requires = "pods")]
    pub port: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The /metrics of the carousel to ask: http://HOST:PORT/PATH, or HOST:PORT for
    /// http://HOST:PORT/metrics; an IPv6 address in brackets, as [::1]:10249.
    #[arg(
        long,
        default_value = "http://127.0.0.1:10249/metrics",
        value_name = "URL",
        value_parser = parse_metrics_url
    )]
    pub metrics_url: MetricsUrl,

    /// Tables, or one JSON document per snapshot (its shape: docs/cli.md).
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,

    /// Read and print again every INTERVAL (--watch alone: 2s) until Ctrl-C; a failed
    /// read is said on standard error and tried again at the next one.
    #[arg(
        long,
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = parse_watch_interval
    )]
    pub watch: Option<Duration>,
}

fn parse_metrics_url(value: &str) -> Result<MetricsUrl, String> {
    value.parse().map_err(|e: StatusError| e.to_string())
}

/// A `--watch` interval: 100ms (each read costs the carousel a /metrics render) to 1h.
fn parse_watch_interval(value: &str) -> Result<Duration, String> {
    duration_from_100ms(value, Some((Duration::from_secs(3600), "1h")))
}
