//! The balancing algorithms by the names users write (`carousel.dev/load-balancer`,
//! `--shadow`, `carousel bench --algorithms`): parsed once where a name comes in, and a
//! value everywhere after. The balancers themselves are in [`crate::balance`].

use std::fmt;
use std::str::FromStr;

/// A balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// The default, as kube-proxy's ipvs mode (`rr`).
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    PowerOfTwoChoices,
    Maglev,
    Random,
}

impl Algorithm {
    /// Every algorithm, in the order the docs, the lab and the benchmarks list them.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::PowerOfTwoChoices,
        Algorithm::Maglev,
        Algorithm::Random,
    ];

    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round-robin",
            Algorithm::WeightedRoundRobin => "weighted-round-robin",
            Algorithm::LeastConnections => "least-connections",
            Algorithm::PowerOfTwoChoices => "power-of-two-choices",
            Algorithm::Maglev => "maglev",
            Algorithm::Random => "random",
        }
    }

    /// Every name, comma-separated, for the messages that list what is known.
    pub(crate) fn known() -> String {
        Self::ALL.map(Algorithm::name).join(", ")
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no algorithm's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {name:?} (known: {known})", known = Algorithm::known())]
pub struct UnknownAlgorithm {
    pub(crate) name: String,
}

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| UnknownAlgorithm {
                name: name.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_algorithm_and_nothing_else_parses() {
        for algorithm in Algorithm::ALL {
            assert_eq!(algorithm.name().parse(), Ok(algorithm));
            assert_eq!(algorithm.to_string(), algorithm.name());
        }
        let err = "Round-Robin".parse::<Algorithm>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown algorithm \"Round-Robin\" (known: round-robin, weighted-round-robin, \
             least-connections, power-of-two-choices, maglev, random)"
        );
        assert_eq!(Algorithm::default(), Algorithm::RoundRobin);
    }
}
