//! The state file: ordinary Kubernetes objects in YAML, as `kubectl get -o yaml` prints
//! them. `parse` is pure and `load` reads the file as carousel accepts it (a regular
//! file, bounded, UTF-8); `file_watch` polls it and publishes each good version. A
//! version that does not parse or validate is refused whole, with the document and the
//! field named. A field that an object's type does not have is a warning, not a refusal:
//! the object is read without it.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use crate::discovery::convert::{self, FieldError, PodLabels, Scope, Warning};
use crate::discovery::names::Names;
use crate::discovery::{validate, yaml_budget};
use crate::model::{ServiceKey, ServiceTable};

/// The largest state file carousel reads; a larger one is refused, naming this limit.
/// 10 000 Services of 50 endpoints each are about 100 MB of YAML.
pub const MAX_BYTES: u64 = 256 << 20;

/// The most unknown fields one version of the file keeps as warnings; the rest are only
/// counted (`Loaded::more_unknown_fields`), so that a file of a million misspelt keys
/// costs a count, not a million log lines.
pub const MAX_UNKNOWN_FIELDS: usize = 20;

/// Where in the file an object stands: `document 3` or `document 1, item 4`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// The unknown fields first (at most `MAX_UNKNOWN_FIELDS`, in the file's order), then
    /// what the objects' conversion reported.
    pub warnings: Vec<Warning>,
    /// Unknown fields past the first `MAX_UNKNOWN_FIELDS`, counted only.
    pub more_unknown_fields: usize,
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
    unknown: UnknownFields,
    /// How many documents were read, empty ones too: the documents of a later half of
    /// the file are numbered after these.
    documents: usize,
}

/// The unknown fields of one version: the first `MAX_UNKNOWN_FIELDS` as warnings, in
/// the file's order, and how many more there are.
#[derive(Default)]
struct UnknownFields {
    kept: Vec<Warning>,
    more: usize,
}

impl UnknownFields {
    fn add(&mut self, object: &Object, path: &serde_ignored::Path<'_>) {
        if self.kept.len() == MAX_UNKNOWN_FIELDS {
            self.more += 1;
            return;
        }
        let mut field = String::new();
        field_path(path, &mut field);
        self.kept.push(Warning::UnknownField {
            at: object.at.clone(),
            object: object.label.clone(),
            field,
        });
    }

    /// Adds the unknown fields of the documents that follow, numbered from `after` on.
    fn extend(&mut self, later: UnknownFields, after: usize) {
        for mut warning in later.kept {
            if self.kept.len() == MAX_UNKNOWN_FIELDS {
                self.more += 1;
                continue;
            }
            if let Warning::UnknownField { at, .. } = &mut warning {
                at.document += after;
            }
            self.kept.push(warning);
        }
        self.more += later.more;
    }
}

/// `spec.ports[0].nmae`: a path as serde_path_to_error writes it, each map key
/// `bounded`. The depth is bounded by the YAML parser's recursion limit.
fn field_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path;
    use std::fmt::Write as _;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            field_path(parent, out);
            let _ = write!(out, "[{index}]");
        }
        Path::Map { parent, key } => {
            field_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&bounded(key));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent, out),
    }
}

/// The most bytes of text from the file that one part of a warning repeats.
const QUOTED_BYTES: usize = 64;

/// Text from the file as a warning repeats it: as it is when short and plain, else
/// quoted and escaped, at most `QUOTED_BYTES` of it once escaped, with the length of
/// the whole. A warning is repeated for each unknown field, so no part of it may grow
/// with the file, nor with escaping (`\u{80}` is six bytes for two).
fn bounded(text: &str) -> String {
    if text.len() <= QUOTED_BYTES && !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in text.chars() {
        let escaped = c.escape_debug();
        if quoted.len() + escaped.len() > QUOTED_BYTES + 1 {
            return format!("{quoted}\"... ({} bytes)", text.len());
        }
        quoted.extend(escaped);
    }
    quoted.push('"');
    quoted
}

/// An object of the file, as its warnings name it.
struct Object {
    at: Location,
    /// `Service shop/web`, `Node n1`, `List`.
    label: String,
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
    let (table, joined) = convert::join(&objects.services, &objects.slices, &objects.pods, scope);
    let mut warnings = objects.unknown.kept;
    warnings.extend(joined);
    Ok(Loaded {
        table,
        warnings,
        more_unknown_fields: objects.unknown.more,
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
        objects.documents = document;
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
        let after = self.documents;
        self.service_at
            .extend(later.service_at.into_iter().map(|(key, mut at)| {
                at.document += after;
                (key, at)
            }));
        self.services.extend(later.services);
        self.slices.extend(later.slices);
        self.pods.extend(later.pods);
        self.ignored_kinds.extend(later.ignored_kinds);
        self.unknown.extend(later.unknown, after);
        self.documents += later.documents;
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
    let meta = |k: &str| {
        value
            .get("metadata")
            .and_then(|m| field(m, k))
            .filter(|n| !n.is_empty())
    };
    let (name, namespace) = (meta("name"), meta("namespace"));
    let object = Object {
        at: at.clone(),
        label: object_label(&kind, namespace.as_deref(), name.as_deref()),
    };
    let name = name.map(one_line).unwrap_or_else(|| "(unnamed)".into());
    let invalid = |error: FieldError| StateFileError::Invalid {
        at: at.clone(),
        kind: kind.clone(),
        name: name.clone(),
        error,
    };
    let unknown = &mut objects.unknown;
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => add_items(objects, value, &object, invalid)?,
        ("v1", "Service") => add_service(objects, value, &object, invalid)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: discovery::EndpointSlice =
                typed(value, &object, unknown).map_err(invalid)?;
            validate::slice(&slice).map_err(invalid)?;
            if let Some(view) = convert::slice(&slice, &mut objects.names).map_err(invalid)? {
                objects.slices.push(view);
            }
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(value, &object, unknown).map_err(invalid)?;
            convert::add_pod(&mut objects.pods, &pod.metadata).map_err(invalid)?;
        }
        // Nodes are checked, so that a broken one is refused, but not read: from a file,
        // this node's zone (for zone hints) is `--zone`'s.
        ("v1", "Node") => {
            typed::<core::Node>(value, &object, unknown).map_err(invalid)?;
        }
        _ => {
            objects
                .ignored_kinds
                .insert(format!("{api_version} {kind}"));
        }
    }
    Ok(())
}

/// `Service shop/web`: how a warning names an object. The namespace is `default` when
/// the object names none, as for the Service's own key; names are `bounded`.
fn object_label(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    let kind = bounded(kind);
    let name = name.map_or_else(|| "(unnamed)".into(), bounded);
    match kind.as_str() {
        "List" => kind,
        "Node" => format!("{kind} {name}"),
        _ => format!("{kind} {}/{name}", bounded(namespace.unwrap_or("default"))),
    }
}

/// The fields of a `kind: List` besides its items, read only to find the unknown ones.
#[derive(Deserialize)]
struct ListFields {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(rename = "metadata", default)]
    _metadata: Option<ListMeta>,
}

/// A List's items, each added as if it stood alone in the file.
fn add_items(
    objects: &mut Objects,
    mut list: Value,
    object: &Object,
    invalid: impl Fn(FieldError) -> StateFileError,
) -> Result<(), StateFileError> {
    let items = match list.as_mapping_mut().and_then(|m| m.remove("items")) {
        Some(Value::Sequence(items)) => items,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => {
            return Err(invalid(FieldError {
                field: "items".into(),
                message: "not a list".into(),
            }))
        }
    };
    typed::<ListFields>(list, object, &mut objects.unknown).map_err(&invalid)?;
    let at = &object.at;
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
    object: &Object,
    invalid: impl Fn(FieldError) -> StateFileError,
) -> Result<(), StateFileError> {
    let svc: core::Service = typed(value, object, &mut objects.unknown).map_err(&invalid)?;
    validate::service(&svc).map_err(&invalid)?;
    if let Ok(name) = convert::name(&svc.metadata) {
        let service = ServiceKey::new(convert::namespace(&svc.metadata), name);
        if let Some(first) = objects.service_at.get(&service) {
            return Err(StateFileError::Duplicate {
                first: first.clone(),
                at: object.at.clone(),
                service,
            });
        }
        objects.service_at.insert(service, object.at.clone());
    }
    if let Some(front) = convert::service(&svc).map_err(invalid)? {
        objects.services.push(front);
    }
    Ok(())
}

/// The kinds carousel reads, as `apiVersion kind`.
const READ_KINDS: [&str; 5] = [
    "v1 Service",
    "discovery.k8s.io/v1 EndpointSlice",
    "v1 Pod",
    "v1 Node",
    "v1 List",
];

/// What the log says of the objects of a kind carousel does not read (`apiVersion
/// kind`, as in `Loaded::ignored_kinds`), with what to write instead where there is
/// something: v1 Endpoints, which carousel never reads, and another apiVersion of a
/// kind it reads.
pub fn ignored_kind_note(kind: &str) -> String {
    let ignored = format!("objects of kind {} are ignored", bounded(kind));
    if kind == "v1 Endpoints" {
        return format!(
            "{ignored}: carousel reads endpoints from EndpointSlices only; write them as \
             discovery.k8s.io/v1 EndpointSlice objects instead (see docs/state-file.md)"
        );
    }
    let name = kind.rsplit(' ').next().unwrap_or(kind);
    match READ_KINDS
        .iter()
        .find(|k| k.rsplit(' ').next() == Some(name))
    {
        Some(read) => format!("{ignored}: carousel reads {read}"),
        None => ignored,
    }
}

/// Deserializes into a k8s-openapi type, naming the field at fault on failure. Each
/// field the type does not have (serde skips it) is filed in `unknown`.
fn typed<T: DeserializeOwned>(
    value: Value,
    object: &Object,
    unknown: &mut UnknownFields,
) -> Result<T, FieldError> {
    let mut skipped = |path: serde_ignored::Path<'_>| unknown.add(object, &path);
    let value = serde_ignored::Deserializer::new(value, &mut skipped);
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

    /// What `parse` kept as unknown-field warnings, as logged.
    fn unknown_fields(loaded: &Loaded) -> Vec<String> {
        loaded
            .warnings
            .iter()
            .filter(|w| matches!(w, Warning::UnknownField { .. }))
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_misspelt_field_warns_naming_document_object_and_path_and_the_rest_is_read() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
             spec: {{clusterIP: 10.96.0.11, prots: [{{name: http, port: 80}}]}}\n",
            slice_doc("api", "api-1", &["10.1.0.1"]),
        );
        let loaded = parse_ok(&text);
        assert_eq!(
            unknown_fields(&loaded),
            ["document 2 (Service default/web): unknown field spec.prots, ignored"]
        );
        match &loaded.warnings[0] {
            Warning::UnknownField { at, object, field } => {
                assert_eq!(
                    at,
                    &Location {
                        document: 2,
                        item: None
                    }
                );
                assert_eq!(
                    (object.as_str(), field.as_str()),
                    ("Service default/web", "spec.prots")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(loaded.warnings[0].is_config_error());
        assert_eq!(loaded.more_unknown_fields, 0);
        // Read without the field: the Service has no ports, as kubectl's lenient mode reads it.
        let svc = loaded
            .table
            .get(&ServiceKey::new("default", "web"))
            .unwrap();
        assert!(svc.ports.is_empty());
    }

    #[test]
    fn nested_unknown_fields_are_named_by_their_whole_path_in_every_kind() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop, labls: {{a: b}}}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, targetPort: http}}, {{port: 81, nmae: x}}],\n\
             \x20 sessionAffinityConfig: {{clientIP: {{timeoutSecond: 5}}}}}}\n\
             status: {{loadBalancer: {{ingres: []}}}}\n---\n\
             {}---\n\
             apiVersion: v1\nkind: List\nmetdata: {{}}\nmetadata: {{resourceVersion: '', nme: x}}\nitems:\n\
             - apiVersion: v1\n  kind: Pod\n  metadata: {{name: p, namespace: shop}}\n  spec: {{containers: [{{name: c, imag: x}}]}}\n\
             - apiVersion: v1\n  kind: Node\n  metadata: {{name: n1}}\n  spec: {{podCIDRR: x}}\n",
            slice_doc("web", "web-1", &["10.1.0.1"]).replace(
                "endpoints: [{addresses",
                "endpoints: [{conditions: {redy: true}, addresses"
            ),
        );
        let loaded = parse_ok(&text);
        assert_eq!(
            unknown_fields(&loaded),
            [
                "document 1 (Service shop/web): unknown field metadata.labls, ignored",
                "document 1 (Service shop/web): unknown field spec.ports[1].nmae, ignored",
                "document 1 (Service shop/web): unknown field spec.sessionAffinityConfig.clientIP.timeoutSecond, ignored",
                "document 1 (Service shop/web): unknown field status.loadBalancer.ingres, ignored",
                "document 2 (EndpointSlice shop/web-1): unknown field endpoints[0].conditions.redy, ignored",
                "document 3 (List): unknown field metdata, ignored",
                "document 3 (List): unknown field metadata.nme, ignored",
                "document 3, item 1 (Pod shop/p): unknown field spec.containers[0].imag, ignored",
                "document 3, item 2 (Node n1): unknown field spec.podCIDRR, ignored",
            ]
        );
        assert_eq!(endpoints(&loaded.table, "web"), ["10.1.0.1:8080"]);
    }

    #[test]
    fn what_kubectl_prints_has_no_unknown_field() {
        let text = "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\nitems:\n\
            - apiVersion: v1\n  kind: Service\n  metadata:\n    annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}\n\
            \x20   creationTimestamp: \"2024-05-01T10:00:00Z\"\n    labels: {app: web}\n    name: web\n    namespace: shop\n\
            \x20   resourceVersion: \"4242\"\n    uid: 0b7d5d1e-3f6a-4c36-9a51-7f1a2b3c4d5e\n\
            \x20   managedFields:\n    - apiVersion: v1\n      fieldsType: FieldsV1\n      fieldsV1: {f:spec: {f:ports: {}}}\n\
            \x20     manager: kubectl\n      operation: Update\n      time: \"2024-05-01T10:00:00Z\"\n\
            \x20 spec:\n    clusterIP: 10.96.0.10\n    clusterIPs: [10.96.0.10]\n    internalTrafficPolicy: Cluster\n\
            \x20   ipFamilies: [IPv4]\n    ipFamilyPolicy: SingleStack\n\
            \x20   ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]\n\
            \x20   selector: {app: web}\n    sessionAffinity: None\n    type: ClusterIP\n\
            \x20 status: {loadBalancer: {}}\n\
            - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  addressType: IPv4\n\
            \x20 endpoints:\n  - addresses: [10.1.0.1]\n    conditions: {ready: true, serving: true, terminating: false}\n\
            \x20   nodeName: n1\n    targetRef: {kind: Pod, name: web-1, namespace: shop, uid: 1d2e3f}\n    zone: a\n\
            \x20 metadata:\n    generateName: web-\n    generation: 3\n    labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}\n\
            \x20   name: web-abcde\n    namespace: shop\n    ownerReferences: [{apiVersion: v1, blockOwnerDeletion: true, controller: true, kind: Service, name: web, uid: 0b7d}]\n\
            \x20 ports: [{name: http, port: 8080, protocol: TCP}]\n";
        let loaded = parse_ok(text);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(
            endpoints(&loaded.table, "web"),
            ["10.1.0.1:8080"],
            "{:?}",
            loaded.table
        );
    }

    #[test]
    fn an_unknown_key_is_quoted_bounded_in_its_warning() {
        // YAML allows implicit keys up to 1024 characters.
        let long = "k".repeat(1_000);
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
             spec: {{clusterIP: 10.96.0.10, \"a\\nb\": 1, {long}: 2}}\n"
        );
        let lines = unknown_fields(&parse_ok(&text));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            r#"document 1 (Service default/web): unknown field spec."a\nb", ignored"#
        );
        assert!(lines[1].contains("(1000 bytes)"), "{}", lines[1]);
        assert!(lines[1].len() < 200, "{}", lines[1]);
    }

    #[test]
    fn hostile_names_and_keys_keep_the_warnings_within_the_fuzz_targets_bound() {
        // One anchor of 40 characters written in two bytes each (YAML's `\L`, U+2028)
        // that escape to eight, as the namespace, the name and the unknown key of each
        // of many ports: every warning repeats it three times, each cut to `QUOTED_BYTES`.
        let anchor = "\\L".repeat(40);
        let ports: String = (1..=200)
            .map(|i| format!("{{name: p{i}, port: {i}, *n: 1}},"))
            .collect();
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: &n \"{anchor}\", namespace: *n}}\n\
             spec: {{clusterIP: 10.96.0.10, ports: [{ports}]}}\n"
        );
        let loaded = parse_ok(&text);
        let lines = unknown_fields(&loaded);
        assert_eq!(lines.len(), MAX_UNKNOWN_FIELDS);
        assert_eq!(loaded.more_unknown_fields, 200 - MAX_UNKNOWN_FIELDS);
        let total: usize = lines.iter().map(String::len).sum();
        // fuzz/fuzz_targets/state_file.rs: 16 times the input and 4096 bytes.
        assert!(
            total <= 16 * text.len() + 4096,
            "{total} bytes from {}",
            text.len()
        );
        for line in &lines {
            assert!(line.len() <= 400, "{line}");
            assert!(line.contains("... (120 bytes)"), "{line}");
        }
        assert_eq!(bounded("web"), "web");
        assert_eq!(bounded("a\u{0}b"), "\"a\\0b\"");
        let cut = bounded(&"\u{2028}".repeat(40));
        assert_eq!(cut.len(), 1 + 8 * 8 + "\"... (120 bytes)".len(), "{cut}");
    }

    #[test]
    fn a_hostile_file_of_100_000_unknown_fields_keeps_the_first_twenty_and_counts_the_rest() {
        // In one document.
        let keys: String = (0..100_000).map(|i| format!(", x{i}: 0")).collect();
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10{keys}}}\n"
        );
        let loaded = parse_ok(&text);
        let lines = unknown_fields(&loaded);
        assert_eq!(lines.len(), MAX_UNKNOWN_FIELDS);
        assert_eq!(lines.len(), loaded.warnings.len());
        assert_eq!(loaded.more_unknown_fields, 100_000 - MAX_UNKNOWN_FIELDS);
        assert_eq!(
            lines[19],
            "document 1 (Service default/web): unknown field spec.x19, ignored"
        );

        // Over 2 000 documents, a file large enough to be read in two halves: the first
        // twenty are still the file's first, and the count covers both halves.
        let docs: Vec<String> = (0..2_000)
            .map(|d| {
                let keys: String = (0..50).map(|i| format!(", y{i}: {d}")).collect();
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{d}, namespace: big}}\n\
                     spec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80{keys}}}]}}\n",
                    d / 250,
                    d % 250 + 1
                )
            })
            .collect();
        let text = docs.join("---\n");
        assert!(text.len() > PARALLEL_FROM && split_documents(&text).is_some());
        let loaded = parse_ok(&text);
        assert_eq!(loaded.table.len(), 2_000);
        let lines = unknown_fields(&loaded);
        assert_eq!(lines.len(), MAX_UNKNOWN_FIELDS);
        assert_eq!(loaded.more_unknown_fields, 100_000 - MAX_UNKNOWN_FIELDS);
        assert_eq!(
            lines[0],
            "document 1 (Service big/s0): unknown field spec.ports[0].y0, ignored"
        );
    }

    #[test]
    fn documents_of_the_second_half_are_numbered_as_the_whole_file_numbers_them() {
        // Unknown fields only in the last document, which the second thread reads.
        let mut text = many_services(12_000, None);
        text.push_str("---\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspex: {}\n");
        assert!(text.len() > PARALLEL_FROM);
        let loaded = parse_ok(&text);
        assert_eq!(
            unknown_fields(&loaded),
            ["document 12002 (Node n1): unknown field spex, ignored"]
        );
    }

    /// The refusal of a file of one Service `web` with `spec` added to its spec.
    fn service_refusal(spec: &str) -> String {
        parse_err(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
             spec: {{clusterIP: 10.96.0.10, {spec}}}\n"
        ))
        .to_string()
    }

    #[test]
    fn a_misspelt_session_affinity_is_refused_in_the_api_servers_words() {
        assert_eq!(
            service_refusal("sessionAffinity: ClientIp"),
            r#"document 1 (Service web): spec.sessionAffinity: Unsupported value: "ClientIp": supported values: "ClientIP", "None""#
        );
    }

    #[test]
    fn every_enum_field_carousel_reads_is_checked_in_the_file() {
        for (spec, field) in [
            ("type: Clusterip", "spec.type"),
            (
                "ports: [{port: 80, protocol: Tcp}]",
                "spec.ports[0].protocol",
            ),
            ("externalTrafficPolicy: local", "spec.externalTrafficPolicy"),
            ("internalTrafficPolicy: Node", "spec.internalTrafficPolicy"),
            ("ipFamilyPolicy: Dual", "spec.ipFamilyPolicy"),
            ("ipFamilies: [IPv4, ipv6]", "spec.ipFamilies[1]"),
            ("trafficDistribution: Close", "spec.trafficDistribution"),
        ] {
            let message = service_refusal(spec);
            assert!(
                message.starts_with(&format!(
                    "document 1 (Service web): {field}: Unsupported value: "
                )),
                "{spec}: {message}"
            );
            assert!(message.contains("supported values: "), "{message}");
        }
        let message = parse_err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec: {clusterIP: 10.96.0.10}\n\
             status: {loadBalancer: {ingress: [{ip: 1.2.3.4, ipMode: vip}]}}\n",
        )
        .to_string();
        assert_eq!(
            message,
            r#"document 1 (Service lb): status.loadBalancer.ingress[0].ipMode: Unsupported value: "vip": supported values: "Proxy", "VIP""#
        );
        // A slice's address type and port protocol, also in a List.
        let slice = slice_doc("web", "web-1", &["10.1.0.1"]);
        let message =
            parse_err(&slice.replace("addressType: IPv4", "addressType: IPV4")).to_string();
        assert_eq!(
            message,
            r#"document 1 (EndpointSlice web-1): addressType: Unsupported value: "IPV4": supported values: "FQDN", "IPv4", "IPv6""#
        );
        let message = parse_err(&list_doc(&[
            service_doc("web", "10.96.0.10"),
            slice.replace("port: 8080}", "port: 8080, protocol: tcp}"),
        ]))
        .to_string();
        assert_eq!(
            message,
            r#"document 1, item 2 (EndpointSlice web-1): ports[0].protocol: Unsupported value: "tcp": supported values: "SCTP", "TCP", "UDP""#
        );
    }

    #[test]
    fn the_values_kubernetes_accepts_are_accepted_and_read_as_kube_proxy_reads_them() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
            spec: {type: LoadBalancer, clusterIP: 10.96.0.10, sessionAffinity: ClientIP,\n\
            \x20 externalTrafficPolicy: Local, internalTrafficPolicy: Local, ipFamilyPolicy: PreferDualStack,\n\
            \x20 ipFamilies: [IPv4, IPv6], trafficDistribution: PreferSameZone,\n\
            \x20 ports: [{name: a, port: 80, protocol: ''}, {name: s, port: 81, protocol: SCTP}]}\n";
        let loaded = parse_ok(text);
        let svc = loaded.table.get(&key("web")).unwrap();
        assert!(svc.balancing.affinity.is_some());
        // An empty protocol is TCP, as the API server defaults it; SCTP is skipped.
        assert_eq!(svc.ports.len(), 1);
        assert_eq!(svc.ports[0].protocol, crate::model::Protocol::Tcp);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(matches!(loaded.warnings[0], Warning::SkippedPort { .. }));
    }

    #[test]
    fn v1_endpoints_are_ignored_with_a_pointer_to_endpoint_slices() {
        let text = format!(
            "{}---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: shop}}\n\
             subsets: [{{addresses: [{{ip: 10.1.0.1}}], ports: [{{port: 8080}}]}}]\n",
            service_doc("web", "10.96.0.10")
        );
        let loaded = parse_ok(&text);
        assert_eq!(
            loaded.ignored_kinds.iter().collect::<Vec<_>>(),
            ["v1 Endpoints"]
        );
        assert_eq!(
            ignored_kind_note("v1 Endpoints"),
            "objects of kind v1 Endpoints are ignored: carousel reads endpoints from \
             EndpointSlices only; write them as discovery.k8s.io/v1 EndpointSlice objects \
             instead (see docs/state-file.md)"
        );
        assert_eq!(
            ignored_kind_note("discovery.k8s.io/v1beta1 EndpointSlice"),
            "objects of kind discovery.k8s.io/v1beta1 EndpointSlice are ignored: carousel \
             reads discovery.k8s.io/v1 EndpointSlice"
        );
        assert_eq!(
            ignored_kind_note("apps/v1 Deployment"),
            "objects of kind apps/v1 Deployment are ignored"
        );
        assert!(ignored_kind_note(&"x".repeat(10_000)).len() < 200);
    }
}
