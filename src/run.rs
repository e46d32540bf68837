//! `carousel run`: wires a discovery source, the proxy and the telemetry servers
//! together. Takes its listeners and a shutdown future, so that tests bind port 0 and
//! stop it when they like.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::discovery::convert::Scope;
use crate::discovery::file::{self, StateFileError};
use crate::proxy::{self, ProxyConfig, ProxyError};
use crate::telemetry::{self, Endpoints, Telemetry};

/// What `carousel run --from-file` needs.
#[derive(Clone, Debug)]
pub struct FileRun {
    pub path: PathBuf,
    pub scope: Scope,
    pub proxy: ProxyConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// Proxies the Services of a state file until `shutdown` resolves, then drains open
/// connections until they finish or `abandon` resolves.
///
/// The first version of the file must be good: there is no last good state to keep yet.
pub async fn run_from_file(
    run: FileRun,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: impl Future<Output = ()>,
    abandon: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let initial = file::load(&run.path, &run.scope)?;
    tracing::info!(
        path = %run.path.display(),
        services = initial.table.len(),
        "state file loaded"
    );
    let (tables, updates) = watch::channel(Arc::new(initial.table.clone()));
    let source = tokio::spawn(file::watch(
        run.path,
        run.scope,
        tables,
        telemetry.clone(),
        initial,
    ));
    serve(
        run.proxy, updates, source, telemetry, metrics, health, shutdown, abandon,
    )
    .await
}

/// Runs the proxy on the tables a discovery `source` task publishes on `updates`, with
/// the metrics and health servers beside it, until stopped. The servers outlive the
/// drain, so that `/readyz` says "not ready" while connections finish.
#[allow(clippy::too_many_arguments)]
async fn serve(
    config: ProxyConfig,
    updates: watch::Receiver<Arc<crate::model::ServiceTable>>,
    source: JoinHandle<()>,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: impl Future<Output = ()>,
    abandon: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let servers_stop = CancellationToken::new();
    let servers = [
        tokio::spawn(telemetry::serve(
            metrics,
            telemetry.clone(),
            Endpoints::Metrics,
            servers_stop.clone().cancelled_owned(),
        )),
        tokio::spawn(telemetry::serve(
            health,
            telemetry.clone(),
            Endpoints::Health,
            servers_stop.clone().cancelled_owned(),
        )),
    ];
    let upkeep = tokio::spawn(telemetry.clone().upkeep());
    // A failure to start ends the proxy at once, without waiting for a signal.
    let result = proxy::run(config, updates, telemetry, shutdown, abandon).await;
    source.abort();
    upkeep.abort();
    servers_stop.cancel();
    for task in servers {
        let _ = task.await;
    }
    result?;
    Ok(())
}

/// The addresses bind mode serves node ports on: the address of a single-address CIDR
/// as it is, and for a wider CIDR every address of this host's interfaces inside it.
pub fn nodeport_ips(cidrs: &[IpNet]) -> std::io::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = cidrs
        .iter()
        .filter(|c| c.prefix_len() == c.max_prefix_len())
        .map(IpNet::addr)
        .collect();
    if cidrs.iter().any(|c| c.prefix_len() != c.max_prefix_len()) {
        for iface in if_addrs::get_if_addrs()? {
            let ip = iface.ip();
            if cidrs.iter().any(|c| c.contains(&ip)) {
                ips.push(ip);
            }
        }
    }
    ips.sort();
    ips.dedup();
    Ok(ips)
}
