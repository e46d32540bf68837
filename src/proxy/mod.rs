//! The data path: route tables built from each new `ServiceTable`, the way traffic
//! reaches carousel (a listener per Service address, or nftables redirects to one
//! listener), and the forwarding of each connection.

pub mod forward;
pub mod listener;
pub mod original_dst;
pub mod routes;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::addr::ServiceAddr;
use crate::balance::BuildOptions;
use crate::dataplane::nftables::{self, NftError, Redirects, Rules};
use crate::model::{Locality, ServiceTable};
use crate::telemetry::{names, Telemetry};

pub use forward::ForwardConfig;
use listener::{Dialed, Listeners};
use routes::RouteTable;

/// How Service traffic reaches carousel.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A listener on every Service address, and on these addresses at every node port.
    Bind { nodeport_addresses: Vec<IpAddr> },
    /// nftables redirects Service traffic to one listener on this port (all addresses).
    Nftables { redirect_port: u16 },
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Bind {
            nodeport_addresses: Vec::new(),
        }
    }
}

/// How the proxy runs.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    pub forward: ForwardConfig,
    pub mode: Mode,
    pub balance: BuildOptions,
    /// This node and its zone, for traffic policies and topology-aware routing.
    pub locality: Locality,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen for redirected connections on {addr}: {source}")]
    Redirect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Rules(#[from] NftError),
}

/// Where traffic comes in, per mode.
enum Intake {
    Bind {
        listeners: Listeners,
        nodeport_addresses: Vec<IpAddr>,
    },
    Nftables {
        rules: Rules,
        accept: Vec<JoinHandle<()>>,
    },
}

impl Intake {
    fn start(
        mode: &Mode,
        routes: &Arc<ArcSwap<RouteTable>>,
        forward: ForwardConfig,
    ) -> Result<Self, ProxyError> {
        match mode {
            Mode::Bind { nodeport_addresses } => Ok(Intake::Bind {
                listeners: Listeners::default(),
                nodeport_addresses: nodeport_addresses.clone(),
            }),
            Mode::Nftables { redirect_port } => {
                let mut accept = Vec::new();
                for ip in [
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                ] {
                    let addr = SocketAddr::new(ip, *redirect_port);
                    let listener = match listener::bind(addr) {
                        Ok(l) => l,
                        // A node without IPv6 still proxies IPv4.
                        Err(e) if ip.is_ipv6() => {
                            tracing::warn!(%addr, error = %e, "no IPv6 redirect listener");
                            continue;
                        }
                        Err(source) => return Err(ProxyError::Redirect { addr, source }),
                    };
                    let forward = ForwardConfig {
                        mark: Some(nftables::MARK),
                        ..forward
                    };
                    accept.push(tokio::spawn(listener::accept_loop(
                        listener,
                        Dialed::OriginalDst,
                        routes.clone(),
                        forward,
                    )));
                }
                Ok(Intake::Nftables {
                    rules: Rules::new(*redirect_port),
                    accept,
                })
            }
        }
    }

    async fn sync(
        &mut self,
        routes: &Arc<ArcSwap<RouteTable>>,
        forward: ForwardConfig,
    ) -> Result<(), NftError> {
        let table = routes.load();
        match self {
            Intake::Bind {
                listeners,
                nodeport_addresses,
            } => {
                let wanted = listener::wanted(&table, nodeport_addresses);
                listeners.reconcile(&wanted, routes, forward);
                Ok(())
            }
            Intake::Nftables { rules, .. } => {
                let addrs: Vec<ServiceAddr> = table.service_addrs().map(|(a, _)| *a).collect();
                let redirects = Redirects::new(addrs, table.node_ports().map(|(p, _)| p));
                rules.sync(redirects).await
            }
        }
    }

    /// Stops taking connections; in nftables mode, removes carousel's table.
    async fn stop(self) {
        match self {
            Intake::Bind { mut listeners, .. } => listeners.close_all(),
            Intake::Nftables { accept, .. } => {
                if let Err(e) = nftables::apply(&nftables::render_cleanup()).await {
                    tracing::error!(error = %e, "cannot remove carousel's nftables table");
                }
                for task in accept {
                    task.abort();
                }
            }
        }
    }
}

/// Runs the proxy: applies every table that `tables` yields until `shutdown` resolves.
/// Open connections are never cut by a table change.
pub async fn run(
    config: ProxyConfig,
    mut tables: watch::Receiver<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    tokio::pin!(shutdown);
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut intake = Intake::start(&config.mode, &routes, config.forward)?;
    let sync_duration = telemetry.histogram(names::SYNC_DURATION, Vec::new());
    loop {
        let table = tables.borrow_and_update().clone();
        let started = Instant::now();
        let previous = routes.load_full();
        let next = RouteTable::build(
            &table,
            &previous,
            &telemetry,
            &config.balance,
            &config.locality,
        );
        routes::clear_removed(&telemetry, &previous, &next);
        routes.store(Arc::new(next));
        match intake.sync(&routes, config.forward).await {
            Ok(()) => {
                sync_duration.record(started.elapsed().as_secs_f64());
                telemetry.health().synced();
                tracing::info!(services = table.len(), "table applied");
            }
            // The routes are in place; the rules are retried on the next change.
            Err(e) => tracing::error!(error = %e, "cannot apply the redirect rules"),
        }
        tokio::select! {
            _ = &mut shutdown => break,
            changed = tables.changed() => if changed.is_err() {
                // The source is gone; serve the last table until shutdown.
                shutdown.as_mut().await;
                break;
            },
        }
    }
    intake.stop().await;
    Ok(())
}
