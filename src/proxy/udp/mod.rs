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
//! In nftables mode, TPROXY delivers datagrams to the redirect port's socket with the
//! Service address they were sent to; those from pods behind a bridge are redirected
//! instead, and conntrack says where they were going (`dataplane/conntrack.rs`).
//!
//! The front (one per Service address in bind mode, one per family on the redirect port
//! in nftables mode) owns its flows in a map no one else touches; each flow's replies are read by a task of its own. Neither side takes a lock
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
use crate::dataplane::conntrack::Conntrack;
use crate::model::Protocol;
use crate::proxy::clock::ms_at;
use crate::proxy::listener::{Accepting, Destination};
use crate::proxy::port_metrics::UdpDrop;
use crate::proxy::routes::{Admission, Route, RouteTable};
use crate::proxy::source;
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
    bound(addr, |_| Ok(()))
}

/// nftables mode: a transparent socket (IP_TRANSPARENT) on the redirect port of one
/// family, to which TPROXY hands every intercepted datagram; each comes with the
/// Service address it was sent to (IP_ORIGDSTADDR). Needs CAP_NET_ADMIN.
pub(crate) fn bind_transparent(addr: SocketAddr) -> io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    bound(addr, |socket| {
        transparent(socket, addr)?;
        match addr.is_ipv6() {
            true => setsockopt(socket, sockopt::Ipv6OrigDstAddr, &true)?,
            false => setsockopt(socket, sockopt::Ipv4OrigDstAddr, &true)?,
        }
        Ok(())
    })
}

/// nftables mode: where replies to clients of `dialed` leave from, so that a client's
/// connected socket takes them: a socket bound to that Service address, which is not
/// the node's (IP_TRANSPARENT), shared with whatever else binds it (SO_REUSEADDR). It
/// never reads: TPROXY hands datagrams to the redirect port's socket, not to it.
fn bind_reply(dialed: ServiceAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    bound(dialed.0, |socket| {
        transparent(socket, dialed.0)?;
        match mark {
            Some(mark) => socket.set_mark(mark),
            None => Ok(()),
        }
    })
}

/// A non-blocking UDP socket bound to `addr` with SO_REUSEADDR and SO_REUSEPORT
/// (IPv6 only, for an IPv6 address), `options` set before the bind.
fn bound(
    addr: SocketAddr,
    options: impl FnOnce(&Socket) -> io::Result<()>,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    options(&socket)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// IP_TRANSPARENT (or its IPv6 twin) on a socket of `addr`'s family.
fn transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    match addr.is_ipv6() {
        true => socket.set_ip_transparent_v6(true),
        false => socket.set_ip_transparent_v4(true),
    }
}

/// Serves one UDP socket: a Service address's (bind mode) or the redirect port's
/// (nftables mode). Reads its datagrams and keeps their flows, until the task is
/// aborted, which ends them all.
pub(crate) async fn serve(socket: UdpSocket, destination: Destination, intake: Accepting) {
    let (ended, mut ends) = mpsc::unbounded_channel();
    let replies = match destination {
        Destination::Listener(addr) => Replies::Own(addr),
        Destination::Intercepted { .. } => Replies::Transparent(HashMap::new()),
    };
    let redirect_port = match destination {
        Destination::Listener(_) => None,
        Destination::Intercepted { listen_port } => Some(listen_port),
    };
    let mut front = Front {
        socket: Arc::new(socket),
        replies,
        redirect_port,
        conntrack: None,
        flows: HashMap::new(),
        next_id: 0,
        ended,
        intake,
    };
    loop {
        tokio::select! {
            ready = front.socket.readable() => {
                if let Err(e) = ready {
                    tracing::error!(?destination, error = %e, "UDP socket failed");
                    return;
                }
                front.read();
            }
            Some((key, id)) = ends.recv() => front.forget(key, id),
        }
    }
}

/// Where a front's replies leave from.
enum Replies {
    /// Bind mode: the front's own socket, bound to this Service address.
    Own(ServiceAddr),
    /// nftables mode: a socket per Service address, made at its first flow.
    Transparent(HashMap<ServiceAddr, Arc<UdpSocket>>),
}

/// A flow's key: the client, and where its datagrams arrive: the Service address it
/// sent to, or for a redirected datagram the node address and redirect port.
type FlowKey = (ClientAddr, ServiceAddr);

/// One socket's datagrams and the flows of its clients.
struct Front {
    socket: Arc<UdpSocket>,
    replies: Replies,
    /// nftables mode: the redirect port, where redirected datagrams (from pods behind a
    /// bridge) arrive, with conntrack to ask where they were going (opened at the first).
    redirect_port: Option<u16>,
    conntrack: Option<Result<Conntrack, ()>>,
    /// Keyed by addresses clients chose: SipHash, which no client can collide.
    flows: HashMap<FlowKey, Flow>,
    next_id: u64,
    /// Where a flow that ends by itself says so, with its id.
    ended: mpsc::UnboundedSender<(FlowKey, u64)>,
    intake: Accepting,
}

/// Where a flow's replies leave from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// The Service address: the front's socket in bind mode, a reply socket bound to it
    /// in nftables mode.
    ServiceAddress,
    /// The front's socket, for a redirected datagram: conntrack turns the reply's source
    /// back into the Service address.
    Front,
}

/// A control message buffer for one original destination, aligned as `cmsghdr` wants.
#[repr(C, align(8))]
struct Cmsg([u8; 64]);

impl Front {
    /// Handles the datagrams waiting, up to a batch.
    fn read(&mut self) {
        BUFFER.with_borrow_mut(|buffer| {
            for _ in 0..BATCH {
                match self.receive(buffer) {
                    Ok((len, client, dialed)) => self.datagram(&buffer[..len], client, dialed),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "UDP receive failed");
                        return;
                    }
                }
            }
        });
    }

    /// One datagram: its length, its client and the Service address it was sent to.
    fn receive(&self, buffer: &mut [u8]) -> io::Result<(usize, ClientAddr, ServiceAddr)> {
        match self.replies {
            Replies::Own(addr) => {
                let (len, client) = self.socket.try_recv_from(buffer)?;
                Ok((len, ClientAddr(client), addr))
            }
            Replies::Transparent(_) => self.socket.try_io(tokio::io::Interest::READABLE, || {
                recv_intercepted(&self.socket, buffer)
            }),
        }
    }

    /// Forwards one datagram of `client`, which arrived at `arrived`, on its flow or on
    /// a new one.
    fn datagram(&mut self, data: &[u8], client: ClientAddr, arrived: ServiceAddr) {
        let table = self.intake.routes.load();
        let key = (client, arrived);
        if let Some(flow) = self.flows.get_mut(&key) {
            if flow.follows(&table, client, &self.intake) {
                match flow.send(data) {
                    Ok(()) => return,
                    // A pending ICMP port unreachable: the endpoint is not listening.
                    Err(flow::SendError::Refused) => {}
                }
            }
            self.flows.remove(&key);
        }
        let Some((dialed, via)) = self.dialed(client, arrived) else {
            return;
        };
        let route = match table.admit((Protocol::Udp, dialed), client, |ip| {
            self.intake.inside.load().contains(ip)
        }) {
            Admission::Route(route) => route.clone(),
            Admission::NoService | Admission::OutOfRange => return,
        };
        let Some(flow) = self.open(&route, &table, key, dialed, via) else {
            return;
        };
        let flow = self.flows.entry(key).or_insert(flow);
        // A refusal this early comes from an earlier flow's socket number, not this
        // one's: the datagram is lost, and the next one picks again.
        let _ = flow.send(data);
    }

    /// The Service address a datagram that arrived at `arrived` was sent to, and where
    /// its replies leave from: a datagram at the redirect port may have come from a
    /// bridge, and conntrack knows where it was going. `None`: it cannot be known (logged).
    fn dialed(&mut self, client: ClientAddr, arrived: ServiceAddr) -> Option<(ServiceAddr, Via)> {
        if self.redirect_port != Some(arrived.port()) {
            return Some((arrived, Via::ServiceAddress));
        }
        let conntrack = self.conntrack.get_or_insert_with(|| {
            Conntrack::open().map_err(|e| {
                tracing::warn!(error = %e, "UDP from pods behind a bridge cannot be proxied");
            })
        });
        let Ok(conntrack) = conntrack else {
            return None;
        };
        match conntrack.original_destination(arrived.0, client.0) {
            Ok(original) if original == arrived.0 => Some((arrived, Via::ServiceAddress)),
            Ok(original) => Some((ServiceAddr(original), Via::Front)),
            Err(e) => {
                tracing::debug!(error = %e, "a redirected UDP datagram without its destination");
                None
            }
        }
    }

    /// The socket replies to clients of `dialed` leave from.
    fn reply_socket(&mut self, dialed: ServiceAddr, via: Via) -> io::Result<Arc<UdpSocket>> {
        if via == Via::Front {
            return Ok(self.socket.clone());
        }
        match &mut self.replies {
            Replies::Own(_) => Ok(self.socket.clone()),
            Replies::Transparent(sockets) => {
                if let Some(socket) = sockets.get(&dialed) {
                    return Ok(socket.clone());
                }
                let socket = Arc::new(bind_reply(dialed, self.intake.forward.mark)?);
                sockets.insert(dialed, socket.clone());
                Ok(socket)
            }
        }
    }

    /// Opens a flow for `key` over `route`, or counts why not.
    fn open(
        &mut self,
        route: &Arc<Route>,
        table: &RouteTable,
        key: FlowKey,
        dialed: ServiceAddr,
        via: Via,
    ) -> Option<Flow> {
        let client = key.0;
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
        let reply = match self.reply_socket(dialed, via) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::debug!(%dialed, error = %e, "cannot open a UDP socket at the Service address");
                route.metrics.udp_drop(UdpDrop::SocketError);
                return None;
            }
        };
        self.next_id += 1;
        let opened = Flow::open(flow::Opening {
            id: self.next_id,
            key,
            dialed,
            route: route.clone(),
            generation: table.generation(),
            endpoint: endpoint.clone(),
            reply,
            ended: self.ended.clone(),
            idle_timeout: self.intake.udp.idle_timeout,
            mark: self.intake.forward.mark,
            source: source::upstream(
                route,
                endpoint,
                client,
                via == Via::Front,
                self.intake.forward.transparent_mark,
            ),
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
    /// its place; and the Service address's reply socket once no flow uses it.
    fn forget(&mut self, key: FlowKey, id: u64) {
        if self.flows.get(&key).is_some_and(|f| f.id() == id) {
            self.flows.remove(&key);
        }
        if let Replies::Transparent(sockets) = &mut self.replies {
            if sockets
                .get(&key.1)
                .is_some_and(|s| Arc::strong_count(s) == 1)
            {
                sockets.remove(&key.1);
            }
        }
    }
}

/// One intercepted datagram, read with the Service address it was sent to.
fn recv_intercepted(
    socket: &UdpSocket,
    buffer: &mut [u8],
) -> io::Result<(usize, ClientAddr, ServiceAddr)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let mut cmsg = Cmsg([0; 64]);
    let mut iov = [io::IoSliceMut::new(buffer)];
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg.0),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let client = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4((*v4).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
        })
        .ok_or_else(|| io::Error::other("a datagram without a source address"))?;
    let dialed = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4OrigDstAddr(sin) => Some(SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        ))),
        ControlMessageOwned::Ipv6OrigDstAddr(sin6) => Some(SocketAddr::from((
            std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
        ))),
        _ => None,
    });
    let dialed =
        dialed.ok_or_else(|| io::Error::other("a datagram without its original destination"))?;
    Ok((msg.bytes, ClientAddr(client), ServiceAddr(dialed)))
}
