//! `carousel run`: wires a discovery source, the proxy and the telemetry servers
//! together. Takes its listeners and a shutdown future, so that tests bind port 0 and
//! stop it when they like.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::discovery::convert::Scope;
use crate::discovery::file::{self, StateFileError};
use crate::discovery::file_watch;
use crate::discovery::kube::{self, KubeError, SourceConfig};
use crate::discovery::store::Store;
use crate::model::ServiceTable;
use crate::proxy::handover::Presence;
use crate::proxy::{self, ProxyConfig, ProxyError};
use crate::shutdown::Shutdown;
use crate::telemetry::{self, Endpoints, Telemetry};

/// Where the Services come from, with the proxy that serves them.
#[derive(Clone, Debug)]
pub enum Source {
    File(FileRun),
    Cluster(ClusterRun),
}

impl Source {
    pub fn proxy_mut(&mut self) -> &mut ProxyConfig {
        match self {
            Source::File(run) => &mut run.proxy,
            Source::Cluster(run) => &mut run.proxy,
        }
    }
}

/// Proxies the Services of `source` until `shutdown` drains it.
pub async fn run(
    source: Source,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: Shutdown<impl Future<Output = ()>, impl Future<Output = ()>>,
) -> Result<(), RunError> {
    match source {
        Source::File(run) => run_from_file(run, telemetry, metrics, health, shutdown).await,
        Source::Cluster(run) => run_from_cluster(run, telemetry, metrics, health, shutdown).await,
    }
}

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
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The discovery source stopped before it produced a first table.
    #[error("the discovery source stopped before its first sync")]
    SourceEnded,
}

/// Proxies the Services of a state file until `shutdown` drains it: open connections
/// then run until they finish or the shutdown abandons them.
///
/// The first version of the file must be good: there is no last good state to keep yet.
pub async fn run_from_file(
    run: FileRun,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: Shutdown<impl Future<Output = ()>, impl Future<Output = ()>>,
) -> Result<(), RunError> {
    let initial = file::load(&run.path, &run.scope)?;
    tracing::info!(
        path = %run.path.display(),
        services = initial.table.len(),
        "state file loaded"
    );
    let (tables, updates) = watch::channel(Arc::new(initial.table.clone()));
    let source = tokio::spawn(file_watch::watch(
        run.path,
        run.scope,
        tables,
        telemetry.clone(),
        initial,
    ));
    let start = Start {
        updates,
        wait_for_first: false,
        source,
    };
    serve(run.proxy, start, telemetry, metrics, health, shutdown).await
}

/// What `carousel run` needs to proxy a cluster's Services. This node's name and zone
/// are the proxy's (`ProxyConfig::locality`), and the proxy name is the scope's: each
/// is given once.
#[derive(Clone, Debug)]
pub struct ClusterRun {
    /// `--kubeconfig`; without it, in-cluster, then `$KUBECONFIG`, then `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server's URL, replacing the configuration's.
    pub master: Option<String>,
    /// `--service-selector`, appended to the ownership selector.
    pub service_selector: Option<String>,
    pub scope: Scope,
    pub proxy: ProxyConfig,
}

/// Proxies the Services of a cluster until `shutdown` drains it, as
/// `run_from_file` does.
///
/// Health stays 503 until every watch has listed once and the first table is applied;
/// when the API server goes away, the last table keeps serving while the watches
/// reconnect with backoff.
pub async fn run_from_cluster(
    run: ClusterRun,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: Shutdown<impl Future<Output = ()>, impl Future<Output = ()>>,
) -> Result<(), RunError> {
    let cluster = kube::connect(run.kubeconfig.as_deref(), run.master.as_deref()).await?;
    let node_name = run.proxy.locality.node.as_deref().map(str::to_owned);
    let source = SourceConfig {
        proxy_name: run.scope.proxy_name.clone(),
        service_selector: run.service_selector,
        node_name,
    };
    // `--zone` is applied by the proxy (`ProxyConfig::locality`), over the table's.
    let store = Store::new(run.scope, source.node_name.as_deref());
    // The proxy is only handed the channel once the first real table is on it: until
    // then the empty placeholder must not count as a sync.
    let (tables, updates) = watch::channel(Arc::new(ServiceTable::default()));
    let source = tokio::spawn(kube::run(
        cluster,
        source,
        store,
        kube::Outputs { tables },
        telemetry.clone(),
    ));
    let start = Start {
        updates,
        wait_for_first: true,
        source,
    };
    serve(run.proxy, start, telemetry, metrics, health, shutdown).await
}

/// A running discovery source, as `serve` takes it.
struct Start {
    updates: watch::Receiver<Arc<ServiceTable>>,
    /// The channel holds a placeholder until the source's first sync publishes.
    wait_for_first: bool,
    source: JoinHandle<()>,
}

/// Runs the proxy on the tables a discovery `source` task publishes on `updates`, with
/// the metrics and health servers beside it, until stopped. The servers outlive the
/// drain, so that `/readyz` says "not ready" while connections finish.
async fn serve(
    config: ProxyConfig,
    start: Start,
    telemetry: Arc<Telemetry>,
    metrics: TcpListener,
    health: TcpListener,
    shutdown: Shutdown<impl Future<Output = ()>, impl Future<Output = ()>>,
) -> Result<(), RunError> {
    // Said before anything else, so that a carousel being replaced by this one waits.
    let presence = config.handover.as_deref().map(Presence::starting);
    let servers = Servers::start(&telemetry, metrics, health);
    let upkeep = tokio::spawn(telemetry.clone().upkeep());
    let Start {
        mut updates,
        wait_for_first,
        source,
    } = start;
    let Shutdown { drain, abandon } = shutdown;
    tokio::pin!(drain);
    let first = async {
        if wait_for_first {
            // A source that ends before its first table leaves nothing to serve.
            updates.changed().await.is_ok()
        } else {
            true
        }
    };
    let result = tokio::select! {
        // Stopped before the first sync: there is nothing to drain.
        () = &mut drain => Ok(()),
        ready = first => if ready {
            tracing::info!(
                node = config.locality.node.as_deref().unwrap_or("(unknown)"),
                "starting the proxy"
            );
            // A failure to start ends the proxy at once, without waiting for a signal.
            proxy::run(config, presence, updates, telemetry, Shutdown::new(drain, abandon))
                .await
                .map_err(RunError::from)
        } else {
            Err(RunError::SourceEnded)
        },
    };
    source.abort();
    upkeep.abort();
    servers.stop().await;
    result?;
    Ok(())
}

/// The metrics and health servers, with what stops them.
struct Servers {
    stop: CancellationToken,
    tasks: [JoinHandle<()>; 2],
}

impl Servers {
    fn start(telemetry: &Arc<Telemetry>, metrics: TcpListener, health: TcpListener) -> Self {
        let stop = CancellationToken::new();
        let serve = |listener, endpoints| {
            tokio::spawn(telemetry::serve(
                listener,
                telemetry.clone(),
                endpoints,
                stop.clone().cancelled_owned(),
            ))
        };
        let tasks = [
            serve(metrics, Endpoints::Metrics),
            serve(health, Endpoints::Health),
        ];
        Servers { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
