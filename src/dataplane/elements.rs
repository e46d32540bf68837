//! The elements of carousel's nftables sets, and the changes the data plane makes to
//! them: what `nftables` renders and diffs, and `netlink` sends.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// One element of carousel's sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Element {
    /// An IPv4 Service address and port, in `services4`.
    V4(Ipv4Addr, u16),
    /// An IPv6 Service address and port, in `services6`.
    V6(Ipv6Addr, u16),
    /// A node port, in `nodeports`.
    NodePort(u16),
    /// An IPv4 Service address and port without endpoints, in `refused4`.
    RefusedV4(Ipv4Addr, u16),
    /// An IPv6 Service address and port without endpoints, in `refused6`.
    RefusedV6(Ipv6Addr, u16),
    /// A node port without endpoints, in `refused_nodeports`.
    RefusedNodePort(u16),
}

impl Element {
    /// The set that holds it.
    pub(crate) fn set(&self) -> &'static str {
        match self {
            Element::V4(..) => "services4",
            Element::V6(..) => "services6",
            Element::NodePort(_) => "nodeports",
            Element::RefusedV4(..) => "refused4",
            Element::RefusedV6(..) => "refused6",
            Element::RefusedNodePort(_) => "refused_nodeports",
        }
    }

    /// The key as nf_tables stores it: in network byte order, and in a concatenation
    /// (`addr . port`) each field padded with zeros to a multiple of 4 bytes, so an IPv4
    /// element is 8 bytes and an IPv6 one 20; a lone port is 2 bytes.
    pub(crate) fn key(&self) -> Vec<u8> {
        let (addr, port): (&[u8], u16) = match self {
            Element::V4(ip, port) | Element::RefusedV4(ip, port) => (&ip.octets(), *port),
            Element::V6(ip, port) | Element::RefusedV6(ip, port) => (&ip.octets(), *port),
            Element::NodePort(port) | Element::RefusedNodePort(port) => {
                return port.to_be_bytes().to_vec()
            }
        };
        let mut key = addr.to_vec();
        key.extend(port.to_be_bytes());
        key.extend([0, 0]);
        key
    }
}

/// As nft writes it.
impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::V4(ip, port) | Element::RefusedV4(ip, port) => write!(f, "{ip} . {port}"),
            Element::V6(ip, port) | Element::RefusedV6(ip, port) => write!(f, "{ip} . {port}"),
            Element::NodePort(port) | Element::RefusedNodePort(port) => write!(f, "{port}"),
        }
    }
}

/// What a change does to an element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Delete,
    Add,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Delete => "delete",
            Op::Add => "add",
        })
    }
}

/// One element added or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) op: Op,
    pub(crate) element: Element,
}
