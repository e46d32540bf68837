//! Changes on their way from the discovery source to the node, and the metrics of that
//! way: how many Service and endpoint changes arrived and wait, and how long a change
//! took from its EndpointSlice's trigger time until it was *programmed*: routed by the
//! proxy with the node's rules and listeners in force (the Kubernetes network
//! programming SLI), not merely published by the source.
//!
//! The source publishes each table through `Programming::publish`, which tags it with a
//! generation; the proxy reads tables through `Programming::read`, which says the
//! generation it got, and reports `programmed(generation)` once that table is in force.
//! Both happen under one lock, so a generation read always belongs to the table read,
//! however the watch channel coalesces tables in between.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use metrics::{Counter, Gauge, Histogram};

use crate::telemetry::{names, Telemetry};

/// The published tables the ledger tracks while the proxy has not programmed them; past
/// this, a new table's changes join the newest batch (and count from its programming).
const MAX_BATCHES: usize = 256;
/// Trigger times kept while not programmed, over all batches; past this the oldest go.
const MAX_TRIGGERS: usize = 10_000;

/// A table's generation: the count of tables published before and with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation(u64);

/// The changes one published table is the first to hold.
#[derive(Debug, Default)]
struct Batch {
    triggers: Vec<SystemTime>,
    services: u64,
    endpoints: u64,
}

#[derive(Debug, Default)]
struct Ledger {
    published: Generation,
    /// Received, and in no published table yet.
    unpublished: Batch,
    /// Published, not programmed yet, oldest first.
    batches: VecDeque<(Generation, Batch)>,
    triggers: usize,
}

/// The ledger, with the metric handles it updates.
#[derive(Debug)]
pub struct Programming {
    ledger: Mutex<Ledger>,
    latency: Histogram,
    kube_proxy_latency: Histogram,
    service_changes: Counter,
    endpoint_changes: Counter,
    services_pending: Gauge,
    endpoints_pending: Gauge,
    last_queued: Gauge,
}

impl Programming {
    pub(crate) fn new(telemetry: &Telemetry) -> Self {
        Self {
            ledger: Mutex::default(),
            latency: telemetry.histogram(names::NETWORK_PROGRAMMING_DURATION, Vec::new()),
            kube_proxy_latency: telemetry.histogram_with(
                names::KUBE_PROXY_NETWORK_PROGRAMMING_DURATION,
                Vec::new(),
                &KUBE_PROXY_PROGRAMMING_BUCKETS,
            ),
            service_changes: telemetry.counter(names::KUBE_PROXY_SERVICE_CHANGES_TOTAL, Vec::new()),
            endpoint_changes: telemetry
                .counter(names::KUBE_PROXY_ENDPOINT_CHANGES_TOTAL, Vec::new()),
            services_pending: telemetry
                .gauge(names::KUBE_PROXY_SERVICE_CHANGES_PENDING, Vec::new()),
            endpoints_pending: telemetry
                .gauge(names::KUBE_PROXY_ENDPOINT_CHANGES_PENDING, Vec::new()),
            last_queued: telemetry.gauge(names::KUBE_PROXY_LAST_QUEUED_TIMESTAMP, Vec::new()),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("programming ledger poisoned")
    }

    /// `services` Services and `endpoints` EndpointSlices changed at the source.
    pub(crate) fn received(&self, services: u64, endpoints: u64) {
        if services == 0 && endpoints == 0 {
            return;
        }
        let mut ledger = self.ledger();
        ledger.unpublished.services += services;
        ledger.unpublished.endpoints += endpoints;
        self.service_changes.increment(services);
        self.endpoint_changes.increment(endpoints);
        self.services_pending.increment(services as f64);
        self.endpoints_pending.increment(endpoints as f64);
        self.last_queued.set(unix_seconds(SystemTime::now()));
    }

    /// Publishes a table with `send`: the changes received since the last one, and the
    /// trigger times of its slice changes, are the new generation's.
    pub(crate) fn publish<T>(&self, triggers: Vec<SystemTime>, send: impl FnOnce() -> T) -> T {
        let mut ledger = self.ledger();
        let sent = send();
        let Ledger {
            published,
            unpublished,
            batches,
            triggers: kept,
        } = &mut *ledger;
        published.0 += 1;
        let mut batch = std::mem::take(unpublished);
        batch.triggers.extend(triggers);
        *kept += batch.triggers.len();
        let full = batches.len() >= MAX_BATCHES;
        match batches.back_mut() {
            // The proxy is far behind: the newest batch takes these changes too.
            Some((generation, newest)) if full => {
                *generation = *published;
                newest.triggers.append(&mut batch.triggers);
                newest.services += batch.services;
                newest.endpoints += batch.endpoints;
            }
            _ => batches.push_back((*published, batch)),
        }
        // Bounded whatever the source sends: the oldest trigger times go first.
        while *kept > MAX_TRIGGERS {
            let Some((_, oldest)) = batches.iter_mut().find(|(_, b)| !b.triggers.is_empty()) else {
                break;
            };
            let drop = (*kept - MAX_TRIGGERS).min(oldest.triggers.len());
            oldest.triggers.drain(..drop);
            *kept -= drop;
        }
        sent
    }

    /// Reads a table with `read`, and the generation it is.
    pub(crate) fn read<T>(&self, read: impl FnOnce() -> T) -> (T, Generation) {
        let ledger = self.ledger();
        (read(), ledger.published)
    }

    /// Every table up to `generation` is in force on the node: their changes are
    /// programmed now.
    pub(crate) fn programmed(&self, generation: Generation) {
        let now = SystemTime::now();
        let mut ledger = self.ledger();
        while ledger
            .batches
            .front()
            .is_some_and(|(g, _)| *g <= generation)
        {
            let (_, batch) = ledger.batches.pop_front().expect("checked above");
            ledger.triggers -= batch.triggers.len();
            for at in batch.triggers {
                // A trigger time ahead of this clock (skew) counts as instant.
                let seconds = now.duration_since(at).unwrap_or_default().as_secs_f64();
                self.latency.record(seconds);
                self.kube_proxy_latency.record(seconds);
            }
            self.services_pending.decrement(batch.services as f64);
            self.endpoints_pending.decrement(batch.endpoints as f64);
        }
    }
}

pub(crate) fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// kube-proxy's buckets for `kubeproxy_network_programming_duration_seconds`: every
/// quarter second to 0.5 s, every second to 59 s, every 5 s to 115 s, every 30 s to
/// 5 min.
pub(crate) const KUBE_PROXY_PROGRAMMING_BUCKETS: [f64; 80] = {
    let mut bounds = [0.0; 80];
    let mut i = 0;
    while i < 80 {
        bounds[i] = match i {
            0..=1 => 0.25 * (i + 1) as f64,
            2..=60 => (i - 1) as f64,
            61..=72 => 60.0 + 5.0 * (i - 61) as f64,
            _ => 120.0 + 30.0 * (i - 73) as f64,
        };
        i += 1;
    }
    bounds
};

/// kube-proxy's buckets for its sync durations: 1 ms doubling to 16.384 s.
pub(crate) const KUBE_PROXY_SYNC_BUCKETS: [f64; 15] = {
    let mut bounds = [0.0; 15];
    let mut i = 0;
    let mut bound = 0.001;
    while i < 15 {
        bounds[i] = bound;
        bound *= 2.0;
        i += 1;
    }
    bounds
};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_buckets_are_kube_proxys() {
        assert_eq!(&KUBE_PROXY_PROGRAMMING_BUCKETS[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert_eq!(KUBE_PROXY_PROGRAMMING_BUCKETS[60], 59.0);
        assert_eq!(&KUBE_PROXY_PROGRAMMING_BUCKETS[61..63], &[60.0, 65.0]);
        assert_eq!(KUBE_PROXY_PROGRAMMING_BUCKETS[72], 115.0);
        assert_eq!(&KUBE_PROXY_PROGRAMMING_BUCKETS[73..75], &[120.0, 150.0]);
        assert_eq!(KUBE_PROXY_PROGRAMMING_BUCKETS[79], 300.0);
        assert!(KUBE_PROXY_PROGRAMMING_BUCKETS
            .windows(2)
            .all(|w| w[0] < w[1]));
        assert_eq!(KUBE_PROXY_SYNC_BUCKETS[0], 0.001);
        assert_eq!(KUBE_PROXY_SYNC_BUCKETS[14], 16.384);
    }

    #[test]
    fn a_change_counts_once_the_table_holding_it_is_programmed() {
        let telemetry = Telemetry::new();
        let p = Programming::new(&telemetry);
        let ten_s_ago = SystemTime::now() - Duration::from_secs(10);
        p.received(1, 2);
        assert_eq!(p.publish(vec![ten_s_ago], || "t1"), "t1");
        let text = telemetry.render();
        assert_eq!(
            value(&text, names::KUBE_PROXY_ENDPOINT_CHANGES_PENDING),
            2.0
        );
        assert_eq!(value(&text, names::KUBE_PROXY_SERVICE_CHANGES_TOTAL), 1.0);
        let count = format!("{}_count", names::KUBE_PROXY_NETWORK_PROGRAMMING_DURATION);
        assert_eq!(value(&text, &count), 0.0, "published is not programmed");

        // A second table arrives before the proxy reads: the read gets both.
        p.received(0, 1);
        p.publish(Vec::new(), || ());
        let ((), generation) = p.read(|| ());
        p.programmed(generation);
        let text = telemetry.render();
        assert_eq!(
            value(&text, names::KUBE_PROXY_ENDPOINT_CHANGES_PENDING),
            0.0
        );
        assert_eq!(value(&text, names::KUBE_PROXY_ENDPOINT_CHANGES_TOTAL), 3.0);
        assert_eq!(value(&text, &count), 1.0);
        let bucket = format!(
            "{}_bucket{{le=\"9\"}}",
            names::KUBE_PROXY_NETWORK_PROGRAMMING_DURATION
        );
        assert_eq!(value(&text, &bucket), 0.0, "ten seconds is above 9 s");
        let sum = format!("{}_sum", names::NETWORK_PROGRAMMING_DURATION);
        assert!(value(&text, &sum) >= 10.0);
    }

    #[test]
    fn an_older_generation_leaves_newer_changes_pending() {
        let telemetry = Telemetry::new();
        let p = Programming::new(&telemetry);
        p.received(1, 0);
        p.publish(Vec::new(), || ());
        let ((), first) = p.read(|| ());
        p.received(1, 0);
        p.publish(Vec::new(), || ());
        p.programmed(first);
        let text = telemetry.render();
        assert_eq!(value(&text, names::KUBE_PROXY_SERVICE_CHANGES_PENDING), 1.0);
    }

    #[test]
    fn the_ledger_is_bounded_when_the_proxy_never_programs() {
        let telemetry = Telemetry::new();
        let p = Programming::new(&telemetry);
        let at = SystemTime::now();
        for _ in 0..(MAX_BATCHES * 4) {
            p.received(0, 1);
            p.publish(vec![at; 100], || ());
        }
        let ledger = p.ledger();
        assert_eq!(ledger.batches.len(), MAX_BATCHES);
        assert_eq!(ledger.triggers, MAX_TRIGGERS);
        let counted: usize = ledger.batches.iter().map(|(_, b)| b.triggers.len()).sum();
        assert_eq!(counted, MAX_TRIGGERS);
        drop(ledger);
        let ((), generation) = p.read(|| ());
        p.programmed(generation);
        let text = telemetry.render();
        assert_eq!(
            value(&text, names::KUBE_PROXY_ENDPOINT_CHANGES_PENDING),
            0.0
        );
    }
}
