//! Wakes a relay in another process soon after writers commit: SQLite's `PRAGMA
//! data_version` changes on a connection whenever another connection committed, at no cost
//! to writers. Read every `interval` on a connection of its own.

use std::time::Duration;

use outbox_core::WakeSignal;
use sqlx::SqlitePool;

/// Reads `PRAGMA data_version` every `interval` and wakes `wake` when another connection
/// committed. Runs until the task is dropped; a failed read is retried after a second.
pub async fn watch_for_commits(pool: SqlitePool, wake: WakeSignal, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The value is per connection: keep one for as long as it works.
        let mut conn = match pool.acquire().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no connection for the commit watch; the relay polls meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut last: Option<i64> = None;
        loop {
            tick.tick().await;
            match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
                .fetch_one(&mut *conn)
                .await
            {
                Ok(v) => {
                    if last.is_some_and(|l| l != v) {
                        wake.wake();
                    }
                    last = Some(v);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading data_version failed; the relay polls meanwhile");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}
