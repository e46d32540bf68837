//! Random draws for the balancers that need them: a lock-free, seedable generator and an
//! alias table that draws an endpoint by weight in O(1).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// SplitMix64's increment, 2^64 divided by the golden ratio: odd, so the state walks
/// through every u64 before it repeats.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 with its state in an atomic.
///
/// SplitMix64's state is a plain counter (a Weyl sequence) and each output is a mix of
/// one counter value, so a draw is a single `fetch_add`: concurrent picks never wait on
/// each other, no draw is handed out twice, and one seed replays the same sequence.
#[derive(Debug)]
pub(crate) struct SplitMix {
    state: AtomicU64,
}

impl SplitMix {
    /// A generator seeded with `seed`, or from the OS's randomness when there is none.
    pub(crate) fn new(seed: Option<u64>) -> Self {
        Self {
            state: AtomicU64::new(seed.unwrap_or_else(entropy)),
        }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&self) -> u64 {
        mix(self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA))
    }

    /// A generator that goes on with this one's sequence, for a rebuilt balancer: a
    /// table change does not replay the draws already made.
    pub(crate) fn carry(&self) -> Self {
        Self {
            state: AtomicU64::new(self.state.load(Ordering::Relaxed)),
        }
    }
}

/// The `k`-th further draw derived from one draw's `bits`: a SplitMix64 stream of its
/// own, so a pick that needs several draws takes only one step of the shared state.
pub(crate) fn derive(bits: u64, k: u64) -> u64 {
    mix(bits.wrapping_add(k.wrapping_mul(GAMMA)))
}

/// A uniform draw from `0..n` out of 64 random bits; `n` must be at least 1.
pub(crate) fn below(bits: u64, n: u64) -> u64 {
    // Lemire's multiply-shift: no division, and a bias of at most n / 2^64.
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

/// SplitMix64's finalizer: every output bit depends on every input bit.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 unpredictable bits without a dependency: std keys every `RandomState` from the
/// OS's randomness, so the hash of nothing under fresh keys is itself random.
pub(crate) fn entropy() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Walker's alias table, built with Vose's method in exact integer arithmetic: one
/// uniform draw picks index `i` with probability exactly `weight[i] / total`.
#[derive(Debug)]
pub(crate) struct AliasTable {
    /// Per bucket: keep the bucket's own index when the second part of the draw is below
    /// `keep` (out of `total`), else take `alias`.
    buckets: Box<[(u64, u32)]>,
    total: u64,
}

impl AliasTable {
    /// The table for `weights`. Zero weights are never drawn; if every weight is zero
    /// the table is empty.
    pub(crate) fn new(weights: &[u32]) -> Self {
        let n = weights.len() as u64;
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        if total == 0 {
            return Self {
                buckets: Box::default(),
                total: 0,
            };
        }
        // Scaled by n, every bucket must hold exactly `total`; u32 × u32 fits in u64.
        let mut scaled: Vec<u64> = weights.iter().map(|&w| u64::from(w) * n).collect();
        let mut buckets: Vec<(u64, u32)> = (0..weights.len()).map(|i| (total, i as u32)).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..weights.len()).partition(|&i| scaled[i] < total);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            buckets[s] = (scaled[s], l as u32);
            scaled[l] -= total - scaled[s];
            if scaled[l] < total {
                large.pop();
                small.push(l);
            }
        }
        // Integer arithmetic leaves whatever is left holding exactly `total`: it keeps
        // its own index, as initialised.
        Self {
            buckets: buckets.into(),
            total,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The index that 64 random bits draw, or `None` for an empty table.
    pub(crate) fn draw(&self, bits: u64) -> Option<usize> {
        let n = self.buckets.len() as u128;
        // The high half of bits × n picks the bucket; the low half is the fraction left
        // over, uniform enough to decide between the bucket and its alias.
        let wide = u128::from(bits) * n;
        let bucket = (wide >> 64) as usize;
        let fraction = (u128::from(wide as u64) * u128::from(self.total)) >> 64;
        let &(keep, alias) = self.buckets.get(bucket)?;
        Some(if (fraction as u64) < keep {
            bucket
        } else {
            alias as usize
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_seed_replays_its_sequence() {
        let a = SplitMix::new(Some(7));
        let b = SplitMix::new(Some(7));
        let first: Vec<u64> = (0..10).map(|_| a.next_u64()).collect();
        let second: Vec<u64> = (0..10).map(|_| b.next_u64()).collect();
        assert_eq!(first, second);
        assert_ne!(first[0], first[1]);
        // A carried generator goes on where the first one stopped.
        let carried = a.carry();
        assert_eq!(carried.next_u64(), a.next_u64());
    }

    #[test]
    fn all_zero_weights_draw_nothing() {
        let table = AliasTable::new(&[0, 0]);
        assert!(table.is_empty());
        assert_eq!(table.draw(12345), None);
    }

    proptest! {
        /// Summing each bucket's keep/alias split gives back every weight exactly.
        #[test]
        fn the_table_holds_the_weights_exactly(weights in prop::collection::vec(0u32..1000, 1..50)) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let table = AliasTable::new(&weights);
            let n = weights.len() as u64;
            let mut mass = vec![0u64; weights.len()];
            for (i, &(keep, alias)) in table.buckets.iter().enumerate() {
                mass[i] += keep;
                mass[alias as usize] += table.total - keep;
            }
            for (i, &w) in weights.iter().enumerate() {
                // Each bucket is 1/n of the draws, and holds `total` units of mass.
                prop_assert_eq!(mass[i], u64::from(w) * n);
            }
        }
    }
}
