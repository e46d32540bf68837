//! The state file: ordinary Kubernetes objects in YAML, as `kubectl get -o yaml` prints
//! them. `parse` is pure; `watch` polls the file and publishes each good version. A
//! version that does not parse or validate is refused whole, with the document and the
//! field named, and the last good table stays in force.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::watch;

use crate::discovery::convert::{self, FieldError, PodLabels, Scope, Warning};
use crate::model::ServiceTable;
use crate::telemetry::Telemetry;

/// How often the file is looked at. A version is applied once two looks in a row see
/// the same bytes, so a file caught half-written is not taken for a new state.
const POLL_INTERVAL: Duration = Duration::from_millis(150);

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
    #[error("document {document} is not valid YAML: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{at}: {message}")]
    NotAnObject { at: Location, message: String },
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
}

#[derive(Default)]
struct Objects {
    services: Vec<convert::ServiceFront>,
    slices: Vec<convert::SliceView>,
    pods: PodLabels,
    ignored_kinds: BTreeSet<String>,
}

/// Parses and converts the text of a state file.
pub fn parse(text: &str, scope: &Scope) -> Result<Loaded, StateFileError> {
    let mut objects = Objects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value =
            Value::deserialize(doc).map_err(|source| StateFileError::Yaml { document, source })?;
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
    let (table, warnings) = convert::join(&objects.services, &objects.slices, &objects.pods, scope);
    Ok(Loaded {
        table,
        warnings,
        ignored_kinds: objects.ignored_kinds,
    })
}

/// Reads and parses the state file at `path`.
pub fn load(path: &Path, scope: &Scope) -> Result<Loaded, StateFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| StateFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, scope)
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
        .unwrap_or_else(|| "(unnamed)".into());
    let invalid = |error: FieldError| StateFileError::Invalid {
        at: at.clone(),
        kind: kind.clone(),
        name: name.clone(),
        error,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
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
                let at = Location {
                    document: at.document,
                    item: Some(i + 1),
                };
                add_object(objects, item, at)?;
            }
        }
        ("v1", "Service") => {
            let svc: core::Service = typed(value).map_err(invalid)?;
            if let Some(front) = convert::service(&svc).map_err(invalid)? {
                objects.services.push(front);
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: discovery::EndpointSlice = typed(value).map_err(invalid)?;
            if let Some(view) = convert::slice(&slice).map_err(invalid)? {
                objects.slices.push(view);
            }
        }
        ("v1", "Pod") => {
            let pod: core::Pod = typed(value).map_err(invalid)?;
            convert::add_pod(&mut objects.pods, &pod.metadata).map_err(invalid)?;
        }
        // Nodes are read for their zone label once topology-aware routing lands; until
        // then they are checked, so that a broken one is still refused.
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

/// Deserializes into a k8s-openapi type, naming the field at fault on failure.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| FieldError {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Watches the state file and publishes every good version on `tables`.
///
/// Refused versions, a missing file and bad annotations are logged once each and
/// counted in `carousel_config_errors_total`; the last good table stays in force.
pub async fn watch(
    path: PathBuf,
    scope: Scope,
    tables: watch::Sender<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    initial: Loaded,
) {
    let mut reporter = Reporter::default();
    reporter.report_loaded(&initial, &telemetry);
    let mut applied: Option<Vec<u8>> = std::fs::read(&path).ok();
    let mut last_seen = applied.clone();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tables.is_closed() {
            return;
        }
        let seen = match tokio::fs::read(&path).await {
            Ok(bytes) => Some(bytes),
            Err(source) => {
                let error = StateFileError::Read {
                    path: path.clone(),
                    source,
                };
                reporter.refused(&error.to_string(), &telemetry);
                last_seen = None;
                continue;
            }
        };
        let stable = seen == last_seen;
        last_seen = seen;
        if !stable || last_seen == applied {
            continue;
        }
        applied = last_seen.clone();
        let bytes = last_seen.as_deref().unwrap_or_default();
        let text = String::from_utf8_lossy(bytes);
        match parse(&text, &scope) {
            Ok(loaded) => {
                reporter.report_loaded(&loaded, &telemetry);
                tables.send_if_modified(|current| {
                    let changed = **current != loaded.table;
                    if changed {
                        *current = Arc::new(loaded.table);
                    }
                    changed
                });
                tracing::info!(path = %path.display(), "state file reloaded");
            }
            Err(error) => reporter.refused(&error.to_string(), &telemetry),
        }
    }
}

/// Logs and counts each distinct problem once, not on every look at the file.
#[derive(Default)]
struct Reporter {
    warnings: BTreeSet<Warning>,
    refusal: Option<String>,
}

impl Reporter {
    fn report_loaded(&mut self, loaded: &Loaded, telemetry: &Telemetry) {
        self.refusal = None;
        let current: BTreeSet<Warning> = loaded.warnings.iter().cloned().collect();
        for w in current.difference(&self.warnings) {
            tracing::warn!("{w}");
            if w.is_config_error() {
                telemetry.config_errors().increment(1);
            }
        }
        self.warnings = current;
        for kind in &loaded.ignored_kinds {
            tracing::debug!(kind, "objects of this kind are ignored");
        }
    }

    fn refused(&mut self, message: &str, telemetry: &Telemetry) {
        if self.refusal.as_deref() != Some(message) {
            tracing::error!("state file refused, keeping the last good state: {message}");
            telemetry.config_errors().increment(1);
            self.refusal = Some(message.to_string());
        }
    }
}
