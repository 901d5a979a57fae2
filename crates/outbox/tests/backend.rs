//! Backends are chosen by configuration alone.

use outbox::backend::{BackendError, Broker, Database, Durability};
use outbox::bus::Bus;
use outbox::{AggregateRef, BrokerSetting, NewEvent, Relay, RelayConfig, Topic};

fn temp_db() -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "outbox-backend-{}.db",
        uuid::Uuid::new_v4().simple()
    ));
    (format!("sqlite://{}", path.display()), path)
}

fn remove(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test]
async fn database_url_picks_the_store_and_prepares_it() {
    let (sqlite_url, path) = temp_db();
    let sqlite = Database::open(&sqlite_url, "ignored").await.unwrap();
    assert_eq!(sqlite.kind(), "sqlite");
    assert_eq!(sqlite.relay_store().stats().await.unwrap().pending, 0);

    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox::postgres::testing::DEFAULT_TEST_URL.into());
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let pg = Database::open(&url, &schema).await.unwrap();
    assert_eq!(pg.kind(), "postgres");
    assert_eq!(pg.relay_store().stats().await.unwrap().pending, 0);
    if let Database::Postgres { pool, .. } = &pg {
        sqlx::raw_sql(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(pool)
            .await
            .unwrap();
    }

    // MySQL: the schema is a database of its own on the URL's server, created and migrated.
    let server =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let database = format!("t_{}", uuid::Uuid::new_v4().simple());
    let my = Database::open(&format!("{server}/test"), &database)
        .await
        .unwrap();
    assert_eq!(my.kind(), "mysql");
    assert_eq!(my.relay_store().stats().await.unwrap().pending, 0);
    let Database::MySql {
        pool,
        database: opened,
    } = &my
    else {
        panic!("a MySQL database")
    };
    assert_eq!(opened, &database);
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = ?")
            .bind(&database)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(tables >= 6, "the outbox's tables in {database}: {tables}");
    sqlx::raw_sql(&format!("DROP DATABASE {database}"))
        .execute(pool)
        .await
        .unwrap();
    let err = Database::open(&format!("{server}/test"), "bad-name")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("schema name"), "{err}");

    let err = Database::open("redis://db/x", "s").await.err().unwrap();
    assert!(matches!(err, BackendError::UnsupportedUrl(_)));
    let text = err.to_string();
    assert!(
        text.contains("sqlite://") && text.contains("postgres://") && text.contains("mysql://"),
        "{text}"
    );
    let err = Database::open(&url, "Bad Schema").await.err().unwrap();
    assert!(err.to_string().contains("schema name"), "{err}");
    remove(&path);
}

#[tokio::test]
async fn the_memory_broker_carries_relayed_events_to_the_shared_bus() {
    let bus = Bus::default();
    let broker = Broker::from_setting(&BrokerSetting::Memory, bus.clone()).unwrap();
    assert_eq!(broker.kind(), "in-process bus");
    let (url, path) = temp_db();
    let db = Database::open(&url, "x").await.unwrap();
    let Database::Sqlite { pool } = &db else {
        panic!("sqlite expected")
    };
    let event = NewEvent::new(
        Topic::new("t.v1").unwrap(),
        AggregateRef::new("a", "1").unwrap(),
        "{}",
    );
    let mut tx = outbox::sqlite::begin(pool).await.unwrap();
    outbox::sqlite::SqliteOutbox::new(outbox::sqlite::SqliteDialect)
        .enqueue(&mut tx, &event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::new(
        db.relay_store(),
        broker.publisher().unwrap(),
        RelayConfig::default(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    for _ in 0..200 {
        if !bus.messages("t.v1").is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap();
    let got = bus.messages("t.v1");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["event_id"], event.event_id().to_string());

    let kafka = Broker::from_setting(&BrokerSetting::Kafka("127.0.0.1:1".into()), bus).unwrap();
    assert_eq!(kafka.kind(), "kafka");
    remove(&path);
}

/// SQLite's `synchronous` as the pool's connections run it (2 = FULL, 1 = NORMAL).
async fn synchronous(db: &Database) -> i64 {
    let Database::Sqlite { pool } = db else {
        panic!("sqlite expected")
    };
    sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_commits_are_durable_unless_the_broker_is_in_process() {
    let (url, path) = temp_db();
    // With an external broker a commit that a power loss takes back may already have been
    // published or had its offset committed: every commit must reach the disk.
    let kafka = Broker::Kafka(outbox::kafka::KafkaConfig::new("127.0.0.1:9"));
    let db = Database::open_for(&url, "x", &kafka).await.unwrap();
    assert_eq!(synchronous(&db).await, 2, "FULL with Kafka");
    let db = Database::open(&url, "x").await.unwrap();
    assert_eq!(synchronous(&db).await, 2, "FULL by default");
    let pool = outbox::sqlite::connect(&url).await.unwrap();
    let raw: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(raw, 2, "the store's own connect is durable too");
    // The in-process bus forgets everything with the process: NORMAL loses nothing more.
    let memory = Broker::from_setting(&BrokerSetting::Memory, Bus::default()).unwrap();
    let db = Database::open_for(&url, "x", &memory).await.unwrap();
    assert_eq!(synchronous(&db).await, 1, "NORMAL with the in-process bus");
    remove(&path);
}

#[test]
fn nats_and_rabbitmq_urls_choose_their_broker_and_bad_ones_say_what_to_give() {
    let nats = BrokerSetting::Nats("nats://127.0.0.1:4222".into());
    let nats = Broker::from_setting(&nats, Bus::default()).unwrap();
    assert_eq!(nats.kind(), "nats");
    assert!(matches!(nats.sqlite_durability(), Durability::Full));
    let rabbit = BrokerSetting::RabbitMq("amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let rabbit = Broker::from_setting(&rabbit, Bus::default()).unwrap();
    assert_eq!(rabbit.kind(), "rabbitmq");
    // No TLS stack is compiled into the AMQP client: refused at start, not at first publish.
    let tls = BrokerSetting::RabbitMq("amqps://guest:guest@rabbit:5671/%2f".into());
    let err = Broker::from_setting(&tls, Bus::default())
        .err()
        .expect("amqps refused")
        .to_string();
    assert!(
        err.contains("amqp://user:password@host:port/vhost"),
        "{err}"
    );
    let nats = BrokerSetting::Nats("nats://".into());
    let err = Broker::from_setting(&nats, Bus::default())
        .err()
        .expect("empty host refused")
        .to_string();
    assert!(err.contains("nats://host:port"), "{err}");
}
