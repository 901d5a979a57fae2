//! Prometheus metrics, labelled by service and table.
//!
//! Gauges (`outbox_pending_events`, `outbox_dead_events`, `outbox_oldest_pending_age_seconds`)
//! are set from [`OutboxStats`] read from the table itself, never from what a relay happened
//! to see in a batch. Register the families once per [`Registry`] with
//! [`OutboxMetrics::register`], then take one [`TableMetrics`] handle per outbox table.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::OutboxStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    service: String,
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    service: String,
    table: String,
    reason: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

struct Families {
    pending: Family<TableLabels, Gauge>,
    retrying: Family<TableLabels, Gauge>,
    dead: Family<TableLabels, Gauge>,
    oldest_age: Family<TableLabels, Gauge<f64, AtomicU64>>,
    live_relays: Family<TableLabels, Gauge>,
    dead_tuples: Family<TableLabels, Gauge>,
    table_bytes: Family<TableLabels, Gauge>,
    paused: Family<TableLabels, Gauge>,
    enqueued: Family<TableLabels, Counter>,
    published: Family<TableLabels, Counter>,
    dead_lettered: Family<TableLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    commit_to_ack: Family<TableLabels, Histogram, fn() -> Histogram>,
    stream_active: Family<TableLabels, Gauge>,
    stream_lag_bytes: Family<TableLabels, Gauge>,
    stream_lag_seconds: Family<TableLabels, Gauge<f64, AtomicU64>>,
    stream_retained: Family<TableLabels, Gauge>,
    stream_retained_limit: Family<TableLabels, Gauge>,
}

/// The outbox metric families of one registry.
#[derive(Clone)]
pub struct OutboxMetrics {
    families: Arc<Families>,
}

impl OutboxMetrics {
    /// Registers the outbox families in `registry`. Call once per registry.
    pub fn register(registry: &mut Registry) -> Self {
        let families = Families {
            pending: Family::default(),
            retrying: Family::default(),
            dead: Family::default(),
            oldest_age: Family::default(),
            live_relays: Family::default(),
            dead_tuples: Family::default(),
            table_bytes: Family::default(),
            paused: Family::default(),
            enqueued: Family::default(),
            published: Family::default(),
            dead_lettered: Family::default(),
            failures: Family::default(),
            commit_to_ack: Family::new_with_constructor(latency_histogram),
            stream_active: Family::default(),
            stream_lag_bytes: Family::default(),
            stream_lag_seconds: Family::default(),
            stream_retained: Family::default(),
            stream_retained_limit: Family::default(),
        };
        let f = &families;
        registry.register(
            "outbox_pending_events",
            "Committed events not yet published, counted in the table",
            f.pending.clone(),
        );
        registry.register(
            "outbox_retrying_events",
            "Pending events waiting for a retry (after a rejected attempt, or deferred while their partition was unavailable)",
            f.retrying.clone(),
        );
        registry.register(
            "outbox_dead_events",
            "Events that used up their attempts and wait for an operator",
            f.dead.clone(),
        );
        registry.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event (0 when none is pending)",
            f.oldest_age.clone(),
        );
        registry.register(
            "outbox_live_relays",
            "Relays with a current heartbeat on this table",
            f.live_relays.clone(),
        );
        registry.register(
            "outbox_table_dead_tuples",
            "Dead row versions in the outbox table awaiting vacuum (PostgreSQL; bloat signal)",
            f.dead_tuples.clone(),
        );
        registry.register(
            "outbox_table_bytes",
            "Size of the outbox table with its indexes",
            f.table_bytes.clone(),
        );
        registry.register(
            "outbox_relay_paused",
            "1 while this process's relay is paused by a broker outage",
            f.paused.clone(),
        );
        registry.register(
            "outbox_events_enqueued",
            "Events inserted by enqueue (including ones whose transaction later rolled back)",
            f.enqueued.clone(),
        );
        registry.register(
            "outbox_events_published",
            "Events acknowledged by the broker and completed",
            f.published.clone(),
        );
        registry.register(
            "outbox_events_dead_lettered",
            "Events moved to the dead state after their last attempt",
            f.dead_lettered.clone(),
        );
        registry.register(
            "outbox_publish_failures",
            "Failed publish attempts by reason (rejected: counts as an attempt; unavailable: outage, no attempt burnt)",
            f.failures.clone(),
        );
        registry.register(
            "outbox_commit_to_ack_seconds",
            "Time from the event's insert to the broker's acknowledgement",
            f.commit_to_ack.clone(),
        );
        registry.register(
            "outbox_stream_active",
            "1 while this process's stream relay holds the replication slot (0: standby or not streaming)",
            f.stream_active.clone(),
        );
        registry.register(
            "outbox_stream_lag_bytes",
            "WAL written since the slot's confirmed position (stream write mode)",
            f.stream_lag_bytes.clone(),
        );
        registry.register(
            "outbox_stream_lag_seconds",
            "Age of the last published transaction while more wait in the stream (0 when caught up)",
            f.stream_lag_seconds.clone(),
        );
        registry.register(
            "outbox_stream_retained_wal_bytes",
            "WAL the server keeps for the stream relay's slot",
            f.stream_retained.clone(),
        );
        registry.register(
            "outbox_stream_retained_wal_limit_bytes",
            "The configured limit of retained WAL (alert when the retained bytes pass it)",
            f.stream_retained_limit.clone(),
        );
        Self {
            families: Arc::new(families),
        }
    }

    /// The metrics of one outbox table of one service.
    pub fn table(&self, service: &str, table: &str) -> TableMetrics {
        TableMetrics {
            families: self.families.clone(),
            labels: TableLabels {
                service: service.to_owned(),
                table: table.to_owned(),
            },
        }
    }
}

/// Why a publish attempt failed, as the `reason` label.
#[derive(Clone, Copy, Debug)]
pub enum FailureReason {
    Rejected,
    Unavailable,
}

impl FailureReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Metrics of one outbox table.
#[derive(Clone)]
pub struct TableMetrics {
    families: Arc<Families>,
    labels: TableLabels,
}

impl TableMetrics {
    pub fn enqueued(&self, n: u64) {
        self.families.enqueued.get_or_create(&self.labels).inc_by(n);
    }

    pub fn published(&self, n: u64) {
        self.families
            .published
            .get_or_create(&self.labels)
            .inc_by(n);
    }

    /// Events this process has published so far on this table.
    pub fn published_so_far(&self) -> u64 {
        self.families.published.get_or_create(&self.labels).get()
    }

    pub fn dead_lettered(&self, n: u64) {
        self.families
            .dead_lettered
            .get_or_create(&self.labels)
            .inc_by(n);
    }

    pub fn failures(&self, reason: FailureReason, n: u64) {
        let labels = FailureLabels {
            service: self.labels.service.clone(),
            table: self.labels.table.clone(),
            reason: reason.as_str().to_owned(),
        };
        self.families.failures.get_or_create(&labels).inc_by(n);
    }

    pub fn commit_to_ack(&self, seconds: f64) {
        self.families
            .commit_to_ack
            .get_or_create(&self.labels)
            .observe(seconds);
    }

    pub fn set_paused(&self, paused: bool) {
        self.families
            .paused
            .get_or_create(&self.labels)
            .set(i64::from(paused));
    }

    /// Whether this process's stream relay holds its slot.
    pub fn set_stream_active(&self, active: bool) {
        self.families
            .stream_active
            .get_or_create(&self.labels)
            .set(i64::from(active));
    }

    /// The slot's lag and retained WAL as read from the server, and the configured limit.
    pub fn set_stream_lag(&self, lag_bytes: u64, retained_bytes: u64, limit: Option<u64>) {
        let f = &self.families;
        f.stream_lag_bytes
            .get_or_create(&self.labels)
            .set(lag_bytes as i64);
        f.stream_retained
            .get_or_create(&self.labels)
            .set(retained_bytes as i64);
        if let Some(limit) = limit {
            f.stream_retained_limit
                .get_or_create(&self.labels)
                .set(limit as i64);
        }
    }

    pub fn set_stream_lag_seconds(&self, seconds: f64) {
        self.families
            .stream_lag_seconds
            .get_or_create(&self.labels)
            .set(seconds);
    }

    /// Sets the table gauges from counts read from the table.
    pub fn observe(&self, stats: &OutboxStats) {
        let f = &self.families;
        let l = &self.labels;
        f.pending.get_or_create(l).set(saturate(stats.pending));
        f.retrying.get_or_create(l).set(saturate(stats.retrying));
        f.dead.get_or_create(l).set(saturate(stats.dead));
        f.live_relays
            .get_or_create(l)
            .set(saturate(stats.live_relays));
        f.oldest_age.get_or_create(l).set(
            stats
                .oldest_pending_age
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        if let Some(n) = stats.dead_tuples {
            f.dead_tuples.get_or_create(l).set(saturate(n));
        }
        if let Some(n) = stats.table_bytes {
            f.table_bytes.get_or_create(l).set(saturate(n));
        }
    }
}

fn saturate(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabels {
    consumer: String,
}

struct InboxFamilies {
    processed: Family<ConsumerLabels, Counter>,
    duplicates: Family<ConsumerLabels, Counter>,
    failures: Family<ConsumerLabels, Counter>,
    parked: Family<ConsumerLabels, Counter>,
    unavailable: Family<ConsumerLabels, Counter>,
    queues_recreated: Family<ConsumerLabels, Counter>,
}

/// The inbox metric families of one registry.
#[derive(Clone)]
pub struct InboxMetrics {
    families: Arc<InboxFamilies>,
}

impl InboxMetrics {
    /// Registers the inbox families in `registry`. Call once per registry.
    pub fn register(registry: &mut Registry) -> Self {
        let f = InboxFamilies {
            processed: Family::default(),
            duplicates: Family::default(),
            failures: Family::default(),
            parked: Family::default(),
            unavailable: Family::default(),
            queues_recreated: Family::default(),
        };
        registry.register(
            "inbox_processed",
            "Messages whose effects committed",
            f.processed.clone(),
        );
        registry.register(
            "inbox_duplicates",
            "Messages skipped because their event was already processed",
            f.duplicates.clone(),
        );
        registry.register(
            "inbox_handler_failures",
            "Handler runs that failed and rolled back",
            f.failures.clone(),
        );
        registry.register(
            "inbox_parked",
            "Messages parked on a dead-letter topic (poison or out of attempts)",
            f.parked.clone(),
        );
        registry.register(
            "inbox_unavailable",
            "Deliveries retried because the consumer's database or another dependency was unavailable (no attempt counted)",
            f.unavailable.clone(),
        );
        registry.register(
            "inbox_queues_recreated",
            "A consumer group's broker queue found missing when the consumer connected again (deleted, expired or lost by the broker): messages it held or that arrived meanwhile did not reach the group",
            f.queues_recreated.clone(),
        );
        Self {
            families: Arc::new(f),
        }
    }

    pub fn consumer(&self, name: &str) -> ConsumerMetrics {
        ConsumerMetrics {
            families: self.families.clone(),
            labels: ConsumerLabels {
                consumer: name.to_owned(),
            },
        }
    }
}

/// Metrics of one consumer.
#[derive(Clone)]
pub struct ConsumerMetrics {
    families: Arc<InboxFamilies>,
    labels: ConsumerLabels,
}

impl ConsumerMetrics {
    pub fn processed(&self) {
        self.families.processed.get_or_create(&self.labels).inc();
    }
    pub fn duplicate(&self) {
        self.families.duplicates.get_or_create(&self.labels).inc();
    }
    pub fn handler_failure(&self) {
        self.families.failures.get_or_create(&self.labels).inc();
    }
    pub fn parked(&self) {
        self.families.parked.get_or_create(&self.labels).inc();
    }
    pub fn unavailable(&self) {
        self.families.unavailable.get_or_create(&self.labels).inc();
    }
    pub fn queue_recreated(&self) {
        self.families
            .queues_recreated
            .get_or_create(&self.labels)
            .inc();
    }
}

/// Renders a registry in the Prometheus text format.
pub fn encode_text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_gauges_and_counters_with_labels() {
        let mut registry = Registry::default();
        let metrics = OutboxMetrics::register(&mut registry);
        let t = metrics.table("file_service", "event_outbox");
        t.observe(&OutboxStats {
            pending: 7,
            dead: 2,
            oldest_pending_age: Some(Duration::from_millis(1500)),
            ..Default::default()
        });
        t.published(3);
        t.failures(FailureReason::Unavailable, 1);
        t.commit_to_ack(0.004);
        let text = encode_text(&registry);
        let labels = r#"service="file_service",table="event_outbox""#;
        assert!(
            text.contains(&format!("outbox_pending_events{{{labels}}} 7")),
            "{text}"
        );
        assert!(
            text.contains(&format!("outbox_dead_events{{{labels}}} 2")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "outbox_oldest_pending_age_seconds{{{labels}}} 1.5"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("outbox_events_published_total{{{labels}}} 3")),
            "{text}"
        );
        assert!(text.contains(r#"outbox_publish_failures_total{service="file_service",table="event_outbox",reason="unavailable"} 1"#), "{text}");
        assert!(
            text.contains(&format!("outbox_commit_to_ack_seconds_count{{{labels}}} 1")),
            "{text}"
        );
    }
}
