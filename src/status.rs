//! `carousel status`: reads a running carousel's /metrics and shows, per Service port,
//! its pods with their state, weight, connections and share, like `ipvsadm -Ln --stats`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::telemetry::names;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}: only http://HOST:PORT/PATH URLs are supported")]
    Url(String),
    #[error("cannot reach {url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: std::io::Error,
    },
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
    pub pod: String,
    pub endpoint: String,
    /// "active" while it takes new connections, "out" once its weight is 0 (drained,
    /// terminating or gone), "unknown" for a carousel without the weight gauge.
    pub state: &'static str,
    pub weight: Option<f64>,
    pub active: f64,
    pub total: f64,
    /// Its part of the port's total connections.
    pub share: f64,
}

/// One Service port.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceStatus {
    pub namespace: String,
    pub service: String,
    pub port: String,
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
        let per_pod = matches!(
            s.name.as_str(),
            names::CONNECTIONS_TOTAL | names::CONNECTIONS_ACTIVE | names::ENDPOINT_WEIGHT
        );
        if !per_pod {
            continue;
        }
        let pod = pods
            .entry((key, endpoint.clone()))
            .or_insert_with(|| PodStatus {
                pod: s.labels.get("pod").cloned().unwrap_or_default(),
                endpoint,
                state: "unknown",
                weight: None,
                active: 0.0,
                total: 0.0,
                share: 0.0,
            });
        match s.name.as_str() {
            names::CONNECTIONS_TOTAL
                if s.labels.get("outcome").map(String::as_str) == Some("ok") =>
            {
                pod.total += s.value
            }
            names::CONNECTIONS_ACTIVE => pod.active = s.value,
            names::ENDPOINT_WEIGHT => {
                pod.weight = Some(s.value);
                pod.state = if s.value > 0.0 { "active" } else { "out" };
            }
            _ => {}
        }
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

/// The table `carousel status` prints.
pub fn render(services: &[ServiceStatus]) -> String {
    let mut out = String::new();
    if services.is_empty() {
        out.push_str("no Service has a series yet\n");
    }
    for s in services {
        let fairness = s.fairness.map_or("-".to_string(), |f| format!("{f:.3}"));
        let _ = writeln!(
            out,
            "{}/{} port {}  fairness (Jain, recent picks) {fairness}",
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

/// GETs `url` (plain http) and returns the body.
pub async fn fetch(url: &str) -> Result<String, StatusError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| StatusError::Url(url.to_string()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let io_err = |source| StatusError::Fetch {
        url: url.to_string(),
        source,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await?;
        // HTTP/1.0 and no keep-alive: the body ends where the stream does.
        let request = format!("GET {path} HTTP/1.0\r\nhost: {authority}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 5 s",
            ))
        })
        .map_err(io_err)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| StatusError::Status {
            url: url.to_string(),
            status: "no HTTP response".into(),
        })?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(StatusError::Status {
            url: url.to_string(),
            status: status.to_string(),
        });
    }
    Ok(body.to_string())
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
"#;

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
        assert_eq!(services.len(), 2);
        let kubechaos = &services[0];
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
        let other = &services[1];
        assert_eq!(other.pods[0].state, "out");
        assert_eq!(other.fairness, None);
        let table = render(&services);
        assert!(
            table.contains("default/kubechaos-svc port http  fairness (Jain, recent picks) 0.998"),
            "{table}"
        );
        assert!(table.contains("75.0%"), "{table}");
    }
}
