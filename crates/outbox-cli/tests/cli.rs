//! The `outbox` command on real databases: a SQLite file and a PostgreSQL schema.

use std::process::Command;

use outbox_core::{AggregateRef, NewEvent, Topic};
use serde_json::Value;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn outbox(url: &str, schema: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("OUTBOX_SCHEMA", schema)
        .env("RUST_LOG", "error")
        .output()
        .expect("run outbox");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(run: &Run) -> Value {
    assert!(run.ok, "command failed: {}", run.stderr);
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[tokio::test]
async fn operator_workflow_on_sqlite() {
    let path =
        std::env::temp_dir().join(format!("outbox-cli-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", path.display());
    let cli = |args: &[&str]| outbox(&url, "public", args);

    let check = cli(&["check"]);
    assert!(
        !check.ok && check.stderr.contains("table event_outbox is missing"),
        "{}",
        check.stderr
    );
    assert!(
        check.stderr.contains("migrate"),
        "the error says how to fix it: {}",
        check.stderr
    );
    assert_eq!(
        json(&cli(&["--json", "migrate"]))["applied"],
        serde_json::json!([1, 2, 3])
    );
    assert_eq!(
        json(&cli(&["--json", "migrate"]))["applied"],
        serde_json::json!([])
    );
    assert!(cli(&["check"]).ok);

    // Three events; one of them dead with a timeout error, one published and retained.
    let pool = outbox_sqlite::connect(&url).await.unwrap();
    let topic = Topic::new("cli.test.v1").unwrap();
    let events: Vec<NewEvent> = (0..3)
        .map(|i| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("batch", format!("b{i}")).unwrap(),
                format!("{{\"i\":{i}}}"),
            )
        })
        .collect();
    let mut tx = outbox_sqlite::begin(&pool).await.unwrap();
    outbox_sqlite::SqliteOutbox::new(outbox_sqlite::SqliteDialect)
        .enqueue_all(&mut tx, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE event_outbox SET status = 'dead', attempts = 5, last_error = 'delivery timed out', dead_at = 0 WHERE event_id = ?")
        .bind(events[0].event_id().to_string())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE event_outbox SET status = 'published', published_at = CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) WHERE event_id = ?")
        .bind(events[2].event_id().to_string())
        .execute(&pool)
        .await
        .unwrap();

    let status = json(&cli(&["--json", "status"]));
    assert_eq!(
        (status["pending"].as_u64(), status["dead"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(status["topics"][0]["topic"], "cli.test.v1");
    assert!(cli(&["status"]).stdout.contains("1 pending"));

    let listed = json(&cli(&["--json", "dead", "list", "--error", "TIMED OUT"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["event_id"], events[0].event_id().to_string());
    assert_eq!(
        json(&cli(&["--json", "dead", "list", "--topic", "other"]))
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let shown = json(&cli(&[
        "--json",
        "dead",
        "show",
        &events[0].event_id().to_string(),
    ]));
    assert_eq!(shown["payload"], "{\"i\":0}");
    assert!(!cli(&["dead", "show", "not-a-uuid"]).ok);

    let refused = cli(&["dead", "requeue"]);
    assert!(
        !refused.ok && refused.stderr.contains("--all"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        json(&cli(&["--json", "dead", "requeue", "--aggregate", "b0"]))["requeued"],
        1
    );
    let (status_now, attempts): (String, i64) =
        sqlx::query_as("SELECT status, attempts FROM event_outbox WHERE event_id = ?")
            .bind(events[0].event_id().to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status_now.as_str(), attempts), ("pending", 0));

    assert_eq!(
        json(&cli(&[
            "--json",
            "replay",
            "--topic",
            "cli.test.v1",
            "--since",
            "1h",
            "--dry-run"
        ]))["replayed"],
        1
    );
    assert_eq!(
        json(&cli(&[
            "--json",
            "replay",
            "--topic",
            "cli.test.v1",
            "--since",
            "1h"
        ]))["replayed"],
        1
    );
    assert_eq!(json(&cli(&["--json", "status"]))["pending"], 3);

    sqlx::query("UPDATE event_outbox SET status = 'dead', last_error = 'x', dead_at = 0")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        json(&cli(&[
            "--json",
            "dead",
            "purge",
            "--older-than",
            "1s",
            "--aggregate",
            "b1"
        ]))["purged"],
        1
    );
    assert_eq!(
        json(&cli(&["--json", "dead", "purge", "--all"]))["purged"],
        2
    );
    pool.close().await;
    for s in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{s}", path.display()));
    }
}

#[tokio::test]
async fn migrate_check_and_status_on_postgres() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox_postgres::testing::DEFAULT_TEST_URL.into());
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let check = outbox(&url, &schema, &["check"]);
    assert!(
        !check.ok && check.stderr.contains("outbox migrate"),
        "{}",
        check.stderr
    );
    assert_eq!(
        json(&outbox(&url, &schema, &["--json", "migrate"]))["applied"],
        serde_json::json!([1, 2, 3])
    );
    let status = json(&outbox(&url, &schema, &["--json", "status"]));
    assert_eq!(
        (status["database"].as_str(), status["pending"].as_u64()),
        (Some("postgres"), Some(0))
    );
    let bad = outbox(&url, "x; DROP TABLE y", &["status"]);
    assert!(
        !bad.ok && bad.stderr.contains("OUTBOX_SCHEMA"),
        "{}",
        bad.stderr
    );
    let secret = outbox(
        "postgres://app:hunter2@127.0.0.1:1/none",
        &schema,
        &["status"],
    );
    assert!(
        !secret.ok && !secret.stderr.contains("hunter2"),
        "password leaked: {}",
        secret.stderr
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn operator_workflow_on_mysql() {
    let server = outbox_mysql::testing::server_url();
    let url = format!("{server}/test");
    let database = format!("t_{}", uuid::Uuid::new_v4().simple());
    let cli = |args: &[&str]| outbox(&url, &database, args);

    let check = cli(&["check"]);
    assert!(
        !check.ok && check.stderr.contains("table event_outbox is missing"),
        "{}",
        check.stderr
    );
    assert_eq!(
        json(&cli(&["--json", "migrate"]))["applied"],
        serde_json::json!([1, 2])
    );
    assert!(cli(&["check"]).ok);

    let pool = outbox_mysql::connect(&format!("{server}/{database}"))
        .await
        .unwrap();
    let topic = Topic::new("cli.test.v1").unwrap();
    let events: Vec<NewEvent> = (0..2)
        .map(|i| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("batch", format!("b{i}")).unwrap(),
                format!("{{\"i\":{i}}}"),
            )
        })
        .collect();
    let mut tx = pool.begin().await.unwrap();
    outbox_mysql::MySqlOutbox::new(outbox_mysql::MySqlDialect)
        .enqueue_all(&mut tx, &events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE event_outbox SET status = 'dead', attempts = 5, last_error = 'delivery timed out', dead_at = 0 WHERE event_id = ?")
        .bind(events[0].event_id().to_string())
        .execute(&pool)
        .await
        .unwrap();

    let status = json(&cli(&["--json", "status"]));
    assert_eq!(
        (
            status["database"].as_str(),
            status["pending"].as_u64(),
            status["dead"].as_u64()
        ),
        (Some("mysql"), Some(1), Some(1))
    );
    let listed = json(&cli(&["--json", "dead", "list", "--error", "TIMED OUT"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["event_id"], events[0].event_id().to_string());
    let shown = json(&cli(&[
        "--json",
        "dead",
        "show",
        &events[0].event_id().to_string(),
    ]));
    assert_eq!(shown["payload"], "{\"i\":0}");
    assert_eq!(
        json(&cli(&["--json", "dead", "requeue", "--aggregate", "b0"]))["requeued"],
        1
    );
    assert_eq!(json(&cli(&["--json", "status"]))["pending"], 2);

    let bad = outbox(&url, "x; DROP TABLE y", &["status"]);
    assert!(
        !bad.ok && bad.stderr.contains("OUTBOX_SCHEMA"),
        "{}",
        bad.stderr
    );
    sqlx::raw_sql(&format!("DROP DATABASE {database}"))
        .execute(&pool)
        .await
        .unwrap();
}
