//! Weighted random: each new connection goes to an endpoint drawn with probability
//! weight / total, in O(1) from an alias table, with a seedable lock-free generator.

use std::net::IpAddr;

use super::sample::{AliasTable, SplitMix};
use super::{Backends, Balancer};
use crate::algorithm::Algorithm;

#[derive(Debug)]
pub(crate) struct Random {
    table: AliasTable,
    rng: SplitMix,
}

impl Random {
    /// `seed` makes the sequence of picks reproducible; without one it differs per run.
    pub(crate) fn new(backends: Backends, seed: Option<u64>) -> Self {
        Self::with_rng(&backends, SplitMix::new(seed))
    }

    fn with_rng(backends: &Backends, rng: SplitMix) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Self {
            table: AliasTable::new(&weights),
            rng,
        }
    }
}

impl Balancer for Random {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Random
    }

    fn pick(&self, _client: IpAddr) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        self.table.draw(self.rng.next_u64())
    }

    /// The generator goes on with its sequence, so that a seeded run stays reproducible
    /// across table changes without replaying the draws it already made.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        Box::new(Self::with_rng(&backends, self.rng.carry()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::backends;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn empty_set_picks_nothing() {
        assert_eq!(Random::new(backends(0, &[]), Some(1)).pick(CLIENT), None);
    }

    #[test]
    fn the_same_seed_gives_the_same_picks() {
        let picks = |seed| {
            let b = Random::new(backends(10, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), Some(seed));
            (0..1000).map(|_| b.pick(CLIENT)).collect::<Vec<_>>()
        };
        assert_eq!(picks(42), picks(42));
        assert_ne!(picks(42), picks(43));
    }

    #[test]
    fn shares_follow_the_weights() {
        let weights = [1, 2, 3, 4];
        let b = Random::new(backends(4, &weights), Some(42));
        let picks = 100_000;
        let mut counts = [0usize; 4];
        for _ in 0..picks {
            counts[b.pick(CLIENT).unwrap()] += 1;
        }
        for (count, w) in counts.iter().zip(weights) {
            let share = *count as f64 / picks as f64;
            let target = f64::from(w) / 10.0;
            assert!((share - target).abs() < 0.01, "{counts:?}");
        }
    }

    #[test]
    fn a_rebuild_goes_on_with_the_sequence() {
        let set = backends(5, &[]);
        let straight = Random::new(set.clone(), Some(9));
        let rebuilt = Random::new(set.clone(), Some(9));
        let mut expected = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..10 {
            expected.push(straight.pick(CLIENT));
            seen.push(rebuilt.pick(CLIENT));
        }
        let rebuilt = rebuilt.rebuild(set);
        for _ in 0..10 {
            expected.push(straight.pick(CLIENT));
            seen.push(rebuilt.pick(CLIENT));
        }
        assert_eq!(seen, expected);
    }
}
