//! [`OutboxAdmin`] on SQLite. Filters are bound parameters, never SQL text.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    EventFilter, EventId, EventRecord, Headers, OutboxAdmin, StoreError, TopicStatus,
};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Row, Sqlite};

use crate::{SqliteRelayStore, NOW_MS};

fn filter_sql() -> String {
    format!(
        "(?2 IS NULL OR topic = ?2)
         AND (?3 IS NULL OR aggregate_id = ?3)
         AND (?4 IS NULL OR instr(lower(coalesce(last_error, '')), lower(?4)) > 0)
         AND (?5 IS NULL OR dead_at < {NOW_MS} - ?5)
         AND (?6 IS NULL OR event_id = ?6)"
    )
}

fn columns() -> String {
    format!(
        "seq, event_id, topic, aggregate_type, aggregate_id, event_type, status, attempts,
         last_error, {NOW_MS} - created_at AS age_ms, headers, payload"
    )
}

fn err(context: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::new(context, e)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn bind_filter<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    f: &'q EventFilter,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    q.bind(f.topic.as_deref())
        .bind(f.aggregate_id.as_deref())
        .bind(f.error_contains.as_deref())
        .bind(f.older_than.map(ms))
        .bind(f.event_id.map(|id| id.to_string()))
}

fn record(row: &SqliteRow) -> Result<EventRecord, StoreError> {
    let e = err("admin: decode row");
    let id: String = row.try_get("event_id").map_err(&e)?;
    let headers: String = row.try_get("headers").map_err(&e)?;
    let attempts: i64 = row.try_get("attempts").map_err(&e)?;
    let age: i64 = row.try_get("age_ms").map_err(&e)?;
    Ok(EventRecord {
        seq: row.try_get("seq").map_err(&e)?,
        event_id: id
            .parse::<EventId>()
            .map_err(|x| StoreError::new("admin: event_id", x))?,
        topic: row.try_get("topic").map_err(&e)?,
        aggregate_type: row.try_get("aggregate_type").map_err(&e)?,
        aggregate_id: row.try_get("aggregate_id").map_err(&e)?,
        event_type: row.try_get("event_type").map_err(&e)?,
        status: row.try_get("status").map_err(&e)?,
        attempts: attempts.max(0) as u32,
        last_error: row.try_get("last_error").map_err(&e)?,
        age_seconds: age as f64 / 1000.0,
        headers: serde_json::from_str::<Headers>(&headers).unwrap_or_default(),
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload").map_err(&e)?),
    })
}

#[async_trait]
impl OutboxAdmin for SqliteRelayStore {
    async fn topic_status(&self) -> Result<Vec<TopicStatus>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT topic,
                    sum(status = 'pending'), sum(status = 'dead'), sum(status = 'published'),
                    {NOW_MS} - min(CASE WHEN status = 'pending' THEN created_at END)
             FROM event_outbox GROUP BY topic ORDER BY topic"
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
                    oldest_pending_age_seconds: r
                        .try_get::<Option<i64>, _>(4)
                        .map_err(&e)?
                        .map(|ms| ms as f64 / 1000.0),
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
            "SELECT {} FROM event_outbox WHERE status = 'dead' AND {} ORDER BY seq LIMIT ?1",
            columns(),
            filter_sql()
        );
        let rows = bind_filter(sqlx::query(&sql).bind(limit as i64), filter)
            .fetch_all(self.pool())
            .await
            .map_err(err("admin: dead"))?;
        rows.iter().map(record).collect()
    }

    async fn event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {} FROM event_outbox WHERE event_id = ?",
            columns()
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await
        .map_err(err("admin: event"))?;
        row.as_ref().map(record).transpose()
    }

    async fn requeue_dead(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE event_outbox SET status = 'pending', attempts = 0, retry_at = NULL,
                 dead_at = NULL
             WHERE status = 'dead' AND ?1 AND {}",
            filter_sql()
        );
        Ok(bind_filter(sqlx::query(&sql).bind(true), filter)
            .execute(self.pool())
            .await
            .map_err(err("admin: requeue"))?
            .rows_affected())
    }

    async fn purge_dead(&self, filter: &EventFilter) -> Result<u64, StoreError> {
        let sql = format!(
            "DELETE FROM event_outbox WHERE status = 'dead' AND ?1 AND {}",
            filter_sql()
        );
        Ok(bind_filter(sqlx::query(&sql).bind(true), filter)
            .execute(self.pool())
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
        let matching = format!(
            "status = 'published' AND topic = ?1 AND published_at >= {NOW_MS} - ?2
             AND (?3 IS NULL OR aggregate_id = ?3)"
        );
        let select = format!("SELECT count(*) FROM event_outbox WHERE {matching}");
        let update = format!(
            "UPDATE event_outbox SET status = 'pending', published_at = NULL, attempts = 0
             WHERE {matching}"
        );
        let bound = |sql| {
            sqlx::query(sql)
                .bind(topic)
                .bind(ms(since))
                .bind(aggregate_id)
        };
        let e = err("admin: replay");
        if dry_run {
            let row = bound(&select).fetch_one(self.pool()).await.map_err(&e)?;
            Ok(row.try_get::<i64, _>(0).map_err(&e)?.max(0) as u64)
        } else {
            Ok(bound(&update)
                .execute(self.pool())
                .await
                .map_err(&e)?
                .rows_affected())
        }
    }
}
