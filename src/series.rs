//! carousel's metric registry: a series exists while some part of carousel holds its
//! handle, and leaves the exposition once nothing does. An endpoint's series go with
//! the endpoint, a Service's with the Service, so that /metrics and memory follow the
//! cluster as it is, not every pod it ever had.
//!
//! Handles are the `metrics` crate's `Counter`, `Gauge` and `Histogram` over shared
//! atomics; the text is Prometheus' exposition format, its help and type lines and
//! label escaping from `metrics-exporter-prometheus`'s formatting helpers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Label};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_key, sanitize_label_value, write_help_line, write_type_line,
};

/// What a family counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Cumulative buckets over fixed upper bounds, updated in place: a sample costs two
/// atomic additions and no memory.
#[derive(Debug)]
pub(crate) struct Buckets {
    bounds: &'static [f64],
    /// Samples per bucket (not cumulative); the last one is `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of the samples, as f64 bits.
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        // Prometheus buckets are "less than or equal": the first bound not below it.
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

#[derive(Clone, Debug)]
enum Storage {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<Buckets>),
}

impl Storage {
    /// Held only by the registry: nothing can update it any more.
    fn is_orphan(&self) -> bool {
        match self {
            Storage::Counter(a) | Storage::Gauge(a) => Arc::strong_count(a) == 1,
            Storage::Histogram(h) => Arc::strong_count(h) == 1,
        }
    }
}

#[derive(Clone, Debug)]
struct Family {
    kind: Kind,
    help: &'static str,
    /// By the rendered label set, `a="x",b="y"`.
    series: BTreeMap<String, Storage>,
}

/// The registry. One per proxy instance, so that tests running several see only
/// their own series.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

/// The help line of each family: `(name, text)`.
pub(crate) type Help = fn(&str) -> &'static str;

impl Registry {
    pub(crate) fn counter(&self, name: &'static str, help: Help, labels: &[Label]) -> Counter {
        match self.storage(name, help, Kind::Counter, labels, || {
            Storage::Counter(Arc::default())
        }) {
            Storage::Counter(a) => Counter::from_arc(a),
            _ => unreachable!("the family is a counter"),
        }
    }

    pub(crate) fn gauge(&self, name: &'static str, help: Help, labels: &[Label]) -> Gauge {
        match self.storage(name, help, Kind::Gauge, labels, || {
            Storage::Gauge(Arc::new(AtomicU64::new(0f64.to_bits())))
        }) {
            Storage::Gauge(a) => Gauge::from_arc(a),
            _ => unreachable!("the family is a gauge"),
        }
    }

    pub(crate) fn histogram(
        &self,
        name: &'static str,
        help: Help,
        labels: &[Label],
        bounds: &'static [f64],
    ) -> Histogram {
        match self.storage(name, help, Kind::Histogram, labels, || {
            Storage::Histogram(Arc::new(Buckets::new(bounds)))
        }) {
            Storage::Histogram(h) => Histogram::from_arc(h),
            _ => unreachable!("the family is a histogram"),
        }
    }

    /// The series' storage, shared with every other holder of the same series.
    ///
    /// # Panics
    /// When `name` was registered before as another kind: a bug, not an input.
    fn storage(
        &self,
        name: &'static str,
        help: Help,
        kind: Kind,
        labels: &[Label],
        new: impl FnOnce() -> Storage,
    ) -> Storage {
        let mut families = self.families.lock().expect("metrics lock poisoned");
        let family = families.entry(name).or_insert_with(|| Family {
            kind,
            help: help(name),
            series: BTreeMap::new(),
        });
        assert_eq!(family.kind, kind, "{name} is a {}", family.kind.name());
        family
            .series
            .entry(label_text(labels))
            .or_insert_with(new)
            .clone()
    }

    /// Forgets the series nothing holds any more; returns how many are left.
    pub(crate) fn sweep(&self) -> usize {
        let mut families = self.families.lock().expect("metrics lock poisoned");
        families.retain(|_, family| {
            family.series.retain(|_, s| !s.is_orphan());
            !family.series.is_empty()
        });
        families.values().map(|f| f.series.len()).sum()
    }

    /// Every live series in the Prometheus text format, families in name order.
    pub(crate) fn render(&self) -> String {
        self.sweep();
        // A copy of the handles, formatted outside the lock: a connection registering
        // its endpoint's series never waits for a scrape.
        let snapshot = self.families.lock().expect("metrics lock poisoned").clone();
        let mut out = String::new();
        for (name, family) in &snapshot {
            write_help_line(&mut out, name, None, None, family.help);
            write_type_line(&mut out, name, None, None, family.kind.name());
            for (labels, storage) in &family.series {
                match storage {
                    Storage::Counter(a) => {
                        line(&mut out, name, "", labels, a.load(Ordering::Relaxed))
                    }
                    Storage::Gauge(a) => line(
                        &mut out,
                        name,
                        "",
                        labels,
                        f64::from_bits(a.load(Ordering::Relaxed)),
                    ),
                    Storage::Histogram(h) => histogram(&mut out, name, labels, h),
                }
            }
        }
        out
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Buckets) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, count) in h.counts.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = match h.bounds.get(i) {
            Some(bound) => bound.to_string(),
            None => "+Inf".to_string(),
        };
        let with_le = format!("{labels}{sep}le=\"{le}\"");
        line(out, name, "_bucket", &with_le, cumulative);
    }
    let sum = f64::from_bits(h.sum.load(Ordering::Relaxed));
    line(out, name, "_sum", labels, sum);
    line(out, name, "_count", labels, cumulative);
}

fn line(out: &mut String, name: &str, suffix: &str, labels: &str, value: impl std::fmt::Display) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// `a="x",b="y"`, escaped, in the order given.
fn label_text(labels: &[Label]) -> String {
    let mut text = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(
            text,
            "{}=\"{}\"",
            sanitize_label_key(label.key()),
            sanitize_label_value(label.value())
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help(_: &str) -> &'static str {
        "what it counts"
    }

    #[test]
    fn a_series_lives_while_held_and_is_shared_by_its_holders() {
        let registry = Registry::default();
        let labels = [Label::new("pod", "a\"b")];
        let one = registry.counter("c_total", help, &labels);
        let two = registry.counter("c_total", help, &labels);
        one.increment(2);
        two.increment(3);
        let text = registry.render();
        assert!(text.contains("# HELP c_total what it counts\n# TYPE c_total counter\n"));
        assert!(text.contains("c_total{pod=\"a\\\"b\"} 5\n"), "{text}");
        drop(one);
        assert_eq!(registry.sweep(), 1, "still held by the second handle");
        drop(two);
        assert_eq!(registry.sweep(), 0);
        assert_eq!(
            registry.render(),
            "",
            "the family went with its last series"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        static BOUNDS: &[f64] = &[0.1, 1.0];
        let registry = Registry::default();
        let h = registry.histogram("d_seconds", help, &[], BOUNDS);
        for v in [0.05, 0.1, 0.5, 7.0] {
            h.record(v);
        }
        let text = registry.render();
        for want in [
            "d_seconds_bucket{le=\"0.1\"} 2\n",
            "d_seconds_bucket{le=\"1\"} 3\n",
            "d_seconds_bucket{le=\"+Inf\"} 4\n",
            "d_seconds_sum 7.65\n",
            "d_seconds_count 4\n",
        ] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }

    #[test]
    fn gauges_keep_what_was_set() {
        let registry = Registry::default();
        let g = registry.gauge("g", help, &[Label::new("state", "ready")]);
        g.set(3.0);
        g.decrement(1.0);
        assert!(registry.render().contains("g{state=\"ready\"} 2\n"));
    }
}
