//! Transparent source (`carousel.dev/source: transparent`): a connection to a pod on this
//! node leaves from the client's own address, so that the pod sees the client and not
//! the node. The socket binds the client's address with `IP_TRANSPARENT` and carries
//! `TRANSPARENT_MARK`; nftables mode's rules bring the pod's replies, which go to the
//! client's address, back to that socket (`dataplane/nftables.rs`).
//!
//! Where the replies would not come back, the connection leaves from the node's address
//! instead, and says why: a pod on another node answers the client through its own
//! node; bind mode has no rules to bring replies back; a connection a bridge handed over
//! may have come from a pod on the same bridge, which the pod would answer directly.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use socket2::SockRef;

use crate::addr::{ClientAddr, PodAddr};
use crate::proxy::routes::{Route, RouteEndpoint};

/// Where a connection to a pod leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The node's address, as the kernel chooses it.
    Node,
    /// The client's address, on a socket with this mark.
    Client { ip: IpAddr, mark: u32 },
}

/// Why a connection of a transparent Service leaves from the node's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// The pod is on another node, or this node's name is not known
    /// (`--node-name`): the pod's replies would not come back through this node.
    OtherNode,
    /// Bind mode has no rules that bring the pod's replies back.
    Mode,
    /// A bridge handed the connection over: its client may share the pod's bridge,
    /// and the pod would answer it directly.
    Bridged,
    /// The client is the node itself over loopback, or of the other address family.
    Unroutable,
}

impl Fallback {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Fallback::OtherNode => {
                "the endpoint is not on this node (or --node-name is unset): its replies would not come back through this node"
            }
            Fallback::Mode => "transparent source needs nftables mode, whose rules bring the replies back",
            Fallback::Bridged => {
                "the connection came through a bridge, whose pods would answer the client directly"
            }
            Fallback::Unroutable => "the client's address cannot be used toward the endpoint (loopback, or the other family)",
        }
    }
}

/// Where a connection from `client` to `endpoint` leaves from, for a Service that asks
/// for a transparent source. `mark`: the transparent sockets' mark, when the mode can
/// bring their replies back.
pub(crate) fn choose(
    mark: Option<u32>,
    client: ClientAddr,
    endpoint: PodAddr,
    endpoint_local: bool,
    bridged: bool,
) -> Result<Source, Fallback> {
    let mark = mark.ok_or(Fallback::Mode)?;
    if !endpoint_local {
        return Err(Fallback::OtherNode);
    }
    if bridged {
        return Err(Fallback::Bridged);
    }
    let ip = client.0.ip().to_canonical();
    if ip.is_loopback() || ip.is_ipv4() != endpoint.0.is_ipv4() {
        return Err(Fallback::Unroutable);
    }
    Ok(Source::Client { ip, mark })
}

/// Where a connection (or UDP flow) of `route` from `client` to `endpoint` leaves from:
/// the node's address unless the Service asks for a transparent source; then as
/// [`choose`] says, and an endpoint that falls back says why, once.
pub(crate) fn upstream(
    route: &Route,
    endpoint: &RouteEndpoint,
    client: ClientAddr,
    bridged: bool,
    mark: Option<u32>,
) -> Source {
    if !route.transparent {
        return Source::Node;
    }
    choose(mark, client, endpoint.addr, endpoint.local, bridged).unwrap_or_else(|why| {
        endpoint.say_fallback(why);
        Source::Node
    })
}

/// Makes `socket` leave from `source`, before it connects: for a client's address,
/// marked, transparent (the address is not the node's) and bound to it. A TCP socket
/// takes its port at connect time (`IP_BIND_ADDRESS_NO_PORT`), so that one client
/// address serves as many connections as there are distinct endpoints and ports.
pub(crate) fn prepare(socket: &impl AsFd, source: Source, stream: bool) -> io::Result<()> {
    let Source::Client { ip, mark } = source else {
        return Ok(());
    };
    let sock = SockRef::from(socket);
    sock.set_mark(mark)?;
    match ip {
        IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
        IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
    }
    if stream {
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(io::Error::from)?;
    }
    sock.bind(&SocketAddr::new(ip, 0).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(s: &str) -> ClientAddr {
        ClientAddr(s.parse().unwrap())
    }

    fn pod(s: &str) -> PodAddr {
        PodAddr(s.parse().unwrap())
    }

    #[test]
    fn a_local_endpoint_is_reached_from_the_client() {
        let mark = Some(0x4343);
        assert_eq!(
            choose(
                mark,
                client("10.0.0.7:4000"),
                pod("10.244.1.2:80"),
                true,
                false
            ),
            Ok(Source::Client {
                ip: "10.0.0.7".parse().unwrap(),
                mark: 0x4343
            })
        );
        // An IPv4 client seen through an IPv6 socket is an IPv4 client.
        assert_eq!(
            choose(
                mark,
                client("[::ffff:10.0.0.7]:4000"),
                pod("10.244.1.2:80"),
                true,
                false
            ),
            Ok(Source::Client {
                ip: "10.0.0.7".parse().unwrap(),
                mark: 0x4343
            })
        );
        assert!(matches!(
            choose(mark, client("[fd00:c::2]:4000"), pod("[fd00:244:1::2]:80"), true, false),
            Ok(Source::Client { ip, .. }) if ip == "fd00:c::2".parse::<IpAddr>().unwrap()
        ));
    }

    #[test]
    fn falls_back_where_the_replies_would_not_come_back() {
        let c = client("10.0.0.7:4000");
        let p = pod("10.244.1.2:80");
        assert_eq!(choose(None, c, p, true, false), Err(Fallback::Mode));
        assert_eq!(
            choose(Some(1), c, p, false, false),
            Err(Fallback::OtherNode)
        );
        assert_eq!(choose(Some(1), c, p, true, true), Err(Fallback::Bridged));
        assert_eq!(
            choose(Some(1), client("127.0.0.1:4000"), p, true, false),
            Err(Fallback::Unroutable)
        );
        assert_eq!(
            choose(Some(1), client("[fd00:c::2]:4000"), p, true, false),
            Err(Fallback::Unroutable)
        );
    }
}
