//! The Kubernetes API source: kube-runtime watchers on Services, EndpointSlices, this
//! node's Node and (only while some Service weighs by label) pod metadata, fed into the
//! `Store`, whose table is published on the watch channel, bursts coalesced.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, SelectAll};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::discovery::backoff::{self, Backoff, Outage};
use crate::discovery::convert::{LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};
use crate::discovery::store::{PodWatch, Store};
use crate::model::ServiceTable;
use crate::programming::Programming;
use crate::telemetry::Telemetry;

/// The label kube-proxy leaves alone: headless Services get no proxying.
pub(crate) const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Events closer together than this are applied in one table: the first change after a
/// quiet spell is published at once, the rest of a burst at most this often.
pub const COALESCE: Duration = Duration::from_millis(15);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// `--kubeconfig` names a file that cannot be read or used.
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither the in-cluster environment nor a kubeconfig file is there.
    #[error("no cluster to talk to: not in a pod ({in_cluster}), and no usable kubeconfig ($KUBECONFIG or ~/.kube/config: {kubeconfig})")]
    NoConfig {
        in_cluster: kube::config::InClusterError,
        kubeconfig: kube::config::KubeconfigError,
    },
    /// `--master` is not a URL.
    #[error("--master {master}: {reason}")]
    Master { master: String, reason: String },
    /// The client cannot be built from the configuration (e.g. bad TLS material).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// What the source watches, from the command line.
#[derive(Clone, Debug, Default)]
pub(crate) struct SourceConfig {
    /// `--service-proxy-name`.
    pub(crate) proxy_name: Option<String>,
    /// `--service-selector`, appended to the ownership selector.
    pub(crate) service_selector: Option<String>,
    /// `--node-name` (or `$NODE_NAME`): whose Node gives the zone, its eligibility and
    /// its pod CIDRs.
    pub(crate) node_name: Option<String>,
}

/// The label selector of the Service watch: ownership by `service-proxy-name` the way
/// kube-proxy reads it, no headless Services, then the user's own selector.
pub(crate) fn service_label_selector(proxy_name: Option<&str>, extra: Option<&str>) -> String {
    let mut selector = match proxy_name {
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name}"),
        None => format!("!{LABEL_SERVICE_PROXY_NAME}"),
    };
    selector.push_str(&format!(",!{LABEL_HEADLESS}"));
    if let Some(extra) = extra.map(str::trim).filter(|s| !s.is_empty()) {
        selector.push(',');
        selector.push_str(extra);
    }
    selector
}

/// A client, and the API server it talks to (for the log).
#[derive(Clone)]
pub(crate) struct Cluster {
    pub(crate) client: Client,
    pub(crate) server: String,
}

/// A client for the cluster: `kubeconfig` when given; else the in-cluster service
/// account, then `$KUBECONFIG`, then `~/.kube/config`. `master` replaces the server of
/// whichever is used, and stands alone (no credentials) when there is none, as
/// kube-proxy's `--master` does.
pub(crate) async fn connect(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
) -> Result<Cluster, KubeError> {
    let master = master
        .map(|m| {
            m.parse::<hyper::Uri>().map_err(|e| KubeError::Master {
                master: m.to_string(),
                reason: e.to_string(),
            })
        })
        .transpose()?;
    let mut config = match kubeconfig {
        Some(path) => {
            let file = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(file)?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(file)?
        }
        // In a pod the service account is the point of the DaemonSet, even when a
        // kubeconfig happens to be mounted too.
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => {
                match kube::Config::from_kubeconfig(&KubeConfigOptions::default()).await {
                    Ok(config) => config,
                    Err(_) if master.is_some() => {
                        kube::Config::new(master.clone().expect("checked"))
                    }
                    Err(kubeconfig) => {
                        return Err(KubeError::NoConfig {
                            in_cluster,
                            kubeconfig,
                        })
                    }
                }
            }
        },
    };
    if let Some(master) = master {
        config.cluster_url = master;
    }
    let server = config.cluster_url.to_string();
    tracing::info!(%server, "talking to the Kubernetes API");
    let client = Client::try_from(config).map_err(KubeError::Client)?;
    Ok(Cluster { client, server })
}

/// One watcher event of any kind, or a watcher's (retried) error.
// Each event is moved once, from its stream into the store: boxing the large variants
// would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Update {
    Service(Event<core::Service>),
    Slice(Event<discovery::EndpointSlice>),
    Node(Event<core::Node>),
    Pod(Event<PartialObjectMeta<core::Pod>>),
}

type Updates = BoxStream<'static, Update>;

fn tag<T: 'static + Send>(
    kind: &'static str,
    wrap: fn(Event<T>) -> Update,
    events: impl futures::Stream<Item = Result<Event<T>, watcher::Error>> + Send + 'static,
    outage: &Arc<Outage>,
) -> Updates {
    // Errors are paced and logged there; only events come out.
    backoff::paced(kind, events, Backoff::default(), outage.clone())
        .map(wrap)
        .boxed()
}

/// Where the source publishes.
#[derive(Debug)]
pub(crate) struct Outputs {
    /// A table after the first full sync, and after every change.
    pub(crate) tables: watch::Sender<Arc<ServiceTable>>,
}

/// Watches the cluster and publishes on `outputs` until the table channel has no
/// receiver left.
pub(crate) async fn run(
    cluster: Cluster,
    config: SourceConfig,
    store: Store,
    outputs: Outputs,
    telemetry: Arc<Telemetry>,
) {
    let mut store = store;
    let Outputs { tables } = outputs;
    let Cluster { client, server } = cluster;
    let outage = Outage::new(server);
    let node = config.node_name.as_deref().filter(|_| store.watches_node());
    let mut watches = cluster_watches(&client, &config, node, &outage);
    let mut pods: Option<Updates> = None;
    let mut pod_watch: Option<PodWatch> = None;
    let mut last_publish: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        let update = tokio::select! {
            update = watches.next() => match update {
                Some(update) => Some(update),
                // Watchers retry for ever; they end only if kube-runtime gives up.
                None => return,
            },
            Some(update) = next_of(&mut pods), if pods.is_some() => Some(update),
            () = sleep_until(deadline), if deadline.is_some() => None,
            () = tables.closed() => return,
        };
        match update {
            Some(Update::Service(e)) => store.apply_service(e),
            Some(Update::Slice(e)) => store.apply_slice(e),
            Some(Update::Node(e)) => store.apply_node(e),
            Some(Update::Pod(e)) => store.apply_pod(e),
            // The deadline passed.
            None => deadline = None,
        }
        let errors = store.take_config_errors();
        if errors > 0 {
            telemetry.config_errors().increment(errors);
        }
        let changes = store.take_changes();
        telemetry
            .programming()
            .received(changes.services, changes.endpoints);
        if store.pod_watch() != pod_watch.as_ref() {
            pod_watch = store.pod_watch().cloned();
            pods = pod_watch
                .as_ref()
                .map(|scope| pod_updates(&client, scope, &outage));
            if pods.is_none() {
                tracing::info!("no Service weighs pods by label: pod watch stopped");
                store.forget_pods();
            }
        }
        if !store.has_pending() || deadline.is_some() {
            continue;
        }
        let now = Instant::now();
        match last_publish {
            Some(at) if now < at + COALESCE => deadline = Some(at + COALESCE),
            _ => {
                if publish(&mut store, &tables, telemetry.programming()) {
                    last_publish = Some(now);
                }
            }
        }
    }
}

/// The watches every node runs: the Services it owns, the slices that name a Service,
/// and its own Node when `node` is given.
fn cluster_watches(
    client: &Client,
    config: &SourceConfig,
    node: Option<&str>,
    outage: &Arc<Outage>,
) -> SelectAll<Updates> {
    let selector = service_label_selector(
        config.proxy_name.as_deref(),
        config.service_selector.as_deref(),
    );
    tracing::info!(%selector, "watching Services");
    let services = watcher(
        Api::<core::Service>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    );
    // Slices that name no Service are of no use; hand-written ones for selector-less
    // Services carry the label too.
    let slices = watcher(
        Api::<discovery::EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(LABEL_SERVICE_NAME),
    );
    let mut watches = stream::select_all([
        tag("Service", Update::Service, services, outage),
        tag("EndpointSlice", Update::Slice, slices, outage),
    ]);
    if let Some(node) = node {
        let nodes = watcher(
            Api::<core::Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        );
        watches.push(tag("Node", Update::Node, nodes, outage));
    }
    watches
}

/// The pod-metadata watch for `scope`. Metadata only (PartialObjectMetadata): no pod
/// specs in memory. A new scope lists afresh; the labels known so far serve meanwhile.
fn pod_updates(client: &Client, scope: &PodWatch, outage: &Arc<Outage>) -> Updates {
    tracing::info!(
        namespace = scope.namespace.as_deref().unwrap_or("(all)"),
        selector = scope.selector.as_deref().unwrap_or("(none)"),
        "a Service weighs pods by label: watching their metadata"
    );
    let api = match &scope.namespace {
        Some(ns) => Api::<PartialObjectMeta<core::Pod>>::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let config = match &scope.selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    tag("Pod", Update::Pod, watcher(api, config), outage)
}

/// Publishes the store's table if it changed; true if it did.
fn publish(
    store: &mut Store,
    tables: &watch::Sender<Arc<ServiceTable>>,
    programming: &Programming,
) -> bool {
    // A relist rebuilds every Service: heavy at cluster scale.
    let flushed = crate::heavy::run(|| store.flush());
    let Some(table) = flushed.table else {
        return false;
    };
    // Debug, not info: a busy cluster publishes many times a second.
    tracing::debug!(
        services = table.len(),
        slices = store.slice_count(),
        pods = store.pod_count(),
        "publishing a table"
    );
    // The changes count as programmed once the proxy has this table in force.
    programming.publish(flushed.triggers, || tables.send_replace(Arc::new(table)));
    true
}

async fn next_of(stream: &mut Option<Updates>) -> Option<Update> {
    match stream {
        Some(s) => Pin::new(s).next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
