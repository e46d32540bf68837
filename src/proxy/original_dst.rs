//! Where a redirected connection was going: the Service address it dialed before
//! nftables redirected it to carousel (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::ServiceAddr;

/// The destination the client dialed, as conntrack remembers it.
pub(crate) fn original_dst(stream: &TcpStream) -> io::Result<ServiceAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let dst = match local {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    dst.as_socket().map(ServiceAddr).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
