//! Balancers: small values built from the endpoint set of one Service port that pick
//! an endpoint for each new connection. One algorithm a file; the registry below maps
//! the names of the `carousel.dev/load-balancer` annotation to their constructors.

mod least_connections;
mod maglev;
mod power_of_two_choices;
mod random;
mod round_robin;
mod sample;
mod weighted_round_robin;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use crate::addr::PodAddr;

pub use least_connections::LeastConnections;
pub use maglev::{Maglev, MaglevError};
pub use power_of_two_choices::PowerOfTwoChoices;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use weighted_round_robin::WeightedRoundRobin;

/// Whether ClientIP session affinity is built (the demo and docs ask).
pub const AFFINITY_AVAILABLE: bool = false;

/// The algorithm used when a Service names none (or one that does not parse).
pub const DEFAULT_ALGORITHM: &str = round_robin::NAME;

/// What a balancer sees of one endpoint.
#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: PodAddr,
    /// Relative share of new connections; always > 0 (drained endpoints are not offered).
    pub weight: u32,
    /// Connections open to this endpoint right now. Shared with the data path and kept
    /// across table changes for as long as the endpoint persists.
    pub active: Arc<AtomicU32>,
}

impl Backend {
    pub fn new(addr: PodAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            active: Arc::default(),
        }
    }
}

/// The endpoints of one Service port that take new connections, sorted by address.
pub type Backends = Arc<[Backend]>;

/// Picks an endpoint for each new connection of one Service port.
///
/// A balancer is immutable apart from its own atomics: a table change builds a new one
/// with [`Balancer::rebuild`], which carries over the state of persisting endpoints.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// The registry name of the algorithm.
    fn name(&self) -> &'static str;

    /// The index into the backends of the endpoint for a new connection from `client`,
    /// or `None` when there is no endpoint.
    fn pick(&self, client: IpAddr) -> Option<usize>;

    /// The same algorithm over a new endpoint set, carrying over what it has learnt.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer>;
}

/// Options every algorithm may use.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildOptions {
    /// Seed for the algorithms that draw random numbers, for reproducible runs.
    pub seed: Option<u64>,
}

type Constructor = fn(Backends, &BuildOptions) -> Box<dyn Balancer>;

/// Every algorithm carousel knows, by annotation name.
const REGISTRY: &[(&str, Constructor)] = &[
    (round_robin::NAME, |b, _| Box::new(RoundRobin::new(b))),
    (weighted_round_robin::NAME, |b, _| {
        Box::new(WeightedRoundRobin::new(b))
    }),
    (least_connections::NAME, |b, _| {
        Box::new(LeastConnections::new(b))
    }),
    (power_of_two_choices::NAME, |b, o| {
        Box::new(PowerOfTwoChoices::new(b, o.seed))
    }),
    (maglev::NAME, |b, _| Box::new(Maglev::new(b))),
    (random::NAME, |b, o| Box::new(Random::new(b, o.seed))),
];

/// The names of every registered algorithm.
pub fn algorithms() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|(name, _)| *name)
}

/// Whether `name` is a registered algorithm.
pub fn is_known(name: &str) -> bool {
    REGISTRY.iter().any(|(n, _)| *n == name)
}

/// Builds a fresh balancer of algorithm `name`, or `None` if no such algorithm exists.
pub fn build(name: &str, backends: Backends, options: &BuildOptions) -> Option<Box<dyn Balancer>> {
    REGISTRY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, construct)| construct(backends, options))
}

/// Builds the balancer for a new endpoint set: the previous balancer's successor when it
/// runs the same algorithm, so that state carries over, else a fresh one.
pub fn rebuild_or_build(
    previous: Option<&dyn Balancer>,
    name: &str,
    backends: Backends,
    options: &BuildOptions,
) -> Box<dyn Balancer> {
    match previous {
        Some(prev) if prev.name() == name => prev.rebuild(backends),
        _ => build(name, backends.clone(), options)
            .unwrap_or_else(|| Box::new(RoundRobin::new(backends))),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    /// `n` backends at 10.244.0.1.. with the given weights (1 when `weights` is short).
    pub fn backends(n: usize, weights: &[u32]) -> Backends {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1);
                let addr = PodAddr(SocketAddr::from((ip, 8080)));
                Backend::new(addr, weights.get(i).copied().unwrap_or(1))
            })
            .collect()
    }
}
