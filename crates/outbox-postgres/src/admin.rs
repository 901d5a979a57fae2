//! [`OutboxAdmin`] on PostgreSQL. Filters are bound parameters, never SQL text.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    EventFilter, EventId, EventRecord, Headers, OutboxAdmin, StoreError, TopicStatus,
};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::PgRelayStore;

/// `$2..$6` of every filtered statement.
const FILTER: &str = "($2::text IS NULL OR topic = $2)
     AND ($3::text IS NULL OR aggregate_id = $3)
     AND ($4::text IS NULL OR strpos(lower(coalesce(last_error, '')), lower($4)) > 0)
     AND ($5::int8 IS NULL OR dead_at < now() - $5 * interval '1 millisecond')
     AND ($6::uuid IS NULL OR event_id = $6)";

const COLUMNS: &str = "seq, event_id, topic, aggregate_type, aggregate_id, event_type, status,
     attempts, last_error, EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS age,
     headers, payload";

fn err(context: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::new(context, e)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn record(row: &PgRow) -> Result<EventRecord, StoreError> {
    let e = err("admin: decode row");
    let headers: serde_json::Value = row.try_get("headers").map_err(&e)?;
    let attempts: i32 = row.try_get("attempts").map_err(&e)?;
    Ok(EventRecord {
        seq: row.try_get("seq").map_err(&e)?,
        event_id: EventId::from_uuid(row.try_get("event_id").map_err(&e)?),
        topic: row.try_get("topic").map_err(&e)?,
        aggregate_type: row.try_get("aggregate_type").map_err(&e)?,
        aggregate_id: row.try_get("aggregate_id").map_err(&e)?,
        event_type: row.try_get("event_type").map_err(&e)?,
        status: row.try_get("status").map_err(&e)?,
        attempts: attempts.max(0) as u32,
        last_error: row.try_get("last_error").map_err(&e)?,
        age_seconds: row.try_get("age").map_err(&e)?,
        headers: serde_json::from_value::<Headers>(headers).unwrap_or_default(),
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload").map_err(&e)?),
    })
}

impl PgRelayStore {
    fn bind_filter<'q>(
        &self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        f: &'q EventFilter,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(f.topic.as_deref())
            .bind(f.aggregate_id.as_deref())
            .bind(f.error_contains.as_deref())
            .bind(f.older_than.map(ms))
            .bind(f.event_id.map(|id| *id.as_uuid()))
    }
}

#[async_trait]
impl OutboxAdmin for PgRelayStore {
    async fn topic_status(&self) -> Result<Vec<TopicStatus>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT topic,
                    count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'dead'),
                    count(*) FILTER (WHERE status = 'published'),
                    EXTRACT(EPOCH FROM clock_timestamp()
                        - min(created_at) FILTER (WHERE status = 'pending'))::float8
             FROM {} GROUP BY topic ORDER BY topic",
            self.table()
        ))
        .fetch_all(self.pool())
        .await
        .map_err(err("admin: topic status"))?;
        let e = err("admin: decode status");
        let mut status: Vec<TopicStatus> = rows
            .iter()
            .map(|r| {
                Ok(TopicStatus {
                    in_flight: 0,
                    published_last_minute: 0,
                    topic: r.try_get(0).map_err(&e)?,
                    pending: r.try_get::<i64, _>(1).map_err(&e)? as u64,
                    dead: r.try_get::<i64, _>(2).map_err(&e)? as u64,
                    published_retained: r.try_get::<i64, _>(3).map_err(&e)? as u64,
                    oldest_pending_age_seconds: r.try_get(4).map_err(&e)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        outbox_core::admin::add_activity(&mut status, &self.live_activity().await?);
        Ok(status)
    }

    async fn dead(
        &self,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE status = 'dead' AND {FILTER} ORDER BY seq LIMIT $1",
            self.table()
        );
        let q = self.bind_filter(sqlx::query(&sql).bind(limit as i64), filter);
        let rows = q.fetch_all(self.pool()).await.map_err(err("admin: dead"))?;
        rows.iter().map(record).collect()
    }

    async fn event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE event_id = $1",
            self.table()
        ))
        .bind(id.as_uuid())
        .fetch_optional(self.pool())
        .await
        .map_err(err("admin: event"))?;
        row.as_ref().map(record).transpose()
    }

    async fn requeue_dead(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE {} SET status = 'pending', attempts = 0, retry_at = NULL, dead_at = NULL
             WHERE status = 'dead' AND $1::bool AND {FILTER}",
            self.table()
        );
        let q = self.bind_filter(sqlx::query(&sql).bind(true), filter);
        Ok(q.execute(self.pool())
            .await
            .map_err(err("admin: requeue"))?
            .rows_affected())
    }

    async fn purge_dead(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM {} WHERE status = 'dead' AND $1::bool AND {FILTER}",
            self.table()
        );
        let q = self.bind_filter(sqlx::query(&sql).bind(true), filter);
        Ok(q.execute(self.pool())
            .await
            .map_err(err("admin: purge"))?
            .rows_affected())
    }

    async fn replay(
        &self,
        topic: &str,
        since: Duration,
        aggregate_id: Option<&str>,
        dry_run: bool,
    ) -> Result<u64, StoreError> {
        let matching = "status = 'published' AND topic = $1
             AND published_at >= now() - $2 * interval '1 millisecond'
             AND ($3::text IS NULL OR aggregate_id = $3)";
        let sql = if dry_run {
            format!("SELECT count(*) FROM {} WHERE {matching}", self.table())
        } else {
            format!(
                "WITH r AS (UPDATE {} SET status = 'pending', published_at = NULL, attempts = 0
                            WHERE {matching} RETURNING 1)
                 SELECT count(*) FROM r",
                self.table()
            )
        };
        let n: i64 = sqlx::query_scalar(&sql)
            .bind(topic)
            .bind(ms(since))
            .bind(aggregate_id)
            .fetch_one(self.pool())
            .await
            .map_err(err("admin: replay"))?;
        Ok(n as u64)
    }
}
