//! The proxy's view of the cluster: Services, their ports and endpoints, free of any
//! Kubernetes type. Discovery builds a `ServiceTable`; the data path only reads it.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::addr::{PodAddr, ServiceAddr};
pub use crate::algorithm::Algorithm;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub(crate) namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// One Service that carousel proxies: only TCP and UDP ports of ClusterIP, NodePort and
/// LoadBalancer Services make it into the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub key: ServiceKey,
    /// `spec.clusterIPs` (both families on a dual-stack Service).
    pub(crate) cluster_ips: Vec<IpAddr>,
    pub(crate) external_ips: Vec<IpAddr>,
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub balancing: Balancing,
    /// `externalTrafficPolicy: Local`: node ports and load-balancer IPs reach only this node's endpoints.
    pub(crate) external_traffic_local: bool,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic reaches only this node's endpoints.
    pub(crate) internal_traffic_local: bool,
    /// Topology-aware routing (`trafficDistribution: PreferClose`): prefer the endpoints
    /// hinted for this node's zone.
    pub(crate) prefer_close: bool,
    /// `spec.healthCheckNodePort` of an `externalTrafficPolicy: Local` Service: where
    /// load balancers ask whether this node has endpoints of it.
    pub(crate) health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges`: when any is of an address's family, only clients
    /// inside one reach the Service at its load-balancer IPs of that family.
    pub(crate) load_balancer_source_ranges: Vec<IpNet>,
    /// How the pods learn the client's address.
    pub(crate) source: ClientSource,
}

/// How a Service's pods learn the client's address, beyond the connection's own source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSource {
    /// `carousel.dev/proxy-protocol`: a PROXY protocol header before the client's bytes.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `carousel.dev/source: transparent`: connections to this node's endpoints leave
    /// from the client's own address.
    pub transparent: bool,
}

/// The version of the PROXY protocol header sent to a Service's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// The text header (`PROXY TCP4 ...`); TCP only.
    V1,
    /// The binary header; TCP, and UDP before each datagram.
    V2,
}

impl ProxyProtocol {
    /// As the annotation and the `version` label spell it.
    pub fn name(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// Where this carousel runs, for node-local and zone-aware endpoint selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

impl Locality {
    /// Whether `endpoint` is on this node: both names known, and the same.
    pub(crate) fn holds(&self, endpoint: &Endpoint) -> bool {
        endpoint.placement.node.is_some() && endpoint.placement.node == self.node
    }
}

/// Which way a connection reached the Service: the two may see different endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Traffic {
    /// To a ClusterIP.
    Internal,
    /// To an external IP, a load-balancer IP or a node port.
    External,
    /// To an external IP, a load-balancer IP or a node port of an
    /// `externalTrafficPolicy: Local` Service, from a pod or from the node itself: it
    /// never left the cluster, so it goes to every endpoint, as kube-proxy sends it.
    Inside,
}

/// How new connections of one Service are spread over its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    /// `carousel.dev/load-balancer`; round-robin when unset.
    pub algorithm: Algorithm,
    /// `spec.sessionAffinity: ClientIP` and its inactivity timeout.
    pub affinity: Option<Duration>,
}

/// The transport of a Service port. TCP 53 and UDP 53 of one Service are two ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// As Kubernetes spells it (`spec.ports[].protocol`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Service address with the transport it is dialed over: TCP and UDP 53 of one
/// ClusterIP are two Service ports.
pub type Dialed = (Protocol, ServiceAddr);

/// One TCP or UDP port of a Service with the endpoints behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name; empty when the Service has a single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Every known endpoint, deduplicated and sorted by address, whatever its state.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The metric label: the port's name, or its number when unnamed.
    pub(crate) fn label(&self) -> String {
        if self.name.is_empty() {
            self.port.to_string()
        } else {
            self.name.clone()
        }
    }

    /// The endpoints that take new connections among those `candidate` lets through,
    /// by kube-proxy's rule: the ready ones; if none is ready, those still serving while
    /// terminating (KEP-1669). Endpoints with weight 0 are being drained and take none,
    /// but a drained ready endpoint still keeps the terminating ones out.
    pub(crate) fn eligible_where(&self, candidate: impl Fn(&Endpoint) -> bool) -> Vec<Endpoint> {
        let candidates: Vec<&Endpoint> = self.endpoints.iter().filter(|e| candidate(e)).collect();
        let any_ready = candidates.iter().any(|e| e.ready);
        candidates
            .into_iter()
            .filter(|e| e.weight > 0)
            .filter(|e| {
                if any_ready {
                    e.ready
                } else {
                    e.serving && e.terminating
                }
            })
            .cloned()
            .collect()
    }

    /// [`ServicePort::eligible_where`] over every endpoint.
    pub(crate) fn eligible(&self) -> Vec<Endpoint> {
        self.eligible_where(|_| true)
    }

    /// The endpoints for new connections of one kind of traffic, seen from `here`:
    /// node-local under a `Local` traffic policy (none when this node has none, as
    /// kube-proxy does), zone-hinted under topology-aware routing when every endpoint
    /// carries hints and some serve this zone (all endpoints otherwise).
    pub(crate) fn select(
        &self,
        service: &Service,
        traffic: Traffic,
        here: &Locality,
    ) -> Vec<Endpoint> {
        let local_only = match traffic {
            Traffic::Internal => service.internal_traffic_local,
            Traffic::External => service.external_traffic_local,
            Traffic::Inside => false,
        };
        if local_only {
            return self.eligible_where(|e| here.holds(e));
        }
        let all = self.eligible();
        if traffic != Traffic::External && service.prefer_close {
            if let Some(zone) = &here.zone {
                let hinted = all.iter().all(|e| !e.placement.zone_hints.is_empty());
                let close: Vec<Endpoint> = all
                    .iter()
                    .filter(|e| e.placement.zone_hints.contains(zone))
                    .cloned()
                    .collect();
                if hinted && !close.is_empty() {
                    return close;
                }
            }
        }
        all
    }
}

/// One pod address behind a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: PodAddr,
    /// The pod's name (`targetRef`), empty when the slice names none.
    pub(crate) pod: Arc<str>,
    pub(crate) placement: Arc<Placement>,
    pub ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
    /// Relative share of new connections (`carousel.dev/weights`); 1 unless set.
    pub weight: u32,
}

/// Where an endpoint runs: its node, its zone and the zones it is hinted for. One value
/// is shared by all the endpoints that run alike (`discovery::names`), so that it costs
/// each of them a pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Placement {
    pub(crate) node: Option<Arc<str>>,
    pub(crate) zone: Option<Arc<str>>,
    /// `hints.forZones` of the EndpointSlice.
    pub(crate) zone_hints: Box<[Arc<str>]>,
}

/// An immutable snapshot of every Service carousel handles, keyed and sorted by Service.
///
/// A persistent map of `Arc`s: the API source publishes a new snapshot after one
/// Service changed by sharing every other one and all but one path of the map, so a
/// copy costs O(1) and a change O(log n), and the proxy's `diff` of two snapshots
/// skips what they share.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceTable {
    pub services: imbl::OrdMap<ServiceKey, Arc<Service>>,
    /// This node's zone, as the source knows it (its Node's label, or `--zone`): zone
    /// preferences follow it, so a new label reaches the proxy as a new table.
    pub(crate) zone: Option<Arc<str>>,
    /// This node is being deleted or drained by the cluster autoscaler (kube-proxy's
    /// `nodeEligible: false` on `/healthz`).
    pub(crate) node_leaving: bool,
    /// `spec.podCIDRs` of this node's Node: a client inside one is a pod of this node.
    pub(crate) pod_cidrs: Vec<IpNet>,
}

impl ServiceTable {
    pub fn get(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key).map(Arc::as_ref)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ep(last: u8, node: &str, zone_hints: &[&str], ready: bool) -> Endpoint {
        Endpoint {
            addr: PodAddr(SocketAddr::from(([10, 244, 0, last], 8080))),
            pod: format!("pod-{last}").into(),
            placement: Arc::new(Placement {
                node: Some(node.into()),
                zone: None,
                zone_hints: zone_hints.iter().map(|z| Arc::from(*z)).collect(),
            }),
            ready,
            serving: true,
            terminating: !ready,
            weight: 1,
        }
    }

    fn service(endpoints: Vec<Endpoint>, tweak: impl FnOnce(&mut Service)) -> Service {
        let mut s = Service {
            key: ServiceKey::new("ns", "web"),
            cluster_ips: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                name: "http".into(),
                port: 80,
                node_port: Some(30080),
                endpoints,
            }],
            balancing: Balancing::default(),
            external_traffic_local: false,
            health_check_node_port: None,
            load_balancer_source_ranges: Vec::new(),
            source: ClientSource::default(),
            internal_traffic_local: false,
            prefer_close: false,
        };
        tweak(&mut s);
        s
    }

    fn picked(s: &Service, traffic: Traffic, node: &str, zone: &str) -> Vec<u8> {
        let here = Locality {
            node: Some(node.into()),
            zone: Some(zone.into()),
        };
        s.ports[0]
            .select(s, traffic, &here)
            .iter()
            .map(|e| match e.addr.ip() {
                std::net::IpAddr::V4(ip) => ip.octets()[3],
                std::net::IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn internal_traffic_local_keeps_this_nodes_endpoints_only() {
        let s = service(vec![ep(1, "n1", &[], true), ep(2, "n2", &[], true)], |s| {
            s.internal_traffic_local = true
        });
        assert_eq!(picked(&s, Traffic::Internal, "n1", "z"), vec![1]);
        assert_eq!(picked(&s, Traffic::External, "n1", "z"), vec![1, 2]);
        assert_eq!(
            picked(&s, Traffic::Internal, "n3", "z"),
            Vec::<u8>::new(),
            "no local endpoint: none"
        );
    }

    #[test]
    fn external_traffic_local_applies_to_external_traffic_only() {
        let s = service(vec![ep(1, "n1", &[], true), ep(2, "n2", &[], true)], |s| {
            s.external_traffic_local = true
        });
        assert_eq!(picked(&s, Traffic::External, "n2", "z"), vec![2]);
        assert_eq!(picked(&s, Traffic::Internal, "n2", "z"), vec![1, 2]);
    }

    #[test]
    fn a_local_terminating_endpoint_serves_when_no_local_one_is_ready() {
        let s = service(vec![ep(1, "n1", &[], false), ep(2, "n2", &[], true)], |s| {
            s.external_traffic_local = true
        });
        assert_eq!(picked(&s, Traffic::External, "n1", "z"), vec![1]);
    }

    #[test]
    fn prefer_close_uses_the_zone_hints_and_falls_back_to_all() {
        let hinted = vec![
            ep(1, "n1", &["a"], true),
            ep(2, "n2", &["b"], true),
            ep(3, "n3", &["a"], true),
        ];
        let s = service(hinted.clone(), |s| s.prefer_close = true);
        assert_eq!(picked(&s, Traffic::Internal, "n1", "a"), vec![1, 3]);
        assert_eq!(picked(&s, Traffic::Internal, "n1", "b"), vec![2]);
        assert_eq!(
            picked(&s, Traffic::Internal, "n1", "c"),
            vec![1, 2, 3],
            "no endpoint for this zone"
        );
        assert_eq!(
            picked(&s, Traffic::External, "n1", "a"),
            vec![1, 2, 3],
            "hints are for internal traffic"
        );

        let mut partly = hinted;
        partly[1].placement = Arc::default();
        let s = service(partly, |s| s.prefer_close = true);
        assert_eq!(
            picked(&s, Traffic::Internal, "n1", "a"),
            vec![1, 2, 3],
            "an endpoint without hints: ignore hints"
        );

        let s = service(
            vec![ep(1, "n1", &["a"], true), ep(2, "n2", &["b"], true)],
            |_| {},
        );
        assert_eq!(
            picked(&s, Traffic::Internal, "n1", "a"),
            vec![1, 2],
            "hints only when asked for"
        );
    }

    #[test]
    fn drained_ready_endpoints_still_keep_terminating_ones_out() {
        let mut drained = ep(1, "n1", &[], true);
        drained.weight = 0;
        let s = service(vec![drained, ep(2, "n1", &[], false)], |_| {});
        assert!(s.ports[0].eligible().is_empty());
    }
}
