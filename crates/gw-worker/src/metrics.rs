//! What a worker counts: events by kind, handler latency (histogram),
//! panics, redeliveries, and how many gateways it is linked to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gw_link::admin::metric;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A worker's counters.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub(crate) connects: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) closes: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) links: AtomicU64,
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl WorkerMetrics {
    pub(crate) fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The report sent to the register on every heartbeat.
    pub(crate) fn report(&self, worker_id: &str) -> gw_protocol::pb::WorkerReport {
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let count: u64 = self.latency.iter().map(c).sum();
        gw_protocol::pb::WorkerReport {
            worker_id: worker_id.to_string(),
            events_total: c(&self.connects)
                + c(&self.messages)
                + c(&self.closes)
                + c(&self.handshakes),
            handler_count: count,
            handler_seconds_sum: c(&self.latency_sum_us) as f64 / 1e6,
            gateways_linked: c(&self.links) as u32,
            handler_panics: c(&self.panics),
        }
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP gateworker_worker_events_total Events handled, by kind.\n# TYPE gateworker_worker_events_total counter");
        for (kind, v) in [
            ("handshake", &self.handshakes),
            ("connect", &self.connects),
            ("message", &self.messages),
            ("close", &self.closes),
        ] {
            let _ = writeln!(
                out,
                "gateworker_worker_events_total{{kind=\"{kind}\"}} {}",
                c(v)
            );
        }
        metric(
            &mut out,
            "gateworker_worker_handler_panics_total",
            "counter",
            "Hooks that panicked.",
            c(&self.panics),
        );
        metric(
            &mut out,
            "gateworker_worker_events_redelivered_total",
            "counter",
            "Events received marked redelivered.",
            c(&self.redelivered),
        );
        metric(
            &mut out,
            "gateworker_worker_gateway_links",
            "gauge",
            "Gateways linked now.",
            c(&self.links),
        );
        let _ = writeln!(out, "# HELP gateworker_worker_handler_duration_seconds Time spent in hooks.\n# TYPE gateworker_worker_handler_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += c(&self.latency[i]);
            let _ = writeln!(
                out,
                "gateworker_worker_handler_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += c(&self.latency[BUCKETS.len()]);
        let _ = writeln!(
            out,
            "gateworker_worker_handler_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "gateworker_worker_handler_duration_seconds_sum {}",
            c(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "gateworker_worker_handler_duration_seconds_count {cumulative}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = WorkerMetrics::default();
        m.observe(Duration::from_micros(50));
        m.observe(Duration::from_millis(3));
        m.observe(Duration::from_secs(10));
        let r = m.render();
        assert!(r.contains("le=\"0.0001\"} 1\n"), "{r}");
        assert!(r.contains("le=\"0.005\"} 2\n"), "{r}");
        assert!(r.contains("le=\"+Inf\"} 3\n"), "{r}");
        assert!(r.contains("_count 3\n"), "{r}");
    }
}
