//! Wakes a relay in another process soon after writers commit, without writers doing
//! anything: the sequence watch.
//!
//! A relay that shares a process with its writers is woken by their commit
//! (`PgOutbox::with_wake_signal`). A sidecar relay is not; alone it polls, 50 ms doubling to
//! 1 s while idle. LISTEN/NOTIFY wakes it at once but costs every writer a global lock at
//! commit (a third of the 16-writer throughput, see BENCHMARKS.md). The sequence watch reads
//! the outbox's sequence every `interval` (one tiny catalog read, no table access, no lock):
//! when it moved, a writer inserted an event, and the relay is woken. The insert precedes
//! the commit, so the watch wakes the relay again a few times over the next ~150 ms (a claim
//! that ran before the commit found nothing); a transaction open longer than that is found
//! by the relay's regular poll.

use std::time::Duration;

use outbox_core::WakeSignal;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::Schema;

/// After a change, the watch wakes the relay again this long after it (the commit follows
/// the insert by the rest of the writer's transaction).
const REWAKES: [Duration; 3] = [
    Duration::from_millis(15),
    Duration::from_millis(50),
    Duration::from_millis(150),
];

/// Reads the outbox sequence of `schema` every `interval` and wakes `wake` when it moved
/// (see the module docs). Runs until the task is dropped; a failed read is retried after a
/// second (the relay's poll covers the gap).
pub async fn watch_for_commits(pool: PgPool, schema: Schema, wake: WakeSignal, interval: Duration) {
    let table = schema.table("event_outbox");
    // `None` before the first read; the sequence's value is `None` until its first use.
    let mut last: Option<Option<i64>> = None;
    let mut rewakes: Vec<Instant> = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence($1, 'seq')::regclass)",
        )
        .bind(&table)
        .fetch_one(&pool)
        .await;
        let now = Instant::now();
        match read {
            Ok(value) => {
                if last.is_some_and(|l| l != value) {
                    wake.wake();
                    rewakes = REWAKES.iter().map(|d| now + *d).collect();
                } else if rewakes.first().is_some_and(|at| *at <= now) {
                    rewakes.remove(0);
                    wake.wake();
                }
                last = Some(value);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox sequence failed; the relay polls meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
