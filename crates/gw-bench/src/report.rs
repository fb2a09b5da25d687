//! The result of one run: printed as a table for people and serialized as
//! JSON for scripts comparing runs.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::stats::LatencySummary;

/// At most this many distinct error messages are kept in a report; the
/// count of all errors is kept separately.
pub const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The scenario's parameters as given (rooms, members, window, ...).
    pub params: serde_json::Value,
    pub urls: Vec<String>,
    pub threads: usize,
    pub connections: u64,
    /// Seconds from the first connect to all clients ready.
    pub setup_s: f64,
    /// Seconds of the measured phase (for message scenarios: first send to
    /// last delivery; for conns: first connect attempt to last welcome).
    pub elapsed_s: f64,

    // Message scenarios (fanout, echo, whisper).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reordered: Option<u64>,
    /// Deliveries the generator cannot attribute: unknown sender, sequence
    /// never sent, unparseable payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unexpected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_per_sec: Option<f64>,
    /// Distinct deliveries per second (round trips per second for echo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<LatencySummary>,
    /// With `--timeline-ms`: its interval, and distinct deliveries in each
    /// interval from the start of the measured phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<u64>,

    /// CPU used over the measured phase, percent of one core: tells whether
    /// the generator (or the server) was the bottleneck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_cpu_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_pct: Option<f64>,

    // conns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_pids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_kib_per_conn: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_kib_per_conn: Option<f64>,

    pub error_count: u64,
    pub errors: Vec<String>,
    /// True when nothing was lost, duplicated, reordered or unexpected and
    /// no error occurred.
    pub ok: bool,
}

impl Report {
    pub fn add_error(&mut self, e: impl Into<String>) {
        self.error_count += 1;
        let e = e.into();
        if self.errors.len() < MAX_ERRORS && !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    /// Recompute `ok` from the figures.
    pub fn finish(&mut self) {
        let bad = self.lost.unwrap_or(0)
            + self.duplicated.unwrap_or(0)
            + self.reordered.unwrap_or(0)
            + self.unexpected.unwrap_or(0)
            + self.failed.unwrap_or(0);
        self.ok = bad == 0 && self.error_count == 0;
    }

    /// Why the run failed, for the exit message; `None` when it passed.
    pub fn failure(&self) -> Option<String> {
        if self.ok {
            return None;
        }
        let mut s = String::new();
        for (name, v) in [
            ("lost", self.lost),
            ("duplicated", self.duplicated),
            ("reordered", self.reordered),
            ("unexpected", self.unexpected),
            ("failed connections", self.failed),
        ] {
            if let Some(v @ 1..) = v {
                let _ = write!(s, "{v} {name}; ");
            }
        }
        if self.error_count > 0 {
            let _ = write!(
                s,
                "{} error(s), first: {}",
                self.error_count, self.errors[0]
            );
        }
        Some(s.trim_end_matches("; ").to_string())
    }

    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row("scenario", self.scenario.clone());
        if let Some(p) = self.params.as_object() {
            let ps: Vec<String> = p.iter().map(|(k, v)| format!("{k}={v}")).collect();
            row("params", ps.join(" "));
        }
        row("urls", self.urls.join(" "));
        row("threads", self.threads.to_string());
        row("connections", self.connections.to_string());
        row("setup_s", format!("{:.3}", self.setup_s));
        row("elapsed_s", format!("{:.3}", self.elapsed_s));
        let opt = |v: Option<u64>| v.map(|v| v.to_string());
        for (k, v) in [
            ("sent", opt(self.sent)),
            ("expected", opt(self.expected)),
            ("delivered", opt(self.delivered)),
            ("lost", opt(self.lost)),
            ("duplicated", opt(self.duplicated)),
            ("reordered", opt(self.reordered)),
            ("unexpected", opt(self.unexpected)),
            ("sent/s", self.sent_per_sec.map(|v| format!("{v:.0}"))),
            (
                "deliveries/s",
                self.deliveries_per_sec.map(|v| format!("{v:.0}")),
            ),
            ("latency ms", self.latency_ms.as_ref().map(fmt_lat)),
            (
                "timeline",
                self.timeline_ms.map(|ms| {
                    let counts: Vec<String> = self.timeline.iter().map(|c| c.to_string()).collect();
                    format!("deliveries per {ms} ms: {}", counts.join(" "))
                }),
            ),
            (
                "generator cpu %",
                self.generator_cpu_pct.map(|v| format!("{v:.0}")),
            ),
            (
                "server cpu %",
                self.server_cpu_pct.map(|v| format!("{v:.0}")),
            ),
            ("connected", opt(self.connected)),
            ("failed", opt(self.failed)),
            (
                "connects/s",
                self.connects_per_sec.map(|v| format!("{v:.0}")),
            ),
            ("connect ms", self.connect_ms.as_ref().map(fmt_lat)),
            ("hold_s", self.hold_s.map(|v| format!("{v:.1}"))),
            (
                "server rss KiB",
                self.server_rss_before_kib
                    .zip(self.server_rss_after_kib)
                    .map(|(a, b)| format!("{a} -> {b}")),
            ),
            (
                "server KiB/conn",
                self.server_kib_per_conn.map(|v| format!("{v:.2}")),
            ),
            (
                "generator rss KiB",
                self.generator_rss_before_kib
                    .zip(self.generator_rss_after_kib)
                    .map(|(a, b)| format!("{a} -> {b}")),
            ),
            (
                "generator KiB/conn",
                self.generator_kib_per_conn.map(|v| format!("{v:.2}")),
            ),
        ] {
            if let Some(v) = v {
                row(k, v);
            }
        }
        row("errors", self.error_count.to_string());
        for e in &self.errors {
            row("  error", e.clone());
        }
        row("result", if self.ok { "OK" } else { "FAILED" }.to_string());
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<w$}  {v}");
        }
        out
    }

    /// Write the JSON report to `path`, or to stdout for `-`.
    pub fn write_json(&self, path: &str) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        if path == "-" {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{json}")?;
        } else {
            std::fs::write(path, json + "\n").with_context(|| format!("write {path}"))?;
        }
        Ok(())
    }
}

fn fmt_lat(l: &LatencySummary) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}  (n={})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_and_failure_reflect_figures() {
        let mut r = Report {
            lost: Some(0),
            duplicated: Some(0),
            reordered: Some(0),
            unexpected: Some(0),
            ..Default::default()
        };
        r.finish();
        assert!(r.ok);
        assert_eq!(r.failure(), None);
        r.lost = Some(3);
        r.finish();
        assert!(!r.ok);
        assert_eq!(r.failure().unwrap(), "3 lost");
        r.add_error("boom");
        r.add_error("boom");
        r.finish();
        assert_eq!(r.error_count, 2);
        assert_eq!(r.errors, vec!["boom".to_string()]);
        assert!(r.failure().unwrap().contains("2 error(s), first: boom"));
        assert!(r.table().contains("FAILED"));
    }
}
