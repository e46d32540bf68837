//! The manifests under deploy/: least-privilege RBAC, a locked-down DaemonSet whose
//! arguments carousel's own parser accepts, a kubechaos example whose annotations
//! carousel understands, kustomizations that list their files, a Grafana dashboard that
//! asks for metrics carousel exports, and every Kubernetes object valid against the
//! Kubernetes OpenAPI schemas (tests/deploy/validate.sh, the kubernetes-validate package).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command as Process;

mod common;

use carousel::config::{Cli, Command, ProxyMode};
use clap::Parser;
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

// ---------------------------------------------------------------------------------------
// Reading the manifests
// ---------------------------------------------------------------------------------------

fn deploy_dir() -> PathBuf {
    Path::new(ROOT).join("deploy")
}

/// Every file under `dir`, recursively, whose name ends in one of `extensions`, sorted.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn is_kustomization(path: &Path) -> bool {
    matches!(
        path.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
    )
}

fn relative(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// One Kubernetes object of a manifest file.
#[derive(Clone, Debug)]
struct Doc {
    /// Where it came from, for messages: `deploy/rbac.yaml#2`.
    origin: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.value, &["kind"]).unwrap_or("")
    }

    fn name(&self) -> &str {
        str_at(&self.value, &["metadata", "name"]).unwrap_or("")
    }

    fn namespace(&self) -> &str {
        str_at(&self.value, &["metadata", "namespace"]).unwrap_or("")
    }
}

/// The documents of one YAML file, empty documents left out and the items of a
/// `kind: List` taken out as objects of their own.
fn parse_docs(origin: &str, text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <Value as serde::Deserialize>::deserialize(de)
            .unwrap_or_else(|e| panic!("{origin}: document {}: {e}", i + 1));
        if value.is_null() {
            continue;
        }
        let origin = format!("{origin}#{}", i + 1);
        if str_at(&value, &["kind"]) == Some("List") {
            let items = at(&value, &["items"])
                .and_then(Value::as_sequence)
                .unwrap_or_else(|| panic!("{origin}: a List without items"));
            for (j, item) in items.iter().enumerate() {
                docs.push(Doc {
                    origin: format!("{origin}.items[{j}]"),
                    value: item.clone(),
                });
            }
        } else {
            docs.push(Doc { origin, value });
        }
    }
    docs
}

fn read_docs(path: &Path) -> Vec<Doc> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_docs(&relative(path), &text)
}

/// Every Kubernetes object under `dir` (kustomization files are not objects).
fn objects_under(dir: &Path) -> Vec<Doc> {
    files_under(dir, &["yaml", "yml"])
        .iter()
        .filter(|p| !is_kustomization(p))
        .flat_map(|p| read_docs(p))
        .collect()
}

/// The two ways to install carousel: `kubectl apply -k` of these directories.
const OVERLAYS: [Overlay; 2] = [Overlay::BesideKubeProxy, Overlay::ReplaceKubeProxy];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Overlay {
    /// `deploy/`: Services labelled service-proxy-name=carousel, kube-proxy's ports left.
    BesideKubeProxy,
    /// `deploy/replace-kube-proxy/`: every Service, kube-proxy's ports, --master.
    ReplaceKubeProxy,
}

impl Overlay {
    fn dir(self) -> PathBuf {
        match self {
            Overlay::BesideKubeProxy => deploy_dir(),
            Overlay::ReplaceKubeProxy => deploy_dir().join("replace-kube-proxy"),
        }
    }

    /// The YAML that `kubectl apply -k` of this overlay applies (`kubectl kustomize`).
    fn render(self) -> String {
        let out = Process::new("kubectl")
            .arg("kustomize")
            .arg(self.dir())
            .output()
            .expect("kubectl (kubectl kustomize renders the overlays)");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            relative(&self.dir()),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// The objects it installs.
    fn objects(self) -> Vec<Doc> {
        parse_docs(
            &format!("kubectl kustomize {}", relative(&self.dir())),
            &self.render(),
        )
    }
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn seq_at<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn strings_at(value: &Value, path: &[&str]) -> Vec<String> {
    seq_at(value, path)
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_string(),
        })
        .collect()
}

fn only<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} {name}, found {:?}",
        found.iter().map(|d| &d.origin).collect::<Vec<_>>()
    );
    found[0]
}

// ---------------------------------------------------------------------------------------
// RBAC
// ---------------------------------------------------------------------------------------

const ALLOWED_VERBS: &[&str] = &["get", "list", "watch"];
const ALLOWED_GROUPS: &[&str] = &["", "discovery.k8s.io"];
const ALLOWED_RESOURCES: &[&str] = &["services", "endpointslices", "nodes", "pods"];

/// Everything in `docs` that grants more than reading Services, EndpointSlices, Nodes
/// and Pods: other verbs, resources or API groups, wildcards, non-resource URLs,
/// aggregation, and bindings to roles that deploy/ does not define (cluster-admin...).
fn rbac_violations(docs: &[Doc]) -> Vec<String> {
    let mut bad = Vec::new();
    let roles: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "Role" | "ClusterRole"))
        .map(|d| (d.kind().to_string(), d.name().to_string()))
        .collect();
    for doc in docs {
        let what = format!("{} {} ({})", doc.kind(), doc.name(), doc.origin);
        match doc.kind() {
            "Role" | "ClusterRole" => {
                if at(&doc.value, &["aggregationRule"]).is_some() {
                    bad.push(format!(
                        "{what}: aggregationRule pulls in other roles' rules"
                    ));
                }
                let rules = seq_at(&doc.value, &["rules"]);
                for (i, rule) in rules.iter().enumerate() {
                    let here = format!("{what}: rules[{i}]");
                    let keys: Vec<&str> = rule
                        .as_mapping()
                        .map(|m| m.keys().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    for key in keys {
                        if !["apiGroups", "resources", "verbs"].contains(&key) {
                            bad.push(format!("{here}: {key} is not allowed"));
                        }
                    }
                    for (field, allowed) in [
                        ("verbs", ALLOWED_VERBS),
                        ("apiGroups", ALLOWED_GROUPS),
                        ("resources", ALLOWED_RESOURCES),
                    ] {
                        let values = strings_at(rule, &[field]);
                        if values.is_empty() {
                            bad.push(format!("{here}: no {field}"));
                        }
                        for v in values {
                            if v.contains('*') {
                                bad.push(format!("{here}: wildcard {field} {v:?}"));
                            } else if !allowed.contains(&v.as_str()) {
                                bad.push(format!("{here}: {field} {v:?} is not allowed"));
                            }
                        }
                    }
                }
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let kind = str_at(&doc.value, &["roleRef", "kind"]).unwrap_or("");
                let name = str_at(&doc.value, &["roleRef", "name"]).unwrap_or("");
                if !roles.contains(&(kind.to_string(), name.to_string())) {
                    bad.push(format!(
                        "{what}: binds {kind} {name:?}, which deploy/ does not define"
                    ));
                }
            }
            _ => {}
        }
    }
    bad
}

#[test]
fn rbac_grants_only_reading_services_endpointslices_nodes_and_pods() {
    let docs = objects_under(&deploy_dir());
    let violations = rbac_violations(&docs);
    assert!(violations.is_empty(), "{}", violations.join("\n"));

    // Not vacuous: carousel's role exists, is bound to its ServiceAccount, and grants
    // what carousel needs.
    let installed = Overlay::BesideKubeProxy.objects();
    only(&installed, "ServiceAccount", "carousel");
    let roles: Vec<&Doc> = installed
        .iter()
        .filter(|d| matches!(d.kind(), "Role" | "ClusterRole"))
        .collect();
    assert!(!roles.is_empty(), "deploy/ defines no Role or ClusterRole");
    let bound = installed.iter().any(|d| {
        d.kind() == "ClusterRoleBinding"
            && seq_at(&d.value, &["subjects"]).iter().any(|s| {
                str_at(s, &["kind"]) == Some("ServiceAccount")
                    && str_at(s, &["name"]) == Some("carousel")
                    && str_at(s, &["namespace"]) == Some("kube-system")
            })
    });
    assert!(
        bound,
        "no ClusterRoleBinding names the ServiceAccount kube-system/carousel"
    );
    let mut granted = BTreeSet::new();
    for role in roles.iter().filter(|r| r.kind() == "ClusterRole") {
        for rule in seq_at(&role.value, &["rules"]) {
            for group in strings_at(rule, &["apiGroups"]) {
                for resource in strings_at(rule, &["resources"]) {
                    for verb in strings_at(rule, &["verbs"]) {
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    for (group, resource) in [
        ("", "services"),
        ("", "pods"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                granted.contains(&(group.to_string(), resource.to_string(), verb.to_string())),
                "no ClusterRole lets carousel {verb} {resource} (group {group:?})"
            );
        }
    }
}

#[test]
fn rbac_check_catches_what_it_should() {
    let role = |rules: &str| {
        parse_docs(
            "synthetic",
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n\
                 metadata: {{name: r}}\nrules:\n{rules}"
            ),
        )
    };
    let ok = role("  - {apiGroups: [\"\"], resources: [pods], verbs: [get, list, watch]}\n");
    assert_eq!(rbac_violations(&ok), Vec::<String>::new());
    for (rules, expect) in [
        (
            "  - {apiGroups: [\"\"], resources: [pods], verbs: [create]}\n",
            "verbs \"create\"",
        ),
        (
            "  - {apiGroups: [\"\"], resources: [pods], verbs: [\"*\"]}\n",
            "wildcard verbs",
        ),
        (
            "  - {apiGroups: [\"\"], resources: [secrets], verbs: [get]}\n",
            "resources \"secrets\"",
        ),
        (
            "  - {apiGroups: [\"\"], resources: [\"pods/exec\"], verbs: [get]}\n",
            "resources \"pods/exec\"",
        ),
        (
            "  - {apiGroups: [\"*\"], resources: [pods], verbs: [get]}\n",
            "wildcard apiGroups",
        ),
        (
            "  - {apiGroups: [apps], resources: [pods], verbs: [get]}\n",
            "apiGroups \"apps\"",
        ),
        (
            "  - {nonResourceURLs: [\"/metrics\"], verbs: [get]}\n",
            "nonResourceURLs is not allowed",
        ),
    ] {
        let violations = rbac_violations(&role(rules)).join("\n");
        assert!(
            violations.contains(expect),
            "{rules:?}: expected {expect:?} in {violations:?}"
        );
    }
    let admin = parse_docs(
        "synthetic",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
         metadata: {name: b}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\n\
         subjects: [{kind: ServiceAccount, name: carousel, namespace: kube-system}]\n",
    );
    assert!(rbac_violations(&admin).join("\n").contains("cluster-admin"));
}

// ---------------------------------------------------------------------------------------
// The DaemonSet
// ---------------------------------------------------------------------------------------

struct DaemonSet {
    doc: Doc,
    installed: Vec<Doc>,
}

impl DaemonSet {
    fn load(overlay: Overlay) -> Self {
        let installed = overlay.objects();
        let doc = only(&installed, "DaemonSet", "carousel").clone();
        assert_eq!(doc.namespace(), "kube-system", "{}", doc.origin);
        Self { doc, installed }
    }

    fn pod(&self) -> &Value {
        at(&self.doc.value, &["spec", "template", "spec"]).expect("spec.template.spec")
    }

    fn container(&self) -> &Value {
        let containers = seq_at(self.pod(), &["containers"]);
        containers
            .iter()
            .find(|c| str_at(c, &["name"]) == Some("carousel"))
            .expect("a container named carousel")
    }

    /// The container's environment as the kubelet builds it: literal values (with
    /// `$(VAR)` references to earlier entries expanded), ConfigMap keys, and the
    /// downward API's spec.nodeName as `node-under-test`.
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for var in seq_at(self.container(), &["env"]) {
            let name = str_at(var, &["name"]).expect("env[].name").to_string();
            let value = if let Some(value) = at(var, &["value"]) {
                expand(value.as_str().expect("env value is a string"), &env)
            } else if let Some(from) = at(var, &["valueFrom", "configMapKeyRef"]) {
                let map = str_at(from, &["name"]).expect("configMapKeyRef.name");
                let key = str_at(from, &["key"]).expect("configMapKeyRef.key");
                assert_ne!(
                    at(from, &["optional"]).and_then(Value::as_bool),
                    Some(true),
                    "env {name}: an optional ConfigMap key would silently drop a flag"
                );
                self.config_map(map)
                    .get(key)
                    .unwrap_or_else(|| panic!("env {name}: ConfigMap {map} has no key {key}"))
                    .clone()
            } else if let Some(path) = str_at(var, &["valueFrom", "fieldRef", "fieldPath"]) {
                assert_eq!(path, "spec.nodeName", "env {name}: unexpected fieldRef");
                "node-under-test".to_string()
            } else {
                panic!("env {name}: a source this test does not know: {var:?}");
            };
            env.insert(name, value);
        }
        env
    }

    /// The data of a ConfigMap that `kubectl apply -k deploy/` installs next to the
    /// DaemonSet.
    fn config_map(&self, name: &str) -> BTreeMap<String, String> {
        let map = only(&self.installed, "ConfigMap", name);
        assert_eq!(map.namespace(), self.doc.namespace(), "{}", map.origin);
        at(&map.value, &["data"])
            .and_then(Value::as_mapping)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let k = k.as_str().expect("ConfigMap keys are strings");
                        let v = v
                            .as_str()
                            .unwrap_or_else(|| panic!("ConfigMap {name}: {k} is not a string"));
                        (k.to_string(), v.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The container's args with `$(VAR)` expanded as the kubelet does.
    fn args(&self) -> Vec<String> {
        let env = self.env();
        strings_at(self.container(), &["args"])
            .iter()
            .map(|a| expand(a, &env))
            .collect()
    }

    /// The port a probe's httpGet points at, a named container port resolved.
    fn probe_port(&self, probe: &str) -> u16 {
        let port = at(self.container(), &[probe, "httpGet", "port"])
            .unwrap_or_else(|| panic!("{probe}.httpGet.port"));
        if let Some(n) = port.as_u64() {
            return u16::try_from(n).expect("a port");
        }
        let name = port.as_str().expect("a port is a number or a name");
        seq_at(self.container(), &["ports"])
            .iter()
            .find(|p| str_at(p, &["name"]) == Some(name))
            .and_then(|p| at(p, &["containerPort"]))
            .and_then(Value::as_u64)
            .map(|n| u16::try_from(n).expect("a port"))
            .unwrap_or_else(|| panic!("{probe}: no container port named {name}"))
    }
}

/// Kubernetes' expansion of `$(VAR)` in env values, command and args: a defined VAR is
/// replaced, `$$` is a literal `$`, anything else is left as it is.
fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix("$(") {
            match inner.find(')') {
                Some(end) if env.contains_key(&inner[..end]) => {
                    out.push_str(&env[&inner[..end]]);
                    rest = &inner[end + 1..];
                }
                Some(end) => {
                    out.push_str(&tail[..end + 3]);
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn env_expansion_follows_kubernetes() {
    let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
    assert_eq!(expand("--a=$(A)", &env), "--a=x");
    assert_eq!(expand("$(A)$(A)-$$(A)-$(B)-$", &env), "xx-$(A)-$(B)-$");
    assert_eq!(expand("$(A", &env), "$(A");
}

fn no_ref_left(args: &[String]) {
    for arg in args {
        assert!(
            !arg.contains("$("),
            "{arg:?}: a $(VAR) that no env entry defines is passed on literally"
        );
    }
}

#[test]
fn daemonset_is_locked_down() {
    for overlay in OVERLAYS {
        daemonset_is_locked_down_in(overlay);
    }
}

fn daemonset_is_locked_down_in(overlay: Overlay) {
    let ds = DaemonSet::load(overlay);
    let spec = &ds.doc.value["spec"];
    let pod = ds.pod();
    let c = ds.container();
    let sc = at(c, &["securityContext"]).expect("container securityContext");

    // Capabilities: NET_ADMIN and nothing else, after dropping everything.
    let added: Vec<String> = strings_at(sc, &["capabilities", "add"])
        .into_iter()
        .map(|c| c.trim_start_matches("CAP_").to_uppercase())
        .collect();
    assert_eq!(added, ["NET_ADMIN"], "added capabilities");
    let dropped = strings_at(sc, &["capabilities", "drop"]);
    assert!(
        dropped.iter().any(|d| d.eq_ignore_ascii_case("ALL")),
        "capabilities.drop must hold ALL, has {dropped:?}"
    );
    assert_ne!(
        at(sc, &["privileged"]).and_then(Value::as_bool),
        Some(true),
        "privileged"
    );
    assert_eq!(
        at(sc, &["allowPrivilegeEscalation"]).and_then(Value::as_bool),
        Some(false),
        "allowPrivilegeEscalation"
    );
    assert_eq!(
        at(sc, &["readOnlyRootFilesystem"]).and_then(Value::as_bool),
        Some(true),
        "readOnlyRootFilesystem"
    );
    let seccomp = str_at(sc, &["seccompProfile", "type"])
        .or_else(|| str_at(pod, &["securityContext", "seccompProfile", "type"]));
    assert_eq!(seccomp, Some("RuntimeDefault"), "seccompProfile");
    for forbidden in ["hostPID", "hostIPC"] {
        assert_ne!(
            at(pod, &[forbidden]).and_then(Value::as_bool),
            Some(true),
            "{forbidden}"
        );
    }
    for volume in seq_at(pod, &["volumes"]) {
        assert!(
            at(volume, &["hostPath"]).is_none(),
            "hostPath volume {:?}",
            str_at(volume, &["name"])
        );
    }

    // The node's network, as kube-proxy.
    assert_eq!(
        at(pod, &["hostNetwork"]).and_then(Value::as_bool),
        Some(true),
        "hostNetwork"
    );
    assert_eq!(str_at(pod, &["dnsPolicy"]), Some("ClusterFirstWithHostNet"));
    assert_eq!(str_at(pod, &["serviceAccountName"]), Some("carousel"));
    only(&ds.installed, "ServiceAccount", "carousel");
    assert_eq!(
        str_at(pod, &["priorityClassName"]),
        Some("system-node-critical")
    );
    assert!(
        seq_at(pod, &["tolerations"]).iter().any(|t| {
            str_at(t, &["operator"]) == Some("Exists")
                && at(t, &["key"]).is_none()
                && at(t, &["effect"]).is_none()
        }),
        "a toleration of every taint (operator: Exists, no key, no effect)"
    );
    let grace = at(pod, &["terminationGracePeriodSeconds"]).and_then(Value::as_u64);
    assert!(
        grace.is_some_and(|g| g > 30),
        "terminationGracePeriodSeconds {grace:?} must exceed carousel's 30 s drain"
    );
    assert_eq!(
        str_at(spec, &["updateStrategy", "type"]),
        Some("RollingUpdate")
    );
    // The new pod starts before the old one stops: no node is ever without a proxy.
    let rolling =
        |field| at(spec, &["updateStrategy", "rollingUpdate", field]).and_then(Value::as_u64);
    assert_eq!(rolling("maxSurge"), Some(1), "maxSurge");
    assert_eq!(rolling("maxUnavailable"), Some(0), "maxUnavailable");

    // One init container may be privileged, and it only sets request migration.
    let inits = seq_at(pod, &["initContainers"]);
    assert_eq!(inits.len(), 1, "init containers: {inits:?}");
    assert_eq!(
        strings_at(&inits[0], &["command"]),
        ["/bin/sh", "-c", MIGRATE_COMMAND],
        "the privileged init container runs nothing else"
    );

    // NODE_NAME from the downward API.
    let node_name = seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("NODE_NAME"))
        .expect("env NODE_NAME");
    assert_eq!(
        str_at(node_name, &["valueFrom", "fieldRef", "fieldPath"]),
        Some("spec.nodeName")
    );

    // Probes and resources.
    assert_eq!(
        str_at(c, &["livenessProbe", "httpGet", "path"]),
        Some("/livez")
    );
    assert_eq!(
        str_at(c, &["readinessProbe", "httpGet", "path"]),
        Some("/readyz")
    );
    for resource in ["cpu", "memory"] {
        assert!(
            at(c, &["resources", "requests", resource]).is_some(),
            "resources.requests.{resource} is not set"
        );
    }
    assert!(
        at(c, &["resources", "limits", "memory"]).is_some(),
        "resources.limits.memory is not set"
    );
    // kube-proxy has no CPU limit either: throttling would stall the node's Services.
    assert!(
        at(c, &["resources", "limits", "cpu"]).is_none(),
        "a CPU limit throttles every Service connection of the node"
    );
    // The image is kustomize's to set.
    assert_eq!(
        str_at(c, &["image"]),
        Some("carousel:latest"),
        "{overlay:?}"
    );
}

/// What the DaemonSet's privileged init container runs.
const MIGRATE_COMMAND: &str = "echo 1 > /proc/sys/net/ipv4/tcp_migrate_req";

/// Ports a Kubernetes node's own components hold by default: the kubelet (10248,
/// 10250, 10255), kube-proxy (10249, 10256), the controller manager (10257), the
/// scheduler (10259), and carousel's redirect listener (10262).
const KUBELET_PORTS: [u16; 3] = [10248, 10250, 10255];
const KUBE_PROXY_PORTS: [u16; 2] = [10249, 10256];
const CONTROL_PLANE_PORTS: [u16; 2] = [10257, 10259];

#[test]
fn daemonset_args_are_accepted_by_carousels_parser() {
    for overlay in OVERLAYS {
        daemonset_args_are_accepted_in(overlay);
    }
}

/// `carousel run` as the rendered DaemonSet starts it, parsed by carousel's own parser.
fn parsed_args(ds: &DaemonSet) -> carousel::config::RunArgs {
    let args = ds.args();
    no_ref_left(&args);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let cli = Cli::try_parse_from(std::iter::once("carousel".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("carousel refuses {args:?}:\n{e}"));
    let Command::Run(run) = cli.command else {
        panic!("{args:?} is not `carousel run`");
    };
    *run
}

fn daemonset_args_are_accepted_in(overlay: Overlay) {
    let ds = DaemonSet::load(overlay);
    let container = ds.container();
    assert!(
        at(container, &["command"]).is_none(),
        "command overrides the image's entrypoint (/usr/local/bin/carousel)"
    );
    let run = parsed_args(&ds);
    assert_eq!(run.proxy_mode, Some(ProxyMode::Nftables));
    assert!(
        run.from_file.is_none(),
        "a DaemonSet reads the cluster, not a file"
    );
    // Scrapable out of the box: on the node's addresses, at the port the pod's scrape
    // annotations name (deploy/monitoring/'s PodMonitor reads the same annotation).
    let metrics = run.metrics_bind_address;
    assert!(
        metrics.ip().is_unspecified(),
        "--metrics-bind-address {metrics}: Prometheus cannot reach a loopback address"
    );
    let annotations = at(
        &ds.doc.value,
        &["spec", "template", "metadata", "annotations"],
    )
    .expect("pod annotations");
    assert_eq!(str_at(annotations, &["prometheus.io/scrape"]), Some("true"));
    assert_eq!(
        str_at(annotations, &["prometheus.io/path"]),
        Some("/metrics")
    );
    assert_eq!(
        str_at(annotations, &["prometheus.io/port"]),
        Some(metrics.port().to_string().as_str()),
        "{overlay:?}: the scrape annotation and --metrics-bind-address disagree"
    );
    let health = run.healthz_bind_address;
    let ports = [metrics.port(), health.port()];
    match overlay {
        Overlay::BesideKubeProxy => {
            for port in ports {
                assert!(
                    !KUBELET_PORTS.contains(&port)
                        && !KUBE_PROXY_PORTS.contains(&port)
                        && !CONTROL_PLANE_PORTS.contains(&port)
                        && port != run.redirect_port,
                    "{overlay:?}: port {port} is held by a node component"
                );
            }
            assert_eq!(run.service_proxy_name(), Some("carousel"));
            assert_eq!(
                run.master(),
                None,
                "beside kube-proxy the in-cluster address works"
            );
        }
        Overlay::ReplaceKubeProxy => {
            assert_eq!(ports, KUBE_PROXY_PORTS, "{overlay:?}: kube-proxy's ports");
            assert_eq!(run.service_proxy_name(), None, "{overlay:?}: every Service");
            assert!(
                run.master().is_some(),
                "{overlay:?}: the in-cluster API address is a ClusterIP nobody routes"
            );
        }
    }
    assert!(
        health.ip().is_unspecified(),
        "the kubelet probes the node's address; {health} does not listen there"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            ds.probe_port(probe),
            health.port(),
            "{probe} and --healthz-bind-address disagree"
        );
    }
    // The kubelet waits terminationGracePeriodSeconds after SIGTERM, then kills: the
    // drain must end before that, with a few seconds to spare.
    let grace = at(ds.pod(), &["terminationGracePeriodSeconds"])
        .and_then(Value::as_u64)
        .expect("terminationGracePeriodSeconds");
    assert!(
        run.drain_timeout.as_secs() + 3 <= grace,
        "--drain-timeout {:?} does not end before terminationGracePeriodSeconds {grace} s",
        run.drain_timeout
    );

    // Every ConfigMap key reaches carousel: none is a dead setting.
    let used: BTreeSet<String> = seq_at(container, &["env"])
        .iter()
        .filter_map(|e| str_at(e, &["valueFrom", "configMapKeyRef", "key"]))
        .map(str::to_string)
        .collect();
    for map in ds.installed.iter().filter(|d| d.kind() == "ConfigMap") {
        for key in ds.config_map(map.name()).keys() {
            assert!(
                used.contains(key),
                "ConfigMap {}: key {key} is not passed to carousel",
                map.name()
            );
        }
    }
    // And every env variable fed from the ConfigMap is used by an arg (RUST_LOG is read
    // by carousel's log setup directly).
    let raw_args = strings_at(container, &["args"]).join(" ");
    for var in seq_at(container, &["env"]) {
        let name = str_at(var, &["name"]).unwrap();
        if at(var, &["valueFrom", "configMapKeyRef"]).is_some() && name != "RUST_LOG" {
            assert!(
                raw_args.contains(&format!("$({name})")),
                "env {name} comes from the ConfigMap but no arg uses it"
            );
        }
    }
}

#[test]
fn a_bad_configmap_value_is_caught() {
    // The test above is only worth something if a wrong value makes it fail.
    let ds = DaemonSet::load(Overlay::BesideKubeProxy);
    let mut env = ds.env();
    for value in env.values_mut() {
        if value.ends_with('s') && value.trim_end_matches('s').parse::<u32>().is_ok() {
            *value = "two seconds".into();
        }
    }
    assert!(
        env.values().any(|v| v == "two seconds"),
        "no duration in the ConfigMap to spoil: {env:?}"
    );
    let args: Vec<String> = strings_at(ds.container(), &["args"])
        .iter()
        .map(|a| expand(a, &env))
        .collect();
    let error = Cli::try_parse_from(std::iter::once("carousel".to_string()).chain(args))
        .expect_err("a duration that does not parse")
        .to_string();
    // The pod stops with the flag and the value named.
    assert!(
        error.contains("two seconds") && error.contains("timeout <"),
        "{error}"
    );

    // An API server address that is no URL is refused with the flag named.
    let mut env = ds.env();
    env.insert("CAROUSEL_MASTER".into(), "kubernetes-api:6443".into());
    let args = strings_at(ds.container(), &["args"])
        .iter()
        .map(|a| expand(a, &env))
        .collect::<Vec<_>>();
    let error = Cli::try_parse_from(std::iter::once("carousel".to_string()).chain(args))
        .expect_err("a master without a scheme")
        .to_string();
    assert!(error.contains("--master"), "{error}");
}

// ---------------------------------------------------------------------------------------
// The rendered DaemonSet, run
// ---------------------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_carousel");
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/netns/agent.py");

/// A network namespace playing a node, with the processes started in it; removed on
/// drop, pass or fail (carousel's nftables table goes with it).
struct Node {
    netns: String,
    children: Vec<std::process::Child>,
}

impl Node {
    fn new(overlay: Overlay) -> Node {
        let netns = format!("cd{}-{overlay:?}", std::process::id());
        let node = Node {
            netns,
            children: Vec::new(),
        };
        let ns = node.netns.as_str();
        for args in [
            format!("netns add {ns}"),
            format!("-n {ns} link set lo up"),
            // A pod address on the node, and a route for the Service range, so that the
            // node's own processes can dial a ClusterIP before the output hook redirects.
            format!("-n {ns} link add pods type veth peer name pods-peer"),
            format!("-n {ns} addr add 10.244.0.2/24 dev pods"),
            format!("-n {ns} link set pods up"),
            format!("-n {ns} link set pods-peer up"),
            format!("-n {ns} route add 10.96.0.0/12 dev pods"),
        ] {
            let out = Process::new("ip")
                .args(args.split_whitespace())
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        node
    }

    fn exec(&self, program: &str) -> Process {
        let mut cmd = Process::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Starts `cmd` and keeps it until the node goes.
    fn spawn(&mut self, mut cmd: Process) -> &mut std::process::Child {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    /// One GET from inside the node: "STATUS\nBODY", or "" when nothing answers.
    fn get(&self, url: &str) -> String {
        let out = self
            .exec("python3")
            .args([AGENT, "get", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Process::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

/// A process that holds `addr` in the node, as kube-proxy holds its ports.
fn hold(node: &mut Node, addr: &str) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut cmd = node.exec("python3");
    cmd.args([
        "-c",
        &format!(
            "import socket,sys,time\ns=socket.socket()\ns.bind(({host:?},{port}))\ns.listen()\nprint('held',flush=True)\ntime.sleep(600)"
        ),
    ])
    .stdout(std::process::Stdio::piped());
    let child = node.spawn(cmd);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held", "could not hold {addr}");
}

/// Each overlay's DaemonSet, its command line as the kubelet would expand it, run in a
/// namespace of its own against the fake API server: it gets ready on the probe's port
/// and forwards a connection to a ClusterIP in nftables mode. Beside kube-proxy, other
/// processes hold kube-proxy's 10249 and 10256; in its place, the API server is reached
/// through the `master` value the user sets, with no kubeconfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_daemonsets_run_and_forward() {
    for overlay in OVERLAYS {
        run_rendered_daemonset(overlay).await;
    }
}

async fn run_rendered_daemonset(overlay: Overlay) {
    use common::fake_apiserver::FakeApiServer;
    use serde_json::json;

    let ds = DaemonSet::load(overlay);
    let mut node = Node::new(overlay);
    // The kubelet runs the init containers first, in the node's network namespace.
    for init in seq_at(ds.pod(), &["initContainers"]) {
        let command = strings_at(init, &["command"]);
        let out = node.exec(&command[0]).args(&command[1..]).output().unwrap();
        assert!(out.status.success(), "{command:?}: {out:?}");
    }
    let migrate = node
        .exec("cat")
        .arg("/proc/sys/net/ipv4/tcp_migrate_req")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&migrate.stdout).trim(), "1");
    if overlay == Overlay::BesideKubeProxy {
        hold(&mut node, "127.0.0.1:10249");
        hold(&mut node, "0.0.0.0:10256");
    }
    let api = FakeApiServer::start_on_std(common::listen_in_netns(
        &node.netns,
        "127.0.0.1:0".parse().unwrap(),
    ));
    let mut pod = node.exec("python3");
    pod.args([AGENT, "serve", "pod-a", "8080"])
        .stdout(std::process::Stdio::null());
    node.spawn(pod);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "labels": match overlay {
            Overlay::BesideKubeProxy => json!({"service.kubernetes.io/service-proxy-name": "carousel"}),
            Overlay::ReplaceKubeProxy => json!({}),
        }},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }));
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.2"], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "pod-a", "namespace": "default"}}],
    }));

    // The user's one setting in kube-proxy's place: the API server's address.
    let mut env = ds.env();
    let server = format!("http://{}", api.addr);
    let mut cmd = node.exec(BIN);
    match overlay {
        Overlay::BesideKubeProxy => {
            // In a pod the service account reaches the in-cluster address; here a
            // kubeconfig stands in for it.
            cmd.env("KUBECONFIG", api.kubeconfig());
        }
        Overlay::ReplaceKubeProxy => {
            env.insert("CAROUSEL_MASTER".into(), server.clone());
            cmd.env_remove("KUBECONFIG").env("HOME", "/nonexistent");
        }
    }
    let args: Vec<String> = strings_at(ds.container(), &["args"])
        .iter()
        .map(|a| expand(a, &env))
        .collect();
    no_ref_left(&args);
    let log = tempfile::NamedTempFile::new().unwrap();
    cmd.args(&args)
        .env("NODE_NAME", "node-under-test")
        .env("RUST_LOG", &env["RUST_LOG"])
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap());
    node.spawn(cmd);
    let log = || std::fs::read_to_string(log.path()).unwrap_or_default();

    let port = ds.probe_port("readinessProbe");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node
        .get(&format!("http://127.0.0.1:{port}/readyz"))
        .starts_with("200")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{overlay:?}: not ready on the probe's port {port}:\n{}",
            log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(node
        .get(&format!(
            "http://127.0.0.1:{}/livez",
            ds.probe_port("livenessProbe")
        ))
        .starts_with("200"));

    let out = node
        .exec("python3")
        .args([AGENT, "ask", "10.96.0.10", "80", "5"])
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{overlay:?}: agent: {e}: {out:?}"));
    assert_eq!(answer["errors"], 0, "{overlay:?}: {answer}\n{}", log());
    assert_eq!(answer["seen"]["-"]["pod-a"], 5, "{overlay:?}: {answer}");
    if overlay == Overlay::ReplaceKubeProxy {
        assert!(
            log().contains(&server),
            "the log names the API server:\n{}",
            log()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The kubechaos example
// ---------------------------------------------------------------------------------------

fn labels(value: &Value, path: &[&str]) -> BTreeMap<String, String> {
    at(value, path)
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubechaos_example_is_a_weighted_canary_that_carousel_understands() {
    let docs = objects_under(&deploy_dir().join("examples/kubechaos"));
    let svc = only(&docs, "Service", "kubechaos-svc");
    let annotations = labels(&svc.value, &["metadata", "annotations"]);

    let algorithm = annotations
        .get("carousel.dev/load-balancer")
        .expect("carousel.dev/load-balancer annotation");
    assert_eq!(algorithm, "weighted-round-robin");
    let weights = annotations
        .get("carousel.dev/weights")
        .expect("carousel.dev/weights annotation");
    let (rules, problem) = carousel::discovery::convert::parse_weights(weights);
    assert_eq!(problem, None, "{weights:?}");
    assert_eq!(rules.len(), 2, "{weights:?}");

    // The Service is carousel's: it carries the proxy name the DaemonSet is given.
    let ds = DaemonSet::load(Overlay::BesideKubeProxy);
    let proxy_name = ds
        .args()
        .iter()
        .find_map(|a| a.strip_prefix("--service-proxy-name=").map(str::to_string));
    let svc_labels = labels(&svc.value, &["metadata", "labels"]);
    assert_eq!(
        svc_labels
            .get("service.kubernetes.io/service-proxy-name")
            .cloned(),
        proxy_name,
        "carousel must own kubechaos-svc (label vs --service-proxy-name)"
    );

    let selector = labels(&svc.value, &["spec", "selector"]);
    assert_eq!(
        selector,
        BTreeMap::from([("app".to_string(), "kubechaos".to_string())])
    );
    let ports = seq_at(&svc.value, &["spec", "ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(at(&ports[0], &["port"]).and_then(Value::as_u64), Some(3000));
    assert_eq!(str_at(&ports[0], &["targetPort"]), Some("http"));

    for (version, text) in [("original", "original"), ("custom", "custom")] {
        let name = format!("kubechaos-{version}");
        let deploy = only(&docs, "Deployment", &name);
        assert_eq!(deploy.namespace(), svc.namespace(), "{name}");
        assert_eq!(
            at(&deploy.value, &["spec", "replicas"]).and_then(Value::as_u64),
            Some(2)
        );
        let pod_labels = labels(&deploy.value, &["spec", "template", "metadata", "labels"]);
        assert_eq!(pod_labels.get("app").map(String::as_str), Some("kubechaos"));
        assert_eq!(pod_labels.get("version").map(String::as_str), Some(version));
        assert!(
            selects(
                &labels(&deploy.value, &["spec", "selector", "matchLabels"]),
                &pod_labels
            ),
            "{name}: selector does not match its pods"
        );
        assert!(
            selects(&selector, &pod_labels),
            "{name} is not behind the Service"
        );
        assert_eq!(
            rules
                .iter()
                .filter(|r| pod_labels.get(&r.label) == Some(&r.value))
                .count(),
            1,
            "{name}: exactly one weight rule should match its pods"
        );

        let pod = at(&deploy.value, &["spec", "template", "spec"]).unwrap();
        let containers = seq_at(pod, &["containers"]);
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        let args = strings_at(c, &["args"]);
        assert!(args.contains(&format!("-text={text}")), "{name}: {args:?}");
        assert!(
            args.contains(&"-listen=:3000".to_string()),
            "{name}: {args:?}"
        );
        assert!(
            seq_at(c, &["ports"]).iter().any(|p| {
                str_at(p, &["name"]) == Some("http")
                    && at(p, &["containerPort"]).and_then(Value::as_u64) == Some(3000)
            }),
            "{name}: containerPort 3000 named http"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            assert!(at(c, &[probe]).is_some(), "{name}: {probe}");
        }
        for kind in ["requests", "limits"] {
            assert!(
                at(c, &["resources", kind]).is_some(),
                "{name}: resources.{kind}"
            );
        }
        // The "restricted" Pod Security Standard.
        let non_root = at(c, &["securityContext", "runAsNonRoot"])
            .or_else(|| at(pod, &["securityContext", "runAsNonRoot"]));
        assert_eq!(non_root.and_then(Value::as_bool), Some(true), "{name}");
        let seccomp = str_at(c, &["securityContext", "seccompProfile", "type"])
            .or_else(|| str_at(pod, &["securityContext", "seccompProfile", "type"]));
        assert_eq!(seccomp, Some("RuntimeDefault"), "{name}");
        assert_eq!(
            at(c, &["securityContext", "allowPrivilegeEscalation"]).and_then(Value::as_bool),
            Some(false),
            "{name}"
        );
        assert_eq!(
            strings_at(c, &["securityContext", "capabilities", "drop"]),
            ["ALL"],
            "{name}"
        );
        assert!(
            strings_at(c, &["securityContext", "capabilities", "add"]).is_empty(),
            "{name}"
        );
    }
}

#[test]
fn kubechaos_example_uses_a_balancer_carousel_has() {
    let docs = objects_under(&deploy_dir().join("examples/kubechaos"));
    let svc = only(&docs, "Service", "kubechaos-svc");
    let algorithm = str_at(
        &svc.value,
        &["metadata", "annotations", "carousel.dev/load-balancer"],
    )
    .expect("carousel.dev/load-balancer annotation");
    assert!(
        algorithm.parse::<carousel::algorithm::Algorithm>().is_ok(),
        "carousel has no balancer named {algorithm:?}: the Service would fall back to round-robin"
    );
}

// ---------------------------------------------------------------------------------------
// Kustomizations
// ---------------------------------------------------------------------------------------

#[test]
fn kustomizations_list_every_manifest_of_their_directory() {
    let kustomizations: Vec<PathBuf> = files_under(&deploy_dir(), &["yaml", "yml"])
        .into_iter()
        .filter(|p| is_kustomization(p))
        .collect();
    let dirs: Vec<PathBuf> = kustomizations
        .iter()
        .map(|k| k.parent().unwrap().to_path_buf())
        .collect();
    for dir in [
        "",
        "base",
        "replace-kube-proxy",
        "examples/kubechaos",
        "monitoring",
    ] {
        assert!(
            dirs.contains(&deploy_dir().join(dir)),
            "deploy/{dir}: no kustomization.yaml"
        );
    }

    for path in &kustomizations {
        let docs = read_docs(path);
        assert_eq!(docs.len(), 1, "{}", path.display());
        let k = &docs[0].value;
        assert_eq!(str_at(k, &["kind"]), Some("Kustomization"));
        assert_eq!(
            str_at(k, &["apiVersion"]),
            Some("kustomize.config.k8s.io/v1beta1")
        );
        let dir = path.parent().unwrap();
        // Resources, and the patches an overlay applies to them.
        let listed: BTreeSet<String> = strings_at(k, &["resources"])
            .into_iter()
            .chain(
                seq_at(k, &["patches"])
                    .iter()
                    .filter_map(|p| str_at(p, &["path"]).map(str::to_string)),
            )
            .collect();
        for resource in &listed {
            assert!(
                dir.join(resource).exists(),
                "{}: {resource} does not exist",
                relative(path)
            );
        }
        let present: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.is_file()
                    && !is_kustomization(p)
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        let unlisted: Vec<&String> = present.difference(&listed).collect();
        assert!(
            unlisted.is_empty(),
            "{}: {unlisted:?} would not be installed",
            relative(path)
        );
    }

    let base = read_docs(&deploy_dir().join("base/kustomization.yaml"));
    let listed: BTreeSet<String> = strings_at(&base[0].value, &["resources"])
        .into_iter()
        .collect();
    for file in ["rbac.yaml", "configmap.yaml", "daemonset.yaml"] {
        assert!(
            listed.contains(file),
            "deploy/base/kustomization.yaml: {file}"
        );
    }
    for overlay in OVERLAYS {
        let kinds: BTreeSet<String> = overlay
            .objects()
            .iter()
            .map(|d| format!("{} {}", d.kind(), d.name()))
            .collect();
        for object in [
            "DaemonSet carousel",
            "ConfigMap carousel-config",
            "ServiceAccount carousel",
        ] {
            assert!(
                kinds.contains(object),
                "{overlay:?} lacks {object}: {kinds:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The Grafana dashboard
// ---------------------------------------------------------------------------------------

/// The names the dashboard may read; tests/metrics.rs checks each expression against a
/// running carousel's /metrics and has promtool parse it.
fn carousel_metric_names() -> BTreeSet<&'static str> {
    use carousel::telemetry::names::*;
    BTreeSet::from([
        CONNECTIONS_TOTAL,
        CONNECTIONS_ACTIVE,
        BYTES_TOTAL,
        CONNECT_DURATION,
        CONNECTION_DURATION,
        ENDPOINTS,
        CONFIG_ERRORS_TOTAL,
        SYNC_DURATION,
        SYNC_ERRORS_TOTAL,
        SYNC_LAST_TIMESTAMP,
        NETWORK_PROGRAMMING_DURATION,
        FAIRNESS_JAIN,
        ENDPOINT_WEIGHT,
        EJECTIONS_TOTAL,
        REJECTED_TOTAL,
        ACCEPT_ERRORS_TOTAL,
        UDP_FLOWS_TOTAL,
        UDP_DROPPED_TOTAL,
        BUILD_INFO,
        KUBE_PROXY_SERVICE_CHANGES_PENDING,
        KUBE_PROXY_ENDPOINT_CHANGES_PENDING,
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ])
}

#[test]
fn grafana_dashboard_reads_carousels_metrics() {
    let path = deploy_dir().join("grafana/carousel-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dash["schemaVersion"], 39);
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let datasource = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let ds_ref = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let service = vars
        .iter()
        .find(|v| v["name"] == "service")
        .expect("a $service variable");
    let query = service["query"]
        .as_str()
        .or_else(|| service["query"]["query"].as_str())
        .unwrap_or_default();
    assert_eq!(
        query, "label_values(carousel_endpoints{namespace=~\"$namespace\"}, service)",
        "Services of the namespaces chosen"
    );
    // Same-named Services of two namespaces stay apart.
    let namespace = vars
        .iter()
        .find(|v| v["name"] == "namespace")
        .expect("a $namespace variable");
    assert_eq!(
        namespace["query"]["query"],
        "label_values(carousel_endpoints, namespace)"
    );

    let known = carousel_metric_names();
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    let panels = dash["panels"].as_array().expect("panels");
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id"
        );
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().expect("panel title");
        assert_eq!(panel["datasource"]["uid"], ds_ref.as_str(), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let metrics = common::metric_families_in(expr);
            assert!(
                !metrics.is_empty(),
                "{title}: {expr} reads no carousel metric"
            );
            for m in metrics {
                assert!(
                    known.contains(m.as_str()),
                    "{title}: {m} is not a metric carousel exports"
                );
            }
            assert!(
                expr.matches('(').count() == expr.matches(')').count()
                    && expr.matches('{').count() == expr.matches('}').count(),
                "{title}: unbalanced {expr}"
            );
            exprs.push(expr.to_string());
        }
    }
    let all = exprs.join("\n");
    for needle in [
        "group_left",
        "outcome=\"ok\"",
        "carousel_bytes_total",
        "direction",
        "carousel_connections_active",
        "connect_error",
        "no_endpoint",
        "carousel_endpoints",
        "state",
        "carousel_config_errors_total",
        "carousel_fairness_jain",
        "carousel_endpoint_weight",
        "carousel_endpoint_ejections_total",
        "carousel_connections_rejected_total",
        "carousel_sync_errors_total",
        "service=~\"$service\"",
        "namespace=~\"$namespace\"",
    ] {
        assert!(all.contains(needle), "no panel uses {needle}");
    }
}

#[test]
fn dashboard_metric_check_catches_unknown_names() {
    assert_eq!(
        common::metric_families_in(
            "rate(carousel_connect_duration_seconds_bucket[1m]) + carousel_bogus_total"
        ),
        ["carousel_connect_duration_seconds", "carousel_bogus_total"]
    );
    assert!(!carousel_metric_names().contains("carousel_bogus_total"));
}

// ---------------------------------------------------------------------------------------
// Kubernetes OpenAPI validation
// ---------------------------------------------------------------------------------------

fn target_tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Runs tests/deploy/validate.sh on `files`; its output, and whether it passed.
fn validate(files: &[PathBuf]) -> (bool, String) {
    let script = Path::new(ROOT).join("tests/deploy/validate.sh");
    let out = Process::new("bash")
        .arg(&script)
        .arg(target_tmp().join("kubernetes-validate-venv"))
        .args(files)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let scratch = target_tmp().join("deploy-validate");
    std::fs::create_dir_all(&scratch).unwrap();

    // First, that the validator fails where it should: an unknown field, a wrong type,
    // an apiVersion that does not exist.
    let broken = [
        (
            "unknown-field.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80}]\n  selectr: {app: x}\n",
        ),
        (
            "wrong-type.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: 1}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: http}]\n",
        ),
        (
            "unknown-kind.yaml",
            "apiVersion: apps/v1beta9\nkind: DaemonSet\nmetadata: {name: d}\n",
        ),
    ];
    for (name, text) in broken {
        let file = scratch.join(name);
        std::fs::write(&file, text).unwrap();
        let (ok, out) = validate(&[file]);
        assert!(
            !ok,
            "the validator accepts the broken manifest {name}:\n{out}"
        );
        assert!(
            out.contains(" did not validate ") || out.contains("WARN"),
            "{name}: the validator failed for another reason (could the venv be made?):\n{out}"
        );
    }

    // Then every Kubernetes object under deploy/. The items of a `kind: List` are
    // written out as documents of their own, since the schemas have no List.
    // Patches are partial objects: the overlays they are part of are validated whole,
    // as `kubectl kustomize` renders them.
    let mut files = Vec::new();
    for overlay in OVERLAYS {
        let out = scratch.join(format!("{overlay:?}.yaml"));
        std::fs::write(&out, overlay.render()).unwrap();
        files.push(out);
    }
    for path in files_under(&deploy_dir(), &["yaml", "yml"]) {
        // deploy/monitoring/ is the Prometheus operator's kind, which the Kubernetes
        // schemas do not hold: `the_podmonitor_scrapes_every_carousel` checks it.
        if is_kustomization(&path)
            || path.parent() == Some(&Overlay::ReplaceKubeProxy.dir())
            || path.parent() == Some(&deploy_dir().join("monitoring"))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let has_list = serde_yaml::Deserializer::from_str(&text).any(|de| {
            let v = <Value as serde::Deserialize>::deserialize(de).unwrap();
            str_at(&v, &["kind"]) == Some("List")
        });
        if has_list {
            let flat = read_docs(&path)
                .iter()
                .map(|d| serde_yaml::to_string(&d.value).unwrap())
                .collect::<Vec<_>>()
                .join("---\n");
            let out = scratch.join(relative(&path).replace('/', "__"));
            std::fs::write(&out, flat).unwrap();
            files.push(out);
        } else {
            files.push(path);
        }
    }
    assert!(files.len() >= 8, "too few manifests found: {files:?}");
    let (ok, out) = validate(&files);
    assert!(ok, "{out}");
    for file in &files {
        let name = file.display().to_string();
        let shown = relative(file);
        assert!(
            out.lines()
                .any(|l| l.starts_with("INFO") && (l.contains(&name) || l.contains(&shown))),
            "{shown} was not validated:\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Scraping: deploy/monitoring/
// ---------------------------------------------------------------------------------------

#[test]
fn the_podmonitor_scrapes_every_carousel() {
    let dir = deploy_dir().join("monitoring");
    let rendered = Process::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl");
    assert!(rendered.status.success(), "{rendered:?}");
    let docs = parse_docs(
        "kubectl kustomize deploy/monitoring",
        &String::from_utf8(rendered.stdout).unwrap(),
    );
    let monitor = only(&docs, "PodMonitor", "carousel");
    assert_eq!(
        str_at(&monitor.value, &["apiVersion"]),
        Some("monitoring.coreos.com/v1")
    );
    let spec = &monitor.value["spec"];
    for overlay in OVERLAYS {
        let ds = DaemonSet::load(overlay);
        assert_eq!(monitor.namespace(), ds.doc.namespace());
        let pod_labels = labels(&ds.doc.value, &["spec", "template", "metadata", "labels"]);
        let selector = labels(spec, &["selector", "matchLabels"]);
        assert!(
            !selector.is_empty() && selects(&selector, &pod_labels),
            "{overlay:?}: the PodMonitor selects {selector:?}, the pods are {pod_labels:?}"
        );
    }
    let endpoints = seq_at(spec, &["podMetricsEndpoints"]);
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(str_at(endpoint, &["path"]), Some("/metrics"));
    assert_eq!(
        at(endpoint, &["honorLabels"]).and_then(Value::as_bool),
        Some(true),
        "carousel's namespace, service and pod labels must win over the target's"
    );
    // The address comes from the pod IP and the annotation each overlay sets: the
    // relabelings applied as Prometheus applies them (in order, each regex anchored, a
    // rule that does not match leaves the label alone) to an IPv4 and an IPv6 pod.
    let rules: Vec<&Value> = seq_at(endpoint, &["relabelings"])
        .iter()
        .filter(|r| str_at(r, &["targetLabel"]) == Some("__address__"))
        .collect();
    assert!(!rules.is_empty(), "a relabeling that sets the address");
    for (pod_ip, want) in [
        ("10.0.0.5", "10.0.0.5:10263"),
        ("fd00::5", "[fd00::5]:10263"),
    ] {
        let mut address = format!("{pod_ip}:80");
        for rule in &rules {
            assert_eq!(
                strings_at(rule, &["sourceLabels"]),
                [
                    "__meta_kubernetes_pod_ip",
                    "__meta_kubernetes_pod_annotation_prometheus_io_port"
                ]
            );
            let joined = [pod_ip, "10263"].join(str_at(rule, &["separator"]).unwrap_or(";"));
            let regex = regex::Regex::new(&format!("^(?:{})$", str_at(rule, &["regex"]).unwrap()))
                .expect("a valid regex");
            if let Some(caps) = regex.captures(&joined) {
                let mut out = String::new();
                caps.expand(str_at(rule, &["replacement"]).unwrap(), &mut out);
                address = out;
            }
        }
        assert_eq!(address, want);
        address
            .parse::<std::net::SocketAddr>()
            .expect("a socket address");
    }
}
