//! The data path's lookup table: from the address a client dialed to the Service port
//! behind it, with its balancer and the metric handles of each endpoint. Built from a
//! `ServiceTable` and the previous route table, so that balancer state, open-connection
//! counts and metric handles carry over for the endpoints that persist.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use metrics::Counter;

use crate::addr::{ClientAddr, PodAddr, ServiceAddr};
use crate::algorithm::Algorithm;
use crate::balance::{self, AffinityStats, Backend, Backends, Balancer, BuildOptions, Picker};
pub(crate) use crate::model::Dialed;
use crate::model::{
    Endpoint, Locality, Protocol, ProxyProtocol, Service, ServiceKey, ServicePort, ServiceTable,
    Traffic,
};
use crate::proxy::endpoint::EndpointState;
use crate::proxy::port_metrics::PortMetrics;
use crate::telemetry::Telemetry;

/// One endpoint as the data path sees it: its lasting state and its weight in this
/// route. Reads as the state (`endpoint.addr`, `endpoint.active`, ...).
#[derive(Debug, Clone)]
pub(crate) struct RouteEndpoint {
    pub(crate) state: Arc<EndpointState>,
    pub(crate) weight: u32,
    /// On this node (its EndpointSlice says so, and this node's name is known): what a
    /// transparent source needs, since only this node's pods send their replies back
    /// through it.
    pub(crate) local: bool,
}

impl std::ops::Deref for RouteEndpoint {
    type Target = EndpointState;

    fn deref(&self) -> &EndpointState {
        &self.state
    }
}

/// One Service port: where its connections may go and how the next one is chosen.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) service: ServiceKey,
    /// The port's metric label: its name, or its number when unnamed.
    pub(crate) port: String,
    /// Parallel to the balancer's backends: index `i` of a pick is `endpoints[i]`.
    pub(crate) endpoints: Vec<RouteEndpoint>,
    balancer: Picker,
    /// The port's series; shared by its routes, and carried to the next table.
    pub(crate) metrics: Arc<PortMetrics>,
    /// Algorithms evaluated beside the real one (`carousel run --shadow`).
    shadows: Vec<Shadow>,
    /// Whether the Service port has an endpoint for new connections anywhere in the
    /// cluster. Without one, its addresses refuse connections at the SYN (nftables mode)
    /// or have no listener (bind mode): the client sees ECONNREFUSED, as with kube-proxy.
    pub(crate) has_endpoints: bool,
    /// Where connections from inside the cluster go instead (`Traffic::Inside`): set on
    /// the external route of an `externalTrafficPolicy: Local` Service whose every
    /// endpoint differs from this node's.
    pub(crate) inside: Option<Arc<Route>>,
    /// Picks made by this route, so that the fairness task skips idle ones at a glance.
    picks: AtomicU64,
    /// The PROXY protocol header its pods are sent (`carousel.dev/proxy-protocol`);
    /// `None` also for UDP under v1, which has no UDP form.
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
    /// `carousel.dev/source: transparent`: connections to this node's endpoints leave
    /// from the client's address.
    pub(crate) transparent: bool,
}

/// An algorithm that picks beside the real one without deciding anything: each pick
/// only counts, in `carousel_shadow_picks_total`. It sees the same open-connection
/// counts as the real balancer and no ClientIP affinity.
#[derive(Debug)]
struct Shadow {
    balancer: Box<dyn Balancer>,
    /// Parallel to the route's endpoints, resolved when the route is built.
    picks: Vec<Counter>,
}

impl Route {
    /// The index of the endpoint for a new connection from `client`.
    /// [`Route::pick`] at `now`, the connection's own clock reading.
    pub(crate) fn pick_at(&self, client: ClientAddr, now: tokio::time::Instant) -> Option<usize> {
        let picked = self.balancer.pick_at(client.ip(), now);
        self.count(client, picked);
        picked
    }

    /// Counts a pick for the fairness gauge, and where each shadow would have gone.
    fn count(&self, client: ClientAddr, picked: Option<usize>) {
        if let Some(i) = picked {
            self.picks.fetch_add(1, Ordering::Relaxed);
            self.endpoints[i].picks.fetch_add(1, Ordering::Relaxed);
        }
        for shadow in &self.shadows {
            if let Some(i) = shadow.balancer.pick(client.ip()) {
                shadow.picks[i].increment(1);
            }
        }
    }

    /// Picks made by this route (not by an earlier route of the same port).
    pub(crate) fn picks(&self) -> u64 {
        self.picks.load(Ordering::Relaxed)
    }

    /// Lets the ClientIP affinity map, if any, drop the clients that have expired (it
    /// does so at most every eighth of its timeout).
    pub(crate) fn sweep_affinity(&self, now: tokio::time::Instant) {
        if let Some(affinity) = self.balancer.affinity() {
            affinity.sweep_expired(now);
        }
    }
}

/// Maps keyed by addresses and names carousel chose itself: a fast hash (foldhash)
/// instead of SipHash, since no client picks these keys. Persistent (a hash trie):
/// the next table starts as an O(1) copy of the last and a changed Service rewrites a
/// few paths, instead of a copy of every entry. The data path looks one up per
/// connection.
type FastMap<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

/// What becomes of a new connection, by [`RouteTable::admit`].
#[derive(Debug)]
pub(crate) enum Admission<'a> {
    /// Forward it over this route.
    Route(&'a Arc<Route>),
    /// Nothing is served at the address dialed.
    NoService,
    /// The client is outside the Service's `loadBalancerSourceRanges`.
    OutOfRange,
}

/// The whole lookup table, swapped atomically on every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_addr: FastMap<Dialed, Arc<Route>>,
    by_node_port: FastMap<(Protocol, u16), Arc<Route>>,
    /// Keyed by port number, not label: no string is built to look a route up.
    by_port: FastMap<(ServiceKey, Protocol, u16, Traffic), Arc<Route>>,
    /// The source ranges of load-balancer addresses that have some of their family.
    source_ranges: FastMap<Dialed, Arc<[IpNet]>>,
    /// The table and locality the routes were built from. The next build walks the
    /// difference of the old and new tables (persistent maps: the subtrees they share
    /// are skipped) and rebuilds only the Services that are not the very same `Arc`.
    source: Arc<ServiceTable>,
    here: Locality,
    /// Unique to this table (0: the empty table nothing was built into).
    generation: u64,
    edits: Edits,
}

/// What a table changed from the table it was built from: the addresses and node ports
/// whose route may differ, so that whoever follows tables one by one (the nftables
/// sets) touches only those.
#[derive(Debug, Default)]
pub(crate) struct Edits {
    /// The generation of the table these edits apply to; `None` when this table was
    /// built from nothing (the first, or after this node's zone changed).
    pub(crate) after: Option<u64>,
    pub(crate) addrs: Vec<Dialed>,
    pub(crate) node_ports: Vec<(Protocol, u16)>,
}

/// Generations handed to built tables.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// One Service as it was and as it is now; `None` where it did not or does not exist.
type Change<'a> = (Option<&'a Arc<Service>>, Option<&'a Arc<Service>>);

impl RouteTable {
    /// The Service port a client reached by dialing `dialed`: its Service address, or
    /// else any local address at one of its node ports.
    pub(crate) fn lookup(&self, dialed: Dialed) -> Option<&Arc<Route>> {
        let (protocol, addr) = dialed;
        self.by_addr
            .get(&dialed)
            .or_else(|| self.by_node_port.get(&(protocol, addr.port())))
    }

    /// What becomes of a connection from `client` to `dialed`: its route (the cluster-wide
    /// one when `inside` says the client is in the cluster and the Service keeps outside
    /// traffic on this node), unless the Service's source ranges keep the client out.
    pub(crate) fn admit(
        &self,
        dialed: Dialed,
        client: ClientAddr,
        inside: impl FnOnce(IpAddr) -> bool,
    ) -> Admission<'_> {
        let Some(route) = self.lookup(dialed) else {
            return Admission::NoService;
        };
        if !self.source_ranges.is_empty() {
            if let Some(ranges) = self.source_ranges.get(&dialed) {
                if !ranges.iter().any(|net| net.contains(&client.ip())) {
                    return Admission::OutOfRange;
                }
            }
        }
        match &route.inside {
            Some(cluster) if inside(client.ip()) => Admission::Route(cluster),
            _ => Admission::Route(route),
        }
    }

    /// The route at a Service address (not a node port).
    pub(crate) fn service_addr(&self, addr: Dialed) -> Option<&Arc<Route>> {
        self.by_addr.get(&addr)
    }

    /// The route at a node port.
    pub(crate) fn node_port(&self, port: (Protocol, u16)) -> Option<&Arc<Route>> {
        self.by_node_port.get(&port)
    }

    /// The source ranges that guard a load-balancer address, if any do.
    pub(crate) fn source_range(&self, addr: Dialed) -> Option<&Arc<[IpNet]>> {
        self.source_ranges.get(&addr)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// What changed since the table this one was built from.
    pub(crate) fn edits(&self) -> &Edits {
        &self.edits
    }

    /// The load-balancer addresses guarded by source ranges, with their ranges.
    pub(crate) fn source_ranges(&self) -> impl Iterator<Item = (&Dialed, &Arc<[IpNet]>)> {
        self.source_ranges.iter()
    }

    /// Every Service address (ClusterIPs, external and load-balancer IPs) with its port.
    pub(crate) fn service_addrs(&self) -> impl Iterator<Item = (&Dialed, &Arc<Route>)> {
        self.by_addr.iter()
    }

    /// Every node port with its Service port.
    pub(crate) fn node_ports(&self) -> impl Iterator<Item = ((Protocol, u16), &Arc<Route>)> {
        self.by_node_port.iter().map(|(p, r)| (*p, r))
    }

    /// Every Service port.
    pub(crate) fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_port.values()
    }

    /// Every Service port's route for ClusterIP traffic: one per port, as the
    /// per-port series (`carousel_fairness_jain`) want.
    pub(crate) fn internal_routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_port
            .iter()
            .filter(|((_, _, _, traffic), _)| *traffic == Traffic::Internal)
            .map(|(_, route)| route)
    }

    /// Takes out every entry of `service`, as it was. An address another Service has
    /// taken since stays that Service's. The series of its ports leave /metrics with
    /// the last table that holds them.
    fn remove(&mut self, service: &Service) {
        let owned = |route: &Arc<Route>| route.service == service.key;
        for port in &service.ports {
            let key = |traffic| (service.key.clone(), port.protocol, port.port, traffic);
            self.by_port.remove(&key(Traffic::Internal));
            self.by_port.remove(&key(Traffic::External));
            self.by_port.remove(&key(Traffic::Inside));
            for ip in service
                .cluster_ips
                .iter()
                .chain(&service.external_ips)
                .chain(&service.load_balancer_ips)
            {
                let addr = (port.protocol, ServiceAddr(SocketAddr::new(*ip, port.port)));
                self.edits.addrs.push(addr);
                if self.by_addr.get(&addr).is_some_and(owned) {
                    self.by_addr.remove(&addr);
                    self.source_ranges.remove(&addr);
                }
            }
            if let Some(node_port) = port.node_port {
                let node_port = (port.protocol, node_port);
                self.edits.node_ports.push(node_port);
                if self.by_node_port.get(&node_port).is_some_and(owned) {
                    self.by_node_port.remove(&node_port);
                }
            }
        }
    }

    /// Puts in the routes of one port of `service`.
    fn insert(&mut self, service: &Service, port: &ServicePort, built: PortRoutes) {
        let PortRoutes {
            internal,
            external,
            inside,
        } = built;
        let claim = |taken: Option<Arc<Route>>, what: &dyn std::fmt::Display| {
            if let Some(other) = taken.filter(|r| r.service != service.key) {
                tracing::warn!(
                    "{what} is claimed by both {} and {}; {} takes it",
                    other.service,
                    service.key,
                    service.key
                );
            }
        };
        let dialed = |ip: &IpAddr| (port.protocol, ServiceAddr(SocketAddr::new(*ip, port.port)));
        for ip in &service.cluster_ips {
            let addr = dialed(ip);
            self.edits.addrs.push(addr);
            claim(self.by_addr.insert(addr, internal.clone()), &addr.1);
        }
        for ip in service
            .external_ips
            .iter()
            .chain(&service.load_balancer_ips)
        {
            let addr = dialed(ip);
            self.edits.addrs.push(addr);
            claim(self.by_addr.insert(addr, external.clone()), &addr.1);
            self.source_ranges.remove(&addr);
        }
        // kube-proxy's rule: the ranges of the address's family guard it; without any of
        // that family, it is open.
        for ip in &service.load_balancer_ips {
            let ranges: Arc<[IpNet]> = service
                .load_balancer_source_ranges
                .iter()
                .filter(|net| net.addr().is_ipv4() == ip.is_ipv4())
                .copied()
                .collect();
            if !ranges.is_empty() {
                self.source_ranges.insert(dialed(ip), ranges);
            }
        }
        if let Some(node_port) = port.node_port {
            self.edits.node_ports.push((port.protocol, node_port));
            let taken = self
                .by_node_port
                .insert((port.protocol, node_port), external.clone());
            claim(
                taken,
                &format_args!("node port {node_port}/{}", port.protocol),
            );
        }
        let key = |traffic| (service.key.clone(), port.protocol, port.port, traffic);
        self.by_port.insert(key(Traffic::Internal), internal);
        self.by_port.insert(key(Traffic::External), external);
        if let Some(inside) = inside {
            self.by_port.insert(key(Traffic::Inside), inside);
        }
    }
}

/// The Services that differ between `old` and `new` (every Service of `new` when
/// `only_changed` is false). The persistent maps' `diff` skips the subtrees the two
/// tables share, so one changed Service among 10 000 costs a walk of one path.
fn changes<'a>(
    old: &'a ServiceTable,
    new: &'a ServiceTable,
    only_changed: bool,
) -> Vec<Change<'a>> {
    use imbl::ordmap::DiffItem;
    if !only_changed {
        return new.services.values().map(|n| (None, Some(n))).collect();
    }
    old.services
        .diff(&new.services)
        .map(|item| match item {
            DiffItem::Add(_, n) => (None, Some(n)),
            DiffItem::Remove(_, o) => (Some(o), None),
            DiffItem::Update {
                old: (_, o),
                new: (_, n),
            } => (Some(o), Some(n)),
        })
        .collect()
}

/// The routes of one Service port.
struct PortRoutes {
    /// For ClusterIP traffic.
    internal: Arc<Route>,
    /// For external IPs, load-balancer IPs and node ports: `internal` itself when both
    /// see the same endpoints and nothing else differs.
    external: Arc<Route>,
    /// For external traffic that comes from inside the cluster, when it sees other
    /// endpoints than `external` (`Traffic::Inside`); `internal` itself when it sees
    /// the same.
    inside: Option<Arc<Route>>,
}

/// What a proxy builds each of its route tables with: the same for every table.
#[derive(Clone, Debug)]
pub struct RouteBuilder {
    telemetry: Arc<Telemetry>,
    options: BuildOptions,
    /// Algorithms evaluated beside each Service's own (`carousel run --shadow`).
    shadow: Vec<Algorithm>,
}

impl RouteBuilder {
    pub fn new(telemetry: &Arc<Telemetry>, options: BuildOptions) -> Self {
        Self {
            telemetry: telemetry.clone(),
            options,
            shadow: Vec::new(),
        }
    }

    /// The same, with the `shadow` algorithms evaluated beside each Service's own.
    pub(crate) fn with_shadows(self, shadow: Vec<Algorithm>) -> Self {
        Self { shadow, ..self }
    }

    /// Builds the table for `table`, seen from `here`, reusing what `previous` knew.
    ///
    /// A Service port gets one route for ClusterIP traffic and, when its traffic
    /// policies make external traffic see other endpoints, a second one for external
    /// IPs, load-balancer IPs and node ports.
    ///
    /// Services that are the very same `Arc` in `table` and in `previous`'s table keep
    /// their routes untouched; the others are taken out and put back. When `here`
    /// changed (this node's zone label), every Service is rebuilt, as zone preferences
    /// depend on it. Endpoints that persist keep their state either way.
    pub fn build(
        &self,
        table: &Arc<ServiceTable>,
        previous: &RouteTable,
        here: &Locality,
    ) -> RouteTable {
        let incremental = previous.here == *here;
        // O(1) copies of the persistent maps, that the changes below rewrite in part.
        let mut routes = if incremental {
            RouteTable {
                by_addr: previous.by_addr.clone(),
                by_node_port: previous.by_node_port.clone(),
                by_port: previous.by_port.clone(),
                source_ranges: previous.source_ranges.clone(),
                edits: Edits {
                    after: Some(previous.generation),
                    ..Edits::default()
                },
                ..RouteTable::default()
            }
        } else {
            RouteTable::default()
        };
        for (before, now) in changes(&previous.source, table, incremental) {
            if let Some(before) = before {
                routes.remove(before);
            }
            if let Some(now) = now {
                for port in &now.ports {
                    let built = self.build_port(now, port, previous, here);
                    routes.insert(now, port, built);
                }
            }
        }
        routes.source = table.clone();
        routes.here = here.clone();
        routes.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        if !incremental {
            routes.edits = Edits::default();
        }
        routes
    }

    /// The port's metric handles: the previous build's while they describe the same port,
    /// so that its counters carry on, else new ones.
    fn port_metrics(
        &self,
        service: &Service,
        port: &ServicePort,
        previous: Option<&Route>,
    ) -> Arc<PortMetrics> {
        let metrics = previous
            .map(|r| &r.metrics)
            .filter(|m| m.describes(&service.key, port))
            .cloned()
            .unwrap_or_else(|| Arc::new(PortMetrics::new(&self.telemetry, &service.key, port)));
        metrics.count_endpoints(port);
        metrics
    }

    /// The routes of one Service port, each over the endpoints its kind of traffic sees.
    fn build_port(
        &self,
        service: &Service,
        port: &ServicePort,
        previous: &RouteTable,
        here: &Locality,
    ) -> PortRoutes {
        let previous_route = |traffic| {
            previous
                .by_port
                .get(&(service.key.clone(), port.protocol, port.port, traffic))
                .map(Arc::as_ref)
        };
        let metrics = self.port_metrics(service, port, previous_route(Traffic::Internal));
        let has_endpoints = !port.eligible().is_empty();
        if !has_endpoints && port.endpoints.iter().any(|e| e.ready || e.serving) {
            warn_weighed_out(service, port);
        }
        let build = Build {
            service,
            port,
            metrics,
            has_endpoints,
            options: &self.options,
            shadow: &self.shadow,
            here,
        };
        let internal_endpoints = port.select(service, Traffic::Internal, here);
        let external_endpoints = port.select(service, Traffic::External, here);
        let inside_endpoints = service
            .external_traffic_local
            .then(|| port.select(service, Traffic::Inside, here))
            .filter(|e| *e != external_endpoints);
        let internal = Arc::new(build.route(
            internal_endpoints.clone(),
            &[previous_route(Traffic::Internal)],
        ));
        let inside = inside_endpoints.map(|endpoints| {
            if endpoints == internal_endpoints {
                internal.clone()
            } else {
                let known = [previous_route(Traffic::Inside), Some(internal.as_ref())];
                Arc::new(build.route(endpoints, &known))
            }
        });
        let external = if external_endpoints == internal_endpoints && inside.is_none() {
            internal.clone()
        } else {
            let known = [previous_route(Traffic::External), Some(internal.as_ref())];
            Arc::new(Route {
                inside: inside.clone(),
                ..build.route(external_endpoints, &known)
            })
        };
        PortRoutes {
            internal,
            external,
            inside,
        }
    }
}

/// Every endpoint that could serve weighs 0: the Service is drained by its own weights,
/// which a user reading `carousel_endpoints{state="ready"}` would not guess. Said at each
/// change of the Service, not per connection.
fn warn_weighed_out(service: &Service, port: &ServicePort) {
    tracing::warn!(
        service = %service.key,
        port = port.port,
        "every ready endpoint weighs 0 under carousel.dev/weights: new connections are refused until one weighs more"
    );
}

/// What every route of one Service port is built with.
struct Build<'a> {
    service: &'a Service,
    port: &'a ServicePort,
    metrics: Arc<PortMetrics>,
    /// Whether the port has an endpoint for new connections anywhere in the cluster.
    has_endpoints: bool,
    options: &'a BuildOptions,
    shadow: &'a [Algorithm],
    here: &'a Locality,
}

impl Build<'_> {
    /// One route over `eligible`. Endpoints that `known` routes already had keep their
    /// state (open connections, passive health, series); `known[0]`, the previous route
    /// of the same kind, hands its balancer state (and its shadows') on.
    fn route(&self, eligible: Vec<Endpoint>, known: &[Option<&Route>]) -> Route {
        let previous = known.first().copied().flatten();
        let known: HashMap<PodAddr, &RouteEndpoint> = known
            .iter()
            .rev()
            .flatten()
            .flat_map(|route| route.endpoints.iter().map(|e| (e.addr, e)))
            .collect();
        let endpoints: Vec<RouteEndpoint> = eligible
            .iter()
            .map(|e| RouteEndpoint {
                state: match known.get(&e.addr) {
                    Some(prev) if prev.pod == e.pod => prev.state.clone(),
                    _ => Arc::new(EndpointState::new(e.addr, e.pod.clone(), &self.metrics)),
                },
                weight: e.weight,
                local: self.here.holds(e),
            })
            .collect();
        set_weights(previous, &endpoints);
        let backends: Backends = endpoints
            .iter()
            .map(|r| Backend {
                addr: r.addr,
                weight: r.weight,
                active: r.active.clone(),
            })
            .collect();
        let affinity_stats = match self.service.balancing.affinity {
            Some(_) => self.metrics.affinity(),
            None => AffinityStats::default(),
        };
        let shadows = self.shadows(previous, &backends, &endpoints);
        let balancer = balance::rebuild_or_build(
            previous.map(|p| &p.balancer),
            &self.service.balancing,
            backends,
            self.options,
            affinity_stats,
        );
        Route {
            service: self.service.key.clone(),
            port: self.port.label(),
            endpoints,
            balancer,
            metrics: self.metrics.clone(),
            shadows,
            has_endpoints: self.has_endpoints,
            inside: None,
            picks: AtomicU64::new(0),
            proxy_protocol: self.service.source.proxy_protocol.filter(|version| {
                self.port.protocol == Protocol::Tcp || *version == ProxyProtocol::V2
            }),
            transparent: self.service.source.transparent,
        }
    }

    /// The shadow balancers of a route, each carrying its state over from the previous
    /// route's shadow of the same name, with its counters resolved once here.
    fn shadows(
        &self,
        previous: Option<&Route>,
        backends: &Backends,
        endpoints: &[RouteEndpoint],
    ) -> Vec<Shadow> {
        self.shadow
            .iter()
            .map(|&algorithm| {
                let carried = previous
                    .and_then(|p| {
                        p.shadows
                            .iter()
                            .find(|s| s.balancer.algorithm() == algorithm)
                    })
                    .map(|s| s.balancer.rebuild(backends.clone()));
                let balancer = carried
                    .unwrap_or_else(|| balance::build(algorithm, backends.clone(), self.options));
                let picks = endpoints
                    .iter()
                    .map(|e| self.metrics.shadow_picks(algorithm, e.addr, &e.pod))
                    .collect();
                Shadow { balancer, picks }
            })
            .collect()
    }
}

/// `carousel_endpoint_weight`: the endpoints' weights now, and 0 for those of the
/// previous route that take no new connections any more.
fn set_weights(previous: Option<&Route>, endpoints: &[RouteEndpoint]) {
    for gone in previous
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter(|old| !endpoints.iter().any(|e| Arc::ptr_eq(&e.state, &old.state)))
    {
        gone.set_weight(0);
    }
    for e in endpoints {
        e.set_weight(e.weight);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Balancing, ClientSource, Endpoint, Placement, Protocol, Service};
    use crate::proxy::listener;
    use crate::proxy::redirects::{self, Derived};
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    pub(crate) fn endpoint(last: u8, ready: bool, weight: u32) -> Endpoint {
        Endpoint {
            addr: PodAddr(SocketAddr::from(([10, 244, 0, last], 8080))),
            pod: format!("pod-{last}").into(),
            placement: Arc::new(Placement {
                node: None,
                zone: None,
                zone_hints: Box::default(),
            }),
            ready,
            serving: ready,
            terminating: false,
            weight,
        }
    }

    pub(crate) fn table(
        algorithm: Algorithm,
        affinity: Option<Duration>,
        endpoints: Vec<Endpoint>,
    ) -> Arc<ServiceTable> {
        let key = ServiceKey::new("default", "web");
        let service = Service {
            key: key.clone(),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                name: "http".into(),
                port: 80,
                node_port: None,
                endpoints,
            }],
            balancing: Balancing {
                algorithm,
                affinity,
            },
            external_traffic_local: false,
            internal_traffic_local: false,
            prefer_close: false,
            health_check_node_port: None,
            load_balancer_source_ranges: Vec::new(),
            source: ClientSource::default(),
        };
        Arc::new(ServiceTable {
            services: imbl::OrdMap::unit(key, Arc::new(service)),
            ..ServiceTable::default()
        })
    }

    fn picked(routes: &RouteTable, client: u8) -> PodAddr {
        let route = routes.routes().next().unwrap();
        let peer = ClientAddr(SocketAddr::from(([192, 0, 2, client], 40000)));
        route.endpoints[route.pick_at(peer, tokio::time::Instant::now()).unwrap()].addr
    }

    #[test]
    fn inside_clients_of_a_local_policy_reach_every_endpoint_and_source_ranges_guard_lb_ips() {
        let here = |last, node: &str| Endpoint {
            placement: Arc::new(Placement {
                node: Some(node.into()),
                ..Placement::default()
            }),
            ..endpoint(last, true, 1)
        };
        let mut table = (*table(
            Algorithm::RoundRobin,
            None,
            vec![here(1, "a"), here(2, "b")],
        ))
        .clone();
        let key = table.services.keys().next().unwrap().clone();
        let service = Arc::make_mut(table.services.get_mut(&key).unwrap());
        service.external_traffic_local = true;
        service.internal_traffic_local = true;
        service.load_balancer_ips = vec!["203.0.113.9".parse().unwrap()];
        service.external_ips = vec!["198.51.100.9".parse().unwrap()];
        service.load_balancer_source_ranges = vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let locality = Locality {
            node: Some("a".into()),
            zone: None,
        };
        let routes = RouteBuilder::new(&Telemetry::new(), BuildOptions::default()).build(
            &Arc::new(table),
            &RouteTable::default(),
            &locality,
        );
        let addr = |s: &str| ServiceAddr(s.parse().unwrap());
        let client = |s: &str| ClientAddr(SocketAddr::new(s.parse().unwrap(), 40000));
        let pods = |admission: Admission<'_>| match admission {
            Admission::Route(route) => route
                .endpoints
                .iter()
                .map(|e| e.addr.0.ip().to_string())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let (outside, inside) = (|_| false, |_| true);
        let external = (Protocol::Tcp, addr("198.51.100.9:80"));
        assert_eq!(
            pods(routes.admit(external, client("192.0.2.7"), outside)),
            ["10.244.0.1"]
        );
        assert_eq!(
            pods(routes.admit(external, client("10.244.9.9"), inside)),
            ["10.244.0.1", "10.244.0.2"]
        );
        // ClusterIP traffic keeps its own Local policy, whoever sends it.
        let cluster_ip = (Protocol::Tcp, addr("10.96.0.1:80"));
        assert_eq!(
            pods(routes.admit(cluster_ip, client("10.244.9.9"), inside)),
            ["10.244.0.1"]
        );
        let lb = (Protocol::Tcp, addr("203.0.113.9:80"));
        assert_eq!(
            pods(routes.admit(lb, client("192.0.2.7"), outside)),
            ["10.244.0.1"]
        );
        assert!(matches!(
            routes.admit(lb, client("198.51.100.1"), inside),
            Admission::OutOfRange
        ));
        assert!(matches!(
            routes.admit(
                (Protocol::Tcp, addr("10.96.0.2:80")),
                client("192.0.2.7"),
                inside
            ),
            Admission::NoService
        ));
        let guarded: Vec<_> = routes
            .source_ranges()
            .map(|(a, r)| (*a, r.to_vec()))
            .collect();
        assert_eq!(guarded, [(lb, vec!["192.0.2.0/24".parse().unwrap()])]);
        assert!(routes.routes().all(|r| r.has_endpoints));
    }

    #[tokio::test(start_paused = true)]
    async fn drained_and_unready_endpoints_get_no_new_picks() {
        let telemetry = Telemetry::new();
        let options = BuildOptions::default();
        let drained = endpoint(2, true, 0);
        let unready = endpoint(3, false, 1);
        for algorithm in Algorithm::ALL {
            for affinity in [None, Some(Duration::from_secs(60))] {
                let all = vec![
                    endpoint(1, true, 1),
                    drained.clone(),
                    unready.clone(),
                    endpoint(4, true, 1),
                ];
                let routes = RouteBuilder::new(&telemetry, options).build(
                    &table(algorithm, affinity, all),
                    &RouteTable::default(),
                    &Locality::default(),
                );
                for client in 0..200 {
                    let pod = picked(&routes, client);
                    assert!(
                        pod != drained.addr && pod != unready.addr,
                        "{algorithm} {affinity:?} picked {pod}"
                    );
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sticky_client_moves_when_its_pod_is_drained() {
        let telemetry = Telemetry::new();
        let options = BuildOptions::default();
        let affinity = Some(Duration::from_secs(60));
        let pods = |weights: [u32; 3]| {
            (1..=3)
                .zip(weights)
                .map(|(i, w)| endpoint(i, true, w))
                .collect::<Vec<_>>()
        };
        let first = RouteBuilder::new(&telemetry, options).build(
            &table(Algorithm::RoundRobin, affinity, pods([1, 1, 1])),
            &RouteTable::default(),
            &Locality::default(),
        );
        let sticky = picked(&first, 1);
        assert_eq!(picked(&first, 1), sticky);
        // carousel.dev/weights now gives the sticky pod 0: it is drained.
        let mut draining = pods([1, 1, 1]);
        draining
            .iter_mut()
            .filter(|e| e.addr == sticky)
            .for_each(|e| e.weight = 0);
        let drained = RouteBuilder::new(&telemetry, options).build(
            &table(Algorithm::RoundRobin, affinity, draining),
            &first,
            &Locality::default(),
        );
        let moved = picked(&drained, 1);
        assert_ne!(moved, sticky);
        assert_eq!(picked(&drained, 1), moved);
        let metrics = telemetry.render();
        assert!(metrics.contains(r#"carousel_affinity_lookups_total{namespace="default",service="web",port="http",result="hit"} 2"#), "{metrics}");
        assert!(
            metrics.contains(
                r#"carousel_affinity_entries{namespace="default",service="web",port="http"} 1"#
            ),
            "{metrics}"
        );
    }

    /// What `f` logs, as the binary's log would show it.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_port_whose_every_ready_endpoint_weighs_zero_is_refused_and_says_why() {
        let telemetry = Telemetry::new();
        let build = |weights: [u32; 3]| {
            let endpoints = (1..=3).zip(weights).map(|(i, w)| endpoint(i, true, w));
            let table = table(Algorithm::RoundRobin, None, endpoints.collect());
            let mut routes = None;
            let log = logged(|| {
                routes = Some(
                    RouteBuilder::new(&telemetry, BuildOptions::default()).build(
                        &table,
                        &RouteTable::default(),
                        &Locality::default(),
                    ),
                )
            });
            (routes.unwrap(), log)
        };
        let (routes, log) = build([0, 0, 0]);
        assert!(!routes.routes().next().unwrap().has_endpoints);
        assert!(log.contains("every ready endpoint weighs 0"), "{log}");
        assert!(
            log.contains("default/web") && log.contains("port=80"),
            "{log}"
        );
        assert_eq!(log.lines().count(), 1, "{log}");
        let (routes, log) = build([0, 1, 0]);
        assert!(routes.routes().next().unwrap().has_endpoints);
        assert!(log.is_empty(), "{log}");
    }

    #[tokio::test]
    async fn an_untouched_service_keeps_its_routes_and_a_changed_one_is_rebuilt() {
        let telemetry = Telemetry::new();
        let options = BuildOptions::default();
        let here = Locality::default();
        let first = table(
            Algorithm::RoundRobin,
            None,
            vec![endpoint(1, true, 1), endpoint(2, true, 1)],
        );
        let routes =
            RouteBuilder::new(&telemetry, options).build(&first, &RouteTable::default(), &here);
        let before = routes.routes().next().unwrap().clone();

        // The same Arc<Service> in a new table: the very same route, not a rebuild.
        let same = Arc::new(ServiceTable {
            services: first.services.clone(),
            ..ServiceTable::default()
        });
        let again = RouteBuilder::new(&telemetry, options).build(&same, &routes, &here);
        assert!(Arc::ptr_eq(again.routes().next().unwrap(), &before));

        // A changed Service: a new route over the new endpoints.
        let changed = table(Algorithm::RoundRobin, None, vec![endpoint(1, true, 1)]);
        let rebuilt = RouteBuilder::new(&telemetry, options).build(&changed, &again, &here);
        let after = rebuilt.routes().next().unwrap();
        assert!(!Arc::ptr_eq(after, &before));
        assert_eq!(after.endpoints.len(), 1);
    }

    /// What a route table routes, in a comparable form: every address, node port and
    /// Service port with the endpoints behind it.
    fn shape(routes: &RouteTable) -> BTreeMap<String, Vec<PodAddr>> {
        let endpoints = |r: &Route| r.endpoints.iter().map(|e| e.addr).collect();
        let mut shape = BTreeMap::new();
        for ((protocol, addr), r) in routes.service_addrs() {
            let at = format!("{addr}/{protocol} {} {}", r.service, r.port);
            shape.insert(at, endpoints(r));
        }
        for ((protocol, port), r) in routes.node_ports() {
            let at = format!("node port {port}/{protocol} {}", r.service);
            shape.insert(at, endpoints(r));
        }
        for ((key, protocol, port, traffic), r) in &routes.by_port {
            shape.insert(format!("{key} {port}/{protocol} {traffic:?}"), endpoints(r));
        }
        shape
    }

    /// Service `i` of the generated tables: its own addresses, some of ports 80 and
    /// 443 over TCP and 80 over UDP, endpoints `mask` picks out of four (odd ones hinted for zone a, on this
    /// node), and the traffic policies.
    fn generated(i: u8, ports: u8, mask: u8, local: bool, prefer_close: bool) -> Arc<Service> {
        let endpoints: Vec<Endpoint> = (1..=4u8)
            .filter(|e| mask & (1 << (e - 1)) != 0)
            .map(|e| Endpoint {
                placement: Arc::new(Placement {
                    zone_hints: vec![if e % 2 == 1 { "a" } else { "b" }.into()].into(),
                    node: Some(if e % 2 == 1 { "here" } else { "there" }.into()),
                    zone: None,
                }),
                ..endpoint(i * 10 + e, true, 1)
            })
            .collect();
        // UDP 80 shares its number and node port with TCP 80, as DNS's two ports do.
        let ports = [
            (80u16, Protocol::Tcp),
            (443, Protocol::Tcp),
            (80, Protocol::Udp),
        ]
        .into_iter()
        .enumerate()
        .filter(|(n, _)| ports & (1 << n) != 0)
        .map(|(n, (port, protocol))| ServicePort {
            protocol,
            name: format!("p{port}{protocol}"),
            port,
            node_port: (n != 1).then_some(30_000 + u16::from(i)),
            endpoints: endpoints.clone(),
        })
        .collect();
        Arc::new(Service {
            key: ServiceKey::new("default", &format!("svc-{i}")),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, i))],
            external_ips: vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, i))],
            load_balancer_ips: match local {
                true => vec![IpAddr::V4(Ipv4Addr::new(198, 51, 100, i))],
                false => Vec::new(),
            },
            ports,
            balancing: Balancing {
                algorithm: Algorithm::RoundRobin,
                affinity: None,
            },
            external_traffic_local: local,
            internal_traffic_local: false,
            prefer_close,
            health_check_node_port: None,
            load_balancer_source_ranges: match prefer_close {
                true => vec!["10.0.0.0/8".parse().unwrap()],
                false => Vec::new(),
            },
            source: ClientSource::default(),
        })
    }

    /// One step of the generated history: per Service, whether it stays the same
    /// `Arc`, leaves, or comes back changed; and this node's zone.
    type Step = (Vec<(u8, u8, u8, bool, bool)>, bool);

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        (
            proptest::collection::vec((0u8..3, 0u8..8, 0u8..16, any::<bool>(), any::<bool>()), 6),
            any::<bool>(),
        )
    }

    proptest::proptest! {
        /// Applying changes one table after another routes exactly as building each
        /// table from nothing does, through Services coming, changing and leaving and
        /// the node's zone changing under zone-hinted Services; and the nftables sets
        /// that follow the tables' edits are those derived from every route.
        #[test]
        fn an_incremental_build_routes_as_a_build_from_nothing(steps in proptest::collection::vec(step(), 1..12)) {
            let telemetry = Telemetry::new();
            let options = BuildOptions::default();
            let mut services: imbl::OrdMap<ServiceKey, Arc<Service>> = imbl::OrdMap::new();
            let mut routes = RouteTable::default();
            let mut derived: Option<Derived> = None;
            // Bind mode's wanted listeners, followed as the intake follows them; node
            // ports on 10.96.0.1 too, which is also a Service address.
            let nodeport_addresses = [IpAddr::from([127, 0, 0, 1]), IpAddr::from([10, 96, 0, 1])];
            let mut bind: Option<(u64, BTreeMap<Dialed, String>)> = None;
            for (choices, zone_a) in steps {
                for (i, (what, ports, mask, local, close)) in (1u8..).zip(choices) {
                    let key = ServiceKey::new("default", &format!("svc-{i}"));
                    match what {
                        0 => {}
                        1 => { services.remove(&key); }
                        _ => { services.insert(key, generated(i, ports, mask, local, close)); }
                    }
                }
                let here = Locality {
                    node: Some("here".into()),
                    zone: Some(if zone_a { "a" } else { "b" }.into()),
                };
                let table = Arc::new(ServiceTable { services: services.clone(), ..ServiceTable::default() });
                routes = RouteBuilder::new(&telemetry, options).build(&table, &routes, &here);
                let scratch = RouteBuilder::new(&telemetry, options).build(&table, &RouteTable::default(), &here);
                proptest::prop_assert_eq!(shape(&routes), shape(&scratch));
                let next = derived.insert(Derived::next(derived.as_ref(), &routes));
                proptest::prop_assert_eq!(next.redirects(), &redirects::whole(&scratch));
                let changes = bind
                    .as_ref()
                    .and_then(|(last, _)| listener::changed(&routes, &nodeport_addresses, *last));
                let wanted = match (changes, bind.take()) {
                    (Some(changes), Some((_, mut wanted))) => {
                        for (addr, owner) in changes {
                            match owner {
                                Some(owner) => wanted.insert(addr, owner),
                                None => wanted.remove(&addr),
                            };
                        }
                        wanted
                    }
                    _ => listener::wanted(&routes, &nodeport_addresses),
                };
                proptest::prop_assert_eq!(&wanted, &listener::wanted(&scratch, &nodeport_addresses));
                bind = Some((routes.generation(), wanted));
            }
        }
    }

    #[test]
    fn departed_endpoints_and_services_take_their_series_with_them() {
        let telemetry = Telemetry::new();
        let options = BuildOptions::default();
        let here = Locality::default();
        let series = |routes: &RouteTable| {
            for route in routes.routes() {
                for e in &route.endpoints {
                    e.series().ok.increment(1);
                }
            }
            telemetry
                .render()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .count()
        };
        // 100 generations of pods, each replacing the last: the series follow the
        // table, they do not pile up.
        let mut routes = RouteTable::default();
        let mut counts = Vec::new();
        for generation in 0..100u8 {
            let pods = (0..2)
                .map(|i| endpoint(2 * generation + i, true, 1))
                .collect();
            routes = RouteBuilder::new(&telemetry, options).build(
                &table(Algorithm::RoundRobin, None, pods),
                &routes,
                &here,
            );
            counts.push(series(&routes));
        }
        assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
        let text = telemetry.render();
        assert!(text.contains(r#"pod="pod-199""#) && !text.contains(r#"pod="pod-197""#));
        let gauge =
            r#"carousel_endpoints{namespace="default",service="web",port="http",state="ready"} 2"#;
        assert!(text.contains(gauge), "{text}");

        let empty = Arc::new(ServiceTable::default());
        let after = RouteBuilder::new(&telemetry, options).build(&empty, &routes, &here);
        assert_eq!(after.routes().count(), 0);
        drop(routes);
        let text = telemetry.render();
        assert!(
            !text.contains("service=\"web\""),
            "the Service left, and its series with it:\n{text}"
        );
        assert!(text.contains("carousel_config_errors_total 0"), "{text}");
    }
}
