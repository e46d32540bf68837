//! What carousel keeps of one endpoint of one Service port while it stays in the
//! table: its open-connection count (which the balancer reads), passive health, pick
//! count and metric series. One allocation per endpoint, carried from each route table
//! to the next; its series are registered at its first connection and leave with it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::addr::PodAddr;
use crate::proxy::ejection::Ejection;
use crate::proxy::port_metrics::{EndpointSeries, PortMetrics, Series, UdpEndpointSeries};

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
