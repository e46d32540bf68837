//! UDP Service ports. A flow is one client address and port talking to one Service
//! address: its first datagram picks an endpoint with the port's balancer (the same
//! `Picker` as TCP: every algorithm, weights, ClientIP affinity across flows) and opens
//! a socket connected to that endpoint; the flow's later datagrams go out on it, and
//! what the endpoint sends back goes to the client from the Service address.
//!
//! A flow ends after `--udp-idle-timeout` without a datagram either way, when its
//! endpoint answers with ICMP port unreachable, and when the front that owns it closes;
//! a flow whose endpoint has left the route (gone, or no longer ready) is dropped at its
//! next datagram, which picks again. Past `--max-udp-flows` open flows, the datagrams of
//! new flows are dropped and counted.
//!
//! The front (one per Service address in bind mode) owns its flows in a map no one else
//! touches; each flow's replies are read by a task of its own. Neither side takes a lock
//! or allocates per datagram: datagrams are read into a per-thread buffer and sent on
//! before the next await.

mod flow;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::addr::{ClientAddr, ServiceAddr};
use crate::model::Protocol;
use crate::proxy::clock::ms_at;
use crate::proxy::listener::{Accepting, Destination};
use crate::proxy::port_metrics::UdpDrop;
use crate::proxy::routes::{Admission, Route, RouteTable};
use flow::Flow;

/// How UDP flows are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpConfig {
    /// A flow without a datagram either way for this long ends (`--udp-idle-timeout`).
    pub idle_timeout: Duration,
    /// Flows open at most at once, over every Service (`--max-udp-flows`).
    pub max_flows: usize,
}

/// conntrack's timeout for UDP (`nf_conntrack_udp_timeout`): what kube-proxy's users
/// get today. A resolver's retry (glibc waits 5 s) stays on its flow.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// About 2 KiB of kernel and carousel memory each (a socket and a task): 128 MiB at
/// most, and a descriptor each, within the half of the limit bind mode leaves.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS as usize,
        }
    }
}

/// The flows open over every front, against `--max-udp-flows`.
#[derive(Debug, Default)]
pub(crate) struct FlowCount {
    open: AtomicUsize,
}

impl FlowCount {
    /// Takes a slot for a new flow, or `None` at the limit.
    fn take(self: &Arc<Self>, max: usize) -> Option<FlowSlot> {
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        if open >= max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(FlowSlot(self.clone()))
    }
}

/// One open flow's slot; given back when the flow ends.
#[derive(Debug)]
struct FlowSlot(Arc<FlowCount>);

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest datagram UDP carries (a 65 535-byte IP packet less its headers).
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// Where datagrams are read, one per runtime thread: a datagram is read and sent on
    /// with no await between, so one buffer serves every socket the thread polls.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// Datagrams handled per wake-up before the front yields to other tasks.
const BATCH: usize = 64;

/// A UDP socket for a Service address, in one SO_REUSEPORT group with the next
/// carousel's during a rollout, as the TCP listeners are.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serves one Service address (bind mode): reads its datagrams and keeps their flows,
/// until the task is aborted, which ends them all.
pub(crate) async fn serve(socket: UdpSocket, destination: Destination, intake: Accepting) {
    let Destination::Listener(dialed) = destination else {
        tracing::error!("UDP is served in bind mode only");
        return;
    };
    let (ended, mut ends) = mpsc::unbounded_channel();
    let mut front = Front {
        socket: Arc::new(socket),
        dialed,
        flows: HashMap::new(),
        next_id: 0,
        ended,
        intake,
    };
    loop {
        tokio::select! {
            ready = front.socket.readable() => {
                if let Err(e) = ready {
                    tracing::error!(addr = %dialed, error = %e, "UDP socket failed");
                    return;
                }
                front.read();
            }
            Some((client, id)) = ends.recv() => front.forget(client, id),
        }
    }
}

/// One Service address's socket and the flows of its clients.
struct Front {
    socket: Arc<UdpSocket>,
    dialed: ServiceAddr,
    /// Keyed by an address the client chose: SipHash, which no client can collide.
    flows: HashMap<ClientAddr, Flow>,
    next_id: u64,
    /// Where a flow that ends by itself says so, with its id.
    ended: mpsc::UnboundedSender<(ClientAddr, u64)>,
    intake: Accepting,
}

impl Front {
    /// Handles the datagrams waiting, up to a batch.
    fn read(&mut self) {
        BUFFER.with_borrow_mut(|buffer| {
            for _ in 0..BATCH {
                match self.socket.try_recv_from(buffer) {
                    Ok((len, client)) => self.datagram(&buffer[..len], ClientAddr(client)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        tracing::debug!(addr = %self.dialed, error = %e, "UDP receive failed");
                        return;
                    }
                }
            }
        });
    }

    /// Forwards one datagram of `client`, on its flow or on a new one.
    fn datagram(&mut self, data: &[u8], client: ClientAddr) {
        let table = self.intake.routes.load();
        if let Some(flow) = self.flows.get_mut(&client) {
            if flow.follows(&table, self.dialed, client, &self.intake) {
                match flow.send(data) {
                    Ok(()) => return,
                    // A pending ICMP port unreachable: the endpoint is not listening.
                    Err(flow::SendError::Refused) => {}
                }
            }
            self.flows.remove(&client);
        }
        let route = match table.admit((Protocol::Udp, self.dialed), client, |ip| {
            self.intake.inside.load().contains(ip)
        }) {
            Admission::Route(route) => route.clone(),
            Admission::NoService | Admission::OutOfRange => return,
        };
        let Some(flow) = self.open(&route, &table, client) else {
            return;
        };
        let flow = self.flows.entry(client).or_insert(flow);
        // A refusal this early comes from an earlier flow's socket number, not this
        // one's: the datagram is lost, and the next one picks again.
        let _ = flow.send(data);
    }

    /// Opens a flow for `client` over `route`, or counts why not.
    fn open(&mut self, route: &Arc<Route>, table: &RouteTable, client: ClientAddr) -> Option<Flow> {
        let Some(slot) = self.intake.udp_flows.take(self.intake.udp.max_flows) else {
            route.metrics.udp_drop(UdpDrop::FlowLimit);
            return None;
        };
        let clock = tokio::time::Instant::now();
        let Some(first) = route.pick_at(client, clock) else {
            route.metrics.udp_drop(UdpDrop::NoEndpoint);
            return None;
        };
        // An ejected endpoint (one that answered ICMP port unreachable lately) is passed
        // over while any other is left.
        let now = ms_at(clock);
        let n = route.endpoints.len();
        let endpoint = (0..n)
            .map(|i| &route.endpoints[(first + i) % n])
            .find(|e| !e.ejection.is_ejected(now))
            .unwrap_or(&route.endpoints[first]);
        self.next_id += 1;
        let opened = Flow::open(flow::Opening {
            id: self.next_id,
            client,
            route: route.clone(),
            generation: table.generation(),
            endpoint: endpoint.clone(),
            front: self.socket.clone(),
            ended: self.ended.clone(),
            idle_timeout: self.intake.udp.idle_timeout,
            mark: self.intake.forward.mark,
            slot,
        });
        match opened {
            Ok(flow) => Some(flow),
            Err(e) => {
                tracing::debug!(%client, endpoint = %endpoint.addr, error = %e, "cannot open a UDP socket to the endpoint");
                route.metrics.udp_drop(UdpDrop::SocketError);
                None
            }
        }
    }

    /// Takes out a flow that ended by itself, unless a newer flow of the client took
    /// its place.
    fn forget(&mut self, client: ClientAddr, id: u64) {
        if self.flows.get(&client).is_some_and(|f| f.id() == id) {
            self.flows.remove(&client);
        }
    }
}
