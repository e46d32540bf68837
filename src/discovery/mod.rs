//! Where the service table comes from: a state file of Kubernetes objects, or the
//! Kubernetes API. Both convert objects with the same pure functions in `convert` and
//! publish whole `ServiceTable` snapshots on a watch channel.
//!
//! `convert`, `file`, `names`, `table_changes`, `validate` and `yaml_budget` are the pure
//! part, built with or without the `node` feature; the rest watches (the file, the API)
//! and needs the runtime.

pub mod convert;
pub mod file;
pub mod names;
pub mod table_changes;
pub(crate) mod validate;
pub(crate) mod yaml_budget;

#[cfg(feature = "node")]
pub mod backoff;
#[cfg(feature = "node")]
pub(crate) mod file_watch;
#[cfg(feature = "node")]
pub mod kube;
#[cfg(feature = "node")]
pub mod store;
