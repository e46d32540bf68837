//! carousel's own nftables table, `inet carousel`: rendered by pure functions from the
//! set of Service addresses, and applied as one atomic transaction per change.
//!
//! Service traffic is intercepted with TPROXY, not REDIRECT: the packet keeps its
//! destination and is delivered to carousel's transparent listener, whose accepted
//! socket's local address is the Service address the client dialed. REDIRECT rewrote the
//! destination to the incoming interface's primary address and dropped the packet where
//! there is none: the host side of a pod's veth under Calico, Cilium or the AWS VPC CNI.
//! A TPROXY'd packet is delivered locally by a policy route for `INTERCEPT_MARK`
//! (`policy_route.rs`); the node's own connections are marked in the output hook, so that
//! the same route sends them through `lo` into prerouting.
//!
//! Packets that come in on a bridge (flannel's cni0, the bridge plugin) are redirected
//! instead: with br_netfilter, as Kubernetes nodes load it, the hooks run at the bridge
//! and the IP layer drops the socket TPROXY assigned there. Such bridges carry the pods'
//! gateway address, which is all REDIRECT needs.
//!
//! A Service with `carousel.dev/source: transparent` has carousel connect to this node's
//! pods from the client's own address. The pod's replies go to that address, so the
//! output hook marks such a connection's conntrack entry (`TRANSPARENT_MARK`, the
//! socket's mark), and prerouting gives the replies of marked entries `INTERCEPT_MARK`:
//! the same policy route delivers them to carousel's socket instead of the client.
//!
//! The rules never change after start-up; what changes is the content of three sets
//! (IPv4 and IPv6 Service addresses with their ports, and node ports), so a table change
//! is a transaction of element additions and removals, never a rewrite of the world.
//! The whole table (at start-up, and whenever a change is refused) is a script for
//! `nft -f`; element changes go to the kernel over netlink (`netlink.rs`).

use imbl::{OrdMap, OrdSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::elements::{Change, Element, Op};
use super::netlink::{self, NetlinkError};
use super::policy_route::{self, Family, PolicyRouteError, INTERCEPT_MARK};
use crate::model::{Dialed, Protocol};

/// The table carousel owns; it touches nothing else.
pub const TABLE: &str = "carousel";
/// The socket mark of carousel's own connections to pods: they skip the interception, so
/// a pod whose address happens to equal a Service address is still reached, never looped.
pub(crate) const MARK: u32 = 0x4341;
/// The socket mark of carousel's connections that leave from their client's address
/// (`carousel.dev/source: transparent`): their conntrack entries are marked with it in
/// output, and the pod's replies, which go to the client's address, are marked for the
/// policy route in prerouting, so that they come back to carousel's socket.
pub(crate) const TRANSPARENT_MARK: u32 = 0x4343;

/// Service addresses with their protocols and ports, by family, and node ports with
/// their protocols. Persistent sets: a copy is O(1), and `diff` of two versions skips
/// what they share, so one changed Service among thousands costs its own elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ports {
    pub(crate) v4: OrdSet<(Ipv4Addr, Protocol, u16)>,
    pub(crate) v6: OrdSet<(Ipv6Addr, Protocol, u16)>,
    pub(crate) node_ports: OrdSet<(Protocol, u16)>,
}

impl Ports {
    fn add(&mut self, (protocol, addr): Dialed) {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.v4.insert((ip, protocol, addr.port()));
            }
            IpAddr::V6(ip) => {
                self.v6.insert((ip, protocol, addr.port()));
            }
        }
    }

    fn remove(&mut self, (protocol, addr): Dialed) {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.v4.remove(&(ip, protocol, addr.port()));
            }
            IpAddr::V6(ip) => {
                self.v6.remove(&(ip, protocol, addr.port()));
            }
        }
    }
}

/// What the rules do with Service traffic: intercept it for carousel, refuse it at the
/// SYN (a Service port without endpoints), drop it (a client outside a load-balancer
/// address's source ranges).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirects {
    pub(crate) intercept: Ports,
    pub(crate) refuse: Ports,
    /// Load-balancer addresses that only clients inside these ranges may reach.
    pub(crate) source_ranges: OrdMap<Dialed, Vec<IpNet>>,
}

impl Redirects {
    /// Every address and node port intercepted; nothing refused or guarded.
    pub fn new(
        service_addrs: impl IntoIterator<Item = Dialed>,
        node_ports: impl IntoIterator<Item = (Protocol, u16)>,
    ) -> Self {
        let mut r = Redirects::default();
        service_addrs.into_iter().for_each(|a| r.intercept.add(a));
        r.intercept.node_ports.extend(node_ports);
        r
    }

    /// A Service address, intercepted when its Service port has endpoints, else refused.
    pub(crate) fn service(&mut self, addr: Dialed, has_endpoints: bool) {
        match has_endpoints {
            true => self.intercept.add(addr),
            false => self.refuse.add(addr),
        }
    }

    /// A node port, intercepted when its Service port has endpoints, else refused.
    pub(crate) fn node_port(&mut self, port: (Protocol, u16), has_endpoints: bool) {
        match has_endpoints {
            true => self.intercept.node_ports.insert(port),
            false => self.refuse.node_ports.insert(port),
        };
    }

    /// Takes `addr` out of every set, before it is put back as it is now.
    pub(crate) fn forget(&mut self, addr: Dialed) {
        self.intercept.remove(addr);
        self.refuse.remove(addr);
        self.source_ranges.remove(&addr);
    }

    /// Takes a node port out of every set, before it is put back as it is now.
    pub(crate) fn forget_node_port(&mut self, port: (Protocol, u16)) {
        self.intercept.node_ports.remove(&port);
        self.refuse.node_ports.remove(&port);
    }

    /// The source ranges of a load-balancer address; the ranges of its own family.
    pub(crate) fn guard(&mut self, addr: Dialed, ranges: &[IpNet]) {
        let ranges: Vec<IpNet> = ranges
            .iter()
            .filter(|net| net.addr().is_ipv4() == addr.1.ip().is_ipv4())
            .copied()
            .collect();
        if !ranges.is_empty() {
            self.source_ranges.insert(addr, ranges);
        }
    }
}

/// The whole table, replacing whatever carousel's table held (after a crash, too): one
/// transaction, so there is no moment without rules.
pub fn render_full(redirects: &Redirects, listen_port: u16, nodeport_nets: &[IpNet]) -> String {
    let mut s = String::new();
    // `add` then `delete` makes the delete succeed whether or not the table exists.
    writeln!(s, "add table inet {TABLE}").unwrap();
    writeln!(s, "delete table inet {TABLE}").unwrap();
    writeln!(s, "table inet {TABLE} {{").unwrap();
    render_sets(&mut s, redirects);
    render_chains(&mut s, listen_port, nodeport_nets);
    writeln!(s, "}}").unwrap();
    s
}

/// The table's sets, filled from `redirects`. Each key holds the transport protocol
/// (`meta l4proto`) beside the port: TCP 53 and UDP 53 are two Service ports.
fn render_sets(s: &mut String, redirects: &Redirects) {
    let (intercept, refuse) = (&redirects.intercept, &redirects.refuse);
    for (name, ports) in [("services", intercept), ("refused", refuse)] {
        set(
            s,
            &format!("{name}4"),
            "ipv4_addr . inet_proto . inet_service",
            "",
            ports
                .v4
                .iter()
                .map(|&(ip, protocol, port)| Element::V4(ip, protocol, port).to_string()),
        );
        set(
            s,
            &format!("{name}6"),
            "ipv6_addr . inet_proto . inet_service",
            "",
            ports
                .v6
                .iter()
                .map(|&(ip, protocol, port)| Element::V6(ip, protocol, port).to_string()),
        );
    }
    for (name, ports) in [("nodeports", intercept), ("refused_nodeports", refuse)] {
        set(
            s,
            name,
            "inet_proto . inet_service",
            "",
            ports
                .node_ports
                .iter()
                .map(|&(protocol, port)| Element::NodePort(protocol, port).to_string()),
        );
    }
    let guarded = |v4: bool| {
        redirects
            .source_ranges
            .iter()
            .filter(move |((_, a), _)| a.ip().is_ipv4() == v4)
    };
    for (family, v4) in [("4", true), ("6", false)] {
        let addr_type = if v4 { "ipv4_addr" } else { "ipv6_addr" };
        let key = |(protocol, a): &Dialed| {
            let protocol = if *protocol == Protocol::Udp {
                "udp"
            } else {
                "tcp"
            };
            format!("{} . {protocol} . {}", a.ip(), a.port())
        };
        set(
            s,
            &format!("guarded{family}"),
            &format!("{addr_type} . inet_proto . inet_service"),
            "",
            guarded(v4).map(|(a, _)| key(a)),
        );
        set(
            s,
            &format!("allowed{family}"),
            &format!("{addr_type} . inet_proto . inet_service . {addr_type}"),
            "interval",
            guarded(v4).flat_map(|(a, nets)| {
                let key = key(a);
                nets.iter().map(move |net| format!("{key} . {net}"))
            }),
        );
    }
}

/// The chains: prerouting intercepts, refuses and guards; output marks the node's own
/// connections; bridged redirects what a bridge hands over.
fn render_chains(s: &mut String, listen_port: u16, nodeport_nets: &[IpNet]) {
    let mark = format!("meta mark set {INTERCEPT_MARK:#010x}");
    // Only packets of a client's direction: a reply to one of carousel's own sockets
    // (whose port could equal a node port) is never taken over. Refusals and source
    // ranges apply to new TCP connections only: an open one is never cut by a change.
    // UDP has no connection: each of its datagrams is refused or dropped. The replies
    // to carousel's transparent-source connections are the exception: delivered here.
    writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    ct direction reply ct mark {TRANSPARENT_MARK:#010x} {mark} accept\n    ct direction reply accept"
    )
    .unwrap();
    let syn = "tcp flags & (fin | syn | rst | ack) == syn";
    let udp = "meta l4proto udp";
    let key = |family: &str| format!("{family} daddr . meta l4proto . th dport");
    for family in ["ip", "ip6"] {
        let n = if family == "ip" { "4" } else { "6" };
        let (key, saddr) = (key(family), format!("{family} saddr"));
        for new in [syn, udp] {
            writeln!(
                s,
                "    {key} @guarded{n} {new} {key} . {saddr} != @allowed{n} drop"
            )
            .unwrap();
        }
    }
    let mut refused = vec![
        format!("{} @refused4", key("ip")),
        format!("{} @refused6", key("ip6")),
    ];
    let mut intercepted = vec![
        ("ip", format!("{} @services4", key("ip"))),
        ("ip6", format!("{} @services6", key("ip6"))),
    ];
    for family in ["ip", "ip6"] {
        if let Some(addresses) = nodeport_match(family, nodeport_nets) {
            refused.push(format!(
                "{addresses} meta l4proto . th dport @refused_nodeports"
            ));
            intercepted.push((
                family,
                format!("{addresses} meta l4proto . th dport @nodeports"),
            ));
        }
    }
    for matches in &refused {
        writeln!(s, "    {matches} {syn} reject with tcp reset").unwrap();
        writeln!(s, "    {matches} {udp} reject with icmpx port-unreachable").unwrap();
    }
    writeln!(s, "    meta iifkind \"bridge\" return").unwrap();
    for (family, matches) in &intercepted {
        writeln!(
            s,
            "    {matches} meta l4proto {{ tcp, udp }} tproxy {family} to :{listen_port} {mark} accept"
        )
        .unwrap();
    }
    // The node's own connections to a Service: marked, the policy route sends them
    // through lo, and prerouting takes them over (or refuses them). A local
    // destination (a node port on one of the node's addresses) goes through lo anyway.
    // carousel's own connections pass; the transparent ones mark their conntrack entry.
    writeln!(
        s,
        "  }}\n  chain output {{\n    type route hook output priority mangle; policy accept;\n    meta mark {MARK:#010x} return\n    meta mark {TRANSPARENT_MARK:#010x} ct mark set {TRANSPARENT_MARK:#010x} return"
    )
    .unwrap();
    for set in ["services", "refused"] {
        writeln!(s, "    {} @{set}4 {mark}", key("ip")).unwrap();
        writeln!(s, "    {} @{set}6 {mark}", key("ip6")).unwrap();
    }
    // From a bridge: redirected, and carousel reads the Service address from conntrack
    // (SO_ORIGINAL_DST for TCP, a ctnetlink lookup for UDP).
    writeln!(
        s,
        "  }}\n  chain bridged {{\n    type nat hook prerouting priority dstnat; policy accept;\n    meta iifkind != \"bridge\" return"
    )
    .unwrap();
    for (_, matches) in &intercepted {
        writeln!(
            s,
            "    {matches} meta l4proto {{ tcp, udp }} redirect to :{listen_port}"
        )
        .unwrap();
    }
    writeln!(s, "  }}").unwrap();
}

/// The node addresses of `family` ("ip", "ip6") that serve node ports: local ones inside
/// `nets` (`--nodeport-addresses`; every one when empty), loopback only when a net asks
/// for it by lying inside it (kube-proxy's nftables mode serves none there by default).
/// `None` when no net of the family is given.
fn nodeport_match(family: &str, nets: &[IpNet]) -> Option<String> {
    let (loopback, wanted): (IpNet, Vec<&IpNet>) = match family {
        "ip" => (
            "127.0.0.0/8".parse().expect("valid"),
            nets.iter().filter(|n| n.addr().is_ipv4()).collect(),
        ),
        _ => (
            "::1/128".parse().expect("valid"),
            nets.iter().filter(|n| n.addr().is_ipv6()).collect(),
        ),
    };
    if !nets.is_empty() && wanted.is_empty() {
        return None;
    }
    let mut matches = String::new();
    if !wanted.is_empty() {
        let list: Vec<String> = wanted.iter().map(|n| n.to_string()).collect();
        write!(matches, "{family} daddr {{ {} }} ", list.join(", ")).unwrap();
    }
    if !wanted.iter().any(|n| loopback.contains(*n)) {
        write!(matches, "{family} daddr != {loopback} ").unwrap();
    }
    matches.push_str("fib daddr type local");
    Some(matches)
}

/// One set declaration with its elements, as nft writes them.
fn set(
    s: &mut String,
    name: &str,
    key: &str,
    flags: &str,
    mut items: impl Iterator<Item = String>,
) {
    writeln!(s, "  set {name} {{\n    type {key}").unwrap();
    if !flags.is_empty() {
        writeln!(s, "    flags {flags}").unwrap();
    }
    if let Some(first) = items.next() {
        write!(s, "    elements = {{ {first}").unwrap();
        items.for_each(|e| write!(s, ", {e}").unwrap());
        writeln!(s, " }}").unwrap();
    }
    writeln!(s, "  }}").unwrap();
}

/// The element changes that turn `old` into `new`: removals first, then additions, set
/// by set. Empty when nothing changed. `None` when the source ranges changed: those
/// sets are rewritten with the whole table (they change rarely, and their interval
/// elements are nft's to lay out).
pub(crate) fn diff(old: &Redirects, new: &Redirects) -> Option<Vec<Change>> {
    if old.source_ranges != new.source_ranges {
        return None;
    }
    // Each kind of set, with the elements it holds.
    type Kind = (
        fn(&Redirects) -> &Ports,
        fn(Ipv4Addr, Protocol, u16) -> Element,
        fn(Ipv6Addr, Protocol, u16) -> Element,
        fn(Protocol, u16) -> Element,
    );
    let kinds: [Kind; 2] = [
        (
            |r| &r.intercept,
            Element::V4,
            Element::V6,
            Element::NodePort,
        ),
        (
            |r| &r.refuse,
            Element::RefusedV4,
            Element::RefusedV6,
            Element::RefusedNodePort,
        ),
    ];
    let (mut deletes, mut adds) = (Vec::new(), Vec::new());
    for (ports, v4, v6, node_port) in kinds {
        let (a, b) = (ports(old), ports(new));
        split(
            &a.v4,
            &b.v4,
            |&(ip, t, p)| v4(ip, t, p),
            &mut deletes,
            &mut adds,
        );
        split(
            &a.v6,
            &b.v6,
            |&(ip, t, p)| v6(ip, t, p),
            &mut deletes,
            &mut adds,
        );
        split(
            &a.node_ports,
            &b.node_ports,
            |&(t, p)| node_port(t, p),
            &mut deletes,
            &mut adds,
        );
    }
    deletes.append(&mut adds);
    Some(deletes)
}

/// The elements of `old` that `new` lacks, as deletions, and those `new` added, as
/// additions; what the two sets share is skipped unseen.
fn split<T: Ord>(
    old: &OrdSet<T>,
    new: &OrdSet<T>,
    element: impl Fn(&T) -> Element,
    deletes: &mut Vec<Change>,
    adds: &mut Vec<Change>,
) {
    for item in old.diff(new) {
        match item {
            imbl::ordset::DiffItem::Remove(t) => deletes.push(Change {
                op: Op::Delete,
                element: element(t),
            }),
            imbl::ordset::DiffItem::Add(t) => adds.push(Change {
                op: Op::Add,
                element: element(t),
            }),
        }
    }
}

/// Removes carousel's table, and nothing else. Succeeds when there is none.
pub(crate) fn render_cleanup() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Why nft refused a transaction.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (is nftables installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot write the script to nft: {0}")]
    Write(#[source] std::io::Error),
    #[error("nft refused the transaction: {stderr}")]
    Refused { stderr: String },
    #[error("cannot set the policy route of intercepted traffic: {0}")]
    Route(#[from] PolicyRouteError),
}

/// The whole table and the policy routes that deliver what it intercepts. Without an
/// IPv6 route (a node with IPv6 disabled) IPv4 still works: that is logged, not failed.
async fn apply_full(
    wanted: &Redirects,
    listen_port: u16,
    nodeport_nets: &[IpNet],
) -> Result<(), NftError> {
    policy_route::ensure(Family::V4).await?;
    if let Err(e) = policy_route::ensure(Family::V6).await {
        tracing::warn!(error = %e, "no IPv6 policy route: IPv6 Services are not intercepted");
    }
    apply(&render_full(wanted, listen_port, nodeport_nets)).await
}

/// Removes everything carousel installed on the node, its table and its policy routes,
/// and nothing else. Succeeds when there is nothing to remove.
pub async fn cleanup() -> Result<(), NftError> {
    apply(&render_cleanup()).await?;
    policy_route::remove(Family::V4).await?;
    if let Err(e) = policy_route::remove(Family::V6).await {
        tracing::warn!(error = %e, "cannot remove the IPv6 policy route");
    }
    Ok(())
}

/// Applies `script` with `nft -f -`: the only function here that touches the host.
pub(crate) async fn apply(script: &str) -> Result<(), NftError> {
    if script.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    // A write that fails means nft exited before reading the script (it could not open
    // its netlink socket, say): what it said on stderr is the error, not the broken pipe.
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .await;
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if out.status.success() {
        written.map_err(NftError::Write)
    } else {
        Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Keeps carousel's table in step with the Service addresses.
#[derive(Debug)]
pub struct Rules {
    listen_port: u16,
    /// `--nodeport-addresses`: where node ports are served (every non-loopback address
    /// when empty).
    nodeport_nets: Vec<IpNet>,
    applied: Option<Redirects>,
    /// Element changes go through it, opened at the first and kept (see `netlink`).
    socket: Option<netlink::Socket>,
}

impl Rules {
    pub fn new(listen_port: u16, nodeport_nets: Vec<IpNet>) -> Self {
        Self {
            listen_port,
            nodeport_nets,
            applied: None,
            socket: None,
        }
    }

    /// Brings the table to `wanted`: the whole table with `nft -f` the first time
    /// (converging after a crash), element changes over netlink after that, and the
    /// whole table again if a change is refused (someone else edited carousel's table).
    pub async fn sync(&mut self, wanted: Redirects) -> Result<(), NftError> {
        let result = match &self.applied {
            Some(old) => match diff(old, &wanted) {
                Some(changes) => match self.change_elements(changes).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "incremental rule change refused; rewriting carousel's table");
                        apply_full(&wanted, self.listen_port, &self.nodeport_nets).await
                    }
                },
                None => apply_full(&wanted, self.listen_port, &self.nodeport_nets).await,
            },
            None => apply_full(&wanted, self.listen_port, &self.nodeport_nets).await,
        };
        match result {
            Ok(()) => {
                self.applied = Some(wanted);
                Ok(())
            }
            Err(e) => {
                self.applied = None;
                Err(e)
            }
        }
    }

    /// Rewrites the whole table and checks the policy routes, whatever was applied
    /// before: repairs what someone else changed (a flushed ruleset, a deleted element).
    pub(crate) async fn rewrite(&mut self, wanted: Redirects) -> Result<(), NftError> {
        self.applied = None;
        self.sync(wanted).await
    }

    /// Applies `changes` in one transaction on the kept socket, off the async threads
    /// (a large change keeps the kernel busy for a while).
    async fn change_elements(&mut self, changes: Vec<Change>) -> Result<(), NetlinkError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut socket = match self.socket.take() {
            Some(socket) => socket,
            None => netlink::Socket::open()?,
        };
        let (socket, result) = tokio::task::spawn_blocking(move || {
            let result = socket.apply(TABLE, &changes);
            (socket, result)
        })
        .await
        .map_err(|e| NetlinkError::Io(std::io::Error::other(e)))?;
        self.socket = Some(socket);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::ServiceAddr;
    use std::net::SocketAddr;

    fn sa(s: &str) -> Dialed {
        (Protocol::Tcp, ServiceAddr(s.parse::<SocketAddr>().unwrap()))
    }

    fn udp(s: &str) -> Dialed {
        (Protocol::Udp, ServiceAddr(s.parse::<SocketAddr>().unwrap()))
    }

    const TCP: Protocol = Protocol::Tcp;

    #[test]
    fn full_table_matches_the_golden_file() {
        let mut r = Redirects::new(
            [
                sa("10.96.0.10:80"),
                sa("10.96.0.11:443"),
                sa("[fd00:10:96::a]:80"),
                sa("203.0.113.7:443"),
                udp("10.96.0.10:53"),
            ],
            [(TCP, 30080), (Protocol::Udp, 30053)],
        );
        r.service(sa("10.96.0.12:80"), false);
        r.node_port((TCP, 30081), false);
        let nets = ["10.0.0.0/8", "192.168.1.5/32", "2001:db8::/32"].map(|n| n.parse().unwrap());
        r.guard(sa("203.0.113.7:443"), &nets);
        assert_eq!(r.source_ranges[&sa("203.0.113.7:443")], nets[..2]);
        assert_eq!(
            render_full(&r, 15001, &[]),
            include_str!("testdata/full.nft")
        );
    }

    #[test]
    fn an_empty_table_still_has_its_rules() {
        let script = render_full(&Redirects::default(), 15001, &[]);
        assert!(!script.contains("elements"));
        assert_eq!(
            script.matches("meta l4proto { tcp, udp } tproxy").count(),
            4
        );
        assert_eq!(
            script.matches("to :15001 meta mark set 0x00004342").count(),
            4
        );
        assert_eq!(
            script
                .matches("meta l4proto { tcp, udp } redirect to :15001")
                .count(),
            4
        );
    }

    #[test]
    fn node_ports_follow_the_nodeport_addresses_and_skip_loopback_unless_named() {
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
        assert_eq!(
            nodeport_match("ip", &[]).unwrap(),
            "ip daddr != 127.0.0.0/8 fib daddr type local"
        );
        assert_eq!(
            nodeport_match("ip6", &[]).unwrap(),
            "ip6 daddr != ::1/128 fib daddr type local"
        );
        assert_eq!(
            nodeport_match("ip", &nets(&["10.0.0.0/8", "192.168.1.0/24"])).unwrap(),
            "ip daddr { 10.0.0.0/8, 192.168.1.0/24 } ip daddr != 127.0.0.0/8 fib daddr type local"
        );
        assert_eq!(nodeport_match("ip6", &nets(&["10.0.0.0/8"])), None);
        assert_eq!(
            nodeport_match("ip", &nets(&["127.0.0.1/32"])).unwrap(),
            "ip daddr { 127.0.0.1/32 } fib daddr type local"
        );
    }

    #[test]
    fn a_change_touches_only_the_elements_that_changed() {
        let old = Redirects::new([sa("10.96.0.10:80"), sa("10.96.0.11:443")], [(TCP, 30080)]);
        let new = Redirects::new(
            [
                sa("10.96.0.11:443"),
                sa("10.96.0.12:80"),
                udp("10.96.0.12:80"),
                sa("[fd00:10:96::b]:443"),
            ],
            [(TCP, 30080), (TCP, 30081)],
        );
        let change = |op, element| Change { op, element };
        assert_eq!(
            diff(&old, &new).unwrap(),
            [
                change(
                    Op::Delete,
                    Element::V4(Ipv4Addr::new(10, 96, 0, 10), TCP, 80)
                ),
                change(Op::Add, Element::V4(Ipv4Addr::new(10, 96, 0, 12), TCP, 80)),
                change(
                    Op::Add,
                    Element::V4(Ipv4Addr::new(10, 96, 0, 12), Protocol::Udp, 80)
                ),
                change(
                    Op::Add,
                    Element::V6("fd00:10:96::b".parse().unwrap(), TCP, 443)
                ),
                change(Op::Add, Element::NodePort(TCP, 30081)),
            ]
        );
        assert_eq!(diff(&new, &new).unwrap(), []);

        // An address whose Service port got endpoints moves from refused to intercepted.
        let mut empty = Redirects::default();
        empty.service(sa("10.96.0.13:80"), false);
        empty.node_port((TCP, 30082), false);
        let mut served = Redirects::default();
        served.service(sa("10.96.0.13:80"), true);
        served.node_port((TCP, 30082), true);
        let ip = Ipv4Addr::new(10, 96, 0, 13);
        assert_eq!(
            diff(&empty, &served).unwrap(),
            [
                change(Op::Delete, Element::RefusedV4(ip, TCP, 80)),
                change(Op::Delete, Element::RefusedNodePort(TCP, 30082)),
                change(Op::Add, Element::V4(ip, TCP, 80)),
                change(Op::Add, Element::NodePort(TCP, 30082)),
            ]
        );
        // New source ranges rewrite the table.
        let mut guarded = served.clone();
        guarded.guard(sa("10.96.0.13:80"), &["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(diff(&served, &guarded), None);
    }

    #[test]
    fn elements_read_as_nft_writes_them_and_keys_are_laid_out_as_nf_tables_stores_them() {
        // As `nft --debug=netlink` shows the same elements: each field of a
        // concatenation (address, protocol, port) padded to 4 bytes.
        let v4 = Element::V4(Ipv4Addr::new(10, 96, 0, 10), TCP, 80);
        assert_eq!(v4.to_string(), "10.96.0.10 . tcp . 80");
        assert_eq!(v4.key(), [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]);
        let v6 = Element::V6("fd00:10:96::b".parse().unwrap(), Protocol::Udp, 53);
        assert_eq!(v6.to_string(), "fd00:10:96::b . udp . 53");
        assert_eq!(
            v6.key(),
            [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xb, 17, 0, 0, 0, 0, 53, 0, 0]
        );
        let node_port = Element::NodePort(TCP, 30081);
        assert_eq!(node_port.to_string(), "tcp . 30081");
        assert_eq!(node_port.key(), [6, 0, 0, 0, 0x75, 0x81, 0, 0]);
    }

    #[test]
    fn cleanup_removes_only_carousels_table() {
        assert_eq!(
            render_cleanup(),
            "add table inet carousel\ndelete table inet carousel\n"
        );
    }
}
