//! What carousel's nftables sets hold for a route table: every Service address and node
//! port, intercepted while its Service port has an endpoint and refused otherwise, and
//! the source ranges that guard load-balancer addresses. Derived from the whole table,
//! or from the last table's sets and the next table's edits, so that one changed
//! Service among thousands costs its own addresses.

use crate::dataplane::nftables::Redirects;
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

/// The sets for every route of `table`.
pub(crate) fn whole(table: &RouteTable) -> Redirects {
    let mut redirects = Redirects::default();
    for (addr, route) in table.service_addrs() {
        redirects.service(*addr, route.has_endpoints);
    }
    for (port, route) in table.node_ports() {
        redirects.node_port(port, route.has_endpoints);
    }
    for (addr, ranges) in table.source_ranges() {
        redirects.guard(*addr, ranges);
    }
    redirects
}

/// `last`, the sets of the table `table` was built from, with `table`'s edits: each
/// edited address and node port is taken out and put back as `table` routes it.
fn follow(last: &Redirects, table: &RouteTable) -> Redirects {
    let mut redirects = last.clone();
    let edits = table.edits();
    for &addr in &edits.addrs {
        redirects.forget(addr);
        if let Some(route) = table.service_addr(addr) {
            redirects.service(addr, route.has_endpoints);
        }
        if let Some(ranges) = table.source_range(addr) {
            redirects.guard(addr, ranges);
        }
    }
    for &port in &edits.node_ports {
        redirects.forget_node_port(port);
        if let Some(route) = table.node_port(port) {
            redirects.node_port(port, route.has_endpoints);
        }
    }
    redirects
}
