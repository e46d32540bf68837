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

/// Proxies the Services of a state file until `shutdown` resolves.
///
/// The first version of the file must be good: there is no last good state to keep yet.
pub async fn run_from_file(
    run: FileRun,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let initial = file::load(&run.path, &run.scope)?;
    tracing::info!(
        path = %run.path.display(),
        services = initial.table.len(),
        "state file loaded"
    );
    let (tables, updates) = watch::channel(Arc::new(initial.table.clone()));
    let stop = CancellationToken::new();
    let servers = [
        tokio::spawn(telemetry::serve(
            metrics,
            telemetry.clone(),
            Endpoints::Metrics,
            stop.clone().cancelled_owned(),
        )),
        tokio::spawn(telemetry::serve(
            health,
            telemetry.clone(),
            Endpoints::Health,
            stop.clone().cancelled_owned(),
        )),
    ];
    let mut proxy = tokio::spawn(proxy::run(
        run.proxy,
        updates,
        telemetry.clone(),
        stop.clone().cancelled_owned(),
    ));
    let watcher = tokio::spawn(file::watch(
        run.path,
        run.scope,
        tables,
        telemetry.clone(),
        initial,
    ));
    let upkeep = tokio::spawn(telemetry.upkeep());
    let result = tokio::select! {
        _ = shutdown => {
            stop.cancel();
            proxy.await
        }
        // The proxy only ends early when it cannot start.
        ended = &mut proxy => ended,
    };
    stop.cancel();
    watcher.abort();
    upkeep.abort();
    for task in servers {
        let _ = task.await;
    }
    result.expect("the proxy task does not panic")?;
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
