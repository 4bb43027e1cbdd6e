//! Every metric the bridge exposes, registered in one place and rendered in
//! the Prometheus text format.
//!
//! Hand-written on atomics rather than taken from a client crate: the
//! contract names a gauge `notify_bridge_connections` next to a counter
//! `notify_bridge_connections_total`, which the OpenMetrics-style crates
//! refuse to register together (a counter's family name drops `_total`), and
//! the hot path wants a relaxed atomic add per frame, nothing more.

use std::{
    fmt::Write,
    sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds, in seconds, of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram with explicit buckets (cumulative on render).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// The process's metrics; one shared instance per running bridge.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub messages_delivered: Counter,
    pub messages_no_recipient: Counter,
    pub messages_invalid: Counter,
    pub frames_sent: Counter,
    pub delivery_seconds: Histogram,
    pub slow_client_closes: Counter,
    pub amqp_connected: Gauge,
    pub amqp_reconnects: Counter,
    pub inbox_stored: Counter,
    pub inbox_replayed: Counter,
    pub inbox_gaps: Counter,
    /// Sessions that saw a seq jump and fetched the missing entries.
    pub inbox_gap_repairs: Counter,
    /// Cluster mode: live notifications this instance received.
    pub cluster_live_received: Counter,
    pub inbox_commit_seconds: Histogram,
    /// Receipts confirmed by the broker, one counter per status (in the
    /// order of `receipts::Status::ALL`).
    receipts: [Counter; crate::receipts::Status::ALL.len()],
    /// Hostile-input limits hit, one counter per limit (see [`Limit`]).
    pub limit_refusals: [Counter; Limit::ALL.len()],
    /// One rate-limited WARN line per limit, so a client repeating a
    /// refused request cannot flood the log.
    limit_logs: [crate::log_limit::LogLimit; Limit::ALL.len()],
}

/// A limit on hostile input (CONTRACT.md, "Limits on hostile input"), as
/// the `limit` label of `notify_bridge_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A message naming more than `amqp.max_recipients` users.
    MaxRecipients,
    /// A channel name outside 1–255 bytes.
    ChannelName,
    /// A connection past `websocket.max_channels_per_connection`.
    MaxChannels,
    /// A connection past `websocket.send_queue_bytes` (closed 1013).
    SendQueueBytes,
    /// A side-port connection refused past `http.max_connections`.
    HttpConnections,
    /// A side-port request slower than `http.request_timeout`.
    HttpRequestTimeout,
}

impl Limit {
    pub const ALL: [Limit; 6] = [
        Limit::MaxRecipients,
        Limit::ChannelName,
        Limit::MaxChannels,
        Limit::SendQueueBytes,
        Limit::HttpConnections,
        Limit::HttpRequestTimeout,
    ];

    /// The label value, named after the configuration key where there is one.
    pub fn label(self) -> &'static str {
        match self {
            Limit::MaxRecipients => "amqp.max_recipients",
            Limit::ChannelName => "channel_name",
            Limit::MaxChannels => "websocket.max_channels_per_connection",
            Limit::SendQueueBytes => "websocket.send_queue_bytes",
            Limit::HttpConnections => "http.max_connections",
            Limit::HttpRequestTimeout => "http.request_timeout",
        }
    }
}

impl Metrics {
    /// Counts one refusal by `limit`.
    pub fn refused(&self, limit: Limit) {
        self.limit_refusals[limit as usize].inc();
    }

    /// Counts one refusal by `limit`; `Some(n)` when it should be logged
    /// now (`n`: refusals since the last line that were not logged), at
    /// most one line per limit every [`crate::log_limit::LOG_INTERVAL`].
    pub fn refused_to_log(&self, limit: Limit) -> Option<u64> {
        self.refused(limit);
        self.limit_logs[limit as usize].event()
    }

    pub fn refusals(&self, limit: Limit) -> u64 {
        self.limit_refusals[limit as usize].get()
    }
}

impl Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    /// Counts one receipt the broker confirmed.
    pub fn receipt_sent(&self, status: crate::receipts::Status) {
        self.receipts[status as usize].inc();
    }

    /// Receipts of `status` confirmed since start.
    pub fn receipts_sent(&self, status: crate::receipts::Status) -> u64 {
        self.receipts[status as usize].get()
    }

    /// The Prometheus text of every metric, in a fixed order.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_delivery(&mut out);
        self.render_broker_and_inbox(&mut out);
        family(
            &mut out,
            "notify_bridge_receipts_total",
            "Delivery receipts confirmed by the broker, by status.",
            "status",
            crate::receipts::Status::ALL
                .into_iter()
                .map(|status| (status.label(), self.receipts_sent(status))),
        );
        family(
            &mut out,
            "notify_bridge_limit_refusals_total",
            "Hostile-input limits hit, by limit.",
            "limit",
            Limit::ALL
                .into_iter()
                .map(|limit| (limit.label(), self.refusals(limit))),
        );
        out
    }

    /// Connections, messages and frames.
    fn render_delivery(&self, out: &mut String) {
        gauge(
            out,
            "notify_bridge_connections",
            "Open WebSocket connections.",
            self.connections.get(),
        );
        counter(
            out,
            "notify_bridge_connections_total",
            "WebSocket connections accepted since start.",
            self.connections_total.get(),
        );
        family(
            out,
            "notify_bridge_messages_total",
            "Messages taken from the broker, by outcome.",
            "outcome",
            [
                ("delivered", self.messages_delivered.get()),
                ("no_recipient", self.messages_no_recipient.get()),
                ("invalid", self.messages_invalid.get()),
            ],
        );
        counter(
            out,
            "notify_bridge_frames_sent_total",
            "Text frames written to WebSocket clients.",
            self.frames_sent.get(),
        );
        histogram(
            out,
            "notify_bridge_delivery_seconds",
            "Time from broker delivery to notification frame written.",
            &self.delivery_seconds,
        );
        counter(
            out,
            "notify_bridge_slow_client_closes_total",
            "Connections closed with 1013 because their send queue was full.",
            self.slow_client_closes.get(),
        );
    }

    /// The broker link, the inbox and the cluster.
    fn render_broker_and_inbox(&self, out: &mut String) {
        gauge(
            out,
            "notify_bridge_amqp_connected",
            "1 while consuming from the broker, else 0.",
            self.amqp_connected.get(),
        );
        counter(
            out,
            "notify_bridge_amqp_reconnects_total",
            "Successful broker connections after the first.",
            self.amqp_reconnects.get(),
        );
        counter(
            out,
            "notify_bridge_inbox_stored_total",
            "Inbox entries stored (one per user and message).",
            self.inbox_stored.get(),
        );
        counter(
            out,
            "notify_bridge_inbox_replayed_total",
            "Inbox entries replayed to reconnecting clients.",
            self.inbox_replayed.get(),
        );
        counter(
            out,
            "notify_bridge_inbox_gaps_total",
            "Gap frames sent: entries after a client's `since` were dropped by retention.",
            self.inbox_gaps.get(),
        );
        counter(
            out,
            "notify_bridge_inbox_gap_repairs_total",
            "Seq jumps in a session's live frames repaired from the inbox before passing the frame on.",
            self.inbox_gap_repairs.get(),
        );
        counter(
            out,
            "notify_bridge_cluster_live_received_total",
            "Cluster mode: live notifications this instance received from the cluster's writer.",
            self.cluster_live_received.get(),
        );
        histogram(
            out,
            "notify_bridge_inbox_commit_seconds",
            "Time to commit one batch of inbox entries.",
            &self.inbox_commit_seconds,
        );
    }
}

/// A counter with one label, one sample per label value.
fn family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
        cumulative += bucket.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let count = h.count.load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = h.sum_nanos.load(Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_from_the_start() {
        let text = Metrics::default().render();
        for line in [
            "notify_bridge_connections 0",
            "notify_bridge_connections_total 0",
            "notify_bridge_messages_total{outcome=\"delivered\"} 0",
            "notify_bridge_messages_total{outcome=\"no_recipient\"} 0",
            "notify_bridge_messages_total{outcome=\"invalid\"} 0",
            "notify_bridge_frames_sent_total 0",
            "notify_bridge_delivery_seconds_count 0",
            "notify_bridge_slow_client_closes_total 0",
            "notify_bridge_amqp_connected 0",
            "notify_bridge_amqp_reconnects_total 0",
            "notify_bridge_inbox_stored_total 0",
            "notify_bridge_inbox_replayed_total 0",
            "notify_bridge_inbox_gaps_total 0",
            "notify_bridge_inbox_gap_repairs_total 0",
            "notify_bridge_cluster_live_received_total 0",
            "notify_bridge_inbox_commit_seconds_count 0",
            "notify_bridge_receipts_total{status=\"delivered\"} 0",
            "notify_bridge_receipts_total{status=\"offline\"} 0",
            "notify_bridge_receipts_total{status=\"invalid\"} 0",
            "notify_bridge_receipts_total{status=\"read\"} 0",
            "# TYPE notify_bridge_delivery_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.delivery_seconds.observe(Duration::from_micros(300));
        m.delivery_seconds.observe(Duration::from_millis(3));
        m.delivery_seconds.observe(Duration::from_secs(60));
        let text = m.render();
        assert!(text.contains("notify_bridge_delivery_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("notify_bridge_delivery_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("notify_bridge_delivery_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("notify_bridge_delivery_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("notify_bridge_delivery_seconds_count 3\n"));
    }

    #[test]
    fn every_refusal_is_counted_but_logged_at_most_once_an_interval() {
        let metrics = Metrics::default();
        assert_eq!(metrics.refused_to_log(Limit::MaxChannels), Some(0));
        for _ in 0..4871 {
            assert_eq!(metrics.refused_to_log(Limit::MaxChannels), None);
        }
        // Another limit has a line of its own.
        assert_eq!(metrics.refused_to_log(Limit::ChannelName), Some(0));
        assert_eq!(metrics.refusals(Limit::MaxChannels), 4872);
        assert!(metrics
            .render()
            .contains("notify_bridge_limit_refusals_total{limit=\"websocket.max_channels_per_connection\"} 4872"));
    }
}
