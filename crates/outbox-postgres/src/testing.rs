//! Test support (feature `testing`): a throw-away schema in a real PostgreSQL, and a private
//! cluster that a test may stop and start.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// The machine's PostgreSQL binaries (`OUTBOX_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`).
fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTBOX_TEST_PG_BIN") {
        return dir.into();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries under /usr/lib/postgresql (or set OUTBOX_TEST_PG_BIN)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("a PostgreSQL installation with pg_ctl")
}

/// A throw-away PostgreSQL cluster of its own (initdb + pg_ctl from the machine's binaries),
/// for tests that stop and start the database; root runs its tools as the `postgres` user,
/// as PostgreSQL requires. Stopped and removed on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    settings: Vec<String>,
}

impl Cluster {
    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let as_root = running_as_root();
        let mut cmd = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates and starts a cluster on a free port. Panics with a hint without binaries.
    pub fn create() -> Self {
        Self::create_with(&[])
    }

    /// A cluster that writes logical WAL (for the stream relay), with room for a few
    /// replication slots and senders.
    pub fn create_logical() -> Self {
        Self::create_with(&[
            "wal_level=logical",
            "max_replication_slots=8",
            "max_wal_senders=8",
        ])
    }

    /// A cluster started with these `name=value` server settings.
    pub fn create_with(settings: &[&str]) -> Self {
        assert!(
            Path::new("/usr/lib/postgresql").exists()
                || std::env::var_os("OUTBOX_TEST_PG_BIN").is_some(),
            "needs PostgreSQL binaries: install PostgreSQL or set OUTBOX_TEST_PG_BIN"
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("outbox-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let c = Self {
            bin: pg_bin(),
            dir,
            port,
            settings: settings.iter().map(|s| s.to_string()).collect(),
        };
        let data = c.data();
        c.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        c.start();
        c
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    pub fn start(&self) {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let log = self.dir.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// Stops the server without a shutdown checkpoint (`immediate`: a crash, as far as the
    /// data is concerned); [`Cluster::start`] recovers it.
    pub fn crash(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Its `postgres` database as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running_as_root() -> bool {
    // The effective uid, without a libc dependency: /proc says it.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
