//! One UDP flow: a socket connected to its endpoint, the front's half that sends the
//! client's datagrams on it, and the task that reads the endpoint's replies and sends
//! them to the client from the front's socket.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{FlowKey, FlowSlot, BATCH, BUFFER};
use crate::addr::{ClientAddr, ServiceAddr};
use crate::model::Protocol;
use crate::proxy::clock::now_ms;
use crate::proxy::listener::Accepting;
use crate::proxy::port_metrics::UdpDrop;
use crate::proxy::proxy_header::{self, Transport};
use crate::proxy::routes::{Admission, Route, RouteEndpoint, RouteTable};
use crate::proxy::source::{self, Source};

/// What a new flow is made of.
pub(super) struct Opening {
    pub(super) id: u64,
    pub(super) key: FlowKey,
    /// The Service address the client sent to (for a redirected datagram, not where it
    /// arrived).
    pub(super) dialed: ServiceAddr,
    pub(super) route: Arc<Route>,
    /// The table `route` was looked up in.
    pub(super) generation: u64,
    pub(super) endpoint: RouteEndpoint,
    /// Where replies leave from: a socket at the Service address, or (redirected) the
    /// front's, whose replies conntrack gives the Service address.
    pub(super) reply: Arc<UdpSocket>,
    pub(super) ended: mpsc::UnboundedSender<(FlowKey, u64)>,
    pub(super) idle_timeout: Duration,
    /// The mark of carousel's own sockets, which the interception skips.
    pub(super) mark: Option<u32>,
    /// Where the flow's socket leaves from.
    pub(super) source: Source,
    pub(super) slot: FlowSlot,
}

/// The front's half of a flow. Dropping it ends the flow.
pub(super) struct Flow {
    id: u64,
    dialed: ServiceAddr,
    upstream: Arc<UdpSocket>,
    /// The route the endpoint was picked in, and the table it was last checked against.
    route: Arc<Route>,
    generation: u64,
    endpoint: RouteEndpoint,
    /// The PROXY protocol header sent before each datagram, when the Service asks for
    /// one: built once, at the flow's first datagram.
    header: Option<Box<[u8]>>,
    /// The last datagram either way, on the proxy's millisecond clock.
    last: Arc<AtomicU64>,
    _end: DropGuard,
}

/// Why a datagram could not go out on its flow.
#[derive(Debug)]
pub(super) enum SendError {
    /// The endpoint answered an earlier datagram with ICMP port unreachable.
    Refused,
}

impl Flow {
    /// Opens a socket to the endpoint and starts reading its replies.
    pub(super) fn open(opening: Opening) -> io::Result<Flow> {
        let Opening {
            id,
            key,
            dialed,
            route,
            generation,
            endpoint,
            reply,
            ended,
            idle_timeout,
            mark,
            source,
            slot,
        } = opening;
        let upstream = Arc::new(connect(endpoint.addr.0, mark, source)?);
        if route.transparent {
            route.metrics.source_connection(source);
        }
        let (client, _) = key;
        let header = route.proxy_protocol.and_then(|version| {
            route.metrics.proxy_header(version);
            proxy_header::header(version, Transport::Datagram, client, dialed)
        });
        let last = Arc::new(AtomicU64::new(now_ms()));
        let end = CancellationToken::new();
        let series = endpoint.udp_series();
        series.flows.increment(1);
        series.active.increment(1.0);
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        endpoint.succeeded();
        tokio::spawn(
            Replies {
                id,
                key,
                upstream: upstream.clone(),
                reply,
                endpoint: endpoint.clone(),
                route: route.clone(),
                last: last.clone(),
                idle_timeout,
                end: end.clone(),
                ended,
                _slot: slot,
            }
            .run(),
        );
        Ok(Flow {
            id,
            dialed,
            upstream,
            route,
            generation,
            endpoint,
            header: header.map(Vec::into_boxed_slice),
            last,
            _end: end.drop_guard(),
        })
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// Whether the flow may carry on in `table`: its endpoint is still one that its
    /// Service port's route for `client` would pick from. Costs a comparison while the
    /// table is the one last checked.
    pub(super) fn follows(
        &mut self,
        table: &RouteTable,
        client: ClientAddr,
        intake: &Accepting,
    ) -> bool {
        if table.generation() == self.generation {
            return true;
        }
        let now = match table.admit((Protocol::Udp, self.dialed), client, |ip| {
            intake.inside.load().contains(ip)
        }) {
            Admission::Route(route) => route,
            Admission::NoService | Admission::OutOfRange => return false,
        };
        let kept = Arc::ptr_eq(now, &self.route)
            || now
                .endpoints
                .iter()
                .any(|e| Arc::ptr_eq(&e.state, &self.endpoint.state));
        if kept {
            self.route = now.clone();
            self.generation = table.generation();
        }
        kept
    }

    /// Sends one datagram of the client to the endpoint, after the flow's PROXY header
    /// if it has one (in the same datagram); a full socket drops it.
    pub(super) fn send(&self, data: &[u8]) -> Result<(), SendError> {
        let sent = match &self.header {
            None => send(&self.upstream, data, None),
            Some(header) => socket2::SockRef::from(&*self.upstream)
                .send_vectored(&[io::IoSlice::new(header), io::IoSlice::new(data)]),
        };
        match sent {
            Ok(_) => {
                self.last.store(now_ms(), Ordering::Relaxed);
                let series = self.endpoint.udp_series();
                series.datagrams_to_endpoint.increment(1);
                series.bytes_to_endpoint.increment(data.len() as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused(&self.endpoint);
                return Err(SendError::Refused);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.route.metrics.udp_drop(UdpDrop::EndpointBusy);
            }
            Err(e) => {
                tracing::debug!(endpoint = %self.endpoint.addr, error = %e, "UDP send to the endpoint failed");
                self.route.metrics.udp_drop(UdpDrop::SocketError);
            }
        }
        Ok(())
    }
}

/// An ICMP port unreachable from the endpoint: new flows avoid it for a while.
fn refused(endpoint: &RouteEndpoint) {
    endpoint.eject();
}

/// Sends on `socket` at once, without waiting: a full socket buffer drops the datagram.
/// The system call is made directly, not through tokio's `try_send`, which answers
/// `WouldBlock` until the reactor has seen the socket writable once: a new flow's first
/// datagram would be lost.
fn send(socket: &UdpSocket, data: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    match to {
        Some(to) => socket.send_to(data, &to.into()),
        None => socket.send(data),
    }
}

/// A socket from `source` connected to `addr`, so that only its datagrams are read on it
/// and an ICMP error from it is reported.
fn connect(addr: SocketAddr, mark: Option<u32>, source: Source) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    match source {
        Source::Node => {
            if let Some(mark) = mark {
                socket.set_mark(mark)?;
            }
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            socket.bind(&any.into())?;
        }
        Source::Client { .. } => source::prepare(&socket, source, false)?,
    }
    socket.connect(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The flow's task: the endpoint's replies to the client, until the flow goes idle, the
/// endpoint refuses, or the front drops the flow.
struct Replies {
    id: u64,
    key: FlowKey,
    upstream: Arc<UdpSocket>,
    reply: Arc<UdpSocket>,
    endpoint: RouteEndpoint,
    route: Arc<Route>,
    last: Arc<AtomicU64>,
    idle_timeout: Duration,
    end: CancellationToken,
    ended: mpsc::UnboundedSender<(FlowKey, u64)>,
    _slot: FlowSlot,
}

impl Replies {
    async fn run(self) {
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let deadline = tokio::time::sleep(self.idle_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                () = self.end.cancelled() => break,
                ready = self.upstream.readable() => {
                    if ready.is_err() || !self.relay() {
                        break;
                    }
                }
                () = &mut deadline => {
                    let idle = now_ms().saturating_sub(self.last.load(Ordering::Relaxed));
                    if idle >= idle_ms {
                        break;
                    }
                    let left = Duration::from_millis(idle_ms - idle);
                    deadline.as_mut().reset(tokio::time::Instant::now() + left);
                }
            }
        }
        let series = self.endpoint.udp_series();
        series.active.decrement(1.0);
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        if !self.end.is_cancelled() {
            let _ = self.ended.send((self.key, self.id));
        }
    }

    /// Sends the replies waiting to the client, up to a batch; `false` when the flow
    /// is over (the endpoint refused, or its socket failed).
    fn relay(&self) -> bool {
        BUFFER.with_borrow_mut(|buffer| {
            for _ in 0..BATCH {
                let len = match self.upstream.try_recv(buffer) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        refused(&self.endpoint);
                        return false;
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %self.endpoint.addr, error = %e, "UDP receive from the endpoint failed");
                        return false;
                    }
                };
                self.last.store(now_ms(), Ordering::Relaxed);
                let client = self.key.0;
                match send(&self.reply, &buffer[..len], Some(client.0)) {
                    Ok(_) => {
                        let series = self.endpoint.udp_series();
                        series.datagrams_to_client.increment(1);
                        series.bytes_to_client.increment(len as u64);
                    }
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::debug!(%client, error = %e, "UDP reply to the client failed");
                        }
                        self.route.metrics.udp_drop(UdpDrop::ClientBusy);
                    }
                }
            }
            true
        })
    }
}
