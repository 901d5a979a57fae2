//! The stores under test: PostgreSQL (a fresh schema) and SQLite (a fresh file).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{EventId, HandlerError, MessageHandler, NewEvent, OutboxAdmin, RelayStore};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{InboxEvent, PgInboxHandler, PgOutbox, PgRelayStore, SqlHandler};
use outbox_sqlite::{SqliteInboxHandler, SqliteOutbox};
use sqlx::{Postgres, Sqlite, SqlitePool, Transaction};

use crate::Store;

pub struct PgStore {
    db: TestSchema,
}

impl PgStore {
    pub async fn boxed() -> Box<dyn Store> {
        let db = TestSchema::create().await;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {} (id TEXT PRIMARY KEY);
             CREATE TABLE {} (event_id TEXT PRIMARY KEY, applied BIGINT NOT NULL);",
            db.table("orders"),
            db.table("effects")
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        Box::new(Self { db })
    }

    async fn write(&self, events: &[NewEvent], commit: bool) -> Result<(), String> {
        let mut tx = self.db.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO {} VALUES ($1)",
            self.db.table("orders")
        ))
        .bind(uuid::Uuid::new_v4().to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
        PgOutbox::new(self.db.schema.clone())
            .enqueue_all(&mut tx, events)
            .await
            .map_err(|e| e.to_string())?;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        Ok(())
    }
}

struct PgEffect {
    table: String,
}

#[async_trait]
impl SqlHandler<sqlx::Postgres> for PgEffect {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "INSERT INTO {} VALUES ($1, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = EXCLUDED.applied + 1",
            self.table
        ))
        .bind(event.event_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

#[async_trait]
impl Store for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn relay_store(&self) -> Arc<dyn RelayStore> {
        Arc::new(PgRelayStore::new(self.db.pool.clone(), &self.db.schema))
    }

    fn admin(&self) -> Arc<dyn OutboxAdmin> {
        Arc::new(PgRelayStore::new(self.db.pool.clone(), &self.db.schema))
    }

    async fn commit(&self, events: &[NewEvent]) {
        self.write(events, true).await.unwrap()
    }

    async fn rollback(&self, events: &[NewEvent]) {
        self.write(events, false).await.unwrap()
    }

    async fn try_commit(&self, events: &[NewEvent]) -> Result<(), String> {
        self.write(events, true).await
    }

    async fn overwrite_headers(&self, id: EventId, headers_json: &str) {
        sqlx::query(&format!(
            "UPDATE {} SET headers = $2::jsonb WHERE event_id = $1",
            self.db.table("event_outbox")
        ))
        .bind(id.as_uuid())
        .bind(headers_json)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn row(&self, id: EventId) -> Option<(String, i64, Option<String>)> {
        sqlx::query_as::<_, (String, i32, Option<String>)>(&format!(
            "SELECT status, attempts, last_error FROM {} WHERE event_id = $1",
            self.db.table("event_outbox")
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
        .map(|(s, a, e)| (s, i64::from(a), e))
    }

    fn inbox_handler(&self, consumer: &str) -> Box<dyn MessageHandler> {
        Box::new(PgInboxHandler::new(
            self.db.pool.clone(),
            self.db.schema.clone(),
            consumer,
            PgEffect {
                table: self.db.table("effects"),
            },
        ))
    }

    async fn effects(&self) -> Vec<(String, i64)> {
        sqlx::query_as(&format!(
            "SELECT event_id, applied FROM {} ORDER BY event_id",
            self.db.table("effects")
        ))
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    async fn cleanup(self: Box<Self>) {
        self.db.drop().await;
    }
}

pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    pub async fn boxed() -> Box<dyn Store> {
        let path = std::env::temp_dir().join(format!(
            "outbox-conformance-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let pool = outbox_sqlite::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        outbox_sqlite::migrate(&pool).await.unwrap();
        outbox_sqlite::check_schema(&pool).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE orders (id TEXT PRIMARY KEY);
             CREATE TABLE effects (event_id TEXT PRIMARY KEY, applied INTEGER NOT NULL);",
        )
        .execute(&pool)
        .await
        .unwrap();
        Box::new(Self { pool, path })
    }

    async fn write(&self, events: &[NewEvent], commit: bool) -> Result<(), String> {
        let mut tx = outbox_sqlite::begin(&self.pool).await.unwrap();
        sqlx::query("INSERT INTO orders VALUES (?)")
            .bind(uuid::Uuid::new_v4().to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        SqliteOutbox::new(outbox_sqlite::SqliteDialect)
            .enqueue_all(&mut tx, events)
            .await
            .map_err(|e| e.to_string())?;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        Ok(())
    }
}

struct SqliteEffect;

#[async_trait]
impl SqlHandler<sqlx::Sqlite> for SqliteEffect {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO effects VALUES (?, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = applied + 1",
        )
        .bind(event.event_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn relay_store(&self) -> Arc<dyn RelayStore> {
        Arc::new(outbox_sqlite::SqliteRelayStore::new(
            self.pool.clone(),
            outbox_sqlite::SqliteDialect,
        ))
    }

    fn admin(&self) -> Arc<dyn OutboxAdmin> {
        Arc::new(outbox_sqlite::SqliteRelayStore::new(
            self.pool.clone(),
            outbox_sqlite::SqliteDialect,
        ))
    }

    async fn commit(&self, events: &[NewEvent]) {
        self.write(events, true).await.unwrap()
    }

    async fn rollback(&self, events: &[NewEvent]) {
        self.write(events, false).await.unwrap()
    }

    async fn try_commit(&self, events: &[NewEvent]) -> Result<(), String> {
        self.write(events, true).await
    }

    async fn overwrite_headers(&self, id: EventId, headers_json: &str) {
        sqlx::query("UPDATE event_outbox SET headers = ? WHERE event_id = ?")
            .bind(headers_json)
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn row(&self, id: EventId) -> Option<(String, i64, Option<String>)> {
        sqlx::query_as("SELECT status, attempts, last_error FROM event_outbox WHERE event_id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    fn inbox_handler(&self, consumer: &str) -> Box<dyn MessageHandler> {
        Box::new(SqliteInboxHandler::new(
            self.pool.clone(),
            outbox_sqlite::SqliteDialect,
            consumer,
            SqliteEffect,
        ))
    }

    async fn effects(&self) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT event_id, applied FROM effects ORDER BY event_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    async fn cleanup(self: Box<Self>) {
        self.pool.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

pub struct MySqlStore {
    db: outbox_mysql::testing::TestDatabase,
}

impl MySqlStore {
    pub async fn boxed() -> Box<dyn Store> {
        let db = outbox_mysql::testing::TestDatabase::create().await;
        sqlx::raw_sql(
            "CREATE TABLE orders (id VARCHAR(64) PRIMARY KEY);
             CREATE TABLE effects (event_id VARCHAR(64) PRIMARY KEY, applied BIGINT NOT NULL);",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        Box::new(Self { db })
    }

    async fn write(&self, events: &[NewEvent], commit: bool) -> Result<(), String> {
        let mut tx = self.db.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders VALUES (?)")
            .bind(uuid::Uuid::new_v4().to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox_mysql::MySqlOutbox::new(outbox_mysql::MySqlDialect)
            .enqueue_all(&mut tx, events)
            .await
            .map_err(|e| e.to_string())?;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        Ok(())
    }
}

struct MySqlEffect;

#[async_trait]
impl SqlHandler<sqlx::MySql> for MySqlEffect {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, sqlx::MySql>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO effects VALUES (?, 1) ON DUPLICATE KEY UPDATE applied = applied + 1",
        )
        .bind(event.event_id.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

#[async_trait]
impl Store for MySqlStore {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn relay_store(&self) -> Arc<dyn RelayStore> {
        Arc::new(outbox_mysql::MySqlRelayStore::new(
            self.db.pool.clone(),
            outbox_mysql::MySqlDialect,
        ))
    }

    fn admin(&self) -> Arc<dyn OutboxAdmin> {
        Arc::new(outbox_mysql::MySqlRelayStore::new(
            self.db.pool.clone(),
            outbox_mysql::MySqlDialect,
        ))
    }

    async fn commit(&self, events: &[NewEvent]) {
        self.write(events, true).await.unwrap()
    }

    async fn rollback(&self, events: &[NewEvent]) {
        self.write(events, false).await.unwrap()
    }

    async fn try_commit(&self, events: &[NewEvent]) -> Result<(), String> {
        self.write(events, true).await
    }

    async fn overwrite_headers(&self, id: EventId, headers_json: &str) {
        sqlx::query("UPDATE event_outbox SET headers = ? WHERE event_id = ?")
            .bind(headers_json)
            .bind(id.to_string())
            .execute(&self.db.pool)
            .await
            .unwrap();
    }

    async fn row(&self, id: EventId) -> Option<(String, i64, Option<String>)> {
        sqlx::query_as(
            "SELECT CAST(status AS CHAR), CAST(attempts AS SIGNED), CAST(last_error AS CHAR)
             FROM event_outbox WHERE event_id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.db.pool)
        .await
        .unwrap()
    }

    fn inbox_handler(&self, consumer: &str) -> Box<dyn MessageHandler> {
        Box::new(outbox_mysql::MySqlInboxHandler::new(
            self.db.pool.clone(),
            outbox_mysql::MySqlDialect,
            consumer,
            MySqlEffect,
        ))
    }

    async fn effects(&self) -> Vec<(String, i64)> {
        sqlx::query_as("SELECT event_id, applied FROM effects ORDER BY event_id")
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn cleanup(self: Box<Self>) {
        self.db.drop().await;
    }
}
