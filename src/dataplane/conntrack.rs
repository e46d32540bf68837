//! Where a redirected UDP datagram was going: conntrack's original destination, asked
//! over ctnetlink. TCP has `SO_ORIGINAL_DST` for that (`proxy/original_dst.rs`); UDP has
//! nothing, so a datagram that nftables redirected (from a pod behind a bridge) is looked
//! up by its connection's reply direction: from where it arrived, to its client.
//!
//! [`encode_get`] and [`original_destination`] are pure functions over bytes; [`Conntrack`]
//! is the socket that sends one and reads the other. The kernel answers within the send,
//! so a lookup costs two system calls and no wait.

use std::io;
use std::net::{IpAddr, SocketAddr};

use super::netlink::{
    attr, message, nest, open_netfilter, NLA_F_NESTED, NLMSG_ERROR, NLMSG_HDRLEN,
};

// From <linux/netfilter/nfnetlink.h> and <linux/netfilter/nfnetlink_conntrack.h>.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// An attribute's type without its flag bits (nested, byte order).
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 0x4000);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConntrackError {
    #[error("cannot open a netlink socket to conntrack: {0}")]
    Open(#[source] io::Error),
    #[error("netlink socket to conntrack: {0}")]
    Io(#[source] io::Error),
    #[error("conntrack has no UDP connection from {arrived} to {client}: {}", io::Error::from_raw_os_error(*errno))]
    NotFound {
        arrived: SocketAddr,
        client: SocketAddr,
        errno: i32,
    },
    #[error("an answer from conntrack without an original destination")]
    Malformed,
}

/// The request for the UDP connection whose replies go from `arrived` (where the
/// redirected datagram was delivered) to `client`.
pub(crate) fn encode_get(seq: u32, arrived: SocketAddr, client: SocketAddr) -> Vec<u8> {
    let family = if arrived.is_ipv4() { AF_INET } else { AF_INET6 };
    let (src, dst) = match family {
        AF_INET => (CTA_IP_V4_SRC, CTA_IP_V4_DST),
        _ => (CTA_IP_V6_SRC, CTA_IP_V6_DST),
    };
    let octets = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut b = Vec::with_capacity(96);
    let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
    message(&mut b, kind, 0, seq, (family, 0), |b| {
        nest(b, CTA_TUPLE_REPLY, |b| {
            nest(b, CTA_TUPLE_IP, |b| {
                attr(b, src, &octets(arrived.ip()));
                attr(b, dst, &octets(client.ip()));
            });
            nest(b, CTA_TUPLE_PROTO, |b| {
                attr(b, CTA_PROTO_NUM, &[IPPROTO_UDP]);
                attr(b, CTA_PROTO_SRC_PORT, &arrived.port().to_be_bytes());
                attr(b, CTA_PROTO_DST_PORT, &client.port().to_be_bytes());
            });
        });
    });
    b
}

/// The attributes in `b`: (type without flags, payload), until one does not fit.
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// Why an answer holds no original destination.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// conntrack refused the request with this errno (ENOENT: no such connection).
    Refused(i32),
    Malformed,
}

/// The original destination in conntrack's answer to [`encode_get`] (one read from the
/// socket).
pub(crate) fn original_destination(answer: &[u8]) -> Result<SocketAddr, NoAnswer> {
    if answer.len() < NLMSG_HDRLEN + 4 {
        return Err(NoAnswer::Malformed);
    }
    let len = (u32::from_ne_bytes(answer[0..4].try_into().unwrap()) as usize).min(answer.len());
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind == NLMSG_ERROR {
        let errno = -i32::from_ne_bytes(answer[16..20].try_into().unwrap());
        return Err(NoAnswer::Refused(errno));
    }
    if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW || len < NLMSG_HDRLEN + 4 {
        return Err(NoAnswer::Malformed);
    }
    let orig = find(&answer[NLMSG_HDRLEN + 4..len], CTA_TUPLE_ORIG).ok_or(NoAnswer::Malformed)?;
    let ip = find(orig, CTA_TUPLE_IP).ok_or(NoAnswer::Malformed)?;
    let ip: IpAddr = if let Some(v4) = find(ip, CTA_IP_V4_DST) {
        <[u8; 4]>::try_from(v4)
            .map_err(|_| NoAnswer::Malformed)?
            .into()
    } else {
        let v6 = find(ip, CTA_IP_V6_DST).ok_or(NoAnswer::Malformed)?;
        <[u8; 16]>::try_from(v6)
            .map_err(|_| NoAnswer::Malformed)?
            .into()
    };
    let proto = find(orig, CTA_TUPLE_PROTO).ok_or(NoAnswer::Malformed)?;
    let port = find(proto, CTA_PROTO_DST_PORT).ok_or(NoAnswer::Malformed)?;
    let port = u16::from_be_bytes(port.try_into().map_err(|_| NoAnswer::Malformed)?);
    Ok(SocketAddr::new(ip, port))
}

/// A netlink socket to conntrack, opened at the first redirected datagram and kept.
#[derive(Debug)]
pub(crate) struct Conntrack {
    fd: std::os::fd::OwnedFd,
    next_seq: u32,
}

impl Conntrack {
    /// A bound on a surprise: the kernel answers within the send.
    const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

    pub(crate) fn open() -> Result<Conntrack, ConntrackError> {
        let fd = open_netfilter(Self::ANSWER_TIMEOUT).map_err(ConntrackError::Open)?;
        Ok(Conntrack { fd, next_seq: 1 })
    }

    /// Where the client's datagram that arrived at `arrived` was sent before nftables
    /// redirected it.
    pub(crate) fn original_destination(
        &mut self,
        arrived: SocketAddr,
        client: SocketAddr,
    ) -> Result<SocketAddr, ConntrackError> {
        use rustix::io::Errno;
        use rustix::net::{netlink::SocketAddrNetlink, RecvFlags, SendFlags};
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let request = encode_get(seq, arrived, client);
        let io = |e: Errno| ConntrackError::Io(e.into());
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &request, SendFlags::empty(), &kernel).map_err(io)?;
        let mut buf = [0u8; 1024];
        loop {
            let len = match rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::empty()) {
                Ok((len, _)) => len.min(buf.len()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(io(e)),
            };
            let answered = &buf[..len];
            // An answer to an earlier, timed-out request is skipped.
            if len >= NLMSG_HDRLEN && u32::from_ne_bytes(answered[8..12].try_into().unwrap()) != seq
            {
                continue;
            }
            return original_destination(answered).map_err(|e| match e {
                NoAnswer::Refused(errno) => ConntrackError::NotFound {
                    arrived,
                    client,
                    errno,
                },
                NoAnswer::Malformed => ConntrackError::Malformed,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// An attribute as the kernel writes it, padded.
    fn a(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        attr(&mut b, kind, payload);
        b
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut b = Vec::new();
        nest(&mut b, kind, |b| parts.iter().for_each(|p| b.extend(p)));
        b
    }

    #[test]
    fn a_lookup_asks_by_the_reply_direction() {
        let got = encode_get(7, sa("10.244.0.1:15001"), sa("10.244.0.5:40000"));
        let mut want = Vec::new();
        // nlmsghdr: length, type 0x0101 (ctnetlink, GET), NLM_F_REQUEST, seq 7, port 0
        want.extend(72u32.to_ne_bytes());
        want.extend(0x0101u16.to_ne_bytes());
        want.extend(1u16.to_ne_bytes());
        want.extend(7u32.to_ne_bytes());
        want.extend(0u32.to_ne_bytes());
        want.extend([AF_INET, 0, 0, 0]); // nfgenmsg
        want.extend(nested(
            CTA_TUPLE_REPLY,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        a(CTA_IP_V4_SRC, &[10, 244, 0, 1]),
                        a(CTA_IP_V4_DST, &[10, 244, 0, 5]),
                    ],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        a(CTA_PROTO_NUM, &[17]),
                        a(CTA_PROTO_SRC_PORT, &15001u16.to_be_bytes()),
                        a(CTA_PROTO_DST_PORT, &40000u16.to_be_bytes()),
                    ],
                ),
            ],
        ));
        assert_eq!(got, want);
        assert_eq!(got.len(), 72);
    }

    /// An answer laid out as the kernel's: the original tuple, then others.
    fn answer(ip: &[Vec<u8>], port: u16) -> Vec<u8> {
        let mut b = Vec::new();
        message(
            &mut b,
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
            0,
            7,
            (AF_INET, 0),
            |b| {
                b.extend(nested(
                    CTA_TUPLE_ORIG,
                    &[
                        nested(CTA_TUPLE_IP, ip),
                        nested(
                            CTA_TUPLE_PROTO,
                            &[
                                a(CTA_PROTO_NUM, &[17]),
                                a(CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes()),
                                a(CTA_PROTO_DST_PORT, &port.to_be_bytes()),
                            ],
                        ),
                    ],
                ));
                b.extend(a(3, &[0, 0, 0, 8])); // CTA_STATUS
            },
        );
        b
    }

    #[test]
    fn the_answer_gives_the_original_destination() {
        let v4 = answer(
            &[
                a(CTA_IP_V4_SRC, &[10, 244, 0, 5]),
                a(CTA_IP_V4_DST, &[10, 96, 0, 10]),
            ],
            53,
        );
        assert_eq!(original_destination(&v4), Ok(sa("10.96.0.10:53")));
        let server: std::net::Ipv6Addr = "fd00:96::a".parse().unwrap();
        let v6 = answer(
            &[
                a(CTA_IP_V6_SRC, &[0; 16]),
                a(CTA_IP_V6_DST, &server.octets()),
            ],
            53,
        );
        assert_eq!(original_destination(&v6), Ok(sa("[fd00:96::a]:53")));
    }

    #[test]
    fn a_refusal_gives_its_errno_and_garbage_is_malformed() {
        let mut refused = Vec::new();
        refused.extend(36u32.to_ne_bytes());
        refused.extend(NLMSG_ERROR.to_ne_bytes());
        refused.extend([0; 10]);
        refused.extend((-2i32).to_ne_bytes()); // ENOENT
        refused.extend([0; 16]);
        assert_eq!(original_destination(&refused), Err(NoAnswer::Refused(2)));
        assert_eq!(original_destination(&[1, 2, 3]), Err(NoAnswer::Malformed));
        let without_orig = answer(&[], 53);
        assert_eq!(
            original_destination(&without_orig),
            Err(NoAnswer::Malformed)
        );
        // Cut anywhere, an answer never panics.
        let whole = answer(&[a(CTA_IP_V4_DST, &[10, 96, 0, 10])], 53);
        for cut in 0..whole.len() {
            let _ = original_destination(&whole[..cut]);
        }
    }
}
