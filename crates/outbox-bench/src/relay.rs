//! Relay throughput against the physical limits measured in the same run: the database's raw
//! claim-and-delete rate for the same rows (PostgreSQL, MySQL/MariaDB), and Kafka's raw
//! produce rate for the same messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{OutboxMessage, PublishOutcome, Publisher, Relay, RelayConfig, RelayStore};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_mysql::MySqlRelayStore;
use outbox_postgres::{PgOutbox, PgRelayStore};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::counting::CountingStore;
use crate::db::BenchDb;
use crate::stats::{header, median, row};

/// Acknowledges everything at once: the relay's own cost, without a broker.
pub struct NullPublisher;

#[async_trait]
impl Publisher for NullPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        vec![PublishOutcome::Delivered; batch.len()]
    }
}

/// Fills the outbox with `events` over `aggregates` aggregates (same partition per aggregate).
pub(crate) async fn prefill(
    db: &BenchDb,
    events: usize,
    aggregates: usize,
    payload: usize,
    topic: &str,
) -> anyhow::Result<()> {
    let BenchDb::Postgres { pool, .. } = db else {
        unreachable!("relay bench runs on PostgreSQL")
    };
    sqlx::query(&format!(
        "INSERT INTO {} (event_id, aggregate_type, aggregate_id, partition_no, event_type, topic,
                         message_key, payload)
         SELECT gen_random_uuid(), 'agg', 'agg-' || (i % $2), (i % $2) % 64, 'bench', $4,
                'agg-' || (i % $2), convert_to(repeat('x', $3), 'UTF8')
         FROM generate_series(1, $1) AS i",
        db.table("event_outbox")
    ))
    .bind(events as i64)
    .bind(aggregates as i64)
    .bind(payload as i32)
    .bind(topic)
    .execute(pool)
    .await?;
    sqlx::raw_sql(&format!("VACUUM ANALYZE {}", db.table("event_outbox")))
        .execute(pool)
        .await?;
    Ok(())
}

/// Fills a MySQL outbox the same way (MariaDB's sequence tables number the rows).
async fn prefill_mysql(
    db: &BenchDb,
    events: usize,
    aggregates: usize,
    payload: usize,
    topic: &str,
) -> anyhow::Result<()> {
    let BenchDb::MySql { pool, .. } = db else {
        unreachable!("a MySQL case")
    };
    sqlx::query(&format!(
        "INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id, partition_no,
                                   event_type, topic, message_key, headers, payload, created_at)
         SELECT UUID(), 'agg', CONCAT('agg-', seq % ?), (seq % ?) % 64, 'bench', ?,
                CONCAT('agg-', seq % ?), '{{}}', REPEAT('x', ?),
                CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)
         FROM seq_1_to_{events}"
    ))
    .bind(aggregates as i64)
    .bind(aggregates as i64)
    .bind(topic)
    .bind(aggregates as i64)
    .bind(payload as i64)
    .execute(pool)
    .await?;
    sqlx::raw_sql("ANALYZE TABLE event_outbox")
        .execute(pool)
        .await?;
    Ok(())
}

/// MySQL's at-least-once minimum in plain SQL: read a batch, then delete it by `seq`.
async fn raw_claim_then_delete_mysql(db: &BenchDb, batch: i64) -> anyhow::Result<f64> {
    let BenchDb::MySql { pool, .. } = db else {
        unreachable!()
    };
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        let seqs: Vec<i64> = sqlx::query_scalar(
            "SELECT seq FROM (SELECT seq, event_id, topic, message_key, headers, payload
                              FROM event_outbox WHERE status = 'pending'
                              ORDER BY seq LIMIT ?) c",
        )
        .bind(batch)
        .fetch_all(pool)
        .await?;
        if seqs.is_empty() {
            break;
        }
        total += seqs.len();
        // Numbers read from the table, not input.
        let list = seqs
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::raw_sql(&format!("DELETE FROM event_outbox WHERE seq IN ({list})"))
            .execute(pool)
            .await?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// PostgreSQL's own rate: claim and delete the same rows with plain SQL, returning what a
/// relay needs to publish.
async fn raw_drain(db: &BenchDb, batch: i64) -> anyhow::Result<f64> {
    let BenchDb::Postgres { pool, .. } = db else {
        unreachable!()
    };
    let t = db.table("event_outbox");
    let sql = format!(
        "DELETE FROM {t} WHERE seq IN (
             SELECT seq FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT $1)
         RETURNING event_id, topic, message_key, headers, payload"
    );
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        let rows = sqlx::query(&sql).bind(batch).fetch_all(pool).await?;
        if rows.is_empty() {
            break;
        }
        total += rows.len();
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

pub(crate) async fn pending(store: &impl RelayStore) -> u64 {
    store.stats().await.map(|s| s.pending).unwrap_or(u64::MAX)
}

/// The at-least-once minimum in plain SQL: read a batch, then delete it by `seq` (a relay must
/// not delete before the broker acknowledged, so it needs two statements per batch).
async fn raw_claim_then_delete(db: &BenchDb, batch: i64) -> anyhow::Result<f64> {
    let BenchDb::Postgres { pool, .. } = db else {
        unreachable!()
    };
    let t = db.table("event_outbox");
    let claim = format!(
        "SELECT seq, event_id, topic, message_key, headers, payload FROM {t}
         WHERE status = 'pending' ORDER BY seq LIMIT $1"
    );
    let delete = format!("DELETE FROM {t} WHERE seq = ANY($1)");
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        let seqs: Vec<i64> = sqlx::query_scalar::<_, i64>(&claim)
            .bind(batch)
            .fetch_all(pool)
            .await?;
        if seqs.is_empty() {
            break;
        }
        total += seqs.len();
        sqlx::query(&delete).bind(&seqs).execute(pool).await?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Drains with `relays` relays; returns events/s.
async fn relay_drain(
    db: &BenchDb,
    publisher: Arc<dyn Publisher>,
    relays: usize,
    writers: usize,
    pipeline: bool,
) -> anyhow::Result<(f64, f64, String)> {
    match db {
        BenchDb::Postgres { pool, schema } => {
            let store = PgRelayStore::new(pool.clone(), schema);
            let writer = PgWriter {
                pool: pool.clone(),
                schema: schema.clone(),
            };
            drain_with(store, Some(writer), publisher, relays, writers, pipeline).await
        }
        BenchDb::MySql { pool, .. } => {
            let store = MySqlRelayStore::new(pool.clone(), outbox_mysql::MySqlDialect);
            drain_with(store, None, publisher, relays, 0, pipeline).await
        }
        BenchDb::Sqlite { .. } => unreachable!("the relay bench runs on servers"),
    }
}

/// Writers inserting while the relay drains (PostgreSQL).
#[derive(Clone)]
struct PgWriter {
    pool: sqlx::PgPool,
    schema: outbox_postgres::Schema,
}

async fn drain_with<S: RelayStore>(
    inner: S,
    writer: Option<PgWriter>,
    publisher: Arc<dyn Publisher>,
    relays: usize,
    writers: usize,
    pipeline: bool,
) -> anyhow::Result<(f64, f64, String)> {
    let before = pending(&inner).await;
    let store = Arc::new(CountingStore::new(inner));
    let config = RelayConfig {
        service: "bench".into(),
        lease: Duration::from_secs(10),
        pipeline,
        ..crate::relay_config()?
    };
    mark("relay drain", "start");
    let start = Instant::now();
    let mut stops = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..relays {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = Relay::new(store.clone(), publisher.clone(), config.clone());
        handles.push(tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        })));
        stops.push(stop);
    }
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (writers_stop_tx, writers_stop) = tokio::sync::watch::channel(false);
    let mut writer_tasks = Vec::new();
    for w in 0..writers {
        let PgWriter { pool, schema } = writer.clone().expect("writers need PostgreSQL");
        let (written, stop) = (written.clone(), writers_stop.clone());
        writer_tasks.push(tokio::spawn(async move {
            let outbox = PgOutbox::new(schema);
            let mut i = 0usize;
            while !*stop.borrow() {
                let e = outbox_core::NewEvent::new(
                    outbox_core::Topic::new("bench.concurrent").unwrap(),
                    outbox_core::AggregateRef::new("w", format!("{w}-{}", i % 20)).unwrap(),
                    vec![b'x'; 200],
                );
                let mut tx = pool.begin().await?;
                outbox.enqueue(&mut tx, &e).await?;
                tx.commit().await?;
                written.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    // Writers stop once 90 % of the prefilled backlog is gone; the run ends when everything,
    // including their events, is completed.
    let mut stopped_writers = writers == 0;
    let mut published_at_stop = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let done = store.completed();
        if !stopped_writers && done >= before * 9 / 10 {
            let _ = writers_stop_tx.send(true);
            stopped_writers = true;
            for t in writer_tasks.drain(..) {
                t.await??;
            }
            published_at_stop = written.load(Ordering::Relaxed);
        }
        if stopped_writers && done >= before + written.load(Ordering::Relaxed) as u64 {
            break;
        }
    }
    let elapsed = start.elapsed();
    mark("relay drain", "end");
    for s in stops {
        let _ = s.send(());
    }
    let mut published = 0;
    let (mut claim, mut publish, mut settle) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for h in handles {
        let r = h.await?;
        published += r.published;
        claim += r.time_claiming;
        publish += r.time_publishing;
        settle += r.time_settling;
    }
    let busy = (claim + publish + settle).as_secs_f64().max(1e-9);
    let split = format!(
        "claim {:.0}% / publish {:.0}% / settle {:.0}% of {:.2} s busy",
        100.0 * claim.as_secs_f64() / busy,
        100.0 * publish.as_secs_f64() / busy,
        100.0 * settle.as_secs_f64() / busy,
        busy
    );
    let writer_rate = published_at_stop as f64 / elapsed.as_secs_f64();
    Ok((published as f64 / elapsed.as_secs_f64(), writer_rate, split))
}

/// Kafka's own rate: the same messages produced pipelined by a bare idempotent producer.
pub(crate) async fn raw_produce(
    bootstrap: &str,
    events: usize,
    payload: usize,
) -> anyhow::Result<f64> {
    let producer: FutureProducer = KafkaConfig::new(bootstrap)
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let topic = format!("bench.raw.{}", uuid::Uuid::new_v4().simple());
    let body = vec![b'x'; payload];
    let keys: Vec<String> = (0..1000).map(|i| format!("agg-{i}")).collect();
    // Warm-up: topic creation and metadata are not part of the rate.
    producer
        .send(
            FutureRecord::to(&topic).key("warm-up").payload(&body),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let start = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(2000) {
        let mut futures = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let record = FutureRecord::to(&topic).key(&keys[i % 1000]).payload(&body);
            futures.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        for f in futures {
            f.await?.map_err(|(e, _)| e)?;
        }
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

/// One measured line of the table.
#[derive(Clone, Copy)]
enum Case {
    RawOneStatement(i64),
    RawTwoStatements(i64),
    /// MySQL's at-least-once limit (read, then delete by seq).
    MySqlRawTwoStatements(i64),
    KafkaRaw,
    /// The two raw limits at once: on one machine they share the CPU, as a relay's two
    /// halves do. The rate is that of the slower one while both run.
    RawBothAtOnce,
    Relay {
        label: &'static str,
        relays: usize,
        writers: usize,
        pipeline: bool,
        kafka: bool,
        mysql: bool,
    },
}

impl Case {
    fn label(&self) -> String {
        match self {
            Case::RawOneStatement(b) => {
                format!("PostgreSQL raw claim-and-delete (`DELETE ... RETURNING`), batch {b}")
            }
            Case::RawTwoStatements(b) => {
                format!("PostgreSQL raw claim, then delete by seq, batch {b}")
            }
            Case::MySqlRawTwoStatements(b) => {
                format!("MariaDB raw claim, then delete by seq, batch {b}")
            }
            Case::KafkaRaw => "Kafka raw produce (idempotent, acks=all)".into(),
            Case::RawBothAtOnce => {
                "PostgreSQL raw claim-then-delete and Kafka raw produce, both at once".into()
            }
            Case::Relay { label, .. } => (*label).into(),
        }
    }
}

const fn relay(
    label: &'static str,
    relays: usize,
    writers: usize,
    pipeline: bool,
    kafka: bool,
) -> Case {
    Case::Relay {
        label,
        relays,
        writers,
        pipeline,
        kafka,
        mysql: false,
    }
}

const fn mysql_relay(label: &'static str, pipeline: bool, kafka: bool) -> Case {
    Case::Relay {
        label,
        relays: 1,
        writers: 0,
        pipeline,
        kafka,
        mysql: true,
    }
}

/// With `OUTBOX_BENCH_MARKS=1`, prints the system uptime (the clock of `perf record -k
/// CLOCK_MONOTONIC`) when a case starts and ends, so that a profile of the whole run can be
/// cut to one case with `perf report --time start,end` (a case includes its prefill; the
/// relay's drain alone is marked too).
fn mark(label: &str, what: &str) {
    if std::env::var_os("OUTBOX_BENCH_MARKS").is_some() {
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        let secs = uptime.split_whitespace().next().unwrap_or("?");
        eprintln!("mark {secs} {what} {label}");
    }
}

/// What one round measured for one case.
struct Measured {
    rate: f64,
    note: String,
}

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let (events, aggregates, payload, rounds) = if quick {
        (5_000, 100, 200, 1)
    } else {
        (200_000, 1_000, 200, 3)
    };
    let kafka_wanted = std::env::var_os("OUTBOX_TEST_BROKER_BIN").is_some()
        || std::env::var_os("KAFKA_BOOTSTRAP_SERVERS").is_some();
    let mut cases = vec![
        Case::RawOneStatement(500),
        Case::RawOneStatement(2000),
        Case::RawOneStatement(5000),
        Case::RawTwoStatements(500),
        Case::RawTwoStatements(2000),
        Case::RawTwoStatements(5000),
        relay(
            "relay, null publisher, sequential (pipeline off)",
            1,
            0,
            false,
            false,
        ),
        relay("relay, null publisher", 1, 0, true, false),
        relay("2 relays, null publisher", 2, 0, true, false),
        relay(
            "relay, null publisher, 4 writers inserting",
            1,
            4,
            true,
            false,
        ),
    ];
    let mysql_wanted = crate::store_wanted("mysql");
    if mysql_wanted {
        cases.extend([
            Case::MySqlRawTwoStatements(500),
            Case::MySqlRawTwoStatements(2000),
            Case::MySqlRawTwoStatements(5000),
            mysql_relay(
                "MariaDB: relay, null publisher, sequential (pipeline off)",
                false,
                false,
            ),
            mysql_relay("MariaDB: relay, null publisher", true, false),
        ]);
    }
    if kafka_wanted {
        cases.extend([
            Case::KafkaRaw,
            Case::RawBothAtOnce,
            relay(
                "relay to Kafka, sequential (pipeline off)",
                1,
                0,
                false,
                true,
            ),
            relay("relay to Kafka", 1, 0, true, true),
        ]);
        if mysql_wanted {
            cases.push(mysql_relay("MariaDB: relay to Kafka", true, true));
        }
    }
    let db = BenchDb::postgres(16).await?;
    let my = if mysql_wanted {
        Some(BenchDb::mysql(16).await?)
    } else {
        None
    };
    // measured[round][case]
    let mut measured: Vec<Vec<Measured>> = Vec::new();
    for round in 0..rounds {
        eprintln!("relay bench: round {} of {rounds}", round + 1);
        // A fresh broker per round (when a private one can be started), and its publisher.
        let cluster = if kafka_wanted {
            crate::BenchKafka::connect()
        } else {
            None
        };
        let kafka = cluster.as_ref().map(|c| c.bootstrap.clone());
        let publisher: Option<Arc<KafkaPublisher>> = match &kafka {
            Some(bootstrap) => Some(Arc::new(KafkaPublisher::new(KafkaConfig::new(bootstrap))?)),
            None => None,
        };
        let mut this_round = Vec::new();
        for case in &cases {
            mark(&case.label(), "start");
            let m = match *case {
                Case::RawOneStatement(batch) => {
                    prefill(&db, events, aggregates, payload, "bench.null").await?;
                    Measured {
                        rate: raw_drain(&db, batch).await?,
                        note: String::new(),
                    }
                }
                Case::RawTwoStatements(batch) => {
                    prefill(&db, events, aggregates, payload, "bench.null").await?;
                    Measured {
                        rate: raw_claim_then_delete(&db, batch).await?,
                        note: String::new(),
                    }
                }
                Case::MySqlRawTwoStatements(batch) => {
                    let my = my.as_ref().expect("a MySQL case");
                    prefill_mysql(my, events, aggregates, payload, "bench.null").await?;
                    Measured {
                        rate: raw_claim_then_delete_mysql(my, batch).await?,
                        note: String::new(),
                    }
                }
                Case::KafkaRaw => Measured {
                    rate: raw_produce(kafka.as_deref().expect("kafka case"), events, payload)
                        .await?,
                    note: String::new(),
                },
                Case::RawBothAtOnce => {
                    prefill(&db, events, aggregates, payload, "bench.null").await?;
                    let (pg, broker) = tokio::join!(
                        raw_claim_then_delete(&db, crate::relay_config()?.batch_size as i64),
                        raw_produce(kafka.as_deref().expect("kafka case"), events, payload)
                    );
                    let (pg, broker) = (pg?, broker?);
                    Measured {
                        rate: pg.min(broker),
                        note: format!("PostgreSQL {pg:.0}/s, Kafka {broker:.0}/s while sharing"),
                    }
                }
                Case::Relay {
                    relays,
                    writers,
                    pipeline,
                    kafka: to_kafka,
                    mysql,
                    ..
                } => {
                    let (topic, publisher): (String, Arc<dyn Publisher>) = if to_kafka {
                        (
                            format!("bench.relay.{}", uuid::Uuid::new_v4().simple()),
                            publisher.clone().expect("kafka case"),
                        )
                    } else {
                        ("bench.null".into(), Arc::new(NullPublisher))
                    };
                    let target = if mysql {
                        let my = my.as_ref().expect("a MySQL case");
                        prefill_mysql(my, events, aggregates, payload, &topic).await?;
                        my
                    } else {
                        prefill(&db, events, aggregates, payload, &topic).await?;
                        &db
                    };
                    let (rate, writer_rate, split) =
                        relay_drain(target, publisher, relays, writers, pipeline).await?;
                    let note = if writers > 0 {
                        format!("writers {writer_rate:.0} tx/s; {split}")
                    } else {
                        split
                    };
                    Measured { rate, note }
                }
            };
            mark(&case.label(), "end");
            this_round.push(m);
        }
        measured.push(this_round);
    }

    // Limits and ratios are taken within each round, then the median over rounds is shown.
    let limit_of = |round: &[Measured], pick: &dyn Fn(&Case) -> bool| -> f64 {
        cases
            .iter()
            .zip(round)
            .filter(|(c, _)| pick(c))
            .map(|(_, m)| m.rate)
            .fold(0.0, f64::max)
    };
    let one = |r: &[Measured]| limit_of(r, &|c| matches!(c, Case::RawOneStatement(_)));
    let two = |r: &[Measured]| limit_of(r, &|c| matches!(c, Case::RawTwoStatements(_)));
    let my_two = |r: &[Measured]| limit_of(r, &|c| matches!(c, Case::MySqlRawTwoStatements(_)));
    let broker = |r: &[Measured]| limit_of(r, &|c| matches!(c, Case::KafkaRaw));
    let shared = |r: &[Measured]| limit_of(r, &|c| matches!(c, Case::RawBothAtOnce));
    header(
        &format!(
            "relay: drain {events} events over {aggregates} aggregates ({payload} B), median of {rounds} round(s)"
        ),
        &["what", "events/s", "ratio to its limit (same round)", "notes (last round)"],
    );
    let mut results = json!({ "events": events, "aggregates": aggregates, "payload_bytes": payload, "rounds": rounds });
    for (i, case) in cases.iter().enumerate() {
        let rate = median(measured.iter().map(|r| r[i].rate).collect());
        let note = measured
            .last()
            .map(|r| r[i].note.clone())
            .unwrap_or_default();
        let (ratio_text, ratios) = match case {
            Case::RawOneStatement(_) => ("one-statement limit".to_string(), json!({})),
            Case::RawTwoStatements(_) | Case::MySqlRawTwoStatements(_) => {
                ("at-least-once limit".to_string(), json!({}))
            }
            Case::Relay {
                kafka: false,
                mysql: true,
                ..
            } => {
                let r = median(measured.iter().map(|r| r[i].rate / my_two(r)).collect());
                (
                    format!("{r:.2} of MariaDB's at-least-once"),
                    json!({ "ratio_to_two_statement_limit": r }),
                )
            }
            Case::Relay {
                kafka: true,
                mysql: true,
                ..
            } => {
                let r = median(
                    measured
                        .iter()
                        .map(|m| m[i].rate / my_two(m).min(broker(m)))
                        .collect(),
                );
                (
                    format!("{r:.2} of min(MariaDB's at-least-once, broker)"),
                    json!({ "ratio_to_min_limit": r }),
                )
            }
            Case::KafkaRaw => ("broker limit".to_string(), json!({})),
            Case::RawBothAtOnce => ("shared-machine limit".to_string(), json!({})),
            Case::Relay { kafka: false, .. } => {
                let r1 = median(measured.iter().map(|r| r[i].rate / one(r)).collect());
                let r2 = median(measured.iter().map(|r| r[i].rate / two(r)).collect());
                (
                    format!("{r1:.2} of one-statement, {r2:.2} of at-least-once"),
                    json!({ "ratio_to_pg_limit": r1, "ratio_to_two_statement_limit": r2 }),
                )
            }
            Case::Relay { kafka: true, .. } => {
                let r = median(
                    measured
                        .iter()
                        .map(|m| m[i].rate / two(m).min(broker(m)))
                        .collect(),
                );
                let rs = median(measured.iter().map(|m| m[i].rate / shared(m)).collect());
                (
                    format!("{r:.2} of min(at-least-once, broker); {rs:.2} of shared-machine"),
                    json!({ "ratio_to_min_limit": r, "ratio_to_shared_machine_limit": rs }),
                )
            }
        };
        row(&[case.label(), format!("{rate:.0}"), ratio_text, note.clone()]);
        let mut entry = json!({ "per_sec": rate, "notes": note });
        if let (Some(e), Some(r)) = (entry.as_object_mut(), ratios.as_object()) {
            e.extend(r.clone());
        }
        results[case.label()] = entry;
    }
    results["pg_limit_per_sec"] = json!(median(measured.iter().map(|r| one(r)).collect()));
    results["pg_two_statement_limit_per_sec"] =
        json!(median(measured.iter().map(|r| two(r)).collect()));
    if mysql_wanted {
        results["mysql_two_statement_limit_per_sec"] =
            json!(median(measured.iter().map(|r| my_two(r)).collect()));
    }
    if kafka_wanted {
        results["kafka_limit_per_sec"] =
            json!(median(measured.iter().map(|r| broker(r)).collect()));
    } else {
        println!("(Kafka rows skipped: neither OUTBOX_TEST_BROKER_BIN nor KAFKA_BOOTSTRAP_SERVERS is set)");
    }
    db.drop().await;
    if let Some(my) = my {
        my.drop().await;
    }
    Ok(results)
}
