//! `carousel status`: reads a running carousel's /metrics and shows, per Service port,
//! its pods with their state, weight, connections (flows, for a UDP port) and share,
//! like `ipvsadm -Ln --stats`. Text becomes a model (`samples`, `parse`) and the model a
//! table or JSON (`render`, `render_json`), all pure; `fetch` and `show` do the I/O.

mod fetch;
mod render;

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use fetch::{fetch, MetricsUrl};
pub use render::{render, render_json};

use crate::telemetry::names;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A `--metrics-url` that cannot name a carousel's /metrics, and why.
    #[error("{url}: {why}")]
    Url { url: String, why: String },
    /// No answer: nothing listens, a timeout, a broken connection.
    #[error("cannot read {url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: BoxError,
    },
    #[error("{url} answered more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url} answered {status}")]
    Status { url: String, status: String },
    #[error("cannot write to standard output: {0}")]
    Write(#[source] io::Error),
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition; comments and lines that do not parse
/// are skipped.
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Sample {
                name: name.to_string(),
                labels: BTreeMap::new(),
                value: value.split_whitespace().next()?.parse().ok()?,
            });
        }
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    let end = loop {
        // Label name up to '=', then a quoted value with \\, \" and \n escapes.
        let (start, c) = chars.next()?;
        if c == '}' {
            break start;
        }
        if c == ',' || c == ' ' {
            continue;
        }
        let eq = rest[start..].find('=')? + start;
        let key = rest[start..eq].to_string();
        while chars.peek().is_some_and(|(i, _)| *i <= eq) {
            chars.next();
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                other => value.push(other),
            }
        }
        labels.insert(key, value);
    };
    let value = rest[end + 1..].split_whitespace().next()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: value.parse().ok()?,
    })
}

/// Picks per pod in rotation that the fairness window must hold before the index is
/// shown: with fewer, Jain's index measures the luck of a few picks (one pick over four
/// pods reads 0.25), not the balancer.
pub const PICKS_PER_POD: u64 = 10;

/// What a pod is doing, as /metrics tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Weight above 0 and not ejected: it takes new connections.
    Active,
    /// Out of rotation for a while after failed connects, resets or ICMP port
    /// unreachable; it comes back by itself.
    Ejected,
    /// Weight 0: drained by `carousel.dev/weights`, terminating, or gone from the
    /// Service while connections to it are open. No new connections.
    Draining,
    /// A carousel without the weight gauge.
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Ejected => "ejected",
            State::Draining => "draining",
            State::Unknown => "unknown",
        }
    }
}

/// One pod of a Service port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodStatus {
    /// Empty when the EndpointSlice names no pod.
    pub pod: String,
    /// `ip:port`, `[ip6]:port`.
    pub endpoint: String,
    pub state: State,
    /// While ejected: seconds until it is tried again.
    pub ejected_seconds_left: Option<f64>,
    pub weight: Option<u32>,
    /// Connections open now; for a UDP port, flows.
    pub active: u64,
    /// Connections taken; for a UDP port, flows opened.
    pub total: u64,
    /// Its part of the port's total, 0 to 1.
    pub share: f64,
}

/// `carousel_fairness_jain` of a port, and whether its window held enough picks to
/// mean something.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fairness {
    /// Jain's index, 1 when every pod got its weighted share.
    pub jain: f64,
    /// `carousel_fairness_window_picks`: the picks the index is of; None from a
    /// carousel that does not export it (then the port's total stands in).
    pub window_picks: Option<u64>,
    /// [`PICKS_PER_POD`] for each pod of the port not draining.
    pub needed_picks: u64,
    /// Whether the picks reach `needed_picks`: only then is the index shown.
    pub meaningful: bool,
}

/// One Service port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub service: String,
    /// The port's name, or its number when unnamed.
    pub port: String,
    /// "TCP", or "UDP" once a pod of the port has a UDP flow series.
    pub protocol: &'static str,
    /// None until the port has had picks.
    pub fairness: Option<Fairness>,
    pub pods: Vec<PodStatus>,
}

impl ServiceStatus {
    /// Jain's index, once it means something.
    pub fn shown_fairness(&self) -> Option<f64> {
        self.fairness
            .as_ref()
            .filter(|f| f.meaningful)
            .map(|f| f.jain)
    }
}

/// What one read of /metrics says: the `-o json` document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub metrics_url: String,
    /// When it was read, in unix seconds.
    pub time: f64,
    pub services: Vec<ServiceStatus>,
}

impl Snapshot {
    /// The snapshot of the /metrics `text` of `url`, read at `at`.
    pub fn new(url: &MetricsUrl, text: &str, at: SystemTime) -> Self {
        Snapshot {
            metrics_url: url.to_string(),
            time: unix_seconds(at),
            services: parse(text, at),
        }
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A gauge or counter value as a count.
fn count(value: f64) -> u64 {
    value.max(0.0).round() as u64
}

/// One pod's series as read, before `now` tells its state.
#[derive(Debug, Default)]
struct PodSeries {
    pod: String,
    weight: Option<f64>,
    ejected_until: Option<f64>,
    active: f64,
    total: f64,
}

impl PodSeries {
    /// Takes in one per-pod sample: its connections, its flows, its weight or the end
    /// of its ejection.
    fn add(&mut self, s: &Sample) {
        match s.name.as_str() {
            names::CONNECTIONS_TOTAL
                if s.labels.get("outcome").map(String::as_str) == Some("ok") =>
            {
                self.total += s.value
            }
            names::UDP_FLOWS_TOTAL => self.total += s.value,
            names::CONNECTIONS_ACTIVE | names::UDP_FLOWS_ACTIVE => self.active = s.value,
            names::ENDPOINT_WEIGHT => self.weight = Some(s.value),
            names::EJECTED_UNTIL => self.ejected_until = Some(s.value),
            _ => {}
        }
    }

    fn status(self, endpoint: String, now: f64) -> PodStatus {
        let left = self.ejected_until.map(|t| t - now).filter(|l| *l > 0.0);
        let state = match (self.weight, left) {
            (Some(w), _) if w <= 0.0 => State::Draining,
            (_, Some(_)) => State::Ejected,
            (Some(_), None) => State::Active,
            (None, None) => State::Unknown,
        };
        PodStatus {
            pod: self.pod,
            endpoint,
            state,
            ejected_seconds_left: left.filter(|_| state == State::Ejected),
            weight: self.weight.map(|w| w.max(0.0).round() as u32),
            active: count(self.active),
            total: count(self.total),
            share: 0.0,
        }
    }
}

/// One port's series as read.
#[derive(Debug, Default)]
struct PortSeries {
    udp: bool,
    jain: Option<f64>,
    window_picks: Option<f64>,
    /// By endpoint.
    pods: BTreeMap<String, PodSeries>,
}

impl PortSeries {
    fn status(self, (namespace, service, port): PortKey, now: f64) -> ServiceStatus {
        let mut pods: Vec<PodStatus> = self
            .pods
            .into_iter()
            .map(|(endpoint, p)| p.status(endpoint, now))
            .collect();
        let total: u64 = pods.iter().map(|p| p.total).sum();
        for pod in &mut pods {
            pod.share = if total > 0 {
                pod.total as f64 / total as f64
            } else {
                0.0
            };
        }
        let fairness = self.jain.map(|jain| {
            let in_rotation = pods.iter().filter(|p| p.state != State::Draining).count();
            let needed_picks = PICKS_PER_POD * in_rotation.max(1) as u64;
            let window_picks = self.window_picks.map(count);
            Fairness {
                jain,
                window_picks,
                needed_picks,
                meaningful: window_picks.unwrap_or(total) >= needed_picks,
            }
        });
        ServiceStatus {
            namespace,
            service,
            port,
            protocol: if self.udp { "UDP" } else { "TCP" },
            fairness,
            pods,
        }
    }
}

type PortKey = (String, String, String);

fn port_key(s: &Sample) -> Option<PortKey> {
    Some((
        s.labels.get("namespace")?.clone(),
        s.labels.get("service")?.clone(),
        s.labels.get("port")?.clone(),
    ))
}

/// The Services of a /metrics text read at `at`, sorted by namespace, name and port;
/// their pods by endpoint.
pub fn parse(text: &str, at: SystemTime) -> Vec<ServiceStatus> {
    let mut ports: BTreeMap<PortKey, PortSeries> = BTreeMap::new();
    for s in samples(text) {
        let Some(key) = port_key(&s) else { continue };
        let per_pod = match s.name.as_str() {
            names::FAIRNESS_JAIN | names::FAIRNESS_WINDOW_PICKS => false,
            names::UDP_FLOWS_TOTAL | names::UDP_FLOWS_ACTIVE => true,
            names::CONNECTIONS_TOTAL
            | names::CONNECTIONS_ACTIVE
            | names::ENDPOINT_WEIGHT
            | names::EJECTED_UNTIL => true,
            _ => continue,
        };
        let port = ports.entry(key).or_default();
        if !per_pod {
            match s.name.as_str() {
                names::FAIRNESS_JAIN => port.jain = Some(s.value),
                _ => port.window_picks = Some(s.value),
            }
            continue;
        }
        let endpoint = match s.labels.get("endpoint") {
            Some(e) if !e.is_empty() => e.clone(),
            _ => continue,
        };
        port.udp |= s.name.starts_with("carousel_udp_");
        let pod = port.pods.entry(endpoint).or_insert_with(|| PodSeries {
            pod: s.labels.get("pod").cloned().unwrap_or_default(),
            ..PodSeries::default()
        });
        pod.add(&s);
    }
    let now = unix_seconds(at);
    ports
        .into_iter()
        .filter(|(_, p)| !p.pods.is_empty() || p.jain.is_some())
        .map(|(key, p)| p.status(key, now))
        .collect()
}

/// Reads `url` once.
pub async fn snapshot(url: &MetricsUrl) -> Result<Snapshot, StatusError> {
    let text = fetch(url).await?;
    Ok(Snapshot::new(url, &text, SystemTime::now()))
}

/// How `carousel status` prints a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table per Service port.
    Text,
    /// One JSON document (docs/cli.md has its shape).
    Json,
}

/// A snapshot as `output` prints it, tables fitted to `width` columns (none: as wide
/// as they need).
pub fn format(snapshot: &Snapshot, output: Output, width: Option<u16>) -> String {
    match output {
        Output::Text => render(snapshot, width),
        Output::Json => render_json(snapshot),
    }
}

/// `carousel status`: prints `url`'s snapshot once, or with `watch` every `watch` until
/// Ctrl-C, carrying on past failed reads (each is said on standard error). On a
/// terminal each snapshot replaces the last and tables fit its width; elsewhere they
/// follow each other, a blank line apart, as wide as they need.
pub async fn show(
    url: &MetricsUrl,
    output: Output,
    watch: Option<Duration>,
) -> Result<(), StatusError> {
    let result = match watch {
        None => {
            let snapshot = snapshot(url).await?;
            print(&format(&snapshot, output, terminal_width()))
        }
        Some(every) => tokio::select! {
            result = watching(url, output, every) => result,
            Ok(()) = tokio::signal::ctrl_c() => Ok(()),
        },
    };
    match result {
        // A reader that went away (`| head`) ends the command, as it ends `watch`.
        Err(StatusError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Clears the screen and puts the cursor at its top.
const CLEAR: &str = "\x1b[H\x1b[2J";

async fn watching(url: &MetricsUrl, output: Output, every: Duration) -> Result<(), StatusError> {
    let tty = console::Term::stdout().is_term();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut printed = false;
    loop {
        tick.tick().await;
        let result = snapshot(url).await;
        let mut frame = String::new();
        if tty {
            frame.push_str(CLEAR);
        } else if printed {
            frame.push('\n');
        }
        if output == Output::Text {
            frame.push_str(&format!(
                "Every {}: {url}  {}\n\n",
                humantime::format_duration(every),
                humantime::format_rfc3339_seconds(SystemTime::now())
            ));
        }
        match result {
            Ok(snapshot) => {
                frame.push_str(&format(&snapshot, output, terminal_width()));
                print(&frame)?;
                printed = true;
            }
            Err(e) => {
                if tty || output == Output::Text {
                    print(&frame)?;
                    printed = true;
                }
                eprintln!("Error: {e}");
            }
        }
    }
}

/// The terminal's width when standard output is one.
fn terminal_width() -> Option<u16> {
    console::Term::stdout()
        .size_checked()
        .map(|(_rows, columns)| columns)
}

fn print(text: &str) -> Result<(), StatusError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(StatusError::Write)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Captured from `carousel run` with the kubechaos state under load.
    pub(crate) const CAPTURED: &str = r#"# TYPE carousel_connections_total counter
carousel_connections_total{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.1:3000",pod="kubechaos-original-7d4b9-a1",outcome="ok"} 30
carousel_connections_total{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.1:3000",pod="kubechaos-original-7d4b9-a1",outcome="connect_error"} 2
carousel_connections_total{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.3:3000",pod="kubechaos-custom-5f6c8-c3",outcome="ok"} 90
carousel_connections_total{namespace="default",service="kubechaos-svc",port="http",endpoint="",pod="",outcome="no_endpoint"} 0
carousel_config_errors_total 0

# TYPE carousel_connections_active gauge
carousel_connections_active{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.1:3000",pod="kubechaos-original-7d4b9-a1"} 1
carousel_connections_active{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.3:3000",pod="kubechaos-custom-5f6c8-c3"} 3
# TYPE carousel_endpoint_weight gauge
carousel_endpoint_weight{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.1:3000",pod="kubechaos-original-7d4b9-a1"} 1
carousel_endpoint_weight{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.3:3000",pod="kubechaos-custom-5f6c8-c3"} 3
# TYPE carousel_fairness_jain gauge
carousel_fairness_jain{namespace="default",service="kubechaos-svc",port="http"} 0.998
# TYPE carousel_endpoints gauge
carousel_endpoints{namespace="default",service="kubechaos-svc",port="http",state="ready"} 2
# TYPE carousel_connect_duration_seconds histogram
carousel_connect_duration_seconds_bucket{namespace="default",service="kubechaos-svc",port="http",endpoint="127.77.1.1:3000",pod="kubechaos-original-7d4b9-a1",le="0.0001"} 3
carousel_connections_total{namespace="other",service="q\"uote",port="80",endpoint="10.0.0.1:80",pod="p",outcome="ok"} 5
carousel_endpoint_weight{namespace="other",service="q\"uote",port="80",endpoint="10.0.0.1:80",pod="p"} 0
# TYPE carousel_udp_flows_total counter
carousel_udp_flows_total{namespace="kube-system",service="kube-dns",port="dns",endpoint="10.244.1.5:53",pod="coredns-a"} 40
carousel_udp_flows_total{namespace="kube-system",service="kube-dns",port="dns",endpoint="10.244.2.7:53",pod="coredns-b"} 120
carousel_udp_flows_active{namespace="kube-system",service="kube-dns",port="dns",endpoint="10.244.1.5:53",pod="coredns-a"} 2
carousel_udp_datagrams_total{namespace="kube-system",service="kube-dns",port="dns",endpoint="10.244.1.5:53",pod="coredns-a",direction="to_endpoint"} 400
carousel_endpoint_weight{namespace="kube-system",service="kube-dns",port="dns",endpoint="10.244.1.5:53",pod="coredns-a"} 1
carousel_connections_total{namespace="kube-system",service="kube-dns",port="dns-tcp",endpoint="10.244.1.5:53",pod="coredns-a",outcome="ok"} 3
"#;

    /// The time the ejection series of `with_ejections` are read at.
    pub(crate) const NOW: u64 = 1_800_000_000;

    /// CAPTURED, with a pod ejected for 12.5 s more, one whose ejection is over, and
    /// the fairness window's picks.
    pub(crate) fn with_ejections() -> String {
        format!(
            "{CAPTURED}\
carousel_endpoint_ejected_until_seconds{{namespace=\"default\",service=\"kubechaos-svc\",port=\"http\",endpoint=\"127.77.1.1:3000\",pod=\"kubechaos-original-7d4b9-a1\"}} {}
carousel_endpoint_ejected_until_seconds{{namespace=\"default\",service=\"kubechaos-svc\",port=\"http\",endpoint=\"127.77.1.3:3000\",pod=\"kubechaos-custom-5f6c8-c3\"}} {}
carousel_fairness_window_picks{{namespace=\"default\",service=\"kubechaos-svc\",port=\"http\"}} 120
",
            NOW as f64 + 12.5,
            NOW - 3
        )
    }

    pub(crate) fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn samples_parse_names_labels_and_values() {
        let all = samples(CAPTURED);
        assert_eq!(all[0].name, "carousel_connections_total");
        assert_eq!(all[0].labels["outcome"], "ok");
        assert_eq!(all[0].value, 30.0);
        assert!(all
            .iter()
            .any(|s| s.name == "carousel_config_errors_total" && s.labels.is_empty()));
        assert!(all
            .iter()
            .any(|s| s.labels.get("service").map(String::as_str) == Some("q\"uote")));
    }

    #[test]
    fn a_captured_metrics_text_gives_services_pods_and_shares() {
        let services = parse(CAPTURED, at(NOW));
        assert_eq!(services.len(), 4);
        let kubechaos = &services[0];
        assert_eq!(kubechaos.protocol, "TCP");
        assert_eq!(
            (
                kubechaos.namespace.as_str(),
                kubechaos.service.as_str(),
                kubechaos.port.as_str()
            ),
            ("default", "kubechaos-svc", "http")
        );
        assert_eq!(kubechaos.pods.len(), 2);
        let original = &kubechaos.pods[0];
        assert_eq!(original.pod, "kubechaos-original-7d4b9-a1");
        assert_eq!(original.endpoint, "127.77.1.1:3000");
        assert_eq!(original.state, State::Active);
        assert_eq!(original.weight, Some(1));
        assert_eq!(original.active, 1);
        // Failed connects are not connections the pod took.
        assert_eq!(original.total, 30);
        assert_eq!(original.share, 0.25);
        assert_eq!(kubechaos.pods[1].share, 0.75);
        let other = &services[3];
        assert_eq!(other.pods[0].state, State::Draining);
        assert_eq!(other.fairness, None);
    }

    #[test]
    fn a_udp_port_counts_flows_and_its_tcp_twin_connections() {
        let services = parse(CAPTURED, at(NOW));
        let (dns, dns_tcp) = (&services[1], &services[2]);
        assert_eq!((dns.port.as_str(), dns.protocol), ("dns", "UDP"));
        assert_eq!(
            dns.pods
                .iter()
                .map(|p| (p.pod.as_str(), p.active, p.total, p.share))
                .collect::<Vec<_>>(),
            [("coredns-a", 2, 40, 0.25), ("coredns-b", 0, 120, 0.75)]
        );
        assert_eq!(
            (dns_tcp.port.as_str(), dns_tcp.protocol),
            ("dns-tcp", "TCP")
        );
        assert_eq!(dns_tcp.pods[0].total, 3);
        assert_eq!(dns.pods[1].state, State::Unknown, "no weight gauge");
    }

    #[test]
    fn an_ejection_shows_until_its_end_passes_and_weight_zero_is_draining() {
        let text = with_ejections();
        let pods = &parse(&text, at(NOW))[0].pods;
        assert_eq!(pods[0].state, State::Ejected);
        assert_eq!(pods[0].ejected_seconds_left, Some(12.5));
        assert_eq!(
            (pods[1].state, pods[1].ejected_seconds_left),
            (State::Active, None),
            "an ejection whose end has passed is over"
        );
        let later = &parse(&text, at(NOW + 13))[0].pods;
        assert_eq!(later[0].state, State::Active, "over by itself");
        // Draining wins: a pod out by weight takes nothing, ejected or not.
        let weight = "carousel_endpoint_weight{namespace=\"default\",service=\"kubechaos-svc\",port=\"http\",endpoint=\"127.77.1.1:3000\",pod=\"kubechaos-original-7d4b9-a1\"}";
        let drained = text.replace(&format!("{weight} 1\n"), &format!("{weight} 0\n"));
        let pods = &parse(&drained, at(NOW))[0].pods;
        assert_eq!(pods[0].weight, Some(0));
        assert_eq!(
            (pods[0].state, pods[0].ejected_seconds_left),
            (State::Draining, None)
        );
    }

    /// `n` round-robin picks over `pods` pods, as a carousel exports them.
    fn picked(pods: u64, n: u64) -> String {
        let mut text = String::new();
        for i in 0..pods {
            let labels = format!(
                "namespace=\"t\",service=\"web\",port=\"http\",endpoint=\"10.0.0.{i}:80\",pod=\"web-{i}\""
            );
            let ok = n / pods + u64::from(i < n % pods);
            if ok > 0 {
                text += &format!("carousel_connections_total{{{labels},outcome=\"ok\"}} {ok}\n");
                text += &format!("carousel_endpoint_weight{{{labels}}} 1\n");
            }
        }
        let jain = crate::stats::jain(
            &(0..pods)
                .map(|i| (n / pods + u64::from(i < n % pods)) as f64)
                .collect::<Vec<_>>(),
        );
        text += &format!(
            "carousel_fairness_jain{{namespace=\"t\",service=\"web\",port=\"http\"}} {jain}\n"
        );
        text += &format!(
            "carousel_fairness_window_picks{{namespace=\"t\",service=\"web\",port=\"http\"}} {n}\n"
        );
        text
    }

    #[test]
    fn fairness_is_shown_once_the_window_holds_ten_picks_per_pod() {
        // One pick over four pods: the index reads 0.25, which says nothing.
        let first = &parse(&picked(4, 1), at(NOW))[0];
        let fairness = first.fairness.as_ref().unwrap();
        assert_eq!(fairness.jain, 0.25);
        assert_eq!(
            (fairness.window_picks, fairness.needed_picks),
            (Some(1), 10),
            "one pod known so far"
        );
        assert!(!fairness.meaningful);
        assert_eq!(first.shown_fairness(), None);
        let short = &parse(&picked(4, 39), at(NOW))[0];
        assert_eq!(short.fairness.as_ref().unwrap().needed_picks, 40);
        assert_eq!(short.shown_fairness(), None);
        let enough = &parse(&picked(4, 40), at(NOW))[0];
        assert_eq!(enough.shown_fairness(), Some(1.0));
    }

    #[test]
    fn without_the_window_gauge_the_ports_total_stands_in() {
        let old = |n| {
            picked(4, n)
                .lines()
                .filter(|l| !l.starts_with("carousel_fairness_window_picks"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let few = &parse(&old(8), at(NOW))[0];
        assert_eq!(few.fairness.as_ref().unwrap().window_picks, None);
        assert_eq!(few.shown_fairness(), None);
        assert!(parse(&old(40), at(NOW))[0].shown_fairness().is_some());
    }

    #[test]
    fn draining_pods_need_no_picks() {
        let text = picked(4, 20).replace("pod=\"web-3\"} 1\n", "pod=\"web-3\"} 0\n");
        let web = &parse(&text, at(NOW))[0];
        assert_eq!(web.pods[3].state, State::Draining);
        assert_eq!(web.fairness.as_ref().unwrap().needed_picks, 30);
    }
}
