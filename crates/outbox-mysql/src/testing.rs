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

/// A private MariaDB server on a free port, in a directory of its own, started from the
/// machine's binaries (`mariadb-install-db`, `mariadbd`): a test may stop and start it
/// without touching the machine's server. No authentication (`--skip-grant-tables`) and no
/// durability settings worth keeping: it lives for one test.
pub struct PrivateServer {
    dir: std::path::PathBuf,
    port: u16,
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl PrivateServer {
    pub fn create() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let dir =
            std::env::temp_dir().join(format!("outbox-mariadb-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("server directory");
        let out = std::process::Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .output()
            .expect("mariadb-install-db (install MariaDB's server package)");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let server = Self {
            dir,
            port,
            child: std::sync::Mutex::new(None),
        };
        server.start();
        server
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let child = std::process::Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-grant-tables",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("log")).expect("log file"))
            .spawn()
            .expect("mariadbd");
        *self.child.lock().expect("lock") = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the private MariaDB did not start: {}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Shuts the server down (SIGTERM) and waits until it is gone.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// The server, without a database.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
