//! The elements of carousel's nftables sets, and the changes the data plane makes to
//! them: what `nftables` renders and diffs, and `netlink` sends.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::model::Protocol;

/// One element of carousel's sets: an address (or none, for a node port), a transport
/// protocol and a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Element {
    /// An IPv4 Service address, protocol and port, in `services4`.
    V4(Ipv4Addr, Protocol, u16),
    /// An IPv6 Service address, protocol and port, in `services6`.
    V6(Ipv6Addr, Protocol, u16),
    /// A node port, in `nodeports`.
    NodePort(Protocol, u16),
    /// An IPv4 Service address, protocol and port without endpoints, in `refused4`.
    RefusedV4(Ipv4Addr, Protocol, u16),
    /// An IPv6 Service address, protocol and port without endpoints, in `refused6`.
    RefusedV6(Ipv6Addr, Protocol, u16),
    /// A node port without endpoints, in `refused_nodeports`.
    RefusedNodePort(Protocol, u16),
}

/// The protocol as nf_tables' `meta l4proto` holds it (IPPROTO_*).
fn number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

/// The protocol as nft writes an `inet_proto` value.
fn nft_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

impl Element {
    /// The set that holds it.
    pub(crate) fn set(&self) -> &'static str {
        match self {
            Element::V4(..) => "services4",
            Element::V6(..) => "services6",
            Element::NodePort(..) => "nodeports",
            Element::RefusedV4(..) => "refused4",
            Element::RefusedV6(..) => "refused6",
            Element::RefusedNodePort(..) => "refused_nodeports",
        }
    }

    /// The key as nf_tables stores it: in network byte order, and in a concatenation
    /// (`addr . proto . port`) each field padded with zeros to a multiple of 4 bytes, so
    /// an IPv4 element is 12 bytes, an IPv6 one 24 and a node port (`proto . port`) 8.
    pub(crate) fn key(&self) -> Vec<u8> {
        let (addr, protocol, port): (&[u8], _, _) = match self {
            Element::V4(ip, protocol, port) | Element::RefusedV4(ip, protocol, port) => {
                (&ip.octets(), *protocol, *port)
            }
            Element::V6(ip, protocol, port) | Element::RefusedV6(ip, protocol, port) => {
                (&ip.octets(), *protocol, *port)
            }
            Element::NodePort(protocol, port) | Element::RefusedNodePort(protocol, port) => {
                (&[], *protocol, *port)
            }
        };
        let mut key = addr.to_vec();
        key.extend([number(protocol), 0, 0, 0]);
        key.extend(port.to_be_bytes());
        key.extend([0, 0]);
        key
    }
}

/// As nft writes it.
impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::V4(ip, protocol, port) | Element::RefusedV4(ip, protocol, port) => {
                write!(f, "{ip} . {} . {port}", nft_name(*protocol))
            }
            Element::V6(ip, protocol, port) | Element::RefusedV6(ip, protocol, port) => {
                write!(f, "{ip} . {} . {port}", nft_name(*protocol))
            }
            Element::NodePort(protocol, port) | Element::RefusedNodePort(protocol, port) => {
                write!(f, "{} . {port}", nft_name(*protocol))
            }
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
