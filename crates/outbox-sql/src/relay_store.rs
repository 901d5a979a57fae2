//! [`RelayStore`] written once: the relay's claims, fenced completions, failures, leases,
//! heartbeats and counts, on any [`Dialect`].
//!
//! Claims need no row locks: a relay only reads partitions it holds a lease on, and each
//! partition has one holder. Every change to an event joins the partition row and requires
//! the caller's relay id and the fence it claimed under (see `outbox_core::store`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    AggregateRef, FailedAttempt, Fenced, Headers, OutboxMessage, OutboxStats, PartitionLease,
    PartitionNo, RelayActivity, RelayId, RelayStore, StoreError, Topic, PARTITIONS,
};
use sqlx::Pool;

use crate::dialect::{AdminSql, Arg, Dialect, RelaySql};
use crate::engine::Engine;
use crate::millis;
use crate::run::{self, Row};

/// Counts in `stats` are exact up to this many rows per state; above it a store that can
/// estimate (PostgreSQL, from the span of pending sequence numbers and its statistics)
/// reports its estimate, so that the relay's gauges cost the same with a backlog of a
/// million events as with none.
pub const STATS_EXACT_UP_TO: i64 = 10_000;

/// The relay's (and operators') view of one outbox table. Cheap to clone.
pub struct SqlRelayStore<D: Dialect> {
    pool: Pool<D::DB>,
    dialect: D,
    sql: Arc<RelaySql>,
    pub(crate) admin: Arc<AdminSql>,
}

impl<D: Dialect> Clone for SqlRelayStore<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            dialect: self.dialect.clone(),
            sql: self.sql.clone(),
            admin: self.admin.clone(),
        }
    }
}

pub(crate) fn err(context: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::new(context, e)
}

fn leases<D: Dialect>(rows: &[Row<D>]) -> Result<Vec<PartitionLease>, StoreError> {
    let e = err("decode leases");
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(PartitionLease {
                partition: D::DB::int(r, 0).map_err(&e)? as PartitionNo,
                fence: D::DB::int(r, 1).map_err(&e)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by_key(|l| l.partition);
    Ok(out)
}

impl<D: Dialect> SqlRelayStore<D> {
    pub fn new(pool: Pool<D::DB>, dialect: impl Into<D>) -> Self {
        let dialect = dialect.into();
        Self {
            sql: Arc::new(dialect.relay_sql()),
            admin: Arc::new(dialect.admin_sql()),
            pool,
            dialect,
        }
    }

    pub fn pool(&self) -> &Pool<D::DB> {
        &self.pool
    }

    pub fn dialect(&self) -> &D {
        &self.dialect
    }

    /// What the live relays reported doing, summed per topic.
    pub(crate) async fn live_activity(&self) -> Result<RelayActivity, StoreError> {
        let e = err("relay activity");
        let rows = run::rows::<D>(&self.pool, &self.sql.live_activity, &[])
            .await
            .map_err(&e)?;
        let stored = rows
            .iter()
            .map(|r| D::DB::text(r, 0).map_err(&e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RelayActivity::merge(stored))
    }

    async fn complete_with(
        &self,
        gated: &crate::statement::Script,
        per_event: &crate::statement::Script,
        relay: RelayId,
        events: &[Fenced],
    ) -> Result<u64, StoreError> {
        let e = err("complete");
        // Fast path: one fence check for the whole batch, over its distinct leases.
        let mut held: Vec<PartitionLease> = events.iter().map(|e| e.lease).collect();
        held.sort_by_key(|l| (l.partition, l.fence));
        held.dedup();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let args = [
            ("relay", Arg::Relay(relay)),
            ("seqs", Arg::Ints(&seqs)),
            ("leases", Arg::Leases(&held)),
        ];
        let fast = run::count::<D>(&self.pool, gated, &args)
            .await
            .map_err(&e)?;
        if fast == events.len() as u64 {
            return Ok(fast);
        }
        // A lease moved (or some events changed under us): check each event's own lease.
        let args = [
            ("relay", Arg::Relay(relay)),
            ("fenced", Arg::Fenced(events)),
        ];
        Ok(fast
            + run::count::<D>(&self.pool, per_event, &args)
                .await
                .map_err(&e)?)
    }

    /// Parks a row that breaks the invariants (written by hand, say) as dead with the
    /// reason, for an operator: it would otherwise stall its partition forever.
    async fn bury(&self, row: &Row<D>, reason: &StoreError) -> Result<(), StoreError> {
        let seq = D::DB::int(row, 0).map_err(err("claim: decode row"))?;
        tracing::error!(seq, error = %reason, "malformed outbox row; marking it dead");
        let reason = reason.to_string();
        run::count::<D>(
            &self.pool,
            &self.sql.bury,
            &[("seq", Arg::Int(seq)), ("error", Arg::Text(&reason))],
        )
        .await
        .map_err(err("claim: park malformed row"))?;
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> RelayStore for SqlRelayStore<D> {
    async fn heartbeat(
        &self,
        relay: RelayId,
        name: &str,
        lease: Duration,
    ) -> Result<usize, StoreError> {
        let e = err("heartbeat");
        let args = [
            ("relay", Arg::Relay(relay)),
            ("name", Arg::Text(name)),
            ("lease_ms", Arg::Int(millis(lease))),
        ];
        let rows = run::rows::<D>(&self.pool, &self.sql.heartbeat, &args)
            .await
            .map_err(&e)?;
        let live = match rows.first() {
            Some(r) => D::DB::int(r, 0).map_err(&e)?,
            None => 1,
        };
        Ok(live.max(1) as usize)
    }

    async fn renew_leases(
        &self,
        relay: RelayId,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        let args = [
            ("relay", Arg::Relay(relay)),
            ("lease_ms", Arg::Int(millis(lease))),
        ];
        let rows = run::rows::<D>(&self.pool, &self.sql.renew, &args)
            .await
            .map_err(err("renew leases"))?;
        leases::<D>(&rows)
    }

    async fn acquire_partitions(
        &self,
        relay: RelayId,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        let args = [
            ("relay", Arg::Relay(relay)),
            ("max", Arg::Int(max as i64)),
            ("lease_ms", Arg::Int(millis(lease))),
        ];
        let rows = run::rows::<D>(&self.pool, &self.sql.acquire, &args)
            .await
            .map_err(err("acquire partitions"))?;
        leases::<D>(&rows)
    }

    async fn release_partitions(
        &self,
        relay: RelayId,
        partitions: &[PartitionNo],
    ) -> Result<(), StoreError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let args = [
            ("relay", Arg::Relay(relay)),
            ("partitions", Arg::Partitions(partitions)),
        ];
        run::count::<D>(&self.pool, &self.sql.release, &args)
            .await
            .map_err(err("release partitions"))?;
        Ok(())
    }

    async fn deregister(&self, relay: RelayId) -> Result<(), StoreError> {
        run::count::<D>(
            &self.pool,
            &self.sql.deregister,
            &[("relay", Arg::Relay(relay))],
        )
        .await
        .map_err(err("deregister relay"))?;
        Ok(())
    }

    async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
        let args = [("relay", Arg::Relay(relay)), ("name", Arg::Text(name))];
        run::count::<D>(&self.pool, &self.sql.take_over, &args)
            .await
            .map_err(err("take over instance"))
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
        // Filtering on all 64 partitions costs more than the scan itself.
        let all = partitions.len() >= usize::from(PARTITIONS);
        let parts: Vec<PartitionNo> = partitions.iter().map(|l| l.partition).collect();
        let args = [
            ("limit", Arg::Int(limit as i64)),
            ("in_flight", Arg::Ints(in_flight)),
            ("partitions", Arg::Partitions(&parts)),
        ];
        let script = if all {
            &self.sql.claim_all
        } else {
            &self.sql.claim_some
        };
        let rows = run::rows::<D>(&self.pool, script, &args)
            .await
            .map_err(err("claim"))?;
        let mut batch = Vec::with_capacity(rows.len());
        for row in &rows {
            match decode_message::<D>(row) {
                Ok(m) => batch.push(m),
                Err(e) => self.bury(row, &e).await?,
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
        let sql = &self.sql;
        if retain {
            self.complete_with(
                &sql.complete_retain_gated,
                &sql.complete_retain,
                relay,
                events,
            )
            .await
        } else {
            self.complete_with(
                &sql.complete_delete_gated,
                &sql.complete_delete,
                relay,
                events,
            )
            .await
        }
    }

    async fn record_failures(
        &self,
        relay: RelayId,
        failures: &[FailedAttempt],
    ) -> Result<u64, StoreError> {
        if failures.is_empty() {
            return Ok(0);
        }
        let args = [
            ("relay", Arg::Relay(relay)),
            ("failures", Arg::Failures(failures)),
        ];
        run::count::<D>(&self.pool, &self.sql.fail, &args)
            .await
            .map_err(err("record failures"))
    }

    async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError> {
        let args = [
            ("retention_ms", Arg::Int(millis(retention))),
            ("limit", Arg::Int(limit as i64)),
        ];
        run::count::<D>(&self.pool, &self.sql.purge, &args)
            .await
            .map_err(err("purge published"))
    }

    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        let e = err("stats");
        let rows = run::rows::<D>(&self.pool, &self.sql.stats, &[])
            .await
            .map_err(&e)?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::new("stats", "the statistics query returned no row"))?;
        let get = |i: usize| -> Result<Option<u64>, StoreError> {
            Ok(D::DB::opt_int(row, i).map_err(&e)?.map(|n| n.max(0) as u64))
        };
        // At the cap the exact count stopped reading: estimate, never below the cap.
        let capped = |exact: Option<u64>, estimated: Option<u64>| -> u64 {
            let exact = exact.unwrap_or(0);
            match estimated {
                Some(est) if exact >= STATS_EXACT_UP_TO as u64 => est.max(exact),
                _ => exact,
            }
        };
        let activity = self.live_activity().await?.total();
        Ok(OutboxStats {
            pending: capped(get(0)?, get(8)?),
            retrying: capped(get(1)?, get(9)?),
            dead: capped(get(2)?, get(10)?),
            published_retained: capped(get(3)?, get(11)?),
            oldest_pending_age: get(4)?.map(Duration::from_millis),
            live_relays: get(5)?.unwrap_or(0),
            dead_tuples: get(6)?,
            table_bytes: get(7)?,
            in_flight: activity.in_flight,
            published_last_minute: activity.published_last_minute,
        })
    }

    async fn report_activity(
        &self,
        relay: RelayId,
        activity: &RelayActivity,
    ) -> Result<(), StoreError> {
        let json = activity.to_json();
        let args = [("relay", Arg::Relay(relay)), ("activity", Arg::Text(&json))];
        run::count::<D>(&self.pool, &self.sql.report_activity, &args)
            .await
            .map_err(err("report activity"))?;
        Ok(())
    }
}

/// Decodes a claimed row by position (the claim's column order, see [`RelaySql`]).
fn decode_message<D: Dialect>(row: &Row<D>) -> Result<OutboxMessage, StoreError> {
    let get = err("claim: decode row");
    let seq = D::DB::int(row, 0).map_err(&get)?;
    let bad = |what: String| {
        StoreError::new(
            "claim: stored event is malformed",
            format!("seq {seq}: {what}"),
        )
    };
    let text = |i: usize| D::DB::text(row, i).map_err(&get);
    let event_id = D::event_id(row, 1).map_err(|e| bad(format!("event_id: {e}")))?;
    let aggregate = AggregateRef::new(text(2)?, text(3)?).map_err(|e| bad(e.to_string()))?;
    let partition = D::DB::int(row, 4).map_err(&get)?;
    let topic = Topic::new(text(6)?).map_err(|e| bad(e.to_string()))?;
    let headers = match text(8)? {
        "{}" => Headers::new(),
        json => serde_json::from_str(json)
            .map_err(|e| bad(format!("headers are not a string map: {e}")))?,
    };
    let payload = D::DB::bytes(row, 9).map_err(&get)?;
    let attempts = D::DB::int(row, 10).map_err(&get)?;
    let age_ms = D::DB::int(row, 11).map_err(&get)?;
    Ok(OutboxMessage {
        seq,
        event_id,
        aggregate,
        event_type: text(5)?.to_owned(),
        topic,
        key: text(7)?.to_owned(),
        headers,
        payload: Bytes::copy_from_slice(payload),
        attempts: attempts.max(0) as u32,
        partition: partition as PartitionNo,
        age_at_claim: Duration::from_millis(age_ms.max(0) as u64),
    })
}
