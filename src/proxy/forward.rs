//! One client connection: pick an endpoint, connect (with a timeout, moving on to the
//! next endpoint when one fails and ejecting the failed one for a while), then copy both
//! ways until both sides are done.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::addr::{ClientAddr, PodAddr, ServiceAddr};
use crate::proxy::clock::{ms_at, now_ms};
use crate::proxy::copy::{copy_both_ways, CopyError};
use crate::proxy::port_metrics::EndpointSeries;
use crate::proxy::proxy_header::{self, Transport};
use crate::proxy::routes::{Route, RouteEndpoint};
use crate::proxy::source::{self, Source};

/// An accepted connection's client, the Service address it dialed, and whether a bridge
/// handed it over (redirected rather than intercepted).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Accepted {
    pub(crate) peer: ClientAddr,
    pub(crate) dialed: ServiceAddr,
    pub(crate) bridged: bool,
}

/// How connections are forwarded.
#[derive(Clone, Copy, Debug)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    /// Endpoints tried for one connection before the client is closed.
    pub connect_attempts: usize,
    /// Socket mark of connections to pods, so that the redirect rules skip them.
    pub mark: Option<u32>,
    /// nftables mode: the socket mark of connections that leave from the client's
    /// address (`carousel.dev/source: transparent`), whose replies the rules bring
    /// back. `None`: this mode cannot.
    pub transparent_mark: Option<u32>,
    /// Close a connection that carried no byte either way for this long (off: as kube-proxy).
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive on both sides: idle time before the first probe.
    pub keepalive: Option<Duration>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            mark: None,
            transparent_mark: None,
            idle_timeout: None,
            keepalive: Some(Duration::from_secs(60)),
        }
    }
}

/// Why no endpoint took a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no endpoint for the service")]
    NoEndpoint,
    /// This host is out of something (descriptors, say): no endpoint is to blame.
    #[error("cannot open a socket to an endpoint: {0}")]
    Local(#[source] io::Error),
    #[error("cannot send the PROXY protocol header to {endpoint}: {error}")]
    Header { endpoint: PodAddr, error: io::Error },
    #[error("{attempts} endpoint(s) failed; last: {last}")]
    ConnectFailed {
        attempts: usize,
        #[source]
        last: io::Error,
    },
}

/// Forwards `client` to an endpoint of `route` (first the PROXY protocol header, when
/// the Service asks for one) and copies until both sides are done, or until `cut`: then
/// both sides are reset, so that neither takes the cut transfer for a complete one.
pub(crate) async fn forward(
    client: TcpStream,
    accepted: Accepted,
    route: &Route,
    config: ForwardConfig,
    cut: &CancellationToken,
) -> Result<(), ForwardError> {
    let Accepted { peer, dialed, .. } = accepted;
    let (upstream, endpoint, stats) = match connect(accepted, route, config).await {
        Ok(connected) => connected,
        Err(e) => {
            if matches!(e, ForwardError::NoEndpoint) {
                route.metrics.no_endpoint.increment(1);
            }
            reset(&client);
            return Err(e);
        }
    };
    if let Some(version) = route.proxy_protocol {
        let header = proxy_header::header(version, Transport::Stream, peer, dialed)
            .expect("every version has a stream form");
        if let Err(error) = send_header(&client, &upstream, &header, &stats.bytes_to_endpoint).await
        {
            reset(&client);
            reset(&upstream);
            return Err(ForwardError::Header {
                endpoint: endpoint.addr,
                error,
            });
        }
        route.metrics.proxy_header(version);
    }
    // TCP_NODELAY and keepalive came with the listening socket.
    let started = Instant::now();
    endpoint.active.fetch_add(1, Ordering::Relaxed);
    stats.active.increment(1.0);
    let result = tokio::select! {
        result = copy_both_ways(
            &client,
            &upstream,
            &stats.bytes_to_endpoint,
            &stats.bytes_to_client,
            config.idle_timeout,
        ) => result,
        () = cut.cancelled() => Err(CopyError::Cut),
    };
    endpoint.active.fetch_sub(1, Ordering::Relaxed);
    stats.active.decrement(1.0);
    stats
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        // One side failed (or went idle): pass it on as a reset rather than a clean close.
        tracing::debug!(%peer, endpoint = %endpoint.addr, error = %e, "connection ended by an error");
        reset(&client);
        reset(&upstream);
        // A pod that resets its connections is as unhealthy as one that refuses them:
        // new connections avoid it for a while.
        if let CopyError::Endpoint(io) = &e {
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ) {
                let period = endpoint.eject();
                ejected(route, endpoint, period, &e);
            }
        }
    }
    Ok(())
}

/// How much of what the client already sent goes out with the PROXY header.
const WITH_HEADER: usize = 4096;

/// Sends the PROXY protocol header on a connection just made, together with what the
/// client has sent so far (up to 4 KiB, counted in `to_endpoint`): usually the client's
/// request is waiting by the time the pod's connection is up, and header and request
/// leave in one write and one segment. A pod that speaks first gets the header alone.
async fn send_header(
    client: &TcpStream,
    upstream: &TcpStream,
    header: &[u8],
    to_endpoint: &metrics::Counter,
) -> io::Result<()> {
    let rest = first_write(client, upstream, header, to_endpoint)?;
    let mut sent = 0;
    while sent < rest.len() {
        upstream.writable().await?;
        match upstream.try_write(&rest[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The write of [`send_header`], without waiting: the empty send buffer of a new
/// connection takes it whole. What it did not take is returned, owned, so that the
/// 4 KiB buffer never lives across a wait (it would be in every connection's task).
fn first_write(
    client: &TcpStream,
    upstream: &TcpStream,
    header: &[u8],
    to_endpoint: &metrics::Counter,
) -> io::Result<Vec<u8>> {
    let mut early = [0u8; WITH_HEADER];
    // Nothing waiting, the client's side closed (Ok(0)) or failed: the copy sees it next.
    let waiting = client.try_read(&mut early).unwrap_or(0);
    to_endpoint.increment(waiting as u64);
    let data = &early[..waiting];
    let sent =
        match upstream.try_write_vectored(&[io::IoSlice::new(header), io::IoSlice::new(data)]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
    Ok(header.iter().chain(data).skip(sent).copied().collect())
}

/// Logs an ejection, at most one line a second for the Service port.
fn ejected(
    route: &Route,
    endpoint: &RouteEndpoint,
    period: Duration,
    error: &dyn std::fmt::Display,
) {
    if let Some(held_back) = route.metrics.log_limit.allow(now_ms()) {
        tracing::info!(
            service = %route.service,
            endpoint = %endpoint.addr,
            pod = %endpoint.pod,
            %error,
            ejected_for = ?period,
            held_back,
            "endpoint out of rotation"
        );
    }
}

/// Makes the coming close a reset: the peer must not mistake it for a complete answer.
pub(crate) fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Keepalive probes after `idle` without traffic; the interval and count between probes
/// are the system's, which keeps it to two system calls a socket.
pub(crate) fn keepalive(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new().with_time(idle)
}

fn set_keepalive(stream: &TcpStream, idle: Option<Duration>) {
    if let Some(idle) = idle {
        let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive(idle));
    }
}

/// Connects to the endpoint the balancer picks, or to the ones after it when it fails,
/// up to `connect_attempts` endpoints in all. Ejected endpoints are passed over while
/// any other is left.
async fn connect(
    accepted: Accepted,
    route: &Route,
    config: ForwardConfig,
) -> Result<(TcpStream, &RouteEndpoint, &EndpointSeries), ForwardError> {
    let peer = accepted.peer;
    let n = route.endpoints.len();
    // One clock reading serves the affinity lookup and the ejection checks.
    let clock = tokio::time::Instant::now();
    let first = route.pick_at(peer, clock).ok_or(ForwardError::NoEndpoint)?;
    let in_turn = (0..n).map(|i| &route.endpoints[(first + i) % n]);
    let now = ms_at(clock);
    // No allocation on this path: the endpoints in turn from the pick, ejected ones
    // left out, or, when every one is ejected, all of them: trying beats refusing.
    let all_ejected = in_turn.clone().all(|e| e.ejection.is_ejected(now));
    let candidates = in_turn
        .filter(|e| all_ejected || !e.ejection.is_ejected(now))
        .take(config.connect_attempts);
    let mut attempts = 0;
    let mut last = None;
    for endpoint in candidates {
        attempts += 1;
        let started = Instant::now();
        let source = source::upstream(
            route,
            endpoint,
            accepted.peer,
            accepted.bridged,
            config.transparent_mark,
        );
        let socket = socket_for(endpoint.addr, source, config).map_err(ForwardError::Local)?;
        let result =
            tokio::time::timeout(config.connect_timeout, socket.connect(endpoint.addr.0)).await;
        let error = match result {
            Ok(Ok(stream)) => {
                set_keepalive(&stream, config.keepalive);
                let series = endpoint.series();
                series
                    .connect_duration
                    .record(started.elapsed().as_secs_f64());
                series.ok.increment(1);
                if route.transparent {
                    route.metrics.source_connection(source);
                }
                endpoint.succeeded();
                return Ok((stream, endpoint, series));
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        };
        let period = endpoint.eject();
        tracing::debug!(%peer, endpoint = %endpoint.addr, error = %error, ejected_for = ?period, "connect failed");
        ejected(route, endpoint, period, &error);
        endpoint.series().connect_errors.increment(1);
        last = Some(error);
    }
    Err(ForwardError::ConnectFailed {
        attempts,
        last: last.expect("at least one attempt was made"),
    })
}

/// A socket for a connection to `addr` from `source`, marked so that the redirect rules
/// skip it.
fn socket_for(addr: PodAddr, source: Source, config: ForwardConfig) -> io::Result<TcpSocket> {
    let socket = match addr.0 {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    match source {
        Source::Node => {
            if let Some(mark) = config.mark {
                SockRef::from(&socket).set_mark(mark)?;
            }
        }
        Source::Client { .. } => source::prepare(&socket, source, true)?,
    }
    socket.set_nodelay(true)?;
    Ok(socket)
}
