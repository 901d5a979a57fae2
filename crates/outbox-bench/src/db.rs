//! A fresh, migrated database per benchmark: a PostgreSQL schema, a MySQL database or a
//! SQLite file.

use std::path::PathBuf;

use outbox_postgres::Schema;
use sqlx::postgres::PgPoolOptions;
use sqlx::{MySqlPool, PgPool, SqlitePool};

pub enum BenchDb {
    Postgres { pool: PgPool, schema: Schema },
    Sqlite { pool: SqlitePool, path: PathBuf },
    MySql { pool: MySqlPool, database: String },
}

/// The MySQL/MariaDB server of the benchmarks: `MYSQL_URL` (no database), else the machine's.
fn mysql_server() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

impl BenchDb {
    pub async fn mysql(connections: u32) -> anyhow::Result<Self> {
        let server = mysql_server();
        let database = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let admin = outbox_mysql::connect_with_size(&server, 1).await?;
        sqlx::query(&format!(
            "CREATE DATABASE {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .execute(&admin)
        .await?;
        admin.close().await;
        let pool =
            outbox_mysql::connect_with_size(&format!("{server}/{database}"), connections).await?;
        outbox_mysql::migrate(&pool).await?;
        sqlx::raw_sql(
            "CREATE TABLE bench_orders (id BIGINT AUTO_INCREMENT PRIMARY KEY,
                 customer VARCHAR(255) NOT NULL, amount BIGINT NOT NULL, note VARCHAR(255) NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Self::MySql { pool, database })
    }

    pub async fn postgres(connections: u32) -> anyhow::Result<Self> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&url)
            .await?;
        let schema = Schema::new(format!("bench_{}", uuid::Uuid::new_v4().simple()))?;
        outbox_postgres::migrate(&pool, &schema).await?;
        sqlx::raw_sql(&format!(
            "CREATE TABLE \"{}\".bench_orders (
                 id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 customer TEXT NOT NULL, amount BIGINT NOT NULL, note TEXT NOT NULL)",
            schema.name()
        ))
        .execute(&pool)
        .await?;
        Ok(Self::Postgres { pool, schema })
    }

    pub async fn sqlite() -> anyhow::Result<Self> {
        Self::sqlite_with(outbox_sqlite::Durability::Full).await
    }

    pub async fn sqlite_with(durability: outbox_sqlite::Durability) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("outbox-bench-{}.db", uuid::Uuid::new_v4().simple()));
        let pool = outbox_sqlite::connect_with(&format!("sqlite://{}", path.display()), durability)
            .await?;
        outbox_sqlite::migrate(&pool).await?;
        sqlx::raw_sql(
            "CREATE TABLE bench_orders (id INTEGER PRIMARY KEY AUTOINCREMENT,
                 customer TEXT NOT NULL, amount INTEGER NOT NULL, note TEXT NOT NULL)",
        )
        .execute(&pool)
        .await?;
        Ok(Self::Sqlite { pool, path })
    }

    /// `"schema".table` on PostgreSQL, `table` on SQLite.
    pub fn table(&self, t: &str) -> String {
        match self {
            Self::Postgres { schema, .. } => format!("\"{}\".{t}", schema.name()),
            Self::Sqlite { .. } | Self::MySql { .. } => t.to_owned(),
        }
    }

    /// Empties the business and outbox tables (between interleaved modes).
    pub async fn reset(&self) -> anyhow::Result<()> {
        match self {
            Self::Postgres { pool, .. } => {
                sqlx::raw_sql(&format!(
                    "TRUNCATE {}, {}",
                    self.table("bench_orders"),
                    self.table("event_outbox")
                ))
                .execute(pool)
                .await?;
            }
            Self::Sqlite { pool, .. } => {
                sqlx::raw_sql("DELETE FROM bench_orders; DELETE FROM event_outbox;")
                    .execute(pool)
                    .await?;
            }
            Self::MySql { pool, .. } => {
                sqlx::raw_sql("TRUNCATE bench_orders; TRUNCATE event_outbox;")
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn drop(self) {
        match self {
            Self::Postgres { pool, schema } => {
                let _ = sqlx::raw_sql(&format!("DROP SCHEMA \"{}\" CASCADE", schema.name()))
                    .execute(&pool)
                    .await;
            }
            Self::Sqlite { pool, path } => {
                pool.close().await;
                for s in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{s}", path.display()));
                }
            }
            Self::MySql { pool, database } => {
                let _ = sqlx::raw_sql(&format!("DROP DATABASE {database}"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        }
    }
}
