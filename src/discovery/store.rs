//! The API source's memory: every watched object kept converted (a `ServiceFront` per
//! Service, a `SliceView` per slice, pod labels, this node's zone), fed with watcher
//! events, and the `ServiceTable` patched one Service at a time. No I/O but its log
//! lines: tests feed it synthetic `Init`/`InitApply`/`InitDone`/`Apply`/`Delete` streams.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

use crate::discovery::convert::{
    self, Labels, ObjectKey, PodLabels, Scope, ServiceFront, SliceView, Warning,
};
use crate::discovery::names::Names;
use crate::model::{ServiceKey, ServiceTable};

/// The EndpointSlice controller's stamp of when the change behind a slice happened.
pub(crate) const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The Node label that names its zone.
pub(crate) const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Trigger times kept between two publications at most; beyond that the oldest
/// measurements are dropped rather than letting a stalled publisher grow memory.
const MAX_PENDING_TRIGGERS: usize = 10_000;

/// The live objects of one kind, and the fresh buffer a relist fills.
///
/// kube-runtime's watcher announces a relist with `Init`, lists with `InitApply` and
/// closes with `InitDone`: the buffer replaces the live map whole at `InitDone`, so that
/// an object deleted while the watch was broken disappears and none is counted twice.
#[derive(Debug)]
struct Relisted<K, V> {
    live: HashMap<K, V>,
    relist: Option<HashMap<K, V>>,
    /// Whether one list has completed, ever.
    listed: bool,
}

impl<K, V> Default for Relisted<K, V> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<K: Eq + Hash, V> Relisted<K, V> {
    fn begin(&mut self) {
        self.relist = Some(HashMap::new());
    }

    /// Files an object of the list; outside a relist (it does not happen with
    /// kube-runtime) it goes live.
    fn listed(&mut self, key: K, value: V) {
        self.relist
            .as_mut()
            .unwrap_or(&mut self.live)
            .insert(key, value);
    }

    /// Swaps the buffer in and returns the map it replaced.
    fn finish(&mut self) -> HashMap<K, V> {
        self.listed = true;
        match self.relist.take() {
            Some(fresh) => std::mem::replace(&mut self.live, fresh),
            None => HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: PartialEq> Relisted<K, V> {
    /// Applies one converted watcher event, as kube-runtime's reflector does, and
    /// returns what it changed: each key whose live value differs now, with the value
    /// it had (`None`: it is new). An unchanged object changes nothing.
    fn apply(&mut self, step: Step<K, V>) -> Vec<(K, Option<V>)> {
        match step {
            Step::Init => {
                self.begin();
                Vec::new()
            }
            Step::InitApply(Filed::Keep(key, value)) => {
                self.listed(key, value);
                Vec::new()
            }
            // Left out of the list, so gone when it completes.
            Step::InitApply(_) => Vec::new(),
            Step::InitDone => {
                let mut old = self.finish();
                let mut changed = Vec::new();
                for (key, value) in &self.live {
                    match old.remove(key) {
                        Some(was) if was == *value => {}
                        was => changed.push((key.clone(), was)),
                    }
                }
                // What is left of `old` is gone.
                changed.extend(old.into_iter().map(|(key, was)| (key, Some(was))));
                changed
            }
            Step::Apply(Filed::Keep(key, value)) => {
                if self.live.get(&key) == Some(&value) {
                    return Vec::new();
                }
                let old = self.live.insert(key.clone(), value);
                vec![(key, old)]
            }
            Step::Apply(Filed::Remove(key)) => match self.live.remove(&key) {
                Some(old) => vec![(key, Some(old))],
                None => Vec::new(),
            },
            Step::Apply(Filed::Ignore) => Vec::new(),
        }
    }
}

/// What one object becomes in the store.
enum Filed<K, V> {
    /// Its converted form (or, when it no longer converts, the last good one).
    Keep(K, V),
    /// Deleted, or no longer an object carousel uses.
    Remove(K),
    /// Nothing to file: it has no name, or broke before carousel knew it.
    Ignore,
}

/// A watcher event with its object converted: a `Delete` is an `Apply` of a removal.
enum Step<K, V> {
    Init,
    InitApply(Filed<K, V>),
    InitDone,
    Apply(Filed<K, V>),
}

impl<K, V> Step<K, V> {
    /// Converts `event`'s object with `convert`, or only names it (`key`) when deleted.
    fn of<T>(
        event: Event<T>,
        convert: impl FnOnce(&T) -> Filed<K, V>,
        key: impl FnOnce(&T) -> Option<K>,
    ) -> Self {
        match event {
            Event::Init => Step::Init,
            Event::InitApply(object) => Step::InitApply(convert(&object)),
            Event::InitDone => Step::InitDone,
            Event::Apply(object) => Step::Apply(convert(&object)),
            Event::Delete(object) => Step::Apply(key(&object).map_or(Filed::Ignore, Filed::Remove)),
        }
    }
}

/// What the publisher should know after a flush.
#[derive(Debug, Default)]
pub struct Flushed {
    /// The new table, when it differs from the last one published (the first one is
    /// always new).
    pub table: Option<ServiceTable>,
    /// Trigger times of the slice changes this table is the first to contain.
    pub(crate) triggers: Vec<SystemTime>,
}

/// Services and EndpointSlices that changed (kube-proxy's change counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoints: u64,
}

/// The converted cluster state and the table built from it.
#[derive(Debug)]
pub struct Store {
    scope: Scope,
    /// Whether this node's Node object is watched (a node name is known): for its zone
    /// and whether it is leaving the cluster.
    watch_node: bool,
    services: Relisted<ServiceKey, ServiceFront>,
    slices: Relisted<ObjectKey, SliceView>,
    /// Node names, zones and namespaces, shared by all the slices' endpoints.
    names: Names,
    pods: Relisted<ObjectKey, Labels>,
    /// This node's Node, as far as carousel reads it.
    node: Relisted<String, NodeView>,
    /// Slice names per Service, so that an event rebuilds only its Service.
    slices_by_service: HashMap<ServiceKey, BTreeSet<ObjectKey>>,
    /// Services with `carousel.dev/weights` rules: the only ones pod labels matter to.
    weighted: BTreeSet<ServiceKey>,
    /// What the pod watch must cover for them, kept up to date with `weighted`.
    pod_watch: Option<PodWatch>,
    pod_watch_stale: bool,
    /// Services to rebuild at the next flush.
    dirty: BTreeSet<ServiceKey>,
    table: ServiceTable,
    /// The table differs from the last one published.
    changed: bool,
    published: bool,
    triggers: Vec<SystemTime>,
    config_errors: u64,
    changes: Changes,
}

impl Store {
    /// An empty store; `node_name` is `--node-name` (`--zone` is the proxy's to apply).
    pub fn new(scope: Scope, node_name: Option<&str>) -> Self {
        Self {
            watch_node: node_name.is_some(),
            scope,
            services: Relisted::default(),
            slices: Relisted::default(),
            names: Names::default(),
            pods: Relisted::default(),
            node: Relisted::default(),
            slices_by_service: HashMap::new(),
            weighted: BTreeSet::new(),
            pod_watch: None,
            pod_watch_stale: false,
            dirty: BTreeSet::new(),
            table: ServiceTable::default(),
            changed: false,
            published: false,
            triggers: Vec::new(),
            config_errors: 0,
            changes: Changes::default(),
        }
    }

    /// Whether the Node object is to be watched.
    pub(crate) fn watches_node(&self) -> bool {
        self.watch_node
    }

    /// This node's zone: its Node's `topology.kubernetes.io/zone`.
    pub(crate) fn zone(&self) -> Option<&str> {
        self.node.live.values().next()?.zone.as_deref()
    }

    /// Whether this node is being deleted, or drained by the cluster autoscaler.
    pub(crate) fn node_leaving(&self) -> bool {
        self.node.live.values().any(|n| n.leaving)
    }

    /// The pod CIDRs of this node.
    pub(crate) fn pod_cidrs(&self) -> Vec<IpNet> {
        self.node
            .live
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .collect()
    }

    /// Whether pod labels are needed: some Service weighs its pods by a label that a
    /// pod can carry.
    pub(crate) fn needs_pods(&self) -> bool {
        self.pod_watch.is_some()
    }

    /// What the pod-metadata watch must see, or `None` for no watch at all.
    pub(crate) fn pod_watch(&self) -> Option<&PodWatch> {
        self.pod_watch.as_ref()
    }

    /// Every watch has listed once: the table reflects the cluster.
    pub(crate) fn is_synced(&self) -> bool {
        self.services.listed
            && self.slices.listed
            && (self.node.listed || !self.watch_node)
            && (self.pods.listed || !self.needs_pods())
    }

    /// Whether a flush may publish something.
    pub(crate) fn has_pending(&self) -> bool {
        let work = self.changed || !self.dirty.is_empty();
        if self.published {
            work
        } else {
            self.is_synced()
        }
    }

    /// Configuration errors seen since the last call (for `carousel_config_errors_total`).
    pub(crate) fn take_config_errors(&mut self) -> u64 {
        std::mem::take(&mut self.config_errors)
    }

    /// Services and slices changed since the last call.
    pub(crate) fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    pub(crate) fn slice_count(&self) -> usize {
        self.slices.live.len()
    }

    pub(crate) fn pod_count(&self) -> usize {
        self.pods.live.len()
    }

    // ---- Services ----

    pub fn apply_service(&mut self, event: Event<core::Service>) {
        let step = Step::of(event, |svc| self.convert_service(svc), service_key);
        for (key, _) in self.services.apply(step) {
            self.changes.services += 1;
            self.service_changed(&key);
        }
        if std::mem::take(&mut self.pod_watch_stale) {
            self.pod_watch = PodWatch::covering(
                self.weighted
                    .iter()
                    .filter_map(|k| self.services.live.get(k)),
            );
        }
    }

    /// Converts a Service, or reports it and keeps what was known of it. A Service that
    /// is headless or ExternalName now leaves the table.
    fn convert_service(&mut self, svc: &core::Service) -> Filed<ServiceKey, ServiceFront> {
        let Some(key) = service_key(svc) else {
            return Filed::Ignore;
        };
        match convert::service(svc) {
            Ok(Some(front)) => {
                let before = self.services.live.get(&key).map(|f| f.warnings.as_slice());
                self.config_errors += report_warnings(before.unwrap_or_default(), &front.warnings);
                Filed::Keep(key, front)
            }
            Ok(None) => Filed::Remove(key),
            Err(error) => {
                tracing::error!(service = %key, %error, "Service refused, keeping what was known of it");
                self.config_errors += 1;
                match self.services.live.get(&key) {
                    Some(front) => Filed::Keep(key, front.clone()),
                    None => Filed::Ignore,
                }
            }
        }
    }

    fn service_changed(&mut self, key: &ServiceKey) {
        let weighted = self
            .services
            .live
            .get(key)
            .is_some_and(|f| !f.weights.is_empty());
        let was = if weighted {
            !self.weighted.insert(key.clone())
        } else {
            self.weighted.remove(key)
        };
        // Worked out once per event (`apply_service`), not once per Service of a relist.
        self.pod_watch_stale |= weighted || was;
        self.dirty.insert(key.clone());
    }

    // ---- EndpointSlices ----

    pub fn apply_slice(&mut self, event: Event<discovery::EndpointSlice>) {
        let trigger = match &event {
            Event::Apply(slice) => trigger_time(&slice.metadata),
            _ => None,
        };
        let step = Step::of(
            event,
            |slice| self.convert_slice(slice),
            |slice| convert::object_key(&slice.metadata).ok(),
        );
        let changes = self.slices.apply(step);
        self.changes.endpoints += changes.len() as u64;
        if let Some(at) = trigger.filter(|_| !changes.is_empty()) {
            if self.triggers.len() >= MAX_PENDING_TRIGGERS {
                self.triggers.remove(0);
            }
            self.triggers.push(at);
        }
        for (key, old) in changes {
            if let Some(old) = old {
                if let Some(names) = self.slices_by_service.get_mut(&old.service) {
                    names.remove(&key);
                    if names.is_empty() {
                        self.slices_by_service.remove(&old.service);
                    }
                }
                self.dirty.insert(old.service);
            }
            if let Some(view) = self.slices.live.get(&key) {
                self.dirty.insert(view.service.clone());
                let names = self.slices_by_service.entry(view.service.clone());
                names.or_default().insert(key);
            }
        }
    }

    /// Converts a slice, or reports it and keeps what was known of it. A slice carousel
    /// does not use (any more: FQDN, or no Service label) is removed.
    fn convert_slice(&mut self, slice: &discovery::EndpointSlice) -> Filed<ObjectKey, SliceView> {
        let Ok(key) = convert::object_key(&slice.metadata) else {
            return Filed::Ignore;
        };
        match convert::slice(slice, &mut self.names) {
            Ok(Some(view)) => Filed::Keep(key, view),
            Ok(None) => Filed::Remove(key),
            Err(error) => {
                tracing::error!(slice = %format!("{}/{}", key.0, key.1), %error, "EndpointSlice refused, keeping what was known of it");
                self.config_errors += 1;
                match self.slices.live.get(&key) {
                    Some(view) => Filed::Keep(key, view.clone()),
                    None => Filed::Ignore,
                }
            }
        }
    }

    // ---- Pods (metadata only) ----

    pub(crate) fn apply_pod(&mut self, event: Event<PartialObjectMeta<core::Pod>>) {
        let relisted = matches!(event, Event::InitDone);
        let step = Step::of(
            event,
            |pod| match convert::pod(&pod.metadata) {
                Ok((key, labels)) => Filed::Keep(key, labels),
                Err(_) => Filed::Ignore,
            },
            |pod| convert::object_key(&pod.metadata).ok(),
        );
        // Most pod updates are status changes: only a label change comes back here.
        let changes = self.pods.apply(step);
        if relisted && !changes.is_empty() {
            self.dirty.extend(self.weighted.iter().cloned());
        } else {
            for (key, _) in changes {
                self.pod_changed(&key);
            }
        }
    }

    /// Marks the weighted Services that have this pod behind them.
    fn pod_changed(&mut self, pod: &ObjectKey) {
        for service in &self.weighted {
            let behind = self.slices_by_service.get(service).is_some_and(|names| {
                names
                    .iter()
                    .filter_map(|n| self.slices.live.get(n))
                    .flat_map(|s| &s.endpoints)
                    .filter_map(|e| e.pod.as_ref())
                    .any(|p| *p.namespace == *pod.0 && *p.name == *pod.1)
            });
            if behind {
                self.dirty.insert(service.clone());
            }
        }
    }

    /// Drops every pod: the pod watch stopped because no Service weighs by label.
    pub(crate) fn forget_pods(&mut self) {
        self.pods = Relisted::default();
    }

    // ---- this node ----

    // The zone rides along with the table (`ServiceTable::zone`): the Services do not
    // depend on it, so a zone change rebuilds nothing here, but it is published.

    pub(crate) fn apply_node(&mut self, event: Event<core::Node>) {
        let before = (
            self.zone().map(str::to_owned),
            self.node_leaving(),
            self.pod_cidrs(),
        );
        let name = |node: &core::Node| convert::name(&node.metadata).ok().map(str::to_string);
        let step = Step::of(
            event,
            |node| name(node).map_or(Filed::Ignore, |n| Filed::Keep(n, NodeView::from(node))),
            name,
        );
        self.node.apply(step);
        if self.zone() != before.0.as_deref() {
            tracing::info!(zone = self.zone().unwrap_or("(none)"), "this node's zone");
            self.table.zone = self.zone().map(Arc::from);
            self.changed = true;
        }
        if self.node_leaving() != before.1 {
            tracing::info!(
                leaving = self.node_leaving(),
                "this node is leaving the cluster"
            );
            self.table.node_leaving = self.node_leaving();
            self.changed = true;
        }
        if self.pod_cidrs() != before.2 {
            self.table.pod_cidrs = self.pod_cidrs();
            self.changed = true;
        }
    }

    // ---- the table ----

    /// Rebuilds the Services touched since the last flush, and hands out the table
    /// when it changed (never before the first full sync).
    pub fn flush(&mut self) -> Flushed {
        if !self.is_synced() && !self.published {
            return Flushed::default();
        }
        for key in std::mem::take(&mut self.dirty) {
            self.rebuild(&key);
        }
        self.names.purge();
        if self.published && !self.changed {
            return Flushed::default();
        }
        self.published = true;
        self.changed = false;
        Flushed {
            table: Some(self.table.clone()),
            triggers: std::mem::take(&mut self.triggers),
        }
    }

    /// Joins one Service again from its converted parts.
    fn rebuild(&mut self, key: &ServiceKey) {
        let joined = self.services.live.get(key).and_then(|front| {
            let slices: Vec<&SliceView> = self
                .slices_by_service
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|n| self.slices.live.get(n))
                .collect();
            let pods: &PodLabels = &self.pods.live;
            convert::join_service(front, &slices, pods, &self.scope)
        });
        match joined {
            Some(service) => {
                if self.table.get(key) != Some(&service) {
                    self.table.services.insert(key.clone(), Arc::new(service));
                    self.changed = true;
                }
            }
            None => {
                if self.table.services.remove(key).is_some() {
                    self.changed = true;
                }
            }
        }
    }
}

/// Logs the warnings that are new; returns how many of them are configuration errors.
fn report_warnings(before: &[Warning], after: &[Warning]) -> u64 {
    let mut errors = 0;
    for w in after.iter().filter(|w| !before.contains(w)) {
        tracing::warn!("{w}");
        if w.is_config_error() {
            errors += 1;
        }
    }
    errors
}

fn service_key(svc: &core::Service) -> Option<ServiceKey> {
    let meta = &svc.metadata;
    Some(ServiceKey::new(
        convert::namespace(meta),
        convert::name(meta).ok()?,
    ))
}

/// The pods whose labels the weighted Services' rules can match: the pod-metadata watch
/// asks for these only, so that a cluster's other pods cost this node nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodWatch {
    /// The one namespace every weighted Service is in; `None`: all namespaces.
    pub(crate) namespace: Option<String>,
    /// A label selector that every pod a rule matches passes; `None`: every pod.
    pub(crate) selector: Option<String>,
}

impl PodWatch {
    /// The watch for `fronts`, or `None` when no rule can match any pod (no rules, or
    /// only labels no pod can carry).
    fn covering<'a>(fronts: impl Iterator<Item = &'a ServiceFront>) -> Option<PodWatch> {
        let mut namespaces = BTreeSet::new();
        let mut labels: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for front in fronts {
            for rule in &front.weights {
                if convert::is_label_key(&rule.label) && convert::is_label_value(&rule.value) {
                    namespaces.insert(&*front.key.namespace);
                    labels.entry(&rule.label).or_default().insert(&rule.value);
                }
            }
        }
        if labels.is_empty() {
            return None;
        }
        let namespace = match namespaces.len() {
            1 => namespaces.first().map(|ns| ns.to_string()),
            _ => None,
        };
        // Selectors AND their terms: with one label, `label in (values)` (or `label`
        // when a rule wants the empty value); with several, every pod.
        let selector = match labels.first_key_value() {
            Some((key, values)) if labels.len() == 1 && values.contains("") => {
                Some(key.to_string())
            }
            Some((key, values)) if labels.len() == 1 => Some(format!(
                "{key} in ({})",
                values.iter().copied().collect::<Vec<_>>().join(",")
            )),
            _ => None,
        };
        Some(PodWatch {
            namespace,
            selector,
        })
    }
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub(crate) const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// What carousel reads of its own Node.
#[derive(Clone, Debug, Default, PartialEq)]
struct NodeView {
    /// `topology.kubernetes.io/zone`.
    zone: Option<String>,
    /// Being deleted, or tainted for deletion by the cluster autoscaler: kube-proxy then
    /// reports `nodeEligible: false`, so that load balancers stop sending here.
    leaving: bool,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`); those that do not parse are left out.
    pod_cidrs: Vec<IpNet>,
}

impl From<&core::Node> for NodeView {
    fn from(node: &core::Node) -> Self {
        let tainted = node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
        Self {
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ZONE).cloned()),
            leaving: node.metadata.deletion_timestamp.is_some() || tainted,
            pod_cidrs: node
                .spec
                .iter()
                .flat_map(|spec| spec.pod_cidrs.iter().flatten().chain(&spec.pod_cidr))
                .filter_map(|cidr| cidr.parse::<IpNet>().ok())
                .map(|net| net.trunc())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }
}

/// `endpoints.kubernetes.io/last-change-trigger-time`, when present and RFC 3339.
fn trigger_time(meta: &ObjectMeta) -> Option<SystemTime> {
    let text = meta.annotations.as_ref()?.get(ANNOTATION_TRIGGER_TIME)?;
    humantime::parse_rfc3339_weak(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn service(name: &str, ip: &str, annotations: serde_json::Value) -> core::Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
        .expect("test Service")
    }

    fn svc(name: &str, ip: &str) -> core::Service {
        service(name, ip, json!({}))
    }

    /// A slice of Service `of` with one ready endpoint per `(ip, pod)`.
    fn slice(name: &str, of: &str, endpoints: &[(&str, &str)]) -> discovery::EndpointSlice {
        slice_at(name, of, endpoints, None)
    }

    fn slice_at(
        name: &str,
        of: &str,
        endpoints: &[(&str, &str)],
        trigger: Option<&str>,
    ) -> discovery::EndpointSlice {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(ip, pod)| json!({"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod}}))
            .collect();
        let annotations = match trigger {
            Some(t) => json!({ANNOTATION_TRIGGER_TIME: t}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations,
                         "labels": {convert::LABEL_SERVICE_NAME: of}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))
        .expect("test slice")
    }

    fn pod(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<core::Pod> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
        }))
        .expect("test pod metadata")
    }

    fn node(zone: Option<&str>) -> core::Node {
        let labels = match zone {
            Some(z) => json!({LABEL_ZONE: z}),
            None => json!({}),
        };
        serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": labels}}))
            .expect("test Node")
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("shop", name)
    }

    /// A store that has listed one Service `web` with slice `web-1` (10.1.0.1, 10.1.0.2).
    fn synced() -> Store {
        let mut store = Store::new(Scope::default(), None);
        store.apply_service(Event::Init);
        store.apply_service(Event::InitApply(svc("web", "10.96.0.10")));
        store.apply_service(Event::InitDone);
        store.apply_slice(Event::Init);
        store.apply_slice(Event::InitApply(slice(
            "web-1",
            "web",
            &[("10.1.0.1", "a"), ("10.1.0.2", "b")],
        )));
        store.apply_slice(Event::InitDone);
        store
    }

    /// `ip:port` of every endpoint of the first port of `shop/name`.
    fn endpoints(table: &ServiceTable, name: &str) -> Vec<String> {
        table.get(&key(name)).expect("service in the table").ports[0]
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    fn flush_table(store: &mut Store) -> ServiceTable {
        store.flush().table.expect("a new table")
    }

    #[test]
    fn a_relist_reports_what_changed_appeared_and_vanished_with_what_it_was() {
        let mut map: Relisted<&str, u32> = Relisted::default();
        let keep = |k, v| Step::Apply(Filed::Keep(k, v));
        for (k, v) in [("same", 1), ("changed", 2), ("gone", 3)] {
            assert_eq!(map.apply(keep(k, v)), vec![(k, None)]);
        }
        assert!(map.apply(keep("same", 1)).is_empty(), "an unchanged object");
        map.apply(Step::Init);
        for (k, v) in [("same", 1), ("changed", 20), ("new", 4)] {
            assert!(map.apply(Step::InitApply(Filed::Keep(k, v))).is_empty());
        }
        map.apply(Step::InitApply(Filed::Remove("gone")));
        let mut changes = map.apply(Step::InitDone);
        changes.sort();
        assert_eq!(
            changes,
            vec![("changed", Some(2)), ("gone", Some(3)), ("new", None)]
        );
        assert_eq!(
            map.apply(Step::Apply(Filed::Remove("new"))),
            vec![("new", Some(4))]
        );
        assert!(map.apply(Step::Apply(Filed::Remove("new"))).is_empty());
        assert!(map.apply(Step::Apply(Filed::Ignore)).is_empty());
    }

    #[test]
    fn nothing_is_published_before_every_watch_has_listed() {
        let mut store = Store::new(Scope::default(), None);
        store.apply_service(Event::Init);
        store.apply_service(Event::InitApply(svc("web", "10.96.0.10")));
        store.apply_service(Event::InitDone);
        assert!(!store.is_synced() && !store.has_pending());
        assert!(store.flush().table.is_none());
        store.apply_slice(Event::Init);
        store.apply_slice(Event::InitDone);
        assert!(store.is_synced() && store.has_pending());
        let table = flush_table(&mut store);
        assert_eq!(table.len(), 1);
        assert!(endpoints(&table, "web").is_empty());
        // Nothing changed since: nothing to publish.
        assert!(!store.has_pending());
        assert!(store.flush().table.is_none());
    }

    #[test]
    fn an_empty_cluster_still_publishes_its_first_table() {
        let mut store = Store::new(Scope::default(), None);
        for _ in 0..2 {
            store.apply_service(Event::Init);
            store.apply_service(Event::InitDone);
        }
        store.apply_slice(Event::Init);
        store.apply_slice(Event::InitDone);
        assert!(flush_table(&mut store).is_empty());
    }

    #[test]
    fn the_node_watch_and_the_pod_watch_gate_the_first_sync_when_needed() {
        let mut store = Store::new(Scope::default(), Some("node-a"));
        assert!(store.watches_node());
        store.apply_service(Event::Init);
        let weighted = service(
            "web",
            "10.96.0.10",
            json!({"carousel.dev/weights": "version=custom:3"}),
        );
        store.apply_service(Event::InitApply(weighted));
        store.apply_service(Event::InitDone);
        store.apply_slice(Event::Init);
        store.apply_slice(Event::InitDone);
        assert!(store.needs_pods());
        assert!(!store.is_synced(), "the Node has not listed");
        store.apply_node(Event::Init);
        store.apply_node(Event::InitApply(node(Some("zone-a"))));
        store.apply_node(Event::InitDone);
        assert_eq!(store.zone(), Some("zone-a"));
        assert!(!store.is_synced(), "the pods have not listed");
        store.apply_pod(Event::Init);
        store.apply_pod(Event::InitDone);
        assert!(store.is_synced());
        // The Node is watched for whether it is leaving, too.
        let mut store = Store::new(Scope::default(), Some("node-a"));
        assert!(store.watches_node());
        store.apply_node(Event::Init);
        store.apply_node(Event::InitApply(node(Some("zone-a"))));
        store.apply_node(Event::InitDone);
        assert_eq!(store.zone(), Some("zone-a"));
        assert!(!store.node_leaving());
        let mut tainted = node(None);
        tainted.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: TAINT_TO_BE_DELETED.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        store.apply_node(Event::Apply(tainted));
        assert!(store.node_leaving());
        store.apply_service(Event::Init);
        store.apply_service(Event::InitDone);
        store.apply_slice(Event::Init);
        store.apply_slice(Event::InitDone);
        assert!(
            flush_table(&mut store).node_leaving,
            "it rides with the table"
        );
    }

    #[test]
    fn apply_and_delete_rebuild_only_the_touched_service() {
        let mut store = synced();
        store.apply_service(Event::Apply(svc("api", "10.96.0.11")));
        store.apply_slice(Event::Apply(slice("api-1", "api", &[("10.2.0.1", "x")])));
        let table = flush_table(&mut store);
        assert_eq!(endpoints(&table, "api"), ["10.2.0.1:8080"]);
        assert_eq!(endpoints(&table, "web"), ["10.1.0.1:8080", "10.1.0.2:8080"]);

        store.apply_slice(Event::Apply(slice("web-1", "web", &[("10.1.0.2", "b")])));
        assert_eq!(store.dirty, BTreeSet::from([key("web")]));
        let table = flush_table(&mut store);
        assert_eq!(endpoints(&table, "web"), ["10.1.0.2:8080"]);

        store.apply_slice(Event::Delete(slice("api-1", "api", &[])));
        let table = flush_table(&mut store);
        assert!(endpoints(&table, "api").is_empty());
        store.apply_service(Event::Delete(svc("api", "10.96.0.11")));
        let table = flush_table(&mut store);
        assert!(table.get(&key("api")).is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn an_unchanged_object_publishes_nothing() {
        let mut store = synced();
        flush_table(&mut store);
        store.apply_service(Event::Apply(svc("web", "10.96.0.10")));
        store.apply_slice(Event::Apply(slice(
            "web-1",
            "web",
            &[("10.1.0.1", "a"), ("10.1.0.2", "b")],
        )));
        assert!(!store.has_pending());
        assert!(store.flush().table.is_none());
    }

    #[test]
    fn a_relist_drops_what_vanished_and_duplicates_nothing() {
        let mut store = synced();
        store.apply_service(Event::Apply(svc("api", "10.96.0.11")));
        store.apply_slice(Event::Apply(slice("api-1", "api", &[("10.2.0.1", "x")])));
        store.apply_slice(Event::Apply(slice("web-2", "web", &[("10.1.0.3", "c")])));
        flush_table(&mut store);

        // A 410 Gone: the watcher relists. In between, `api` and slice `web-2` were
        // deleted and `web-1` changed, and no event said so.
        store.apply_service(Event::Init);
        store.apply_slice(Event::Init);
        // Until InitDone the old state stands.
        store.apply_service(Event::InitApply(svc("web", "10.96.0.10")));
        store.apply_slice(Event::InitApply(slice(
            "web-1",
            "web",
            &[("10.1.0.2", "b"), ("10.1.0.4", "d")],
        )));
        assert!(
            store.flush().table.is_none(),
            "nothing is swapped in mid-relist"
        );
        store.apply_service(Event::InitDone);
        store.apply_slice(Event::InitDone);
        let table = flush_table(&mut store);
        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!(endpoints(&table, "web"), ["10.1.0.2:8080", "10.1.0.4:8080"]);
        assert_eq!(store.slice_count(), 1);
        assert_eq!(store.slices_by_service.len(), 1);
    }

    #[test]
    fn a_relist_of_the_same_objects_changes_nothing() {
        let mut store = synced();
        let before = flush_table(&mut store);
        for _ in 0..3 {
            store.apply_slice(Event::Init);
            store.apply_slice(Event::InitApply(slice(
                "web-1",
                "web",
                &[("10.1.0.1", "a"), ("10.1.0.2", "b")],
            )));
            store.apply_slice(Event::InitDone);
        }
        assert!(store.flush().table.is_none());
        assert_eq!(store.table, before);
    }

    #[test]
    fn a_service_that_turns_headless_leaves_the_table() {
        let mut store = synced();
        flush_table(&mut store);
        store.apply_service(Event::Apply(svc("web", "None")));
        assert!(flush_table(&mut store).is_empty());
    }

    #[test]
    fn a_broken_update_keeps_the_last_good_form_and_counts_an_error() {
        let mut store = synced();
        flush_table(&mut store);
        store.apply_service(Event::Apply(svc("web", "not-an-ip")));
        assert_eq!(store.take_config_errors(), 1);
        assert!(store.flush().table.is_none());
        assert_eq!(store.take_config_errors(), 0);
    }

    #[test]
    fn the_pod_watch_narrows_to_the_weighted_namespaces_and_labels() {
        let mut store = synced();
        let weigh = |store: &mut Store, name: &str, ns: &str, weights: &str| {
            let mut svc = service(name, "10.96.0.10", json!({"carousel.dev/weights": weights}));
            svc.metadata.namespace = Some(ns.into());
            store.apply_service(Event::Apply(svc));
        };
        let watch = |store: &Store| store.pod_watch().cloned();
        assert_eq!(watch(&store), None, "nothing weighs: no watch");
        weigh(
            &mut store,
            "web",
            "shop",
            "version=custom:3,version=original:1",
        );
        let scope = |ns: Option<&str>, selector: Option<&str>| {
            Some(PodWatch {
                namespace: ns.map(str::to_string),
                selector: selector.map(str::to_string),
            })
        };
        assert_eq!(
            watch(&store),
            scope(Some("shop"), Some("version in (custom,original)"))
        );
        // A value no label can have matches no pod: it asks for nothing more.
        weigh(&mut store, "api", "shop", "version=no way:2,version=beta:1");
        assert_eq!(
            watch(&store),
            scope(Some("shop"), Some("version in (beta,custom,original)"))
        );
        // A second namespace: every namespace, the same label.
        weigh(&mut store, "db", "data", "version=custom:2");
        assert_eq!(
            watch(&store),
            scope(None, Some("version in (beta,custom,original)"))
        );
        // A second label cannot be ORed into one selector: every pod of the namespaces.
        weigh(&mut store, "db", "data", "track=canary:2");
        assert_eq!(watch(&store), scope(None, None));
        for (name, ns) in [("web", "shop"), ("api", "shop"), ("db", "data")] {
            let mut svc = svc(name, "10.96.0.10");
            svc.metadata.namespace = Some(ns.into());
            store.apply_service(Event::Apply(svc));
        }
        assert_eq!(
            watch(&store),
            None,
            "nothing weighs any more: the watch stops"
        );
        weigh(&mut store, "web", "shop", "bad key!=x:2");
        assert_eq!(watch(&store), None, "a rule no pod can match needs no pods");
    }

    #[test]
    fn pod_labels_weigh_endpoints_and_only_label_changes_count() {
        let mut store = synced();
        flush_table(&mut store);
        assert!(!store.needs_pods());
        let weighted = service(
            "web",
            "10.96.0.10",
            json!({"carousel.dev/weights": "version=custom:3,version=original:1"}),
        );
        store.apply_service(Event::Apply(weighted));
        assert!(store.needs_pods());
        store.apply_pod(Event::Init);
        store.apply_pod(Event::InitApply(pod("a", &[("version", "custom")])));
        store.apply_pod(Event::InitApply(pod("b", &[("version", "original")])));
        store.apply_pod(Event::InitDone);
        let weights = |t: &ServiceTable| -> Vec<u32> {
            t.get(&key("web")).unwrap().ports[0]
                .endpoints
                .iter()
                .map(|e| e.weight)
                .collect()
        };
        assert_eq!(weights(&flush_table(&mut store)), [3, 1]);

        // A status-only update: same labels, nothing to do.
        store.apply_pod(Event::Apply(pod("a", &[("version", "custom")])));
        assert!(store.dirty.is_empty());
        // A pod no slice points at: nothing to do either.
        store.apply_pod(Event::Apply(pod("zz", &[("version", "custom")])));
        assert!(store.dirty.is_empty());
        store.apply_pod(Event::Apply(pod("b", &[("version", "custom")])));
        assert_eq!(weights(&flush_table(&mut store)), [3, 3]);

        // The annotation goes: the pods are no longer needed and are forgotten.
        store.apply_service(Event::Apply(svc("web", "10.96.0.10")));
        assert!(!store.needs_pods());
        store.forget_pods();
        assert_eq!(store.pod_count(), 0);
        assert_eq!(weights(&flush_table(&mut store)), [1, 1]);
    }

    #[test]
    fn the_zone_follows_the_node_label() {
        let mut store = Store::new(Scope::default(), Some("node-a"));
        store.apply_node(Event::Init);
        store.apply_node(Event::InitApply(node(None)));
        store.apply_node(Event::InitDone);
        assert_eq!(store.zone(), None);
        store.apply_node(Event::Apply(node(Some("zone-b"))));
        assert_eq!(store.zone(), Some("zone-b"));
        // A relist that no longer finds the Node forgets its zone.
        store.apply_node(Event::Init);
        store.apply_node(Event::InitDone);
        assert_eq!(store.zone(), None);
    }

    #[test]
    fn slice_changes_hand_over_their_trigger_times_once() {
        let mut store = synced();
        flush_table(&mut store);
        store.apply_slice(Event::Apply(slice_at(
            "web-1",
            "web",
            &[("10.1.0.9", "z")],
            Some("2024-05-01T10:00:00Z"),
        )));
        let flushed = store.flush();
        assert!(flushed.table.is_some());
        let expected = SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600);
        assert_eq!(flushed.triggers, [expected]);
        // The same slice again is no change, so no second measurement.
        store.apply_slice(Event::Apply(slice_at(
            "web-1",
            "web",
            &[("10.1.0.9", "z")],
            Some("2024-05-01T10:00:00Z"),
        )));
        assert!(store.flush().triggers.is_empty());
    }

    #[test]
    fn memory_stays_flat_over_many_events() {
        let mut store = synced();
        for round in 0..2_000u32 {
            let name = format!("churn-{}", round % 7);
            let ip = format!("10.3.{}.{}", (round / 250) % 250, round % 250 + 1);
            store.apply_service(Event::Apply(svc(&name, "10.96.1.1")));
            store.apply_slice(Event::Apply(slice_at(
                &format!("{name}-1"),
                &name,
                &[(ip.as_str(), "p")],
                Some("2024-05-01T10:00:00Z"),
            )));
            if round % 3 == 0 {
                store.apply_slice(Event::Delete(slice(&format!("{name}-1"), &name, &[])));
                store.apply_service(Event::Delete(svc(&name, "10.96.1.1")));
            }
            store.flush();
        }
        assert!(store.services.live.len() <= 8);
        assert!(store.slice_count() <= 8);
        assert!(store.table.len() <= 8);
        assert!(store.slices_by_service.len() <= 8);
        assert!(store.triggers.is_empty());
    }
}
