//! Least connections: each new connection goes to the endpoint with the fewest open
//! connections per unit of weight; ties rotate, so an idle Service is round-robin.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Backend, Backends, Balancer};
use crate::algorithm::Algorithm;

#[derive(Debug)]
pub(crate) struct LeastConnections {
    backends: Backends,
    /// Where the next scan starts: the tie-break, advanced on every pick.
    next: AtomicUsize,
}

impl LeastConnections {
    pub(crate) fn new(backends: Backends) -> Self {
        Self {
            backends,
            next: AtomicUsize::new(0),
        }
    }
}

/// Whether `a` (with `a_active` open) is less loaded than `b` (with `b_active`), per unit
/// of weight: `a_active / a.weight < b_active / b.weight`, cross-multiplied to stay exact.
fn less_loaded(a: &Backend, a_active: u32, b: &Backend, b_active: u32) -> bool {
    u64::from(a_active) * u64::from(b.weight) < u64::from(b_active) * u64::from(a.weight)
}

impl Balancer for LeastConnections {
    fn algorithm(&self) -> Algorithm {
        Algorithm::LeastConnections
    }

    /// O(N): reads every endpoint's open-connection count, one relaxed atomic load each
    /// (a few µs at 10 000 endpoints), and stops early at an idle endpoint, which nothing
    /// can beat. The counts move while we read; a pick is a good choice, not a snapshot.
    fn pick(&self, _client: IpAddr) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut best_active = self.backends[start].active.load(Ordering::Relaxed);
        for step in 1..n {
            if best_active == 0 {
                break;
            }
            let i = if start + step < n {
                start + step
            } else {
                start + step - n
            };
            let b = &self.backends[i];
            let active = b.active.load(Ordering::Relaxed);
            // Strictly less: on a tie the first one from `start` wins, so ties rotate.
            if less_loaded(b, active, &self.backends[best], best_active) {
                best = i;
                best_active = active;
            }
        }
        Some(best)
    }

    /// The counts live in the backends (carried by the route table); the tie-break
    /// cursor goes on where it was.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        Box::new(Self {
            backends,
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::backends;
    use std::net::Ipv4Addr;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn set_active(set: &Backends, active: &[u32]) {
        for (b, &a) in set.iter().zip(active) {
            b.active.store(a, Ordering::Relaxed);
        }
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert_eq!(LeastConnections::new(backends(0, &[])).pick(CLIENT), None);
    }

    #[test]
    fn prefers_the_least_loaded() {
        let set = backends(4, &[]);
        set_active(&set, &[5, 2, 7, 3]);
        let b = LeastConnections::new(set.clone());
        for _ in 0..8 {
            assert_eq!(b.pick(CLIENT), Some(1));
        }
        set_active(&set, &[5, 2, 7, 0]);
        assert_eq!(b.pick(CLIENT), Some(3));
    }

    #[test]
    fn ties_rotate() {
        let set = backends(3, &[]);
        let b = LeastConnections::new(set.clone());
        let idle: Vec<usize> = (0..6).map(|_| b.pick(CLIENT).unwrap()).collect();
        assert_eq!(idle, [0, 1, 2, 0, 1, 2]);
        // Two endpoints tied at 1, one busier: each scan starts one further on and the
        // first tie it meets wins, so both tied endpoints take turns.
        set_active(&set, &[1, 4, 1]);
        let tied: Vec<usize> = (0..4).map(|_| b.pick(CLIENT).unwrap()).collect();
        assert_eq!(tied, [0, 2, 2, 0]);
    }

    #[test]
    fn load_counts_per_unit_of_weight() {
        // Four open on a weight-4 endpoint is lighter than two on a weight-1 endpoint.
        let set = backends(2, &[4, 1]);
        set_active(&set, &[4, 2]);
        let b = LeastConnections::new(set);
        assert_eq!(b.pick(CLIENT), Some(0));
        assert_eq!(b.pick(CLIENT), Some(0));
    }

    #[test]
    fn the_cursor_survives_a_rebuild() {
        let b = LeastConnections::new(backends(3, &[]));
        b.pick(CLIENT);
        let b = b.rebuild(backends(3, &[]));
        assert_eq!(b.pick(CLIENT), Some(1));
    }
}
