//! The data path: route tables built from each new `ServiceTable`, listeners, and the
//! forwarding of each connection.

pub mod forward;
pub mod listener;
pub mod routes;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::balance::BuildOptions;
use crate::model::ServiceTable;
use crate::telemetry::{names, Telemetry};

pub use forward::ForwardConfig;
use listener::Listeners;
use routes::RouteTable;

/// How the proxy runs.
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    pub forward: ForwardConfig,
    /// Addresses bind mode listens on for node ports.
    pub nodeport_addresses: Vec<IpAddr>,
    pub balance: BuildOptions,
}

/// Runs the proxy in bind mode: applies every table that `tables` yields until
/// `shutdown` resolves. Open connections are never cut by a table change.
pub async fn run_bind(
    config: ProxyConfig,
    mut tables: watch::Receiver<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let mut listeners = Listeners::default();
    let sync_duration = telemetry.histogram(names::SYNC_DURATION, Vec::new());
    loop {
        let table = tables.borrow_and_update().clone();
        let started = Instant::now();
        let previous = routes.load_full();
        let next = RouteTable::build(&table, &previous, &telemetry, &config.balance);
        routes::clear_removed(&telemetry, &previous, &next);
        let wanted = listener::wanted(&next, &config.nodeport_addresses);
        routes.store(Arc::new(next));
        listeners.reconcile(&wanted, &routes, config.forward);
        sync_duration.record(started.elapsed().as_secs_f64());
        telemetry.health().synced();
        tracing::info!(
            services = table.len(),
            listeners = listeners.addrs().count(),
            "table applied"
        );
        tokio::select! {
            _ = &mut shutdown => break,
            changed = tables.changed() => if changed.is_err() {
                // The source is gone; serve the last table until shutdown.
                shutdown.as_mut().await;
                break;
            },
        }
    }
    listeners.close_all();
}
