//! [`RelayStore`] on PostgreSQL.
//!
//! Claims need no row locks: a relay only reads partitions it holds a lease on, and each
//! partition has one holder. Every change to an event joins the partition row and requires
//! the caller's relay id and the fence it claimed under (see `outbox_core::store`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    AfterFailure, AggregateRef, EventId, FailedAttempt, Fenced, Headers, OutboxMessage,
    OutboxStats, PartitionLease, PartitionNo, RelayActivity, RelayId, RelayStore, StoreError,
    Topic, PARTITIONS,
};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::Schema;

/// Counts in `stats` are exact up to this many rows per state; above it they are estimated,
/// so that the relay's gauges (read every few seconds) cost the same with a backlog of a
/// million events as with none: pending from the span of the pending sequence numbers (an
/// upper bound, close for a backlog), the others from PostgreSQL's statistics of their
/// partial indexes (as of the last autovacuum or ANALYZE).
pub const STATS_EXACT_UP_TO: i64 = 10_000;

/// The relay's view of `<schema>.event_outbox`. Cheap to clone.
#[derive(Clone)]
pub struct PgRelayStore {
    pool: PgPool,
    sql: Arc<Sql>,
    table: Arc<str>,
}

struct Sql {
    heartbeat: String,
    renew: String,
    acquire: String,
    release: String,
    deregister: String,
    take_over: String,
    claim_all: String,
    claim_some: String,
    complete_delete: String,
    complete_retain: String,
    complete_delete_gated: String,
    complete_retain_gated: String,
    fail: String,
    bury: String,
    purge: String,
    stats: String,
    report_activity: String,
    live_activity: String,
}

impl Sql {
    fn new(schema: &Schema) -> Self {
        let t = schema.table("event_outbox");
        let p = schema.table("event_outbox_partition");
        let r = schema.table("event_outbox_relay");
        let ms = "* interval '1 millisecond'";
        // The leases a fenced statement relies on, share-locked for the statement's
        // transaction: under READ COMMITTED the statement's snapshot may predate another
        // relay's take-over, which (row-locking the lease to take it) must then wait until
        // this change committed, or has committed already and is seen here (the lock reads
        // the newest version of the row and drops it when the owner changed). Without the
        // lock, a relay frozen past its lease could mark an event dead while its new owner
        // publishes it. `$3` lists the partitions concerned.
        let held = format!(
            "WITH held AS MATERIALIZED (
                 SELECT partition_no, fence FROM {p}
                 WHERE owner = $1 AND partition_no = ANY($3::int2[])
                 FOR SHARE)"
        );
        let fenced = "held h WHERE e.seq = f.seq AND e.partition_no = f.partition_no
               AND h.partition_no = f.partition_no AND h.fence = f.fence
               AND e.status = 'pending'";
        // Checked once per statement (not joined per event): every lease of the batch is
        // still ours under the same fence. Two to three times cheaper than the per-event join
        // on 2,000 events; when a lease moved, `complete` falls back to the per-event check.
        let all_held = "(SELECT count(*) FROM held h
              JOIN unnest($3::int2[], $4::int8[]) AS f(partition_no, fence)
                ON h.partition_no = f.partition_no AND h.fence = f.fence) = cardinality($3)";
        Self {
            heartbeat: format!(
                "WITH beat AS (
                     INSERT INTO {r} (relay_id, name, expires_at) VALUES ($1, $2, now() + $3 {ms})
                     ON CONFLICT (relay_id) DO UPDATE
                     SET expires_at = EXCLUDED.expires_at, name = EXCLUDED.name),
                 gone AS (DELETE FROM {r} WHERE expires_at < now() - interval '1 hour')
                 SELECT count(*) + 1 FROM {r} WHERE expires_at > now() AND relay_id <> $1"
            ),
            renew: format!(
                "UPDATE {p} SET lease_until = now() + $2 {ms}
                 WHERE owner = $1 RETURNING partition_no, fence"
            ),
            acquire: format!(
                "UPDATE {p} AS p SET owner = $1, lease_until = now() + $3 {ms}, fence = p.fence + 1
                 WHERE p.partition_no IN (
                     SELECT partition_no FROM {p}
                     WHERE owner IS NULL OR lease_until < now()
                     ORDER BY partition_no LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING p.partition_no, p.fence"
            ),
            release: format!(
                "UPDATE {p} SET owner = NULL, lease_until = '-infinity'
                 WHERE owner = $1 AND partition_no = ANY($2)"
            ),
            deregister: format!("DELETE FROM {r} WHERE relay_id = $1"),
            take_over: format!(
                "WITH old AS (DELETE FROM {r} WHERE name = $2 AND relay_id <> $1 RETURNING relay_id)
                 UPDATE {p} SET owner = NULL, lease_until = '-infinity'
                 WHERE owner IN (SELECT relay_id FROM old)"
            ),
            claim_all: claim(&t, ""),
            claim_some: claim(&t, "AND e.partition_no = ANY($3)"),
            complete_delete: format!(
                "{held} DELETE FROM {t} e
                 USING unnest($2::int8[], $3::int2[], $4::int8[]) AS f(seq, partition_no, fence),
                 {fenced}"
            ),
            complete_retain: format!(
                "{held} UPDATE {t} e SET status = 'published', published_at = now(), retry_at = NULL
                 FROM unnest($2::int8[], $3::int2[], $4::int8[]) AS f(seq, partition_no, fence),
                 {fenced}"
            ),
            complete_delete_gated: format!(
                "{held} DELETE FROM {t} e WHERE e.seq = ANY($2) AND e.status = 'pending' AND {all_held}"
            ),
            complete_retain_gated: format!(
                "{held} UPDATE {t} e SET status = 'published', published_at = now(), retry_at = NULL
                 WHERE e.seq = ANY($2) AND e.status = 'pending' AND {all_held}"
            ),
            fail: format!(
                "{held} UPDATE {t} e SET
                     attempts = f.attempts,
                     last_error = f.error,
                     status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
                     retry_at = CASE WHEN f.dead THEN NULL ELSE now() + f.delay_ms {ms} END,
                     dead_at = CASE WHEN f.dead THEN now() END
                 FROM unnest($2::int8[], $3::int2[], $4::int8[], $5::int4[], $6::text[],
                             $7::bool[], $8::int8[])
                      AS f(seq, partition_no, fence, attempts, error, dead, delay_ms),
                 {fenced}"
            ),
            bury: format!(
                "UPDATE {t} SET status = 'dead', dead_at = now(), last_error = $2
                 WHERE seq = $1 AND status = 'pending'"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE seq IN (
                     SELECT seq FROM {t}
                     WHERE status = 'published' AND published_at < now() - $1 {ms}
                     ORDER BY published_at LIMIT $2)"
            ),
            // Bounded work whatever the backlog: each count reads at most `STATS_EXACT_UP_TO`
            // index entries (the partial indexes); beyond that the count is estimated (see
            // `stats`). The oldest pending event is the head of the pending index.
            // Each count follows its partial index in index order (`ORDER BY` the index's
            // columns, bitmap scans off, see `stats`), so that a planner without fresh
            // statistics cannot pick a scan of the whole table instead.
            stats: format!(
                "SELECT (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'pending'
                                               ORDER BY seq LIMIT {cap}) c),
                        (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'pending'
                                               AND retry_at IS NOT NULL
                                               ORDER BY aggregate_type, aggregate_id, seq
                                               LIMIT {cap}) c),
                        (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'dead'
                                               ORDER BY seq LIMIT {cap}) c),
                        (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'published'
                                               ORDER BY published_at LIMIT {cap}) c),
                        EXTRACT(EPOCH FROM clock_timestamp() - (
                            SELECT created_at FROM {t} WHERE status = 'pending'
                            ORDER BY seq LIMIT 1))::float8,
                        (SELECT count(*) FROM {r} WHERE expires_at > now()),
                        pg_stat_get_dead_tuples('{t}'::regclass),
                        pg_total_relation_size('{t}'::regclass),
                        (SELECT seq FROM {t} WHERE status = 'pending' ORDER BY seq DESC LIMIT 1)
                        - (SELECT seq FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT 1) + 1,
                        (SELECT reltuples FROM pg_class WHERE oid = '{retry_idx}'::regclass)::float8,
                        (SELECT reltuples FROM pg_class WHERE oid = '{dead_idx}'::regclass)::float8,
                        (SELECT reltuples FROM pg_class WHERE oid = '{published_idx}'::regclass)::float8",
                cap = STATS_EXACT_UP_TO,
                retry_idx = schema.table("event_outbox_retry_idx"),
                dead_idx = schema.table("event_outbox_dead_idx"),
                published_idx = schema.table("event_outbox_published_idx"),
            ),
            report_activity: format!("UPDATE {r} SET activity = $2 WHERE relay_id = $1"),
            live_activity: format!("SELECT activity FROM {r} WHERE expires_at > now()"),
        }
    }
}

/// The claim: pending events in sequence order, minus those in flight (`$2`, a hashed
/// anti-join) and those behind a head waiting for its retry. `partition_filter` is empty when
/// the relay holds every partition: filtering on all 64 costs more than the scan itself.
/// `decode_message` reads the columns by position, in this order.
fn claim(t: &str, partition_filter: &str) -> String {
    format!(
        "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no,
                e.event_type, e.topic, e.message_key, e.headers::text, e.payload, e.attempts,
                EXTRACT(EPOCH FROM clock_timestamp() - e.created_at)::float8 AS age
         FROM {t} e
         WHERE e.status = 'pending' {partition_filter}
           AND e.seq NOT IN (SELECT unnest($2::int8[]))
           AND NOT EXISTS (
               SELECT 1 FROM {t} b
               WHERE b.status = 'pending' AND b.retry_at IS NOT NULL
                 AND b.aggregate_type = e.aggregate_type
                 AND b.aggregate_id = e.aggregate_id
                 AND b.seq <= e.seq AND b.retry_at > now())
         ORDER BY e.seq
         LIMIT $1"
    )
}

impl PgRelayStore {
    /// Runs a `complete` statement: `$1` relay, `$2` seqs, `$3`/`$4` partitions and fences.
    async fn run_fenced(
        &self,
        sql: &str,
        relay: RelayId,
        seqs: Vec<i64>,
        parts: Vec<i16>,
        fences: Vec<i64>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(sql)
            .bind(relay.0)
            .bind(seqs)
            .bind(parts)
            .bind(fences)
            .execute(&self.pool)
            .await
            .map_err(err("complete"))?;
        Ok(done.rows_affected())
    }

    pub fn new(pool: PgPool, schema: &Schema) -> Self {
        Self {
            pool,
            sql: Arc::new(Sql::new(schema)),
            table: schema.table("event_outbox").into(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `"schema".event_outbox`, for statements built once from the validated schema name.
    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// What the live relays reported doing, summed per topic.
    pub(crate) async fn live_activity(&self) -> Result<RelayActivity, StoreError> {
        let stored: Vec<String> = sqlx::query_scalar(&self.sql.live_activity)
            .fetch_all(&self.pool)
            .await
            .map_err(err("relay activity"))?;
        Ok(RelayActivity::merge(stored.iter().map(String::as_str)))
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn err(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::new(context, e)
}

fn leases(rows: Vec<(i16, i64)>) -> Vec<PartitionLease> {
    rows.into_iter()
        .map(|(partition, fence)| PartitionLease {
            partition: partition as PartitionNo,
            fence,
        })
        .collect()
}

/// Splits fenced events into the parallel arrays the statements unnest.
fn fenced_arrays(events: impl Iterator<Item = Fenced>) -> (Vec<i64>, Vec<i16>, Vec<i64>) {
    let mut seqs = Vec::new();
    let mut parts = Vec::new();
    let mut fences = Vec::new();
    for e in events {
        seqs.push(e.seq);
        parts.push(e.lease.partition as i16);
        fences.push(e.lease.fence);
    }
    (seqs, parts, fences)
}

#[async_trait]
impl RelayStore for PgRelayStore {
    async fn heartbeat(
        &self,
        relay: RelayId,
        name: &str,
        lease: Duration,
    ) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(&self.sql.heartbeat)
            .bind(relay.0)
            .bind(name)
            .bind(millis(lease))
            .fetch_one(&self.pool)
            .await
            .map_err(err("heartbeat"))?;
        Ok(n as usize)
    }

    async fn renew_leases(
        &self,
        relay: RelayId,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        let rows = sqlx::query_as(&self.sql.renew)
            .bind(relay.0)
            .bind(millis(lease))
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
        let rows = sqlx::query_as(&self.sql.acquire)
            .bind(relay.0)
            .bind(max as i64)
            .bind(millis(lease))
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
        let parts: Vec<i16> = partitions.iter().map(|&p| p as i16).collect();
        sqlx::query(&self.sql.release)
            .bind(relay.0)
            .bind(parts)
            .execute(&self.pool)
            .await
            .map_err(err("release partitions"))?;
        Ok(())
    }

    async fn deregister(&self, relay: RelayId) -> Result<(), StoreError> {
        sqlx::query(&self.sql.deregister)
            .bind(relay.0)
            .execute(&self.pool)
            .await
            .map_err(err("deregister relay"))?;
        Ok(())
    }

    async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.sql.take_over)
            .bind(relay.0)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(err("take over instance"))?;
        Ok(done.rows_affected())
    }

    async fn claim(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.claim_excluding(partitions, limit, &[]).await
    }

    async fn claim_excluding(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let all = partitions.len() >= usize::from(PARTITIONS);
        let sql = if all {
            &self.sql.claim_all
        } else {
            &self.sql.claim_some
        };
        let mut query = sqlx::query(sql).bind(limit as i64).bind(in_flight);
        if !all {
            let parts: Vec<i16> = partitions.iter().map(|l| l.partition as i16).collect();
            query = query.bind(parts);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(err("claim"))?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            match decode_message(&row) {
                Ok(m) => batch.push(m),
                // A row written by hand that breaks the invariants would otherwise stall its
                // partition forever: park it as dead with the reason, for an operator.
                Err(e) => {
                    let seq: i64 = row.try_get("seq").map_err(err("claim: decode row"))?;
                    tracing::error!(seq, error = %e, "malformed outbox row; marking it dead");
                    sqlx::query(&self.sql.bury)
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
        let (gated, per_event) = if retain {
            (&self.sql.complete_retain_gated, &self.sql.complete_retain)
        } else {
            (&self.sql.complete_delete_gated, &self.sql.complete_delete)
        };
        // Fast path: one fence check for the whole batch, over its distinct leases.
        let mut leases: Vec<PartitionLease> = events.iter().map(|e| e.lease).collect();
        leases.sort_by_key(|l| (l.partition, l.fence));
        leases.dedup();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let parts: Vec<i16> = leases.iter().map(|l| l.partition as i16).collect();
        let fences: Vec<i64> = leases.iter().map(|l| l.fence).collect();
        let fast = self.run_fenced(gated, relay, seqs, parts, fences).await?;
        if fast == events.len() as u64 {
            return Ok(fast);
        }
        // A lease moved (or some events changed under us): check each event's own lease.
        let (seqs, parts, fences) = fenced_arrays(events.iter().copied());
        Ok(fast
            + self
                .run_fenced(per_event, relay, seqs, parts, fences)
                .await?)
    }

    async fn record_failures(
        &self,
        relay: RelayId,
        failures: &[FailedAttempt],
    ) -> Result<u64, StoreError> {
        if failures.is_empty() {
            return Ok(0);
        }
        let (seqs, parts, fences) = fenced_arrays(failures.iter().map(|f| f.event));
        let attempts: Vec<i32> = failures.iter().map(|f| f.attempts as i32).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let dead: Vec<bool> = failures
            .iter()
            .map(|f| f.next == AfterFailure::Dead)
            .collect();
        let delays: Vec<i64> = failures
            .iter()
            .map(|f| match f.next {
                AfterFailure::RetryIn(d) => millis(d),
                AfterFailure::Dead => 0,
            })
            .collect();
        let done = sqlx::query(&self.sql.fail)
            .bind(relay.0)
            .bind(seqs)
            .bind(parts)
            .bind(fences)
            .bind(attempts)
            .bind(errors)
            .bind(dead)
            .bind(delays)
            .execute(&self.pool)
            .await
            .map_err(err("record failures"))?;
        Ok(done.rows_affected())
    }

    async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.sql.purge)
            .bind(millis(retention))
            .bind(limit as i64)
            .execute(&self.pool)
            .await
            .map_err(err("purge published"))?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        // Planner statistics lag a backlog written since the last ANALYZE (a million rows
        // estimated at a thousand), and a bitmap scan of the whole pending index then looks
        // cheap: with bitmap scans off for this read-only transaction, every count walks its
        // partial index in order and stops at the cap (a sequential scan is priced by the
        // table's real size and not chosen).
        let mut tx = self.pool.begin().await.map_err(err("stats"))?;
        sqlx::query("SET LOCAL enable_bitmapscan = off")
            .execute(&mut *tx)
            .await
            .map_err(err("stats"))?;
        let row = sqlx::query(&self.sql.stats)
            .fetch_one(&mut *tx)
            .await
            .map_err(err("stats"))?;
        tx.rollback().await.map_err(err("stats"))?;
        let count = |i: usize| -> Result<u64, StoreError> {
            Ok(row.try_get::<i64, _>(i).map_err(err("stats"))?.max(0) as u64)
        };
        let estimate = |i: usize| -> Result<u64, StoreError> {
            let n: Option<f64> = row.try_get(i).map_err(err("stats"))?;
            Ok(n.unwrap_or(0.0).max(0.0) as u64)
        };
        // At the cap the exact count stopped reading: estimate, never below the cap.
        let capped = |exact: u64, estimated: u64| -> u64 {
            if exact < STATS_EXACT_UP_TO as u64 {
                exact
            } else {
                estimated.max(exact)
            }
        };
        let span: Option<i64> = row.try_get(8).map_err(err("stats"))?;
        let pending = capped(count(0)?, span.unwrap_or(0).max(0) as u64);
        let retrying = capped(count(1)?, estimate(9)?);
        let dead = capped(count(2)?, estimate(10)?);
        let published_retained = capped(count(3)?, estimate(11)?);
        let age: Option<f64> = row.try_get(4).map_err(err("stats"))?;
        let activity = self.live_activity().await?.total();
        let dead_tuples: Option<i64> = row.try_get(6).map_err(err("stats"))?;
        let table_bytes: Option<i64> = row.try_get(7).map_err(err("stats"))?;
        Ok(OutboxStats {
            dead_tuples: dead_tuples.map(|n| n.max(0) as u64),
            table_bytes: table_bytes.map(|n| n.max(0) as u64),
            in_flight: activity.in_flight,
            published_last_minute: activity.published_last_minute,
            pending,
            retrying,
            dead,
            published_retained,
            oldest_pending_age: age.map(|s| Duration::from_secs_f64(s.max(0.0))),
            live_relays: count(5)?,
        })
    }

    async fn report_activity(
        &self,
        relay: RelayId,
        activity: &RelayActivity,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.sql.report_activity)
            .bind(relay.0)
            .bind(activity.to_json())
            .execute(&self.pool)
            .await
            .map_err(err("report activity"))?;
        Ok(())
    }
}

/// Decodes a claimed row by position (the claim's column order) without sqlx's per-value
/// type check (the claim's SQL fixes the types): name lookups and checks per column were a
/// visible share of the relay's CPU on 2,000-row batches.
fn decode_message(row: &sqlx::postgres::PgRow) -> Result<OutboxMessage, StoreError> {
    let get = err("claim: decode row");
    let seq: i64 = row.try_get_unchecked(0).map_err(get)?;
    let bad = |what: String| StoreError::new("claim: stored event is malformed", what);
    let text = |i: usize| -> Result<&str, StoreError> {
        row.try_get_unchecked::<&str, _>(i)
            .map_err(err("claim: decode row"))
    };
    let event_id: Uuid = row.try_get_unchecked(1).map_err(err("claim: decode row"))?;
    let aggregate =
        AggregateRef::new(text(2)?, text(3)?).map_err(|e| bad(format!("seq {seq}: {e}")))?;
    let partition: i16 = row.try_get_unchecked(4).map_err(err("claim: decode row"))?;
    let topic = Topic::new(text(6)?).map_err(|e| bad(format!("seq {seq}: {e}")))?;
    let headers = match text(8)? {
        "{}" => Headers::new(),
        json => serde_json::from_str(json)
            .map_err(|e| bad(format!("seq {seq}: headers are not a string map: {e}")))?,
    };
    let payload: &[u8] = row.try_get_unchecked(9).map_err(err("claim: decode row"))?;
    let attempts: i32 = row
        .try_get_unchecked(10)
        .map_err(err("claim: decode row"))?;
    let age: f64 = row
        .try_get_unchecked(11)
        .map_err(err("claim: decode row"))?;
    Ok(OutboxMessage {
        seq,
        event_id: EventId::from_uuid(event_id),
        aggregate,
        event_type: text(5)?.to_owned(),
        topic,
        key: text(7)?.to_owned(),
        headers,
        payload: Bytes::copy_from_slice(payload),
        attempts: attempts.max(0) as u32,
        partition: partition as PartitionNo,
        age_at_claim: Duration::from_secs_f64(age.max(0.0)),
    })
}
