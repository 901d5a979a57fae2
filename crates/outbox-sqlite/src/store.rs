//! [`RelayStore`] on SQLite, with the same leases and fencing as PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    AfterFailure, AggregateRef, EventId, FailedAttempt, Fenced, Headers, OutboxMessage,
    OutboxStats, PartitionLease, PartitionNo, RelayActivity, RelayId, RelayStore, StoreError,
    Topic,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqlitePool};

use crate::NOW_MS;

/// The relay's view of `event_outbox` in one SQLite database. Cheap to clone.
#[derive(Clone)]
pub struct SqliteRelayStore {
    pool: SqlitePool,
}

impl SqliteRelayStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// What the live relays reported doing, summed per topic.
    pub(crate) async fn live_activity(&self) -> Result<RelayActivity, StoreError> {
        let stored: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT activity FROM event_outbox_relay WHERE expires_at > {NOW_MS}"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(err("relay activity"))?;
        Ok(RelayActivity::merge(stored.iter().map(String::as_str)))
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn err(context: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::new(context, e)
}

fn leases(rows: Vec<(i64, i64)>) -> Vec<PartitionLease> {
    let mut out: Vec<PartitionLease> = rows
        .into_iter()
        .map(|(p, fence)| PartitionLease {
            partition: p as PartitionNo,
            fence,
        })
        .collect();
    out.sort_by_key(|l| l.partition);
    out
}

/// Only rows whose partition the relay still holds under the same fence are touched.
fn fenced_clause() -> &'static str {
    "seq = ?1 AND partition_no = ?2 AND status = 'pending'
     AND EXISTS (SELECT 1 FROM event_outbox_partition p
                 WHERE p.partition_no = ?2 AND p.owner = ?3 AND p.fence = ?4)"
}

#[async_trait]
impl RelayStore for SqliteRelayStore {
    async fn heartbeat(
        &self,
        relay: RelayId,
        name: &str,
        lease: Duration,
    ) -> Result<usize, StoreError> {
        let e = err("heartbeat");
        let mut tx = crate::begin(&self.pool).await.map_err(&e)?;
        sqlx::query(&format!(
            "INSERT INTO event_outbox_relay (relay_id, name, started_at, expires_at)
             VALUES (?1, ?2, {NOW_MS}, {NOW_MS} + ?3)
             ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at,
                                                  name = excluded.name"
        ))
        .bind(relay.to_string())
        .bind(name)
        .bind(ms(lease))
        .execute(&mut *tx)
        .await
        .map_err(&e)?;
        sqlx::query(&format!(
            "DELETE FROM event_outbox_relay WHERE expires_at < {NOW_MS} - 3600000"
        ))
        .execute(&mut *tx)
        .await
        .map_err(&e)?;
        let live: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM event_outbox_relay WHERE expires_at > {NOW_MS}"
        ))
        .fetch_one(&mut *tx)
        .await
        .map_err(&e)?;
        tx.commit().await.map_err(&e)?;
        Ok(live.max(1) as usize)
    }

    async fn renew_leases(
        &self,
        relay: RelayId,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        let rows = sqlx::query_as(&format!(
            "UPDATE event_outbox_partition SET lease_until = {NOW_MS} + ?2
             WHERE owner = ?1 RETURNING partition_no, fence"
        ))
        .bind(relay.to_string())
        .bind(ms(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(err("renew leases"))?;
        Ok(leases(rows))
    }

    async fn acquire_partitions(
        &self,
        relay: RelayId,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        // One statement under SQLite's single writer: no two relays take the same partition.
        let rows = sqlx::query_as(&format!(
            "UPDATE event_outbox_partition
             SET owner = ?1, lease_until = {NOW_MS} + ?3, fence = fence + 1
             WHERE partition_no IN (
                 SELECT partition_no FROM event_outbox_partition
                 WHERE owner IS NULL OR lease_until < {NOW_MS}
                 ORDER BY partition_no LIMIT ?2)
             RETURNING partition_no, fence"
        ))
        .bind(relay.to_string())
        .bind(max as i64)
        .bind(ms(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(err("acquire partitions"))?;
        Ok(leases(rows))
    }

    async fn release_partitions(
        &self,
        relay: RelayId,
        partitions: &[PartitionNo],
    ) -> Result<(), StoreError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let list = serde_json::to_string(partitions).expect("numbers serialise");
        sqlx::query(
            "UPDATE event_outbox_partition SET owner = NULL, lease_until = 0
             WHERE owner = ?1 AND partition_no IN (SELECT value FROM json_each(?2))",
        )
        .bind(relay.to_string())
        .bind(list)
        .execute(&self.pool)
        .await
        .map_err(err("release partitions"))?;
        Ok(())
    }

    async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
        let e = err("take over instance");
        let mut tx = crate::begin(&self.pool).await.map_err(&e)?;
        let released = sqlx::query(
            "UPDATE event_outbox_partition SET owner = NULL, lease_until = 0
             WHERE owner IN (SELECT relay_id FROM event_outbox_relay
                             WHERE name = ?2 AND relay_id <> ?1)",
        )
        .bind(relay.to_string())
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(&e)?
        .rows_affected();
        sqlx::query("DELETE FROM event_outbox_relay WHERE name = ?2 AND relay_id <> ?1")
            .bind(relay.to_string())
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(&e)?;
        tx.commit().await.map_err(&e)?;
        Ok(released)
    }

    async fn deregister(&self, relay: RelayId) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM event_outbox_relay WHERE relay_id = ?")
            .bind(relay.to_string())
            .execute(&self.pool)
            .await
            .map_err(err("deregister relay"))?;
        Ok(())
    }

    async fn claim(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let list: Vec<PartitionNo> = partitions.iter().map(|l| l.partition).collect();
        let rows = sqlx::query(&format!(
            "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no,
                    e.event_type, e.topic, e.message_key, e.headers, e.payload, e.attempts,
                    {NOW_MS} - e.created_at AS age_ms
             FROM event_outbox e
             WHERE e.status = 'pending'
               AND e.partition_no IN (SELECT value FROM json_each(?1))
               AND NOT EXISTS (
                   SELECT 1 FROM event_outbox b
                   WHERE b.status = 'pending' AND b.retry_at IS NOT NULL
                     AND b.aggregate_type = e.aggregate_type
                     AND b.aggregate_id = e.aggregate_id
                     AND b.seq <= e.seq AND b.retry_at > {NOW_MS})
             ORDER BY e.seq
             LIMIT ?2"
        ))
        .bind(serde_json::to_string(&list).expect("numbers serialise"))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(err("claim"))?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            match decode(&row) {
                Ok(m) => batch.push(m),
                Err(e) => {
                    let seq: i64 = row.try_get("seq").map_err(err("claim: decode row"))?;
                    tracing::error!(seq, error = %e, "malformed outbox row; marking it dead");
                    sqlx::query(&format!(
                        "UPDATE event_outbox SET status = 'dead', dead_at = {NOW_MS},
                                last_error = ?2 WHERE seq = ?1 AND status = 'pending'"
                    ))
                    .bind(seq)
                    .bind(e.to_string())
                    .execute(&self.pool)
                    .await
                    .map_err(err("claim: park malformed row"))?;
                }
            }
        }
        Ok(batch)
    }

    async fn complete(
        &self,
        relay: RelayId,
        events: &[Fenced],
        retain: bool,
    ) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let sql = if retain {
            format!(
                "UPDATE event_outbox SET status = 'published', published_at = {NOW_MS},
                        retry_at = NULL WHERE {}",
                fenced_clause()
            )
        } else {
            format!("DELETE FROM event_outbox WHERE {}", fenced_clause())
        };
        let e = err("complete");
        let mut tx = crate::begin(&self.pool).await.map_err(&e)?;
        let relay = relay.to_string();
        let mut n = 0;
        for f in events {
            n += sqlx::query(&sql)
                .bind(f.seq)
                .bind(i64::from(f.lease.partition))
                .bind(&relay)
                .bind(f.lease.fence)
                .execute(&mut *tx)
                .await
                .map_err(&e)?
                .rows_affected();
        }
        tx.commit().await.map_err(&e)?;
        Ok(n)
    }

    async fn record_failures(
        &self,
        relay: RelayId,
        failures: &[FailedAttempt],
    ) -> Result<u64, StoreError> {
        if failures.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE event_outbox SET attempts = ?5, last_error = ?6,
                    status = CASE WHEN ?7 THEN 'dead' ELSE 'pending' END,
                    retry_at = CASE WHEN ?7 THEN NULL ELSE {NOW_MS} + ?8 END,
                    dead_at = CASE WHEN ?7 THEN {NOW_MS} END
             WHERE {}",
            fenced_clause()
        );
        let e = err("record failures");
        let mut tx = crate::begin(&self.pool).await.map_err(&e)?;
        let relay = relay.to_string();
        let mut n = 0;
        for f in failures {
            let (dead, delay) = match f.next {
                AfterFailure::Dead => (true, 0),
                AfterFailure::RetryIn(d) => (false, ms(d)),
            };
            n += sqlx::query(&sql)
                .bind(f.event.seq)
                .bind(i64::from(f.event.lease.partition))
                .bind(&relay)
                .bind(f.event.lease.fence)
                .bind(i64::from(f.attempts))
                .bind(&f.error)
                .bind(dead)
                .bind(delay)
                .execute(&mut *tx)
                .await
                .map_err(&e)?
                .rows_affected();
        }
        tx.commit().await.map_err(&e)?;
        Ok(n)
    }

    async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(&format!(
            "DELETE FROM event_outbox WHERE seq IN (
                 SELECT seq FROM event_outbox
                 WHERE status = 'published' AND published_at < {NOW_MS} - ?1
                 ORDER BY published_at LIMIT ?2)"
        ))
        .bind(ms(retention))
        .bind(limit as i64)
        .execute(&self.pool)
        .await
        .map_err(err("purge published"))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT
                 (SELECT count(*) FROM event_outbox WHERE status = 'pending'),
                 (SELECT count(*) FROM event_outbox WHERE status = 'pending' AND retry_at IS NOT NULL),
                 (SELECT count(*) FROM event_outbox WHERE status = 'dead'),
                 (SELECT count(*) FROM event_outbox WHERE status = 'published'),
                 {NOW_MS} - (SELECT min(created_at) FROM event_outbox WHERE status = 'pending'),
                 (SELECT count(*) FROM event_outbox_relay WHERE expires_at > {NOW_MS})"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(err("stats"))?;
        let e = err("stats");
        let count = |i: usize| -> Result<u64, StoreError> {
            Ok(row.try_get::<i64, _>(i).map_err(&e)?.max(0) as u64)
        };
        let age: Option<i64> = row.try_get(4).map_err(&e)?;
        let activity = self.live_activity().await?.total();
        Ok(OutboxStats {
            // SQLite reuses freed pages in place; there are no dead tuples to report.
            dead_tuples: None,
            table_bytes: None,
            in_flight: activity.in_flight,
            published_last_minute: activity.published_last_minute,
            pending: count(0)?,
            retrying: count(1)?,
            dead: count(2)?,
            published_retained: count(3)?,
            oldest_pending_age: age.map(|a| Duration::from_millis(a.max(0) as u64)),
            live_relays: count(5)?,
        })
    }

    async fn report_activity(
        &self,
        relay: RelayId,
        activity: &RelayActivity,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE event_outbox_relay SET activity = ?2 WHERE relay_id = ?1")
            .bind(relay.to_string())
            .bind(activity.to_json())
            .execute(&self.pool)
            .await
            .map_err(err("report activity"))?;
        Ok(())
    }
}

fn decode(row: &SqliteRow) -> Result<OutboxMessage, StoreError> {
    let e = err("claim: decode row");
    let seq: i64 = row.try_get("seq").map_err(&e)?;
    let bad = |what: String| {
        StoreError::new(
            "claim: stored event is malformed",
            format!("seq {seq}: {what}"),
        )
    };
    let text =
        |name: &str| -> Result<String, StoreError> { row.try_get::<String, _>(name).map_err(&e) };
    let event_id: EventId = text("event_id")?
        .parse()
        .map_err(|err| bad(format!("event_id: {err}")))?;
    let aggregate = AggregateRef::new(text("aggregate_type")?, text("aggregate_id")?)
        .map_err(|err| bad(err.to_string()))?;
    let topic = Topic::new(text("topic")?).map_err(|err| bad(err.to_string()))?;
    let headers: Headers = serde_json::from_str(&text("headers")?)
        .map_err(|err| bad(format!("headers are not a string map: {err}")))?;
    let payload: Vec<u8> = row.try_get("payload").map_err(&e)?;
    let attempts: i64 = row.try_get("attempts").map_err(&e)?;
    let partition: i64 = row.try_get("partition_no").map_err(&e)?;
    let age: i64 = row.try_get("age_ms").map_err(&e)?;
    Ok(OutboxMessage {
        seq,
        event_id,
        aggregate,
        event_type: text("event_type")?,
        topic,
        key: text("message_key")?,
        headers,
        payload: Bytes::from(payload),
        attempts: attempts.max(0) as u32,
        partition: partition as PartitionNo,
        age_at_claim: Duration::from_millis(age.max(0) as u64),
    })
}
