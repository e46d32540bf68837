//! Element changes to carousel's sets, sent to nf_tables over netlink on a socket that
//! stays open: one batch per table change, which the kernel applies as one transaction,
//! all of it or none of it.
//!
//! `nft -f` does the same, but each run costs a process, and after an element removal
//! the close of its netlink socket waits for an RCU grace period (on release the kernel
//! finishes the transaction's clean-up): some 15 ms per change. A socket kept open
//! pays neither.
//!
//! [`encode`] and [`acks`] are pure functions over bytes, tested against what `nft
//! --debug=netlink,mnl` and `strace -x` show nft sending for the same changes; [`Socket`]
//! is the thin edge that sends a batch and reads the kernel's answers.

use std::io;
use std::ops::Range;

use super::elements::{Change, Element, Op};

// From <linux/netlink.h>, <linux/netfilter/nfnetlink.h> and <linux/netfilter/nf_tables.h>.
pub(super) const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLMSG_ERROR: u16 = 0x2;
pub(super) const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NLMSG_HDRLEN: usize = 16;

/// Elements per message at most. The list of elements is one attribute, whose length
/// is 16 bits (at most 32 bytes an element: 8 KiB), and a refused message comes back
/// whole in the error, so messages stay small.
const PER_MESSAGE: usize = 256;

/// A batch ready to send.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) bytes: Vec<u8>,
    /// The sequence number of BATCH_BEGIN; the messages after it are numbered on.
    pub(crate) first_seq: u32,
    /// The changes each element message carries, in order: message `i` has sequence
    /// number `first_seq + 1 + i`.
    pub(crate) messages: Vec<Range<usize>>,
}

impl Batch {
    /// Which element message `seq` numbers.
    fn message(&self, seq: u32) -> Option<usize> {
        let i = seq.wrapping_sub(self.first_seq).wrapping_sub(1) as usize;
        (i < self.messages.len()).then_some(i)
    }

    /// The first sequence number after the batch (BATCH_END's is the one before).
    fn next_seq(&self) -> u32 {
        self.first_seq.wrapping_add(self.messages.len() as u32 + 2)
    }
}

/// The batch that applies `changes` to table `inet <table>` in one transaction: one
/// message per run of changes with the same operation and set (at most
/// [`PER_MESSAGE`] elements), each asking for an acknowledgement, between BATCH_BEGIN and
/// BATCH_END. Additions do not ask for exclusivity: adding an element that is there
/// already succeeds, as `nft add element` does.
pub(crate) fn encode(table: &str, changes: &[Change], first_seq: u32) -> Batch {
    let mut bytes = Vec::new();
    let mut seq = first_seq;
    let batch_header = (NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES);
    message(
        &mut bytes,
        NFNL_MSG_BATCH_BEGIN,
        0,
        seq,
        batch_header,
        |_| {},
    );
    let mut messages = Vec::new();
    let mut start = 0;
    while start < changes.len() {
        let (op, set) = (changes[start].op, changes[start].element.set());
        let len = changes[start..]
            .iter()
            .take(PER_MESSAGE)
            .take_while(|c| c.op == op && c.element.set() == set)
            .count();
        let run = start..start + len;
        let (kind, flags) = match op {
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_ACK),
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_ACK | NLM_F_CREATE),
        };
        seq = seq.wrapping_add(1);
        let kind = NFNL_SUBSYS_NFTABLES << 8 | kind;
        message(&mut bytes, kind, flags, seq, (NFPROTO_INET, 0), |b| {
            attr(b, NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(table));
            attr(b, NFTA_SET_ELEM_LIST_SET, &nul_terminated(set));
            nest(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                for change in &changes[run.clone()] {
                    nest(b, NFTA_LIST_ELEM, |b| {
                        nest(b, NFTA_SET_ELEM_KEY, |b| {
                            attr(b, NFTA_DATA_VALUE, &change.element.key())
                        })
                    });
                }
            });
        });
        messages.push(run);
        start += len;
    }
    seq = seq.wrapping_add(1);
    message(&mut bytes, NFNL_MSG_BATCH_END, 0, seq, batch_header, |_| {});
    Batch {
        bytes,
        first_seq,
        messages,
    }
}

/// Appends a netlink message (header, then nfnetlink's family, version and resource
/// id, then what `body` writes), with the length filled in. Fields in host byte order.
pub(super) fn message(
    b: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    (family, res_id): (u8, u16),
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = b.len();
    b.extend(0u32.to_ne_bytes()); // the length, below
    b.extend(kind.to_ne_bytes());
    b.extend((NLM_F_REQUEST | flags).to_ne_bytes());
    b.extend(seq.to_ne_bytes());
    b.extend(0u32.to_ne_bytes()); // the port id: the kernel fills it in
    b.extend([family, 0]); // version: NFNETLINK_V0
    b.extend(res_id.to_be_bytes());
    body(b);
    let len = (b.len() - start) as u32;
    b[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends an attribute, padded to 4 bytes.
pub(super) fn attr(b: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    b.extend((4 + payload.len() as u16).to_ne_bytes());
    b.extend(kind.to_ne_bytes());
    b.extend(payload);
    b.resize(b.len().next_multiple_of(4), 0);
}

/// Appends a nested attribute holding what `body` writes.
pub(super) fn nest(b: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend([0, 0]); // the length, below
    b.extend((NLA_F_NESTED | kind).to_ne_bytes());
    body(b);
    let len = (b.len() - start) as u16;
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The kernel's answer to one message: 0, or the errno it was refused with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) seq: u32,
    pub(crate) errno: i32,
}

/// The acknowledgements among the netlink messages in `buf` (one read from the
/// socket); other messages are skipped.
pub(crate) fn acks(buf: &[u8]) -> Result<Vec<Ack>, NetlinkError> {
    let mut acks = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let field = |at: usize| -> [u8; 4] { rest[at..at + 4].try_into().unwrap() };
        if rest.len() < NLMSG_HDRLEN {
            return Err(NetlinkError::Malformed);
        }
        let len = u32::from_ne_bytes(field(0)) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(NetlinkError::Malformed);
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if kind == NLMSG_ERROR {
            if len < NLMSG_HDRLEN + 4 {
                return Err(NetlinkError::Malformed);
            }
            acks.push(Ack {
                seq: u32::from_ne_bytes(field(8)),
                errno: -i32::from_ne_bytes(field(NLMSG_HDRLEN)),
            });
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(acks)
}

/// Why an element change did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetlinkError {
    #[error("cannot open a netlink socket to nf_tables: {0}")]
    Open(#[source] io::Error),
    #[error("netlink socket to nf_tables: {0}")]
    Io(#[source] io::Error),
    #[error("nf_tables refused the batch: {}", io::Error::from_raw_os_error(*errno))]
    Batch { errno: i32 },
    #[error(
        "nf_tables refused to {op} {} in set {set}: {}",
        describe(elements),
        io::Error::from_raw_os_error(*errno)
    )]
    Refused {
        op: Op,
        set: &'static str,
        /// The elements of the refused message; the kernel names no one of them.
        elements: Vec<Element>,
        errno: i32,
    },
    #[error("nf_tables answered {missing} of the batch's messages not at all")]
    Unanswered { missing: usize },
    #[error("an answer from nf_tables that is not netlink")]
    Malformed,
}

fn describe(elements: &[Element]) -> String {
    match elements {
        [one] => one.to_string(),
        _ => {
            let shown: Vec<String> = elements.iter().take(3).map(|e| e.to_string()).collect();
            let more = if elements.len() > 3 { ", ..." } else { "" };
            format!(
                "one of {} elements ({}{more})",
                elements.len(),
                shown.join(", ")
            )
        }
    }
}

/// A netlink socket to nf_tables, opened once and kept.
#[derive(Debug)]
pub(crate) struct Socket {
    fd: std::os::fd::OwnedFd,
    next_seq: u32,
}

#[cfg(target_os = "linux")]
impl Socket {
    /// How long to wait for answers. The kernel handles a batch within the send, so
    /// its answers are queued when `send` returns; this only bounds a surprise.
    const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

    pub(crate) fn open() -> Result<Socket, NetlinkError> {
        let fd = open_netfilter(Self::ANSWER_TIMEOUT).map_err(NetlinkError::Open)?;
        Ok(Socket { fd, next_seq: 1 })
    }

    /// Applies `changes` to table `inet <table>` in one transaction, and waits for the
    /// kernel's answer to each message.
    pub(crate) fn apply(&mut self, table: &str, changes: &[Change]) -> Result<(), NetlinkError> {
        use rustix::io::Errno;
        use rustix::net::{netlink::SocketAddrNetlink, sockopt, RecvFlags, SendFlags};
        if changes.is_empty() {
            return Ok(());
        }
        let batch = encode(table, changes, self.next_seq);
        self.next_seq = batch.next_seq();
        let io = |e: Errno| NetlinkError::Io(e.into());
        // A message longer than the send buffer is refused (EMSGSIZE): make room, as nft
        // does. Forcing the size takes CAP_NET_ADMIN, which nf_tables requires anyway.
        let room = batch.bytes.len() + 32;
        if sockopt::socket_send_buffer_size(&self.fd).map_err(io)? < room {
            sockopt::set_socket_send_buffer_size_force(&self.fd, room).map_err(io)?;
        }
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(&self.fd, &batch.bytes, SendFlags::empty(), &kernel).map_err(io)?;

        let mut answered = vec![false; batch.messages.len()];
        let mut missing = answered.len();
        let mut refused = None;
        // Large enough for the largest refused message, which comes back whole.
        let mut buf = vec![0u8; 64 * 1024];
        while missing > 0 {
            let len = match rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::TRUNC) {
                Ok((_, len)) if len > buf.len() => return Err(NetlinkError::Malformed),
                Ok((_, len)) => len,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Err(NetlinkError::Unanswered { missing }),
                Err(e) => return Err(io(e)),
            };
            for ack in acks(&buf[..len])? {
                if ack.seq == batch.first_seq && ack.errno != 0 {
                    return Err(NetlinkError::Batch { errno: ack.errno });
                }
                let Some(i) = batch.message(ack.seq) else {
                    continue; // an answer to an earlier batch, late
                };
                if !std::mem::replace(&mut answered[i], true) {
                    missing -= 1;
                }
                if ack.errno != 0 && refused.is_none() {
                    let elements: Vec<Element> = changes[batch.messages[i].clone()]
                        .iter()
                        .map(|c| c.element)
                        .collect();
                    refused = Some(NetlinkError::Refused {
                        op: changes[batch.messages[i].start].op,
                        set: elements[0].set(),
                        elements,
                        errno: ack.errno,
                    });
                }
            }
        }
        refused.map_or(Ok(()), Err)
    }
}

/// A netlink socket to netfilter (nf_tables, conntrack), bound, whose reads give up
/// after `timeout`.
#[cfg(target_os = "linux")]
pub(super) fn open_netfilter(timeout: std::time::Duration) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{netlink, sockopt, AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(timeout))?;
    Ok(fd)
}

/// Elsewhere than Linux there is no nf_tables.
#[cfg(not(target_os = "linux"))]
impl Socket {
    pub(crate) fn open() -> Result<Socket, NetlinkError> {
        Err(NetlinkError::Open(io::ErrorKind::Unsupported.into()))
    }

    pub(crate) fn apply(&mut self, _table: &str, _changes: &[Change]) -> Result<(), NetlinkError> {
        Err(NetlinkError::Open(io::ErrorKind::Unsupported.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use std::net::Ipv4Addr;

    fn change(op: Op, element: Element) -> Change {
        Change { op, element }
    }

    fn v4(last: u8, port: u16) -> Element {
        Element::V4(Ipv4Addr::new(10, 96, 0, last), Protocol::Tcp, port)
    }

    /// A netlink message header and nfnetlink header as the bytes `strace -x` shows.
    fn header(len: u32, kind: u16, flags: u16, seq: u32, nfgen: [u8; 4]) -> Vec<u8> {
        let mut b = Vec::new();
        for field in [
            &len.to_ne_bytes()[..],
            &kind.to_ne_bytes(),
            &flags.to_ne_bytes(),
        ] {
            b.extend(field);
        }
        b.extend(seq.to_ne_bytes());
        b.extend([0; 4]);
        b.extend(nfgen);
        b
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn a_batch_is_laid_out_as_nft_sends_it() {
        // What `strace -x nft -f` showed for these changes, byte for byte, but with
        // NLM_F_ACK on the element messages and without nft's NFTA_SET_ELEM_LIST_SET_ID
        // (which names a set created in the same batch).
        let changes = [
            change(Op::Delete, v4(10, 80)),
            change(
                Op::Add,
                Element::V6("fd00:10:96::b".parse().unwrap(), Protocol::Udp, 53),
            ),
            change(Op::Add, Element::NodePort(Protocol::Tcp, 30081)),
        ];
        let batch = encode("carousel", &changes, 7);
        let table = b"\x0d\x00\x01\x00carousel\x00\x00\x00\x00";
        let mut want = header(20, 0x10, 0x1, 7, [0, 0, 0, 10]); // BATCH_BEGIN, nftables
        want.extend(header(80, 0x0a0e, 0x5, 8, [1, 0, 0, 0])); // DELSETELEM, inet
        want.extend(table);
        want.extend(b"\x0e\x00\x02\x00services4\x00\x00\x00");
        want.extend(b"\x1c\x00\x03\x80\x18\x00\x01\x80\x14\x00\x01\x80\x10\x00\x01\x00");
        want.extend(b"\x0a\x60\x00\x0a\x06\x00\x00\x00\x00\x50\x00\x00");
        want.extend(header(92, 0x0a0c, 0x405, 9, [1, 0, 0, 0])); // NEWSETELEM, CREATE
        want.extend(table);
        want.extend(b"\x0e\x00\x02\x00services6\x00\x00\x00");
        want.extend(b"\x28\x00\x03\x80\x24\x00\x01\x80\x20\x00\x01\x80\x1c\x00\x01\x00");
        want.extend(b"\xfd\x00\x00\x10\x00\x96\x00\x00\x00\x00\x00\x00\x00\x00\x00\x0b");
        want.extend(b"\x11\x00\x00\x00\x00\x35\x00\x00");
        want.extend(header(76, 0x0a0c, 0x405, 10, [1, 0, 0, 0]));
        want.extend(table);
        want.extend(b"\x0e\x00\x02\x00nodeports\x00\x00\x00");
        want.extend(b"\x18\x00\x03\x80\x14\x00\x01\x80\x10\x00\x01\x80\x0c\x00\x01\x00");
        want.extend(b"\x06\x00\x00\x00\x75\x81\x00\x00");
        want.extend(header(20, 0x11, 0x1, 11, [0, 0, 0, 10])); // BATCH_END
        assert_eq!(batch.bytes, want);
        assert_eq!(batch.messages, [0..1, 1..2, 2..3]);
        assert_eq!(batch.next_seq(), 12);
    }

    #[test]
    fn runs_of_one_operation_on_one_set_share_a_message_of_at_most_256_elements() {
        let mut changes: Vec<Change> = (0..300u16)
            .map(|i| change(Op::Add, v4(1, 1000 + i)))
            .collect();
        changes.push(change(Op::Add, Element::NodePort(Protocol::Tcp, 30080)));
        changes.insert(0, change(Op::Delete, v4(2, 80)));
        let batch = encode("carousel", &changes, u32::MAX - 1);
        assert_eq!(batch.messages, [0..1, 1..257, 257..301, 301..302]);
        // Sequence numbers wrap: BATCH_BEGIN is u32::MAX - 1, the messages follow.
        assert_eq!(batch.message(u32::MAX), Some(0));
        assert_eq!(batch.message(0), Some(1));
        assert_eq!(batch.message(2), Some(3));
        assert_eq!(batch.message(3), None, "BATCH_END");
        assert_eq!(batch.message(u32::MAX - 1), None, "BATCH_BEGIN");
        // Each message's length field covers exactly its bytes.
        let mut rest = &batch.bytes[..];
        let mut count = 0;
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            rest = &rest[len..];
            count += 1;
        }
        assert_eq!(count, 6);
        assert!(encode("carousel", &[], 1).messages.is_empty());
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn acknowledgements_are_read_with_their_errno() {
        // As `strace -x` showed the kernel's answers: an acknowledgement carries the
        // request's header (NLM_F_CAPPED: without its payload); a refusal, -errno and the
        // whole request.
        let mut read = header(36, NLMSG_ERROR, 0x100, 2, 0i32.to_ne_bytes());
        read.extend(header(76, 0x0a0e, 0x5, 2, [0; 4])[..16].to_vec());
        let request = encode("carousel", &[change(Op::Delete, v4(98, 80))], 11).bytes;
        let request = &request[20..request.len() - 20];
        read.extend(header(
            20 + request.len() as u32,
            NLMSG_ERROR,
            0,
            12,
            (-2i32).to_ne_bytes(),
        ));
        read.extend(request);
        read.extend(header(20, 3, 0x2, 13, [0; 4])); // NLMSG_DONE: not an answer, skipped
        assert_eq!(
            acks(&read).unwrap(),
            [Ack { seq: 2, errno: 0 }, Ack { seq: 12, errno: 2 }]
        );
        assert!(matches!(acks(&read[..30]), Err(NetlinkError::Malformed)));
        assert!(matches!(acks(&read[..8]), Err(NetlinkError::Malformed)));
    }

    #[test]
    fn a_refusal_names_the_set_the_operation_and_the_elements() {
        let refused = |elements: Vec<Element>| NetlinkError::Refused {
            op: Op::Delete,
            set: "services4",
            elements,
            errno: 2,
        };
        assert_eq!(
            refused(vec![v4(98, 80)]).to_string(),
            "nf_tables refused to delete 10.96.0.98 . tcp . 80 in set services4: \
             No such file or directory (os error 2)"
        );
        assert_eq!(
            refused((1..=5).map(|i| v4(i, 80)).collect()).to_string(),
            "nf_tables refused to delete one of 5 elements (10.96.0.1 . tcp . 80, \
             10.96.0.2 . tcp . 80, 10.96.0.3 . tcp . 80, ...) in set services4: \
             No such file or directory (os error 2)"
        );
    }
}
