//! Where the service table comes from: a state file of Kubernetes objects, or the
//! Kubernetes API. Both convert objects with the same pure functions in `convert` and
//! publish whole `ServiceTable` snapshots on a watch channel.

pub mod backoff;
pub mod convert;
pub mod file;
pub mod kube;
pub mod names;
pub mod store;
pub mod yaml_budget;
