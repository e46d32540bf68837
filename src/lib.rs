//! carousel: a node-local L4 proxy for Kubernetes Services with pluggable balancers.
//!
//! Discovery turns Kubernetes objects into an immutable [`model::ServiceTable`]; the
//! proxy builds a route table from each one and swaps it in atomically, and every new
//! connection is handed to an endpoint that the Service port's balancer picks.

//!
//! Without the `node` feature (on by default) the crate is only its pure core: the model,
//! the algorithms by name, and the conversion of Kubernetes objects and of the state
//! file into a table. `fuzz/` builds that much, without the runtime, the Kubernetes
//! client or the data path.
//!
//! Items are `pub(crate)` unless the command, tests/, benches/ or fuzz/ use them, so
//! that the compiler reports what nothing uses.

#![warn(rust_2018_idioms, unreachable_pub, unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Without `node` much of the core serves nothing (the proxy uses it): dead code is
// looked for in the whole crate only.
#![cfg_attr(not(feature = "node"), allow(dead_code))]

pub mod addr;
pub mod algorithm;
pub mod discovery;
pub mod model;
pub mod stats;

#[cfg(feature = "node")]
pub mod backoff;
#[cfg(feature = "node")]
pub mod balance;
#[cfg(feature = "node")]
pub mod config;
#[cfg(feature = "node")]
pub mod dataplane;
#[cfg(feature = "node")]
pub mod heavy;
#[cfg(feature = "node")]
pub mod lab;
#[cfg(feature = "node")]
pub mod plan;
#[cfg(feature = "node")]
mod process_metrics;
#[cfg(feature = "node")]
pub mod programming;
#[cfg(feature = "node")]
pub mod proxy;
#[cfg(feature = "node")]
pub mod run;
#[cfg(feature = "node")]
pub mod series;
#[cfg(feature = "node")]
pub mod shutdown;
#[cfg(feature = "node")]
pub mod status;
#[cfg(feature = "node")]
pub mod telemetry;
