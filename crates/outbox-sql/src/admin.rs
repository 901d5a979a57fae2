//! [`OutboxAdmin`] written once. Filters are bound values, never SQL text.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    EventFilter, EventId, EventRecord, Headers, OutboxAdmin, StoreError, TopicStatus,
};

use crate::dialect::{Arg, Dialect};
use crate::engine::Engine;
use crate::millis;
use crate::relay_store::{err, SqlRelayStore};
use crate::run::{self, Row};

fn filter(f: &EventFilter) -> [(&'static str, Arg<'_>); 5] {
    [
        ("topic", Arg::OptText(f.topic.as_deref())),
        ("aggregate_id", Arg::OptText(f.aggregate_id.as_deref())),
        ("error_contains", Arg::OptText(f.error_contains.as_deref())),
        ("older_than_ms", Arg::OptInt(f.older_than.map(millis))),
        ("event_id", Arg::EventId(f.event_id)),
    ]
}

fn record<D: Dialect>(row: &Row<D>) -> Result<EventRecord, StoreError> {
    let e = err("admin: decode row");
    let text = |i: usize| D::DB::text(row, i).map(str::to_owned).map_err(&e);
    let headers = D::DB::text(row, 10).map_err(&e)?;
    Ok(EventRecord {
        seq: D::DB::int(row, 0).map_err(&e)?,
        event_id: D::event_id(row, 1).map_err(|x| StoreError::new("admin: event_id", x))?,
        topic: text(2)?,
        aggregate_type: text(3)?,
        aggregate_id: text(4)?,
        event_type: text(5)?,
        status: text(6)?,
        attempts: D::DB::int(row, 7).map_err(&e)?.max(0) as u32,
        last_error: D::DB::opt_text(row, 8).map_err(&e)?.map(str::to_owned),
        age_seconds: D::DB::int(row, 9).map_err(&e)? as f64 / 1000.0,
        headers: serde_json::from_str::<Headers>(headers).unwrap_or_default(),
        payload: Bytes::copy_from_slice(D::DB::bytes(row, 11).map_err(&e)?),
    })
}

#[async_trait]
impl<D: Dialect> OutboxAdmin for SqlRelayStore<D> {
    async fn topic_status(&self) -> Result<Vec<TopicStatus>, StoreError> {
        let rows = run::rows::<D>(self.pool(), &self.admin.topic_status, &[])
            .await
            .map_err(err("admin: topic status"))?;
        let e = err("admin: decode status");
        let mut status = rows
            .iter()
            .map(|r| {
                Ok(TopicStatus {
                    topic: D::DB::text(r, 0).map_err(&e)?.to_owned(),
                    pending: D::DB::int(r, 1).map_err(&e)?.max(0) as u64,
                    dead: D::DB::int(r, 2).map_err(&e)?.max(0) as u64,
                    published_retained: D::DB::int(r, 3).map_err(&e)?.max(0) as u64,
                    oldest_pending_age_seconds: D::DB::opt_int(r, 4)
                        .map_err(&e)?
                        .map(|ms| ms as f64 / 1000.0),
                    in_flight: 0,
                    published_last_minute: 0,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        outbox_core::admin::add_activity(&mut status, &self.live_activity().await?);
        Ok(status)
    }

    async fn dead(
        &self,
        filter_by: &EventFilter,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut args = filter(filter_by).to_vec();
        args.push(("limit", Arg::Int(limit as i64)));
        let rows = run::rows::<D>(self.pool(), &self.admin.dead, &args)
            .await
            .map_err(err("admin: dead"))?;
        rows.iter().map(record::<D>).collect()
    }

    async fn event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError> {
        let rows = run::rows::<D>(
            self.pool(),
            &self.admin.event,
            &[("event_id", Arg::EventId(Some(id)))],
        )
        .await
        .map_err(err("admin: event"))?;
        rows.first().map(record::<D>).transpose()
    }

    async fn requeue_dead(&self, filter_by: &EventFilter) -> Result<u64, StoreError> {
        run::count::<D>(self.pool(), &self.admin.requeue, &filter(filter_by))
            .await
            .map_err(err("admin: requeue"))
    }

    async fn purge_dead(&self, filter_by: &EventFilter) -> Result<u64, StoreError> {
        run::count::<D>(self.pool(), &self.admin.purge_dead, &filter(filter_by))
            .await
            .map_err(err("admin: purge"))
    }

    async fn replay(
        &self,
        topic: &str,
        since: Duration,
        aggregate_id: Option<&str>,
        dry_run: bool,
    ) -> Result<u64, StoreError> {
        let e = err("admin: replay");
        let args = [
            ("topic", Arg::Text(topic)),
            ("since_ms", Arg::Int(millis(since))),
            ("aggregate_id", Arg::OptText(aggregate_id)),
        ];
        if !dry_run {
            return run::count::<D>(self.pool(), &self.admin.replay, &args)
                .await
                .map_err(&e);
        }
        let rows = run::rows::<D>(self.pool(), &self.admin.replay_count, &args)
            .await
            .map_err(&e)?;
        match rows.first() {
            Some(r) => Ok(D::DB::int(r, 0).map_err(&e)?.max(0) as u64),
            None => Ok(0),
        }
    }
}
