//! Where traffic comes in, per mode: bind mode's listeners on every Service address, or
//! nftables mode's rules and its transparent listeners; and how each is synced with a
//! route table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::task::JoinHandle;

use super::listener::{self, Accepting, Destination, Listeners};
use super::redirects::Derived;
use super::udp;
use super::{ForwardConfig, Mode, ProxyError};
use crate::dataplane::nftables::{self, NftError, Rules};
use crate::telemetry::Telemetry;

/// Why a sync of the node (rules, or bind mode's listeners) failed; it is retried.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error(transparent)]
    Rules(#[from] NftError),
    #[error("{0} Service address(es) or health check port(s) could not be listened on")]
    Listeners(usize),
}

impl SyncError {
    /// Whether the table is in force for everything but what failed: bind mode serves
    /// every Service it could listen for.
    pub(super) fn partial(&self) -> bool {
        matches!(self, SyncError::Listeners(_))
    }
}

/// Where traffic comes in, per mode.
pub(super) enum Intake {
    Bind {
        listeners: Listeners,
        nodeport_addresses: Vec<IpAddr>,
        /// The generation of the route table the listeners were last reconciled with.
        reconciled: Option<u64>,
    },
    Nftables {
        rules: Rules,
        listen_port: u16,
        /// Empty until the first route table is built.
        accept: Vec<JoinHandle<()>>,
        /// The sets of the last table synced, that the next table's edits rewrite.
        derived: Option<Derived>,
    },
}

impl Intake {
    pub(super) fn new(mode: &Mode, telemetry: &Telemetry) -> Self {
        match mode {
            Mode::Bind { nodeport_addresses } => Intake::Bind {
                listeners: Listeners::new(telemetry),
                nodeport_addresses: nodeport_addresses.clone(),
                reconciled: None,
            },
            Mode::Nftables {
                redirect_port,
                nodeport_nets,
            } => Intake::Nftables {
                rules: Rules::new(*redirect_port, nodeport_nets.clone()),
                listen_port: *redirect_port,
                accept: Vec::new(),
                derived: None,
            },
        }
    }

    /// nftables mode: opens the transparent listeners, once the first route table is in
    /// place. Not before: another carousel of the same listener group (the one this one
    /// replaces) would share new connections with one that cannot route them yet.
    pub(super) fn open(&mut self, accepting: &Accepting) -> Result<(), ProxyError> {
        let Intake::Nftables {
            listen_port,
            accept,
            ..
        } = self
        else {
            return Ok(());
        };
        if !accept.is_empty() {
            return Ok(());
        }
        let accepting = Accepting {
            forward: ForwardConfig {
                mark: Some(nftables::MARK),
                transparent_mark: Some(nftables::TRANSPARENT_MARK),
                ..accepting.forward
            },
            ..accepting.clone()
        };
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            let addr = SocketAddr::new(ip, *listen_port);
            let listener = match listener::bind_transparent(addr, accepting.forward.keepalive) {
                Ok(l) => l,
                // A node without IPv6 still proxies IPv4.
                Err(e) if ip.is_ipv6() => {
                    tracing::warn!(%addr, error = %e, "no IPv6 listener");
                    continue;
                }
                Err(source) => return Err(ProxyError::Redirect { addr, source }),
            };
            let destination = Destination::Intercepted {
                listen_port: *listen_port,
            };
            accept.push(tokio::spawn(listener::accept_loop(
                listener,
                destination,
                accepting.clone(),
            )));
            // UDP on the same port: TPROXY hands it the datagrams of UDP Service ports.
            let socket = udp::bind_transparent(addr)
                .map_err(|source| ProxyError::Redirect { addr, source })?;
            accept.push(tokio::spawn(udp::serve(
                socket,
                destination,
                accepting.clone(),
            )));
        }
        Ok(())
    }

    /// Brings the node in line with the route table. `repair`: also what someone else
    /// may have changed since (the whole table rewritten, the policy route checked).
    pub(super) async fn sync(
        &mut self,
        accepting: &Accepting,
        repair: bool,
    ) -> Result<(), SyncError> {
        let table = accepting.routes.load();
        match self {
            Intake::Bind {
                listeners,
                nodeport_addresses,
                reconciled,
            } => {
                // The addresses the table's edits touched, unless this is a repair, or
                // the table does not follow the last one reconciled.
                let last = reconciled.filter(|_| !repair);
                let changed =
                    last.and_then(|last| listener::changed(&table, nodeport_addresses, last));
                let failed = changed
                    .and_then(|changes| listeners.apply(&changes, accepting))
                    .unwrap_or_else(|| {
                        listeners
                            .reconcile(&listener::wanted(&table, nodeport_addresses), accepting)
                    });
                *reconciled = Some(table.generation());
                match failed {
                    0 => Ok(()),
                    failed => Err(SyncError::Listeners(failed)),
                }
            }
            Intake::Nftables { rules, derived, .. } => {
                // A repair derives the sets afresh, from every route.
                let last = derived.as_ref().filter(|_| !repair);
                let next = derived.insert(Derived::next(last, &table));
                let redirects = next.redirects().clone();
                if repair {
                    rules.rewrite(redirects).await?;
                } else {
                    rules.sync(redirects).await?;
                }
                Ok(())
            }
        }
    }

    /// Stops taking new connections: the listeners close, and what waits in their accept
    /// queues goes to a carousel that shares them (`migrate_queued_connections_on_close`).
    /// The rules stay: traffic keeps flowing to that carousel, or to the next one to
    /// start, which converges on them; only `carousel cleanup` removes them.
    pub(super) fn stop_accepting(&mut self) {
        match self {
            Intake::Bind { listeners, .. } => listeners.close_all(),
            Intake::Nftables { accept, .. } => accept.drain(..).for_each(|task| task.abort()),
        }
    }
}
