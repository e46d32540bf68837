//! Balancers: small values built from the endpoint set of one Service port that pick
//! an endpoint for each new connection. One algorithm a file; [`build`] makes the one an
//! [`Algorithm`] names.

mod affinity;
mod least_connections;
mod maglev;
mod power_of_two_choices;
mod random;
mod round_robin;
pub(crate) mod sample;
mod weighted_round_robin;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use crate::addr::PodAddr;
use crate::algorithm::Algorithm;
use crate::model::Balancing;

pub use affinity::{Affinity, AffinityStats, DEFAULT_MAX_ENTRIES as DEFAULT_AFFINITY_MAX_ENTRIES};
pub(crate) use least_connections::LeastConnections;
pub(crate) use maglev::Maglev;
pub(crate) use power_of_two_choices::PowerOfTwoChoices;
pub(crate) use random::Random;
pub(crate) use round_robin::RoundRobin;
pub(crate) use weighted_round_robin::WeightedRoundRobin;

/// What a balancer sees of one endpoint.
#[derive(Clone, Debug)]
pub struct Backend {
    pub(crate) addr: PodAddr,
    /// Relative share of new connections; always > 0 (drained endpoints are not offered).
    pub(crate) weight: u32,
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
    /// Which algorithm this is.
    fn algorithm(&self) -> Algorithm;

    /// The index into the backends of the endpoint for a new connection from `client`,
    /// or `None` when there is no endpoint.
    fn pick(&self, client: IpAddr) -> Option<usize>;

    /// The same algorithm over a new endpoint set, carrying over what it has learnt.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer>;
}

/// Options every algorithm may use.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    /// Seed for the algorithms that draw random numbers, for reproducible runs.
    pub seed: Option<u64>,
    /// Most clients ClientIP affinity remembers per Service port; past it, new clients
    /// are balanced without being remembered.
    pub affinity_max_entries: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            seed: None,
            affinity_max_entries: DEFAULT_AFFINITY_MAX_ENTRIES,
        }
    }
}

/// A fresh balancer of `algorithm` over `backends`.
pub fn build(
    algorithm: Algorithm,
    backends: Backends,
    options: &BuildOptions,
) -> Box<dyn Balancer> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new(backends)),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(backends)),
        Algorithm::LeastConnections => Box::new(LeastConnections::new(backends)),
        Algorithm::PowerOfTwoChoices => Box::new(PowerOfTwoChoices::new(backends, options.seed)),
        Algorithm::Maglev => Box::new(Maglev::new(backends)),
        Algorithm::Random => Box::new(Random::new(backends, options.seed)),
    }
}

/// What picks the endpoints of one Service port: its algorithm and, when the Service
/// asks for it, ClientIP affinity on top.
#[derive(Debug)]
pub struct Picker {
    backends: Backends,
    balancer: Box<dyn Balancer>,
    affinity: Option<Affinity>,
}

impl Picker {
    /// The index into the backends of the endpoint for a new connection from `client`.
    pub fn pick(&self, client: IpAddr) -> Option<usize> {
        self.pick_at(client, tokio::time::Instant::now())
    }

    /// [`Picker::pick`] at `now`, a clock reading the caller already has.
    pub fn pick_at(&self, client: IpAddr, now: tokio::time::Instant) -> Option<usize> {
        match &self.affinity {
            Some(affinity) => affinity.pick_at(client, now, &self.backends, self.balancer.as_ref()),
            None => self.balancer.pick(client),
        }
    }

    /// The algorithm that balances new clients.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.balancer.algorithm()
    }

    /// The affinity layer, when the Service has ClientIP affinity.
    pub(crate) fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
    }
}

/// Builds the picker for a new endpoint set (sorted by address, as [`Backends`] are).
///
/// State carries over from `previous`: the algorithm's (cursor, generator) when it runs
/// the same algorithm, else a fresh one is built; the remembered clients whenever
/// affinity stays on, even across a change of algorithm. `affinity_stats` are used only
/// when `balancing` has affinity.
pub fn rebuild_or_build(
    previous: Option<&Picker>,
    balancing: &Balancing,
    backends: Backends,
    options: &BuildOptions,
    affinity_stats: AffinityStats,
) -> Picker {
    let balancer = match previous {
        Some(prev) if prev.algorithm() == balancing.algorithm => {
            prev.balancer.rebuild(backends.clone())
        }
        _ => build(balancing.algorithm, backends.clone(), options),
    };
    let remembered = previous.and_then(|p| p.affinity.as_ref());
    let affinity = match (balancing.affinity, remembered) {
        (Some(timeout), Some(prev)) => Some(prev.carry(timeout, affinity_stats)),
        (Some(timeout), None) => Some(Affinity::new(
            timeout,
            options.affinity_max_entries,
            affinity_stats,
        )),
        (None, _) => None,
    };
    Picker {
        backends,
        balancer,
        affinity,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    /// How many of `picks` picks (from one client) each of `n` endpoints got.
    pub(crate) fn counts(b: &dyn Balancer, n: usize, picks: usize) -> Vec<usize> {
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut counts = vec![0; n];
        for _ in 0..picks {
            counts[b.pick(client).expect("a pick")] += 1;
        }
        counts
    }

    /// `n` backends at 10.244.0.1.. with the given weights (1 when `weights` is short).
    pub(crate) fn backends(n: usize, weights: &[u32]) -> Backends {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1);
                let addr = PodAddr(SocketAddr::from((ip, 8080)));
                Backend::new(addr, weights.get(i).copied().unwrap_or(1))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::backends;
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn balancing(algorithm: &str, affinity: Option<Duration>) -> Balancing {
        Balancing {
            algorithm: algorithm.parse().expect("an algorithm"),
            affinity,
        }
    }

    fn picker(previous: Option<&Picker>, balancing: &Balancing, n: usize) -> Picker {
        let options = BuildOptions {
            seed: Some(1),
            ..Default::default()
        };
        rebuild_or_build(
            previous,
            balancing,
            backends(n, &[]),
            &options,
            AffinityStats::default(),
        )
    }

    #[test]
    fn every_algorithm_builds_and_picks_within_its_backends() {
        for algorithm in Algorithm::ALL {
            let b = build(algorithm, backends(3, &[]), &BuildOptions::default());
            assert_eq!(b.algorithm(), algorithm);
            assert!(b.pick(CLIENT).is_some_and(|i| i < 3));
            let none = build(algorithm, backends(0, &[]), &BuildOptions::default());
            assert_eq!(none.pick(CLIENT), None);
        }
    }

    #[test]
    fn the_same_algorithm_carries_its_state() {
        let rr = balancing("round-robin", None);
        let first = picker(None, &rr, 3);
        assert_eq!(first.pick(CLIENT), Some(0));
        let second = picker(Some(&first), &rr, 3);
        assert_eq!(second.pick(CLIENT), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_algorithm_is_built_fresh_but_affinity_carries_over() {
        let timeout = Some(Duration::from_secs(30));
        let sticky_rr = picker(None, &balancing("round-robin", timeout), 3);
        sticky_rr.pick(CLIENT);
        sticky_rr.pick(CLIENT);
        let remembered = sticky_rr.pick(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(remembered, Some(1));

        let sticky_lc = picker(
            Some(&sticky_rr),
            &balancing("least-connections", timeout),
            3,
        );
        assert_eq!(sticky_lc.algorithm(), Algorithm::LeastConnections);
        assert_eq!(sticky_lc.affinity().map(Affinity::len), Some(2));
        assert_eq!(
            sticky_lc.pick(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            remembered
        );
        // A new client goes to the fresh algorithm: least-connections starts at 0.
        assert_eq!(
            sticky_lc.pick(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))),
            Some(0)
        );

        // Affinity off: nothing is remembered any more.
        let plain = picker(Some(&sticky_lc), &balancing("least-connections", None), 3);
        assert!(plain.affinity().is_none());
    }
}
