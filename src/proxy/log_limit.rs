//! A bound on the log lines the data path writes: at most one a period per Service
//! port, the next one saying how many were held back meanwhile. A port whose pods all
//! refuse, under a thousand connections a second, logs once a second, not a thousand
//! times.

use std::sync::atomic::{AtomicU64, Ordering};

/// One line a second per Service port at most.
pub(crate) const PERIOD_MS: u64 = 1_000;

/// Two atomics; no lock on the connection's path.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    /// When the next line may be written (ms on `clock::now_ms`'s clock).
    next_ms: AtomicU64,
    /// Lines held back since the last one written.
    held: AtomicU64,
}

impl LogLimit {
    /// Whether a line may be written at `now` (ms): `Some(lines held back before it)`,
    /// or `None`, and the line is counted as held back.
    pub(crate) fn allow(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + PERIOD_MS, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_and_the_next_counts_the_rest() {
        let limit = LogLimit::default();
        assert_eq!(limit.allow(5), Some(0));
        for t in 6..1_005 {
            assert_eq!(limit.allow(t), None, "at {t}");
        }
        assert_eq!(limit.allow(1_005), Some(999));
        assert_eq!(limit.allow(1_006), None);
        assert_eq!(limit.allow(10_000), Some(1));
    }
}
