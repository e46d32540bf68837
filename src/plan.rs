//! `carousel run`'s flags turned, once, into what each part runs with: the discovery
//! source, the proxy's configuration, the telemetry addresses and the drain. Pure, so
//! that every default and every flag's destination is tested here rather than found
//! on a node.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::balance::BuildOptions;
use crate::config::{ProxyMode, RunArgs};
use crate::discovery::convert::Scope;
use crate::model::Locality;
use crate::proxy::udp::UdpConfig;
use crate::proxy::{ForwardConfig, Mode, ProxyConfig};
use crate::run::{ClusterRun, FileRun, Source};

/// Everything `carousel run` starts, from its flags.
#[derive(Clone, Debug)]
pub struct Plan {
    pub source: Source,
    /// `--metrics-bind-address`.
    pub metrics: SocketAddr,
    /// `--healthz-bind-address`.
    pub health: SocketAddr,
    /// `--drain-timeout`.
    pub drain_timeout: Duration,
    /// `--endpoint-histograms`.
    pub endpoint_histograms: bool,
}

impl Plan {
    /// The plan for `args` on a host with these interface addresses (bind mode serves
    /// node ports on those inside `--nodeport-addresses`).
    pub fn new(args: RunArgs, host_addresses: &[IpAddr]) -> Plan {
        let in_cluster = args.from_file.is_none();
        let scope = Scope {
            proxy_name: args.service_proxy_name().map(str::to_owned),
        };
        let proxy = proxy_config(&args, in_cluster, host_addresses);
        let source = match args.from_file.clone() {
            Some(path) => Source::File(FileRun { path, scope, proxy }),
            None => Source::Cluster(ClusterRun {
                master: args.master().map(str::to_owned),
                kubeconfig: args.kubeconfig.clone(),
                service_selector: args.service_selector.clone(),
                scope,
                proxy,
            }),
        };
        Plan {
            source,
            metrics: args.metrics_bind_address,
            health: args.healthz_bind_address,
            drain_timeout: args.drain_timeout,
            endpoint_histograms: args.endpoint_histograms,
        }
    }
}

fn proxy_config(args: &RunArgs, in_cluster: bool, host_addresses: &[IpAddr]) -> ProxyConfig {
    let default_mode = if in_cluster {
        ProxyMode::Nftables
    } else {
        ProxyMode::Bind
    };
    let mode = match args.proxy_mode.unwrap_or(default_mode) {
        ProxyMode::Bind => Mode::Bind {
            nodeport_addresses: nodeport_ips(
                &bind_nodeport_cidrs(&args.nodeport_addresses, in_cluster),
                host_addresses,
            ),
        },
        ProxyMode::Nftables => Mode::Nftables {
            redirect_port: args.redirect_port,
            // Unset: every address of the node but loopback, as kube-proxy's nftables mode.
            nodeport_nets: args.nodeport_addresses.clone(),
        },
    };
    ProxyConfig {
        forward: ForwardConfig {
            connect_timeout: args.connect_timeout,
            connect_attempts: args.connect_attempts.into(),
            mark: None,
            transparent_mark: None,
            idle_timeout: args.tcp_idle_timeout,
            keepalive: (!args.tcp_keepalive.is_zero()).then_some(args.tcp_keepalive),
        },
        max_connections: args.max_connections,
        udp: UdpConfig {
            idle_timeout: args.udp_idle_timeout,
            max_flows: args.max_udp_flows as usize,
        },
        shadow: args.shadow.clone(),
        sync_period: args.sync_period,
        // Known once the health address is bound: see `main`.
        handover: None,
        cluster_cidrs: args.cluster_cidr.clone(),
        mode,
        balance: BuildOptions {
            seed: args.seed,
            ..Default::default()
        },
        // In a cluster without --zone, the zone comes from this node's Node object.
        locality: Locality {
            node: args.node_name.as_deref().map(Into::into),
            zone: args.zone.as_deref().map(Into::into),
        },
    }
}

/// Bind mode's `--nodeport-addresses`: as given, else every address in a cluster
/// (kube-proxy's default) and loopback with a state file.
fn bind_nodeport_cidrs(given: &[IpNet], in_cluster: bool) -> Vec<IpNet> {
    if !given.is_empty() {
        given.to_vec()
    } else if in_cluster {
        vec![
            "0.0.0.0/0".parse().expect("valid CIDR"),
            "::/0".parse().expect("valid CIDR"),
        ]
    } else {
        vec![IpNet::from(IpAddr::from(Ipv4Addr::LOCALHOST))]
    }
}

/// The addresses bind mode serves node ports on: the address of a single-address CIDR
/// as it is, and for a wider CIDR every one of the host's addresses inside it.
pub(crate) fn nodeport_ips(cidrs: &[IpNet], host_addresses: &[IpAddr]) -> Vec<IpAddr> {
    let single = cidrs
        .iter()
        .filter(|c| c.prefix_len() == c.max_prefix_len())
        .map(IpNet::addr);
    let wide: Vec<&IpNet> = cidrs
        .iter()
        .filter(|c| c.prefix_len() != c.max_prefix_len())
        .collect();
    let inside = host_addresses
        .iter()
        .filter(|ip| wide.iter().any(|c| c.contains(*ip)))
        .copied();
    let mut ips: Vec<IpAddr> = single.chain(inside).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// This host's interface addresses, as `Plan::new` takes them.
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .iter()
        .map(if_addrs::Interface::ip)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    const HOST: [IpAddr; 3] = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];

    fn plan(flags: &[&str]) -> Plan {
        let cli = Cli::try_parse_from(["carousel", "run"].iter().chain(flags)).unwrap();
        let Command::Run(args) = cli.command else {
            unreachable!("`run` parses as Command::Run")
        };
        Plan::new(*args, &HOST)
    }

    fn proxy(plan: &Plan) -> &ProxyConfig {
        match &plan.source {
            Source::File(run) => &run.proxy,
            Source::Cluster(run) => &run.proxy,
        }
    }

    #[test]
    fn a_cluster_defaults_to_nftables_with_node_ports_on_every_non_loopback_address() {
        let plan = plan(&[]);
        let Source::Cluster(run) = &plan.source else {
            panic!("no --from-file: a cluster")
        };
        assert_eq!(run.kubeconfig, None);
        assert_eq!(run.master, None);
        assert!(matches!(
            &run.proxy.mode,
            Mode::Nftables { redirect_port: 10262, nodeport_nets } if nodeport_nets.is_empty()
        ));
        assert_eq!(plan.metrics, "127.0.0.1:10249".parse().unwrap());
        assert_eq!(plan.health, "0.0.0.0:10256".parse().unwrap());
        assert_eq!(plan.drain_timeout, Duration::from_secs(30));
        assert_eq!(run.proxy.sync_period, Duration::from_secs(30));
        assert_eq!(run.proxy.forward.keepalive, Some(Duration::from_secs(60)));
        assert_eq!(run.proxy.forward.connect_attempts, 3);
    }

    #[test]
    fn a_state_file_defaults_to_bind_mode_with_node_ports_on_loopback() {
        let plan = plan(&["--from-file", "state.yaml"]);
        let Source::File(run) = &plan.source else {
            panic!("--from-file: a file")
        };
        assert_eq!(run.path, std::path::Path::new("state.yaml"));
        assert!(matches!(
            &run.proxy.mode,
            Mode::Bind { nodeport_addresses } if nodeport_addresses == &[IpAddr::V4(Ipv4Addr::LOCALHOST)]
        ));
    }

    #[test]
    fn bind_mode_in_a_cluster_serves_node_ports_on_every_host_address() {
        let plan = plan(&["--proxy-mode", "bind"]);
        assert!(matches!(
            &proxy(&plan).mode,
            Mode::Bind { nodeport_addresses } if nodeport_addresses.len() == HOST.len()
        ));
    }

    #[test]
    fn node_port_cidrs_keep_single_addresses_and_widen_to_the_host_addresses_inside() {
        let cidrs: Vec<IpNet> = ["192.0.2.0/24", "198.51.100.9/32", "10.0.0.0/8"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(
            nodeport_ips(&cidrs, &HOST),
            ["192.0.2.7", "198.51.100.9"]
                .map(|ip| ip.parse::<IpAddr>().unwrap())
                .to_vec()
        );
    }

    #[test]
    fn node_zone_and_proxy_name_are_each_given_once() {
        let plan = plan(&[
            "--node-name",
            "node-a",
            "--zone",
            "zone-z",
            "--service-proxy-name",
            "carousel",
            "--service-selector",
            "tier=web",
        ]);
        let Source::Cluster(run) = &plan.source else {
            panic!("a cluster")
        };
        assert_eq!(run.proxy.locality.node.as_deref(), Some("node-a"));
        assert_eq!(run.proxy.locality.zone.as_deref(), Some("zone-z"));
        assert_eq!(run.scope.proxy_name.as_deref(), Some("carousel"));
        assert_eq!(run.service_selector.as_deref(), Some("tier=web"));
    }

    #[test]
    fn empty_values_from_a_config_map_leave_flags_unset() {
        let plan = plan(&[
            "--master",
            "",
            "--service-proxy-name",
            "",
            "--tcp-keepalive",
            "0s",
        ]);
        let Source::Cluster(run) = &plan.source else {
            panic!("a cluster")
        };
        assert_eq!(run.master, None);
        assert_eq!(run.scope.proxy_name, None);
        assert_eq!(run.proxy.forward.keepalive, None);
    }

    #[test]
    fn flags_reach_the_proxy() {
        let plan = plan(&[
            "--from-file",
            "s.yaml",
            "--proxy-mode",
            "nftables",
            "--redirect-port",
            "7000",
            "--nodeport-addresses",
            "10.0.0.0/8",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--connect-timeout",
            "500ms",
            "--connect-attempts",
            "5",
            "--max-connections",
            "100",
            "--tcp-idle-timeout",
            "5m",
            "--seed",
            "9",
            "--shadow",
            "maglev",
            "--drain-timeout",
            "3s",
            "--endpoint-histograms",
        ]);
        let proxy = proxy(&plan);
        assert!(matches!(
            &proxy.mode,
            Mode::Nftables { redirect_port: 7000, nodeport_nets } if nodeport_nets == &["10.0.0.0/8".parse::<IpNet>().unwrap()]
        ));
        assert_eq!(
            proxy.cluster_cidrs,
            ["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(proxy.forward.connect_timeout, Duration::from_millis(500));
        assert_eq!(proxy.forward.connect_attempts, 5);
        assert_eq!(proxy.max_connections, Some(100));
        assert_eq!(proxy.forward.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(proxy.balance.seed, Some(9));
        assert_eq!(proxy.shadow, [crate::algorithm::Algorithm::Maglev]);
        assert_eq!(plan.drain_timeout, Duration::from_secs(3));
        assert!(plan.endpoint_histograms);
    }
}

/// The ports kube-proxy listens on, by default, with the flag that moves carousel's.
const KUBE_PROXY_PORTS: [(u16, &str); 2] = [(10249, "metrics"), (10256, "health check")];

/// What to do about a telemetry address that cannot be bound: `flag` is the one that
/// moves it. A port in use is most often kube-proxy's, still running on the node.
pub fn bind_hint(flag: &str, addr: SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            match KUBE_PROXY_PORTS.iter().find(|(port, _)| *port == addr.port()) {
                Some((port, what)) => format!(
                    "port {port} is kube-proxy's {what} port: stop kube-proxy on this node \
                     (deploy/replace takes its place), or move carousel's with {flag}"
                ),
                None => format!("another process listens there: choose another address with {flag}"),
            }
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("{} is not an address of this host: choose another with {flag}", addr.ip())
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "a port below 1024 needs CAP_NET_BIND_SERVICE: grant it, or choose another port with {flag}"
        ),
        _ => format!("choose another address with {flag}"),
    }
}

#[cfg(test)]
mod bind_hint_tests {
    use super::bind_hint;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_port_in_use_names_kube_proxy_when_it_is_kube_proxys_and_always_the_flag() {
        let in_use = Error::from(ErrorKind::AddrInUse);
        let hint = bind_hint(
            "--metrics-bind-address",
            "0.0.0.0:10249".parse().unwrap(),
            &in_use,
        );
        assert_eq!(
            hint,
            "port 10249 is kube-proxy's metrics port: stop kube-proxy on this node \
             (deploy/replace takes its place), or move carousel's with --metrics-bind-address"
        );
        let hint = bind_hint(
            "--healthz-bind-address",
            "[::]:10256".parse().unwrap(),
            &in_use,
        );
        assert!(
            hint.starts_with("port 10256 is kube-proxy's health check port"),
            "{hint}"
        );
        let hint = bind_hint(
            "--metrics-bind-address",
            "127.0.0.1:9000".parse().unwrap(),
            &in_use,
        );
        assert_eq!(
            hint,
            "another process listens there: choose another address with --metrics-bind-address"
        );
        let denied = Error::from(ErrorKind::PermissionDenied);
        let hint = bind_hint(
            "--metrics-bind-address",
            "0.0.0.0:80".parse().unwrap(),
            &denied,
        );
        assert!(hint.contains("CAP_NET_BIND_SERVICE"), "{hint}");
    }
}
