//! With `--pods`, the bench cannot ask a real pod who it is, so each real endpoint gets a
//! loopback relay in front of it. The bench's Service sends a PROXY v2 header (as
//! `carousel.dev/proxy-protocol: v2` would); the relay reads it, notes which client's
//! connection reached its pod, and splices the rest, header removed, to the pod. A
//! client learns its pod from that note, keyed by its own address and port.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// The fixed part of a v2 header: signature, version and command, family, length.
const FIXED: usize = 16;
/// The longest header a relay reads: the fixed part, two IPv6 addresses and ports, and
/// room for the TLVs a proxy may add. carousel sends none.
const MAX_HEADER: usize = FIXED + 36 + 256;
/// No header, connect or pod waits longer.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("reading the PROXY header: {0}")]
    Read(#[from] io::Error),
    #[error("no PROXY header in {TIMEOUT:?}")]
    Timeout,
    #[error("a PROXY v2 header of {0} bytes, more than {MAX_HEADER}")]
    TooLong(usize),
    #[error("not a PROXY v2 header: {0}")]
    Header(String),
    #[error("the header names no client address (command LOCAL or family UNSPEC)")]
    NoAddress,
    #[error("cannot reach the pod at {pod}: {source}")]
    Pod {
        pod: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Which pod each client connection reached, by the client's address and port. A run's
/// clients take their entry at their first answer, so it holds at most the run's
/// connections that got no answer.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    by_client: Mutex<HashMap<SocketAddr, Arc<str>>>,
}

impl Seen {
    fn note(&self, client: SocketAddr, pod: Arc<str>) {
        self.lock().insert(client, pod);
    }

    /// The pod that took the connection from `client`, once.
    pub(crate) fn take(&self, client: SocketAddr) -> Option<Arc<str>> {
        self.lock().remove(&client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<str>>> {
        // A panic elsewhere cannot leave the map half-written: insert and remove are whole.
        self.by_client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one relay serves.
#[derive(Debug)]
pub(crate) struct Relay {
    pub(crate) pod: Arc<str>,
    pub(crate) upstream: SocketAddr,
    pub(crate) seen: Arc<Seen>,
    pub(crate) open: Arc<AtomicU64>,
}

/// Accepts until aborted; each connection is relayed on its own task.
pub(crate) async fn accept(listener: TcpListener, relay: Arc<Relay>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let relay = relay.clone();
        relay.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = relay.one(stream).await {
                tracing::debug!(pod = %relay.pod, error = %e, "relay");
            }
            relay.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl Relay {
    async fn one(&self, mut downstream: TcpStream) -> Result<(), RelayError> {
        let client = tokio::time::timeout(TIMEOUT, read_header(&mut downstream))
            .await
            .map_err(|_| RelayError::Timeout)??;
        self.seen.note(client, self.pod.clone());
        let pod_error = |source| RelayError::Pod {
            pod: self.upstream,
            source,
        };
        let mut upstream = tokio::time::timeout(TIMEOUT, TcpStream::connect(self.upstream))
            .await
            .map_err(|_| pod_error(io::ErrorKind::TimedOut.into()))?
            .map_err(pod_error)?;
        upstream.set_nodelay(true)?;
        downstream.set_nodelay(true)?;
        // The pod's own latency is what the clients measure: the relay adds one
        // loopback hop and copies, nothing else.
        tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
        Ok(())
    }
}

/// Reads exactly one v2 header from `stream`, no byte of what follows, and returns the
/// client address it carries.
async fn read_header(stream: &mut TcpStream) -> Result<SocketAddr, RelayError> {
    let mut header = vec![0u8; FIXED];
    stream.read_exact(&mut header).await?;
    let len = FIXED + usize::from(u16::from_be_bytes([header[14], header[15]]));
    if len > MAX_HEADER {
        return Err(RelayError::TooLong(len));
    }
    header.resize(len, 0);
    stream.read_exact(&mut header[FIXED..]).await?;
    client_of(&header)
}

/// The source address of a complete v2 header.
fn client_of(header: &[u8]) -> Result<SocketAddr, RelayError> {
    use ppp::v2::{Addresses, Header};
    let parsed = Header::try_from(header).map_err(|e| RelayError::Header(e.to_string()))?;
    match parsed.addresses {
        Addresses::IPv4(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => Err(RelayError::NoAddress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{ClientAddr, ServiceAddr};
    use crate::model::ProxyProtocol;
    use crate::proxy::proxy_header::{header, Transport};

    #[test]
    fn reads_the_client_from_what_the_proxy_writes() {
        for (client, service) in [
            ("127.56.200.7:40123", "127.56.0.1:8000"),
            ("[fd00::7]:40123", "[fd00::1]:8000"),
        ] {
            let bytes = header(
                ProxyProtocol::V2,
                Transport::Stream,
                ClientAddr(client.parse().unwrap()),
                ServiceAddr(service.parse().unwrap()),
            )
            .unwrap();
            assert_eq!(client_of(&bytes).unwrap(), client.parse().unwrap());
        }
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        let err = client_of(&[0u8; FIXED]).unwrap_err();
        assert!(matches!(err, RelayError::Header(_)), "{err}");
    }
}
