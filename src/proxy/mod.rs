//! The data path: route tables built from each new `ServiceTable`, the way traffic
//! reaches carousel (a listener per Service address, or nftables redirects to one
//! listener), and the forwarding of each connection.

pub mod copy;
pub mod ejection;
pub mod fairness;
pub mod forward;
pub mod handover;
pub mod listener;
pub mod original_dst;
pub mod routes;
#[cfg(target_os = "linux")]
mod splice;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::addr::ServiceAddr;
use crate::balance::BuildOptions;
use crate::dataplane::nftables::{self, NftError, Redirects, Rules};
use crate::model::{Locality, ServiceTable};
use crate::telemetry::{names, Telemetry};

pub use forward::ForwardConfig;
use handover::Presence;
use listener::{Accepting, Dialed, Limit, Listeners};
use routes::RouteTable;

/// How Service traffic reaches carousel.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A listener on every Service address, and on these addresses at every node port.
    Bind { nodeport_addresses: Vec<IpAddr> },
    /// nftables intercepts Service traffic (TPROXY) for one transparent listener on this
    /// port (all addresses).
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
    /// This node, for traffic policies, and its zone (`--zone`) for topology-aware
    /// routing; without one, the zone is the table's (`ServiceTable::zone`).
    pub locality: Locality,
    /// Connections beyond this many open ones are refused at once.
    pub max_connections: Option<usize>,
    /// Algorithms evaluated beside each Service's own (`--shadow`): registry names.
    pub shadow: Vec<&'static str>,
    /// The name under which carousels of one node hand over to each other (`handover`,
    /// whose `Presence` `run` takes); without one, a stopping carousel stops accepting
    /// at once.
    pub handover: Option<String>,
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
        listen_port: u16,
        /// Empty until the first route table is built.
        accept: Vec<JoinHandle<()>>,
    },
}

impl Intake {
    fn new(mode: &Mode) -> Self {
        match mode {
            Mode::Bind { nodeport_addresses } => Intake::Bind {
                listeners: Listeners::default(),
                nodeport_addresses: nodeport_addresses.clone(),
            },
            Mode::Nftables { redirect_port } => Intake::Nftables {
                rules: Rules::new(*redirect_port),
                listen_port: *redirect_port,
                accept: Vec::new(),
            },
        }
    }

    /// nftables mode: opens the transparent listeners, once the first route table is in
    /// place. Not before: another carousel of the same listener group (the one this one
    /// replaces) would share new connections with one that cannot route them yet.
    fn open(&mut self, accepting: &Accepting) -> Result<(), ProxyError> {
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
            accept.push(tokio::spawn(listener::accept_loop(
                listener,
                Dialed::Intercepted {
                    listen_port: *listen_port,
                },
                accepting.clone(),
            )));
        }
        Ok(())
    }

    async fn sync(&mut self, accepting: &Accepting) -> Result<(), NftError> {
        let table = accepting.routes.load();
        match self {
            Intake::Bind {
                listeners,
                nodeport_addresses,
            } => {
                let wanted = listener::wanted(&table, nodeport_addresses);
                listeners.reconcile(&wanted, accepting);
                Ok(())
            }
            Intake::Nftables { rules, .. } => {
                let addrs: Vec<ServiceAddr> = table.service_addrs().map(|(a, _)| *a).collect();
                let redirects = Redirects::new(addrs, table.node_ports().map(|(p, _)| p));
                rules.sync(redirects).await
            }
        }
    }

    /// Stops taking new connections: the listeners close, and what waits in their accept
    /// queues goes to a carousel that shares them (`migrate_queued_connections_on_close`).
    /// The rules stay: traffic keeps flowing to that carousel, or to the next one to
    /// start, which converges on them; only `carousel cleanup` removes them.
    fn stop_accepting(&mut self) {
        match self {
            Intake::Bind { listeners, .. } => listeners.close_all(),
            Intake::Nftables { accept, .. } => accept.drain(..).for_each(|task| task.abort()),
        }
    }
}

/// Runs the proxy: applies every table that `tables` yields until `shutdown` resolves.
/// With a `presence`, it is ready to take over once its first table is programmed, and
/// a stop waits for a starting successor to be ready (`handover`).
/// Open connections are never cut by a table change.
///
/// On `shutdown` it stops accepting and reports not-ready at once, then waits for the
/// open connections to finish, or for `abandon` (a deadline, a second signal). Its rules
/// stay, for the carousel that takes over.
pub async fn run(
    config: ProxyConfig,
    mut presence: Option<Presence>,
    mut tables: watch::Receiver<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
    abandon: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    tokio::pin!(shutdown);
    tokio::pin!(abandon);
    let accepting = Accepting {
        routes: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
        forward: config.forward,
        connections: TaskTracker::new(),
        limit: Arc::new(Limit::new(config.max_connections, &telemetry)),
    };
    let routes = &accepting.routes;
    listener::migrate_queued_connections_on_close();
    let mut intake = Intake::new(&config.mode);
    let sync_duration = telemetry.histogram(names::SYNC_DURATION, Vec::new());
    let fairness = tokio::spawn(fairness::track(
        routes.clone(),
        telemetry.clone(),
        fairness::TICK,
        fairness::WINDOW_TICKS,
    ));
    loop {
        let table = tables.borrow_and_update().clone();
        let started = Instant::now();
        let previous = routes.load_full();
        let here = Locality {
            node: config.locality.node.clone(),
            zone: config.locality.zone.clone().or_else(|| table.zone.clone()),
        };
        let next = RouteTable::build_with_shadows(
            &table,
            &previous,
            &telemetry,
            &config.balance,
            &here,
            &config.shadow,
        );
        routes.store(Arc::new(next));
        // A failure to start ends the proxy at once.
        intake.open(&accepting)?;
        match intake.sync(&accepting).await {
            Ok(()) => {
                sync_duration.record(started.elapsed().as_secs_f64());
                telemetry.health().synced();
                if let Some(presence) = &mut presence {
                    presence.ready();
                }
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
    fairness.abort();
    telemetry.health().draining();
    if let Some(presence) = &presence {
        tokio::select! {
            () = presence.hand_over() => {}
            () = &mut abandon => tracing::warn!("stopped before a successor was ready"),
        }
    }
    intake.stop_accepting();
    accepting.connections.close();
    let open = accepting.connections.len();
    if open > 0 {
        tracing::info!(open, "draining open connections");
        tokio::select! {
            () = accepting.connections.wait() => tracing::info!("every connection finished"),
            () = &mut abandon => tracing::warn!(open = accepting.connections.len(), "drain cut short"),
        }
    }
    Ok(())
}
