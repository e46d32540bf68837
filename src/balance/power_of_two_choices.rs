//! Power of two choices: draw two distinct endpoints by weight and send the connection
//! to the one with fewer open connections per unit of weight. Nearly as good as least
//! connections at spreading load, in O(1) and without herding onto one idle endpoint.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use super::sample::{below, derive, AliasTable, SplitMix};
use super::{Backends, Balancer};
use crate::algorithm::Algorithm;

/// Draws from the alias table before the second choice falls back to an exact draw that
/// leaves the first one out. Either way the second choice follows the weights of the
/// other endpoints exactly; the cap only bounds the work when one endpoint holds nearly
/// all the weight.
const REDRAWS: usize = 4;

#[derive(Debug)]
pub(crate) struct PowerOfTwoChoices {
    backends: Backends,
    table: AliasTable,
    /// `cumulative[i]`: the weights of endpoints `0..=i`, for the exact fallback draw.
    cumulative: Box<[u64]>,
    rng: SplitMix,
}

impl PowerOfTwoChoices {
    /// `seed` makes the sequence of draws reproducible; without one it differs per run.
    pub(crate) fn new(backends: Backends, seed: Option<u64>) -> Self {
        Self::with_rng(backends, SplitMix::new(seed))
    }

    fn with_rng(backends: Backends, rng: SplitMix) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        Self {
            table: AliasTable::new(&weights),
            cumulative,
            backends,
            rng,
        }
    }

    /// A draw by weight among every endpoint but `first`, from draws derived from `bits`.
    fn other_than(&self, first: usize, bits: u64) -> Option<usize> {
        for k in 1..=REDRAWS as u64 {
            match self.table.draw(derive(bits, k)) {
                Some(i) if i != first => return Some(i),
                _ => {}
            }
        }
        self.exact_other_than(first, derive(bits, REDRAWS as u64 + 1))
    }

    /// A draw by weight among every endpoint but `first`, in O(log N): a point on the
    /// line of cumulative weights with `first`'s stretch cut out.
    fn exact_other_than(&self, first: usize, bits: u64) -> Option<usize> {
        let before = first
            .checked_sub(1)
            .and_then(|i| self.cumulative.get(i))
            .copied()
            .unwrap_or(0);
        let own = self.cumulative.get(first)? - before;
        let rest = self.cumulative.last()? - own;
        if rest == 0 {
            return None; // nobody else carries weight
        }
        let mut point = below(bits, rest);
        if point >= before {
            point += own;
        }
        Some(self.cumulative.partition_point(|&c| c <= point))
    }
}

impl Balancer for PowerOfTwoChoices {
    fn algorithm(&self) -> Algorithm {
        Algorithm::PowerOfTwoChoices
    }

    /// The first draw, which follows the weights, unless the second would carry fewer
    /// open connections per unit of weight than the first does now even with this one
    /// added. Counting the new connection on the challenger's side keeps weights in
    /// force at low concurrency: a:1 000 000 with one open connection is not beaten by
    /// an idle b:1 (1/1 against 1/1 000 000), nor a:99 by b:1 until a carries 99 times
    /// b's load; an idle Service is spread exactly by weight, and a loaded one by load.
    fn pick(&self, _client: IpAddr) -> Option<usize> {
        // One step of the shared generator per pick; the second choice derives its draws.
        let bits = self.rng.next_u64();
        let first = self.table.draw(bits)?;
        let Some(second) = self.other_than(first, bits) else {
            return Some(first);
        };
        let (a, b) = (&self.backends[first], &self.backends[second]);
        let (a_active, b_active) = (
            u64::from(a.active.load(Ordering::Relaxed)),
            u64::from(b.active.load(Ordering::Relaxed)),
        );
        let second_is_lighter =
            (b_active + 1) * u64::from(a.weight) < a_active * u64::from(b.weight);
        Some(if second_is_lighter { second } else { first })
    }

    /// The generator goes on with its sequence; the counts live in the backends.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        Box::new(Self::with_rng(backends, self.rng.carry()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::backends;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn shares(b: &dyn Balancer, n: usize, picks: usize) -> Vec<f64> {
        let mut counts = vec![0usize; n];
        for _ in 0..picks {
            counts[b.pick(CLIENT).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn empty_and_single_sets() {
        assert_eq!(
            PowerOfTwoChoices::new(backends(0, &[]), Some(1)).pick(CLIENT),
            None
        );
        let one = PowerOfTwoChoices::new(backends(1, &[]), Some(1));
        assert_eq!(one.pick(CLIENT), Some(0));
    }

    #[test]
    fn idle_shares_follow_the_weights() {
        let weights = [1, 2, 3, 4];
        let b = PowerOfTwoChoices::new(backends(4, &weights), Some(42));
        for (share, w) in shares(&b, 4, 100_000).iter().zip(weights) {
            let target = f64::from(w) / 10.0;
            assert!(
                (share - target).abs() < 0.01,
                "share {share} target {target}"
            );
        }
    }

    /// Shares over `picks` connections that each stay open for the next `overlap`
    /// picks, as when connections come faster than they end.
    fn shares_under_load(weights: &[u32], overlap: usize, picks: usize) -> Vec<f64> {
        let set = backends(weights.len(), weights);
        let b = PowerOfTwoChoices::new(set.clone(), Some(9));
        let mut open = std::collections::VecDeque::new();
        let mut counts = vec![0usize; weights.len()];
        for _ in 0..picks {
            if open.len() == overlap {
                let done: usize = open.pop_front().unwrap();
                set[done].active.fetch_sub(1, Ordering::Relaxed);
            }
            let i = b.pick(CLIENT).unwrap();
            set[i].active.fetch_add(1, Ordering::Relaxed);
            open.push_back(i);
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn shares_under_load_follow_the_weights() {
        for overlap in [1, 2, 3, 10, 50] {
            // Once 280/20 over 300 connections, and 84 % where 98 % is the share.
            let heavy = shares_under_load(&[1_000_000, 1], overlap, 30_000);
            assert!(heavy[0] > 0.99, "overlap {overlap}: {heavy:?}");
            let canary = shares_under_load(&[99, 1, 1], overlap, 30_000);
            assert!(
                (canary[0] - 99.0 / 101.0).abs() < 0.02,
                "overlap {overlap}: {canary:?}"
            );
            let spread = shares_under_load(&[1, 2, 3, 4], overlap, 30_000);
            for (share, w) in spread.iter().zip([1.0, 2.0, 3.0, 4.0]) {
                assert!(
                    (share - w / 10.0).abs() < 0.08,
                    "overlap {overlap}: {spread:?}"
                );
            }
        }
    }

    #[test]
    fn the_busiest_endpoint_is_never_chosen() {
        let set = backends(5, &[]);
        set[3].active.store(10, Ordering::Relaxed);
        let b = PowerOfTwoChoices::new(set, Some(7));
        assert!((0..10_000).all(|_| b.pick(CLIENT) != Some(3)));
    }

    #[test]
    fn the_two_choices_are_distinct() {
        // The heavy endpoint is almost always drawn first; the second choice must still
        // be the other one, or the loaded heavy endpoint would keep winning against itself.
        let set = backends(2, &[1_000_000, 1]);
        set[0].active.store(3_000_000, Ordering::Relaxed);
        let b = PowerOfTwoChoices::new(set, Some(3));
        assert!((0..1000).all(|_| b.pick(CLIENT) == Some(1)));
    }

    #[test]
    fn the_exact_fallback_leaves_the_first_out() {
        let b = PowerOfTwoChoices::new(backends(4, &[5, 1, 1, 1]), Some(11));
        let mut counts = [0usize; 4];
        for _ in 0..30_000 {
            counts[b.exact_other_than(0, b.rng.next_u64()).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        // Leaving out the last one as well.
        assert!((0..1000).all(|_| b.exact_other_than(3, b.rng.next_u64()) != Some(3)));
        for c in &counts[1..] {
            assert!((*c as f64 / 10_000.0 - 1.0).abs() < 0.05, "{counts:?}");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_picks() {
        let picks = |seed| {
            let b = PowerOfTwoChoices::new(backends(10, &[]), Some(seed));
            (0..500).map(|_| b.pick(CLIENT)).collect::<Vec<_>>()
        };
        assert_eq!(picks(5), picks(5));
        assert_ne!(picks(5), picks(6));
    }
}
