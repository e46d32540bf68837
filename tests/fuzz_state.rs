//! Bad input, fuzzed: state files and Kubernetes objects with missing, wrong-typed,
//! out-of-range and random fields, truncated documents and arbitrary annotations; a
//! Service with 10 000 slices; and a corpus of nasty files with their expected outcome.
//!
//! The properties: `file::parse` never panics; a refusal names the document and, for an
//! object, its kind, its name and the field at fault, on one line; an accepted file gives
//! a consistent table (ports are ports; endpoints sorted, each address once); a valid
//! file is accepted and joined by kube-proxy's rules; a bad annotation warns and never
//! refuses its Service; a field no Kubernetes type has warns, naming its path, and
//! changes nothing else.
//!
//! 256 cases a property by default (a few seconds in a debug build); more by hand with
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz_state` (nextest would stop a
//! test after three minutes).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use carousel::discovery::convert::{
    self, Scope, Warning, ANNOTATION_LOAD_BALANCER, ANNOTATION_WEIGHTS, LABEL_SERVICE_NAME,
};
use carousel::discovery::file::{self, StateFileError};
use carousel::model::{Algorithm, ServiceKey, ServiceTable};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---- what must hold of every outcome ----

/// Checks one outcome of `file::parse`; returns it for further checks.
fn parse_checked(text: &str) -> Result<file::Loaded, StateFileError> {
    let outcome = file::parse(text, &Scope::default());
    match &outcome {
        Ok(loaded) => check_table(&loaded.table),
        Err(error) => check_refusal(error),
    }
    outcome
}

/// A refusal says where and what: `document N` first, and for an object its kind, its
/// name and a field path, all on one line (it is logged as one).
fn check_refusal(error: &StateFileError) {
    let message = error.to_string();
    assert!(
        !message.contains('\n'),
        "a refusal on two lines: {message:?}"
    );
    let number = message
        .strip_prefix("document ")
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    assert!(
        matches!(number, Some(n) if n >= 1),
        "a refusal that names no document: {message:?}"
    );
    match error {
        StateFileError::Yaml { document, .. } => assert!(*document >= 1),
        StateFileError::NotAnObject { at, message: what } => {
            assert!(at.document >= 1 && !what.is_empty(), "{message:?}");
        }
        StateFileError::Duplicate { at, first, .. } => {
            assert!(first.document >= 1 && (first.document, first.item) < (at.document, at.item));
        }
        StateFileError::Invalid {
            at,
            kind,
            name,
            error,
        } => {
            assert!(at.document >= 1);
            assert!(!kind.trim().is_empty(), "no kind: {message:?}");
            assert!(!name.trim().is_empty(), "no name: {message:?}");
            // serde_path_to_error writes `.` for the document itself: that names no field.
            assert!(
                !error.field.trim().is_empty() && error.field != ".",
                "no field path: {message:?}"
            );
            assert!(
                !error.message.trim().is_empty(),
                "says nothing: {message:?}"
            );
            assert!(
                message.contains(&format!("({kind} {name}): {}: ", error.field)),
                "kind, name and field are not all in {message:?}"
            );
        }
        StateFileError::Read { .. }
        | StateFileError::NotAFile { .. }
        | StateFileError::TooLarge { .. }
        | StateFileError::Empty { .. } => panic!("parse reads no file, yet: {message}"),
    }
}

/// What the data path relies on: ports are ports, each number once a Service, and each
/// port's endpoints are sorted by address with every address once.
fn check_table(table: &ServiceTable) {
    for (key, svc) in &table.services {
        assert_eq!(key, &svc.key);
        if let Some(timeout) = svc.balancing.affinity {
            assert!(
                (1..=86_400).contains(&timeout.as_secs()),
                "{key}: {timeout:?}"
            );
        }
        let mut numbers: Vec<_> = svc.ports.iter().map(|p| (p.protocol, p.port)).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(
            numbers.len(),
            svc.ports.len(),
            "{key}: a port number twice in one protocol"
        );
        for port in &svc.ports {
            assert_ne!(port.port, 0, "{key}: port 0");
            assert_ne!(port.node_port, Some(0), "{key}: node port 0");
            for pair in port.endpoints.windows(2) {
                assert!(
                    pair[0].addr < pair[1].addr,
                    "{key} port {}: endpoints not sorted and unique: {} then {}",
                    port.port,
                    pair[0].addr,
                    pair[1].addr
                );
            }
            for e in &port.endpoints {
                assert_ne!(e.addr.port(), 0, "{key}: endpoint {} on port 0", e.addr);
                assert!(e.weight <= 1_000_000, "{key}: weight {}", e.weight);
            }
        }
    }
}

// ---- generators: Kubernetes objects, mostly well formed, with bad parts ----

/// Random text: any Unicode, control characters included.
fn wild_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
        "[0-9]{1,6}",
    ]
}

/// A value of the wrong kind for wherever it lands: numbers as strings, lists where maps
/// belong, nulls, floats, deep little trees.
fn junk() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        wild_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}|\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field that is usually absent; when present, as `field`.
fn sometimes<S>(good: S) -> impl Strategy<Value = Option<Value>>
where
    S: Strategy<Value = Value> + 'static,
{
    prop_oneof![2 => Just(None), 1 => field(good)]
}

fn ip_list() -> impl Strategy<Value = Value> {
    prop::collection::vec(ip_text(), 0..3).prop_map(Value::Array)
}

/// A field: mostly `good`, sometimes missing (None), sometimes junk.
fn field<S>(good: S) -> impl Strategy<Value = Option<Value>>
where
    S: Strategy<Value = Value> + 'static,
{
    prop_oneof![
        8 => good.prop_map(Some),
        1 => Just(None),
        1 => junk().prop_map(Some),
    ]
}

/// An object of the fields that are present.
fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect::<Map<String, Value>>(),
    )
}

/// Names from a small pool, so that slices and Services find each other, and odd ones.
fn name() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(vec!["web", "api", "db"]).prop_map(Value::from),
        1 => Just(json!("")),
        1 => wild_text().prop_map(Value::from),
    ]
}

fn namespace() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => Just(json!("shop")),
        1 => Just(json!("other")),
        1 => wild_text().prop_map(Value::from),
    ]
}

/// An IP address as text: a small pool of each family (so that addresses repeat across
/// slices), any address, and things that are not addresses.
fn ip_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u8..6).prop_map(|i| json!(format!("10.0.0.{i}"))),
        3 => (0u16..6).prop_map(|i| json!(format!("fd00::{i:x}"))),
        2 => any::<[u8; 4]>().prop_map(|o| json!(Ipv4Addr::from(o).to_string())),
        2 => any::<[u16; 8]>().prop_map(|s| json!(Ipv6Addr::from(s).to_string())),
        1 => prop::sample::select(vec![
            "", "None", "10.0.0.256", "10.0.0", "010.0.0.1", "::ffff:10.0.0.1", "fe80::1%eth0",
            "fd00::zz", "example.com", "10.0.0.1/32", " 10.0.0.1", "0.0.0.0", "::",
        ])
        .prop_map(Value::from),
        1 => wild_text().prop_map(Value::from),
    ]
}

/// A port number: the common ones, the edges, out of range, and not a number.
fn port() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(vec![80i64, 8080, 443, 9090]).prop_map(Value::from),
        2 => (1i64..=65_535).prop_map(Value::from),
        1 => prop::sample::select(vec![
            0i64, 65_535, 65_536, -1, -80, i64::from(i32::MAX), i64::from(i32::MAX) + 1,
            i64::from(i32::MIN), i64::MIN, i64::MAX,
        ])
        .prop_map(Value::from),
        1 => prop::sample::select(vec!["80", "http", "", "0x50", "80.0"]).prop_map(Value::from),
        1 => Just(json!(80.5)),
    ]
}

fn port_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(vec!["http", "metrics"]).prop_map(Value::from),
        1 => Just(json!("")),
        1 => wild_text().prop_map(Value::from),
    ]
}

fn protocol() -> impl Strategy<Value = Value> {
    prop::sample::select(vec!["TCP", "TCP", "TCP", "UDP", "SCTP", "tcp", "QUIC", ""])
        .prop_map(Value::from)
}

/// An annotation value: the grammar's pieces in any order, any text, a huge one.
fn annotation_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z =:,0-9+.-]{0,40}",
        2 => prop::sample::select(vec![
            "round-robin", " round-robin ", "ROUND-ROBIN", "maglev", "least-connections",
            "weighted-round-robin", "power-of-two-choices", "random",
            "version=custom:3,version=original:1", "a=b:1000001", "a=b:-1", "a=b:99999999999",
            "a=b:+3", "=:", ",,,", "a=b=c:1", "a:b=1", ":", "=",
        ])
        .prop_map(String::from),
        2 => wild_text(),
        1 => (1usize..20_000).prop_map(|n| "version=custom:3,".repeat(n / 16 + 1)),
    ]
}

fn annotations() -> impl Strategy<Value = Value> {
    (
        prop::option::of(annotation_text()),
        prop::option::of(annotation_text()),
    )
        .prop_map(|(lb, weights)| {
            let mut a = Map::new();
            if let Some(lb) = lb {
                a.insert(ANNOTATION_LOAD_BALANCER.into(), lb.into());
            }
            if let Some(w) = weights {
                a.insert(ANNOTATION_WEIGHTS.into(), w.into());
            }
            Value::Object(a)
        })
}

fn service_port() -> impl Strategy<Value = Value> {
    (
        field(port_name()),
        field(port()),
        field(protocol()),
        field(prop_oneof![port(), port_name()]),
        prop_oneof![3 => Just(None), 1 => field(port())],
    )
        .prop_map(|(name, port, protocol, target, node_port)| {
            object(vec![
                ("name", name),
                ("port", port),
                ("protocol", protocol),
                ("targetPort", target),
                ("nodePort", node_port),
            ])
        })
}

fn service() -> impl Strategy<Value = Value> {
    let meta = (field(name()), field(namespace()), field(annotations()));
    let spec = (
        field(
            prop::sample::select(vec![
                "ClusterIP",
                "NodePort",
                "LoadBalancer",
                "ExternalName",
                "Headless",
            ])
            .prop_map(Value::from),
        ),
        field(ip_text()),
        sometimes(ip_list()),
        sometimes(ip_list()),
        field(prop::collection::vec(service_port(), 0..4).prop_map(Value::Array)),
        sometimes(prop::sample::select(vec!["ClientIP", "None", "Sticky"]).prop_map(Value::from)),
        sometimes(prop_oneof![
            port(),
            Just(json!(86_400)),
            Just(json!(86_401))
        ]),
    );
    let status = sometimes(ip_list().prop_map(|ips| {
        let ingress: Vec<Value> = ips
            .as_array()
            .into_iter()
            .flatten()
            .map(|ip| json!({ "ip": ip }))
            .collect();
        json!({"loadBalancer": {"ingress": ingress}})
    }));
    (meta, spec, status).prop_map(
        |(
            (name, ns, annotations),
            (kind, cluster_ip, cluster_ips, external_ips, ports, affinity, timeout),
            status,
        )| {
            let affinity_config = timeout.map(|t| json!({"clientIP": {"timeoutSeconds": t}}));
            object(vec![
                ("apiVersion", Some(json!("v1"))),
                ("kind", Some(json!("Service"))),
                (
                    "metadata",
                    Some(object(vec![
                        ("name", name),
                        ("namespace", ns),
                        ("annotations", annotations),
                    ])),
                ),
                (
                    "spec",
                    Some(object(vec![
                        ("type", kind),
                        ("clusterIP", cluster_ip),
                        ("clusterIPs", cluster_ips),
                        ("externalIPs", external_ips),
                        ("ports", ports),
                        ("sessionAffinity", affinity),
                        ("sessionAffinityConfig", affinity_config),
                    ])),
                ),
                ("status", status),
            ])
        },
    )
}

fn condition() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => any::<bool>().prop_map(|b| Some(json!(b))),
        1 => Just(None),
        1 => prop::sample::select(vec!["true", "yes", "maybe", ""]).prop_map(|s| Some(json!(s))),
    ]
}

fn endpoint() -> impl Strategy<Value = Value> {
    (
        field(prop::collection::vec(ip_text(), 0..3).prop_map(Value::Array)),
        (condition(), condition(), condition()),
        field(name().prop_map(|n| json!({"kind": "Pod", "name": n, "namespace": "shop"}))),
        prop::option::of(name()),
    )
        .prop_map(|(addresses, (ready, serving, terminating), target, node)| {
            object(vec![
                ("addresses", addresses),
                (
                    "conditions",
                    Some(object(vec![
                        ("ready", ready),
                        ("serving", serving),
                        ("terminating", terminating),
                    ])),
                ),
                ("targetRef", target),
                ("nodeName", node),
            ])
        })
}

fn slice_port() -> impl Strategy<Value = Value> {
    (field(port_name()), field(port()), field(protocol())).prop_map(|(name, port, protocol)| {
        object(vec![("name", name), ("port", port), ("protocol", protocol)])
    })
}

fn endpoint_slice() -> impl Strategy<Value = Value> {
    (
        field(name()),
        field(namespace()),
        field(name().prop_map(|n| json!({ LABEL_SERVICE_NAME: n }))),
        field(
            prop::sample::select(vec!["IPv4", "IPv4", "IPv6", "FQDN", "ipv4", "IPv5", ""])
                .prop_map(Value::from),
        ),
        // Duplicate ports come from the small pools of names and numbers.
        field(prop::collection::vec(slice_port(), 0..4).prop_map(Value::Array)),
        // Empty, small and huge slices.
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(json!([]))),
            8 => prop::collection::vec(endpoint(), 1..8).prop_map(|e| Some(Value::Array(e))),
            1 => prop::collection::vec(endpoint(), 100..300).prop_map(|e| Some(Value::Array(e))),
            1 => junk().prop_map(Some),
        ],
    )
        .prop_map(|(name, ns, labels, address_type, ports, endpoints)| {
            object(vec![
                ("apiVersion", Some(json!("discovery.k8s.io/v1"))),
                ("kind", Some(json!("EndpointSlice"))),
                (
                    "metadata",
                    Some(object(vec![
                        ("name", name),
                        ("namespace", ns),
                        ("labels", labels),
                    ])),
                ),
                ("addressType", address_type),
                ("ports", ports),
                ("endpoints", endpoints),
            ])
        })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        field(name()),
        field(
            prop::collection::btree_map(
                prop::sample::select(vec!["version", "track"]),
                prop::sample::select(vec!["custom", "original", "canary"]),
                0..3,
            )
            .prop_map(|m| json!(m)),
        ),
    )
        .prop_map(|(name, labels)| {
            let metadata = object(vec![
                ("name", name),
                ("namespace", Some(json!("shop"))),
                ("labels", labels),
            ]);
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
                   "status": {"podIP": "10.0.0.1"}})
        })
}

/// One document: an object carousel reads, one it ignores, one that is not an object,
/// or a `kind: List` of a few of them.
fn document() -> impl Strategy<Value = Value> {
    let single = prop_oneof![
        4 => service(),
        4 => endpoint_slice(),
        1 => pod(),
        1 => field(name()).prop_map(|n| json!({"apiVersion": "v1", "kind": "Node",
                                                "metadata": object(vec![("name", n)])})),
        1 => (wild_text(), wild_text()).prop_map(|(a, k)| json!({"apiVersion": a, "kind": k})),
        1 => prop::sample::select(vec!["apps/v1 Deployment", "v1 ConfigMap", "v2 Service", "v1 "])
            .prop_map(|t| {
                let (api, kind) = t.split_once(' ').unwrap();
                json!({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}})
            }),
        1 => junk(),
    ]
    .boxed();
    prop_oneof![
        6 => single.clone(),
        1 => prop::collection::vec(single, 0..4)
            .prop_map(|items| json!({"apiVersion": "v1", "kind": "List", "items": items})),
    ]
}

/// A change to the tree of a document: some node replaced by junk, or a key or an item
/// removed. The node is the `at`-th in pre-order, modulo the number of nodes.
#[derive(Clone, Debug)]
enum Mutation {
    Replace { at: usize, with: Value },
    Remove { at: usize, which: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), junk()).prop_map(|(at, with)| Mutation::Replace { at, with }),
        (any::<usize>(), any::<usize>()).prop_map(|(at, which)| Mutation::Remove { at, which }),
    ]
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Calls `f` on the `n`-th node in pre-order; true once it did.
fn visit_nth(v: &mut Value, n: &mut usize, f: &mut dyn FnMut(&mut Value)) -> bool {
    if *n == 0 {
        f(v);
        return true;
    }
    *n -= 1;
    match v {
        Value::Array(items) => items.iter_mut().any(|x| visit_nth(x, n, f)),
        Value::Object(map) => map.values_mut().any(|x| visit_nth(x, n, f)),
        _ => false,
    }
}

fn mutate(doc: &mut Value, m: &Mutation) {
    let nodes = count_nodes(doc);
    match m {
        Mutation::Replace { at, with } => {
            visit_nth(doc, &mut (at % nodes), &mut |v| *v = with.clone());
        }
        Mutation::Remove { at, which } => {
            visit_nth(doc, &mut (at % nodes), &mut |v| match v {
                Value::Object(map) if !map.is_empty() => {
                    let key = map.keys().nth(which % map.len()).unwrap().clone();
                    map.remove(&key);
                }
                Value::Array(items) if !items.is_empty() => {
                    items.remove(which % items.len());
                }
                other => *other = Value::Null,
            });
        }
    }
}

/// A change to the text: cut short (a file caught half-written) or random text spliced in.
#[derive(Clone, Debug)]
enum TextCut {
    None,
    Truncate { per_mille: usize },
    Insert { per_mille: usize, text: String },
}

fn text_cut() -> impl Strategy<Value = TextCut> {
    prop_oneof![
        6 => Just(TextCut::None),
        2 => (0usize..1000).prop_map(|per_mille| TextCut::Truncate { per_mille }),
        1 => (0usize..1000, prop_oneof![
                wild_text(),
                prop::sample::select(vec!["\n---\n", ": [", "\t", "&a", "*a"])
                    .prop_map(String::from),
            ])
            .prop_map(|(per_mille, text)| TextCut::Insert { per_mille, text }),
    ]
}

/// The byte offset `per_mille`/1000 into `text`, moved back to a character boundary.
fn boundary(text: &str, per_mille: usize) -> usize {
    let mut at = text.len() * per_mille / 1000;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A state file: the documents, mutated, rendered as multi-document YAML, then cut.
fn state_file() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(document(), 0..6),
        prop::collection::vec(mutation(), 0..3),
        text_cut(),
    )
        .prop_map(|(mut docs, mutations, cut)| {
            for (i, m) in mutations.iter().enumerate() {
                if !docs.is_empty() {
                    let n = docs.len();
                    mutate(&mut docs[i % n], m);
                }
            }
            let mut text: String = docs
                .iter()
                .map(|d| {
                    format!(
                        "---\n{}",
                        serde_yaml::to_string(d).expect("JSON renders as YAML")
                    )
                })
                .collect();
            match cut {
                TextCut::None => {}
                TextCut::Truncate { per_mille } => text.truncate(boundary(&text, per_mille)),
                TextCut::Insert {
                    per_mille,
                    text: extra,
                } => text.insert_str(boundary(&text, per_mille), &extra),
            }
            text
        })
}

// ---- generators: tidy files, valid throughout ----

// The wild files above are refused nine times in ten, and the few accepted have no
// endpoints: tidy files are valid by carousel's rules, so that the table built from them
// is checked too, against the join rules, with duplicate ports, repeated addresses,
// both families, empty and huge slices and slices of unknown Services.

const TIDY_SERVICES: [&str; 3] = ["web", "api", "db"];

fn tidy_service(name: &'static str) -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            (0u8..4).prop_map(|i| format!("10.96.0.{i}")),
            (0u8..4).prop_map(|i| format!("fd00:96::{i}")),
        ],
        prop::sample::subsequence(
            vec![("http", 80), ("metrics", 9090), ("admin", 8443)],
            1..=3,
        ),
        any::<bool>(),
        prop::option::of(annotations()),
    )
        .prop_map(move |(ip, ports, named_target, annotations)| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(port_name, port)| {
                    if named_target {
                        json!({"name": port_name, "port": port, "targetPort": port_name})
                    } else {
                        json!({"name": port_name, "port": port})
                    }
                })
                .collect();
            let mut meta = json!({"name": name, "namespace": "shop"});
            if let Some(a) = annotations {
                meta["annotations"] = a;
            }
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta,
                   "spec": {"clusterIP": ip, "ports": ports}})
        })
}

fn tidy_endpoint(ipv6: bool) -> impl Strategy<Value = Value> {
    let address = move |i: u8| {
        if ipv6 {
            format!("fd00::{i:x}")
        } else {
            format!("10.0.0.{i}")
        }
    };
    (
        prop::collection::vec((0u8..20).prop_map(address), 1..3),
        (condition(), condition(), condition()),
        prop::option::of(prop::sample::select(vec!["pod-a", "pod-b", "pod-c"])),
    )
        .prop_map(|(addresses, (ready, serving, terminating), pod)| {
            let mut e = json!({"addresses": addresses});
            let conditions: Map<String, Value> = [
                ("ready", ready),
                ("serving", serving),
                ("terminating", terminating),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.filter(Value::is_boolean)?)))
            .collect();
            e["conditions"] = Value::Object(conditions);
            if let Some(pod) = pod {
                e["targetRef"] = json!({"kind": "Pod", "name": pod, "namespace": "shop"});
            }
            e
        })
}

fn tidy_slice(i: usize) -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["web", "api", "db", "ghost"]),
        any::<bool>(),
        // Duplicate names and numbers on purpose.
        prop::collection::vec(
            (
                prop::sample::select(vec!["http", "metrics", "other"]),
                prop::sample::select(vec![8080, 9090, 1, 65_535]),
            ),
            0..4,
        ),
    )
        .prop_flat_map(move |(service, ipv6, ports)| {
            let endpoints = prop_oneof![
                1 => Just(Vec::new()),
                8 => prop::collection::vec(tidy_endpoint(ipv6), 1..8),
                1 => prop::collection::vec(tidy_endpoint(ipv6), 100..300),
            ];
            endpoints.prop_map(move |endpoints| {
                let ports: Vec<Value> = ports
                    .iter()
                    .map(|(n, p)| json!({"name": n, "port": p}))
                    .collect();
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{service}-{i}"), "namespace": "shop",
                                 "labels": {LABEL_SERVICE_NAME: service}},
                    "addressType": if ipv6 { "IPv6" } else { "IPv4" },
                    "ports": ports,
                    "endpoints": endpoints,
                })
            })
        })
}

fn tidy_pod() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["pod-a", "pod-b", "pod-c"]),
        prop::sample::select(vec!["custom", "original", "canary"]),
    )
        .prop_map(|(name, version)| {
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "shop", "labels": {"version": version}}})
        })
}

/// A valid state file: Services, then slices, then pods, as JSON documents.
fn tidy_file() -> impl Strategy<Value = Vec<Value>> {
    (
        prop::sample::subsequence(TIDY_SERVICES.to_vec(), 1..=3),
        0usize..8,
    )
        .prop_flat_map(|(names, slices)| {
            let services: Vec<_> = names.into_iter().map(tidy_service).collect();
            let slices: Vec<_> = (0..slices).map(tidy_slice).collect();
            (services, slices, prop::collection::vec(tidy_pod(), 0..3))
        })
        .prop_map(|(services, slices, pods)| {
            services.into_iter().chain(slices).chain(pods).collect()
        })
}

fn render(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| {
            format!(
                "---\n{}",
                serde_yaml::to_string(d).expect("JSON renders as YAML")
            )
        })
        .collect()
}

fn slices_of<'a>(docs: &'a [Value], service: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| {
        d["kind"] == "EndpointSlice" && d["metadata"]["labels"][LABEL_SERVICE_NAME] == service
    })
}

/// The join rules, checked from the documents themselves: every endpoint comes from a
/// slice of its Service, on a port of that slice; and a slice port named like the
/// Service port brings every endpoint of that slice (the first address of each).
fn check_join(docs: &[Value], table: &ServiceTable) {
    for (key, svc) in &table.services {
        for port in &svc.ports {
            for e in &port.endpoints {
                let from_a_slice =
                    slices_of(docs, &key.name).any(|s| {
                        let ports = s["ports"].as_array().unwrap();
                        s["endpoints"].as_array().unwrap().iter().any(|ep| {
                            ep["addresses"][0].as_str().unwrap().parse() == Ok(e.addr.ip())
                        }) && ports.iter().any(|p| p["port"] == e.addr.port())
                    });
                assert!(
                    from_a_slice,
                    "{key} port {}: {} is in no slice",
                    port.port, e.addr
                );
            }
            for s in slices_of(docs, &key.name) {
                let named = s["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == port.name.as_str());
                let Some(target) = named.and_then(|p| p["port"].as_u64()) else {
                    continue;
                };
                for ep in s["endpoints"].as_array().unwrap() {
                    let ip: std::net::IpAddr =
                        ep["addresses"][0].as_str().unwrap().parse().unwrap();
                    assert!(
                        port.endpoints
                            .iter()
                            .any(|e| e.addr.ip() == ip && u64::from(e.addr.port()) == target),
                        "{key} port {}: {ip}:{target} of slice {} is missing",
                        port.port,
                        s["metadata"]["name"]
                    );
                }
            }
        }
    }
}

// ---- the properties ----

proptest! {
    // Cases come from PROPTEST_CASES when set, 256 otherwise.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn state_files_never_panic_and_refusals_say_where(text in state_file()) {
        let _ = parse_checked(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any_text()) {
        let _ = parse_checked(&text);
    }

    #[test]
    fn tidy_state_files_are_accepted_and_joined_by_the_rules(docs in tidy_file()) {
        tidy_file_is_accepted(&docs);
    }

    #[test]
    fn an_unknown_field_warns_naming_it_and_changes_nothing(
        docs in tidy_file(),
        pick in any::<prop::sample::Index>(),
        in_metadata in any::<bool>(),
    ) {
        unknown_field_in(&docs, pick.index(docs.len()), in_metadata);
    }

    #[test]
    fn converters_never_panic_and_name_a_field(doc in prop_oneof![service(), endpoint_slice()]) {
        converters_on(doc);
    }

    #[test]
    fn annotations_warn_and_never_refuse(lb in annotation_text(), weights in annotation_text()) {
        annotations_on(&lb, &weights);
    }

    #[test]
    fn parse_weights_accounts_for_every_entry(text in annotation_text()) {
        weights_account_for_every_entry(&text);
    }

    #[test]
    fn parse_weights_reads_back_what_it_is_given(rules in weight_rules()) {
        weights_read_back(&rules);
    }
}

/// Any text at all, and text made of YAML's own punctuation, so that the parser gets
/// past the first line.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<char>(), 0..200).prop_map(|c| c.into_iter().collect()),
        "[-:{}\\[\\],&*!|>'\"%@` \n\ta-z0-9#]{0,200}",
    ]
}

fn tidy_file_is_accepted(docs: &[Value]) {
    let loaded =
        parse_checked(&render(docs)).unwrap_or_else(|e| panic!("a valid file refused: {e}"));
    let services = docs.iter().filter(|d| d["kind"] == "Service").count();
    assert_eq!(loaded.table.len(), services);
    check_join(docs, &loaded.table);
}

/// A field no Kubernetes type has, added to one document of a valid file: the file is
/// still accepted with the same table, and one warning names the document and the path.
fn unknown_field_in(docs: &[Value], at: usize, in_metadata: bool) {
    let clean = parse_checked(&render(docs)).unwrap_or_else(|e| panic!("refused: {e}"));
    let mut typo = docs.to_vec();
    let (place, field) = match in_metadata {
        true => (&mut typo[at]["metadata"], "metadata.nmae"),
        false => (&mut typo[at], "nmae"),
    };
    place["nmae"] = json!("x");
    let loaded = parse_checked(&render(&typo)).unwrap_or_else(|e| panic!("refused: {e}"));
    assert_eq!(loaded.table, clean.table);
    let unknown: Vec<String> = loaded
        .warnings
        .iter()
        .filter(|w| matches!(w, Warning::UnknownField { .. }))
        .map(ToString::to_string)
        .collect();
    let doc = &docs[at];
    let object = format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap(),
        doc["metadata"]["namespace"].as_str().unwrap(),
        doc["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        unknown,
        [format!(
            "document {} ({object}): unknown field {field}, ignored",
            at + 1
        )]
    );
}

/// The object converters on their own, fed whatever deserializes into the typed objects.
fn converters_on(doc: Value) {
    if let Ok(svc) = serde_json::from_value::<core::Service>(doc.clone()) {
        if let Err(e) = convert::service(&svc) {
            assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
    if let Ok(slice) = serde_json::from_value::<discovery::EndpointSlice>(doc) {
        if let Err(e) = convert::slice(&slice, &mut carousel::discovery::names::Names::default()) {
            assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
}

/// Any text in either annotation: the Service is still proxied, with a known algorithm,
/// and a warning says which annotation was not understood.
fn annotations_on(lb: &str, weights: &str) {
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {ANNOTATION_LOAD_BALANCER: lb, ANNOTATION_WEIGHTS: weights}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
    });
    let endpoint = |ip: &str, pod: &str| {
        let target = json!({"kind": "Pod", "name": pod, "namespace": "shop"});
        json!({"addresses": [ip], "targetRef": target})
    };
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop",
                     "labels": {LABEL_SERVICE_NAME: "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
        "endpoints": [endpoint("10.0.0.1", "a"), endpoint("10.0.0.2", "b")],
    });
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "a", "namespace": "shop",
                                  "labels": {"version": "custom"}}});

    let loaded = parse_checked(&render(&[service, slice, pod]))
        .unwrap_or_else(|e| panic!("refused over an annotation: {e}"));
    let svc = loaded
        .table
        .get(&ServiceKey::new("shop", "web"))
        .expect("the Service is proxied");
    assert_eq!(svc.ports[0].endpoints.len(), 2);
    let warned = |annotation: &str| {
        loaded
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::BadAnnotation { annotation: a, .. } if *a == annotation))
    };
    if let Ok(algorithm) = lb.trim().parse::<Algorithm>() {
        assert_eq!(svc.balancing.algorithm, algorithm);
        assert!(!warned(ANNOTATION_LOAD_BALANCER));
    } else {
        assert_eq!(svc.balancing.algorithm, Algorithm::default());
        assert!(warned(ANNOTATION_LOAD_BALANCER), "{:?}", loaded.warnings);
    }
    let (_, problem) = convert::parse_weights(weights);
    assert_eq!(
        warned(ANNOTATION_WEIGHTS),
        problem.is_some(),
        "{:?}",
        loaded.warnings
    );
    // One warning an annotation at most, of a bounded length whatever the value.
    assert!(loaded.warnings.len() <= 2, "{:?}", loaded.warnings);
    for w in &loaded.warnings {
        assert!(w.is_config_error());
        let line = w.to_string();
        assert!(!line.contains('\n'), "a warning on two lines: {w}");
        assert!(
            line.len() <= 1024,
            "a warning of {} bytes: {line}",
            line.len()
        );
    }
}

/// Every non-empty entry is either a rule or counted in the one problem, never lost;
/// past the limits nothing applies and the problem says which limit.
fn weights_account_for_every_entry(text: &str) {
    let (rules, problem) = convert::parse_weights(text);
    let entries = text.split(',').filter(|e| !e.trim().is_empty()).count();
    let over = text.len() > convert::MAX_WEIGHTS_BYTES || entries > convert::MAX_WEIGHT_RULES;
    let skipped = match &problem {
        Some(p) if over => {
            assert!(rules.is_empty() && p.contains("over the limit"), "{p}");
            entries
        }
        Some(p) => p
            .split(' ')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("a problem that counts nothing: {p}")),
        None => 0,
    };
    assert_eq!(rules.len() + skipped, entries, "{problem:?}");
    assert!(
        problem.as_ref().is_none_or(|p| p.len() <= 512),
        "{problem:?}"
    );
    for r in &rules {
        assert!(!r.label.is_empty() && r.weight <= 1_000_000, "{r:?}");
    }
}

fn weight_rules() -> impl Strategy<Value = Vec<(String, String, u32)>> {
    prop::collection::vec(
        (
            "([a-z]{1,5}\\.[a-z]{2,3}/)?[a-z]([a-z0-9._-]{0,8}[a-z0-9])?",
            "[a-z0-9]{0,8}",
            0u32..=1_000_000,
        ),
        0..6,
    )
}

/// Rules written in the annotation's syntax read back as written.
fn weights_read_back(rules: &[(String, String, u32)]) {
    let text: Vec<String> = rules
        .iter()
        .map(|(l, v, w)| format!("{l}={v}:{w}"))
        .collect();
    let (parsed, problem) = convert::parse_weights(&text.join(","));
    assert_eq!(problem, None);
    let got: Vec<(String, String, u32)> = parsed
        .into_iter()
        .map(|r| (r.label, r.value, r.weight))
        .collect();
    assert_eq!(got, rules);
}

// ---- one Service with 10 000 slices ----

/// A Service with 10 000 slices (the controller's limit is 100 endpoints a slice; here
/// many small ones), every tenth repeating an address of an earlier slice, as while a
/// slice is being replaced. All of it parses, and each address is there once, in order.
#[test]
fn a_service_with_ten_thousand_slices() {
    const SLICES: u32 = 10_000;
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: http}]}\n",
    );
    // Slice i holds address i and address i+1; so 10 001 addresses in all, each of the
    // inner ones listed twice.
    let address = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    for i in 0..SLICES {
        text.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: big-{i}, namespace: shop, labels: {{kubernetes.io/service-name: big}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: ['{a}'], targetRef: {{kind: Pod, name: pod-{i}}}}}, \
                         {{addresses: ['{b}'], conditions: {{ready: false}}}}]\n",
            a = address(i),
            b = address(i + 1),
        ));
    }
    let started = std::time::Instant::now();
    let loaded = parse_checked(&text).unwrap_or_else(|e| panic!("{e}"));
    // Not an assertion: how long a debug build takes, for whoever reads the output.
    println!("parsed {SLICES} slices in {:?}", started.elapsed());

    let port = &loaded
        .table
        .get(&ServiceKey::new("shop", "big"))
        .unwrap()
        .ports[0];
    assert_eq!(port.endpoints.len(), SLICES as usize + 1);
    for (i, e) in port.endpoints.iter().enumerate() {
        assert_eq!(e.addr.to_string(), format!("{}:8080", address(i as u32)));
        // Listed ready in slice i and not ready in slice i-1: the ready copy wins.
        assert_eq!(e.ready, i < SLICES as usize, "{}", e.addr);
    }
}

// ---- the corpus ----

/// Each file in tests/fixtures/state-corpus has its expected outcome in `expected.txt`:
/// `FILE accepted`, `FILE warns TEXT | TEXT` (accepted, each TEXT in some warning) or
/// `FILE refused TEXT | TEXT` (the refusal's message holds each TEXT).
#[test]
fn the_corpus_of_nasty_files_has_the_expected_outcomes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state-corpus");
    let manifest = std::fs::read_to_string(dir.join("expected.txt")).expect("the manifest");
    let mut listed = Vec::new();
    let mut failures = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let (file, outcome, detail) = (
            parts.next().unwrap(),
            parts.next().unwrap_or_else(|| panic!("no outcome: {line}")),
            parts.next().unwrap_or("").trim(),
        );
        let wanted: Vec<&str> = detail.split(" | ").collect();
        listed.push(file.to_string());
        let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // As the watcher reads the file: bytes that are not UTF-8 are replaced, not refused.
        let text = String::from_utf8_lossy(&bytes);
        let got = parse_checked(&text);
        let ok = match (outcome, &got) {
            ("accepted", Ok(loaded)) => loaded.warnings.is_empty(),
            ("warns", Ok(loaded)) => wanted
                .iter()
                .all(|part| loaded.warnings.iter().any(|w| w.to_string().contains(part))),
            ("refused", Err(e)) => wanted.iter().all(|part| e.to_string().contains(part)),
            ("accepted" | "warns" | "refused", _) => false,
            (other, _) => panic!("{file}: unknown outcome {other:?}"),
        };
        if !ok {
            let got = match &got {
                Ok(loaded) => format!(
                    "accepted, {} service(s), warnings {:?}",
                    loaded.table.len(),
                    loaded
                        .warnings
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                ),
                Err(e) => format!("refused: {e}"),
            };
            failures.push(format!("{file}: expected {outcome} {detail:?}, got {got}"));
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    listed.sort();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        on_disk, listed,
        "every corpus file has one line in expected.txt"
    );
    assert!(listed.len() >= 20, "a corpus of {} files", listed.len());
}
