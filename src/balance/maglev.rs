//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) on the client IP: a client
//! keeps its endpoint while the set changes elsewhere, and every carousel agrees on it.
//!
//! Each endpoint's preference list over the `M` table slots is a permutation given by
//! two hashes of its address; endpoints take turns claiming their next free preferred
//! slot until the table is full. A pick hashes the client IP to a slot: O(1).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::Arc;

use super::sample::mix;
use super::{Backend, Backends, Balancer};
use crate::addr::PodAddr;
use crate::algorithm::Algorithm;

/// The paper's small table size: prime, and at least 100 slots per endpoint up to 655
/// endpoints, which keeps the disruption of a change close to the minimum.
pub(crate) const DEFAULT_TABLE_SIZE: usize = 65_537;

/// Hash seeds (FNV-1a offset bases). Fixed: the same address must land in the same
/// slot in every carousel process on every node, for every release.
const OFFSET_SEED: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a's own basis
const SKIP_SEED: u64 = 0x6c62_272e_07bb_0142;
const CLIENT_SEED: u64 = 0x8422_2325_cbf2_9ce4;

#[derive(Debug)]
pub(crate) struct Maglev {
    backends: Backends,
    /// Endpoint index of each slot; empty when no endpoint carries weight.
    table: Arc<[u32]>,
    size: usize,
}

impl Maglev {
    /// A table of [`DEFAULT_TABLE_SIZE`] slots.
    pub(crate) fn new(backends: Backends) -> Self {
        let table = populate(
            DEFAULT_TABLE_SIZE,
            &preferences(&backends, DEFAULT_TABLE_SIZE),
        );
        Self {
            backends,
            table: table.into(),
            size: DEFAULT_TABLE_SIZE,
        }
    }

    /// A table of `size` slots (a prime): the tests' smaller tables.
    #[cfg(test)]
    fn with_table_size(backends: Backends, size: usize) -> Self {
        assert!(is_prime(size), "{size} is not a prime");
        Self {
            table: populate(size, &preferences(&backends, size)).into(),
            backends,
            size,
        }
    }

    /// The endpoint index of every slot.
    #[cfg(test)]
    fn table(&self) -> &[u32] {
        &self.table
    }
}

impl Balancer for Maglev {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Maglev
    }

    fn pick(&self, client: IpAddr) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let slot = (hash_client(client) % self.table.len() as u64) as usize;
        self.table.get(slot).map(|&i| i as usize)
    }

    /// An unchanged set keeps its table (nothing to recompute); a changed one gets a new
    /// table of the same size. The table is the whole state: consistency comes from the
    /// hashes, not from anything carried over.
    fn rebuild(&self, backends: Backends) -> Box<dyn Balancer> {
        let same = backends.len() == self.backends.len()
            && backends
                .iter()
                .zip(self.backends.iter())
                .all(|(a, b)| a.addr == b.addr && a.weight == b.weight);
        let table = if same {
            self.table.clone()
        } else {
            populate(self.size, &preferences(&backends, self.size)).into()
        };
        Box::new(Self {
            backends,
            table,
            size: self.size,
        })
    }
}

/// FNV-1a (64 bit) from `seed`, then SplitMix64's finalizer: FNV alone leaves the low
/// bits of short inputs poorly mixed, and slots are taken modulo the table size.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    mix(bytes
        .iter()
        .fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME)))
}

/// An address as bytes in a fixed layout (IP octets in network order, then the port),
/// so the hash does not depend on the platform or on Rust's `Hash` impls.
fn pod_bytes(addr: PodAddr) -> ([u8; 18], usize) {
    let mut bytes = [0u8; 18];
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    bytes[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    (bytes, len + 2)
}

fn hash_client(client: IpAddr) -> u64 {
    match client {
        IpAddr::V4(ip) => hash(CLIENT_SEED, &ip.octets()),
        IpAddr::V6(ip) => hash(CLIENT_SEED, &ip.octets()),
    }
}

/// One endpoint's permutation of the slots (`offset + j·skip mod M`) and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Preference {
    offset: u64,
    skip: u64,
    weight: u32,
}

fn preferences(backends: &[Backend], size: usize) -> Vec<Preference> {
    let m = size as u64;
    backends
        .iter()
        .map(|b| {
            let (bytes, len) = pod_bytes(b.addr);
            let key = &bytes[..len];
            Preference {
                offset: hash(OFFSET_SEED, key) % m,
                skip: hash(SKIP_SEED, key) % (m - 1) + 1,
                weight: b.weight,
            }
        })
        .collect()
}

/// The paper's population loop (its Pseudocode 1), with weights.
///
/// In round `r` (from 1) every endpoint in index order claims its next preferred free
/// slot, until the table is full. With weights, endpoint `i` takes part in round `r`
/// only while it has fewer than `r·wᵢ/w_max` slots, so the heaviest endpoints claim one
/// slot a round and the others in proportion; with equal weights this is exactly the
/// paper's loop. A heap ordered by (round, index) visits only the endpoints whose turn it
/// is, which keeps the build O(M log N) however skewed the weights.
fn populate(size: usize, preferences: &[Preference]) -> Vec<u32> {
    let m = size as u64;
    let max_weight = preferences.iter().map(|p| p.weight).max().unwrap_or(0);
    if max_weight == 0 || size < 2 {
        return Vec::new();
    }
    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; size];
    // The slot each endpoint looks at next, and how many it has claimed.
    let mut cursor: Vec<u64> = preferences.iter().map(|p| p.offset).collect();
    let mut claimed = vec![0u64; preferences.len()];
    let mut turns: BinaryHeap<Reverse<(u64, u32)>> = preferences
        .iter()
        .enumerate()
        .filter(|(_, p)| p.weight > 0)
        .map(|(i, _)| Reverse((1, i as u32)))
        .collect();
    let mut filled = 0;
    while filled < size {
        let Some(Reverse((_, i))) = turns.pop() else {
            break;
        };
        let (at, p) = (i as usize, preferences[i as usize]);
        // A permutation visits every slot and one is still free, so this ends.
        loop {
            let slot = cursor[at] as usize;
            cursor[at] = (cursor[at] + p.skip) % m;
            if table[slot] == FREE {
                table[slot] = i;
                break;
            }
        }
        filled += 1;
        claimed[at] += 1;
        // The first round r with claimed·w_max < r·w: floor(claimed·w_max / w) + 1.
        let next_round = claimed[at] * u64::from(max_weight) / u64::from(p.weight) + 1;
        turns.push(Reverse((next_round, i)));
    }
    table
}

#[cfg(test)]
fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::backends;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    /// A small prime, for property tests that build hundreds of tables.
    const SMALL: usize = 10_007;

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn the_papers_example() {
        // Table 1 of the paper: three backends over M = 7 with these permutations.
        let p = |offset, skip| Preference {
            offset,
            skip,
            weight: 1,
        };
        let (b0, b1, b2) = (p(3, 4), p(0, 2), p(3, 1));
        assert_eq!(populate(7, &[b0, b1, b2]), [1, 0, 1, 0, 2, 2, 0]);
        // B1 removed: only its slots and slot 6 move.
        assert_eq!(populate(7, &[b0, b2]), [0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned values: a change here would move clients between pods on upgrade, and
        // carousels of different versions would disagree.
        let addr = PodAddr("10.244.1.7:8080".parse().unwrap());
        let (bytes, len) = pod_bytes(addr);
        assert_eq!(&bytes[..len], &[10, 244, 1, 7, 0x1f, 0x90]);
        assert_eq!(hash(OFFSET_SEED, &[]), mix(OFFSET_SEED));
        let fixed = [
            hash(OFFSET_SEED, &bytes[..len]),
            hash(SKIP_SEED, &bytes[..len]),
            hash_client(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        ];
        assert_eq!(fixed, PINNED);
    }

    /// Recorded once and kept: see `the_hash_is_fixed`.
    const PINNED: [u64; 3] = [
        8315639510496721756,
        17265411198797687253,
        3213279344664952411,
    ];

    #[test]
    fn the_same_client_gets_the_same_endpoint() {
        let b = Maglev::new(backends(10, &[]));
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77));
        let first = b.pick(client);
        assert!(first.is_some());
        assert!((0..100).all(|_| b.pick(client) == first));
        // Another process building the same table agrees.
        assert_eq!(Maglev::new(backends(10, &[])).pick(client), first);
    }

    #[test]
    fn the_default_size_is_a_prime() {
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(SMALL));
        assert!(!is_prime(10_000) && !is_prime(1));
    }

    #[test]
    fn a_rebuild_is_the_table_of_the_new_set() {
        let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
        let old = Maglev::new(backends(5, &[]));
        let fresh = Maglev::new(backends(6, &[]));
        let rebuilt = old.rebuild(backends(6, &[]));
        for last in 0..=255 {
            let client = IpAddr::V4(Ipv4Addr::new(198, 51, 100, last));
            assert_eq!(rebuilt.pick(client), fresh.pick(client));
        }
        // An unchanged set shares the table it had.
        let same = old.rebuild(backends(5, &[]));
        assert_eq!(same.pick(client), old.pick(client));
    }

    #[test]
    fn empty_set_picks_nothing() {
        let b = Maglev::new(backends(0, &[]));
        assert_eq!(b.pick(IpAddr::V4(Ipv4Addr::LOCALHOST)), None);
    }

    #[test]
    fn the_default_table_is_balanced() {
        for n in [1, 3, 7, 100] {
            let b = Maglev::new(backends(n, &[]));
            let c = counts(b.table(), n);
            let (lo, hi) = (DEFAULT_TABLE_SIZE / n, DEFAULT_TABLE_SIZE.div_ceil(n));
            assert!(c.iter().all(|&k| lo <= k && k <= hi), "n={n}: {c:?}");
        }
    }

    #[test]
    fn weights_share_the_table() {
        let b = Maglev::new(backends(4, &[1, 1, 3, 3]));
        let c = counts(b.table(), 4);
        let custom = (c[2] + c[3]) as f64 / DEFAULT_TABLE_SIZE as f64;
        assert!((custom - 0.75).abs() < 0.001, "{c:?}");
    }

    proptest! {
        #[test]
        fn every_endpoint_gets_m_over_n_slots(n in 1usize..=100) {
            let b = Maglev::with_table_size(backends(n, &[]), SMALL);
            let c = counts(b.table(), n);
            let (lo, hi) = (SMALL / n, SMALL.div_ceil(n));
            prop_assert!(c.iter().all(|&k| lo <= k && k <= hi), "{:?}", c);
        }
    }

    proptest! {
        // Two tables of 65 537 slots a case: fewer cases keep the unoptimised build quick.
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Removing one endpoint moves its own slots, and at most 2 % of the others. At the
        /// default size: with fewer than ~100 slots per endpoint the paper's near-minimal
        /// disruption no longer holds (at 10 007 slots some sets of 5 move 4.5 %).
        #[test]
        fn removing_an_endpoint_disrupts_little(n in 2usize..=100, removed in 0usize..100) {
            let removed = removed % n;
            let all = backends(n, &[]);
            let rest: Backends = all.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, b)| b.clone()).collect();
            let before = Maglev::new(all.clone());
            let after = Maglev::new(rest.clone());
            let after = after.table();
            let mut kept = 0;
            let mut moved = 0;
            for (slot, &i) in before.table().iter().enumerate() {
                if i as usize == removed {
                    continue;
                }
                kept += 1;
                if all[i as usize].addr != rest[after[slot] as usize].addr {
                    moved += 1;
                }
            }
            prop_assert!(moved as f64 <= 0.02 * kept as f64, "{} of {} moved", moved, kept);
        }
    }
}
