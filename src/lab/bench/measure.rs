//! From what the clients saw in one run (which pod took each connection, when, from
//! which client, how long each request took) to the measures of the report.

use std::collections::HashMap;

use crate::algorithm::Algorithm;
use crate::lab::bench::report::{Latency, PodResult, RunResult, Window};
use crate::stats;

/// One connection as its client saw it.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) client: u32,
    /// Milliseconds from the start of the run to the connect.
    pub(crate) start_ms: f64,
    /// The pod that answered (index into the run's pods); None when nothing answered.
    pub(crate) pod: Option<usize>,
    pub(crate) requests: u32,
    pub(crate) failed: bool,
}

/// The pods' target shares from `at_ms` on (parallel to the run's pods).
#[derive(Clone, Debug)]
pub(crate) struct Phase {
    pub(crate) at_ms: f64,
    pub(crate) targets: Vec<f64>,
}

/// Everything one run produced.
#[derive(Debug)]
pub(crate) struct Observed {
    pub(crate) pods: Vec<String>,
    pub(crate) records: Vec<Record>,
    pub(crate) latencies_ms: Vec<f64>,
    /// Target shares over time; the first phase starts at 0.
    pub(crate) phases: Vec<Phase>,
    pub(crate) duration_ms: f64,
}

/// Endpoint changes closer than this are one change for `moved_fraction`.
const SAME_CHANGE_MS: f64 = 5.0;

/// How many windows the run is cut into for the share-over-time view.
pub(crate) const WINDOWS: usize = 10;

pub(crate) fn measure(
    scenario: &str,
    algorithm: Algorithm,
    affinity: bool,
    many_clients: bool,
    mut observed: Observed,
) -> RunResult {
    let n = observed.pods.len();
    let answered: Vec<&Record> = observed
        .records
        .iter()
        .filter(|r| r.pod.is_some())
        .collect();
    let Tally {
        connections,
        requests,
        targets,
    } = tally(&answered, &observed.phases, n);
    let connection_share = stats::shares(&connections);
    let request_share = stats::shares(&requests);
    let relative: Vec<f64> = request_share
        .iter()
        .zip(&targets)
        .filter(|(_, t)| **t > 0.0)
        .map(|(s, t)| s / t)
        .collect();
    let [p50, p99, p999] = stats::latency_percentiles(&mut observed.latencies_ms);
    let changes = changes(&observed.phases);
    let windows = windows(&answered, n, observed.duration_ms);
    let last = (observed.phases.len() > 1).then(|| observed.phases.last().expect("more than one"));
    let final_shares = last.and_then(|phase| final_shares(&answered, phase, n));
    RunResult {
        scenario: scenario.to_string(),
        algorithm: algorithm.to_string(),
        connections: observed.records.len() as u64,
        failed_connections: observed.records.iter().filter(|r| r.failed).count() as u64,
        pods: observed
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| PodResult {
                pod: pod.clone(),
                target_share: targets[i],
                connection_share: connection_share[i],
                request_share: request_share[i],
                connections: connections[i],
                requests: requests[i],
                final_share: final_shares.as_ref().map(|f| f[i]),
            })
            .collect(),
        jain_fairness: stats::jain(&relative),
        max_mean_ratio: stats::max_mean_ratio(&relative),
        max_target_deviation: stats::max_deviation(&request_share, &targets),
        latency_ms: Latency { p50, p99, p999 },
        stickiness: many_clients.then(|| stickiness(&answered)),
        moved_fraction: (!changes.is_empty()).then(|| moved_fraction(&answered, &changes)),
        affinity,
        protocol: crate::model::Protocol::Tcp.to_string(),
        requests: requests.iter().sum(),
        converged_ms: changes
            .first()
            .and_then(|at| converged_after(&windows, &observed.phases, *at)),
        windows,
        pods_used: connections.iter().filter(|c| **c > 0).count() as u64,
        final_max_mean_ratio: last.zip(final_shares.as_ref()).map(|(phase, shares)| {
            let relative: Vec<f64> = shares
                .iter()
                .zip(&phase.targets)
                .filter(|(_, t)| **t > 0.0)
                .map(|(s, t)| s / t)
                .collect();
            stats::max_mean_ratio(&relative)
        }),
    }
}

/// Per pod: the connections and requests it answered, and its expected share.
struct Tally {
    connections: Vec<u64>,
    requests: Vec<u64>,
    targets: Vec<f64>,
}

fn tally(answered: &[&Record], phases: &[Phase], pods: usize) -> Tally {
    let mut connections = vec![0u64; pods];
    let mut requests = vec![0u64; pods];
    // A connection's targets are those of the table it met: a pod present for half the
    // run is expected to take half its share.
    let mut targets = vec![0.0; pods];
    for r in answered {
        let pod = r.pod.expect("filtered on answered");
        connections[pod] += 1;
        requests[pod] += u64::from(r.requests);
        let phase = phase_at(phases, r.start_ms);
        for (t, p) in targets.iter_mut().zip(&phase.targets) {
            *t += p;
        }
    }
    let total = answered.len().max(1) as f64;
    targets.iter_mut().for_each(|t| *t /= total);
    if answered.is_empty() {
        targets = phases[0].targets.clone();
    }
    Tally {
        connections,
        requests,
        targets,
    }
}

/// Each pod's share of the connections begun from the last change of the table on:
/// where the clients ended up.
/// None when no connection began after it.
fn final_shares(answered: &[&Record], last: &Phase, pods: usize) -> Option<Vec<f64>> {
    let mut counts = vec![0u64; pods];
    for r in answered.iter().filter(|r| r.start_ms >= last.at_ms) {
        counts[r.pod.expect("answered")] += 1;
    }
    counts
        .iter()
        .any(|c| *c > 0)
        .then(|| stats::shares(&counts))
}

/// When the table changed; changes pushed together (two pods added at once) count as
/// one.
fn changes(phases: &[Phase]) -> Vec<f64> {
    let mut changes: Vec<f64> = Vec::new();
    for phase in phases.iter().skip(1) {
        if changes
            .last()
            .is_none_or(|last| phase.at_ms - last > SAME_CHANGE_MS)
        {
            changes.push(phase.at_ms);
        }
    }
    changes
}

fn phase_at(phases: &[Phase], at_ms: f64) -> &Phase {
    phases
        .iter()
        .rev()
        .find(|p| p.at_ms <= at_ms)
        .unwrap_or(&phases[0])
}

/// Share of a client's connections that reached its most frequent pod, over every
/// client with more than one connection.
fn stickiness(records: &[&Record]) -> f64 {
    let mut per_client: HashMap<u32, HashMap<usize, u64>> = HashMap::new();
    for r in records {
        *per_client
            .entry(r.client)
            .or_default()
            .entry(r.pod.expect("answered"))
            .or_default() += 1;
    }
    let (mut top, mut all) = (0, 0);
    for pods in per_client.values() {
        let total: u64 = pods.values().sum();
        if total > 1 {
            top += pods.values().max().expect("not empty");
            all += total;
        }
    }
    if all == 0 {
        1.0
    } else {
        top as f64 / all as f64
    }
}

/// For each endpoint change, the share of clients seen on both sides whose last pod
/// before differs from their first pod after; averaged over the changes.
fn moved_fraction(records: &[&Record], changes: &[f64]) -> f64 {
    let mut fractions = Vec::new();
    for (i, at) in changes.iter().enumerate() {
        let from = if i == 0 { 0.0 } else { changes[i - 1] };
        let until = changes.get(i + 1).copied().unwrap_or(f64::INFINITY);
        let mut before: HashMap<u32, (f64, usize)> = HashMap::new();
        let mut after: HashMap<u32, (f64, usize)> = HashMap::new();
        for r in records {
            let pod = r.pod.expect("answered");
            if r.start_ms >= from && r.start_ms < *at {
                let e = before.entry(r.client).or_insert((r.start_ms, pod));
                if r.start_ms >= e.0 {
                    *e = (r.start_ms, pod);
                }
            } else if r.start_ms >= *at && r.start_ms < until {
                let e = after.entry(r.client).or_insert((r.start_ms, pod));
                if r.start_ms <= e.0 {
                    *e = (r.start_ms, pod);
                }
            }
        }
        let both: Vec<bool> = before
            .iter()
            .filter_map(|(c, (_, pod))| after.get(c).map(|(_, p)| p != pod))
            .collect();
        if !both.is_empty() {
            fractions.push(both.iter().filter(|m| **m).count() as f64 / both.len() as f64);
        }
    }
    if fractions.is_empty() {
        0.0
    } else {
        fractions.iter().sum::<f64>() / fractions.len() as f64
    }
}

/// Connection share per pod over `WINDOWS` equal slices of the run.
fn windows(records: &[&Record], pods: usize, duration_ms: f64) -> Vec<Window> {
    let width = (duration_ms / WINDOWS as f64).max(1.0);
    let mut counts = vec![vec![0u64; pods]; WINDOWS];
    for r in records {
        let w = ((r.start_ms / width) as usize).min(WINDOWS - 1);
        counts[w][r.pod.expect("answered")] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| Window {
            start_ms: i as f64 * width,
            end_ms: (i + 1) as f64 * width,
            connection_share: stats::shares(c),
        })
        .collect()
}

/// Milliseconds from the change at `at_ms` to the start of the first window after it
/// from which on every pod stays within 5 points of its target share.
fn converged_after(windows: &[Window], phases: &[Phase], at_ms: f64) -> Option<f64> {
    let within = |w: &Window| {
        let targets = &phase_at(phases, w.start_ms).targets;
        w.connection_share.iter().sum::<f64>() > 0.0
            && stats::max_deviation(&w.connection_share, targets) <= 0.05
    };
    let after: Vec<&Window> = windows.iter().filter(|w| w.start_ms >= at_ms).collect();
    (0..after.len())
        .find(|&i| after[i..].iter().all(|w| within(w)))
        .map(|i| after[i].start_ms - at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(client: u32, start_ms: f64, pod: usize) -> Record {
        Record {
            client,
            start_ms,
            pod: Some(pod),
            requests: 1,
            failed: false,
        }
    }

    #[test]
    fn clients_that_keep_their_pod_are_sticky_and_do_not_move() {
        let records: Vec<Record> = (0..40)
            .map(|i| record(i % 4, f64::from(i), (i % 4) as usize))
            .collect();
        let refs: Vec<&Record> = records.iter().collect();
        assert_eq!(stickiness(&refs), 1.0);
        assert_eq!(moved_fraction(&refs, &[20.0]), 0.0);
        let rotating: Vec<Record> = (0..40)
            .map(|i| record(i % 4, f64::from(i), (i % 3) as usize))
            .collect();
        let refs: Vec<&Record> = rotating.iter().collect();
        assert!(stickiness(&refs) < 0.5);
        assert!(moved_fraction(&refs, &[20.0]) > 0.5);
    }

    #[test]
    fn targets_follow_the_table_each_connection_met() {
        let observed = Observed {
            pods: vec!["a".into(), "b".into()],
            records: (0..100)
                .map(|i| record(i, f64::from(i), usize::from(i >= 50 && i % 2 == 1)))
                .collect(),
            latencies_ms: vec![1.0; 100],
            phases: vec![
                Phase {
                    at_ms: 0.0,
                    targets: vec![1.0, 0.0],
                },
                Phase {
                    at_ms: 50.0,
                    targets: vec![0.5, 0.5],
                },
            ],
            duration_ms: 100.0,
        };
        let result = measure("scale-up", Algorithm::RoundRobin, false, true, observed);
        assert_eq!(result.pods[0].target_share, 0.75);
        assert_eq!(result.pods[1].target_share, 0.25);
        assert_eq!(result.pods[1].connection_share, 0.25);
        assert!((result.jain_fairness - 1.0).abs() < 1e-9);
        assert_eq!(result.converged_ms, Some(0.0));
        let total: f64 = result.pods.iter().map(|p| p.connection_share).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
