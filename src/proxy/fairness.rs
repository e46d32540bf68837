//! `carousel_fairness_jain`: per Service port, Jain's index of the picks of the last
//! few seconds, each endpoint's picks over its weight (1: every pod got its share).
//! A task snapshots the endpoints' pick counters now and then; connections do nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Label;

use crate::addr::PodAddr;
use crate::lab::bench::stats;
use crate::model::ServiceKey;
use crate::proxy::routes::RouteTable;
use crate::telemetry::{names, Telemetry};

/// How often the counters are read.
pub const TICK: Duration = Duration::from_secs(2);
/// Ticks in the sliding window: ten seconds of picks.
pub const WINDOW_TICKS: usize = 5;

/// Jain's index of `(picks, weight)` pairs, picks relative to weight; None when the
/// window saw no pick, so that an idle Service keeps its last value.
pub fn window_fairness(counts: &[(u64, u32)]) -> Option<f64> {
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

type EndpointKey = (ServiceKey, String, PodAddr);

/// Updates every route's gauge each `tick`, over the last `window` ticks, until aborted.
///
/// The gauge is resolved here, once a window has picks, rather than with the route: a
/// gauge registered early would read 0, "maximally unfair", for an idle Service.
pub async fn track(
    routes: Arc<ArcSwap<RouteTable>>,
    telemetry: Arc<Telemetry>,
    tick: Duration,
    window: usize,
) {
    let mut history: HashMap<EndpointKey, History> = HashMap::new();
    let mut interval = tokio::time::interval(tick);
    loop {
        interval.tick().await;
        let table = routes.load();
        let mut seen = Vec::new();
        for route in table.internal_routes() {
            let mut counts = Vec::with_capacity(route.endpoints.len());
            for e in &route.endpoints {
                let key = (route.service.clone(), route.port.clone(), e.addr);
                let h = history.entry(key.clone()).or_default();
                let now = e.stats.picks.load(Ordering::Relaxed);
                h.deltas.push_back(now.saturating_sub(h.last));
                h.last = now;
                while h.deltas.len() > window {
                    h.deltas.pop_front();
                }
                counts.push((h.deltas.iter().sum(), e.weight));
                seen.push(key);
            }
            if let Some(jain) = window_fairness(&counts) {
                let labels = vec![
                    Label::new("namespace", route.service.namespace.to_string()),
                    Label::new("service", route.service.name.to_string()),
                    Label::new("port", route.port.clone()),
                ];
                telemetry.gauge(names::FAIRNESS_JAIN, labels).set(jain);
            }
        }
        // Endpoints that left forget their history; one that returns starts afresh.
        history.retain(|k, _| seen.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_count_against_weights() {
        assert_eq!(window_fairness(&[(10, 1), (10, 1)]), Some(1.0));
        assert_eq!(window_fairness(&[(30, 3), (10, 1)]), Some(1.0));
        assert_eq!(window_fairness(&[(10, 1), (0, 1)]), Some(0.5));
        assert_eq!(window_fairness(&[(0, 1), (0, 1)]), None);
    }
}
