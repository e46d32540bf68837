//! Round-robin: an atomic cursor over the endpoints, so that over k×N picks each of N
//! endpoints gets exactly k, with no lock on the pick path.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Backends, Balancer};
use crate::algorithm::Algorithm;

#[derive(Debug)]
pub(crate) struct RoundRobin {
    backends: Backends,
    next: AtomicUsize,
}

impl RoundRobin {
    pub(crate) fn new(backends: Backends) -> Self {
        Self::starting_at(backends, 0)
    }

    fn starting_at(backends: Backends, next: usize) -> Self {
        Self {
            backends,
            next: AtomicUsize::new(next),
        }
    }
}

impl Balancer for RoundRobin {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RoundRobin
    }

    fn pick(&self, _client: IpAddr) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }

    /// Keeps the rotation going: the new cursor points at the first endpoint (in address
    /// order) after the one picked last, whether or not that one is still there. Adding
    /// or removing an endpoint therefore never sends the rotation back to the start.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        let n = self.backends.len();
        let next = self.next.load(Ordering::Relaxed);
        let start = if n == 0 || next == 0 {
            0
        } else {
            let last = self.backends[(next - 1) % n].addr;
            backends.iter().position(|b| b.addr > last).unwrap_or(0)
        };
        Box::new(Self::starting_at(backends, start))
    }
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
        assert_eq!(RoundRobin::new(backends(0, &[])).pick(CLIENT), None);
    }

    #[test]
    fn rotation_survives_an_added_endpoint() {
        let old = RoundRobin::new(backends(3, &[]));
        assert_eq!(old.pick(CLIENT), Some(0));
        assert_eq!(old.pick(CLIENT), Some(1));
        // 10.244.0.2 was picked last; with a fourth endpoint the next is still 10.244.0.3.
        let new = old.rebuild(backends(4, &[]));
        assert_eq!(new.pick(CLIENT), Some(2));
        assert_eq!(new.pick(CLIENT), Some(3));
        assert_eq!(new.pick(CLIENT), Some(0));
    }

    #[test]
    fn rotation_survives_a_removed_endpoint() {
        let all = backends(4, &[]);
        let old = RoundRobin::new(all.clone());
        old.pick(CLIENT);
        old.pick(CLIENT); // picked index 1 (10.244.0.2) last
        let without_second: Backends = all
            .iter()
            .filter(|b| b.addr != all[1].addr)
            .cloned()
            .collect();
        let new = old.rebuild(without_second.clone());
        let picked = new.pick(CLIENT).unwrap();
        assert_eq!(without_second[picked].addr, all[2].addr);
    }

    proptest! {
        #[test]
        fn exact_shares_over_whole_cycles(n in 1usize..200, k in 1usize..20, skip in 0usize..500) {
            let b = RoundRobin::new(backends(n, &[]));
            // Start anywhere in the rotation: whole cycles are exact from any point.
            for _ in 0..skip { b.pick(CLIENT); }
            prop_assert!(counts(&b, n, n * k).iter().all(|&c| c == k));
        }
    }
}
