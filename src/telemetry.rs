//! Metrics and health: the stable metric names, a metric registry owned by each proxy
//! instance (`series.rs`: so that tests running several proxies see only their own
//! series, and series leave with what they describe), and the small HTTP server behind
//! `/metrics`, `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics::{Counter, Gauge, Histogram, Label};
use tokio::net::TcpListener;

use crate::programming::Programming;
use crate::series::Registry;

/// Metric names: part of carousel's contract, never renamed.
pub mod names {
    pub const CONNECTIONS_TOTAL: &str = "carousel_connections_total";
    pub const CONNECTIONS_ACTIVE: &str = "carousel_connections_active";
    pub const BYTES_TOTAL: &str = "carousel_bytes_total";
    pub const CONNECT_DURATION: &str = "carousel_connect_duration_seconds";
    pub const CONNECTION_DURATION: &str = "carousel_connection_duration_seconds";
    pub const ENDPOINTS: &str = "carousel_endpoints";
    pub const CONFIG_ERRORS_TOTAL: &str = "carousel_config_errors_total";
    pub const SYNC_DURATION: &str = "carousel_sync_duration_seconds";
    pub const SYNC_ERRORS_TOTAL: &str = "carousel_sync_errors_total";
    pub const SYNC_LAST_TIMESTAMP: &str = "carousel_sync_last_timestamp_seconds";
    pub const BUILD_INFO: &str = "carousel_build_info";
    /// From an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to
    /// the publication of the first table holding the change (the Kubernetes SLI).
    pub const NETWORK_PROGRAMMING_DURATION: &str = "carousel_network_programming_duration_seconds";
    pub const EJECTIONS_TOTAL: &str = "carousel_endpoint_ejections_total";
    /// Unix time an endpoint's ejection ends: a time, not a flag, because an ejection
    /// ends by itself and nothing would clear a flag then.
    pub const EJECTED_UNTIL: &str = "carousel_endpoint_ejected_until_seconds";
    pub const REJECTED_TOTAL: &str = "carousel_connections_rejected_total";
    pub const ACCEPT_ERRORS_TOTAL: &str = "carousel_accept_errors_total";
    pub const AFFINITY_LOOKUPS_TOTAL: &str = "carousel_affinity_lookups_total";
    pub const AFFINITY_ENTRIES: &str = "carousel_affinity_entries";
    pub const AFFINITY_OVERFLOW_TOTAL: &str = "carousel_affinity_overflow_total";
    pub const LISTENERS_REFUSED: &str = "carousel_listeners_refused";
    pub const ENDPOINT_WEIGHT: &str = "carousel_endpoint_weight";
    pub const FAIRNESS_JAIN: &str = "carousel_fairness_jain";
    pub const FAIRNESS_WINDOW_PICKS: &str = "carousel_fairness_window_picks";
    pub const SHADOW_PICKS_TOTAL: &str = "carousel_shadow_picks_total";
    pub const UDP_FLOWS_TOTAL: &str = "carousel_udp_flows_total";
    pub const UDP_FLOWS_ACTIVE: &str = "carousel_udp_flows_active";
    pub const UDP_DATAGRAMS_TOTAL: &str = "carousel_udp_datagrams_total";
    pub const UDP_DROPPED_TOTAL: &str = "carousel_udp_dropped_total";
    pub const PROXY_HEADERS_TOTAL: &str = "carousel_proxy_headers_total";
    pub const SOURCE_CONNECTIONS_TOTAL: &str = "carousel_source_connections_total";

    // kube-proxy's own names, buckets and meaning (its `pkg/proxy/metrics`), so that
    // what watches kube-proxy watches carousel.
    pub const KUBE_PROXY_SYNC_DURATION: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    pub const KUBE_PROXY_SYNC_LAST_TIMESTAMP: &str =
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
    pub const KUBE_PROXY_LAST_QUEUED_TIMESTAMP: &str =
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
    pub const KUBE_PROXY_NETWORK_PROGRAMMING_DURATION: &str =
        "kubeproxy_network_programming_duration_seconds";
    pub const KUBE_PROXY_SERVICE_CHANGES_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_service_changes_total";
    pub const KUBE_PROXY_SERVICE_CHANGES_PENDING: &str =
        "kubeproxy_sync_proxy_rules_service_changes_pending";
    pub const KUBE_PROXY_ENDPOINT_CHANGES_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_endpoint_changes_total";
    pub const KUBE_PROXY_ENDPOINT_CHANGES_PENDING: &str =
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
    pub const KUBE_PROXY_NFTABLES_SYNC_FAILURES_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total";
    pub const KUBE_PROXY_HEALTHZ_TOTAL: &str = "kubeproxy_proxy_healthz_total";
    pub const KUBE_PROXY_LIVEZ_TOTAL: &str = "kubeproxy_proxy_livez_total";

    /// The `# HELP` text of each family.
    pub(crate) fn help(name: &str) -> &'static str {
        match name {
            CONNECTIONS_TOTAL => "Connections handed to an endpoint, by outcome (ok, connect_error, no_endpoint).",
            CONNECTIONS_ACTIVE => "Connections open to an endpoint now.",
            BYTES_TOTAL => "Bytes copied, by direction (to_endpoint, to_client).",
            CONNECT_DURATION => "Time to connect to the endpoint, in seconds.",
            CONNECTION_DURATION => "Lifetime of forwarded connections, in seconds.",
            ENDPOINTS => "Endpoints of a Service port, by state (ready, serving, terminating).",
            CONFIG_ERRORS_TOTAL => "Objects or annotations refused as invalid (the last good state is kept).",
            SYNC_DURATION => "Time to apply a new table to routes and the data plane, in seconds.",
            SYNC_ERRORS_TOTAL => "Failed attempts to program the data plane.",
            SYNC_LAST_TIMESTAMP => "When the node was last programmed (a new table or a periodic check), in unix seconds.",
            BUILD_INFO => "carousel's version and platform, as labels; always 1.",
            NETWORK_PROGRAMMING_DURATION => "From an EndpointSlice change (its trigger time) until the node is programmed with it, in seconds.",
            EJECTIONS_TOTAL => "Times an endpoint was taken out of rotation after failed connects.",
            EJECTED_UNTIL => "Unix time the endpoint's current ejection ends (0: not ejected since its last success; a past time: the ejection is over).",
            REJECTED_TOTAL => "Connections refused before forwarding, by reason.",
            ACCEPT_ERRORS_TOTAL => "Errors accepting connections (for example, out of file descriptors).",
            AFFINITY_LOOKUPS_TOTAL => "ClientIP session affinity lookups, by result (hit, miss, expired).",
            AFFINITY_OVERFLOW_TOTAL => "New clients balanced without being remembered: the affinity map held its limit of live clients.",
            LISTENERS_REFUSED => "Service addresses bind mode does not listen on because the descriptor limit (RLIMIT_NOFILE) leaves no room.",
            AFFINITY_ENTRIES => "Clients remembered for ClientIP session affinity.",
            ENDPOINT_WEIGHT => "The share of new connections an endpoint is weighted for (0: drained).",
            FAIRNESS_JAIN => "Jain's index of the last few seconds of picks over weights (1: every endpoint got its share).",
            FAIRNESS_WINDOW_PICKS => "Picks in the window carousel_fairness_jain was last computed over.",
            SHADOW_PICKS_TOTAL => "Picks a shadow balancer would have made, per endpoint.",
            UDP_FLOWS_TOTAL => "UDP flows (a client address and port to a Service port) opened to an endpoint.",
            UDP_FLOWS_ACTIVE => "UDP flows open to an endpoint now.",
            UDP_DATAGRAMS_TOTAL => "UDP datagrams forwarded, by direction (to_endpoint, to_client).",
            UDP_DROPPED_TOTAL => "UDP datagrams dropped, by reason (no_endpoint, flow_limit, endpoint_busy, client_busy, socket_error).",
            PROXY_HEADERS_TOTAL => "PROXY protocol headers sent to endpoints, by version (v1, v2): counted per TCP connection and per UDP flow (whose every datagram carries one).",
            SOURCE_CONNECTIONS_TOTAL => "Connections of Services with carousel.dev/source: transparent, by the source the pod saw (client; node: the endpoint is on another node or the mode cannot).",
            KUBE_PROXY_SYNC_DURATION => "SyncProxyRules latency in seconds: each successful programming of the node, a new table's or a periodic check's.",
            KUBE_PROXY_SYNC_LAST_TIMESTAMP => "The last time proxy rules were successfully synced.",
            KUBE_PROXY_LAST_QUEUED_TIMESTAMP => "The last time a sync of proxy rules was queued (a change arrived).",
            KUBE_PROXY_NETWORK_PROGRAMMING_DURATION => "In Cluster Network Programming Latency in seconds.",
            KUBE_PROXY_SERVICE_CHANGES_TOTAL => "Cumulative proxy rules Service changes.",
            KUBE_PROXY_SERVICE_CHANGES_PENDING => "Pending proxy rules Service changes.",
            KUBE_PROXY_ENDPOINT_CHANGES_TOTAL => "Cumulative proxy rules Endpoint changes.",
            KUBE_PROXY_ENDPOINT_CHANGES_PENDING => "Pending proxy rules Endpoint changes.",
            KUBE_PROXY_NFTABLES_SYNC_FAILURES_TOTAL => "Cumulative proxy nftables sync failures.",
            KUBE_PROXY_HEALTHZ_TOTAL => "Cumulative proxy healthz HTTP status.",
            KUBE_PROXY_LIVEZ_TOTAL => "Cumulative proxy livez HTTP status.",
            _ => "A carousel metric.",
        }
    }
}

/// Histogram buckets for everything measured in seconds: 100 µs to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One proxy's metrics registry and health state.
pub struct Telemetry {
    registry: Registry,
    health: Health,
    config_errors: Counter,
    /// Held for the process' life, as `config_errors` is.
    _build_info: Gauge,
    /// `/healthz` and `/livez` answers by code: 200 and 503.
    probes: [[Counter; 2]; 2],
    /// Registered at first use, by the source or the proxy.
    programming: OnceLock<Programming>,
    /// `--endpoint-histograms`: latency histograms per endpoint, not per Service port.
    endpoint_histograms: AtomicBool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    pub fn new() -> Arc<Self> {
        let registry = Registry::default();
        // Held for the process' life: zero errors is news too.
        let config_errors = registry.counter(names::CONFIG_ERRORS_TOTAL, names::help, &[]);
        let build_info = registry.gauge(
            names::BUILD_INFO,
            names::help,
            &[
                Label::new("version", env!("CARGO_PKG_VERSION")),
                Label::new("arch", std::env::consts::ARCH),
                Label::new("os", std::env::consts::OS),
            ],
        );
        build_info.set(1.0);
        let probe = |name, code: &'static str| {
            registry.counter(name, names::help, &[Label::new("code", code)])
        };
        let probes = [
            names::KUBE_PROXY_HEALTHZ_TOTAL,
            names::KUBE_PROXY_LIVEZ_TOTAL,
        ]
        .map(|name| [probe(name, "200"), probe(name, "503")]);
        Arc::new(Self {
            registry,
            health: Health::default(),
            config_errors,
            _build_info: build_info,
            probes,
            programming: OnceLock::new(),
            endpoint_histograms: AtomicBool::new(false),
        })
    }

    /// The series `name{labels}`: it stays in /metrics for as long as some handle of it
    /// is held, so hold it as long as what it describes lives.
    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.registry.counter(name, names::help, &labels)
    }

    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.registry.gauge(name, names::help, &labels)
    }

    /// A histogram in seconds, buckets from 100 µs to 5 min.
    pub(crate) fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        self.histogram_with(name, labels, SECONDS_BUCKETS)
    }

    /// A histogram with the given bucket bounds (kube-proxy's, for its families).
    pub(crate) fn histogram_with(
        &self,
        name: &'static str,
        labels: Vec<Label>,
        bounds: &'static [f64],
    ) -> Histogram {
        self.registry.histogram(name, names::help, &labels, bounds)
    }

    /// The changes between the source and the node, and their metrics.
    pub(crate) fn programming(&self) -> &Programming {
        self.programming.get_or_init(|| Programming::new(self))
    }

    /// Latency histograms per endpoint from now on (`--endpoint-histograms`), rather
    /// than per Service port: 2 × 22 more series for every endpoint with traffic.
    pub fn set_endpoint_histograms(&self, on: bool) {
        self.endpoint_histograms.store(on, Ordering::Relaxed);
    }

    pub(crate) fn endpoint_histograms(&self) -> bool {
        self.endpoint_histograms.load(Ordering::Relaxed)
    }

    /// `carousel_config_errors_total`.
    pub(crate) fn config_errors(&self) -> &Counter {
        &self.config_errors
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The Prometheus text exposition of every series, and the process families.
    pub fn render(&self) -> String {
        let mut text = self.registry.render();
        crate::process_metrics::render(&mut text);
        text
    }

    /// Counts a `/healthz` (or `/livez`) answer, as kube-proxy does.
    fn probed(&self, livez: bool, status: StatusCode) {
        let code = usize::from(status != StatusCode::OK);
        self.probes[usize::from(livez)][code].increment(1);
    }

    /// Forgets the series nothing holds now and then, so that memory follows the
    /// cluster when nobody scrapes.
    pub(crate) async fn upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            self.registry.sweep();
        }
    }
}

/// Whether the proxy has applied a table yet, when it last did, and whether a change
/// has waited too long for it; as kube-proxy's health server judges it.
#[derive(Debug)]
pub struct Health {
    last_sync: Mutex<Option<SystemTime>>,
    /// When the oldest change that is not programmed yet arrived.
    queued: Mutex<Option<SystemTime>>,
    /// How long a change may wait before `/healthz` says unhealthy (kube-proxy: twice
    /// the sync period).
    timeout: Mutex<Duration>,
    draining: AtomicBool,
    node_leaving: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            last_sync: Mutex::default(),
            queued: Mutex::default(),
            timeout: Mutex::new(Duration::from_secs(60)),
            draining: AtomicBool::new(false),
            node_leaving: AtomicBool::new(false),
        }
    }
}

/// `/healthz` and `/livez` as kube-proxy answers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HealthReport {
    /// The last sync, if any.
    pub(crate) last_updated: Option<SystemTime>,
    pub(crate) current_time: SystemTime,
    /// Synced once, and no change has waited longer than the timeout.
    pub(crate) healthy: bool,
    /// Not being deleted or drained by the cluster autoscaler.
    pub(crate) node_eligible: bool,
}

impl HealthReport {
    /// kube-proxy's JSON, times in RFC 3339 (Go's zero time for never).
    pub(crate) fn json(&self) -> String {
        let time = |t: SystemTime| humantime::format_rfc3339_nanos(t).to_string();
        let last = self
            .last_updated
            .map_or_else(|| "0001-01-01T00:00:00Z".to_string(), time);
        format!(
            "{{\"lastUpdated\": \"{last}\", \"currentTime\": \"{}\", \"nodeEligible\": {}}}\n",
            time(self.current_time),
            self.node_eligible
        )
    }
}

impl Health {
    /// Shutting down: not ready for new connections any more, though still alive.
    pub(crate) fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A change arrived that is not programmed yet (the oldest one counts).
    pub(crate) fn queued(&self) {
        let mut queued = self.queued.lock().expect("health lock poisoned");
        queued.get_or_insert_with(SystemTime::now);
    }

    /// Everything that arrived is programmed.
    pub(crate) fn synced(&self) {
        *self.last_sync.lock().expect("health lock poisoned") = Some(SystemTime::now());
        *self.queued.lock().expect("health lock poisoned") = None;
    }

    pub fn last_sync(&self) -> Option<SystemTime> {
        *self.last_sync.lock().expect("health lock poisoned")
    }

    pub(crate) fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().expect("health lock poisoned") = timeout;
    }

    pub(crate) fn set_node_leaving(&self, leaving: bool) {
        self.node_leaving.store(leaving, Ordering::Relaxed);
    }

    /// The state at `now`.
    pub(crate) fn report(&self, now: SystemTime) -> HealthReport {
        let last_updated = self.last_sync();
        let queued = *self.queued.lock().expect("health lock poisoned");
        let timeout = *self.timeout.lock().expect("health lock poisoned");
        let waited_too_long =
            queued.is_some_and(|at| now.duration_since(at).unwrap_or_default() > timeout);
        HealthReport {
            last_updated,
            current_time: now,
            healthy: last_updated.is_some() && !waited_too_long,
            node_eligible: !self.node_leaving.load(Ordering::Relaxed),
        }
    }
}

/// What an HTTP listener of carousel's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// `/metrics` only (`--metrics-bind-address`).
    Metrics,
    /// `/healthz` and `/readyz` only (`--healthz-bind-address`): health answers only health.
    Health,
}

/// Connections one telemetry server holds at once. A node's scraper and its kubelet's
/// probes need a few; past the cap a new connection is closed at once, so that no client
/// of these ports can take the descriptors the data path needs.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// Time for a request's headers to arrive, from the connection's start or the end of the
/// previous answer: a client that sends nothing (or trickles) is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `which` on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    which: Endpoints,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "telemetry accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "telemetry connections at their cap; closing a new one");
            continue;
        };
        let telemetry = telemetry.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let telemetry = telemetry.clone();
                async move { Ok::<_, Infallible>(respond(&telemetry, which, &req)) }
            }),
        );
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "telemetry connection ended");
            }
        });
    }
}

/// An HTTP answer of carousel's small servers (telemetry, health check node ports).
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn respond<B>(telemetry: &Telemetry, which: Endpoints, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status, body| response(status, "text/plain; version=0.0.4; charset=utf-8", body);
    let json = |status, body| response(status, "application/json", body);
    let ok_if = |ok: bool| {
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    match (which, req.uri().path()) {
        (Endpoints::Metrics, "/metrics") => reply(StatusCode::OK, telemetry.render()),
        // kube-proxy's: programmed in time, and (for /healthz, which load balancers ask)
        // a node that is not leaving.
        (Endpoints::Health, "/healthz") => {
            let report = telemetry.health.report(SystemTime::now());
            let status = ok_if(report.healthy && report.node_eligible);
            telemetry.probed(false, status);
            json(status, report.json())
        }
        (Endpoints::Health, "/livez") => {
            let report = telemetry.health.report(SystemTime::now());
            let status = ok_if(report.healthy);
            telemetry.probed(true, status);
            json(status, report.json())
        }
        (Endpoints::Health, "/readyz") if telemetry.health.is_draining() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_string(),
        ),
        (Endpoints::Health, "/readyz") => match telemetry.health.last_sync() {
            Some(at) => {
                let secs = at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                reply(
                    StatusCode::OK,
                    format!("ok: last sync at {secs:.3} (unix seconds)\n"),
                )
            }
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no table applied yet\n".to_string(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "not found\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn health_follows_kube_proxys_rules() {
        let health = Health::default();
        health.set_timeout(Duration::from_secs(60));
        let never = health.report(SystemTime::now());
        assert!(!never.healthy, "never synced");
        assert!(never
            .json()
            .contains(r#""lastUpdated": "0001-01-01T00:00:00Z""#));

        health.synced();
        let now = SystemTime::now();
        assert!(health.report(now).healthy);
        // A change waits: healthy within the timeout, unhealthy past it.
        health.queued();
        assert!(health.report(now + Duration::from_secs(59)).healthy);
        assert!(!health.report(now + Duration::from_secs(61)).healthy);
        health.queued(); // a later change does not restart the clock
        assert!(!health.report(now + Duration::from_secs(61)).healthy);
        health.synced();
        assert!(health.report(now + Duration::from_secs(61)).healthy);

        health.set_node_leaving(true);
        let leaving = health.report(now);
        assert!(leaving.healthy && !leaving.node_eligible);
    }

    #[test]
    fn the_report_is_kube_proxys_json() {
        let report = HealthReport {
            last_updated: Some(at(1_700_000_000)),
            current_time: at(1_700_000_005),
            healthy: true,
            node_eligible: false,
        };
        let value: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(value["lastUpdated"], "2023-11-14T22:13:20.000000000Z");
        assert_eq!(value["currentTime"], "2023-11-14T22:13:25.000000000Z");
        assert_eq!(value["nodeEligible"], false);
    }
}
