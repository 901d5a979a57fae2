//! `outbox-bench`: every figure is a ratio against a baseline measured in the same run,
//! interleaved, as the median of several rounds (a shared 2-core machine is noisy).
//!
//! ```text
//! cargo run --release -p outbox-bench -- all --quick          # seconds; what CI runs
//! cargo run --release -p outbox-bench -- all --json bench.json # the full run of BENCHMARKS.md
//! ```
//! Needs PostgreSQL at `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! the Kafka figures need `KAFKA_BOOTSTRAP_SERVERS`, the outage drain `OUTBOX_TEST_BROKER_BIN`;
//! the broker comparison starts private nats-server and RabbitMQ nodes of its own.

mod brokers;
mod counting;
mod db;
mod gauges;
mod latency;
mod outage;
mod relay;
mod stats;
mod stream;
mod write;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "outbox-bench")]
struct Cli {
    /// Small sizes and short runs (seconds), to keep the benchmark from rotting.
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Clone, Copy)]
enum Command {
    /// Business transaction alone, with a hand-written outbox INSERT, and with `enqueue`.
    Write,
    /// Drain a prefilled outbox: relay versus PostgreSQL's raw claim-and-delete and Kafka's raw produce.
    Relay,
    /// Commit-to-ack latency under steady load, per wake-up mode.
    Latency,
    /// Backlog and drain time after a broker outage under load.
    Outage,
    /// The relay's table gauges under a pending backlog, against a full count.
    Gauges,
    /// Relay throughput and commit-to-ack latency to Kafka, NATS JetStream and RabbitMQ, each
    /// against its own raw publish limit.
    Brokers,
    /// The stream write mode (logical messages) against the table mode: write cost, drain
    /// against PostgreSQL's own decoding, commit-to-ack latency (private logical cluster).
    Stream,
    /// All of the above.
    All,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .init();
    let cli = Cli::parse();
    let quick = cli.quick;
    let mut results = serde_json::Map::new();
    let run = |c: Command| {
        matches!(cli.command, Command::All)
            || std::mem::discriminant(&cli.command) == std::mem::discriminant(&c)
    };
    if run(Command::Write) {
        results.insert("write".into(), write::run(quick).await?);
    }
    if run(Command::Relay) {
        results.insert("relay".into(), relay::run(quick).await?);
    }
    if run(Command::Latency) {
        results.insert("latency".into(), latency::run(quick).await?);
    }
    if run(Command::Outage) {
        results.insert("outage".into(), outage::run(quick).await?);
    }
    if run(Command::Gauges) {
        results.insert("gauges".into(), gauges::run(quick).await?);
    }
    if run(Command::Brokers) {
        results.insert("brokers".into(), brokers::run(quick).await?);
    }
    if run(Command::Stream) {
        results.insert("stream".into(), stream::run(quick).await?);
    }
    let report = json!({
        "quick": quick,
        "machine": machine(),
        "results": Value::Object(results),
    });
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu": model })
}

/// Whether the store `name` (postgres, mysql, sqlite) is benchmarked: `OUTBOX_BENCH_STORES`
/// lists them (comma-separated), all by default. The relay bench's PostgreSQL rows are its
/// baseline and always run.
fn store_wanted(name: &str) -> bool {
    match std::env::var("OUTBOX_BENCH_STORES") {
        Ok(list) => list.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

/// The relay's settings for a benchmark: the defaults, changed by the usual `OUTBOX_*`
/// environment variables (e.g. `OUTBOX_BATCH_SIZE=5000`, `OUTBOX_PIPELINE=false`).
fn relay_config() -> anyhow::Result<outbox_core::RelayConfig> {
    Ok(outbox_core::Settings::from_env()?.relay)
}

/// The Kafka cluster a benchmark talks to: a private, fresh broker when `OUTBOX_TEST_BROKER_BIN`
/// names one (a broker with memory storage slows down as earlier runs' messages pile up in
/// it, which made later rows of a run look worse than earlier ones), else
/// `KAFKA_BOOTSTRAP_SERVERS`, else none. Keep the value alive while the broker is used.
struct BenchKafka {
    bootstrap: String,
    _private: Option<outbox_kafka::testing::TestBroker>,
}

impl BenchKafka {
    fn connect() -> Option<Self> {
        if std::env::var_os("OUTBOX_TEST_BROKER_BIN").is_some() {
            let broker = outbox_kafka::testing::TestBroker::start();
            return Some(Self {
                bootstrap: broker.bootstrap(),
                _private: Some(broker),
            });
        }
        let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok()?;
        Some(Self {
            bootstrap,
            _private: None,
        })
    }
}
