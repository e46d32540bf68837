//! Exponential backoff with jitter, for whatever is retried after a failure: a watch of
//! the API server, a sync of the node's rules. client-go's reflector numbers: 0.8 s
//! doubling to 30 s.

use std::time::Duration;

use crate::balance::sample::{entropy, mix};

/// The first pause after a failure.
pub const INITIAL: Duration = Duration::from_millis(800);
/// The longest pause.
pub const MAX: Duration = Duration::from_secs(30);

/// Exponential backoff with jitter: each pause is drawn from the upper half of a window
/// that doubles after every failure, up to `MAX`.
#[derive(Debug, Clone)]
pub struct Backoff {
    window: Duration,
    bits: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::seeded(entropy())
    }
}

impl Backoff {
    /// A backoff whose jitter follows `seed`.
    pub(crate) fn seeded(seed: u64) -> Self {
        Self {
            window: INITIAL,
            bits: seed,
        }
    }

    /// The pause before the next attempt; the window doubles for the one after.
    pub(crate) fn next_pause(&mut self) -> Duration {
        self.bits = mix(self.bits.wrapping_add(1));
        // A fraction in [0.5, 1): pauses of many nodes spread out, none shrinks below
        // half the window, so the spacing still doubles.
        let fraction = 0.5 + (self.bits >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        let pause = self.window.mul_f64(fraction);
        self.window = (self.window * 2).min(MAX);
        pause
    }

    /// Back to the first window, after a success.
    pub(crate) fn reset(&mut self) {
        self.window = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_with_jitter_up_to_the_cap() {
        let mut backoff = Backoff::seeded(1);
        let mut window = INITIAL;
        for _ in 0..12 {
            let pause = backoff.next_pause();
            assert!(
                pause >= window / 2 && pause < window,
                "{pause:?} outside [{:?}, {window:?})",
                window / 2
            );
            window = (window * 2).min(MAX);
        }
        assert_eq!(backoff.window, MAX);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::seeded(2);
        for _ in 0..5 {
            backoff.next_pause();
        }
        backoff.reset();
        assert!(backoff.next_pause() < INITIAL);
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let a: Vec<_> = (0..4)
            .scan(Backoff::seeded(3), |b, _| Some(b.next_pause()))
            .collect();
        let b: Vec<_> = (0..4)
            .scan(Backoff::seeded(4), |b, _| Some(b.next_pause()))
            .collect();
        assert_ne!(a, b);
    }
}
