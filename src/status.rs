//! `carousel status`: reads a running carousel's /metrics and shows, per Service port,
//! its pods with their state, weight, connections (flows, for a UDP port) and share,
//! like `ipvsadm -Ln --stats`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::telemetry::names;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}: only http://HOST:PORT/PATH URLs are supported")]
    Url(String),
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

/// One pod of a Service port.
#[derive(Clone, Debug, PartialEq)]
pub struct PodStatus {
    pub(crate) pod: String,
    pub(crate) endpoint: String,
    /// "active" while it takes new connections, "out" once its weight is 0 (drained,
    /// terminating or gone), "unknown" for a carousel without the weight gauge.
    pub state: &'static str,
    pub weight: Option<f64>,
    /// Connections open now; for a UDP port, flows.
    pub(crate) active: f64,
    /// Connections taken; for a UDP port, flows opened.
    pub(crate) total: f64,
    /// Its part of the port's total connections (flows).
    pub share: f64,
}

/// One Service port.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceStatus {
    pub(crate) namespace: String,
    pub service: String,
    pub(crate) port: String,
    /// "TCP", or "UDP" once a pod of the port has a UDP flow series.
    pub protocol: &'static str,
    pub fairness: Option<f64>,
    pub pods: Vec<PodStatus>,
}

type PortKey = (String, String, String);

fn port_key(s: &Sample) -> Option<PortKey> {
    Some((
        s.labels.get("namespace")?.clone(),
        s.labels.get("service")?.clone(),
        s.labels.get("port")?.clone(),
    ))
}

/// The Services of a /metrics text, sorted by namespace, name and port.
pub fn parse(text: &str) -> Vec<ServiceStatus> {
    let mut ports: BTreeMap<PortKey, ServiceStatus> = BTreeMap::new();
    let mut pods: BTreeMap<(PortKey, String), PodStatus> = BTreeMap::new();
    for s in samples(text) {
        let Some(key) = port_key(&s) else { continue };
        let service = ports.entry(key.clone()).or_insert_with(|| ServiceStatus {
            namespace: key.0.clone(),
            service: key.1.clone(),
            port: key.2.clone(),
            protocol: "TCP",
            fairness: None,
            pods: Vec::new(),
        });
        if s.name == names::FAIRNESS_JAIN {
            service.fairness = Some(s.value);
            continue;
        }
        let endpoint = match s.labels.get("endpoint") {
            Some(e) if !e.is_empty() => e.clone(),
            _ => continue,
        };
        let per_pod = match s.name.as_str() {
            names::UDP_FLOWS_TOTAL | names::UDP_FLOWS_ACTIVE => {
                service.protocol = "UDP";
                true
            }
            names::CONNECTIONS_TOTAL | names::CONNECTIONS_ACTIVE | names::ENDPOINT_WEIGHT => true,
            _ => false,
        };
        if !per_pod {
            continue;
        }
        let pod = pods
            .entry((key, endpoint.clone()))
            .or_insert_with(|| PodStatus::new(&s, endpoint));
        pod.add(&s);
    }
    for ((key, _), pod) in pods {
        if let Some(service) = ports.get_mut(&key) {
            service.pods.push(pod);
        }
    }
    let mut services: Vec<ServiceStatus> = ports
        .into_values()
        .filter(|s| !s.pods.is_empty() || s.fairness.is_some())
        .collect();
    for service in &mut services {
        let total: f64 = service.pods.iter().map(|p| p.total).sum();
        for pod in &mut service.pods {
            pod.share = if total > 0.0 { pod.total / total } else { 0.0 };
        }
    }
    services
}

impl PodStatus {
    fn new(first: &Sample, endpoint: String) -> Self {
        PodStatus {
            pod: first.labels.get("pod").cloned().unwrap_or_default(),
            endpoint,
            state: "unknown",
            weight: None,
            active: 0.0,
            total: 0.0,
            share: 0.0,
        }
    }

    /// Takes in one per-pod sample: its connections, its flows or its weight.
    fn add(&mut self, s: &Sample) {
        match s.name.as_str() {
            names::CONNECTIONS_TOTAL
                if s.labels.get("outcome").map(String::as_str) == Some("ok") =>
            {
                self.total += s.value
            }
            names::UDP_FLOWS_TOTAL => self.total += s.value,
            names::CONNECTIONS_ACTIVE | names::UDP_FLOWS_ACTIVE => self.active = s.value,
            names::ENDPOINT_WEIGHT => {
                self.weight = Some(s.value);
                self.state = if s.value > 0.0 { "active" } else { "out" };
            }
            _ => {}
        }
    }
}

/// The table `carousel status` prints.
pub fn render(services: &[ServiceStatus]) -> String {
    let mut out = String::new();
    if services.is_empty() {
        out.push_str("no Service has a series yet\n");
    }
    for s in services {
        let fairness = s.fairness.map_or("-".to_string(), |f| format!("{f:.3}"));
        // A UDP port's active, total and share count flows.
        let protocol = match s.protocol {
            "UDP" => " UDP (flows)",
            _ => "",
        };
        let _ = writeln!(
            out,
            "{}/{} port {}{protocol}  fairness (Jain, recent picks) {fairness}",
            s.namespace, s.service, s.port
        );
        let _ = writeln!(
            out,
            "  {:<32} {:<22} {:<7} {:>6} {:>7} {:>10} {:>7}",
            "pod", "endpoint", "state", "weight", "active", "total", "share"
        );
        for p in &s.pods {
            let weight = p.weight.map_or("-".to_string(), |w| format!("{w}"));
            let _ = writeln!(
                out,
                "  {:<32} {:<22} {:<7} {:>6} {:>7} {:>10} {:>6.1}%",
                p.pod,
                p.endpoint,
                p.state,
                weight,
                p.active,
                p.total,
                100.0 * p.share
            );
        }
        out.push('\n');
    }
    out
}

/// The largest body `fetch` reads: /metrics of 500 000 endpoints is well under it.
pub(crate) const MAX_BODY: usize = 256 << 20;

/// How long `fetch` waits for the whole answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// GETs `url` (plain http; `/metrics` when it names no path) and returns the body.
pub async fn fetch(url: &str) -> Result<String, StatusError> {
    fetch_at_most(url, MAX_BODY).await
}

/// `fetch`, refusing a body over `limit` bytes.
async fn fetch_at_most(url: &str, limit: usize) -> Result<String, StatusError> {
    let (authority, path) = split_url(url).ok_or_else(|| StatusError::Url(url.to_string()))?;
    let failed = |source: BoxError| StatusError::Fetch {
        url: url.to_string(),
        source,
    };
    let exchange = async {
        let stream = TcpStream::connect(authority).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection ends when `sender` is dropped, at the end of this exchange.
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(HOST, authority)
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await?
            .to_bytes();
        Ok::<_, BoxError>((status, body))
    };
    let (status, body) = tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer in {FETCH_TIMEOUT:?}").into()))?
        .map_err(|source| match source.is::<LengthLimitError>() {
            true => StatusError::TooLarge {
                url: url.to_string(),
                limit,
            },
            false => failed(source),
        })?;
    if status != StatusCode::OK {
        return Err(StatusError::Status {
            url: url.to_string(),
            status: status.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `http://HOST:PORT/PATH` as its authority and path (`/metrics` when none is given).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    (!authority.is_empty()).then_some((authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from `carousel run` with the kubechaos state under load.
    const CAPTURED: &str = r#"# TYPE carousel_connections_total counter
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

    /// A one-shot HTTP server on port 0 that answers `response` and hands back the
    /// request it read.
    async fn answering(response: String) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the client closed before its request ended");
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (format!("127.0.0.1:{}", addr.port()), served)
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(split_url("http://a:1"), Some(("a:1", "/metrics")));
        assert_eq!(split_url("http://a:1/x?y"), Some(("a:1", "/x?y")));
        assert_eq!(split_url("https://a:1/"), None);
        assert_eq!(split_url("http:///metrics"), None);
    }

    #[tokio::test]
    async fn fetch_gets_the_metrics_path_and_returns_the_body() {
        let (authority, served) = answering(ok("carousel_up 1\n")).await;
        let body = fetch(&format!("http://{authority}")).await.unwrap();
        assert_eq!(body, "carousel_up 1\n");
        let request = served.await.unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_lowercase()
                .contains(&format!("host: {authority}")),
            "{request}"
        );
    }

    #[tokio::test]
    async fn fetch_names_a_status_other_than_ok() {
        let (authority, _served) =
            answering("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into()).await;
        let error = fetch(&format!("http://{authority}/nope"))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("answered 404 Not Found"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn fetch_refuses_a_body_over_its_limit() {
        let (authority, _served) = answering(ok(&"x".repeat(2000))).await;
        let error = fetch_at_most(&format!("http://{authority}/"), 1000)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("http://{authority}/ answered more than 1000 bytes")
        );
    }

    #[tokio::test]
    async fn fetch_names_a_server_that_is_not_there() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        drop(listener);
        let error = fetch(&url).await.unwrap_err();
        assert!(
            error.to_string().starts_with(&format!("cannot read {url}")),
            "{error}"
        );
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
        let services = parse(CAPTURED);
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
        assert_eq!(kubechaos.fairness, Some(0.998));
        assert_eq!(kubechaos.pods.len(), 2);
        let original = &kubechaos.pods[0];
        assert_eq!(original.pod, "kubechaos-original-7d4b9-a1");
        assert_eq!(original.endpoint, "127.77.1.1:3000");
        assert_eq!(original.state, "active");
        assert_eq!(original.weight, Some(1.0));
        assert_eq!(original.active, 1.0);
        // Failed connects are not connections the pod took.
        assert_eq!(original.total, 30.0);
        assert_eq!(original.share, 0.25);
        assert_eq!(kubechaos.pods[1].share, 0.75);
        let other = &services[3];
        assert_eq!(other.pods[0].state, "out");
        assert_eq!(other.fairness, None);
        let table = render(&services);
        assert!(
            table.contains("default/kubechaos-svc port http  fairness (Jain, recent picks) 0.998"),
            "{table}"
        );
        assert!(table.contains("75.0%"), "{table}");
    }

    #[test]
    fn a_udp_port_counts_flows_and_its_tcp_twin_connections() {
        let services = parse(CAPTURED);
        let (dns, dns_tcp) = (&services[1], &services[2]);
        assert_eq!((dns.port.as_str(), dns.protocol), ("dns", "UDP"));
        assert_eq!(
            dns.pods
                .iter()
                .map(|p| (p.pod.as_str(), p.active, p.total, p.share))
                .collect::<Vec<_>>(),
            [
                ("coredns-a", 2.0, 40.0, 0.25),
                ("coredns-b", 0.0, 120.0, 0.75)
            ]
        );
        assert_eq!(
            (dns_tcp.port.as_str(), dns_tcp.protocol),
            ("dns-tcp", "TCP")
        );
        assert_eq!(dns_tcp.pods[0].total, 3.0);
        let table = render(&services);
        assert!(
            table.contains("kube-system/kube-dns port dns UDP (flows)  fairness"),
            "{table}"
        );
        assert!(
            table.contains("kube-system/kube-dns port dns-tcp  fairness"),
            "{table}"
        );
    }
}
