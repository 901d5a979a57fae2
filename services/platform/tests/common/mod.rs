//! Shared by the platform's end-to-end tests.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use essay_common::runtime::DataLocation;
use essay_common::topics;
use essay_platform::demo::{DemoOptions, DemoReport};
use essay_platform::Platform;
use outbox::backend::Broker;
use outbox::portable::params;
use outbox::portable::ServiceDb;
use serde_json::Value;

pub fn temp_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "essay-test-{tag}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox_postgres::testing::DEFAULT_TEST_URL.into())
}

/// Fresh schemas for one test run on the test PostgreSQL.
pub fn pg_location(tag: &str) -> DataLocation {
    DataLocation::Server {
        url: database_url(),
        schema_prefix: format!(
            "t{}_{tag}_",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
    }
}

/// Fresh databases for one test run on the test MySQL/MariaDB (`MYSQL_URL`, else the
/// machine's MariaDB).
#[allow(dead_code)]
pub fn mysql_location(tag: &str) -> DataLocation {
    DataLocation::Server {
        url: format!("{}/test", outbox_mysql::testing::server_url()),
        schema_prefix: format!(
            "t{}_{tag}_",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
    }
}

pub async fn drop_schemas(location: &DataLocation) {
    if let DataLocation::Server { url, schema_prefix } = location {
        if url.starts_with("mysql") {
            let pool = outbox_mysql::connect_with_size(url, 1)
                .await
                .expect("connect");
            for (_, service, _) in essay_platform::SERVICES {
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {schema_prefix}{service}"))
                    .execute(&pool)
                    .await
                    .expect("drop database");
            }
            return;
        }
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        for (_, service, _) in essay_platform::SERVICES {
            sqlx::raw_sql(&format!(
                "DROP SCHEMA IF EXISTS \"{schema_prefix}{service}\" CASCADE"
            ))
            .execute(&pool)
            .await
            .expect("drop schema");
        }
    }
}

pub fn quiet(with_class: bool) -> DemoOptions {
    DemoOptions {
        with_class,
        verbose: false,
        timeout: Duration::from_secs(240),
        ..DemoOptions::default()
    }
}

/// Valid sample essays (the 14th file is too short on purpose).
pub const VALID: usize = 13;
pub const TOTAL: usize = 14;

/// The result JSON: every valid essay ranked once, 1..=13, with grade, score, spelling errors.
pub fn check_results(report: &DemoReport) {
    let r = &report.results;
    assert_eq!(r["status"], "COMPLETED", "{r:#}");
    assert_eq!(r["phases"]["spellcheck"], "COMPLETED_SUCCESSFULLY", "{r:#}");
    assert_eq!(
        r["phases"]["cj_assessment"], "COMPLETED_SUCCESSFULLY",
        "{r:#}"
    );
    assert_eq!(
        report.failed_validation,
        ["14-note.txt (CONTENT_TOO_SHORT)"]
    );
    let ranked: Vec<&Value> = r["essays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["rank"].is_null())
        .collect();
    assert_eq!(ranked.len(), VALID, "{r:#}");
    let ranks: Vec<i64> = ranked.iter().map(|e| e["rank"].as_i64().unwrap()).collect();
    assert_eq!(ranks, (1..=VALID as i64).collect::<Vec<_>>());
    let files: HashSet<&str> = ranked
        .iter()
        .map(|e| e["filename"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), VALID, "each file once");
    for e in &ranked {
        assert!(
            ["A", "B", "C", "D", "E"].contains(&e["grade"].as_str().unwrap()),
            "{e}"
        );
        assert!(e["score"].as_f64().unwrap().is_finite());
        assert!(e["standard_error"].as_f64().unwrap() > 0.0);
        assert!(
            e["spelling_errors"].as_i64().is_some(),
            "spellcheck results reached the view: {e}"
        );
        assert!(e["word_count"].as_i64().unwrap() > 25);
    }
    // The clearly weakest essays rank below the clearly strongest.
    let rank_of = |f: &str| {
        ranked.iter().find(|e| e["filename"] == f).unwrap()["rank"]
            .as_i64()
            .unwrap()
    };
    assert!(rank_of("10-my-summer.txt") > rank_of("01-phones-in-class.txt"));
    assert!(rank_of("12-pets.txt") > rank_of("11-social-media.txt"));
}

pub type Dbs = Vec<(&'static str, ServiceDb)>;

async fn count(dbs: &Dbs, service: &str, sql: &str, batch_id: &str) -> i64 {
    let (_, db) = dbs.iter().find(|(n, _)| *n == service).expect("service");
    db.fetch_optional(sql, params![batch_id])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap()
}

/// Each service's tables hold each effect of the batch exactly once.
pub async fn assert_effects_once(dbs: &Dbs, batch_id: &str, with_class: bool) {
    use essay_platform::SERVICES as S;
    let name = |short: &str| S.iter().find(|(s, _, _)| *s == short).unwrap().1;
    let checks: &[(&str, &str, i64)] = &[
        ("file-service", "SELECT COUNT(*) AS n FROM files WHERE batch_id = $1", TOTAL as i64),
        ("essay-lifecycle", "SELECT COUNT(*) AS n FROM essays WHERE batch_id = $1", TOTAL as i64),
        ("essay-lifecycle", "SELECT COUNT(*) AS n FROM essays WHERE batch_id = $1 AND state = 'CJ_COMPLETED'", VALID as i64),
        ("essay-lifecycle", "SELECT COUNT(*) AS n FROM pending_content WHERE batch_id = $1", 0),
        ("spellchecker", "SELECT COUNT(*) AS n FROM spellcheck_results WHERE batch_id = $1", VALID as i64),
        ("cj-assessment", "SELECT COUNT(*) AS n FROM cj_batches WHERE batch_id = $1 AND status = 'COMPLETED'", 1),
        ("cj-assessment", "SELECT COUNT(*) AS n FROM cj_results r JOIN cj_batches b ON b.cj_batch_id = r.cj_batch_id WHERE b.batch_id = $1", VALID as i64),
        ("result-aggregator", "SELECT COUNT(*) AS n FROM ra_essays WHERE batch_id = $1 AND essay_rank IS NOT NULL", VALID as i64),
        ("result-aggregator", "SELECT COUNT(*) AS n FROM ra_batches WHERE batch_id = $1 AND results_ready_sent = 1", 1),
        ("batch-orchestrator", "SELECT COUNT(*) AS n FROM pipelines WHERE batch_id = $1 AND status = 'COMPLETED'", 1),
    ];
    for (service, sql, want) in checks {
        assert_eq!(
            count(dbs, name(service), sql, batch_id).await,
            *want,
            "{service}: {sql}"
        );
    }
    if with_class {
        let n = count(
            dbs,
            name("class-management"),
            "SELECT COUNT(*) AS n FROM matches WHERE batch_id = $1 AND status = 'CONFIRMED'",
            batch_id,
        )
        .await;
        assert_eq!(n, 1);
    }
}

/// A message as it sits on the broker.
#[derive(Clone, Debug)]
pub struct OnBroker {
    pub topic: String,
    pub key: Option<String>,
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl From<outbox::IncomingMessage> for OnBroker {
    fn from(m: outbox::IncomingMessage) -> Self {
        Self {
            topic: m.topic,
            key: m.key,
            headers: m.headers,
            payload: m.payload.to_vec(),
        }
    }
}

impl OnBroker {
    pub fn envelope(&self) -> Value {
        serde_json::from_slice(&self.payload).expect("every message is JSON")
    }
}

/// RabbitMQ observers by exchange (see [`observe`]).
static OBSERVERS: std::sync::Mutex<
    std::collections::BTreeMap<String, std::sync::Arc<outbox_rabbitmq::testing::Observer>>,
> = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Starts keeping a copy of every message `broker` carries from now on, where the broker
/// does not keep them by itself (RabbitMQ: a queue bound to every routing key).
pub async fn observe(broker: &Broker) {
    if let Broker::RabbitMq(config) = broker {
        let observer = outbox_rabbitmq::testing::Observer::declare(config).await;
        OBSERVERS
            .lock()
            .unwrap()
            .insert(config.exchange.clone(), std::sync::Arc::new(observer));
    }
}

/// Every message of every contract topic.
pub async fn broker_messages(broker: &Broker, at_least: usize) -> Vec<OnBroker> {
    match broker {
        Broker::Memory(bus) => topics::ALL
            .iter()
            .flat_map(|t| bus.messages(t))
            .map(OnBroker::from)
            .collect(),
        Broker::Kafka(config) => outbox_kafka::testing::read_topics(
            &config.bootstrap_servers,
            topics::ALL,
            at_least,
            Duration::from_secs(20),
        )
        .await
        .into_iter()
        .map(|m| OnBroker {
            topic: m.topic,
            key: m.key,
            headers: m.headers,
            payload: m.payload,
        })
        .collect(),
        Broker::RabbitMq(config) => {
            let observer = OBSERVERS
                .lock()
                .unwrap()
                .get(&config.exchange)
                .cloned()
                .expect("observe(&broker) before the platform starts: RabbitMQ keeps a message only for the queues bound when it arrives");
            let mut seen = observer.all().await;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while seen.len() < at_least && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen = observer.all().await;
            }
            seen.into_iter()
                .filter(|m| topics::ALL.contains(&m.topic.as_str()))
                .map(OnBroker::from)
                .collect()
        }
        Broker::Nats(config) => outbox_nats::testing::read_stored(config, topics::ALL)
            .await
            .into_iter()
            .map(OnBroker::from)
            .collect(),
    }
}

/// Distinct events per topic for one batch (re-sends of one event id count once).
pub fn events_of_batch(messages: &[OnBroker], batch_id: &str) -> HashMap<String, usize> {
    let mut ids: HashMap<String, HashSet<String>> = HashMap::new();
    for m in messages {
        let env = m.envelope();
        if env["data"]["batch_id"] == batch_id {
            ids.entry(m.topic.clone())
                .or_default()
                .insert(env["event_id"].as_str().unwrap().to_owned());
        }
    }
    ids.into_iter().map(|(t, s)| (t, s.len())).collect()
}

/// Every critical event of the flow went out exactly once for the batch.
pub fn assert_events_once(messages: &[OnBroker], batch_id: &str, with_class: bool) {
    let got = events_of_batch(messages, batch_id);
    let mut want = vec![
        (topics::BATCH_ESSAYS_REGISTERED, 1),
        (topics::CLIENT_PIPELINE_REQUEST, 1),
        (topics::PIPELINE_DENIED, 0),
        (topics::FILE_ADDED, TOTAL),
        (topics::CONTENT_PROVISIONED, VALID),
        (topics::VALIDATION_FAILED, 1),
        (topics::SLOT_ASSIGNED, VALID),
        (topics::PROVISIONING_COMPLETED, 1),
        (topics::SPELLCHECK_INITIATE, 1),
        (topics::SPELLCHECK_REQUESTED, VALID),
        (topics::SPELLCHECK_PHASE_COMPLETED, VALID),
        (topics::SPELLCHECK_RESULTS, VALID),
        (topics::CJ_INITIATE, 1),
        (topics::CJ_REQUESTED, 1),
        (topics::CJ_COMPLETED, 1),
        (topics::ASSESSMENT_RESULT_PUBLISHED, 1),
        (topics::RESOURCE_CONSUMPTION, 1),
        (topics::PHASE_OUTCOME, 2),
        (topics::PIPELINE_COMPLETED, 1),
        (topics::RESULTS_READY, 1),
    ];
    if with_class {
        want.extend([
            (topics::MATCHING_INITIATE, 1),
            (topics::MATCHING_REQUESTED, 1),
            (topics::AUTHOR_MATCHES_SUGGESTED, 1),
            (topics::ASSOCIATIONS_CONFIRMED, 1),
            (topics::BATCH_ESSAYS_READY, 1),
        ]);
    }
    for (topic, n) in want {
        assert_eq!(
            got.get(topic).copied().unwrap_or(0),
            n,
            "{topic} for batch {batch_id}: {got:#?}"
        );
    }
    // Wire contract: key = aggregate id, headers carry the envelope's id and type.
    for m in messages
        .iter()
        .filter(|m| m.envelope()["data"]["batch_id"] == batch_id)
    {
        let env = m.envelope();
        assert_eq!(
            m.headers.get("event_id").map(String::as_str),
            env["event_id"].as_str(),
            "{}",
            m.topic
        );
        assert_eq!(m.headers.get("event_type"), Some(&m.topic));
        assert_eq!(env["event_type"], m.topic.as_str());
        assert_eq!(env["schema_version"], 1);
        let key = m.key.as_deref().unwrap_or_default();
        assert!(
            key == batch_id
                || env["data"]["essay_id"] == key
                || env["data"]["entity_id"] == key
                || env["data"]["file_upload_id"] == key,
            "{} keyed by {key}, not its aggregate",
            m.topic
        );
    }
}

/// Sends every message again, verbatim (same event ids), as a redelivering broker would.
pub async fn redeliver(broker: &Broker, messages: &[OnBroker]) {
    if let Broker::Nats(config) = broker {
        // JetStream stores a re-send carrying the outbox's Nats-Msg-Id (= event id) once
        // within its duplicate window: redeliver raw copies, as the server would.
        for m in messages {
            let raw = outbox::IncomingMessage {
                topic: m.topic.clone(),
                partition: 0,
                offset: 0,
                key: m.key.clone(),
                payload: m.payload.clone().into(),
                headers: m.headers.clone(),
            };
            outbox_nats::testing::publish_raw(config, &raw).await;
        }
        return;
    }
    let publisher = broker.publisher().expect("publisher");
    let batch: Vec<outbox::OutboxMessage> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| outbox::OutboxMessage {
            seq: i as i64,
            event_id: m.headers["event_id"].parse().expect("event id header"),
            aggregate: outbox::AggregateRef::new("redelivery", m.key.clone().unwrap_or_default())
                .unwrap(),
            event_type: m.topic.clone(),
            topic: outbox::Topic::new(m.topic.clone()).unwrap(),
            key: m.key.clone().unwrap_or_default(),
            headers: m.headers.clone(),
            payload: m.payload.clone().into(),
            attempts: 0,
            partition: 0,
            age_at_claim: Duration::ZERO,
        })
        .collect();
    for outcome in publisher.publish(&batch).await {
        assert!(
            matches!(outcome, outbox::PublishOutcome::Delivered),
            "{outcome:?}"
        );
    }
}

/// Sum of a labelled counter over all labels, from the Prometheus text.
pub fn counter_total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many deliveries `messages` make: one per consuming service of its topic.
pub fn deliveries(platform: &Platform, messages: &[OnBroker]) -> usize {
    let services = platform.services();
    messages
        .iter()
        .map(|m| {
            services
                .iter()
                .filter(|s| s.consumes().contains(&m.topic.as_str()))
                .count()
        })
        .sum()
}

/// Waits until `f` holds, polling.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redelivers every message of the run and checks that nothing changes: each consumer sees
/// each redelivered event as a duplicate, no service enqueues anything, results stay equal.
pub async fn redelivery_changes_nothing(
    platform: &Platform,
    broker: &Broker,
    messages: &[OnBroker],
    batches: &[(String, bool)],
    results_before: &[Value],
) {
    let metrics = || platform.obs.encode();
    let dups_before = counter_total(&metrics(), "inbox_duplicates_total");
    let enqueued_before = counter_total(&metrics(), "outbox_events_enqueued_total");
    let expected = deliveries(platform, messages) as f64;
    assert!(expected > 100.0, "{expected} deliveries");
    redeliver(broker, messages).await;
    eventually(
        Duration::from_secs(90),
        "every redelivery seen as a duplicate",
        || counter_total(&metrics(), "inbox_duplicates_total") - dups_before >= expected,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counter_total(&metrics(), "inbox_duplicates_total") - dups_before,
        expected
    );
    assert_eq!(
        counter_total(&metrics(), "outbox_events_enqueued_total"),
        enqueued_before,
        "a redelivered event caused new events"
    );
    let api = platform.gateway();
    for ((batch_id, with_class), before) in batches.iter().zip(results_before) {
        assert_effects_once(&platform.databases(), batch_id, *with_class).await;
        let (_, after) = api
            .get(&format!("/v1/batches/{batch_id}/results"))
            .await
            .unwrap();
        assert_eq!(&after, before, "results changed on redelivery");
    }
}

/// The platform on the embedded default in a fresh folder (returned for removal).
pub async fn embedded_platform(
    tag: &str,
    options: &essay_platform::Options,
) -> (Platform, PathBuf) {
    let dir = temp_dir(tag);
    let platform = Platform::start(
        &DataLocation::SqliteDir(dir.clone()),
        Broker::Memory(outbox::bus::Bus::default()),
        options,
    )
    .await
    .expect("platform starts");
    (platform, dir)
}

/// Waits until File Service has committed `n` files: their events are on their way.
pub async fn wait_for_files(platform: &Platform, n: usize) {
    let (_, files_db) = platform
        .databases()
        .into_iter()
        .find(|(name, _)| *name == file_service::NAME)
        .expect("file service");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let committed = files_db
            .fetch_optional("SELECT COUNT(*) AS n FROM files", &[])
            .await
            .unwrap()
            .unwrap()
            .int("n")
            .unwrap();
        if committed >= n as i64 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "upload did not happen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every outbox is drained, and checks nothing was dead-lettered.
pub async fn drain_outboxes(platform: &Platform, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let pending: u64 = platform
            .outbox_stats()
            .await
            .unwrap()
            .iter()
            .map(|(_, s)| s.pending)
            .sum();
        if pending == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} events stay pending"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // In the stream write mode the table stays empty: wait until every service's slot is
    // confirmed past the WAL written so far, i.e. its events were acknowledged.
    for (name, db) in platform.databases() {
        let (Some(source), outbox::backend::Database::Postgres { pool, .. }) =
            (db.stream_source(), db.database())
        else {
            continue;
        };
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(pool)
            .await
            .unwrap();
        loop {
            let behind: bool = sqlx::query_scalar(
                "SELECT coalesce(confirmed_flush_lsn < $2::pg_lsn, true)
                 FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(source.slot.as_str())
            .bind(&target)
            .fetch_one(pool)
            .await
            .unwrap();
            if !behind {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: its stream is not confirmed past {target}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(platform.dead_events().await.unwrap(), 0, "dead letters");
}

/// The original's contract (`shared/contracts/original`), which CI keeps beside the
/// repository: `ORIGINAL_CONTRACT_DIR`, else the first `shared/contracts/original` found in a
/// folder above this crate.
pub fn original_contract_dir() -> PathBuf {
    essay_common::original::contract_dir()
}

/// The original's JSON Schema called `name` (a topic, or `envelope`).
pub fn original_schema(name: &str) -> Option<jsonschema::Validator> {
    let path = original_contract_dir().join(format!("schemas/{name}.schema.json"));
    let schema: Value = serde_json::from_slice(&std::fs::read(path).ok()?).expect("schema JSON");
    Some(jsonschema::validator_for(&schema).expect("a valid schema"))
}

/// The first violation of `value`, naming the field and the rule.
pub fn schema_violation(validator: &jsonschema::Validator, value: &Value) -> Option<String> {
    validator
        .iter_errors(value)
        .next()
        .map(|e| format!("{} at {}", e, e.instance_path()))
}

/// Per topic: how many messages, and the first violation of the original's schema.
pub fn against_the_originals_schemas(
    messages: &[OnBroker],
) -> std::collections::BTreeMap<String, (usize, Option<String>)> {
    let envelope = original_schema("envelope").expect("the envelope schema");
    let mut validators = HashMap::new();
    let mut per_topic = std::collections::BTreeMap::new();
    for m in messages {
        let value = m.envelope();
        let entry = per_topic.entry(m.topic.clone()).or_insert((0, None));
        entry.0 += 1;
        if entry.1.is_some() {
            continue;
        }
        let validator = validators.entry(m.topic.clone()).or_insert_with(|| {
            original_schema(&m.topic)
                .unwrap_or_else(|| panic!("the original has no schema for {}", m.topic))
        });
        entry.1 = schema_violation(&envelope, &value)
            .map(|v| format!("envelope: {v}"))
            .or_else(|| schema_violation(validator, &value["data"]));
    }
    per_topic
}

/// Every message validates against the original's schema of its topic; otherwise the
/// failure names the topic, the field and the rule.
pub fn assert_all_conform(messages: &[OnBroker]) {
    let failures: Vec<String> = against_the_originals_schemas(messages)
        .into_iter()
        .filter_map(|(topic, (_, v))| v.map(|v| format!("{topic}: {v}")))
        .collect();
    assert!(
        failures.is_empty(),
        "not the original's contract:\n{}",
        failures.join("\n")
    );
}
