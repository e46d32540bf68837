//! The PROXY protocol header carousel sends before a stream's first byte, or before each
//! datagram of a UDP flow, when a Service asks for it (`carousel.dev/proxy-protocol`):
//! the client's address and the Service address it dialed, so that the pod sees them
//! although the connection comes from carousel. Built once per connection or flow.

use std::net::{IpAddr, SocketAddr};

use crate::addr::{ClientAddr, ServiceAddr};
use crate::model::ProxyProtocol;

/// What the header says the client's traffic was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Stream,
    Datagram,
}

/// The header for traffic from `client` to `dialed`, or `None` where the version has no
/// form for the transport (v1 and datagrams).
///
/// IPv4 addresses seen through an IPv6 socket (`::ffff:a.b.c.d`) are written as IPv4.
/// When the two are of different families even so, both are written as IPv6 (the IPv4
/// one mapped), which keeps the client's address where `UNKNOWN` would lose it.
pub(crate) fn header(
    version: ProxyProtocol,
    transport: Transport,
    client: ClientAddr,
    dialed: ServiceAddr,
) -> Option<Vec<u8>> {
    let (source, destination) = same_family(canonical(client.0), canonical(dialed.0));
    match (version, transport) {
        (ProxyProtocol::V1, Transport::Stream) => {
            let addresses = ppp::v1::Addresses::from((source, destination));
            Some(addresses.to_string().into_bytes())
        }
        (ProxyProtocol::V1, Transport::Datagram) => None,
        (ProxyProtocol::V2, transport) => {
            let protocol = match transport {
                Transport::Stream => ppp::v2::Protocol::Stream,
                Transport::Datagram => ppp::v2::Protocol::Datagram,
            };
            let builder = ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                protocol,
                (source, destination),
            );
            // Fails only on more than 64 KiB of TLVs, and there are none.
            Some(builder.build().expect("a header without TLVs fits"))
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(s: &str) -> ClientAddr {
        ClientAddr(s.parse().unwrap())
    }

    fn dialed(s: &str) -> ServiceAddr {
        ServiceAddr(s.parse().unwrap())
    }

    fn v1(c: &str, d: &str) -> String {
        let bytes = header(ProxyProtocol::V1, Transport::Stream, client(c), dialed(d)).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn v1_writes_the_client_and_the_service_address() {
        assert_eq!(
            v1("10.0.0.7:40000", "10.96.0.10:80"),
            "PROXY TCP4 10.0.0.7 10.96.0.10 40000 80\r\n"
        );
        assert_eq!(
            v1("[fd00:c::2]:40000", "[fd00:96::a]:443"),
            "PROXY TCP6 fd00:c::2 fd00:96::a 40000 443\r\n"
        );
    }

    #[test]
    fn mapped_ipv4_is_written_as_ipv4() {
        assert_eq!(
            v1("[::ffff:10.0.0.7]:40000", "[::ffff:10.96.0.10]:80"),
            "PROXY TCP4 10.0.0.7 10.96.0.10 40000 80\r\n"
        );
    }

    #[test]
    fn mixed_families_keep_the_client_address_as_ipv6() {
        assert_eq!(
            v1("10.0.0.7:40000", "[fd00:96::a]:80"),
            "PROXY TCP6 ::ffff:10.0.0.7 fd00:96::a 40000 80\r\n"
        );
    }

    #[test]
    fn v1_has_no_datagram_form() {
        let none = header(
            ProxyProtocol::V1,
            Transport::Datagram,
            client("10.0.0.7:40000"),
            dialed("10.96.0.10:53"),
        );
        assert_eq!(none, None);
    }

    /// Read back by the same crate's parser: the addresses and the transport survive.
    #[test]
    fn v2_reads_back_with_the_transport_and_addresses() {
        for (transport, protocol) in [
            (Transport::Stream, ppp::v2::Protocol::Stream),
            (Transport::Datagram, ppp::v2::Protocol::Datagram),
        ] {
            for (c, d) in [
                ("10.0.0.7:40000", "10.96.0.10:53"),
                ("[fd00:c::2]:40000", "[fd00:96::a]:53"),
            ] {
                let bytes = header(ProxyProtocol::V2, transport, client(c), dialed(d)).unwrap();
                let parsed = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
                assert_eq!(parsed.len(), bytes.len());
                assert_eq!(parsed.command, ppp::v2::Command::Proxy);
                assert_eq!(parsed.protocol, protocol);
                let expected = ppp::v2::Addresses::from((
                    c.parse::<SocketAddr>().unwrap(),
                    d.parse::<SocketAddr>().unwrap(),
                ));
                assert_eq!(parsed.addresses, expected);
            }
        }
    }
}
