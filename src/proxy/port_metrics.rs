//! The series of one Service port, and the handles it gives its endpoints. A route
//! holds its port's `PortMetrics`; each endpoint, its own series once it has had a
//! connection. The registry drops a series once no handle of it is held (`series.rs`),
//! so a departed endpoint, or a deleted Service, leaves /metrics by itself.

use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram, Label};

use crate::addr::PodAddr;
use crate::algorithm::Algorithm;
use crate::balance::AffinityStats;
use crate::model::{Protocol, ProxyProtocol, ServiceKey, ServicePort};
use crate::proxy::log_limit::LogLimit;
use crate::proxy::source::Source;
use crate::telemetry::{names, Telemetry};

/// One Service port's series, shared by its routes and carried across tables.
#[derive(Debug)]
pub(crate) struct PortMetrics {
    telemetry: Arc<Telemetry>,
    pub(crate) service: ServiceKey,
    /// The port's label: its name, or its number when unnamed.
    pub(crate) port: String,
    protocol: Protocol,
    /// `namespace`, `service`, `port`: the labels of every series of the port.
    labels: Arc<[Label]>,
    /// `carousel_connections_total{outcome="no_endpoint"}`.
    pub(crate) no_endpoint: Counter,
    /// `carousel_endpoints{state}`: ready, serving, terminating.
    endpoint_counts: [Gauge; 3],
    /// The port's latency histograms, registered at its first connection.
    histograms: OnceLock<(Histogram, Histogram)>,
    /// `carousel_udp_dropped_total` by reason, registered at the first drop.
    udp_drops: OnceLock<Box<[Counter; UDP_DROP_REASONS.len()]>>,
    /// `carousel_proxy_headers_total{version}`, v1 and v2, each at its first header.
    proxy_headers: [OnceLock<Counter>; 2],
    /// `carousel_source_connections_total{source}`, client and node, each at its first
    /// connection; only for Services with `carousel.dev/source: transparent`.
    sources: [OnceLock<Counter>; 2],
    /// The port's warnings (refused connections, ejections): one a second at most.
    pub(crate) log_limit: LogLimit,
}

/// Why a UDP datagram was dropped: the `reason` label of `carousel_udp_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UdpDrop {
    /// The Service port has no endpoint for a new flow.
    NoEndpoint,
    /// `--max-udp-flows` flows are open: a new flow is not opened.
    FlowLimit,
    /// The endpoint's socket had no room (its send buffer is full).
    EndpointBusy,
    /// The client's side had no room for a reply.
    ClientBusy,
    /// No socket to the endpoint could be opened (out of descriptors, say).
    SocketError,
}

const UDP_DROP_REASONS: [&str; 5] = [
    "no_endpoint",
    "flow_limit",
    "endpoint_busy",
    "client_busy",
    "socket_error",
];

/// The series of one endpoint of a UDP Service port, resolved once.
#[derive(Debug)]
pub(crate) struct UdpEndpointSeries {
    /// `carousel_udp_flows_total`: flows opened to the endpoint.
    pub(crate) flows: Counter,
    /// `carousel_udp_flows_active`.
    pub(crate) active: Gauge,
    pub(crate) datagrams_to_endpoint: Counter,
    pub(crate) datagrams_to_client: Counter,
    pub(crate) bytes_to_endpoint: Counter,
    pub(crate) bytes_to_client: Counter,
    /// `carousel_endpoint_ejections_total`: ICMP port unreachable from the endpoint.
    pub(crate) ejections: Counter,
    /// `carousel_endpoint_ejected_until_seconds`.
    pub(crate) ejected_until: Gauge,
    pub(crate) weight: Gauge,
}

/// An endpoint's series: those of its port's protocol.
#[derive(Debug)]
pub(crate) enum Series {
    Tcp(EndpointSeries),
    Udp(UdpEndpointSeries),
}

impl Series {
    /// The ejection counter and the gauge of when the ejection ends, which both
    /// protocols have.
    pub(crate) fn ejection(&self) -> (&Counter, &Gauge) {
        match self {
            Series::Tcp(s) => (&s.ejections, &s.ejected_until),
            Series::Udp(s) => (&s.ejections, &s.ejected_until),
        }
    }
}

/// The series of one endpoint, resolved once: a connection only increments them.
#[derive(Debug)]
pub(crate) struct EndpointSeries {
    pub(crate) ok: Counter,
    pub(crate) connect_errors: Counter,
    pub(crate) active: Gauge,
    pub(crate) bytes_to_endpoint: Counter,
    pub(crate) bytes_to_client: Counter,
    /// The Service port's histogram; the endpoint's own with `--endpoint-histograms`.
    pub(crate) connect_duration: Histogram,
    pub(crate) connection_duration: Histogram,
    /// `carousel_endpoint_ejections_total`: failed connects that took the endpoint out.
    pub(crate) ejections: Counter,
    /// `carousel_endpoint_ejected_until_seconds`: when the current ejection ends.
    pub(crate) ejected_until: Gauge,
    /// `carousel_endpoint_weight`.
    pub(crate) weight: Gauge,
}

const ENDPOINT_STATES: [&str; 3] = ["ready", "serving", "terminating"];

impl PortMetrics {
    pub(crate) fn new(
        telemetry: &Arc<Telemetry>,
        service: &ServiceKey,
        port: &ServicePort,
    ) -> Self {
        let port_label = port.label();
        let labels: Arc<[Label]> = vec![
            Label::new("namespace", service.namespace.to_string()),
            Label::new("service", service.name.to_string()),
            Label::new("port", port_label.clone()),
        ]
        .into();
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l = labels.to_vec();
            l.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            l
        };
        Self {
            no_endpoint: telemetry.counter(
                names::CONNECTIONS_TOTAL,
                with(&[("endpoint", ""), ("pod", ""), ("outcome", "no_endpoint")]),
            ),
            endpoint_counts: ENDPOINT_STATES
                .map(|state| telemetry.gauge(names::ENDPOINTS, with(&[("state", state)]))),
            telemetry: telemetry.clone(),
            service: service.clone(),
            port: port_label,
            protocol: port.protocol,
            labels,
            histograms: OnceLock::new(),
            udp_drops: OnceLock::new(),
            proxy_headers: Default::default(),
            sources: Default::default(),
            log_limit: LogLimit::default(),
        }
    }

    /// Counts a dropped UDP datagram.
    pub(crate) fn udp_drop(&self, why: UdpDrop) {
        let counters = self.udp_drops.get_or_init(|| {
            Box::new(UDP_DROP_REASONS.map(|reason| {
                let mut labels = self.labels.to_vec();
                labels.push(Label::new("reason", reason));
                self.telemetry.counter(names::UDP_DROPPED_TOTAL, labels)
            }))
        });
        counters[why as usize].increment(1);
    }

    /// Counts a connection or flow whose pod is sent a PROXY protocol `version` header.
    pub(crate) fn proxy_header(&self, version: ProxyProtocol) {
        let counter = self.proxy_headers[version as usize].get_or_init(|| {
            let mut labels = self.labels.to_vec();
            labels.push(Label::new("version", version.name()));
            self.telemetry.counter(names::PROXY_HEADERS_TOTAL, labels)
        });
        counter.increment(1);
    }

    /// Counts a connection or flow of a transparent Service by the source its pod saw.
    pub(crate) fn source_connection(&self, source: Source) {
        let (i, name) = match source {
            Source::Client { .. } => (0, "client"),
            Source::Node => (1, "node"),
        };
        let counter = self.sources[i].get_or_init(|| {
            let mut labels = self.labels.to_vec();
            labels.push(Label::new("source", name));
            self.telemetry
                .counter(names::SOURCE_CONNECTIONS_TOTAL, labels)
        });
        counter.increment(1);
    }

    /// Whether these are the series of `port` of `service`.
    pub(crate) fn describes(&self, service: &ServiceKey, port: &ServicePort) -> bool {
        self.service == *service && self.port == port.label() && self.protocol == port.protocol
    }

    /// Sets `carousel_endpoints{state}` from the port's endpoints.
    pub(crate) fn count_endpoints(&self, port: &ServicePort) {
        let mut counts = [0usize; 3];
        for e in &port.endpoints {
            for (n, on) in counts.iter_mut().zip([e.ready, e.serving, e.terminating]) {
                *n += usize::from(on);
            }
        }
        for (gauge, n) in self.endpoint_counts.iter().zip(counts) {
            gauge.set(n as f64);
        }
    }

    /// The series of the endpoint at `addr`, `pod`, of the port's protocol, with its
    /// weight gauge at `weight`.
    pub(crate) fn endpoint(&self, addr: PodAddr, pod: &str, weight: u32) -> Series {
        match self.protocol {
            Protocol::Tcp => Series::Tcp(self.tcp_endpoint(addr, pod, weight)),
            Protocol::Udp => Series::Udp(self.udp_endpoint(addr, pod, weight)),
        }
    }

    /// The series of an endpoint of a TCP port.
    fn tcp_endpoint(&self, addr: PodAddr, pod: &str, weight: u32) -> EndpointSeries {
        let telemetry = &self.telemetry;
        let labels = |extra: &[(&'static str, &'static str)]| {
            let mut l = self.labels.to_vec();
            l.push(Label::new("endpoint", addr.to_string()));
            l.push(Label::new("pod", pod.to_string()));
            l.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            l
        };
        let (connect_duration, connection_duration) = if telemetry.endpoint_histograms() {
            (
                telemetry.histogram(names::CONNECT_DURATION, labels(&[])),
                telemetry.histogram(names::CONNECTION_DURATION, labels(&[])),
            )
        } else {
            self.histograms
                .get_or_init(|| {
                    (
                        telemetry.histogram(names::CONNECT_DURATION, self.labels.to_vec()),
                        telemetry.histogram(names::CONNECTION_DURATION, self.labels.to_vec()),
                    )
                })
                .clone()
        };
        let series = EndpointSeries {
            ok: telemetry.counter(names::CONNECTIONS_TOTAL, labels(&[("outcome", "ok")])),
            connect_errors: telemetry.counter(
                names::CONNECTIONS_TOTAL,
                labels(&[("outcome", "connect_error")]),
            ),
            active: telemetry.gauge(names::CONNECTIONS_ACTIVE, labels(&[])),
            bytes_to_endpoint: telemetry
                .counter(names::BYTES_TOTAL, labels(&[("direction", "to_endpoint")])),
            bytes_to_client: telemetry
                .counter(names::BYTES_TOTAL, labels(&[("direction", "to_client")])),
            connect_duration,
            connection_duration,
            ejections: telemetry.counter(names::EJECTIONS_TOTAL, labels(&[])),
            ejected_until: telemetry.gauge(names::EJECTED_UNTIL, labels(&[])),
            weight: telemetry.gauge(names::ENDPOINT_WEIGHT, labels(&[])),
        };
        series.weight.set(f64::from(weight));
        series
    }

    /// The series of an endpoint of a UDP port.
    fn udp_endpoint(&self, addr: PodAddr, pod: &str, weight: u32) -> UdpEndpointSeries {
        let telemetry = &self.telemetry;
        let labels = |extra: &[(&'static str, &'static str)]| {
            let mut l = self.labels.to_vec();
            l.push(Label::new("endpoint", addr.to_string()));
            l.push(Label::new("pod", pod.to_string()));
            l.extend(extra.iter().map(|(k, v)| Label::new(*k, *v)));
            l
        };
        let series = UdpEndpointSeries {
            flows: telemetry.counter(names::UDP_FLOWS_TOTAL, labels(&[])),
            active: telemetry.gauge(names::UDP_FLOWS_ACTIVE, labels(&[])),
            datagrams_to_endpoint: telemetry.counter(
                names::UDP_DATAGRAMS_TOTAL,
                labels(&[("direction", "to_endpoint")]),
            ),
            datagrams_to_client: telemetry.counter(
                names::UDP_DATAGRAMS_TOTAL,
                labels(&[("direction", "to_client")]),
            ),
            bytes_to_endpoint: telemetry
                .counter(names::BYTES_TOTAL, labels(&[("direction", "to_endpoint")])),
            bytes_to_client: telemetry
                .counter(names::BYTES_TOTAL, labels(&[("direction", "to_client")])),
            ejections: telemetry.counter(names::EJECTIONS_TOTAL, labels(&[])),
            ejected_until: telemetry.gauge(names::EJECTED_UNTIL, labels(&[])),
            weight: telemetry.gauge(names::ENDPOINT_WEIGHT, labels(&[])),
        };
        series.weight.set(f64::from(weight));
        series
    }

    /// `carousel_shadow_picks_total` of one endpoint under the shadow `algorithm`.
    pub(crate) fn shadow_picks(&self, algorithm: Algorithm, addr: PodAddr, pod: &str) -> Counter {
        let mut labels = self.labels.to_vec();
        labels.extend([
            Label::new("algorithm", algorithm.name()),
            Label::new("endpoint", addr.to_string()),
            Label::new("pod", pod.to_string()),
        ]);
        self.telemetry.counter(names::SHADOW_PICKS_TOTAL, labels)
    }

    /// The `carousel_affinity_*` handles, for a port with ClientIP affinity.
    pub(crate) fn affinity(&self) -> AffinityStats {
        let lookups = |result: &'static str| {
            let mut labels = self.labels.to_vec();
            labels.push(Label::new("result", result));
            self.telemetry
                .counter(names::AFFINITY_LOOKUPS_TOTAL, labels)
        };
        AffinityStats {
            hit: lookups("hit"),
            miss: lookups("miss"),
            expired: lookups("expired"),
            overflow: self
                .telemetry
                .counter(names::AFFINITY_OVERFLOW_TOTAL, self.labels.to_vec()),
            entries: self
                .telemetry
                .gauge(names::AFFINITY_ENTRIES, self.labels.to_vec()),
        }
    }

    /// `carousel_fairness_jain` of the port, and `carousel_fairness_window_picks`, the
    /// picks it was computed over (so that a reader can tell a measure from noise).
    pub(crate) fn fairness(&self) -> (Gauge, Gauge) {
        (
            self.telemetry
                .gauge(names::FAIRNESS_JAIN, self.labels.to_vec()),
            self.telemetry
                .gauge(names::FAIRNESS_WINDOW_PICKS, self.labels.to_vec()),
        )
    }
}
