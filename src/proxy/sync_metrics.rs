//! The metrics of programming the node, under carousel's names and kube-proxy's
//! (`kubeproxy_sync_proxy_rules_*`, with kube-proxy's buckets and meaning), so that the
//! dashboards and alerts written for kube-proxy read carousel too.

use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge, Histogram};

use crate::programming::{unix_seconds, KUBE_PROXY_SYNC_BUCKETS};
use crate::telemetry::{names, Telemetry};

#[derive(Debug)]
pub(crate) struct SyncMetrics {
    /// A new table applied (carousel's: not the periodic checks).
    duration: Histogram,
    errors: Counter,
    last: Gauge,
    /// Every successful sync, a new table's or a periodic check's, as kube-proxy counts
    /// its `syncProxyRules` runs.
    kube_proxy_duration: Histogram,
    kube_proxy_last: Gauge,
    /// nftables mode only, as kube-proxy's nftables mode has it.
    kube_proxy_nftables_failures: Option<Counter>,
}

impl SyncMetrics {
    pub(crate) fn new(telemetry: &Telemetry, nftables: bool) -> Self {
        let bucketed = |name| telemetry.histogram_with(name, Vec::new(), &KUBE_PROXY_SYNC_BUCKETS);
        Self {
            duration: telemetry.histogram(names::SYNC_DURATION, Vec::new()),
            errors: telemetry.counter(names::SYNC_ERRORS_TOTAL, Vec::new()),
            last: telemetry.gauge(names::SYNC_LAST_TIMESTAMP, Vec::new()),
            kube_proxy_duration: bucketed(names::KUBE_PROXY_SYNC_DURATION),
            kube_proxy_last: telemetry.gauge(names::KUBE_PROXY_SYNC_LAST_TIMESTAMP, Vec::new()),
            kube_proxy_nftables_failures: nftables.then(|| {
                telemetry.counter(names::KUBE_PROXY_NFTABLES_SYNC_FAILURES_TOTAL, Vec::new())
            }),
        }
    }

    /// A sync that took `took` put its table in force; `new_table` unless it was a
    /// periodic check.
    pub(crate) fn succeeded(&self, took: Duration, new_table: bool) {
        let seconds = took.as_secs_f64();
        if new_table {
            self.duration.record(seconds);
        }
        self.kube_proxy_duration.record(seconds);
        let now = unix_seconds(SystemTime::now());
        self.last.set(now);
        self.kube_proxy_last.set(now);
    }

    pub(crate) fn failed(&self) {
        self.errors.increment(1);
        if let Some(failures) = &self.kube_proxy_nftables_failures {
            failures.increment(1);
        }
    }
}
