//! Kubernetes objects to carousel's model: pure functions, the only place that reads
//! k8s-openapi types. The state file and the API watcher both feed them, so a Service
//! behaves the same whichever source describes it.
//!
//! Conversion runs in two steps: each object on its own (`service`, `slice`), which is
//! where a malformed object is refused with the field at fault, then `join`, which
//! matches slices to Service ports and applies kube-proxy's endpoint rules.
//!
//! An enum field with a value carousel does not know (a `sessionAffinity` other than
//! `ClientIP`, a `trafficDistribution` a later Kubernetes adds) is read as its default,
//! as the API server only hands out values it checked; the state file is checked first,
//! in `validate`, so that a typo there is refused rather than read as the default.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::addr::PodAddr;
use crate::discovery::file::Location;
use crate::discovery::names::Names;
use crate::discovery::validate;
use crate::model::{
    Algorithm, Balancing, ClientSource, Endpoint, Placement, Protocol, ProxyProtocol, Service,
    ServiceKey, ServicePort, ServiceTable, DEFAULT_AFFINITY_TIMEOUT,
};

pub const ANNOTATION_LOAD_BALANCER: &str = "carousel.dev/load-balancer";
pub const ANNOTATION_WEIGHTS: &str = "carousel.dev/weights";
pub const ANNOTATION_PROXY_PROTOCOL: &str = "carousel.dev/proxy-protocol";
pub const ANNOTATION_SOURCE: &str = "carousel.dev/source";
pub(crate) const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// The source ranges of a LoadBalancer Service before `spec.loadBalancerSourceRanges`
/// existed, comma-separated; read when the field is empty, as kube-proxy does.
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub(crate) const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// The longest `carousel.dev/weights` value read, and the most rules it may hold: past
/// either, the whole annotation is ignored (every endpoint weighs 1), with one warning.
/// Kubernetes lets annotations reach 256 KiB; a Service author must not be able to make
/// every node's carousel spend memory and log lines in proportion.
pub const MAX_WEIGHTS_BYTES: usize = 4096;
pub const MAX_WEIGHT_RULES: usize = 64;
/// How many characters of a value a message quotes.
const QUOTED_CHARS: usize = 64;

/// `text` as a message quotes it: at most `QUOTED_CHARS` characters, with the length
/// of what was left out, so that no message grows with what it quotes.
pub(crate) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// A field of one object that carousel cannot use, e.g. `spec.ports[0].port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Something about a usable object that carousel reports but works around.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Warning {
    /// An SCTP port (or another protocol): carousel proxies TCP and UDP only.
    SkippedPort {
        service: ServiceKey,
        port: String,
        protocol: String,
    },
    /// An annotation that does not parse, in part or whole; the reason says what the
    /// Service does instead. One per annotation, however many of its entries are bad.
    BadAnnotation {
        service: ServiceKey,
        annotation: &'static str,
        /// The value, quoted by [`excerpt`].
        value: String,
        reason: String,
    },
    /// A field of the state file that the object's Kubernetes type does not have, such
    /// as a misspelt `prots:`. kubectl would refuse the object; carousel reads it
    /// without the field.
    UnknownField {
        at: Location,
        /// The kind, namespace and name, as far as the object has them: `Service shop/web`.
        object: String,
        /// Where in the object: `spec.ports[0].nmae`.
        field: String,
    },
}

impl Warning {
    /// Whether this warning counts in `carousel_config_errors_total`.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            Warning::BadAnnotation { .. } | Warning::UnknownField { .. }
        )
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
                "service {service}: port {port} is {protocol}; carousel proxies TCP and UDP only, skipped"
            ),
            Warning::BadAnnotation {
                service,
                annotation,
                value,
                reason,
            } => write!(
                f,
                "service {service}: annotation {annotation}={value}: {reason}"
            ),
            Warning::UnknownField { at, object, field } => {
                write!(f, "{at} ({object}): unknown field {field}, ignored")
            }
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
    pub(crate) key: ServiceKey,
    pub(crate) proxy_name: Option<String>,
    pub(crate) cluster_ips: Vec<IpAddr>,
    pub(crate) external_ips: Vec<IpAddr>,
    pub(crate) load_balancer_ips: Vec<IpAddr>,
    pub(crate) ports: Vec<PortFront>,
    pub(crate) balancing: Balancing,
    /// `carousel.dev/weights`: label rules, first match wins.
    pub(crate) weights: Vec<WeightRule>,
    pub(crate) external_traffic_local: bool,
    pub(crate) internal_traffic_local: bool,
    pub(crate) prefer_close: bool,
    pub(crate) health_check_node_port: Option<u16>,
    pub(crate) load_balancer_source_ranges: Vec<IpNet>,
    pub(crate) source: ClientSource,
    pub(crate) warnings: Vec<Warning>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PortFront {
    pub(crate) name: String,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
    pub(crate) node_port: Option<u16>,
    pub(crate) target: IntOrString,
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
    pub(crate) service: ServiceKey,
    /// Each TCP and UDP port of the slice that has a number.
    pub(crate) ports: Vec<SlicePort>,
    pub(crate) endpoints: Vec<SliceEndpoint>,
}

/// One port of a slice; the name is empty when unnamed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SlicePort {
    pub(crate) name: String,
    pub(crate) protocol: Protocol,
    pub(crate) port: u16,
}

/// One endpoint of a slice. Its names are shared ([`Names`]) with every other endpoint
/// and with the table built from it: an endpoint costs about 100 bytes here.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    pub(crate) ip: IpAddr,
    /// The pod behind it, when the slice says.
    pub(crate) pod: Option<PodRef>,
    /// Its node, zone and `hints.forZones` (the zones it should serve under
    /// topology-aware routing).
    pub(crate) placement: Arc<Placement>,
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
}

/// `namespace/name` of a pod; the namespace is shared.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PodRef {
    pub(crate) namespace: Arc<str>,
    pub(crate) name: Arc<str>,
}

/// An object's namespace: `default` when it names none.
pub(crate) fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// An object's name, which must not be empty.
pub(crate) fn name(meta: &ObjectMeta) -> Result<&str, FieldError> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(FieldError::new("metadata.name", "missing")),
    }
}

fn parse_ip(field: String, text: &str) -> Result<IpAddr, FieldError> {
    text.parse()
        .map_err(|_| FieldError::new(field, format!("{} is not an IP address", excerpt(text))))
}

/// `spec.loadBalancerSourceRanges`, else the older annotation: CIDRs, each reduced to
/// its network (`10.1.2.3/8` is `10.0.0.0/8`). One that is no CIDR refuses the Service,
/// so that a typo never opens a guarded Service to everyone.
fn source_ranges(
    spec: &core::ServiceSpec,
    annotation: Option<&str>,
) -> Result<Vec<IpNet>, FieldError> {
    let texts: Vec<(String, &str)> = match &spec.load_balancer_source_ranges {
        Some(ranges) if !ranges.is_empty() => ranges
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r.as_str()))
            .collect(),
        _ => annotation
            .into_iter()
            .flat_map(|a| a.split(','))
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(|r| (format!("annotation {ANNOTATION_SOURCE_RANGES}"), r))
            .collect(),
    };
    let mut ranges: Vec<IpNet> = texts
        .into_iter()
        .map(|(field, text)| {
            text.trim()
                .parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| FieldError::new(field, format!("{} is not a CIDR", excerpt(text))))
        })
        .collect::<Result<_, _>>()?;
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
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
    let Some(cluster_ips) = cluster_ips(spec)? else {
        return Ok(None);
    };
    let external_ips = external_ips(spec)?;
    let load_balancer_ips = load_balancer_ips(svc)?;
    let annotations = meta.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    let mut warnings = Vec::new();
    let ports = ports(&key, spec, &mut warnings)?;
    let load_balancer_source_ranges = source_ranges(spec, annotation(ANNOTATION_SOURCE_RANGES))?;
    let balancing = Balancing {
        algorithm: algorithm(&key, annotation(ANNOTATION_LOAD_BALANCER), &mut warnings),
        affinity: affinity(spec)?,
    };
    let weights = weights(&key, annotation(ANNOTATION_WEIGHTS), &mut warnings);
    let source = ClientSource {
        proxy_protocol: proxy_protocol(
            &key,
            annotation(ANNOTATION_PROXY_PROTOCOL),
            &ports,
            &mut warnings,
        ),
        transparent: transparent(&key, annotation(ANNOTATION_SOURCE), &mut warnings),
    };
    let local = |policy: &Option<String>| policy.as_deref() == Some("Local");
    Ok(Some(ServiceFront {
        proxy_name: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
            .cloned(),
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        balancing,
        weights,
        external_traffic_local: local(&spec.external_traffic_policy),
        health_check_node_port: health_check_node_port(spec),
        internal_traffic_local: local(&spec.internal_traffic_policy),
        prefer_close: prefer_close(spec, annotation(ANNOTATION_TOPOLOGY_MODE)),
        source,
        key,
        warnings,
    }))
}

/// The ClusterIPs, from `spec.clusterIPs` else `spec.clusterIP`; `None` for a headless
/// Service. An empty `clusterIP` is "not allocated yet": no ClusterIP.
fn cluster_ips(spec: &core::ServiceSpec) -> Result<Option<Vec<IpAddr>>, FieldError> {
    // `(field, text)` of each ClusterIP; `spec.clusterIP` is a single string, not a list.
    let texts: Vec<(String, &str)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        (_, Some(ip)) if !ip.is_empty() => vec![("spec.clusterIP".to_string(), ip.as_str())],
        _ => Vec::new(),
    };
    if texts.iter().any(|(_, ip)| *ip == "None") {
        return Ok(None);
    }
    let ips = texts.into_iter().map(|(field, ip)| parse_ip(field, ip));
    ips.collect::<Result<_, _>>().map(Some)
}

fn external_ips(spec: &core::ServiceSpec) -> Result<Vec<IpAddr>, FieldError> {
    spec.external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| parse_ip(format!("spec.externalIPs[{i}]"), ip))
        .collect()
}

/// `status.loadBalancer.ingress[].ip`, but for those in `ipMode: Proxy`: the load
/// balancer itself proxies to the nodes, so packets no longer carry that IP as their
/// destination, and it is not intercepted (kube-proxy does the same).
fn load_balancer_ips(svc: &core::Service) -> Result<Vec<IpAddr>, FieldError> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, ing)| ing.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|(i, ing)| ing.ip.as_ref().map(|ip| (i, ip)))
        .map(|(i, ip)| parse_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip))
        .collect()
}

/// The TCP and UDP ports; others are skipped with a warning each.
fn ports(
    key: &ServiceKey,
    spec: &core::ServiceSpec,
    warnings: &mut Vec<Warning>,
) -> Result<Vec<PortFront>, FieldError> {
    let mut ports = Vec::new();
    // Protocol and port number -> index of the first port with them.
    let mut numbers: HashMap<(Protocol, u16), usize> = HashMap::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = parse_port(format!("spec.ports[{i}].port"), p.port)?;
        let name = p.name.clone().unwrap_or_default();
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            warnings.push(Warning::SkippedPort {
                service: key.clone(),
                port: if name.is_empty() {
                    port.to_string()
                } else {
                    name
                },
                protocol: p.protocol.clone().unwrap_or_default(),
            });
            continue;
        };
        // Kubernetes refuses two ports of one protocol with one number: both would be the
        // same listener, and the second would silently take the first one's traffic.
        if let Some(first) = numbers.insert((protocol, port), i) {
            return Err(FieldError::new(
                format!("spec.ports[{i}].port"),
                format!("{port} is also spec.ports[{first}].port"),
            ));
        }
        let node_port = p
            .node_port
            .map(|np| parse_port(format!("spec.ports[{i}].nodePort"), np))
            .transpose()?;
        ports.push(PortFront {
            name,
            protocol,
            port,
            node_port,
            target: target_port(i, port, p.target_port.as_ref())?,
        });
    }
    Ok(ports)
}

/// `spec.ports[i].targetPort`: a number, a name, or (absent) the port itself.
fn target_port(
    i: usize,
    port: u16,
    target: Option<&IntOrString>,
) -> Result<IntOrString, FieldError> {
    let field = || format!("spec.ports[{i}].targetPort");
    match target {
        None => Ok(IntOrString::Int(i32::from(port))),
        Some(IntOrString::Int(t)) => Ok(IntOrString::Int(parse_port(field(), *t)?.into())),
        Some(IntOrString::String(s)) if s.is_empty() => {
            Err(FieldError::new(field(), "empty port name"))
        }
        Some(t) => Ok(t.clone()),
    }
}

/// `carousel.dev/load-balancer`: an unknown name warns and keeps the default.
fn algorithm(key: &ServiceKey, annotation: Option<&str>, warnings: &mut Vec<Warning>) -> Algorithm {
    let Some(text) = annotation.map(str::trim) else {
        return Algorithm::default();
    };
    text.parse().unwrap_or_else(|_| {
        warnings.push(Warning::BadAnnotation {
            service: key.clone(),
            annotation: ANNOTATION_LOAD_BALANCER,
            value: excerpt(text),
            reason: format!(
                "unknown algorithm (known: {}); using {}",
                Algorithm::known(),
                Algorithm::default()
            ),
        });
        Algorithm::default()
    })
}

/// `carousel.dev/proxy-protocol`: `v1` or `v2`. Anything else warns, and the Service
/// forwards without a header; so do UDP ports under `v1`, which has no UDP form.
fn proxy_protocol(
    key: &ServiceKey,
    annotation: Option<&str>,
    ports: &[PortFront],
    warnings: &mut Vec<Warning>,
) -> Option<ProxyProtocol> {
    let text = annotation?.trim();
    let mut warn = |reason: &str| {
        warnings.push(Warning::BadAnnotation {
            service: key.clone(),
            annotation: ANNOTATION_PROXY_PROTOCOL,
            value: excerpt(text),
            reason: reason.into(),
        })
    };
    let version = match text {
        "v1" => ProxyProtocol::V1,
        "v2" => ProxyProtocol::V2,
        _ => {
            warn("unknown version (known: v1, v2); forwarding without a PROXY header");
            return None;
        }
    };
    if version == ProxyProtocol::V1 && ports.iter().any(|p| p.protocol == Protocol::Udp) {
        warn("v1 has no UDP form: the UDP ports forward without a header (v2 has one)");
    }
    Some(version)
}

/// `carousel.dev/source`: `transparent`, or `node` (the default). Anything else warns,
/// and connections leave from the node's address.
fn transparent(key: &ServiceKey, annotation: Option<&str>, warnings: &mut Vec<Warning>) -> bool {
    match annotation.map(str::trim) {
        None | Some("node") => false,
        Some("transparent") => true,
        Some(text) => {
            warnings.push(Warning::BadAnnotation {
                service: key.clone(),
                annotation: ANNOTATION_SOURCE,
                value: excerpt(text),
                reason: "unknown source (known: node, transparent); using node".into(),
            });
            false
        }
    }
}

/// `sessionAffinity: ClientIP` and its timeout (1-86400 s, 10 800 s when not given).
fn affinity(spec: &core::ServiceSpec) -> Result<Option<Duration>, FieldError> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
        Some(s) if (1..=86400).contains(&s) => Ok(Some(Duration::from_secs(s as u64))),
        Some(s) => Err(FieldError::new(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("{s} is outside 1-86400"),
        )),
    }
}

/// `carousel.dev/weights`: its good rules, and a warning for what is wrong with it.
fn weights(
    key: &ServiceKey,
    annotation: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Vec<WeightRule> {
    let Some(text) = annotation else {
        return Vec::new();
    };
    let (rules, problem) = parse_weights(text);
    warnings.extend(problem.map(|reason| Warning::BadAnnotation {
        service: key.clone(),
        annotation: ANNOTATION_WEIGHTS,
        value: excerpt(text),
        reason,
    }));
    rules
}

/// Allocated by the API server for LoadBalancer Services with eTP Local only; a value
/// that is no port is left out like a missing one.
fn health_check_node_port(spec: &core::ServiceSpec) -> Option<u16> {
    spec.health_check_node_port
        .filter(|_| spec.external_traffic_policy.as_deref() == Some("Local"))
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// Topology-aware routing: the Service asks for it by `trafficDistribution` or, before
/// that field existed, by the topology-mode annotation.
fn prefer_close(spec: &core::ServiceSpec, topology_mode: Option<&str>) -> bool {
    matches!(
        spec.traffic_distribution.as_deref(),
        Some("PreferClose" | "PreferSameZone" | "PreferSameNode")
    ) || matches!(topology_mode, Some("Auto" | "auto"))
}

/// Parses `label=value:weight,...`: the rules, and what is wrong with the text, if
/// anything, in one sentence. Entries that are not a rule (or name a label no pod can
/// carry) are left out and the rest apply; a value over `MAX_WEIGHTS_BYTES` or
/// `MAX_WEIGHT_RULES` entries is ignored whole. Linear in the text, and the sentence is
/// bounded whatever the text holds.
pub fn parse_weights(text: &str) -> (Vec<WeightRule>, Option<String>) {
    if text.len() > MAX_WEIGHTS_BYTES {
        return (
            Vec::new(),
            Some(format!(
                "{} bytes, over the limit of {MAX_WEIGHTS_BYTES}; ignored, every endpoint weighs 1",
                text.len()
            )),
        );
    }
    let entries = || text.split(',').map(str::trim).filter(|e| !e.is_empty());
    let count = entries().count();
    if count > MAX_WEIGHT_RULES {
        return (
            Vec::new(),
            Some(format!(
                "{count} entries, over the limit of {MAX_WEIGHT_RULES}; ignored, every endpoint weighs 1"
            )),
        );
    }
    let mut rules = Vec::new();
    let mut bad = Vec::new();
    for entry in entries() {
        match weight_rule(entry) {
            Some(rule) => rules.push(rule),
            None => bad.push(entry),
        }
    }
    let problem = bad.first().map(|first| {
        format!(
            "{} of {count} entries skipped, not label=value:weight with a label key and value \
             a pod can carry and a weight from 0 to 1000000 (the first: {})",
            bad.len(),
            excerpt(first)
        )
    });
    (rules, problem)
}

fn weight_rule(entry: &str) -> Option<WeightRule> {
    let (selector, weight) = entry.rsplit_once(':')?;
    let (label, value) = selector.split_once('=')?;
    let weight = weight.trim().parse::<u32>().ok()?;
    let (label, value) = (label.trim(), value.trim());
    (is_label_key(label) && is_label_value(value) && weight <= 1_000_000).then(|| WeightRule {
        label: label.to_string(),
        value: value.to_string(),
        weight,
    })
}

/// Whether `value` can be a Kubernetes label value: at most 63 characters of
/// `[A-Za-z0-9_.-]`, beginning and ending with a letter or digit, or empty.
pub(crate) fn is_label_value(value: &str) -> bool {
    let edges = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    value.is_empty()
        || (value.len() <= 63
            && edges(value.chars().next())
            && edges(value.chars().last())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

/// Whether `key` can be a Kubernetes label key: a non-empty name as for values, after
/// an optional DNS-subdomain prefix and `/`.
pub(crate) fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && !part.starts_with('-')
                    && !part.ends_with('-')
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// Converts one EndpointSlice on its own; its repeated names come from `names`.
/// `Ok(None)` for slices carousel does not use: FQDN slices and slices that name no
/// Service.
pub fn slice(
    slice: &discovery::EndpointSlice,
    names: &mut Names,
) -> Result<Option<SliceView>, FieldError> {
    let meta = &slice.metadata;
    name(meta)?;
    let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Ok(None);
    };
    // IPv4, IPv6 or FQDN; refused otherwise, in the API server's words.
    validate::address_type(&slice.address_type)?;
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    let ipv6 = slice.address_type == "IPv6";
    let ports = slice_ports(slice)?;
    let endpoints = slice.endpoints.iter().flatten().enumerate();
    let endpoints = endpoints
        .map(|(i, e)| slice_endpoint(i, e, ipv6, namespace(meta), names))
        .collect::<Result<_, _>>()?;
    Ok(Some(SliceView {
        service: ServiceKey::new(namespace(meta), service),
        ports,
        endpoints,
    }))
}

/// The slice's TCP and UDP ports that have a number.
fn slice_ports(slice: &discovery::EndpointSlice) -> Result<Vec<SlicePort>, FieldError> {
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            continue;
        };
        let Some(port) = p.port else {
            // A port without a number means "all ports"; carousel needs a number to dial.
            continue;
        };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port: parse_port(format!("ports[{i}].port"), port)?,
        });
    }
    Ok(ports)
}

/// The protocols carousel proxies, from a port's `protocol` (TCP when absent or empty,
/// as the API server defaults it).
fn protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.filter(|p| !p.is_empty()).unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// `endpoints[i]` of a slice of `namespace` whose addresses are IPv6 (`ipv6`) or IPv4.
fn slice_endpoint(
    i: usize,
    e: &discovery::Endpoint,
    ipv6: bool,
    namespace: &str,
    names: &mut Names,
) -> Result<SliceEndpoint, FieldError> {
    // kube-proxy uses the first address only; the others are the same pod.
    let Some(first) = e.addresses.first() else {
        return Err(FieldError::new(
            format!("endpoints[{i}].addresses"),
            "empty",
        ));
    };
    let ip = parse_ip(format!("endpoints[{i}].addresses[0]"), first)?;
    if ip.is_ipv6() != ipv6 {
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        return Err(FieldError::new(
            format!("endpoints[{i}].addresses[0]"),
            format!("{ip} does not match addressType {family}"),
        ));
    }
    let conditions = e.conditions.as_ref();
    let pod = e
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
        .and_then(|r| {
            let ns = r.namespace.as_deref().unwrap_or(namespace);
            r.name.as_deref().map(|n| PodRef {
                namespace: names.get(ns),
                name: n.into(),
            })
        });
    let hints = e.hints.as_ref().and_then(|h| h.for_zones.as_ref());
    Ok(SliceEndpoint {
        ip,
        pod,
        placement: names.placement(
            e.node_name.as_deref(),
            e.zone.as_deref(),
            hints.into_iter().flatten().map(|z| z.name.as_str()),
        ),
        // Unknown conditions count as ready and serving, as the API documents and
        // kube-proxy reads them.
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
    })
}

/// `(namespace, name)` of a namespaced object.
pub(crate) type ObjectKey = (String, String);

/// An object's labels.
pub(crate) type Labels = BTreeMap<String, String>;

/// `namespace/name` → labels of every known pod, for the weight rules.
pub(crate) type PodLabels = HashMap<ObjectKey, Labels>;

/// `(namespace, name)` of an object: how slices and pods are filed.
pub(crate) fn object_key(meta: &ObjectMeta) -> Result<ObjectKey, FieldError> {
    Ok((namespace(meta).to_string(), name(meta)?.to_string()))
}

/// One pod's key and labels (only its metadata is read).
pub(crate) fn pod(meta: &ObjectMeta) -> Result<(ObjectKey, Labels), FieldError> {
    Ok((object_key(meta)?, meta.labels.clone().unwrap_or_default()))
}

/// Records one pod's labels.
pub(crate) fn add_pod(pods: &mut PodLabels, meta: &ObjectMeta) -> Result<(), FieldError> {
    let (key, labels) = pod(meta)?;
    pods.insert(key, labels);
    Ok(())
}

/// Joins converted Services and slices into one table, by kube-proxy's rules.
///
/// Returns the table and the warnings of the Services it holds.
pub(crate) fn join(
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
        let slices = by_service.get(&front.key).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(service) = join_service(front, slices, pods, scope) {
            warnings.extend(front.warnings.iter().cloned());
            table.services.insert(front.key.clone(), Arc::new(service));
        }
    }
    (table, warnings)
}

/// Joins one Service with its slices, or `None` when the Service is not in `scope`.
///
/// The API source keeps Services and slices converted and calls this for the one
/// Service an event touched, instead of joining the whole table again.
pub(crate) fn join_service(
    front: &ServiceFront,
    slices: &[&SliceView],
    pods: &PodLabels,
    scope: &Scope,
) -> Option<Service> {
    if front.proxy_name != scope.proxy_name {
        return None;
    }
    let ports = front
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone(),
            protocol: p.protocol,
            port: p.port,
            node_port: p.node_port,
            endpoints: endpoints_for(p, slices, &front.weights, pods),
        })
        .collect();
    Some(Service {
        key: front.key.clone(),
        cluster_ips: front.cluster_ips.clone(),
        external_ips: front.external_ips.clone(),
        load_balancer_ips: front.load_balancer_ips.clone(),
        ports,
        balancing: front.balancing.clone(),
        external_traffic_local: front.external_traffic_local,
        internal_traffic_local: front.internal_traffic_local,
        prefer_close: front.prefer_close,
        health_check_node_port: front.health_check_node_port,
        load_balancer_source_ranges: front.load_balancer_source_ranges.clone(),
        source: front.source,
    })
}

/// The slice port that serves a Service port: the one named like the Service port (the
/// EndpointSlice controller's naming), else the one named by a named `targetPort`, else,
/// for hand-written slices, the one whose number is a numeric `targetPort`.
fn slice_port(port: &PortFront, slice: &SliceView) -> Option<u16> {
    let same = || slice.ports.iter().filter(|p| p.protocol == port.protocol);
    let by_name = |n: &str| same().find(|p| p.name == n).map(|p| p.port);
    by_name(&port.name).or_else(|| match &port.target {
        IntOrString::String(target) => by_name(target),
        IntOrString::Int(target) => same()
            .find(|p| i32::from(p.port) == *target)
            .map(|p| p.port),
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
                pod: e.pod.as_ref().map_or_else(no_pod, |p| p.name.clone()),
                placement: e.placement.clone(),
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

/// The pod name of an endpoint whose slice names none: one shared empty string.
fn no_pod() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

fn weight(pod: Option<&PodRef>, rules: &[WeightRule], pods: &PodLabels) -> u32 {
    if rules.is_empty() {
        return 1;
    }
    let labels = pod.and_then(|p| pods.get(&(p.namespace.to_string(), p.name.to_string())));
    rules
        .iter()
        .find(|r| labels.and_then(|l| l.get(&r.label)) == Some(&r.value))
        .map_or(1, |r| r.weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Objects are written as YAML, the way a state file or `kubectl get -o yaml` has
    // them; flow style keeps each one on a few lines.

    fn service_yaml(metadata: &str, spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop{metadata}}}\nspec: {{{spec}}}\n"
        )
    }

    fn convert_service(yaml: &str) -> Result<Option<ServiceFront>, FieldError> {
        let svc: core::Service = serde_yaml::from_str(yaml).expect("test Service YAML");
        service(&svc)
    }

    /// A Service in namespace `shop` named `web`, with extra metadata and its spec.
    fn front_with(metadata: &str, spec: &str) -> ServiceFront {
        convert_service(&service_yaml(metadata, spec))
            .expect("a valid Service")
            .expect("a proxied Service")
    }

    fn front(spec: &str) -> ServiceFront {
        front_with("", spec)
    }

    fn service_error(spec: &str) -> FieldError {
        convert_service(&service_yaml("", spec)).expect_err("an invalid Service")
    }

    fn convert_slice(yaml: &str) -> Result<Option<SliceView>, FieldError> {
        let s: discovery::EndpointSlice = serde_yaml::from_str(yaml).expect("test slice YAML");
        slice(&s, &mut Names::default())
    }

    /// An EndpointSlice named `name` in `namespace`, labelled for Service `web`.
    fn slice_yaml(
        namespace: &str,
        name: &str,
        address_type: &str,
        ports: &str,
        endpoints: &str,
    ) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: {namespace}, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    fn view(ports: &str, endpoints: &str) -> SliceView {
        view_in("shop", "web-1", ports, endpoints)
    }

    fn view_in(namespace: &str, name: &str, ports: &str, endpoints: &str) -> SliceView {
        convert_slice(&slice_yaml(namespace, name, "IPv4", ports, endpoints))
            .expect("a valid slice")
            .expect("a used slice")
    }

    fn slice_error(address_type: &str, ports: &str, endpoints: &str) -> FieldError {
        convert_slice(&slice_yaml("shop", "web-1", address_type, ports, endpoints))
            .expect_err("an invalid slice")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn key() -> ServiceKey {
        ServiceKey::new("shop", "web")
    }

    /// Joins with no pods and the default scope; returns the one port of `shop/web`.
    fn join_one(front: ServiceFront, slices: &[SliceView]) -> ServicePort {
        let (table, _) = join(&[front], slices, &PodLabels::new(), &Scope::default());
        let svc = table.get(&key()).expect("shop/web in the table");
        assert_eq!(svc.ports.len(), 1, "{svc:?}");
        svc.ports[0].clone()
    }

    /// `(ip:port, pod)` of each endpoint, in table order.
    fn addrs(port: &ServicePort) -> Vec<(String, String)> {
        port.endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.pod.to_string()))
            .collect()
    }

    // ---- Services ----

    #[test]
    fn cluster_ip_service_with_named_ports() {
        let f = front(
            "type: ClusterIP, clusterIP: 10.96.0.10, ports: [\
             {name: http, port: 80, targetPort: 8080, protocol: TCP}, \
             {name: metrics, port: 9090, targetPort: prom}]",
        );
        assert_eq!(f.key, key());
        assert_eq!(f.cluster_ips, vec![ip("10.96.0.10")]);
        assert!(f.external_ips.is_empty() && f.load_balancer_ips.is_empty());
        assert_eq!(
            f.ports,
            vec![
                PortFront {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: None,
                    target: IntOrString::Int(8080),
                },
                PortFront {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                    node_port: None,
                    target: IntOrString::String("prom".into()),
                },
            ]
        );
        assert_eq!(f.balancing, Balancing::default());
        assert_eq!(f.balancing.algorithm, Algorithm::RoundRobin);
        assert_eq!(f.balancing.affinity, None);
        assert!(f.weights.is_empty());
        assert!(f.warnings.is_empty());
        assert_eq!(f.proxy_name, None);
        assert!(!f.external_traffic_local);
    }

    #[test]
    fn unnamed_port_targets_its_own_number_by_default() {
        let f = front("clusterIP: 10.96.0.10, ports: [{port: 80}]");
        assert_eq!(
            f.ports,
            vec![PortFront {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
                target: IntOrString::Int(80),
            }]
        );
    }

    #[test]
    fn port_label_is_the_name_or_the_number() {
        let named = join_one(
            front("clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]"),
            &[],
        );
        assert_eq!(named.label(), "http");
        let unnamed = join_one(front("clusterIP: 10.96.0.10, ports: [{port: 8443}]"), &[]);
        assert_eq!(unnamed.name, "");
        assert_eq!(unnamed.label(), "8443");
    }

    #[test]
    fn headless_and_external_name_services_are_not_proxied() {
        for spec in [
            "clusterIP: None, ports: [{port: 80}]",
            "clusterIP: None, clusterIPs: [None], ports: [{port: 80}]",
            "type: ExternalName, externalName: db.example.com",
            "type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]",
        ] {
            assert_eq!(convert_service(&service_yaml("", spec)), Ok(None), "{spec}");
        }
    }

    #[test]
    fn udp_ports_are_kept_and_sctp_ports_skipped_with_a_warning() {
        let f = front(
            "clusterIP: 10.96.0.10, ports: [\
             {name: dns, port: 53, protocol: UDP}, \
             {name: dns-tcp, port: 53, protocol: TCP}, \
             {port: 9899, protocol: SCTP}]",
        );
        let kept: Vec<(&str, Protocol)> = f
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol))
            .collect();
        assert_eq!(kept, [("dns", Protocol::Udp), ("dns-tcp", Protocol::Tcp)]);
        assert_eq!(
            f.warnings,
            vec![Warning::SkippedPort {
                service: key(),
                port: "9899".into(),
                protocol: "SCTP".into(),
            }]
        );
        assert!(f.warnings.iter().all(|w| !w.is_config_error()));
        assert_eq!(
            f.warnings[0].to_string(),
            "service shop/web: port 9899 is SCTP; carousel proxies TCP and UDP only, skipped"
        );
    }

    #[test]
    fn dual_stack_service_keeps_both_cluster_ips() {
        let f = front(
            "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:10:96::a'], \
             ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]",
        );
        assert_eq!(f.cluster_ips, vec![ip("10.96.0.10"), ip("fd00:10:96::a")]);
    }

    #[test]
    fn external_and_load_balancer_ips() {
        let yaml = service_yaml(
            "",
            "type: LoadBalancer, clusterIP: 10.96.0.10, externalIPs: [192.0.2.10, 192.0.2.11], \
             externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]",
        ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.7}, {hostname: lb.example.com}, {ip: '2001:db8::7'}]}}\n";
        let f = convert_service(&yaml).unwrap().unwrap();
        assert_eq!(f.external_ips, vec![ip("192.0.2.10"), ip("192.0.2.11")]);
        assert_eq!(
            f.load_balancer_ips,
            vec![ip("198.51.100.7"), ip("2001:db8::7")]
        );
        assert!(f.external_traffic_local);
        assert_eq!(f.ports[0].node_port, Some(30080));
    }

    #[test]
    fn source_ranges_come_from_the_field_else_the_annotation_and_a_bad_one_refuses_the_service() {
        let f = front(
            "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}], \
             loadBalancerSourceRanges: ['10.1.2.3/8', ' 192.168.0.0/16', '10.0.0.0/8', '2001:db8::/32']",
        );
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
        assert_eq!(
            f.load_balancer_source_ranges,
            nets(&["10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32"])
        );
        let annotated = front_with(
            &format!(
                ", annotations: {{{ANNOTATION_SOURCE_RANGES}: '203.0.113.0/24, 198.51.100.7/32'}}"
            ),
            "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert_eq!(
            annotated.load_balancer_source_ranges,
            nets(&["198.51.100.7/32", "203.0.113.0/24"])
        );
        let err = service_error(
            "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}], \
             loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.300/8]",
        );
        assert_eq!(err.field, "spec.loadBalancerSourceRanges[1]");
        assert!(err.to_string().contains("10.0.0.300/8"), "{err}");
    }

    #[test]
    fn an_ingress_ip_in_proxy_mode_is_not_intercepted() {
        let yaml = service_yaml(
            "",
            "type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]",
        ) + "status: {loadBalancer: {ingress: [{ip: 198.51.100.7, ipMode: Proxy}, {ip: 198.51.100.8, ipMode: VIP}, {ip: 198.51.100.9}]}}\n";
        let f = convert_service(&yaml).unwrap().unwrap();
        assert_eq!(
            f.load_balancer_ips,
            vec![ip("198.51.100.8"), ip("198.51.100.9")]
        );
    }

    #[test]
    fn node_port_service() {
        let f = front(
            "type: NodePort, clusterIP: 10.96.0.10, \
             ports: [{name: http, port: 80, nodePort: 30080}, {name: admin, port: 81}]",
        );
        assert_eq!(f.ports[0].node_port, Some(30080));
        assert_eq!(f.ports[1].node_port, None);
        let (table, _) = join(&[f], &[], &PodLabels::new(), &Scope::default());
        assert_eq!(table.get(&key()).unwrap().ports[0].node_port, Some(30080));
        let err = service_error(
            "type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 70000}]",
        );
        assert_eq!(err.field, "spec.ports[0].nodePort");
    }

    #[test]
    fn invalid_addresses_are_refused_naming_the_field() {
        let cases = [
            (
                "clusterIP: 10.96.0.300, ports: [{port: 80}]",
                "spec.clusterIP",
            ),
            (
                "clusterIP: 10.96.0.10, clusterIPs: [bogus], ports: [{port: 80}]",
                "spec.clusterIPs[0]",
            ),
            (
                "clusterIPs: [10.96.0.10, 'fd00::zz'], ports: [{port: 80}]",
                "spec.clusterIPs[1]",
            ),
            (
                "clusterIPs: [], clusterIP: nope, ports: [{port: 80}]",
                "spec.clusterIP",
            ),
            (
                "clusterIP: 10.96.0.10, externalIPs: [1.2.3.4, example.com], ports: [{port: 80}]",
                "spec.externalIPs[1]",
            ),
        ];
        for (spec, field) in cases {
            let err = service_error(spec);
            assert_eq!(err.field, field, "{spec}");
            assert!(err.message.contains("is not an IP address"), "{err}");
        }
        let yaml = service_yaml("", "clusterIP: 10.96.0.10, ports: [{port: 80}]")
            + "status: {loadBalancer: {ingress: [{ip: 'lb!'}]}}\n";
        let err = convert_service(&yaml).unwrap_err();
        assert_eq!(err.field, "status.loadBalancer.ingress[0].ip");
    }

    #[test]
    fn ports_out_of_range_are_refused() {
        let err = service_error("clusterIP: 10.96.0.10, ports: [{port: 0}]");
        assert_eq!(err.field, "spec.ports[0].port");
        assert_eq!(
            err.to_string(),
            "spec.ports[0].port: 0 is not a port (1-65535)"
        );
        let err = service_error("clusterIP: 10.96.0.10, ports: [{port: 70000}]");
        assert_eq!(err.field, "spec.ports[0].port");
        assert!(err.message.contains("70000"), "{err}");
        let err = service_error(
            "clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: -1}]",
        );
        assert_eq!(err.field, "spec.ports[1].port");
        let err = service_error("clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 0}]");
        assert_eq!(err.field, "spec.ports[0].targetPort");
        let err = service_error("clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: ''}]");
        assert_eq!(err.field, "spec.ports[0].targetPort");
    }

    #[test]
    fn a_port_number_twice_is_refused_unless_the_protocols_differ() {
        let err = service_error(
            "clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 81}, {name: c, port: 80}]",
        );
        assert_eq!(err.field, "spec.ports[2].port");
        assert_eq!(err.message, "80 is also spec.ports[0].port");
        let f = front(
            "clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]",
        );
        assert_eq!(f.ports.len(), 2);
        let err = service_error(
            "clusterIP: 10.96.0.10, ports: [{name: a, port: 53, protocol: UDP}, {name: b, port: 53, protocol: UDP}]",
        );
        assert_eq!(err.message, "53 is also spec.ports[0].port");
    }

    #[test]
    fn missing_name_or_spec_is_refused() {
        let svc: core::Service = serde_yaml::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(service(&svc).unwrap_err().field, "metadata.name");
        let svc: core::Service =
            serde_yaml::from_str("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n").unwrap();
        assert_eq!(service(&svc).unwrap_err().field, "spec");
    }

    #[test]
    fn namespace_defaults_to_default() {
        let svc: core::Service = serde_yaml::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10}\n",
        )
        .unwrap();
        assert_eq!(
            service(&svc).unwrap().unwrap().key,
            ServiceKey::new("default", "web")
        );
    }

    #[test]
    fn client_ip_affinity_default_and_explicit_timeout() {
        let f = front("clusterIP: 10.96.0.10, sessionAffinity: ClientIP, ports: [{port: 80}]");
        assert_eq!(f.balancing.affinity, Some(Duration::from_secs(10800)));
        assert_eq!(f.balancing.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        let f = front(
            "clusterIP: 10.96.0.10, sessionAffinity: ClientIP, \
             sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{port: 80}]",
        );
        assert_eq!(f.balancing.affinity, Some(Duration::from_secs(600)));
        assert_eq!(f.balancing.algorithm, Algorithm::RoundRobin);
        let f = front(
            "clusterIP: 10.96.0.10, sessionAffinity: None, \
             sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{port: 80}]",
        );
        assert_eq!(f.balancing.affinity, None);
    }

    #[test]
    fn affinity_timeout_out_of_range_is_refused() {
        for (timeout, ok) in [
            (0, false),
            (1, true),
            (86400, true),
            (86401, false),
            (-5, false),
        ] {
            let result = convert_service(&service_yaml(
                "",
                &format!(
                    "clusterIP: 10.96.0.10, sessionAffinity: ClientIP, \
                     sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}"
                ),
            ));
            match result {
                Ok(Some(f)) if ok => {
                    assert_eq!(
                        f.balancing.affinity,
                        Some(Duration::from_secs(timeout as u64))
                    )
                }
                Err(e) if !ok => {
                    assert_eq!(
                        e.field,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
                    );
                    assert!(e.message.contains(&timeout.to_string()), "{e}");
                }
                other => panic!("timeoutSeconds {timeout}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_load_balancer_falls_back_with_a_config_error() {
        let f = front_with(
            ", annotations: {carousel.dev/load-balancer: magic-hat}",
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert_eq!(f.balancing.algorithm, Algorithm::RoundRobin);
        assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
        let w = &f.warnings[0];
        assert!(w.is_config_error());
        match w {
            Warning::BadAnnotation {
                service,
                annotation,
                value,
                reason,
            } => {
                assert_eq!(service, &key());
                assert_eq!(*annotation, ANNOTATION_LOAD_BALANCER);
                assert_eq!(value, "\"magic-hat\"");
                assert!(reason.contains("round-robin"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(w.to_string().starts_with(
            "service shop/web: annotation carousel.dev/load-balancer=\"magic-hat\": unknown algorithm"
        ));
    }

    #[test]
    fn known_load_balancer_is_taken_trimmed() {
        let f = front_with(
            ", annotations: {carousel.dev/load-balancer: ' round-robin '}",
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert_eq!(f.balancing.algorithm, Algorithm::RoundRobin);
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);
    }

    fn rule(label: &str, value: &str, weight: u32) -> WeightRule {
        WeightRule {
            label: label.into(),
            value: value.into(),
            weight,
        }
    }

    #[test]
    fn parse_weights_good_entries() {
        assert_eq!(
            parse_weights("version=custom:3,version=original:1"),
            (
                vec![rule("version", "custom", 3), rule("version", "original", 1)],
                None
            )
        );
        assert_eq!(
            parse_weights(" version = custom : 3 , app.kubernetes.io/track=canary:0,"),
            (
                vec![
                    rule("version", "custom", 3),
                    rule("app.kubernetes.io/track", "canary", 0)
                ],
                None
            )
        );
        assert_eq!(
            parse_weights("a=:1000000"),
            (vec![rule("a", "", 1_000_000)], None)
        );
        assert_eq!(parse_weights(""), (vec![], None));
        assert_eq!(parse_weights("  , ,"), (vec![], None));
    }

    #[test]
    fn parse_weights_malformed_entries_are_reported_and_skipped() {
        for bad in [
            "version=custom",
            "=x:1",
            "a=b:-1",
            "a=b:x",
            "a:1",
            "a=b:",
            "a=b:1000001",
            " = :2",
            "not a label=x:1",
            "a=not a value:1",
        ] {
            let (rules, problem) = parse_weights(bad);
            assert!(rules.is_empty(), "{bad:?} gave {rules:?}");
            let problem = problem.unwrap_or_else(|| panic!("{bad:?} gave no problem"));
            assert!(problem.starts_with("1 of 1 entries skipped"), "{problem}");
            assert!(problem.contains(&format!("{:?}", bad.trim())), "{problem}");
        }
        let (rules, problem) = parse_weights("version=custom:3,oops,version=original:1,a=b:x");
        assert_eq!(
            rules,
            vec![rule("version", "custom", 3), rule("version", "original", 1)]
        );
        let problem = problem.unwrap();
        assert!(problem.starts_with("2 of 4 entries skipped"), "{problem}");
        assert!(problem.contains("(the first: \"oops\")"), "{problem}");
    }

    #[test]
    fn a_huge_weights_value_costs_one_bounded_warning_and_no_rules() {
        // 10 000 bad entries (169 KB) once gave 10 000 warnings, each with the whole value.
        let entries = |n: usize, entry: &str| vec![entry; n].join(",");
        let (rules, problem) = parse_weights(&entries(10_000, "version=custom:x"));
        assert!(rules.is_empty());
        let problem = problem.unwrap();
        assert!(problem.contains("over the limit of 4096"), "{problem}");
        // Under the byte limit, over the rule limit: ignored whole too.
        let (rules, problem) = parse_weights(&entries(MAX_WEIGHT_RULES + 1, "a=b:1"));
        assert!(rules.is_empty());
        assert!(problem
            .unwrap()
            .contains("65 entries, over the limit of 64"));
        // At the limit, every rule applies.
        let (rules, problem) = parse_weights(&entries(MAX_WEIGHT_RULES, "a=b:1"));
        assert_eq!((rules.len(), problem), (MAX_WEIGHT_RULES, None));
        // Through the Service: one warning, quoting a bounded part of the value.
        let value = entries(10_000, "version=custom:x");
        let f = front_with(
            &format!(", annotations: {{carousel.dev/weights: '{value}'}}"),
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert!(f.weights.is_empty());
        assert_eq!(f.warnings.len(), 1, "{} warnings", f.warnings.len());
        let line = f.warnings[0].to_string();
        assert!(line.len() < 400, "{} bytes: {line}", line.len());
        assert!(line.contains(&format!("({} bytes)", value.len())), "{line}");
    }

    #[test]
    fn excerpt_quotes_at_most_64_characters_and_says_how_long_the_rest_is() {
        assert_eq!(excerpt("round-robin"), "\"round-robin\"");
        let long = "é".repeat(100);
        assert_eq!(
            excerpt(&long),
            format!("{:?}... (200 bytes)", "é".repeat(64))
        );
        assert_eq!(excerpt(&"x".repeat(64)), format!("{:?}", "x".repeat(64)));
    }

    #[test]
    fn bad_weights_annotation_warns_and_keeps_the_good_rules() {
        let f = front_with(
            ", annotations: {carousel.dev/weights: 'version=custom:3,version=custom'}",
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert_eq!(f.weights, vec![rule("version", "custom", 3)]);
        assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
        assert!(f.warnings[0].is_config_error());
        assert!(matches!(
            &f.warnings[0],
            Warning::BadAnnotation { annotation, value, .. }
                if *annotation == ANNOTATION_WEIGHTS && value == "\"version=custom:3,version=custom\""
        ));
    }

    #[test]
    fn proxy_protocol_and_source_annotations() {
        let annotated = |annotations: &str, ports: &str| {
            front_with(
                &format!(", annotations: {{{annotations}}}"),
                &format!("clusterIP: 10.96.0.10, ports: [{ports}]"),
            )
        };
        let f = annotated(
            "carousel.dev/proxy-protocol: v2, carousel.dev/source: transparent",
            "{port: 53, protocol: UDP}",
        );
        assert_eq!(
            f.source,
            ClientSource {
                proxy_protocol: Some(ProxyProtocol::V2),
                transparent: true
            }
        );
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);

        let f = annotated(
            "carousel.dev/proxy-protocol: ' v1 ', carousel.dev/source: node",
            "{port: 80}",
        );
        assert_eq!(f.source.proxy_protocol, Some(ProxyProtocol::V1));
        assert!(!f.source.transparent);
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);

        // No annotation: no header, the node's address.
        let f = annotated("other: x", "{port: 80}");
        assert_eq!(f.source, ClientSource::default());
        assert!(f.warnings.is_empty(), "{:?}", f.warnings);

        // Bad values warn, naming the annotation and the value, and change nothing.
        let f = annotated(
            "carousel.dev/proxy-protocol: V3, carousel.dev/source: client",
            "{port: 80}",
        );
        assert_eq!(f.source, ClientSource::default());
        let named: Vec<(&str, &str)> = f
            .warnings
            .iter()
            .map(|w| match w {
                Warning::BadAnnotation {
                    annotation, value, ..
                } => (*annotation, value.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            named,
            [
                (ANNOTATION_PROXY_PROTOCOL, "\"V3\""),
                (ANNOTATION_SOURCE, "\"client\"")
            ]
        );
        assert!(f.warnings.iter().all(Warning::is_config_error));

        // v1 has no UDP form: it stays for the TCP ports, and says so.
        let f = annotated(
            "carousel.dev/proxy-protocol: v1",
            "{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}",
        );
        assert_eq!(f.source.proxy_protocol, Some(ProxyProtocol::V1));
        assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
        assert!(
            f.warnings[0].to_string().contains("no UDP form"),
            "{}",
            f.warnings[0]
        );
    }

    fn pod_labels(pods: &[(&str, &str, &str)]) -> PodLabels {
        let mut labels = PodLabels::new();
        for (namespace, name, pod_labels) in pods {
            let meta: ObjectMeta = serde_yaml::from_str(&format!(
                "{{name: {name}, namespace: {namespace}, labels: {{{pod_labels}}}}}"
            ))
            .unwrap();
            add_pod(&mut labels, &meta).unwrap();
        }
        labels
    }

    #[test]
    fn weights_apply_through_pod_labels() {
        let f = front_with(
            ", annotations: {carousel.dev/weights: 'version=custom:3,track=canary:5,version=original:1,version=old:0'}",
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]",
        );
        let pods = pod_labels(&[
            ("shop", "custom", "version: custom, track: canary"),
            ("shop", "canary", "track: canary, version: original"),
            ("shop", "original", "version: original"),
            ("shop", "old", "version: old"),
            ("shop", "plain", "app: web"),
            // Same name, other namespace: its labels must not apply to shop/plain.
            ("other", "plain", "version: custom"),
        ]);
        let s = view(
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1], targetRef: {kind: Pod, name: custom}}, \
              {addresses: [10.1.0.2], targetRef: {kind: Pod, name: canary}}, \
              {addresses: [10.1.0.3], targetRef: {kind: Pod, name: original}}, \
              {addresses: [10.1.0.4], targetRef: {kind: Pod, name: old}}, \
              {addresses: [10.1.0.5], targetRef: {kind: Pod, name: plain}}, \
              {addresses: [10.1.0.6], targetRef: {kind: Pod, name: unknown}}, \
              {addresses: [10.1.0.7]}]",
        );
        let (table, warnings) = join(&[f], &[s], &pods, &Scope::default());
        assert!(warnings.is_empty(), "{warnings:?}");
        let weights: Vec<(String, u32)> = table.get(&key()).unwrap().ports[0]
            .endpoints
            .iter()
            .map(|e| (e.pod.to_string(), e.weight))
            .collect();
        let expected = [
            ("custom", 3),
            ("canary", 5),
            ("original", 1),
            ("old", 0),
            ("plain", 1),
            ("unknown", 1),
            ("", 1),
        ];
        assert_eq!(weights, expected.map(|(p, w)| (p.to_string(), w)).to_vec());
        // Weight 0 drains: the pod stays in the table but takes no new connection.
        let eligible = table.get(&key()).unwrap().ports[0].eligible();
        assert_eq!(eligible.len(), 6);
        assert!(eligible.iter().all(|e| &*e.pod != "old"));
    }

    #[test]
    fn without_weights_every_endpoint_weighs_one() {
        let pods = pod_labels(&[("shop", "custom", "version: custom")]);
        let s = view(
            "[{port: 80}]",
            "[{addresses: [10.1.0.1], targetRef: {kind: Pod, name: custom}}]",
        );
        let (table, _) = join(
            &[front("clusterIP: 10.96.0.10, ports: [{port: 80}]")],
            &[s],
            &pods,
            &Scope::default(),
        );
        assert_eq!(table.get(&key()).unwrap().ports[0].endpoints[0].weight, 1);
    }

    // ---- EndpointSlices ----

    #[test]
    fn slice_conversion() {
        let s = view(
            "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, {name: any}]",
            "[{addresses: [10.1.0.1, 10.1.0.99], nodeName: node-a, zone: zone-1, \
               conditions: {ready: true, serving: true, terminating: false}, \
               targetRef: {kind: Pod, name: web-a}}, \
              {addresses: [10.1.0.2], targetRef: {kind: Pod, name: web-b, namespace: elsewhere}}, \
              {addresses: [10.1.0.3], targetRef: {kind: Node, name: node-c}}]",
        );
        assert_eq!(s.service, key());
        let port = |name: &str, protocol, port| SlicePort {
            name: name.into(),
            protocol,
            port,
        };
        assert_eq!(
            s.ports,
            [
                port("http", Protocol::Tcp, 8080),
                port("dns", Protocol::Udp, 53)
            ]
        );
        assert_eq!(
            s.endpoints,
            vec![
                SliceEndpoint {
                    ip: ip("10.1.0.1"),
                    pod: Some(PodRef {
                        namespace: "shop".into(),
                        name: "web-a".into()
                    }),
                    placement: Arc::new(Placement {
                        node: Some("node-a".into()),
                        zone: Some("zone-1".into()),
                        zone_hints: Box::default(),
                    }),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                SliceEndpoint {
                    ip: ip("10.1.0.2"),
                    pod: Some(PodRef {
                        namespace: "elsewhere".into(),
                        name: "web-b".into()
                    }),
                    placement: Arc::new(Placement {
                        node: None,
                        zone: None,
                        zone_hints: Box::default(),
                    }),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
                SliceEndpoint {
                    ip: ip("10.1.0.3"),
                    pod: None,
                    placement: Arc::new(Placement {
                        node: None,
                        zone: None,
                        zone_hints: Box::default(),
                    }),
                    ready: true,
                    serving: true,
                    terminating: false,
                },
            ]
        );
    }

    #[test]
    fn ipv6_slice() {
        let s = convert_slice(&slice_yaml(
            "shop",
            "web-v6",
            "IPv6",
            "[{port: 80}]",
            "[{addresses: ['fd00::1']}]",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoints[0].ip, ip("fd00::1"));
        let (table, _) = join(
            &[front("clusterIP: 10.96.0.10, ports: [{port: 80}]")],
            &[s],
            &PodLabels::new(),
            &Scope::default(),
        );
        assert_eq!(
            table.get(&key()).unwrap().ports[0].endpoints[0]
                .addr
                .to_string(),
            "[fd00::1]:80"
        );
    }

    #[test]
    fn slices_carousel_does_not_use() {
        let fqdn = slice_yaml(
            "shop",
            "web-1",
            "FQDN",
            "[{port: 80}]",
            "[{addresses: [db.example.com]}]",
        );
        assert_eq!(convert_slice(&fqdn), Ok(None));
        let unlabelled = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                          metadata: {name: orphan, namespace: shop}\naddressType: IPv4\n\
                          endpoints: [{addresses: [10.1.0.1]}]\n";
        assert_eq!(convert_slice(unlabelled), Ok(None));
    }

    #[test]
    fn invalid_slices_are_refused_naming_the_field() {
        let e = slice_error("IPX", "[{port: 80}]", "[]");
        assert_eq!(e.field, "addressType");
        assert!(e.message.contains("\"IPX\""), "{e}");
        let e = slice_error("IPv4", "[{port: 80}]", "[{addresses: ['fd00::1']}]");
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        assert!(e.message.contains("IPv4"), "{e}");
        let e = slice_error(
            "IPv6",
            "[{port: 80}]",
            "[{addresses: ['fd00::1']}, {addresses: [10.1.0.1]}]",
        );
        assert_eq!(e.field, "endpoints[1].addresses[0]");
        let e = slice_error("IPv4", "[{port: 80}]", "[{addresses: [10.1.0.999]}]");
        assert_eq!(e.field, "endpoints[0].addresses[0]");
        let e = slice_error("IPv4", "[{port: 80}]", "[{addresses: []}]");
        assert_eq!(e.field, "endpoints[0].addresses");
        let e = slice_error("IPv4", "[{name: a, port: 80}, {name: b, port: 0}]", "[]");
        assert_eq!(e.field, "ports[1].port");
        let unnamed = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                       metadata: {namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
                       addressType: IPv4\nendpoints: []\n";
        assert_eq!(convert_slice(unnamed).unwrap_err().field, "metadata.name");
    }

    #[test]
    fn endpoint_condition_defaults() {
        // (conditions, ready, serving, terminating)
        let cases = [
            ("{}", true, true, false),
            // An unset `serving` is true whatever `ready` says, as kube-proxy reads it.
            ("{ready: false}", false, true, false),
            ("{ready: false, terminating: true}", false, true, true),
            ("{ready: true}", true, true, false),
            ("{serving: true}", true, true, false),
            (
                "{ready: false, serving: true, terminating: true}",
                false,
                true,
                true,
            ),
            (
                "{ready: null, serving: false, terminating: true}",
                true,
                false,
                true,
            ),
        ];
        for (conditions, ready, serving, terminating) in cases {
            let s = view(
                "[{port: 80}]",
                &format!("[{{addresses: [10.1.0.1], conditions: {conditions}}}]"),
            );
            let e = &s.endpoints[0];
            assert_eq!(
                (e.ready, e.serving, e.terminating),
                (ready, serving, terminating),
                "{conditions}"
            );
        }
        let s = view("[{port: 80}]", "[{addresses: [10.1.0.1]}]");
        let e = &s.endpoints[0];
        assert_eq!(
            (e.ready, e.serving, e.terminating),
            (true, true, false),
            "no conditions at all"
        );
    }

    #[test]
    fn slices_join_by_service_label_and_namespace() {
        let f = front("clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]");
        let ours = view_in(
            "shop",
            "web-1",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1]}]",
        );
        let other_namespace = view_in(
            "lab",
            "web-1",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.2.0.1]}]",
        );
        let mut other_service = view("[{name: http, port: 8080}]", "[{addresses: [10.3.0.1]}]");
        other_service.service = ServiceKey::new("shop", "api");
        let port = join_one(f, &[other_namespace, ours, other_service]);
        assert_eq!(addrs(&port), vec![("10.1.0.1:8080".into(), String::new())]);
    }

    #[test]
    fn slices_of_one_service_merge_sorted_by_address() {
        let f = front("clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]");
        let a = view_in(
            "shop",
            "web-a",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.10], targetRef: {name: p10}}, {addresses: [10.1.0.2], targetRef: {name: p2}}]",
        );
        let b = view_in(
            "shop",
            "web-b",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.9], targetRef: {name: p9}}, {addresses: [9.9.9.9], targetRef: {name: p99}}]",
        );
        let port = join_one(f, &[a, b]);
        assert_eq!(
            addrs(&port),
            [
                ("9.9.9.9:8080", "p99"),
                ("10.1.0.2:8080", "p2"),
                ("10.1.0.9:8080", "p9"),
                ("10.1.0.10:8080", "p10")
            ]
            .map(|(a, p)| (a.to_string(), p.to_string()))
            .to_vec()
        );
    }

    #[test]
    fn duplicate_endpoints_count_once_and_the_ready_copy_wins() {
        let f = front("clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]");
        let ready = view_in(
            "shop",
            "web-new",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1], conditions: {ready: true}, targetRef: {name: new}}, \
              {addresses: [10.1.0.2], conditions: {ready: true}, targetRef: {name: both}}]",
        );
        let not_ready = view_in(
            "shop",
            "web-old",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1], conditions: {ready: false, serving: false}, targetRef: {name: old}}, \
              {addresses: [10.1.0.2], conditions: {ready: true}, targetRef: {name: both}}]",
        );
        for slices in [[ready.clone(), not_ready.clone()], [not_ready, ready]] {
            let port = join_one(f.clone(), &slices);
            assert_eq!(port.endpoints.len(), 2, "{:?}", port.endpoints);
            assert_eq!(&*port.endpoints[0].pod, "new");
            assert!(port.endpoints[0].ready && port.endpoints[0].serving);
            assert_eq!(&*port.endpoints[1].pod, "both");
        }
    }

    #[test]
    fn target_port_resolution() {
        // (service port, slice ports, expected endpoint port)
        let cases = [
            // The controller names slice ports after the Service port.
            (
                "{name: http, port: 80, targetPort: 8080}",
                "[{name: metrics, port: 9090}, {name: http, port: 8080}]",
                Some(8080),
            ),
            (
                "{name: http, port: 80, targetPort: web}",
                "[{name: http, port: 3000}]",
                Some(3000),
            ),
            // Unnamed Service port, unnamed slice port.
            ("{port: 80, targetPort: 8080}", "[{port: 8080}]", Some(8080)),
            // A named targetPort matching a slice port's name.
            (
                "{name: http, port: 80, targetPort: web}",
                "[{name: other, port: 1}, {name: web, port: 3000}]",
                Some(3000),
            ),
            // A numeric targetPort matching a slice port's number.
            (
                "{name: http, port: 80, targetPort: 8080}",
                "[{name: other, port: 1}, {name: x, port: 8080}]",
                Some(8080),
            ),
            // No targetPort: the Service port's own number.
            ("{name: http, port: 80}", "[{name: x, port: 80}]", Some(80)),
            // Nothing matches: no endpoints.
            (
                "{name: http, port: 80, targetPort: 8080}",
                "[{name: admin, port: 9000}]",
                None,
            ),
            (
                "{name: http, port: 80, targetPort: web}",
                "[{name: admin, port: 3000}]",
                None,
            ),
            ("{name: http, port: 80}", "[]", None),
            // A UDP slice port of the same name does not serve a TCP Service port.
            (
                "{name: http, port: 80, targetPort: 8080}",
                "[{name: http, port: 8080, protocol: UDP}]",
                None,
            ),
        ];
        for (service_port, slice_ports, expected) in cases {
            let f = front(&format!("clusterIP: 10.96.0.10, ports: [{service_port}]"));
            let s = view(slice_ports, "[{addresses: [10.1.0.1]}]");
            let port = join_one(f, &[s]);
            let got: Vec<u16> = port.endpoints.iter().map(|e| e.addr.port()).collect();
            assert_eq!(
                got,
                expected.into_iter().collect::<Vec<_>>(),
                "{service_port} / {slice_ports}"
            );
        }
    }

    #[test]
    fn each_service_port_finds_its_own_slice_port() {
        let f = front(
            "clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: metrics, port: 9090}]",
        );
        let s = view(
            "[{name: metrics, port: 9100}, {name: http, port: 8080}]",
            "[{addresses: [10.1.0.1]}]",
        );
        let (table, _) = join(&[f], &[s], &PodLabels::new(), &Scope::default());
        let ports = &table.get(&key()).unwrap().ports;
        assert_eq!(ports[0].endpoints[0].addr.to_string(), "10.1.0.1:8080");
        assert_eq!(ports[1].endpoints[0].addr.to_string(), "10.1.0.1:9100");
    }

    #[test]
    fn a_udp_port_finds_the_slice_port_of_its_protocol() {
        // As CoreDNS publishes itself: UDP 53 and TCP 53, and a metrics port.
        let f = front(
            "clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, \
             {name: dns-tcp, port: 53, protocol: TCP}, {name: metrics, port: 9153, targetPort: 9153, protocol: UDP}]",
        );
        let s = view(
            "[{name: dns-tcp, port: 5353, protocol: TCP}, {name: dns, port: 53, protocol: UDP}, \
              {name: metrics, port: 9153, protocol: TCP}]",
            "[{addresses: [10.1.0.1]}]",
        );
        let (table, _) = join(&[f], &[s], &PodLabels::new(), &Scope::default());
        let ports = &table.get(&key()).unwrap().ports;
        let found: Vec<(Protocol, Vec<String>)> = ports
            .iter()
            .map(|p| {
                (
                    p.protocol,
                    p.endpoints.iter().map(|e| e.addr.to_string()).collect(),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (Protocol::Udp, vec!["10.1.0.1:53".to_string()]),
                (Protocol::Tcp, vec!["10.1.0.1:5353".to_string()]),
                // Only a TCP slice port has the number: the UDP port has no endpoint.
                (Protocol::Udp, vec![]),
            ]
        );
    }

    #[test]
    fn joined_service_carries_the_front() {
        let f = front_with(
            "",
            "type: LoadBalancer, clusterIP: 10.96.0.10, externalIPs: [192.0.2.1], externalTrafficPolicy: Local, \
             sessionAffinity: ClientIP, ports: [{name: http, port: 80, nodePort: 30080}]",
        );
        let s = view(
            "[{name: http, port: 8080}]",
            "[{addresses: [10.1.0.1], nodeName: n1, zone: z1, targetRef: {name: web-a}}]",
        );
        let (table, _) = join(&[f], &[s], &PodLabels::new(), &Scope::default());
        let svc = table.get(&key()).unwrap();
        assert_eq!(
            svc,
            &Service {
                key: key(),
                cluster_ips: vec![ip("10.96.0.10")],
                external_ips: vec![ip("192.0.2.1")],
                load_balancer_ips: vec![],
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    node_port: Some(30080),
                    endpoints: vec![Endpoint {
                        addr: PodAddr("10.1.0.1:8080".parse().unwrap()),
                        pod: "web-a".into(),
                        placement: Arc::new(Placement {
                            node: Some("n1".into()),
                            zone: Some("z1".into()),
                            zone_hints: Box::default(),
                        }),
                        ready: true,
                        serving: true,
                        terminating: false,
                        weight: 1,
                    }],
                }],
                balancing: Balancing {
                    algorithm: Algorithm::RoundRobin,
                    affinity: Some(DEFAULT_AFFINITY_TIMEOUT),
                },
                external_traffic_local: true,
                internal_traffic_local: false,
                prefer_close: false,
                health_check_node_port: None,
                load_balancer_source_ranges: Vec::new(),
                source: ClientSource::default(),
            }
        );
    }

    // ---- ServicePort::eligible ----

    fn endpoint(last: u8, ready: bool, serving: bool, terminating: bool, weight: u32) -> Endpoint {
        Endpoint {
            addr: PodAddr(SocketAddr::new(IpAddr::from([10, 1, 0, last]), 8080)),
            pod: format!("p{last}").into(),
            placement: Arc::new(Placement {
                node: None,
                zone: None,
                zone_hints: Box::default(),
            }),
            ready,
            serving,
            terminating,
            weight,
        }
    }

    fn eligible(endpoints: Vec<Endpoint>) -> Vec<String> {
        let port = ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            endpoints,
        };
        port.eligible().iter().map(|e| e.pod.to_string()).collect()
    }

    #[test]
    fn eligible_endpoints() {
        // Ready ones only, when there are any.
        assert_eq!(
            eligible(vec![
                endpoint(1, true, true, false, 1),
                endpoint(2, false, true, true, 1),
                endpoint(3, false, false, false, 1),
                endpoint(4, true, true, false, 2),
            ]),
            ["p1", "p4"]
        );
        // No ready one: those serving while terminating.
        assert_eq!(
            eligible(vec![
                endpoint(1, false, true, true, 1),
                endpoint(2, false, false, true, 1),
                endpoint(3, false, true, false, 1),
                endpoint(4, false, false, false, 1),
            ]),
            ["p1"]
        );
        // A terminating endpoint that no longer serves never takes a connection.
        assert!(eligible(vec![endpoint(1, false, false, true, 1)]).is_empty());
        // Weight 0 drains, in both tiers.
        assert_eq!(
            eligible(vec![
                endpoint(1, true, true, false, 0),
                endpoint(2, true, true, false, 1)
            ]),
            ["p2"]
        );
        assert_eq!(
            eligible(vec![
                endpoint(1, false, true, true, 0),
                endpoint(2, false, true, true, 3)
            ]),
            ["p2"]
        );
        assert!(eligible(vec![]).is_empty());
    }

    // ---- Ownership ----

    #[test]
    fn service_proxy_name_label_decides_ownership() {
        let plain = front("clusterIP: 10.96.0.10, ports: [{port: 80}]");
        let mut ours = front_with(
            ", labels: {service.kubernetes.io/service-proxy-name: carousel}",
            "clusterIP: 10.96.0.11, ports: [{port: 80}]",
        );
        assert_eq!(ours.proxy_name.as_deref(), Some("carousel"));
        ours.key = ServiceKey::new("shop", "ours");
        let mut theirs = front_with(
            ", labels: {service.kubernetes.io/service-proxy-name: other-proxy}",
            "clusterIP: 10.96.0.12, ports: [{port: 80}]",
        );
        theirs.key = ServiceKey::new("shop", "theirs");
        let services = [plain, ours, theirs];
        let names = |scope: Scope| -> Vec<String> {
            let (table, _) = join(&services, &[], &PodLabels::new(), &scope);
            table.services.keys().map(|k| k.name.to_string()).collect()
        };
        assert_eq!(names(Scope::default()), ["web"]);
        assert_eq!(
            names(Scope {
                proxy_name: Some("carousel".into())
            }),
            ["ours"]
        );
        assert_eq!(
            names(Scope {
                proxy_name: Some("other-proxy".into())
            }),
            ["theirs"]
        );
        assert!(names(Scope {
            proxy_name: Some("nobody".into())
        })
        .is_empty());
    }

    #[test]
    fn warnings_come_only_from_services_in_scope() {
        let bad = ", annotations: {carousel.dev/load-balancer: nope}";
        let plain = front_with(bad, "clusterIP: 10.96.0.10, ports: [{port: 80}]");
        let mut foreign = front_with(
            &format!("{bad}, labels: {{service.kubernetes.io/service-proxy-name: other}}"),
            "clusterIP: 10.96.0.11, ports: [{port: 80}]",
        );
        foreign.key = ServiceKey::new("shop", "foreign");
        let (table, warnings) = join(&[plain, foreign], &[], &PodLabels::new(), &Scope::default());
        assert_eq!(table.len(), 1);
        assert_eq!(warnings.len(), 1);
        assert!(
            matches!(&warnings[0], Warning::BadAnnotation { service, .. } if service == &key())
        );
    }

    #[test]
    fn add_pod_records_labels_by_namespace_and_name() {
        let mut pods = PodLabels::new();
        let meta: ObjectMeta =
            serde_yaml::from_str("{name: web-a, labels: {version: custom}}").unwrap();
        add_pod(&mut pods, &meta).unwrap();
        let meta: ObjectMeta = serde_yaml::from_str("{name: web-b, namespace: shop}").unwrap();
        add_pod(&mut pods, &meta).unwrap();
        assert_eq!(
            pods.get(&("default".to_string(), "web-a".to_string())),
            Some(&BTreeMap::from([(
                "version".to_string(),
                "custom".to_string()
            )]))
        );
        assert_eq!(
            pods.get(&("shop".to_string(), "web-b".to_string())),
            Some(&BTreeMap::new())
        );
        let meta: ObjectMeta = serde_yaml::from_str("{namespace: shop}").unwrap();
        assert_eq!(
            add_pod(&mut pods, &meta).unwrap_err().field,
            "metadata.name"
        );
    }

    #[test]
    fn traffic_policies_and_topology_are_read() {
        let f = front("clusterIP: 10.96.0.10, internalTrafficPolicy: Local, trafficDistribution: PreferClose, ports: [{port: 80}]");
        assert!(f.internal_traffic_local && f.prefer_close && !f.external_traffic_local);
        let f = front_with(
            ", annotations: {service.kubernetes.io/topology-mode: Auto}",
            "clusterIP: 10.96.0.10, ports: [{port: 80}]",
        );
        assert!(f.prefer_close && !f.internal_traffic_local);
        let f = front("clusterIP: 10.96.0.10, ports: [{port: 80}]");
        assert!(!f.prefer_close && !f.internal_traffic_local);
    }

    #[test]
    fn zone_hints_are_read_from_the_slice() {
        let s = view(
            "[{port: 80}]",
            "[{addresses: [10.1.0.1], zone: a, hints: {forZones: [{name: a}, {name: b}]}}, {addresses: [10.1.0.2]}]",
        );
        let hints: Vec<&str> = s.endpoints[0]
            .placement
            .zone_hints
            .iter()
            .map(|z| &**z)
            .collect();
        assert_eq!(hints, ["a", "b"]);
        assert!(s.endpoints[1].placement.zone_hints.is_empty());
    }
}
