//! The data path: route tables built from each new `ServiceTable`, the way traffic
//! reaches carousel (a listener per Service address, or nftables redirects to one
//! listener), and the forwarding of each connection.

pub(crate) mod clock;
pub(crate) mod copy;
pub(crate) mod ejection;
pub(crate) mod endpoint;
pub(crate) mod fairness;
pub(crate) mod forward;
pub(crate) mod handover;
pub(crate) mod health_check;
pub(crate) mod inside;
mod intake;
pub mod listener;
pub(crate) mod log_limit;
pub(crate) mod original_dst;
pub(crate) mod port_metrics;
pub(crate) mod proxy_header;
pub(crate) mod redirects;
pub mod routes;
pub(crate) mod source;
mod sync_metrics;
pub mod udp;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::algorithm::Algorithm;
use crate::backoff::Backoff;
use crate::balance::BuildOptions;
use crate::dataplane::nftables::NftError;
use crate::model::{Locality, ServiceTable};
use crate::programming::Generation;
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;

pub use forward::ForwardConfig;
use handover::Presence;
use health_check::HealthChecks;
use inside::Inside;
use intake::{Intake, SyncError};
use listener::{Accepting, Limit};
use routes::{RouteBuilder, RouteTable};
use sync_metrics::SyncMetrics;

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
    /// How UDP flows are kept.
    pub udp: udp::UdpConfig,
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
pub(crate) const SYNC_PERIOD: Duration = Duration::from_secs(30);

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            forward: ForwardConfig::default(),
            mode: Mode::default(),
            balance: BuildOptions::default(),
            locality: Locality::default(),
            max_connections: None,
            udp: udp::UdpConfig::default(),
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
    /// nftables mode could not program the node's first rules: nothing would reach the
    /// listener, so carousel stops with the reason rather than running unready.
    #[error("cannot program this node's first nftables rules: {0}")]
    FirstRules(#[source] NftError),
    /// The drain ran out (`--drain-timeout`, or a second signal) with connections open:
    /// each was reset on both sides.
    #[error("the drain was cut short: {open} open connection(s) reset")]
    DrainCut { open: usize },
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
        udp: config.udp,
        udp_flows: Arc::default(),
        inside: Arc::default(),
        cut: CancellationToken::new(),
    };
    listener::migrate_queued_connections_on_close();
    let fairness = tokio::spawn(fairness::track(
        accepting.routes.clone(),
        fairness::TICK,
        fairness::WINDOW_TICKS,
    ));
    let mut node = NodeSync::new(config, &telemetry);
    // What woke the loop: a new table, or the period (or the backoff after a failure).
    let mut new_table = true;
    loop {
        // A repair leaves a newer table, if one came meanwhile, for its own turn.
        let table = if new_table {
            let (table, generation) = telemetry
                .programming()
                .read(|| tables.borrow_and_update().clone());
            node.generation = generation;
            table
        } else {
            tables.borrow().clone()
        };
        let synced = node.sync(&table, new_table, &accepting).await?;
        if synced {
            if let Some(presence) = &mut presence {
                presence.ready();
            }
        }
        tokio::select! {
            _ = &mut shutdown => break,
            changed = tables.changed() => if changed.is_err() {
                // The source is gone; serve the last table until shutdown.
                shutdown.as_mut().await;
                break;
            } else {
                new_table = true;
            },
            () = tokio::time::sleep(node.pause) => new_table = false,
        }
    }
    fairness.abort();
    telemetry.health().draining();
    drain(node.intake, accepting, presence, abandon).await
}

/// Programs the node for each table, and repairs it at each period.
struct NodeSync {
    config: ProxyConfig,
    telemetry: Arc<Telemetry>,
    intake: Intake,
    builder: RouteBuilder,
    health_checks: HealthChecks,
    failures: Failures,
    metrics: SyncMetrics,
    /// The generation of the newest table read (`Programming`).
    generation: Generation,
    /// Until the next repair: the period, or the backoff after a failure.
    pause: Duration,
    /// Whether a table was ever in force: before, a failure to program the rules ends
    /// the proxy; after, it is retried.
    programmed: bool,
}

impl NodeSync {
    fn new(config: ProxyConfig, telemetry: &Arc<Telemetry>) -> Self {
        // kube-proxy's health timeout: a change waiting longer is unhealthy.
        telemetry.health().set_timeout(config.sync_period * 2);
        NodeSync {
            telemetry: telemetry.clone(),
            intake: Intake::new(&config.mode, telemetry),
            builder: RouteBuilder::new(telemetry, config.balance)
                .with_shadows(config.shadow.clone()),
            health_checks: HealthChecks::new(match &config.mode {
                Mode::Bind { nodeport_addresses } => Some(nodeport_addresses.as_slice()),
                Mode::Nftables { .. } => None,
            }),
            failures: Failures::default(),
            metrics: SyncMetrics::new(telemetry, matches!(config.mode, Mode::Nftables { .. })),
            generation: Generation::default(),
            pause: config.sync_period,
            programmed: false,
            config,
        }
    }

    /// Where this node stands: `--zone`, else the zone the table read from the Node.
    fn here(&self, table: &ServiceTable) -> Locality {
        let locality = &self.config.locality;
        Locality {
            node: locality.node.clone(),
            zone: locality.zone.clone().or_else(|| table.zone.clone()),
        }
    }

    /// The addresses that count as inside the cluster: its CIDRs, the pods' and the
    /// node's own.
    fn inside(&self, table: &ServiceTable) -> Inside {
        let cidrs = self.config.cluster_cidrs.iter().chain(&table.pod_cidrs);
        Inside::with_local_addresses(cidrs.copied())
    }

    /// Builds the routes of a `new_table`, then programs the node (checking everything
    /// on a repair); whether the table is in force. Errs only when the proxy cannot
    /// start; a failed sync sets a shorter `pause` instead.
    async fn sync(
        &mut self,
        table: &Arc<ServiceTable>,
        new_table: bool,
        accepting: &Accepting,
    ) -> Result<bool, ProxyError> {
        let started = Instant::now();
        let here = self.here(table);
        if new_table {
            self.telemetry.health().queued();
            self.telemetry.health().set_node_leaving(table.node_leaving);
            let previous = accepting.routes.load_full();
            // A full build (the first table, a relist) walks every endpoint, and the
            // replaced table frees as many: both off the connections' way.
            crate::heavy::run(|| {
                let next = self.builder.build(table, &previous, &here);
                drop(accepting.routes.swap(Arc::new(next)));
                drop(previous);
            });
            // A failure to start ends the proxy at once.
            self.intake.open(accepting)?;
        }
        // The node's addresses are read again at every sync, so a new one counts.
        let inside = self.inside(table);
        if **accepting.inside.load() != inside {
            accepting.inside.store(Arc::new(inside));
        }
        // After a failure, everything is checked again, as at each period.
        let repair = !new_table || self.failures.count > 0;
        let unserved_checks = self.health_checks.reconcile(table, &here, &self.telemetry);
        let result = match self.intake.sync(accepting, repair).await {
            Ok(()) if unserved_checks > 0 => Err(SyncError::Listeners(unserved_checks)),
            result => result,
        };
        let result = match result {
            Err(SyncError::Rules(e)) if !self.programmed => return Err(ProxyError::FirstRules(e)),
            result => result,
        };
        let in_force = result.as_ref().map_or_else(SyncError::partial, |()| true);
        self.programmed |= in_force;
        if in_force {
            self.metrics.succeeded(started.elapsed(), new_table);
            if new_table {
                tracing::info!(services = table.len(), "table applied");
            }
            self.telemetry.programming().programmed(self.generation);
            self.telemetry.health().synced();
        }
        self.pause = match result {
            Ok(()) => {
                self.failures.ended();
                self.config.sync_period
            }
            // The routes are in place; the node is tried again after a pause.
            Err(e) => {
                self.metrics.failed();
                self.failures.failed(&e).min(self.config.sync_period)
            }
        };
        Ok(in_force)
    }
}

/// The end of a run: hands over to a starting successor, stops accepting, and waits
/// for the open connections until `abandon`, which resets them.
async fn drain(
    mut intake: Intake,
    accepting: Accepting,
    presence: Option<Presence>,
    mut abandon: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), ProxyError> {
    if let Some(presence) = &presence {
        tokio::select! {
            () = presence.hand_over() => {}
            () = &mut abandon => tracing::warn!("stopped before a successor was ready"),
        }
    }
    intake.stop_accepting();
    accepting.connections.close();
    let open = accepting.connections.len();
    if open == 0 {
        return Ok(());
    }
    tracing::info!(open, "draining open connections");
    tokio::select! {
        () = accepting.connections.wait() => {
            tracing::info!("every connection finished");
            Ok(())
        }
        () = &mut abandon => {
            let open = accepting.connections.len();
            tracing::warn!(open, "drain cut short: resetting the open connections");
            accepting.cut.cancel();
            // Each reset is two closes; bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(1), accepting.connections.wait()).await;
            Err(ProxyError::DrainCut { open })
        }
    }
}
