//! carousel: a node-local L4 proxy for Kubernetes Services with pluggable balancers.
//!
//! Discovery turns Kubernetes objects into an immutable [`model::ServiceTable`]; the
//! proxy builds a route table from each one and swaps it in atomically, and every new
//! connection is handed to an endpoint that the Service port's balancer picks.

pub mod addr;
pub mod backoff;
pub mod balance;
pub mod config;
pub mod dataplane;
pub mod discovery;
pub mod heavy;
pub mod lab;
pub mod model;
pub mod proxy;
pub mod run;
pub mod series;
pub mod status;
pub mod telemetry;
