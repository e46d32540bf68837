//! One client connection: pick an endpoint, connect (with a timeout, moving on to the
//! next endpoint when one refuses), then copy both ways until both sides are done,
//! carrying a half-close from each side to the other.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics::Counter;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::{ClientAddr, PodAddr};
use crate::proxy::routes::{Route, RouteEndpoint};

/// Bytes buffered per direction of a connection.
const BUFFER_SIZE: usize = 16 * 1024;

/// How connections are forwarded.
#[derive(Clone, Copy, Debug)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    /// Endpoints tried for one connection before the client is closed.
    pub connect_attempts: usize,
    /// Socket mark of connections to pods, so that the redirect rules skip them.
    pub mark: Option<u32>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            mark: None,
        }
    }
}

/// Why no endpoint took a connection.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no endpoint for the service")]
    NoEndpoint,
    #[error("{attempts} endpoint(s) failed; last: {last}")]
    ConnectFailed {
        attempts: usize,
        #[source]
        last: io::Error,
    },
}

/// Forwards `client` to an endpoint of `route` and copies until both sides are done.
pub async fn forward(
    mut client: TcpStream,
    peer: ClientAddr,
    route: &Route,
    config: ForwardConfig,
) -> Result<(), ForwardError> {
    let (mut upstream, endpoint) = match connect(peer, route, config).await {
        Ok(connected) => connected,
        Err(e) => {
            if matches!(e, ForwardError::NoEndpoint) {
                route.no_endpoint.increment(1);
            }
            // A reset, not a clean close: the client must not mistake it for an empty answer.
            let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            return Err(e);
        }
    };
    let _ = client.set_nodelay(true);
    let stats = &endpoint.stats;
    let started = Instant::now();
    endpoint.active.fetch_add(1, Ordering::Relaxed);
    stats.active.increment(1.0);
    let result = copy_both_ways(&mut client, &mut upstream, endpoint).await;
    endpoint.active.fetch_sub(1, Ordering::Relaxed);
    stats.active.decrement(1.0);
    stats
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        // One side failed: pass the failure on as a reset rather than a clean close.
        tracing::debug!(%peer, endpoint = %endpoint.addr, error = %e, "connection ended by an error");
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
    }
    Ok(())
}

/// Connects to the endpoint the balancer picks; when it refuses or times out, to the
/// next ones in order, up to `connect_attempts` endpoints in all.
async fn connect(
    peer: ClientAddr,
    route: &Route,
    config: ForwardConfig,
) -> Result<(TcpStream, &RouteEndpoint), ForwardError> {
    let n = route.endpoints.len();
    let first = route.pick(peer).ok_or(ForwardError::NoEndpoint)?;
    let attempts = config.connect_attempts.clamp(1, n);
    let mut last = None;
    for i in 0..attempts {
        let endpoint = &route.endpoints[(first + i) % n];
        let started = Instant::now();
        let result =
            tokio::time::timeout(config.connect_timeout, dial(endpoint.addr, config.mark)).await;
        let error = match result {
            Ok(Ok(stream)) => {
                endpoint
                    .stats
                    .connect_duration
                    .record(started.elapsed().as_secs_f64());
                endpoint.stats.ok.increment(1);
                return Ok((stream, endpoint));
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        };
        tracing::debug!(%peer, endpoint = %endpoint.addr, error = %error, "connect failed");
        endpoint.stats.connect_errors.increment(1);
        last = Some(error);
    }
    Err(ForwardError::ConnectFailed {
        attempts,
        last: last.expect("at least one attempt was made"),
    })
}

async fn dial(addr: PodAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = match addr.0 {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mark) = mark {
        SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(addr.0).await
}

async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    endpoint: &RouteEndpoint,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    // The first error ends both directions: the other one may be waiting on a peer
    // that will never speak again.
    tokio::try_join!(
        copy_one_way(
            client_read,
            upstream_write,
            &endpoint.stats.bytes_to_endpoint
        ),
        copy_one_way(upstream_read, client_write, &endpoint.stats.bytes_to_client),
    )?;
    Ok(())
}

/// Copies until end of stream, then shuts down the writer: the half-close passes on.
async fn copy_one_way(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    bytes: &Counter,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        bytes.increment(n as u64);
    }
}
