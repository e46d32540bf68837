//! Passive outlier ejection: an endpoint that fails to accept a connection is skipped
//! for a while, longer on each failure in a row, and taken back by itself once the
//! period is over; the first connection it accepts again clears its record.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The first ejection lasts this long; each failure in a row doubles it up to `MAX`.
pub(crate) const BASE: Duration = Duration::from_millis(500);
pub(crate) const MAX: Duration = Duration::from_secs(30);

/// The ejection record of one endpoint: two atomics, read on every pick, no lock.
#[derive(Debug, Default)]
pub(crate) struct Ejection {
    failures: AtomicU32,
    until_ms: AtomicU64,
}

impl Ejection {
    /// Whether the endpoint is to be skipped at `now` (ms).
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        now < self.until_ms.load(Ordering::Relaxed)
    }

    /// Records a failed connect at `now`; returns the length of the ejection it starts.
    pub(crate) fn failed(&self, now: u64) -> Duration {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let period = BASE.saturating_mul(1u32 << (failures - 1).min(16)).min(MAX);
        self.until_ms
            .store(now + period.as_millis() as u64, Ordering::Relaxed);
        period
    }

    /// Records an accepted connection: the endpoint is healthy again. True when that
    /// cleared a record of failures, false (one load, nothing written) when there was
    /// none.
    pub(crate) fn succeeded(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.until_ms.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_grows_with_failures_in_a_row_and_is_capped() {
        let e = Ejection::default();
        assert!(!e.is_ejected(0));
        assert_eq!(e.failed(1000), BASE);
        assert!(e.is_ejected(1000 + 499));
        assert!(
            !e.is_ejected(1000 + 500),
            "back by itself when the period is over"
        );
        assert_eq!(e.failed(2000), BASE * 2);
        assert_eq!(e.failed(3000), BASE * 4);
        for _ in 0..40 {
            e.failed(4000);
        }
        assert_eq!(e.failed(5000), MAX);
    }

    #[test]
    fn a_success_clears_the_record() {
        let e = Ejection::default();
        assert!(!e.succeeded(), "no record to clear");
        e.failed(0);
        e.failed(0);
        assert!(e.succeeded());
        assert!(!e.succeeded(), "cleared once");
        assert!(!e.is_ejected(1));
        assert_eq!(
            e.failed(10),
            BASE,
            "the next failure starts from the base again"
        );
    }
}
