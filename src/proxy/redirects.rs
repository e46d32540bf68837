//! What carousel's nftables sets hold for a route table: every Service address and node
//! port, intercepted while its Service port has an endpoint and refused otherwise, and
//! the source ranges that guard load-balancer addresses. Derived from the whole table,
//! or from the last table's sets and the next table's edits, so that one changed
//! Service among thousands costs its own addresses.

use crate::dataplane::nftables::Redirects;
use crate::model::Protocol;
use crate::proxy::routes::RouteTable;

/// The sets for `table`, and the table they were derived for.
#[derive(Clone, Debug, Default)]
pub(crate) struct Derived {
    generation: u64,
    /// Boxed: the sets' roots are a few hundred bytes, and the intake keeps one.
    redirects: Box<Redirects>,
}

impl Derived {
    /// The sets for `table`: `last`'s rewritten at `table`'s edits when `table` was
    /// built from the table `last` describes, else derived from every route.
    pub(crate) fn next(last: Option<&Derived>, table: &RouteTable) -> Derived {
        let redirects = Box::new(match last {
            Some(last) if table.edits().after == Some(last.generation) => {
                follow(&last.redirects, table)
            }
            _ => whole(table),
        });
        Derived {
            generation: table.generation(),
            redirects,
        }
    }

    pub(crate) fn redirects(&self) -> &Redirects {
        &self.redirects
    }
}

/// The sets for every route of `table`. Only TCP is intercepted so far: UDP Service
/// ports are served in bind mode (issue 18).
pub(crate) fn whole(table: &RouteTable) -> Redirects {
    let mut redirects = Redirects::default();
    for (&(protocol, addr), route) in table.service_addrs() {
        if protocol == Protocol::Tcp {
            redirects.service(addr, route.has_endpoints);
        }
    }
    for ((protocol, port), route) in table.node_ports() {
        if protocol == Protocol::Tcp {
            redirects.node_port(port, route.has_endpoints);
        }
    }
    for (&(protocol, addr), ranges) in table.source_ranges() {
        if protocol == Protocol::Tcp {
            redirects.guard(addr, ranges);
        }
    }
    redirects
}

/// `last`, the sets of the table `table` was built from, with `table`'s edits: each
/// edited address and node port is taken out and put back as `table` routes it.
fn follow(last: &Redirects, table: &RouteTable) -> Redirects {
    let mut redirects = last.clone();
    let edits = table.edits();
    for &dialed in edits.addrs.iter().filter(|(p, _)| *p == Protocol::Tcp) {
        let addr = dialed.1;
        redirects.forget(addr);
        if let Some(route) = table.service_addr(dialed) {
            redirects.service(addr, route.has_endpoints);
        }
        if let Some(ranges) = table.source_range(dialed) {
            redirects.guard(addr, ranges);
        }
    }
    for &node_port in edits.node_ports.iter().filter(|(p, _)| *p == Protocol::Tcp) {
        let port = node_port.1;
        redirects.forget_node_port(port);
        if let Some(route) = table.node_port(node_port) {
            redirects.node_port(port, route.has_endpoints);
        }
    }
    redirects
}
