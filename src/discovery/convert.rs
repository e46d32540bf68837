//! Kubernetes objects to carousel's model: pure functions, the only place that reads
//! k8s-openapi types. The state file and the API watcher both feed them, so a Service
//! behaves the same whichever source describes it.
//!
//! Conversion runs in two steps: each object on its own (`service`, `slice`), which is
//! where a malformed object is refused with the field at fault, then `join`, which
//! matches slices to Service ports and applies kube-proxy's endpoint rules.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::addr::PodAddr;
use crate::balance;
use crate::model::{
    Balancing, Endpoint, Service, ServiceKey, ServicePort, ServiceTable, DEFAULT_AFFINITY_TIMEOUT,
};

pub const ANNOTATION_LOAD_BALANCER: &str = "carousel.dev/load-balancer";
pub const ANNOTATION_WEIGHTS: &str = "carousel.dev/weights";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// A field of one object that carousel cannot use, e.g. `spec.ports[0].port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Something about a usable object that carousel reports but works around.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Warning {
    /// A UDP or SCTP port: carousel proxies TCP only.
    SkippedPort {
        service: ServiceKey,
        port: String,
        protocol: String,
    },
    /// An annotation that does not parse; the Service falls back to the default.
    BadAnnotation {
        service: ServiceKey,
        annotation: &'static str,
        value: String,
        reason: String,
    },
}

impl Warning {
    /// Whether this warning counts in `carousel_config_errors_total`.
    pub fn is_config_error(&self) -> bool {
        matches!(self, Warning::BadAnnotation { .. })
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::SkippedPort {
                service,
                port,
                protocol,
            } => write!(
                f,
                "service {service}: port {port} is {protocol}; carousel proxies TCP only, skipped"
            ),
            Warning::BadAnnotation {
                service,
                annotation,
                value,
                reason,
            } => write!(
                f,
                "service {service}: annotation {annotation}={value:?} ignored: {reason}"
            ),
        }
    }
}

/// Which Services are this carousel's, and where it runs.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// `--service-proxy-name`: own only Services with this label value; without it, only
    /// Services that carry no such label.
    pub proxy_name: Option<String>,
}

/// A Service, converted on its own, before its endpoints are known.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceFront {
    pub key: ServiceKey,
    pub proxy_name: Option<String>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub ports: Vec<PortFront>,
    pub balancing: Balancing,
    /// `carousel.dev/weights`: label rules, first match wins.
    pub weights: Vec<WeightRule>,
    pub external_traffic_local: bool,
    pub warnings: Vec<Warning>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortFront {
    pub name: String,
    pub port: u16,
    pub node_port: Option<u16>,
    pub target: IntOrString,
}

/// `label=value:weight`, from `carousel.dev/weights`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightRule {
    pub label: String,
    pub value: String,
    pub weight: u32,
}

/// An EndpointSlice, converted on its own.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceView {
    pub service: ServiceKey,
    /// `(name, port)` of each TCP port of the slice; the name is empty when unnamed.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// `namespace/name` of the pod behind it, when the slice says.
    pub pod: Option<(String, String)>,
    pub node: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn name(meta: &ObjectMeta) -> Result<&str, FieldError> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(FieldError::new("metadata.name", "missing")),
    }
}

fn parse_ip(field: String, text: &str) -> Result<IpAddr, FieldError> {
    text.parse()
        .map_err(|_| FieldError::new(field, format!("{text:?} is not an IP address")))
}

fn parse_port(field: String, value: i32) -> Result<u16, FieldError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(FieldError::new(
            field,
            format!("{value} is not a port (1-65535)"),
        )),
    }
}

/// Converts one Service. `Ok(None)` for Services carousel does not proxy: headless and
/// ExternalName Services.
pub fn service(svc: &core::Service) -> Result<Option<ServiceFront>, FieldError> {
    let meta = &svc.metadata;
    let key = ServiceKey::new(namespace(meta), name(meta)?);
    let Some(spec) = &svc.spec else {
        return Err(FieldError::new("spec", "missing"));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let cluster_ip_texts: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    if cluster_ip_texts.contains(&"None") {
        return Ok(None);
    }
    let field = if spec.cluster_ips.is_some() {
        "spec.clusterIPs"
    } else {
        "spec.clusterIP"
    };
    let cluster_ips = cluster_ip_texts
        .iter()
        .enumerate()
        .map(|(i, ip)| parse_ip(format!("{field}[{i}]"), ip))
        .collect::<Result<Vec<_>, _>>()?;
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| parse_ip(format!("spec.externalIPs[{i}]"), ip))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, ing)| ing.ip.as_ref().map(|ip| (i, ip)))
        .map(|(i, ip)| parse_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip))
        .collect::<Result<Vec<_>, _>>()?;

    let mut warnings = Vec::new();
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = parse_port(format!("spec.ports[{i}].port"), p.port)?;
        let name = p.name.clone().unwrap_or_default();
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        if protocol != "TCP" {
            warnings.push(Warning::SkippedPort {
                service: key.clone(),
                port: if name.is_empty() {
                    port.to_string()
                } else {
                    name
                },
                protocol: protocol.to_string(),
            });
            continue;
        }
        let node_port = p
            .node_port
            .map(|np| parse_port(format!("spec.ports[{i}].nodePort"), np))
            .transpose()?;
        let target = match &p.target_port {
            None => IntOrString::Int(i32::from(port)),
            Some(IntOrString::Int(t)) => {
                IntOrString::Int(parse_port(format!("spec.ports[{i}].targetPort"), *t)?.into())
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(FieldError::new(
                    format!("spec.ports[{i}].targetPort"),
                    "empty port name",
                ))
            }
            Some(t) => t.clone(),
        };
        ports.push(PortFront {
            name,
            port,
            node_port,
            target,
        });
    }

    let annotations = meta.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    let mut balancing = Balancing::default();
    if let Some(algorithm) = annotation(ANNOTATION_LOAD_BALANCER) {
        let algorithm = algorithm.trim();
        if balance::is_known(algorithm) {
            balancing.algorithm = algorithm.to_string();
        } else {
            warnings.push(Warning::BadAnnotation {
                service: key.clone(),
                annotation: ANNOTATION_LOAD_BALANCER,
                value: algorithm.to_string(),
                reason: format!(
                    "unknown algorithm (known: {}); using {}",
                    balance::algorithms().collect::<Vec<_>>().join(", "),
                    balance::DEFAULT_ALGORITHM
                ),
            });
        }
    }
    let weights = match annotation(ANNOTATION_WEIGHTS) {
        Some(text) => {
            let (rules, errors) = parse_weights(text);
            warnings.extend(errors.into_iter().map(|reason| Warning::BadAnnotation {
                service: key.clone(),
                annotation: ANNOTATION_WEIGHTS,
                value: text.to_string(),
                reason,
            }));
            rules
        }
        None => Vec::new(),
    };
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        balancing.affinity = Some(match timeout {
            None => DEFAULT_AFFINITY_TIMEOUT,
            Some(s) if (1..=86400).contains(&s) => Duration::from_secs(s as u64),
            Some(s) => {
                return Err(FieldError::new(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{s} is outside 1-86400"),
                ))
            }
        });
    }

    Ok(Some(ServiceFront {
        proxy_name: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
            .cloned(),
        key,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        balancing,
        weights,
        external_traffic_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        warnings,
    }))
}

/// Parses `label=value:weight,...`. Entries that do not parse are returned as errors and
/// left out; the rest still apply.
pub fn parse_weights(text: &str) -> (Vec<WeightRule>, Vec<String>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let parsed = entry.rsplit_once(':').and_then(|(selector, weight)| {
            let (label, value) = selector.split_once('=')?;
            let weight = weight.trim().parse::<u32>().ok()?;
            let (label, value) = (label.trim(), value.trim());
            (!label.is_empty() && weight <= 1_000_000).then(|| WeightRule {
                label: label.to_string(),
                value: value.to_string(),
                weight,
            })
        });
        match parsed {
            Some(rule) => rules.push(rule),
            None => errors.push(format!(
                "entry {entry:?} is not label=value:weight with a weight from 0 to 1000000"
            )),
        }
    }
    (rules, errors)
}

/// Converts one EndpointSlice. `Ok(None)` for slices carousel does not use: FQDN slices
/// and slices that name no Service.
pub fn slice(slice: &discovery::EndpointSlice) -> Result<Option<SliceView>, FieldError> {
    let meta = &slice.metadata;
    name(meta)?;
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Ok(None);
    };
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(None),
        other => {
            return Err(FieldError::new(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ))
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Some(port) = p.port else {
            // A port without a number means "all ports"; carousel needs a number to dial.
            continue;
        };
        ports.push((
            p.name.clone().unwrap_or_default(),
            parse_port(format!("ports[{i}].port"), port)?,
        ));
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().flatten().enumerate() {
        // kube-proxy uses the first address only; the others are the same pod.
        let Some(first) = e.addresses.first() else {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "empty",
            ));
        };
        let ip = parse_ip(format!("endpoints[{i}].addresses[0]"), first)?;
        if ip.is_ipv6() != ipv6 {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses[0]"),
                format!("{ip} does not match addressType {}", slice.address_type),
            ));
        }
        let conditions = e.conditions.as_ref();
        // Unknown readiness counts as ready, and serving defaults to ready, as the API documents.
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
            .and_then(|r| {
                let ns = r.namespace.as_deref().unwrap_or(namespace(meta));
                r.name.as_ref().map(|n| (ns.to_string(), n.clone()))
            });
        endpoints.push(SliceEndpoint {
            ip,
            pod,
            node: e.node_name.clone(),
            zone: e.zone.clone(),
            ready,
            serving,
            terminating,
        });
    }
    Ok(Some(SliceView {
        service: ServiceKey::new(namespace(meta), service),
        ports,
        endpoints,
    }))
}

/// `namespace/name` → labels of every known pod, for the weight rules.
pub type PodLabels = HashMap<(String, String), BTreeMap<String, String>>;

/// Records one pod's labels (only its metadata is read).
pub fn add_pod(pods: &mut PodLabels, meta: &ObjectMeta) -> Result<(), FieldError> {
    let key = (namespace(meta).to_string(), name(meta)?.to_string());
    pods.insert(key, meta.labels.clone().unwrap_or_default());
    Ok(())
}

/// Joins converted Services and slices into one table, by kube-proxy's rules.
///
/// Returns the table and the warnings of the Services it holds.
pub fn join(
    services: &[ServiceFront],
    slices: &[SliceView],
    pods: &PodLabels,
    scope: &Scope,
) -> (ServiceTable, Vec<Warning>) {
    let mut by_service: HashMap<&ServiceKey, Vec<&SliceView>> = HashMap::new();
    for s in slices {
        by_service.entry(&s.service).or_default().push(s);
    }
    let mut table = ServiceTable::default();
    let mut warnings = Vec::new();
    for front in services {
        if front.proxy_name != scope.proxy_name {
            continue;
        }
        let slices = by_service.get(&front.key).map(Vec::as_slice).unwrap_or(&[]);
        let ports = front
            .ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port,
                node_port: p.node_port,
                endpoints: endpoints_for(p, slices, &front.weights, pods),
            })
            .collect();
        warnings.extend(front.warnings.iter().cloned());
        table.services.insert(
            front.key.clone(),
            Service {
                key: front.key.clone(),
                cluster_ips: front.cluster_ips.clone(),
                external_ips: front.external_ips.clone(),
                load_balancer_ips: front.load_balancer_ips.clone(),
                ports,
                balancing: front.balancing.clone(),
                external_traffic_local: front.external_traffic_local,
            },
        );
    }
    (table, warnings)
}

/// The slice port that serves a Service port: the one named like the Service port (the
/// EndpointSlice controller's naming), else the one named by a named `targetPort`, else,
/// for hand-written slices, the one whose number is a numeric `targetPort`.
fn slice_port(port: &PortFront, slice: &SliceView) -> Option<u16> {
    let by_name = |n: &str| slice.ports.iter().find(|(name, _)| name == n).map(|p| p.1);
    by_name(&port.name).or_else(|| match &port.target {
        IntOrString::String(target) => by_name(target),
        IntOrString::Int(target) => slice
            .ports
            .iter()
            .find(|(_, p)| i32::from(*p) == *target)
            .map(|p| p.1),
    })
}

fn endpoints_for(
    port: &PortFront,
    slices: &[&SliceView],
    rules: &[WeightRule],
    pods: &PodLabels,
) -> Vec<Endpoint> {
    let mut found: BTreeMap<PodAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice_port(port, slice) else {
            continue;
        };
        for e in &slice.endpoints {
            let addr = PodAddr(SocketAddr::new(e.ip, target));
            let endpoint = Endpoint {
                addr,
                pod: e.pod.as_ref().map(|(_, n)| n.as_str()).unwrap_or("").into(),
                node: e.node.as_deref().map(Arc::from),
                zone: e.zone.as_deref().map(Arc::from),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                weight: weight(e.pod.as_ref(), rules, pods),
            };
            // The same address in two slices (a slice being replaced) counts once; if the
            // copies disagree, the ready one wins so that no serving pod is lost.
            match found.get(&addr) {
                Some(existing) if existing.ready || !endpoint.ready => {}
                _ => {
                    found.insert(addr, endpoint);
                }
            }
        }
    }
    found.into_values().collect()
}

fn weight(pod: Option<&(String, String)>, rules: &[WeightRule], pods: &PodLabels) -> u32 {
    if rules.is_empty() {
        return 1;
    }
    let labels = pod.and_then(|p| pods.get(p));
    rules
        .iter()
        .find(|r| labels.and_then(|l| l.get(&r.label)) == Some(&r.value))
        .map_or(1, |r| r.weight)
}
