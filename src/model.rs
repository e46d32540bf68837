//! The proxy's view of the cluster: Services, their ports and endpoints, free of any
//! Kubernetes type. Discovery builds a `ServiceTable`; the data path only reads it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::addr::PodAddr;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
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
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// One Service that carousel proxies: only TCP ports of ClusterIP, NodePort and
/// LoadBalancer Services make it into the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub key: ServiceKey,
    /// `spec.clusterIPs` (both families on a dual-stack Service).
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub balancing: Balancing,
    /// `externalTrafficPolicy: Local`: node ports and load-balancer IPs reach only this node's endpoints.
    pub external_traffic_local: bool,
}

/// How new connections of one Service are spread over its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balancing {
    /// A name from the balancer registry (`carousel.dev/load-balancer`).
    pub algorithm: String,
    /// `spec.sessionAffinity: ClientIP` and its inactivity timeout.
    pub affinity: Option<Duration>,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            algorithm: crate::balance::DEFAULT_ALGORITHM.to_string(),
            affinity: None,
        }
    }
}

/// One TCP port of a Service with the endpoints behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name; empty when the Service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Every known endpoint, deduplicated and sorted by address, whatever its state.
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// The metric label: the port's name, or its number when unnamed.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.port.to_string()
        } else {
            self.name.clone()
        }
    }

    /// The endpoints that take new connections, by kube-proxy's rule: the ready ones;
    /// if none is ready, those still serving while terminating (KEP-1669). Endpoints
    /// with weight 0 are being drained and take none, but a drained ready endpoint still
    /// keeps the terminating ones out.
    pub fn eligible(&self) -> Vec<Endpoint> {
        let any_ready = self.endpoints.iter().any(|e| e.ready);
        self.endpoints
            .iter()
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
}

/// One pod address behind a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: PodAddr,
    /// The pod's name (`targetRef`), empty when the slice names none.
    pub pod: Arc<str>,
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Relative share of new connections (`carousel.dev/weights`); 1 unless set.
    pub weight: u32,
}

/// An immutable snapshot of every Service carousel handles, keyed and sorted by Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceTable {
    pub services: BTreeMap<ServiceKey, Service>,
}

impl ServiceTable {
    pub fn get(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}
