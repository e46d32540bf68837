//! The data path: route tables built from each new `ServiceTable`, the way traffic
//! reaches carousel (a listener per Service address, or nftables redirects to one
//! listener), and the forwarding of each connection.

pub mod clock;
pub mod copy;
pub mod ejection;
pub mod endpoint;
pub mod fairness;
pub mod forward;
pub mod handover;
pub mod health_check;
pub mod inside;
pub mod listener;
pub mod original_dst;
pub mod port_metrics;
pub mod redirects;
pub mod routes;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::algorithm::Algorithm;
use crate::backoff::Backoff;
use crate::balance::BuildOptions;
use crate::dataplane::nftables::{self, NftError, Rules};
use crate::model::{Locality, ServiceTable};
use crate::shutdown::Shutdown;
use crate::telemetry::{names, Telemetry};

pub use forward::ForwardConfig;
use handover::Presence;
use health_check::HealthChecks;
use inside::Inside;
use listener::{Accepting, Dialed, Limit, Listeners};
use redirects::Derived;
use routes::{RouteBuilder, RouteTable};

/// How Service traffic reaches carousel.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A listener on every Service address, and on these addresses at every node port.
    Bind { nodeport_addresses: Vec<IpAddr> },
    /// nftables intercepts Service traffic (TPROXY) for one transparent listener on this
    /// port (all addresses); node ports on the local addresses inside these nets (every
    /// non-loopback one when empty).
    Nftables {
        redirect_port: u16,
        nodeport_nets: Vec<IpNet>,
    },
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Bind {
            nodeport_addresses: Vec::new(),
        }
    }
}

/// How the proxy runs.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub forward: ForwardConfig,
    pub mode: Mode,
    pub balance: BuildOptions,
    /// This node, for traffic policies, and its zone (`--zone`) for topology-aware
    /// routing; without one, the zone is the table's (`ServiceTable::zone`).
    pub locality: Locality,
    /// Connections beyond this many open ones are refused at once.
    pub max_connections: Option<usize>,
    /// Algorithms evaluated beside each Service's own (`--shadow`).
    pub shadow: Vec<Algorithm>,
    /// How often the node's rules (or bind mode's listeners) are checked and repaired
    /// (`--sync-period`).
    pub sync_period: Duration,
    /// The name under which carousels of one node hand over to each other (`handover`,
    /// whose `Presence` `run` takes); without one, a stopping carousel stops accepting
    /// at once.
    pub handover: Option<String>,
    /// `--cluster-cidr`: clients inside are pods (`inside`), as are those inside this
    /// node's `spec.podCIDRs`.
    pub cluster_cidrs: Vec<IpNet>,
}

/// kube-proxy's default `--sync-period`.
pub const SYNC_PERIOD: Duration = Duration::from_secs(30);

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            forward: ForwardConfig::default(),
            mode: Mode::default(),
            balance: BuildOptions::default(),
            locality: Locality::default(),
            max_connections: None,
            shadow: Vec::new(),
            sync_period: SYNC_PERIOD,
            handover: None,
            cluster_cidrs: Vec::new(),
        }
    }
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
    /// The drain ran out (`--drain-timeout`, or a second signal) with connections open:
    /// each was reset on both sides.
    #[error("the drain was cut short: {open} open connection(s) reset")]
    DrainCut { open: usize },
}

/// Why a sync of the node (rules, or bind mode's listeners) failed; it is retried.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Rules(#[from] NftError),
    #[error("{0} Service address(es) or health check port(s) could not be listened on")]
    Listeners(usize),
}

impl SyncError {
    /// Whether the table is in force for everything but what failed: bind mode serves
    /// every Service it could listen for.
    fn partial(&self) -> bool {
        matches!(self, SyncError::Listeners(_))
    }
}

/// Where traffic comes in, per mode.
enum Intake {
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
    fn new(mode: &Mode, telemetry: &Telemetry) -> Self {
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

    /// Brings the node in line with the route table. `repair`: also what someone else
    /// may have changed since (the whole table rewritten, the policy route checked).
    async fn sync(&mut self, accepting: &Accepting, repair: bool) -> Result<(), SyncError> {
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
    fn stop_accepting(&mut self) {
        match self {
            Intake::Bind { listeners, .. } => listeners.close_all(),
            Intake::Nftables { accept, .. } => accept.drain(..).for_each(|task| task.abort()),
        }
    }
}

/// Failed syncs in a row: logged once when they start and once when they end.
#[derive(Debug, Default)]
struct Failures {
    count: u64,
    backoff: Backoff,
}

impl Failures {
    /// The pause before the next try.
    fn failed(&mut self, error: &SyncError) -> Duration {
        if self.count == 0 {
            tracing::error!(%error, "cannot program the node; retrying with backoff");
        } else {
            tracing::debug!(%error, attempt = self.count + 1, "still cannot program the node");
        }
        self.count += 1;
        self.backoff.next_pause()
    }

    fn ended(&mut self) {
        if self.count > 0 {
            tracing::info!(failed_attempts = self.count, "the node is programmed again");
            self.count = 0;
            self.backoff.reset();
        }
    }
}

/// Runs the proxy: applies every table that `tables` yields until `shutdown` drains it,
/// and every `sync_period` checks and repairs what it programmed (rules someone flushed,
/// a listener that could not be opened).
/// With a `presence`, it is ready to take over once its first table is programmed, and
/// a stop waits for a starting successor to be ready (`handover`).
/// Open connections are never cut by a table change.
///
/// On the drain it stops accepting and reports not-ready at once, then waits for the
/// open connections to finish, or for the abandon (a deadline, a second signal). Its rules
/// stay, for the carousel that takes over.
pub async fn run(
    config: ProxyConfig,
    mut presence: Option<Presence>,
    mut tables: watch::Receiver<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown<impl Future<Output = ()>, impl Future<Output = ()>>,
) -> Result<(), ProxyError> {
    let Shutdown {
        drain: shutdown,
        abandon,
    } = shutdown;
    tokio::pin!(shutdown);
    tokio::pin!(abandon);
    let accepting = Accepting {
        routes: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
        forward: config.forward,
        connections: TaskTracker::new(),
        limit: Arc::new(Limit::new(config.max_connections, &telemetry)),
        inside: Arc::default(),
        cut: CancellationToken::new(),
    };
    let routes = &accepting.routes;
    listener::migrate_queued_connections_on_close();
    let mut intake = Intake::new(&config.mode, &telemetry);
    let sync_duration = telemetry.histogram(names::SYNC_DURATION, Vec::new());
    let builder = RouteBuilder::new(&telemetry, config.balance).with_shadows(config.shadow.clone());
    let fairness = tokio::spawn(fairness::track(
        routes.clone(),
        fairness::TICK,
        fairness::WINDOW_TICKS,
    ));
    let mut health_checks = HealthChecks::new(match &config.mode {
        Mode::Bind { nodeport_addresses } => Some(nodeport_addresses.as_slice()),
        Mode::Nftables { .. } => None,
    });
    let sync_errors = telemetry.counter(names::SYNC_ERRORS_TOTAL, Vec::new());
    // kube-proxy's health timeout: a change waiting longer is unhealthy.
    telemetry.health().set_timeout(config.sync_period * 2);
    let mut failures = Failures::default();
    // What woke the loop: a new table, or the period (or the backoff after a failure).
    let mut new_table = true;
    loop {
        let started = Instant::now();
        // A repair leaves a newer table, if one came meanwhile, for its own turn.
        let table = if new_table {
            tables.borrow_and_update().clone()
        } else {
            tables.borrow().clone()
        };
        let here = Locality {
            node: config.locality.node.clone(),
            zone: config.locality.zone.clone().or_else(|| table.zone.clone()),
        };
        if new_table {
            telemetry.health().queued();
            telemetry.health().set_node_leaving(table.node_leaving);
            let previous = routes.load_full();
            // A full build (the first table, a relist) walks every endpoint, and the
            // replaced table frees as many: both off the connections' way.
            crate::heavy::run(|| {
                let next = builder.build(&table, &previous, &here);
                drop(routes.swap(Arc::new(next)));
                drop(previous);
            });
            // A failure to start ends the proxy at once.
            intake.open(&accepting)?;
        }
        // The node's addresses are read again at every sync, so a new one counts.
        let inside = Inside::with_local_addresses(
            config.cluster_cidrs.iter().chain(&table.pod_cidrs).copied(),
        );
        if **accepting.inside.load() != inside {
            accepting.inside.store(Arc::new(inside));
        }
        // After a failure, everything is checked again, as at each period.
        let repair = !new_table || failures.count > 0;
        let unserved_checks = health_checks.reconcile(&table, &here, &telemetry);
        let result = match intake.sync(&accepting, repair).await {
            Ok(()) if unserved_checks > 0 => Err(SyncError::Listeners(unserved_checks)),
            result => result,
        };
        if result.as_ref().map_or_else(SyncError::partial, |()| true) {
            if new_table {
                sync_duration.record(started.elapsed().as_secs_f64());
                tracing::info!(services = table.len(), "table applied");
            }
            telemetry.health().synced();
            if let Some(presence) = &mut presence {
                presence.ready();
            }
        }
        let pause = match result {
            Ok(()) => {
                failures.ended();
                config.sync_period
            }
            // The routes are in place; the node is tried again after a pause.
            Err(e) => {
                sync_errors.increment(1);
                failures.failed(&e).min(config.sync_period)
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            changed = tables.changed() => if changed.is_err() {
                // The source is gone; serve the last table until shutdown.
                shutdown.as_mut().await;
                break;
            } else {
                new_table = true;
            },
            () = tokio::time::sleep(pause) => new_table = false,
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
            () = &mut abandon => {
                let open = accepting.connections.len();
                tracing::warn!(open, "drain cut short: resetting the open connections");
                accepting.cut.cancel();
                // Each reset is two closes; bounded all the same.
                let _ = tokio::time::timeout(Duration::from_secs(1), accepting.connections.wait()).await;
                return Err(ProxyError::DrainCut { open });
            }
        }
    }
    Ok(())
}
