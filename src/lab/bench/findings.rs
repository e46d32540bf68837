//! What each scenario found, in words computed from the run's own numbers: "least-
//! connections cut p99 from 164 ms to 61 ms (-63 %) by sending the slow pod 3 % of
//! connections". Every number a sentence shows comes with the result field it was read
//! from (a [`Quote`]), so a test can hold each finding to the numbers beside it.
//! Pure: results in, sentences out.

use serde::{Deserialize, Serialize};

use crate::lab::bench::report::RunResult;

/// One sentence about one scenario.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub scenario: String,
    pub text: String,
    /// The numbers `text` shows, each with where it was read.
    pub quotes: Vec<Quote>,
}

/// A number shown in a finding: `shown` appears in the text, and is `value` of `field`
/// of the result of `algorithm` (with `affinity`), in `unit`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Quote {
    pub algorithm: String,
    pub affinity: bool,
    /// A field of the result: `latency_ms.p99`, `stickiness`, or `pods.NAME.FIELD`.
    pub field: String,
    pub value: f64,
    /// How `shown` renders `value`: `ms` or `` (as is), `%` or `points` (times 100: a
    /// share, or a distance between two shares).
    pub unit: String,
    pub shown: String,
}

impl Quote {
    fn of(r: &RunResult, field: &str, value: f64, unit: &str, decimals: usize) -> Quote {
        let scaled = if matches!(unit, "%" | "points") {
            value * 100.0
        } else {
            value
        };
        let number = format!("{scaled:.decimals$}");
        let shown = match unit {
            "" => number,
            unit => format!("{number} {unit}"),
        };
        Quote {
            algorithm: r.algorithm.clone(),
            affinity: r.affinity,
            field: field.to_string(),
            value,
            unit: unit.to_string(),
            shown,
        }
    }
}

/// A sentence and its quotes, built together so that each number is written once.
struct Sentence {
    text: String,
    quotes: Vec<Quote>,
}

impl Sentence {
    fn new() -> Self {
        Sentence {
            text: String::new(),
            quotes: Vec::new(),
        }
    }

    fn say(&mut self, words: &str) -> &mut Self {
        self.text.push_str(words);
        self
    }

    fn quote(&mut self, r: &RunResult, field: &str, value: f64, unit: &str, d: usize) -> &mut Self {
        let quote = Quote::of(r, field, value, unit, d);
        self.text.push_str(&quote.shown);
        self.quotes.push(quote);
        self
    }

    /// Jain's index of `r`.
    fn jain(&mut self, r: &RunResult) -> &mut Self {
        self.quote(r, "jain_fairness", r.jain_fairness, "", 3)
    }

    /// The largest distance of a pod of `r` from its share, in points.
    fn deviation(&mut self, r: &RunResult) -> &mut Self {
        self.quote(
            r,
            "max_target_deviation",
            r.max_target_deviation,
            "points",
            1,
        )
    }

    fn done(&mut self, scenario: &str) -> Finding {
        Finding {
            scenario: scenario.to_string(),
            text: std::mem::take(&mut self.text),
            quotes: std::mem::take(&mut self.quotes),
        }
    }
}

/// The findings of every scenario of `results`, in the order the scenarios ran.
pub fn all(results: &[RunResult]) -> Vec<Finding> {
    let mut scenarios: Vec<&str> = Vec::new();
    for r in results {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    scenarios
        .into_iter()
        .flat_map(|scenario| {
            let of: Vec<&RunResult> = results.iter().filter(|r| r.scenario == scenario).collect();
            of_scenario(scenario, &of)
        })
        .collect()
}

fn of_scenario(scenario: &str, results: &[&RunResult]) -> Vec<Finding> {
    let found = match scenario {
        "uniform" | "dns" => evenness(results),
        "slow-pod" => slow_pod(results),
        "canary" => canary(results),
        "keepalive" => keepalive(results),
        "sticky" => sticky(results),
        "rolling-update" => rolling_update(results),
        "scale-up" => scale_up(results),
        "frontends" => frontends(results),
        "frontend-pools" => frontend_pools(results),
        "affinity-rollout" => affinity_rollout(results),
        _ => Vec::new(),
    };
    found.into_iter().map(|mut s| s.done(scenario)).collect()
}

/// The result with the least of `key`, and the one with the most (the first of equals).
fn extremes<'a>(
    results: &[&'a RunResult],
    key: impl Fn(&RunResult) -> Option<f64>,
) -> Option<(&'a RunResult, &'a RunResult)> {
    let keyed: Vec<(&RunResult, f64)> = results
        .iter()
        .filter_map(|r| key(r).map(|k| (*r, k)))
        .collect();
    let least = keyed
        .iter()
        .copied()
        .reduce(|a, b| if b.1 < a.1 { b } else { a })?;
    let most = keyed
        .iter()
        .copied()
        .reduce(|a, b| if b.1 > a.1 { b } else { a })?;
    Some((least.0, most.0))
}

fn name(r: &RunResult) -> String {
    if r.affinity {
        format!("{} with ClientIP affinity", r.algorithm)
    } else {
        r.algorithm.clone()
    }
}

fn evenness(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((worst, best)) = extremes(results, |r| Some(r.jain_fairness)) else {
        return Vec::new();
    };
    let mut s = Sentence::new();
    s.say(&format!("The most even was {} (Jain ", name(best)))
        .jain(best)
        .say(", no pod more than ")
        .deviation(best)
        .say(" from its share)");
    if worst.algorithm != best.algorithm {
        s.say(&format!("; the least even, {} (Jain ", name(worst)))
            .jain(worst)
            .say(")");
        if matches!(worst.algorithm.as_str(), "maglev" | "random") {
            s.say(": hashing and random draws are even only over many more connections than this run made");
        }
    }
    s.say(".");
    vec![s]
}

fn slow_pod(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((best, worst)) = extremes(results, |r| Some(r.latency_ms.p99)) else {
        return Vec::new();
    };
    let base = results
        .iter()
        .find(|r| r.algorithm == "round-robin")
        .copied()
        .unwrap_or(worst);
    let slow = |r: &RunResult| {
        r.pods.iter().find(|p| p.pod.contains("slow")).map(|p| {
            (
                format!("pods.{}.connection_share", p.pod),
                p.connection_share,
            )
        })
    };
    let mut s = Sentence::new();
    if best.algorithm == base.algorithm {
        s.say(&format!("No algorithm beat {} on p99 (", base.algorithm))
            .quote(base, "latency_ms.p99", base.latency_ms.p99, "ms", 0)
            .say(").");
        return vec![s];
    }
    let change = 100.0 * (best.latency_ms.p99 / base.latency_ms.p99 - 1.0);
    s.say(&format!("{} cut p99 from ", best.algorithm))
        .quote(base, "latency_ms.p99", base.latency_ms.p99, "ms", 0)
        .say(&format!(" ({}) to ", base.algorithm))
        .quote(best, "latency_ms.p99", best.latency_ms.p99, "ms", 0)
        .say(&format!(" ({change:+.0} %)"));
    if let (Some((field, share)), Some((base_field, base_share))) = (slow(best), slow(base)) {
        s.say(" by sending the slow pod ")
            .quote(best, &field, share, "%", 0)
            .say(" of connections (")
            .quote(base, &base_field, base_share, "%", 0)
            .say(&format!(" under {})", base.algorithm));
        if matches!(
            best.algorithm.as_str(),
            "least-connections" | "power-of-two-choices"
        ) {
            s.say(": it counts what each pod has open, and the slow pod holds its connections longest");
        }
    }
    s.say(".");
    vec![s]
}

fn canary(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((best, worst)) = extremes(results, |r| Some(r.max_target_deviation)) else {
        return Vec::new();
    };
    let mut s = Sentence::new();
    s.say(&format!(
        "{} came closest to the weights (no pod more than ",
        best.algorithm
    ))
    .deviation(best)
    .say(" from its share)");
    if worst.algorithm != best.algorithm {
        s.say(&format!("; {} missed by as much as ", worst.algorithm))
            .deviation(worst);
        if worst.algorithm == "round-robin" {
            s.say(", as it ignores weights");
        }
    }
    s.say(".");
    vec![s]
}

fn keepalive(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((worst, best)) = extremes(results, |r| Some(r.jain_fairness)) else {
        return Vec::new();
    };
    let mut s = Sentence::new();
    s.quote(best, "connections", best.connections as f64, "", 0)
        .say(" connections carried ")
        .quote(best, "requests", best.requests as f64, "", 0)
        .say(" requests, and a pod's share moves only by whole connections: the most even was ")
        .say(&format!("{} (Jain ", best.algorithm))
        .jain(best)
        .say(")");
    if worst.algorithm != best.algorithm {
        s.say(&format!(", the least {} (Jain ", worst.algorithm))
            .jain(worst)
            .say(")");
    }
    s.say(". New connections, or a per-request balancer, spread the requests.");
    vec![s]
}

fn sticky(results: &[&RunResult]) -> Vec<Sentence> {
    let off: Vec<&RunResult> = results.iter().filter(|r| !r.affinity).copied().collect();
    let on: Vec<&RunResult> = results.iter().filter(|r| r.affinity).copied().collect();
    let mut found = Vec::new();
    if let Some(rr) = off.iter().find(|r| r.algorithm == "round-robin") {
        if let Some(stickiness) = rr.stickiness {
            let mut s = Sentence::new();
            s.say("Without affinity, round-robin scores stickiness ")
                .quote(rr, "stickiness", stickiness, "", 2)
                .say(": a client's next connection goes to the next pod, so its most frequent pod holds only the connections that chance puts there.");
            found.push(s);
        }
    }
    if let Some((least, _)) = extremes(&on, |r| r.stickiness) {
        let stickiness = least.stickiness.unwrap_or(0.0);
        let mut s = Sentence::new();
        s.say(match stickiness >= 0.995 {
            true => {
                "With ClientIP affinity every algorithm kept each client on one pod (stickiness "
            }
            false => "With ClientIP affinity the clients mostly kept their pod (stickiness ",
        })
        .quote(least, "stickiness", stickiness, "", 2)
        .say(" at the least, ")
        .say(&least.algorithm)
        .say(")");
        if let Some(plain) = off.iter().find(|r| r.algorithm == least.algorithm) {
            s.say("; evenness is what it costs: Jain ")
                .jain(plain)
                .say(" without, ")
                .jain(least)
                .say(" with");
        }
        s.say(".");
        found.push(s);
    }
    found
}

fn rolling_update(results: &[&RunResult]) -> Vec<Sentence> {
    let mut found = Vec::new();
    if let Some((_, most_failed)) = extremes(results, |r| Some(r.failed_connections as f64)) {
        let failed = most_failed.failed_connections as f64;
        let mut s = Sentence::new();
        if most_failed.failed_connections == 0 {
            s.quote(most_failed, "failed_connections", failed, "", 0)
                .say(" connections failed under any algorithm while the pods were replaced");
        } else {
            s.say("While the pods were replaced, at most ")
                .quote(most_failed, "failed_connections", failed, "", 0)
                .say(&format!(" connections failed ({})", most_failed.algorithm));
        }
        s.say(": a terminating pod takes no new connection and finishes its open ones.");
        found.push(s);
    }
    if let Some((least, most)) = extremes(results, |r| r.moved_fraction) {
        let mut s = Sentence::new();
        s.say(&format!(
            "{} moved the fewest clients at each change (",
            least.algorithm
        ))
        .quote(
            least,
            "moved_fraction",
            least.moved_fraction.unwrap_or(0.0),
            "%",
            0,
        )
        .say(&format!("), {} the most (", most.algorithm))
        .quote(
            most,
            "moved_fraction",
            most.moved_fraction.unwrap_or(0.0),
            "%",
            0,
        )
        .say(")");
        if least.algorithm == "maglev" {
            s.say(": consistent hashing keeps the clients whose pod stayed");
        }
        s.say(".");
        found.push(s);
    }
    found
}

fn scale_up(results: &[&RunResult]) -> Vec<Sentence> {
    let mut found = Vec::new();
    if let Some((fast, slow)) = extremes(results, |r| r.converged_ms) {
        let mut s = Sentence::new();
        s.say(&format!(
            "{} gave the new pods their share ",
            fast.algorithm
        ))
        .quote(
            fast,
            "converged_ms",
            fast.converged_ms.unwrap_or(0.0),
            "ms",
            0,
        )
        .say(" after they joined");
        if slow.algorithm != fast.algorithm {
            s.say(&format!("; {} took ", slow.algorithm)).quote(
                slow,
                "converged_ms",
                slow.converged_ms.unwrap_or(0.0),
                "ms",
                0,
            );
        }
        s.say(".");
        found.push(s);
    }
    let never: Vec<&str> = results
        .iter()
        .filter(|r| r.converged_ms.is_none())
        .map(|r| r.algorithm.as_str())
        .collect();
    if !never.is_empty() {
        let mut s = Sentence::new();
        s.say(&format!(
            "Within the run, {} never held every pod within 5 points of its share.",
            never.join(", ")
        ));
        found.push(s);
    }
    found
}

/// kubernetes#5292: kept connections bound the pods that work, whatever the balancer.
fn frontends(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((_, most)) = extremes(results, |r| Some(r.pods_used as f64)) else {
        return Vec::new();
    };
    let mut s = Sentence::new();
    s.quote(most, "connections", most.connections as f64, "", 0)
        .say(" kept connections reached at most ")
        .quote(most, "pods_used", most.pods_used as f64, "", 0)
        .say(&format!(
            " of the {} pods, under any algorithm ({} the most): a connection stays on the pod it was given, so only as many pods work as there are kept connections. See frontend-pools for the way out.",
            most.pods.len(),
            most.algorithm
        ));
    vec![s]
}

/// The way out of kubernetes#5292: as many kept connections as pods, and an algorithm
/// that reaches every pod with them.
fn frontend_pools(results: &[&RunResult]) -> Vec<Sentence> {
    let Some((_, most)) = extremes(results, |r| Some(r.pods_used as f64)) else {
        return Vec::new();
    };
    let full: Vec<&str> = results
        .iter()
        .filter(|r| r.pods_used == most.pods_used)
        .map(|r| r.algorithm.as_str())
        .collect();
    let mut s = Sentence::new();
    s.say("With ")
        .quote(most, "connections", most.connections as f64, "", 0)
        .say(&format!(" kept connections, {} used ", full.join(", ")))
        .quote(most, "pods_used", most.pods_used as f64, "", 0)
        .say(&format!(" of the {} pods", most.pods.len()));
    let mut others: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.pods_used < most.pods_used)
        .copied()
        .collect();
    others.sort_by_key(|r| std::cmp::Reverse(r.pods_used));
    for (i, r) in others.iter().enumerate() {
        s.say(if i == 0 { "; " } else { ", " })
            .say(&format!("{} ", r.algorithm))
            .quote(r, "pods_used", r.pods_used as f64, "", 0);
    }
    s.say(".");
    let mut found = vec![s];
    let why = |algorithm: &str| others.iter().any(|r| r.algorithm == algorithm);
    let mut reasons = Vec::new();
    if why("random") || why("power-of-two-choices") {
        reasons.push("random draws repeat pods and miss others");
    }
    if why("maglev") {
        reasons.push(
            "maglev hashes the client address, so every connection of a frontend goes to one pod",
        );
    }
    if !reasons.is_empty() {
        let mut s = Sentence::new();
        s.say(&format!(
            "The others fall short because {}.",
            reasons.join("; ")
        ));
        found.push(s);
    }
    found
}

/// kubernetes#55603: under ClientIP affinity each replaced pod's clients are balanced
/// over the pods serving then, and stay.
fn affinity_rollout(results: &[&RunResult]) -> Vec<Sentence> {
    let on: Vec<&RunResult> = results.iter().filter(|r| r.affinity).copied().collect();
    let off: Vec<&RunResult> = results.iter().filter(|r| !r.affinity).copied().collect();
    let mut found = Vec::new();
    if let Some((least, most)) = extremes(&on, |r| r.final_max_mean_ratio) {
        let busiest = most
            .pods
            .iter()
            .filter_map(|p| p.final_share.map(|share| (p, share)))
            .reduce(|a, b| if b.1 > a.1 { b } else { a });
        let mut s = Sentence::new();
        s.say(&format!(
            "With ClientIP affinity, {} ended the update",
            most.algorithm
        ));
        if let Some((pod, share)) = busiest {
            s.say(&format!(" with {} taking ", pod.pod)).quote(
                most,
                &format!("pods.{}.final_share", pod.pod),
                share,
                "%",
                0,
            );
            s.say(" of the connections,");
        }
        s.say(" max/mean ")
            .quote(
                most,
                "final_max_mean_ratio",
                most.final_max_mean_ratio.unwrap_or(1.0),
                "",
                2,
            )
            .say(" (1 is even): each replaced pod's clients were balanced over the pods serving at that moment and then stayed, so the first new pods collected clients at every step");
        if least.algorithm != most.algorithm {
            s.say(&format!("; the least piled was {} (", least.algorithm))
                .quote(
                    least,
                    "final_max_mean_ratio",
                    least.final_max_mean_ratio.unwrap_or(1.0),
                    "",
                    2,
                )
                .say(")");
            if least.algorithm == "maglev" {
                s.say(", as the pod that replaces another takes over most of its hash slots, so its clients move to it together");
            }
        }
        s.say(".");
        found.push(s);
    }
    let best_on = on
        .iter()
        .filter_map(|r| r.final_max_mean_ratio)
        .reduce(f64::min);
    for r in off {
        let (Some(ratio), Some(stickiness)) = (r.final_max_mean_ratio, r.stickiness) else {
            continue;
        };
        let mut s = Sentence::new();
        s.say(&format!(
            "{} without affinity kept each client on one pod for ",
            r.algorithm
        ))
        .quote(r, "stickiness", stickiness, "%", 0)
        .say(" of its connections and ended ");
        let evener = best_on.is_some_and(|best| ratio < best);
        s.say(match evener {
            true => "more even than any algorithm with affinity (max/mean ",
            false => "at max/mean ",
        })
        .quote(r, "final_max_mean_ratio", ratio, "", 2)
        .say(if evener { ")" } else { "" });
        if r.algorithm == "maglev" && evener {
            s.say(": the client's address picks the pod from the pods serving now, with no memory of the old ones");
        }
        s.say(".");
        found.push(s);
    }
    found
}
