//! What carousel keeps of one endpoint of one Service port while it stays in the
//! table: its open-connection count (which the balancer reads), passive health, pick
//! count and metric series. One allocation per endpoint, carried from each route table
//! to the next; its series are registered at its first connection and leave with it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::addr::PodAddr;
use crate::proxy::clock::now_ms;
use crate::proxy::ejection::Ejection;
use crate::proxy::port_metrics::{EndpointSeries, PortMetrics, Series, UdpEndpointSeries};
use crate::proxy::source::Fallback;

#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) addr: PodAddr,
    pub(crate) pod: Arc<str>,
    /// Open connections; the same counter the balancer reads.
    pub(crate) active: Arc<AtomicU32>,
    /// Passive health.
    pub(crate) ejection: Ejection,
    /// Picks of this endpoint, read by the fairness task (`fairness.rs`): a plain
    /// atomic because a metrics counter cannot be read back.
    pub(crate) picks: AtomicU64,
    /// Its weight while it takes new connections, else 0; the weight gauge shows it
    /// once the series exist.
    weight: AtomicU32,
    port: Arc<PortMetrics>,
    /// Boxed: most endpoints never get a connection through this node, and an empty
    /// slot costs a pointer.
    series: OnceLock<Box<Series>>,
    /// Whether it said why its connections leave from the node's address although the
    /// Service asks for a transparent source: once in its life, not per connection.
    said_fallback: AtomicBool,
}

impl EndpointState {
    pub(crate) fn new(addr: PodAddr, pod: Arc<str>, port: &Arc<PortMetrics>) -> Self {
        Self {
            addr,
            pod,
            active: Arc::default(),
            ejection: Ejection::default(),
            picks: AtomicU64::new(0),
            weight: AtomicU32::new(0),
            port: port.clone(),
            series: OnceLock::new(),
            said_fallback: AtomicBool::new(false),
        }
    }

    /// Says, the first time only, that a transparent Service's connections to this
    /// endpoint leave from the node's address, and why.
    pub(crate) fn say_fallback(&self, why: Fallback) {
        if !self.said_fallback.swap(true, Ordering::Relaxed) {
            tracing::info!(
                service = %self.port.service,
                port = %self.port.port,
                endpoint = %self.addr,
                pod = %self.pod,
                "carousel.dev/source: transparent: this endpoint is reached from the node's address: {}",
                why.reason()
            );
        }
    }

    /// The endpoint's series, of its port's protocol, registered on first use.
    fn registered(&self) -> &Series {
        self.series.get_or_init(|| {
            let weight = self.weight.load(Ordering::Relaxed);
            Box::new(self.port.endpoint(self.addr, &self.pod, weight))
        })
    }

    /// The series of an endpoint of a TCP port.
    pub(crate) fn series(&self) -> &EndpointSeries {
        match self.registered() {
            Series::Tcp(series) => series,
            // A state belongs to one Service port: the routes of a UDP port have no
            // connections.
            Series::Udp(_) => unreachable!("connection series of a UDP endpoint"),
        }
    }

    /// The series of an endpoint of a UDP port.
    pub(crate) fn udp_series(&self) -> &UdpEndpointSeries {
        match self.registered() {
            Series::Udp(series) => series,
            Series::Tcp(_) => unreachable!("flow series of a TCP endpoint"),
        }
    }

    /// Takes the endpoint out of rotation after a failure (a refused or reset
    /// connection, an ICMP port unreachable): counted, and when it ends shown in unix
    /// time, which the gauge keeps once the ejection is over by itself. Returns how
    /// long it lasts.
    pub(crate) fn eject(&self) -> Duration {
        let period = self.ejection.failed(now_ms());
        let (count, until) = self.registered().ejection();
        count.increment(1);
        let ends = SystemTime::now() + period;
        until.set(
            ends.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        period
    }

    /// A connection (a flow) the endpoint took: healthy again. The gauge is written
    /// only when a record was cleared, so the usual case stays one relaxed load.
    pub(crate) fn succeeded(&self) {
        if self.ejection.succeeded() {
            self.registered().ejection().1.set(0.0);
        }
    }

    /// Sets the weight, and the gauge when the series exist.
    pub(crate) fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
        match self.series.get().map(Box::as_ref) {
            Some(Series::Tcp(series)) => series.weight.set(f64::from(weight)),
            Some(Series::Udp(series)) => series.weight.set(f64::from(weight)),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::algorithm::Algorithm;
    use crate::model::Locality;
    use crate::proxy::routes::tests::{endpoint, table};
    use crate::proxy::routes::{RouteBuilder, RouteTable};
    use crate::telemetry::{names, Telemetry};

    #[test]
    fn an_ejection_shows_when_it_ends_until_a_success_clears_it() {
        let table = table(Algorithm::RoundRobin, None, vec![endpoint(1, true, 1)]);
        let telemetry = Telemetry::new();
        let routes = RouteBuilder::new(&telemetry, Default::default()).build(
            &table,
            &RouteTable::default(),
            &Locality::default(),
        );
        let e = &routes.internal_routes().next().unwrap().endpoints[0];
        let until = || {
            crate::status::samples(&telemetry.render())
                .into_iter()
                .find(|s| s.name == names::EJECTED_UNTIL)
                .map(|s| s.value)
        };
        e.succeeded();
        assert_eq!(until(), None, "a success alone registers nothing");
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let period = e.eject();
        let ends = until().unwrap();
        assert!(
            ends >= before + period.as_secs_f64() && ends < before + period.as_secs_f64() + 60.0,
            "{ends} against {before} + {period:?}"
        );
        e.succeeded();
        assert_eq!(until(), Some(0.0));
    }
}
