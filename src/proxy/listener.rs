//! Bind mode: one listening socket per Service address, opened and closed as Services
//! come and go. Closing a listener stops new connections only; open ones run on in
//! their own tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use metrics::{Counter, Gauge, Label};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::addr::{ClientAddr, ServiceAddr};
use crate::model::Protocol;
use crate::proxy::forward::{self, ForwardConfig, ForwardError};
use crate::proxy::inside::Inside;
use crate::proxy::original_dst::original_dst;
use crate::proxy::routes::{Admission, Dialed, Route, RouteTable};
use crate::proxy::udp;
use crate::telemetry::{names, Telemetry};

/// Opens a listening TCP socket with the options a proxy wants. Accepted connections
/// inherit TCP_NODELAY and the keepalive settings from it on Linux, which saves those
/// system calls on every connection.
pub fn bind(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<TcpListener> {
    listen(socket(addr, keepalive)?, addr)
}

/// A listener for intercepted traffic (IP_TRANSPARENT, IPV6_TRANSPARENT): it accepts
/// connections to any address that TPROXY hands it, and each accepted socket's local
/// address is the one the client dialed. Needs CAP_NET_ADMIN.
pub(crate) fn bind_transparent(
    addr: SocketAddr,
    keepalive: Option<Duration>,
) -> io::Result<TcpListener> {
    let socket = socket(addr, keepalive)?;
    if addr.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    listen(socket, addr)
}

fn socket(addr: SocketAddr, keepalive: Option<Duration>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // A second carousel on the node (the next version, during a rollout) listens on the
    // same addresses, in one group with this one, and takes new connections while this
    // one drains.
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(idle) = keepalive {
        socket.set_tcp_keepalive(&forward::keepalive(idle))?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn listen(socket: Socket, addr: SocketAddr) -> io::Result<TcpListener> {
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Where the kernel is told what to do with the connections waiting in the accept queue
/// of a listener that closes while others share its port (SO_REUSEPORT).
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Makes the kernel (5.14 and later) hand the connections queued on a closing listener
/// to another listener of its group, instead of resetting them: so a stopping carousel
/// loses none of those that were about to be accepted. A per-namespace setting that
/// changes nothing else; when it cannot be set (a read-only /proc/sys), that is logged.
pub fn migrate_queued_connections_on_close() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(MIGRATE_REQ, "1") {
                tracing::warn!(path = MIGRATE_REQ, error = %e, "cannot set: connections queued on a stopping carousel's listeners will be reset, not handed to its successor");
            } else {
                tracing::info!(
                    path = MIGRATE_REQ,
                    "set to 1: a stopping carousel hands its queued connections to its successor"
                );
            }
        }
        Err(e) => {
            tracing::warn!(path = MIGRATE_REQ, error = %e, "kernel without request migration (5.14+): connections queued on a stopping carousel's listeners will be reset")
        }
    }
}

/// The addresses bind mode listens on for a route table: every Service address, and
/// every `--nodeport-addresses` address at every node port, of the Service ports that
/// have endpoints (without a listener, a client is refused at the SYN). The value names
/// the Service port, for messages.
pub(crate) fn wanted(
    routes: &RouteTable,
    nodeport_addresses: &[IpAddr],
) -> BTreeMap<Dialed, String> {
    let mut wanted = BTreeMap::new();
    for (addr, route) in routes.service_addrs().filter(|(_, r)| r.has_endpoints) {
        wanted.insert(*addr, format!("{} port {}", route.service, route.port));
    }
    for ((protocol, port), route) in routes.node_ports().filter(|(_, r)| r.has_endpoints) {
        for ip in nodeport_addresses {
            let addr = (protocol, ServiceAddr(SocketAddr::new(*ip, port)));
            wanted
                .entry(addr)
                .or_insert_with(|| format!("{} port {} (node port)", route.service, route.port));
        }
    }
    wanted
}

/// What [`wanted`] says of the addresses `routes`' edits touched, when `routes` was built
/// from the table of generation `last`: each with its Service port, or `None` where it is
/// no longer wanted. `None` when the edits do not follow `last`: then only the whole
/// [`wanted`] tells. So one changed Service among thousands costs its own addresses.
pub(crate) fn changed(
    routes: &RouteTable,
    nodeport_addresses: &[IpAddr],
    last: u64,
) -> Option<Vec<(Dialed, Option<String>)>> {
    let edits = routes.edits();
    if edits.after != Some(last) {
        return None;
    }
    let at_node_ports = edits.node_ports.iter().flat_map(|&(protocol, port)| {
        nodeport_addresses
            .iter()
            .map(move |ip| (protocol, ServiceAddr(SocketAddr::new(*ip, port))))
    });
    let touched: BTreeSet<Dialed> = edits.addrs.iter().copied().chain(at_node_ports).collect();
    Some(
        touched
            .into_iter()
            .map(|addr| (addr, wanted_at(routes, nodeport_addresses, addr)))
            .collect(),
    )
}

/// [`wanted`] for one address: the Service port it serves, or `None`.
fn wanted_at(routes: &RouteTable, nodeport_addresses: &[IpAddr], addr: Dialed) -> Option<String> {
    if let Some(route) = routes.service_addr(addr).filter(|r| r.has_endpoints) {
        return Some(format!("{} port {}", route.service, route.port));
    }
    let (protocol, addr) = addr;
    if !nodeport_addresses.contains(&addr.ip()) {
        return None;
    }
    let route = routes
        .node_port((protocol, addr.port()))
        .filter(|r| r.has_endpoints)?;
    Some(format!("{} port {} (node port)", route.service, route.port))
}

/// The descriptor limit (RLIMIT_NOFILE) now: its soft value, which is what the kernel
/// enforces.
pub(crate) fn descriptor_limit() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.unwrap_or(u64::MAX)
}

/// Raises the soft descriptor limit to the hard one, as Go programs do at start: the
/// soft default (often 1024) exists for programs that use select(2), which carousel
/// does not, and bind mode wants a descriptor per Service address. Returns the limit
/// in force afterwards.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?limit.current, to = ?limit.maximum, "descriptor limit raised to the hard limit")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the descriptor limit to the hard limit")
            }
        }
    }
    descriptor_limit()
}

/// How many listeners bind mode opens at most: half the descriptor limit. The other
/// half stays for what must never starve: the connections (two descriptors each), the
/// health and metrics servers, the state file and the API client.
pub(crate) fn listener_budget(limit: u64) -> usize {
    usize::try_from(limit / 2).unwrap_or(usize::MAX)
}

/// The open listeners of bind mode.
#[derive(Debug)]
pub(crate) struct Listeners {
    open: HashMap<Dialed, JoinHandle<()>>,
    /// Addresses that failed to bind, so each failure is reported once.
    failed: HashSet<Dialed>,
    /// Wanted addresses left without a listener by the descriptor limit at the last
    /// reconcile, and `carousel_listeners_refused`, which shows them.
    refused: usize,
    refused_gauge: Gauge,
}

impl Listeners {
    pub(crate) fn new(telemetry: &Telemetry) -> Self {
        Self {
            open: HashMap::new(),
            failed: HashSet::new(),
            refused: 0,
            refused_gauge: telemetry.gauge(names::LISTENERS_REFUSED, Vec::new()),
        }
    }

    /// Opens the listeners that are wanted and not open, closes those no longer wanted;
    /// the number of wanted addresses that could not be listened on (each is reported
    /// once, and tried again at the next reconcile). Past [`listener_budget`], the rest
    /// of the addresses (in address order; open ones keep their listener) are refused
    /// without a system call, with one log line for the count and a gauge, so that the
    /// descriptors the rest of carousel needs are never taken.
    pub(crate) fn reconcile(
        &mut self,
        wanted: &BTreeMap<Dialed, String>,
        intake: &Accepting,
    ) -> usize {
        self.open.retain(|addr, task| {
            let keep = wanted.contains_key(addr);
            if !keep {
                let (protocol, addr) = addr;
                tracing::info!(%addr, %protocol, "closing listener");
                task.abort();
            }
            keep
        });
        self.failed.retain(|addr| wanted.contains_key(addr));
        let limit = descriptor_limit();
        let budget = listener_budget(limit);
        let mut refused = 0;
        for (addr, owner) in wanted {
            if self.open.contains_key(addr) {
                continue;
            }
            if self.open.len() >= budget {
                refused += 1;
                continue;
            }
            self.open_one(*addr, owner, intake);
        }
        if refused != self.refused {
            if refused > 0 {
                tracing::error!(
                    refused,
                    wanted = wanted.len(),
                    listening = self.open.len(),
                    descriptor_limit = limit,
                    "bind mode leaves Service addresses without a listener: listeners may take half the descriptor limit; raise it (ulimit -n, LimitNOFILE) or use nftables mode"
                );
            } else {
                tracing::info!("every Service address has its listener again");
            }
            self.refused = refused;
            self.refused_gauge.set(refused as f64);
        }
        self.failed.len() + refused
    }

    /// As [`Listeners::reconcile`], at the addresses `changes` names alone (from
    /// [`changed`]): `None`, with nothing done, when the last reconcile left an address
    /// failed or refused (those are retried by a whole reconcile) or when the changes
    /// would pass the budget.
    pub(crate) fn apply(
        &mut self,
        changes: &[(Dialed, Option<String>)],
        intake: &Accepting,
    ) -> Option<usize> {
        if self.refused > 0 || !self.failed.is_empty() {
            return None;
        }
        let opening = changes
            .iter()
            .filter(|(addr, owner)| owner.is_some() && !self.open.contains_key(addr))
            .count();
        let closing = changes
            .iter()
            .filter(|(addr, owner)| owner.is_none() && self.open.contains_key(addr))
            .count();
        if self.open.len() - closing + opening > listener_budget(descriptor_limit()) {
            return None;
        }
        for (addr, owner) in changes {
            match owner {
                None => {
                    if let Some(task) = self.open.remove(addr) {
                        let (protocol, addr) = addr;
                        tracing::info!(%addr, %protocol, "closing listener");
                        task.abort();
                    }
                }
                Some(owner) if !self.open.contains_key(addr) => self.open_one(*addr, owner, intake),
                Some(_) => {}
            }
        }
        Some(self.failed.len())
    }

    /// Listens on `dialed` for `owner`, or reports (once) that it cannot.
    fn open_one(&mut self, dialed: Dialed, owner: &str, intake: &Accepting) {
        let (protocol, addr) = dialed;
        let served = match protocol {
            Protocol::Tcp => bind(addr.0, intake.forward.keepalive).map(|listener| {
                let destination = Destination::Listener(addr);
                tokio::spawn(accept_loop(listener, destination, intake.clone()))
            }),
            Protocol::Udp => udp::bind(addr.0).map(|socket| {
                tokio::spawn(udp::serve(
                    socket,
                    Destination::Listener(addr),
                    intake.clone(),
                ))
            }),
        };
        match served {
            Ok(task) => {
                tracing::info!(%addr, %protocol, service = %owner, "listening");
                self.failed.remove(&dialed);
                self.open.insert(dialed, task);
            }
            Err(e) => {
                if self.failed.insert(dialed) {
                    let hint = if e.raw_os_error() == Some(99) {
                        " (the address is not local to this host; bind mode needs it assigned to an interface)"
                    } else {
                        ""
                    };
                    tracing::error!(%addr, %protocol, service = %owner, error = %e, "cannot listen{hint}; retrying");
                }
            }
        }
    }

    /// Stops accepting everywhere. Open connections are not touched.
    pub(crate) fn close_all(&mut self) {
        for (_, task) in self.open.drain() {
            task.abort();
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// How a listener learns which Service address a client dialed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Destination {
    /// Bind mode: the listener's own address is the Service address.
    Listener(ServiceAddr),
    /// nftables mode, on a listener at this port: a connection intercepted with TPROXY
    /// is accepted at the Service address the client dialed; one that was redirected
    /// (from a bridge) is accepted at this port, and conntrack knows where it was going.
    Intercepted { listen_port: u16 },
}

/// What every accept loop shares: the routes, how to forward, the open connections
/// (so that shutdown can wait for them) and the connection limit.
#[derive(Clone, Debug)]
pub(crate) struct Accepting {
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    /// Who counts as a pod or the node itself, as of the last sync.
    pub(crate) inside: Arc<ArcSwap<Inside>>,
    pub(crate) forward: ForwardConfig,
    pub(crate) connections: TaskTracker,
    pub(crate) limit: Arc<Limit>,
    pub(crate) udp: udp::UdpConfig,
    /// UDP flows open over every Service address, against `udp.max_flows`.
    pub(crate) udp_flows: Arc<udp::FlowCount>,
    /// Cancelled when the drain runs out: every open connection is reset.
    pub(crate) cut: CancellationToken,
}

/// `--max-connections` and what it and the accept loop count.
#[derive(Debug)]
pub(crate) struct Limit {
    pub(crate) max: Option<usize>,
    open: AtomicUsize,
    /// `carousel_connections_rejected_total{reason="max_connections"}`.
    pub(crate) rejected: Counter,
    /// `carousel_accept_errors_total`: e.g. out of file descriptors.
    pub(crate) accept_errors: Counter,
}

impl Limit {
    pub(crate) fn new(max: Option<usize>, telemetry: &Telemetry) -> Self {
        Self {
            max,
            open: AtomicUsize::new(0),
            rejected: telemetry.counter(
                names::REJECTED_TOTAL,
                vec![Label::new("reason", "max_connections")],
            ),
            accept_errors: telemetry.counter(names::ACCEPT_ERRORS_TOTAL, Vec::new()),
        }
    }

    /// Takes a slot for a new connection, or `None` when the limit is reached.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        if self.max.is_some_and(|max| open >= max) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

/// One admitted connection; gives its slot back when dropped.
struct Slot(Arc<Limit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the accept loop rests after a failed accept (out of descriptors, say), so
/// that it waits for resources instead of spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The Service address of an intercepted connection: its local address, unless that is
/// the listener's own port, where conntrack's original destination says (a redirected
/// connection, or a Service whose port is the listener's: for it both agree). And
/// whether it was redirected: a bridge handed it over.
fn intercepted(stream: &TcpStream, listen_port: u16) -> io::Result<(ServiceAddr, bool)> {
    let local = stream.local_addr()?;
    if local.port() != listen_port {
        return Ok((ServiceAddr(local), false));
    }
    let dialed = original_dst(stream)?;
    Ok((dialed, dialed.0 != local))
}

/// Accepts connections and hands each to its own task.
pub(crate) async fn accept_loop(listener: TcpListener, dialed: Destination, intake: Accepting) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                intake.limit.accept_errors.increment(1);
                tracing::warn!(?dialed, error = %e, "accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let peer = ClientAddr(peer);
        let Some(slot) = intake.limit.admit() else {
            intake.limit.rejected.increment(1);
            forward::reset(&stream);
            tracing::debug!(%peer, "connection limit reached; connection refused");
            continue;
        };
        let (target, bridged) = match dialed {
            Destination::Listener(addr) => (addr, false),
            Destination::Intercepted { listen_port } => match intercepted(&stream, listen_port) {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no Service address; not an intercepted connection");
                    continue;
                }
            },
        };
        // The route is looked up per connection, so that a table change applies to the
        // very next connection without touching the listener.
        let route = match intake
            .routes
            .load()
            .admit((Protocol::Tcp, target), peer, |ip| {
                intake.inside.load().contains(ip)
            }) {
            Admission::Route(route) => Some(route.clone()),
            Admission::NoService => None,
            Admission::OutOfRange => {
                tracing::debug!(%peer, %target, "client outside the Service's source ranges");
                forward::reset(&stream);
                continue;
            }
        };
        let config = intake.forward;
        let cut = intake.cut.clone();
        intake.connections.spawn(async move {
            let _slot = slot;
            match route {
                Some(route) => {
                    let accepted = forward::Accepted {
                        peer,
                        dialed: target,
                        bridged,
                    };
                    serve(stream, accepted, &route, config, &cut).await
                }
                None => tracing::debug!(%peer, %target, "no service at this address"),
            }
        });
    }
}

/// Forwards one accepted connection; what went wrong is logged, at debug level when
/// the client was refused by the Service having no endpoint.
async fn serve(
    stream: TcpStream,
    accepted: forward::Accepted,
    route: &Route,
    config: ForwardConfig,
    cut: &CancellationToken,
) {
    let peer = accepted.peer;
    match forward::forward(stream, accepted, route, config, cut).await {
        Ok(()) => {}
        Err(ForwardError::NoEndpoint) => {
            tracing::debug!(%peer, service = %route.service, "no endpoint; connection refused")
        }
        // Every pod down under load would be a line per connection: one a second.
        Err(e) => {
            if let Some(held_back) = route.metrics.log_limit.allow(crate::proxy::clock::now_ms()) {
                tracing::warn!(%peer, service = %route.service, error = %e, held_back, "no endpoint accepted the connection");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_keepalive_from_the_listener() {
        let listener = bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(Duration::from_secs(42)),
        )
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
    }
}
