//! `carousel_fairness_jain`: per Service port, Jain's index of the picks of the last
//! few seconds, each endpoint's picks over its weight (1: every pod got its share).
//! A task snapshots the endpoints' pick counters now and then; connections do nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Gauge;

use crate::addr::PodAddr;
use crate::proxy::port_metrics::PortMetrics;
use crate::proxy::routes::{Route, RouteTable};
use crate::stats;

/// How often the counters are read.
pub(crate) const TICK: Duration = Duration::from_secs(2);
/// Ticks in the sliding window: ten seconds of picks.
pub(crate) const WINDOW_TICKS: usize = 5;

/// Jain's index of `(picks, weight)` pairs, picks relative to weight; None when the
/// window saw no pick, so that an idle Service keeps its last value.
pub(crate) fn window_fairness(counts: &[(u64, u32)]) -> Option<f64> {
    if counts.iter().all(|(picks, _)| *picks == 0) {
        return None;
    }
    let relative: Vec<f64> = counts
        .iter()
        .filter(|(_, weight)| *weight > 0)
        .map(|(picks, weight)| *picks as f64 / f64::from(*weight))
        .collect();
    Some(stats::jain(&relative))
}

/// One endpoint's counter as last read and its picks per tick.
#[derive(Debug, Default)]
struct History {
    last: u64,
    deltas: VecDeque<u64>,
}

/// One Service port's window: its route as last seen and its endpoints' histories.
#[derive(Debug, Default)]
struct RouteHistory {
    /// Weak: a replaced route, and the endpoints only it holds, go when the table does.
    route: Option<Weak<Route>>,
    /// The route's own pick count at the last tick.
    last_total: u64,
    /// Ticks in a row without a pick; a window of them is skipped without a look at
    /// the endpoints, so idle Services cost one counter read per tick.
    quiet: usize,
    endpoints: HashMap<PodAddr, History>,
    /// `carousel_fairness_jain` and `carousel_fairness_window_picks`.
    gauges: Option<(Gauge, Gauge)>,
    /// The port's series, whose address keys this history: held, never read, as a
    /// `Weak` keeps that address from being reused by another port while it lives.
    _port: Weak<PortMetrics>,
    /// The last tick that saw the port.
    seen: u64,
}

/// Updates every route's gauge each `tick`, over the last `window` ticks, until aborted.
/// A tick costs one counter read per Service port, plus a walk of the endpoints of the
/// ports that had picks within the window or whose route changed. The same tick lets
/// the ClientIP affinity maps drop their expired clients ([`Route::sweep_affinity`]).
///
/// The gauge is resolved here, once a window has picks, rather than with the route: a
/// gauge registered early would read 0, "maximally unfair", for an idle Service.
pub(crate) async fn track(routes: Arc<ArcSwap<RouteTable>>, tick: Duration, window: usize) {
    // Keyed by the address of the port's series: the same across tables while the
    // port's labels stay.
    let mut history: HashMap<usize, RouteHistory> = HashMap::new();
    let mut interval = tokio::time::interval(tick);
    for seen in 1u64.. {
        interval.tick().await;
        let table = routes.load();
        for route in table.internal_routes() {
            let h = history
                .entry(Arc::as_ptr(&route.metrics) as usize)
                .or_insert_with(|| RouteHistory {
                    _port: Arc::downgrade(&route.metrics),
                    ..RouteHistory::default()
                });
            h.seen = seen;
            update(h, route, window);
        }
        // Ports that left forget their history; one that returns starts afresh.
        history.retain(|_, h| h.seen == seen);
        let now = tokio::time::Instant::now();
        table.routes().for_each(|route| route.sweep_affinity(now));
        tokio::task::yield_now().await;
    }
}

/// One tick of one Service port.
fn update(h: &mut RouteHistory, route: &Arc<Route>, window: usize) {
    let total = route.picks();
    let same = h
        .route
        .as_ref()
        .is_some_and(|r| std::ptr::eq(r.as_ptr(), Arc::as_ptr(route)));
    // A route without picks since its histories were dropped (or ever) costs nothing,
    // whether new or not.
    if total == h.last_total && (same || h.endpoints.is_empty()) {
        h.quiet += 1;
        if h.quiet >= window || h.endpoints.is_empty() {
            // Nothing in the window: the endpoints' histories are all zeros. Dropped
            // with their capacity, so that a quiet cluster holds none.
            h.endpoints = HashMap::new();
            return;
        }
    } else {
        h.quiet = 0;
    }
    // Endpoints first seen after a quiet window start from their count now.
    let fresh = h.endpoints.is_empty() && h.route.is_some();
    h.route = Some(Arc::downgrade(route));
    h.last_total = total;
    let mut endpoints = HashMap::with_capacity(route.endpoints.len());
    let mut counts = Vec::with_capacity(route.endpoints.len());
    for e in &route.endpoints {
        let now = e.picks.load(Ordering::Relaxed);
        let mut eh = h.endpoints.remove(&e.addr).unwrap_or_else(|| History {
            last: if fresh { now } else { 0 },
            deltas: VecDeque::new(),
        });
        eh.deltas.push_back(now.saturating_sub(eh.last));
        eh.last = now;
        while eh.deltas.len() > window {
            eh.deltas.pop_front();
        }
        counts.push((eh.deltas.iter().sum(), e.weight));
        endpoints.insert(e.addr, eh);
    }
    h.endpoints = endpoints;
    if let Some(jain) = window_fairness(&counts) {
        // The picks behind the index, so that a reader can tell one pick (an index of
        // 1/n) from a measure.
        let picks: u64 = counts.iter().map(|(picks, _)| picks).sum();
        let (index, window) = h.gauges.get_or_insert_with(|| route.metrics.fairness());
        index.set(jain);
        window.set(picks as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Telemetry;

    #[test]
    fn an_idle_port_is_skipped_after_a_window_and_a_busy_one_is_measured() {
        use crate::addr::ClientAddr;
        use crate::algorithm::Algorithm;
        use crate::model::Locality;
        use crate::proxy::routes::tests::{endpoint, table};
        use crate::proxy::routes::RouteBuilder;
        let table = table(
            Algorithm::RoundRobin,
            None,
            vec![endpoint(1, true, 1), endpoint(2, true, 1)],
        );
        let telemetry = Telemetry::new();
        let routes = RouteBuilder::new(&telemetry, Default::default()).build(
            &table,
            &RouteTable::default(),
            &Locality::default(),
        );
        let route = routes.internal_routes().next().unwrap();
        let client = ClientAddr(([192, 0, 2, 1], 40000).into());
        let mut h = RouteHistory::default();
        for _ in 0..4 {
            route.pick_at(client, tokio::time::Instant::now());
        }
        update(&mut h, route, 3);
        assert_eq!(h.endpoints.len(), 2);
        let text = telemetry.render();
        assert!(text.contains(
            "carousel_fairness_jain{namespace=\"default\",service=\"web\",port=\"http\"} 1"
        ));
        assert!(text.contains(
            "carousel_fairness_window_picks{namespace=\"default\",service=\"web\",port=\"http\"} 4"
        ));
        for _ in 0..3 {
            update(&mut h, route, 3);
        }
        assert!(
            h.endpoints.is_empty(),
            "a quiet window drops the endpoints' histories"
        );
        // Picks again: measured from the counts at that tick, not from the start.
        route.pick_at(client, tokio::time::Instant::now());
        update(&mut h, route, 3);
        let deltas: u64 = h.endpoints.values().flat_map(|e| &e.deltas).sum();
        assert_eq!(
            deltas, 0,
            "the tick that wakes a port only sets its baseline"
        );
        route.pick_at(client, tokio::time::Instant::now());
        route.pick_at(client, tokio::time::Instant::now());
        update(&mut h, route, 3);
        let deltas: u64 = h.endpoints.values().flat_map(|e| &e.deltas).sum();
        assert_eq!(deltas, 2);
    }

    #[test]
    fn picks_count_against_weights() {
        assert_eq!(window_fairness(&[(10, 1), (10, 1)]), Some(1.0));
        assert_eq!(window_fairness(&[(30, 3), (10, 1)]), Some(1.0));
        assert_eq!(window_fairness(&[(10, 1), (0, 1)]), Some(0.5));
        assert_eq!(window_fairness(&[(0, 1), (0, 1)]), None);
    }
}
