//! The bench's scenarios: which pods serve, who the clients are, how long the load
//! runs and what changes on the way. Data only; `mod.rs` runs them.

use std::time::Duration;

use crate::algorithm::Algorithm;
use crate::lab::bench::load::PodSpec;
use crate::model::Protocol;

/// A change to the Service's pods during the load.
#[derive(Clone, Debug)]
pub(crate) enum Change {
    /// A new pod joins.
    Add(PodSpec),
    /// The pod at this index of the initial list is replaced by a new one: the new pod
    /// is ready first, the old one terminates and leaves once its connections are done.
    Replace(usize, PodSpec),
}

/// A change and when it happens, as a fraction of the run's duration.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub(crate) at: f64,
    pub(crate) change: Change,
}

/// One scenario, run once per algorithm.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) pods: Vec<PodSpec>,
    /// Distinct client addresses; each connection comes from one drawn by the seed.
    pub(crate) clients: usize,
    /// Connections open at once (one worker each, one connection after another).
    pub concurrency: usize,
    pub(crate) requests_per_connection: u32,
    /// The run stops at this many connections or at `duration`, whichever comes first.
    pub connections: usize,
    pub duration: Duration,
    /// ClientIP session affinity on the Service.
    pub(crate) affinity: bool,
    /// The Service port's transport; for UDP a "connection" is a flow: one client
    /// socket and the requests it sends.
    pub(crate) protocol: Protocol,
    pub(crate) events: Vec<Event>,
    /// Whether clients are many enough for stickiness to mean something.
    pub(crate) many_clients: bool,
    /// Connection `n` comes from client `n % clients` (each frontend opens its share of
    /// the connections), instead of from a client drawn by the seed.
    pub(crate) clients_in_turn: bool,
    /// The algorithms this scenario runs under, of those chosen (None: all of them).
    pub(crate) only: Option<&'static [Algorithm]>,
}

/// Every scenario name with its one-line description, for `--help` and `--scenario`.
pub(crate) const ABOUT: &[(&str, &str)] = &[
    (
        "uniform",
        "four equal pods, many clients: the baseline spread",
    ),
    (
        "slow-pod",
        "one pod ten times slower: p99/p999 per algorithm",
    ),
    (
        "canary",
        "custom:original weights 3:1: observed against target share",
    ),
    (
        "keepalive",
        "six long-lived connections, many requests each: balancing is per connection",
    ),
    (
        "dns",
        "UDP, a flow per client socket asking five queries: balancing is per flow",
    ),
    (
        "sticky",
        "many client addresses with ClientIP affinity off and on: stickiness, imbalance",
    ),
    (
        "rolling-update",
        "pods replaced one by one under load: failed connections, clients moved",
    ),
    (
        "scale-up",
        "two pods join mid-run: how fast each algorithm gives them their share",
    ),
    (
        "frontends",
        "kubernetes#5292: 5 frontends keep one connection each to 50 pods: pods used",
    ),
    (
        "frontend-pools",
        "the 5 frontends keep 10 connections each: which algorithms reach all 50 pods",
    ),
    (
        "affinity-rollout",
        "kubernetes#55603: ClientIP affinity through a rolling update piles clients on the first new pods",
    ),
];

/// What scenario `name` shows, as `--help` says it.
pub(crate) fn about(name: &str) -> Option<&'static str> {
    ABOUT
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, about)| *about)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pods(names: &[&str], service_time: Duration) -> Vec<PodSpec> {
    names
        .iter()
        .map(|n| PodSpec::new(n, service_time))
        .collect()
}

/// The scenario `name` (sticky yields two: affinity off, then on), sized for a quick
/// or a full run; empty for an unknown name.
pub fn build(name: &str, quick: bool) -> Vec<Scenario> {
    let size = Size { quick };
    let base = uniform(size);
    match name {
        "uniform" => vec![base],
        "slow-pod" => vec![slow_pod(base, size)],
        "canary" => vec![canary(base, size)],
        "keepalive" => vec![keepalive(base, size)],
        "dns" => vec![dns(base, size)],
        "sticky" => [false, true]
            .into_iter()
            .map(|affinity| sticky(base.clone(), size, affinity))
            .collect(),
        "rolling-update" => vec![rolling_update(base, size)],
        "scale-up" => vec![scale_up(base, size)],
        "frontends" => vec![frontends(base, size, 1)],
        "frontend-pools" => vec![frontends(base, size, 10)],
        "affinity-rollout" => vec![
            affinity_rollout(base.clone(), size, true),
            // The way out: stickiness from hashing the address, with no table to remember.
            Scenario {
                only: Some(&[Algorithm::Maglev]),
                ..affinity_rollout(base, size, false)
            },
        ],
        _ => Vec::new(),
    }
}

/// A quick run keeps every scenario to a fraction of a second per algorithm.
#[derive(Clone, Copy)]
struct Size {
    quick: bool,
}

impl Size {
    fn time(self, full: u64, short: u64) -> Duration {
        ms(if self.quick { short } else { full })
    }

    fn count(self, full: usize, short: usize) -> usize {
        if self.quick {
            short
        } else {
            full
        }
    }
}

/// The pods of most scenarios.
const FOUR: [&str; 4] = ["pod-a", "pod-b", "pod-c", "pod-d"];

fn four_pods() -> Vec<PodSpec> {
    pods(&FOUR, ms(1))
}

/// Four equal pods and many clients: the base the others vary.
fn uniform(size: Size) -> Scenario {
    Scenario {
        name: "uniform",
        pods: four_pods(),
        clients: 64,
        concurrency: 8,
        requests_per_connection: 1,
        connections: size.count(4000, 400),
        duration: size.time(800, 80),
        affinity: false,
        protocol: Protocol::Tcp,
        events: Vec::new(),
        many_clients: true,
        clients_in_turn: false,
        only: None,
    }
}

fn slow_pod(base: Scenario, size: Size) -> Scenario {
    let mut pods = pods(&FOUR, ms(2));
    // Ten times slower and able to serve only two at once: it queues.
    pods[3] = PodSpec {
        concurrency: Some(2),
        ..PodSpec::new("pod-slow", ms(20))
    };
    Scenario {
        name: "slow-pod",
        pods,
        concurrency: 16,
        connections: size.count(6000, 1200),
        duration: size.time(1000, 180),
        many_clients: false,
        ..base
    }
}

fn canary(base: Scenario, size: Size) -> Scenario {
    let mut pods = pods(&["custom-1", "custom-2", "original-1", "original-2"], ms(1));
    pods[0].weight = 3;
    pods[1].weight = 3;
    Scenario {
        name: "canary",
        pods,
        // A multiple of the weights' sum, so that a perfect split is possible.
        connections: size.count(3200, 320),
        duration: size.time(1000, 400),
        many_clients: false,
        ..base
    }
}

fn keepalive(base: Scenario, size: Size) -> Scenario {
    Scenario {
        name: "keepalive",
        clients: 6,
        concurrency: 6,
        requests_per_connection: if size.quick { 60 } else { 400 },
        connections: 6,
        duration: size.time(800, 80),
        many_clients: false,
        ..base
    }
}

/// Cluster DNS as resolvers use it: each client socket is one flow, and every query on
/// it goes to the pod its first one got, as the requests of a keep-alive connection do.
fn dns(base: Scenario, size: Size) -> Scenario {
    Scenario {
        name: "dns",
        protocol: Protocol::Udp,
        requests_per_connection: 5,
        connections: size.count(2000, 200),
        many_clients: false,
        ..base
    }
}

fn sticky(base: Scenario, size: Size, affinity: bool) -> Scenario {
    Scenario {
        name: "sticky",
        // Enough connections per client for stickiness to show in a quick run.
        clients: if size.quick { 48 } else { 200 },
        affinity,
        connections: size.count(3000, 600),
        duration: size.time(700, 90),
        ..base
    }
}

fn rolling_update(base: Scenario, size: Size) -> Scenario {
    let four = four_pods();
    Scenario {
        name: "rolling-update",
        clients: 100,
        connections: 100_000,
        duration: size.time(1000, 160),
        events: (0..4)
            .map(|i| Event {
                at: 0.2 + 0.15 * i as f64,
                change: Change::Replace(i, PodSpec::new(&format!("{}-v2", four[i].name), ms(1))),
            })
            .collect(),
        ..base
    }
}

fn scale_up(base: Scenario, size: Size) -> Scenario {
    let four = four_pods();
    let joins = |pod: &PodSpec| Event {
        at: 0.3,
        change: Change::Add(pod.clone()),
    };
    Scenario {
        name: "scale-up",
        pods: four[..2].to_vec(),
        clients: 100,
        connections: 100_000,
        duration: size.time(1000, 120),
        events: four[2..].iter().map(joins).collect(),
        ..base
    }
}

/// kubernetes#5292: a few frontends forward heavy traffic to many backends over kept
/// connections, `pool` each; the connections last the whole run.
fn frontends(base: Scenario, size: Size, pool: usize) -> Scenario {
    let names: Vec<String> = (1..=50).map(|i| format!("pod-{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Scenario {
        name: if pool == 1 {
            "frontends"
        } else {
            "frontend-pools"
        },
        pods: pods(&names, ms(1)),
        clients: 5,
        concurrency: 5 * pool,
        connections: 5 * pool,
        // Until the deadline ends them: the frontends never reconnect.
        requests_per_connection: u32::MAX,
        duration: size.time(200, 40),
        many_clients: false,
        clients_in_turn: true,
        ..base
    }
}

/// kubernetes#55603: a rolling update under ClientIP affinity. Each replaced pod's
/// clients are balanced over the pods serving at that moment and then stay, so the
/// first new pods collect clients at every step.
fn affinity_rollout(base: Scenario, size: Size, affinity: bool) -> Scenario {
    let four = four_pods();
    Scenario {
        name: "affinity-rollout",
        // Few enough that each client returns many times after the last step.
        clients: if size.quick { 100 } else { 250 },
        affinity,
        connections: 100_000,
        duration: size.time(600, 120),
        events: (0..4)
            .map(|i| Event {
                at: 0.15 + 0.12 * i as f64,
                change: Change::Replace(i, PodSpec::new(&format!("{}-v2", four[i].name), ms(1))),
            })
            .collect(),
        ..base
    }
}

/// Every scenario name, in the order they run.
pub fn names() -> impl Iterator<Item = &'static str> {
    ABOUT.iter().map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_scenario_is_built() {
        for name in names() {
            for quick in [true, false] {
                let built = build(name, quick);
                assert!(!built.is_empty(), "{name}");
                assert!(built.iter().all(|s| s.name == name));
            }
        }
        assert!(build("no-such", true).is_empty());
        assert_eq!(build("sticky", true).len(), 2);
    }

    #[test]
    fn the_help_lists_every_scenario_in_one_line() {
        let help = crate::config::BENCH_SCENARIOS_HELP;
        for (name, about) in ABOUT {
            assert!(
                help.lines()
                    .any(|l| l.trim_start().starts_with(name) && l.ends_with(about)),
                "{name}: {help}"
            );
        }
        assert_eq!(help.lines().count(), ABOUT.len() + 1);
    }
}
