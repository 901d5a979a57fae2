//! Commit-to-ack latency under a steady load, per wake-up mode: the in-process nudge, polling
//! alone, and LISTEN/NOTIFY. Commit time is taken right after commit returns; ack time when
//! the publisher's delivery reports are in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{
    AggregateRef, EventId, NewEvent, OutboxMessage, PublishOutcome, Publisher, Relay, Topic,
    WakeSignal,
};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_postgres::{PgOutbox, PgRelayStore};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::db::BenchDb;
use crate::relay::NullPublisher;
use crate::stats::{header, row, summarize};

/// Records when each event was acknowledged.
struct Recording {
    inner: Arc<dyn Publisher>,
    acks: Mutex<HashMap<EventId, Instant>>,
}

#[async_trait]
impl Publisher for Recording {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let outcomes = self.inner.publish(batch).await;
        let now = Instant::now();
        let mut acks = self.acks.lock().unwrap();
        for (m, o) in batch.iter().zip(&outcomes) {
            if *o == PublishOutcome::Delivered {
                acks.entry(m.event_id).or_insert(now);
            }
        }
        outcomes
    }
}

/// How the relay learns of commits: the first as a relay inside the writers' process, the
/// others as a relay in a process of its own (`outbox relay`, a sidecar) would.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    Nudge,
    Poll,
    Watch,
    Notify,
}

impl Wake {
    fn name(self) -> &'static str {
        match self {
            Self::Nudge => "in-process: commit nudge",
            Self::Poll => "sidecar: poll only (50 ms..1 s)",
            Self::Watch => "sidecar: sequence watch (10 ms), default",
            Self::Notify => "sidecar: LISTEN/NOTIFY (writers opt in)",
        }
    }
}

pub(crate) async fn measure(
    rate: u32,
    duration: Duration,
    wake_mode: Wake,
    inner: Arc<dyn Publisher>,
) -> anyhow::Result<(crate::stats::Summary, f64)> {
    let db = BenchDb::postgres(24).await?;
    let BenchDb::Postgres { pool, schema } = &db else {
        unreachable!()
    };
    let wake = WakeSignal::new();
    let recording = Arc::new(Recording {
        inner,
        acks: Mutex::new(HashMap::new()),
    });
    let mut relay = Relay::new(
        PgRelayStore::new(pool.clone(), schema),
        recording.clone(),
        crate::relay_config()?,
    );
    let mut outbox = PgOutbox::new(schema.clone());
    let mut listener = None;
    match wake_mode {
        Wake::Nudge => {
            relay = relay.with_wake_signal(wake.clone());
            outbox = outbox.with_wake_signal(wake.clone());
        }
        Wake::Poll => {}
        Wake::Watch => {
            relay = relay.with_wake_signal(wake.clone());
            listener = Some(tokio::spawn(outbox_postgres::watch_for_commits(
                pool.clone(),
                schema.clone(),
                wake.clone(),
                Duration::from_millis(10),
            )));
        }
        Wake::Notify => {
            relay = relay.with_wake_signal(wake.clone());
            outbox = outbox.with_notify(true);
            listener = Some(tokio::spawn(outbox_postgres::listen_for_commits(
                pool.clone(),
                schema.clone(),
                wake.clone(),
            )));
        }
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let commits: Arc<Mutex<HashMap<EventId, Instant>>> = Arc::default();
    let limit = Arc::new(Semaphore::new(32));
    let topic = Topic::new(format!("bench.latency.{}", uuid::Uuid::new_v4().simple()))?;
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0);
    let start = Instant::now();
    let mut owed = 0.0;
    let mut tasks = Vec::new();
    let mut n = 0u64;
    let mut interval = tokio::time::interval(tick);
    while start.elapsed() < duration {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            n += 1;
            let permit = limit.clone().acquire_owned().await?;
            let (pool, outbox, commits, topic) =
                (pool.clone(), outbox.clone(), commits.clone(), topic.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let e = NewEvent::new(
                    topic,
                    AggregateRef::new("agg", format!("a{}", n % 100)).unwrap(),
                    vec![b'x'; 200],
                );
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, &e).await?;
                outbox.commit(tx).await?;
                commits.lock().unwrap().insert(e.event_id(), Instant::now());
                anyhow::Ok(())
            }));
        }
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    let store = PgRelayStore::new(pool.clone(), schema);
    let deadline = Instant::now() + Duration::from_secs(60);
    while outbox_core::RelayStore::stats(&store).await?.pending > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    relay.await?;
    if let Some(l) = listener {
        l.abort();
    }
    let commits = commits.lock().unwrap().clone();
    let acks = recording.acks.lock().unwrap().clone();
    let lat: Vec<Duration> = commits
        .iter()
        .filter_map(|(id, c)| acks.get(id).map(|a| a.saturating_duration_since(*c)))
        .collect();
    db.drop().await;
    Ok((summarize(lat, duration), achieved))
}

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let (rates, duration): (&[u32], _) = if quick {
        (&[100, 500], Duration::from_millis(1500))
    } else {
        (&[100, 1000, 5000], Duration::from_secs(10))
    };
    let cluster = crate::BenchKafka::connect();
    let kafka = cluster.as_ref().map(|c| c.bootstrap.clone());
    let target = if kafka.is_some() {
        "Kafka delivery report"
    } else {
        "null publisher (no KAFKA_BOOTSTRAP_SERVERS or OUTBOX_TEST_BROKER_BIN)"
    };
    header(
        &format!("latency: commit to ack ({target})"),
        &[
            "events/s asked",
            "achieved",
            "wake-up",
            "p50 ms",
            "p99 ms",
            "max ms",
        ],
    );
    let mut out = Vec::new();
    for &rate in rates {
        for mode in [Wake::Nudge, Wake::Poll, Wake::Watch, Wake::Notify] {
            let inner: Arc<dyn Publisher> = match &kafka {
                Some(b) => Arc::new(KafkaPublisher::new(KafkaConfig::new(b))?),
                None => Arc::new(NullPublisher),
            };
            let (s, achieved) = measure(rate, duration, mode, inner).await?;
            row(&[
                rate.to_string(),
                format!("{achieved:.0}"),
                mode.name().into(),
                format!("{:.1}", s.p50_us / 1e3),
                format!("{:.1}", s.p99_us / 1e3),
                format!("{:.1}", s.max_us / 1e3),
            ]);
            out.push(json!({"rate": rate, "achieved": achieved, "wake": mode.name(), "to": target,
                            "p50_ms": s.p50_us / 1e3, "p99_ms": s.p99_us / 1e3, "max_ms": s.max_us / 1e3, "events": s.count}));
        }
    }
    Ok(Value::Array(out))
}
