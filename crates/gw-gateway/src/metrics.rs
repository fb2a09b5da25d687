//! Counters operators watch. Plain atomics bumped on the hot path with
//! `Relaxed` ordering; rendered in Prometheus text format by [`Metrics::render`].

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The gateway's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections accepted (after the protocol handshake).
    pub connections_opened: AtomicU64,
    /// Client connections closed, for any reason.
    pub connections_closed: AtomicU64,
    /// Connections refused because the gateway was at `max_connections`.
    pub connections_refused: AtomicU64,
    /// Clients closed for not answering pings.
    pub heartbeat_timeouts: AtomicU64,
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Messages queued to clients.
    pub messages_out: AtomicU64,
    /// Clients disconnected because their outgoing queue overflowed.
    pub slow_consumers: AtomicU64,
    /// Events written to worker links.
    pub events_out: AtomicU64,
    /// Events re-sent after the worker they went to died.
    pub events_redelivered: AtomicU64,
    /// Commands executed for workers.
    pub commands_in: AtomicU64,
    /// Commands refused as invalid.
    pub commands_refused: AtomicU64,
    /// Queries answered.
    pub queries_in: AtomicU64,
    /// Worker links currently up.
    pub worker_links: AtomicU64,
    /// Internal link attempts refused (bad secret, bad frame).
    pub links_refused: AtomicU64,
    /// Events written to workers and not yet acknowledged (all links).
    pub events_inflight: AtomicU64,
    /// Joins and binds whose next link frame (or WebSocket upgrade) waited
    /// for other links' peers to acknowledge the interest change.
    pub interest_waits: AtomicU64,
    /// Peers marked lagging: they did not acknowledge an interest change
    /// within `interest_ack_timeout_ms` (each is counted once per miss).
    pub interest_ack_timeouts: AtomicU64,
    /// Payload bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Payload bytes queued to clients.
    pub bytes_out: AtomicU64,
    /// Closed connections by reason, indexed like [`CLOSE_REASONS`].
    pub closed_by_reason: [AtomicU64; CLOSE_REASONS.len()],
}

/// Labels of `gateworker_gateway_connections_closed_by_reason_total`.
pub const CLOSE_REASONS: [&str; 7] = [
    "client",
    "heartbeat",
    "slow_consumer",
    "application",
    "shutdown",
    "too_big",
    "error",
];

impl Metrics {
    /// Counts a close under the label matching the gateway's close reason.
    pub fn count_close(&self, reason: &str) {
        let label = match reason {
            "client disconnected" | "client closed" => "client",
            "heartbeat timeout" => "heartbeat",
            "slow consumer" => "slow_consumer",
            "closed by application" => "application",
            "gateway shutting down" => "shutdown",
            "message too big" => "too_big",
            _ => "error",
        };
        let i = CLOSE_REASONS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(CLOSE_REASONS.len() - 1);
        self.closed_by_reason[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Gauges read from the gateway's tables when metrics are scraped.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    pub(crate) clients: usize,
    pub(crate) queue_messages: usize,
    pub(crate) queue_bytes: usize,
    pub(crate) queue_max_messages: usize,
    pub(crate) link_queue_events: usize,
}

impl Metrics {
    /// Prometheus text exposition of every counter, plus the gauges read
    /// from the tables at scrape time.
    pub(crate) fn render(&self, now: &Gauges) -> String {
        let mut out = String::new();
        let c = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let current_clients = now.clients;
        let rows: [(&str, &str, &str, u64); 20] = [
            (
                "gateworker_gateway_connections",
                "gauge",
                "Client connections open now.",
                current_clients as u64,
            ),
            (
                "gateworker_gateway_connections_opened_total",
                "counter",
                "Client connections accepted.",
                c(&self.connections_opened),
            ),
            (
                "gateworker_gateway_connections_closed_total",
                "counter",
                "Client connections closed.",
                c(&self.connections_closed),
            ),
            (
                "gateworker_gateway_connections_refused_total",
                "counter",
                "Connections refused at max_connections.",
                c(&self.connections_refused),
            ),
            (
                "gateworker_gateway_heartbeat_timeouts_total",
                "counter",
                "Clients closed for silence.",
                c(&self.heartbeat_timeouts),
            ),
            (
                "gateworker_gateway_client_messages_in_total",
                "counter",
                "Messages received from clients.",
                c(&self.messages_in),
            ),
            (
                "gateworker_gateway_client_messages_out_total",
                "counter",
                "Messages taken from client queues and written.",
                c(&self.messages_out),
            ),
            (
                "gateworker_gateway_slow_consumer_disconnects_total",
                "counter",
                "Clients closed because their queue overflowed.",
                c(&self.slow_consumers),
            ),
            (
                "gateworker_gateway_link_events_out_total",
                "counter",
                "Events sent to workers.",
                c(&self.events_out),
            ),
            (
                "gateworker_gateway_link_events_redelivered_total",
                "counter",
                "Events redelivered after a worker died.",
                c(&self.events_redelivered),
            ),
            (
                "gateworker_gateway_link_commands_in_total",
                "counter",
                "Commands executed.",
                c(&self.commands_in),
            ),
            (
                "gateworker_gateway_link_commands_refused_total",
                "counter",
                "Invalid commands refused.",
                c(&self.commands_refused),
            ),
            (
                "gateworker_gateway_link_queries_in_total",
                "counter",
                "Queries answered.",
                c(&self.queries_in),
            ),
            (
                "gateworker_gateway_interest_waits_total",
                "counter",
                "Joins and binds whose reply waited for other workers to acknowledge the interest change.",
                c(&self.interest_waits),
            ),
            (
                "gateworker_gateway_interest_ack_timeouts_total",
                "counter",
                "Peers that did not acknowledge an interest change in time (marked lagging).",
                c(&self.interest_ack_timeouts),
            ),
            (
                "gateworker_gateway_worker_links",
                "gauge",
                "Worker links up.",
                c(&self.worker_links),
            ),
            (
                "gateworker_gateway_client_queue_messages",
                "gauge",
                "Messages waiting in client queues, all clients.",
                now.queue_messages as u64,
            ),
            (
                "gateworker_gateway_client_queue_bytes",
                "gauge",
                "Bytes waiting in client queues, all clients.",
                now.queue_bytes as u64,
            ),
            (
                "gateworker_gateway_client_queue_max_messages",
                "gauge",
                "Messages waiting in the deepest client queue.",
                now.queue_max_messages as u64,
            ),
            (
                "gateworker_gateway_link_queue_events",
                "gauge",
                "Client events waiting for room on worker links.",
                now.link_queue_events as u64,
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        for (name, help, v) in [
            (
                "gateworker_gateway_client_bytes_in_total",
                "Payload bytes received from clients.",
                &self.bytes_in,
            ),
            (
                "gateworker_gateway_client_bytes_out_total",
                "Bytes taken from client queues and written (framing included).",
                &self.bytes_out,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c(v)
            );
        }
        let name = "gateworker_gateway_connections_closed_by_reason_total";
        let _ = writeln!(
            out,
            "# HELP {name} Client connections closed, by reason.\n# TYPE {name} counter"
        );
        for (label, v) in CLOSE_REASONS.iter().zip(&self.closed_by_reason) {
            let _ = writeln!(out, "{name}{{reason=\"{label}\"}} {}", c(v));
        }
        out
    }
}
