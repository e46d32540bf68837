//! ClientIP session affinity, layered over any algorithm: a client IP keeps the endpoint
//! it was given until it has been idle for the Service's timeout, or its pod leaves.
//!
//! Clients are remembered by pod address, not by index, so a table change that keeps
//! the pod keeps the client on it. The map is bounded: expired entries are replaced when
//! their client returns and swept on rebuilds and by the proxy's periodic tick (so that
//! `carousel_affinity_entries` counts live clients), and past `max_entries` new clients
//! are balanced without being remembered, and counted.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::time::Instant;

use super::sample::{entropy, mix};
use super::{Backend, Balancer};
use crate::addr::PodAddr;

/// Clients remembered per Service port unless configured otherwise: ~10 MB at most.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// Independent locks; a power of two. Connections from different clients rarely meet on
/// one lock, and 64 cache-line-sized shards cost 4 KiB per Service port.
const SHARDS: usize = 64;

/// The shortest time between two sweeps of the whole map: a map full of live clients
/// must not make every new client pay for a scan.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The metric handles of one Service port's affinity, resolved by the route table:
/// `carousel_affinity_lookups_total{result}` and `carousel_affinity_entries`.
#[derive(Clone, Debug)]
pub struct AffinityStats {
    /// The client's remembered pod took the connection.
    pub hit: Counter,
    /// Nothing remembered, or the remembered pod has left the eligible set.
    pub miss: Counter,
    /// Remembered, but idle for longer than the timeout.
    pub expired: Counter,
    /// `carousel_affinity_overflow_total`: new clients balanced without being
    /// remembered, because the map held `max_entries` live clients.
    pub overflow: Counter,
    pub entries: Gauge,
}

impl Default for AffinityStats {
    /// Handles that record nothing.
    fn default() -> Self {
        Self {
            hit: Counter::noop(),
            miss: Counter::noop(),
            expired: Counter::noop(),
            overflow: Counter::noop(),
            entries: Gauge::noop(),
        }
    }
}

/// The affinity layer of one build of a Service port's balancer.
#[derive(Debug)]
pub struct Affinity {
    /// Shared with the previous and next builds while affinity stays on.
    clients: Arc<Clients>,
    timeout: Duration,
    hit: Counter,
    miss: Counter,
    expired: Counter,
    overflow: Counter,
}

/// Remembered clients, sharded by client IP.
#[derive(Debug)]
struct Clients {
    shards: Box<[Shard]>,
    len: AtomicUsize,
    max: usize,
    /// `carousel_affinity_entries`, moved by deltas: several maps of one Service port
    /// may be alive at once (an old route still held by open connections), and the
    /// gauge is their sum.
    entries: Gauge,
    /// When the whole map was last swept.
    swept: Mutex<Instant>,
}

/// A std `Mutex`, not tokio's: it is never held across an `.await`, and the critical
/// section is one hash lookup and a store, so an uncontended lock is a single atomic
/// swap each way. Aligned to a cache line so that neighbouring shards do not contend.
/// Keyed by the client address as a `u128` (IPv4 mapped into IPv6).
#[derive(Debug)]
#[repr(align(64))]
struct Shard(Mutex<HashMap<u128, Sticky, Keys>>);

fn key(client: IpAddr) -> u128 {
    match client {
        IpAddr::V4(ip) => u128::from(ip.to_ipv6_mapped()),
        IpAddr::V6(ip) => u128::from(ip),
    }
}

/// The shards' hasher: a folded multiply of the address under keys drawn at random per
/// map, then SplitMix64's finalizer so that the low bits (hashbrown's bucket index) are
/// as good as the high ones. std's SipHash would cost as much as the rest of a hit; with
/// secret keys an outsider still cannot pick client addresses that pile into one bucket.
#[derive(Clone, Copy, Debug)]
struct Keys(u64, u64);

impl Keys {
    fn random() -> Self {
        Self(entropy(), entropy() | 1)
    }
}

impl BuildHasher for Keys {
    type Hasher = ClientHasher;

    fn build_hasher(&self) -> ClientHasher {
        ClientHasher {
            keys: *self,
            hash: 0,
        }
    }
}

struct ClientHasher {
    keys: Keys,
    hash: u64,
}

impl Hasher for ClientHasher {
    fn write_u128(&mut self, x: u128) {
        let product = u128::from(self.hash ^ x as u64 ^ self.keys.0)
            * u128::from((x >> 64) as u64 ^ self.keys.1);
        self.hash = product as u64 ^ (product >> 64) as u64;
    }

    /// Only `u128` keys are hashed; this keeps any other input well defined.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(16) {
            let mut word = [0u8; 16];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u128(u128::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        mix(self.hash)
    }
}

#[derive(Clone, Copy, Debug)]
struct Sticky {
    pod: PodAddr,
    /// Where `pod` was in the backends last time: checked before searching.
    index: u32,
    last_seen: Instant,
}

impl Sticky {
    /// The index of this client's pod in `backends`, if it is still eligible. Backends
    /// are sorted by address, so a pod that moved is found by binary search.
    fn locate(&self, backends: &[Backend]) -> Option<usize> {
        match backends.get(self.index as usize) {
            Some(b) if b.addr == self.pod => Some(self.index as usize),
            _ => backends.binary_search_by(|b| b.addr.cmp(&self.pod)).ok(),
        }
    }
}

enum Lookup {
    Miss,
    Expired,
}

/// What storing a fresh pick did.
enum Remember {
    Stored,
    /// Another connection of the client got there first, to this endpoint.
    Raced(usize),
    /// The table is at its cap.
    Full,
}

/// Locks a shard, ignoring poison: entries are plain values that a panicking holder
/// cannot have left half-written.
fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<u128, Sticky, Keys>> {
    shard.0.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Affinity {
    /// A layer with an empty map of at most `max_entries` clients.
    pub(crate) fn new(timeout: Duration, max_entries: usize, stats: AffinityStats) -> Self {
        let keys = Keys::random();
        let clients = Clients {
            shards: (0..SHARDS)
                .map(|_| Shard(Mutex::new(HashMap::with_hasher(keys))))
                .collect(),
            len: AtomicUsize::new(0),
            max: max_entries,
            entries: stats.entries,
            swept: Mutex::new(Instant::now()),
        };
        Self {
            clients: Arc::new(clients),
            timeout,
            hit: stats.hit,
            miss: stats.miss,
            expired: stats.expired,
            overflow: stats.overflow,
        }
    }

    /// The layer of the next build: the same clients, this build's timeout and handles.
    /// Sweeps expired clients on the way (at most once per second).
    pub(crate) fn carry(&self, timeout: Duration, stats: AffinityStats) -> Self {
        self.clients
            .sweep_if_due(Instant::now(), timeout, SWEEP_INTERVAL);
        Self {
            clients: self.clients.clone(),
            timeout,
            hit: stats.hit,
            miss: stats.miss,
            expired: stats.expired,
            overflow: stats.overflow,
        }
    }

    /// Drops the clients that have expired, if the last sweep is older than an eighth
    /// of the timeout (1 s at the least, a minute at the most): the proxy calls this on
    /// its periodic tick, so that the entries gauge and the memory follow expiries even
    /// when no client comes. O(entries) per sweep, so at most about 1/8 of the timeout
    /// late, for a cost that does not grow with how often it is called.
    pub(crate) fn sweep_expired(&self, now: Instant) {
        let interval = (self.timeout / 8).clamp(SWEEP_INTERVAL, Duration::from_secs(60));
        self.clients.sweep_if_due(now, self.timeout, interval);
    }

    /// Clients remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clients.len.load(Ordering::Relaxed)
    }

    /// The endpoint for a new connection from `client` at `now`: the remembered one if
    /// it is fresh and still among `backends`, else whatever `balancer` picks,
    /// remembered. `now` is the connection's own clock reading: the data path reads the
    /// clock once per connection, and a clock read costs as much as the lookup here.
    pub(crate) fn pick_at(
        &self,
        client: IpAddr,
        now: Instant,
        backends: &[Backend],
        balancer: &dyn Balancer,
    ) -> Option<usize> {
        let (shard, client_key) = (self.clients.shard(client), key(client));
        match self.recall(shard, client_key, now, backends) {
            Ok(i) => {
                self.hit.increment(1);
                return Some(i);
            }
            Err(Lookup::Miss) => self.miss.increment(1),
            Err(Lookup::Expired) => self.expired.increment(1),
        }
        // The algorithm picks outside the lock: least-connections scans every endpoint.
        let picked = balancer.pick(client)?;
        let fresh = Sticky {
            pod: backends.get(picked)?.addr,
            index: picked as u32,
            last_seen: now,
        };
        let remembered = match self.remember(shard, client_key, fresh, backends) {
            Remember::Raced(i) => return Some(i),
            Remember::Stored => true,
            Remember::Full => false,
        };
        if !remembered {
            self.overflow.increment(1);
            self.clients.sweep_if_due(now, self.timeout, SWEEP_INTERVAL);
        }
        Some(picked)
    }
}

impl Affinity {
    /// The fresh, still eligible endpoint remembered for `client_key`, refreshed.
    #[inline]
    fn recall(
        &self,
        shard: &Shard,
        client_key: u128,
        now: Instant,
        backends: &[Backend],
    ) -> Result<usize, Lookup> {
        let mut map = lock(shard);
        let s = map.get_mut(&client_key).ok_or(Lookup::Miss)?;
        if now.saturating_duration_since(s.last_seen) >= self.timeout {
            return Err(Lookup::Expired);
        }
        // None: its pod left the eligible set, and the client starts afresh.
        let i = s.locate(backends).ok_or(Lookup::Miss)?;
        s.index = i as u32;
        s.last_seen = s.last_seen.max(now);
        Ok(i)
    }

    /// Stores a fresh pick, unless another connection of the client stored one between
    /// our two looks (followed, so that both reach the same pod) or the table is full.
    #[inline]
    fn remember(
        &self,
        shard: &Shard,
        client_key: u128,
        fresh: Sticky,
        backends: &[Backend],
    ) -> Remember {
        let now = fresh.last_seen;
        match lock(shard).entry(client_key) {
            Entry::Occupied(mut e) => {
                let s = e.get_mut();
                if now.saturating_duration_since(s.last_seen) < self.timeout {
                    if let Some(i) = s.locate(backends) {
                        s.last_seen = s.last_seen.max(now);
                        return Remember::Raced(i);
                    }
                }
                *s = fresh;
                Remember::Stored
            }
            Entry::Vacant(e) => {
                if !self.clients.reserve() {
                    return Remember::Full;
                }
                e.insert(fresh);
                self.clients.entries.increment(1.0);
                Remember::Stored
            }
        }
    }
}

impl Clients {
    fn shard(&self, client: IpAddr) -> &Shard {
        let bits = match client {
            IpAddr::V4(ip) => u64::from(u32::from(ip)),
            IpAddr::V6(ip) => {
                let v = u128::from(ip);
                v as u64 ^ (v >> 64) as u64
            }
        };
        // Fibonacci hashing: the top bits of the product depend on every bit of the
        // address, so neighbouring clients spread over the shards.
        let index = bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SHARDS.trailing_zeros());
        &self.shards[index as usize % self.shards.len()]
    }

    /// Claims room for one more client, unless the map is full.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Drops every client idle for `timeout`, unless a sweep ran less than `interval`
    /// ago or is running now.
    fn sweep_if_due(&self, now: Instant, timeout: Duration, interval: Duration) {
        let mut swept = match self.swept.try_lock() {
            Ok(swept) => swept,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if now.saturating_duration_since(*swept) < interval {
            return;
        }
        *swept = now;
        drop(swept);
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|_, s| now.saturating_duration_since(s.last_seen) < timeout);
            let removed = before - map.len();
            drop(map);
            if removed > 0 {
                self.len.fetch_sub(removed, Ordering::Relaxed);
                self.entries.decrement(removed as f64);
            }
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.entries.decrement(*self.len.get_mut() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pick now.
    fn pick(
        affinity: &Affinity,
        client: IpAddr,
        backends: &[Backend],
        balancer: &dyn Balancer,
    ) -> Option<usize> {
        affinity.pick_at(client, Instant::now(), backends, balancer)
    }
    use crate::balance::testing::backends;
    use crate::balance::{Backends, RoundRobin};
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicU64;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn client(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    /// Handles backed by plain atomics, so tests read them without a recorder.
    #[derive(Default)]
    struct Seen {
        hit: Arc<AtomicU64>,
        miss: Arc<AtomicU64>,
        expired: Arc<AtomicU64>,
        overflow: Arc<AtomicU64>,
        entries: Arc<AtomicU64>,
    }

    impl Seen {
        fn stats(&self) -> AffinityStats {
            AffinityStats {
                hit: Counter::from_arc(self.hit.clone()),
                miss: Counter::from_arc(self.miss.clone()),
                expired: Counter::from_arc(self.expired.clone()),
                overflow: Counter::from_arc(self.overflow.clone()),
                entries: Gauge::from_arc(self.entries.clone()),
            }
        }

        fn counts(&self) -> (u64, u64, u64) {
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            (get(&self.hit), get(&self.miss), get(&self.expired))
        }

        fn entries(&self) -> f64 {
            f64::from_bits(self.entries.load(Ordering::Relaxed))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_keeps_its_pod_until_it_has_been_idle_for_the_timeout() {
        let set = backends(3, &[]);
        let rr = RoundRobin::new(set.clone());
        let seen = Seen::default();
        let affinity = Affinity::new(TIMEOUT, DEFAULT_MAX_ENTRIES, seen.stats());
        let first = pick(&affinity, client(1), &set, &rr);
        assert_eq!(first, Some(0));
        // Round-robin alone would move on; the client stays, as long as it comes back
        // within the timeout each time.
        for _ in 0..5 {
            tokio::time::advance(TIMEOUT - Duration::from_secs(1)).await;
            assert_eq!(pick(&affinity, client(1), &set, &rr), first);
        }
        assert_eq!(seen.counts(), (5, 1, 0));
        tokio::time::advance(TIMEOUT).await;
        assert_eq!(pick(&affinity, client(1), &set, &rr), Some(1));
        assert_eq!(seen.counts(), (5, 1, 1));
        assert_eq!(affinity.len(), 1);
        assert_eq!(seen.entries(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn different_clients_are_balanced_by_the_algorithm() {
        let set = backends(3, &[]);
        let rr = RoundRobin::new(set.clone());
        let affinity = Affinity::new(TIMEOUT, DEFAULT_MAX_ENTRIES, AffinityStats::default());
        let firsts: Vec<_> = (1..=6)
            .map(|c| pick(&affinity, client(c), &set, &rr))
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2].map(Some));
        for c in 1..=6 {
            assert_eq!(
                pick(&affinity, client(c), &set, &rr),
                firsts[c as usize - 1]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_pod_is_kept_across_table_changes_until_it_leaves() {
        let all = backends(4, &[]);
        let rr = RoundRobin::new(all.clone());
        let seen = Seen::default();
        let affinity = Affinity::new(TIMEOUT, DEFAULT_MAX_ENTRIES, seen.stats());
        rr.pick(client(0)); // move the rotation so the client lands on index 1
        assert_eq!(pick(&affinity, client(1), &all, &rr), Some(1));
        let pod = all[1].addr;

        // The first endpoint leaves: the client's pod is now at index 0.
        let without_first: Backends = all[1..].to_vec().into();
        let next = affinity.carry(TIMEOUT, seen.stats());
        let rr = RoundRobin::new(without_first.clone());
        let i = pick(&next, client(1), &without_first, &rr).unwrap();
        assert_eq!(without_first[i].addr, pod);

        // Its own pod leaves (drained or gone): the client is picked afresh.
        let without_pod: Backends = all.iter().filter(|b| b.addr != pod).cloned().collect();
        let last = next.carry(TIMEOUT, seen.stats());
        let rr = RoundRobin::new(without_pod.clone());
        let i = pick(&last, client(1), &without_pod, &rr).unwrap();
        assert_ne!(without_pod[i].addr, pod);
        assert_eq!(seen.counts(), (1, 2, 0));
        // ...and then stays on the new one.
        assert_eq!(pick(&last, client(1), &without_pod, &rr), Some(i));
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_bound_new_clients_are_balanced_but_not_remembered() {
        let set = backends(3, &[]);
        let rr = RoundRobin::new(set.clone());
        let seen = Seen::default();
        let affinity = Affinity::new(TIMEOUT, 2, seen.stats());
        pick(&affinity, client(1), &set, &rr);
        pick(&affinity, client(2), &set, &rr);
        // The third is served, by the rotation, but not remembered, and that is counted.
        assert_eq!(pick(&affinity, client(3), &set, &rr), Some(2));
        assert_eq!(pick(&affinity, client(3), &set, &rr), Some(0));
        assert_eq!(affinity.len(), 2);
        assert_eq!(seen.entries(), 2.0);
        assert_eq!(seen.overflow.load(Ordering::Relaxed), 2);
        // Once the first two have expired, room is made for the next new client.
        tokio::time::advance(TIMEOUT + SWEEP_INTERVAL).await;
        pick(&affinity, client(3), &set, &rr);
        pick(&affinity, client(3), &set, &rr);
        assert_eq!(affinity.len(), 1);
        assert_eq!(seen.entries(), 1.0);
    }

    /// Three backends, and an affinity that has remembered clients 1 to 10.
    fn ten_clients_remembered() -> (Backends, RoundRobin, Seen, Affinity) {
        let set = backends(3, &[]);
        let rr = RoundRobin::new(set.clone());
        let seen = Seen::default();
        let affinity = Affinity::new(TIMEOUT, DEFAULT_MAX_ENTRIES, seen.stats());
        for c in 1..=10 {
            pick(&affinity, client(c), &set, &rr);
        }
        (set, rr, seen, affinity)
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_sweep_takes_expired_clients_off_the_gauge_without_new_clients() {
        let (_, _, seen, affinity) = ten_clients_remembered();
        affinity.sweep_expired(Instant::now());
        assert_eq!(seen.entries(), 10.0, "nobody has expired yet");
        tokio::time::advance(TIMEOUT).await;
        affinity.sweep_expired(Instant::now());
        assert_eq!((affinity.len(), seen.entries()), (0, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuild_sweeps_expired_clients() {
        let (set, rr, seen, affinity) = ten_clients_remembered();
        tokio::time::advance(TIMEOUT / 2).await;
        pick(&affinity, client(1), &set, &rr);
        tokio::time::advance(TIMEOUT / 2).await;
        let next = affinity.carry(TIMEOUT, seen.stats());
        assert_eq!(next.len(), 1);
        assert_eq!(seen.entries(), 1.0);
        // Dropping the last layer takes its entries off the gauge.
        drop(affinity);
        drop(next);
        assert_eq!(seen.entries(), 0.0);
    }

    #[test]
    fn the_hasher_spreads_neighbouring_addresses() {
        let keys = Keys::random();
        let hashes: std::collections::HashSet<u64> = (0..65_536u32)
            .map(|i| keys.hash_one(key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))))
            .collect();
        assert_eq!(hashes.len(), 65_536);
        // hashbrown takes its buckets from the low bits and its tags from the top 7.
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 0xffff).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(low.len() > 40_000, "{}", low.len());
        assert_eq!(top.len(), 128);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_set_picks_nothing_and_remembers_nothing() {
        let empty = backends(0, &[]);
        let rr = RoundRobin::new(empty.clone());
        let affinity = Affinity::new(TIMEOUT, DEFAULT_MAX_ENTRIES, AffinityStats::default());
        assert_eq!(pick(&affinity, client(1), &empty, &rr), None);
        assert_eq!(affinity.len(), 0);
    }
}
