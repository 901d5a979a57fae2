//! PostgreSQL restarts while writers and a relay run: a private cluster (initdb + pg_ctl from
//! the machine's PostgreSQL binaries) is restarted mid-run. Writers see clear errors while it
//! is down, the relay reconnects by itself, and every event whose commit succeeded is
//! published.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::testing::{wait_until, TestPublisher};
use outbox_core::{AggregateRef, EventId, NewEvent, Relay, RelayConfig, Topic};
use outbox_postgres::{migrate, PgOutbox, PgRelayStore, Schema};
use sqlx::postgres::PgPoolOptions;

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

/// A throw-away cluster; root runs its tools as the `postgres` user, as PostgreSQL requires.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
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

    fn create() -> Self {
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

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_loses_nothing_committed() {
    if !Path::new("/usr/lib/postgresql").exists()
        && std::env::var_os("OUTBOX_TEST_PG_BIN").is_none()
    {
        panic!("needs PostgreSQL binaries: install PostgreSQL or set OUTBOX_TEST_PG_BIN");
    }
    let cluster = Cluster::create();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&cluster.url())
        .await
        .unwrap();
    let schema = Schema::new("restart_test").unwrap();
    migrate(&pool, &schema).await.unwrap();

    let publisher = TestPublisher::new();
    let config = RelayConfig {
        poll_min: Duration::from_millis(10),
        poll_max: Duration::from_millis(100),
        lease: Duration::from_secs(3),
        ..RelayConfig::default()
    };
    let relay = Relay::new(
        PgRelayStore::new(pool.clone(), &schema),
        publisher.clone(),
        config,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    // Writers: commit events for 30 aggregates until told to stop; remember what committed
    // and what the failures said.
    let committed: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (halt, halted) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for w in 0..2 {
        let (pool, schema, committed, errors, halted) = (
            pool.clone(),
            schema.clone(),
            committed.clone(),
            errors.clone(),
            halted.clone(),
        );
        writers.push(tokio::spawn(async move {
            let outbox = PgOutbox::new(schema);
            let topic = Topic::new("restart.test").unwrap();
            let mut i = 0u64;
            while !*halted.borrow() {
                i += 1;
                let event = NewEvent::new(
                    topic.clone(),
                    AggregateRef::new("agg", format!("a{}", (i * 2 + w) % 30)).unwrap(),
                    format!("{{\"n\":{i}}}"),
                );
                let result = async {
                    let mut tx = pool.begin().await?;
                    outbox
                        .enqueue(&mut tx, &event)
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    tx.commit().await
                }
                .await;
                match result {
                    Ok(()) => committed.lock().unwrap().push(event.event_id()),
                    Err(e) => {
                        errors.lock().unwrap().push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = committed.lock().unwrap().len();
    assert!(
        before > 50,
        "writers were writing before the restart ({before})"
    );
    // Down for a few seconds, then up again.
    cluster.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start();
    println!("PostgreSQL was down for {:.1?}", down.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    halt.send(true).unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    assert!(
        committed.len() > before + 50,
        "writers carried on after the restart"
    );
    assert!(
        !errors.is_empty(),
        "writers saw errors while the database was down"
    );
    assert!(errors.iter().all(|e| !e.trim().is_empty()));
    wait_until(
        Duration::from_secs(60),
        "every committed event published after the restart",
        || {
            let all = committed.iter().all(|id| publisher.offered(*id) > 0);
            async move { all }
        },
    )
    .await;
    assert!(
        !relay.is_finished(),
        "the relay kept running through the restart"
    );
    let _ = stop.send(());
    relay.await.unwrap();
    println!(
        "{} committed, {} writer errors, all published",
        committed.len(),
        errors.len()
    );
}
