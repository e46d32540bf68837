//! The standard Prometheus process families (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from /proc at each scrape by
//! `metrics-process` and written in the exposition format beside carousel's own.

use metrics_exporter_prometheus::formatting::{write_help_line, write_type_line};

/// Appends the process families to `out`; a value /proc did not give is left out.
pub(crate) fn render(out: &mut String) {
    let now = metrics_process::collector::collect();
    let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
    let families: [(&str, &str, &str, Option<f64>); 8] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            now.cpu_seconds_total,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            as_f64(now.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            as_f64(now.max_fds),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            as_f64(now.virtual_memory_bytes),
        ),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            as_f64(now.virtual_memory_max_bytes),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            as_f64(now.resident_memory_bytes),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            as_f64(now.start_time_seconds),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            as_f64(now.threads),
        ),
    ];
    for (name, kind, help, value) in families {
        let Some(value) = value else { continue };
        write_help_line(out, name, None, None, help);
        write_type_line(out, name, None, None, kind);
        out.push_str(name);
        out.push(' ');
        out.push_str(&value.to_string());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_threads_and_a_start_time() {
        let mut out = String::new();
        super::render(&mut out);
        let value = |name: &str| -> f64 {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from\n{out}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now && started > now - 86_400.0, "{started}");
        assert!(out.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
