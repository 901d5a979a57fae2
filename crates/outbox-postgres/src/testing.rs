//! Test support: a throw-away schema in a real PostgreSQL (feature `testing`).

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::{migrate, Schema};

/// Where tests find PostgreSQL when `DATABASE_URL` is not set.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A migrated schema with a random name, dropped by [`TestSchema::drop`].
pub struct TestSchema {
    pub pool: PgPool,
    pub schema: Schema,
}

impl TestSchema {
    /// Connects to `DATABASE_URL` (or [`DEFAULT_TEST_URL`]) and migrates a fresh schema.
    /// Panics with a hint when PostgreSQL cannot be reached: tests need the real thing.
    pub async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into());
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach PostgreSQL at DATABASE_URL={url}: {e}; start it (see .ci/run)")
            });
        let schema = Schema::new(format!("t_{}", uuid::Uuid::new_v4().simple()))
            .expect("generated names are valid");
        migrate(&pool, &schema).await.expect("migrate test schema");
        Self { pool, schema }
    }

    /// `"schema".name`, for SQL in tests.
    pub fn table(&self, name: &str) -> String {
        self.schema.table(name)
    }

    pub async fn drop(self) {
        sqlx::raw_sql(&format!("DROP SCHEMA {} CASCADE", self.schema.quoted()))
            .execute(&self.pool)
            .await
            .expect("drop test schema");
        self.pool.close().await;
    }
}
