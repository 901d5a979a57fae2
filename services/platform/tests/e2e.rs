//! Batch to results, end to end: on the embedded default (SQLite + in-process bus), on
//! PostgreSQL + a real Kafka-protocol broker, on MariaDB + Kafka and on PostgreSQL + NATS
//! JetStream (a private nats-server) and on PostgreSQL + RabbitMQ (a private node), with
//! every event then
//! redelivered; the same on PostgreSQL in the stream write mode (events as logical messages,
//! one slot per service, a private cluster with `wal_level = logical`) + Kafka; and the chaos
//! run, with the broker frozen in the middle of a batch.

mod common;

use std::time::Duration;

use common::*;
use essay_common::runtime::DataLocation;
use essay_platform::demo;
use essay_platform::{Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;
use outbox_kafka::testing::TestBroker;
use outbox_kafka::KafkaConfig;

fn options() -> Options {
    Options {
        match_confirm_timeout: Duration::from_secs(30),
        ..Options::default()
    }
}

/// A REGULAR and a GUEST batch at once, then every message redelivered.
async fn two_batches_then_redelivery(location: DataLocation, broker: Broker) {
    two_batches_then_redelivery_with(location, broker, options()).await
}

async fn two_batches_then_redelivery_with(
    location: DataLocation,
    broker: Broker,
    options: Options,
) {
    observe(&broker).await;
    let platform = Platform::start(&location, broker.clone(), &options)
        .await
        .expect("platform starts");
    let streamed = options.write_mode == outbox::WriteModeSetting::Stream;
    let api = platform.gateway();
    let (with_class, without) = (quiet(true), quiet(false));
    let (regular, guest) = tokio::join!(demo::run(&api, &with_class), demo::run(&api, &without));
    let (regular, guest) = (regular.expect("regular batch"), guest.expect("guest batch"));
    for (report, with_class) in [(&regular, true), (&guest, false)] {
        check_results(report);
        assert_effects_once(&platform.databases(), &report.batch_id, with_class).await;
    }
    // Let the last event (results ready) leave the outboxes.
    drain_outboxes(&platform, Duration::from_secs(5)).await;
    if streamed {
        assert_nothing_went_through_the_tables(&platform).await;
    }
    let published = platform.published() as usize;
    let messages = broker_messages(&broker, published).await;
    assert_events_once(&messages, &regular.batch_id, true);
    assert_events_once(&messages, &guest.batch_id, false);
    assert_all_conform(&messages);
    let batches = [
        (regular.batch_id.clone(), true),
        (guest.batch_id.clone(), false),
    ];
    let before = [regular.results.clone(), guest.results.clone()];
    redelivery_changes_nothing(&platform, &broker, &messages, &batches, &before).await;
    platform.stop().await;
    drop_schemas(&location).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_default_batches_to_results() {
    let dir = temp_dir("embedded");
    two_batches_then_redelivery(
        DataLocation::SqliteDir(dir.clone()),
        Broker::Memory(Bus::default()),
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_kafka_batches_to_results() {
    let broker = TestBroker::start();
    let kafka = Broker::Kafka(KafkaConfig::new(broker.bootstrap()));
    two_batches_then_redelivery(pg_location("e2e"), kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_and_kafka_batches_to_results() {
    let broker = TestBroker::start();
    let kafka = Broker::Kafka(KafkaConfig::new(broker.bootstrap()));
    two_batches_then_redelivery(mysql_location("e2e"), kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_nats_batches_to_results() {
    let server = outbox_nats::testing::PrivateNats::start();
    two_batches_then_redelivery(pg_location("e2e"), Broker::Nats(server.config())).await;
}

/// In the stream write mode no service ever inserted an outbox row: every event of the run
/// left through the slots (the rows' identity sequences were never drawn).
async fn assert_nothing_went_through_the_tables(platform: &Platform) {
    for (name, db) in platform.databases() {
        assert!(db.stream_source().is_some(), "{name} is in the stream mode");
        let outbox::backend::Database::Postgres { pool, schema } = db.database() else {
            panic!("{name}: the stream mode runs on PostgreSQL");
        };
        let table = format!("{}.event_outbox", schema.name());
        let drawn: bool = sqlx::query_scalar(&format!(
            "SELECT is_called FROM {}",
            sqlx::query_scalar::<_, String>("SELECT pg_get_serial_sequence($1, 'seq')")
                .bind(&table)
                .fetch_one(pool)
                .await
                .unwrap()
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(!drawn, "{name}: an event went through its table");
    }
}

/// Every service in the stream write mode: its events leave as logical messages through its
/// own slot; the contract, the effects and the redelivery checks are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stream_mode_and_kafka_batches_to_results() {
    let cluster = outbox_postgres::testing::Cluster::create_with(&[
        "wal_level=logical",
        "max_replication_slots=16",
        "max_wal_senders=16",
        "max_connections=300",
    ]);
    let broker = TestBroker::start();
    let location = DataLocation::Server {
        url: cluster.url(),
        schema_prefix: "stream_".into(),
    };
    let options = Options {
        write_mode: outbox::WriteModeSetting::Stream,
        ..options()
    };
    two_batches_then_redelivery_with(
        location,
        Broker::Kafka(KafkaConfig::new(broker.bootstrap())),
        options,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_rabbitmq_batches_to_results() {
    let node = outbox_rabbitmq::testing::PrivateRabbit::start();
    two_batches_then_redelivery(pg_location("e2e"), Broker::RabbitMq(node.config())).await;
}

/// The broker is frozen (SIGSTOP) for 35 s in the middle of a batch; afterwards the pipeline
/// completes with every result present once and no effect applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_broker_frozen_mid_batch() {
    let broker = TestBroker::start();
    let kafka = Broker::Kafka(KafkaConfig::new(broker.bootstrap()));
    let location = pg_location("chaos");
    let platform = Platform::start(&location, kafka.clone(), &options())
        .await
        .expect("platform starts");
    let api = platform.gateway();
    let run = tokio::spawn(async move { demo::run(&api, &quiet(true)).await });
    // Freeze as soon as the uploaded files are committed: their events are on their way.
    wait_for_files(&platform, TOTAL).await;
    broker.freeze();
    let frozen_at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert!(
        !run.is_finished(),
        "the batch cannot finish while the broker is frozen"
    );
    broker.thaw();
    let report = run
        .await
        .unwrap()
        .expect("the batch completes after the outage");
    println!(
        "completed {:.1?} after the freeze began",
        frozen_at.elapsed()
    );
    check_results(&report);
    assert_effects_once(&platform.databases(), &report.batch_id, true).await;
    assert_eq!(
        platform.dead_events().await.unwrap(),
        0,
        "an outage must not dead-letter anything"
    );
    let messages = broker_messages(&kafka, platform.published() as usize).await;
    assert_events_once(&messages, &report.batch_id, true);
    assert_all_conform(&messages);
    platform.stop().await;
    drop_schemas(&location).await;
}
