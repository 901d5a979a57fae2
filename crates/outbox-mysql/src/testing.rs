//! Throw-away migrated databases for tests: `MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306`, the server on this machine kind) names the server; each
//! [`TestDatabase`] is a database of its own, dropped by [`TestDatabase::drop`].

use sqlx::MySqlPool;

/// The server tests use: `MYSQL_URL` without a database, else the machine's MariaDB.
pub fn server_url() -> String {
    let url = std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((host, _db)) => format!("{scheme}://{host}"),
            None => url,
        },
        None => url,
    }
}

/// A fresh database with the outbox migrated into it.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: MySqlPool,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let server = server_url();
        let name = format!("outbox_t_{}", uuid::Uuid::new_v4().simple());
        let admin = crate::connect_with_size(&server, 1)
            .await
            .unwrap_or_else(|e| panic!("MySQL/MariaDB at {server} (set MYSQL_URL): {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{server}/{name}");
        let pool = crate::connect_with_size(&url, 8).await.expect("connect");
        crate::migrate(&pool).await.expect("migrate");
        crate::check_schema(&pool).await.expect("schema check");
        Self { name, url, pool }
    }

    pub async fn drop(self) {
        self.pool.close().await;
        if let Ok(admin) = crate::connect_with_size(&server_url(), 1).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", self.name))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }
}
