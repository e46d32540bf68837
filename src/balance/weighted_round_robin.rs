//! Smooth weighted round-robin: a schedule of endpoint indexes computed once per
//! endpoint set, walked by an atomic cursor, so a pick is one `fetch_add` and one load.
//!
//! The schedule is the one nginx's smooth WRR aims at, built by WF²Q's rule (of the
//! endpoints not ahead of their share, serve the one whose next turn is due first). Over
//! a whole cycle each endpoint gets exactly its weight; after any `t` picks endpoint `i`
//! has had `t·wᵢ/W` picks give or take less than one. (nginx's own rule drifts past one
//! for some weight vectors, and costs O(N) per scheduled slot to build.)

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Backends, Balancer};
use crate::algorithm::Algorithm;

/// The longest schedule built before weights are scaled down: 65 536 slots, 256 KiB.
///
/// Weights are first divided by their greatest common divisor, which keeps typical
/// schedules tiny (3:1 over four pods is 8 slots). Only when the reduced weights still
/// add up to more than this are they scaled to about this total, each endpoint keeping
/// at least one slot, so a schedule never exceeds `SCHEDULE_CAP + N` slots; shares are
/// then exact to within one slot in `SCHEDULE_CAP`.
pub(crate) const SCHEDULE_CAP: u64 = 1 << 16;

#[derive(Debug)]
pub(crate) struct WeightedRoundRobin {
    backends: Backends,
    schedule: Arc<[u32]>,
    next: AtomicUsize,
}

impl WeightedRoundRobin {
    pub(crate) fn new(backends: Backends) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Self {
            schedule: schedule(&shares(&weights)).into(),
            backends,
            next: AtomicUsize::new(0),
        }
    }

    /// The schedule's length: one whole cycle of picks.
    #[cfg(test)]
    fn cycle_len(&self) -> usize {
        self.schedule.len()
    }
}

impl Balancer for WeightedRoundRobin {
    fn algorithm(&self) -> Algorithm {
        Algorithm::WeightedRoundRobin
    }

    fn pick(&self, _client: IpAddr) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % len;
        self.schedule.get(slot).map(|&i| i as usize)
    }

    /// An unchanged set (a table change elsewhere) keeps the schedule and the cursor, so
    /// rebuilds never disturb the rotation. A changed set starts its new schedule at the
    /// same fraction of the cycle: restarting at slot 0 on every change would hand the
    /// first slots (the heaviest endpoints) extra connections whenever endpoints churn.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        let next = self.next.load(Ordering::Relaxed);
        let same = backends.len() == self.backends.len()
            && backends
                .iter()
                .zip(self.backends.iter())
                .all(|(a, b)| a.addr == b.addr && a.weight == b.weight);
        if same {
            return Box::new(Self {
                backends,
                schedule: self.schedule.clone(),
                next: AtomicUsize::new(next),
            });
        }
        let fresh = Self::new(backends);
        let (old_len, new_len) = (self.schedule.len() as u64, fresh.schedule.len() as u64);
        if old_len > 0 {
            let position = next as u64 % old_len;
            fresh
                .next
                .store((position * new_len / old_len) as usize, Ordering::Relaxed);
        }
        Box::new(fresh)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Slots per cycle for each endpoint: the weights divided by their gcd, scaled down
/// when they still add up to more than [`SCHEDULE_CAP`]. A zero weight gets no slot.
fn shares(weights: &[u32]) -> Vec<u64> {
    let reduce = |w: Vec<u64>| {
        let g = w.iter().fold(0, |g, &x| gcd(g, x));
        if g <= 1 {
            w
        } else {
            w.into_iter().map(|x| x / g).collect()
        }
    };
    let shares = reduce(weights.iter().map(|&w| u64::from(w)).collect());
    let total: u64 = shares.iter().sum();
    if total <= SCHEDULE_CAP {
        return shares;
    }
    // u32 weights × 2^16 fit in u64; every endpoint keeps a slot so none is starved.
    reduce(
        shares
            .into_iter()
            .map(|s| match s {
                0 => 0,
                s => (s * SCHEDULE_CAP / total).max(1),
            })
            .collect(),
    )
}

/// A fraction `num / den`, ordered by value (cross-multiplied, so exact).
#[derive(Clone, Copy, Debug)]
struct Ratio {
    num: u64,
    den: u64,
}

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (u128::from(self.num) * u128::from(other.den))
            .cmp(&(u128::from(other.num) * u128::from(self.den)))
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Ratio {}

/// One cycle of picks for `shares`, in O(W log N) for W slots.
///
/// In time units of one cycle, endpoint `i`'s `k`-th turn spans `k/sᵢ .. (k+1)/sᵢ`. At
/// slot `t` the endpoints whose next turn has started (`k/sᵢ ≤ t/W`, i.e. they are not
/// ahead of their share) are eligible, and the one whose turn ends first is served,
/// lowest index first on a tie. Some endpoint is always eligible: the picks so far add
/// up to `t`, so not every endpoint can be ahead of its `t·sᵢ/W`.
fn schedule(shares: &[u64]) -> Vec<u32> {
    let total: u64 = shares.iter().sum();
    let mut schedule = Vec::with_capacity(total as usize);
    let mut served = vec![0u64; shares.len()];
    // Endpoints waiting for their next turn to start, earliest start first.
    let mut waiting: BinaryHeap<Reverse<(Ratio, u32)>> = BinaryHeap::new();
    // Endpoints whose turn has started, earliest end first.
    let mut eligible: BinaryHeap<Reverse<(Ratio, u32)>> = shares
        .iter()
        .enumerate()
        .filter(|(_, &s)| s > 0)
        .map(|(i, &s)| Reverse((Ratio { num: 1, den: s }, i as u32)))
        .collect();
    for t in 0..total {
        let now = Ratio { num: t, den: total };
        while let Some(&Reverse((start, i))) = waiting.peek() {
            if start > now {
                break;
            }
            waiting.pop();
            let end = Ratio {
                num: start.num + 1,
                den: start.den,
            };
            eligible.push(Reverse((end, i)));
        }
        let Some(Reverse((_, i))) = eligible.pop().or_else(|| waiting.pop()) else {
            break; // every endpoint has had all its slots
        };
        schedule.push(i);
        let share = shares[i as usize];
        let done = &mut served[i as usize];
        *done += 1;
        if *done < share {
            waiting.push(Reverse((
                Ratio {
                    num: *done,
                    den: share,
                },
                i,
            )));
        }
    }
    schedule
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{backends, counts};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn empty_set_picks_nothing() {
        assert_eq!(WeightedRoundRobin::new(backends(0, &[])).pick(CLIENT), None);
    }

    #[test]
    fn the_kubechaos_canary_is_smooth() {
        // Two original pods at 1, two custom pods at 3: the custom pods never get more
        // than two turns in a row, and the cycle is 8 slots.
        let b = WeightedRoundRobin::new(backends(4, &[1, 1, 3, 3]));
        assert_eq!(b.cycle_len(), 8);
        let cycle: Vec<usize> = (0..8).map(|_| b.pick(CLIENT).unwrap()).collect();
        assert_eq!(cycle, [2, 3, 0, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let b = WeightedRoundRobin::new(backends(5, &[4, 4, 4, 4, 4]));
        let picks: Vec<usize> = (0..10).map(|_| b.pick(CLIENT).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn huge_weights_are_scaled_to_a_bounded_schedule() {
        let weights = [1_000_000, 999_999, 3, 1];
        let b = WeightedRoundRobin::new(backends(4, &weights));
        assert!(b.cycle_len() as u64 <= SCHEDULE_CAP + 4);
        let c = counts(&b, 4, b.cycle_len());
        // Every endpoint keeps a slot, and the big ones split the rest evenly.
        assert!(c.iter().all(|&n| n >= 1), "{c:?}");
        assert!(c[0].abs_diff(c[1]) <= 1, "{c:?}");
    }

    #[test]
    fn an_unchanged_set_keeps_the_rotation() {
        let set = backends(3, &[1, 2, 3]);
        let straight = WeightedRoundRobin::new(set.clone());
        let rebuilt = WeightedRoundRobin::new(set.clone());
        for _ in 0..4 {
            assert_eq!(straight.pick(CLIENT), rebuilt.pick(CLIENT));
        }
        let rebuilt = rebuilt.rebuild(set);
        for _ in 0..20 {
            assert_eq!(straight.pick(CLIENT), rebuilt.pick(CLIENT));
        }
    }

    #[test]
    fn a_changed_set_resumes_mid_cycle() {
        let old = WeightedRoundRobin::new(backends(2, &[1, 1]));
        old.pick(CLIENT); // half way through a cycle of 2
        let new = old.rebuild(backends(4, &[1, 1, 1, 1]));
        // Half way through the new cycle of 4: slot 2.
        assert_eq!(new.pick(CLIENT), Some(2));
    }

    proptest! {
        #[test]
        fn exact_shares_over_whole_cycles(
            weights in prop::collection::vec(1u32..50, 1..30),
            cycles in 1usize..4,
            skip in 0usize..100,
        ) {
            let b = WeightedRoundRobin::new(backends(weights.len(), &weights));
            let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w)));
            let cycle: u64 = weights.iter().map(|&w| u64::from(w) / g).sum();
            prop_assert_eq!(b.cycle_len() as u64, cycle);
            for _ in 0..skip { b.pick(CLIENT); }
            let c = counts(&b, weights.len(), b.cycle_len() * cycles);
            for (n, w) in c.iter().zip(&weights) {
                prop_assert_eq!(*n as u64, u64::from(*w) / g * cycles as u64);
            }
        }

        /// After any t picks, each endpoint is within 2 (in fact within 1) of t·w/W.
        #[test]
        fn smooth_after_any_number_of_picks(weights in prop::collection::vec(1u32..100, 1..40)) {
            let b = WeightedRoundRobin::new(backends(weights.len(), &weights));
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let mut c = vec![0f64; weights.len()];
            for t in 1..=2 * b.cycle_len() {
                c[b.pick(CLIENT).unwrap()] += 1.0;
                for (n, &w) in c.iter().zip(&weights) {
                    let ideal = t as f64 * f64::from(w) / total;
                    prop_assert!((n - ideal).abs() < 1.0, "t={} count={} ideal={}", t, n, ideal);
                }
            }
        }
    }
}
