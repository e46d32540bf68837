//! The state file: ordinary Kubernetes objects in YAML, as `kubectl get -o yaml` prints
//! them. `parse` is pure and `load` reads the file as carousel accepts it (a regular
//! file, bounded, UTF-8); `file_watch` polls it and publishes each good version. A
//! version that does not parse or validate is refused whole, with the document and the
//! field named.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::discovery::convert::{self, FieldError, PodLabels, Scope, Warning};
use crate::discovery::names::Names;
use crate::discovery::yaml_budget;
use crate::model::{ServiceKey, ServiceTable};

/// The largest state file carousel reads; a larger one is refused, naming this limit.
/// 10 000 Services of 50 endpoints each are about 100 MB of YAML.
pub const MAX_BYTES: u64 = 256 << 20;

/// Where in the file an object stands: `document 3` or `document 1, item 4`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub document: usize,
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        Ok(())
    }
}

/// Why a version of the state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("cannot read state file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is not a regular file: a FIFO, a device or a directory is never read"
    )]
    NotAFile { path: PathBuf },
    #[error("state file {path} holds {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("state file {path} is empty; a file that means \"no Services\" says so with a comment or an empty List")]
    Empty { path: PathBuf },
    #[error("document {document} is not valid YAML: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{at}: {message}")]
    NotAnObject { at: Location, message: String },
    #[error(
        "{at} (Service {service}): the same Service as {first}; a file holds each object once"
    )]
    Duplicate {
        at: Location,
        service: ServiceKey,
        first: Location,
    },
    #[error("{at} ({kind} {name}): {error}")]
    Invalid {
        at: Location,
        kind: String,
        name: String,
        #[source]
        error: FieldError,
    },
}

/// A good version of the state file.
#[derive(Debug, Default)]
pub struct Loaded {
    pub table: ServiceTable,
    pub warnings: Vec<Warning>,
    /// Kinds of objects the file holds that carousel does not read.
    pub ignored_kinds: BTreeSet<String>,
    /// The file's metadata and digest as `load` read it, so that `watch` does not
    /// parse the same bytes again.
    pub(super) version: Option<(Stamp, u64)>,
}

#[derive(Default)]
struct Objects {
    services: Vec<convert::ServiceFront>,
    /// Where each Service stands, so that a second one of the same name is refused.
    service_at: HashMap<ServiceKey, Location>,
    slices: Vec<convert::SliceView>,
    pods: PodLabels,
    ignored_kinds: BTreeSet<String>,
    names: Names,
}

/// Files from this size on are read on two threads, each half of the documents.
const PARALLEL_FROM: usize = 1 << 20;

/// Parses and converts the text of a state file.
pub fn parse(text: &str, scope: &Scope) -> Result<Loaded, StateFileError> {
    // Editors on Windows start UTF-8 files with a byte-order mark; kubectl skips it, and
    // the YAML parser would not see the first document for what it is.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let halves = (text.len() >= PARALLEL_FROM)
        .then(|| split_documents(text))
        .flatten();
    let objects = match halves {
        // YAML parsing is most of a load: a large file takes two cores, in half the time.
        Some((first, second)) => {
            let (first, second) = std::thread::scope(|s| {
                let first = s.spawn(|| read_objects(first));
                let second = read_objects(second);
                (first.join().expect("parsing does not panic"), second)
            });
            let joined = match (first, second) {
                (Ok(mut first), Ok(second)) => first.extend(second).then_some(first),
                _ => None,
            };
            // Read again in one go, so that the error names the first bad document and
            // its line as the whole file numbers them.
            match joined {
                Some(objects) => objects,
                None => read_objects(text)?,
            }
        }
        None => read_objects(text)?,
    };
    let (table, warnings) = convert::join(&objects.services, &objects.slices, &objects.pods, scope);
    Ok(Loaded {
        table,
        warnings,
        ignored_kinds: objects.ignored_kinds,
        version: None,
    })
}

/// `text` cut in two at the first document start (`---` at the start of a line) from
/// its middle on, or `None` if there is none.
fn split_documents(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let mut from = text.len() / 2;
    loop {
        let at = from + bytes[from..].windows(4).position(|w| w == b"\n---")?;
        // `---` followed by a space, a line end or the end of the file.
        if bytes.get(at + 4).is_none_or(|b| b.is_ascii_whitespace()) {
            // Both halves hold whole characters: the cut is at an ASCII newline.
            return Some((&text[..at + 1], &text[at + 1..]));
        }
        from = at + 1;
    }
}

/// The objects of the documents of `text`.
fn read_objects(text: &str) -> Result<Objects, StateFileError> {
    let mut objects = Objects::default();
    let budget = yaml_budget::budget_for(text.len());
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = yaml_budget::value(doc, &budget)
            .map_err(|source| StateFileError::Yaml { document, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        add_object(
            &mut objects,
            value,
            Location {
                document,
                item: None,
            },
        )?;
    }
    Ok(objects)
}

impl Objects {
    /// Adds the objects of the documents that follow these, as in one reading; false
    /// if a Service of `later` is one of these (the caller reads the whole file again,
    /// to name both as the file numbers them).
    fn extend(&mut self, later: Objects) -> bool {
        if later
            .service_at
            .keys()
            .any(|key| self.service_at.contains_key(key))
        {
            return false;
        }
        self.service_at.extend(later.service_at);
        self.services.extend(later.services);
        self.slices.extend(later.slices);
        self.pods.extend(later.pods);
        self.ignored_kinds.extend(later.ignored_kinds);
        true
    }
}

/// Reads and parses the state file at `path`.
pub fn load(path: &Path, scope: &Scope) -> Result<Loaded, StateFileError> {
    let (stamp, bytes) = read(path)?;
    let mut loaded = parse(utf8(path, &bytes)?, scope)?;
    loaded.version = Some((stamp, digest(&bytes)));
    Ok(loaded)
}

/// The state file's bytes as text: YAML is UTF-8, and a file that is not is refused.
pub(super) fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, StateFileError> {
    std::str::from_utf8(bytes).map_err(|e| StateFileError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// The bytes of the state file, if it is a regular file of at most `MAX_BYTES` that
/// holds more than white space. It is opened without blocking, so that a FIFO in its
/// place cannot hold the reader, and judged by the metadata of what was opened.
pub(super) fn read(path: &Path) -> Result<(Stamp, Vec<u8>), StateFileError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| StateFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(StateFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let too_large = |size| StateFileError::TooLarge {
        path: path.to_owned(),
        size,
        limit: MAX_BYTES,
    };
    if meta.len() > MAX_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew while it was read.
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StateFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok((Stamp::of(&meta), bytes))
}

fn add_object(objects: &mut Objects, value: Value, at: Location) -> Result<(), StateFileError> {
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (field(&value, "apiVersion"), field(&value, "kind"))
    else {
        return Err(StateFileError::NotAnObject {
            at,
            message: "not a Kubernetes object: apiVersion and kind are required".into(),
        });
    };
    let name = value
        .get("metadata")
        .and_then(|m| field(m, "name"))
        .filter(|n| !n.is_empty())
        .map(one_line)
        .unwrap_or_else(|| "(unnamed)".into());
    let invalid = |error: FieldError| StateFileError::Invalid {
        at: at.clone(),
        kind: kind.clone(),
        name: name.clone(),
        error,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => add_items(objects, &value, &at, invalid)?,
        ("v1", "Service") => add_service(objects, value, at.clone(), invalid)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: discovery::EndpointSlice = typed(value).map_err(invalid)?;
            if let Some(view) = convert::slice(&slice, &mut objects.names).map_err(invalid)? {
                objects.slices.push(view);
            }
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(value).map_err(invalid)?;
            convert::add_pod(&mut objects.pods, &pod.metadata).map_err(invalid)?;
        }
        // Nodes are checked, so that a broken one is refused, but not read: from a file,
        // this node's zone (for zone hints) is `--zone`'s.
        ("v1", "Node") => {
            typed::<core::Node>(value).map_err(invalid)?;
        }
        _ => {
            objects
                .ignored_kinds
                .insert(format!("{api_version} {kind}"));
        }
    }
    Ok(())
}

/// A List's items, each added as if it stood alone in the file.
fn add_items(
    objects: &mut Objects,
    list: &Value,
    at: &Location,
    invalid: impl Fn(FieldError) -> StateFileError,
) -> Result<(), StateFileError> {
    let items = match list.get("items") {
        Some(Value::Sequence(items)) => items.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => {
            return Err(invalid(FieldError {
                field: "items".into(),
                message: "not a list".into(),
            }))
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        // The items of a List inside a List are named by the outer item that holds
        // them: numbering them afresh would point at another object.
        let at = Location {
            document: at.document,
            item: Some(at.item.unwrap_or(i + 1)),
        };
        add_object(objects, item, at)?;
    }
    Ok(())
}

/// A Service, refused if another object in the file already named it.
fn add_service(
    objects: &mut Objects,
    value: Value,
    at: Location,
    invalid: impl Fn(FieldError) -> StateFileError,
) -> Result<(), StateFileError> {
    let svc: core::Service = typed(value).map_err(&invalid)?;
    if let Ok(name) = convert::name(&svc.metadata) {
        let service = ServiceKey::new(convert::namespace(&svc.metadata), name);
        if let Some(first) = objects.service_at.get(&service) {
            return Err(StateFileError::Duplicate {
                first: first.clone(),
                at,
                service,
            });
        }
        objects.service_at.insert(service, at);
    }
    if let Some(front) = convert::service(&svc).map_err(invalid)? {
        objects.services.push(front);
    }
    Ok(())
}

/// Deserializes into a k8s-openapi type, naming the field at fault on failure.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        field: one_line(e.path().to_string()),
        message: e.inner().to_string(),
    })
}

/// Text from the file as it may stand in a refusal: a name or a map key with a newline
/// would otherwise split the one log line that reports it, so such text is quoted and
/// escaped.
fn one_line(text: String) -> String {
    if text.chars().any(char::is_control) {
        format!("{text:?}")
    } else {
        text
    }
}

/// What a look at the file's metadata sees (`file_watch` compares them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) len: u64,
    pub(super) modified: Option<SystemTime>,
    pub(super) ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A digest of one version of the file: only digests are kept between looks, so a
/// large file is held in memory once, while it is parsed.
pub(super) fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
pub(super) mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::ServiceKey;

    /// Service `name` in namespace `shop` with one port `http` 80 → `targetPort: http`.
    pub(crate) fn service_doc(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, targetPort: http}}]}}\n"
        )
    }

    /// A slice of Service `service` whose `http` port is 8080, one endpoint per address.
    pub(crate) fn slice_doc(service: &str, name: &str, addresses: &[&str]) -> String {
        let endpoints: Vec<String> = addresses
            .iter()
            .map(|a| format!("{{addresses: [{a}], targetRef: {{kind: Pod, name: pod-{a}}}}}"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    }

    /// Prefixes every line with two spaces, then the first with `- `, for a List item.
    fn item(doc: &str) -> String {
        let mut lines = doc.lines();
        let first = format!("  - {}\n", lines.next().unwrap_or_default());
        first + &lines.map(|l| format!("    {l}\n")).collect::<String>()
    }

    fn list_doc(items: &[String]) -> String {
        let items: String = items.iter().map(|d| item(d)).collect();
        format!("apiVersion: v1\nkind: List\nitems:\n{items}")
    }

    fn key(name: &str) -> ServiceKey {
        ServiceKey::new("shop", name)
    }

    /// `ip:port` of every endpoint of the first port of `shop/name`.
    pub(crate) fn endpoints(table: &ServiceTable, name: &str) -> Vec<String> {
        table.get(&key(name)).expect("service in the table").ports[0]
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    pub(crate) fn parse_ok(text: &str) -> Loaded {
        parse(text, &Scope::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(text: &str) -> StateFileError {
        parse(text, &Scope::default()).expect_err("a refused state file")
    }

    #[test]
    fn multi_document_yaml() {
        let text = format!(
            "---\n{}---\n{}---\n{}---\n",
            service_doc("web", "10.96.0.10"),
            slice_doc("web", "web-1", &["10.1.0.2", "10.1.0.1"]),
            slice_doc("web", "web-2", &["10.1.0.3"]),
        );
        let loaded = parse_ok(&text);
        assert_eq!(loaded.table.len(), 1);
        assert_eq!(
            endpoints(&loaded.table, "web"),
            ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
        );
        let svc = loaded.table.get(&key("web")).unwrap();
        assert_eq!(
            svc.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(&*svc.ports[0].endpoints[0].pod, "pod-10.1.0.1");
        assert!(loaded.warnings.is_empty());
        assert!(loaded.ignored_kinds.is_empty());
    }

    #[test]
    fn empty_and_comment_only_files_give_an_empty_table() {
        for text in ["", "\n", "# nothing yet\n", "---\n", "---\n---\n"] {
            let loaded = parse_ok(text);
            assert!(loaded.table.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn kind_list() {
        let text = list_doc(&[
            service_doc("web", "10.96.0.10"),
            slice_doc("web", "web-1", &["10.1.0.1"]),
            service_doc("api", "10.96.0.11"),
        ]);
        let loaded = parse_ok(&text);
        assert_eq!(
            loaded.table.services.keys().cloned().collect::<Vec<_>>(),
            [key("api"), key("web")]
        );
        assert_eq!(endpoints(&loaded.table, "web"), ["10.1.0.1:8080"]);
        assert!(endpoints(&loaded.table, "api").is_empty());
        // Lists and plain documents mix.
        let text = format!(
            "{}---\n{}",
            service_doc("web", "10.96.0.10"),
            list_doc(&[slice_doc("web", "web-1", &["10.1.0.1"])])
        );
        assert_eq!(endpoints(&parse_ok(&text).table, "web"), ["10.1.0.1:8080"]);
        assert!(parse_ok("apiVersion: v1\nkind: List\nitems: []\n")
            .table
            .is_empty());
        assert!(parse_ok("apiVersion: v1\nkind: List\n").table.is_empty());
    }

    #[test]
    fn errors_in_a_list_name_document_and_item() {
        let text = format!(
            "{}---\n{}",
            service_doc("web", "10.96.0.10"),
            list_doc(&[
                slice_doc("web", "web-1", &["10.1.0.1"]),
                slice_doc("web", "web-2", &["10.1.0.999"]),
            ])
        );
        let err = parse_err(&text);
        match &err {
            StateFileError::Invalid {
                at,
                kind,
                name,
                error,
            } => {
                assert_eq!(
                    at,
                    &Location {
                        document: 2,
                        item: Some(2)
                    }
                );
                assert_eq!(kind, "EndpointSlice");
                assert_eq!(name, "web-2");
                assert_eq!(error.field, "endpoints[0].addresses[0]");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().starts_with(
                "document 2, item 2 (EndpointSlice web-2): endpoints[0].addresses[0]: "
            ),
            "{err}"
        );
        let err = parse_err("apiVersion: v1\nkind: List\nitems: {a: 1}\n");
        assert!(
            matches!(&err, StateFileError::Invalid { error, .. } if error.field == "items"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kinds_are_ignored() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec: {{replicas: 2}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\ndata: {{a: b}}\n---\n\
             apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: old}}\n---\n{}",
            service_doc("web", "10.96.0.10")
        );
        let loaded = parse_ok(&text);
        assert_eq!(loaded.table.len(), 1);
        assert_eq!(
            loaded
                .ignored_kinds
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                "apps/v1 Deployment",
                "discovery.k8s.io/v1beta1 EndpointSlice",
                "v1 ConfigMap"
            ]
        );
    }

    #[test]
    fn a_document_that_is_not_yaml_is_refused_with_its_number() {
        let text = format!("{}---\nspec: [unclosed\n", service_doc("web", "10.96.0.10"));
        let err = parse_err(&text);
        assert!(
            matches!(err, StateFileError::Yaml { document: 2, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("document 2 is not valid YAML: "),
            "{err}"
        );
        let err = parse_err("a: 1\na: 2\n");
        assert!(
            matches!(err, StateFileError::Yaml { document: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_document_without_api_version_or_kind_is_not_an_object() {
        for (text, document) in [
            ("kind: Service\nmetadata: {name: web}\n".to_string(), 1),
            ("apiVersion: v1\nmetadata: {name: web}\n".to_string(), 1),
            (
                format!("{}---\njust a string\n", service_doc("web", "10.96.0.10")),
                2,
            ),
            ("- apiVersion: v1\n  kind: Service\n".to_string(), 1),
            ("apiVersion: 1\nkind: Service\n".to_string(), 1),
        ] {
            let err = parse_err(&text);
            match &err {
                StateFileError::NotAnObject { at, .. } => {
                    assert_eq!(
                        at,
                        &Location {
                            document,
                            item: None
                        },
                        "{text}"
                    )
                }
                other => panic!("{text}: {other:?}"),
            }
            assert!(
                err.to_string()
                    .starts_with(&format!("document {document}: not a Kubernetes object")),
                "{err}"
            );
        }
        let err = parse_err("apiVersion: v1\nkind: List\nitems: [{name: x}]\n");
        assert!(
            matches!(&err, StateFileError::NotAnObject { at, .. } if *at == Location { document: 1, item: Some(1) }),
            "{err:?}"
        );
    }

    #[test]
    fn a_wrong_typed_field_is_refused_naming_its_path() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{clusterIP: 10.96.0.11, ports: [{{name: http, port: eighty}}]}}\n",
            service_doc("web", "10.96.0.10")
        );
        let err = parse_err(&text);
        match &err {
            StateFileError::Invalid {
                at,
                kind,
                name,
                error,
            } => {
                assert_eq!(
                    at,
                    &Location {
                        document: 2,
                        item: None
                    }
                );
                assert_eq!((kind.as_str(), name.as_str()), ("Service", "api"));
                assert_eq!(error.field, "spec.ports[0].port");
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.starts_with("document 2 (Service api): spec.ports[0].port: "),
            "{message}"
        );
        assert!(message.contains("eighty"), "{message}");

        let err = parse_err(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1}\n\
             addressType: IPv4\nendpoints: [{addresses: [10.1.0.1], conditions: {ready: maybe}}]\n",
        );
        assert!(
            err.to_string()
                .starts_with("document 1 (EndpointSlice web-1): endpoints[0].conditions.ready: "),
            "{err}"
        );
    }

    #[test]
    fn conversion_errors_name_kind_and_object() {
        let err = parse_err(&service_doc("web", "10.96.0.300"));
        assert!(
            err.to_string()
                .starts_with("document 1 (Service web): spec.clusterIP: "),
            "{err}"
        );
        let err = parse_err("apiVersion: v1\nkind: Pod\nmetadata: {labels: {a: b}}\n");
        assert_eq!(
            err.to_string(),
            "document 1 (Pod (unnamed)): metadata.name: missing"
        );
        let err = parse_err("apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: [oops]}\n");
        assert!(
            err.to_string()
                .starts_with("document 1 (Node n1): metadata.labels: "),
            "{err}"
        );
    }

    #[test]
    fn pods_in_the_file_give_weights_and_scope_applies() {
        let text = format!(
            "apiVersion: v1\nkind: Service\n\
             metadata: {{name: web, namespace: shop, annotations: {{carousel.dev/weights: 'version=custom:3', carousel.dev/load-balancer: nope}}}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80}}]}}\n---\n\
             {}---\n{}---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-10.1.0.1, namespace: shop, labels: {{version: custom}}}}\n",
            slice_doc("web", "web-1", &["10.1.0.1", "10.1.0.2"]),
            service_doc("mine", "10.96.0.12").replace(
                "namespace: shop}",
                "namespace: shop, labels: {service.kubernetes.io/service-proxy-name: carousel}}"
            ),
        );
        let loaded = parse_ok(&text);
        let weights: Vec<u32> = loaded.table.get(&key("web")).unwrap().ports[0]
            .endpoints
            .iter()
            .map(|e| e.weight)
            .collect();
        assert_eq!(weights, [3, 1]);
        assert_eq!(
            loaded.table.len(),
            1,
            "shop/mine belongs to another proxy name"
        );
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].is_config_error());

        let scoped = parse(
            &text,
            &Scope {
                proxy_name: Some("carousel".into()),
            },
        )
        .unwrap();
        assert_eq!(
            scoped.table.services.keys().cloned().collect::<Vec<_>>(),
            [key("mine")]
        );
        assert!(scoped.warnings.is_empty());
    }

    #[test]
    fn the_kubechaos_example_parses() {
        let text = include_str!("../../deploy/examples/kubechaos-state.yaml");
        let loaded = parse_ok(text);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(
            loaded.ignored_kinds.is_empty(),
            "{:?}",
            loaded.ignored_kinds
        );
        assert_eq!(loaded.table.len(), 1);
        let svc = loaded
            .table
            .get(&ServiceKey::new("default", "kubechaos-svc"))
            .unwrap();
        assert_eq!(
            svc.cluster_ips,
            vec!["127.77.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(svc.balancing.algorithm, crate::model::Algorithm::RoundRobin);
        assert_eq!(svc.ports.len(), 1);
        let port = &svc.ports[0];
        assert_eq!((port.name.as_str(), port.port), ("http", 3000));
        let got: Vec<(String, String)> = port
            .endpoints
            .iter()
            .map(|e| (e.addr.to_string(), e.pod.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("127.77.1.1:3000", "kubechaos-original-7d4b9-a1"),
                ("127.77.1.2:3000", "kubechaos-original-7d4b9-b2"),
                ("127.77.1.3:3000", "kubechaos-custom-5f6c8-c3"),
                ("127.77.1.4:3000", "kubechaos-custom-5f6c8-d4"),
            ]
            .map(|(a, p)| (a.to_string(), p.to_string()))
        );
        assert!(port
            .endpoints
            .iter()
            .all(|e| e.ready && e.serving && !e.terminating && e.weight == 1));
        assert_eq!(port.eligible().len(), 4);
    }

    /// A state file of `n` Services with one endpoint each, `bad` (1-based) broken.
    fn many_services(n: usize, bad: Option<usize>) -> String {
        (1..=n)
            .map(|i| {
                let port = if Some(i) == bad { "[oops" } else { "80" };
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\n\
                     spec: {{clusterIP: 10.96.{}.{}, ports: [{{port: {port}}}]}}\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn a_large_file_reads_the_same_on_two_threads_and_errors_name_the_whole_files_place() {
        let text = many_services(12_000, None);
        assert!(text.len() > PARALLEL_FROM);
        let (first, second) = split_documents(&text).unwrap();
        assert!(second.starts_with("---\n") && first.ends_with('\n'));
        let loaded = parse(&text, &Scope::default()).unwrap();
        assert_eq!(loaded.table.len(), 12_000);
        // A broken document late in the file: named as the whole file numbers it.
        let text = many_services(12_000, Some(11_000));
        let err = parse(&text, &Scope::default()).unwrap_err();
        assert!(
            matches!(
                err,
                StateFileError::Yaml {
                    document: 11_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("at line 54999 "), "{err}");
    }

    #[test]
    fn the_same_service_twice_is_refused_naming_both_places_even_across_the_two_halves() {
        // In one half (a small file) and across the halves of a large one.
        let dup = "---\napiVersion: v1\nkind: Service\nmetadata: {name: s2, namespace: big}\n\
                   spec: {clusterIP: 10.96.9.9, ports: [{port: 81}]}\n";
        for n in [3, 12_000] {
            let text = format!("{}{dup}", many_services(n, None));
            let err = parse(&text, &Scope::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "document {} (Service big/s2): the same Service as document 2; a file holds each object once",
                    n + 1
                )
            );
        }
        // The same name in another namespace is another Service.
        let other = dup.replace("namespace: big", "namespace: small");
        let text = format!("{}{other}", many_services(3, None));
        assert_eq!(parse(&text, &Scope::default()).unwrap().table.len(), 4);
    }

    #[test]
    fn documents_split_only_at_a_document_start() {
        assert_eq!(split_documents("a: 1\n---x: 2\n"), None);
        assert_eq!(
            split_documents("a: 1\nb: 2\n---\nc: 3\n"),
            Some(("a: 1\nb: 2\n", "---\nc: 3\n"))
        );
        assert_eq!(split_documents("a: 1\n---"), Some(("a: 1\n", "---")));
    }

    #[test]
    fn load_reads_the_file_or_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, service_doc("web", "10.96.0.10")).unwrap();
        assert_eq!(load(&path, &Scope::default()).unwrap().table.len(), 1);
        let missing = dir.path().join("missing.yaml");
        let err = load(&missing, &Scope::default()).unwrap_err();
        assert!(
            matches!(&err, StateFileError::Read { path, .. } if *path == missing),
            "{err:?}"
        );
    }
}
