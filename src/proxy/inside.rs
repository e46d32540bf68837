//! Which clients are inside the cluster: a pod, or the node itself. Their connections to
//! an external address of an `externalTrafficPolicy: Local` Service go to every endpoint
//! (`Traffic::Inside`), as kube-proxy sends them, instead of only to this node's.
//!
//! A pod is known by its address: inside `--cluster-cidr`, or inside this node's
//! `spec.podCIDRs` (kube-proxy's `ClusterCIDR` and `NodeCIDR` detection). The node is
//! known by its own addresses, read at every sync.

use std::net::IpAddr;

use ipnet::IpNet;

/// The pod networks and the node's own addresses, as of the last sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Inside {
    nets: Vec<IpNet>,
    local: Vec<IpAddr>,
}

impl Inside {
    pub(crate) fn new(nets: impl IntoIterator<Item = IpNet>, local: Vec<IpAddr>) -> Self {
        let mut nets: Vec<IpNet> = nets.into_iter().collect();
        nets.sort();
        nets.dedup();
        Self { nets, local }
    }

    /// [`Inside::new`] with the addresses this node holds now. When they cannot be read
    /// only loopback counts as the node.
    pub(crate) fn with_local_addresses(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let local = match if_addrs::get_if_addrs() {
            Ok(ifaces) => ifaces.into_iter().map(|i| i.ip()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's addresses; only loopback counts as the node");
                Vec::new()
            }
        };
        Self::new(nets, local)
    }

    /// Whether a client at `ip` is a pod or the node itself.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip) || self.nets.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_the_node_are_inside_and_the_rest_is_not() {
        let inside = Inside::new(
            [
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244::/64".parse().unwrap(),
            ],
            vec!["192.168.1.10".parse().unwrap()],
        );
        for ip in [
            "10.244.1.7",
            "fd00:10:244::9",
            "192.168.1.10",
            "127.0.0.1",
            "::1",
        ] {
            assert!(inside.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.244.2.7",
            "192.168.1.11",
            "203.0.113.5",
            "fd00:10:245::9",
        ] {
            assert!(!inside.contains(ip.parse().unwrap()), "{ip}");
        }
    }
}
